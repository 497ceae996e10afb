//! The example gateway's `GET /v1/llm-layers/status` (behind the admin key) and its health
//! check of the upstream (`[breaker.health_check]`), over real HTTP on 127.0.0.1.
#![cfg(all(feature = "config", feature = "rate-limit"))]

mod common_gateway;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common_gateway::{answer, app, completion, serve, Stub};
use llm_layers::breaker::HealthCheckTask;
use reqwest::StatusCode;
use serde_json::Value;

const ADMIN: &str = "sk-admin-test-0123456789abcdef";
const TEAM_A: &str = "sk-test-team-a-0123456789abcdef";

fn sha256_hex(s: &str) -> String {
    llm_layers::auth::KeyHash::of(s.as_bytes()).to_hex()
}

/// A gateway configuration: one key, a small request quota, a breaker that opens after four
/// failures in a row of calls, no retries; `extra` is appended (more tables).
fn config(extra: &str) -> String {
    format!(
        r#"
[[keys]]
id = "team-a"
secret = "{TEAM_A}"

[rate_limit.defaults]
rpm = 60
burst = 10

[retry]
max_attempts = 1

[breaker]
name = "upstream"
window = 4
minimum_calls = 4
failure_rate = 50.0
open_ms = 30000
half_open_probes = 1
seed = 1
{extra}
"#
    )
}

fn admin_table() -> String {
    format!("\n[admin]\nkey_sha256 = \"{}\"\n", sha256_hex(ADMIN))
}

/// The gateway as `main.rs` builds it: the proxy, the status route and the health check.
async fn start(config: &str, upstream: &str) -> (SocketAddr, Option<HealthCheckTask>) {
    let (stack, gw) = app::load(config).unwrap_or_else(|e| panic!("config: {e}"));
    let base: axum::http::Uri = upstream.parse().unwrap();
    let tls = gw.tls().unwrap();
    let health = app::status::start_health_check(&stack, base.clone(), None, tls.clone());
    let proxy = app::upstream_with(&stack, &gw.forward_headers, tls, base, None);
    let router = app::router(&stack, proxy).merge(app::status::router(&stack, gw.admin.as_ref()));
    (serve(router).await, health)
}

