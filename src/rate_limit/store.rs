//! The per-key GCRA state: a sharded map from key to theoretical arrival time, plugged into
//! governor as its state store, plus the tokio-backed clock.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use governor::clock::{Clock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::{KeyedStateStore, ShrinkableKeyedStateStore};
use governor::state::StateStore;
use governor::RateLimiter;

use super::Quota;

/// What a bucket is keyed by. Cheap to clone: addresses are inline, strings are shared.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum RateKey {
    /// A client address.
    Ip(IpAddr),
    /// An API key id, a header value, a route, a model or a custom key.
    Str(Arc<str>),
    /// Requests for which no key could be found share this one.
    Anonymous,
    /// The single key of the global quota.
    Global,
}

/// A governor [`Clock`] reading `tokio::time::Instant`, so limits follow tokio's paused and
/// advanced time in tests. Instants are nanoseconds since the clock's epoch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TokioClock {
    epoch: tokio::time::Instant,
}

impl TokioClock {
    pub(crate) fn new() -> Self {
        TokioClock {
            epoch: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        let d = tokio::time::Instant::now().saturating_duration_since(self.epoch);
        Nanos::from(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }
}

const SHARDS: usize = 32;

/// A sharded `RwLock<HashMap>` of theoretical arrival times. Existing keys are measured under a
/// read lock with a compare-and-swap; only new keys take a shard's write lock.
pub(crate) struct KeyStore {
    hasher: RandomState,
    shards: Box<[RwLock<HashMap<RateKey, AtomicU64>>]>,
}

impl KeyStore {
    fn new() -> Self {
        KeyStore {
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
        }
    }

    fn shard(&self, key: &RateKey) -> &RwLock<HashMap<RateKey, AtomicU64>> {
        let h = self.hasher.hash_one(key) as usize;
        &self.shards[(h >> 7) % SHARDS]
    }

    fn get(&self, key: &RateKey) -> Option<u64> {
        let shard = self.shard(key).read().unwrap_or_else(|e| e.into_inner());
        shard.get(key).map(|a| a.load(Ordering::Acquire))
    }

    /// Applies `f` to the stored arrival time (if the key is present).
    fn update(&self, key: &RateKey, f: impl Fn(u64) -> u64) {
        let shard = self.shard(key).read().unwrap_or_else(|e| e.into_inner());
        if let Some(a) = shard.get(key) {
            let _ = a.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| Some(f(v)));
        }
    }

    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}

fn measure<T, E, F>(a: &AtomicU64, f: F) -> Result<T, E>
where
    F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
{
    let mut prev = a.load(Ordering::Acquire);
    loop {
        let (out, next) = f((prev != 0).then(|| Nanos::from(prev)))?;
        match a.compare_exchange_weak(prev, next.into(), Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Ok(out),
            Err(p) => prev = p,
        }
    }
}

/// The handle governor owns; the bucket keeps another one to read and adjust the state.
#[derive(Clone)]
pub(crate) struct SharedStore(Arc<KeyStore>);

impl StateStore for SharedStore {
    type Key = RateKey;

    fn measure_and_replace<T, F, E>(&self, key: &RateKey, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let lock = self.0.shard(key);
        {
            let shard = lock.read().unwrap_or_else(|e| e.into_inner());
            if let Some(a) = shard.get(key) {
                return measure(a, f);
            }
        }
        let mut shard = lock.write().unwrap_or_else(|e| e.into_inner());
        let a = shard
            .entry(key.clone())
            .or_insert_with(|| AtomicU64::new(0));
        measure(a, f)
    }
}

impl ShrinkableKeyedStateStore<RateKey> for SharedStore {
    fn retain_recent(&self, drop_below: Nanos) {
        let drop_below: u64 = drop_below.into();
        for s in self.0.shards.iter() {
            s.write()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|_, v| v.load(Ordering::Relaxed) > drop_below);
        }
    }

    fn shrink_to_fit(&self) {
        for s in self.0.shards.iter() {
            s.write().unwrap_or_else(|e| e.into_inner()).shrink_to_fit();
        }
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.len() == 0
    }
}

// `KeyedStateStore` is blanket-implemented for `StateStore`s with hashable keys.
const _: fn() = || {
    fn assert<S: KeyedStateStore<RateKey>>() {}
    assert::<SharedStore>();
};

type Limiter = RateLimiter<RateKey, SharedStore, TokioClock, NoOpMiddleware<Nanos>>;

