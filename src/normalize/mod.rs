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
//! - **4xx / 5xx**: the body is read (up to a limit, 1 MiB by default; beyond it the classifier
//!   works on what was read), classified by [`crate::classify::classify_response`] and replaced
//!   by the envelope `{"error":{"message","type","code","param"}}` with the code's canonical
//!   status, `x-should-retry`, `retry-after` / `retry-after-ms` when a wait is known, and the
//!   upstream's `x-ratelimit-*` and request-id headers. The [`ApiError`](crate::error::ApiError)
//!   is also put in the response extensions, so outer layers (retry, breaker) read it without
//!   parsing again.
//! - **transport errors** (connection refused or reset, timeouts from an inner timeout layer):
//!   `502 service_unavailable` or `504 timeout` envelopes, so the layer's error type is
//!   [`Infallible`](std::convert::Infallible) and it fits an axum router.
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

/// Options of the normalizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NormalizeOptions {
    body_limit: usize,
    body_timeout: Option<Duration>,
    sse_line_limit: usize,
    envelope: EnvelopeOptions,
    rewrite_sse: bool,
    inspect_ok_json: bool,
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
        }
    }

    /// How much of an error body is read before classifying (the rest is dropped).
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

    /// Whether in-band errors in 2xx SSE streams are rewritten (on by default).
    pub const fn rewrite_sse(mut self, rewrite: bool) -> Self {
        self.rewrite_sse = rewrite;
        self
    }

    /// Whether a `200` JSON answer is looked at for an error object before its head is handed
    /// on (off by default). Some gateways (OpenRouter among them) answer failures with a `200`
    /// whose body is `{"error":{...}}`; with this on, such an answer becomes the envelope with
    /// the error's own status. The cost, only for `200` answers with a JSON (or no) content
    /// type: one allocation to hold the body, and the head waits for the first body frame. A
    /// body that does not open like an error object is handed on as it came, first frame
    /// included.
    pub const fn inspect_ok_json(mut self, inspect: bool) -> Self {
        self.inspect_ok_json = inspect;
        self
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
}
