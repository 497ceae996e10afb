//! Finding the presented key in the request headers, and masking it for messages.

use std::fmt;

use http::header::{HeaderName, AUTHORIZATION};
use http::HeaderMap;
use subtle::ConstantTimeEq;

/// `x-api-key`, the header Anthropic's API reads the key from.
pub const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
/// `api-key`, the header Azure OpenAI reads the key from.
pub const API_KEY: HeaderName = HeaderName::from_static("api-key");

/// Which request headers may carry the key.
///
/// All three are accepted by default. A header that is not accepted is ignored, except that a
/// request whose only credential sits in such a header is told which headers are accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptedHeaders {
    bearer: bool,
    x_api_key: bool,
    api_key: bool,
}

impl Default for AcceptedHeaders {
    fn default() -> Self {
        AcceptedHeaders::all()
    }
}

impl AcceptedHeaders {
    /// `Authorization: Bearer`, `x-api-key` and `api-key`.
    pub const fn all() -> Self {
        AcceptedHeaders {
            bearer: true,
            x_api_key: true,
            api_key: true,
        }
    }

    /// No header at all (a layer refuses to be built with this; add headers to it).
    pub const fn none() -> Self {
        AcceptedHeaders {
            bearer: false,
            x_api_key: false,
            api_key: false,
        }
    }

    /// Accepts (or not) `Authorization: Bearer <key>`; the scheme is matched case-insensitively.
    pub const fn bearer(mut self, on: bool) -> Self {
        self.bearer = on;
        self
    }

    /// Accepts (or not) `x-api-key: <key>` (Anthropic style).
    pub const fn x_api_key(mut self, on: bool) -> Self {
        self.x_api_key = on;
        self
    }

    /// Accepts (or not) `api-key: <key>` (Azure style).
    pub const fn api_key(mut self, on: bool) -> Self {
        self.api_key = on;
        self
    }

    /// Whether `Authorization: Bearer` is accepted.
    pub const fn accepts_bearer(&self) -> bool {
        self.bearer
    }

    /// Whether `x-api-key` is accepted.
    pub const fn accepts_x_api_key(&self) -> bool {
        self.x_api_key
    }

    /// Whether `api-key` is accepted.
    pub const fn accepts_api_key(&self) -> bool {
        self.api_key
    }

    /// Whether no header is accepted.
    pub const fn is_empty(&self) -> bool {
        !(self.bearer || self.x_api_key || self.api_key)
    }

    fn describe(&self) -> String {
        let mut parts = Vec::with_capacity(3);
        if self.bearer {
            parts.push("`Authorization: Bearer <key>`");
        }
        if self.x_api_key {
            parts.push("`x-api-key: <key>`");
        }
        if self.api_key {
            parts.push("`api-key: <key>`");
        }
        match parts.len() {
            0 => "no header".to_owned(),
            1 => parts[0].to_owned(),
            _ => {
                let last = parts.pop().unwrap_or_default();
                format!("{} or {}", parts.join(", "), last)
            }
        }
    }
}

/// Why no key could be taken from the request headers. The message never quotes the key.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CredentialError {
    /// No accepted header carries a key.
    Missing {
        /// The headers that would have been read.
        accepted: AcceptedHeaders,
    },
    /// The only credential sits in a header this server does not read.
    NotAccepted {
        /// The header that was sent.
        header: &'static str,
        /// The headers that would have been read.
        accepted: AcceptedHeaders,
    },
    /// The same credential header appears more than once.
    Duplicate {
        /// The header's name.
        header: &'static str,
        /// How many times it appears.
        count: usize,
    },
    /// `Authorization` uses a scheme other than `Bearer`.
    UnsupportedScheme {
        /// The scheme, when it is a well-known one (`Basic`, `Digest`, ...). Unknown words are
        /// not repeated, since a client may have put its key there.
        scheme: Option<&'static str>,
    },
    /// `Authorization` holds a single word that is not a scheme (a bare key, perhaps).
    MissingScheme,
    /// The header is present but the key in it is empty.
    EmptyKey {
        /// The header's name.
        header: &'static str,
    },
    /// The key holds bytes that are not visible ASCII (spaces, control bytes, non-ASCII).
    InvalidCharacters {
        /// The header's name.
        header: &'static str,
    },
    /// Two headers carry different keys.
    Conflicting {
        /// The first header's name.
        first: &'static str,
        /// The second header's name.
        second: &'static str,
    },
}

impl CredentialError {
    /// Whether no key was sent at all, as opposed to a malformed or conflicting one.
    pub fn is_missing(&self) -> bool {
        matches!(
            self,
            CredentialError::Missing { .. } | CredentialError::NotAccepted { .. }
        )
    }

