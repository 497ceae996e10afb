//! Admission through the rate limiter with its buckets in memory and in a `redis-server` on
//! loopback, in the same run: latency per admission (p50, p99, one request at a time) and
//! throughput (64 requests in flight), over an in-process service that answers at once; and
//! Redis with local pre-borrowing of 64 requests per lease.
//!
//! `cargo bench --features redis --bench rate_limit_redis`. Starts its own `redis-server` on
//! a free port (and stops it); without one installed it says so and measures nothing.

#[path = "../tests/common_redis/mod.rs"]
mod common_redis;

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response};
use http_body_util::Full;
use llm_layers::body::LayerBody;
use llm_layers::ext::KeyIdentity;
use llm_layers::rate_limit::{Limits, Quota, RateLimitLayer, RedisBackend};
use tower::{Layer, Service, ServiceExt};

const LATENCY_CALLS: usize = 20_000;
const THROUGHPUT_CALLS: usize = 100_000;
const IN_FLIGHT: usize = 64;

fn limits() -> Limits {
    // Never refuses: the figures are those of admissions.
    Limits::new().requests(Quota::per_second(100_000_000).burst(1_000_000))
}

fn request() -> Request<Full<Bytes>> {
    let mut req = Request::post("/v1/chat/completions")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    req.extensions_mut().insert(KeyIdentity::new("bench-key"));
    req
}

async fn measure(name: &str, layer: RateLimitLayer) {
    let inner = tower::service_fn(|_req: Request<LayerBody<Full<Bytes>>>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    });
    let svc = layer.layer(inner);
    // Warm up: connection, script cache.
    for _ in 0..1000 {
        let res = svc.clone().oneshot(request()).await.unwrap();
        assert_eq!(res.status(), 200);
    }
    let mut lat = Vec::with_capacity(LATENCY_CALLS);
    for _ in 0..LATENCY_CALLS {
        let mut s = svc.clone();
        let t = Instant::now();
        let res = s.ready().await.unwrap().call(request()).await.unwrap();
        lat.push(t.elapsed());
        assert_eq!(res.status(), 200);
    }
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    let start = Instant::now();
    let ok = futures_util::stream::iter(0..THROUGHPUT_CALLS)
        .map(|_| svc.clone().oneshot(request()))
        .buffer_unordered(IN_FLIGHT)
        .filter(|r| std::future::ready(r.as_ref().is_ok_and(|r| r.status() == 200)))
        .count()
        .await;
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(ok, THROUGHPUT_CALLS);
    println!(
        "{name:<22} p50 {:>9.1} µs   p99 {:>9.1} µs   throughput {:>10.0} admissions/s",
        us(pct(0.50)),
        us(pct(0.99)),
        THROUGHPUT_CALLS as f64 / secs
    );
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let memory = RateLimitLayer::builder().limits(limits()).build().unwrap();
        measure("memory", memory).await;
        let Some(server) = common_redis::RedisServer::start("benches/rate_limit_redis.rs") else {
            return;
        };
        let redis = RateLimitLayer::builder()
            .limits(limits())
            .redis(RedisBackend::new(server.url()).timeout(Duration::from_millis(100)))
            .build()
            .unwrap();
        measure("redis (loopback)", redis).await;
        let borrowing = RateLimitLayer::builder()
            .limits(limits())
            .redis(
                RedisBackend::new(server.url())
                    .timeout(Duration::from_millis(100))
                    .key_prefix("bench-borrow:")
                    .pre_borrow(64, Duration::from_millis(100)),
            )
            .build()
            .unwrap();
        measure("redis, pre-borrow 64", borrowing).await;
    });
}
