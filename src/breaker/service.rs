use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body::Body;
use tower_service::Service;

use super::circuit::{Circuit, Permit, Refusal};
use super::classify::Outcome;
use super::config::{CircuitKey, Config, DynCall, FallbackStep, RequestHead};
use super::events::{emit, BreakerEvent};
use super::future::ResponseFuture;
use super::registry::{Shared, SINGLE_KEY};
use super::{BoxError, X_LLM_LAYERS_FALLBACK};
use crate::error::{ApiError, ErrorCode};
use crate::ext::RefusedLocally;
use crate::request::{deployment_from_path, ensure_view, CharEstimator, RequestView};

/// A service guarded by circuit breakers. Built by [`CircuitBreakerLayer`](super::CircuitBreakerLayer).
///
/// Rejections are `503 service_unavailable` envelope responses (marked
/// [`RefusedLocally`]) and a call past the [call timeout](super::CircuitBreakerLayerBuilder::call_timeout) is
/// answered `504 timeout`, so `Error` stays the inner service's. The inner service's own `Err`
/// passes through unchanged (and counts as a failure).
pub struct CircuitBreaker<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: Clone> Clone for CircuitBreaker<S> {
    fn clone(&self) -> Self {
        CircuitBreaker {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for CircuitBreaker<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .field("name", &self.shared.config().name)
            .finish()
    }
}

impl<S> CircuitBreaker<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        CircuitBreaker { inner, shared }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// A handle on this service's circuits.
    pub fn handle(&self) -> super::BreakerHandle {
        super::BreakerHandle {
            shared: self.shared.clone(),
        }
    }
}

enum Key<'a> {
    Single,
    Named(Cow<'a, str>),
    NeedView,
    Unguarded,
}

/// The upstream of a request: the configured name, else `host[:port]` of the request URI
/// (never its user info, which may hold a password), else `"<unknown>"`. Never the `Host`
/// header, which a client may set to anything.
fn upstream_of<'a, B>(cfg: &'a Config, req: &'a Request<B>) -> &'a str {
    if let Some(name) = &cfg.upstream {
        return name;
    }
    req.uri()
        .authority()
        .map(|a| {
            let a = a.as_str();
            a.rsplit_once('@').map_or(a, |(_, host)| host)
        })
        .unwrap_or("<unknown>")
}

/// The key of a model's circuit: the model alone, or behind the upstream.
fn model_key<'a, B>(cfg: &Config, req: &Request<B>, model: &'a str) -> Cow<'a, str> {
    if matches!(cfg.key_by, CircuitKey::Model) {
        Cow::Borrowed(model)
    } else {
        Cow::Owned(format!("{}/{model}", upstream_of(cfg, req)))
    }
}

fn key_of<'a, B>(cfg: &'a Config, req: &'a Request<B>) -> Key<'a> {
    let key_by = &cfg.key_by;
    match key_by {
        CircuitKey::Single => Key::Single,
        CircuitKey::Upstream => Key::Named(Cow::Borrowed(upstream_of(cfg, req))),
        CircuitKey::Model | CircuitKey::UpstreamAndModel => {
            match RequestView::from_extensions(req.extensions()) {
                // The model the upstream serves: an Azure deployment in the path wins over
                // the body's `model`.
                Some(view) => match view.routed_model() {
                    None => Key::Unguarded,
                    Some(model) => Key::Named(model_key(cfg, req, model)),
                },
                None => match deployment_from_path(req.uri().path()) {
                    // The path names the model: no need to read the body.
                    Some(d) => Key::Named(Cow::Owned(model_key(cfg, req, &d).into_owned())),
                    None => Key::NeedView,
                },
            }
        }
        CircuitKey::Custom(f) => {
            let head = RequestHead {
                method: req.method(),
                uri: req.uri(),
                headers: req.headers(),
                extensions: req.extensions(),
            };
            match f(&head) {
                Some(k) => Key::Named(Cow::Owned(k)),
                None => Key::Unguarded,
            }
        }
    }
}

