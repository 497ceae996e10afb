//! Rate limiting per API key, client, route or model: requests, LLM tokens, and requests in
//! flight.
//!
//! # Why
//!
//! An LLM gateway has to share a provider's quota fairly between its callers, and a client has
//! to stay under the quota it was given. Counting requests is not enough: one request may ask
//! for 30 tokens or for 30 000. This layer keeps a GCRA token bucket (governor's) per key for
//! requests and one for tokens, charges each request its estimated prompt tokens plus its
//! `max_tokens` on admission, and corrects the charge from the usage the upstream reports
//! (in a JSON body or in a stream's events, in every dialect: see
//! [Usage in every dialect](#usage-in-every-dialect)) when the response body ends.
//!
//! # What it answers
//!
//! | situation | status | `code` | `x-should-retry` |
//! |---|---|---|---|
//! | a request or token bucket is empty | 429 | `rate_limit_exceeded`, with `retry-after` and `retry-after-ms` | `true` |
//! | the request's token cost is larger than the bucket | 429 | `rate_limit_exceeded` (`param: max_tokens`) | `false` |
//! | too many of the key's requests in flight | 429 | `concurrent_limit_exceeded` | `true` |
//! | the body could not be read to estimate tokens (over the body limit, or broken off) | 413 / 400 | `request_too_large` / `invalid_value` | `false` |
//!
//! # Bodies, errors and readiness
//!
//! The layer takes any request body `B: http_body::Body` (hyper's `Incoming`, axum's `Body`,
//! `Full<Bytes>`, a boxed body) and any response body, and asks neither for `From<Bytes>`.
//! Its inner service receives `Request<LayerBody<B>>` ([`LayerBody`](crate::body::LayerBody)):
//! the body untouched, or, when the layer read it, the same bytes again. It answers
//! `Response<RateLimitBody<ResBody>>`: the inner service's body, or the bytes of the layer's
//! own refusal. Its error type is the inner service's (`S::Error`).
//!
//! * **The body is read only when it must be**: for a token quota, or to key by model, and
//!   then only through the core's [`EnsureView`](crate::request::EnsureView), which reads
//!   nothing when an earlier layer left a [`RequestView`](crate::request::RequestView).
//!   Without a token quota the body is passed on as it came, and needs no bound but `Body`.
//!   Only a body that may be JSON is read: no `content-type`, `application/json` or a `+json`
//!   type. Another (a multipart upload to `/v1/audio/transcriptions`) passes unread, charged
//!   nothing at admission and then what its answer's `usage` reports; so does a body that says
//!   it is JSON and does not parse (handed on as the bytes read: the upstream, or a validation
//!   layer in front, refuses it).
//! * **Slow work before readiness.** [`RateLimit`]'s `poll_ready` is always ready and reserves
//!   nothing of the inner service. Each call takes a fresh clone of the inner service; its
//!   [`ResponseFuture`] reads the body (if it must), decides on admission, waits in
//!   [`OnLimit::Wait`], and only then drives its clone with `poll_ready` and calls it. A
//!   client that uploads slowly or waits for its bucket therefore holds no slot of a
//!   `ConcurrencyLimit` or `Buffer` inside the layer.
//! * **A `poll_ready` error is final**: it is returned as the call's error, the clone is not
//!   polled again, and the request's tokens are given back (it was never sent).
//! * **The common case is laid out flat.** A request decided at once, in memory, is carried by
//!   its future as itself, its admission and the inner service's clone; no `Arc` of the layer
//!   is taken for it. The rarer states (the body being read, a wait, a shared store's
//!   decision) live behind one box together with the layer's state they need: one allocation
//!   more on paths that already buffer a body, sleep or ask Redis.
//!
//! # Which limits a response reports
//!
//! The layer's figures are those of OpenAI's headers: `x-ratelimit-limit-requests`,
//! `x-ratelimit-remaining-requests`, `x-ratelimit-reset-requests`, and the `-tokens`
//! equivalents when a token quota applies. The limit is the bucket's burst, the remaining
//! count is what could be admitted right now, and the reset is the time until the bucket is
//! full again (`1s`, `6m0s`, `20ms`). When no quota of the key's own applies, the global
//! bucket is reported. Whenever a request or token quota applies, a response carries the
//! layer's figures exactly once, under one of two families of names:
//!
//! | response | standard `x-ratelimit-*` | `x-llm-layers-ratelimit-*` |
//! |---|---|---|
//! | the layer's own refusal | the layer's figures | — |
//! | a success from the inner service without `x-ratelimit-*` of its own | the layer's figures | — |
//! | a success from the inner service with `x-ratelimit-*` of its own | the upstream's, untouched | the layer's figures |
//! | an error from the inner service (an upstream 429, a 503, a timeout) | the upstream's, untouched, if any | the layer's figures |
//!
//! The rule: the standard names describe the limit behind that answer. An upstream's 429 keeps
//! the upstream's `x-ratelimit-remaining-requests: 0` and never reads "57 remaining" from the
//! gateway's own bucket; its headers are never overwritten or mixed with the layer's. Where
//! nothing else claims the standard names (a success from an upstream that sends none, such
//! as Anthropic's), clients pacing on them read the layer's. The layer's own figures are always
//! under [`OWN_REMAINING_REQUESTS`] and its siblings when the standard names are taken.
//!
//! Retrying after `retry-after-ms` succeeds if nothing else was admitted in between.
//!
//! # Keys, tiers and quotas
//!
//! Requests are keyed by [`BucketKey`]: the [`KeyIdentity`](crate::ext::KeyIdentity) an
//! authentication layer left in the extensions (default), a header, the client IP (with
//! trusted proxies and `x-forwarded-for`), the route, the model, or a closure of the request's
//! [`RequestHead`](crate::request::RequestHead) ([`BucketKey::custom`], the core's
//! [`KeyFn`](crate::request::KeyFn)). Requests without
//! a key share one anonymous bucket. A key's [`Limits`] are those of its tier
//! ([`RateLimitLayerBuilder::tier`]), else the defaults ([`RateLimitLayerBuilder::limits`]);
//! the key's own [`KeyLimits`](crate::ext::KeyLimits) override them. Optional
//! [global limits](RateLimitLayerBuilder::global) apply to all keys together.
//!
//! [`BucketKey::client_ip`] keys an IPv6 client by its /64 ([`BucketKey::ipv6_prefix`]) and an
//! IPv4-mapped IPv6 address as IPv4. [`BucketKey::model`] keys by the model the upstream serves:
//! the deployment of an Azure-style path (`/openai/deployments/{name}/...`), else the body's
//! `model` ([`RequestView::routed_model`](crate::request::RequestView::routed_model)). A key
//! longer than [`RateLimitLayerBuilder::max_key_len`] (256 bytes by default), such as a
//! client's 600 KB model name, is stored as its SHA-256: each key costs at most that much, and
//! distinct keys keep distinct buckets.
//!
//! A [`Quota`] says what it means: `Quota::per_minute(600).burst(20)` is 600 per minute, at
//! most 20 at once. A builder with a zero rate, a missing or zero burst, a bucket that would
//! take more than about 73 years to refill (`per_minute(1).burst(u32::MAX)`), a zero
//! concurrency, an IPv6 prefix over 128 or an invalid proxy address fails with a
//! [`ConfigError`] that names the field. Whatever passed the builder decides every request
//! without overflow or panic.
//!
//! # Token charging and its correction
//!
//! A request under a token quota is charged [`RequestView::token_cost`](crate::request::RequestView::token_cost)
//! at admission (the body is read once with [`EnsureView`](crate::request::EnsureView), only
//! when a token quota applies). When the response body ends, the `usage` it reported replaces
//! the estimate. governor's buckets cannot give cells back, so the layer keeps each bucket's
//! state (its theoretical arrival time, TAT) in its own store and corrects it directly: an
//! overrun of `d` tokens moves the TAT `d` emission intervals later (later requests wait
//! longer; the bucket may go below empty), unused tokens `u` move it `u` intervals earlier, but
//! never before now (a bucket is never fuller than full). The correction is therefore exact:
//! after it, the bucket is as if the request had been charged its real usage at admission,
//! except that a refund cannot raise a bucket that has meanwhile refilled above full. Until a
//! response ends, its estimate stands: at any moment, admitted tokens exceed
//! `burst + rate·T` over any window `T` by at most the overruns of the responses still
//! streaming. The same cells are given back when a request passes one bucket and is then
//! refused by another.
//!
//! **Which answers pay.** Tokens are kept when the upstream may have worked, and given back
//! when it refused before working:
//!
//! | the answer | the charge |
//! |---|---|
//! | a success that reports `usage` | the usage |
//! | a success without `usage`, or too large to read (over 1 MiB of JSON) | the estimate stays |
//! | a stream cut midway (an error frame) or dropped before its end | the estimate stays, or the `usage` already reported if that is more |
//! | a 5xx (the upstream may have generated, then failed), `408`, a `504 timeout` after retries | the estimate stays |
//! | an `Err` from the inner service, or the response future dropped before the head (the layer cannot see whether the request was sent) | the estimate stays |
//! | a `poll_ready` error of the inner service (the request was never sent) | refunded in full |
//! | a 4xx other than 408 (400, 401, 403, 404, 413, 422, 429 ...), a 3xx | refunded in full |
//! | a refusal marked [`RefusedLocally`](crate::ext::RefusedLocally) (an open circuit inside this layer) | refunded in full |
//!
//! A `usage` figure counts when it is a non-negative number (a fraction is rounded up); one
//! above 2^24 tokens (16,777,216, eight times the largest context windows) is read as 2^24. Negative numbers, strings and `null` count as no usage.
//! An overrun settled after a sweep forgot the key (its bucket was full) enters the key again
//! with the debt. A bucket's debt never reaches more than about 73 years.
//!
//! # Usage in every dialect
//!
//! | dialect | plain body | stream |
//! |---|---|---|
//! | OpenAI chat | `usage.total_tokens` (else prompt + completion) | the `usage` chunk (`stream_options.include_usage`) |
//! | OpenAI Responses | `usage.total_tokens` (else input + output) | `response.completed`: `response.usage` |
//! | Anthropic Messages | `usage`: input + cache writes + cache reads + output | `message_start.message.usage`, then the cumulative `message_delta.usage.output_tokens` |
//! | Gemini | `usageMetadata.totalTokenCount` (else prompt + candidates + thoughts + tool-use prompt) | each chunk's `usageMetadata` (SSE or the JSON array form) |
//! | vLLM, llama.cpp, Ollama `/v1` | OpenAI's `usage` | OpenAI's `usage` chunk(s) |
//! | Ollama native | `prompt_eval_count + eval_count` | the NDJSON line with them |
//!
//! Design rules: each figure's last report wins (stream figures are cumulative), nothing is
//! summed across events, and a reported total wins over the sum of its parts. The
//! `content-type` decides the reading: `text/event-stream` (SSE `data:` lines),
//! `application/x-ndjson` / `application/jsonl` (a document a line), else one JSON document.
//! The stream passes through uncopied; a line that does not name `usage`, `Usage` or
//! `eval_count` (or only as `"usage": null`) is not parsed, one that may is read by a typed
//! partial parse that skips everything else in place (no `serde_json::Value`, no copy); only a
//! `data:` line cut by a frame boundary is copied aside, at most 64 KiB. Every slice of a
//! non-contiguous buffer is read.
//!
//! # Concurrency
//!
//! With a concurrency cap, the slot is held by the response body and released when the body
//! ends or is dropped (or when the response future is dropped), not when the response head
//! arrives: a stream counts as in flight while it streams.
//!
//! # Modes
//!
//! [`OnLimit::Reject`] answers at once. [`OnLimit::Wait`] sleeps (`tokio::time::sleep`, inside the
//! response future, before the inner service is asked to be ready) until the request conforms
//! if that takes at most the given time, and answers `429` otherwise. Concurrency refusals are
//! never waited for.
//!
//! # Time and memory
//!
//! The buckets read `tokio::time::Instant`, so `tokio::time::pause` and `advance` drive them
//! exactly in tests. A key whose buckets are full again is indistinguishable from a new key,
//! so forgetting it changes no decision. The map is sharded; a new key that finds its shard
//! grown to twice the entries its last eviction kept (plus 64) first drops the shard's idle
//! keys, so eviction costs O(1) amortized per new key and a shard holds at most about twice
//! its live keys. Besides, idle keys are swept from every shard, and the memory given back,
//! at most once per sweep interval and checked every N admissions on the request path
//! ([`RateLimitLayerBuilder::sweep`]), or on demand with [`RateLimitHandle::sweep`].
//! [`RateLimitHandle::tracked_keys`] counts the entries held.
//!
//! An entry is 32 bytes (the key and its arrival time, in a `hashbrown` table that does not
//! keep the hash); 10^6 client addresses take about 67 MiB, 10^6 API keys with their own
//! 20-byte ids about 110 MiB.
//!
//! Keys are hashed once per request, with std's randomly seeded SipHash-1-3: they are chosen by
//! clients (API key ids, addresses, model names), and a faster seeded hash does not claim to
//! resist an attacker who can time the map. The admitted path of a known key (an API key, an
//! address, a tier, a key's own limits, concurrency caps) allocates nothing: the key is shared
//! or inline, and the `x-ratelimit-*` values are written into a per-thread 4 KiB block and cut
//! from it as shared bytes; the block is used again from its start once the answers whose
//! values it holds are dropped (a new block only while about 250 answers' heads are all still
//! held). A key read from a header, the route or the model costs one copy of it.
//!
//! # A store shared by replicas (feature `redis`)
//!
//! By default the buckets and in-flight counts live in this process's memory.
//! `RateLimitLayerBuilder::redis` with a `RedisBackend` keeps them in one Redis or Valkey
//! server instead, so that every replica pointed at it enforces the same quotas: the same
//! keys, tiers, headers, `retry-after` precision and keep/refund rules, one round trip per
//! admission (a Lua script on the server's clock), one call per token correction and per
//! release of in-flight slots, keys with TTLs, and a failure policy (fail open to a local
//! share of the quotas, or fail closed with `503 service_unavailable`). The rules are written
//! on `RedisBackend` and in the README. The in-memory path is the
//! one it always was: the only cost of the feature there is one branch per request.
//!
//! # Logs
//!
//! Each refusal is a `debug` event (target `llm_layers::rate_limit`) with the key kind, the
//! code and the wait. The key itself is written with `Debug` escaping (a model name with a
//! newline cannot forge a log line), cut to 64 bytes; header and custom keys, which may be
//! credentials, are never written.
//!
//! # Example
//!
//! ```
//! use axum::{body::Body, routing::post, Router};
//! use http::{Request, StatusCode};
//! use llm_layers::ext::{KeyIdentity, KeyLimits};
//! use llm_layers::rate_limit::{BucketKey, Limits, Quota, RateLimitLayer};
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let limit = RateLimitLayer::builder()
//!     .key_by(BucketKey::api_key())
//!     .tier("free", Limits::new().requests(Quota::per_minute(2).burst(2)))
//!     .tier("pro", Limits::new().requests(Quota::per_minute(600).burst(60)).concurrency(8))
//!     .limits(Limits::new().requests(Quota::per_minute(1).burst(1)))
//!     .build()?;
//! let handle = limit.handle();
//!
//! let app = Router::new()
//!     .route("/v1/chat/completions", post(|| async { "{}" }))
//!     .layer(limit);
//!
//! let call = |tier: &'static str| {
//!     let mut req = Request::post("/v1/chat/completions").body(Body::empty()).unwrap();
//!     // An authentication layer would insert this.
//!     req.extensions_mut().insert(KeyIdentity::new(format!("key-{tier}")).with_tier(tier));
//!     app.clone().oneshot(req)
//! };
//! assert_eq!(call("free").await?.status(), StatusCode::OK);
//! let res = call("free").await?;
//! // The handler sends no `x-ratelimit-*` of its own: the layer's figures take those names.
//! assert_eq!(res.headers()["x-ratelimit-remaining-requests"], "0");
//! let res = call("free").await?;
//! assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
//! assert_eq!(res.headers()["retry-after"], "30");
//! assert_eq!(call("pro").await?.status(), StatusCode::OK);
//! assert_eq!(handle.tracked_keys(), 2);
//! # Ok(())
//! # }
//! ```

