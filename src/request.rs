//! The shared, parsed view of an LLM request.
//!
//! Several layers need to know what a request asks for: the auth layer checks the model against
//! a key's allow-list, the rate-limit layer charges tokens, the breaker keeps one circuit per
//! model, validation checks everything. The body is parsed **once**: the first layer that needs
//! the view buffers the body (bounded), parses it, stores a [`RequestView`] in the request
//! extensions and hands the body on intact; every later layer reads it from there
//! ([`RequestView::from_extensions`]) or computes it through the same function
//! ([`ensure_view`]).
//!
//! ```
//! use llm_layers::request::{Endpoint, RequestView, CharEstimator};
//!
//! let body = br#"{"model":"gpt-4o","stream":true,"max_tokens":100,
//!                 "messages":[{"role":"user","content":"Hello there, how are you?"}]}"#;
//! let view = RequestView::parse(Endpoint::ChatCompletions, body, &CharEstimator).unwrap();
//! assert_eq!(view.model(), Some("gpt-4o"));
//! assert!(view.stream());
//! assert_eq!(view.max_tokens(), Some(100));
//! assert_eq!(view.message_count(), Some(1));
//! assert!(view.prompt_tokens() > 5);
//! assert_eq!(view.token_cost(), view.prompt_tokens() + 100);
//! ```

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body::Body;
use serde_json::Value;

use crate::body::{buffer_request, BoxError, BufferError, BufferRequest, LayerBody};

/// Which OpenAI-style endpoint a request goes to, from its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Endpoint {
    /// `/v1/chat/completions`
    ChatCompletions,
    /// `/v1/completions` (legacy)
    Completions,
    /// `/v1/embeddings`
    Embeddings,
    /// `/v1/responses`
    Responses,
    /// Anything else.
    Other,
}

impl Endpoint {
    /// The endpoint for a request path (matching on the path's end, so `/openai/v1/...` and
    /// Azure-style `/deployments/x/chat/completions` work too).
    ///
    /// The path is matched as an upstream that decodes paths would route it
    /// ([`normalize_path`]): `/v1/chat/%63ompletions` and `/v1/x/../chat/completions` are chat
    /// completions too.
    pub fn from_path(path: &str) -> Endpoint {
        let normalized = normalize_path(path);
        let path = normalized.trim_end_matches('/');
        if path.ends_with("/chat/completions") {
            Endpoint::ChatCompletions
        } else if path.ends_with("/completions") {
            Endpoint::Completions
        } else if path.ends_with("/embeddings") {
            Endpoint::Embeddings
        } else if path.ends_with("/responses") {
            Endpoint::Responses
        } else {
            Endpoint::Other
        }
    }

    /// The canonical path of the endpoint.
    pub const fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Embeddings => "/v1/embeddings",
            Endpoint::Responses => "/v1/responses",
            Endpoint::Other => "",
        }
    }
}

/// A request path as an upstream that decodes paths would see it, for every match on a path:
/// percent-encoded bytes decoded (invalid UTF-8 replaced), `.` and `..` segments resolved and
/// repeated slashes collapsed. The query is not part of the path. Borrows when there is nothing
/// to change.
///
/// ```
/// use llm_layers::request::normalize_path;
///
/// assert_eq!(normalize_path("/v1/chat/%63ompletions"), "/v1/chat/completions");
/// assert_eq!(normalize_path("/v1/models/../chat//completions"), "/v1/chat/completions");
/// assert_eq!(normalize_path("/v1/./embeddings"), "/v1/embeddings");
/// assert!(matches!(normalize_path("/v1/responses"), std::borrow::Cow::Borrowed(_)));
/// ```
pub fn normalize_path(path: &str) -> Cow<'_, str> {
    if is_normal(path.as_bytes()) {
        return Cow::Borrowed(path);
    }
    let decoded = percent_decode(path);
    let mut out: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut path = String::with_capacity(decoded.len());
    for s in &out {
        path.push('/');
        path.push_str(s);
    }
    if path.is_empty() || (decoded.ends_with('/') && !out.is_empty()) {
        path.push('/');
    }
    Cow::Owned(path)
}