    /// The client-facing message.
    pub fn message(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for CredentialError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CredentialError::Missing { accepted } => write!(
                f,
                "You didn't provide an API key. Send it as {}.",
                accepted.describe()
            ),
            CredentialError::NotAccepted { header, accepted } => write!(
                f,
                "This server does not read the API key from the `{header}` header. Send it as {}.",
                accepted.describe()
            ),
            CredentialError::Duplicate { header, count } => write!(
                f,
                "The request has {count} `{header}` headers; send exactly one."
            ),
            CredentialError::UnsupportedScheme { scheme: Some(s) } => write!(
                f,
                "The Authorization scheme `{s}` is not supported; use `Authorization: Bearer <key>`."
            ),
            CredentialError::UnsupportedScheme { scheme: None } => f.write_str(
                "The Authorization scheme is not supported; use `Authorization: Bearer <key>`.",
            ),
            CredentialError::MissingScheme => f.write_str(
                "The Authorization header has no scheme; use `Authorization: Bearer <key>`.",
            ),
            CredentialError::EmptyKey { header } => {
                write!(f, "The API key in the `{header}` header is empty.")
            }
            CredentialError::InvalidCharacters { header } => write!(
                f,
                "The API key in the `{header}` header contains characters that are not allowed \
                 (only visible ASCII, no spaces)."
            ),
            CredentialError::Conflicting { first, second } => write!(
                f,
                "The `{first}` and `{second}` headers carry different API keys; send one key."
            ),
        }
    }
}

impl std::error::Error for CredentialError {}

const KNOWN_SCHEMES: &[&str] = &[
    "Basic",
    "Digest",
    "Token",
    "ApiKey",
    "Negotiate",
    "NTLM",
    "HOBA",
    "Mutual",
    "DPoP",
    "OAuth",
    "AWS4-HMAC-SHA256",
    "SCRAM-SHA-256",
    "VAPID",
];

fn known_scheme(word: &[u8]) -> Option<&'static str> {
    KNOWN_SCHEMES
        .iter()
        .copied()
        .find(|s| s.as_bytes().eq_ignore_ascii_case(word))
}

fn is_ows(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = v {
        if is_ows(*first) {
            v = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = v {
        if is_ows(*last) {
            v = rest;
        } else {
            break;
        }
    }
    v
}

fn is_key_byte(b: u8) -> bool {
    (0x21..=0x7e).contains(&b)
}

fn check_key<'a>(key: &'a [u8], header: &'static str) -> Result<&'a [u8], CredentialError> {
    if key.is_empty() {
        return Err(CredentialError::EmptyKey { header });
    }
    if !all_key_bytes(key) {
        return Err(CredentialError::InvalidCharacters { header });
    }
    Ok(key)
}

/// Whether every byte is visible ASCII. Folds over the whole key without stopping early, so
/// that the loop vectorizes (and its time depends only on the key's length).
fn all_key_bytes(key: &[u8]) -> bool {
    key.iter()
        .fold(0u8, |bad, b| bad | u8::from(!is_key_byte(*b)))
        == 0
}

fn parse_authorization(value: &[u8]) -> Result<&[u8], CredentialError> {
    const HEADER: &str = "Authorization";
    let value = trim_ows(value);
    if value.is_empty() {
        return Err(CredentialError::EmptyKey { header: HEADER });
    }
    let (scheme, rest) = match value.iter().position(|b| is_ows(*b)) {
        Some(i) => (&value[..i], trim_ows(&value[i..])),
        None => (value, &value[value.len()..]),
    };
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return match known_scheme(scheme) {
            Some(s) => Err(CredentialError::UnsupportedScheme { scheme: Some(s) }),
            None if rest.is_empty() => Err(CredentialError::MissingScheme),
            None => Err(CredentialError::UnsupportedScheme { scheme: None }),
        };
    }
    check_key(rest, HEADER)
}

/// The single value of `name`, or an error when it appears more than once.
fn single<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
    label: &'static str,
) -> Result<Option<&'a [u8]>, CredentialError> {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    let more = values.count();
    if more > 0 {
        return Err(CredentialError::Duplicate {
            header: label,
            count: more + 1,
        });
    }
    Ok(Some(first.as_bytes()))
}

