//! Key records and the stores that hold them.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::{ready, Future, Ready};
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::SystemTime;

use sha2::digest::generic_array::GenericArray;
use subtle::ConstantTimeEq;

use super::time::{format_rfc3339, parse_rfc3339};
use super::{config_error, ConfigError};
use crate::ext::{KeyIdentity, KeyLimits};

/// SHA-256's initial hash value (FIPS 180-4, 5.3.3).
const SHA256_IV: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// The SHA-256 digest of a key. Stores are keyed by it, so the secret itself is never kept.
///
/// `Debug` prints only that it is a digest, never its bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyHash([u8; 32]);

impl std::hash::Hash for KeyHash {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // A fixed-size value: no length prefix needed.
        state.write(&self.0);
    }
}

impl KeyHash {
    /// The digest of a presented or configured key.
    ///
    /// SHA-256 computed with the compression function directly (SHA-NI where the CPU has it):
    /// whole blocks straight from the key, the padded tail from a stack buffer; a key of up to
    /// 55 bytes is one call. `sha2`'s `Digest` gives the same bytes with a buffer and its
    /// bookkeeping around the same calls, about 12 % more time for such a key.
    pub fn of(secret: &[u8]) -> KeyHash {
        let mut state = SHA256_IV;
        let mut blocks = secret.chunks_exact(64);
        for block in &mut blocks {
            sha2::compress256(
                &mut state,
                std::slice::from_ref(GenericArray::from_slice(block)),
            );
        }
        let tail = blocks.remainder();
        let bits = (secret.len() as u64).wrapping_mul(8).to_be_bytes();
        let mut last = [[0u8; 64]; 2];
        last[0][..tail.len()].copy_from_slice(tail);
        last[0][tail.len()] = 0x80;
        // The length takes the last 8 bytes; a tail of more than 55 bytes leaves no room for
        // them, and the padding runs on into a second block.
        let n = if tail.len() < 56 { 1 } else { 2 };
        last[n - 1][56..].copy_from_slice(&bits);
        for block in &last[..n] {
            sha2::compress256(
                &mut state,
                std::slice::from_ref(GenericArray::from_slice(block)),
            );
        }
        let mut out = [0u8; 32];
        for (bytes, word) in out.chunks_exact_mut(4).zip(state) {
            bytes.copy_from_slice(&word.to_be_bytes());
        }
        KeyHash(out)
    }

    /// A digest from its 64 hex characters (either case).
    pub fn from_hex(hex: &str) -> Option<KeyHash> {
        let hex = hex.as_bytes();
        if hex.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in hex.chunks_exact(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Some(KeyHash(out))
    }

    /// The digest from its raw bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> KeyHash {
        KeyHash(bytes)
    }

    /// The raw digest, for a store that indexes it (a database column, say).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The digest as 64 lowercase hex characters.
    pub fn to_hex(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(64);
        for b in self.0 {
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
        out
    }

    /// Compares two digests in constant time: all 32 bytes are compared, as four 64-bit words
    /// through `subtle`, whatever their contents.
    pub fn ct_eq(&self, other: &KeyHash) -> bool {
        self.words()[..].ct_eq(&other.words()[..]).into()
    }

    fn words(&self) -> [u64; 4] {
        let mut words = [0u64; 4];
        for (word, bytes) in words.iter_mut().zip(self.0.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(bytes);
            *word = u64::from_ne_bytes(b);
        }
        words
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyHash(sha256:<redacted>)")
    }
}

/// A pattern of model names a key may use: an exact name (`gpt-4o`), or a glob where `*`
/// stands for any run of characters (`gpt-4o-mini*`, `*-embedding-*`, `*`).
#[derive(Clone, PartialEq, Eq)]
pub struct ModelPattern(Box<str>);

impl ModelPattern {
    /// A pattern. Fails on an empty pattern.
    pub fn new(pattern: impl Into<String>) -> Result<ModelPattern, ConfigError> {
        let pattern: String = pattern.into();
        if pattern.trim().is_empty() {
            return Err(config_error("models", "a model pattern is empty"));
        }
        Ok(ModelPattern(pattern.into_boxed_str()))
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the pattern matches every model (`*`, `**`, ...).
    pub fn is_any(&self) -> bool {
        self.0.bytes().all(|b| b == b'*')
    }

    /// Whether `model` matches. Matching is case-sensitive, as model names are.
    pub fn matches(&self, model: &str) -> bool {
        glob_match(self.0.as_bytes(), model.as_bytes())
    }
}

impl fmt::Debug for ModelPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for ModelPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `*` matches any run of bytes; everything else matches itself.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|b| *b == b'*')
}

