//! Black-box tests of `llm_layers::auth` over real HTTP.

mod common_auth;

use std::collections::HashSet;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use bytes::Bytes;
use common_auth::*;
use http::{HeaderMap, HeaderValue, Request, Response};
use llm_layers::auth::{
    extract_api_key, AcceptedHeaders, ApiKey, ApiKeyAuthLayer, CredentialForwarding,
    InMemoryKeyStore, InjectApiKeyLayer, KeyHash, KeyHeader, KeyRecord, KeyStore, KeyStoreError,
    LookupResult,
};
use llm_layers::body::LayerBody;
use llm_layers::request::{CharEstimator, Endpoint, RequestView};
use proptest::prelude::*;
use serde_json::Value;
use tower::{service_fn, Layer, ServiceBuilder, ServiceExt};

fn app(layer: ApiKeyAuthLayer<InMemoryKeyStore>) -> Router {
    Router::new().fallback(echo).layer(layer)
}

async fn default_server() -> String {
    serve(app(ApiKeyAuthLayer::new(store()))).await
}

fn post(base: &str, path: &str) -> reqwest::RequestBuilder {
    reqwest::Client::new().post(format!("{base}{path}"))
}

#[tokio::test]
async fn missing_key_is_401_invalid_api_key_with_bare_bearer_challenge() {
    let base = default_server().await;
    let res = post(&base, "/v1/chat/completions")
        .body(chat("gpt-4o"))
        .send()
        .await
        .unwrap();
    let (msg, challenge) = rejection(res, 401, "invalid_api_key").await;
    assert_eq!(challenge.as_deref(), Some("Bearer"));
    assert!(msg.contains("didn't provide an API key"), "{msg}");
    assert!(msg.contains("Authorization: Bearer <key>"), "{msg}");
}