/// Takes the API key from the request headers.
///
/// Reads each accepted header (`Authorization: Bearer <key>` with the scheme matched
/// case-insensitively as RFC 7235 asks, `x-api-key`, `api-key`). Fails on a header sent twice,
/// a scheme other than `Bearer`, an empty key, a key with bytes other than visible ASCII, and
/// two headers carrying different keys; the same key in two headers is fine. Never allocates on
/// success.
///
/// ```
/// use http::HeaderMap;
/// use llm_layers::auth::{extract_api_key, AcceptedHeaders, CredentialError};
///
/// let mut headers = HeaderMap::new();
/// headers.insert("authorization", "bearer sk-test-123".parse().unwrap());
/// assert_eq!(extract_api_key(&headers, AcceptedHeaders::all()), Ok(&b"sk-test-123"[..]));
///
/// headers.insert("x-api-key", "sk-other-456".parse().unwrap());
/// assert!(matches!(
///     extract_api_key(&headers, AcceptedHeaders::all()),
///     Err(CredentialError::Conflicting { .. })
/// ));
/// ```
pub fn extract_api_key(
    headers: &HeaderMap,
    accepted: AcceptedHeaders,
) -> Result<&[u8], CredentialError> {
    extract(headers, accepted).map(|(key, _)| key)
}

/// The credential headers a request may still carry after [`extract`]: an accepted header
/// that was looked up and is absent is known to be absent; every other one may be present.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MaybePresent {
    pub(crate) authorization: bool,
    pub(crate) x_api_key: bool,
    pub(crate) api_key: bool,
}

impl MaybePresent {
    /// Nothing known: every credential header may be present.
    pub(crate) const ALL: MaybePresent = MaybePresent {
        authorization: true,
        x_api_key: true,
        api_key: true,
    };
}

