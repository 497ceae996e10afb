use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Response, StatusCode};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::body::{after, earliest, Expired, NormalizeBody, SseEvents, Timers};
use super::NormalizeOptions;
use crate::body::BoxError;
use crate::classify::{classify_response, classify_sse_event, code_for_status, Classifier};
use crate::error::{ApiError, ErrorCode};
use crate::policy::classify_error;

pin_project! {
    /// The response future of [`NormalizeErrors`](super::NormalizeErrors).
    ///
    /// Success answers are handed on as soon as their head arrives; error answers are read up
    /// to the configured limit and for at most the configured time, classified and replaced by
    /// the envelope.
    pub struct ResponseFuture<F, B> {
        #[pin]
        state: State<F, B>,
        options: NormalizeOptions,
        // The request was a `HEAD`: its answer has no body, whatever its headers say.
        head: bool,
        // The application's rules, if any.
        classifier: Option<Arc<Classifier>>,
        // `gen_ai.client.operation.duration` (zero-sized without the `metrics` feature).
        timer: crate::metrics::OperationTimer,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, B> {
        Calling {
            #[pin]
            fut: F,
        },
        Reading {
            status: StatusCode,
            headers: HeaderMap,
            #[pin]
            body: B,
            buf: BytesMut,
            deadline: Deadline,
        },
        Inspecting {
            parts: Option<http::response::Parts>,
            body: Option<Pin<Box<B>>>,
            // The data frames read so far (none are handed on yet).
            buf: BytesMut,
            // The body opened like an error object: read on (bounded) and classify.
            suspect: bool,
            deadline: Deadline,
        },
        // A 2xx event stream whose head is held until its first event.
        Holding {
            parts: Option<http::response::Parts>,
            body: Option<Pin<Box<B>>>,
            // The one chunk read so far, without a copy; `buf` once there are more.
            single: Option<Bytes>,
            buf: BytesMut,
            sleep: Option<Pin<Box<Sleep>>>,
            // When the time to the first event runs out (`None`: never).
            first_at: Option<Instant>,
            total_at: Option<Instant>,
        },
    }
}

/// The time allowed for a body the layer waits on, started the first time it is not ready.
struct Deadline {
    timeout: Option<Duration>,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Deadline {
    const fn new(timeout: Option<Duration>) -> Self {
        Deadline {
            timeout,
            sleep: None,
        }
    }

    /// Called when the body is not ready: whether the time is up. Otherwise the task is woken
    /// when it is.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        if self.sleep.is_none() {
            let Some(timeout) = self.timeout else {
                return false;
            };
            // Without a runtime there is no timer to wait on: no bound (documented). A timeout
            // too large to add to the clock is no bound either.
            let at = tokio::time::Instant::now().checked_add(timeout);
            let (Some(at), Ok(_)) = (at, tokio::runtime::Handle::try_current()) else {
                self.timeout = None;
                return false;
            };
            self.sleep = Some(Box::pin(tokio::time::sleep_until(at)));
        }
        self.sleep
            .as_mut()
            .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready())
    }
}

/// How inspecting a `200` body ended.
enum Inspected {
    /// Hand the body on; this data frame (already read) first, else what `buf` holds.
    Pass(Option<Bytes>),
    /// The body ended (with these trailers, if any) before anything was handed on.
    End(Option<http_body::Frame<Bytes>>),
    /// The body did not arrive in time.
    TimedOut,
    /// The body broke off.
    BrokeOff,
}

