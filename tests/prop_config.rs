//! Property tests of configuration extremes: every layer's builder given 0, 1, `u32::MAX`,
//! `u64::MAX`, `usize::MAX`, `Duration::MAX`, NaN and infinite floats either refuses with a
//! `ConfigError` naming the field, or builds a layer that then serves a few requests without
//! a panic (debug build: every overflow panics).
//!
//! The requests run in-process under a paused tokio clock, so waits of any length cost
//! nothing; each is bounded by a virtual 30-day timeout.
//!
//! Run with `PROPTEST_CASES=<n>` to change the number of cases (10 000 by default).

mod common_prop;
use common_prop::config;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use http::{HeaderName, Request, Response};
use http_body_util::BodyExt;
use llm_layers::auth::{ApiKeyAuthLayer, InMemoryKeyStore};
use llm_layers::body::LayerBody;
use llm_layers::breaker::CircuitBreakerLayer;
use llm_layers::config::ConfigError;
use llm_layers::error::ApiError;
use llm_layers::normalize::{NormalizeErrorsLayer, NormalizeOptions};
use llm_layers::rate_limit::{BucketKey, Limits, OnLimit, Quota, RateLimitLayer};
use llm_layers::retry::{Backoff, Jitter, RetryBudget, RetryLayer};
use llm_layers::stack::Stack;
use llm_layers::validate::ValidateRequestLayer;
use proptest::prelude::*;
use tower::{Layer, Service, ServiceExt};

// ---------- extreme values ----------

fn dur() -> impl Strategy<Value = Duration> {
    prop_oneof![
        3 => prop::sample::select(vec![
            Duration::ZERO,
            Duration::from_nanos(1),
            Duration::from_millis(1),
            Duration::from_secs(1),
            Duration::from_secs(5),
            Duration::from_secs(60),
            Duration::from_secs(301),
            Duration::from_secs(u64::from(u32::MAX)),
            Duration::from_millis(u64::MAX),
            Duration::from_secs(u64::MAX),
            Duration::MAX,
        ]),
        1 => any::<u64>().prop_map(Duration::from_nanos),
        1 => any::<u64>().prop_map(Duration::from_secs),
    ]
}

fn u32x() -> impl Strategy<Value = u32> {
    prop_oneof![
        3 => prop::sample::select(vec![0, 1, 2, 3, 10, u32::from(u16::MAX), u32::from(u16::MAX) + 1, u32::MAX - 1, u32::MAX]),
        1 => any::<u32>(),
    ]
}

fn u64x() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => prop::sample::select(vec![0, 1, 2, 60, u64::from(u32::MAX), u64::from(u32::MAX) + 1, u64::MAX - 1, u64::MAX]),
        1 => any::<u64>(),
    ]
}

/// Sizes, without the ones that ask for memory the machine does not have (see
/// `breaker_windows_of_any_size`).
fn usizex() -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => prop::sample::select(vec![0, 1, 2, 16, 1 << 20, u32::MAX as usize, usize::MAX - 1, usize::MAX]),
        1 => any::<usize>(),
    ]
}

fn f64x() -> impl Strategy<Value = f64> {
    prop_oneof![
        3 => prop::sample::select(vec![
            0.0,
            -0.0,
            5e-324,
            1e-300,
            0.5,
            1.0,
            1.5,
            50.0,
            100.0,
            100.000_000_1,
            1e300,
            f64::MAX,
            f64::MIN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
        ]),
        1 => any::<f64>(),
    ]
}

fn f32x() -> impl Strategy<Value = f32> {
    prop_oneof![
        3 => prop::sample::select(vec![0.0, -0.0, 1e-45, 0.2, 1.0, 1000.0, 1000.1, f32::MAX, f32::INFINITY, f32::NAN]),
        1 => any::<f32>(),
    ]
}

