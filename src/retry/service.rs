//! The service.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use super::config::Shared;
use super::future::ResponseFuture;
use crate::body::{BoxError, LayerBody};

/// Retries its inner service; made by [`super::RetryLayer`].
#[derive(Debug, Clone)]
pub struct Retry<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Retry<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Retry { inner, shared }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the layer's service, returning the inner one.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B, ResB> Service<Request<B>> for Retry<S>
where
    S: Service<Request<LayerBody<B>>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError> + 'static,
    B: Body,
    B::Error: Into<BoxError>,
{
    type Response = Response<LayerBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, B>;

    /// Always ready: the inner service is polled ready by each call's future, on its own
    /// clone, once the request body is buffered, so a slow upload holds no slot of a
    /// concurrency limit (or a buffer) further in.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        crate::metrics::request(crate::metrics::layer::RETRY);
        // A fresh, un-ready clone: the future drives its readiness after buffering.
        ResponseFuture::new(self.inner.clone(), self.shared.clone(), req)
    }
}
