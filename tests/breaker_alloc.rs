//! The circuit breaker's closed path allocates nothing: a counting global allocator watches
//! a call from `call` to the end of the response body (where a success is recorded).

mod common_alloc;

use common_alloc::{count, COUNTING};
use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use llm_layers::body::LayerBody;
use llm_layers::breaker::{CircuitBreakerLayer, CircuitKey};
use tower::{Layer, Service, ServiceExt};

type Answer = std::future::Ready<Result<Response<Full<Bytes>>, Infallible>>;

/// An upstream answering `200` with a body still to be read, built outside the count.
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

fn chat() -> Request<Full<Bytes>> {
    Request::post("http://api.example/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"model":"m"}"#)))
        .unwrap()
}

/// Calls `svc` twice (the first warms lazy statics and creates a keyed circuit) and returns
/// the allocations of the second call, its body read to the end within the count.
fn calls<S, R>(svc: &mut S) -> usize
where
    S: Service<Request<Full<Bytes>>, Response = Response<R>>,
    S::Error: std::fmt::Debug,
    R: http_body::Body + Unpin,
    R::Error: std::fmt::Debug,
{
    let mut once = || {
        let req = chat();
        let ((), n) = count(|| {
            let svc = svc.ready().now_or_never().unwrap().unwrap();
            let res = svc.call(req).now_or_never().unwrap().unwrap();
            assert_eq!(res.status(), 200);
            let mut body = res.into_body();
            while let Some(frame) = body.frame().now_or_never().unwrap() {
                frame.unwrap();
            }
        });
        n
    };
    once();
    once()
}

#[test]
fn the_counter_sees_allocations() {
    let (boxed, n) = count(|| Box::new([0u8; 32]));
    drop(boxed);
    assert_eq!(n, 1);
}

#[test]
fn the_closed_path_allocates_nothing() {
    // Timers need a runtime to be set; nothing here waits on them.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let bare = calls(&mut upstream::<Full<Bytes>>());
    let layers = [
        ("the defaults", CircuitBreakerLayer::builder()),
        (
            "slow-call timing",
            CircuitBreakerLayer::builder().slow_calls(Duration::from_secs(10), 50.0),
        ),
        (
            "a call timeout",
            CircuitBreakerLayer::builder().call_timeout(Duration::from_secs(60)),
        ),
        (
            "a time window",
            CircuitBreakerLayer::builder().time_window(Duration::from_secs(60), 6),
        ),
        (
            "circuits per upstream",
            CircuitBreakerLayer::builder().key_by(CircuitKey::Upstream),
        ),
    ];
    for (what, builder) in layers {
        let layer = builder.build().unwrap();
        let mut svc = layer.layer(upstream::<LayerBody<Full<Bytes>>>());
        let n = calls(&mut svc);
        assert_eq!(
            n,
            bare,
            "{what}: {n} allocations; the bare service makes {bare}: the breaker added {}",
            n as isize - bare as isize
        );
        // The success was recorded (at the end of the body), so the path measured is the
        // whole one.
        let metrics = layer.handle().all_metrics();
        assert!(!metrics.is_empty(), "{what}: no circuit");
        assert_eq!(metrics.iter().map(|m| m.calls).sum::<u64>(), 2, "{what}");
    }
}
