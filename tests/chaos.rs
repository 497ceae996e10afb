//! The chaos suite: the gateway's whole stack in front of an upstream that fails in every way
//! an LLM API fails, under clients that send what attackers send.
//!
//! Seeded (`CHAOS_SEED`, printed), sized by `CHAOS_REQUESTS` (default 100,000), under
//! `tokio::time::pause` for the timed part, so stalls of minutes take no wall time and every
//! run with one seed plays the same. Invariants, on every request and at the end of the run:
//!
//! - each request finishes within its deadline (virtual time) with a 2xx or a valid envelope;
//! - no panic, anywhere in the process;
//! - the in-flight counters back to 0, and the rate limiter admits a whole client's and the
//!   whole gateway's concurrency at once after the run;
//! - every breaker transition matches the configured thresholds, and circuits of models that
//!   always fail do open;
//! - a refusal by the breaker itself is never slept on by the retry layer;
//! - retry amplification at most 1.3x of the offered load at 100 % upstream failure;
//! - keyed state bounded: live heap bytes after the run, tracked rate-limit keys, circuits;
//! - no key bytes in any log line (TRACE level, every target).
//!
//! The release-mode run of 10^6 requests:
//! `CHAOS_REQUESTS=1000000 cargo test --release --all-features --test chaos -- --nocapture`.
#![cfg(all(feature = "config", feature = "rate-limit"))]

mod common_chaos;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use bytes::BytesMut;
use common_chaos::alloc::{self, Counting};
use common_chaos::client::{check, client_in, mixed, proxy_peer, Got, Spec, PREFIXES};
use common_chaos::stack::{
    gateway, secrets, Gateway, DEADLINE, GLOBAL_CONCURRENCY, KEY_A, PER_CLIENT_CONCURRENCY,
};
use common_chaos::upstream::{Faults, Health, MAX_GENERATION};
use common_chaos::{count_panics, env_count, logs, panics, seed, serial};
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use llm_layers::breaker::CircuitMode;
use llm_layers::error::ApiError;
use llm_layers::rate_limit::BucketKey;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::ServiceExt;

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Client requests in flight at once in the timed run.
const CONCURRENCY: usize = 64;
/// Mean arrival rate of the timed run, requests per virtual second.
const RATE_PER_SEC: f64 = 50.0;
/// Slack on virtual-time bounds: the timer wheel's millisecond.
const SLACK: Duration = Duration::from_millis(10);
/// Live heap bytes the stack may keep after the run, over what it held before (keyed state of
/// every layer: circuits, buckets, budgets).
const KEPT_BYTES_BOUND: isize = 8 * 1024 * 1024;
/// Circuits the breaker may keep (its default `max_keys`, plus the overflow circuit).
const MAX_CIRCUITS: usize = 1024 + 1;

/// What one request came to.
struct Done {
    label: Result<String, String>,
    spec_line: String,
    head: Duration,
    body: Duration,
    attempts: u32,
}

/// The run's tallies.
#[derive(Default)]
struct Summary {
    by_label: BTreeMap<String, u64>,
    violations: BTreeMap<String, (u64, Vec<String>)>,
    panicked_tasks: u64,
    max_head: Duration,
    max_body: Duration,
    attempts: BTreeMap<u32, u64>,
    requests: u64,
}

impl Summary {
    fn violation(&mut self, msg: String) {
        // Group by the message with its numbers blanked.
        let kind: String = msg
            .chars()
            .map(|c| if c.is_ascii_digit() { '#' } else { c })
            .take(90)
            .collect();
        let entry = self.violations.entry(kind).or_default();
        entry.0 += 1;
        if entry.1.len() < 3 {
            entry.1.push(msg.chars().take(600).collect());
        }
    }

    fn take(&mut self, done: Result<Done, tokio::task::JoinError>) {
        self.requests += 1;
        let done = match done {
            Ok(d) => d,
            Err(e) => {
                self.panicked_tasks += 1;
                self.violation(format!("a request task failed: {e}"));
                return;
            }
        };
        self.max_head = self.max_head.max(done.head);
        self.max_body = self.max_body.max(done.body);
        *self.attempts.entry(done.attempts).or_default() += 1;
        match done.label {
            Ok(label) => *self.by_label.entry(label).or_default() += 1,
            Err(msg) => self.violation(format!("{msg} [{}]", done.spec_line)),
        }
    }

