//! Classification: any upstream answer becomes an [`ApiError`] in the crate's taxonomy.
//!
//! LLM providers, their OpenAI-compatible imitations, gateways and the CDNs in front of them all
//! fail differently: a bad Gemini key is a `400`, Anthropic overload is a `529`, Zhipu billing
//! is a `429` with code `1113`, OpenRouter sends errors inside `200` answers and nests the real
//! provider error as a JSON string, Cloudflare answers with an HTML page. The classifier reads
//! all of them and answers one [`ErrorCode`], a clean message, and what else is known: the
//! wait, the upstream status, the provider family, the request id, the parameter, and whether
//! the request can ever succeed.
//!
//! # Precedence
//!
//! 1. **Billing first**, whatever the status: a billing code or type (`insufficient_quota`,
//!    `billing_error`, `Arrearage`, `credit_limit`, Zhipu `1113`, MiniMax `1008`), status `402`,
//!    or billing words in several languages ("credit balance is too low", "余额不足").
//! 2. **The provider's own code or type** (OpenAI `code`/`type`, Anthropic `error.type`,
//!    Google `ErrorInfo.reason` then gRPC `status`, Zhipu, Qianfan and MiniMax numeric codes,
//!    Moonshot types, DashScope codes, the AWS exception in `x-amzn-errortype`, gateway codes).
//!    Generic ones (`invalid_request_error`, `server_error`, `INVALID_ARGUMENT`) do not decide,
//!    nor does a server-error type on a client-error or gateway status.
//! 3. **The status**, with the message read where the status does not decide alone, by a
//!    vocabulary grouped by meaning (keys, disabled accounts, region, content filter, context
//!    size, unusable and unknown models, missing fields, permission, concurrency, rate, load):
//!    a 400/422 takes any class by its words, else `invalid_value`; a 403 key, revoked-key and
//!    filter words; a 404 a model; a 5xx and an error inside a 200 context-size and filter words.
//! 4. **Refinements**: "expired" or "deactivated" keys; a not-found model; a rate limit that is
//!    a request too large for the tier (`request_too_large`, never fits) or a concurrency limit;
//!    a rate limit by the month is `insufficient_quota`; a zero quota, a quota Google declares
//!    per day, or a daily or hourly limit with no stated wait (marked
//!    [`ApiError::never_fits`]: no retry within any sensible budget can succeed; a daily limit
//!    that states a short wait is a sliding window, and the wait decides).
//! 5. **The wait**: a 429 that is billing only by its words but states a wait of at most 120 s
//!    is a rate limit; a 429 rate limit worded as the server's capacity ("out of capacity",
//!    "model busy") is `service_unavailable` unless it states a wait.
//!
//! Percent-encoded text is decoded before the rules read it. Plain-text answers are read as
//! messages (their first 4 KiB). Edge pages are blocks only by specific fingerprints (Cloudflare
//! and Akamai block pages, error 1020); a bare `403` text is `permission_denied`, and a
//! challenge script counts only on a 403 or 503. [`Classifier`] runs an application's own
//! rules before all of these.
//!
//! The upstream's own code, type and message are kept, scrubbed and bounded, in
//! [`ApiError::upstream_detail`].
//!
//! JSON nested inside strings (a message holding the provider's whole error, `ConnectionError:
//! {...}`, OpenRouter `metadata.raw`) is unwrapped, up to four levels; the innermost error
//! decides, and its status replaces a gateway's. HTML and plain-text pages are named as such,
//! with their `<title>` or first line. Messages are scrubbed of anything key-like and bounded
//! to [`MAX_MESSAGE_CHARS`].
//!
//! # Scrubbing
//!
//! [`scrub_secrets`] masks a key as `prefix...last4` or `...last4` and keeps what is around it.
//! A key is a run of letters, digits and `_ - * + = . /` (so a Zhipu `id.secret`, a JWT and a
//! base64 secret with `/` or `+` are one run; a trailing `.` or `/` is not part of it) that
//! holds a known key prefix (`sk-`, `sk-ant-`, `AIza`, `gsk_`, `eyJ`, ...), follows `Bearer `,
//! is at least 32 characters long mixing letters and digits and looks random, or holds a
//! random-looking run of 16 or more letters and digits (unprefixed keys shorter than 32). The
//! rule leaves words, identifiers, model names (`gpt-4o-2024-08-06`,
//! `meta-llama/Meta-Llama-3.1-70B-Instruct`), URLs and paths (judged piece by piece between
//! slashes), durations and request ids with a known prefix (`req_`, `chatcmpl-`, `org-`, ...)
//! as they are; a bare 32-hex request id looks like an Azure key and is masked. The exact rule
//! is on [`scrub_secrets`].
//!
//! # Waits
//!
//! In this order: `retry-after-ms`, `retry-after` (seconds or HTTP-date), Google
//! `RetryInfo.retryDelay`, a hint in the message ("try again in 1.574s", "retry after 20
//! seconds", only for retryable classes), then for rate limits the reset headers
//! (`x-ratelimit-reset-*`, `anthropic-ratelimit-*-reset`). Every source, dates included, is
//! held to one cap: a wait beyond a year is no wait at all, and no value, however extreme
//! (year 9999, negative, a number of any length), panics or wraps. See [`wait`].
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use http::{HeaderMap, StatusCode};
//! use llm_layers::classify::{classify_response, classify_sse_stream};
//! use llm_layers::error::ErrorCode;
//!
//! let body = br#"{"error":{"message":"Incorrect API key provided: sk-abcdefghijklmnop1234.","type":"invalid_request_error","code":"invalid_api_key"}}"#;
//! let err = classify_response(StatusCode::UNAUTHORIZED, &HeaderMap::new(), body).unwrap();
//! assert_eq!(err.code(), ErrorCode::InvalidApiKey);
//! assert_eq!(err.message(), "Incorrect API key provided: sk-...1234.");
//! assert!(!err.is_retryable());
//!
//! // Gemini: a per-minute quota with a RetryInfo wait.
//! let body = br#"{"error":{"code":429,"message":"Resource exhausted","status":"RESOURCE_EXHAUSTED",
//!   "details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"26s"}]}}"#;
//! let err = classify_response(StatusCode::TOO_MANY_REQUESTS, &HeaderMap::new(), body).unwrap();
//! assert_eq!(err.code(), ErrorCode::RateLimitExceeded);
//! assert_eq!(err.retry_after(), Some(Duration::from_secs(26)));
//! assert_eq!(err.provider(), Some("google"));
//!
//! // An error inside a 200 stream.
//! let sse = b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
//! assert_eq!(classify_sse_stream(sse).unwrap().code(), ErrorCode::ServiceUnavailable);
//!
//! // A normal completion is not an error, and is not parsed.
//! assert!(classify_response(StatusCode::OK, &HeaderMap::new(), br#"{"id":"chatcmpl-1"}"#).is_none());
//! ```

