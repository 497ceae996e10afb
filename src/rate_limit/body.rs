//! The response body wrapper: holds the concurrency slot until the body ends or is dropped, and
//! watches the body for `usage` to correct the token charge.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use serde_json::Value;

use crate::body::LayerBody;

use super::shared::{InflightGuard, TokenCharge, MAX_USAGE};

/// The most bytes of a non-streaming JSON body copied aside to read its `usage` at the end; a
/// larger body keeps its admission charge.
const JSON_KEEP: usize = 1 << 20;
/// The longest SSE line examined; longer lines are skipped.
const SSE_LINE: usize = 64 << 10;

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
                    m.feed(data.chunk());
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

/// Reads `usage` from the response body.
pub(crate) struct Meter {
    charge: TokenCharge,
    kind: Kind,
    usage: Usage,
    settled: bool,
}

enum Kind {
    /// A JSON body: the frames, kept until the end.
    Json { frames: Vec<Bytes>, size: usize },
    /// An SSE stream: only the current line is kept.
    Sse { line: Vec<u8>, skipping: bool },
    /// A body too large to read: the charge stays.
    Skipped,
}

#[derive(Default)]
struct Usage {
    total: Option<u64>,
    input: Option<u64>,
    output: Option<u64>,
}

impl Usage {
    fn observe(&mut self, v: &Value) {
        let Some(u) = v.get("usage").filter(|u| u.is_object()) else {
            return;
        };
        let n = |k: &str| u.get(k).and_then(count);
        if let Some(t) = n("total_tokens") {
            self.total = Some(t);
        }
        for (slot, keys) in [
            (&mut self.input, ["prompt_tokens", "input_tokens"]),
            (&mut self.output, ["completion_tokens", "output_tokens"]),
        ] {
            if let Some(x) = keys.iter().find_map(|k| n(k)) {
                *slot = Some(slot.map_or(x, |s| s.max(x)));
            }
        }
    }

    fn tokens(&self) -> Option<u64> {
        self.total.or(match (self.input, self.output) {
            (None, None) => None,
            (i, o) => Some(i.unwrap_or(0).saturating_add(o.unwrap_or(0))),
        })
    }
}

/// A token count as an upstream reports it: a non-negative integer, or a non-negative number
/// rounded up, at most [`MAX_USAGE`]. Anything else (negative, a string, `null`) is no count.
fn count(v: &Value) -> Option<u64> {
    if let Some(n) = v.as_u64() {
        return Some(n.min(MAX_USAGE));
    }
    let x = v.as_f64().filter(|x| x.is_finite() && *x >= 0.0)?;
    // `as` saturates; the clamp keeps the result within the ceiling.
    Some((x.ceil() as u64).min(MAX_USAGE))
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
    /// worked); a success is metered for its `usage`.
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
        let kind = if ct.starts_with("text/event-stream") {
            Kind::Sse {
                line: Vec::new(),
                skipping: false,
            }
        } else {
            Kind::Json {
                frames: Vec::new(),
                size: 0,
            }
        };
        Some(Meter {
            charge,
            kind,
            usage: Usage::default(),
            settled: false,
        })
    }

    fn feed(&mut self, data: &[u8]) {
        match &mut self.kind {
            Kind::Json { frames, size } => {
                if *size + data.len() <= JSON_KEEP {
                    *size += data.len();
                    frames.push(Bytes::copy_from_slice(data));
                } else {
                    // Too large to read: keep the admission charge.
                    self.kind = Kind::Skipped;
                    self.settled = true;
                }
            }
            Kind::Sse { line, skipping } => {
                let mut rest = data;
                while !rest.is_empty() {
                    match rest.iter().position(|&b| b == b'\n') {
                        Some(i) => {
                            if !*skipping && line.len() + i <= SSE_LINE {
                                line.extend_from_slice(&rest[..i]);
                                sse_line(line, &mut self.usage);
                            }
                            line.clear();
                            *skipping = false;
                            rest = &rest[i + 1..];
                        }
                        None => {
                            if line.len() + rest.len() > SSE_LINE {
                                *skipping = true;
                                line.clear();
                            } else if !*skipping {
                                line.extend_from_slice(rest);
                            }
                            rest = &[];
                        }
                    }
                }
            }
            Kind::Skipped => {}
        }
    }

    /// The body ended: read the usage and settle.
    fn finish(&mut self) {
        if let Kind::Json { frames, .. } = &mut self.kind {
            let whole: Vec<u8> = frames.iter().flat_map(|b| b.iter().copied()).collect();
            frames.clear();
            if let Ok(v) = serde_json::from_slice::<Value>(&whole) {
                self.usage.observe(&v);
            }
        }
        if let Kind::Sse { line, .. } = &mut self.kind {
            if !line.is_empty() {
                sse_line(line, &mut self.usage);
            }
        }
        if let (Some(actual), false) = (self.usage.tokens(), self.settled) {
            self.charge.settle(actual);
        }
        self.settled = true;
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

fn sse_line(line: &[u8], usage: &mut Usage) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(data) = line.strip_prefix(b"data:") else {
        return;
    };
    if !memfind(data, b"\"usage\"") {
        return;
    }
    if let Ok(v) = serde_json::from_slice::<Value>(data) {
        usage.observe(&v);
    }
}

fn memfind(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_formats() {
        let mut u = Usage::default();
        u.observe(&serde_json::json!({"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}));
        assert_eq!(u.tokens(), Some(7));
        let mut u = Usage::default();
        u.observe(&serde_json::json!({"type":"message_start","message":{}, "usage": {"input_tokens": 10, "output_tokens": 1}}));
        u.observe(&serde_json::json!({"type":"message_delta", "usage": {"output_tokens": 25}}));
        assert_eq!(u.tokens(), Some(35));
        let mut u = Usage::default();
        u.observe(&serde_json::json!({"usage": null}));
        assert_eq!(u.tokens(), None);
    }

    #[test]
    fn sse_lines_split_across_frames() {
        let mut u = Usage::default();
        sse_line(b"data: {\"usage\":{\"total_tokens\":9}}\r", &mut u);
        assert_eq!(u.tokens(), Some(9));
        let mut u = Usage::default();
        sse_line(b"event: x", &mut u);
        sse_line(b"data: [DONE]", &mut u);
        assert_eq!(u.tokens(), None);
    }
}
