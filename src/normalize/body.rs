use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use std::future::Future;
use std::time::Duration;
use tokio::time::{Instant, Sleep};

use crate::classify::{classify_sse_event, Classifier};
use crate::error::{ApiError, EnvelopeOptions, ErrorCode, TypeStyle};

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
            sse: SseStream<B>,
        },
        // A stream whose head was held until its first event.
        SseHeld {
            #[pin]
            sse: SseStream<Pin<Box<B>>>,
        },
        Full {
            data: Option<Bytes>,
        },
        // A body whose first frames were looked at before the head went out.
        Prefixed {
            first: Option<Frame<Bytes>>,
            second: Option<Frame<Bytes>>,
            inner: Pin<Box<B>>,
        },
    }
}

pin_project! {
    /// A 2xx event stream: framed by line for in-band errors, timed when timers are set.
    struct SseStream<B> {
        #[pin]
        inner: B,
        framer: SseFramer,
        // Bytes read before the head went out, handed on first (through the framer).
        first: Option<Bytes>,
        // A frame to hand on before the next one is read.
        queued: Option<Frame<Bytes>>,
        done: bool,
        #[pin]
        timers: Timers,
    }
}

/// The dialect a stream's terminal error event is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dialect {
    /// Not known yet (no byte seen).
    Unknown,
    /// `data: {"error":{...}}` then `data: [DONE]` (OpenAI chat and Responses, and the
    /// OpenAI-compatible servers).
    OpenAi,
    /// `event: error` + `data: {"type":"error","error":{...}}` (Anthropic Messages).
    Anthropic,
}

impl Dialect {
    /// The dialect of a stream, from its first chunk with data: Anthropic's streams open
    /// with `message_start`. A chunk without a `data:` field (comments) decides nothing.
    pub(super) fn of(data: &[u8]) -> Dialect {
        if data.windows(13).any(|w| w == b"message_start") {
            Dialect::Anthropic
        } else if data.windows(5).any(|w| w == b"data:") {
            Dialect::OpenAi
        } else {
            Dialect::Unknown
        }
    }
}

/// Which stream timer ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expired {
    FirstEvent,
    Idle,
    Total,
}

impl Expired {
    pub(super) fn error(self) -> ApiError {
        let message = match self {
            Expired::FirstEvent => "The upstream stream sent no event within its time limit.",
            Expired::Idle => "The upstream stream went silent for longer than its idle limit.",
            Expired::Total => "The upstream stream ran past its total time limit.",
        };
        ApiError::new(ErrorCode::Timeout, message)
    }
}

/// The earlier of two optional instants.
pub(super) fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// `now + d`, `None` when it does not fit (no bound).
pub(super) fn after(now: Instant, d: Option<Duration>) -> Option<Instant> {
    d.and_then(|d| now.checked_add(d))
}

pin_project! {
    /// The stream timers of one event stream: one tokio `Sleep` at the nearest deadline,
    /// reset as bytes arrive. No `Sleep` (and no cost) when no timer is set; the `Sleep` is
    /// boxed so that the body stays `Unpin` when the upstream's is.
    pub(super) struct Timers {
        sleep: Option<Pin<Box<Sleep>>>,
        idle: Option<Duration>,
        total_at: Option<Instant>,
        // The stream's first bytes (its first event, when the head was held) arrived.
        started: bool,
        dialect: Dialect,
    }
}

impl Timers {
    /// No timer.
    pub(super) const fn none() -> Self {
        Timers {
            sleep: None,
            idle: None,
            total_at: None,
            started: false,
            dialect: Dialect::Unknown,
        }
    }

