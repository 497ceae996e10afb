//! The breaker's response future: one state machine, no boxed futures.
//!
//! view (keyed by model, when no earlier layer parsed the body) → admission → `poll_ready`
//! on the call's own clone of the inner service → the call → the head (a success waits for
//! the end of its body, see [`GuardedBody`]); or, refused: the envelope, or the fallback
//! chain, step by step.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::body::GuardedBody;
use super::circuit::{head_verdict, Circuit, End, Permit, Refusal, Timer, Verdict};
use super::config::{millis, CircuitKey, Config, FallbackStep, TargetStep};
use super::events::{emit, BreakerEvent, FallbackOutcome, FallbackReason};
use super::fallback::Fallback;
use super::registry::{Shared, SINGLE_KEY};
use super::service::{
    circuit_for, copy_request, mark, note_rejection, refusal_error, refusal_response,
    rewrite_model, upstream_of,
};
use crate::body::{BoxError, BufferRequest, LayerBody};
use crate::error::{ApiError, ErrorCode};
use crate::ext::Deadline;
use crate::policy::Classify;
use crate::request::{EnsureView, RequestView};

/// The breaker's response type for an inner body `B`.
type Out<B> = Response<LayerBody<GuardedBody<B>>>;

pin_project! {
    #[project = StateProj]
    enum State<S, SF, FS, FF, B> {
        // Reading the model from the body.
        // Boxed (the request is being read and parsed anyway): the future of an admitted call
        // stays small.
        View { view: Pin<Box<EnsureView<B>>> },
        // A chain with targets: reading the body once, before the primary, so that it can be
        // replayed to the targets after the primary's answer.
        Buffer { buf: Pin<Box<BufferRequest<B>>> },
        // Admitted (or unguarded): driving the call's clone of the inner service ready.
        Ready { svc: Option<S>, req: Option<Request<LayerBody<B>>> },
        // The inner call.
        Called { #[pin] fut: SF },
        // An answer of the breaker's own: a refusal (`local`, with the request's labels), a
        // body over the limit.
        Answer { err: Option<ApiError>, local: Option<crate::metrics::RequestLabels> },
        // Refused, with a fallback chain: boxed, so that the future an admitted call moves
        // around stays small (the chain is the rare path, and the largest state).
        Degrade { walk: Pin<Box<Walk<S, SF, FS, FF, B>>> },
        Done,
    }
}

pin_project! {
    // The fallback chain's state: the step in progress and where the chain stands.
    struct Walk<S, SF, FS, FF, B> {
        #[pin]
        step: Step<S, SF, FS, FF, B>,
        // The walk's deadline, or the current target's call timeout, whichever is first.
        #[pin]
        timer: Option<Sleep>,
        chain: Chain<B>,
    }
}

pin_project! {
    #[project = StepProj]
    enum Step<S, SF, FS, FF, B> {
        // Reading the body once, for the steps that replay or rewrite it.
        Buffering { #[pin] buf: BufferRequest<B> },
        // Choosing the next step.
        Next,
        InnerReady { svc: Option<S>, req: Option<Request<LayerBody<B>>> },
        InnerCall { #[pin] fut: SF },
        FallbackReady { svc: Option<FS>, req: Option<Request<LayerBody<B>>> },
        FallbackCall { #[pin] fut: FF },
    }
}

/// Why the walk left the primary.
enum Left {
    /// Its circuit refused the call.
    Refused(Refusal),
    /// It answered (or failed) so: the cause, for the envelope.
    Answered(String),
}

/// Where the fallback chain stands.
struct Chain<B> {
    circuit: Arc<Circuit>,
    left: Left,
    /// Why the next step is tried.
    reason: FallbackReason,
    /// A `context_length_exceeded` or `content_policy_violation` was seen: only the targets
    /// marked for it from now on.
    need_larger: bool,
    need_policy: bool,
    /// The step tried now; the next one to try.
    current: usize,
    next: usize,
    causes: Vec<String>,
    source: Source<B>,
    /// The current target's permit on its own circuit.
    permit: Option<Permit>,
    /// The walk ends here.
    deadline: Option<Instant>,
    /// Whether the armed timer is the deadline (else the target's call timeout).
    timer_is_deadline: bool,
    /// The request's key id and route, for the rejection when the walk ends.
    labels: crate::metrics::RequestLabels,
}

/// The request the fallback steps are made of.
enum Source<B> {
    /// The request itself, for the one step that consumes it.
    Whole(Option<Request<LayerBody<B>>>),
    /// Its head and bytes, for steps that replay or rewrite it.
    Buffered(Parts, Bytes),
    /// Still being read.
    Reading,
}

/// What a call with a chain of targets keeps to walk on after the primary's answer.
struct Replay {
    circuit: Arc<Circuit>,
    parts: Parts,
    bytes: Bytes,
}

pin_project! {
    /// The future of [`CircuitBreaker`](super::CircuitBreaker): reads the model when the key
    /// needs it, asks the circuit, then drives its own clone of the inner service ready and
    /// calls it, holding the call's permit (with the probe and call timers it needs, set only
    /// when it needs them); or answers a refusal, or walks the fallback chain.
    ///
    /// Dropped before the answer, the call counts as the module documentation says (a probe
    /// as failed; another call only past the slow-call duration or the call timeout).
    pub struct ResponseFuture<S, F, B>
    where
        S: Service<Request<LayerBody<B>>>,
        F: Fallback<Request<LayerBody<B>>, S::Response, S::Error>,
    {
        #[pin]
        state: State<S, S::Future, F::Service, F::Future, B>,
        // The layer's circuits, for the states that still choose one (the view) or walk the
        // fallback chain; an admitted call needs only its permit.
        shared: Option<Arc<Shared>>,
        // The call's clone of the inner service, kept for the view and the fallback chain.
        inner: Option<S>,
        fallback: Option<F>,
        permit: Option<Permit>,
        #[pin]
        timer: Option<Sleep>,
        probe: bool,
        // With a chain of targets: the request, to walk on after the primary's answer.
        replay: Option<Box<Replay>>,
    }
}

/// A timer at `t`, when a tokio runtime is there to run it.
fn sleep(t: Option<Timer>) -> (Option<Sleep>, bool) {
    match t {
        Some(t) if tokio::runtime::Handle::try_current().is_ok() => {
            (Some(tokio::time::sleep_until(t.at)), t.probe)
        }
        _ => (None, false),
    }
}

/// The answer when the breaker's call timeout fires.
fn timeout_error(cfg: &Config) -> ApiError {
    let ms = cfg.call_timeout.map(millis).unwrap_or_default();
    ApiError::new(
        ErrorCode::Timeout,
        format!(
            "Circuit breaker '{}' gave up on the upstream: no answer within {ms} ms.",
            cfg.name
        ),
    )
}

/// What the circuit said to a request.
enum Decision<B> {
    Pass(Permit, Request<LayerBody<B>>),
    Refused(Refused<B>),
}

/// What a refused request gets.
enum Refused<B> {
    /// The envelope.
    Answer(ApiError),
    /// The fallback chain.
    Degrade(Arc<Circuit>, Refusal, Request<LayerBody<B>>),
}

fn decide<B>(shared: &Shared, circuit: Arc<Circuit>, req: Request<LayerBody<B>>) -> Decision<B> {
    match circuit.admit() {
        Ok(permit) => Decision::Pass(permit, req),
        Err(refusal) => Decision::Refused(refused(shared, circuit, refusal, req)),
    }
}

/// What a refused call gets: the envelope, or the fallback chain.
fn refused<B>(
    shared: &Shared,
    circuit: Arc<Circuit>,
    refusal: Refusal,
    req: Request<LayerBody<B>>,
) -> Refused<B> {
    let cfg = shared.config();
    note_rejection(cfg, &circuit, refusal);
    if cfg.fallbacks.is_empty() {
        Refused::Answer(refusal_error(cfg, &circuit.key, refusal))
    } else {
        Refused::Degrade(circuit, refusal, req)
    }
}

/// The walk's deadline: the retry layer's ([`Deadline`]), else the breaker's call timeout
/// from `started`, else none.
fn walk_deadline(cfg: &Config, ext: &http::Extensions, started: Instant) -> Option<Instant> {
    if let Some(d) = ext.get::<Deadline>() {
        return Some(d.0);
    }
    cfg.call_timeout.and_then(|t| started.checked_add(t))
}

/// The first state of the fallback chain: the body is read first when a step replays or
/// rewrites it.
fn degrade<S, SF, FS, FF, B: Body>(
    cfg: &Config,
    circuit: Arc<Circuit>,
    refusal: Refusal,
    req: Request<LayerBody<B>>,
) -> State<S, SF, FS, FF, B> {
    let steps = &cfg.fallbacks;
    let consuming = steps
        .iter()
        .filter(|s| !matches!(s, FallbackStep::Static { .. }))
        .count();
    let needs_bytes = cfg.walk_on_answer
        || consuming > 1
        || steps
            .iter()
            .any(|s| matches!(s, FallbackStep::Model { .. }));
    let deadline = if cfg.walk_on_answer {
        walk_deadline(cfg, req.extensions(), Instant::now())
    } else {
        None
    };
    let labels = crate::metrics::RequestLabels::capture(req.extensions());
    let (source, step) = if needs_bytes {
        let (parts, body) = req.into_parts();
        match body {
            // Bytes the view already read: nothing more to read.
            LayerBody::Full { data } => (
                Source::Buffered(parts, data.unwrap_or_default()),
                Step::Next,
            ),
            LayerBody::Inner { body } => (
                Source::Reading,
                Step::Buffering {
                    buf: BufferRequest::new(Request::from_parts(parts, body), cfg.body_limit),
                },
            ),
        }
    } else {
        (Source::Whole(Some(req)), Step::Next)
    };
    let chain = Chain::new(
        circuit,
        Left::Refused(refusal),
        FallbackReason::PrimaryOpen,
        source,
        deadline,
        labels,
    );
    State::Degrade {
        walk: Box::pin(Walk {
            step,
            timer: None,
            chain,
        }),
    }
}

/// The walk past a primary that answered (or failed) with a fallback-worthy outcome.
fn walk_on<S, SF, FS, FF, B>(
    cfg: &Config,
    replay: Box<Replay>,
    cause: String,
    reason: FallbackReason,
) -> State<S, SF, FS, FF, B> {
    let Replay {
        circuit,
        parts,
        bytes,
    } = *replay;
    // The walk's own time starts when it leaves the primary.
    let deadline = walk_deadline(cfg, &parts.extensions, Instant::now());
    let labels = crate::metrics::RequestLabels::capture(&parts.extensions);
    let chain = Chain::new(
        circuit,
        Left::Answered(cause),
        reason,
        Source::Buffered(parts, bytes),
        deadline,
        labels,
    );
    State::Degrade {
        walk: Box::pin(Walk {
            step: Step::Next,
            timer: None,
            chain,
        }),
    }
}

/// The reason an answer's code sends the walk on, when it is one.
fn worthy(code: ErrorCode) -> Option<FallbackReason> {
    match code {
        ErrorCode::ServiceUnavailable => Some(FallbackReason::Overloaded),
        ErrorCode::Timeout => Some(FallbackReason::TimedOut),
        ErrorCode::ContextLengthExceeded => Some(FallbackReason::ContextLength),
        ErrorCode::ContentPolicyViolation => Some(FallbackReason::ContentPolicy),
        _ => None,
    }
}

/// The failure code of an answer by the configured policy (the `ApiError` an inner layer
/// left, else the status); `None` for a success.
fn answer_code<R>(cfg: &Config, res: &Response<R>) -> Option<ErrorCode> {
    cfg.policy
        .classify_response(
            res.status(),
            res.headers(),
            res.extensions().get::<ApiError>(),
        )
        .code()
}

/// Why a transport error sends the walk on.
fn error_reason<E: 'static>(e: &E) -> FallbackReason {
    if crate::policy::classify_error_ref(e).code() == ErrorCode::Timeout {
        FallbackReason::TimedOut
    } else {
        FallbackReason::Unreachable
    }
}

/// The constraints once `reason` was seen: larger-context targets only, content-policy
/// alternatives only.
fn sticky(reason: FallbackReason, larger: bool, policy: bool) -> (bool, bool) {
    (
        larger || reason == FallbackReason::ContextLength,
        policy || reason == FallbackReason::ContentPolicy,
    )
}

/// Whether a step may be tried under these constraints.
fn eligible(step: &FallbackStep, larger: bool, policy: bool) -> bool {
    match step {
        FallbackStep::Target(t) => {
            (!larger || t.larger_context) && (!policy || t.on_content_policy)
        }
        _ => !larger && !policy,
    }
}

/// Whether a step from `from` on may be tried under these constraints.
fn any_eligible(cfg: &Config, from: usize, larger: bool, policy: bool) -> bool {
    cfg.fallbacks
        .get(from..)
        .unwrap_or_default()
        .iter()
        .any(|s| eligible(s, larger, policy))
}

/// With a chain of targets, a request whose body is buffered keeps its head and bytes to walk
/// on after the primary's answer.
fn replay_for<B>(
    cfg: &Config,
    circuit: &Arc<Circuit>,
    req: &Request<LayerBody<B>>,
) -> Option<Box<Replay>> {
    if !cfg.walk_on_answer {
        return None;
    }
    let LayerBody::Full { data } = req.body() else {
        return None;
    };
    Some(Box::new(Replay {
        circuit: circuit.clone(),
        parts: head_parts(req),
        bytes: data.clone().unwrap_or_default(),
    }))
}

/// A copy of a request's head.
fn head_parts<B>(req: &Request<B>) -> Parts {
    let mut r = Request::new(());
    *r.method_mut() = req.method().clone();
    *r.uri_mut() = req.uri().clone();
    *r.version_mut() = req.version();
    *r.headers_mut() = req.headers().clone();
    *r.extensions_mut() = req.extensions().clone();
    r.into_parts().0
}

/// The state of a request whose body is read and whose circuit is now chosen: admitted,
/// refused or degraded (the view, or the buffering of a chain with targets, is done).
#[allow(clippy::too_many_arguments)]
fn admitted<S: Clone, SF, FS, FF, B: Body>(
    shared: &Shared,
    req: Request<LayerBody<B>>,
    inner: &mut Option<S>,
    permit: &mut Option<Permit>,
    mut timer: Pin<&mut Option<Sleep>>,
    probe: &mut bool,
    replay: &mut Option<Box<Replay>>,
) -> State<S, SF, FS, FF, B> {
    let Some(circuit) = circuit_for(shared, &req) else {
        // No model in the body (or no body): unguarded.
        return State::Ready {
            svc: inner.take(),
            req: Some(req),
        };
    };
    let kept = replay_for(shared.config(), &circuit, &req);
    let labels = crate::metrics::RequestLabels::capture(req.extensions());
    match decide(shared, circuit, req) {
        Decision::Pass(p, req) => {
            let (t, pr) = sleep(p.timer());
            *permit = Some(p);
            timer.set(t);
            *probe = pr;
            // With a walk to come after the answer, the guarded service stays for the
            // targets on the same upstream.
            let svc = if kept.is_some() {
                inner.clone()
            } else {
                inner.take()
            };
            *replay = kept;
            State::Ready {
                svc,
                req: Some(req),
            }
        }
        Decision::Refused(Refused::Answer(err)) => State::Answer {
            err: Some(err),
            local: Some(labels),
        },
        Decision::Refused(Refused::Degrade(circuit, refusal, req)) => {
            degrade(shared.config(), circuit, refusal, req)
        }
    }
}

impl<B> Chain<B> {
    fn new(
        circuit: Arc<Circuit>,
        left: Left,
        reason: FallbackReason,
        source: Source<B>,
        deadline: Option<Instant>,
        labels: crate::metrics::RequestLabels,
    ) -> Self {
        let (need_larger, need_policy) = sticky(reason, false, false);
        Chain {
            circuit,
            left,
            reason,
            need_larger,
            need_policy,
            current: 0,
            next: 0,
            causes: Vec::new(),
            source,
            permit: None,
            deadline,
            timer_is_deadline: false,
            labels,
        }
    }

    /// `reason` sends the walk on: the constraints it brings stay for the rest of the walk.
    fn moved_on(&mut self, reason: FallbackReason) {
        self.reason = reason;
        (self.need_larger, self.need_policy) = sticky(reason, self.need_larger, self.need_policy);
    }

    fn event(&self, cfg: &Config, name: &str, outcome: FallbackOutcome) {
        emit(
            &cfg.on_event,
            BreakerEvent::Fallback {
                name: cfg.name.clone(),
                key: self.circuit.key.clone(),
                fallback: Arc::from(name),
                ok: outcome == FallbackOutcome::Answered,
                reason: self.reason,
                outcome,
            },
        );
    }

    /// An answer that serves the call: counted on the primary's circuit, marked.
    fn served<R>(&self, cfg: &Config, name: &str, res: Out<R>) -> Out<R> {
        self.event(cfg, name, FallbackOutcome::Answered);
        self.circuit
            .counters
            .fallbacks
            .fetch_add(1, Ordering::Relaxed);
        mark(res, name)
    }

    /// The outcome of the current step (a chain without targets): its answer when it served
    /// the call, else `None` (its failure noted) to go on with the next step.
    fn settle<R>(&mut self, cfg: &Config, result: Result<Out<R>, String>) -> Option<Out<R>> {
        let name = cfg.fallbacks[self.current].name();
        let result = result.and_then(|res| {
            if head_verdict(cfg, &res) == Verdict::Failure {
                Err(format!(
                    "upstream answered with status {}",
                    res.status().as_u16()
                ))
            } else {
                Ok(res)
            }
        });
        match result {
            Ok(res) => Some(self.served(cfg, name, res)),
            Err(why) => {
                self.event(cfg, name, FallbackOutcome::Failed);
                self.causes.push(format!("fallback '{name}' failed: {why}"));
                self.reason = FallbackReason::Failed;
                None
            }
        }
    }

    /// A target's answer (a chain with targets): recorded on its own circuit; its answer
    /// when the walk ends with it, else `None` to go on.
    fn answered<R: Body>(&mut self, cfg: &Config, res: Response<R>) -> Option<Out<R>> {
        let name = cfg.fallbacks[self.current].name();
        let permit = self.permit.take();
        let Some(code) = answer_code(cfg, &res) else {
            return Some(self.served(cfg, name, head(permit, res)));
        };
        let status = res.status().as_u16();
        match worthy(code) {
            Some(reason) => {
                let (larger, policy) = sticky(reason, self.need_larger, self.need_policy);
                let specific = matches!(
                    reason,
                    FallbackReason::ContextLength | FallbackReason::ContentPolicy
                );
                if specific && !any_eligible(cfg, self.next, larger, policy) {
                    // Nothing left to take this request: the target's own answer is the
                    // honest one.
                    self.event(cfg, name, FallbackOutcome::PassedOn);
                    return Some(annotate(head(permit, res), name));
                }
                drop(head(permit, res));
                self.event(cfg, name, FallbackOutcome::Failed);
                self.causes.push(format!(
                    "fallback '{name}' failed: upstream answered with status {status} ({})",
                    code.as_str()
                ));
                self.moved_on(reason);
                None
            }
            None => {
                self.event(cfg, name, FallbackOutcome::PassedOn);
                Some(annotate(head(permit, res), name))
            }
        }
    }

    /// A step's service failed to become ready: a target's failure when the chain walks on
    /// answers, else the step's.
    fn not_ready<R, E: 'static>(&mut self, cfg: &Config, walk: bool, e: &E) {
        if walk {
            self.failed(cfg, e);
        } else {
            let why = transport_cause(e);
            let _ = self.settle::<R>(cfg, Err(why));
        }
    }

    /// A step's call answered: `Some` answer when the walk ends with it, else `None` to go on.
    fn call_answered<R: Body, E: 'static>(
        &mut self,
        cfg: &Config,
        walk: bool,
        out: Result<Response<R>, E>,
    ) -> Option<Out<R>> {
        if walk {
            match out {
                Ok(res) => self.answered(cfg, res),
                Err(e) => {
                    self.failed(cfg, &e);
                    None
                }
            }
        } else {
            let out = out.map(wrap).map_err(|e| transport_cause(&e));
            self.settle(cfg, out)
        }
    }

    /// A target failed to answer (a transport error), recorded on its own circuit.
    fn failed<E: 'static>(&mut self, cfg: &Config, e: &E) {
        let name = cfg.fallbacks[self.current].name();
        if let Some(p) = self.permit.take() {
            let verdict = p.classify_error(e);
            p.complete(verdict);
        }
        self.event(cfg, name, FallbackOutcome::Failed);
        self.causes
            .push(format!("fallback '{name}' failed: {}", transport_cause(e)));
        self.moved_on(error_reason(e));
    }

    /// Every step failed (or the deadline came): `503` (`504` past the deadline) naming the
    /// primary and each step's failure.
    fn exhausted<R>(&self, cfg: &Config, code: ErrorCode) -> Out<R> {
        let (message, retry_after) = match &self.left {
            Left::Refused(refusal) => {
                let base = refusal_error(cfg, &self.circuit.key, *refusal);
                (base.message().to_owned(), base.retry_after())
            }
            Left::Answered(cause) => {
                let name = &cfg.name;
                let message = if &*self.circuit.key == SINGLE_KEY {
                    format!("Circuit breaker '{name}': {cause}.")
                } else {
                    format!(
                        "Circuit breaker '{name}' for '{}': {cause}.",
                        self.circuit.key
                    )
                };
                (message, None)
            }
        };
        let causes = if self.causes.is_empty() {
            "no fallback could take the request".to_owned()
        } else {
            self.causes.join("; ")
        };
        let mut err = ApiError::new(code, format!("{message} {causes}."));
        err.set_retry_after(retry_after);
        refusal_response(&err, &self.labels)
    }
}

