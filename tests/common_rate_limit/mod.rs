//! Helpers for the rate limit tests: a real axum server whose routes script upstream answers,
//! an authentication stand-in, and an in-process harness for paused-time tests.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Request, Response, StatusCode};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http_body_util::Full;
use llm_layers::body::LayerBody;
use llm_layers::ext::{KeyIdentity, KeyLimits};
use llm_layers::rate_limit::{RateLimit, RateLimitLayer};
use tokio::sync::Notify;
use tower::{Layer, ServiceBuilder};

/// Scripted upstream state.
#[derive(Clone, Default)]
pub struct Upstream {
    /// Released by the test to let a held stream finish.
    pub release: Arc<Notify>,
}

/// Inserts a `KeyIdentity` from `authorization: Bearer <id>`, `x-tier` and `x-rpm`/`x-tpm`.
pub fn auth(mut req: Request<Body>) -> Request<Body> {
    let h = req.headers();
    let id = h
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    if let Some(id) = id {
        let mut ident = KeyIdentity::new(id);
        if let Some(t) = h.get("x-tier").and_then(|v| v.to_str().ok()) {
            ident = ident.with_tier(t.to_owned());
        }
        let mut limits = KeyLimits::new();
        if let Some(n) = h.get("x-rpm").and_then(|v| v.to_str().ok()?.parse().ok()) {
            limits = limits.requests_per_minute(n);
        }
        if let Some(n) = h.get("x-tpm").and_then(|v| v.to_str().ok()?.parse().ok()) {
            limits = limits.tokens_per_minute(n);
        }
        req.extensions_mut().insert(ident.with_limits(limits));
    }
    req
}

/// `POST /v1/chat/completions`: a JSON answer whose `usage.total_tokens` is the request's
/// `x-usage` header (no `usage` when absent). `POST /v1/stream`: an SSE stream whose final
/// chunk reports `x-usage`; with `x-hold: 1` it waits for `Upstream::release` before its last
/// chunk.
pub fn upstream_router(up: Upstream) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(json_answer))
        .route("/v1/stream", post(sse_answer))
        .route(
            "/v1/fail",
            post(|| async { (StatusCode::BAD_GATEWAY, "{}") }),
        )
        .route("/v1/status", post(status_answer))
        .route("/v1/refused-locally", post(refused_locally))
        .route("/v1/cut", post(cut_stream))
        .with_state(up)
}

