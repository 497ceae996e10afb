//! The example gateway as shipped: its own configuration file, its router and its embedded mock
//! upstream, over real HTTP. Each test is one of the `curl` lines of `docs/gateway.md`.
#![cfg(all(feature = "config", feature = "rate-limit"))]

mod common_gateway;

use common_gateway::{
    app, assert_envelope, chat, completion, gateway, gateway_with_key, get, hello, mock, serve,
    Stub, TestCa,
};
use llm_layers::stack::Stack;
use reqwest::StatusCode;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CONFIG: &str = include_str!("../examples/gateway.toml");
const FULL: &str = "sk-demo-full-0123456789abcdef";
const MINI: &str = "sk-demo-mini-0123456789abcdef";
const EXPIRED: &str = "sk-demo-expired-0123456789ab";
const REVOKED: &str = "sk-demo-revoked-0123456789ab";
const FREE: &str = "sk-demo-free-0123456789abcdef";

/// The example's gateway in front of its embedded mock, as `cargo run --example gateway` runs
/// (which forwards `x-mock-fault` too).
async fn demo() -> (SocketAddr, reqwest::Client) {
    let (stack, mut gw) = app::load(CONFIG).unwrap();
    gw.forward_header("--forward-header", "x-mock-fault")
        .unwrap();
    let mock = mock::start().await.unwrap();
    let base = format!("http://{mock}/v1").parse().unwrap();
    let upstream = app::upstream_with(&stack, &gw.forward_headers, gw.tls().unwrap(), base, None);
    let addr = serve(app::router(&stack, upstream)).await;
    (addr, reqwest::Client::new())
}

