//! The shared, parsed view of an LLM request.
//!
//! Several layers need to know what a request asks for: the auth layer checks the model against
//! a key's allow-list, the rate-limit layer charges tokens, the breaker keeps one circuit per
//! model, validation checks everything. The body is parsed **once**: the first layer that needs
//! the view buffers the body (bounded), parses it, stores a [`RequestView`] in the request
//! extensions and hands the body on intact; every later layer reads it from there
//! ([`RequestView::from_extensions`]) or computes it through the same future
//! ([`EnsureView`]).
//!
//! The parse is typed and cheap: serde visitors read the few fields layers use and skip every
//! other value without building it (no `serde_json::Value` tree), borrowing strings from the
//! body. The view keeps the body's [`Bytes`] (a handle on the buffer the request is handed on
//! with, not a copy) for checks that read other fields ([`RequestView::bytes`]).
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
use serde::de;

use crate::body::{BoxError, BufferError, BufferRequest, LayerBody};

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

    /// Whether the estimate depends on the model name (by default it may). An estimator that
    /// says `false` lets [`RequestView::parse`] count each text as it reads it, even before the
    /// body's `model` (which the OpenAI SDKs send after `messages`); otherwise texts read before
    /// `model` wait for it.
    fn uses_model(&self) -> bool {
        true
    }

    /// Whether this estimate is [`CharEstimator`]'s for every model and text (by default
    /// not). An estimator that says `true` lets [`RequestView::parse`] count a text's
    /// characters as it reads it, from the escaped JSON, without unescaping it first and
    /// without calling [`TokenEstimator::estimate`]. Say `true` only for an estimator that
    /// answers exactly as [`CharEstimator`] does.
    fn counts_characters(&self) -> bool {
        false
    }

    /// The output tokens a request for `model` is charged when it sets no `max_tokens` (nor
    /// `max_completion_tokens` / `max_output_tokens`): by default [`DEFAULT_OUTPUT_TOKENS`]
    /// for every model. [`TokenEstimator::with_output_defaults`] sets a table by model prefix.
    fn default_output(&self, model: &str) -> u64 {
        let _ = model;
        DEFAULT_OUTPUT_TOKENS
    }

    /// This estimator, with the output defaults of `defaults` for requests without
    /// `max_tokens`: what to hand the `estimator(..)` setter of a layer's builder.
    ///
    /// ```
    /// use llm_layers::request::{CharEstimator, Endpoint, OutputDefaults, RequestView, TokenEstimator};
    ///
    /// let estimator = CharEstimator
    ///     .with_output_defaults(OutputDefaults::new(4096).prefix("gpt-4o-mini", 1024));
    /// let body = br#"{"model":"gpt-4o-mini-2024-07-18","messages":[]}"#;
    /// let view = RequestView::parse(Endpoint::ChatCompletions, body, &estimator).unwrap();
    /// assert_eq!(view.max_tokens(), None);
    /// assert_eq!(view.output_tokens(), 1024);
    /// ```
    fn with_output_defaults(self, defaults: OutputDefaults) -> WithOutputDefaults
    where
        Self: Sized,
    {
        WithOutputDefaults::new(self, defaults)
    }
}

/// The output tokens charged for a request without `max_tokens` when nothing else is set
/// ([`TokenEstimator::default_output`], [`OutputDefaults::default`]).
pub const DEFAULT_OUTPUT_TOKENS: u64 = 4096;

/// Output tokens by model for requests that set no `max_tokens`: a short table of model-name
/// prefixes (the longest matching prefix wins) and one fallback for every other model.
///
/// The default has no prefixes and the fallback [`DEFAULT_OUTPUT_TOKENS`].
///
/// ```
/// use llm_layers::request::OutputDefaults;
///
/// let defaults = OutputDefaults::new(4096).prefix("gpt-4o", 16_384).prefix("gpt-4o-mini", 2048);
/// assert_eq!(defaults.for_model("gpt-4o-2024-08-06"), 16_384);
/// assert_eq!(defaults.for_model("gpt-4o-mini"), 2048);
/// assert_eq!(defaults.for_model("llama-3"), 4096);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputDefaults {
    prefixes: Vec<(Box<str>, u64)>,
    fallback: u64,
}

impl Default for OutputDefaults {
    fn default() -> Self {
        OutputDefaults::new(DEFAULT_OUTPUT_TOKENS)
    }
}

impl OutputDefaults {
    /// No prefixes; every model gets `fallback`.
    pub fn new(fallback: u64) -> Self {
        OutputDefaults {
            prefixes: Vec::new(),
            fallback,
        }
    }

    /// Models whose name starts with `prefix` get `tokens` (replacing an earlier entry for the
    /// same prefix).
    pub fn prefix(mut self, prefix: impl Into<Box<str>>, tokens: u64) -> Self {
        let prefix = prefix.into();
        self.prefixes.retain(|(p, _)| *p != prefix);
        self.prefixes.push((prefix, tokens));
        self
    }

    /// The fallback for models no prefix matches.
    pub fn fallback_tokens(&self) -> u64 {
        self.fallback
    }

    /// The default output of `model`: the longest matching prefix's, else the fallback.
    pub fn for_model(&self, model: &str) -> u64 {
        self.prefixes
            .iter()
            .filter(|(p, _)| model.starts_with(&**p))
            .max_by_key(|(p, _)| p.len())
            .map_or(self.fallback, |(_, n)| *n)
    }
}

/// An estimator with its own [`OutputDefaults`] ([`TokenEstimator::with_output_defaults`]):
/// counts texts as the estimator it wraps does.
#[derive(Clone)]
pub struct WithOutputDefaults {
    estimator: Arc<dyn TokenEstimator>,
    defaults: OutputDefaults,
}

impl WithOutputDefaults {
    /// `estimator` with `defaults`.
    pub fn new(estimator: impl TokenEstimator, defaults: OutputDefaults) -> Self {
        WithOutputDefaults::shared(Arc::new(estimator), defaults)
    }

    /// A shared estimator (as a layer's builder holds it) with `defaults`.
    pub fn shared(estimator: Arc<dyn TokenEstimator>, defaults: OutputDefaults) -> Self {
        WithOutputDefaults {
            estimator,
            defaults,
        }
    }

    /// The defaults.
    pub fn defaults(&self) -> &OutputDefaults {
        &self.defaults
    }
}

impl std::fmt::Debug for WithOutputDefaults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WithOutputDefaults")
            .field("defaults", &self.defaults)
            .finish_non_exhaustive()
    }
}

impl TokenEstimator for WithOutputDefaults {
    fn estimate(&self, model: &str, text: &str) -> u64 {
        self.estimator.estimate(model, text)
    }
    fn uses_model(&self) -> bool {
        self.estimator.uses_model()
    }
    fn counts_characters(&self) -> bool {
        self.estimator.counts_characters()
    }
    fn default_output(&self, model: &str) -> u64 {
        self.defaults.for_model(model)
    }
}

/// An image part in OpenAI's format (`image_url` in chat, `input_image` in Responses) with
/// `detail: "low"`: a flat 85 tokens.
pub const IMAGE_LOW_TOKENS: u64 = 85;

/// An OpenAI image part with `detail` `high`, `auto` or unset. OpenAI's tile rule (GPT-4o,
/// GPT-4.1, the `o` series) is 85 tokens plus 170 per 512-px tile of the image scaled to fit
/// 2048×2048 and then to a shortest side of 768 px. The size of an image behind a URL or in
/// base64 is not read, so the largest count the rule gives is assumed: 8 tiles (a 768×2048
/// image), 85 + 8 × 170 = 1445 tokens.
pub const IMAGE_HIGH_TOKENS: u64 = 85 + 8 * 170;

/// An Anthropic `image` block. Anthropic counts `(width × height) / 750`, on images scaled to
/// at most about 1.15 megapixels; the size is not read, so that maximum is assumed: 1600
/// tokens.
pub const ANTHROPIC_IMAGE_TOKENS: u64 = 1600;

/// An audio part (`input_audio` in chat and Responses, `audio`): a fixed 600 tokens, one
/// minute at OpenAI's 10 audio tokens a second. The duration is not read.
pub const AUDIO_PART_TOKENS: u64 = 600;

/// A file part (`file` in chat, `input_file` in Responses, an Anthropic `document` block): a
/// fixed 1500 tokens, about one page of a PDF. The file is not read.
pub const FILE_PART_TOKENS: u64 = 1500;

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
    fn uses_model(&self) -> bool {
        false
    }

    fn counts_characters(&self) -> bool {
        true
    }

    fn estimate(&self, _model: &str, text: &str) -> u64 {
        let (chars, cjk) = char_counts(text);
        char_tokens(chars, cjk)
    }
}

/// [`CharEstimator`]'s tokens for a text of `chars` characters, `cjk` of them CJK.
pub(crate) fn char_tokens(chars: u64, cjk: u64) -> u64 {
    cjk + (chars - cjk).div_ceil(4)
}

