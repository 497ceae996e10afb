//! Anthropic `{"type":"error","error":{"type","message"},"request_id"}`, also inside SSE
//! `event: error` frames. Overload is `529 overloaded_error`; billing arrives as a 400
//! `invalid_request_error` whose message speaks of the credit balance (see the billing rule).

use crate::error::ErrorCode::*;

use super::rules::Table;

/// Anthropic error types (`invalid_request_error` is generic and left out).
pub const TABLE: Table = &[
    ("authentication_error", InvalidApiKey),
    ("permission_error", PermissionDenied),
    ("not_found_error", NotFound),
    ("request_too_large", RequestTooLarge),
    ("rate_limit_error", RateLimitExceeded),
    ("api_error", InternalError),
    ("overloaded_error", ServiceUnavailable),
    ("timeout_error", Timeout),
];

/// Types that mean billing.
pub const BILLING: &[&str] = &["billing_error"];
