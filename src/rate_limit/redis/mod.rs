//! The shared store: request buckets, token buckets and in-flight counts in Redis or Valkey
//! (feature `redis`). The rules are written on [`RedisBackend`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, RedisError, Script, ScriptInvocation};

use crate::error::{ApiError, ErrorCode};
use crate::request::{RequestHead, RequestView};

use super::config::ConfigError;
use super::shared::{
    concurrent, limited, never_fits, Admitted, InflightGuard, RateHeaders, Rejected, Shared,
    TokenCharge,
};
use super::store::{RateKey, Status};
use super::Quota;

/// What the layer does while the shared store does not answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// Decide on a local limiter at the shared quotas divided by the replica count (default).
    #[default]
    FailOpen,
    /// Answer `503 service_unavailable`.
    FailClosed,
}

/// Settings of the shared store: request buckets, token buckets and in-flight counts in Redis
/// or Valkey, so that N gateway replicas enforce one quota together; give it to
/// [`RateLimitLayerBuilder::redis`](super::RateLimitLayerBuilder::redis).
///
///
/// # The client crate
///
/// [redis-rs](https://docs.rs/redis) with `tokio-comp` and `connection-manager` and no other
/// feature: its `ConnectionManager` multiplexes every call of every clone of the layer over
/// one connection and reconnects by itself after an error, and its `Script` sends `EVALSHA`
/// and falls back to `EVAL` (loading the script) on `NOSCRIPT`, so a `SCRIPT FLUSH` or a
/// restarted server costs one extra round trip once. fred offers the same with a larger
/// dependency tree and its own runtime abstractions; redis-rs is the smaller build.
///
/// # Rules
///
/// * **One round trip per admission.** One Lua script reads the server's clock (`TIME`, so
///   the replicas' clocks do not matter), checks the in-flight counts, then the key's and the
///   global token buckets, then the global and the key's request buckets (the in-memory
///   order), and either takes from all of them or from none. It answers the refusal's code, the
///   wait until every bucket has room, and the figures of the `x-ratelimit-*` headers.
/// * **GCRA as in memory.** A bucket is one string, its theoretical arrival time (TAT) in
///   microseconds (a double: about 0.25 µs resolution), under a name that carries the unit,
///   the quota and the key, so that a key under two quotas has two buckets as it has in
///   memory. `retry-after-ms` is rounded up to the microsecond the server computed, then to
///   the millisecond as in memory.
/// * **Corrections are one call each**, sent after the answer without delaying it: the token
///   correction from `usage` (an overrun pushes the TAT later, a refund moves it earlier but
///   never before now), and the release of in-flight slots at end of body. Neither is retried:
///   a lost correction leaves the estimate charged, a lost release holds the slot until the
///   in-flight count's TTL.
/// * **Key names.** `{prefix}{r|t}:{count}:{period_ns}:{burst}:{key}` for buckets and
///   `{prefix}c:{key}` for in-flight counts, where the key is `s:` and the key string, `ip:`
///   and the address, `h:` and a SHA-256 in hex (a long key, or any header or custom key:
///   those may be credentials, and the store's key names are visible to whoever can `SCAN`
///   it), `a` (anonymous) or `g` (global).
/// * **Keys expire by themselves.** A bucket lives as long as it is not full again (then it is
///   indistinguishable from a new key); an in-flight count lives
///   [`concurrency_ttl`](RedisBackend::concurrency_ttl) after its last admission (10 minutes
///   by default), which bounds what a replica that died with requests in flight leaves behind.
/// * **Failure policy.** Every call has a timeout ([`timeout`](RedisBackend::timeout), 50 ms by
///   default). A call that fails or times out marks the store down for
///   [`probe_interval`](RedisBackend::probe_interval) (500 ms): meanwhile requests do not
///   wait for it. Then the next request asks the store again, and when it answers every
///   request goes back to it. While it is down, [`FailurePolicy::FailOpen`] (the default)
///   decides on a local in-memory limiter whose quotas are the shared ones divided by
///   [`replicas`](RedisBackend::replicas) (each rate and burst at least 1), and
///   [`FailurePolicy::FailClosed`] answers `503 service_unavailable`. The outage is logged at
///   `warn` at most once per [`log_interval`](RedisBackend::log_interval) (10 s), the recovery
///   once at `info`; the log names the kind of error, never the URL.
///   A call that timed out may still run when a slow server goes on: its cells are then
///   taken although the request was refused or decided locally, so a slow store can only
///   make the shared count stricter, never looser.
/// * **Pre-borrowing** ([`pre_borrow`](RedisBackend::pre_borrow), off by default) takes a hot
///   key's round trips off the request path: a replica borrows up to `cells` requests at once
///   and admits them locally during a lease. The replicas together never admit more than the
///   quota; up to `replicas × cells` requests may sit unspent in leases meanwhile.
/// * **One server.** The keys of one admission are in different hash slots: Redis Cluster is
///   not supported; a single primary (Redis or Valkey) is.
/// * The URL may carry a password: it is never logged, and `Debug` does not show it.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use llm_layers::rate_limit::{FailurePolicy, Limits, Quota, RateLimitLayer, RedisBackend};
///
/// let layer = RateLimitLayer::builder()
///     .limits(Limits::new().requests(Quota::per_minute(600).burst(60)))
///     .redis(
///         RedisBackend::new("redis://127.0.0.1:6379/")
///             .timeout(Duration::from_millis(30))
///             .on_failure(FailurePolicy::FailOpen)
///             .replicas(3),
///     )
///     .build();
/// assert!(layer.is_ok());
/// ```
#[derive(Clone)]
pub struct RedisBackend {
    url: String,
    timeout: Duration,
    policy: FailurePolicy,
    replicas: u32,
    prefix: String,
    probe: Duration,
    log_every: Duration,
    conc_ttl: Duration,
    borrow: u32,
    lease: Duration,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password.
        f.debug_struct("RedisBackend")
            .field("url", &"<hidden>")
            .field("timeout", &self.timeout)
            .field("policy", &self.policy)
            .field("replicas", &self.replicas)
            .field("key_prefix", &self.prefix)
            .field("pre_borrow", &self.borrow)
            .finish_non_exhaustive()
    }
}

