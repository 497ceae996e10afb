//! Quotas, limits, keys and the validated builder.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Extensions, HeaderName};

use crate::body::DEFAULT_BODY_LIMIT;
use crate::request::{CharEstimator, KeyFn, RequestHead, TokenEstimator};

use super::layer::RateLimitLayer;
use super::shared::Shared;
use super::store::MAX_AHEAD_NANOS;

/// A rate and a burst: `count` cells every `period`, at most `burst` at once.
///
/// Cells are requests or LLM tokens, depending on where the quota is used. The rate and the
/// burst are separate on purpose: `Quota::per_minute(600).burst(20)` admits 20 at once and then
/// one every 100 ms. The burst must be set; [`RateLimitLayerBuilder::build`] says so otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    count: u64,
    period: Duration,
    burst: u32,
}

impl Quota {
    /// `n` cells per second.
    pub const fn per_second(n: u64) -> Quota {
        Quota::new(n, Duration::from_secs(1))
    }

    /// `n` cells per minute.
    pub const fn per_minute(n: u64) -> Quota {
        Quota::new(n, Duration::from_secs(60))
    }

    /// `n` cells per hour.
    pub const fn per_hour(n: u64) -> Quota {
        Quota::new(n, Duration::from_secs(3600))
    }

    /// `count` cells per `period`.
    pub const fn new(count: u64, period: Duration) -> Quota {
        Quota {
            count,
            period,
            burst: 0,
        }
    }

    /// The most cells admitted at once (the bucket's size).
    pub const fn burst(mut self, burst: u32) -> Quota {
        self.burst = burst;
        self
    }

    /// The cells per period.
    pub const fn count(&self) -> u64 {
        self.count
    }

    /// The period.
    pub const fn period(&self) -> Duration {
        self.period
    }

    /// The bucket's size.
    pub const fn burst_size(&self) -> u32 {
        self.burst
    }

    /// The time one cell takes to come back, in nanoseconds (at least 1).
    pub(crate) fn replenish_nanos(&self) -> u64 {
        let ns = self.period.as_nanos() / u128::from(self.count.max(1));
        u64::try_from(ns).unwrap_or(u64::MAX).max(1)
    }

    pub(crate) fn to_governor(self) -> governor::Quota {
        let burst = std::num::NonZeroU32::new(self.burst).unwrap_or(std::num::NonZeroU32::MIN);
        governor::Quota::with_period(Duration::from_nanos(self.replenish_nanos()))
            .unwrap_or_else(|| governor::Quota::per_second(burst))
            .allow_burst(burst)
    }

    /// This quota shared by `n` replicas: a rate and a burst `n` times smaller, each at least
    /// one cell.
    pub(crate) fn divided(self, n: u32) -> Quota {
        if n <= 1 {
            return self;
        }
        Quota {
            count: (self.count / u64::from(n)).max(1),
            period: self.period,
            burst: (self.burst / n).max(1),
        }
    }

    fn validate(&self, field: &str) -> Result<(), ConfigError> {
        if self.count == 0 {
            return Err(config_error(format!("{field}: the rate must be positive")));
        }
        if self.period.is_zero() {
            return Err(config_error(format!(
                "{field}: the period must be positive"
            )));
        }
        if self.burst == 0 {
            return Err(config_error(format!(
                "{field}: the burst is not set or zero; call .burst(n) with n >= 1"
            )));
        }
        if self.period.as_nanos() / u128::from(self.count) == 0 {
            return Err(config_error(format!(
                "{field}: the rate is more than one cell per nanosecond"
            )));
        }
        if !self.fill_time_fits() {
            return Err(config_error(format!(
                "{field}: a full bucket takes more than 73 years to refill (burst {} at {} per {:?}); lower the burst or raise the rate",
                self.burst, self.count, self.period
            )));
        }
        Ok(())
    }

    /// Whether an empty bucket refills within [`MAX_AHEAD_NANOS`] (about 73 years): beyond
    /// that, governor's arithmetic on the bucket's state could overflow.
    pub(crate) fn fill_time_fits(&self) -> bool {
        u128::from(self.replenish_nanos()) * u128::from(self.burst) <= u128::from(MAX_AHEAD_NANOS)
    }
}