mod body;
mod config;
mod future;
mod layer;
#[cfg(feature = "redis")]
mod redis;
mod service;
mod shared;
mod snapshot;
mod store;

use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;

#[cfg(feature = "redis")]
pub use self::redis::{FailurePolicy, RedisBackend, DEFAULT_TIMEOUT as DEFAULT_REDIS_TIMEOUT};
pub use body::RateLimitBody;
pub use config::{BucketKey, ConfigError, Limits, OnLimit, Quota, RateLimitLayerBuilder};
pub use future::ResponseFuture;
pub use layer::RateLimitLayer;
pub use service::RateLimit;
pub use snapshot::{KeySnapshot, QuotaSnapshot, QuotaUnit};

/// `x-ratelimit-limit-requests`: the request bucket's size.
pub const LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
/// `x-ratelimit-remaining-requests`: requests that would be admitted now.
pub const REMAINING_REQUESTS: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-requests");
/// `x-ratelimit-reset-requests`: the time until the request bucket is full.
pub const RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
/// `x-ratelimit-limit-tokens`: the token bucket's size.
pub const LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
/// `x-ratelimit-remaining-tokens`: tokens that could be charged now.
pub const REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
/// `x-ratelimit-reset-tokens`: the time until the token bucket is full.
pub const RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");