/// An error answer passed on from a fallback target: its envelope (when an inner layer left
/// its [`ApiError`]) says which target answered; marked with the header either way.
fn annotate<R>(res: Out<R>, name: &str) -> Out<R> {
    let Some(err) = res.extensions().get::<ApiError>() else {
        return mark(res, name);
    };
    let mut e = ApiError::new(
        err.code(),
        format!("{} (answered by fallback target '{name}')", err.message()),
    )
    .with_status(res.status());
    e.set_retry_after(err.retry_after());
    if let Some(p) = err.provider() {
        e = e.with_provider(p.to_owned());
    }
    let mut out: Out<R> = e.to_response();
    for (k, v) in res.headers() {
        if k != http::header::CONTENT_LENGTH && !out.headers().contains_key(k) {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    mark(out, name)
}

fn transport_cause<E: 'static>(e: &E) -> String {
    crate::policy::classify_error_ref(e).message().to_owned()
}

fn wrap<R>(res: Response<R>) -> Out<R> {
    res.map(|b| LayerBody::new(GuardedBody::unguarded(b)))
}

impl<S, F, B> ResponseFuture<S, F, B>
where
    S: Service<Request<LayerBody<B>>>,
    F: Fallback<Request<LayerBody<B>>, S::Response, S::Error> + Clone,
    B: Body,
{
    fn new(
        shared: Option<Arc<Shared>>,
        state: State<S, S::Future, F::Service, F::Future, B>,
    ) -> Self {
        ResponseFuture {
            state,
            shared,
            inner: None,
            fallback: None,
            permit: None,
            timer: None,
            probe: false,
            replay: None,
        }
    }

    /// A request whose circuit is known: admitted, refused, or degraded.
    pub(crate) fn admit(
        shared: &Arc<Shared>,
        circuit: Arc<Circuit>,
        inner: S,
        fallback: &F,
        req: Request<LayerBody<B>>,
    ) -> Self {
        // The admitted call first, built in place: the request is moved once, into its
        // state (the future is the size of the request and a timer; each move is a copy).
        let (circuit, refusal) = match circuit.admit_owned() {
            Ok(permit) => {
                let (timer, probe) = sleep(permit.timer());
                return ResponseFuture {
                    state: State::Ready {
                        svc: Some(inner),
                        req: Some(req),
                    },
                    shared: None,
                    inner: None,
                    fallback: None,
                    permit: Some(permit),
                    timer,
                    probe,
                    replay: None,
                };
            }
            Err(refused) => refused,
        };
        let labels = crate::metrics::RequestLabels::capture(req.extensions());
        match refused(shared, circuit, refusal, req) {
            Refused::Answer(err) => Self::new(
                None,
                State::Answer {
                    err: Some(err),
                    local: Some(labels),
                },
            ),
            Refused::Degrade(circuit, refusal, req) => {
                let state = degrade(shared.config(), circuit, refusal, req);
                let mut fut = Self::new(Some(Arc::clone(shared)), state);
                fut.inner = Some(inner);
                fut.fallback = Some(fallback.clone());
                fut
            }
        }
    }

    /// A request no circuit guards: straight to the inner service.
    pub(crate) fn unguarded(inner: S, req: Request<LayerBody<B>>) -> Self {
        Self::new(
            None,
            State::Ready {
                svc: Some(inner),
                req: Some(req),
            },
        )
    }

    /// A request whose key needs the model from its body.
    pub(crate) fn view(
        shared: Arc<Shared>,
        inner: S,
        fallback: Option<F>,
        view: EnsureView<B>,
    ) -> Self {
        let mut fut = Self::new(
            Some(shared),
            State::View {
                view: Box::pin(view),
            },
        );
        fut.inner = Some(inner);
        fut.fallback = fallback;
        fut
    }

    /// A request of a layer with a chain of targets: its body is read first, so that the
    /// chain can be walked after the primary's answer.
    pub(crate) fn buffer(
        shared: Arc<Shared>,
        inner: S,
        fallback: F,
        buf: BufferRequest<B>,
    ) -> Self {
        let mut fut = Self::new(Some(shared), State::Buffer { buf: Box::pin(buf) });
        fut.inner = Some(inner);
        fut.fallback = Some(fallback);
        fut
    }
}

impl<S, F, B> std::fmt::Debug for ResponseFuture<S, F, B>
where
    S: Service<Request<LayerBody<B>>>,
    F: Fallback<Request<LayerBody<B>>, S::Response, S::Error>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S, F, B, ResBody> Future for ResponseFuture<S, F, B>
where
    S: Service<Request<LayerBody<B>>, Response = Response<ResBody>> + Clone,
    S::Error: 'static,
    F: Fallback<Request<LayerBody<B>>, Response<ResBody>, S::Error> + Clone,
    B: Body,
    B::Error: Into<BoxError>,
    ResBody: Body,
{
    type Output = Result<Out<ResBody>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::View { view } => {
                    let shared = this
                        .shared
                        .as_deref()
                        .expect("a future reading the view holds the circuits");
                    let next = match ready!(view.as_mut().poll(cx)) {
                        Ok(req) => admitted(
                            shared,
                            req,
                            this.inner,
                            this.permit,
                            this.timer.as_mut(),
                            this.probe,
                            this.replay,
                        ),
                        // Not JSON (a multipart upload, say): no model to key on, so the
                        // request goes through unguarded, its body intact.
                        Err(failure) => match failure.into_request() {
                            Ok(req) => State::Ready {
                                svc: this.inner.take(),
                                req: Some(req),
                            },
                            // Over the limit or unreadable: the body is gone.
                            Err((_, e)) => State::Answer {
                                err: Some(e.to_api_error()),
                                local: None,
                            },
                        },
                    };
                    this.state.set(next);
                }
                StateProj::Buffer { buf } => {
                    let shared = this
                        .shared
                        .as_deref()
                        .expect("a future reading the body holds the circuits");
                    let next = match ready!(buf.as_mut().poll(cx)) {
                        Ok((parts, bytes)) => admitted(
                            shared,
                            BufferRequest::rebuild(parts, bytes),
                            this.inner,
                            this.permit,
                            this.timer.as_mut(),
                            this.probe,
                            this.replay,
                        ),
                        // A chunked body that grew past the limit, or broke: it is gone.
                        Err((_, e)) => State::Answer {
                            err: Some(e.to_api_error()),
                            local: None,
                        },
                    };
                    this.state.set(next);
                }
                StateProj::Ready { svc, req } => {
                    let s = svc
                        .as_mut()
                        .expect("ResponseFuture polled after completion");
                    match s.poll_ready(cx) {
                        Poll::Ready(Ok(())) => {
                            let req = req.take().expect("ResponseFuture polled after completion");
                            let fut = s.call(req);
                            this.state.set(State::Called { fut });
                            continue;
                        }
                        Poll::Ready(Err(e)) => {
                            // Final: the clone is dropped, never polled again.
                            if let Some(p) = this.permit.take() {
                                let verdict = p.classify_error(&e);
                                p.complete(verdict);
                            }
                            if let Some(next) = primary_failed(this.shared, this.replay, &e) {
                                this.timer.set(None);
                                this.state.set(next);
                                continue;
                            }
                            this.state.set(State::Done);
                            return Poll::Ready(Err(e));
                        }
                        Poll::Pending => {}
                    }
                    if let Some(err) = poll_timers(this.permit, this.timer.as_mut(), this.probe, cx)
                    {
                        if let Some(next) = primary_timed_out(this.shared, this.replay) {
                            this.state.set(next);
                            continue;
                        }
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(err.to_response()));
                    }
                    return Poll::Pending;
                }
                StateProj::Called { fut } => {
                    match fut.poll(cx) {
                        Poll::Ready(Ok(res)) => {
                            if let Some(next) =
                                primary_answered(this.shared, this.replay, this.permit, &res)
                            {
                                drop(res);
                                this.timer.set(None);
                                this.state.set(next);
                                continue;
                            }
                            let out = head(this.permit.take(), res);
                            this.state.set(State::Done);
                            return Poll::Ready(Ok(out));
                        }
                        Poll::Ready(Err(e)) => {
                            if let Some(p) = this.permit.take() {
                                let verdict = p.classify_error(&e);
                                p.complete(verdict);
                            }
                            if let Some(next) = primary_failed(this.shared, this.replay, &e) {
                                this.timer.set(None);
                                this.state.set(next);
                                continue;
                            }
                            this.state.set(State::Done);
                            return Poll::Ready(Err(e));
                        }
                        Poll::Pending => {}
                    }
                    if let Some(err) = poll_timers(this.permit, this.timer.as_mut(), this.probe, cx)
                    {
                        if let Some(next) = primary_timed_out(this.shared, this.replay) {
                            this.state.set(next);
                            continue;
                        }
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(err.to_response()));
                    }
                    return Poll::Pending;
                }
                StateProj::Answer { err, local } => {
                    let err = err.take().expect("ResponseFuture polled after completion");
                    let res = if let Some(labels) = local {
                        refusal_response(&err, labels)
                    } else {
                        err.to_response()
                    };
                    this.state.set(State::Done);
                    return Poll::Ready(Ok(res));
                }
                StateProj::Degrade { walk } => {
                    let walk = walk.as_mut().project();
                    let shared = this
                        .shared
                        .as_deref()
                        .expect("a future walking the fallback chain holds the circuits");
                    return poll_chain(
                        shared,
                        this.inner,
                        this.fallback,
                        walk.step,
                        walk.timer,
                        walk.chain,
                        cx,
                    );
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}

