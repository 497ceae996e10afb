//! The rate limiter reads the token usage every dialect reports, streamed and not, and
//! corrects the token bucket by it: recorded answers of OpenAI chat, the Responses API,
//! Anthropic Messages, Gemini, vLLM, Ollama (OpenAI endpoint and native API) and llama.cpp
//! replayed by a stub upstream through a real gateway; every split of each answer into two
//! frames metered alike; and a long stream metered without a copy or an allocation per frame.

#![cfg(feature = "rate-limit")]

mod common_hyper;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use common_hyper::{post, proxy_to, send, serve};
use futures_util::FutureExt;
use http::{HeaderName, Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use llm_layers::body::LayerBody;
use llm_layers::rate_limit::{BucketKey, Limits, Quota, RateLimitLayer};
use llm_layers::request::{CharEstimator, Endpoint, RequestView};
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn grow(by: isize) {
    let _ = LIVE.try_with(|l| {
        l.set(l.get() + by);
        let _ = PEAK.try_with(|p| p.set(p.get().max(l.get())));
    });
}

struct Counting;

// SAFETY: every call is forwarded unchanged to the system allocator; the wrapper only counts
// allocations made on the current thread while counting is switched on. `try_with` keeps it
// sound during thread teardown. Counting allocations needs a global allocator, and that trait
// is unsafe to implement; the crate itself forbids unsafe code.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.try_with(Cell::get).unwrap_or(false) {
            let _ = ALLOCATIONS.try_with(|a| a.set(a.get() + 1));
            grow(layout.size() as isize);
        }
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if COUNTING.try_with(Cell::get).unwrap_or(false) {
            grow(-(layout.size() as isize));
        }
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.try_with(Cell::get).unwrap_or(false) {
            let _ = ALLOCATIONS.try_with(|a| a.set(a.get() + 1));
            grow(new_size as isize - layout.size() as isize);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Each recorded answer and the tokens it reports.
const FIXTURES: &[(&str, u64)] = &[
    // `stream_options.include_usage`: `"usage": null` on every chunk, the figures on the last.
    ("openai_chat.sse", 1000),
    ("openai_chat.json", 1228),
    ("openai_responses.sse", 2500),
    ("openai_responses.json", 123),
    // 1,200 input tokens in `message_start`, 300 output tokens in `message_delta`.
    ("anthropic.sse", 1500),
    // 50 + 2,000 written to the cache + 4,000 read from it + 120 output.
    ("anthropic.json", 6170),
    ("gemini.sse", 300),
    ("gemini.json", 1120),
    ("gemini_array.json", 45),
    // `continuous_usage_stats`: cumulative usage on every chunk.
    ("vllm.sse", 700),
    ("ollama_openai.sse", 400),
    ("llamacpp.sse", 85),
    ("ollama_native.ndjson", 308),
    ("ollama_native.json", 424),
];

const BURST: u64 = 100_000;

fn fixture(name: &str) -> Bytes {
    let path = format!("{}/tests/fixtures/usage/{name}", env!("CARGO_MANIFEST_DIR"));
    Bytes::from(std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}")))
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit('.').next() {
        Some("sse") => "text/event-stream; charset=utf-8",
        Some("ndjson") => "application/x-ndjson",
        _ => "application/json",
    }
}

/// A token bucket of 100,000 that refills one token an hour: what a test reads from it is
/// what was charged.
fn layer() -> RateLimitLayer {
    RateLimitLayer::builder()
        .key_by(BucketKey::header(HeaderName::from_static("authorization")))
        .limits(Limits::new().tokens(Quota::per_hour(1).burst(BURST as u32)))
        .build()
        .unwrap()
}

fn chat(max_tokens: u64) -> String {
    serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
        "stream": true,
    })
    .to_string()
}

fn cost(body: &str) -> u64 {
    RequestView::parse(Endpoint::ChatCompletions, body.as_bytes(), &CharEstimator)
        .unwrap()
        .token_cost()
}

