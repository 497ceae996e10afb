//! One circuit: state transitions and admission. Knows nothing of HTTP.
//!
//! The whole automatic state lives in one atomic word: the state (2 bits), the probe permits
//! left (16 bits) and an epoch (the rest) that changes on every transition. Admission in the
//! closed state is one atomic load; half-open probes are taken with compare-exchange on the
//! word, so exactly N are admitted however many callers race, and a permit always belongs to the
//! half-open period it was taken in. Transitions happen under a mutex that also guards the
//! window, held only for the record or the transition.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use super::config::{nanos, CircuitMode, Config, WindowKind};
use super::events::{emit, BreakerEvent, CircuitState, TransitionReason};
use super::window::{Consecutive, CountWindow, TimeWindow, Totals, Window};

const CLOSED: u64 = 0;
const OPEN: u64 = 1;
const HALF_OPEN: u64 = 2;
const PERMIT_SHIFT: u32 = 2;
const PERMIT_MASK: u64 = 0xFFFF << PERMIT_SHIFT;
const EPOCH_SHIFT: u32 = 18;

const fn state_of(w: u64) -> u64 {
    w & 0b11
}
const fn permits_of(w: u64) -> u64 {
    (w & PERMIT_MASK) >> PERMIT_SHIFT
}
const fn epoch_of(w: u64) -> u64 {
    w >> EPOCH_SHIFT
}
const fn pack(epoch: u64, permits: u64, state: u64) -> u64 {
    (epoch << EPOCH_SHIFT) | (permits << PERMIT_SHIFT) | state
}

/// What every circuit of a layer shares: the configuration, the clock's origin and the
/// layer-wide manual mode.
pub(crate) struct Common {
    pub(crate) config: Config,
    base: Instant,
    pub(crate) mode: AtomicU8,
    needs_start: bool,
}

impl Common {
    pub(crate) fn new(config: Config) -> Self {
        let needs_start = config.slow_call.is_some() || config.call_timeout.is_some();
        Common {
            config,
            base: Instant::now(),
            mode: AtomicU8::new(CircuitMode::Auto.to_u8()),
            needs_start,
        }
    }

    /// Nanoseconds since the layer was built, on tokio's clock (so paused time applies).
    pub(crate) fn now(&self) -> u64 {
        nanos(Instant::now().saturating_duration_since(self.base))
    }

    /// The instant `at` nanoseconds after the layer was built; `None` when it cannot be
    /// represented (a saturated duration: a deadline that is never reached).
    fn instant(&self, at: u64) -> Option<Instant> {
        if at == u64::MAX {
            return None;
        }
        self.base.checked_add(Duration::from_nanos(at))
    }

    fn open_duration(&self, reopenings: u32, rng: &mut fastrand::Rng) -> Duration {
        // In nanoseconds as f64: a product that overflows becomes infinite and is capped by
        // the maximum; `as u64` saturates, so no value the builder accepted can panic here.
        let c = &self.config;
        let base = nanos(c.open_duration) as f64;
        let max = nanos(c.max_open_duration) as f64;
        let grown = (base * c.backoff_multiplier.powi(reopenings.min(1024) as i32)).min(max);
        let factor = 1.0 + c.jitter * (2.0 * rng.f64() - 1.0);
        let ns = (grown * factor).clamp(1e6_f64.min(base), max);
        Duration::from_nanos(ns as u64)
    }
}

/// The timers of a circuit's state, for a snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Timers {
    /// Open: the time until the next call may go half-open (zero once it may).
    pub(crate) until_half_open: Option<Duration>,
    /// Open: how long this open period was set to last.
    pub(crate) open_for: Option<Duration>,
    /// Half-open: probe calls out.
    pub(crate) probes_out: u32,
    /// Half-open with probes out: the time until the newest one is overdue.
    pub(crate) probes_overdue_in: Option<Duration>,
}

