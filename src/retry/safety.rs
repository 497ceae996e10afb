//! Which requests may be sent more than once.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use http::header::{HeaderName, HeaderValue};
use http::Method;

/// `Idempotency-Key`: a request carrying one may be sent more than once.
pub(crate) const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The default rule of which requests the layer may send more than once: idempotent methods
/// (`GET`, `HEAD`, `OPTIONS`, `TRACE`, `PUT`, `DELETE`), and `POST`s to the endpoints that
/// generate an answer without creating anything that a second call would duplicate:
///
/// - OpenAI-style `/chat/completions`, `/completions`, `/embeddings`, `/responses`,
///   `/moderations` (on any prefix, so Azure's `/openai/deployments/{name}/...` too);
/// - Anthropic `/v1/messages` and `/v1/messages/count_tokens`;
/// - Gemini `:generateContent`, `:streamGenerateContent`, `:countTokens`, `:embedContent`,
///   `:batchEmbedContents`.
///
/// Everything else is sent once: file uploads, fine-tuning jobs, batches (OpenAI
/// `/v1/batches`, Anthropic `/v1/messages/batches`, Gemini `:batchGenerateContent`),
/// assistants, threads, runs, vector stores, and `PATCH` anywhere. A trailing `/` is ignored.
///
/// `path` is matched as given: pass it as an upstream would route it
/// ([`normalize_path`](crate::request::normalize_path)), which is how the layer calls this
/// rule and the predicate of [`retry_requests`](super::RetryLayerBuilder::retry_requests).
///
/// ```
/// use http::Method;
/// use llm_layers::retry::safe_to_retry;
///
/// assert!(safe_to_retry(&Method::POST, "/v1/chat/completions"));
/// assert!(safe_to_retry(&Method::POST, "/v1beta/models/gemini-2.0-flash:generateContent"));
/// assert!(safe_to_retry(&Method::GET, "/v1/files/file-abc"));
/// assert!(!safe_to_retry(&Method::POST, "/v1/files"));
/// assert!(!safe_to_retry(&Method::POST, "/v1/fine_tuning/jobs"));
/// ```
pub fn safe_to_retry(method: &Method, path: &str) -> bool {
    if idempotent(method) {
        return true;
    }
    *method == Method::POST && generation_path(path)
}

/// Idempotent by RFC 9110.
pub(crate) fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

pub(crate) fn generation_path(path: &str) -> bool {
    let path = path.trim_end_matches('/');
    const SUFFIXES: [&str; 7] = [
        "/chat/completions",
        "/completions",
        "/embeddings",
        "/responses",
        "/moderations",
        "/v1/messages",
        "/v1/messages/count_tokens",
    ];
    if SUFFIXES.iter().any(|s| path.ends_with(s)) {
        return true;
    }
    let last = path.rsplit('/').next().unwrap_or("");
    match last.rsplit_once(':') {
        Some((model, verb)) if !model.is_empty() => matches!(
            verb,
            "generateContent"
                | "streamGenerateContent"
                | "countTokens"
                | "embedContent"
                | "batchEmbedContents"
        ),
        _ => false,
    }
}

/// A fresh `Idempotency-Key`: a version-4 UUID from SipHash, under a random key drawn once per
/// process, of a process-wide counter. Unique within the process (the counter never repeats)
/// and, with 122 random bits, across processes.
pub(crate) fn generate_key() -> HeaderValue {
    static KEYS: OnceLock<RandomState> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let keys = KEYS.get_or_init(RandomState::new);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let half = |lane: u8| {
        let mut h = keys.build_hasher();
        h.write_u64(n);
        h.write_u8(lane);
        h.finish()
    };
    let mut bits = (u128::from(half(0)) << 64) | u128::from(half(1));
    // Version 4, variant 10xx.
    bits = (bits & !(0xf << 76)) | (0x4 << 76);
    bits = (bits & !(0x3 << 62)) | (0x2 << 62);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 36];
    let mut nibble = 32;
    for (i, slot) in out.iter_mut().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            *slot = b'-';
        } else {
            nibble -= 1;
            *slot = HEX[((bits >> (nibble * 4)) & 0xf) as usize];
        }
    }
    HeaderValue::from_bytes(&out).expect("hex digits and dashes are a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_version_4_uuids_and_differ() {
        let a = generate_key();
        let b = generate_key();
        assert_ne!(a, b);
        let s = a.to_str().unwrap();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4", "{s}");
        assert!(matches!(&s[19..20], "8" | "9" | "a" | "b"), "{s}");
        assert_eq!(s.matches('-').count(), 4);
    }

    #[test]
    fn gemini_verbs_need_a_model() {
        assert!(generation_path("/v1beta/models/gemini-pro:generateContent"));
        assert!(!generation_path("/v1beta/:generateContent"));
        assert!(!generation_path(
            "/v1beta/models/gemini-pro:batchGenerateContent"
        ));
        assert!(generation_path("/v1/chat/completions/"));
    }
}
