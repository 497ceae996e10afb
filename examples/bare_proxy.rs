//! A bare axum reverse proxy: no layers, the same hyper-util client (and connector) as the
//! example gateway. It is the baseline of the load bench (`cargo bench --bench load`), which
//! compares the gateway's throughput and latency with it.
//!
//! ```sh
//! cargo run --release --example bare_proxy -- --listen 127.0.0.1:8081 --upstream http://127.0.0.1:9000
//! ```
//!
//! Every request is sent to `{upstream}{path}?{query}` with its method, headers and body;
//! the answer comes back as it is. It prints `listening on http://ADDR` once it listens.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::uri::{Authority, PathAndQuery, Scheme};
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

/// Where requests go and the client that sends them.
struct Proxy {
    client: Client<HttpsConnector<HttpConnector>, Body>,
    scheme: Scheme,
    authority: Authority,
}

async fn forward(State(proxy): State<Arc<Proxy>>, mut req: Request) -> Response {
    let mut uri = axum::http::uri::Parts::default();
    uri.scheme = Some(proxy.scheme.clone());
    uri.authority = Some(proxy.authority.clone());
    uri.path_and_query = req
        .uri()
        .path_and_query()
        .cloned()
        .or_else(|| Some(PathAndQuery::from_static("/")));
    *req.uri_mut() = Uri::from_parts(uri).expect("a valid upstream URI");
    req.headers_mut().remove(header::HOST);
    match proxy.client.request(req).await {
        Ok(res) => res.map(Body::new),
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

fn fail(message: impl std::fmt::Display) -> ! {
    eprintln!("bare_proxy: {message}");
    std::process::exit(2);
}

#[tokio::main]
async fn main() {
    let mut listen: SocketAddr = "127.0.0.1:8081".parse().unwrap();
    let mut upstream: Option<Uri> = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| fail(format_args!("{flag} needs a value")));
        match flag.as_str() {
            "--listen" => listen = value.parse().unwrap_or_else(|e| fail(e)),
            "--upstream" => upstream = Some(value.parse().unwrap_or_else(|e| fail(e))),
            other => fail(format_args!(
                "unknown flag {other:?} (usage: bare_proxy [--listen ADDR] --upstream URL)"
            )),
        }
    }
    let upstream = upstream.unwrap_or_else(|| fail("--upstream URL is required"));
    let (Some(scheme), Some(authority)) = (upstream.scheme(), upstream.authority()) else {
        fail("--upstream: expected a URL such as http://127.0.0.1:9000");
    };
    // The gateway's connector: rustls with the Mozilla roots, plain HTTP too.
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap_or_else(|e| fail(e))
    .with_root_certificates(rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    })
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    let proxy = Arc::new(Proxy {
        client: Client::builder(TokioExecutor::new()).build(connector),
        scheme: scheme.clone(),
        authority: authority.clone(),
    });
    let app = Router::new().fallback(forward).with_state(proxy);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .unwrap_or_else(|e| fail(format_args!("cannot listen on {listen}: {e}")));
    println!("listening on http://{}", listener.local_addr().unwrap());
    axum::serve(listener, app).await.unwrap();
}
