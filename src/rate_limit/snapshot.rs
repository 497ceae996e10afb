//! What the rate limiter holds, per key: remaining requests and tokens, the time until each
//! bucket is full again, and the requests in flight ([`RateLimitHandle::key`],
//! [`RateLimitHandle::keys`]).
//!
//! ```
//! use llm_layers::rate_limit::{BucketKey, Limits, Quota, RateLimitLayer};
//!
//! let layer = RateLimitLayer::builder()
//!     .key_by(BucketKey::route())
//!     .limits(Limits::new().requests(Quota::per_minute(60).burst(10)))
//!     .build()
//!     .unwrap();
//! let handle = layer.handle();
//! // No key has spent anything yet: nothing is held.
//! assert!(handle.keys(100).is_empty());
//! assert_eq!(handle.key("/v1/chat/completions"), None);
//! ```
//!
//! # Rules
//!
//! - **Only what is held.** A key whose buckets are all full holds no state (the limiter
//!   forgets it), so it is not listed and [`key`](RateLimitHandle::key) answers `None`: its
//!   whole quota remains. A listed key shows every bucket it has spent from (a tier's or its
//!   own quota, requests and tokens) and its requests in flight.
//! - **No secret.** Keys are shown by their id ([`KeySnapshot::key`]): an API key's id, a
//!   route, a model, a client address. Header and custom keys (which may be credentials) and
//!   keys longer than the layer's `max_key_len` are shown as `sha256:` and 16 hex digits of
//!   their digest, never as themselves. The anonymous bucket is `<anonymous>`, the global one
//!   `<global>`.
//! - **Admissions are not blocked.** A snapshot copies each shard's entries under that
//!   shard's read lock (which admissions of known keys share; a new key waits for one shard's
//!   copy), then computes the figures with no lock held. It reads the clock without touching
//!   the reading an admission in progress uses.
//! - **Redis.** With a [`RedisBackend`](super::RedisBackend), the snapshot is this replica's
//!   local view only: the buckets of the local fallback (empty while Redis answers) and this
//!   replica's requests in flight. The shared figures live in Redis.

use std::collections::BTreeMap;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::store::RateKey;
use super::{Quota, RateLimitHandle};

/// What a quota counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuotaUnit {
    /// Requests.
    Requests,
    /// LLM tokens.
    Tokens,
}

impl QuotaUnit {
    /// `"requests"` or `"tokens"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            QuotaUnit::Requests => "requests",
            QuotaUnit::Tokens => "tokens",
        }
    }
}

/// One bucket of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct QuotaSnapshot {
    /// What it counts.
    pub unit: QuotaUnit,
    /// Whether it is the layer's global bucket.
    pub global: bool,
    /// The quota.
    pub quota: Quota,
    /// The bucket's size (its burst), as in `x-ratelimit-limit-*`.
    pub limit: u32,
    /// What could be admitted now, as in `x-ratelimit-remaining-*`.
    pub remaining: u32,
    /// The time until the bucket is full again, as in `x-ratelimit-reset-*`.
    pub reset: Duration,
}

/// One key's state.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeySnapshot {
    /// The key's id, never a secret (see the module documentation).
    pub key: String,
    /// Its buckets that are not full, requests before tokens.
    pub quotas: Vec<QuotaSnapshot>,
    /// Its requests in flight (counted only under a concurrency cap).
    pub in_flight: u32,
}

/// How a key is shown.
fn key_id(key: &RateKey, hidden: bool) -> String {
    fn hex(bytes: &[u8]) -> String {
        let mut out = String::with_capacity(7 + 16);
        out.push_str("sha256:");
        for b in &bytes[..8] {
            out.push_str(&format!("{b:02x}"));
        }
        out
    }
    match key {
        RateKey::Anonymous => "<anonymous>".to_owned(),
        RateKey::Global => "<global>".to_owned(),
        RateKey::Ip(ip) => ip.to_string(),
        RateKey::Digest(d) => hex(&d[..]),
        RateKey::Str(s) if hidden => hex(&Sha256::digest(s.as_bytes())),
        RateKey::Str(s) => s.to_string(),
    }
}

