//! The Redis backend of the rate limiter against a real `redis-server` of each test's own:
//! three replicas (three layers, three axum servers) sharing one key's quotas, the server
//! stopped and restarted mid-run under both failure policies, `SCRIPT FLUSH` mid-run, keys
//! expiring, in-flight counts back to zero after cancelled requests, and configuration errors.
//! Without `redis-server` on the machine the tests that need it pass without running and say
//! so on stderr; under `CI=true` they fail instead.

#![cfg(feature = "redis")]

#[path = "common_rate_limit/mod.rs"]
mod common_rate_limit;
mod common_redis;

use std::time::Duration;

use common_rate_limit::*;
use common_redis::RedisServer;
use llm_layers::rate_limit::{FailurePolicy, Limits, Quota, RateLimitLayer, RedisBackend};
use redis::AsyncCommands;

const SUITE: &str = "tests/rate_limit_redis.rs";

fn layer(backend: RedisBackend, limits: Limits) -> RateLimitLayer {
    RateLimitLayer::builder()
        .limits(limits)
        .redis(backend)
        .build()
        .unwrap()
}

fn backend(server: &RedisServer) -> RedisBackend {
    // Generous: a debug build on a busy machine.
    RedisBackend::new(server.url()).timeout(Duration::from_millis(500))
}

/// Sends `n` chat requests for key `id`, round-robin over `addrs`, 8 at a time; returns the
/// statuses and the first admitted response's `x-ratelimit-remaining-tokens`, if any.
async fn burst_of(addrs: &[std::net::SocketAddr], id: &str, n: usize) -> (Vec<u16>, Option<u64>) {
    use futures_util::StreamExt;
    let c = client();
    let body = chat("hi", 90);
    let results: Vec<(u16, Option<u64>)> = futures_util::stream::iter(0..n)
        .map(|i| {
            let (c, body) = (c.clone(), body.clone());
            let url = format!("http://{}/v1/chat/completions", addrs[i % addrs.len()]);
            let id = id.to_owned();
            async move {
                let res = tokio::time::timeout(
                    Duration::from_secs(10),
                    c.post(url).bearer_auth(id).body(body).send(),
                )
                .await
                .expect("no request hangs")
                .unwrap();
                let remaining = res
                    .headers()
                    .get("x-ratelimit-remaining-tokens")
                    .and_then(|v| v.to_str().ok()?.parse().ok());
                let status = res.status().as_u16();
                let _ = res.bytes().await;
                (status, remaining)
            }
        })
        .buffered(8)
        .collect()
        .await;
    let first = results
        .iter()
        .find(|(s, r)| *s == 200 && r.is_some())
        .and_then(|(_, r)| *r);
    (results.into_iter().map(|(s, _)| s).collect(), first)
}

#[tokio::test]
async fn three_replicas_share_one_keys_request_and_token_quota_within_one_percent() {
    let Some(server) = RedisServer::start(SUITE) else {
        return;
    };
    // Refill during the run is negligible: an hour's quota, all of it as burst.
    let requests = Limits::new().requests(Quota::per_hour(1000).burst(1000));
    let tokens = Limits::new().tokens(Quota::per_hour(100_000).burst(100_000));
    let mut req_addrs = Vec::new();
    let mut tok_addrs = Vec::new();
    for _ in 0..3 {
        req_addrs.push(serve(layer(backend(&server), requests), Upstream::default()).await);
        tok_addrs.push(serve(layer(backend(&server), tokens), Upstream::default()).await);
    }

    let (statuses, _) = burst_of(&req_addrs, "shared-req", 1500).await;
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    // 1000 in the bucket; an hour's rate adds less than one request per 3.6 s.
    assert!(
        (1000..=1010).contains(&admitted),
        "three replicas admitted {admitted} requests of one shared quota of 1000"
    );

    // One request alone, on a key of its own, tells what each request costs (the first
    // answer of a burst may already count several requests admitted beside it).
    let (_, remaining) = burst_of(&tok_addrs[..1], "cost-probe", 1).await;
    let cost = 100_000 - remaining.expect("a token quota reports its figures");
    let (statuses, _) = burst_of(&tok_addrs, "shared-tok", 1500).await;
    let admitted = statuses.iter().filter(|s| **s == 200).count() as u64;
    assert!(
        cost > 90,
        "each request costs its max_tokens and more: {cost}"
    );
    let charged = admitted * cost;
    assert!(
        charged <= 101_000 && charged > 100_000 - cost,
        "three replicas charged {charged} tokens ({admitted} requests of {cost}) of one shared quota of 100000"
    );
}

