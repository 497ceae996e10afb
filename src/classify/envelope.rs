//! Reading an error body, whatever its envelope, into one flat set of [`Fields`].
//!
//! Envelopes understood: OpenAI-style `{"error":{...}}`, Anthropic `{"type":"error",...}`,
//! Google `{"error":{"status","details"}}` (also wrapped in an array), flat objects
//! (`{"message"}`, vLLM `{"object":"error"}`, Zhipu `{"code","message"}`, Huawei
//! `{"error_msg","error_code"}`, OpenRouter `{"code":502,"message","metadata"}`), Ollama
//! `{"error":"text"}`, bare JSON strings, pydantic `detail` arrays, and error JSON nested inside
//! strings (a message that is itself JSON, `ConnectionError: {...}`, OpenRouter `metadata.raw`),
//! unwrapped recursively up to [`MAX_DEPTH`] levels.

use std::time::Duration;

use serde_json::{Map, Value};

use super::{cn, google, others};

/// How many JSON-inside-a-string levels are unwrapped.
pub const MAX_DEPTH: u8 = 4;

/// A body larger than this is not parsed as JSON; its start is read as text.
pub const MAX_JSON_BYTES: usize = 512 * 1024;

/// An embedded JSON string larger than this is not parsed.
const MAX_EMBEDDED_BYTES: usize = 64 * 1024;

/// What an error body says, flattened.
#[derive(Debug, Default, Clone)]
pub struct Fields {
    /// The provider's message (innermost when nested).
    pub message: Option<String>,
    /// The provider's code, as text (`"invalid_api_key"`, `"1113"`, `"APIG.0308"`).
    pub code: Option<String>,
    /// The provider's type (`type`, `__type`, `error_type`).
    pub kind: Option<String>,
    /// A gRPC-style status (`RESOURCE_EXHAUSTED`).
    pub grpc: Option<String>,
    /// An HTTP status found in the body (`"code": 429`, `raw_status_code`).
    pub http: Option<u16>,
    /// Google `ErrorInfo.reason` / `errors[].reason` values.
    pub reasons: Vec<String>,
    /// Google `QuotaFailure` quota ids.
    pub quota_ids: Vec<String>,
    /// A quota whose limit is zero: no retry can succeed.
    pub zero_quota: bool,
    /// Google `RetryInfo.retryDelay`.
    pub retry_delay: Option<Duration>,
    /// The request parameter named by the provider.
    pub param: Option<String>,
    /// The request id in the body.
    pub request_id: Option<String>,
    /// The AWS exception name from `x-amzn-errortype` (set by the caller).
    pub amzn: Option<String>,
    /// The provider family.
    pub family: &'static str,
    /// Whether the fields come from JSON nested inside a string.
    pub nested: bool,
    /// Lower-cased text of every message level, for the text rules.
    pub hay: String,
}

impl Fields {
    fn finish_hay(&mut self) {
        if let Some(m) = &self.message {
            if !self.hay.is_empty() {
                self.hay.push(' ');
            }
            self.hay.push_str(&m.to_lowercase());
        }
    }
}

/// What a body holds, read as JSON.
#[derive(Debug)]
pub enum Parsed {
    /// Not JSON (or too large to parse).
    NotJson,
    /// JSON, but no error in it.
    NoError,
    /// An error.
    Error(Box<Fields>),
}

/// Parses a body as JSON and reads its error. `strict` (for 2xx answers and stream events)
/// accepts only bodies that declare themselves errors; otherwise any object with a message
/// counts.
pub fn parse(body: &[u8], strict: bool) -> Parsed {
    if body.len() > MAX_JSON_BYTES {
        return Parsed::NotJson;
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => from_value(&v, 0, strict).map_or(Parsed::NoError, |f| Parsed::Error(Box::new(f))),
        Err(_) => Parsed::NotJson,
    }
}

/// [`parse`], keeping only an error.
pub fn from_json(body: &[u8], strict: bool) -> Option<Fields> {
    match parse(body, strict) {
        Parsed::Error(f) => Some(*f),
        _ => None,
    }
}

fn from_value(v: &Value, depth: u8, strict: bool) -> Option<Fields> {
    match v {
        Value::Array(a) => {
            let mut f = from_value(a.first()?, depth, strict)?;
            if f.family == "openai" {
                f.family = "google";
            }
            Some(f)
        }
        Value::String(s) if !strict => {
            let mut f = Fields {
                message: Some(s.clone()),
                family: "generic",
                ..Fields::default()
            };
            f.finish_hay();
            Some(unwrap_nested(f, depth, &[s]))
        }
        Value::Object(o) => from_object(o, depth, strict),
        _ => None,
    }
}

