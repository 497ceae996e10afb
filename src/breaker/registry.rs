//! The circuits of one layer, by key, and the handle that reads and steers them.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::circuit::{Circuit, Common};
use super::config::{CircuitMode, Config};
use super::events::CircuitState;

/// The key of the circuit used with [`CircuitKey::Single`](super::CircuitKey::Single).
pub const SINGLE_KEY: &str = "*";
/// The key of the circuit shared by new keys once [`max_keys`](super::CircuitBreakerLayerBuilder::max_keys)
/// circuits exist and none can be forgotten.
pub const OVERFLOW_KEY: &str = "<overflow>";

/// How many circuits one new key looks at, at most, to find one to forget.
const SCAN: usize = 16;
/// What an over-long key keeps after its prefix: `~sha256:` and 32 hex digits.
const DIGEST_LEN: usize = 8 + 32;
/// The shortest [`max_key_len`](super::CircuitBreakerLayerBuilder::max_key_len): room for the digest and a prefix.
pub(crate) const MIN_KEY_LEN: usize = 64;

/// `key` as stored: itself when it fits in `max` bytes, else its first bytes (cut at a
/// character boundary) followed by `~sha256:` and 128 bits of its SHA-256 in hex, `max` bytes
/// at most. Distinct long keys keep distinct circuits; memory per key stays bounded.
pub(crate) fn bounded_key(key: &str, max: usize) -> Cow<'_, str> {
    if key.len() <= max {
        return Cow::Borrowed(key);
    }
    let digest = Sha256::digest(key.as_bytes());
    let mut cut = max.saturating_sub(DIGEST_LEN);
    while !key.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut out = String::with_capacity(cut + DIGEST_LEN);
    out.push_str(&key[..cut]);
    out.push_str("~sha256:");
    for b in &digest[..16] {
        out.push_str(&format!("{b:02x}"));
    }
    Cow::Owned(out)
}

/// The circuits by key, and the order in which they are looked at for eviction.
#[derive(Default)]
struct Map {
    by_key: HashMap<Arc<str>, Arc<Circuit>>,
    /// Every circuit of `by_key`, oldest look first (a clock: a circuit used since it was last
    /// looked at goes to the back, a second chance).
    ring: VecDeque<Arc<Circuit>>,
    #[cfg(test)]
    inspected: u64,
}

pub(crate) struct Shared {
    pub(crate) common: Arc<Common>,
    pub(crate) single: Arc<Circuit>,
    map: RwLock<Map>,
    overflow: OnceLock<Arc<Circuit>>,
    tick: AtomicU64,
    index: AtomicU64,
}

/// Whether a circuit may be forgotten to make room: closed, automatic, idle (no call holds
/// it: only the map and the ring do) and with no failure in its window. An open, half-open or
/// failing circuit is kept, or churn of new keys would reset it before it trips.
fn forgettable(c: &Arc<Circuit>) -> bool {
    c.state() == CircuitState::Closed
        && c.mode.load(Ordering::Relaxed) == CircuitMode::Auto.to_u8()
        && Arc::strong_count(c) <= 2
        && c.window_totals().1 == 0
}