impl<F, B> ResponseFuture<F, B> {
    pub(super) fn new(
        fut: F,
        options: NormalizeOptions,
        head: bool,
        classifier: Option<Arc<Classifier>>,
        timer: crate::metrics::OperationTimer,
    ) -> Self {
        ResponseFuture {
            state: State::Calling { fut },
            options,
            head,
            classifier,
            timer,
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: Body<Data = Bytes>,
{
    type Output = Result<Response<NormalizeBody<B>>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let out = ready!(self.as_mut().poll_answer(cx));
        if let Ok(res) = &out {
            let code = res.extensions().get::<ApiError>().map(ApiError::code);
            self.project().timer.finish(code);
        }
        Poll::Ready(out)
    }
}

impl<F, B, E> ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: Body<Data = Bytes>,
{
    /// The answer: the inner service's, or the envelope it was turned into.
    fn poll_answer(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Response<NormalizeBody<B>>, E>> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Calling { fut } => {
                    let res = match ready!(fut.poll(cx)) {
                        Ok(res) => res,
                        Err(e) => {
                            // Any error type: a tower `Elapsed` in a `BoxError` is a timeout.
                            let err = classify_error(e);
                            tracing::debug!(layer = "normalize", code = %err.code(), "upstream transport error");
                            return Poll::Ready(Ok(envelope(
                                &err,
                                None,
                                this.options,
                                this.timer.labels(),
                            )));
                        }
                    };
                    let status = res.status();
                    if res.extensions().get::<ApiError>().is_some() {
                        // An envelope an inner layer already produced.
                        return Poll::Ready(Ok(res.map(NormalizeBody::passthrough)));
                    }
                    if status.is_success() {
                        if *this.head {
                            // A `HEAD` answer has no body by definition: there is nothing to
                            // inspect, and its empty body is not an empty answer.
                            return Poll::Ready(Ok(res.map(NormalizeBody::passthrough)));
                        }
                        let opts = &*this.options;
                        let sse = (opts.rewrites_sse()
                            || opts.holds_first_event()
                            || opts.times_streams())
                            && is_sse(res.headers());
                        if sse && opts.holds_first_event() {
                            let (parts, body) = res.into_parts();
                            let now = Instant::now();
                            let first_at = after(now, opts.ttft());
                            let total_at = after(now, opts.total());
                            let sleep = earliest(first_at, total_at)
                                .filter(|_| tokio::runtime::Handle::try_current().is_ok())
                                .map(|at| Box::pin(tokio::time::sleep_until(at)));
                            this.state.set(State::Holding {
                                parts: Some(parts),
                                body: Some(Box::pin(body)),
                                single: None,
                                buf: BytesMut::new(),
                                sleep,
                                first_at,
                                total_at,
                            });
                            continue;
                        }
                        if sse {
                            let mut res = res;
                            // A rewritten event changes the length of the stream.
                            res.headers_mut().remove(http::header::CONTENT_LENGTH);
                            let limit = line_limit(opts);
                            let events = SseEvents::new(
                                this.classifier.as_ref(),
                                status,
                                res.headers(),
                                this.options.exposes_upstream(),
                            )
                            .with_labels(this.timer.labels().clone());
                            let timers = if opts.times_streams() {
                                let now = Instant::now();
                                Timers::new(
                                    opts.ttft(),
                                    opts.idle(),
                                    after(now, opts.total()),
                                    false,
                                )
                            } else {
                                Timers::none()
                            };
                            return Poll::Ready(Ok(
                                res.map(|b| NormalizeBody::sse(b, limit, events, timers))
                            ));
                        }
                        if status == StatusCode::OK
                            && this.options.inspects_ok_json()
                            && may_be_json(res.headers())
                            && res.body().size_hint().exact() != Some(0)
                        {
                            let (parts, body) = res.into_parts();
                            this.state.set(State::Inspecting {
                                parts: Some(parts),
                                body: Some(Box::pin(body)),
                                buf: BytesMut::new(),
                                suspect: false,
                                deadline: Deadline::new(this.options.timeout()),
                            });
                            continue;
                        }
                        if status == StatusCode::OK && res.body().size_hint().exact() == Some(0) {
                            // An empty 200 where an answer was due: some providers send it
                            // under overload. The classifier decides.
                            if let Some(err) =
                                classify_with(this.classifier, status, res.headers(), b"")
                            {
                                return Poll::Ready(Ok(envelope(
                                    &err,
                                    Some(res.headers()),
                                    this.options,
                                    this.timer.labels(),
                                )));
                            }
                        }
                        return Poll::Ready(Ok(res.map(NormalizeBody::passthrough)));
                    }
                    if !(status.is_client_error() || status.is_server_error()) {
                        return Poll::Ready(Ok(res.map(NormalizeBody::passthrough)));
                    }
                    let (parts, body) = res.into_parts();
                    let hint = body.size_hint().exact().unwrap_or(0);
                    let hint = usize::try_from(hint).unwrap_or(usize::MAX);
                    this.state.set(State::Reading {
                        status: parts.status,
                        headers: parts.headers,
                        body,
                        buf: BytesMut::with_capacity(hint.min(this.options.limit())),
                        deadline: Deadline::new(this.options.timeout()),
                    });
                }
                StateProj::Reading {
                    status,
                    headers,
                    mut body,
                    buf,
                    deadline,
                } => {
                    let limit = this.options.limit();
                    loop {
                        if buf.len() >= limit {
                            break;
                        }
                        match body.as_mut().poll_frame(cx) {
                            Poll::Ready(Some(Ok(frame))) => {
                                if let Ok(data) = frame.into_data() {
                                    let room = limit - buf.len();
                                    buf.extend_from_slice(&data[..data.len().min(room)]);
                                }
                            }
                            // A body that breaks off is classified on what arrived.
                            Poll::Ready(Some(Err(_)) | None) => break,
                            Poll::Pending if deadline.expired(cx) => {
                                // So is a body that does not arrive in time.
                                tracing::debug!(
                                    layer = "normalize",
                                    upstream_status = status.as_u16(),
                                    read = buf.len(),
                                    "upstream error body timed out"
                                );
                                break;
                            }
                            Poll::Pending => return Poll::Pending,
                        }
                    }
                    // The status is an error status, so the classifier always answers; the
                    // fallback only keeps this total.
                    let err = classify_with(this.classifier, *status, headers, buf).unwrap_or_else(
                        || {
                            ApiError::new(code_for_status(*status), "upstream error")
                                .with_upstream_status(*status)
                        },
                    );
                    tracing::debug!(
                        layer = "normalize",
                        code = %err.code(),
                        upstream_status = status.as_u16(),
                        "normalized upstream error"
                    );
                    let res = envelope(&err, Some(headers), this.options, this.timer.labels());
                    return Poll::Ready(Ok(res));
                }
                StateProj::Inspecting {
                    parts,
                    body,
                    buf,
                    suspect,
                    deadline,
                } => {
                    let limit = this.options.limit();
                    let inner = body
                        .as_mut()
                        .expect("ResponseFuture polled after completion");
                    let outcome = loop {
                        let frame = match inner.as_mut().poll_frame(cx) {
                            Poll::Ready(frame) => frame,
                            Poll::Pending if deadline.expired(cx) => break Inspected::TimedOut,
                            Poll::Pending => return Poll::Pending,
                        };
                        let data = match frame {
                            Some(Ok(frame)) => match frame.into_data() {
                                Ok(data) => data,
                                Err(trailers) => break Inspected::End(Some(trailers)),
                            },
                            Some(Err(_)) => break Inspected::BrokeOff,
                            None => break Inspected::End(None),
                        };
                        if data.is_empty() {
                            continue;
                        }
                        if !*suspect {
                            let verdict = if buf.is_empty() {
                                // The usual case: the first frame decides, without a copy.
                                match opening(&data) {
                                    Opening::NotError => break Inspected::Pass(Some(data)),
                                    verdict => verdict,
                                }
                            } else {
                                buf.extend_from_slice(&data);
                                opening(buf)
                            };
                            if buf.is_empty() {
                                buf.extend_from_slice(&data);
                            }
                            match verdict {
                                Opening::NotError => break Inspected::Pass(None),
                                Opening::Error => *suspect = true,
                                Opening::NeedMore => continue,
                            }
                        } else {
                            buf.extend_from_slice(&data);
                        }
                        if buf.len() > limit {
                            // Too large to be an error answer worth classifying: handed on
                            // as it came.
                            break Inspected::Pass(None);
                        }
                    };
                    let parts = parts
                        .take()
                        .expect("ResponseFuture polled after completion");
                    let body = body.take().expect("ResponseFuture polled after completion");
                    let held = std::mem::take(buf).freeze();
                    let classify = match &outcome {
                        Inspected::Pass(_) => false,
                        // A 200 without a byte where an answer was due is classified too.
                        Inspected::End(_) => *suspect || held.is_empty(),
                        Inspected::BrokeOff | Inspected::TimedOut => *suspect,
                    };
                    if classify {
                        if let Some(err) =
                            classify_with(this.classifier, parts.status, &parts.headers, &held)
                        {
                            tracing::debug!(layer = "normalize", code = %err.code(), "normalized an error inside a 200");
                            return Poll::Ready(Ok(envelope(
                                &err,
                                Some(&parts.headers),
                                this.options,
                                this.timer.labels(),
                            )));
                        }
                    }
                    let held = (!held.is_empty()).then(|| http_body::Frame::data(held));
                    let body = match outcome {
                        Inspected::Pass(Some(first)) => {
                            NormalizeBody::prefixed(Some(http_body::Frame::data(first)), None, body)
                        }
                        Inspected::Pass(None) | Inspected::TimedOut => {
                            NormalizeBody::prefixed(held, None, body)
                        }
                        Inspected::End(trailers) => NormalizeBody::prefixed(held, trailers, body),
                        Inspected::BrokeOff => {
                            // Nothing was handed on yet, so the caller still gets a status.
                            let message = if held.is_none() {
                                "The upstream's answer broke off before its first byte."
                            } else {
                                "The upstream's answer broke off before it finished."
                            };
                            let err = ApiError::new(ErrorCode::ServiceUnavailable, message)
                                .with_status(StatusCode::BAD_GATEWAY);
                            return Poll::Ready(Ok(envelope(
                                &err,
                                None,
                                this.options,
                                this.timer.labels(),
                            )));
                        }
                    };
                    return Poll::Ready(Ok(Response::from_parts(parts, body)));
                }
                StateProj::Holding {
                    parts,
                    body,
                    single,
                    buf,
                    sleep,
                    first_at,
                    total_at,
                } => {
                    let opts = &*this.options;
                    let inner = body
                        .as_mut()
                        .expect("ResponseFuture polled after completion");
                    let held = loop {
                        let frame = match inner.as_mut().poll_frame(cx) {
                            Poll::Ready(frame) => frame,
                            Poll::Pending => {
                                let fired = sleep
                                    .as_mut()
                                    .is_some_and(|s| s.as_mut().poll(cx).is_ready());
                                if !fired {
                                    return Poll::Pending;
                                }
                                let now = Instant::now();
                                let which = if total_at.is_some_and(|at| at <= now)
                                    && !first_at.is_some_and(|at| at <= now)
                                {
                                    Expired::Total
                                } else {
                                    Expired::FirstEvent
                                };
                                let err = which.error();
                                tracing::debug!(layer = "normalize", code = %err.code(), timer = ?which, "held stream timed out");
                                let parts = parts.as_ref().map(|p| &p.headers);
                                return Poll::Ready(Ok(envelope(
                                    &err,
                                    parts,
                                    opts,
                                    this.timer.labels(),
                                )));
                            }
                        };
                        let data = match frame {
                            Some(Ok(frame)) => match frame.into_data() {
                                Ok(data) => data,
                                // Trailers before any event: the stream ended.
                                Err(_) => break Held::Ended,
                            },
                            Some(Err(_)) => break Held::BrokeOff,
                            None => break Held::Ended,
                        };
                        if data.is_empty() {
                            continue;
                        }
                        let view: &[u8] = match single.take() {
                            None if buf.is_empty() => &*single.insert(data),
                            prev => {
                                if let Some(prev) = prev {
                                    buf.extend_from_slice(&prev);
                                }
                                buf.extend_from_slice(&data);
                                buf
                            }
                        };
                        match first_event(view, false) {
                            Some(event) => {
                                break Held::Event(
                                    event.verdict(
                                        this.classifier,
                                        &parts
                                            .as_ref()
                                            .expect("ResponseFuture polled after completion")
                                            .headers,
                                    ),
                                )
                            }
                            None if view.len() > opts.first_event_limit() => break Held::Undecided,
                            None => {}
                        }
                    };
                    let mut parts = parts
                        .take()
                        .expect("ResponseFuture polled after completion");
                    let body = body.take().expect("ResponseFuture polled after completion");
                    let bytes = match single.take() {
                        Some(b) => b,
                        None => std::mem::take(buf).freeze(),
                    };
                    let err = match held {
                        Held::Event(Some(err)) => Some(err),
                        Held::Event(None) | Held::Undecided => None,
                        Held::Ended | Held::BrokeOff => {
                            // An event cut off by the end is read as one.
                            match first_event(&bytes, true) {
                                Some(event) => event.verdict(this.classifier, &parts.headers),
                                None => {
                                    let message = if matches!(held, Held::Ended) {
                                        "The upstream stream ended before its first event."
                                    } else {
                                        "The upstream stream broke off before its first event."
                                    };
                                    Some(
                                        ApiError::new(ErrorCode::ServiceUnavailable, message)
                                            .with_status(StatusCode::BAD_GATEWAY),
                                    )
                                }
                            }
                        }
                    };
                    if let Some(err) = err {
                        tracing::debug!(layer = "normalize", code = %err.code(), "a stream's first event was an error");
                        return Poll::Ready(Ok(envelope(
                            &err,
                            Some(&parts.headers),
                            opts,
                            this.timer.labels(),
                        )));
                    }
                    // The first event is not an error: the head and the held bytes go on, and
                    // the rest streams as it comes.
                    parts.headers.remove(http::header::CONTENT_LENGTH);
                    let events = SseEvents::new(
                        this.classifier.as_ref(),
                        parts.status,
                        &parts.headers,
                        opts.exposes_upstream(),
                    )
                    .with_labels(this.timer.labels().clone());
                    let timers = if opts.idle().is_some() || total_at.is_some() {
                        Timers::new(None, opts.idle(), *total_at, true)
                    } else {
                        Timers::none()
                    };
                    let body =
                        NormalizeBody::sse_held(body, bytes, line_limit(opts), events, timers);
                    return Poll::Ready(Ok(Response::from_parts(parts, body)));
                }
            }
        }
    }
}

