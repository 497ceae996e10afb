//! The layers stacked together, as the gateway stacks them, over real HTTP against a scripted
//! upstream stub: what a client sees when several layers have a say in one answer.
#![cfg(all(feature = "config", feature = "rate-limit"))]

mod common_gateway;

use std::collections::BTreeMap;

use common_gateway::{
    answer, assert_envelope, chat, completion, gateway, hello, Stub, FULL, OTHER,
};
use reqwest::StatusCode;

/// Two keys without tiers, generous defaults, every layer on.
fn config(extra: &str) -> String {
    format!(
        r#"
[[keys]]
id = "full"
secret = "{FULL}"

[[keys]]
id = "other"
secret = "{OTHER}"

[validation]
allowed_models = ["gpt-4o", "gpt-4o-mini"]

[upstream]
attempt_timeout_ms = 5000

{extra}
"#
    )
}

/// Answers by the request's `x-case` header, as many upstreams and the edges in front of them
/// would.
async fn provider_zoo() -> Stub {
    Stub::start(|call| {
        let case = call
            .headers
            .get("x-case")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        match case.as_str() {
            "openai-400" => answer(
                400,
                "application/json",
                r#"{"error":{"message":"Invalid 'messages[0].role'","type":"invalid_request_error","param":"messages[0].role","code":"invalid_value"}}"#,
            ),
            "openai-429" => Response::builder()
                .status(429)
                .header("content-type", "application/json")
                .header("retry-after-ms", "1500")
                .body(r#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#.into())
                .unwrap(),
            "quota" => answer(
                429,
                "application/json",
                r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#,
            ),
            "anthropic-529" => answer(
                529,
                "application/json",
                r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            ),
            "html-403" => answer(
                403,
                "text/html",
                "<html><head><title>Attention Required! | Cloudflare</title></head><body>blocked</body></html>",
            ),
            "html-502" => answer(502, "text/html", "<html><body><h1>502 Bad Gateway</h1></body></html>"),
            "empty-500" => answer(500, "text/plain", ""),
            "unknown-url" => answer(
                404,
                "application/json",
                r#"{"error":{"message":"Unknown request URL: POST /v1/chat/completion.","type":"invalid_request_error","param":null,"code":"unknown_url"}}"#,
            ),
            "model-not-found" => answer(
                404,
                "application/json",
                r#"{"error":{"message":"The model `gpt-5-nano` does not exist","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#,
            ),
            _ => completion(call.json),
        }
    })
    .await
}

use axum::response::Response;

#[tokio::test]
async fn every_error_is_an_envelope_an_sdk_understands() {
    let stub = provider_zoo().await;
    let (addr, _) = gateway(
        &config(
            "[rate_limit.defaults]\nrpm = 1000\n[breaker]\nwindow = 1000\nminimum_calls = 1000\n[retry]\nmax_attempts = 1\n",
        ),
        &stub.base(),
    )
    .await;
    let client = reqwest::Client::new();

    // Upstream failures, normalized.
    let expected = [
        ("openai-400", 400, "invalid_value", "false"),
        ("openai-429", 429, "rate_limit_exceeded", "true"),
        ("quota", 429, "insufficient_quota", "false"),
        ("anthropic-529", 503, "service_unavailable", "true"),
        ("html-403", 502, "upstream_blocked", "false"),
        ("html-502", 503, "service_unavailable", "true"),
        ("empty-500", 500, "internal_error", "true"),
        // OpenAI's 404 `model_not_found` is classified as an unsupported model.
        ("model-not-found", 400, "model_not_supported", "false"),
        ("unknown-url", 404, "not_found", "false"),
    ];
    for (case, status, code, retry) in expected {
        let got = chat(&client, addr, FULL, &hello("gpt-4o"), &[("x-case", case)]).await;
        assert_envelope(&got);
        assert_eq!(
            (
                got.status.as_u16(),
                got.code().as_str(),
                got.header("x-should-retry")
            ),
            (status, code, Some(retry)),
            "{case}: {got:?}"
        );
    }
    let got = chat(
        &client,
        addr,
        FULL,
        &hello("gpt-4o"),
        &[("x-case", "openai-429")],
    )
    .await;
    assert_eq!(got.header("retry-after"), Some("2"), "{got:?}");
    assert_eq!(got.header("retry-after-ms"), Some("1500"), "{got:?}");

    // The gateway's own rejections, in the same language.
    let got = chat(
        &client,
        addr,
        "sk-wrong-0123456789abcdefghij",
        &hello("gpt-4o"),
        &[],
    )
    .await;
    assert_envelope(&got);
    assert_eq!(
        (got.status.as_u16(), got.code().as_str()),
        (401, "invalid_api_key")
    );
    let got = chat(&client, addr, FULL, &hello("gpt-3"), &[]).await;
    assert_envelope(&got);
    assert_eq!(
        (got.status.as_u16(), got.code().as_str()),
        (400, "model_not_supported")
    );
    let res = client
        .post(format!("http://{addr}/v1/chat/completions"))
        .header("authorization", format!("Bearer {FULL}"))
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    let got = common_gateway::Got {
        status: res.status(),
        headers: res.headers().clone(),
        body: res.bytes().await.unwrap(),
    };
    assert_envelope(&got);
    assert_eq!(
        (got.status.as_u16(), got.code().as_str()),
        (400, "invalid_value")
    );

    // A refused request never reached the upstream: 9 + 1 scripted calls only.
    assert_eq!(stub.calls(), 10);
}

#[tokio::test]
async fn rate_limits_are_per_key_behind_auth() {
    let stub = Stub::start(|call| completion(call.json)).await;
    let (addr, _) = gateway(&config("[rate_limit.defaults]\nrpm = 2\n"), &stub.base()).await;
    let client = reqwest::Client::new();

    let mut seen = BTreeMap::new();
    for key in [FULL, OTHER, FULL, OTHER, FULL, OTHER] {
        let got = chat(&client, addr, key, &hello("gpt-4o-mini"), &[]).await;
        seen.entry(key)
            .or_insert_with(Vec::new)
            .push(got.status.as_u16());
        if got.status == StatusCode::TOO_MANY_REQUESTS {
            assert_envelope(&got);
            assert_eq!(got.code(), "rate_limit_exceeded");
            assert_eq!(got.header("x-should-retry"), Some("true"));
            let secs: u64 = got.header("retry-after").unwrap().parse().unwrap();
            assert!((1..=60).contains(&secs), "{got:?}");
            assert_eq!(got.header("x-ratelimit-remaining-requests"), Some("0"));
        }
    }
    assert_eq!(seen[FULL], [200, 200, 429]);
    assert_eq!(seen[OTHER], [200, 200, 429]);
    // A request without a valid key is refused by auth before it can spend anyone's quota.
    let got = chat(
        &client,
        addr,
        "sk-wrong-0123456789abcdefghij",
        &hello("gpt-4o"),
        &[],
    )
    .await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED);
    // Only admitted requests reached the upstream.
    assert_eq!(stub.calls(), 4);
}

