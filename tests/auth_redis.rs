//! The Redis-backed key store against a real `redis-server` of each test's own, behind
//! `CachedKeyStore`, through a real axum server and a reqwest client: a key written to Redis
//! is accepted, an unknown key refused, a revocation applied, the server down or frozen
//! answered 503 without a hang, a broken record refused with the field named, and no secret
//! anywhere in the store. Without `redis-server` on the machine the tests pass without
//! running and say so on stderr; under `CI=true` they fail instead.

#![cfg(feature = "redis")]

mod common_auth;
mod common_redis;

use std::time::{Duration, Instant};

use axum::routing::post;
use axum::Router;
use common_auth::{chat, echo, rejection, serve, Capture};
use common_redis::RedisServer;
use llm_layers::auth::{
    ApiKeyAuthLayer, CachedKeyStore, KeyHash, KeyRecord, KeyStore, RedisKeyStore,
};
use llm_layers::ext::KeyLimits;
use serde_json::Value;

const SUITE: &str = "tests/auth_redis.rs";
const TEAM: &str = "sk-redis-team-0123456789abcdefgh";
const MINI: &str = "sk-redis-mini-0123456789abcdefgh";
const UNKNOWN: &str = "sk-redis-unknown-0123456789abcde";
/// Generous: a debug build on a busy machine.
const TIMEOUT: Duration = Duration::from_millis(300);

fn redis_store(server: &RedisServer) -> RedisKeyStore {
    RedisKeyStore::builder(server.url())
        .timeout(TIMEOUT)
        .build()
        .unwrap()
}

fn cached(redis: RedisKeyStore) -> CachedKeyStore<RedisKeyStore> {
    CachedKeyStore::builder(redis)
        .positive_ttl(Duration::from_secs(60))
        .negative_ttl(Duration::from_millis(1))
        .build()
        .unwrap()
}

async fn app<K: KeyStore + Clone>(store: K) -> String {
    let app = Router::new()
        .route("/v1/chat/completions", post(echo))
        .layer(ApiKeyAuthLayer::new(store));
    serve(app).await
}

fn team() -> KeyRecord {
    KeyRecord::builder("team")
        .secret(TEAM)
        .tier("pro")
        .limits(KeyLimits::new().requests_per_minute(60))
        .label("owner", "ops")
        .build()
        .unwrap()
}

async fn call(url: &str, key: &str, model: &str) -> reqwest::Response {
    tokio::time::timeout(
        Duration::from_secs(10),
        reqwest::Client::new()
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth(key)
            .body(chat(model))
            .send(),
    )
    .await
    .expect("no request hangs")
    .unwrap()
}

#[tokio::test]
async fn keys_written_to_redis_are_accepted_and_unknown_keys_refused() {
    let Some(server) = RedisServer::start(SUITE) else {
        return;
    };
    let redis = redis_store(&server);
    redis.put(&team()).await.unwrap();
    let url = app(cached(redis)).await;

    let res = call(&url, TEAM, "gpt-4o").await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["id"], "team");
    assert_eq!(body["tier"], "pro");
    assert_eq!(body["rpm"], 60);
    assert_eq!(body["labels"]["owner"], "ops");

    let (_, challenge) =
        rejection(call(&url, UNKNOWN, "gpt-4o").await, 401, "invalid_api_key").await;
    assert_eq!(
        challenge.as_deref(),
        Some(r#"Bearer error="invalid_token""#)
    );
}

#[tokio::test]
async fn a_record_written_with_redis_cli_commands_is_read() {
    let Some(server) = RedisServer::start(SUITE) else {
        return;
    };
    // The command of the README: `HSET llm-layers:key:<sha256 hex> id ... models ...`.
    let digest = KeyHash::of(MINI.as_bytes()).to_hex();
    let mut conn = server.conn().await;
    let () = redis::cmd("HSET")
        .arg(format!("llm-layers:key:{digest}"))
        .arg(&[
            "id",
            "interns",
            "tier",
            "free",
            "models",
            "gpt-4o-mini*",
            "rpm",
            "10",
        ])
        .query_async(&mut conn)
        .await
        .map(|_: i64| ())
        .unwrap();
    let url = app(cached(redis_store(&server))).await;

    let res = call(&url, MINI, "gpt-4o-mini").await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(
        (&body["id"], &body["tier"], &body["rpm"]),
        (&"interns".into(), &"free".into(), &10.into())
    );
    rejection(call(&url, MINI, "gpt-4o").await, 403, "permission_denied").await;
}

#[tokio::test]
async fn a_key_revoked_in_redis_is_refused_once_the_cache_lets_go() {
    let Some(server) = RedisServer::start(SUITE) else {
        return;
    };
    let redis = redis_store(&server);
    redis.put(&team()).await.unwrap();
    let store = cached(redis.clone());
    let url = app(store.clone()).await;
    assert_eq!(call(&url, TEAM, "gpt-4o").await.status(), 200);

    let hash = KeyHash::of(TEAM.as_bytes());
    assert!(redis.revoke(&hash).await.unwrap());
    assert!(!redis
        .revoke(&KeyHash::of(UNKNOWN.as_bytes()))
        .await
        .unwrap());
    // Within the positive TTL this replica still holds the record it read...
    assert_eq!(call(&url, TEAM, "gpt-4o").await.status(), 200);
    // ...until the entry goes (its TTL, or an invalidation).
    store.invalidate(&hash);
    rejection(call(&url, TEAM, "gpt-4o").await, 401, "revoked_api_key").await;

    // Removed: unknown.
    assert!(redis.remove(&hash).await.unwrap());
    store.invalidate(&hash);
    rejection(call(&url, TEAM, "gpt-4o").await, 401, "invalid_api_key").await;
}

