//! Test support for the breaker: a scripted in-process upstream and a real HTTP stub.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::Notify;

/// What the scripted upstream does for one call.
#[derive(Debug, Clone)]

pub enum Answer {
    /// Answer at once with this status.
    Status(u16),
    /// Wait (on tokio's clock), then answer with this status.
    After(Duration, u16),
    /// Wait until [`Upstream::release`] is called, then answer 200.
    Gate,
    /// Never answer.
    Hang,
    /// Fail with a transport error (`Err` from the service).
    Refused,
}

#[derive(Default)]
struct State {
    script: VecDeque<Answer>,
    default: Option<Answer>,
    bodies: Vec<Bytes>,
    times: Vec<tokio::time::Instant>,
}

/// An in-process upstream that counts its calls, records the bodies it saw and the time of
/// each call (tokio's clock), and answers from a script.
#[derive(Clone, Default)]
pub struct Upstream {
    calls: Arc<AtomicUsize>,
    state: Arc<Mutex<State>>,
    gate: Arc<Notify>,
}

impl Upstream {
    /// An upstream that answers `default` whenever the script is empty.
    pub fn new(default: Answer) -> Self {
        let u = Upstream::default();
        u.state.lock().unwrap().default = Some(default);
        u
    }

    /// Queues answers for the next calls.
    pub fn script(&self, answers: impl IntoIterator<Item = Answer>) {
        self.state.lock().unwrap().script.extend(answers);
    }

    /// Forgets the queued answers.
    pub fn clear_script(&self) {
        self.state.lock().unwrap().script.clear();
    }

    /// Changes the answer used when the script is empty.
    pub fn set_default(&self, a: Answer) {
        self.state.lock().unwrap().default = Some(a);
    }

    /// Calls received so far.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// The bodies received, in order.
    pub fn bodies(&self) -> Vec<Bytes> {
        self.state.lock().unwrap().bodies.clone()
    }

    /// When each call arrived.
    pub fn times(&self) -> Vec<tokio::time::Instant> {
        self.state.lock().unwrap().times.clone()
    }

    /// Lets every gated call answer.
    pub fn release(&self) {
        self.gate.notify_waiters();
    }

    /// The upstream as a tower service, for any request body.
    pub fn service<B>(
        &self,
    ) -> impl tower::Service<
        Request<B>,
        Response = Response<Body>,
        Error = std::io::Error,
        Future = UpstreamFuture,
    > + Clone
           + Send
           + 'static
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: std::fmt::Debug,
    {
        let this = self.clone();
        tower::service_fn(move |req: Request<B>| {
            let this = this.clone();
            let fut: Pin<Box<dyn Future<Output = _> + Send>> = Box::pin(async move {
                // Register for the gate before anything else can release it.
                let gate = this.gate.clone();
                let notified = gate.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let answer = {
                    let mut st = this.state.lock().unwrap();
                    st.bodies.push(body);
                    st.times.push(tokio::time::Instant::now());
                    let a = st.script.pop_front().or_else(|| st.default.clone());
                    a.unwrap_or(Answer::Status(200))
                };
                this.calls.fetch_add(1, Ordering::SeqCst);
                let status = match answer {
                    Answer::Status(s) => s,
                    Answer::After(d, s) => {
                        tokio::time::sleep(d).await;
                        s
                    }
                    Answer::Gate => {
                        notified.await;
                        200
                    }
                    Answer::Hang => std::future::pending().await,
                    Answer::Refused => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::ConnectionRefused,
                            "connection refused",
                        ))
                    }
                };
                let mut res = Response::new(Body::from(format!("{{\"status\":{status}}}")));
                *res.status_mut() = StatusCode::from_u16(status).unwrap();
                Ok(res)
            });
            fut
        })
    }
}

/// A chat request for `model`.
pub fn chat(model: &str) -> Request<Body> {
    Request::post("http://api.example.test/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(format!(
            r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#
        )))
        .unwrap()
}

/// Reads a response body as JSON.
pub async fn json(res: Response<Body>) -> serde_json::Value {
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

/// A real HTTP stub upstream: answers statuses from a script (default 200), records the
/// bodies it received.
#[derive(Clone, Default)]
pub struct Stub {
    pub calls: Arc<AtomicUsize>,
    pub bodies: Arc<Mutex<Vec<serde_json::Value>>>,
    pub statuses: Arc<Mutex<VecDeque<u16>>>,
    pub default_status: Arc<Mutex<u16>>,
}

impl Stub {
    /// Starts the stub on 127.0.0.1:0 and returns its base URL.
    pub async fn start(default_status: u16) -> (Stub, String) {
        let stub = Stub {
            default_status: Arc::new(Mutex::new(default_status)),
            ..Stub::default()
        };
        let s = stub.clone();
        let app = axum::Router::new().route(
            "/v1/chat/completions",
            axum::routing::post(move |body: Bytes| {
                let s = s.clone();
                async move {
                    s.calls.fetch_add(1, Ordering::SeqCst);
                    let v: serde_json::Value =
                        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                    let model = v["model"].as_str().unwrap_or("").to_owned();
                    s.bodies.lock().unwrap().push(v);
                    let status = s
                        .statuses
                        .lock()
                        .unwrap()
                        .pop_front()
                        .unwrap_or(*s.default_status.lock().unwrap());
                    (
                        StatusCode::from_u16(status).unwrap(),
                        [("content-type", "application/json")],
                        format!(r#"{{"model":"{model}","status":{status}}}"#),
                    )
                }
            }),
        );
        let url = serve(app).await;
        (stub, url)
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn set_status(&self, s: u16) {
        *self.default_status.lock().unwrap() = s;
    }
}

/// Serves `app` on 127.0.0.1:0; returns `http://127.0.0.1:port`.
pub async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    format!("http://{addr}")
}

/// A gateway route that forwards the body to `upstream` with reqwest and answers with the
/// upstream's status, headers' content type and body.
pub fn proxy_router(upstream: String) -> axum::Router {
    let client = reqwest::Client::new();
    axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move |body: Bytes| {
            let client = client.clone();
            let url = format!("{upstream}/v1/chat/completions");
            async move {
                match client
                    .post(url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                {
                    Ok(r) => {
                        let status = StatusCode::from_u16(r.status().as_u16()).unwrap();
                        let bytes = r.bytes().await.unwrap_or_default();
                        (status, [("content-type", "application/json")], bytes)
                    }
                    Err(_) => (
                        StatusCode::BAD_GATEWAY,
                        [("content-type", "application/json")],
                        Bytes::from_static(b"{}"),
                    ),
                }
            }
        }),
    )
}

/// The future of the scripted upstream service.
pub type UpstreamFuture =
    Pin<Box<dyn Future<Output = Result<Response<Body>, std::io::Error>> + Send>>;

/// Log lines captured from `tracing` (every level down to `debug`), for every test of the
/// binary: a global subscriber, since a thread-local one races with callsite registration by
/// the tests running beside it.
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    /// The capture, installed on first use.
    pub fn capture() -> Logs {
        static LOGS: std::sync::OnceLock<Logs> = std::sync::OnceLock::new();
        LOGS.get_or_init(|| {
            let logs = Logs::default();
            let writer = logs.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::DEBUG)
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::set_global_default(subscriber).unwrap();
            logs
        })
        .clone()
    }

    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A chat request whose JSON body names `model` (escaped as JSON, so any string works), sent
/// to `path`.
pub fn chat_at(path: &str, model: &str) -> Request<Body> {
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
    });
    Request::post(format!("http://api.example.test{path}"))
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}
