use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use super::credentials::extract;
use super::future::{admit, decide, reject_credentials, Decision, Pending, ResponseFuture};
use super::layer::Shared;
use super::store::{KeyHash, KeyStore};
use crate::body::{BoxError, LayerBody};

/// Checks the API key of every request against a [`KeyStore`]; see the
/// [module docs](crate::auth) for what it answers.
///
/// Made by [`ApiKeyAuthLayer`](super::ApiKeyAuthLayer). Cloning shares the store and the
/// configuration.
pub struct ApiKeyAuth<S, K> {
    inner: S,
    shared: Arc<Shared<K>>,
}

impl<S, K> ApiKeyAuth<S, K> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared<K>>) -> Self {
        ApiKeyAuth { inner, shared }
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

impl<S: Clone, K> Clone for ApiKeyAuth<S, K> {
    fn clone(&self) -> Self {
        ApiKeyAuth {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: fmt::Debug, K: fmt::Debug> fmt::Debug for ApiKeyAuth<S, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeyAuth")
            .field("inner", &self.inner)
            .field("config", &self.shared)
            .finish()
    }
}

impl<S, K> ApiKeyAuth<S, K> {
    /// Calls the inner service for a request admitted within `call`: nothing slow came
    /// first, so the inner service is asked for readiness now (with a no-op waker) and, when
    /// it is ready, called as it is, without a clone. When it is not ready, it moves into the
    /// response future, which drives it with the task's waker, and a fresh clone takes its
    /// place here; when its `poll_ready` fails, the failed service is dropped, never polled
    /// again, and a clone of it serves the next calls (as every call took a fresh clone).
    fn call_now<B, ResBody>(&mut self, req: Request<LayerBody<B>>) -> ResponseFuture<S, K, B>
    where
        S: Service<Request<LayerBody<B>>, Response = Response<ResBody>> + Clone,
        K: KeyStore,
    {
        match self
            .inner
            .poll_ready(&mut Context::from_waker(Waker::noop()))
        {
            Poll::Ready(Ok(())) => ResponseFuture::called(self.inner.call(req)),
            Poll::Ready(Err(e)) => {
                let fresh = self.inner.clone();
                drop(std::mem::replace(&mut self.inner, fresh));
                ResponseFuture::failed(e)
            }
            Poll::Pending => {
                let fresh = self.inner.clone();
                let polled = std::mem::replace(&mut self.inner, fresh);
                ResponseFuture::ready(polled, req)
            }
        }
    }
}

impl<S, K, ReqBody, ResBody> Service<Request<ReqBody>> for ApiKeyAuth<S, K>
where
    S: Service<Request<LayerBody<ReqBody>>, Response = Response<ResBody>> + Clone,
    K: KeyStore,
    ReqBody: Body,
    ReqBody::Error: Into<BoxError>,
{
    type Response = Response<LayerBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, K, ReqBody>;

    /// Always ready: the inner service is polled ready only once the key is checked and the
    /// body (when the key's allow-list needs it) is read. When the store answered within
    /// `call` and no body needs reading, that is within `call` itself; otherwise the response
    /// future polls a clone taken in `call`.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        crate::metrics::request(crate::metrics::layer::AUTH);
        let (hash, present) = match extract(req.headers(), self.shared.accepted) {
            Ok((key, present)) => {
                #[cfg(feature = "jwt")]
                if let Some(jwt) = self
                    .shared
                    .jwt
                    .as_ref()
                    .filter(|_| super::jwt::looks_like_jwt(key))
                {
                    // A bearer token: validated by the token validator, not looked up.
                    let token = String::from_utf8_lossy(key).into_owned();
                    let hash = KeyHash::of(key);
                    let validation = jwt.validate(token, self.shared.now());
                    let pending = Pending {
                        req,
                        inner: self.inner.clone(),
                        shared: Arc::clone(&self.shared),
                        hash,
                        present,
                    };
                    return ResponseFuture::token(validation, pending);
                }
                (KeyHash::of(key), present)
            }
            Err(e) => return ResponseFuture::rejected(reject_credentials(&e), req.extensions()),
        };
        if let Some(result) = self.shared.store.lookup_now(&hash) {
            // The store answered at once: a rejection needs no inner service at all.
            return match decide(result, &req, &hash, &self.shared) {
                Decision::Reject(res) => ResponseFuture::rejected(res, req.extensions()),
                Decision::Admit(record) => {
                    let mut req = req.map(LayerBody::new);
                    admit(&mut req, &self.shared, record, present);
                    self.call_now(req)
                }
                decision => ResponseFuture::decided(
                    decision,
                    req,
                    self.inner.clone(),
                    &self.shared,
                    present,
                ),
            };
        }
        ResponseFuture::lookup(
            self.shared.store.lookup(&hash),
            Pending {
                req,
                inner: self.inner.clone(),
                shared: Arc::clone(&self.shared),
                hash,
                present,
            },
        )
    }
}