/// The limits of one tier (or the defaults, or the global limits): requests, tokens, and
/// requests in flight. Each is optional.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Limits {
    pub(crate) requests: Option<Quota>,
    pub(crate) tokens: Option<Quota>,
    pub(crate) concurrency: Option<u32>,
}

impl Limits {
    /// No limits.
    pub const fn new() -> Limits {
        Limits {
            requests: None,
            tokens: None,
            concurrency: None,
        }
    }

    /// Limits requests.
    pub const fn requests(mut self, quota: Quota) -> Limits {
        self.requests = Some(quota);
        self
    }

    /// Limits LLM tokens: each request is charged its estimated prompt tokens plus its
    /// `max_tokens`, corrected from the response's `usage`.
    pub const fn tokens(mut self, quota: Quota) -> Limits {
        self.tokens = Some(quota);
        self
    }

    /// Limits requests in flight at once.
    pub const fn concurrency(mut self, n: u32) -> Limits {
        self.concurrency = Some(n);
        self
    }

    /// The request quota.
    pub const fn request_quota(&self) -> Option<Quota> {
        self.requests
    }

    /// The token quota.
    pub const fn token_quota(&self) -> Option<Quota> {
        self.tokens
    }

    /// The cap on requests in flight.
    pub const fn max_concurrency(&self) -> Option<u32> {
        self.concurrency
    }

    fn validate(&self, field: &str) -> Result<(), ConfigError> {
        if let Some(q) = &self.requests {
            q.validate(&format!("{field}.requests"))?;
        }
        if let Some(q) = &self.tokens {
            q.validate(&format!("{field}.tokens"))?;
        }
        if self.concurrency == Some(0) {
            return Err(config_error(format!(
                "{field}.concurrency: must be at least 1"
            )));
        }
        Ok(())
    }

    /// These limits shared by `n` replicas: each quota and the concurrency `n` times smaller,
    /// each at least 1.
    #[cfg(feature = "redis")]
    pub(crate) fn divided(self, n: u32) -> Limits {
        Limits {
            requests: self.requests.map(|q| q.divided(n)),
            tokens: self.tokens.map(|q| q.divided(n)),
            concurrency: self.concurrency.map(|c| (c / n.max(1)).max(1)),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.requests.is_none() && self.tokens.is_none() && self.concurrency.is_none()
    }
}

pub use crate::config::ConfigError;

/// Splits a `field: message` text into the shared error.
fn config_error(text: String) -> ConfigError {
    match text.split_once(": ") {
        Some((field, message)) => {
            ConfigError::new("rate limit", field.to_owned(), message.to_owned())
        }
        None => ConfigError::new("rate limit", "", text),
    }
}

/// What a rejected request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnLimit {
    /// Answer `429` at once (servers).
    #[default]
    Reject,
    /// Sleep until the request conforms, if that is at most this long; otherwise answer `429`
    /// (clients pacing themselves).
    Wait(Duration),
}

type IpFn = fn(&Extensions) -> Option<IpAddr>;

/// Which bucket a request falls into. Requests without a key share one anonymous bucket.
#[derive(Clone)]
pub struct BucketKey(pub(crate) KeyKind);

#[derive(Clone)]
pub(crate) enum KeyKind {
    ApiKey,
    Header(HeaderName),
    Ip {
        peer: IpFn,
        trusted: Vec<String>,
        v6_prefix: u8,
    },
    Route,
    Model,
    Custom(KeyFn),
}

impl fmt::Debug for BucketKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            KeyKind::ApiKey => f.write_str("BucketKey::api_key"),
            KeyKind::Header(h) => write!(f, "BucketKey::header({h})"),
            KeyKind::Ip {
                trusted, v6_prefix, ..
            } => write!(
                f,
                "BucketKey::client_ip(trusted: {trusted:?}, ipv6_prefix: {v6_prefix})"
            ),
            KeyKind::Route => f.write_str("BucketKey::route"),
            KeyKind::Model => f.write_str("BucketKey::model"),
            KeyKind::Custom(_) => f.write_str("BucketKey::custom"),
        }
    }
}

