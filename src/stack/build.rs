//! From the typed sections to the layers, through each layer's public builder.
//!
//! Every function takes the TOML path of the section it builds (`retry`,
//! `routes."/v1/chat/completions".retry`): a value the stack checks itself is refused at
//! `path.key`, a value a builder refuses is reported at `path`, with the builder's own message
//! (which names its setting).

use std::time::Duration;

use super::config::{
    self, Backend, BreakerConfig, KeyConfig, LimitsConfig, RateLimitConfig, RetryConfig,
    ValidationConfig,
};
use super::refuse;
use crate::auth::{InMemoryKeyStore, KeyRecord};
use crate::breaker::{CircuitBreakerLayer, HealthCheck, Target};
use crate::config::ConfigError;
use crate::ext::KeyLimits;
use crate::rate_limit::{Limits, OnLimit, Quota, RateLimitLayer, RateLimitLayerBuilder};
use crate::retry::{Backoff, RetryBudget, RetryLayer};
use crate::validate::ValidateRequestLayer;

/// A builder's refusal, at the TOML path of the section being built.
fn at(path: &str) -> impl Fn(ConfigError) -> ConfigError + '_ {
    move |e| refuse(path.to_owned(), e.to_string())
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The key store of `[[keys]]`.
pub(super) fn key_store(keys: &[KeyConfig]) -> Result<InMemoryKeyStore, ConfigError> {
    let records = keys
        .iter()
        .enumerate()
        .map(|(i, k)| key_record(&format!("keys[{i}]"), k))
        .collect::<Result<Vec<_>, _>>()?;
    InMemoryKeyStore::new(records).map_err(at("keys"))
}

fn key_record(path: &str, k: &KeyConfig) -> Result<KeyRecord, ConfigError> {
    let mut b = KeyRecord::builder(k.id.as_str());
    b = match (&k.secret, &k.sha256) {
        (Some(_), Some(_)) => {
            return Err(refuse(
                format!("{path}.secret"),
                "give either `secret` or `sha256`, not both",
            ))
        }
        (None, None) => {
            return Err(refuse(
                format!("{path}.secret"),
                "give the key's `secret` or its `sha256` digest",
            ))
        }
        (Some(secret), None) => b.secret(secret.expose()),
        (None, Some(hash)) => b.sha256(*hash.hash()),
    };
    if let Some(at) = k.expires_at {
        b = b.expires_at(at.0);
    }
    if let Some(tier) = &k.tier {
        b = b.tier(tier.as_str());
    }
    let mut limits = KeyLimits::new();
    if let Some(n) = k.rpm {
        limits = limits.requests_per_minute(n);
    }
    if let Some(n) = k.tpm {
        limits = limits.tokens_per_minute(n);
    }
    if let Some(n) = k.concurrency {
        limits = limits.concurrency(n);
    }
    for (name, value) in &k.labels {
        b = b.label(name.as_str(), value.as_str());
    }
    b.limits(limits)
        .revoked(k.revoked)
        .allow_models(k.models.iter().cloned())
        .build()
        .map_err(at(path))
}

/// `[validation]`.
pub(super) fn validate(
    path: &str,
    v: &ValidationConfig,
) -> Result<ValidateRequestLayer, ConfigError> {
    let mut b = ValidateRequestLayer::builder();
    if !v.allowed_models.is_empty() {
        b = b.allowed_models(v.allowed_models.iter().cloned());
    }
    for (model, tokens) in &v.context_windows {
        b = b.context_window(model.clone(), *tokens);
    }
    if let Some(n) = v.body_limit {
        b = b.body_limit(n.get());
    }
    b.build().map_err(at(path))
}

fn limits(path: &str, l: &LimitsConfig) -> Result<Limits, ConfigError> {
    let mut limits = Limits::new();
    match (l.rpm, l.burst) {
        (Some(rpm), burst) => {
            let burst = burst.unwrap_or(rpm);
            let quota = Quota::per_minute(u64::from(rpm.get())).burst(burst.get());
            if !quota.fill_time_fits() {
                return Err(refuse(
                    format!("{path}.burst"),
                    format!(
                        "{burst} requests at {rpm} per minute take more than 73 years to refill; lower the burst or raise `rpm`"
                    ),
                ));
            }
            limits = limits.requests(quota);
        }
        (None, Some(_)) => return Err(refuse(format!("{path}.burst"), "a burst needs an `rpm`")),
        (None, None) => {}
    }
    if let Some(tpm) = l.tpm {
        limits = limits.tokens(Quota::per_minute(u64::from(tpm.get())).burst(tpm.get()));
    }
    if let Some(n) = l.concurrency {
        limits = limits.concurrency(n.get());
    }
    Ok(limits)
}