/// Whether `path` is already normal: no `%`, no `//`, no `.` or `..` segment. One pass over
/// the bytes, no searcher: every request's path goes through it.
fn is_normal(path: &[u8]) -> bool {
    let mut prev = b'/';
    for (i, &b) in path.iter().enumerate() {
        match b {
            b'%' => return false,
            b'/' if prev == b'/' && i > 0 => return false,
            b'.' if prev == b'/' => {
                let rest = &path[i + 1..];
                if matches!(rest, [] | [b'/', ..] | [b'.'] | [b'.', b'/', ..]) {
                    return false;
                }
            }
            _ => {}
        }
        prev = b;
    }
    true
}

fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// The Azure-style deployment a path names: `{name}` in `/openai/deployments/{name}/...`,
/// decoded. The upstream serves that deployment whatever the body's `model` says.
///
/// ```
/// use llm_layers::request::deployment_from_path;
///
/// let path = "/openai/deployments/gpt-4o-prod/chat/completions";
/// assert_eq!(deployment_from_path(path).as_deref(), Some("gpt-4o-prod"));
/// assert_eq!(deployment_from_path("/v1/chat/completions"), None);
/// ```
pub fn deployment_from_path(path: &str) -> Option<String> {
    // Most paths name no deployment: say so without normalizing. Only a `%` can spell the
    // word differently.
    let bytes = path.as_bytes();
    if !bytes.contains(&b'%') && !bytes.windows(11).any(|w| w == b"deployments") {
        return None;
    }
    let path = normalize_path(path);
    let mut segments = path.split('/').filter(|s| !s.is_empty());
    while let Some(s) = segments.next() {
        if s == "deployments" {
            return segments.next().map(str::to_owned);
        }
    }
    None
}

/// Counts the tokens of a text, for limits and context checks.
pub trait TokenEstimator: Send + Sync + 'static {
    /// The number of tokens `text` takes for `model` (which may be empty when unknown).
    fn estimate(&self, model: &str, text: &str) -> u64;
}

impl<F> TokenEstimator for F
where
    F: Fn(&str, &str) -> u64 + Send + Sync + 'static,
{
    fn estimate(&self, model: &str, text: &str) -> u64 {
        self(model, text)
    }
}

/// The fast default estimate: about 4 characters per token for Latin text and one token per
/// CJK character (Han, kana, Hangul, full-width forms).
#[derive(Debug, Clone, Copy, Default)]
pub struct CharEstimator;

impl TokenEstimator for CharEstimator {
    fn estimate(&self, _model: &str, text: &str) -> u64 {
        if text.is_ascii() {
            return (text.len() as u64).div_ceil(4);
        }
        let (mut cjk, mut other) = (0u64, 0u64);
        for c in text.chars() {
            if is_cjk(c) {
                cjk += 1;
            } else {
                other += 1;
            }
        }
        cjk + other.div_ceil(4)
    }
}

/// The exact token count of OpenAI's BPE tokenizers (feature `tiktoken`).
///
/// The encoding is chosen by model name (`o200k_base` for GPT-4o, GPT-4.1, GPT-5 and the `o`
/// series, `cl100k_base` for GPT-4 and GPT-3.5, ...) and falls back to `o200k_base` for names
/// it does not know (other providers' models, empty names). Each encoding is built once per
/// process, on first use, and shared by every estimator.
///
/// ```
/// use llm_layers::request::{TiktokenEstimator, TokenEstimator};
///
/// assert_eq!(TiktokenEstimator.estimate("gpt-4o", "hello world"), 2);
/// ```
#[cfg(feature = "tiktoken")]
#[derive(Debug, Clone, Copy, Default)]
pub struct TiktokenEstimator;

#[cfg(feature = "tiktoken")]
impl TiktokenEstimator {
    /// The encoding used for `model`, built on first use.
    fn bpe(model: &str) -> &'static tiktoken_rs::CoreBPE {
        use std::sync::OnceLock;
        use tiktoken_rs::tokenizer::{get_tokenizer, Tokenizer};

        static O200K: OnceLock<Option<tiktoken_rs::CoreBPE>> = OnceLock::new();
        static CL100K: OnceLock<Option<tiktoken_rs::CoreBPE>> = OnceLock::new();
        static P50K: OnceLock<Option<tiktoken_rs::CoreBPE>> = OnceLock::new();
        static R50K: OnceLock<Option<tiktoken_rs::CoreBPE>> = OnceLock::new();
        static HARMONY: OnceLock<Option<tiktoken_rs::CoreBPE>> = OnceLock::new();
        static P50K_EDIT: OnceLock<Option<tiktoken_rs::CoreBPE>> = OnceLock::new();

