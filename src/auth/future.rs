use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::header::{HeaderValue, WWW_AUTHENTICATE};
use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_service::Service;

use super::credentials::{extract_api_key, mask_key, CredentialError, MaybePresent};
use super::inject::{set_credential, strip_credentials};
use super::layer::{Forward, Shared};
use super::store::{AuthenticatedKey, KeyHash, KeyRecord, KeyStore, LookupResult};
use super::time::format_rfc3339;
use crate::body::{BoxError, LayerBody};
use crate::error::{ApiError, ErrorCode};
use crate::request::{deployment_from_path, EnsureView, RequestView};

/// A rejection, built before the inner body type is known: the envelope bytes, handed on as
/// [`LayerBody::full`] without a copy.
pub(crate) type Rejection = Response<Bytes>;

/// Why a bearer token was refused (see `auth::jwt`).
#[cfg_attr(not(feature = "jwt"), allow(dead_code))]
pub(crate) enum TokenError {
    /// Bad signature, issuer, audience, algorithm or claims; the message says which.
    Invalid(std::borrow::Cow<'static, str>),
    /// Past its `exp` (and the leeway).
    Expired(std::time::SystemTime),
    /// The token cannot be checked now (no signing keys could be fetched yet).
    Unavailable,
}

/// What a bearer token's validation answers: the record its claims map to.
pub(crate) type TokenResult = Result<Arc<KeyRecord>, TokenError>;
/// A bearer token's validation.
pub(crate) type TokenFuture = Pin<Box<dyn Future<Output = TokenResult> + Send>>;

/// What a request carries while its key is looked up. `inner` is a fresh clone of the inner
/// service, not polled ready yet.
pub(crate) struct Pending<S, K, B> {
    pub(crate) req: Request<B>,
    pub(crate) inner: S,
    pub(crate) shared: Arc<Shared<K>>,
    pub(crate) hash: KeyHash,
    /// The credential headers the request may carry, to strip.
    pub(crate) present: MaybePresent,
}

/// What a request carries while its body is read for the model.
pub(crate) struct Viewing<S, K> {
    inner: S,
    shared: Arc<Shared<K>>,
    record: Arc<KeyRecord>,
    present: MaybePresent,
    labels: crate::metrics::RequestLabels,
}

pin_project! {
    /// The response future of [`ApiKeyAuth`](super::ApiKeyAuth).
    ///
    /// It looks the key up, reads the body when the key's allow-list needs the model, and
    /// only then waits for the inner service (a clone taken in `call`) to be ready and calls
    /// it: a request whose key is being looked up or whose body is still arriving holds no
    /// slot of a concurrency limit below. A request admitted within `call` arrives here with
    /// the inner service already called, or, when that was not ready, still to be driven.
    pub struct ResponseFuture<S, K, B>
    where
        S: Service<Request<LayerBody<B>>>,
        K: KeyStore,
    {
        #[pin]
        state: State<S, K, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, K, B>
    where
        S: Service<Request<LayerBody<B>>>,
        K: KeyStore,
    {
        Rejected {
            response: Option<Rejection>,
            labels: crate::metrics::RequestLabels,
        },
        Lookup {
            #[pin]
            lookup: K::Future,
            pending: Option<Pending<S, K, B>>,
        },
        Token {
            validation: TokenFuture,
            pending: Option<Pending<S, K, B>>,
        },
        Viewing {
            #[pin]
            view: EnsureView<B>,
            ctx: Option<Viewing<S, K>>,
        },
        Ready {
            inner: S,
            req: Option<Request<LayerBody<B>>>,
        },
        Failed {
            error: Option<S::Error>,
        },
        Called {
            #[pin]
            future: S::Future,
        },
        Done,
    }
}

impl<S, K, B> ResponseFuture<S, K, B>
where
    S: Service<Request<LayerBody<B>>>,
    K: KeyStore,
{
    pub(crate) fn rejected(response: Rejection, ext: &http::Extensions) -> Self {
        ResponseFuture {
            state: State::Rejected {
                response: Some(response),
                labels: crate::metrics::RequestLabels::route_only(ext),
            },
        }
    }

    pub(crate) fn lookup(lookup: K::Future, pending: Pending<S, K, B>) -> Self {
        ResponseFuture {
            state: State::Lookup {
                lookup,
                pending: Some(pending),
            },
        }
    }

    #[cfg_attr(not(feature = "jwt"), allow(dead_code))]
    pub(crate) fn token(validation: TokenFuture, pending: Pending<S, K, B>) -> Self {
        ResponseFuture {
            state: State::Token {
                validation,
                pending: Some(pending),
            },
        }
    }

    /// The inner service, called within `call`.
    pub(crate) fn called(future: S::Future) -> Self {
        ResponseFuture {
            state: State::Called { future },
        }
    }

    /// The inner service, polled within `call`, was not ready yet: this future drives it.
    pub(crate) fn ready(inner: S, req: Request<LayerBody<B>>) -> Self {
        ResponseFuture {
            state: State::Ready {
                inner,
                req: Some(req),
            },
        }
    }

    /// The inner service's `poll_ready` failed within `call`.
    pub(crate) fn failed(error: S::Error) -> Self {
        ResponseFuture {
            state: State::Failed { error: Some(error) },
        }
    }

    /// Carries out a decision taken within `call` (the store answered at once).
    pub(crate) fn decided(
        decision: Decision,
        req: Request<B>,
        inner: S,
        shared: &Arc<Shared<K>>,
        present: MaybePresent,
    ) -> Self
    where
        B: Body,
    {
        ResponseFuture {
            state: proceed(decision, req, inner, shared, present),
        }
    }
}

impl<S, K, B> std::fmt::Debug for ResponseFuture<S, K, B>
where
    S: Service<Request<LayerBody<B>>>,
    K: KeyStore,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Rejected { .. } => "rejected",
            State::Lookup { .. } => "looking up the key",
            State::Token { .. } => "validating the bearer token",
            State::Viewing { .. } => "reading the model",
            State::Ready { .. } => "waiting for the inner service",
            State::Failed { .. } => "failed",
            State::Called { .. } => "called",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

const BEARER: HeaderValue = HeaderValue::from_static("Bearer");
const INVALID_REQUEST: HeaderValue = HeaderValue::from_static("Bearer error=\"invalid_request\"");
const INVALID_TOKEN: HeaderValue = HeaderValue::from_static("Bearer error=\"invalid_token\"");
const INSUFFICIENT_SCOPE: HeaderValue =
    HeaderValue::from_static("Bearer error=\"insufficient_scope\"");

fn respond(err: ApiError, challenge: HeaderValue) -> Rejection {
    crate::metrics::auth_rejected(err.code(), challenge == BEARER);
    tracing::info!(
        target: "llm_layers::auth",
        layer = "auth",
        code = err.code().as_str(),
        error_message = ?err.message(),
        "request rejected"
    );
    let mut res = err.to_response::<Bytes>();
    res.headers_mut().insert(WWW_AUTHENTICATE, challenge);
    res
}

/// The answer for a request whose headers carry no usable key.
pub(crate) fn reject_credentials(e: &CredentialError) -> Rejection {
    let challenge = if e.is_missing() {
        BEARER
    } else {
        INVALID_REQUEST
    };
    respond(
        ApiError::new(ErrorCode::InvalidApiKey, e.message()),
        challenge,
    )
}

fn masked<B>(req: &Request<B>, shared: &Shared<impl Sized>) -> String {
    extract_api_key(req.headers(), shared.accepted).map_or_else(|_| "***".to_owned(), mask_key)
}

/// Model names are the client's; a long one is cut for the message.
fn shown_model(model: &str) -> String {
    const MAX: usize = 100;
    match model.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &model[..i]),
        None => model.to_owned(),
    }
}

