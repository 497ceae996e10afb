//! Declarative stacks: one TOML document turned into ready, validated layers.
//!
//! # Why
//!
//! Each layer of this crate has its own builder, checked when built. A gateway needs all of
//! them, configured from one file that operators edit, refused at start when any value is
//! wrong, with the error naming the field. [`StackConfig`] is that file's shape (plain serde
//! structs, so it can also be embedded in a larger configuration of your own), and
//! [`Stack`] holds the layers it builds:
//!
//! | section | builds |
//! |---|---|
//! | `[[keys]]` | the key store of [`ApiKeyAuthLayer`] (the auth layer's own `[[keys]]` format) |
//! | `[validation]` | [`ValidateRequestLayer`] |
//! | `[rate_limit]` | [`RateLimitLayer`] (defaults and tiers; each key's own `rpm`/`tpm`/`concurrency` override them) |
//! | `[retry]` | [`RetryLayer`]: attempts, backoff, deadline and budget |
//! | `[breaker]` | [`CircuitBreakerLayer`] with its fallback model |
//! | `[upstream]` | the per-attempt timeout |
//! | `[routes."/path"]` | a [`RoutePolicy`]: which edge layers guard that route |
//!
//! The layers stay independent: [`Stack`] only hands out clones of them (they share their
//! state through an `Arc`, so every clone counts against the same circuits and buckets), and
//! you stack them where you want: router-wide, or per route with `MethodRouter::layer` as in
//! the example below (one `.layer` per present layer, so routes with and without a layer
//! need no common service type), or around a client with `tower::ServiceBuilder`.
//!
//! # Errors
//!
//! Every error is the crate's [`ConfigError`] (layer `"configuration"`) whose
//! [`field`](ConfigError::field) is the TOML path of the refused value (`breaker.failure_rate`,
//! `keys[2].sha256`, `routes."/v1/models".auth`) and whose message never quotes a secret.
//!
//! # Example
//!
//! ```
//! use axum::routing::{get, post, MethodRouter};
//! use axum::Router;
//! use axum::body::Body;
//! use llm_layers::stack::Stack;
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let stack = Stack::from_toml_str(r#"
//!     [[keys]]
//!     id = "team-a"
//!     secret = "sk-team-a-0123456789abcdef"
//!
//!     [validation]
//!     allowed_models = ["gpt-4o", "gpt-4o-mini"]
//!
//!     [breaker]
//!     failure_rate = 50.0
//!     fallback_model = "gpt-4o-mini"
//!
//!     [routes."/v1/models"]
//!     validate = false
//!
//!     [routes."/healthz"]
//!     auth = false
//!     validate = false
//! "#)?;
//!
//! // Per route: the layers the route's policy asks for. `MethodRouter::layer` wraps what is
//! // already there, so the innermost layer comes first: auth ends up outermost.
//! let guarded = |path: &str, mut route: MethodRouter| {
//!     if let Some(layer) = stack.rate_limit_for(path) {
//!         route = route.layer(layer);
//!     }
//!     if let Some(layer) = stack.validate_for(path) {
//!         route = route.layer(layer);
//!     }
//!     if let Some(layer) = stack.auth_for(path) {
//!         route = route.layer(layer);
//!     }
//!     route
//! };
//! let app: Router = Router::new()
//!     .route("/v1/chat/completions", guarded("/v1/chat/completions", post(|| async { "{}" })))
//!     .route("/v1/models", guarded("/v1/models", get(|| async { "{}" })))
//!     .route("/healthz", guarded("/healthz", get(|| async { "ok" })));
//!
//! // No key: /healthz answers, the chat route refuses with the envelope.
//! let call = |path: &str| {
//!     let method = if path == "/healthz" { "GET" } else { "POST" };
//!     let req = http::Request::builder().method(method).uri(path).body(Body::empty()).unwrap();
//!     app.clone().oneshot(req)
//! };
//! assert_eq!(call("/healthz").await?.status(), 200);
//! assert_eq!(call("/v1/chat/completions").await?.status(), 401);
//!
//! // A wrong value is refused, naming the field.
//! let err = Stack::from_toml_str("[breaker]\nfailure_rate = 120.0").unwrap_err();
//! assert_eq!(err.field(), "breaker.failure_rate");
//! # Ok(())
//! # }
//! ```

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::auth::{ApiKeyAuthLayer, InMemoryKeyStore};
use crate::breaker::{CircuitBreakerLayer, CircuitKey};
use crate::rate_limit::{Limits, OnLimit, Quota, RateLimitLayer};
use crate::retry::{Backoff, Jitter, RetryBudget, RetryLayer};
use crate::validate::ValidateRequestLayer;

pub use crate::config::ConfigError;

/// A refused value at a TOML path.
fn refuse(
    field: impl Into<Cow<'static, str>>,
    message: impl Into<Cow<'static, str>>,
) -> ConfigError {
    ConfigError::new("configuration", field, message)
}

/// The whole configuration file. Every section is optional; an empty document is valid (no
/// keys: every authenticated route answers `401`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StackConfig {
    /// API keys, in the auth layer's `[[keys]]` format (see
    /// [`InMemoryKeyStore::from_toml_str`]).
    #[serde(default)]
    pub keys: Vec<toml::Table>,
    /// Request validation.
    #[serde(default)]
    pub validation: ValidationConfig,
    /// Rate limits per key.
    #[serde(default)]
    pub rate_limit: RateLimitConfig,
    /// Retries around the upstream call.
    #[serde(default)]
    pub retry: RetryConfig,
    /// The circuit breaker around the upstream.
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// The upstream call.
    #[serde(default)]
    pub upstream: UpstreamConfig,
    /// Policies by route path; a route not listed gets [`RoutePolicy::default`] (everything on).
    #[serde(default)]
    pub routes: BTreeMap<String, RoutePolicy>,
}