async fn evalsha_calls(server: &RedisServer) -> u64 {
    let mut conn = server.conn().await;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|l| l.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn pre_borrowing_never_exceeds_the_quota_and_saves_round_trips() {
    let Some(server) = RedisServer::start(SUITE) else {
        return;
    };
    let requests = Limits::new().requests(Quota::per_hour(1000).burst(1000));
    let mut addrs = Vec::new();
    for _ in 0..3 {
        let b = backend(&server).pre_borrow(10, Duration::from_secs(60));
        addrs.push(serve(layer(b, requests), Upstream::default()).await);
    }
    let before = evalsha_calls(&server).await;
    let (statuses, _) = burst_of(&addrs, "hot", 900).await;
    let calls = evalsha_calls(&server).await - before;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    // One borrow per 10 admissions, give or take borrows that raced.
    assert!(
        calls <= 900 / 10 + 24,
        "{calls} round trips for 900 admissions"
    );

    let (statuses, _) = burst_of(&addrs, "hot", 600).await;
    let admitted = 900 + statuses.iter().filter(|s| **s == 200).count();
    // Never above the quota (plus the refill of an hour's rate); at most 3 leases of 10
    // stranded below it.
    assert!(
        (1000 - 3 * 10..=1010).contains(&admitted),
        "three borrowing replicas admitted {admitted} of one shared quota of 1000"
    );
}

#[tokio::test]
async fn headers_and_retry_after_are_those_of_the_memory_backend() {
    let Some(server) = RedisServer::start(SUITE) else {
        return;
    };
    let limits = Limits::new().requests(Quota::per_minute(60).burst(2));
    let addr = serve(layer(backend(&server), limits), Upstream::default()).await;
    let url = format!("http://{addr}/v1/chat/completions");
    let c = client();
    let send = || c.post(&url).bearer_auth("k").body("{}").send();
    let res = send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "x-ratelimit-limit-requests"), "2");
    assert_eq!(header(&res, "x-ratelimit-remaining-requests"), "1");
    assert_eq!(header(&res, "x-ratelimit-reset-requests"), "1s");
    let res = send().await.unwrap();
    assert_eq!(header(&res, "x-ratelimit-remaining-requests"), "0");
    let res = send().await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(header(&res, "retry-after"), "1");
    let ms: u64 = header(&res, "retry-after-ms").parse().unwrap();
    assert!((900..=1000).contains(&ms), "retry-after-ms {ms}");
    assert_eq!(header(&res, "x-ratelimit-remaining-requests"), "0");
    let (code, _) = error_code(res).await;
    assert_eq!(code, "rate_limit_exceeded");
}