/// The circuit for a request whose key is known, or `None` when it goes unguarded.
fn circuit_for<B>(shared: &Shared, req: &Request<B>) -> Option<Result<Arc<Circuit>, ()>> {
    match key_of(shared.config(), req) {
        Key::Single => Some(Ok(shared.single.clone())),
        Key::Named(k) => Some(Ok(shared.circuit(&k))),
        Key::Unguarded => None,
        Key::NeedView => Some(Err(())),
    }
}

fn refusal_error(cfg: &Config, key: &str, refusal: Refusal) -> ApiError {
    let name = &cfg.name;
    let single = key == SINGLE_KEY;
    match refusal {
        Refusal::Open(wait) => {
            let secs = wait.as_nanos().div_ceil(1_000_000_000);
            let message = if single {
                format!("Circuit breaker '{name}' is open after repeated upstream failures; calls resume in {secs} s.")
            } else {
                format!("Circuit breaker '{name}' for '{key}' is open after repeated upstream failures; calls resume in {secs} s.")
            };
            ApiError::new(ErrorCode::ServiceUnavailable, message).with_retry_after(wait)
        }
        Refusal::Probing(wait) => {
            let message = if single {
                format!("Circuit breaker '{name}' is half-open and testing the upstream with probe calls; try again shortly.")
            } else {
                format!("Circuit breaker '{name}' for '{key}' is half-open and testing the upstream with probe calls; try again shortly.")
            };
            ApiError::new(ErrorCode::ServiceUnavailable, message).with_retry_after(wait)
        }
        Refusal::Forced => {
            let message = if single {
                format!("Circuit breaker '{name}' is held open by its operator.")
            } else {
                format!("Circuit breaker '{name}' for '{key}' is held open by its operator.")
            };
            ApiError::new(ErrorCode::ServiceUnavailable, message)
        }
    }
}

/// The response to a refusal of the breaker's own: the envelope, with
/// [`RefusedLocally::CIRCUIT_BREAKER`] beside its [`ApiError`] so that a retry layer outside
/// answers at once instead of sleeping on the `retry-after` of a local state.
fn refusal_response<B: From<Bytes>>(err: &ApiError) -> Response<B> {
    let mut res = err.to_response();
    res.extensions_mut().insert(RefusedLocally::CIRCUIT_BREAKER);
    res
}

fn note_rejection(cfg: &Config, circuit: &Circuit, refusal: Refusal) {
    let retry_after = match refusal {
        Refusal::Open(d) | Refusal::Probing(d) => Some(d),
        Refusal::Forced => None,
    };
    if cfg.on_event.is_some() {
        emit(
            &cfg.on_event,
            BreakerEvent::Rejected {
                name: cfg.name.clone(),
                key: circuit.key.clone(),
                retry_after,
            },
        );
    } else {
        tracing::debug!(breaker = ?cfg.name, key = ?circuit.key, retry_after_ms = retry_after.map(super::config::millis), "call rejected by open circuit");
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for CircuitBreaker<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
    ReqBody: Body + From<Bytes> + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError>,
    ResBody: From<Bytes> + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let keyed;
        let circuit = match key_of(self.shared.config(), &req) {
            Key::Single => &self.shared.single,
            Key::Named(k) => {
                keyed = self.shared.circuit(&k);
                &keyed
            }
            Key::Unguarded => {
                return ResponseFuture::called(self.inner.call(req), Permit::unrecorded())
            }
            Key::NeedView => {
                // The key needs the model and no earlier layer parsed the body.
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                return ResponseFuture::boxed(Box::pin(keyed_by_body(
                    self.shared.clone(),
                    inner,
                    req,
                )));
            }
        };
        match circuit.admit() {
            Ok(permit) => ResponseFuture::called(self.inner.call(req), permit),
            Err(refusal) => {
                let cfg = self.shared.config();
                note_rejection(cfg, circuit, refusal);
                if cfg.fallbacks.is_empty() {
                    ResponseFuture::ready(refusal_response(&refusal_error(
                        cfg,
                        &circuit.key,
                        refusal,
                    )))
                } else {
                    ResponseFuture::boxed(Box::pin(degrade(
                        self.shared.clone(),
                        circuit.clone(),
                        refusal,
                        self.inner.clone(),
                        req,
                    )))
                }
            }
        }
    }
}

