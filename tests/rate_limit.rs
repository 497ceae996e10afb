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
use llm_layers::rate_limit::{BucketKey, Limits, OnLimit, Quota, RateLimitLayer};
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
async fn an_upstream_server_error_keeps_its_charge() {
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
    // The 502 may have come after the upstream did the work: its 505 stay, and 495 are too
    // few for the next request.
    assert_eq!(res.status(), 429);
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
        .key_by(BucketKey::client_ip_from(connect_info).trusted_proxies(["127.0.0.0/8"]))
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
        .key_by(BucketKey::client_ip_from(connect_info))
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
        .key_by(BucketKey::client_ip().trusted_proxies(["10.0.0.0/40"]))
        .limits(Limits::new().concurrency(1)));
    assert!(
        e.contains("trusted_proxies") && e.contains("10.0.0.0/40"),
        "{e}"
    );
    let e = err(RateLimitLayer::builder()
        .mode(OnLimit::Wait(Duration::ZERO))
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
        .mode(OnLimit::Wait(Duration::from_millis(1500)))
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
    let pending = tower::service_fn(|_req: http::Request<Inner>| async {
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
                let upstream = tower::service_fn(move |_req: http::Request<Inner>| {
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
    let run = |key_by: BucketKey| async move {
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
    assert_eq!(run(BucketKey::model()).await, [200, 429, 200]);
    assert_eq!(run(BucketKey::route()).await, [200, 200, 429]);
    assert_eq!(
        run(BucketKey::header(http::HeaderName::from_static("x-user"))).await,
        [200, 200, 429]
    );
    assert_eq!(
        run(BucketKey::custom(|src| {
            Some(src.uri().path().rsplit('/').next()?.into())
        }))
        .await,
        [200, 200, 429]
    );
    assert_eq!(run(BucketKey::api_key()).await, [200, 429, 429]);
}

// ---------------------------------------------------------------------------------------------
// Hostile traffic and broken upstreams.

/// Which limits a response reports: the upstream's figures on the upstream's answers, the
/// layer's own under the standard names only where they cannot be taken for the upstream's.
#[tokio::test]
async fn an_upstream_answer_keeps_its_own_rate_limit_headers() {
    let addr = serve(per_key(Quota::per_minute(60).burst(5)), Upstream::default()).await;
    let url = format!("http://{addr}/v1/status");
    let c = client();
    let send = |status: u16, upstream_limits: bool| {
        let mut req = c
            .post(&url)
            .bearer_auth("h1")
            .header("x-status", status.to_string())
            .body("{}");
        if upstream_limits {
            req = req.header("x-upstream-limits", "1");
        }
        req.send()
    };
    let own = |res: &reqwest::Response| {
        res.headers()
            .get("x-llm-layers-ratelimit-remaining-requests")
            .map(|v| v.to_str().unwrap().to_owned())
    };

    // The upstream's 429 with its own figures: the client reads the upstream's, not "4 left".
    let res = send(429, true).await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(header(&res, "x-ratelimit-limit-requests"), "500");
    assert_eq!(header(&res, "x-ratelimit-remaining-requests"), "0");
    assert_eq!(header(&res, "x-ratelimit-reset-requests"), "6m0s");
    assert_eq!(own(&res).as_deref(), Some("4"));
    assert_eq!(header(&res, "x-llm-layers-ratelimit-limit-requests"), "5");
    assert!(res
        .headers()
        .contains_key("x-llm-layers-ratelimit-reset-requests"));

    // An upstream error without figures: nothing of the layer's under the standard names.
    let res = send(503, false).await.unwrap();
    assert_eq!(res.status(), 503);
    assert!(res
        .headers()
        .get("x-ratelimit-remaining-requests")
        .is_none());
    assert!(res.headers().get("x-ratelimit-limit-requests").is_none());
    assert_eq!(own(&res).as_deref(), Some("3"));

    // A success that carries the upstream's figures keeps them.
    let res = send(200, true).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "x-ratelimit-remaining-requests"), "0");
    assert_eq!(header(&res, "x-ratelimit-limit-requests"), "500");
    assert_eq!(own(&res).as_deref(), Some("2"));

    // A success without figures of its own gets the layer's, under the standard names, once.
    let res = send(200, false).await.unwrap();
    assert_eq!(header(&res, "x-ratelimit-remaining-requests"), "1");
    assert_eq!(header(&res, "x-ratelimit-limit-requests"), "5");
    assert_eq!(own(&res), None);
    send(200, false).await.unwrap();

    // The layer's own refusal reports its own bucket under the standard names.
    let res = send(200, true).await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(header(&res, "x-ratelimit-limit-requests"), "5");
    assert_eq!(header(&res, "x-ratelimit-remaining-requests"), "0");
    assert_eq!(own(&res), None);
    let (code, _) = error_code(res).await;
    assert_eq!(code, "rate_limit_exceeded");
}

fn tokens_1000_per_hour() -> RateLimitLayer {
    RateLimitLayer::builder()
        .limits(Limits::new().tokens(Quota::per_hour(1000).burst(1000)))
        .build()
        .unwrap()
}

/// The tokens left for `key` after its earlier requests, read from a probe that costs 105.
async fn tokens_left(c: &reqwest::Client, addr: SocketAddr, key: &str) -> String {
    let res = c
        .post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth(key)
        .body(chat("hi", 100))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "probe for {key}");
    let left = header(&res, "x-ratelimit-remaining-tokens").to_owned();
    res.bytes().await.unwrap();
    left
}

#[tokio::test]
async fn error_answers_keep_the_charge_when_the_upstream_may_have_worked() {
    let addr = serve(tokens_1000_per_hour(), Upstream::default()).await;
    let c = client();
    // Each request costs 105 ("hi" + max_tokens 100). Kept: 1000 - 105 - 105 after the probe;
    // refunded: 1000 - 105.
    for (status, kept) in [
        (500, true),
        (502, true),
        (503, true),
        (504, true),
        (529, true),
        (408, true),
        (400, false),
        (401, false),
        (403, false),
        (404, false),
        (413, false),
        (422, false),
        (429, false),
    ] {
        let key = format!("e{status}");
        let res = c
            .post(format!("http://{addr}/v1/status"))
            .bearer_auth(&key)
            .header("x-status", status.to_string())
            .body(chat("hi", 100))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), status);
        res.bytes().await.unwrap();
        let expected = if kept { "790" } else { "895" };
        assert_eq!(
            tokens_left(&c, addr, &key).await,
            expected,
            "status {status}"
        );
    }

    // A refusal made inside the gateway before the upstream was called is refunded, whatever
    // its status.
    let res = c
        .post(format!("http://{addr}/v1/refused-locally"))
        .bearer_auth("local")
        .body(chat("hi", 100))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    res.bytes().await.unwrap();
    assert_eq!(tokens_left(&c, addr, "local").await, "895");
}