/// The primary answered: the walk, when the answer is worth a fallback and a target may take
/// it (the permit is recorded here then).
fn primary_answered<S, SF, FS, FF, B, R>(
    shared: &Option<Arc<Shared>>,
    replay: &mut Option<Box<Replay>>,
    permit: &mut Option<Permit>,
    res: &Response<R>,
) -> Option<State<S, SF, FS, FF, B>> {
    replay.as_ref()?;
    let cfg = shared.as_deref()?.config();
    let code = answer_code(cfg, res)?;
    let reason = worthy(code)?;
    let (larger, policy) = sticky(reason, false, false);
    if !any_eligible(cfg, 0, larger, policy) {
        return None;
    }
    if let Some(p) = permit.take() {
        let verdict = p.classify(res);
        p.complete(verdict);
    }
    let cause = format!(
        "the primary answered with status {} ({})",
        res.status().as_u16(),
        code.as_str()
    );
    Some(walk_on(cfg, replay.take()?, cause, reason))
}

/// The primary failed to answer (its permit already recorded): the walk, with a chain of
/// targets and a replayable body.
fn primary_failed<S, SF, FS, FF, B, E: 'static>(
    shared: &Option<Arc<Shared>>,
    replay: &mut Option<Box<Replay>>,
    e: &E,
) -> Option<State<S, SF, FS, FF, B>> {
    replay.as_ref()?;
    let cfg = shared.as_deref()?.config();
    if !any_eligible(cfg, 0, false, false) {
        return None;
    }
    let cause = format!("the primary failed: {}", transport_cause(e));
    Some(walk_on(cfg, replay.take()?, cause, error_reason(e)))
}

