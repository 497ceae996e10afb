//! The wait-hint parsers of `classify::wait` on any text, alone and as header values.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use llm_layers::classify::wait;

const CAP: Duration = Duration::from_secs(366 * 24 * 3600);
const NAMES: [&str; 5] = [
    "retry-after",
    "retry-after-ms",
    "x-ratelimit-reset-tokens",
    "anthropic-ratelimit-tokens-reset",
    "anthropic-ratelimit-tokens-remaining",
];

fuzz_target!(|data: &[u8]| {
    let [n, now, rest @ ..] = data else {
        return;
    };
    let now = UNIX_EPOCH + Duration::from_secs(u64::from(*now) * 40_000_000);
    let text = String::from_utf8_lossy(rest);
    for w in [
        wait::parse_retry_after(&text, now),
        wait::parse_duration(&text),
        wait::parse_retry_delay(&text),
        wait::from_text(&text),
    ]
    .into_iter()
    .flatten()
    {
        assert!(w <= CAP, "{w:?} for {text:?}");
    }
    let _ = wait::parse_rfc3339(&text);
    let mut h = HeaderMap::new();
    for (i, part) in rest.split(|b| *b == b'\n').enumerate().take(3) {
        if let Ok(v) = HeaderValue::from_bytes(part) {
            let name = NAMES[(usize::from(*n) + i) % NAMES.len()];
            h.append(HeaderName::from_static(name), v);
        }
    }
    for w in [
        wait::from_headers_at(&h, now),
        wait::rate_limit_reset_at(&h, now),
    ]
    .into_iter()
    .flatten()
    {
        assert!(w <= CAP, "{w:?} for {h:?}");
    }
});