/// The default per-call timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(50);

impl RedisBackend {
    /// A store at `url` (`redis://[:password@]host:port/[db]`; Valkey speaks the same).
    pub fn new(url: impl Into<String>) -> Self {
        RedisBackend {
            url: url.into(),
            timeout: DEFAULT_TIMEOUT,
            policy: FailurePolicy::FailOpen,
            replicas: 1,
            prefix: "llm-layers:rl:".into(),
            probe: Duration::from_millis(500),
            log_every: Duration::from_secs(10),
            conc_ttl: Duration::from_secs(600),
            borrow: 0,
            lease: Duration::from_millis(100),
        }
    }

    /// Local pre-borrowing (default off): a replica takes up to `cells` requests of a hot
    /// key's request bucket from the store in one call and admits them locally, without a
    /// round trip, for at most `lease`; the next borrow of the key gives back what the
    /// expired lease did not spend. It applies to keys whose only limit is a request quota
    /// (no token quota, no concurrency cap, no global limit): the others are decided in the
    /// store on every request.
    ///
    /// **Bound.** Cells are taken from the shared bucket before a replica spends them, so the
    /// replicas together never admit more than the quota (`burst + rate·T` over any window
    /// `T`). What borrowing costs is the other way: up to `replicas × cells` requests may sit
    /// unspent in leases, so up to that many fewer may be admitted than the quota allows,
    /// for at most `lease` (then they are given back, or refill). The
    /// `x-ratelimit-remaining-requests` of a locally admitted request is the store's figure at
    /// the borrow plus the cells still in this replica's lease.
    pub fn pre_borrow(mut self, cells: u32, lease: Duration) -> Self {
        self.borrow = cells;
        self.lease = lease;
        self
    }

