//! The normalizer's cost on the success path, against the bare inner service in the same run,
//! and the classifier's time per recorded error response.

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

criterion_group!(benches, success_path, classification);
criterion_main!(benches);
