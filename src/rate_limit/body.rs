//! The response body wrapper: holds the concurrency slot until the body ends or is dropped, and
//! watches the body for `usage` to correct the token charge.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use std::marker::PhantomData;

use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::body::LayerBody;

use super::shared::{InflightGuard, TokenCharge, MAX_USAGE};

/// The most bytes of a non-streaming JSON body copied aside to read its `usage` at the end; a
/// larger body keeps its admission charge.
const JSON_KEEP: usize = 1 << 20;
/// The longest stream line examined (SSE or NDJSON); longer lines are skipped.
const LINE: usize = 64 << 10;

pin_project! {
    /// The response body of [`RateLimit`](super::RateLimit): the inner service's body, passed
    /// through frame by frame, or the bytes of the layer's own answer (a `429` envelope), plus
    /// what the request holds until the body is done.
    ///
    /// It asks nothing of the inner body type but [`Body`]: the layer's own answers are a
    /// [`LayerBody`] of bytes, so the inner body needs no `From<Bytes>`.
    pub struct RateLimitBody<B> {
        #[pin]
        inner: LayerBody<B>,
        guard: Option<InflightGuard>,
        meter: Option<Box<Meter>>,
    }
}

impl<B> RateLimitBody<B> {
    pub(crate) fn new(inner: B, guard: Option<InflightGuard>, meter: Option<Box<Meter>>) -> Self {
        RateLimitBody {
            inner: LayerBody::new(inner),
            guard,
            meter,
        }
    }

    /// The inner service's body; `None` for an answer the layer produced itself.
    pub fn get_ref(&self) -> Option<&B> {
        match &self.inner {
            LayerBody::Inner { body } => Some(body),
            LayerBody::Full { .. } => None,
        }
    }

    /// Whether this is an answer the layer produced itself (a refusal) rather than the inner
    /// service's body.
    pub fn is_produced(&self) -> bool {
        self.inner.is_produced()
    }

    /// Whether the body still holds a concurrency slot.
    pub fn holds_permit(&self) -> bool {
        self.guard.is_some()
    }
}

impl<B> From<Bytes> for RateLimitBody<B> {
    fn from(bytes: Bytes) -> Self {
        RateLimitBody {
            inner: LayerBody::full(bytes),
            guard: None,
            meter: None,
        }
    }
}

impl<B: Body<Data = Bytes>> Body for RateLimitBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let (Some(m), Some(data)) = (this.meter.as_mut(), f.data_ref()) {
                    m.feed(data);
                }
                // A body that knows it is done may not be polled again.
                if this.inner.is_end_stream() {
                    if let Some(mut m) = this.meter.take() {
                        m.finish();
                    }
                    *this.guard = None;
                }
            }
            // Cut midway: the upstream was at work.
            Some(Err(_)) => drop(this.meter.take()),
            None => {
                if let Some(mut m) = this.meter.take() {
                    m.finish();
                }
                *this.guard = None;
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> std::fmt::Debug for RateLimitBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitBody")
            .field("holds_permit", &self.guard.is_some())
            .field("metered", &self.meter.is_some())
            .finish_non_exhaustive()
    }
}

/// Reads the token usage an answer reports, in any dialect, and settles the charge.
pub(crate) struct Meter {
    charge: TokenCharge,
    kind: Kind,
    usage: Usage,
    settled: bool,
}

/// The frames of a JSON body: the first one held inline, so the usual answer of one frame
/// costs no allocation.
#[derive(Default)]
struct Frames {
    first: Option<Bytes>,
    rest: Vec<Bytes>,
}

impl Frames {
    fn push(&mut self, b: Bytes) {
        if self.first.is_none() {
            self.first = Some(b);
        } else {
            self.rest.push(b);
        }
    }

    fn clear(&mut self) {
        self.first = None;
        self.rest.clear();
    }
}

