//! Hostile and ordinary clients: what they send, and what each of them must get back.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use llm_layers::error::{ApiError, ErrorCode, MAX_RETRYABLE_WAIT};
use serde_json::Value;

use super::stack::{KEY_A, KEY_B, KEY_MINI, KEY_REVOKED, WRONG_KEYS};
use super::upstream::HOLD;

/// Distinct IPv6 /64 prefixes the clients come from (prefix 0 sends a quarter of the traffic).
pub const PREFIXES: u16 = 64;
/// Random model names are drawn from a pool of this many.
pub const NAME_POOL: usize = 500;

/// One request, as a client will send it.
#[derive(Debug, Clone)]
pub struct Spec {
    pub method: Method,
    pub path: &'static str,
    pub key: Option<&'static str>,
    pub model: String,
    pub stream: bool,
    pub max_tokens: u32,
    pub client: Ipv6Addr,
    pub hold: bool,
}

impl Spec {
    /// Whether the key is one the store accepts.
    pub fn valid_key(&self) -> bool {
        matches!(self.key, Some(k) if k == KEY_A || k == KEY_B || k == KEY_MINI)
    }

    /// Whether the key is accepted for every model and for requests without one (a key
    /// restricted to some models is refused where no model is named: `403`, as documented).
    pub fn unrestricted_key(&self) -> bool {
        matches!(self.key, Some(k) if k == KEY_A || k == KEY_B)
    }

    /// The request, with the client's address as a trusted proxy reports it.
    pub fn request(&self, peer: Option<SocketAddr>) -> Request<Body> {
        let mut b = Request::builder()
            .method(self.method.clone())
            .uri(self.path)
            .header("x-forwarded-for", self.client.to_string());
        if let Some(key) = self.key {
            b = b.header("authorization", format!("Bearer {key}"));
        }
        if self.hold {
            b = b.header(HOLD, "1");
        }
        let body = if self.method == Method::POST {
            b = b.header("content-type", "application/json");
            let mut json = serde_json::json!({
                "model": self.model,
                "messages": [{"role": "user", "content": "Say hello."}],
                "max_tokens": self.max_tokens,
            });
            if self.stream {
                json["stream"] = Value::Bool(true);
                json["stream_options"] = serde_json::json!({"include_usage": true});
            }
            Body::from(json.to_string())
        } else {
            Body::empty()
        };
        let mut req = b.body(body).unwrap();
        if let Some(peer) = peer {
            req.extensions_mut().insert(peer);
        }
        req
    }
}

/// An address in prefix `p`, interface id random.
pub fn client_in(p: u16, rng: &mut fastrand::Rng) -> Ipv6Addr {
    let iid = rng.u64(..);
    Ipv6Addr::new(
        0x2001,
        0x0db8,
        p,
        0,
        (iid >> 48) as u16,
        (iid >> 32) as u16,
        (iid >> 16) as u16,
        iid as u16,
    )
}

/// A random model name of the pool (`fastrand` alphanumerics, 1 to 40 characters).
fn pooled_name(i: usize) -> String {
    let mut rng = fastrand::Rng::with_seed(i as u64 ^ 0x6d6f64656c);
    let len = rng.usize(1..=40);
    let mut name = String::from("m-");
    name.extend(std::iter::repeat_with(|| rng.alphanumeric()).take(len));
    name
}

/// The next client request of the mixed run.
pub fn mixed(rng: &mut fastrand::Rng, i: u64) -> Spec {
    let key = match rng.u32(..100) {
        0..=43 => Some(KEY_A),
        44..=87 => Some(KEY_B),
        88..=91 => Some(KEY_MINI),
        92 => Some(KEY_REVOKED),
        93..=96 => Some(WRONG_KEYS[rng.usize(..WRONG_KEYS.len())]),
        _ => None,
    };
    let (method, path) = match rng.u32(..100) {
        0..=2 => (Method::HEAD, "/v1/models"),
        3..=5 => (Method::GET, "/v1/models"),
        _ => (Method::POST, "/v1/chat/completions"),
    };
    let model = match rng.u32(..100) {
        0..=39 => "gpt-4o".to_owned(),
        40..=54 => "gpt-4o-mini".to_owned(),
        55..=62 => "claude-sonnet".to_owned(),
        63..=68 => "flaky-7b".to_owned(),
        69..=71 => "dead-model".to_owned(),
        72 => "stall-body".to_owned(),
        73 => "claude-sonnet".to_owned(),
        74..=98 => pooled_name(rng.usize(..NAME_POOL)),
        // A huge, fresh name: 64 to 256 KiB.
        _ => {
            let len = rng.usize(64 * 1024..=256 * 1024);
            let mut name = format!("huge-{i}-");
            name.push_str(&"x".repeat(len));
            name
        }
    };
    let prefix = if rng.u32(..4) == 0 {
        0
    } else {
        rng.u16(1..PREFIXES)
    };
    Spec {
        method,
        path,
        key,
        model,
        stream: rng.u32(..100) < 35,
        max_tokens: rng.u32(1..=4096),
        client: client_in(prefix, rng),
        hold: false,
    }
}

