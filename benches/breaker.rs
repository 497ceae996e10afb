//! The breaker's cost: the closed-state path against the bare service (plain, timing calls
//! for the slow-call rule, with the breaker's own call timeout), the open-state
//! rejection (including building the envelope), and tower-resilience-circuitbreaker 0.14 doing
//! the same in the same run.
//!
//! First, before criterion's own groups, the closed-path cases run interleaved and their
//! medians are printed as differences from, and ratios to, the bare service.
//!
//! Last, the status snapshot ([`BreakerHandle::snapshot`](llm_layers::breaker::BreakerHandle::snapshot))
//! of 10 000 circuits against the metrics of one, printed per circuit.
//!
//! Every future here is ready on its first poll, so they are polled once with `now_or_never`
//! (inside a tokio runtime context) and the figures are the layers' own work.

use std::convert::Infallible;
use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use futures_util::FutureExt;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use llm_layers::body::LayerBody;
use llm_layers::breaker::{CircuitBreakerLayer, CircuitKey, CircuitMode};
use tower::{Layer, Service};

type Body = Full<Bytes>;

/// A service that answers at once, for any request body (the breaker hands on a
/// `LayerBody<Body>`).
fn bare<B>() -> impl Service<
    Request<B>,
    Response = Response<Body>,
    Error = Infallible,
    Future = std::future::Ready<Result<Response<Body>, Infallible>>,
> + Clone {
    tower::service_fn(|_req: Request<B>| std::future::ready(Ok(Response::new(Body::default()))))
}

fn failing<B>() -> impl Service<
    Request<B>,
    Response = Response<Body>,
    Error = std::io::Error,
    Future = std::future::Ready<Result<Response<Body>, std::io::Error>>,
> + Clone {
    tower::service_fn(|_req: Request<B>| std::future::ready(Err(std::io::Error::other("down"))))
}

fn ready<S: Service<R>, R>(svc: &mut S) {
    let waker = futures_util::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    assert!(svc.poll_ready(&mut cx).is_ready());
}

fn once<S>(svc: &mut S) -> S::Response
where
    S: Service<Request<Body>>,
    S::Error: std::fmt::Debug,
{
    ready(svc);
    svc.call(Request::new(Body::default()))
        .now_or_never()
        .expect("ready at once")
        .expect("a response")
}

/// `BENCH_ONE_CASE=<index>:<calls>`: run only that case of the interleaved group, that many
/// calls (in the group's batches), and exit. Under `valgrind --tool=cachegrind`, a run with `<calls>` minus a run with 0
/// gives the case's instructions per call, a figure the machine's load does not move.
/// `BENCH_GROUP=<title>` picks a group other than the first.
fn one_case() -> Option<(usize, usize)> {
    let v = std::env::var("BENCH_ONE_CASE").ok()?;
    let (case, calls) = v.split_once(':')?;
    Some((case.parse().ok()?, calls.parse().ok()?))
}

/// Runs every case `rounds` times, interleaved (each round runs them all, `batch` calls
/// each), and prints each case's median per call with its difference from, and ratio to, the
/// first case: on a loaded machine the cases see the same load, so the differences hold
/// where absolute figures drift.
fn interleaved(
    title: &str,
    rounds: usize,
    batch: usize,
    cases: &mut [(&str, &mut dyn FnMut(usize) -> Duration)],
) {
    if let Some((case, calls)) = one_case() {
        if std::env::var("BENCH_GROUP").is_ok_and(|g| g != title) {
            return;
        }
        // Counting mode: one case, `calls` calls in batches as the timing makes them, then
        // exit (for instruction counts and profiles).
        let mut took = Duration::ZERO;
        let mut left = calls;
        while left > 0 {
            let n = left.min(batch);
            took += (cases[case].1)(n);
            left -= n;
        }
        println!("{}: {calls} calls in {took:?}", cases[case].0);
        std::process::exit(0);
    }
    let mut samples: Vec<Vec<f64>> = vec![Vec::with_capacity(rounds); cases.len()];
    for _ in 0..rounds {
        for (i, (_, run)) in cases.iter_mut().enumerate() {
            samples[i].push(run(batch).as_nanos() as f64 / batch as f64);
        }
    }
    let medians: Vec<f64> = samples
        .iter_mut()
        .map(|s| {
            s.sort_by(f64::total_cmp);
            s[s.len() / 2]
        })
        .collect();
    println!("\n{title}: medians of {rounds} interleaved rounds of {batch} calls");
    println!(
        "{:<44} {:>9} {:>12} {:>8}",
        "case", "ns/call", "- case 1", "/ case 1"
    );
    for (i, (name, _)) in cases.iter().enumerate() {
        let m = medians[i];
        println!(
            "{:<44} {:>9.1} {:>+12.1} {:>8.2}",
            name,
            m,
            m - medians[0],
            m / medians[0]
        );
    }
}

