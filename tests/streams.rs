//! The normalizer on 2xx event streams: the first-event decision and the stream timers.
//!
//! Behaviour that crosses HTTP runs through real sockets: a stub upstream streams scripted
//! events with controlled gaps, and the normalizer wraps a hyper client to it. Exact timing
//! runs over in-process services under `tokio::time::pause`.

mod common_hyper;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common_hyper::{client, proxy_to, serve};
use futures_util::stream;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use llm_layers::breaker::CircuitBreakerLayer;
use llm_layers::error::{ApiError, ErrorCode};
use llm_layers::normalize::{NormalizeErrorsLayer, NormalizeOptions};
use llm_layers::retry::{Backoff, Jitter, RetryLayer};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

fn fixture(name: &str) -> String {
    let path = format!(
        "{}/tests/fixtures/streams/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(path).expect("stream fixture")
}

/// One step of a scripted stream.
#[derive(Clone, Debug)]
enum Step {
    /// Send these bytes as one chunk.
    Send(String),
    /// Wait this long before the next step.
    Wait(Duration),
    /// Stay silent for good.
    Hang,
}

type Script = Vec<Step>;

/// A stream stub on a real socket: each request takes the next script (the last one repeats),
/// or `for_model`'s script when the request body names that model.
struct Stub {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

async fn stub(scripts: Vec<Script>, for_model: Option<(&'static str, Script)>) -> Stub {
    let queue = Arc::new(Mutex::new(VecDeque::from(scripts)));
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let svc = tower::service_fn(move |req: Request<Incoming>| {
        let queue = queue.clone();
        let hits = counted.clone();
        let for_model = for_model.clone();
        async move {
            hits.fetch_add(1, Ordering::SeqCst);
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let script = match &for_model {
                Some((model, script))
                    if String::from_utf8_lossy(&body).contains(&format!("\"{model}\"")) =>
                {
                    script.clone()
                }
                _ => {
                    let mut q = queue.lock().unwrap();
                    if q.len() > 1 {
                        q.pop_front().unwrap()
                    } else {
                        q.front().cloned().unwrap_or_default()
                    }
                }
            };
            let frames = stream::unfold(script.into_iter(), |mut steps| async move {
                loop {
                    match steps.next()? {
                        Step::Send(s) => {
                            let frame = Ok::<_, Infallible>(Frame::data(Bytes::from(s)));
                            return Some((frame, steps));
                        }
                        Step::Wait(d) => tokio::time::sleep(d).await,
                        Step::Hang => std::future::pending::<()>().await,
                    }
                }
            });
            Ok::<_, Infallible>(
                Response::builder()
                    .status(StatusCode::OK)
                    .header("content-type", "text/event-stream")
                    .header("x-request-id", "req_stub")
                    .body(StreamBody::new(frames))
                    .unwrap(),
            )
        }
    });
    let addr = serve(svc).await;
    Stub { addr, hits }
}

impl Stub {
    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// A script that sends `text` in chunks of `n` bytes with `gap` between them.
fn chunked(text: &str, n: usize, gap: Duration) -> Script {
    let mut out = Vec::new();
    for (i, chunk) in text.as_bytes().chunks(n).enumerate() {
        if i > 0 {
            out.push(Step::Wait(gap));
        }
        out.push(Step::Send(String::from_utf8(chunk.to_vec()).unwrap()));
    }
    out
}

fn send(s: &str) -> Step {
    Step::Send(s.to_owned())
}

fn chat(model: &str) -> String {
    format!(r#"{{"model":"{model}","stream":true,"messages":[]}}"#)
}

/// Serves `svc` (the gateway) on a real socket and posts `body` to it; returns the status,
/// headers and whole body. Fails instead of hanging.
async fn call<S, B>(svc: S, body: &str) -> (StatusCode, http::HeaderMap, Bytes)
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<common_hyper::BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<common_hyper::BoxError>,
{
    let addr = serve(svc).await;
    let req = Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    tokio::time::timeout(Duration::from_secs(20), async {
        let res = client::<Full<Bytes>>().request(req).await.unwrap();
        let (parts, body) = res.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (parts.status, parts.headers, body)
    })
    .await
    .expect("the gateway answered")
}

fn held() -> NormalizeOptions {
    NormalizeOptions::new().hold_first_event(true)
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(body)))
}

// ---- First-event decision, through sockets ----

#[tokio::test]
async fn a_first_event_429_error_becomes_a_real_429_envelope() {
    let up = stub(
        vec![vec![send(&fixture("openai_first_event_429.sse"))]],
        None,
    )
    .await;
    let gateway = NormalizeErrorsLayer::with_options(held()).layer(proxy_to(up.addr));
    let (status, headers, body) = call(gateway, &chat("gpt-4o-mini")).await;
    println!("{status}\n{headers:?}\n{}", String::from_utf8_lossy(&body));
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["x-should-retry"], "true");
    // The provider's "try again in 36ms" is the wait.
    assert_eq!(headers["retry-after-ms"], "36");
    assert_eq!(headers["x-request-id"], "req_stub");
    let v = json(&body);
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
}

#[tokio::test]
async fn without_the_hold_a_first_event_error_stays_in_band() {
    // The default: the head goes on at once; the event is rewritten in-band.
    let up = stub(
        vec![vec![send(&fixture("openai_first_event_429.sse"))]],
        None,
    )
    .await;
    let gateway = NormalizeErrorsLayer::new().layer(proxy_to(up.addr));
    let (status, _, body) = call(gateway, &chat("gpt-4o-mini")).await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8_lossy(&body);
    assert!(text.starts_with("data: {\"error\":"), "{text}");
    assert!(text.contains("rate_limit_exceeded"), "{text}");
}

#[tokio::test]
async fn an_anthropic_first_error_event_becomes_a_real_error() {
    let up = stub(
        vec![chunked(
            &fixture("anthropic_first_event_overloaded.sse"),
            7,
            Duration::from_millis(1),
        )],
        None,
    )
    .await;
    let gateway = NormalizeErrorsLayer::with_options(held()).layer(proxy_to(up.addr));
    let (status, headers, body) = call(gateway, &chat("claude-sonnet-4-5")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body:?}");
    assert_eq!(headers["x-should-retry"], "true");
    assert_eq!(json(&body)["error"]["code"], "service_unavailable");
}

#[tokio::test]
async fn a_stream_that_ends_before_any_event_is_an_error() {
    // Comments are not events.
    let up = stub(
        vec![vec![
            send(": OPENROUTER PROCESSING\n\n"),
            send(": ping\n\n"),
        ]],
        None,
    )
    .await;
    let gateway = NormalizeErrorsLayer::with_options(held()).layer(proxy_to(up.addr));
    let (status, headers, body) = call(gateway, &chat("m")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(headers["x-should-retry"], "true");
    let v = json(&body);
    assert_eq!(v["error"]["code"], "service_unavailable");
    assert_eq!(
        v["error"]["message"],
        "The upstream stream ended before its first event."
    );
}

#[tokio::test]
async fn clean_streams_are_byte_identical_with_the_hold_and_every_timer_on() {
    let options = held()
        .first_event_timeout(Some(Duration::from_secs(10)))
        .stream_idle_timeout(Some(Duration::from_secs(10)))
        .stream_total_timeout(Some(Duration::from_secs(30)));
    for name in ["openai_chat.sse", "anthropic_messages.sse"] {
        let sent = fixture(name);
        for n in [1, 5, 64, sent.len()] {
            // Comments before the first event are held and handed on too.
            let mut script = vec![send(": keep-alive\n\n")];
            script.extend(chunked(&sent, n, Duration::ZERO));
            let up = stub(vec![script], None).await;
            let gateway = NormalizeErrorsLayer::with_options(options).layer(proxy_to(up.addr));
            let (status, headers, body) = call(gateway, &chat("m")).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(headers["content-type"], "text/event-stream");
            assert_eq!(
                String::from_utf8_lossy(&body),
                format!(": keep-alive\n\n{sent}"),
                "{name} in chunks of {n}"
            );
        }
    }
}

#[tokio::test]
async fn a_stream_over_the_hold_limit_is_handed_on_undecided() {
    let padding = format!(": {}\n\n", "x".repeat(200));
    let error = fixture("openai_first_event_429.sse");
    let up = stub(vec![vec![send(&padding), send(&error)]], None).await;
    let gateway = NormalizeErrorsLayer::with_options(held().first_event_max_bytes(100))
        .layer(proxy_to(up.addr));
    let (status, _, body) = call(gateway, &chat("m")).await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8_lossy(&body);
    assert!(text.starts_with(&padding), "{text}");
    // Still rewritten in-band.
    assert!(text.contains("rate_limit_exceeded"), "{text}");
}

// ---- Retry and fallback up to the first byte ----

#[tokio::test]
async fn retry_outside_the_normalizer_retries_a_stream_whose_first_event_was_a_429() {
    let clean = fixture("openai_chat.sse");
    let up = stub(
        vec![
            vec![send(&fixture("openai_first_event_429.sse"))],
            chunked(&clean, 40, Duration::from_millis(1)),
        ],
        None,
    )
    .await;
    let retry = RetryLayer::builder()
        .backoff(
            Backoff::new(
                Duration::from_millis(1),
                Duration::from_millis(5),
                Jitter::Full,
            )
            .unwrap(),
        )
        .seed(7)
        .build()
        .unwrap();
    let gateway = ServiceBuilder::new()
        .layer(retry)
        .layer(NormalizeErrorsLayer::with_options(held()))
        .service(proxy_to(up.addr));
    let (status, _, body) = call(gateway, &chat("gpt-4o-mini")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(String::from_utf8_lossy(&body), clean);
    assert_eq!(up.hits(), 2);
}

#[tokio::test]
async fn the_breaker_fallback_answers_a_stream_whose_first_event_failed() {
    let clean = fixture("anthropic_messages.sse");
    let up = stub(
        vec![vec![send(&fixture("anthropic_first_event_overloaded.sse"))]],
        Some(("claude-haiku-4-5", vec![send(&clean)])),
    )
    .await;
    let breaker = CircuitBreakerLayer::builder()
        .key_by(llm_layers::breaker::CircuitKey::Model)
        .consecutive_failures(1)
        .fallback_model("claude-haiku-4-5")
        .build()
        .unwrap();
    let gateway = ServiceBuilder::new()
        .layer(breaker)
        .layer(NormalizeErrorsLayer::with_options(held()))
        .service(proxy_to(up.addr));
    // The first call fails on its first event: a failure for the breaker, which opens.
    let (status, _, _) = call(gateway.clone(), &chat("claude-sonnet-4-5")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    // The next one is answered by the fallback model's clean stream.
    let (status, headers, body) = call(gateway, &chat("claude-sonnet-4-5")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-llm-layers-fallback"], "claude-haiku-4-5");
    assert_eq!(String::from_utf8_lossy(&body), clean);
    assert_eq!(up.hits(), 2);
}

// ---- Timeouts after the head, through sockets: one terminal event per dialect ----

/// The events of an SSE body (blocks between blank lines).
fn events(body: &str) -> Vec<&str> {
    body.split("\n\n").filter(|e| !e.is_empty()).collect()
}

#[tokio::test]
async fn an_idle_openai_stream_ends_with_one_terminal_error_event_and_done() {
    let sent = fixture("openai_chat.sse");
    let first_two: String = events(&sent)[..2]
        .iter()
        .map(|e| format!("{e}\n\n"))
        .collect();
    let up = stub(vec![vec![send(&first_two), Step::Hang]], None).await;
    let options = held().stream_idle_timeout(Some(Duration::from_millis(200)));
    let gateway = NormalizeErrorsLayer::with_options(options).layer(proxy_to(up.addr));
    let (status, _, body) = call(gateway, &chat("gpt-4o-mini")).await;
    let text = String::from_utf8_lossy(&body);
    println!("{text}");
    assert_eq!(status, StatusCode::OK);
    assert!(text.starts_with(&first_two), "{text}");
    let rest = events(&text[first_two.len()..]);
    assert_eq!(rest.len(), 2, "{text}");
    let err: serde_json::Value = json(rest[0].strip_prefix("data: ").unwrap().as_bytes());
    assert_eq!(err["error"]["code"], "timeout");
    assert_eq!(err["error"]["type"], "server_error");
    assert_eq!(rest[1], "data: [DONE]");
}

#[tokio::test]
async fn an_idle_anthropic_stream_ends_with_one_error_event() {
    let sent = fixture("anthropic_messages.sse");
    let first_two: String = events(&sent)[..2]
        .iter()
        .map(|e| format!("{e}\n\n"))
        .collect();
    // Cut mid-line: the held start of the line goes out, and the event starts on its own.
    let up = stub(
        vec![vec![send(&first_two), send("event: con"), Step::Hang]],
        None,
    )
    .await;
    let options = held().stream_idle_timeout(Some(Duration::from_millis(200)));
    let gateway = NormalizeErrorsLayer::with_options(options).layer(proxy_to(up.addr));
    let (status, _, body) = call(gateway, &chat("claude-sonnet-4-5")).await;
    let text = String::from_utf8_lossy(&body);
    println!("{text}");
    assert_eq!(status, StatusCode::OK);
    assert!(
        text.starts_with(&format!("{first_two}event: con\n\n")),
        "{text}"
    );
    let rest = events(&text[first_two.len()..]);
    assert_eq!(rest.len(), 2, "{text}");
    let (name, data) = rest[1].split_once('\n').unwrap();
    assert_eq!(name, "event: error");
    let err = json(data.strip_prefix("data: ").unwrap().as_bytes());
    assert_eq!(err["type"], "error");
    assert_eq!(err["error"]["type"], "timeout_error");
}

// ---- Exact timing, in-process under a paused clock ----

type Tx = mpsc::UnboundedSender<Result<Frame<Bytes>, Infallible>>;

type ChanBody = StreamBody<
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send>>,
>;

type ChanUpstream =
    tower::util::BoxCloneService<Request<Full<Bytes>>, Response<ChanBody>, Infallible>;

/// An in-process upstream answering `200 text/event-stream` with a body fed by the returned
/// sender.
fn channel_upstream() -> (ChanUpstream, Arc<Mutex<Option<Tx>>>) {
    let tx_slot: Arc<Mutex<Option<Tx>>> = Arc::new(Mutex::new(None));
    let slot = tx_slot.clone();
    let svc = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let (tx, rx) = mpsc::unbounded_channel();
        *slot.lock().unwrap() = Some(tx);
        let frames = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
        let body: ChanBody = StreamBody::new(Box::pin(frames));
        async move {
            Ok::<_, Infallible>(
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(body)
                    .unwrap(),
            )
        }
    });
    (tower::util::BoxCloneService::new(svc), tx_slot)
}

fn push(tx: &Arc<Mutex<Option<Tx>>>, s: &str) {
    let guard = tx.lock().unwrap();
    let _ = guard
        .as_ref()
        .unwrap()
        .send(Ok(Frame::data(Bytes::from(s.to_owned()))));
}

const EVENT: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n";

#[tokio::test(start_paused = true)]
async fn a_held_stream_silent_past_its_first_event_limit_is_a_504_at_the_limit() {
    let (up, _tx) = channel_upstream();
    let options = held().first_event_timeout(Some(Duration::from_millis(1500)));
    let svc = NormalizeErrorsLayer::with_options(options).layer(up);
    let start = Instant::now();
    let res = svc.oneshot(Request::new(Full::default())).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(1500));
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(res.headers()["x-should-retry"], "true");
    assert_eq!(
        res.extensions().get::<ApiError>().unwrap().code(),
        ErrorCode::Timeout
    );
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(json(&body)["error"]["code"], "timeout");
}

#[tokio::test(start_paused = true)]
async fn a_held_stream_past_its_total_limit_is_a_504() {
    let (up, tx) = channel_upstream();
    let options = held()
        .first_event_timeout(Some(Duration::from_secs(10)))
        .stream_total_timeout(Some(Duration::from_secs(2)));
    let svc = NormalizeErrorsLayer::with_options(options).layer(up);
    let start = Instant::now();
    let fut = tokio::spawn(svc.oneshot(Request::new(Full::default())));
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Comments are no event: the head stays held.
    push(&tx, ": ping\n\n");
    let res = fut.await.unwrap().unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    let err = res.extensions().get::<ApiError>().unwrap();
    assert_eq!(
        err.message(),
        "The upstream stream ran past its total time limit."
    );
}

#[tokio::test(start_paused = true)]
async fn the_head_goes_on_with_the_first_event_at_once() {
    let (up, tx) = channel_upstream();
    let options = held().first_event_timeout(Some(Duration::from_secs(5)));
    let svc = NormalizeErrorsLayer::with_options(options).layer(up);
    let start = Instant::now();
    let fut = tokio::spawn(svc.oneshot(Request::new(Full::default())));
    tokio::time::sleep(Duration::from_millis(700)).await;
    // The first event split over two chunks.
    push(&tx, &EVENT[..10]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    push(&tx, &EVENT[10..]);
    let res = fut.await.unwrap().unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(800));
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, EVENT);
    // The time to the first event is over: a long gap later is no timeout.
    tokio::time::sleep(Duration::from_secs(60)).await;
    push(&tx, "data: [DONE]\n\n");
    drop(tx.lock().unwrap().take());
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "data: [DONE]\n\n");
}

#[tokio::test(start_paused = true)]
async fn without_the_hold_the_first_event_limit_ends_the_stream_in_band() {
    let (up, _tx) = channel_upstream();
    let options = NormalizeOptions::new().first_event_timeout(Some(Duration::from_secs(3)));
    let svc = NormalizeErrorsLayer::with_options(options).layer(up);
    let start = Instant::now();
    let res = svc.oneshot(Request::new(Full::default())).await.unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(res.status(), StatusCode::OK);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    let text = String::from_utf8_lossy(&body);
    let rest = events(&text);
    assert_eq!(rest.len(), 2, "{text}");
    assert!(rest[0].contains("\"code\":\"timeout\""), "{text}");
    assert_eq!(rest[1], "data: [DONE]");
}

#[tokio::test(start_paused = true)]
async fn the_idle_limit_counts_from_the_last_chunk_exactly() {
    let (up, tx) = channel_upstream();
    let options = held().stream_idle_timeout(Some(Duration::from_millis(500)));
    let svc = NormalizeErrorsLayer::with_options(options).layer(up);
    let fut = tokio::spawn(svc.oneshot(Request::new(Full::default())));
    tokio::task::yield_now().await;
    push(&tx, EVENT);
    let res = fut.await.unwrap().unwrap();
    let mut body = res.into_body();
    assert_eq!(
        body.frame().await.unwrap().unwrap().into_data().unwrap(),
        EVENT
    );
    // Gaps under the limit are no timeout, however many.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(499)).await;
        push(&tx, EVENT);
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            EVENT
        );
    }
    let last = Instant::now();
    let frame = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(last.elapsed(), Duration::from_millis(500));
    let text = String::from_utf8_lossy(&frame);
    assert!(text.contains("\"code\":\"timeout\""), "{text}");
    assert!(text.contains("went silent"), "{text}");
    // A trailer names the failure for outcome recorders further out (HTTP/1 clients that did
    // not ask for trailers never see it).
    let trailers = body
        .frame()
        .await
        .unwrap()
        .unwrap()
        .into_trailers()
        .unwrap();
    assert_eq!(
        trailers[llm_layers::policy::STREAM_ERROR_TRAILER],
        "timeout"
    );
    assert!(body.frame().await.is_none());
}

