//! What the breaker tells the world: tracing events, metrics (`crate::metrics`) and the
//! callback hook.

use std::sync::Arc;
use std::time::Duration;

/// The automatic state of one circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CircuitState {
    /// Calls pass and are counted.
    Closed,
    /// Calls are rejected (or degraded) until the open duration has passed.
    Open,
    /// A fixed number of probe calls pass; their answers close or re-open the circuit.
    HalfOpen,
}

impl CircuitState {
    /// `"closed"`, `"open"` or `"half_open"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }
}

impl std::fmt::Display for CircuitState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a circuit changed state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TransitionReason {
    /// The failure rate (or the run of consecutive failures) reached the threshold.
    FailureRate,
    /// The slow-call rate reached the threshold.
    SlowCallRate,
    /// The open duration passed; probes are admitted.
    OpenElapsed,
    /// A probe failed (or was slow).
    ProbeFailed,
    /// A probe did not answer within the probe timeout (or the call timeout).
    ProbeTimedOut,
    /// A probe was dropped by its caller before it answered (a timeout outside the breaker,
    /// a client that went away): nothing says the upstream is back, so it counts as failed.
    ProbeDropped,
    /// Every probe succeeded.
    ProbesSucceeded,
    /// [`BreakerHandle::reset`](super::BreakerHandle::reset) was called.
    Reset,
    /// Active health checks ([`HealthCheck`](super::HealthCheck)) failed
    /// [`failures_to_open`](super::HealthCheckBuilder::failures_to_open) times in a row while
    /// closed, or once while half-open.
    HealthCheckFailed,
    /// An active health check passed while the circuit was open: it goes half-open before its
    /// open duration has passed, and live probes confirm.
    HealthCheckPassed,
}

/// What one active health-check probe found ([`BreakerEvent::HealthCheck`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProbeResult {
    /// The upstream answered and the policy calls it a success (`2xx`).
    Passed,
    /// The upstream failed: an answer whose failure counts against a circuit (`5xx`, `529`,
    /// `503`), or a transport error.
    Failed,
    /// No answer within the probe's own timeout (or the service never became ready in it).
    TimedOut,
    /// An answer that says nothing of the upstream's health: the probe itself was refused
    /// (`401`/`403`: a bad or missing key; `404`: the path is not served; `429` unless the
    /// breaker trips on rate limits). Neither a pass nor a failure; the run of failures is
    /// kept as it was.
    Inconclusive,
}

impl ProbeResult {
    /// `"passed"`, `"failed"`, `"timed_out"` or `"inconclusive"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ProbeResult::Passed => "passed",
            ProbeResult::Failed => "failed",
            ProbeResult::TimedOut => "timed_out",
            ProbeResult::Inconclusive => "inconclusive",
        }
    }
}

impl std::fmt::Display for ProbeResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One thing that happened to a breaker, passed to the
/// [`on_event`](super::CircuitBreakerLayerBuilder::on_event) hook and logged with `tracing`
/// (transitions at `warn`/`info`, rejections and fallbacks at `debug`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum BreakerEvent {
    /// A circuit changed state.
    StateChanged {
        /// The breaker's name.
        name: Arc<str>,
        /// The circuit's key.
        key: Arc<str>,
        /// The state before.
        from: CircuitState,
        /// The state after.
        to: CircuitState,
        /// Why.
        reason: TransitionReason,
        /// For a change to open: how long it stays open.
        open_for: Option<Duration>,
    },
    /// A call was rejected without reaching the upstream.
    Rejected {
        /// The breaker's name.
        name: Arc<str>,
        /// The circuit's key.
        key: Arc<str>,
        /// When the circuit may admit calls again, if known.
        retry_after: Option<Duration>,
    },
    /// A rejected call went to a fallback step.
    Fallback {
        /// The breaker's name.
        name: Arc<str>,
        /// The circuit's key.
        key: Arc<str>,
        /// The fallback's name (the backup model for a model fallback).
        fallback: Arc<str>,
        /// Whether the fallback answered; `false` sends the call to the next step.
        ok: bool,
        /// Why this step was tried: what the one before it (the primary, or the target
        /// before) did.
        reason: FallbackReason,
        /// What came of it.
        outcome: FallbackOutcome,
    },
    /// An active health-check probe ended ([`HealthCheck`](super::HealthCheck)). A probe
    /// that moves the circuit is followed by its [`BreakerEvent::StateChanged`].
    HealthCheck {
        /// The breaker's name.
        name: Arc<str>,
        /// The key of the circuit the probe checks.
        key: Arc<str>,
        /// What the probe found.
        result: ProbeResult,
        /// The status of the answer, when there was one.
        status: Option<u16>,
        /// How long the probe took (up to its timeout).
        elapsed: Duration,
        /// Failed or timed-out probes in a row, this one included (`0` after a pass).
        consecutive_failures: u32,
    },
}

