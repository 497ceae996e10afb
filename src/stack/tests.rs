//! Unit tests of the stack's reading and building.

use super::*;

#[test]
fn empty_document_builds() {
    let stack = Stack::from_toml_str("").unwrap();
    assert_eq!(stack.key_count(), 0);
    assert_eq!(stack.policy("/v1/chat/completions"), RoutePolicy::default());
}

#[test]
fn type_errors_name_the_field() {
    let err = Stack::from_toml_str("[breaker]\nwindow = \"ten\"\n").unwrap_err();
    assert_eq!(err.field(), "breaker.window", "{err}");
    let err = Stack::from_toml_str("[upstream]\nattempt_timeout_ms = 3\n[retri]\n").unwrap_err();
    assert_eq!(err.field(), "retri", "{err}");
    let err = Stack::from_toml_str("[upstream]\ntimeout = 3\n").unwrap_err();
    assert_eq!(err.field(), "upstream.timeout", "{err}");
    assert!(err.message().contains("unknown field"), "{err}");
}

#[test]
fn key_errors_name_the_key_and_hide_the_secret() {
    let err = Stack::from_toml_str(
        "[[keys]]\nid = \"a\"\nsecret = \"sk-aaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"\n[[keys]]\nid = \"b\"\nsha256 = \"zz\"\n",
    )
    .unwrap_err();
    assert_eq!(err.field(), "keys[1].sha256", "{err}");
    assert!(!err.to_string().contains("sk-aaaa"));
}

#[test]
fn layer_errors_name_the_field() {
    let err = Stack::from_toml_str("[breaker]\nfailure_rate = 120.0\n").unwrap_err();
    assert_eq!(err.field(), "breaker.failure_rate", "{err}");
    let err = Stack::from_toml_str("[breaker]\nkey_by = \"nope\"\n").unwrap_err();
    assert_eq!(err.field(), "breaker.key_by", "{err}");
    let err = Stack::from_toml_str("[rate_limit.tiers.free]\nrpm = 0\n").unwrap_err();
    assert_eq!(err.field(), "rate_limit.tiers.free.rpm", "{err}");
    // A value the builder refuses: at the section, with the builder's message naming its
    // setting.
    let err = Stack::from_toml_str("[retry]\nmax_attempts = 50\n").unwrap_err();
    assert_eq!(err.field(), "retry", "{err}");
    assert!(err.message().contains("`max_attempts`"), "{err}");
    let err = Stack::from_toml_str("[retry]\nbackoff_base_ms = 0\n").unwrap_err();
    assert_eq!(err.field(), "retry.backoff_base_ms", "{err}");
    let err = Stack::from_toml_str("[retry]\nbudget_ratio = -1.0\n").unwrap_err();
    assert_eq!(err.field(), "retry", "{err}");
    assert!(err.message().contains("budget.ratio"), "{err}");
    let err = Stack::from_toml_str("[upstream]\nattempt_timeout_ms = 0\n").unwrap_err();
    assert_eq!(err.field(), "upstream.attempt_timeout_ms", "{err}");
    let err = Stack::from_toml_str("[routes.\"v1\"]\nauth = false\n").unwrap_err();
    assert_eq!(err.field(), "routes.\"v1\"", "{err}");
}

