//! The shape of the stack's TOML document: plain serde structs, one per section, with their
//! defaults in their `Default` impls, and a route's override of each section.

use std::collections::BTreeMap;
use std::fmt;
use std::num::{NonZeroU16, NonZeroU32, NonZeroU64, NonZeroUsize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::breaker::CircuitKey;
use crate::retry::Jitter;

/// Laying a route's override table over the top-level section, field by field.
///
/// `Patch` is the override's shape: every field optional. A field the override gives replaces
/// the top-level value; a field it leaves out keeps it. Tables merge the same way one level
/// down (`[routes."/x".rate_limit.defaults] rpm = 5` keeps the default `tpm`), and maps merge
/// by key (a tier named in the override is merged into the top-level tier of that name).
pub trait Merge {
    /// The override's shape.
    type Patch;
    /// Lays `patch` over `self`.
    fn merge(&mut self, patch: &Self::Patch);
}

/// Values that an override replaces as a whole.
macro_rules! replaced {
    ($($t:ty),* $(,)?) => {
        $(impl Merge for $t {
            type Patch = $t;
            fn merge(&mut self, patch: &$t) {
                *self = patch.clone();
            }
        })*
    };
}

replaced!(
    bool,
    u32,
    u64,
    String,
    Vec<String>,
    NonZeroU64,
    NonZeroUsize,
    Backend,
    JitterConfig,
    BreakerKey,
);

/// An optional value: the override sets it.
impl<T: Clone> Merge for Option<T> {
    type Patch = T;
    fn merge(&mut self, patch: &T) {
        *self = Some(patch.clone());
    }
}

/// A map: merged by key; a key only the override has starts from its default.
impl<T: Merge + Default> Merge for BTreeMap<String, T> {
    type Patch = BTreeMap<String, T::Patch>;
    fn merge(&mut self, patch: &Self::Patch) {
        for (key, p) in patch {
            self.entry(key.clone()).or_default().merge(p);
        }
    }
}

/// A section: the struct as the top level reads it (every field defaulted, defaults in its
/// `Default` impl), its override (every field optional) and the field-by-field merge.
macro_rules! section {
    (
        $(#[$meta:meta])*
        pub struct $name:ident, override $patch:ident {
            $( $(#[$fmeta:meta])* $field:ident : $ty:ty = $default:expr, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        impl Default for $name {
            fn default() -> Self {
                $name { $( $field: $default, )* }
            }
        }

        #[doc = concat!(
            "A route's override of [`", stringify!($name), "`]: the same keys, each optional. ",
            "A key given replaces the top-level value (tables and maps merge one level down); ",
            "a key left out keeps it (see [`Merge`])."
        )]
        #[derive(Debug, Clone, Default, PartialEq, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct $patch {
            $(
                #[doc = concat!("Overrides [`", stringify!($name), "::", stringify!($field), "`].")]
                pub $field: Option<<$ty as Merge>::Patch>,
            )*
        }

        impl Merge for $name {
            type Patch = $patch;
            fn merge(&mut self, patch: &$patch) {
                $( if let Some(p) = &patch.$field { Merge::merge(&mut self.$field, p); } )*
            }
        }
    };
}

/// The whole configuration file. Every section is optional; an empty document is valid (no
/// keys: every authenticated route answers `401`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StackConfig {
    /// API keys, one `[[keys]]` table each.
    pub keys: Vec<KeyConfig>,
    /// Request validation.
    pub validation: ValidationConfig,
    /// Rate limits per key.
    pub rate_limit: RateLimitConfig,
    /// Retries around the upstream call.
    pub retry: RetryConfig,
    /// The circuit breaker around the upstream.
    pub breaker: BreakerConfig,
    /// The upstream call.
    pub upstream: UpstreamConfig,
    /// Routes by path; a route not listed gets every layer with the top-level settings.
    pub routes: BTreeMap<String, RouteConfig>,
}

