//! The typed parse of `RequestView` against a plain `serde_json::from_slice::<Value>` of the
//! same body, in the same run: a realistic 2 KiB chat request and a 200 KiB one (a long
//! conversation with tools, tool calls, content parts and escaped text).

use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use llm_layers::request::{CharEstimator, Endpoint, RequestView};
use serde_json::{json, Value};

/// Sentences of varied length, with the escapes real prompts carry (newlines, quotes, tabs,
/// non-ASCII).
const SENTENCES: [&str; 8] = [
    "Could you explain how the borrow checker decides when a reference may outlive the value?",
    "Here is the code:\n```rust\nfn main() {\n    let s = String::from(\"hello\");\n}\n```",
    "The function returns `Result<(), Error>`; the caller uses `?` to pass errors on.",
    "Summarise the \"design notes\" below in three bullet points.\n\n- one\n- two",
    "Résumé: the café's menu lists crème brûlée, 12 € — ask for the \"petit\" size.",
    "Table:\tname\tvalue\n\tlimit\t4096\n\tretries\t3",
    "短い説明をお願いします。これはテストです。",
    "Thanks! One more question about lifetimes in trait objects.",
];

/// A chat request of about `target` bytes: tools, a system prompt, then turns of user text,
/// content parts, assistant answers, tool calls and tool results.
fn chat_body(target: usize) -> Bytes {
    let mut rng = fastrand::Rng::with_seed(2024);
    let tools = json!([{
        "type": "function",
        "function": {
            "name": "search_docs",
            "description": "Search the documentation and return the best matching passages.",
            "parameters": {"type": "object", "properties": {
                "query": {"type": "string", "description": "What to look for"},
                "limit": {"type": "integer", "minimum": 1, "maximum": 20}
            }, "required": ["query"]}
        }
    }]);
    let mut messages = vec![json!({"role": "system", "content":
        "You are a helpful assistant for a Rust team. Answer briefly, cite the docs, and use \
         the search tool when unsure."})];
    let mut text = |n: usize| -> String {
        (0..n)
            .map(|_| SENTENCES[rng.usize(..SENTENCES.len())])
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut i = 0;
    loop {
        let body = json!({"model": "gpt-4o", "temperature": 0.7, "top_p": 1, "max_tokens": 512,
            "stream": true, "stream_options": {"include_usage": true}, "user": "user-1234",
            "metadata": {"team": "platform", "ticket": "OPS-42"}, "tools": tools,
            "tool_choice": "auto", "messages": messages});
        let bytes = serde_json::to_vec(&body).unwrap();
        if bytes.len() >= target {
            return Bytes::from(bytes);
        }
        let turn = match i % 5 {
            0 => json!({"role": "user", "content": text(2)}),
            1 => json!({"role": "assistant", "content": null, "tool_calls": [{
                "id": format!("call_{i}"), "type": "function",
                "function": {"name": "search_docs",
                    "arguments": json!({"query": text(1), "limit": 5}).to_string()}}]}),
            2 => json!({"role": "tool", "tool_call_id": format!("call_{}", i - 1),
                "content": text(3)}),
            3 => json!({"role": "user", "content": [
                {"type": "text", "text": text(1)},
                {"type": "image_url", "image_url": {"url": "https://example.com/chart.png",
                    "detail": "low"}}]}),
            _ => json!({"role": "assistant", "content": text(3)}),
        };
        messages.push(turn);
        i += 1;
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("request_view");
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    for (name, size) in [("2KiB", 2 * 1024), ("200KiB", 200 * 1024)] {
        let body = chat_body(size);
        // Both parse the same body, and the view reads what it should.
        let view = RequestView::parse(Endpoint::ChatCompletions, &body, &CharEstimator).unwrap();
        assert_eq!(view.model(), Some("gpt-4o"));
        assert!(view.stream() && view.prompt_tokens() > 100);
        serde_json::from_slice::<Value>(&body).unwrap();
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(
            BenchmarkId::new("serde_json_value", name),
            &body,
            |b, body| b.iter(|| serde_json::from_slice::<Value>(body).unwrap()),
        );
        group.bench_with_input(BenchmarkId::new("typed_parse", name), &body, |b, body| {
            b.iter(|| RequestView::parse(Endpoint::ChatCompletions, body, &CharEstimator).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
