//! The circuits of one layer, by key, and the handle that reads and steers them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use super::circuit::{Circuit, Common};
use super::config::{Config, Mode};
use super::events::CircuitState;

/// The key of the circuit used with [`KeyBy::Single`](super::KeyBy::Single).
pub const SINGLE_KEY: &str = "*";
/// The key of the circuit shared by new keys once [`max_keys`](super::Builder::max_keys)
/// circuits exist and none can be forgotten.
pub const OVERFLOW_KEY: &str = "<overflow>";

pub(crate) struct Shared {
    pub(crate) common: Arc<Common>,
    pub(crate) single: Arc<Circuit>,
    map: RwLock<HashMap<Arc<str>, Arc<Circuit>>>,
    overflow: OnceLock<Arc<Circuit>>,
    tick: AtomicU64,
    index: AtomicU64,
}

impl Shared {
    pub(crate) fn new(config: Config) -> Self {
        let common = Arc::new(Common::new(config));
        Shared {
            single: Arc::new(Circuit::new(common.clone(), Arc::from(SINGLE_KEY), 0)),
            common,
            map: RwLock::new(HashMap::new()),
            overflow: OnceLock::new(),
            tick: AtomicU64::new(0),
            index: AtomicU64::new(1),
        }
    }

    pub(crate) fn config(&self) -> &Config {
        &self.common.config
    }

    fn new_circuit(&self, key: &str) -> Arc<Circuit> {
        let index = self.index.fetch_add(1, Ordering::Relaxed);
        Arc::new(Circuit::new(self.common.clone(), Arc::from(key), index))
    }

    /// The circuit for `key`, if it exists.
    pub(crate) fn get(&self, key: &str) -> Option<Arc<Circuit>> {
        if matches!(self.config().key_by, super::KeyBy::Single) && key == SINGLE_KEY {
            return Some(self.single.clone());
        }
        if key == OVERFLOW_KEY {
            return self.overflow.get().cloned();
        }
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    /// The circuit for `key`, created when new (see [`super::Builder::max_keys`]).
    pub(crate) fn circuit(&self, key: &str) -> Arc<Circuit> {
        let tick = self.tick.fetch_add(1, Ordering::Relaxed);
        if let Some(c) = self.map.read().unwrap_or_else(|p| p.into_inner()).get(key) {
            c.last_used.store(tick, Ordering::Relaxed);
            return c.clone();
        }
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(key) {
            c.last_used.store(tick, Ordering::Relaxed);
            return c.clone();
        }
        if map.len() >= self.config().max_keys {
            // Forget the least recently used circuit that is closed, automatic and idle (no
            // call holds it); an open circuit is never forgotten, or its upstream would be
            // hammered again.
            let victim = map
                .iter()
                .filter(|(_, c)| {
                    c.state() == CircuitState::Closed
                        && c.effective_mode() == Mode::Auto
                        && Arc::strong_count(c) == 1
                })
                .min_by_key(|(_, c)| c.last_used.load(Ordering::Relaxed))
                .map(|(k, _)| k.clone());
            match victim {
                Some(k) => {
                    map.remove(&k);
                }
                None => {
                    return self
                        .overflow
                        .get_or_init(|| self.new_circuit(OVERFLOW_KEY))
                        .clone();
                }
            }
        }
        let c = self.new_circuit(key);
        c.last_used.store(tick, Ordering::Relaxed);
        map.insert(c.key.clone(), c.clone());
        c
    }

    pub(crate) fn all(&self) -> Vec<Arc<Circuit>> {
        let mut v: Vec<Arc<Circuit>> = if matches!(self.config().key_by, super::KeyBy::Single) {
            vec![self.single.clone()]
        } else {
            self.map
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .cloned()
                .collect()
        };
        v.extend(self.overflow.get().cloned());
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }
}

/// A snapshot of one circuit's state and counters.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct CircuitMetrics {
    /// The circuit's key ([`SINGLE_KEY`] with [`KeyBy::Single`](super::KeyBy::Single)).
    pub key: Arc<str>,
    /// The automatic state.
    pub state: CircuitState,
    /// The manual mode in force (the layer-wide one unless it is `Auto`).
    pub mode: Mode,
    /// Calls recorded (successes and failures; ignored calls are not counted here).
    pub calls: u64,
    /// Calls that failed.
    pub failures: u64,
    /// Calls slower than the slow-call duration.
    pub slow_calls: u64,
    /// Calls whose outcome was ignored (the caller's fault).
    pub ignored: u64,
    /// Calls rejected without reaching the upstream.
    pub rejections: u64,
    /// Rejected calls answered by a fallback step.
    pub fallbacks: u64,
    /// How many times the circuit opened.
    pub openings: u64,
    /// Calls counted as failed because they did not answer in time: the call timeout fired,
    /// a probe passed its probe timeout, or a call was dropped after the call timeout.
    pub timeouts: u64,
    /// Calls dropped by their caller before the answer (counted or not, see the module
    /// documentation).
    pub dropped: u64,
    /// Calls in the current window.
    pub window_calls: u64,
    /// Failures in the current window.
    pub window_failures: u64,
    /// Slow calls in the current window.
    pub window_slow_calls: u64,
}