/// One API key: an id that is safe to log, the digest of its secret, and what it may do.
///
/// Built with [`KeyRecord::builder`]. `Debug` never prints the digest.
#[derive(Clone)]
pub struct KeyRecord {
    hash: KeyHash,
    identity: KeyIdentity,
    expires_at: Option<SystemTime>,
    revoked: bool,
    models: Arc<[ModelPattern]>,
    unrestricted: bool,
    labels: BTreeMap<String, String>,
}

impl KeyRecord {
    /// A builder for a key with this id (safe to log; several records may share an id, as the
    /// old and new secret of a key being rotated do).
    pub fn builder(id: impl Into<Arc<str>>) -> KeyRecordBuilder {
        KeyRecordBuilder {
            id: id.into(),
            hash: None,
            bad_hash: false,
            bad_expiry: None,
            tier: None,
            limits: KeyLimits::new(),
            expires_at: None,
            revoked: false,
            models: Vec::new(),
            labels: BTreeMap::new(),
        }
    }

    /// The key's id, safe to log.
    pub fn id(&self) -> &str {
        self.identity.id()
    }

    /// The digest of the secret.
    pub fn hash(&self) -> &KeyHash {
        &self.hash
    }

    /// The identity other layers read (id, tier, limits).
    pub fn identity(&self) -> &KeyIdentity {
        &self.identity
    }

    /// The tier.
    pub fn tier(&self) -> Option<&str> {
        self.identity.tier()
    }

    /// The key's own limits.
    pub fn limits(&self) -> &KeyLimits {
        self.identity.limits()
    }

    /// When the key stops working.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.expires_at
    }

    /// Whether the key is expired at `now`.
    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        self.expires_at.is_some_and(|t| now >= t)
    }

    /// Whether the key was revoked.
    pub fn is_revoked(&self) -> bool {
        self.revoked
    }

    /// The model patterns the key may use; empty means any model.
    pub fn models(&self) -> &[ModelPattern] {
        &self.models
    }

    /// Whether the key may use any model (no patterns, or a `*` pattern).
    pub fn is_unrestricted(&self) -> bool {
        self.unrestricted
    }

    /// Whether the key may use `model`.
    pub fn allows_model(&self, model: &str) -> bool {
        self.unrestricted || self.models.iter().any(|p| p.matches(model))
    }

    /// Free-form labels (team, owner, environment).
    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.labels
    }
}

impl fmt::Debug for KeyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRecord")
            .field("id", &self.identity.id())
            .field("secret", &"<redacted>")
            .field("tier", &self.identity.tier())
            .field("limits", self.identity.limits())
            .field("expires_at", &self.expires_at.map(format_rfc3339))
            .field("revoked", &self.revoked)
            .field("models", &self.models)
            .field("labels", &self.labels)
            .finish()
    }
}

/// Builds a [`KeyRecord`]; [`KeyRecordBuilder::build`] checks it.
pub struct KeyRecordBuilder {
    id: Arc<str>,
    hash: Option<KeyHash>,
    bad_hash: bool,
    bad_expiry: Option<&'static str>,
    tier: Option<Arc<str>>,
    limits: KeyLimits,
    expires_at: Option<SystemTime>,
    revoked: bool,
    models: Vec<String>,
    labels: BTreeMap<String, String>,
}

