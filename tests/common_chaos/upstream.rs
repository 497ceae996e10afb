//! The fault-injecting upstream: an in-process tower service that answers like an LLM API on a
//! bad day, chosen per call by a seeded RNG and by the model's health.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use llm_layers::request::RequestView;
use serde_json::Value;
use tokio::sync::Semaphore;

/// The error type of the upstream (what a transport error looks like to the stack).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request header that makes the upstream hold the call until [`Faults::release_held`];
/// only the end-of-run concurrency check sends it.
pub const HOLD: &str = "x-chaos-hold";

/// The longest a successful answer's body takes (a long generation), in virtual time.
pub const MAX_GENERATION: Duration = Duration::from_secs(20);

/// How the upstream behaves overall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Each model fails at its own rate, in every way an upstream fails.
    Mixed,
    /// Every call fails (5xx, 529, HTML 502, resets).
    Down,
}

/// One answer, as the upstream will play it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    Ok,
    OkSse,
    LongGeneration,
    AbsurdUsage,
    AbsurdUsageSse,
    RetryAfter,
    RetryAfterMs,
    BodyHint,
    DailyLimit,
    Internal,
    EmptyError,
    Overloaded503,
    Overloaded529,
    HtmlBadGateway,
    HtmlBlocked,
    BadRequest,
    EmptyOk,
    StallHead,
    HangHead,
    StallErrorBody,
    Reset,
    CutJson,
    CutSse,
    InBandError,
    InBandAnthropicError,
    Head,
    Models,
    Held,
}

/// A step of a scripted body.
enum Step {
    Data(Bytes),
    Sleep(Duration),
    Hang,
    Fail,
}

/// The upstream service. Clones share the RNG, the held calls and the tally.
#[derive(Clone)]
pub struct Faults {
    rng: Arc<Mutex<fastrand::Rng>>,
    health: Health,
    /// In-process under virtual time: stalls, hangs and paced streams, and 2xx JSON bodies cut
    /// midway (through a real server such an answer reaches the client as a connection closed
    /// before any response, hyper not having flushed the head: nothing the stack can change).
    timed: bool,
    held: Arc<Semaphore>,
    tally: Arc<Mutex<std::collections::BTreeMap<Fault, u64>>>,
}

impl Faults {
    /// An upstream seeded with `seed`.
    pub fn new(seed: u64, health: Health, timed: bool) -> Faults {
        Faults {
            rng: Arc::new(Mutex::new(fastrand::Rng::with_seed(seed))),
            health,
            timed,
            held: Arc::new(Semaphore::new(0)),
            tally: Arc::new(Mutex::new(Default::default())),
        }
    }

    /// Lets `n` held calls answer.
    pub fn release_held(&self, n: usize) {
        self.held.add_permits(n);
    }

    /// How many answers of each kind were played.
    pub fn tally(&self) -> std::collections::BTreeMap<Fault, u64> {
        self.tally.lock().unwrap().clone()
    }

    fn pick(&self, model: &str, stream: bool) -> Fault {
        let mut rng = self.rng.lock().unwrap();
        let fail_rate = match (self.health, model) {
            (Health::Down, _) => 1.0,
            (_, "gpt-4o") => 0.15,
            (_, "gpt-4o-mini") => 0.05,
            (_, "claude-sonnet") => 0.3,
            (_, "flaky-7b") => 0.6,
            (_, "dead-model") => 1.0,
            (_, "stall-body") if self.timed => return Fault::StallErrorBody,
            (_, "stall-body") => return Fault::Overloaded503,
            _ => 0.1,
        };
        if self.health == Health::Down || model == "dead-model" {
            // Failures the breaker counts, at once.
            return [
                Fault::Internal,
                Fault::EmptyError,
                Fault::Overloaded503,
                Fault::Overloaded529,
                Fault::HtmlBadGateway,
                Fault::Reset,
            ][rng.usize(..6)];
        }
        if rng.f64() >= fail_rate {
            return match (stream, rng.u32(..100)) {
                (true, 0..=1) if self.timed => Fault::LongGeneration,
                (true, 2) => Fault::AbsurdUsageSse,
                (true, _) => Fault::OkSse,
                (false, 0) => Fault::AbsurdUsage,
                (false, _) => Fault::Ok,
            };
        }
        let mut kinds = vec![
            Fault::RetryAfter,
            Fault::RetryAfterMs,
            Fault::BodyHint,
            Fault::DailyLimit,
            Fault::Internal,
            Fault::EmptyError,
            Fault::Overloaded503,
            Fault::Overloaded529,
            Fault::HtmlBadGateway,
            Fault::HtmlBlocked,
            Fault::BadRequest,
            Fault::EmptyOk,
            Fault::Reset,
        ];
        if self.timed {
            kinds.extend([
                Fault::CutJson,
                Fault::StallHead,
                Fault::HangHead,
                Fault::StallErrorBody,
            ]);
        }
        if stream {
            kinds.extend([
                Fault::CutSse,
                Fault::InBandError,
                Fault::InBandAnthropicError,
            ]);
        }
        kinds[rng.usize(..kinds.len())]
    }