use std::time::{Duration, SystemTime};

use http::header::CONTENT_TYPE;
use http::{HeaderMap, StatusCode};

use crate::error::{ApiError, ErrorCode, UpstreamDetail, X_SHOULD_RETRY};

mod anthropic;
mod cn;
mod envelope;
mod google;
mod html;
mod openai;
mod others;
mod rules;
mod scrub;
mod user;
pub mod wait;

pub(crate) use scrub::finish as scrub_and_bound;
pub use scrub::{scrub as scrub_secrets, MAX_MESSAGE_CHARS};
pub use user::{Classifier, Rule, Upstream, MAX_PATTERN_BYTES};

use envelope::{Fields, Parsed};

/// Classifies an upstream response. Returns `None` when the response is not an error.
///
/// - 1xx and 3xx are never errors.
/// - 2xx are errors only when they carry one: an empty `200` body (an answer was due), a JSON
///   body that opens with an error (`{"error"…`, `{"type":"error"…`, `{"object":"error"…`, or
///   the same inside `[`), or a `text/event-stream` body with an error event. The test is a
///   prefix check (plus a substring scan for event streams), so a normal completion is never
///   parsed.
/// - 4xx and 5xx are always errors: JSON bodies by their envelope, HTML and plain text by
///   their status and words, empty bodies by their status.
///
/// Never panics, whatever the bytes: empty bodies, invalid UTF-8, truncated JSON and huge
/// bodies are input. Uses the system clock for HTTP-date waits; see [`classify_response_at`].
pub fn classify_response(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Option<ApiError> {
    classify_response_at(status, headers, body, SystemTime::now())
}

/// [`classify_response`] with an explicit "now" for date-based waits (`retry-after` HTTP-dates,
/// Anthropic reset timestamps).
pub fn classify_response_at(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    now: SystemTime,
) -> Option<ApiError> {
    if status.is_informational() || status.is_redirection() {
        return None;
    }
    let body = body.trim_ascii();
    let body = body.strip_prefix("\u{feff}".as_bytes()).unwrap_or(body);
    // Borrowed, not lower-cased: the success path allocates nothing.
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if status.is_success() {
        return in_band(status, headers, body, content_type, now);
    }
    if !(status.is_client_error() || status.is_server_error()) {
        return None;
    }
    let s = status.as_u16();
    if body.is_empty() {
        let code = code_for_status(status);
        let msg = format!("upstream answered with status {s} and an empty body");
        let err = ApiError::new(code, msg).with_provider("status");
        return Some(finish(err, status, headers, now, true));
    }
    if matches!(body[0], b'{' | b'[' | b'"') {
        let mut fields = match envelope::parse(body, false) {
            Parsed::Error(f) => Some(*f),
            // JSON without an error in it: classify by status, with a generic message.
            Parsed::NoError => Some(Fields {
                family: "generic",
                ..Fields::default()
            }),
            Parsed::NotJson if body[0] == b'{' => {
                let text = String::from_utf8_lossy(&body[..body.len().min(16 * 1024)]);
                Some(envelope::from_broken_json(&text))
            }
            Parsed::NotJson => None,
        };
        if let Some(f) = fields.as_mut() {
            return Some(from_fields(s, f, headers, now));
        }
    }
    let is_html = html::looks_html(content_type, body);
    let page = html::classify(s, body, is_html);
    let provider = if is_html { "html" } else { "text" };
    let Some(mut f) = page.fields else {
        let message = message_or_status(&page.message, s, page.code);
        let err = ApiError::new(page.code, message).with_provider(provider);
        return Some(finish(err, status, headers, now, true));
    };
    // A plain-text answer is a message: the rules read it like one.
    envelope::decode_hay(&mut f);
    let verdict = rules::decide(s, &f);
    let header_wait = wait::from_headers_at(headers, now);
    let explicit = header_wait.or_else(|| wait::from_lower_text(&f.hay));
    let code = rules::with_wait(s, verdict, explicit);
    let mut err =
        ApiError::new(code, message_or_status(&page.message, s, code)).with_provider(provider);
    if let Some(d) = upstream_detail(&f, None) {
        err = err.with_upstream_detail(d);
    }
    let mut err = finish_with(err, status, headers, now, true, header_wait);
    if err.retry_after().is_none() {
        err.set_retry_after(wait_from_fields(code, &f, headers, now, None));
    }
    if verdict.never_fits || (verdict.long_limit && err.retry_after().is_none()) {
        err = err.never_fits();
    }
    Some(err)
}

/// The scrubbed message, or the status and code when nothing is left of it (an empty body, a
/// message of blanks or control characters).
fn message_or_status(text: &str, status: u16, code: ErrorCode) -> String {
    let message = scrub::finish(text);
    if message.is_empty() {
        format!("upstream answered with status {status} ({code})")
    } else {
        message
    }
}

/// Errors inside a 2xx answer.
fn in_band(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    content_type: &str,
    now: SystemTime,
) -> Option<ApiError> {
    if body.is_empty() {
        if status != StatusCode::OK {
            return None;
        }
        let err = ApiError::new(
            ErrorCode::ServiceUnavailable,
            "upstream answered 200 with an empty body where a response was due",
        )
        .with_provider("status");
        return Some(finish(err, status, headers, now, true));
    }
    let event_stream = content_type
        .get(..17)
        .is_some_and(|p| p.eq_ignore_ascii_case("text/event-stream"));
    if event_stream || body.starts_with(b"data:") || body.starts_with(b"event:") {
        if !contains(body, b"error") {
            return None; // no event can be an error
        }
        return classify_sse_stream(body).map(|mut e| {
            e = e.with_upstream_status(status);
            if e.retry_after().is_none() {
                e.set_retry_after(wait::from_headers_at(headers, now));
            }
            e
        });
    }
    if !opens_with_error(body) {
        return None;
    }
    let mut f = envelope::from_json(body, true)?;
    Some(from_fields(status.as_u16(), &mut f, headers, now))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Whether a JSON body opens with an error: `{"error"`, `{"type":"error"`,
/// `{"object":"error"`, possibly inside `[`, whitespace allowed between tokens.
fn opens_with_error(body: &[u8]) -> bool {
    fn skip_ws(b: &[u8]) -> &[u8] {
        b.trim_ascii_start()
    }
    let mut b = skip_ws(body);
    if let Some(rest) = b.strip_prefix(b"[") {
        b = skip_ws(rest);
    }
    let Some(rest) = b.strip_prefix(b"{") else {
        return false;
    };
    let b = skip_ws(rest);
    // `"error"`, and Baidu's `"error_code"` / MiniMax's `"base_resp"` (checked when parsed).
    if b.starts_with(b"\"error\"")
        || b.starts_with(b"\"error_code\"")
        || b.starts_with(b"\"base_resp\"")
    {
        return true;
    }
    for key in [&b"\"type\""[..], b"\"object\""] {
        if let Some(rest) = b.strip_prefix(key) {
            let rest = skip_ws(rest);
            if let Some(rest) = rest.strip_prefix(b":") {
                return skip_ws(rest).starts_with(b"\"error\"");
            }
        }
    }
    false
}

/// Builds the error from parsed fields: effective status, decision, message, family, param,
/// request id, never-fits flag and wait.
fn from_fields(status: u16, f: &mut Fields, headers: &HeaderMap, now: SystemTime) -> ApiError {
    if let Some(v) = headers
        .get("x-amzn-errortype")
        .and_then(|v| v.to_str().ok())
    {
        f.amzn = others::amzn_error_type(v);
        if f.family == "generic" {
            f.family = "bedrock";
        }
    } else if f.family == "generic" && headers.contains_key("x-amzn-requestid") {
        f.family = "bedrock";
    }
    // A status inside the body replaces the outer one when the outer says nothing (a 200) or
    // belongs to a gateway that wrapped the real error.
    let effective = match f.http {
        Some(h) if h >= 400 && (f.nested || status < 400) => h,
        _ => status,
    };
    envelope::decode_hay(f);
    let verdict = rules::decide(effective, f);
    // The rules that need the explicit wait: the headers', Google's, or the text's.
    // The text hint is read at most once.
    let text_wait = (effective == 429).then(|| wait::from_lower_text(&f.hay));
    let header_wait = wait::from_headers_at(headers, now);
    let explicit = header_wait.or(f.retry_delay).or(text_wait.flatten());
    let verdict = rules::Verdict {
        code: rules::with_wait(effective, verdict, explicit),
        ..verdict
    };
    // A message that is empty once scrubbed and folded (`""`, `" "`, control characters
    // only) says nothing: the status and code say it instead.
    let own = f
        .message
        .as_deref()
        .map(scrub::finish)
        .filter(|m| !m.is_empty());
    // The detail's message is the provider's, scrubbed once for both.
    let detail = upstream_detail(f, own.clone());
    let message = own.unwrap_or_else(|| {
        scrub::finish(&format!(
            "upstream answered with status {effective} ({})",
            verdict.code
        ))
    });
    let mut err = ApiError::new(verdict.code, message).with_provider(f.family);
    if let Some(d) = detail {
        err = err.with_upstream_detail(d);
    }
    if let Some(p) = f.param.as_deref().filter(|p| p.len() <= 128) {
        err = err.with_param(scrub::finish(p));
    }
    if let Some(id) = f.request_id.as_deref().filter(|id| sane_id(id)) {
        err = err.with_request_id(id);
    }
    let mut err = finish_with(
        err,
        StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
        headers,
        now,
        false,
        header_wait,
    );
    if err.retry_after().is_none() {
        err.set_retry_after(wait_from_fields(verdict.code, f, headers, now, text_wait));
    }
    // A daily or hourly limit without a stated wait cannot clear within a retry budget; with
    // one (a sliding window), the wait decides.
    if verdict.never_fits || (verdict.long_limit && err.retry_after().is_none()) {
        err = err.never_fits();
    }
    err
}

/// The upstream's own code (or first Google reason), type (or gRPC status) and message.
/// `scrubbed` is the message already scrubbed and bounded, when the caller has it.
fn upstream_detail(f: &Fields, scrubbed: Option<String>) -> Option<UpstreamDetail> {
    let code = f.code.as_deref().or(f.reasons.first().map(String::as_str));
    let kind = f.kind.as_deref().or(f.grpc.as_deref());
    match scrubbed {
        Some(m) => UpstreamDetail::with_scrubbed_message(code, kind, m),
        None => UpstreamDetail::new(code, kind, f.message.as_deref()),
    }
}

/// The body-side waits, in precedence order after the headers.
/// `text_wait` is the text hint when the caller already read it.
fn wait_from_fields(
    code: ErrorCode,
    f: &Fields,
    headers: &HeaderMap,
    now: SystemTime,
    text_wait: Option<Option<Duration>>,
) -> Option<Duration> {
    f.retry_delay
        .or_else(|| {
            code.is_retryable()
                .then(|| text_wait.unwrap_or_else(|| wait::from_lower_text(&f.hay)))
                .flatten()
        })
        .or_else(|| {
            matches!(
                code,
                ErrorCode::RateLimitExceeded | ErrorCode::ConcurrentLimitExceeded
            )
            .then(|| wait::rate_limit_reset_at(headers, now))
            .flatten()
        })
}

const REQUEST_ID_HEADERS: [&str; 6] = [
    "x-request-id",
    "request-id",
    "x-amzn-requestid",
    "x-amz-request-id",
    "apim-request-id",
    "x-ms-request-id",
];

fn sane_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic())
}