        let o200k = || {
            O200K
                .get_or_init(|| tiktoken_rs::o200k_base().ok())
                .as_ref()
                .expect("the o200k_base tables are compiled into tiktoken-rs")
        };
        let built = match get_tokenizer(model) {
            Some(Tokenizer::Cl100kBase) => CL100K.get_or_init(|| tiktoken_rs::cl100k_base().ok()),
            Some(Tokenizer::P50kBase) => P50K.get_or_init(|| tiktoken_rs::p50k_base().ok()),
            Some(Tokenizer::P50kEdit) => P50K_EDIT.get_or_init(|| tiktoken_rs::p50k_edit().ok()),
            Some(Tokenizer::R50kBase) | Some(Tokenizer::Gpt2) => {
                R50K.get_or_init(|| tiktoken_rs::r50k_base().ok())
            }
            Some(Tokenizer::O200kHarmony) => {
                HARMONY.get_or_init(|| tiktoken_rs::o200k_harmony().ok())
            }
            _ => return o200k(),
        };
        match built {
            Some(bpe) => bpe,
            None => o200k(),
        }
    }
}

#[cfg(feature = "tiktoken")]
impl TokenEstimator for TiktokenEstimator {
    fn estimate(&self, model: &str, text: &str) -> u64 {
        Self::bpe(model).encode_ordinary(text).len() as u64
    }
}

fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x1100..=0x11FF        // Hangul Jamo
        | 0x2E80..=0x2FDF      // CJK radicals
        | 0x3000..=0x30FF      // CJK symbols, Hiragana, Katakana
        | 0x3100..=0x318F      // Bopomofo, Hangul compatibility Jamo
        | 0x3400..=0x4DBF      // CJK extension A
        | 0x4E00..=0x9FFF      // CJK unified ideographs
        | 0xAC00..=0xD7AF      // Hangul syllables
        | 0xF900..=0xFAFF      // CJK compatibility ideographs
        | 0xFF00..=0xFFEF      // Half-width and full-width forms
        | 0x20000..=0x3FFFF) // CJK extensions B and later
}

/// Tokens added per chat message for the role and separators.
const PER_MESSAGE_OVERHEAD: u64 = 4;

/// What an LLM request asks for, parsed once and shared through the request extensions.
#[derive(Debug, Clone)]
pub struct RequestView {
    endpoint: Endpoint,
    model: Option<Arc<str>>,
    deployment: Option<Arc<str>>,
    fallback_models: Box<[Arc<str>]>,
    stream: bool,
    max_tokens: Option<u64>,
    message_count: Option<usize>,
    prompt_tokens: u64,
    json: Option<Arc<Value>>,
    body_len: Option<usize>,
}

/// The body was not a JSON object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    message: String,
    line: usize,
    column: usize,
}

impl ParseError {
    /// The parser's message, with line and column.
    pub fn message(&self) -> &str {
        &self.message
    }
    /// The line (1-based) where parsing failed, 0 when the JSON was valid but not an object.
    pub fn line(&self) -> usize {
        self.line
    }
    /// The column (1-based) where parsing failed.
    pub fn column(&self) -> usize {
        self.column
    }
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ParseError {}

impl RequestView {
    /// Parses a request body for `endpoint`. The body must be a JSON object.
    pub fn parse(
        endpoint: Endpoint,
        body: &[u8],
        estimator: &dyn TokenEstimator,
    ) -> Result<RequestView, ParseError> {
        let value: Value = serde_json::from_slice(body).map_err(|e| ParseError {
            message: format!(
                "The request body is not valid JSON: {} (line {}, column {}).",
                strip_position(&e.to_string()),
                e.line(),
                e.column()
            ),
            line: e.line(),
            column: e.column(),
        })?;
        if !value.is_object() {
            return Err(ParseError {
                message: format!(
                    "The request body must be a JSON object, not {}.",
                    json_kind(&value)
                ),
                line: 0,
                column: 0,
            });
        }
        Ok(RequestView::from_json(endpoint, Arc::new(value), estimator).with_body_len(body.len()))
    }

