//! Property tests of the classifier: any status, any headers, any body bytes.
//!
//! Run with `PROPTEST_CASES=<n>` to change the number of cases (10 000 by default).

mod common_prop;
use common_prop::config;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use llm_layers::classify::{
    classify_response, classify_response_at, classify_sse_event, classify_sse_stream,
    MAX_MESSAGE_CHARS,
};
use llm_layers::error::ApiError;
use proptest::prelude::*;

/// The longest wait any parser accepts: one year (see `classify::wait`).
const CAP: Duration = Duration::from_secs(366 * 24 * 3600);

fn now_at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// Bodies of the fixture files: real provider answers, the seeds the mutations start from.
fn fixture_bodies() -> &'static [Vec<u8>] {
    static BODIES: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    BODIES.get_or_init(|| {
        let mut out = Vec::new();
        for path in ["tests/fixtures/errors.jsonl", "tests/fixtures/extra.jsonl"] {
            let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                if let Some(body) = v["body"].as_str() {
                    out.push(body.as_bytes().to_vec());
                }
            }
        }
        assert!(out.len() > 50, "fixtures not found");
        out
    })
}

/// A fixture body, mutated: cut, with bytes flipped, inserted or removed.
fn mutated_fixture() -> impl Strategy<Value = Vec<u8>> {
    let n = fixture_bodies().len();
    (
        0..n,
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 0..6),
        any::<Option<prop::sample::Index>>(),
    )
        .prop_map(|(i, edits, cut)| {
            let mut body = fixture_bodies()[i].clone();
            for (at, byte, op) in edits {
                if body.is_empty() {
                    body.push(byte);
                    continue;
                }
                let at = at.index(body.len());
                match op {
                    0 => body[at] = byte,
                    1 => body.insert(at, byte),
                    2 => {
                        body.remove(at);
                    }
                    _ => body.truncate(at),
                }
            }
            if let Some(cut) = cut {
                let at = cut.index(body.len() + 1);
                body.truncate(at);
            }
            body
        })
}

/// JSON-ish and HTML-ish fragments glued together, so that the parsers' deeper paths are hit.
fn fragment_body() -> impl Strategy<Value = Vec<u8>> {
    let pieces = prop::sample::select(vec![
        "{",
        "}",
        "[",
        "]",
        "\"",
        "\"error\"",
        ":",
        ",",
        "\"message\"",
        "\"code\"",
        "\"type\"",
        "\"status\"",
        "\"param\"",
        "\"details\"",
        "\"metadata\"",
        "\"raw\"",
        "\"retryDelay\"",
        "\"@type\"",
        "\"type.googleapis.com/google.rpc.RetryInfo\"",
        "\"37s\"",
        "429",
        "529",
        "\"1113\"",
        "null",
        "true",
        "1e999",
        "-0",
        "\"insufficient_quota\"",
        "\"rate_limit_error\"",
        "\"overloaded_error\"",
        "\"RESOURCE_EXHAUSTED\"",
        "\"try again in 1.5s\"",
        "\"retry after 99999999999 seconds\"",
        "\"context length\"",
        "\\\"",
        "\\u0000",
        "\\ud800",
        "<html>",
        "<title>",
        "</title>",
        "Just a moment...",
        "data: ",
        "event: error",
        "\n",
        "\r\n",
        "\r",
        " ",
        "sk-",
        "é",
        "余额不足",
        "\u{feff}",
        "\"request_id\"",
        "\"req_1\"",
    ]);
    prop::collection::vec(pieces, 0..48).prop_map(|v| v.concat().into_bytes())
}

fn any_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => prop::collection::vec(any::<u8>(), 0..256),
        3 => fragment_body(),
        3 => mutated_fixture(),
    ]
}