/// How holding a stream's head ended.
enum Held {
    /// The first event arrived: an error, or `None` when it is not one.
    Event(Option<ApiError>),
    /// Too many bytes without a complete event: hand on undecided.
    Undecided,
    /// The stream ended before an event completed.
    Ended,
    /// The stream broke off before an event completed.
    BrokeOff,
}

/// The line limit of the framer: `0` (nothing inspected) when in-band errors are not
/// rewritten.
fn line_limit(opts: &NormalizeOptions) -> usize {
    if opts.rewrites_sse() {
        opts.line_limit()
    } else {
        0
    }
}

/// The first event of a stream (a block with at least one `data:` line, ended by a blank
/// line; with `at_end`, the end of `data` ends it too). Comment-only blocks are skipped.
struct FirstEvent<'a> {
    name: Option<&'a [u8]>,
    data: std::borrow::Cow<'a, [u8]>,
}

fn first_event(data: &[u8], at_end: bool) -> Option<FirstEvent<'_>> {
    let mut name = None;
    let mut payload: Option<std::borrow::Cow<'_, [u8]>> = None;
    let mut start = 0;
    while start < data.len() {
        let Some(i) = data[start..]
            .iter()
            .position(|&b| b == b'\n' || b == b'\r')
            .map(|i| start + i)
        else {
            if !at_end {
                return None;
            }
            // The last line, unended.
            field(&data[start..], &mut name, &mut payload);
            break;
        };
        let line = &data[start..i];
        start = if data[i] == b'\r' && data.get(i + 1) == Some(&b'\n') {
            i + 2
        } else {
            i + 1
        };
        if line.is_empty() {
            if let Some(data) = payload.take() {
                return Some(FirstEvent { name, data });
            }
            name = None;
            continue;
        }
        field(line, &mut name, &mut payload);
    }
    if at_end {
        return payload.map(|data| FirstEvent { name, data });
    }
    None
}

