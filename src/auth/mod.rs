//! API-key authentication for LLM gateways, and the upstream key for LLM clients.
//!
//! A gateway in front of an LLM API hands out its own keys: several per team, rotated, some
//! expiring, some limited to cheap models, each with its own rate limits. [`ApiKeyAuthLayer`]
//! checks those keys against a [`KeyStore`] (the shipped [`InMemoryKeyStore`], or a database
//! behind the trait's async lookup) and leaves the caller's [`KeyIdentity`](crate::ext::KeyIdentity)
//! (id, tier, limits) in the request extensions for the rate-limit layer and the handlers,
//! next to the full record ([`AuthenticatedKey`]).
//!
//! It improves on a plain bearer check (`tower-http`'s `ValidateRequestHeaderLayer::bearer`)
//! where that matters for secrets:
//!
//! * keys are stored as SHA-256 digests, never as plaintext; the presented key is hashed on the
//!   stack, looked up by digest, and the record's digest is confirmed in constant time
//!   (`subtle`), so no answer's timing depends on how much of a secret matched;
//! * any number of keys are valid at once (rotation), each with an expiry, a revoked flag, a
//!   model allow-list (exact names and globs such as `gpt-4o-mini*`), a tier, labels and limits;
//! * `Authorization: Bearer` (scheme case-insensitive, per RFC 7235), `x-api-key` (Anthropic)
//!   and `api-key` (Azure) are read, as configured, and a request with two different keys, a
//!   header sent twice, another scheme or an empty key is told exactly what is wrong;
//! * secrets never appear in `Debug`, `Display`, logs or messages: messages show at most a
//!   masked key (`sk-...abcd`, see [`mask_key`]);
//! * the client's key is stripped before the request goes on, or replaced by an upstream key
//!   ([`CredentialForwarding`]).
//!
//! # What it answers
//!
//! Every rejection is an envelope response ([`ApiError::to_response`](crate::ApiError::to_response))
//! with `x-should-retry: false`; the inner service's error type is untouched.
//!
//! | case | status | `code` | `WWW-Authenticate` |
//! |---|---|---|---|
//! | no key in any accepted header | 401 | `invalid_api_key` | `Bearer` |
//! | malformed: empty key, scheme other than `Bearer`, bytes other than visible ASCII, a header sent twice, two headers with different keys | 401 | `invalid_api_key` | `Bearer error="invalid_request"` |
//! | unknown key | 401 | `invalid_api_key` | `Bearer error="invalid_token"` |
//! | revoked key | 401 | `revoked_api_key` | `Bearer error="invalid_token"` |
//! | expired key (the message says when) | 401 | `expired_api_key` | `Bearer error="invalid_token"` |
//! | a model not allowed for the key (the path's deployment, `model`, or one of `models`), or no model in the request of a restricted key | 403 | `permission_denied` (names the model and the allowed ones; `param` `model` or `models`) | `Bearer error="insufficient_scope"` |
//! | restricted key, body over the limit | 413 | `request_too_large` | |
//! | restricted key, body not a JSON object | 400 | `invalid_value` | |
//! | the store failed (`KeyStoreError`) | 503 | `service_unavailable` (retryable) | |
//!
//! The body is read only for keys restricted to some models, and only when no earlier layer
//! left a [`RequestView`](crate::request::RequestView): it is buffered up to the body limit
//! with [`EnsureView`](crate::request::EnsureView) and handed on intact, with the view in
//! the extensions for later layers. Other requests stream through untouched. The body limit
//! bounds what this layer reads; a later validation layer holds its own limit over the view
//! (see [`crate::validate`]).
//!
//! # Bodies, errors and readiness
//!
//! * **Any body.** [`ApiKeyAuth`] takes any `Request<B>` with `B: http_body::Body` (hyper's
//!   `Incoming`, axum's `Body`, `Full<Bytes>`, a boxed body) whose error converts into
//!   [`BoxError`](crate::body::BoxError), and asks nothing more of it: no `From<Bytes>`, no
//!   `Send`, no `'static`. The inner service receives `Request<LayerBody<B>>`
//!   ([`LayerBody`](crate::body::LayerBody)): the body as it was sent
//!   ([`LayerBody::new`](crate::body::LayerBody::new)), or the bytes read for the model check
//!   ([`LayerBody::full`](crate::body::LayerBody::full)). The answer is
//!   `Response<LayerBody<ResBody>>`: the inner service's body untouched, or a rejection's
//!   envelope. An axum `Router` takes `LayerBody<Body>` like any body, so `.layer(..)` on a
//!   router works unchanged.
//! * **Errors.** The error type is the inner service's (`Infallible` under axum, `BoxError`
//!   over `tower::timeout::Timeout`), passed on unchanged; rejections are responses, never
//!   errors.
//! * **Readiness.** [`ApiKeyAuth`] is always ready. The inner service is polled ready only
//!   after the key is checked (an asynchronous store lookup, a JWKS fetch) and the body is
//!   read (keys restricted to some models): for those, the inner service is cloned in `call`
//!   and the response future drives the clone, so a request waiting for its lookup or still
//!   uploading its body holds no slot of a `tower::limit::ConcurrencyLimit` or `Buffer`
//!   below. When the store answers within `call` ([`KeyStore::lookup_now`]: the in-memory and
//!   reloadable stores, a cache hit) and no body needs reading, nothing slow comes first: the
//!   inner service is polled ready right there and, when it is ready, called without a clone;
//!   when it is not, it moves into the response future (which drives it with the task's
//!   waker) and a fresh clone takes its place. An error from the inner `poll_ready` is the
//!   call's error, and that service is not polled again. A rejection never touches the inner
//!   service.
//!
//! # Cost per request
//!
//! On the success path of a key that may use any model, the layer reads the credential
//! headers, hashes the key with SHA-256 on the stack (the compression function called over the
//! key's blocks and a padded tail, SHA-NI where the CPU has it), looks the digest up, confirms it
//! in constant time, strips the credential headers it found and hands the body on untouched: it
//! allocates nothing of its own. What it hands on does allocate: `http::Extensions` boxes each
//! value, so the [`KeyIdentity`](crate::ext::KeyIdentity) and the [`AuthenticatedKey`] cost
//! four allocations when the request had no extensions yet (the map, its table, one box each)
//! and one box each when it had (plus one when their table must grow). A key restricted to
//! some models also pays for reading the body and building the
//! [`RequestView`](crate::request::RequestView), unless an earlier layer did.
//! `tests/auth_alloc.rs` counts these; the README gives the measured time.
//!
//! Every presented key is hashed with SHA-256, with no cache in front: the digest is what the
//! stores hold, so confirming a key against a record needs it. A verified-key cache would have
//! to find and confirm the key with a cheaper keyed hash instead, and the only such hash at hand
//! (two keyed SipHash-1-3 tags from the standard library, 128 bits) is measured at 0.73× the
//! time of SHA-256 for a 45-byte key and 0.66× for a 164-byte one: too little to pay for a
//! second index, its filling at request time and its invalidation on every revocation or
//! reload, and a tag whose key sits in the process is a weaker thing to keep than a digest.
//!
//! ```
//! use std::convert::Infallible;
//!
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use llm_layers::auth::{ApiKeyAuthLayer, InMemoryKeyStore, KeyRecord};
//! use llm_layers::body::LayerBody;
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = InMemoryKeyStore::new([KeyRecord::builder("team-a")
//!     .secret("sk-team-a-0123456789abcdef")
//!     .build()?])?;
//! // The inner service receives the request body wrapped in a `LayerBody`.
//! let upstream = service_fn(|req: Request<LayerBody<Full<Bytes>>>| async move {
//!     let body = req.into_body().collect().await?.to_bytes();
//!     Ok::<_, Infallible>(Response::new(Full::new(body)))
//! });
//! let svc = ApiKeyAuthLayer::new(store).layer(upstream);
//!
//! let req = Request::post("/v1/chat/completions")
//!     .header("authorization", "Bearer sk-team-a-0123456789abcdef")
//!     .body(Full::new(Bytes::from_static(br#"{"model":"gpt-4o"}"#)))?;
//! let res: Response<LayerBody<Full<Bytes>>> = svc.oneshot(req).await?;
//! assert_eq!(res.status(), 200);
//! assert_eq!(res.into_body().collect().await?.to_bytes(), r#"{"model":"gpt-4o"}"#);
//! # Ok(())
//! # }
//! ```
//!
//! Around a plain hyper server, the same layer wraps `Request<Incoming>`, with a hyper-util
//! client (behind a `tower::timeout::TimeoutLayer`, say) as the inner service over
//! `Request<LayerBody<Incoming>>`.
//!
//! # Which models a restricted key's request uses
//!
//! Every model the upstream may serve is checked against the key's allow-list, and the first
//! one not allowed is refused:
//!
//! * the Azure-style deployment the path names (`/openai/deployments/{name}/...`), read from
//!   the path as the upstream routes it ([`deployment_from_path`](crate::request::deployment_from_path):
//!   percent-encoding decoded, dot segments resolved), also when an earlier layer's view was
//!   built without the path; `param` is `model`;
//! * the body's `model` (`param` `model`);
//! * each name of an OpenRouter-style `models` array, any of which may answer (`param`
//!   `models`).
//!
//! A request to an allowed deployment needs no body `model` (and no body at all); a request
//! that names no model in any of these places is refused.
//!
//! # Logs
//!
//! Events go to the `llm_layers::auth` target: `API key accepted` (trace), `revoked key`,
//! `expired key` and `request rejected` (debug), `key store lookup failed` (warn). Key ids and
//! messages, which carry client-chosen model names, are recorded with `Debug` formatting, so a
//! newline or an escape sequence in them is escaped and cannot forge a log line. No event holds
//! a key or its digest.
//!
//! Put CORS handling outside this layer: a browser's preflight `OPTIONS` request carries no
//! key and would be answered `401`.
//!
//! # Example
//!
//! ```
//! use axum::{body::Body, routing::post, Extension, Router};
//! use http::{Request, StatusCode};
//! use llm_layers::auth::{ApiKeyAuthLayer, InMemoryKeyStore, KeyRecord};
//! use llm_layers::ext::{KeyIdentity, KeyLimits};
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = InMemoryKeyStore::new([
//!     KeyRecord::builder("team-a")
//!         .secret("sk-team-a-0123456789abcdef")
//!         .tier("pro")
//!         .limits(KeyLimits::new().requests_per_minute(60))
//!         .build()?,
//!     KeyRecord::builder("interns")
//!         .secret("sk-interns-0123456789abcdef")
//!         .allow_model("gpt-4o-mini*")
//!         .build()?,
//! ])?;
//!
//! let app = Router::new()
//!     .route(
//!         "/v1/chat/completions",
//!         post(|Extension(key): Extension<KeyIdentity>| async move { key.id().to_owned() }),
//!     )
//!     .layer(ApiKeyAuthLayer::new(store));
//!
//! let call = |key: &str, model: &str| {
//!     Request::post("/v1/chat/completions")
//!         .header("authorization", format!("Bearer {key}"))
//!         .body(Body::from(format!(r#"{{"model":"{model}","messages":[]}}"#)))
//!         .unwrap()
//! };
//!
//! let res = app.clone().oneshot(call("sk-team-a-0123456789abcdef", "gpt-4o")).await?;
//! assert_eq!(res.status(), StatusCode::OK);
//!
//! let res = app.clone().oneshot(call("sk-interns-0123456789abcdef", "gpt-4o")).await?;
//! assert_eq!(res.status(), StatusCode::FORBIDDEN);
//!
//! let res = app.clone().oneshot(call("sk-interns-0123456789abcdef", "gpt-4o-mini")).await?;
//! assert_eq!(res.status(), StatusCode::OK);
//!
//! let res = app.oneshot(call("sk-wrong", "gpt-4o")).await?;
//! assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
//! assert_eq!(res.headers()["www-authenticate"], r#"Bearer error="invalid_token""#);
//! assert_eq!(res.headers()["x-should-retry"], "false");
//! # Ok(())
//! # }
//! ```
//!
//! # Keys that change while the gateway runs
//!
//! * [`ReloadableKeyStore`] (feature `reload`, on by default): the whole key set swapped
//!   atomically, lock-free on the hot path; a TOML key file reloaded on `SIGHUP` and when it
//!   changes, a broken file refused with the field named and the old keys kept.
//! * [`CachedKeyStore`]: any asynchronous store (a database, a key service shared by
//!   replicas) behind a cache with positive and negative TTLs, single-flight lookups and a
//!   bound; a revocation takes effect within the positive TTL.
//! * [`RedisKeyStore`] (feature `redis`): keys in Redis or Valkey, shared by every replica,
//!   stored by SHA-256 digest only; put it behind a [`CachedKeyStore`].
//! * [`JwtValidator`] (feature `jwt`): OAuth 2.0 / JWT bearer tokens beside API keys, through
//!   [`ApiKeyAuthBuilder::bearer_tokens`], mapped to the same identity.
//!
//! On the client side, [`InjectApiKeyLayer`] sets the upstream key (Bearer, `x-api-key` or
//! `api-key`) on outgoing requests, as a sensitive header value.

mod cache;
#[cfg(feature = "config")]
mod config;
mod credentials;
mod future;
mod inject;
#[cfg(feature = "jwt")]
mod jwt;
mod layer;
#[cfg(feature = "redis")]
mod redis_store;
#[cfg(feature = "reload")]
mod reload;
mod service;
mod store;
mod time;

pub use cache::{
    CachedKeyStore, CachedKeyStoreBuilder, DEFAULT_MAX_ENTRIES, DEFAULT_NEGATIVE_TTL,
    DEFAULT_POSITIVE_TTL,
};
pub use credentials::{
    extract_api_key, mask_key, AcceptedHeaders, CredentialError, API_KEY, X_API_KEY,
};
pub use future::ResponseFuture;
pub use inject::{ApiKey, InjectApiKey, InjectApiKeyLayer, KeyHeader};
#[cfg(feature = "jwt")]
pub use jwt::{JwtAlgorithm, JwtValidator, JwtValidatorBuilder};
pub use layer::{ApiKeyAuthBuilder, ApiKeyAuthLayer, Clock, CredentialForwarding};
#[cfg(feature = "redis")]
pub use redis_store::{
    RedisKeyStore, RedisKeyStoreBuilder, DEFAULT_REDIS_KEY_PREFIX, DEFAULT_REDIS_KEY_TIMEOUT,
};
#[cfg(feature = "reload")]
pub use reload::{
    KeyFileReloader, ReloadOptions, ReloadOutcome, ReloadSummary, ReloadableKeyStore,
};
pub use service::ApiKeyAuth;
pub use store::{
    AuthenticatedKey, InMemoryKeyStore, KeyHash, KeyRecord, KeyRecordBuilder, KeyStore,
    KeyStoreError, LookupResult, ModelPattern,
};

pub use crate::config::ConfigError;

pub(crate) fn config_error(
    field: impl Into<std::borrow::Cow<'static, str>>,
    message: impl Into<std::borrow::Cow<'static, str>>,
) -> ConfigError {
    ConfigError::new("auth", field, message)
}
