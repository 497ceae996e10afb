//! The one failure vocabulary: what an answer, a finished stream or a transport error means,
//! read alike by every layer that records or reacts to outcomes (the retry layer, the circuit
//! breaker, the normalizer).
//!
//! In the spirit of tower-http's `ClassifyResponse` / `ClassifyEos`, a [`Classify`] policy
//! decides an [`Outcome`] twice: once per response head ([`Classify::classify_response`]) and
//! once when a streamed body ends ([`Classify::classify_eos`]). A failure carries its
//! [`ErrorCode`] and a [`FailureKind`], and the kind alone says what the layers do with it:
//!
//! | kind | codes (built-in policy) | retried | counts against a circuit |
//! |---|---|---|---|
//! | [`Transient`](FailureKind::Transient) | `internal_error`, `service_unavailable`, `timeout` | yes | yes |
//! | [`Throttled`](FailureKind::Throttled) | `rate_limit_exceeded`, `concurrent_limit_exceeded` | yes, after the wait | only when asked (`trip_on_rate_limit`) |
//! | [`Blocked`](FailureKind::Blocked) | `upstream_blocked` (a WAF or CDN page) | never | yes |
//! | [`Caller`](FailureKind::Caller) | bad or expired keys, permissions, quota, invalid or oversized requests, context length, content policy | never | no |
//! | [`Other`](FailureKind::Other) | `not_found` | not by default (a retry predicate may) | no |
//!
//! [`DefaultPolicy`] is that table; any closure
//! `Fn(StatusCode, &HeaderMap, Option<&ApiError>) -> Outcome` is a policy too, and end of
//! stream then follows the built-in rule.
//!
//! ```
//! use http::{HeaderMap, StatusCode};
//! use llm_layers::policy::{Classify, DefaultPolicy, FailureKind, Outcome, StreamEnd};
//! use llm_layers::{ApiError, ErrorCode};
//!
//! let policy = DefaultPolicy;
//! let overloaded = ApiError::new(ErrorCode::ServiceUnavailable, "overloaded");
//! let outcome = policy.classify_response(StatusCode::SERVICE_UNAVAILABLE, &HeaderMap::new(), Some(&overloaded));
//! assert_eq!(outcome.failure_kind(), Some(FailureKind::Transient));
//! assert!(policy.classify_eos(&StreamEnd::Cut).is_failure());
//!
//! // A policy of your own: a 404 from this upstream means "not deployed yet", worth a retry.
//! let mine = |status: StatusCode, headers: &HeaderMap, err: Option<&ApiError>| {
//!     if status == StatusCode::NOT_FOUND {
//!         return Outcome::failure(ErrorCode::NotFound, FailureKind::Transient);
//!     }
//!     DefaultPolicy.classify_response(status, headers, err)
//! };
//! let outcome = mine.classify_response(StatusCode::NOT_FOUND, &HeaderMap::new(), None);
//! assert!(outcome.failure_kind().unwrap().retried_by_default());
//! ```

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use http::{HeaderMap, StatusCode};

use crate::body::BoxError;
use crate::classify::code_for_status;
use crate::error::{ApiError, ErrorCode};

/// What kind of failure a code is, and so what retries and circuits do with it. See the
/// [module docs](self) for the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailureKind {
    /// The upstream is unwell or overloaded: retried, counts against its circuit.
    Transient,
    /// The upstream throttles: retried after its wait; counts against a circuit only when the
    /// breaker is told to (`trip_on_rate_limit`).
    Throttled,
    /// The upstream refuses to serve us at all (a WAF or CDN block page): never retried,
    /// counts against its circuit.
    Blocked,
    /// The caller's own fault, or a decision no retry changes: never retried, never counted.
    Caller,
    /// Neither the caller's fault for certain nor the upstream's: not retried unless a retry
    /// predicate asks for it, never counted.
    Other,
}