/// What one request got, as the client read it.
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// The error the layers left in the response extensions (in-process only).
    pub api_error: Option<ApiError>,
    pub body: Bytes,
    /// The body failed while being read (a cut 2xx JSON body).
    pub body_error: bool,
}

/// The label of an answer for the summary (`"200 json"`, `"503 service_unavailable"`).
pub type Label = String;

/// Checks one answer against what every client is owed, and labels it.
///
/// - 2xx: a JSON answer parses (unless the upstream cut it: then the body read fails, as a
///   reset connection does), a stream never fails (a cut stream ends with an in-band error
///   event) and each `data:` line is JSON or `[DONE]`, an in-band error being an envelope; a
///   HEAD answer has no body.
/// - Otherwise a valid envelope: `application/json`, `error.message` (non-empty), `type`,
///   `code` one of `ErrorCode::ALL`, `param`; the status is the code's (or `502` for
///   `service_unavailable`, the documented status of a refused or reset connection);
///   `x-should-retry` is `true` or `false` and consistent with retryability (see
///   [`check_should_retry`]); `retry-after` and `retry-after-ms` agree. A HEAD answer has no
///   body, so its code is read from the extensions (in-process) when there is one.
pub fn check(spec: &Spec, got: &Got) -> Result<Label, String> {
    let head = spec.method == Method::HEAD;
    if head && !got.body.is_empty() {
        return Err(format!("HEAD answered with a {} B body", got.body.len()));
    }
    let ct = got
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if got.status.is_success() {
        if head {
            return Ok(format!("{} head", got.status.as_u16()));
        }
        if ct.starts_with("text/event-stream") {
            if got.body_error {
                return Err("a 2xx stream failed instead of ending with an in-band error".into());
            }
            let text = std::str::from_utf8(&got.body).map_err(|_| "stream not UTF-8")?;
            let mut in_band = None;
            for line in text.lines() {
                let Some(data) = line.strip_prefix("data:") else {
                    continue;
                };
                let data = data.trim();
                if data == "[DONE]" {
                    continue;
                }
                let v: Value = serde_json::from_str(data)
                    .map_err(|e| format!("stream data line not JSON ({e}): {data:.200}"))?;
                if v.get("error").is_some_and(|e| !e.is_null()) {
                    if v.get("type").and_then(Value::as_str) == Some("error") {
                        return Err(format!(
                            "an in-band provider error passed unrewritten: {data:.200}"
                        ));
                    }
                    let code = envelope_code(&v)?;
                    in_band = Some(code);
                }
            }
            return Ok(match in_band {
                Some(code) => format!("{} sse+{code}", got.status.as_u16()),
                None => format!("{} sse", got.status.as_u16()),
            });
        }
        if got.body_error {
            return Ok(format!("{} json cut", got.status.as_u16()));
        }
        serde_json::from_slice::<Value>(&got.body).map_err(|e| {
            format!(
                "2xx body not JSON ({e}): {:.200}",
                String::from_utf8_lossy(&got.body)
            )
        })?;
        return Ok(format!("{} json", got.status.as_u16()));
    }

    // An error: the envelope.
    let code = if head {
        match &got.api_error {
            Some(e) => e.code(),
            None => return Ok(format!("{} head (no body)", got.status.as_u16())),
        }
    } else {
        if !ct.starts_with("application/json") {
            return Err(format!(
                "{} with content-type {ct:?}: {:.200}",
                got.status,
                String::from_utf8_lossy(&got.body)
            ));
        }
        if got.body_error {
            return Err(format!("{} envelope body failed while read", got.status));
        }
        let v: Value = serde_json::from_slice(&got.body).map_err(|e| {
            format!(
                "{} body not JSON ({e}): {:.200}",
                got.status,
                String::from_utf8_lossy(&got.body)
            )
        })?;
        envelope_code(&v)?
    };
    let status_ok = got.status == code.status()
        || (code == ErrorCode::ServiceUnavailable && got.status == StatusCode::BAD_GATEWAY);
    if !status_ok {
        return Err(format!("status {} with code {code}", got.status));
    }
    check_should_retry(code, got)?;
    Ok(format!("{} {code}", got.status.as_u16()))
}

