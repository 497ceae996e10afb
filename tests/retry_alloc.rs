//! The retry layer's success path allocates only what its contract needs: one copy of the
//! request head kept for a replay, and the [`Attempts`] value it leaves on the response. A
//! counting global allocator watches the calls; any other allocation fails these tests.

mod common_alloc;

use common_alloc::{count, COUNTING};
use std::convert::Infallible;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Extensions, Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use llm_layers::body::LayerBody;
use llm_layers::ext::Attempts;
use llm_layers::retry::{RetryLayer, RetryStop};
use tower::{Layer, Service, ServiceExt};

const CHAT: &[u8] =
    br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}]}"#;

type Answer = std::future::Ready<Result<Response<Full<Bytes>>, Infallible>>;

/// An upstream answering `200` with a `content-type`, as real upstreams do, built outside the
/// count (so the bare figure is the same for every request shape).
fn upstream<B>(
) -> impl Service<Request<B>, Response = Response<Full<Bytes>>, Error = Infallible, Future = Answer>
       + Clone {
    tower::service_fn(|req: Request<B>| {
        let counting = COUNTING.with(|c| c.replace(false));
        drop(req);
        let res = Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        COUNTING.with(|c| c.set(counting));
        std::future::ready(Ok(res))
    })
}

fn get() -> Request<Full<Bytes>> {
    Request::get("http://api.example/v1/models")
        .header("authorization", "Bearer sk-test")
        .body(Full::default())
        .unwrap()
}

fn chat() -> Request<Full<Bytes>> {
    Request::post("http://api.example/v1/chat/completions")
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-test")
        .header("content-length", CHAT.len())
        .body(Full::new(Bytes::from_static(CHAT)))
        .unwrap()
}

fn upload() -> Request<Full<Bytes>> {
    Request::post("http://api.example/v1/files")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(CHAT)))
        .unwrap()
}

type Chunks = StreamBody<
    futures_util::stream::Iter<std::vec::IntoIter<Result<http_body::Frame<Bytes>, Infallible>>>,
>;

