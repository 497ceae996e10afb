//! Error-envelope normalizer: every upstream failure becomes one OpenAI-style JSON envelope.
//!
//! # Why
//!
//! Each LLM provider reports failures in its own body format; CDNs and WAFs answer with HTML
//! pages (clients then crash on "invalid character '<'"); transport errors arrive as Rust errors
//! rather than responses; some providers report errors inside a `200` event stream. Callers
//! end up parsing a dozen formats by hand.
//!
//! [`NormalizeErrorsLayer`] wraps the service that talks to the upstream (an HTTP client, or the
//! handler that proxies to it). For every answer it returns:
//!
//! - **2xx**: handed on without buffering; an SSE stream stays a stream, chunk for chunk, and an
//!   in-band error event (`data: {"error":...}`, Anthropic's `event: error`) is rewritten to the
//!   envelope form in-band. A stream that breaks off ends with an in-band
//!   `service_unavailable` event instead of a cut connection. An empty `200` where an answer was
//!   due is classified; so, with [`NormalizeOptions::inspect_ok_json`], is a `200` whose JSON
//!   body is an error object.
//! - **4xx / 5xx**: the body is read (up to a limit, 1 MiB by default, and for at most a time,
//!   5 s by default; beyond either the classifier works on what was read), classified by
//!   [`crate::classify::classify_response`] and replaced by the envelope
//!   `{"error":{"message","type","code","param"}}` with the code's canonical status,
//!   `x-should-retry`, `retry-after` / `retry-after-ms` when a wait is known, and the
//!   upstream's `x-ratelimit-*` and request-id headers. The [`ApiError`](crate::error::ApiError)
//!   is also put in the response extensions, so outer layers (retry, breaker) read it without
//!   parsing again.
//! - **transport errors** (connection refused or reset, timeouts from an inner timeout layer):
//!   a call that fails with an `Err` of any type that is `Into<BoxError>` answers
//!   `502 service_unavailable`, or `504 timeout` for a timeout anywhere in the error's chain
//!   (`tower::timeout`'s `Elapsed` inside a `BoxError` included), through
//!   [`policy::classify_error`](crate::policy::classify_error). So a call never fails.
//!
//! # Errors and readiness
//!
//! The layer's error type is the inner service's (`type Error = S::Error`), so an inner
//! [`Infallible`](std::convert::Infallible) service (an axum router, a handler) stays
//! infallible and fits a router. The only `Err` the layer can return is the inner service's
//! `poll_ready` error, passed on unchanged: a service that failed to become ready is broken
//! (tower's rule), so the error is final. The layer does not turn it into an answer, keeps no
//! copy of it and does not poll that service again; it is the caller's (a `tower::buffer`, a
//! balancer, a server) to drop the service. Over a `tower::timeout::Timeout` the error type is
//! `BoxError`; `.map_err(..)` or a `match` at the edge turns it into what the server needs.
//!
//! # Rules
//!
//! - **An error body cannot hold the answer.** It is read for at most
//!   [`NormalizeOptions::error_body_timeout`] (5 s by default, counted from the first time the
//!   layer waits for it) and up to [`NormalizeOptions::body_limit`] bytes. When either runs
//!   out, the body is dropped and the answer is classified from its status, its headers and
//!   the bytes read so far: a `503` head followed by a stalled body is a `503` envelope after
//!   the timeout, with the head's `retry-after`, not a hang until the upstream gives up.
//! - **Bodiless answers are not empty answers.** The layer records the request method: the
//!   answer to a `HEAD` has no body by definition, so it is handed on as it came (never an
//!   "empty `200`", never inspected, never framed as a stream); `204`, `304` and `1xx` answers
//!   are handed on too. Only a `200` to another method with a body known to be empty counts as
//!   an answer that did not come.
//! - **Streams are framed by line, with a bound.** A line of a `200` event stream ends at
//!   `\n`, `\r\n` or `\r`. Only `data:` lines carrying an error are rewritten (keeping their
//!   own line ending); every other byte is handed on unchanged, whatever the chunk boundaries,
//!   and a chunk of whole lines without an error goes out as the same buffer, without a copy.
//!   The start of an unfinished line is held until its end arrives, up to
//!   [`NormalizeOptions::sse_line_limit`] (64 KiB by default); a longer line is handed on
//!   uninspected as its bytes arrive, and inspection resumes at the next line. What a stream
//!   can make the layer hold is thus bounded by the limit. Trailers follow the held bytes.
//! - **Inspection of `200` JSON changes nothing unless it answers with an envelope.** With
//!   [`NormalizeOptions::inspect_ok_json`], a body is suspect only when it opens like an error
//!   object: `{"error":` followed by an object or a string, `{"type":"error"` or
//!   `{"object":"error"` (possibly inside `[`). `"error":null`, which every Responses API
//!   object carries, is not suspect, nor is an `"error"` key further in. A body that is not
//!   suspect is handed on from its first frame, frame for frame. A suspect body is read (within
//!   the read limit and timeout) and classified; unless the classifier finds an error, every
//!   byte read, the rest of the body and its trailers are handed on unchanged. A suspect body
//!   larger than the read limit is handed on unchanged without being classified. A body that
//!   breaks off before anything was handed on is a `502 service_unavailable`.
//!
//! # Streams
//!
//! For a 2xx `text/event-stream` answer the layer can decide on the first event and time the
//! stream. Every setting is off by default; the stack reads them from `[upstream]` (see
//! [`crate::stack::UpstreamConfig`]), per route too.
//!
//! | option | default | |
//! |---|---|---|
//! | [`hold_first_event`](NormalizeOptions::hold_first_event) | off | hold the head until the first event |
//! | [`first_event_max_bytes`](NormalizeOptions::first_event_max_bytes) | 64 KiB | the most bytes held before it |
//! | [`first_event_timeout`](NormalizeOptions::first_event_timeout) | none | the longest wait for it, from the head |
//! | [`stream_idle_timeout`](NormalizeOptions::stream_idle_timeout) | none | the longest silence between chunks |
//! | [`stream_total_timeout`](NormalizeOptions::stream_total_timeout) | none | the longest stream, from the head |
//!
//! - **The first event decides.** With the hold on, the head waits for the first event: a
//!   block with a `data:` line ended by a blank line (comment lines are held too, but are no
//!   event). An error event (OpenAI's `data: {"error":...}`, Anthropic's `event: error`, every
//!   shape [`classify_sse_event`](crate::classify::classify_sse_event) reads), or an end or a
//!   break before any event, turns the answer into an ordinary error answer (the envelope, its
//!   status, `x-should-retry`, the retry headers, the upstream's request-id and rate-limit
//!   headers, the [`ApiError`](crate::error::ApiError) in the extensions): nothing had reached
//!   the client, so retry, breaker and fallback outside treat it as any failure. Otherwise the
//!   head and the held bytes go on at once and the rest is handed on chunk for chunk, through
//!   the same in-band rewriting as any stream. More than `first_event_max_bytes` without a
//!   complete event hands everything on undecided. The hold is off by default: it changes what
//!   a client sees for a stream that fails before its first event, delays the head to the first
//!   event and costs one allocation per held stream (and one copy when the first event spans
//!   chunks). Answers that are not 2xx event streams are never held.
//! - **Timeouts.** While the head is held, running out of the first-event or total time is a
//!   `504 timeout` answer (retryable). After the head, it ends the stream with one terminal
//!   in-band error event in the stream's dialect, and the body ends: `data: {"error":{...,
//!   "code":"timeout"}}` then `data: [DONE]` for OpenAI-style streams (the SDKs raise on an
//!   `error` key; hand-written readers wait for `[DONE]`), `event: error` +
//!   `data: {"type":"error","error":{"type":"timeout_error",...}}` for a stream that opened
//!   with Anthropic's `message_start`. Without the hold, the first-event time runs to the
//!   stream's first byte. The idle time restarts on every chunk, keep-alive comments
//!   included. The timers are tokio's (exact under `tokio::time::pause`; no runtime, no bound)
//!   and cost nothing when unset.
//! - **Outcomes.** A failure before the first byte is an error answer. After it, the terminal
//!   event ends the body cleanly for the client, and a trailer,
//!   [`STREAM_ERROR_TRAILER`](crate::policy::STREAM_ERROR_TRAILER) with the failure's code,
//!   follows the last bytes: an outcome recorder at the end of the body (the breaker) counts
//!   the stream as a failure with that code — after a stream timeout, a stream that broke off,
//!   or one that carried an error event. HTTP/1 clients that did not ask for trailers never see
//!   it.
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use llm_layers::normalize::{NormalizeErrorsLayer, NormalizeOptions};
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // A 200 stream whose first event is a rate-limit error.
//! let upstream = service_fn(|_req: Request<Full<Bytes>>| async {
//!     let event = r#"data: {"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#;
//!     Ok::<_, std::io::Error>(
//!         Response::builder()
//!             .header("content-type", "text/event-stream")
//!             .body(Full::new(Bytes::from(format!("{event}\n\n"))))
//!             .unwrap(),
//!     )
//! });
//! let options = NormalizeOptions::new()
//!     .hold_first_event(true)
//!     .first_event_timeout(Some(Duration::from_secs(10)))
//!     .stream_idle_timeout(Some(Duration::from_secs(30)));
//! let client = NormalizeErrorsLayer::with_options(options).layer(upstream);
//! let res = client.oneshot(Request::new(Full::default())).await.unwrap();
//! assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
//! assert_eq!(res.headers()["x-should-retry"], "true");
//! # }
//! ```
//!
//! # Application rules
//!
//! [`NormalizeErrorsLayer::classifier`] (or [`NormalizeErrors::classifier`]) gives the layer a
//! [`Classifier`](crate::classify::Classifier): its rules run before the built-in ones wherever
//! the layer classifies, so one mapping covers error answers, errors inside a `200` and in-band
//! stream errors. For an in-band event the rules see the stream's own status (a 2xx) and
//! headers and the event's `data:` payload as the body. A rule changes the code, and with it the
//! envelope's status, `type` and `x-should-retry`; the message, wait and upstream detail stay
//! the built-ins'. The classifier is shared by an `Arc`; a classifier without rules is dropped,
//! so with none set a request clones, allocates and counts nothing more than before, and the
//! output is exactly the built-in one.
//!
//! [`NormalizeOptions::expose_upstream`] adds the upstream's own code, type and message to
//! every envelope the layer writes, rewritten stream events included, as
//! `error.upstream: {"code","type","message"}`. Off by default.
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::{BodyExt, Full};
//! use llm_layers::classify::{Classifier, Rule};
//! use llm_layers::error::ErrorCode;
//! use llm_layers::normalize::{NormalizeErrorsLayer, NormalizeOptions};
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // A relay that reports an empty balance as a 400 with its own code.
//! let upstream = service_fn(|_req: Request<Full<Bytes>>| async {
//!     let body = r#"{"error":{"message":"Balance too low","type":"billing","code":"E_BALANCE"}}"#;
//!     Ok::<_, std::io::Error>(
//!         Response::builder().status(400).body(Full::new(Bytes::from(body))).unwrap(),
//!     )
//! });
//! let classifier = Classifier::new()
//!     .rule(Rule::to(ErrorCode::InsufficientQuota).code("E_BALANCE"))
//!     .rule(Rule::to(ErrorCode::ServiceUnavailable).status(418));
//! let client = NormalizeErrorsLayer::with_options(NormalizeOptions::new().expose_upstream(true))
//!     .classifier(classifier)
//!     .layer(upstream);
//!
//! let res = client.oneshot(Request::new(Full::default())).await.unwrap();
//! assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
//! let body = res.into_body().collect().await.unwrap().to_bytes();
//! let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
//! assert_eq!(json["error"]["code"], "insufficient_quota");
//! assert_eq!(json["error"]["upstream"]["code"], "E_BALANCE");
//! assert_eq!(json["error"]["upstream"]["message"], "Balance too low");
//! # }
//! ```
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::{BodyExt, Full};
//! use llm_layers::error::{ApiError, ErrorCode};
//! use llm_layers::normalize::NormalizeErrorsLayer;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // Stands in for an HTTP client: the upstream is behind a CDN that blocks us.
//! let upstream = service_fn(|_req: Request<Full<Bytes>>| async {
//!     let page = "<!DOCTYPE html><html><head><title>Attention Required! | Cloudflare</title>";
//!     Ok::<_, std::io::Error>(
//!         Response::builder()
//!             .status(403)
//!             .header("content-type", "text/html")
//!             .body(Full::new(Bytes::from(page)))
//!             .unwrap(),
//!     )
//! });
//! let client = ServiceBuilder::new().layer(NormalizeErrorsLayer::new()).service(upstream);
//!
//! let res = client.oneshot(Request::new(Full::default())).await.unwrap();
//! assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
//! assert_eq!(res.headers()["x-should-retry"], "false");
//! let err = res.extensions().get::<ApiError>().unwrap().clone();
//! assert_eq!(err.code(), ErrorCode::UpstreamBlocked);
//! let body = res.into_body().collect().await.unwrap().to_bytes();
//! let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
//! assert_eq!(json["error"]["code"], "upstream_blocked");
//! # }
//! ```
//!
//! In an axum router, `.layer(NormalizeErrorsLayer::new())` normalizes what the handlers return
//! (a proxy handler's upstream answers); around a client, it normalizes what the client returns.

