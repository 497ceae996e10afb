//! A scripted upstream on a real socket for the reqwest-middleware tests.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Response, StatusCode};
use tokio::sync::mpsc;

/// One scripted answer.
#[derive(Clone, Debug)]
pub struct Answer {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
    delay: Option<Duration>,
}

impl Answer {
    /// `status` with a JSON body.
    pub fn json(status: u16, body: &str) -> Answer {
        Answer {
            status,
            headers: vec![("content-type", "application/json".to_owned())],
            body: body.to_owned(),
            delay: None,
        }
    }

    /// `200` with a small completion.
    pub fn ok() -> Answer {
        Answer::json(200, r#"{"id":"chatcmpl-1","choices":[]}"#)
    }

    /// `503` in OpenAI's overload format.
    pub fn overloaded() -> Answer {
        Answer::json(
            503,
            r#"{"error":{"message":"The engine is currently overloaded, please try again later","type":"server_error","param":null,"code":null}}"#,
        )
    }

    /// A Cloudflare block page.
    pub fn html_403() -> Answer {
        Answer {
            status: 403,
            headers: vec![("content-type", "text/html; charset=UTF-8".to_owned())],
            body: "<!DOCTYPE html>\n<html lang=\"en-US\"><head><title>Attention Required! | Cloudflare</title></head><body><h1>Sorry, you have been blocked</h1></body></html>\n".to_owned(),
            delay: None,
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: &'static str, value: &str) -> Answer {
        self.headers.push((name, value.to_owned()));
        self
    }

    /// Answers only after `delay` (real time).
    pub fn after(mut self, delay: Duration) -> Answer {
        self.delay = Some(delay);
        self
    }
}

#[derive(Default)]
struct State {
    script: Mutex<VecDeque<Answer>>,
    last: Mutex<Option<Answer>>,
    calls: AtomicUsize,
    keys: Mutex<Vec<Option<String>>>,
    headers: Mutex<Vec<HeaderMap>>,
    bodies: Mutex<Vec<Bytes>>,
    stream: Mutex<Option<mpsc::UnboundedReceiver<Bytes>>>,
}

/// The upstream: answers its script in order (the last answer repeats) on every path but
/// `/stream`, which streams the chunks pushed by the test.
#[derive(Clone)]
pub struct Stub {
    addr: SocketAddr,
    state: Arc<State>,
}

impl Stub {
    /// Starts an upstream on `127.0.0.1:0` with the given script.
    pub async fn start(script: Vec<Answer>) -> Stub {
        let state = Arc::new(State::default());
        *state.script.lock().unwrap() = script.into();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let st = state.clone();
        let app = axum::Router::new()
            .route(
                "/stream",
                axum::routing::post({
                    let st = st.clone();
                    move || stream(st.clone())
                }),
            )
            .fallback(move |headers: HeaderMap, body: Bytes| answer(st.clone(), headers, body));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Stub { addr, state }
    }

    /// The URL of `path` on the upstream.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The URL of `path` on the upstream, reached through `host` (`localhost` is another
    /// origin than `127.0.0.1`).
    pub fn url_on(&self, host: &str, path: &str) -> String {
        format!("http://{host}:{}{path}", self.addr.port())
    }

    /// How many requests reached the upstream.
    pub fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// The `authorization` header of each request, in order.
    pub fn keys(&self) -> Vec<Option<String>> {
        self.state.keys.lock().unwrap().clone()
    }

    /// The headers of each request, in order.
    pub fn headers(&self) -> Vec<HeaderMap> {
        self.state.headers.lock().unwrap().clone()
    }

    /// The body of each request, in order.
    pub fn bodies(&self) -> Vec<Bytes> {
        self.state.bodies.lock().unwrap().clone()
    }

    /// A sender for the chunks of the next `/stream` answer.
    pub fn stream_chunks(&self) -> mpsc::UnboundedSender<Bytes> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.state.stream.lock().unwrap() = Some(rx);
        tx
    }
}

async fn answer(state: Arc<State>, headers: HeaderMap, body: Bytes) -> Response<Body> {
    state.calls.fetch_add(1, Ordering::SeqCst);
    state.keys.lock().unwrap().push(
        headers
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned()),
    );
    state.headers.lock().unwrap().push(headers);
    state.bodies.lock().unwrap().push(body);
    let next = {
        let mut script = state.script.lock().unwrap();
        let mut last = state.last.lock().unwrap();
        if let Some(a) = script.pop_front() {
            *last = Some(a);
        }
        last.clone().unwrap_or_else(Answer::ok)
    };
    if let Some(d) = next.delay {
        tokio::time::sleep(d).await;
    }
    let mut res = Response::builder().status(StatusCode::from_u16(next.status).unwrap());
    for (name, value) in &next.headers {
        res = res.header(*name, value);
    }
    res.body(Body::from(next.body)).unwrap()
}

async fn stream(state: Arc<State>) -> Response<Body> {
    state.calls.fetch_add(1, Ordering::SeqCst);
    let rx = state.stream.lock().unwrap().take().expect("chunks set up");
    let chunks = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(chunks))
        .unwrap()
}

/// A local address nothing listens on.
pub async fn refused_addr() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    addr
}