// ---- In-band ends are failures for the breaker outside ----

/// The breaker outside the normalizer, over the channel upstream; one failure opens.
type Boxed = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;
type Guarded = tower::util::BoxCloneService<Request<Full<Bytes>>, Response<Boxed>, Infallible>;

fn breaker_over_normalizer(
    options: NormalizeOptions,
) -> (
    Guarded,
    llm_layers::breaker::BreakerHandle,
    Arc<Mutex<Option<Tx>>>,
) {
    use llm_layers::body::LayerBody;
    let (up, tx) = channel_upstream();
    let breaker = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .build()
        .unwrap();
    let handle = breaker.handle();
    let svc = ServiceBuilder::new()
        .layer(breaker)
        .map_request(|r: Request<LayerBody<Full<Bytes>>>| {
            r.map(|b| match b {
                LayerBody::Inner { body } => body,
                LayerBody::Full { data } => Full::new(data.unwrap_or_default()),
            })
        })
        .layer(NormalizeErrorsLayer::with_options(options))
        .service(up)
        .map_response(|r: Response<_>| r.map(BodyExt::boxed_unsync));
    (tower::util::BoxCloneService::new(svc), handle, tx)
}

#[tokio::test(start_paused = true)]
async fn a_stream_timed_out_after_its_head_is_a_failure_for_the_breaker() {
    use llm_layers::breaker::{CircuitState, SINGLE_KEY};
    let options = NormalizeOptions::new().stream_idle_timeout(Some(Duration::from_millis(500)));
    let (svc, handle, tx) = breaker_over_normalizer(options);
    let fut = tokio::spawn(svc.clone().oneshot(Request::new(Full::default())));
    tokio::task::yield_now().await;
    push(&tx, EVENT);
    let res = fut.await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("\"code\":\"timeout\""));
    assert_eq!(handle.state(SINGLE_KEY), Some(CircuitState::Open));
}