/// `x-llm-layers-ratelimit-limit-requests`: the layer's request bucket size, on an answer
/// whose standard `x-ratelimit-*` names belong to the upstream (see the [module docs](self)).
pub const OWN_LIMIT_REQUESTS: HeaderName =
    HeaderName::from_static("x-llm-layers-ratelimit-limit-requests");
/// `x-llm-layers-ratelimit-remaining-requests`: the layer's own remaining requests.
pub const OWN_REMAINING_REQUESTS: HeaderName =
    HeaderName::from_static("x-llm-layers-ratelimit-remaining-requests");
/// `x-llm-layers-ratelimit-reset-requests`: the time until the layer's request bucket is full.
pub const OWN_RESET_REQUESTS: HeaderName =
    HeaderName::from_static("x-llm-layers-ratelimit-reset-requests");
/// `x-llm-layers-ratelimit-limit-tokens`: the layer's token bucket size.
pub const OWN_LIMIT_TOKENS: HeaderName =
    HeaderName::from_static("x-llm-layers-ratelimit-limit-tokens");
/// `x-llm-layers-ratelimit-remaining-tokens`: the layer's own remaining tokens.
pub const OWN_REMAINING_TOKENS: HeaderName =
    HeaderName::from_static("x-llm-layers-ratelimit-remaining-tokens");
