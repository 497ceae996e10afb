//! The validation layer, end to end: a real axum server with the layer, a real reqwest client.

mod common_validate;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use common_validate::{chat, post_json, post_raw, post_with, serve};
use futures_util::StreamExt;
use llm_layers::body::LayerBody;
use llm_layers::request::{CharEstimator, Endpoint, RequestHead, RequestView};
use llm_layers::validate::{ValidateRequestLayer, ValidationRule};
use llm_layers::{ApiError, ErrorCode};
use proptest::prelude::*;
use serde_json::{json, Value};
use tokio::sync::Notify;
use tower::{Layer, ServiceExt};

/// An upstream stub: every LLM endpoint answers 200 with the body length and whether it saw a
/// `RequestView`.
async fn upstream(req: Request) -> axum::Json<Value> {
    let had_view = RequestView::from_extensions(req.extensions()).is_some();
    let bytes = axum::body::to_bytes(req.into_body(), usize::MAX)
        .await
        .unwrap();
    axum::Json(json!({"ok": true, "len": bytes.len(), "view": had_view}))
}

/// What a service behind the layer receives.
type Inner = http::Request<LayerBody<Body>>;

fn app(layer: ValidateRequestLayer) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(upstream))
        .route("/v1/completions", post(upstream))
        .route("/v1/embeddings", post(upstream))
        .route("/v1/responses", post(upstream))
        .route("/v1/files", post(upstream))
        .route(
            "/v1/models",
            get(|| async { axum::Json(json!({"data": []})) }),
        )
        .layer(layer)
}

async fn server() -> String {
    serve(app(ValidateRequestLayer::new())).await
}

#[tokio::test]
async fn valid_chat_passes_with_body_intact_and_view_in_extensions() {
    // Odd spacing, unknown fields and a trailing newline must reach the handler byte for byte.
    let body: &'static [u8] = b"{ \"model\" : \"gpt-4o\", \"x_custom\": {\"a\": [1, 2]},\n  \"max_tokens\": 50,\n  \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}] }\n";
    let app = Router::new()
        .route(
            "/v1/chat/completions",
            post(move |req: Request| async move {
                let view = RequestView::from_extensions(req.extensions())
                    .expect("the layer stores the view")
                    .clone();
                assert_eq!(view.model(), Some("gpt-4o"));
                assert_eq!(view.max_tokens(), Some(50));
                assert_eq!(view.message_count(), Some(1));
                assert_eq!(view.endpoint(), Endpoint::ChatCompletions);
                // The view keeps the body's bytes (one buffer with the body handed on).
                let kept = view.bytes().expect("the view keeps the body");
                assert_eq!(&kept[..], body);
                let json: Value = serde_json::from_slice(kept).unwrap();
                assert_eq!(json["x_custom"]["a"][1], 2);
                let got = axum::body::to_bytes(req.into_body(), usize::MAX)
                    .await
                    .unwrap();
                assert_eq!(&got[..], body, "body must arrive byte for byte");
                "intact"
            }),
        )
        .layer(ValidateRequestLayer::new());
    let base = serve(app).await;
    let res = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "intact");
}

#[tokio::test]
async fn invalid_json_names_line_and_column() {
    let base = server().await;
    let a = post_json(
        &base,
        "/v1/chat/completions",
        "{\n  \"model\": \"gpt-4o\",\n  \"messages\": [}",
    )
    .await;
    assert_eq!(a.status, 400);
    assert_eq!(a.code(), "invalid_value");
    assert_eq!(a.param(), None);
    assert!(a.message().contains("line 3"), "{}", a.message());
    assert!(a.message().contains("column"), "{}", a.message());
    assert_eq!(a.headers["x-should-retry"], "false");
    assert_eq!(a.headers["content-type"], "application/json");

    let a = post_json(&base, "/v1/chat/completions", "").await;
    assert_eq!((a.status, a.code()), (400, "invalid_value"));
}

#[tokio::test]
async fn non_object_body_is_refused() {
    let base = server().await;
    for (body, kind) in [
        ("[1,2]", "an array"),
        ("\"hi\"", "a string"),
        ("null", "null"),
    ] {
        let a = post_json(&base, "/v1/chat/completions", body).await;
        assert_eq!((a.status, a.code()), (400, "invalid_value"), "{body}");
        assert!(a.message().contains(kind), "{}", a.message());
    }
}

#[tokio::test]
async fn missing_required_fields_are_named() {
    let base = server().await;
    let cases = [
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}]}),
            "model",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "gpt-4o"}),
            "messages",
        ),
        (
            "/v1/completions",
            json!({"model": "gpt-3.5-turbo-instruct"}),
            "prompt",
        ),
        (
            "/v1/embeddings",
            json!({"model": "text-embedding-3-small"}),
            "input",
        ),
        ("/v1/responses", json!({"model": "gpt-4o"}), "input"),
    ];
    for (path, body, param) in cases {
        let a = post_json(&base, path, body.to_string()).await;
        assert_eq!(a.status, 400, "{path} {body}");
        assert_eq!(a.code(), "missing_required_field", "{path} {body}");
        assert_eq!(a.param(), Some(param), "{path} {body}");
        assert!(a.message().contains(param));
    }
    // The same endpoints pass with the field present.
    for (path, body) in [
        (
            "/v1/completions",
            json!({"model": "gpt-3.5-turbo-instruct", "prompt": "Say hi"}),
        ),
        (
            "/v1/embeddings",
            json!({"model": "text-embedding-3-small", "input": ["a", "b"]}),
        ),
        ("/v1/responses", json!({"model": "gpt-4o", "input": "hi"})),
    ] {
        let a = post_json(&base, path, body.to_string()).await;
        assert_eq!(a.status, 200, "{path}: {}", a.text);
        assert_eq!(a.body["view"], true);
    }
}

