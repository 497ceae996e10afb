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
    },
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
        } => {
            tracing::debug!(layer = "breaker", name = ?name, circuit = ?key, fallback = ?fallback, ok, "call degraded to fallback");
        }
    }
    if let Some(hook) = hook {
        hook(&ev);
    }
}