fn socket_addr(ext: &Extensions) -> Option<IpAddr> {
    ext.get::<std::net::SocketAddr>().map(|a| a.ip())
}

impl BucketKey {
    /// The id of the [`KeyIdentity`](crate::ext::KeyIdentity) an authentication layer put in
    /// the request extensions.
    pub fn api_key() -> BucketKey {
        BucketKey(KeyKind::ApiKey)
    }

    /// The value of a header (an `x-user-id` set by a trusted gateway, say).
    pub fn header(name: HeaderName) -> BucketKey {
        BucketKey(KeyKind::Header(name))
    }

    /// The client's IP address, read from a `std::net::SocketAddr` in the request extensions.
    ///
    /// An IPv6 client is keyed by its network, the first 64 bits of its address by default
    /// ([`ipv6_prefix`](Self::ipv6_prefix)): one customer's /64 holds 2^64 addresses, one
    /// bucket each would let it have as many buckets as it likes. An IPv4-mapped IPv6 address
    /// (`::ffff:a.b.c.d`, as a dual-stack listener reports IPv4 peers) is keyed as the IPv4
    /// address it maps.
    pub fn client_ip() -> BucketKey {
        BucketKey::client_ip_from(socket_addr)
    }

    /// The client's IP address, read from the extensions by `peer`. With axum's
    /// `into_make_service_with_connect_info::<SocketAddr>()`, pass
    /// `|ext| ext.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip())`.
    pub fn client_ip_from(peer: fn(&Extensions) -> Option<IpAddr>) -> BucketKey {
        BucketKey(KeyKind::Ip {
            peer,
            trusted: Vec::new(),
            v6_prefix: DEFAULT_IPV6_PREFIX,
        })
    }

    /// For [`BucketKey::client_ip`]: how many leading bits of an IPv6 address make the key
    /// (default 64; 128 keys each address, 48 a site, 0 puts every IPv6 client in one bucket).
    /// More than 128 is refused by `build`.
    pub fn ipv6_prefix(mut self, bits: u8) -> BucketKey {
        if let KeyKind::Ip { v6_prefix, .. } = &mut self.0 {
            *v6_prefix = bits;
        }
        self
    }

    /// For [`BucketKey::client_ip`]: proxies (addresses or CIDR blocks such as `10.0.0.0/8`) whose
    /// `x-forwarded-for` is believed. When the peer is trusted, the key is the right-most hop of
    /// `x-forwarded-for` that is not trusted. Invalid entries are reported by `build`.
    pub fn trusted_proxies<I, S>(mut self, proxies: I) -> BucketKey
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        if let KeyKind::Ip { trusted, .. } = &mut self.0 {
            trusted.extend(proxies.into_iter().map(Into::into));
        }
        self
    }

    /// The request path (one bucket per route).
    pub fn route() -> BucketKey {
        BucketKey(KeyKind::Route)
    }

    /// The model the upstream serves: the deployment named by an Azure-style path
    /// (`/openai/deployments/{name}/...`), else the `model` of the request body (the body is
    /// buffered once to read it); see [`RequestView::routed_model`](crate::request::RequestView::routed_model).
    pub fn model() -> BucketKey {
        BucketKey(KeyKind::Model)
    }

    /// A key computed by `f` from the request's [`RequestHead`] (method, URI, headers,
    /// extensions, and the [`RequestView`](crate::request::RequestView) when the body was
    /// read); `None` falls into the anonymous bucket. The same key function type,
    /// [`KeyFn`], keys circuits too.
    pub fn custom<F>(f: F) -> BucketKey
    where
        F: Fn(&RequestHead<'_>) -> Option<Arc<str>> + Send + Sync + 'static,
    {
        BucketKey(KeyKind::Custom(Arc::new(f)))
    }
}

/// The default prefix length IPv6 clients are keyed by.
pub(crate) const DEFAULT_IPV6_PREFIX: u8 = 64;

/// The default longest key stored as it is; longer keys are stored as their SHA-256.
pub(crate) const DEFAULT_MAX_KEY_LEN: usize = 256;