impl Shared {
    pub(crate) fn new(config: Config) -> Self {
        let common = Arc::new(Common::new(config));
        Shared {
            single: Arc::new(Circuit::new(common.clone(), Arc::from(SINGLE_KEY), 0)),
            common,
            map: RwLock::new(Map::default()),
            overflow: OnceLock::new(),
            tick: AtomicU64::new(1),
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
        if matches!(self.config().key_by, super::CircuitKey::Single) && key == SINGLE_KEY {
            return Some(self.single.clone());
        }
        if key == OVERFLOW_KEY {
            return self.overflow.get().cloned();
        }
        let key = bounded_key(key, self.config().max_key_len);
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_key
            .get(&*key)
            .cloned()
    }

    /// The circuit for `key`, created when new (see [`super::CircuitBreakerLayerBuilder::max_keys`]).
    pub(crate) fn circuit(&self, key: &str) -> Arc<Circuit> {
        let key = bounded_key(key, self.config().max_key_len);
        let tick = self.tick.fetch_add(1, Ordering::Relaxed);
        if let Some(c) = self
            .map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_key
            .get(&*key)
        {
            c.last_used.store(tick, Ordering::Relaxed);
            return c.clone();
        }
        let mut guard = self.map.write().unwrap_or_else(|p| p.into_inner());
        let map = &mut *guard;
        if let Some(c) = map.by_key.get(&*key) {
            c.last_used.store(tick, Ordering::Relaxed);
            return c.clone();
        }
        if map.by_key.len() >= self.config().max_keys {
            // Look at a bounded number of circuits, oldest look first. The first one that may
            // be forgotten and was not used since it was last looked at goes; else the least
            // recently used of those that may be forgotten; the others go to the back (a
            // second chance). O(1) per new key, whatever the number of keys.
            let mut looked: [Option<Arc<Circuit>>; SCAN] = Default::default();
            let mut victim = None;
            let mut fallback: Option<(usize, u64)> = None;
            let n = SCAN.min(map.ring.len());
            for (i, slot) in looked.iter_mut().enumerate().take(n) {
                let Some(c) = map.ring.pop_front() else {
                    break;
                };
                #[cfg(test)]
                {
                    map.inspected += 1;
                }
                if forgettable(&c) {
                    let used = c.last_used.load(Ordering::Relaxed);
                    if used <= c.seen.load(Ordering::Relaxed) {
                        victim = Some(c);
                        break;
                    }
                    if fallback.is_none_or(|(_, u)| used < u) {
                        fallback = Some((i, used));
                    }
                }
                c.seen.store(tick, Ordering::Relaxed);
                *slot = Some(c);
            }
            if victim.is_none() {
                victim = fallback.and_then(|(i, _)| looked[i].take());
            }
            for c in looked.into_iter().flatten() {
                map.ring.push_back(c);
            }
            match victim {
                Some(c) => {
                    map.by_key.remove(&c.key);
                }
                None => {
                    return self
                        .overflow
                        .get_or_init(|| self.new_circuit(OVERFLOW_KEY))
                        .clone();
                }
            }
        }
        let c = self.new_circuit(&key);
        c.last_used.store(tick, Ordering::Relaxed);
        c.seen.store(tick, Ordering::Relaxed);
        map.by_key.insert(c.key.clone(), c.clone());
        map.ring.push_back(c.clone());
        c
    }

    pub(crate) fn all(&self) -> Vec<Arc<Circuit>> {
        let mut v: Vec<Arc<Circuit>> = if matches!(self.config().key_by, super::CircuitKey::Single)
        {
            vec![self.single.clone()]
        } else {
            self.map
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .by_key
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
    /// The circuit's key ([`SINGLE_KEY`] with [`CircuitKey::Single`](super::CircuitKey::Single)).
    pub key: Arc<str>,
    /// The automatic state.
    pub state: CircuitState,
    /// The manual mode in force (the layer-wide one unless it is `Auto`).
    pub mode: CircuitMode,
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
    /// documentation), or whose successful answer's body was dropped before its end (never
    /// counted).
    pub dropped: u64,
    /// Calls in the current window.
    pub window_calls: u64,
    /// Failures in the current window.
    pub window_failures: u64,
    /// Slow calls in the current window.
    pub window_slow_calls: u64,
    /// The failure rate of the current window, in percent; `None` when it holds no call.
    /// (With [`consecutive_failures`](super::CircuitBreakerLayerBuilder::consecutive_failures)
    /// the window is the current run: 100 % once it holds a failure.)
    pub failure_rate: Option<f64>,
    /// The slow-call rate of the current window, in percent; `None` when it holds no call.
    pub slow_call_rate: Option<f64>,
    /// Open: the time until the next call may take the circuit half-open (zero once it may;
    /// the move happens on that call). `None` in any other state.
    pub until_half_open: Option<Duration>,
    /// Open: how long this open period was set to last (it grows with re-openings).
    pub open_for: Option<Duration>,
    /// Half-open: the probe calls out now.
    pub probes_out: u32,
    /// Half-open with probes out: the time until the newest is overdue (then a caller that
    /// finds every slot taken counts them failed).
    pub probes_overdue_in: Option<Duration>,
}

fn percent(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 * 100.0 / whole as f64)
}

fn metrics(c: &Circuit) -> CircuitMetrics {
    metrics_at(c, c.common.now())
}

fn metrics_at(c: &Circuit, now: u64) -> CircuitMetrics {
    let (window_calls, window_failures, window_slow_calls) = c.window_totals_at(now);
    let timers = c.timers(now);
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
        failure_rate: percent(window_failures, window_calls),
        slow_call_rate: percent(window_slow_calls, window_calls),
        until_half_open: timers.until_half_open,
        open_for: timers.open_for,
        probes_out: timers.probes_out,
        probes_overdue_in: timers.probes_overdue_in,
    }
}

/// Every circuit of a layer at one moment ([`BreakerHandle::snapshot`]).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct BreakerSnapshot {
    /// The breaker's name.
    pub name: Arc<str>,
    /// The layer-wide mode.
    pub mode: CircuitMode,
    /// Every circuit, sorted by key.
    pub circuits: Vec<CircuitMetrics>,
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
    /// Whether both handles read the same circuits (the same layer, or clones of it).
    pub fn same_as(&self, other: &BreakerHandle) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// The breaker's configured name.
    pub fn name(&self) -> &str {
        &self.shared.config().name
    }