impl fmt::Debug for KeyRecordBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRecordBuilder")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl KeyRecordBuilder {
    /// The plaintext secret; only its SHA-256 digest is kept.
    pub fn secret(mut self, secret: impl AsRef<[u8]>) -> Self {
        let secret = secret.as_ref();
        self.bad_hash = secret.is_empty();
        self.hash = Some(KeyHash::of(secret));
        self
    }

    /// The secret's SHA-256 digest as 64 hex characters, for stores that never see the secret.
    pub fn sha256_hex(mut self, hex: &str) -> Self {
        self.hash = KeyHash::from_hex(hex.trim());
        self.bad_hash = self.hash.is_none();
        self
    }

    /// The secret's SHA-256 digest.
    pub fn sha256(mut self, hash: KeyHash) -> Self {
        self.hash = Some(hash);
        self.bad_hash = false;
        self
    }

    /// The tier (`"free"`, `"pro"`), handed on in [`KeyIdentity`].
    pub fn tier(mut self, tier: impl Into<Arc<str>>) -> Self {
        self.tier = Some(tier.into());
        self
    }

    /// The key's own limits, handed on in [`KeyIdentity`] for a rate-limit layer.
    pub fn limits(mut self, limits: KeyLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The key stops working at this time.
    pub fn expires_at(mut self, at: SystemTime) -> Self {
        self.expires_at = Some(at);
        self
    }

    /// The key stops working at this RFC 3339 time (`2026-12-31T23:59:59Z`,
    /// `2026-12-31T23:59:59.5+01:00`); [`build`](Self::build) fails on any other text.
    pub fn expires_at_rfc3339(mut self, at: &str) -> Self {
        match parse_rfc3339(at) {
            Ok(t) => {
                self.expires_at = Some(t);
                self.bad_expiry = None;
            }
            Err(e) => self.bad_expiry = Some(e),
        }
        self
    }

    /// Marks the key revoked.
    pub fn revoked(mut self, revoked: bool) -> Self {
        self.revoked = revoked;
        self
    }

    /// Allows a model name or glob (`gpt-4o-mini*`). With none, every model is allowed.
    pub fn allow_model(mut self, pattern: impl Into<String>) -> Self {
        self.models.push(pattern.into());
        self
    }

    /// Allows each of these model names or globs.
    pub fn allow_models<I, M>(mut self, patterns: I) -> Self
    where
        I: IntoIterator<Item = M>,
        M: Into<String>,
    {
        self.models.extend(patterns.into_iter().map(Into::into));
        self
    }

    /// Adds a free-form label.
    pub fn label(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(name.into(), value.into());
        self
    }

    /// Checks and builds the record: the id must be non-empty, a secret (or its digest) must
    /// be given, the digest must be 64 hex characters, and model patterns must be non-empty.
    pub fn build(self) -> Result<KeyRecord, ConfigError> {
        if self.id.trim().is_empty() {
            return Err(config_error("id", "the key id is empty"));
        }
        if self.bad_hash {
            return Err(config_error(
                "secret",
                "the secret is empty, or the sha256 digest is not 64 hex characters",
            ));
        }
        if let Some(e) = self.bad_expiry {
            return Err(config_error("expires_at", e));
        }
        let Some(hash) = self.hash else {
            return Err(config_error(
                "secret",
                "give the key's secret or its sha256 digest",
            ));
        };
        let models = self
            .models
            .into_iter()
            .map(ModelPattern::new)
            .collect::<Result<Vec<_>, _>>()?;
        let unrestricted = models.is_empty() || models.iter().any(ModelPattern::is_any);
        let mut identity = KeyIdentity::new(self.id).with_limits(self.limits);
        if let Some(tier) = self.tier {
            identity = identity.with_tier(tier);
        }
        Ok(KeyRecord {
            hash,
            identity,
            expires_at: self.expires_at,
            revoked: self.revoked,
            models: models.into(),
            unrestricted,
            labels: self.labels,
        })
    }
}

/// A key store could not answer (a database down, say). The layer answers `503
/// service_unavailable` without passing this message to the client, and logs it.
#[derive(Debug)]
pub struct KeyStoreError(Box<dyn std::error::Error + Send + Sync>);

impl KeyStoreError {
    /// Wraps the store's own error.
    pub fn new(err: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        KeyStoreError(err.into())
    }

    /// The store's own error.
    pub fn inner(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.0
    }
}

impl fmt::Display for KeyStoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key store lookup failed: {}", self.0)
    }
}

impl std::error::Error for KeyStoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// What a store answers for a digest.
pub type LookupResult = Result<Option<Arc<KeyRecord>>, KeyStoreError>;

/// Where the layer looks keys up, by the SHA-256 digest of the presented key.
///
/// The layer confirms the returned record's digest in constant time, so a store may index by a
/// prefix of the digest. Back it with a database by returning a boxed future:
///
/// ```
/// use std::{future::Future, pin::Pin, sync::Arc};
/// use llm_layers::auth::{KeyHash, KeyRecord, KeyStore, LookupResult};
///
/// #[derive(Clone)]
/// struct Db; // a connection pool, in real life
///
/// impl KeyStore for Db {
///     type Future = Pin<Box<dyn Future<Output = LookupResult> + Send>>;
///
///     fn lookup(&self, hash: &KeyHash) -> Self::Future {
///         let hex = hash.to_hex(); // `SELECT ... WHERE sha256 = $1`
///         Box::pin(async move {
///             let record = KeyRecord::builder("from-db").sha256_hex(&hex).build().ok();
///             Ok(record.map(Arc::new))
///         })
///     }
/// }
/// ```
pub trait KeyStore: Send + Sync + 'static {
    /// The lookup's future.
    type Future: Future<Output = LookupResult> + Send + 'static;

    /// Looks up the record whose secret has this digest.
    fn lookup(&self, hash: &KeyHash) -> Self::Future;

    /// The answer, when the store has it without waiting (an in-memory map does): the layer
    /// then decides within `call` and skips the asynchronous path. `None` (the default) means
    /// "use [`KeyStore::lookup`]".
    fn lookup_now(&self, hash: &KeyHash) -> Option<LookupResult> {
        let _ = hash;
        None
    }
}