/// Mostly a value the builder accepts, else an extreme: valid settings reach the request
/// paths, where the arithmetic happens.
fn mostly<T: std::fmt::Debug + Clone + 'static>(
    valid: impl Strategy<Value = T> + 'static,
    extreme: impl Strategy<Value = T> + 'static,
) -> BoxedStrategy<T> {
    prop_oneof![2 => valid, 1 => extreme].boxed()
}

// ---------- requests ----------

const CHAT: &str =
    r#"{"model":"gpt-4o-mini","max_tokens":64,"messages":[{"role":"user","content":"hello"}]}"#;

/// What the upstream answers, one after the other.
#[derive(Debug, Clone, Copy)]
enum Answer {
    Ok,
    Busy,
    Limited,
    Empty500,
}

fn answers() -> impl Strategy<Value = Vec<Answer>> {
    prop::collection::vec(
        prop::sample::select(vec![
            Answer::Ok,
            Answer::Busy,
            Answer::Limited,
            Answer::Empty500,
        ]),
        1..4,
    )
}

fn respond(a: Answer) -> Response<Body> {
    let b = Response::builder().header("content-type", "application/json");
    match a {
        Answer::Ok => b.status(200).body(Body::from(
            r#"{"id":"c","choices":[],"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":4294967296,"total_tokens":18446744073709551615}}"#,
        )),
        Answer::Busy => b
            .status(503)
            .header("retry-after", "1")
            .body(Body::from(r#"{"error":{"message":"busy","type":"server_error"}}"#)),
        Answer::Limited => b
            .status(429)
            .header("retry-after-ms", "18446744073709551615")
            .header("x-ratelimit-reset-requests", "8760h")
            .body(Body::from(r#"{"error":{"message":"slow down","type":"rate_limit_error","code":"rate_limit_exceeded"}}"#)),
        Answer::Empty500 => b.status(500).body(Body::empty()),
    }
    .unwrap()
}

/// An upstream answering the script in a loop, already normalized as the recommended order
/// has it (the normalizer sits next to the upstream).
fn upstream<B: Send + 'static>(
    script: Vec<Answer>,
) -> impl Service<Request<B>, Response = Response<Body>, Error = Infallible, Future: Send>
       + Clone
       + Send
       + 'static {
    let n = Arc::new(AtomicUsize::new(0));
    let inner = tower::service_fn(move |_req: Request<B>| {
        let i = n.fetch_add(1, Ordering::Relaxed);
        let a = script[i % script.len()];
        async move { Ok::<_, Infallible>(respond(a)) }
    });
    tower::ServiceBuilder::new()
        .map_response(|r: Response<_>| r.map(Body::new))
        .layer(NormalizeErrorsLayer::new())
        .service(inner)
}

fn request() -> Request<Body> {
    Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-prop-0123456789abcdefghij")
        .header("x-user", "u1")
        .body(Body::from(CHAT))
        .unwrap()
}

/// Virtual time between two requests (so that circuits reach half-open, buckets refill and
/// sweeps run).
fn gaps() -> impl Strategy<Value = Vec<Duration>> {
    prop::collection::vec(
        prop::sample::select(vec![
            Duration::ZERO,
            Duration::from_millis(1),
            Duration::from_secs(1),
            Duration::from_secs(61),
            Duration::from_secs(3600),
            Duration::from_secs(400 * 86_400),
        ]),
        1..4,
    )
}

/// Sends a request through `svc` on a paused clock, then one more after each gap; every
/// answer is a 2xx or an envelope.
fn serve<S, B>(svc: S, gaps: &[Duration]) -> Result<(), TestCaseError>
where
    S: Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: std::fmt::Debug,
    S::Future: Send,
    S::Error: std::fmt::Debug,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        for gap in std::iter::once(&Duration::ZERO).chain(gaps) {
            tokio::time::sleep(*gap).await;
            let call = svc.clone().oneshot(request());
            let Ok(res) = tokio::time::timeout(Duration::from_secs(30 * 86_400), call).await else {
                continue;
            };
            let res = res.unwrap();
            let status = res.status();
            let enveloped = res.extensions().get::<ApiError>().is_some();
            prop_assert!(
                status.is_success() || enveloped,
                "a {} without an envelope",
                status
            );
            let body =
                tokio::time::timeout(Duration::from_secs(86_400), res.into_body().collect()).await;
            if let Ok(Ok(body)) = body {
                if !status.is_success() {
                    let v: serde_json::Value = serde_json::from_slice(&body.to_bytes()).unwrap();
                    prop_assert!(v["error"]["code"].is_string());
                }
            }
        }
        Ok(())
    })
}