#[tokio::test]
async fn out_of_range_params_name_the_param_and_range() {
    let base = server().await;
    let cases = [
        ("temperature", json!(2.5), "between 0 and 2"),
        ("temperature", json!(-0.1), "between 0 and 2"),
        ("top_p", json!(1.5), "between 0 and 1"),
        ("n", json!(0), "at least 1"),
        ("max_tokens", json!(0), "at least 1"),
        ("max_tokens", json!(-5), "at least 1"),
        ("max_completion_tokens", json!(-1), "at least 1"),
        ("presence_penalty", json!(3), "between -2 and 2"),
        ("frequency_penalty", json!(-2.5), "between -2 and 2"),
    ];
    for (param, value, range) in cases {
        let mut body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
        body[param] = value.clone();
        let a = post_json(&base, "/v1/chat/completions", body.to_string()).await;
        assert_eq!(a.status, 400, "{param}={value}");
        assert_eq!(a.code(), "invalid_value", "{param}={value}");
        assert_eq!(a.param(), Some(param));
        assert!(a.message().contains(range), "{param}: {}", a.message());
    }
    // Boundaries and nulls pass.
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
        "temperature": 2, "top_p": 0, "n": 1, "max_tokens": 1, "presence_penalty": -2,
        "frequency_penalty": null, "stream": false});
    let a = post_json(&base, "/v1/chat/completions", body.to_string()).await;
    assert_eq!(a.status, 200, "{}", a.text);
}

#[tokio::test]
async fn wrong_json_types_are_refused() {
    let base = server().await;
    let cases = [
        ("temperature", json!("hot"), "a number between 0 and 2"),
        ("stream", json!("yes"), "a boolean"),
        ("messages", json!({"role": "user"}), "an array"),
        ("n", json!("2"), "an integer"),
        ("max_tokens", json!(10.5), "integer"),
        ("model", json!(4), "a string"),
    ];
    for (param, value, expected) in cases {
        let mut body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
        body[param] = value.clone();
        let a = post_json(&base, "/v1/chat/completions", body.to_string()).await;
        assert_eq!(
            (a.status, a.code()),
            (400, "invalid_value"),
            "{param}={value}"
        );
        assert_eq!(a.param(), Some(param));
        assert!(a.message().contains(expected), "{param}: {}", a.message());
    }
}

#[tokio::test]
async fn bad_messages_name_the_index() {
    let base = server().await;
    let ok = |role: &str| json!({"role": role, "content": "x"});
    let with = |last: Value| {
        json!({"model": "gpt-4o", "messages": [ok("system"), ok("user"), ok("assistant"), last]})
            .to_string()
    };
    let cases = [
        (json!({"role": "bot", "content": "x"}), "messages[3].role"),
        (json!({"role": "user"}), "messages[3].content"),
        (
            json!({"role": "system", "content": null}),
            "messages[3].content",
        ),
        (json!({"role": "assistant"}), "messages[3].content"),
        (
            json!({"role": "user", "content": 42}),
            "messages[3].content",
        ),
        (
            json!({"role": "tool", "content": "42"}),
            "messages[3].tool_call_id",
        ),
        (json!("hello"), "messages[3]"),
    ];
    for (last, param) in cases {
        let a = post_json(&base, "/v1/chat/completions", with(last.clone())).await;
        assert_eq!((a.status, a.code()), (400, "invalid_value"), "{last}");
        assert_eq!(a.param(), Some(param), "{last}");
    }
    let a = post_json(
        &base,
        "/v1/chat/completions",
        with(json!({"role": "bot", "content": "x"})),
    )
    .await;
    assert!(
        a.message()
            .contains("system, user, assistant, tool, developer"),
        "{}",
        a.message()
    );

    // Valid shapes pass: assistant with tool_calls and no content, the tool answer, developer,
    // content parts, the old function role.
    let body = json!({"model": "gpt-4o", "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
            "function": {"name": "weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "function", "name": "weather", "content": "sunny"}
    ]});
    let a = post_json(&base, "/v1/chat/completions", body.to_string()).await;
    assert_eq!(a.status, 200, "{}", a.text);
}

#[tokio::test]
async fn messages_sent_to_completions_names_the_chat_endpoint() {
    let base = server().await;
    let a = post_json(
        &base,
        "/v1/completions",
        chat("gpt-3.5-turbo-instruct", "hi"),
    )
    .await;
    assert_eq!((a.status, a.code()), (400, "invalid_value"));
    assert_eq!(a.param(), Some("messages"));
    assert!(
        a.message().contains("/v1/chat/completions"),
        "{}",
        a.message()
    );
}

#[tokio::test]
async fn prompt_sent_to_chat_names_the_completions_endpoint() {
    let base = server().await;
    let body = json!({"model": "gpt-4o", "prompt": "Say hi"}).to_string();
    let a = post_json(&base, "/v1/chat/completions", body).await;
    assert_eq!((a.status, a.code()), (400, "invalid_value"));
    assert_eq!(a.param(), Some("prompt"));
    assert!(a.message().contains("/v1/completions"), "{}", a.message());
    assert!(a.message().contains("`messages`"), "{}", a.message());
}

#[tokio::test]
async fn unknown_model_lists_what_is_available_bounded() {
    let mut models = vec!["gpt-4o".to_owned(), "gpt-4o-mini".to_owned()];
    models.extend((0..20).map(|i| format!("local-{i}")));
    let layer = ValidateRequestLayer::builder()
        .allowed_models(models)
        .max_listed_models(5)
        .build()
        .unwrap();
    let base = serve(app(layer)).await;
    let a = post_json(&base, "/v1/chat/completions", chat("gpt-5-ultra", "hi")).await;
    assert_eq!((a.status, a.code()), (400, "model_not_supported"));
    assert_eq!(a.param(), Some("model"));
    assert!(
        a.message()
            .contains("gpt-4o, gpt-4o-mini, local-0, local-1, local-2 and 17 more"),
        "{}",
        a.message()
    );
    assert!(!a.message().contains("local-3"), "{}", a.message());
    let a = post_json(&base, "/v1/chat/completions", chat("gpt-4o-mini", "hi")).await;
    assert_eq!(a.status, 200, "{}", a.text);
}

