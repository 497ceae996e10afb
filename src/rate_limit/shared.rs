//! The state every clone of the layer shares, and the admission decision.

use std::cell::Cell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use governor::clock::Clock;
use http::{HeaderMap, HeaderName};

use crate::error::{ApiError, ErrorCode};
use crate::ext::KeyIdentity;
use crate::request::{RequestHead, RequestView, TokenEstimator};

use super::config::{Cidr, KeyKind, Limits, OnLimit, Quota, RateLimitLayerBuilder};
use super::store::{Bucket, Inflight, RateKey, Status, Take, TokioClock};
use super::{fmt_duration, write_duration, write_u64};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Unit {
    Requests,
    Tokens,
}

/// Limits with their buckets.
#[derive(Clone, Default)]
pub(crate) struct Resolved {
    pub(super) requests: Option<Arc<Bucket>>,
    pub(super) tokens: Option<Arc<Bucket>>,
    pub(super) concurrency: Option<u32>,
}

/// A bucket borrowed from the configuration, or one looked up for a key's own limits.
pub(super) enum BucketRef<'a> {
    Borrowed(&'a Arc<Bucket>),
    Owned(Arc<Bucket>),
}

impl Deref for BucketRef<'_> {
    type Target = Arc<Bucket>;
    fn deref(&self) -> &Arc<Bucket> {
        match self {
            BucketRef::Borrowed(b) => b,
            BucketRef::Owned(b) => b,
        }
    }
}

pub(super) struct Plan<'a> {
    pub(super) requests: Option<BucketRef<'a>>,
    pub(super) tokens: Option<BucketRef<'a>>,
    pub(super) concurrency: Option<u32>,
}

/// The `x-ratelimit-*` figures for a response.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RateHeaders {
    pub(crate) requests: Option<Status>,
    pub(crate) tokens: Option<Status>,
}

impl RateHeaders {
    /// On the layer's own refusals: the standard names.
    pub(crate) fn write(&self, headers: &mut HeaderMap) {
        self.write_names(headers, false);
    }

    /// On an answer of the inner service: the standard names when the answer is a success
    /// that carries none of them, else the layer's own names, so that neither the upstream's
    /// figures are overwritten nor the layer's taken for the upstream's.
    pub(crate) fn write_on_answer(&self, status: http::StatusCode, headers: &mut HeaderMap) {
        if self.requests.is_none() && self.tokens.is_none() {
            return;
        }
        let upstream_reports = headers
            .keys()
            .any(|k| k.as_str().starts_with("x-ratelimit-"));
        self.write_names(headers, upstream_reports || !status.is_success());
    }

    fn write_names(&self, headers: &mut HeaderMap, own: bool) {
        use super::*;
        HEADER_TEXT.with(|buf| {
            let mut buf = buf.borrow_mut();
            // Room for every value of this answer before the first is cut: the block is then
            // used again from its start when the values of earlier answers are all dropped.
            if buf.capacity() < 6 * LONGEST_VALUE {
                buf.reserve(HEADER_BLOCK);
            }
            if let Some(s) = &self.requests {
                let names = if own {
                    [
                        OWN_LIMIT_REQUESTS,
                        OWN_REMAINING_REQUESTS,
                        OWN_RESET_REQUESTS,
                    ]
                } else {
                    [LIMIT_REQUESTS, REMAINING_REQUESTS, RESET_REQUESTS]
                };
                write_status(headers, &mut buf, s, names);
            }
            if let Some(s) = &self.tokens {
                let names = if own {
                    [OWN_LIMIT_TOKENS, OWN_REMAINING_TOKENS, OWN_RESET_TOKENS]
                } else {
                    [LIMIT_TOKENS, REMAINING_TOKENS, RESET_TOKENS]
                };
                write_status(headers, &mut buf, s, names);
            }
        });
    }
}