#[tokio::test]
async fn redis_stopped_mid_run_fails_open_at_the_local_share_then_recovers() {
    let Some(mut server) = RedisServer::start(SUITE) else {
        return;
    };
    let limits = Limits::new().requests(Quota::per_hour(300).burst(300));
    // A stopped server refuses connections at once; the timeout only has to be long enough
    // that a loaded machine's slow answer from the running server is not taken for a failure
    // (which would charge the local share early).
    let b = backend(&server)
        .timeout(Duration::from_secs(2))
        .replicas(3)
        .probe_interval(Duration::from_millis(20));
    let addr = serve(layer(b, limits), Upstream::default()).await;
    let addrs = [addr];

    let (statuses, _) = burst_of(&addrs, "k", 50).await;
    assert!(statuses.iter().all(|s| *s == 200));

    server.stop();
    // Every request is answered; the local limiter admits 300 / 3 = 100 of them.
    let (statuses, _) = burst_of(&addrs, "k", 200).await;
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    assert!(statuses.iter().all(|s| *s == 200 || *s == 429));
    assert_eq!(
        admitted, 100,
        "fail-open admits the local share of the quota"
    );

    server.restart();
    // Back on the (now empty) shared store: a full bucket of 300 again.
    let c = client();
    let url = format!("http://{addr}/v1/chat/completions");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let res = c
            .post(&url)
            .bearer_auth("k")
            .body("{}")
            .send()
            .await
            .unwrap();
        let remaining: u64 = res
            .headers()
            .get("x-ratelimit-remaining-requests")
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0);
        if res.status() == 200 && remaining > 100 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the layer went back to redis"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut conn = server.conn().await;
    let keys: Vec<String> = conn.keys("llm-layers:rl:*").await.unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
}

