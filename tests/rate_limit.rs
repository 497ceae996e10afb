//! Behaviour over real HTTP (statuses, envelopes, headers, tiers, token correction,
//! concurrency through a held stream, configuration errors), and exact admission counts with
//! tokio's paused clock over an in-process service.

#![cfg(feature = "rate-limit")]

mod common_rate_limit;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common_rate_limit::*;
use http_body_util::{BodyExt, Full};
use llm_layers::ext::KeyIdentity;
use llm_layers::rate_limit::{KeyBy, Limits, Mode, Quota, RateLimitLayer};
use tokio::time::Instant;
use tower::{Service, ServiceExt};

fn per_key(requests: Quota) -> RateLimitLayer {
    RateLimitLayer::builder()
        .limits(Limits::new().requests(requests))
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Real HTTP.

#[tokio::test]
async fn requests_over_the_burst_get_429_with_envelope_and_headers() {
    let addr = serve(per_key(Quota::per_minute(60).burst(3)), Upstream::default()).await;
    let url = format!("http://{addr}/v1/chat/completions");
    let c = client();
    for expected_remaining in ["2", "1", "0"] {
        let res = c
            .post(&url)
            .bearer_auth("k1")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(header(&res, "x-ratelimit-limit-requests"), "3");
        assert_eq!(
            header(&res, "x-ratelimit-remaining-requests"),
            expected_remaining
        );
        assert!(res.headers().get("x-ratelimit-limit-tokens").is_none());
    }
    let res = c
        .post(&url)
        .bearer_auth("k1")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(header(&res, "x-should-retry"), "true");
    assert_eq!(header(&res, "x-ratelimit-remaining-requests"), "0");
    // One request per second comes back: the wait is under a second, so `retry-after` is 1.
    assert_eq!(header(&res, "retry-after"), "1");
    let ms: u64 = header(&res, "retry-after-ms").parse().unwrap();
    assert!((1..=1000).contains(&ms), "retry-after-ms {ms}");
    // The bucket is full again after at most three seconds.
    let reset = header(&res, "x-ratelimit-reset-requests").to_owned();
    assert!(
        reset.ends_with("ms") || reset.starts_with('2') || reset == "3s",
        "{reset}"
    );
    let (code, message) = error_code(res).await;
    assert_eq!(code, "rate_limit_exceeded");
    assert!(message.contains("requests"), "{message}");
    // Another key has its own bucket.
    let res = c
        .post(&url)
        .bearer_auth("k2")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn tiers_side_by_side_and_a_keys_own_limits_override_its_tier() {
    let layer = RateLimitLayer::builder()
        .tier("free", Limits::new().requests(Quota::per_hour(2).burst(2)))
        .tier("pro", Limits::new().requests(Quota::per_hour(100).burst(5)))
        .limits(Limits::new().requests(Quota::per_hour(1).burst(1)))
        .build()
        .unwrap();
    let addr = serve(layer, Upstream::default()).await;
    let url = format!("http://{addr}/v1/chat/completions");
    let c = client();
    let admitted = |key: &'static str, tier: Option<&'static str>, rpm: Option<u32>| {
        let c = c.clone();
        let url = url.clone();
        async move {
            let mut n = 0;
            for _ in 0..8 {
                let mut req = c.post(&url).bearer_auth(key).body("{}");
                if let Some(t) = tier {
                    req = req.header("x-tier", t);
                }
                if let Some(r) = rpm {
                    req = req.header("x-rpm", r.to_string());
                }
                let res = req.send().await.unwrap();
                if res.status() == 200 {
                    n += 1;
                } else {
                    assert_eq!(res.status(), 429);
                }
            }
            n
        }
    };
    assert_eq!(admitted("free-a", Some("free"), None).await, 2);
    assert_eq!(admitted("free-b", Some("free"), None).await, 2);
    assert_eq!(admitted("pro-a", Some("pro"), None).await, 5);
    // Unknown tier and no tier: the defaults.
    assert_eq!(admitted("other", Some("gold"), None).await, 1);
    assert_eq!(admitted("none", None, None).await, 1);
    // A pro key whose own limit is 3 per minute: burst 3.
    assert_eq!(admitted("pro-own", Some("pro"), Some(3)).await, 3);
}

#[tokio::test]
async fn token_charge_is_corrected_from_a_json_usage() {
    let layer = RateLimitLayer::builder()
        .limits(Limits::new().tokens(Quota::per_hour(1000).burst(1000)))
        .build()
        .unwrap();
    let addr = serve(layer, Upstream::default()).await;
    let url = format!("http://{addr}/v1/chat/completions");
    let c = client();
    // "hi" is 1 token + 4 per message: cost 5 + 500.
    let send = |usage: Option<u64>| {
        let mut req = c
            .post(&url)
            .bearer_auth("t1")
            .header("content-type", "application/json")
            .body(chat("hi", 500));
        if let Some(u) = usage {
            req = req.header("x-usage", u.to_string());
        }
        req.send()
    };
    let res = send(Some(20)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "x-ratelimit-limit-tokens"), "1000");
    assert_eq!(header(&res, "x-ratelimit-remaining-tokens"), "495");
    assert!(res.headers().get("x-ratelimit-limit-requests").is_none());
    res.bytes().await.unwrap();
    // 485 unused tokens came back: 1000 - 20 - 505.
    let res = send(Some(900)).await.unwrap();
    assert_eq!(header(&res, "x-ratelimit-remaining-tokens"), "475");
    res.bytes().await.unwrap();
    // That one used 395 more than charged: 475 - 395 = 80 left, too few for 505.
    let res = send(None).await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(header(&res, "x-ratelimit-remaining-tokens"), "80");
    let (code, _) = error_code(res).await;
    assert_eq!(code, "rate_limit_exceeded");
}

#[tokio::test]
async fn token_charge_is_corrected_from_the_final_sse_chunk() {
    let layer = RateLimitLayer::builder()
        .limits(Limits::new().tokens(Quota::per_hour(1000).burst(1000)))
        .build()
        .unwrap();
    let addr = serve(layer, Upstream::default()).await;
    let c = client();
    let res = c
        .post(format!("http://{addr}/v1/stream"))
        .bearer_auth("s1")
        .header("x-usage", "30")
        .body(chat("hi", 500))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&res, "content-type"), "text/event-stream");
    assert_eq!(header(&res, "x-ratelimit-remaining-tokens"), "495");
    let text = res.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let res = c
        .post(format!("http://{addr}/v1/stream"))
        .bearer_auth("s1")
        .body(chat("hi", 500))
        .send()
        .await
        .unwrap();
    // 1000 - 30 - 505.
    assert_eq!(header(&res, "x-ratelimit-remaining-tokens"), "465");
    res.text().await.unwrap();
    // That stream reported no usage and keeps its charge: 465 left, too few for 505.
    let res = c
        .post(format!("http://{addr}/v1/stream"))
        .bearer_auth("s1")
        .body(chat("hi", 500))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(header(&res, "x-ratelimit-remaining-tokens"), "465");
}