/// Cumulative counters of one circuit.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) calls: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) slow: AtomicU64,
    pub(crate) ignored: AtomicU64,
    pub(crate) rejections: AtomicU64,
    pub(crate) fallbacks: AtomicU64,
    pub(crate) openings: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) dropped: AtomicU64,
}

struct Inner {
    window: Window,
    reopenings: u32,
    probe_successes: u32,
    rng: fastrand::Rng,
}

/// One circuit.
pub(crate) struct Circuit {
    pub(crate) common: Arc<Common>,
    pub(crate) key: Arc<str>,
    word: AtomicU64,
    open_until: AtomicU64,
    /// How long the current (or last) open period was set to last, in nanoseconds.
    open_for: AtomicU64,
    probe_deadline: AtomicU64,
    pub(crate) mode: AtomicU8,
    pub(crate) last_used: AtomicU64,
    /// When the registry last looked at this circuit for eviction (a `last_used` tick).
    pub(crate) seen: AtomicU64,
    pub(crate) counters: Counters,
    inner: Mutex<Inner>,
}

/// Why a call was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Open; the wait until probes are admitted.
    Open(Duration),
    /// Half-open with every probe out; the wait until an overdue probe frees its slot.
    Probing(Duration),
    /// Forced open by hand.
    Forced,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Normal,
    Probe,
    MetricsOnly,
    /// A probe already counted as failed by its timer: records nothing more.
    Spent,
}

/// What one call means for the circuit, once the policy's [`Outcome`](crate::policy::Outcome)
/// is read with [`FailureKind::counts_against_circuit`](crate::policy::FailureKind::counts_against_circuit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The upstream served the call.
    Success,
    /// The upstream failed the call: it counts towards opening.
    Failure,
    /// Neither (the caller's fault, a failure that says nothing of the upstream): not
    /// counted; a probe's slot is given back.
    Ignored,
}

impl Verdict {
    /// The verdict of the policy's `outcome`: a failure counts when its kind counts against
    /// a circuit (throttling only with `trip_on_rate_limit`).
    pub(crate) fn of(outcome: crate::policy::Outcome, trip_on_rate_limit: bool) -> Verdict {
        match outcome {
            crate::policy::Outcome::Success => Verdict::Success,
            crate::policy::Outcome::Failure { kind, .. }
                if kind.counts_against_circuit(trip_on_rate_limit) =>
            {
                Verdict::Failure
            }
            crate::policy::Outcome::Failure { .. } => Verdict::Ignored,
        }
    }
}

/// The verdict of the configured policy on a response head: the [`ApiError`](crate::ApiError)
/// an inner layer left in the extensions, else the status.
pub(crate) fn head_verdict<B>(cfg: &Config, res: &http::Response<B>) -> Verdict {
    use crate::policy::Classify;
    let outcome = cfg.policy.classify_response(
        res.status(),
        res.headers(),
        res.extensions().get::<crate::error::ApiError>(),
    );
    Verdict::of(outcome, cfg.trip_on_rate_limit)
}

/// How a call ended, for the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// It answered (the head, or for a success the end of its body); the verdict.
    Answered(Verdict),
    /// The breaker's call timeout fired (the caller gets a `504 timeout`).
    CallTimedOut,
    /// A probe passed its probe timeout; the call goes on, but counts as failed now.
    ProbeTimedOut,
    /// The caller dropped the call before its answer (a timeout outside, a disconnect).
    Dropped,
    /// The caller dropped a successful answer's body before its end: neither a success nor
    /// a failure (a probe's slot is given back).
    BodyDropped,
}

/// A timer a call in flight needs: when it fires, and what it means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timer {
    pub(crate) at: Instant,
    /// `true`: the probe timeout (the call goes on); `false`: the call timeout.
    pub(crate) probe: bool,
}