enum Kind {
    /// A JSON body (or a JSON array of chunks, Gemini's `streamGenerateContent`): its frames,
    /// kept by reference (no copy) until the end.
    Json { frames: Frames, size: usize },
    /// A line-delimited stream: SSE (`data:` lines) or NDJSON (Ollama's native API). Complete
    /// lines are read in place; only a line cut by a frame boundary is kept, in `carry`.
    Lines {
        sse: bool,
        carry: Vec<u8>,
        /// The current line is not read (too long, not a `data:` line, or a gap in the data).
        skipping: bool,
    },
    /// A body too large to read: the charge stays.
    Skipped,
}

/// The usage an answer reported, merged over its frames: each figure's last report wins
/// (stream figures are cumulative), none is summed across frames.
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
struct Usage {
    total: Option<u64>,
    input: Option<u64>,
    cache_write: Option<u64>,
    cache_read: Option<u64>,
    output: Option<u64>,
    /// Gemini's `thoughtsTokenCount` + `toolUsePromptTokenCount` (not in its candidates).
    extra: Option<u64>,
}

fn set(slot: &mut Option<u64>, v: Count) {
    if let Some(x) = v.0 {
        *slot = Some(x);
    }
}

impl Usage {
    fn tokens(&self) -> Option<u64> {
        if self.total.is_some() {
            return self.total;
        }
        let parts = [
            self.input,
            self.cache_write,
            self.cache_read,
            self.output,
            self.extra,
        ];
        if parts.iter().all(Option::is_none) {
            return None;
        }
        Some(
            parts
                .iter()
                .fold(0u64, |a, p| a.saturating_add(p.unwrap_or(0)))
                .min(MAX_USAGE),
        )
    }

    fn fields(&mut self, f: &Fields) {
        set(&mut self.total, f.total_tokens);
        set(&mut self.input, f.prompt_tokens.or(f.input_tokens));
        set(&mut self.output, f.completion_tokens.or(f.output_tokens));
        set(&mut self.cache_write, f.cache_creation_input_tokens);
        set(&mut self.cache_read, f.cache_read_input_tokens);
    }

    fn report(&mut self, f: &Report) {
        if let Some(u) = &f.usage.0 {
            self.fields(u);
        }
        for nested in [&f.message.0, &f.response.0].into_iter().flatten() {
            if let Some(u) = &nested.usage.0 {
                self.fields(u);
            }
        }
        if let Some(g) = &f.usage_metadata.0 {
            set(&mut self.total, g.total);
            set(&mut self.input, g.prompt);
            set(&mut self.output, g.candidates);
            if g.thoughts.0.is_some() || g.tool_prompt.0.is_some() {
                let extra = g.thoughts.0.unwrap_or(0) + g.tool_prompt.0.unwrap_or(0);
                self.extra = Some(extra.min(MAX_USAGE));
            }
        }
        set(&mut self.input, f.prompt_eval_count);
        set(&mut self.output, f.eval_count);
    }

    /// Reads one JSON document (an object, or an array of objects) into the usage. A document
    /// that does not parse reports nothing.
    fn read(&mut self, json: &[u8]) {
        if let Ok(Doc(u)) = crate::json::from_slice::<Doc>(json) {
            // Figures of one document overwrite the earlier ones, field by field.
            for (slot, v) in [
                (&mut self.total, u.total),
                (&mut self.input, u.input),
                (&mut self.cache_write, u.cache_write),
                (&mut self.cache_read, u.cache_read),
                (&mut self.output, u.output),
                (&mut self.extra, u.extra),
            ] {
                if v.is_some() {
                    *slot = v;
                }
            }
        }
    }
}

/// A token count as an upstream reports it: a non-negative integer, or a non-negative number
/// rounded up, at most [`MAX_USAGE`]. Anything else (negative, a string, `null`, an object) is
/// no count, and does not make the document fail to parse.
#[derive(Default, Clone, Copy)]
struct Count(Option<u64>);