/// [`extract_api_key`], also telling which credential headers may be present, so that
/// stripping them later looks up only those.
pub(crate) fn extract(
    headers: &HeaderMap,
    accepted: AcceptedHeaders,
) -> Result<(&[u8], MaybePresent), CredentialError> {
    let mut found: [(Option<&[u8]>, &'static str); 3] = [(None, ""); 3];
    if accepted.bearer {
        if let Some(v) = single(headers, &AUTHORIZATION, "Authorization")? {
            found[0] = (Some(parse_authorization(v)?), "Authorization");
        }
    }
    if accepted.x_api_key {
        if let Some(v) = single(headers, &X_API_KEY, "x-api-key")? {
            found[1] = (Some(check_key(trim_ows(v), "x-api-key")?), "x-api-key");
        }
    }
    if accepted.api_key {
        if let Some(v) = single(headers, &API_KEY, "api-key")? {
            found[2] = (Some(check_key(trim_ows(v), "api-key")?), "api-key");
        }
    }
    let present = MaybePresent {
        authorization: !accepted.bearer || found[0].0.is_some(),
        x_api_key: !accepted.x_api_key || found[1].0.is_some(),
        api_key: !accepted.api_key || found[2].0.is_some(),
    };
    let mut key: Option<(&[u8], &'static str)> = None;
    for (value, header) in found {
        let Some(value) = value else { continue };
        match key {
            None => key = Some((value, header)),
            Some((first, first_header)) => {
                if !bool::from(first.ct_eq(value)) {
                    return Err(CredentialError::Conflicting {
                        first: first_header,
                        second: header,
                    });
                }
            }
        }
    }
    if let Some((key, _)) = key {
        return Ok((key, present));
    }
    let ignored = [
        (!accepted.bearer, &AUTHORIZATION, "Authorization"),
        (!accepted.x_api_key, &X_API_KEY, "x-api-key"),
        (!accepted.api_key, &API_KEY, "api-key"),
    ];
    for (ignored, name, header) in ignored {
        if ignored && headers.contains_key(name) {
            return Err(CredentialError::NotAccepted { header, accepted });
        }
    }
    Err(CredentialError::Missing { accepted })
}

/// Keys shorter than this are masked whole.
const MIN_REVEAL_LEN: usize = 24;

/// Masks a key for messages and logs: the prefix up to the first dash (at most 8 bytes, else
/// the first 3), `...`, and the last 4 (`sk-...abcd`). Keys shorter than 24 bytes, and keys with
/// bytes other than visible ASCII, are masked whole (`***`).
///
/// ```
/// use llm_layers::auth::mask_key;
///
/// assert_eq!(mask_key(b"sk-proj-0123456789abcdefghijklmnop"), "sk-...mnop");
/// assert_eq!(mask_key(b"0123456789abcdefghijklmnop"), "012...mnop");
/// assert_eq!(mask_key(b"sk-short"), "***");
/// ```
pub fn mask_key(key: &[u8]) -> String {
    if key.len() < MIN_REVEAL_LEN || !key.iter().all(|b| is_key_byte(*b)) {
        return "***".to_owned();
    }
    let prefix = key
        .iter()
        .take(8)
        .position(|b| *b == b'-')
        .map_or(3, |i| i + 1);
    let mut out = String::with_capacity(prefix + 7);
    out.push_str(&String::from_utf8_lossy(&key[..prefix]));
    out.push_str("...");
    out.push_str(&String::from_utf8_lossy(&key[key.len() - 4..]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_bytes(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn schemes_are_case_insensitive_and_whitespace_tolerant() {
        for v in ["Bearer k1", "bearer k1", "BEARER k1", "BeArEr \t k1  "] {
            let h = headers(&[("authorization", v.as_bytes())]);
            assert_eq!(extract_api_key(&h, AcceptedHeaders::all()), Ok(&b"k1"[..]));
        }
    }

    #[test]
    fn malformed_headers_have_distinct_errors() {
        let all = AcceptedHeaders::all();
        type Case<'a> = (Vec<(&'a str, &'a [u8])>, CredentialError);
        let cases: Vec<Case> = vec![
            (vec![], CredentialError::Missing { accepted: all }),
            (
                vec![("authorization", b"Bearer ")],
                CredentialError::EmptyKey {
                    header: "Authorization",
                },
            ),
            (
                vec![("authorization", b"Basic dXNlcjpwYXNz")],
                CredentialError::UnsupportedScheme {
                    scheme: Some("Basic"),
                },
            ),
            (
                vec![("authorization", b"sk-secret-word other")],
                CredentialError::UnsupportedScheme { scheme: None },
            ),
            (
                vec![("authorization", b"sk-secret-word")],
                CredentialError::MissingScheme,
            ),
            (
                vec![("authorization", b"Bearer a b")],
                CredentialError::InvalidCharacters {
                    header: "Authorization",
                },
            ),
            (
                vec![("x-api-key", b"caf\xc3\xa9")],
                CredentialError::InvalidCharacters {
                    header: "x-api-key",
                },
            ),
            (
                vec![
                    ("authorization", b"Bearer a"),
                    ("authorization", b"Bearer a"),
                ],
                CredentialError::Duplicate {
                    header: "Authorization",
                    count: 2,
                },
            ),
            (
                vec![("authorization", b"Bearer a"), ("x-api-key", b"b")],
                CredentialError::Conflicting {
                    first: "Authorization",
                    second: "x-api-key",
                },
            ),
            (
                vec![("api-key", b"  ")],
                CredentialError::EmptyKey { header: "api-key" },
            ),
        ];
        for (pairs, want) in cases {
            assert_eq!(
                extract_api_key(&headers(&pairs), all),
                Err(want.clone()),
                "{pairs:?}"
            );
            assert!(!want.message().contains("secret"));
        }
        // A bad byte anywhere in a long key, first, last or in between.
        let key = b"sk-0123456789abcdefghijklmnopqrstuvwxyz0123456789";
        for i in [0, 1, 17, key.len() - 1] {
            for bad in [0x80u8, 0xc3, 0xff] {
                let mut k = key.to_vec();
                k[i] = bad;
                let h = headers(&[("x-api-key", &k)]);
                assert_eq!(
                    extract_api_key(&h, all),
                    Err(CredentialError::InvalidCharacters {
                        header: "x-api-key"
                    }),
                    "byte {i} = {bad:#x}"
                );
            }
        }
        let same = headers(&[("authorization", b"Bearer a"), ("api-key", b"a")]);
        assert_eq!(extract_api_key(&same, all), Ok(&b"a"[..]));
    }

    #[test]
    fn headers_that_are_not_accepted_are_named() {
        let only_bearer = AcceptedHeaders::none().bearer(true);
        let h = headers(&[("x-api-key", b"k")]);
        let err = extract_api_key(&h, only_bearer).unwrap_err();
        assert_eq!(
            err,
            CredentialError::NotAccepted {
                header: "x-api-key",
                accepted: only_bearer
            }
        );
        assert!(err.message().contains("Authorization: Bearer"), "{err}");
        // An Authorization header with another scheme is not ours when Bearer is off.
        let h = headers(&[("authorization", b"Basic abc"), ("api-key", b"k")]);
        let azure = AcceptedHeaders::none().api_key(true);
        assert_eq!(extract_api_key(&h, azure), Ok(&b"k"[..]));
    }

    #[test]
    fn masking() {
        assert_eq!(
            mask_key(b"sk-ant-api03-abcdefghijklmnopqrstuvwxyz"),
            "sk-...wxyz"
        );
        assert_eq!(mask_key(b"verylongprefixwithoutdash-1234"), "ver...1234");
        assert_eq!(mask_key(b"shortkey"), "***");
        assert_eq!(mask_key("é".repeat(20).as_bytes()), "***");
    }
}
