//! The layers' metrics, seen from outside: the example gateway with its mock upstream over real
//! sockets, a scripted run (rejections, retries, an opened circuit, a fallback), then a scrape
//! of `GET /metrics`.
#![cfg(all(feature = "config", feature = "rate-limit", feature = "metrics"))]

mod common_gateway;
#[path = "../examples/gateway/metrics.rs"]
mod gateway_metrics;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use common_gateway::{app, hello, mock, serve};
use serde_json::{json, Value};

const CONFIG: &str = include_str!("../examples/gateway.toml");
const FULL: &str = "sk-demo-full-0123456789abcdef";
const MINI: &str = "sk-demo-mini-0123456789abcdef";
const EXPIRED: &str = "sk-demo-expired-0123456789ab";
const REVOKED: &str = "sk-demo-revoked-0123456789ab";
const FREE: &str = "sk-demo-free-0123456789abcdef";

/// The example gateway in front of its mock (forwarding `x-mock-fault`), with `/metrics`
/// rendering `handle`.
async fn gateway(handle: metrics_exporter_prometheus::PrometheusHandle) -> SocketAddr {
    let (stack, mut gw) = app::load(CONFIG).unwrap();
    gw.forward_header("--forward-header", "x-mock-fault")
        .unwrap();
    let mock = mock::start().await.unwrap();
    let base = format!("http://{mock}/v1").parse().unwrap();
    let upstream = app::upstream_with(&stack, &gw.forward_headers, gw.tls().unwrap(), base, None);
    serve(app::router(&stack, upstream).merge(gateway_metrics::router(handle))).await
}

/// POSTs `body` to `path` with an optional key and extra headers; the status and the
/// `x-llm-layers-fallback` header.
async fn post(
    client: &reqwest::Client,
    addr: SocketAddr,
    path: &str,
    key: Option<&str>,
    body: &Value,
    extra: &[(&str, &str)],
) -> (u16, Option<String>) {
    let mut req = client
        .post(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(key) = key {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let res = req.send().await.expect("the gateway answers");
    let status = res.status().as_u16();
    let fallback = res
        .headers()
        .get("x-llm-layers-fallback")
        .map(|v| v.to_str().unwrap().to_owned());
    // The body is read to its end: the rate limit's slot and token meter settle there.
    res.bytes().await.unwrap();
    (status, fallback)
}

/// The scrape's samples, `name{labels}` (labels as rendered) to value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("a sample line");
            (series.to_owned(), value.parse().expect("a number"))
        })
        .collect()
}

