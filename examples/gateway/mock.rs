//! An OpenAI-compatible mock upstream with fault injection, so the gateway runs with no
//! account and no network: `x-mock-fault: 429|500|503|529|html403|timeout|reset|stream-cut|stream-error`,
//! or `flaky` (503 twice for the same `x-request-id`, then an answer).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Request, Response, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::{json, Value};
use tower::ServiceExt;

/// Starts the mock on 127.0.0.1 (any free port) and returns its address.
pub async fn start() -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = router();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                continue;
            };
            let app = app.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let app = app.clone();
                    async move {
                        // `reset` closes the connection without an answer.
                        if fault(req.headers()).as_deref() == Some("reset") {
                            return Err(std::io::Error::other("mock reset"));
                        }
                        Ok::<_, std::io::Error>(
                            app.oneshot(req.map(Body::new))
                                .await
                                .unwrap_or_else(|e: Infallible| match e {}),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn fault(headers: &HeaderMap) -> Option<String> {
    headers
        .get("x-mock-fault")
        .and_then(|v| v.to_str().ok())
        .map(str::to_ascii_lowercase)
}

fn router() -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completion))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
}

fn json_response(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-request-id", "req_mock")
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// The answer for an injected fault, if any (`stream-*` faults are handled by the stream).
async fn injected(headers: &HeaderMap) -> Option<Response<Body>> {
    let fault = fault(headers)?;
    if fault == "flaky" {
        static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
        let id = headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let mut seen = SEEN.lock().unwrap();
        if seen.len() > 10_000 {
            seen.clear();
        }
        let tries = seen.iter().filter(|s| **s == id).count();
        if tries >= 2 {
            return None;
        }
        seen.push(id);
        return Some(json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error":{"message":"The engine is currently overloaded, please try again later","type":"server_error","param":null,"code":null}}),
        ));
    }
    Some(match fault.as_str() {
        "429" => Response::builder()
            .status(429)
            .header("content-type", "application/json")
            .header("retry-after-ms", "1500")
            .header("x-ratelimit-remaining-requests", "0")
            .body(Body::from(
                json!({"error":{"message":"Rate limit reached for gpt-4o-mini on requests per min (RPM): Limit 3, Used 3, Requested 1. Please try again in 1.5s.","type":"requests","param":null,"code":"rate_limit_exceeded"}}).to_string(),
            ))
            .unwrap(),
        "500" => json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error":{"message":"The server had an error while processing your request.","type":"server_error","param":null,"code":null}}),
        ),
        "503" => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error":{"message":"The engine is currently overloaded, please try again later","type":"server_error","param":null,"code":null}}),
        ),
        "529" => json_response(
            StatusCode::from_u16(529).unwrap(),
            json!({"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}),
        ),
        "html403" => Response::builder()
            .status(403)
            .header("content-type", "text/html; charset=UTF-8")
            .body(Body::from(
                "<!DOCTYPE html>\n<html lang=\"en-US\"><head><title>Attention Required! | Cloudflare</title></head>\
                 <body><h1>Sorry, you have been blocked</h1><p>You are unable to access api.example.com</p></body></html>\n",
            ))
            .unwrap(),
        "timeout" => {
            tokio::time::sleep(Duration::from_secs(600)).await;
            json_response(StatusCode::OK, json!({}))
        }
        _ => return None,
    })
}

fn words(prompt_tokens: u64) -> (String, Value) {
    let text = "Hello! This answer comes from the mock upstream.".to_owned();
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": 10, "total_tokens": prompt_tokens + 10});
    (text, usage)
}

async fn chat(headers: HeaderMap, Json(body): Json<Value>) -> Response<Body> {
    if let Some(res) = injected(&headers).await {
        return res;
    }
    let model = body["model"].as_str().unwrap_or("gpt-4o-mini").to_owned();
    let prompt_tokens = body["messages"]
        .as_array()
        .map_or(1, |m| 8 * m.len() as u64);
    let (text, usage) = words(prompt_tokens);
    if body["stream"].as_bool() == Some(true) {
        return stream(model, text, usage, fault(&headers));
    }
    json_response(
        StatusCode::OK,
        json!({
            "id": "chatcmpl-mock", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": usage,
        }),
    )
}

fn stream(model: String, text: String, usage: Value, fault: Option<String>) -> Response<Body> {
    let mut events: Vec<Result<Bytes, std::io::Error>> = Vec::new();
    for word in text.split_inclusive(' ') {
        let chunk = json!({"id":"chatcmpl-mock","object":"chat.completion.chunk","model":model,
            "choices":[{"index":0,"delta":{"content":word},"finish_reason":null}]});
        events.push(Ok(Bytes::from(format!("data: {chunk}\n\n"))));
    }
    match fault.as_deref() {
        Some("stream-cut") => {
            events.truncate(3);
            events.push(Err(std::io::Error::other("mock stream cut")));
        }
        Some("stream-error") => {
            events.truncate(3);
            events.push(Ok(Bytes::from(
                "data: {\"error\":{\"message\":\"The server had an error while processing your request.\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\n",
            )));
        }
        _ => {
            let last = json!({"id":"chatcmpl-mock","object":"chat.completion.chunk","model":model,"choices":[],"usage":usage});
            events.push(Ok(Bytes::from(format!("data: {last}\n\n"))));
            events.push(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
        }
    }
    let stream = futures_util::stream::iter(events).then(|e| async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        e
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(stream))
        .unwrap()
}

async fn completion(headers: HeaderMap, Json(body): Json<Value>) -> Response<Body> {
    if let Some(res) = injected(&headers).await {
        return res;
    }
    let (text, usage) = words(8);
    json_response(
        StatusCode::OK,
        json!({"id":"cmpl-mock","object":"text_completion","model":body["model"],
               "choices":[{"index":0,"text":text,"finish_reason":"stop"}],"usage":usage}),
    )
}

async fn embeddings(headers: HeaderMap, Json(body): Json<Value>) -> Response<Body> {
    if let Some(res) = injected(&headers).await {
        return res;
    }
    json_response(
        StatusCode::OK,
        json!({"object":"list","model":body["model"],
               "data":[{"object":"embedding","index":0,"embedding":[0.1,0.2,0.3]}],
               "usage":{"prompt_tokens":8,"total_tokens":8}}),
    )
}

async fn models() -> Response<Body> {
    json_response(
        StatusCode::OK,
        json!({"object":"list","data":[
            {"id":"gpt-4o","object":"model","owned_by":"mock"},
            {"id":"gpt-4o-mini","object":"model","owned_by":"mock"},
            {"id":"text-embedding-3-small","object":"model","owned_by":"mock"}]}),
    )
}

use futures_util::StreamExt as _;
