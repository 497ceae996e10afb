use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tower_service::Service;

use super::body::NormalizeBody;
use super::future::ResponseFuture;
use super::NormalizeOptions;
use crate::body::BoxError;
use crate::classify::Classifier;

/// The service built by [`NormalizeErrorsLayer`](super::NormalizeErrorsLayer).
#[derive(Debug, Clone)]
pub struct NormalizeErrors<S> {
    inner: S,
    options: NormalizeOptions,
    /// The application's rules; `None` when there are none, so that a request clones nothing.
    classifier: Option<Arc<Classifier>>,
}

impl<S> NormalizeErrors<S> {
    /// Wraps `inner` with the default options.
    pub const fn new(inner: S) -> Self {
        Self::with_options(inner, NormalizeOptions::new())
    }

    /// Wraps `inner` with the given options.
    pub const fn with_options(inner: S, options: NormalizeOptions) -> Self {
        NormalizeErrors {
            inner,
            options,
            classifier: None,
        }
    }

    /// Classify upstream answers with `classifier` (see
    /// [`NormalizeErrorsLayer::classifier`](super::NormalizeErrorsLayer::classifier)).
    pub fn classifier(self, classifier: impl Into<Arc<Classifier>>) -> Self {
        let classifier = classifier.into();
        self.with_classifier(classifier.has_rules().then_some(classifier))
    }

    pub(super) fn with_classifier(mut self, classifier: Option<Arc<Classifier>>) -> Self {
        self.classifier = classifier;
        self
    }

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

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for NormalizeErrors<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    ResBody: http_body::Body<Data = Bytes>,
{
    type Response = Response<NormalizeBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    /// The inner service's readiness, passed on unchanged: an `Err` is final (tower's rule),
    /// the layer neither answers it as an envelope nor polls the failed service again.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        crate::metrics::request(crate::metrics::layer::NORMALIZE);
        let head = req.method() == http::Method::HEAD;
        // `None` when no rules are set: nothing is cloned.
        let classifier = self.classifier.clone();
        let timer = crate::metrics::OperationTimer::start(req.uri().path(), req.extensions());
        ResponseFuture::new(self.inner.call(req), self.options, head, classifier, timer)
    }
}