/// The outcome of taking cells from a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Take {
    /// Admitted.
    Ok,
    /// Not now: conforming after this wait.
    Wait(Duration),
    /// More cells than the bucket holds.
    NeverFits,
}

/// The state of one key's bucket, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Status {
    pub(crate) limit: u32,
    pub(crate) remaining: u64,
    pub(crate) reset: Duration,
}

/// One quota: a governor keyed limiter over its own key store.
pub(crate) struct Bucket {
    quota: Quota,
    limiter: Limiter,
    store: SharedStore,
    clock: TokioClock,
    /// Our reading of the limiter's start, taken just before governor takes its own: "now" as
    /// computed here is never earlier than governor's, so refunds never overshoot.
    start: Nanos,
    t: u64,
}

impl Bucket {
    pub(crate) fn new(quota: Quota, clock: TokioClock) -> Self {
        let store = SharedStore(Arc::new(KeyStore::new()));
        let start = clock.now();
        let limiter = RateLimiter::new(quota.to_governor(), store.clone(), clock);
        Bucket {
            quota,
            limiter,
            store,
            clock,
            start,
            t: quota.replenish_nanos(),
        }
    }

    pub(crate) fn quota(&self) -> Quota {
        self.quota
    }

    fn now(&self) -> u64 {
        self.clock.now().duration_since(self.start).into()
    }

    /// Takes `n` cells for `key`, all or none.
    pub(crate) fn take(&self, key: &RateKey, n: u32) -> Take {
        let Some(n) = NonZeroU32::new(n) else {
            return Take::Ok;
        };
        match self.limiter.check_key_n(key, n) {
            Ok(Ok(())) => Take::Ok,
            Ok(Err(not_until)) => Take::Wait(not_until.wait_time_from(self.limiter.clock().now())),
            Err(_) => Take::NeverFits,
        }
    }

    /// Charges `n` more cells (a usage overrun) without asking: later requests wait longer.
    pub(crate) fn charge(&self, key: &RateKey, n: u64) {
        let now = self.now();
        let add = n.saturating_mul(self.t);
        self.store
            .0
            .update(key, |tat| tat.max(now).saturating_add(add));
    }

    /// Gives `n` cells back (unused tokens, or an admission undone), never making the bucket
    /// fuller than full.
    pub(crate) fn refund(&self, key: &RateKey, n: u64) {
        let now = self.now();
        let sub = n.saturating_mul(self.t);
        self.store
            .0
            .update(key, |tat| tat.saturating_sub(sub).max(now).max(1));
    }

    /// The key's remaining cells and the time until its bucket is full again.
    pub(crate) fn status(&self, key: &RateKey) -> Status {
        let burst = self.quota.burst_size();
        let now = self.now();
        let (remaining, reset) = match self.store.0.get(key) {
            Some(tat) if tat > now => {
                let capacity = u64::from(burst) * self.t;
                let free = capacity.saturating_sub(tat - now);
                (free / self.t, Duration::from_nanos(tat - now))
            }
            _ => (u64::from(burst), Duration::ZERO),
        };
        Status {
            limit: burst,
            remaining,
            reset,
        }
    }

    /// Forgets keys whose bucket is full again, and returns memory to the allocator.
    pub(crate) fn sweep(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    pub(crate) fn len(&self) -> usize {
        self.store.0.len()
    }
}

/// Requests in flight per key, for the concurrency cap. Only keys with requests in flight
/// have an entry.
pub(crate) struct Inflight {
    hasher: RandomState,
    shards: Box<[Mutex<HashMap<RateKey, u32>>]>,
}

impl Inflight {
    pub(crate) fn new() -> Self {
        Inflight {
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    fn shard(&self, key: &RateKey) -> std::sync::MutexGuard<'_, HashMap<RateKey, u32>> {
        let h = self.hasher.hash_one(key) as usize;
        self.shards[(h >> 7) % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a slot if fewer than `cap` are taken.
    pub(crate) fn acquire(&self, key: &RateKey, cap: u32) -> bool {
        let mut shard = self.shard(key);
        let n = shard.entry(key.clone()).or_insert(0);
        if *n >= cap {
            if *n == 0 {
                shard.remove(key);
            }
            return false;
        }
        *n += 1;
        true
    }

    pub(crate) fn release(&self, key: &RateKey) {
        let mut shard = self.shard(key);
        if let Some(n) = shard.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                shard.remove(key);
            }
        }
    }

    pub(crate) fn shrink_to_fit(&self) {
        for s in self.shards.iter() {
            s.lock().unwrap_or_else(|e| e.into_inner()).shrink_to_fit();
        }
    }
}
