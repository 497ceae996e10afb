//! The retry layer, black-box: real sockets for behaviour, paused time for exact timing.

mod common_retry;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use common_retry::*;
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use llm_layers::error::{ApiError, ErrorCode};
use llm_layers::ext::{Attempts, RefusedLocally};
use llm_layers::retry::{
    safe_to_retry, Backoff, Jitter, RetryBudget, RetryLayer, RetryStop, TransportErrors,
};
use proptest::prelude::*;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

fn fast() -> llm_layers::retry::RetryLayerBuilder {
    RetryLayer::builder()
        .backoff(
            Backoff::new(
                Duration::from_millis(1),
                Duration::from_millis(5),
                Jitter::Full,
            )
            .unwrap(),
        )
        .seed(1)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const CHAT: &str =
    r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"héllo \u0000 wörld"}]}"#;

async fn post(gw: std::net::SocketAddr, body: &'static str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("http://{gw}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

// ---------- real HTTP: a gateway in front of a scripted upstream stub ----------

#[tokio::test]
async fn gateway_retries_503_503_then_200_with_identical_body() {
    let stub = Stub::start(vec![
        Action::Reply(503, vec![], "busy"),
        Action::Reply(503, vec![], "busy"),
    ])
    .await;
    let gw = gateway(stub.addr, fast().build().unwrap()).await;
    let res = post(gw, CHAT).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-llm-layers-attempts"], "3");
    assert!(res.headers().get("x-llm-layers-retry-stop").is_none());
    assert_eq!(stub.count(), 3);
    for body in stub.bodies() {
        assert_eq!(body, CHAT.as_bytes(), "every replay is byte-identical");
    }
}

#[tokio::test]
async fn gateway_honours_retry_after_ms_on_429() {
    let stub = Stub::start(vec![Action::Reply(
        429,
        vec![
            ("retry-after-ms", "1200"),
            ("content-type", "application/json"),
        ],
        r#"{"error":{"message":"slow down","type":"requests","code":"rate_limit_exceeded"}}"#,
    )])
    .await;
    let waits = Arc::new(Mutex::new(Vec::new()));
    let w = waits.clone();
    let layer = fast()
        .on_retry(move |e| {
            w.lock()
                .unwrap()
                .push((e.attempt(), e.delay(), e.error().code()))
        })
        .build()
        .unwrap();
    let gw = gateway(stub.addr, layer).await;
    let res = post(gw, CHAT).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-llm-layers-attempts"], "2");
    assert_eq!(stub.count(), 2);
    let waits = waits.lock().unwrap();
    assert_eq!(waits.len(), 1);
    assert_eq!(waits[0].0, 1);
    assert_eq!(waits[0].2, ErrorCode::RateLimitExceeded);
    assert!(
        waits[0].1 >= ms(1200) && waits[0].1 <= ms(1300),
        "{:?}",
        waits[0].1
    );
}

#[tokio::test]
async fn gateway_never_retries_an_html_403() {
    let html = "<html><body><h1>403 Forbidden</h1>cloudflare</body></html>";
    let stub = Stub::start(vec![Action::Reply(
        403,
        vec![("content-type", "text/html")],
        html,
    )])
    .await;
    let gw = gateway(stub.addr, fast().build().unwrap()).await;
    let res = post(gw, CHAT).await;
    assert_eq!(res.status(), 403);
    assert_eq!(res.headers()["x-llm-layers-attempts"], "1");
    assert_eq!(res.headers()["x-llm-layers-retry-stop"], "not-retryable");
    assert_eq!(
        res.text().await.unwrap(),
        html,
        "the upstream answer is handed on as it was"
    );
    assert_eq!(stub.count(), 1);
}

#[tokio::test]
async fn gateway_retries_a_reset_connection() {
    let stub = Stub::start(vec![Action::Close]).await;
    let gw = gateway(stub.addr, fast().build().unwrap()).await;
    let res = post(gw, CHAT).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-llm-layers-attempts"], "2");
    assert_eq!(stub.count(), 2);
    assert_eq!(stub.bodies()[1], CHAT.as_bytes());
}

#[tokio::test]
async fn gateway_answers_502_envelope_when_every_connection_resets() {
    let stub = Stub::start(vec![Action::Close, Action::Close, Action::Close]).await;
    let gw = gateway(stub.addr, fast().build().unwrap()).await;
    let res = post(gw, CHAT).await;
    assert_eq!(res.status(), 502);
    assert_eq!(res.headers()["x-llm-layers-attempts"], "3");
    assert_eq!(
        res.headers()["x-llm-layers-retry-stop"],
        "attempts-exhausted"
    );
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "service_unavailable");
    assert_eq!(stub.count(), 3);
}

#[tokio::test]
async fn gateway_can_tell_sdk_clients_not_to_retry_again() {
    let stub = Stub::start(vec![
        Action::Reply(503, vec![("x-should-retry", "true")], "busy"),
        Action::Reply(503, vec![("x-should-retry", "true")], "busy"),
    ])
    .await;
    let gw = gateway(
        stub.addr,
        fast().max_attempts(2).mark_exhausted(true).build().unwrap(),
    )
    .await;
    let res = post(gw, CHAT).await;
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["x-should-retry"], "false");
    assert_eq!(
        res.headers()["x-llm-layers-retry-stop"],
        "attempts-exhausted"
    );
    assert_eq!(res.text().await.unwrap(), "busy");
    assert_eq!(stub.count(), 2);
}

#[tokio::test]
async fn gateway_retries_an_attempt_past_the_per_attempt_timeout() {
    let stub = Stub::start(vec![Action::Slow(ms(2000))]).await;
    let layer = fast().attempt_timeout(ms(200)).build().unwrap();
    let gw = gateway(stub.addr, layer).await;
    let res = post(gw, CHAT).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-llm-layers-attempts"], "2");
    assert_eq!(stub.count(), 2);
}

#[tokio::test]
async fn gateway_answers_504_timeout_when_every_attempt_is_slow() {
    let stub = Stub::start(vec![Action::Slow(ms(2000)), Action::Slow(ms(2000))]).await;
    let layer = fast()
        .max_attempts(2)
        .attempt_timeout(ms(150))
        .build()
        .unwrap();
    let gw = gateway(stub.addr, layer).await;
    let res = post(gw, CHAT).await;
    assert_eq!(res.status(), 504);
    // Both attempts were used: the caller is told not to retry them again.
    assert_eq!(res.headers()["x-should-retry"], "false");
    assert_eq!(
        res.headers()["x-llm-layers-retry-stop"],
        "attempts-exhausted"
    );
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "timeout");
    assert_eq!(stub.count(), 2);
}