/// `[validation]`: settings of [`ValidateRequestLayer`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationConfig {
    /// Models accepted (empty: any).
    #[serde(default)]
    pub allowed_models: Vec<String>,
    /// Extra context windows, model name → tokens.
    #[serde(default)]
    pub context_windows: BTreeMap<String, u64>,
    /// The most a request body may weigh, in bytes (default 4 MiB).
    pub body_limit: Option<usize>,
}

/// `[rate_limit]`: settings of [`RateLimitLayer`], keyed by the authenticated key.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Wait up to this many milliseconds for a bucket instead of answering `429` at once
    /// (default: answer at once).
    pub wait_ms: Option<u64>,
    /// Limits of keys without a tier and without limits of their own.
    #[serde(default)]
    pub defaults: LimitsConfig,
    /// Limits by tier name (`[rate_limit.tiers.free]`).
    #[serde(default)]
    pub tiers: BTreeMap<String, LimitsConfig>,
    /// Where the buckets live: `"memory"` (default, this process) or `"redis"` (shared by
    /// every replica pointed at the same server; needs the crate feature `redis`).
    pub backend: Option<String>,
    /// With `backend = "redis"`: the server, `redis://[:password@]host:port/[db]`. Never
    /// shown by `Debug`.
    pub redis_url: Option<RedisUrl>,
    /// With `backend = "redis"`: the longest one call may take, in milliseconds (default 50).
    pub redis_timeout_ms: Option<u64>,
    /// With `backend = "redis"`: `"open"` (default: decide on a local limiter at each quota
    /// divided by `replicas`) or `"closed"` (answer `503`) while the server does not answer.
    pub redis_failure: Option<String>,
    /// With `backend = "redis"`: how many replicas share the quotas (default 1).
    pub replicas: Option<u32>,
    /// With `backend = "redis"`: the prefix of the keys written (default `llm-layers:rl:`).
    pub redis_key_prefix: Option<String>,
    /// With `backend = "redis"`: requests a replica borrows at once for a key whose only
    /// limit is a request quota, and admits locally (default 0: off).
    pub redis_borrow: Option<u32>,
    /// With `redis_borrow`: how long a lease of borrowed requests lasts, in milliseconds
    /// (default 100).
    pub redis_borrow_lease_ms: Option<u64>,
}

/// A Redis URL, which may carry a password: `Debug` does not show it.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct RedisUrl(pub String);

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedisUrl(<hidden>)")
    }
}

/// Requests, tokens and concurrency of one key.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// Requests admitted at once from a full bucket (default: `rpm`).
    pub burst: Option<u32>,
    /// LLM tokens per minute (estimated prompt + `max_tokens`, corrected from `usage`).
    pub tpm: Option<u64>,
    /// Requests in flight at once.
    pub concurrency: Option<u32>,
}