const MESSAGE_KEYS: [&str; 7] = [
    "message",
    "msg",
    "error_message",
    "error_msg",
    "errorMessage",
    "detail",
    "description",
];

fn str_of<'a>(o: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    o.get(key).and_then(Value::as_str)
}

/// A string that carries information (not empty, not a stringified null).
fn meaningful(s: &str) -> Option<String> {
    let t = s.trim();
    (!t.is_empty() && !matches!(t, "None" | "null" | "undefined")).then(|| t.to_owned())
}

/// MiniMax's `base_resp` with a non-zero `status_code` (zero is success).
fn minimax_failure(o: &Map<String, Value>) -> Option<&Map<String, Value>> {
    let br = o.get("base_resp")?.as_object()?;
    let code = br.get("status_code")?.as_i64()?;
    (code != 0).then_some(br)
}

fn is_error_object(o: &Map<String, Value>, strict: bool) -> bool {
    let has_message = MESSAGE_KEYS.iter().any(|k| o.contains_key(*k));
    // Baidu Qianfan answers errors with a numeric `error_code` beside `error_msg`.
    let numeric_error_code = o.get("error_code").is_some_and(Value::is_number);
    matches!(o.get("error"), Some(Value::Object(_) | Value::String(_)))
        || str_of(o, "type") == Some("error")
        || str_of(o, "object") == Some("error")
        || minimax_failure(o).is_some()
        || (has_message && numeric_error_code)
        || (!strict && (has_message || o.contains_key("__type")))
        || (has_message
            && o.get("code")
                .and_then(Value::as_u64)
                .is_some_and(|c| (400..600).contains(&c)))
}

fn from_object(o: &Map<String, Value>, depth: u8, strict: bool) -> Option<Fields> {
    // OpenAI Responses API: `{"type":"response.failed","response":{"error":{...}}}`.
    if str_of(o, "type") == Some("response.failed") {
        let e = o.get("response").and_then(|r| r.get("error"))?;
        let mut wrapped = Map::new();
        wrapped.insert("error".to_owned(), e.clone());
        let mut f = from_object(&wrapped, depth, strict)?;
        f.family = "openai";
        return Some(f);
    }
    if !is_error_object(o, strict) {
        return None;
    }
    let mut f = Fields::default();
    if let Some(br) = minimax_failure(o) {
        f.code = br.get("status_code").map(Value::to_string);
        f.message = str_of(br, "status_msg").and_then(meaningful);
        f.family = "minimax";
        f.finish_hay();
        return Some(f);
    }
    let inner: &Map<String, Value> = match o.get("error") {
        Some(Value::Object(e)) => e,
        Some(Value::String(s)) => {
            f.message = meaningful(s);
            o
        }
        _ => o,
    };
    read_message(inner, &mut f, depth);
    if f.message.is_none() && !std::ptr::eq(inner, o) {
        read_message(o, &mut f, depth);
    }
    read_code(inner, &mut f);
    if f.http.is_none() {
        // Mistral's `raw_status_code`, beside or inside the envelope.
        f.http = status_number(o.get("raw_status_code"));
    }
    for key in ["type", "error_type", "__type"] {
        if f.kind.is_none() {
            if let Some(t) = str_of(inner, key).and_then(meaningful) {
                // AWS JSON protocol: `com.amazon.coral#ThrottlingException`.
                let t = t.rsplit('#').next().unwrap_or(&t).to_owned();
                if t != "error" {
                    f.kind = Some(t);
                }
            }
        }
    }
    match inner.get("status") {
        Some(Value::String(s))
            if s.len() >= 3 && s.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') =>
        {
            f.grpc = Some(s.clone());
        }
        other => {
            if f.http.is_none() {
                f.http = status_number(other);
            }
        }
    }
    if f.http.is_none() {
        f.http = status_number(inner.get("status_code"));
    }
    google::read_details(inner, &mut f);
    f.param = f
        .param
        .or_else(|| str_of(inner, "param").and_then(meaningful));
    f.request_id = ["request_id", "requestId"]
        .iter()
        .find_map(|k| str_of(o, k).or_else(|| str_of(inner, k)))
        .and_then(meaningful);
    f.family = family(o, inner, &f);
    f.finish_hay();

    // Nested JSON: in the message first, then OpenRouter's `metadata.raw`.
    let metadata = inner.get("metadata").and_then(Value::as_object);
    if let Some(md) = metadata {
        if f.kind.is_none() {
            f.kind = str_of(md, "error_type").and_then(meaningful);
        }
    }
    let raw = metadata.and_then(|md| md.get("raw"));
    let candidates: Vec<String> = [f.message.as_deref(), raw.and_then(Value::as_str)]
        .into_iter()
        .flatten()
        .map(str::to_owned)
        .collect();
    let mut f = unwrap_nested(f, depth, &candidates);
    if !f.nested && depth < MAX_DEPTH {
        if let Some(raw @ Value::Object(_)) = raw {
            if let Some(inner) = from_value(raw, depth + 1, false).filter(useful) {
                f = merge(inner, f);
            }
        }
    }
    Some(f)
}

