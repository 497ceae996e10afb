//! The rate limit layer's admitted path against tower_governor 0.8 on the same keyed workload,
//! single-key contention across threads, and the memory held by one million keys.
//!
//! Both layers key by client IP over 10 000 addresses with quotas that never refuse, and both
//! add rate-limit headers (`use_headers()` for tower_governor). The inner service answers at
//! once; the bare inner service is the baseline. No tokio runtime is entered: with tokio's
//! `test-util` feature (on for dev builds) every `Instant::now()` inside a runtime locks the
//! test clock, a cost production builds do not have.

#[cfg(feature = "rate-limit")]
mod imp {
    use std::convert::Infallible;
    use std::future::{ready, Ready};
    use std::hint::black_box;
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::time::{Duration, Instant};

    use axum::body::Body;
    use criterion::{criterion_group, Criterion};
    use futures_util::FutureExt;
    use http::{Request, Response};
    use llm_layers::body::LayerBody;
    use llm_layers::rate_limit::{BucketKey, Limits, Quota, RateLimitLayer};
    use tower::{Layer, Service, ServiceExt};
    use tower_governor::governor::GovernorConfigBuilder;
    use tower_governor::key_extractor::KeyExtractor;
    use tower_governor::{GovernorError, GovernorLayer};

    const KEYS: u32 = 10_000;

    type Bare<B = Body> =
        tower::util::ServiceFn<fn(Request<B>) -> Ready<Result<Response<Body>, Infallible>>>;

    /// The inner service: answers at once, whatever the request body type.
    fn bare<B>() -> Bare<B> {
        fn ok<B>(_req: Request<B>) -> Ready<Result<Response<Body>, Infallible>> {
            ready(Ok(Response::new(Body::empty())))
        }
        tower::service_fn(ok::<B> as fn(_) -> _)
    }

    /// The inner service behind our layer, which hands it `Request<LayerBody<Body>>`.
    fn bare_inner() -> Bare<LayerBody<Body>> {
        bare()
    }

    fn request(i: u32) -> Request<Body> {
        let mut req = Request::new(Body::empty());
        let ip = Ipv4Addr::from(0x0a00_0000 | i);
        req.extensions_mut()
            .insert(SocketAddr::new(IpAddr::V4(ip), 40000));
        req
    }

    #[derive(Clone)]
    struct SocketIp;

    impl KeyExtractor for SocketIp {
        type Key = IpAddr;
        fn extract<T>(&self, req: &Request<T>) -> Result<IpAddr, GovernorError> {
            req.extensions()
                .get::<SocketAddr>()
                .map(|a| a.ip())
                .ok_or(GovernorError::UnableToExtractKey)
        }
    }

    fn ours() -> RateLimitLayer {
        RateLimitLayer::builder()
            .key_by(BucketKey::client_ip())
            .limits(Limits::new().requests(Quota::per_second(100_000_000).burst(1_000_000)))
            .build()
            .unwrap()
    }

    fn theirs() -> GovernorLayer<SocketIp, governor::middleware::StateInformationMiddleware, Body> {
        let config = GovernorConfigBuilder::default()
            .per_nanosecond(10)
            .burst_size(1_000_000)
            .key_extractor(SocketIp)
            .use_headers()
            .finish()
            .unwrap();
        GovernorLayer::new(config)
    }

    fn call<S>(svc: &mut S, req: Request<Body>)
    where
        S: Service<Request<Body>, Response = Response<Body>>,
        S::Error: std::fmt::Debug,
    {
        let svc = svc.ready().now_or_never().unwrap().unwrap();
        let res = svc.call(req).now_or_never().unwrap().unwrap();
        black_box(res);
    }

    fn call_ours<S, B>(svc: &mut S, req: Request<Body>)
    where
        S: Service<Request<Body>, Response = Response<B>>,
        S::Error: std::fmt::Debug,
    {
        let svc = svc.ready().now_or_never().unwrap().unwrap();
        let res = svc.call(req).now_or_never().unwrap().unwrap();
        black_box(res);
    }