#[tokio::test]
async fn a_scripted_run_is_counted_exactly_on_the_metrics_endpoint() {
    // This thread's recorder: the runtime of this test is this thread, so every layer's
    // recording (in the gateway's tasks) goes to it, and no other test's.
    let recorder = gateway_metrics::recorder();
    let handle = recorder.handle();
    let _local = metrics::set_default_local_recorder(&recorder);
    let addr = gateway(handle).await;
    let client = reqwest::Client::new();
    let chat = "/v1/chat/completions";

    // One answer.
    assert_eq!(
        post(&client, addr, chat, Some(FULL), &hello("gpt-4o-mini"), &[])
            .await
            .0,
        200
    );
    // Auth: expired, revoked, missing, invalid, a model the key may not use.
    for key in [
        Some(EXPIRED),
        Some(REVOKED),
        None,
        Some("sk-demo-wrong-0123456789abcd"),
    ] {
        assert_eq!(
            post(&client, addr, chat, key, &hello("gpt-4o-mini"), &[])
                .await
                .0,
            401
        );
    }
    assert_eq!(
        post(&client, addr, chat, Some(MINI), &hello("gpt-4o"), &[])
            .await
            .0,
        403
    );
    // Validation.
    let hot = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "temperature": 3});
    assert_eq!(
        post(&client, addr, chat, Some(FULL), &hot, &[]).await.0,
        400
    );
    // Rate limit: the free key's own 2 requests a minute.
    for want in [200, 200, 429] {
        assert_eq!(
            post(&client, addr, chat, Some(FREE), &hello("gpt-4o-mini"), &[])
                .await
                .0,
            want
        );
    }
    // Retries: 503 twice, then an answer; 500 three times, then the retries are exhausted.
    let flaky = [
        ("x-mock-fault", "flaky"),
        ("x-request-id", "metrics-flaky-1"),
    ];
    assert_eq!(
        post(
            &client,
            addr,
            chat,
            Some(FULL),
            &hello("gpt-4o-mini"),
            &flaky
        )
        .await
        .0,
        200
    );
    let broken = [("x-mock-fault", "500")];
    assert_eq!(
        post(&client, addr, chat, Some(FULL), &hello("gpt-4o"), &broken)
            .await
            .0,
        500
    );
    // The legacy completions route (no retries, a circuit of 5 calls): five failures open the
    // model's circuit; the next call is refused by it and answered by the fallback model.
    let legacy = "/v1/completions";
    let prompt = json!({"model": "gpt-3.5-turbo-instruct", "prompt": "hi"});
    for _ in 0..5 {
        assert_eq!(
            post(&client, addr, legacy, Some(FULL), &prompt, &broken)
                .await
                .0,
            500
        );
    }
    assert_eq!(
        post(&client, addr, legacy, Some(FULL), &prompt, &[]).await,
        (200, Some("gpt-4o-mini".to_owned()))
    );

    let res = client
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["content-type"],
        gateway_metrics::CONTENT_TYPE_TEXT
    );
    let text = res.text().await.unwrap();
    let got = samples(&text);
    let want: &[(&str, f64)] = &[
        // 18 requests: every one meets auth; 13 pass it, 12 pass validation, 11 are admitted.
        (r#"llm_layers_requests{layer="auth"}"#, 18.0),
        (r#"llm_layers_requests{layer="validate"}"#, 13.0),
        (r#"llm_layers_requests{layer="rate_limit"}"#, 12.0),
        (r#"llm_layers_requests{layer="retry"}"#, 11.0),
        // Attempts: 1 + 2 (free) + 3 (flaky) + 3 (500) + 5 + 1 = 15, each through the breaker;
        // the refused one's fallback call reaches the normalizer instead.
        (r#"llm_layers_requests{layer="breaker"}"#, 15.0),
        (r#"llm_layers_requests{layer="normalize"}"#, 15.0),
        (r#"llm_layers_auth_outcomes{outcome="ok"}"#, 13.0),
        (r#"llm_layers_auth_outcomes{outcome="expired"}"#, 1.0),
        (r#"llm_layers_auth_outcomes{outcome="revoked"}"#, 1.0),
        (r#"llm_layers_auth_outcomes{outcome="missing"}"#, 1.0),
        (r#"llm_layers_auth_outcomes{outcome="invalid"}"#, 1.0),
        (
            r#"llm_layers_auth_outcomes{outcome="forbidden_model"}"#,
            1.0,
        ),
        (
            r#"llm_layers_rejections{layer="auth",code="expired_api_key",key_id="none",route="/v1/chat/completions"}"#,
            1.0,
        ),
        (
            r#"llm_layers_rejections{layer="auth",code="revoked_api_key",key_id="none",route="/v1/chat/completions"}"#,
            1.0,
        ),
        (
            r#"llm_layers_rejections{layer="auth",code="invalid_api_key",key_id="none",route="/v1/chat/completions"}"#,
            2.0,
        ),
        (
            r#"llm_layers_rejections{layer="auth",code="permission_denied",key_id="none",route="/v1/chat/completions"}"#,
            1.0,
        ),
        // Validation runs after auth: its rejection names the key (the demo key `demo-full`).
        (
            r#"llm_layers_rejections{layer="validate",code="invalid_value",key_id="demo-full",route="/v1/chat/completions"}"#,
            1.0,
        ),
        (
            r#"llm_layers_rejections{layer="rate_limit",code="rate_limit_exceeded",key_id="demo-free",route="/v1/chat/completions"}"#,
            1.0,
        ),
        (r#"llm_layers_rate_limit_admissions"#, 11.0),
        (r#"llm_layers_rate_limit_in_flight"#, 0.0),
        (
            r#"llm_layers_retry_retries{code="service_unavailable"}"#,
            2.0,
        ),
        (r#"llm_layers_retry_retries{code="internal_error"}"#, 2.0),
        // The chat 500 after its 3 attempts, and each legacy 500 (its route allows 1 attempt).
        (
            r#"llm_layers_retry_stops{reason="attempts-exhausted"}"#,
            6.0,
        ),
        // 9 requests answered at the first attempt, 2 at the third.
        (r#"llm_layers_retry_attempts_bucket{le="1"}"#, 9.0),
        (r#"llm_layers_retry_attempts_bucket{le="2"}"#, 9.0),
        (r#"llm_layers_retry_attempts_bucket{le="3"}"#, 11.0),
        (r#"llm_layers_retry_attempts_count"#, 11.0),
        (r#"llm_layers_retry_attempts_sum"#, 15.0),
        (
            r#"llm_layers_normalize_classifications{code="service_unavailable",provider="openai",route="/v1/chat/completions"}"#,
            2.0,
        ),
        // 3 on the chat route, 5 on the legacy one.
        (
            r#"llm_layers_normalize_classifications{code="internal_error",provider="openai",route="/v1/chat/completions"}"#,
            3.0,
        ),
        (
            r#"llm_layers_normalize_classifications{code="internal_error",provider="openai",route="/v1/completions"}"#,
            5.0,
        ),
        // Each call through the normalizer, by operation and route: on chat, 4 answers (the
        // first, the free key's two, the flaky one's third attempt), 2 503s and 3 500s; on the
        // legacy route 5 500s and the fallback's answer.
        (
            r#"gen_ai_client_operation_duration_count{gen_ai_operation_name="chat",route="/v1/chat/completions"}"#,
            4.0,
        ),
        (
            r#"gen_ai_client_operation_duration_count{gen_ai_operation_name="chat",error_type="service_unavailable",route="/v1/chat/completions"}"#,
            2.0,
        ),
        (
            r#"gen_ai_client_operation_duration_count{gen_ai_operation_name="chat",error_type="internal_error",route="/v1/chat/completions"}"#,
            3.0,
        ),
        (
            r#"gen_ai_client_operation_duration_count{gen_ai_operation_name="text_completion",route="/v1/completions"}"#,
            1.0,
        ),
        (
            r#"gen_ai_client_operation_duration_count{gen_ai_operation_name="text_completion",error_type="internal_error",route="/v1/completions"}"#,
            5.0,
        ),
        (
            r#"llm_layers_breaker_transitions{name="upstream",from="closed",to="open",reason="failure_rate"}"#,
            1.0,
        ),
        (
            r#"llm_layers_breaker_state{name="upstream",circuit="gpt-3.5-turbo-instruct"}"#,
            1.0,
        ),
        (
            r#"llm_layers_breaker_rejections{name="upstream",circuit="gpt-3.5-turbo-instruct"}"#,
            1.0,
        ),
        (
            r#"llm_layers_breaker_fallbacks{name="upstream",fallback="gpt-4o-mini",outcome="ok"}"#,
            1.0,
        ),
        // The usage of the three answers to the key with a token limit (the pro tier's): the
        // first, the flaky one, the fallback's; the mock reports 8 input and 10 output tokens.
        (
            r#"gen_ai_client_token_usage_count{gen_ai_token_type="input"}"#,
            3.0,
        ),
        (
            r#"gen_ai_client_token_usage_sum{gen_ai_token_type="input"}"#,
            24.0,
        ),
        (
            r#"gen_ai_client_token_usage_count{gen_ai_token_type="output"}"#,
            3.0,
        ),
        (
            r#"gen_ai_client_token_usage_sum{gen_ai_token_type="output"}"#,
            30.0,
        ),
    ];
    for (series, value) in want {
        assert_eq!(got.get(*series), Some(value), "{series} in\n{text}");
    }
    // Estimates above the reported usage were given back.
    assert!(
        got[r#"llm_layers_rate_limit_tokens{kind="refunded"}"#] > 0.0,
        "{text}"
    );
    assert!(
        got[r#"llm_layers_rate_limit_tokens{kind="charged"}"#] > 0.0,
        "{text}"
    );
    // Nothing else was refused, retried or stopped, and the fallback answered: no refusal of
    // the breaker's own reached a client.
    let count = |prefix: &str| got.keys().filter(|k| k.starts_with(prefix)).count();
    assert_eq!(count("llm_layers_rejections{"), 6, "{text}");
    assert_eq!(count("llm_layers_normalize_classifications{"), 3, "{text}");
    assert_eq!(
        count("gen_ai_client_operation_duration_count{"),
        5,
        "{text}"
    );
    assert_eq!(count("llm_layers_retry_retries{"), 2, "{text}");
    assert_eq!(count("llm_layers_retry_stops{"), 1, "{text}");
    assert_eq!(count("llm_layers_breaker_transitions{"), 1, "{text}");
    assert!(!text.contains("layer=\"breaker\",code"), "{text}");
    // No secret in any label.
    for secret in [FULL, MINI, EXPIRED, REVOKED, FREE] {
        assert!(!text.contains(&secret[8..]), "{secret} in\n{text}");
    }
}

/// The value of one counter or gauge in a debugging recorder's snapshot, by name and labels.
fn recorded(
    snapshot: &[(
        metrics_util::CompositeKey,
        Option<metrics::Unit>,
        Option<metrics::SharedString>,
        metrics_util::debugging::DebugValue,
    )],
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    use metrics_util::debugging::DebugValue;
    snapshot.iter().find_map(|(key, _, _, value)| {
        let key = key.key();
        let same = key.name() == name
            && key.labels().count() == labels.len()
            && labels
                .iter()
                .all(|(k, v)| key.labels().any(|l| l.key() == *k && l.value() == *v));
        match (same, value) {
            (true, DebugValue::Counter(n)) => Some(*n as f64),
            (true, DebugValue::Gauge(g)) => Some(g.into_inner()),
            _ => None,
        }
    })
}

#[tokio::test(start_paused = true)]
async fn a_circuits_probes_transitions_and_state_are_recorded() {
    use llm_layers::breaker::CircuitBreakerLayer;
    use llm_layers::metrics::{BREAKER_PROBES, BREAKER_STATE, BREAKER_TRANSITIONS};
    use std::sync::atomic::{AtomicU16, Ordering};
    use std::sync::Arc;
    use std::time::Duration;
    use tower::{Layer, ServiceExt};

    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);
    let layer = CircuitBreakerLayer::builder()
        .name("probe-test")
        .consecutive_failures(1)
        .half_open_probes(1)
        .open_duration(Duration::from_secs(10))
        .open_backoff(1.0, Duration::from_secs(10))
        .jitter(0.0)
        .build()
        .unwrap();
    let answer = Arc::new(AtomicU16::new(500));
    let up = {
        let answer = answer.clone();
        tower::service_fn(move |_req: http::Request<_>| {
            let status = answer.load(Ordering::SeqCst);
            async move {
                Ok::<_, std::convert::Infallible>(
                    http::Response::builder()
                        .status(status)
                        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
                        .unwrap(),
                )
            }
        })
    };
    let svc = layer.layer(up);
    let call = || async {
        let req = http::Request::post("/v1/chat/completions")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                br#"{"model":"m"}"#,
            )))
            .unwrap();
        let res = svc.clone().oneshot(req).await.unwrap();
        let status = res.status().as_u16();
        http_body_util::BodyExt::collect(res.into_body())
            .await
            .ok()
            .unwrap();
        status
    };
    let name = ("name", "probe-test");
    let circuit = ("circuit", llm_layers::breaker::SINGLE_KEY);
    // Each snapshot takes the values recorded since the last one (counters from 0).
    let take = || snapshotter.snapshot().into_vec();
    let transition = |s: &[_], from, to, reason| {
        recorded(
            s,
            BREAKER_TRANSITIONS,
            &[name, ("from", from), ("to", to), ("reason", reason)],
        )
    };

    assert_eq!(call().await, 500);
    let s = take();
    assert_eq!(transition(&s, "closed", "open", "failure_rate"), Some(1.0));
    assert_eq!(recorded(&s, BREAKER_STATE, &[name, circuit]), Some(1.0));
    // Open: refused without a call.
    assert_eq!(call().await, 503);
    // The open time passes; the probe fails: open again.
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(call().await, 500);
    let s = take();
    assert_eq!(
        recorded(
            &s,
            llm_layers::metrics::BREAKER_REJECTIONS,
            &[name, circuit]
        ),
        Some(1.0)
    );
    let refused = [
        ("layer", "breaker"),
        ("code", "service_unavailable"),
        ("key_id", "none"),
    ];
    assert_eq!(
        recorded(&s, llm_layers::metrics::REJECTIONS, &refused),
        Some(1.0)
    );
    assert_eq!(
        transition(&s, "open", "half_open", "open_elapsed"),
        Some(1.0)
    );
    assert_eq!(
        transition(&s, "half_open", "open", "probe_failed"),
        Some(1.0)
    );
    assert_eq!(
        recorded(&s, BREAKER_PROBES, &[name, ("result", "failed")]),
        Some(1.0)
    );
    assert_eq!(recorded(&s, BREAKER_STATE, &[name, circuit]), Some(1.0));
    // Again, and the probe succeeds: closed.
    tokio::time::advance(Duration::from_secs(10)).await;
    answer.store(200, Ordering::SeqCst);
    assert_eq!(call().await, 200);
    let s = take();
    assert_eq!(
        transition(&s, "open", "half_open", "open_elapsed"),
        Some(1.0)
    );
    assert_eq!(
        transition(&s, "half_open", "closed", "probes_succeeded"),
        Some(1.0)
    );
    assert_eq!(
        recorded(&s, BREAKER_PROBES, &[name, ("result", "ok")]),
        Some(1.0)
    );
    assert_eq!(recorded(&s, BREAKER_STATE, &[name, circuit]), Some(0.0));
    assert_eq!(
        recorded(&s, BREAKER_PROBES, &[name, ("result", "failed")]),
        Some(0.0)
    );
}

/// `gen_ai.client.operation.duration`: each call through the normalizer, to its answer's head,
/// by operation, with the code of a failure (paused time: the durations are exact).
#[tokio::test(start_paused = true)]
async fn each_call_to_the_upstream_is_timed_by_operation_and_error() {
    use std::time::Duration;

    use llm_layers::metrics::OPERATION_DURATION;
    use llm_layers::normalize::NormalizeErrorsLayer;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use tower::{Layer, ServiceExt};

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);
    // An upstream that takes 2 s for chat, 1 s for embeddings, and fails with 503 for
    // `/v1/completions` after 3 s.
    let upstream = tower::service_fn(|req: http::Request<String>| async move {
        let (wait, status) = match req.uri().path() {
            "/v1/chat/completions" => (2, 200),
            "/v1/embeddings" => (1, 200),
            _ => (3, 503),
        };
        tokio::time::sleep(Duration::from_secs(wait)).await;
        Ok::<_, std::convert::Infallible>(
            http::Response::builder()
                .status(status)
                .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
                .unwrap(),
        )
    });
    let svc = NormalizeErrorsLayer::new().layer(upstream);
    for path in [
        "/v1/chat/completions",
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/completions",
    ] {
        let req = http::Request::post(path).body(String::new()).unwrap();
        svc.clone().oneshot(req).await.unwrap();
    }
    let snapshot = snapshotter.snapshot().into_vec();
    let samples = |labels: &[(&str, &str)]| {
        snapshot.iter().find_map(|(key, _, _, value)| {
            let key = key.key();
            let same = key.name() == OPERATION_DURATION
                && key.labels().count() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| key.labels().any(|l| l.key() == *k && l.value() == *v));
            match (same, value) {
                (true, DebugValue::Histogram(v)) => {
                    Some(v.iter().map(|f| f.into_inner()).collect::<Vec<f64>>())
                }
                _ => None,
            }
        })
    };
    assert_eq!(
        samples(&[("gen_ai.operation.name", "chat")]),
        Some(vec![2.0, 2.0])
    );
    assert_eq!(
        samples(&[("gen_ai.operation.name", "embeddings")]),
        Some(vec![1.0])
    );
    assert_eq!(
        samples(&[
            ("gen_ai.operation.name", "text_completion"),
            ("error.type", "service_unavailable")
        ]),
        Some(vec![3.0])
    );
}

/// The `route` label is the route's template, as the gateway's router configured it: never a
/// client's path, with its query or the ids it may carry. A path no route matches is answered
/// by the router before any layer, and counted nowhere.
#[tokio::test]
async fn a_client_path_with_ids_or_a_query_is_not_a_label() {
    let recorder = gateway_metrics::recorder();
    let handle = recorder.handle();
    let _local = metrics::set_default_local_recorder(&recorder);
    let addr = gateway(handle).await;
    let client = reqwest::Client::new();
    let query = "/v1/chat/completions?user=u-1234&session=s-5678";
    let hot = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "temperature": 3});
    assert_eq!(
        post(&client, addr, query, None, &hello("gpt-4o-mini"), &[])
            .await
            .0,
        401
    );
    assert_eq!(
        post(&client, addr, query, Some(FULL), &hot, &[]).await.0,
        400
    );
    assert_eq!(
        post(&client, addr, query, Some(FULL), &hello("gpt-4o-mini"), &[])
            .await
            .0,
        200
    );
    let with_id = "/v1/chat/completions/c-9012";
    assert_eq!(
        post(
            &client,
            addr,
            with_id,
            Some(FULL),
            &hello("gpt-4o-mini"),
            &[]
        )
        .await
        .0,
        404
    );

    let text = client
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let got = samples(&text);
    let want: &[(&str, f64)] = &[
        (
            r#"llm_layers_rejections{layer="auth",code="invalid_api_key",key_id="none",route="/v1/chat/completions"}"#,
            1.0,
        ),
        (
            r#"llm_layers_rejections{layer="validate",code="invalid_value",key_id="demo-full",route="/v1/chat/completions"}"#,
            1.0,
        ),
        (
            r#"gen_ai_client_operation_duration_count{gen_ai_operation_name="chat",route="/v1/chat/completions"}"#,
            1.0,
        ),
        // The 404 met no layer.
        (r#"llm_layers_requests{layer="auth"}"#, 3.0),
    ];
    for (series, value) in want {
        assert_eq!(got.get(*series), Some(value), "{series} in\n{text}");
    }
    // Every route label is a configured template.
    let templates = [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/models",
        "/healthz",
    ];
    let mut routes = 0;
    for series in got.keys() {
        for part in series.split(['{', ',', '}']) {
            if let Some(value) = part.strip_prefix("route=") {
                routes += 1;
                let value = value.trim_matches('"');
                assert!(templates.contains(&value), "route {value:?} in {series}");
            }
        }
    }
    assert!(routes >= 3, "{text}");
    for client_string in ["u-1234", "s-5678", "c-9012", "?user", "session="] {
        assert!(!text.contains(client_string), "{client_string} in\n{text}");
    }
}

/// The layers after auth that answer later than their call (the breaker's refusal, the retry
/// layer's own timeout) still name the request's key and route: each took them when it was
/// called (paused time).
#[tokio::test(start_paused = true)]
async fn the_breakers_and_the_retry_layers_rejections_name_the_key_and_route() {
    use llm_layers::breaker::CircuitBreakerLayer;
    use llm_layers::ext::{KeyIdentity, Route};
    use llm_layers::metrics::REJECTIONS;
    use llm_layers::retry::RetryLayer;
    use std::time::Duration;
    use tower::{Layer, ServiceExt};

    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);
    let request = || {
        let mut req = http::Request::post("/v1/chat/completions")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                br#"{"model":"m"}"#,
            )))
            .unwrap();
        req.extensions_mut().insert(KeyIdentity::new("team-a"));
        req.extensions_mut()
            .insert(Route::new("/v1/chat/completions"));
        req
    };
    let answer = |status: u16| {
        http::Response::builder()
            .status(status)
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
            .unwrap()
    };

    // The breaker: one failure opens the circuit, the next call is refused.
    let breaker =
        CircuitBreakerLayer::builder()
            .name("labels")
            .consecutive_failures(1)
            .open_duration(Duration::from_secs(10))
            .build()
            .unwrap()
            .layer(tower::service_fn(
                move |_req: http::Request<_>| async move {
                    Ok::<_, std::convert::Infallible>(answer(500))
                },
            ));
    assert_eq!(
        breaker.clone().oneshot(request()).await.unwrap().status(),
        500
    );
    assert_eq!(breaker.oneshot(request()).await.unwrap().status(), 503);

    // The retry layer: an upstream that never answers within the attempt timeout.
    let retry = RetryLayer::builder()
        .max_attempts(1)
        .attempt_timeout(Duration::from_secs(1))
        .build()
        .unwrap()
        .layer(tower::service_fn(
            move |_req: http::Request<_>| async move {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok::<_, std::convert::Infallible>(answer(200))
            },
        ));
    assert_eq!(retry.oneshot(request()).await.unwrap().status(), 504);

    let s = snapshotter.snapshot().into_vec();
    let labels = |layer, code| {
        [
            ("layer", layer),
            ("code", code),
            ("key_id", "team-a"),
            ("route", "/v1/chat/completions"),
        ]
    };
    assert_eq!(
        recorded(&s, REJECTIONS, &labels("breaker", "service_unavailable")),
        Some(1.0)
    );
    assert_eq!(
        recorded(&s, REJECTIONS, &labels("retry", "timeout")),
        Some(1.0)
    );
}