#[tokio::test]
async fn oversized_body_is_sent_once_without_retries() {
    let stub = Stub::start(vec![Action::Reply(503, vec![], "busy")]).await;
    let gw = gateway(stub.addr, fast().body_limit(16).build().unwrap()).await;
    let res = post(gw, CHAT).await;
    assert_eq!(
        res.status(),
        503,
        "the upstream's answer, not a local rejection"
    );
    assert_eq!(res.headers()["x-llm-layers-attempts"], "1");
    assert_eq!(res.headers()["x-llm-layers-retry-stop"], "body-too-large");
    assert_eq!(stub.count(), 1);
    assert_eq!(
        stub.bodies()[0],
        CHAT.as_bytes(),
        "sent whole, never dropped"
    );
}

#[tokio::test]
async fn client_stack_over_hyper_util_can_propagate_transport_errors() {
    let stub = Stub::start(vec![Action::Close, Action::Close]).await;
    let mut client = ServiceBuilder::new()
        .layer(
            fast()
                .max_attempts(2)
                .transport_errors(TransportErrors::Propagate)
                .build()
                .unwrap(),
        )
        .map_response(|res: Response<hyper::body::Incoming>| res.map(Body::new))
        .service(upstream_client());
    let req = Request::post(format!("http://{}/v1/embeddings", stub.addr))
        .body(Body::from(CHAT))
        .unwrap();
    let err = client.ready().await.unwrap().call(req).await.unwrap_err();
    // The inner service's own error type comes back, not an envelope.
    let _: &hyper_util::client::legacy::Error = &err;
    assert_eq!(stub.count(), 2);
    // The same stack then succeeds once the stub answers.
    let req = Request::post(format!("http://{}/v1/embeddings", stub.addr))
        .body(Body::from(CHAT))
        .unwrap();
    let res = client.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.extensions().get::<Attempts>(), Some(&Attempts(1)));
}

#[tokio::test]
async fn client_stack_over_a_reqwest_service_fn() {
    let stub = Stub::start(vec![
        Action::Reply(429, vec![("retry-after-ms", "20")], "slow down"),
        Action::Reply(503, vec![], "busy"),
    ])
    .await;
    let http = reqwest::Client::new();
    let upstream = tower::service_fn(move |req: Request<Body>| {
        let http = http.clone();
        async move {
            let (parts, body) = req.into_parts();
            let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
            let req = reqwest::Request::try_from(Request::from_parts(parts, bytes))?;
            let res = http.execute(req).await?;
            Ok::<_, reqwest::Error>(Response::from(res).map(Body::new))
        }
    });
    let client = fast().build().unwrap().layer(upstream);
    let req = Request::post(format!("http://{}/v1/chat/completions", stub.addr))
        .body(Body::from(CHAT))
        .unwrap();
    let res = client.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.extensions().get::<Attempts>(), Some(&Attempts(3)));
    assert_eq!(stub.count(), 3);
    assert!(stub.bodies().iter().all(|b| b == CHAT.as_bytes()));
}

// ---------- in-process upstream: classification, bodies, streams ----------

fn call(
    layer: &RetryLayer,
    rec: &Recorder,
    script: ScriptFn,
    body: Body,
) -> impl std::future::Future<Output = Result<Response<Body>, std::io::Error>> {
    let svc = layer.layer(scripted(rec.clone(), script));
    let req = Request::post("/v1/chat/completions").body(body).unwrap();
    svc.oneshot(req)
}

#[tokio::test(start_paused = true)]
async fn never_retried_codes_stay_unretried_even_with_a_permissive_predicate() {
    for code in [
        ErrorCode::InsufficientQuota,
        ErrorCode::InvalidApiKey,
        ErrorCode::InvalidValue,
        ErrorCode::UpstreamBlocked,
        ErrorCode::ContentPolicyViolation,
        ErrorCode::PermissionDenied,
    ] {
        let layer = fast().retry_if(|_| true).build().unwrap();
        let rec = Recorder::default();
        let res = call(
            &layer,
            &rec,
            Arc::new(move |_| Ok(ApiError::new(code, "no").to_response())),
            Body::from(CHAT),
        )
        .await
        .unwrap();
        assert_eq!(rec.count(), 1, "{code:?} was retried");
        assert_eq!(
            res.extensions().get::<RetryStop>(),
            Some(&RetryStop::NotRetryable)
        );
        assert_eq!(res.extensions().get::<ApiError>().unwrap().code(), code);
    }
}