/// `[[keys]]`: one API key (the auth layer's key format).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// The key's id, safe to log (required).
    pub id: String,
    /// The plaintext secret; give it or `sha256`.
    #[serde(default)]
    pub secret: Option<Secret>,
    /// The hex SHA-256 digest of the secret, so that the file holds no secret.
    #[serde(default)]
    pub sha256: Option<Sha256Hex>,
    /// When the key stops working: a TOML datetime, an RFC 3339 string or unix seconds.
    #[serde(default)]
    pub expires_at: Option<Expiry>,
    /// A revoked key is refused with `revoked_api_key`.
    #[serde(default)]
    pub revoked: bool,
    /// Model names or globs the key may use (empty: any).
    #[serde(default)]
    pub models: Vec<String>,
    /// The key's rate-limit tier.
    #[serde(default)]
    pub tier: Option<String>,
    /// Free-form labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The key's own requests per minute (over its tier's).
    #[serde(default)]
    pub rpm: Option<u32>,
    /// The key's own LLM tokens per minute.
    #[serde(default)]
    pub tpm: Option<u64>,
    /// The key's own requests in flight at once.
    #[serde(default)]
    pub concurrency: Option<u32>,
}

/// A key's secret. Never shown by `Debug`; an empty secret is refused when read.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// A secret (not checked: the file's reader refuses an empty one).
    pub fn new(secret: impl Into<String>) -> Secret {
        Secret(secret.into())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<hidden>)")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.is_empty() {
            return Err(de::Error::custom("the secret is empty"));
        }
        Ok(Secret(s))
    }
}

/// A key's SHA-256 digest, checked to be 64 hex characters when read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sha256Hex(crate::auth::KeyHash);

impl Sha256Hex {
    /// The digest.
    pub fn hash(&self) -> &crate::auth::KeyHash {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Sha256Hex {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        crate::auth::KeyHash::from_hex(s.trim())
            .map(Sha256Hex)
            .ok_or_else(|| {
                de::Error::custom("expected 64 hex characters (the SHA-256 digest of the secret)")
            })
    }
}

/// When a key stops working, read from a TOML datetime (with a time and an offset), an
/// RFC 3339 string or unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry(pub SystemTime);

impl<'de> Deserialize<'de> for Expiry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let rfc3339 = |s: &str, hint: &str| {
            crate::classify::wait::parse_rfc3339(s)
                .map(Expiry)
                .ok_or_else(|| {
                    de::Error::custom(format!(
                        "not an RFC 3339 time at or after 1970 (2026-12-31T23:59:59Z){hint}"
                    ))
                })
        };
        match toml::Value::deserialize(d)? {
            toml::Value::String(s) => rfc3339(&s, ""),
            toml::Value::Datetime(t) => rfc3339(
                &t.to_string(),
                "; a TOML datetime needs a date, a time and an offset",
            ),
            toml::Value::Integer(n) => u64::try_from(n)
                .map(|secs| Expiry(UNIX_EPOCH + Duration::from_secs(secs)))
                .map_err(|_| de::Error::custom("unix seconds must not be negative")),
            other => Err(de::Error::custom(format!(
                "expected an RFC 3339 time or unix seconds, not a {}",
                other.type_str()
            ))),
        }
    }
}

/// A percentage within (0, 100], checked when read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percent(pub f64);

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        if v.is_finite() && v > 0.0 && v <= 100.0 {
            Ok(Percent(v))
        } else {
            Err(de::Error::custom(format!(
                "a percentage must be within (0, 100], got {v}"
            )))
        }
    }
}

/// A name that must not be empty, checked when read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Name(pub String);

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.is_empty() {
            return Err(de::Error::custom("must not be empty"));
        }
        Ok(Name(s))
    }
}

/// A Redis URL, which may carry a password: `Debug` does not show it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct RedisUrl(pub String);

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RedisUrl(<hidden>)")
    }
}

section! {
    /// `[validation]`: settings of [`ValidateRequestLayer`](crate::validate::ValidateRequestLayer).
    pub struct ValidationConfig, override ValidationOverride {
        /// Models accepted (empty: any).
        allowed_models: Vec<String> = Vec::new(),
        /// Extra context windows, model name → tokens.
        context_windows: BTreeMap<String, u64> = BTreeMap::new(),
        /// The most a request body may weigh, in bytes (default: the layer's, 4 MiB).
        body_limit: Option<NonZeroUsize> = None,
    }
}

/// Where the rate limiter's buckets live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// In this process (the default).
    #[default]
    Memory,
    /// In Redis, shared by every replica pointed at the same server (crate feature `redis`).
    Redis,
}

/// What the Redis rate-limit backend does while the server does not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RedisFailure {
    /// Decide on a local limiter at each quota divided by `replicas` (the default).
    Open,
    /// Answer `503`.
    Closed,
}

