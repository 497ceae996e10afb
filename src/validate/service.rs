//! The service.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Method, Request, Response};
use http_body::Body;
use tower_service::Service;

use super::config::Shared;
use super::future::ResponseFuture;
use super::rules;
use crate::body::{check_limit, BoxError, BufferError, LayerBody};
use crate::request::{deployment_from_path, Endpoint, RequestHead, RequestView};

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
///
/// It takes any request body and hands `S` a [`LayerBody`]: the body untouched when it was not
/// read, the bytes it read otherwise. Its rejections and `S`'s answers come back as
/// [`LayerBody`] too. It is always ready: each call drives a fresh clone of `S` to readiness
/// once the body is read and checked (see the [module docs](super)).
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
    S: Service<Request<LayerBody<ReqBody>>, Response = Response<ResBody>> + Clone,
    ReqBody: Body,
    ReqBody::Error: Into<BoxError>,
{
    type Response = Response<LayerBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody, ResBody>;

    /// Always ready: the inner service is driven to readiness in the response future, after
    /// the body was read (a slow upload holds no slot of a concurrency limit behind).
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        crate::metrics::request(crate::metrics::layer::VALIDATE);
        // Each call gets a fresh clone, driven to readiness by the future; `self.inner` is never
        // polled.
        let inner = &self.inner;
        let endpoint = Endpoint::from_path(req.uri().path());
        if req.method() != Method::POST || endpoint == Endpoint::Other {
            return ResponseFuture::ready(inner.clone(), req.map(LayerBody::new));
        }
        let shared = &*self.shared;
        if shared.checks.content_type {
            if let Err(e) = rules::check_content_type(req.headers()) {
                return ResponseFuture::rejected(e, req.extensions());
            }
        }
        if !shared.needs_body() {
            return ResponseFuture::ready(inner.clone(), req.map(LayerBody::new));
        }
        let limit = shared.body_limit;
        if let Err(e) = check_limit(req.headers(), req.body(), limit) {
            return ResponseFuture::rejected(e.to_api_error(), req.extensions());
        }
        // A view parsed by an earlier layer is reused; the limit holds all the same, by the
        // length the view recorded.
        if let Some(view) = RequestView::from_extensions(req.extensions()) {
            if view.body_len().is_some_and(|n| n > limit) {
                return ResponseFuture::rejected(
                    BufferError::TooLarge { limit }.to_api_error(),
                    req.extensions(),
                );
            }
            if path_deployment_differs(req.uri().path(), view) {
                // The view was built without the path's deployment: check (and hand on) the
                // view of what the upstream will serve.
                let view = view.clone().with_path(req.uri().path());
                req.extensions_mut().insert(view);
            }
            let view = RequestView::from_extensions(req.extensions()).expect("stored above");
            let Some(bytes) = view.bytes() else {
                // A view that kept no body: the checks of the body's fields read it here.
                return ResponseFuture::buffering(inner.clone(), req, Arc::clone(&self.shared));
            };
            let verdict = super::future::verdict(shared, &RequestHead::of(&req), view, bytes, None);
            return match verdict {
                Ok(()) => ResponseFuture::ready(inner.clone(), req.map(LayerBody::new)),
                Err(e) => ResponseFuture::rejected(e, req.extensions()),
            };
        }
        ResponseFuture::parsing(inner.clone(), req, Arc::clone(&self.shared))
    }
}