#[tokio::test]
async fn a_stream_cut_midway_keeps_its_charge_and_pays_its_overrun() {
    let up = Upstream::default();
    let addr = serve(tokens_1000_per_hour(), up.clone()).await;
    let c = client();
    for (key, usage, expected) in [
        // 11 tokens reported before the cut: the upstream was still working; 105 stays.
        ("cut-small", 11, "790"),
        // 300 reported before the cut: more than the 105 charged, so 300.
        ("cut-large", 300, "595"),
    ] {
        let res = c
            .post(format!("http://{addr}/v1/cut"))
            .bearer_auth(key)
            .header("x-usage", usage.to_string())
            .body(chat("hi", 100))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        up.release.notify_one();
        assert!(res.bytes().await.is_err(), "the stream breaks off");
        assert_eq!(tokens_left(&c, addr, key).await, expected, "{key}");
    }
}

#[tokio::test(start_paused = true)]
async fn an_inner_service_error_keeps_the_charge() {
    let layer = tokens_1000_per_hour();
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = calls.clone();
    let inner = tower::service_fn(move |_req: http::Request<Inner>| {
        let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            if n == 0 {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the upstream did not answer",
                ))
            } else {
                Ok(http::Response::new(Full::new(Bytes::new())))
            }
        }
    });
    let mut svc = tower::Layer::layer(&layer, inner);
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(chat_request("t", "gpt", 100))
        .await;
    assert!(err.is_err());
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(chat_request("t", "gpt", 100))
        .await
        .unwrap();
    assert_eq!(res.headers()["x-ratelimit-remaining-tokens"], "790");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
}

/// An inner service answering SSE: with `x-hold` it sends one event, waits for `release`, then
/// reports `x-usage` tokens; otherwise a plain empty 200.
fn held_sse(
    release: std::sync::Arc<tokio::sync::Notify>,
) -> impl Service<
    http::Request<Inner>,
    Response = http::Response<axum::body::Body>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    tower::service_fn(move |req: http::Request<Inner>| {
        let release = release.clone();
        async move {
            if !req.headers().contains_key("x-hold") {
                return Ok(http::Response::new(axum::body::Body::empty()));
            }
            let usage: u64 = req.headers()["x-usage"].to_str().unwrap().parse().unwrap();
            let stream = futures_util::stream::unfold(0u8, move |step| {
                let release = release.clone();
                async move {
                    let chunk = match step {
                        0 => "data: {\"choices\":[]}\n\n".to_owned(),
                        1 => {
                            release.notified().await;
                            format!("data: {{\"choices\":[],\"usage\":{{\"total_tokens\":{usage}}}}}\n\ndata: [DONE]\n\n")
                        }
                        _ => return None,
                    };
                    Some((Ok::<_, Infallible>(Bytes::from(chunk)), step + 1))
                }
            });
            Ok::<_, Infallible>(
                http::Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(axum::body::Body::from_stream(stream))
                    .unwrap(),
            )
        }
    })
}

#[tokio::test(start_paused = true)]
async fn an_overrun_reported_after_a_sweep_is_still_charged() {
    let layer = RateLimitLayer::builder()
        .limits(Limits::new().tokens(Quota::per_second(1000).burst(1000)))
        .build()
        .unwrap();
    let handle = layer.handle();
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let mut svc = tower::Layer::layer(&layer, held_sse(release.clone()));
    let mut req = chat_request("s", "gpt", 100);
    req.headers_mut().insert("x-hold", "1".parse().unwrap());
    req.headers_mut().insert("x-usage", "800".parse().unwrap());
    let res = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(res.headers()["x-ratelimit-remaining-tokens"], "895");
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    // The 105 tokens come back within 105 ms: after a second the key is idle and swept, while
    // its stream is still open.
    tokio::time::advance(Duration::from_secs(1)).await;
    handle.sweep();
    assert_eq!(handle.tracked_keys(), 0);
    release.notify_one();
    while let Some(frame) = body.frame().await {
        frame.unwrap();
    }
    // 800 used, 105 charged: the 695 overrun is owed, then the probe's 105.
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(chat_request("s", "gpt", 100))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-ratelimit-remaining-tokens"], "200");
}

