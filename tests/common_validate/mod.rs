//! Helpers for the validation tests: a real axum server with the layer, a reqwest client.

#![allow(dead_code)]

use std::net::SocketAddr;

use axum::Router;
use serde_json::Value;

/// Serves `app` on a random local port and returns its base URL.
pub async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    format!("http://{addr}")
}

/// What came back: status, and the body as JSON (`Value::Null` when not JSON).
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Answer {
    /// The envelope's `error.code`.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
    /// The envelope's `error.param` (None when null or absent).
    pub fn param(&self) -> Option<&str> {
        self.body["error"]["param"].as_str()
    }
    /// The envelope's `error.message`.
    pub fn message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or("")
    }
}

/// POSTs `body` as `application/json` to `base` + `path`.
pub async fn post_json(base: &str, path: &str, body: impl Into<reqwest::Body>) -> Answer {
    post_with(base, path, Some("application/json"), body).await
}

/// POSTs `body` with the given content-type (none when `None`).
pub async fn post_with(
    base: &str,
    path: &str,
    content_type: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> Answer {
    let client = reqwest::Client::new();
    let mut req = client.post(format!("{base}{path}")).body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let text = res.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        body,
        text,
    }
}

/// A chat request body for `model` with one user message.
pub fn chat(model: &str, content: &str) -> String {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": content}]})
        .to_string()
}

/// POSTs `body` as `application/json` to `base` + `path` with a hyper client, which sends the
/// path exactly as written (reqwest, through `url`, would resolve `..` and `%2e` segments).
pub async fn post_raw(base: &str, path: &str, body: impl Into<bytes::Bytes>) -> Answer {
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let client: Client<_, Full<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let uri: http::Uri = format!("{base}{path}").parse().unwrap();
    assert_eq!(uri.path(), path, "the client must send the path as written");
    let req = http::Request::post(uri)
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .unwrap();
    let res = client.request(req).await.unwrap();
    let status = res.status().as_u16();
    let mut headers = reqwest::header::HeaderMap::new();
    for (k, v) in res.headers() {
        headers.append(k.clone(), v.clone());
    }
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        body,
        text,
    }
}
