//! The gateway's router, upstream client and configuration file, built from a [`Stack`].
//! Shared with the tests.
//!
//! # The `[gateway]` table
//!
//! The configuration file is a [`Stack`] document plus one table the example reads itself
//! (see [`load`]):
//!
//! ```toml
//! [gateway]
//! forward_headers = ["content-type", "accept", "user-agent", "x-request-id"]
//! upstream_ca = "private-ca.pem"
//! ```
//!
//! # Which client headers reach the upstream
//!
//! Only an allow-list: the upstream answers under the operator's key, so a header that chooses
//! an organization, a project, billing or beta features (`OpenAI-Organization`,
//! `OpenAI-Project`, `anthropic-beta`, `openai-beta`) must not be the client's choice. The
//! default list, [`DEFAULT_FORWARD_HEADERS`], and why:
//!
//! | header | forwarded | why |
//! |---|---|---|
//! | `content-type` | yes | describes the body that is forwarded |
//! | `accept` | yes | content negotiation (JSON or `text/event-stream`) |
//! | `user-agent` | yes | names the SDK; upstreams log it, it selects nothing |
//! | `x-request-id` | yes | the id the gateway answers with (the client's or a new one), for correlating logs |
//! | `openai-organization`, `openai-project` | no | choose the account billed under the operator's key |
//! | `openai-beta`, `anthropic-beta` | no | opt the operator's key into beta behaviour; add them when your clients need a beta API |
//! | `idempotency-key` | no | every client shares the operator's account upstream, so one client could replay another's key and read its cached answer |
//! | `accept-encoding` | no | the gateway reads error bodies to classify them; the upstream answers uncompressed |
//! | `authorization`, `x-api-key`, `api-key` | never | replaced by the upstream key |
//! | `host`, `content-length` and hop-by-hop headers (`connection`, `keep-alive`, `proxy-connection`, `te`, `trailer`, `transfer-encoding`, `upgrade`, `proxy-authorization`, `proxy-authenticate`) | never | they belong to one connection, or the client sets them from the URL and body; listing one is refused at start |
//!
//! `[gateway] forward_headers` replaces the list; `--forward-header NAME` adds one. With the
//! embedded mock, `x-mock-fault` is forwarded too, so faults can be injected. The filter runs
//! on the client's request before the upstream layers (retry, breaker, normalizer), so a
//! header one of them adds for the upstream is sent; the HTTP client still removes
//! credentials, `host`, `content-length` and hop-by-hop headers, whoever set them.
//!
//! # TLS to the upstream
//!
//! `https://` upstreams go through rustls (`hyper-rustls`, the `ring` provider: no cmake or
//! nasm to build) and trust the Mozilla root store compiled in by `webpki-roots`, not the
//! host's: the gateway then trusts the same CAs on every machine and in minimal containers
//! that ship no CA bundle, and a changed host store cannot widen what it trusts. A private
//! CA is added with `[gateway] upstream_ca = "ca.pem"` or `--upstream-ca ca.pem` (PEM, one or
//! more certificates, trusted next to the Mozilla roots). A certificate that is not trusted
//! answers `502 service_unavailable` with a message naming TLS and the certificate, and
//! `x-should-retry: false` (the next attempt would be refused the same way).

