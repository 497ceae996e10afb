use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use super::credentials::extract_api_key;
use super::future::{admit, decide, reject_credentials, Decision, Pending, ResponseFuture};
use super::layer::Shared;
use super::store::{KeyHash, KeyStore};

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

impl<S, K, ReqBody, ResBody> Service<Request<ReqBody>> for ApiKeyAuth<S, K>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    K: KeyStore,
    ReqBody: Body + From<Bytes> + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    ResBody: From<Bytes>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S, K, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let hash = match extract_api_key(req.headers(), self.shared.accepted) {
            Ok(key) => {
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
                    let clone = self.inner.clone();
                    let inner = std::mem::replace(&mut self.inner, clone);
                    let pending = Pending {
                        req,
                        inner,
                        shared: Arc::clone(&self.shared),
                        hash,
                    };
                    return ResponseFuture::token(validation, pending);
                }
                KeyHash::of(key)
            }
            Err(e) => return ResponseFuture::rejected(reject_credentials(&e)),
        };
        if let Some(result) = self.shared.store.lookup_now(&hash) {
            // The store answered at once: no state to carry, no clone of the inner service
            // unless the body must be read.
            return match decide(result, &req, &hash, &self.shared) {
                Decision::Reject(res) => ResponseFuture::rejected(res),
                Decision::Admit(record) => {
                    ResponseFuture::called(admit(req, &mut self.inner, &self.shared, record))
                }
                Decision::View(record) => {
                    let clone = self.inner.clone();
                    let inner = std::mem::replace(&mut self.inner, clone);
                    ResponseFuture::viewing(req, inner, Arc::clone(&self.shared), record)
                }
            };
        }
        let lookup = self.shared.store.lookup(&hash);
        // The instance that was polled ready goes with the request; a clone stays behind.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::lookup(
            lookup,
            Pending {
                req,
                inner,
                shared: Arc::clone(&self.shared),
                hash,
            },
        )
    }
}