#[tokio::test]
async fn an_upstream_error_without_usage_is_refunded() {
    let layer = RateLimitLayer::builder()
        .limits(Limits::new().tokens(Quota::per_hour(1000).burst(1000)))
        .build()
        .unwrap();
    let addr = serve(layer, Upstream::default()).await;
    let c = client();
    let res = c
        .post(format!("http://{addr}/v1/fail"))
        .bearer_auth("f1")
        .body(chat("hi", 500))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 502);
    res.bytes().await.unwrap();
    let res = c
        .post(format!("http://{addr}/v1/fail"))
        .bearer_auth("f1")
        .body(chat("hi", 500))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&res, "x-ratelimit-remaining-tokens"), "495");
}

#[tokio::test]
async fn a_request_that_can_never_fit_is_refused_at_once() {
    let layer = RateLimitLayer::builder()
        .limits(Limits::new().tokens(Quota::per_minute(4000).burst(4000)))
        .build()
        .unwrap();
    let addr = serve(layer, Upstream::default()).await;
    let res = client()
        .post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth("n1")
        .body(chat("hi", 5000))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(header(&res, "x-should-retry"), "false");
    assert!(res.headers().get("retry-after").is_none());
    assert_eq!(header(&res, "x-ratelimit-remaining-tokens"), "4000");
    let v: serde_json::Value = res.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert_eq!(v["error"]["param"], "max_tokens");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("5005") && msg.contains("4000"), "{msg}");
}

