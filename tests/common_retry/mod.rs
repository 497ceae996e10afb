//! Test helpers for the retry layer: a scripted upstream stub on a real socket, a gateway
//! around it, and an in-process upstream that records when each attempt arrived.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use llm_layers::body::LayerBody;
use llm_layers::retry::RetryLayer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tower::{Service, ServiceBuilder, ServiceExt};

/// What the stub does with one request.
#[derive(Clone, Debug)]
pub enum Action {
    /// Answer with this status, headers and body.
    Reply(u16, Vec<(&'static str, &'static str)>, &'static str),
    /// Close the socket without answering.
    Close,
    /// Wait (real time), then answer 200.
    Slow(Duration),
}

/// One request as the stub received it.
#[derive(Clone, Debug)]
pub struct Received {
    pub head: String,
    pub body: Vec<u8>,
}

/// A raw HTTP/1.1 upstream on 127.0.0.1:0 that plays a script, one action per request, then
/// answers 200 `{"ok":true}`.
#[derive(Clone)]
pub struct Stub {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Received>>>,
}

impl Stub {
    pub async fn start(script: Vec<Action>) -> Stub {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        let rec = received.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let rec = rec.clone();
                let script = script.clone();
                tokio::spawn(async move {
                    let Some(req) = read_request(&mut sock).await else {
                        return;
                    };
                    rec.lock().unwrap().push(req);
                    let action = script.lock().unwrap().pop_front();
                    let (status, headers, body) = match action {
                        None => (
                            200,
                            vec![("content-type", "application/json")],
                            "{\"ok\":true}",
                        ),
                        Some(Action::Reply(s, h, b)) => (s, h, b),
                        Some(Action::Close) => {
                            drop(sock);
                            return;
                        }
                        Some(Action::Slow(d)) => {
                            tokio::time::sleep(d).await;
                            (200, vec![], "{\"slow\":true}")
                        }
                    };
                    let mut out = format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n",
                        body.len()
                    );
                    for (k, v) in headers {
                        out.push_str(&format!("{k}: {v}\r\n"));
                    }
                    out.push_str("\r\n");
                    out.push_str(body);
                    let _ = sock.write_all(out.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        Stub { addr, received }
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    pub fn bodies(&self) -> Vec<Vec<u8>> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.body.clone())
            .collect()
    }
}

async fn read_request(sock: &mut tokio::net::TcpStream) -> Option<Received> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(Received {
        head,
        body: buf[head_end..].to_vec(),
    })
}

/// The upstream client a gateway uses: hyper-util over plain HTTP, bodies as axum's `Body`.
pub fn upstream_client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An axum gateway on 127.0.0.1:0 forwarding every request to `upstream` through the retry
/// layer wrapped around the hyper-util client.
pub async fn gateway(upstream: SocketAddr, layer: RetryLayer) -> SocketAddr {
    let svc = ServiceBuilder::new()
        .map_response(|res: Response<LayerBody<Body>>| res.map(Body::new))
        .layer(layer)
        .map_request(|req: Request<LayerBody<Body>>| req.map(Body::new))
        .map_response(|res: Response<hyper::body::Incoming>| res.map(Body::new))
        .service(upstream_client());
    serve_proxy(upstream, svc).await
}

/// [`gateway`] with the error normalizer between the retry layer and the upstream, as the
/// recommended order has it.
pub async fn gateway_normalized(upstream: SocketAddr, layer: RetryLayer) -> SocketAddr {
    let svc = ServiceBuilder::new()
        .map_response(|res: Response<LayerBody<Body>>| res.map(Body::new))
        .layer(layer)
        .map_request(|req: Request<LayerBody<Body>>| req.map(Body::new))
        .map_response(|res: Response<_>| res.map(Body::new))
        .layer(llm_layers::normalize::NormalizeErrorsLayer::new())
        .service(upstream_client());
    serve_proxy(upstream, svc).await
}

async fn serve_proxy<S, E>(upstream: SocketAddr, svc: S) -> SocketAddr
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = E>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send,
    E: std::fmt::Display + std::fmt::Debug + Send,
{
    let app = axum::Router::new().fallback(move |mut req: Request<Body>| {
        let mut svc = svc.clone();
        async move {
            let path = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            *req.uri_mut() = format!("http://{upstream}{path}").parse().unwrap();
            req.headers_mut().remove(http::header::HOST);
            match svc.ready().await.unwrap().call(req).await {
                Ok(res) => res,
                Err(e) => Response::builder()
                    .status(StatusCode::BAD_GATEWAY)
                    .body(Body::from(format!("transport error: {e}")))
                    .unwrap(),
            }
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// An in-process upstream answering from a script of responses and recording the (paused)
/// instant each attempt arrived and its body.
#[derive(Clone, Default)]
pub struct Recorder {
    pub arrivals: Arc<Mutex<Vec<tokio::time::Instant>>>,
    pub bodies: Arc<Mutex<Vec<Bytes>>>,
    pub heads: Arc<Mutex<Vec<http::request::Parts>>>,
}

impl Recorder {
    pub fn count(&self) -> usize {
        self.arrivals.lock().unwrap().len()
    }

    pub fn gaps(&self) -> Vec<Duration> {
        let a = self.arrivals.lock().unwrap();
        a.windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// The value of header `name` on each attempt, in order.
    pub fn header_values(&self, name: &str) -> Vec<Option<String>> {
        self.heads
            .lock()
            .unwrap()
            .iter()
            .map(|p| p.headers.get(name).map(|v| v.to_str().unwrap().to_owned()))
            .collect()
    }
}

pub type ScriptFn = Arc<dyn Fn(usize) -> Result<Response<Body>, std::io::Error> + Send + Sync>;

/// A `service_fn` upstream: attempt `n` (0-based) is answered by `script(n)`. Takes any
/// request body (the retry layer hands on `LayerBody<B>`).
pub fn scripted<B>(
    rec: Recorder,
    script: ScriptFn,
) -> impl Service<Request<B>, Response = Response<Body>, Error = std::io::Error, Future = impl Send>
       + Clone
       + Send
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tower::service_fn(move |req: Request<B>| {
        let rec = rec.clone();
        let script = script.clone();
        async move {
            let n = {
                let mut a = rec.arrivals.lock().unwrap();
                a.push(tokio::time::Instant::now());
                a.len() - 1
            };
            let (parts, body) = req.into_parts();
            rec.heads.lock().unwrap().push(parts);
            let body = http_body_util::BodyExt::collect(body)
                .await
                .map_err(|e| std::io::Error::other(e.into()))?
                .to_bytes();
            rec.bodies.lock().unwrap().push(body);
            script(n)
        }
    })
}

pub fn status(code: u16) -> Response<Body> {
    Response::builder()
        .status(code)
        .body(Body::from("{}"))
        .unwrap()
}

pub fn with_header(mut res: Response<Body>, k: &'static str, v: &'static str) -> Response<Body> {
    res.headers_mut().insert(k, v.parse().unwrap());
    res
}

pub fn infallible<T>(t: T) -> Result<T, Infallible> {
    Ok(t)
}