    async fn answer(self, req: Request<Body>) -> Result<Response<Body>, BoxError> {
        let (parts, body) = req.into_parts();
        if parts.headers.contains_key(HOLD) {
            self.count(Fault::Held);
            self.held.acquire().await.expect("never closed").forget();
            return Ok(json(200, &completion("hold-model", 3)));
        }
        if parts.uri.path() == "/v1/models" {
            if parts.method == Method::HEAD {
                // What a real upstream answers to HEAD: the GET head, no body.
                self.count(Fault::Head);
                return Ok(Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .header("content-length", "1024")
                    .body(Body::empty())
                    .unwrap());
            }
            self.count(Fault::Models);
            return Ok(json(
                200,
                r#"{"object":"list","data":[{"id":"gpt-4o","object":"model"},{"id":"gpt-4o-mini","object":"model"}]}"#,
            ));
        }
        // The model and stream flag: from the parsed view when a layer left one, else from the
        // body (a fallback call rewrote the body's model and dropped the view).
        let (model, stream) = match RequestView::from_extensions(&parts.extensions) {
            Some(view) => (
                view.model()
                    .unwrap_or("")
                    .chars()
                    .take(64)
                    .collect::<String>(),
                view.stream(),
            ),
            None => {
                let bytes = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                (
                    v["model"].as_str().unwrap_or("").chars().take(64).collect(),
                    v["stream"].as_bool().unwrap_or(false),
                )
            }
        };
        let fault = self.pick(&model, stream);
        self.count(fault);
        let jitter = || self.rng.lock().unwrap().u64(0..1000);
        let out = match fault {
            Fault::Ok => json(200, &completion(&model, 7)),
            Fault::AbsurdUsage => json(200, &completion(&model, u64::MAX)),
            Fault::OkSse => sse(200, self.stream_steps(&model, 3 + (jitter() % 20) as usize, 1)),
            Fault::AbsurdUsageSse => {
                let mut steps = self.stream_steps(&model, 3, 1);
                steps.pop();
                steps.push(Step::Data(Bytes::from(format!(
                    "data: {{\"id\":\"chatcmpl-chaos\",\"object\":\"chat.completion.chunk\",\"model\":{},\"choices\":[],\"usage\":{{\"prompt_tokens\":{max},\"completion_tokens\":{max},\"total_tokens\":{max}}}}}\n\ndata: [DONE]\n\n",
                    Value::from(model.as_str()),
                    max = u64::MAX
                ))));
                sse(200, steps)
            }
            Fault::LongGeneration => sse(200, self.stream_steps(&model, 200, 100)),
            Fault::RetryAfter => with_headers(
                json(429, OPENAI_429),
                &[
                    ("retry-after", &(1 + jitter() % 5).to_string()),
                    ("x-ratelimit-remaining-requests", "0"),
                    ("x-ratelimit-limit-requests", "500"),
                ],
            ),
            Fault::RetryAfterMs => with_headers(
                json(429, OPENAI_429),
                &[("retry-after-ms", &(200 + jitter() * 3).to_string())],
            ),
            Fault::BodyHint => json(
                429,
                r#"{"error":{"message":"Rate limit reached for gpt-4o in organization org-chaos on tokens per min (TPM): Limit 30000, Used 30000, Requested 900. Please try again in 1.8s. Visit https://platform.openai.com/account/rate-limits to learn more.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#,
            ),
            Fault::DailyLimit => with_headers(
                json(429, OPENAI_429),
                &[("retry-after", if jitter() % 2 == 0 { "90" } else { "86400" })],
            ),
            Fault::Internal => json(
                500,
                r#"{"error":{"message":"The server had an error while processing your request. Sorry about that!","type":"server_error","param":null,"code":null}}"#,
            ),
            Fault::EmptyError => plain(500, "text/plain", ""),
            Fault::Overloaded503 => json(
                503,
                r#"{"error":{"message":"The engine is currently overloaded, please try again later","type":"server_error","param":null,"code":null}}"#,
            ),
            Fault::Overloaded529 => json(
                529,
                r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            ),
            Fault::HtmlBadGateway => plain(
                502,
                "text/html",
                "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>",
            ),
            Fault::HtmlBlocked => plain(
                403,
                "text/html; charset=UTF-8",
                "<!DOCTYPE html><html><head><title>Attention Required! | Cloudflare</title></head><body>Sorry, you have been blocked</body></html>",
            ),
            Fault::BadRequest => json(
                400,
                r#"{"error":{"message":"Invalid 'messages[0].role': expected one of system, user, assistant.","type":"invalid_request_error","param":"messages[0].role","code":"invalid_value"}}"#,
            ),
            Fault::EmptyOk => plain(200, "application/json", ""),
            Fault::StallHead => {
                tokio::time::sleep(Duration::from_millis(1000 + jitter() * 8)).await;
                json(200, &completion(&model, 7))
            }
            Fault::HangHead => std::future::pending().await,
            Fault::StallErrorBody => scripted(
                503,
                "application/json",
                vec![
                    Step::Data(Bytes::from_static(b"{\"error\":{\"message\":\"The engine is cur")),
                    if jitter() % 2 == 0 {
                        Step::Hang
                    } else {
                        Step::Sleep(Duration::from_secs(120))
                    },
                    Step::Data(Bytes::from_static(b"rently overloaded\",\"type\":\"server_error\",\"param\":null,\"code\":null}}")),
                ],
            ),
            Fault::Reset => {
                return Err(Box::new(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "connection reset by peer",
                )))
            }
            Fault::CutJson => {
                let whole = completion(&model, 7);
                let half = Bytes::copy_from_slice(&whole.as_bytes()[..whole.len() / 2]);
                scripted(200, "application/json", vec![Step::Data(half), Step::Fail])
            }
            Fault::CutSse => {
                let mut steps = self.stream_steps(&model, 6, 1);
                steps.truncate(6);
                steps.push(Step::Fail);
                sse(200, steps)
            }
            Fault::InBandError => {
                let mut steps = self.stream_steps(&model, 4, 1);
                steps.truncate(4);
                steps.push(Step::Data(Bytes::from_static(
                    b"data: {\"error\":{\"message\":\"The server had an error while processing your request.\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\n",
                )));
                sse(200, steps)
            }
            Fault::InBandAnthropicError => sse(
                200,
                vec![
                    Step::Data(Bytes::from_static(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[]}}\n\n")),
                    Step::Data(Bytes::from_static(b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n")),
                ],
            ),
            Fault::Head | Fault::Models | Fault::Held => unreachable!("answered above"),
        };
        Ok(out)
    }

    fn count(&self, fault: Fault) {
        *self.tally.lock().unwrap().entry(fault).or_default() += 1;
    }

    /// A chat completion stream of `n` content chunks, `gap_ms` apart (virtual time), with a
    /// usage chunk and `[DONE]`.
    fn stream_steps(&self, model: &str, n: usize, gap_ms: u64) -> Vec<Step> {
        let mut steps = Vec::with_capacity(2 * n + 2);
        for i in 0..n {
            if self.timed {
                steps.push(Step::Sleep(Duration::from_millis(gap_ms)));
            }
            steps.push(Step::Data(Bytes::from(format!(
                "data: {{\"id\":\"chatcmpl-chaos\",\"object\":\"chat.completion.chunk\",\"model\":{},\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t{i} \"}},\"finish_reason\":null}}]}}\n\n",
                Value::from(model)
            ))));
        }
        steps.push(Step::Data(Bytes::from(format!(
            "data: {{\"id\":\"chatcmpl-chaos\",\"object\":\"chat.completion.chunk\",\"model\":{},\"choices\":[],\"usage\":{{\"prompt_tokens\":9,\"completion_tokens\":{n},\"total_tokens\":{}}}}}\n\ndata: [DONE]\n\n",
            Value::from(model),
            9 + n
        ))));
        steps
    }
}

impl tower::Service<Request<Body>> for Faults {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        Box::pin(self.clone().answer(req))
    }
}