impl FailureKind {
    /// The kind of `code` in the built-in table. [`ErrorCode::is_retryable`] and every layer's
    /// default reads this one table.
    pub const fn of(code: ErrorCode) -> FailureKind {
        match code {
            ErrorCode::InternalError | ErrorCode::ServiceUnavailable | ErrorCode::Timeout => {
                FailureKind::Transient
            }
            ErrorCode::RateLimitExceeded | ErrorCode::ConcurrentLimitExceeded => {
                FailureKind::Throttled
            }
            ErrorCode::UpstreamBlocked => FailureKind::Blocked,
            ErrorCode::NotFound => FailureKind::Other,
            ErrorCode::InvalidApiKey
            | ErrorCode::ExpiredApiKey
            | ErrorCode::RevokedApiKey
            | ErrorCode::PermissionDenied
            | ErrorCode::InsufficientQuota
            | ErrorCode::MissingRequiredField
            | ErrorCode::InvalidValue
            | ErrorCode::ModelNotSupported
            | ErrorCode::ContextLengthExceeded
            | ErrorCode::ContentPolicyViolation
            | ErrorCode::RequestTooLarge => FailureKind::Caller,
        }
    }

    /// Whether a retry layer retries this kind when nothing else is said.
    pub const fn retried_by_default(self) -> bool {
        matches!(self, FailureKind::Transient | FailureKind::Throttled)
    }

    /// Whether no retry can help, whatever a predicate says (a bad key, an invalid request, a
    /// block page).
    pub const fn never_retried(self) -> bool {
        matches!(self, FailureKind::Blocked | FailureKind::Caller)
    }

    /// Whether the failure says the upstream is unhealthy, so a circuit counts it.
    /// `throttled_counts` makes throttling count too.
    pub const fn counts_against_circuit(self, throttled_counts: bool) -> bool {
        match self {
            FailureKind::Transient | FailureKind::Blocked => true,
            FailureKind::Throttled => throttled_counts,
            FailureKind::Caller | FailureKind::Other => false,
        }
    }
}

/// What a response, a finished stream or a transport error means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The upstream served the call.
    Success,
    /// The call failed.
    Failure {
        /// The failure's code.
        code: ErrorCode,
        /// What kind of failure it is.
        kind: FailureKind,
    },
}

impl Outcome {
    /// A failure with `code`, of `kind`.
    pub const fn failure(code: ErrorCode, kind: FailureKind) -> Outcome {
        Outcome::Failure { code, kind }
    }

    /// A failure with `code`, of the kind the built-in table gives it.
    pub const fn for_code(code: ErrorCode) -> Outcome {
        Outcome::Failure {
            code,
            kind: FailureKind::of(code),
        }
    }

    /// Whether the call failed.
    pub const fn is_failure(&self) -> bool {
        matches!(self, Outcome::Failure { .. })
    }

    /// The failure's code.
    pub const fn code(&self) -> Option<ErrorCode> {
        match self {
            Outcome::Success => None,
            Outcome::Failure { code, .. } => Some(*code),
        }
    }

    /// The failure's kind.
    pub const fn failure_kind(&self) -> Option<FailureKind> {
        match self {
            Outcome::Success => None,
            Outcome::Failure { kind, .. } => Some(*kind),
        }
    }
}

/// How a streamed body ended, for [`Classify::classify_eos`].
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum StreamEnd<'a> {
    /// The stream ended cleanly.
    Complete,
    /// The stream carried an error event, or a layer ended it with one.
    Error(&'a ApiError),
    /// The stream broke off: the body failed, or ended before the dialect's terminal event.
    Cut,
    /// The stream was silent for longer than a layer allows.
    TimedOut,
}

/// A failure-classification policy: per response head and at end of stream. See the
/// [module docs](self).
pub trait Classify: Send + Sync + 'static {
    /// The outcome of a response head. `error` is the [`ApiError`] an inner layer (the
    /// normalizer) left in the response extensions, if any.
    fn classify_response(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        error: Option<&ApiError>,
    ) -> Outcome;

    /// The outcome of a streamed body when it ends. By default: a clean end succeeds, an
    /// error event fails with its code, a cut stream fails as `service_unavailable` and a
    /// silent one as `timeout` (both transient).
    fn classify_eos(&self, end: &StreamEnd<'_>) -> Outcome {
        DefaultPolicy::eos(end)
    }
}

impl<F> Classify for F
where
    F: Fn(StatusCode, &HeaderMap, Option<&ApiError>) -> Outcome + Send + Sync + 'static,
{
    fn classify_response(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        error: Option<&ApiError>,
    ) -> Outcome {
        self(status, headers, error)
    }
}

impl<P: Classify + ?Sized> Classify for Arc<P> {
    fn classify_response(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        error: Option<&ApiError>,
    ) -> Outcome {
        (**self).classify_response(status, headers, error)
    }
    fn classify_eos(&self, end: &StreamEnd<'_>) -> Outcome {
        (**self).classify_eos(end)
    }
}

