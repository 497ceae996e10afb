//! Circuit breaking for LLM upstreams: stop sending calls to an upstream (or a model) that is
//! failing, answer at once instead, probe it now and then, and resume when it recovers.
//!
//! # Why
//!
//! When a provider is down or a model is overloaded, every call waits for its timeout and then
//! fails; retries multiply the load on an upstream that is already struggling. A breaker
//! notices the failure rate (or the slow-call rate) crossing a threshold, **opens**, and
//! rejects calls for a while without touching the upstream. After the open duration it goes
//! **half-open** and admits exactly N probe calls; if they all succeed it **closes**, if one
//! fails it opens again for longer (exponential, jittered, capped).
//!
//! # What it answers
//!
//! | situation | answer |
//! |---|---|
//! | circuit open | `503 service_unavailable` envelope, `retry-after` = the remaining open time (rounded up, never `0`), `x-should-retry: true`; the message names the breaker and key, never the upstream URL |
//! | half-open with every probe out | `503 service_unavailable`, `retry-after` = the time until the newest probe is overdue |
//! | forced open by the operator | `503 service_unavailable`, no `retry-after` |
//! | open, with a fallback chain | the first fallback that answers, marked `x-llm-layers-fallback: <name or model>`; if every step fails, `503` naming the open circuit and each fallback's failure |
//! | a chain with [targets](CircuitBreakerLayerBuilder::fallback_target), the primary answered `503`/`529`, `timeout`, or failed | the walk goes on past it (see [Fallback chains](#fallback-chains)) |
//! | keyed by model, body over [`CircuitBreakerLayerBuilder::body_limit`] | `413 request_too_large` |
//! | keyed by model, a body that is not JSON (no model to key on) | passed on unguarded, its body intact |
//! | no answer within [`CircuitBreakerLayerBuilder::call_timeout`] (when set) | `504 timeout` naming the breaker; the call counts as a failure |
//!
//! Every refusal of the breaker's own (open, probing, forced open, a fallback chain that failed
//! entirely) carries [`RefusedLocally::CIRCUIT_BREAKER`](crate::ext::RefusedLocally) in its
//! extensions beside its [`ApiError`](crate::ApiError): its `retry-after` is how long the local
//! state lasts, not an upstream's hint, so a retry layer outside answers at once instead of
//! sleeping on it. An answer from a fallback is no refusal and carries no marker.
//!
//! # What counts
//!
//! Outcomes are the crate's one failure vocabulary, [`crate::policy`]: the builder takes any
//! [`Classify`](crate::policy::Classify) policy ([`CircuitBreakerLayerBuilder::policy`],
//! [`DefaultPolicy`](crate::policy::DefaultPolicy) by default, which reads the
//! [`ApiError`](crate::ApiError) an inner layer put in the response extensions, else the
//! status). A failure counts against the circuit when its
//! [`FailureKind`](crate::policy::FailureKind) does
//! ([`counts_against_circuit`](crate::policy::FailureKind::counts_against_circuit)): `5xx`
//! (including `529`), `timeout`, `service_unavailable`, `upstream_blocked`. What the caller
//! caused (`Caller`: invalid request, bad key, content policy) and `Other` (`not_found`) are
//! ignored (a probe's slot is given back). `429` throttling counts only with
//! [`CircuitBreakerLayerBuilder::trip_on_rate_limit`]. Transport errors (`Err` from the inner
//! service's `poll_ready` or `call`, of any type) are failures, classified by
//! [`policy::classify_error_ref`](crate::policy::classify_error_ref): a
//! `tower::timeout::error::Elapsed` inside a `BoxError` is a `timeout`. A call is slow when its
//! response head (for a stream: the first byte) takes longer than the slow-call duration.
//! Classification, windows, state transitions and admission are kept apart.
//!
//! # The end of the stream
//!
//! A successful head is not yet a successful call: an upstream may send `200` and then cut
//! the stream. So the outcome of a success is recorded when its body ends: the breaker's
//! response body, [`GuardedBody`], holds the call's permit until then.
//!
//! | the body of a successful answer | counts as |
//! |---|---|
//! | ends cleanly (a body already at its end when the head arrives is recorded at once) | the policy's [`classify_eos`](crate::policy::Classify::classify_eos) of [`StreamEnd::Complete`](crate::policy::StreamEnd::Complete): a success by default |
//! | fails (the upstream cut the connection, a frame error) | `classify_eos` of [`StreamEnd::Cut`](crate::policy::StreamEnd::Cut): a transient `service_unavailable` by default, a failure |
//! | ends with the trailer [`STREAM_ERROR_TRAILER`](crate::policy::STREAM_ERROR_TRAILER) (a normalizer inside ended it in-band: a stream timeout, a cut, an error event) | `classify_eos` of [`StreamEnd::TimedOut`](crate::policy::StreamEnd::TimedOut) for `timeout`, else [`StreamEnd::Error`](crate::policy::StreamEnd::Error) with the trailer's code: a failure |
//! | is dropped by the client before its end | neither: nothing is recorded (`dropped` in the metrics); a probe's slot is given back |
//!
//! An answer that failed at its head is recorded at once. A probe holds its slot until its
//! body ends; past the probe timeout, a caller that finds every slot taken counts it failed.
//! A body that is read to its end by the client (hyper, axum, reqwest all do) records
//! itself; a test that only looks at the status and drops the body records nothing.
//!
//! # Bodies and readiness
//!
//! The breaker takes any request body `B` (`hyper::body::Incoming`, axum's `Body`, ...) and
//! any response body: its inner service receives `Request<LayerBody<B>>`
//! ([`LayerBody`](crate::body::LayerBody): the body untouched, or the bytes the breaker read),
//! and it answers `Response<LayerBody<GuardedBody<ResBody>>>` (its refusals are bytes of its
//! own). A single-circuit, upstream-keyed or custom-keyed breaker never reads the body. A
//! model-keyed one reads the model from the [`RequestView`](crate::request::RequestView) an
//! earlier layer stored, else from the path, else it buffers and parses the body once through
//! [`EnsureView`](crate::request::EnsureView), which stores the view for the layers inside.
//!
//! `poll_ready` is ready at once and never polls the inner service; each call takes a fresh
//! clone of it. The call's future first reads the model (when it must), then asks the
//! circuit, and only then drives the clone's `poll_ready` (an `Err` there is final: it is the
//! call's answer, and a failure) and calls it. So a client still uploading its body holds no
//! slot of a `ConcurrencyLimit` or `Buffer` inside the breaker, and a refused request never
//! reaches the inner service at all, not even its `poll_ready`. Errors keep the inner
//! service's type (`type Error = S::Error`, `Infallible` under axum).
//!
//! # Calls that hang, and calls dropped by their caller
//!
//! A timeout enforced outside the breaker (a retry deadline, a client that goes away) drops
//! the breaker's response future before any answer. The breaker learns from that too:
//!
//! | the call | counts as |
//! |---|---|
//! | ran past [`CircuitBreakerLayerBuilder::call_timeout`] (when set) | answered `504 timeout` by the breaker itself, a failure (`timeouts` in the metrics) |
//! | a half-open probe, past [`CircuitBreakerLayerBuilder::probe_timeout`] | a failed probe at once, by a timer in its future: the circuit opens again (`ProbeTimedOut`); the call goes on and its late answer is ignored |
//! | a half-open probe, dropped before its answer | a failed probe (`ProbeDropped`): the circuit opens again, the slot is not handed back and the probe deadline is not pushed forward, so probes to a dead upstream stay one per open period |
//! | dropped after running at least the call timeout | a failure (a timeout) |
//! | dropped after running longer than the slow-call duration | a slow call (not a failure), so the slow-call rate decides; not counted with [`CircuitBreakerLayerBuilder::consecutive_failures`] |
//! | dropped earlier, or when neither a slow-call rule nor a call timeout is set | nothing: a cancelled call says nothing of the upstream |
//!
//! Every drop is counted in `dropped`. The timers exist only for probes and, with a call
//! timeout, for every guarded call; the closed path without them reads no clock. With them,
//! the clock is read where a rule uses the reading: at admission (the call's start), at the
//! head of a success only for the slow-call rule, and at the record only for a time window or
//! for a slow-call rule with no head time; a count window with a call timeout alone reads it
//! once per call.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use axum::{body::Body, http::{Request, StatusCode}, routing::post, Router};
//! use llm_layers::breaker::{CircuitBreakerLayer, CircuitState, SINGLE_KEY};
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let breaker = CircuitBreakerLayer::builder()
//!     .name("openai")
//!     .count_window(20)
//!     .minimum_calls(4)
//!     .failure_rate(50.0)
//!     .open_duration(Duration::from_secs(30))
//!     .build()
//!     .unwrap();
//! let handle = breaker.handle();
//!
//! // An upstream that is down.
//! let app = Router::new()
//!     .route("/v1/chat/completions", post(|| async { StatusCode::BAD_GATEWAY }))
//!     .layer(breaker);
//!
//! let call = || Request::post("/v1/chat/completions").body(Body::from("{}")).unwrap();
//! for _ in 0..4 {
//!     let res = app.clone().oneshot(call()).await.unwrap();
//!     assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
//! }
//! assert_eq!(handle.state(SINGLE_KEY), Some(CircuitState::Open));
//!
//! // Open: answered at once, the upstream is not called.
//! let res = app.clone().oneshot(call()).await.unwrap();
//! assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
//! let wait: u64 = res.headers()["retry-after"].to_str().unwrap().parse().unwrap();
//! assert!((1..=33).contains(&wait)); // 30 s ± 10 % jitter, rounded up
//! assert_eq!(handle.metrics(SINGLE_KEY).unwrap().rejections, 1);
//! # }
//! ```
//!
//! Keys ([`CircuitKey`]): one circuit for everything, per upstream, per model, per upstream and
//! model, or your own ([`CircuitKey::custom`]: a [`KeyFn`](crate::request::KeyFn) over the
//! [`RequestHead`](crate::request::RequestHead), the same type the rate limiter keys on). The model is the one the upstream serves,
//! [`RequestView::routed_model`](crate::request::RequestView::routed_model): an Azure-style
//! deployment in the path (`/openai/deployments/{name}/...`) wins over the body's `model`. It is
//! read from the [`RequestView`](crate::request::RequestView) an earlier layer left, else from
//! the path, else by parsing the body. Client-chosen strings (keys, model names) reach
//! `tracing` fields escaped (`Debug`), so they cannot forge log lines.
//!
//! Fallbacks ([`CircuitBreakerLayerBuilder::fallback_model`], [`CircuitBreakerLayerBuilder::fallback_service`],
//! [`CircuitBreakerLayerBuilder::fallback_response`]) degrade instead of rejecting. A
//! fallback service is typed at compile time (`CircuitBreakerLayer<ServiceFallback<S>>`): it
//! must take the guarded service's requests and answer its responses and errors, or the
//! breaker does not compile as a service. The fallback chain runs in the same future, step by
//! step, each service driven ready before it is called; the body is read once (through the
//! core's [`BufferRequest`](crate::body::BufferRequest)) only when a step replays or
//! rewrites it. A [`BreakerHandle`] reads
//! state and counters per key and forces [`CircuitMode`]s at runtime; [`CircuitBreakerLayerBuilder::on_event`] and
//! `tracing` report transitions, rejections and fallbacks.
//!
//! # Fallback chains
//!
//! [`CircuitBreakerLayerBuilder::fallback_target`] adds [`Target`]s: models on the guarded
//! upstream ([`Target::model`]) and other upstreams ([`Target::upstream`], services of one
//! type `S`, so a mismatch does not compile; [`Target::named_upstream`] names one to bind
//! later with [`CircuitBreakerLayer::bind_upstreams`], as the TOML stack does). A chain with
//! targets is walked, in the call's own future:
//!
//! 1. The primary first, unless its circuit refuses the call (open, probing, forced open).
//! 2. Then each step in order, each at most once: a target whose own circuit is open is
//!    skipped without a call; one that answers `service_unavailable` (`502`, `503`, `529`),
//!    `timeout`, or fails with a transport error is moved past; `context_length_exceeded`
//!    goes on only to targets marked [`Target::larger_context`], `content_policy_violation`
//!    only to targets marked [`Target::on_content_policy`], and that constraint stays for the
//!    rest of the walk. The primary's answer is read the same way: a fallback-worthy answer
//!    starts the walk when a step may take it, any other answer is the caller's.
//! 3. Every target has its own circuit in this layer, keyed by its name (a model on the
//!    guarded upstream with [`CircuitKey::UpstreamAndModel`]: `upstream/model`, that model's
//!    own circuit), with the layer's windows, open duration and backoff; every answer is
//!    recorded on it (a success when its body ends), through the layer's
//!    [`Classify`](crate::policy::Classify) policy, whose code also decides what is
//!    fallback-worthy: put the normalizer inside the breaker (as the example gateway does) so
//!    that a `400` is known as `context_length_exceeded`.
//! 4. The walk stops at the retry layer's deadline when the request carries one
//!    ([`Deadline`](crate::ext::Deadline), which [`RetryLayer`](crate::retry::RetryLayer)
//!    inserts), else after [`CircuitBreakerLayerBuilder::call_timeout`] from the moment it
//!    leaves the primary; each target's call is bounded by the call timeout as well. Past the
//!    deadline the answer is `504 timeout`, naming what was tried.
//!
//! | the walk ends with | answer |
//! |---|---|
//! | a target that served the call | its answer, `x-llm-layers-fallback: <target name>` |
//! | a target's error that no later step could take (a `400 invalid_value`, the last larger-context model refusing the length too) | that error, marked; its envelope (when an inner layer left its [`ApiError`](crate::ApiError)) ends "(answered by fallback target 'name')" |
//! | every step failed or was skipped | `503 service_unavailable` naming the primary's state or answer and each step's outcome (names only: no URLs, no keys) |
//!
//! The body is read once (through [`BufferRequest`](crate::body::BufferRequest), at most
//! [`CircuitBreakerLayerBuilder::body_limit`] bytes) before the primary is called, and replayed
//! or rewritten per target. A body announced over the limit goes to the primary unread, and
//! the walk does not go past the primary's answer (only past its open circuit, where the
//! chain answers `413`); a chunked body that grows past the limit is answered `413`. A
//! [`BreakerEvent::Fallback`] is emitted for every step tried or skipped, with the
//! [`FallbackReason`] it was tried for and its [`FallbackOutcome`]. The steps of
//! [`CircuitBreakerLayerBuilder::fallback_model`], [`CircuitBreakerLayerBuilder::fallback_service`]
//! and [`CircuitBreakerLayerBuilder::fallback_response`] are part of such a chain as unmarked
//! targets (a fixed response has no circuit and never takes a context-length or content-policy
//! request); in a layer without targets they keep their own rules: tried only while the
//! primary is refused, moved past on any failure, with no circuit of their own.
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use llm_layers::body::LayerBody;
//! use llm_layers::breaker::{CircuitBreakerLayer, Target};
//! use tower::{Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! // The guarded upstream: overloaded for gpt-4o, fine for the smaller model.
//! let upstream = tower::service_fn(|req: Request<LayerBody<Full<Bytes>>>| async move {
//!     let body = http_body_util::BodyExt::collect(req.into_body()).await.unwrap().to_bytes();
//!     let mut res = Response::new(Full::new(Bytes::new()));
//!     if !body.windows(4).any(|w| w == b"mini") {
//!         *res.status_mut() = StatusCode::from_u16(529).unwrap();
//!     }
//!     Ok::<_, Infallible>(res)
//! });
//! let layer = CircuitBreakerLayer::builder()
//!     .fallback_target(Target::model("gpt-4o-mini"))
//!     .build()
//!     .unwrap();
//! let body = Full::new(Bytes::from(r#"{"model":"gpt-4o","messages":[]}"#));
//! let res = layer.layer(upstream).oneshot(Request::new(body)).await.unwrap();
//! assert_eq!(res.status(), StatusCode::OK);
//! assert_eq!(res.headers()["x-llm-layers-fallback"], "gpt-4o-mini");
//! # }
//! ```
//!
//! # Keyed state a client controls
//!
//! - **Upstream keys** come from [`CircuitBreakerLayerBuilder::upstream`] when set (do set it on a server: there
//!   a request's URI authority is the client's choice), else from the request URI's authority
//!   (what a client-side breaker sends to), else `"<unknown>"`. The `Host` header is never
//!   read, so a changed `Host` cannot step around an open circuit.
//! - **Long keys** are bounded ([`CircuitBreakerLayerBuilder::max_key_len`], 256 bytes by default): a longer key
//!   is stored as its prefix and a SHA-256 digest, so memory stays within `max_keys × max_key_len`
//!   while distinct keys keep distinct circuits. The request itself passes unchanged.
//! - **Eviction** at [`CircuitBreakerLayerBuilder::max_keys`] looks at no more than 16 circuits per new key (a
//!   clock with a second chance), and forgets only a closed, automatic, idle circuit with no
//!   failure in its window. Open, half-open and failing circuits are kept, so a flood of new
//!   keys cannot reset a circuit on its way to opening; when nothing looked at can go, the new
//!   key shares the `"<overflow>"` circuit.

mod body;
mod circuit;
mod config;
mod events;
mod fallback;
mod future;
mod health;
mod layer;
mod registry;
mod service;
mod window;

pub use body::GuardedBody;
pub use config::{CircuitBreakerLayerBuilder, CircuitKey, CircuitMode, ConfigError};
pub use events::{
    BreakerEvent, CircuitState, FallbackOutcome, FallbackReason, ProbeResult, TransitionReason,
};
pub use fallback::{
    AddTarget, Fallback, NamedUpstream, NoFallback, NoService, OtherUpstream, SameUpstream,
    ServiceFallback, Target,
};
pub use future::ResponseFuture;
pub use health::{HealthCheck, HealthCheckBuilder, HealthCheckTask};
pub use layer::CircuitBreakerLayer;
pub use registry::{BreakerHandle, BreakerSnapshot, CircuitMetrics, OVERFLOW_KEY, SINGLE_KEY};
pub use service::CircuitBreaker;

/// `x-llm-layers-fallback`: on a response from a fallback, which one answered (the backup
/// model for a model fallback, else the fallback's name).
pub const X_LLM_LAYERS_FALLBACK: http::HeaderName =
    http::HeaderName::from_static("x-llm-layers-fallback");
