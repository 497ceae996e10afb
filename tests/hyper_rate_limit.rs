//! The rate limit layer around a plain hyper 1 server's `Request<Incoming>`, in front of a
//! hyper-util client, with `tower::timeout::TimeoutLayer` between them: within the quota the
//! requests reach the upstream intact, past it the layer answers a `429` envelope with its
//! retry headers, and a token quota is charged from the parsed body.

#![cfg(feature = "rate-limit")]

mod common_hyper;

use std::net::SocketAddr;
use std::time::Duration;

use common_hyper::{echo_upstream, envelope_code, post, proxy_to, send, serve};
use http::HeaderName;
use llm_layers::rate_limit::{BucketKey, Limits, Quota, RateLimitLayer};
use llm_layers::request::{CharEstimator, Endpoint, RequestView};
use tower::timeout::TimeoutLayer;
use tower::ServiceBuilder;

/// A plain hyper server: the layer, a timeout, and a hyper-util client to `upstream`.
async fn gateway(layer: RateLimitLayer, upstream: SocketAddr) -> SocketAddr {
    let svc = ServiceBuilder::new()
        .layer(layer)
        .layer(TimeoutLayer::new(Duration::from_secs(30)))
        .service(proxy_to(upstream));
    serve(svc).await
}

fn by_key() -> BucketKey {
    BucketKey::header(HeaderName::from_static("authorization"))
}

fn chat(prompt: &str, max_tokens: u64) -> String {
    serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
    })
    .to_string()
}

fn header<'a>(headers: &'a http::HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
}

#[tokio::test]
async fn within_the_quota_requests_pass_intact_and_past_it_the_layer_answers_429() {
    let upstream = echo_upstream().await;
    let layer = RateLimitLayer::builder()
        .key_by(by_key())
        .limits(Limits::new().requests(Quota::per_minute(2).burst(2)))
        .build()
        .unwrap();
    let addr = gateway(layer, upstream.addr).await;
    let url = format!("http://{addr}/v1/chat/completions");
    let body = chat("Hello there", 16);

    for remaining in ["1", "0"] {
        let (status, headers, echoed) = send(post(&url, Some("sk-a"), &body)).await;
        assert_eq!(status, 200);
        let seen: serde_json::Value = serde_json::from_slice(&echoed).unwrap();
        assert_eq!(seen["path"], "/v1/chat/completions");
        assert_eq!(seen["authorization"], "Bearer sk-a");
        assert_eq!(seen["body"], body.as_str());
        assert_eq!(header(&headers, "x-ratelimit-limit-requests"), "2");
        assert_eq!(
            header(&headers, "x-ratelimit-remaining-requests"),
            remaining
        );
    }

    let (status, headers, answer) = send(post(&url, Some("sk-a"), &body)).await;
    assert_eq!(status, 429);
    assert_eq!(
        envelope_code(&answer).as_deref(),
        Some("rate_limit_exceeded")
    );
    assert_eq!(header(&headers, "retry-after"), "30");
    let ms: u64 = header(&headers, "retry-after-ms").parse().unwrap();
    assert!((29_000..=30_000).contains(&ms), "{ms}");
    assert_eq!(header(&headers, "x-should-retry"), "true");
    assert_eq!(header(&headers, "x-ratelimit-remaining-requests"), "0");
    assert_eq!(upstream.hits(), 2, "the refusal never reached the upstream");

    // Another key has its own bucket.
    let (status, _, _) = send(post(&url, Some("sk-b"), &body)).await;
    assert_eq!(status, 200);
    assert_eq!(upstream.hits(), 3);
}

#[tokio::test]
async fn a_token_quota_is_charged_from_the_parsed_body() {
    let upstream = echo_upstream().await;
    let layer = RateLimitLayer::builder()
        .key_by(by_key())
        .limits(Limits::new().tokens(Quota::per_hour(1000).burst(1000)))
        .build()
        .unwrap();
    let addr = gateway(layer, upstream.addr).await;
    let url = format!("http://{addr}/v1/chat/completions");

    let body = chat(&"word ".repeat(40), 100);
    let cost = RequestView::parse(Endpoint::ChatCompletions, body.as_bytes(), &CharEstimator)
        .unwrap()
        .token_cost();
    assert!(cost > 100, "{cost}");

    // The echo upstream reports no usage: each request keeps its estimate.
    for n in 1..=2 {
        let (status, headers, echoed) = send(post(&url, Some("sk-t"), &body)).await;
        assert_eq!(status, 200);
        let seen: serde_json::Value = serde_json::from_slice(&echoed).unwrap();
        assert_eq!(
            seen["body"],
            body.as_str(),
            "the buffered body is handed on intact"
        );
        assert_eq!(header(&headers, "x-ratelimit-limit-tokens"), "1000");
        assert_eq!(
            header(&headers, "x-ratelimit-remaining-tokens"),
            (1000 - n * cost).to_string()
        );
    }

    // A request whose estimate is larger than the bucket can never be admitted.
    let (status, headers, answer) = send(post(&url, Some("sk-t"), &chat("hi", 5000))).await;
    assert_eq!(status, 429);
    assert_eq!(
        envelope_code(&answer).as_deref(),
        Some("rate_limit_exceeded")
    );
    let v: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(v["error"]["param"], "max_tokens");
    assert_eq!(header(&headers, "x-should-retry"), "false");

    // A body that is not JSON cannot be estimated: it goes on uncharged, intact (the
    // upstream answers it; a validation layer would refuse it first).
    let (status, _, answer) = send(post(&url, Some("sk-t"), "not json")).await;
    assert_eq!(status, 200);
    let seen: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(seen["body"], "not json");
    assert_eq!(upstream.hits(), 3);
}
