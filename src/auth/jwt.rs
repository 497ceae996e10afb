//! Bearer tokens; the rules are in the docs of [`JwtValidator`].

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use super::future::{TokenError, TokenFuture};
use super::store::{KeyHash, KeyRecord, KeyStoreError};
use super::{config_error, ConfigError};

pub use jsonwebtoken::Algorithm as JwtAlgorithm;

const MAX_LEEWAY: Duration = Duration::from_secs(300);
const MAX_JWKS_BYTES: usize = 1 << 20;

/// Whether a bearer credential has the shape of a JWT (and so goes to the validator).
pub(crate) fn looks_like_jwt(key: &[u8]) -> bool {
    key.starts_with(b"eyJ") && key.iter().filter(|b| **b == b'.').count() == 2
}

struct VerifyKey {
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
}

#[derive(Default)]
struct KeySet {
    by_kid: HashMap<String, Arc<VerifyKey>>,
    /// Keys without a `kid`, usable only when the set holds one key.
    anonymous: Vec<Arc<VerifyKey>>,
    fetched: bool,
}

impl KeySet {
    fn len(&self) -> usize {
        self.by_kid.len() + self.anonymous.len()
    }

    fn find(&self, kid: Option<&str>) -> Option<Arc<VerifyKey>> {
        match kid {
            Some(kid) => self.by_kid.get(kid).cloned(),
            None if self.len() == 1 => self
                .by_kid
                .values()
                .chain(self.anonymous.iter())
                .next()
                .cloned(),
            None => None,
        }
    }
}

/// The algorithms a JWK may verify, by its type and curve; none for HMAC and encryption keys.
fn algorithms_of(jwk: &jsonwebtoken::jwk::Jwk) -> Vec<Algorithm> {
    use Algorithm::*;
    if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
        return Vec::new();
    }
    let by_type: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![RS256, RS384, RS512, PS256, PS384, PS512],
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => vec![ES256],
            EllipticCurve::P384 => vec![ES384],
            _ => Vec::new(),
        },
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => vec![EdDSA],
        _ => Vec::new(),
    };
    match jwk.common.key_algorithm.map(|a| a.to_string()) {
        Some(named) => by_type
            .into_iter()
            .filter(|a| format!("{a:?}") == named)
            .collect(),
        None => by_type,
    }
}

fn key_set(set: &JwkSet) -> KeySet {
    let mut out = KeySet {
        fetched: true,
        ..KeySet::default()
    };
    for jwk in &set.keys {
        let algorithms = algorithms_of(jwk);
        if algorithms.is_empty() {
            continue;
        }
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        let key = Arc::new(VerifyKey { key, algorithms });
        match &jwk.common.key_id {
            Some(kid) => {
                out.by_kid.insert(kid.clone(), key);
            }
            None => out.anonymous.push(key),
        }
    }
    out
}

struct Source {
    url: String,
    client: reqwest::Client,
    timeout: Duration,
    every: Duration,
    /// When the last fetch was tried; held while a fetch runs (single flight).
    last: tokio::sync::Mutex<Option<tokio::time::Instant>>,
}

struct Inner {
    issuer: String,
    audience: Vec<String>,
    algorithms: Vec<Algorithm>,
    leeway: Duration,
    hmac: Option<DecodingKey>,
    id_claim: String,
    tier_claim: String,
    models_claim: String,
    keys: ArcSwap<KeySet>,
    source: Option<Source>,
}

