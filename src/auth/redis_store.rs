//! The Redis-backed key store (feature `redis`); its rules are in the docs of
//! [`RedisKeyStore`].

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, RedisError, Script};

use super::store::{KeyHash, KeyRecord, KeyStore, KeyStoreError, LookupResult};
use super::time::{format_rfc3339, parse_rfc3339};
use super::{config_error, ConfigError};
use crate::ext::KeyLimits;

/// The per-call timeout by default.
pub const DEFAULT_REDIS_KEY_TIMEOUT: Duration = Duration::from_millis(200);
/// The key prefix by default: a record lives at `llm-layers:key:<64 hex>`.
pub const DEFAULT_REDIS_KEY_PREFIX: &str = "llm-layers:key:";

const REVOKE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'revoked', 'true')
  return 1
end
return 0
";

/// A [`KeyStore`] in Redis or Valkey (feature `redis`), shared by every gateway replica; it can
/// be the same server as the rate limiter's [`RedisBackend`](crate::rate_limit::RedisBackend)
/// (the prefixes differ).
///
/// # Layout
///
/// One Redis hash per key, named by the key prefix (default `llm-layers:key:`) and the
/// SHA-256 digest of the secret in 64 lowercase hex characters. **The secret is never
/// stored**: only its digest, in the hash's name. The fields are those of the TOML key file
/// ([`InMemoryKeyStore::from_toml_str`](crate::auth::InMemoryKeyStore::from_toml_str)), all
/// strings:
///
/// | field | value | required |
/// |---|---|---|
/// | `id` | the key's id, safe to log | yes |
/// | `tier` | the tier (`pro`) | no |
/// | `models` | model names or globs, comma-separated (`gpt-4o-mini*,text-embedding-3-small`); absent or empty: any model | no |
/// | `expires_at` | RFC 3339 (`2026-12-31T23:59:59Z`) or unix seconds | no |
/// | `revoked` | `true`/`false` (or `1`/`0`) | no, `false` |
/// | `rpm`, `tpm`, `concurrency` | the key's limits, decimal | no |
/// | `label.<name>` | a free-form label `<name>` | no |
///
/// Any other field (a `secret`, say, or a typo such as `rmp`) makes the record unusable:
/// the lookup fails, the request is answered `503 service_unavailable`, and the warning
/// names the field, never a value. So does a value that does not parse.
///
/// ```text
/// redis-cli HSET llm-layers:key:$(printf %s "$SECRET" | sha256sum | cut -d' ' -f1) \
///     id team-a tier pro models 'gpt-4o-mini*' rpm 60
/// ```
///
/// [`RedisKeyStore::put`], [`RedisKeyStore::revoke`] and [`RedisKeyStore::remove`] write the
/// same layout from Rust.
///
/// # Rules
///
/// * **One round trip per lookup** (`HGETALL`), with a per-call timeout
///   ([`RedisKeyStoreBuilder::timeout`], 200 ms by default). An error or a timeout is a
///   [`KeyStoreError`]: the layer answers `503 service_unavailable` (retryable) and logs it;
///   a request never waits on the store for longer than the timeout.
/// * **Wrap it in [`CachedKeyStore`](crate::auth::CachedKeyStore).** Alone, the store asks
///   Redis on every request. Behind the cache, a known key is answered from memory for the
///   positive TTL, an unknown one for the negative TTL, and concurrent lookups of one key are
///   single-flight. A key revoked or removed in Redis is then refused by every replica within
///   the cache's positive TTL (at once on a replica that calls
///   [`CachedKeyStore::invalidate`](crate::auth::CachedKeyStore::invalidate)).
/// * The `ConnectionManager` of redis-rs multiplexes every lookup of every clone over one
///   connection, opened at the first lookup, and reconnects by itself after an error.
/// * The URL may carry a password: it is never logged, and `Debug` does not show it. Errors
///   name the kind of Redis error, never the URL.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use llm_layers::auth::{ApiKeyAuthLayer, CachedKeyStore, RedisKeyStore};
///
/// let redis = RedisKeyStore::builder("redis://127.0.0.1:6379/")
///     .timeout(Duration::from_millis(100))
///     .build()?;
/// let store = CachedKeyStore::builder(redis)
///     .positive_ttl(Duration::from_secs(10)) // a revocation reaches every replica within 10 s
///     .build()?;
/// let layer = ApiKeyAuthLayer::new(store);
/// # Ok::<(), llm_layers::auth::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct RedisKeyStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    conn: OnceLock<ConnectionManager>,
    prefix: String,
    timeout: Duration,
    revoke: Script,
}