/// An inner service answering a JSON body whose `usage.total_tokens` is `usage` verbatim.
fn json_usage(
    usage: &'static str,
) -> impl Service<
    http::Request<Inner>,
    Response = http::Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    tower::service_fn(move |_req: http::Request<Inner>| async move {
        let body = format!(r#"{{"choices":[],"usage":{{"total_tokens":{usage}}}}}"#);
        Ok::<_, Infallible>(
            http::Response::builder()
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
                .unwrap(),
        )
    })
}

#[tokio::test(start_paused = true)]
async fn extreme_usage_figures_are_clamped_and_never_panic() {
    // `None`: the bucket is deep in debt, the probe is refused with a long wait.
    for (usage, left) in [
        ("18446744073709551615", None),
        ("1e300", None),
        ("123456789012345678901234567890", None),
        ("16777217", None),
        ("800", Some("95")),
        ("12.5", Some("882")),
        ("-5", Some("790")),
        ("-1e300", Some("790")),
        ("null", Some("790")),
        ("\"900\"", Some("790")),
    ] {
        let layer = RateLimitLayer::builder()
            .limits(Limits::new().tokens(Quota::per_second(1000).burst(1000)))
            .build()
            .unwrap();
        let mut svc = tower::Layer::layer(&layer, json_usage(usage));
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(chat_request("u", "gpt", 100))
            .await
            .unwrap();
        res.into_body().collect().await.unwrap();
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(chat_request("u", "gpt", 100))
            .await
            .unwrap();
        match left {
            Some(left) => {
                assert_eq!(res.status(), 200, "{usage}");
                assert_eq!(
                    res.headers()["x-ratelimit-remaining-tokens"],
                    left,
                    "{usage}"
                );
            }
            None => {
                assert_eq!(res.status(), 429, "{usage}");
                assert_eq!(res.headers()["x-ratelimit-remaining-tokens"], "0");
                let ms: u64 = res.headers()["retry-after-ms"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                // At most 2^24 tokens are owed: under 5 hours at 1000 a second.
                assert!(ms > 3_600_000 && ms <= 16_778_000, "{usage}: {ms}");
                assert_eq!(res.headers()["x-should-retry"], "false");
                // Time moves on; later requests are still decided without a panic.
                tokio::time::advance(Duration::from_secs(3600)).await;
                for _ in 0..3 {
                    let res = svc
                        .ready()
                        .await
                        .unwrap()
                        .call(chat_request("u", "gpt", 1))
                        .await
                        .unwrap();
                    assert_eq!(res.status(), 429);
                }
            }
        }
    }
}

#[tokio::test]
async fn ipv6_clients_are_keyed_by_prefix_and_mapped_ipv4_as_ipv4() {
    fn connect_info(ext: &http::Extensions) -> Option<std::net::IpAddr> {
        ext.get::<axum::extract::ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip())
    }
    let one = Limits::new().requests(Quota::per_hour(1).burst(1));
    let c = client();
    let statuses = |key_by: BucketKey, hops: &'static [&'static str]| {
        let c = c.clone();
        async move {
            let layer = RateLimitLayer::builder()
                .key_by(key_by)
                .limits(one)
                .build()
                .unwrap();
            let addr = serve(layer, Upstream::default()).await;
            let mut out = Vec::new();
            for hop in hops {
                let res = c
                    .post(format!("http://{addr}/v1/chat/completions"))
                    .header("x-forwarded-for", *hop)
                    .body("{}")
                    .send()
                    .await
                    .unwrap();
                out.push(res.status().as_u16());
            }
            out
        }
    };
    let trusted = || BucketKey::client_ip_from(connect_info).trusted_proxies(["127.0.0.0/8"]);
    // Default /64: one network is one client, whatever its interface ids.
    assert_eq!(
        statuses(
            trusted(),
            &[
                "2001:db8:1:2::1",
                "2001:db8:1:2:ffff:ffff:ffff:ffff",
                "[2001:db8:1:2::7]:443",
                "2001:db8:1:3::1",
                "9.9.9.9",
                "::ffff:9.9.9.9",
                "[::ffff:9.9.9.9]:80",
                "9.9.9.8",
            ]
        )
        .await,
        [200, 429, 429, 200, 200, 429, 429, 200]
    );
    assert_eq!(
        statuses(
            trusted().ipv6_prefix(128),
            &["2001:db8::1", "2001:db8::2", "2001:db8::1"]
        )
        .await,
        [200, 200, 429]
    );
    assert_eq!(
        statuses(
            trusted().ipv6_prefix(48),
            &["2001:db8:1:2::1", "2001:db8:1:3::1", "2001:db8:2::1"]
        )
        .await,
        [200, 429, 200]
    );
    let err = RateLimitLayer::builder()
        .key_by(BucketKey::client_ip().ipv6_prefix(129))
        .limits(one)
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "key_by.ipv6_prefix", "{err}");
}