impl<T: KeyStore + ?Sized> KeyStore for Arc<T> {
    type Future = T::Future;

    fn lookup(&self, hash: &KeyHash) -> Self::Future {
        (**self).lookup(hash)
    }

    fn lookup_now(&self, hash: &KeyHash) -> Option<LookupResult> {
        (**self).lookup_now(hash)
    }
}

/// Hashes a [`KeyHash`] by its first 8 bytes: the digest is already uniform, and a client can
/// only choose a digest by finding a SHA-256 preimage.
#[derive(Clone, Copy, Default)]
pub(crate) struct DigestHasherBuilder;

#[derive(Default)]
pub(crate) struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // A digest is already uniform: its first 8 bytes are as good a hash as any.
        let mut word = [0u8; 8];
        let n = bytes.len().min(8);
        word[..n].copy_from_slice(&bytes[..n]);
        self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(word);
    }
}

impl BuildHasher for DigestHasherBuilder {
    type Hasher = DigestHasher;

    fn build_hasher(&self) -> DigestHasher {
        DigestHasher(0)
    }
}

/// A key store held in memory, keyed by digest. Cloning shares it.
///
/// ```
/// use llm_layers::auth::{InMemoryKeyStore, KeyRecord};
///
/// let store = InMemoryKeyStore::new([
///     KeyRecord::builder("team-a").secret("sk-team-a-0123456789abcdef").build()?,
///     KeyRecord::builder("team-b")
///         .sha256_hex("5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8")
///         .allow_model("gpt-4o-mini*")
///         .build()?,
/// ])?;
/// assert_eq!(store.len(), 2);
/// assert!(!format!("{store:?}").contains("sk-team"));
/// # Ok::<(), llm_layers::auth::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct InMemoryKeyStore {
    keys: Arc<HashMap<KeyHash, Arc<KeyRecord>, DigestHasherBuilder>>,
}

impl InMemoryKeyStore {
    /// A store of these records. Fails when two records have the same secret.
    pub fn new(records: impl IntoIterator<Item = KeyRecord>) -> Result<Self, ConfigError> {
        let records = records.into_iter();
        let mut keys =
            HashMap::with_capacity_and_hasher(records.size_hint().0, DigestHasherBuilder);
        for (i, record) in records.enumerate() {
            let id = record.id().to_owned();
            if let Some(other) = keys.insert(record.hash, Arc::new(record)) {
                return Err(config_error(
                    format!("keys[{i}].secret"),
                    format!(
                        "key `{id}` has the same secret as key `{}`; every secret must be unique",
                        other.id()
                    ),
                ));
            }
        }
        Ok(InMemoryKeyStore {
            keys: Arc::new(keys),
        })
    }

    /// The number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the store holds no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The record whose secret has this digest.
    pub fn get(&self, hash: &KeyHash) -> Option<&Arc<KeyRecord>> {
        self.keys.get(hash)
    }

    /// Every record, in no particular order.
    pub fn records(&self) -> impl Iterator<Item = &KeyRecord> {
        self.keys.values().map(|r| &**r)
    }
}

impl fmt::Debug for InMemoryKeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InMemoryKeyStore")
            .field("keys", &self.keys.len())
            .finish()
    }
}

impl KeyStore for InMemoryKeyStore {
    type Future = Ready<LookupResult>;

    fn lookup(&self, hash: &KeyHash) -> Self::Future {
        ready(Ok(self.keys.get(hash).cloned()))
    }

    fn lookup_now(&self, hash: &KeyHash) -> Option<LookupResult> {
        Some(Ok(self.keys.get(hash).cloned()))
    }
}

/// The authenticated key's full record, left in the request extensions next to its
/// [`KeyIdentity`].
#[derive(Clone, Debug)]
pub struct AuthenticatedKey(pub(crate) Arc<KeyRecord>);