#[test]
fn the_shipped_config_parses_and_builds() {
    let (stack, gw) = app::load(CONFIG).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(gw.forward_headers, app::DEFAULT_FORWARD_HEADERS);
    assert_eq!(gw.upstream_ca, None);
    assert_eq!(stack.key_count(), 5);
    let models = stack.policy("/v1/models");
    assert!(models.auth && !models.validate && !models.rate_limit);
    let health = stack.policy("/healthz");
    assert!(!health.auth && !health.validate && !health.rate_limit);
    let chat = stack.policy("/v1/chat/completions");
    assert!(chat.auth && chat.validate && chat.rate_limit);
    // The legacy completions route has retry and breaker settings of its own.
    assert!(stack.has_own_upstream_layers("/v1/completions"));
    assert!(!stack.has_own_upstream_layers("/v1/chat/completions"));
    assert!(stack.policy("/v1/embeddings").rate_limit);
    // Also through the file API, as `--config examples/gateway.toml` reads it.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/gateway.toml");
    let (stack, _) = app::load(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(stack.key_count(), 5);
}

#[test]
fn a_bad_config_is_refused_naming_the_field() {
    let cases = [
        (
            CONFIG.replace("failure_rate = 50.0", "failure_rate = 150.0"),
            "breaker.failure_rate",
        ),
        (
            CONFIG.replace("window = 20 ", "window = \"twenty\" "),
            "breaker.window",
        ),
        (
            CONFIG.replace("rpm = 600", "rpm = 0"),
            "rate_limit.tiers.pro.rpm",
        ),
        (
            CONFIG.replace("revoked = true", "revoked = \"yes\""),
            "keys[3].revoked",
        ),
        (
            CONFIG.replace("expires_at = 2025-01-01T00:00:00Z", "expires_at = \"soon\""),
            "keys[2].expires_at",
        ),
        (
            CONFIG.replace("attempt_timeout_ms = 20000", "attempt_timout_ms = 20000"),
            "upstream.attempt_timout_ms",
        ),
        // Refused by the retry layer's builder: at the section, the message names the setting.
        (
            CONFIG.replace("max_attempts = 3", "max_attempts = 30"),
            "retry",
        ),
        (
            CONFIG.replace("budget_ratio = 0.2", "budget_ratio = -1.0"),
            "retry",
        ),
        (
            CONFIG.replace("key_by = \"model\" ", "key_by = \"modle\" "),
            "breaker.key_by",
        ),
        (
            CONFIG.replace("validate = false\nrate_limit = false\n\n[routes.\"/healthz\"]", "validate = false\nrate_limit = { defaults = { rpm = 0 } }\n\n[routes.\"/healthz\"]"),
            "routes.\"/v1/models\".rate_limit.defaults.rpm",
        ),
        (
            CONFIG.replace("body_limit = 1048576", "body_limit = 0"),
            "validation.body_limit",
        ),
    ];
    for (text, field) in cases {
        assert_ne!(text, CONFIG, "the case for {field} changes the file");
        let err = app::load(&text)
            .err()
            .unwrap_or_else(|| panic!("{field} accepted"));
        assert_eq!(err.field(), field, "{err}");
        assert!(!err.to_string().contains("sk-demo"), "{err}");
    }
    let err = Stack::from_toml_file("/nonexistent/gateway.toml").unwrap_err();
    assert_eq!(err.field(), "path");
}

#[tokio::test]
async fn each_layer_answers_as_documented() {
    let (addr, client) = demo().await;

    let ok = chat(&client, addr, FULL, &hello("gpt-4o-mini"), &[]).await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(ok.json()["choices"][0]["message"]["role"], "assistant");
    assert!(ok.header("x-ratelimit-limit-requests").is_some());

    for (key, code) in [(EXPIRED, "expired_api_key"), (REVOKED, "revoked_api_key")] {
        let got = chat(&client, addr, key, &hello("gpt-4o-mini"), &[]).await;
        assert_eq!(got.status, StatusCode::UNAUTHORIZED);
        assert_envelope(&got);
        assert_eq!(got.code(), code);
    }

    let got = chat(&client, addr, MINI, &hello("gpt-4o"), &[]).await;
    assert_eq!(got.status, StatusCode::FORBIDDEN);
    assert_envelope(&got);
    assert_eq!(got.code(), "permission_denied");

    let body =
        json!({"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"temperature":3});
    let got = chat(&client, addr, FULL, &body, &[]).await;
    assert_eq!(got.status, StatusCode::BAD_REQUEST);
    assert_envelope(&got);
    assert_eq!(got.json()["error"]["param"], "temperature");

    // The free key's own limit is 2 requests per minute.
    for _ in 0..2 {
        let got = chat(&client, addr, FREE, &hello("gpt-4o-mini"), &[]).await;
        assert_eq!(got.status, StatusCode::OK);
    }
    let got = chat(&client, addr, FREE, &hello("gpt-4o-mini"), &[]).await;
    assert_eq!(got.status, StatusCode::TOO_MANY_REQUESTS);
    assert_envelope(&got);
    assert_eq!(got.code(), "rate_limit_exceeded");
    assert_eq!(got.header("x-should-retry"), Some("true"));
    assert!(got.header("retry-after").is_some());
    // Another key is not affected.
    let got = chat(&client, addr, FULL, &hello("gpt-4o-mini"), &[]).await;
    assert_eq!(got.status, StatusCode::OK);
}

#[tokio::test]
async fn routes_have_their_own_stacks() {
    let (addr, client) = demo().await;
    // /healthz: no auth at all.
    let got = get(&client, addr, "/healthz", None).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(&got.body[..], b"ok");
    // /v1/models: a key is needed ...
    let got = get(&client, addr, "/v1/models", None).await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED);
    assert_envelope(&got);
    // ... but no rate limit: the free key (2 per minute) lists models as often as it likes,
    // and no rate-limit headers are sent.
    for _ in 0..5 {
        let got = get(&client, addr, "/v1/models", Some(FREE)).await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(got.json()["object"], "list");
        assert!(got.header("x-ratelimit-limit-requests").is_none());
    }
    // The chat route is limited for the same key.
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(
            chat(&client, addr, FREE, &hello("gpt-4o-mini"), &[])
                .await
                .status,
        );
    }
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    // Every answer carries a request id.
    let got = get(&client, addr, "/healthz", None).await;
    assert!(got.header("x-request-id").is_some_and(|id| !id.is_empty()));
}

#[tokio::test]
async fn an_html_403_upstream_becomes_upstream_blocked() {
    let (addr, client) = demo().await;
    let got = chat(
        &client,
        addr,
        FULL,
        &hello("gpt-4o-mini"),
        &[("x-mock-fault", "html403")],
    )
    .await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{got:?}");
    assert_envelope(&got);
    assert_eq!(got.code(), "upstream_blocked");
    assert_eq!(got.header("x-should-retry"), Some("false"));
}

#[tokio::test]
async fn streams_pass_through_with_in_band_errors() {
    let (addr, client) = demo().await;
    let body =
        json!({"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]});

    let res = client
        .post(format!("http://{addr}/v1/chat/completions"))
        .header("authorization", format!("Bearer {FULL}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    // Chunks arrive one by one (the mock spaces them 20 ms apart): not buffered.
    let mut res = res;
    let mut chunks = Vec::new();
    while let Some(chunk) = res.chunk().await.unwrap() {
        chunks.push(chunk);
    }
    assert!(chunks.len() > 3, "{} chunks", chunks.len());
    let text: String = chunks.iter().map(|c| String::from_utf8_lossy(c)).collect();
    assert!(text.contains("chat.completion.chunk"));
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");

    // An error event inside a 200 stream reaches the client in-band, in envelope form.
    let got = chat(
        &client,
        addr,
        FULL,
        &body,
        &[("x-mock-fault", "stream-error")],
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    let text = String::from_utf8_lossy(&got.body).into_owned();
    let events: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: "))
        .collect();
    assert!(events.len() >= 2, "{text}");
    let last: serde_json::Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert!(last["error"]["message"].as_str().is_some(), "{text}");
    assert!(!text.contains("[DONE]"));

    // A stream that breaks off ends with an in-band error event, not a cut connection.
    let got = chat(
        &client,
        addr,
        FULL,
        &body,
        &[("x-mock-fault", "stream-cut")],
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    let text = String::from_utf8_lossy(&got.body).into_owned();
    assert!(text.contains("chat.completion.chunk"), "{text}");
    let last = text
        .split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: "))
        .last()
        .unwrap();
    let last: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(last["error"]["code"], "service_unavailable", "{text}");
}

#[tokio::test]
async fn faults_are_retried_and_exhaustion_is_marked() {
    let (addr, client) = demo().await;
    // 503 twice for the same request id, then an answer: the client only sees the answer.
    let got = chat(
        &client,
        addr,
        FULL,
        &hello("gpt-4o-mini"),
        &[("x-mock-fault", "flaky")],
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "{got:?}");
    assert_eq!(got.header("x-llm-layers-attempts"), Some("3"));

    // Always 503: three attempts, then the envelope tells the SDK not to retry again.
    let got = chat(
        &client,
        addr,
        FULL,
        &hello("gpt-4o-mini"),
        &[("x-mock-fault", "503")],
    )
    .await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_envelope(&got);
    assert_eq!(got.code(), "service_unavailable");
    assert_eq!(got.header("x-llm-layers-attempts"), Some("3"));
    assert_eq!(got.header("x-should-retry"), Some("false"));

    // Not retryable: one attempt.
    let got = chat(
        &client,
        addr,
        FULL,
        &hello("gpt-4o-mini"),
        &[("x-mock-fault", "html403")],
    )
    .await;
    assert_eq!(got.header("x-llm-layers-attempts"), Some("1"));
}

/// One key, everything else at its defaults, plus `extra`.
fn small_config(extra: &str) -> String {
    format!(
        "[[keys]]\nid = \"full\"\nsecret = \"{}\"\n\n{extra}\n",
        common_gateway::FULL
    )
}

/// A stub that records the headers of each call and answers with a completion.
async fn recording_stub() -> (Stub, Arc<Mutex<Vec<axum::http::HeaderMap>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let stub = Stub::start(move |call| {
        log.lock().unwrap().push(call.headers.clone());
        completion(call.json)
    })
    .await;
    (stub, seen)
}

/// Headers a client may send that choose the operator's account, billing or features upstream.
const CLIENT_HEADERS: [(&str, &str); 9] = [
    ("OpenAI-Organization", "org-attacker"),
    ("OpenAI-Project", "proj_attacker"),
    ("anthropic-beta", "max-tokens-3-5-sonnet-2024-07-15"),
    ("openai-beta", "assistants=v2"),
    ("idempotency-key", "someone-elses-key"),
    ("cookie", "session=1"),
    ("x-custom", "1"),
    ("accept", "application/json"),
    ("x-request-id", "req-from-client"),
];

#[tokio::test]
async fn only_allowed_client_headers_reach_the_upstream() {
    let (stub, seen) = recording_stub().await;
    let (addr, _) = gateway_with_key(
        &small_config(""),
        &stub.base(),
        Some("sk-operator-0123456789abcdef"),
    )
    .await;
    let client = reqwest::Client::builder()
        .user_agent("OpenAI/Python 1.50.0")
        .build()
        .unwrap();
    let got = chat(
        &client,
        addr,
        common_gateway::FULL,
        &hello("gpt-4o-mini"),
        &CLIENT_HEADERS,
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "{got:?}");
    let headers = seen.lock().unwrap().pop().unwrap();
    for name in [
        "openai-organization",
        "openai-project",
        "anthropic-beta",
        "openai-beta",
        "idempotency-key",
        "cookie",
        "x-custom",
    ] {
        assert!(headers.get(name).is_none(), "{name} reached the upstream");
    }
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["accept"], "application/json");
    assert_eq!(headers["user-agent"], "OpenAI/Python 1.50.0");
    assert_eq!(headers["x-request-id"], "req-from-client");
    assert_eq!(
        headers["authorization"],
        "Bearer sk-operator-0123456789abcdef"
    );
    // Nothing else but what the HTTP client sets from the URL and the body.
    let mut names: Vec<&str> = headers.keys().map(|n| n.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "accept",
            "authorization",
            "content-length",
            "content-type",
            "host",
            "user-agent",
            "x-request-id"
        ]
    );

    // The list is the operator's: here the beta header goes through and the user agent not.
    let (addr, _) = gateway(
        &small_config("[gateway]\nforward_headers = [\"content-type\", \"OpenAI-Beta\"]\n"),
        &stub.base(),
    )
    .await;
    let got = chat(
        &client,
        addr,
        common_gateway::FULL,
        &hello("gpt-4o-mini"),
        &CLIENT_HEADERS,
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "{got:?}");
    let headers = seen.lock().unwrap().pop().unwrap();
    assert_eq!(headers["openai-beta"], "assistants=v2");
    assert!(headers.get("user-agent").is_none());
    assert!(headers.get("openai-organization").is_none());
    // The id the gateway answers with is the one the client sent.
    assert_eq!(got.header("x-request-id"), Some("req-from-client"));
}

#[test]
fn the_gateway_table_is_checked_at_start() {
    let cases = [
        (
            "forward_headers = [\"connection\"]",
            "gateway.forward_headers[0]",
        ),
        (
            "forward_headers = [\"accept\", \"Authorization\"]",
            "gateway.forward_headers[1]",
        ),
        (
            "forward_headers = [\"bad header\"]",
            "gateway.forward_headers[0]",
        ),
        (
            "forward_headers = [\"transfer-encoding\"]",
            "gateway.forward_headers[0]",
        ),
        ("forward_headers = \"accept\"", "gateway.forward_headers"),
        ("forward = []", "gateway.forward"),
    ];
    for (line, field) in cases {
        let err = app::load(&small_config(&format!("[gateway]\n{line}")))
            .err()
            .unwrap_or_else(|| panic!("{line} accepted"));
        assert_eq!(err.field(), field, "{line}: {err}");
    }
    // The stack's own errors still name their line, with the `[gateway]` table above them.
    let err = app::load("[gateway]\nforward_headers = []\n\n[breaker]\nwindow = \"x\"\n")
        .err()
        .unwrap();
    assert_eq!(err.field(), "breaker.window", "{err}");
    assert!(err.to_string().contains("line 5"), "{err}");
    // Dotted keys are the same table to TOML, and read the same.
    let (_, gw) = app::load("gateway.forward_headers = [\"accept\"]\n").unwrap();
    assert_eq!(gw.forward_headers, ["accept"]);
    let err = app::load("gateway = 3\n").err().unwrap();
    assert_eq!(err.field(), "gateway", "{err}");

    // A CA file that is missing or holds no certificate.
    let (_, gw) = app::load("[gateway]\nupstream_ca = \"/nonexistent/ca.pem\"\n").unwrap();
    let err = gw.tls().unwrap_err();
    assert_eq!(err.field(), "gateway.upstream_ca");
    assert!(err.message().contains("/nonexistent/ca.pem"), "{err}");
    let ca = TestCa::new("empty");
    std::fs::write(&ca.pem_file, "not a certificate\n").unwrap();
    let err = app::tls_config(Some(&ca.pem_file), "--upstream-ca").unwrap_err();
    assert_eq!(err.field(), "--upstream-ca");
    assert!(err.message().contains("no PEM certificate"), "{err}");
}

#[tokio::test]
async fn an_https_upstream_with_a_private_ca_answers_200() {
    let ca = TestCa::new("llm-layers test CA");
    let stub = Stub::start_tls(&ca, |call| completion(call.json)).await;
    let config = small_config(&format!(
        "[gateway]\nupstream_ca = {:?}\n",
        ca.pem_file.to_str().unwrap()
    ));
    let client = reqwest::Client::new();
    // By IP address and by name: the certificate holds both.
    for host in ["127.0.0.1", "localhost"] {
        let base = format!("https://{host}:{}/v1", stub.addr.port());
        let (addr, _) = gateway(&config, &base).await;
        let got = chat(
            &client,
            addr,
            common_gateway::FULL,
            &hello("gpt-4o-mini"),
            &[],
        )
        .await;
        assert_eq!(got.status, StatusCode::OK, "{host}: {got:?}");
        assert_eq!(got.json()["model"], "gpt-4o-mini");
    }
    assert_eq!(stub.calls(), 2);
}

#[tokio::test]
async fn an_untrusted_certificate_is_a_clear_envelope_error() {
    let ca = TestCa::new("a CA the gateway does not know");
    let stub = Stub::start_tls(&ca, |call| completion(call.json)).await;
    let base = format!("https://127.0.0.1:{}/v1", stub.addr.port());
    let (addr, _) = gateway(&small_config(""), &base).await;
    let client = reqwest::Client::new();
    let got = tokio::time::timeout(
        Duration::from_secs(10),
        chat(
            &client,
            addr,
            common_gateway::FULL,
            &hello("gpt-4o-mini"),
            &[],
        ),
    )
    .await
    .expect("answered, not hung");
    assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{got:?}");
    assert_envelope(&got);
    assert_eq!(got.code(), "service_unavailable");
    let message = got.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains("TLS") && message.contains("certificate"),
        "{message}"
    );
    // The same certificate would be refused again: not retried, and the SDK is told so.
    assert_eq!(got.header("x-should-retry"), Some("false"));
    assert_eq!(got.header("x-llm-layers-attempts"), Some("1"));
    assert_eq!(stub.calls(), 0);
}

/// The example binary that `cargo test` builds next to the test binaries, if it was built
/// (a focused `cargo test --test gateway` does not build examples).
fn example_binary() -> Option<std::path::PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("examples").join("gateway");
    bin.exists().then_some(bin)
}

#[tokio::test]
async fn the_binary_starts_answers_and_refuses_a_bad_config() {
    let Some(bin) = example_binary() else {
        eprintln!(
            "skipped: target/*/examples/gateway is not built (run `cargo test --all-features`)"
        );
        return;
    };
    // A bad configuration: exit code 2, the field named on stderr, nothing on stdout.
    let dir = std::env::temp_dir().join(format!("llm-layers-gateway-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        CONFIG.replace("open_ms = 15000", "open_ms = \"soon\""),
    )
    .unwrap();
    let out = tokio::process::Command::new(&bin)
        .args(["--listen", "127.0.0.1:0", "--config"])
        .arg(&bad)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`breaker.open_ms`"), "{stderr}");
    assert!(out.stdout.is_empty());
    // Bad flags of the gateway itself, the same way.
    for (args, named) in [
        (["--upstream-ca", "/nonexistent/ca.pem"], "`--upstream-ca`"),
        (["--forward-header", "connection"], "`--forward-header`"),
        (["--upstream", "ftp://example.com/v1"], "--upstream"),
    ] {
        let out = tokio::process::Command::new(&bin)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(named), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }

    // No arguments but a free port: the startup line first, then the demo keys; it answers.
    let mut child = tokio::process::Command::new(&bin)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next_line().await.unwrap().unwrap();
    let addr = first
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("{first}"))
        .parse::<SocketAddr>()
        .unwrap();
    let mut printed = String::new();
    while let Some(line) = lines.next_line().await.unwrap() {
        printed.push_str(&line);
        printed.push('\n');
        if line.trim_start().starts_with("faults:") {
            break;
        }
    }
    for key in [FULL, MINI, EXPIRED, REVOKED, FREE] {
        assert!(printed.contains(key), "{printed}");
    }
    let client = reqwest::Client::new();
    assert_eq!(
        get(&client, addr, "/healthz", None).await.status,
        StatusCode::OK
    );
    let got = chat(&client, addr, FULL, &hello("gpt-4o-mini"), &[]).await;
    assert_eq!(got.status, StatusCode::OK);
    child.kill().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

mod never_panics {
    use super::CONFIG;
    use proptest::prelude::*;

    fn check(text: &str) -> Result<(), TestCaseError> {
        if let Err(e) = super::app::load(text) {
            prop_assert!(!e.field().is_empty(), "{e}");
            prop_assert!(!e.message().is_empty(), "{e}");
            prop_assert!(!e.to_string().contains("sk-demo-"), "a secret in {e}");
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any document is built or refused with a field and a message, never a panic.
        #[test]
        fn any_document(text in "[\\[\\]a-z_.=\" 0-9#\n-]{0,300}") {
            check(&text)?;
        }

        /// The shipped file with one line's value replaced by junk.
        #[test]
        fn the_shipped_file_with_one_value_broken(
            line in 0usize..140,
            junk in "[a-z0-9\"\\[\\]{}.,:= -]{0,16}",
        ) {
            let text: Vec<String> = CONFIG
                .lines()
                .enumerate()
                .map(|(i, l)| match (i == line, l.split_once('=')) {
                    (true, Some((key, _))) => format!("{key}= {junk}"),
                    _ => l.to_owned(),
                })
                .collect();
            check(&text.join("\n"))?;
        }
    }
}

/// `--keys FILE`: a key added to the file is accepted once the gateway says it reloaded, a
/// revoked one is refused, `SIGHUP` reloads, and a broken file is refused with the field
/// named while the keys in force stay.
#[cfg(all(unix, feature = "reload"))]
#[tokio::test]
async fn the_binary_reloads_its_key_file() {
    use tokio::io::AsyncBufReadExt;
    let Some(bin) = example_binary() else {
        eprintln!(
            "skipped: target/*/examples/gateway is not built (run `cargo test --all-features`)"
        );
        return;
    };
    const A: &str = "sk-reload-a-0123456789abcdef";
    const B: &str = "sk-reload-b-0123456789abcdef";
    let dir = std::env::temp_dir().join(format!("llm-layers-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("keys.toml");
    // Written whole and renamed into place, as an operator's tooling should.
    let write = |text: &str| {
        let tmp = dir.join("keys.toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    };
    let key = |id: &str, secret: &str, extra: &str| {
        format!("[[keys]]\nid = \"{id}\"\nsecret = \"{secret}\"\n{extra}\n")
    };
    write(&key("a", A, ""));
    let mut child = tokio::process::Command::new(&bin)
        .args(["--listen", "127.0.0.1:0", "--keys"])
        .arg(&file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    type Lines = tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>;
    async fn next(lines: &mut Lines) -> String {
        tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("the gateway printed a line in time")
            .unwrap()
            .expect("the gateway still runs")
    }
    async fn until(lines: &mut Lines, prefix: &str) -> String {
        loop {
            let line = next(lines).await;
            if line.starts_with(prefix) {
                return line;
            }
        }
    }
    let first = next(&mut lines).await;
    let addr = first
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("{first}"))
        .parse::<SocketAddr>()
        .unwrap();
    // The demo lists the keys of the file, and no commands with the built-in demo keys.
    assert!(next(&mut lines)
        .await
        .starts_with("upstream: embedded mock"));
    assert_eq!(next(&mut lines).await, "demo keys:");
    let listed = next(&mut lines).await;
    assert!(listed.contains(A), "{listed}");
    let client = reqwest::Client::new();
    let status = |key: &'static str| {
        let client = client.clone();
        async move {
            let got = chat(&client, addr, key, &hello("gpt-4o-mini"), &[]).await;
            (got.status.as_u16(), got.code())
        }
    };
    assert_eq!(status(A).await.0, 200);
    assert_eq!(status(B).await, (401, "invalid_api_key".to_owned()));

    // A key added: accepted after the reload the gateway reports.
    write(&(key("a", A, "") + &key("b", B, "")));
    let line = until(&mut lines, "keys ").await;
    assert!(line.ends_with(": 2 keys (1 added, 0 removed)"), "{line}");
    assert_eq!(status(B).await.0, 200);

    // A key revoked: refused after the reload.
    write(&(key("a", A, "revoked = true") + &key("b", B, "")));
    let line = until(&mut lines, "keys ").await;
    assert!(line.ends_with(": 2 keys (0 added, 0 removed)"), "{line}");
    assert_eq!(status(A).await, (401, "revoked_api_key".to_owned()));

    // SIGHUP reloads the file even though it did not change.
    let killed = std::process::Command::new("kill")
        .args(["-HUP", &child.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let line = until(&mut lines, "keys ").await;
    assert!(line.starts_with("keys reloaded from "), "{line}");

    // A broken file: refused with the field named, the keys in force stay.
    write(&(key("a", A, "") + "[[keys]]\nid = \"c\"\nsha256 = \"zz\"\n"));
    let line = until(&mut lines, "keys ").await;
    assert!(
        line.starts_with("keys refused, the previous keys stay in force: ")
            && line.contains("keys[1].sha256"),
        "{line}"
    );
    assert_eq!(status(B).await.0, 200);
    assert_eq!(status(A).await, (401, "revoked_api_key".to_owned()));

    child.kill().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---- Per-route overrides from `[routes."/path"]` tables ----

/// POSTs a JSON body to a path with a key.
async fn post_json(
    client: &reqwest::Client,
    addr: SocketAddr,
    path: &str,
    key: &str,
    body: &serde_json::Value,
) -> common_gateway::Got {
    let res = client
        .post(format!("http://{addr}{path}"))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("the gateway answers");
    common_gateway::Got {
        status: res.status(),
        headers: res.headers().clone(),
        body: res.bytes().await.unwrap(),
    }
}

/// A stub answering every call with `status` (a completion for 200), recording the paths.
async fn path_stub(status: u16) -> (Stub, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let stub = Stub::start(move |call| {
        log.lock().unwrap().push(call.path.to_owned());
        if status == 200 {
            completion(call.json)
        } else {
            common_gateway::answer(
                status,
                "application/json",
                r#"{"error":{"message":"down","type":"server_error","code":null}}"#,
            )
        }
    })
    .await;
    (stub, seen)
}

fn count(seen: &Mutex<Vec<String>>, path: &str) -> usize {
    seen.lock().unwrap().iter().filter(|p| *p == path).count()
}

#[tokio::test]
async fn a_route_with_its_own_rate_limit() {
    let (stub, _) = path_stub(200).await;
    let config = small_config(
        "[rate_limit.defaults]\nrpm = 100\ntpm = 1000000\n\
         [routes.\"/v1/embeddings\".rate_limit.defaults]\nrpm = 1\n",
    );
    let (addr, stack) = gateway(&config, &stub.base()).await;
    assert!(stack.policy("/v1/embeddings").rate_limit);
    let client = reqwest::Client::new();
    let body = json!({"model": "text-embedding-3-small", "input": "hi"});
    let key = common_gateway::FULL;
    let first = post_json(&client, addr, "/v1/embeddings", key, &body).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    assert_eq!(first.header("x-ratelimit-limit-requests"), Some("1"));
    let second = post_json(&client, addr, "/v1/embeddings", key, &body).await;
    assert_eq!(second.status, StatusCode::TOO_MANY_REQUESTS, "{second:?}");
    assert_envelope(&second);
    assert_eq!(second.code(), "rate_limit_exceeded");
    // The other routes keep the top-level quota, and their own buckets.
    for _ in 0..3 {
        let got = chat(&client, addr, key, &hello("gpt-4o-mini"), &[]).await;
        assert_eq!(got.status, StatusCode::OK, "{got:?}");
        assert_eq!(got.header("x-ratelimit-limit-requests"), Some("100"));
    }
    // The override kept the top-level token quota (merged field by field).
    assert_eq!(first.header("x-ratelimit-limit-tokens"), Some("1000000"));
}

#[tokio::test]
async fn a_route_with_its_own_retry_attempts() {
    let (stub, seen) = path_stub(503).await;
    let config = small_config(
        "[retry]\nmax_attempts = 3\nbackoff_base_ms = 1\nbackoff_cap_ms = 2\n\
         [routes.\"/v1/completions\".retry]\nmax_attempts = 1\n",
    );
    let (addr, _) = gateway(&config, &stub.base()).await;
    let client = reqwest::Client::new();
    let got = chat(
        &client,
        addr,
        common_gateway::FULL,
        &hello("gpt-4o-mini"),
        &[],
    )
    .await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE, "{got:?}");
    assert_eq!(count(&seen, "/v1/chat/completions"), 3);
    let body = json!({"model": "gpt-3.5-turbo-instruct", "prompt": "hi"});
    let got = post_json(
        &client,
        addr,
        "/v1/completions",
        common_gateway::FULL,
        &body,
    )
    .await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE, "{got:?}");
    assert_eq!(count(&seen, "/v1/completions"), 1, "no retry on this route");
}

#[tokio::test]
async fn a_route_with_its_own_validation_limit() {
    let (stub, seen) = path_stub(200).await;
    let config = small_config(
        "[validation]\nallowed_models = [\"gpt-4o-mini\", \"text-embedding-3-small\"]\n\
         [routes.\"/v1/embeddings\".validate]\nbody_limit = 200\n",
    );
    let (addr, _) = gateway(&config, &stub.base()).await;
    let client = reqwest::Client::new();
    let key = common_gateway::FULL;
    let big = "x".repeat(300);
    let body = json!({"model": "text-embedding-3-small", "input": big});
    let got = post_json(&client, addr, "/v1/embeddings", key, &body).await;
    assert_eq!(got.status, StatusCode::PAYLOAD_TOO_LARGE, "{got:?}");
    assert_envelope(&got);
    // The same size passes on the chat route (the top-level limit).
    let chat_body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": big}]});
    let got = chat(&client, addr, key, &chat_body, &[]).await;
    assert_eq!(got.status, StatusCode::OK, "{got:?}");
    // The override kept the top-level model list.
    let body = json!({"model": "gpt-4o", "input": "hi"});
    let got = post_json(&client, addr, "/v1/embeddings", key, &body).await;
    assert_eq!(got.status, StatusCode::BAD_REQUEST, "{got:?}");
    let body = json!({"model": "text-embedding-3-small", "input": "hi"});
    let got = post_json(&client, addr, "/v1/embeddings", key, &body).await;
    assert_eq!(got.status, StatusCode::OK, "{got:?}");
    assert_eq!(count(&seen, "/v1/embeddings"), 1);
}

#[tokio::test]
async fn a_route_with_its_own_breaker_threshold() {
    let (stub, seen) = path_stub(500).await;
    let config = small_config(
        "[retry]\nmax_attempts = 1\n\
         [breaker]\nwindow = 20\nminimum_calls = 10\nfailure_rate = 50.0\n\
         [routes.\"/v1/completions\".breaker]\nwindow = 2\nminimum_calls = 2\n",
    );
    let (addr, _) = gateway(&config, &stub.base()).await;
    let client = reqwest::Client::new();
    let key = common_gateway::FULL;
    let body = json!({"model": "gpt-3.5-turbo-instruct", "prompt": "hi"});
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let got = post_json(&client, addr, "/v1/completions", key, &body).await;
        assert_envelope(&got);
        statuses.push(got.status.as_u16());
    }
    // Two failures open this route's circuit: the next calls do not reach the upstream.
    assert_eq!(count(&seen, "/v1/completions"), 2, "{statuses:?}");
    assert_eq!(statuses[..2], [500, 500], "{statuses:?}");
    assert!(statuses[2..].iter().all(|s| *s == 503), "{statuses:?}");
    // The chat route's circuit (the top-level threshold) is still closed after as many
    // failures.
    for _ in 0..4 {
        let got = chat(&client, addr, key, &hello("gpt-4o-mini"), &[]).await;
        assert_eq!(got.status, StatusCode::INTERNAL_SERVER_ERROR, "{got:?}");
    }
    assert_eq!(count(&seen, "/v1/chat/completions"), 4);
}

/// `post(handler).layer(stack.route_layer(path))` on a plain axum router: one layer per
/// route, the edge stack its entry asks for.
#[tokio::test]
async fn one_route_layer_per_route_on_an_axum_router() {
    use axum::routing::{get as get_route, post};
    let stack = Stack::from_toml_str(&format!(
        "[[keys]]\nid = \"full\"\nsecret = \"{FULL}\"\n\
         [validation]\nallowed_models = [\"gpt-4o-mini\"]\n\
         [routes.\"/v1/chat/completions\".rate_limit.defaults]\nrpm = 2\n\
         [routes.\"/healthz\"]\nauth = false\nvalidate = false\nrate_limit = false\n"
    ))
    .unwrap();
    let app = axum::Router::new()
        .route(
            "/v1/chat/completions",
            post(|| async { axum::Json(json!({"object": "chat.completion"})) })
                .layer(stack.route_layer("/v1/chat/completions")),
        )
        .route(
            "/healthz",
            get_route(|| async { "ok" }).layer(stack.route_layer("/healthz")),
        );
    let addr = serve(app).await;
    let client = reqwest::Client::new();
    // Auth refuses a request without a key, with the envelope.
    let res = client
        .post(format!("http://{addr}/v1/chat/completions"))
        .body(hello("gpt-4o-mini").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let json: serde_json::Value = res.json().await.unwrap();
    assert_eq!(json["error"]["code"], "invalid_api_key", "{json}");
    // A good request passes every layer.
    let got = chat(&client, addr, FULL, &hello("gpt-4o-mini"), &[]).await;
    assert_eq!(got.status, StatusCode::OK, "{got:?}");
    assert_eq!(got.json()["object"], "chat.completion");
    // Validation, then the route's own quota.
    let got = chat(&client, addr, FULL, &hello("gpt-4o"), &[]).await;
    assert_eq!(got.status, StatusCode::BAD_REQUEST, "{got:?}");
    let got = chat(&client, addr, FULL, &hello("gpt-4o-mini"), &[]).await;
    assert_eq!(got.status, StatusCode::OK, "{got:?}");
    let got = chat(&client, addr, FULL, &hello("gpt-4o-mini"), &[]).await;
    assert_eq!(got.status, StatusCode::TOO_MANY_REQUESTS, "{got:?}");
    // The route with every layer off.
    let got = get(&client, addr, "/healthz", None).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(&got.body[..], b"ok");
}
