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

/// A certificate authority made for one test, and the PEM file of its certificate.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
    /// A PEM file holding the CA's certificate (removed on drop).
    pub pem_file: std::path::PathBuf,
}

impl TestCa {
    /// A new CA named `name`, its certificate written to a temporary PEM file.
    pub fn new(name: &str) -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = params.self_signed(&key).unwrap();
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let pem_file = std::env::temp_dir().join(format!(
            "llm-layers-ca-{}-{}.pem",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::write(&pem_file, cert.pem()).unwrap();
        TestCa {
            cert,
            key,
            pem_file,
        }
    }

    /// A server configuration with a certificate for `localhost` and `127.0.0.1` signed by
    /// this CA.
    pub fn server_config(&self) -> rustls::ServerConfig {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .unwrap()
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.pem_file);
    }
}

/// Serves a router over TLS on 127.0.0.1 (any free port), with a certificate from `ca`.
pub async fn serve_tls(app: Router, ca: &TestCa) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(ca.server_config()));
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                // A client that refuses the certificate ends the handshake here.
                let Ok(tls) = acceptor.accept(sock).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    use tower::ServiceExt;
                    app.clone().oneshot(req.map(Body::new))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

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
        let (app, calls) = Stub::router(script);
        Stub {
            addr: serve(app).await,
            calls,
        }
    }

    /// Starts a stub over TLS, with a certificate for `localhost` and `127.0.0.1` from `ca`.
    pub async fn start_tls(
        ca: &TestCa,
        script: impl Fn(Call<'_>) -> Response + Send + Sync + 'static,
    ) -> Stub {
        let (app, calls) = Stub::router(script);
        Stub {
            addr: serve_tls(app, ca).await,
            calls,
        }
    }

    fn router(
        script: impl Fn(Call<'_>) -> Response + Send + Sync + 'static,
    ) -> (Router, Arc<AtomicU64>) {
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
        (app, calls)
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

/// Headers that choose a stub's answer; [`gateway`] forwards them next to the configured
/// `[gateway] forward_headers`.
pub const SCRIPT_HEADERS: [&str; 2] = ["x-case", "x-mock-fault"];

/// Builds the gateway from a TOML configuration (with its `[gateway]` table), in front of
/// `upstream`, and serves it. The headers of [`SCRIPT_HEADERS`] are forwarded too.
pub async fn gateway(config: &str, upstream: &str) -> (SocketAddr, Stack) {
    gateway_with_key(config, upstream, None).await
}

/// [`gateway`], sending `key` upstream (`Authorization: Bearer <key>`).
pub async fn gateway_with_key(
    config: &str,
    upstream: &str,
    key: Option<&str>,
) -> (SocketAddr, Stack) {
    let (stack, mut gw) = app::load(config).unwrap_or_else(|e| panic!("config: {e}"));
    for name in SCRIPT_HEADERS {
        gw.forward_header("test", name).unwrap();
    }
    let tls = gw.tls().unwrap_or_else(|e| panic!("config: {e}"));
    let key = key.map(|k| axum::http::HeaderValue::try_from(format!("Bearer {k}")).unwrap());
    let upstream = app::upstream_with(
        &stack,
        &gw.forward_headers,
        tls,
        upstream.parse().unwrap(),
        key,
    );
    (serve(app::router(&stack, upstream)).await, stack)
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