/// Header values that reach the wait and request-id parsers.
fn header_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..40),
        "[0-9]{1,25}(\\.[0-9]{0,12})?".prop_map(String::into_bytes),
        "-?[0-9]{0,6}(\\.[0-9]{0,6})?([eE][+-]?[0-9]{1,4})?|NaN|inf|-inf|Infinity".prop_map(String::into_bytes),
        "([0-9]{1,12}(\\.[0-9]{1,6})?(h|m|s|ms|us|µs|ns)){1,4}".prop_map(String::into_bytes),
        // HTTP-dates and RFC 3339 timestamps, up to the year 9999.
        (0u64..253_402_300_799).prop_map(|s| httpdate::fmt_http_date(now_at(s)).into_bytes()),
        "[0-9]{4}-[01][0-9]-[0-3][0-9][Tt ][0-2][0-9]:[0-5][0-9]:[0-6][0-9](\\.[0-9]{1,12})?(Z|z|[+-][0-2][0-9]:[0-5][0-9])"
            .prop_map(String::into_bytes),
        prop::sample::select(vec!["0", "application/json", "text/html", "text/event-stream", "text/plain"])
            .prop_map(|s| s.as_bytes().to_vec()),
    ]
}

/// Header bytes, shown as an escaped string when a case fails.
#[derive(Clone)]
struct Hv(Vec<u8>);

impl std::fmt::Debug for Hv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "b\"{}\"", self.0.escape_ascii())
    }
}

fn headers() -> impl Strategy<Value = Vec<(&'static str, Hv)>> {
    let names = prop::sample::select(vec![
        "content-type",
        "retry-after",
        "retry-after-ms",
        "x-ratelimit-reset-requests",
        "x-ratelimit-reset-tokens",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-remaining-tokens",
        "anthropic-ratelimit-requests-reset",
        "anthropic-ratelimit-tokens-reset",
        "anthropic-ratelimit-input-tokens-reset",
        "anthropic-ratelimit-output-tokens-remaining",
        "x-request-id",
        "request-id",
        "x-amzn-errortype",
        "x-amzn-requestid",
    ]);
    prop::collection::vec((names, header_value().prop_map(Hv)), 0..6)
}