/// Applies `backend` and the `redis_*` keys of `[rate_limit]`.
fn rate_limit_backend(
    r: &RateLimitConfig,
    b: crate::rate_limit::RateLimitLayerBuilder,
) -> Result<crate::rate_limit::RateLimitLayerBuilder, ConfigError> {
    let redis = match r.backend.as_deref() {
        None | Some("memory") => false,
        Some("redis") => true,
        Some(other) => {
            return Err(refuse(
                "rate_limit.backend",
                format!("{other:?} is not a backend; use \"memory\" or \"redis\""),
            ))
        }
    };
    if !redis {
        let stray = [
            ("redis_url", r.redis_url.is_some()),
            ("redis_timeout_ms", r.redis_timeout_ms.is_some()),
            ("redis_failure", r.redis_failure.is_some()),
            ("replicas", r.replicas.is_some()),
            ("redis_key_prefix", r.redis_key_prefix.is_some()),
            ("redis_borrow", r.redis_borrow.is_some()),
            ("redis_borrow_lease_ms", r.redis_borrow_lease_ms.is_some()),
        ];
        if let Some((name, _)) = stray.iter().find(|(_, set)| *set) {
            return Err(refuse(
                format!("rate_limit.{name}"),
                "only applies with backend = \"redis\"",
            ));
        }
        return Ok(b);
    }
    #[cfg(not(feature = "redis"))]
    {
        let _ = b;
        Err(refuse(
            "rate_limit.backend",
            "\"redis\" needs the crate built with the `redis` feature",
        ))
    }
    #[cfg(feature = "redis")]
    {
        use crate::rate_limit::{FailurePolicy, RedisBackend};
        let Some(url) = &r.redis_url else {
            return Err(refuse(
                "rate_limit.redis_url",
                "required with backend = \"redis\"",
            ));
        };
        let mut backend = RedisBackend::new(url.0.clone());
        match r.redis_timeout_ms {
            Some(0) => return Err(refuse("rate_limit.redis_timeout_ms", "must be at least 1")),
            Some(ms) => backend = backend.timeout(Duration::from_millis(ms)),
            None => {}
        }
        match r.redis_failure.as_deref() {
            None | Some("open") => {}
            Some("closed") => backend = backend.on_failure(FailurePolicy::FailClosed),
            Some(other) => {
                return Err(refuse(
                    "rate_limit.redis_failure",
                    format!("{other:?} is not a policy; use \"open\" or \"closed\""),
                ))
            }
        }
        if let Some(n) = r.replicas {
            backend = backend.replicas(n);
        }
        if let Some(p) = &r.redis_key_prefix {
            backend = backend.key_prefix(p.clone());
        }
        match (r.redis_borrow, r.redis_borrow_lease_ms) {
            (_, Some(0)) => {
                return Err(refuse(
                    "rate_limit.redis_borrow_lease_ms",
                    "must be at least 1",
                ))
            }
            (None, Some(_)) => {
                return Err(refuse(
                    "rate_limit.redis_borrow_lease_ms",
                    "only applies with `redis_borrow`",
                ))
            }
            (Some(n), ms) => {
                let lease = Duration::from_millis(ms.unwrap_or(100));
                backend = backend.pre_borrow(n, lease);
            }
            (None, None) => {}
        }
        Ok(b.redis(backend))
    }
}

impl LimitsConfig {
    fn to_limits(self, path: &str) -> Result<Limits, ConfigError> {
        let mut limits = Limits::new();
        let too_big = |n: u64| u32::try_from(n).is_err();
        if let Some(rpm) = self.rpm {
            if rpm == 0 || too_big(rpm) {
                return Err(refuse(
                    format!("{path}.rpm"),
                    "must be within 1..=4294967295",
                ));
            }
            let burst = self.burst.unwrap_or(rpm as u32);
            if burst == 0 {
                return Err(refuse(format!("{path}.burst"), "must be at least 1"));
            }
            let quota = Quota::per_minute(rpm).burst(burst);
            if !quota.fill_time_fits() {
                return Err(refuse(
                    format!("{path}.burst"),
                    format!(
                        "{burst} requests at {rpm} per minute take more than 73 years to refill; lower the burst or raise `rpm`"
                    ),
                ));
            }
            limits = limits.requests(quota);
        } else if self.burst.is_some() {
            return Err(refuse(format!("{path}.burst"), "a burst needs an `rpm`"));
        }
        if let Some(tpm) = self.tpm {
            if tpm == 0 || too_big(tpm) {
                return Err(refuse(
                    format!("{path}.tpm"),
                    "must be within 1..=4294967295",
                ));
            }
            limits = limits.tokens(Quota::per_minute(tpm).burst(tpm as u32));
        }
        if let Some(n) = self.concurrency {
            if n == 0 {
                return Err(refuse(format!("{path}.concurrency"), "must be at least 1"));
            }
            limits = limits.concurrency(n);
        }
        Ok(limits)
    }
}

/// `[retry]`: settings of [`RetryLayer`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in total, the first one included (default 3; 1 turns retries off).
    pub max_attempts: Option<u32>,
    /// The first backoff's upper bound, in milliseconds (default 500).
    pub backoff_base_ms: Option<u64>,
    /// The largest backoff, in milliseconds (default 8 000).
    pub backoff_cap_ms: Option<u64>,
    /// `"full"` (default), `"equal"`, `"decorrelated"` or `"none"`.
    pub jitter: Option<String>,
    /// The time all attempts and waits may take together, in milliseconds (default: none).
    pub deadline_ms: Option<u64>,
    /// A server's `retry-after` longer than this ends the retries, in milliseconds
    /// (default 60 000).
    pub max_retry_after_ms: Option<u64>,
    /// Retries allowed per request, on top of the floor (default 0.2). `0` with a floor of `0`
    /// turns retries off under load.
    pub budget_ratio: Option<f32>,
    /// Retries per second always allowed (default 10).
    pub budget_min_per_sec: Option<u32>,
    /// The budget's window, in milliseconds (default 10 000).
    pub budget_ttl_ms: Option<u64>,
    /// Once retries are exhausted, answer `x-should-retry: false`, so that clients (the
    /// official SDKs retry on their own) do not multiply the attempts (default `true`).
    #[serde(default)]
    pub mark_exhausted: Option<bool>,
    /// Add a generated `Idempotency-Key` to each `POST`/`PATCH` without one, so that every
    /// request becomes retryable (default `false`: only idempotent methods and `POST`s to
    /// generation endpoints are retried).
    pub idempotency_keys: Option<bool>,
    /// Seed of the backoff jitter.
    pub seed: Option<u64>,
}