#[path = "status.rs"]
pub mod status;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::{self, HeaderName};
use axum::http::{HeaderMap, HeaderValue, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use llm_layers::auth::{ApiKeyAuthLayer, KeyStore};
use llm_layers::body::LayerBody;
use llm_layers::normalize::NormalizeErrorsLayer;
use llm_layers::stack::{
    parse_toml, BreakerConfig, ConfigError, KeyConfig, RateLimitConfig, RetryConfig, RouteConfig,
    Stack, StackConfig, UpstreamConfig, ValidationConfig,
};
use llm_layers::{ApiError, ErrorCode};
use serde::Deserialize;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;

/// The client headers forwarded upstream when `[gateway] forward_headers` is not set.
pub const DEFAULT_FORWARD_HEADERS: [&str; 4] =
    ["content-type", "accept", "user-agent", "x-request-id"];

/// Headers that are never forwarded: credentials (replaced by the upstream key), the ones the
/// HTTP client sets from the URL and the body, and hop-by-hop headers (RFC 9110 §7.6.1).
const NEVER_FORWARDED: [HeaderName; 14] = [
    header::AUTHORIZATION,
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("api-key"),
    header::HOST,
    header::CONTENT_LENGTH,
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

/// A refused value of the `[gateway]` table or of a flag.
fn refuse(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::new("gateway", field.into(), message.into())
}

/// The `[gateway]` table as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GatewayToml {
    forward_headers: Option<Vec<String>>,
    upstream_ca: Option<PathBuf>,
}

/// The configuration file: the stack's sections ([`StackConfig`]) and the `[gateway]` table,
/// read in one pass so that every error names its TOML path and line.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct GatewayFile {
    gateway: GatewayToml,
    admin: Option<status::AdminToml>,
    upstreams: BTreeMap<String, NamedUpstreamToml>,
    keys: Vec<KeyConfig>,
    validation: ValidationConfig,
    rate_limit: RateLimitConfig,
    retry: RetryConfig,
    breaker: BreakerConfig,
    upstream: UpstreamConfig,
    routes: BTreeMap<String, RouteConfig>,
}

/// What the example reads from the `[gateway]` table (and its flags), next to the [`Stack`].
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The client headers forwarded upstream (see the module docs).
    pub forward_headers: Vec<HeaderName>,
    /// A PEM file of CA certificates trusted for an `https://` upstream, next to the
    /// Mozilla roots.
    pub upstream_ca: Option<PathBuf>,
    /// The admin key of `GET /v1/llm-layers/status` (`[admin]`; see [`status`]).
    pub admin: Option<status::Admin>,
    /// The named upstreams of `[upstreams.NAME]`, the targets `[[breaker.fallback]] upstream
    /// = "NAME"` refers to.
    pub upstreams: BTreeMap<String, NamedUpstream>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            forward_headers: DEFAULT_FORWARD_HEADERS
                .iter()
                .map(|h| HeaderName::from_static(h))
                .collect(),
            upstream_ca: None,
            admin: None,
            upstreams: BTreeMap::new(),
        }
    }
}

impl GatewayConfig {
    /// The TLS settings of its `upstream_ca` (see [`tls_config`]).
    pub fn tls(&self) -> Result<rustls::ClientConfig, ConfigError> {
        tls_config(self.upstream_ca.as_deref(), "gateway.upstream_ca")
    }

    /// Adds a forwarded header (`--forward-header NAME`); `field` names where it came from.
    pub fn forward_header(&mut self, field: &str, name: &str) -> Result<(), ConfigError> {
        let name = forwardable(field, name)?;
        if !self.forward_headers.contains(&name) {
            self.forward_headers.push(name);
        }
        Ok(())
    }
}

/// A header name that may be forwarded, or the refusal naming `field`.
fn forwardable(field: &str, name: &str) -> Result<HeaderName, ConfigError> {
    let parsed = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| refuse(field, format!("{name:?} is not a header name")))?;
    if NEVER_FORWARDED.contains(&parsed) {
        return Err(refuse(
            field,
            format!(
                "{:?} is never forwarded (a credential, set by the client, or hop-by-hop)",
                parsed.as_str()
            ),
        ));
    }
    Ok(parsed)
}

