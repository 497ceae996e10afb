//! Helpers for the gateway and composition tests: the example's own router and mock upstream,
//! a scripted upstream stub over real HTTP, and envelope checks from an official SDK's view.
#![allow(dead_code)]

#[path = "../../examples/gateway/app.rs"]
pub mod app;
#[path = "../../examples/gateway/mock.rs"]
pub mod mock;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Router;
use llm_layers::stack::Stack;
use serde_json::Value;

/// A key with every model and no limits of its own.
pub const FULL: &str = "sk-test-full-0123456789abcdef";
/// A second key, for per-key limits.
pub const OTHER: &str = "sk-test-other-0123456789abcd";

/// Serves a router on 127.0.0.1 (any free port).
pub async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// What the stub saw of one call.
pub struct Call<'a> {
    /// 0 for the first call the stub received.
    pub index: u64,
    /// The path, e.g. `/v1/chat/completions`.
    pub path: &'a str,
    /// The request headers.
    pub headers: &'a HeaderMap,
    /// The parsed JSON body (`Null` when none).
    pub json: &'a Value,
}

type Script = Arc<dyn Fn(Call<'_>) -> Response + Send + Sync>;

/// A scripted upstream: every call goes to the script, and calls are counted.
#[derive(Clone)]
pub struct Stub {
    pub addr: SocketAddr,
    calls: Arc<AtomicU64>,
}

impl Stub {
    /// Starts a stub whose answers the script decides.
    pub async fn start(script: impl Fn(Call<'_>) -> Response + Send + Sync + 'static) -> Stub {
        let calls = Arc::new(AtomicU64::new(0));
        let state = (calls.clone(), Arc::new(script) as Script);
        let app = Router::new()
            .fallback(
                |State((calls, script)): State<(Arc<AtomicU64>, Script)>, req: Request| async move {
                    let index = calls.fetch_add(1, Ordering::SeqCst);
                    let (parts, body) = req.into_parts();
                    let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
                    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                    script(Call {
                        index,
                        path: parts.uri.path(),
                        headers: &parts.headers,
                        json: &json,
                    })
                },
            )
            .with_state(state);
        Stub {
            addr: serve(app).await,
            calls,
        }
    }

    /// The base URL to give the gateway.
    pub fn base(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// How many calls reached the stub.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
}

/// A response with a status, a content type and a body.
pub fn answer(status: u16, content_type: &str, body: impl Into<Body>) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(body.into())
        .unwrap()
}

/// A chat completion answering with the request's model.
pub fn completion(json: &Value) -> Response {
    let body = serde_json::json!({
        "id": "chatcmpl-stub", "object": "chat.completion", "model": json["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    });
    answer(200, "application/json", body.to_string())
}

/// Builds the gateway from a TOML configuration, in front of `upstream`, and serves it.
pub async fn gateway(config: &str, upstream: &str) -> (SocketAddr, Stack) {
    let stack = Stack::from_toml_str(config).unwrap_or_else(|e| panic!("config: {e}"));
    let app = app::router(
        &stack,
        app::upstream(&stack, upstream.parse().unwrap(), None),
    );
    (serve(app).await, stack)
}

/// What a client got.
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: bytes::Bytes,
}

impl Got {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// The envelope's `error.code`.
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    /// A header as a string.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

/// POSTs a chat request with a key and extra headers.
pub async fn chat(
    client: &reqwest::Client,
    addr: SocketAddr,
    key: &str,
    body: &Value,
    extra: &[(&str, &str)],
) -> Got {
    let mut req = client
        .post(format!("http://{addr}/v1/chat/completions"))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(body.to_string());
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let res = req.send().await.expect("the gateway answers");
    Got {
        status: res.status(),
        headers: res.headers().clone(),
        body: res.bytes().await.unwrap(),
    }
}

/// GETs a path with an optional key.
pub async fn get(client: &reqwest::Client, addr: SocketAddr, path: &str, key: Option<&str>) -> Got {
    let mut req = client.get(format!("http://{addr}{path}"));
    if let Some(key) = key {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    let res = req.send().await.expect("the gateway answers");
    Got {
        status: res.status(),
        headers: res.headers().clone(),
        body: res.bytes().await.unwrap(),
    }
}

/// A small chat request.
pub fn hello(model: &str) -> Value {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
}

/// Checks what an official SDK relies on: a JSON envelope with a string `message`, `type`
/// and `code`, a `param` key, the status matching the code's class, `x-should-retry`, and a
/// positive whole-second `retry-after` with `retry-after-ms` whenever a wait is given.
pub fn assert_envelope(got: &Got) {
    assert!(
        got.status.is_client_error() || got.status.is_server_error(),
        "{got:?}"
    );
    assert!(
        got.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{got:?}"
    );
    let json = got.json();
    let err = &json["error"];
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{json}"
    );
    assert!(err["type"].as_str().is_some(), "{json}");
    assert!(err["code"].as_str().is_some(), "{json}");
    assert!(err.as_object().unwrap().contains_key("param"), "{json}");
    let retry = got.header("x-should-retry");
    assert!(matches!(retry, Some("true" | "false")), "{got:?}");
    if let Some(secs) = got.header("retry-after") {
        let secs: u64 = secs.parse().expect("retry-after in whole seconds");
        assert!(secs >= 1, "{got:?}");
        let ms: u64 = got
            .header("retry-after-ms")
            .expect("retry-after-ms with retry-after")
            .parse()
            .unwrap();
        assert!(ms <= secs * 1000, "{got:?}");
    }
}