/// The three values of one bucket's status, written on the stack and copied into the thread's
/// block at once, then cut from it.
fn write_status(
    headers: &mut HeaderMap,
    buf: &mut bytes::BytesMut,
    s: &Status,
    [limit, remaining, reset]: [HeaderName; 3],
) {
    let mut text = super::Text::new();
    write_u64(&mut text, u64::from(s.limit));
    let a = text.len();
    write_u64(&mut text, u64::from(s.remaining));
    let b = text.len() - a;
    write_duration(&mut text, s.reset());
    buf.extend_from_slice(text.as_bytes());
    let mut all = buf.split();
    let limit_value = header_value(all.split_to(a));
    let remaining_value = header_value(all.split_to(b));
    headers.insert(limit, limit_value);
    headers.insert(remaining, remaining_value);
    headers.insert(reset, header_value(all));
}

/// The bytes of a thread's header values are cut from one block of this size. Before an
/// answer's values are written, a block with less than room for them left is used again from
/// its start when no value cut from it is alive any more (the common case: each answer's head
/// is sent, and dropped, before the next one is written), else a new block is allocated: one
/// allocation per about 250 answers whose heads are all still held.
const HEADER_BLOCK: usize = 4096;

/// The longest value written: a `u64`, or a reset of 2^64 ns (`5124095h34m33.71s`).
const LONGEST_VALUE: usize = 20;

thread_local! {
    /// The block this thread's header values are written into.
    static HEADER_TEXT: std::cell::RefCell<bytes::BytesMut> =
        std::cell::RefCell::new(bytes::BytesMut::new());
}

/// A header value cut from the thread's block: no allocation of its own (the value shares the
/// block, and gives its share back when dropped).
fn header_value(bytes: bytes::BytesMut) -> http::HeaderValue {
    use http::HeaderValue;
    // Digits, letters and a dot: always a valid value.
    HeaderValue::from_maybe_shared(bytes.freeze()).unwrap_or(HeaderValue::from_static("0"))
}

/// Releases the request's concurrency slots when dropped.
pub(crate) struct InflightGuard {
    shared: Arc<Shared>,
    key: Option<RateKey>,
    global: bool,
    /// The slots held in the shared store instead, released there in one call.
    #[cfg(feature = "redis")]
    pub(super) remote: Option<super::redis::Release>,
}

impl InflightGuard {
    /// A guard for slots held in the shared store.
    #[cfg(feature = "redis")]
    pub(super) fn remote(shared: Arc<Shared>, release: super::redis::Release) -> Self {
        crate::metrics::rate_limit_in_flight(1);
        InflightGuard {
            shared,
            key: None,
            global: false,
            remote: Some(release),
        }
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        crate::metrics::rate_limit_in_flight(-1);
        #[cfg(feature = "redis")]
        if let Some(release) = self.remote.take() {
            release.release();
        }
        if let Some(key) = &self.key {
            self.shared.inflight.release(key);
        }
        if self.global {
            self.shared.inflight.release(&RateKey::Global);
        }
    }
}

/// The tokens charged at admission, to be corrected from the response's `usage`. Dropping it
/// unsettled keeps the charge as it is.
pub(crate) struct TokenCharge {
    pub(super) key: RateKey,
    pub(super) bucket: Option<Arc<Bucket>>,
    pub(super) global: Option<Arc<Bucket>>,
    pub(super) charged: u64,
    /// The buckets to correct in the shared store instead, in one call.
    #[cfg(feature = "redis")]
    pub(super) remote: Option<super::redis::Settle>,
}

impl TokenCharge {
    /// Charges an overrun, or credits unused tokens back.
    pub(crate) fn settle(&self, actual: u64) {
        let actual = actual.min(MAX_USAGE);
        crate::metrics::rate_limit_settled(self.charged, actual);
        #[cfg(feature = "redis")]
        if let Some(remote) = &self.remote {
            remote.settle(self.charged, actual);
            return;
        }
        let apply = |b: &Bucket, k: &RateKey| {
            if actual > self.charged {
                b.charge(k, actual - self.charged);
            } else if actual < self.charged {
                b.refund(k, self.charged - actual);
            }
        };
        if let Some(b) = &self.bucket {
            apply(b, &self.key);
        }
        if let Some(b) = &self.global {
            apply(b, &RateKey::Global);
        }
    }

    /// The tokens charged at admission.
    pub(crate) fn charged(&self) -> u64 {
        self.charged
    }
}