#[test]
fn rate_limit_backend_keys() {
    let err = Stack::from_toml_str("[rate_limit]\nbackend = \"etcd\"\n").unwrap_err();
    assert_eq!(err.field(), "rate_limit.backend", "{err}");
    let err = Stack::from_toml_str("[rate_limit]\nreplicas = 3\n").unwrap_err();
    assert_eq!(err.field(), "rate_limit.replicas", "{err}");
    let config = "[rate_limit]\nbackend = \"redis\"\nredis_url = \"redis://:pw-s3cret@127.0.0.1:6379/\"\nredis_timeout_ms = 20\nredis_failure = \"closed\"\nreplicas = 3\n[rate_limit.defaults]\nrpm = 60\n";
    #[cfg(feature = "redis")]
    {
        assert!(Stack::from_toml_str(config).is_ok());
        let parsed: StackConfig = toml::from_str(config).unwrap();
        assert!(!format!("{parsed:?}").contains("pw-s3cret"));
        let err = Stack::from_toml_str("[rate_limit]\nbackend = \"redis\"\n").unwrap_err();
        assert_eq!(err.field(), "rate_limit.redis_url", "{err}");
        let bad = config.replace("replicas = 3", "replicas = 0");
        let err = Stack::from_toml_str(&bad).unwrap_err();
        assert_eq!(err.field(), "rate_limit.replicas", "{err}");
        let borrow = format!("{config}redis_borrow = 16\nredis_borrow_lease_ms = 50\n")
            .replace("[rate_limit.defaults]\nrpm = 60\n", "")
            + "[rate_limit.defaults]\nrpm = 60\n";
        assert!(Stack::from_toml_str(&borrow).is_ok());
        let bad = borrow.replace("lease_ms = 50", "lease_ms = 0");
        let err = Stack::from_toml_str(&bad).unwrap_err();
        assert_eq!(err.field(), "rate_limit.redis_borrow_lease_ms", "{err}");
        let bad = config.replace("\"closed\"", "\"maybe\"");
        let err = Stack::from_toml_str(&bad).unwrap_err();
        assert_eq!(err.field(), "rate_limit.redis_failure", "{err}");
        let bad = config.replace("redis://", "http://");
        let err = Stack::from_toml_str(&bad).unwrap_err();
        assert_eq!(err.field(), "rate_limit", "{err}");
        assert!(err.message().contains("redis.url"), "{err}");
        assert!(!err.to_string().contains("pw-s3cret"), "{err}");
    }
    #[cfg(not(feature = "redis"))]
    {
        let err = Stack::from_toml_str(config).unwrap_err();
        assert_eq!(err.field(), "rate_limit.backend", "{err}");
    }
}

#[test]
fn route_policies() {
    let stack =
        Stack::from_toml_str("[routes.\"/healthz\"]\nauth = false\nvalidate = false\n").unwrap();
    assert!(stack.auth_for("/healthz").is_none());
    assert!(stack.validate_for("/healthz").is_none());
    assert!(stack.auth_for("/v1/chat/completions").is_some());
}

#[test]
fn errors_name_the_toml_path_of_a_route_override() {
    let err = Stack::from_toml_str(
        "[routes.\"/v1/chat/completions\".rate_limit.defaults]\nrpm = \"many\"\n",
    )
    .unwrap_err();
    assert_eq!(
        err.field(),
        "routes.\"/v1/chat/completions\".rate_limit.defaults.rpm",
        "{err}"
    );
    assert!(err.message().contains("invalid type"), "{err}");
    assert!(err.message().contains("(line 2)"), "{err}");
    let err = Stack::from_toml_str("[routes.\"/v1/x\".retry]\nmax_attemps = 2\n").unwrap_err();
    assert_eq!(err.field(), "routes.\"/v1/x\".retry.max_attemps", "{err}");
    let err = Stack::from_toml_str("[routes.\"/v1/x\".breaker]\nkey_by = \"moon\"\n").unwrap_err();
    assert_eq!(err.field(), "routes.\"/v1/x\".breaker.key_by", "{err}");
    let err = Stack::from_toml_str("[routes.\"/v1/x\"]\nvalidate = 3\n").unwrap_err();
    assert_eq!(err.field(), "routes.\"/v1/x\".validate", "{err}");
    let err = Stack::from_toml_str("[routes.\"/v1/x\"]\nrate_limit = 2026-12-31T23:59:59Z\n")
        .unwrap_err();
    assert_eq!(err.field(), "routes.\"/v1/x\".rate_limit", "{err}");
    // The stack's own checks and the builders', at the route's section.
    let err =
        Stack::from_toml_str("[routes.\"/v1/x\".rate_limit]\nredis_borrow = 3\n").unwrap_err();
    assert_eq!(
        err.field(),
        "routes.\"/v1/x\".rate_limit.redis_borrow",
        "{err}"
    );
    let err = Stack::from_toml_str("[routes.\"/v1/x\".retry]\nmax_attempts = 11\n").unwrap_err();
    assert_eq!(err.field(), "routes.\"/v1/x\".retry", "{err}");
    assert!(err.message().contains("max_attempts"), "{err}");
    // A merged value the top level would accept but the route's combination refuses.
    let err = Stack::from_toml_str(
        "[breaker]\nopen_ms = 60000\n[routes.\"/v1/x\".breaker]\nmax_open_ms = 1000\n",
    )
    .unwrap_err();
    assert_eq!(err.field(), "routes.\"/v1/x\".breaker.max_open_ms", "{err}");
}