/// A refusal names one of the layer's settings.
fn check_refusal(e: &ConfigError, layer: &str, fields: &[&str]) -> Result<(), TestCaseError> {
    prop_assert_eq!(e.layer(), layer);
    prop_assert!(!e.message().is_empty(), "{}", e);
    prop_assert!(
        fields.iter().any(|f| e
            .field()
            .strip_prefix(*f)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))),
        "`{}` is not a setting of the {} layer: {}",
        e.field(),
        layer,
        e
    );
    Ok(())
}

#[derive(Debug, Clone)]
struct RetrySettings {
    max_attempts: u32,
    base: Duration,
    cap: Duration,
    max_retry_after: Duration,
    hint_jitter: Duration,
    deadline: Option<Duration>,
    attempt_timeout: Option<Duration>,
    body_limit: usize,
    budget: Option<(Duration, u32, f32)>,
    seed: u64,
}

fn retry_settings() -> impl Strategy<Value = RetrySettings> {
    (
        (
            mostly(1u32..=10, u32x()),
            dur(),
            dur(),
            dur(),
            mostly(Just(Duration::ZERO), dur()),
        ),
        (
            proptest::option::of(dur()),
            proptest::option::of(dur()),
            mostly(1usize..1 << 20, usizex()),
            proptest::option::of((
                mostly((1u64..=60).prop_map(Duration::from_secs), dur()),
                u32x(),
                mostly(0.0f32..=1000.0, f32x()),
            )),
            any::<u64>(),
        ),
    )
        .prop_map(
            |(
                (max_attempts, base, cap, max_retry_after, hint_jitter),
                (deadline, attempt_timeout, body_limit, budget, seed),
            )| RetrySettings {
                max_attempts,
                base,
                cap,
                max_retry_after,
                hint_jitter,
                deadline,
                attempt_timeout,
                body_limit,
                budget,
                seed,
            },
        )
}

#[derive(Debug, Clone)]
struct BreakerSettings {
    window: (u8, usize, Duration, u32),
    failure_rate: f64,
    slow: Option<(Duration, f64)>,
    minimum_calls: u64,
    probes: u32,
    probe_timeout: Duration,
    open: Duration,
    backoff: Option<(f64, Duration)>,
    jitter: f64,
    max_keys: usize,
    body_limit: usize,
}

fn breaker_settings() -> impl Strategy<Value = BreakerSettings> {
    (
        (
            (
                0u8..3,
                prop::sample::select(vec![0usize, 1, 2, 10, 100, 65_535]),
                dur(),
                mostly(1u32..5, u32x()),
            ),
            mostly(1e-9f64..=100.0, f64x()),
            proptest::option::of((dur(), mostly(1e-9f64..=100.0, f64x()))),
            mostly(1u64..4, u64x()),
            mostly(1u32..=65_535, u32x()),
            dur(),
        ),
        (
            dur(),
            proptest::option::of((mostly(1.0f64..1e6, f64x()), dur())),
            mostly(0.0f64..=1.0, f64x()),
            mostly(1usize..1 << 20, usizex()),
            mostly(1usize..1 << 20, usizex()),
        ),
    )
        .prop_map(
            |(
                (window, failure_rate, slow, minimum_calls, probes, probe_timeout),
                (open, backoff, jitter, max_keys, body_limit),
            )| BreakerSettings {
                window,
                failure_rate,
                slow,
                minimum_calls,
                probes,
                probe_timeout,
                open,
                backoff,
                jitter,
                max_keys,
                body_limit,
            },
        )
}

