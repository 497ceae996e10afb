//! The crate's policies for [reqwest-middleware](https://docs.rs/reqwest-middleware) clients.
//!
//! # Why
//!
//! The layers of this crate are tower layers; many LLM clients are built on `reqwest`, and
//! `reqwest-middleware` is how they add policies. This module runs the same layers there, so a
//! client gets the same key injection, rate limits, retries honouring server hints, circuit
//! breaking and error taxonomy as a tower or axum service, and its errors are
//! [`ApiError`](crate::ApiError)s with one of the 18 [`ErrorCode`](crate::ErrorCode)s instead
//! of statuses and provider body formats.
//!
//! - [`TowerMiddleware`] runs any tower layer of this crate as a `reqwest_middleware::Middleware`.
//!   The layer wraps a [`NextService`] that hands requests on to the rest of the chain, so the
//!   layer behaves as it does in tower: the retry layer replays the request body (built from
//!   bytes by reqwest) and waits for `retry-after-ms` / `retry-after`, the breaker counts
//!   outcomes and answers at once when open, the rate limiter waits or rejects.
//! - [`ApiErrorMiddleware`] turns every error answer and every transport error into
//!   `Err(reqwest_middleware::Error::Middleware(..))` holding an [`ApiError`](crate::ApiError):
//!   the one an inner layer put in the response extensions, else the classification of the
//!   answer ([`classify_response`](crate::classify::classify_response), bounded read) or of the
//!   transport error. [`ApiErrorExt::api_error`] reads it back.
//!
//! # What it answers with
//!
//! | situation | result of `send()` |
//! |---|---|
//! | `2xx` (a stream stays a stream) | `Ok(response)` |
//! | `4xx` / `5xx` from the upstream, or an envelope from a layer | `Err`, `api_error()` = the layer's `ApiError`, else the classified body (`upstream_blocked` for an HTML block page, the provider's code for JSON errors) |
//! | connection refused or reset | `Err`, `service_unavailable` (status 502), the `reqwest::Error` as source |
//! | timeout | `Err`, `timeout` (504) |
//! | a request reqwest cannot build (invalid URL) | `Err(Error::Reqwest)` from `send()` before any middleware runs; [`ApiErrorExt::into_api_error`] gives `invalid_value` |
//! | a redirect to another origin refused by [`redirect_policy`] | `Err`, `upstream_blocked` (502, not retryable), naming the other origin |
//! | an answer from another origin than the one an `x-api-key` / `api-key` header was sent to (a client without [`redirect_policy`] followed a redirect) | `Err`, `upstream_blocked` (502, not retryable), naming the header and the fix |
//!
//! # Redirects and the API key
//!
//! reqwest follows redirects inside the `Client`, below every middleware, and on a cross-host
//! redirect it removes only `Authorization` (and cookies): an `x-api-key` (Anthropic) or
//! `api-key` (Azure OpenAI) header, injected by [`InjectApiKeyLayer`](crate::auth::InjectApiKeyLayer)
//! or set by the caller, goes on to the new host, and after a `307`/`308` the body (the prompt)
//! with it. A middleware cannot change headers between the hops, so the rule is:
//!
//! - **Build the client with [`redirect_policy`]**:
//!   `reqwest::Client::builder().redirect(llm_layers::client::redirect_policy())`. It follows
//!   redirects on the request's own origin (scheme, host, port) and refuses any other, so the
//!   key is never sent there; the refusal is an `upstream_blocked` error that a retry layer
//!   does not retry. (`reqwest::redirect::Policy::none()` is safe too: the `3xx` is handed
//!   back.)
//! - **A client built without it is caught after the fact**: [`TowerMiddleware`] and
//!   [`ApiErrorMiddleware`] compare the origin of the answer with the origin the request was
//!   sent to; when they differ and the request carried `x-api-key` or `api-key`, the key has
//!   left, and the answer (from a server nobody chose) is refused with an `upstream_blocked`
//!   error that names the header and this fix, and logged at `error` level. Rotate that key.
//!
//! # Order
//!
//! Middleware runs in the order it is added: put [`ApiErrorMiddleware`] first, so the layers
//! after it (retry, breaker) see answers rather than errors, then the layers from the outside
//! in, as in a `tower::ServiceBuilder`: rate limit, retry, breaker, key injection,
//! normalizer. Several layers can also share one [`TowerMiddleware`] as a tuple of layers
//! (outermost first) or a `tower::ServiceBuilder`'s stack: one hop through the chain instead
//! of one per layer.
//!
//! # Example
//!
//! ```
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::sync::Arc;
//!
//! use axum::http::{HeaderMap, StatusCode};
//! use llm_layers::auth::{ApiKey, InjectApiKeyLayer};
//! use llm_layers::client::{ApiErrorExt, ApiErrorMiddleware, TowerMiddleware};
//! use llm_layers::normalize::NormalizeErrorsLayer;
//! use llm_layers::ErrorCode;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // An upstream on a real socket: it checks the key, then answers 503 once.
//! let calls = Arc::new(AtomicU32::new(0));
//! let seen = calls.clone();
//! let upstream = axum::Router::new().fallback(move |headers: HeaderMap| async move {
//!     assert_eq!(headers["authorization"], "Bearer sk-upstream-0123456789");
//!     match seen.fetch_add(1, Ordering::SeqCst) {
//!         0 => (StatusCode::SERVICE_UNAVAILABLE, r#"{"error":{"message":"Overloaded"}}"#),
//!         _ => (StatusCode::OK, r#"{"choices":[]}"#),
//!     }
//! });
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let url = format!("http://{}/v1/chat/completions", listener.local_addr()?);
//! tokio::spawn(async move { axum::serve(listener, upstream).await });
//!
//! let http = reqwest::Client::builder()
//!     .redirect(llm_layers::client::redirect_policy())
//!     .build()?;
//! let client = reqwest_middleware::ClientBuilder::new(http)
//!     .with(ApiErrorMiddleware::new())
//!     .with(TowerMiddleware::new(InjectApiKeyLayer::bearer(ApiKey::new(
//!         "sk-upstream-0123456789",
//!     )?)))
//!     .with(TowerMiddleware::new(NormalizeErrorsLayer::new()))
//!     .build();
//!
//! let err = client.post(&url).body("{}").send().await.unwrap_err();
//! let api = err.api_error().expect("an ApiError");
//! assert_eq!(api.code(), ErrorCode::ServiceUnavailable);
//! assert!(api.is_retryable());
//!
//! let res = client.post(&url).body("{}").send().await?;
//! assert_eq!(res.status(), StatusCode::OK);
//! assert_eq!(calls.load(Ordering::SeqCst), 2);
//! # Ok(())
//! # }
//! ```

mod adapter;
mod api_error;
mod redirect;

pub use adapter::{NextFuture, NextService, TowerMiddleware};
pub use api_error::{ApiErrorExt, ApiErrorMiddleware};
pub use redirect::{redirect_policy, MAX_REDIRECTS};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
