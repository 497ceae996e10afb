use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use super::credentials::extract_api_key;
use super::future::{decide, reject_credentials, Decision, Pending, ResponseFuture};
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

    /// Always ready: the inner service is polled ready by the response future, on a clone,
    /// once the key is checked and the body (when the key's allow-list needs it) is read.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        Poll::Ready(Ok(()))
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
                    let pending = Pending {
                        req,
                        inner: self.inner.clone(),
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
            // The store answered at once: a rejection needs no inner service at all.
            return match decide(result, &req, &hash, &self.shared) {
                Decision::Reject(res) => ResponseFuture::rejected(res),
                decision => {
                    ResponseFuture::decided(decision, req, self.inner.clone(), &self.shared)
                }
            };
        }
        ResponseFuture::lookup(
            self.shared.store.lookup(&hash),
            Pending {
                req,
                inner: self.inner.clone(),
                shared: Arc::clone(&self.shared),
                hash,
            },
        )
    }
}
