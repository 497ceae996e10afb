//! The per-key GCRA state: a sharded map from key to theoretical arrival time, plugged into
//! governor as its state store, plus the tokio-backed clock.
//!
//! Each shard is a `hashbrown::HashTable` (the table under std's `HashMap`, optional with the
//! `rate-limit` feature and already in governor's tree) rather than a `HashMap`: a lookup
//! brings the hash computed once per request, and the entries need not keep it (32 bytes
//! instead of 40 each; 10^6 client addresses in +67 MiB instead of +83 MiB).

use std::cell::Cell;
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
use hashbrown::HashTable;

use super::Quota;

/// What a bucket is keyed by. Cheap to clone: addresses and digests are inline, strings are
/// shared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RateKey {
    /// A client address (an IPv6 one cut to its prefix).
    Ip(IpAddr),
    /// An API key id, a header value, a route, a model or a custom key, at most the layer's
    /// `max_key_len` bytes long.
    Str(Arc<str>),
    /// The SHA-256 of a longer key (behind a pointer, so that the enum stays as small as an
    /// address).
    Digest(Arc<[u8; 32]>),
    /// Requests for which no key could be found share this one.
    Anonymous,
    /// The single key of the global quota.
    Global,
}

/// One `write` into the hasher per key (a derived `Hash` writes the variant, then the string,
/// then a terminator: three rounds of the keyed hash's buffering). Keys of different variants
/// may hash alike; they still compare unequal, and one layer keys by one kind.
impl std::hash::Hash for RateKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        match self {
            RateKey::Ip(IpAddr::V4(a)) => state.write(&a.octets()),
            RateKey::Ip(IpAddr::V6(a)) => state.write(&a.octets()),
            RateKey::Str(s) => state.write(s.as_bytes()),
            RateKey::Digest(d) => state.write(&d[..]),
            RateKey::Anonymous => state.write_u8(0),
            RateKey::Global => state.write_u8(1),
        }
    }
}

// A key is as small as before long keys were hashed: each tracked entry's size depends on it.
const _: () = assert!(std::mem::size_of::<RateKey>() <= 24);

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

impl TokioClock {
    /// Nanoseconds since the epoch, without recording the reading as governor's.
    fn read(&self) -> u64 {
        let d = tokio::time::Instant::now().saturating_duration_since(self.epoch);
        u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
    }
}

impl Clock for TokioClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        let now = self.read();
        LAST_NOW.with(|c| c.set(now));
        Nanos::from(now)
    }
}

const SHARDS: usize = 32;

/// A key with its bucket's theoretical arrival time. The hash is not kept: a lookup brings
/// it (computed once per request), and only growing a shard's table hashes the keys again.
struct Entry {
    key: RateKey,
    tat: AtomicU64,
}

// 32 bytes an entry: a million keys' tables fit in about 64 MiB.
const _: () = assert!(std::mem::size_of::<Entry>() <= 32);

/// The entries of one shard, found by the hash the caller brings; keys compare directly.
type Map = HashTable<Entry>;

/// A shard too small to be worth evicting from holds at most this many entries more than twice
/// the live ones found by its last eviction.
const EVICT_SLACK: usize = 64;

/// One shard: its map, and the size at which inserting a new key first evicts the idle ones.
struct Shard {
    map: Map,
    evict_at: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Shard {
            map: Map::default(),
            evict_at: EVICT_SLACK,
        }
    }
}

impl Shard {
    /// The arrival time held for `key`, found by its hash.
    fn find(&self, hash: u64, key: &RateKey) -> Option<&AtomicU64> {
        self.map.find(hash, |e| e.key == *key).map(|e| &e.tat)
    }

    /// Drops the entries whose bucket is full again, and sets the next eviction point at twice
    /// what is left (plus some slack): between two evictions at least half as many keys were
    /// inserted as the eviction visits, so each insertion pays O(1) amortized.
    fn evict(&mut self, drop_below: u64) {
        self.map
            .retain(|e| e.tat.load(Ordering::Relaxed) > drop_below);
        self.evict_at = self.map.len().saturating_mul(2).saturating_add(EVICT_SLACK);
    }
}

/// A sharded `RwLock<HashMap>` of theoretical arrival times. Existing keys are measured under a
/// read lock with a compare-and-swap; only new keys take a shard's write lock, and a new key
/// that finds its shard grown to twice its live size evicts the idle entries first.
pub(crate) struct KeyStore {
    hasher: RandomState,
    shards: Box<[RwLock<Shard>]>,
    clock: TokioClock,
    /// The clock reading taken just after governor took its own start: arrival times (which
    /// are relative to governor's start) are compared with a "now" never later than governor's,
    /// so an eviction never forgets a key governor still counts.
    start: AtomicU64,
    /// One cell's replenish time, in nanoseconds.
    t: u64,
}

impl KeyStore {
    fn new(clock: TokioClock, t: u64) -> Self {
        KeyStore {
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            clock,
            start: AtomicU64::new(0),
            t,
        }
    }