#[tokio::test]
async fn malformed_headers_are_refused_with_distinct_messages() {
    let base = default_server().await;
    type Case = (&'static str, Vec<(&'static str, HeaderValue)>, &'static str);
    let bad: Vec<Case> = vec![
        (
            "empty bearer token",
            vec![("authorization", HeaderValue::from_static("Bearer "))],
            "is empty",
        ),
        (
            "basic scheme",
            vec![(
                "authorization",
                HeaderValue::from_static("Basic dXNlcjpwYXNz"),
            )],
            "scheme `Basic` is not supported",
        ),
        (
            "bare key without scheme",
            vec![("authorization", HeaderValue::from_static(ACTIVE))],
            "has no scheme",
        ),
        (
            "non-ascii bytes",
            vec![(
                "authorization",
                HeaderValue::from_bytes(b"Bearer sk-caf\xe9-0123456789").unwrap(),
            )],
            "not allowed",
        ),
        (
            "two authorization headers",
            vec![
                (
                    "authorization",
                    HeaderValue::from_str(&format!("Bearer {ACTIVE}")).unwrap(),
                ),
                (
                    "authorization",
                    HeaderValue::from_str(&format!("Bearer {MINI}")).unwrap(),
                ),
            ],
            "2 `Authorization` headers",
        ),
        (
            "bearer and x-api-key disagree",
            vec![
                (
                    "authorization",
                    HeaderValue::from_str(&format!("Bearer {ACTIVE}")).unwrap(),
                ),
                ("x-api-key", HeaderValue::from_static(MINI)),
            ],
            "carry different API keys",
        ),
    ];
    let mut messages = HashSet::new();
    for (what, headers, expect) in bad {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(k, v);
        }
        let res = post(&base, "/v1/chat/completions")
            .headers(map)
            .body(chat("gpt-4o"))
            .send()
            .await
            .unwrap();
        let (msg, challenge) = rejection(res, 401, "invalid_api_key").await;
        assert!(msg.contains(expect), "{what}: {msg}");
        assert_eq!(
            challenge.as_deref(),
            Some(r#"Bearer error="invalid_request""#),
            "{what}"
        );
        assert!(
            !msg.contains(ACTIVE) && !msg.contains(MINI),
            "{what}: {msg}"
        );
        messages.insert(msg);
    }
    assert_eq!(messages.len(), 6, "each malformation has its own message");

    // The same key in two headers is not a conflict.
    let res = post(&base, "/v1/embeddings")
        .bearer_auth(ACTIVE)
        .header("api-key", ACTIVE)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn unknown_key_is_401_invalid_token_with_masked_key() {
    let base = default_server().await;
    let res = post(&base, "/v1/chat/completions")
        .bearer_auth(UNKNOWN)
        .body(chat("gpt-4o"))
        .send()
        .await
        .unwrap();
    let (msg, challenge) = rejection(res, 401, "invalid_api_key").await;
    assert_eq!(
        challenge.as_deref(),
        Some(r#"Bearer error="invalid_token""#)
    );
    assert_eq!(msg, "Incorrect API key provided: sk-...QRST.");

    // A short key is masked whole.
    let res = post(&base, "/v1/chat/completions")
        .header("x-api-key", "sk-short-guess")
        .send()
        .await
        .unwrap();
    let (msg, _) = rejection(res, 401, "invalid_api_key").await;
    assert_eq!(msg, "Incorrect API key provided: ***.");
}

#[tokio::test]
async fn expired_key_is_401_expired_api_key_saying_when() {
    let clock = TestClock::at(EXPIRY_SECS - 1);
    let layer = ApiKeyAuthLayer::builder(store())
        .clock(clock.now_fn())
        .build()
        .unwrap();
    let base = serve(app(layer)).await;
    let call = || {
        post(&base, "/v1/chat/completions")
            .bearer_auth(EXPIRING)
            .body(chat("gpt-4o"))
            .send()
    };

    let res = call().await.unwrap();
    assert_eq!(res.status(), 200, "valid until the last second");

    clock.set(EXPIRY_SECS);
    let (msg, challenge) = rejection(call().await.unwrap(), 401, "expired_api_key").await;
    assert_eq!(
        challenge.as_deref(),
        Some(r#"Bearer error="invalid_token""#)
    );
    assert!(msg.contains("expired at 2026-01-01T00:00:00Z"), "{msg}");
    assert!(msg.contains("a new key is needed"), "{msg}");
    assert!(
        msg.contains("sk-...ghij") && !msg.contains(EXPIRING),
        "{msg}"
    );
}

#[tokio::test]
async fn revoked_key_is_401_revoked_api_key() {
    let base = default_server().await;
    let res = post(&base, "/v1/chat/completions")
        .bearer_auth(REVOKED)
        .body(chat("gpt-4o"))
        .send()
        .await
        .unwrap();
    let (msg, challenge) = rejection(res, 401, "revoked_api_key").await;
    assert_eq!(
        challenge.as_deref(),
        Some(r#"Bearer error="invalid_token""#)
    );
    assert!(msg.contains("revoked"), "{msg}");
    assert!(!msg.contains(REVOKED));
}

#[tokio::test]
async fn restricted_key_may_use_gpt_4o_mini_but_not_gpt_4o() {
    let base = default_server().await;
    for model in ["gpt-4o-mini", "gpt-4o-mini-2024-07-18"] {
        let body = chat(model);
        let res = post(&base, "/v1/chat/completions")
            .bearer_auth(MINI)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{model}");
        let seen: Value = res.json().await.unwrap();
        assert_eq!(seen["id"], "mini");
        assert_eq!(seen["body"], body, "the buffered body is handed on intact");
    }

    let res = post(&base, "/v1/chat/completions")
        .bearer_auth(MINI)
        .body(chat("gpt-4o"))
        .send()
        .await
        .unwrap();
    let (msg, challenge) = rejection(res, 403, "permission_denied").await;
    assert_eq!(
        challenge.as_deref(),
        Some(r#"Bearer error="insufficient_scope""#)
    );
    assert_eq!(
        msg,
        "This API key may not use the model `gpt-4o`. It may use: gpt-4o-mini*, \
         text-embedding-3-small."
    );
}

#[tokio::test]
async fn restricted_key_cannot_bypass_the_model_check() {
    let base = default_server().await;
    // No body at all.
    let res = reqwest::Client::new()
        .get(format!("{base}/v1/models"))
        .bearer_auth(MINI)
        .send()
        .await
        .unwrap();
    let (msg, _) = rejection(res, 403, "permission_denied").await;
    assert!(msg.contains("names no model"), "{msg}");
    // A JSON body without a model, and one whose model is not a string.
    for body in [r#"{"messages":[]}"#, r#"{"model":["gpt-4o-mini"]}"#] {
        let res = post(&base, "/v1/chat/completions")
            .bearer_auth(MINI)
            .body(body)
            .send()
            .await
            .unwrap();
        let (msg, _) = rejection(res, 403, "permission_denied").await;
        assert!(msg.contains("names no model"), "{body}: {msg}");
    }
    // Not JSON.
    let res = post(&base, "/v1/chat/completions")
        .bearer_auth(MINI)
        .body("model=gpt-4o-mini")
        .send()
        .await
        .unwrap();
    let (msg, _) = rejection(res, 400, "invalid_value").await;
    assert!(msg.contains("not valid JSON"), "{msg}");
}

#[tokio::test]
async fn body_limit_applies_only_to_restricted_keys() {
    let layer = ApiKeyAuthLayer::builder(store())
        .body_limit(1024)
        .build()
        .unwrap();
    let base = serve(app(layer)).await;
    let big = format!(
        r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(4096)
    );
    let res = post(&base, "/v1/chat/completions")
        .bearer_auth(MINI)
        .body(big.clone())
        .send()
        .await
        .unwrap();
    let (msg, _) = rejection(res, 413, "request_too_large").await;
    assert!(msg.contains("1024 bytes"), "{msg}");

    // An unrestricted key's body is never read by the layer: it streams through, whatever size.
    let chunks: Vec<Result<Bytes, Infallible>> =
        (0..8).map(|_| Ok(Bytes::from(vec![b'y'; 1024]))).collect();
    let res = post(&base, "/v1/chat/completions")
        .bearer_auth(ACTIVE)
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let seen: Value = res.json().await.unwrap();
    assert_eq!(seen["body_len"], 8 * 1024);
}

#[tokio::test]
async fn rotation_keeps_old_and_new_secret_valid_at_once() {
    let base = default_server().await;
    for key in [ROTATE_OLD, ROTATE_NEW, ROTATE_OLD] {
        let res = post(&base, "/v1/chat/completions")
            .bearer_auth(key)
            .body(chat("gpt-4o"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let seen: Value = res.json().await.unwrap();
        assert_eq!(seen["id"], "rotating");
    }
}

#[tokio::test]
async fn bearer_scheme_is_case_insensitive() {
    let base = default_server().await;
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let res = post(&base, "/v1/chat/completions")
            .header("authorization", format!("{scheme} {ACTIVE}"))
            .body(chat("gpt-4o"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{scheme}");
    }
}

#[tokio::test]
async fn anthropic_and_azure_headers_are_accepted_as_configured() {
    let base = default_server().await;
    for header in ["x-api-key", "api-key"] {
        let res = post(&base, "/v1/messages")
            .header(header, ACTIVE)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{header}");
    }

    let bearer_only = ApiKeyAuthLayer::builder(store())
        .accepted_headers(AcceptedHeaders::none().bearer(true))
        .build()
        .unwrap();
    let base = serve(app(bearer_only)).await;
    let res = post(&base, "/v1/messages")
        .header("x-api-key", ACTIVE)
        .send()
        .await
        .unwrap();
    let (msg, challenge) = rejection(res, 401, "invalid_api_key").await;
    assert_eq!(challenge.as_deref(), Some("Bearer"));
    assert!(
        msg.contains("does not read the API key from the `x-api-key` header"),
        "{msg}"
    );

    let err = ApiKeyAuthLayer::builder(store())
        .accepted_headers(AcceptedHeaders::none())
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "accepted_headers");
}

#[tokio::test]
async fn identity_tier_limits_and_record_reach_the_handler() {
    let base = default_server().await;
    let res = post(&base, "/v1/chat/completions")
        .bearer_auth(ACTIVE)
        .body(chat("gpt-4o"))
        .send()
        .await
        .unwrap();
    let seen: Value = res.json().await.unwrap();
    assert_eq!(seen["id"], "active");
    assert_eq!(seen["record_id"], "active");
    assert_eq!(seen["tier"], "pro");
    assert_eq!(seen["rpm"], 60);
    assert_eq!(seen["tpm"], 10_000);
    assert_eq!(seen["concurrency"], 3);
    assert_eq!(seen["labels"]["team"], "search");
}

#[tokio::test]
async fn streaming_responses_and_stream_requests_pass_through() {
    let release = Arc::new(tokio::sync::Notify::new());
    let gate = Arc::clone(&release);
    let stream_handler = move |req: Request<Body>| {
        let gate = Arc::clone(&gate);
        async move {
            let view = RequestView::from_extensions(req.extensions()).cloned();
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(4);
            tokio::spawn(async move {
                let first = format!(
                    "data: stream={}\n\n",
                    view.as_ref().is_some_and(RequestView::stream)
                );
                tx.send(Ok(Bytes::from(first))).await.unwrap();
                gate.notified().await;
                tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n")))
                    .await
                    .unwrap();
            });
            let body = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|item| (item, rx))
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(body))
                .unwrap()
        }
    };
    let router = Router::new()
        .fallback(stream_handler)
        .layer(ApiKeyAuthLayer::new(store()));
    let base = serve(router).await;
    let body = r#"{"model":"gpt-4o-mini","stream":true,"messages":[]}"#;
    let mut res = post(&base, "/v1/chat/completions")
        .bearer_auth(MINI)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // The first event arrives while the upstream still holds the second one back.
    let first = tokio::time::timeout(Duration::from_secs(10), res.chunk())
        .await
        .expect("the first event arrives before the stream ends")
        .unwrap()
        .unwrap();
    assert_eq!(
        &first[..],
        b"data: stream=true\n\n",
        "the parsed view reached the handler"
    );
    release.notify_one();
    let mut rest = Vec::new();
    while let Some(chunk) = res.chunk().await.unwrap() {
        rest.extend_from_slice(&chunk);
    }
    assert_eq!(rest, b"data: [DONE]\n\n");
}

#[tokio::test]
async fn many_keys_at_once_each_handler_sees_its_own_identity() {
    let records = (0..50).map(|i| {
        KeyRecord::builder(format!("key-{i}"))
            .secret(format!("sk-load-{i:04}-0123456789abcdefghij"))
            .tier(if i % 2 == 0 { "even" } else { "odd" })
            .limits(llm_layers::ext::KeyLimits::new().requests_per_minute(i))
            .build()
            .unwrap()
    });
    let store = InMemoryKeyStore::new(records).unwrap();
    let base = serve(app(ApiKeyAuthLayer::new(store))).await;
    let client = reqwest::Client::new();
    let calls = (0..200u32).map(|n| {
        let i = n % 50;
        let req = client
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(format!("sk-load-{i:04}-0123456789abcdefghij"))
            .body(chat("gpt-4o"));
        async move {
            let res = req.send().await.unwrap();
            assert_eq!(res.status(), 200);
            (i, res.json::<Value>().await.unwrap())
        }
    });
    let results = futures_util::future::join_all(calls).await;
    assert_eq!(results.len(), 200);
    for (i, seen) in results {
        assert_eq!(seen["id"], format!("key-{i}"));
        assert_eq!(seen["tier"], if i % 2 == 0 { "even" } else { "odd" });
        assert_eq!(seen["rpm"], i);
    }
}

#[tokio::test]
async fn client_credentials_are_stripped_kept_or_replaced() {
    let send = |base: String| async move {
        let res = post(&base, "/v1/chat/completions")
            .bearer_auth(ACTIVE)
            .header("x-api-key", ACTIVE)
            .body(chat("gpt-4o"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        res.json::<Value>().await.unwrap()["headers"].clone()
    };

    let stripped = send(default_server().await).await;
    assert_eq!(
        stripped,
        serde_json::json!({"authorization": [], "x-api-key": [], "api-key": []}),
        "stripped by default"
    );

    let keep = ApiKeyAuthLayer::builder(store())
        .forwarding(CredentialForwarding::Keep)
        .build()
        .unwrap();
    let kept = send(serve(app(keep)).await).await;
    assert_eq!(kept["authorization"][0], format!("Bearer {ACTIVE}"));
    assert_eq!(kept["x-api-key"][0], ACTIVE);

    let replace = ApiKeyAuthLayer::builder(store())
        .forwarding(CredentialForwarding::Replace(
            KeyHeader::ApiKey,
            ApiKey::new("azure-upstream-secret-0123456789").unwrap(),
        ))
        .build()
        .unwrap();
    let replaced = send(serve(app(replace)).await).await;
    assert_eq!(
        replaced,
        serde_json::json!({
            "authorization": [],
            "x-api-key": [],
            "api-key": ["azure-upstream-secret-0123456789"],
        })
    );
}

#[tokio::test]
async fn inject_layer_sets_the_upstream_key_on_a_real_client() {
    let upstream = serve(Router::new().fallback(echo)).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<Bytes>>();
    for (layer, header, expected) in [
        (
            InjectApiKeyLayer::bearer(ApiKey::new("sk-upstream-0123456789abcdef").unwrap()),
            "authorization",
            "Bearer sk-upstream-0123456789abcdef",
        ),
        (
            InjectApiKeyLayer::x_api_key(ApiKey::new("sk-ant-upstream-0123456789").unwrap()),
            "x-api-key",
            "sk-ant-upstream-0123456789",
        ),
        (
            InjectApiKeyLayer::api_key(ApiKey::new("azure-upstream-0123456789").unwrap()),
            "api-key",
            "azure-upstream-0123456789",
        ),
    ] {
        assert!(!format!("{layer:?}").contains("upstream-0"));
        let svc = ServiceBuilder::new().layer(layer).service(client.clone());
        let req = Request::post(format!("{upstream}/v1/chat/completions"))
            // A client key already on the request is replaced, never sent alongside.
            .header("authorization", "Bearer sk-client-key")
            .header("x-api-key", "sk-client-key")
            .body(http_body_util::Full::new(Bytes::from(chat("gpt-4o"))))
            .unwrap();
        let res = svc.oneshot(req).await.unwrap();
        let body = http_body_util::BodyExt::collect(res.into_body())
            .await
            .unwrap()
            .to_bytes();
        let seen: Value = serde_json::from_slice(&body).unwrap();
        for h in ["authorization", "x-api-key", "api-key"] {
            if h == header {
                assert_eq!(seen["headers"][h], serde_json::json!([expected]));
            } else {
                assert_eq!(seen["headers"][h], serde_json::json!([]), "{h}");
            }
        }
    }

    let value = ApiKey::new("sk-upstream-0123456789abcdef")
        .unwrap()
        .header_value(KeyHeader::Bearer);
    assert!(value.is_sensitive());
    assert!(!format!("{value:?}").contains("sk-upstream"));
    assert_eq!(ApiKey::new("has space").unwrap_err().field(), "api_key");
    assert_eq!(ApiKey::new("").unwrap_err().field(), "api_key");
}

#[derive(Clone)]
struct FailingStore;

impl KeyStore for FailingStore {
    type Future = Pin<Box<dyn Future<Output = LookupResult> + Send>>;

    fn lookup(&self, _hash: &KeyHash) -> Self::Future {
        Box::pin(async { Err(KeyStoreError::new("connection refused by db-primary")) })
    }
}

/// A store that answers with the wrong record, as a buggy prefix index might.
#[derive(Clone)]
struct WrongRecordStore(Arc<KeyRecord>);

impl KeyStore for WrongRecordStore {
    type Future = std::future::Ready<LookupResult>;

    fn lookup(&self, _hash: &KeyHash) -> Self::Future {
        std::future::ready(Ok(Some(Arc::clone(&self.0))))
    }
}

#[tokio::test]
async fn store_failures_and_wrong_records_never_let_a_request_through() {
    let base = serve(
        Router::new()
            .fallback(echo)
            .layer(ApiKeyAuthLayer::new(FailingStore)),
    )
    .await;
    let res = post(&base, "/v1/chat/completions")
        .bearer_auth(ACTIVE)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["x-should-retry"], "true");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "service_unavailable");
    assert!(
        !body.to_string().contains("db-primary"),
        "store details stay in the logs"
    );

    let other = KeyRecord::builder("someone-else")
        .secret(MINI)
        .build()
        .unwrap();
    let base = serve(
        Router::new()
            .fallback(echo)
            .layer(ApiKeyAuthLayer::new(WrongRecordStore(Arc::new(other)))),
    )
    .await;
    let res = post(&base, "/v1/chat/completions")
        .bearer_auth(ACTIVE)
        .send()
        .await
        .unwrap();
    rejection(res, 401, "invalid_api_key").await;
}

/// The in-memory store behind an asynchronous lookup that yields first, as a database would.
#[derive(Clone)]
struct AsyncStore(InMemoryKeyStore);

impl KeyStore for AsyncStore {
    type Future = Pin<Box<dyn Future<Output = LookupResult> + Send>>;

    fn lookup(&self, hash: &KeyHash) -> Self::Future {
        let store = self.0.clone();
        let hash = *hash;
        Box::pin(async move {
            tokio::task::yield_now().await;
            Ok(store.get(&hash).cloned())
        })
    }
}

#[tokio::test]
async fn an_asynchronous_store_gives_the_same_answers() {
    let layer = ApiKeyAuthLayer::builder(AsyncStore(store()))
        .clock(TestClock::at(EXPIRY_SECS + 1).now_fn())
        .build()
        .unwrap();
    let base = serve(Router::new().fallback(echo).layer(layer)).await;
    let call = |key: &'static str, model: &str| {
        post(&base, "/v1/chat/completions")
            .bearer_auth(key)
            .body(chat(model))
            .send()
    };

    let res = call(ACTIVE, "gpt-4o").await.unwrap();
    assert_eq!(res.status(), 200);
    let seen: Value = res.json().await.unwrap();
    assert_eq!(
        (&seen["id"], &seen["tier"]),
        (&"active".into(), &"pro".into())
    );

    let res = call(MINI, "gpt-4o-mini").await.unwrap();
    assert_eq!(res.status(), 200);
    let seen: Value = res.json().await.unwrap();
    assert_eq!(seen["body"], chat("gpt-4o-mini"));

    rejection(
        call(MINI, "gpt-4o").await.unwrap(),
        403,
        "permission_denied",
    )
    .await;
    rejection(
        call(REVOKED, "gpt-4o").await.unwrap(),
        401,
        "revoked_api_key",
    )
    .await;
    rejection(
        call(EXPIRING, "gpt-4o").await.unwrap(),
        401,
        "expired_api_key",
    )
    .await;
    rejection(
        call(UNKNOWN, "gpt-4o").await.unwrap(),
        401,
        "invalid_api_key",
    )
    .await;
}

#[tokio::test]
async fn a_view_left_by_an_earlier_layer_is_used_without_reading_the_body() {
    let svc = ServiceBuilder::new()
        .map_request(|mut req: Request<Body>| {
            let view = RequestView::parse(
                Endpoint::ChatCompletions,
                br#"{"model":"gpt-4o"}"#,
                &CharEstimator,
            )
            .unwrap();
            req.extensions_mut().insert(view);
            req
        })
        .layer(ApiKeyAuthLayer::new(store()))
        .service(service_fn(|_req: Request<LayerBody<Body>>| async {
            Ok::<_, Infallible>(Response::new(Body::from("upstream")))
        }));
    // The body is not JSON: had the layer read it, the answer would be a 400.
    let req = Request::post("/v1/chat/completions")
        .header("authorization", format!("Bearer {MINI}"))
        .body(Body::from("not json"))
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 403);
    let err = res.extensions().get::<llm_layers::ApiError>().unwrap();
    assert!(err.message().contains("`gpt-4o`"), "{}", err.message());
}

/// Everything this test binary logs. A global subscriber: a thread-local one races with
/// callsite registration by the tests running beside it. It also means every test's traffic is
/// checked.
fn global_logs() -> &'static Capture {
    static CAPTURE: std::sync::OnceLock<Capture> = std::sync::OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture = Capture::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(capture.clone())
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
        capture
    })
}