/// `x-llm-layers-ratelimit-reset-tokens`: the time until the layer's token bucket is full.
pub const OWN_RESET_TOKENS: HeaderName =
    HeaderName::from_static("x-llm-layers-ratelimit-reset-tokens");

/// Observes and maintains a layer's shared state.
#[derive(Clone)]
pub struct RateLimitHandle {
    shared: Arc<shared::Shared>,
}

impl RateLimitHandle {
    /// The bucket entries held: one per key and quota it is under (a key with both a request
    /// and a token quota counts twice), plus the global buckets' single entries once used.
    pub fn tracked_keys(&self) -> usize {
        self.shared.tracked_keys()
    }

    /// Forgets every key whose buckets are full again now, and gives the memory back. The
    /// layer also does this by itself on its sweep schedule.
    pub fn sweep(&self) {
        self.shared.sweep();
    }
}

impl std::fmt::Debug for RateLimitHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitHandle")
            .field("tracked_keys", &self.tracked_keys())
            .finish()
    }
}

/// A duration the way OpenAI writes it in `x-ratelimit-reset-*`: `20ms`, `1s`, `1.5s`,
/// `6m0s`, `1h2m3s`. Rounded up to the millisecond.
pub fn fmt_duration(d: Duration) -> String {
    let mut out = String::with_capacity(16);
    write_duration(&mut out, d);
    out
}