section! {
    /// Requests, tokens and concurrency of one key (`[rate_limit.defaults]`,
    /// `[rate_limit.tiers.NAME]`).
    pub struct LimitsConfig, override LimitsOverride {
        /// Requests per minute.
        rpm: Option<NonZeroU32> = None,
        /// Requests admitted at once from a full bucket (default: `rpm`).
        burst: Option<NonZeroU32> = None,
        /// LLM tokens per minute (estimated prompt + `max_tokens`, corrected from `usage`).
        tpm: Option<NonZeroU32> = None,
        /// Requests in flight at once.
        concurrency: Option<NonZeroU32> = None,
    }
}

section! {
    /// `[rate_limit]`: settings of [`RateLimitLayer`](crate::rate_limit::RateLimitLayer),
    /// keyed by the authenticated key.
    pub struct RateLimitConfig, override RateLimitOverride {
        /// Wait up to this many milliseconds for a bucket instead of answering `429` at once
        /// (default: answer at once).
        wait_ms: Option<NonZeroU64> = None,
        /// Limits of keys without a tier and without limits of their own.
        defaults: LimitsConfig = LimitsConfig::default(),
        /// Limits by tier name (`[rate_limit.tiers.free]`).
        tiers: BTreeMap<String, LimitsConfig> = BTreeMap::new(),
        /// Where the buckets live: `"memory"` (default) or `"redis"`.
        backend: Backend = Backend::Memory,
        /// With `backend = "redis"`: the server, `redis://[:password@]host:port/[db]`. Never
        /// shown by `Debug`.
        redis_url: Option<RedisUrl> = None,
        /// With `backend = "redis"`: the longest one call may take, in milliseconds
        /// (default 50).
        redis_timeout_ms: Option<NonZeroU64> = None,
        /// With `backend = "redis"`: `"open"` (default) or `"closed"` while the server does
        /// not answer.
        redis_failure: Option<RedisFailure> = None,
        /// With `backend = "redis"`: how many replicas share the quotas (default 1).
        replicas: Option<NonZeroU32> = None,
        /// With `backend = "redis"`: the prefix of the keys written (default `llm-layers:rl:`).
        redis_key_prefix: Option<String> = None,
        /// With `backend = "redis"`: requests a replica borrows at once for a key whose only
        /// limit is a request quota, and admits locally (default: none).
        redis_borrow: Option<u32> = None,
        /// With `redis_borrow`: how long a lease of borrowed requests lasts, in milliseconds
        /// (default 100).
        redis_borrow_lease_ms: Option<NonZeroU64> = None,
    }
}

/// The backoff jitter of `[retry]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JitterConfig {
    /// A uniform wait in `[0, backoff]` (the default).
    Full,
    /// Half the backoff plus a uniform wait in `[0, backoff / 2]`.
    Equal,
    /// Decorrelated jitter.
    Decorrelated,
    /// No jitter.
    None,
}

impl From<JitterConfig> for Jitter {
    fn from(j: JitterConfig) -> Jitter {
        match j {
            JitterConfig::Full => Jitter::Full,
            JitterConfig::Equal => Jitter::Equal,
            JitterConfig::Decorrelated => Jitter::Decorrelated,
            JitterConfig::None => Jitter::None,
        }
    }
}

section! {
    /// `[retry]`: settings of [`RetryLayer`](crate::retry::RetryLayer).
    pub struct RetryConfig, override RetryOverride {
        /// Attempts in total, the first one included (1 turns retries off).
        max_attempts: u32 = 3,
        /// The first backoff's upper bound, in milliseconds.
        backoff_base_ms: NonZeroU64 = NonZeroU64::new(500).expect("not zero"),
        /// The largest backoff, in milliseconds (default 8 000, or `backoff_base_ms` when
        /// that is larger).
        backoff_cap_ms: Option<NonZeroU64> = None,
        /// `"full"`, `"equal"`, `"decorrelated"` or `"none"`.
        jitter: JitterConfig = JitterConfig::Full,
        /// The time all attempts and waits may take together, in milliseconds (default: none).
        deadline_ms: Option<NonZeroU64> = None,
        /// A server's `retry-after` longer than this ends the retries, in milliseconds
        /// (default: the layer's, 60 000).
        max_retry_after_ms: Option<u64> = None,
        /// Retries allowed per request, on top of the floor (with any `budget_*` key: default
        /// 0.2). `0` with a floor of `0` turns retries off under load.
        budget_ratio: Option<f32> = None,
        /// Retries per second always allowed (with any `budget_*` key: default 10).
        budget_min_per_sec: Option<u32> = None,
        /// The budget's window, in milliseconds (with any `budget_*` key: default 10 000).
        budget_ttl_ms: Option<u64> = None,
        /// Once retries are exhausted, answer `x-should-retry: false`, so that clients (the
        /// official SDKs retry on their own) do not multiply the attempts.
        mark_exhausted: bool = true,
        /// Add a generated `Idempotency-Key` to each `POST`/`PATCH` without one, so that every
        /// request becomes retryable.
        idempotency_keys: bool = false,
        /// Seed of the backoff jitter.
        seed: Option<u64> = None,
    }
}