#[tokio::test]
async fn secrets_never_reach_logs_or_debug_output() {
    let capture = global_logs();

    let upstream_key = "sk-upstream-secret-0123456789abcdef";
    let layer = ApiKeyAuthLayer::builder(store())
        .forwarding(CredentialForwarding::Replace(
            KeyHeader::Bearer,
            ApiKey::new(upstream_key).unwrap(),
        ))
        .build()
        .unwrap();
    let base = serve(app(layer.clone())).await;
    for key in [ACTIVE, UNKNOWN, REVOKED, EXPIRING, MINI] {
        let res = post(&base, "/v1/chat/completions")
            .bearer_auth(key)
            .body(chat("gpt-4o"))
            .send()
            .await
            .unwrap();
        let _ = res.bytes().await.unwrap();
    }
    let logs = capture.text();
    assert!(logs.contains("API key accepted"), "{logs}");
    assert!(logs.contains("request rejected"), "{logs}");
    let secrets = [ACTIVE, UNKNOWN, REVOKED, EXPIRING, MINI, upstream_key];
    for secret in secrets {
        // Neither the key nor its middle part (what a mask hides).
        let middle = &secret[4..secret.len() - 4];
        assert!(!logs.contains(middle), "{secret} leaked into logs:\n{logs}");
        let digest = KeyHash::of(secret.as_bytes()).to_hex();
        assert!(!logs.contains(&digest[..16]));
    }

    let store = store();
    let record = store.get(&KeyHash::of(ACTIVE.as_bytes())).unwrap();
    let svc = layer.layer(service_fn(|_: Request<Body>| async {
        Ok::<_, Infallible>(Response::new(Body::empty()))
    }));
    let dumps = [
        format!("{store:?}"),
        format!("{record:?}"),
        format!("{layer:?}"),
        format!("{:?}", layer.store()),
        format!("{:?}", record.hash()),
        format!("{:?}", ApiKey::new(upstream_key).unwrap()),
        format!("{}", ApiKey::new(upstream_key).unwrap()),
        format!(
            "{:?}",
            CredentialForwarding::Replace(KeyHeader::Bearer, ApiKey::new(upstream_key).unwrap())
        ),
        format!("{:?}", KeyRecord::builder("b").secret(ACTIVE)),
        format!("{svc:?}"),
    ];
    assert!(dumps[1].contains("active") && dumps[1].contains("<redacted>"));
    for dump in dumps {
        for secret in secrets {
            assert!(!dump.contains(&secret[4..secret.len() - 4]), "{dump}");
            assert!(!dump.contains(&KeyHash::of(secret.as_bytes()).to_hex()[..16]));
        }
    }
}

