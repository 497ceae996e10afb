//! The retry layer's cost on the path that matters: the first attempt succeeds.
//!
//! Compared in the same run against the bare inner service: a small chat request with
//! realistic headers (layer with the default budget, without it, with the headers off), and
//! the buffering cost for a 16 KiB body in one chunk (zero-copy) and in 16 chunks of 1 KiB
//! (copied once into one buffer).
//!
//! First, before criterion's own groups, the success-path cases run interleaved and their
//! medians are printed as differences from, and ratios to, the bare service and the floor
//! for a layer that may replay (the bare service after one clone of the request head).
//!
//! Every future here is ready on its first poll, so it is polled once with `now_or_never`
//! inside a runtime context, and the figures are the layer's own work.

use std::convert::Infallible;
use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use futures_util::FutureExt;
use http::{Request, Response};
use http_body_util::Full;
use llm_layers::body::LayerBody;
use llm_layers::ext::Attempts;
use llm_layers::retry::RetryLayer;
use tower::{Layer, Service};

type StreamedBody = axum::body::Body;

type Answer = std::future::Ready<Result<Response<Full<Bytes>>, Infallible>>;

/// The inner service: answers at once with a `content-type`, as an upstream does (so the
/// layer's `x-attempts` goes into a header map that already has room, as it does in use).
fn bare<B: 'static>(
) -> impl Service<Request<B>, Response = Response<Full<Bytes>>, Error = Infallible, Future = Answer>
       + Clone {
    tower::service_fn(|_req: Request<B>| {
        let mut res = Response::new(Full::default());
        res.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        std::future::ready(Ok(res))
    })
}

/// `BENCH_ONE_CASE=<index>:<calls>`: run only that case of the interleaved group, that many
/// calls (in the group's batches), and exit. Under `valgrind --tool=cachegrind`, a run with `<calls>` minus a run with 0
/// gives the case's instructions per call, a figure the machine's load does not move.
fn one_case() -> Option<(usize, usize)> {
    let v = std::env::var("BENCH_ONE_CASE").ok()?;
    let (case, calls) = v.split_once(':')?;
    Some((case.parse().ok()?, calls.parse().ok()?))
}

/// Runs every case `rounds` times, interleaved (each round runs them all, `batch` calls each,
/// requests made outside the timing), and prints each case's median per call with its
/// difference from, and ratio to, the first two cases: on a loaded machine the cases see the
/// same load, so the differences hold where absolute figures drift.
fn interleaved(
    title: &str,
    rounds: usize,
    batch: usize,
    cases: &mut [(&str, &mut dyn FnMut(usize) -> Duration)],
) {
    if let Some((case, calls)) = one_case() {
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
        "{:<44} {:>9} {:>12} {:>8} {:>12} {:>8}",
        "case", "ns/call", "- case 1", "/ case 1", "- case 2", "/ case 2"
    );
    for (i, (name, _)) in cases.iter().enumerate() {
        let m = medians[i];
        println!(
            "{:<44} {:>9.1} {:>+12.1} {:>8.2} {:>+12.1} {:>8.2}",
            name,
            m,
            m - medians[0],
            m / medians[0],
            m - medians[1],
            m / medians[1]
        );
    }
}

/// Times `batch` calls of `svc`, each with a request from `make` made beforehand, answers
/// dropped after the timing.
fn timed<S, B>(svc: &mut S, make: &dyn Fn() -> Request<B>, batch: usize) -> Duration
where
    S: Service<Request<B>>,
    S::Error: std::fmt::Debug,
{
    let reqs: Vec<_> = (0..batch).map(|_| make()).collect();
    let mut out = Vec::with_capacity(batch);
    let start = Instant::now();
    for req in reqs {
        out.push(once(svc, req));
    }
    let took = start.elapsed();
    drop(black_box(out));
    took
}

