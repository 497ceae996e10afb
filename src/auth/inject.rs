//! The client side: setting the upstream key on outgoing requests.

use std::fmt;
use std::task::{Context, Poll};

use http::header::{HeaderName, HeaderValue, AUTHORIZATION};
use http::{HeaderMap, Request};
use tower_layer::Layer;
use tower_service::Service;

use super::credentials::{MaybePresent, API_KEY, X_API_KEY};
use super::{config_error, ConfigError};

/// Which header carries a key upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyHeader {
    /// `Authorization: Bearer <key>` (OpenAI and most OpenAI-compatible APIs).
    #[default]
    Bearer,
    /// `x-api-key: <key>` (Anthropic).
    XApiKey,
    /// `api-key: <key>` (Azure OpenAI).
    ApiKey,
}

impl KeyHeader {
    /// The header's name.
    pub fn name(self) -> HeaderName {
        match self {
            KeyHeader::Bearer => AUTHORIZATION,
            KeyHeader::XApiKey => X_API_KEY,
            KeyHeader::ApiKey => API_KEY,
        }
    }
}

/// A secret API key. `Debug` and `Display` print `ApiKey(<redacted>)`; the header value it
/// makes is marked sensitive, so HTTP/2 never indexes it and `http`'s own `Debug` hides it.
#[derive(Clone)]
pub struct ApiKey {
    secret: Box<str>,
}

impl ApiKey {
    /// A key. Fails when it is empty or holds bytes other than visible ASCII. The error never
    /// quotes it.
    pub fn new(secret: impl Into<String>) -> Result<ApiKey, ConfigError> {
        let secret: String = secret.into();
        if secret.is_empty() {
            return Err(config_error("api_key", "the key is empty"));
        }
        if !secret.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(config_error(
                "api_key",
                "the key holds characters other than visible ASCII (spaces, control characters \
                 or non-ASCII)",
            ));
        }
        Ok(ApiKey {
            secret: secret.into_boxed_str(),
        })
    }

    /// The secret itself. Handle with care.
    pub fn expose_secret(&self) -> &str {
        &self.secret
    }

    /// The header value for `header`, marked sensitive.
    pub fn header_value(&self, header: KeyHeader) -> HeaderValue {
        let value = match header {
            KeyHeader::Bearer => HeaderValue::from_str(&format!("Bearer {}", self.secret)),
            KeyHeader::XApiKey | KeyHeader::ApiKey => HeaderValue::from_str(&self.secret),
        };
        // `new` admits visible ASCII only, which is always a valid header value.
        let mut value = value.unwrap_or_else(|_| HeaderValue::from_static(""));
        value.set_sensitive(true);
        value
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Removes every credential header (`authorization`, `x-api-key`, `api-key`) that may be
/// present; `present` says which ones are known to be absent already.
pub(crate) fn strip_credentials(headers: &mut HeaderMap, present: MaybePresent) {
    if present.authorization {
        headers.remove(AUTHORIZATION);
    }
    if present.x_api_key {
        headers.remove(X_API_KEY);
    }
    if present.api_key {
        headers.remove(API_KEY);
    }
}

/// Sets `value` as the only credential header, under `header`.
pub(crate) fn set_credential(
    headers: &mut HeaderMap,
    header: KeyHeader,
    value: &HeaderValue,
    present: MaybePresent,
) {
    strip_credentials(headers, present);
    headers.insert(header.name(), value.clone());
}

/// Sets the upstream API key on every outgoing request, replacing any credential header
/// (`authorization`, `x-api-key`, `api-key`) the request already had.
///
/// # Redirects
///
/// The key goes wherever the client below sends the request, and a redirect can send it to
/// another origin:
///
/// - **hyper-util's `Client`** (and hyper's connections) follow no redirects: a `3xx` is handed
///   back as the answer, and nothing is sent to its `Location`.
/// - **reqwest** (through [`TowerMiddleware`](crate::client::TowerMiddleware), feature
///   `reqwest`) follows them inside the client and keeps `x-api-key` and `api-key` on a
///   cross-host redirect: build it with
///   [`redirect_policy`](crate::client::redirect_policy) (see
///   [the client module](crate::client#redirects-and-the-api-key)).
/// - **tower-http's `FollowRedirect`** keeps these headers too (its `FilterCredentials` removes
///   `authorization`, `cookie` and `proxy-authorization` only), and with this layer inside it
///   every hop gets the key again: give it the `policy::SameOrigin` policy.
///
/// ```
/// use http::Request;
/// use llm_layers::auth::{ApiKey, InjectApiKeyLayer};
/// use tower::{service_fn, Layer, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let layer = InjectApiKeyLayer::x_api_key(ApiKey::new("sk-ant-upstream-key")?);
/// let client = layer.layer(service_fn(|req: Request<()>| async move {
///     let value = req.headers()["x-api-key"].clone();
///     assert!(value.is_sensitive());
///     Ok::<_, std::convert::Infallible>(value.to_str().unwrap().to_owned())
/// }));
/// let seen = client.oneshot(Request::new(())).await?;
/// assert_eq!(seen, "sk-ant-upstream-key");
/// assert!(!format!("{layer:?}").contains("upstream"));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct InjectApiKeyLayer {
    header: KeyHeader,
    value: HeaderValue,
}

impl InjectApiKeyLayer {
    /// Sends `key` in `header`.
    pub fn new(header: KeyHeader, key: ApiKey) -> Self {
        InjectApiKeyLayer {
            header,
            value: key.header_value(header),
        }
    }

    /// Sends `Authorization: Bearer <key>`.
    pub fn bearer(key: ApiKey) -> Self {
        InjectApiKeyLayer::new(KeyHeader::Bearer, key)
    }

    /// Sends `x-api-key: <key>`.
    pub fn x_api_key(key: ApiKey) -> Self {
        InjectApiKeyLayer::new(KeyHeader::XApiKey, key)
    }

    /// Sends `api-key: <key>`.
    pub fn api_key(key: ApiKey) -> Self {
        InjectApiKeyLayer::new(KeyHeader::ApiKey, key)
    }
}

impl fmt::Debug for InjectApiKeyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InjectApiKeyLayer")
            .field("header", &self.header)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl<S> Layer<S> for InjectApiKeyLayer {
    type Service = InjectApiKey<S>;

    fn layer(&self, inner: S) -> InjectApiKey<S> {
        InjectApiKey {
            inner,
            header: self.header,
            value: self.value.clone(),
        }
    }
}

/// The service made by [`InjectApiKeyLayer`].
#[derive(Clone)]
pub struct InjectApiKey<S> {
    inner: S,
    header: KeyHeader,
    value: HeaderValue,
}

impl<S> InjectApiKey<S> {
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

impl<S: fmt::Debug> fmt::Debug for InjectApiKey<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InjectApiKey")
            .field("inner", &self.inner)
            .field("header", &self.header)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl<S, B> Service<Request<B>> for InjectApiKey<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> S::Future {
        set_credential(
            req.headers_mut(),
            self.header,
            &self.value,
            MaybePresent::ALL,
        );
        self.inner.call(req)
    }
}
