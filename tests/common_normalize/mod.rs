//! A stub upstream that replays recorded error responses, and a gateway that proxies to it
//! through a real hyper client wrapped by the normalizer.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use llm_layers::normalize::{NormalizeErrors, NormalizeErrorsLayer};
use serde_json::Value;
use tower::{Layer, Service, ServiceExt};

/// One recorded response from `tests/fixtures/*.jsonl`.
#[derive(Clone, Debug)]
pub struct Fixture {
    pub id: String,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub stream: bool,
    pub code: String,
    pub retryable: bool,
    pub retry_after_ms: Option<u64>,
    pub ambiguous: bool,
}

pub fn load_fixtures() -> Vec<Fixture> {
    let mut out = Vec::new();
    for file in ["errors.jsonl", "extra.jsonl"] {
        let path = format!("{}/tests/fixtures/{file}", env!("CARGO_MANIFEST_DIR"));
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line).expect("fixture line is JSON");
            out.push(Fixture {
                id: v["id"].as_str().unwrap().to_owned(),
                status: v["status"].as_u64().unwrap() as u16,
                headers: v["headers"]
                    .as_object()
                    .map(|h| {
                        h.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                            .collect()
                    })
                    .unwrap_or_default(),
                body: v["body"].as_str().unwrap_or_default().to_owned(),
                stream: v["stream"].as_bool().unwrap_or(false),
                code: v["expect"]["code"].as_str().unwrap().to_owned(),
                retryable: v["expect"]["retryable"].as_bool().unwrap(),
                retry_after_ms: v["expect"]["retry_after_ms"].as_u64(),
                ambiguous: v["note"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("ambiguous:")),
            });
        }
    }
    assert!(out.len() >= 100, "the fixtures were not found");
    out
}

fn replay(f: &Fixture) -> Response {
    let mut res = Response::new(Body::from(f.body.clone()));
    *res.status_mut() = StatusCode::from_u16(f.status).unwrap();
    for (k, v) in &f.headers {
        if matches!(
            k.as_str(),
            "content-length" | "transfer-encoding" | "connection"
        ) {
            continue;
        }
        if let (Ok(k), Ok(v)) = (
            HeaderName::try_from(k.as_str()),
            HeaderValue::try_from(v.as_str()),
        ) {
            res.headers_mut().append(k, v);
        }
    }
    res
}

/// A stream body that sends `chunks` with a pause between them, then optionally fails.
fn chunked(chunks: Vec<&'static str>, fail_at_end: bool) -> Body {
    let stream = futures_util::stream::unfold(
        (chunks.into_iter(), fail_at_end),
        |(mut it, fail)| async move {
            match it.next() {
                Some(c) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    Some((Ok(Bytes::from_static(c.as_bytes())), (it, fail)))
                }
                None if fail => Some((Err(std::io::Error::other("upstream died")), (it, false))),
                None => None,
            }
        },
    );
    Body::from_stream(stream)
}

pub const SSE_OK: [&str; 4] = [
    "data: {\"id\":\"c1\",\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n",
    "data: {\"id\":\"c1\",\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\n",
    "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n",
    "data: [DONE]\n\n",
];

fn sse(body: Body) -> Response {
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(body)
        .unwrap()
}

/// Starts the stub upstream; returns its address.
pub async fn start_upstream() -> SocketAddr {
    let fixtures: Arc<Vec<Fixture>> = Arc::new(load_fixtures());
    let app = Router::new()
        .route(
            "/fixture/{id}",
            any(|State(f): State<Arc<Vec<Fixture>>>, Path(id): Path<String>| async move {
                match f.iter().find(|f| f.id == id) {
                    Some(f) => replay(f),
                    None => (StatusCode::IM_A_TEAPOT, "no such fixture").into_response(),
                }
            }),
        )
        .route("/sse-ok", any(|| async { sse(chunked(SSE_OK.to_vec(), false)) }))
        .route(
            "/sse-error",
            any(|| async {
                sse(chunked(
                    vec![
                        SSE_OK[0],
                        "data: {\"error\":{\"message\":\"The server had an error while processing your request.\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\n",
                    ],
                    false,
                ))
            }),
        )
        .route("/sse-cut", any(|| async { sse(chunked(vec![SSE_OK[0], SSE_OK[1]], true)) }))
        .route(
            "/rate-limited",
            any(|| async {
                Response::builder()
                    .status(429)
                    .header("content-type", "application/json")
                    .header("retry-after-ms", "1500")
                    .header("x-ratelimit-remaining-requests", "0")
                    .header("x-request-id", "req_abc123")
                    .body(Body::from(
                        r#"{"error":{"message":"Rate limit reached for requests","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#,
                    ))
                    .unwrap()
            }),
        )
        .route(
            "/ok-json",
            any(|| async {
                Response::builder()
                    .header("content-type", "application/json")
                    .header("x-request-id", "req_ok")
                    .body(Body::from(r#"{"id":"chatcmpl-1","choices":[]}"#))
                    .unwrap()
            }),
        )
        .route(
            "/big-error",
            any(|| async {
                let mut body = String::from("{\"error\":{\"message\":\"");
                body.push_str(&"x".repeat(3 * 1024 * 1024));
                body.push_str("\",\"type\":\"server_error\"}}");
                (StatusCode::INTERNAL_SERVER_ERROR, body).into_response()
            }),
        )
        .route("/empty-503", any(|| async { StatusCode::SERVICE_UNAVAILABLE.into_response() }))
        .route(
            "/binary-500",
            any(|| async { (StatusCode::INTERNAL_SERVER_ERROR, Body::from(vec![0xffu8, 0xfe, 0x00, 0x80, b'{'])) }),
        )
        .route(
            "/slow",
            any(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
            }),
        )
        .with_state(fixtures);
    serve(app).await
}

pub async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A port that accepts a connection and closes it at once, without answering.
pub async fn start_resetting_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            if let Ok((sock, _)) = listener.accept().await {
                drop(sock);
            }
        }
    });
    addr
}

