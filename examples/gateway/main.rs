//! An OpenAI-compatible gateway built from llm-layers.
//!
//! ```sh
//! cargo run --example gateway                      # embedded mock upstream, demo keys
//! cargo run --example gateway -- --listen 127.0.0.1:8080 \
//!     --upstream https://api.example.com/v1 --config examples/gateway.toml
//! ```
//!
//! Without `--upstream` the gateway starts an embedded mock upstream (OpenAI-compatible, with
//! fault injection through the `x-mock-fault` request header) and prints commands to try.

mod mock;

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use llm_layers::normalize::NormalizeErrorsLayer;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};

/// Command-line flags.
struct Args {
    listen: SocketAddr,
    upstream: Option<String>,
    config: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        listen: "127.0.0.1:8080".parse().unwrap(),
        upstream: None,
        config: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match flag.as_str() {
            "--listen" => {
                let v = value("--listen")?;
                args.listen = v.parse().map_err(|e| format!("--listen {v:?}: {e}"))?;
            }
            "--upstream" => args.upstream = Some(value("--upstream")?),
            "--config" => args.config = Some(value("--config")?),
            "-h" | "--help" => {
                println!("usage: gateway [--listen ADDR] [--upstream URL] [--config FILE]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown flag {other:?} (try --help)")),
        }
    }
    Ok(args)
}

type Upstream = BoxCloneSyncService<Request, Response, std::convert::Infallible>;

/// The service that sends one attempt to the upstream: base URL and key applied, hyper client.
fn upstream_client(base: Uri, key: Option<HeaderValue>) -> Upstream {
    let client: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new()).build_http();
    let base_path = base.path().trim_end_matches('/').to_owned();
    let send = tower::service_fn(move |req: Request| {
        let client = client.clone();
        let (mut parts, body) = req.into_parts();
        // `/v1/chat/completions` on the gateway is `{base}/chat/completions` upstream.
        let path = parts
            .uri
            .path()
            .strip_prefix("/v1")
            .unwrap_or(parts.uri.path());
        let mut uri = base.clone().into_parts();
        uri.path_and_query = format!("{base_path}{path}").parse().ok();
        parts.uri = Uri::from_parts(uri).expect("a valid upstream URI");
        parts.headers.remove(axum::http::header::HOST);
        parts.headers.remove(axum::http::header::AUTHORIZATION);
        if let Some(key) = &key {
            parts
                .headers
                .insert(axum::http::header::AUTHORIZATION, key.clone());
        }
        async move {
            let res = client.request(Request::from_parts(parts, body)).await?;
            Ok::<_, hyper_util::client::legacy::Error>(res.map(Body::new))
        }
    });
    let stack = ServiceBuilder::new()
        .layer(NormalizeErrorsLayer::new())
        .timeout(Duration::from_secs(60))
        .service(send)
        .map_response(IntoResponse::into_response);
    BoxCloneSyncService::new(stack)
}

async fn proxy(State(upstream): State<Upstream>, req: Request) -> Response {
    let Ok(res) = upstream.oneshot(req).await;
    res
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("gateway: {e}");
            std::process::exit(2);
        }
    };
    let _ = &args.config;
    let (base, mocked): (Uri, bool) = match &args.upstream {
        Some(u) => match u.parse() {
            Ok(uri) => (uri, false),
            Err(e) => {
                eprintln!("gateway: --upstream {u:?}: {e}");
                std::process::exit(2);
            }
        },
        None => {
            let addr = mock::start().await.expect("the mock upstream starts");
            (format!("http://{addr}/v1").parse().unwrap(), true)
        }
    };
    let key = std::env::var("UPSTREAM_API_KEY")
        .ok()
        .and_then(|k| HeaderValue::try_from(format!("Bearer {k}")).ok())
        .map(|mut v| {
            v.set_sensitive(true);
            v
        });
    let upstream = upstream_client(base, key);
    let app = Router::new()
        .route("/v1/chat/completions", post(proxy))
        .route("/v1/completions", post(proxy))
        .route("/v1/embeddings", post(proxy))
        .route("/v1/models", get(proxy))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(upstream);

    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("gateway: cannot listen on {}: {e}", args.listen);
            std::process::exit(1);
        }
    };
    let addr = listener.local_addr().unwrap();
    println!("listening on http://{addr}");
    if mocked {
        println!("upstream: embedded mock (inject faults with the x-mock-fault header)");
    }
    axum::serve(listener, app).await.unwrap();
}