/// A service that answers at once with a two-byte body, as an upstream answers with JSON.
fn with_body<B>() -> impl Service<
    Request<B>,
    Response = Response<Body>,
    Error = Infallible,
    Future = std::future::Ready<Result<Response<Body>, Infallible>>,
> + Clone {
    tower::service_fn(|_req: Request<B>| {
        std::future::ready(Ok(Response::new(Body::new(Bytes::from_static(b"{}")))))
    })
}

/// Times `batch` calls of `svc`, each answer's body read to its end (where the breaker
/// records a success whose head came first).
fn timed_read<S, R>(svc: &mut S, batch: usize) -> Duration
where
    S: Service<Request<Body>, Response = Response<R>>,
    S::Error: std::fmt::Debug,
    R: http_body::Body + Unpin,
    R::Error: std::fmt::Debug,
{
    use http_body_util::BodyExt;
    let start = std::time::Instant::now();
    for _ in 0..batch {
        let mut body = once(svc).into_body();
        while let Some(frame) = body.frame().now_or_never().expect("ready at once") {
            black_box(frame.expect("a frame"));
        }
    }
    start.elapsed()
}

/// Times `batch` calls of `svc`, answers dropped after the timing.
fn timed<S>(svc: &mut S, batch: usize) -> Duration
where
    S: Service<Request<Body>>,
    S::Error: std::fmt::Debug,
{
    let mut out = Vec::with_capacity(batch);
    let start = std::time::Instant::now();
    for _ in 0..batch {
        out.push(once(svc));
    }
    let took = start.elapsed();
    drop(black_box(out));
    took
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();

    {
        let mut bare_svc = bare::<Body>();
        let mut ours = CircuitBreakerLayer::builder()
            .build()
            .unwrap()
            .layer(bare());
        let mut slow = CircuitBreakerLayer::builder()
            .slow_calls(Duration::from_secs(10), 50.0)
            .build()
            .unwrap()
            .layer(bare());
        let mut timeout = CircuitBreakerLayer::builder()
            .call_timeout(Duration::from_secs(60))
            .build()
            .unwrap()
            .layer(bare());
        let mut theirs = tower_resilience_circuitbreaker::CircuitBreakerLayer::builder()
            .failure_rate_threshold(0.5)
            .sliding_window_size(100)
            .build()
            .unwrap()
            .layer(bare());
        interleaved(
            "closed",
            301,
            200,
            &mut [
                ("bare service", &mut |n| timed(&mut bare_svc, n)),
                ("llm-layers breaker", &mut |n| timed(&mut ours, n)),
                ("llm-layers breaker + slow-call timing", &mut |n| {
                    timed(&mut slow, n)
                }),
                ("llm-layers breaker + call timeout", &mut |n| {
                    timed(&mut timeout, n)
                }),
                ("tower-resilience breaker", &mut |n| timed(&mut theirs, n)),
            ],
        );
    }

    {
        let mut bare_svc = with_body::<Body>();
        let mut ours = CircuitBreakerLayer::builder()
            .build()
            .unwrap()
            .layer(with_body());
        let mut slow = CircuitBreakerLayer::builder()
            .slow_calls(Duration::from_secs(10), 50.0)
            .build()
            .unwrap()
            .layer(with_body());
        let mut timeout = CircuitBreakerLayer::builder()
            .call_timeout(Duration::from_secs(60))
            .build()
            .unwrap()
            .layer(with_body());
        interleaved(
            "closed, a body read to its end",
            301,
            200,
            &mut [
                ("bare service", &mut |n| timed_read(&mut bare_svc, n)),
                ("llm-layers breaker", &mut |n| timed_read(&mut ours, n)),
                ("llm-layers breaker + slow-call timing", &mut |n| {
                    timed_read(&mut slow, n)
                }),
                ("llm-layers breaker + call timeout", &mut |n| {
                    timed_read(&mut timeout, n)
                }),
            ],
        );
    }

    let mut g = c.benchmark_group("closed");
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(2));
    let mut svc = bare::<Body>();
    g.bench_function("bare service", |b| b.iter(|| black_box(once(&mut svc))));

    let layer = CircuitBreakerLayer::builder().build().unwrap();
    let mut svc = layer.layer(bare());
    {
        ready(&mut svc);
        let fut = svc.call(Request::new(Body::default()));
        println!(
            "size of the breaker ResponseFuture over a ready service: {} bytes",
            std::mem::size_of_val(&fut)
        );
    }
    g.bench_function("llm-layers breaker", |b| {
        b.iter(|| black_box(once(&mut svc)))
    });

    let layer = CircuitBreakerLayer::builder()
        .slow_calls(Duration::from_secs(10), 50.0)
        .build()
        .unwrap();
    let mut svc = layer.layer(bare());
    g.bench_function("llm-layers breaker + slow-call timing", |b| {
        b.iter(|| black_box(once(&mut svc)))
    });

    let layer = CircuitBreakerLayer::builder()
        .call_timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let mut svc = layer.layer(bare());
    g.bench_function("llm-layers breaker + call timeout", |b| {
        b.iter(|| black_box(once(&mut svc)))
    });

    let theirs = tower_resilience_circuitbreaker::CircuitBreakerLayer::builder()
        .failure_rate_threshold(0.5)
        .sliding_window_size(100)
        .build()
        .unwrap();
    let mut svc = theirs.layer(bare());
    g.bench_function("tower-resilience breaker", |b| {
        b.iter(|| black_box(once(&mut svc)))
    });
    g.finish();

    let mut g = c.benchmark_group("open");
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(2));
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .open_duration(Duration::from_secs(3600))
        .open_backoff(1.0, Duration::from_secs(3600))
        .build()
        .unwrap();
    let mut svc = layer.layer(bare());
    // Open it through a failing twin sharing the same circuits.
    let mut trip = layer.layer(tower::service_fn(|_req: Request<LayerBody<Body>>| {
        let mut res = Response::new(Body::default());
        *res.status_mut() = StatusCode::BAD_GATEWAY;
        std::future::ready(Ok::<_, Infallible>(res))
    }));
    once(&mut trip);
    assert_eq!(once(&mut svc).status(), StatusCode::SERVICE_UNAVAILABLE);
    g.bench_function("llm-layers rejection with envelope", |b| {
        b.iter(|| black_box(once(&mut svc)))
    });

    layer.handle().set_mode(CircuitMode::ForcedOpen);
    g.bench_function("llm-layers forced-open rejection with envelope", |b| {
        b.iter(|| black_box(once(&mut svc)))
    });

    let (theirs, handle) = tower_resilience_circuitbreaker::CircuitBreakerLayer::builder()
        .failure_rate_threshold(0.5)
        .sliding_window_size(10)
        .minimum_number_of_calls(1)
        .wait_duration_in_open(Duration::from_secs(3600))
        .build_with_handle()
        .unwrap();
    let mut svc = theirs.layer(failing());
    rt.block_on(handle.force_open());
    g.bench_function("tower-resilience rejection (error value)", |b| {
        b.iter(|| {
            ready(&mut svc);
            black_box(
                svc.call(Request::new(Body::default()))
                    .now_or_never()
                    .expect("ready at once")
                    .is_err(),
            )
        })
    });
    g.finish();

    // The status snapshot: 10 000 model circuits, each with calls in its window.
    const CIRCUITS: usize = 10_000;
    let layer = CircuitBreakerLayer::builder()
        .key_by(CircuitKey::Model)
        .max_keys(CIRCUITS)
        .count_window(100)
        .build()
        .unwrap();
    let handle = layer.handle();
    let keys: Vec<String> = (0..CIRCUITS).map(|i| format!("model-{i:05}")).collect();
    for k in &keys {
        handle.set_mode_for(k, CircuitMode::Auto);
    }
    assert_eq!(handle.snapshot().circuits.len(), CIRCUITS);
    let median = |runs: usize, f: &mut dyn FnMut()| {
        let mut t: Vec<f64> = (0..runs)
            .map(|_| {
                let start = std::time::Instant::now();
                f();
                start.elapsed().as_nanos() as f64
            })
            .collect();
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    };
    let all = median(51, &mut || {
        black_box(handle.snapshot());
    });
    let one = median(10_001, &mut || {
        black_box(handle.metrics("model-05000"));
    });
    println!(
        "\nsnapshot of {CIRCUITS} circuits: median {:.2} ms, {:.0} ns per circuit; metrics of one circuit by key: {:.0} ns ({:.2}x per circuit)",
        all / 1e6,
        all / CIRCUITS as f64,
        one,
        all / CIRCUITS as f64 / one
    );
    let mut g = c.benchmark_group("snapshot");
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(3));
    g.sample_size(20);
    g.bench_function("snapshot of 10 000 circuits", |b| {
        b.iter(|| black_box(handle.snapshot()))
    });
    g.bench_function("metrics of one circuit", |b| {
        b.iter(|| black_box(handle.metrics("model-05000")))
    });
    g.finish();
}

criterion_group!(breaker, benches);
criterion_main!(breaker);