mod body;
mod future;
mod layer;
mod service;

use std::time::Duration;

use crate::error::{EnvelopeOptions, TypeStyle};

pub use body::NormalizeBody;
pub use future::ResponseFuture;
pub use layer::NormalizeErrorsLayer;
pub use service::NormalizeErrors;

/// The default read limit for error bodies: 1 MiB.
pub const DEFAULT_ERROR_BODY_LIMIT: usize = 1024 * 1024;

/// The default time allowed for reading an error body once its head has arrived: 5 seconds.
pub const DEFAULT_ERROR_BODY_TIMEOUT: Duration = Duration::from_secs(5);

/// The default longest SSE line that is held back and inspected: 64 KiB.
pub const DEFAULT_SSE_LINE_LIMIT: usize = 64 * 1024;

/// The default most bytes of a held event stream before its first event: 64 KiB.
pub const DEFAULT_FIRST_EVENT_MAX_BYTES: usize = 64 * 1024;

/// Options of the normalizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NormalizeOptions {
    body_limit: usize,
    body_timeout: Option<Duration>,
    sse_line_limit: usize,
    envelope: EnvelopeOptions,
    rewrite_sse: bool,
    inspect_ok_json: bool,
    hold_first_event: bool,
    first_event_max_bytes: usize,
    first_event_timeout: Option<Duration>,
    stream_idle_timeout: Option<Duration>,
    stream_total_timeout: Option<Duration>,
}

