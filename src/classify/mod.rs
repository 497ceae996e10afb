//! Classification: any upstream answer becomes an [`ApiError`] in the crate's taxonomy.
//!
//! ```
//! use http::{HeaderMap, StatusCode};
//! use llm_layers::classify::classify_response;
//! use llm_layers::error::ErrorCode;
//!
//! let body = br#"{"error":{"message":"Incorrect API key provided.","type":"invalid_request_error","code":"invalid_api_key"}}"#;
//! let err = classify_response(StatusCode::UNAUTHORIZED, &HeaderMap::new(), body).unwrap();
//! assert_eq!(err.code(), ErrorCode::InvalidApiKey);
//! assert!(classify_response(StatusCode::OK, &HeaderMap::new(), b"{}").is_none());
//! ```

use http::{HeaderMap, StatusCode};

use crate::error::{ApiError, ErrorCode};

pub mod wait;

/// Classifies an upstream response. Returns `None` when the response is not an error.
///
/// Never panics, whatever the bytes: empty bodies, invalid UTF-8 and truncated JSON are input.
pub fn classify_response(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Option<ApiError> {
    let _ = (headers, body);
    if status.is_success() || status.is_informational() || status.is_redirection() {
        return None;
    }
    Some(
        ApiError::new(
            code_for_status(status),
            format!("upstream answered with status {}", status.as_u16()),
        )
        .with_upstream_status(status),
    )
}

/// Classifies from the status line and headers alone, for layers that do not read bodies:
/// the code from the status, the wait from `retry-after-ms` / `retry-after`. Returns `None`
/// when the status is not an error.
pub fn classify_head(status: StatusCode, headers: &HeaderMap) -> Option<ApiError> {
    if !(status.is_client_error() || status.is_server_error()) {
        return None;
    }
    let mut err = ApiError::new(
        code_for_status(status),
        format!("upstream answered with status {}", status.as_u16()),
    )
    .with_upstream_status(status);
    err.set_retry_after(wait::from_headers(headers));
    Some(err)
}

/// Classifies one SSE `data:` payload. Returns `None` when it is not an error event.
pub fn classify_sse_event(data: &[u8]) -> Option<ApiError> {
    let _ = data;
    None
}

/// The code for a bare status, when nothing else is known.
pub fn code_for_status(status: StatusCode) -> ErrorCode {
    match status.as_u16() {
        401 => ErrorCode::InvalidApiKey,
        402 => ErrorCode::InsufficientQuota,
        403 => ErrorCode::PermissionDenied,
        404 => ErrorCode::NotFound,
        408 | 504 | 524 => ErrorCode::Timeout,
        413 => ErrorCode::RequestTooLarge,
        429 => ErrorCode::RateLimitExceeded,
        500 => ErrorCode::InternalError,
        502 | 503 | 520..=523 | 529 => ErrorCode::ServiceUnavailable,
        400..=499 => ErrorCode::InvalidValue,
        _ => ErrorCode::InternalError,
    }
}

/// Classifies a transport error from the inner service (connection refused or reset, a
/// timeout, a broken body): `504 timeout` when any error in the chain is a timeout, else
/// `502 service_unavailable`. The message names the kind of failure, not the upstream address.
pub fn classify_transport_error(err: &(dyn std::error::Error + 'static)) -> ApiError {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    let mut kind = None;
    while let Some(e) = cur {
        if e.is::<tokio::time::error::Elapsed>() {
            kind = Some(std::io::ErrorKind::TimedOut);
            break;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            kind = Some(io.kind());
            break;
        }
        let text = e.to_string().to_ascii_lowercase();
        if text.contains("timed out")
            || text.contains("timeout")
            || text.contains("deadline has elapsed")
        {
            kind = Some(std::io::ErrorKind::TimedOut);
            break;
        }
        cur = e.source();
    }
    use std::io::ErrorKind as K;
    match kind {
        Some(K::TimedOut) => {
            ApiError::new(ErrorCode::Timeout, "The upstream did not answer in time.")
                .with_provider("transport")
        }
        Some(K::ConnectionRefused) => ApiError::new(
            ErrorCode::ServiceUnavailable,
            "The upstream refused the connection.",
        )
        .with_status(StatusCode::BAD_GATEWAY)
        .with_provider("transport"),
        Some(K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof) => {
            ApiError::new(
                ErrorCode::ServiceUnavailable,
                "The connection to the upstream was closed before it answered.",
            )
            .with_status(StatusCode::BAD_GATEWAY)
            .with_provider("transport")
        }
        _ => ApiError::new(
            ErrorCode::ServiceUnavailable,
            "The upstream could not be reached.",
        )
        .with_status(StatusCode::BAD_GATEWAY)
        .with_provider("transport"),
    }
}