#[tokio::test]
async fn context_length_exceeded_gives_both_numbers() {
    let layer = ValidateRequestLayer::builder()
        .context_window("small", 1000)
        .build()
        .unwrap();
    let base = serve(app(layer)).await;
    // 2000 ASCII characters are 500 estimated tokens plus 4 for the message: fits alone...
    let text = "abcd".repeat(500);
    let a = post_json(&base, "/v1/chat/completions", chat("small", &text)).await;
    assert_eq!(a.status, 200, "{}", a.text);
    // ...but not with 600 more for the completion. The dated name matches by prefix.
    let body = json!({"model": "small-2025-01-01", "max_tokens": 600,
        "messages": [{"role": "user", "content": text}]});
    let a = post_json(&base, "/v1/chat/completions", body.to_string()).await;
    assert_eq!(
        (a.status, a.code()),
        (400, "context_length_exceeded"),
        "{}",
        a.text
    );
    assert!(a.message().contains("1000"), "{}", a.message());
    assert!(a.message().contains("1104"), "{}", a.message());
    assert_eq!(a.param(), Some("messages"));

    // The default table knows gpt-3.5-turbo's 16385.
    let base = server().await;
    let body = json!({"model": "gpt-3.5-turbo-0125", "max_tokens": 16000,
        "messages": [{"role": "user", "content": "x".repeat(2000)}]});
    let a = post_json(&base, "/v1/chat/completions", body.to_string()).await;
    assert_eq!(a.code(), "context_length_exceeded", "{}", a.text);
    assert!(a.message().contains("16385"), "{}", a.message());
}

#[tokio::test]
async fn cjk_prompt_exceeds_a_small_context_where_latin_does_not() {
    let layer = ValidateRequestLayer::builder()
        .context_window("tiny", 200)
        .build()
        .unwrap();
    let base = serve(app(layer)).await;
    let cjk: String = "你好世界。".chars().cycle().take(300).collect();
    let latin: String = "hello".chars().cycle().take(300).collect();
    assert_eq!(cjk.chars().count(), latin.chars().count());
    let a = post_json(&base, "/v1/chat/completions", chat("tiny", &latin)).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let a = post_json(&base, "/v1/chat/completions", chat("tiny", &cjk)).await;
    assert_eq!(
        (a.status, a.code()),
        (400, "context_length_exceeded"),
        "{}",
        a.text
    );
    assert!(a.message().contains("200"), "{}", a.message());
}

#[tokio::test]
async fn body_over_the_limit_is_413() {
    let layer = ValidateRequestLayer::builder()
        .body_limit(1024)
        .build()
        .unwrap();
    let base = serve(app(layer)).await;
    let big = chat("gpt-4o", &"a".repeat(2000));
    // With a content-length...
    let a = post_json(&base, "/v1/chat/completions", big.clone()).await;
    assert_eq!((a.status, a.code()), (413, "request_too_large"));
    assert!(a.message().contains("1024"), "{}", a.message());
    // ...and streamed without one.
    let chunks: Vec<Result<Bytes, std::io::Error>> = big
        .into_bytes()
        .chunks(300)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let stream = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let a = post_json(&base, "/v1/chat/completions", stream).await;
    assert_eq!((a.status, a.code()), (413, "request_too_large"));
}

#[tokio::test]
async fn wrong_content_type_is_refused() {
    let base = server().await;
    let body = chat("gpt-4o", "hi");
    for ct in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let a = post_with(&base, "/v1/chat/completions", ct, body.clone()).await;
        assert_eq!((a.status, a.code()), (400, "invalid_value"), "{ct:?}");
        assert_eq!(a.param(), None);
        assert!(a.message().contains("application/json"), "{}", a.message());
    }
    for ct in ["application/json; charset=utf-8", "Application/JSON"] {
        let a = post_with(&base, "/v1/chat/completions", Some(ct), body.clone()).await;
        assert_eq!(a.status, 200, "{ct}: {}", a.text);
    }
}

#[tokio::test]
async fn non_llm_endpoints_pass_untouched_and_unbuffered() {
    let layer = ValidateRequestLayer::builder()
        .body_limit(16)
        .build()
        .unwrap();
    let base = serve(app(layer)).await;
    // Not JSON, wrong content-type and over the limit: none of it matters off the LLM paths.
    let a = post_with(&base, "/v1/files", Some("text/plain"), "x".repeat(1000)).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["len"], 1000);
    assert_eq!(a.body["view"], false, "no view: the body was not parsed");
    let res = reqwest::get(format!("{base}/v1/models")).await.unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn unknown_fields_pass() {
    let base = server().await;
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi", "extra": 1}],
        "metadata": {"k": "v"}, "reasoning_effort": "low", "vendor_x": [null]});
    let a = post_json(&base, "/v1/chat/completions", body.to_string()).await;
    assert_eq!(a.status, 200, "{}", a.text);
}

#[tokio::test]
async fn streaming_request_passes_and_sse_streams_through() {
    let release = Arc::new(Notify::new());
    let gate = release.clone();
    let app = Router::new()
        .route(
            "/v1/chat/completions",
            post(move |req: Request| {
                let gate = gate.clone();
                async move {
                    assert!(RequestView::from_extensions(req.extensions())
                        .unwrap()
                        .stream());
                    // The second event is only sent once the client has read the first: the
                    // response must stream, not be buffered.
                    let events = futures_util::stream::unfold(0u8, move |i| {
                        let gate = gate.clone();
                        async move {
                            match i {
                                0 => Some((
                                    Ok::<_, std::io::Error>(Bytes::from_static(
                                        b"data: {\"delta\":\"Hel\"}\n\n",
                                    )),
                                    1,
                                )),
                                1 => {
                                    gate.notified().await;
                                    Some((
                                        Ok(Bytes::from_static(
                                            b"data: {\"delta\":\"lo\"}\n\ndata: [DONE]\n\n",
                                        )),
                                        2,
                                    ))
                                }
                                _ => None,
                            }
                        }
                    });
                    axum::response::Response::builder()
                        .header("content-type", "text/event-stream")
                        .body(Body::from_stream(events))
                        .unwrap()
                }
            }),
        )
        .layer(ValidateRequestLayer::new());
    let base = serve(app).await;
    let body = json!({"model": "gpt-4o", "stream": true,
        "messages": [{"role": "user", "content": "Say hello"}]});
    let res = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut stream = res.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(&first[..], b"data: {\"delta\":\"Hel\"}\n\n");
    release.notify_one();
    let mut rest = Vec::new();
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(&rest[..], b"data: {\"delta\":\"lo\"}\n\ndata: [DONE]\n\n");
}