#[test]
fn an_override_merges_field_by_field() {
    let text = r#"
        [validation]
        allowed_models = ["gpt-4o"]
        body_limit = 1000
        context_windows = { "my-model" = 100 }
        [rate_limit.defaults]
        rpm = 60
        tpm = 1000
        [rate_limit.tiers.pro]
        rpm = 600
        concurrency = 4
        [retry]
        max_attempts = 4
        backoff_base_ms = 7
        [routes."/a".validate]
        body_limit = 10
        context_windows = { "other" = 5 }
        [routes."/a".rate_limit.defaults]
        rpm = 2
        [routes."/a".rate_limit.tiers.pro]
        rpm = 6
        [routes."/a".retry]
        max_attempts = 1
        [routes."/a".upstream]
        attempt_timeout_ms = 50
    "#;
    let config: StackConfig = parse_toml(text).unwrap();
    let route = &config.routes["/a"];
    let v = config::merged(&config.validation, route.validate.overrides().unwrap());
    assert_eq!(v.allowed_models, ["gpt-4o"]);
    assert_eq!(v.body_limit.map(|n| n.get()), Some(10));
    assert_eq!(v.context_windows.len(), 2);
    let r = config::merged(&config.rate_limit, route.rate_limit.overrides().unwrap());
    assert_eq!(r.defaults.rpm.map(|n| n.get()), Some(2));
    assert_eq!(r.defaults.tpm.map(|n| n.get()), Some(1000));
    assert_eq!(r.tiers["pro"].rpm.map(|n| n.get()), Some(6));
    assert_eq!(r.tiers["pro"].concurrency.map(|n| n.get()), Some(4));
    let retry = config::merged(&config.retry, route.retry.as_ref().unwrap());
    assert_eq!(retry.max_attempts, 1);
    assert_eq!(retry.backoff_base_ms.get(), 7);
    assert!(retry.mark_exhausted, "the default stays");
    // The top level is untouched.
    assert_eq!(config.retry.max_attempts, 4);
    let stack = Stack::build(&config).unwrap();
    assert!(stack.has_own_upstream_layers("/a"));
    assert!(!stack.has_own_upstream_layers("/b"));
    assert_eq!(stack.policy("/a"), RoutePolicy::default());
    assert_eq!(stack.attempt_timeout_for("/a"), Duration::from_millis(50));
    assert_eq!(stack.attempt_timeout_for("/b"), Duration::from_secs(60));
}

#[test]
fn no_error_quotes_a_value() {
    let cases = [
        "[retry]\njitter = \"sk-Qz7-secret\"\n",
        "[retry]\nmax_attempts = \"sk-Qz7-secret\"\n",
        "[[keys]]\nid = \"a\"\nsecret = \"sk-Qz7-secret\"\nrpm = \"sk-Qz7-secret\"\n",
        "'secret = \"sk-Qz7-secret\"' = 1\n",
        "[routes.\"/x\"]\nrate_limit = \"sk-Qz7-secret\"\n",
        "secret = \"sk-Qz7-secret\n",
    ];
    for text in cases {
        let err = Stack::from_toml_str(text).unwrap_err();
        assert!(!err.to_string().contains("Qz7"), "{text}: {err}");
        assert!(!format!("{err:?}").contains("Qz7"), "{text}: {err:?}");
    }
    let config: StackConfig =
        parse_toml("[[keys]]\nid = \"a\"\nsecret = \"sk-Qz7-secret\"\n").unwrap();
    assert!(!format!("{config:?}").contains("Qz7"));
}