    /// Timers from now: `first` until the first bytes (unless `started`), `idle` between
    /// chunks after them, and the whole stream ending by `total_at`. Without a tokio runtime
    /// there is no timer (no bound).
    pub(super) fn new(
        first: Option<Duration>,
        idle: Option<Duration>,
        total_at: Option<Instant>,
        started: bool,
    ) -> Self {
        let now = Instant::now();
        let next = if started {
            earliest(after(now, idle), total_at)
        } else {
            earliest(after(now, first), total_at)
        };
        let sleep = next
            .filter(|_| tokio::runtime::Handle::try_current().is_ok())
            .map(|at| Box::pin(tokio::time::sleep_until(at)));
        Timers {
            sleep,
            idle,
            total_at,
            started,
            dialect: Dialect::Unknown,
        }
    }

    /// Bytes arrived: the idle time starts again.
    fn on_data(self: Pin<&mut Self>, data: &[u8]) {
        let this = self.project();
        if this.idle.is_none() && (this.sleep.is_none() || *this.started) {
            // Nothing to time, or only the total deadline, already set.
            return;
        }
        if *this.dialect == Dialect::Unknown {
            *this.dialect = Dialect::of(data);
        }
        *this.started = true;
        match (
            earliest(after(Instant::now(), *this.idle), *this.total_at),
            this.sleep.as_mut(),
        ) {
            (Some(at), Some(sleep)) => sleep.as_mut().reset(at),
            (Some(at), None) => {
                if tokio::runtime::Handle::try_current().is_ok() {
                    *this.sleep = Some(Box::pin(tokio::time::sleep_until(at)));
                }
            }
            (None, _) => *this.sleep = None,
        }
    }