/// The right to make one call. Completed with [`Permit::end`]; dropped without it (the
/// caller went away before the answer), it counts as [`End::Dropped`].
pub(crate) struct Permit {
    circuit: Option<Arc<Circuit>>,
    epoch: u64,
    kind: Kind,
    start: u64,
    /// When the head of a successful answer arrived, once it did (`0` when no rule needs the
    /// time): the call's outcome waits for the end of its body, its slowness does not.
    head: Option<u64>,
}

impl Permit {
    /// A permit that records nothing (disabled, or no key).
    pub(crate) fn unrecorded() -> Self {
        Permit {
            circuit: None,
            epoch: 0,
            kind: Kind::Normal,
            start: 0,
            head: None,
        }
    }

    /// Whether this permit records anything.
    pub(crate) fn is_recorded(&self) -> bool {
        self.circuit.is_some()
    }

    /// The verdict on a response head, by the configured policy (`Ignored` when unrecorded).
    pub(crate) fn classify<B>(&self, res: &http::Response<B>) -> Verdict {
        match &self.circuit {
            Some(c) => head_verdict(&c.common.config, res),
            None => Verdict::Ignored,
        }
    }

    /// The verdict on a transport error of the inner service (`Err` from `poll_ready` or
    /// `call`): its code through [`policy::classify_error_ref`](crate::policy::classify_error_ref)
    /// (`timeout` or `service_unavailable`), so a failure.
    pub(crate) fn classify_error<E: 'static>(&self, err: &E) -> Verdict {
        match &self.circuit {
            Some(c) => {
                let code = crate::policy::classify_error_ref(err).code();
                Verdict::of(
                    crate::policy::Outcome::for_code(code),
                    c.common.config.trip_on_rate_limit,
                )
            }
            None => Verdict::Ignored,
        }
    }

    /// The head of a successful answer arrived: its slowness is measured now, its outcome
    /// waits for [`Permit::stream_end`] (or the drop of its body).
    pub(crate) fn head_arrived(&mut self) {
        if let Some(c) = &self.circuit {
            // The head's time serves only the slow-call rule.
            self.head = Some(if c.common.config.slow_call.is_some() {
                c.common.now()
            } else {
                0
            });
        }
    }

    /// The body of a successful answer ended: the policy's verdict on how.
    pub(crate) fn stream_end(self, end: &crate::policy::StreamEnd<'_>) {
        use crate::policy::Classify;
        let verdict = match &self.circuit {
            Some(c) => {
                let cfg = &c.common.config;
                Verdict::of(cfg.policy.classify_eos(end), cfg.trip_on_rate_limit)
            }
            None => return,
        };
        self.complete(verdict);
    }

    /// Records the call's verdict.
    pub(crate) fn complete(self, verdict: Verdict) {
        self.end(End::Answered(verdict));
    }

    /// Records how the call ended.
    pub(crate) fn end(mut self, end: End) {
        let Some(c) = self.circuit.take() else {
            return;
        };
        c.record(self.epoch, self.kind, self.start, self.head, end);
    }

    /// The first timer this call needs: the probe timeout for a probe, the call timeout when
    /// one is configured, whichever comes first. `None` for a call with neither, or with
    /// deadlines too far ahead to be reached.
    pub(crate) fn timer(&self) -> Option<Timer> {
        let c = self.circuit.as_ref()?;
        let cfg = &c.common.config;
        let call = cfg
            .call_timeout
            .map(|d| self.start.saturating_add(nanos(d)));
        let probe =
            (self.kind == Kind::Probe).then(|| self.start.saturating_add(nanos(cfg.probe_timeout)));
        let (at, probe) = match (probe, call) {
            (Some(p), Some(t)) if p < t => (p, true),
            (Some(p), None) => (p, true),
            (_, Some(t)) => (t, false),
            (None, None) => return None,
        };
        Some(Timer {
            at: c.common.instant(at)?,
            probe,
        })
    }

    /// The probe timer fired: the probe counts as failed now (re-opening the circuit), the
    /// call goes on and its answer is ignored. Returns the call timeout still to come.
    pub(crate) fn probe_overdue(&mut self) -> Option<Timer> {
        let c = self.circuit.clone()?;
        if self.kind != Kind::Probe {
            return None;
        }
        c.record(
            self.epoch,
            Kind::Probe,
            self.start,
            None,
            End::ProbeTimedOut,
        );
        self.kind = Kind::Spent;
        let at = self
            .start
            .saturating_add(nanos(c.common.config.call_timeout?));
        Some(Timer {
            at: c.common.instant(at)?,
            probe: false,
        })
    }

    /// The configuration of the circuit this permit belongs to.
    pub(crate) fn config(&self) -> Option<&Config> {
        self.circuit.as_ref().map(|c| &c.common.config)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(c) = self.circuit.take() {
            let end = if self.head.is_some() {
                End::BodyDropped
            } else {
                End::Dropped
            };
            c.record(self.epoch, self.kind, self.start, self.head, end);
        }
    }
}

