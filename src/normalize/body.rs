use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::classify::classify_sse_event;
use crate::error::{ApiError, ErrorCode, TypeStyle};

pin_project! {
    /// The response body of [`NormalizeErrors`](super::NormalizeErrors): the upstream's own body
    /// (handed on frame for frame), an SSE stream whose in-band error events are rewritten to
    /// the envelope form, or an envelope.
    pub struct NormalizeBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Passthrough {
            #[pin]
            inner: B,
        },
        Sse {
            #[pin]
            inner: B,
            // The bytes of a line that has not ended yet.
            partial: BytesMut,
            done: bool,
        },
        Full {
            data: Option<Bytes>,
        },
        // A body whose first frame was looked at before the head went out.
        Prefixed {
            first: Option<Frame<Bytes>>,
            inner: Pin<Box<B>>,
        },
    }
}

impl<B> NormalizeBody<B> {
    pub(super) fn passthrough(inner: B) -> Self {
        NormalizeBody {
            kind: Kind::Passthrough { inner },
        }
    }

    pub(super) fn sse(inner: B) -> Self {
        NormalizeBody {
            kind: Kind::Sse {
                inner,
                partial: BytesMut::new(),
                done: false,
            },
        }
    }

    pub(super) fn prefixed(first: Option<Frame<Bytes>>, inner: Pin<Box<B>>) -> Self {
        NormalizeBody {
            kind: Kind::Prefixed { first, inner },
        }
    }

    /// A body of the given bytes.
    pub fn full(data: Bytes) -> Self {
        NormalizeBody {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }
}

impl<B> From<Bytes> for NormalizeBody<B> {
    fn from(data: Bytes) -> Self {
        NormalizeBody::full(data)
    }
}

impl<B> std::fmt::Debug for NormalizeBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Passthrough { .. } => "passthrough",
            Kind::Sse { .. } => "sse",
            Kind::Full { .. } => "full",
            Kind::Prefixed { .. } => "prefixed",
        };
        f.debug_struct("NormalizeBody")
            .field("kind", &kind)
            .finish()
    }
}

impl<B> Body for NormalizeBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Passthrough { inner } => inner.poll_frame(cx),
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            KindProj::Prefixed { first, inner } => match first.take() {
                Some(frame) => Poll::Ready(Some(Ok(frame))),
                None => inner.as_mut().poll_frame(cx),
            },
            KindProj::Sse {
                mut inner,
                partial,
                done,
            } => loop {
                if *done {
                    return Poll::Ready(None);
                }
                match ready!(inner.as_mut().poll_frame(cx)) {
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => {
                            let out = rewrite_chunk(partial, data);
                            if !out.is_empty() {
                                return Poll::Ready(Some(Ok(Frame::data(out))));
                            }
                        }
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    },
                    Some(Err(_)) => {
                        // The stream broke off after the head was sent: the caller cannot be
                        // answered with a status any more, so tell it in-band, the way providers
                        // report errors inside a stream, and end the stream cleanly.
                        *done = true;
                        let api = ApiError::new(
                            ErrorCode::ServiceUnavailable,
                            "The upstream stream broke off before it finished.",
                        );
                        tracing::debug!(code = %api.code(), "upstream stream broke off");
                        let mut out = BytesMut::from(&partial[..]);
                        partial.clear();
                        if !out.is_empty() && !out.ends_with(b"\n") {
                            out.extend_from_slice(b"\n\n");
                        }
                        out.extend_from_slice(b"data: ");
                        out.extend_from_slice(&api.envelope(TypeStyle::OpenAi));
                        out.extend_from_slice(b"\n\n");
                        return Poll::Ready(Some(Ok(Frame::data(out.freeze()))));
                    }
                    None => {
                        *done = true;
                        if partial.is_empty() {
                            return Poll::Ready(None);
                        }
                        let rest = std::mem::take(partial).freeze();
                        return Poll::Ready(Some(Ok(Frame::data(rewrite_line(rest)))));
                    }
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Passthrough { inner } => inner.is_end_stream(),
            Kind::Sse {
                inner,
                partial,
                done,
            } => *done || (partial.is_empty() && inner.is_end_stream()),
            Kind::Full { data } => data.is_none(),
            Kind::Prefixed { first, inner } => first.is_none() && inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Passthrough { inner } => inner.size_hint(),
            Kind::Sse { .. } => SizeHint::default(),
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Prefixed { first, inner } => {
                let held = first
                    .as_ref()
                    .and_then(Frame::data_ref)
                    .map_or(0, |d| d.len() as u64);
                let inner = inner.size_hint();
                let mut hint = SizeHint::new();
                // Upper first: a lower bound above the upper one panics.
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper.saturating_add(held));
                }
                hint.set_lower(inner.lower().saturating_add(held));
                hint
            }
        }
    }
}