/// Why a fallback step was tried (see [`BreakerEvent::Fallback`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FallbackReason {
    /// The primary's circuit refused the call (open, probing, or forced open).
    PrimaryOpen,
    /// The one before answered `service_unavailable` (`503`, `529`, `502`).
    Overloaded,
    /// The one before answered `timeout`, or did not answer within the call timeout.
    TimedOut,
    /// The one before could not be reached (a transport error).
    Unreachable,
    /// The one before answered `context_length_exceeded`: only larger-context targets.
    ContextLength,
    /// The one before answered `content_policy_violation`: only the targets marked for it.
    ContentPolicy,
    /// The one before answered another failure (a chain without
    /// [`fallback_target`](super::CircuitBreakerLayerBuilder::fallback_target) entries moves on
    /// past any failure while the primary is open).
    Failed,
}

impl FallbackReason {
    /// `"primary_open"`, `"overloaded"`, `"timed_out"`, `"unreachable"`,
    /// `"context_length"`, `"content_policy"` or `"failed"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            FallbackReason::PrimaryOpen => "primary_open",
            FallbackReason::Overloaded => "overloaded",
            FallbackReason::TimedOut => "timed_out",
            FallbackReason::Unreachable => "unreachable",
            FallbackReason::ContextLength => "context_length",
            FallbackReason::ContentPolicy => "content_policy",
            FallbackReason::Failed => "failed",
        }
    }
}

/// What came of a fallback step (see [`BreakerEvent::Fallback`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FallbackOutcome {
    /// It served the call.
    Answered,
    /// It answered an error that is not worth another target; the error is the caller's
    /// answer.
    PassedOn,
    /// It failed; the walk moved on (or ended, when no target was left).
    Failed,
    /// Its own circuit is open: skipped without a call.
    CircuitOpen,
    /// It names an upstream no service is bound to: skipped.
    NotBound,
    /// The deadline passed before it answered (or before it was tried): the walk ended.
    OutOfTime,
}

impl FallbackOutcome {
    /// `"answered"`, `"passed_on"`, `"failed"`, `"circuit_open"`, `"not_bound"` or
    /// `"out_of_time"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            FallbackOutcome::Answered => "answered",
            FallbackOutcome::PassedOn => "passed_on",
            FallbackOutcome::Failed => "failed",
            FallbackOutcome::CircuitOpen => "circuit_open",
            FallbackOutcome::NotBound => "not_bound",
            FallbackOutcome::OutOfTime => "out_of_time",
        }
    }
}

pub(crate) fn emit(hook: &Option<super::config::EventHook>, ev: BreakerEvent) {
    crate::metrics::breaker_event(&ev);
    match &ev {
        BreakerEvent::StateChanged {
            name,
            key,
            from,
            to,
            reason,
            open_for,
        } => {
            if *to == CircuitState::Open {
                tracing::warn!(layer = "breaker", name = ?name, circuit = ?key, %from, %to, ?reason, open_for_ms = open_for.map(super::config::millis), "circuit opened");
            } else {
                tracing::info!(layer = "breaker", name = ?name, circuit = ?key, %from, %to, ?reason, "circuit state changed");
            }
        }
        BreakerEvent::Rejected {
            name,
            key,
            retry_after,
        } => {
            tracing::debug!(layer = "breaker", name = ?name, circuit = ?key, retry_after_ms = retry_after.map(super::config::millis), "call rejected by open circuit");
        }
        BreakerEvent::Fallback {
            name,
            key,
            fallback,
            ok,
            reason,
            outcome,
        } => {
            tracing::debug!(layer = "breaker", name = ?name, circuit = ?key, fallback = ?fallback, ok, reason = reason.as_str(), outcome = outcome.as_str(), "call degraded to fallback");
        }
        BreakerEvent::HealthCheck {
            name,
            key,
            result,
            status,
            elapsed,
            consecutive_failures,
        } => match result {
            ProbeResult::Passed => {
                tracing::debug!(layer = "breaker", name = ?name, circuit = ?key, %result, status, elapsed_ms = super::config::millis(*elapsed), "health check")
            }
            ProbeResult::Inconclusive => {
                tracing::warn!(layer = "breaker", name = ?name, circuit = ?key, %result, status, "health check refused by the upstream; check the probe's path and key")
            }
            _ => {
                tracing::info!(layer = "breaker", name = ?name, circuit = ?key, %result, status, consecutive_failures, "health check failed")
            }
        },
    }
    if let Some(hook) = hook {
        hook(&ev);
    }
}