    /// The automatic state of the circuit for `key`, if it exists ([`SINGLE_KEY`] with
    /// [`CircuitKey::Single`](super::CircuitKey::Single), [`OVERFLOW_KEY`] for the overflow circuit).
    pub fn state(&self, key: &str) -> Option<CircuitState> {
        self.shared.get(key).map(|c| c.state())
    }

    /// The state and counters of the circuit for `key`, if it exists.
    pub fn metrics(&self, key: &str) -> Option<CircuitMetrics> {
        self.shared.get(key).map(|c| metrics(&c))
    }

    /// The state and counters of every circuit, sorted by key (the circuits of
    /// [`snapshot`](Self::snapshot)).
    pub fn all_metrics(&self) -> Vec<CircuitMetrics> {
        self.snapshot().circuits
    }

    /// Every circuit's state, rates, timers and counters, sorted by key, for a status page.
    ///
    /// The registry's read lock is held only to copy the circuits' handles (one reference
    /// count each); the figures are then read circuit by circuit, each under its own lock for
    /// the window's totals only, at one clock reading. Calls keep flowing meanwhile: a new
    /// key waits for the copy, never for the figures. The cost grows linearly with the number
    /// of circuits (see the README for a measured figure).
    pub fn snapshot(&self) -> BreakerSnapshot {
        let circuits = self.shared.all();
        let now = self.shared.common.now();
        BreakerSnapshot {
            name: self.shared.config().name.clone(),
            mode: self.mode(),
            circuits: circuits.iter().map(|c| metrics_at(c, now)).collect(),
        }
    }

    /// The layer-wide mode.
    pub fn mode(&self) -> CircuitMode {
        CircuitMode::from_u8(self.shared.common.mode.load(Ordering::Relaxed))
    }

    /// Sets the layer-wide mode; anything but [`CircuitMode::Auto`] overrides every circuit's own.
    pub fn set_mode(&self, mode: CircuitMode) {
        self.shared
            .common
            .mode
            .store(mode.to_u8(), Ordering::Relaxed);
        tracing::info!(layer = "breaker", name = ?self.name(), ?mode, "breaker mode set");
    }