/// `[breaker]`: settings of [`CircuitBreakerLayer`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// The breaker's name in messages and logs (default `"upstream"`).
    pub name: Option<String>,
    /// `"single"` (default), `"model"`, `"upstream"` or `"upstream_and_model"`. The last two
    /// need `upstream`.
    pub key_by: Option<String>,
    /// The name of the upstream the breaker guards (`"api.openai.com"`), the key of its
    /// circuit with `key_by = "upstream"` (never the client's `Host`).
    pub upstream: Option<String>,
    /// Calls in the sliding window (default 100).
    pub window: Option<usize>,
    /// Calls before any decision (default 10).
    pub minimum_calls: Option<u64>,
    /// Failure percentage that opens the circuit (default 50).
    pub failure_rate: Option<f64>,
    /// How long the circuit stays open at first, in milliseconds (default 30 000).
    pub open_ms: Option<u64>,
    /// The longest the circuit stays open as re-openings double the open time, in
    /// milliseconds (default 300 000, or `open_ms` when that is longer).
    pub max_open_ms: Option<u64>,
    /// Probe calls admitted when half-open (default 3).
    pub half_open_probes: Option<u32>,
    /// A call is slow when its response head takes longer than this, in milliseconds (no
    /// slow-call rule by default). Calls dropped by their caller after this long count as slow
    /// too, so a hanging upstream opens the circuit even when clients give up first.
    pub slow_call_ms: Option<u64>,
    /// The percentage of slow calls that opens the circuit (default 80; needs `slow_call_ms`).
    pub slow_call_rate: Option<f64>,
    /// The breaker's own timeout of each call, in milliseconds: an upstream that has not
    /// answered by then gets the caller a `504 timeout` and counts as a failure (default: none).
    pub call_timeout_ms: Option<u64>,
    /// The model to degrade to while the circuit is open.
    pub fallback_model: Option<String>,
    /// Seed of the open-duration jitter.
    pub seed: Option<u64>,
}

/// `[upstream]`: the call to the upstream.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The time one attempt may take to the response head, in milliseconds (default 60 000).
    pub attempt_timeout_ms: Option<u64>,
}

/// `[routes."/path"]`: which edge layers guard a route. Each is on unless set to `false`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutePolicy {
    /// API-key authentication.
    #[serde(default = "yes")]
    pub auth: bool,
    /// Request validation.
    #[serde(default = "yes")]
    pub validate: bool,
    /// Rate limiting.
    #[serde(default = "yes")]
    pub rate_limit: bool,
}

fn yes() -> bool {
    true
}

impl Default for RoutePolicy {
    fn default() -> Self {
        RoutePolicy {
            auth: true,
            validate: true,
            rate_limit: true,
        }
    }
}

/// The layers built from a [`StackConfig`]. Cloning a layer out of it shares its state.
#[derive(Debug, Clone)]
pub struct Stack {
    auth: ApiKeyAuthLayer<InMemoryKeyStore>,
    validate: ValidateRequestLayer,
    rate_limit: RateLimitLayer,
    retry: RetryLayer,
    breaker: CircuitBreakerLayer,
    attempt_timeout: Duration,
    routes: BTreeMap<String, RoutePolicy>,
    keys: usize,
}

impl Stack {
    /// Parses and builds a TOML document.
    pub fn from_toml_str(text: &str) -> Result<Stack, ConfigError> {
        let config: StackConfig = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
        Stack::build(&config)
    }