#[tokio::test]
async fn model_keys_use_the_deployment_the_upstream_serves() {
    let layer = RateLimitLayer::builder()
        .key_by(BucketKey::model())
        .limits(Limits::new().requests(Quota::per_hour(1).burst(1)))
        .build()
        .unwrap();
    let mut svc = in_process(&layer);
    let mut out = Vec::new();
    for (path, model) in [
        (
            "/openai/deployments/prod/chat/completions?api-version=2024-06-01",
            "a",
        ),
        // Same deployment, another body model: the same bucket.
        ("/openai/deployments/prod/chat/completions", "b"),
        ("/openai/deployments/staging/chat/completions", "a"),
        // No deployment in the path: the body's model.
        ("/v1/chat/completions", "prod"),
    ] {
        let mut req = chat_request("k", model, 10);
        *req.uri_mut() = path.parse().unwrap();
        out.push(status(&mut svc, req).await.status().as_u16());
    }
    // A request without a body is keyed by its path's deployment too.
    for path in [
        "/openai/deployments/staging/files",
        "/openai/deployments/other/files",
    ] {
        let req = http::Request::get(path)
            .body(Full::new(Bytes::new()))
            .unwrap();
        out.push(status(&mut svc, req).await.status().as_u16());
    }
    assert_eq!(out, [200, 429, 200, 429, 429, 200]);
}

mod key_memory {
    //! Counts the bytes this thread holds, to see what keyed state costs.
    use super::*;
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static COUNTING: Cell<bool> = const { Cell::new(false) };
        static LIVE: Cell<i64> = const { Cell::new(0) };
    }

    pub struct Counting;

    // SAFETY: every call is forwarded unchanged to the system allocator; the wrapper only adds
    // up the sizes allocated and freed on the current thread while counting is on. `try_with`
    // keeps it sound during thread teardown. Measuring memory needs a global allocator, and
    // that trait is unsafe to implement; the crate itself forbids unsafe code.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            if COUNTING.try_with(Cell::get).unwrap_or(false) {
                let _ = LIVE.try_with(|l| l.set(l.get() + layout.size() as i64));
            }
            unsafe { System.alloc(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            if COUNTING.try_with(Cell::get).unwrap_or(false) {
                let _ = LIVE.try_with(|l| l.set(l.get() - layout.size() as i64));
            }
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static GLOBAL: Counting = Counting;

    /// The bytes allocated and not freed by `f` on this thread.
    pub async fn retained<F: Future>(f: F) -> (F::Output, i64) {
        LIVE.with(|l| l.set(0));
        COUNTING.with(|c| c.set(true));
        let out = f.await;
        COUNTING.with(|c| c.set(false));
        (out, LIVE.with(Cell::get))
    }

    #[tokio::test(flavor = "current_thread")]
    async fn long_keys_cost_a_fixed_size_and_stay_distinct() {
        let layer = RateLimitLayer::builder()
            .key_by(BucketKey::header(http::HeaderName::from_static("x-user")))
            .limits(Limits::new().requests(Quota::per_hour(1).burst(1)))
            .build()
            .unwrap();
        let handle = layer.handle();
        let mut svc = in_process(&layer);
        let long = |i: usize| {
            let mut s = format!("{i:06}");
            s.push_str(&"m".repeat(600_000));
            s
        };
        // Warm up the maps so their first allocations are not counted.
        for i in 0..64 {
            let mut req = keyed("w");
            req.headers_mut()
                .insert("x-user", format!("warm{i}").parse().unwrap());
            status(&mut svc, req).await;
        }
        let (statuses, bytes) = retained(async {
            let mut out = Vec::new();
            for i in 0..150 {
                let mut req = keyed("k");
                req.headers_mut().insert("x-user", long(i).parse().unwrap());
                out.push(status(&mut svc, req).await.status().as_u16());
            }
            out
        })
        .await;
        // 150 keys of 600 KB: 90 MB if stored as they came.
        assert!(bytes < 1 << 20, "{bytes} bytes retained");
        assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
        assert_eq!(handle.tracked_keys(), 64 + 150);
        // The same long key is the same bucket; one that differs only at its end is another.
        let mut req = keyed("k");
        req.headers_mut().insert("x-user", long(7).parse().unwrap());
        assert_eq!(status(&mut svc, req).await.status(), 429);
        let mut other = long(7);
        other.push('x');
        let mut req = keyed("k");
        req.headers_mut().insert("x-user", other.parse().unwrap());
        assert_eq!(status(&mut svc, req).await.status(), 200);
    }
}

#[tokio::test(start_paused = true)]
async fn idle_keys_are_evicted_as_new_ones_arrive_without_a_sweep() {
    // No scheduled sweep at all: only eviction on insertion keeps the map small.
    let layer = RateLimitLayer::builder()
        .limits(Limits::new().requests(Quota::per_second(1000).burst(1)))
        .sweep(u64::MAX, Duration::MAX)
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = in_process(&layer);
    for i in 0..20_000 {
        // Each key is full again 1 ms after its request.
        tokio::time::advance(Duration::from_millis(2)).await;
        assert_eq!(
            status(&mut svc, keyed(&format!("k{i}"))).await.status(),
            200
        );
    }
    let held = handle.tracked_keys();
    assert!(held <= 4096, "{held} keys held");
    // Keys still in use are never evicted: a burst of 1 stays spent.
    for i in 0..100 {
        assert_eq!(
            status(&mut svc, keyed(&format!("live{i}"))).await.status(),
            200
        );
    }
    for i in 0..5000 {
        status(&mut svc, keyed(&format!("more{i}"))).await;
    }
    for i in 0..100 {
        assert_eq!(
            status(&mut svc, keyed(&format!("live{i}"))).await.status(),
            429
        );
    }
}

mod logs {
    use super::*;
    use std::io;
    use std::sync::{Arc, Mutex, OnceLock};
    use tracing_subscriber::fmt::MakeWriter;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    struct Writer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Writer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Capture {
        type Writer = Writer;
        fn make_writer(&'a self) -> Writer {
            Writer(self.0.clone())
        }
    }

    /// A global subscriber (a thread-local one races with callsite registration by the tests
    /// beside this one) that keeps everything.
    fn capture() -> &'static Capture {
        static CAPTURE: OnceLock<Capture> = OnceLock::new();
        CAPTURE.get_or_init(|| {
            let capture = Capture::default();
            let subscriber = tracing_subscriber::fmt()
                .with_writer(capture.clone())
                .with_max_level(tracing::Level::TRACE)
                .with_ansi(false)
                .finish();
            tracing::subscriber::set_global_default(subscriber).unwrap();
            capture
        })
    }

    #[tokio::test]
    async fn refusals_are_logged_with_client_strings_escaped() {
        let capture = capture();
        let one = Limits::new().requests(Quota::per_hour(1).burst(1));
        let forged = "evil\n2026-01-01T00:00:00Z ERROR forged: admin logged in";
        let layer = RateLimitLayer::builder()
            .key_by(BucketKey::model())
            .limits(one)
            .build()
            .unwrap();
        let mut svc = in_process(&layer);
        for _ in 0..2 {
            status(&mut svc, chat_request("k", forged, 10)).await;
        }
        // A key past `max_key_len` is logged as the start of its digest, not as itself.
        let long = format!("long-model-{}", "q".repeat(1000));
        for _ in 0..2 {
            status(&mut svc, chat_request("k", &long, 10)).await;
        }
        // A header value may be a credential: it is never logged.
        let secret = "sk-header-secret-0123456789abcdef";
        let layer = RateLimitLayer::builder()
            .key_by(BucketKey::header(http::HeaderName::from_static("x-user")))
            .limits(one)
            .build()
            .unwrap();
        let mut svc = in_process(&layer);
        let mut statuses = Vec::new();
        for _ in 0..2 {
            let mut req = keyed("k");
            req.headers_mut().insert("x-user", secret.parse().unwrap());
            statuses.push(status(&mut svc, req).await.status().as_u16());
        }
        assert_eq!(statuses, [200, 429]);
        let text = String::from_utf8_lossy(&capture.0.lock().unwrap()).into_owned();
        let refusal = text
            .lines()
            .find(|l| l.contains("evil"))
            .unwrap_or_else(|| panic!("no refusal logged:\n{text}"));
        assert!(refusal.contains(r"evil\n2026"), "{refusal}");
        assert!(refusal.contains("rate_limit_exceeded"), "{refusal}");
        assert!(
            !text.lines().any(|l| l.starts_with("2026-01-01T00:00:00Z")),
            "{text}"
        );
        assert!(!text.contains(secret), "{text}");
        assert!(!text.contains("long-model-"), "{text}");
        assert!(
            text.lines()
                .any(|l| l.contains("key_by=\"model\"") && l.contains("key=sha256:")),
            "{text}"
        );
        assert!(text.contains("key_by=\"header\""), "{text}");
    }
}