/// Where [`write_duration`] and [`write_u64`] put their ASCII bytes: a `String` for messages,
/// the header block for the `x-ratelimit-*` values (bytes copied as they are, no UTF-8 check
/// and no formatting machinery).
pub(crate) trait Ascii {
    /// Appends `bytes`, all ASCII.
    fn put(&mut self, bytes: &[u8]);

    /// Appends `n` in decimal.
    fn put_u64(&mut self, mut n: u64) {
        let mut buf = [0u8; 20];
        let mut i = buf.len();
        loop {
            i -= 1;
            buf[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.put(&buf[i..]);
    }
}

/// A few header values' text on the stack, written byte by byte (digits in place), then copied
/// into the header block in one go. Text past its room is dropped (the values written are far
/// shorter: two `u32`s and a duration).
pub(crate) struct Text {
    buf: [u8; Text::ROOM],
    len: usize,
}

impl Text {
    const ROOM: usize = 64;

    pub(crate) fn new() -> Self {
        Text {
            buf: [0; Text::ROOM],
            len: 0,
        }
    }

    /// The text written so far.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Its length so far.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Ascii for Text {
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if let Some(slot) = self.buf.get_mut(self.len) {
                *slot = b;
                self.len += 1;
            }
        }
    }

    #[inline]
    fn put_u64(&mut self, n: u64) {
        let digits = n.checked_ilog10().unwrap_or(0) as usize + 1;
        let Some(out) = self.buf.get_mut(self.len..self.len + digits) else {
            return;
        };
        let mut n = n;
        for slot in out.iter_mut().rev() {
            *slot = b'0' + (n % 10) as u8;
            n /= 10;
        }
        self.len += digits;
    }
}

