//! The reloadable key store; its rules are in the docs of [`ReloadableKeyStore`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::store::{InMemoryKeyStore, KeyHash, KeyStore, LookupResult};
use super::{config_error, ConfigError};

/// A key store swapped while requests run, and a key file reloaded on `SIGHUP` or when it
/// changes (feature `reload`).
///
/// [`ReloadableKeyStore`] holds an [`InMemoryKeyStore`] behind an atomic pointer
/// ([`arc-swap`](https://docs.rs/arc-swap)): a lookup loads the current set without a lock
/// and without touching a reference count, so the hot path stays that of the in-memory
/// store; [`ReloadableKeyStore::replace`] swaps the whole set at once. A request decides with
/// the set it loaded: a lookup that already ran keeps its record (an `Arc`), so requests in
/// flight finish with the keys they started with, and every request that starts after the
/// swap sees the new set. No request ever sees half of a file.
///
/// [`ReloadableKeyStore::watch_file`] reloads a TOML key file (the format of
/// [`InMemoryKeyStore::from_toml_str`]) on `SIGHUP` (Unix) and when its contents change
/// (the file is read every [`ReloadOptions::poll_interval`], one second by default, and parsed
/// only when its SHA-256 digest changed). Polling instead of file-system events works the same
/// on every platform and file system, and catches an editor's write-and-rename and the symlink
/// swap of a Kubernetes `ConfigMap`, which event watchers often miss; reading a small file
/// once a second costs nothing measurable. A file that does not parse, names a field wrongly
/// or repeats a secret is refused with the field named (`keys.toml: keys[2].sha256: ...`),
/// and the keys in force stay in force; the refusal is logged (warn) and reported to
/// [`KeyFileReloader::next_outcome`]. So is a file that cannot be read (deleted, say).
///
/// # Why these dependencies
///
/// `arc-swap` (no dependencies of its own but `rustversion`) gives the lock-free swap; a
/// `RwLock` would make every request take a lock. `SIGHUP` comes from tokio's own `signal`
/// feature. No file-watcher crate is used (see above).
///
/// # Logs
///
/// `key file reloaded` (info, with the file, the number of keys, how many were added and
/// removed), `key file refused; the previous keys stay in force` (warn, with the error, which
/// names the field and never quotes a secret).
///
/// ```
/// use llm_layers::auth::{InMemoryKeyStore, KeyHash, KeyRecord, KeyStore, ReloadableKeyStore};
///
/// let store = ReloadableKeyStore::new(InMemoryKeyStore::new([
///     KeyRecord::builder("old").secret("sk-old-0123456789abcdef").build()?,
/// ])?);
/// let layer_store = store.clone(); // hand this one to `ApiKeyAuthLayer::new`
///
/// let summary = store.replace(InMemoryKeyStore::new([
///     KeyRecord::builder("new").secret("sk-new-0123456789abcdef").build()?,
/// ])?);
/// assert_eq!((summary.keys, summary.added, summary.removed), (1, 1, 1));
/// let found = |secret: &str| layer_store.lookup_now(&KeyHash::of(secret.as_bytes()));
/// assert!(found("sk-new-0123456789abcdef").unwrap().unwrap().is_some());
/// assert!(found("sk-old-0123456789abcdef").unwrap().unwrap().is_none());
/// # Ok::<(), llm_layers::auth::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct ReloadableKeyStore {
    current: Arc<ArcSwap<InMemoryKeyStore>>,
}

/// What a swap changed, by secret digest: a record whose secret stayed but whose fields
/// changed (revoked, say) is neither added nor removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReloadSummary {
    /// Keys in the new set.
    pub keys: usize,
    /// Secrets in the new set that the old one did not have.
    pub added: usize,
    /// Secrets of the old set that the new one does not have.
    pub removed: usize,
}

impl fmt::Display for ReloadSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} keys ({} added, {} removed)",
            self.keys, self.added, self.removed
        )
    }
}

impl ReloadableKeyStore {
    /// A store that starts with these keys.
    pub fn new(store: InMemoryKeyStore) -> Self {
        ReloadableKeyStore {
            current: Arc::new(ArcSwap::from_pointee(store)),
        }
    }