impl Count {
    fn or(self, other: Count) -> Count {
        if self.0.is_some() {
            self
        } else {
            other
        }
    }
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Count;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a token count")
            }
            fn visit_u64<E>(self, n: u64) -> Result<Count, E> {
                Ok(Count(Some(n.min(MAX_USAGE))))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Count, E> {
                Ok(Count(u64::try_from(n).ok().map(|n| n.min(MAX_USAGE))))
            }
            fn visit_f64<E>(self, x: f64) -> Result<Count, E> {
                // `as` saturates; the clamp keeps the result within the ceiling.
                Ok(Count(
                    (x.is_finite() && x >= 0.0).then(|| (x.ceil() as u64).min(MAX_USAGE)),
                ))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_unit<E>(self) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_none<E>(self) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Count, D::Error> {
                Count::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Count, A::Error> {
                while seq.next_element::<Skip>()?.is_some() {}
                Ok(Count(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Count, A::Error> {
                while map.next_entry::<Skip, Skip>()?.is_some() {}
                Ok(Count(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// Any JSON value, skipped (`deserialize_ignored_any`): the crate's reader finds its end in
/// place, nothing unescaped, converted or built, nothing allocated; serde_json, which reads a
/// document only when that reader refused it, ignores it its own way (a stack of brackets it
/// keeps in its scratch buffer). A number beyond `f64` in a skipped value does not make the
/// document fail: only the figures read are converted.
struct Skip;

impl<'de> Deserialize<'de> for Skip {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Skip;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_u64<E>(self, _: u64) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_str<E>(self, _: &str) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_borrowed_str<E>(self, _: &'de str) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_unit<E>(self) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Skip, A::Error> {
                while seq.next_element::<Skip>()?.is_some() {}
                Ok(Skip)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Skip, A::Error> {
                while map.next_entry::<Skip, Skip>()?.is_some() {}
                Ok(Skip)
            }
        }
        d.deserialize_ignored_any(V)
    }
}

/// An object key, borrowed from the text; `None` for a key written with escapes (never one
/// of the names read here).
struct Key<'de>(Option<&'de str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Some(s)))
            }
            fn visit_str<E>(self, _: &str) -> Result<Key<'de>, E> {
                Ok(Key(None))
            }
        }
        d.deserialize_str(V)
    }
}

/// An object read for a few of its fields: [`Obj::field`] takes the value of a key it knows
/// and returns `true`; every other value is skipped ([`Skip`]).
trait Obj: Default {
    fn field<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error>;

    fn read<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut obj = Self::default();
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            let taken = match key {
                Some(k) => obj.field(k, &mut map)?,
                None => false,
            };
            if !taken {
                map.next_value::<Skip>()?;
            }
        }
        Ok(obj)
    }
}

/// An object of type `T` where one is expected; anything else (`null`, a string, an array)
/// is `None` and does not make the document fail to parse.
struct Lenient<T>(Option<T>);