/// An IP block: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub(crate) fn parse(s: &str) -> Option<Cidr> {
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, Some(p.parse::<u8>().ok()?)),
            None => (s.trim().parse::<IpAddr>().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(Cidr { addr, prefix })
    }

    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        let ip = match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V6(v6)) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            _ => ip,
        };
        match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(a) & mask == u32::from(b) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(a) & mask == u128::from(b) & mask
            }
            _ => false,
        }
    }
}

/// Builds a [`RateLimitLayer`]; [`build`](Self::build) validates everything.
pub struct RateLimitLayerBuilder {
    pub(crate) key_by: BucketKey,
    pub(crate) defaults: Limits,
    pub(crate) tiers: Vec<(Arc<str>, Limits)>,
    pub(crate) global: Limits,
    pub(crate) mode: OnLimit,
    pub(crate) sweep_every: u64,
    pub(crate) sweep_interval: Duration,
    pub(crate) key_limits: bool,
    pub(crate) body_limit: usize,
    pub(crate) estimator: Arc<dyn TokenEstimator>,
    pub(crate) max_key_len: usize,
    /// Each key's own `rpm`/`tpm` is divided by this (a local fallback's replica count).
    pub(crate) divide: u32,
    #[cfg(feature = "redis")]
    pub(crate) redis: Option<super::redis::RedisBackend>,
}

impl fmt::Debug for RateLimitLayerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayerBuilder")
            .field("key_by", &self.key_by)
            .field("defaults", &self.defaults)
            .field("tiers", &self.tiers)
            .field("global", &self.global)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Default for RateLimitLayerBuilder {
    fn default() -> Self {
        RateLimitLayerBuilder {
            key_by: BucketKey::api_key(),
            defaults: Limits::new(),
            tiers: Vec::new(),
            global: Limits::new(),
            mode: OnLimit::Reject,
            sweep_every: 1024,
            sweep_interval: Duration::from_secs(10),
            key_limits: true,
            body_limit: DEFAULT_BODY_LIMIT,
            estimator: Arc::new(CharEstimator),
            max_key_len: DEFAULT_MAX_KEY_LEN,
            divide: 1,
            #[cfg(feature = "redis")]
            redis: None,
        }
    }
}

impl RateLimitLayerBuilder {
    /// How requests are keyed (default: [`BucketKey::api_key`]).
    pub fn key_by(mut self, key_by: BucketKey) -> Self {
        self.key_by = key_by;
        self
    }