/// The breaker's call timeout fired on the primary (its permit already recorded): the walk,
/// with a chain of targets and a replayable body.
fn primary_timed_out<S, SF, FS, FF, B>(
    shared: &Option<Arc<Shared>>,
    replay: &mut Option<Box<Replay>>,
) -> Option<State<S, SF, FS, FF, B>> {
    replay.as_ref()?;
    let cfg = shared.as_deref()?.config();
    if !any_eligible(cfg, 0, false, false) {
        return None;
    }
    let ms = cfg.call_timeout.map(millis).unwrap_or_default();
    let cause = format!("the primary did not answer within {ms} ms");
    Some(walk_on(
        cfg,
        replay.take()?,
        cause,
        FallbackReason::TimedOut,
    ))
}

/// The head of the inner service's answer: recorded now, unless it is a success with a body
/// still to come, whose outcome waits for the end of that body.
fn head<R: Body>(permit: Option<Permit>, res: Response<R>) -> Out<R> {
    let Some(mut p) = permit else {
        return wrap(res);
    };
    let verdict = p.classify(&res);
    if verdict == Verdict::Success && p.is_recorded() && !res.body().is_end_stream() {
        p.head_arrived();
        return res.map(|b| LayerBody::new(GuardedBody::guarded(b, p)));
    }
    p.complete(verdict);
    wrap(res)
}