/// OAuth 2.0 / JWT bearer tokens beside API keys (feature `jwt`).
///
/// Identity providers hand out short-lived access tokens (`Authorization: Bearer eyJ...`)
/// instead of static keys. A [`JwtValidator`] given to
/// [`ApiKeyAuthBuilder::bearer_tokens`](super::ApiKeyAuthBuilder::bearer_tokens) checks every
/// bearer credential that has the shape of a JWT (three base64url parts, the first starting
/// `eyJ`); every other credential is an API key, checked against the key store as before, so
/// the API-key path is untouched.
///
/// # What a token must be
///
/// * **Signed** with an algorithm of [`JwtValidatorBuilder::algorithms`] (RS256, ES256 and
///   EdDSA by default; RS384/512, PS256/384/512 and ES384 on request), by a key of the JWKS
///   whose `kid` the header names (with a set of one key, `kid` may be left out). Each key
///   verifies only the algorithms of its own type and curve (an RSA key only RS and PS, a
///   P-256 key only ES256, an Ed25519 key only EdDSA), and when the JWK names an `alg`, only
///   that one. `alg: none` is never accepted, HMAC keys (`kty: oct`) in a JWKS are ignored,
///   and HS256 is accepted only with [`JwtValidatorBuilder::hs256_secret`], verified with that
///   secret alone, never with a public key: so a token "signed" with a public key as an HMAC
///   secret (algorithm confusion) is refused.
/// * **Current**: `exp` is required; a token is expired from `exp` + leeway on, and not
///   valid before `nbf` − leeway. The leeway is 60 s by default and at most 5 minutes. Time
///   is the layer's clock ([`ApiKeyAuthBuilder::clock`](super::ApiKeyAuthBuilder::clock)).
/// * **For us**: `iss` equal to [`JwtValidatorBuilder::issuer`], `aud` (a string or an
///   array) naming one of [`JwtValidatorBuilder::audience`].
///
/// # The identity a token maps to
///
/// The same [`KeyIdentity`](crate::ext::KeyIdentity) and [`AuthenticatedKey`](super::AuthenticatedKey)
/// an API key gives, so rate limits and model allow-lists work alike: the id from `sub` (or
/// [`JwtValidatorBuilder::id_claim`], such as `client_id` or `azp`), the tier from the
/// `tier` claim, the allowed models from the `models` claim (an array of names and globs, or
/// one space-separated string; absent means any model). The record expires at `exp` + leeway
/// and carries the label `iss`.
///
/// # What it answers
///
/// | case | status | `code` | `WWW-Authenticate` |
/// |---|---|---|---|
/// | expired token | 401 | `expired_api_key` (says when) | `Bearer error="invalid_token"` |
/// | bad signature, unknown `kid`, wrong issuer or audience, `alg` not accepted (`none` included), not yet valid, a claim missing or of the wrong type, not a JWT | 401 | `invalid_api_key` (says which) | `Bearer error="invalid_token"` |
/// | no JWKS could be fetched yet | 503 | `service_unavailable` (retryable) | |
///
/// # The JWKS
///
/// With [`JwtValidatorBuilder::jwks_url`], the key set is fetched when the first token
/// arrives (or at [`JwtValidator::refresh`]), kept, and fetched again when a token names a
/// `kid` the set does not have (the provider rotated its keys). Fetches are single-flight and
/// at most one per [`JwtValidatorBuilder::refresh_interval`] (30 s by default), so tokens with
/// made-up `kid`s cannot hammer the provider. A fetch that fails (the provider down, a
/// timeout, a body over 1 MiB, not a key set, no usable key) keeps the last good set, and is
/// logged (warn). [`JwtValidatorBuilder::jwks`] gives a fixed set instead.
///
/// The fetch uses reqwest (already an optional dependency of the crate, for its client
/// adapters), with the crate's `default-features = false`: for an `https://` provider, enable
/// one of reqwest's TLS features in your own `Cargo.toml` and, if you like, hand in your own
/// client with [`JwtValidatorBuilder::http_client`]. Signatures are checked by `jsonwebtoken`
/// 9 on `ring` (no PEM support compiled in: keys come from the JWKS).
///
/// ```
/// use llm_layers::auth::{ApiKeyAuthLayer, InMemoryKeyStore, JwtValidator};
///
/// let tokens = JwtValidator::builder()
///     .issuer("https://idp.example.com/")
///     .audience("llm-gateway")
///     .jwks_url("https://idp.example.com/.well-known/jwks.json")
///     .build()?;
/// let layer = ApiKeyAuthLayer::builder(InMemoryKeyStore::new([])?)
///     .bearer_tokens(tokens)
///     .build()?;
/// # Ok::<(), llm_layers::auth::ConfigError>(())
/// ```
///
/// # Logs
///
/// `bearer token refused` (debug, with the reason), `JWKS fetched` (info, the number of keys),
/// `JWKS fetch failed; the last good keys stay in force` (warn). No event holds a token.
///
#[derive(Clone)]
pub struct JwtValidator {
    inner: Arc<Inner>,
}

