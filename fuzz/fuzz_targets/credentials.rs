//! `extract_api_key` with `Authorization`, `x-api-key` and `api-key` values of any bytes, and
//! `mask_key`.
//!
//! Input: one byte choosing the accepted headers and the header names, then values separated
//! by `0x00`.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use llm_layers::auth::{extract_api_key, mask_key, AcceptedHeaders};

const NAMES: [&str; 3] = ["authorization", "x-api-key", "api-key"];

fuzz_target!(|data: &[u8]| {
    let [sel, rest @ ..] = data else {
        return;
    };
    let accepted = AcceptedHeaders::none()
        .bearer(sel & 1 != 0)
        .x_api_key(sel & 2 != 0)
        .api_key(sel & 4 != 0);
    let mut h = HeaderMap::new();
    let mut sent: Vec<Vec<u8>> = Vec::new();
    for (i, part) in rest.split(|b| *b == 0).enumerate().take(4) {
        if let Ok(v) = HeaderValue::from_bytes(part) {
            let name = NAMES[(usize::from(sel >> 3) + i) % 3];
            sent.push(part.to_vec());
            h.append(HeaderName::from_static(name), v);
        }
    }
    match extract_api_key(&h, accepted) {
        Ok(key) => {
            assert!(!key.is_empty() && key.iter().all(|b| (0x21..=0x7e).contains(b)));
            assert!(sent.iter().any(|s| s.windows(key.len()).any(|w| w == key)));
        }
        Err(e) => {
            // Every message is fixed text: nothing the client sent can reach it.
            let msg = e.to_string();
            assert!(
                msg.is_ascii() && !msg.bytes().any(|b| b.is_ascii_control()),
                "{msg:?}"
            );
            assert_eq!(e.message(), msg);
        }
    }
    let masked = mask_key(rest);
    if masked != "***" {
        assert!(masked.len() < rest.len());
    }
});
