//! The service.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use tower_service::Service;

use super::config::Shared;
use super::future::ResponseFuture;
use super::rules;
use crate::body::BufferError;
use crate::request::{Endpoint, RequestView};

/// Validates LLM requests before they reach `S`; built by
/// [`ValidateRequestLayer`](super::ValidateRequestLayer).
#[derive(Clone, Debug)]
pub struct ValidateRequest<S> {
    pub(crate) inner: S,
    pub(crate) shared: Arc<Shared>,
}

impl<S> ValidateRequest<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ValidateRequest<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    ReqBody: Body + From<Bytes>,
    ReqBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    ResBody: From<Bytes>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let endpoint = Endpoint::from_path(req.uri().path());
        if req.method() != Method::POST || endpoint == Endpoint::Other {
            return ResponseFuture::called(self.inner.call(req));
        }
        let shared = &*self.shared;
        if shared.checks.content_type {
            if let Err(e) = rules::check_content_type(req.headers()) {
                return ResponseFuture::rejected(e.to_response());
            }
        }
        if !shared.needs_body() {
            return ResponseFuture::called(self.inner.call(req));
        }
        // A view parsed by an earlier layer is reused as is, body untouched.
        if let Some(view) = RequestView::from_extensions(req.extensions()) {
            if view.json().is_some() {
                return match rules::check(shared, view) {
                    Ok(()) => ResponseFuture::called(self.inner.call(req)),
                    Err(e) => ResponseFuture::rejected(e.to_response()),
                };
            }
        }
        let limit = shared.body_limit;
        let (parts, body) = req.into_parts();
        let announced = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if announced.is_some_and(|n| n > limit as u64) || body.size_hint().lower() > limit as u64 {
            return ResponseFuture::rejected(
                BufferError::TooLarge { limit }.to_api_error().to_response(),
            );
        }
        // The service that was driven to readiness goes into the future; a clone stays here.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::buffering(
            Limited::new(body, limit).collect(),
            parts,
            endpoint,
            inner,
            Arc::clone(&self.shared),
        )
    }
}