#[tokio::test]
async fn a_view_stored_by_an_earlier_layer_is_reused() {
    // The earlier layer parsed a different (valid) document than the bytes on the wire and
    // counted tokens its own way; validation must use that view, not parse the body again.
    let stored = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    let huge = |_: &str, _: &str| 1_000_000u64;
    let counting = ValidateRequestLayer::new();
    let svc = tower::ServiceBuilder::new()
        .layer(counting)
        .service(tower::service_fn(|req: Inner| async move {
            let len = axum::body::to_bytes(Body::new(req.into_body()), usize::MAX)
                .await
                .unwrap()
                .len();
            Ok::<_, std::convert::Infallible>(axum::response::Response::new(Body::from(
                len.to_string(),
            )))
        }));
    let wire = r#"{"model":"gpt-4o","temperature":9,"messages":[]}"#;
    let request = |view: RequestView| {
        let mut req = http::Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(Body::from(wire))
            .unwrap();
        req.extensions_mut().insert(view);
        req
    };
    let view = RequestView::from_json(Endpoint::ChatCompletions, &stored, &CharEstimator);
    let res = svc.clone().oneshot(request(view)).await.unwrap();
    assert_eq!(
        res.status(),
        200,
        "the stored view is valid; the wire body is not"
    );
    let got = axum::body::to_bytes(Body::new(res.into_body()), 1024)
        .await
        .unwrap();
    assert_eq!(got, wire.len().to_string(), "body handed on untouched");

    let view = RequestView::from_json(Endpoint::ChatCompletions, &stored, &huge);
    let res = svc.oneshot(request(view)).await.unwrap();
    assert_eq!(res.status(), 400);
    let got = axum::body::to_bytes(Body::new(res.into_body()), 1 << 16)
        .await
        .unwrap();
    let env: Value = serde_json::from_slice(&got).unwrap();
    assert_eq!(
        env["error"]["code"], "context_length_exceeded",
        "the stored token count is used"
    );
}

#[tokio::test]
async fn checks_can_be_switched_off() {
    let layer = ValidateRequestLayer::builder()
        .check_params(false)
        .check_messages(false)
        .check_content_type(false)
        .build()
        .unwrap();
    let base = serve(app(layer)).await;
    let body = json!({"model": "gpt-4o", "temperature": 9, "messages": [{"role": "bot"}]});
    let a = post_with(
        &base,
        "/v1/chat/completions",
        Some("text/plain"),
        body.to_string(),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    // The checks left on still run.
    let a = post_json(
        &base,
        "/v1/chat/completions",
        json!({"model": "gpt-4o"}).to_string(),
    )
    .await;
    assert_eq!(a.code(), "missing_required_field");
}

#[test]
fn configuration_is_validated_when_built() {
    let e = ValidateRequestLayer::builder()
        .body_limit(0)
        .build()
        .unwrap_err();
    assert_eq!(e.field(), "body_limit");
    assert!(e.to_string().contains("body_limit"));
    let e = ValidateRequestLayer::builder()
        .context_window("m", 0)
        .build()
        .unwrap_err();
    assert_eq!(e.field(), "context_window");
    assert!(e.to_string().contains("\"m\""), "{e}");
    let e = ValidateRequestLayer::builder()
        .allowed_models(Vec::<String>::new())
        .build()
        .unwrap_err();
    assert_eq!(e.field(), "allowed_models");
    let e = ValidateRequestLayer::builder()
        .allowed_models(["a", ""])
        .build()
        .unwrap_err();
    assert_eq!(e.field(), "allowed_models");
}

#[test]
fn context_windows_match_exact_then_longest_prefix() {
    let layer = ValidateRequestLayer::new();
    let window = |model: &str, tokens: u64| {
        // One token over the window is refused, exactly at the window passes.
        let exact = |n: u64| {
            let json = json!({"model": model, "messages": [{"role": "user", "content": "x"}]});
            let est = move |_: &str, _: &str| n;
            let view = RequestView::from_json(Endpoint::ChatCompletions, &json, &est);
            layer.check(&view)
        };
        // 1 message = 4 tokens of overhead on top of the estimate.
        assert!(exact(tokens - 4).is_ok(), "{model} at {tokens}");
        assert!(exact(tokens - 3).is_err(), "{model} over {tokens}");
    };
    window("gpt-4o", 128_000);
    window("gpt-4o-mini-2024-07-18", 128_000);
    window("gpt-4", 8_192);
    window("gpt-4-0613", 8_192);
    window("gpt-4-turbo-2024-04-09", 128_000);
    window("gpt-4.1-nano", 1_047_576);
    window("gpt-3.5-turbo", 16_385);
    window("o1-mini", 128_000);
    window("o3", 200_000);
    window("claude-3-5-sonnet-20241022", 200_000);
    window("gemini-1.5-pro-002", 2_097_152);
    window("ft:gpt-4o-mini-2024-07-18:org::abc", 128_000);
    // Unknown names, and names that only share characters with an entry, are not checked.
    let json = json!({"model": "gpt-4.5x", "messages": [{"role": "user", "content": "x"}]});
    let est = |_: &str, _: &str| u64::MAX / 2;
    let view = RequestView::from_json(Endpoint::ChatCompletions, &json, &est);
    assert!(layer.check(&view).is_ok());
}

/// Sends `body` through the layer in-process and checks the answer is a pass or an envelope.
fn pass_or_envelope(rt: &tokio::runtime::Runtime, body: Vec<u8>) -> Result<(), TestCaseError> {
    let svc = ValidateRequestLayer::builder()
        .context_window("tiny", 50)
        .allowed_models(["gpt-4o", "tiny"])
        .build()
        .unwrap();
    let svc = tower::ServiceBuilder::new()
        .layer(svc)
        .service(tower::service_fn(|_req: Inner| async {
            Ok::<_, std::convert::Infallible>(axum::response::Response::new(Body::from("passed")))
        }));
    let req = http::Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap();
    let (status, bytes) = rt.block_on(async {
        let res = svc.oneshot(req).await.unwrap();
        let status = res.status();
        (
            status,
            axum::body::to_bytes(Body::new(res.into_body()), 1 << 20)
                .await
                .unwrap(),
        )
    });
    if status == 200 {
        prop_assert_eq!(&bytes[..], b"passed");
    } else {
        prop_assert!(status == 400 || status == 413, "status {}", status);
        let env: Value = serde_json::from_slice(&bytes).expect("an envelope");
        prop_assert!(env["error"]["code"].is_string());
        prop_assert!(env["error"]["message"].is_string());
    }
    Ok(())
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (-10.0f64..10.0).prop_map(|n| json!(n)),
        "[a-z你 ]{0,8}".prop_map(Value::String),
        prop_oneof![Just("user"), Just("assistant"), Just("tool"), Just("bot")]
            .prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        Just("role"),
                        Just("content"),
                        Just("tool_calls"),
                        Just("tool_call_id"),
                        Just("x")
                    ],
                    inner
                ),
                0..4
            )
            .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        pass_or_envelope(&rt, body)?;
    }

    #[test]
    fn arbitrary_field_values_never_panic(
        model in prop_oneof![Just(json!("gpt-4o")), Just(json!("tiny")), Just(json!("other")), json_value()],
        messages in json_value(),
        field in prop_oneof![Just("temperature"), Just("top_p"), Just("n"), Just("max_tokens"), Just("stream"), Just("prompt")],
        value in json_value(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let body = json!({"model": model, "messages": messages, field: value});
        pass_or_envelope(&rt, body.to_string().into_bytes())?;
    }
}

