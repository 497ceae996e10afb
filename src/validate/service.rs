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
use crate::request::{deployment_from_path, Endpoint, RequestView};

/// Whether the deployment `path` names differs from the one `view` holds. Allocates only for
/// paths that name a deployment.
fn path_deployment_differs(path: &str, view: &RequestView) -> bool {
    if view.deployment().is_none() && !path.contains("deployments") && !path.contains('%') {
        return false;
    }
    deployment_from_path(path).as_deref() != view.deployment()
}

/// Validates LLM requests before they reach `S`; built by
/// [`ValidateRequestLayer`](super::ValidateRequestLayer).
#[derive(Clone, Debug)]
pub struct Validate<S> {
    pub(crate) inner: S,
    pub(crate) shared: Arc<Shared>,
}

impl<S> Validate<S> {
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

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Validate<S>
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

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
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
        let limit = shared.body_limit;
        let announced = req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let too_large = || BufferError::TooLarge { limit }.to_api_error().to_response();
        if announced.is_some_and(|n| n > limit as u64)
            || req.body().size_hint().lower() > limit as u64
        {
            return ResponseFuture::rejected(too_large());
        }
        // A view parsed by an earlier layer is reused, body untouched; the limit holds all the
        // same, by the length the view recorded.
        if let Some(view) = RequestView::from_extensions(req.extensions()) {
            if view.json().is_some() {
                if view.body_len().is_some_and(|n| n > limit) {
                    return ResponseFuture::rejected(too_large());
                }
                let verdict = match path_deployment_differs(req.uri().path(), view) {
                    // The view was built without the path's deployment: check (and hand on)
                    // the view of what the upstream will serve.
                    true => {
                        let view = view.clone().with_path(req.uri().path());
                        let verdict = rules::check(shared, &view);
                        req.extensions_mut().insert(view);
                        verdict
                    }
                    false => rules::check(shared, view),
                };
                return match verdict {
                    Ok(()) => ResponseFuture::called(self.inner.call(req)),
                    Err(e) => ResponseFuture::rejected(e.to_response()),
                };
            }
        }
        let (parts, body) = req.into_parts();
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
