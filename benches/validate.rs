//! The cost of validation: a typical 2 KiB chat request and a 200 KiB one, through the layer and
//! through the bare service, next to a plain `serde_json::from_slice::<Value>` of the same body.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::{Request, Response};
use llm_layers::body::LayerBody;
use llm_layers::request::{CharEstimator, Endpoint, RequestView};
use llm_layers::validate::ValidateRequestLayer;
use serde_json::{json, Value};
use tower::{Layer, ServiceExt};

/// A chat request of about `target` bytes: a system prompt, then user/assistant turns.
fn chat_body(target: usize) -> Bytes {
    let mut messages = vec![
        json!({"role": "system", "content": "You are a helpful assistant. Answer briefly and cite sources."}),
    ];
    let turn = "Could you explain how the borrow checker decides when a reference may outlive \
                the value it points to, with an example involving a struct and a method? ";
    let mut i = 0;
    loop {
        let body = json!({"model": "gpt-4o", "temperature": 0.7, "max_tokens": 512,
            "stream": false, "messages": messages});
        let bytes = serde_json::to_vec(&body).unwrap();
        if bytes.len() >= target {
            return Bytes::from(bytes);
        }
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        messages.push(json!({"role": role, "content": turn}));
        i += 1;
    }
}

fn request(body: &Bytes) -> Request<Body> {
    Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(body.clone()))
        .unwrap()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let bare = tower::service_fn(|_req: Request<Body>| async {
        Ok::<_, Infallible>(Response::new(Body::empty()))
    });
    let layered = ValidateRequestLayer::new().layer(tower::service_fn(
        |_req: Request<LayerBody<Body>>| async {
            Ok::<_, Infallible>(Response::new(Body::empty()))
        },
    ));

    let mut group = c.benchmark_group("validate");
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(2));
    for (name, size) in [("2KiB", 2 * 1024), ("200KiB", 200 * 1024)] {
        let body = chat_body(size);
        // Make sure the layer passes this body rather than measuring a rejection.
        let res = rt
            .block_on(layered.clone().oneshot(request(&body)))
            .unwrap();
        assert_eq!(res.status(), 200);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(
            BenchmarkId::new("serde_json_value", name),
            &body,
            |b, body| b.iter(|| serde_json::from_slice::<Value>(body).unwrap()),
        );
        group.bench_with_input(
            BenchmarkId::new("request_view_parse", name),
            &body,
            |b, body| {
                b.iter(|| {
                    RequestView::parse(Endpoint::ChatCompletions, body, &CharEstimator).unwrap()
                })
            },
        );
        group.bench_with_input(BenchmarkId::new("bare_service", name), &body, |b, body| {
            b.to_async(&rt).iter(|| bare.oneshot(request(body)))
        });
        group.bench_with_input(BenchmarkId::new("with_layer", name), &body, |b, body| {
            b.to_async(&rt)
                .iter(|| layered.clone().oneshot(request(body)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