/// `[rate_limit]`.
pub(super) fn rate_limit(path: &str, r: &RateLimitConfig) -> Result<RateLimitLayer, ConfigError> {
    let mut b = RateLimitLayer::builder().limits(limits(&format!("{path}.defaults"), &r.defaults)?);
    for (name, l) in &r.tiers {
        b = b.tier(
            name.as_str(),
            limits(&format!("{path}.tiers.{}", super::key_segment(name)), l)?,
        );
    }
    if let Some(wait) = r.wait_ms {
        b = b.mode(OnLimit::Wait(ms(wait.get())));
    }
    b = rate_limit_backend(path, r, b)?;
    b.build().map_err(at(path))
}

/// `backend` and the `redis_*` keys of `[rate_limit]`.
fn rate_limit_backend(
    path: &str,
    r: &RateLimitConfig,
    b: RateLimitLayerBuilder,
) -> Result<RateLimitLayerBuilder, ConfigError> {
    if r.backend == Backend::Memory {
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
                format!("{path}.{name}"),
                "only applies with backend = \"redis\"",
            ));
        }
        return Ok(b);
    }
    #[cfg(not(feature = "redis"))]
    {
        let _ = b;
        Err(refuse(
            format!("{path}.backend"),
            "\"redis\" needs the crate built with the `redis` feature",
        ))
    }
    #[cfg(feature = "redis")]
    {
        use super::config::RedisFailure;
        use crate::rate_limit::{FailurePolicy, RedisBackend};
        let Some(url) = &r.redis_url else {
            return Err(refuse(
                format!("{path}.redis_url"),
                "required with backend = \"redis\"",
            ));
        };
        let mut backend = RedisBackend::new(url.0.clone());
        if let Some(t) = r.redis_timeout_ms {
            backend = backend.timeout(ms(t.get()));
        }
        if r.redis_failure == Some(RedisFailure::Closed) {
            backend = backend.on_failure(FailurePolicy::FailClosed);
        }
        if let Some(n) = r.replicas {
            backend = backend.replicas(n.get());
        }
        if let Some(p) = &r.redis_key_prefix {
            backend = backend.key_prefix(p.clone());
        }
        match (r.redis_borrow, r.redis_borrow_lease_ms) {
            (None, Some(_)) => {
                return Err(refuse(
                    format!("{path}.redis_borrow_lease_ms"),
                    "only applies with `redis_borrow`",
                ))
            }
            (Some(n), lease) => {
                backend = backend.pre_borrow(n, ms(lease.map_or(100, |l| l.get())));
            }
            (None, None) => {}
        }
        Ok(b.redis(backend))
    }
}

/// `[retry]`.
pub(super) fn retry(path: &str, r: &RetryConfig) -> Result<RetryLayer, ConfigError> {
    let base = r.backoff_base_ms.get();
    let cap = r.backoff_cap_ms.map_or(8_000u64.max(base), |c| c.get());
    let backoff = Backoff::new(ms(base), ms(cap), r.jitter.into()).map_err(at(path))?;
    let mut b = RetryLayer::builder()
        .max_attempts(r.max_attempts)
        .backoff(backoff);
    if let Some(d) = r.deadline_ms {
        b = b.deadline(ms(d.get()));
    }
    if let Some(d) = r.max_retry_after_ms {
        b = b.max_retry_after(ms(d));
    }
    if r.budget_ratio.is_some() || r.budget_min_per_sec.is_some() || r.budget_ttl_ms.is_some() {
        let budget = RetryBudget::new(
            ms(r.budget_ttl_ms.unwrap_or(config::BUDGET_TTL_MS)),
            r.budget_min_per_sec.unwrap_or(config::BUDGET_MIN_PER_SEC),
            r.budget_ratio.unwrap_or(config::BUDGET_RATIO),
        )
        .map_err(at(path))?;
        b = b.budget(budget);
    }
    if let Some(seed) = r.seed {
        b = b.seed(seed);
    }
    b.mark_exhausted(r.mark_exhausted)
        .idempotency_keys(r.idempotency_keys)
        .build()
        .map_err(at(path))
}

/// A chain target with the marks of its `[[breaker.fallback]]` table.
fn marked<U>(mut target: Target<U>, t: &config::FallbackTargetConfig) -> Target<U> {
    if t.larger_context {
        target = target.larger_context();
    }
    if t.on_content_policy {
        target = target.on_content_policy();
    }
    target
}

