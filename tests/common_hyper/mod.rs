//! Plain hyper 1 servers (no axum) for tests of layers around `Request<Incoming>`: serve any
//! tower service on `127.0.0.1:0` through `hyper_util::service::TowerToHyperService`, an
//! upstream stub that echoes what it was sent, and a hyper-util client.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// The error type served bodies and services may have.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves `svc` (a tower service over `Request<Incoming>`) with a plain hyper server on
/// `127.0.0.1:0`, one clone per connection. Returns the address.
pub async fn serve<S, B>(svc: S) -> SocketAddr
where
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let svc = TowerToHyperService::new(svc.clone());
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// An upstream stub: answers every request `200` with a JSON body that names the method, the
/// path, the `authorization` header it saw and the body it read, and counts requests.
pub struct Echo {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
}

impl Echo {
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

pub async fn echo_upstream() -> Echo {
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let svc = tower::service_fn(move |req: Request<Incoming>| {
        let hits = counted.clone();
        async move {
            hits.fetch_add(1, Ordering::SeqCst);
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            let auth = parts
                .headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let json = serde_json::json!({
                "method": parts.method.as_str(),
                "path": parts.uri.path(),
                "authorization": auth,
                "body": String::from_utf8_lossy(&body),
            });
            Ok::<_, Infallible>(
                Response::builder()
                    .status(StatusCode::OK)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(json.to_string())))
                    .unwrap(),
            )
        }
    });
    let addr = serve(svc).await;
    Echo { addr, hits }
}

/// A hyper-util client for any request body type.
pub fn client<B>() -> Client<HttpConnector, B>
where
    B: Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends `req` with a fresh hyper-util client and returns the status, headers and body.
pub async fn send(req: Request<Full<Bytes>>) -> (StatusCode, http::HeaderMap, Bytes) {
    let res = client::<Full<Bytes>>().request(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (parts.status, parts.headers, body)
}

/// A JSON POST to `url` with `body` and optional bearer key.
pub fn post(url: &str, key: Option<&str>, body: &str) -> Request<Full<Bytes>> {
    let mut b = Request::post(url).header("content-type", "application/json");
    if let Some(key) = key {
        b = b.header("authorization", format!("Bearer {key}"));
    }
    b.body(Full::new(Bytes::from(body.to_owned()))).unwrap()
}

/// The envelope's `error.code`, or `None` when the body is no envelope.
pub fn envelope_code(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v["error"]["code"].as_str().map(str::to_owned)
}

/// A hyper-util client that sends every request to `upstream` (the request's path and query
/// kept): the innermost service of a proxy, for any request body type.
pub fn proxy_to<B>(
    upstream: SocketAddr,
) -> impl tower::Service<
    Request<B>,
    Response = Response<Incoming>,
    Error = hyper_util::client::legacy::Error,
    Future = impl Send,
> + Clone
       + Send
       + 'static
where
    B: Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    use tower::ServiceExt;
    client::<B>().map_request(move |mut req: Request<B>| {
        let pq = req
            .uri()
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_owned();
        *req.uri_mut() = format!("http://{upstream}{pq}").parse().unwrap();
        req
    })
}