/// Drives the probe and call timers of a call in flight. `Some` when the call timeout fired:
/// the call is given up on, with this answer.
fn poll_timers(
    permit: &mut Option<Permit>,
    mut timer: Pin<&mut Option<Sleep>>,
    probe: &mut bool,
    cx: &mut Context<'_>,
) -> Option<ApiError> {
    while let Some(t) = timer.as_mut().as_pin_mut() {
        if t.poll(cx).is_pending() {
            return None;
        }
        if *probe {
            // The probe is overdue: failed now; the call goes on to its own timeout, if any.
            *probe = false;
            match permit.as_mut().and_then(Permit::probe_overdue) {
                Some(next) => {
                    if let Some(t) = timer.as_mut().as_pin_mut() {
                        t.reset(next.at);
                    }
                }
                None => timer.set(None),
            }
            continue;
        }
        // The call timeout: give up on the upstream.
        timer.set(None);
        let p = permit.take()?;
        let err = p.config().map(timeout_error);
        p.end(End::CallTimedOut);
        return err;
    }
    None
}

/// The fallback chain's current step, pinned.
type StepOf<'a, S, F, B> = Pin<
    &'a mut Step<
        S,
        <S as Service<Request<LayerBody<B>>>>::Future,
        <F as Fallback<
            Request<LayerBody<B>>,
            <S as Service<Request<LayerBody<B>>>>::Response,
            <S as Service<Request<LayerBody<B>>>>::Error,
        >>::Service,
        <F as Fallback<
            Request<LayerBody<B>>,
            <S as Service<Request<LayerBody<B>>>>::Response,
            <S as Service<Request<LayerBody<B>>>>::Error,
        >>::Future,
        B,
    >,