/// The built-in policy: the table in the [module docs](self). A response head is a success
/// below 400; else the [`ApiError`] in the extensions decides, else the status alone.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultPolicy;

impl DefaultPolicy {
    fn eos(end: &StreamEnd<'_>) -> Outcome {
        match end {
            StreamEnd::Complete => Outcome::Success,
            StreamEnd::Error(e) => Outcome::for_code(e.code()),
            StreamEnd::Cut => Outcome::for_code(ErrorCode::ServiceUnavailable),
            StreamEnd::TimedOut => Outcome::for_code(ErrorCode::Timeout),
        }
    }
}

impl Classify for DefaultPolicy {
    fn classify_response(
        &self,
        status: StatusCode,
        _headers: &HeaderMap,
        error: Option<&ApiError>,
    ) -> Outcome {
        if let Some(err) = error {
            return Outcome::for_code(err.code());
        }
        if status.is_client_error() || status.is_server_error() {
            Outcome::for_code(code_for_status(status))
        } else {
            Outcome::Success
        }
    }
}

/// A policy shared by a layer's clones.
#[derive(Clone)]
pub struct SharedPolicy(Arc<dyn Classify>);

impl SharedPolicy {
    /// Shares `policy`.
    pub fn new(policy: impl Classify) -> Self {
        SharedPolicy(Arc::new(policy))
    }
}

impl Default for SharedPolicy {
    fn default() -> Self {
        SharedPolicy::new(DefaultPolicy)
    }
}

impl fmt::Debug for SharedPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedPolicy")
    }
}

impl Classify for SharedPolicy {
    fn classify_response(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        error: Option<&ApiError>,
    ) -> Outcome {
        self.0.classify_response(status, headers, error)
    }
    fn classify_eos(&self, end: &StreamEnd<'_>) -> Outcome {
        self.0.classify_eos(end)
    }
}

/// The trailer a layer that ends a stream in-band (a terminal error event after the head went
/// out: a stream timeout, an upstream error mid-stream, a cut) sends after the stream's last
/// bytes, naming the failure's [`ErrorCode`]: how layers further out that record outcomes (the
/// circuit breaker) tell such an end from a clean one. HTTP/1 clients that did not ask for
/// trailers never see it (hyper drops it); the body's bytes are unchanged.
pub const STREAM_ERROR_TRAILER: &str = "x-llm-layers-stream-error";

/// The trailers that say a stream ended with `code` ([`STREAM_ERROR_TRAILER`]).
pub fn stream_error_trailers(code: ErrorCode) -> HeaderMap {
    let mut trailers = HeaderMap::with_capacity(1);
    trailers.insert(
        http::HeaderName::from_static(STREAM_ERROR_TRAILER),
        http::HeaderValue::from_static(code.as_str()),
    );
    trailers
}

/// How a stream ended, from its trailers: the [`StreamEnd`] a [`STREAM_ERROR_TRAILER`] names
/// (`timeout` is [`StreamEnd::TimedOut`], a cut [`StreamEnd::Cut`] is `service_unavailable`
/// with no other words, any other code an error), or `None` when the trailers say nothing.
pub fn stream_error_in(trailers: &HeaderMap) -> Option<ErrorCode> {
    trailers
        .get(STREAM_ERROR_TRAILER)?
        .to_str()
        .ok()?
        .parse::<ErrorCode>()
        .ok()
}