    /// Reads, parses and builds a TOML file.
    pub fn from_toml_file(path: impl AsRef<Path>) -> Result<Stack, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| refuse("path", format!("cannot read {}: {e}", path.display())))?;
        Stack::from_toml_str(&text)
    }

    /// Builds the layers, checking every value.
    pub fn build(config: &StackConfig) -> Result<Stack, ConfigError> {
        let store = key_store(&config.keys)?;
        let auth = ApiKeyAuthLayer::builder(store)
            .build()
            .map_err(|e| refuse(format!("auth.{}", e.field()), e.message().to_owned()))?;

        let v = &config.validation;
        let mut b = ValidateRequestLayer::builder();
        if !v.allowed_models.is_empty() {
            b = b.allowed_models(v.allowed_models.iter().cloned());
        }
        for (model, tokens) in &v.context_windows {
            b = b.context_window(model.clone(), *tokens);
        }
        if let Some(n) = v.body_limit {
            b = b.body_limit(n);
        }
        let validate = b.build().map_err(|e| {
            // The builder names its methods; the file's key is the plural table.
            let field = match e.field() {
                "context_window" => "context_windows",
                other => other,
            };
            refuse(format!("validation.{field}"), e.message().to_owned())
        })?;

        let r = &config.rate_limit;
        let mut b = RateLimitLayer::builder().limits(r.defaults.to_limits("rate_limit.defaults")?);
        for (name, limits) in &r.tiers {
            b = b.tier(
                name.as_str(),
                limits.to_limits(&format!("rate_limit.tiers.{name}"))?,
            );
        }
        match r.wait_ms {
            Some(0) => {
                return Err(refuse(
                    "rate_limit.wait_ms",
                    "must be at least 1 ms; leave it out to answer 429 at once",
                ))
            }
            Some(ms) => b = b.mode(OnLimit::Wait(Duration::from_millis(ms))),
            None => {}
        }
        b = rate_limit_backend(r, b)?;
        let rate_limit = b.build().map_err(|e| {
            // The backend's own fields under their TOML names.
            let field = match e.field() {
                "redis.url" => "redis_url",
                "redis.timeout" => "redis_timeout_ms",
                "redis.replicas" => "replicas",
                "redis.pre_borrow" => "redis_borrow_lease_ms",
                other => other,
            };
            refuse(format!("rate_limit.{field}"), e.message().to_owned())
        })?;

        let retry = retry_layer(&config.retry)?;

        let c = &config.breaker;
        let mut b = CircuitBreakerLayer::builder().name(c.name.as_deref().unwrap_or("upstream"));
        if let Some(key_by) = &c.key_by {
            b = b.key_by(match key_by.as_str() {
                "single" => CircuitKey::Single,
                "model" => CircuitKey::Model,
                "upstream" => CircuitKey::Upstream,
                "upstream_and_model" => CircuitKey::UpstreamAndModel,
                other => {
                    return Err(refuse(
                        "breaker.key_by",
                        format!("expected \"single\", \"model\", \"upstream\" or \"upstream_and_model\", got {other:?}"),
                    ))
                }
            });
        }
        if let Some(name) = &c.upstream {
            b = b.upstream(name.as_str());
        } else if matches!(c.key_by.as_deref(), Some("upstream" | "upstream_and_model")) {
            // A gateway's requests name no upstream the breaker could trust.
            return Err(refuse(
                "breaker.upstream",
                "key_by = \"upstream\" needs the upstream's name (`upstream = \"api.openai.com\"`)",
            ));
        }
        if let Some(n) = c.window {
            b = b.count_window(n);
        }
        if let Some(n) = c.minimum_calls {
            b = b.minimum_calls(n);
        }
        if let Some(p) = c.failure_rate {
            b = b.failure_rate(p);
        }
        if let Some(ms) = c.open_ms {
            b = b.open_duration(Duration::from_millis(ms));
        }
        match (c.max_open_ms, c.open_ms) {
            (Some(max), _) => b = b.max_open_duration(Duration::from_millis(max)),
            // The default maximum (5 min) follows a longer first open time.
            (None, Some(open)) if open > 300_000 => {
                b = b.max_open_duration(Duration::from_millis(open))
            }
            _ => {}
        }
        if let Some(n) = c.half_open_probes {
            b = b.half_open_probes(n);
        }
        match (c.slow_call_ms, c.slow_call_rate) {
            (Some(0), _) => return Err(refuse("breaker.slow_call_ms", "must be at least 1 ms")),
            (Some(ms), rate) => {
                b = b.slow_calls(Duration::from_millis(ms), rate.unwrap_or(80.0));
            }
            (None, Some(_)) => {
                return Err(refuse(
                    "breaker.slow_call_rate",
                    "needs `slow_call_ms`, the duration that makes a call slow",
                ))
            }
            (None, None) => {}
        }
        if let Some(ms) = c.call_timeout_ms {
            b = b.call_timeout(Duration::from_millis(ms));
        }
        if let Some(m) = &c.fallback_model {
            b = b.fallback_model(m.as_str());
        }
        if let Some(seed) = c.seed {
            b = b.seed(seed);
        }
        let breaker = b.build().map_err(|e| {
            // The breaker names its builder methods; map them to the file's keys.
            let field = match e.field() {
                "count_window" => "window",
                "open_duration" => "open_ms",
                "call_timeout" => "call_timeout_ms",
                // A zero duration is refused above: only the rate can be wrong here.
                "slow_calls" => "slow_call_rate",
                // The multiplier has no key: only the maximum can be wrong here.
                "open_backoff" => "max_open_ms",
                "fallback" | "fallback_model" => "fallback_model",
                other => other,
            };
            refuse(format!("breaker.{field}"), e.message().to_owned())
        })?;

        let attempt_timeout = match config.upstream.attempt_timeout_ms {
            Some(0) => {
                return Err(refuse(
                    "upstream.attempt_timeout_ms",
                    "must be at least 1 ms",
                ))
            }
            Some(ms) => Duration::from_millis(ms),
            None => Duration::from_secs(60),
        };
        for path in config.routes.keys() {
            if !path.starts_with('/') {
                return Err(refuse(
                    format!("routes.{path:?}"),
                    "a route is a path starting with `/`",
                ));
            }
        }
        Ok(Stack {
            auth,
            validate,
            rate_limit,
            retry,
            breaker,
            attempt_timeout,
            routes: config.routes.clone(),
            keys: config.keys.len(),
        })
    }

    /// The number of API keys configured.
    pub fn key_count(&self) -> usize {
        self.keys
    }

    /// The authentication layer.
    pub fn auth(&self) -> ApiKeyAuthLayer<InMemoryKeyStore> {
        self.auth.clone()
    }

    /// The validation layer.
    pub fn validate(&self) -> ValidateRequestLayer {
        self.validate.clone()
    }

    /// The rate limiter (buckets shared with every clone).
    pub fn rate_limit(&self) -> RateLimitLayer {
        self.rate_limit.clone()
    }

    /// The retry layer (budget shared with every clone).
    pub fn retry(&self) -> RetryLayer {
        self.retry.clone()
    }

    /// The circuit breaker (state shared with every clone).
    pub fn breaker(&self) -> CircuitBreakerLayer {
        self.breaker.clone()
    }

    /// The per-attempt timeout of upstream calls.
    pub fn attempt_timeout(&self) -> Duration {
        self.attempt_timeout
    }

    /// The policy of a route: its `[routes."/path"]` entry, else everything on.
    pub fn policy(&self, path: &str) -> RoutePolicy {
        self.routes.get(path).copied().unwrap_or_default()
    }

    /// The routes with a policy of their own.
    pub fn routes(&self) -> impl Iterator<Item = (&str, &RoutePolicy)> {
        self.routes.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The auth layer if the route's policy asks for it.
    pub fn auth_for(&self, path: &str) -> Option<ApiKeyAuthLayer<InMemoryKeyStore>> {
        self.policy(path).auth.then(|| self.auth())
    }

    /// The rate limiter if the route's policy asks for it.
    pub fn rate_limit_for(&self, path: &str) -> Option<RateLimitLayer> {
        self.policy(path).rate_limit.then(|| self.rate_limit())
    }

    /// The validation layer if the route's policy asks for it.
    pub fn validate_for(&self, path: &str) -> Option<ValidateRequestLayer> {
        self.policy(path).validate.then(|| self.validate())
    }
}

