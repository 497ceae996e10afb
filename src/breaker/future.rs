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
use tokio::time::Sleep;
use tower_service::Service;

use super::body::GuardedBody;
use super::circuit::{head_verdict, Circuit, End, Permit, Refusal, Timer, Verdict};
use super::config::{millis, CircuitKey, Config, FallbackStep};
use super::events::{emit, BreakerEvent};
use super::fallback::Fallback;
use super::registry::Shared;
use super::service::{
    circuit_for, copy_request, mark, note_rejection, refusal_error, refusal_response,
    rewrite_model, upstream_of,
};
use crate::body::{BoxError, BufferRequest, LayerBody};
use crate::error::{ApiError, ErrorCode};
use crate::request::{EnsureView, RequestView};

/// The breaker's response type for an inner body `B`.
type Out<B> = Response<LayerBody<GuardedBody<B>>>;

pin_project! {
    #[project = StateProj]
    enum State<S, SF, F, FF, B> {
        // Reading the model from the body.
        // Boxed (the request is being read and parsed anyway): the future of an admitted call
        // stays small.
        View { view: Pin<Box<EnsureView<B>>> },
        // Admitted (or unguarded): driving the call's clone of the inner service ready.
        Ready { svc: Option<S>, req: Option<Request<LayerBody<B>>> },
        // The inner call.
        Called { #[pin] fut: SF },
        // An answer of the breaker's own: a refusal (`local`), a body over the limit.
        Answer { err: Option<ApiError>, local: bool },
        // Refused, with a fallback chain: boxed, so that the future an admitted call moves
        // around stays small (the chain is the rare path, and the largest state).
        Degrade { walk: Pin<Box<Walk<S, SF, F, FF, B>>> },
        Done,
    }
}

pin_project! {
    // The fallback chain's state: the step in progress and where the chain stands.
    struct Walk<S, SF, F, FF, B> {
        #[pin]
        step: Step<S, SF, F, FF, B>,
        chain: Chain<B>,
    }
}

pin_project! {
    #[project = StepProj]
    enum Step<S, SF, F, FF, B> {
        // Reading the body once, for the steps that replay or rewrite it.
        Buffering { #[pin] buf: BufferRequest<B> },
        // Choosing the next step.
        Next,
        InnerReady { svc: Option<S>, req: Option<Request<LayerBody<B>>> },
        InnerCall { #[pin] fut: SF },
        FallbackReady { svc: Option<F>, req: Option<Request<LayerBody<B>>> },
        FallbackCall { #[pin] fut: FF },
    }
}

/// Where the fallback chain stands.
struct Chain<B> {
    circuit: Arc<Circuit>,
    refusal: Refusal,
    /// The step tried now; the next one to try.
    current: usize,
    next: usize,
    causes: Vec<String>,
    source: Source<B>,
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
        state: State<S, S::Future, F, F::Future, B>,
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
    Refuse(ApiError),
    Degrade(Arc<Circuit>, Refusal, Request<LayerBody<B>>),
}

fn decide<B>(shared: &Shared, circuit: Arc<Circuit>, req: Request<LayerBody<B>>) -> Decision<B> {
    match circuit.admit() {
        Ok(permit) => Decision::Pass(permit, req),
        Err(refusal) => {
            let cfg = shared.config();
            note_rejection(cfg, &circuit, refusal);
            if cfg.fallbacks.is_empty() {
                Decision::Refuse(refusal_error(cfg, &circuit.key, refusal))
            } else {
                Decision::Degrade(circuit, refusal, req)
            }
        }
    }
}

/// The first state of the fallback chain: the body is read first when a step replays or
/// rewrites it.
fn degrade<S, SF, F, FF, B: Body>(
    cfg: &Config,
    circuit: Arc<Circuit>,
    refusal: Refusal,
    req: Request<LayerBody<B>>,
) -> State<S, SF, F, FF, B> {
    let steps = &cfg.fallbacks;
    let consuming = steps
        .iter()
        .filter(|s| !matches!(s, FallbackStep::Static { .. }))
        .count();
    let needs_bytes = consuming > 1
        || steps
            .iter()
            .any(|s| matches!(s, FallbackStep::Model { .. }));
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
    State::Degrade {
        walk: Box::pin(Walk {
            step,
            chain: Chain {
                circuit,
                refusal,
                current: 0,
                next: 0,
                causes: Vec::new(),
                source,
            },
        }),
    }
}

impl<B> Chain<B> {
    /// The outcome of the current step: its answer when it served the call, else `None`
    /// (its failure noted) to go on with the next step.
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
        emit(
            &cfg.on_event,
            BreakerEvent::Fallback {
                name: cfg.name.clone(),
                key: self.circuit.key.clone(),
                fallback: Arc::from(name),
                ok: result.is_ok(),
            },
        );
        match result {
            Ok(res) => {
                self.circuit
                    .counters
                    .fallbacks
                    .fetch_add(1, Ordering::Relaxed);
                Some(mark(res, name))
            }
            Err(why) => {
                self.causes.push(format!("fallback '{name}' failed: {why}"));
                None
            }
        }
    }

    /// Every step failed: `503` naming the open circuit and each step's failure.
    fn exhausted<R>(&self, cfg: &Config) -> Out<R> {
        let base = refusal_error(cfg, &self.circuit.key, self.refusal);
        let mut err = ApiError::new(
            ErrorCode::ServiceUnavailable,
            format!("{} {}.", base.message(), self.causes.join("; ")),
        );
        err.set_retry_after(base.retry_after());
        refusal_response(&err)
    }
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
    fn new(shared: Option<Arc<Shared>>, state: State<S, S::Future, F, F::Future, B>) -> Self {
        ResponseFuture {
            state,
            shared,
            inner: None,
            fallback: None,
            permit: None,
            timer: None,
            probe: false,
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
        match decide(shared, circuit, req) {
            Decision::Pass(permit, req) => {
                let (timer, probe) = sleep(permit.timer());
                let mut fut = Self::new(
                    None,
                    State::Ready {
                        svc: Some(inner),
                        req: Some(req),
                    },
                );
                fut.permit = Some(permit);
                fut.timer = timer;
                fut.probe = probe;
                fut
            }
            Decision::Refuse(err) => Self::new(
                None,
                State::Answer {
                    err: Some(err),
                    local: true,
                },
            ),
            Decision::Degrade(circuit, refusal, req) => {
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
                        Ok(req) => match circuit_for(shared, &req) {
                            // No model in the body (or no body): unguarded.
                            None => State::Ready {
                                svc: this.inner.take(),
                                req: Some(req),
                            },
                            Some(circuit) => match decide(shared, circuit, req) {
                                Decision::Pass(permit, req) => {
                                    let (timer, probe) = sleep(permit.timer());
                                    *this.permit = Some(permit);
                                    this.timer.set(timer);
                                    *this.probe = probe;
                                    State::Ready {
                                        svc: this.inner.take(),
                                        req: Some(req),
                                    }
                                }
                                Decision::Refuse(err) => State::Answer {
                                    err: Some(err),
                                    local: true,
                                },
                                Decision::Degrade(circuit, refusal, req) => {
                                    degrade(shared.config(), circuit, refusal, req)
                                }
                            },
                        },
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
                                local: false,
                            },
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
                            this.state.set(State::Done);
                            return Poll::Ready(Err(e));
                        }
                        Poll::Pending => {}
                    }
                    if let Some(err) = poll_timers(this.permit, this.timer.as_mut(), this.probe, cx)
                    {
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(err.to_response()));
                    }
                    return Poll::Pending;
                }
                StateProj::Called { fut } => {
                    match fut.poll(cx) {
                        Poll::Ready(Ok(res)) => {
                            let out = head(this.permit.take(), res);
                            this.state.set(State::Done);
                            return Poll::Ready(Ok(out));
                        }
                        Poll::Ready(Err(e)) => {
                            if let Some(p) = this.permit.take() {
                                let verdict = p.classify_error(&e);
                                p.complete(verdict);
                            }
                            this.state.set(State::Done);
                            return Poll::Ready(Err(e));
                        }
                        Poll::Pending => {}
                    }
                    if let Some(err) = poll_timers(this.permit, this.timer.as_mut(), this.probe, cx)
                    {
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(err.to_response()));
                    }
                    return Poll::Pending;
                }
                StateProj::Answer { err, local } => {
                    let err = err.take().expect("ResponseFuture polled after completion");
                    let res = if *local {
                        refusal_response(&err)
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
                        walk.chain,
                        cx,
                    );
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
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
        F,
        <F as Fallback<
            Request<LayerBody<B>>,
            <S as Service<Request<LayerBody<B>>>>::Response,
            <S as Service<Request<LayerBody<B>>>>::Error,
        >>::Future,
        B,
    >,
>;

/// Walks the fallback chain: one step at a time, each driven ready before it is called.
fn poll_chain<S, F, B, ResBody>(
    shared: &Shared,
    inner: &mut Option<S>,
    fallback: &mut Option<F>,
    mut step: StepOf<'_, S, F, B>,
    chain: &mut Chain<B>,
    cx: &mut Context<'_>,
) -> Poll<Result<Out<ResBody>, S::Error>>
where
    S: Service<Request<LayerBody<B>>, Response = Response<ResBody>> + Clone,
    S::Error: 'static,
    F: Fallback<Request<LayerBody<B>>, Response<ResBody>, S::Error> + Clone,
    B: Body,
    B::Error: Into<BoxError>,
{
    let cfg = shared.config();
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
                if chain.next >= cfg.fallbacks.len() {
                    chain.next = usize::MAX;
                    return Poll::Ready(Ok(chain.exhausted(cfg)));
                }
                chain.current = chain.next;
                chain.next += 1;
                match &cfg.fallbacks[chain.current] {
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
                    FallbackStep::Service { .. } => {
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
                            svc: fallback.clone(),
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
                }
            }
            StepProj::InnerReady { svc, req } => {
                let Some(s) = svc.as_mut() else {
                    step.set(Step::Next);
                    continue;
                };
                match ready!(s.poll_ready(cx)) {
                    Ok(()) => {
                        let fut = s.call(req.take().expect("a step's request is sent once"));
                        step.set(Step::InnerCall { fut });
                    }
                    Err(e) => {
                        let why = transport_cause(&e);
                        let _ = chain.settle::<ResBody>(cfg, Err(why));
                        step.set(Step::Next);
                    }
                }
            }
            StepProj::InnerCall { fut } => {
                let out = ready!(fut.poll(cx))
                    .map(wrap)
                    .map_err(|e| transport_cause(&e));
                if let Some(res) = chain.settle(cfg, out) {
                    return Poll::Ready(Ok(res));
                }
                step.set(Step::Next);
            }
            StepProj::FallbackReady { svc, req } => {
                let Some(s) = svc.as_mut() else {
                    step.set(Step::Next);
                    continue;
                };
                match ready!(s.poll_ready(cx)) {
                    Ok(()) => {
                        let fut = s.call(req.take().expect("a step's request is sent once"));
                        step.set(Step::FallbackCall { fut });
                    }
                    Err(e) => {
                        let why = transport_cause(&e);
                        let _ = chain.settle::<ResBody>(cfg, Err(why));
                        step.set(Step::Next);
                    }
                }
            }
            StepProj::FallbackCall { fut } => {
                let out = ready!(fut.poll(cx))
                    .map(wrap)
                    .map_err(|e| transport_cause(&e));
                if let Some(res) = chain.settle(cfg, out) {
                    return Poll::Ready(Ok(res));
                }
                step.set(Step::Next);
            }
        }
    }
}
