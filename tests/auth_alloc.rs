//! What the auth layer allocates per request, watched by a counting allocator.
//!
//! On the success path of a key that may use any model the layer reads the credential, hashes
//! it on the stack, looks the digest up and hands the body on untouched: none of that
//! allocates. What it hands on through `http::Extensions` (the [`KeyIdentity`] and the
//! [`AuthenticatedKey`]) costs what `http::Extensions` costs for two values in an empty map (the
//! map, its table, one box per value); the tests measure that cost as a control and allow
//! exactly it, no more.

mod common_alloc;

use common_alloc::{count, COUNTING};
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Extensions, Request, Response};
use http_body_util::Full;
use llm_layers::auth::{
    ApiKeyAuthLayer, AuthenticatedKey, CachedKeyStore, CredentialForwarding, InMemoryKeyStore,
    KeyRecord, KeyStore,
};
use llm_layers::body::LayerBody;
use llm_layers::ext::{KeyIdentity, KeyLimits};
use llm_layers::request::{CharEstimator, EnsureView, RequestView};
use tower::{Layer, Service, ServiceExt};

const FREE: &str = "sk-alloc-free-0123456789abcdefghijklmnop";
const MINI: &str = "sk-alloc-mini-0123456789abcdefghijklmnop";
const BODY: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hi"}]}"#;

fn store() -> InMemoryKeyStore {
    let mut records = vec![
        KeyRecord::builder("free")
            .secret(FREE)
            .tier("pro")
            .limits(KeyLimits::new().requests_per_minute(60))
            .build()
            .unwrap(),
        KeyRecord::builder("mini")
            .secret(MINI)
            .allow_model("gpt-4o-mini*")
            .build()
            .unwrap(),
    ];
    records.extend((0..1000).map(|i| {
        KeyRecord::builder(format!("filler-{i}"))
            .secret(format!("sk-filler-{i:06}-0123456789abcdefghij"))
            .build()
            .unwrap()
    }));
    InMemoryKeyStore::new(records).unwrap()
}

fn request(header: &str, value: &str) -> Request<Full<Bytes>> {
    Request::post("/v1/chat/completions")
        .header(header, value)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(BODY.as_bytes())))
        .unwrap()
}

/// What the inner service saw of the request.
#[derive(Debug, PartialEq)]
struct Seen {
    id: Option<String>,
    record: bool,
    credential_headers: usize,
}

fn seen<B>(req: &Request<B>) -> Seen {
    Seen {
        id: req
            .extensions()
            .get::<KeyIdentity>()
            .map(|i| i.id().to_owned()),
        record: req.extensions().get::<AuthenticatedKey>().is_some(),
        credential_headers: ["authorization", "x-api-key", "api-key"]
            .iter()
            .filter(|h| req.headers().contains_key(**h))
            .count(),
    }
}

/// What the inner service saw of the last request.
type Slot = Arc<std::sync::Mutex<Option<Seen>>>;
/// The inner service's answer, ready at once.
type Answer = std::future::Ready<Result<Response<Full<Bytes>>, Infallible>>;

/// An upstream that allocates nothing: it notes what it saw in `seen` (checked after the
/// count) and answers a static body.
fn upstream<B>(
    seen_slot: Slot,
) -> impl Service<Request<B>, Response = Response<Full<Bytes>>, Error = Infallible, Future = Answer>
       + Clone {
    tower::service_fn(move |req: Request<B>| {
        // What the upstream notes is the test's, not the layer's: not counted.
        let counting = COUNTING.with(|c| c.replace(false));
        *seen_slot.lock().unwrap() = Some(seen(&req));
        COUNTING.with(|c| c.set(counting));
        drop(req);
        std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(b"{}")))))
    })
}

/// Calls `svc` with `req` twice (the first warms lazy statics and thread locals up) and
/// returns the allocations of the second call, with the status.
fn call_counted<S, B>(svc: &mut S, req: impl Fn() -> Request<B>) -> (u16, usize)
where
    S: Service<Request<B>>,
    S::Response: StatusOf,
    S::Error: std::fmt::Debug,
{
    let mut once = || {
        let req = req();
        let (res, n) = count(|| {
            let svc = svc.ready().now_or_never().unwrap().unwrap();
            svc.call(req).now_or_never().unwrap().unwrap()
        });
        (res.status_of(), n)
    };
    once();
    once()
}

trait StatusOf {
    fn status_of(&self) -> u16;
}

impl<B> StatusOf for Response<B> {
    fn status_of(&self) -> u16 {
        self.status().as_u16()
    }
}

/// The control: what `http::Extensions` allocates for the two values the layer hands on, put
/// into an empty map (values of the same sizes as `KeyIdentity` and `AuthenticatedKey`).
fn extension_cost() -> usize {
    let identity = KeyIdentity::new("free").with_tier("pro");
    let record = Arc::new(KeyRecord::builder("x").secret("y").build().unwrap());
    let mut ext = Extensions::new();
    let ((), n) = count(|| {
        ext.insert(identity.clone());
        ext.insert(Arc::clone(&record));
    });
    assert_eq!(ext.len(), 2);
    n
}

