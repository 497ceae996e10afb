//! The layers' tracing events, seen from outside: the example gateway with its mock upstream
//! over real sockets, its rejections logged with the shared field names
//! (`llm_layers::metrics::field`), and a client's string escaped. A test binary of its own: its
//! subscriber is this thread's, and no other test registers the layers' callsites meanwhile.
#![cfg(all(feature = "config", feature = "rate-limit", feature = "metrics"))]

mod common_gateway;
#[path = "../examples/gateway/metrics.rs"]
mod gateway_metrics;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use common_gateway::{app, hello, mock, serve};
use serde_json::{json, Value};

const CONFIG: &str = include_str!("../examples/gateway.toml");
const FULL: &str = "sk-demo-full-0123456789abcdef";
const MINI: &str = "sk-demo-mini-0123456789abcdef";
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

/// Log lines captured for one thread.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Lines {
    type Writer = Lines;
    fn make_writer(&'a self) -> Lines {
        self.clone()
    }
}

#[tokio::test]
async fn rejections_log_the_shared_fields_and_escape_client_strings() {
    let lines = Lines::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(lines.clone())
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);
    let recorder = gateway_metrics::recorder();
    let _local = metrics::set_default_local_recorder(&recorder);
    let addr = gateway(recorder.handle()).await;
    let client = reqwest::Client::new();
    let chat = "/v1/chat/completions";

    // A model the key may not use, its name with a newline that would forge a log line.
    let forged = "gpt-4o\nINFO forged: request accepted";
    let body = json!({"model": forged, "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(
        post(
            &client,
            addr,
            chat,
            Some(MINI),
            &body,
            &[("x-request-id", "trace-1")]
        )
        .await
        .0,
        403
    );
    // A rate-limit refusal of a known key.
    for want in [200, 200, 429] {
        assert_eq!(
            post(&client, addr, chat, Some(FREE), &hello("gpt-4o-mini"), &[])
                .await
                .0,
            want
        );
    }
    // An invalid body.
    let hot = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "temperature": 3});
    assert_eq!(
        post(&client, addr, chat, Some(FULL), &hot, &[]).await.0,
        400
    );

    let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
    let line = |needle: &str| {
        text.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in\n{text}"))
            .to_owned()
    };
    let auth = line("llm_layers::auth: request rejected");
    assert!(auth.contains(" INFO "), "{auth}");
    // Inside the gateway's request span: its request id and route.
    assert!(
        auth.contains(r#"request{method=POST route="/v1/chat/completions" request_id="trace-1"}"#),
        "{auth}"
    );
    assert!(
        auth.contains("layer=\"auth\"") && auth.contains("code=\"permission_denied\""),
        "{auth}"
    );
    let limit = line("llm_layers::rate_limit: request refused");
    assert!(limit.contains(" INFO "), "{limit}");
    assert!(
        limit.contains("layer=\"rate_limit\"") && limit.contains("code=\"rate_limit_exceeded\""),
        "{limit}"
    );
    let validate = line("llm_layers::validate: request rejected");
    assert!(
        validate.contains("layer=\"validate\"") && validate.contains("code=\"invalid_value\""),
        "{validate}"
    );
    // The client's newline is escaped inside its field: no line starts with the forged text.
    assert!(text.contains("gpt-4o\\nINFO forged"), "{text}");
    assert!(
        !text.lines().any(|l| l.starts_with("INFO forged")),
        "{text}"
    );
    // No secret in any line.
    for secret in [FULL, MINI, FREE] {
        assert!(!text.contains(&secret[8..]), "{secret} in\n{text}");
    }
}