fn retry_layer(r: &RetryConfig) -> Result<RetryLayer, ConfigError> {
    let ms = Duration::from_millis;
    // The retry layer names its builder's settings; map them to the file's keys.
    let err = |e: ConfigError| {
        let field = match e.field() {
            "backoff.base" => "backoff_base_ms",
            "backoff.cap" => "backoff_cap_ms",
            "deadline" => "deadline_ms",
            "max_retry_after" => "max_retry_after_ms",
            "budget.ttl" => "budget_ttl_ms",
            "budget.ratio" => "budget_ratio",
            "budget.min_per_sec" => "budget_min_per_sec",
            other => other,
        };
        refuse(format!("retry.{field}"), e.message().to_owned())
    };
    let mut b = RetryLayer::builder();
    if let Some(n) = r.max_attempts {
        b = b.max_attempts(n);
    }
    let jitter = match r.jitter.as_deref() {
        None | Some("full") => Jitter::Full,
        Some("equal") => Jitter::Equal,
        Some("decorrelated") => Jitter::Decorrelated,
        Some("none") => Jitter::None,
        Some(other) => {
            return Err(refuse(
                "retry.jitter",
                format!(
                    "expected \"full\", \"equal\", \"decorrelated\" or \"none\", got {other:?}"
                ),
            ))
        }
    };
    let base = ms(r.backoff_base_ms.unwrap_or(500));
    let cap = ms(r
        .backoff_cap_ms
        .unwrap_or(8_000u64.max(r.backoff_base_ms.unwrap_or(0))));
    b = b.backoff(Backoff::new(base, cap, jitter).map_err(err)?);
    if let Some(d) = r.deadline_ms {
        b = b.deadline(ms(d));
    }
    if let Some(d) = r.max_retry_after_ms {
        b = b.max_retry_after(ms(d));
    }
    if r.budget_ratio.is_some() || r.budget_min_per_sec.is_some() || r.budget_ttl_ms.is_some() {
        let budget = RetryBudget::new(
            ms(r.budget_ttl_ms.unwrap_or(10_000)),
            r.budget_min_per_sec.unwrap_or(10),
            r.budget_ratio.unwrap_or(0.2),
        )
        .map_err(err)?;
        b = b.budget(budget);
    }
    if let Some(seed) = r.seed {
        b = b.seed(seed);
    }
    b.mark_exhausted(r.mark_exhausted.unwrap_or(true))
        .idempotency_keys(r.idempotency_keys.unwrap_or(false))
        .build()
        .map_err(err)
}

