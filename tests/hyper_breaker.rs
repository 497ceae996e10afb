//! The circuit breaker around a plain hyper 1 server's `Request<Incoming>`, over the
//! hyper-util client and `tower::timeout::TimeoutLayer`.

mod common_hyper;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common_hyper::{client, envelope_code, post, proxy_to, send, serve, BoxError};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use llm_layers::body::LayerBody;
use llm_layers::breaker::{CircuitBreakerLayer, CircuitState, GuardedBody, SINGLE_KEY};
use llm_layers::ext::RefusedLocally;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tower::ServiceBuilder;

/// What the breaker answers when its inner service is the hyper-util client.
type Answer = Response<LayerBody<GuardedBody<Incoming>>>;

/// The outer adapters a server needs around a breaker whose inner errors pass through: an
/// `Err` of the inner service becomes its envelope (`504 timeout`, `502
/// service_unavailable`), and a refusal of the breaker's own is marked for the client with
/// `x-refused-locally` (extensions do not cross the wire).
fn answer(res: Result<Answer, BoxError>) -> Result<Answer, BoxError> {
    let mut res = res.unwrap_or_else(|e| llm_layers::policy::classify_error(e).to_response());
    if let Some(r) = res.extensions().get::<RefusedLocally>() {
        let by = HeaderValue::from_static(r.by);
        res.headers_mut().insert("x-refused-locally", by);
    }
    Ok(res)
}

/// An address nothing listens on.
fn dead_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Reads one HTTP/1.1 request (head and `content-length` body) from `s`.
async fn read_request(s: &mut tokio::net::TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        if buf.len() >= end + 4 + len {
            return;
        }
    }
}

/// An upstream that answers every request with a `200` head announcing 1000 bytes, sends a
/// first event, and cuts the connection. Counts the requests.
async fn cutting_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let hits = counted.clone();
            tokio::spawn(async move {
                read_request(&mut s).await;
                hits.fetch_add(1, Ordering::SeqCst);
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                          content-length: 1000\r\n\r\ndata: {\"choices\":[]}\n\n",
                    )
                    .await;
                let _ = s.flush().await;
                // Dropped: the connection is cut 980 bytes early.
            });
        }
    });
    (addr, hits)
}

/// An upstream that accepts connections and never answers.
async fn silent_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    addr
}