#[tokio::test]
async fn the_concurrency_slot_is_held_until_a_slow_stream_ends() {
    let up = Upstream::default();
    let layer = RateLimitLayer::builder()
        .limits(Limits::new().concurrency(1))
        .build()
        .unwrap();
    let addr = serve(layer, up.clone()).await;
    let c = client();
    let url = format!("http://{addr}/v1/stream");
    let first = c
        .post(&url)
        .bearer_auth("c1")
        .header("x-hold", "1")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    // The head has arrived; the stream is still open.
    let second = c
        .post(&url)
        .bearer_auth("c1")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), 429);
    assert_eq!(header(&second, "x-should-retry"), "true");
    let (code, message) = error_code(second).await;
    assert_eq!(code, "concurrent_limit_exceeded");
    assert!(message.contains("at most 1"), "{message}");
    // Another key is not affected.
    let other = c
        .post(&url)
        .bearer_auth("c2")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 200);
    other.bytes().await.unwrap();

    up.release.notify_one();
    let text = first.text().await.unwrap();
    assert!(text.contains("[DONE]"));
    let third = c
        .post(&url)
        .bearer_auth("c1")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(third.status(), 200);
}

#[tokio::test]
async fn client_ip_keys_believe_x_forwarded_for_only_from_trusted_proxies() {
    fn connect_info(ext: &http::Extensions) -> Option<std::net::IpAddr> {
        ext.get::<axum::extract::ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip())
    }
    let limits = Limits::new().requests(Quota::per_hour(1).burst(1));
    let trusting = RateLimitLayer::builder()
        .key_by(KeyBy::client_ip_from(connect_info).trusted_proxies(["127.0.0.0/8"]))
        .limits(limits)
        .build()
        .unwrap();
    let addr = serve(trusting, Upstream::default()).await;
    let c = client();
    let url = format!("http://{addr}/v1/chat/completions");
    let status = |xff: &'static str| {
        c.post(&url)
            .header("x-forwarded-for", xff)
            .body("{}")
            .send()
    };
    assert_eq!(status("9.9.9.9").await.unwrap().status(), 200);
    // Same client behind another trusted hop, and a spoofed left-most entry.
    assert_eq!(
        status("1.1.1.1, 9.9.9.9, 127.0.0.2")
            .await
            .unwrap()
            .status(),
        429
    );
    assert_eq!(status("8.8.8.8").await.unwrap().status(), 200);

    let untrusting = RateLimitLayer::builder()
        .key_by(KeyBy::client_ip_from(connect_info))
        .limits(limits)
        .build()
        .unwrap();
    let addr = serve(untrusting, Upstream::default()).await;
    let url = format!("http://{addr}/v1/chat/completions");
    let send = |xff: &'static str| {
        c.post(&url)
            .header("x-forwarded-for", xff)
            .body("{}")
            .send()
    };
    assert_eq!(send("9.9.9.9").await.unwrap().status(), 200);
    // Without trust, the header is ignored: everyone is 127.0.0.1.
    assert_eq!(send("8.8.8.8").await.unwrap().status(), 429);
}

