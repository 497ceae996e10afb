//! The error taxonomy: one closed set of codes, one error value, one wire envelope.
//!
//! Every layer of this crate speaks this language. An upstream failure, whatever the provider
//! and whatever the body format, becomes an [`ApiError`] with one of the 18 [`ErrorCode`]s; an
//! [`ApiError`] becomes an OpenAI-style JSON envelope response:
//!
//! ```json
//! {"error":{"message":"...","type":"invalid_request_error","code":"invalid_api_key","param":null}}
//! ```
//!
//! with `content-type: application/json`, `x-should-retry: true|false` (obeyed by the official
//! OpenAI and Anthropic SDKs before they look at the status) and, when a wait is known,
//! `retry-after` (whole seconds, rounded up, never `0` for a positive wait) and `retry-after-ms`.
//!
//! ```
//! use std::time::Duration;
//! use llm_layers::error::{ApiError, ErrorCode};
//!
//! let err = ApiError::new(ErrorCode::RateLimitExceeded, "Rate limit reached for requests")
//!     .with_retry_after(Duration::from_millis(1500));
//! assert!(err.is_retryable());
//!
//! let res: http::Response<bytes::Bytes> = err.to_response();
//! assert_eq!(res.status(), 429);
//! assert_eq!(res.headers()["retry-after"], "2");
//! assert_eq!(res.headers()["retry-after-ms"], "1500");
//! assert_eq!(res.headers()["x-should-retry"], "true");
//! let body: serde_json::Value = serde_json::from_slice(res.body()).unwrap();
//! assert_eq!(body["error"]["code"], "rate_limit_exceeded");
//! ```

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};
use serde::ser::{SerializeMap, SerializeStruct};
use serde::{Serialize, Serializer};

/// `x-should-retry`: `true` or `false`, read by the official OpenAI and Anthropic SDKs.
pub const X_SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");
/// `retry-after-ms`: the wait in milliseconds, read by the official OpenAI SDKs.
pub const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");

/// A wait longer than this (daily or hourly limits) makes a rate-limit error not worth retrying.
pub const MAX_RETRYABLE_WAIT: Duration = Duration::from_secs(120);

/// The closed set of error codes.
///
/// | code | status | retryable |
/// |---|---|---|
/// | `invalid_api_key`, `expired_api_key`, `revoked_api_key` | 401 | no |
/// | `missing_required_field`, `invalid_value`, `model_not_supported`, `context_length_exceeded`, `content_policy_violation` | 400 | no |
/// | `permission_denied` | 403 | no |
/// | `not_found` | 404 | no |
/// | `request_too_large` | 413 | no |
/// | `rate_limit_exceeded`, `concurrent_limit_exceeded` | 429 | yes |
/// | `insufficient_quota` | 429 | no |
/// | `internal_error` | 500 | yes |
/// | `upstream_blocked` | 502 | no |
/// | `service_unavailable` | 503 | yes |
/// | `timeout` | 504 | yes |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The key is missing, malformed, unknown or wrong.
    InvalidApiKey,
    /// The key has expired; a new key is needed.
    ExpiredApiKey,
    /// The key, or its account, was revoked, deactivated or deleted.
    RevokedApiKey,
    /// A required request field is absent.
    MissingRequiredField,
    /// Any other invalid request: a bad value, a wrong type, an unsupported parameter.
    InvalidValue,
    /// The model (or deployment) does not exist or cannot be used this way.
    ModelNotSupported,
    /// The prompt plus the requested output is longer than the model's context window.
    ContextLengthExceeded,
    /// A request, token or daily rate limit was reached.
    RateLimitExceeded,
    /// Billing: no credit, balance or paid quota left.
    InsufficientQuota,
    /// Too many requests in flight at once.
    ConcurrentLimitExceeded,
    /// A provider-side failure.
    InternalError,
    /// Overload, capacity, a gateway error or an empty answer where a body was due.
    ServiceUnavailable,
    /// Input or output blocked by a content or safety filter.
    ContentPolicyViolation,
    /// Not allowed: region, model access, account barred from the product.
    PermissionDenied,
    /// The upstream, or the whole call, took too long.
    Timeout,
    /// The request alone exceeds a size or tier limit; it can never succeed as sent.
    RequestTooLarge,
    /// A CDN or WAF block or challenge page answered instead of the API.
    UpstreamBlocked,
    /// A resource that is not a model was not found, such as a wrong URL path.
    NotFound,
}

