//! Bodies: the one crate body type, and the one bounded buffering future every layer that must
//! read a request body uses.
//!
//! # `LayerBody`
//!
//! A layer never asks for more of a body type than [`http_body::Body`]: no `From<Bytes>`, no
//! `Default`, no `Clone`. Where a layer hands on something else than the body it was given — a
//! request body it buffered, an envelope it answered with — it uses [`LayerBody`]: either the
//! inner body, untouched and unbuffered, or bytes the layer produced. So the same layers stack
//! around hyper's `Incoming`, axum's `Body`, `Full<Bytes>` or a boxed body alike, and an
//! axum `Router` takes `LayerBody<Body>` as it takes any body.
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use llm_layers::body::LayerBody;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! // The body a client sent, passed on as it is ...
//! let passed = LayerBody::new(Full::new(Bytes::from_static(b"from the client")));
//! // ... or bytes a layer produced (a replayed request, an envelope).
//! let produced: LayerBody<Full<Bytes>> = LayerBody::full(Bytes::from_static(b"from a layer"));
//! assert_eq!(passed.collect().await.unwrap().to_bytes(), "from the client");
//! assert_eq!(produced.collect().await.unwrap().to_bytes(), "from a layer");
//! # }
//! ```
//!
//! # Buffering
//!
//! A layer reads a request body only when it needs to (the model for an allow-list, the token
//! estimate for a limit, the bytes for a replay), never past a limit, and through one future,
//! [`BufferRequest`], with one limit rule: a `content-length` or a size hint over the limit is
//! refused before a byte is read, and a body that grows past it while it is read is refused
//! then. A body an earlier layer buffered arrives as one chunk, so buffering it again copies
//! nothing.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::request::Parts;
use http::{HeaderMap, Request};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::error::{ApiError, ErrorCode};

/// The error type layers use where they box errors: any error, sendable between threads.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The default limit for buffered request bodies: 4 MiB.
pub const DEFAULT_BODY_LIMIT: usize = 4 * 1024 * 1024;

pin_project! {
    /// A body that is either the inner body, passed on untouched, or bytes a layer produced
    /// (a buffered request handed on, a replay, an envelope). See the [module docs](self).
    ///
    /// Its error type is the inner body's: bytes a layer produced never fail.
    // The variants' fields are named by the variants' docs.
    #[allow(missing_docs)]
    #[derive(Debug)]
    #[project = LayerBodyProj]
    pub enum LayerBody<B> {
        /// The inner body, untouched.
        Inner {
            #[pin]
            body: B,
        },
        /// Bytes a layer produced; `None` once they were read (or when there were none).
        Full {
            data: Option<Bytes>,
        },
    }
}

impl<B> LayerBody<B> {
    /// The inner body, passed on untouched.
    pub const fn new(body: B) -> Self {
        LayerBody::Inner { body }
    }

    /// Bytes a layer produced.
    pub fn full(data: Bytes) -> Self {
        LayerBody::Full {
            data: (!data.is_empty()).then_some(data),
        }
    }

    /// No bytes at all.
    pub const fn empty() -> Self {
        LayerBody::Full { data: None }
    }

    /// Whether this is bytes a layer produced rather than the inner body.
    pub fn is_produced(&self) -> bool {
        matches!(self, LayerBody::Full { .. })
    }

    /// The inner body, if this is it.
    pub fn into_inner(self) -> Option<B> {
        match self {
            LayerBody::Inner { body } => Some(body),
            LayerBody::Full { .. } => None,
        }
    }
}

impl<B> LayerBody<LayerBody<B>> {
    /// One level of `LayerBody` instead of two, for a service that two body-reading layers
    /// wrap (each hands on a `LayerBody` of what it was given): the inner body untouched, or the
    /// bytes whichever layer produced them. Nothing is copied.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use llm_layers::body::LayerBody;
    ///
    /// let twice: LayerBody<LayerBody<Full<Bytes>>> = LayerBody::new(LayerBody::full(Bytes::from_static(b"x")));
    /// assert!(twice.flatten().is_produced());
    /// ```
    pub fn flatten(self) -> LayerBody<B> {
        match self {
            LayerBody::Inner { body } => body,
            LayerBody::Full { data } => LayerBody::Full { data },
        }
    }
}

impl<B> Default for LayerBody<B> {
    fn default() -> Self {
        LayerBody::empty()
    }
}

impl<B> From<Bytes> for LayerBody<B> {
    fn from(data: Bytes) -> Self {
        LayerBody::full(data)
    }
}