/// Hands on the complete lines of `data` (with any held-back start of a line), rewriting error
/// events, and keeps the bytes of an unfinished last line for the next chunk.
///
/// A chunk that ends on a line end and holds no error is handed on as the same `Bytes`, without
/// a copy.
fn rewrite_chunk(partial: &mut BytesMut, data: Bytes) -> Bytes {
    let cut = match data.iter().rposition(|&b| b == b'\n') {
        Some(i) => i + 1,
        None => {
            partial.extend_from_slice(&data);
            return Bytes::new();
        }
    };
    let complete = if partial.is_empty() {
        data.slice(..cut)
    } else {
        partial.extend_from_slice(&data[..cut]);
        std::mem::take(partial).freeze()
    };
    if cut < data.len() {
        partial.extend_from_slice(&data[cut..]);
    }
    if !might_hold_error(&complete) {
        return complete;
    }
    let mut out = BytesMut::with_capacity(complete.len() + 64);
    let mut start = 0;
    while start < complete.len() {
        let end = complete[start..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(complete.len(), |i| start + i + 1);
        out.extend_from_slice(&rewrite_line(complete.slice(start..end)));
        start = end;
    }
    out.freeze()
}

/// Rewrites one line (with its line end, if any) when it is a `data:` line carrying an error.
fn rewrite_line(line: Bytes) -> Bytes {
    let Some(payload) = line.strip_prefix(b"data:") else {
        return line;
    };
    let trimmed_end = payload
        .iter()
        .rposition(|b| !matches!(b, b'\r' | b'\n'))
        .map_or(0, |i| i + 1);
    let (payload, ending) = payload.split_at(trimmed_end);
    if !might_hold_error(payload) {
        return line;
    }
    match classify_sse_event(payload.trim_ascii_start()) {
        Some(err) => {
            tracing::debug!(code = %err.code(), "rewrote an in-band stream error");
            let mut out = BytesMut::with_capacity(payload.len() + 32);
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(&err.envelope(TypeStyle::OpenAi));
            out.extend_from_slice(if ending.is_empty() { b"\n" } else { ending });
            out.freeze()
        }
        None => line,
    }
}

/// A cheap test: every error event the classifier reads mentions `error` (as a key, a type
/// such as `error_type`, or an event name); the classifier decides.
fn might_hold_error(data: &[u8]) -> bool {
    data.windows(5).any(|w| w == b"error")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_lines_pass_without_copy() {
        let mut partial = BytesMut::new();
        let chunk = Bytes::from_static(b"data: {\"choices\":[]}\n\n");
        let out = rewrite_chunk(&mut partial, chunk.clone());
        assert_eq!(out, chunk);
        assert_eq!(out.as_ptr(), chunk.as_ptr());
    }

    #[test]
    fn split_lines_are_joined() {
        let mut partial = BytesMut::new();
        assert!(rewrite_chunk(&mut partial, Bytes::from_static(b"data: {\"a\"")).is_empty());
        let out = rewrite_chunk(&mut partial, Bytes::from_static(b":1}\n\ndata: x"));
        assert_eq!(&out[..], b"data: {\"a\":1}\n\n");
        assert_eq!(&partial[..], b"data: x");
    }
}