/// Every numeric setter at its extremes: the builder says Ok or names the field, and what it
/// built decides requests (with extreme costs, key limits and usage) without a panic. Run in
/// debug builds, where arithmetic overflow panics.
#[tokio::test(start_paused = true)]
async fn builder_extremes_build_or_name_the_field_and_never_panic() {
    use llm_layers::ext::KeyLimits;
    use llm_layers::rate_limit::RateLimitLayerBuilder;

    const COUNTS: [u64; 5] = [0, 1, 60, u32::MAX as u64, u64::MAX];
    const BURSTS: [u32; 4] = [0, 1, 1000, u32::MAX];
    let periods = [
        Duration::ZERO,
        Duration::from_nanos(1),
        Duration::from_secs(1),
        Duration::from_secs(3600),
        Duration::MAX,
    ];
    let mut quotas = Vec::new();
    for &n in &COUNTS {
        for &b in &BURSTS {
            quotas.push(Quota::per_second(n).burst(b));
            quotas.push(Quota::per_minute(n).burst(b));
            quotas.push(Quota::per_hour(n).burst(b));
            for &p in &periods {
                quotas.push(Quota::new(n, p).burst(b));
            }
        }
    }

    let mut built = 0;
    let mut check = |b: RateLimitLayerBuilder, field: &str| match b.build() {
        Ok(layer) => {
            built += 1;
            Some(layer)
        }
        Err(e) => {
            assert!(
                e.field().starts_with(field),
                "{e}: the field should start with {field:?}"
            );
            assert!(!e.message().is_empty());
            None
        }
    };
    let mut layers = Vec::new();
    for q in &quotas {
        for (limits, field) in [
            (Limits::new().requests(*q), "limits.requests"),
            (Limits::new().tokens(*q), "limits.tokens"),
        ] {
            layers.extend(check(RateLimitLayer::builder().limits(limits), field));
        }
        layers.extend(check(
            RateLimitLayer::builder().global(Limits::new().tokens(*q).requests(*q)),
            "global.",
        ));
        layers.extend(check(
            RateLimitLayer::builder().tier("t", Limits::new().tokens(*q)),
            "tier[\"t\"].tokens",
        ));
    }
    let base = || {
        RateLimitLayer::builder().limits(Limits::new().requests(Quota::per_second(10).burst(10)))
    };
    for c in [0, 1, u32::MAX] {
        layers.extend(check(
            base().limits(Limits::new().concurrency(c)),
            "limits.concurrency",
        ));
        layers.extend(check(
            base().global(Limits::new().concurrency(c)),
            "global.concurrency",
        ));
    }
    for every in [0, 1, u64::MAX] {
        for interval in [Duration::ZERO, Duration::from_nanos(1), Duration::MAX] {
            layers.extend(check(base().sweep(every, interval), "sweep."));
        }
    }
    for limit in [0, 1, usize::MAX] {
        layers.extend(check(
            base()
                .limits(Limits::new().tokens(Quota::per_second(10).burst(10)))
                .body_limit(limit),
            "body_limit",
        ));
    }
    for wait in [Duration::ZERO, Duration::from_nanos(1), Duration::MAX] {
        layers.extend(check(base().mode(OnLimit::Wait(wait)), "mode"));
    }
    for len in [0, 1, 32, usize::MAX] {
        layers.extend(check(base().max_key_len(len), "max_key_len"));
    }
    for prefix in [0, 1, 64, 128, 129, u8::MAX] {
        layers.extend(check(
            base().key_by(BucketKey::client_ip().ipv6_prefix(prefix)),
            "key_by.ipv6_prefix",
        ));
    }
    // Keys' own limits at their extremes, on a layer that honours them.
    layers.extend(check(
        RateLimitLayer::builder()
            .key_limits(true)
            .limits(Limits::new().tokens(Quota::per_second(1000).burst(1000))),
        "",
    ));
    assert!(built > 50, "only {built} configurations built");

    let own_limits = [
        KeyLimits::new(),
        KeyLimits::new()
            .requests_per_minute(0)
            .tokens_per_minute(0)
            .concurrency(0),
        KeyLimits::new()
            .requests_per_minute(1)
            .tokens_per_minute(1)
            .concurrency(1),
        KeyLimits::new()
            .requests_per_minute(u32::MAX)
            .tokens_per_minute(u32::MAX as u64)
            .concurrency(u32::MAX),
        KeyLimits::new().tokens_per_minute(u64::MAX),
    ];
    for layer in &layers {
        for usage in ["18446744073709551615", "0", "7"] {
            let mut svc = tower::Layer::layer(layer, json_usage(usage));
            for (i, limits) in own_limits.iter().enumerate() {
                for max_tokens in [0, 1, u64::MAX] {
                    let mut req = chat_request("x", "gpt", max_tokens);
                    let ident = KeyIdentity::new(format!("x{i}")).with_limits(*limits);
                    req.extensions_mut().insert(ident);
                    req.extensions_mut().insert(SocketAddr::from((
                        [0x2001, 0xdb8, 0, 0, 0, 0, 0, i as u16],
                        1,
                    )));
                    let res = svc.ready().await.unwrap().call(req).await.unwrap();
                    let status = res.status().as_u16();
                    assert!([200, 413, 429].contains(&status), "{status} from {layer:?}");
                    res.into_body().collect().await.unwrap();
                }
            }
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        layer.handle().sweep();
    }
}

/// The TOML stack's rate-limit keys at their extremes: the stack builds, or its error names the
/// key.
#[cfg(feature = "config")]
#[tokio::test(start_paused = true)]
async fn toml_rate_limit_keys_at_their_extremes() {
    use llm_layers::stack::Stack;

    let big = [
        "0".to_owned(),
        "1".to_owned(),
        u32::MAX.to_string(),
        u64::MAX.to_string(),
    ];
    let mut cases = Vec::new();
    for v in &big {
        for section in ["defaults", "tiers.free"] {
            cases.push((
                format!("[rate_limit.{section}]\nrpm = {v}\n"),
                section,
                "rpm",
            ));
            cases.push((
                format!("[rate_limit.{section}]\ntpm = {v}\n"),
                section,
                "tpm",
            ));
            cases.push((
                format!("[rate_limit.{section}]\nconcurrency = {v}\n"),
                section,
                "concurrency",
            ));
            for rpm in ["1", "60", "4294967295"] {
                cases.push((
                    format!("[rate_limit.{section}]\nrpm = {rpm}\nburst = {v}\n"),
                    section,
                    "burst",
                ));
            }
        }
        cases.push((format!("[rate_limit]\nwait_ms = {v}\n"), "", "wait_ms"));
    }
    let mut built = 0;
    for (text, section, key) in &cases {
        match Stack::from_toml_str(text) {
            Ok(stack) => {
                built += 1;
                let mut svc = tower::Layer::layer(&stack.rate_limit(), json_usage("7"));
                for max_tokens in [1, u64::MAX] {
                    let res = svc
                        .ready()
                        .await
                        .unwrap()
                        .call(chat_request("t", "gpt", max_tokens))
                        .await
                        .unwrap();
                    assert!([200, 429].contains(&res.status().as_u16()), "{text}");
                }
            }
            Err(e) => {
                let field = if section.is_empty() {
                    format!("rate_limit.{key}")
                } else {
                    format!("rate_limit.{section}.{key}")
                };
                // A value too large for the key's type is refused by the parser, naming the key.
                assert!(
                    e.field() == field || e.field().ends_with(key),
                    "{text}: {e} (field {:?})",
                    e.field()
                );
            }
        }
    }
    assert!(built > 10, "{built}");
    // The case that overflowed: one request a minute with a burst that takes millennia to
    // refill.
    let err =
        Stack::from_toml_str("[rate_limit.defaults]\nrpm = 1\nburst = 4294967295\n").unwrap_err();
    assert_eq!(err.field(), "rate_limit.defaults.burst", "{err}");
}

// ---------------------------------------------------------------------------------------------
// Readiness: the slow work comes before the inner service is asked to be ready.

mod readiness {
    use super::*;

    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    use futures_util::FutureExt;
    use http_body::Frame;
    use llm_layers::body::LayerBody;
    use tower::limit::ConcurrencyLimitLayer;
    use tower::ServiceBuilder;

    type Chunk = Result<Frame<Bytes>, Infallible>;

    /// A request body fed through a channel: it ends when the sender is dropped.
    fn upload() -> (
        tokio::sync::mpsc::UnboundedSender<Chunk>,
        impl http_body::Body<Data = Bytes, Error = Infallible> + Send + Unpin,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Chunk>();
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|chunk| (chunk, rx))
        });
        (tx, http_body_util::StreamBody::new(Box::pin(stream)))
    }

    fn data(s: &str) -> Chunk {
        Ok(Frame::data(Bytes::from(s.to_owned())))
    }

    /// An inner service that reads the body it is handed and answers with it.
    async fn echo<B>(req: http::Request<B>) -> Result<http::Response<Full<Bytes>>, Infallible>
    where
        B: http_body::Body,
        B::Error: std::fmt::Debug,
    {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        Ok(http::Response::new(Full::new(body)))
    }

    fn chat_post<B>(body: B) -> http::Request<B> {
        http::Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(body)
            .unwrap()
    }

    /// Behind `ConcurrencyLimit(1)` inside the layer, a request whose body is still being
    /// uploaded (read by the layer for its token estimate) does not hold the inner slot: a
    /// second request completes meanwhile, and the first completes, intact, once its upload
    /// ends.
    #[tokio::test(start_paused = true)]
    async fn an_upload_read_for_its_token_estimate_does_not_hold_the_inner_slot() {
        let layer = RateLimitLayer::builder()
            .limits(Limits::new().tokens(Quota::per_minute(100_000).burst(100_000)))
            .build()
            .unwrap();
        let svc = ServiceBuilder::new()
            .layer(layer)
            .layer(ConcurrencyLimitLayer::new(1))
            .service(tower::service_fn(echo));

        let (slow_tx, slow_body) = upload();
        slow_tx.send(data(r#"{"model":"gpt-4o","#)).unwrap();
        let mut first = Box::pin(svc.clone().oneshot(chat_post(slow_body)));
        assert!((&mut first).now_or_never().is_none(), "still uploading");

        let full = chat(&"x".repeat(40), 10);
        let (tx, body) = upload();
        tx.send(data(&full)).unwrap();
        drop(tx);
        let second = tokio::time::timeout(
            Duration::from_secs(60),
            svc.clone().oneshot(chat_post(body)),
        )
        .await
        .expect("the second request is not held up by the first one's upload")
        .unwrap();
        assert_eq!(second.status(), 200);
        assert!(second
            .headers()
            .contains_key("x-ratelimit-remaining-tokens"));
        assert_eq!(second.into_body().collect().await.unwrap().to_bytes(), full);
        assert!(
            (&mut first).now_or_never().is_none(),
            "the first is still uploading"
        );

        let rest = r#""messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#;
        slow_tx.send(data(rest)).unwrap();
        drop(slow_tx);
        let first = first.await.unwrap();
        assert_eq!(first.status(), 200);
        assert_eq!(
            first.into_body().collect().await.unwrap().to_bytes(),
            format!(r#"{{"model":"gpt-4o",{rest}"#)
        );
    }

    /// Behind `ConcurrencyLimit(1)` inside the layer, a request waiting for its bucket in
    /// `OnLimit::Wait` does not hold the inner slot: another key's request completes while it
    /// waits, and the waiting one is admitted when its bucket has room.
    #[tokio::test(start_paused = true)]
    async fn a_request_waiting_for_its_bucket_does_not_hold_the_inner_slot() {
        let layer = RateLimitLayer::builder()
            .key_by(BucketKey::header(http::HeaderName::from_static("x-user")))
            .limits(Limits::new().requests(Quota::per_minute(60).burst(1)))
            .mode(OnLimit::Wait(Duration::from_secs(5)))
            .build()
            .unwrap();
        let svc = ServiceBuilder::new()
            .layer(layer)
            .layer(ConcurrencyLimitLayer::new(1))
            .service(tower::service_fn(echo));
        let from = |user: &str| {
            http::Request::post("/v1/chat/completions")
                .header("x-user", user)
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap()
        };

        let res = svc.clone().oneshot(from("a")).await.unwrap();
        assert_eq!(res.status(), 200);
        let start = Instant::now();
        let mut waiting = Box::pin(svc.clone().oneshot(from("a")));
        assert!(
            (&mut waiting).now_or_never().is_none(),
            "a's bucket is empty"
        );

        let other = svc
            .clone()
            .oneshot(from("b"))
            .now_or_never()
            .expect("b is not held up by a's wait")
            .unwrap();
        assert_eq!(other.status(), 200);
        assert!((&mut waiting).now_or_never().is_none(), "a still waits");

        let res = waiting.await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(Instant::now() - start, Duration::from_secs(1));
    }

    /// An inner service whose `poll_ready` fails while `fail` is set, counting its polls.
    #[derive(Clone)]
    struct Failing {
        fail: Arc<AtomicBool>,
        polls: Arc<AtomicUsize>,
    }

    impl Service<http::Request<LayerBody<Full<Bytes>>>> for Failing {
        type Response = http::Response<Full<Bytes>>;
        type Error = &'static str;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                Poll::Ready(Err("upstream pool closed"))
            } else {
                Poll::Ready(Ok(()))
            }
        }

        fn call(&mut self, _req: http::Request<LayerBody<Full<Bytes>>>) -> Self::Future {
            assert!(
                !self.fail.load(Ordering::SeqCst),
                "called after a poll_ready error"
            );
            std::future::ready(Ok(http::Response::new(Full::new(Bytes::new()))))
        }
    }

    /// The layer is ready without asking the inner service; the inner service's `poll_ready`
    /// error is the call's error, final (the service is not polled again), and the tokens the
    /// request was charged are given back: the request never left.
    #[tokio::test(start_paused = true)]
    async fn an_inner_poll_ready_error_is_the_calls_error() {
        let layer = RateLimitLayer::builder()
            .limits(Limits::new().tokens(Quota::per_hour(1000).burst(1000)))
            .build()
            .unwrap();
        let inner = Failing {
            fail: Arc::new(AtomicBool::new(true)),
            polls: Arc::new(AtomicUsize::new(0)),
        };
        let mut svc = tower::Layer::layer(&layer, inner.clone());

        svc.ready().await.expect("the layer's readiness is its own");
        assert_eq!(inner.polls.load(Ordering::SeqCst), 0);
        let err = svc
            .call(chat_request("k", "gpt-4o", 600))
            .await
            .unwrap_err();
        assert_eq!(err, "upstream pool closed");
        assert_eq!(inner.polls.load(Ordering::SeqCst), 1);

        // The 600-odd tokens came back: a second request of the same cost fits the bucket
        // of 1000 (it would be refused had the first kept its charge).
        inner.fail.store(false, Ordering::SeqCst);
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(chat_request("k", "gpt-4o", 600))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(inner.polls.load(Ordering::SeqCst), 2);
    }
}