#[tokio::test]
async fn other_paths_and_methods_are_not_validated_but_deployment_paths_are() {
    let app = Router::new()
        .route("/v1/chat/completions", get(|| async { "listed" }))
        .route("/openai/deployments/gpt4o/chat/completions", post(upstream))
        .layer(ValidateRequestLayer::new());
    let base = serve(app).await;
    // GET /v1/chat/completions lists stored completions: not a generation request.
    let res = reqwest::get(format!("{base}/v1/chat/completions"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "listed");
    // Azure-style deployment paths are chat requests too.
    let path = "/openai/deployments/gpt4o/chat/completions";
    let a = post_json(
        &base,
        path,
        json!({"model": "gpt-4o", "prompt": "hi"}).to_string(),
    )
    .await;
    assert_eq!(a.param(), Some("prompt"), "{}", a.text);
    let a = post_json(&base, path, chat("gpt-4o", "hi")).await;
    assert_eq!(a.status, 200, "{}", a.text);
}

#[tokio::test]
async fn with_every_body_check_off_the_body_is_not_read() {
    let layer = ValidateRequestLayer::builder()
        .check_required_fields(false)
        .check_params(false)
        .check_messages(false)
        .check_endpoint(false)
        .check_context_length(false)
        .body_limit(8)
        .build()
        .unwrap();
    let base = serve(app(layer)).await;
    let a = post_json(
        &base,
        "/v1/chat/completions",
        "not json, and longer than 8 bytes",
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["view"], false);
    // The content-type check still runs.
    let a = post_with(&base, "/v1/chat/completions", Some("text/plain"), "{}").await;
    assert_eq!(a.code(), "invalid_value");
}

#[tokio::test]
async fn a_body_that_fails_mid_read_is_refused() {
    let svc = tower::ServiceBuilder::new()
        .layer(ValidateRequestLayer::new())
        .service(tower::service_fn(|_req: Inner| async {
            Ok::<_, std::convert::Infallible>(axum::response::Response::new(Body::from("passed")))
        }));
    let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
        Ok(Bytes::from_static(b"{\"model\":")),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        )),
    ];
    let req = http::Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 400);
    let bytes = axum::body::to_bytes(Body::new(res.into_body()), 1 << 16)
        .await
        .unwrap();
    let env: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(env["error"]["code"], "invalid_value");
    assert!(env["error"]["message"]
        .as_str()
        .unwrap()
        .contains("could not be read"));
}

#[tokio::test]
async fn works_with_any_body_types() {
    // A hyper-style stack: `Full<Bytes>` in, `Full<Bytes>` out.
    use http_body_util::{BodyExt, Full};
    let svc = tower::ServiceBuilder::new()
        .layer(ValidateRequestLayer::new())
        .service(tower::service_fn(
            |req: http::Request<LayerBody<Full<Bytes>>>| async move {
                let body = req.into_body().collect().await.unwrap().to_bytes();
                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(body)))
            },
        ));
    let send = |body: &'static str| {
        svc.clone().oneshot(
            http::Request::post("/v1/embeddings")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(body.as_bytes())))
                .unwrap(),
        )
    };
    let ok = r#"{"model":"text-embedding-3-small","input":"hello"}"#;
    let res = send(ok).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), ok);
    let res = send(r#"{"model":"text-embedding-3-small"}"#).await.unwrap();
    assert_eq!(res.status(), 400);
    let env: Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(env["error"]["param"], "input");
}