impl Circuit {
    pub(crate) fn new(common: Arc<Common>, key: Arc<str>, index: u64) -> Self {
        let window = match common.config.window {
            WindowKind::Count(n) => Window::Count(CountWindow::new(n)),
            WindowKind::Time(d, b) => Window::Time(TimeWindow::new(d, b)),
            WindowKind::Consecutive(_) => Window::Consecutive(Consecutive::default()),
        };
        let seed = common
            .config
            .seed
            .wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        Circuit {
            common,
            key,
            word: AtomicU64::new(pack(0, 0, CLOSED)),
            open_until: AtomicU64::new(0),
            open_for: AtomicU64::new(0),
            probe_deadline: AtomicU64::new(0),
            mode: AtomicU8::new(CircuitMode::Auto.to_u8()),
            last_used: AtomicU64::new(0),
            seen: AtomicU64::new(0),
            counters: Counters::default(),
            inner: Mutex::new(Inner {
                window,
                reopenings: 0,
                probe_successes: 0,
                rng: fastrand::Rng::with_seed(seed),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic in a user hook never runs under this lock, but stay usable regardless.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The mode in force: the layer-wide one unless it is `Auto`, else this circuit's.
    pub(crate) fn effective_mode(&self) -> CircuitMode {
        let global = self.common.mode.load(Ordering::Relaxed);
        if global != 0 {
            return CircuitMode::from_u8(global);
        }
        CircuitMode::from_u8(self.mode.load(Ordering::Relaxed))
    }

    /// The automatic state as it stands.
    pub(crate) fn state(&self) -> CircuitState {
        match state_of(self.word.load(Ordering::Acquire)) {
            CLOSED => CircuitState::Closed,
            OPEN => CircuitState::Open,
            _ => CircuitState::HalfOpen,
        }
    }

    /// The wait until this circuit admits calls, when it is open now.
    pub(crate) fn open_remaining(&self) -> Option<Duration> {
        let w = self.word.load(Ordering::Acquire);
        if state_of(w) != OPEN {
            return None;
        }
        let now = self.common.now();
        let until = self.open_until.load(Ordering::Acquire);
        (now < until).then(|| Duration::from_nanos(until - now))
    }

    /// What a snapshot shows of the state word and its timers, read at `now` (nanoseconds
    /// on the layer's clock): no lock is taken.
    pub(crate) fn timers(&self, now: u64) -> Timers {
        let w = self.word.load(Ordering::Acquire);
        let open_for = self.open_for.load(Ordering::Relaxed);
        match state_of(w) {
            OPEN => {
                let until = self.open_until.load(Ordering::Acquire);
                Timers {
                    until_half_open: Some(Duration::from_nanos(until.saturating_sub(now))),
                    open_for: Some(Duration::from_nanos(open_for)),
                    probes_out: 0,
                    probes_overdue_in: None,
                }
            }
            HALF_OPEN => {
                let probes = u64::from(self.common.config.probes);
                let out = probes.saturating_sub(permits_of(w));
                let deadline = self.probe_deadline.load(Ordering::Acquire);
                Timers {
                    until_half_open: None,
                    open_for: None,
                    probes_out: u32::try_from(out).unwrap_or(u32::MAX),
                    probes_overdue_in: (out > 0)
                        .then(|| Duration::from_nanos(deadline.saturating_sub(now))),
                }
            }
            _ => Timers::default(),
        }
    }

    /// An active health check failed `failures` times in a row (`failures_to_open` is its
    /// threshold): a closed circuit opens once the run reaches the threshold, a half-open
    /// one opens again at once (the upstream still fails; the live probes out find the epoch
    /// changed and record nothing). An open circuit, or one under a manual mode, is left as
    /// it is. Returns whether the circuit opened.
    pub(crate) fn health_failed(&self, failures: u32, failures_to_open: u32) -> bool {
        if self.effective_mode() != CircuitMode::Auto {
            return false;
        }
        let w = self.word.load(Ordering::Acquire);
        let from = match state_of(w) {
            CLOSED if failures >= failures_to_open => CircuitState::Closed,
            HALF_OPEN => CircuitState::HalfOpen,
            _ => return false,
        };
        let ev = {
            let mut inner = self.lock();
            if self.word.load(Ordering::Acquire) != w {
                // Something else moved the circuit meanwhile: the next probe decides again.
                return false;
            }
            let now = self.common.now();
            self.open(
                &mut inner,
                w,
                now,
                from,
                TransitionReason::HealthCheckFailed,
            )
        };
        emit(&self.common.config.on_event, ev);
        true
    }

    /// An active health check passed: an open circuit goes half-open now, before its open
    /// duration has passed, with every probe permit free, so that live calls confirm the
    /// recovery (the usual half-open rules close or re-open it). Any other state, or a manual
    /// mode, is left as it is. Returns whether the circuit moved.
    pub(crate) fn health_passed(&self) -> bool {
        if self.effective_mode() != CircuitMode::Auto {
            return false;
        }
        let w = self.word.load(Ordering::Acquire);
        if state_of(w) != OPEN {
            return false;
        }
        let ev = {
            let mut inner = self.lock();
            if self.word.load(Ordering::Acquire) != w {
                return false;
            }
            let now = self.common.now();
            inner.probe_successes = 0;
            // No probe is out yet: each one admitted sets its own deadline.
            self.probe_deadline.store(now, Ordering::Release);
            let probes = u64::from(self.common.config.probes);
            self.word
                .store(pack(epoch_of(w) + 1, probes, HALF_OPEN), Ordering::Release);
            self.event(
                CircuitState::Open,
                CircuitState::HalfOpen,
                TransitionReason::HealthCheckPassed,
                None,
            )
        };
        emit(&self.common.config.on_event, ev);
        true
    }

    /// The window's totals at `now` (for a snapshot that reads the clock once).
    pub(crate) fn window_totals_at(&self, now: u64) -> (u64, u64, u64) {
        let t = self.lock().window.totals(now);
        (t.calls, t.failures, t.slow)
    }

    pub(crate) fn window_totals(&self) -> (u64, u64, u64) {
        let now = self.common.now();
        let t = self.lock().window.totals(now);
        (t.calls, t.failures, t.slow)
    }

    fn start(&self) -> u64 {
        if self.common.needs_start {
            self.common.now()
        } else {
            0
        }
    }

    /// [`Circuit::admit`] for a caller that holds its own `Arc` of the circuit: a closed
    /// circuit's permit takes it (no second reference counted per call); a refusal gives it
    /// back.
    pub(crate) fn admit_owned(self: Arc<Self>) -> Result<Permit, (Arc<Self>, Refusal)> {
        if self.effective_mode() == CircuitMode::Auto {
            let w = self.word.load(Ordering::Acquire);
            if state_of(w) == CLOSED {
                return Ok(Permit {
                    epoch: epoch_of(w),
                    kind: Kind::Normal,
                    start: self.start(),
                    head: None,
                    circuit: Some(self),
                });
            }
        }
        self.admit().map_err(|refusal| (self, refusal))
    }

    /// Decides whether a call may pass.
    pub(crate) fn admit(self: &Arc<Self>) -> Result<Permit, Refusal> {
        match self.effective_mode() {
            CircuitMode::Auto => {}
            CircuitMode::Disabled => return Ok(Permit::unrecorded()),
            CircuitMode::ForcedOpen => {
                self.counters.rejections.fetch_add(1, Ordering::Relaxed);
                return Err(Refusal::Forced);
            }
            CircuitMode::MetricsOnly => {
                return Ok(Permit {
                    circuit: Some(self.clone()),
                    epoch: 0,
                    kind: Kind::MetricsOnly,
                    start: self.start(),
                    head: None,
                })
            }
        }
        let mut w = self.word.load(Ordering::Acquire);
        loop {
            match state_of(w) {
                CLOSED => {
                    return Ok(Permit {
                        circuit: Some(self.clone()),
                        epoch: epoch_of(w),
                        kind: Kind::Normal,
                        start: self.start(),
                        head: None,
                    })
                }
                OPEN => {
                    let now = self.common.now();
                    let until = self.open_until.load(Ordering::Acquire);
                    if now < until {
                        return Err(self.refuse(Refusal::Open(Duration::from_nanos(until - now))));
                    }
                    let mut events = None;
                    {
                        let mut inner = self.lock();
                        let cur = self.word.load(Ordering::Acquire);
                        if cur == w {
                            // Open → half-open; this call takes the first probe permit.
                            let probes = self.common.config.probes as u64;
                            let epoch = epoch_of(w) + 1;
                            inner.probe_successes = 0;
                            self.probe_deadline.store(
                                now.saturating_add(nanos(self.common.config.probe_timeout)),
                                Ordering::Release,
                            );
                            self.word
                                .store(pack(epoch, probes - 1, HALF_OPEN), Ordering::Release);
                            events = Some((
                                epoch,
                                self.event(
                                    CircuitState::Open,
                                    CircuitState::HalfOpen,
                                    TransitionReason::OpenElapsed,
                                    None,
                                ),
                            ));
                        }
                        w = cur;
                    }
                    if let Some((epoch, ev)) = events {
                        emit(&self.common.config.on_event, ev);
                        return Ok(Permit {
                            circuit: Some(self.clone()),
                            epoch,
                            kind: Kind::Probe,
                            start: now,
                            head: None,
                        });
                    }
                }
                _ => {
                    if permits_of(w) > 0 {
                        match self.word.compare_exchange_weak(
                            w,
                            w - (1 << PERMIT_SHIFT),
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        ) {
                            Ok(_) => {
                                let now = self.common.now();
                                // Every probe gets the full timeout from its own admission.
                                self.probe_deadline.fetch_max(
                                    now.saturating_add(nanos(self.common.config.probe_timeout)),
                                    Ordering::AcqRel,
                                );
                                return Ok(Permit {
                                    circuit: Some(self.clone()),
                                    epoch: epoch_of(w),
                                    kind: Kind::Probe,
                                    start: now,
                                    head: None,
                                });
                            }
                            Err(cur) => {
                                w = cur;
                                continue;
                            }
                        }
                    }
                    // Every probe is out. Past the deadline, the ones still out count as failed.
                    let now = self.common.now();
                    let deadline = self.probe_deadline.load(Ordering::Acquire);
                    if now < deadline {
                        return Err(
                            self.refuse(Refusal::Probing(Duration::from_nanos(deadline - now)))
                        );
                    }
                    let ev = {
                        let mut inner = self.lock();
                        let cur = self.word.load(Ordering::Acquire);
                        if cur == w {
                            Some(self.open(
                                &mut inner,
                                cur,
                                now,
                                CircuitState::HalfOpen,
                                TransitionReason::ProbeTimedOut,
                            ))
                        } else {
                            None
                        }
                    };
                    if let Some(ev) = ev {
                        emit(&self.common.config.on_event, ev);
                    }
                    w = self.word.load(Ordering::Acquire);
                }
            }
        }
    }

    fn refuse(&self, refusal: Refusal) -> Refusal {
        self.counters.rejections.fetch_add(1, Ordering::Relaxed);
        refusal
    }

    fn event(
        &self,
        from: CircuitState,
        to: CircuitState,
        reason: TransitionReason,
        open_for: Option<Duration>,
    ) -> BreakerEvent {
        BreakerEvent::StateChanged {
            name: self.common.config.name.clone(),
            key: self.key.clone(),
            from,
            to,
            reason,
            open_for,
        }
    }

    /// Opens the circuit (caller holds the lock and has checked `w` is current).
    fn open(
        &self,
        inner: &mut Inner,
        w: u64,
        now: u64,
        from: CircuitState,
        reason: TransitionReason,
    ) -> BreakerEvent {
        let reopenings = inner.reopenings;
        let d = self.common.open_duration(reopenings, &mut inner.rng);
        inner.reopenings = reopenings.saturating_add(1);
        inner.window.reset();
        inner.probe_successes = 0;
        self.open_until
            .store(now.saturating_add(nanos(d)), Ordering::Release);
        self.open_for.store(nanos(d), Ordering::Relaxed);
        self.word
            .store(pack(epoch_of(w) + 1, 0, OPEN), Ordering::Release);
        self.counters.openings.fetch_add(1, Ordering::Relaxed);
        self.event(from, CircuitState::Open, reason, Some(d))
    }

    fn close(
        &self,
        inner: &mut Inner,
        w: u64,
        from: CircuitState,
        reason: TransitionReason,
    ) -> BreakerEvent {
        inner.reopenings = 0;
        inner.window.reset();
        inner.probe_successes = 0;
        self.word
            .store(pack(epoch_of(w) + 1, 0, CLOSED), Ordering::Release);
        self.event(from, CircuitState::Closed, reason, None)
    }

    /// Closes the circuit and forgets its window, whatever its state.
    pub(crate) fn reset(&self) {
        let ev = {
            let mut inner = self.lock();
            let w = self.word.load(Ordering::Acquire);
            let from = self.state();
            self.close(&mut inner, w, from, TransitionReason::Reset)
        };
        emit(&self.common.config.on_event, ev);
    }

    fn release_probe(&self, epoch: u64) {
        let mut w = self.word.load(Ordering::Acquire);
        while state_of(w) == HALF_OPEN && epoch_of(w) == epoch {
            match self.word.compare_exchange_weak(
                w,
                w + (1 << PERMIT_SHIFT),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return,
                Err(cur) => w = cur,
            }
        }
    }

    fn should_trip(&self, t: Totals) -> Option<TransitionReason> {
        let c = &self.common.config;
        if let WindowKind::Consecutive(n) = c.window {
            return (t.failures >= n as u64).then_some(TransitionReason::FailureRate);
        }
        if t.calls < c.minimum_calls {
            return None;
        }
        let calls = t.calls as f64;
        if t.failures as f64 * 100.0 >= c.failure_rate * calls {
            return Some(TransitionReason::FailureRate);
        }
        if let Some((_, rate)) = c.slow_call {
            if t.slow as f64 * 100.0 >= rate * calls {
                return Some(TransitionReason::SlowCallRate);
            }
        }
        None
    }

    fn record(&self, epoch: u64, kind: Kind, start: u64, head: Option<u64>, end: End) {
        if kind == Kind::Spent {
            return;
        }
        let cfg = &self.common.config;
        // The clock is read for a time window, or for the slow-call rule when no head time was
        // taken; a count window with the head's time (or without the rule) needs none.
        let needs_now = matches!(cfg.window, WindowKind::Time(..))
            || (cfg.slow_call.is_some() && head.is_none());
        let (failure, probe_reason) = match end {
            End::Answered(Verdict::Ignored) => {
                self.counters.ignored.fetch_add(1, Ordering::Relaxed);
                if kind == Kind::Probe {
                    self.release_probe(epoch);
                }
                return;
            }
            End::BodyDropped => {
                // The caller stopped reading an answer the upstream was serving: it says
                // nothing of the upstream either way.
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                if kind == Kind::Probe {
                    self.release_probe(epoch);
                }
                return;
            }
            End::Answered(Verdict::Failure) => (true, TransitionReason::ProbeFailed),
            End::Answered(Verdict::Success) => (false, TransitionReason::ProbeFailed),
            End::CallTimedOut | End::ProbeTimedOut => {
                self.counters.timeouts.fetch_add(1, Ordering::Relaxed);
                (true, TransitionReason::ProbeTimedOut)
            }
            End::Dropped => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                if kind == Kind::Probe {
                    // Nothing says the upstream is back: a dropped probe is a failed one.
                    (true, TransitionReason::ProbeDropped)
                } else if !self.common.needs_start {
                    // No duration to compare with: a cancelled call says nothing.
                    return;
                } else {
                    let ran = self.common.now().saturating_sub(start);
                    let timed_out = cfg.call_timeout.is_some_and(|d| ran >= nanos(d));
                    let slow = cfg.slow_call.is_some_and(|(d, _)| ran > nanos(d));
                    if timed_out {
                        self.counters.timeouts.fetch_add(1, Ordering::Relaxed);
                    } else if !slow || matches!(cfg.window, WindowKind::Consecutive(_)) {
                        // Dropped before any threshold (or slow, where slowness does not
                        // count): it says nothing of the upstream.
                        return;
                    }
                    (timed_out, TransitionReason::ProbeFailed)
                }
            }
        };
        let now = if needs_now { self.common.now() } else { 0 };
        // Slowness is the time to the head (for a stream: its first byte), not to its end.
        let slow = match cfg.slow_call {
            Some((d, _)) => head.unwrap_or(now).saturating_sub(start) > nanos(d),
            None => false,
        };
        let ev = {
            let mut inner = self.lock();
            // These three counters are written only here, under the lock: a plain load and
            // store each, no atomic read-modify-write (readers load them without the lock).
            bump(&self.counters.calls, true);
            bump(&self.counters.failures, failure);
            bump(&self.counters.slow, slow);
            let w = self.word.load(Ordering::Acquire);
            match kind {
                Kind::Spent => None,
                Kind::MetricsOnly => {
                    inner.window.record(now, failure, slow);
                    None
                }
                Kind::Normal => {
                    if state_of(w) != CLOSED || epoch_of(w) != epoch {
                        return;
                    }
                    let t = inner.window.record(now, failure, slow);
                    self.should_trip(t).map(|reason| {
                        let now = if needs_now { now } else { self.common.now() };
                        self.open(&mut inner, w, now, CircuitState::Closed, reason)
                    })
                }
                Kind::Probe => {
                    if state_of(w) != HALF_OPEN || epoch_of(w) != epoch {
                        return;
                    }
                    if failure || slow {
                        let now = if needs_now { now } else { self.common.now() };
                        Some(self.open(&mut inner, w, now, CircuitState::HalfOpen, probe_reason))
                    } else {
                        inner.probe_successes += 1;
                        (inner.probe_successes >= cfg.probes as u32).then(|| {
                            self.close(
                                &mut inner,
                                w,
                                CircuitState::HalfOpen,
                                TransitionReason::ProbesSucceeded,
                            )
                        })
                    }
                }
            }
        };
        if let Some(ev) = ev {
            emit(&cfg.on_event, ev);
        }
    }
}

/// Adds one to a counter whose only writer holds the circuit's lock, when `yes`.
fn bump(counter: &AtomicU64, yes: bool) {
    if yes {
        counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }
}
