//! `classify_response_at`: any status, up to four headers, any body.
//!
//! Input: two bytes of status, a byte of "now", then headers as `name index, length, value`
//! triples while the next byte is below 16, then that byte; the rest is the body.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use libfuzzer_sys::fuzz_target;
use llm_layers::classify::{classify_response_at, MAX_MESSAGE_CHARS};

const CAP: Duration = Duration::from_secs(366 * 24 * 3600);
const NAMES: [&str; 12] = [
    "content-type",
    "retry-after",
    "retry-after-ms",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "anthropic-ratelimit-requests-reset",
    "anthropic-ratelimit-tokens-remaining",
    "x-request-id",
    "x-amzn-errortype",
    "x-amzn-requestid",
];

fuzz_target!(|data: &[u8]| {
    let [s0, s1, now, rest @ ..] = data else {
        return;
    };
    let status = 100 + u16::from_le_bytes([*s0, *s1]) % 900;
    let status = StatusCode::from_u16(status).unwrap();
    let now = UNIX_EPOCH + Duration::from_secs(u64::from(*now) * 40_000_000);
    let mut headers = HeaderMap::new();
    let mut rest = rest;
    while let [n, len, tail @ ..] = rest {
        if *n >= 16 {
            rest = &rest[1..];
            break;
        }
        if headers.len() >= 4 {
            break;
        }
        let len = usize::from(*len).min(tail.len());
        if let Ok(v) = HeaderValue::from_bytes(&tail[..len]) {
            headers.append(
                HeaderName::from_static(NAMES[usize::from(*n) % NAMES.len()]),
                v,
            );
        }
        rest = &tail[len..];
    }
    let Some(e) = classify_response_at(status, &headers, rest, now) else {
        assert!(!(status.is_client_error() || status.is_server_error()));
        return;
    };
    assert_eq!(e.status(), e.code().status());
    assert!(!e.message().is_empty(), "empty message");
    assert!(e.message().chars().count() <= MAX_MESSAGE_CHARS);
    assert!(
        e.retry_after().is_none_or(|w| w <= CAP),
        "wait {:?}",
        e.retry_after()
    );
    let _ = e.envelope(llm_layers::error::TypeStyle::OpenAi);
});