#[tokio::test]
async fn a_dead_upstream_opens_the_circuit_and_later_calls_are_refused_locally() {
    let breaker = CircuitBreakerLayer::builder()
        .name("upstream")
        .consecutive_failures(2)
        .open_duration(Duration::from_secs(60))
        .build()
        .unwrap();
    let handle = breaker.handle();
    let svc = ServiceBuilder::new()
        .map_result(answer)
        .layer(breaker)
        .layer(tower::timeout::TimeoutLayer::new(Duration::from_secs(5)))
        .service(proxy_to(dead_addr()));
    let addr = serve(svc).await;
    let url = format!("http://{addr}/v1/chat/completions");
    for _ in 0..2 {
        let (status, headers, body) = send(post(&url, None, r#"{"model":"gpt-4o"}"#)).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert_eq!(envelope_code(&body).as_deref(), Some("service_unavailable"));
        assert!(headers.get("x-refused-locally").is_none());
    }
    assert_eq!(handle.state(SINGLE_KEY), Some(CircuitState::Open));
    let (status, headers, body) = send(post(&url, None, r#"{"model":"gpt-4o"}"#)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(envelope_code(&body).as_deref(), Some("service_unavailable"));
    assert_eq!(headers["x-refused-locally"], "circuit_breaker");
    let wait: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=66).contains(&wait), "{wait}");
    let msg = String::from_utf8_lossy(&body);
    assert!(msg.contains("Circuit breaker 'upstream' is open"), "{msg}");
    let m = handle.metrics(SINGLE_KEY).unwrap();
    assert_eq!((m.failures, m.rejections), (2, 1));
}

#[tokio::test]
async fn a_timeout_of_the_inner_timeout_layer_counts_as_a_failure() {
    let breaker = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .build()
        .unwrap();
    let handle = breaker.handle();
    let svc = ServiceBuilder::new()
        .map_result(answer)
        .layer(breaker)
        .layer(tower::timeout::TimeoutLayer::new(Duration::from_millis(
            200,
        )))
        .service(proxy_to(silent_upstream().await));
    let addr = serve(svc).await;
    let url = format!("http://{addr}/v1/chat/completions");
    let (status, _, body) = send(post(&url, None, "{}")).await;
    // The breaker passed the `Elapsed` on unchanged (a timeout, not a refusal) ...
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(envelope_code(&body).as_deref(), Some("timeout"));
    // ... and counted it.
    let m = handle.metrics(SINGLE_KEY).unwrap();
    assert_eq!((m.calls, m.failures), (1, 1));
    assert_eq!(m.state, CircuitState::Open);
    let (status, headers, _) = send(post(&url, None, "{}")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["x-refused-locally"], "circuit_breaker");
}

#[tokio::test]
async fn a_200_head_whose_stream_is_cut_counts_as_a_failure() {
    let (upstream, hits) = cutting_upstream().await;
    let breaker = CircuitBreakerLayer::builder()
        .consecutive_failures(2)
        .open_duration(Duration::from_secs(60))
        .build()
        .unwrap();
    let handle = breaker.handle();
    let svc = ServiceBuilder::new()
        .map_result(answer)
        .layer(breaker)
        .layer(tower::timeout::TimeoutLayer::new(Duration::from_secs(5)))
        .service(proxy_to(upstream));
    let addr = serve(svc).await;
    let url = format!("http://{addr}/v1/chat/completions");
    let client = client::<Full<Bytes>>();
    for i in 1..=2u64 {
        let res = client
            .request(post(&url, None, r#"{"model":"gpt-4o","stream":true}"#))
            .await
            .unwrap();
        // The head is a success ...
        assert_eq!(res.status(), StatusCode::OK);
        // ... the stream is not: the client sees it break off, and so does the breaker.
        assert!(res.into_body().collect().await.is_err());
        let m = handle.metrics(SINGLE_KEY).unwrap();
        assert_eq!(m.failures, i, "call {i}");
    }
    assert_eq!(handle.state(SINGLE_KEY), Some(CircuitState::Open));
    let (status, headers, body) = send(post(&url, None, r#"{"model":"gpt-4o"}"#)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(envelope_code(&body).as_deref(), Some("service_unavailable"));
    assert_eq!(headers["x-refused-locally"], "circuit_breaker");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        2,
        "the refused call never left"
    );
}

#[tokio::test]
async fn a_whole_200_through_a_plain_hyper_server_is_a_success() {
    let upstream = common_hyper::echo_upstream().await;
    let breaker = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .build()
        .unwrap();
    let handle = breaker.handle();
    let svc = ServiceBuilder::new()
        .map_result(answer)
        .layer(breaker)
        .layer(tower::timeout::TimeoutLayer::new(Duration::from_secs(5)))
        .service(proxy_to(upstream.addr));
    let addr = serve(svc).await;
    let (status, _, body) = send(post(
        &format!("http://{addr}/v1/chat/completions"),
        None,
        r#"{"model":"gpt-4o"}"#,
    ))
    .await;
    assert_eq!(status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["body"], r#"{"model":"gpt-4o"}"#);
    // The server records the success when it reads the end of the body; on this one thread
    // its task may still have that poll to make.
    for _ in 0..100 {
        if handle.metrics(SINGLE_KEY).unwrap().calls == 1 {
            break;
        }
        tokio::task::yield_now().await;
    }
    let m = handle.metrics(SINGLE_KEY).unwrap();
    assert_eq!((m.calls, m.failures), (1, 0));
    assert_eq!(upstream.hits(), 1);
}