fn useful(f: &Fields) -> bool {
    f.message.is_some() || f.code.is_some() || f.kind.is_some() || f.grpc.is_some()
}

/// Tries each candidate string for embedded error JSON; the first that parses as an error
/// replaces `outer`, keeping what only the outer level knew.
fn unwrap_nested<S: AsRef<str>>(outer: Fields, depth: u8, candidates: &[S]) -> Fields {
    if depth >= MAX_DEPTH {
        return outer;
    }
    for s in candidates {
        if let Some(v) = embedded_json(s.as_ref()) {
            if let Some(inner) = from_value(&v, depth + 1, false).filter(useful) {
                return merge(inner, outer);
            }
        }
    }
    outer
}

fn merge(mut inner: Fields, outer: Fields) -> Fields {
    inner.nested = true;
    inner.http = inner.http.or(outer.http);
    inner.param = inner.param.or(outer.param);
    inner.request_id = inner.request_id.or(outer.request_id);
    inner.retry_delay = inner.retry_delay.or(outer.retry_delay);
    inner.code = inner.code.or(outer.code);
    inner.kind = inner.kind.or(outer.kind);
    if !outer.hay.is_empty() {
        inner.hay.push(' ');
        inner.hay.push_str(&outer.hay);
    }
    inner
}

/// The JSON value starting at the first `{` of `s` (trailing text ignored).
fn embedded_json(s: &str) -> Option<Value> {
    if s.len() > MAX_EMBEDDED_BYTES {
        return None;
    }
    let start = s.find('{')?;
    let mut it = serde_json::Deserializer::from_str(&s[start..]).into_iter::<Value>();
    match it.next() {
        Some(Ok(v @ Value::Object(_))) => Some(v),
        _ => None,
    }
}

fn read_message(o: &Map<String, Value>, f: &mut Fields, depth: u8) {
    for key in MESSAGE_KEYS {
        match o.get(key) {
            Some(Value::String(s)) => {
                if let Some(m) = meaningful(s) {
                    f.message = Some(m);
                    return;
                }
            }
            // Mistral puts a pydantic object in `message`.
            Some(Value::Object(m)) if depth < MAX_DEPTH => {
                if let Some(sub) = from_object(m, depth + 1, false) {
                    f.message = sub.message;
                    f.param = f.param.take().or(sub.param);
                    f.kind = f.kind.take().or(sub.kind);
                    if f.message.is_some() {
                        return;
                    }
                }
            }
            // FastAPI / pydantic: `detail: [{"type","loc","msg"}]`.
            Some(Value::Array(items)) => {
                if let Some(first) = items.first().and_then(Value::as_object) {
                    let loc = first
                        .get("loc")
                        .and_then(Value::as_array)
                        .and_then(|l| l.iter().rev().find_map(Value::as_str))
                        .map(str::to_owned);
                    let msg = str_of(first, "msg").unwrap_or("invalid request");
                    f.message = Some(match &loc {
                        Some(l) => format!("{l}: {msg}"),
                        None => msg.to_owned(),
                    });
                    f.param = f.param.take().or(loc);
                    f.kind = f.kind.take().or(str_of(first, "type").map(str::to_owned));
                    return;
                }
            }
            _ => {}
        }
    }
}

fn status_number(v: Option<&Value>) -> Option<u16> {
    let n = match v? {
        Value::Number(n) => n.as_u64()?,
        Value::String(s) if s.len() == 3 => s.parse().ok()?,
        _ => return None,
    };
    (100..600).contains(&n).then_some(n as u16)
}

fn read_code(o: &Map<String, Value>, f: &mut Fields) {
    for key in ["code", "error_code"] {
        match o.get(key) {
            Some(Value::String(s)) => {
                if let Some(c) = meaningful(s) {
                    if f.http.is_none() {
                        f.http = status_number(o.get(key));
                    }
                    f.code = Some(c);
                    return;
                }
            }
            Some(Value::Number(n)) => {
                match status_number(o.get(key)) {
                    Some(h) => f.http = Some(h),
                    None => f.code = Some(n.to_string()),
                }
                return;
            }
            _ => {}
        }
    }
}

