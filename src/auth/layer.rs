use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use http::HeaderValue;
use tower_layer::Layer;

use super::credentials::AcceptedHeaders;
use super::inject::{ApiKey, KeyHeader};
use super::service::ApiKeyAuth;
use super::store::KeyStore;
use super::{config_error, ConfigError};
use crate::body::DEFAULT_BODY_LIMIT;
use crate::request::{CharEstimator, TokenEstimator};

/// A source of the current time, for expiry checks.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// What happens to the client's credential headers once the key is accepted.
#[derive(Clone, Default)]
pub enum CredentialForwarding {
    /// `authorization`, `x-api-key` and `api-key` are removed before the request goes on, so
    /// the client's key never reaches an upstream (the default).
    #[default]
    Strip,
    /// The headers go on untouched.
    Keep,
    /// The client's credential headers are removed and this upstream key is set instead.
    Replace(KeyHeader, ApiKey),
}

impl fmt::Debug for CredentialForwarding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CredentialForwarding::Strip => f.write_str("Strip"),
            CredentialForwarding::Keep => f.write_str("Keep"),
            CredentialForwarding::Replace(h, _) => f
                .debug_tuple("Replace")
                .field(h)
                .field(&"<redacted>")
                .finish(),
        }
    }
}

#[derive(Clone)]
pub(crate) enum Forward {
    Strip,
    Keep,
    Replace(KeyHeader, HeaderValue),
}

pub(crate) struct Shared<K> {
    pub(crate) store: K,
    pub(crate) accepted: AcceptedHeaders,
    pub(crate) clock: Option<Clock>,
    pub(crate) forward: Forward,
    pub(crate) body_limit: usize,
    pub(crate) estimator: Arc<dyn TokenEstimator>,
    #[cfg(feature = "jwt")]
    pub(crate) jwt: Option<super::jwt::JwtValidator>,
}

impl<K> Shared<K> {
    pub(crate) fn now(&self) -> SystemTime {
        match &self.clock {
            Some(clock) => clock(),
            None => SystemTime::now(),
        }
    }
}

impl<K: fmt::Debug> fmt::Debug for Shared<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let forward = match self.forward {
            Forward::Strip => "strip",
            Forward::Keep => "keep",
            Forward::Replace(..) => "replace(<redacted>)",
        };
        f.debug_struct("ApiKeyAuth")
            .field("store", &self.store)
            .field("accepted", &self.accepted)
            .field("forward", &forward)
            .field("body_limit", &self.body_limit)
            .field("custom_clock", &self.clock.is_some())
            .finish_non_exhaustive()
    }
}

/// Applies [`ApiKeyAuth`]: checks the API key of every request against a [`KeyStore`].
///
/// Cloning shares the configuration and the store.
pub struct ApiKeyAuthLayer<K> {
    shared: Arc<Shared<K>>,
}

impl<K> Clone for ApiKeyAuthLayer<K> {
    fn clone(&self) -> Self {
        ApiKeyAuthLayer {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<K: fmt::Debug> fmt::Debug for ApiKeyAuthLayer<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.shared, f)
    }
}

impl<K: KeyStore> ApiKeyAuthLayer<K> {
    /// A layer with the defaults: all three headers accepted, credential headers stripped
    /// before the request goes on, bodies buffered up to [`DEFAULT_BODY_LIMIT`] for keys
    /// restricted to some models, the system clock.
    pub fn new(store: K) -> Self {
        ApiKeyAuthLayer {
            shared: Arc::new(ApiKeyAuthLayer::builder(store).into_shared()),
        }
    }

    /// A builder, to configure the layer.
    pub fn builder(store: K) -> ApiKeyAuthBuilder<K> {
        ApiKeyAuthBuilder {
            store,
            accepted: AcceptedHeaders::all(),
            clock: None,
            forwarding: CredentialForwarding::Strip,
            body_limit: DEFAULT_BODY_LIMIT,
            estimator: Arc::new(CharEstimator),
            #[cfg(feature = "jwt")]
            jwt: None,
        }
    }

    /// The store.
    pub fn store(&self) -> &K {
        &self.shared.store
    }