    /// The longest one call may take (default 50 ms); a slower call counts as a failure.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// What to do while the store does not answer (default [`FailurePolicy::FailOpen`]).
    pub fn on_failure(mut self, policy: FailurePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// How many replicas share the quotas (default 1): a failing-open replica allows
    /// `1/replicas` of each.
    pub fn replicas(mut self, n: u32) -> Self {
        self.replicas = n;
        self
    }

    /// The prefix of every key the layer writes (default `llm-layers:rl:`).
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long the store is left alone after a failure before it is asked again (default
    /// 500 ms).
    pub fn probe_interval(mut self, interval: Duration) -> Self {
        self.probe = interval;
        self
    }

    /// At most one outage log line per interval (default 10 s).
    pub fn log_interval(mut self, interval: Duration) -> Self {
        self.log_every = interval;
        self
    }

    /// How long an in-flight count outlives its last admission (default 10 minutes): the
    /// bound on what a replica that died with requests in flight leaves counted.
    pub fn concurrency_ttl(mut self, ttl: Duration) -> Self {
        self.conc_ttl = ttl;
        self
    }

    /// The replica count.
    pub fn replica_count(&self) -> u32 {
        self.replicas
    }

    pub(crate) fn validate(&self) -> Result<Client, ConfigError> {
        let err =
            |field: &'static str, msg: &'static str| ConfigError::new("rate limit", field, msg);
        if self.timeout.is_zero() {
            return Err(err("redis.timeout", "must be positive"));
        }
        if self.replicas == 0 {
            return Err(err("redis.replicas", "must be at least 1"));
        }
        if self.probe.is_zero() {
            return Err(err("redis.probe_interval", "must be positive"));
        }
        if self.borrow > 0 && self.lease.is_zero() {
            return Err(err("redis.pre_borrow", "the lease must be positive"));
        }
        if self.conc_ttl < Duration::from_secs(1) {
            return Err(err("redis.concurrency_ttl", "must be at least 1 s"));
        }
        // The parser's message may quote the URL, and so its password: not passed on.
        Client::open(self.url.as_str()).map_err(|_| {
            err(
                "redis.url",
                "not a valid redis:// URL (TLS is not built in; the URL is not shown: it may hold a password)",
            )
        })
    }
}

/// The shared store of a layer, with its local fallback.
pub(crate) struct Remote {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    conn: OnceLock<ConnectionManager>,
    prefix: String,
    timeout: Duration,
    policy: FailurePolicy,
    probe_ms: u64,
    log_ms: u64,
    conc_ttl_ms: u64,
    fallback: Arc<Shared>,
    admit: Script,
    settle: Script,
    release: Script,
    borrow_script: Script,
    borrow: u32,
    lease: Duration,
    leases: Mutex<HashMap<(Quota, RateKey), Lease>>,
    /// Header and custom keys are named by their digest.
    hide_keys: bool,
    epoch: tokio::time::Instant,
    down_until_ms: AtomicU64,
    last_log_ms: AtomicU64,
    degraded: AtomicBool,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Remote {
    pub(crate) fn new(
        cfg: RedisBackend,
        client: Client,
        fallback: Arc<Shared>,
        hide_keys: bool,
    ) -> Remote {
        Remote {
            inner: Arc::new(Inner {
                client,
                conn: OnceLock::new(),
                prefix: cfg.prefix,
                timeout: cfg.timeout,
                policy: cfg.policy,
                probe_ms: millis(cfg.probe).max(1),
                log_ms: millis(cfg.log_every),
                conc_ttl_ms: millis(cfg.conc_ttl),
                fallback,
                admit: Script::new(include_str!("admit.lua")),
                settle: Script::new(include_str!("settle.lua")),
                release: Script::new(include_str!("release.lua")),
                borrow_script: Script::new(include_str!("borrow.lua")),
                borrow: cfg.borrow,
                lease: cfg.lease,
                leases: Mutex::new(HashMap::new()),
                hide_keys,
                epoch: tokio::time::Instant::now(),
                down_until_ms: AtomicU64::new(0),
                last_log_ms: AtomicU64::new(u64::MAX),
                degraded: AtomicBool::new(false),
            }),
        }
    }
}

/// Requests of one key's bucket lent to this replica.
struct Lease {
    cells: u32,
    expires: tokio::time::Instant,
    /// The store's remaining count and reset at the borrow.
    remaining: u32,
    reset: Duration,
    at: tokio::time::Instant,
    limit: u32,
}

/// The most leases kept; past it, expired ones are dropped (their cells refill).
const MAX_LEASES: usize = 16_384;

/// Why a call did not answer.
#[derive(Debug)]
enum Failure {
    /// The store is marked down; it was not asked.
    Down,
    Timeout,
    Error(RedisError),
}

impl Inner {
    fn now_ms(&self) -> u64 {
        millis(self.epoch.elapsed())
    }

    fn conn(&self) -> Result<ConnectionManager, RedisError> {
        if let Some(c) = self.conn.get() {
            return Ok(c.clone());
        }
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout.max(Duration::from_millis(100))))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(200));
        let c = ConnectionManager::new_lazy_with_config(self.client.clone(), cfg)?;
        Ok(self.conn.get_or_init(|| c).clone())
    }