#[test]
fn invalid_configuration_is_rejected_naming_the_field() {
    let err = |b: llm_layers::rate_limit::RateLimitLayerBuilder| b.build().unwrap_err().to_string();
    let e = err(
        RateLimitLayer::builder().limits(Limits::new().requests(Quota::per_minute(0).burst(1)))
    );
    assert!(e.contains("limits.requests") && e.contains("rate"), "{e}");
    let e = err(RateLimitLayer::builder().limits(Limits::new().tokens(Quota::per_minute(10))));
    assert!(e.contains("limits.tokens") && e.contains("burst"), "{e}");
    let e = err(RateLimitLayer::builder().tier(
        "free",
        Limits::new().requests(Quota::new(1, Duration::ZERO).burst(1)),
    ));
    assert!(
        e.contains("tier[\"free\"].requests") && e.contains("period"),
        "{e}"
    );
    let e = err(RateLimitLayer::builder().global(Limits::new().concurrency(0)));
    assert!(e.contains("global.concurrency"), "{e}");
    let e = err(RateLimitLayer::builder()
        .tier("a", Limits::new().concurrency(1))
        .tier("a", Limits::new().concurrency(2)));
    assert!(e.contains("tier[\"a\"]") && e.contains("twice"), "{e}");
    let e = err(RateLimitLayer::builder()
        .key_by(KeyBy::client_ip().trusted_proxies(["10.0.0.0/40"]))
        .limits(Limits::new().concurrency(1)));
    assert!(
        e.contains("trusted_proxies") && e.contains("10.0.0.0/40"),
        "{e}"
    );
    let e = err(RateLimitLayer::builder()
        .mode(Mode::Wait(Duration::ZERO))
        .limits(Limits::new().concurrency(1)));
    assert!(e.contains("mode"), "{e}");
    let e = err(RateLimitLayer::builder().key_limits(false));
    assert!(e.contains("no quota"), "{e}");
    let e = err(RateLimitLayer::builder()
        .limits(Limits::new().concurrency(1))
        .sweep(0, Duration::from_secs(1)));
    assert!(e.contains("sweep.every"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Paused time, in process.

async fn status(
    svc: &mut InProcess,
    req: http::Request<Full<Bytes>>,
) -> http::Response<llm_layers::rate_limit::RateLimitBody<Full<Bytes>>> {
    svc.ready().await.unwrap().call(req).await.unwrap()
}

#[tokio::test(start_paused = true)]
async fn retrying_at_retry_after_ms_succeeds_and_not_a_millisecond_earlier() {
    // One every 333.33 ms: the waits are not whole milliseconds.
    let layer = per_key(Quota::per_second(3).burst(2));
    let mut svc = in_process(&layer);
    assert_eq!(status(&mut svc, keyed("a")).await.status(), 200);
    let res = status(&mut svc, keyed("a")).await;
    assert_eq!(res.headers()["x-ratelimit-reset-requests"], "667ms");
    tokio::time::advance(Duration::from_millis(100)).await;
    let res = status(&mut svc, keyed("a")).await;
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["retry-after-ms"], "234");
    assert_eq!(res.headers()["retry-after"], "1");
    assert_eq!(res.headers()["x-ratelimit-reset-requests"], "567ms");
    tokio::time::advance(Duration::from_millis(233)).await;
    assert_eq!(status(&mut svc, keyed("a")).await.status(), 429);
    tokio::time::advance(Duration::from_millis(1)).await;
    let res = status(&mut svc, keyed("a")).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-ratelimit-remaining-requests"], "0");
}

#[tokio::test(start_paused = true)]
async fn no_interval_admits_more_than_burst_plus_rate_times_length() {
    let (burst, per_sec) = (5u32, 10u64);
    let layer = per_key(Quota::per_second(per_sec).burst(burst));
    let mut svc = in_process(&layer);
    let mut rng = fastrand::Rng::with_seed(7);
    let start = Instant::now();
    let mut admitted = Vec::new();
    let mut rejected = 0;
    for _ in 0..2000 {
        // Bursts and gaps: 0 to 30 ms between requests, averaging above the rate.
        tokio::time::advance(Duration::from_micros(rng.u64(0..30_000))).await;
        let res = status(&mut svc, keyed("k")).await;
        if res.status() == 200 {
            admitted.push(Instant::now() - start);
        } else {
            rejected += 1;
        }
    }
    assert!(rejected > 0 && admitted.len() > 100);
    let t = Duration::from_secs(1) / per_sec as u32;
    for i in 0..admitted.len() {
        for j in i..admitted.len() {
            let span = admitted[j] - admitted[i];
            let allowed = u64::from(burst) + (span.as_nanos() / t.as_nanos()) as u64;
            let count = (j - i + 1) as u64;
            assert!(count <= allowed, "{count} admitted in {span:?}");
        }
    }
    // Over the whole run, close to the rate: the limiter does not admit too few either.
    let total = (Instant::now() - start).as_secs_f64();
    assert!(admitted.len() as f64 >= total * per_sec as f64 - 1.0);
}

#[tokio::test(start_paused = true)]
async fn conforming_traffic_is_never_rejected() {
    let layer = per_key(Quota::per_minute(120).burst(4));
    let mut svc = in_process(&layer);
    // A full burst at once, then exactly one per emission interval, forever.
    for _ in 0..4 {
        assert_eq!(status(&mut svc, keyed("c")).await.status(), 200);
    }
    assert_eq!(status(&mut svc, keyed("c")).await.status(), 429);
    for _ in 0..200 {
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(status(&mut svc, keyed("c")).await.status(), 200);
    }
    // And after an idle period, the burst is whole again.
    tokio::time::advance(Duration::from_secs(2)).await;
    for _ in 0..4 {
        assert_eq!(status(&mut svc, keyed("c")).await.status(), 200);
    }
}

#[tokio::test(start_paused = true)]
async fn wait_mode_paces_requests_up_to_the_maximum_wait() {
    let layer = RateLimitLayer::builder()
        .limits(Limits::new().requests(Quota::per_second(1).burst(1)))
        .mode(Mode::Wait(Duration::from_millis(1500)))
        .build()
        .unwrap();
    let mut svc = in_process(&layer);
    let start = Instant::now();
    let mut at = Vec::new();
    for _ in 0..3 {
        let res = status(&mut svc, keyed("w")).await;
        assert_eq!(res.status(), 200);
        at.push(Instant::now() - start);
    }
    assert_eq!(
        at,
        [
            Duration::ZERO,
            Duration::from_secs(1),
            Duration::from_secs(2)
        ]
    );
    // Three callers at once: the third would wait 2 s, more than 1.5 s.
    tokio::time::advance(Duration::from_secs(1)).await;
    let (a, b, c) = tokio::join!(
        svc.clone().oneshot(keyed("w")),
        svc.clone().oneshot(keyed("w")),
        svc.clone().oneshot(keyed("w")),
    );
    let statuses = [a, b, c].map(|r| r.unwrap().status().as_u16());
    let mut sorted = statuses;
    sorted.sort();
    assert_eq!(sorted, [200, 200, 429], "{statuses:?}");
}

#[tokio::test(start_paused = true)]
async fn idle_keys_are_swept_on_the_layers_own_schedule() {
    let layer = RateLimitLayer::builder()
        .limits(Limits::new().requests(Quota::per_second(1).burst(2)))
        .sweep(100, Duration::from_secs(5))
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = in_process(&layer);
    for i in 0..1000 {
        assert_eq!(
            status(&mut svc, keyed(&format!("k{i}"))).await.status(),
            200
        );
    }
    assert_eq!(handle.tracked_keys(), 1000);
    // Not yet full again: nothing to forget.
    handle.sweep();
    assert_eq!(handle.tracked_keys(), 1000);
    tokio::time::advance(Duration::from_secs(10)).await;
    // The next hundred admissions on this thread include a sweep.
    for _ in 0..100 {
        tokio::time::advance(Duration::from_millis(1)).await;
        status(&mut svc, keyed("fresh")).await;
    }
    assert_eq!(handle.tracked_keys(), 1);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_response_future_releases_the_slot() {
    let layer = RateLimitLayer::builder()
        .limits(Limits::new().concurrency(1))
        .build()
        .unwrap();
    let pending = tower::service_fn(|_req: http::Request<Full<Bytes>>| async {
        std::future::pending::<Result<http::Response<Full<Bytes>>, Infallible>>().await
    });
    let mut svc = tower::Layer::layer(&layer, pending);
    let mut first = Box::pin(svc.ready().await.unwrap().call(keyed("d")));
    let waker = futures_util::task::noop_waker();
    assert!(first
        .as_mut()
        .poll(&mut Context::from_waker(&waker))
        .is_pending());
    let mut second = Box::pin(svc.ready().await.unwrap().call(keyed("d")));
    match second.as_mut().poll(&mut Context::from_waker(&waker)) {
        Poll::Ready(Ok(res)) => assert_eq!(res.status(), 429),
        _ => panic!("the second request should be refused at once"),
    }
    drop(first);
    let mut third = Box::pin(svc.ready().await.unwrap().call(keyed("d")));
    assert!(third
        .as_mut()
        .poll(&mut Context::from_waker(&waker))
        .is_pending());
}

#[tokio::test(start_paused = true)]
async fn the_slot_lives_in_the_body_until_it_is_dropped() {
    let layer = RateLimitLayer::builder()
        .limits(Limits::new().concurrency(1))
        .build()
        .unwrap();
    let mut svc = in_process(&layer);
    let first = status(&mut svc, keyed("b")).await;
    assert!(first.body().holds_permit());
    assert_eq!(status(&mut svc, keyed("b")).await.status(), 429);
    // Reading the body to its end releases the slot.
    let body = first.into_body().collect().await.unwrap();
    assert!(body.to_bytes().is_empty());
    let second = status(&mut svc, keyed("b")).await;
    assert_eq!(second.status(), 200);
    drop(second);
    assert_eq!(status(&mut svc, keyed("b")).await.status(), 200);
}

#[tokio::test(start_paused = true)]
async fn a_global_quota_applies_to_all_keys_together() {
    let layer = RateLimitLayer::builder()
        .limits(Limits::new().requests(Quota::per_second(10).burst(3)))
        .global(Limits::new().requests(Quota::per_second(1).burst(4)))
        .build()
        .unwrap();
    let mut svc = in_process(&layer);
    let mut ok = 0;
    for key in ["a", "a", "a", "a", "b", "b", "c"] {
        if status(&mut svc, keyed(key)).await.status() == 200 {
            ok += 1;
        }
    }
    // a: 3 (its own burst), b: 1 (the global burst of 4 is spent), c: 0.
    assert_eq!(ok, 4);
    // The key refused by its own bucket gave its global cell back: b got it.
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(status(&mut svc, keyed("c")).await.status(), 200);
}

#[tokio::test]
async fn requests_without_a_key_share_the_anonymous_bucket() {
    let layer = per_key(Quota::per_hour(1).burst(1));
    let mut svc = in_process(&layer);
    let anon = || {
        http::Request::post("/")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    assert_eq!(status(&mut svc, anon()).await.status(), 200);
    assert_eq!(status(&mut svc, anon()).await.status(), 429);
    let mut req = anon();
    req.extensions_mut().insert(KeyIdentity::new("named"));
    assert_eq!(status(&mut svc, req).await.status(), 200);
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Splitting an SSE stream anywhere gives the same correction as one chunk, and odd
        /// bytes never panic.
        #[test]
        fn sse_usage_is_read_whatever_the_chunking(cuts in proptest::collection::vec(0usize..400, 0..8), noise in proptest::collection::vec(any::<u8>(), 0..64)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
            rt.block_on(async {
                let mut text = Vec::from(&b"data: {\"choices\":[]}\n\n"[..]);
                text.extend_from_slice(&noise);
                text.extend_from_slice(b"\n\ndata: {\"choices\":[],\"usage\":{\"total_tokens\":40}}\r\n\r\ndata: [DONE]\n\n");
                let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(text.len())).collect();
                cuts.sort();
                let mut chunks = Vec::new();
                let mut prev = 0;
                for c in cuts.into_iter().chain([text.len()]) {
                    chunks.push(Bytes::copy_from_slice(&text[prev..c]));
                    prev = c;
                }
                let layer = RateLimitLayer::builder()
                    .limits(Limits::new().tokens(Quota::per_hour(1000).burst(1000)))
                    .build()
                    .unwrap();
                let upstream = tower::service_fn(move |_req: http::Request<Full<Bytes>>| {
                    let chunks = chunks.clone();
                    async move {
                        let stream = futures_util::stream::iter(
                            chunks.into_iter().map(Ok::<_, Infallible>),
                        );
                        Ok::<_, Infallible>(
                            http::Response::builder()
                                .header("content-type", "text/event-stream")
                                .body(axum::body::Body::from_stream(stream))
                                .unwrap(),
                        )
                    }
                });
                let mut svc = tower::Layer::layer(&layer, upstream);
                let body = Bytes::from(chat("hi", 500));
                let mut req = http::Request::post("/v1/chat/completions").body(Full::new(body.clone())).unwrap();
                req.extensions_mut().insert(KeyIdentity::new("p"));
                let res = svc.ready().await.unwrap().call(req).await.unwrap();
                res.into_body().collect().await.unwrap();
                let mut req = http::Request::post("/v1/chat/completions").body(Full::new(body)).unwrap();
                req.extensions_mut().insert(KeyIdentity::new("p"));
                let res = svc.ready().await.unwrap().call(req).await.unwrap();
                // 1000 - 40 - 505, unless the noise itself reported a larger usage (it cannot:
                // random bytes do not form `"usage"` JSON with a total).
                prop_assert_eq!(&res.headers()["x-ratelimit-remaining-tokens"], "455");
                Ok(())
            })?;
        }
    }
}

fn chat_request(key: &str, model: &str, max_tokens: u64) -> http::Request<Full<Bytes>> {
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
    })
    .to_string();
    let mut req = http::Request::post("/v1/chat/completions")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    req.extensions_mut()
        .insert(KeyIdentity::new(key.to_owned()));
    req
}

