//! The admission estimate of `RequestView`: tools and response schemas counted as prompt text,
//! image, audio and file parts by fixed per-part rules, `n` / `best_of` multiplying the output,
//! and a missing `max_tokens` charged the model's default output. Each rule with its exact
//! figure, then once through a real server under a token quota.

mod common_hyper;

use llm_layers::request::{
    CharEstimator, Endpoint, OutputDefaults, RequestView, TokenEstimator, ANTHROPIC_IMAGE_TOKENS,
    AUDIO_PART_TOKENS, DEFAULT_OUTPUT_TOKENS, FILE_PART_TOKENS, IMAGE_HIGH_TOKENS,
    IMAGE_LOW_TOKENS,
};
use serde_json::json;

fn view(endpoint: Endpoint, body: &serde_json::Value) -> RequestView {
    view_with(endpoint, body, &CharEstimator)
}

fn view_with(
    endpoint: Endpoint,
    body: &serde_json::Value,
    estimator: &dyn TokenEstimator,
) -> RequestView {
    RequestView::parse(endpoint, body.to_string().as_bytes(), estimator).unwrap()
}

/// The sum of the fast estimate over `texts`.
fn chars(texts: &[&str]) -> u64 {
    texts.iter().map(|t| CharEstimator.estimate("", t)).sum()
}

fn weather_tool() -> serde_json::Value {
    json!([{"type": "function", "function": {
        "name": "get_weather",
        "description": "Get the weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
            "required": ["city"]}}}])
}

/// `"hi"` is 1 token, plus 4 for the message.
const HI: u64 = 1 + 4;

