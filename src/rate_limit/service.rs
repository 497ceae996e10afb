//! The service.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use crate::body::{BoxError, LayerBody};
use crate::request::EnsureView;

use super::body::RateLimitBody;
use super::future::ResponseFuture;
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

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S>
where
    S: Service<Request<LayerBody<ReqBody>>, Response = Response<ResBody>> + Clone,
    ReqBody: Body,
    ReqBody::Error: Into<BoxError>,
{
    type Response = Response<RateLimitBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody, ResBody>;

    /// Always ready: the inner service is driven to readiness by each response future, on its
    /// own clone, once the request is admitted (see [`ResponseFuture`]).
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        crate::metrics::request(crate::metrics::layer::RATE_LIMIT);
        // Borrowed: the future takes its own reference only for the rare states.
        let shared = &self.shared;
        if shared.needs_view(req.extensions()) && may_be_json(req.headers()) {
            // Read the body to estimate tokens (or to key by model) before anything else.
            let view = EnsureView::new(req, shared.body_limit, shared.estimator.clone());
            return ResponseFuture::viewing(view, &self.inner, shared);
        }
        ResponseFuture::admitting(req.map(LayerBody::new), &self.inner, shared)
    }
}

/// Whether a request body may be JSON, and so is read for the token estimate: no
/// `content-type`, `application/json`, or a `+json` type. Another body (a multipart upload to
/// `/v1/audio/transcriptions`, say) passes unread: charged nothing at admission, then what its
/// answer's `usage` reports.
fn may_be_json(headers: &http::HeaderMap) -> bool {
    let Some(value) = headers.get(http::header::CONTENT_TYPE) else {
        return true;
    };
    // A header value that is a string is visible ASCII: byte offsets are char boundaries.
    let Ok(value) = value.to_str() else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
        || essence
            .get(essence.len().saturating_sub(5)..)
            .is_some_and(|end| end.eq_ignore_ascii_case("+json"))
}

#[cfg(test)]
mod tests {
    use super::may_be_json;

    #[test]
    fn json_content_types() {
        let with = |ct: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(http::header::CONTENT_TYPE, ct.parse().unwrap());
            may_be_json(&h)
        };
        assert!(may_be_json(&http::HeaderMap::new()));
        assert!(with("application/json"));
        assert!(with("Application/JSON; charset=utf-8"));
        assert!(with("application/vnd.api+json"));
        assert!(!with("multipart/form-data; boundary=x"));
        assert!(!with("text/plain"));
        assert!(!with("json"));
    }
}