/// Parses a configuration file: the [`Stack`] document and the example's own `[gateway]`
/// table. Errors name the TOML path (`gateway.forward_headers[2]`, `breaker.window`) and the
/// line.
pub fn load(text: &str) -> Result<(Stack, GatewayConfig), ConfigError> {
    let file: GatewayFile = parse_toml(text)?;
    let mut gateway = GatewayConfig {
        upstream_ca: file.gateway.upstream_ca,
        admin: status::Admin::from_toml(file.admin.as_ref())?,
        ..GatewayConfig::default()
    };
    if let Some(names) = &file.gateway.forward_headers {
        gateway.forward_headers = names
            .iter()
            .enumerate()
            .map(|(i, name)| forwardable(&format!("gateway.forward_headers[{i}]"), name))
            .collect::<Result<_, _>>()?;
    }
    gateway.upstreams = named_upstreams(&file.upstreams)?;
    check_fallback_upstreams(&file.breaker, &file.routes, &gateway.upstreams)?;
    let stack = Stack::build(&StackConfig {
        keys: file.keys,
        validation: file.validation,
        rate_limit: file.rate_limit,
        retry: file.retry,
        breaker: file.breaker,
        upstream: file.upstream,
        routes: file.routes,
    })?;
    Ok((stack, gateway))
}