/// The defaults of the retry budget's keys, used once any of them is given.
pub(crate) const BUDGET_TTL_MS: u64 = 10_000;
pub(crate) const BUDGET_MIN_PER_SEC: u32 = 10;
pub(crate) const BUDGET_RATIO: f32 = 0.2;

/// Which circuit a call counts against (`[breaker] key_by`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerKey {
    /// One circuit for everything (the default).
    Single,
    /// One circuit per requested model.
    Model,
    /// One circuit per upstream (needs `upstream`).
    Upstream,
    /// One circuit per upstream and model (needs `upstream`).
    UpstreamAndModel,
}

impl From<BreakerKey> for CircuitKey {
    fn from(k: BreakerKey) -> CircuitKey {
        match k {
            BreakerKey::Single => CircuitKey::Single,
            BreakerKey::Model => CircuitKey::Model,
            BreakerKey::Upstream => CircuitKey::Upstream,
            BreakerKey::UpstreamAndModel => CircuitKey::UpstreamAndModel,
        }
    }
}

section! {
    /// `[breaker]`: settings of [`CircuitBreakerLayer`](crate::breaker::CircuitBreakerLayer).
    pub struct BreakerConfig, override BreakerOverride {
        /// The breaker's name in messages and logs.
        name: String = "upstream".to_owned(),
        /// `"single"`, `"model"`, `"upstream"` or `"upstream_and_model"`. The last two need
        /// `upstream`.
        key_by: BreakerKey = BreakerKey::Single,
        /// The name of the upstream the breaker guards (`"api.openai.com"`), the key of its
        /// circuit with `key_by = "upstream"` (never the client's `Host`).
        upstream: Option<Name> = None,
        /// Calls in the sliding window (default: the layer's, 100).
        window: Option<NonZeroUsize> = None,
        /// Calls before any decision (default: the layer's, 10).
        minimum_calls: Option<NonZeroU64> = None,
        /// Failure percentage that opens the circuit (default: the layer's, 50).
        failure_rate: Option<Percent> = None,
        /// How long the circuit stays open at first, in milliseconds (default: the layer's,
        /// 30 000).
        open_ms: Option<NonZeroU64> = None,
        /// The longest the circuit stays open as re-openings double the open time, in
        /// milliseconds (default 300 000, or `open_ms` when that is longer).
        max_open_ms: Option<NonZeroU64> = None,
        /// Probe calls admitted when half-open (default: the layer's, 3).
        half_open_probes: Option<NonZeroU16> = None,
        /// A call is slow when its response head takes longer than this, in milliseconds (no
        /// slow-call rule by default). Calls dropped by their caller after this long count as
        /// slow too, so a hanging upstream opens the circuit even when clients give up first.
        slow_call_ms: Option<NonZeroU64> = None,
        /// The percentage of slow calls that opens the circuit (default 80; needs
        /// `slow_call_ms`).
        slow_call_rate: Option<Percent> = None,
        /// The breaker's own timeout of each call, in milliseconds: an upstream that has not
        /// answered by then gets the caller a `504 timeout` and counts as a failure (default:
        /// none).
        call_timeout_ms: Option<NonZeroU64> = None,
        /// The model to degrade to while the circuit is open.
        fallback_model: Option<String> = None,
        /// The fallback chain, `[[breaker.fallback]]` tables in order: targets walked past
        /// an open circuit and past fallback-worthy answers, each with its own circuit (see
        /// [`FallbackTargetConfig`]). `fallback_model` is the shorthand for one model target
        /// used only while the circuit is open; with both, it comes first.
        fallback: Vec<FallbackTargetConfig> = Vec::new(),
        /// Seed of the open-duration jitter.
        seed: Option<u64> = None,
        /// Active health checks of the upstream, `[breaker.health_check]` (none by default).
        /// Only the top-level breaker takes one; the application starts it (the example
        /// gateway does, against its upstream).
        health_check: Option<HealthCheckConfig> = None,
    }
}

