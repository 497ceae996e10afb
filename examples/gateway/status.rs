//! What an operator sees and the gateway steers on its own: `GET /v1/llm-layers/status` (the
//! circuits and the rate-limit keys, as JSON, behind an admin key) and the health check of
//! `[breaker.health_check]` against the upstream.
//!
//! # The `[admin]` table
//!
//! ```toml
//! [admin]
//! # The SHA-256 of the admin key, in hex (`printf %s "$KEY" | sha256sum`): the file holds no
//! # secret. Or `key_sha256_env = "GATEWAY_ADMIN_KEY_SHA256"` to read the digest from the
//! # environment.
//! key_sha256 = "..."
//! ```
//!
//! | request | answer |
//! |---|---|
//! | no `[admin]` table | `404`, as for any path the gateway does not serve |
//! | no key, or a key whose digest differs | `401 invalid_api_key`, the crate's envelope |
//! | `Authorization: Bearer <admin key>` (or `x-api-key`) | `200`, the JSON below |
//!
//! The presented key's digest is compared with the configured one in constant time
//! (`subtle`). The admin key is not an API key: it opens no other route, and API keys do not
//! open this one.
//!
//! # The JSON
//!
//! `circuits`: every circuit of the top-level breaker and of each route's own, with its
//! `state`, window `failure_rate` and `slow_call_rate` (percent, `null` when the window is
//! empty), `until_half_open_ms` and `open_for_ms` (open), `probes_out` (half-open) and its
//! counters. `rate_limits`: every key that has spent from a bucket or has requests in flight,
//! by id (an API key's id, never its secret; header keys by digest), each bucket's `limit`,
//! `remaining` and `reset_ms`, at most [`MAX_KEYS`] per limiter (`truncated` says when more
//! exist). With a Redis rate-limit backend the figures are this replica's local view.
//!
//! # The health check
//!
//! `[breaker.health_check]` (see [`llm_layers::stack::HealthCheckConfig`]) is started by the
//! gateway with [`start_health_check`]: probes go through an HTTP client of their own to the
//! same upstream, with the same key, not through the retry or breaker layers, and steer the
//! top-level breaker's circuit.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use llm_layers::auth::{extract_api_key, AcceptedHeaders, KeyHash};
use llm_layers::body::LayerBody;
use llm_layers::breaker::{BreakerHandle, CircuitMetrics, HealthCheckTask};
use llm_layers::rate_limit::{KeySnapshot, RateLimitHandle};
use llm_layers::stack::{ConfigError, Stack};
use llm_layers::{ApiError, ErrorCode};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

/// The path of the status endpoint.
pub const STATUS_PATH: &str = "/v1/llm-layers/status";

/// The most rate-limit keys listed per limiter.
pub const MAX_KEYS: usize = 1000;

/// The `[admin]` table as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminToml {
    key_sha256: Option<llm_layers::stack::Sha256Hex>,
    key_sha256_env: Option<String>,
}

/// The admin key's digest. `Debug` shows no byte of it.
#[derive(Clone)]
pub struct Admin {
    digest: KeyHash,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Admin { digest: <hidden> }")
    }
}

impl Admin {
    /// The admin settings of an `[admin]` table: `None` without one.
    pub fn from_toml(t: Option<&AdminToml>) -> Result<Option<Admin>, ConfigError> {
        let refuse =
            |field: &str, m: &str| ConfigError::new("gateway", field.to_owned(), m.to_owned());
        let Some(t) = t else {
            return Ok(None);
        };
        let digest = match (&t.key_sha256, &t.key_sha256_env) {
            (Some(d), None) => *d.hash(),
            (None, Some(var)) => {
                let hex = std::env::var(var).map_err(|_| {
                    refuse(
                        "admin.key_sha256_env",
                        &format!("the variable {var} is not set"),
                    )
                })?;
                KeyHash::from_hex(hex.trim()).ok_or_else(|| {
                    refuse(
                        "admin.key_sha256_env",
                        &format!("{var} does not hold 64 hex characters (a SHA-256 digest)"),
                    )
                })?
            }
            (Some(_), Some(_)) => {
                return Err(refuse(
                    "admin",
                    "give `key_sha256` or `key_sha256_env`, not both",
                ))
            }
            (None, None) => {
                return Err(refuse(
                    "admin",
                    "needs `key_sha256` (or `key_sha256_env`), the SHA-256 of the admin key",
                ))
            }
        };
        Ok(Some(Admin { digest }))
    }

    /// Whether the request presents the admin key (bearer or `x-api-key`).
    fn allows(&self, headers: &HeaderMap) -> bool {
        match extract_api_key(headers, AcceptedHeaders::all()) {
            Ok(key) => KeyHash::of(key)
                .as_bytes()
                .ct_eq(self.digest.as_bytes())
                .into(),
            Err(_) => false,
        }
    }
}

/// The breakers and limiters the status page lists, each with its route (`None`: the
/// top-level one).
#[derive(Clone)]
struct Sources {
    admin: Admin,
    breakers: Vec<(Option<String>, BreakerHandle)>,
    limiters: Vec<(Option<String>, RateLimitHandle)>,
}