const OPENAI_429: &str = r#"{"error":{"message":"Rate limit reached for requests","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;

/// A chat completion with the given completion-token count in its `usage`.
pub fn completion(model: &str, completion_tokens: u64) -> String {
    serde_json::json!({
        "id": "chatcmpl-chaos", "object": "chat.completion", "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": completion_tokens, "total_tokens": completion_tokens.saturating_add(9)},
    })
    .to_string()
}

fn plain(status: u16, content_type: &str, body: &'static str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Body::from(body))
        .unwrap()
}

fn json(status: u16, body: &str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-request-id", "req_chaos")
        .body(Body::from(body.to_owned()))
        .unwrap()
}

fn with_headers(mut res: Response<Body>, headers: &[(&'static str, &str)]) -> Response<Body> {
    for (k, v) in headers {
        res.headers_mut().insert(*k, v.parse().unwrap());
    }
    res
}

fn sse(status: u16, steps: Vec<Step>) -> Response<Body> {
    scripted(status, "text/event-stream", steps)
}

/// A response whose body plays `steps` in order.
fn scripted(status: u16, content_type: &str, steps: Vec<Step>) -> Response<Body> {
    let steps = std::collections::VecDeque::from(steps);
    let stream = futures_util::stream::unfold(steps, |mut steps| async move {
        loop {
            match steps.pop_front()? {
                Step::Data(b) => return Some((Ok::<_, BoxError>(b), steps)),
                Step::Sleep(d) => tokio::time::sleep(d).await,
                Step::Hang => std::future::pending::<()>().await,
                Step::Fail => {
                    let e: BoxError = Box::new(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "connection reset by peer",
                    ));
                    steps.clear();
                    return Some((Err(e), steps));
                }
            }
        }
    });
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Body::from_stream(stream))
        .unwrap()
}
