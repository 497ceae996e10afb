//! Loading an [`InMemoryKeyStore`] from TOML.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use super::store::{InMemoryKeyStore, KeyRecord};
use super::time::parse_rfc3339;
use super::{config_error, ConfigError};
use crate::ext::KeyLimits;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    keys: Vec<RawKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    id: String,
    secret: Option<String>,
    sha256: Option<String>,
    expires_at: Option<toml::Value>,
    #[serde(default)]
    revoked: bool,
    #[serde(default)]
    models: Vec<String>,
    tier: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    rpm: Option<u32>,
    tpm: Option<u64>,
    concurrency: Option<u32>,
}

fn expiry(value: &toml::Value) -> Result<SystemTime, String> {
    match value {
        toml::Value::String(s) => parse_rfc3339(s).map_err(str::to_owned),
        toml::Value::Datetime(d) => parse_rfc3339(&d.to_string()).map_err(|e| {
            format!("{e} (a TOML datetime needs a date, a time and an offset, such as 2026-01-31T23:59:59Z)")
        }),
        toml::Value::Integer(n) => u64::try_from(*n)
            .map(|secs| UNIX_EPOCH + Duration::from_secs(secs))
            .map_err(|_| "unix seconds must not be negative".to_owned()),
        other => Err(format!(
            "expected an RFC 3339 timestamp or unix seconds, not a {}",
            other.type_str()
        )),
    }
}

impl RawKey {
    fn into_record(self, i: usize) -> Result<KeyRecord, ConfigError> {
        let field = |name: &str| format!("keys[{i}].{name}");
        let mut b = KeyRecord::builder(self.id.as_str());
        b = match (self.secret, self.sha256) {
            (Some(_), Some(_)) => {
                return Err(config_error(
                    field("secret"),
                    "give either `secret` or `sha256`, not both",
                ))
            }
            (None, None) => {
                return Err(config_error(
                    field("secret"),
                    "give the key's `secret` or its `sha256` digest",
                ))
            }
            (Some(secret), None) if secret.is_empty() => {
                return Err(config_error(field("secret"), "the secret is empty"))
            }
            (Some(secret), None) => b.secret(secret),
            (None, Some(hex)) => {
                if super::store::KeyHash::from_hex(hex.trim()).is_none() {
                    return Err(config_error(
                        field("sha256"),
                        "expected 64 hex characters (the SHA-256 digest of the secret)",
                    ));
                }
                b.sha256_hex(&hex)
            }
        };
        if let Some(at) = &self.expires_at {
            b = b.expires_at(expiry(at).map_err(|e| config_error(field("expires_at"), e))?);
        }
        if let Some(tier) = self.tier {
            b = b.tier(tier);
        }
        let mut limits = KeyLimits::new();
        if let Some(n) = self.rpm {
            limits = limits.requests_per_minute(n);
        }
        if let Some(n) = self.tpm {
            limits = limits.tokens_per_minute(n);
        }
        if let Some(n) = self.concurrency {
            limits = limits.concurrency(n);
        }
        for (name, value) in self.labels {
            b = b.label(name, value);
        }
        b.limits(limits)
            .revoked(self.revoked)
            .allow_models(self.models)
            .build()
            .map_err(|e| config_error(field(e.field()), e.message().to_owned()))
    }
}