async fn keyed_by_body<S, ReqBody, ResBody>(
    shared: Arc<Shared>,
    mut inner: S,
    req: Request<ReqBody>,
) -> Result<Response<ResBody>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
    ReqBody: Body + From<Bytes> + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError>,
    ResBody: From<Bytes> + Send + 'static,
{
    let cfg = shared.config();
    let req = match ensure_view(req, cfg.body_limit, &CharEstimator).await {
        Ok(req) => req,
        // Not JSON: no model to key on; the upstream answers the bad request itself.
        Err((req, crate::request::ViewError::Parse(_))) => return inner.call(req).await,
        Err((_, e)) => return Ok(e.to_api_error().to_response()),
    };
    let circuit = match circuit_for(&shared, &req) {
        Some(Ok(c)) => c,
        // A body without a model (or none at all) goes through unguarded.
        _ => return inner.call(req).await,
    };
    match circuit.admit() {
        // The same timers and drop rules as the direct path.
        Ok(permit) => ResponseFuture::called(inner.call(req), permit).await,
        Err(refusal) => {
            note_rejection(cfg, &circuit, refusal);
            if cfg.fallbacks.is_empty() {
                Ok(refusal_response(&refusal_error(cfg, &circuit.key, refusal)))
            } else {
                degrade(shared.clone(), circuit, refusal, inner, req).await
            }
        }
    }
}

fn copy_request<B>(parts: &http::request::Parts, body: B) -> Request<B> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    *req.extensions_mut() = parts.extensions.clone();
    req
}

fn rewrite_model(bytes: &[u8], model: &str) -> Result<Bytes, &'static str> {
    let mut json: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|_| "the request body is not JSON")?;
    let obj = json
        .as_object_mut()
        .ok_or("the request body is not a JSON object")?;
    obj.insert("model".into(), serde_json::Value::String(model.into()));
    serde_json::to_vec(&json)
        .map(Bytes::from)
        .map_err(|_| "the request body could not be written")
}

fn mark<B>(mut res: Response<B>, name: &str) -> Response<B> {
    if let Ok(v) = HeaderValue::from_str(name) {
        res.headers_mut().insert(X_LLM_LAYERS_FALLBACK, v);
    }
    res
}

enum Body0<B> {
    Whole(Option<Request<B>>),
    Buffered(http::request::Parts, Bytes),
}