    /// Arrival times at or below this are full buckets (governor's own rule, one cell of
    /// margin).
    fn drop_below(&self) -> u64 {
        // Not `now()`: this runs inside governor's decision, whose clock reading `take` reads
        // back afterwards.
        let now = self.clock.read();
        now.saturating_sub(self.start.load(Ordering::Relaxed))
            .saturating_sub(self.t)
    }

    fn locate(&self, key: &RateKey) -> (u64, &RwLock<Shard>) {
        let h = self.hasher.hash_one(key);
        // The low bits pick the bucket inside a shard; the high bits pick the shard.
        (h, &self.shards[(h >> 58) as usize % SHARDS])
    }

    fn get(&self, key: &RateKey) -> Option<u64> {
        let (h, lock) = self.locate(key);
        let shard = lock.read().unwrap_or_else(|e| e.into_inner());
        shard.find(h, key).map(|a| a.load(Ordering::Acquire))
    }

    /// Applies `f` to the stored arrival time (if the key is present).
    fn update(&self, key: &RateKey, f: impl Fn(u64) -> u64) {
        let (h, lock) = self.locate(key);
        let shard = lock.read().unwrap_or_else(|e| e.into_inner());
        if let Some(a) = shard.find(h, key) {
            let _ = a.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| Some(f(v)));
        }
    }

    /// Applies `f` to the stored arrival time, `0` standing for an absent key (a full bucket);
    /// an absent key is inserted when `f` gives it a time.
    fn upsert(&self, key: &RateKey, f: impl Fn(u64) -> u64) {
        let (h, lock) = self.locate(key);
        {
            let shard = lock.read().unwrap_or_else(|e| e.into_inner());
            if let Some(a) = shard.find(h, key) {
                let _ = a.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| Some(f(v)));
                return;
            }
        }
        let mut shard = lock.write().unwrap_or_else(|e| e.into_inner());
        let a = self.insert(&mut shard, h, key);
        let _ = a.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| Some(f(v)));
    }

    /// The entry for a key, inserted (empty) if absent; a shard at its eviction point forgets
    /// its idle keys first.
    fn insert<'s>(&self, shard: &'s mut Shard, hash: u64, key: &RateKey) -> &'s AtomicU64 {
        if shard.map.len() >= shard.evict_at && shard.find(hash, key).is_none() {
            shard.evict(self.drop_below());
        }
        let entry = shard
            .map
            .entry(hash, |e| e.key == *key, |e| self.hasher.hash_one(&e.key))
            .or_insert_with(|| Entry {
                key: key.clone(),
                tat: AtomicU64::new(0),
            });
        &entry.into_mut().tat
    }

    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|e| e.into_inner()).map.len())
            .sum()
    }
}

thread_local! {
    /// The arrival time this thread last wrote, read back right after a successful check so
    /// the headers need no second lookup.
    static LAST_TAT: Cell<u64> = const { Cell::new(0) };
    /// The clock reading this thread last took (the time governor decided at).
    static LAST_NOW: Cell<u64> = const { Cell::new(0) };
}

fn measure<T, E, F>(a: &AtomicU64, f: F) -> Result<T, E>
where
    F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
{
    let mut prev = a.load(Ordering::Acquire);
    loop {
        let (out, next) = f((prev != 0).then(|| Nanos::from(prev)))?;
        let next: u64 = next.into();
        match a.compare_exchange_weak(prev, next, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                LAST_TAT.with(|c| c.set(next));
                return Ok(out);
            }
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
        let (h, lock) = self.0.locate(key);
        {
            let shard = lock.read().unwrap_or_else(|e| e.into_inner());
            if let Some(a) = shard.find(h, key) {
                return measure(a, f);
            }
        }
        let mut shard = lock.write().unwrap_or_else(|e| e.into_inner());
        let a = self.0.insert(&mut shard, h, key);
        measure(a, f)
    }
}

impl ShrinkableKeyedStateStore<RateKey> for SharedStore {
    fn retain_recent(&self, drop_below: Nanos) {
        let drop_below: u64 = drop_below.into();
        // governor's reading of now may be a little later than the store's own: keep the more
        // careful of the two.
        let drop_below = drop_below.min(self.0.drop_below());
        for s in self.0.shards.iter() {
            s.write()
                .unwrap_or_else(|e| e.into_inner())
                .evict(drop_below);
        }
    }