#[tokio::test]
async fn redis_stopped_mid_run_fails_closed_with_503_then_recovers() {
    let Some(mut server) = RedisServer::start(SUITE) else {
        return;
    };
    let limits = Limits::new().requests(Quota::per_hour(300).burst(300));
    let b = backend(&server)
        .timeout(Duration::from_millis(100))
        .on_failure(FailurePolicy::FailClosed)
        .probe_interval(Duration::from_millis(20));
    let addr = serve(layer(b, limits), Upstream::default()).await;
    let url = format!("http://{addr}/v1/chat/completions");
    let c = client();
    let send = || c.post(&url).bearer_auth("k").body("{}").send();
    assert_eq!(send().await.unwrap().status(), 200);

    server.stop();
    for _ in 0..5 {
        let res = tokio::time::timeout(Duration::from_secs(5), send())
            .await
            .expect("no request hangs")
            .unwrap();
        assert_eq!(res.status(), 503);
        assert_eq!(header(&res, "x-should-retry"), "true");
        let (code, _) = error_code(res).await;
        assert_eq!(code, "service_unavailable");
    }

    server.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while send().await.unwrap().status() != 200 {
        assert!(tokio::time::Instant::now() < deadline, "recovered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_frozen_redis_costs_each_request_at_most_the_timeout_then_recovers() {
    let Some(server) = RedisServer::start(SUITE) else {
        return;
    };
    let limits = Limits::new().requests(Quota::per_hour(300).burst(300));
    let b = backend(&server)
        .timeout(Duration::from_millis(50))
        .on_failure(FailurePolicy::FailClosed)
        .probe_interval(Duration::from_millis(20));
    let addr = serve(layer(b, limits), Upstream::default()).await;
    let url = format!("http://{addr}/v1/chat/completions");
    let c = client();
    let send = || c.post(&url).bearer_auth("k").body("{}").send();
    assert_eq!(send().await.unwrap().status(), 200);

    server.freeze();
    for _ in 0..5 {
        // The layer gives up after 50 ms; 2 s only bounds a loaded machine.
        let res = tokio::time::timeout(Duration::from_secs(2), send())
            .await
            .expect("a slow store does not hold requests")
            .unwrap();
        assert_eq!(res.status(), 503);
    }
    server.thaw();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let res = send().await.unwrap();
        if res.status() == 200 {
            // The frozen time did not reset the count: 1 + this one taken, and at most one
            // for each call that timed out but ran when the server went on.
            let remaining: u32 = header(&res, "x-ratelimit-remaining-requests")
                .parse()
                .unwrap();
            assert!((293..=298).contains(&remaining), "{remaining}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "recovered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn header_keys_are_named_by_their_digest_in_the_store() {
    let Some(server) = RedisServer::start(SUITE) else {
        return;
    };
    let layer = RateLimitLayer::builder()
        .key_by(llm_layers::rate_limit::BucketKey::header(
            http::HeaderName::from_static("x-user-token"),
        ))
        .limits(Limits::new().requests(Quota::per_hour(10).burst(10)))
        .redis(backend(&server))
        .build()
        .unwrap();
    let addr = serve(layer, Upstream::default()).await;
    let res = client()
        .post(format!("http://{addr}/v1/chat/completions"))
        .header("x-user-token", "tok-s3cret")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut conn = server.conn().await;
    let keys: Vec<String> = conn.keys("llm-layers:rl:*").await.unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(!keys[0].contains("s3cret"), "{keys:?}");
    assert!(keys[0].contains(":h:"), "{keys:?}");
}

/// Polls the key's TTL until `ok` holds, within 5 s.
async fn ttl_until(server: &RedisServer, key: &str, ok: impl Fn(i64) -> bool) -> i64 {
    let mut conn = server.conn().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let ttl: i64 = conn.pttl(key).await.unwrap();
        if ok(ttl) {
            return ttl;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{key}: pttl {ttl} never matched"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn token_charges_are_corrected_from_usage_in_the_store() {
    let Some(server) = RedisServer::start(SUITE) else {
        return;
    };
    // One token every 3.6 s: the bucket key's TTL is the tokens it owes times 3.6 s.
    let limits = Limits::new().tokens(Quota::per_hour(1000).burst(1000));
    let addr = serve(layer(backend(&server), limits), Upstream::default()).await;
    let c = client();
    let send = |path: &str, id: &str, headers: &[(&str, &str)]| {
        let mut req = c
            .post(format!("http://{addr}{path}"))
            .bearer_auth(id)
            .header("content-type", "application/json")
            .body(chat("hi", 90));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send()
    };
    let key = |id: &str| format!("llm-layers:rl:t:1000:3600000000000:1000:s:{id}");

    // A success reporting 5 tokens: the estimate (over 90) is replaced by 5.
    let res = send("/v1/chat/completions", "under", &[("x-usage", "5")])
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let cost = 1000
        - header(&res, "x-ratelimit-remaining-tokens")
            .parse::<i64>()
            .unwrap();
    assert!(cost > 90, "{cost}");
    let _ = res.bytes().await;
    let ttl = ttl_until(&server, &key("under"), |t| t > 0 && t <= 5 * 3600 + 10).await;
    assert!(ttl > 4 * 3600, "5 tokens owed: {ttl} ms");

    // An overrun of 500 tokens: charged in full.
    let res = send("/v1/chat/completions", "over", &[("x-usage", "500")])
        .await
        .unwrap();
    let _ = res.bytes().await;
    ttl_until(&server, &key("over"), |t| t > 499 * 3600).await;

    // A 400 from the upstream (it refused before working): refunded in full.
    let res = send("/v1/status", "refused", &[("x-status", "400")])
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let _ = res.bytes().await;
    ttl_until(&server, &key("refused"), |t| t == -2).await;
}

#[tokio::test]
async fn script_flush_mid_run_loses_nothing() {
    let Some(server) = RedisServer::start(SUITE) else {
        return;
    };
    let limits = Limits::new().requests(Quota::per_hour(100).burst(100));
    let addr = serve(layer(backend(&server), limits), Upstream::default()).await;
    let url = format!("http://{addr}/v1/chat/completions");
    let c = client();
    let mut conn = server.conn().await;
    let mut seen = Vec::new();
    for i in 0..10 {
        if i == 5 {
            let _: () = redis::cmd("SCRIPT")
                .arg("FLUSH")
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        let res = c
            .post(&url)
            .bearer_auth("k")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        seen.push(header(&res, "x-ratelimit-remaining-requests").to_owned());
    }
    let expected: Vec<String> = (90..100).rev().map(|n| n.to_string()).collect();
    assert_eq!(seen, expected, "the count goes on across the flush");
}

#[tokio::test]
async fn keys_expire_when_their_bucket_is_full_again() {
    let Some(server) = RedisServer::start(SUITE) else {
        return;
    };
    // One request comes back every 100 ms.
    let limits = Limits::new()
        .requests(Quota::per_second(10).burst(5))
        .concurrency(4);
    let b = backend(&server).concurrency_ttl(Duration::from_secs(30));
    let addr = serve(layer(b, limits), Upstream::default()).await;
    let c = client();
    let res = c
        .post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth("k")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut conn = server.conn().await;
    let keys: Vec<String> = conn.keys("llm-layers:rl:r:*").await.unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let ttl: i64 = conn.pttl(&keys[0]).await.unwrap();
    assert!(
        (1..=101).contains(&ttl),
        "a bucket lives until it is full: {ttl} ms"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while conn.exists::<_, bool>(&keys[0]).await.unwrap() {
        assert!(tokio::time::Instant::now() < deadline, "the key expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn inflight_counts_return_to_zero_after_cancelled_requests() {
    let Some(server) = RedisServer::start(SUITE) else {
        return;
    };
    let limits = Limits::new()
        .requests(Quota::per_hour(1000).burst(1000))
        .concurrency(2);
    let up = Upstream::default();
    let addr = serve(layer(backend(&server), limits), up.clone()).await;
    let c = client();
    let url = format!("http://{addr}/v1/stream");
    let held = || {
        c.post(&url)
            .bearer_auth("k")
            .header("x-hold", "1")
            .body("{}")
            .send()
    };
    let mut conn = server.conn().await;
    let key = "llm-layers:rl:c:s:k";

    // Two held streams fill the cap; a third is refused.
    let a = held().await.unwrap();
    let b = held().await.unwrap();
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
    assert_eq!(conn.get::<_, Option<i64>>(key).await.unwrap(), Some(2));
    let res = held().await.unwrap();
    assert_eq!(res.status(), 429);
    let (code, _) = error_code(res).await;
    assert_eq!(code, "concurrent_limit_exceeded");
    let ttl: i64 = conn.pttl(key).await.unwrap();
    assert!(ttl > 0, "an in-flight count has a TTL: {ttl}");

    // The client goes away mid-stream.
    drop((a, b));
    // And one more is cancelled before its head arrives.
    let pending = tokio::spawn({
        let c = c.clone();
        let url = url.clone();
        async move {
            c.post(url)
                .bearer_auth("k")
                .header("x-hold", "1")
                .body("{}")
                .send()
                .await
        }
    });
    tokio::task::yield_now().await;
    pending.abort();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let n: Option<i64> = conn.get(key).await.unwrap();
        if n.is_none() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the in-flight count came back to 0: {n:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    up.release.notify_waiters();
}

#[test]
fn configuration_errors_name_the_field_and_never_show_the_url() {
    let limits = Limits::new().requests(Quota::per_minute(1).burst(1));
    let build = |b: RedisBackend| {
        RateLimitLayer::builder()
            .limits(limits)
            .redis(b)
            .build()
            .unwrap_err()
    };
    let err = build(RedisBackend::new("redis://127.0.0.1/").replicas(0));
    assert_eq!(err.field(), "redis.replicas");
    let err = build(RedisBackend::new("redis://127.0.0.1/").timeout(Duration::ZERO));
    assert_eq!(err.field(), "redis.timeout");
    let err = build(RedisBackend::new("ftp://:s3cret-pw@host/"));
    assert_eq!(err.field(), "redis.url");
    assert!(!err.to_string().contains("s3cret"), "{err}");
    let debug = format!("{:?}", RedisBackend::new("redis://:s3cret-pw@host/"));
    assert!(!debug.contains("s3cret"), "{debug}");
}