impl fmt::Debug for JwtValidator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtValidator")
            .field("issuer", &self.inner.issuer)
            .field("audience", &self.inner.audience)
            .field("algorithms", &self.inner.algorithms)
            .field("leeway", &self.inner.leeway)
            .field("hs256", &self.inner.hmac.is_some())
            .field("jwks_url", &self.inner.source.as_ref().map(|s| &s.url))
            .field("keys", &self.inner.keys.load().len())
            .finish()
    }
}

impl JwtValidator {
    /// A builder; [`issuer`](JwtValidatorBuilder::issuer), an
    /// [`audience`](JwtValidatorBuilder::audience) and a key set are required.
    pub fn builder() -> JwtValidatorBuilder {
        JwtValidatorBuilder {
            issuer: None,
            audience: Vec::new(),
            algorithms: vec![Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA],
            leeway: Duration::from_secs(60),
            hmac: None,
            jwks_url: None,
            jwks: None,
            client: None,
            timeout: Duration::from_secs(5),
            every: Duration::from_secs(30),
            id_claim: "sub".to_owned(),
            tier_claim: "tier".to_owned(),
            models_claim: "models".to_owned(),
        }
    }

    /// The number of signing keys held now.
    pub fn key_count(&self) -> usize {
        self.inner.keys.load().len()
    }

    /// Fetches the JWKS now (at start, say, so the first token does not wait), unless a fetch
    /// was tried within the refresh interval. Returns the number of keys in force; a failed
    /// fetch keeps the last good set and returns the error.
    pub async fn refresh(&self) -> Result<usize, KeyStoreError> {
        match &self.inner.source {
            Some(source) => self
                .refresh_from(source, None)
                .await
                .map(|()| self.key_count()),
            None => Ok(self.key_count()),
        }
    }

