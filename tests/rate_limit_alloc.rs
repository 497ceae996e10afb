//! The rate limit layer's admitted path of a known key allocates nothing: a counting global
//! allocator watches a call from `call` to the end of the response body (where a concurrency
//! slot is released), the `x-ratelimit-*` headers written.

mod common_alloc;

use common_alloc::{count, COUNTING};
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use llm_layers::body::LayerBody;
use llm_layers::ext::{KeyIdentity, KeyLimits};
use llm_layers::rate_limit::{BucketKey, Limits, Quota, RateLimitLayer, RateLimitLayerBuilder};
use tower::{Layer, Service, ServiceExt};

type Answer = std::future::Ready<Result<Response<Full<Bytes>>, Infallible>>;

/// An upstream answering `200` with a body still to be read, built outside the count (with a
/// `content-type`, as upstreams send: its header map has room for the layer's headers).
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

/// A request as an authentication layer in front would leave it: the key's identity (and
/// the client's address) in the extensions.
fn request(ident: &KeyIdentity) -> Request<Full<Bytes>> {
    let mut req = Request::post("http://api.example/v1/chat/completions")
        .header("x-client", "client-7")
        .body(Full::new(Bytes::new()))
        .unwrap();
    req.extensions_mut().insert(ident.clone());
    req.extensions_mut().insert(SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7)),
        40000,
    ));
    req
}

/// Calls `svc` `n` times after one warm-up call (which enters the key) and returns the
/// allocations of those calls, each response's headers checked and body read to the end
/// within the count.
fn calls<S, R>(svc: &mut S, ident: &KeyIdentity, n: usize, headers: bool) -> usize
where
    S: Service<Request<Full<Bytes>>, Response = Response<R>>,
    S::Error: std::fmt::Debug,
    R: http_body::Body + Unpin,
    R::Error: std::fmt::Debug,
{
    let once = |svc: &mut S| {
        let req = request(ident);
        let ((), allocs) = count(|| {
            let svc = svc.ready().now_or_never().unwrap().unwrap();
            let res = svc.call(req).now_or_never().unwrap().unwrap();
            assert_eq!(res.status(), 200);
            assert_eq!(
                res.headers().contains_key("x-ratelimit-remaining-requests"),
                headers
            );
            let mut body = res.into_body();
            while let Some(frame) = body.frame().now_or_never().unwrap() {
                frame.unwrap();
            }
        });
        allocs
    };
    once(svc);
    (0..n).map(|_| once(svc)).sum()
}

#[test]
fn the_counter_sees_allocations() {
    let (boxed, n) = count(|| Box::new([0u8; 32]));
    drop(boxed);
    assert_eq!(n, 1);
}

fn quota() -> Quota {
    Quota::per_minute(6_000_000).burst(1_000_000)
}

#[test]
fn the_admitted_path_of_a_known_key_allocates_nothing() {
    // Timers need a runtime to be set; nothing here waits on them.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let ident = KeyIdentity::new("key-7").with_tier("pro");
    let bare = calls(&mut upstream::<Full<Bytes>>(), &ident, 400, false);
    let builder = || RateLimitLayer::builder().limits(Limits::new().requests(quota()));
    let layers: [(&str, RateLimitLayerBuilder, KeyIdentity); 5] = [
        ("an API key", builder(), ident.clone()),
        (
            "a tier with a concurrency cap",
            builder().tier("pro", Limits::new().requests(quota()).concurrency(8)),
            ident.clone(),
        ),
        (
            "a global quota",
            builder()
                .global(Limits::new().requests(quota()).concurrency(64))
                .sweep(1, Duration::from_secs(3600)),
            ident.clone(),
        ),
        (
            "the key's own limits",
            builder().key_limits(true),
            ident.clone().with_limits(
                KeyLimits::new()
                    .requests_per_minute(1_000_000)
                    .concurrency(4),
            ),
        ),
        (
            "a client address",
            builder().key_by(BucketKey::client_ip()),
            ident.clone(),
        ),
    ];
    for (what, builder, ident) in layers {
        let layer = builder.build().unwrap();
        let handle = layer.handle();
        let mut svc = layer.layer(upstream::<LayerBody<Full<Bytes>>>());
        let n = calls(&mut svc, &ident, 400, true);
        assert_eq!(
            n, bare,
            "{what}: {n} allocations in 400 calls; the bare service makes {bare}"
        );
        // The key was entered and counted: the path measured is the admitted one.
        assert!(handle.tracked_keys() >= 1, "{what}: no key tracked");
    }
}

#[test]
fn a_key_read_from_a_header_costs_one_copy() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let ident = KeyIdentity::new("key-7");
    let layer = RateLimitLayer::builder()
        .limits(Limits::new().requests(quota()))
        .key_by(BucketKey::header(http::HeaderName::from_static("x-client")))
        .build()
        .unwrap();
    let mut svc = layer.layer(upstream::<LayerBody<Full<Bytes>>>());
    // The key is copied out of the request's header (its bucket is looked up by the copy);
    // nothing else is allocated.
    assert_eq!(calls(&mut svc, &ident, 400, true), 400);
}