fn family(o: &Map<String, Value>, inner: &Map<String, Value>, f: &Fields) -> &'static str {
    let enveloped = matches!(o.get("error"), Some(Value::Object(_)));
    if str_of(o, "type") == Some("error") && enveloped {
        if o.contains_key("sequence_number") {
            "openai"
        } else {
            "anthropic"
        }
    } else if f.grpc.is_some() || inner.contains_key("details") {
        "google"
    } else if o.get("error_code").is_some_and(Value::is_number) && o.contains_key("error_msg") {
        "qianfan"
    } else if let Some(fam) = cn::family(f).or_else(|| others::family(o, inner, f)) {
        fam
    } else if matches!(o.get("error"), Some(Value::String(_))) {
        "ollama"
    } else if enveloped || str_of(o, "object") == Some("error") {
        "openai"
    } else {
        "generic"
    }
}

/// Reads what it can from text that should have been JSON but does not parse (truncated or
/// mangled): the first `"message": "..."` string, and the whole text for the text rules.
pub fn from_broken_json(text: &str) -> Fields {
    let bounded = &text[..floor_boundary(text, 16 * 1024)];
    let mut f = Fields {
        message: first_string_value(bounded, "message")
            .or_else(|| first_string_value(bounded, "error")),
        family: "generic",
        ..Fields::default()
    };
    f.hay = bounded.to_lowercase();
    f
}

/// URL-decodes the text the rules read (`%3F` → `?`, `%E4%BD%99` → `余`), for messages that
/// arrive percent-encoded (relays, query-string errors). Text without a `%` followed by two
/// hex digits is left alone and nothing is allocated.
pub fn decode_hay(f: &mut Fields) {
    let b = f.hay.as_bytes();
    let escaped = b
        .windows(3)
        .any(|w| w[0] == b'%' && w[1].is_ascii_hexdigit() && w[2].is_ascii_hexdigit());
    if !escaped {
        return;
    }
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    f.hay = String::from_utf8_lossy(&out).to_lowercase();
}

/// The largest char boundary at or below `max`.
pub fn floor_boundary(s: &str, max: usize) -> usize {
    if s.len() <= max {
        return s.len();
    }
    let mut i = max;
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The value of the first `"key": "..."` pair in `text`, unescaped as far as it goes.
fn first_string_value(text: &str, key: &str) -> Option<String> {
    let pat = format!("\"{key}\"");
    let mut from = 0;
    while let Some(pos) = text[from..].find(&pat) {
        let after = &text[from + pos + pat.len()..];
        from += pos + pat.len();
        let Some(rest) = after.trim_start().strip_prefix(':') else {
            continue;
        };
        let Some(rest) = rest.trim_start().strip_prefix('"') else {
            continue;
        };
        let mut out = String::new();
        let mut chars = rest.chars();
        while let Some(c) = chars.next() {
            match c {
                '"' => break,
                '\\' => match chars.next() {
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    Some(other) => out.push(other),
                    None => break,
                },
                c => out.push(c),
            }
        }
        if let Some(m) = meaningful(&out) {
            return Some(m);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_three_deep() {
        let l3 = r#"{"error":{"message":"prompt is too long","type":"invalid_request_error"}}"#;
        let l2 = serde_json::json!({"error": {"message": l3, "code": 400}}).to_string();
        let l1 = serde_json::json!({"error": {"message": format!("Upstream: {l2}")}, "request_id": "r1"})
            .to_string();
        let f = from_json(l1.as_bytes(), false).unwrap();
        assert_eq!(f.message.as_deref(), Some("prompt is too long"));
        assert_eq!(f.http, Some(400));
        assert_eq!(f.request_id.as_deref(), Some("r1"));
        assert!(f.nested);
    }

    #[test]
    fn depth_is_bounded() {
        let mut s = r#"{"error":{"message":"bottom"}}"#.to_owned();
        for _ in 0..8 {
            s = serde_json::json!({"error": {"message": s}}).to_string();
        }
        let f = from_json(s.as_bytes(), false).unwrap();
        assert_ne!(f.message.as_deref(), Some("bottom"));
    }

    #[test]
    fn broken_json() {
        let f = from_broken_json(r#"{"error":{"message":"Stream \"x\" error","#);
        assert_eq!(f.message.as_deref(), Some("Stream \"x\" error"));
        assert_eq!(first_string_value(r#"{"message": 3}"#, "message"), None);
    }
}