async fn status(addr: SocketAddr, key: Option<&str>) -> (StatusCode, Value) {
    let mut req = reqwest::Client::new().get(format!("http://{addr}/v1/llm-layers/status"));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let res = req.send().await.unwrap();
    let status = res.status();
    let body = res.bytes().await.unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

async fn chat(addr: SocketAddr) -> StatusCode {
    reqwest::Client::new()
        .post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth(TEAM_A)
        .json(&serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
        .status()
}

/// A stub upstream: `/v1/models` and chat answer `status` (a completion when 200).
async fn stub(status: Arc<AtomicU16>) -> Stub {
    Stub::start(move |call| match status.load(Ordering::SeqCst) {
        200 if call.path.ends_with("/chat/completions") => completion(call.json),
        200 => answer(200, "application/json", r#"{"object":"list","data":[]}"#),
        s => answer(
            s,
            "application/json",
            r#"{"error":{"message":"down","type":"server_error"}}"#,
        ),
    })
    .await
}

#[tokio::test]
async fn without_an_admin_table_the_endpoint_does_not_exist() {
    let up = stub(Arc::new(AtomicU16::new(200))).await;
    let (addr, health) = start(&config(""), &up.base()).await;
    assert!(health.is_none());
    assert_eq!(status(addr, Some(ADMIN)).await.0, StatusCode::NOT_FOUND);
    assert_eq!(status(addr, None).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_admin_key_and_only_it_opens_the_status() {
    let up = stub(Arc::new(AtomicU16::new(200))).await;
    let (addr, _) = start(&config(&admin_table()), &up.base()).await;
    for key in [None, Some("sk-wrong-admin-key-0123456789"), Some(TEAM_A)] {
        let (code, body) = status(addr, key).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED, "{key:?}");
        assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
    }
    let (code, body) = status(addr, Some(ADMIN)).await;
    assert_eq!(code, StatusCode::OK);
    assert!(body["circuits"].is_array(), "{body}");
    // And the admin key opens no API route.
    let res = reqwest::Client::new()
        .get(format!("http://{addr}/v1/models"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_status_shows_an_open_circuit_and_what_each_key_has_left() {
    let st = Arc::new(AtomicU16::new(200));
    let up = stub(st.clone()).await;
    let (addr, _) = start(&config(&admin_table()), &up.base()).await;
    let t0 = std::time::Instant::now();
    let elapsed_ms = || u64::try_from(t0.elapsed().as_millis()).unwrap() + 1;
    // Two successes, then failures until the circuit opens (4 calls, 50 %).
    assert_eq!(chat(addr).await, StatusCode::OK);
    assert_eq!(chat(addr).await, StatusCode::OK);
    let (_, body) = status(addr, Some(ADMIN)).await;
    let c = &body["circuits"][0];
    assert_eq!(
        (c["key"].as_str(), c["state"].as_str()),
        (Some("*"), Some("closed")),
        "{body}"
    );
    assert_eq!(c["failure_rate"], 0.0);
    assert_eq!(c["until_half_open_ms"], Value::Null);
    st.store(500, Ordering::SeqCst);
    chat(addr).await;
    let (_, body) = status(addr, Some(ADMIN)).await;
    assert!((body["circuits"][0]["failure_rate"].as_f64().unwrap() - 100.0 / 3.0).abs() < 1e-9);
    chat(addr).await;
    let (_, body) = status(addr, Some(ADMIN)).await;
    let c = &body["circuits"][0];
    assert_eq!(c["state"], "open", "{body}");
    assert_eq!(c["openings"], 1);
    let until = c["until_half_open_ms"].as_u64().unwrap();
    let open_for = c["open_for_ms"].as_u64().unwrap();
    assert!((27_000..=33_000).contains(&open_for), "{c}");
    assert!(until <= open_for && until + elapsed_ms() >= open_for, "{c}");
    // Open: a fifth call is refused by the breaker and counted.
    assert_eq!(chat(addr).await, StatusCode::SERVICE_UNAVAILABLE);
    let (_, body) = status(addr, Some(ADMIN)).await;
    assert_eq!(body["circuits"][0]["rejections"], 1);

    // Five requests of team-a, each one cell of its 10: 5 left, full again in 5 s.
    let keys = &body["rate_limits"]["keys"];
    assert_eq!(keys.as_array().unwrap().len(), 1, "{body}");
    let k = &keys[0];
    assert_eq!(k["key"], "team-a");
    let q = &k["quotas"][0];
    assert_eq!(
        (q["unit"].as_str(), q["limit"].as_u64()),
        (Some("requests"), Some(10))
    );
    assert_eq!(q["remaining"], 5, "{k}");
    let reset = q["reset_ms"].as_u64().unwrap();
    assert!(reset <= 5_000 && reset + elapsed_ms() >= 5_000, "{k}");
    assert_eq!(body["rate_limits"]["truncated"], false);
    let text = body.to_string();
    assert!(
        !text.contains(TEAM_A) && !text.contains(ADMIN),
        "no secret in {text}"
    );
}

/// Holds off the paused clock's auto-advance while it lives (tokio does not auto-advance while
/// a blocking task runs): time moves only by `advance`, while the sockets are served.
struct HoldClock(Option<std::sync::mpsc::Sender<()>>);

impl HoldClock {
    fn new() -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        tokio::task::spawn_blocking(move || {
            let _ = rx.recv();
        });
        HoldClock(Some(tx))
    }
}

impl Drop for HoldClock {
    fn drop(&mut self) {
        self.0.take();
    }
}

/// Reads the status until the first circuit is in `state` (each read is a real request, during
/// which the probe in flight goes on); at most `tries` reads.
async fn until_state(addr: SocketAddr, state: &str, tries: usize) -> Value {
    for _ in 0..tries {
        let (_, body) = status(addr, Some(ADMIN)).await;
        if body["circuits"][0]["state"] == state {
            return body;
        }
    }
    panic!("the circuit never became {state}");
}

#[tokio::test(start_paused = true)]
async fn the_gateway_probes_its_upstream_and_opens_the_circuit_with_no_live_traffic() {
    let _hold = HoldClock::new();
    let st = Arc::new(AtomicU16::new(503));
    let up = stub(st.clone()).await;
    let extra = format!(
        "{}\n[breaker.health_check]\ninterval_ms = 10000\ntimeout_ms = 2000\nfailures_to_open = 2\nseed = 4\n",
        admin_table()
    );
    let (addr, health) = start(&config(&extra), &up.base()).await;
    let _health = health.expect("the gateway starts the configured health check");
    // The first probe at once, the second ~10 s later: open, and no live call was made.
    let (_, body) = status(addr, Some(ADMIN)).await;
    assert_eq!(body["circuits"][0]["state"], "closed");
    tokio::time::advance(Duration::from_secs(11)).await;
    let body = until_state(addr, "open", 10_000).await;
    assert_eq!(body["circuits"][0]["calls"], 0, "{body}");
    assert_eq!(up.calls(), 2, "two probes, nothing else");

    // The upstream is back: the next probe takes the circuit half-open, a live call closes it.
    st.store(200, Ordering::SeqCst);
    tokio::time::advance(Duration::from_secs(11)).await;
    until_state(addr, "half_open", 10_000).await;
    assert_eq!(chat(addr).await, StatusCode::OK);
    let (_, body) = status(addr, Some(ADMIN)).await;
    assert_eq!(body["circuits"][0]["state"], "closed", "{body}");
    assert_eq!(up.calls(), 4);
}

#[test]
fn health_check_and_admin_settings_are_checked_where_they_are_written() {
    let err = |extra: &str| {
        app::load(&config(extra))
            .map(|_| ())
            .expect_err("refused")
            .to_string()
    };
    // The line of `needle` in the document with `extra`.
    let line = |extra: &str, needle: &str| {
        let text = config(extra);
        let at = text.find(needle).unwrap();
        format!("line {}", text[..at].matches('\n').count() + 1)
    };
    let extra = "\n[breaker.health_check]\ninterval_ms = 0\n";
    let e = err(extra);
    assert!(
        e.contains("breaker.health_check.interval_ms") && e.contains(&line(extra, "interval_ms")),
        "{e}"
    );
    let e = err("\n[breaker.health_check]\nintervall_ms = 1000\n");
    assert!(
        e.contains("breaker.health_check") && e.contains("intervall_ms"),
        "{e}"
    );
    let e = err("\n[breaker.health_check]\njitter = 1.5\n");
    assert!(
        e.contains("`breaker.health_check`") && e.contains("jitter"),
        "{e}"
    );
    let e = err("\n[breaker.health_check]\nmodel = \"gpt-4o\"\n");
    assert!(e.contains("breaker.health_check.model"), "{e}");
    let e = err("\n[routes.\"/v1/completions\".breaker.health_check]\ninterval_ms = 1000\n");
    assert!(
        e.contains("routes.\"/v1/completions\".breaker.health_check"),
        "{e}"
    );
    let extra = "\n[admin]\nkey_sha256 = \"zz\"\n";
    let e = err(extra);
    assert!(
        e.contains("admin.key_sha256") && e.contains(&line(extra, "key_sha256")),
        "{e}"
    );
    let e = err("\n[admin]\n");
    assert!(e.contains("`admin`"), "{e}");
    let e = err("\n[admin]\nkey_sha256_env = \"LLM_LAYERS_TEST_UNSET_ADMIN_DIGEST\"\n");
    assert!(e.contains("admin.key_sha256_env"), "{e}");
    // A model-keyed breaker probes the model's circuit.
    let ok = config("").replace(
        "name = \"upstream\"",
        "name = \"upstream\"\nkey_by = \"model\"",
    ) + "\n[breaker.health_check]\nmodel = \"gpt-4o\"\n";
    let (stack, _) = app::load(&ok).unwrap();
    let check = stack.health_check().unwrap();
    assert_eq!(check.key(), "gpt-4o");
    assert_eq!(check.uri().path(), "/v1/models/gpt-4o");
}