    /// Runs a script with the per-call timeout. `probe`: whether a store marked down is left
    /// alone (admissions) or asked anyway (corrections, which nothing waits for).
    async fn call<T: ::redis::FromRedisValue>(
        &self,
        inv: &ScriptInvocation<'_>,
        probe: bool,
    ) -> Result<T, Failure> {
        if probe && self.now_ms() < self.down_until_ms.load(Ordering::Relaxed) {
            return Err(Failure::Down);
        }
        let mut conn = self.conn().map_err(Failure::Error)?;
        let res = match tokio::time::timeout(self.timeout, inv.invoke_async::<T>(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Failure::Error(e)),
            Err(_) => Err(Failure::Timeout),
        };
        match &res {
            Ok(_) => {
                if self.degraded.swap(false, Ordering::AcqRel) {
                    tracing::info!(
                        target: "llm_layers::rate_limit",
                        "the shared rate-limit store answers again; deciding on it"
                    );
                }
            }
            Err(f) => self.failed(f),
        }
        res
    }

    fn failed(&self, f: &Failure) {
        let now = self.now_ms();
        self.down_until_ms
            .store(now.saturating_add(self.probe_ms), Ordering::Relaxed);
        self.degraded.store(true, Ordering::Release);
        let last = self.last_log_ms.load(Ordering::Relaxed);
        let due = last == u64::MAX || now.saturating_sub(last) >= self.log_ms;
        if due
            && self
                .last_log_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            let (reason, kind) = match f {
                Failure::Down => ("down", None),
                Failure::Timeout => ("timeout", None),
                Failure::Error(e) => ("error", Some(e.kind())),
            };
            let policy = match self.policy {
                FailurePolicy::FailOpen => "fail_open",
                FailurePolicy::FailClosed => "fail_closed",
            };
            tracing::warn!(
                target: "llm_layers::rate_limit",
                reason,
                kind = ?kind,
                timeout_ms = millis(self.timeout),
                policy,
                "the shared rate-limit store did not answer; deciding by the failure policy"
            );
        }
    }

    /// The decision while the store does not answer.
    fn on_failure(&self, src: &RequestHead<'_>) -> Result<Admitted, Box<Rejected>> {
        match self.policy {
            FailurePolicy::FailOpen => self.fallback.admit(src),
            FailurePolicy::FailClosed => Err(Box::new(Rejected {
                error: ApiError::new(
                    ErrorCode::ServiceUnavailable,
                    "The rate limiter's shared store is unavailable; retry shortly.",
                ),
                headers: RateHeaders::default(),
                wait: None,
            })),
        }
    }

    fn spawn(self: &Arc<Self>, f: impl FnOnce(Arc<Inner>) -> BoxFut + Send + 'static) {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(f(self.clone()));
        }
    }

    fn bucket_key(&self, unit: char, q: Quota, key: &RateKey) -> String {
        let hide = self.hide_keys;
        use std::fmt::Write;
        let mut s = String::with_capacity(self.prefix.len() + 48);
        s.push_str(&self.prefix);
        let _ = write!(
            s,
            "{unit}:{}:{}:{}:",
            q.count(),
            q.period().as_nanos(),
            q.burst_size()
        );
        push_key(&mut s, key, hide);
        s
    }

    fn inflight_key(&self, key: &RateKey) -> String {
        let mut s = String::with_capacity(self.prefix.len() + 24);
        s.push_str(&self.prefix);
        s.push_str("c:");
        push_key(&mut s, key, self.hide_keys);
        s
    }
}

