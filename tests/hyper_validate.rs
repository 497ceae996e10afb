//! Validation around a plain hyper 1 server's `Request<Incoming>`, over a hyper-util client and
//! over `tower::timeout::Timeout`.

mod common_hyper;

use std::time::Duration;

use common_hyper::{echo_upstream, envelope_code, post, proxy_to, send, serve, Echo};
use http::StatusCode;
use llm_layers::validate::ValidateRequestLayer;
use tower::timeout::TimeoutLayer;
use tower::ServiceBuilder;

const VALID: &str = r#"{"model":"gpt-4o", "x_vendor": {"k": [1, 2]},
  "messages": [{"role": "user", "content": "Hello"}]}"#;

fn layer() -> ValidateRequestLayer {
    ValidateRequestLayer::builder()
        .body_limit(1024)
        .build()
        .unwrap()
}

/// The answers every validated server gives: the valid request reaches the upstream byte for
/// byte; invalid JSON, a missing model and a body over the limit get their envelopes and the
/// upstream sees none of them.
async fn answers_as_a_validating_edge(addr: std::net::SocketAddr, upstream: &Echo) {
    let url = format!("http://{addr}/v1/chat/completions");
    let (status, _, body) = send(post(&url, None, VALID)).await;
    assert_eq!(status, StatusCode::OK);
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["body"], VALID, "the body reaches the upstream intact");
    assert_eq!(seen["path"], "/v1/chat/completions");
    assert_eq!(upstream.hits(), 1);

    let big = format!(
        r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "a".repeat(2000)
    );
    for (body, status, code) in [
        (
            "{\"model\": \"gpt-4o\",\n \"messages\": [}",
            400,
            "invalid_value",
        ),
        (
            r#"{"messages":[{"role":"user","content":"hi"}]}"#,
            400,
            "missing_required_field",
        ),
        (big.as_str(), 413, "request_too_large"),
    ] {
        let (got, headers, bytes) = send(post(&url, None, body)).await;
        assert_eq!(got.as_u16(), status, "{}", String::from_utf8_lossy(&bytes));
        assert_eq!(envelope_code(&bytes).as_deref(), Some(code));
        assert_eq!(headers["content-type"], "application/json");
    }
    let (_, _, bytes) = send(post(
        &url,
        None,
        r#"{"messages":[{"role":"user","content":"hi"}]}"#,
    ))
    .await;
    let env: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(env["error"]["param"], "model");
    let (_, _, bytes) = send(post(&url, None, "{\n  \"model\": }")).await;
    let env: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let message = env["error"]["message"].as_str().unwrap();
    assert!(message.contains("line 2"), "{message}");
    assert_eq!(upstream.hits(), 1, "the upstream saw no refused request");
}

#[tokio::test]
async fn validation_serves_a_plain_hyper_server_over_the_hyper_util_client() {
    let upstream = echo_upstream().await;
    let svc = ServiceBuilder::new()
        .layer(layer())
        .service(proxy_to(upstream.addr));
    let addr = serve(svc).await;
    answers_as_a_validating_edge(addr, &upstream).await;
}

#[tokio::test]
async fn validation_serves_over_a_timeout_and_under_one() {
    // Validation over `tower::timeout::Timeout` (errors become `BoxError`) ...
    let upstream = echo_upstream().await;
    let svc = ServiceBuilder::new()
        .layer(layer())
        .layer(TimeoutLayer::new(Duration::from_secs(30)))
        .service(proxy_to(upstream.addr));
    let addr = serve(svc).await;
    answers_as_a_validating_edge(addr, &upstream).await;

    // ... and under one.
    let upstream = echo_upstream().await;
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_secs(30)))
        .layer(layer())
        .service(proxy_to(upstream.addr));
    let addr = serve(svc).await;
    answers_as_a_validating_edge(addr, &upstream).await;
}

#[tokio::test(start_paused = true)]
async fn an_inner_timeout_is_passed_on_as_the_error() {
    use tower::ServiceExt;
    // An upstream that never answers, behind a one-second timeout: the `Elapsed` comes out
    // of the layer as the call's error, for the server (or a normalizer) to answer.
    let never = tower::service_fn(
        |_req: http::Request<llm_layers::body::LayerBody<http_body_util::Full<bytes::Bytes>>>| {
            std::future::pending::<
                Result<
                    http::Response<http_body_util::Empty<bytes::Bytes>>,
                    std::convert::Infallible,
                >,
            >()
        },
    );
    let svc = ServiceBuilder::new()
        .layer(layer())
        .layer(TimeoutLayer::new(Duration::from_secs(1)))
        .service(never);
    let err = svc
        .oneshot(post("http://x/v1/chat/completions", None, VALID))
        .await
        .unwrap_err();
    assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
}
