//! The gateway's whole stack, in the recommended order, in front of the fault-injecting
//! upstream, with the suite's counting points in it:
//!
//! request id + tracing → auth → validation → rate limit (per client IP, behind a trusted proxy) →
//! retry (deadline, budget, attempt timeout) → [attempts counted] → breaker (per model, with
//! a fallback model) → [breaker mirror] → normalizer → per-attempt timeout → [upstream calls
//! counted] → fault-injecting upstream.
//!
//! Auth and validation come from a TOML [`Stack`] (the gateway's `[[keys]]` and
//! `[validation]` format); the layers whose hooks the suite needs (retry, breaker) and the
//! rate limiter keyed by client IP are built with their builders, with the same values a
//! gateway configuration would give.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use llm_layers::breaker::{BreakerHandle, CircuitBreakerLayer, CircuitKey};
use llm_layers::normalize::NormalizeErrorsLayer;
use llm_layers::rate_limit::{BucketKey, Limits, Quota, RateLimitHandle, RateLimitLayer};
use llm_layers::retry::{Backoff, Jitter, RetryBudget, RetryLayer};
use llm_layers::stack::Stack;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use super::observe::{CountLayer, Counter, Mirror, ObserveLayer, Thresholds};
use super::upstream::Faults;

/// An unrestricted key.
pub const KEY_A: &str = "sk-chaos-a-7f3e9b2c41d8a6e05b9c";
/// A second unrestricted key.
pub const KEY_B: &str = "sk-chaos-b-c2a94e7d1f6b08e3a5d7";
/// A key restricted to `gpt-4o-mini*`.
pub const KEY_MINI: &str = "sk-chaos-mini-5e1b8d3f9a2c70e4b6a1";
/// A revoked key.
pub const KEY_REVOKED: &str = "sk-chaos-revoked-93d7a1e5c8b2f04a6e2d";
/// Keys no store knows; clients send them by mistake (or on purpose).
pub const WRONG_KEYS: [&str; 6] = [
    "sk-wrong-0a9f8e7d6c5b4a392817",
    "sk-proj-wrong-1b2c3d4e5f6a7b8c9d0e",
    "sk-ant-api03-wrong-f0e1d2c3b4a59687",
    "sk-wrong-4d5e6f7a8b9c0d1e2f3a",
    "wrong-key-without-prefix-8c7b6a5f4e3d",
    "sk-wrong-zz99yy88xx77ww66vv55",
];

/// Every key string a client sends: none of them may reach a log line.
pub fn secrets() -> Vec<&'static str> {
    let mut all = vec![KEY_A, KEY_B, KEY_MINI, KEY_REVOKED];
    all.extend(WRONG_KEYS);
    all
}

/// Retry: attempts in total.
pub const MAX_ATTEMPTS: u32 = 3;
/// Retry: the deadline of all attempts and waits together.
pub const DEADLINE: Duration = Duration::from_secs(30);
/// Retry: the timeout of one attempt (to the normalized answer).
pub const RETRY_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// The per-attempt timeout to the upstream's response head, inside the normalizer.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// The breaker's settings.
pub const THRESHOLDS: Thresholds = Thresholds {
    window: 20,
    minimum_calls: 10,
    failure_rate: 50.0,
    probes: 2,
    probe_timeout: Duration::from_secs(30),
};
/// How long a circuit stays open first.
pub const OPEN_FOR: Duration = Duration::from_secs(15);
/// Requests in flight per client (per IPv6 /64).
pub const PER_CLIENT_CONCURRENCY: u32 = 8;
/// Requests in flight through the rate limiter altogether.
pub const GLOBAL_CONCURRENCY: u32 = 48;
/// The models whose openings are counted by name.
pub const WATCHED: &[&str] = &[
    "gpt-4o",
    "gpt-4o-mini",
    "claude-sonnet",
    "flaky-7b",
    "dead-model",
    "stall-body",
];

/// The `[[keys]]` and `[validation]` of the gateway configuration.
fn config() -> String {
    format!(
        r#"
[[keys]]
id = "chaos-a"
secret = "{KEY_A}"

[[keys]]
id = "chaos-b"
secret = "{KEY_B}"

[[keys]]
id = "chaos-mini"
secret = "{KEY_MINI}"
models = ["gpt-4o-mini*"]

[[keys]]
id = "chaos-revoked"
secret = "{KEY_REVOKED}"
revoked = true

[validation]
body_limit = 1048576

[routes."/v1/models"]
validate = false
rate_limit = false
"#
    )
}

/// The service the routes hand proxied requests to.
pub type Upstream = BoxCloneSyncService<Request, Response, llm_layers::body::BoxError>;

/// A built gateway and its measuring points.
pub struct Gateway {
    /// The router: call it with `oneshot`, or serve it.
    pub app: Router,
    /// The upstream (its tally, its held calls).
    pub faults: Faults,
    /// Calls that reached the upstream.
    pub upstream: Arc<Counter>,
    /// Attempts the retry layer made (calls into the breaker).
    pub attempts: Arc<Counter>,
    /// The breaker's mirror.
    pub mirror: Arc<Mirror>,
    /// The rate limiter's state.
    pub rate: RateLimitHandle,
    /// The breaker's state.
    pub breaker: BreakerHandle,
    /// Retries scheduled.
    pub retries: Arc<AtomicU64>,
    /// Retries scheduled after the breaker itself refused the attempt.
    pub retries_on_refusal: Arc<AtomicU64>,
    /// The longest wait of a retry scheduled after such a refusal.
    pub longest_refusal_wait_ms: Arc<AtomicU64>,
}