    /// Called when the upstream is not ready: which timer ran out, if one did (the task is
    /// woken when one does).
    fn poll_expired(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Option<Expired> {
        let this = self.project();
        let sleep = this.sleep.as_mut()?;
        if sleep.as_mut().poll(cx).is_pending() {
            return None;
        }
        *this.sleep = None;
        Some(if this.total_at.is_some_and(|at| at <= Instant::now()) {
            Expired::Total
        } else if *this.started {
            Expired::Idle
        } else {
            Expired::FirstEvent
        })
    }
}

/// The terminal in-band event for `err` in `dialect`: OpenAI's `data: {"error":...}` followed
/// by `data: [DONE]`, or Anthropic's `event: error` with `{"type":"error","error":{...}}`.
pub(super) fn terminal_event(out: &mut BytesMut, err: &ApiError, dialect: Dialect) {
    match dialect {
        Dialect::Anthropic => {
            // Anthropic's own order: `type` first.
            let message = serde_json::to_string(err.message()).unwrap_or_default();
            let kind = err.code().error_type(TypeStyle::Descriptive);
            let body =
                format!(r#"{{"type":"error","error":{{"type":"{kind}","message":{message}}}}}"#);
            out.extend_from_slice(b"event: error\ndata: ");
            out.extend_from_slice(body.to_string().as_bytes());
            out.extend_from_slice(b"\n\n");
        }
        Dialect::OpenAi | Dialect::Unknown => {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(&err.envelope(TypeStyle::OpenAi));
            out.extend_from_slice(b"\n\ndata: [DONE]\n\n");
        }
    }
}

impl<B> NormalizeBody<B> {
    pub(super) fn passthrough(inner: B) -> Self {
        NormalizeBody {
            kind: Kind::Passthrough { inner },
        }
    }

    pub(super) fn sse(inner: B, line_limit: usize, events: SseEvents, timers: Timers) -> Self {
        NormalizeBody {
            kind: Kind::Sse {
                sse: SseStream {
                    inner,
                    framer: SseFramer::with_events(line_limit, events),
                    first: None,
                    queued: None,
                    done: false,
                    timers,
                },
            },
        }
    }

    /// A stream whose head was held: `first` (read already) goes on first.
    pub(super) fn sse_held(
        inner: Pin<Box<B>>,
        first: Bytes,
        line_limit: usize,
        events: SseEvents,
        timers: Timers,
    ) -> Self {
        NormalizeBody {
            kind: Kind::SseHeld {
                sse: SseStream {
                    inner,
                    framer: SseFramer::with_events(line_limit, events),
                    first: (!first.is_empty()).then_some(first),
                    queued: None,
                    done: false,
                    timers,
                },
            },
        }
    }

    /// `inner`, after the frames already read from it (held bytes, then possibly trailers).
    pub(super) fn prefixed(
        first: Option<Frame<Bytes>>,
        second: Option<Frame<Bytes>>,
        inner: Pin<Box<B>>,
    ) -> Self {
        let (first, second) = match first {
            None => (second, None),
            first => (first, second),
        };
        NormalizeBody {
            kind: Kind::Prefixed {
                first,
                second,
                inner,
            },
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
            Kind::SseHeld { .. } => "sse (held)",
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
            KindProj::Prefixed {
                first,
                second,
                inner,
            } => match first.take() {
                Some(frame) => {
                    *first = second.take();
                    Poll::Ready(Some(Ok(frame)))
                }
                None => inner.as_mut().poll_frame(cx),
            },
            KindProj::Sse { sse } => sse.poll_frame(cx),
            KindProj::SseHeld { sse } => sse.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Passthrough { inner } => inner.is_end_stream(),
            Kind::Sse { sse } => sse.is_end_stream(),
            Kind::SseHeld { sse } => sse.is_end_stream(),
            Kind::Full { data } => data.is_none(),
            Kind::Prefixed { first, inner, .. } => first.is_none() && inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Passthrough { inner } => inner.size_hint(),
            Kind::Sse { .. } | Kind::SseHeld { .. } => SizeHint::default(),
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Prefixed { first, inner, .. } => {
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

impl<B> SseStream<B>
where
    B: Body<Data = Bytes>,
{
    fn is_end_stream(&self) -> bool {
        self.queued.is_none()
            && self.first.is_none()
            && (self.done || (self.framer.is_empty() && self.inner.is_end_stream()))
    }

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        loop {
            if let Some(frame) = this.queued.take() {
                return Poll::Ready(Some(Ok(frame)));
            }
            if *this.done {
                return Poll::Ready(None);
            }
            let frame = match this.first.take() {
                Some(first) => Some(Ok(Frame::data(first))),
                None => match this.inner.as_mut().poll_frame(cx) {
                    Poll::Ready(frame) => frame,
                    Poll::Pending => {
                        let Some(expired) = this.timers.as_mut().poll_expired(cx) else {
                            return Poll::Pending;
                        };
                        // The head went out: the caller is told in-band, in the stream's
                        // dialect, and the stream ends.
                        *this.done = true;
                        let api = expired.error();
                        this.framer.events.labels.classified(&api);
                        tracing::debug!(layer = "normalize", code = %api.code(), timer = ?expired, "stream timed out");
                        let out = terminal(this.framer, &api, this.timers.dialect);
                        // Layers further out that record outcomes read how it ended.
                        *this.queued = Some(Frame::trailers(crate::policy::stream_error_trailers(
                            api.code(),
                        )));
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                },
            };
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if !data.is_empty() {
                            this.timers.as_mut().on_data(&data);
                        }
                        let (head, rest) = this.framer.push(data);
                        match (head.is_empty(), rest.is_empty()) {
                            (true, true) => {}
                            (false, true) => return Poll::Ready(Some(Ok(Frame::data(head)))),
                            (true, false) => return Poll::Ready(Some(Ok(Frame::data(rest)))),
                            (false, false) => {
                                *this.queued = Some(Frame::data(rest));
                                return Poll::Ready(Some(Ok(Frame::data(head))));
                            }
                        }
                    }
                    Err(trailers) => {
                        // The held end of the stream goes before the trailers.
                        let rest = this.framer.finish();
                        if rest.is_empty() {
                            return Poll::Ready(Some(Ok(trailers)));
                        }
                        *this.queued = Some(trailers);
                        return Poll::Ready(Some(Ok(Frame::data(rest))));
                    }
                },
                Some(Err(_)) => {
                    // The stream broke off after the head was sent: the caller cannot be
                    // answered with a status any more, so tell it in-band, the way providers
                    // report errors inside a stream, and end the stream cleanly.
                    *this.done = true;
                    let api = ApiError::new(
                        ErrorCode::ServiceUnavailable,
                        "The upstream stream broke off before it finished.",
                    );
                    this.framer.events.labels.classified(&api);
                    tracing::debug!(layer = "normalize", code = %api.code(), "upstream stream broke off");
                    // What was held goes out as it came; the event starts on a line of its
                    // own.
                    let mid_line = this.framer.mid_line();
                    let mut out = BytesMut::from(&this.framer.take_held()[..]);
                    if mid_line {
                        out.extend_from_slice(b"\n\n");
                    }
                    out.extend_from_slice(b"data: ");
                    out.extend_from_slice(&api.envelope(TypeStyle::OpenAi));
                    out.extend_from_slice(b"\n\n");
                    *this.queued = Some(Frame::trailers(crate::policy::stream_error_trailers(
                        api.code(),
                    )));
                    return Poll::Ready(Some(Ok(Frame::data(out.freeze()))));
                }
                None => {
                    *this.done = true;
                    let rest = this.framer.finish();
                    // A stream that carried an error event ended in failure: say so to the
                    // layers further out that record outcomes.
                    let marker = this
                        .framer
                        .seen_error()
                        .map(|code| Frame::trailers(crate::policy::stream_error_trailers(code)));
                    if rest.is_empty() {
                        return Poll::Ready(marker.map(Ok));
                    }
                    *this.queued = marker;
                    return Poll::Ready(Some(Ok(Frame::data(rest))));
                }
            }
        }
    }
}

/// What was held (as it came, ended as an event) and the terminal event for `err`.
fn terminal(framer: &mut SseFramer, err: &ApiError, dialect: Dialect) -> Bytes {
    let mid_line = framer.mid_line();
    let mut out = BytesMut::from(&framer.take_held()[..]);
    if mid_line {
        out.extend_from_slice(b"\n\n");
    }
    terminal_event(&mut out, err, dialect);
    out.freeze()
}

/// How in-band error events of one stream are classified and written.
#[derive(Default)]
pub(super) struct SseEvents {
    /// The application's rules, with the stream's status and headers they are asked about.
    /// `None` (no allocation) when there are none.
    rules: Option<Box<(Arc<Classifier>, StatusCode, HeaderMap)>>,
    /// Show the upstream's own code, type and message in the rewritten event.
    expose_upstream: bool,
    /// The code of the last error event rewritten, as its index in [`ErrorCode::ALL`] plus one
    /// (0: none). An atomic so the body stays `Sync`; read when the stream ends, to name the
    /// failure in the trailer [`crate::policy::STREAM_ERROR_TRAILER`].
    seen: std::sync::atomic::AtomicU8,
    /// The request's route, for the classifications counted in the stream.
    labels: crate::metrics::RequestLabels,
}

impl SseEvents {
    fn saw(&self, code: ErrorCode) {
        if let Some(i) = ErrorCode::ALL.iter().position(|c| *c == code) {
            self.seen
                .store(i as u8 + 1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The code of the last error event rewritten in the stream, if any.
    pub(super) fn seen(&self) -> Option<ErrorCode> {
        let i = self.seen.load(std::sync::atomic::Ordering::Relaxed);
        (i > 0).then(|| ErrorCode::ALL[usize::from(i) - 1])
    }
}

impl SseEvents {
    pub(super) fn new(
        classifier: Option<&Arc<Classifier>>,
        status: StatusCode,
        headers: &HeaderMap,
        expose_upstream: bool,
    ) -> Self {
        SseEvents {
            rules: classifier.map(|c| Box::new((Arc::clone(c), status, headers.clone()))),
            expose_upstream,
            seen: std::sync::atomic::AtomicU8::new(0),
            labels: crate::metrics::RequestLabels::default(),
        }
    }

    /// The same, with the request's labels for the metrics.
    pub(super) fn with_labels(mut self, labels: crate::metrics::RequestLabels) -> Self {
        self.labels = labels;
        self
    }
}

/// Splits a `200` event stream into lines for inspection, holding back at most `limit` bytes.
///
/// A line ends at `\n`, `\r\n` or `\r` (the SSE line endings); a `\r` that ends one chunk and a
/// `\n` that opens the next are framed as two lines, which changes nothing: only `data:` lines
/// carrying an error are rewritten, and a rewritten line keeps its own ending. A line longer
/// than `limit` (with its ending) is handed on unchanged as its bytes arrive, and inspection
/// resumes at the next line.
pub(super) struct SseFramer {
    /// The start of a line that has not ended yet, at most `limit` bytes.
    partial: BytesMut,
    /// Inside a line longer than the limit: its bytes pass until it ends.
    skipping: bool,
    limit: usize,
    events: SseEvents,
}

impl SseFramer {
    #[cfg(test)]
    pub(super) fn new(limit: usize) -> Self {
        Self::with_events(limit, SseEvents::default())
    }

    pub(super) fn with_events(limit: usize, events: SseEvents) -> Self {
        SseFramer {
            partial: BytesMut::new(),
            skipping: false,
            limit,
            events,
        }
    }

    /// Holds `bytes` after the held start of a line (the callers keep the total within the
    /// limit); the buffer grows by doubling but never past the limit.
    fn hold(&mut self, bytes: &[u8]) {
        let needed = self.partial.len() + bytes.len();
        if needed > self.partial.capacity() {
            let capacity = (2 * self.partial.capacity()).min(self.limit).max(needed);
            let mut grown = BytesMut::with_capacity(capacity);
            grown.extend_from_slice(&self.partial);
            self.partial = grown;
        }
        self.partial.extend_from_slice(bytes);
    }

    /// Whether nothing is held back.
    pub(super) fn is_empty(&self) -> bool {
        self.partial.is_empty()
    }

    /// Whether the bytes handed on so far end inside a line.
    pub(super) fn mid_line(&self) -> bool {
        self.skipping || !self.partial.is_empty()
    }

    /// The held start of a line, as it came.
    pub(super) fn take_held(&mut self) -> Bytes {
        self.skipping = false;
        self.partial.split().freeze()
    }

    /// Takes the next chunk; returns what to hand on, in order (either part may be empty).
    ///
    /// A chunk that ends on a line end and holds no error comes back as the same `Bytes`,
    /// without a copy.
    pub(super) fn push(&mut self, data: Bytes) -> (Bytes, Bytes) {
        let limit = self.limit;
        let mut head = Bytes::new();
        // The output starts at `from` in `data`; lines from `inspect` on are looked at.
        let (from, inspect) = if self.skipping || !self.partial.is_empty() {
            let Some(end) = line_end(&data) else {
                if self.skipping {
                    return (data, Bytes::new());
                }
                if self.partial.len() + data.len() > limit {
                    // Too long to hold: what was held and this chunk pass unchanged.
                    self.skipping = true;
                    return (self.partial.split().freeze(), data);
                }
                self.hold(&data);
                return (Bytes::new(), Bytes::new());
            };
            if self.skipping {
                self.skipping = false;
                (0, end)
            } else if self.partial.len() + end > limit {
                head = self.partial.split().freeze();
                (0, end)
            } else {
                self.hold(&data[..end]);
                let line = self.partial.split().freeze();
                head = rewritten(&line, &self.events).unwrap_or(line);
                (end, end)
            }
        } else {
            (0, 0)
        };
        let cut = data[inspect..]
            .iter()
            .rposition(|&b| b == b'\n' || b == b'\r')
            .map_or(inspect, |i| inspect + i + 1);
        let changed = rewrite_lines(&data, from, inspect, cut, limit, &self.events);
        let rest = data.len() - cut;
        let body = if rest > limit {
            // The last line is already too long: it passes, and so does the rest of it.
            self.skipping = true;
            match changed {
                None => data.slice(from..),
                Some(mut out) => {
                    out.extend_from_slice(&data[cut..]);
                    out.freeze()
                }
            }
        } else {
            if rest > 0 {
                self.hold(&data[cut..]);
            }
            match changed {
                None => data.slice(from..cut),
                Some(out) => out.freeze(),
            }
        };
        (head, body)
    }

    /// The code of the last in-band error event of the stream, if one was rewritten.
    pub(super) fn seen_error(&self) -> Option<ErrorCode> {
        self.events.seen()
    }

    /// The end of the stream: the held start of a line, inspected as a last line.
    pub(super) fn finish(&mut self) -> Bytes {
        self.skipping = false;
        if self.partial.is_empty() {
            return Bytes::new();
        }
        let line = self.partial.split().freeze();
        rewritten(&line, &self.events).unwrap_or(line)
    }
}

/// The end of the first line in `data` (after its ending), if it ends there.
fn line_end(data: &[u8]) -> Option<usize> {
    let i = data.iter().position(|&b| b == b'\n' || b == b'\r')?;
    Some(if data[i] == b'\r' && data.get(i + 1) == Some(&b'\n') {
        i + 2
    } else {
        i + 1
    })
}

/// Rewrites the error lines among the complete lines `data[inspect..cut]` (the lines no longer
/// than `limit`). Returns `data[from..cut]` with them rewritten, or `None` when no line
/// changed (then the caller hands on a slice of `data`, without a copy).
fn rewrite_lines(
    data: &Bytes,
    from: usize,
    inspect: usize,
    cut: usize,
    limit: usize,
    events: &SseEvents,
) -> Option<BytesMut> {
    if !might_hold_error(&data[inspect..cut]) {
        return None;
    }
    let mut out: Option<BytesMut> = None;
    let mut start = inspect;
    while start < cut {
        let end = line_end(&data[start..cut]).map_or(cut, |n| start + n);
        let line = &data[start..end];
        let new = if line.len() <= limit {
            rewritten(line, events)
        } else {
            None
        };
        match (new, &mut out) {
            (Some(new), out) => {
                let out = out.get_or_insert_with(|| {
                    let mut out = BytesMut::with_capacity(cut - from + 64);
                    out.extend_from_slice(&data[from..start]);
                    out
                });
                out.extend_from_slice(&new);
            }
            (None, Some(out)) => out.extend_from_slice(line),
            (None, None) => {}
        }
        start = end;
    }
    out
}

/// The rewritten form of one line (with its line ending, if any) when it is a `data:` line
/// carrying an error; `None` when it stays as it is.
fn rewritten(line: &[u8], events: &SseEvents) -> Option<Bytes> {
    let payload = line.strip_prefix(b"data:")?;
    let trimmed_end = payload
        .iter()
        .rposition(|b| !matches!(b, b'\r' | b'\n'))
        .map_or(0, |i| i + 1);
    let (payload, ending) = payload.split_at(trimmed_end);
    if !might_hold_error(payload) {
        return None;
    }
    let data = payload.trim_ascii_start();
    let mut err = classify_sse_event(data)?;
    if let Some(rules) = &events.rules {
        let (classifier, status, headers) = &**rules;
        err = classifier.apply(*status, headers, data, err);
    }
    events.labels.classified(&err);
    tracing::debug!(layer = "normalize", code = %err.code(), "rewrote an in-band stream error");
    events.saw(err.code());
    let envelope = if events.expose_upstream {
        let opts = EnvelopeOptions::new().expose_upstream(true);
        err.to_response_with::<Bytes>(&opts).into_body()
    } else {
        err.envelope(TypeStyle::OpenAi)
    };
    let mut out = BytesMut::with_capacity(payload.len() + 32);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(&envelope);
    out.extend_from_slice(if ending.is_empty() { b"\n" } else { ending });
    Some(out.freeze())
}

/// A cheap test: every error event the classifier reads mentions `error` (as a key, a type
/// such as `error_type`, or an event name); the classifier decides.
fn might_hold_error(data: &[u8]) -> bool {
    data.windows(5).any(|w| w == b"error")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ERROR_EVENT: &[u8] =
        b"data: {\"error\":{\"message\":\"Overloaded\",\"type\":\"server_error\"}}";

    /// Frames `chunks` through a framer; returns everything handed on, and checks on the way
    /// that the framer never holds more than its limit.
    fn frame_all(limit: usize, chunks: &[&[u8]]) -> Vec<u8> {
        let mut framer = SseFramer::new(limit);
        let mut out = Vec::new();
        for chunk in chunks {
            let (head, rest) = framer.push(Bytes::copy_from_slice(chunk));
            out.extend_from_slice(&head);
            out.extend_from_slice(&rest);
            assert!(framer.partial.len() <= limit);
        }
        out.extend_from_slice(&framer.finish());
        out
    }

    fn stream(ending: &str, events: &[&str]) -> Vec<u8> {
        let mut s = String::new();
        for e in events {
            s.push_str(e);
            s.push_str(ending);
            s.push_str(ending);
        }
        s.into_bytes()
    }

    const EVENTS: [&str; 4] = [
        "event: message_start",
        "data: {\"id\":\"c1\",\"choices\":[{\"delta\":{\"content\":\"an error\"}}]}",
        ": a comment",
        "data: [DONE]",
    ];

    #[test]
    fn whole_lines_pass_without_copy() {
        for ending in ["\n", "\r\n", "\r"] {
            let mut framer = SseFramer::new(DEFAULT_LIMIT);
            let chunk = Bytes::from(stream(ending, &EVENTS[1..2]));
            let (head, out) = framer.push(chunk.clone());
            assert!(head.is_empty());
            assert_eq!(out, chunk);
            assert_eq!(out.as_ptr(), chunk.as_ptr(), "{ending:?}");
            assert!(framer.is_empty());
        }
    }

    const DEFAULT_LIMIT: usize = super::super::DEFAULT_SSE_LINE_LIMIT;

    #[test]
    fn split_lines_are_joined() {
        let mut framer = SseFramer::new(DEFAULT_LIMIT);
        let (a, b) = framer.push(Bytes::from_static(b"data: {\"a\""));
        assert!(a.is_empty() && b.is_empty());
        let (a, b) = framer.push(Bytes::from_static(b":1}\n\ndata: x"));
        assert_eq!(&a[..], b"data: {\"a\":1}\n");
        assert_eq!(&b[..], b"\n");
        assert_eq!(&framer.partial[..], b"data: x");
    }

    #[test]
    fn a_cr_line_end_hands_the_line_on_at_once() {
        // `\r` alone ends a line: the line is not held until the stream ends.
        let mut framer = SseFramer::new(DEFAULT_LIMIT);
        let (a, b) = framer.push(Bytes::from_static(b"data: {\"id\":1}\r"));
        assert!(a.is_empty());
        assert_eq!(&b[..], b"data: {\"id\":1}\r");
        assert!(framer.is_empty());
    }

    #[test]
    fn every_split_of_a_clean_stream_is_byte_identical() {
        for ending in ["\n", "\r\n", "\r"] {
            let sent = stream(ending, &EVENTS);
            for i in 0..=sent.len() {
                for j in i..=sent.len() {
                    let got = frame_all(DEFAULT_LIMIT, &[&sent[..i], &sent[i..j], &sent[j..]]);
                    assert_eq!(got, sent, "{ending:?} split at {i} and {j}");
                }
            }
        }
        // Mixed endings, and a stream that ends without a line end.
        let sent = b"data: a\r\ndata: b\rdata: c\n\rdata: d".to_vec();
        for i in 0..=sent.len() {
            assert_eq!(frame_all(8, &[&sent[..i], &sent[i..]]), sent, "at {i}");
        }
    }

    #[test]
    fn error_events_are_rewritten_the_same_way_whatever_the_split() {
        for ending in ["\n", "\r\n", "\r"] {
            let error = std::str::from_utf8(ERROR_EVENT).unwrap();
            let sent = stream(ending, &[EVENTS[1], error, EVENTS[3]]);
            let whole = frame_all(DEFAULT_LIMIT, &[&sent]);
            assert_ne!(whole, sent);
            let text = String::from_utf8(whole.clone()).unwrap();
            assert!(
                text.contains("\"code\":\"service_unavailable\""),
                "{text:?}"
            );
            // The rewritten line keeps its own line ending.
            assert!(
                text.contains(&format!("}}}}{ending}{ending}data: [DONE]")),
                "{text:?}"
            );
            assert!(
                whole.starts_with(&stream(ending, &EVENTS[1..2])),
                "{text:?}"
            );
            for i in 0..=sent.len() {
                assert_eq!(
                    frame_all(DEFAULT_LIMIT, &[&sent[..i], &sent[i..]]),
                    whole,
                    "{ending:?} split at {i}"
                );
            }
        }
    }

    #[test]
    fn a_line_over_the_limit_passes_unchanged_and_inspection_resumes_after_it() {
        let limit = 64;
        let long = format!("data: {}", "y".repeat(1000));
        let error = std::str::from_utf8(ERROR_EVENT).unwrap();
        let sent = format!("{long}\n\n{error}\n\n");
        let whole = String::from_utf8(frame_all(limit, &[sent.as_bytes()])).unwrap();
        assert!(whole.starts_with(&format!("{long}\n\n")));
        assert!(whole.contains("service_unavailable"), "{whole}");
        // Fed in small pieces, the framer never holds more than the limit (`frame_all` checks)
        // and the output is the same.
        let pieces: Vec<&[u8]> = sent.as_bytes().chunks(7).collect();
        assert_eq!(frame_all(limit, &pieces), whole.as_bytes());
        let pieces: Vec<&[u8]> = sent.as_bytes().chunks(100).collect();
        assert_eq!(frame_all(limit, &pieces), whole.as_bytes());
    }

    #[test]
    fn an_error_line_over_the_limit_is_not_inspected() {
        let error = format!("{}\n\n", std::str::from_utf8(ERROR_EVENT).unwrap());
        let sent = error.as_bytes();
        for limit in [0, 10, ERROR_EVENT.len()] {
            assert_eq!(frame_all(limit, &[sent]), sent, "{limit}");
            let pieces: Vec<&[u8]> = sent.chunks(5).collect();
            assert_eq!(frame_all(limit, &pieces), sent, "{limit}");
        }
        // At the limit (the line with its ending), it is.
        let limit = ERROR_EVENT.len() + 1;
        assert_ne!(frame_all(limit, &[sent]), sent);
        let pieces: Vec<&[u8]> = sent.chunks(5).collect();
        assert_ne!(frame_all(limit, &pieces), sent);
    }

    #[test]
    fn the_held_bytes_stay_under_the_limit_for_a_line_that_never_ends() {
        let limit = 4096;
        let mut framer = SseFramer::new(limit);
        let chunk = Bytes::from(vec![b'x'; 1500]);
        let mut passed = 0;
        for _ in 0..1000 {
            let (a, b) = framer.push(chunk.clone());
            passed += a.len() + b.len();
            assert!(framer.partial.capacity() <= limit);
        }
        passed += framer.finish().len();
        assert_eq!(passed, 1500 * 1000);
        assert!(!framer.mid_line());
    }
}

#[cfg(test)]
mod dialect_tests {
    use super::Dialect;

    #[test]
    fn the_dialect_comes_from_the_first_chunk_with_data() {
        assert_eq!(
            Dialect::of(b"event: message_start\ndata: {\"type\":\"message_start\"}\n\n"),
            Dialect::Anthropic
        );
        assert_eq!(Dialect::of(b"data: {\"choices\":[]}\n\n"), Dialect::OpenAi);
        assert_eq!(
            Dialect::of(b"event: response.created\ndata: {}\n\n"),
            Dialect::OpenAi
        );
        assert_eq!(Dialect::of(b": keep-alive\n\n"), Dialect::Unknown);
    }
}