/// The auth layer owns the `[[keys]]` format and reads it from a document of its own: each
/// key is handed over alone first, so that an error is reported as `keys[i].field`.
fn key_store(keys: &[toml::Table]) -> Result<InMemoryKeyStore, ConfigError> {
    let encode = |keys: &[toml::Table]| {
        let mut doc = toml::Table::new();
        doc.insert(
            "keys".to_owned(),
            toml::Value::Array(keys.iter().cloned().map(toml::Value::Table).collect()),
        );
        toml::to_string(&doc).map_err(|e| refuse("keys", format!("cannot re-encode the keys: {e}")))
    };
    for (i, key) in keys.iter().enumerate() {
        let doc = encode(std::slice::from_ref(key))?;
        if let Err(e) = InMemoryKeyStore::from_toml_str(&doc) {
            let field = match e.field().strip_prefix("keys[0]") {
                Some(rest) => format!("keys[{i}]{rest}"),
                // A type error: the auth layer gives the line of its own document.
                None => match e
                    .field()
                    .strip_prefix("line ")
                    .and_then(|n| n.parse::<usize>().ok())
                {
                    Some(n) => {
                        let lines: Vec<&str> = doc.lines().collect();
                        let line = lines.get(n.saturating_sub(1)).copied().unwrap_or("");
                        // A value of a nested table sits under its own header (`[keys.labels]`).
                        let within = lines[..n.saturating_sub(1).min(lines.len())]
                            .iter()
                            .rev()
                            .map(|l| l.trim())
                            .find(|l| l.starts_with('['))
                            .map(|h| h.trim_matches(|c| c == '[' || c == ']').trim())
                            .and_then(|h| h.strip_prefix("keys."))
                            .map(|sub| format!(".{sub}"))
                            .unwrap_or_default();
                        match line.split_once('=') {
                            Some((name, _)) => format!("keys[{i}]{within}.{}", name.trim()),
                            None => format!("keys[{i}]{within}"),
                        }
                    }
                    None => format!("keys[{i}]"),
                },
            };
            return Err(refuse(field, without_values(e.message())));
        }
    }
    InMemoryKeyStore::from_toml_str(&encode(keys)?)
        .map_err(|e| refuse(e.field().to_owned(), without_values(e.message())))
}

/// A parser message without the values it quotes (`invalid type: string "sk-..."`,
/// ``unknown variant `...` ``): a value in a configuration file may be a secret. Key names stay.
fn without_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find('"') {
        out.push_str(&rest[..i]);
        match rest[i + 1..].find('"') {
            Some(j) => {
                out.push_str("\"…\"");
                rest = &rest[i + 1 + j + 1..];
            }
            None => {
                out.push_str("\"…");
                rest = "";
            }
        }
    }
    out.push_str(rest);
    match out.find("unknown variant `") {
        Some(i) => {
            let start = i + "unknown variant `".len();
            match out[start..].find('`') {
                Some(j) => format!("{}…{}", &out[..start], &out[start + j..]),
                None => out,
            }
        }
        None => out,
    }
}