/// A chat request whose body comes in four chunks, with no length announced.
fn chunked_chat() -> Request<Chunks> {
    let frames: Vec<_> = CHAT
        .chunks(CHAT.len().div_ceil(4))
        .map(|c| Ok(http_body::Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    Request::post("http://api.example/v1/chat/completions")
        .header("content-type", "application/json")
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .unwrap()
}

/// Calls `svc` with a request from `make` (made outside the count) twice, the first to warm
/// lazy statics up, and returns the allocations of the second call, response dropped and body
/// read to its end inside the count, with the [`Attempts`] the response carried.
fn calls<S, B, R>(svc: &mut S, make: impl Fn() -> Request<B>) -> (Option<Attempts>, usize)
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Error: std::fmt::Debug,
    R: http_body::Body + Unpin,
    R::Error: std::fmt::Debug,
{
    let mut once = || {
        let req = make();
        let (attempts, n) = count(|| {
            let svc = svc.ready().now_or_never().unwrap().unwrap();
            let res = svc.call(req).now_or_never().unwrap().unwrap();
            assert_eq!(res.status(), 200);
            let attempts = res.extensions().get::<Attempts>().copied();
            let mut body = res.into_body();
            while let Some(frame) = body.frame().now_or_never().unwrap() {
                frame.unwrap();
            }
            attempts
        });
        (attempts, n)
    };
    once();
    once()
}

/// [`calls`] through the retry layer, which must have answered at the first attempt.
fn layered<S, B, R>(svc: &mut S, make: impl Fn() -> Request<B>) -> usize
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Error: std::fmt::Debug,
    R: http_body::Body + Unpin,
    R::Error: std::fmt::Debug,
{
    let (attempts, n) = calls(svc, make);
    assert_eq!(attempts, Some(Attempts(1)));
    n
}

/// What keeping one copy of the request head costs: the floor for a layer that may replay.
fn head_clone_cost<B>(req: Request<B>) -> usize {
    let (parts, _) = req.into_parts();
    let (copy, n) = count(|| parts.clone());
    drop(copy);
    n
}

/// What the `Attempts` value costs in a response's empty extensions.
fn attempts_cost() -> usize {
    let mut ext = Extensions::new();
    let ((), n) = count(|| {
        ext.insert(Attempts(1));
    });
    n
}

/// What the `Attempts` value and the reason the layer did not retry cost together.
fn attempts_and_stop_cost() -> usize {
    let mut ext = Extensions::new();
    let ((), n) = count(|| {
        ext.insert(Attempts(1));
        ext.insert(RetryStop::NotIdempotent);
    });
    n
}

#[test]
fn the_controls_count() {
    let (boxed, n) = count(|| Box::new([0u8; 32]));
    drop(boxed);
    assert_eq!(n, 1);
    // Neither allowance is zero, so allowing them is not allowing anything.
    assert!(head_clone_cost(chat()) >= 1);
    assert!(attempts_cost() >= 1);
}

#[test]
fn a_replayable_request_allocates_one_head_copy_and_the_attempts_value() {
    let bare = calls(&mut upstream::<Full<Bytes>>(), chat).1;
    let allowed = head_clone_cost(chat()) + attempts_cost();
    // The default layer: budget, attempts header on.
    let mut svc = RetryLayer::new().layer(upstream::<LayerBody<Full<Bytes>>>());
    let n = layered(&mut svc, chat);
    assert_eq!(
        n,
        bare + allowed,
        "a chat POST: {n} allocations; bare {bare}, head copy and Attempts {allowed}: the layer \
         added {} of its own",
        n as isize - (bare + allowed) as isize
    );
    // No budget, no header: the same.
    let mut svc = RetryLayer::builder()
        .no_budget()
        .attempts_header(false)
        .build()
        .unwrap()
        .layer(upstream::<LayerBody<Full<Bytes>>>());
    assert_eq!(layered(&mut svc, chat), bare + allowed);
}

#[test]
fn a_request_without_a_body_allocates_the_same() {
    let bare = calls(&mut upstream::<Full<Bytes>>(), get).1;
    let allowed = head_clone_cost(get()) + attempts_cost();
    let mut svc = RetryLayer::new().layer(upstream::<LayerBody<Full<Bytes>>>());
    let n = layered(&mut svc, get);
    assert_eq!(
        n,
        bare + allowed,
        "a GET: the layer added {}",
        n as isize - (bare + allowed) as isize
    );
}

#[test]
fn a_request_sent_once_allocates_only_the_extension_values() {
    // Sent once because it is not replayable: the response says why, in a second value.
    let allowed = attempts_and_stop_cost();
    let bare = calls(&mut upstream::<Full<Bytes>>(), upload).1;
    let mut svc = RetryLayer::new().layer(upstream::<LayerBody<Full<Bytes>>>());
    let n = layered(&mut svc, upload);
    assert_eq!(
        n,
        bare + allowed,
        "a file upload: the layer added {}",
        n as isize - (bare + allowed) as isize
    );
    let mut svc = RetryLayer::builder()
        .max_attempts(1)
        .build()
        .unwrap()
        .layer(upstream::<LayerBody<Full<Bytes>>>());
    let n = layered(&mut svc, chat);
    assert_eq!(
        n,
        calls(&mut upstream::<Full<Bytes>>(), chat).1 + attempts_cost()
    );
}

#[test]
fn a_body_in_chunks_costs_one_buffer_more() {
    let bare = calls(&mut upstream::<Chunks>(), chunked_chat).1;
    let allowed = head_clone_cost(chunked_chat()) + attempts_cost();
    let mut svc = RetryLayer::new().layer(upstream::<LayerBody<Chunks>>());
    let n = layered(&mut svc, chunked_chat);
    // Buffering aside, nothing: the first chunk is kept as it is, the others are copied into
    // one buffer, which grows at most once per chunk.
    let buffering = n - (bare + allowed);
    println!("four chunks: {buffering} allocations to buffer the body");
    assert!(
        (1..=3).contains(&buffering),
        "four chunks: the layer added {buffering} allocations (at most 3 are the buffer's)"
    );
}

/// The future a call moves around stays small: the head waits in one field while the body is
/// buffered, not also inside the buffering state (784 bytes when it did).
#[test]
fn the_response_future_stays_small() {
    let mut svc = RetryLayer::new().layer(upstream::<LayerBody<Full<Bytes>>>());
    let svc = svc.ready().now_or_never().unwrap().unwrap();
    let fut = svc.call(chat());
    let size = std::mem::size_of_val(&fut);
    assert!(size <= 700, "the retry ResponseFuture is {size} bytes");
    assert_eq!(fut.now_or_never().unwrap().unwrap().status(), 200);
}