/// How the envelope's `type` field is spelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TypeStyle {
    /// The strings OpenAI's API uses (`invalid_request_error`, `requests`, `insufficient_quota`,
    /// `server_error`), so clients that switch on them keep working.
    #[default]
    OpenAi,
    /// One descriptive string per family (`authentication_error`, `rate_limit_error`,
    /// `billing_error`, `overloaded_error`, `timeout_error`, ...).
    Descriptive,
}

impl ErrorCode {
    /// Every code, in declaration order.
    pub const ALL: [ErrorCode; 18] = [
        ErrorCode::InvalidApiKey,
        ErrorCode::ExpiredApiKey,
        ErrorCode::RevokedApiKey,
        ErrorCode::MissingRequiredField,
        ErrorCode::InvalidValue,
        ErrorCode::ModelNotSupported,
        ErrorCode::ContextLengthExceeded,
        ErrorCode::RateLimitExceeded,
        ErrorCode::InsufficientQuota,
        ErrorCode::ConcurrentLimitExceeded,
        ErrorCode::InternalError,
        ErrorCode::ServiceUnavailable,
        ErrorCode::ContentPolicyViolation,
        ErrorCode::PermissionDenied,
        ErrorCode::Timeout,
        ErrorCode::RequestTooLarge,
        ErrorCode::UpstreamBlocked,
        ErrorCode::NotFound,
    ];

    /// The wire string, as it appears in the envelope's `code` field.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidApiKey => "invalid_api_key",
            ErrorCode::ExpiredApiKey => "expired_api_key",
            ErrorCode::RevokedApiKey => "revoked_api_key",
            ErrorCode::MissingRequiredField => "missing_required_field",
            ErrorCode::InvalidValue => "invalid_value",
            ErrorCode::ModelNotSupported => "model_not_supported",
            ErrorCode::ContextLengthExceeded => "context_length_exceeded",
            ErrorCode::RateLimitExceeded => "rate_limit_exceeded",
            ErrorCode::InsufficientQuota => "insufficient_quota",
            ErrorCode::ConcurrentLimitExceeded => "concurrent_limit_exceeded",
            ErrorCode::InternalError => "internal_error",
            ErrorCode::ServiceUnavailable => "service_unavailable",
            ErrorCode::ContentPolicyViolation => "content_policy_violation",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::Timeout => "timeout",
            ErrorCode::RequestTooLarge => "request_too_large",
            ErrorCode::UpstreamBlocked => "upstream_blocked",
            ErrorCode::NotFound => "not_found",
        }
    }

    /// The canonical HTTP status of the code.
    pub const fn status(self) -> StatusCode {
        match self {
            ErrorCode::InvalidApiKey | ErrorCode::ExpiredApiKey | ErrorCode::RevokedApiKey => {
                StatusCode::UNAUTHORIZED
            }
            ErrorCode::MissingRequiredField
            | ErrorCode::InvalidValue
            | ErrorCode::ModelNotSupported
            | ErrorCode::ContextLengthExceeded
            | ErrorCode::ContentPolicyViolation => StatusCode::BAD_REQUEST,
            ErrorCode::PermissionDenied => StatusCode::FORBIDDEN,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::RateLimitExceeded
            | ErrorCode::InsufficientQuota
            | ErrorCode::ConcurrentLimitExceeded => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::InternalError => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::ServiceUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::UpstreamBlocked => StatusCode::BAD_GATEWAY,
        }
    }

    /// Whether errors of this class are worth retrying. [`ApiError::is_retryable`] refines this
    /// with what is known of the single error (a long wait, a request that can never fit).
    /// The one table behind it is [`FailureKind::of`](crate::policy::FailureKind::of).
    pub const fn is_retryable(self) -> bool {
        crate::policy::FailureKind::of(self).retried_by_default()
    }

    /// The envelope's `type` string in the given style.
    pub const fn error_type(self, style: TypeStyle) -> &'static str {
        match style {
            TypeStyle::OpenAi => match self {
                ErrorCode::RateLimitExceeded | ErrorCode::ConcurrentLimitExceeded => "requests",
                ErrorCode::InsufficientQuota => "insufficient_quota",
                ErrorCode::InternalError
                | ErrorCode::ServiceUnavailable
                | ErrorCode::Timeout
                | ErrorCode::UpstreamBlocked => "server_error",
                _ => "invalid_request_error",
            },
            TypeStyle::Descriptive => match self {
                ErrorCode::InvalidApiKey | ErrorCode::ExpiredApiKey | ErrorCode::RevokedApiKey => {
                    "authentication_error"
                }
                ErrorCode::MissingRequiredField
                | ErrorCode::InvalidValue
                | ErrorCode::ModelNotSupported
                | ErrorCode::ContextLengthExceeded => "invalid_request_error",
                ErrorCode::ContentPolicyViolation => "content_policy_error",
                ErrorCode::PermissionDenied => "permission_error",
                ErrorCode::NotFound => "not_found_error",
                ErrorCode::RequestTooLarge => "request_too_large",
                ErrorCode::RateLimitExceeded | ErrorCode::ConcurrentLimitExceeded => {
                    "rate_limit_error"
                }
                ErrorCode::InsufficientQuota => "billing_error",
                ErrorCode::InternalError => "api_error",
                ErrorCode::ServiceUnavailable => "overloaded_error",
                ErrorCode::Timeout => "timeout_error",
                ErrorCode::UpstreamBlocked => "upstream_error",
            },
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The string was not one of the 18 wire codes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownErrorCode(String);

impl fmt::Display for UnknownErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown error code {:?}", self.0)
    }
}