#[cfg(feature = "tiktoken")]
#[tokio::test]
async fn tiktoken_estimates_feed_the_context_check() {
    use llm_layers::request::TiktokenEstimator;
    let layer = ValidateRequestLayer::builder()
        .estimator(TiktokenEstimator)
        .context_window("gpt-4o", 60)
        .build()
        .unwrap();
    let base = serve(app(layer)).await;
    // " hello" is one o200k token: 50 of them plus 4 for the message fit in 60, 60 do not.
    let a = post_json(
        &base,
        "/v1/chat/completions",
        chat("gpt-4o", &" hello".repeat(50)),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let a = post_json(
        &base,
        "/v1/chat/completions",
        chat("gpt-4o", &" hello".repeat(60)),
    )
    .await;
    assert_eq!(a.code(), "context_length_exceeded", "{}", a.text);
    assert!(a.message().contains("64 estimated"), "{}", a.message());
}

#[tokio::test]
async fn responses_requests_count_input_instructions_and_max_output_tokens() {
    let layer = ValidateRequestLayer::builder()
        .context_window("small", 100)
        .build()
        .unwrap();
    let base = serve(app(layer)).await;
    // 40 tokens of instructions + 40 of input items: fits alone, not with 30 more of output.
    let body = |max: u64| {
        json!({"model": "small", "instructions": "abcd".repeat(40), "max_output_tokens": max,
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "abcd".repeat(40)}]}]})
        .to_string()
    };
    let a = post_json(&base, "/v1/responses", body(10)).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let a = post_json(&base, "/v1/responses", body(30)).await;
    assert_eq!(a.code(), "context_length_exceeded", "{}", a.text);
    assert_eq!(a.param(), Some("input"));
    assert!(a.message().contains("110"), "{}", a.message());
}

/// The upstream for any path: what `upstream` answers, on every route.
fn any_path_app(layer: ValidateRequestLayer) -> Router {
    Router::new().fallback(upstream).layer(layer)
}

#[tokio::test]
async fn allowed_models_checks_the_deployment_in_the_path_and_the_models_array() {
    let layer = ValidateRequestLayer::builder()
        .allowed_models(["gpt-4o-mini", "mini-prod"])
        .build()
        .unwrap();
    let base = serve(any_path_app(layer)).await;
    // The path names the deployment the upstream serves, whatever the body says.
    for path in [
        "/openai/deployments/gpt-4o/chat/completions",
        "/openai/deployments/gpt%2D4o/chat/completions",
    ] {
        let a = post_raw(&base, path, chat("gpt-4o-mini", "hi")).await;
        assert_eq!((a.status, a.code()), (400, "model_not_supported"), "{path}");
        assert_eq!(a.param(), Some("model"));
        assert!(a.message().contains("\"gpt-4o\""), "{}", a.message());
        assert!(a.message().contains("mini-prod"), "{}", a.message());
    }
    // An allowed deployment needs no body `model`.
    let body = json!({"messages": [{"role": "user", "content": "hi"}]}).to_string();
    let a = post_json(
        &base,
        "/openai/deployments/mini-prod/chat/completions",
        body,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["view"], true);
    // ... but the body `model`, when sent, is checked too.
    let a = post_json(
        &base,
        "/openai/deployments/mini-prod/chat/completions",
        chat("gpt-4o", "hi"),
    )
    .await;
    assert_eq!((a.status, a.param()), (400, Some("model")), "{}", a.text);
    // Without a deployment, `model` is still required.
    let body = json!({"messages": [{"role": "user", "content": "hi"}]}).to_string();
    let a = post_json(&base, "/v1/chat/completions", body).await;
    assert_eq!(a.code(), "missing_required_field");
    // OpenRouter-style routing: every model of `models` may answer, so each one is checked.
    let body = json!({"model": "gpt-4o-mini", "models": ["gpt-4o-mini", "claude-3-opus"],
        "messages": [{"role": "user", "content": "hi"}]});
    let a = post_json(&base, "/v1/chat/completions", body.to_string()).await;
    assert_eq!(
        (a.status, a.code()),
        (400, "model_not_supported"),
        "{}",
        a.text
    );
    assert_eq!(a.param(), Some("models"));
    assert!(a.message().contains("\"claude-3-opus\""), "{}", a.message());
    let body = json!({"model": "gpt-4o-mini", "models": ["mini-prod", "gpt-4o-mini"],
        "messages": [{"role": "user", "content": "hi"}]});
    let a = post_json(&base, "/v1/chat/completions", body.to_string()).await;
    assert_eq!(a.status, 200, "{}", a.text);
    // A `models` that is not a list of model names is refused, not skipped.
    for models in [
        json!("claude-3-opus"),
        json!(["gpt-4o-mini", 7]),
        json!([""]),
    ] {
        let body = json!({"model": "gpt-4o-mini", "models": models,
            "messages": [{"role": "user", "content": "hi"}]});
        let a = post_json(&base, "/v1/chat/completions", body.to_string()).await;
        assert_eq!(
            (a.status, a.code()),
            (400, "invalid_value"),
            "{models}: {}",
            a.text
        );
        assert_eq!(a.param(), Some("models"));
    }
}