    fn violation_count(&self) -> u64 {
        self.violations.values().map(|v| v.0).sum()
    }

    fn print(&self) {
        println!("answers by status and code ({} requests):", self.requests);
        for (label, n) in &self.by_label {
            println!("  {n:>9}  {label}");
        }
        println!("attempts per request: {:?}", self.attempts);
        println!(
            "slowest head {:?}, slowest body after the head {:?} (virtual time)",
            self.max_head, self.max_body
        );
        if !self.violations.is_empty() {
            println!("violations ({}):", self.violation_count());
            for (kind, (n, examples)) in &self.violations {
                println!("  {n:>9}  {kind}");
                for e in examples {
                    println!("             e.g. {e}");
                }
            }
        }
    }
}

fn spec_line(spec: &Spec) -> String {
    let model: String = spec.model.chars().take(24).collect();
    format!(
        "{} {} model {:?}{} ({} chars) stream {} key {}",
        spec.method,
        spec.path,
        model,
        if spec.model.len() > 24 { "..." } else { "" },
        spec.model.len(),
        spec.stream,
        match spec.key {
            Some(_) if spec.valid_key() => "valid",
            Some(k) if k.contains("revoked") => "revoked",
            Some(_) => "wrong",
            None => "none",
        }
    )
}

/// Reads a body to its end, or to its first error.
async fn read_body<B>(body: B) -> (bytes::Bytes, bool)
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
{
    let mut body = body;
    let mut buf = BytesMut::new();
    loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                }
            }
            Some(Err(_)) => return (buf.freeze(), true),
            None => return (buf.freeze(), false),
        }
    }
}

/// The checks a request owes whatever the answer: the deadline, and HEAD on a healthy
/// upstream answering 2xx.
fn owed(spec: &Spec, got: &Got, head: Duration, body: Duration) -> Result<(), String> {
    if head > DEADLINE + SLACK {
        return Err(format!(
            "answered after {head:?}, past the {DEADLINE:?} deadline ({} )",
            got.status
        ));
    }
    if body > MAX_GENERATION + SLACK {
        return Err(format!(
            "body took {body:?} after the head, longer than the longest generation ({})",
            got.status
        ));
    }
    if spec.method == Method::HEAD && spec.unrestricted_key() && !got.status.is_success() {
        return Err(format!(
            "HEAD with an unrestricted key, the upstream answering 200, got {} {:?} after {} attempt(s)",
            got.status,
            got.api_error.as_ref().map(|e| e.code()),
            got.headers
                .get("x-llm-layers-attempts")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?")
        ));
    }
    Ok(())
}

/// One request through the in-process router.
async fn one(app: Router, spec: Spec) -> Done {
    let start = Instant::now();
    let res = app
        .oneshot(spec.request(Some(proxy_peer())))
        .await
        .expect("the router is infallible");
    let head_at = Instant::now();
    let (parts, body) = res.into_parts();
    let api_error = parts.extensions.get::<ApiError>().cloned();
    let (bytes, body_error) = read_body(body).await;
    let end = Instant::now();
    let got = Got {
        status: parts.status,
        headers: parts.headers,
        api_error,
        body: bytes,
        body_error,
    };
    let head = head_at - start;
    let body = end - head_at;
    let label = check(&spec, &got).and_then(|label| owed(&spec, &got, head, body).map(|_| label));
    Done {
        label,
        spec_line: spec_line(&spec),
        head,
        body,
        attempts: got
            .headers
            .get("x-llm-layers-attempts")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    }
}

/// Exponential inter-arrival gaps at `rate` per second.
fn gap(rng: &mut fastrand::Rng, rate: f64) -> Duration {
    Duration::from_secs_f64(-(1.0 - rng.f64()).ln() / rate)
}

/// How a run's requests arrive.
struct Load {
    /// Requests in all.
    n: u64,
    /// Seed of the arrivals and of what clients send.
    seed: u64,
    /// Requests in flight at once, at most.
    concurrency: usize,
    /// Mean arrivals per virtual second.
    rate: f64,
}