/// Adds what the headers say: upstream status, request id (headers first), header wait, and
/// with `resets` the rate-limit reset headers for a rate limit.
fn finish(
    err: ApiError,
    status: StatusCode,
    headers: &HeaderMap,
    now: SystemTime,
    resets: bool,
) -> ApiError {
    let header_wait = wait::from_headers_at(headers, now);
    finish_with(err, status, headers, now, resets, header_wait)
}

/// [`finish`] with the header wait already read.
fn finish_with(
    mut err: ApiError,
    status: StatusCode,
    headers: &HeaderMap,
    now: SystemTime,
    resets: bool,
    header_wait: Option<Duration>,
) -> ApiError {
    err = err.with_upstream_status(status);
    // The upstream's own word on retrying, which the official SDKs obey first.
    if let Some(v) = headers
        .get(X_SHOULD_RETRY)
        .map(|v| v.as_bytes().trim_ascii())
    {
        if v.eq_ignore_ascii_case(b"true") {
            err = err.with_upstream_should_retry(true);
        } else if v.eq_ignore_ascii_case(b"false") {
            err = err.with_upstream_should_retry(false);
        }
    }
    let header_id = REQUEST_ID_HEADERS.iter().find_map(|h| {
        headers
            .get(*h)
            .and_then(|v| v.to_str().ok())
            .filter(|v| sane_id(v))
    });
    if let Some(id) = header_id {
        err = err.with_request_id(id);
    }
    if let Some(w) = header_wait {
        err = err.with_retry_after(w);
    }
    if resets && err.retry_after().is_none() && err.code() == ErrorCode::RateLimitExceeded {
        err.set_retry_after(wait::rate_limit_reset_at(headers, now));
    }
    err
}