type BoxFut = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// A key as the store names it: one prefix per kind, so that no two kinds collide. A key
/// that may be a credential (`hide`: a header or custom key) is named by its SHA-256.
fn push_key(s: &mut String, key: &RateKey, hide: bool) {
    use std::fmt::Write;
    if let (true, RateKey::Str(k)) = (hide, key) {
        use sha2::{Digest, Sha256};
        s.push_str("h:");
        for b in Sha256::digest(k.as_bytes()) {
            let _ = write!(s, "{b:02x}");
        }
        return;
    }
    match key {
        RateKey::Anonymous => s.push('a'),
        RateKey::Global => s.push('g'),
        RateKey::Ip(ip) => {
            let _ = write!(s, "ip:{ip}");
        }
        RateKey::Str(k) => {
            s.push_str("s:");
            s.push_str(k);
        }
        RateKey::Digest(d) => {
            s.push_str("h:");
            for b in d.iter() {
                let _ = write!(s, "{b:02x}");
            }
        }
    }
}

/// The in-flight slots a request holds in the store, released in one call when dropped.
pub(crate) struct Release {
    inner: Arc<Inner>,
    keys: Vec<String>,
}

impl Release {
    pub(crate) fn release(self) {
        let Release { inner, keys } = self;
        inner.spawn(move |inner| {
            Box::pin(async move {
                let mut inv = inner.release.prepare_invoke();
                for k in &keys {
                    inv.key(k);
                }
                let _ = inner.call::<i64>(&inv, false).await;
            })
        });
    }
}

/// The token buckets a request was charged in the store, corrected in one call.
pub(crate) struct Settle {
    inner: Arc<Inner>,
    key: Option<(String, u64)>,
    global: Option<(String, u64)>,
}

impl Settle {
    pub(crate) fn settle(&self, charged: u64, actual: u64) {
        let delta = i128::from(actual) - i128::from(charged);
        if delta == 0 {
            return;
        }
        let key = self.key.clone();
        let global = self.global.clone();
        self.inner.spawn(move |inner| {
            Box::pin(async move {
                let (k1, t1) = key.unwrap_or_else(|| (String::new(), 0));
                let (k2, t2) = global.unwrap_or_else(|| (String::new(), 0));
                let mut inv = inner.settle.prepare_invoke();
                inv.key(if k1.is_empty() { "-" } else { &k1 })
                    .key(if k2.is_empty() { "-" } else { &k2 })
                    .arg(t1)
                    .arg(t2)
                    .arg(delta.to_string());
                let _ = inner.call::<i64>(&inv, false).await;
            })
        });
    }
}