/// The error an inner service failed with, seen as an [`std::error::Error`] without taking
/// it, for layers that must look at an error they may still return (`S::Error` is only known
/// to be `Into<BoxError>`).
///
/// Recognized: [`BoxError`] (what `tower::timeout`, `tower::buffer` and most middleware
/// return), `std::io::Error`, tower's and tokio's `Elapsed`, [`ApiError`], hyper's error
/// (feature `hyper`) and reqwest's (feature `reqwest`). Other types give `None`: a layer then
/// treats the error as a transport failure it knows nothing more of.
pub fn error_ref<E: 'static>(err: &E) -> Option<&(dyn std::error::Error + 'static)> {
    let any = err as &dyn Any;
    if let Some(e) = any.downcast_ref::<BoxError>() {
        return Some(&**e);
    }
    if let Some(e) = any.downcast_ref::<Box<dyn std::error::Error + Send>>() {
        return Some(&**e);
    }
    if let Some(e) = any.downcast_ref::<Box<dyn std::error::Error>>() {
        return Some(&**e);
    }
    if let Some(e) = any.downcast_ref::<std::io::Error>() {
        return Some(e);
    }
    if let Some(e) = any.downcast_ref::<tower::timeout::error::Elapsed>() {
        return Some(e);
    }
    if let Some(e) = any.downcast_ref::<tokio::time::error::Elapsed>() {
        return Some(e);
    }
    if let Some(e) = any.downcast_ref::<ApiError>() {
        return Some(e);
    }
    #[cfg(feature = "hyper")]
    if let Some(e) = any.downcast_ref::<hyper::Error>() {
        return Some(e);
    }
    #[cfg(feature = "reqwest")]
    if let Some(e) = any.downcast_ref::<reqwest::Error>() {
        return Some(e);
    }
    None
}

/// The [`ApiError`] for a transport error of the inner service, of any type that is
/// `Into<BoxError>`: `504 timeout` for a timeout anywhere in the chain (tower's
/// `Elapsed` inside a `BoxError` too), `502 service_unavailable` otherwise. See
/// [`classify_transport_error`](crate::classify::classify_transport_error).
pub fn classify_error<E: Into<BoxError>>(err: E) -> ApiError {
    let boxed: BoxError = err.into();
    crate::classify::classify_transport_error(&*boxed)
}

/// The [`ApiError`] for a transport error the caller still keeps: through [`error_ref`] when
/// its type is recognized, else a plain `502 service_unavailable`.
pub fn classify_error_ref<E: 'static>(err: &E) -> ApiError {
    match error_ref(err) {
        Some(e) => crate::classify::classify_transport_error(e),
        None => ApiError::new(
            ErrorCode::ServiceUnavailable,
            "The upstream could not be reached.",
        )
        .with_status(StatusCode::BAD_GATEWAY)
        .with_provider("transport"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_covers_today_s_three_tables() {
        use ErrorCode as C;
        for code in [C::InternalError, C::ServiceUnavailable, C::Timeout] {
            assert!(FailureKind::of(code).retried_by_default());
            assert!(FailureKind::of(code).counts_against_circuit(false));
        }
        for code in [C::RateLimitExceeded, C::ConcurrentLimitExceeded] {
            assert!(FailureKind::of(code).retried_by_default());
            assert!(!FailureKind::of(code).counts_against_circuit(false));
            assert!(FailureKind::of(code).counts_against_circuit(true));
        }
        assert!(FailureKind::of(C::UpstreamBlocked).never_retried());
        assert!(FailureKind::of(C::UpstreamBlocked).counts_against_circuit(false));
        assert!(!FailureKind::of(C::NotFound).retried_by_default());
        assert!(!FailureKind::of(C::NotFound).never_retried());
        assert!(FailureKind::of(C::ContextLengthExceeded).never_retried());
    }

    #[test]
    fn the_error_in_the_extensions_wins_over_the_status() {
        let h = HeaderMap::new();
        let timeout = ApiError::new(ErrorCode::Timeout, "slow");
        assert_eq!(
            DefaultPolicy.classify_response(StatusCode::BAD_REQUEST, &h, Some(&timeout)),
            Outcome::for_code(ErrorCode::Timeout)
        );
        assert_eq!(
            DefaultPolicy.classify_response(StatusCode::OK, &h, None),
            Outcome::Success
        );
        assert_eq!(
            DefaultPolicy.classify_response(StatusCode::from_u16(529).unwrap(), &h, None),
            Outcome::for_code(ErrorCode::ServiceUnavailable)
        );
    }

    #[test]
    fn a_tower_timeout_in_a_box_is_a_timeout() {
        let boxed: BoxError = Box::new(tower::timeout::error::Elapsed::new());
        assert_eq!(classify_error_ref(&boxed).code(), ErrorCode::Timeout);
        assert_eq!(classify_error(boxed).code(), ErrorCode::Timeout);
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(
            classify_error_ref(&io).code(),
            ErrorCode::ServiceUnavailable
        );
        #[derive(Debug)]
        struct Mine;
        assert!(error_ref(&Mine).is_none());
        assert_eq!(classify_error_ref(&Mine).status(), StatusCode::BAD_GATEWAY);
    }
}
