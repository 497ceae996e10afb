//! The caching key store; its rules are in the docs of [`CachedKeyStore`].

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures_util::future::{FutureExt, Shared};
use tokio::time::Instant;

use super::store::{
    DigestHasherBuilder, KeyHash, KeyRecord, KeyStore, KeyStoreError, LookupResult,
};
use super::{config_error, ConfigError};

/// The positive TTL by default.
pub const DEFAULT_POSITIVE_TTL: Duration = Duration::from_secs(30);
/// The negative TTL by default.
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(1);
/// The bound on cached entries by default.
pub const DEFAULT_MAX_ENTRIES: usize = 100_000;
/// The longest TTL a builder takes.
const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
const SWEEP_EVERY: Duration = Duration::from_secs(1);

type Answer = Result<Option<Arc<KeyRecord>>, Arc<KeyStoreError>>;
type InFlight = Shared<Pin<Box<dyn Future<Output = Answer> + Send>>>;

enum Entry {
    Settled {
        record: Option<Arc<KeyRecord>>,
        until: Instant,
    },
    Pending {
        id: u64,
        answer: InFlight,
    },
}

struct Map {
    entries: HashMap<KeyHash, Entry, DigestHasherBuilder>,
    settled: usize,
    next_id: u64,
    next_sweep: Instant,
}

struct Inner<K> {
    store: K,
    positive_ttl: Duration,
    negative_ttl: Duration,
    max_entries: usize,
    map: Mutex<Map>,
}

impl<K> Inner<K> {
    fn lock(&self) -> MutexGuard<'_, Map> {
        // The map is consistent after every statement: a panic elsewhere cannot break it.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A caching wrapper for any [`KeyStore`] whose lookups are slow or shared: a database, an
/// HTTP key service, a Redis behind several gateway replicas.
///
/// [`CachedKeyStore`] keeps what the store answered, by key digest:
///
/// * a key that was found is kept for the **positive TTL** (30 s by default). A key revoked,
///   removed or changed in the store is therefore still accepted by this replica for up to the
///   positive TTL: that is the bound on how long a revocation takes to reach every replica.
///   [`CachedKeyStore::invalidate`] (one key) and [`CachedKeyStore::clear`] make it take
///   effect at once on this replica. A record's expiry is checked on every request by the
///   layer, so caching never extends an expiring key;
/// * a key that was not found is kept for the **negative TTL** (1 s by default, at most the
///   positive TTL): a flood of requests with a wrong key costs one lookup a second, and a key
///   issued a moment ago works everywhere within a second;
/// * a failed lookup (`KeyStoreError`, answered `503`) is not kept: the next request asks the
///   store again.
///
/// Lookups are **single-flight**: while the store is asked about a digest, every other request
/// with the same key waits for that one answer instead of asking again (1,000 concurrent
/// requests with one unknown key make one lookup). The wait is shared: a request that gives up
/// does not cancel it for the others.
///
/// The cache is **bounded** by [`CachedKeyStoreBuilder::max_entries`] (100,000 by default).
/// When it is full, entries past their TTL are swept (at most once a second), and if it is
/// still full an arbitrary settled entry is dropped, so a flood of random keys costs the cache
/// its hit rate, never its memory. Lookups in flight are not counted; when every entry is a
/// lookup in flight, a new key is looked up without being cached.
///
/// A hit is answered within the layer's `call` ([`KeyStore::lookup_now`]): one uncontended
/// mutex, one map probe, one `Arc` clone, no allocation. Time is tokio's clock, so tests run
/// under `tokio::time::pause`.
///
/// ```
/// use std::{future::Future, pin::Pin, sync::Arc, time::Duration};
/// use llm_layers::auth::{ApiKeyAuthLayer, CachedKeyStore, KeyHash, KeyRecord, KeyStore, LookupResult};
///
/// #[derive(Clone)]
/// struct Db; // a connection pool, in real life
///
/// impl KeyStore for Db {
///     type Future = Pin<Box<dyn Future<Output = LookupResult> + Send>>;
///     fn lookup(&self, hash: &KeyHash) -> Self::Future {
///         let hex = hash.to_hex(); // `SELECT ... WHERE sha256 = $1`
///         Box::pin(async move { Ok(KeyRecord::builder("from-db").sha256_hex(&hex).build().ok().map(Arc::new)) })
///     }
/// }
///
/// let store = CachedKeyStore::builder(Db)
///     .positive_ttl(Duration::from_secs(10)) // a revocation reaches this replica within 10 s
///     .negative_ttl(Duration::from_millis(500))
///     .max_entries(50_000)
///     .build()?;
/// let layer = ApiKeyAuthLayer::new(store);
/// # Ok::<(), llm_layers::auth::ConfigError>(())
/// ```
///
pub struct CachedKeyStore<K> {
    inner: Arc<Inner<K>>,
}

impl<K> Clone for CachedKeyStore<K> {
    fn clone(&self) -> Self {
        CachedKeyStore {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<K: fmt::Debug> fmt::Debug for CachedKeyStore<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedKeyStore")
            .field("store", &self.inner.store)
            .field("positive_ttl", &self.inner.positive_ttl)
            .field("negative_ttl", &self.inner.negative_ttl)
            .field("max_entries", &self.inner.max_entries)
            .field("cached", &self.len())
            .finish()
    }
}

impl<K: KeyStore> CachedKeyStore<K> {
    /// A cache with the defaults: 30 s positive TTL, 1 s negative TTL, 100,000 entries.
    pub fn new(store: K) -> Self {
        CachedKeyStore::builder(store)
            .build()
            .expect("the defaults are valid")
    }