impl Default for NormalizeOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl NormalizeOptions {
    /// 1 MiB read limit and 5 s read timeout for error bodies, canonical statuses, OpenAI type
    /// strings, SSE errors rewritten in lines up to 64 KiB.
    pub const fn new() -> Self {
        NormalizeOptions {
            body_limit: DEFAULT_ERROR_BODY_LIMIT,
            body_timeout: Some(DEFAULT_ERROR_BODY_TIMEOUT),
            sse_line_limit: DEFAULT_SSE_LINE_LIMIT,
            envelope: EnvelopeOptions::new(),
            rewrite_sse: true,
            inspect_ok_json: false,
            hold_first_event: false,
            first_event_max_bytes: DEFAULT_FIRST_EVENT_MAX_BYTES,
            first_event_timeout: None,
            stream_idle_timeout: None,
            stream_total_timeout: None,
        }
    }

    /// How much of an error body is read before classifying (the rest is dropped), and how
    /// much of a suspect `200` body [`inspect_ok_json`](Self::inspect_ok_json) holds before it
    /// hands the body on unclassified.
    pub const fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// How long an error body (and, with [`inspect_ok_json`](Self::inspect_ok_json), a `200`
    /// body that is looked at) may take to arrive once its head is in: 5 s by default, `None`
    /// for no bound.
    ///
    /// When the time is up, the body is dropped and the answer is classified from what arrived:
    /// the status, the headers and the part of the body read so far. An upstream that sends an
    /// error head and then stalls thus costs at most this long, never the upstream's own
    /// timeout. The clock is tokio's (the layer needs a runtime with its timer enabled when a
    /// body does not arrive at once); a duration too large to add to the current instant means
    /// no bound.
    pub const fn error_body_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.body_timeout = timeout;
        self
    }

    /// The longest line of a `200` event stream that is held back to be inspected for an
    /// in-band error (64 KiB by default; the length counts the line ending).
    ///
    /// The normalizer holds the start of a line until its end arrives. A line longer than this
    /// is handed on unchanged and uninspected as its bytes arrive; inspection resumes at the
    /// next line. The memory a stream can make the layer hold is thus bounded by this limit,
    /// whatever the upstream sends. `0` inspects nothing.
    pub const fn sse_line_limit(mut self, bytes: usize) -> Self {
        self.sse_line_limit = bytes;
        self
    }

    /// Answer with the upstream's own error status instead of the code's canonical one.
    pub const fn keep_upstream_status(mut self, keep: bool) -> Self {
        self.envelope = self.envelope.keep_upstream_status(keep);
        self
    }

    /// The style of the envelope's `type` strings (OpenAI's by default).
    pub const fn type_style(mut self, style: TypeStyle) -> Self {
        self.envelope = self.envelope.type_style(style);
        self
    }

    /// Add the upstream's own code, type and message to every envelope, as
    /// `error.upstream: {"code","type","message"}` (scrubbed and bounded), when the error has
    /// them; rewritten in-band stream errors included. Off by default: an upstream's words can
    /// name its internals, so showing them is the application's choice. See
    /// [`EnvelopeOptions::expose_upstream`].
    pub const fn expose_upstream(mut self, expose: bool) -> Self {
        self.envelope = self.envelope.expose_upstream(expose);
        self
    }

    /// Whether in-band errors in 2xx SSE streams are rewritten (on by default).
    pub const fn rewrite_sse(mut self, rewrite: bool) -> Self {
        self.rewrite_sse = rewrite;
        self
    }

    /// Whether a `200` JSON answer is looked at for an error object before its head is handed
    /// on (off by default). Some gateways (OpenRouter among them) answer failures with a `200`
    /// whose body is `{"error":{...}}`; with this on, such an answer becomes the envelope with
    /// the error's own status.
    ///
    /// Only a body that opens like an error object (`{"error":{` or `{"error":"`,
    /// `{"type":"error"`, `{"object":"error"`) is held and classified; `"error":null` is not.
    /// Any body that does not turn into an envelope is handed on byte for byte, trailers
    /// included (see the [module rules](self#rules)). The cost, only for `200` answers with a
    /// JSON (or no) content type to a method other than `HEAD`: the head waits for the first
    /// body frame (within [`error_body_timeout`](Self::error_body_timeout)), a timer while it
    /// waits, and one allocation to hold a suspect body.
    pub const fn inspect_ok_json(mut self, inspect: bool) -> Self {
        self.inspect_ok_json = inspect;
        self
    }

    /// Hold the head of a 2xx `text/event-stream` answer until its first event (off by
    /// default; see [Streams](self#streams)).
    ///
    /// When the first event is an error (an OpenAI `data: {"error":...}`, Anthropic's
    /// `event: error`, any shape [`classify_sse_event`](crate::classify::classify_sse_event)
    /// reads), or the stream ends or breaks off before any event, the answer becomes an
    /// ordinary error answer: the envelope with the error's status, `x-should-retry`, the
    /// retry headers and the [`ApiError`](crate::error::ApiError) in the extensions, so retry,
    /// breaker and fallback outside treat it as any failure. Otherwise the head and the held
    /// bytes go on together and the rest of the stream is handed on as it comes. The hold is
    /// bounded by [`first_event_max_bytes`](Self::first_event_max_bytes) and
    /// [`first_event_timeout`](Self::first_event_timeout) (and the total timeout). Answers
    /// that are not 2xx event streams are never held. Costs, only for held streams: one
    /// allocation for the body, and one copy when the first event spans several chunks.
    pub const fn hold_first_event(mut self, hold: bool) -> Self {
        self.hold_first_event = hold;
        self
    }

    /// How many bytes of a held stream may arrive before the first event is complete (64 KiB
    /// by default). Beyond it, the head and what was held are handed on undecided and the
    /// stream goes on as it comes. Comment lines (`: keep-alive`) count too.
    pub const fn first_event_max_bytes(mut self, bytes: usize) -> Self {
        self.first_event_max_bytes = bytes;
        self
    }

    /// The longest wait, from the stream's head, for its first event (no bound by default).
    ///
    /// While the head is held ([`hold_first_event`](Self::hold_first_event)), running out is
    /// an ordinary `504 timeout` answer (retryable). Without the hold, the head has already
    /// gone out: the time runs to the stream's first byte, and running out ends the stream
    /// with one terminal in-band `timeout` error event.
    pub const fn first_event_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.first_event_timeout = timeout;
        self
    }

    /// The longest silence between two chunks of a 2xx event stream once it has started (no
    /// bound by default). Any bytes from the upstream count, keep-alive comments included.
    /// Running out ends the stream with one terminal in-band `timeout` error event in the
    /// stream's dialect.
    pub const fn stream_idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.stream_idle_timeout = timeout;
        self
    }

    /// The longest a 2xx event stream may last, from its head to its end (no bound by
    /// default). Running out while the head is held is a `504 timeout` answer; after it, one
    /// terminal in-band `timeout` error event ends the stream.
    pub const fn stream_total_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.stream_total_timeout = timeout;
        self
    }

    pub(crate) const fn holds_first_event(&self) -> bool {
        self.hold_first_event
    }

    pub(crate) const fn first_event_limit(&self) -> usize {
        self.first_event_max_bytes
    }

    pub(crate) const fn ttft(&self) -> Option<Duration> {
        self.first_event_timeout
    }

    pub(crate) const fn idle(&self) -> Option<Duration> {
        self.stream_idle_timeout
    }

    pub(crate) const fn total(&self) -> Option<Duration> {
        self.stream_total_timeout
    }

    /// Whether any stream timer is set.
    pub(crate) const fn times_streams(&self) -> bool {
        self.first_event_timeout.is_some()
            || self.stream_idle_timeout.is_some()
            || self.stream_total_timeout.is_some()
    }

    pub(crate) const fn inspects_ok_json(&self) -> bool {
        self.inspect_ok_json
    }

    pub(crate) const fn limit(&self) -> usize {
        self.body_limit
    }

    pub(crate) const fn timeout(&self) -> Option<Duration> {
        self.body_timeout
    }

    pub(crate) const fn line_limit(&self) -> usize {
        self.sse_line_limit
    }

    pub(crate) const fn rewrites_sse(&self) -> bool {
        self.rewrite_sse
    }

    pub(crate) const fn envelope(&self) -> &EnvelopeOptions {
        &self.envelope
    }

    pub(crate) fn exposes_upstream(&self) -> bool {
        self.envelope.expose_upstream(true) == self.envelope
    }
}