fn header_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        "[ \t]*(?i:bearer)?[ \t]*[\\x20-\\x7e]{0,40}".prop_map(String::into_bytes),
        (
            "(?i:bearer)",
            "[ \t]{1,3}",
            prop_oneof![Just(ACTIVE.to_owned()), Just(MINI.to_owned())],
            "[ \t]{0,2}"
        )
            .prop_map(|(s, w, k, t)| format!("{s}{w}{k}{t}").into_bytes()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn header_parser_never_panics_and_always_answers(
        auth in proptest::option::of(header_value()),
        x_api_key in proptest::option::of(header_value()),
        api_key in proptest::option::of(header_value()),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let svc = ApiKeyAuthLayer::new(store()).layer(service_fn(|req: Request<LayerBody<Body>>| async move {
            let id = req
                .extensions()
                .get::<llm_layers::ext::KeyIdentity>()
                .map(|k| k.id().to_owned())
                .unwrap_or_default();
            Ok::<_, Infallible>(Response::new(Body::from(id)))
        }));
        let mut req = Request::post("/v1/embeddings")
            .body(Body::from(r#"{"model":"text-embedding-3-small","input":"x"}"#))
            .unwrap();
        let mut presented = Vec::new();
        for (name, value) in [("authorization", auth), ("x-api-key", x_api_key), ("api-key", api_key)] {
            if let Some(Ok(v)) = value.map(|v| HeaderValue::from_bytes(&v)) {
                presented.push(v.as_bytes().to_vec());
                req.headers_mut().insert(name, v);
            }
        }
        let parsed = extract_api_key(req.headers(), AcceptedHeaders::all()).map(<[u8]>::to_vec);
        let res = rt.block_on(svc.oneshot(req)).unwrap();
        let status = res.status().as_u16();
        match parsed {
            Ok(key) => {
                prop_assert!(!key.is_empty() && key.iter().all(|b| (0x21..=0x7e).contains(b)));
                prop_assert!(presented.iter().any(|p| p.windows(key.len()).any(|w| w == key)));
                let known = key == ACTIVE.as_bytes() || key == MINI.as_bytes();
                prop_assert_eq!(status, if known { 200 } else { 401 });
            }
            Err(e) => {
                prop_assert_eq!(status, 401);
                let err = res.extensions().get::<llm_layers::ApiError>().unwrap();
                prop_assert_eq!(err.message(), e.message());
                prop_assert!(res.headers().contains_key("www-authenticate"));
            }
        }
        if status == 401 {
            let err = res.extensions().get::<llm_layers::ApiError>().unwrap();
            prop_assert_eq!(err.code().as_str(), "invalid_api_key");
            prop_assert_eq!(&res.headers()["x-should-retry"], "false");
            for p in &presented {
                let p = String::from_utf8_lossy(p);
                let p = p.trim();
                if p.len() >= 12 {
                    prop_assert!(!err.message().contains(p), "{}", err.message());
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn masks_show_at_most_a_short_prefix_and_the_last_four(key in "[\\x21-\\x7e]{0,64}|\\PC{0,40}") {
        let masked = llm_layers::auth::mask_key(key.as_bytes());
        if masked != "***" {
            prop_assert!(key.len() >= 24);
            // `prefix...last4`; the prefix itself may hold dots.
            let n = masked.len();
            prop_assert!(n >= 8);
            let (prefix, dots, last) = (&masked[..n - 7], &masked[n - 7..n - 4], &masked[n - 4..]);
            prop_assert_eq!(dots, "...");
            prop_assert!(!prefix.is_empty() && prefix.len() <= 8 && key.starts_with(prefix));
            prop_assert!(key.ends_with(last));
            prop_assert!(masked.len() * 2 <= key.len() + 8);
        }
    }

    #[test]
    fn expiry_text_is_accepted_or_refused_without_panicking(text in "\\PC{0,40}|[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,12})?(Z|[+-][0-9]{2}:[0-9]{2})") {
        let built = KeyRecord::builder("k")
            .secret("sk-prop-0123456789")
            .expires_at_rfc3339(&text)
            .build();
        match built {
            Ok(record) => prop_assert!(record.expires_at().is_some()),
            Err(e) => prop_assert_eq!(e.field(), "expires_at"),
        }
    }
}

#[tokio::test]
async fn a_restricted_key_is_checked_against_every_model_the_upstream_may_use() {
    let base = default_server().await;
    let messages = serde_json::json!([{"role": "user", "content": "hi"}]);
    let refused = |status: u16, body: &Value, model: &str, param: &str| {
        assert_eq!(status, 403, "{body}");
        assert_eq!(body["error"]["code"], "permission_denied", "{body}");
        assert_eq!(body["error"]["param"], param, "{body}");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains(&format!("`{model}`")), "{msg}");
        assert!(msg.contains("gpt-4o-mini*"), "{msg}");
    };
    // Azure-style: the path names the deployment the upstream serves.
    for path in [
        "/openai/deployments/gpt-4o/chat/completions",
        "/openai/deployments/gpt%2D4o/chat/completions",
        "/openai/deployments/gpt-4o-mini/../gpt-4o/chat/completions",
        "/openai/deployments/gpt-4o-mini/%2e%2e/gpt-4o/chat/completions",
        "/openai//deployments/./gpt-4o/chat/completions",
    ] {
        let (status, body) = post_raw(&base, path, MINI, chat("gpt-4o-mini")).await;
        refused(status, &body, "gpt-4o", "model");
    }
    // An allowed deployment needs no body `model`; a body `model` is checked as well.
    let no_model = serde_json::json!({"messages": messages}).to_string();
    for path in [
        "/openai/deployments/gpt-4o-mini/chat/completions",
        "/openai/deployments/text-embedding-3-small/embeddings",
    ] {
        let (status, body) = post_raw(&base, path, MINI, no_model.clone()).await;
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(body["id"], "mini");
    }
    let (status, body) = post_raw(
        &base,
        "/openai/deployments/gpt-4o-mini/chat/completions",
        MINI,
        chat("gpt-4o"),
    )
    .await;
    refused(status, &body, "gpt-4o", "model");
    // OpenRouter-style: each model of `models` may answer.
    let routed = |models: Value| {
        serde_json::json!({"model": "gpt-4o-mini", "models": models, "messages": messages})
            .to_string()
    };
    let (status, body) = post_raw(
        &base,
        "/v1/chat/completions",
        MINI,
        routed(serde_json::json!([
            "gpt-4o-mini-2024-07-18",
            "claude-3-opus"
        ])),
    )
    .await;
    refused(status, &body, "claude-3-opus", "models");
    let (status, body) = post_raw(
        &base,
        "/v1/chat/completions",
        MINI,
        routed(serde_json::json!(["gpt-4o-mini-2024-07-18", "gpt-4o-mini"])),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // Unrestricted keys are not read at all.
    let (status, body) = post_raw(
        &base,
        "/openai/deployments/gpt-4o/chat/completions",
        ACTIVE,
        chat("gpt-4o"),
    )
    .await;
    assert_eq!((status, &body["id"]), (200, &Value::from("active")));
}

#[tokio::test]
async fn a_stored_view_does_not_hide_the_deployment_of_the_path() {
    let svc = ServiceBuilder::new()
        .map_request(|mut req: Request<Body>| {
            // An earlier layer parsed the body but never looked at the path.
            let view = RequestView::parse(
                Endpoint::ChatCompletions,
                br#"{"model":"gpt-4o-mini"}"#,
                &CharEstimator,
            )
            .unwrap();
            req.extensions_mut().insert(view);
            req
        })
        .layer(ApiKeyAuthLayer::new(store()))
        .service(service_fn(|_req: Request<LayerBody<Body>>| async {
            Ok::<_, Infallible>(Response::new(Body::from("upstream")))
        }));
    let call = |path: &'static str| {
        Request::post(path)
            .header("authorization", format!("Bearer {MINI}"))
            .body(Body::from("not read"))
            .unwrap()
    };
    let res = svc
        .clone()
        .oneshot(call("/openai/deployments/gpt-4o/chat/completions"))
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    let err = res.extensions().get::<llm_layers::ApiError>().unwrap();
    assert!(err.message().contains("`gpt-4o`"), "{}", err.message());
    let res = svc
        .oneshot(call("/openai/deployments/gpt-4o-mini/chat/completions"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn client_chosen_strings_reach_logs_escaped() {
    let capture = global_logs();
    // A log line forged inside a model name, and one inside a key id.
    const FORGED: &str = "1999-01-01T00:00:00.000000Z  INFO llm_layers::auth: forged";
    let key = "sk-newline-id-0123456789abcdefghij";
    let store = InMemoryKeyStore::new([
        KeyRecord::builder(format!("team\n{FORGED} key_id=root"))
            .secret(key)
            .build()
            .unwrap(),
        KeyRecord::builder("mini")
            .secret(MINI)
            .allow_model("gpt-4o-mini*")
            .build()
            .unwrap(),
    ])
    .unwrap();
    let base = serve(app(ApiKeyAuthLayer::new(store))).await;
    let model = format!("gpt-4o\n{FORGED} model\r\u{1b}[2K");
    let res = post(&base, "/v1/chat/completions")
        .bearer_auth(MINI)
        .body(chat(&model))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    let res = post(&base, "/v1/chat/completions")
        .bearer_auth(key)
        .body(chat("gpt-4o"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let logs = capture.text();
    for line in logs.lines() {
        assert!(!line.starts_with("1999-01-01"), "a forged line:\n{logs}");
        assert!(!line.contains('\u{1b}'), "a raw escape: {line:?}");
    }
    // The strings are there, escaped.
    assert!(logs.contains(r"gpt-4o\n1999-01-01"), "{logs}");
    assert!(logs.contains(r"team\n1999-01-01"), "{logs}");
}

#[tokio::test]
async fn credential_headers_that_are_not_accepted_are_stripped_too() {
    let bearer_only = ApiKeyAuthLayer::builder(store())
        .accepted_headers(AcceptedHeaders::none().bearer(true))
        .build()
        .unwrap();
    let base = serve(app(bearer_only)).await;
    let res = post(&base, "/v1/chat/completions")
        .bearer_auth(ACTIVE)
        .header("x-api-key", "sk-ignored-0123456789abcdefghijklmn")
        .header("api-key", "sk-ignored-too-0123456789abcdefghij")
        .body(chat("gpt-4o"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let headers = res.json::<Value>().await.unwrap()["headers"].clone();
    assert_eq!(
        headers,
        serde_json::json!({"authorization": [], "x-api-key": [], "api-key": []}),
        "headers the layer does not read are still credentials: none reaches the upstream"
    );
}
