//! What the suite measures inside the stack: calls and in-flight counts at two points, and a
//! mirror of every circuit's window that checks each transition the breaker reports.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use http::{Request, Response};
use http_body::Frame;
use llm_layers::breaker::{BreakerEvent, CircuitState, TransitionReason};
use llm_layers::classify::code_for_status;
use llm_layers::error::ApiError;
use llm_layers::request::RequestView;
use tokio::time::Instant;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

// ---------------------------------------------------------------------------------------------
// Calls and in-flight counts.

/// Calls made through one point of the stack, and how many are in flight (a call is in flight
/// from `call` until its response body is dropped, or its future if no response came).
#[derive(Default)]
pub struct Counter {
    calls: AtomicU64,
    current: AtomicI64,
    peak: AtomicI64,
}

impl Counter {
    /// Calls so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Calls in flight now.
    pub fn current(&self) -> i64 {
        self.current.load(Ordering::SeqCst)
    }

    /// The most calls in flight at once.
    pub fn peak(&self) -> i64 {
        self.peak.load(Ordering::SeqCst)
    }

    fn enter(self: &Arc<Self>) -> Guard {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let now = self.current.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        Guard(self.clone())
    }
}

struct Guard(Arc<Counter>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.current.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its call counted as in flight until it is dropped.
struct Guarded {
    inner: Body,
    _guard: Guard,
}

impl http_body::Body for Guarded {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<bytes::Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

thread_local! {
    /// Set while the counting layer just outside the breaker is inside the breaker's `call`:
    /// a call that reaches the [`Observed`] layer then is one the breaker admitted on its
    /// circuit (the breaker calls from its future, so its polls are marked too). A model
    /// fallback's call carries no parsed view and is recorded nowhere.
    static IN_BREAKER_CALL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Counts the calls that pass (see [`Counter`]).
#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    counter: Arc<Counter>,
    marks_breaker_call: bool,
}

/// The layer of [`Counted`].
#[derive(Clone)]
pub struct CountLayer {
    counter: Arc<Counter>,
    marks_breaker_call: bool,
}

impl CountLayer {
    /// Counts calls into the layer below.
    pub fn new(counter: Arc<Counter>) -> CountLayer {
        CountLayer {
            counter,
            marks_breaker_call: false,
        }
    }

    /// Counts calls into the breaker, and marks the breaker's `call` for [`Observed`].
    pub fn around_breaker(counter: Arc<Counter>) -> CountLayer {
        CountLayer {
            counter,
            marks_breaker_call: true,
        }
    }
}

impl<S> tower::Layer<S> for CountLayer {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Counted<S> {
        Counted {
            inner,
            counter: self.counter.clone(),
            marks_breaker_call: self.marks_breaker_call,
        }
    }
}

impl<S, B> tower::Service<Request<B>> for Counted<S>
where
    S: tower::Service<Request<B>, Response = Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let guard = self.counter.enter();
        let marks = self.marks_breaker_call;
        let mark = move |on: bool| {
            if marks {
                IN_BREAKER_CALL.with(|f| f.set(on));
            }
        };
        mark(true);
        let mut fut = Box::pin(self.inner.call(req));
        mark(false);
        // The breaker calls the inner service from its future (once the circuit admitted the
        // call and the inner service is ready): its polls are within the breaker's call too.
        let fut = std::future::poll_fn(move |cx| {
            mark(true);
            let out = fut.as_mut().poll(cx);
            mark(false);
            out
        });
        Box::pin(async move {
            let res = fut.await?;
            Ok(res.map(|b| {
                Body::new(Guarded {
                    inner: b,
                    _guard: guard,
                })
            }))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The breaker's mirror.

/// The breaker settings the mirror checks transitions against.
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    /// Calls in the count window.
    pub window: u32,
    /// Calls before any decision.
    pub minimum_calls: u32,
    /// Failure rate that opens, in percent.
    pub failure_rate: f64,
    /// Probes in half-open.
    pub probes: u32,
    /// How long a probe may take before it counts as failed.
    pub probe_timeout: Duration,
}

#[derive(Default)]
struct KeyState {
    /// Transitions seen so far (the breaker's epoch for this circuit).
    epoch: u32,
    /// The last `len` recorded outcomes of this epoch, newest in bit 0 (1 = failure).
    bits: u32,
    len: u32,
    successes: u32,
    failures: u32,
    /// Calls of this epoch dropped before they answered (cut by a timeout outside the breaker,
    /// or a client gone): the breaker may count them as failed or not at all.
    drops: u32,
    /// The last call of this epoch failed, or was dropped.
    last_failure: bool,
    opened_at: Option<Instant>,
    open_for: Duration,
    half_open_at: Option<Instant>,
}

#[derive(Default)]
struct MirrorState {
    keys: HashMap<u64, KeyState>,
    transitions: BTreeMap<(&'static str, &'static str, &'static str), u64>,
    verified: u64,
    unknown_keys: u64,
    rejections: u64,
    fallbacks_ok: u64,
    fallbacks_failed: u64,
    opened: BTreeMap<&'static str, u64>,
    violations: Vec<String>,
    violation_count: u64,
}

/// Keeps, per circuit key, the outcomes the breaker should have recorded (calls admitted in
/// the current epoch, caller faults left out), and checks each reported transition against the
/// thresholds: an opening on the failure rate needs `minimum_calls` calls in the window and
/// `failure_rate` percent of them failed; a probe failure needs a failed probe; closing needs
/// `probes` successful probes; half-open comes after the open time.
pub struct Mirror {
    t: Thresholds,
    watched: &'static [&'static str],
    state: Mutex<MirrorState>,
}

fn hash_key(key: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

fn reason_str(r: TransitionReason) -> &'static str {
    match r {
        TransitionReason::FailureRate => "failure_rate",
        TransitionReason::SlowCallRate => "slow_call_rate",
        TransitionReason::OpenElapsed => "open_elapsed",
        TransitionReason::ProbeFailed => "probe_failed",
        TransitionReason::ProbeTimedOut => "probe_timed_out",
        TransitionReason::ProbeDropped => "probe_dropped",
        TransitionReason::ProbesSucceeded => "probes_succeeded",
        TransitionReason::Reset => "reset",
        _ => "other",
    }
}

impl Mirror {
    /// A mirror for these thresholds; `watched` models get their openings counted by name.
    /// `capacity` keys are reserved up front, so that the mirror's own bookkeeping does not
    /// count as memory the stack kept.
    pub fn new(t: Thresholds, watched: &'static [&'static str], capacity: usize) -> Mirror {
        let state = MirrorState {
            keys: HashMap::with_capacity(capacity),
            violations: Vec::with_capacity(32),
            ..Default::default()
        };
        Mirror {
            t,
            watched,
            state: Mutex::new(state),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MirrorState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn violation(st: &mut MirrorState, msg: String) {
        st.violation_count += 1;
        if st.violations.len() < 20 {
            st.violations.push(msg);
        }
    }

    /// A call the breaker admitted for `model`: its key and the epoch it was admitted in.
    fn admit(&self, model: &str) -> (u64, u32) {
        let h = hash_key(model);
        let mut st = self.lock();
        let epoch = st.keys.entry(h).or_default().epoch;
        (h, epoch)
    }

    /// A call admitted in `epoch` was dropped before it answered.
    fn dropped(&self, (h, epoch): (u64, u32)) {
        let mut st = self.lock();
        if let Some(k) = st.keys.get_mut(&h) {
            if k.epoch == epoch {
                k.drops += 1;
                k.last_failure = true;
            }
        }
    }

    fn record(&self, (h, epoch): (u64, u32), outcome: Outcome) {
        let failure = match outcome {
            Outcome::Ignored => return,
            Outcome::Failure => true,
            Outcome::Success => false,
        };
        let window = self.t.window;
        let mut st = self.lock();
        let Some(k) = st.keys.get_mut(&h) else {
            return;
        };
        if k.epoch != epoch {
            return; // admitted before the last transition: the breaker drops it too
        }
        let mask = if window >= 32 {
            u32::MAX
        } else {
            (1 << window) - 1
        };
        k.bits = ((k.bits << 1) | failure as u32) & mask;
        k.len = (k.len + 1).min(window);
        k.last_failure = failure;
        if failure {
            k.failures += 1;
        } else {
            k.successes += 1;
        }
    }

    /// The breaker's event hook.
    pub fn on_event(&self, ev: &BreakerEvent) {
        let now = Instant::now();
        let mut st = self.lock();
        match ev {
            BreakerEvent::Rejected { .. } => st.rejections += 1,
            BreakerEvent::Fallback { ok, .. } => {
                if *ok {
                    st.fallbacks_ok += 1
                } else {
                    st.fallbacks_failed += 1
                }
            }
            BreakerEvent::StateChanged {
                key,
                from,
                to,
                reason,
                open_for,
                ..
            } => {
                *st.transitions
                    .entry((from.as_str(), to.as_str(), reason_str(*reason)))
                    .or_default() += 1;
                if *to == CircuitState::Open {
                    if let Some(name) = self.watched.iter().find(|w| **w == &**key) {
                        *st.opened.entry(name).or_default() += 1;
                    }
                }
                let h = hash_key(key);
                let t = self.t;
                let shown: String = key.chars().take(40).collect();
                let verdict = st.keys.get(&h).map(|k| match (from, to, reason) {
                        (CircuitState::Closed, CircuitState::Open, TransitionReason::FailureRate) => {
                            let window_mask = if k.len >= 32 { u32::MAX } else { (1u32 << k.len) - 1 };
                            let failures = (k.bits & window_mask).count_ones();
                            // Dropped calls counted as failures, as a breaker that sees them
                            // may: the most the window can hold.
                            let calls = (k.len + k.drops).min(t.window);
                            let failed = (failures + k.drops).min(calls);
                            let ok = calls >= t.minimum_calls
                                && failed as f64 * 100.0 >= t.failure_rate * calls as f64;
                            (ok, format!("{shown:?} opened with {failures} failures in {} answered calls, {} dropped (minimum {}, {} %)", k.len, k.drops, t.minimum_calls, t.failure_rate))
                        }
                        (CircuitState::HalfOpen, CircuitState::Open, TransitionReason::ProbeFailed) => (
                            (k.failures > 0 || k.drops > 0) && k.last_failure,
                            format!("{shown:?} re-opened on a failed probe, but its probes recorded {} failures and {} drops", k.failures, k.drops),
                        ),
                        // A probe its caller dropped (an outer attempt timeout) counts as failed.
                        (CircuitState::HalfOpen, CircuitState::Open, TransitionReason::ProbeDropped) => (
                            k.drops > 0,
                            format!("{shown:?} re-opened on a dropped probe, but no probe was dropped"),
                        ),
                        (CircuitState::HalfOpen, CircuitState::Open, TransitionReason::ProbeTimedOut) => {
                            let waited = k.half_open_at.map(|at| now - at);
                            (
                                waited.is_some_and(|w| w >= t.probe_timeout),
                                format!("{shown:?} re-opened on a probe timeout after {waited:?} half-open (probe timeout {:?})", t.probe_timeout),
                            )
                        }
                        (CircuitState::Open, CircuitState::HalfOpen, TransitionReason::OpenElapsed) => {
                            let waited = k.opened_at.map(|at| now - at);
                            (
                                waited.is_some_and(|w| w >= k.open_for),
                                format!("{shown:?} went half-open after {waited:?} open, open time {:?}", k.open_for),
                            )
                        }
                        (CircuitState::HalfOpen, CircuitState::Closed, TransitionReason::ProbesSucceeded) => (
                            k.failures == 0 && k.successes >= t.probes,
                            format!("{shown:?} closed after {} successful and {} failed probes ({} needed)", k.successes, k.failures, t.probes),
                        ),
                        _ => (false, format!("{shown:?}: unexpected transition {from} -> {to} ({reason:?})")),
                });
                match verdict {
                    None => st.unknown_keys += 1,
                    Some((true, _)) => st.verified += 1,
                    Some((false, msg)) => Self::violation(&mut st, msg),
                }
                let k = st.keys.entry(h).or_default();
                k.epoch += 1;
                k.bits = 0;
                k.len = 0;
                k.successes = 0;
                k.failures = 0;
                k.drops = 0;
                k.last_failure = false;
                match to {
                    CircuitState::Open => {
                        k.opened_at = Some(now);
                        k.open_for = open_for.unwrap_or_default();
                    }
                    CircuitState::HalfOpen => k.half_open_at = Some(now),
                    CircuitState::Closed => {}
                }
            }
            _ => {}
        }
    }

    /// What the mirror found.
    pub fn report(&self) -> MirrorReport {
        let st = self.lock();
        MirrorReport {
            transitions: st
                .transitions
                .iter()
                .map(|((f, t, r), n)| (format!("{f}->{t} ({r})"), *n))
                .collect(),
            verified: st.verified,
            unknown_keys: st.unknown_keys,
            rejections: st.rejections,
            fallbacks_ok: st.fallbacks_ok,
            fallbacks_failed: st.fallbacks_failed,
            opened: st.opened.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            violations: st.violations.clone(),
            violation_count: st.violation_count,
        }
    }
}

/// The mirror's findings.
#[derive(Debug, Clone)]
pub struct MirrorReport {
    pub transitions: BTreeMap<String, u64>,
    pub verified: u64,
    pub unknown_keys: u64,
    pub rejections: u64,
    pub fallbacks_ok: u64,
    pub fallbacks_failed: u64,
    pub opened: BTreeMap<String, u64>,
    pub violations: Vec<String>,
    pub violation_count: u64,
}

/// Sits just inside the breaker and feeds the [`Mirror`] what the breaker will record.
#[derive(Clone)]
pub struct Observed<S> {
    inner: S,
    mirror: Arc<Mirror>,
}

/// The layer of [`Observed`].
#[derive(Clone)]
pub struct ObserveLayer(pub Arc<Mirror>);

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observed<S>;

    fn layer(&self, inner: S) -> Observed<S> {
        Observed {
            inner,
            mirror: self.0.clone(),
        }
    }
}

/// What one call means for a circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Success,
    Failure,
    Ignored,
}

/// The outcome of a failure's code by the crate's one table (`trip_on_rate_limit` off).
fn outcome_for_code(code: llm_layers::ErrorCode, trip_on_rate_limit: bool) -> Outcome {
    if llm_layers::policy::FailureKind::of(code).counts_against_circuit(trip_on_rate_limit) {
        Outcome::Failure
    } else {
        Outcome::Ignored
    }
}

/// The breaker's default classification of an answer (`trip_on_rate_limit` off).
fn outcome_of<B>(res: &Response<B>) -> Outcome {
    if let Some(err) = res.extensions().get::<ApiError>() {
        return outcome_for_code(err.code(), false);
    }
    let status = res.status();
    if status.is_client_error() || status.is_server_error() {
        outcome_for_code(code_for_status(status), false)
    } else {
        Outcome::Success
    }
}

impl<S, B> tower::Service<Request<B>> for Observed<S>
where
    S: tower::Service<Request<B>, Response = Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // Only a call made from within the breaker's `call` is one it admitted and will record
        // (on the circuit of the model in the parsed view); a fallback call is recorded nowhere.
        let tag = if IN_BREAKER_CALL.with(|f| f.get()) {
            RequestView::from_extensions(req.extensions())
                .and_then(|v| v.model())
                .map(|m| self.mirror.admit(m))
        } else {
            None
        };
        let mut pending = Pending {
            mirror: self.mirror.clone(),
            tag,
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await?;
            if let Some(tag) = pending.tag.take() {
                let outcome = outcome_of(&res);
                // As the breaker does: a success is recorded when its body ends.
                if outcome == Outcome::Success && !http_body::Body::is_end_stream(res.body()) {
                    let mirror = pending.mirror.clone();
                    return Ok(res.map(|inner| {
                        Body::new(RecordAtEnd {
                            inner,
                            pending: Some((mirror, tag)),
                        })
                    }));
                }
                pending.mirror.record(tag, outcome);
            }
            Ok(res)
        })
    }
}