#[test]
fn tools_are_counted_key_and_string_by_string() {
    let plain = json!({"model": "gpt-4o", "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}]});
    let mut with_tools = plain.clone();
    with_tools["tools"] = weather_tool();
    assert_eq!(view(Endpoint::ChatCompletions, &plain).prompt_tokens(), HI);

    // Every key and string value of the tool, numbers and structure not.
    let tool_strings = [
        "type",
        "function",
        "function",
        "name",
        "get_weather",
        "description",
        "Get the weather",
        "parameters",
        "type",
        "object",
        "properties",
        "city",
        "type",
        "string",
        "required",
        "city",
    ];
    assert_eq!(chars(&tool_strings), 32);
    let v = view(Endpoint::ChatCompletions, &with_tools);
    assert_eq!(v.prompt_tokens(), HI + 32);
    assert_eq!(v.token_cost(), HI + 32 + 10);

    // Anthropic's tools (`input_schema`) and the legacy `functions` the same way.
    let anthropic = json!({"model": "claude-3-5-sonnet", "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}]});
    let strings = ["name", "get_weather", "input_schema", "type", "object"];
    assert_eq!(chars(&strings), 10);
    assert_eq!(view(Endpoint::Other, &anthropic).prompt_tokens(), HI + 10);
    let functions = json!({"model": "gpt-4o", "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}],
        "functions": [{"name": "get_weather"}]});
    assert_eq!(
        view(Endpoint::ChatCompletions, &functions).prompt_tokens(),
        HI + chars(&["name", "get_weather"])
    );

    // A `tools` key given twice counts by its last occurrence.
    let twice = br#"{"tools":[{"name":"a_very_long_tool_name_indeed"}],"tools":[{"name":"ab"}],
        "messages":[{"role":"user","content":"hi"}],"model":"gpt-4o"}"#;
    let v = RequestView::parse(Endpoint::ChatCompletions, twice, &CharEstimator).unwrap();
    assert_eq!(v.prompt_tokens(), HI + chars(&["name", "ab"]));
}

#[test]
fn response_schemas_are_counted_in_chat_and_responses() {
    let chat = json!({"model": "gpt-4o", "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer",
            "schema": {"type": "object"}}}});
    let strings = [
        "type",
        "json_schema",
        "json_schema",
        "name",
        "answer",
        "schema",
        "type",
        "object",
    ];
    assert_eq!(chars(&strings), 15);
    assert_eq!(
        view(Endpoint::ChatCompletions, &chat).prompt_tokens(),
        HI + 15
    );

    // Responses: only `text.format` counts, not `text.verbosity`.
    let responses = json!({"model": "gpt-4o", "max_output_tokens": 10, "input": "hi",
        "text": {"verbosity": "low", "format": {"type": "json_schema", "name": "answer",
            "schema": {"type": "object"}}}});
    let strings = [
        "type",
        "json_schema",
        "name",
        "answer",
        "schema",
        "type",
        "object",
    ];
    assert_eq!(chars(&strings), 12);
    let v = view(Endpoint::Responses, &responses);
    assert_eq!(v.prompt_tokens(), 1 + 12);
    assert_eq!(v.token_cost(), 1 + 12 + 10);
}

#[test]
fn openai_image_parts_count_by_detail() {
    assert_eq!(IMAGE_LOW_TOKENS, 85);
    // 85 + 170 per tile, at most 8 tiles (768×2048 after scaling).
    assert_eq!(IMAGE_HIGH_TOKENS, 1445);
    let chat = |image_url: serde_json::Value| {
        json!({"model": "gpt-4o", "max_tokens": 10, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": image_url}]}]})
    };
    // "What is this?" is 4 tokens, plus 4 for the message.
    let text = 4 + 4;
    for (image_url, image) in [
        (
            json!({"url": "https://example.com/a.png", "detail": "low"}),
            85,
        ),
        (
            json!({"url": "https://example.com/a.png", "detail": "high"}),
            1445,
        ),
        (
            json!({"url": "https://example.com/a.png", "detail": "auto"}),
            1445,
        ),
        (json!({"url": "data:image/png;base64,iVBORw0KGgo="}), 1445),
        (json!("https://example.com/a.png"), 1445),
    ] {
        let v = view(Endpoint::ChatCompletions, &chat(image_url.clone()));
        assert_eq!(v.prompt_tokens(), text + image, "{image_url}");
    }

    // Responses: `input_image` with `detail` on the part; the URL is no text.
    let responses = |detail: &str| {
        json!({"model": "gpt-4o", "max_output_tokens": 10, "input": [{"role": "user",
            "content": [{"type": "input_text", "text": "What is this?"},
                {"type": "input_image", "image_url": "https://example.com/a.png",
                 "detail": detail}]}]})
    };
    assert_eq!(
        view(Endpoint::Responses, &responses("low")).prompt_tokens(),
        4 + 85
    );
    assert_eq!(
        view(Endpoint::Responses, &responses("high")).prompt_tokens(),
        4 + 1445
    );
}

#[test]
fn anthropic_images_audio_and_file_parts_count_their_fixed_defaults() {
    assert_eq!(ANTHROPIC_IMAGE_TOKENS, 1600);
    assert_eq!(AUDIO_PART_TOKENS, 600);
    assert_eq!(FILE_PART_TOKENS, 1500);
    // The base64 data is not counted as text.
    let data = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk".repeat(50);
    let anthropic = json!({"model": "claude-3-5-sonnet", "max_tokens": 10, "messages": [
        {"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                "data": data}},
            {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                "data": data}},
            {"type": "text", "text": "Describe"}]}]});
    // "Describe" is 2 tokens, plus 4 for the message.
    assert_eq!(
        view(Endpoint::Other, &anthropic).prompt_tokens(),
        1600 + 1500 + 2 + 4
    );

    let chat = json!({"model": "gpt-4o-audio-preview", "max_tokens": 10, "messages": [
        {"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}},
            {"type": "file", "file": {"file_id": "file-abc123"}}]}]});
    assert_eq!(
        view(Endpoint::ChatCompletions, &chat).prompt_tokens(),
        600 + 1500 + 4
    );
    let responses = json!({"model": "gpt-4o", "max_output_tokens": 10, "input": [
        {"role": "user", "content": [{"type": "input_file", "file_id": "file-abc123"}]}]});
    assert_eq!(view(Endpoint::Responses, &responses).prompt_tokens(), 1500);
}

