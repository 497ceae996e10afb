//! The caching key store: positive and negative TTLs, single flight, the bound, failures not
//! cached. In-process services under `tokio::time::pause`, so every wait is exact.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{to_bytes, Body};
use http::{Request, Response};
use llm_layers::auth::{
    ApiKeyAuthLayer, CachedKeyStore, KeyHash, KeyRecord, KeyStore, KeyStoreError, LookupResult,
};
use llm_layers::body::LayerBody;
use llm_layers::ext::KeyIdentity;
use tower::{Service, ServiceBuilder, ServiceExt};

const KNOWN: &str = "sk-cache-known-0123456789abcdef";
const NEW: &str = "sk-cache-new-0123456789abcdefgh";
const UNKNOWN: &str = "sk-cache-unknown-0123456789abcd";
const LATENCY: Duration = Duration::from_millis(50);

/// A slow shared store (a database, say) that counts its lookups.
#[derive(Clone, Debug, Default)]
struct Db {
    keys: Arc<Mutex<HashMap<KeyHash, Arc<KeyRecord>>>>,
    calls: Arc<AtomicUsize>,
    down: Arc<AtomicBool>,
}

impl Db {
    fn with(secrets: &[(&str, &str)]) -> Db {
        let db = Db::default();
        for (id, secret) in secrets {
            db.add(id, secret);
        }
        db
    }
    fn add(&self, id: &str, secret: &str) {
        let record = KeyRecord::builder(id).secret(secret).build().unwrap();
        self.keys
            .lock()
            .unwrap()
            .insert(KeyHash::of(secret.as_bytes()), Arc::new(record));
    }
    fn remove(&self, secret: &str) {
        self.keys
            .lock()
            .unwrap()
            .remove(&KeyHash::of(secret.as_bytes()));
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl KeyStore for Db {
    type Future = Pin<Box<dyn Future<Output = LookupResult> + Send>>;

    fn lookup(&self, hash: &KeyHash) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let (keys, down, hash) = (Arc::clone(&self.keys), Arc::clone(&self.down), *hash);
        Box::pin(async move {
            tokio::time::sleep(LATENCY).await;
            if down.load(Ordering::SeqCst) {
                return Err(KeyStoreError::new("connection refused"));
            }
            Ok(keys.lock().unwrap().get(&hash).cloned())
        })
    }
}

type Svc = tower::util::BoxCloneSyncService<Request<Body>, Response<LayerBody<Body>>, Infallible>;

fn app(store: CachedKeyStore<Db>) -> Svc {
    let svc = ServiceBuilder::new()
        .layer(ApiKeyAuthLayer::new(store))
        .service_fn(|req: Request<LayerBody<Body>>| async move {
            let id = req
                .extensions()
                .get::<KeyIdentity>()
                .unwrap()
                .id()
                .to_owned();
            Ok::<_, Infallible>(Response::new(Body::from(id)))
        });
    tower::util::BoxCloneSyncService::new(svc)
}

async fn call(svc: &Svc, key: &str) -> (u16, String) {
    let req = Request::post("/v1/chat/completions")
        .header("authorization", format!("Bearer {key}"))
        .body(Body::from(r#"{"model":"gpt-4o","messages":[]}"#))
        .unwrap();
    let res = svc.clone().oneshot(req).await.unwrap();
    let status = res.status().as_u16();
    let body = to_bytes(Body::new(res.into_body()), usize::MAX)
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn code(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["error"]["code"].as_str().unwrap().to_owned()
}

#[tokio::test(start_paused = true)]
async fn a_thousand_concurrent_requests_with_one_unknown_key_make_one_lookup() {
    let db = Db::with(&[("known", KNOWN)]);
    let svc = app(CachedKeyStore::new(db.clone()));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let svc = svc.clone();
        set.spawn(async move { call(&svc, UNKNOWN).await });
    }
    let mut n = 0;
    while let Some(answer) = set.join_next().await {
        let (status, body) = answer.unwrap();
        assert_eq!((status, code(&body).as_str()), (401, "invalid_api_key"));
        n += 1;
    }
    assert_eq!(n, 1000);
    assert_eq!(db.calls(), 1, "one lookup for all of them");

    // The same for a known key: one lookup, then answered from the cache.
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let svc = svc.clone();
        set.spawn(async move { call(&svc, KNOWN).await });
    }
    while let Some(answer) = set.join_next().await {
        assert_eq!(answer.unwrap(), (200, "known".to_owned()));
    }
    assert_eq!(db.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_new_key_works_once_the_negative_ttl_passed() {
    let db = Db::default();
    let store = CachedKeyStore::builder(db.clone())
        .negative_ttl(Duration::from_millis(500))
        .build()
        .unwrap();
    let svc = app(store);
    assert_eq!(call(&svc, NEW).await.0, 401);
    assert_eq!(db.calls(), 1);
    // Issued now: refused from the cache until the negative TTL, counted from the answer,
    // passed...
    db.add("new", NEW);
    tokio::time::advance(Duration::from_millis(499)).await;
    assert_eq!(call(&svc, NEW).await.0, 401);
    assert_eq!(db.calls(), 1, "answered from the negative cache");
    // ... then accepted.
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(call(&svc, NEW).await, (200, "new".to_owned()));
    assert_eq!(db.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_revocation_takes_effect_within_the_positive_ttl_or_at_once_when_invalidated() {
    let db = Db::with(&[("known", KNOWN), ("new", NEW)]);
    let store = CachedKeyStore::builder(db.clone())
        .positive_ttl(Duration::from_secs(10))
        .build()
        .unwrap();
    let svc = app(store.clone());
    assert_eq!(call(&svc, KNOWN).await.0, 200);
    db.remove(KNOWN);
    tokio::time::advance(Duration::from_millis(9_900)).await;
    assert_eq!(call(&svc, KNOWN).await.0, 200, "still cached");
    assert_eq!(db.calls(), 1);
    tokio::time::advance(Duration::from_millis(101)).await;
    let (status, body) = call(&svc, KNOWN).await;
    assert_eq!((status, code(&body).as_str()), (401, "invalid_api_key"));
    assert_eq!(db.calls(), 2);

    // `invalidate` does not wait for the TTL.
    assert_eq!(call(&svc, NEW).await.0, 200);
    db.remove(NEW);
    store.invalidate(&KeyHash::of(NEW.as_bytes()));
    assert_eq!(call(&svc, NEW).await.0, 401);
    assert_eq!(db.calls(), 4);
}

#[tokio::test(start_paused = true)]
async fn failures_are_shared_by_waiters_but_not_cached() {
    let db = Db::with(&[("known", KNOWN)]);
    db.down.store(true, Ordering::SeqCst);
    let svc = app(CachedKeyStore::new(db.clone()));
    let (a, b) = tokio::join!(call(&svc, KNOWN), call(&svc, KNOWN));
    for (status, body) in [a, b] {
        assert_eq!((status, code(&body).as_str()), (503, "service_unavailable"));
        assert!(!body.contains("connection refused"), "{body}");
    }
    assert_eq!(db.calls(), 1);
    db.down.store(false, Ordering::SeqCst);
    assert_eq!(call(&svc, KNOWN).await, (200, "known".to_owned()));
    assert_eq!(db.calls(), 2, "the failure was not kept");
}

#[tokio::test(start_paused = true)]
async fn the_cache_is_bounded() {
    let db = Db::default();
    let store = CachedKeyStore::builder(db.clone())
        .max_entries(3)
        .build()
        .unwrap();
    let svc = app(store.clone());
    for i in 0..50 {
        assert_eq!(
            call(&svc, &format!("sk-random-{i:04}-0123456789abcdef"))
                .await
                .0,
            401
        );
        assert!(store.len() <= 3, "{}", store.len());
    }
    assert_eq!(store.len(), 3);
    assert_eq!(db.calls(), 50);
    store.clear();
    assert!(store.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_waiter_that_gives_up_does_not_cancel_the_lookup_for_the_others() {
    let db = Db::with(&[("known", KNOWN)]);
    let svc = app(CachedKeyStore::new(db.clone()));
    let mut first = svc.clone();
    let req = Request::post("/")
        .header("authorization", format!("Bearer {KNOWN}"))
        .body(Body::empty())
        .unwrap();
    std::future::poll_fn(|cx| first.poll_ready(cx))
        .await
        .unwrap();
    let gave_up = first.call(req);
    let second = tokio::spawn({
        let svc = svc.clone();
        async move { call(&svc, KNOWN).await }
    });
    tokio::task::yield_now().await;
    drop(gave_up);
    assert_eq!(second.await.unwrap(), (200, "known".to_owned()));
    assert_eq!(db.calls(), 1);
}

#[test]
fn settings_are_checked() {
    let e = CachedKeyStore::builder(Db::default())
        .max_entries(0)
        .build()
        .unwrap_err();
    assert_eq!(e.field(), "max_entries");
    let e = CachedKeyStore::builder(Db::default())
        .positive_ttl(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(e.field(), "positive_ttl");
    let e = CachedKeyStore::builder(Db::default())
        .positive_ttl(Duration::from_secs(u64::MAX))
        .build()
        .unwrap_err();
    assert_eq!(e.field(), "positive_ttl");
    let e = CachedKeyStore::builder(Db::default())
        .positive_ttl(Duration::from_secs(1))
        .negative_ttl(Duration::from_secs(2))
        .build()
        .unwrap_err();
    assert_eq!(e.field(), "negative_ttl");
    assert!(CachedKeyStore::builder(Db::default())
        .negative_ttl(Duration::ZERO)
        .build()
        .is_ok());
}
