//! The response future.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_service::Service;

use super::config::Shared;
use super::rules;
use crate::body::{BoxError, BufferRequest, LayerBody};
use crate::error::ApiError;
use crate::fields::Fields;
use crate::request::{Endpoint, EnsureView, RequestHead, RequestView, ViewError};

/// The built-in checks, then the user's rules, on a request whose body is `bytes`.
pub(crate) fn verdict(
    shared: &Shared,
    head: &RequestHead<'_>,
    view: &RequestView,
    bytes: &Bytes,
    fields: Option<&Fields>,
) -> Result<(), ApiError> {
    rules::check(shared, view, Some(bytes), fields)?;
    for rule in &shared.rules {
        rule.check(head, bytes)?;
    }
    Ok(())
}

pin_project! {
    /// The future of [`Validate`](super::Validate): reads the body (bounded, through
    /// [`EnsureView`] or [`BufferRequest`]), checks it, then drives its own clone of the inner
    /// service to readiness and runs its future — or answers with the rejection.
    ///
    /// It holds no boxed future. A `poll_ready` error of the inner service is its output, and
    /// that service is not polled again.
    pub struct ResponseFuture<S, ReqBody, ResBody>
    where
        S: Service<Request<LayerBody<ReqBody>>>,
    {
        #[pin]
        state: State<S, ReqBody, ResBody>,
        inner: Option<S>,
        shared: Option<Arc<Shared>>,
        labels: crate::metrics::RequestLabels,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqBody, ResBody>
    where
        S: Service<Request<LayerBody<ReqBody>>>,
    {
        // No view yet: the body is read and parsed into one.
        Parsing {
            #[pin]
            ensure: EnsureView<ReqBody>,
        },
        // A stored view that kept no body: the body is read for the checks of its fields.
        Buffering {
            #[pin]
            buf: BufferRequest<ReqBody>,
        },
        // Checked: the inner service is driven to readiness, then called.
        Ready {
            req: Option<Request<LayerBody<ReqBody>>>,
        },
        Called {
            #[pin]
            future: S::Future,
        },
        Rejected {
            error: Option<ApiError>,
            _body: std::marker::PhantomData<fn() -> ResBody>,
        },
    }
}

impl<S, ReqBody, ResBody> ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<LayerBody<ReqBody>>>,
    ReqBody: Body,
{
    pub(crate) fn ready(inner: S, req: Request<LayerBody<ReqBody>>) -> Self {
        ResponseFuture {
            state: State::Ready { req: Some(req) },
            inner: Some(inner),
            shared: None,
            labels: crate::metrics::RequestLabels::NONE,
        }
    }

    pub(crate) fn rejected(error: ApiError, ext: &http::Extensions) -> Self {
        ResponseFuture {
            state: State::Rejected {
                error: Some(error),
                _body: std::marker::PhantomData,
            },
            inner: None,
            shared: None,
            labels: crate::metrics::RequestLabels::capture(ext),
        }
    }

    pub(crate) fn parsing(inner: S, req: Request<ReqBody>, shared: Arc<Shared>) -> Self {
        ResponseFuture {
            labels: crate::metrics::RequestLabels::capture(req.extensions()),
            state: State::Parsing {
                ensure: {
                    let ensure =
                        EnsureView::new(req, shared.body_limit, Arc::clone(&shared.estimator));
                    // The checks' fields are read in the view's own pass over the body.
                    if shared.reads_fields() {
                        ensure.with_fields(shared.checks.messages)
                    } else {
                        ensure
                    }
                },
            },
            inner: Some(inner),
            shared: Some(shared),
        }
    }

    pub(crate) fn buffering(inner: S, req: Request<ReqBody>, shared: Arc<Shared>) -> Self {
        ResponseFuture {
            labels: crate::metrics::RequestLabels::capture(req.extensions()),
            state: State::Buffering {
                buf: BufferRequest::new(req, shared.body_limit),
            },
            inner: Some(inner),
            shared: Some(shared),
        }
    }
}

/// The checks on a request the [`EnsureView`] handed back: it holds the view (and its bytes)
/// unless the body was empty; `fields`, the fields the checks read, gathered in the view's
/// pass.
fn check_parsed<B>(
    shared: &Shared,
    req: &Request<LayerBody<B>>,
    fields: Option<&Fields>,
) -> Result<(), ApiError> {
    let view = RequestView::from_extensions(req.extensions());
    match view.and_then(|v| v.bytes().map(|b| (v, b))) {
        Some((view, bytes)) => verdict(shared, &RequestHead::of(req), view, bytes, fields),
        None => {
            // An empty body: not JSON.
            let endpoint = Endpoint::from_path(req.uri().path());
            match RequestView::parse(endpoint, b"", &*shared.estimator) {
                Err(e) => Err(ViewError::Parse(e).to_api_error()),
                Ok(_) => Ok(()),
            }
        }
    }
}

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<LayerBody<ReqBody>>, Response = Response<ResBody>>,
    ReqBody: Body,
    ReqBody::Error: Into<BoxError>,
{
    type Output = Result<Response<LayerBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let next = match this.state.as_mut().project() {
                StateProj::Called { future } => {
                    return future.poll(cx).map_ok(|res| res.map(LayerBody::new));
                }
                StateProj::Rejected { error, .. } => {
                    let error = error
                        .take()
                        .expect("ResponseFuture polled after completion");
                    this.labels
                        .rejected(crate::metrics::layer::VALIDATE, error.code());
                    tracing::info!(target: "llm_layers::validate", layer = "validate", code = error.code().as_str(), param = ?error.param(), "request rejected");
                    return Poll::Ready(Ok(error.to_response()));
                }
                StateProj::Parsing { ensure } => {
                    let shared = this.shared.as_deref().expect("kept until checked");
                    match ready!(ensure.poll_checked(cx)) {
                        Ok((req, fields)) => match check_parsed(shared, &req, fields.as_ref()) {
                            Ok(()) => State::Ready { req: Some(req) },
                            Err(e) => rejected(e),
                        },
                        Err(failure) => rejected(failure.error().to_api_error()),
                    }
                }
                StateProj::Buffering { buf } => {
                    let shared = this.shared.as_deref().expect("kept until checked");
                    match ready!(buf.poll(cx)) {
                        Ok((parts, bytes)) => {
                            let view = RequestView::from_extensions(&parts.extensions)
                                .expect("buffering only for a stored view");
                            let head = RequestHead::from_parts(&parts);
                            match verdict(shared, &head, view, &bytes, None) {
                                Ok(()) => State::Ready {
                                    req: Some(BufferRequest::<ReqBody>::rebuild(parts, bytes)),
                                },
                                Err(e) => rejected(e),
                            }
                        }
                        Err((_, e)) => rejected(e.to_api_error()),
                    }
                }
                StateProj::Ready { req } => {
                    let inner = this.inner.as_mut().expect("kept until called");
                    // An error is final: it is the answer, and the service is not polled again.
                    if let Err(e) = ready!(inner.poll_ready(cx)) {
                        *this.inner = None;
                        this.state.set(rejected_done());
                        return Poll::Ready(Err(e));
                    }
                    let req = req.take().expect("ResponseFuture polled after completion");
                    let future = inner.call(req);
                    *this.inner = None;
                    *this.shared = None;
                    State::Called { future }
                }
            };
            this.state.set(next);
        }
    }
}

fn rejected<S, ReqBody, ResBody>(error: ApiError) -> State<S, ReqBody, ResBody>
where
    S: Service<Request<LayerBody<ReqBody>>>,
{
    State::Rejected {
        error: Some(error),
        _body: std::marker::PhantomData,
    }
}

/// The state after the future gave its output: polling it again panics.
fn rejected_done<S, ReqBody, ResBody>() -> State<S, ReqBody, ResBody>
where
    S: Service<Request<LayerBody<ReqBody>>>,
{
    State::Rejected {
        error: None,
        _body: std::marker::PhantomData,
    }
}

impl<S, ReqBody, ResBody> std::fmt::Debug for ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<LayerBody<ReqBody>>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Parsing { .. } => "parsing",
            State::Buffering { .. } => "buffering",
            State::Ready { .. } => "ready",
            State::Called { .. } => "called",
            State::Rejected { .. } => "rejected",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