/// A raw HTTP/1.1 upstream that answers every request with `head` (status line, headers, the
/// blank line and possibly the start of a body) and then sends nothing more, keeping the
/// connection open.
pub async fn start_stalling_upstream(head: &'static [u8]) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                if sock.write_all(head).await.is_err() {
                    return;
                }
                // Hold the connection open, silent, until the peer goes away.
                let _ = sock.read(&mut buf).await;
            });
        }
    });
    addr
}

/// An upstream with one `GET /v1/models` route (axum answers `HEAD` on it too); returns its
/// address and the number of requests it received.
pub async fn start_models_upstream() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let app = Router::new().route(
        "/v1/models",
        axum::routing::get(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            async {
                Response::builder()
                    .header("content-type", "application/json")
                    .body(Body::from(MODELS))
                    .unwrap()
            }
        }),
    );
    (serve(app).await, calls)
}

/// The body of `GET /v1/models` on [`start_models_upstream`].
pub const MODELS: &str =
    r#"{"object":"list","data":[{"id":"gpt-4o","object":"model","owned_by":"system"}]}"#;

/// A Responses API object of about `size` bytes: `"error":null` near its start, as every
/// such object has.
pub fn responses_object(size: usize) -> String {
    let mut body = String::from(
        r#"{"id":"resp_67ccd2bed1ec8190","object":"response","created_at":1741476542,"status":"completed","error":null,"incomplete_details":null,"instructions":null,"model":"gpt-4.1-2025-04-14","output":[{"type":"message","id":"msg_67ccd2bf","status":"completed","role":"assistant","content":[{"type":"output_text","text":""#,
    );
    while body.len() < size {
        body.push_str("In a peaceful grove beneath a silver moon, a unicorn named Lumina. ");
    }
    body.push_str(r#"","annotations":[]}]}],"usage":{"input_tokens":36,"output_tokens":87}}"#);
    body
}

/// A body of `frames` followed by one trailer frame `x-checksum: <trailer>`.
pub fn with_trailer(frames: Vec<Bytes>, trailer: &'static str) -> Body {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-checksum", HeaderValue::from_static(trailer));
    let frames = frames
        .into_iter()
        .map(http_body::Frame::data)
        .chain(std::iter::once(http_body::Frame::trailers(trailers)))
        .map(Ok::<_, Infallible>);
    Body::new(http_body_util::StreamBody::new(futures_util::stream::iter(
        frames,
    )))
}

/// A port nobody listens on.
pub async fn closed_port() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    addr
}

pub type HyperClient = Client<HttpConnector, Full<Bytes>>;

pub fn hyper_client() -> HyperClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A gateway whose handler forwards every request to `upstream` through `client`.
pub async fn start_gateway<S>(upstream: SocketAddr, client: S) -> SocketAddr
where
    S: Service<
            Request<Full<Bytes>>,
            Response = Response<llm_layers::normalize::NormalizeBody<hyper::body::Incoming>>,
        > + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
{
    let app = Router::new().fallback(move |req: Request<Body>| {
        let client = client.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            let uri = format!("http://{upstream}{}", parts.uri.path());
            let mut up = Request::builder().method(parts.method).uri(uri);
            for (k, v) in &parts.headers {
                if k != http::header::HOST {
                    up = up.header(k, v);
                }
            }
            let res = client
                .oneshot(up.body(Full::new(body)).unwrap())
                .await
                .unwrap();
            res.map(Body::new)
        }
    });
    serve(app).await
}

/// The normalizer around a plain hyper client.
pub fn normalized_client() -> NormalizeErrors<HyperClient> {
    NormalizeErrorsLayer::new().layer(hyper_client())
}