/// Classifies from the status line and headers alone, for layers that do not read bodies:
/// the code from the status, the wait from `retry-after-ms` / `retry-after` (and, for a 429,
/// the rate-limit reset headers), the request id from the headers. Returns `None` when the
/// status is not an error.
pub fn classify_head(status: StatusCode, headers: &HeaderMap) -> Option<ApiError> {
    classify_head_at(status, headers, SystemTime::now())
}

/// [`classify_head`] with an explicit "now" for date-based waits.
pub fn classify_head_at(
    status: StatusCode,
    headers: &HeaderMap,
    now: SystemTime,
) -> Option<ApiError> {
    if !(status.is_client_error() || status.is_server_error()) {
        return None;
    }
    let err = ApiError::new(
        code_for_status(status),
        format!("upstream answered with status {}", status.as_u16()),
    )
    .with_provider("status");
    Some(finish(err, status, headers, now, true))
}

/// Classifies one SSE `data:` payload (OpenAI `{"error":{...}}`, Anthropic
/// `{"type":"error","error":{...}}`, the Responses API `{"type":"error",...}` and
/// `{"type":"response.failed","response":{"error":{...}}}`, OpenRouter
/// `{"code":502,"message":...}`). Returns `None` when it is not an error event.
///
/// A payload that does not parse (a truncated chunk) counts only when it holds an `"error"`
/// key; it is then classified from its text.
pub fn classify_sse_event(data: &[u8]) -> Option<ApiError> {
    let data = data.trim_ascii();
    if data.is_empty() || data == b"[DONE]" {
        return None;
    }
    // Every error shape carries the word; a normal chunk without it is not parsed.
    if !contains(data, b"error") {
        return None;
    }
    let mut f = match envelope::parse(data, true) {
        Parsed::Error(f) => *f,
        Parsed::NoError => return None,
        // A truncated payload (one line of a multi-line event, a cut chunk) counts only when
        // `"error"` stands in it as a key: `{"text":"error",` is content, not an error.
        Parsed::NotJson if has_error_key(data) => {
            let text = String::from_utf8_lossy(&data[..data.len().min(16 * 1024)]);
            envelope::from_broken_json(&text)
        }
        Parsed::NotJson => return None,
    };
    Some(from_fields(
        200,
        &mut f,
        &HeaderMap::new(),
        SystemTime::now(),
    ))
}