/// Sends the load's requests, made by `next`; `tick` runs every 100 requests.
async fn drive(
    app: &Router,
    load: Load,
    summary: &mut Summary,
    mut next: impl FnMut(&mut fastrand::Rng, u64) -> Spec,
    mut tick: impl FnMut(),
) {
    let Load {
        n,
        seed,
        concurrency,
        rate,
    } = load;
    let mut rng = fastrand::Rng::with_seed(seed);
    let slots = Arc::new(Semaphore::new(concurrency));
    let mut tasks = JoinSet::new();
    for i in 0..n {
        tokio::time::sleep(gap(&mut rng, rate)).await;
        let slot = slots.clone().acquire_owned().await.expect("never closed");
        let spec = next(&mut rng, i);
        let app = app.clone();
        tasks.spawn(async move {
            let done = one(app, spec).await;
            drop(slot);
            done
        });
        while let Some(done) = tasks.try_join_next() {
            summary.take(done);
        }
        if i % 100 == 0 {
            tick();
        }
    }
    while let Some(done) = tasks.join_next().await {
        summary.take(done);
    }
}

/// Sends `per_prefix` held requests from each of `prefixes` at once and checks that every one
/// of them is admitted (reaches the upstream) before any is let go.
async fn admits_at_once(gw: &Gateway, prefixes: &[u16], per_prefix: u32) -> Result<(), String> {
    let mut rng = fastrand::Rng::with_seed(7);
    let base = gw.upstream.current();
    let want = prefixes.len() as i64 * per_prefix as i64;
    let mut tasks = JoinSet::new();
    for &p in prefixes {
        // One address per client: one key whether the limiter keys addresses or prefixes.
        let client = client_in(p, &mut rng);
        for _ in 0..per_prefix {
            let spec = Spec {
                method: Method::POST,
                path: "/v1/chat/completions",
                key: Some(KEY_A),
                model: "hold-model".into(),
                stream: false,
                max_tokens: 16,
                client,
                hold: true,
            };
            let app = gw.app.clone();
            tasks.spawn(async move {
                let res = app
                    .oneshot(spec.request(Some(proxy_peer())))
                    .await
                    .expect("infallible");
                let status = res.status();
                let err = res.extensions().get::<ApiError>().map(|e| e.code());
                (status, err)
            });
        }
    }
    // Nothing sleeps here, so the paused clock stands still while the calls come in.
    let mut refused = Vec::new();
    for _ in 0..100_000 {
        if gw.upstream.current() - base >= want {
            break;
        }
        while let Some(done) = tasks.try_join_next() {
            refused.push(done.map_err(|e| e.to_string())?);
        }
        tokio::task::yield_now().await;
    }
    let admitted = gw.upstream.current() - base;
    gw.faults.release_held(want as usize);
    while let Some(done) = tasks.join_next().await {
        let (status, code) = done.map_err(|e| e.to_string())?;
        if status != StatusCode::OK {
            refused.push((status, code));
        }
    }
    if admitted < want || !refused.is_empty() {
        return Err(format!(
            "{admitted} of {want} requests admitted at once from {} client(s); refused: {refused:?}",
            prefixes.len()
        ));
    }
    Ok(())
}

/// Bucket entries the rate limiter may hold: one per client prefix and quota (a request and
/// a token quota each), plus the global buckets.
fn tracked_limit() -> usize {
    2 * PREFIXES as usize + 2
}

/// A current-thread runtime with the clock paused: virtual time.
fn paused() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
}

#[test]
fn chaos_through_the_whole_stack() {
    let _serial = serial();
    paused().block_on(mixed_run());
}