/// [`timed`] for the floor: the bare service, after one clone of the request head; with
/// `attempts`, also the [`Attempts`] value the layer leaves on every response.
fn timed_head_clone<S, B, R>(
    svc: &mut S,
    make: &dyn Fn() -> Request<B>,
    batch: usize,
    attempts: bool,
) -> Duration
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Error: std::fmt::Debug,
{
    let reqs: Vec<_> = (0..batch).map(|_| make()).collect();
    let mut out = Vec::with_capacity(batch);
    let start = Instant::now();
    for req in reqs {
        let (parts, body) = req.into_parts();
        let copy = parts.clone();
        drop(black_box(parts));
        let mut res = once(svc, Request::from_parts(copy, body));
        if attempts {
            res.extensions_mut().insert(Attempts(1));
        }
        out.push(res);
    }
    let took = start.elapsed();
    drop(black_box(out));
    took
}

fn ready<S: Service<R>, R>(svc: &mut S) {
    let waker = futures_util::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    assert!(svc.poll_ready(&mut cx).is_ready());
}

fn once<S, B>(svc: &mut S, req: Request<B>) -> S::Response
where
    S: Service<Request<B>>,
    S::Error: std::fmt::Debug,
{
    ready(svc);
    svc.call(req)
        .now_or_never()
        .expect("ready at once")
        .expect("a response")
}

const CHAT: &[u8] = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in one word."}],"max_tokens":5}"#;

fn chat() -> Request<Full<Bytes>> {
    Request::post("http://api.example/v1/chat/completions")
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-bench")
        .header("content-length", CHAT.len())
        .body(Full::new(Bytes::from_static(CHAT)))
        .unwrap()
}