/// The most tokens one response is believed to have used: 2^24 (16,777,216), eight times the
/// largest context windows on offer (2M tokens). A larger `usage` (or a nonsensical one,
/// `1e300`) is read as this, so one broken answer indebts a key for a bounded time.
pub(crate) const MAX_USAGE: u64 = 1 << 24;

/// What an admitted request carries until its response body ends.
pub(crate) struct Admitted {
    pub(crate) guard: Option<InflightGuard>,
    pub(crate) charge: Option<Box<TokenCharge>>,
    pub(crate) headers: RateHeaders,
}

/// A refusal, with the wait after which the same request would be admitted, when known.
pub(crate) struct Rejected {
    pub(crate) error: ApiError,
    pub(crate) headers: RateHeaders,
    pub(crate) wait: Option<Duration>,
}

impl Rejected {
    pub(crate) fn into_response<B: From<bytes::Bytes>>(self) -> http::Response<B> {
        let mut res = self.error.to_response::<B>();
        self.headers.write(res.headers_mut());
        res
    }
}

pub(crate) struct Shared {
    key_kind: KeyKind,
    trusted: Vec<Cidr>,
    max_key_len: usize,
    defaults: Resolved,
    tiers: HashMap<Arc<str>, Resolved>,
    pub(super) global: Resolved,
    key_limits: bool,
    /// Each key's own `rpm`/`tpm` is divided by this (1, or the replica count of a local
    /// fallback for a shared store).
    divide: u32,
    /// The shared store, when the limits live in Redis.
    #[cfg(feature = "redis")]
    pub(super) remote: Option<super::redis::Remote>,
    pub(crate) mode: OnLimit,
    sweep_every: u64,
    sweep_interval: u64,
    last_sweep: AtomicU64,
    pub(crate) body_limit: usize,
    pub(crate) estimator: Arc<dyn TokenEstimator>,
    clock: TokioClock,
    registry: RwLock<HashMap<(Unit, Quota), Arc<Bucket>>>,
    inflight: Inflight,
    /// Whether any request can be under a token quota.
    any_tokens: bool,
    /// Whether the defaults or a tier have a token quota.
    tier_tokens: bool,
}

thread_local! {
    static ADMISSIONS: Cell<u64> = const { Cell::new(0) };
}

impl Shared {
    pub(crate) fn new(
        b: RateLimitLayerBuilder,
        tiers: HashMap<Arc<str>, Limits>,
        trusted: Vec<Cidr>,
    ) -> Shared {
        let clock = TokioClock::new();
        let mut registry = HashMap::new();
        let mut resolve = |l: &Limits| Resolved {
            requests: l.requests.map(|q| {
                registry
                    .entry((Unit::Requests, q))
                    .or_insert_with(|| Arc::new(Bucket::new(q, clock)))
                    .clone()
            }),
            tokens: l.tokens.map(|q| {
                registry
                    .entry((Unit::Tokens, q))
                    .or_insert_with(|| Arc::new(Bucket::new(q, clock)))
                    .clone()
            }),
            concurrency: l.concurrency,
        };
        let defaults = resolve(&b.defaults);
        let tiers: HashMap<_, _> = tiers.iter().map(|(k, v)| (k.clone(), resolve(v))).collect();
        // The global buckets are not shared with any key's.
        let global = Resolved {
            requests: b.global.requests.map(|q| Arc::new(Bucket::new(q, clock))),
            tokens: b.global.tokens.map(|q| Arc::new(Bucket::new(q, clock))),
            concurrency: b.global.concurrency,
        };
        let tier_tokens = defaults.tokens.is_some() || tiers.values().any(|t| t.tokens.is_some());
        let any_tokens = b.key_limits || global.tokens.is_some() || tier_tokens;
        Shared {
            key_kind: b.key_by.0,
            trusted,
            max_key_len: b.max_key_len,
            defaults,
            tiers,
            global,
            key_limits: b.key_limits,
            divide: b.divide.max(1),
            #[cfg(feature = "redis")]
            remote: None,
            mode: b.mode,
            sweep_every: b.sweep_every,
            sweep_interval: u64::try_from(b.sweep_interval.as_nanos()).unwrap_or(u64::MAX),
            last_sweep: AtomicU64::new(0),
            body_limit: b.body_limit,
            estimator: b.estimator,
            clock,
            registry: RwLock::new(registry),
            inflight: Inflight::new(),
            any_tokens,
            tier_tokens,
        }
    }