    /// The view of an already parsed JSON object.
    pub fn from_json(
        endpoint: Endpoint,
        json: Arc<Value>,
        estimator: &dyn TokenEstimator,
    ) -> RequestView {
        // One pass over the top-level fields and one over each message's fields: cheaper than
        // a map lookup per field of interest.
        let (mut model, mut stream, mut messages) = (None, false, None);
        let mut fallbacks: Option<&Vec<Value>> = None;
        let mut max = [None; 3]; // max_completion_tokens, max_tokens, max_output_tokens
        let mut texts: [Option<&Value>; 4] = [None; 4]; // prompt, input, instructions, system
        if let Some(obj) = json.as_object() {
            for (key, value) in obj {
                match key.as_str() {
                    "model" => model = value.as_str(),
                    "models" => fallbacks = value.as_array(),
                    "stream" => stream = value.as_bool().unwrap_or(false),
                    "messages" => messages = value.as_array(),
                    "max_completion_tokens" => max[0] = value.as_u64(),
                    "max_tokens" => max[1] = value.as_u64(),
                    "max_output_tokens" => max[2] = value.as_u64(),
                    "prompt" => texts[0] = Some(value),
                    "input" => texts[1] = Some(value),
                    "instructions" => texts[2] = Some(value),
                    "system" => texts[3] = Some(value),
                    _ => {}
                }
            }
        }
        let max_tokens = max.into_iter().flatten().next();
        let message_count = messages.map(Vec::len);
        let model_name = model.unwrap_or("");
        let mut tokens = 0u64;
        let mut count = |text: &str| tokens += estimator.estimate(model_name, text);
        for m in messages.into_iter().flatten().filter_map(Value::as_object) {
            for (key, value) in m {
                match key.as_str() {
                    "content" | "name" => count_text(Some(value), &mut count),
                    "tool_calls" => {
                        for c in value.as_array().into_iter().flatten() {
                            count_text(c.pointer("/function/arguments"), &mut count);
                        }
                    }
                    _ => {}
                }
            }
        }
        for text in texts {
            count_text(text, &mut count);
        }
        let model = model.map(Arc::<str>::from);
        tokens += PER_MESSAGE_OVERHEAD * message_count.unwrap_or(0) as u64;
        let fallback_models = fallbacks
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(Arc::<str>::from)
            .collect();
        RequestView {
            endpoint,
            model,
            deployment: None,
            fallback_models,
            stream,
            max_tokens,
            message_count,
            prompt_tokens: tokens,
            json: Some(json),
            body_len: None,
        }
    }

    /// Records the length in bytes of the body the view was parsed from ([`RequestView::parse`]
    /// does it), so a later layer with a smaller body limit can hold to it without reading the
    /// body again.
    pub fn with_body_len(mut self, bytes: usize) -> RequestView {
        self.body_len = Some(bytes);
        self
    }

    /// The length in bytes of the body the view was parsed from, when known (set by
    /// [`RequestView::parse`] and [`RequestView::with_body_len`]; `None` for a view built with
    /// [`RequestView::from_json`] alone).
    pub fn body_len(&self) -> Option<usize> {
        self.body_len
    }

    /// Sets the deployment from the request path ([`deployment_from_path`]); every layer that
    /// builds a view from a request calls it, so Azure-style routes are keyed and checked by the
    /// deployment the upstream serves.
    pub fn with_path(mut self, path: &str) -> RequestView {
        self.deployment = deployment_from_path(path).map(Arc::from);
        self
    }

    /// The view stored in `extensions` by an earlier layer, if any.
    pub fn from_extensions(extensions: &http::Extensions) -> Option<&RequestView> {
        extensions.get::<RequestView>()
    }