fn big_one_chunk(data: &Bytes) -> Request<Full<Bytes>> {
    Request::post("http://api.example/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Full::new(data.clone()))
        .unwrap()
}

// axum's `Body` over a stream of 16 chunks of 1 KiB, with no length announced.
fn big_chunked(data: &Bytes) -> Request<StreamedBody> {
    let chunks: Vec<Result<Bytes, Infallible>> = (0..16)
        .map(|i| Ok(data.slice(i * 1024..(i + 1) * 1024)))
        .collect();
    let body = StreamedBody::from_stream(futures_util::stream::iter(chunks));
    Request::post("http://api.example/v1/chat/completions")
        .header("content-type", "application/json")
        .body(body)
        .unwrap()
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();

    let default_layer = RetryLayer::new();
    let no_budget = RetryLayer::builder().no_budget().build().unwrap();
    let quiet = RetryLayer::builder()
        .no_budget()
        .attempts_header(false)
        .build()
        .unwrap();

    {
        let mut svc = default_layer.layer(bare::<LayerBody<Full<Bytes>>>());
        ready(&mut svc);
        let fut = svc.call(chat());
        println!(
            "size of the retry ResponseFuture over a ready service: {} bytes",
            std::mem::size_of_val(&fut)
        );
    }

    {
        let mut bare_svc = bare::<Full<Bytes>>();
        let mut floor_svc = bare::<Full<Bytes>>();
        let mut floor2_svc = bare::<Full<Bytes>>();
        let mut single_svc = RetryLayer::builder()
            .max_attempts(1)
            .no_budget()
            .build()
            .unwrap()
            .layer(bare::<LayerBody<Full<Bytes>>>());
        let mut default_svc = default_layer.layer(bare::<LayerBody<Full<Bytes>>>());
        let mut quiet_svc = quiet.layer(bare::<LayerBody<Full<Bytes>>>());
        let mut no_budget_svc = no_budget.layer(bare::<LayerBody<Full<Bytes>>>());
        interleaved(
            "retry/success, a chat POST",
            301,
            200,
            &mut [
                ("bare", &mut |n| timed(&mut bare_svc, &chat, n)),
                ("bare + one clone of the request head", &mut |n| {
                    timed_head_clone(&mut floor_svc, &chat, n, false)
                }),
                ("bare + head clone + the Attempts value", &mut |n| {
                    timed_head_clone(&mut floor2_svc, &chat, n, true)
                }),
                ("retry (max_attempts 1: no replay copy)", &mut |n| {
                    timed(&mut single_svc, &chat, n)
                }),
                ("retry (default: budget, headers)", &mut |n| {
                    timed(&mut default_svc, &chat, n)
                }),
                ("retry (no budget)", &mut |n| {
                    timed(&mut no_budget_svc, &chat, n)
                }),
                ("retry (no budget, no headers)", &mut |n| {
                    timed(&mut quiet_svc, &chat, n)
                }),
            ],
        );
    }

    let mut g = c.benchmark_group("retry/success");
    g.warm_up_time(std::time::Duration::from_secs(1));
    g.measurement_time(std::time::Duration::from_secs(2));
    let mut svc = bare::<Full<Bytes>>();
    g.bench_function("bare", |b| {
        b.iter_batched(
            chat,
            |req| black_box(once(&mut svc, req)),
            BatchSize::SmallInput,
        )
    });
    let mut svc = bare::<Full<Bytes>>();
    g.bench_function("bare + one clone of the request head", |b| {
        b.iter_batched(
            chat,
            |req| {
                let (parts, body) = req.into_parts();
                let copy = parts.clone();
                drop(black_box(parts));
                black_box(once(&mut svc, Request::from_parts(copy, body)))
            },
            BatchSize::SmallInput,
        )
    });
    let single = RetryLayer::builder()
        .max_attempts(1)
        .no_budget()
        .build()
        .unwrap();
    let mut svc = single.layer(bare::<LayerBody<Full<Bytes>>>());
    g.bench_function("retry (max_attempts 1: no replay copy)", |b| {
        b.iter_batched(
            chat,
            |req| black_box(once(&mut svc, req)),
            BatchSize::SmallInput,
        )
    });
    let mut svc = default_layer.layer(bare::<LayerBody<Full<Bytes>>>());
    g.bench_function("retry (default budget)", |b| {
        b.iter_batched(
            chat,
            |req| black_box(once(&mut svc, req)),
            BatchSize::SmallInput,
        )
    });
    let mut svc = no_budget.layer(bare::<LayerBody<Full<Bytes>>>());
    g.bench_function("retry (no budget)", |b| {
        b.iter_batched(
            chat,
            |req| black_box(once(&mut svc, req)),
            BatchSize::SmallInput,
        )
    });
    let mut svc = quiet.layer(bare::<LayerBody<Full<Bytes>>>());
    g.bench_function("retry (no budget, no headers)", |b| {
        b.iter_batched(
            chat,
            |req| black_box(once(&mut svc, req)),
            BatchSize::SmallInput,
        )
    });
    g.finish();

    let data = Bytes::from(vec![b'x'; 16 * 1024]);
    let mut g = c.benchmark_group("retry/16KiB");
    g.warm_up_time(std::time::Duration::from_secs(1));
    g.measurement_time(std::time::Duration::from_secs(2));
    let mut svc = bare::<Full<Bytes>>();
    g.bench_function("bare, one chunk", |b| {
        b.iter_batched(
            || big_one_chunk(&data),
            |req| black_box(once(&mut svc, req)),
            BatchSize::SmallInput,
        )
    });
    let mut svc = default_layer.layer(bare::<LayerBody<Full<Bytes>>>());
    g.bench_function("retry, one chunk", |b| {
        b.iter_batched(
            || big_one_chunk(&data),
            |req| black_box(once(&mut svc, req)),
            BatchSize::SmallInput,
        )
    });
    let mut svc = bare::<StreamedBody>();
    g.bench_function("bare, 16 chunks", |b| {
        b.iter_batched(
            || big_chunked(&data),
            |req| black_box(once(&mut svc, req)),
            BatchSize::SmallInput,
        )
    });
    let mut svc = default_layer.layer(bare::<LayerBody<StreamedBody>>());
    g.bench_function("retry, 16 chunks", |b| {
        b.iter_batched(
            || big_chunked(&data),
            |req| black_box(once(&mut svc, req)),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(retry, benches);
criterion_main!(retry);