#[tokio::test(start_paused = true)]
async fn a_stream_with_an_error_event_mid_way_is_a_failure_and_a_clean_one_is_not() {
    use llm_layers::breaker::{CircuitState, SINGLE_KEY};
    // A clean stream: a success, the circuit stays closed.
    let (svc, handle, tx) = breaker_over_normalizer(NormalizeOptions::new());
    let fut = tokio::spawn(svc.clone().oneshot(Request::new(Full::default())));
    tokio::task::yield_now().await;
    push(&tx, EVENT);
    push(&tx, "data: [DONE]\n\n");
    tx.lock().unwrap().take();
    let res = fut.await.unwrap().unwrap();
    res.into_body().collect().await.unwrap();
    assert_eq!(handle.state(SINGLE_KEY), Some(CircuitState::Closed));
    // An error event after the first: the stream ended in failure.
    let fut = tokio::spawn(svc.oneshot(Request::new(Full::default())));
    tokio::task::yield_now().await;
    push(&tx, EVENT);
    push(
        &tx,
        "data: {\"error\":{\"message\":\"The server had an error\",\"type\":\"server_error\",\"code\":null}}\n\n",
    );
    tx.lock().unwrap().take();
    let res = fut.await.unwrap().unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("\"error\""));
    assert_eq!(handle.state(SINGLE_KEY), Some(CircuitState::Open));
}

