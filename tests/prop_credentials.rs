//! Property tests of credential parsing: `Authorization`, `x-api-key` and `api-key` values of
//! any bytes, sent once or several times, with any set of accepted headers.
//!
//! Run with `PROPTEST_CASES=<n>` to change the number of cases (10 000 by default).

mod common_prop;
use common_prop::config;
use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName, HeaderValue};
use llm_layers::auth::{extract_api_key, mask_key, AcceptedHeaders, CredentialError};
use proptest::prelude::*;

/// Header bytes, shown as an escaped string when a case fails.
#[derive(Clone)]
struct Hv(Vec<u8>);

impl std::fmt::Debug for Hv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "b\"{}\"", self.0.escape_ascii())
    }
}

/// A secret that no message may quote: visible ASCII with a marker no fixed text holds.
fn secret() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_.~+/=-]{0,12}".prop_map(|s| format!("Qz7{s}"))
}

fn value() -> impl Strategy<Value = Hv> {
    let ows = "[ \t]{0,3}";
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..48),
        (ows, "(?i:bearer)", "[ \t]{0,3}", secret(), ows)
            .prop_map(|(a, s, w, k, b)| format!("{a}{s}{w}{k}{b}").into_bytes()),
        (ows, secret(), ows).prop_map(|(a, k, b)| format!("{a}{k}{b}").into_bytes()),
        (
            prop::sample::select(vec![
                "Basic", "basic", "Digest", "Token", "ApiKey", "NTLM", "DPoP", "Bearer", "Bearerx",
                "sk-live",
            ]),
            "[ \t]{1,2}",
            secret(),
            "( [\\x21-\\x7e]{1,4})?",
        )
            .prop_map(|(s, w, k, t)| format!("{s}{w}{k}{t}").into_bytes()),
        (
            secret(),
            "[\\x00-\\x08\\x0b-\\x1f\\x7f\\x80-\\xff ]",
            secret()
        )
            .prop_map(|(a, c, b)| format!("{a}{c}{b}").into_bytes()),
    ]
    .prop_map(Hv)
}

fn accepted() -> impl Strategy<Value = AcceptedHeaders> {
    (any::<bool>(), any::<bool>(), any::<bool>())
        .prop_map(|(b, x, a)| AcceptedHeaders::none().bearer(b).x_api_key(x).api_key(a))
}

const NAMES: [&str; 3] = ["authorization", "x-api-key", "api-key"];

fn is_ows(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn trim_ows(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|b| !is_ows(*b)).unwrap_or(v.len());
    let end = v.iter().rposition(|b| !is_ows(*b)).map_or(start, |i| i + 1);
    &v[start..end]
}

fn key_ok(k: &[u8]) -> bool {
    !k.is_empty() && k.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// What a single well-formed header carries, per the documented rules; `None` when malformed.
fn key_of(name: &str, v: &[u8]) -> Option<Vec<u8>> {
    let v = trim_ows(v);
    let k = if name == "authorization" {
        let i = v.iter().position(|b| is_ows(*b))?;
        if !v[..i].eq_ignore_ascii_case(b"bearer") {
            return None;
        }
        trim_ows(&v[i..])
    } else {
        v
    };
    key_ok(k).then(|| k.to_vec())
}

proptest! {
    #![proptest_config(config())]

    /// Any header values: no panic; a key is answered exactly when every accepted header
    /// present is sent once, well-formed, and all carry the same key; that key is visible
    /// ASCII; and no error message quotes what was sent.
    #[test]
    fn extraction_follows_the_rules(
        sent in prop::collection::vec((0usize..3, value()), 0..5),
        accepted in accepted(),
    ) {
        let mut h = HeaderMap::new();
        for (i, v) in &sent {
            if let Ok(v) = HeaderValue::from_bytes(&v.0) {
                h.append(HeaderName::from_static(NAMES[*i]), v);
            }
        }
        let on = [accepted.accepts_bearer(), accepted.accepts_x_api_key(), accepted.accepts_api_key()];
        let got = extract_api_key(&h, accepted);

        // The model: the accepted headers that are present, each once and well-formed.
        let mut keys = Vec::new();
        let mut malformed = false;
        let mut duplicate = false;
        for (i, name) in NAMES.iter().enumerate() {
            if !on[i] {
                continue;
            }
            let values: Vec<&HeaderValue> = h.get_all(*name).iter().collect();
            match values.as_slice() {
                [] => {}
                [v] => match key_of(name, v.as_bytes()) {
                    Some(k) => keys.push(k),
                    None => malformed = true,
                },
                _ => duplicate = true,
            }
        }
        let agree = keys.windows(2).all(|w| w[0] == w[1]);
        match &got {
            Ok(k) => {
                prop_assert!(key_ok(k));
                prop_assert!(!malformed && !duplicate && agree && !keys.is_empty(), "{:?} for {:?}", k, h);
                prop_assert_eq!(&keys[0][..], *k);
            }
            Err(e) => {
                prop_assert!(malformed || duplicate || !agree || keys.is_empty(), "{:?} for {:?}", e, h);
                if keys.is_empty() && !malformed && !duplicate {
                    prop_assert!(e.is_missing(), "{:?}", e);
                }
                if duplicate || malformed || !agree {
                    prop_assert!(!e.is_missing(), "{:?}", e);
                }
                let msg = e.to_string();
                prop_assert!(!msg.contains("Qz7"), "{:?} quotes the key", msg);
                prop_assert_eq!(e.message(), msg);
            }
        }
        if accepted.is_empty() {
            prop_assert!(got.is_err());
        }
    }

    /// The `Authorization` scheme is matched case-insensitively and OWS around the key is
    /// dropped, for any key of visible ASCII.
    #[test]
    fn bearer_keys_round_trip(
        key in "[\\x21-\\x7e]{1,64}",
        scheme in "(?i:bearer)",
        a in "[ \t]{0,3}", w in "[ \t]{1,3}", b in "[ \t]{0,3}",
    ) {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_str(&format!("{a}{scheme}{w}{key}{b}")).unwrap());
        prop_assert_eq!(extract_api_key(&h, AcceptedHeaders::all()), Ok(key.as_bytes()));
        h.insert("x-api-key", HeaderValue::from_str(&format!("{b}{key}{a}")).unwrap());
        prop_assert_eq!(extract_api_key(&h, AcceptedHeaders::all()), Ok(key.as_bytes()));
        h.insert("api-key", HeaderValue::from_str(&format!("{key}x")).unwrap());
        prop_assert!(
            matches!(extract_api_key(&h, AcceptedHeaders::all()), Err(CredentialError::Conflicting { .. })),
            "two different keys"
        );
    }

    /// A mask of any bytes shows at most a short prefix and the last four, never the middle.
    #[test]
    fn masks_of_any_bytes_hide_the_middle(key in prop::collection::vec(any::<u8>(), 0..80)) {
        let masked = mask_key(&key);
        if masked == "***" {
            return Ok(());
        }
        prop_assert!(key.len() >= 24 && key_ok(&key));
        let n = masked.len();
        prop_assert_eq!(&masked[n - 7..n - 4], "...");
        let prefix = &masked[..n - 7];
        prop_assert!(!prefix.is_empty() && prefix.len() <= 8);
        prop_assert!(key.starts_with(prefix.as_bytes()));
        prop_assert!(key.ends_with(&masked.as_bytes()[n - 4..]));
        // At least half of the key stays hidden.
        prop_assert!(prefix.len() + 4 <= key.len() / 2);
    }
}
