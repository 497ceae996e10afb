//! A plain hyper 1 server — no axum — with every layer around hyper's own `Request<Incoming>`,
//! proxying to an OpenAI-compatible upstream through hyper-util's client.
//!
//! ```sh
//! cargo run --example hyper_server -- 127.0.0.1:8081 http://127.0.0.1:11434/v1
//! curl -s localhost:8081/v1/chat/completions -H 'authorization: Bearer sk-demo-0123456789abcdef' \
//!      -H 'content-type: application/json' \
//!      -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
//! ```
//!
//! The upstream is any OpenAI-compatible `http://` base URL (a local vLLM or Ollama, or the
//! example gateway's embedded mock); `/v1/x` here is `{base}/x` there. The demo key may use
//! `gpt-4o` and `gpt-4o-mini*`.
//!
//! The layers, outermost first, in the crate's recommended order: auth → validation → rate
//! limit → retry → breaker → normalizer → per-attempt timeout → client. None of them asks more
//! of the body than `http_body::Body`: those that read it (validation, the token quota, the
//! retry's replay) hand `LayerBody<Incoming>` on, and the client sends whatever body it gets.
//! `TowerToHyperService` turns the tower service into the `hyper::service::Service` hyper's
//! connection wants.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use llm_layers::auth::{ApiKeyAuthLayer, InMemoryKeyStore, KeyRecord};
use llm_layers::breaker::CircuitBreakerLayer;
use llm_layers::normalize::NormalizeErrorsLayer;
use llm_layers::rate_limit::{Limits, Quota, RateLimitLayer};
use llm_layers::retry::RetryLayer;
use llm_layers::validate::ValidateRequestLayer;
use tokio::net::TcpListener;
use tower::{BoxError, ServiceBuilder};

/// The key the example accepts.
pub const DEMO_KEY: &str = "sk-demo-0123456789abcdef";

/// Every layer around a hyper-util client that sends each request to the OpenAI-compatible
/// base URL `upstream` (`http://127.0.0.1:11434/v1`, say).
pub fn edge(
    upstream: Uri,
) -> impl tower::Service<
    Request<Incoming>,
    Response = Response<impl Body<Data = Bytes, Error = impl Into<BoxError>> + Send + 'static>,
    Error = BoxError,
    Future = impl Send + 'static,
> + Clone
       + Send
       + 'static {
    let demo = KeyRecord::builder("demo")
        .secret(DEMO_KEY)
        .allow_models(["gpt-4o-mini*", "gpt-4o"])
        .build()
        .expect("a valid key");
    let keys = InMemoryKeyStore::new([demo]).expect("a valid key store");
    let client: Client<HttpConnector, _> = Client::builder(TokioExecutor::new()).build_http();
    let base = upstream.to_string();
    ServiceBuilder::new()
        .layer(ApiKeyAuthLayer::new(keys))
        .layer(ValidateRequestLayer::new())
        .layer(
            RateLimitLayer::builder()
                .limits(Limits::new().requests(Quota::per_minute(600).burst(60)))
                .build()
                .expect("valid limits"),
        )
        .layer(RetryLayer::new())
        .layer(
            CircuitBreakerLayer::builder()
                .name("upstream")
                .build()
                .expect("valid breaker settings"),
        )
        .layer(NormalizeErrorsLayer::new())
        .timeout(Duration::from_secs(60))
        // `/v1/x` here is `{base}/x` upstream, as with the example gateway.
        .map_request(move |mut req: Request<_>| {
            let pq = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
            let rest = pq.strip_prefix("/v1").unwrap_or(pq);
            let uri = format!("{}{rest}", base.trim_end_matches('/'));
            // Always a valid URI (a valid base and a path that was one); a request without
            // one would be answered `502` by the client, never a panic.
            if let Ok(uri) = uri.parse() {
                *req.uri_mut() = uri;
            }
            req
        })
        .service(client)
}

/// Serves `edge(upstream)` on `listener` until the process ends.
pub async fn serve(listener: TcpListener, upstream: Uri) {
    let svc = edge(upstream);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let svc = TowerToHyperService::new(svc.clone());
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args.next().as_deref().unwrap_or("127.0.0.1:8080").parse()?;
    let upstream: Uri = args
        .next()
        .as_deref()
        .unwrap_or("http://127.0.0.1:9000/")
        .parse()?;
    let listener = TcpListener::bind(addr).await?;
    println!(
        "listening on http://{}, upstream {upstream}",
        listener.local_addr()?
    );
    serve(listener, upstream).await;
    Ok::<_, BoxError>(())
}