    fn override_bucket(&self, unit: Unit, q: Quota) -> Arc<Bucket> {
        if let Some(b) = self
            .registry
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(unit, q))
        {
            return b.clone();
        }
        self.registry
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry((unit, q))
            .or_insert_with(|| Arc::new(Bucket::new(q, self.clock)))
            .clone()
    }

    pub(super) fn plan<'a>(&'a self, ident: Option<&KeyIdentity>) -> Plan<'a> {
        let tier = ident
            .and_then(KeyIdentity::tier)
            .and_then(|t| self.tiers.get(t))
            .unwrap_or(&self.defaults);
        let mut plan = Plan {
            requests: tier.requests.as_ref().map(BucketRef::Borrowed),
            tokens: tier.tokens.as_ref().map(BucketRef::Borrowed),
            concurrency: tier.concurrency,
        };
        if let (true, Some(ident)) = (self.key_limits, ident) {
            let own = ident.limits();
            if let Some(rpm) = own.rpm().filter(|n| *n > 0) {
                let q = Quota::per_minute(u64::from(rpm))
                    .burst(rpm)
                    .divided(self.divide);
                plan.requests = Some(BucketRef::Owned(self.override_bucket(Unit::Requests, q)));
            }
            if let Some(tpm) = own.tpm().filter(|n| *n > 0) {
                let burst = u32::try_from(tpm).unwrap_or(u32::MAX);
                let q = Quota::per_minute(tpm).burst(burst).divided(self.divide);
                plan.tokens = Some(BucketRef::Owned(self.override_bucket(Unit::Tokens, q)));
            }
            if let Some(c) = own.max_concurrency() {
                plan.concurrency = Some(c);
            }
        }
        plan
    }

    /// Whether the buckets live in a shared store (admission then awaits it).
    #[cfg(feature = "redis")]
    #[inline]
    pub(crate) fn is_remote(&self) -> bool {
        self.remote.is_some()
    }

    /// Whether this request may be charged tokens or keyed by model, so its body must be read.
    /// A view already in the extensions is looked for last: most requests fall under no token
    /// quota, and are told so from the key's identity alone.
    pub(crate) fn needs_view(&self, ext: &http::Extensions) -> bool {
        if matches!(self.key_kind, KeyKind::Model) {
            return true;
        }
        if !self.any_tokens {
            return false;
        }
        let may_charge = self.global.tokens.is_some() || {
            let ident = ext.get::<KeyIdentity>();
            (self.key_limits && ident.is_some_and(|i| i.limits().tpm().is_some_and(|n| n > 0)))
                || (self.tier_tokens
                    && ident
                        .and_then(KeyIdentity::tier)
                        .and_then(|t| self.tiers.get(t))
                        .unwrap_or(&self.defaults)
                        .tokens
                        .is_some())
        };
        may_charge && ext.get::<RequestView>().is_none()
    }

    /// The request's key, its identity (if any) already looked up.
    pub(super) fn key_for(&self, src: &RequestHead<'_>, ident: Option<&KeyIdentity>) -> RateKey {
        let key = match &self.key_kind {
            KeyKind::ApiKey => ident.map(|k| self.shared_key(k.id_arc())),
            KeyKind::Header(name) => src
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|v| self.str_key(v)),
            KeyKind::Ip {
                peer, v6_prefix, ..
            } => peer(src.extensions()).map(|ip| {
                let ip = if self.trusted.is_empty() {
                    ip
                } else {
                    client_ip(ip, src.headers(), &self.trusted)
                };
                RateKey::Ip(ip_key(ip, *v6_prefix))
            }),
            KeyKind::Route => Some(self.str_key(src.uri().path())),
            KeyKind::Model => match RequestView::from_extensions(src.extensions()) {
                Some(view) => view.routed_model().map(|m| self.str_key(m)),
                // No body to read (a `GET`): the deployment in the path, if any.
                None => {
                    crate::request::deployment_from_path(src.uri().path()).map(|m| self.str_key(&m))
                }
            },
            KeyKind::Custom(f) => f(src).map(|k| self.shared_key(&k)),
        };
        key.unwrap_or(RateKey::Anonymous)
    }

    /// A key from a borrowed string: copied when short enough, else its digest.
    fn str_key(&self, s: &str) -> RateKey {
        if s.len() <= self.max_key_len {
            RateKey::Str(Arc::from(s))
        } else {
            digest(s)
        }
    }

    /// A key from a shared string: shared when short enough, else its digest.
    fn shared_key(&self, s: &Arc<str>) -> RateKey {
        if s.len() <= self.max_key_len {
            RateKey::Str(s.clone())
        } else {
            digest(s)
        }
    }

    /// What a refusal logs of the key: client-chosen strings escaped and shortened, header
    /// and custom keys (which may be credentials) not at all.
    fn key_kind_name(&self) -> &'static str {
        match self.key_kind {
            KeyKind::ApiKey => "api_key",
            KeyKind::Header(_) => "header",
            KeyKind::Ip { .. } => "client_ip",
            KeyKind::Route => "route",
            KeyKind::Model => "model",
            KeyKind::Custom(_) => "custom",
        }
    }

    /// Whether keys may be credentials (header and custom keys): never logged, and named by
    /// their digest in a shared store.
    pub(super) fn hides_keys(&self) -> bool {
        matches!(self.key_kind, KeyKind::Header(_) | KeyKind::Custom(_))
    }

    pub(super) fn log_refusal(&self, key: &RateKey, error: &ApiError) {
        let hidden = self.hides_keys();
        tracing::info!(
            target: "llm_layers::rate_limit",
            layer = "rate_limit",
            key_by = self.key_kind_name(),
            key = ?LogKey { key, hidden },
            code = error.code().as_str(),
            retry_after_ms = error.retry_after().map(|w| u64::try_from(w.as_millis()).unwrap_or(u64::MAX)),
            "request refused"
        );
    }

    /// Decides on one request: concurrency first (it costs nothing), then the token buckets,
    /// then the request buckets. Cells taken before a later refusal are given back.
    pub(crate) fn admit(
        self: &Arc<Self>,
        src: &RequestHead<'_>,
    ) -> Result<Admitted, Box<Rejected>> {
        self.maybe_sweep();
        let ident = src.extensions().get::<KeyIdentity>();
        let key = self.key_for(src, ident);
        let plan = self.plan(ident);
        let headers = |plan: &Plan<'_>, key: &RateKey| RateHeaders {
            requests: plan.requests.as_ref().map(|b| b.status(key)).or_else(|| {
                self.global
                    .requests
                    .as_ref()
                    .map(|b| b.status(&RateKey::Global))
            }),
            tokens: plan.tokens.as_ref().map(|b| b.status(key)).or_else(|| {
                self.global
                    .tokens
                    .as_ref()
                    .map(|b| b.status(&RateKey::Global))
            }),
        };
        let reject = |error: ApiError, wait: Option<Duration>, plan: &Plan<'_>| {
            self.log_refusal(&key, &error);
            Box::new(Rejected {
                error,
                headers: headers(plan, &key),
                wait,
            })
        };

        // Concurrency.
        let mut guard = None;
        if plan.concurrency.is_some() || self.global.concurrency.is_some() {
            let mut g = InflightGuard {
                shared: self.clone(),
                key: None,
                global: false,
                #[cfg(feature = "redis")]
                remote: None,
            };
            crate::metrics::rate_limit_in_flight(1);
            if let Some(cap) = plan.concurrency {
                if !self.inflight.acquire(&key, cap) {
                    return Err(reject(concurrent(cap, false), None, &plan));
                }
                g.key = Some(key.clone());
            }
            if let Some(cap) = self.global.concurrency {
                if !self.inflight.acquire(&RateKey::Global, cap) {
                    drop(g);
                    return Err(reject(concurrent(cap, true), None, &plan));
                }
                g.global = true;
            }
            guard = Some(g);
        }

        // Tokens.
        let token_quota = plan.tokens.is_some() || self.global.tokens.is_some();
        let view = if token_quota {
            RequestView::from_extensions(src.extensions())
        } else {
            None
        };
        let cost = if token_quota {
            view.map_or(0, RequestView::token_cost)
        } else {
            0
        };
        for (bucket, global) in [
            (plan.tokens.as_deref(), false),
            (self.global.tokens.as_ref(), true),
        ] {
            if let Some(b) = bucket {
                let burst = b.quota().burst_size();
                if cost > u64::from(burst) {
                    return Err(reject(never_fits(cost, burst, view, global), None, &plan));
                }
            }
        }
        let cost32 = u32::try_from(cost).unwrap_or(u32::MAX);
        let (mut token_status, mut request_status) = (None, None);
        if let Some(b) = plan.tokens.as_deref() {
            match b.take(&key, cost32) {
                Take::Ok(s) => token_status = Some(s),
                Take::Wait(w) => {
                    let w = w.max(self.longest_wait(&plan, &key, cost32));
                    return Err(reject(limited("tokens", false, w), Some(w), &plan));
                }
                Take::NeverFits => {
                    let burst = b.quota().burst_size();
                    return Err(reject(never_fits(cost, burst, view, false), None, &plan));
                }
            }
        }
        let undo_tokens = |plan: &Plan<'_>, global: bool| {
            if let Some(b) = plan.tokens.as_deref() {
                b.refund(&key, cost);
            }
            if let (true, Some(b)) = (global, self.global.tokens.as_ref()) {
                b.refund(&RateKey::Global, cost);
            }
        };
        if let Some(b) = self.global.tokens.as_ref() {
            if let Take::Wait(w) = b.take(&RateKey::Global, cost32) {
                undo_tokens(&plan, false);
                let w = w.max(self.longest_wait(&plan, &key, cost32));
                return Err(reject(limited("tokens", true, w), Some(w), &plan));
            }
        }

        // Requests.
        if let Some(b) = self.global.requests.as_ref() {
            if let Take::Wait(w) = b.take(&RateKey::Global, 1) {
                undo_tokens(&plan, true);
                let w = w.max(self.longest_wait(&plan, &key, cost32));
                return Err(reject(limited("requests", true, w), Some(w), &plan));
            }
        }
        if let Some(b) = plan.requests.as_deref() {
            match b.take(&key, 1) {
                Take::Ok(s) => request_status = Some(s),
                Take::Wait(w) => {
                    undo_tokens(&plan, true);
                    if let Some(g) = self.global.requests.as_ref() {
                        g.refund(&RateKey::Global, 1);
                    }
                    let w = w.max(self.longest_wait(&plan, &key, cost32));
                    return Err(reject(limited("requests", false, w), Some(w), &plan));
                }
                Take::NeverFits => unreachable!("one cell always fits a bucket"),
            }
        }

        let headers = RateHeaders {
            requests: request_status.or_else(|| {
                self.global
                    .requests
                    .as_ref()
                    .map(|b| b.status(&RateKey::Global))
            }),
            tokens: token_status.or_else(|| {
                self.global
                    .tokens
                    .as_ref()
                    .map(|b| b.status(&RateKey::Global))
            }),
        };
        let charge = token_quota.then(|| {
            Box::new(TokenCharge {
                bucket: plan.tokens.as_deref().cloned(),
                global: self.global.tokens.clone(),
                key,
                charged: cost,
                #[cfg(feature = "redis")]
                remote: None,
            })
        });
        Ok(Admitted {
            guard,
            charge,
            headers,
        })
    }

    /// The wait until every bucket this request needs has room, so that a retry after it is
    /// admitted (when nothing else was).
    fn longest_wait(&self, plan: &Plan<'_>, key: &RateKey, cost: u32) -> Duration {
        let fits = |b: &Bucket, n: u32| n <= b.quota().burst_size();
        let mut wait = Duration::ZERO;
        for (bucket, k, n) in [
            (plan.requests.as_deref(), key, 1),
            (plan.tokens.as_deref(), key, cost),
            (self.global.requests.as_ref(), &RateKey::Global, 1),
            (self.global.tokens.as_ref(), &RateKey::Global, cost),
        ] {
            if let Some(b) = bucket.filter(|b| fits(b, n)) {
                wait = wait.max(b.wait_for(k, n));
            }
        }
        wait
    }

    fn now_nanos(&self) -> u64 {
        self.clock.now().into()
    }

    fn maybe_sweep(&self) {
        let n = ADMISSIONS.with(|c| {
            let n = c.get().wrapping_add(1);
            c.set(n);
            n
        });
        if n % self.sweep_every != 0 {
            return;
        }
        let now = self.now_nanos();
        let last = self.last_sweep.load(Ordering::Relaxed);
        if now.saturating_sub(last) < self.sweep_interval {
            return;
        }
        if self
            .last_sweep
            .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            self.sweep();
        }
    }

    fn buckets(&self) -> Vec<Arc<Bucket>> {
        let mut all: Vec<Arc<Bucket>> = self
            .registry
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        all.extend(self.global.requests.iter().cloned());
        all.extend(self.global.tokens.iter().cloned());
        all
    }

    /// Forgets every key whose buckets are full again, and buckets of keys' own limits that
    /// no key uses any more.
    pub(crate) fn sweep(&self) {
        for b in self.buckets() {
            b.sweep();
        }
        self.inflight.shrink_to_fit();
        let mut registry = self.registry.write().unwrap_or_else(|e| e.into_inner());
        registry.retain(|_, b| Arc::strong_count(b) > 1 || b.len() > 0);
        registry.shrink_to_fit();
    }

    /// Every bucket with what it counts (`true`: tokens) and whether it is global, for a
    /// snapshot.
    pub(super) fn snapshot_buckets(&self) -> Vec<(bool, bool, Arc<Bucket>)> {
        let mut all: Vec<(bool, bool, Arc<Bucket>)> = self
            .registry
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|((unit, _), b)| (*unit == Unit::Tokens, false, b.clone()))
            .collect();
        all.extend(
            self.global
                .requests
                .iter()
                .map(|b| (false, true, b.clone())),
        );
        all.extend(self.global.tokens.iter().map(|b| (true, true, b.clone())));
        all
    }

    /// The requests in flight per key, for a snapshot.
    pub(super) fn inflight(&self) -> &Inflight {
        &self.inflight
    }

    /// The key a string names, as requests with it are keyed (a long one is its digest).
    pub(super) fn key_of_str(&self, s: &str) -> RateKey {
        self.str_key(s)
    }

    pub(crate) fn tracked_keys(&self) -> usize {
        self.buckets().iter().map(|b| b.len()).sum()
    }
}