    /// Sets the mode of the circuit for `key`, creating the circuit if needed (so a key can be
    /// forced open before its first call). With [`CircuitKey::Single`](super::CircuitKey::Single) the
    /// key is ignored and the one circuit is set.
    pub fn set_mode_for(&self, key: &str, mode: CircuitMode) {
        let c = if matches!(self.shared.config().key_by, super::CircuitKey::Single) {
            self.shared.single.clone()
        } else {
            self.shared.circuit(key)
        };
        c.mode.store(mode.to_u8(), Ordering::Relaxed);
        tracing::info!(layer = "breaker", name = ?self.name(), circuit = ?c.key, ?mode, "circuit mode set");
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::{CircuitBreakerLayer, CircuitKey};

    fn inspected(shared: &Shared) -> u64 {
        shared.map.read().unwrap().inspected
    }

    #[test]
    fn a_new_key_looks_at_a_bounded_number_of_circuits() {
        let layer = CircuitBreakerLayer::builder()
            .key_by(CircuitKey::Model)
            .max_keys(1000)
            .build()
            .unwrap();
        let h = layer.handle();
        // A full map of circuits that must all be kept.
        for i in 0..1000 {
            h.set_mode_for(&format!("kept-{i}"), CircuitMode::ForcedOpen);
        }
        assert_eq!(inspected(&h.shared), 0);
        for i in 0..1000 {
            let c = h.shared.circuit(&format!("new-{i}"));
            assert_eq!(&*c.key, OVERFLOW_KEY);
        }
        let looked = inspected(&h.shared);
        assert!(looked <= 1000 * SCAN as u64, "{looked} circuits looked at");
        // Once they may go, a new key finds room within the same bound.
        for i in 0..1000 {
            h.set_mode_for(&format!("kept-{i}"), CircuitMode::Auto);
        }
        let before = inspected(&h.shared);
        let c = h.shared.circuit("fresh");
        assert_eq!(&*c.key, "fresh");
        assert!(inspected(&h.shared) - before <= SCAN as u64);
        assert_eq!(h.shared.map.read().unwrap().by_key.len(), 1000);
        assert_eq!(h.shared.map.read().unwrap().ring.len(), 1000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_snapshot_shows_rates_and_timers() {
        use crate::breaker::circuit::Verdict;
        let layer = CircuitBreakerLayer::builder()
            .key_by(CircuitKey::Model)
            .count_window(10)
            .minimum_calls(4)
            .failure_rate(50.0)
            .open_duration(std::time::Duration::from_secs(30))
            .jitter(0.0)
            .half_open_probes(2)
            .build()
            .unwrap();
        let h = layer.handle();
        let a = h.shared.circuit("a");
        let b = h.shared.circuit("b");
        h.shared.circuit("idle");
        for v in [Verdict::Success, Verdict::Failure, Verdict::Success] {
            a.admit().unwrap().complete(v);
        }
        for _ in 0..4 {
            b.admit().unwrap().complete(Verdict::Failure);
        }
        tokio::time::advance(std::time::Duration::from_secs(10)).await;
        let snap = h.snapshot();
        let keys: Vec<&str> = snap.circuits.iter().map(|c| &*c.key).collect();
        assert_eq!(keys, ["a", "b", "idle"]);
        let [ma, mb, idle] = &snap.circuits[..] else {
            unreachable!()
        };
        assert_eq!(ma.state, CircuitState::Closed);
        assert!((ma.failure_rate.unwrap() - 100.0 / 3.0).abs() < 1e-9);
        assert_eq!(ma.slow_call_rate, Some(0.0));
        assert_eq!((ma.until_half_open, ma.open_for), (None, None));
        assert_eq!(mb.state, CircuitState::Open);
        assert_eq!(mb.failure_rate, None, "the window starts anew on opening");
        assert_eq!(mb.open_for, Some(std::time::Duration::from_secs(30)));
        assert_eq!(mb.until_half_open, Some(std::time::Duration::from_secs(20)));
        assert_eq!((idle.failure_rate, idle.window_calls), (None, 0));
        assert_eq!(h.all_metrics(), snap.circuits);

        // Half-open with one probe out: the probe's deadline shows.
        tokio::time::advance(std::time::Duration::from_secs(20)).await;
        let probe = b.admit().unwrap();
        let mb = h.metrics("b").unwrap();
        assert_eq!((mb.state, mb.probes_out), (CircuitState::HalfOpen, 1));
        assert_eq!(
            mb.probes_overdue_in,
            Some(std::time::Duration::from_secs(30))
        );
        assert_eq!(mb.until_half_open, None);
        drop(probe);
    }

    #[test]
    fn long_keys_are_cut_at_a_character_boundary_and_hashed() {
        let key = "é".repeat(1000);
        let b = bounded_key(&key, 64);
        assert!(b.len() <= 64, "{}", b.len());
        assert!(b.starts_with('é') && b.contains("~sha256:"), "{b}");
        assert_ne!(b, bounded_key(&format!("{key}x"), 64));
        assert_eq!(bounded_key("short", 64), "short");
    }
}