/// The TLS settings for `https://` upstreams: the Mozilla roots of `webpki-roots`, plus the
/// certificates of the PEM file `ca` when given. `field` names the flag or key of `ca` in
/// errors.
pub fn tls_config(ca: Option<&Path>, field: &str) -> Result<rustls::ClientConfig, ConfigError> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca {
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| refuse(field, format!("cannot read {}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(refuse(
                field,
                format!("{} holds no PEM certificate", path.display()),
            ));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| {
                refuse(
                    field,
                    format!("{}: not a CA certificate: {e}", path.display()),
                )
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| refuse(field, e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The service that answers one proxied request: every layer around the upstream call.
pub type UpstreamService = BoxCloneSyncService<Request, Response, llm_layers::body::BoxError>;

/// The upstream services of the gateway's routes: a route whose `[routes."/path"]` entry
/// overrides `retry`, `breaker` or `upstream` has its own (with its own retry budget,
/// circuits and attempt timeout), the others share one. Cloned for every request (it is the
/// router's state), so it holds its services behind an `Arc`: a request clones only the one
/// service it calls.
#[derive(Clone)]
pub struct Upstream {
    shared: Arc<UpstreamService>,
    own: Arc<HashMap<String, UpstreamService>>,
}

impl Upstream {
    /// The service of the route at `path`.
    pub fn for_route(&self, path: &str) -> UpstreamService {
        if self.own.is_empty() {
            return (*self.shared).clone();
        }
        self.own.get(path).unwrap_or(&self.shared).clone()
    }
}

/// The HTTP client that sends one attempt: `/v1/x` on the gateway is `{base}/x` upstream,
/// credentials, `host`, `content-length` and hop-by-hop headers are removed and the upstream
/// key is set. `https://` upstreams use `tls`; a TLS failure is answered with a `502`
/// envelope that says so.
pub fn http_client(
    base: Uri,
    key: Option<HeaderValue>,
    tls: rustls::ClientConfig,
) -> impl tower::Service<
    Request<ClientBody>,
    Response = Response<LayerBody<Incoming>>,
    Error = hyper_util::client::legacy::Error,
    Future = impl Send,
> + Clone
       + Send
       + Sync
       + 'static {
    let connector: HttpsConnector<HttpConnector> = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    // One client, shared by every clone of the service; its `request` future owns what it
    // needs, so nothing is cloned per request.
    let client: Arc<Client<_, ClientBody>> =
        Arc::new(Client::builder(TokioExecutor::new()).build(connector));
    let base_path = base.path().trim_end_matches('/').to_owned();
    let scheme = base.scheme().cloned();
    let authority = base.authority().cloned();
    tower::service_fn(move |req: Request<ClientBody>| {
        let (mut parts, body) = req.into_parts();
        let path = parts.uri.path();
        let rest = path.strip_prefix("/v1").unwrap_or(path);
        let mut uri = axum::http::uri::Parts::default();
        uri.scheme = scheme.clone();
        uri.authority = authority.clone();
        uri.path_and_query = if base_path == "/v1" && rest.len() < path.len() {
            // `/v1/x` upstream too: the client's path and query, shared, not copied.
            parts.uri.path_and_query().cloned()
        } else {
            let query = parts.uri.query().map_or("", |_| "?");
            let q = parts.uri.query().unwrap_or("");
            format!("{base_path}{rest}{query}{q}").parse().ok()
        };
        parts.uri = Uri::from_parts(uri).expect("a valid upstream URI");
        // Credentials, `host` and hop-by-hop headers never leave, whoever set them. The
        // breaker's fallback rewrites the body's `model`; hyper sets the length from the body
        // itself, and `host` from the URI.
        for name in &NEVER_FORWARDED {
            parts.headers.remove(name);
        }
        if let Some(key) = &key {
            parts.headers.insert(header::AUTHORIZATION, key.clone());
        }
        let sent = client.request(Request::from_parts(parts, body));
        async move {
            match sent.await {
                Ok(res) => Ok(res.map(LayerBody::new)),
                Err(e) => match tls_failure(&e) {
                    Some(tls) => Ok(tls_envelope(tls)),
                    None => Err(e),
                },
            }
        }
    })
}

/// The request body the HTTP client sends: the client's body, or the bytes a layer read
/// (retry and breaker buffer it), without boxing.
pub type ClientBody = LayerBody<Body>;

/// Keeps only the client headers named in `forward` (every value of each).
fn forward_only(mut req: Request, forward: &[HeaderName]) -> Request {
    let headers = req.headers_mut();
    let mut kept = HeaderMap::with_capacity(forward.len());
    for name in forward {
        for value in headers.get_all(name) {
            kept.append(name.clone(), value.clone());
        }
    }
    *headers = kept;
    req
}

/// The rustls error in a client error's chain, if the failure was TLS.
fn tls_failure<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // `io::Error::source` skips the error it wraps: step into it instead.
        cur = match e.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    None
}

/// The envelope for a failed TLS handshake: `502 service_unavailable`, not retryable (the
/// next attempt would meet the same certificate).
fn tls_envelope<B: From<bytes::Bytes>>(err: &rustls::Error) -> Response<B> {
    let what = match err {
        rustls::Error::InvalidCertificate(_) => "the upstream's certificate was refused",
        _ => "the TLS handshake with the upstream failed",
    };
    tracing::warn!(
        error = ?err,
        "TLS to the upstream failed; a private CA is added with --upstream-ca or [gateway] upstream_ca"
    );
    ApiError::new(
        ErrorCode::ServiceUnavailable,
        format!("TLS error: {what} ({err})."),
    )
    .with_status(axum::http::StatusCode::BAD_GATEWAY)
    .with_provider("transport")
    .never_fits()
    .to_response()
}

/// Everything around the upstream call, outermost first: the forwarded-headers filter, retry
/// (deadline and budget), circuit breaker (with its fallback model), normalizer, per-attempt
/// timeout, HTTP client. The
/// normalizer sits closest to the upstream, so each raw answer is classified once and the
/// outer layers read the `ApiError` it leaves in the response extensions. The default
/// [`GatewayConfig`]: the default forwarded headers, the Mozilla roots.
#[allow(dead_code)] // the tests' shortcut
pub fn upstream(stack: &Stack, base: Uri, key: Option<HeaderValue>) -> Upstream {
    let gateway = GatewayConfig::default();
    let tls = tls_config(None, "gateway.upstream_ca").expect("no file to read");
    upstream_with(stack, &gateway.forward_headers, tls, base, key)
}

/// [`upstream`] with these forwarded headers and TLS settings (from [`tls_config`]).
pub fn upstream_with(
    stack: &Stack,
    forward_headers: &[HeaderName],
    tls: rustls::ClientConfig,
    base: Uri,
    key: Option<HeaderValue>,
) -> Upstream {
    let forward: Arc<[HeaderName]> = forward_headers.into();
    let client = http_client(base, key, tls);
    let chain = |path: Option<&str>| {
        let forward = forward.clone();
        let (retry, breaker, timeout, normalize) = match path {
            Some(path) => (
                stack.retry_for(path),
                stack.breaker_for(path),
                stack.attempt_timeout_for(path),
                stack.normalize_options_for(path),
            ),
            None => (
                stack.retry(),
                stack.breaker(),
                stack.attempt_timeout(),
                stack.normalize_options(),
            ),
        };
        // No boxing between the layers: each hands on the body it was given (or the bytes
        // it read) as a `LayerBody`, and answers with its own body type around the inner
        // one; the response body is boxed once, for the router.
        let svc = ServiceBuilder::new()
            // The client's headers are filtered before the layers, so headers a layer adds
            // for the upstream reach it.
            .map_request(move |req| forward_only(req, &forward))
            .map_response(IntoResponse::into_response)
            .layer(retry)
            .layer(breaker)
            .map_request(|req: Request<LayerBody<LayerBody<Body>>>| req.map(LayerBody::flatten))
            // The attempt timeout covers the head; the error body is read within the same
            // bound. The stream settings of `[upstream]` (first event, stream timers) apply
            // after the head.
            .layer(NormalizeErrorsLayer::with_options(
                normalize.error_body_timeout(Some(timeout)),
            ))
            .timeout(timeout)
            .service(client.clone());
        BoxCloneSyncService::new(svc)
    };
    let own = stack
        .routes()
        .map(|(path, _)| path)
        .filter(|path| stack.has_own_upstream_layers(path))
        .map(|path| (path.to_owned(), chain(Some(path))))
        .collect();
    Upstream {
        shared: Arc::new(chain(None)),
        own: Arc::new(own),
    }
}

// ---- Named upstreams: the targets of the breaker's fallback chain ----

/// `[upstreams.NAME]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NamedUpstreamToml {
    /// `http://` or `https://`, with the API's path (`https://backup.example.com/v1`).
    base_url: String,
    /// The environment variable holding this upstream's key (sent as `Bearer`); the file
    /// holds no secret.
    api_key_env: Option<String>,
}