    /// The endpoint.
    pub fn endpoint(&self) -> Endpoint {
        self.endpoint
    }
    /// The body's `model` field.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }
    /// The Azure-style deployment named in the path ([`deployment_from_path`]), set by
    /// [`RequestView::with_path`].
    pub fn deployment(&self) -> Option<&str> {
        self.deployment.as_deref()
    }
    /// The models of the body's `models` array (OpenRouter-style routing: the upstream may
    /// answer with any of them).
    pub fn fallback_models(&self) -> &[Arc<str>] {
        &self.fallback_models
    }
    /// The model the upstream serves first: the path's deployment when there is one, else the
    /// body's `model`. Layers that key state by model (circuits, rate-limit buckets) key on it.
    pub fn routed_model(&self) -> Option<&str> {
        self.deployment().or(self.model())
    }
    /// Every model the upstream may use for this request, each once: the deployment, the body's
    /// `model`, then the `models` array. Allow-lists check every one of them.
    ///
    /// ```
    /// use llm_layers::request::{CharEstimator, Endpoint, RequestView};
    ///
    /// let body = br#"{"model":"gpt-4o","models":["gpt-4o","claude-3-5-sonnet"]}"#;
    /// let view = RequestView::parse(Endpoint::ChatCompletions, body, &CharEstimator).unwrap()
    ///     .with_path("/openai/deployments/prod/chat/completions");
    /// let models: Vec<&str> = view.models().collect();
    /// assert_eq!(models, ["prod", "gpt-4o", "claude-3-5-sonnet"]);
    /// assert_eq!(view.routed_model(), Some("prod"));
    /// ```
    ///
    /// Linear in the number of models: a long `models` array (the client chooses its length) is
    /// de-duplicated through a set, a short one by comparison.
    pub fn models(&self) -> impl Iterator<Item = &str> + '_ {
        /// Up to this many fallbacks are de-duplicated by comparing with the earlier ones.
        const SCAN: usize = 8;
        let head = self.deployment();
        let model = self.model().filter(|m| Some(*m) != head);
        let fallbacks = &self.fallback_models;
        let mut seen: std::collections::HashSet<&str> = std::collections::HashSet::new();
        let tail = fallbacks.iter().enumerate().filter_map(move |(i, m)| {
            let m: &str = m;
            if Some(m) == head || Some(m) == model {
                return None;
            }
            let repeat = if fallbacks.len() <= SCAN {
                fallbacks[..i].iter().any(|earlier| &**earlier == m)
            } else {
                !seen.insert(m)
            };
            (!repeat).then_some(m)
        });
        head.into_iter().chain(model).chain(tail)
    }
    /// The `stream` field (false when absent).
    pub fn stream(&self) -> bool {
        self.stream
    }
    /// `max_completion_tokens`, `max_tokens` or `max_output_tokens`, whichever is set.
    pub fn max_tokens(&self) -> Option<u64> {
        self.max_tokens
    }
    /// The number of chat messages, for chat requests.
    pub fn message_count(&self) -> Option<usize> {
        self.message_count
    }
    /// The estimated prompt tokens.
    pub fn prompt_tokens(&self) -> u64 {
        self.prompt_tokens
    }
    /// What the request may cost at most: prompt tokens plus `max_tokens` (0 when unset).
    pub fn token_cost(&self) -> u64 {
        self.prompt_tokens
            .saturating_add(self.max_tokens.unwrap_or(0))
    }
    /// The parsed body.
    pub fn json(&self) -> Option<&Value> {
        self.json.as_deref()
    }
    /// The parsed body, shared.
    pub fn json_arc(&self) -> Option<&Arc<Value>> {
        self.json.as_ref()
    }
}