async fn mixed_run() {
    count_panics();
    let capture = logs::install(&secrets());
    // The detector sees a key (a control for the log invariant).
    assert!(capture.holds_key(format!("authorization: Bearer {KEY_A}").as_bytes()));
    assert!(capture.holds_key(b"key=7f3e9b2c41d8a6e0"));
    assert!(!capture.holds_key(b"key_id=chaos-a"));

    let seed = seed();
    let n = env_count("CHAOS_REQUESTS", 100_000);
    println!("chaos: seed {seed:#x} (CHAOS_SEED), {n} requests (CHAOS_REQUESTS)");
    let wall = std::time::Instant::now();
    let panics_before = panics();
    let leaks_before = capture.leaks();
    let lines_before = capture.lines();
    let bytes_before = capture.bytes();

    let gw = gateway(
        seed,
        Faults::new(seed ^ 0xFA17, Health::Mixed, true),
        BucketKey::client_ip().trusted_proxies(["10.0.0.0/8"]),
        4096 + n as usize / 50,
    );
    let mut summary = Summary::default();
    let mut max_tracked = 0usize;
    let started = Instant::now();

    let live_before = alloc::live();
    alloc::reset_peak();
    let rate = gw.rate.clone();
    drive(
        &gw.app,
        Load {
            n,
            seed,
            concurrency: CONCURRENCY,
            rate: RATE_PER_SEC,
        },
        &mut summary,
        mixed,
        || max_tracked = max_tracked.max(rate.tracked_keys()),
    )
    .await;
    max_tracked = max_tracked.max(gw.rate.tracked_keys());
    let live_after = alloc::live();
    let peak = alloc::peak();
    let virtual_time = started.elapsed();

    let mut failures: Vec<String> = Vec::new();
    // In flight: nothing left at the upstream or between retry and breaker.
    let (upstream_now, attempts_now) = (gw.upstream.current(), gw.attempts.current());
    if upstream_now != 0 || attempts_now != 0 {
        failures.push(format!(
            "calls still in flight after the run: {upstream_now} at the upstream, {attempts_now} in the breaker"
        ));
    }
    // Concurrency slots all given back: a whole client's worth, then the whole gateway's. The
    // clients' prefixes first pay back the debt of the absurd `usage` figures they were
    // charged (at most 2^24 tokens an answer, a few dozen answers): a virtual day.
    tokio::time::sleep(Duration::from_secs(24 * 3600)).await;
    if let Err(e) = admits_at_once(&gw, &[1], PER_CLIENT_CONCURRENCY).await {
        failures.push(format!("per-client concurrency after the run: {e}"));
    }
    let global: Vec<u16> = (2..2 + (GLOBAL_CONCURRENCY / PER_CLIENT_CONCURRENCY) as u16).collect();
    if let Err(e) = admits_at_once(&gw, &global, PER_CLIENT_CONCURRENCY).await {
        failures.push(format!("global concurrency after the run: {e}"));
    }

    let kept = live_after - live_before;
    let circuits = gw.breaker.all_metrics().len();
    let mirror = gw.mirror.report();
    let refusal_retries = gw
        .retries_on_refusal
        .load(std::sync::atomic::Ordering::Relaxed);
    let panicked = panics() - panics_before;
    let leaks = capture.leaks() - leaks_before;

    println!("---- chaos summary (seed {seed:#x}) ----");
    summary.print();
    println!(
        "virtual time {:.0} s, wall time {:.1} s",
        virtual_time.as_secs_f64(),
        wall.elapsed().as_secs_f64()
    );
    println!(
        "upstream calls {} (peak {} in flight), attempts {}, retries {}, retries after a breaker refusal {} (longest wait {} ms)",
        gw.upstream.calls(),
        gw.upstream.peak(),
        gw.attempts.calls(),
        gw.retries.load(std::sync::atomic::Ordering::Relaxed),
        refusal_retries,
        gw.longest_refusal_wait_ms.load(std::sync::atomic::Ordering::Relaxed),
    );
    println!("upstream answers played: {:?}", gw.faults.tally());
    println!("breaker transitions: {:?}", mirror.transitions);
    println!(
        "breaker: {} transitions verified, {} on keys the mirror did not see, openings {:?}, {} rejections, fallbacks {} ok / {} failed, {} circuits kept",
        mirror.verified, mirror.unknown_keys, mirror.opened, mirror.rejections, mirror.fallbacks_ok, mirror.fallbacks_failed, circuits
    );
    for model in common_chaos::stack::WATCHED {
        if let Some(m) = gw.breaker.metrics(model) {
            println!(
                "circuit {model:?}: {} calls recorded, {} failed, {} ignored, {} rejected, {} openings",
                m.calls, m.failures, m.ignored, m.rejections, m.openings
            );
        }
    }
    println!(
        "memory: {:.2} MiB kept after the run (bound {:.0} MiB), peak {:.2} MiB over the start; rate-limit keys tracked at most {max_tracked} (bound {})",
        alloc::mib(kept),
        alloc::mib(KEPT_BYTES_BOUND),
        alloc::mib(peak - live_before),
        tracked_limit()
    );
    println!(
        "logs: {} lines ({} bytes) at TRACE, {leaks} with key bytes",
        capture.lines() - lines_before,
        capture.bytes() - bytes_before
    );

    // Per request.
    if summary.violation_count() > 0 {
        failures.push(format!(
            "{} requests broke an invariant (see the summary)",
            summary.violation_count()
        ));
    }
    if summary.requests != n {
        failures.push(format!(
            "{} of {n} requests accounted for",
            summary.requests
        ));
    }
    if panicked > 0 || summary.panicked_tasks > 0 {
        failures.push(format!(
            "{panicked} panics ({} request tasks)",
            summary.panicked_tasks
        ));
    }
    // The breaker.
    if mirror.violation_count > 0 {
        failures.push(format!(
            "{} breaker transitions against the thresholds: {:?}",
            mirror.violation_count, mirror.violations
        ));
    }
    if mirror.verified == 0 {
        failures.push("no breaker transition was verified".into());
    }
    for model in ["dead-model", "stall-body"] {
        if mirror.opened.get(model).copied().unwrap_or(0) == 0 {
            failures.push(format!(
                "the circuit of {model:?}, whose every call fails, never opened"
            ));
        }
    }
    if refusal_retries > 0 {
        failures.push(format!(
            "{refusal_retries} retries were scheduled on the breaker's own refusal (longest wait {} ms)",
            gw.longest_refusal_wait_ms.load(std::sync::atomic::Ordering::Relaxed)
        ));
    }
    // Keyed state.
    if kept > KEPT_BYTES_BOUND {
        failures.push(format!(
            "{:.1} MiB of heap kept after the run, over the {:.0} MiB bound",
            alloc::mib(kept),
            alloc::mib(KEPT_BYTES_BOUND)
        ));
    }
    if max_tracked > tracked_limit() {
        failures.push(format!(
            "the rate limiter tracked {max_tracked} keys for clients from {PREFIXES} IPv6 /64 prefixes"
        ));
    }
    if circuits > MAX_CIRCUITS {
        failures.push(format!("{circuits} circuits kept, over {MAX_CIRCUITS}"));
    }
    // Logs.
    if capture.lines() == lines_before {
        failures.push("no log line was captured".into());
    }
    if leaks > 0 {
        failures.push(format!(
            "{leaks} log lines hold key bytes, e.g. {:?}",
            capture.first_leaks()
        ));
    }
    assert!(
        failures.is_empty(),
        "chaos invariants broken (seed {seed:#x}):\n- {}",
        failures.join("\n- ")
    );
}

