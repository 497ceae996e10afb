//! The reloadable key store: swaps while requests run, in-flight requests keep their keys,
//! and a key file watched for changes, over a real server and client.
#![cfg(feature = "reload")]

mod common_auth;

use std::sync::Arc;
use std::time::Duration;

use axum::routing::post;
use axum::{Extension, Router};
use llm_layers::auth::{
    ApiKeyAuthLayer, InMemoryKeyStore, KeyRecord, ReloadOptions, ReloadOutcome, ReloadSummary,
    ReloadableKeyStore,
};
use llm_layers::ext::KeyIdentity;
use tokio::sync::Notify;

const A: &str = "sk-reload-a-0123456789abcdefgh";
const B: &str = "sk-reload-b-0123456789abcdefgh";
const STEADY: &str = "sk-reload-steady-0123456789ab";

fn keys(list: &[(&str, &str)]) -> InMemoryKeyStore {
    InMemoryKeyStore::new(
        list.iter()
            .map(|(id, secret)| KeyRecord::builder(*id).secret(secret).build().unwrap()),
    )
    .unwrap()
}

async fn post_with(client: &reqwest::Client, url: &str, key: &str) -> (u16, String) {
    let res = client
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(key)
        .body(common_auth::chat("gpt-4o-mini"))
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.text().await.unwrap())
}

#[tokio::test]
async fn a_swap_is_seen_by_new_requests_and_in_flight_ones_keep_their_key() {
    let store = ReloadableKeyStore::new(keys(&[("a", A)]));
    let release = Arc::new(Notify::new());
    let entered = Arc::new(Notify::new());
    let app = Router::new()
        .route(
            "/v1/chat/completions",
            post({
                let (release, entered) = (Arc::clone(&release), Arc::clone(&entered));
                move |Extension(key): Extension<KeyIdentity>| async move {
                    if key.id() == "a" {
                        entered.notify_one();
                        release.notified().await;
                    }
                    key.id().to_owned()
                }
            }),
        )
        .layer(ApiKeyAuthLayer::new(store.clone()));
    let url = common_auth::serve(app).await;
    let client = reqwest::Client::new();

    // A request with key `a` is admitted and waits in the handler.
    let in_flight = tokio::spawn({
        let (client, url) = (client.clone(), url.clone());
        async move { post_with(&client, &url, A).await }
    });
    entered.notified().await;

    // `a` is revoked by removal, `b` added, while that request runs.
    let summary = store.replace(keys(&[("b", B)]));
    assert_eq!(
        summary,
        ReloadSummary {
            keys: 1,
            added: 1,
            removed: 1
        }
    );
    assert_eq!(post_with(&client, &url, B).await, (200, "b".to_owned()));
    let (status, body) = post_with(&client, &url, A).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("invalid_api_key"), "{body}");

    // The request admitted before the swap finishes as `a`.
    release.notify_one();
    assert_eq!(in_flight.await.unwrap(), (200, "a".to_owned()));
}

#[tokio::test]
async fn swaps_under_load_lose_no_request() {
    let store = ReloadableKeyStore::new(keys(&[("steady", STEADY)]));
    let app = Router::new()
        .route(
            "/v1/chat/completions",
            post(|Extension(key): Extension<KeyIdentity>| async move { key.id().to_owned() }),
        )
        .layer(ApiKeyAuthLayer::new(store.clone()));
    let url = common_auth::serve(app).await;
    let client = reqwest::Client::new();
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let mut answers = Vec::new();
                for _ in 0..50 {
                    answers.push(post_with(&client, &url, STEADY).await);
                }
                answers
            })
        })
        .collect();
    // Swap the set 200 times while the clients run: `steady` is in every set, next to a
    // key that comes and goes.
    let swapper = tokio::spawn({
        let store = store.clone();
        async move {
            for i in 0..200 {
                let set = if i % 2 == 0 {
                    keys(&[("steady", STEADY), ("a", A)])
                } else {
                    keys(&[("b", B), ("steady", STEADY)])
                };
                store.replace(set);
                tokio::task::yield_now().await;
            }
        }
    });
    let mut total = 0;
    for c in clients {
        for answer in c.await.unwrap() {
            assert_eq!(answer, (200, "steady".to_owned()));
            total += 1;
        }
    }
    swapper.await.unwrap();
    assert_eq!(total, 400);
    assert_eq!(store.len(), 2);
}

fn key_toml(id: &str, secret: &str, extra: &str) -> String {
    format!("[[keys]]\nid = \"{id}\"\nsecret = \"{secret}\"\n{extra}\n")
}

