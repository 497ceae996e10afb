use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures_util::future::BoxFuture;
use http::Response;
use pin_project_lite::pin_project;

use super::circuit::Permit;
use super::classify::Outcome;

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E> {
        Called { #[pin] fut: F, permit: Option<Permit> },
        Ready { res: Option<Response<B>> },
        Boxed { fut: BoxFuture<'static, Result<Response<B>, E>> },
    }
}

pin_project! {
    /// The future of [`CircuitBreaker`](super::CircuitBreaker): the inner call holding its
    /// permit (dropped early, the call records nothing and gives a probe slot back), a ready
    /// rejection, or the slow path (reading the model from the body, a fallback chain).
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
    }
}

impl<F, B, E> ResponseFuture<F, B, E> {
    pub(crate) fn called(fut: F, permit: Permit) -> Self {
        ResponseFuture {
            kind: Kind::Called {
                fut,
                permit: Some(permit),
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
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Called { fut, permit } => {
                let out = ready!(fut.poll(cx));
                if let Some(p) = permit.take() {
                    let outcome = match &out {
                        Ok(res) => p.classify(res),
                        Err(_) => Outcome::Failure,
                    };
                    p.complete(outcome);
                }
                Poll::Ready(out)
            }
            KindProj::Ready { res } => Poll::Ready(Ok(res
                .take()
                .expect("ResponseFuture polled after completion"))),
            KindProj::Boxed { fut } => fut.as_mut().poll(cx),
        }
    }
}
