//! Allocations per request of the full in-process stack (the setup of the `stack` bench: every
//! layer in the recommended order over a no-op service, a chat request whose answer is read to
//! the end), counted with the counting allocator against the bare service.

mod common_alloc;

use std::convert::Infallible;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use llm_layers::normalize::NormalizeErrorsLayer;
use llm_layers::stack::Stack;
use tower::{Service, ServiceBuilder, ServiceExt};

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

/// Allocations per request of the whole stack over the bare service, at most.
const STACK_ALLOCATIONS: usize = 24;

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

fn body() -> Bytes {
    let turn = r#"{"role":"user","content":"Could you explain how the borrow checker decides when a reference may outlive the value it points to?"}"#;
    let mut s = String::from(
        r#"{"model":"gpt-4o","temperature":0.7,"max_tokens":512,"stream":false,"messages":[{"role":"system","content":"You are a helpful assistant."}"#,
    );
    for _ in 0..16 {
        s.push(',');
        s.push_str(turn);
    }
    s.push_str("]}");
    Bytes::from(s)
}

fn request(body: &Bytes) -> Request<Full<Bytes>> {
    Request::post("http://gateway.local/v1/chat/completions")
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-bench-0123456789abcdef0123")
        .header("content-length", body.len())
        .body(Full::new(body.clone()))
        .unwrap()
}

#[test]
fn allocations_of_the_full_stack() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stack = Stack::from_toml_str(CONFIG).unwrap();
    let full = ServiceBuilder::new()
        .layer(stack.route_layer("/v1/chat/completions"))
        .layer(stack.retry())
        .layer(stack.breaker())
        .layer(NormalizeErrorsLayer::new())
        .service(Noop);
    let body = body();
    let run = |svc: bool| {
        let req = request(&body);
        rt.block_on(async {
            let res = if svc {
                let res = full.clone().oneshot(req).await.unwrap();
                assert_eq!(res.status(), 200);
                res.into_body().collect().await.ok().unwrap().to_bytes()
            } else {
                Noop.oneshot(req)
                    .await
                    .unwrap()
                    .into_body()
                    .collect()
                    .await
                    .ok()
                    .unwrap()
                    .to_bytes()
            };
            assert_eq!(res, COMPLETION.as_bytes());
        })
    };
    // Warm: the circuit, the bucket and the caches exist.
    run(true);
    run(true);
    let ((), bare) = common_alloc::count(|| run(false));
    let ((), every) = common_alloc::count(|| run(true));
    eprintln!("allocations per request: bare service {bare}, every layer {every}");
    // The stack's own: request and response extensions (auth's identity, the view, retry's
    // attempts), the replay copy of the head (the rate-limit headers are written without one).
    // A new allocation on the path shows here.
    assert!(
        every - bare <= STACK_ALLOCATIONS,
        "{} allocations over the bare service, at most {STACK_ALLOCATIONS} expected",
        every - bare
    );
}