/// Builds the gateway: `key_by` says where the rate limiter finds the client's address.
pub fn gateway(seed: u64, faults: Faults, key_by: BucketKey, mirror_capacity: usize) -> Gateway {
    let stack = Stack::from_toml_str(&config()).unwrap_or_else(|e| panic!("config: {e}"));
    let upstream = Arc::new(Counter::default());
    let attempts = Arc::new(Counter::default());
    let mirror = Arc::new(Mirror::new(THRESHOLDS, WATCHED, mirror_capacity));
    let retries = Arc::new(AtomicU64::new(0));
    let retries_on_refusal = Arc::new(AtomicU64::new(0));
    let longest_refusal_wait_ms = Arc::new(AtomicU64::new(0));

    let rate_limit = RateLimitLayer::builder()
        .key_by(key_by)
        .limits(
            Limits::new()
                .requests(Quota::per_minute(600).burst(100))
                .tokens(Quota::per_minute(20_000_000).burst(20_000_000))
                .concurrency(PER_CLIENT_CONCURRENCY),
        )
        .global(Limits::new().concurrency(GLOBAL_CONCURRENCY))
        .build()
        .expect("rate limit settings");

    let (r, rr, lw) = (
        retries.clone(),
        retries_on_refusal.clone(),
        longest_refusal_wait_ms.clone(),
    );
    let retry = RetryLayer::builder()
        .max_attempts(MAX_ATTEMPTS)
        .backoff(
            Backoff::new(
                Duration::from_millis(200),
                Duration::from_secs(2),
                Jitter::Full,
            )
            .expect("backoff"),
        )
        .deadline(DEADLINE)
        .attempt_timeout(RETRY_ATTEMPT_TIMEOUT)
        .budget(RetryBudget::new(Duration::from_secs(10), 10, 0.2).expect("budget"))
        .mark_exhausted(true)
        .seed(seed)
        .on_retry(move |e| {
            r.fetch_add(1, Ordering::Relaxed);
            // The breaker's own refusal: its message names the breaker.
            if e.error().message().starts_with("Circuit breaker ") {
                rr.fetch_add(1, Ordering::Relaxed);
                lw.fetch_max(e.delay().as_millis() as u64, Ordering::Relaxed);
            }
        })
        .build()
        .expect("retry settings");

    let hook = mirror.clone();
    let breaker = CircuitBreakerLayer::builder()
        .name("upstream")
        .key_by(CircuitKey::Model)
        .count_window(THRESHOLDS.window as usize)
        .minimum_calls(THRESHOLDS.minimum_calls as u64)
        .failure_rate(THRESHOLDS.failure_rate)
        .open_duration(OPEN_FOR)
        .half_open_probes(THRESHOLDS.probes)
        .probe_timeout(THRESHOLDS.probe_timeout)
        .fallback_model("gpt-4o-mini")
        .seed(seed)
        .on_event(move |e| hook.on_event(e))
        .build()
        .expect("breaker settings");

    let svc = ServiceBuilder::new()
        .map_response(IntoResponse::into_response)
        .layer(retry)
        .map_request(
            |req: Request<llm_layers::body::LayerBody<axum::body::Body>>| {
                req.map(axum::body::Body::new)
            },
        )
        .layer(CountLayer::around_breaker(attempts.clone()))
        .map_response(IntoResponse::into_response)
        .layer(breaker.clone())
        .layer(ObserveLayer(mirror.clone()))
        .map_request(
            |r: http::Request<llm_layers::body::LayerBody<axum::body::Body>>| {
                r.map(axum::body::Body::new)
            },
        )
        .map_response(IntoResponse::into_response)
        .layer(NormalizeErrorsLayer::new())
        .timeout(ATTEMPT_TIMEOUT)
        .layer(CountLayer::new(upstream.clone()))
        .service(faults.clone());
    let svc: Upstream = BoxCloneSyncService::new(svc);

    async fn proxy(State(upstream): State<Upstream>, req: Request) -> Response {
        match upstream.oneshot(req).await {
            Ok(res) => res,
            Err(e) => llm_layers::policy::classify_error(e).to_response(),
        }
    }

    // Per route, innermost first (as the gateway example does): rate limit, validation, auth.
    let mut chat: MethodRouter<Upstream> = post(proxy);
    chat = chat.layer(rate_limit.clone());
    chat = chat.layer(stack.validate());
    chat = chat.layer(stack.auth());
    let models = {
        let path = "/v1/models";
        let mut route: MethodRouter<Upstream> = get(proxy);
        if let Some(l) = stack.rate_limit_for(path) {
            route = route.layer(l);
        }
        if let Some(l) = stack.validate_for(path) {
            route = route.layer(l);
        }
        if let Some(l) = stack.auth_for(path) {
            route = route.layer(l);
        }
        route
    };
    let app = Router::new()
        .route("/v1/chat/completions", chat)
        .route("/v1/models", models)
        .with_state(svc)
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
                .layer(TraceLayer::new_for_http())
                .layer(PropagateRequestIdLayer::x_request_id()),
        );
    Gateway {
        app,
        faults,
        upstream,
        attempts,
        mirror,
        rate: rate_limit.handle(),
        breaker: breaker.handle(),
        retries,
        retries_on_refusal,
        longest_refusal_wait_ms,
    }
}