/// The characters of `text`, and how many of them are CJK.
pub(crate) fn char_counts(text: &str) -> (u64, u64) {
    {
        if text.is_ascii() {
            return (text.len() as u64, 0);
        }
        // Over the bytes rather than the characters: every byte that is no UTF-8 continuation
        // byte starts a character, and every CJK character is a three- or four-byte sequence,
        // so only the blocks holding such a lead byte are decoded.
        const BLOCK: usize = 32;
        let bytes = text.as_bytes();
        let (mut chars, mut cjk) = (0u64, 0u64);
        for (i, block) in bytes.chunks(BLOCK).enumerate() {
            // One pass the compiler vectorizes: the characters started, and whether a three-
            // or four-byte sequence starts in the block.
            let (mut starts, mut top) = (0u8, 0u8);
            for &b in block {
                starts += u8::from((b as i8) >= -64);
                top = top.max(b);
            }
            chars += u64::from(starts);
            if top >= 0xE0 {
                let at = i * BLOCK;
                for (j, &b) in block.iter().enumerate() {
                    if b >= 0xE0 {
                        // The sequence is whole: the text is UTF-8.
                        let next =
                            |k: usize| u32::from(bytes.get(at + j + k).map_or(0, |c| c & 0x3F));
                        let point = if b < 0xF0 {
                            (u32::from(b & 0x0F) << 12) | (next(1) << 6) | next(2)
                        } else {
                            (u32::from(b & 0x07) << 18) | (next(1) << 12) | (next(2) << 6) | next(3)
                        };
                        cjk += u64::from(is_cjk_point(point));
                    }
                }
            }
        }
        (chars, cjk)
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

#[cfg(test)]
fn is_cjk(c: char) -> bool {
    is_cjk_point(c as u32)
}

pub(crate) fn is_cjk_point(c: u32) -> bool {
    matches!(c,
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
///
/// The parse is typed: it reads only the fields layers use (`model`, `models`, `stream`,
/// `max_tokens` / `max_completion_tokens` / `max_output_tokens`, `n`, `best_of`, the text of
/// `messages` — content parts and tool-call arguments included — and of `prompt`, `input`,
/// `instructions` and `system`, the strings of `tools`, `functions`, `response_format` and
/// `text.format`) and skips every other value without building it.
///
/// # The estimate
///
/// [`RequestView::token_cost`] is `prompt_tokens + output_tokens × choices`:
/// - texts count through the [`TokenEstimator`], plus 4 tokens per chat message;
/// - a schema (`tools`, `functions`, `response_format`, the Responses API's `text.format`)
///   counts every string in it, object keys included, through the estimator (numbers,
///   booleans and structure are not counted);
/// - a content part counts by its `type` at a fixed figure, since the media is not read: an
///   OpenAI image (`image_url`, `input_image`) [`IMAGE_LOW_TOKENS`] with `detail: "low"`,
///   else [`IMAGE_HIGH_TOKENS`]; an Anthropic `image` [`ANTHROPIC_IMAGE_TOKENS`]; audio
///   (`input_audio`, `audio`) [`AUDIO_PART_TOKENS`]; a file (`file`, `input_file`,
///   `document`) [`FILE_PART_TOKENS`]. URLs and base64 data are not counted as text;
/// - the output of a choice is the `max_tokens` set, else the estimator's
///   [`default_output`](TokenEstimator::default_output) for the body's `model` (configurable
///   with [`OutputDefaults`]); 0 for embeddings;
/// - [`RequestView::choices`] is `n`, and for legacy completions the larger of `n` and
///   `best_of`.
///
/// The view holds no tree of the body: a view built from the request
/// ([`RequestView::parse_bytes`], [`EnsureView`]) keeps the body's [`Bytes`], which share the
/// buffer the request is handed on with, so checks of their own can read the body again
/// ([`RequestView::bytes`]) without a second copy in memory.
///
/// Every value is checked for JSON syntax and UTF-8, including those the view does not read.
/// The limits of a `serde_json::Value` parse are not applied to values the view skips: a
/// number beyond `f64`, an escaped lone surrogate or nesting deeper than 128 levels is refused
/// only in a field the view reads. A key that occurs twice counts by its last occurrence.
#[derive(Clone)]
pub struct RequestView {
    endpoint: Endpoint,
    model: Option<Arc<str>>,
    deployment: Option<Arc<str>>,
    fallback_models: Box<[Arc<str>]>,
    stream: bool,
    max_tokens: Option<u64>,
    /// `max_tokens`, or the estimator's default output when it is unset (0 for embeddings).
    output_tokens: u64,
    /// `n` (and `best_of` for completions), at least 1.
    choices: u64,
    message_count: Option<usize>,
    prompt_tokens: u64,
    body: Option<Bytes>,
    body_len: Option<usize>,
}

impl std::fmt::Debug for RequestView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The body itself is not shown: it may hold anything the client sent.
        f.debug_struct("RequestView")
            .field("endpoint", &self.endpoint)
            .field("model", &self.model)
            .field("deployment", &self.deployment)
            .field("fallback_models", &self.fallback_models)
            .field("stream", &self.stream)
            .field("max_tokens", &self.max_tokens)
            .field("output_tokens", &self.output_tokens)
            .field("choices", &self.choices)
            .field("message_count", &self.message_count)
            .field("prompt_tokens", &self.prompt_tokens)
            .field("body", &self.body.as_ref().map(|b| b.len()))
            .field("body_len", &self.body_len)
            .finish()
    }
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
    ///
    /// The view does not keep the body (it has only a borrowed slice);
    /// [`RequestView::parse_bytes`] does.
    pub fn parse(
        endpoint: Endpoint,
        body: &[u8],
        estimator: &dyn TokenEstimator,
    ) -> Result<RequestView, ParseError> {
        RequestView::parse_checked(endpoint, body, estimator, None).map(|(view, _)| view)
    }

    /// [`RequestView::parse`]; with `checks` set, the fields validation checks are gathered
    /// in the same pass and handed back beside the view, each chat message checked as well
    /// when `checks` is `Some(true)` and the endpoint is chat completions.
    pub(crate) fn parse_checked(
        endpoint: Endpoint,
        body: &[u8],
        estimator: &dyn TokenEstimator,
        checks: Option<bool>,
    ) -> Result<(RequestView, Option<crate::fields::Fields>), ParseError> {
        let text = json_text(body)?;
        let scan = checks.is_some_and(|scan| scan && endpoint == Endpoint::ChatCompletions);
        // The fields live here, on the stack, only when asked for; the parse fills them in
        // through a reference (so the parse's own state stays small when they are not).
        let mut fields = checks.map(|_| crate::fields::Fields::default());
        let view =
            typed_pass(endpoint, text, estimator, fields.as_mut(), scan)?.map_err(not_an_object)?;
        Ok((view.with_body_len(body.len()), fields))
    }

    /// [`RequestView::parse`], keeping `body` in the view ([`RequestView::bytes`]): a clone of
    /// the `Bytes`, so the view and the request handed on share one buffer.
    pub fn parse_bytes(
        endpoint: Endpoint,
        body: Bytes,
        estimator: &dyn TokenEstimator,
    ) -> Result<RequestView, ParseError> {
        let mut view = RequestView::parse(endpoint, &body, estimator)?;
        view.body = Some(body);
        Ok(view)
    }

    /// The view of an already parsed JSON document: the document is written out once and
    /// parsed as [`RequestView::parse_bytes`] does, so the view holds those bytes. A document
    /// that is not an object gives a view with no fields.
    pub fn from_json(
        endpoint: Endpoint,
        json: &serde_json::Value,
        estimator: &dyn TokenEstimator,
    ) -> RequestView {
        let bytes = Bytes::from(serde_json::to_vec(json).unwrap_or_default());
        match RequestView::parse_bytes(endpoint, bytes.clone(), estimator) {
            Ok(view) => view,
            Err(_) => RequestView {
                endpoint,
                model: None,
                deployment: None,
                fallback_models: Box::default(),
                stream: false,
                max_tokens: None,
                output_tokens: 0,
                choices: 1,
                message_count: None,
                prompt_tokens: 0,
                body_len: Some(bytes.len()),
                body: Some(bytes),
            },
        }
    }

    /// The body the view was parsed from, when the view keeps it ([`RequestView::parse_bytes`],
    /// [`RequestView::from_json`], and every view the crate's layers store): for checks that
    /// read fields the view does not. `None` for a view built with [`RequestView::parse`].
    pub fn bytes(&self) -> Option<&Bytes> {
        self.body.as_ref()
    }

    /// Records the length in bytes of the body the view was parsed from ([`RequestView::parse`]
    /// does it), so a later layer with a smaller body limit can hold to it without reading the
    /// body again.
    pub fn with_body_len(mut self, bytes: usize) -> RequestView {
        self.body_len = Some(bytes);
        self
    }

    /// The length in bytes of the body the view was parsed from, when known (set by
    /// [`RequestView::parse`], [`RequestView::parse_bytes`], [`RequestView::from_json`] and
    /// [`RequestView::with_body_len`]).
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
    /// The output tokens one choice may take: `max_tokens` when set, else the estimator's
    /// default for the body's `model` ([`TokenEstimator::default_output`], by default
    /// [`DEFAULT_OUTPUT_TOKENS`]); 0 for embeddings, which have no output.
    pub fn output_tokens(&self) -> u64 {
        self.output_tokens
    }
    /// How many choices the upstream generates: `n`, or for legacy completions the larger of
    /// `n` and `best_of` (each generated completion is billed); 1 when unset or 0.
    pub fn choices(&self) -> u64 {
        self.choices
    }
    /// What the request may cost at most: the prompt tokens plus the output tokens of every
    /// choice, `prompt_tokens() + output_tokens() × choices()`.
    ///
    /// ```
    /// use llm_layers::request::{CharEstimator, Endpoint, RequestView, DEFAULT_OUTPUT_TOKENS};
    ///
    /// let body = br#"{"model":"gpt-4o","n":3,"max_tokens":100,"messages":[]}"#;
    /// let view = RequestView::parse(Endpoint::ChatCompletions, body, &CharEstimator).unwrap();
    /// assert_eq!(view.token_cost(), 300);
    /// let body = br#"{"model":"gpt-4o","messages":[]}"#;
    /// let view = RequestView::parse(Endpoint::ChatCompletions, body, &CharEstimator).unwrap();
    /// assert_eq!(view.token_cost(), DEFAULT_OUTPUT_TOKENS);
    /// ```
    pub fn token_cost(&self) -> u64 {
        self.prompt_tokens
            .saturating_add(self.output_tokens.saturating_mul(self.choices))
    }
}

/// The text of a JSON body, or the error a `serde_json::Value` parse gives when it is not
/// UTF-8 (line and column of the first bad byte).
fn json_text(body: &[u8]) -> Result<&str, ParseError> {
    if let Ok(text) = simdutf8::basic::from_utf8(body) {
        return Ok(text);
    }
    std::str::from_utf8(body).map_err(|e| {
        // The rare path: let serde_json say where, as it always did.
        match serde_json::from_slice::<serde_json::Value>(body) {
            Err(json) => syntax_error(json),
            Ok(_) => {
                let before = &body[..e.valid_up_to()];
                let line = 1 + before.iter().filter(|&&b| b == b'\n').count();
                let column = before.len() - before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1) + 1;
                ParseError {
                    message: format!(
                        "The request body is not valid JSON: invalid unicode code point (line {line}, column {column})."
                    ),
                    line,
                    column,
                }
            }
        }
    })
}

/// The error for a body the typed parse refused with `e`: the one a `serde_json::Value` parse
/// gives, word for word. The two fail at the same place, but may word it differently where the
/// typed parse skips a value (a number cut short is "invalid number" to one, "EOF while
/// parsing a value" to the other); the rare path parses again to say it as it was always said.
fn refusal(text: &str, e: serde_json::Error) -> ParseError {
    match serde_json::from_str::<serde_json::Value>(text) {
        Err(value) => syntax_error(value),
        Ok(_) => syntax_error(e),
    }
}

/// The error for a body that is not JSON, naming serde_json's line and column.
pub(crate) fn syntax_error(e: serde_json::Error) -> ParseError {
    ParseError {
        message: format!(
            "The request body is not valid JSON: {} (line {}, column {}).",
            strip_position(&e.to_string()),
            e.line(),
            e.column()
        ),
        line: e.line(),
        column: e.column(),
    }
}

/// The error for a body that is JSON but not an object; `kind` is "an array", "null", ...
pub(crate) fn not_an_object(kind: &'static str) -> ParseError {
    ParseError {
        message: format!("The request body must be a JSON object, not {kind}."),
        line: 0,
        column: 0,
    }
}

fn strip_position(msg: &str) -> &str {
    msg.find(" at line ").map_or(msg, |i| &msg[..i])
}

/// The view's typed pass over `text`, filling `fields` in on the way when given (each chat
/// message checked when `scan`): the fast reader first; whatever it refuses, serde_json reads
/// (and words the error). `Ok(Err(kind))` for a document that is no object.
fn typed_pass(
    endpoint: Endpoint,
    text: &str,
    estimator: &dyn TokenEstimator,
    mut fields: Option<&mut crate::fields::Fields>,
    scan: bool,
) -> Result<Result<RequestView, &'static str>, ParseError> {
    let count = estimator.counts_characters();
    let fast = crate::json::visit_str(
        text,
        count,
        typed::Top {
            estimator,
            fields: fields.as_deref_mut(),
            scan,
        },
    );
    let top = match fast {
        Ok(top) => top,
        Err(_) => {
            if let Some(f) = fields.as_deref_mut() {
                *f = crate::fields::Fields::default();
            }
            let mut de = serde_json::Deserializer::from_str(text);
            let top = typed::Top {
                estimator,
                fields,
                scan,
            };
            de::Deserializer::deserialize_any(&mut de, top)
                .and_then(|top| de.end().map(|()| top))
                .map_err(|e| refusal(text, e))?
        }
    };
    Ok(top.map(|g| g.into_view(endpoint, estimator)))
}

