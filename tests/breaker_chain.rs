//! Fallback chains of the breaker: ordered targets, each with its own circuit, walked past
//! open circuits and past fallback-worthy answers. Real sockets where the behaviour crosses
//! HTTP (the primary and the other upstreams are axum servers answering by script, the
//! requests go through reqwest); paused time over in-process services for the deadline.

mod common_breaker;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::response::IntoResponse;
use bytes::Bytes;
use common_breaker::{chat, Answer, Upstream};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use llm_layers::body::{BoxError, LayerBody};
use llm_layers::breaker::{
    BreakerEvent, CircuitBreakerLayer, CircuitMode, CircuitState, ServiceFallback, Target,
    SINGLE_KEY,
};
use llm_layers::normalize::NormalizeErrorsLayer;
use llm_layers::retry::RetryLayer;
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceBuilder, ServiceExt};

const CONTEXT_LENGTH: &str = r#"{"error":{"message":"This model's maximum context length is 8192 tokens. However, your messages resulted in 9000 tokens.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#;
const CONTENT_POLICY: &str = r#"{"error":{"message":"Your request was rejected as a result of our safety system.","type":"invalid_request_error","param":null,"code":"content_policy_violation"}}"#;
const INVALID: &str = r#"{"error":{"message":"Invalid value for 'temperature'.","type":"invalid_request_error","param":"temperature","code":"invalid_value"}}"#;