/// Whether `"error"` appears in `data` as an object key (followed by `:`).
fn has_error_key(data: &[u8]) -> bool {
    let key = b"\"error\"";
    let mut rest = data;
    while let Some(i) = rest.windows(key.len()).position(|w| w == key) {
        rest = &rest[i + key.len()..];
        if rest.trim_ascii_start().starts_with(b":") {
            return true;
        }
    }
    false
}

/// Walks a raw SSE body (`event:` / `data:` lines, events separated by blank lines, `\r\n`
/// allowed) and returns the first error event, classified with [`classify_sse_event`]. An
/// `event: error` whose data is not a recognizable error is still an `internal_error`.
pub fn classify_sse_stream(text: &[u8]) -> Option<ApiError> {
    let mut event: &[u8] = b"";
    let mut data: Vec<u8> = Vec::new();
    let dispatch = |event: &[u8], data: &[u8]| -> Option<ApiError> {
        if let Some(e) = classify_sse_event(data) {
            return Some(e);
        }
        (event == b"error").then(|| {
            let shown = String::from_utf8_lossy(&data[..data.len().min(4096)]);
            let msg = if shown.trim().is_empty() {
                "upstream sent an error event".to_owned()
            } else {
                format!("upstream sent an error event: {shown}")
            };
            ApiError::new(ErrorCode::InternalError, scrub::finish(&msg)).with_provider("sse")
        })
    };
    for line in text.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            if let Some(e) = dispatch(event, &data) {
                return Some(e);
            }
            event = b"";
            data.clear();
            continue;
        }
        if line.starts_with(b":") {
            continue;
        }
        let (field, value) = match line.iter().position(|b| *b == b':') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, &b""[..]),
        };
        let value = value.strip_prefix(b" ").unwrap_or(value);
        match field {
            b"event" => event = value,
            b"data" => {
                if !data.is_empty() {
                    data.push(b'\n');
                }
                data.extend_from_slice(value);
            }
            _ => {}
        }
    }
    if data.is_empty() && event.is_empty() {
        return None;
    }
    dispatch(event, &data)
}