impl RateLimitHandle {
    /// Whether both handles read the same buckets (the same layer, or clones of it).
    pub fn same_as(&self, other: &RateLimitHandle) -> bool {
        std::sync::Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// The state of one key: `key` as requests are keyed (an API key's id, a route, a model, a
    /// header's value) or as [`keys`](Self::keys) shows it (`sha256:…`, an address,
    /// `<global>`). `None` when the limiter holds nothing for it: its whole quota remains.
    pub fn key(&self, key: &str) -> Option<KeySnapshot> {
        let shared = &self.shared;
        let raw = shared.key_of_str(key);
        let found = self.snapshot_of(&raw);
        if found.is_some() {
            return found;
        }
        // Not a raw key: a shown id (a digest, an address, `<global>`), found by a scan.
        self.keys(usize::MAX).into_iter().find(|k| k.key == key)
    }

    fn snapshot_of(&self, raw: &RateKey) -> Option<KeySnapshot> {
        let shared = &self.shared;
        let mut quotas = Vec::new();
        for (tokens, global, bucket) in shared.snapshot_buckets() {
            let at = if global { &RateKey::Global } else { raw };
            if global != matches!(raw, RateKey::Global) {
                continue;
            }
            if let Some(tat) = bucket.arrival(at) {
                push(&mut quotas, tokens, global, &bucket, tat);
            }
        }
        let in_flight = shared.inflight().count(raw);
        if quotas.is_empty() && in_flight == 0 {
            return None;
        }
        quotas.sort_by_key(|q| (q.unit == QuotaUnit::Tokens, q.global));
        Some(KeySnapshot {
            key: key_id(raw, shared.hides_keys()),
            quotas,
            in_flight,
        })
    }

    /// Every key the limiter holds state for, sorted by id, at most `limit` of them (the
    /// first in that order). Its cost grows with the number of keys held (a copy of each
    /// shard, then a sort); admissions go on meanwhile.
    pub fn keys(&self, limit: usize) -> Vec<KeySnapshot> {
        let shared = &self.shared;
        let hidden = shared.hides_keys();
        let mut by_key: BTreeMap<String, KeySnapshot> = BTreeMap::new();
        let mut entries = Vec::new();
        for (tokens, global, bucket) in shared.snapshot_buckets() {
            entries.clear();
            bucket.entries(&mut entries);
            for (key, tat) in entries.drain(..) {
                let mut quotas = Vec::new();
                push(&mut quotas, tokens, global, &bucket, tat);
                if quotas.is_empty() {
                    continue;
                }
                by_key
                    .entry(key_id(&key, hidden))
                    .or_insert_with_key(|id| KeySnapshot {
                        key: id.clone(),
                        quotas: Vec::new(),
                        in_flight: 0,
                    })
                    .quotas
                    .extend(quotas);
            }
        }
        let mut flights = Vec::new();
        shared.inflight().entries(&mut flights);
        for (key, n) in flights {
            by_key
                .entry(key_id(&key, hidden))
                .or_insert_with_key(|id| KeySnapshot {
                    key: id.clone(),
                    quotas: Vec::new(),
                    in_flight: 0,
                })
                .in_flight = n;
        }
        by_key
            .into_values()
            .take(limit)
            .map(|mut k| {
                k.quotas
                    .sort_by_key(|q| (q.unit == QuotaUnit::Tokens, q.global));
                k
            })
            .collect()
    }
}

/// The bucket's figures for an arrival time, when it is not full.
fn push(
    out: &mut Vec<QuotaSnapshot>,
    tokens: bool,
    global: bool,
    bucket: &super::store::Bucket,
    tat: u64,
) {
    let status = bucket.status_now(tat);
    if status.reset_ns == 0 {
        return;
    }
    out.push(QuotaSnapshot {
        unit: if tokens {
            QuotaUnit::Tokens
        } else {
            QuotaUnit::Requests
        },
        global,
        quota: bucket.quota(),
        limit: status.limit,
        remaining: status.remaining,
        reset: status.reset(),
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ext::KeyIdentity;
    use crate::rate_limit::{BucketKey, Limits, RateLimitLayer};

    type Res = http::Response<super::super::RateLimitBody<http_body_util::Empty<bytes::Bytes>>>;

    /// Sends `n` copies of `head` through the layer; returns the answers (their bodies hold
    /// any concurrency slot).
    async fn admit(layer: &RateLimitLayer, head: http::Request<()>, n: usize) -> Vec<Res> {
        use tower::{Layer, ServiceExt};
        let svc = layer.layer(tower::service_fn(|_req| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<
                bytes::Bytes,
            >::new()))
        }));
        let mut out = Vec::new();
        for _ in 0..n {
            let (parts, ()) = head.clone().into_parts();
            let req =
                http::Request::from_parts(parts, http_body_util::Empty::<bytes::Bytes>::new());
            let res = svc.clone().oneshot(req).await.unwrap();
            assert_eq!(res.status(), http::StatusCode::OK);
            out.push(res);
        }
        out
    }

