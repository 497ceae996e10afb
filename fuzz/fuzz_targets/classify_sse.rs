//! `classify_sse_event` and `classify_sse_stream` on any bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_layers::classify::{classify_sse_event, classify_sse_stream, MAX_MESSAGE_CHARS};

fuzz_target!(|data: &[u8]| {
    let event = classify_sse_event(data);
    if !data.windows(5).any(|w| w == b"error") {
        assert!(event.is_none());
    }
    for e in event.iter().chain(classify_sse_stream(data).iter()) {
        assert_eq!(e.status(), e.code().status());
        assert!(!e.message().is_empty(), "empty message");
        assert!(e.message().chars().count() <= MAX_MESSAGE_CHARS);
    }
});