impl<B> Body for LayerBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project() {
            LayerBodyProj::Inner { body } => body.poll_frame(cx),
            LayerBodyProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match self {
            LayerBody::Inner { body } => body.is_end_stream(),
            LayerBody::Full { data } => data.is_none(),
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match self {
            LayerBody::Inner { body } => body.size_hint(),
            LayerBody::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

/// A body could not be buffered.
#[derive(Debug)]
pub enum BufferError {
    /// The body is longer than the limit.
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// Reading the body failed.
    Read(BoxError),
}

impl std::fmt::Display for BufferError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BufferError::TooLarge { limit } => write!(f, "body is larger than {limit} bytes"),
            BufferError::Read(e) => write!(f, "could not read body: {e}"),
        }
    }
}

impl std::error::Error for BufferError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BufferError::TooLarge { .. } => None,
            BufferError::Read(e) => Some(&**e),
        }
    }
}

impl BufferError {
    /// The envelope error for a request body that could not be buffered: `413
    /// request_too_large` past the limit, `400 invalid_value` when reading failed.
    pub fn to_api_error(&self) -> ApiError {
        match self {
            BufferError::TooLarge { limit } => ApiError::new(
                ErrorCode::RequestTooLarge,
                format!("The request body is larger than the limit of {limit} bytes."),
            )
            .never_fits(),
            BufferError::Read(_) => ApiError::new(
                ErrorCode::InvalidValue,
                "The request body could not be read to the end.",
            ),
        }
    }
}

/// The length a request announces in `content-length`, when it is a number.
pub fn announced_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// The one limit rule, before a byte is read: `Err` when the announced `content-length` or the
/// body's size hint is over `limit`.
pub fn check_limit<B: Body>(
    headers: &HeaderMap,
    body: &B,
    limit: usize,
) -> Result<(), BufferError> {
    let limit_u64 = limit as u64;
    if announced_length(headers).is_some_and(|n| n > limit_u64)
        || body.size_hint().lower() > limit_u64
    {
        return Err(BufferError::TooLarge { limit });
    }
    Ok(())
}

pin_project! {
    /// Reads a body to the end, at most `limit` bytes: the one buffering future of the crate.
    ///
    /// A body that arrives as one chunk (bytes an earlier layer buffered) is returned without
    /// a copy.
    #[derive(Debug)]
    pub struct BufferBody<B> {
        #[pin]
        body: B,
        limit: usize,
        first: Option<Bytes>,
        rest: BytesMut,
        failed: Option<BufferError>,
    }
}

impl<B: Body> BufferBody<B> {
    /// Buffers `body`, failing once more than `limit` bytes arrive or are announced by the
    /// body's size hint.
    pub fn new(body: B, limit: usize) -> Self {
        let failed =
            (body.size_hint().lower() > limit as u64).then_some(BufferError::TooLarge { limit });
        BufferBody {
            body,
            limit,
            first: None,
            rest: BytesMut::new(),
            failed,
        }
    }
}

impl<B> Future for BufferBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Output = Result<Bytes, BufferError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Some(e) = this.failed.take() {
            return Poll::Ready(Err(e));
        }
        loop {
            match ready!(this.body.as_mut().poll_frame(cx)) {
                None => {
                    let bytes = if this.rest.is_empty() {
                        this.first.take().unwrap_or_default()
                    } else {
                        std::mem::take(this.rest).freeze()
                    };
                    return Poll::Ready(Ok(bytes));
                }
                Some(Err(e)) => return Poll::Ready(Err(BufferError::Read(e.into()))),
                Some(Ok(frame)) => {
                    // Request trailers are dropped: LLM APIs do not use them.
                    let Ok(mut data) = frame.into_data() else {
                        continue;
                    };
                    let n = data.remaining();
                    let read = this.first.as_ref().map_or(0, Bytes::len) + this.rest.len();
                    if read + n > *this.limit {
                        return Poll::Ready(Err(BufferError::TooLarge { limit: *this.limit }));
                    }
                    if n == 0 {
                        continue;
                    }
                    if this.first.is_none() && this.rest.is_empty() {
                        *this.first = Some(data.copy_to_bytes(n));
                    } else {
                        if let Some(first) = this.first.take() {
                            this.rest.reserve(first.len() + n);
                            this.rest.extend_from_slice(&first);
                        }
                        while data.has_remaining() {
                            let chunk = data.chunk();
                            let len = chunk.len();
                            this.rest.extend_from_slice(chunk);
                            data.advance(len);
                        }
                    }
                }
            }
        }
    }
}

