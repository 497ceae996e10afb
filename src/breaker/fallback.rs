//! The typed fallback service: none, or a service of the guarded service's own types.

use std::future::Future;
use std::task::{Context, Poll};

use tower_service::Service;

/// No fallback service: the type a [`CircuitBreakerLayer`](super::CircuitBreakerLayer) has
/// until [`fallback_service`](super::CircuitBreakerLayerBuilder::fallback_service) sets one.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFallback;

/// A fallback service, as [`fallback_service`](super::CircuitBreakerLayerBuilder::fallback_service)
/// keeps it: the layer is a `CircuitBreakerLayer<ServiceFallback<S>>`.
#[derive(Debug, Clone)]
pub struct ServiceFallback<S>(pub(crate) S);

impl<S> ServiceFallback<S> {
    /// The fallback service.
    pub fn get_ref(&self) -> &S {
        &self.0
    }
}

/// What the breaker needs of its fallback: implemented for [`NoFallback`] and for
/// [`ServiceFallback<S>`] when `S: Service<Req, Response = Res, Error = E>`, so a fallback
/// service must take the guarded service's requests and answer its responses and errors.
/// Not meant to be implemented by hand.
pub trait Fallback<Req, Res, E> {
    /// The fallback call's future.
    type Future: Future<Output = Result<Res, E>>;

    /// [`Service::poll_ready`].
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), E>>;

    /// [`Service::call`].
    fn call(&mut self, req: Req) -> Self::Future;
}

impl<Req, Res, E> Fallback<Req, Res, E> for NoFallback {
    type Future = std::future::Pending<Result<Res, E>>;

    // Never called: a layer without a fallback service has no such step in its chain.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), E>> {
        Poll::Pending
    }

    fn call(&mut self, _req: Req) -> Self::Future {
        std::future::pending()
    }
}

impl<S, Req, Res, E> Fallback<Req, Res, E> for ServiceFallback<S>
where
    S: Service<Req, Response = Res, Error = E>,
{
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), E>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        self.0.call(req)
    }
}
