//! The full stack in one process: every layer in the recommended order (auth → validation →
//! rate limit → retry → circuit breaker → normalizer, outermost first) over a no-op service,
//! against the bare no-op service, for a 2 KiB chat request whose answer (a chat completion
//! with `usage`) is read to the end. The difference of the two is the stack's cost per
//! request.
//!
//! With the feature `metrics`, a third case runs the same stack with a Prometheus recorder
//! installed (`metrics-exporter-prometheus`, as the example gateway's `/metrics`): the cost of
//! recording every layer's metrics. Without a recorder ("every layer") the layers' calls find
//! none and record nothing.
//!
//! ```sh
//! cargo bench --bench stack
//! cargo bench --bench stack --features metrics
//! ```

use std::convert::Infallible;
use std::task::{Context, Poll};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use llm_layers::normalize::NormalizeErrorsLayer;
use llm_layers::stack::Stack;
use serde_json::json;
use tower::{Service, ServiceBuilder, ServiceExt};

/// Limits the bench cannot reach, so every layer does its whole success-path work.
const CONFIG: &str = r#"
[[keys]]
id = "bench"
secret = "sk-bench-0123456789abcdef0123"
rpm = 4000000000
tpm = 4000000000
concurrency = 100000

[validation]
allowed_models = ["gpt-4o", "gpt-4o-mini"]

[retry]
max_attempts = 3

[breaker]
key_by = "model"
"#;

const COMPLETION: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1733000000,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant","content":"Hello!"},"finish_reason":"stop"}],"usage":{"prompt_tokens":480,"completion_tokens":2,"total_tokens":482}}"#;

/// The no-op upstream: any request, a fixed chat completion.
#[derive(Clone, Copy)]
struct Noop;

impl<B> Service<Request<B>> for Noop {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<B>) -> Self::Future {
        std::future::ready(Ok(Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(COMPLETION.as_bytes())))
            .unwrap()))
    }
}

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

fn request(body: &Bytes) -> Request<Full<Bytes>> {
    Request::post("http://gateway.local/v1/chat/completions")
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-bench-0123456789abcdef0123")
        .header("user-agent", "OpenAI/Python 1.54.0")
        .header("content-length", body.len())
        .body(Full::new(body.clone()))
        .unwrap()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stack = Stack::from_toml_str(CONFIG).expect("the bench configuration");
    let full = ServiceBuilder::new()
        .layer(stack.route_layer("/v1/chat/completions"))
        .layer(stack.retry())
        .layer(stack.breaker())
        .layer(NormalizeErrorsLayer::new())
        .service(Noop);
    let body = chat_body(2048);

    // The stack answers 200 with the completion: checked once, so the bench measures success.
    let answer = rt.block_on(async {
        let res = full.clone().oneshot(request(&body)).await.unwrap();
        let status = res.status();
        (
            status,
            res.into_body().collect().await.ok().unwrap().to_bytes(),
        )
    });
    assert_eq!(answer.0, 200, "{:?}", answer.1);
    assert_eq!(answer.1, COMPLETION.as_bytes());

    let mut group = c.benchmark_group(format!("stack/chat {} B", body.len()));
    group.throughput(Throughput::Elements(1));
    group.bench_function("bare service", |b| {
        b.to_async(&rt).iter(|| async {
            let res = Noop.oneshot(request(&body)).await.unwrap();
            res.into_body().collect().await.ok().unwrap()
        })
    });
    group.bench_function("every layer", |b| {
        b.to_async(&rt).iter(|| async {
            let res = full.clone().oneshot(request(&body)).await.unwrap();
            res.into_body().collect().await.ok().unwrap()
        })
    });
    #[cfg(feature = "metrics")]
    {
        // This thread's recorder: the runtime is current-thread, so every layer records to it.
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let _local = metrics::set_default_local_recorder(&recorder);
        group.bench_function("every layer, Prometheus recorder", |b| {
            b.to_async(&rt).iter(|| async {
                let res = full.clone().oneshot(request(&body)).await.unwrap();
                res.into_body().collect().await.ok().unwrap()
            })
        });
        // The recorder saw the requests (a sanity check, outside the measurement).
        assert!(handle
            .render()
            .contains("llm_layers_requests{layer=\"auth\"}"));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
