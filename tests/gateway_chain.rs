//! The example gateway's fallback chain over real HTTP: `[upstreams.NAME]` tables, a
//! `[[breaker.fallback]]` chain that names them, the primary held open, the answer from the
//! first healthy target with `x-llm-layers-fallback`.
#![cfg(all(feature = "config", feature = "rate-limit"))]

mod common_gateway;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use common_gateway::{answer, app, chat, completion, hello, serve, Stub, FULL};
use llm_layers::breaker::{CircuitMode, CircuitState};
use llm_layers::stack::Stack;
use reqwest::StatusCode;

/// The configuration: one key, circuits per model, a chain of two named upstreams (the second
/// asked for another model), and their `[upstreams]` tables.
fn config(backup1: &Stub, backup2: &Stub) -> String {
    format!(
        r#"
[[keys]]
id = "test"
secret = "{FULL}"

[retry]
max_attempts = 1

[breaker]
key_by = "model"
minimum_calls = 2
window = 2

[[breaker.fallback]]
upstream = "backup1"

[[breaker.fallback]]
upstream = "backup2"
model = "gpt-4o-mini"

[upstreams.backup1]
base_url = "{}"

[upstreams.backup2]
base_url = "{}"
"#,
        backup1.base(),
        backup2.base()
    )
}

async fn start(config: &str, primary: &Stub) -> (SocketAddr, Stack) {
    let (stack, gw) = app::load(config).unwrap_or_else(|e| panic!("config: {e}"));
    let upstream = app::upstream_with_targets(
        &stack,
        &gw.forward_headers,
        gw.tls().unwrap(),
        primary.base().parse().unwrap(),
        None,
        &gw.upstreams,
    )
    .unwrap();
    (serve(app::router(&stack, upstream)).await, stack)
}

#[tokio::test]
async fn the_primary_held_open_is_answered_by_the_first_healthy_named_upstream() {
    let primary = Stub::start(|call| completion(call.json)).await;
    let backup1 = Stub::start(|_| {
        answer(
            503,
            "application/json",
            r#"{"error":{"message":"The server is overloaded.","type":"server_error","code":null}}"#,
        )
    })
    .await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let backup2 = Stub::start(move |call| {
        s.lock()
            .unwrap()
            .push(call.json["model"].as_str().unwrap().to_owned());
        completion(call.json)
    })
    .await;
    let (addr, stack) = start(&config(&backup1, &backup2), &primary).await;
    let h = stack.breaker().handle();
    h.set_mode_for("gpt-4o", CircuitMode::ForcedOpen);
    let client = reqwest::Client::new();

    let got = chat(&client, addr, FULL, &hello("gpt-4o"), &[]).await;
    assert_eq!(got.status, StatusCode::OK, "{got:?}");
    assert_eq!(
        got.header("x-llm-layers-fallback"),
        Some("backup2/gpt-4o-mini")
    );
    assert_eq!(got.json()["model"], "gpt-4o-mini");
    assert_eq!(*seen.lock().unwrap(), ["gpt-4o-mini"]);
    assert_eq!(
        (primary.calls(), backup1.calls(), backup2.calls()),
        (0, 1, 1)
    );

    // backup1's second failure opens its own circuit: from then on it is skipped.
    chat(&client, addr, FULL, &hello("gpt-4o"), &[]).await;
    assert_eq!(h.state("backup1"), Some(CircuitState::Open));
    let got = chat(&client, addr, FULL, &hello("gpt-4o"), &[]).await;
    assert_eq!(
        got.header("x-llm-layers-fallback"),
        Some("backup2/gpt-4o-mini")
    );
    assert_eq!(
        (primary.calls(), backup1.calls(), backup2.calls()),
        (0, 2, 3)
    );

    // Another model's circuit is closed: the primary answers, unmarked.
    let got = chat(&client, addr, FULL, &hello("gpt-4o-mini"), &[]).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.header("x-llm-layers-fallback"), None);
    assert_eq!(primary.calls(), 1);
}

#[tokio::test]
async fn a_chain_naming_an_undefined_upstream_is_refused() {
    let stub = Stub::start(|call| completion(call.json)).await;
    let text = config(&stub, &stub).replace("[upstreams.backup2]", "[upstreams.other]");
    let err = app::load(&text).unwrap_err();
    assert_eq!(err.field(), "breaker.fallback[1].upstream", "{err}");
    let text = config(&stub, &stub).replace(
        "[upstreams.backup1]\nbase_url = ",
        "[upstreams.backup1]\nurl = ",
    );
    let err = app::load(&text).unwrap_err();
    assert!(err.field().starts_with("upstreams.backup1"), "{err}");
    assert!(err.to_string().contains("unknown field"), "{err}");
    let text = config(&stub, &stub).replace(&stub.base(), "ftp://x");
    let err = app::load(&text).unwrap_err();
    assert_eq!(err.field(), "upstreams.backup1.base_url", "{err}");
}
