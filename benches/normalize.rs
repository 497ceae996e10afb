//! The normalizer's cost on the success path, against the bare inner service in the same run,
//! the time to frame a clean event stream, and the classifier's time per recorded error
//! response.

use std::convert::Infallible;
use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures_util::FutureExt;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use llm_layers::classify::classify_response;
use llm_layers::normalize::NormalizeErrorsLayer;
use tower::{Layer, Service, ServiceExt};

fn ok_service(
) -> impl Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = Infallible> + Clone
{
    tower::service_fn(|_req: Request<Full<Bytes>>| {
        std::future::ready(Ok::<_, Infallible>(
            Response::builder()
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(b"{\"id\":\"chatcmpl-1\"}")))
                .unwrap(),
        ))
    })
}

/// One call, driven to completion without a runtime (every future here is ready at once).
fn call<S>(svc: &mut S) -> S::Response
where
    S: Service<Request<Full<Bytes>>>,
    S::Error: std::fmt::Debug,
{
    let svc = svc.ready().now_or_never().unwrap().unwrap();
    svc.call(Request::new(Full::default()))
        .now_or_never()
        .unwrap()
        .unwrap()
}

fn success_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("normalize/success");
    group.warm_up_time(std::time::Duration::from_secs(1));
    group.measurement_time(std::time::Duration::from_secs(3));
    let mut bare = ok_service();
    group.bench_function("bare", |b| b.iter(|| black_box(call(&mut bare))));
    let mut layered = NormalizeErrorsLayer::new().layer(ok_service());
    group.bench_function("normalized", |b| b.iter(|| black_box(call(&mut layered))));
    group.finish();
}

struct Fixture {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

fn fixtures() -> Vec<Fixture> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/errors.jsonl"
    ))
    .unwrap();
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let mut headers = HeaderMap::new();
            for (k, val) in v["headers"].as_object().unwrap() {
                if let (Ok(k), Ok(val)) = (
                    HeaderName::try_from(k.as_str()),
                    HeaderValue::try_from(val.as_str().unwrap_or_default()),
                ) {
                    headers.append(k, val);
                }
            }
            Fixture {
                status: StatusCode::from_u16(v["status"].as_u64().unwrap() as u16).unwrap(),
                headers,
                body: Bytes::from(v["body"].as_str().unwrap().to_owned()),
            }
        })
        .collect()
}

fn classification(c: &mut Criterion) {
    let fixtures = fixtures();
    let mut group = c.benchmark_group("classify");
    group.warm_up_time(std::time::Duration::from_secs(1));
    group.measurement_time(std::time::Duration::from_secs(3));
    // Throughput in elements: criterion reports the time per fixture.
    group.throughput(Throughput::Elements(fixtures.len() as u64));
    group.bench_function("all_fixtures", |b| {
        b.iter(|| {
            for f in &fixtures {
                black_box(classify_response(f.status, &f.headers, &f.body));
            }
        })
    });
    group.finish();
}

type Frames = http_body_util::StreamBody<
    futures_util::stream::Iter<std::vec::IntoIter<Result<http_body::Frame<Bytes>, Infallible>>>,
>;

/// A `200` event stream of 64 chunks of 16 events each, split inside lines (as a network splits
/// them), through the layer and drained.
fn sse_stream(c: &mut Criterion) {
    use http_body_util::BodyExt;
    let mut stream = Vec::new();
    for i in 0..1024 {
        stream.extend_from_slice(
            format!("data: {{\"id\":\"c1\",\"choices\":[{{\"delta\":{{\"content\":\"tok{i}\"}}}}]}}\n\n")
                .as_bytes(),
        );
    }
    let stream = Bytes::from(stream);
    let chunk = stream.len().div_ceil(64) + 7;
    let chunks: Vec<Bytes> = (0..stream.len())
        .step_by(chunk)
        .map(|i| stream.slice(i..(i + chunk).min(stream.len())))
        .collect();
    let inner = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let frames: Vec<_> = chunks
            .iter()
            .map(|c| Ok(http_body::Frame::data(c.clone())))
            .collect();
        let body: Frames = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        std::future::ready(Ok::<_, Infallible>(
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(body)
                .unwrap(),
        ))
    });
    let mut layered = NormalizeErrorsLayer::new().layer(inner);
    let mut group = c.benchmark_group("normalize/sse");
    group.warm_up_time(std::time::Duration::from_secs(1));
    group.measurement_time(std::time::Duration::from_secs(3));
    group.throughput(Throughput::Bytes(stream.len() as u64));
    group.bench_function("1024_events_in_64_chunks", |b| {
        b.iter(|| {
            let mut body = call(&mut layered).into_body();
            let mut n = 0;
            while let Some(frame) = body.frame().now_or_never().unwrap() {
                n += frame.unwrap().into_data().unwrap().len();
            }
            black_box(n)
        })
    });
    group.finish();
}

criterion_group!(benches, success_path, sse_stream, classification);
criterion_main!(benches);