    fn keyed(c: &mut Criterion) {
        let mut g = c.benchmark_group("keyed_admitted");
        g.warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(2));
        let mut i = 0u32;
        let mut next = move || {
            i = (i + 1) % KEYS;
            i
        };
        let mut svc = bare();
        g.bench_function("bare", |b| b.iter(|| call(&mut svc, request(next()))));
        let mut svc = ours().layer(bare_inner());
        g.bench_function("llm_layers", |b| {
            b.iter(|| call_ours(&mut svc, request(next())))
        });
        let mut svc = theirs().layer(bare());
        g.bench_function("tower_governor", |b| {
            b.iter(|| call(&mut svc, request(next())))
        });
        g.finish();
    }

    fn contention(c: &mut Criterion) {
        let mut g = c.benchmark_group("single_key_4_threads");
        g.warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(2));
        const THREADS: u64 = 4;
        fn run<S, B>(svc: S, iters: u64) -> Duration
        where
            S: Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
            S::Error: std::fmt::Debug,
        {
            let start = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..THREADS {
                    let mut svc = svc.clone();
                    s.spawn(move || {
                        for _ in 0..iters.div_ceil(THREADS) {
                            call_ours(&mut svc, request(7));
                        }
                    });
                }
            });
            start.elapsed()
        }
        let svc = ours().layer(bare_inner());
        g.bench_function("llm_layers", |b| b.iter_custom(|n| run(svc.clone(), n)));
        let svc = theirs().layer(bare());
        g.bench_function("tower_governor", |b| b.iter_custom(|n| run(svc.clone(), n)));
        g.finish();
    }

    fn rss_mib() -> f64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
        let pages: f64 = statm
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0.0);
        pages * 4096.0 / (1024.0 * 1024.0)
    }

    /// One million distinct client addresses, then a sweep once their buckets are full again.
    fn memory() {
        const N: u32 = 1_000_000;
        let layer = RateLimitLayer::builder()
            .key_by(BucketKey::client_ip())
            // A key's bucket is full again 2 s after its request and forgotten one cell (2 s)
            // later: all million are live while they are inserted, so eviction on insertion
            // keeps them all.
            .limits(Limits::new().requests(Quota::new(1, Duration::from_secs(2)).burst(10)))
            // Only the explicit sweep below.
            .sweep(u64::MAX, Duration::from_secs(3600))
            .build()
            .unwrap();
        let handle = layer.handle();
        let mut svc = layer.layer(bare_inner());
        let baseline = rss_mib();
        for i in 0..N {
            call_ours(&mut svc, request(i));
        }
        let full = rss_mib();
        let tracked = handle.tracked_keys();
        // Every bucket is full again, and a cell's time past it, after 4 s.
        std::thread::sleep(Duration::from_millis(4100));
        handle.sweep();
        let swept = rss_mib();
        println!(
        "memory: baseline {baseline:.1} MiB; {tracked} keys tracked: {full:.1} MiB (+{:.1} MiB); \
         after sweep: {} keys, {swept:.1} MiB (+{:.1} MiB)",
        full - baseline,
        handle.tracked_keys(),
        swept - baseline
    );

        // tower_governor's DashMap store, for comparison.
        let layer = theirs();
        let mut svc = layer.layer(bare());
        let baseline = rss_mib();
        for i in 0..N {
            call(&mut svc, request(i));
        }
        println!(
            "memory: tower_governor with {N} keys: +{:.1} MiB",
            rss_mib() - baseline
        );
    }

    /// Criterion runs one function after the other; on a shared machine the load drifts between
    /// them. This alternates short batches of the three services and compares medians.
    fn paired() {
        const ROUNDS: usize = 31;
        const BATCH: u32 = 20_000;
        let mut ours_svc = ours().layer(bare_inner());
        let mut theirs_svc = theirs().layer(bare());
        let mut bare_svc = bare();
        let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
        let per_call = |d: Duration| d.as_nanos() as f64 / f64::from(BATCH);
        for _ in 0..ROUNDS {
            let t = Instant::now();
            for i in 0..BATCH {
                call(&mut bare_svc, request(i % KEYS));
            }
            c.push(per_call(t.elapsed()));
            let t = Instant::now();
            for i in 0..BATCH {
                call_ours(&mut ours_svc, request(i % KEYS));
            }
            a.push(per_call(t.elapsed()));
            let t = Instant::now();
            for i in 0..BATCH {
                call(&mut theirs_svc, request(i % KEYS));
            }
            b.push(per_call(t.elapsed()));
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (a, b, c) = (median(&mut a), median(&mut b), median(&mut c));
        println!(
        "paired medians per call: bare {c:.0} ns, llm_layers {a:.0} ns, tower_governor {b:.0} ns; \
         llm_layers/tower_governor {:.2} (whole call), {:.2} (overhead over bare)",
        a / b,
        (a - c) / (b - c)
    );
    }

    criterion_group!(benches, keyed, contention);

    pub fn main() {
        if std::env::var_os("SKIP_MEMORY").is_none() {
            memory();
        }
        paired();
        benches();
        Criterion::default().configure_from_args().final_summary();
    }
}

fn main() {
    #[cfg(feature = "rate-limit")]
    imp::main();
}