/// The body of a successful answer: the mirror records the call when it ends, as the breaker
/// does (a clean end a success, a body error a failure, a body dropped before its end
/// nothing).
struct RecordAtEnd {
    inner: Body,
    pending: Option<(Arc<Mirror>, (u64, u32))>,
}

impl http_body::Body for RecordAtEnd {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<bytes::Bytes>, axum::Error>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        // A stream the normalizer ended in-band names its failure in a trailer, as the
        // breaker reads it.
        let marked = match &frame {
            Some(Ok(f)) => f
                .trailers_ref()
                .and_then(llm_layers::policy::stream_error_in),
            _ => None,
        };
        let end = match (&frame, marked) {
            (_, Some(code)) => Some(outcome_for_code(code, false)),
            (None, None) => Some(Outcome::Success),
            (Some(Err(_)), None) => Some(Outcome::Failure),
            (Some(Ok(_)), None) if self.inner.is_end_stream() => Some(Outcome::Success),
            (Some(Ok(_)), None) => None,
        };
        if let Some(outcome) = end {
            if let Some((mirror, tag)) = self.pending.take() {
                mirror.record(tag, outcome);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A call that has not answered yet: dropped so, it tells the mirror.
struct Pending {
    mirror: Arc<Mirror>,
    tag: Option<(u64, u32)>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(tag) = self.tag.take() {
            self.mirror.dropped(tag);
        }
    }
}