>;

/// The key of a target's own circuit: its name, or for a model on the guarded upstream with
/// circuits per upstream and model, `upstream/model` (that model's own circuit).
fn target_key(cfg: &Config, t: &TargetStep, parts: &Parts) -> String {
    if let (None, false, Some(model), CircuitKey::UpstreamAndModel) =
        (&t.upstream, t.named, &t.model, &cfg.key_by)
    {
        let r = copy_request(parts, ());
        return format!("{}/{model}", upstream_of(cfg, &r));
    }
    t.name.to_string()
}

/// Whether the walk's timer (the deadline, or the target's call timeout) fired.
fn fired(timer: Pin<&mut Option<Sleep>>, cx: &mut Context<'_>) -> bool {
    timer.as_pin_mut().is_some_and(|t| t.poll(cx).is_ready())
}

/// The walk's timer fired during the current target's call: `Some` answer when it was the
/// deadline (the walk ends), `None` when it was the target's call timeout (the walk goes on).
fn timer_fired<R, B>(cfg: &Config, chain: &mut Chain<B>) -> Option<Out<R>> {
    let name = cfg.fallbacks[chain.current].name();
    if chain.timer_is_deadline {
        // Dropped: counted as its call's length says (a timeout only past the call timeout).
        drop(chain.permit.take());
        chain.event(cfg, name, FallbackOutcome::OutOfTime);
        chain.causes.push(format!(
            "fallback '{name}' did not answer before the deadline"
        ));
        return Some(chain.exhausted(cfg, ErrorCode::Timeout));
    }
    if let Some(p) = chain.permit.take() {
        p.end(End::CallTimedOut);
    }
    chain.event(cfg, name, FallbackOutcome::Failed);
    let ms = cfg.call_timeout.map(millis).unwrap_or_default();
    chain.causes.push(format!(
        "fallback '{name}' failed: no answer within {ms} ms"
    ));
    chain.moved_on(FallbackReason::TimedOut);
    None
}

