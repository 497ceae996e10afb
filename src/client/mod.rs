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
//! let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
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

pub use adapter::{NextFuture, NextService, TowerMiddleware};
pub use api_error::{ApiErrorExt, ApiErrorMiddleware};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