impl std::error::Error for UnknownErrorCode {}

impl FromStr for ErrorCode {
    type Err = UnknownErrorCode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ErrorCode::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| UnknownErrorCode(s.chars().take(64).collect()))
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// One normalized error: what went wrong, in the crate's taxonomy, plus what is known about it.
///
/// Built by the classifier from an upstream answer ([`crate::classify`]) or by a layer for its
/// own rejections. Turned into a response with [`ApiError::to_response`]. The message never holds
/// a secret: the classifier scrubs key-like strings, and the layers mask keys before they speak.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    code: ErrorCode,
    message: Cow<'static, str>,
    param: Option<Cow<'static, str>>,
    retry_after: Option<Duration>,
    status: Option<StatusCode>,
    upstream_status: Option<StatusCode>,
    provider: Option<Cow<'static, str>>,
    // Boxed, like `upstream`, so the error stays small enough to return by value.
    request_id: Option<Box<str>>,
    never_fits: bool,
    upstream_should_retry: Option<bool>,
    upstream: Option<Box<UpstreamDetail>>,
}

/// The upstream's own words for an error, kept beside the classification: its code, its type
/// and its message, as it sent them (the innermost error when errors were nested), scrubbed of
/// anything key-like and bounded in size ([`UpstreamDetail::MAX_ID_CHARS`] for the code and
/// type, [`crate::classify::MAX_MESSAGE_CHARS`] for the message).
///
/// Callers log and match on it ([`ApiError::upstream_detail`]); the envelope shows it only when
/// [`EnvelopeOptions::expose_upstream`] is set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UpstreamDetail {
    code: Option<String>,
    kind: Option<String>,
    message: Option<String>,
}

impl UpstreamDetail {
    /// The longest code or type kept, in characters; longer ones are cut.
    pub const MAX_ID_CHARS: usize = 128;

    /// A detail from the upstream's code, type and message; each is scrubbed and bounded.
    /// `None` when all three are absent or empty.
    pub fn new(code: Option<&str>, kind: Option<&str>, message: Option<&str>) -> Option<Self> {
        let id = |v: Option<&str>| {
            v.map(str::trim).filter(|v| !v.is_empty()).map(|v| {
                if plain_id(v) {
                    v.to_owned()
                } else {
                    let cut: String = v.chars().take(Self::MAX_ID_CHARS).collect();
                    crate::classify::scrub_and_bound(&cut)
                }
            })
        };
        let detail = UpstreamDetail {
            code: id(code),
            kind: id(kind),
            message: message
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .map(crate::classify::scrub_and_bound),
        };
        (detail.code.is_some() || detail.kind.is_some() || detail.message.is_some())
            .then_some(detail)
    }

    /// [`UpstreamDetail::new`] with a message the classifier already scrubbed and bounded.
    pub(crate) fn with_scrubbed_message(
        code: Option<&str>,
        kind: Option<&str>,
        message: String,
    ) -> Option<Self> {
        let mut d = UpstreamDetail::new(code, kind, None).unwrap_or_default();
        d.message = (!message.is_empty()).then_some(message);
        (d.code.is_some() || d.kind.is_some() || d.message.is_some()).then_some(d)
    }

    /// The upstream's code (`"insufficient_quota"`, `"1113"`, `"Arrearage"`), if it sent one.
    pub fn code(&self) -> Option<&str> {
        self.code.as_deref()
    }