/// Another upstream the breaker's fallback chain can send a request to
/// (`[upstreams.NAME]`, referred to by `[[breaker.fallback]] upstream = "NAME"`).
#[derive(Clone)]
pub struct NamedUpstream {
    /// Its base URL; the gateway's `/v1/x` is `{base}/x` there.
    pub base: Uri,
    /// The key sent to it, if any (never shown by `Debug`).
    pub key: Option<HeaderValue>,
}

impl std::fmt::Debug for NamedUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamedUpstream")
            .field("base", &self.base)
            .field("key", &self.key.as_ref().map(|_| "<hidden>"))
            .finish()
    }
}

/// The `[upstreams]` tables: each base URL checked, each key read from its variable.
fn named_upstreams(
    tables: &BTreeMap<String, NamedUpstreamToml>,
) -> Result<BTreeMap<String, NamedUpstream>, ConfigError> {
    tables
        .iter()
        .map(|(name, t)| {
            let field = format!("upstreams.{name}.base_url");
            let base: Uri = t
                .base_url
                .parse()
                .map_err(|e| refuse(field.as_str(), format!("not a URL: {e}")))?;
            if !matches!(base.scheme_str(), Some("http" | "https")) || base.authority().is_none() {
                return Err(refuse(
                    field,
                    "expected an http:// or https:// URL such as https://backup.example.com/v1",
                ));
            }
            let key = match &t.api_key_env {
                None => None,
                Some(var) => {
                    let field = format!("upstreams.{name}.api_key_env");
                    let k = std::env::var(var)
                        .map_err(|_| refuse(field.as_str(), format!("{var} is not set")))?;
                    let mut v = HeaderValue::try_from(format!("Bearer {k}")).map_err(|_| {
                        refuse(field.as_str(), format!("{var} is not a valid header value"))
                    })?;
                    v.set_sensitive(true);
                    Some(v)
                }
            };
            Ok((name.clone(), NamedUpstream { base, key }))
        })
        .collect()
}