impl Ascii for String {
    fn put(&mut self, bytes: &[u8]) {
        // ASCII bytes are their own chars.
        self.extend(bytes.iter().map(|&b| char::from(b)));
    }
}

impl Ascii for bytes::BytesMut {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// Writes `d` as [`fmt_duration`] does, into any [`Ascii`] sink (the layer's header values are
/// written straight into their block).
pub(crate) fn write_duration(out: &mut impl Ascii, d: Duration) {
    let ns = d.as_nanos();
    let ms = match u64::try_from(ns) {
        Ok(ns) => u128::from(ns.div_ceil(1_000_000)),
        Err(_) => ns.div_ceil(1_000_000),
    };
    if ms == 0 {
        return out.put(b"0s");
    }
    if ms < 1000 {
        write_uint(out, ms);
        return out.put(b"ms");
    }
    // In 64-bit arithmetic when it fits (a `u128` division is a call).
    let (h, rest) = match u64::try_from(ms) {
        Ok(ms) => (u128::from(ms / 3_600_000), ms % 3_600_000),
        Err(_) => (ms / 3_600_000, (ms % 3_600_000) as u64),
    };
    let (m, rest) = (rest / 60_000, rest % 60_000);
    let (s, frac) = (rest / 1000, rest % 1000);
    if h > 0 {
        write_uint(out, h);
        out.put(b"h");
        write_u64(out, m);
        out.put(b"m");
    } else if m > 0 {
        write_u64(out, m);
        out.put(b"m");
    }
    write_u64(out, s);
    if frac > 0 {
        let (mut frac, mut digits) = (frac, 3);
        while frac % 10 == 0 {
            frac /= 10;
            digits -= 1;
        }
        let mut buf = [b'0'; 4];
        buf[0] = b'.';
        for i in (1..=digits).rev() {
            buf[i] = b'0' + (frac % 10) as u8;
            frac /= 10;
        }
        out.put(&buf[..=digits]);
    }
    out.put(b"s");
}

/// Writes `n` in decimal.
pub(crate) fn write_u64(out: &mut impl Ascii, n: u64) {
    out.put_u64(n);
}

fn write_uint(out: &mut impl Ascii, n: u128) {
    // In 64-bit arithmetic when it fits (a `u128` division is a call).
    if let Ok(n) = u64::try_from(n) {
        return out.put_u64(n);
    }
    let mut buf = [0u8; 40];
    let mut i = buf.len();
    let mut n = n;
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.put(&buf[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_durations() {
        assert_eq!(fmt_duration(Duration::ZERO), "0s");
        assert_eq!(fmt_duration(Duration::from_micros(1)), "1ms");
        assert_eq!(fmt_duration(Duration::from_millis(20)), "20ms");
        assert_eq!(fmt_duration(Duration::from_secs(1)), "1s");
        assert_eq!(fmt_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(fmt_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(fmt_duration(Duration::from_millis(90_250)), "1m30.25s");
        assert_eq!(fmt_duration(Duration::from_secs(3723)), "1h2m3s");
        assert_eq!(fmt_duration(Duration::from_millis(3_723_005)), "1h2m3.005s");
        assert_eq!(fmt_duration(Duration::from_millis(60_050)), "1m0.05s");
        assert_eq!(fmt_duration(Duration::from_nanos(999_999_999)), "1s");
        assert_eq!(
            fmt_duration(Duration::from_secs(u64::MAX)),
            format!("{}h0m15s", u64::MAX / 3600)
        );
    }

    /// The header values are written on the stack, digits in place: the same text as the
    /// messages' `String`s, and a status's three longest values fit its room.
    #[test]
    fn header_text_is_the_messages_text() {
        let numbers = [
            0,
            1,
            9,
            10,
            99,
            100,
            999_999,
            1_000_000,
            u64::from(u32::MAX),
            u64::MAX,
        ];
        for n in numbers {
            let mut text = Text::new();
            write_u64(&mut text, n);
            assert_eq!(text.as_bytes(), n.to_string().as_bytes(), "{n}");
        }
        let mut ns = 1u64;
        while ns < u64::MAX / 7 {
            for d in [ns, ns + 1, ns * 3 + 999_999] {
                let d = Duration::from_nanos(d);
                let mut text = Text::new();
                write_duration(&mut text, d);
                assert_eq!(text.as_bytes(), fmt_duration(d).as_bytes(), "{d:?}");
            }
            ns *= 7;
        }
        let mut text = Text::new();
        write_u64(&mut text, u64::from(u32::MAX));
        write_u64(&mut text, u64::from(u32::MAX));
        write_duration(&mut text, Duration::from_nanos(u64::MAX));
        assert_eq!(
            text.as_bytes(),
            format!(
                "{0}{0}{1}",
                u32::MAX,
                fmt_duration(Duration::from_nanos(u64::MAX))
            )
            .as_bytes()
        );
        // Past its room, text is dropped, never written out of bounds.
        let mut text = Text::new();
        for _ in 0..10 {
            write_u64(&mut text, u64::MAX);
        }
        assert!(text.len() <= Text::ROOM);
    }
}