/// Reads one SSE line into the event being built.
fn field<'a>(
    line: &'a [u8],
    name: &mut Option<&'a [u8]>,
    payload: &mut Option<std::borrow::Cow<'a, [u8]>>,
) {
    let value = |v: &'a [u8]| v.strip_prefix(b" ").unwrap_or(v);
    if let Some(v) = line.strip_prefix(b"data:") {
        let v = value(v);
        match payload {
            None => *payload = Some(std::borrow::Cow::Borrowed(v)),
            Some(p) => {
                let p = p.to_mut();
                p.push(b'\n');
                p.extend_from_slice(v);
            }
        }
    } else if let Some(v) = line.strip_prefix(b"event:") {
        *name = Some(value(v));
    }
}

impl FirstEvent<'_> {
    /// The event's error, if it is one.
    fn verdict(
        &self,
        classifier: &Option<Arc<Classifier>>,
        headers: &HeaderMap,
    ) -> Option<ApiError> {
        let found = classify_sse_event(&self.data);
        let mut err = match (found, self.name) {
            (Some(err), _) => err,
            (None, Some(b"error")) => ApiError::new(
                ErrorCode::ServiceUnavailable,
                "The upstream stream's first event was an error.",
            )
            .with_status(StatusCode::BAD_GATEWAY),
            (None, _) => return None,
        };
        if let Some(c) = classifier {
            err = c.apply(StatusCode::OK, headers, &self.data, err);
        }
        Some(err)
    }
}