    fn with_id(id: &str) -> http::Request<()> {
        let mut req = http::Request::new(());
        req.extensions_mut().insert(KeyIdentity::new(id));
        req
    }

    #[tokio::test(start_paused = true)]
    async fn keys_show_what_they_spent_and_when_it_is_back() {
        let layer = RateLimitLayer::builder()
            .limits(Limits::new().requests(Quota::per_minute(60).burst(10)))
            .build()
            .unwrap();
        let h = layer.handle();
        admit(&layer, with_id("team-a"), 4).await;
        admit(&layer, with_id("team-b"), 1).await;
        let keys = h.keys(10);
        let ids: Vec<&str> = keys.iter().map(|k| &*k.key).collect();
        assert_eq!(ids, ["team-a", "team-b"]);
        let a = &keys[0].quotas[0];
        assert_eq!((a.unit, a.limit, a.remaining), (QuotaUnit::Requests, 10, 6));
        assert_eq!(a.reset, Duration::from_secs(4));
        assert_eq!(h.key("team-a"), Some(keys[0].clone()));
        assert_eq!(h.keys(1).len(), 1);
        // Time refills the bucket: one more cell, one second less.
        tokio::time::advance(Duration::from_secs(1)).await;
        let a = h.key("team-a").unwrap().quotas[0];
        assert_eq!((a.remaining, a.reset), (7, Duration::from_secs(3)));
        // Full again: nothing held.
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(h.key("team-a"), None);
        assert!(h.keys(10).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn header_keys_are_shown_by_their_digest() {
        let layer = RateLimitLayer::builder()
            .key_by(BucketKey::header(http::HeaderName::from_static("x-user")))
            .limits(Limits::new().requests(Quota::per_minute(60).burst(10)))
            .build()
            .unwrap();
        let mut req = http::Request::new(());
        req.headers_mut()
            .insert("x-user", http::HeaderValue::from_static("secret-token"));
        admit(&layer, req, 2).await;
        let h = layer.handle();
        let keys = h.keys(10);
        assert_eq!(keys.len(), 1);
        assert!(keys[0].key.starts_with("sha256:"), "{}", keys[0].key);
        assert!(!format!("{keys:?}").contains("secret-token"));
        // Found by its raw value or by the id shown.
        assert_eq!(h.key("secret-token"), Some(keys[0].clone()));
        assert_eq!(h.key(&keys[0].key), Some(keys[0].clone()));
    }

    #[tokio::test(start_paused = true)]
    async fn requests_in_flight_and_the_global_bucket_are_listed() {
        let layer = RateLimitLayer::builder()
            .limits(Limits::new().concurrency(4))
            .global(Limits::new().requests(Quota::per_second(10).burst(20)))
            .build()
            .unwrap();
        let held = admit(&layer, with_id("k"), 3).await;
        let h = layer.handle();
        let keys = h.keys(10);
        let ids: Vec<&str> = keys.iter().map(|k| &*k.key).collect();
        assert_eq!(ids, ["<global>", "k"]);
        let g = keys[0].quotas[0];
        assert!(g.global);
        assert_eq!((g.limit, g.remaining), (20, 17));
        assert_eq!(keys[1].in_flight, 3);
        assert!(keys[1].quotas.is_empty());
        assert_eq!(h.key("<global>"), Some(keys[0].clone()));
        drop(held);
        assert_eq!(h.key("k"), None);
    }
}