/// `gpt-4o` is down (503), `gpt-4o-mini` answers; calls per model are counted.
async fn half_down() -> (
    Stub,
    std::sync::Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
) {
    let counts = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::<String, u64>::new()));
    let seen = counts.clone();
    let stub = Stub::start(move |call| {
        let model = call.json["model"].as_str().unwrap_or("").to_owned();
        *seen.lock().unwrap().entry(model.clone()).or_default() += 1;
        if model == "gpt-4o" {
            answer(
                503,
                "application/json",
                r#"{"error":{"message":"The engine is currently overloaded","type":"server_error","param":null,"code":null}}"#,
            )
        } else {
            completion(call.json)
        }
    })
    .await;
    (stub, counts)
}

const BREAKER: &str = r#"
[rate_limit.defaults]
rpm = 10000

[retry]
max_attempts = 3
backoff_base_ms = 1
backoff_cap_ms = 5
deadline_ms = 10000

[breaker]
key_by = "model"
window = 4
minimum_calls = 4
failure_rate = 50.0
open_ms = 60000
fallback_model = "gpt-4o-mini"
"#;

#[tokio::test]
async fn retries_and_the_breaker_open_together_then_fall_back() {
    let (stub, counts) = half_down().await;
    let (addr, stack) = gateway(&config(BREAKER), &stub.base()).await;
    let client = reqwest::Client::new();

    // The first request is tried three times, all overloaded: the client gets the last 503
    // with the number of attempts, and is told not to retry what the gateway already retried.
    let got = chat(&client, addr, FULL, &hello("gpt-4o"), &[]).await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE, "{got:?}");
    assert_envelope(&got);
    assert_eq!(got.header("x-should-retry"), Some("false"));
    assert_eq!(got.header("x-llm-layers-attempts"), Some("3"));
    assert_eq!(counts.lock().unwrap()["gpt-4o"], 3);

    // The second request's first attempt is the fourth failure: the circuit for gpt-4o opens,
    // so its retry is answered by the fallback model instead of by the failing one.
    let got = chat(&client, addr, FULL, &hello("gpt-4o"), &[]).await;
    assert_eq!(got.status, StatusCode::OK, "{got:?}");
    assert_eq!(got.header("x-llm-layers-attempts"), Some("2"));
    assert_eq!(got.header("x-llm-layers-fallback"), Some("gpt-4o-mini"));
    assert_eq!(got.json()["model"], "gpt-4o-mini");
    assert_eq!(counts.lock().unwrap()["gpt-4o"], 4);

    // From now on gpt-4o is not called at all: one attempt each, answered by gpt-4o-mini.
    for _ in 0..5 {
        let got = chat(&client, addr, FULL, &hello("gpt-4o"), &[]).await;
        assert_eq!(got.status, StatusCode::OK, "{got:?}");
        assert_eq!(got.header("x-llm-layers-attempts"), Some("1"));
        assert_eq!(got.header("x-llm-layers-fallback"), Some("gpt-4o-mini"));
    }
    assert_eq!(counts.lock().unwrap()["gpt-4o"], 4);
    assert_eq!(counts.lock().unwrap()["gpt-4o-mini"], 6);
    assert_eq!(stub.calls(), 10);
    let metrics = stack.breaker().handle().metrics("gpt-4o").unwrap();
    assert_eq!(metrics.openings, 1, "{metrics:?}");
}