/// Every `[[breaker.fallback]] upstream` (top level and per route) names an `[upstreams]`
/// table.
fn check_fallback_upstreams(
    breaker: &BreakerConfig,
    routes: &BTreeMap<String, RouteConfig>,
    upstreams: &BTreeMap<String, NamedUpstream>,
) -> Result<(), ConfigError> {
    let routes = routes.iter().filter_map(|(path, r)| {
        let chain = r.breaker.as_ref()?.fallback.as_ref()?;
        Some((format!("routes.{path:?}.breaker"), chain))
    });
    for (at, chain) in std::iter::once(("breaker".to_owned(), &breaker.fallback)).chain(routes) {
        for (i, target) in chain.iter().enumerate() {
            if let Some(name) = &target.upstream {
                if !upstreams.contains_key(&name.0) {
                    return Err(refuse(
                        format!("{at}.fallback[{i}].upstream"),
                        format!("no [upstreams.{}] table defines this upstream", name.0),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// [`upstream_with`], with the breaker's fallback chain able to reach the named upstreams of
/// `[upstreams]`: each gets the same attempt stack as the main upstream (normalizer,
/// per-attempt timeout, its own HTTP client with its own key) and is bound to the targets that
/// name it, with its own circuit in the route's breaker. Without such targets it is
/// [`upstream_with`].
pub fn upstream_with_targets(
    stack: &Stack,
    forward_headers: &[HeaderName],
    tls: rustls::ClientConfig,
    base: Uri,
    key: Option<HeaderValue>,
    upstreams: &BTreeMap<String, NamedUpstream>,
) -> Result<Upstream, ConfigError> {
    let names_any = !stack.breaker().upstream_names().is_empty()
        || stack
            .routes()
            .any(|(path, _)| !stack.breaker_for(path).upstream_names().is_empty());
    if !names_any {
        return Ok(upstream_with(stack, forward_headers, tls, base, key));
    }
    let forward: Arc<[HeaderName]> = forward_headers.into();
    let client = http_client(base, key, tls.clone());
    // One client per named upstream, shared by every route.
    let clients: BTreeMap<&str, _> = upstreams
        .iter()
        .map(|(name, u)| {
            (
                name.as_str(),
                http_client(u.base.clone(), u.key.clone(), tls.clone()),
            )
        })
        .collect();
    let chain = |path: Option<&str>| -> Result<UpstreamService, ConfigError> {
        let forward = forward.clone();
        let (retry, breaker, timeout, normalize) = match path {
            Some(path) => (
                stack.retry_for(path),
                stack.breaker_for(path),
                stack.attempt_timeout_for(path),
                stack.normalize_options_for(path),
            ),
            None => (
                stack.retry(),
                stack.breaker(),
                stack.attempt_timeout(),
                stack.normalize_options(),
            ),
        };
        let normalize = normalize.error_body_timeout(Some(timeout));
        // What the breaker calls, for the main upstream and for each named one alike.
        let attempt = |client| {
            ServiceBuilder::new()
                .map_request(|req: Request<LayerBody<LayerBody<Body>>>| req.map(LayerBody::flatten))
                .layer(NormalizeErrorsLayer::with_options(normalize))
                .timeout(timeout)
                .service(client)
        };
        let breaker = breaker
            .bind_upstreams(|name| clients.get(name).cloned().map(attempt))
            .map_err(|e| refuse("breaker.fallback", e.to_string()))?;
        let svc = ServiceBuilder::new()
            .map_request(move |req| forward_only(req, &forward))
            .map_response(IntoResponse::into_response)
            .layer(retry)
            .layer(breaker)
            .service(attempt(client.clone()));
        Ok(BoxCloneSyncService::new(svc))
    };
    let own = stack
        .routes()
        .map(|(path, _)| path)
        .filter(|path| stack.has_own_upstream_layers(path))
        .map(|path| Ok((path.to_owned(), chain(Some(path))?)))
        .collect::<Result<_, ConfigError>>()?;
    Ok(Upstream {
        shared: Arc::new(chain(None)?),
        own: Arc::new(own),
    })
}

async fn proxy(State(upstream): State<Upstream>, req: Request) -> Response {
    match upstream.for_route(req.uri().path()).oneshot(req).await {
        Ok(res) => res,
        // Only a service that failed to become ready gets here.
        Err(e) => llm_layers::policy::classify_error(e).to_response(),
    }
}

/// The gateway: per-route stacks, then request ids and tracing around everything. The keys
/// are the configuration's `[[keys]]`.
#[allow(dead_code)] // the tests' shortcut
pub fn router(stack: &Stack, upstream: Upstream) -> Router {
    router_with_auth(stack, &stack.auth(), upstream)
}

/// [`router`] with this auth layer (the stack's settings over another store, such as the
/// reloadable store of `--keys`; see [`ApiKeyAuthLayer::with_store`]).
pub fn router_with_auth<K: KeyStore>(
    stack: &Stack,
    auth: &ApiKeyAuthLayer<K>,
    upstream: Upstream,
) -> Router {
    let routes: [(&str, MethodRouter<Upstream>); 5] = [
        ("/v1/chat/completions", post(proxy)),
        ("/v1/completions", post(proxy)),
        ("/v1/embeddings", post(proxy)),
        ("/v1/models", get(proxy)),
        ("/healthz", get(|| async { "ok" })),
    ];
    let mut app = Router::new();
    for (path, route) in routes {
        // The route's edge stack as one layer: auth, validation, rate limit, as its
        // `[routes."/path"]` entry says.
        let edge = stack.route_layer(path).with_auth(auth.clone());
        app = app.route(path, route.layer(edge));
    }
    app.with_state(upstream).layer(
        ServiceBuilder::new()
            .layer(SetRequestIdLayer::x_request_id(FastRequestId))
            .layer(TraceLayer::new_for_http().make_span_with(request_span))
            .layer(PropagateRequestIdLayer::x_request_id()),
    )
}

/// The span of one request, with the tracing fields of `llm_layers::metrics::field`:
/// `request_id` (set or kept by the request-id layer outside) and `route` (the path, a client's
/// string: Debug-escaped). The layers' events are recorded inside it; at `info`, so that the
/// rejections logged at `info` carry it.
fn request_span<B>(req: &Request<B>) -> tracing::Span {
    let request_id = req
        .headers()
        .get("x-request-id")
        .map(|v| String::from_utf8_lossy(v.as_bytes()));
    tracing::info_span!(
        "request",
        method = %req.method(),
        route = ?req.uri().path(),
        request_id = ?request_id.as_deref().unwrap_or(""),
    )
}

/// Request ids for requests that come without one: random UUIDs (version 4 layout) from a
/// fast thread-local generator (`fastrand`), not a system call per request. They correlate
/// logs; nothing relies on them being unpredictable.
#[derive(Debug, Clone, Copy, Default)]
pub struct FastRequestId;

impl MakeRequestId for FastRequestId {
    fn make_request_id<B>(&mut self, _request: &Request<B>) -> Option<RequestId> {
        Some(RequestId::new(uuid_v4(fastrand::u128(..))))
    }
}

/// `bits` as a version 4 UUID, `xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx`, formatted on the stack.
fn uuid_v4(bits: u128) -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bits = (bits & !(0xf << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62);
    let mut out = [b'-'; 36];
    let mut nibble = 32;
    for (i, slot) in out.iter_mut().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            continue;
        }
        nibble -= 1;
        *slot = HEX[((bits >> (nibble * 4)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&out).expect("hex digits and dashes")
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_ids_are_version_4_uuids() {
        let id = super::uuid_v4(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        assert_eq!(id, "01234567-89ab-4def-8123-456789abcdef");
        let id = super::uuid_v4(u128::MAX);
        assert_eq!(id, "ffffffff-ffff-4fff-bfff-ffffffffffff");
    }
}