/// Turns a TOML syntax or type error into a [`ConfigError`] naming the TOML path of the value.
fn toml_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let message = without_values(e.message().trim());
    let Some(span) = e.span() else {
        return refuse("toml", message);
    };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("").trim();
    // The table header on the error's line, else the innermost one above it.
    let header = |l: &str| {
        l.split('#')
            .next()
            .unwrap_or("")
            .trim()
            .trim_matches(|c| c == '[' || c == ']')
            .trim()
            .to_owned()
    };
    // Only text that can be a TOML path names a field: a broken header line
    // (`[secret = "sk-..."`) is not echoed.
    let path_like = |s: &str| {
        s.len() <= 200
            && s.chars().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '"' | '/' | ' ')
            })
    };
    let table = if line.starts_with('[') {
        Some(header(line)).filter(|h| path_like(h))
    } else {
        text[..line_start]
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| l.starts_with('['))
            .map(header)
            .filter(|h| path_like(h))
    };
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim())
        .filter(|k| !k.is_empty() && !k.starts_with('[') && path_like(k));
    let table = table.filter(|t| !t.is_empty());
    let field = match (table, key) {
        (Some(t), Some(k)) => format!("{t}.{k}"),
        (None, Some(k)) => k.to_owned(),
        (Some(t), None) => t,
        (None, None) => format!("line {line_no}"),
    };
    refuse(field, format!("{message} (line {line_no})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_document_builds() {
        let stack = Stack::from_toml_str("").unwrap();
        assert_eq!(stack.key_count(), 0);
        assert_eq!(stack.policy("/v1/chat/completions"), RoutePolicy::default());
    }

    #[test]
    fn type_errors_name_the_field() {
        let err = Stack::from_toml_str("[breaker]\nwindow = \"ten\"\n").unwrap_err();
        assert_eq!(err.field(), "breaker.window", "{err}");
        let err =
            Stack::from_toml_str("[upstream]\nattempt_timeout_ms = 3\n[retri]\n").unwrap_err();
        assert_eq!(err.field(), "retri", "{err}");
        let err = Stack::from_toml_str("[upstream]\ntimeout = 3\n").unwrap_err();
        assert_eq!(err.field(), "upstream.timeout", "{err}");
        assert!(err.message().contains("unknown field"), "{err}");
    }

    #[test]
    fn key_errors_name_the_key_and_hide_the_secret() {
        let err = Stack::from_toml_str(
            "[[keys]]\nid = \"a\"\nsecret = \"sk-aaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"\n[[keys]]\nid = \"b\"\nsha256 = \"zz\"\n",
        )
        .unwrap_err();
        assert_eq!(err.field(), "keys[1].sha256", "{err}");
        assert!(!err.to_string().contains("sk-aaaa"));
    }

    #[test]
    fn layer_errors_name_the_field() {
        let err = Stack::from_toml_str("[breaker]\nfailure_rate = 120.0\n").unwrap_err();
        assert_eq!(err.field(), "breaker.failure_rate", "{err}");
        let err = Stack::from_toml_str("[breaker]\nkey_by = \"nope\"\n").unwrap_err();
        assert_eq!(err.field(), "breaker.key_by", "{err}");
        let err = Stack::from_toml_str("[rate_limit.tiers.free]\nrpm = 0\n").unwrap_err();
        assert_eq!(err.field(), "rate_limit.tiers.free.rpm", "{err}");
        let err = Stack::from_toml_str("[retry]\nmax_attempts = 50\n").unwrap_err();
        assert_eq!(err.field(), "retry.max_attempts", "{err}");
        let err = Stack::from_toml_str("[retry]\nbackoff_base_ms = 0\n").unwrap_err();
        assert_eq!(err.field(), "retry.backoff_base_ms", "{err}");
        let err = Stack::from_toml_str("[retry]\nbudget_ratio = -1.0\n").unwrap_err();
        assert_eq!(err.field(), "retry.budget_ratio", "{err}");
        let err = Stack::from_toml_str("[upstream]\nattempt_timeout_ms = 0\n").unwrap_err();
        assert_eq!(err.field(), "upstream.attempt_timeout_ms", "{err}");
        let err = Stack::from_toml_str("[routes.\"v1\"]\nauth = false\n").unwrap_err();
        assert_eq!(err.field(), "routes.\"v1\"", "{err}");
    }

    #[test]
    fn rate_limit_backend_keys() {
        let err = Stack::from_toml_str("[rate_limit]\nbackend = \"etcd\"\n").unwrap_err();
        assert_eq!(err.field(), "rate_limit.backend", "{err}");
        let err = Stack::from_toml_str("[rate_limit]\nreplicas = 3\n").unwrap_err();
        assert_eq!(err.field(), "rate_limit.replicas", "{err}");
        let config = "[rate_limit]\nbackend = \"redis\"\nredis_url = \"redis://:pw-s3cret@127.0.0.1:6379/\"\nredis_timeout_ms = 20\nredis_failure = \"closed\"\nreplicas = 3\n[rate_limit.defaults]\nrpm = 60\n";
        #[cfg(feature = "redis")]
        {
            assert!(Stack::from_toml_str(config).is_ok());
            let parsed: StackConfig = toml::from_str(config).unwrap();
            assert!(!format!("{parsed:?}").contains("pw-s3cret"));
            let err = Stack::from_toml_str("[rate_limit]\nbackend = \"redis\"\n").unwrap_err();
            assert_eq!(err.field(), "rate_limit.redis_url", "{err}");
            let bad = config.replace("replicas = 3", "replicas = 0");
            let err = Stack::from_toml_str(&bad).unwrap_err();
            assert_eq!(err.field(), "rate_limit.replicas", "{err}");
            let borrow = format!("{config}redis_borrow = 16\nredis_borrow_lease_ms = 50\n")
                .replace("[rate_limit.defaults]\nrpm = 60\n", "")
                + "[rate_limit.defaults]\nrpm = 60\n";
            assert!(Stack::from_toml_str(&borrow).is_ok());
            let bad = borrow.replace("lease_ms = 50", "lease_ms = 0");
            let err = Stack::from_toml_str(&bad).unwrap_err();
            assert_eq!(err.field(), "rate_limit.redis_borrow_lease_ms", "{err}");
            let bad = config.replace("\"closed\"", "\"maybe\"");
            let err = Stack::from_toml_str(&bad).unwrap_err();
            assert_eq!(err.field(), "rate_limit.redis_failure", "{err}");
            let bad = config.replace("redis://", "http://");
            let err = Stack::from_toml_str(&bad).unwrap_err();
            assert_eq!(err.field(), "rate_limit.redis_url", "{err}");
            assert!(!err.to_string().contains("pw-s3cret"), "{err}");
        }
        #[cfg(not(feature = "redis"))]
        {
            let err = Stack::from_toml_str(config).unwrap_err();
            assert_eq!(err.field(), "rate_limit.backend", "{err}");
        }
    }

    #[test]
    fn route_policies() {
        let stack = Stack::from_toml_str("[routes.\"/healthz\"]\nauth = false\nvalidate = false\n")
            .unwrap();
        assert!(stack.auth_for("/healthz").is_none());
        assert!(stack.validate_for("/healthz").is_none());
        assert!(stack.auth_for("/v1/chat/completions").is_some());
    }
}