#[test]
fn n_multiplies_the_output_and_best_of_does_for_completions() {
    let chat = |n: serde_json::Value| {
        json!({"model": "gpt-4o", "max_tokens": 100, "n": n,
            "messages": [{"role": "user", "content": "hi"}]})
    };
    let one = view(Endpoint::ChatCompletions, &chat(json!(1)));
    assert_eq!(one.token_cost(), HI + 100);
    let three = view(Endpoint::ChatCompletions, &chat(json!(3)));
    assert_eq!(three.choices(), 3);
    assert_eq!(three.output_tokens(), 100);
    assert_eq!(three.token_cost(), HI + 300);
    // The prompt is sent once.
    assert_eq!(three.prompt_tokens(), HI);
    // 0, negative or not a number: one choice.
    for n in [json!(0), json!(-2), json!("3"), json!(null)] {
        assert_eq!(
            view(Endpoint::ChatCompletions, &chat(n.clone())).token_cost(),
            HI + 100,
            "{n}"
        );
    }

    // Legacy completions bill every `best_of` candidate.
    let completions = json!({"model": "gpt-3.5-turbo-instruct", "prompt": "hi", "max_tokens": 10,
        "n": 2, "best_of": 5});
    let v = view(Endpoint::Completions, &completions);
    assert_eq!(v.choices(), 5);
    assert_eq!(v.token_cost(), 1 + 50);
    // Elsewhere `best_of` is no field of the API: only `n` counts.
    let v = view(Endpoint::ChatCompletions, &chat(json!(2)));
    assert_eq!(v.token_cost(), HI + 200);
    let mut with_best_of = chat(json!(2));
    with_best_of["best_of"] = json!(5);
    assert_eq!(
        view(Endpoint::ChatCompletions, &with_best_of).token_cost(),
        HI + 200
    );
}

#[test]
fn a_missing_max_tokens_is_charged_the_default_output_of_the_model() {
    let body =
        |model: &str| json!({"messages": [{"role": "user", "content": "hi"}], "model": model});
    // The default: 4096 for every model.
    assert_eq!(DEFAULT_OUTPUT_TOKENS, 4096);
    let v = view(Endpoint::ChatCompletions, &body("gpt-4o"));
    assert_eq!(v.max_tokens(), None);
    assert_eq!(v.output_tokens(), 4096);
    assert_eq!(v.token_cost(), HI + 4096);

    // A table by model prefix (the longest wins) and its fallback.
    let estimator = CharEstimator.with_output_defaults(
        OutputDefaults::new(1000)
            .prefix("gpt-4o", 16_384)
            .prefix("gpt-4o-mini", 2048)
            .prefix("claude", 8192),
    );
    for (model, output) in [
        ("gpt-4o-2024-08-06", 16_384),
        ("gpt-4o-mini-2024-07-18", 2048),
        ("claude-3-5-sonnet", 8192),
        ("llama-3.1-8b", 1000),
        ("", 1000),
    ] {
        let v = view_with(Endpoint::ChatCompletions, &body(model), &estimator);
        assert_eq!(v.output_tokens(), output, "{model}");
        assert_eq!(v.token_cost(), HI + output, "{model}");
    }
    // The view without `model` at all gets the fallback.
    let v = view_with(
        Endpoint::ChatCompletions,
        &json!({"messages": [{"role": "user", "content": "hi"}]}),
        &estimator,
    );
    assert_eq!(v.output_tokens(), 1000);

    // A set `max_tokens` wins over the table; `n` multiplies the default too.
    let mut set = body("gpt-4o");
    set["max_tokens"] = json!(7);
    assert_eq!(
        view_with(Endpoint::ChatCompletions, &set, &estimator).token_cost(),
        HI + 7
    );
    let mut n = body("gpt-4o-mini");
    n["n"] = json!(2);
    assert_eq!(
        view_with(Endpoint::ChatCompletions, &n, &estimator).token_cost(),
        HI + 2 * 2048
    );

    // Embeddings have no output.
    let embeddings = json!({"model": "text-embedding-3-small", "input": "hello world!"});
    let v = view_with(Endpoint::Embeddings, &embeddings, &estimator);
    assert_eq!(v.output_tokens(), 0);
    assert_eq!(v.token_cost(), 3);

    // The wrapper counts texts as the estimator it wraps.
    assert_eq!(estimator.estimate("gpt-4o", "hello world!"), 3);
    assert!(!estimator.uses_model());
}

#[test]
fn a_model_dependent_estimator_counts_the_new_parts_with_the_model_given_last() {
    // Tokens = (model length + 1) × bytes: texts read before `model` wait for it.
    let by_model = |model: &str, text: &str| (model.len() as u64 + 1) * text.len() as u64;
    let body = br#"{"tools":[{"name":"ab"}],"messages":[{"role":"user","content":[
        {"type":"image_url","image_url":{"url":"u","detail":"low"}}]}],"model":"xyz"}"#;
    let v = RequestView::parse(Endpoint::ChatCompletions, body, &by_model).unwrap();
    assert_eq!(
        v.prompt_tokens(),
        4 * ("name".len() + "ab".len()) as u64 + 85 + 4
    );
}

