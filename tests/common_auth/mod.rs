//! Helpers for the auth tests: key fixtures, an echoing upstream, a real server, log capture.
#![allow(dead_code)]

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{to_bytes, Body};
use axum::Router;
use http::Request;
use llm_layers::auth::{AuthenticatedKey, InMemoryKeyStore, KeyRecord};
use llm_layers::ext::{KeyIdentity, KeyLimits};
use serde_json::{json, Value};
use tracing_subscriber::fmt::MakeWriter;

pub const ACTIVE: &str = "sk-active-0123456789abcdefghijWXYZ";
pub const ROTATE_OLD: &str = "sk-rotate-old-0123456789abcdefgh";
pub const ROTATE_NEW: &str = "sk-rotate-new-0123456789abcdefgh";
pub const EXPIRING: &str = "sk-expiring-0123456789abcdefghij";
pub const REVOKED: &str = "sk-revoked-0123456789abcdefghijk";
pub const MINI: &str = "sk-mini-0123456789abcdefghijklmn";
pub const UNKNOWN: &str = "sk-unknown-0123456789abcdefgQRST";

/// When [`EXPIRING`] expires: 2026-01-01T00:00:00Z.
pub const EXPIRY_SECS: u64 = 1_767_225_600;

pub fn store() -> InMemoryKeyStore {
    InMemoryKeyStore::new([
        KeyRecord::builder("active")
            .secret(ACTIVE)
            .tier("pro")
            .limits(
                KeyLimits::new()
                    .requests_per_minute(60)
                    .tokens_per_minute(10_000)
                    .concurrency(3),
            )
            .label("team", "search")
            .build()
            .unwrap(),
        KeyRecord::builder("rotating")
            .secret(ROTATE_OLD)
            .build()
            .unwrap(),
        KeyRecord::builder("rotating")
            .sha256(llm_layers::auth::KeyHash::of(ROTATE_NEW.as_bytes()))
            .build()
            .unwrap(),
        KeyRecord::builder("expiring")
            .secret(EXPIRING)
            .expires_at(UNIX_EPOCH + Duration::from_secs(EXPIRY_SECS))
            .build()
            .unwrap(),
        KeyRecord::builder("revoked")
            .secret(REVOKED)
            .revoked(true)
            .build()
            .unwrap(),
        KeyRecord::builder("mini")
            .secret(MINI)
            .allow_model("gpt-4o-mini*")
            .allow_model("text-embedding-3-small")
            .tier("free")
            .build()
            .unwrap(),
    ])
    .unwrap()
}

/// A clock the test moves, in unix seconds.
#[derive(Clone)]
pub struct TestClock(pub Arc<AtomicU64>);

impl TestClock {
    pub fn at(secs: u64) -> Self {
        TestClock(Arc::new(AtomicU64::new(secs)))
    }

    pub fn set(&self, secs: u64) {
        self.0.store(secs, Ordering::SeqCst);
    }

    pub fn now_fn(&self) -> impl Fn() -> SystemTime + Send + Sync + 'static {
        let secs = Arc::clone(&self.0);
        move || UNIX_EPOCH + Duration::from_secs(secs.load(Ordering::SeqCst))
    }
}

/// The upstream stand-in: answers with what it saw (identity, credential headers, body).
pub async fn echo(req: Request<Body>) -> axum::Json<Value> {
    let identity = req.extensions().get::<KeyIdentity>().cloned();
    let record = req.extensions().get::<AuthenticatedKey>().cloned();
    let headers = {
        let header = |name: &str| {
            req.headers()
                .get_all(name)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect::<Vec<_>>()
        };
        json!({
            "authorization": header("authorization"),
            "x-api-key": header("x-api-key"),
            "api-key": header("api-key"),
        })
    };
    let body = to_bytes(req.into_body(), usize::MAX).await.unwrap();
    axum::Json(json!({
        "id": identity.as_ref().map(|i| i.id().to_owned()),
        "tier": identity.as_ref().and_then(|i| i.tier().map(str::to_owned)),
        "rpm": identity.as_ref().and_then(|i| i.limits().rpm()),
        "tpm": identity.as_ref().and_then(|i| i.limits().tpm()),
        "concurrency": identity.as_ref().and_then(|i| i.limits().max_concurrency()),
        "record_id": record.as_ref().map(|r| r.id().to_owned()),
        "labels": record.as_ref().map(|r| r.labels().clone()),
        "headers": headers,
        "body_len": body.len(),
        "body": String::from_utf8_lossy(&body),
    }))
}

/// Serves `app` on 127.0.0.1 and returns its base URL.
pub async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    format!("http://{addr}")
}

pub fn chat(model: &str) -> String {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}).to_string()
}

/// Checks a rejection's status, code and envelope headers, and returns its message.
pub async fn rejection(
    res: reqwest::Response,
    status: u16,
    code: &str,
) -> (String, Option<String>) {
    assert_eq!(res.status().as_u16(), status);
    assert_eq!(res.headers()["content-type"], "application/json");
    assert_eq!(
        res.headers()["x-should-retry"],
        "false",
        "every rejection tells clients not to retry"
    );
    let challenge = res
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
    (
        body["error"]["message"].as_str().unwrap().to_owned(),
        challenge,
    )
}

/// A `MakeWriter` that keeps everything written to it.
#[derive(Clone, Default)]
pub struct Capture(pub Arc<Mutex<Vec<u8>>>);

impl Capture {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

pub struct CaptureWriter(Arc<Mutex<Vec<u8>>>);

impl io::Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Capture {
    type Writer = CaptureWriter;

    fn make_writer(&'a self) -> CaptureWriter {
        CaptureWriter(Arc::clone(&self.0))
    }
}

/// POSTs `body` to `base` + `path` with `Authorization: Bearer {key}` through a hyper client,
/// which sends the path exactly as written (reqwest resolves `..` and `%2e` segments first).
/// Returns the status and the body as JSON (`Value::Null` when not JSON).
pub async fn post_raw(base: &str, path: &str, key: &str, body: String) -> (u16, Value) {
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let client: Client<_, Full<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let uri: http::Uri = format!("{base}{path}").parse().unwrap();
    assert_eq!(uri.path(), path, "the client must send the path as written");
    let req = Request::post(uri)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let res = client.request(req).await.unwrap();
    let status = res.status().as_u16();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}