    /// The limits of keys with no tier, or a tier not configured here.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.defaults = limits;
        self
    }

    /// The limits of keys whose [`KeyIdentity`](crate::ext::KeyIdentity) has this tier.
    pub fn tier(mut self, name: impl Into<Arc<str>>, limits: Limits) -> Self {
        self.tiers.push((name.into(), limits));
        self
    }

    /// Limits shared by all keys together.
    pub fn global(mut self, limits: Limits) -> Self {
        self.global = limits;
        self
    }

    /// Reject (default) or wait.
    pub fn mode(mut self, mode: OnLimit) -> Self {
        self.mode = mode;
        self
    }

    /// Whether a key's own [`KeyLimits`](crate::ext::KeyLimits) override its tier (default
    /// `true`). A key's `rpm` of `n` becomes `Quota::per_minute(n).burst(n)`, its `tpm`
    /// likewise, its `concurrency` the cap on requests in flight.
    pub fn key_limits(mut self, on: bool) -> Self {
        self.key_limits = on;
        self
    }

    /// Idle keys are swept from memory at most once per `interval` (default 10 s), checked
    /// every `every` admissions (default 1024). A key is idle when its bucket is full again, so
    /// forgetting it changes no decision.
    pub fn sweep(mut self, every: u64, interval: Duration) -> Self {
        self.sweep_every = every;
        self.sweep_interval = interval;
        self
    }

    /// The most request-body bytes read to estimate tokens (default
    /// [`DEFAULT_BODY_LIMIT`]).
    pub fn body_limit(mut self, limit: usize) -> Self {
        self.body_limit = limit;
        self
    }

    /// The longest key, in bytes, kept as it is (default 256). A longer key (a header value, a
    /// model name, a route or a custom key the client chose) is kept as its SHA-256 instead:
    /// every key then costs at most this much memory, and distinct keys still get distinct
    /// buckets. 0 stores every non-empty key as its digest.
    pub fn max_key_len(mut self, bytes: usize) -> Self {
        self.max_key_len = bytes;
        self
    }

    /// The token estimator (default [`CharEstimator`]).
    pub fn estimator(mut self, estimator: impl TokenEstimator) -> Self {
        self.estimator = Arc::new(estimator);
        self
    }

    /// Keeps the buckets and in-flight counts in Redis or Valkey, shared by every replica
    /// configured with the same store (feature `redis`); see [`RedisBackend`](super::RedisBackend).
    /// Without it, they live in this process's memory.
    #[cfg(feature = "redis")]
    pub fn redis(mut self, backend: super::redis::RedisBackend) -> Self {
        self.redis = Some(backend);
        self
    }

    /// Validates the configuration and builds the layer.
    #[cfg_attr(not(feature = "redis"), allow(unused_mut))]
    pub fn build(mut self) -> Result<RateLimitLayer, ConfigError> {
        self.defaults.validate("limits")?;
        self.global.validate("global")?;
        let mut tiers = HashMap::new();
        for (name, limits) in &self.tiers {
            if name.is_empty() {
                return Err(config_error("tier: the name is empty".into()));
            }
            limits.validate(&format!("tier[{name:?}]"))?;
            if tiers.insert(name.clone(), *limits).is_some() {
                return Err(config_error(format!("tier[{name:?}]: configured twice")));
            }
        }
        if self.defaults.is_empty()
            && self.global.is_empty()
            && tiers.values().all(Limits::is_empty)
            && !self.key_limits
        {
            return Err(config_error(
                "limits: no quota is configured anywhere".into(),
            ));
        }
        if self.sweep_every == 0 {
            return Err(config_error("sweep.every: must be at least 1".into()));
        }
        if let OnLimit::Wait(d) = self.mode {
            if d.is_zero() {
                return Err(config_error(
                    "mode: Wait needs a positive maximum wait; use OnLimit::Reject".into(),
                ));
            }
        }
        let mut trusted = Vec::new();
        if let KeyKind::Ip { v6_prefix, .. } = &self.key_by.0 {
            if *v6_prefix > 128 {
                return Err(config_error(format!(
                    "key_by.ipv6_prefix: {v6_prefix} is more than the 128 bits of an IPv6 address"
                )));
            }
        }
        if let KeyKind::Ip { trusted: list, .. } = &self.key_by.0 {
            for s in list {
                trusted.push(Cidr::parse(s).ok_or_else(|| {
                    config_error(format!(
                        "key_by.trusted_proxies: {s:?} is not an IP address or CIDR block"
                    ))
                })?);
            }
        }
        #[cfg(feature = "redis")]
        if let Some(backend) = self.redis.take() {
            let client = backend.validate()?;
            let n = backend.replica_count();
            let local = RateLimitLayerBuilder {
                key_by: self.key_by.clone(),
                defaults: self.defaults.divided(n),
                tiers: Vec::new(),
                global: self.global.divided(n),
                mode: self.mode,
                sweep_every: self.sweep_every,
                sweep_interval: self.sweep_interval,
                key_limits: self.key_limits,
                body_limit: self.body_limit,
                estimator: self.estimator.clone(),
                max_key_len: self.max_key_len,
                divide: n,
                redis: None,
            };
            let local_tiers = tiers
                .iter()
                .map(|(k, v)| (k.clone(), v.divided(n)))
                .collect();
            let fallback = Arc::new(Shared::new(local, local_tiers, trusted.clone()));
            let mut shared = Shared::new(self, tiers, trusted);
            let hide = shared.hides_keys();
            shared.remote = Some(super::redis::Remote::new(backend, client, fallback, hide));
            return Ok(RateLimitLayer::from_shared(Arc::new(shared)));
        }
        Ok(RateLimitLayer::from_shared(Arc::new(Shared::new(
            self, tiers, trusted,
        ))))
    }
}