    async fn refresh_from(&self, source: &Source, kid: Option<&str>) -> Result<(), KeyStoreError> {
        let mut last = source.last.lock().await;
        // Another request may have fetched the key while this one waited.
        if kid.is_some() && self.inner.keys.load().find(kid).is_some() {
            return Ok(());
        }
        let now = tokio::time::Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < source.every) {
            return Ok(());
        }
        *last = Some(now);
        match fetch(source).await {
            Ok(set) => {
                tracing::info!(target: "llm_layers::auth", url = ?source.url, keys = set.len(), "JWKS fetched");
                self.inner.keys.store(Arc::new(set));
                Ok(())
            }
            Err(e) => {
                tracing::warn!(
                    target: "llm_layers::auth",
                    url = ?source.url,
                    error = ?e.to_string(),
                    "JWKS fetch failed; the last good keys stay in force"
                );
                Err(e)
            }
        }
    }

    /// Validates `token` at `now`; the record its claims map to.
    pub(crate) fn validate(&self, token: String, now: SystemTime) -> TokenFuture {
        let this = self.clone();
        Box::pin(async move {
            let header = jsonwebtoken::decode_header(&token)
                .map_err(|_| invalid("the header is not a JWT header with a supported `alg`"))?;
            if !this.inner.algorithms.contains(&header.alg) {
                return Err(invalid_owned(format!(
                    "the algorithm {:?} is not accepted",
                    header.alg
                )));
            }
            let key = if matches!(header.alg, Algorithm::HS256) {
                match &this.inner.hmac {
                    Some(k) => Arc::new(VerifyKey {
                        key: k.clone(),
                        algorithms: vec![Algorithm::HS256],
                    }),
                    None => return Err(invalid("HS256 is not accepted")),
                }
            } else {
                let kid = header.kid.as_deref();
                match this.inner.keys.load().find(kid) {
                    Some(k) => k,
                    None => {
                        if let Some(source) = &this.inner.source {
                            let _ = this.refresh_from(source, kid).await;
                        }
                        let keys = this.inner.keys.load();
                        match keys.find(kid) {
                            Some(k) => k,
                            None if !keys.fetched => return Err(TokenError::Unavailable),
                            None => return Err(invalid(
                                "it is signed with a key the identity provider does not publish",
                            )),
                        }
                    }
                }
            };
            if !key.algorithms.contains(&header.alg) {
                return Err(invalid_owned(format!(
                    "its signing key does not verify {:?}",
                    header.alg
                )));
            }
            this.claims(&token, &key, header.alg, now)
        })
    }

    fn claims(
        &self,
        token: &str,
        key: &VerifyKey,
        alg: Algorithm,
        now: SystemTime,
    ) -> Result<Arc<KeyRecord>, TokenError> {
        let inner = &*self.inner;
        let mut validation = Validation::new(alg);
        validation.algorithms = vec![alg];
        // Time is checked below, against the layer's clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.leeway = 0;
        validation.set_issuer(&[&inner.issuer]);
        validation.set_audience(&inner.audience);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data =
            jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, &key.key, &validation)
                .map_err(|e| {
                    use jsonwebtoken::errors::ErrorKind::*;
                    invalid(match e.kind() {
                        InvalidSignature => "the signature does not match",
                        InvalidIssuer => "the issuer (`iss`) is not the one accepted",
                        InvalidAudience => "the audience (`aud`) is not this service",
                        MissingRequiredClaim(c) if c == "exp" => "the token has no `exp`",
                        MissingRequiredClaim(c) if c == "iss" => "the token has no `iss`",
                        MissingRequiredClaim(_) => "the token has no `aud`",
                        InvalidAlgorithm => "the algorithm does not match the key",
                        _ => "the token is malformed",
                    })
                })?;
        let claims = data.claims;
        let now_secs = now
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let leeway = inner.leeway.as_secs_f64();
        let exp = claims
            .get("exp")
            .and_then(Value::as_f64)
            .filter(|t| t.is_finite() && *t >= 0.0)
            .ok_or_else(|| invalid("`exp` is not a number of seconds"))?;
        if now_secs >= exp + leeway {
            return Err(TokenError::Expired(at(exp)));
        }
        if let Some(nbf) = claims.get("nbf") {
            let nbf = nbf
                .as_f64()
                .ok_or_else(|| invalid("`nbf` is not a number of seconds"))?;
            if now_secs + leeway < nbf {
                return Err(invalid("it is not valid yet (`nbf`)"));
            }
        }
        let id = match claims.get(&inner.id_claim) {
            Some(Value::String(s)) if !s.trim().is_empty() => s.as_str(),
            _ => {
                return Err(invalid_owned(format!(
                    "the token has no `{}` claim naming the client",
                    inner.id_claim
                )))
            }
        };
        let mut b = KeyRecord::builder(id)
            .sha256(KeyHash::of(token.as_bytes()))
            .expires_at(at(exp + leeway))
            .label("iss", inner.issuer.clone());
        match claims.get(&inner.tier_claim) {
            None | Some(Value::Null) => {}
            Some(Value::String(t)) => b = b.tier(t.as_str()),
            Some(_) => {
                return Err(invalid_owned(format!(
                    "the `{}` claim is not a string",
                    inner.tier_claim
                )))
            }
        }
        match claims.get(&inner.models_claim) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => b = b.allow_models(s.split_whitespace()),
            Some(Value::Array(a)) => {
                for m in a {
                    match m.as_str() {
                        Some(m) => b = b.allow_model(m),
                        None => {
                            return Err(invalid_owned(format!(
                                "the `{}` claim holds a value that is not a string",
                                inner.models_claim
                            )))
                        }
                    }
                }
            }
            Some(_) => {
                return Err(invalid_owned(format!(
                    "the `{}` claim is neither a list nor a string",
                    inner.models_claim
                )))
            }
        }
        b.build()
            .map(Arc::new)
            .map_err(|e| invalid_owned(format!("a claim is not usable ({})", e.field())))
    }
}

fn at(secs: f64) -> SystemTime {
    UNIX_EPOCH + Duration::try_from_secs_f64(secs).unwrap_or(Duration::from_secs(u32::MAX.into()))
}

fn invalid(why: &'static str) -> TokenError {
    TokenError::Invalid(Cow::Borrowed(why))
}

fn invalid_owned(why: String) -> TokenError {
    TokenError::Invalid(Cow::Owned(why))
}