/// The built-in classification, then the application's rules when there are any.
fn classify_with(
    classifier: &Option<Arc<Classifier>>,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
) -> Option<ApiError> {
    match classifier {
        Some(c) => c.classify_response(status, headers, body),
        None => classify_response(status, headers, body),
    }
}

/// Upstream headers worth keeping on the envelope: rate-limit state and request ids.
fn keep_header(name: &str) -> bool {
    name.starts_with("x-ratelimit-")
        || name.starts_with("anthropic-ratelimit-")
        || matches!(
            name,
            "x-request-id" | "request-id" | "openai-processing-ms" | "x-amzn-requestid"
        )
}

fn envelope<B>(
    err: &ApiError,
    upstream: Option<&HeaderMap>,
    options: &NormalizeOptions,
    labels: &crate::metrics::RequestLabels,
) -> Response<NormalizeBody<B>> {
    labels.classified(err);
    let mut res: Response<NormalizeBody<B>> = err.to_response_with(options.envelope());
    if let Some(upstream) = upstream {
        let headers = res.headers_mut();
        for (name, value) in upstream {
            if keep_header(name.as_str()) && !headers.contains_key(name) {
                headers.append(name.clone(), value.clone());
            }
        }
    }
    res
}

/// A JSON content type, or none at all.
fn may_be_json(headers: &HeaderMap) -> bool {
    match headers.get(http::header::CONTENT_TYPE) {
        None => true,
        Some(v) => v
            .as_bytes()
            .get(..16)
            .is_some_and(|p| p.eq_ignore_ascii_case(b"application/json")),
    }
}