pin_project! {
    /// Buffers a request's body (at most `limit` bytes, [`check_limit`] first) and gives back
    /// the head and the bytes; [`BufferRequest::rebuild`] puts them together again as a
    /// `Request<LayerBody<B>>`.
    ///
    /// On failure the head comes back too, so the layer can still answer (the body is gone).
    #[derive(Debug)]
    pub struct BufferRequest<B> {
        parts: Option<Parts>,
        #[pin]
        body: BufferBody<B>,
    }
}

impl<B: Body> BufferRequest<B> {
    /// Starts buffering `req`'s body.
    pub fn new(req: Request<B>, limit: usize) -> Self {
        let (parts, body) = req.into_parts();
        let mut body = BufferBody::new(body, limit);
        if announced_length(&parts.headers).is_some_and(|n| n > limit as u64) {
            body.failed = Some(BufferError::TooLarge { limit });
        }
        BufferRequest {
            parts: Some(parts),
            body,
        }
    }
}

impl<B> BufferRequest<B> {
    /// The request with `bytes` as its body.
    pub fn rebuild(parts: Parts, bytes: Bytes) -> Request<LayerBody<B>> {
        Request::from_parts(parts, LayerBody::full(bytes))
    }
}

impl<B> Future for BufferRequest<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Output = Result<(Parts, Bytes), (Parts, BufferError)>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = ready!(this.body.poll(cx));
        let parts = this
            .parts
            .take()
            .expect("BufferRequest polled after completion");
        Poll::Ready(match out {
            Ok(bytes) => Ok((parts, bytes)),
            Err(e) => Err((parts, e)),
        })
    }
}

/// Reads `body` to the end, failing once more than `limit` bytes arrive (or are announced by
/// the body's size hint). [`BufferBody`] as an `async fn`.
pub async fn buffer<B>(body: B, limit: usize) -> Result<Bytes, BufferError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    BufferBody::new(body, limit).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

    #[tokio::test]
    async fn limits_are_enforced() {
        let ok = buffer(Full::new(Bytes::from_static(b"hello")), 5)
            .await
            .unwrap();
        assert_eq!(&ok[..], b"hello");
        let err = buffer(Full::new(Bytes::from_static(b"hello!")), 5)
            .await
            .unwrap_err();
        assert!(matches!(err, BufferError::TooLarge { limit: 5 }));
        assert_eq!(err.to_api_error().code(), ErrorCode::RequestTooLarge);
    }

    fn chunks(parts: &[&'static str]) -> impl Body<Data = Bytes, Error = std::io::Error> {
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn chunked_bodies_are_joined_and_limited_as_they_grow() {
        let ok = buffer(chunks(&["he", "", "llo", " world"]), 11)
            .await
            .unwrap();
        assert_eq!(&ok[..], b"hello world");
        let err = buffer(chunks(&["hello", " world"]), 10).await.unwrap_err();
        assert!(matches!(err, BufferError::TooLarge { limit: 10 }));
    }

    #[tokio::test]
    async fn one_chunk_is_not_copied() {
        let data = Bytes::from_static(b"{\"model\":\"gpt-4o\"}");
        let out = buffer(LayerBody::<Full<Bytes>>::full(data.clone()), 100)
            .await
            .unwrap();
        assert_eq!(out.as_ptr(), data.as_ptr());
    }

    #[tokio::test]
    async fn an_announced_length_over_the_limit_is_refused_unread() {
        let req = Request::builder()
            .header("content-length", "6")
            .body(chunks(&["hello!"]))
            .unwrap();
        let (parts, err) = BufferRequest::new(req, 5).await.unwrap_err();
        assert!(matches!(err, BufferError::TooLarge { limit: 5 }));
        assert_eq!(parts.headers["content-length"], "6");
    }

    #[tokio::test]
    async fn request_is_handed_on_intact() {
        let req = Request::new(Full::new(Bytes::from_static(b"{}")));
        let (parts, bytes) = BufferRequest::new(req, 10).await.unwrap();
        assert_eq!(&bytes[..], b"{}");
        let req = BufferRequest::<Full<Bytes>>::rebuild(parts, bytes.clone());
        let again = req.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(again, bytes);
    }

    #[tokio::test]
    async fn the_produced_variant_reports_its_size_and_end() {
        let b: LayerBody<Full<Bytes>> = LayerBody::full(Bytes::from_static(b"abc"));
        assert_eq!(b.size_hint().exact(), Some(3));
        assert!(!b.is_end_stream());
        assert!(LayerBody::<Full<Bytes>>::empty().is_end_stream());
        assert!(LayerBody::<Full<Bytes>>::full(Bytes::new()).is_end_stream());
    }
}
