//! Retries for LLM API calls: only what a retry can fix, as the server asks, within a budget.
//!
//! LLM APIs fail often and mostly transiently: `429` when a rate limit is hit, `503`/`529` when
//! a model is overloaded, reset connections, slow first bytes. A blind retry loop makes things
//! worse: it replays requests that can never succeed (a bad key, no quota, a prompt that does
//! not fit), ignores the server's `retry-after`, and under an outage multiplies the load on an
//! upstream that is already down. This layer retries the way the official SDKs do, and adds
//! what a shared gateway needs:
//!
//! - **Only requests that are safe to send twice** are retried: idempotent methods, `POST`s
//!   to generation endpoints, and any request with an `Idempotency-Key` (see
//!   [Which requests](#which-requests-are-retried)). A file upload or a fine-tuning job is
//!   sent once.
//! - **What is retried** is decided by the crate's one failure vocabulary
//!   ([`policy`](crate::policy)); see [What is retried](#what-is-retried). Only failures of a
//!   kind [retried by default](crate::policy::FailureKind::retried_by_default)
//!   (`rate_limit_exceeded`, `concurrent_limit_exceeded`, `internal_error`,
//!   `service_unavailable`, `timeout`) and transport errors are retried. A
//!   [predicate](RetryLayerBuilder::retry_if) can change the decision, but auth and
//!   permission codes, `insufficient_quota`, invalid or oversized requests,
//!   `content_policy_violation` and `upstream_blocked`
//!   ([never retried](crate::policy::FailureKind::never_retried)) are not, unless the upstream
//!   itself says so ([below](#the-upstreams-x-should-retry)).
//! - **A refusal by a layer of this crate is never waited on.** An open circuit breaker
//!   answers `503` with `retry-after` set to the time until it half-opens, and marks the
//!   answer [`RefusedLocally`](crate::ext::RefusedLocally). That wait is how long a local
//!   state lasts, not a hint from the upstream: the layer answers at once with it
//!   ([`RetryStop::RefusedLocally`], `x-llm-layers-retry-stop: refused-locally`), spends
//!   nothing from the budget, and leaves the breaker's envelope, `x-should-retry` and
//!   `retry-after` as they are. The open circuit fails fast through the whole stack, and
//!   parked requests hold no slots of the layers further out.
//! - **Server hints win.** A wait from `retry-after-ms`, `retry-after` (or whatever the
//!   classifier found) is honoured: the next attempt starts in `[hint, hint + hint_jitter]`.
//!   A hint longer than [`max_retry_after`](RetryLayerBuilder::max_retry_after) (60 s) or
//!   than what is left of the deadline ends the retries at once with the upstream's answer
//!   (`retry-after-too-long`, `retry-after-past-deadline`).
//! - **Otherwise exponential backoff** with full jitter (0.5 s base, 8 s cap; equal and
//!   decorrelated jitter available), at most 3 attempts by default and never more than 10.
//! - **A retry budget** shared by all clones of the layer ([`RetryBudget`]): under a total
//!   outage the upstream sees about `1.2x` the offered load, not `3x`.
//! - **A deadline** across attempts and an optional per-attempt timeout. No wait is scheduled
//!   that would end past the deadline.
//! - **Streams are committed** once the response head arrives: the body is handed on
//!   untouched, and a stream that fails midway is never retried.
//! - **No setting can overflow the clock**: deadlines, attempt timeouts and waits are added to
//!   the current instant saturated (at 30 years, as tokio does), so `Duration::MAX` means
//!   "never" and is never a panic.
//!
//! # What is retried
//!
//! A response head is judged by the layer's [policy](RetryLayerBuilder::policy)
//! ([`DefaultPolicy`](crate::policy::DefaultPolicy) unless set): it sees the status, the
//! headers and the [`ApiError`] an inner normalizer left in the response extensions, and says
//! [`Success`](crate::policy::Outcome::Success) (never retried) or a failure with a code and
//! a [`FailureKind`](crate::policy::FailureKind), which decides: `Transient` and `Throttled`
//! are retried, `Blocked` and `Caller` never, `Other` only when a
//! [predicate](RetryLayerBuilder::retry_if) asks. The wait hint and the upstream's
//! `x-should-retry` are read from the normalizer's [`ApiError`], else from
//! [`classify_head`](crate::classify::classify_head). A transport error (the inner service's
//! `Err`, of any type that is `Into<BoxError>`) goes by the same table, classified as
//! [`classify_transport_error`](crate::classify::classify_transport_error) reads its chain:
//! `timeout` when a timeout is anywhere in it (a `tower::timeout` `Elapsed` inside a
//! `BoxError` included), else `service_unavailable`; both are retried. With
//! [`TransportErrors::Envelope`] (the default) the error is never returned, so the layer takes
//! it ([`classify_error`](crate::policy::classify_error)) and reads the chain of any type;
//! with [`TransportErrors::Propagate`] it keeps it to return it and looks at it in place
//! ([`classify_error_ref`](crate::policy::classify_error_ref)), which knows the common error
//! types (`BoxError`, `std::io::Error`, `Elapsed`, hyper's and reqwest's) and calls any other a
//! plain `service_unavailable`.
//!
//! # Which requests are retried
//!
//! A retry sends the request again; for a request that creates something, that can do the
//! work twice. A request is retried only when one of these holds:
//!
//! 1. it carries an `Idempotency-Key` header (the caller's own, or one the layer added with
//!    [`idempotency_keys(true)`](RetryLayerBuilder::idempotency_keys): a random UUID, the same
//!    on every attempt, on each `POST` or `PATCH` without one);
//! 2. the request rule accepts its method and path: by default [`safe_to_retry`], that is
//!    idempotent methods (`GET`, `HEAD`, `OPTIONS`, `TRACE`, `PUT`, `DELETE`) and `POST`s to
//!    the endpoints that generate an answer — OpenAI-style `/chat/completions`,
//!    `/completions`, `/embeddings`, `/responses`, `/moderations` (Azure deployments
//!    included), Anthropic `/v1/messages` (and `count_tokens`), Gemini `:generateContent`,
//!    `:streamGenerateContent`, `:countTokens`, `:embedContent`, `:batchEmbedContents`.
//!    [`retry_requests`](RetryLayerBuilder::retry_requests) replaces the rule with any
//!    predicate over method and path.
//!
//! The path is matched as an upstream that decodes paths routes it
//! ([`normalize_path`](crate::request::normalize_path)), so `/v1/chat/%63ompletions` is a chat
//! completion and `/v1/chat/completions/../../files` is a file upload. Anything else — file
//! uploads, fine-tuning jobs, batches, assistants, threads and runs, vector stores, `PATCH` —
//! is sent once, untouched and unbuffered, and its answer says
//! `x-llm-layers-retry-stop: not-idempotent` ([`RetryStop::NotIdempotent`]).
//!
//! # The upstream's `x-should-retry`
//!
//! OpenAI (and gateways built from this crate) send `x-should-retry`, and the official SDKs
//! read it before they look at the status. On a raw upstream answer the layer does the same:
//!
//! - `x-should-retry: false`: never retried ([`RetryStop::NotRetryable`]);
//! - `x-should-retry: true`: retried whatever the code (a `409`, a `400`), as the SDKs do;
//!   a [`retry_if`](RetryLayerBuilder::retry_if) predicate may still refuse, and the request
//!   must still be safe to send twice;
//! - no header (or another value): the classification and the predicate decide.
//!
//! An [`ApiError`] an inner layer left in the extensions is that layer's whole
//! classification (the `x-should-retry` on its envelope is derived from it), so the header is
//! not read again there.
//!
//! # `x-should-retry`, `retry-after` and the stop reason on the answer
//!
//! `x-should-retry` on the answer tells the caller whether sending the request again is
//! worthwhile; `retry-after` tells it when the upstream will take it; the
//! `x-llm-layers-retry-stop` header tells why this layer stopped. They never contradict:
//!
//! - the layer writes `x-should-retry: false` (with
//!   [`mark_exhausted`](RetryLayerBuilder::mark_exhausted), on by default) only when it **did
//!   retry** (two attempts or more) and then gave up on an error it would otherwise have
//!   retried: `attempts-exhausted`, `budget-exhausted`, `deadline`, `retry-after-too-long`,
//!   `retry-after-past-deadline`. The caller's own retries would only repeat the gateway's.
//! - A stop on the first attempt leaves the answer's `x-should-retry` and `retry-after` as the
//!   upstream (or the refusing layer) sent them: a hint of 42 s past a 30 s deadline is
//!   answered with the upstream's `retry-after: 42`, its own `x-should-retry` (if any) and
//!   `x-llm-layers-retry-stop: retry-after-past-deadline`: no retry was made, and the caller
//!   may come back in 42 s.
//! - A local refusal ([`RetryStop::RefusedLocally`]) is never marked: the refusing layer
//!   says when to come back.
//!
//! # Replaying the body
//!
//! The request body may be any `B: http_body::Body` (hyper's `Incoming`, axum's non-`Clone`
//! `Body`, `Full`, a boxed body); the inner service receives `Request<LayerBody<B>>`
//! ([`LayerBody`](crate::body::LayerBody)). A request that may be retried is read into memory
//! up to [`body_limit`](RetryLayerBuilder::body_limit) (4 MiB) through the crate's one
//! buffering future, [`BufferRequest`](crate::body::BufferRequest), and each attempt gets
//! `LayerBody::full(bytes.clone())` (a reference count, not a copy). A request sent once (not
//! safe to send twice, `max_attempts(1)`, or a body over the limit) gets
//! `LayerBody::new(body)`, untouched and unbuffered.
//!
//! The limit is the core's rule ([`check_limit`](crate::body::check_limit)): a body announced
//! larger than the limit (`content-length` or the size hint) is sent once, untouched, without
//! retries: the response says `x-llm-layers-attempts: 1` and
//! `x-llm-layers-retry-stop: body-too-large`, and a tracing event records it. A chunked body
//! that turns out larger than the limit while it is read has been partly consumed and cannot
//! be handed on intact, so it is answered with `413 request_too_large` (and a body that fails
//! to read with `400 invalid_value`); the upstream is not called and the attempts header says
//! `0`. Request trailers are not replayed (LLM APIs do not use them).
//!
//! The future is a state machine (no boxing); its timers are tokio's, so the layer needs a
//! tokio runtime with time enabled only when it has to wait (retries, deadline, attempt timeout).
//!
//! # Readiness
//!
//! Buffering a body takes as long as the client takes to upload it, so the layer reserves
//! nothing of the inner service first: [`Retry`]'s `poll_ready` is always ready without
//! polling the inner service; `call` takes a fresh clone of it; the response future buffers the
//! body and only then drives that clone's `poll_ready`, before each attempt. Behind a
//! `tower::limit::ConcurrencyLimit`, a `Buffer` or a rate limiter further in, a slow uploader
//! holds no slot. The wait for readiness counts against the deadline. A `poll_ready` error is
//! final (tower's rule): the call returns that `Err` at once, whatever
//! [`TransportErrors`] says, and the service that failed is not polled again.
//!
//! # What it answers with
//!
//! The last upstream response, as it was (but for `x-should-retry`, see above), when retries
//! end on an upstream error (the [`RetryStop`] reason is in the extensions and the
//! `x-llm-layers-retry-stop` header). When
//! the last attempt failed with a transport error: by default the envelope from
//! [`classify_error`](crate::policy::classify_error) (`502 service_unavailable` or
//! `504 timeout`), so the service fits an axum router; with [`TransportErrors::Propagate`] the
//! inner service's own `Err`. An attempt cut by the per-attempt timeout or the deadline is
//! answered with `504 timeout`. The layer's `Error` is always the inner service's
//! (`type Error = S::Error`, with `S::Error: Into<BoxError> + 'static`), and its response body
//! is `LayerBody<ResB>`: the inner answer wrapped with `LayerBody::new`, or an envelope the
//! layer wrote.
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