#[tokio::test(start_paused = true)]
async fn retry_after_covers_every_bucket_the_request_needs() {
    let layer = RateLimitLayer::builder()
        .limits(
            Limits::new()
                .requests(Quota::per_second(1).burst(1))
                .tokens(Quota::per_second(1000).burst(1000)),
        )
        .build()
        .unwrap();
    let mut svc = in_process(&layer);
    let res = status(&mut svc, chat_request("m", "gpt", 500)).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-ratelimit-remaining-tokens"], "495");
    assert_eq!(res.headers()["x-ratelimit-remaining-requests"], "0");
    drop(res);
    // The token bucket alone would admit this in 10 ms; the request bucket needs 1 s.
    let res = status(&mut svc, chat_request("m", "gpt", 500)).await;
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["retry-after-ms"], "1000");
    tokio::time::advance(Duration::from_millis(999)).await;
    assert_eq!(
        status(&mut svc, chat_request("m", "gpt", 500))
            .await
            .status(),
        429
    );
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(
        status(&mut svc, chat_request("m", "gpt", 500))
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn keys_by_model_route_header_and_closure() {
    let one = Limits::new().requests(Quota::per_hour(1).burst(1));
    let run = |key_by: KeyBy| async move {
        let layer = RateLimitLayer::builder()
            .key_by(key_by)
            .limits(one)
            .build()
            .unwrap();
        let mut svc = in_process(&layer);
        let mut out = Vec::new();
        for (model, path, user) in [
            ("a", "/v1/chat/completions", "u1"),
            ("a", "/v1/embeddings", "u2"),
            ("b", "/v1/chat/completions", "u2"),
        ] {
            let mut req = chat_request("same-key", model, 10);
            *req.uri_mut() = path.parse().unwrap();
            req.headers_mut().insert("x-user", user.parse().unwrap());
            out.push(status(&mut svc, req).await.status().as_u16());
        }
        out
    };
    assert_eq!(run(KeyBy::model()).await, [200, 429, 200]);
    assert_eq!(run(KeyBy::route()).await, [200, 200, 429]);
    assert_eq!(
        run(KeyBy::header(http::HeaderName::from_static("x-user"))).await,
        [200, 200, 429]
    );
    assert_eq!(
        run(KeyBy::custom(|src| {
            Some(src.uri().path().rsplit('/').next()?.into())
        }))
        .await,
        [200, 200, 429]
    );
    assert_eq!(run(KeyBy::api_key()).await, [200, 429, 429]);
}
