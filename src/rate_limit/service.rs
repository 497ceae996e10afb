//! The service.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use crate::request::{ensure_view, ViewError};

use super::body::RateLimitBody;
use super::config::{KeySource, OnLimit};
use super::future::{ResponseFuture, Slow};
use super::shared::Shared;

/// Limits the requests, tokens and requests in flight of each key; see the
/// [module docs](super).
#[derive(Clone)]
pub struct RateLimit<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> RateLimit<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        RateLimit { inner, shared }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S> std::fmt::Debug for RateLimit<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimit").finish_non_exhaustive()
    }
}

fn source<B>(req: &Request<B>) -> KeySource<'_> {
    KeySource {
        method: req.method(),
        uri: req.uri(),
        headers: req.headers(),
        extensions: req.extensions(),
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    ReqBody: Body + From<Bytes> + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    ResBody: From<Bytes> + Send + 'static,
{
    type Response = Response<RateLimitBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        if !self.shared.needs_view(req.extensions()) && !self.shared.is_remote() {
            match self.shared.admit(&source(&req)) {
                Ok(admitted) => return ResponseFuture::called(self.inner.call(req), admitted),
                Err(rejected) => match (self.shared.mode, rejected.wait) {
                    (OnLimit::Wait(max), Some(w)) if w <= max => {}
                    _ => return ResponseFuture::ready(rejected.into_response()),
                },
            }
        }
        // Read the body to estimate tokens, or wait for the bucket.
        let clone = self.inner.clone();
        let svc = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::admitting(slow(self.shared.clone(), req), svc)
    }
}

fn slow<ReqBody, ResBody>(shared: Arc<Shared>, req: Request<ReqBody>) -> Slow<ReqBody, ResBody>
where
    ReqBody: Body + From<Bytes> + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    ResBody: From<Bytes> + Send + 'static,
{
    Box::pin(async move {
        let mut req = req;
        if shared.needs_view(req.extensions()) {
            req = match ensure_view(req, shared.body_limit, &*shared.estimator).await {
                Ok(req) => req,
                // Not JSON: nothing to estimate; the response's usage, if any, is charged.
                Err((req, ViewError::Parse(_))) => req,
                Err((_, e)) => return Err(e.to_api_error().to_response()),
            };
        }
        let mut waited = Duration::ZERO;
        loop {
            #[cfg(feature = "redis")]
            let decision = super::redis::admit(&shared, &source(&req)).await;
            #[cfg(not(feature = "redis"))]
            let decision = shared.admit(&source(&req));
            match decision {
                Ok(admitted) => return Ok((req, admitted)),
                Err(rejected) => match (shared.mode, rejected.wait) {
                    (OnLimit::Wait(max), Some(w)) if waited.saturating_add(w) <= max => {
                        drop(rejected);
                        tokio::time::sleep(w).await;
                        waited = waited.saturating_add(w);
                    }
                    _ => return Err(rejected.into_response()),
                },
            }
        }
    })
}