#[tokio::test]
async fn a_stored_view_is_checked_against_the_deployment_of_the_path() {
    // An earlier layer stored a view without the deployment; validation reads the path itself.
    let layer = ValidateRequestLayer::builder()
        .allowed_models(["gpt-4o-mini"])
        .build()
        .unwrap();
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(tower::service_fn(|req: Inner| async move {
            let routed = RequestView::from_extensions(req.extensions())
                .and_then(|v| v.routed_model().map(str::to_owned));
            Ok::<_, std::convert::Infallible>(axum::response::Response::new(Body::from(
                routed.unwrap_or_default(),
            )))
        }));
    let request = |path: &str| {
        let body = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
        let view = RequestView::parse(Endpoint::ChatCompletions, body, &CharEstimator).unwrap();
        let mut req = http::Request::post(path)
            .header("content-type", "application/json")
            .body(Body::from(&body[..]))
            .unwrap();
        req.extensions_mut().insert(view);
        req
    };
    let res = svc
        .clone()
        .oneshot(request("/openai/deployments/gpt-4o/chat/completions"))
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let err = res.extensions().get::<llm_layers::ApiError>().unwrap();
    assert!(err.message().contains("\"gpt-4o\""), "{}", err.message());
    let res = svc
        .oneshot(request("/openai/deployments/gpt-4o-mini/chat/completions"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let got = axum::body::to_bytes(Body::new(res.into_body()), 1024)
        .await
        .unwrap();
    assert_eq!(got, "gpt-4o-mini", "later layers see the deployment too");
}

#[tokio::test]
async fn the_body_limit_holds_when_an_earlier_layer_parsed_the_body() {
    use llm_layers::auth::{ApiKeyAuthLayer, InMemoryKeyStore, KeyRecord};
    const RESTRICTED: &str = "sk-restricted-0123456789abcdefgh";
    const OPEN: &str = "sk-open-0123456789abcdefghijklmn";
    let store = InMemoryKeyStore::new([
        KeyRecord::builder("restricted")
            .secret(RESTRICTED)
            .allow_model("gpt-4o-mini*")
            .build()
            .unwrap(),
        KeyRecord::builder("open").secret(OPEN).build().unwrap(),
    ])
    .unwrap();
    // Auth (4 MiB limit) parses the body for the restricted key's model check, before
    // validation (1 MiB limit) sees the request.
    let validate = ValidateRequestLayer::builder()
        .body_limit(1024 * 1024)
        .check_context_length(false)
        .build()
        .unwrap();
    let app = Router::new()
        .fallback(upstream)
        .layer(validate)
        .layer(ApiKeyAuthLayer::new(store));
    let base = serve(app).await;
    let big = chat("gpt-4o-mini", &"a".repeat(3 * 1024 * 1024));
    let client = reqwest::Client::new();
    for key in [RESTRICTED, OPEN] {
        // With a content-length...
        let res = client
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(big.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 413, "{key}");
        let env: Value = res.json().await.unwrap();
        assert_eq!(env["error"]["code"], "request_too_large");
        assert!(
            env["error"]["message"]
                .as_str()
                .unwrap()
                .contains("1048576"),
            "{env}"
        );
        // ...and streamed without one.
        let chunks: Vec<Result<Bytes, std::io::Error>> = big
            .clone()
            .into_bytes()
            .chunks(64 * 1024)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let res = client
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                chunks,
            )))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 413, "{key}, streamed");
    }
    // A body within both limits passes, parsed once.
    let res = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(RESTRICTED)
        .header("content-type", "application/json")
        .body(chat("gpt-4o-mini", &"a".repeat(512 * 1024)))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn encoded_and_dot_segment_paths_are_validated_like_the_plain_path() {
    let base = serve(any_path_app(ValidateRequestLayer::new())).await;
    let bad = json!({"model": "gpt-4o", "temperature": 9,
        "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    let good = chat("gpt-4o", "hi");
    for path in [
        "/v1/chat/completions",
        "/v1/chat/%63ompletions",
        "/v1/chat/%63%6F%6Dpletions",
        "/v1/chat%2Fcompletions",
        "/v1/models/../chat/completions",
        "/v1/models/%2e%2e/chat/completions",
        "/v1/./chat//completions",
        "//v1/chat/completions/",
        "/openai/deployments/gpt-4o/chat/%63ompletions",
    ] {
        let a = post_raw(&base, path, bad.clone()).await;
        assert_eq!(
            (a.status, a.param()),
            (400, Some("temperature")),
            "{path}: {}",
            a.text
        );
        let a = post_raw(&base, path, good.clone()).await;
        assert_eq!(a.status, 200, "{path}: {}", a.text);
        assert_eq!(a.body["view"], true, "{path}");
    }
    // The other endpoints too: the legacy endpoint refuses chat bodies however it is spelt.
    for path in ["/v1/%63ompletions", "/v1/chat/../completions"] {
        let a = post_raw(&base, path, good.clone()).await;
        assert_eq!(
            (a.status, a.param()),
            (400, Some("messages")),
            "{path}: {}",
            a.text
        );
    }
    let a = post_raw(&base, "/v1/%65mbeddings", json!({"model": "x"}).to_string()).await;
    assert_eq!((a.status, a.param()), (400, Some("input")), "{}", a.text);
}

/// An upstream that counts the requests it sees.
fn counting_app(layer: ValidateRequestLayer) -> (Router, Arc<std::sync::atomic::AtomicUsize>) {
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = hits.clone();
    let app = Router::new()
        .fallback(move |req: Request| {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            upstream(req)
        })
        .layer(layer);
    (app, hits)
}

/// A rule of one's own as a type: refuses streaming for clients of the batch tier, reading the
/// header and the view.
struct NoStreamingForBatch;

impl ValidationRule for NoStreamingForBatch {
    fn check(&self, head: &RequestHead<'_>, _body: &Bytes) -> Result<(), ApiError> {
        let batch = head.headers().get("x-tier").is_some_and(|v| v == "batch");
        if batch && head.view().expect("rules see the view").stream() {
            return Err(
                ApiError::new(ErrorCode::InvalidValue, "The batch tier does not stream.")
                    .with_param("stream"),
            );
        }
        Ok(())
    }
}

#[tokio::test]
async fn rules_of_ones_own_run_after_the_built_ins_and_answer_their_envelope() {
    let layer = ValidateRequestLayer::builder()
        .rule(NoStreamingForBatch)
        // A closure reading a field the view does not: `user` is required here.
        .rule(|_head: &RequestHead<'_>, body: &Bytes| {
            let json: Value = serde_json::from_slice(body).expect("the body passed the checks");
            match json.get("user") {
                Some(Value::String(_)) => Ok(()),
                _ => Err(ApiError::new(
                    ErrorCode::MissingRequiredField,
                    "Send `user`: this gateway bills per user.",
                )
                .with_param("user")),
            }
        })
        .build()
        .unwrap();
    let (app, hits) = counting_app(layer);
    let base = serve(app).await;
    let client = reqwest::Client::new();
    let send = |tier: &'static str, body: Value| {
        client
            .post(format!("{base}/v1/chat/completions"))
            .header("content-type", "application/json")
            .header("x-tier", tier)
            .body(body.to_string())
            .send()
    };
    let msgs = json!([{"role": "user", "content": "hi"}]);

    // Both rules pass.
    let res = send(
        "batch",
        json!({"model": "gpt-4o", "user": "u1", "messages": msgs}),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);

    // The first rule refuses, with its own error as the envelope.
    let res = send(
        "batch",
        json!({"model": "gpt-4o", "user": "u1", "stream": true, "messages": msgs}),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(res.headers()["content-type"], "application/json");
    let env: Value = res.json().await.unwrap();
    assert_eq!(env["error"]["code"], "invalid_value");
    assert_eq!(env["error"]["param"], "stream");
    assert_eq!(env["error"]["message"], "The batch tier does not stream.");

    // The same request from another tier passes the first rule; the closure refuses a
    // request without `user`.
    let res = send(
        "interactive",
        json!({"model": "gpt-4o", "user": "u1", "stream": true, "messages": msgs}),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    let res = send("interactive", json!({"model": "gpt-4o", "messages": msgs}))
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let env: Value = res.json().await.unwrap();
    assert_eq!(env["error"]["code"], "missing_required_field");
    assert_eq!(env["error"]["param"], "user");

    // The built-in checks come first: a bad temperature is named, not the missing `user`.
    let res = send(
        "batch",
        json!({"model": "gpt-4o", "temperature": 9, "stream": true, "messages": msgs}),
    )
    .await
    .unwrap();
    let env: Value = res.json().await.unwrap();
    assert_eq!(env["error"]["param"], "temperature");

    // Refused requests never reached the upstream.
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_rule_reads_the_body_with_every_built_in_check_off_and_only_on_validated_requests() {
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = calls.clone();
    let layer = ValidateRequestLayer::builder()
        .check_required_fields(false)
        .check_params(false)
        .check_messages(false)
        .check_endpoint(false)
        .check_context_length(false)
        .rule(move |head: &RequestHead<'_>, body: &Bytes| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            assert_eq!(head.method(), http::Method::POST);
            if body.windows(7).any(|w| w == b"forbid!") {
                return Err(ApiError::new(ErrorCode::InvalidValue, "Forbidden word."));
            }
            Ok(())
        })
        .build()
        .unwrap();
    let (app, hits) = counting_app(layer);
    let base = serve(app).await;
    let a = post_json(
        &base,
        "/v1/chat/completions",
        r#"{"model":"gpt-4o","prompt":"forbid!"}"#,
    )
    .await;
    assert_eq!((a.status, a.code()), (400, "invalid_value"), "{}", a.text);
    assert_eq!(a.message(), "Forbidden word.");
    let a = post_json(&base, "/v1/chat/completions", r#"{"model":"gpt-4o"}"#).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["view"], true, "the body was read for the rule");
    // Not an LLM request: the rule does not run.
    let a = post_with(&base, "/v1/files", Some("text/plain"), "forbid!").await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 2);
}

/// A body fed through a channel: the upload goes on as long as the test sends chunks.
type ChannelBody = http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>;

fn channel_body() -> (tokio::sync::mpsc::Sender<Bytes>, ChannelBody) {
    use http_body_util::BodyExt;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok(http_body::Frame::data(chunk)), rx))
    });
    (tx, http_body_util::StreamBody::new(frames).boxed_unsync())
}