impl fmt::Debug for RedisKeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may carry a password.
        f.debug_struct("RedisKeyStore")
            .field("url", &"<hidden>")
            .field("key_prefix", &self.inner.prefix)
            .field("timeout", &self.inner.timeout)
            .finish()
    }
}

/// Configures a [`RedisKeyStore`]; [`RedisKeyStoreBuilder::build`] checks it.
pub struct RedisKeyStoreBuilder {
    url: String,
    prefix: String,
    timeout: Duration,
}

impl fmt::Debug for RedisKeyStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisKeyStoreBuilder")
            .field("url", &"<hidden>")
            .field("key_prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl RedisKeyStoreBuilder {
    /// The prefix of every record's name (default `llm-layers:key:`).
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The longest one call may take (default 200 ms); a slower call fails the lookup.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Checks and builds the store: the timeout must be positive, and the URL a valid
    /// `redis://` URL (the error does not quote it). No connection is opened yet.
    pub fn build(self) -> Result<RedisKeyStore, ConfigError> {
        if self.timeout.is_zero() {
            return Err(config_error("redis.timeout", "must be positive"));
        }
        // The parser's message may quote the URL, and so its password: not passed on.
        let client = Client::open(self.url.as_str()).map_err(|_| {
            config_error(
                "redis.url",
                "not a valid redis:// URL (TLS is not built in; the URL is not shown: it may hold a password)",
            )
        })?;
        Ok(RedisKeyStore {
            inner: Arc::new(Inner {
                client,
                conn: OnceLock::new(),
                prefix: self.prefix,
                timeout: self.timeout,
                revoke: Script::new(REVOKE),
            }),
        })
    }
}

/// Why a call failed, with no URL in it.
fn store_error(what: &str, e: &RedisError) -> KeyStoreError {
    KeyStoreError::new(format!("redis key store: {what}: {:?} error", e.kind()))
}

impl RedisKeyStore {
    /// A builder for a store at `url` (`redis://[:password@]host:port/[db]`; Valkey speaks
    /// the same).
    pub fn builder(url: impl Into<String>) -> RedisKeyStoreBuilder {
        RedisKeyStoreBuilder {
            url: url.into(),
            prefix: DEFAULT_REDIS_KEY_PREFIX.to_owned(),
            timeout: DEFAULT_REDIS_KEY_TIMEOUT,
        }
    }

    /// The name of the record of this digest: the prefix and 64 lowercase hex characters.
    pub fn redis_key(&self, hash: &KeyHash) -> String {
        let mut key = String::with_capacity(self.inner.prefix.len() + 64);
        key.push_str(&self.inner.prefix);
        key.push_str(&hash.to_hex());
        key
    }