/// The key of a long string: its SHA-256.
fn digest(s: &str) -> RateKey {
    use sha2::{Digest, Sha256};
    RateKey::Digest(Arc::new(Sha256::digest(s.as_bytes()).into()))
}

/// The address a client is keyed by: an IPv4-mapped IPv6 address as IPv4, another IPv6
/// address cut to its first `prefix` bits.
fn ip_key(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(prefix.min(128)))
                    .unwrap_or(0);
                IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & mask))
            }
        },
    }
}

/// A key as a refusal logs it.
struct LogKey<'a> {
    key: &'a RateKey,
    hidden: bool,
}

impl std::fmt::Debug for LogKey<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        /// The most of a client-chosen key a log line shows.
        const SHOWN: usize = 64;
        match self.key {
            RateKey::Anonymous => f.write_str("anonymous"),
            RateKey::Global => f.write_str("global"),
            _ if self.hidden => f.write_str("hidden"),
            RateKey::Ip(ip) => write!(f, "{ip}"),
            RateKey::Str(s) if s.len() <= SHOWN => write!(f, "{:?}", &**s),
            RateKey::Str(s) => {
                let mut end = SHOWN;
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                write!(f, "{:?}... ({} bytes)", &s[..end], s.len())
            }
            RateKey::Digest(d) => {
                f.write_str("sha256:")?;
                for b in &d[..8] {
                    write!(f, "{b:02x}")?;
                }
                f.write_str("...")
            }
        }
    }
}