fn allowed_list(record: &KeyRecord) -> String {
    record
        .models()
        .iter()
        .map(|p| p.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where a model the upstream may use comes from.
#[derive(Clone, Copy)]
enum Source {
    /// The Azure-style deployment in the path.
    Deployment,
    /// The body's `model`.
    Model,
    /// The body's `models` array (OpenRouter-style fallbacks).
    Models,
}

/// The answer when a restricted key's request may reach a model the key may not use, or names
/// none. Every model the upstream may serve is checked: the deployment the path names (read
/// from the path itself, as the upstream will route it, so a view built without the path does
/// not hide it), the body's `model` and each of its `models`.
fn check_model(record: &KeyRecord, view: Option<&RequestView>, path: &str) -> Option<Rejection> {
    let from_path = deployment_from_path(path);
    let sources = from_path
        .as_deref()
        .map(|m| (m, Source::Deployment))
        .into_iter()
        .chain(
            view.and_then(RequestView::deployment)
                .map(|m| (m, Source::Deployment)),
        )
        .chain(
            view.and_then(RequestView::model)
                .map(|m| (m, Source::Model)),
        )
        .chain(
            view.into_iter()
                .flat_map(|v| v.fallback_models().iter().map(|m| (&**m, Source::Models))),
        );
    let mut named = false;
    for (model, source) in sources {
        named = true;
        if record.allows_model(model) {
            continue;
        }
        let (whence, param) = match source {
            Source::Deployment => (" (the deployment named in the path)", "model"),
            Source::Model => ("", "model"),
            Source::Models => (" (in `models`)", "models"),
        };
        return Some(respond(
            ApiError::new(
                ErrorCode::PermissionDenied,
                format!(
                    "This API key may not use the model `{}`{whence}. It may use: {}.",
                    shown_model(model),
                    allowed_list(record)
                ),
            )
            .with_param(param),
            INSUFFICIENT_SCOPE,
        ));
    }
    if named {
        return None;
    }
    Some(respond(
        ApiError::new(
            ErrorCode::PermissionDenied,
            format!(
                "This API key may only use some models ({}), and the request names no model; \
                 send `model` in the JSON body.",
                allowed_list(record)
            ),
        )
        .with_param("model"),
        INSUFFICIENT_SCOPE,
    ))
}

/// Readies an accepted request for the inner service: the credential headers handled as
/// configured, the identity and the record in the extensions.
pub(crate) fn admit<B>(
    req: &mut Request<B>,
    shared: &Shared<impl Sized>,
    record: Arc<KeyRecord>,
    present: MaybePresent,
) {
    crate::metrics::auth_ok();
    tracing::trace!(target: "llm_layers::auth", layer = "auth", key_id = ?record.id(), "API key accepted");
    match &shared.forward {
        Forward::Strip => strip_credentials(req.headers_mut(), present),
        Forward::Keep => {}
        Forward::Replace(header, value) => {
            set_credential(req.headers_mut(), *header, value, present)
        }
    }
    let ext = req.extensions_mut();
    ext.insert(record.identity().clone());
    ext.insert(AuthenticatedKey(record));
}

/// What the lookup's answer means for the request.
pub(crate) enum Decision {
    Reject(Rejection),
    Admit(Arc<KeyRecord>),
    /// The key is restricted to some models and the request's model is not known yet.
    View(Arc<KeyRecord>),
}

pub(crate) fn decide<B, K>(
    result: LookupResult,
    req: &Request<B>,
    hash: &KeyHash,
    shared: &Shared<K>,
) -> Decision {
    let record = match result {
        Ok(Some(record)) if record.hash().ct_eq(hash) => record,
        Ok(_) => {
            let msg = format!("Incorrect API key provided: {}.", masked(req, shared));
            return Decision::Reject(respond(
                ApiError::new(ErrorCode::InvalidApiKey, msg),
                INVALID_TOKEN,
            ));
        }
        Err(e) => {
            crate::metrics::auth_rejected(ErrorCode::ServiceUnavailable, false);
            tracing::warn!(target: "llm_layers::auth", layer = "auth", code = ErrorCode::ServiceUnavailable.as_str(), error = ?e.to_string(), "key store lookup failed");
            return Decision::Reject(
                ApiError::new(
                    ErrorCode::ServiceUnavailable,
                    "The API key could not be checked right now; try again shortly.",
                )
                .to_response::<Bytes>(),
            );
        }
    };
    decide_record(record, req, shared)
}

/// The decision for a bearer token's validation.
fn decide_token<B, K>(result: TokenResult, req: &Request<B>, shared: &Shared<K>) -> Decision {
    match result {
        Ok(record) => decide_record(record, req, shared),
        Err(TokenError::Invalid(why)) => {
            tracing::debug!(target: "llm_layers::auth", layer = "auth", reason = ?why, "bearer token refused");
            Decision::Reject(respond(
                ApiError::new(
                    ErrorCode::InvalidApiKey,
                    format!("The access token is not valid: {why}."),
                ),
                INVALID_TOKEN,
            ))
        }
        Err(TokenError::Expired(at)) => Decision::Reject(respond(
            ApiError::new(
                ErrorCode::ExpiredApiKey,
                format!(
                    "The access token expired at {}; get a new one from the identity provider.",
                    format_rfc3339(at)
                ),
            ),
            INVALID_TOKEN,
        )),
        Err(TokenError::Unavailable) => Decision::Reject({
            crate::metrics::auth_rejected(ErrorCode::ServiceUnavailable, false);
            ApiError::new(
                ErrorCode::ServiceUnavailable,
                "The access token could not be checked right now (the identity provider's keys \
                 are not available); try again shortly.",
            )
            .to_response::<Bytes>()
        }),
    }
}

/// What a found record means for the request: revoked, expired, or the models it may use.
fn decide_record<B, K>(record: Arc<KeyRecord>, req: &Request<B>, shared: &Shared<K>) -> Decision {
    if record.is_revoked() {
        let msg = format!(
            "The API key {} has been revoked; a new key is needed.",
            masked(req, shared)
        );
        tracing::debug!(target: "llm_layers::auth", layer = "auth", key_id = ?record.id(), "revoked key");
        return Decision::Reject(respond(
            ApiError::new(ErrorCode::RevokedApiKey, msg),
            INVALID_TOKEN,
        ));
    }
    if let Some(at) = record.expires_at() {
        if shared.now() >= at {
            let msg = format!(
                "The API key {} expired at {}; an expired key cannot be renewed, so a new key is \
                 needed.",
                masked(req, shared),
                format_rfc3339(at)
            );
            tracing::debug!(target: "llm_layers::auth", layer = "auth", key_id = ?record.id(), "expired key");
            return Decision::Reject(respond(
                ApiError::new(ErrorCode::ExpiredApiKey, msg),
                INVALID_TOKEN,
            ));
        }
    }
    if record.is_unrestricted() {
        return Decision::Admit(record);
    }
    match RequestView::from_extensions(req.extensions()) {
        Some(view) => match check_model(&record, Some(view), req.uri().path()) {
            Some(res) => Decision::Reject(res),
            None => Decision::Admit(record),
        },
        None => Decision::View(record),
    }
}

fn after_lookup<S, K, B>(result: LookupResult, p: Pending<S, K, B>) -> State<S, K, B>
where
    S: Service<Request<LayerBody<B>>>,
    K: KeyStore,
    B: Body,
{
    let Pending {
        req,
        inner,
        shared,
        hash,
        present,
    } = p;
    let decision = decide(result, &req, &hash, &shared);
    proceed(decision, req, inner, &shared, present)
}

fn after_token<S, K, B>(result: TokenResult, p: Pending<S, K, B>) -> State<S, K, B>
where
    S: Service<Request<LayerBody<B>>>,
    K: KeyStore,
    B: Body,
{
    let Pending {
        req,
        inner,
        shared,
        hash: _,
        present,
    } = p;
    let decision = decide_token(result, &req, &shared);
    proceed(decision, req, inner, &shared, present)
}

/// Carries out a decision on a looked-up key or a checked token. An admitted request's body is
/// handed on untouched; only a key restricted to some models, with no view stored yet, reads
/// it (through [`EnsureView`]).
fn proceed<S, K, B>(
    decision: Decision,
    req: Request<B>,
    inner: S,
    shared: &Arc<Shared<K>>,
    present: MaybePresent,
) -> State<S, K, B>
where
    S: Service<Request<LayerBody<B>>>,
    K: KeyStore,
    B: Body,
{
    match decision {
        Decision::Reject(res) => State::Rejected {
            response: Some(res),
            labels: crate::metrics::RequestLabels::route_only(req.extensions()),
        },
        Decision::Admit(record) => {
            let mut req = req.map(LayerBody::new);
            admit(&mut req, shared, record, present);
            State::Ready {
                inner,
                req: Some(req),
            }
        }
        Decision::View(record) => State::Viewing {
            ctx: Some(Viewing {
                inner,
                shared: Arc::clone(shared),
                record,
                present,
                labels: crate::metrics::RequestLabels::route_only(req.extensions()),
            }),
            view: EnsureView::new(req, shared.body_limit, Arc::clone(&shared.estimator)),
        },
    }
}

impl<S, K, B, ResBody> Future for ResponseFuture<S, K, B>
where
    S: Service<Request<LayerBody<B>>, Response = Response<ResBody>>,
    K: KeyStore,
    B: Body,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<LayerBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Rejected { response, labels } => {
                    let res = response
                        .take()
                        .expect("ResponseFuture polled after completion");
                    if let Some(err) = res.extensions().get::<crate::ApiError>() {
                        labels.rejected(crate::metrics::layer::AUTH, err.code());
                    }
                    return Poll::Ready(Ok(res.map(LayerBody::full)));
                }
                StateProj::Lookup { lookup, pending } => {
                    let result = ready!(lookup.poll(cx));
                    let p = pending
                        .take()
                        .expect("ResponseFuture polled after completion");
                    let next = after_lookup(result, p);
                    state.set(next);
                }
                StateProj::Token {
                    validation,
                    pending,
                } => {
                    let result = ready!(validation.as_mut().poll(cx));
                    let p = pending
                        .take()
                        .expect("ResponseFuture polled after completion");
                    let next = after_token(result, p);
                    state.set(next);
                }
                StateProj::Viewing { view, ctx } => {
                    let result = ready!(view.poll(cx));
                    let Viewing {
                        inner,
                        shared,
                        record,
                        present,
                        labels,
                    } = ctx.take().expect("ResponseFuture polled after completion");
                    let next = match result {
                        Ok(mut req) => {
                            match check_model(
                                &record,
                                RequestView::from_extensions(req.extensions()),
                                req.uri().path(),
                            ) {
                                Some(res) => State::Rejected {
                                    response: Some(res),
                                    labels,
                                },
                                None => {
                                    admit(&mut req, &shared, record, present);
                                    State::Ready {
                                        inner,
                                        req: Some(req),
                                    }
                                }
                            }
                        }
                        Err(failure) => {
                            let err = failure.error().to_api_error();
                            tracing::info!(
                                target: "llm_layers::auth",
                                layer = "auth",
                                code = err.code().as_str(),
                                error_message = ?err.message(),
                                "request rejected"
                            );
                            State::Rejected {
                                response: Some(err.to_response()),
                                labels,
                            }
                        }
                    };
                    state.set(next);
                }
                StateProj::Ready { inner, req } => {
                    if let Err(e) = ready!(inner.poll_ready(cx)) {
                        // Final: the service is dropped, never polled again.
                        state.set(State::Done);
                        return Poll::Ready(Err(e));
                    }
                    let req = req.take().expect("ResponseFuture polled after completion");
                    let future = inner.call(req);
                    state.set(State::Called { future });
                }
                StateProj::Failed { error } => {
                    let e = error
                        .take()
                        .expect("ResponseFuture polled after completion");
                    state.set(State::Done);
                    return Poll::Ready(Err(e));
                }
                StateProj::Called { future } => {
                    let res = ready!(future.poll(cx))?;
                    return Poll::Ready(Ok(res.map(LayerBody::new)));
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}