    /// A builder, to set the TTLs and the bound.
    pub fn builder(store: K) -> CachedKeyStoreBuilder<K> {
        CachedKeyStoreBuilder {
            store,
            positive_ttl: DEFAULT_POSITIVE_TTL,
            negative_ttl: DEFAULT_NEGATIVE_TTL,
            max_entries: DEFAULT_MAX_ENTRIES,
        }
    }
}

impl<K> CachedKeyStore<K> {
    /// The store behind the cache.
    pub fn store(&self) -> &K {
        &self.inner.store
    }

    /// The number of settled entries (found and not-found answers) held now, expired ones
    /// included until they are swept.
    pub fn len(&self) -> usize {
        self.inner.lock().settled
    }

    /// Whether no answer is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets what the store answered for this digest (a key just revoked or issued): the
    /// next request asks the store. A lookup in flight still answers the requests that
    /// wait for it.
    pub fn invalidate(&self, hash: &KeyHash) {
        let mut map = self.inner.lock();
        if let Some(Entry::Settled { .. }) = map.entries.remove(hash) {
            map.settled -= 1;
        }
    }

    /// Forgets every answer.
    pub fn clear(&self) {
        let mut map = self.inner.lock();
        map.entries.clear();
        map.settled = 0;
    }
}

/// Configures a [`CachedKeyStore`]; [`CachedKeyStoreBuilder::build`] checks it.
pub struct CachedKeyStoreBuilder<K> {
    store: K,
    positive_ttl: Duration,
    negative_ttl: Duration,
    max_entries: usize,
}

impl<K: fmt::Debug> fmt::Debug for CachedKeyStoreBuilder<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedKeyStoreBuilder")
            .field("store", &self.store)
            .field("positive_ttl", &self.positive_ttl)
            .field("negative_ttl", &self.negative_ttl)
            .field("max_entries", &self.max_entries)
            .finish()
    }
}

impl<K: KeyStore> CachedKeyStoreBuilder<K> {
    /// How long a found key is kept (30 s by default): the longest a revocation in the store
    /// takes to reach this replica.
    pub fn positive_ttl(mut self, ttl: Duration) -> Self {
        self.positive_ttl = ttl;
        self
    }

    /// How long a key that was not found is kept (1 s by default; zero keeps none, lookups
    /// stay single-flight): the longest a newly issued key waits on this replica.
    pub fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.negative_ttl = ttl;
        self
    }

    /// The most answers held (100,000 by default).
    pub fn max_entries(mut self, n: usize) -> Self {
        self.max_entries = n;
        self
    }

    /// Checks the settings: the positive TTL between 1 ms and 7 days, the negative TTL at
    /// most the positive one, at least one entry.
    pub fn build(self) -> Result<CachedKeyStore<K>, ConfigError> {
        if self.positive_ttl < Duration::from_millis(1) || self.positive_ttl > MAX_TTL {
            return Err(config_error(
                "positive_ttl",
                format!(
                    "must be between 1 ms and 7 days, got {:?}",
                    self.positive_ttl
                ),
            ));
        }
        if self.negative_ttl > self.positive_ttl {
            return Err(config_error(
                "negative_ttl",
                format!(
                    "must not be longer than positive_ttl ({:?}), got {:?}",
                    self.positive_ttl, self.negative_ttl
                ),
            ));
        }
        if self.max_entries == 0 {
            return Err(config_error(
                "max_entries",
                "must be at least 1 (to cache nothing, use the store itself)",
            ));
        }
        Ok(CachedKeyStore {
            inner: Arc::new(Inner {
                store: self.store,
                positive_ttl: self.positive_ttl,
                negative_ttl: self.negative_ttl,
                max_entries: self.max_entries,
                map: Mutex::new(Map {
                    entries: HashMap::with_hasher(DigestHasherBuilder),
                    settled: 0,
                    next_id: 0,
                    next_sweep: Instant::now(),
                }),
            }),
        })
    }
}