    /// The keys in force now (a cheap, shared snapshot: later swaps do not change it).
    pub fn current(&self) -> InMemoryKeyStore {
        InMemoryKeyStore::clone(&self.current.load())
    }

    /// The number of keys in force.
    pub fn len(&self) -> usize {
        self.current.load().len()
    }

    /// Whether no key is in force.
    pub fn is_empty(&self) -> bool {
        self.current.load().is_empty()
    }

    /// Puts `store` in force for every request that starts from now on, and says what changed.
    pub fn replace(&self, store: InMemoryKeyStore) -> ReloadSummary {
        let old = self.current.swap(Arc::new(store));
        let new = self.current.load();
        let added = new
            .records()
            .filter(|r| old.get(r.hash()).is_none())
            .count();
        let removed = old
            .records()
            .filter(|r| new.get(r.hash()).is_none())
            .count();
        ReloadSummary {
            keys: new.len(),
            added,
            removed,
        }
    }

    /// Reads and parses the TOML key file and puts it in force; on any error the keys in
    /// force stay, and the error names the file and the field.
    pub fn reload_toml_file(&self, path: impl AsRef<Path>) -> Result<ReloadSummary, ConfigError> {
        let store = InMemoryKeyStore::from_toml_file(path)?;
        Ok(self.replace(store))
    }

    /// Watches the TOML key file at `path` and reloads it as [`ReloadOptions`] say, on a task
    /// of the current tokio runtime, until the returned [`KeyFileReloader`] is dropped.
    ///
    /// The file is not read at once: load the first set yourself (with
    /// [`InMemoryKeyStore::from_toml_file`]) so that a broken file stops the start.
    /// Fails outside a tokio runtime, and when the `SIGHUP` handler cannot be installed
    /// (the runtime needs its IO driver: `enable_all`).
    pub fn watch_file(
        &self,
        path: impl Into<PathBuf>,
        options: ReloadOptions,
    ) -> Result<KeyFileReloader, ConfigError> {
        let path = path.into();
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            config_error(
                "reload",
                "the key file is watched on a tokio runtime; none is running",
            )
        })?;
        #[cfg(unix)]
        let hangups = if options.sighup {
            let _guard = runtime.enter();
            Some(
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).map_err(
                    |e| config_error("reload.sighup", format!("cannot handle SIGHUP: {e}")),
                )?,
            )
        } else {
            None
        };
        // The digest of the file as it is now, so that only a change reloads it.
        let seen = std::fs::read(&path).ok().map(|b| KeyHash::of(&b));
        let (tx, rx) = watch::channel(None);
        let store = self.clone();
        let task = runtime.spawn(async move {
            let mut seen = seen;
            let mut poll = options.poll.map(|every| {
                let mut i = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                i
            });
            #[cfg(unix)]
            let mut hangups = hangups;
            loop {
                #[cfg(unix)]
                let hangup = async {
                    match hangups.as_mut() {
                        Some(s) => s.recv().await,
                        None => std::future::pending().await,
                    }
                };
                #[cfg(not(unix))]
                let hangup = std::future::pending::<Option<()>>();
                let tick = async {
                    match poll.as_mut() {
                        Some(i) => i.tick().await,
                        None => std::future::pending().await,
                    }
                };
                let forced = match futures_util::future::select(
                    std::pin::pin!(hangup),
                    std::pin::pin!(tick),
                )
                .await
                {
                    futures_util::future::Either::Left((None, _)) => return,
                    futures_util::future::Either::Left((Some(()), _)) => true,
                    futures_util::future::Either::Right(_) => false,
                };
                let file = path.clone();
                let last = seen;
                let read =
                    tokio::task::spawn_blocking(move || read_if_changed(&file, last, forced)).await;
                let outcome = match read {
                    Ok(Read::Unchanged) => continue,
                    Ok(Read::Parsed(digest, Ok(new))) => {
                        seen = digest;
                        let summary = store.replace(new);
                        tracing::info!(
                            target: "llm_layers::auth",
                            file = ?path,
                            keys = summary.keys,
                            added = summary.added,
                            removed = summary.removed,
                            "key file reloaded"
                        );
                        ReloadOutcome::Reloaded(summary)
                    }
                    Ok(Read::Parsed(digest, Err(e))) => {
                        // Refused once per version of the file, not once per poll.
                        seen = digest;
                        tracing::warn!(
                            target: "llm_layers::auth",
                            file = ?path,
                            error = ?e.to_string(),
                            "key file refused; the previous keys stay in force"
                        );
                        ReloadOutcome::Refused(e)
                    }
                    Err(_) => continue,
                };
                // Nobody may listen: the keys are reloaded all the same.
                let _ = tx.send(Some(outcome));
            }
        });
        Ok(KeyFileReloader { task, outcomes: rx })
    }
}

