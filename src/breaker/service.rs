use std::borrow::Cow;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body::Body;
use tower_service::Service;

use super::body::GuardedBody;
use super::circuit::{Circuit, Refusal};
use super::config::{CircuitKey, Config};
use super::events::{emit, BreakerEvent};
use super::fallback::{Fallback, NoFallback};
use super::future::ResponseFuture;
use super::registry::{Shared, SINGLE_KEY};
use super::X_LLM_LAYERS_FALLBACK;
use crate::body::{check_limit, BoxError, BufferRequest, LayerBody};
use crate::error::{ApiError, ErrorCode};
use crate::ext::RefusedLocally;
use crate::request::{deployment_from_path, EnsureView, RequestHead, RequestView};

/// A service guarded by circuit breakers. Built by [`CircuitBreakerLayer`](super::CircuitBreakerLayer).
///
/// It takes any request body `B` and hands the inner service a `Request<LayerBody<B>>`: the
/// body untouched, or (keyed by model, when no earlier layer parsed it) the bytes it read.
/// Its responses are `Response<LayerBody<GuardedBody<ResBody>>>`: the inner service's body,
/// which records a successful call when it ends ([`GuardedBody`]), or bytes of the breaker's
/// own (its refusals, a fixed fallback response).
///
/// Rejections are `503 service_unavailable` envelope responses (marked
/// [`RefusedLocally`]) and a call past the [call timeout](super::CircuitBreakerLayerBuilder::call_timeout) is
/// answered `504 timeout`, so `Error` stays the inner service's. The inner service's own `Err`
/// (from `poll_ready` or `call`) passes through unchanged, and counts as a failure.
///
/// # Readiness
///
/// [`poll_ready`](Service::poll_ready) is ready at once and does not poll the inner service;
/// each call takes a fresh clone of it, and its future reads the model when it must, asks the
/// circuit, and only then drives the clone's `poll_ready` (an `Err` from it is the call's
/// answer) and calls it. So a request whose body is still uploading holds no slot of a
/// concurrency limit inside, and a refused request never reaches the inner service at all.
pub struct CircuitBreaker<S, F = NoFallback> {
    inner: S,
    fallback: F,
    shared: Arc<Shared>,
}

impl<S: Clone, F: Clone> Clone for CircuitBreaker<S, F> {
    fn clone(&self) -> Self {
        CircuitBreaker {
            inner: self.inner.clone(),
            fallback: self.fallback.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: std::fmt::Debug, F> std::fmt::Debug for CircuitBreaker<S, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .field("name", &self.shared.config().name)
            .finish()
    }
}

impl<S, F> CircuitBreaker<S, F> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>, fallback: F) -> Self {
        CircuitBreaker {
            inner,
            fallback,
            shared,
        }
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

impl<S, F, B, ResBody> Service<Request<B>> for CircuitBreaker<S, F>
where
    S: Service<Request<LayerBody<B>>, Response = Response<ResBody>> + Clone,
    S::Error: 'static,
    F: Fallback<Request<LayerBody<B>>, Response<ResBody>, S::Error> + Clone,
    B: Body,
    B::Error: Into<BoxError>,
    ResBody: Body,
{
    type Response = Response<LayerBody<GuardedBody<ResBody>>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, F, B>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The inner service is polled ready in the call's future, on a fresh clone, once the
        // request is known to go through.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        crate::metrics::request(crate::metrics::layer::BREAKER);
        let inner = self.inner.clone();
        let cfg = self.shared.config();
        if cfg.walk_on_answer
            && matches!(
                key_of(cfg, &req),
                Key::Single | Key::Named(_) | Key::Shared(_)
            )
            && check_limit(req.headers(), req.body(), cfg.body_limit).is_ok()
        {
            // A chain with targets: the body is read once, before the primary, so that the
            // chain can be walked after the primary's answer. A body over the limit goes to
            // the primary unread (and no further after its answer).
            let buf = BufferRequest::new(req, cfg.body_limit);
            return ResponseFuture::buffer(self.shared.clone(), inner, self.fallback.clone(), buf);
        }
        match key_of(cfg, &req) {
            Key::Single => {
                let circuit = self.shared.single.clone();
                ResponseFuture::admit(
                    &self.shared,
                    circuit,
                    inner,
                    &self.fallback,
                    req.map(LayerBody::new),
                )
            }
            Key::Named(Cow::Borrowed(k)) => {
                let circuit = self.shared.circuit(k);
                ResponseFuture::admit(
                    &self.shared,
                    circuit,
                    inner,
                    &self.fallback,
                    req.map(LayerBody::new),
                )
            }
            Key::Named(Cow::Owned(k)) => {
                let circuit = self.shared.circuit(&k);
                ResponseFuture::admit(
                    &self.shared,
                    circuit,
                    inner,
                    &self.fallback,
                    req.map(LayerBody::new),
                )
            }
            Key::Shared(k) => {
                let circuit = self.shared.circuit(&k);
                ResponseFuture::admit(
                    &self.shared,
                    circuit,
                    inner,
                    &self.fallback,
                    req.map(LayerBody::new),
                )
            }
            Key::Unguarded => ResponseFuture::unguarded(inner, req.map(LayerBody::new)),
            Key::NeedView => {
                // The key needs the model and no earlier layer parsed the body.
                let view = EnsureView::new(req, cfg.body_limit, cfg.estimator.clone());
                let fallback = (!cfg.fallbacks.is_empty()).then(|| self.fallback.clone());
                ResponseFuture::view(self.shared.clone(), inner, fallback, view)
            }
        }
    }
}