#[test]
fn keys_are_typed() {
    let stack = Stack::from_toml_str(
        "[[keys]]\nid = \"a\"\nsecret = \"sk-aaaaaaaaaaaaaaaaaaaa\"\nexpires_at = 2030-01-01T00:00:00Z\n\
         [[keys]]\nid = \"b\"\nsha256 = \"5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8\"\nexpires_at = 1900000000\n",
    )
    .unwrap();
    assert_eq!(stack.key_count(), 2);
    for (text, field) in [
        ("[[keys]]\nid = \"a\"\nsecret = \"\"\n", "keys[0].secret"),
        ("[[keys]]\nid = \"a\"\n", "keys[0].secret"),
        (
            "[[keys]]\nid = \"a\"\nsecret = \"sk-x\"\nexpires_at = \"soon\"\n",
            "keys[0].expires_at",
        ),
        (
            "[[keys]]\nid = \"a\"\nsecret = \"sk-x\"\nexpires_at = 2026-01-01\n",
            "keys[0].expires_at",
        ),
        (
            "[[keys]]\nid = \"a\"\nsecret = \"sk-x\"\nexpires_at = -5\n",
            "keys[0].expires_at",
        ),
        ("[[keys]]\nsecret = \"sk-x\"\n", "keys[0]"),
        ("[[keys]]\nid = \"\"\nsecret = \"sk-x\"\n", "keys[0]"),
        (
            "[[keys]]\nid = \"a\"\nsecret = \"sk-x\"\nmodels = [\"\"]\n",
            "keys[0]",
        ),
    ] {
        let err = Stack::from_toml_str(text).unwrap_err();
        assert_eq!(err.field(), field, "{text}: {err}");
    }
}

#[test]
fn stream_settings_of_the_upstream_and_their_route_overrides() {
    use crate::normalize::NormalizeOptions;
    let text = r#"
        [upstream]
        hold_first_event = true
        first_event_timeout_ms = 8000
        stream_idle_timeout_ms = 30000
        [routes."/v1/messages".upstream]
        stream_idle_timeout_ms = 5000
        stream_total_timeout_ms = 600000
        first_event_max_bytes = 1024
        [routes."/v1/embeddings".upstream]
        hold_first_event = false
    "#;
    let stack = Stack::from_toml_str(text).unwrap();
    let top = NormalizeOptions::new()
        .hold_first_event(true)
        .first_event_timeout(Some(Duration::from_secs(8)))
        .stream_idle_timeout(Some(Duration::from_secs(30)));
    assert_eq!(stack.normalize_options(), top);
    assert_eq!(stack.normalize_options_for("/v1/chat/completions"), top);
    assert_eq!(
        stack.normalize_options_for("/v1/messages"),
        top.stream_idle_timeout(Some(Duration::from_secs(5)))
            .stream_total_timeout(Some(Duration::from_secs(600)))
            .first_event_max_bytes(1024)
    );
    assert_eq!(
        stack.normalize_options_for("/v1/embeddings"),
        top.hold_first_event(false)
    );
    // Off by default.
    assert_eq!(
        Stack::from_toml_str("").unwrap().normalize_options(),
        NormalizeOptions::new()
    );
    let err = Stack::from_toml_str("[upstream]\nstream_idle_timeout_ms = 0\n").unwrap_err();
    assert_eq!(err.field(), "upstream.stream_idle_timeout_ms", "{err}");
}

// ---- `[[breaker.fallback]]`: the fallback chain ----

