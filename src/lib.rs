//! Tower middleware that makes traffic to LLM APIs behave.
//!
//! Every service that calls an LLM API meets the same failures: 401s from wrong, expired or
//! revoked keys; 403s from model allow-lists or from a CDN that answers with an HTML page;
//! 429s from rate limits and exhausted quotas; 503/529 overload; timeouts; malformed requests.
//! Each provider reports them in its own format. This crate offers independent, composable
//! [tower](https://docs.rs/tower) layers that answer all of them in one language: the
//! OpenAI-style envelope `{"error":{"message","type","code","param"}}` with a canonical status,
//! one of 18 [`ErrorCode`]s, and the `x-should-retry` / `retry-after` / `retry-after-ms`
//! headers the official SDKs obey.
//!
//! | module | what it does |
//! |---|---|
//! | [`error`] | the taxonomy: [`ErrorCode`], [`ApiError`], the envelope |
//! | [`classify`] | any upstream answer (15+ provider formats, HTML, empty, SSE) → [`ApiError`] |
//! | [`normalize`] | `NormalizeErrorsLayer`: upstream failures become envelopes |
//! | [`request`] | the parsed view of an LLM request, shared by the layers |
//! | [`body`] | bounded buffering |
//! | [`ext`] | values layers leave in extensions for each other |
//!
//! Every layer answers its own rejections with an envelope *response*, so its error type stays
//! the inner service's and it fits an axum router. Layers never depend on each other; they meet
//! through [`ApiError`] in the response extensions and the values in [`ext`] and [`request`].
//!
//! # Example
//!
//! ```
//! use axum::{routing::post, Router};
//! use llm_layers::normalize::NormalizeErrorsLayer;
//!
//! async fn proxy() -> (http::StatusCode, &'static str) {
//!     // Stands in for a call to the upstream that failed with an HTML page.
//!     (http::StatusCode::FORBIDDEN, "<html><title>Just a moment...</title></html>")
//! }
//!
//! let app: Router = Router::new()
//!     .route("/v1/chat/completions", post(proxy))
//!     .layer(NormalizeErrorsLayer::new());
//! # let _ = app;
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
pub mod body;
pub mod breaker;
pub mod classify;
#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
pub mod client;
pub mod error;
pub mod ext;
pub mod normalize;
pub mod request;
pub mod validate;

pub use error::{ApiError, ErrorCode};