/// The status route, for `app.merge(...)`: empty (every request `404`) without an admin key.
pub fn router(stack: &Stack, admin: Option<&Admin>) -> Router {
    let Some(admin) = admin else {
        return Router::new();
    };
    let top_breaker = stack.breaker().handle();
    let top_limiter = stack.rate_limit().handle();
    let mut breakers = vec![(None, top_breaker.clone())];
    let mut limiters = vec![(None, top_limiter.clone())];
    for (path, _) in stack.routes() {
        let b = stack.breaker_for(path).handle();
        if !b.same_as(&top_breaker) {
            breakers.push((Some(path.to_owned()), b));
        }
        if let Some(l) = stack.rate_limit_for(path) {
            let l = l.handle();
            if !l.same_as(&top_limiter) {
                limiters.push((Some(path.to_owned()), l));
            }
        }
    }
    let sources = Sources {
        admin: admin.clone(),
        breakers,
        limiters,
    };
    Router::new()
        .route(STATUS_PATH, get(status))
        .with_state(sources)
}

fn ms_ceil(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

/// The status document.
#[derive(Serialize)]
struct StatusJson<'a> {
    circuits: Vec<CircuitJson<'a>>,
    rate_limits: RateLimitsJson<'a>,
}

/// The rate-limit keys of every limiter.
#[derive(Serialize)]
struct RateLimitsJson<'a> {
    keys: Vec<KeyJson<'a>>,
    truncated: bool,
}

/// One circuit as the status shows it (fields in this order).
#[derive(Serialize)]
struct CircuitJson<'a> {
    breaker: &'a str,
    route: Option<&'a str>,
    key: &'a str,
    state: &'static str,
    failure_rate: Option<f64>,
    slow_call_rate: Option<f64>,
    until_half_open_ms: Option<u64>,
    open_for_ms: Option<u64>,
    probes_out: u32,
    window_calls: u64,
    calls: u64,
    failures: u64,
    rejections: u64,
    openings: u64,
}

fn circuit_json<'a>(
    breaker: &'a str,
    route: Option<&'a str>,
    c: &'a CircuitMetrics,
) -> CircuitJson<'a> {
    CircuitJson {
        breaker,
        route,
        key: &c.key,
        state: c.state.as_str(),
        failure_rate: c.failure_rate,
        slow_call_rate: c.slow_call_rate,
        until_half_open_ms: c.until_half_open.map(ms_ceil),
        open_for_ms: c.open_for.map(ms_ceil),
        probes_out: c.probes_out,
        window_calls: c.window_calls,
        calls: c.calls,
        failures: c.failures,
        rejections: c.rejections,
        openings: c.openings,
    }
}

/// One bucket of a rate-limit key.
#[derive(Serialize)]
struct QuotaJson {
    unit: &'static str,
    global: bool,
    limit: u32,
    remaining: u32,
    reset_ms: u64,
}

/// One rate-limit key.
#[derive(Serialize)]
struct KeyJson<'a> {
    route: Option<&'a str>,
    key: &'a str,
    in_flight: u32,
    quotas: Vec<QuotaJson>,
}

fn key_json<'a>(route: Option<&'a str>, k: &'a KeySnapshot) -> KeyJson<'a> {
    KeyJson {
        route,
        key: &k.key,
        in_flight: k.in_flight,
        quotas: k
            .quotas
            .iter()
            .map(|q| QuotaJson {
                unit: q.unit.as_str(),
                global: q.global,
                limit: q.limit,
                remaining: q.remaining,
                reset_ms: ms_ceil(q.reset),
            })
            .collect(),
    }
}

async fn status(State(s): State<Sources>, headers: HeaderMap) -> Response {
    if !s.admin.allows(&headers) {
        return ApiError::new(
            ErrorCode::InvalidApiKey,
            "The status endpoint needs the admin key (Authorization: Bearer <admin key>).",
        )
        .to_response();
    }
    let snaps: Vec<_> = s
        .breakers
        .iter()
        .map(|(route, b)| (route.as_deref(), b.snapshot()))
        .collect();
    let circuits: Vec<CircuitJson<'_>> = snaps
        .iter()
        .flat_map(|(route, snap)| {
            snap.circuits
                .iter()
                .map(|c| circuit_json(&snap.name, *route, c))
        })
        .collect();
    let mut truncated = false;
    let listed: Vec<_> = s
        .limiters
        .iter()
        .map(|(route, l)| {
            let mut keys = l.keys(MAX_KEYS + 1);
            if keys.len() > MAX_KEYS {
                keys.truncate(MAX_KEYS);
                truncated = true;
            }
            (route.as_deref(), keys)
        })
        .collect();
    let keys: Vec<KeyJson<'_>> = listed
        .iter()
        .flat_map(|(route, keys)| keys.iter().map(|k| key_json(*route, k)))
        .collect();
    let mut res = Json(StatusJson {
        circuits,
        rate_limits: RateLimitsJson { keys, truncated },
    })
    .into_response();
    res.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-store"));
    res
}

/// Starts `[breaker.health_check]`, when configured, against the upstream at `base` (with the
/// upstream key and TLS settings the proxy uses), steering the top-level breaker. Keep the
/// task: dropping it stops the probes. Needs the tokio runtime.
pub fn start_health_check(
    stack: &Stack,
    base: Uri,
    key: Option<HeaderValue>,
    tls: rustls::ClientConfig,
) -> Option<HealthCheckTask> {
    let check = stack.health_check()?.clone();
    let client = super::http_client(base, key, tls);
    let template = check.clone();
    let make = move || {
        template
            .request::<()>()
            .map(|()| LayerBody::new(axum::body::Body::empty()))
    };
    tracing::info!(
        interval_ms = check.interval().as_millis() as u64,
        path = %check.uri(),
        key = ?check.key(),
        "health check of the upstream started"
    );
    Some(
        stack
            .breaker()
            .handle()
            .spawn_health_check_with(check, client, make),
    )
}
