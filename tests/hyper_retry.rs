//! The retry layer (and the normalizer) around a plain hyper 1 server's `Request<Incoming>`,
//! over the hyper-util client and `tower::timeout::TimeoutLayer`.

mod common_hyper;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common_hyper::{envelope_code, post, proxy_to, send, serve};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use llm_layers::body::LayerBody;
use llm_layers::normalize::NormalizeErrorsLayer;
use llm_layers::retry::{Backoff, Jitter, RetryLayer};
use tower::timeout::TimeoutLayer;
use tower::ServiceBuilder;

const CHAT: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;

/// A plain hyper upstream that answers its first request `503` and every later one `200`,
/// recording each body it read.
struct Flaky {
    addr: SocketAddr,
    bodies: Arc<Mutex<Vec<Bytes>>>,
}

async fn flaky_upstream() -> Flaky {
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let hits = Arc::new(AtomicUsize::new(0));
    let seen = bodies.clone();
    let svc = tower::service_fn(move |req: Request<Incoming>| {
        let seen = seen.clone();
        let n = hits.fetch_add(1, Ordering::SeqCst);
        async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            seen.lock().unwrap().push(body);
            let res = if n == 0 {
                Response::builder()
                    .status(StatusCode::SERVICE_UNAVAILABLE)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(
                        br#"{"error":{"message":"overloaded","type":"server_error"}}"#,
                    )))
            } else {
                Response::builder()
                    .status(StatusCode::OK)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(br#"{"id":"chatcmpl-1"}"#)))
            };
            Ok::<_, Infallible>(res.unwrap())
        }
    });
    let addr = serve(svc).await;
    Flaky { addr, bodies }
}

fn retry() -> RetryLayer {
    RetryLayer::builder()
        .backoff(
            Backoff::new(
                Duration::from_millis(1),
                Duration::from_millis(5),
                Jitter::Full,
            )
            .unwrap(),
        )
        .seed(1)
        .build()
        .unwrap()
}

#[tokio::test]
async fn retry_over_a_timeout_and_the_hyper_client_replays_the_body() {
    let upstream = flaky_upstream().await;
    let svc = ServiceBuilder::new()
        .layer(retry())
        .layer(TimeoutLayer::new(Duration::from_secs(10)))
        .service(proxy_to::<LayerBody<Incoming>>(upstream.addr));
    let addr = serve(svc).await;
    let (status, headers, body) = send(post(
        &format!("http://{addr}/v1/chat/completions"),
        None,
        CHAT,
    ))
    .await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-llm-layers-attempts"], "2");
    assert_eq!(&body[..], br#"{"id":"chatcmpl-1"}"#);
    let bodies = upstream.bodies.lock().unwrap().clone();
    assert_eq!(bodies, vec![Bytes::from(CHAT), Bytes::from(CHAT)]);
}

#[tokio::test]
async fn retry_and_the_normalizer_over_a_timeout_and_the_hyper_client() {
    let upstream = flaky_upstream().await;
    let svc = ServiceBuilder::new()
        .layer(retry())
        .layer(NormalizeErrorsLayer::new())
        .layer(TimeoutLayer::new(Duration::from_secs(10)))
        .service(proxy_to::<LayerBody<Incoming>>(upstream.addr));
    let addr = serve(svc).await;
    let (status, headers, body) = send(post(
        &format!("http://{addr}/v1/chat/completions"),
        None,
        CHAT,
    ))
    .await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-llm-layers-attempts"], "2");
    assert_eq!(envelope_code(&body), None);
    let bodies = upstream.bodies.lock().unwrap().clone();
    assert_eq!(bodies, vec![Bytes::from(CHAT), Bytes::from(CHAT)]);
}

#[tokio::test]
async fn a_dead_upstream_is_retried_then_answered_with_an_envelope() {
    // A port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(retry())
        .layer(NormalizeErrorsLayer::new())
        .layer(TimeoutLayer::new(Duration::from_secs(10)))
        .service(proxy_to::<LayerBody<Incoming>>(dead));
    let addr = serve(svc).await;
    let (status, headers, body) = send(post(
        &format!("http://{addr}/v1/chat/completions"),
        None,
        CHAT,
    ))
    .await;
    assert_eq!(status, 502);
    assert_eq!(headers["x-llm-layers-attempts"], "3");
    assert_eq!(headers["x-llm-layers-retry-stop"], "attempts-exhausted");
    assert_eq!(envelope_code(&body).as_deref(), Some("service_unavailable"));
}