    /// The upstream's type (`"invalid_request_error"`, `"RESOURCE_EXHAUSTED"`), if it sent one.
    pub fn kind(&self) -> Option<&str> {
        self.kind.as_deref()
    }

    /// The upstream's message, if it sent one.
    pub fn message(&self) -> Option<&str> {
        self.message.as_deref()
    }
}

/// An identifier the scrubber would leave as it is, so it need not run: shorter than the
/// shortest key it masks (a prefix and 8 more characters), or a `snake_case` or `CamelCase`
/// word without digits of fewer than 16 characters between separators.
fn plain_id(v: &str) -> bool {
    v.len() < 11
        || (v.len() <= UpstreamDetail::MAX_ID_CHARS
            && v.bytes()
                .all(|b| b.is_ascii_alphabetic() || matches!(b, b'_' | b'.'))
            && v.split(['_', '.']).all(|w| w.len() < 16)
            && !["gsk_", "hf_", "eyj", "aiza", "akid", "akia", "asia"]
                .iter()
                .any(|p| v.len() >= p.len() && v[..p.len()].eq_ignore_ascii_case(p)))
}

impl Serialize for UpstreamDetail {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let n = [&self.code, &self.kind, &self.message]
            .iter()
            .filter(|v| v.is_some())
            .count();
        let mut map = s.serialize_map(Some(n))?;
        for (k, v) in [
            ("code", &self.code),
            ("type", &self.kind),
            ("message", &self.message),
        ] {
            if let Some(v) = v {
                map.serialize_entry(k, v)?;
            }
        }
        map.end()
    }
}