impl<'de, T: Obj> Deserialize<'de> for Lenient<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Obj> Visitor<'de> for V<T> {
            type Value = Lenient<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Lenient<T>, A::Error> {
                T::read(map).map(|t| Lenient(Some(t)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Lenient<T>, A::Error> {
                while seq.next_element::<Skip>()?.is_some() {}
                Ok(Lenient(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Lenient<T>, E> {
                Ok(Lenient(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Lenient<T>, E> {
                Ok(Lenient(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Lenient<T>, E> {
                Ok(Lenient(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Lenient<T>, E> {
                Ok(Lenient(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<Lenient<T>, E> {
                Ok(Lenient(None))
            }
            fn visit_unit<E>(self) -> Result<Lenient<T>, E> {
                Ok(Lenient(None))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// Takes the value of `key` into `slot` when `key` is `name`.
macro_rules! fields {
    ($key:expr, $map:expr, { $($name:literal => $slot:expr),* $(,)? }) => {
        match $key {
            $($name => {
                $slot = $map.next_value()?;
                Ok(true)
            })*
            _ => Ok(false),
        }
    };
}

/// A `usage` object: OpenAI chat and OpenAI-compatible servers (`prompt_tokens`,
/// `completion_tokens`, `total_tokens`), the Responses API and Anthropic (`input_tokens`,
/// `output_tokens`, Anthropic's `cache_*_input_tokens`). Every other field is skipped.
#[derive(Default)]
struct Fields {
    total_tokens: Count,
    prompt_tokens: Count,
    completion_tokens: Count,
    input_tokens: Count,
    output_tokens: Count,
    cache_creation_input_tokens: Count,
    cache_read_input_tokens: Count,
}

impl Obj for Fields {
    fn field<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error> {
        fields!(key, map, {
            "total_tokens" => self.total_tokens,
            "prompt_tokens" => self.prompt_tokens,
            "completion_tokens" => self.completion_tokens,
            "input_tokens" => self.input_tokens,
            "output_tokens" => self.output_tokens,
            "cache_creation_input_tokens" => self.cache_creation_input_tokens,
            "cache_read_input_tokens" => self.cache_read_input_tokens,
        })
    }
}

/// An object that may hold a `usage`: Anthropic's `message_start.message`, the Responses
/// API's `response` (in `response.completed`).
#[derive(Default)]
struct Nested {
    usage: Lenient<Fields>,
}

impl<T> Default for Lenient<T> {
    fn default() -> Self {
        Lenient(None)
    }
}

impl Obj for Nested {
    fn field<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error> {
        fields!(key, map, { "usage" => self.usage })
    }
}

/// Gemini's `usageMetadata`.
#[derive(Default)]
struct Gemini {
    total: Count,
    prompt: Count,
    candidates: Count,
    thoughts: Count,
    tool_prompt: Count,
}

impl Obj for Gemini {
    fn field<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error> {
        fields!(key, map, {
            "totalTokenCount" => self.total,
            "promptTokenCount" => self.prompt,
            "candidatesTokenCount" => self.candidates,
            "thoughtsTokenCount" => self.thoughts,
            "toolUsePromptTokenCount" => self.tool_prompt,
        })
    }
}

/// One JSON document of an answer, read only where usage may be: every other value is
/// skipped without being copied or built into a tree.
#[derive(Default)]
struct Report {
    usage: Lenient<Fields>,
    message: Lenient<Nested>,
    response: Lenient<Nested>,
    usage_metadata: Lenient<Gemini>,
    /// Ollama's native API.
    prompt_eval_count: Count,
    eval_count: Count,
}

impl Obj for Report {
    fn field<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error> {
        fields!(key, map, {
            "usage" => self.usage,
            "message" => self.message,
            "response" => self.response,
            "usageMetadata" => self.usage_metadata,
            "prompt_eval_count" => self.prompt_eval_count,
            "eval_count" => self.eval_count,
        })
    }
}

/// A document: an object, or an array of objects (the last report wins).
struct Doc(Usage);

impl<'de> Deserialize<'de> for Doc {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Doc;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object or array")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Doc, A::Error> {
                let mut u = Usage::default();
                u.report(&Report::read(map)?);
                Ok(Doc(u))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Doc, A::Error> {
                let mut u = Usage::default();
                while let Some(Lenient(f)) = seq.next_element::<Lenient<Report>>()? {
                    if let Some(f) = f {
                        u.report(&f);
                    }
                }
                Ok(Doc(u))
            }
        }
        d.deserialize_any(V)
    }
}

/// Whether a JSON text may report usage: it names `usage` (not as `"usage": null`), `Usage`
/// (`usageMetadata`) or Ollama's `eval_count`. Most stream frames do not, and are never
/// parsed.
fn may_report(json: &[u8]) -> bool {
    let mut from = 0;
    while let Some(i) = find(&json[from..], b'g') {
        let g = from + i;
        if g >= 3 && json[g - 2..g] == *b"sa" && json.get(g + 1) == Some(&b'e') {
            let u = json[g - 3];
            if (u == b'u' || u == b'U') && !null_after(&json[g + 2..]) {
                return true;
            }
        }
        from = g + 1;
    }
    let mut from = 0;
    while let Some(i) = find(&json[from..], b'_') {
        let at = from + i;
        if at >= 4 && json[at - 4..].starts_with(b"eval_count") {
            return true;
        }
        from = at + 1;
    }
    false
}

/// Whether `rest` (what follows a name) is `": null`: OpenAI chat chunks sent with
/// `include_usage` all say `"usage":null` but the last.
fn null_after(rest: &[u8]) -> bool {
    let trim = |s: &[u8]| -> usize { s.iter().take_while(|b| b.is_ascii_whitespace()).count() };
    let Some(rest) = rest.strip_prefix(b"\"") else {
        return false;
    };
    let rest = &rest[trim(rest)..];
    let Some(rest) = rest.strip_prefix(b":") else {
        return false;
    };
    rest[trim(rest)..].starts_with(b"null")
}

/// The first `b` in `hay`, eight bytes at a time.
fn find(hay: &[u8], b: u8) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let pattern = LO.wrapping_mul(u64::from(b));
    let mut chunks = hay.chunks_exact(8);
    let mut at = 0;
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        let x = u64::from_le_bytes(w) ^ pattern;
        if (x.wrapping_sub(LO) & !x & HI) != 0 {
            return c.iter().position(|&y| y == b).map(|i| at + i);
        }
        at += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&y| y == b)
        .map(|i| at + i)
}

/// Whether an answer is a refusal made before any work was done: a refusal by a layer inside
/// this one ([`RefusedLocally`](crate::ext::RefusedLocally)), a redirect, or a 4xx other than
/// `408 Request Timeout`.
fn refused_before_working(parts: &http::response::Parts) -> bool {
    let s = parts.status;
    parts
        .extensions
        .get::<crate::ext::RefusedLocally>()
        .is_some()
        || s.is_redirection()
        || (s.is_client_error() && s != http::StatusCode::REQUEST_TIMEOUT)
}

impl Meter {
    /// Settles what the head of the answer decides, and meters the rest: a refusal before
    /// any work is refunded now; another error keeps its charge (the upstream may have
    /// worked); a success is metered for its usage.
    pub(crate) fn for_answer(charge: TokenCharge, parts: &http::response::Parts) -> Option<Self> {
        if refused_before_working(parts) {
            charge.settle(0);
            return None;
        }
        if !parts.status.is_success() {
            return None;
        }
        let ct = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        Some(Meter::new(charge, Kind::for_content_type(ct)))
    }

    fn new(charge: TokenCharge, kind: Kind) -> Self {
        Meter {
            charge,
            kind,
            usage: Usage::default(),
            settled: false,
        }
    }

    /// Feeds one data frame: every slice of it (a non-contiguous [`Buf`] included). A
    /// [`Bytes`] frame of a JSON body is kept by reference, never copied.
    pub(crate) fn feed<D: Buf + 'static>(&mut self, data: &D) {
        if let Kind::Json { frames, size } = &mut self.kind {
            let n = data.remaining();
            if *size + n > JSON_KEEP {
                // Too large to read: keep the admission charge.
                frames.clear();
                self.kind = Kind::Skipped;
                self.settled = true;
                return;
            }
            *size += n;
            if let Some(b) = (data as &dyn std::any::Any).downcast_ref::<Bytes>() {
                frames.push(b.clone());
                return;
            }
        }
        let mut slices = [std::io::IoSlice::new(&[]); 16];
        let n = data.chunks_vectored(&mut slices);
        let mut seen = 0;
        for s in &slices[..n] {
            seen += s.len();
            self.feed_slice(s);
        }
        if seen < data.remaining() {
            // The buffer did not show all of itself: the line it cut is not read.
            if let Kind::Lines {
                carry, skipping, ..
            } = &mut self.kind
            {
                carry.clear();
                *skipping = true;
            }
            if let Kind::Json { .. } = self.kind {
                self.kind = Kind::Skipped;
                self.settled = true;
            }
        }
    }

    fn feed_slice(&mut self, data: &[u8]) {
        match &mut self.kind {
            Kind::Json { frames, .. } => frames.push(Bytes::copy_from_slice(data)),
            Kind::Lines {
                sse,
                carry,
                skipping,
            } => {
                let sse = *sse;
                let mut rest = data;
                // The end of a line an earlier frame began.
                if *skipping || !carry.is_empty() {
                    let Some(i) = find(rest, b'\n') else {
                        if !*skipping {
                            if carry.len() + rest.len() > LINE {
                                carry.clear();
                                *skipping = true;
                            } else {
                                carry.extend_from_slice(rest);
                            }
                        }
                        return;
                    };
                    if !*skipping && carry.len() + i <= LINE {
                        carry.extend_from_slice(&rest[..i]);
                        line(sse, carry, &mut self.usage);
                    }
                    carry.clear();
                    *skipping = false;
                    rest = &rest[i + 1..];
                }
                // Whole lines, read where they are.
                while let Some(i) = find(rest, b'\n') {
                    if i <= LINE {
                        line(sse, &rest[..i], &mut self.usage);
                    }
                    rest = &rest[i + 1..];
                }
                // A line the next frame ends: kept only if it may be a data line.
                if !rest.is_empty() {
                    let data_line = !sse
                        || rest.starts_with(b"data:")
                        || (rest.len() < 5 && b"data:".starts_with(rest));
                    if data_line && rest.len() <= LINE {
                        carry.extend_from_slice(rest);
                    } else {
                        *skipping = true;
                    }
                }
            }
            Kind::Skipped => {}
        }
    }

    /// The body ended: read the usage and settle.
    fn finish(&mut self) {
        match &mut self.kind {
            Kind::Json { frames, .. } => {
                match (&frames.first, frames.rest.as_slice()) {
                    (None, _) => {}
                    (Some(one), []) => self.usage.read(one),
                    (Some(first), rest) => {
                        let mut whole = Vec::with_capacity(
                            first.len() + rest.iter().map(Bytes::len).sum::<usize>(),
                        );
                        whole.extend_from_slice(first);
                        for b in rest {
                            whole.extend_from_slice(b);
                        }
                        self.usage.read(&whole);
                    }
                }
                frames.clear();
            }
            Kind::Lines {
                sse,
                carry,
                skipping,
            } => {
                if !*skipping && !carry.is_empty() {
                    line(*sse, carry, &mut self.usage);
                }
                carry.clear();
            }
            Kind::Skipped => {}
        }
        if let (Some(actual), false) = (self.usage.tokens(), self.settled) {
            crate::metrics::token_usage(self.usage.input, self.usage.output);
            self.charge.settle(actual);
        }
        self.settled = true;
    }
}

impl Kind {
    fn for_content_type(ct: &str) -> Kind {
        let essence = ct.split(';').next().unwrap_or("").trim();
        let lines = |sse| Kind::Lines {
            sse,
            carry: Vec::new(),
            skipping: false,
        };
        if essence.eq_ignore_ascii_case("text/event-stream") {
            lines(true)
        } else if essence.eq_ignore_ascii_case("application/x-ndjson")
            || essence.eq_ignore_ascii_case("application/jsonl")
            || essence.eq_ignore_ascii_case("application/json-lines")
        {
            lines(false)
        } else {
            Kind::Json {
                frames: Frames::default(),
                size: 0,
            }
        }
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        // A body cut or dropped before its end: the upstream was at work. The charge stays,
        // and grows to what the stream already reported if that is more.
        if !self.settled {
            if let Some(actual) = self.usage.tokens() {
                self.charge.settle(actual.max(self.charge.charged()));
            }
            self.settled = true;
        }
    }
}

impl std::fmt::Debug for Meter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meter")
            .field("charged", &self.charge.charged())
            .finish_non_exhaustive()
    }
}

/// Reads one complete line of a stream: an SSE `data:` line, or an NDJSON line. Lines that
/// cannot report usage are not parsed.
fn line(sse: bool, line: &[u8], usage: &mut Usage) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let json = if sse {
        match line.strip_prefix(b"data:") {
            Some(d) => d,
            None => return,
        }
    } else {
        line
    };
    if may_report(json) {
        usage.read(json);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate_limit::store::RateKey;

    fn read(json: &str) -> Option<u64> {
        let mut u = Usage::default();
        u.read(json.as_bytes());
        u.tokens()
    }

    fn meter(ct: &str) -> Meter {
        let charge = TokenCharge {
            key: RateKey::Global,
            bucket: None,
            global: None,
            charged: 0,
            #[cfg(feature = "redis")]
            remote: None,
        };
        Meter::new(charge, Kind::for_content_type(ct))
    }

    #[test]
    fn usage_in_every_dialect() {
        // OpenAI chat, vLLM, llama.cpp, Ollama's OpenAI endpoint.
        assert_eq!(
            read(
                r#"{"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7,"prompt_tokens_details":{"cached_tokens":2}}}"#
            ),
            Some(7)
        );
        // Responses API, plain and `response.completed`.
        assert_eq!(
            read(
                r#"{"object":"response","usage":{"input_tokens":5,"output_tokens":6,"total_tokens":11}}"#
            ),
            Some(11)
        );
        assert_eq!(
            read(
                r#"{"type":"response.completed","response":{"id":"r","usage":{"input_tokens":5,"output_tokens":7,"total_tokens":12}}}"#
            ),
            Some(12)
        );
        // Anthropic, plain: the cache figures are part of the prompt.
        assert_eq!(
            read(
                r#"{"type":"message","usage":{"input_tokens":10,"cache_creation_input_tokens":100,"cache_read_input_tokens":1000,"output_tokens":1}}"#
            ),
            Some(1111)
        );
        // Gemini, thoughts included.
        assert_eq!(
            read(
                r#"{"usageMetadata":{"promptTokenCount":8,"candidatesTokenCount":9,"thoughtsTokenCount":3}}"#
            ),
            Some(20)
        );
        assert_eq!(
            read(
                r#"{"usageMetadata":{"promptTokenCount":8,"candidatesTokenCount":9,"totalTokenCount":30}}"#
            ),
            Some(30)
        );
        // Gemini's array of chunks: cumulative, the last wins.
        assert_eq!(
            read(
                r#"[{"usageMetadata":{"totalTokenCount":3}},"x",{"usageMetadata":{"totalTokenCount":9}}]"#
            ),
            Some(9)
        );
        // Ollama native.
        assert_eq!(
            read(
                r#"{"model":"llama3","done":true,"message":{"role":"assistant","content":"hi"},"prompt_eval_count":26,"eval_count":290}"#
            ),
            Some(316)
        );
    }

    #[test]
    fn odd_figures_and_shapes_report_nothing_or_are_clamped() {
        assert_eq!(read(r#"{"usage":null}"#), None);
        assert_eq!(read(r#"{"usage":"many"}"#), None);
        assert_eq!(read(r#"{"usage":{"total_tokens":-3}}"#), None);
        assert_eq!(read(r#"{"usage":{"total_tokens":"7"}}"#), None);
        assert_eq!(read(r#"{"usage":{"total_tokens":2.1}}"#), Some(3));
        assert_eq!(read(r#"{"usage":{"total_tokens":1e300}}"#), Some(MAX_USAGE));
        assert_eq!(
            read(r#"{"usage":{"total_tokens":18446744073709551615}}"#),
            Some(MAX_USAGE)
        );
        // A field of an unexpected type does not hide the others.
        assert_eq!(
            read(
                r#"{"message":"hi","usage":{"total_tokens":{"a":1},"input_tokens":[1],"output_tokens":4}}"#
            ),
            Some(4)
        );
        assert_eq!(read(r#"{"usage":{"total_tokens":7}"#), None);
        assert_eq!(read("[DONE]"), None);
    }

    #[test]
    fn anthropic_stream_input_and_cumulative_output() {
        let mut m = meter("text/event-stream; charset=utf-8");
        let s = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"usage\":{\"input_tokens\":1200,\"output_tokens\":1}}}\n\n\
                 event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"usage\"}}\n\n\
                 event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":150}}\n\n\
                 event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":300}}\n\n";
        m.feed(&Bytes::from(s));
        assert_eq!(m.usage.tokens(), Some(1500));
    }

    #[test]
    fn every_slice_of_a_chained_buf_is_read() {
        let mut m = meter("text/event-stream");
        let first = Bytes::from_static(b"data: {\"choices\":[],\"usa");
        let second = Bytes::from_static(b"ge\":{\"total_tokens\":9}}\n\n");
        m.feed(&first.chain(second));
        assert_eq!(m.usage.tokens(), Some(9));

        let mut m = meter("application/json");
        let first = Bytes::from_static(b"{\"usage\":{\"total_");
        let second = Bytes::from_static(b"tokens\":12}}");
        m.feed(&first.chain(second));
        m.finish();
        assert_eq!(m.usage.tokens(), Some(12));
    }

    #[test]
    fn ndjson_lines() {
        let mut m = meter("application/x-ndjson");
        m.feed(&Bytes::from_static(
            b"{\"done\":false,\"message\":{\"content\":\"a\"}}\n{\"done\":true,\"prompt_ev",
        ));
        m.feed(&Bytes::from_static(b"al_count\":2,\"eval_count\":3}"));
        m.finish();
        assert_eq!(m.usage.tokens(), Some(5));
    }

    #[test]
    fn lines_longer_than_the_cap_are_skipped() {
        let mut m = meter("text/event-stream");
        let long = format!(
            "data: {{\"pad\":\"{}\",\"usage\":{{\"total_tokens\":5}}}}\n",
            "x".repeat(LINE)
        );
        for piece in long.as_bytes().chunks(1000) {
            m.feed(&Bytes::copy_from_slice(piece));
        }
        m.feed(&Bytes::from_static(
            b"data: {\"usage\":{\"total_tokens\":6}}\n",
        ));
        assert_eq!(m.usage.tokens(), Some(6));
        let Kind::Lines { carry, .. } = &m.kind else {
            unreachable!()
        };
        // Vec growth at most doubles what a line may hold.
        assert!(carry.capacity() <= 2 * LINE);
    }

    #[test]
    fn the_prefilter_finds_every_name_and_only_them() {
        for yes in [
            &b"{\"usage\":1}"[..],
            b"{\"usageMetadata\":{}}",
            b"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxUsage",
            b"{\"eval_count\":1}",
            b"{\"prompt_eval_count\":1}",
            b"{\"usage\":null,\"x\":{\"usage\":{}}}",
            b"{\"usage\" : nul",
        ] {
            assert!(may_report(yes), "{}", String::from_utf8_lossy(yes));
        }
        for no in [
            &b"[DONE]"[..],
            b"{\"choices\":[{\"delta\":{\"content\":\"sage and garbage\"}}]}",
            b"{\"eval\":1,\"_count\":2}",
            b"{\"choices\":[],\"usage\":null}",
            b"{\"usage\" :\n null}",
            b"",
        ] {
            assert!(!may_report(no), "{}", String::from_utf8_lossy(no));
        }
        let hay: Vec<u8> = (0..200u8).collect();
        for b in 0..=255u8 {
            assert_eq!(find(&hay, b), hay.iter().position(|&y| y == b));
            for start in 0..20 {
                assert_eq!(
                    find(&hay[start..], b),
                    hay[start..].iter().position(|&y| y == b)
                );
            }
        }
    }
}