/// The right-most hop of `x-forwarded-for` that is not a trusted proxy, when the peer is one.
fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[Cidr]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let mut last = peer;
    for value in headers.get_all("x-forwarded-for").iter().rev() {
        let Ok(value) = value.to_str() else {
            return last;
        };
        for hop in value.rsplit(',') {
            let Some(ip) = parse_hop(hop.trim()) else {
                return last;
            };
            if !is_trusted(ip) {
                return ip;
            }
            last = ip;
        }
    }
    last
}

fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse() {
        return Some(ip);
    }
    // `[v6]:port` or `v4:port`.
    if let Ok(sa) = hop.parse::<std::net::SocketAddr>() {
        return Some(sa.ip());
    }
    None
}

pub(super) fn concurrent(cap: u32, global: bool) -> ApiError {
    let scope = if global { "in total" } else { "for this key" };
    ApiError::new(
        ErrorCode::ConcurrentLimitExceeded,
        format!(
            "Too many requests in flight {scope}: at most {cap} at once. Retry when one of them has finished."
        ),
    )
}

pub(super) fn limited(unit: &str, global: bool, wait: Duration) -> ApiError {
    let scope = if global { " across all keys" } else { "" };
    ApiError::new(
        ErrorCode::RateLimitExceeded,
        format!(
            "Rate limit reached for {unit}{scope}. Please try again in {}.",
            fmt_duration(wait)
        ),
    )
    .with_retry_after(wait)
}

