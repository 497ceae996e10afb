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
//! | [`auth`] | `ApiKeyAuthLayer`: Bearer / `x-api-key` / `api-key`, hashed keys, invalid / expired / revoked answers, model allow-lists, reloadable / cached / Redis key stores, JWT bearer tokens (feature `jwt`); `InjectApiKeyLayer` for clients |
//! | [`validate`] | `ValidateRequestLayer`: clear 400s before a request costs money |
//! | `rate_limit` | `RateLimitLayer` (feature `rate-limit`, on by default): keyed GCRA buckets by requests and tokens, concurrency caps, exact `retry-after`; shared through Redis with feature `redis` |
//! | [`retry`] | `RetryLayer`: class-driven retries, jittered backoff, server wait hints, deadline, retry budget, replayable bodies |
//! | `client` | reqwest-middleware adapters (feature `reqwest`): any layer as a `Middleware`, and `ApiErrorMiddleware` for typed errors |
//! | [`config`] | the `ConfigError` every builder returns |
//! | `stack` | `Stack` (feature `config`, on by default): one TOML file → every layer above, validated, with per-route policies; what `examples/gateway` runs on |
//! | [`breaker`] | `CircuitBreakerLayer`: failure and slow-call rates, half-open probes, fallback to a backup model or upstream |
//! | [`policy`] | the one failure vocabulary: what a response, a stream's end or a transport error means for retries and circuits |
//! | [`request`] | the parsed view of an LLM request and the request head, shared by the layers |
//! | [`body`] | the crate body type `LayerBody` and the one bounded buffering future |
//! | [`ext`] | values layers leave in extensions for each other |
//! | [`metrics`] | the names every layer reports under: metrics through the `metrics` facade (feature `metrics`), tracing fields |
//!
//! Every layer answers its own rejections with an envelope *response*, so its error type stays
//! the inner service's and it fits an axum router. Layers never depend on each other; they meet
//! through [`ApiError`] in the response extensions and the values in [`ext`] and [`request`].
//!
//! Recommended order in a gateway, outermost first: request id and tracing → auth → validation
//! → rate limit → retry → breaker → normalizer → per-attempt timeout → HTTP client. The
//! normalizer sits closest to the upstream so each raw answer is classified once; the layers
//! outside it read the [`ApiError`] from the response extensions.
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
pub mod config;
pub mod error;
pub mod ext;
mod fields;
mod json;
pub mod metrics;
pub mod normalize;
pub mod policy;
#[cfg(feature = "rate-limit")]
pub mod rate_limit;
pub mod request;
pub mod retry;
#[cfg(all(feature = "config", feature = "rate-limit"))]
pub mod stack;
pub mod validate;

pub use error::{ApiError, ErrorCode};
