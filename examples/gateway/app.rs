//! The gateway's router and upstream client, built from a [`Stack`]. Shared with the tests.

use std::convert::Infallible;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use llm_layers::normalize::NormalizeErrorsLayer;
use llm_layers::stack::Stack;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

/// The service that answers one proxied request: every layer around the upstream call.
pub type Upstream = BoxCloneSyncService<Request, Response, Infallible>;

/// The HTTP client that sends one attempt: `/v1/x` on the gateway is `{base}/x` upstream, the
/// caller's credentials are replaced by the upstream key.
pub fn http_client(
    base: Uri,
    key: Option<HeaderValue>,
) -> impl tower::Service<
    Request,
    Response = Response,
    Error = hyper_util::client::legacy::Error,
    Future = impl Send,
> + Clone
       + Send
       + Sync
       + 'static {
    let client: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new()).build_http();
    let base_path = base.path().trim_end_matches('/').to_owned();
    tower::service_fn(move |req: Request| {
        let client = client.clone();
        let (mut parts, body) = req.into_parts();
        let path = parts.uri.path();
        let path = path.strip_prefix("/v1").unwrap_or(path);
        let query = parts
            .uri
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        let mut uri = base.clone().into_parts();
        uri.path_and_query = format!("{base_path}{path}{query}").parse().ok();
        parts.uri = Uri::from_parts(uri).expect("a valid upstream URI");
        parts.headers.remove(axum::http::header::HOST);
        parts.headers.remove(axum::http::header::AUTHORIZATION);
        parts.headers.remove("x-api-key");
        parts.headers.remove("api-key");
        // The breaker's fallback rewrites the body's `model`; hyper sets the length from the
        // body itself.
        parts.headers.remove(axum::http::header::CONTENT_LENGTH);
        if let Some(key) = &key {
            parts
                .headers
                .insert(axum::http::header::AUTHORIZATION, key.clone());
        }
        async move {
            let res = client.request(Request::from_parts(parts, body)).await?;
            Ok(res.map(Body::new))
        }
    })
}

/// Everything around the upstream call, outermost first: retry (deadline and budget), circuit
/// breaker (with its fallback model), normalizer, per-attempt timeout, HTTP client. The normalizer sits closest to the
/// upstream, so each raw answer is classified once and the outer layers read the `ApiError`
/// it leaves in the response extensions.
pub fn upstream(stack: &Stack, base: Uri, key: Option<HeaderValue>) -> Upstream {
    let svc = ServiceBuilder::new()
        .layer(stack.retry())
        .layer(stack.breaker())
        .map_response(IntoResponse::into_response)
        .layer(NormalizeErrorsLayer::new())
        .timeout(stack.attempt_timeout())
        .service(http_client(base, key));
    BoxCloneSyncService::new(svc)
}

async fn proxy(State(upstream): State<Upstream>, req: Request) -> Response {
    let Ok(res) = upstream.oneshot(req).await;
    res
}

/// The route's own stack, as its `[routes."/path"]` policy says: auth, then validation,
/// then rate limit (outermost first). `MethodRouter::layer` is applied innermost first.
fn guarded(stack: &Stack, path: &str, route: MethodRouter<Upstream>) -> MethodRouter<Upstream> {
    let mut route = route;
    if let Some(layer) = stack.rate_limit_for(path) {
        route = route.layer(layer);
    }
    if let Some(layer) = stack.validate_for(path) {
        route = route.layer(layer);
    }
    if let Some(layer) = stack.auth_for(path) {
        route = route.layer(layer);
    }
    route
}

/// The gateway: per-route stacks, then request ids and tracing around everything.
pub fn router(stack: &Stack, upstream: Upstream) -> Router {
    let routes: [(&str, MethodRouter<Upstream>); 5] = [
        ("/v1/chat/completions", post(proxy)),
        ("/v1/completions", post(proxy)),
        ("/v1/embeddings", post(proxy)),
        ("/v1/models", get(proxy)),
        ("/healthz", get(|| async { "ok" })),
    ];
    let mut app = Router::new();
    for (path, route) in routes {
        app = app.route(path, guarded(stack, path, route));
    }
    app.with_state(upstream).layer(
        ServiceBuilder::new()
            .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
            .layer(TraceLayer::new_for_http())
            .layer(PropagateRequestIdLayer::x_request_id()),
    )
}