/// A shared store failure, handed to each request that waited for it.
#[derive(Debug)]
struct SharedFailure(Arc<KeyStoreError>);

impl fmt::Display for SharedFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self.0.inner(), f)
    }
}

impl std::error::Error for SharedFailure {}

fn answered(answer: Answer) -> LookupResult {
    answer.map_err(|e| KeyStoreError::new(SharedFailure(e)))
}

impl Map {
    /// Makes room for one more settled entry; false when every entry is a lookup in flight.
    fn make_room(&mut self, max: usize, now: Instant) -> bool {
        if self.settled < max {
            return true;
        }
        if now >= self.next_sweep {
            self.next_sweep = now + SWEEP_EVERY;
            self.entries.retain(|_, e| match e {
                Entry::Settled { until, .. } => *until > now,
                Entry::Pending { .. } => true,
            });
            self.settled = self
                .entries
                .values()
                .filter(|e| matches!(e, Entry::Settled { .. }))
                .count();
        }
        while self.settled >= max {
            let victim = self
                .entries
                .iter()
                .find(|(_, e)| matches!(e, Entry::Settled { .. }))
                .map(|(k, _)| *k);
            match victim {
                Some(k) => {
                    self.entries.remove(&k);
                    self.settled -= 1;
                }
                None => return false,
            }
        }
        true
    }
}

impl<K: KeyStore> KeyStore for CachedKeyStore<K> {
    type Future = Pin<Box<dyn Future<Output = LookupResult> + Send>>;

    fn lookup_now(&self, hash: &KeyHash) -> Option<LookupResult> {
        let map = self.inner.lock();
        match map.entries.get(hash) {
            Some(Entry::Settled { record, until }) if *until > Instant::now() => {
                Some(Ok(record.clone()))
            }
            _ => None,
        }
    }

    fn lookup(&self, hash: &KeyHash) -> Self::Future {
        let now = Instant::now();
        let mut map = self.inner.lock();
        let stale = match map.entries.get(hash) {
            Some(Entry::Settled { record, until }) if *until > now => {
                return Box::pin(std::future::ready(Ok(record.clone())));
            }
            Some(Entry::Pending { answer, .. }) => {
                return Box::pin(answer.clone().map(answered));
            }
            Some(Entry::Settled { .. }) => true,
            None => false,
        };
        if stale {
            map.entries.remove(hash);
            map.settled -= 1;
        }
        let id = map.next_id;
        map.next_id = map.next_id.wrapping_add(1);
        let lookup = self.inner.store.lookup(hash);
        let weak: Weak<Inner<K>> = Arc::downgrade(&self.inner);
        let key = *hash;
        let work: Pin<Box<dyn Future<Output = Answer> + Send>> = Box::pin(async move {
            let answer: Answer = lookup.await.map_err(Arc::new);
            if let Some(inner) = weak.upgrade() {
                settle(&inner, key, id, &answer);
            }
            answer
        });
        let answer = work.shared();
        map.entries.insert(
            *hash,
            Entry::Pending {
                id,
                answer: answer.clone(),
            },
        );
        Box::pin(answer.map(answered))
    }
}

/// Replaces the lookup `id` in flight for `key` by its answer (unless it was invalidated).
fn settle<K>(inner: &Inner<K>, key: KeyHash, id: u64, answer: &Answer) {
    let now = Instant::now();
    let mut map = inner.lock();
    if !matches!(map.entries.get(&key), Some(Entry::Pending { id: i, .. }) if *i == id) {
        return;
    }
    map.entries.remove(&key);
    let (record, ttl) = match answer {
        Ok(Some(record)) => (Some(Arc::clone(record)), inner.positive_ttl),
        Ok(None) => (None, inner.negative_ttl),
        Err(_) => return,
    };
    if ttl.is_zero() || !map.make_room(inner.max_entries, now) {
        return;
    }
    map.entries.insert(
        key,
        Entry::Settled {
            record,
            until: now + ttl,
        },
    );
    map.settled += 1;
}