    fn shrink_to_fit(&self) {
        let hasher = &self.0.hasher;
        for s in self.0.shards.iter() {
            s.write()
                .unwrap_or_else(|e| e.into_inner())
                .map
                .shrink_to_fit(|e| hasher.hash_one(&e.key));
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
    /// Admitted; the bucket's state after it.
    Ok(Status),
    /// Not now: conforming after this wait.
    Wait(Duration),
    /// More cells than the bucket holds.
    NeverFits,
}

/// The state of one key's bucket, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Status {
    pub(crate) limit: u32,
    pub(crate) remaining: u32,
    pub(crate) reset_ns: u64,
}

impl Status {
    /// The time until the bucket is full again.
    pub(crate) fn reset(&self) -> Duration {
        Duration::from_nanos(self.reset_ns)
    }
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

/// How far ahead of now a bucket's arrival time may be pushed by overruns: about 73 years.
/// Together with the build-time bound on a bucket's size (the same), governor's arithmetic
/// (`tat + weight`, `start + tat`) stays far from `u64::MAX`.
pub(crate) const MAX_AHEAD_NANOS: u64 = 1 << 61;

impl Bucket {
    pub(crate) fn new(quota: Quota, clock: TokioClock) -> Self {
        let store = SharedStore(Arc::new(KeyStore::new(clock, quota.replenish_nanos())));
        let start = clock.now();
        let limiter = RateLimiter::new(quota.to_governor(), store.clone(), clock);
        store.0.start.store(clock.read(), Ordering::Relaxed);
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
            return Take::Ok(self.status(key));
        };
        // A refusal with nothing to wait for comes from a stale reading of the clock (the
        // thread was preempted between reading it and deciding): decide again.
        for _ in 0..3 {
            match self.limiter.check_key_n(key, n) {
                Ok(Ok(())) => {
                    let tat = LAST_TAT.with(Cell::get);
                    let now = Nanos::from(LAST_NOW.with(Cell::get));
                    return Take::Ok(
                        self.status_at(Some(tat), now.duration_since(self.start).into()),
                    );
                }
                Ok(Err(not_until)) => {
                    let wait = not_until.wait_time_from(self.limiter.clock().now());
                    if !wait.is_zero() {
                        return Take::Wait(wait);
                    }
                }
                Err(_) => return Take::NeverFits,
            }
        }
        Take::Wait(Duration::from_nanos(1))
    }

    /// Charges `n` more cells (a usage overrun) without asking: later requests wait longer.
    /// A key forgotten meanwhile (its bucket was full) is entered again with the debt. The
    /// arrival time never goes more than [`MAX_AHEAD_NANOS`] past now.
    pub(crate) fn charge(&self, key: &RateKey, n: u64) {
        if n == 0 {
            return;
        }
        let now = self.now();
        let add = n.saturating_mul(self.t);
        let ceiling = now.saturating_add(MAX_AHEAD_NANOS);
        self.store.0.upsert(key, |tat| {
            tat.max(now).saturating_add(add).min(ceiling).max(tat)
        });
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

    /// How long until `n` cells (at most the burst) would be admitted for `key`.
    pub(crate) fn wait_for(&self, key: &RateKey, n: u32) -> Duration {
        let Some(tat) = self.store.0.get(key) else {
            return Duration::ZERO;
        };
        let room = u64::from(self.quota.burst_size().saturating_sub(n)).saturating_mul(self.t);
        Duration::from_nanos(tat.saturating_sub(self.now()).saturating_sub(room))
    }

    /// The key's remaining cells and the time until its bucket is full again.
    pub(crate) fn status(&self, key: &RateKey) -> Status {
        self.status_at(self.store.0.get(key), self.now())
    }

    fn status_at(&self, tat: Option<u64>, now: u64) -> Status {
        let burst = self.quota.burst_size();
        let (remaining, reset_ns) = match tat {
            Some(tat) if tat > now => {
                let capacity = u64::from(burst).saturating_mul(self.t);
                let free = capacity.saturating_sub(tat - now);
                let remaining = u32::try_from(free / self.t).unwrap_or(burst);
                (remaining, tat - now)
            }
            _ => (burst, 0),
        };
        Status {
            limit: burst,
            remaining,
            reset_ns,
        }
    }

    /// Every key held with its arrival time, copied shard by shard under each shard's read
    /// lock (admissions of existing keys share it; a new key waits for one shard's copy).
    pub(crate) fn entries(&self, out: &mut Vec<(RateKey, u64)>) {
        for lock in self.store.0.shards.iter() {
            let shard = lock.read().unwrap_or_else(|e| e.into_inner());
            out.extend(
                shard
                    .map
                    .iter()
                    .map(|e| (e.key.clone(), e.tat.load(Ordering::Acquire))),
            );
        }
    }

    /// The arrival time held for `key`, if any.
    pub(crate) fn arrival(&self, key: &RateKey) -> Option<u64> {
        self.store.0.get(key)
    }

    /// The status for an arrival time, at now; reads the clock without recording the reading
    /// as governor's (so a snapshot never disturbs an admission's read-back).
    pub(crate) fn status_now(&self, tat: u64) -> Status {
        let now = Nanos::from(self.clock.read())
            .duration_since(self.start)
            .into();
        self.status_at(Some(tat), now)
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

    /// The requests in flight for `key`.
    pub(crate) fn count(&self, key: &RateKey) -> u32 {
        self.shard(key).get(key).copied().unwrap_or(0)
    }

    /// Every key with requests in flight, copied shard by shard.
    pub(crate) fn entries(&self, out: &mut Vec<(RateKey, u32)>) {
        for s in self.shards.iter() {
            let shard = s.lock().unwrap_or_else(|e| e.into_inner());
            out.extend(shard.iter().map(|(k, n)| (k.clone(), *n)));
        }
    }
}