fn breaker_builder(s: &BreakerSettings) -> llm_layers::breaker::CircuitBreakerLayerBuilder {
    let mut b = CircuitBreakerLayer::builder().seed(1);
    b = match s.window.0 {
        0 => b.count_window(s.window.1),
        1 => b.time_window(s.window.2, s.window.1),
        _ => b.consecutive_failures(s.window.3),
    };
    b = b
        .failure_rate(s.failure_rate)
        .minimum_calls(s.minimum_calls)
        .half_open_probes(s.probes)
        .probe_timeout(s.probe_timeout)
        .open_duration(s.open)
        .jitter(s.jitter)
        .max_keys(s.max_keys)
        .body_limit(s.body_limit);
    if let Some((d, p)) = s.slow {
        b = b.slow_calls(d, p);
    }
    if let Some((m, max)) = s.backoff {
        b = b.open_backoff(m, max);
    }
    b
}

const BREAKER_FIELDS: &[&str] = &[
    "name",
    "count_window",
    "time_window",
    "consecutive_failures",
    "failure_rate",
    "slow_calls",
    "minimum_calls",
    "half_open_probes",
    "probe_timeout",
    "open_duration",
    "open_backoff",
    "jitter",
    "max_keys",
    "body_limit",
    "fallback",
];

fn quota() -> impl Strategy<Value = Quota> {
    (
        mostly(1u64..1000, u64x()),
        dur(),
        mostly(1u32..1000, u32x()),
    )
        .prop_map(|(n, period, burst)| Quota::new(n, period).burst(burst))
}

fn limits() -> impl Strategy<Value = Limits> {
    (
        proptest::option::of(quota()),
        proptest::option::of(quota()),
        proptest::option::of(u32x()),
    )
        .prop_map(|(r, t, c)| {
            let mut l = Limits::new();
            if let Some(q) = r {
                l = l.requests(q);
            }
            if let Some(q) = t {
                l = l.tokens(q);
            }
            if let Some(c) = c {
                l = l.concurrency(c);
            }
            l
        })
}