/// 100 % upstream failure at 200 requests per second: the whole stack, and again with the
/// breaker disabled so that the retry budget alone holds the line.
#[test]
fn retry_amplification_at_total_failure() {
    let _serial = serial();
    paused().block_on(amplification());
}

async fn amplification() {
    count_panics();
    let capture = logs::install(&secrets());
    let seed = seed();
    let n = env_count("CHAOS_AMPLIFICATION_REQUESTS", 12_000);
    println!("amplification: seed {seed:#x}, {n} requests per phase at 200/s");
    let panics_before = panics();
    let leaks_before = capture.leaks();
    let mut failures = Vec::new();
    for breaker in [CircuitMode::Auto, CircuitMode::Disabled] {
        let gw = gateway(
            seed,
            Faults::new(seed ^ 0xD0E5, Health::Down, true),
            BucketKey::client_ip().trusted_proxies(["10.0.0.0/8"]),
            4096,
        );
        gw.breaker.set_mode(breaker);
        let mut summary = Summary::default();
        let models = ["gpt-4o", "claude-sonnet", "flaky-7b", "gpt-4o-mini"];
        drive(
            &gw.app,
            Load {
                n,
                seed: seed ^ 0xA4,
                concurrency: 1024,
                rate: 200.0,
            },
            &mut summary,
            |rng, _| Spec {
                method: Method::POST,
                path: "/v1/chat/completions",
                key: Some(KEY_A),
                model: models[rng.usize(..models.len())].into(),
                stream: rng.bool(),
                max_tokens: 64,
                client: client_in(rng.u16(0..PREFIXES), rng),
                hold: false,
            },
            || {},
        )
        .await;
        // Offered to the retry layer: every request that got past the edge layers (their own
        // refusals carry no attempt count).
        let edge_refusals: u64 = summary.attempts.get(&0).copied().unwrap_or(0);
        let offered = n - edge_refusals;
        let upstream = gw.upstream.calls() as f64 / offered as f64;
        let attempts = gw.attempts.calls() as f64 / offered as f64;
        println!("---- breaker {breaker:?} ----");
        summary.print();
        println!(
            "offered {offered} ({edge_refusals} refused at the edge); upstream calls {} = {upstream:.3}x, attempts {} = {attempts:.3}x, retries after a breaker refusal {}",
            gw.upstream.calls(),
            gw.attempts.calls(),
            gw.retries_on_refusal.load(std::sync::atomic::Ordering::Relaxed)
        );
        if summary.violation_count() > 0 {
            failures.push(format!(
                "breaker {breaker:?}: {} requests broke an invariant",
                summary.violation_count()
            ));
        }
        if offered < n / 2 {
            failures.push(format!(
                "breaker {breaker:?}: only {offered} of {n} requests reached the retry layer"
            ));
        }
        if upstream > 1.3 || attempts > 1.3 {
            failures.push(format!(
                "breaker {breaker:?}: amplification {upstream:.3}x at the upstream, {attempts:.3}x in attempts, over 1.3x"
            ));
        }
    }
    if panics() > panics_before {
        failures.push(format!("{} panics", panics() - panics_before));
    }
    if capture.leaks() > leaks_before {
        failures.push(format!(
            "log lines hold key bytes: {:?}",
            capture.first_leaks()
        ));
    }
    assert!(
        failures.is_empty(),
        "amplification invariants broken (seed {seed:#x}):\n- {}",
        failures.join("\n- ")
    );
}

