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

    /// 10 000 API keys, each with its identity in the request (as an authentication layer in
    /// front leaves it), built once and cloned into each request.
    fn identities() -> Vec<llm_layers::ext::KeyIdentity> {
        (0..KEYS)
            .map(|i| llm_layers::ext::KeyIdentity::new(format!("key-{i:05}")))
            .collect()
    }

    fn key_request(ident: &llm_layers::ext::KeyIdentity) -> Request<Body> {
        let mut req = Request::new(Body::empty());
        req.extensions_mut().insert(ident.clone());
        req
    }

    #[derive(Clone)]
    struct ApiKeyId;

    impl KeyExtractor for ApiKeyId {
        type Key = std::sync::Arc<str>;
        fn extract<T>(&self, req: &Request<T>) -> Result<Self::Key, GovernorError> {
            req.extensions()
                .get::<llm_layers::ext::KeyIdentity>()
                .map(|k| k.id_arc().clone())
                .ok_or(GovernorError::UnableToExtractKey)
        }
    }

    /// Keyed by API key, 100 requests a second each (burst 1 000 000): a key's bucket is not
    /// full again between two of its requests, so every request finds its key known.
    fn ours_by_key() -> RateLimitLayer {
        ours_by_key_every(Duration::from_millis(10))
    }

    /// Keyed by API key, one cell each `period` (burst 1 000 000).
    fn ours_by_key_every(period: Duration) -> RateLimitLayer {
        RateLimitLayer::builder()
            .key_by(BucketKey::api_key())
            .limits(Limits::new().requests(Quota::new(1, period).burst(1_000_000)))
            .build()
            .unwrap()
    }

    fn theirs_by_key(
    ) -> GovernorLayer<ApiKeyId, governor::middleware::StateInformationMiddleware, Body> {
        theirs_by_key_every(Duration::from_millis(10))
    }

    fn theirs_by_key_every(
        period: Duration,
    ) -> GovernorLayer<ApiKeyId, governor::middleware::StateInformationMiddleware, Body> {
        let config = GovernorConfigBuilder::default()
            .period(period)
            .burst_size(1_000_000)
            .key_extractor(ApiKeyId)
            .use_headers()
            .finish()
            .unwrap();
        GovernorLayer::new(config)
    }

    fn keyed_known(c: &mut Criterion) {
        let mut g = c.benchmark_group("api_keys_known");
        g.warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(2));
        let ids = identities();
        let mut i = 0usize;
        let mut next = move || {
            i = (i + 1) % ids.len();
            key_request(&ids[i])
        };
        let mut svc = bare();
        g.bench_function("bare", |b| b.iter(|| call(&mut svc, next())));
        let mut svc = ours_by_key().layer(bare_inner());
        g.bench_function("llm_layers", |b| b.iter(|| call_ours(&mut svc, next())));
        let mut svc = theirs_by_key().layer(bare());
        g.bench_function("tower_governor", |b| b.iter(|| call(&mut svc, next())));
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
        // The budget: 10^6 keys in less than 150 MiB, and almost all of it given back.
        assert_eq!(tracked, N as usize, "every key is held until the sweep");
        assert!(full - baseline < 150.0, "10^6 keys over 150 MiB");
        assert_eq!(
            handle.tracked_keys(),
            0,
            "the sweep forgets every full bucket"
        );
        assert!(swept - baseline < 8.0, "the sweep gave the memory back");
        drop(svc);

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

        // The same with API keys: each key's id is its own string here (an authentication
        // layer's store would share it with the layer).
        let layer = RateLimitLayer::builder()
            .key_by(BucketKey::api_key())
            .limits(Limits::new().requests(Quota::new(1, Duration::from_secs(2)).burst(10)))
            .sweep(u64::MAX, Duration::from_secs(3600))
            .build()
            .unwrap();
        let handle = layer.handle();
        let mut svc = layer.layer(bare_inner());
        let baseline = rss_mib();
        for i in 0..N {
            let ident = llm_layers::ext::KeyIdentity::new(format!("sk-proj-{i:012}"));
            call_ours(&mut svc, key_request(&ident));
        }
        let full = rss_mib();
        let tracked = handle.tracked_keys();
        std::thread::sleep(Duration::from_millis(4100));
        handle.sweep();
        let swept = rss_mib();
        println!(
            "memory: {tracked} API keys (20-byte ids) tracked: +{:.1} MiB; after sweep: {} keys, +{:.1} MiB",
            full - baseline,
            handle.tracked_keys(),
            swept - baseline
        );
        assert!(full - baseline < 150.0, "10^6 API keys over 150 MiB");
        // The strings are freed, but the allocator keeps most of their pages resident (they
        // were interleaved with the requests' own allocations): reused by the process, not
        // given back to the system, so no bound on the resident size after this sweep.
        assert_eq!(
            handle.tracked_keys(),
            0,
            "the sweep forgets every full bucket"
        );
        drop(svc);
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
        "paired medians per call, 10 000 client addresses: bare {c:.0} ns, llm_layers {a:.0} ns, tower_governor {b:.0} ns; \
         llm_layers/tower_governor {:.2} (whole call), {:.2} (overhead over bare); speed {:.2}×",
        a / b,
        (a - c) / (b - c),
        b / a
    );
    }

    /// As [`paired`], over 10 000 known API keys.
    fn paired_keys() {
        const ROUNDS: usize = 31;
        const BATCH: usize = 20_000;
        let ids = identities();
        let mut ours_svc = ours_by_key().layer(bare_inner());
        let mut theirs_svc = theirs_by_key().layer(bare());
        let mut bare_svc = bare();
        let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
        let per_call = |d: Duration| d.as_nanos() as f64 / BATCH as f64;
        for _ in 0..ROUNDS {
            let t = Instant::now();
            for i in 0..BATCH {
                call(&mut bare_svc, key_request(&ids[i % ids.len()]));
            }
            c.push(per_call(t.elapsed()));
            let t = Instant::now();
            for i in 0..BATCH {
                call_ours(&mut ours_svc, key_request(&ids[i % ids.len()]));
            }
            a.push(per_call(t.elapsed()));
            let t = Instant::now();
            for i in 0..BATCH {
                call(&mut theirs_svc, key_request(&ids[i % ids.len()]));
            }
            b.push(per_call(t.elapsed()));
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (a, b, c) = (median(&mut a), median(&mut b), median(&mut c));
        println!(
            "paired medians per call, 10 000 known API keys: bare {c:.0} ns, llm_layers {a:.0} ns, \
             tower_governor {b:.0} ns; speed llm_layers/tower_governor {:.2}× (whole call)",
            b / a
        );
    }

    /// A realistic OpenAI chat stream sent with `include_usage` (every chunk says
    /// `"usage":null`, the last one reports the figures) and an Anthropic stream: one event per
    /// frame, as upstreams send them.
    fn streams() -> [(&'static str, Vec<bytes::Bytes>); 2] {
        let mut openai = Vec::new();
        for i in 0..300 {
            openai.push(bytes::Bytes::from(format!(
                "data: {{\"id\":\"chatcmpl-AZ9fQ2pLmT\",\"object\":\"chat.completion.chunk\",\"created\":1733050000,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_0ba0d124f1\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" token{i}\"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n"
            )));
        }
        openai.push(bytes::Bytes::from_static(b"data: {\"id\":\"chatcmpl-AZ9fQ2pLmT\",\"object\":\"chat.completion.chunk\",\"created\":1733050000,\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[],\"usage\":{\"prompt_tokens\":812,\"completion_tokens\":300,\"total_tokens\":1112}}\n\ndata: [DONE]\n\n"));
        let mut anthropic = vec![bytes::Bytes::from_static(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_01XFDUDYJgAACzvnptvVoYEL\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4-20250514\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":1200,\"output_tokens\":1}}}\n\n")];
        for i in 0..300 {
            anthropic.push(bytes::Bytes::from(format!(
                "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\" token{i}\"}}}}\n\n"
            )));
        }
        anthropic.push(bytes::Bytes::from_static(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":300}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
        [("openai_chat", openai), ("anthropic", anthropic)]
    }

    /// The meter the layer had before it read every dialect, kept here to compare: each line
    /// copied aside, a line naming `"usage"` parsed into a `serde_json::Value`.
    mod old_meter {
        use serde_json::Value;

        #[derive(Default)]
        pub struct Meter {
            line: Vec<u8>,
            skipping: bool,
            pub total: Option<u64>,
            pub input: Option<u64>,
            pub output: Option<u64>,
        }

        impl Meter {
            pub fn feed(&mut self, data: &[u8]) {
                let mut rest = data;
                while !rest.is_empty() {
                    match rest.iter().position(|&b| b == b'\n') {
                        Some(i) => {
                            if !self.skipping && self.line.len() + i <= 64 << 10 {
                                self.line.extend_from_slice(&rest[..i]);
                                let line = std::mem::take(&mut self.line);
                                self.sse_line(&line);
                                self.line = line;
                            }
                            self.line.clear();
                            self.skipping = false;
                            rest = &rest[i + 1..];
                        }
                        None => {
                            if self.line.len() + rest.len() > 64 << 10 {
                                self.skipping = true;
                                self.line.clear();
                            } else if !self.skipping {
                                self.line.extend_from_slice(rest);
                            }
                            rest = &[];
                        }
                    }
                }
            }

            fn sse_line(&mut self, line: &[u8]) {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let Some(data) = line.strip_prefix(b"data:") else {
                    return;
                };
                if !data.windows(7).any(|w| w == b"\"usage\"") {
                    return;
                }
                let Ok(v) = serde_json::from_slice::<Value>(data) else {
                    return;
                };
                let Some(u) = v.get("usage").filter(|u| u.is_object()) else {
                    return;
                };
                let n = |k: &str| u.get(k).and_then(Value::as_u64);
                if let Some(t) = n("total_tokens") {
                    self.total = Some(t);
                }
                if let Some(x) = n("prompt_tokens").or(n("input_tokens")) {
                    self.input = Some(self.input.map_or(x, |s| s.max(x)));
                }
                if let Some(x) = n("completion_tokens").or(n("output_tokens")) {
                    self.output = Some(self.output.map_or(x, |s| s.max(x)));
                }
            }
        }
    }

    /// The layer with a request quota only (nothing metered) or a token quota (the answer
    /// metered), answering `frames` as an event stream.
    fn stream_layer(
        tokens: bool,
        frames: Vec<bytes::Bytes>,
    ) -> impl Service<
        Request<Body>,
        Response = Response<llm_layers::rate_limit::RateLimitBody<Body>>,
        Error = Infallible,
    > {
        let limits = if tokens {
            Limits::new().tokens(Quota::per_second(1_000_000_000).burst(u32::MAX))
        } else {
            Limits::new().requests(Quota::per_second(100_000_000).burst(1_000_000))
        };
        let layer = RateLimitLayer::builder().limits(limits).build().unwrap();
        let frames = std::sync::Arc::new(frames);
        layer.layer(tower::service_fn(move |_req: Request<LayerBody<Body>>| {
            let frames = frames.clone();
            let chunks = (0..frames.len()).map(move |i| Ok::<_, Infallible>(frames[i].clone()));
            ready(Ok::<_, Infallible>(
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(Body::from_stream(futures_util::stream::iter(chunks)))
                    .unwrap(),
            ))
        }))
    }

    const STREAM_REQUEST: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"max_tokens":500,"stream":true}"#;

    /// One streamed call: the request, then every frame of the answer.
    fn stream_call<S>(svc: &mut S) -> usize
    where
        S: Service<Request<Body>, Response = Response<llm_layers::rate_limit::RateLimitBody<Body>>>,
        S::Error: std::fmt::Debug,
    {
        use http_body_util::BodyExt;
        let req = Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(Body::from(STREAM_REQUEST))
            .unwrap();
        let svc = svc.ready().now_or_never().unwrap().unwrap();
        let mut body = svc.call(req).now_or_never().unwrap().unwrap().into_body();
        let mut n = 0;
        while let Some(f) = body.frame().now_or_never().unwrap() {
            n += f.unwrap().into_data().map_or(0, |d| d.len());
        }
        n
    }

    fn metering(c: &mut Criterion) {
        for (name, frames) in streams() {
            let mut g = c.benchmark_group(format!("metered_stream_{name}"));
            g.warm_up_time(Duration::from_secs(1))
                .measurement_time(Duration::from_secs(2));
            let mut svc = stream_layer(false, frames.clone());
            g.bench_function("layer_unmetered", |b| {
                b.iter(|| black_box(stream_call(&mut svc)))
            });
            let mut svc = stream_layer(true, frames.clone());
            g.bench_function("layer_metered", |b| {
                b.iter(|| black_box(stream_call(&mut svc)))
            });
            g.bench_function("old_meter_alone", |b| {
                b.iter(|| {
                    let mut m = old_meter::Meter::default();
                    for f in &frames {
                        m.feed(f);
                    }
                    black_box((m.total, m.input, m.output))
                })
            });
            g.finish();
        }
    }

    /// Alternates batches of the unmetered layer, the metered layer and the old meter over the
    /// same stream, and compares medians: the metering cost now is metered − unmetered.
    fn paired_metering() {
        const ROUNDS: usize = 21;
        const BATCH: u32 = 200;
        for (name, frames) in streams() {
            let mut plain = stream_layer(false, frames.clone());
            let mut metered = stream_layer(true, frames.clone());
            let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
            let per_call = |d: Duration| d.as_nanos() as f64 / f64::from(BATCH);
            for _ in 0..ROUNDS {
                let t = Instant::now();
                for _ in 0..BATCH {
                    black_box(stream_call(&mut plain));
                }
                a.push(per_call(t.elapsed()));
                let t = Instant::now();
                for _ in 0..BATCH {
                    black_box(stream_call(&mut metered));
                }
                b.push(per_call(t.elapsed()));
                let t = Instant::now();
                for _ in 0..BATCH {
                    let mut m = old_meter::Meter::default();
                    for f in &frames {
                        m.feed(f);
                    }
                    black_box((m.total, m.input, m.output));
                }
                c.push(per_call(t.elapsed()));
            }
            let median = |v: &mut Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let (a, b, c) = (median(&mut a), median(&mut b), median(&mut c));
            let bytes: usize = frames.iter().map(|f| f.len()).sum();
            println!(
                "metering {name} ({} frames, {bytes} bytes), paired medians per stream: layer unmetered {a:.0} ns, \
                 metered {b:.0} ns (metering {:.0} ns incl. the token estimate); old meter alone {c:.0} ns; \
                 old/new metering {:.1}",
                frames.len(),
                b - a,
                c / (b - a)
            );
        }
    }

    criterion_group!(benches, keyed, keyed_known, contention, metering);

    /// `RL_COUNT=<case>:<n>` runs `n` calls of one case and exits, nothing else: an
    /// instruction counter (`valgrind --tool=cachegrind`) run with `n` and with 0 gives the
    /// instructions per call without the setup. Cases: `bare_ip`, `ours_ip`, `theirs_ip`,
    /// `bare_keys`, `ours_keys`, `theirs_keys`; `sizes` prints the two response futures' sizes.
    fn count(spec: &str) {
        let (case, n) = spec.split_once(':').expect("RL_COUNT=<case>:<n>");
        let n: u32 = n.parse().expect("a number of calls");
        let ids = identities();
        let ip = |i: u32| request(i % KEYS);
        let key = |i: u32| key_request(&ids[i as usize % ids.len()]);
        // The keys are known before the counted calls, as in the criterion groups.
        let warm = |f: &mut dyn FnMut(u32)| {
            for i in 0..KEYS {
                f(i);
            }
        };
        macro_rules! run {
            ($svc:expr, $call:ident, $req:expr) => {{
                let mut svc = $svc;
                warm(&mut |i| $call(&mut svc, $req(i)));
                for i in 0..n {
                    $call(&mut svc, $req(i));
                }
            }};
        }
        match case {
            "bare_ip" => run!(bare(), call, ip),
            "ours_ip" => run!(ours().layer(bare_inner()), call_ours, ip),
            "theirs_ip" => run!(theirs().layer(bare()), call, ip),
            "bare_keys" => run!(bare(), call, key),
            // One cell a minute: no key's bucket is full again during the run, however slow
            // the instrumented run is.
            "ours_keys" => run!(
                ours_by_key_every(Duration::from_secs(60)).layer(bare_inner()),
                call_ours,
                key
            ),
            "theirs_keys" => run!(
                theirs_by_key_every(Duration::from_secs(60)).layer(bare()),
                call,
                key
            ),
            "sizes" => {
                let mut svc = ours_by_key().layer(bare_inner());
                let fut = svc.call(key(0));
                println!("ours future {} bytes", std::mem::size_of_val(&fut));
                let mut svc = theirs_by_key().layer(bare());
                let fut = svc.call(key(0));
                println!("theirs future {} bytes", std::mem::size_of_val(&fut));
                println!(
                    "request {} bytes",
                    std::mem::size_of::<Request<LayerBody<Body>>>()
                );
            }
            other => panic!("unknown case {other}"),
        }
    }

    pub fn main() {
        if let Some(spec) = std::env::var_os("RL_COUNT") {
            count(spec.to_str().expect("RL_COUNT is text"));
            return;
        }
        if std::env::var_os("SKIP_MEMORY").is_none() {
            memory();
        }
        if std::env::var_os("SKIP_PAIRED").is_none() {
            paired();
            paired_keys();
            if std::env::var_os("SKIP_METERING").is_none() {
                paired_metering();
            }
        }
        benches();
        Criterion::default().configure_from_args().final_summary();
    }
}

fn main() {
    #[cfg(feature = "rate-limit")]
    imp::main();
}