async fn fetch(source: &Source) -> Result<KeySet, KeyStoreError> {
    let mut res = source
        .client
        .get(&source.url)
        .header("accept", "application/json")
        .timeout(source.timeout)
        .send()
        .await
        .map_err(KeyStoreError::new)?;
    if !res.status().is_success() {
        return Err(KeyStoreError::new(format!(
            "the JWKS answered {}",
            res.status()
        )));
    }
    let mut body = Vec::new();
    while let Some(chunk) = res.chunk().await.map_err(KeyStoreError::new)? {
        if body.len() + chunk.len() > MAX_JWKS_BYTES {
            return Err(KeyStoreError::new("the JWKS is larger than 1 MiB"));
        }
        body.extend_from_slice(&chunk);
    }
    let set: JwkSet = serde_json::from_slice(&body)
        .map_err(|e| KeyStoreError::new(format!("the JWKS is not a key set: {e}")))?;
    let keys = key_set(&set);
    if keys.len() == 0 {
        return Err(KeyStoreError::new("the JWKS holds no usable signing key"));
    }
    Ok(keys)
}

/// Configures a [`JwtValidator`]; [`JwtValidatorBuilder::build`] checks it.
pub struct JwtValidatorBuilder {
    issuer: Option<String>,
    audience: Vec<String>,
    algorithms: Vec<Algorithm>,
    leeway: Duration,
    hmac: Option<Vec<u8>>,
    jwks_url: Option<String>,
    jwks: Option<String>,
    client: Option<reqwest::Client>,
    timeout: Duration,
    every: Duration,
    id_claim: String,
    tier_claim: String,
    models_claim: String,
}

impl fmt::Debug for JwtValidatorBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtValidatorBuilder")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("algorithms", &self.algorithms)
            .field("hs256_secret", &self.hmac.as_ref().map(|_| "<redacted>"))
            .field("jwks_url", &self.jwks_url)
            .finish_non_exhaustive()
    }
}

impl JwtValidatorBuilder {
    /// The issuer tokens must name in `iss` (required).
    pub fn issuer(mut self, issuer: impl Into<String>) -> Self {
        self.issuer = Some(issuer.into());
        self
    }

    /// An audience tokens may name in `aud`; call it once per accepted audience (at least
    /// one is required).
    pub fn audience(mut self, audience: impl Into<String>) -> Self {
        self.audience.push(audience.into());
        self
    }

    /// The asymmetric algorithms accepted (RS256, ES256 and EdDSA by default). HS256 is
    /// added by [`hs256_secret`](Self::hs256_secret) alone.
    pub fn algorithms(mut self, algorithms: impl IntoIterator<Item = Algorithm>) -> Self {
        self.algorithms = algorithms.into_iter().collect();
        self
    }

    /// The clock skew allowed on `exp` and `nbf` (60 s by default, at most 5 minutes).
    pub fn leeway(mut self, leeway: Duration) -> Self {
        self.leeway = leeway;
        self
    }

    /// Accepts HS256 tokens signed with this shared secret (at least 32 bytes). Only this
    /// secret verifies them.
    pub fn hs256_secret(mut self, secret: impl AsRef<[u8]>) -> Self {
        self.hmac = Some(secret.as_ref().to_vec());
        self
    }

    /// Where the identity provider publishes its signing keys (`.../jwks.json`).
    pub fn jwks_url(mut self, url: impl Into<String>) -> Self {
        self.jwks_url = Some(url.into());
        self
    }

    /// A fixed key set (JWKS JSON), instead of or before the URL's.
    pub fn jwks(mut self, json: impl Into<String>) -> Self {
        self.jwks = Some(json.into());
        self
    }

    /// The HTTP client for the JWKS (a plain reqwest client by default).
    pub fn http_client(mut self, client: reqwest::Client) -> Self {
        self.client = Some(client);
        self
    }