/// The same mix without the timed faults, through a real axum server and a real reqwest
/// client; the rate limiter reads the peer from axum's `ConnectInfo`.
#[test]
fn chaos_over_real_sockets() {
    let _serial = serial();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(over_sockets());
}

async fn over_sockets() {
    count_panics();
    let capture = logs::install(&secrets());
    let seed = seed();
    let n = env_count("CHAOS_SOCKET_REQUESTS", 3_000);
    println!("sockets: seed {seed:#x}, {n} requests (CHAOS_SOCKET_REQUESTS)");
    let panics_before = panics();
    let lines_before = capture.lines();
    let leaks_before = capture.leaks();
    fn peer(ext: &http::Extensions) -> Option<std::net::IpAddr> {
        ext.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip())
    }
    let gw = gateway(
        seed,
        Faults::new(seed ^ 0x50CE, Health::Mixed, false),
        BucketKey::client_ip_from(peer).trusted_proxies(["127.0.0.0/8"]),
        4096 + n as usize / 50,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = gw.app.clone();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap()
    });
    // A fresh connection per request: a pooled connection the server closes after an answer
    // given without reading the request body fails the next request sent on it, which says
    // nothing about the stack.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();

    let mut rng = fastrand::Rng::with_seed(seed);
    let slots = Arc::new(Semaphore::new(32));
    let mut tasks = JoinSet::new();
    let mut summary = Summary::default();
    let mut max_tracked = 0;
    for i in 0..n {
        let slot = slots.clone().acquire_owned().await.unwrap();
        let spec = mixed(&mut rng, i);
        let http = http.clone();
        tasks.spawn(async move {
            let got = send(&http, addr, &spec).await;
            drop(slot);
            let label = got.and_then(|got| {
                check(&spec, &got).and_then(|label| {
                    owed(&spec, &got, Duration::ZERO, Duration::ZERO).map(|_| label)
                })
            });
            Done {
                label,
                spec_line: spec_line(&spec),
                head: Duration::ZERO,
                body: Duration::ZERO,
                attempts: 0,
            }
        });
        while let Some(done) = tasks.try_join_next() {
            summary.take(done);
        }
        if i % 100 == 0 {
            max_tracked = max_tracked.max(gw.rate.tracked_keys());
        }
    }
    while let Some(done) = tasks.join_next().await {
        summary.take(done);
    }
    max_tracked = max_tracked.max(gw.rate.tracked_keys());
    // The server drops a body once it has written it; the client may have read the last byte
    // a moment before.
    let settled = tokio::time::timeout(Duration::from_secs(10), async {
        while gw.upstream.current() != 0 || gw.attempts.current() != 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;

    println!("---- chaos over sockets (seed {seed:#x}) ----");
    summary.print();
    println!("upstream answers played: {:?}", gw.faults.tally());
    println!(
        "rate-limit keys tracked at most {max_tracked}; logs: {} lines",
        capture.lines() - lines_before
    );
    let mut failures = Vec::new();
    if summary.violation_count() > 0 {
        failures.push(format!(
            "{} requests broke an invariant",
            summary.violation_count()
        ));
    }
    if settled.is_err() {
        failures.push(format!(
            "calls still in flight: {} at the upstream, {} in the breaker",
            gw.upstream.current(),
            gw.attempts.current()
        ));
    }
    if max_tracked > tracked_limit() {
        failures.push(format!(
            "the rate limiter tracked {max_tracked} keys for clients from {PREFIXES} IPv6 /64 prefixes"
        ));
    }
    if panics() > panics_before {
        failures.push(format!("{} panics", panics() - panics_before));
    }
    if capture.leaks() > leaks_before {
        failures.push(format!(
            "log lines hold key bytes: {:?}",
            capture.first_leaks()
        ));
    }
    assert!(
        failures.is_empty(),
        "socket chaos invariants broken (seed {seed:#x}):\n- {}",
        failures.join("\n- ")
    );
}

/// One request over HTTP.
async fn send(http: &reqwest::Client, addr: SocketAddr, spec: &Spec) -> Result<Got, String> {
    let req = spec.request(None);
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    let mut rb = http.request(parts.method.clone(), format!("http://{addr}{}", parts.uri));
    for (k, v) in &parts.headers {
        rb = rb.header(k, v);
    }
    let mut res = rb.body(body).send().await.map_err(|e| {
        let mut msg = format!("the gateway did not answer: {e}");
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            msg.push_str(&format!(": {s}"));
            source = s.source();
        }
        msg
    })?;
    let status = res.status();
    let headers = res.headers().clone();
    let mut buf = BytesMut::new();
    let mut body_error = false;
    loop {
        match res.chunk().await {
            Ok(Some(c)) => buf.extend_from_slice(&c),
            Ok(None) => break,
            Err(_) => {
                body_error = true;
                break;
            }
        }
    }
    Ok(Got {
        status,
        headers,
        api_error: None,
        body: buf.freeze(),
        body_error,
    })
}