/// What the opening bytes of a `200` JSON body say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opening {
    /// It opens like an error object: read it (bounded) and let the classifier decide.
    Error,
    /// It cannot be an error answer: hand it on at once.
    NotError,
    /// Too few bytes to tell.
    NeedMore,
}

/// Whether a JSON body opens like an error object, the shapes the classifier reads inside a
/// `200`: `{"error":` followed by an object or a string, `{"type":"error"`,
/// `{"object":"error"`, possibly inside `[`, whitespace allowed between tokens. `"error":null`
/// (every Responses API object has it) is not an error, nor is an `"error"` key further in.
fn opening(data: &[u8]) -> Opening {
    /// Openings longer than this (whitespace) are not looked at.
    const WINDOW: usize = 1024;
    fn skip_ws(d: &[u8], i: &mut usize) {
        while d.get(*i).is_some_and(u8::is_ascii_whitespace) {
            *i += 1;
        }
    }
    /// `Some(true)`: `lit` is at `*i` (and `*i` moves past it); `None`: the data ends inside it.
    fn lit(d: &[u8], i: &mut usize, lit: &[u8]) -> Option<bool> {
        let rest = &d[(*i).min(d.len())..];
        let n = rest.len().min(lit.len());
        if rest[..n] != lit[..n] {
            return Some(false);
        }
        if n < lit.len() {
            return None;
        }
        *i += lit.len();
        Some(true)
    }
    let verdict = (|| {
        let mut i = 0;
        skip_ws(data, &mut i);
        if data.get(i) == Some(&b'[') {
            i += 1;
            skip_ws(data, &mut i);
        }
        match data.get(i) {
            None => return Opening::NeedMore,
            Some(b'{') => i += 1,
            Some(_) => return Opening::NotError,
        }
        skip_ws(data, &mut i);
        let mut key = None;
        let mut partial = false;
        for (k, name) in [&b"\"error\""[..], b"\"type\"", b"\"object\""]
            .iter()
            .enumerate()
        {
            let mut j = i;
            match lit(data, &mut j, name) {
                Some(true) => {
                    key = Some((k, j));
                    break;
                }
                Some(false) => {}
                None => partial = true,
            }
        }
        let Some((k, mut j)) = key else {
            return if partial {
                Opening::NeedMore
            } else {
                Opening::NotError
            };
        };
        skip_ws(data, &mut j);
        match data.get(j) {
            None => return Opening::NeedMore,
            Some(b':') => j += 1,
            Some(_) => return Opening::NotError,
        }
        skip_ws(data, &mut j);
        match (k, data.get(j)) {
            (_, None) => Opening::NeedMore,
            (0, Some(b'{' | b'"')) => Opening::Error,
            (0, Some(_)) => Opening::NotError,
            (_, Some(_)) => match lit(data, &mut j, b"\"error\"") {
                Some(true) => Opening::Error,
                Some(false) => Opening::NotError,
                None => Opening::NeedMore,
            },
        }
    })();
    match verdict {
        Opening::NeedMore if data.len() > WINDOW => Opening::NotError,
        verdict => verdict,
    }
}