fn header_map(pairs: &[(&'static str, Hv)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in pairs {
        if let Ok(v) = HeaderValue::from_bytes(&value.0) {
            h.append(HeaderName::from_static(name), v);
        }
    }
    h
}

/// What every classified error must hold, whatever the input.
fn check_error(e: &ApiError) -> Result<(), TestCaseError> {
    prop_assert_eq!(e.status(), e.code().status(), "{:?}", e);
    prop_assert!(!e.message().is_empty(), "{:?}", e);
    prop_assert!(e.message().chars().count() <= MAX_MESSAGE_CHARS, "{:?}", e);
    if let Some(w) = e.retry_after() {
        prop_assert!(w <= CAP, "wait {:?} above the one-year cap: {:?}", w, e);
    }
    if let Some(p) = e.param() {
        prop_assert!(p.chars().count() <= MAX_MESSAGE_CHARS, "{:?}", e);
    }
    // The envelope is JSON and says what the error says.
    let res = e.to_response::<bytes::Bytes>();
    prop_assert_eq!(res.status(), e.status());
    let json: serde_json::Value = serde_json::from_slice(res.body()).unwrap();
    prop_assert_eq!(json["error"]["code"].as_str(), Some(e.code().as_str()));
    prop_assert_eq!(json["error"]["message"].as_str(), Some(e.message()));
    Ok(())
}

// ---------- planted keys ----------

/// A generated API key, with the part of it that must never be shown (everything but a known
/// prefix and the last four characters).
#[derive(Debug, Clone)]
struct Key {
    key: String,
    hidden: String,
}

fn mixed(s: &str) -> bool {
    s.bytes().any(|b| b.is_ascii_digit()) && s.bytes().any(|b| b.is_ascii_alphabetic())
}

/// Keys with a known provider prefix (`sk-`, `sk-ant-api03-`, `AIza`, ...).
fn prefixed_key() -> impl Strategy<Value = Key> {
    (
        prop::sample::select(vec![
            "sk-",
            "sk-proj-",
            "sk-ant-api03-",
            "sk-or-v1-",
            "gsk_",
            "xai-",
            "AIza",
            "hf_",
            "r8_",
            "pplx-",
        ]),
        "[A-Za-z0-9_-]{20,48}",
    )
        .prop_filter("mixed", |(_, s)| mixed(s))
        .prop_map(|(p, s)| Key {
            key: format!("{p}{s}"),
            hidden: s[..s.len() - 4].to_owned(),
        })
}

/// Zhipu-style `id.secret` keys.
fn dotted_key() -> impl Strategy<Value = Key> {
    ("[0-9a-f]{32}", "[A-Za-z0-9]{16}")
        .prop_filter("mixed", |(_, s)| mixed(s))
        .prop_map(|(id, s)| Key {
            key: format!("{id}.{s}"),
            hidden: format!("{id}.{}", &s[..s.len() - 4]),
        })
}

/// Base64 secrets (AWS-style, 40 characters with `/` and `+`).
fn base64_key() -> impl Strategy<Value = Key> {
    ("[A-Za-z0-9+/]{40}", 4usize..36)
        .prop_map(|(s, slash)| format!("{}/{}", &s[..slash], &s[slash + 1..]))
        .prop_filter("mixed", |s| mixed(s))
        .prop_map(|s| Key {
            hidden: s[..s.len() - 4].to_owned(),
            key: s,
        })
}

/// Unprefixed keys shorter than 32 characters.
fn short_key() -> impl Strategy<Value = Key> {
    "[A-Za-z0-9]{16,31}"
        .prop_filter("mixed", |s| mixed(s))
        .prop_map(|s| Key {
            hidden: s[..s.len() - 4].to_owned(),
            key: s,
        })
}

fn context() -> impl Strategy<Value = (&'static str, usize, StatusCode)> {
    (
        prop::sample::select(vec![": ", " ", ": Bearer ", " key=", " (", ": '", ":\n"]),
        0usize..8,
        prop::sample::select(vec![200u16, 400, 401, 403, 429, 500, 502])
            .prop_map(|s| StatusCode::from_u16(s).unwrap()),
    )
}

/// The key, quoted by the upstream in any of the shapes, never reaches a message or a param.
fn check_no_leak(
    key: &Key,
    before: &str,
    template: usize,
    status: StatusCode,
) -> Result<(), TestCaseError> {
    let body = body_with_key(&key.key, before, template);
    if let Some(e) = classify_response(status, &HeaderMap::new(), body.as_bytes()) {
        prop_assert!(
            leaks(e.message(), key).is_none(),
            "key {:?} shows in {:?}",
            key.key,
            e.message()
        );
        prop_assert!(
            leaks(e.param().unwrap_or(""), key).is_none(),
            "key {:?} shows in param {:?}",
            key.key,
            e.param()
        );
    }
    let sse = format!("data: {body}\n\n");
    if let Some(e) = classify_sse_stream(sse.as_bytes()) {
        prop_assert!(
            leaks(e.message(), key).is_none(),
            "key {:?} shows in {:?}",
            key.key,
            e.message()
        );
    }
    if let Some(e) = classify_sse_event(body.as_bytes()) {
        prop_assert!(
            leaks(e.message(), key).is_none(),
            "key {:?} shows in {:?}",
            key.key,
            e.message()
        );
    }
    Ok(())
}

/// Whether `text` shows 8 or more consecutive characters of the hidden part of the key.
fn leaks(text: &str, key: &Key) -> Option<String> {
    let h = key.hidden.as_bytes();
    if h.len() < 8 {
        return text.contains(&key.hidden).then(|| key.hidden.clone());
    }
    h.windows(8)
        .find(|w| text.as_bytes().windows(8).any(|t| t == *w))
        .map(|w| String::from_utf8_lossy(w).into_owned())
}

/// An upstream body that quotes the key, in one of the shapes providers use.
fn body_with_key(key: &str, before: &str, template: usize) -> String {
    let text = format!("Incorrect API key provided{before}{key}. You can find your API key at https://example.com/account.");
    let json = serde_json::to_string(&text).unwrap();
    match template {
        0 => format!(
            r#"{{"error":{{"message":{json},"type":"invalid_request_error","code":"invalid_api_key"}}}}"#
        ),
        1 => {
            let inner = format!(r#"{{"error":{{"message":{json}}}}}"#);
            format!(
                r#"{{"error":{{"message":{}}}}}"#,
                serde_json::to_string(&inner).unwrap()
            )
        }
        2 => format!("<html><head><title>{text}</title></head><body>{text}</body></html>"),
        3 => text,
        4 => format!(r#"{{"error":{{"message":"bad","param":{json}}}}}"#),
        5 => format!(
            r#"{{"type":"error","error":{{"type":"authentication_error","message":{json}}}}}"#
        ),
        6 => format!(r#"{{"error":{{"code":401,"message":{json},"status":"UNAUTHENTICATED"}}}}"#),
        _ => format!(r#"{{"message":{json}}}"#),
    }
}

proptest! {
    #![proptest_config(config())]

    /// Any status, headers and body: no panic, and every error is well-formed (status is the
    /// code's, message bounded and non-empty, wait within the cap, envelope valid).
    #[test]
    fn classify_response_holds_for_any_input(
        status in 100u16..1000,
        headers in headers(),
        body in any_body(),
        now in 0u64..4_000_000_000,
    ) {
        let status = StatusCode::from_u16(status).unwrap();
        let headers = header_map(&headers);
        let got = classify_response_at(status, &headers, &body, now_at(now));
        if let Some(e) = &got {
            check_error(e)?;
        }
        if status.is_client_error() || status.is_server_error() {
            prop_assert!(got.is_some(), "4xx/5xx are always errors");
        }
        if status.is_informational() || status.is_redirection() {
            prop_assert!(got.is_none());
        }
    }

    /// `classify_response` (system clock) agrees with the `_at` form on everything but the
    /// date-based wait.
    #[test]
    fn classify_response_with_the_system_clock(
        status in prop::sample::select(vec![200u16, 400, 401, 402, 403, 404, 408, 413, 422, 429, 500, 502, 503, 504, 529]),
        headers in headers(),
        body in any_body(),
    ) {
        let status = StatusCode::from_u16(status).unwrap();
        let headers = header_map(&headers);
        let got = classify_response(status, &headers, &body);
        let at = classify_response_at(status, &headers, &body, SystemTime::now());
        prop_assert_eq!(got.as_ref().map(ApiError::code), at.as_ref().map(ApiError::code));
        if let Some(e) = &got {
            check_error(e)?;
        }
    }

    /// One SSE `data:` payload of any bytes: no panic; a payload without `error` is never an
    /// error; an error is well-formed.
    #[test]
    fn classify_sse_event_holds_for_any_payload(data in any_body()) {
        let got = classify_sse_event(&data);
        if !data.windows(5).any(|w| w == b"error") {
            prop_assert!(got.is_none());
        }
        if let Some(e) = &got {
            check_error(e)?;
        }
    }

    /// A whole SSE body of any bytes: no panic, and `\r\n` line ends read as `\n` ones.
    #[test]
    fn classify_sse_stream_holds_for_any_body(body in any_body()) {
        let got = classify_sse_stream(&body);
        if let Some(e) = &got {
            check_error(e)?;
        }
        if !body.contains(&b'\r') {
            let crlf: Vec<u8> = body
                .iter()
                .flat_map(|&b| if b == b'\n' { vec![b'\r', b'\n'] } else { vec![b] })
                .collect();
            let other = classify_sse_stream(&crlf);
            prop_assert_eq!(got.as_ref().map(ApiError::code), other.as_ref().map(ApiError::code));
        }
    }

    /// Keys with a known prefix never reach the message or the param.
    #[test]
    fn prefixed_keys_never_reach_the_message(key in prefixed_key(), (before, template, status) in context()) {
        check_no_leak(&key, before, template, status)?;
    }

    /// Zhipu-style `id.secret` keys never reach the message or the param.
    #[test]
    fn dotted_keys_never_reach_the_message(key in dotted_key(), (before, template, status) in context()) {
        check_no_leak(&key, before, template, status)?;
    }

    /// Base64 secrets with `/` never reach the message or the param.
    #[test]
    fn base64_keys_never_reach_the_message(key in base64_key(), (before, template, status) in context()) {
        check_no_leak(&key, before, template, status)?;
    }

    /// Unprefixed keys shorter than 32 characters, quoted where a key is named, never reach
    /// the message or the param.
    #[test]
    fn short_keys_never_reach_the_message(key in short_key(), (before, template, status) in context()) {
        check_no_leak(&key, before, template, status)?;
    }
}