// ---- Controls: each checker of the suite catches what it is there to catch. ----

/// The mirror flags a breaker that opens before the configured thresholds: here the breaker
/// opens after 2 failures while the mirror expects at least 10 calls.
#[test]
fn control_the_mirror_catches_an_early_opening() {
    use common_chaos::observe::{CountLayer, Counter, Mirror, ObserveLayer};
    use common_chaos::stack::THRESHOLDS;
    use llm_layers::breaker::{CircuitBreakerLayer, CircuitKey};
    use llm_layers::validate::ValidateRequestLayer;
    use tower::ServiceBuilder;

    let _serial = serial();
    paused().block_on(async {
        let mirror = Arc::new(Mirror::new(THRESHOLDS, &[], 16));
        let hook = mirror.clone();
        let breaker = CircuitBreakerLayer::builder()
            .key_by(CircuitKey::Model)
            .count_window(THRESHOLDS.window as usize)
            .minimum_calls(2)
            .failure_rate(THRESHOLDS.failure_rate)
            .on_event(move |e| hook.on_event(e))
            .build()
            .unwrap();
        let svc = ServiceBuilder::new()
            .layer(ValidateRequestLayer::builder().build().unwrap())
            .map_request(
                |req: http::Request<llm_layers::body::LayerBody<axum::body::Body>>| {
                    req.map(axum::body::Body::new)
                },
            )
            .layer(CountLayer::around_breaker(Arc::new(Counter::default())))
            .map_response(|r: http::Response<_>| r.map(axum::body::Body::new))
            .layer(breaker)
            .layer(ObserveLayer(mirror.clone()))
            .service(tower::service_fn(
                |_req: http::Request<llm_layers::body::LayerBody<axum::body::Body>>| async {
                    Ok::<_, std::convert::Infallible>(
                        http::Response::builder()
                            .status(503)
                            .body(axum::body::Body::empty())
                            .unwrap(),
                    )
                },
            ));
        for _ in 0..3 {
            let req = http::Request::post("/v1/chat/completions")
                .header("content-type", "application/json")
                .body(axum::body::Body::from(
                    r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
                ))
                .unwrap();
            let _ = svc.clone().oneshot(req).await;
        }
        let report = mirror.report();
        assert_eq!(report.transitions.len(), 1, "{report:?}");
        assert_eq!(report.violation_count, 1, "{report:?}");
        assert!(
            report.violations[0].contains("2 failures in 2 answered calls"),
            "{report:?}"
        );
    });
}

