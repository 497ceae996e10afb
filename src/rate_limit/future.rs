//! The response future.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::body::{BoxError, LayerBody};
use crate::request::{EnsureView, RequestHead};

use super::body::{Meter, RateLimitBody};
use super::config::OnLimit;
use super::shared::{Admitted, Rejected, Shared};

/// A decision of the shared store, under way (feature `redis`).
#[cfg(feature = "redis")]
type Remote = super::redis::Admission;
/// Without the `redis` feature no decision is remote: a future that cannot exist.
#[cfg(not(feature = "redis"))]
type Remote = NoRemote;

/// The remote admission of a build without the `redis` feature: no value of it exists.
#[cfg(not(feature = "redis"))]
pub(crate) enum NoRemote {}

#[cfg(not(feature = "redis"))]
impl Future for NoRemote {
    type Output = (http::request::Parts, Result<Admitted, Box<Rejected>>);

    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
        match *self {}
    }
}

pin_project! {
    /// The response future of [`RateLimit`](super::RateLimit).
    ///
    /// It does the slow work first — reading the body when a token quota applies (through
    /// [`EnsureView`]), deciding on admission, waiting in [`OnLimit::Wait`] — and only then
    /// drives its own clone of the inner service to readiness and calls it, so a request that
    /// is still uploading or waiting for its bucket holds none of the inner service's capacity.
    /// A `poll_ready` error of the inner service is the call's error.
    ///
    /// An admitted request's concurrency slot lives here until the response head arrives, then
    /// in the response body; dropping the future releases it.
    ///
    /// Its shape follows the common case: a request decided at once carries only itself, its
    /// admission and the inner service; the rarer states (reading the body, waiting, asking a
    /// shared store) live behind one box, with the layer's state they need.
    pub struct ResponseFuture<S, B, ResBody>
    where
        S: Service<Request<LayerBody<B>>>,
    {
        #[pin]
        state: State<S, B, ResBody>,
        // Kept beside the states, so that none of them moves it.
        admitted: Option<Admitted>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B, ResBody>
    where
        S: Service<Request<LayerBody<B>>>,
    {
        // Not decided yet, or refused for now.
        Slow {
            slow: Pin<Box<Slow<S, B>>>,
        },
        // Admitted: the inner service is driven to readiness.
        Readying {
            svc: Option<S>,
            req: Option<Request<LayerBody<B>>>,
        },
        Called {
            #[pin]
            fut: S::Future,
        },
        Done {
            res: Option<Box<Response<RateLimitBody<ResBody>>>>,
        },
    }
}

pin_project! {
    /// The rare states, boxed: what they need of the layer comes with them.
    struct Slow<S, B> {
        #[pin]
        step: Step<B>,
        svc: Option<S>,
        shared: Arc<Shared>,
        waited: Duration,
    }
}

pin_project! {
    #[project = StepProj]
    enum Step<B> {
        // Reading the body for the token estimate.
        Viewing {
            #[pin]
            view: EnsureView<B>,
        },
        // The shared store decides; it holds the head, the body waits here.
        Remote {
            fut: Remote,
            body: Option<LayerBody<B>>,
        },
        // Refused for now; waits `wait`, then asks again.
        Paused {
            wait: Duration,
            req: Option<Request<LayerBody<B>>>,
        },
        Waiting {
            #[pin]
            sleep: tokio::time::Sleep,
            req: Option<Request<LayerBody<B>>>,
        },
    }
}

/// An admitted request, with what it carries until its response body ends.
type Decided<B> = (Request<LayerBody<B>>, Admitted);

/// What a decision leads to.
enum Next<B> {
    Admitted(Request<LayerBody<B>>, Admitted),
    Paused(Duration, Request<LayerBody<B>>),
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    Remote(Remote, LayerBody<B>),
    Refused(Box<Rejected>),
    /// The body could not be read: the answer is ready.
    Failed(Response<bytes::Bytes>),
}

impl<S, B, ResBody> ResponseFuture<S, B, ResBody>
where
    S: Service<Request<LayerBody<B>>> + Clone,
{
    /// Reads the body first.
    pub(crate) fn viewing(view: EnsureView<B>, inner: &S, shared: &Arc<Shared>) -> Self {
        ResponseFuture {
            state: State::Slow {
                slow: Box::pin(Slow {
                    step: Step::Viewing { view },
                    svc: Some(inner.clone()),
                    shared: shared.clone(),
                    waited: Duration::ZERO,
                }),
            },
            admitted: None,
        }
    }

    /// Decides on `req` now (in memory) or starts the store's decision; the inner service is
    /// cloned only when the request is not refused at once.
    pub(crate) fn admitting(req: Request<LayerBody<B>>, inner: &S, shared: &Arc<Shared>) -> Self {
        let mut waited = Duration::ZERO;
        #[cfg(feature = "redis")]
        let remote = shared.is_remote();
        #[cfg(not(feature = "redis"))]
        let remote = false;
        if !remote {
            // Decided in memory: an admission goes straight to readiness, without passing
            // through the other decisions' shape.
            match shared.admit(&RequestHead::of(&req)) {
                Ok(admitted) => {
                    crate::metrics::rate_limit_admitted(
                        admitted.charge.as_ref().map(|c| c.charged()),
                    );
                    return ResponseFuture {
                        state: State::Readying {
                            svc: Some(inner.clone()),
                            req: Some(req),
                        },
                        admitted: Some(admitted),
                    };
                }
                Err(rejected) => return Self::refused(req, inner, shared, rejected),
            }
        }
        Self::next(decide(shared, &mut waited, req), inner, shared, waited)
    }

    /// A refusal: waited for, or answered.
    #[cold]
    fn refused(
        req: Request<LayerBody<B>>,
        inner: &S,
        shared: &Arc<Shared>,
        rejected: Box<Rejected>,
    ) -> Self {
        let mut waited = Duration::ZERO;
        let next = on_decision(shared, &mut waited, req, Err(rejected));
        Self::next(next, inner, shared, waited)
    }

    /// The future for a decision made (or started) outside the in-memory admission.
    fn next(next: Next<B>, inner: &S, shared: &Arc<Shared>, waited: Duration) -> Self {
        let mut admitted = None;
        let state = match next {
            Next::Admitted(req, a) => {
                admitted = Some(a);
                State::Readying {
                    svc: Some(inner.clone()),
                    req: Some(req),
                }
            }
            Next::Refused(rejected) => done(rejected.into_response()),
            Next::Failed(res) => done(res.map(RateLimitBody::from)),
            next => State::Slow {
                slow: Box::pin(Slow {
                    step: match next {
                        Next::Paused(wait, req) => Step::Paused {
                            wait,
                            req: Some(req),
                        },
                        Next::Remote(fut, body) => Step::Remote {
                            fut,
                            body: Some(body),
                        },
                        _ => unreachable!("the other decisions are answered above"),
                    },
                    svc: Some(inner.clone()),
                    shared: shared.clone(),
                    waited,
                }),
            },
        };
        ResponseFuture { state, admitted }
    }
}

/// Asks for admission of `req`.
fn decide<B>(shared: &Arc<Shared>, waited: &mut Duration, req: Request<LayerBody<B>>) -> Next<B> {
    #[cfg(feature = "redis")]
    if shared.is_remote() {
        let (parts, body) = req.into_parts();
        return Next::Remote(super::redis::admission(shared.clone(), parts), body);
    }
    let decision = shared.admit(&RequestHead::of(&req));
    on_decision(shared, waited, req, decision)
}

/// What a decision leads to: readiness, a wait, or the refusal.
fn on_decision<B>(
    shared: &Shared,
    waited: &mut Duration,
    req: Request<LayerBody<B>>,
    decision: Result<Admitted, Box<Rejected>>,
) -> Next<B> {
    match decision {
        Ok(admitted) => {
            crate::metrics::rate_limit_admitted(admitted.charge.as_ref().map(|c| c.charged()));
            Next::Admitted(req, admitted)
        }
        Err(rejected) => match (shared.mode, rejected.wait) {
            (OnLimit::Wait(max), Some(w)) if waited.saturating_add(w) <= max => {
                *waited = waited.saturating_add(w);
                crate::metrics::rate_limit_wait(w);
                Next::Paused(w, req)
            }
            _ => {
                crate::metrics::rejected(
                    crate::metrics::layer::RATE_LIMIT,
                    rejected.error.code(),
                    req.extensions(),
                );
                Next::Refused(rejected)
            }
        },
    }
}

fn done<S, B, ResBody>(res: Response<RateLimitBody<ResBody>>) -> State<S, B, ResBody>
where
    S: Service<Request<LayerBody<B>>>,
{
    State::Done {
        res: Some(Box::new(res)),
    }
}

impl<S, B> Slow<S, B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    /// Drives the rare states to an admission or a final answer.
    fn poll_decided(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Decided<B>, Next<B>>> {
        let mut this = self.project();
        loop {
            let next = match this.step.as_mut().project() {
                StepProj::Viewing { view } => match ready!(view.poll(cx)) {
                    Ok(req) => decide(this.shared, this.waited, req),
                    Err(failure) => match failure.into_request() {
                        // Not JSON: no estimate, so nothing is charged at admission (the
                        // answer's `usage` is, when it reports one).
                        Ok(req) => decide(this.shared, this.waited, req),
                        // Too large or unreadable: the body is gone.
                        Err((_, e)) => Next::Failed(e.to_api_error().to_response()),
                    },
                },
                StepProj::Remote { fut, body } => {
                    let (parts, decision) = ready!(Pin::new(fut).poll(cx));
                    let Some(body) = body.take() else {
                        unreachable!("the store decides once");
                    };
                    let req = Request::from_parts(parts, body);
                    on_decision(this.shared, this.waited, req, decision)
                }
                StepProj::Paused { wait, req } => {
                    let step = Step::Waiting {
                        sleep: tokio::time::sleep(*wait),
                        req: req.take(),
                    };
                    this.step.set(step);
                    continue;
                }
                StepProj::Waiting { sleep, req } => {
                    ready!(sleep.poll(cx));
                    let Some(req) = req.take() else {
                        unreachable!("a wait ends once");
                    };
                    decide(this.shared, this.waited, req)
                }
            };
            let step = match next {
                Next::Admitted(req, admitted) => return Poll::Ready(Ok((req, admitted))),
                Next::Paused(wait, req) => Step::Paused {
                    wait,
                    req: Some(req),
                },
                Next::Remote(fut, body) => Step::Remote {
                    fut,
                    body: Some(body),
                },
                answer => return Poll::Ready(Err(answer)),
            };
            this.step.set(step);
        }
    }
}

impl<S, B, ResBody> Future for ResponseFuture<S, B, ResBody>
where
    S: Service<Request<LayerBody<B>>, Response = Response<ResBody>>,
    B: Body,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<RateLimitBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let next = match this.state.as_mut().project() {
                StateProj::Slow { slow } => match ready!(slow.as_mut().poll_decided(cx)) {
                    Ok((req, admitted)) => {
                        *this.admitted = Some(admitted);
                        State::Readying {
                            svc: slow.as_mut().project().svc.take(),
                            req: Some(req),
                        }
                    }
                    Err(Next::Refused(rejected)) => {
                        return Poll::Ready(Ok(rejected.into_response()))
                    }
                    Err(Next::Failed(res)) => return Poll::Ready(Ok(res.map(RateLimitBody::from))),
                    Err(_) => unreachable!("a wait or the store's decision is driven by the box"),
                },
                StateProj::Readying { svc, req } => {
                    let Some(inner) = svc.as_mut() else {
                        unreachable!("the service is kept until it is called");
                    };
                    match inner.poll_ready(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Err(e)) => {
                            // Final: the service is not polled again. The request never left,
                            // so its tokens are given back; its slot is released.
                            *svc = None;
                            if let Some(charge) = this.admitted.take().and_then(|a| a.charge) {
                                charge.settle(0);
                            }
                            return Poll::Ready(Err(e));
                        }
                        Poll::Ready(Ok(())) => {
                            let (Some(mut inner), Some(req)) = (svc.take(), req.take()) else {
                                unreachable!("the service is called once");
                            };
                            State::Called {
                                fut: inner.call(req),
                            }
                        }
                    }
                }
                StateProj::Called { fut } => {
                    let res = match ready!(fut.poll(cx)) {
                        Ok(res) => res,
                        Err(e) => {
                            // The layer cannot see whether the request reached the upstream:
                            // the charge stays, like a timeout's.
                            drop(this.admitted.take());
                            return Poll::Ready(Err(e));
                        }
                    };
                    let Some(admitted) = this.admitted.take() else {
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
                StateProj::Done { res } => {
                    let Some(res) = res.take() else {
                        unreachable!("polled after completion");
                    };
                    return Poll::Ready(Ok(*res));
                }
            };
            this.state.set(next);
        }
    }
}

impl<S, B, ResBody> std::fmt::Debug for ResponseFuture<S, B, ResBody>
where
    S: Service<Request<LayerBody<B>>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Body = http_body_util::Full<bytes::Bytes>;
    type Inner = tower::util::ServiceFn<
        fn(
            Request<LayerBody<Body>>,
        ) -> std::future::Ready<Result<Response<Body>, std::convert::Infallible>>,
    >;

    /// A request decided at once carries itself, its admission and the inner service, and
    /// little more: the rarer states (the body being read, a wait's timer, the layer's state)
    /// are boxed, not laid out in every future.
    #[test]
    fn the_common_future_is_its_request_and_its_admission() {
        let future = std::mem::size_of::<ResponseFuture<Inner, Body, Body>>();
        let parts = std::mem::size_of::<Request<LayerBody<Body>>>()
            + std::mem::size_of::<Admitted>()
            + std::mem::size_of::<
                std::future::Ready<Result<Response<Body>, std::convert::Infallible>>,
            >()
            .saturating_sub(std::mem::size_of::<Request<LayerBody<Body>>>());
        assert!(
            future <= parts + 2 * std::mem::size_of::<usize>(),
            "{future} bytes for {parts} bytes of request, admission and answer"
        );
    }
}