// ---------------------------------------------------------------------------------------------
// Bodies: read only for a token estimate, and only when they may be JSON.

/// Under a token quota a JSON body is read for the estimate and handed on as the bytes read; a
/// body whose content type is not JSON (a multipart upload) is handed on unread and charged
/// nothing at admission; a body that says it is JSON and is not is handed on as the bytes
/// read, charged nothing at admission.
#[tokio::test(start_paused = true)]
async fn only_bodies_that_may_be_json_are_read_for_the_estimate() {
    let layer = RateLimitLayer::builder()
        .limits(Limits::new().tokens(Quota::per_hour(1000).burst(1000)))
        .build()
        .unwrap();
    let inner = tower::service_fn(|req: http::Request<Inner>| async move {
        let read = req.body().is_produced();
        let body = req.into_body().collect().await.unwrap().to_bytes();
        Ok::<_, Infallible>(
            http::Response::builder()
                .header("x-read", read.to_string())
                .body(Full::new(body))
                .unwrap(),
        )
    });
    let mut svc = tower::Layer::layer(&layer, inner);
    let mut call = |req| {
        let fut = svc.ready().now_or_never().unwrap().unwrap().call(req);
        async move {
            let res = fut.await.unwrap();
            let (parts, body) = res.into_parts();
            (parts, body.collect().await.unwrap().to_bytes())
        }
    };
    use futures_util::FutureExt;

    let (res, body) = call(chat_request("k", "gpt-4o", 10)).await;
    assert_eq!(res.status, 200);
    assert_eq!(res.headers["x-read"], "true");
    let remaining: u32 = res.headers["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(remaining < 1000 - 10, "{remaining}");
    assert!(body.starts_with(b"{\"m"), "{body:?}");

    let form = Bytes::from_static(
        b"--b\r\ncontent-disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--b--\r\n",
    );
    let mut upload = http::Request::post("/v1/audio/transcriptions")
        .header("content-type", "multipart/form-data; boundary=b")
        .body(Full::new(form.clone()))
        .unwrap();
    upload.extensions_mut().insert(KeyIdentity::new("k"));
    let (res, body) = call(upload).await;
    assert_eq!(res.status, 200);
    assert_eq!(res.headers["x-read"], "false");
    assert_eq!(
        res.headers["x-ratelimit-remaining-tokens"],
        remaining.to_string()
    );
    assert_eq!(body, form);

    let broken = http::Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{\"model\": ")))
        .unwrap();
    let (res, body) = call(broken).await;
    // Read for the estimate, found not to be JSON: handed on intact and charged nothing at
    // admission (the upstream refuses it; a validation layer would refuse it first).
    assert_eq!(res.status, 200);
    assert_eq!(res.headers["x-read"], "true");
    let after: u32 = res.headers["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        after >= remaining,
        "charged at admission: {after} < {remaining}"
    );
    assert_eq!(&body[..], b"{\"model\": ");
}