    /// How long one JWKS fetch may take (5 s by default).
    pub fn fetch_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The least time between two JWKS fetches (30 s by default; zero lets every unknown
    /// `kid` fetch).
    pub fn refresh_interval(mut self, every: Duration) -> Self {
        self.every = every;
        self
    }

    /// The claim that names the client (`sub` by default).
    pub fn id_claim(mut self, claim: impl Into<String>) -> Self {
        self.id_claim = claim.into();
        self
    }

    /// The claim that names the tier (`tier` by default).
    pub fn tier_claim(mut self, claim: impl Into<String>) -> Self {
        self.tier_claim = claim.into();
        self
    }

    /// The claim that lists the allowed models (`models` by default).
    pub fn models_claim(mut self, claim: impl Into<String>) -> Self {
        self.models_claim = claim.into();
        self
    }

    /// Checks the settings; each refusal names the field.
    pub fn build(self) -> Result<JwtValidator, ConfigError> {
        let field = |f: &str| format!("jwt.{f}");
        let issuer = match self.issuer {
            Some(i) if !i.trim().is_empty() => i,
            _ => {
                return Err(config_error(
                    field("issuer"),
                    "the accepted issuer is required",
                ))
            }
        };
        if self.audience.is_empty() || self.audience.iter().any(|a| a.trim().is_empty()) {
            return Err(config_error(
                field("audience"),
                "at least one non-empty audience is required",
            ));
        }
        if self.leeway > MAX_LEEWAY {
            return Err(config_error(
                field("leeway"),
                format!("must be at most 5 minutes, got {:?}", self.leeway),
            ));
        }
        let mut algorithms = Vec::new();
        for a in self.algorithms {
            if matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
                return Err(config_error(
                    field("algorithms"),
                    "HMAC algorithms are accepted only through hs256_secret",
                ));
            }
            if !algorithms.contains(&a) {
                algorithms.push(a);
            }
        }
        let hmac = match self.hmac {
            Some(s) if s.len() < 32 => {
                return Err(config_error(
                    field("hs256_secret"),
                    "must be at least 32 bytes",
                ))
            }
            Some(s) => {
                algorithms.push(Algorithm::HS256);
                Some(DecodingKey::from_secret(&s))
            }
            None => None,
        };
        if algorithms.is_empty() {
            return Err(config_error(
                field("algorithms"),
                "no algorithm is accepted",
            ));
        }
        for (name, claim) in [
            ("id_claim", &self.id_claim),
            ("tier_claim", &self.tier_claim),
            ("models_claim", &self.models_claim),
        ] {
            if claim.trim().is_empty() {
                return Err(config_error(field(name), "the claim name is empty"));
            }
        }
        let keys = match &self.jwks {
            Some(json) => {
                let set: JwkSet = serde_json::from_str(json)
                    .map_err(|e| config_error(field("jwks"), format!("not a key set: {e}")))?;
                let keys = key_set(&set);
                if keys.len() == 0 {
                    return Err(config_error(field("jwks"), "holds no usable signing key"));
                }
                keys
            }
            None => KeySet::default(),
        };
        let source = match self.jwks_url {
            Some(url) => {
                let parsed = reqwest::Url::parse(&url).map_err(|e| {
                    config_error(field("jwks_url"), format!("{url:?} is not a URL: {e}"))
                })?;
                if !matches!(parsed.scheme(), "http" | "https") {
                    return Err(config_error(
                        field("jwks_url"),
                        "expected an http:// or https:// URL",
                    ));
                }
                if self.timeout.is_zero() {
                    return Err(config_error(field("fetch_timeout"), "must be positive"));
                }
                Some(Source {
                    url,
                    client: self.client.unwrap_or_default(),
                    timeout: self.timeout,
                    every: self.every,
                    last: tokio::sync::Mutex::new(None),
                })
            }
            None => None,
        };
        if source.is_none() && self.jwks.is_none() && hmac.is_none() {
            return Err(config_error(
                field("jwks_url"),
                "give the JWKS URL, a fixed JWKS, or an HS256 secret",
            ));
        }
        Ok(JwtValidator {
            inner: Arc::new(Inner {
                issuer,
                audience: self.audience,
                algorithms,
                leeway: self.leeway,
                hmac,
                id_claim: self.id_claim,
                tier_claim: self.tier_claim,
                models_claim: self.models_claim,
                keys: ArcSwap::from_pointee(keys),
                source,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_shape() {
        assert!(looks_like_jwt(b"eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln"));
        assert!(!looks_like_jwt(b"sk-team-a-0123456789abcdef"));
        assert!(!looks_like_jwt(b"eyJ.only-one-dot"));
    }
}