fn count_text(v: Option<&Value>, count: &mut impl FnMut(&str)) {
    match v {
        Some(Value::String(s)) => count(s),
        Some(Value::Array(items)) => {
            for item in items {
                match item {
                    Value::String(s) => count(s),
                    Value::Object(o) => {
                        count_text(o.get("text"), count);
                        count_text(o.get("content"), count);
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

fn strip_position(msg: &str) -> &str {
    msg.find(" at line ").map_or(msg, |i| &msg[..i])
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Why [`ensure_view`] could not produce a view.
#[derive(Debug)]
pub enum ViewError {
    /// The body could not be buffered.
    Buffer(BufferError),
    /// The body was not a JSON object.
    Parse(ParseError),
}

impl ViewError {
    /// The envelope error: `413 request_too_large`, or `400 invalid_value` naming the parser's
    /// line and column.
    pub fn to_api_error(&self) -> crate::error::ApiError {
        match self {
            ViewError::Buffer(b) => b.to_api_error(),
            ViewError::Parse(p) => crate::error::ApiError::new(
                crate::error::ErrorCode::InvalidValue,
                p.message().to_owned(),
            ),
        }
    }
}

/// Makes sure the request carries a [`RequestView`]: returns it unchanged when an earlier
/// layer stored one, else buffers the body (at most `limit` bytes), parses it, stores the view
/// and rebuilds the request with the same bytes. Requests without a body (`GET`) get no view.
pub async fn ensure_view<B>(
    req: Request<B>,
    limit: usize,
    estimator: &dyn TokenEstimator,
) -> Result<Request<B>, (Request<B>, ViewError)>
where
    B: Body + From<Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if req.extensions().get::<RequestView>().is_some() {
        return Ok(req);
    }
    let endpoint = Endpoint::from_path(req.uri().path());
    match buffer_request(req, limit).await {
        Ok((mut req, bytes)) => {
            if bytes.is_empty() {
                return Ok(req);
            }
            match RequestView::parse(endpoint, &bytes, estimator) {
                Ok(view) => {
                    let view = view.with_path(req.uri().path());
                    req.extensions_mut().insert(view);
                    Ok(req)
                }
                Err(e) => Err((req, ViewError::Parse(e))),
            }
        }
        Err(e) => {
            // The body is gone; answer with an empty request so the caller can still respond.
            Err((Request::new(B::from(Bytes::new())), ViewError::Buffer(e)))
        }
    }
}

/// The borrowed head of a request: what a key function (rate-limit buckets, circuits) may look
/// at. One type for every layer that keys state by request.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    method: &'a http::Method,
    uri: &'a http::Uri,
    headers: &'a http::HeaderMap,
    extensions: &'a http::Extensions,
}

impl<'a> RequestHead<'a> {
    /// The head of `req`.
    pub fn of<B>(req: &'a Request<B>) -> Self {
        RequestHead {
            method: req.method(),
            uri: req.uri(),
            headers: req.headers(),
            extensions: req.extensions(),
        }
    }
    /// The head from a request's [`Parts`](http::request::Parts).
    pub fn from_parts(parts: &'a http::request::Parts) -> Self {
        RequestHead {
            method: &parts.method,
            uri: &parts.uri,
            headers: &parts.headers,
            extensions: &parts.extensions,
        }
    }
    /// The method.
    pub fn method(&self) -> &'a http::Method {
        self.method
    }
    /// The URI.
    pub fn uri(&self) -> &'a http::Uri {
        self.uri
    }
    /// The headers.
    pub fn headers(&self) -> &'a http::HeaderMap {
        self.headers
    }
    /// The extensions (the [`RequestView`] and the [`KeyIdentity`](crate::ext::KeyIdentity)
    /// earlier layers stored, among others).
    pub fn extensions(&self) -> &'a http::Extensions {
        self.extensions
    }
    /// The [`RequestView`] an earlier layer stored, if any.
    pub fn view(&self) -> Option<&'a RequestView> {
        self.extensions.get::<RequestView>()
    }
}

/// A key function of your own: which bucket or circuit a request belongs to. `None` means "no
/// key" (the layer says what that does). Shared by every layer that keys state by request.
pub type KeyFn = Arc<dyn Fn(&RequestHead<'_>) -> Option<Arc<str>> + Send + Sync>;

pin_project_lite::pin_project! {
    /// Makes sure a request carries a [`RequestView`]: the future every layer that needs the
    /// view runs, so the body is read through one path and parsed once.
    ///
    /// When an earlier layer stored a view, the request goes on at once with its body
    /// untouched. Else the body is buffered (at most `limit` bytes), parsed, the view stored,
    /// and the request rebuilt with the same bytes (a [`LayerBody`] either way). Requests with
    /// an empty body (`GET`) get no view.
    ///
    /// On failure a [`ViewFailure`] comes back: the head, and the body when only parsing
    /// failed, so the layer can answer or pass the request on.
    pub struct EnsureView<B> {
        #[pin]
        state: EnsureState<B>,
        estimator: Option<Arc<dyn TokenEstimator>>,
    }
}

pin_project_lite::pin_project! {
    #[project = EnsureProj]
    enum EnsureState<B> {
        Ready { req: Option<Request<LayerBody<B>>> },
        Buffering { #[pin] buf: BufferRequest<B> },
    }
}

/// Why [`EnsureView`] gave no view, with what is left of the request: the head always, and
/// the whole body when it was read but did not parse (a body that is not JSON, such as a
/// multipart upload). A layer that can do without the view passes the request on with
/// [`ViewFailure::into_request`]; one that cannot answers [`ViewError::to_api_error`].
pub struct ViewFailure<B> {
    parts: http::request::Parts,
    bytes: Option<Bytes>,
    error: ViewError,
    _body: std::marker::PhantomData<fn() -> B>,
}

impl<B> ViewFailure<B> {
    /// What went wrong.
    pub fn error(&self) -> &ViewError {
        &self.error
    }
    /// The request's head.
    pub fn parts(&self) -> &http::request::Parts {
        &self.parts
    }
    /// The request with its body intact, when the body was read whole and only parsing
    /// failed; else the head and the error (the body is gone: too large or unreadable).
    #[allow(clippy::result_large_err)]
    pub fn into_request(self) -> Result<Request<LayerBody<B>>, (http::request::Parts, ViewError)> {
        match self.bytes {
            Some(bytes) => Ok(BufferRequest::<B>::rebuild(self.parts, bytes)),
            None => Err((self.parts, self.error)),
        }
    }
    /// The head and the error.
    pub fn into_parts(self) -> (http::request::Parts, ViewError) {
        (self.parts, self.error)
    }
}

impl<B> std::fmt::Debug for ViewFailure<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewFailure")
            .field("error", &self.error)
            .field("body_kept", &self.bytes.is_some())
            .finish_non_exhaustive()
    }
}