fn is_sse(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.as_bytes().get(..17))
        .is_some_and(|v| v.eq_ignore_ascii_case(b"text/event-stream"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openings_of_error_objects() {
        for body in [
            &b"{\"error\":{\"message\":\"x\"}}"[..],
            b"  {\n \"error\" : {",
            b"[{\"error\":\"quota\"",
            b"{\"type\":\"error\",\"error\":{}}",
            b"{ \"object\" : \"error\", \"message\": \"x\"}",
        ] {
            assert_eq!(opening(body), Opening::Error, "{}", body.escape_ascii());
        }
    }

    #[test]
    fn openings_that_are_not_errors() {
        for body in [
            &b"{\"error\":null,\"id\":\"resp_1\"}"[..],
            b"{\"id\":\"resp_1\",\"object\":\"response\",\"error\":null}",
            b"{\"id\":\"chatcmpl-1\",\"error\":{\"message\":\"x\"}}",
            b"{\"type\":\"message\"",
            b"{\"object\":\"errors\"",
            b"{\"errors\":[]}",
            b"\"error\"",
            b"[1,2]",
            b"<html>",
        ] {
            assert_eq!(opening(body), Opening::NotError, "{}", body.escape_ascii());
        }
        assert_eq!(opening(&[b' '; 2000]), Opening::NotError);
    }

    #[test]
    fn openings_cut_short_need_more() {
        let full = b"  [ { \"error\" : {";
        for n in 0..full.len() {
            assert_eq!(opening(&full[..n]), Opening::NeedMore, "{n}");
        }
        assert_eq!(opening(b"{\"type\":\"err"), Opening::NeedMore);
        assert_eq!(opening(b"{\""), Opening::NeedMore);
    }
}
