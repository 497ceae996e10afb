//! `ApiKeyAuth` around a plain hyper 1 server's `Request<Incoming>` (no axum), over
//! `tower::timeout::Timeout` and hyper-util's client to a real upstream.

mod common_auth;
mod common_hyper;

use std::time::Duration;

use common_auth::{chat, store, ACTIVE, MINI, UNKNOWN};
use common_hyper::{echo_upstream, envelope_code, post, proxy_to, send, serve, Echo};
use hyper::body::Incoming;
use llm_layers::auth::{ApiKey, ApiKeyAuthLayer, CredentialForwarding, KeyHeader};
use llm_layers::body::LayerBody;
use serde_json::Value;
use tower::timeout::TimeoutLayer;
use tower::ServiceBuilder;

/// A plain hyper server: auth, a timeout, and a hyper-util client to `upstream`.
async fn gateway(
    upstream: &Echo,
    auth: ApiKeyAuthLayer<llm_layers::auth::InMemoryKeyStore>,
) -> String {
    let svc = ServiceBuilder::new()
        .layer(auth)
        .layer(TimeoutLayer::new(Duration::from_secs(30)))
        .service(proxy_to::<LayerBody<Incoming>>(upstream.addr));
    let addr = serve(svc).await;
    format!("http://{addr}/v1/chat/completions")
}

#[tokio::test]
async fn a_good_key_reaches_the_upstream_with_the_request_intact() {
    let upstream = echo_upstream().await;
    let url = gateway(&upstream, ApiKeyAuthLayer::new(store())).await;

    // An unrestricted key: the body streams through unread.
    let body = chat("gpt-4o");
    let (status, _, answer) = send(post(&url, Some(ACTIVE), &body)).await;
    assert_eq!(status, 200);
    let seen: Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["path"], "/v1/chat/completions");
    assert_eq!(seen["body"], body.as_str());
    assert_eq!(seen["authorization"], "", "the client's key is stripped");
    assert_eq!(upstream.hits(), 1);

    // A restricted key with an allowed model: the body read for the model goes on unchanged.
    let body = chat("gpt-4o-mini-2024-07-18");
    let (status, _, answer) = send(post(&url, Some(MINI), &body)).await;
    assert_eq!(status, 200);
    let seen: Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(seen["body"], body.as_str());
    assert_eq!(upstream.hits(), 2);
}

#[tokio::test]
async fn a_wrong_key_is_a_401_envelope_and_the_upstream_sees_nothing() {
    let upstream = echo_upstream().await;
    let url = gateway(&upstream, ApiKeyAuthLayer::new(store())).await;

    let (status, headers, body) = send(post(&url, Some(UNKNOWN), &chat("gpt-4o"))).await;
    assert_eq!(status, 401);
    assert_eq!(envelope_code(&body).as_deref(), Some("invalid_api_key"));
    assert_eq!(
        headers["www-authenticate"],
        r#"Bearer error="invalid_token""#
    );
    assert_eq!(headers["x-should-retry"], "false");

    let (status, headers, body) = send(post(&url, None, &chat("gpt-4o"))).await;
    assert_eq!(status, 401);
    assert_eq!(envelope_code(&body).as_deref(), Some("invalid_api_key"));
    assert_eq!(headers["www-authenticate"], "Bearer");
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn a_model_outside_the_allow_list_is_a_403_envelope_and_the_upstream_sees_nothing() {
    let upstream = echo_upstream().await;
    let url = gateway(&upstream, ApiKeyAuthLayer::new(store())).await;

    let (status, headers, body) = send(post(&url, Some(MINI), &chat("gpt-4o"))).await;
    assert_eq!(status, 403);
    assert_eq!(envelope_code(&body).as_deref(), Some("permission_denied"));
    assert_eq!(
        headers["www-authenticate"],
        r#"Bearer error="insufficient_scope""#
    );
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().contains("`gpt-4o`"),
        "{v}"
    );

    // A body that is not JSON, for a restricted key: 400, and still nothing upstream.
    let (status, _, body) = send(post(&url, Some(MINI), "not json")).await;
    assert_eq!(status, 400);
    assert_eq!(envelope_code(&body).as_deref(), Some("invalid_value"));
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn the_upstream_key_replaces_the_clients_over_the_hyper_client() {
    let upstream = echo_upstream().await;
    let upstream_key = "sk-upstream-0123456789abcdefghij";
    let auth = ApiKeyAuthLayer::builder(store())
        .forwarding(CredentialForwarding::Replace(
            KeyHeader::Bearer,
            ApiKey::new(upstream_key).unwrap(),
        ))
        .build()
        .unwrap();
    let url = gateway(&upstream, auth).await;
    let (status, _, answer) = send(post(&url, Some(ACTIVE), &chat("gpt-4o"))).await;
    assert_eq!(status, 200);
    let seen: Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(seen["authorization"], format!("Bearer {upstream_key}"));
}
