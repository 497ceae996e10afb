//! Bounded body buffering, shared by every layer that must read a body.
//!
//! A layer reads a request body only when it needs to (the model for an allow-list, the token
//! estimate for a limit, the bytes for a replay), reads it at most once, never past a limit, and
//! hands the same bytes on to the inner service.

use bytes::Bytes;
use http::Request;
use http_body::Body;
use http_body_util::{BodyExt, Limited};

use crate::error::{ApiError, ErrorCode};

/// The default limit for buffered request bodies: 4 MiB.
pub const DEFAULT_BODY_LIMIT: usize = 4 * 1024 * 1024;

/// A body could not be buffered.
#[derive(Debug)]
pub enum BufferError {
    /// The body is longer than the limit.
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// Reading the body failed.
    Read(Box<dyn std::error::Error + Send + Sync>),
}

impl std::fmt::Display for BufferError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BufferError::TooLarge { limit } => write!(f, "body is larger than {limit} bytes"),
            BufferError::Read(e) => write!(f, "could not read body: {e}"),
        }
    }
}

impl std::error::Error for BufferError {}

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

/// Reads `body` to the end, failing once more than `limit` bytes arrive (or are announced by
/// the body's size hint).
pub async fn buffer<B>(body: B, limit: usize) -> Result<Bytes, BufferError>
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if body.size_hint().lower() > limit as u64 {
        return Err(BufferError::TooLarge { limit });
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => {
            if e.is::<http_body_util::LengthLimitError>() {
                Err(BufferError::TooLarge { limit })
            } else {
                Err(BufferError::Read(e))
            }
        }
    }
}

/// Buffers a request's body (at most `limit` bytes) and puts the same bytes back, so the
/// request goes on intact. Returns the rebuilt request and the bytes.
///
/// A `content-length` over the limit is refused before anything is read.
pub async fn buffer_request<B>(
    req: Request<B>,
    limit: usize,
) -> Result<(Request<B>, Bytes), BufferError>
where
    B: Body + From<Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (parts, body) = req.into_parts();
    let announced = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        return Err(BufferError::TooLarge { limit });
    }
    let bytes = buffer(body, limit).await?;
    Ok((Request::from_parts(parts, B::from(bytes.clone())), bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

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

    #[tokio::test]
    async fn request_is_handed_on_intact() {
        let req = Request::new(Full::new(Bytes::from_static(b"{}")));
        let (req, bytes) = buffer_request(req, 10).await.unwrap();
        assert_eq!(&bytes[..], b"{}");
        let again = req.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(again, bytes);
    }
}