/// A step whose service is not ready or whose call has not answered: `Pending` while neither
/// the walk's timer nor anything else says otherwise, else `Some` answer that ends the walk or
/// `None` to go to the next step (see [`timer_fired`]).
fn waiting<R, B>(
    walk: bool,
    timer: Pin<&mut Option<Sleep>>,
    cfg: &Config,
    chain: &mut Chain<B>,
    cx: &mut Context<'_>,
) -> Poll<Option<Out<R>>> {
    if !(walk && fired(timer, cx)) {
        return Poll::Pending;
    }
    Poll::Ready(timer_fired(cfg, chain))
}

/// Walks the fallback chain: one step at a time, each driven ready before it is called.
fn poll_chain<S, F, B, ResBody>(
    shared: &Shared,
    inner: &mut Option<S>,
    fallback: &mut Option<F>,
    mut step: StepOf<'_, S, F, B>,
    mut timer: Pin<&mut Option<Sleep>>,
    chain: &mut Chain<B>,
    cx: &mut Context<'_>,
) -> Poll<Result<Out<ResBody>, S::Error>>
where
    S: Service<Request<LayerBody<B>>, Response = Response<ResBody>> + Clone,
    S::Error: 'static,
    F: Fallback<Request<LayerBody<B>>, Response<ResBody>, S::Error> + Clone,
    B: Body,
    B::Error: Into<BoxError>,
    ResBody: Body,
{
    let cfg = shared.config();
    let walk = cfg.walk_on_answer;
    loop {
        match step.as_mut().project() {
            StepProj::Buffering { buf } => match ready!(buf.poll(cx)) {
                Ok((parts, bytes)) => {
                    chain.source = Source::Buffered(parts, bytes);
                    step.set(Step::Next);
                }
                Err((_, e)) => return Poll::Ready(Ok(e.to_api_error().to_response())),
            },
            StepProj::Next => {
                timer.set(None);
                if chain.next >= cfg.fallbacks.len() {
                    chain.next = usize::MAX;
                    return Poll::Ready(Ok(chain.exhausted(cfg, ErrorCode::ServiceUnavailable)));
                }
                chain.current = chain.next;
                chain.next += 1;
                let fb = &cfg.fallbacks[chain.current];
                if walk {
                    if !eligible(fb, chain.need_larger, chain.need_policy) {
                        continue;
                    }
                    let name = fb.name();
                    if chain.deadline.is_some_and(|d| Instant::now() >= d) {
                        chain.event(cfg, name, FallbackOutcome::OutOfTime);
                        chain.causes.push(format!(
                            "the deadline passed before fallback '{name}' was tried"
                        ));
                        return Poll::Ready(Ok(chain.exhausted(cfg, ErrorCode::Timeout)));
                    }
                    let Some(t) = fb.target() else {
                        if let FallbackStep::Static {
                            status,
                            headers,
                            body,
                            ..
                        } = fb
                        {
                            let mut res = Response::new(LayerBody::full(body.clone()));
                            *res.status_mut() = *status;
                            *res.headers_mut() = headers.clone();
                            return Poll::Ready(Ok(chain.served(cfg, name, res)));
                        }
                        continue;
                    };
                    let Source::Buffered(parts, bytes) = &chain.source else {
                        continue;
                    };
                    // The target's service: the guarded one, or another upstream's.
                    let (own, other) = match t.service {
                        None if inner.is_none() => continue,
                        None => (inner.clone(), None),
                        Some(i) => match fallback.as_ref().and_then(|f| f.service(i)) {
                            Some(s) => (None, Some(s)),
                            None => {
                                chain.event(cfg, name, FallbackOutcome::NotBound);
                                chain.causes.push(format!(
                                    "fallback '{name}' names an upstream no service is bound to"
                                ));
                                continue;
                            }
                        },
                    };
                    let body = match &t.model {
                        Some(model) => match rewrite_model(bytes, model) {
                            Ok(b) => Some(b),
                            Err(why) => {
                                chain.event(cfg, name, FallbackOutcome::Failed);
                                chain
                                    .causes
                                    .push(format!("fallback '{name}' failed: {why}"));
                                continue;
                            }
                        },
                        None => None,
                    };
                    let circuit = shared.circuit(&target_key(cfg, &t, parts));
                    match circuit.admit() {
                        Ok(p) => chain.permit = Some(p),
                        Err(_) => {
                            chain.event(cfg, name, FallbackOutcome::CircuitOpen);
                            chain
                                .causes
                                .push(format!("the circuit for '{name}' is open too"));
                            continue;
                        }
                    }
                    let req = match body {
                        Some(body) => {
                            let len = body.len();
                            let mut req = copy_request(parts, LayerBody::full(body));
                            req.headers_mut()
                                .insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
                            // The parsed view names the old model; later layers parse the
                            // new body.
                            req.extensions_mut().remove::<RequestView>();
                            req
                        }
                        None => copy_request(parts, LayerBody::full(bytes.clone())),
                    };
                    match other {
                        Some(svc) => step.set(Step::FallbackReady {
                            svc: Some(svc),
                            req: Some(req),
                        }),
                        None => step.set(Step::InnerReady {
                            svc: own,
                            req: Some(req),
                        }),
                    }
                    // The walk's deadline or the target's call timeout, whichever is first.
                    let call_at = cfg.call_timeout.and_then(|d| Instant::now().checked_add(d));
                    let (at, is_deadline) = match (chain.deadline, call_at) {
                        (Some(d), Some(c)) if c < d => (Some(c), false),
                        (Some(d), _) => (Some(d), true),
                        (None, c) => (c, false),
                    };
                    chain.timer_is_deadline = is_deadline;
                    if let Some(at) = at {
                        if tokio::runtime::Handle::try_current().is_ok() {
                            timer.set(Some(tokio::time::sleep_until(at)));
                        }
                    }
                    continue;
                }
                match fb {
                    FallbackStep::Static {
                        status,
                        headers,
                        body,
                        ..
                    } => {
                        let mut res = Response::new(LayerBody::full(body.clone()));
                        *res.status_mut() = *status;
                        *res.headers_mut() = headers.clone();
                        if let Some(res) = chain.settle(cfg, Ok(res)) {
                            return Poll::Ready(Ok(res));
                        }
                    }
                    FallbackStep::Service { index, .. } => {
                        let req = match &mut chain.source {
                            Source::Whole(r) => match r.take() {
                                Some(r) => r,
                                None => continue,
                            },
                            Source::Buffered(parts, bytes) => {
                                copy_request(parts, LayerBody::full(bytes.clone()))
                            }
                            Source::Reading => continue,
                        };
                        step.set(Step::FallbackReady {
                            svc: fallback.as_ref().and_then(|f| f.service(*index)),
                            req: Some(req),
                        });
                    }
                    FallbackStep::Model { model } => {
                        let Source::Buffered(parts, bytes) = &chain.source else {
                            continue;
                        };
                        // With circuits per model, a backup model whose own circuit is open
                        // is skipped.
                        let backup_key = match cfg.key_by {
                            CircuitKey::Model => Some(model.to_string()),
                            CircuitKey::UpstreamAndModel => {
                                let r = copy_request(parts, ());
                                Some(format!("{}/{model}", upstream_of(cfg, &r)))
                            }
                            _ => None,
                        };
                        if let Some(c) = backup_key.and_then(|k| shared.get(&k)) {
                            if c.open_remaining().is_some() {
                                chain
                                    .causes
                                    .push(format!("the circuit for '{model}' is open too"));
                                continue;
                            }
                        }
                        let body = match rewrite_model(bytes, model) {
                            Ok(b) => b,
                            Err(why) => {
                                chain
                                    .causes
                                    .push(format!("fallback '{model}' failed: {why}"));
                                continue;
                            }
                        };
                        let len = body.len();
                        let mut req = copy_request(parts, LayerBody::full(body));
                        req.headers_mut()
                            .insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
                        // The parsed view names the old model; later layers parse the new body.
                        req.extensions_mut().remove::<RequestView>();
                        step.set(Step::InnerReady {
                            svc: inner.clone(),
                            req: Some(req),
                        });
                    }
                    // Only in a chain with targets, walked above.
                    FallbackStep::Target(_) => continue,
                }
            }
            StepProj::InnerReady { svc, req } => {
                let Some(s) = svc.as_mut() else {
                    step.set(Step::Next);
                    continue;
                };
                match s.poll_ready(cx) {
                    Poll::Ready(Ok(())) => {
                        let fut = s.call(req.take().expect("a step's request is sent once"));
                        step.set(Step::InnerCall { fut });
                    }
                    Poll::Ready(Err(e)) => {
                        chain.not_ready::<ResBody, _>(cfg, walk, &e);
                        step.set(Step::Next);
                    }
                    Poll::Pending => {
                        if let Some(res) = ready!(waiting(walk, timer.as_mut(), cfg, chain, cx)) {
                            return Poll::Ready(Ok(res));
                        }
                        step.set(Step::Next);
                    }
                }
            }
            StepProj::InnerCall { fut } => match fut.poll(cx) {
                Poll::Ready(out) => {
                    if let Some(res) = chain.call_answered(cfg, walk, out) {
                        return Poll::Ready(Ok(res));
                    }
                    step.set(Step::Next);
                }
                Poll::Pending => {
                    if let Some(res) = ready!(waiting(walk, timer.as_mut(), cfg, chain, cx)) {
                        return Poll::Ready(Ok(res));
                    }
                    step.set(Step::Next);
                }
            },
            StepProj::FallbackReady { svc, req } => {
                let Some(s) = svc.as_mut() else {
                    step.set(Step::Next);
                    continue;
                };
                match s.poll_ready(cx) {
                    Poll::Ready(Ok(())) => {
                        let fut = s.call(req.take().expect("a step's request is sent once"));
                        step.set(Step::FallbackCall { fut });
                    }
                    Poll::Ready(Err(e)) => {
                        chain.not_ready::<ResBody, _>(cfg, walk, &e);
                        step.set(Step::Next);
                    }
                    Poll::Pending => {
                        if let Some(res) = ready!(waiting(walk, timer.as_mut(), cfg, chain, cx)) {
                            return Poll::Ready(Ok(res));
                        }
                        step.set(Step::Next);
                    }
                }
            }
            StepProj::FallbackCall { fut } => match fut.poll(cx) {
                Poll::Ready(out) => {
                    if let Some(res) = chain.call_answered(cfg, walk, out) {
                        return Poll::Ready(Ok(res));
                    }
                    step.set(Step::Next);
                }
                Poll::Pending => {
                    if let Some(res) = ready!(waiting(walk, timer.as_mut(), cfg, chain, cx)) {
                        return Poll::Ready(Ok(res));
                    }
                    step.set(Step::Next);
                }
            },
        }
    }
}