#[cfg(feature = "tiktoken")]
#[test]
fn with_tiktoken_the_new_parts_are_real_token_counts() {
    use llm_layers::request::TiktokenEstimator;

    let est = TiktokenEstimator;
    let tiktoken =
        |texts: &[&str]| -> u64 { texts.iter().map(|t| est.estimate("gpt-4o", t)).sum() };
    let body = json!({"model": "gpt-4o", "max_tokens": 10,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is the weather in Paris today?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png",
                "detail": "low"}}]}],
        "tools": [{"type": "function", "function": {"name": "get_weather",
            "description": "Get the current weather for a city"}}]});
    let v = view_with(Endpoint::ChatCompletions, &body, &est);
    let text = tiktoken(&["What is the weather in Paris today?"]);
    let tool_strings = [
        "type",
        "function",
        "function",
        "name",
        "get_weather",
        "description",
        "Get the current weather for a city",
    ];
    let tools = tiktoken(&tool_strings);
    assert_eq!(text, 8);
    // The fast estimate would say otherwise: the view's figure is tiktoken's.
    assert_eq!(chars(&tool_strings), 21);
    assert_ne!(tools, 21);
    assert_eq!(v.prompt_tokens(), text + tools + 85 + 4);
    assert_eq!(v.output_tokens(), 10);
}

#[cfg(feature = "rate-limit")]
mod through_a_server {
    use std::time::Duration;

    use super::common_hyper::{echo_upstream, envelope_code, post, proxy_to, send, serve};
    use super::*;
    use http::HeaderName;
    use llm_layers::rate_limit::{BucketKey, Limits, Quota, RateLimitLayer};
    use tower::timeout::TimeoutLayer;
    use tower::ServiceBuilder;

    #[tokio::test]
    async fn a_token_quota_refuses_what_tools_and_images_push_over_it() {
        let upstream = echo_upstream().await;
        let layer = RateLimitLayer::builder()
            .key_by(BucketKey::header(HeaderName::from_static("authorization")))
            .limits(Limits::new().tokens(Quota::per_hour(4000).burst(4000)))
            .build()
            .unwrap();
        let svc = ServiceBuilder::new()
            .layer(layer)
            .layer(TimeoutLayer::new(Duration::from_secs(30)))
            .service(proxy_to(upstream.addr));
        let addr = serve(svc).await;
        let url = format!("http://{addr}/v1/chat/completions");

        let image = |detail: &str| {
            json!({"type": "image_url", "image_url": {"url": "https://example.com/a.png",
                "detail": detail}})
        };
        let body = json!({"model": "gpt-4o", "max_tokens": 100, "tools": weather_tool(),
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "hi"}, image("high"), image("auto")]}]})
        .to_string();
        // The text alone: 5 prompt tokens + 100, what the estimate used to charge. Now the
        // tool's 32 tokens and two images at 1445 each.
        let cost = HI + 32 + 2 * 1445 + 100;
        assert_eq!(cost, 3027);
        let parsed =
            RequestView::parse(Endpoint::ChatCompletions, body.as_bytes(), &CharEstimator).unwrap();
        assert_eq!(parsed.token_cost(), cost);

        // The echo upstream reports no usage: the estimate stays charged.
        let (status, headers, _) = send(post(&url, Some("sk-1"), &body)).await;
        assert_eq!(status, 200);
        assert_eq!(
            headers["x-ratelimit-remaining-tokens"].to_str().unwrap(),
            (4000 - cost).to_string()
        );
        // 973 left: the second is refused (at 105 tokens each, both would have passed).
        let (status, headers, answer) = send(post(&url, Some("sk-1"), &body)).await;
        assert_eq!(status, 429);
        assert_eq!(
            envelope_code(&answer).as_deref(),
            Some("rate_limit_exceeded")
        );
        assert_eq!(headers["x-ratelimit-remaining-tokens"], "973");
        assert_eq!(upstream.hits(), 1, "the refusal never reached the upstream");

        // A request of the old figure still fits in what is left.
        let small = json!({"model": "gpt-4o", "max_tokens": 100,
            "messages": [{"role": "user", "content": "hi"}]})
        .to_string();
        let (status, _, _) = send(post(&url, Some("sk-1"), &small)).await;
        assert_eq!(status, 200);
        assert_eq!(upstream.hits(), 2);
    }
}