/// `[breaker.health_check]`: a background probe of the upstream that opens the circuit before
/// live traffic finds it down, and takes an open circuit half-open when it is back (see
/// [`HealthCheck`](crate::breaker::HealthCheck) for the rules). Built into a
/// [`HealthCheck`](crate::breaker::HealthCheck) by [`Stack::health_check`](super::Stack::health_check).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// The time between two probes, in milliseconds, before jitter (default 10 000).
    pub interval_ms: NonZeroU64,
    /// Each probe's timeout, in milliseconds (default 5 000; at most the interval).
    pub timeout_ms: NonZeroU64,
    /// The interval's jitter, a fraction in `[0, 1)` (default 0.1).
    pub jitter: f64,
    /// Failing probes in a row that open a closed circuit (default 3).
    pub failures_to_open: NonZeroU32,
    /// The probe's path (default `/v1/models`, or `/v1/models/{model}` with `model`): a
    /// `GET` that spends no tokens.
    pub path: Option<String>,
    /// The model whose circuit the probe steers, with `key_by = "model"` or
    /// `"upstream_and_model"` (required there).
    pub model: Option<Name>,
    /// Seed of the jitter.
    pub seed: Option<u64>,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            interval_ms: NonZeroU64::new(10_000).expect("not zero"),
            timeout_ms: NonZeroU64::new(5_000).expect("not zero"),
            jitter: 0.1,
            failures_to_open: NonZeroU32::new(3).expect("not zero"),
            path: None,
            model: None,
            seed: None,
        }
    }
}

/// `[[breaker.fallback]]`: one target of the breaker's fallback chain
/// ([`Target`](crate::breaker::Target)).
///
/// ```toml
/// [[breaker.fallback]]
/// model = "gpt-4o-mini"            # the same upstream, the body's model rewritten
///
/// [[breaker.fallback]]
/// upstream = "backup"              # an upstream the application defines by that name
/// model = "gpt-4o"
/// larger_context = true            # takes context_length_exceeded answers
/// on_content_policy = false        # takes content_policy_violation answers
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FallbackTargetConfig {
    /// The model asked for (the body's `model` is rewritten); without it, the request's own
    /// (only with `upstream`).
    #[serde(default)]
    pub model: Option<Name>,
    /// The name of an upstream the application defines and binds
    /// ([`CircuitBreakerLayer::bind_upstreams`](crate::breaker::CircuitBreakerLayer::bind_upstreams);
    /// the example gateway's `[upstreams.NAME]`); without it, the guarded upstream.
    #[serde(default)]
    pub upstream: Option<Name>,
    /// The target has a larger context window: `context_length_exceeded` answers go to it.
    #[serde(default)]
    pub larger_context: bool,
    /// The target is the alternative for `content_policy_violation` answers.
    #[serde(default)]
    pub on_content_policy: bool,
}

/// A route's `fallback` replaces the whole chain.
impl Merge for Vec<FallbackTargetConfig> {
    type Patch = Vec<FallbackTargetConfig>;
    fn merge(&mut self, patch: &Self::Patch) {
        *self = patch.clone();
    }
}

/// The default maximum open time of the breaker, in milliseconds.
pub(crate) const MAX_OPEN_MS: u64 = 300_000;
/// The default slow-call rate, in percent.
pub(crate) const SLOW_CALL_RATE: f64 = 80.0;

section! {
    /// `[upstream]`: the call to the upstream.
    pub struct UpstreamConfig, override UpstreamOverride {
        /// The time one attempt may take to the response head, in milliseconds.
        attempt_timeout_ms: NonZeroU64 = NonZeroU64::new(60_000).expect("not zero"),
        /// Hold the head of a 2xx event stream until its first event, so that a first event
        /// that is an error becomes an error answer (see
        /// [`NormalizeOptions::hold_first_event`](crate::normalize::NormalizeOptions::hold_first_event)).
        hold_first_event: bool = false,
        /// The most bytes held before the first event; beyond it the stream goes on
        /// undecided.
        first_event_max_bytes: NonZeroUsize =
            NonZeroUsize::new(crate::normalize::DEFAULT_FIRST_EVENT_MAX_BYTES).expect("not zero"),
        /// The longest wait for a stream's first event, in milliseconds (none by default).
        first_event_timeout_ms: Option<NonZeroU64> = None,
        /// The longest silence between two chunks of a stream, in milliseconds (none by
        /// default).
        stream_idle_timeout_ms: Option<NonZeroU64> = None,
        /// The longest a stream may last, in milliseconds (none by default).
        stream_total_timeout_ms: Option<NonZeroU64> = None,
    }
}