impl<B> std::fmt::Debug for EnsureView<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnsureView").finish_non_exhaustive()
    }
}

impl<B: Body> EnsureView<B> {
    /// Starts on `req`: reads the body only when no view is stored yet.
    pub fn new(req: Request<B>, limit: usize, estimator: Arc<dyn TokenEstimator>) -> Self {
        if req.extensions().get::<RequestView>().is_some() || req.body().is_end_stream() {
            return EnsureView {
                state: EnsureState::Ready {
                    req: Some(req.map(LayerBody::new)),
                },
                estimator: None,
            };
        }
        EnsureView {
            state: EnsureState::Buffering {
                buf: BufferRequest::new(req, limit),
            },
            estimator: Some(estimator),
        }
    }
}

impl<B> std::future::Future for EnsureView<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Output = Result<Request<LayerBody<B>>, ViewFailure<B>>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.project();
        match this.state.project() {
            EnsureProj::Ready { req } => {
                std::task::Poll::Ready(Ok(req.take().expect("EnsureView polled after completion")))
            }
            EnsureProj::Buffering { buf } => {
                let (mut parts, bytes) = match std::task::ready!(buf.poll(cx)) {
                    Ok(ok) => ok,
                    Err((parts, e)) => {
                        return std::task::Poll::Ready(Err(ViewFailure {
                            parts,
                            bytes: None,
                            error: ViewError::Buffer(e),
                            _body: std::marker::PhantomData,
                        }))
                    }
                };
                if !bytes.is_empty() {
                    let endpoint = Endpoint::from_path(parts.uri.path());
                    let estimator = this.estimator.take().expect("estimator kept until parsed");
                    match RequestView::parse(endpoint, &bytes, &*estimator) {
                        Ok(view) => {
                            parts.extensions.insert(view.with_path(parts.uri.path()));
                        }
                        Err(e) => {
                            return std::task::Poll::Ready(Err(ViewFailure {
                                parts,
                                bytes: Some(bytes),
                                error: ViewError::Parse(e),
                                _body: std::marker::PhantomData,
                            }))
                        }
                    }
                }
                std::task::Poll::Ready(Ok(BufferRequest::<B>::rebuild(parts, bytes)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cjk_counts_one_per_char() {
        assert_eq!(CharEstimator.estimate("", "你好世界"), 4);
        assert_eq!(CharEstimator.estimate("", "abcdefgh"), 2);
        assert_eq!(CharEstimator.estimate("", "héllo"), 2);
    }

    #[cfg(feature = "tiktoken")]
    #[test]
    fn tiktoken_picks_the_encoding_by_model() {
        let text = "The quick brown fox jumps over the lazy dog. 你好，世界！";
        let o200k = tiktoken_rs::o200k_base()
            .unwrap()
            .encode_ordinary(text)
            .len() as u64;
        let cl100k = tiktoken_rs::cl100k_base()
            .unwrap()
            .encode_ordinary(text)
            .len() as u64;
        assert_ne!(o200k, cl100k, "the sample tells the encodings apart");
        assert_eq!(TiktokenEstimator.estimate("gpt-4o", text), o200k);
        assert_eq!(
            TiktokenEstimator.estimate("gpt-4o-mini-2024-07-18", text),
            o200k
        );
        assert_eq!(TiktokenEstimator.estimate("gpt-4", text), cl100k);
        assert_eq!(TiktokenEstimator.estimate("gpt-3.5-turbo", text), cl100k);
        // Unknown and empty names fall back to o200k_base.
        assert_eq!(TiktokenEstimator.estimate("claude-3-5-sonnet", text), o200k);
        assert_eq!(TiktokenEstimator.estimate("", text), o200k);
        // The same encoding is shared, not rebuilt.
        assert!(std::ptr::eq(
            TiktokenEstimator::bpe("gpt-4o"),
            TiktokenEstimator::bpe("o3-mini")
        ));
    }

    #[test]
    fn endpoints_from_paths() {
        assert_eq!(
            Endpoint::from_path("/v1/chat/completions"),
            Endpoint::ChatCompletions
        );
        assert_eq!(
            Endpoint::from_path("/v1/completions/"),
            Endpoint::Completions
        );
        assert_eq!(
            Endpoint::from_path("/openai/deployments/x/embeddings"),
            Endpoint::Embeddings
        );
        assert_eq!(Endpoint::from_path("/v1/models"), Endpoint::Other);
    }

    #[test]
    fn paths_are_matched_as_an_upstream_decodes_them() {
        for path in [
            "/v1/chat/%63ompletions",
            "/v1/chat/%63%6F%6Dpletions",
            "/v1/chat%2Fcompletions",
            "/v1/models/../chat/completions",
            "/v1/./chat//completions/",
            "//v1/chat/completions",
        ] {
            assert_eq!(
                Endpoint::from_path(path),
                Endpoint::ChatCompletions,
                "{path}"
            );
        }
        assert_eq!(normalize_path("/a/../../b"), "/b");
        assert_eq!(normalize_path("/%zz/%4"), "/%zz/%4");
        assert_eq!(normalize_path("/x/%ff"), "/x/\u{fffd}");
        assert_eq!(normalize_path(".."), "/");
        assert_eq!(
            deployment_from_path("/openai/deployments/my%2Dgpt/chat/completions").as_deref(),
            Some("my-gpt")
        );
        assert_eq!(deployment_from_path("/openai/deployments"), None);
    }

    #[test]
    fn models_are_listed_once_in_order_for_short_and_long_arrays() {
        let list = |n: usize| {
            let mut models: Vec<String> =
                (0..n).map(|i| format!("m{}", i % (n / 2).max(1))).collect();
            models.push("gpt-4o".to_owned());
            serde_json::json!({"model": "gpt-4o", "models": models}).to_string()
        };
        for n in [4usize, 40, 200_000] {
            let view = RequestView::parse(
                Endpoint::ChatCompletions,
                list(n).as_bytes(),
                &CharEstimator,
            )
            .unwrap()
            .with_path("/openai/deployments/m1/chat/completions");
            let models: Vec<&str> = view.models().collect();
            let mut expected = vec!["m1".to_owned(), "gpt-4o".to_owned()];
            expected.extend(
                (0..(n / 2).max(1))
                    .filter(|i| *i != 1)
                    .map(|i| format!("m{i}")),
            );
            assert_eq!(models, expected, "{n}");
        }
    }

    #[test]
    fn the_fast_normality_check_agrees_with_the_segment_rule() {
        let by_segments = |p: &str| {
            !p.contains('%') && !p.contains("//") && p.split('/').all(|s| s != "." && s != "..")
        };
        let mut rng = fastrand::Rng::with_seed(7);
        let alphabet = [b'/', b'.', b'%', b'a', b'2'];
        for _ in 0..20_000 {
            let len = rng.usize(0..9);
            let p: String = (0..len)
                .map(|_| alphabet[rng.usize(..alphabet.len())] as char)
                .collect();
            assert_eq!(is_normal(p.as_bytes()), by_segments(&p), "{p:?}");
        }
    }

    #[test]
    fn parse_errors_name_line_and_column() {
        let e = RequestView::parse(
            Endpoint::ChatCompletions,
            b"{\n\"model\": }",
            &CharEstimator,
        )
        .unwrap_err();
        assert_eq!(e.line(), 2);
        assert!(e.message().contains("line 2"), "{}", e.message());
        let e = RequestView::parse(Endpoint::ChatCompletions, b"[1]", &CharEstimator).unwrap_err();
        assert!(e.message().contains("an array"));
    }
}