pub(super) fn never_fits(
    cost: u64,
    burst: u32,
    view: Option<&RequestView>,
    global: bool,
) -> ApiError {
    let scope = if global {
        "the global token limit"
    } else {
        "this key's token limit"
    };
    let detail = view.map_or(String::new(), |v| {
        format!(
            " (about {} prompt tokens + max_tokens {})",
            v.prompt_tokens(),
            v.max_tokens().unwrap_or(0)
        )
    });
    ApiError::new(
        ErrorCode::RateLimitExceeded,
        format!(
            "This request needs {cost} tokens{detail}, more than {scope} allows at once ({burst} tokens); it can never be admitted. Lower max_tokens or shorten the prompt."
        ),
    )
    .with_param("max_tokens")
    .never_fits()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_takes_the_right_most_untrusted_hop() {
        let trusted = vec![
            Cidr::parse("10.0.0.0/8").unwrap(),
            Cidr::parse("::1").unwrap(),
        ];
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            "1.1.1.1, 2.2.2.2, 10.0.0.5".parse().unwrap(),
        );
        let peer: IpAddr = "10.1.1.1".parse().unwrap();
        assert_eq!(
            client_ip(peer, &h, &trusted),
            "2.2.2.2".parse::<IpAddr>().unwrap()
        );
        // An untrusted peer is the client, whatever it claims.
        let peer: IpAddr = "3.3.3.3".parse().unwrap();
        assert_eq!(client_ip(peer, &h, &trusted), peer);
        // All hops trusted: the left-most one.
        h.insert("x-forwarded-for", "10.0.0.9, 10.0.0.5".parse().unwrap());
        assert_eq!(
            client_ip("::1".parse().unwrap(), &h, &trusted),
            "10.0.0.9".parse::<IpAddr>().unwrap()
        );
        // Garbage stops the walk at the last trusted hop.
        h.insert("x-forwarded-for", "evil, 10.0.0.5".parse().unwrap());
        assert_eq!(
            client_ip("10.1.1.1".parse().unwrap(), &h, &trusted),
            "10.0.0.5".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn cidr_blocks() {
        let c = Cidr::parse("192.168.0.0/16").unwrap();
        assert!(c.contains("192.168.3.4".parse().unwrap()));
        assert!(!c.contains("192.169.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:192.168.1.1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        assert!(Cidr::parse("1.2.3.4/33").is_none());
        assert!(Cidr::parse("nope").is_none());
    }
}