impl UpstreamConfig {
    /// The normalizer's stream settings from this section (the other options at their
    /// defaults).
    pub fn normalize_options(&self) -> crate::normalize::NormalizeOptions {
        let ms = |v: Option<NonZeroU64>| v.map(|v| std::time::Duration::from_millis(v.get()));
        crate::normalize::NormalizeOptions::new()
            .hold_first_event(self.hold_first_event)
            .first_event_max_bytes(self.first_event_max_bytes.get())
            .first_event_timeout(ms(self.first_event_timeout_ms))
            .stream_idle_timeout(ms(self.stream_idle_timeout_ms))
            .stream_total_timeout(ms(self.stream_total_timeout_ms))
    }
}

/// A route's `validate` or `rate_limit`: `true` (the default: the layer with the top-level
/// settings), `false` (no such layer on the route), or a table of overrides (the layer, with
/// the table merged over the top-level settings; see [`Merge`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Switch<P> {
    /// The layer with the top-level settings.
    #[default]
    On,
    /// No such layer on this route.
    Off,
    /// The layer with these overrides of the top-level settings.
    Override(P),
}

impl<P> Switch<P> {
    /// Whether the route has the layer.
    pub fn is_on(&self) -> bool {
        !matches!(self, Switch::Off)
    }

    /// The overrides, if any.
    pub fn overrides(&self) -> Option<&P> {
        match self {
            Switch::Override(p) => Some(p),
            _ => None,
        }
    }
}

impl<'de, P: Deserialize<'de>> Deserialize<'de> for Switch<P> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SwitchVisitor<P>(std::marker::PhantomData<P>);
        impl<'de, P: Deserialize<'de>> Visitor<'de> for SwitchVisitor<P> {
            type Value = Switch<P>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("true, false or a table of settings")
            }
            fn visit_bool<E: de::Error>(self, on: bool) -> Result<Switch<P>, E> {
                Ok(if on { Switch::On } else { Switch::Off })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Switch<P>, A::Error> {
                P::deserialize(de::value::MapAccessDeserializer::new(map)).map(Switch::Override)
            }
        }
        d.deserialize_any(SwitchVisitor(std::marker::PhantomData))
    }
}

/// `[routes."/path"]`: the layers of one route and their settings.
///
/// `auth`, `validate` and `rate_limit` are on unless set to `false`; `validate`,
/// `rate_limit`, `retry`, `breaker` and `upstream` may instead be tables that override the top-level
/// section's keys for this route (a key left out keeps the top-level value). A route with an
/// override table gets a layer of its own (its own buckets, budget or circuits); the others
/// share the top-level layers.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteConfig {
    /// API-key authentication.
    pub auth: bool,
    /// Request validation: on, off, or overrides of `[validation]`.
    pub validate: Switch<ValidationOverride>,
    /// Rate limiting: on, off, or overrides of `[rate_limit]`.
    pub rate_limit: Switch<RateLimitOverride>,
    /// Overrides of `[retry]` for this route's upstream calls.
    pub retry: Option<RetryOverride>,
    /// Overrides of `[breaker]` for this route's upstream calls.
    pub breaker: Option<BreakerOverride>,
    /// Overrides of `[upstream]` for this route's upstream calls.
    pub upstream: Option<UpstreamOverride>,
}

impl Default for RouteConfig {
    fn default() -> Self {
        RouteConfig {
            auth: true,
            validate: Switch::On,
            rate_limit: Switch::On,
            retry: None,
            breaker: None,
            upstream: None,
        }
    }
}

/// `section` with `patch` merged over it.
pub(crate) fn merged<T: Merge + Clone>(section: &T, patch: &T::Patch) -> T {
    let mut out = section.clone();
    out.merge(patch);
    out
}
