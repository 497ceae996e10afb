use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Response, StatusCode};
use http_body::Body;
use pin_project_lite::pin_project;

use super::body::NormalizeBody;
use super::NormalizeOptions;
use crate::classify::{classify_response, classify_transport_error, code_for_status};
use crate::error::ApiError;

pin_project! {
    /// The response future of [`NormalizeErrors`](super::NormalizeErrors).
    ///
    /// Success answers are handed on as soon as their head arrives; error answers are read up
    /// to the configured limit, classified and replaced by the envelope.
    pub struct ResponseFuture<F, B> {
        #[pin]
        state: State<F, B>,
        options: NormalizeOptions,
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
        },
        Inspecting {
            parts: Option<http::response::Parts>,
            body: Option<Pin<Box<B>>>,
            buf: BytesMut,
            // The first frame opened like an error object: read on (bounded) and classify.
            suspect: bool,
        },
        Failed {
            err: Option<ApiError>,
        },
    }
}

impl<F, B> ResponseFuture<F, B> {
    pub(super) fn new(fut: F, options: NormalizeOptions) -> Self {
        ResponseFuture {
            state: State::Calling { fut },
            options,
        }
    }

    pub(super) fn error(err: ApiError, options: NormalizeOptions) -> Self {
        ResponseFuture {
            state: State::Failed { err: Some(err) },
            options,
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body<Data = Bytes>,
{
    type Output = Result<Response<NormalizeBody<B>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Calling { fut } => {
                    let res = match ready!(fut.poll(cx)) {
                        Ok(res) => res,
                        Err(e) => {
                            let e: Box<dyn std::error::Error + Send + Sync> = e.into();
                            let err = classify_transport_error(&*e);
                            tracing::debug!(code = %err.code(), "upstream transport error");
                            return Poll::Ready(Ok(envelope(&err, None, this.options)));
                        }
                    };
                    let status = res.status();
                    if res.extensions().get::<ApiError>().is_some() {
                        // An envelope an inner layer already produced.
                        return Poll::Ready(Ok(res.map(NormalizeBody::passthrough)));
                    }
                    if status.is_success() {
                        if this.options.rewrites_sse() && is_sse(res.headers()) {
                            let mut res = res;
                            // A rewritten event changes the length of the stream.
                            res.headers_mut().remove(http::header::CONTENT_LENGTH);
                            return Poll::Ready(Ok(res.map(NormalizeBody::sse)));
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
                            });
                            continue;
                        }
                        if status == StatusCode::OK && res.body().size_hint().exact() == Some(0) {
                            // An empty 200 where an answer was due: some providers send it
                            // under overload. The classifier decides.
                            if let Some(err) = classify_response(status, res.headers(), b"") {
                                return Poll::Ready(Ok(envelope(
                                    &err,
                                    Some(res.headers()),
                                    this.options,
                                )));
                            }
                        }
                        return Poll::Ready(Ok(res.map(NormalizeBody::passthrough)));
                    }
                    if !(status.is_client_error() || status.is_server_error()) {
                        return Poll::Ready(Ok(res.map(NormalizeBody::passthrough)));
                    }
                    let (parts, body) = res.into_parts();
                    let hint = body.size_hint().exact().unwrap_or(0) as usize;
                    this.state.set(State::Reading {
                        status: parts.status,
                        headers: parts.headers,
                        body,
                        buf: BytesMut::with_capacity(hint.min(this.options.limit())),
                    });
                }
                StateProj::Reading {
                    status,
                    headers,
                    mut body,
                    buf,
                } => {
                    let limit = this.options.limit();
                    loop {
                        if buf.len() >= limit {
                            break;
                        }
                        match ready!(body.as_mut().poll_frame(cx)) {
                            Some(Ok(frame)) => {
                                if let Ok(data) = frame.into_data() {
                                    let room = limit - buf.len();
                                    buf.extend_from_slice(&data[..data.len().min(room)]);
                                }
                            }
                            // A body that breaks off is classified on what arrived.
                            Some(Err(_)) | None => break,
                        }
                    }
                    // The status is an error status, so the classifier always answers; the
                    // fallback only keeps this total.
                    let err = classify_response(*status, headers, buf).unwrap_or_else(|| {
                        ApiError::new(code_for_status(*status), "upstream error")
                            .with_upstream_status(*status)
                    });
                    tracing::debug!(
                        code = %err.code(),
                        upstream_status = status.as_u16(),
                        "normalized upstream error"
                    );
                    let res = envelope(&err, Some(headers), this.options);
                    return Poll::Ready(Ok(res));
                }
                StateProj::Inspecting {
                    parts,
                    body,
                    buf,
                    suspect,
                } => {
                    let limit = this.options.limit();
                    let inner = body
                        .as_mut()
                        .expect("ResponseFuture polled after completion");
                    let first = loop {
                        if *suspect && buf.len() >= limit {
                            break None;
                        }
                        match ready!(inner.as_mut().poll_frame(cx)) {
                            Some(Ok(frame)) if *suspect => {
                                if let Ok(data) = frame.into_data() {
                                    let room = limit - buf.len();
                                    buf.extend_from_slice(&data[..data.len().min(room)]);
                                }
                            }
                            Some(Ok(frame)) => match frame.into_data() {
                                Ok(data) if data.is_empty() => {}
                                Ok(data) if opens_like_error(&data) => {
                                    *suspect = true;
                                    buf.extend_from_slice(&data[..data.len().min(limit)]);
                                }
                                Ok(data) => break Some(http_body::Frame::data(data)),
                                Err(trailers) => break Some(trailers),
                            },
                            Some(Err(_)) if !*suspect => {
                                // Nothing was handed on yet, so the caller still gets a status.
                                let err = ApiError::new(
                                    crate::error::ErrorCode::ServiceUnavailable,
                                    "The upstream's answer broke off before its first byte.",
                                )
                                .with_status(StatusCode::BAD_GATEWAY);
                                return Poll::Ready(Ok(envelope(&err, None, this.options)));
                            }
                            Some(Err(_)) | None => break None,
                        }
                    };
                    let parts = parts
                        .take()
                        .expect("ResponseFuture polled after completion");
                    let body = body.take().expect("ResponseFuture polled after completion");
                    if *suspect || first.is_none() {
                        let held = std::mem::take(buf).freeze();
                        if let Some(err) = classify_response(parts.status, &parts.headers, &held) {
                            tracing::debug!(code = %err.code(), "normalized an error inside a 200");
                            return Poll::Ready(Ok(envelope(
                                &err,
                                Some(&parts.headers),
                                this.options,
                            )));
                        }
                        let first = (!held.is_empty()).then(|| http_body::Frame::data(held));
                        let body = NormalizeBody::prefixed(first, body);
                        return Poll::Ready(Ok(Response::from_parts(parts, body)));
                    }
                    let body = NormalizeBody::prefixed(first, body);
                    return Poll::Ready(Ok(Response::from_parts(parts, body)));
                }
                StateProj::Failed { err } => {
                    let err = err.take().expect("ResponseFuture polled after completion");
                    return Poll::Ready(Ok(envelope(&err, None, this.options)));
                }
            }
        }
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
) -> Response<NormalizeBody<B>> {
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

/// Whether a body's first bytes open like an error object: `{` and, close by, `"error"`.
/// The classifier has the last word; a false alarm only costs reading the body (bounded).
fn opens_like_error(data: &[u8]) -> bool {
    let start = data.iter().position(|b| !b.is_ascii_whitespace());
    match start {
        Some(i) if data[i] == b'{' => data[i..]
            .get(..data.len().min(i + 160) - i)
            .is_some_and(|head| head.windows(7).any(|w| w == b"\"error\"")),
        _ => false,
    }
}

fn is_sse(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.as_bytes().get(..17))
        .is_some_and(|v| v.eq_ignore_ascii_case(b"text/event-stream"))
}