impl AuthenticatedKey {
    /// The record.
    pub fn record(&self) -> &KeyRecord {
        &self.0
    }

    /// The record, shared.
    pub fn record_arc(&self) -> &Arc<KeyRecord> {
        &self.0
    }
}

impl std::ops::Deref for AuthenticatedKey {
    type Target = KeyRecord;

    fn deref(&self) -> &KeyRecord {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let p = |s: &str| ModelPattern::new(s).unwrap();
        assert!(p("gpt-4o-mini*").matches("gpt-4o-mini"));
        assert!(p("gpt-4o-mini*").matches("gpt-4o-mini-2024-07-18"));
        assert!(!p("gpt-4o-mini*").matches("gpt-4o"));
        assert!(p("gpt-4o").matches("gpt-4o"));
        assert!(!p("gpt-4o").matches("gpt-4o-mini"));
        assert!(p("*-embedding-*").matches("text-embedding-3-small"));
        assert!(p("claude-*-sonnet*").matches("claude-3-5-sonnet-latest"));
        assert!(!p("claude-*-sonnet*").matches("claude-3-opus"));
        assert!(p("*").is_any());
        assert!(ModelPattern::new(" ").is_err());
    }

    #[test]
    fn digests_match_sha2_at_every_length() {
        use sha2::{Digest, Sha256};
        // Every tail length around the one- and two-block padding boundaries, and several
        // whole blocks.
        let bytes: Vec<u8> = (0..300u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for len in 0..=bytes.len() {
            let key = &bytes[..len];
            let want: [u8; 32] = Sha256::digest(key).into();
            assert_eq!(KeyHash::of(key).as_bytes(), &want, "length {len}");
        }
        // FIPS 180-2 appendix B.2: a two-block message.
        assert_eq!(
            KeyHash::of(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq").to_hex(),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
        assert_eq!(
            KeyHash::of(b"").to_hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn hex_digests() {
        let h = KeyHash::of(b"password");
        assert_eq!(
            h.to_hex(),
            "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
        );
        assert_eq!(KeyHash::from_hex(&h.to_hex().to_uppercase()), Some(h));
        assert_eq!(KeyHash::from_hex("zz"), None);
        assert_eq!(KeyHash::from_hex(&"g".repeat(64)), None);
        assert!(h.ct_eq(&KeyHash::of(b"password")));
        assert!(!format!("{h:?}").contains("5e88"));
        // Every byte takes part in the comparison.
        for i in 0..32 {
            for bit in [0x01u8, 0x80] {
                let mut bytes = *h.as_bytes();
                bytes[i] ^= bit;
                assert!(
                    !h.ct_eq(&KeyHash::from_bytes(bytes)),
                    "byte {i}, bit {bit:#x}"
                );
            }
        }
    }

    #[test]
    fn builder_checks() {
        let e = KeyRecord::builder("a").build().unwrap_err();
        assert_eq!(e.field(), "secret");
        let e = KeyRecord::builder("a")
            .sha256_hex("abc")
            .build()
            .unwrap_err();
        assert_eq!(e.field(), "secret");
        let e = KeyRecord::builder("").secret("x").build().unwrap_err();
        assert_eq!(e.field(), "id");
        let e = KeyRecord::builder("a")
            .secret("x")
            .allow_model("")
            .build()
            .unwrap_err();
        assert_eq!(e.field(), "models");
        let e = KeyRecord::builder("a")
            .secret("x")
            .expires_at_rfc3339("next tuesday")
            .build()
            .unwrap_err();
        assert_eq!(e.field(), "expires_at");
        let r = KeyRecord::builder("a")
            .secret("x")
            .expires_at_rfc3339("2026-01-01T00:00:00Z")
            .build()
            .unwrap();
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_767_225_600);
        assert_eq!(r.expires_at(), Some(at));
        assert!(!r.is_expired_at(at - std::time::Duration::from_secs(1)));
        assert!(r.is_expired_at(at));
        let dup = InMemoryKeyStore::new([
            KeyRecord::builder("a")
                .secret("dup-secret-value")
                .build()
                .unwrap(),
            KeyRecord::builder("b")
                .secret("dup-secret-value")
                .build()
                .unwrap(),
        ])
        .unwrap_err();
        assert_eq!(dup.field(), "keys[1].secret");
        assert!(!dup.to_string().contains("dup-secret-value"), "{dup}");
    }
}