/// The answer checks refuse what an SDK cannot use.
#[test]
fn control_the_answer_checks_refuse_broken_envelopes() {
    let spec = Spec {
        method: Method::POST,
        path: "/v1/chat/completions",
        key: Some(KEY_A),
        model: "gpt-4o".into(),
        stream: false,
        max_tokens: 1,
        client: client_in(0, &mut fastrand::Rng::with_seed(1)),
        hold: false,
    };
    let got = |status: u16, headers: &[(&'static str, &str)], body: &str| {
        let mut map = http::HeaderMap::new();
        map.insert("content-type", "application/json".parse().unwrap());
        for (k, v) in headers {
            map.insert(*k, v.parse().unwrap());
        }
        Got {
            status: StatusCode::from_u16(status).unwrap(),
            headers: map,
            api_error: None,
            body: bytes::Bytes::from(body.to_owned()),
            body_error: false,
        }
    };
    let env = |code: &str| {
        format!(
            r#"{{"error":{{"message":"m","type":"server_error","code":"{code}","param":null}}}}"#
        )
    };
    // A good one passes.
    assert_eq!(
        check(
            &spec,
            &got(
                503,
                &[("x-should-retry", "true")],
                &env("service_unavailable")
            )
        ),
        Ok("503 service_unavailable".into())
    );
    let bad = [
        got(503, &[], &env("service_unavailable")),
        got(400, &[("x-should-retry", "true")], &env("invalid_value")),
        got(
            429,
            &[("x-should-retry", "true")],
            &env("service_unavailable"),
        ),
        got(503, &[("x-should-retry", "true")], &env("no_such_code")),
        got(503, &[("x-should-retry", "true")], "<html>busy</html>"),
        got(
            429,
            &[
                ("x-should-retry", "false"),
                ("retry-after", "42"),
                ("retry-after-ms", "42000"),
            ],
            &env("rate_limit_exceeded"),
        ),
        got(
            429,
            &[
                ("x-should-retry", "true"),
                ("retry-after", "2"),
                ("retry-after-ms", "9000"),
            ],
            &env("rate_limit_exceeded"),
        ),
        got(200, &[], "{\"choices\":"),
    ];
    for b in &bad {
        assert!(check(&spec, b).is_err(), "{:?} {:?}", b.status, b.body);
    }
    // A deadline overrun and a HEAD that fails on a healthy upstream are owed violations.
    let ok = got(200, &[], "{}");
    assert!(owed(
        &spec,
        &ok,
        DEADLINE + Duration::from_secs(1),
        Duration::ZERO
    )
    .is_err());
    let head = Spec {
        method: Method::HEAD,
        path: "/v1/models",
        ..spec.clone()
    };
    assert!(owed(&head, &got(503, &[], ""), Duration::ZERO, Duration::ZERO).is_err());
}

/// The end-of-run concurrency check fails when a client asks for more than its share.
#[test]
fn control_the_concurrency_check_sees_a_refusal() {
    let _serial = serial();
    paused().block_on(async {
        let gw = gateway(
            1,
            Faults::new(1, Health::Mixed, true),
            BucketKey::client_ip().trusted_proxies(["10.0.0.0/8"]),
            16,
        );
        assert!(admits_at_once(&gw, &[1], PER_CLIENT_CONCURRENCY)
            .await
            .is_ok());
        let err = admits_at_once(&gw, &[1], PER_CLIENT_CONCURRENCY + 1)
            .await
            .unwrap_err();
        assert!(err.contains("ConcurrentLimitExceeded"), "{err}");
    });
}