fn full_body(bytes: &'static str) -> ChannelBody {
    use http_body_util::BodyExt;
    http_body_util::Full::new(Bytes::from_static(bytes.as_bytes()))
        .map_err(|never| match never {})
        .boxed_unsync()
}

#[tokio::test(start_paused = true)]
async fn a_slow_upload_does_not_hold_a_concurrency_slot_behind_the_layer() {
    use http_body_util::BodyExt;
    let upstream = tower::service_fn(|req: http::Request<LayerBody<ChannelBody>>| async move {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(body)))
    });
    let svc = tower::ServiceBuilder::new()
        .layer(ValidateRequestLayer::new())
        .layer(tower::limit::ConcurrencyLimitLayer::new(1))
        .service(upstream);
    let post = |body: ChannelBody| {
        http::Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(body)
            .unwrap()
    };
    let whole = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;

    // The first client sends half its body and stalls.
    let (tx, body) = channel_body();
    tx.send(Bytes::from_static(&whole.as_bytes()[..20]))
        .await
        .unwrap();
    let first = svc.clone().oneshot(post(body));
    tokio::pin!(first);
    assert!(
        futures_util::poll!(&mut first).is_pending(),
        "still uploading"
    );

    // A second request goes through the only slot meanwhile.
    let second = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        svc.clone().oneshot(post(full_body(whole))),
    )
    .await
    .expect("the slow upload must not hold the slot")
    .unwrap();
    assert_eq!(second.status(), 200);
    let got = second.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(got, whole);

    // The first upload ends; its request goes through too, intact.
    tx.send(Bytes::from_static(&whole.as_bytes()[20..]))
        .await
        .unwrap();
    drop(tx);
    let first = first.await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(first.into_body().collect().await.unwrap().to_bytes(), whole);
}

/// A service whose `poll_ready` fails, counting how often it is polled and called.
#[derive(Clone, Default)]
struct Broken {
    polls: Arc<std::sync::atomic::AtomicUsize>,
    calls: Arc<std::sync::atomic::AtomicUsize>,
}

impl tower::Service<Inner> for Broken {
    type Response = http::Response<Body>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.polls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        std::task::Poll::Ready(Err(std::io::Error::other("down")))
    }

    fn call(&mut self, _req: Inner) -> Self::Future {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        std::future::ready(Ok(http::Response::new(Body::empty())))
    }
}

#[tokio::test]
async fn a_readiness_error_of_the_inner_service_is_final_and_rejections_never_poll_it() {
    let broken = Broken::default();
    let svc = ValidateRequestLayer::new().layer(broken.clone());
    let req = |body: &'static str| {
        http::Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap()
    };
    let err = svc
        .clone()
        .oneshot(req(
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "down");
    use std::sync::atomic::Ordering::SeqCst;
    assert_eq!(broken.polls.load(SeqCst), 1, "polled once, never again");
    assert_eq!(broken.calls.load(SeqCst), 0);
    // A rejected request answers without touching the inner service.
    let res = svc.oneshot(req(r#"{"model":"gpt-4o"}"#)).await.unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(broken.polls.load(SeqCst), 1);
}