#[tokio::test(start_paused = true)]
async fn classification_from_extensions_wins_over_the_status() {
    // A 200 the normalizer knows is an error (say an error event) is retried; a 503 the
    // predicate refuses is not.
    let layer = fast().build().unwrap();
    let rec = Recorder::default();
    let res = call(
        &layer,
        &rec,
        Arc::new(|n| {
            let mut res = status(200);
            if n == 0 {
                res.extensions_mut()
                    .insert(ApiError::new(ErrorCode::ServiceUnavailable, "overloaded"));
            }
            Ok(res)
        }),
        Body::from(CHAT),
    )
    .await
    .unwrap();
    assert_eq!(rec.count(), 2);
    assert_eq!(res.extensions().get::<Attempts>(), Some(&Attempts(2)));

    let layer = fast()
        .retry_if(|e| e.code() != ErrorCode::ServiceUnavailable)
        .build()
        .unwrap();
    let rec = Recorder::default();
    let res = call(
        &layer,
        &rec,
        Arc::new(|_| Ok(status(503))),
        Body::from(CHAT),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(rec.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_chunked_body_past_the_limit_is_413_and_never_sent() {
    let layer = fast().body_limit(10).build().unwrap();
    let rec = Recorder::default();
    let chunks = futures_util::stream::iter(
        ["0123456", "789abc"].map(|s| Ok::<_, std::io::Error>(Bytes::from_static(s.as_bytes()))),
    );
    let res = call(
        &layer,
        &rec,
        Arc::new(|_| Ok(status(200))),
        Body::from_stream(chunks),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 413);
    assert_eq!(res.headers()["x-llm-layers-attempts"], "0");
    assert_eq!(res.headers()["x-should-retry"], "false");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "request_too_large");
    assert_eq!(rec.count(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_chunked_body_exactly_at_the_limit_is_accepted() {
    let layer = fast().body_limit(14).build().unwrap();
    let rec = Recorder::default();
    let chunks = futures_util::stream::iter(
        ["012345", "6789ab", "cd"]
            .map(|s| Ok::<_, std::io::Error>(Bytes::from_static(s.as_bytes()))),
    );
    let res = call(
        &layer,
        &rec,
        Arc::new(|n| Ok(status(if n == 0 { 503 } else { 200 }))),
        Body::from_stream(chunks),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    let bodies = rec.bodies.lock().unwrap();
    assert_eq!(bodies.len(), 2);
    assert!(bodies.iter().all(|b| &b[..] == b"0123456789abcd"));
}

#[tokio::test(start_paused = true)]
async fn a_chunked_body_within_the_limit_is_replayed_whole() {
    let layer = fast().build().unwrap();
    let rec = Recorder::default();
    let chunks = futures_util::stream::iter(
        ["{\"model\":", "\"x\"", "}"]
            .map(|s| Ok::<_, std::io::Error>(Bytes::from_static(s.as_bytes()))),
    );
    let res = call(
        &layer,
        &rec,
        Arc::new(|n| Ok(status(if n < 2 { 500 } else { 200 }))),
        Body::from_stream(chunks),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    let bodies = rec.bodies.lock().unwrap();
    assert_eq!(bodies.len(), 3);
    assert!(bodies.iter().all(|b| &b[..] == b"{\"model\":\"x\"}"));
}

#[tokio::test(start_paused = true)]
async fn a_stream_failing_midway_is_never_retried() {
    let layer = fast().build().unwrap();
    let rec = Recorder::default();
    let res = call(
        &layer,
        &rec,
        Arc::new(|_| {
            let events = futures_util::stream::iter(vec![
                Ok(Bytes::from_static(b"data: {\"choices\":[]}\n\n")),
                Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
            ]);
            Ok(Response::new(Body::from_stream(events)))
        }),
        Body::from(CHAT),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        res.into_body().collect().await.is_err(),
        "the failure reaches the caller"
    );
    assert_eq!(rec.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn transport_errors_become_envelopes_or_propagate() {
    let reset: ScriptFn =
        Arc::new(|_| Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset)));
    let rec = Recorder::default();
    let res = call(
        &fast().build().unwrap(),
        &rec,
        reset.clone(),
        Body::from(CHAT),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 502);
    assert_eq!(res.extensions().get::<Attempts>(), Some(&Attempts(3)));
    assert_eq!(rec.count(), 3);

    let rec = Recorder::default();
    let layer = fast()
        .transport_errors(TransportErrors::Propagate)
        .build()
        .unwrap();
    let err = call(&layer, &rec, reset, Body::from(CHAT))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    assert_eq!(rec.count(), 3);
}

#[tokio::test(start_paused = true)]
async fn attempts_header_can_be_turned_off() {
    let layer = fast().attempts_header(false).build().unwrap();
    let rec = Recorder::default();
    let res = call(
        &layer,
        &rec,
        Arc::new(|_| Ok(status(200))),
        Body::from(CHAT),
    )
    .await
    .unwrap();
    assert!(res.headers().get("x-llm-layers-attempts").is_none());
    assert_eq!(res.extensions().get::<Attempts>(), Some(&Attempts(1)));
}

#[test]
fn settings_out_of_range_name_the_field() {
    for (b, field) in [
        (RetryLayer::builder().max_attempts(0), "max_attempts"),
        (RetryLayer::builder().max_attempts(11), "max_attempts"),
        (RetryLayer::builder().deadline(Duration::ZERO), "deadline"),
        (
            RetryLayer::builder().attempt_timeout(Duration::ZERO),
            "attempt_timeout",
        ),
        (RetryLayer::builder().body_limit(0), "body_limit"),
        (
            RetryLayer::builder().hint_jitter(Duration::from_secs(6)),
            "hint_jitter",
        ),
    ] {
        let err = b.build().unwrap_err();
        assert_eq!(err.field(), field);
        assert!(err.to_string().contains(field));
    }
    assert!(RetryLayer::builder().max_attempts(10).build().is_ok());
}

// ---------- exact timing under paused time ----------

#[tokio::test(start_paused = true)]
async fn retry_after_ms_starts_the_next_attempt_within_hint_plus_jitter() {
    let layer = fast().hint_jitter(ms(100)).build().unwrap();
    let rec = Recorder::default();
    let res = call(
        &layer,
        &rec,
        Arc::new(|n| {
            Ok(if n == 0 {
                with_header(status(429), "retry-after-ms", "1200")
            } else {
                status(200)
            })
        }),
        Body::from(CHAT),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    let gaps = rec.gaps();
    assert_eq!(gaps.len(), 1);
    assert!(gaps[0] >= ms(1200) && gaps[0] <= ms(1300), "{:?}", gaps[0]);
}

#[tokio::test(start_paused = true)]
async fn no_jitter_backoff_is_exact() {
    let layer = RetryLayer::builder()
        .backoff(Backoff::new(ms(500), Duration::from_secs(8), Jitter::None).unwrap())
        .build()
        .unwrap();
    let rec = Recorder::default();
    let res = call(
        &layer,
        &rec,
        Arc::new(|n| Ok(status(if n < 2 { 503 } else { 200 }))),
        Body::from(CHAT),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(rec.gaps(), vec![ms(500), ms(1000)]);
}

#[tokio::test(start_paused = true)]
async fn seeded_jitter_is_reproducible_and_matches_the_hook() {
    async fn run() -> (Vec<Duration>, Vec<Duration>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let layer = RetryLayer::builder()
            .seed(42)
            .max_attempts(4)
            .on_retry(move |e| s.lock().unwrap().push(e.delay()))
            .build()
            .unwrap();
        let rec = Recorder::default();
        call(
            &layer,
            &rec,
            Arc::new(|_| Ok(status(503))),
            Body::from(CHAT),
        )
        .await
        .unwrap();
        let hooked = seen.lock().unwrap().clone();
        (rec.gaps(), hooked)
    }
    let (gaps, hooked) = run().await;
    assert_eq!(gaps.len(), 3);
    assert_eq!(gaps.len(), hooked.len());
    for (gap, delay) in gaps.iter().zip(&hooked) {
        // Exact up to tokio's 1 ms timer resolution (deadlines are rounded up).
        assert!(
            *gap >= *delay && *gap < *delay + ms(1),
            "{gap:?} vs {delay:?}"
        );
    }
    for (i, g) in gaps.iter().enumerate() {
        assert!(*g <= ms(500) * 2u32.pow(i as u32), "{g:?}");
    }
    let (_, again) = run().await;
    assert_eq!(hooked, again, "same seed, same delays");
}

#[tokio::test(start_paused = true)]
async fn a_hint_longer_than_max_retry_after_ends_retries_at_once() {
    let layer = fast().build().unwrap();
    let rec = Recorder::default();
    let t0 = Instant::now();
    let res = call(
        &layer,
        &rec,
        Arc::new(|_| Ok(with_header(status(429), "retry-after", "90"))),
        Body::from(CHAT),
    )
    .await
    .unwrap();
    assert_eq!(
        Instant::now() - t0,
        Duration::ZERO,
        "no sleeping just to fail"
    );
    assert_eq!(res.status(), 429);
    assert_eq!(
        res.headers()["x-llm-layers-retry-stop"],
        "retry-after-too-long"
    );
    assert_eq!(rec.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_hint_past_the_deadline_ends_retries_at_once() {
    let layer = fast().deadline(Duration::from_secs(1)).build().unwrap();
    let rec = Recorder::default();
    let t0 = Instant::now();
    let res = call(
        &layer,
        &rec,
        Arc::new(|_| Ok(with_header(status(429), "retry-after-ms", "1200"))),
        Body::from(CHAT),
    )
    .await
    .unwrap();
    assert_eq!(Instant::now() - t0, Duration::ZERO);
    assert_eq!(res.status(), 429);
    assert_eq!(
        res.extensions().get::<RetryStop>(),
        Some(&RetryStop::HintPastDeadline)
    );
    assert_eq!(rec.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_deadline_cuts_a_hanging_attempt_with_504() {
    let layer = fast()
        .deadline(Duration::from_secs(3))
        .attempt_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let rec = Recorder::default();
    let rec2 = rec.clone();
    let svc = layer.layer(tower::service_fn(move |_req: Request<Body>| {
        let rec = rec2.clone();
        async move {
            rec.arrivals.lock().unwrap().push(Instant::now());
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok::<_, std::io::Error>(status(200))
        }
    }));
    let t0 = Instant::now();
    let res = svc
        .oneshot(
            Request::post("/v1/chat/completions")
                .body(Body::from(CHAT))
                .unwrap(),
        )
        .await
        .unwrap();
    let elapsed = Instant::now() - t0;
    assert_eq!(res.status(), 504);
    assert_eq!(
        res.extensions().get::<RetryStop>(),
        Some(&RetryStop::Deadline)
    );
    assert_eq!(
        elapsed,
        Duration::from_secs(3),
        "answered exactly at the deadline"
    );
    assert_eq!(
        rec.count(),
        2,
        "first attempt cut at 2 s, second at the 3 s deadline"
    );
}

// ---------- the budget under a total outage ----------

async fn outage(requests: usize, layer: RetryLayer) -> usize {
    let attempts = Arc::new(AtomicUsize::new(0));
    let a = attempts.clone();
    let upstream = tower::service_fn(move |_req: Request<Body>| {
        a.fetch_add(1, Ordering::Relaxed);
        async { Ok::<_, std::io::Error>(status(503)) }
    });
    let svc = layer.layer(upstream);
    // Offered load: 100 requests per second for `requests / 100` seconds.
    let mut tasks = Vec::with_capacity(requests);
    for _ in 0..requests {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let res = svc
                .oneshot(
                    Request::post("/v1/chat/completions")
                        .body(Body::from(CHAT))
                        .unwrap(),
                )
                .await
                .unwrap();
            assert_eq!(res.status(), 503);
        }));
        tokio::time::sleep(ms(10)).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    attempts.load(Ordering::Relaxed)
}

#[tokio::test(start_paused = true)]
async fn the_budget_bounds_load_amplification_under_a_total_outage() {
    const N: usize = 1000;
    let budget = RetryBudget::default();
    let with_budget = outage(N, fast().build().unwrap()).await;
    let without = outage(N, fast().no_budget().build().unwrap()).await;
    let amp = with_budget as f64 / N as f64;
    println!(
        "total outage, {N} requests, max_attempts 3: upstream attempts {with_budget} with the \
         default budget ({amp:.3}x), {without} without ({:.3}x)",
        without as f64 / N as f64
    );
    assert_eq!(without, 3 * N);
    // Bound: every request once, plus ratio per request, plus the floor over the run (10 s of
    // offered load plus one window).
    let secs = N as f64 / 100.0 + budget.ttl().as_secs_f64();
    let bound =
        N as f64 * (1.0 + f64::from(budget.ratio())) + f64::from(budget.min_per_sec()) * secs;
    assert!((with_budget as f64) <= bound, "{with_budget} > {bound}");
    assert!(amp < 1.5, "amplification {amp}");
}

// ---------- properties ----------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn attempts_delays_and_deadline_stay_in_bounds(
        max_attempts in 1u32..=10,
        base_ms in 1u64..400,
        cap_mul in 1u64..20,
        jitter in prop_oneof![Just(Jitter::None), Just(Jitter::Full), Just(Jitter::Equal), Just(Jitter::Decorrelated)],
        deadline_ms in proptest::option::of(1u64..20_000),
        fail_pattern in proptest::collection::vec(0u8..5, 10),
        seed in any::<u64>(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        rt.block_on(async move {
            let backoff = Backoff::new(ms(base_ms), ms(base_ms * cap_mul), jitter).unwrap();
            let mut b = RetryLayer::builder().max_attempts(max_attempts).backoff(backoff).seed(seed).no_budget();
            if let Some(d) = deadline_ms { b = b.deadline(ms(d)); }
            let delays = Arc::new(Mutex::new(Vec::new()));
            let d2 = delays.clone();
            let layer = b.on_retry(move |e| d2.lock().unwrap().push((e.attempt(), e.delay()))).build().unwrap();
            let rec = Recorder::default();
            let t0 = Instant::now();
            let script: ScriptFn = Arc::new(move |n| Ok(match fail_pattern[n.min(9)] {
                0 => status(200),
                1 => status(503),
                2 => with_header(status(429), "retry-after-ms", "700"),
                3 => status(400),
                _ => return Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
            }));
            let res = call(&layer, &rec, script, Body::from(CHAT)).await.unwrap();
            let elapsed = Instant::now() - t0;
            let n = rec.count() as u32;
            assert!(n >= 1 && n <= max_attempts, "{n} attempts");
            assert_eq!(res.extensions().get::<Attempts>(), Some(&Attempts(n)));
            if let Some(d) = deadline_ms { assert!(elapsed < ms(d), "{elapsed:?} past {d} ms"); }
            for (attempt, delay) in delays.lock().unwrap().iter() {
                let hinted = *delay >= ms(700) && *delay <= ms(800);
                assert!(hinted || *delay <= backoff.cap(), "{delay:?}");
                if jitter == Jitter::Full && !hinted { assert!(*delay <= backoff.ceiling(*attempt)); }
            }
        });
    }
}

/// Answers 503 once, then never becomes ready again.
#[derive(Clone, Default)]
struct StuckAfterOne {
    calls: Arc<AtomicUsize>,
}

impl Service<Request<Body>> for StuckAfterOne {
    type Response = Response<Body>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Response<Body>, std::io::Error>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        if self.calls.load(Ordering::SeqCst) == 0 {
            std::task::Poll::Ready(Ok(()))
        } else {
            std::task::Poll::Pending
        }
    }

    fn call(&mut self, _req: Request<Body>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut res = Response::new(Body::empty());
        *res.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
        std::future::ready(Ok(res))
    }
}

#[tokio::test(start_paused = true)]
async fn waiting_for_the_inner_service_to_be_ready_ends_at_the_deadline() {
    let upstream = StuckAfterOne::default();
    let layer = fast().deadline(ms(2000)).seed(7).build().unwrap();
    let start = Instant::now();
    let call = layer.layer(upstream.clone()).oneshot(
        Request::post("/v1/chat/completions")
            .body(Body::from(CHAT))
            .unwrap(),
    );
    // A layer that ignored the deadline would wait forever: fail instead of hanging.
    let res = tokio::time::timeout(ms(10_000), call)
        .await
        .expect("answered by the deadline")
        .unwrap();
    assert_eq!(start.elapsed(), ms(2000));
    assert_eq!(res.status(), 504);
    assert_eq!(
        res.extensions().get::<RetryStop>(),
        Some(&RetryStop::Deadline)
    );
    assert_eq!(
        res.extensions().get::<ApiError>().unwrap().code(),
        ErrorCode::Timeout
    );
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 1);
}

// ---------- a refusal by a local layer (the breaker) is never slept on ----------

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// What an open circuit breaker answers: a 503 envelope with the remaining open time as
/// `retry-after`, marked as refused locally.
fn breaker_refusal(wait: Duration) -> Response<Body> {
    let mut res = ApiError::new(
        ErrorCode::ServiceUnavailable,
        "Circuit breaker 'upstream' is open after repeated upstream failures; calls resume in 30 s.",
    )
    .with_retry_after(wait)
    .to_response::<Body>();
    res.extensions_mut().insert(RefusedLocally::CIRCUIT_BREAKER);
    res
}

fn request(method: Method, path: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(path)
        .body(Body::from(CHAT))
        .unwrap()
}

fn send(
    layer: &RetryLayer,
    rec: &Recorder,
    script: ScriptFn,
    req: Request<Body>,
) -> impl std::future::Future<Output = Result<Response<Body>, std::io::Error>> {
    layer.layer(scripted(rec.clone(), script)).oneshot(req)
}

#[tokio::test(start_paused = true)]
async fn a_refusal_by_the_local_breaker_is_answered_at_once() {
    let layer = fast().build().unwrap();
    let rec = Recorder::default();
    let t0 = Instant::now();
    let res = call(
        &layer,
        &rec,
        Arc::new(|_| Ok(breaker_refusal(secs(30)))),
        Body::from(CHAT),
    )
    .await
    .unwrap();
    assert_eq!(
        Instant::now() - t0,
        Duration::ZERO,
        "no sleep on an open circuit"
    );
    assert_eq!(rec.count(), 1);
    assert_eq!(res.status(), 503);
    assert_eq!(
        res.extensions().get::<RetryStop>(),
        Some(&RetryStop::RefusedLocally)
    );
    assert_eq!(res.headers()["x-llm-layers-retry-stop"], "refused-locally");
    assert_eq!(res.headers()["x-llm-layers-attempts"], "1");
    // The breaker's word stands: come back once the circuit may close.
    assert_eq!(res.headers()["x-should-retry"], "true");
    assert_eq!(res.headers()["retry-after"], "30");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "service_unavailable");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Circuit breaker"));
}

#[tokio::test(start_paused = true)]
async fn a_local_refusal_after_a_retry_is_answered_at_once() {
    // An upstream 503, then the breaker (tripped by it) refuses the retry.
    let layer = fast().build().unwrap();
    let rec = Recorder::default();
    let t0 = Instant::now();
    let res = call(
        &layer,
        &rec,
        Arc::new(|n| {
            Ok(if n == 0 {
                status(503)
            } else {
                breaker_refusal(secs(30))
            })
        }),
        Body::from(CHAT),
    )
    .await
    .unwrap();
    assert!(
        Instant::now() - t0 <= ms(5),
        "only the backoff, no 30 s sleep"
    );
    assert_eq!(rec.count(), 2);
    assert_eq!(res.status(), 503);
    assert_eq!(
        res.extensions().get::<RetryStop>(),
        Some(&RetryStop::RefusedLocally)
    );
    assert_eq!(res.headers()["x-llm-layers-attempts"], "2");
    assert_eq!(res.headers()["x-llm-layers-retry-stop"], "refused-locally");
    // Not "exhausted": the refusal is the breaker's, and it says when to come back.
    assert_eq!(res.headers()["x-should-retry"], "true");
    assert_eq!(res.headers()["retry-after"], "30");
}

#[tokio::test(start_paused = true)]
async fn a_local_refusal_spends_nothing_from_the_retry_budget() {
    // One retry per request, no floor. The refused request leaves its deposit; the next one
    // fails twice and needs two retries: its own deposit and the one left.
    let layer = fast()
        .budget(RetryBudget::new(secs(60), 0, 1.0).unwrap())
        .build()
        .unwrap();
    let rec = Recorder::default();
    let refused = call(
        &layer,
        &rec,
        Arc::new(|_| Ok(breaker_refusal(secs(30)))),
        Body::from(CHAT),
    )
    .await
    .unwrap();
    assert_eq!(rec.count(), 1);
    assert_eq!(
        refused.extensions().get::<RetryStop>(),
        Some(&RetryStop::RefusedLocally)
    );
    let rec = Recorder::default();
    let res = call(
        &layer.clone(),
        &rec,
        Arc::new(|n| Ok(status(if n < 2 { 503 } else { 200 }))),
        Body::from(CHAT),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(rec.count(), 3);
}

// ---------- x-should-retry, retry-after and the stop reason agree ----------

#[tokio::test]
async fn gateway_keeps_the_upstreams_word_when_one_attempt_stops_on_a_long_hint() {
    // Hint 42 s, deadline 30 s: no retry fits, none was made. The caller may come back in
    // 42 s; nothing tells it otherwise.
    let stub = Stub::start(vec![
        Action::Reply(429, vec![("retry-after", "42")], "slow down"),
        Action::Reply(
            429,
            vec![("retry-after", "42"), ("x-should-retry", "true")],
            "slow down",
        ),
    ])
    .await;
    let gw = gateway(stub.addr, fast().deadline(secs(30)).build().unwrap()).await;
    let res = post(gw, CHAT).await;
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["retry-after"], "42");
    assert_eq!(
        res.headers()["x-llm-layers-retry-stop"],
        "retry-after-past-deadline"
    );
    assert_eq!(res.headers()["x-llm-layers-attempts"], "1");
    assert!(
        res.headers().get("x-should-retry").is_none(),
        "{:?}",
        res.headers().get("x-should-retry")
    );
    let res = post(gw, CHAT).await;
    assert_eq!(res.headers()["x-should-retry"], "true");
    assert_eq!(res.headers()["retry-after"], "42");
    assert_eq!(stub.count(), 2);
}

#[tokio::test(start_paused = true)]
async fn first_attempt_stops_are_not_marked_exhausted() {
    // A hint over max_retry_after on the first attempt: the upstream's header stands.
    let layer = fast().build().unwrap();
    let rec = Recorder::default();
    let res = call(
        &layer,
        &rec,
        Arc::new(|_| {
            Ok(with_header(
                with_header(status(429), "retry-after", "90"),
                "x-should-retry",
                "true",
            ))
        }),
        Body::from(CHAT),
    )
    .await
    .unwrap();
    assert_eq!(rec.count(), 1);
    assert_eq!(
        res.extensions().get::<RetryStop>(),
        Some(&RetryStop::HintTooLong)
    );
    assert_eq!(res.headers()["x-should-retry"], "true");

    // An empty budget on the first attempt: no retry was made, nothing is marked.
    let layer = fast()
        .budget(RetryBudget::new(secs(1), 0, 0.0).unwrap())
        .build()
        .unwrap();
    let rec = Recorder::default();
    let res = call(
        &layer,
        &rec,
        Arc::new(|_| Ok(status(503))),
        Body::from(CHAT),
    )
    .await
    .unwrap();
    assert_eq!(rec.count(), 1);
    assert_eq!(
        res.extensions().get::<RetryStop>(),
        Some(&RetryStop::BudgetExhausted)
    );
    assert!(res.headers().get("x-should-retry").is_none());
}

#[tokio::test(start_paused = true)]
async fn a_long_hint_after_a_retry_is_marked_exhausted() {
    let layer = fast().deadline(secs(30)).build().unwrap();
    let rec = Recorder::default();
    let res = call(
        &layer,
        &rec,
        Arc::new(|n| {
            Ok(if n == 0 {
                status(503)
            } else {
                with_header(status(429), "retry-after", "42")
            })
        }),
        Body::from(CHAT),
    )
    .await
    .unwrap();
    assert_eq!(rec.count(), 2);
    assert_eq!(
        res.extensions().get::<RetryStop>(),
        Some(&RetryStop::HintPastDeadline)
    );
    assert_eq!(res.headers()["x-should-retry"], "false");
    assert_eq!(res.headers()["retry-after"], "42");
}

// ---------- only what is safe to send twice is retried ----------

async fn post_path(
    gw: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = reqwest::Client::new()
        .post(format!("http://{gw}{path}"))
        .header("content-type", "application/json")
        .body(CHAT);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn gateway_sends_a_file_upload_once() {
    let stub = Stub::start(vec![
        Action::Reply(503, vec![], "busy"),
        Action::Reply(503, vec![], "busy"),
    ])
    .await;
    let gw = gateway(stub.addr, fast().build().unwrap()).await;
    let res = post_path(gw, "/v1/files", &[]).await;
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["x-llm-layers-attempts"], "1");
    assert_eq!(res.headers()["x-llm-layers-retry-stop"], "not-idempotent");
    assert_eq!(stub.count(), 1, "a duplicated upload is worse than a 503");
    // With the caller's Idempotency-Key it is retried, the key sent each time.
    let res = post_path(gw, "/v1/files", &[("idempotency-key", "upload-7")]).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-llm-layers-attempts"], "2");
    let received = stub.received.lock().unwrap();
    assert_eq!(received.len(), 3);
    for r in &received[1..] {
        assert!(
            r.head
                .to_ascii_lowercase()
                .contains("idempotency-key: upload-7"),
            "{}",
            r.head
        );
    }
}

#[tokio::test(start_paused = true)]
async fn only_idempotent_methods_and_generation_posts_are_retried_by_default() {
    let cases: &[(Method, &str, usize)] = &[
        (Method::POST, "/v1/chat/completions", 2),
        (Method::POST, "/v1/completions", 2),
        (Method::POST, "/v1/embeddings", 2),
        (Method::POST, "/v1/responses", 2),
        (Method::POST, "/v1/moderations", 2),
        (
            Method::POST,
            "/openai/deployments/gpt-4o/chat/completions?api-version=1",
            2,
        ),
        (Method::POST, "/v1/chat/%63ompletions", 2),
        (Method::POST, "/v1/messages", 2),
        (Method::POST, "/anthropic/v1/messages/", 2),
        (
            Method::POST,
            "/v1beta/models/gemini-2.0-flash:generateContent",
            2,
        ),
        (
            Method::POST,
            "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
            2,
        ),
        (Method::GET, "/v1/models", 2),
        (Method::HEAD, "/v1/models", 2),
        (Method::DELETE, "/v1/files/file-1", 2),
        (Method::PUT, "/v1/anything", 2),
        (Method::OPTIONS, "/v1/chat/completions", 2),
        (Method::POST, "/v1/files", 1),
        (Method::POST, "/v1/uploads", 1),
        (Method::POST, "/v1/fine_tuning/jobs", 1),
        (Method::POST, "/v1/batches", 1),
        (Method::POST, "/v1/messages/batches", 1),
        (Method::POST, "/v1/assistants", 1),
        (Method::POST, "/v1/threads", 1),
        (Method::POST, "/v1/threads/thread_1/messages", 1),
        (Method::POST, "/v1/threads/thread_1/runs", 1),
        (Method::POST, "/v1/vector_stores", 1),
        (Method::POST, "/v1/images/edits", 1),
        (
            Method::POST,
            "/v1beta/models/gemini-2.0-flash:batchGenerateContent",
            1,
        ),
        (Method::POST, "/v1/chat/completions/chatcmpl-1", 1),
        (Method::POST, "/v1/chat/completions/../../files", 1),
        (Method::PATCH, "/v1/chat/completions", 1),
        (Method::POST, "/", 1),
    ];
    for (method, path, want) in cases {
        let layer = fast().build().unwrap();
        let rec = Recorder::default();
        let res = send(
            &layer,
            &rec,
            Arc::new(|n| Ok(status(if n == 0 { 503 } else { 200 }))),
            request(method.clone(), path),
        )
        .await
        .unwrap();
        assert_eq!(rec.count(), *want, "{method} {path}");
        if *want == 1 {
            assert_eq!(res.status(), 503, "{method} {path}");
            assert_eq!(
                res.extensions().get::<RetryStop>(),
                Some(&RetryStop::NotIdempotent),
                "{method} {path}"
            );
            assert_eq!(res.headers()["x-llm-layers-retry-stop"], "not-idempotent");
        } else {
            assert_eq!(res.status(), 200, "{method} {path}");
        }
        let parts = rec.heads.lock().unwrap();
        assert!(
            parts
                .iter()
                .all(|p| !p.headers.contains_key("idempotency-key")),
            "no key is added unless asked"
        );
    }
}

#[test]
fn safe_to_retry_is_the_default_rule() {
    assert!(safe_to_retry(&Method::POST, "/v1/chat/completions"));
    assert!(safe_to_retry(&Method::POST, "/v1/messages/count_tokens"));
    assert!(safe_to_retry(&Method::GET, "/v1/files"));
    assert!(!safe_to_retry(&Method::POST, "/v1/files"));
    assert!(!safe_to_retry(&Method::PATCH, "/v1/chat/completions"));
    assert!(!safe_to_retry(
        &Method::POST,
        "/v1beta/models/x:batchGenerateContent"
    ));
}

#[tokio::test(start_paused = true)]
async fn generated_idempotency_keys_are_the_same_on_every_attempt_and_unique() {
    let layer = fast().idempotency_keys(true).build().unwrap();
    let mut keys = Vec::new();
    for _ in 0..2 {
        let rec = Recorder::default();
        let res = send(
            &layer,
            &rec,
            Arc::new(|n| Ok(status(if n < 2 { 503 } else { 200 }))),
            request(Method::POST, "/v1/files"),
        )
        .await
        .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(rec.count(), 3, "the key makes the upload retryable");
        let seen = rec.header_values("idempotency-key");
        let key = seen[0].clone().expect("a generated key");
        assert!(
            seen.iter().all(|k| k.as_deref() == Some(key.as_str())),
            "{seen:?}"
        );
        assert_eq!(key.len(), 36, "a UUID: {key}");
        assert!(
            key.chars().all(|c| c.is_ascii_hexdigit() || c == '-'),
            "{key}"
        );
        keys.push(key);
    }
    assert_ne!(keys[0], keys[1], "each request has its own key");

    // The caller's own key is kept; an idempotent method gets none.
    let rec = Recorder::default();
    let mut req = request(Method::POST, "/v1/batches");
    req.headers_mut()
        .insert("idempotency-key", "mine".parse().unwrap());
    send(&layer, &rec, Arc::new(|_| Ok(status(200))), req)
        .await
        .unwrap();
    assert_eq!(
        rec.header_values("idempotency-key"),
        vec![Some("mine".into())]
    );
    let rec = Recorder::default();
    send(
        &layer,
        &rec,
        Arc::new(|_| Ok(status(200))),
        request(Method::GET, "/v1/models"),
    )
    .await
    .unwrap();
    assert_eq!(rec.header_values("idempotency-key"), vec![None]);
}

#[tokio::test(start_paused = true)]
async fn retry_requests_chooses_what_is_retried() {
    let layer = fast()
        .retry_requests(|method, path| {
            path.ends_with("/images/generations") || safe_to_retry(method, path)
        })
        .build()
        .unwrap();
    for (path, want) in [
        ("/v1/images/generations", 2),
        // The path reaches the predicate as the upstream routes it.
        ("/v1/images/%67enerations", 2),
        ("/v1/chat/completions", 2),
        ("/v1/files", 1),
    ] {
        let rec = Recorder::default();
        send(
            &layer,
            &rec,
            Arc::new(|n| Ok(status(if n == 0 { 503 } else { 200 }))),
            request(Method::POST, path),
        )
        .await
        .unwrap();
        assert_eq!(rec.count(), want, "{path}");
    }
    // Nothing at all: every request is sent once.
    let layer = fast().retry_requests(|_, _| false).build().unwrap();
    let rec = Recorder::default();
    let res = send(
        &layer,
        &rec,
        Arc::new(|_| Ok(status(503))),
        request(Method::GET, "/v1/models"),
    )
    .await
    .unwrap();
    assert_eq!(rec.count(), 1);
    assert_eq!(
        res.extensions().get::<RetryStop>(),
        Some(&RetryStop::NotIdempotent)
    );
}

// ---------- the upstream's x-should-retry ----------

#[tokio::test]
async fn gateway_obeys_the_upstreams_x_should_retry_false() {
    let stub = Stub::start(vec![Action::Reply(
        503,
        vec![("x-should-retry", "false")],
        "do not",
    )])
    .await;
    let gw = gateway(stub.addr, fast().build().unwrap()).await;
    let res = post(gw, CHAT).await;
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["x-should-retry"], "false");
    assert_eq!(res.headers()["x-llm-layers-retry-stop"], "not-retryable");
    assert_eq!(stub.count(), 1);
}

#[tokio::test]
async fn gateway_obeys_the_upstreams_x_should_retry_true() {
    // A 409 is an invalid request by its status; the upstream says this one is worth another
    // try (as the official SDKs obey).
    let stub = Stub::start(vec![Action::Reply(
        409,
        vec![("x-should-retry", "true")],
        "conflict",
    )])
    .await;
    let gw = gateway(stub.addr, fast().build().unwrap()).await;
    let res = post(gw, CHAT).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-llm-layers-attempts"], "2");
    assert_eq!(stub.count(), 2);
}

#[tokio::test(start_paused = true)]
async fn x_should_retry_true_still_yields_to_the_predicate_and_to_the_request_rule() {
    let should: ScriptFn = Arc::new(|_| Ok(with_header(status(400), "x-should-retry", "true")));
    // The predicate refuses: not retried.
    let layer = fast()
        .retry_if(|e| e.code() != ErrorCode::InvalidValue)
        .build()
        .unwrap();
    let rec = Recorder::default();
    call(&layer, &rec, should.clone(), Body::from(CHAT))
        .await
        .unwrap();
    assert_eq!(rec.count(), 1);
    // A file upload stays sent once.
    let layer = fast().build().unwrap();
    let rec = Recorder::default();
    send(
        &layer,
        &rec,
        should.clone(),
        request(Method::POST, "/v1/files"),
    )
    .await
    .unwrap();
    assert_eq!(rec.count(), 1);
    // Without either: every attempt is used.
    let rec = Recorder::default();
    let res = call(&layer, &rec, should, Body::from(CHAT)).await.unwrap();
    assert_eq!(rec.count(), 3);
    assert_eq!(res.headers()["x-should-retry"], "false", "exhausted");
    // An inner layer's ApiError is its whole classification: its own header is not re-read.
    let rec = Recorder::default();
    let res = call(
        &layer,
        &rec,
        Arc::new(|n| {
            Ok(if n == 0 {
                let mut res = ApiError::new(ErrorCode::ServiceUnavailable, "busy").to_response();
                res.headers_mut()
                    .insert("x-should-retry", "false".parse().unwrap());
                res
            } else {
                status(200)
            })
        }),
        Body::from(CHAT),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(rec.count(), 2);
}

// ---------- configuration extremes never panic per request ----------

#[tokio::test(start_paused = true)]
async fn duration_max_in_every_duration_setter_never_panics() {
    let huge = Duration::MAX;
    let script: ScriptFn = Arc::new(|n| {
        Ok(match n {
            0 => status(503),
            1 => with_header(status(429), "retry-after-ms", "5"),
            _ => status(200),
        })
    });
    let builders = [
        fast().deadline(huge),
        fast().attempt_timeout(huge),
        fast().max_retry_after(huge),
        fast()
            .deadline(huge)
            .attempt_timeout(huge)
            .max_retry_after(huge),
        fast().backoff(Backoff::new(ms(1), huge, Jitter::Decorrelated).unwrap()),
    ];
    for b in builders {
        let layer = b.max_attempts(3).build().unwrap();
        let rec = Recorder::default();
        let res = call(&layer, &rec, script.clone(), Body::from(CHAT))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(rec.count(), 3);
    }
    // A backoff that can never fit a deadline ends at once.
    for jitter in [
        Jitter::None,
        Jitter::Full,
        Jitter::Equal,
        Jitter::Decorrelated,
    ] {
        let layer = fast()
            .backoff(Backoff::new(huge, huge, jitter).unwrap())
            .deadline(secs(10))
            .build()
            .unwrap();
        let rec = Recorder::default();
        let t0 = Instant::now();
        let res = call(&layer, &rec, script.clone(), Body::from(CHAT))
            .await
            .unwrap();
        assert_eq!(res.status(), 503, "{jitter:?}");
        assert_eq!(Instant::now() - t0, Duration::ZERO);
        assert_eq!(
            res.extensions().get::<RetryStop>(),
            Some(&RetryStop::Deadline),
            "{jitter:?}"
        );
    }
    // A wait as long as a Duration can be (an inner layer's classification), no cap on
    // honoured waits, a predicate that retries everything, and an endless deadline.
    let layer = fast()
        .max_retry_after(huge)
        .hint_jitter(secs(5))
        .deadline(huge)
        .retry_if(|_| true)
        .build()
        .unwrap();
    let rec = Recorder::default();
    let res = call(
        &layer,
        &rec,
        Arc::new(move |_| {
            Ok(ApiError::new(ErrorCode::ServiceUnavailable, "later")
                .with_retry_after(huge)
                .to_response())
        }),
        Body::from(CHAT),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(rec.count(), 1);
    assert_eq!(
        res.extensions().get::<RetryStop>(),
        Some(&RetryStop::HintPastDeadline)
    );
    // What cannot be honoured is refused when built, naming the field.
    assert_eq!(
        RetryLayer::builder()
            .hint_jitter(huge)
            .build()
            .unwrap_err()
            .field(),
        "hint_jitter"
    );
    assert_eq!(
        RetryBudget::new(huge, 1, 0.2).unwrap_err().field(),
        "budget.ttl"
    );
}

#[tokio::test(start_paused = true)]
async fn toml_retry_keys_at_their_largest_never_panic() {
    let max = u64::MAX;
    let text = format!(
        "[retry]\nmax_attempts = 3\ndeadline_ms = {max}\nmax_retry_after_ms = {max}\n\
         backoff_base_ms = 1\nbackoff_cap_ms = {max}\nbudget_min_per_sec = {}\nseed = {max}\n",
        u32::MAX
    );
    let layer = llm_layers::stack::Stack::from_toml_str(&text)
        .unwrap()
        .retry();
    let rec = Recorder::default();
    let res = call(
        &layer,
        &rec,
        Arc::new(|n| Ok(status(if n == 0 { 503 } else { 200 }))),
        Body::from(CHAT),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(rec.count(), 2);
}

#[tokio::test(start_paused = true)]
async fn toml_idempotency_keys_make_an_upload_retryable() {
    let layer = llm_layers::stack::Stack::from_toml_str(
        "[retry]\nidempotency_keys = true\nbackoff_base_ms = 1\nbackoff_cap_ms = 5\n",
    )
    .unwrap()
    .retry();
    let rec = Recorder::default();
    let res = send(
        &layer,
        &rec,
        Arc::new(|n| Ok(status(if n == 0 { 503 } else { 200 }))),
        request(Method::POST, "/v1/files"),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    let keys = rec.header_values("idempotency-key");
    assert_eq!(keys.len(), 2);
    assert!(keys[0].is_some() && keys[0] == keys[1], "{keys:?}");
    // Off by default.
    let layer = llm_layers::stack::Stack::from_toml_str("[retry]\nbackoff_base_ms = 1\n")
        .unwrap()
        .retry();
    let rec = Recorder::default();
    send(
        &layer,
        &rec,
        Arc::new(|_| Ok(status(503))),
        request(Method::POST, "/v1/files"),
    )
    .await
    .unwrap();
    assert_eq!(rec.header_values("idempotency-key"), vec![None]);
}

#[tokio::test(start_paused = true)]
async fn an_open_circuit_of_the_real_breaker_fails_fast_through_the_retry_layer() {
    // Recommended order: retry outside the breaker. Two upstream 503s open the circuit for
    // 30 s; the retry that meets the open circuit is answered at once.
    let breaker = llm_layers::breaker::CircuitBreakerLayer::builder()
        .consecutive_failures(2)
        .open_duration(secs(30))
        .jitter(0.0)
        .seed(7)
        .build()
        .unwrap();
    let layer = fast().max_attempts(4).build().unwrap();
    let rec = Recorder::default();
    let svc = layer.layer(
        breaker.layer(
            scripted(rec.clone(), Arc::new(|_| Ok(status(503))))
                .map_request(|r: Request<llm_layers::body::LayerBody<Body>>| r.map(Body::new)),
        ),
    );
    let t0 = Instant::now();
    let res = svc
        .clone()
        .oneshot(
            Request::post("/v1/chat/completions")
                .body(Body::from(CHAT))
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(Instant::now() - t0 <= ms(10), "{:?}", Instant::now() - t0);
    assert_eq!(
        rec.count(),
        2,
        "the third attempt never reached the upstream"
    );
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["x-llm-layers-retry-stop"], "refused-locally");
    assert_eq!(res.headers()["x-llm-layers-attempts"], "3");
    assert_eq!(res.headers()["x-should-retry"], "true");
    assert_eq!(res.headers()["retry-after"], "30");
    // A new request meets the open circuit on its first attempt: one call of the breaker,
    // no upstream call, no time.
    let t1 = Instant::now();
    let res = svc
        .oneshot(
            Request::post("/v1/chat/completions")
                .body(Body::from(CHAT))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(Instant::now() - t1, Duration::ZERO);
    assert_eq!(rec.count(), 2);
    assert_eq!(res.headers()["x-llm-layers-attempts"], "1");
    assert_eq!(res.headers()["x-llm-layers-retry-stop"], "refused-locally");
}

#[tokio::test]
async fn behind_the_normalizer_the_upstreams_x_should_retry_is_obeyed_too() {
    // The normalizer turns the raw answer into an envelope; the upstream's word travels in its
    // ApiError, so the retry layer outside still obeys it, and the envelope says the same.
    let stub = Stub::start(vec![Action::Reply(
        503,
        vec![("x-should-retry", "false")],
        "do not",
    )])
    .await;
    let gw = gateway_normalized(stub.addr, fast().build().unwrap()).await;
    let res = post(gw, CHAT).await;
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["x-should-retry"], "false");
    assert_eq!(res.headers()["x-llm-layers-retry-stop"], "not-retryable");
    assert_eq!(stub.count(), 1);

    let stub = Stub::start(vec![Action::Reply(
        409,
        vec![("x-should-retry", "true")],
        "conflict",
    )])
    .await;
    let gw = gateway_normalized(stub.addr, fast().build().unwrap()).await;
    let res = post(gw, CHAT).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-llm-layers-attempts"], "2");
    assert_eq!(stub.count(), 2);
}