fn remaining(headers: &http::HeaderMap) -> u64 {
    headers["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// Frames of `bytes`: at most `size` bytes each.
fn frames(bytes: &Bytes, size: usize) -> Vec<Result<Frame<Bytes>, Infallible>> {
    (0..bytes.len())
        .step_by(size.max(1))
        .map(|i| Ok(Frame::data(bytes.slice(i..(i + size).min(bytes.len())))))
        .collect()
}

type Replay =
    StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

/// The stub upstream: `/fixture/{name}` answers the recorded answer, streams in frames of 61
/// bytes, plain JSON bodies in one.
async fn upstream() -> SocketAddr {
    serve(tower::service_fn(|req: Request<Incoming>| async move {
        let name = req.uri().path().trim_start_matches("/fixture/").to_owned();
        let bytes = fixture(&name);
        let size = if name.ends_with(".json") {
            bytes.len()
        } else {
            61
        };
        let body: Replay = StreamBody::new(futures_util::stream::iter(frames(&bytes, size)));
        Ok::<_, Infallible>(
            Response::builder()
                .header("content-type", content_type(&name))
                .body(body)
                .unwrap(),
        )
    }))
    .await
}

async fn gateway(layer: RateLimitLayer, upstream: SocketAddr) -> SocketAddr {
    serve(
        ServiceBuilder::new()
            .layer(layer)
            .service(proxy_to(upstream)),
    )
    .await
}

/// A request the layer cannot estimate (not JSON): charged nothing, it reads the bucket.
fn probe(url: &str, key: &str) -> Request<Full<Bytes>> {
    Request::post(url)
        .header("content-type", "text/plain")
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(Bytes::from_static(b"probe")))
        .unwrap()
}

#[tokio::test]
async fn every_dialect_is_charged_the_usage_it_reports() {
    let up = upstream().await;
    let gw = gateway(layer(), up).await;
    // Charged 4,005 at admission: most answers get tokens back, `anthropic.json` pays more.
    let body = chat(4000);
    let admitted = cost(&body);
    assert!(admitted > 4000, "{admitted}");
    for &(name, usage) in FIXTURES {
        let url = format!("http://{gw}/fixture/{name}");
        let key = format!("k-{name}");
        let (status, headers, answer) = send(post(&url, Some(&key), &body)).await;
        assert_eq!(status, 200, "{name}");
        assert_eq!(remaining(&headers), BURST - admitted, "{name}");
        assert_eq!(answer, fixture(name), "{name}: passed through unchanged");
        let (status, headers, _) = send(probe(&url, &key)).await;
        assert_eq!(status, 200, "{name}");
        assert_eq!(
            remaining(&headers),
            BURST - usage,
            "{name}: charged {usage}"
        );
    }
}

#[tokio::test]
async fn an_anthropic_stream_of_1200_input_and_300_output_tokens_is_charged_1500() {
    let up = upstream().await;
    let gw = gateway(layer(), up).await;
    let url = format!("http://{gw}/fixture/anthropic.sse");
    // Charged nothing at admission: the whole 1,500 is charged from the stream.
    let (status, headers, answer) = send(probe(&url, "anthropic")).await;
    assert_eq!(status, 200);
    assert_eq!(remaining(&headers), BURST);
    assert!(answer.ends_with(b"data: {\"type\":\"message_stop\"}\n\n"));
    let (_, headers, _) = send(probe(&url, "anthropic")).await;
    assert_eq!(remaining(&headers), BURST - 1500);
}

type Answer = std::future::Ready<Result<Response<Replay>, Infallible>>;

/// An in-process upstream answering `fixture` cut where the request's `x-cut` header says.
fn cut_upstream(
    name: &'static str,
) -> impl Service<
    Request<LayerBody<Full<Bytes>>>,
    Response = Response<Replay>,
    Error = Infallible,
    Future = Answer,
> + Clone {
    let bytes = fixture(name);
    tower::service_fn(move |req: Request<LayerBody<Full<Bytes>>>| {
        let cuts: Vec<usize> = req
            .headers()
            .get("x-cut")
            .map(|v| {
                v.to_str()
                    .unwrap()
                    .split(',')
                    .map(|c| c.parse().unwrap())
                    .collect()
            })
            .unwrap_or_default();
        let mut parts = Vec::new();
        let mut at = 0;
        for c in cuts.into_iter().chain([bytes.len()]) {
            parts.push(Ok(Frame::data(bytes.slice(at..c))));
            at = c;
        }
        std::future::ready(Ok(Response::builder()
            .header("content-type", content_type(name))
            .body(StreamBody::new(futures_util::stream::iter(parts)))
            .unwrap()))
    })
}

fn keyed(key: &str, body: Full<Bytes>, content_type: &str) -> Request<Full<Bytes>> {
    Request::post("/v1/chat/completions")
        .header("authorization", key)
        .header("content-type", content_type)
        .body(body)
        .unwrap()
}

#[tokio::test]
async fn a_stream_split_at_any_byte_is_metered_the_same() {
    let body = chat(4000);
    for &(name, usage) in FIXTURES {
        let layer = layer();
        let mut svc = layer.layer(cut_upstream(name));
        let len = fixture(name).len();
        // Two frames cut at every byte, and one frame per byte.
        let one_per_byte = (1..len)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let cuts = (0..=len).map(|k| k.to_string()).chain([one_per_byte]);
        for (i, cut) in cuts.enumerate() {
            let key = format!("{name}-{i}");
            let mut req = keyed(
                &key,
                Full::new(Bytes::from(body.clone())),
                "application/json",
            );
            req.headers_mut().insert("x-cut", cut.parse().unwrap());
            let res = svc.ready().await.unwrap().call(req).await.unwrap();
            let got = res.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(got.len(), len);
            let probe = keyed(&key, Full::new(Bytes::from_static(b"probe")), "text/plain");
            let res = svc.ready().await.unwrap().call(probe).await.unwrap();
            assert_eq!(
                remaining(res.headers()),
                BURST - usage,
                "{name} cut at {}",
                if cut.len() > 12 { "every byte" } else { &cut }
            );
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_long_stream_is_metered_without_an_allocation_per_frame() {
    // 200 KiB of chat chunks: OpenAI's sent with `include_usage` (`"usage":null`, never
    // parsed) between vLLM's with `continuous_usage_stats` (cumulative usage on every chunk,
    // each one parsed); the last reports 1,000 tokens, fewer than the chunk before it: the
    // last report wins. Every frame names `usage`.
    let null = "data: {\"id\":\"chatcmpl-AZ9fQ2pLmT\",\"object\":\"chat.completion.chunk\",\"created\":1733050000,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" word\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n";
    let mut text = String::new();
    let mut i = 0;
    while text.len() < 200 << 10 {
        i += 1;
        text.push_str(null);
        text.push_str(&format!("data: {{\"id\":\"chatcmpl-5c7a0d4e\",\"object\":\"chat.completion.chunk\",\"model\":\"meta-llama/Llama-3.1-8B-Instruct\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" word\"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":{{\"prompt_tokens\":800,\"total_tokens\":{},\"completion_tokens\":{i}}}}}\n\n", 800 + i));
    }
    text.push_str("data: {\"id\":\"chatcmpl-AZ9fQ2pLmT\",\"choices\":[],\"usage\":{\"prompt_tokens\":800,\"completion_tokens\":200,\"total_tokens\":1000}}\n\ndata: [DONE]\n\n");
    let events = text.matches("data: ").count();
    let bytes = Bytes::from(text);
    // Frames of 1,000 bytes: most events straddle two frames.
    let parts = Arc::new(
        frames(&bytes, 1000)
            .into_iter()
            .map(|f| f.unwrap().into_data().unwrap())
            .collect::<Vec<_>>(),
    );
    let inner = {
        let parts = parts.clone();
        tower::service_fn(move |_req: Request<LayerBody<Full<Bytes>>>| {
            let frames: Vec<Result<Frame<Bytes>, Infallible>> =
                parts.iter().cloned().map(|b| Ok(Frame::data(b))).collect();
            std::future::ready(Ok::<_, Infallible>(
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(StreamBody::new(futures_util::stream::iter(frames)))
                    .unwrap(),
            ))
        })
    };
    let mut svc = layer().layer(inner);
    let req = keyed(
        "long",
        Full::new(Bytes::from(chat(4000))),
        "application/json",
    );
    let res = svc.ready().await.unwrap().call(req).await.unwrap();
    let mut body = res.into_body();

    COUNTING.with(|c| c.set(true));
    let mut seen = 0;
    while let Some(frame) = body
        .frame()
        .now_or_never()
        .expect("ready")
        .transpose()
        .unwrap()
    {
        seen += frame.into_data().unwrap().len();
    }
    COUNTING.with(|c| c.set(false));
    let allocations = ALLOCATIONS.with(Cell::get);
    let peak = PEAK.with(Cell::get);

    assert_eq!(seen, bytes.len());
    assert!(
        events > 700 && parts.len() > 200,
        "{events} events, {} frames",
        parts.len()
    );
    // The line a frame cuts is kept in one buffer that grows to the longest such line.
    assert!(
        allocations <= 4,
        "{allocations} allocations for {events} events"
    );
    assert!(peak <= 4096, "{peak} bytes held");
    drop(body);
    let probe = keyed(
        "long",
        Full::new(Bytes::from_static(b"probe")),
        "text/plain",
    );
    let res = svc.ready().await.unwrap().call(probe).await.unwrap();
    assert_eq!(remaining(res.headers()), BURST - 1000);
}