#[tokio::test]
async fn a_transient_failure_is_retried_and_the_client_never_sees_it() {
    // Overloaded twice, then fine.
    let stub = Stub::start(|call| match call.index {
        0 => answer(
            529,
            "application/json",
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        ),
        1 => answer(500, "text/plain", ""),
        _ => completion(call.json),
    })
    .await;
    let (addr, _) = gateway(&config(BREAKER), &stub.base()).await;
    let client = reqwest::Client::new();
    let got = chat(&client, addr, FULL, &hello("gpt-4o"), &[]).await;
    assert_eq!(got.status, StatusCode::OK, "{got:?}");
    assert_eq!(got.header("x-llm-layers-attempts"), Some("3"));
    assert_eq!(got.json()["model"], "gpt-4o");
    assert_eq!(stub.calls(), 3);

    // A caller fault is not retried.
    let stub = Stub::start(|_| answer(400, "application/json", r#"{"error":{"message":"bad","type":"invalid_request_error","param":null,"code":null}}"#)).await;
    let (addr, _) = gateway(&config(BREAKER), &stub.base()).await;
    let got = chat(&client, addr, FULL, &hello("gpt-4o"), &[]).await;
    assert_eq!(got.status, StatusCode::BAD_REQUEST);
    assert_envelope(&got);
    assert_eq!(got.header("x-llm-layers-attempts"), Some("1"));
    assert_eq!(stub.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_is_lost_when_1000_concurrent_requests_meet_a_failing_upstream() {
    // One call in five answers; the others fail in every way an upstream fails.
    let stub = Stub::start(|call| match call.index % 5 {
        0 => completion(call.json),
        1 => answer(500, "text/plain", ""),
        2 => answer(
            503,
            "application/json",
            r#"{"error":{"message":"overloaded","type":"server_error","param":null,"code":null}}"#,
        ),
        3 => answer(
            403,
            "text/html",
            "<html><title>Attention Required! | Cloudflare</title></html>",
        ),
        _ => answer(
            529,
            "application/json",
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        ),
    })
    .await;
    let (addr, _) = gateway(
        &config("[rate_limit.defaults]\nrpm = 100000\n\n[retry]\nmax_attempts = 3\nbackoff_base_ms = 1\nbackoff_cap_ms = 20\ndeadline_ms = 20000\n\n[breaker]\nwindow = 50\nminimum_calls = 20\nfallback_model = \"gpt-4o-mini\"\n"),
        &stub.base(),
    )
    .await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1000)
        .build()
        .unwrap();

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let client = client.clone();
        let model = if i % 2 == 0 { "gpt-4o" } else { "gpt-4o-mini" };
        tasks.spawn(async move { chat(&client, addr, FULL, &hello(model), &[]).await });
    }
    let mut by_outcome = BTreeMap::<String, u32>::new();
    while let Some(got) = tasks.join_next().await {
        let got = got.expect("no task panicked");
        let outcome = if got.status.is_success() {
            assert!(got.json()["choices"].is_array(), "{got:?}");
            "ok".to_owned()
        } else {
            assert_envelope(&got);
            format!("{} {}", got.status.as_u16(), got.code())
        };
        *by_outcome.entry(outcome).or_default() += 1;
    }
    eprintln!(
        "outcomes of 1000 requests: {by_outcome:?}; upstream calls: {}",
        stub.calls()
    );
    let total: u32 = by_outcome.values().sum();
    assert_eq!(total, 1000, "{by_outcome:?}");
    assert!(
        by_outcome.get("ok").copied().unwrap_or(0) > 0,
        "{by_outcome:?}"
    );
    assert!(by_outcome.len() > 1, "{by_outcome:?}");
    // Retries are bounded: at most three attempts each, and in practice the retry budget
    // keeps the upstream far below that.
    assert!((1000..=3000).contains(&stub.calls()), "{}", stub.calls());
}

#[tokio::test]
async fn a_stream_is_not_buffered_and_its_in_band_error_reaches_the_client() {
    type Chunk = Result<bytes::Bytes, std::io::Error>;
    let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(4);
    let rx = std::sync::Mutex::new(Some(rx));
    let stub = Stub::start(move |_| {
        let rx = rx.lock().unwrap().take().expect("one stream");
        let events = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|chunk| (chunk, rx))
        });
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(axum::body::Body::from_stream(events))
            .unwrap()
    })
    .await;
    let (addr, _) = gateway(
        &config("[rate_limit.defaults]\nrpm = 100\ntpm = 100000\n\n[retry]\nmax_attempts = 3\n"),
        &stub.base(),
    )
    .await;
    let body = serde_json::json!({"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]});
    let chunk = r#"data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hel"}}]}"#;
    tx.send(Ok(format!("{chunk}\n\n").into())).await.unwrap();

    let mut res = reqwest::Client::new()
        .post(format!("http://{addr}/v1/chat/completions"))
        .header("authorization", format!("Bearer {FULL}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    // The first event arrives while the upstream has not finished: nothing buffers the stream
    // (auth, validation, rate limit, retry, breaker and normalizer are all in the way).
    let first = tokio::time::timeout(std::time::Duration::from_secs(10), res.chunk())
        .await
        .expect("the first event is not held back")
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&first).contains("Hel"));

    // Then the upstream reports an error inside the 200 stream and ends it.
    tx.send(Ok(bytes::Bytes::from_static(
        b"data: {\"error\":{\"message\":\"The server had an error while processing your request.\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\n",
    )))
    .await
    .unwrap();
    drop(tx);
    let mut rest = Vec::new();
    while let Some(chunk) = res.chunk().await.unwrap() {
        rest.extend_from_slice(&chunk);
    }
    let rest = String::from_utf8(rest).unwrap();
    let last = rest
        .split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: "))
        .last()
        .unwrap_or_else(|| panic!("{rest}"));
    let last: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(last["error"]["code"], "internal_error", "{rest}");
    assert_eq!(last["error"]["type"], "server_error", "{rest}");
    // Committed once the head arrived: never retried.
    assert_eq!(stub.calls(), 1);
}