impl InMemoryKeyStore {
    /// A store from a TOML document with one `[[keys]]` table per key:
    ///
    /// ```toml
    /// [[keys]]
    /// id = "team-a"                       # safe to log; required
    /// secret = "sk-team-a-..."            # or: sha256 = "<64 hex chars>"
    /// expires_at = 2026-12-31T23:59:59Z   # TOML datetime, RFC 3339 string or unix seconds
    /// revoked = false
    /// models = ["gpt-4o-mini*", "text-embedding-3-small"]  # empty or absent: any model
    /// tier = "pro"
    /// labels = { team = "a" }
    /// rpm = 60
    /// tpm = 100000
    /// concurrency = 4
    /// ```
    ///
    /// Errors name the key and field (`keys[2].sha256: expected 64 hex characters ...`);
    /// syntax errors give the line. No error quotes a secret.
    pub fn from_toml_str(text: &str) -> Result<InMemoryKeyStore, ConfigError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            let field = match line {
                Some(line) => format!("line {line}"),
                None => "toml".to_owned(),
            };
            config_error(field, e.message().trim().to_owned())
        })?;
        let records = raw
            .keys
            .into_iter()
            .enumerate()
            .map(|(i, k)| k.into_record(i))
            .collect::<Result<Vec<_>, _>>()?;
        InMemoryKeyStore::new(records)
    }

    /// A store from a TOML file; see [`InMemoryKeyStore::from_toml_str`].
    pub fn from_toml_file(path: impl AsRef<Path>) -> Result<InMemoryKeyStore, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| config_error("path", format!("cannot read {}: {e}", path.display())))?;
        InMemoryKeyStore::from_toml_str(&text).map_err(|e| {
            config_error(
                format!("{}: {}", path.display(), e.field()),
                e.message().to_owned(),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::KeyHash;

    const DOC: &str = r#"
[[keys]]
id = "team-a"
secret = "sk-team-a-0123456789abcdefghij"
expires_at = 2026-12-31T23:59:59Z
models = ["gpt-4o-mini*"]
tier = "pro"
labels = { team = "a" }
rpm = 60
tpm = 100000
concurrency = 4

[[keys]]
id = "team-b"
sha256 = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
expires_at = "2026-12-31T23:59:59+01:00"
revoked = true

[[keys]]
id = "team-c"
secret = "sk-team-c-0123456789abcdefghij"
expires_at = 1800000000
"#;

    #[test]
    fn loads_every_field() {
        let store = InMemoryKeyStore::from_toml_str(DOC).unwrap();
        assert_eq!(store.len(), 3);
        let a = store
            .get(&KeyHash::of(b"sk-team-a-0123456789abcdefghij"))
            .unwrap();
        assert_eq!(a.id(), "team-a");
        assert_eq!(a.tier(), Some("pro"));
        assert_eq!(a.limits().rpm(), Some(60));
        assert_eq!(a.limits().tpm(), Some(100_000));
        assert_eq!(a.limits().max_concurrency(), Some(4));
        assert_eq!(a.labels()["team"], "a");
        assert!(a.allows_model("gpt-4o-mini-2024-07-18") && !a.allows_model("gpt-4o"));
        assert_eq!(
            a.expires_at()
                .unwrap()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs(),
            1_798_761_599
        );
        let b = store.get(&KeyHash::of(b"password")).unwrap();
        assert!(b.is_revoked());
        assert_eq!(
            b.expires_at()
                .unwrap()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs(),
            1_798_761_599 - 3600
        );
        let c = store
            .get(&KeyHash::of(b"sk-team-c-0123456789abcdefghij"))
            .unwrap();
        assert_eq!(
            c.expires_at(),
            Some(UNIX_EPOCH + Duration::from_secs(1_800_000_000))
        );
        assert!(c.is_unrestricted());
    }

    #[test]
    fn loads_from_a_file_and_names_the_file_on_error() {
        let dir = std::env::temp_dir();
        let path = dir.join(format!("llm-layers-auth-keys-{}.toml", std::process::id()));
        std::fs::write(&path, DOC).unwrap();
        assert_eq!(InMemoryKeyStore::from_toml_file(&path).unwrap().len(), 3);
        std::fs::write(&path, "[[keys]]\nid = \"a\"\nsha256 = \"00\"\n").unwrap();
        let e = InMemoryKeyStore::from_toml_file(&path).unwrap_err();
        assert!(e.field().ends_with(".toml: keys[0].sha256"), "{e}");
        std::fs::remove_file(&path).unwrap();
        let e = InMemoryKeyStore::from_toml_file(&path).unwrap_err();
        assert_eq!(e.field(), "path");
    }

    #[test]
    fn errors_name_the_field_and_never_the_secret() {
        let cases = [
            ("[[keys]]\nid = \"a\"\nsha256 = \"abc\"\n", "keys[0].sha256"),
            ("[[keys]]\nid = \"a\"\n", "keys[0].secret"),
            (
                "[[keys]]\nid = \"a\"\nsecret = \"sk-hidden-value\"\nsha256 = \"00\"\n",
                "keys[0].secret",
            ),
            (
                "[[keys]]\nid = \"a\"\nsecret = \"sk-hidden-value\"\nexpires_at = \"tomorrow\"\n",
                "keys[0].expires_at",
            ),
            (
                "[[keys]]\nid = \"a\"\nsecret = \"sk-hidden-value\"\nexpires_at = 2026-01-01\n",
                "keys[0].expires_at",
            ),
            (
                "[[keys]]\nid = \"a\"\nsecret = \"sk-hidden-value\"\nmodels = [\"\"]\n",
                "keys[0].models",
            ),
            (
                "[[keys]]\nid = \"a\"\nsecret = \"sk-hidden-value\"\nrmp = 5\n",
                "line 4",
            ),
            (
                "[[keys]]\nid = \"a\"\nsecret = \"sk-hidden-value\"\n[[keys]]\nid = \"b\"\nsecret = \"sk-hidden-value\"\n",
                "keys[1].secret",
            ),
        ];
        for (doc, field) in cases {
            let e = InMemoryKeyStore::from_toml_str(doc).unwrap_err();
            assert_eq!(e.field(), field, "{e}");
            assert!(!e.to_string().contains("sk-hidden-value"), "{e}");
        }
    }
}