/// The fields validation checks, read from `body` by the view's own pass alone (its counts
/// dropped: the character count, which the reader keeps without decoding a string, is the
/// cheapest). `Ok(None)` when the body is JSON but no object.
pub(crate) fn parse_fields(
    body: &[u8],
    scan: bool,
) -> Result<Option<crate::fields::Fields>, ParseError> {
    let text = json_text(body)?;
    let mut fields = crate::fields::Fields::default();
    let pass = typed_pass(
        Endpoint::ChatCompletions,
        text,
        &CharEstimator,
        Some(&mut fields),
        scan,
    )?;
    Ok(pass.ok().map(|_| fields))
}

pub(crate) use typed::skip_others;

/// The typed parse of [`RequestView::parse`]: serde visitors that read the fields the view
/// holds and skip every other value with [`IgnoredAny`], borrowing strings from the body.
mod typed {
    use std::borrow::Cow;
    use std::fmt;
    use std::sync::Arc;

    use serde::de::{
        self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor,
    };

    use super::{Endpoint, RequestView, TokenEstimator, PER_MESSAGE_OVERHEAD};
    use crate::fields::{
        fault_of, Fault, Fields, MessagesField, ModelFault, ModelsField, Role, Shallow,
        ShallowVisitor,
    };

    /// The visitor methods of the JSON kinds a visitor does not look into: each skips what it
    /// was given and answers `$v`.
    macro_rules! skip_others {
        ($v:expr => $($kind:ident)*) => { $( skip_others!(@$kind $v); )* };
        (@bool $v:expr) => {
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> { Ok($v) }
        };
        (@i64 $v:expr) => {
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> { Ok($v) }
        };
        (@u64 $v:expr) => {
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> { Ok($v) }
        };
        (@f64 $v:expr) => {
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> { Ok($v) }
        };
        (@str $v:expr) => {
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> { Ok($v) }
        };
        (@unit $v:expr) => {
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> { Ok($v) }
        };
        (@seq $v:expr) => {
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok($v)
            }
        };
        (@map $v:expr) => {
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok($v)
            }
        };
    }
    pub(crate) use skip_others;

    /// Where a counted text comes from: a top-level field that occurs twice counts by its last
    /// occurrence only, so each one's tokens are kept apart until the end.
    #[derive(Clone, Copy, PartialEq, Eq)]
    pub(super) enum Slot {
        Messages = 0,
        Prompt = 1,
        Input = 2,
        Instructions = 3,
        System = 4,
        Tools = 5,
        Functions = 6,
        ResponseFormat = 7,
        Text = 8,
    }

    /// The number of slots.
    const SLOTS: usize = 9;

    /// What the parse gathered: the view's fields and the tokens counted so far.
    pub(super) struct Gathered<'de, 'e> {
        estimator: &'e dyn TokenEstimator,
        model: Option<Cow<'de, str>>,
        /// Whether texts can be counted as they are read: the `model` key was seen, or the
        /// estimate does not depend on it. Texts before it wait for the model name.
        model_seen: bool,
        fallbacks: Option<Vec<Arc<str>>>,
        stream: bool,
        /// `max_completion_tokens`, `max_tokens`, `max_output_tokens`.
        max: [Option<u64>; 3],
        message_count: Option<usize>,
        /// `n`, `best_of`.
        choices: [Option<u64>; 2],
        tokens: [u64; SLOTS],
        /// Texts met before the model name, counted at the end.
        deferred: Vec<(Slot, Cow<'de, str>)>,
        /// The fields validation checks, when gathered in this pass.
        fields: Option<&'e mut Fields>,
        /// With `fields`: whether each chat message is checked.
        scan: bool,
    }

    impl<'de, 'e> Gathered<'de, 'e> {
        fn new(
            estimator: &'e dyn TokenEstimator,
            fields: Option<&'e mut Fields>,
            scan: bool,
        ) -> Self {
            Gathered {
                fields,
                scan,
                estimator,
                model: None,
                // An estimate that ignores the model need not wait for it.
                model_seen: !estimator.uses_model(),
                fallbacks: None,
                stream: false,
                max: [None; 3],
                message_count: None,
                choices: [None; 2],
                tokens: [0; SLOTS],
                deferred: Vec::new(),
            }
        }

        fn reset(&mut self, slot: Slot) {
            self.tokens[slot as usize] = 0;
            if !self.deferred.is_empty() {
                self.deferred.retain(|(s, _)| *s != slot);
            }
        }

        fn estimate(&self, text: &str) -> u64 {
            self.estimator
                .estimate(self.model.as_deref().unwrap_or(""), text)
        }

        /// Adds a fixed count (a media part) to `slot`.
        fn add(&mut self, slot: Slot, n: u64) {
            self.tokens[slot as usize] = self.tokens[slot as usize].saturating_add(n);
        }

        /// Counts a text borrowed from the body.
        fn count_borrowed(&mut self, slot: Slot, text: &'de str) {
            if self.model_seen {
                let n = self.estimate(text);
                self.tokens[slot as usize] = self.tokens[slot as usize].saturating_add(n);
            } else {
                self.deferred.push((slot, Cow::Borrowed(text)));
            }
        }

        /// Counts a text the parser unescaped into its scratch space.
        fn count_transient(&mut self, slot: Slot, text: &str) {
            if self.model_seen {
                let n = self.estimate(text);
                self.tokens[slot as usize] = self.tokens[slot as usize].saturating_add(n);
            } else {
                self.deferred.push((slot, Cow::Owned(text.to_owned())));
            }
        }

        pub(super) fn into_view(
            mut self,
            endpoint: Endpoint,
            estimator: &dyn TokenEstimator,
        ) -> RequestView {
            let model_name = self.model.as_deref().unwrap_or("");
            for (slot, text) in &self.deferred {
                let n = estimator.estimate(model_name, text);
                self.tokens[*slot as usize] = self.tokens[*slot as usize].saturating_add(n);
            }
            let overhead =
                PER_MESSAGE_OVERHEAD.saturating_mul(self.message_count.unwrap_or(0) as u64);
            let prompt_tokens = self
                .tokens
                .iter()
                .fold(overhead, |sum, n| sum.saturating_add(*n));
            let max_tokens = self.max.into_iter().flatten().next();
            let output_tokens = match (endpoint, max_tokens) {
                (Endpoint::Embeddings, _) => 0,
                (_, Some(max)) => max,
                (_, None) => estimator.default_output(model_name),
            };
            let [n, best_of] = self.choices;
            let best_of = best_of.filter(|_| endpoint == Endpoint::Completions);
            let choices = n.unwrap_or(1).max(best_of.unwrap_or(1)).max(1);
            let view = RequestView {
                endpoint,
                model: self.model.as_deref().map(Arc::from),
                deployment: None,
                fallback_models: self.fallbacks.unwrap_or_default().into_boxed_slice(),
                stream: self.stream,
                max_tokens,
                output_tokens,
                choices,
                message_count: self.message_count,
                prompt_tokens,
                body: None,
                body_len: None,
            };
            view
        }
    }

    /// The top-level object. Its value is `Err(kind)` for a document that is not an object.
    pub(super) struct Top<'e> {
        pub(super) estimator: &'e dyn TokenEstimator,
        /// Where to gather the fields validation checks too, if anywhere.
        pub(super) fields: Option<&'e mut Fields>,
        /// With `fields`: each chat message checked too.
        pub(super) scan: bool,
    }

    /// The top-level keys the view reads.
    enum TopKey {
        Model,
        Models,
        Stream,
        Max(usize),
        Choices(usize),
        Messages,
        Text(Slot),
        Schema(Slot),
        TextFormat,
        /// A field only validation reads: its index in [`Fields::param_mut`].
        Param(usize),
        Other,
    }

    impl<'de> de::Deserialize<'de> for TopKey {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = TopKey;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a key")
                }
                fn visit_str<E: de::Error>(self, key: &str) -> Result<TopKey, E> {
                    Ok(match key {
                        "model" => TopKey::Model,
                        "models" => TopKey::Models,
                        "stream" => TopKey::Stream,
                        "messages" => TopKey::Messages,
                        "max_completion_tokens" => TopKey::Max(0),
                        "max_tokens" => TopKey::Max(1),
                        "max_output_tokens" => TopKey::Max(2),
                        "prompt" => TopKey::Text(Slot::Prompt),
                        "input" => TopKey::Text(Slot::Input),
                        "instructions" => TopKey::Text(Slot::Instructions),
                        "system" => TopKey::Text(Slot::System),
                        "n" => TopKey::Choices(0),
                        "best_of" => TopKey::Choices(1),
                        "tools" => TopKey::Schema(Slot::Tools),
                        "functions" => TopKey::Schema(Slot::Functions),
                        "response_format" => TopKey::Schema(Slot::ResponseFormat),
                        "text" => TopKey::TextFormat,
                        "previous_response_id" => TopKey::Param(0),
                        "conversation" => TopKey::Param(1),
                        "temperature" => TopKey::Param(2),
                        "top_p" => TopKey::Param(3),
                        "presence_penalty" => TopKey::Param(4),
                        "frequency_penalty" => TopKey::Param(5),
                        _ => TopKey::Other,
                    })
                }
            }
            d.deserialize_str(V)
        }
    }

    impl<'de, 'e> Visitor<'de> for Top<'e> {
        type Value = Result<Gathered<'de, 'e>, &'static str>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut g = Gathered::new(self.estimator, self.fields, self.scan);
            while let Some(key) = map.next_key::<TopKey>()? {
                if g.fields.is_some() {
                    checked_value(&mut g, key, &mut map)?;
                } else {
                    value(&mut g, key, &mut map)?;
                }
            }
            Ok(Ok(g))
        }

        skip_others!(Err("a boolean") => bool);
        skip_others!(Err("a number") => i64 u64 f64);
        skip_others!(Err("a string") => str);
        skip_others!(Err("null") => unit);
        skip_others!(Err("an array") => seq);
    }

    /// The value of a top-level `key`, read for the view.
    fn value<'de, A: MapAccess<'de>>(
        g: &mut Gathered<'de, '_>,
        key: TopKey,
        map: &mut A,
    ) -> Result<(), A::Error> {
        match key {
            TopKey::Model => {
                g.model = map.next_value::<Str<'de>>()?.0;
                g.model_seen = true;
            }
            TopKey::Models => g.fallbacks = map.next_value::<StrList>()?.0,
            TopKey::Stream => g.stream = map.next_value::<Flag>()?.0.unwrap_or(false),
            TopKey::Max(i) => g.max[i] = map.next_value::<Count>()?.0,
            TopKey::Messages => {
                g.reset(Slot::Messages);
                g.message_count = map.next_value_seed(Messages(&mut *g))?;
            }
            TopKey::Text(slot) => {
                g.reset(slot);
                map.next_value_seed(Texts { g, slot })?;
            }
            TopKey::Choices(i) => g.choices[i] = map.next_value::<Count>()?.0,
            TopKey::Schema(slot) => {
                g.reset(slot);
                map.next_value_seed(Schema { g, slot })?;
            }
            TopKey::TextFormat => {
                g.reset(Slot::Text);
                map.next_value_seed(TextFormat(g))?;
            }
            TopKey::Param(_) | TopKey::Other => {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }

    /// The fields being gathered.
    fn fields<'a>(g: &'a mut Gathered<'_, '_>) -> &'a mut Fields {
        g.fields
            .as_deref_mut()
            .expect("gathering the checked fields")
    }

    /// The value of a top-level `key`, read for the view and for the fields validation checks
    /// (`g.fields` is set): one read of each value serves both.
    fn checked_value<'de, A: MapAccess<'de>>(
        g: &mut Gathered<'de, '_>,
        key: TopKey,
        map: &mut A,
    ) -> Result<(), A::Error> {
        match key {
            TopKey::Model => {
                let v = map.next_value::<Scalar<'de>>()?;
                g.model = v.text;
                g.model_seen = true;
                fields(g).model = Some(v.shallow);
            }
            TopKey::Models => {
                let ModelsBoth(list, field) = map.next_value::<ModelsBoth>()?;
                g.fallbacks = list;
                fields(g).models = Some(field);
            }
            TopKey::Stream => {
                let v = map.next_value::<Scalar<'de>>()?;
                g.stream = v.flag.unwrap_or(false);
                fields(g).stream = Some(v.shallow);
            }
            TopKey::Max(i) => {
                let v = map.next_value::<Scalar<'de>>()?;
                g.max[i] = v.count;
                let f = fields(g);
                let slot = match i {
                    0 => &mut f.max_completion_tokens,
                    1 => &mut f.max_tokens,
                    _ => &mut f.max_output_tokens,
                };
                *slot = Some(v.shallow);
            }
            TopKey::Choices(0) => {
                let v = map.next_value::<Scalar<'de>>()?;
                g.choices[0] = v.count;
                fields(g).n = Some(v.shallow);
            }
            TopKey::Messages => {
                g.reset(Slot::Messages);
                let (count, field) = map.next_value_seed(MessagesChecked(&mut *g))?;
                g.message_count = count;
                fields(g).messages = Some(field);
            }
            TopKey::Text(slot @ (Slot::Prompt | Slot::Input)) => {
                g.reset(slot);
                let kind = map.next_value_seed(TextsKind { g: &mut *g, slot })?;
                let f = fields(g);
                if slot == Slot::Prompt {
                    f.prompt = Some(kind);
                } else {
                    f.input = Some(kind);
                }
            }
            TopKey::Param(i) => {
                let v = map.next_value::<Shallow>()?;
                *fields(g).param_mut(i) = Some(v);
            }
            key => value(g, key, map)?,
        }
        Ok(())
    }

    /// A scalar read once for the view and the checks: its kind for the checks, and the
    /// string, boolean or non-negative integer it is for the view.
    struct Scalar<'de> {
        shallow: Shallow,
        text: Option<Cow<'de, str>>,
        flag: Option<bool>,
        count: Option<u64>,
    }

    impl Scalar<'_> {
        fn of(shallow: Shallow) -> Self {
            Scalar {
                shallow,
                text: None,
                flag: None,
                count: None,
            }
        }
    }

    impl<'de> de::Deserialize<'de> for Scalar<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Scalar<'de>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("any value")
                }
                fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Scalar<'de>, E> {
                    Ok(Scalar {
                        text: Some(Cow::Borrowed(s)),
                        ..Scalar::of(Shallow::Str {
                            empty: s.is_empty(),
                        })
                    })
                }
                fn visit_str<E: de::Error>(self, s: &str) -> Result<Scalar<'de>, E> {
                    Ok(Scalar {
                        text: Some(Cow::Owned(s.to_owned())),
                        ..Scalar::of(Shallow::Str {
                            empty: s.is_empty(),
                        })
                    })
                }
                fn visit_bool<E: de::Error>(self, b: bool) -> Result<Scalar<'de>, E> {
                    Ok(Scalar {
                        flag: Some(b),
                        ..Scalar::of(Shallow::Bool)
                    })
                }
                fn visit_u64<E: de::Error>(self, n: u64) -> Result<Scalar<'de>, E> {
                    Ok(Scalar {
                        count: Some(n),
                        ..Scalar::of(Shallow::Number(n.into()))
                    })
                }
                fn visit_i64<E: de::Error>(self, n: i64) -> Result<Scalar<'de>, E> {
                    ShallowVisitor.visit_i64(n).map(Scalar::of)
                }
                fn visit_f64<E: de::Error>(self, n: f64) -> Result<Scalar<'de>, E> {
                    ShallowVisitor.visit_f64(n).map(Scalar::of)
                }
                fn visit_unit<E: de::Error>(self) -> Result<Scalar<'de>, E> {
                    Ok(Scalar::of(Shallow::Null))
                }
                fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Scalar<'de>, A::Error> {
                    ShallowVisitor.visit_seq(seq).map(Scalar::of)
                }
                fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Scalar<'de>, A::Error> {
                    ShallowVisitor.visit_map(map).map(Scalar::of)
                }
            }
            d.deserialize_any(V)
        }
    }

    /// `models` read once: its strings for the view, its first item at fault for the checks.
    struct ModelsBoth(Option<Vec<Arc<str>>>, ModelsField);

    impl<'de> de::Deserialize<'de> for ModelsBoth {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl V {
                fn other(shallow: Shallow) -> ModelsBoth {
                    ModelsBoth(None, ModelsField::Other(shallow))
                }
            }
            impl<'de> Visitor<'de> for V {
                type Value = ModelsBoth;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("any value")
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ModelsBoth, A::Error> {
                    let (mut list, mut bad, mut i) = (Vec::new(), None, 0);
                    while let Some(item) = seq.next_element::<Scalar<'de>>()? {
                        let fault = match item.shallow {
                            Shallow::Str { empty: false } => None,
                            Shallow::Str { empty: true } => Some(ModelFault::Empty),
                            other => Some(ModelFault::NotString(other.kind())),
                        };
                        if bad.is_none() {
                            bad = fault.map(|f| (i, f));
                        }
                        if let Some(s) = item.text {
                            list.push(Arc::from(&*s));
                        }
                        i += 1;
                    }
                    Ok(ModelsBoth(Some(list), ModelsField::Array(bad)))
                }
                fn visit_bool<E: de::Error>(self, v: bool) -> Result<ModelsBoth, E> {
                    ShallowVisitor.visit_bool(v).map(V::other)
                }
                fn visit_i64<E: de::Error>(self, v: i64) -> Result<ModelsBoth, E> {
                    ShallowVisitor.visit_i64(v).map(V::other)
                }
                fn visit_u64<E: de::Error>(self, v: u64) -> Result<ModelsBoth, E> {
                    ShallowVisitor.visit_u64(v).map(V::other)
                }
                fn visit_f64<E: de::Error>(self, v: f64) -> Result<ModelsBoth, E> {
                    ShallowVisitor.visit_f64(v).map(V::other)
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<ModelsBoth, E> {
                    ShallowVisitor.visit_str(v).map(V::other)
                }
                fn visit_unit<E: de::Error>(self) -> Result<ModelsBoth, E> {
                    Ok(V::other(Shallow::Null))
                }
                fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ModelsBoth, A::Error> {
                    ShallowVisitor.visit_map(map).map(V::other)
                }
            }
            d.deserialize_any(V)
        }
    }

    /// `messages` read for the view and the checks: the number of messages, and the field as
    /// the checks see it (each message checked until the first at fault when `g.scan`).
    struct MessagesChecked<'g, 'de, 'e>(&'g mut Gathered<'de, 'e>);

    impl<'de> DeserializeSeed<'de> for MessagesChecked<'_, 'de, '_> {
        type Value = (Option<usize>, MessagesField);
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for MessagesChecked<'_, 'de, '_> {
        type Value = (Option<usize>, MessagesField);
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any value")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let (mut len, mut fault) = (0, None);
            let scan = self.0.scan;
            loop {
                if scan && fault.is_none() {
                    match seq.next_element_seed(MessageChecked(&mut *self.0))? {
                        None => break,
                        Some(Some(f)) => fault = Some((len, f)),
                        Some(None) => {}
                    }
                } else if seq.next_element_seed(Message(&mut *self.0))?.is_none() {
                    break;
                }
                len += 1;
            }
            Ok((Some(len), MessagesField::Array { len, fault }))
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
            Ok((None, MessagesField::Other(ShallowVisitor.visit_bool(v)?)))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok((None, MessagesField::Other(ShallowVisitor.visit_i64(v)?)))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok((None, MessagesField::Other(ShallowVisitor.visit_u64(v)?)))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            Ok((None, MessagesField::Other(ShallowVisitor.visit_f64(v)?)))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok((None, MessagesField::Other(ShallowVisitor.visit_str(v)?)))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok((None, MessagesField::Other(Shallow::Null)))
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            Ok((None, MessagesField::Other(ShallowVisitor.visit_map(map)?)))
        }
    }

    /// One message read for the view (as [`Message`]) and checked: the first thing wrong with
    /// it, if anything.
    struct MessageChecked<'g, 'de, 'e>(&'g mut Gathered<'de, 'e>);

    impl<'de> DeserializeSeed<'de> for MessageChecked<'_, 'de, '_> {
        type Value = Option<Fault>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<Fault>, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for MessageChecked<'_, 'de, '_> {
        type Value = Option<Fault>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any value")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<Fault>, A::Error> {
            // A key that occurs twice counts by its last occurrence for the checks.
            const KEYS: &[&str] = &[
                "content",
                "name",
                "tool_calls",
                "role",
                "tool_call_id",
                "function_call",
                "audio",
            ];
            let (mut role, mut content, mut tool_call_id) = (None, None, None);
            let mut calls = [false; 3];
            let g = self.0;
            while let Some(key) = map.next_key_seed(KeyIn(KEYS))? {
                match key {
                    Some(0) => {
                        content = Some(map.next_value_seed(TextsKind {
                            g: &mut *g,
                            slot: Slot::Messages,
                        })?)
                    }
                    Some(1) => map.next_value_seed(Texts {
                        g: &mut *g,
                        slot: Slot::Messages,
                    })?,
                    Some(2) => {
                        calls[0] = map.next_value_seed(Nested {
                            g: &mut *g,
                            path: &["function", "arguments"],
                        })?
                    }
                    Some(3) => role = Some(map.next_value::<Role>()?),
                    Some(4) => tool_call_id = Some(map.next_value::<Shallow>()?),
                    Some(i) => calls[i - 4] = !map.next_value::<Shallow>()?.is_null(),
                    None => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(fault_of(
                role,
                content,
                tool_call_id,
                calls.iter().any(|c| *c),
            ))
        }
        skip_others!(Some(Fault::NotObject("a boolean")) => bool);
        skip_others!(Some(Fault::NotObject("a number")) => i64 u64 f64);
        skip_others!(Some(Fault::NotObject("a string")) => str);
        skip_others!(Some(Fault::NotObject("null")) => unit);
        skip_others!(Some(Fault::NotObject("an array")) => seq);
    }

    /// A text field counted as [`Texts`] counts it, and its kind for the checks (a string
    /// counted to no tokens is an empty one: every character counts).
    struct TextsKind<'g, 'de, 'e> {
        g: &'g mut Gathered<'de, 'e>,
        slot: Slot,
    }

    impl<'de> DeserializeSeed<'de> for TextsKind<'_, 'de, '_> {
        type Value = Shallow;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Shallow, D::Error> {
            d.deserialize_newtype_struct(crate::json::COUNTED, self)
        }
    }

    impl<'de> Visitor<'de> for TextsKind<'_, 'de, '_> {
        type Value = Shallow;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any value")
        }
        fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Shallow, D::Error> {
            d.deserialize_any(self)
        }
        fn visit_u128<E: de::Error>(self, tokens: u128) -> Result<Shallow, E> {
            self.g
                .add(self.slot, u64::try_from(tokens).unwrap_or(u64::MAX));
            Ok(Shallow::Str { empty: tokens == 0 })
        }
        fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Shallow, E> {
            self.g.count_borrowed(self.slot, s);
            Ok(Shallow::Str {
                empty: s.is_empty(),
            })
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<Shallow, E> {
            self.g.count_transient(self.slot, s);
            Ok(Shallow::Str {
                empty: s.is_empty(),
            })
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Shallow, A::Error> {
            let mut empty = true;
            while seq
                .next_element_seed(Part {
                    g: &mut *self.g,
                    slot: self.slot,
                })?
                .is_some()
            {
                empty = false;
            }
            Ok(Shallow::Array { empty })
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Shallow, E> {
            ShallowVisitor.visit_bool(v)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Shallow, E> {
            ShallowVisitor.visit_i64(v)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Shallow, E> {
            ShallowVisitor.visit_u64(v)
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Shallow, E> {
            ShallowVisitor.visit_f64(v)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Shallow, E> {
            Ok(Shallow::Null)
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Shallow, A::Error> {
            ShallowVisitor.visit_map(map)
        }
    }

    /// A string value, borrowed when it has no escapes; `None` for any other kind.
    pub(crate) struct Str<'de>(pub(crate) Option<Cow<'de, str>>);

    impl<'de> de::Deserialize<'de> for Str<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Str<'de>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("any value")
                }
                fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Str<'de>, E> {
                    Ok(Str(Some(Cow::Borrowed(s))))
                }
                fn visit_str<E: de::Error>(self, s: &str) -> Result<Str<'de>, E> {
                    Ok(Str(Some(Cow::Owned(s.to_owned()))))
                }
                skip_others!(Str(None) => bool i64 u64 f64 unit seq map);
            }
            d.deserialize_any(V)
        }
    }

    /// The strings of an array (other items skipped); `None` when the value is no array.
    struct StrList(Option<Vec<Arc<str>>>);

    impl<'de> de::Deserialize<'de> for StrList {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = StrList;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("any value")
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StrList, A::Error> {
                    let mut list = Vec::new();
                    while let Some(item) = seq.next_element::<Str<'de>>()? {
                        if let Some(s) = item.0 {
                            list.push(Arc::from(&*s));
                        }
                    }
                    Ok(StrList(Some(list)))
                }
                skip_others!(StrList(None) => bool i64 u64 f64 str unit map);
            }
            d.deserialize_any(V)
        }
    }

    /// A boolean; `None` for any other kind.
    struct Flag(Option<bool>);

    impl<'de> de::Deserialize<'de> for Flag {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Flag;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("any value")
                }
                fn visit_bool<E: de::Error>(self, b: bool) -> Result<Flag, E> {
                    Ok(Flag(Some(b)))
                }
                skip_others!(Flag(None) => i64 u64 f64 str unit seq map);
            }
            d.deserialize_any(V)
        }
    }

    /// A non-negative integer; `None` for any other value (negative, fractional, not a number).
    struct Count(Option<u64>);

    impl<'de> de::Deserialize<'de> for Count {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Count;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("any value")
                }
                fn visit_u64<E: de::Error>(self, n: u64) -> Result<Count, E> {
                    Ok(Count(Some(n)))
                }
                skip_others!(Count(None) => bool i64 f64 str unit seq map);
            }
            d.deserialize_any(V)
        }
    }

    /// A map key looked up in a short list of names: its index, or `None`. Never allocates.
    struct KeyIn(&'static [&'static str]);

    impl<'de> DeserializeSeed<'de> for KeyIn {
        type Value = Option<usize>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
            d.deserialize_str(self)
        }
    }

    impl<'de> Visitor<'de> for KeyIn {
        type Value = Option<usize>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a key")
        }
        fn visit_str<E: de::Error>(self, key: &str) -> Result<Option<usize>, E> {
            Ok(self.0.iter().position(|name| *name == key))
        }
    }

    /// `messages`: counts the text of each message; the number of messages when it is an
    /// array.
    struct Messages<'g, 'de, 'e>(&'g mut Gathered<'de, 'e>);

    impl<'de> DeserializeSeed<'de> for Messages<'_, 'de, '_> {
        type Value = Option<usize>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Messages<'_, 'de, '_> {
        type Value = Option<usize>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any value")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<usize>, A::Error> {
            let mut n = 0;
            while seq.next_element_seed(Message(&mut *self.0))?.is_some() {
                n += 1;
            }
            Ok(Some(n))
        }
        skip_others!(None => bool i64 u64 f64 str unit map);
    }

    /// One message: its `content` and `name`, and the arguments of its `tool_calls`.
    struct Message<'g, 'de, 'e>(&'g mut Gathered<'de, 'e>);

    impl<'de> DeserializeSeed<'de> for Message<'_, 'de, '_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Message<'_, 'de, '_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any value")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while let Some(key) = map.next_key_seed(KeyIn(&["content", "name", "tool_calls"]))? {
                match key {
                    Some(0 | 1) => map.next_value_seed(Texts {
                        g: &mut *self.0,
                        slot: Slot::Messages,
                    })?,
                    Some(_) => {
                        map.next_value_seed(Nested {
                            g: &mut *self.0,
                            path: &["function", "arguments"],
                        })?;
                    }
                    None => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(())
        }
        skip_others!(() => bool i64 u64 f64 str unit seq);
    }

    /// `tool_calls`: each call's `function.arguments` (`path` left to walk in each call).
    struct Nested<'g, 'de, 'e> {
        g: &'g mut Gathered<'de, 'e>,
        path: &'static [&'static str],
    }

    /// Its value: whether the list was there (not `null`).
    impl<'de> DeserializeSeed<'de> for Nested<'_, 'de, '_> {
        type Value = bool;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Nested<'_, 'de, '_> {
        type Value = bool;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any value")
        }
        /// The list of calls.
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
            while seq
                .next_element_seed(Call {
                    g: &mut *self.g,
                    path: self.path,
                })?
                .is_some()
            {}
            Ok(true)
        }
        skip_others!(true => bool i64 u64 f64 str map);
        skip_others!(false => unit);
    }

    /// One object on the way to the arguments: follows `path`, then counts the text there.
    struct Call<'g, 'de, 'e> {
        g: &'g mut Gathered<'de, 'e>,
        path: &'static [&'static str],
    }

    impl<'de> DeserializeSeed<'de> for Call<'_, 'de, '_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            match self.path {
                [] => Texts {
                    g: self.g,
                    slot: Slot::Messages,
                }
                .deserialize(d),
                _ => d.deserialize_any(self),
            }
        }
    }

    impl<'de> Visitor<'de> for Call<'_, 'de, '_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any value")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let (name, rest) = self.path.split_first().expect("a path to follow");
            while let Some(key) = map.next_key_seed(KeyIn(std::slice::from_ref(name)))? {
                match key {
                    Some(_) => map.next_value_seed(Call {
                        g: &mut *self.g,
                        path: rest,
                    })?,
                    None => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(())
        }
        skip_others!(() => bool i64 u64 f64 str unit seq);
    }

    /// A seed over a text slot (a struct with `g: &mut Gathered` and `slot: Slot`) that asks
    /// for its strings counted: the crate's reader counts a string there itself and answers
    /// `visit_u128(tokens)`; any other reader hands the value on (`visit_newtype_struct`), and
    /// a string is counted through the estimator. `counted_text!()` inside the visitor's impl
    /// gives the visitor methods of the strings.
    macro_rules! counted_text {
        ($name:ident) => {
            impl<'de> DeserializeSeed<'de> for $name<'_, 'de, '_> {
                type Value = ();
                fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
                    d.deserialize_newtype_struct(crate::json::COUNTED, self)
                }
            }
        };
        () => {
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any value")
            }
            fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
                d.deserialize_any(self)
            }
            fn visit_u128<E: de::Error>(self, tokens: u128) -> Result<(), E> {
                self.g
                    .add(self.slot, u64::try_from(tokens).unwrap_or(u64::MAX));
                Ok(())
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<(), E> {
                self.g.count_borrowed(self.slot, s);
                Ok(())
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<(), E> {
                self.g.count_transient(self.slot, s);
                Ok(())
            }
        };
    }

    /// A text field: a string, or an array of strings and content parts (`text` and
    /// `content` of each part counted, recursively).
    struct Texts<'g, 'de, 'e> {
        g: &'g mut Gathered<'de, 'e>,
        slot: Slot,
    }

    counted_text!(Texts);

    impl<'de> Visitor<'de> for Texts<'_, 'de, '_> {
        type Value = ();
        counted_text!();
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while seq
                .next_element_seed(Part {
                    g: &mut *self.g,
                    slot: self.slot,
                })?
                .is_some()
            {}
            Ok(())
        }
        skip_others!(() => bool i64 u64 f64 unit map);
    }

    /// One item of a text array: a string, or a part whose `text` and `content` count.
    struct Part<'g, 'de, 'e> {
        g: &'g mut Gathered<'de, 'e>,
        slot: Slot,
    }

    counted_text!(Part);

    impl<'de> Visitor<'de> for Part<'_, 'de, '_> {
        type Value = ();
        counted_text!();
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let (mut kind, mut detail, mut url_detail) = (Media::None, None, None);
            while let Some(key) =
                map.next_key_seed(KeyIn(&["text", "content", "type", "image_url", "detail"]))?
            {
                match key {
                    Some(0 | 1) => map.next_value_seed(Texts {
                        g: &mut *self.g,
                        slot: self.slot,
                    })?,
                    Some(2) => kind = map.next_value::<Media>()?,
                    Some(3) => url_detail = map.next_value::<ImageUrl>()?.0,
                    Some(_) => detail = map.next_value::<Detail>()?.0,
                    None => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            let low = url_detail.or(detail).unwrap_or(false);
            let n = match kind {
                Media::None => 0,
                Media::OpenAiImage if low => super::IMAGE_LOW_TOKENS,
                Media::OpenAiImage => super::IMAGE_HIGH_TOKENS,
                Media::AnthropicImage => super::ANTHROPIC_IMAGE_TOKENS,
                Media::Audio => super::AUDIO_PART_TOKENS,
                Media::File => super::FILE_PART_TOKENS,
            };
            if n > 0 {
                self.g.add(self.slot, n);
            }
            Ok(())
        }
        skip_others!(() => bool i64 u64 f64 unit seq);
    }

    /// The kind of a content part, from its `type`.
    #[derive(Clone, Copy)]
    enum Media {
        /// Text or anything else: no fixed count.
        None,
        /// `image_url` (chat), `input_image` (Responses).
        OpenAiImage,
        /// `image` (Anthropic).
        AnthropicImage,
        /// `input_audio`, `audio`.
        Audio,
        /// `file`, `input_file`, `document`.
        File,
    }

    impl<'de> de::Deserialize<'de> for Media {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Media;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("any value")
                }
                fn visit_str<E: de::Error>(self, kind: &str) -> Result<Media, E> {
                    Ok(match kind {
                        "image_url" | "input_image" => Media::OpenAiImage,
                        "image" => Media::AnthropicImage,
                        "input_audio" | "audio" => Media::Audio,
                        "file" | "input_file" | "document" => Media::File,
                        _ => Media::None,
                    })
                }
                skip_others!(Media::None => bool i64 u64 f64 unit seq map);
            }
            d.deserialize_any(V)
        }
    }

    /// A `detail` value: `Some(true)` for `"low"`, `Some(false)` for any other string.
    struct Detail(Option<bool>);

    impl<'de> de::Deserialize<'de> for Detail {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Detail;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("any value")
                }
                fn visit_str<E: de::Error>(self, detail: &str) -> Result<Detail, E> {
                    Ok(Detail(Some(detail == "low")))
                }
                skip_others!(Detail(None) => bool i64 u64 f64 unit seq map);
            }
            d.deserialize_any(V)
        }
    }

    /// A chat part's `image_url`: the `detail` of the object (a string URL has none).
    struct ImageUrl(Option<bool>);

    impl<'de> de::Deserialize<'de> for ImageUrl {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = ImageUrl;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("any value")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ImageUrl, A::Error> {
                    let mut detail = None;
                    while let Some(key) = map.next_key_seed(KeyIn(&["detail"]))? {
                        match key {
                            Some(_) => detail = map.next_value::<Detail>()?.0,
                            None => {
                                map.next_value::<IgnoredAny>()?;
                            }
                        }
                    }
                    Ok(ImageUrl(detail))
                }
                skip_others!(ImageUrl(None) => bool i64 u64 f64 str unit seq);
            }
            d.deserialize_any(V)
        }
    }

    /// A schema (`tools`, `functions`, `response_format`, `text.format`): every string in it,
    /// object keys included, is counted as prompt text; numbers, booleans and nulls are not.
    struct Schema<'g, 'de, 'e> {
        g: &'g mut Gathered<'de, 'e>,
        slot: Slot,
    }

    counted_text!(Schema);

    impl<'de> Visitor<'de> for Schema<'_, 'de, '_> {
        type Value = ();
        counted_text!();
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while seq
                .next_element_seed(Schema {
                    g: &mut *self.g,
                    slot: self.slot,
                })?
                .is_some()
            {}
            Ok(())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while map
                .next_key_seed(SchemaKey {
                    g: &mut *self.g,
                    slot: self.slot,
                })?
                .is_some()
            {
                map.next_value_seed(Schema {
                    g: &mut *self.g,
                    slot: self.slot,
                })?;
            }
            Ok(())
        }
        skip_others!(() => bool i64 u64 f64 unit);
    }

    /// A key of an object in a schema, counted.
    struct SchemaKey<'g, 'de, 'e> {
        g: &'g mut Gathered<'de, 'e>,
        slot: Slot,
    }

    impl<'de> DeserializeSeed<'de> for SchemaKey<'_, 'de, '_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_str(self)
        }
    }

    impl<'de> Visitor<'de> for SchemaKey<'_, 'de, '_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a key")
        }
        fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<(), E> {
            self.g.count_borrowed(self.slot, s);
            Ok(())
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<(), E> {
            self.g.count_transient(self.slot, s);
            Ok(())
        }
    }

    /// The Responses API's `text`: its `format` counted as a schema.
    struct TextFormat<'g, 'de, 'e>(&'g mut Gathered<'de, 'e>);

    impl<'de> DeserializeSeed<'de> for TextFormat<'_, 'de, '_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for TextFormat<'_, 'de, '_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any value")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while let Some(key) = map.next_key_seed(KeyIn(&["format"]))? {
                match key {
                    Some(_) => map.next_value_seed(Schema {
                        g: &mut *self.0,
                        slot: Slot::Text,
                    })?,
                    None => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(())
        }
        skip_others!(() => bool i64 u64 f64 str unit seq);
    }
}

