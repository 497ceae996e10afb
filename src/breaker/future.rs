use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::Response;
use pin_project_lite::pin_project;
use tokio::time::Sleep;

use super::circuit::{End, Permit, Timer};
use super::classify::Outcome;
use super::config::{millis, Config};
use crate::error::{ApiError, ErrorCode};

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E> {
        Called {
            #[pin] fut: F,
            permit: Option<Permit>,
            #[pin] timer: Option<Sleep>,
            probe: bool,
        },
        Ready { res: Option<Response<B>> },
        Boxed { fut: BoxFuture<'static, Result<Response<B>, E>> },
    }
}

pin_project! {
    /// The future of [`CircuitBreaker`](super::CircuitBreaker): the inner call holding its
    /// permit (with the probe and call timers it needs, set only when it needs them), a ready
    /// rejection, or the slow path (reading the model from the body, a fallback chain).
    ///
    /// Dropped before the answer, the call counts as the module documentation says (a probe
    /// as failed; another call only past the slow-call duration or the call timeout).
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
    }
}

/// A timer at `t`, when a tokio runtime is there to run it.
fn sleep(t: Option<Timer>) -> (Option<Sleep>, bool) {
    match t {
        Some(t) if tokio::runtime::Handle::try_current().is_ok() => {
            (Some(tokio::time::sleep_until(t.at)), t.probe)
        }
        _ => (None, false),
    }
}

/// The answer when the breaker's call timeout fires.
fn timeout_error(cfg: &Config) -> ApiError {
    let ms = cfg.call_timeout.map(millis).unwrap_or_default();
    ApiError::new(
        ErrorCode::Timeout,
        format!(
            "Circuit breaker '{}' gave up on the upstream: no answer within {ms} ms.",
            cfg.name
        ),
    )
}

impl<F, B, E> ResponseFuture<F, B, E> {
    pub(crate) fn called(fut: F, permit: Permit) -> Self {
        let (timer, probe) = sleep(permit.timer());
        ResponseFuture {
            kind: Kind::Called {
                fut,
                permit: Some(permit),
                timer,
                probe,
            },
        }
    }

    pub(crate) fn ready(res: Response<B>) -> Self {
        ResponseFuture {
            kind: Kind::Ready { res: Some(res) },
        }
    }

    pub(crate) fn boxed(fut: BoxFuture<'static, Result<Response<B>, E>>) -> Self {
        ResponseFuture {
            kind: Kind::Boxed { fut },
        }
    }
}

impl<F, B, E> std::fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: From<Bytes>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Called {
                fut,
                permit,
                mut timer,
                probe,
            } => {
                if let Poll::Ready(out) = fut.poll(cx) {
                    if let Some(p) = permit.take() {
                        let outcome = match &out {
                            Ok(res) => p.classify(res),
                            Err(_) => Outcome::Failure,
                        };
                        p.complete(outcome);
                    }
                    return Poll::Ready(out);
                }
                while let Some(t) = timer.as_mut().as_pin_mut() {
                    if t.poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    if *probe {
                        // The probe is overdue: failed now; the call goes on to its own
                        // timeout, if any.
                        *probe = false;
                        match permit.as_mut().and_then(Permit::probe_overdue) {
                            Some(next) => {
                                if let Some(t) = timer.as_mut().as_pin_mut() {
                                    t.reset(next.at);
                                }
                            }
                            None => timer.set(None),
                        }
                        continue;
                    }
                    // The call timeout: give up on the upstream.
                    timer.set(None);
                    let Some(p) = permit.take() else {
                        return Poll::Pending;
                    };
                    let err = p.config().map(timeout_error);
                    p.end(End::CallTimedOut);
                    if let Some(err) = err {
                        return Poll::Ready(Ok(err.to_response()));
                    }
                }
                Poll::Pending
            }
            KindProj::Ready { res } => Poll::Ready(Ok(res
                .take()
                .expect("ResponseFuture polled after completion"))),
            KindProj::Boxed { fut } => fut.as_mut().poll(cx),
        }
    }
}