/// `[breaker]`.
pub(super) fn breaker(path: &str, c: &BreakerConfig) -> Result<CircuitBreakerLayer, ConfigError> {
    let mut b = CircuitBreakerLayer::builder()
        .name(c.name.as_str())
        .key_by(c.key_by.into());
    match &c.upstream {
        Some(name) => b = b.upstream(name.0.as_str()),
        // A gateway's requests name no upstream the breaker could trust.
        None if matches!(
            c.key_by,
            config::BreakerKey::Upstream | config::BreakerKey::UpstreamAndModel
        ) =>
        {
            return Err(refuse(
                format!("{path}.upstream"),
                "key_by = \"upstream\" needs the upstream's name (`upstream = \"api.openai.com\"`)",
            ))
        }
        None => {}
    }
    if let Some(n) = c.window {
        b = b.count_window(n.get());
    }
    if let Some(n) = c.minimum_calls {
        b = b.minimum_calls(n.get());
    }
    if let Some(p) = c.failure_rate {
        b = b.failure_rate(p.0);
    }
    if let Some(open) = c.open_ms {
        b = b.open_duration(ms(open.get()));
    }
    let open = c.open_ms.map(|o| o.get());
    match (c.max_open_ms.map(|m| m.get()), open) {
        (Some(max), Some(open)) if max < open => {
            return Err(refuse(
                format!("{path}.max_open_ms"),
                format!("{max} ms is shorter than `open_ms` ({open} ms)"),
            ))
        }
        (Some(max), _) => b = b.max_open_duration(ms(max)),
        // The default maximum follows a longer first open time.
        (None, Some(open)) if open > config::MAX_OPEN_MS => b = b.max_open_duration(ms(open)),
        _ => {}
    }
    if let Some(n) = c.half_open_probes {
        b = b.half_open_probes(u32::from(n.get()));
    }
    match (c.slow_call_ms, c.slow_call_rate) {
        (Some(d), rate) => {
            b = b.slow_calls(ms(d.get()), rate.map_or(config::SLOW_CALL_RATE, |r| r.0));
        }
        (None, Some(_)) => {
            return Err(refuse(
                format!("{path}.slow_call_rate"),
                "needs `slow_call_ms`, the duration that makes a call slow",
            ))
        }
        (None, None) => {}
    }
    if let Some(t) = c.call_timeout_ms {
        b = b.call_timeout(ms(t.get()));
    }
    if let Some(m) = &c.fallback_model {
        b = b.fallback_model(m.as_str());
    }
    for (i, t) in c.fallback.iter().enumerate() {
        b = match (&t.upstream, &t.model) {
            (None, None) => {
                return Err(refuse(
                    format!("{path}.fallback[{i}]"),
                    "needs `model` (a model on this upstream) or `upstream` (a named upstream)",
                ))
            }
            (None, Some(m)) => b.fallback_target(marked(Target::model(m.0.as_str()), t)),
            (Some(u), m) => {
                let mut target = Target::named_upstream(u.0.as_str());
                if let Some(m) = m {
                    target = target.with_model(m.0.as_str());
                }
                b.fallback_target(marked(target, t))
            }
        };
    }
    if let Some(seed) = c.seed {
        b = b.seed(seed);
    }
    b.build().map_err(at(path))
}

/// `[breaker.health_check]`, for the circuit `[breaker]` keys it to.
pub(super) fn health_check(
    path: &str,
    c: &BreakerConfig,
) -> Result<Option<HealthCheck>, ConfigError> {
    let Some(h) = &c.health_check else {
        return Ok(None);
    };
    let at_hc = format!("{path}.health_check");
    let upstream = c.upstream.as_ref().map(|n| n.0.as_str());
    let model = h.model.as_ref().map(|m| m.0.as_str());
    let key = match (c.key_by, model) {
        (config::BreakerKey::Single, None) => crate::breaker::SINGLE_KEY.to_owned(),
        (config::BreakerKey::Upstream, None) => upstream.unwrap_or_default().to_owned(),
        (config::BreakerKey::Model, Some(m)) => m.to_owned(),
        (config::BreakerKey::UpstreamAndModel, Some(m)) => {
            format!("{}/{m}", upstream.unwrap_or_default())
        }
        (config::BreakerKey::Model | config::BreakerKey::UpstreamAndModel, None) => {
            return Err(refuse(
                format!("{at_hc}.model"),
                "circuits keyed by model need the model to probe (`model = \"gpt-4o\"`)",
            ))
        }
        (config::BreakerKey::Single | config::BreakerKey::Upstream, Some(_)) => {
            return Err(refuse(
                format!("{at_hc}.model"),
                "only with key_by = \"model\" or \"upstream_and_model\"",
            ))
        }
    };
    let probe_path = match (&h.path, model) {
        (Some(p), _) => p.clone(),
        (None, Some(m)) => format!("/v1/models/{m}"),
        (None, None) => "/v1/models".to_owned(),
    };
    let mut b = HealthCheck::builder()
        .key(key)
        .interval(ms(h.interval_ms.get()))
        .timeout(ms(h.timeout_ms.get()))
        .jitter(h.jitter)
        .failures_to_open(h.failures_to_open.get())
        .path(probe_path);
    if let Some(seed) = h.seed {
        b = b.seed(seed);
    }
    b.build().map(Some).map_err(at(&at_hc))
}
