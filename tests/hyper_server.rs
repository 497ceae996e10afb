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