/// Decides on one request in the store; see [`RedisBackend`].
pub(crate) async fn admit(
    shared: &Arc<Shared>,
    src: &RequestHead<'_>,
) -> Result<Admitted, Box<Rejected>> {
    let Some(remote) = shared.remote.as_ref() else {
        return shared.admit(src);
    };
    let inner = &remote.inner;
    let ident = src.extensions().get::<crate::ext::KeyIdentity>();
    let key = shared.key_for(src, ident);
    let plan = shared.plan(ident);
    let g = &shared.global;
    let key_req = plan.requests.as_ref().map(|b| b.quota());
    let key_tok = plan.tokens.as_ref().map(|b| b.quota());
    let glob_req = g.requests.as_ref().map(|b| b.quota());
    let glob_tok = g.tokens.as_ref().map(|b| b.quota());
    let key_cap = plan.concurrency;
    let glob_cap = g.concurrency;
    drop(plan);

    if let (Some(q), true) = (
        key_req,
        inner.borrow > 0
            && key_tok.is_none()
            && glob_tok.is_none()
            && glob_req.is_none()
            && key_cap.is_none()
            && glob_cap.is_none(),
    ) {
        return borrowed(shared, inner, src, key, q).await;
    }

    let view = RequestView::from_extensions(src.extensions());
    let token_quota = key_tok.is_some() || glob_tok.is_some();
    let cost = if token_quota {
        view.map_or(0, RequestView::token_cost)
    } else {
        0
    };

    // Bucket order: key tokens, global tokens, global requests, key requests.
    let buckets = [
        key_tok.map(|q| (inner.bucket_key('t', q, &key), q, cost)),
        glob_tok.map(|q| (inner.bucket_key('t', q, &RateKey::Global), q, cost)),
        glob_req.map(|q| (inner.bucket_key('r', q, &RateKey::Global), q, 1)),
        key_req.map(|q| (inner.bucket_key('r', q, &key), q, 1)),
    ];
    let conc_key = key_cap.map(|_| inner.inflight_key(&key));
    let conc_glob = glob_cap.map(|_| inner.inflight_key(&RateKey::Global));
    let mut inv = inner.admit.prepare_invoke();
    for b in &buckets {
        inv.key(b.as_ref().map_or("-", |(k, _, _)| k.as_str()));
    }
    inv.key(conc_key.as_deref().unwrap_or("-"))
        .key(conc_glob.as_deref().unwrap_or("-"));
    for b in &buckets {
        match b {
            Some((_, q, n)) => inv.arg(q.replenish_nanos()).arg(q.burst_size()).arg(*n),
            None => inv.arg(0).arg(0).arg(0),
        };
    }
    inv.arg(key_cap.unwrap_or(0))
        .arg(glob_cap.unwrap_or(0))
        .arg(inner.conc_ttl_ms);

    let reply: Vec<i64> = match inner.call(&inv, true).await {
        Ok(r) => r,
        Err(_) => return inner.on_failure(src),
    };
    let Some(&[code, wait_us, rl, rr, rs, tl, tr, ts]) =
        reply.get(..8).and_then(|r| <&[i64; 8]>::try_from(r).ok())
    else {
        // A reply of another shape (a foreign script under the same SHA): decide locally.
        return inner.fallback.admit(src);
    };
    let status = |limit: i64, remaining: i64, reset_us: i64| {
        (limit >= 0).then(|| Status {
            limit: u32::try_from(limit).unwrap_or(u32::MAX),
            remaining: u32::try_from(remaining.max(0)).unwrap_or(u32::MAX),
            reset_ns: u64::try_from(reset_us.max(0))
                .unwrap_or(0)
                .saturating_mul(1000),
        })
    };
    let headers = RateHeaders {
        requests: status(rl, rr, rs),
        tokens: status(tl, tr, ts),
    };
    let wait = Duration::from_micros(u64::try_from(wait_us.max(1)).unwrap_or(1));
    let burst = |i: usize| buckets[i].as_ref().map_or(0, |(_, q, _)| q.burst_size());
    let error = match code {
        0 => None,
        1 => Some((concurrent(key_cap.unwrap_or(0), false), None)),
        2 => Some((concurrent(glob_cap.unwrap_or(0), true), None)),
        11 => Some((never_fits(cost, burst(0), view, false), None)),
        12 => Some((never_fits(cost, burst(1), view, true), None)),
        21 => Some((limited("tokens", false, wait), Some(wait))),
        22 => Some((limited("tokens", true, wait), Some(wait))),
        23 => Some((limited("requests", true, wait), Some(wait))),
        _ => Some((limited("requests", false, wait), Some(wait))),
    };
    if let Some((error, wait)) = error {
        shared.log_refusal(&key, &error);
        return Err(Box::new(Rejected {
            error,
            headers,
            wait,
        }));
    }
    let held: Vec<String> = conc_key.into_iter().chain(conc_glob).collect();
    let guard = (!held.is_empty()).then(|| {
        InflightGuard::remote(
            shared.clone(),
            Release {
                inner: inner.clone(),
                keys: held,
            },
        )
    });
    let [t_key, t_glob, _, _] = buckets;
    let charge = token_quota.then(|| {
        Box::new(TokenCharge {
            key,
            bucket: None,
            global: None,
            charged: cost,
            remote: Some(Settle {
                inner: inner.clone(),
                key: t_key.map(|(k, q, _)| (k, q.replenish_nanos())),
                global: t_glob.map(|(k, q, _)| (k, q.replenish_nanos())),
            }),
        })
    });
    Ok(Admitted {
        guard,
        charge,
        headers,
    })
}