/// The code of an envelope `{"error":{"message","type","code","param"}}`.
fn envelope_code(v: &Value) -> Result<ErrorCode, String> {
    let err = v
        .get("error")
        .and_then(Value::as_object)
        .ok_or_else(|| format!("no error object: {v:.200}"))?;
    if err
        .get("message")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        return Err(format!("no message: {v:.200}"));
    }
    if err.get("type").and_then(Value::as_str).is_none() || !err.contains_key("param") {
        return Err(format!("no type or param: {v:.200}"));
    }
    let code = err
        .get("code")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("no code: {v:.200}"))?;
    let code = ErrorCode::from_str(code).map_err(|e| e.to_string())?;
    if !ErrorCode::ALL.contains(&code) {
        return Err(format!("code {code} not in ErrorCode::ALL"));
    }
    Ok(code)
}

fn header<'a>(got: &'a Got, name: &str) -> Option<&'a str> {
    got.headers.get(name).and_then(|v| v.to_str().ok())
}

/// `x-should-retry` against the code and the wait:
///
/// - present, `true` or `false`;
/// - `true` only for a retryable code whose known wait is at most [`MAX_RETRYABLE_WAIT`];
/// - `false` on a retryable code only when the wait is longer than that, the error can never
///   succeed (the extensions say so), or retries were actually made (`mark_exhausted`:
///   `x-llm-layers-attempts` above 1);
/// - `retry-after` is whole seconds, at least 1, with `retry-after-ms` rounding up to it.
pub fn check_should_retry(code: ErrorCode, got: &Got) -> Result<(), String> {
    let should = match header(got, "x-should-retry") {
        Some("true") => true,
        Some("false") => false,
        other => return Err(format!("{code}: x-should-retry {other:?}")),
    };
    let secs = header(got, "retry-after").map(|s| s.parse::<u64>());
    let ms = header(got, "retry-after-ms").map(|s| s.parse::<u64>());
    let wait = match (secs, ms) {
        (None, None) => None,
        (Some(Ok(s)), Some(Ok(ms))) => {
            if s == 0 || ms.div_ceil(1000) != s {
                return Err(format!(
                    "{code}: retry-after {s} disagrees with retry-after-ms {ms}"
                ));
            }
            Some(Duration::from_millis(ms))
        }
        (s, m) => {
            return Err(format!(
                "{code}: retry-after {s:?} and retry-after-ms {m:?} not both present and whole"
            ))
        }
    };
    let long_wait = wait.is_some_and(|w| w > MAX_RETRYABLE_WAIT);
    let attempts: u32 = header(got, "x-llm-layers-attempts")
        .and_then(|a| a.parse().ok())
        .unwrap_or(1);
    let never = got.api_error.as_ref().is_some_and(|e| {
        e.code() == code && e.code().is_retryable() && !e.is_retryable() && !long_wait
    });
    match (should, code.is_retryable()) {
        (true, false) => Err(format!("{code} is not retryable but x-should-retry: true")),
        (true, true) if long_wait => Err(format!(
            "{code}: x-should-retry: true with a wait of {wait:?}"
        )),
        (false, true) if !(long_wait || never || attempts > 1) => Err(format!(
            "{code}: x-should-retry: false after {attempts} attempt(s), wait {wait:?}, stop {:?}",
            header(got, "x-llm-layers-retry-stop")
        )),
        _ => Ok(()),
    }
}

/// The IP an in-process request comes from: a trusted proxy in front of the gateway.
pub fn proxy_peer() -> SocketAddr {
    SocketAddr::new(IpAddr::from([10, 0, 0, 1]), 40_000)
}