impl ApiError {
    /// A new error with the given code and message.
    pub fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        ApiError {
            code,
            message: message.into(),
            param: None,
            retry_after: None,
            status: None,
            upstream_status: None,
            provider: None,
            request_id: None,
            never_fits: false,
            upstream_should_retry: None,
            upstream: None,
        }
    }

    /// Names the request parameter the error is about (`"messages[3].role"`).
    pub fn with_param(mut self, param: impl Into<Cow<'static, str>>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// Records a known wait before a retry can succeed.
    pub fn with_retry_after(mut self, wait: Duration) -> Self {
        self.retry_after = Some(wait);
        self
    }

    /// Sets the wait, or clears it with `None`.
    pub fn set_retry_after(&mut self, wait: Option<Duration>) {
        self.retry_after = wait;
    }

    /// Answers with this status instead of the code's canonical one (a transport error is a
    /// `502 service_unavailable`, say).
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = Some(status);
        self
    }

    /// Records the status the upstream answered with.
    pub fn with_upstream_status(mut self, status: StatusCode) -> Self {
        self.upstream_status = Some(status);
        self
    }

    /// Records which provider family produced the error (`"openai"`, `"anthropic"`, `"html"`).
    pub fn with_provider(mut self, provider: impl Into<Cow<'static, str>>) -> Self {
        self.provider = Some(provider.into());
        self
    }

    /// Records the upstream's request id, useful in support tickets.
    pub fn with_request_id(mut self, id: impl Into<String>) -> Self {
        self.request_id = Some(id.into().into_boxed_str());
        self
    }

    /// Marks a request that can never succeed as sent (larger than its limit, a zero quota):
    /// it is then never retryable.
    pub fn never_fits(mut self) -> Self {
        self.never_fits = true;
        self
    }

    /// The code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The human-readable message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The request parameter the error is about, if any.
    pub fn param(&self) -> Option<&str> {
        self.param.as_deref()
    }

    /// The status this error answers with: an explicit one, else the code's canonical status.
    pub fn status(&self) -> StatusCode {
        self.status.unwrap_or_else(|| self.code.status())
    }

    /// The status the upstream answered with, when the error came from one.
    pub fn upstream_status(&self) -> Option<StatusCode> {
        self.upstream_status
    }

    /// The provider family that produced the error, when known.
    pub fn provider(&self) -> Option<&str> {
        self.provider.as_deref()
    }

    /// The upstream's request id, when it sent one.
    pub fn request_id(&self) -> Option<&str> {
        self.request_id.as_deref()
    }

    /// The known wait before a retry can succeed.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// Records the upstream's own `x-should-retry` answer. The official OpenAI and Anthropic
    /// SDKs obey that header before anything else, and so does this crate: `false` makes the
    /// error not retryable whatever its code, `true` makes it retryable (unless the request can
    /// never fit).
    pub fn with_upstream_should_retry(mut self, should_retry: bool) -> Self {
        self.upstream_should_retry = Some(should_retry);
        self
    }

    /// The upstream's own `x-should-retry` answer, when it sent one.
    pub fn upstream_should_retry(&self) -> Option<bool> {
        self.upstream_should_retry
    }

    /// The same error under another code (an application's own mapping of an upstream answer).
    /// A changed code drops the never-fits mark, which belonged to the old class; the rest
    /// (message, wait, statuses, request id, upstream detail) is kept.
    pub fn with_code(mut self, code: ErrorCode) -> Self {
        if code != self.code {
            self.never_fits = false;
            self.code = code;
        }
        self
    }

    /// Keeps the upstream's own code, type and message beside the classification.
    pub fn with_upstream_detail(mut self, detail: UpstreamDetail) -> Self {
        self.upstream = Some(Box::new(detail));
        self
    }

    /// The upstream's own code, type and message, when the error came from an upstream answer
    /// that had them.
    pub fn upstream_detail(&self) -> Option<&UpstreamDetail> {
        self.upstream.as_deref()
    }

    /// Whether a retry can help. The upstream's own `x-should-retry` decides when it sent one
    /// ([`ApiError::with_upstream_should_retry`]); otherwise the code is retryable, the wait (if
    /// known) is at most [`MAX_RETRYABLE_WAIT`], and the request is not one that can never fit.
    pub fn is_retryable(&self) -> bool {
        if self.never_fits {
            return false;
        }
        match self.upstream_should_retry {
            Some(said) => said,
            None => {
                self.code.is_retryable() && self.retry_after.is_none_or(|w| w <= MAX_RETRYABLE_WAIT)
            }
        }
    }

    /// The envelope as JSON bytes, with the `type` string in the given style.
    pub fn envelope(&self, style: TypeStyle) -> Bytes {
        self.envelope_bytes(style, false)
    }

    fn envelope_bytes(&self, style: TypeStyle, expose: bool) -> Bytes {
        let env = Envelope {
            err: self,
            style,
            expose,
        };
        // Serializing plain strings and options into a Vec cannot fail.
        Bytes::from(serde_json::to_vec(&env).unwrap_or_default())
    }

    /// The envelope response, with the canonical (or explicit) status and OpenAI type strings.
    ///
    /// The response carries a clone of the error in its extensions, so outer layers read the
    /// classification without parsing the body again.
    pub fn to_response<B: From<Bytes>>(&self) -> Response<B> {
        self.to_response_with(&EnvelopeOptions::default())
    }

    /// The envelope response, shaped by `opts`.
    pub fn to_response_with<B: From<Bytes>>(&self, opts: &EnvelopeOptions) -> Response<B> {
        let status = if opts.keep_upstream_status {
            self.upstream_status
                .filter(|s| s.is_client_error() || s.is_server_error())
                .unwrap_or_else(|| self.status())
        } else {
            self.status()
        };
        let mut res = Response::new(B::from(
            self.envelope_bytes(opts.type_style, opts.expose_upstream),
        ));
        *res.status_mut() = status;
        let headers = res.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(
            X_SHOULD_RETRY,
            HeaderValue::from_static(if self.is_retryable() { "true" } else { "false" }),
        );
        if let Some(wait) = self.retry_after {
            set_retry_after_headers(headers, wait);
        }
        res.extensions_mut().insert(self.clone());
        res
    }
}

/// Writes `retry-after` (whole seconds, rounded up, never `0` for a positive wait) and
/// `retry-after-ms` (rounded up) for `wait`.
pub fn set_retry_after_headers(headers: &mut http::HeaderMap, wait: Duration) {
    let ms = wait.as_nanos().div_ceil(1_000_000);
    let secs = ms.div_ceil(1000);
    headers.insert(RETRY_AFTER, HeaderValue::from(secs as u64));
    headers.insert(RETRY_AFTER_MS, HeaderValue::from(ms as u64));
}

/// How an [`ApiError`] is turned into a response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EnvelopeOptions {
    keep_upstream_status: bool,
    type_style: TypeStyle,
    expose_upstream: bool,
}

impl EnvelopeOptions {
    /// Canonical statuses and OpenAI type strings.
    pub const fn new() -> Self {
        EnvelopeOptions {
            keep_upstream_status: false,
            type_style: TypeStyle::OpenAi,
            expose_upstream: false,
        }
    }