    /// A layer with this one's configuration (headers, forwarding, body limit, clock,
    /// estimator) over another store: a [`ReloadableKeyStore`](super::ReloadableKeyStore)
    /// seeded with this layer's keys, say, or a caching wrapper.
    pub fn with_store<K2: KeyStore>(&self, store: K2) -> ApiKeyAuthLayer<K2> {
        let s = &*self.shared;
        ApiKeyAuthLayer {
            shared: Arc::new(Shared {
                store,
                accepted: s.accepted,
                clock: s.clock.clone(),
                forward: s.forward.clone(),
                body_limit: s.body_limit,
                estimator: Arc::clone(&s.estimator),
                #[cfg(feature = "jwt")]
                jwt: s.jwt.clone(),
            }),
        }
    }
}

impl<S, K> Layer<S> for ApiKeyAuthLayer<K> {
    type Service = ApiKeyAuth<S, K>;

    fn layer(&self, inner: S) -> ApiKeyAuth<S, K> {
        ApiKeyAuth::from_shared(inner, Arc::clone(&self.shared))
    }
}

/// Configures an [`ApiKeyAuthLayer`]; [`ApiKeyAuthBuilder::build`] checks the configuration.
pub struct ApiKeyAuthBuilder<K> {
    store: K,
    accepted: AcceptedHeaders,
    clock: Option<Clock>,
    forwarding: CredentialForwarding,
    body_limit: usize,
    estimator: Arc<dyn TokenEstimator>,
    #[cfg(feature = "jwt")]
    jwt: Option<super::jwt::JwtValidator>,
}

impl<K: fmt::Debug> fmt::Debug for ApiKeyAuthBuilder<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeyAuthBuilder")
            .field("store", &self.store)
            .field("accepted", &self.accepted)
            .field("forwarding", &self.forwarding)
            .field("body_limit", &self.body_limit)
            .finish_non_exhaustive()
    }
}

impl<K: KeyStore> ApiKeyAuthBuilder<K> {
    /// Which headers may carry the key (all three by default).
    pub fn accepted_headers(mut self, accepted: AcceptedHeaders) -> Self {
        self.accepted = accepted;
        self
    }

    /// The clock expiry is checked against (the system clock by default).
    pub fn clock(mut self, clock: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// What happens to the client's credential headers once the key is accepted
    /// ([`CredentialForwarding::Strip`] by default).
    pub fn forwarding(mut self, forwarding: CredentialForwarding) -> Self {
        self.forwarding = forwarding;
        self
    }

    /// The largest request body read to find the model, for keys restricted to some models
    /// ([`DEFAULT_BODY_LIMIT`] by default). A larger body is answered `413 request_too_large`.
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// The token estimator used when this layer is the first to parse the request (the parsed
    /// view, with its token estimate, is shared with later layers). [`CharEstimator`] by
    /// default.
    pub fn estimator(mut self, estimator: impl TokenEstimator) -> Self {
        self.estimator = Arc::new(estimator);
        self
    }

    /// Also accepts OAuth 2.0 / JWT bearer tokens: a bearer credential shaped like a JWT is
    /// checked by `validator`, every other credential against the key store (feature `jwt`;
    /// see [`JwtValidator`](super::JwtValidator)).
    #[cfg(feature = "jwt")]
    pub fn bearer_tokens(mut self, validator: super::jwt::JwtValidator) -> Self {
        self.jwt = Some(validator);
        self
    }

    fn into_shared(self) -> Shared<K> {
        let forward = match self.forwarding {
            CredentialForwarding::Strip => Forward::Strip,
            CredentialForwarding::Keep => Forward::Keep,
            CredentialForwarding::Replace(header, key) => {
                let value = key.header_value(header);
                Forward::Replace(header, value)
            }
        };
        Shared {
            store: self.store,
            accepted: self.accepted,
            clock: self.clock,
            forward,
            body_limit: self.body_limit,
            estimator: self.estimator,
            #[cfg(feature = "jwt")]
            jwt: self.jwt,
        }
    }

    /// Checks the configuration: at least one header must be accepted, and the body limit
    /// must be positive.
    pub fn build(self) -> Result<ApiKeyAuthLayer<K>, ConfigError> {
        if self.accepted.is_empty() {
            return Err(config_error(
                "accepted_headers",
                "no header is accepted, so no request could ever authenticate",
            ));
        }
        if self.body_limit == 0 {
            return Err(config_error(
                "body_limit",
                "must be at least 1 byte to read the model of a request",
            ));
        }
        Ok(ApiKeyAuthLayer {
            shared: Arc::new(self.into_shared()),
        })
    }
}