proptest! {
    #![proptest_config(config())]

    /// The retry layer: every extreme is refused naming its field, or served without a panic.
    #[test]
    fn retry_extremes_build_or_refuse(s in retry_settings(), script in answers(), gaps in gaps()) {
        let backoff = match Backoff::new(s.base, s.cap, Jitter::Full) {
            Ok(b) => b,
            Err(e) => return check_refusal(&e, "retry", &["backoff"]),
        };
        let mut b = RetryLayer::builder()
            .max_attempts(s.max_attempts)
            .backoff(backoff)
            .max_retry_after(s.max_retry_after)
            .hint_jitter(s.hint_jitter)
            .body_limit(s.body_limit)
            .seed(s.seed);
        if let Some(d) = s.deadline {
            b = b.deadline(d);
        }
        if let Some(d) = s.attempt_timeout {
            b = b.attempt_timeout(d);
        }
        if let Some((ttl, min, ratio)) = s.budget {
            match RetryBudget::new(ttl, min, ratio) {
                Ok(budget) => b = b.budget(budget),
                Err(e) => return check_refusal(&e, "retry", &["budget"]),
            }
        }
        match b.build() {
            Ok(layer) => serve(layer.layer(upstream(script)), &gaps)?,
            Err(e) => check_refusal(&e, "retry", &["max_attempts", "hint_jitter", "deadline", "attempt_timeout", "body_limit", "max_retry_after"])?,
        }
    }

    /// The circuit breaker: every extreme is refused naming its field, or served without a
    /// panic.
    #[test]
    fn breaker_extremes_build_or_refuse(s in breaker_settings(), script in answers(), gaps in gaps()) {
        match breaker_builder(&s).build() {
            Ok(layer) => serve(layer.layer(upstream(script).map_request(|r: Request<llm_layers::body::LayerBody<Body>>| r.map(Body::new))), &gaps)?,
            Err(e) => check_refusal(&e, "circuit breaker", BREAKER_FIELDS)?,
        }
    }

    /// A count window of any size is refused or built without asking for more memory than
    /// a window needs (a window of 2^53 calls must not allocate 2^53 bytes up front).
    #[test]
    fn breaker_windows_of_any_size(n in usizex(), gaps in gaps()) {
        match CircuitBreakerLayer::builder().count_window(n).minimum_calls(1).build() {
            Ok(layer) => serve(layer.layer(upstream(vec![Answer::Ok, Answer::Busy]).map_request(|r: Request<llm_layers::body::LayerBody<Body>>| r.map(Body::new))), &gaps)?,
            Err(e) => check_refusal(&e, "circuit breaker", BREAKER_FIELDS)?,
        }
    }

    /// The rate limiter: quotas of any count, period and burst, concurrency, waits and sweeps
    /// are refused naming the field, or served without a panic.
    #[test]
    fn rate_limit_extremes_build_or_refuse(
        defaults in limits(),
        global in limits(),
        tier in proptest::option::of(limits()),
        wait in proptest::option::of(dur()),
        sweep in proptest::option::of((u64x(), dur())),
        body_limit in usizex(),
        script in answers(),
        gaps in gaps(),
    ) {
        let mut b = RateLimitLayer::builder()
            .key_by(BucketKey::header(HeaderName::from_static("x-user")))
            .limits(defaults)
            .global(global)
            .body_limit(body_limit);
        if let Some(t) = tier {
            b = b.tier("pro", t);
        }
        if let Some(w) = wait {
            b = b.mode(OnLimit::Wait(w));
        }
        if let Some((every, interval)) = sweep {
            b = b.sweep(every, interval);
        }
        match b.build() {
            Ok(layer) => serve(layer.layer(upstream(script)), &gaps)?,
            Err(e) => check_refusal(&e, "rate limit", &["limits", "global", "tier", "sweep", "mode", "body_limit"])?,
        }
    }

    /// Validation, auth and the normalizer: limits of any size and context windows of any
    /// length are refused naming the field, or served without a panic.
    #[test]
    fn edge_layer_extremes_build_or_refuse(
        validate_limit in usizex(),
        listed in usizex(),
        window in u64x(),
        auth_limit in usizex(),
        normalize_limit in usizex(),
        script in answers(),
        gaps in gaps(),
    ) {
        match ValidateRequestLayer::builder()
            .body_limit(validate_limit)
            .max_listed_models(listed)
            .context_window("gpt-4o-mini", window)
            .allowed_models(["gpt-4o-mini"])
            .build()
        {
            Ok(layer) => serve(layer.layer(upstream(script.clone()).map_request(|r: Request<llm_layers::body::LayerBody<Body>>| r.map(Body::new))), &gaps)?,
            Err(e) => check_refusal(&e, "validation", &["body_limit", "max_listed_models", "context_window", "allowed_models"])?,
        }
        let store = InMemoryKeyStore::from_toml_str(
            "[[keys]]\nid = \"k\"\nsecret = \"sk-prop-0123456789abcdefghij\"\nrpm = 4294967295\ntpm = 4294967295\nconcurrency = 4294967295\n",
        )
        .unwrap();
        match ApiKeyAuthLayer::builder(store).body_limit(auth_limit).build() {
            Ok(layer) => serve(
                tower::ServiceBuilder::new()
                    .layer(layer)
                    .map_request(|r: Request<LayerBody<Body>>| r.map(Body::new))
                    .service(upstream(script.clone())),
                &gaps,
            )?,
            Err(e) => check_refusal(&e, "auth", &["body_limit", "accepted_headers"])?,
        }
        let layer = NormalizeErrorsLayer::with_options(NormalizeOptions::new().body_limit(normalize_limit));
        let inner = tower::service_fn(move |_req: Request<Body>| async move { Ok::<_, Infallible>(respond(Answer::Busy)) });
        let svc = tower::ServiceBuilder::new()
            .map_response(|r: Response<_>| r.map(Body::new))
            .layer(layer)
            .service(inner);
        serve(svc, &gaps)?;
    }

    /// A TOML stack with extreme numbers: refused naming the key, or its layers, stacked in
    /// the recommended order, serve requests without a panic.
    #[test]
    fn stack_extremes_build_or_refuse(
        rpm in u64x(), burst in proptest::option::of(u32x()), tpm in proptest::option::of(u64x()),
        concurrency in proptest::option::of(u32x()), wait_ms in proptest::option::of(u64x()),
        attempts in 1u32..5, base in 1u64..3, deadline_ms in proptest::option::of(u64x()),
        max_retry_after_ms in proptest::option::of(u64x()),
        open_ms in proptest::option::of(u64x()), probes in proptest::option::of(u32x()),
        minimum_calls in proptest::option::of(u64x()),
        attempt_timeout_ms in proptest::option::of(u64x()),
        script in answers(),
        gaps in gaps(),
    ) {
        let opt = |k: &str, v: Option<String>| v.map(|v| format!("{k} = {v}\n")).unwrap_or_default();
        let text = format!(
            "[[keys]]\nid = \"k\"\nsecret = \"sk-prop-0123456789abcdefghij\"\n\
             [rate_limit]\n{}\
             [rate_limit.defaults]\nrpm = {rpm}\n{}{}{}\
             [retry]\nmax_attempts = {attempts}\nbackoff_base_ms = {base}\n{}{}\
             [breaker]\n{}{}{}\
             [upstream]\n{}",
            opt("wait_ms", wait_ms.map(|v| v.to_string())),
            opt("burst", burst.map(|v| v.to_string())),
            opt("tpm", tpm.map(|v| v.to_string())),
            opt("concurrency", concurrency.map(|v| v.to_string())),
            opt("deadline_ms", deadline_ms.map(|v| v.to_string())),
            opt("max_retry_after_ms", max_retry_after_ms.map(|v| v.to_string())),
            opt("open_ms", open_ms.map(|v| v.to_string())),
            opt("half_open_probes", probes.map(|v| v.to_string())),
            opt("minimum_calls", minimum_calls.map(|v| v.to_string())),
            opt("attempt_timeout_ms", attempt_timeout_ms.map(|v| v.to_string())),
        );
        let stack = match Stack::from_toml_str(&text) {
            Ok(s) => s,
            Err(e) => {
                prop_assert_eq!(e.layer(), "configuration");
                let keys = ["rate_limit.wait_ms", "rate_limit.defaults.rpm", "rate_limit.defaults.burst",
                    "rate_limit.defaults.tpm", "rate_limit.defaults.concurrency", "retry.deadline_ms",
                    "retry.max_retry_after_ms", "breaker.open_ms", "breaker.half_open_probes",
                    "breaker.minimum_calls", "upstream.attempt_timeout_ms",
                    // A value the breaker's builder refuses is named at its section.
                    "breaker"];
                prop_assert!(keys.contains(&e.field()), "`{}` is not a key of the document: {}\n{}", e.field(), e, text);
                return Ok(());
            }
        };
        let svc = tower::ServiceBuilder::new()
            .layer(stack.auth())
            .map_request(|r: Request<LayerBody<Body>>| r.map(Body::new))
            .layer(stack.rate_limit())
            .layer(stack.retry())
            .layer(stack.breaker())
            .map_response(|r: Response<_>| r.map(Body::new))
            .layer(NormalizeErrorsLayer::new())
            .layer(tower::timeout::TimeoutLayer::new(stack.attempt_timeout()))
            .service(upstream(script));
        serve(svc, &gaps)?;
    }
}
