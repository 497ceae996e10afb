//! Retries for LLM API calls: only what a retry can fix, as the server asks, within a budget.
//!
//! LLM APIs fail often and mostly transiently: `429` when a rate limit is hit, `503`/`529` when
//! a model is overloaded, reset connections, slow first bytes. A blind retry loop makes things
//! worse: it replays requests that can never succeed (a bad key, no quota, a prompt that does
//! not fit), ignores the server's `retry-after`, and under an outage multiplies the load on an
//! upstream that is already down. This layer retries the way the official SDKs do, and adds
//! what a shared gateway needs:
//!
//! - **What is retried** is decided by the crate's classification: the [`ApiError`] an inner
//!   normalizer left in the response extensions, else
//!   [`classify_head`](crate::classify::classify_head) on the status and headers. Only
//!   [`ApiError::is_retryable`] errors (`rate_limit_exceeded`, `concurrent_limit_exceeded`,
//!   `internal_error`, `service_unavailable`, `timeout`) and transport errors
//!   ([`classify_transport_error`](crate::classify::classify_transport_error)) are retried.
//!   A [predicate](RetryLayerBuilder::retry_if) can change the decision, but auth and
//!   permission codes, `insufficient_quota`, invalid or oversized requests,
//!   `content_policy_violation` and `upstream_blocked` are never retried.
//! - **Server hints win.** A wait from `retry-after-ms`, `retry-after` (or whatever the
//!   classifier found) is honoured: the next attempt starts in `[hint, hint + hint_jitter]`.
//!   A hint longer than [`max_retry_after`](RetryLayerBuilder::max_retry_after) (60 s) or
//!   than what is left of the deadline ends the retries at once with the upstream's answer.
//! - **Otherwise exponential backoff** with full jitter (0.5 s base, 8 s cap; equal and
//!   decorrelated jitter available), at most 3 attempts by default and never more than 10.
//! - **A retry budget** shared by all clones of the layer ([`RetryBudget`]): under a total
//!   outage the upstream sees about `1.2x` the offered load, not `3x`.
//! - **A deadline** across attempts and an optional per-attempt timeout. No wait is scheduled
//!   that would end past the deadline.
//! - **Streams are committed** once the response head arrives: the body is handed on
//!   untouched, and a stream that fails midway is never retried.
//!
//! # Replaying the body
//!
//! The request body (any `B: http_body::Body + From<Bytes>`, axum's non-`Clone` `Body`
//! included) is read into memory up to [`body_limit`](RetryLayerBuilder::body_limit) (4 MiB)
//! and rebuilt with `B::from(bytes.clone())` for each attempt. A body announced larger than
//! the limit (`content-length` or the size hint) is sent once, untouched, without retries:
//! the response says `x-llm-layers-attempts: 1` and `x-llm-layers-retry-stop: body-too-large`,
//! and a tracing event records it. A chunked body that turns out larger than the limit while
//! it is read has been partly consumed and cannot be handed on intact, so it is answered with
//! `413 request_too_large` (and a body that fails to read with `400 invalid_value`); the
//! upstream is not called and the attempts header says `0`. Request trailers are not replayed
//! (LLM APIs do not use them).
//!
//! The future is a state machine (no boxing); its timers are tokio's, so the layer needs a
//! tokio runtime with time enabled only when it has to wait (retries, deadline, attempt timeout).
//!
//! # What it answers with
//!
//! The last upstream response, as it was, when retries end on an upstream error (the
//! [`RetryStop`] reason is in the extensions and the `x-llm-layers-retry-stop` header). When
//! the last attempt failed with a transport error: by default the envelope from
//! `classify_transport_error` (`502 service_unavailable` or `504 timeout`), so the service
//! fits an axum router; with [`TransportErrors::Propagate`] the inner service's own `Err`.
//! An attempt cut by the per-attempt timeout or the deadline is answered with
//! `504 timeout`. The layer's `Error` is always the inner service's.
//!
//! Every response carries [`Attempts`](crate::ext::Attempts) in its extensions and, unless
//! turned off, an `x-llm-layers-attempts` header.
//!
//! # Example
//!
//! ```
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use axum::body::Body;
//! use axum::http::{Request, StatusCode};
//! use axum::routing::post;
//! use axum::Router;
//! use llm_layers::retry::{Backoff, Jitter, RetryLayer};
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let calls = Arc::new(AtomicU32::new(0));
//! let seen = calls.clone();
//! // Stands in for the upstream call: overloaded twice, then fine.
//! let upstream = post(move |body: String| async move {
//!     if seen.fetch_add(1, Ordering::SeqCst) < 2 {
//!         (StatusCode::SERVICE_UNAVAILABLE, String::new())
//!     } else {
//!         (StatusCode::OK, body)
//!     }
//! });
//! let retry = RetryLayer::builder()
//!     .max_attempts(3)
//!     .backoff(Backoff::new(Duration::from_millis(1), Duration::from_millis(20), Jitter::Full).unwrap())
//!     .deadline(Duration::from_secs(30))
//!     .build()
//!     .unwrap();
//! let app = Router::new()
//!     .route("/v1/chat/completions", upstream)
//!     .layer(retry);
//!
//! let req = Request::post("/v1/chat/completions")
//!     .body(Body::from(r#"{"model":"gpt-4o-mini","messages":[]}"#))
//!     .unwrap();
//! let res = app.oneshot(req).await.unwrap();
//! assert_eq!(res.status(), StatusCode::OK);
//! assert_eq!(res.headers()["x-llm-layers-attempts"], "3");
//! assert_eq!(calls.load(Ordering::SeqCst), 3);
//! # }
//! ```

use http::header::HeaderName;

mod backoff;
mod budget;
mod config;
mod future;
mod layer;
mod safety;
mod service;

pub use backoff::{Backoff, Jitter};
pub use budget::RetryBudget;
pub use config::{
    ConfigError, RetryEvent, RetryLayerBuilder, RetryStop, TransportErrors, MAX_ATTEMPTS_LIMIT,
};
pub use future::ResponseFuture;
pub use layer::RetryLayer;
pub use safety::safe_to_retry;
pub use service::Retry;

#[allow(unused_imports)]
use crate::error::ApiError;

/// `x-llm-layers-attempts`: how many attempts the layer made for this response.
pub const X_ATTEMPTS: HeaderName = HeaderName::from_static("x-llm-layers-attempts");
/// `x-llm-layers-retry-stop`: why the layer did not retry (further), when the answer is an
/// error or the request was not replayable.
pub const X_RETRY_STOP: HeaderName = HeaderName::from_static("x-llm-layers-retry-stop");

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