#[tokio::test]
async fn a_revocation_reaches_a_replica_within_the_positive_ttl() {
    let Some(server) = RedisServer::start(SUITE) else {
        return;
    };
    let redis = redis_store(&server);
    redis.put(&team()).await.unwrap();
    let ttl = Duration::from_millis(300);
    let store = CachedKeyStore::builder(redis.clone())
        .positive_ttl(ttl)
        .negative_ttl(Duration::from_millis(100))
        .build()
        .unwrap();
    let url = app(store).await;
    assert_eq!(call(&url, TEAM, "gpt-4o").await.status(), 200);
    let revoked_at = Instant::now();
    redis.revoke(&KeyHash::of(TEAM.as_bytes())).await.unwrap();
    // The record read before the revocation is kept at most `ttl`: by then it is refused.
    let status = loop {
        let status = call(&url, TEAM, "gpt-4o").await.status().as_u16();
        if status != 200 || revoked_at.elapsed() > ttl * 10 {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        status,
        401,
        "still accepted {:?} after the revocation",
        revoked_at.elapsed()
    );
}

#[tokio::test]
async fn redis_down_or_frozen_is_a_503_envelope_not_a_hang() {
    let Some(mut server) = RedisServer::start(SUITE) else {
        return;
    };
    let redis = redis_store(&server);
    redis.put(&team()).await.unwrap();
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(capture.clone())
        .with_max_level(tracing::Level::WARN)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    // No cache: every request asks Redis.
    let store = redis;
    let url = app(store).await;
    assert_eq!(call(&url, TEAM, "gpt-4o").await.status(), 200);

    // Frozen: the call times out.
    server.freeze();
    let started = Instant::now();
    let res = call(&url, TEAM, "gpt-4o").await;
    let waited = started.elapsed();
    server.thaw();
    assert_eq!(res.headers()["x-should-retry"], "true");
    let body: Value = {
        assert_eq!(res.status(), 503);
        res.json().await.unwrap()
    };
    assert_eq!(body["error"]["code"], "service_unavailable", "{body}");
    assert!(waited < Duration::from_secs(5), "waited {waited:?}");

    // Stopped: refused connections.
    server.stop();
    let res = call(&url, TEAM, "gpt-4o").await;
    assert_eq!(res.status(), 503);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "service_unavailable", "{body}");

    // Back (empty): the key is unknown, then written again and accepted.
    server.restart();
    let redis = redis_store(&server);
    let status = loop {
        let status = call(&url, TEAM, "gpt-4o").await.status().as_u16();
        if status != 503 || started.elapsed() > Duration::from_secs(10) {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status, 401);
    redis.put(&team()).await.unwrap();
    assert_eq!(call(&url, TEAM, "gpt-4o").await.status(), 200);

    let logs = capture.text();
    assert!(logs.contains("key store lookup failed"), "{logs}");
    assert!(
        !logs.contains(&server.url()) && !logs.contains("127.0.0.1"),
        "{logs}"
    );
    assert!(!logs.contains(TEAM), "{logs}");
}

#[tokio::test]
async fn a_broken_record_is_a_503_and_the_warning_names_the_field() {
    let Some(server) = RedisServer::start(SUITE) else {
        return;
    };
    let digest = KeyHash::of(TEAM.as_bytes()).to_hex();
    let mut conn = server.conn().await;
    let _: i64 = redis::cmd("HSET")
        .arg(format!("llm-layers:key:{digest}"))
        .arg(&["id", "team", "rmp", "60"])
        .query_async(&mut conn)
        .await
        .unwrap();
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(capture.clone())
        .with_max_level(tracing::Level::WARN)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let url = app(cached(redis_store(&server))).await;
    let res = call(&url, TEAM, "gpt-4o").await;
    assert_eq!(res.status(), 503);
    let logs = capture.text();
    assert!(logs.contains("rmp"), "{logs}");
    assert!(!logs.contains(TEAM), "{logs}");
}

#[tokio::test]
async fn the_store_holds_digests_never_secrets() {
    let Some(server) = RedisServer::start(SUITE) else {
        return;
    };
    let redis = redis_store(&server);
    redis.put(&team()).await.unwrap();
    redis
        .put(
            &KeyRecord::builder("interns")
                .secret(MINI)
                .allow_model("gpt-4o-mini*")
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    let url = app(cached(redis.clone())).await;
    assert_eq!(call(&url, TEAM, "gpt-4o").await.status(), 200);
    assert_eq!(call(&url, UNKNOWN, "gpt-4o").await.status(), 401);

    let mut conn = server.conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut expected = vec![
        redis.redis_key(&KeyHash::of(TEAM.as_bytes())),
        redis.redis_key(&KeyHash::of(MINI.as_bytes())),
    ];
    let mut sorted = keys.clone();
    sorted.sort();
    expected.sort();
    assert_eq!(sorted, expected, "one hash per key, named by its digest");
    for key in &keys {
        let fields: Vec<String> = redis::cmd("HGETALL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(!fields.is_empty());
        for text in fields.iter().chain([key]) {
            for secret in [TEAM, MINI, UNKNOWN] {
                assert!(!text.contains(secret), "{key}: {text}");
                // Nor a recognisable part of one.
                assert!(!text.contains(&secret[8..24]), "{key}: {text}");
            }
        }
    }
    assert!(!format!("{redis:?}").contains(&server.url()));
}