/// The code for a bare status, when nothing else is known.
pub fn code_for_status(status: StatusCode) -> ErrorCode {
    code_for_status_u16(status.as_u16())
}

fn code_for_status_u16(status: u16) -> ErrorCode {
    match status {
        401 => ErrorCode::InvalidApiKey,
        402 => ErrorCode::InsufficientQuota,
        403 => ErrorCode::PermissionDenied,
        404 => ErrorCode::NotFound,
        408 | 504 | 524 => ErrorCode::Timeout,
        413 => ErrorCode::RequestTooLarge,
        429 => ErrorCode::RateLimitExceeded,
        500 => ErrorCode::InternalError,
        502 | 503 | 520..=523 | 525..=527 | 529 => ErrorCode::ServiceUnavailable,
        400..=499 => ErrorCode::InvalidValue,
        _ => ErrorCode::InternalError,
    }
}

/// Classifies a transport error from the inner service (connection refused or reset, a
/// timeout, a broken body): `504 timeout` when any error in the chain is a timeout, else
/// `502 service_unavailable`. The message names the kind of failure, not the upstream address.
///
/// An [`ApiError`] anywhere in the chain (a client middleware's own refusal, such as a
/// cross-origin redirect it would not follow) is that error's classification and is returned
/// as it is.
pub fn classify_transport_error(err: &(dyn std::error::Error + 'static)) -> ApiError {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    let mut kind = None;
    while let Some(e) = cur {
        if let Some(api) = e.downcast_ref::<ApiError>() {
            return api.clone();
        }
        if e.is::<tokio::time::error::Elapsed>() || e.is::<tower::timeout::error::Elapsed>() {
            kind = Some(std::io::ErrorKind::TimedOut);
            break;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            kind = Some(io.kind());
            break;
        }
        let text = e.to_string().to_ascii_lowercase();
        if text.contains("timed out")
            || text.contains("timeout")
            || text.contains("deadline has elapsed")
        {
            kind = Some(std::io::ErrorKind::TimedOut);
            break;
        }
        // Clients such as hyper report a connection closed mid-exchange without an io error
        // in the chain ("connection closed before message completed").
        if text.contains("connection closed")
            || text.contains("connection reset")
            || text.contains("broken pipe")
            || text.contains("incomplete message")
        {
            kind = Some(std::io::ErrorKind::ConnectionReset);
            break;
        }
        if text.contains("connection refused") {
            kind = Some(std::io::ErrorKind::ConnectionRefused);
            break;
        }
        cur = e.source();
    }
    use std::io::ErrorKind as K;
    match kind {
        Some(K::TimedOut) => {
            ApiError::new(ErrorCode::Timeout, "The upstream did not answer in time.")
                .with_provider("transport")
        }
        Some(K::ConnectionRefused) => ApiError::new(
            ErrorCode::ServiceUnavailable,
            "The upstream refused the connection.",
        )
        .with_status(StatusCode::BAD_GATEWAY)
        .with_provider("transport"),
        Some(K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof) => {
            ApiError::new(
                ErrorCode::ServiceUnavailable,
                "The connection to the upstream was closed before it answered.",
            )
            .with_status(StatusCode::BAD_GATEWAY)
            .with_provider("transport")
        }
        _ => ApiError::new(
            ErrorCode::ServiceUnavailable,
            "The upstream could not be reached.",
        )
        .with_status(StatusCode::BAD_GATEWAY)
        .with_provider("transport"),
    }
}