/// Why [`EnsureView`] could not produce a view.
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
        checks: Option<bool>,
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
                checks: None,
            };
        }
        EnsureView {
            state: EnsureState::Buffering {
                buf: BufferRequest::new(req, limit),
            },
            estimator: Some(estimator),
            checks: None,
        }
    }

    /// Gathers the fields validation checks in the view's pass over the body (each chat
    /// message checked too when `scan_messages`), handed back by
    /// [`EnsureView::poll_checked`]: the body is then read once for the view and the checks.
    pub(crate) fn with_fields(mut self, scan_messages: bool) -> Self {
        self.checks = Some(scan_messages);
        self
    }
}

impl<B> EnsureView<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    /// Polls as the future does, and hands back the fields validation checks when they were
    /// asked for ([`EnsureView::with_fields`]) and this future parsed the body: `None` when
    /// the view was there before or the body was empty.
    #[allow(clippy::type_complexity)]
    pub(crate) fn poll_checked(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<
        Result<(Request<LayerBody<B>>, Option<crate::fields::Fields>), ViewFailure<B>>,
    > {
        let this = self.project();
        match this.state.project() {
            EnsureProj::Ready { req } => std::task::Poll::Ready(Ok((
                req.take().expect("EnsureView polled after completion"),
                None,
            ))),
            EnsureProj::Buffering { buf } => {
                let (mut parts, bytes) = match std::task::ready!(std::future::Future::poll(buf, cx))
                {
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
                let mut fields = None;
                if !bytes.is_empty() {
                    let endpoint = Endpoint::from_path(parts.uri.path());
                    let estimator = this.estimator.take().expect("estimator kept until parsed");
                    match RequestView::parse_checked(endpoint, &bytes, &*estimator, *this.checks) {
                        Ok((mut view, checked)) => {
                            view.body = Some(bytes.clone());
                            parts.extensions.insert(view.with_path(parts.uri.path()));
                            fields = checked;
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
                std::task::Poll::Ready(Ok((BufferRequest::<B>::rebuild(parts, bytes), fields)))
            }
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
        self.poll_checked(cx).map_ok(|(req, _)| req)
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

    #[test]
    fn the_byte_count_agrees_with_counting_characters() {
        let by_chars = |text: &str| {
            let cjk = text.chars().filter(|c| is_cjk(*c)).count() as u64;
            cjk + (text.chars().count() as u64 - cjk).div_ceil(4)
        };
        let mut rng = fastrand::Rng::with_seed(5);
        let alphabet = [
            'a', ' ', 'é', 'ß', '你', 'ア', '한', 'Ａ', '€', '𠀀', '😀', 'ᄀ', '\u{2e80}',
            '\u{ffef}', '\u{fff0}',
        ];
        for _ in 0..20_000 {
            let text: String = (0..rng.usize(0..40))
                .map(|_| alphabet[rng.usize(..alphabet.len())])
                .collect();
            assert_eq!(
                CharEstimator.estimate("", &text),
                by_chars(&text),
                "{text:?}"
            );
        }
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

#[cfg(test)]
mod typed_tests {
    //! The typed parse against the parse it replaced: a `serde_json::Value` tree walked field
    //! by field, kept here as the reference.

    use super::*;
    use serde_json::{json, Value};

    /// What the view held when it parsed a `Value`: model, fallbacks, stream, max tokens,
    /// message count, prompt tokens.
    type Reference = (
        Option<String>,
        Vec<String>,
        bool,
        Option<u64>,
        Option<usize>,
        u64,
        u64,
    );

    fn reference(json: &Value, estimator: &dyn TokenEstimator) -> Reference {
        fn count_text(v: Option<&Value>, count: &mut impl FnMut(&str), media: &mut u64) {
            match v {
                Some(Value::String(s)) => count(s),
                Some(Value::Array(items)) => {
                    for item in items {
                        match item {
                            Value::String(s) => count(s),
                            Value::Object(o) => {
                                count_text(o.get("text"), count, media);
                                count_text(o.get("content"), count, media);
                                let in_url = o
                                    .get("image_url")
                                    .and_then(|u| u.get("detail"))
                                    .and_then(Value::as_str);
                                let on_part = o.get("detail").and_then(Value::as_str);
                                let low = in_url.or(on_part) == Some("low");
                                *media += match o.get("type").and_then(Value::as_str) {
                                    Some("image_url" | "input_image") if low => IMAGE_LOW_TOKENS,
                                    Some("image_url" | "input_image") => IMAGE_HIGH_TOKENS,
                                    Some("image") => ANTHROPIC_IMAGE_TOKENS,
                                    Some("input_audio" | "audio") => AUDIO_PART_TOKENS,
                                    Some("file" | "input_file" | "document") => FILE_PART_TOKENS,
                                    _ => 0,
                                };
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        fn count_schema(v: &Value, count: &mut impl FnMut(&str)) {
            match v {
                Value::String(s) => count(s),
                Value::Array(items) => items.iter().for_each(|i| count_schema(i, count)),
                Value::Object(o) => {
                    for (k, v) in o {
                        count(k);
                        count_schema(v, count);
                    }
                }
                _ => {}
            }
        }
        let obj = json.as_object().unwrap();
        let model = obj.get("model").and_then(Value::as_str);
        let fallbacks = obj
            .get("models")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect();
        let stream = obj.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let messages = obj.get("messages").and_then(Value::as_array);
        let max = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
            .iter()
            .find_map(|k| obj.get(*k).and_then(Value::as_u64));
        let model_name = model.unwrap_or("");
        let mut tokens = 0u64;
        let mut media = 0u64;
        let mut count = |text: &str| tokens += estimator.estimate(model_name, text);
        for m in messages.into_iter().flatten().filter_map(Value::as_object) {
            for (key, value) in m {
                match key.as_str() {
                    "content" | "name" => count_text(Some(value), &mut count, &mut media),
                    "tool_calls" => {
                        for c in value.as_array().into_iter().flatten() {
                            count_text(c.pointer("/function/arguments"), &mut count, &mut media);
                        }
                    }
                    _ => {}
                }
            }
        }
        for key in ["prompt", "input", "instructions", "system"] {
            count_text(obj.get(key), &mut count, &mut media);
        }
        for key in ["tools", "functions", "response_format"] {
            if let Some(v) = obj.get(key) {
                count_schema(v, &mut count);
            }
        }
        if let Some(format) = obj.get("text").and_then(|t| t.get("format")) {
            count_schema(format, &mut count);
        }
        let count = messages.map(Vec::len);
        tokens += media + PER_MESSAGE_OVERHEAD * count.unwrap_or(0) as u64;
        let n = obj.get("n").and_then(Value::as_u64).unwrap_or(1).max(1);
        let output = max.unwrap_or_else(|| estimator.default_output(model_name));
        (
            model.map(str::to_owned),
            fallbacks,
            stream,
            max,
            count,
            tokens,
            tokens + output * n,
        )
    }

    fn typed(view: &RequestView) -> Reference {
        (
            view.model().map(str::to_owned),
            view.fallback_models()
                .iter()
                .map(|m| m.to_string())
                .collect(),
            view.stream(),
            view.max_tokens(),
            view.message_count(),
            view.prompt_tokens(),
            view.token_cost(),
        )
    }

    /// A random value of the shapes LLM requests have, `depth` levels deep at most.
    fn value(rng: &mut fastrand::Rng, depth: u32) -> Value {
        const KEYS: [&str; 17] = [
            "model",
            "models",
            "content",
            "name",
            "text",
            "tool_calls",
            "function",
            "arguments",
            "role",
            "stream",
            "max_tokens",
            "x",
            "input",
            "type",
            "image_url",
            "detail",
            "format",
        ];
        const WORDS: [&str; 13] = [
            "gpt-4o",
            "",
            "hi there",
            "你好世界",
            "a\"b\\n\tc",
            "é",
            "user",
            "image_url",
            "input_image",
            "low",
            "image",
            "input_audio",
            "document",
        ];
        match rng.u32(0..if depth == 0 { 6 } else { 8 }) {
            0 => Value::Null,
            1 => Value::Bool(rng.bool()),
            2 => json!(rng.i64(-5..100_000)),
            3 => json!(rng.f64() * 10.0 - 2.0),
            4 | 5 => json!(WORDS[rng.usize(..WORDS.len())].repeat(rng.usize(1..4))),
            6 => Value::Array(
                (0..rng.usize(0..4))
                    .map(|_| value(rng, depth - 1))
                    .collect(),
            ),
            _ => Value::Object(
                (0..rng.usize(0..5))
                    .map(|_| {
                        (
                            KEYS[rng.usize(..KEYS.len())].to_owned(),
                            value(rng, depth - 1),
                        )
                    })
                    .collect(),
            ),
        }
    }

    fn document(rng: &mut fastrand::Rng) -> Value {
        const TOP: [&str; 19] = [
            "model",
            "models",
            "stream",
            "messages",
            "max_completion_tokens",
            "max_tokens",
            "max_output_tokens",
            "prompt",
            "input",
            "instructions",
            "system",
            "temperature",
            "tools",
            "metadata",
            "n",
            "functions",
            "response_format",
            "text",
            "best_of",
        ];
        let mut obj = serde_json::Map::new();
        for _ in 0..rng.usize(0..10) {
            let key = TOP[rng.usize(..TOP.len())];
            let v = match key {
                "messages" => Value::Array(
                    (0..rng.usize(0..5))
                        .map(|_| {
                            let mut m = value(rng, 3);
                            if rng.bool() {
                                m = json!({"role": "assistant", "content": value(rng, 2),
                                    "tool_calls": [{"function": {"arguments": value(rng, 2)}}]});
                            }
                            m
                        })
                        .collect(),
                ),
                _ => value(rng, 3),
            };
            obj.insert(key.to_owned(), v);
        }
        Value::Object(obj)
    }

    #[test]
    fn the_typed_parse_gives_what_the_value_walk_gave() {
        let mut rng = fastrand::Rng::with_seed(12);
        // An estimator that tells the model apart, so deferred texts must be counted with the
        // right name.
        let by_model = |model: &str, text: &str| (model.len() as u64 + 1) * text.len() as u64;
        for i in 0..5_000 {
            let doc = document(&mut rng);
            let bytes = if rng.bool() {
                serde_json::to_vec(&doc).unwrap()
            } else {
                serde_json::to_vec_pretty(&doc).unwrap()
            };
            for est in [&CharEstimator as &dyn TokenEstimator, &by_model] {
                // The fast reader reads it (no fallback to serde_json on valid documents).
                let text = std::str::from_utf8(&bytes).unwrap();
                assert!(
                    crate::json::visit_str(
                        text,
                        est.counts_characters(),
                        typed::Top {
                            estimator: est,
                            fields: None,
                            scan: false,
                        }
                    )
                    .is_ok(),
                    "case {i}: the fast reader refused {doc}"
                );
                let view = RequestView::parse(Endpoint::ChatCompletions, &bytes, est).unwrap();
                assert_eq!(typed(&view), reference(&doc, est), "case {i}: {doc}");
                assert_eq!(view.body_len(), Some(bytes.len()));
            }
        }
    }

    /// A document with the fields validation reads: parameters of every kind and chat messages
    /// with and without faults.
    fn checked_document(rng: &mut fastrand::Rng) -> Value {
        const PARAMS: [&str; 12] = [
            "temperature",
            "top_p",
            "presence_penalty",
            "frequency_penalty",
            "previous_response_id",
            "conversation",
            "n",
            "max_tokens",
            "stream",
            "model",
            "models",
            "prompt",
        ];
        const ROLES: [&str; 6] = ["user", "assistant", "tool", "system", "bot", ""];
        let mut doc = document(rng);
        let obj = doc.as_object_mut().expect("an object");
        for _ in 0..rng.usize(0..5) {
            obj.insert(PARAMS[rng.usize(..PARAMS.len())].to_owned(), value(rng, 2));
        }
        if rng.bool() {
            let messages = (0..rng.usize(0..6))
                .map(|_| {
                    let mut m = serde_json::Map::new();
                    for _ in 0..rng.usize(0..5) {
                        let (k, v) = match rng.u32(0..8) {
                            0 | 1 => ("role", json!(ROLES[rng.usize(..ROLES.len())])),
                            2 => ("role", value(rng, 1)),
                            3 | 4 => ("content", value(rng, 2)),
                            5 => ("tool_call_id", value(rng, 1)),
                            6 => (
                                ["tool_calls", "function_call", "audio"][rng.usize(..3)],
                                value(rng, 2),
                            ),
                            _ => ("name", value(rng, 1)),
                        };
                        m.insert(k.to_owned(), v);
                    }
                    if rng.u32(0..8) == 0 {
                        value(rng, 1)
                    } else {
                        Value::Object(m)
                    }
                })
                .collect();
            obj.insert("messages".to_owned(), Value::Array(messages));
        }
        doc
    }

    /// The fields validation reads, off a `Value` tree (`None` for no object): the reference
    /// the typed pass is checked against.
    fn reference_fields(doc: &Value, scan: bool) -> Option<crate::fields::Fields> {
        use crate::fields::{
            fault_of, Fields, MessagesField, ModelFault, ModelsField, Role, Shallow,
        };
        fn shallow(v: &Value) -> Shallow {
            match v {
                Value::Null => Shallow::Null,
                Value::Bool(_) => Shallow::Bool,
                Value::Number(n) => Shallow::Number(n.clone()),
                Value::String(s) => Shallow::Str {
                    empty: s.is_empty(),
                },
                Value::Array(a) => Shallow::Array {
                    empty: a.is_empty(),
                },
                Value::Object(_) => Shallow::Object,
            }
        }
        fn message(m: &Value) -> Option<crate::fields::Fault> {
            let Value::Object(m) = m else {
                return Some(crate::fields::Fault::NotObject(shallow(m).kind()));
            };
            let role = m.get("role").map(|r| match r {
                Value::String(s) => Role::of(s),
                Value::Null => Role::Null,
                other => Role::Other(shallow(other).kind()),
            });
            let calls = ["tool_calls", "function_call", "audio"]
                .iter()
                .any(|k| m.get(*k).is_some_and(|v| !v.is_null()));
            fault_of(
                role,
                m.get("content").map(shallow),
                m.get("tool_call_id").map(shallow),
                calls,
            )
        }
        let obj = doc.as_object()?;
        let get = |k: &str| obj.get(k).map(shallow);
        Some(Fields {
            model: get("model"),
            messages: obj.get("messages").map(|m| match m {
                Value::Array(items) => MessagesField::Array {
                    len: items.len(),
                    fault: if scan {
                        items
                            .iter()
                            .enumerate()
                            .find_map(|(i, m)| message(m).map(|f| (i, f)))
                    } else {
                        None
                    },
                },
                other => MessagesField::Other(shallow(other)),
            }),
            prompt: get("prompt"),
            input: get("input"),
            previous_response_id: get("previous_response_id"),
            conversation: get("conversation"),
            temperature: get("temperature"),
            top_p: get("top_p"),
            presence_penalty: get("presence_penalty"),
            frequency_penalty: get("frequency_penalty"),
            n: get("n"),
            max_tokens: get("max_tokens"),
            max_completion_tokens: get("max_completion_tokens"),
            max_output_tokens: get("max_output_tokens"),
            stream: get("stream"),
            models: obj.get("models").map(|m| match m {
                Value::Array(items) => {
                    ModelsField::Array(items.iter().enumerate().find_map(|(i, item)| match item {
                        Value::String(s) if !s.is_empty() => None,
                        Value::String(_) => Some((i, ModelFault::Empty)),
                        other => Some((i, ModelFault::NotString(shallow(other).kind()))),
                    }))
                }
                other => ModelsField::Other(shallow(other)),
            }),
        })
    }

    #[test]
    fn the_fields_gathered_in_the_views_pass_are_the_fields_parse_gives() {
        let mut rng = fastrand::Rng::with_seed(56);
        let by_model = |model: &str, text: &str| (model.len() as u64 + 1) * text.len() as u64;
        let mut faults = 0;
        for i in 0..5_000 {
            let doc = checked_document(&mut rng);
            let mut bytes = serde_json::to_vec(&doc).unwrap();
            // Every fourth document broken by one byte: both parses fail, or both agree.
            if i % 4 == 3 {
                let at = rng.usize(..bytes.len());
                let noise = b"{}[]\",:0-e.tfn\\ ax";
                bytes[at] = noise[rng.usize(..noise.len())];
            }
            for est in [&CharEstimator as &dyn TokenEstimator, &by_model] {
                for (endpoint, scan) in [
                    (Endpoint::ChatCompletions, true),
                    (Endpoint::ChatCompletions, false),
                    (Endpoint::Responses, true),
                ] {
                    let plain = RequestView::parse(endpoint, &bytes, est);
                    let checked = RequestView::parse_checked(endpoint, &bytes, est, Some(scan));
                    // The reference: the same fields read off a `serde_json::Value` tree.
                    let tree = serde_json::from_slice::<Value>(&bytes);
                    let reference = tree.as_ref().ok().and_then(|v| {
                        reference_fields(v, scan && endpoint == Endpoint::ChatCompletions)
                    });
                    match (plain, checked, reference) {
                        (Ok(plain), Ok((checked, fields)), Some(reference)) => {
                            // The view is the same view, and the fields the same fields.
                            assert_eq!(typed(&checked), typed(&plain), "case {i}: {doc}");
                            let fields = fields.expect("gathered");
                            if let Some(crate::fields::MessagesField::Array {
                                fault: Some(_),
                                ..
                            }) = &reference.messages
                            {
                                faults += 1;
                            }
                            assert_eq!(fields, reference, "case {i}: {doc}");
                            let alone = crate::fields::Fields::parse(
                                &bytes,
                                scan && endpoint == Endpoint::ChatCompletions,
                            );
                            assert_eq!(alone, Ok(Some(fields)), "case {i}: {doc}");
                        }
                        // Broken where the view reads: the view's error, as before.
                        (Err(a), Err(b), _) => {
                            assert_eq!(a, b, "case {i}");
                            assert!(tree.map_or(true, |v| !v.is_object()), "case {i}");
                        }
                        // Broken only where the checks read (a number beyond `f64` in
                        // `temperature`): not JSON for serde_json either.
                        (Ok(_), Err(_), None) => assert!(tree.is_err(), "case {i}"),
                        // A number beyond `f64` deep in a value both skip: serde_json's tree
                        // refuses it, the typed passes do not look.
                        (Ok(plain), Ok((checked, _)), None) => {
                            assert!(tree.is_err(), "case {i}");
                            assert_eq!(typed(&checked), typed(&plain), "case {i}");
                        }
                        (a, b, c) => panic!(
                            "case {i}: {:?} {:?} {:?} {}",
                            a.is_ok(),
                            b.is_ok(),
                            c.is_some(),
                            String::from_utf8_lossy(&bytes)
                        ),
                    }
                }
            }
            let (_, none) =
                RequestView::parse_checked(Endpoint::ChatCompletions, b"{}", &CharEstimator, None)
                    .unwrap();
            assert!(none.is_none());
        }
        assert!(faults > 500, "messages at fault: {faults}");
    }

    #[test]
    fn broken_documents_fail_as_a_value_parse_does() {
        let mut rng = fastrand::Rng::with_seed(34);
        let noise = b"{}[]\",:0-e.tfn\\ ax\x7f";
        for i in 0..20_000 {
            let mut bytes = serde_json::to_vec(&document(&mut rng)).unwrap();
            for _ in 0..rng.usize(1..3) {
                let at = rng.usize(..bytes.len());
                match rng.u8(0..3) {
                    0 => bytes[at] = noise[rng.usize(..noise.len())],
                    1 => {
                        bytes.remove(at);
                    }
                    _ => bytes.truncate(at),
                }
                if bytes.is_empty() {
                    break;
                }
            }
            let typed = RequestView::parse(Endpoint::ChatCompletions, &bytes, &CharEstimator);
            let value: Result<Value, _> = serde_json::from_slice(&bytes);
            match (typed, value) {
                (Ok(_), Ok(v)) => assert!(v.is_object(), "case {i}"),
                (Err(e), Ok(v)) => {
                    assert!(!v.is_object(), "case {i}: {e}");
                    assert_eq!(e.line(), 0);
                }
                // The one documented difference: a number beyond `f64` in a skipped value.
                (Ok(_), Err(e)) => assert!(
                    e.to_string().starts_with("number out of range"),
                    "case {i}: accepted, a Value parse says {e}"
                ),
                (Err(t), Err(v)) => {
                    assert_eq!(
                        (t.line(), t.column()),
                        (v.line(), v.column()),
                        "case {i}: {t} / {v} in {}",
                        String::from_utf8_lossy(&bytes)
                    );
                    assert_eq!(t, syntax_error(v), "case {i}");
                }
            }
        }
    }

    #[test]
    fn non_utf8_and_non_objects_are_refused_with_their_position() {
        let e = RequestView::parse(
            Endpoint::ChatCompletions,
            b"{\"model\":\"gpt-4o\",\n\"x\":\"\xff\"}",
            &CharEstimator,
        )
        .unwrap_err();
        assert_eq!(e.line(), 2, "{e}");
        assert!(e.message().contains("invalid unicode code point"), "{e}");
        for (body, kind) in [
            (&b"null"[..], "null"),
            (b" true ", "a boolean"),
            (b"-1.5", "a number"),
            (b"\"x\"", "a string"),
            (b"[{\"model\":1}]", "an array"),
        ] {
            let e =
                RequestView::parse(Endpoint::ChatCompletions, body, &CharEstimator).unwrap_err();
            assert_eq!(
                e.message(),
                format!("The request body must be a JSON object, not {kind}.")
            );
        }
        let e = RequestView::parse(Endpoint::ChatCompletions, b"{} x", &CharEstimator).unwrap_err();
        assert!(e.message().contains("trailing characters"), "{e}");
    }

    #[test]
    fn a_key_that_occurs_twice_counts_by_its_last_occurrence() {
        let body = br#"{"messages":[{"content":"aaaaaaaa"}],"model":"m","stream":true,
            "messages":[{"content":"aaaa"}],"stream":false,"model":"gpt-4o","max_tokens":9}"#;
        let view = RequestView::parse(Endpoint::ChatCompletions, body, &CharEstimator).unwrap();
        assert_eq!(view.model(), Some("gpt-4o"));
        assert!(!view.stream());
        assert_eq!(view.message_count(), Some(1));
        assert_eq!(view.prompt_tokens(), 1 + PER_MESSAGE_OVERHEAD);
    }

    #[test]
    fn parse_bytes_keeps_the_buffer_and_debug_hides_it() {
        let body = Bytes::from_static(br#"{"model":"gpt-4o","metadata":{"secret":"s3cr3t"}}"#);
        let view =
            RequestView::parse_bytes(Endpoint::ChatCompletions, body.clone(), &CharEstimator)
                .unwrap();
        assert_eq!(view.bytes().unwrap().as_ptr(), body.as_ptr(), "no copy");
        assert!(
            RequestView::parse(Endpoint::ChatCompletions, &body, &CharEstimator)
                .unwrap()
                .bytes()
                .is_none()
        );
        let debug = format!("{view:?}");
        assert!(!debug.contains("s3cr3t"), "{debug}");
        assert!(debug.contains("gpt-4o"), "{debug}");
    }
}