#[tokio::test(start_paused = true)]
async fn the_total_limit_ends_a_stream_that_keeps_talking() {
    let (up, tx) = channel_upstream();
    let options = held()
        .stream_idle_timeout(Some(Duration::from_secs(1)))
        .stream_total_timeout(Some(Duration::from_secs(2)));
    let svc = NormalizeErrorsLayer::with_options(options).layer(up);
    let start = Instant::now();
    let fut = tokio::spawn(svc.oneshot(Request::new(Full::default())));
    tokio::task::yield_now().await;
    push(
        &tx,
        "event: message_start\ndata: {\"type\":\"message_start\"}\n\n",
    );
    let res = fut.await.unwrap().unwrap();
    let feeder = {
        let tx = tx.clone();
        tokio::spawn(async move {
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(300)).await;
                push(&tx, "event: ping\ndata: {\"type\":\"ping\"}\n\n");
            }
        })
    };
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    let text = String::from_utf8_lossy(&body);
    let all = events(&text);
    // message_start, six pings (at 0.3 s .. 1.8 s), the terminal event.
    assert_eq!(all.len(), 8, "{text}");
    assert!(all[7].starts_with("event: error\ndata: {"), "{text}");
    assert!(all[7].contains("\"timeout_error\""), "{text}");
    assert!(all[7].contains("total time limit"), "{text}");
    feeder.abort();
}