    fn conn(&self) -> Result<ConnectionManager, KeyStoreError> {
        if let Some(c) = self.inner.conn.get() {
            return Ok(c.clone());
        }
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.inner.timeout))
            .set_response_timeout(Some(self.inner.timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(200));
        let c = ConnectionManager::new_lazy_with_config(self.inner.client.clone(), cfg)
            .map_err(|e| store_error("connect", &e))?;
        Ok(self.inner.conn.get_or_init(|| c).clone())
    }

    /// Runs one call under the timeout.
    async fn run<T, F>(
        &self,
        what: &str,
        call: impl FnOnce(ConnectionManager) -> F,
    ) -> Result<T, KeyStoreError>
    where
        F: Future<Output = Result<T, RedisError>>,
    {
        let conn = self.conn()?;
        match tokio::time::timeout(self.inner.timeout, call(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(store_error(what, &e)),
            Err(_) => Err(KeyStoreError::new(format!(
                "redis key store: {what}: no answer within {:?}",
                self.inner.timeout
            ))),
        }
    }

    /// Writes `record` (replacing any record of the same digest, field by field, in one
    /// transaction). Fails on a model pattern holding a comma, which the layout cannot hold.
    pub async fn put(&self, record: &KeyRecord) -> Result<(), KeyStoreError> {
        let fields = to_fields(record)?;
        let key = self.redis_key(record.hash());
        self.run("put", |mut conn| async move {
            let mut pipe = ::redis::pipe();
            pipe.atomic().cmd("DEL").arg(&key).ignore();
            let hset = pipe.cmd("HSET").arg(&key);
            for (name, value) in &fields {
                hset.arg(name).arg(value);
            }
            hset.ignore();
            pipe.query_async::<()>(&mut conn).await
        })
        .await
    }

    /// Marks the record of this digest revoked (`revoked` = `true`); `false` when there is
    /// none. A revoked key is answered `401 revoked_api_key`.
    pub async fn revoke(&self, hash: &KeyHash) -> Result<bool, KeyStoreError> {
        let key = self.redis_key(hash);
        let script = &self.inner.revoke;
        self.run("revoke", |mut conn| async move {
            script.key(&key).invoke_async::<i64>(&mut conn).await
        })
        .await
        .map(|n| n == 1)
    }

    /// Deletes the record of this digest; `false` when there was none. The key is then
    /// unknown (`401 invalid_api_key`).
    pub async fn remove(&self, hash: &KeyHash) -> Result<bool, KeyStoreError> {
        let key = self.redis_key(hash);
        self.run("remove", |mut conn| async move {
            ::redis::cmd("DEL")
                .arg(&key)
                .query_async::<i64>(&mut conn)
                .await
        })
        .await
        .map(|n| n == 1)
    }

    async fn fetch(self, hash: KeyHash) -> LookupResult {
        let key = self.redis_key(&hash);
        let fields: HashMap<String, String> = self
            .run("lookup", |mut conn| async move {
                ::redis::cmd("HGETALL")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        if fields.is_empty() {
            return Ok(None);
        }
        from_fields(hash, fields).map(|r| Some(Arc::new(r)))
    }
}

impl KeyStore for RedisKeyStore {
    type Future = Pin<Box<dyn Future<Output = LookupResult> + Send>>;

    fn lookup(&self, hash: &KeyHash) -> Self::Future {
        Box::pin(self.clone().fetch(*hash))
    }
}

fn to_fields(record: &KeyRecord) -> Result<Vec<(String, String)>, KeyStoreError> {
    let mut out = vec![("id".to_owned(), record.id().to_owned())];
    if let Some(tier) = record.tier() {
        out.push(("tier".into(), tier.to_owned()));
    }
    if !record.models().is_empty() {
        if record.models().iter().any(|m| m.as_str().contains(',')) {
            return Err(KeyStoreError::new(
                "redis key store: put: a model pattern holds a comma, which the `models` field cannot hold",
            ));
        }
        let models: Vec<&str> = record.models().iter().map(|m| m.as_str()).collect();
        out.push(("models".into(), models.join(",")));
    }
    if let Some(at) = record.expires_at() {
        out.push(("expires_at".into(), format_rfc3339(at)));
    }
    out.push(("revoked".into(), record.is_revoked().to_string()));
    let limits = record.limits();
    if let Some(n) = limits.rpm() {
        out.push(("rpm".into(), n.to_string()));
    }
    if let Some(n) = limits.tpm() {
        out.push(("tpm".into(), n.to_string()));
    }
    if let Some(n) = limits.max_concurrency() {
        out.push(("concurrency".into(), n.to_string()));
    }
    for (name, value) in record.labels() {
        out.push((format!("label.{name}"), value.clone()));
    }
    Ok(out)
}

fn bad(field: &str, what: &str) -> KeyStoreError {
    // The field name comes from the store, not from the client: quoted escaped, never a value.
    KeyStoreError::new(format!(
        "redis key store: a record's field {field:?} {what}"
    ))
}

fn expiry(text: &str) -> Result<SystemTime, &'static str> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse::<u64>()
            .map(|s| UNIX_EPOCH + Duration::from_secs(s))
            .map_err(|_| "is too large");
    }
    parse_rfc3339(text)
}