enum Read {
    Unchanged,
    Parsed(Option<KeyHash>, Result<InMemoryKeyStore, ConfigError>),
}

fn read_if_changed(path: &Path, last: Option<KeyHash>, forced: bool) -> Read {
    match std::fs::read(path) {
        Ok(bytes) => {
            let digest = KeyHash::of(&bytes);
            if !forced && last.is_some_and(|l| l.ct_eq(&digest)) {
                return Read::Unchanged;
            }
            let parsed = match std::str::from_utf8(&bytes) {
                Ok(text) => InMemoryKeyStore::from_toml_str(text).map_err(|e| {
                    config_error(
                        format!("{}: {}", path.display(), e.field()),
                        e.message().to_owned(),
                    )
                }),
                Err(_) => Err(config_error(
                    format!("{}", path.display()),
                    "the key file is not UTF-8 text",
                )),
            };
            Read::Parsed(Some(digest), parsed)
        }
        // An unreadable file is reported once, until it can be read again.
        Err(_) if !forced && last.is_none() => Read::Unchanged,
        Err(e) => Read::Parsed(
            None,
            Err(config_error(
                "path",
                format!("cannot read {}: {e}", path.display()),
            )),
        ),
    }
}

impl fmt::Debug for ReloadableKeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadableKeyStore")
            .field("keys", &self.len())
            .finish()
    }
}

impl KeyStore for ReloadableKeyStore {
    type Future = std::future::Ready<LookupResult>;

    fn lookup(&self, hash: &KeyHash) -> Self::Future {
        std::future::ready(Ok(self.current.load().get(hash).cloned()))
    }

    fn lookup_now(&self, hash: &KeyHash) -> Option<LookupResult> {
        Some(Ok(self.current.load().get(hash).cloned()))
    }
}

/// When [`ReloadableKeyStore::watch_file`] reloads the file.
#[derive(Clone, Copy, Debug)]
pub struct ReloadOptions {
    sighup: bool,
    poll: Option<Duration>,
}

impl Default for ReloadOptions {
    fn default() -> Self {
        ReloadOptions {
            sighup: true,
            poll: Some(Duration::from_secs(1)),
        }
    }
}

impl ReloadOptions {
    /// On `SIGHUP` and when the file changes (checked every second).
    pub fn new() -> Self {
        ReloadOptions::default()
    }

    /// Whether `SIGHUP` reloads the file (on by default; ignored off Unix). A `SIGHUP`
    /// reloads even a file whose contents did not change.
    pub fn sighup(mut self, on: bool) -> Self {
        self.sighup = on;
        self
    }

    /// How often the file is read to see whether it changed; `None` turns polling off. A
    /// zero interval is taken as one millisecond.
    pub fn poll_interval(mut self, every: Option<Duration>) -> Self {
        self.poll = every.map(|d| d.max(Duration::from_millis(1)));
        self
    }
}

/// What one reload did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The new keys are in force.
    Reloaded(ReloadSummary),
    /// The file was refused (the error names the file and the field); the previous keys
    /// stay in force.
    Refused(ConfigError),
}

/// The task that reloads a key file; dropping it stops the task.
pub struct KeyFileReloader {
    task: tokio::task::JoinHandle<()>,
    outcomes: watch::Receiver<Option<ReloadOutcome>>,
}

impl KeyFileReloader {
    /// Waits for the next reload (or refusal) after the last one this method returned.
    /// `None` once the task stopped.
    pub async fn next_outcome(&mut self) -> Option<ReloadOutcome> {
        self.outcomes.changed().await.ok()?;
        self.outcomes.borrow_and_update().clone()
    }
}

impl Drop for KeyFileReloader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl fmt::Debug for KeyFileReloader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyFileReloader").finish_non_exhaustive()
    }
}