fn metrics(c: &Circuit) -> CircuitMetrics {
    let (window_calls, window_failures, window_slow_calls) = c.window_totals();
    let n = &c.counters;
    CircuitMetrics {
        key: c.key.clone(),
        state: c.state(),
        mode: c.effective_mode(),
        calls: n.calls.load(Ordering::Relaxed),
        failures: n.failures.load(Ordering::Relaxed),
        slow_calls: n.slow.load(Ordering::Relaxed),
        ignored: n.ignored.load(Ordering::Relaxed),
        rejections: n.rejections.load(Ordering::Relaxed),
        fallbacks: n.fallbacks.load(Ordering::Relaxed),
        openings: n.openings.load(Ordering::Relaxed),
        timeouts: n.timeouts.load(Ordering::Relaxed),
        dropped: n.dropped.load(Ordering::Relaxed),
        window_calls,
        window_failures,
        window_slow_calls,
    }
}

/// Reads and steers the circuits of one layer at runtime. Cheap to clone; every clone (and
/// the layer it came from, and every service that layer built) shares the same circuits.
#[derive(Clone)]
pub struct BreakerHandle {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for BreakerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BreakerHandle")
            .field("name", &self.name())
            .field("mode", &self.mode())
            .finish()
    }
}

impl BreakerHandle {
    /// The breaker's configured name.
    pub fn name(&self) -> &str {
        &self.shared.config().name
    }

    /// The automatic state of the circuit for `key`, if it exists ([`SINGLE_KEY`] with
    /// [`KeyBy::Single`](super::KeyBy::Single), [`OVERFLOW_KEY`] for the overflow circuit).
    pub fn state(&self, key: &str) -> Option<CircuitState> {
        self.shared.get(key).map(|c| c.state())
    }

    /// The state and counters of the circuit for `key`, if it exists.
    pub fn metrics(&self, key: &str) -> Option<CircuitMetrics> {
        self.shared.get(key).map(|c| metrics(&c))
    }

    /// The state and counters of every circuit, sorted by key.
    pub fn all_metrics(&self) -> Vec<CircuitMetrics> {
        self.shared.all().iter().map(|c| metrics(c)).collect()
    }

    /// The layer-wide mode.
    pub fn mode(&self) -> Mode {
        Mode::from_u8(self.shared.common.mode.load(Ordering::Relaxed))
    }

    /// Sets the layer-wide mode; anything but [`Mode::Auto`] overrides every circuit's own.
    pub fn set_mode(&self, mode: Mode) {
        self.shared
            .common
            .mode
            .store(mode.to_u8(), Ordering::Relaxed);
        tracing::info!(breaker = ?self.name(), ?mode, "breaker mode set");
    }

    /// Sets the mode of the circuit for `key`, creating the circuit if needed (so a key can be
    /// forced open before its first call). With [`KeyBy::Single`](super::KeyBy::Single) the
    /// key is ignored and the one circuit is set.
    pub fn set_mode_for(&self, key: &str, mode: Mode) {
        let c = if matches!(self.shared.config().key_by, super::KeyBy::Single) {
            self.shared.single.clone()
        } else {
            self.shared.circuit(key)
        };
        c.mode.store(mode.to_u8(), Ordering::Relaxed);
        tracing::info!(breaker = ?self.name(), key = ?c.key, ?mode, "circuit mode set");
    }

    /// Closes the circuit for `key` and forgets its window. Returns `false` when no such
    /// circuit exists.
    pub fn reset(&self, key: &str) -> bool {
        match self.shared.get(key) {
            Some(c) => {
                c.reset();
                true
            }
            None => false,
        }
    }
}