fn from_fields(hash: KeyHash, fields: HashMap<String, String>) -> Result<KeyRecord, KeyStoreError> {
    let Some(id) = fields.get("id") else {
        return Err(bad("id", "is missing"));
    };
    let mut b = KeyRecord::builder(id.as_str()).sha256(hash);
    let mut limits = KeyLimits::new();
    for (name, value) in &fields {
        let value = value.trim();
        match name.as_str() {
            "id" => {}
            "tier" => b = b.tier(value),
            "models" => {
                b = b.allow_models(value.split(',').map(str::trim).filter(|m| !m.is_empty()));
            }
            "expires_at" => {
                let at = expiry(value)
                    .map_err(|_| bad(name, "is neither an RFC 3339 timestamp nor unix seconds"))?;
                b = b.expires_at(at);
            }
            "revoked" => {
                let revoked = match value {
                    "true" | "1" => true,
                    "false" | "0" | "" => false,
                    _ => return Err(bad(name, "is not true or false")),
                };
                b = b.revoked(revoked);
            }
            "rpm" => {
                let n = value.parse().map_err(|_| bad(name, "is not a number"))?;
                limits = limits.requests_per_minute(n);
            }
            "tpm" => {
                let n = value.parse().map_err(|_| bad(name, "is not a number"))?;
                limits = limits.tokens_per_minute(n);
            }
            "concurrency" => {
                let n = value.parse().map_err(|_| bad(name, "is not a number"))?;
                limits = limits.concurrency(n);
            }
            "secret" | "sha256" => {
                return Err(bad(
                    name,
                    "must not be stored: a record is named by the digest, the secret is never kept",
                ))
            }
            other => match other.strip_prefix("label.") {
                Some(label) if !label.is_empty() => b = b.label(label, value),
                _ => return Err(bad(name, "is not a field of a key record")),
            },
        }
    }
    b.limits(limits)
        .build()
        .map_err(|e| bad(e.field(), e.message()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_record_round_trips_through_its_fields() {
        let record = KeyRecord::builder("team-a")
            .secret("sk-round-trip-0123456789")
            .tier("pro")
            .allow_models(["gpt-4o-mini*", "text-embedding-3-small"])
            .expires_at_rfc3339("2026-12-31T23:59:59Z")
            .limits(
                KeyLimits::new()
                    .requests_per_minute(60)
                    .tokens_per_minute(100_000)
                    .concurrency(4),
            )
            .label("team", "a")
            .build()
            .unwrap();
        let stored: HashMap<String, String> = to_fields(&record).unwrap().into_iter().collect();
        assert!(stored.values().all(|v| !v.contains("sk-round-trip")));
        let back = from_fields(*record.hash(), stored).unwrap();
        assert_eq!(format!("{back:?}"), format!("{record:?}"));
        assert!(back.hash().ct_eq(record.hash()));
    }

    #[test]
    fn fields_as_written_with_redis_cli() {
        let h = KeyHash::of(b"x");
        let r = from_fields(
            h,
            fields(&[
                ("id", "a"),
                ("models", " gpt-4o , claude-*,"),
                ("expires_at", "1800000000"),
                ("revoked", "1"),
            ]),
        )
        .unwrap();
        assert!(r.allows_model("gpt-4o") && r.allows_model("claude-3") && !r.allows_model("o1"));
        assert_eq!(
            r.expires_at(),
            Some(UNIX_EPOCH + Duration::from_secs(1_800_000_000))
        );
        assert!(r.is_revoked());
    }

    #[test]
    fn broken_records_are_store_errors_naming_the_field() {
        let h = KeyHash::of(b"x");
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("tier", "pro")], "\"id\""),
            (&[("id", "")], "\"id\""),
            (&[("id", "a"), ("rmp", "5")], "\"rmp\""),
            (&[("id", "a"), ("rpm", "lots")], "\"rpm\""),
            (&[("id", "a"), ("revoked", "maybe")], "\"revoked\""),
            (&[("id", "a"), ("expires_at", "tomorrow")], "\"expires_at\""),
            (&[("id", "a"), ("secret", "sk-stored-secret")], "\"secret\""),
        ];
        for (pairs, field) in cases {
            let e = from_fields(h, fields(pairs)).unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
            assert!(
                !e.contains("sk-stored-secret") && !e.contains("lots"),
                "{e}"
            );
        }
        let comma = KeyRecord::builder("a")
            .secret("x")
            .allow_model("a,b")
            .build()
            .unwrap();
        assert!(to_fields(&comma).is_err());
    }

    #[test]
    fn build_checks_and_debug_hides_the_url() {
        let e = RedisKeyStore::builder("redis://127.0.0.1/")
            .timeout(Duration::ZERO)
            .build()
            .unwrap_err();
        assert_eq!(e.field(), "redis.timeout");
        let e = RedisKeyStore::builder("nonsense://:hunter2@host/")
            .build()
            .unwrap_err();
        assert_eq!(e.field(), "redis.url");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let s = RedisKeyStore::builder("redis://:hunter2@127.0.0.1:6379/")
            .build()
            .unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(
            s.redis_key(&KeyHash::of(b"password")),
            "llm-layers:key:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
        );
    }
}
