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

fn is_sse(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.as_bytes().get(..17))
        .is_some_and(|v| v.eq_ignore_ascii_case(b"text/event-stream"))
}