fn bare_allocations() -> usize {
    let slot = Arc::default();
    let mut bare = upstream::<Full<Bytes>>(Arc::clone(&slot));
    let (status, n) = call_counted(&mut bare, || request("authorization", "Bearer x"));
    assert_eq!(status, 200);
    n
}

#[test]
fn the_counter_sees_allocations() {
    let (boxed, n) = count(|| Box::new([0u8; 32]));
    drop(boxed);
    assert_eq!(n, 1);
    // The control is not zero, so allowing it is not allowing anything.
    assert!(extension_cost() >= 2, "{}", extension_cost());
}

fn assert_success_path_allocates_only_the_extensions<K: KeyStore + Clone>(
    store: K,
    forwarding: CredentialForwarding,
    header: &str,
    value: &str,
    credential_headers_left: usize,
) {
    let bare = bare_allocations();
    let allowed = extension_cost();
    let slot = Arc::default();
    let mut authed = ApiKeyAuthLayer::builder(store)
        .forwarding(forwarding)
        .build()
        .unwrap()
        .layer(upstream::<LayerBody<Full<Bytes>>>(Arc::clone(&slot)));
    let (status, n) = call_counted(&mut authed, || request(header, value));
    assert_eq!(status, 200);
    assert_eq!(
        slot.lock().unwrap().take(),
        Some(Seen {
            id: Some("free".to_owned()),
            record: true,
            credential_headers: credential_headers_left,
        })
    );
    assert_eq!(
        n,
        bare + allowed,
        "{header}: the layer made {n} allocations; the bare service makes {bare} and the two \
         extension values cost {allowed}, so auth added {} of its own",
        n as isize - (bare + allowed) as isize
    );
}

#[test]
fn a_bearer_key_allocates_nothing_but_the_extension_values() {
    let bearer = format!("Bearer {FREE}");
    assert_success_path_allocates_only_the_extensions(
        store(),
        CredentialForwarding::Strip,
        "authorization",
        &bearer,
        0,
    );
}

#[test]
fn kept_and_other_headers_allocate_nothing_more() {
    let bearer = format!("Bearer {FREE}");
    assert_success_path_allocates_only_the_extensions(
        store(),
        CredentialForwarding::Keep,
        "authorization",
        &bearer,
        1,
    );
    for header in ["x-api-key", "api-key"] {
        assert_success_path_allocates_only_the_extensions(
            store(),
            CredentialForwarding::Strip,
            header,
            FREE,
            0,
        );
    }
}

#[test]
fn a_cache_hit_allocates_nothing_but_the_extension_values() {
    let cached = CachedKeyStore::new(store());
    // Fill the cache outside the count: the first lookup goes through the store.
    let mut warm = ApiKeyAuthLayer::new(cached.clone())
        .layer(upstream::<LayerBody<Full<Bytes>>>(Arc::default()));
    let res = warm
        .call(request("x-api-key", FREE))
        .now_or_never()
        .unwrap()
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(cached.len(), 1);
    assert_success_path_allocates_only_the_extensions(
        cached,
        CredentialForwarding::Strip,
        "x-api-key",
        FREE,
        0,
    );
}

#[test]
fn an_allow_listed_key_allocates_what_reading_the_model_costs() {
    // The control: the core's `EnsureView` buffering and parsing this request on its own.
    let (req, view_cost) = {
        let req = request("authorization", "Bearer x");
        let warm = EnsureView::new(
            request("authorization", "x"),
            1 << 20,
            Arc::new(CharEstimator),
        );
        drop(warm.now_or_never().unwrap().unwrap());
        let estimator: Arc<dyn llm_layers::request::TokenEstimator> = Arc::new(CharEstimator);
        let (req, n) = count(move || {
            EnsureView::new(req, 1 << 20, estimator)
                .now_or_never()
                .unwrap()
                .unwrap()
        });
        (req, n)
    };
    assert_eq!(
        RequestView::from_extensions(req.extensions()).and_then(RequestView::model),
        Some("gpt-4o-mini")
    );
    // The view already made the map and its table: the two values cost one box each.
    let mut ext = req.into_parts().0.extensions;
    let identity = KeyIdentity::new("mini");
    let record = Arc::new(KeyRecord::builder("x").secret("y").build().unwrap());
    let ((), values_cost) = count(|| {
        ext.insert(identity.clone());
        ext.insert(Arc::clone(&record));
    });

    let bare = bare_allocations();
    let slot = Arc::default();
    let mut authed =
        ApiKeyAuthLayer::new(store()).layer(upstream::<LayerBody<Full<Bytes>>>(Arc::clone(&slot)));
    let bearer = format!("Bearer {MINI}");
    let (status, n) = call_counted(&mut authed, || request("authorization", &bearer));
    assert_eq!(status, 200);
    assert_eq!(
        slot.lock().unwrap().take().unwrap().id.as_deref(),
        Some("mini")
    );
    println!(
        "an allow-listed request: {n} allocations ({} over the bare service): reading the \
         model {view_cost}, the two extension values {values_cost}",
        n - bare
    );
    assert_eq!(
        n,
        bare + view_cost + values_cost,
        "auth added {} allocations of its own to reading the model",
        n as isize - (bare + view_cost + values_cost) as isize
    );
}
