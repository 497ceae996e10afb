//! OAuth 2.0 / JWT bearer tokens beside API keys: a local identity provider (an axum JWKS
//! server on 127.0.0.1:0) with keys generated in the test, tokens that pass, expire, rotate
//! and fail, and the provider going down.
#![cfg(feature = "jwt")]

mod common_auth;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use llm_layers::auth::{ApiKeyAuthLayer, InMemoryKeyStore, JwtValidator, KeyRecord};
use serde_json::{json, Value};

const ISS: &str = "https://idp.test/";
const AUD: &str = "llm-gateway";
const API_KEY: &str = "sk-beside-tokens-0123456789abcd";
const HS_SECRET: &str = "a-shared-secret-of-at-least-32-bytes!";

fn b64url(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(T[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

/// A signing key made in the test, with its public JWK.
struct Signer {
    kid: String,
    alg: Algorithm,
    key: EncodingKey,
    public: Vec<u8>,
    jwk: Value,
}

fn ed25519(kid: &str) -> Signer {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let public = pair.public_key_raw().to_vec();
    Signer {
        kid: kid.to_owned(),
        alg: Algorithm::EdDSA,
        key: EncodingKey::from_ed_der(&pair.serialize_der()),
        jwk: json!({"kty": "OKP", "crv": "Ed25519", "use": "sig", "kid": kid, "x": b64url(&public)}),
        public,
    }
}

fn p256(kid: &str) -> Signer {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let public = pair.public_key_raw().to_vec();
    assert_eq!((public.len(), public[0]), (65, 4), "an uncompressed point");
    Signer {
        kid: kid.to_owned(),
        alg: Algorithm::ES256,
        key: EncodingKey::from_ec_der(&pair.serialize_der()),
        jwk: json!({
            "kty": "EC", "crv": "P-256", "alg": "ES256", "kid": kid,
            "x": b64url(&public[1..33]), "y": b64url(&public[33..]),
        }),
        public,
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims that pass, with `extra` merged in (a `null` removes a claim).
fn claims(extra: Value) -> Value {
    let mut c =
        json!({"iss": ISS, "aud": AUD, "sub": "client-1", "tier": "pro", "exp": now() + 600});
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

fn sign(signer: &Signer, claims: &Value) -> String {
    let mut header = Header::new(signer.alg);
    header.kid = Some(signer.kid.clone());
    jsonwebtoken::encode(&header, claims, &signer.key).unwrap()
}

/// The local identity provider: serves a JWKS, counts fetches, and can be taken down.
#[derive(Clone)]
struct Idp {
    keys: Arc<Mutex<Vec<Value>>>,
    fetches: Arc<AtomicUsize>,
    up: Arc<AtomicBool>,
    url: String,
}

impl Idp {
    async fn start(keys: &[&Signer]) -> Idp {
        let state = Idp {
            keys: Arc::new(Mutex::new(keys.iter().map(|s| s.jwk.clone()).collect())),
            fetches: Arc::default(),
            up: Arc::new(AtomicBool::new(true)),
            url: String::new(),
        };
        let app = Router::new()
            .route(
                "/jwks.json",
                get(|State(idp): State<Idp>| async move {
                    idp.fetches.fetch_add(1, Ordering::SeqCst);
                    if !idp.up.load(Ordering::SeqCst) {
                        return (StatusCode::SERVICE_UNAVAILABLE, "down".to_owned());
                    }
                    let keys = idp.keys.lock().unwrap().clone();
                    (StatusCode::OK, json!({ "keys": keys }).to_string())
                }),
            )
            .with_state(state.clone());
        let base = common_auth::serve(app).await;
        Idp {
            url: format!("{base}/jwks.json"),
            ..state
        }
    }

    fn publish(&self, signer: &Signer) {
        self.keys.lock().unwrap().push(signer.jwk.clone());
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

fn validator(idp: &Idp) -> llm_layers::auth::JwtValidatorBuilder {
    JwtValidator::builder()
        .issuer(ISS)
        .audience(AUD)
        .jwks_url(&idp.url)
}

/// A gateway that takes API keys and bearer tokens, answering with what it saw.
async fn gateway(tokens: JwtValidator) -> String {
    let keys = InMemoryKeyStore::new([KeyRecord::builder("api-key")
        .secret(API_KEY)
        .build()
        .unwrap()])
    .unwrap();
    let app = Router::new()
        .route("/v1/chat/completions", post(common_auth::echo))
        .layer(
            ApiKeyAuthLayer::builder(keys)
                .bearer_tokens(tokens)
                .build()
                .unwrap(),
        );
    common_auth::serve(app).await
}

async fn send(url: &str, bearer: &str, model: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(bearer)
        .header("content-type", "application/json")
        .body(common_auth::chat(model))
        .send()
        .await
        .unwrap()
}

async fn passes(url: &str, bearer: &str) -> Value {
    let res = send(url, bearer, "gpt-4o-mini").await;
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

/// Checks a refusal and its `WWW-Authenticate`; returns the message.
async fn refused(url: &str, bearer: &str, code: &str) -> String {
    let res = send(url, bearer, "gpt-4o-mini").await;
    let (message, challenge) = common_auth::rejection(res, 401, code).await;
    assert_eq!(
        challenge.as_deref(),
        Some(r#"Bearer error="invalid_token""#),
        "{message}"
    );
    assert!(!message.contains("eyJ"), "no token in messages: {message}");
    message
}

#[tokio::test]
async fn tokens_pass_and_map_to_the_same_identity_as_keys() {
    let (ed, ec) = (ed25519("ed-1"), p256("ec-1"));
    let idp = Idp::start(&[&ed, &ec]).await;
    let url = gateway(validator(&idp).build().unwrap()).await;

    for signer in [&ed, &ec] {
        let seen = passes(&url, &sign(signer, &claims(json!({})))).await;
        assert_eq!(seen["id"], "client-1");
        assert_eq!(seen["tier"], "pro");
        assert_eq!(seen["labels"]["iss"], ISS);
        // The token does not go on upstream.
        assert_eq!(seen["headers"]["authorization"], json!([]));
    }
    assert_eq!(idp.fetches(), 1, "the set is fetched once and kept");

    // `models` restricts the token as it restricts a key; `aud` may be an array.
    let mini = sign(
        &ed,
        &claims(json!({"models": ["gpt-4o-mini*"], "aud": ["other", AUD], "sub": "interns"})),
    );
    assert_eq!(passes(&url, &mini).await["id"], "interns");
    let res = send(&url, &mini, "gpt-4o").await;
    let (message, _) = common_auth::rejection(res, 403, "permission_denied").await;
    assert!(message.contains("gpt-4o"), "{message}");

    // API keys work beside tokens.
    assert_eq!(passes(&url, API_KEY).await["id"], "api-key");
}

#[tokio::test]
async fn expired_and_not_yet_valid_tokens_are_refused_within_the_leeway() {
    let ed = ed25519("ed-1");
    let idp = Idp::start(&[&ed]).await;
    let url = gateway(
        validator(&idp)
            .leeway(Duration::from_secs(60))
            .build()
            .unwrap(),
    )
    .await;
    let expired = sign(&ed, &claims(json!({"exp": now() - 120})));
    let message = refused(&url, &expired, "expired_api_key").await;
    assert!(message.contains("expired at"), "{message}");
    // Within the leeway: still good.
    passes(&url, &sign(&ed, &claims(json!({"exp": now() - 20})))).await;
    let early = sign(&ed, &claims(json!({"nbf": now() + 600})));
    let message = refused(&url, &early, "invalid_api_key").await;
    assert!(message.contains("not valid yet"), "{message}");
    passes(&url, &sign(&ed, &claims(json!({"nbf": now() + 20})))).await;
}

#[tokio::test]
async fn wrong_issuer_audience_signature_or_claims_are_refused() {
    let ed = ed25519("ed-1");
    let idp = Idp::start(&[&ed]).await;
    let url = gateway(validator(&idp).build().unwrap()).await;
    let cases = [
        (
            sign(&ed, &claims(json!({"iss": "https://evil.test/"}))),
            "issuer",
        ),
        (
            sign(&ed, &claims(json!({"aud": "someone-else"}))),
            "audience",
        ),
        (sign(&ed, &claims(json!({"exp": null}))), "`exp`"),
        (sign(&ed, &claims(json!({"sub": null}))), "`sub`"),
        (sign(&ed, &claims(json!({"models": 7}))), "`models`"),
        // Signed by another key that claims the published `kid`.
        (sign(&ed25519("ed-1"), &claims(json!({}))), "signature"),
        // A key the provider never published.
        (
            sign(&ed25519("ed-9"), &claims(json!({}))),
            "does not publish",
        ),
    ];
    for (token, named) in &cases {
        let message = refused(&url, token, "invalid_api_key").await;
        assert!(message.contains(named), "{named}: {message}");
    }
    // A payload changed after signing.
    let token = sign(&ed, &claims(json!({})));
    let mut parts: Vec<&str> = token.split('.').collect();
    let forged = b64url(claims(json!({"tier": "enterprise"})).to_string().as_bytes());
    parts[1] = &forged;
    let message = refused(&url, &parts.join("."), "invalid_api_key").await;
    assert!(message.contains("signature"), "{message}");
}

#[tokio::test]
async fn alg_none_and_algorithm_confusion_are_refused() {
    let (ed, ec) = (ed25519("ed-1"), p256("ec-1"));
    let idp = Idp::start(&[&ed, &ec]).await;
    let url = gateway(validator(&idp).build().unwrap()).await;
    let body = b64url(claims(json!({})).to_string().as_bytes());

    // `alg: none`, with and without a signature part.
    for header in [
        json!({"alg": "none", "typ": "JWT", "kid": "ed-1"}),
        json!({"alg": "None", "kid": "ed-1"}),
    ] {
        let head = b64url(header.to_string().as_bytes());
        for token in [format!("{head}.{body}."), format!("{head}.{body}.c2ln")] {
            refused(&url, &token, "invalid_api_key").await;
        }
    }

    // HS256 "signed" with a published public key as the HMAC secret: HS256 is not accepted.
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("ed-1".to_owned());
    for secret in [ed.public.clone(), ed.jwk.to_string().into_bytes()] {
        let token = jsonwebtoken::encode(
            &header,
            &claims(json!({})),
            &EncodingKey::from_secret(&secret),
        )
        .unwrap();
        let message = refused(&url, &token, "invalid_api_key").await;
        assert!(message.contains("HS256"), "{message}");
    }

    // A header that names one key's algorithm and another key's `kid`.
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("ed-1".to_owned());
    let token = jsonwebtoken::encode(&header, &claims(json!({})), &ec.key).unwrap();
    let message = refused(&url, &token, "invalid_api_key").await;
    assert!(message.contains("does not verify"), "{message}");

    // With an HS256 secret configured, only that secret verifies HS256 tokens.
    let url = gateway(validator(&idp).hs256_secret(HS_SECRET).build().unwrap()).await;
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("ed-1".to_owned());
    let confused = jsonwebtoken::encode(
        &header,
        &claims(json!({})),
        &EncodingKey::from_secret(&ed.public),
    )
    .unwrap();
    let message = refused(&url, &confused, "invalid_api_key").await;
    assert!(message.contains("signature"), "{message}");
    let good = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(json!({})),
        &EncodingKey::from_secret(HS_SECRET.as_bytes()),
    )
    .unwrap();
    assert_eq!(passes(&url, &good).await["id"], "client-1");
}

#[tokio::test]
async fn a_rotated_key_is_fetched_once_and_fetches_are_rate_limited() {
    let old = ed25519("2026-01");
    let idp = Idp::start(&[&old]).await;
    let url = gateway(
        validator(&idp)
            .refresh_interval(Duration::ZERO)
            .build()
            .unwrap(),
    )
    .await;
    passes(&url, &sign(&old, &claims(json!({})))).await;
    assert_eq!(idp.fetches(), 1);

    // The provider rotates: 20 concurrent requests with the new `kid` make one fetch.
    let new = ed25519("2026-02");
    idp.publish(&new);
    let token = sign(&new, &claims(json!({})));
    let answers: Vec<_> = (0..20)
        .map(|_| {
            let (url, token) = (url.clone(), token.clone());
            tokio::spawn(async move { send(&url, &token, "gpt-4o-mini").await.status() })
        })
        .collect();
    for a in answers {
        assert_eq!(a.await.unwrap(), 200);
    }
    assert_eq!(idp.fetches(), 2, "single flight");
    passes(&url, &sign(&old, &claims(json!({})))).await;

    // With a refresh interval, made-up `kid`s cannot make the validator fetch again.
    let limited = validator(&idp)
        .refresh_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    assert_eq!(limited.refresh().await.unwrap(), 2);
    let url = gateway(limited).await;
    let before = idp.fetches();
    for i in 0..5 {
        let stranger = sign(&ed25519(&format!("made-up-{i}")), &claims(json!({})));
        refused(&url, &stranger, "invalid_api_key").await;
    }
    assert_eq!(
        idp.fetches(),
        before,
        "no fetch within the refresh interval"
    );
    passes(&url, &sign(&new, &claims(json!({})))).await;
}

#[tokio::test]
async fn the_provider_going_down_keeps_the_last_keys() {
    let ed = ed25519("ed-1");
    let idp = Idp::start(&[&ed]).await;
    let tokens = validator(&idp)
        .refresh_interval(Duration::ZERO)
        .build()
        .unwrap();
    let url = gateway(tokens.clone()).await;
    passes(&url, &sign(&ed, &claims(json!({})))).await;

    idp.up.store(false, Ordering::SeqCst);
    // An unknown `kid` makes a fetch, which fails: the last set stays.
    let rotated = ed25519("ed-2");
    idp.publish(&rotated);
    refused(&url, &sign(&rotated, &claims(json!({}))), "invalid_api_key").await;
    assert!(tokens.refresh().await.is_err());
    assert_eq!(tokens.key_count(), 1);
    passes(&url, &sign(&ed, &claims(json!({})))).await;

    // Back up: the rotated key is fetched.
    idp.up.store(true, Ordering::SeqCst);
    passes(&url, &sign(&rotated, &claims(json!({})))).await;
    assert_eq!(tokens.key_count(), 2);

    // A validator that never got a set answers 503 while the provider is down.
    idp.up.store(false, Ordering::SeqCst);
    let url = gateway(validator(&idp).build().unwrap()).await;
    let res = send(&url, &sign(&ed, &claims(json!({}))), "gpt-4o-mini").await;
    assert_eq!(res.status(), 503);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "service_unavailable");
}

#[test]
fn settings_are_checked_and_secrets_never_shown() {
    let base = || {
        JwtValidator::builder()
            .issuer(ISS)
            .audience(AUD)
            .jwks_url("http://127.0.0.1:1/jwks.json")
    };
    let field =
        |b: llm_layers::auth::JwtValidatorBuilder| b.build().unwrap_err().field().to_owned();
    assert_eq!(
        field(JwtValidator::builder().audience(AUD).jwks_url("http://x/")),
        "jwt.issuer"
    );
    assert_eq!(
        field(JwtValidator::builder().issuer(ISS).jwks_url("http://x/")),
        "jwt.audience"
    );
    assert_eq!(field(base().leeway(Duration::from_secs(600))), "jwt.leeway");
    assert_eq!(field(base().hs256_secret("short")), "jwt.hs256_secret");
    assert_eq!(
        field(base().algorithms([Algorithm::HS256])),
        "jwt.algorithms"
    );
    assert_eq!(field(base().algorithms([])), "jwt.algorithms");
    assert_eq!(field(base().jwks_url("ftp://idp/jwks")), "jwt.jwks_url");
    assert_eq!(field(base().jwks("{\"keys\": []}")), "jwt.jwks");
    assert_eq!(
        field(JwtValidator::builder().issuer(ISS).audience(AUD)),
        "jwt.jwks_url"
    );
    let v = base().hs256_secret(HS_SECRET).build().unwrap();
    let shown = format!("{v:?} {:?}", base().hs256_secret(HS_SECRET));
    assert!(!shown.contains(HS_SECRET), "{shown}");
}

/// An RSA key made by the `openssl` command for this test (ring makes no RSA keys), or `None`
/// where the command is missing.
fn rsa(kid: &str) -> Option<(Signer, Vec<u8>)> {
    let dir = std::env::temp_dir().join(format!("llm-layers-jwt-rsa-{}-{kid}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let run = |args: &[&str]| {
        std::process::Command::new("openssl")
            .args(args)
            .current_dir(&dir)
            .output()
            .ok()
            .filter(|o| o.status.success())
    };
    run(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        "key.pem",
    ])?;
    run(&[
        "rsa",
        "-in",
        "key.pem",
        "-traditional",
        "-outform",
        "DER",
        "-out",
        "key.der",
    ])?;
    let public_pem = run(&["rsa", "-in", "key.pem", "-pubout"])?.stdout;
    let modulus =
        String::from_utf8(run(&["rsa", "-in", "key.pem", "-noout", "-modulus"])?.stdout).ok()?;
    let hex = modulus.trim().strip_prefix("Modulus=")?;
    let n: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let der = std::fs::read(dir.join("key.der")).ok()?;
    std::fs::remove_dir_all(&dir).ok()?;
    Some((
        Signer {
            kid: kid.to_owned(),
            alg: Algorithm::RS256,
            key: EncodingKey::from_rsa_der(&der),
            public: n.clone(),
            jwk: json!({"kty": "RSA", "kid": kid, "use": "sig", "n": b64url(&n), "e": "AQAB"}),
        },
        public_pem,
    ))
}

#[tokio::test]
async fn rs256_tokens_pass_and_the_rsa_public_key_is_no_hmac_secret() {
    let Some((rs, public_pem)) = rsa("rs-1") else {
        eprintln!("skipped: no `openssl` command to make an RSA key");
        return;
    };
    let idp = Idp::start(&[&rs]).await;
    let url = gateway(validator(&idp).build().unwrap()).await;
    assert_eq!(
        passes(&url, &sign(&rs, &claims(json!({})))).await["id"],
        "client-1"
    );

    // The classic confusion: HS256 with the RSA public key (PEM, or its modulus) as secret.
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("rs-1".to_owned());
    for secret in [public_pem, rs.public.clone()] {
        let token = jsonwebtoken::encode(
            &header,
            &claims(json!({})),
            &EncodingKey::from_secret(&secret),
        )
        .unwrap();
        refused(&url, &token, "invalid_api_key").await;
    }
    // PS256 is not accepted unless configured; RS384 neither.
    for alg in [Algorithm::PS256, Algorithm::RS384] {
        let mut header = Header::new(alg);
        header.kid = Some("rs-1".to_owned());
        let token = jsonwebtoken::encode(&header, &claims(json!({})), &rs.key).unwrap();
        let message = refused(&url, &token, "invalid_api_key").await;
        assert!(message.contains("not accepted"), "{message}");
    }
    let url = gateway(
        validator(&idp)
            .algorithms([Algorithm::RS256, Algorithm::PS256])
            .build()
            .unwrap(),
    )
    .await;
    let mut header = Header::new(Algorithm::PS256);
    header.kid = Some("rs-1".to_owned());
    let token = jsonwebtoken::encode(&header, &claims(json!({})), &rs.key).unwrap();
    passes(&url, &token).await;
}