#[tokio::test]
async fn a_watched_file_is_reloaded_when_it_changes_and_a_broken_one_is_refused() {
    let dir = std::env::temp_dir().join(format!("llm-layers-auth-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("keys.toml");
    let write = |text: &str| {
        let tmp = dir.join("keys.toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    };
    write(&key_toml("a", A, ""));
    let store = ReloadableKeyStore::new(InMemoryKeyStore::from_toml_file(&file).unwrap());
    let app = Router::new()
        .route(
            "/v1/chat/completions",
            post(|Extension(key): Extension<KeyIdentity>| async move { key.id().to_owned() }),
        )
        .layer(ApiKeyAuthLayer::new(store.clone()));
    let url = common_auth::serve(app).await;
    let client = reqwest::Client::new();
    // Polling only: a SIGHUP sent to this test process would reach other tests' watchers.
    let mut reloader = store
        .watch_file(
            &file,
            ReloadOptions::new()
                .sighup(false)
                .poll_interval(Some(Duration::from_millis(10))),
        )
        .unwrap();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(20), reloader.next_outcome())
            .await
            .expect("a reload in time")
            .expect("the watcher runs")
    };

    // Added.
    write(&(key_toml("a", A, "") + &key_toml("b", B, "")));
    assert_eq!(
        next().await,
        ReloadOutcome::Reloaded(ReloadSummary {
            keys: 2,
            added: 1,
            removed: 0
        })
    );
    assert_eq!(post_with(&client, &url, B).await, (200, "b".to_owned()));

    // Revoked.
    write(&(key_toml("a", A, "revoked = true") + &key_toml("b", B, "")));
    assert!(matches!(next().await, ReloadOutcome::Reloaded(_)));
    let (status, body) = post_with(&client, &url, A).await;
    assert_eq!(status, 401);
    assert!(body.contains("revoked_api_key"), "{body}");

    // Broken: refused with the file and the field named, the keys in force stay.
    write(&(key_toml("b", B, "") + "[[keys]]\nid = \"c\"\nsha256 = \"zz\"\n"));
    let ReloadOutcome::Refused(e) = next().await else {
        panic!("a broken file must be refused");
    };
    assert!(e.field().ends_with("keys.toml: keys[1].sha256"), "{e}");
    assert_eq!(store.len(), 2);
    assert_eq!(post_with(&client, &url, B).await, (200, "b".to_owned()));
    assert_eq!(post_with(&client, &url, A).await.0, 401);

    // A secret repeated: refused, the secret never quoted.
    write(&(key_toml("b", B, "") + &key_toml("b2", B, "")));
    let ReloadOutcome::Refused(e) = next().await else {
        panic!("a repeated secret must be refused");
    };
    assert!(e.field().ends_with("keys[1].secret"), "{e}");
    assert!(!e.to_string().contains(B), "{e}");

    // Deleted: refused, the keys stay.
    std::fs::remove_file(&file).unwrap();
    let ReloadOutcome::Refused(e) = next().await else {
        panic!("a missing file must be refused");
    };
    assert_eq!(e.field(), "path", "{e}");
    assert_eq!(post_with(&client, &url, B).await, (200, "b".to_owned()));

    // Back, with `a` no longer revoked and `b` gone: reloaded (`a` kept its secret, so it
    // counts as neither added nor removed).
    write(&key_toml("a", A, ""));
    assert_eq!(
        next().await,
        ReloadOutcome::Reloaded(ReloadSummary {
            keys: 1,
            added: 0,
            removed: 1
        })
    );
    assert_eq!(post_with(&client, &url, A).await, (200, "a".to_owned()));
    assert_eq!(post_with(&client, &url, B).await.0, 401);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn watching_needs_a_runtime() {
    let store = ReloadableKeyStore::new(keys(&[("a", A)]));
    let e = store
        .watch_file("/nonexistent/keys.toml", ReloadOptions::new())
        .unwrap_err();
    assert_eq!(e.field(), "reload");
    assert!(format!("{store:?}").contains("keys: 1") && !format!("{store:?}").contains(A));
}

/// `with_store` keeps the layer's settings: here the accepted headers and the forwarding.
#[tokio::test]
async fn with_store_keeps_the_settings_of_the_layer() {
    use llm_layers::auth::{AcceptedHeaders, CredentialForwarding};
    let configured = ApiKeyAuthLayer::builder(keys(&[]))
        .accepted_headers(AcceptedHeaders::none().x_api_key(true))
        .forwarding(CredentialForwarding::Keep)
        .build()
        .unwrap();
    let store = ReloadableKeyStore::new(keys(&[("a", A)]));
    let app = Router::new()
        .route("/v1/chat/completions", post(common_auth::echo))
        .layer(configured.with_store(store));
    let url = common_auth::serve(app).await;
    let client = reqwest::Client::new();
    let send = |name: &'static str| {
        client
            .post(format!("{url}/v1/chat/completions"))
            .header(name, A)
            .body(common_auth::chat("gpt-4o-mini"))
            .send()
    };
    // Bearer is not accepted by the configured layer, so not by the new one.
    let res = client
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(A)
        .body(common_auth::chat("gpt-4o-mini"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let res = send("x-api-key").await.unwrap();
    assert_eq!(res.status(), 200);
    let seen: serde_json::Value = res.json().await.unwrap();
    assert_eq!(seen["id"], "a");
    assert_eq!(seen["headers"]["x-api-key"], serde_json::json!([A]), "kept");
}