/// A real upstream on 127.0.0.1:0: answers from a script (then its default), counts its calls
/// and records the models it was asked for.
#[derive(Clone)]
struct Scripted {
    label: &'static str,
    url: String,
    calls: Arc<AtomicUsize>,
    script: Arc<Mutex<VecDeque<(u16, &'static str)>>>,
    default: Arc<Mutex<(u16, &'static str)>>,
    models: Arc<Mutex<Vec<String>>>,
}

impl Scripted {
    async fn start(label: &'static str, status: u16) -> Scripted {
        let mut s = Scripted {
            label,
            url: String::new(),
            calls: Arc::default(),
            script: Arc::default(),
            default: Arc::new(Mutex::new((status, ""))),
            models: Arc::default(),
        };
        let me = s.clone();
        let app = axum::Router::new().route(
            "/v1/chat/completions",
            axum::routing::post(move |body: Bytes| {
                let me = me.clone();
                async move {
                    me.calls.fetch_add(1, Ordering::SeqCst);
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    let model = v["model"].as_str().unwrap_or_default().to_owned();
                    me.models.lock().unwrap().push(model.clone());
                    let next = me.script.lock().unwrap().pop_front();
                    let (status, body) = next.unwrap_or(*me.default.lock().unwrap());
                    let body = if body.is_empty() {
                        format!(
                            r#"{{"model":"{model}","answered_by":"{}","status":{status}}}"#,
                            me.label
                        )
                    } else {
                        body.to_owned()
                    };
                    (
                        StatusCode::from_u16(status).unwrap(),
                        [("content-type", "application/json")],
                        body,
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        s.url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        s
    }

    fn then(&self, status: u16, body: &'static str) {
        self.script.lock().unwrap().push_back((status, body));
    }

    fn set(&self, status: u16) {
        *self.default.lock().unwrap() = (status, "");
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn models(&self) -> Vec<String> {
        self.models.lock().unwrap().clone()
    }
}

/// The client service of one upstream: reqwest to its base URL, the normalizer inside (so an
/// error answer's code is known to the breaker, as in the gateway). One type for every
/// upstream.
type Up = BoxCloneSyncService<Request<LayerBody<Body>>, Response<Body>, BoxError>;

fn client(up: &Scripted) -> Up {
    let http = reqwest::Client::new();
    let base = up.url.clone();
    let svc = tower::service_fn(move |req: Request<LayerBody<Body>>| {
        let http = http.clone();
        let url = format!("{base}{}", req.uri().path());
        async move {
            let body = req.into_body().collect().await?.to_bytes();
            let r = http
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await?;
            let mut res = Response::builder().status(r.status().as_u16());
            if let Some(ct) = r.headers().get("content-type") {
                res = res.header("content-type", ct.as_bytes());
            }
            let bytes = r.bytes().await?;
            Ok::<_, BoxError>(res.body(Body::from(bytes)).unwrap())
        }
    });
    BoxCloneSyncService::new(
        ServiceBuilder::new()
            .map_response(|r: Response<_>| r.map(Body::new))
            .layer(NormalizeErrorsLayer::new())
            .service(svc),
    )
}

/// Serves the breaker around `primary` on 127.0.0.1:0; returns its base URL.
async fn gateway(layer: CircuitBreakerLayer<ServiceFallback<Up>>, primary: Up) -> String {
    let svc: BoxCloneSyncService<Request<Body>, Response<Body>, BoxError> =
        BoxCloneSyncService::new(
            layer
                .layer(primary)
                .map_response(|res: Response<_>| res.map(Body::new)),
        );
    let app = axum::Router::new().route_service(
        "/v1/chat/completions",
        tower::service_fn(move |req: Request<Body>| {
            let svc = svc.clone();
            async move {
                Ok::<_, Infallible>(match svc.oneshot(req).await {
                    Ok(res) => res.into_response(),
                    Err(_) => StatusCode::BAD_GATEWAY.into_response(),
                })
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

struct Answered {
    status: u16,
    fallback: Option<String>,
    body: serde_json::Value,
}

async fn post(gateway: &str, model: &str) -> Answered {
    let res = reqwest::Client::new()
        .post(format!("{gateway}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(format!(
            r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#
        ))
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    let fallback = res
        .headers()
        .get("x-llm-layers-fallback")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = res.json().await.unwrap();
    Answered {
        status,
        fallback,
        body,
    }
}

/// The fallback events, as `target reason outcome`.
type Seen = Arc<Mutex<Vec<String>>>;

fn events() -> (Seen, impl Fn(&BreakerEvent) + Send + Sync + 'static) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let hook = move |e: &BreakerEvent| {
        if let BreakerEvent::Fallback {
            fallback,
            reason,
            outcome,
            ..
        } = e
        {
            s.lock().unwrap().push(format!(
                "{fallback} {} {}",
                reason.as_str(),
                outcome.as_str()
            ));
        }
    };
    (seen, hook)
}

fn take(seen: &Seen) -> Vec<String> {
    std::mem::take(&mut *seen.lock().unwrap())
}

#[tokio::test]
async fn a_chain_of_three_targets_is_walked_past_two_open_circuits() {
    let primary = Scripted::start("primary", 503).await;
    let a = Scripted::start("a", 503).await;
    let b = Scripted::start("b", 529).await;
    let c = Scripted::start("c", 200).await;
    let (seen, hook) = events();
    let layer = CircuitBreakerLayer::builder()
        .name("openai")
        .consecutive_failures(1)
        .open_duration(Duration::from_secs(60))
        .fallback_target(Target::upstream("a", client(&a)))
        .fallback_target(Target::upstream("b", client(&b)))
        .fallback_target(Target::upstream("c", client(&c)))
        .on_event(hook)
        .build()
        .unwrap();
    let h = layer.handle();
    let gw = gateway(layer, client(&primary)).await;

    // The first request opens the primary's circuit and each failing target's own.
    let got = post(&gw, "gpt-4o").await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    assert_eq!(got.fallback.as_deref(), Some("c"));
    assert_eq!(got.body["answered_by"], "c");
    assert_eq!(
        take(&seen),
        [
            "a overloaded failed",
            "b overloaded failed",
            "c overloaded answered"
        ]
    );
    assert_eq!(h.state(SINGLE_KEY), Some(CircuitState::Open));
    assert_eq!(h.state("a"), Some(CircuitState::Open));
    assert_eq!(h.state("b"), Some(CircuitState::Open));
    assert_eq!(h.state("c"), Some(CircuitState::Closed));

    // The second is walked past three open circuits (the primary's, a's, b's) to c, with no
    // call to any of them.
    let got = post(&gw, "gpt-4o").await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    assert_eq!(got.fallback.as_deref(), Some("c"));
    assert_eq!(
        take(&seen),
        [
            "a primary_open circuit_open",
            "b primary_open circuit_open",
            "c primary_open answered"
        ]
    );
    assert_eq!(
        (primary.calls(), a.calls(), b.calls(), c.calls()),
        (1, 1, 1, 2)
    );
    assert_eq!(h.metrics(SINGLE_KEY).unwrap().fallbacks, 2);
    assert_eq!(h.metrics("c").unwrap().calls, 2);
}

#[tokio::test]
async fn a_529_answer_moves_the_walk_to_the_next_target() {
    let primary = Scripted::start("primary", 529).await;
    let a = Scripted::start("a", 200).await;
    let b = Scripted::start("b", 200).await;
    let (seen, hook) = events();
    let layer = CircuitBreakerLayer::builder()
        .fallback_target(Target::upstream("a", client(&a)).with_model("gpt-4o-2024-08-06"))
        .fallback_target(Target::upstream("b", client(&b)))
        .on_event(hook)
        .build()
        .unwrap();
    let h = layer.handle();
    let gw = gateway(layer, client(&primary)).await;
    let got = post(&gw, "gpt-4o").await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    assert_eq!(got.fallback.as_deref(), Some("a/gpt-4o-2024-08-06"));
    assert_eq!(a.models(), ["gpt-4o-2024-08-06"], "the model is rewritten");
    assert_eq!(b.calls(), 0);
    assert_eq!(take(&seen), ["a/gpt-4o-2024-08-06 overloaded answered"]);
    // The primary's 529 counts on its circuit, a's success on a's.
    assert_eq!(h.metrics(SINGLE_KEY).unwrap().failures, 1);
    assert_eq!(h.metrics("a/gpt-4o-2024-08-06").unwrap().calls, 1);

    // A healthy primary answers itself, unmarked.
    primary.set(200);
    let got = post(&gw, "gpt-4o").await;
    assert_eq!((got.status, got.fallback), (200, None));
    assert_eq!(got.body["answered_by"], "primary");
    assert_eq!(a.calls(), 1);
}

#[tokio::test]
async fn a_context_length_error_goes_only_to_the_larger_context_target() {
    let primary = Scripted::start("primary", 200).await;
    let small = Scripted::start("small", 200).await;
    let large = Scripted::start("large", 200).await;
    let safe = Scripted::start("safe", 200).await;
    let (seen, hook) = events();
    let layer = CircuitBreakerLayer::builder()
        .fallback_target(Target::upstream("small", client(&small)))
        .fallback_target(Target::upstream("large", client(&large)).larger_context())
        .fallback_target(Target::upstream("safe", client(&safe)).on_content_policy())
        .on_event(hook)
        .build()
        .unwrap();
    let gw = gateway(layer, client(&primary)).await;

    primary.then(400, CONTEXT_LENGTH);
    let got = post(&gw, "gpt-4o").await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    assert_eq!(got.fallback.as_deref(), Some("large"));
    assert_eq!(take(&seen), ["large context_length answered"]);
    assert_eq!((small.calls(), large.calls(), safe.calls()), (0, 1, 0));

    // A content-policy refusal goes only to the target marked for it.
    primary.then(400, CONTENT_POLICY);
    let got = post(&gw, "gpt-4o").await;
    assert_eq!(got.fallback.as_deref(), Some("safe"));
    assert_eq!(take(&seen), ["safe content_policy answered"]);
    assert_eq!((small.calls(), large.calls(), safe.calls()), (0, 1, 1));

    // The larger model is too small as well: with no other larger-context target, its own
    // error is the answer, and its envelope says who answered.
    primary.then(400, CONTEXT_LENGTH);
    large.then(400, CONTEXT_LENGTH);
    let got = post(&gw, "gpt-4o").await;
    assert_eq!(got.status, 400);
    assert_eq!(got.fallback.as_deref(), Some("large"));
    assert_eq!(got.body["error"]["code"], "context_length_exceeded");
    let msg = got.body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("answered by fallback target 'large'"), "{msg}");
    assert_eq!(take(&seen), ["large context_length passed_on"]);

    // An error that no other target could fix is passed on without a walk.
    primary.then(400, INVALID);
    let got = post(&gw, "gpt-4o").await;
    assert_eq!((got.status, got.fallback), (400, None));
    assert!(take(&seen).is_empty());
    assert_eq!((small.calls(), large.calls(), safe.calls()), (0, 2, 1));
}

#[tokio::test]
async fn each_target_is_tried_at_most_once_and_the_envelope_names_each_outcome() {
    let primary = Scripted::start("primary", 503).await;
    let a = Scripted::start("a", 503).await;
    let b = Scripted::start("b", 529).await;
    let c = Scripted::start("c", 504).await;
    let layer = CircuitBreakerLayer::builder()
        .name("openai")
        .fallback_target(Target::upstream("a", client(&a)))
        .fallback_target(Target::upstream("b", client(&b)))
        .fallback_target(Target::upstream("c", client(&c)))
        .build()
        .unwrap();
    let gw = gateway(layer, client(&primary)).await;
    let got = post(&gw, "gpt-4o").await;
    assert_eq!(got.status, 503, "{:?}", got.body);
    assert_eq!(got.fallback, None);
    assert_eq!(
        (primary.calls(), a.calls(), b.calls(), c.calls()),
        (1, 1, 1, 1)
    );
    let msg = got.body["error"]["message"].as_str().unwrap();
    for part in [
        "'openai'",
        "the primary answered with status 503 (service_unavailable)",
        "fallback 'a' failed: upstream answered with status 503 (service_unavailable)",
        "fallback 'b' failed: upstream answered with status 503 (service_unavailable)",
        "fallback 'c' failed: upstream answered with status 504 (timeout)",
    ] {
        assert!(msg.contains(part), "{part:?} not in {msg}");
    }
    assert!(!msg.contains("127.0.0.1") && !msg.contains("http"), "{msg}");

    // Two targets of one name would be one circuit, tried twice: refused.
    let err = CircuitBreakerLayer::builder()
        .fallback_target(Target::model("gpt-4o-mini"))
        .fallback_target(Target::model("gpt-4o-mini"))
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "fallback_target");
}

#[tokio::test]
async fn a_targets_failures_open_its_own_circuit_and_later_requests_skip_it() {
    let primary = Scripted::start("primary", 200).await;
    let a = Scripted::start("a", 503).await;
    let b = Scripted::start("b", 200).await;
    let (seen, hook) = events();
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(2)
        .fallback_target(Target::upstream("a", client(&a)))
        .fallback_target(Target::upstream("b", client(&b)))
        .on_event(hook)
        .build()
        .unwrap();
    let h = layer.handle();
    h.set_mode_for(SINGLE_KEY, CircuitMode::ForcedOpen);
    let gw = gateway(layer, client(&primary)).await;
    for _ in 0..2 {
        let got = post(&gw, "gpt-4o").await;
        assert_eq!(got.fallback.as_deref(), Some("b"));
    }
    assert_eq!(h.state("a"), Some(CircuitState::Open));
    assert_eq!(h.metrics("a").unwrap().failures, 2);
    assert_eq!(
        take(&seen),
        [
            "a primary_open failed",
            "b overloaded answered",
            "a primary_open failed",
            "b overloaded answered"
        ]
    );
    // a's circuit is open: skipped without a call.
    let got = post(&gw, "gpt-4o").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.fallback.as_deref(), Some("b"));
    assert_eq!(got.body["answered_by"], "b");
    assert_eq!(a.calls(), 2);
    assert_eq!(
        take(&seen),
        ["a primary_open circuit_open", "b primary_open answered"]
    );
    assert_eq!(primary.calls(), 0, "the primary is held open");
}

#[tokio::test]
async fn models_on_the_same_upstream_and_other_upstreams_mix_in_one_chain() {
    let primary = Scripted::start("primary", 200).await;
    let other = Scripted::start("other", 200).await;
    let layer = CircuitBreakerLayer::builder()
        .fallback_target(Target::model("gpt-4o-mini"))
        .fallback_target(Target::upstream("other", client(&other)))
        .build()
        .unwrap();
    let h = layer.handle();
    let gw = gateway(layer, client(&primary)).await;
    primary.then(503, "");
    let got = post(&gw, "gpt-4o").await;
    assert_eq!(got.fallback.as_deref(), Some("gpt-4o-mini"));
    assert_eq!(got.body["model"], "gpt-4o-mini");
    assert_eq!(primary.models(), ["gpt-4o", "gpt-4o-mini"]);
    // The same-upstream model fails too: on to the other upstream, with the body unchanged.
    primary.then(503, "");
    primary.then(503, "");
    let got = post(&gw, "gpt-4o").await;
    assert_eq!(got.fallback.as_deref(), Some("other"));
    assert_eq!(other.models(), ["gpt-4o"]);
    assert_eq!(h.metrics("gpt-4o-mini").unwrap().calls, 2);
}

// ---- In-process services over paused time ----

type InBody = LayerBody<LayerBody<Body>>;

#[tokio::test(start_paused = true)]
async fn the_retry_deadline_stops_the_walk() {
    let primary = Upstream::new(Answer::After(Duration::from_secs(4), 503));
    let a = Upstream::new(Answer::After(Duration::from_secs(4), 200));
    let b = Upstream::new(Answer::Status(200));
    let (seen, hook) = events();
    let breaker = CircuitBreakerLayer::builder()
        .fallback_target(Target::upstream("a", a.service::<InBody>()))
        .fallback_target(Target::upstream("b", b.service::<InBody>()))
        .on_event(hook)
        .build()
        .unwrap();
    let retry = RetryLayer::builder()
        .max_attempts(1)
        .deadline(Duration::from_secs(6))
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(retry)
        .layer(breaker)
        .service(primary.service::<InBody>());
    let start = tokio::time::Instant::now();
    let res = svc.oneshot(chat("gpt-4o")).await.unwrap();
    // The primary answered 503 at 4 s; a was still thinking at the 6 s deadline.
    assert_eq!(start.elapsed(), Duration::from_secs(6));
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("fallback 'a' did not answer before the deadline"),
        "{msg}"
    );
    assert_eq!((primary.calls(), a.calls(), b.calls()), (1, 1, 0));
    assert_eq!(take(&seen), ["a overloaded out_of_time"]);
}

#[tokio::test(start_paused = true)]
async fn without_a_deadline_the_call_timeout_bounds_the_walk() {
    let primary = Upstream::new(Answer::Hang);
    let a = Upstream::new(Answer::After(Duration::from_secs(1), 503));
    let b = Upstream::new(Answer::Status(200));
    let (seen, hook) = events();
    let breaker = CircuitBreakerLayer::builder()
        .call_timeout(Duration::from_secs(2))
        .fallback_target(Target::upstream("a", a.service::<LayerBody<Body>>()))
        .fallback_target(Target::upstream("b", b.service::<LayerBody<Body>>()))
        .on_event(hook)
        .build()
        .unwrap();
    let svc = breaker.layer(primary.service::<LayerBody<Body>>());
    let start = tokio::time::Instant::now();
    let res = svc.clone().oneshot(chat("gpt-4o")).await.unwrap();
    // The primary is given up on at 2 s; a answers 503 at 3 s; b at once.
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    assert_eq!(res.headers()["x-llm-layers-fallback"], "b");
    assert_eq!(take(&seen), ["a timed_out failed", "b overloaded answered"]);
    assert_eq!(breaker.handle().metrics(SINGLE_KEY).unwrap().timeouts, 1);

    // The walk as a whole has the call timeout too, from the moment it leaves the primary:
    // a target that hangs ends it there.
    a.set_default(Answer::Hang);
    let start = tokio::time::Instant::now();
    let res = svc.oneshot(chat("gpt-4o")).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(4));
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(take(&seen), ["a timed_out out_of_time"]);
    assert_eq!(b.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_body_over_the_limit_is_not_walked_past_the_primarys_answer() {
    let primary = Upstream::new(Answer::Status(503));
    let a = Upstream::new(Answer::Status(200));
    let breaker = CircuitBreakerLayer::builder()
        .body_limit(64)
        .fallback_target(Target::upstream("a", a.service::<LayerBody<Body>>()))
        .build()
        .unwrap();
    let svc = breaker.layer(primary.service::<LayerBody<Body>>());
    let big = format!(
        r#"{{"model":"gpt-4o","messages":[],"pad":"{}"}}"#,
        "x".repeat(100)
    );
    let req = Request::post("/v1/chat/completions")
        .header("content-length", big.len())
        .body(Body::from(big.clone()))
        .unwrap();
    let res = svc.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(res.headers().get("x-llm-layers-fallback").is_none());
    assert_eq!((primary.calls(), a.calls()), (1, 0));
    assert_eq!(primary.bodies()[0], big.as_bytes(), "sent unread, intact");
    // A body within the limit is walked.
    let res = svc.oneshot(chat("m")).await.unwrap();
    assert_eq!(res.headers()["x-llm-layers-fallback"], "a");
}

#[tokio::test(start_paused = true)]
async fn a_transport_error_of_the_primary_moves_the_walk_on() {
    let primary = Upstream::new(Answer::Refused);
    let a = Upstream::new(Answer::Status(200));
    let (seen, hook) = events();
    let breaker = CircuitBreakerLayer::builder()
        .fallback_target(Target::upstream("a", a.service::<LayerBody<Body>>()))
        .on_event(hook)
        .build()
        .unwrap();
    let svc = breaker.layer(primary.service::<LayerBody<Body>>());
    let res = svc.oneshot(chat("m")).await.unwrap();
    assert_eq!(res.headers()["x-llm-layers-fallback"], "a");
    assert_eq!(take(&seen), ["a unreachable answered"]);
    assert_eq!(breaker.handle().metrics(SINGLE_KEY).unwrap().failures, 1);
}

#[tokio::test]
async fn targets_named_by_upstream_are_bound_later_and_share_the_circuits() {
    let a = Upstream::new(Answer::Status(200));
    let layer = CircuitBreakerLayer::builder()
        .fallback_target(Target::named_upstream("backup").with_model("gpt-4o-mini"))
        .build()
        .unwrap();
    assert_eq!(
        layer
            .upstream_names()
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>(),
        ["backup"]
    );
    let err = layer
        .bind_upstreams(|_| None::<()>)
        .map(|_| ())
        .unwrap_err();
    assert!(err.to_string().contains("'backup'"), "{err}");
    let bound = layer
        .bind_upstreams(|name| (name == "backup").then(|| a.service::<LayerBody<Body>>()))
        .unwrap();
    layer
        .handle()
        .set_mode_for(SINGLE_KEY, CircuitMode::ForcedOpen);
    let svc = bound.layer(Upstream::new(Answer::Status(200)).service::<LayerBody<Body>>());
    let res = svc.oneshot(chat("gpt-4o")).await.unwrap();
    assert_eq!(res.headers()["x-llm-layers-fallback"], "backup/gpt-4o-mini");
    // Read to its end, as a client does: the success is recorded then.
    res.into_body().collect().await.unwrap();
    let seen: serde_json::Value = serde_json::from_slice(&a.bodies()[0]).unwrap();
    assert_eq!(seen["model"], "gpt-4o-mini");
    // The same circuits: the handle of the unbound layer sees the target's.
    assert_eq!(
        layer.handle().metrics("backup/gpt-4o-mini").unwrap().calls,
        1
    );
}