async fn degrade<S, ReqBody, ResBody>(
    shared: Arc<Shared>,
    circuit: Arc<Circuit>,
    refusal: Refusal,
    mut inner: S,
    req: Request<ReqBody>,
) -> Result<Response<ResBody>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
    ReqBody: Body + From<Bytes> + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError>,
    ResBody: From<Bytes> + Send + 'static,
{
    let cfg = shared.config();
    let steps = &cfg.fallbacks;
    let consuming = steps
        .iter()
        .filter(|s| !matches!(s, FallbackStep::Static { .. }))
        .count();
    let needs_bytes = consuming > 1
        || steps
            .iter()
            .any(|s| matches!(s, FallbackStep::Model { .. }));
    let mut source = if needs_bytes {
        match crate::body::buffer_request(req, cfg.body_limit).await {
            Ok((req, bytes)) => {
                let (parts, _) = req.into_parts();
                Body0::Buffered(parts, bytes)
            }
            Err(e) => return Ok(e.to_api_error().to_response()),
        }
    } else {
        Body0::Whole(Some(req))
    };
    let mut causes: Vec<String> = Vec::new();
    for step in steps.iter() {
        let (name, result): (&str, Result<Response<ResBody>, String>) = match step {
            FallbackStep::Static {
                name,
                status,
                headers,
                body,
            } => {
                let mut res = Response::new(ResBody::from(body.clone()));
                *res.status_mut() = *status;
                *res.headers_mut() = headers.clone();
                (name, Ok(res))
            }
            FallbackStep::Service { name, call } => {
                let Some(call) = call.downcast_ref::<DynCall<ReqBody, ResBody>>() else {
                    tracing::warn!(breaker = ?cfg.name, fallback = ?name, "fallback service skipped: its body types differ from the guarded service's");
                    causes.push(format!(
                        "fallback '{name}' does not accept this request type"
                    ));
                    continue;
                };
                let req = match &mut source {
                    Body0::Whole(r) => match r.take() {
                        Some(r) => r,
                        None => continue,
                    },
                    Body0::Buffered(parts, bytes) => {
                        copy_request(parts, ReqBody::from(bytes.clone()))
                    }
                };
                let out = call(req).await.map_err(|e| {
                    crate::classify::classify_transport_error(e.as_ref())
                        .message()
                        .to_owned()
                });
                (name, out)
            }
            FallbackStep::Model { model } => {
                let Body0::Buffered(parts, bytes) = &source else {
                    continue;
                };
                // With circuits per model, a backup model whose own circuit is open is skipped.
                let backup_key = match cfg.key_by {
                    CircuitKey::Model => Some(model.to_string()),
                    CircuitKey::UpstreamAndModel => {
                        let r = copy_request(parts, ());
                        Some(format!("{}/{model}", upstream_of(cfg, &r)))
                    }
                    _ => None,
                };
                if let Some(c) = backup_key.and_then(|k| shared.get(&k)) {
                    if c.open_remaining().is_some() {
                        causes.push(format!("the circuit for '{model}' is open too"));
                        continue;
                    }
                }
                let body = match rewrite_model(bytes, model) {
                    Ok(b) => b,
                    Err(why) => {
                        causes.push(format!("fallback '{model}' failed: {why}"));
                        continue;
                    }
                };
                let mut req = copy_request(parts, ReqBody::from(body.clone()));
                req.headers_mut()
                    .insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
                // The parsed view names the old model; later layers parse the new body.
                req.extensions_mut().remove::<RequestView>();
                let out = async {
                    futures_util::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
                    inner.call(req).await
                }
                .await
                .map_err(|e| {
                    let e: BoxError = e.into();
                    crate::classify::classify_transport_error(e.as_ref())
                        .message()
                        .to_owned()
                });
                (model, out)
            }
        };
        let result = result.and_then(|res| {
            if cfg.classifier.response(&res) == Outcome::Failure {
                Err(format!(
                    "upstream answered with status {}",
                    res.status().as_u16()
                ))
            } else {
                Ok(res)
            }
        });
        let ok = result.is_ok();
        emit(
            &cfg.on_event,
            BreakerEvent::Fallback {
                name: cfg.name.clone(),
                key: circuit.key.clone(),
                fallback: Arc::from(name),
                ok,
            },
        );
        match result {
            Ok(res) => {
                circuit.counters.fallbacks.fetch_add(1, Ordering::Relaxed);
                return Ok(mark(res, name));
            }
            Err(why) => causes.push(format!("fallback '{name}' failed: {why}")),
        }
    }
    let base = refusal_error(cfg, &circuit.key, refusal);
    let mut err = ApiError::new(
        ErrorCode::ServiceUnavailable,
        format!("{} {}.", base.message(), causes.join("; ")),
    );
    err.set_retry_after(base.retry_after());
    Ok(refusal_response(&err))
}