pub(crate) enum Key<'a> {
    Single,
    Named(Cow<'a, str>),
    Shared(Arc<str>),
    NeedView,
    Unguarded,
}

/// The upstream of a request: the configured name, else `host[:port]` of the request URI
/// (never its user info, which may hold a password), else `"<unknown>"`. Never the `Host`
/// header, which a client may set to anything.
pub(crate) fn upstream_of<'a, B>(cfg: &'a Config, req: &'a Request<B>) -> &'a str {
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

pub(crate) fn key_of<'a, B>(cfg: &'a Config, req: &'a Request<B>) -> Key<'a> {
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
        CircuitKey::Custom(f) => match f(&RequestHead::of(req)) {
            Some(k) => Key::Shared(k),
            None => Key::Unguarded,
        },
    }
}

/// The circuit for a request once its view is read, or `None` when it goes unguarded (no
/// model in the body, or no body at all).
pub(crate) fn circuit_for<B>(shared: &Shared, req: &Request<B>) -> Option<Arc<Circuit>> {
    match key_of(shared.config(), req) {
        Key::Single => Some(shared.single.clone()),
        Key::Named(k) => Some(shared.circuit(&k)),
        Key::Shared(k) => Some(shared.circuit(&k)),
        Key::Unguarded | Key::NeedView => None,
    }
}

pub(crate) fn refusal_error(cfg: &Config, key: &str, refusal: Refusal) -> ApiError {
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
pub(crate) fn refusal_response<B: From<Bytes>>(
    err: &ApiError,
    labels: &crate::metrics::RequestLabels,
) -> Response<B> {
    labels.rejected(crate::metrics::layer::BREAKER, err.code());
    let mut res = err.to_response();
    res.extensions_mut().insert(RefusedLocally::CIRCUIT_BREAKER);
    res
}

pub(crate) fn note_rejection(cfg: &Config, circuit: &Circuit, refusal: Refusal) {
    crate::metrics::breaker_refused(&cfg.name, &circuit.key);
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
        tracing::debug!(layer = "breaker", name = ?cfg.name, circuit = ?circuit.key, retry_after_ms = retry_after.map(super::config::millis), "call rejected by open circuit");
    }
}

pub(crate) fn rewrite_model(bytes: &[u8], model: &str) -> Result<Bytes, &'static str> {
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

pub(crate) fn mark<B>(mut res: Response<B>, name: &str) -> Response<B> {
    if let Ok(v) = HeaderValue::from_str(name) {
        res.headers_mut().insert(X_LLM_LAYERS_FALLBACK, v);
    }
    res
}

pub(crate) fn copy_request<B>(parts: &http::request::Parts, body: B) -> Request<B> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    *req.extensions_mut() = parts.extensions.clone();
    req
}