/// `POST /v1/status`: answers the status in `x-status` with an OpenAI-style error body; with
/// `x-upstream-limits: 1` it adds the upstream's own `x-ratelimit-*` headers (limit 500, 0
/// remaining, reset `6m0s`), as OpenAI sends them on a 429.
async fn status_answer(headers: HeaderMap) -> Response<Body> {
    let status = headers
        .get("x-status")
        .and_then(|v| v.to_str().ok()?.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let mut res = Response::builder()
        .status(status)
        .header("content-type", "application/json");
    if headers.contains_key("x-upstream-limits") {
        res = res
            .header("x-ratelimit-limit-requests", "500")
            .header("x-ratelimit-remaining-requests", "0")
            .header("x-ratelimit-reset-requests", "6m0s");
    }
    let body = if status.is_success() {
        r#"{"id":"c1","choices":[]}"#
    } else {
        r#"{"error":{"message":"upstream says no","type":"server_error","param":null,"code":null}}"#
    };
    res.body(Body::from(body)).unwrap()
}

/// `POST /v1/refused-locally`: a 503 marked [`RefusedLocally`], as a circuit breaker inside the
/// rate limiter answers when it refuses a call before the upstream sees it.
async fn refused_locally() -> Response<Body> {
    let mut res = llm_layers::error::ApiError::new(
        llm_layers::error::ErrorCode::ServiceUnavailable,
        "The circuit is open.",
    )
    .to_response::<Body>();
    res.extensions_mut()
        .insert(llm_layers::ext::RefusedLocally::CIRCUIT_BREAKER);
    res
}

/// `POST /v1/cut`: an SSE stream whose first event reports `usage` (`x-usage` tokens in all:
/// the prompt's 10 and the rest as output so far), then, once `Upstream::release` is
/// notified, breaks off with an error: the upstream did the work, the client never saw the end.
async fn cut_stream(State(up): State<Upstream>, headers: HeaderMap) -> Response<Body> {
    let usage = usage_of(&headers).unwrap_or(11);
    let first = format!(
        "data: {{\"type\":\"message_start\",\"usage\":{{\"input_tokens\":10,\"output_tokens\":{}}}}}\n\n",
        usage.saturating_sub(10)
    );
    let chunks = futures_util::stream::unfold(0u8, move |step| {
        let (first, release) = (first.clone(), up.release.clone());
        async move {
            let item = match step {
                0 => Ok(Bytes::from(first)),
                1 => {
                    release.notified().await;
                    Err(std::io::Error::other("upstream connection reset"))
                }
                _ => return None,
            };
            Some((item, step + 1))
        }
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(chunks))
        .unwrap()
}

fn usage_of(h: &HeaderMap) -> Option<u64> {
    h.get("x-usage")?.to_str().ok()?.parse().ok()
}

async fn json_answer(headers: HeaderMap) -> Response<Body> {
    let body = match usage_of(&headers) {
        Some(n) => format!(
            r#"{{"id":"c1","choices":[{{"message":{{"role":"assistant","content":"hi"}}}}],"usage":{{"prompt_tokens":1,"completion_tokens":{},"total_tokens":{n}}}}}"#,
            n.saturating_sub(1)
        ),
        None => r#"{"id":"c1","choices":[]}"#.to_owned(),
    };
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap()
}

async fn sse_answer(State(up): State<Upstream>, headers: HeaderMap) -> Response<Body> {
    let usage = usage_of(&headers);
    let hold = headers.contains_key("x-hold");
    let chunks = async_stream(usage, hold, up.release.clone());
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(chunks))
        .unwrap()
}

fn async_stream(
    usage: Option<u64>,
    hold: bool,
    release: Arc<Notify>,
) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> + Send {
    futures_util::stream::unfold(0u8, move |step| {
        let release = release.clone();
        async move {
            let chunk = match step {
                0 => "data: {\"choices\":[{\"delta\":{\"content\":\"he\"}}],\"usage\":null}\n\n".to_owned(),
                1 => {
                    if hold {
                        release.notified().await;
                    }
                    // Split in the middle of a line, across two chunks.
                    "data: {\"choices\":[{\"delta\":{\"content\":\"llo\"}}],\"us".to_owned()
                }
                2 => match usage {
                    Some(n) => format!("age\":null}}\n\ndata: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":1,\"completion_tokens\":{},\"total_tokens\":{n}}}}}\n\n", n.saturating_sub(1)),
                    None => "age\":null}\n\n".to_owned(),
                },
                3 => "data: [DONE]\n\n".to_owned(),
                _ => return None,
            };
            Some((Ok(Bytes::from(chunk)), step + 1))
        }
    })
}

/// Serves `router` wrapped in the auth stand-in and `layer` on `127.0.0.1:0`, with the peer
/// address as `ConnectInfo<SocketAddr>`.
pub async fn serve(layer: RateLimitLayer, up: Upstream) -> SocketAddr {
    let app = upstream_router(up).layer(ServiceBuilder::new().map_request(auth).layer(layer));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    addr
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().build().unwrap()
}

/// A chat request body with the given prompt and `max_tokens`.
pub fn chat(prompt: &str, max_tokens: u64) -> String {
    serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
    })
    .to_string()
}

pub fn header<'a>(res: &'a reqwest::Response, name: &str) -> &'a str {
    res.headers()
        .get(name)
        .unwrap_or_else(|| panic!("missing header {name}"))
        .to_str()
        .unwrap()
}

pub async fn error_code(res: reqwest::Response) -> (String, String) {
    let v: serde_json::Value = res.json().await.unwrap();
    (
        v["error"]["code"].as_str().unwrap_or_default().to_owned(),
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

/// The request body an in-process upstream behind the layer receives.
pub type Inner = LayerBody<Full<Bytes>>;

/// An in-process upstream answering 200 with an empty body, for paused-time tests.
pub type InProcess = RateLimit<
    tower::util::ServiceFn<
        fn(
            http::Request<Inner>,
        ) -> std::future::Ready<Result<http::Response<Full<Bytes>>, Infallible>>,
    >,
>;

fn ok(
    _req: http::Request<Inner>,
) -> std::future::Ready<Result<http::Response<Full<Bytes>>, Infallible>> {
    std::future::ready(Ok(http::Response::new(Full::new(Bytes::new()))))
}

pub fn in_process(layer: &RateLimitLayer) -> InProcess {
    layer.layer(tower::service_fn(
        ok as fn(_) -> std::future::Ready<Result<http::Response<Full<Bytes>>, Infallible>>,
    ))
}

/// A request from API key `id`.
pub fn keyed(id: &str) -> http::Request<Full<Bytes>> {
    let mut req = http::Request::post("/v1/chat/completions")
        .body(Full::new(Bytes::new()))
        .unwrap();
    req.extensions_mut().insert(KeyIdentity::new(id.to_owned()));
    req
}