#[test]
fn fallback_chain_tables_are_read_in_order() {
    let text = r#"
[breaker]
fallback_model = "gpt-4o-mini"

[[breaker.fallback]]
model = "gpt-4.1-mini"

[[breaker.fallback]]
upstream = "backup"
model = "gpt-4o"
larger_context = true

[[breaker.fallback]]
upstream = "safe"
on_content_policy = true
"#;
    let stack = Stack::from_toml_str(text).unwrap();
    let names: Vec<String> = stack
        .breaker()
        .upstream_names()
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(names, ["backup", "safe"]);
    let config: StackConfig = parse_toml(text).unwrap();
    let chain = &config.breaker.fallback;
    assert_eq!(chain.len(), 3);
    assert_eq!(
        chain[1].model.as_ref().map(|m| m.0.as_str()),
        Some("gpt-4o")
    );
    assert!(chain[1].larger_context && !chain[1].on_content_policy);
    assert!(chain[2].model.is_none() && chain[2].on_content_policy);
}

#[test]
fn fallback_chain_errors_name_the_entry_and_the_line() {
    let err = Stack::from_toml_str(
        "[breaker]\nname = \"x\"\n\n[[breaker.fallback]]\nmodel = \"a\"\n\n[[breaker.fallback]]\nmodel = \"b\"\nlarger = true\n",
    )
    .unwrap_err();
    assert_eq!(err.field(), "breaker.fallback[1].larger", "{err}");
    assert!(err.message().contains("unknown field"), "{err}");
    assert!(err.to_string().contains("line 9"), "{err}");
    let err = Stack::from_toml_str("[[breaker.fallback]]\nmodel = \"\"\n").unwrap_err();
    assert_eq!(err.field(), "breaker.fallback[0].model", "{err}");
    let err = Stack::from_toml_str(
        "[[breaker.fallback]]\nmodel = \"a\"\n[[breaker.fallback]]\nlarger_context = true\n",
    )
    .unwrap_err();
    assert_eq!(err.field(), "breaker.fallback[1]", "{err}");
    assert!(err.message().contains("`model`"), "{err}");
    // The same target twice would be tried twice and share one circuit.
    let err = Stack::from_toml_str(
        "[[breaker.fallback]]\nmodel = \"a\"\n[[breaker.fallback]]\nmodel = \"a\"\n",
    )
    .unwrap_err();
    assert_eq!(err.field(), "breaker", "{err}");
    assert!(err.message().contains("'a'"), "{err}");
}

#[test]
fn a_routes_fallback_replaces_the_chain() {
    let stack = Stack::from_toml_str(
        r#"
[[breaker.fallback]]
model = "gpt-4o-mini"

[routes."/v1/completions".breaker]
fallback = [{ upstream = "legacy" }]
"#,
    )
    .unwrap();
    assert!(stack.breaker().upstream_names().is_empty());
    let names: Vec<String> = stack
        .breaker_for("/v1/completions")
        .upstream_names()
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(names, ["legacy"]);
}

#[tokio::test]
async fn a_chain_from_toml_walks_past_an_overloaded_primary() {
    use crate::body::LayerBody;
    use tower::{Layer, ServiceExt};
    let stack = Stack::from_toml_str(
        "[[breaker.fallback]]\nmodel = \"gpt-4o-mini\"\n[[breaker.fallback]]\nupstream = \"backup\"\n",
    )
    .unwrap();
    let status = |code: u16| {
        tower::service_fn(move |req: http::Request<LayerBody<String>>| async move {
            let body = http_body_util::BodyExt::collect(req.into_body())
                .await
                .unwrap()
                .to_bytes();
            let overloaded = code == 503 && !body.windows(4).any(|w| w == b"mini");
            let mut res = http::Response::new(String::new());
            if overloaded {
                *res.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            }
            Ok::<_, std::convert::Infallible>(res)
        })
    };
    let breaker = stack
        .breaker()
        .bind_upstreams(|name| (name == "backup").then(|| status(200)))
        .unwrap();
    let svc = breaker.layer(status(503));
    let req = http::Request::new(r#"{"model":"gpt-4o","messages":[]}"#.to_owned());
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-llm-layers-fallback"], "gpt-4o-mini");
}