/// Admission of a key whose only limit is a request quota, from a lease when one has cells
/// left, else after borrowing in one call.
async fn borrowed(
    shared: &Arc<Shared>,
    inner: &Arc<Inner>,
    src: &RequestHead<'_>,
    key: RateKey,
    q: Quota,
) -> Result<Admitted, Box<Rejected>> {
    let now = tokio::time::Instant::now();
    let lease_key = (q, key);
    let mut back = 0;
    {
        let mut leases = inner.leases.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = leases.get_mut(&lease_key) {
            if l.expires > now && l.cells > 0 {
                l.cells -= 1;
                let status = Status {
                    limit: l.limit,
                    remaining: l.remaining.saturating_add(l.cells),
                    reset_ns: u64::try_from(
                        l.reset.saturating_sub(now.duration_since(l.at)).as_nanos(),
                    )
                    .unwrap_or(u64::MAX),
                };
                return Ok(admitted_with(status));
            }
            // Expired (its unspent cells go back with the borrow) or spent.
            back = l.cells;
            leases.remove(&lease_key);
        }
    }
    let bucket = inner.bucket_key('r', q, &lease_key.1);
    let mut inv = inner.borrow_script.prepare_invoke();
    inv.key(&bucket)
        .arg(q.replenish_nanos())
        .arg(q.burst_size())
        .arg(inner.borrow.min(q.burst_size()))
        .arg(back);
    let reply: Vec<i64> = match inner.call(&inv, true).await {
        Ok(r) => r,
        Err(_) => return inner.on_failure(src),
    };
    let Some(&[lent, wait_us, limit, remaining, reset_us]) =
        reply.get(..5).and_then(|r| <&[i64; 5]>::try_from(r).ok())
    else {
        return inner.fallback.admit(src);
    };
    let reset = Duration::from_micros(u64::try_from(reset_us.max(0)).unwrap_or(0));
    let status = Status {
        limit: u32::try_from(limit.max(0)).unwrap_or(u32::MAX),
        remaining: u32::try_from(remaining.max(0)).unwrap_or(u32::MAX),
        reset_ns: u64::try_from(reset.as_nanos()).unwrap_or(u64::MAX),
    };
    if lent < 1 {
        let wait = Duration::from_micros(u64::try_from(wait_us.max(1)).unwrap_or(1));
        let error = limited("requests", false, wait);
        shared.log_refusal(&lease_key.1, &error);
        return Err(Box::new(Rejected {
            error,
            headers: RateHeaders {
                requests: Some(status),
                tokens: None,
            },
            wait: Some(wait),
        }));
    }
    let spare = u32::try_from(lent - 1).unwrap_or(0);
    if spare > 0 {
        let mut leases = inner.leases.lock().unwrap_or_else(|e| e.into_inner());
        if leases.len() >= MAX_LEASES {
            leases.retain(|_, l| l.expires > now);
        }
        if leases.len() >= MAX_LEASES {
            // Full of live leases: the spare cells are not kept (they refill in the store).
            return Ok(admitted_with(status));
        }
        let l = leases.entry(lease_key).or_insert(Lease {
            cells: 0,
            expires: now + inner.lease,
            remaining: status.remaining,
            reset,
            at: now,
            limit: status.limit,
        });
        // A lease borrowed meanwhile by another request of the key keeps its cells.
        l.cells = l.cells.saturating_add(spare);
    }
    Ok(admitted_with(Status {
        remaining: status.remaining.saturating_add(spare),
        ..status
    }))
}

fn admitted_with(status: Status) -> Admitted {
    Admitted {
        guard: None,
        charge: None,
        headers: RateHeaders {
            requests: Some(status),
            tokens: None,
        },
    }
}

/// An admission in the store, owning the request head while it runs (the body stays with the
/// response future); it gives the head back with the decision.
pub(crate) type Admission = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = (http::request::Parts, Result<Admitted, Box<Rejected>>)>
            + Send,
    >,
>;

/// Starts the admission of the request whose head is `parts` in the store.
pub(crate) fn admission(shared: Arc<Shared>, parts: http::request::Parts) -> Admission {
    Box::pin(async move {
        let decision = admit(&shared, &RequestHead::from_parts(&parts)).await;
        (parts, decision)
    })
}
