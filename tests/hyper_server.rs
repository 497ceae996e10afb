//! The layers around a plain hyper 1 server's `Request<Incoming>`, over a hyper-util client.

mod common_hyper;

use common_hyper::{echo_upstream, envelope_code, post, proxy_to, send, serve};
use llm_layers::normalize::NormalizeErrorsLayer;
use tower::ServiceBuilder;

#[tokio::test]
async fn the_normalizer_serves_a_plain_hyper_server() {
    let upstream = echo_upstream().await;
    let svc = ServiceBuilder::new()
        .layer(NormalizeErrorsLayer::new())
        .service(proxy_to(upstream.addr));
    let addr = serve(svc).await;
    let (status, _, body) = send(post(
        &format!("http://{addr}/v1/chat/completions"),
        None,
        r#"{"model":"gpt-4o"}"#,
    ))
    .await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["body"], r#"{"model":"gpt-4o"}"#);
    assert_eq!(upstream.hits(), 1);
    assert_eq!(envelope_code(&body), None);
}

#[tokio::test]
async fn a_dead_upstream_behind_a_plain_hyper_server_is_an_envelope() {
    // A port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(NormalizeErrorsLayer::new())
        .service(proxy_to(dead));
    let addr = serve(svc).await;
    let (status, _, body) = send(post(
        &format!("http://{addr}/v1/chat/completions"),
        None,
        "{}",
    ))
    .await;
    assert_eq!(status, 502);
    assert_eq!(envelope_code(&body).as_deref(), Some("service_unavailable"));
}

/// The shipped `examples/hyper_server.rs`, every layer around `Request<Incoming>`.
#[allow(dead_code)]
#[path = "../examples/hyper_server.rs"]
mod example;

async fn example_server(upstream: std::net::SocketAddr) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let upstream: http::Uri = format!("http://{upstream}/v1").parse().unwrap();
    tokio::spawn(example::serve(listener, upstream));
    addr
}

#[tokio::test]
async fn the_hyper_example_passes_a_good_request_intact() {
    let upstream = echo_upstream().await;
    let addr = example_server(upstream.addr).await;
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let (status, headers, answer) = send(post(
        &format!("http://{addr}/v1/chat/completions"),
        Some(example::DEMO_KEY),
        body,
    ))
    .await;
    assert_eq!(status, 200, "{answer:?}");
    let seen: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(seen["body"], body);
    assert_eq!(seen["path"], "/v1/chat/completions");
    // The client's key is not forwarded.
    assert_eq!(seen["authorization"], "");
    assert!(
        headers.contains_key("x-llm-layers-ratelimit-remaining-requests")
            || headers.contains_key("x-ratelimit-remaining-requests")
    );
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test]
async fn the_hyper_example_answers_every_refusal_with_an_envelope() {
    let upstream = echo_upstream().await;
    let addr = example_server(upstream.addr).await;
    let url = format!("http://{addr}/v1/chat/completions");
    let chat = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    for (key, body, status, code) in [
        (None, chat, 401, "invalid_api_key"),
        (
            Some("sk-wrong-0123456789abcdef"),
            chat,
            401,
            "invalid_api_key",
        ),
        (
            Some(example::DEMO_KEY),
            "{\"model\": ",
            400,
            "invalid_value",
        ),
        (
            Some(example::DEMO_KEY),
            r#"{"model":"o1-pro","messages":[{"role":"user","content":"hi"}]}"#,
            403,
            "permission_denied",
        ),
        (
            Some(example::DEMO_KEY),
            r#"{"model":"gpt-4o-mini"}"#,
            400,
            "missing_required_field",
        ),
    ] {
        let (got, _, answer) = send(post(&url, key, body)).await;
        assert_eq!(got, status, "{key:?} {body}: {answer:?}");
        assert_eq!(envelope_code(&answer).as_deref(), Some(code), "{body}");
    }
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn the_hyper_example_over_a_dead_upstream_is_a_502_envelope() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let addr = example_server(dead).await;
    let (status, headers, answer) = send(post(
        &format!("http://{addr}/v1/chat/completions"),
        Some(example::DEMO_KEY),
        r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#,
    ))
    .await;
    assert_eq!(status, 502, "{answer:?}");
    assert_eq!(
        envelope_code(&answer).as_deref(),
        Some("service_unavailable")
    );
    // Retried before the answer, and told not to retry again.
    assert_eq!(headers["x-should-retry"], "false");
}
