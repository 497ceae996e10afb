//! The response future.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::body::{Meter, RateLimitBody};
use super::shared::Admitted;

type SlowOutput<ReqBody, ResBody> =
    Result<(Request<ReqBody>, Admitted), Response<RateLimitBody<ResBody>>>;

/// The boxed admission of a request that had to read its body or wait.
pub(crate) type Slow<ReqBody, ResBody> =
    Pin<Box<dyn Future<Output = SlowOutput<ReqBody, ResBody>> + Send>>;

pin_project! {
    /// The response future of [`RateLimit`](super::RateLimit).
    ///
    /// An admitted request's concurrency slot lives here until the response head arrives, then
    /// in the response body; dropping the future releases it.
    pub struct ResponseFuture<S, ReqBody, ResBody>
    where
        S: Service<Request<ReqBody>>,
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
    {
        Admitting {
            fut: Slow<ReqBody, ResBody>,
            svc: Option<S>,
        },
        Called {
            #[pin]
            fut: S::Future,
            admitted: Option<Admitted>,
        },
        Ready {
            res: Option<Box<Response<RateLimitBody<ResBody>>>>,
        },
    }
}

impl<S, ReqBody, ResBody> ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>>,
{
    pub(crate) fn called(fut: S::Future, admitted: Admitted) -> Self {
        ResponseFuture {
            state: State::Called {
                fut,
                admitted: Some(admitted),
            },
        }
    }

    pub(crate) fn ready(res: Response<RateLimitBody<ResBody>>) -> Self {
        ResponseFuture {
            state: State::Ready {
                res: Some(Box::new(res)),
            },
        }
    }

    pub(crate) fn admitting(fut: Slow<ReqBody, ResBody>, svc: S) -> Self {
        ResponseFuture {
            state: State::Admitting {
                fut,
                svc: Some(svc),
            },
        }
    }
}

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Output = Result<Response<RateLimitBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Admitting { fut, svc } => match ready!(fut.as_mut().poll(cx)) {
                    Ok((req, admitted)) => {
                        let Some(mut svc) = svc.take() else {
                            unreachable!("the admission completes once");
                        };
                        let fut = svc.call(req);
                        this.state.set(State::Called {
                            fut,
                            admitted: Some(admitted),
                        });
                    }
                    Err(res) => return Poll::Ready(Ok(res)),
                },
                StateProj::Called { fut, admitted } => {
                    let res = match ready!(fut.poll(cx)) {
                        Ok(res) => res,
                        Err(e) => {
                            // The layer cannot see whether the request reached the upstream:
                            // the charge stays, like a timeout's.
                            drop(admitted.take());
                            return Poll::Ready(Err(e));
                        }
                    };
                    let Some(admitted) = admitted.take() else {
                        unreachable!("the response completes once");
                    };
                    let (mut parts, body) = res.into_parts();
                    admitted
                        .headers
                        .write_on_answer(parts.status, &mut parts.headers);
                    let meter = admitted
                        .charge
                        .and_then(|c| Meter::for_answer(*c, &parts).map(Box::new));
                    let body = RateLimitBody::new(body, admitted.guard, meter);
                    return Poll::Ready(Ok(Response::from_parts(parts, body)));
                }
                StateProj::Ready { res } => {
                    let Some(res) = res.take() else {
                        unreachable!("polled after completion");
                    };
                    return Poll::Ready(Ok(*res));
                }
            }
        }
    }
}

impl<S, ReqBody, ResBody> std::fmt::Debug for ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
