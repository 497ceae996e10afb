//! What the validation layer allocates per request, watched by a counting allocator.
//!
//! The layer must read the body: it buffers it (one `Bytes` for a body that arrives as one
//! chunk) and parses it into the [`RequestView`] it hands on in the request extensions, the
//! fields its checks read gathered in the same pass on the stack. The view is the layer's
//! product; what building it costs — the view's parse of the same bytes and its insertion in
//! an empty `http::Extensions` — is measured as a control and allowed exactly, no more: the
//! checks themselves (parameters, messages, allowed models, context length) allocate nothing.

mod common_alloc;

use common_alloc::count;
use std::convert::Infallible;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Extensions, Request, Response};
use http_body_util::Full;
use llm_layers::body::LayerBody;
use llm_layers::request::{CharEstimator, Endpoint, RequestView};
use llm_layers::validate::ValidateRequestLayer;
use serde_json::json;
use tower::{Layer, Service, ServiceExt};

/// A chat request of about 2 KiB: parameters the checks read, a system prompt and turns.
fn chat_body() -> Bytes {
    let turn = "Could you explain how the borrow checker decides when a reference may outlive \
                the value it points to, with an example involving a struct and a method? ";
    let mut messages = vec![json!({"role": "system", "content": "You are a helpful assistant."})];
    while messages.len() < 13 {
        let role = if messages.len() % 2 == 1 {
            "user"
        } else {
            "assistant"
        };
        messages.push(json!({"role": role, "content": turn}));
    }
    let body = json!({"model": "gpt-4o", "temperature": 0.7, "top_p": 1, "max_tokens": 512,
        "stream": false, "messages": messages});
    Bytes::from(serde_json::to_vec(&body).unwrap())
}

fn request(body: &Bytes) -> Request<Full<Bytes>> {
    Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .body(Full::new(body.clone()))
        .unwrap()
}

type Answer = std::future::Ready<Result<Response<Full<Bytes>>, Infallible>>;

/// An upstream that allocates nothing: a static answer, once it checked it got the view.
fn upstream<B>(
) -> impl Service<Request<B>, Response = Response<Full<Bytes>>, Error = Infallible, Future = Answer>
       + Clone {
    tower::service_fn(|req: Request<B>| {
        let status = if RequestView::from_extensions(req.extensions()).is_some() {
            200
        } else {
            500
        };
        let mut res = Response::new(Full::new(Bytes::from_static(b"{}")));
        *res.status_mut() = http::StatusCode::from_u16(status).unwrap();
        std::future::ready(Ok(res))
    })
}

/// Calls `svc` with a fresh request twice (the first warms lazy statics up) and returns the
/// status and the allocations of the second call.
fn call_counted<S, B>(svc: &mut S, body: &Bytes) -> (u16, usize)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
{
    let mut once = || {
        let req = request(body);
        let (res, n) = count(|| {
            let svc = svc.ready().now_or_never().unwrap().unwrap();
            svc.call(req).now_or_never().unwrap().unwrap()
        });
        (res.status().as_u16(), n)
    };
    once();
    once()
}

/// The control: the view of `body`, parsed and inserted in an empty map.
fn view_cost(body: &Bytes) -> usize {
    let mut ext = Extensions::new();
    let ((), n) = count(|| {
        let view =
            RequestView::parse_bytes(Endpoint::ChatCompletions, body.clone(), &CharEstimator)
                .unwrap()
                .with_path("/v1/chat/completions");
        ext.insert(view);
    });
    assert!(ext.get::<RequestView>().is_some());
    n
}

#[test]
fn the_counter_sees_allocations() {
    let (boxed, n) = count(|| Box::new([0u8; 32]));
    drop(boxed);
    assert_eq!(n, 1);
    // The control is not zero, so allowing it is not allowing anything.
    assert!(view_cost(&chat_body()) >= 2, "{}", view_cost(&chat_body()));
}

#[test]
fn every_check_on_allocates_only_the_view() {
    let body = chat_body();
    assert!(body.len() > 1800, "{}", body.len());
    let (status, bare) = call_counted(&mut upstream::<Full<Bytes>>(), &body);
    assert_eq!(status, 500, "the bare service gets no view");
    let allowed = view_cost(&body);
    let layer = ValidateRequestLayer::builder()
        .allowed_models(["gpt-4o", "gpt-4o-mini"])
        .context_window("gpt-4o", 128_000)
        .build()
        .unwrap();
    let mut validated = layer.layer(upstream::<LayerBody<Full<Bytes>>>());
    let (status, n) = call_counted(&mut validated, &body);
    eprintln!("allocations per request: bare service {bare}, validation {n}, the view {allowed}");
    assert_eq!(status, 200, "the request passes every check");
    assert_eq!(
        n,
        bare + allowed,
        "the layer made {n} allocations; the bare service makes {bare} and the view costs \
         {allowed}, so validation added {} of its own",
        n as isize - (bare + allowed) as isize
    );
}