    /// Add the upstream's own code, type and message ([`UpstreamDetail`], scrubbed and bounded)
    /// to the envelope as `error.upstream: {"code","type","message"}` when the error has them.
    /// Off by default: an upstream's words can name its internals, so showing them is the
    /// application's choice.
    pub const fn expose_upstream(mut self, expose: bool) -> Self {
        self.expose_upstream = expose;
        self
    }

    /// Answer with the upstream's own error status (when it had one) instead of the canonical
    /// status of the code.
    pub const fn keep_upstream_status(mut self, keep: bool) -> Self {
        self.keep_upstream_status = keep;
        self
    }

    /// The style of the envelope's `type` strings.
    pub const fn type_style(mut self, style: TypeStyle) -> Self {
        self.type_style = style;
        self
    }
}

struct Envelope<'a> {
    err: &'a ApiError,
    style: TypeStyle,
    expose: bool,
}

struct Inner<'a> {
    err: &'a ApiError,
    style: TypeStyle,
    expose: bool,
}

impl Serialize for Envelope<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(1))?;
        map.serialize_entry(
            "error",
            &Inner {
                err: self.err,
                style: self.style,
                expose: self.expose,
            },
        )?;
        map.end()
    }
}

impl Serialize for Inner<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let upstream = self.err.upstream.as_deref().filter(|_| self.expose);
        let mut st = s.serialize_struct("error", 4 + usize::from(upstream.is_some()))?;
        st.serialize_field("message", &*self.err.message)?;
        st.serialize_field("type", self.err.code.error_type(self.style))?;
        st.serialize_field("code", self.err.code.as_str())?;
        st.serialize_field("param", &self.err.param.as_deref())?;
        if let Some(u) = upstream {
            st.serialize_field("upstream", u)?;
        }
        st.end()
    }
}

impl Serialize for ApiError {
    /// Serializes as the wire envelope `{"error":{"message","type","code","param"}}`.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Envelope {
            err: self,
            style: TypeStyle::OpenAi,
            expose: false,
        }
        .serialize(s)
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.code,
            self.status().as_u16(),
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_statuses() {
        for code in ErrorCode::ALL {
            assert_eq!(code.as_str().parse::<ErrorCode>().unwrap(), code);
        }
        assert!("nope".parse::<ErrorCode>().is_err());
        assert_eq!(ErrorCode::UpstreamBlocked.status(), 502);
        assert_eq!(ErrorCode::InsufficientQuota.status(), 429);
        assert!(!ErrorCode::InsufficientQuota.is_retryable());
    }

    #[test]
    fn long_waits_and_never_fitting_requests_are_not_retryable() {
        let e = ApiError::new(ErrorCode::RateLimitExceeded, "daily");
        assert!(e.is_retryable());
        assert!(!e
            .clone()
            .with_retry_after(Duration::from_secs(121))
            .is_retryable());
        assert!(e
            .clone()
            .with_retry_after(Duration::from_secs(120))
            .is_retryable());
        assert!(!e.never_fits().is_retryable());
    }

    #[test]
    fn sub_second_waits_round_up() {
        let mut h = http::HeaderMap::new();
        set_retry_after_headers(&mut h, Duration::from_micros(1));
        assert_eq!(h[RETRY_AFTER], "1");
        assert_eq!(h[RETRY_AFTER_MS], "1");
        set_retry_after_headers(&mut h, Duration::from_millis(2000));
        assert_eq!(h[RETRY_AFTER], "2");
        set_retry_after_headers(&mut h, Duration::from_millis(2001));
        assert_eq!(h[RETRY_AFTER], "3");
    }

    #[test]
    fn envelope_shape() {
        let e = ApiError::new(ErrorCode::InvalidValue, "bad \"temp\"").with_param("temperature");
        let v: serde_json::Value = serde_json::from_slice(&e.envelope(TypeStyle::OpenAi)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error":{"message":"bad \"temp\"","type":"invalid_request_error","code":"invalid_value","param":"temperature"}})
        );
        assert_eq!(serde_json::to_value(&e).unwrap(), v);
        let res: Response<Bytes> = e
            .clone()
            .with_upstream_status(StatusCode::UNPROCESSABLE_ENTITY)
            .to_response_with(&EnvelopeOptions::new().keep_upstream_status(true));
        assert_eq!(res.status(), 422);
        assert_eq!(
            res.extensions().get::<ApiError>().unwrap().code(),
            ErrorCode::InvalidValue
        );
    }
}