#[tokio::test(start_paused = true)]
async fn answers_that_are_not_event_streams_are_never_held() {
    let (tx, rx) = mpsc::unbounded_channel::<Result<Frame<Bytes>, Infallible>>();
    let frames = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    let body: ChanBody = StreamBody::new(Box::pin(frames));
    let slot = Arc::new(Mutex::new(Some(body)));
    let up = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let body = slot.lock().unwrap().take().unwrap();
        async move {
            Ok::<_, Infallible>(
                Response::builder()
                    .header("content-type", "application/json")
                    .body(body)
                    .unwrap(),
            )
        }
    });
    let options = held()
        .first_event_timeout(Some(Duration::from_secs(1)))
        .stream_idle_timeout(Some(Duration::from_secs(1)));
    let svc = NormalizeErrorsLayer::with_options(options).layer(up);
    let start = Instant::now();
    let res = svc.oneshot(Request::new(Full::default())).await.unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(res.status(), StatusCode::OK);
    // Nor timed: a JSON body silent for a minute is no stream timeout.
    let feeder = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(60)).await;
        let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"{\"id\":\"x\"}"))));
    });
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "{\"id\":\"x\"}");
    assert_eq!(start.elapsed(), Duration::from_secs(60));
    feeder.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_anthropic_stream_behind_keep_alive_comments_ends_in_its_own_dialect() {
    let (up, tx) = channel_upstream();
    let options = NormalizeOptions::new().stream_idle_timeout(Some(Duration::from_secs(1)));
    let svc = NormalizeErrorsLayer::with_options(options).layer(up);
    let fut = tokio::spawn(svc.oneshot(Request::new(Full::default())));
    tokio::task::yield_now().await;
    push(&tx, ": keep-alive\n\n");
    let res = fut.await.unwrap().unwrap();
    let mut body = res.into_body();
    assert_eq!(
        body.frame().await.unwrap().unwrap().into_data().unwrap(),
        ": keep-alive\n\n"
    );
    push(
        &tx,
        "event: message_start\ndata: {\"type\":\"message_start\"}\n\n",
    );
    body.frame().await.unwrap().unwrap();
    let last = body.frame().await.unwrap().unwrap().into_data().unwrap();
    let text = String::from_utf8_lossy(&last);
    assert!(
        text.starts_with("event: error\ndata: {\"type\":\"error\""),
        "{text}"
    );
    let trailers = body
        .frame()
        .await
        .unwrap()
        .unwrap()
        .into_trailers()
        .unwrap();
    assert_eq!(
        trailers[llm_layers::policy::STREAM_ERROR_TRAILER],
        "timeout"
    );
    assert!(body.frame().await.is_none());
}
