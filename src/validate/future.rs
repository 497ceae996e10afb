//! The response future.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response};
use http_body::Body;
use http_body_util::combinators::Collect;
use http_body_util::{LengthLimitError, Limited};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::config::Shared;
use super::rules;
use crate::body::BufferError;
use crate::request::{Endpoint, RequestView};

pin_project! {
    /// The future of [`Validate`](super::Validate): reads the body (bounded),
    /// checks it, then runs the inner service's future, or answers with the rejection.
    ///
    /// It holds no boxed future: reading the body is a named `http_body_util` future.
    pub struct ResponseFuture<S, ReqBody, ResBody>
    where
        S: Service<Request<ReqBody>>,
        ReqBody: Body,
        ReqBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        #[pin]
        state: State<S, ReqBody, ResBody>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqBody, ResBody>
    where
        S: Service<Request<ReqBody>>,
        ReqBody: Body,
        ReqBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        Buffering {
            #[pin]
            collect: Collect<Limited<ReqBody>>,
            parts: Option<Parts>,
            endpoint: Endpoint,
            inner: Option<S>,
            shared: Arc<Shared>,
        },
        Called {
            #[pin]
            future: S::Future,
        },
        Rejected {
            response: Option<Response<ResBody>>,
        },
    }
}

impl<S, ReqBody, ResBody> ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>>,
    ReqBody: Body,
    ReqBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    pub(crate) fn called(future: S::Future) -> Self {
        ResponseFuture {
            state: State::Called { future },
        }
    }

    pub(crate) fn rejected(response: Response<ResBody>) -> Self {
        ResponseFuture {
            state: State::Rejected {
                response: Some(response),
            },
        }
    }

    pub(crate) fn buffering(
        collect: Collect<Limited<ReqBody>>,
        parts: Parts,
        endpoint: Endpoint,
        inner: S,
        shared: Arc<Shared>,
    ) -> Self {
        ResponseFuture {
            state: State::Buffering {
                collect,
                parts: Some(parts),
                endpoint,
                inner: Some(inner),
                shared,
            },
        }
    }
}

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ReqBody: Body + From<Bytes>,
    ReqBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    ResBody: From<Bytes>,
{
    type Output = Result<Response<ResBody>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Called { future } => return future.poll(cx),
                StateProj::Rejected { response } => {
                    return Poll::Ready(Ok(response
                        .take()
                        .expect("ResponseFuture polled after completion")));
                }
                StateProj::Buffering {
                    collect,
                    parts,
                    endpoint,
                    inner,
                    shared,
                } => {
                    let collected = ready!(collect.poll(cx));
                    let bytes = match collected {
                        Ok(c) => c.to_bytes(),
                        Err(e) => {
                            let err = if e.is::<LengthLimitError>() {
                                BufferError::TooLarge {
                                    limit: shared.body_limit,
                                }
                            } else {
                                BufferError::Read(e)
                            };
                            let response = err.to_api_error().to_response();
                            this.state.set(State::Rejected {
                                response: Some(response),
                            });
                            continue;
                        }
                    };
                    let path = parts.as_ref().map_or("", |p| p.uri.path());
                    let verdict = RequestView::parse(*endpoint, &bytes, &*shared.estimator)
                        .map(|view| view.with_path(path))
                        .map_err(|e| crate::request::ViewError::Parse(e).to_api_error())
                        .and_then(|view| rules::check(shared, &view).map(|()| view));
                    let next = match verdict {
                        Ok(view) => {
                            let parts = parts
                                .take()
                                .expect("ResponseFuture polled after completion");
                            let mut inner = inner
                                .take()
                                .expect("ResponseFuture polled after completion");
                            let mut req = Request::from_parts(parts, ReqBody::from(bytes));
                            req.extensions_mut().insert(view);
                            State::Called {
                                future: inner.call(req),
                            }
                        }
                        Err(e) => State::Rejected {
                            response: Some(e.to_response()),
                        },
                    };
                    this.state.set(next);
                }
            }
        }
    }
}

impl<S, ReqBody, ResBody> std::fmt::Debug for ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>>,
    ReqBody: Body,
    ReqBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Buffering { .. } => "buffering",
            State::Called { .. } => "called",
            State::Rejected { .. } => "rejected",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
