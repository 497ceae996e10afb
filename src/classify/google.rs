//! Google: Gemini API and Vertex AI, `{"error":{"code","message","status","details"}}`, often
//! wrapped in an array by `streamGenerateContent`.
//!
//! The class comes from `details[].reason` (`ErrorInfo`), then from the gRPC `status`. A bad
//! key is a `400 INVALID_ARGUMENT` with reason `API_KEY_INVALID`; an expired key has the same
//! reason and only the message tells it apart. `RESOURCE_EXHAUSTED` is a rate limit even when
//! the message says "exceeded your current quota, please check your plan and billing"; a
//! `QuotaFailure` whose quota id is per day, or an `ErrorInfo` with `quota_limit_value` `0`,
//! cannot be fixed by a retry. `RetryInfo.retryDelay` gives the wait.

use serde_json::{Map, Value};

use crate::error::ErrorCode::{self, *};

use super::envelope::Fields;
use super::rules::Table;
use super::wait;

/// `ErrorInfo.reason` and legacy `errors[].reason` values.
pub const REASONS: Table = &[
    ("API_KEY_INVALID", InvalidApiKey),
    ("API_KEY_EXPIRED", ExpiredApiKey),
    ("ACCESS_TOKEN_EXPIRED", ExpiredApiKey),
    ("ACCESS_TOKEN_TYPE_UNSUPPORTED", InvalidApiKey),
    ("CREDENTIALS_MISSING", InvalidApiKey),
    ("API_KEY_SERVICE_BLOCKED", PermissionDenied),
    ("API_KEY_HTTP_REFERRER_BLOCKED", PermissionDenied),
    ("API_KEY_IP_ADDRESS_BLOCKED", PermissionDenied),
    ("SERVICE_DISABLED", PermissionDenied),
    ("CONSUMER_SUSPENDED", RevokedApiKey),
    ("RATE_LIMIT_EXCEEDED", RateLimitExceeded),
    ("RESOURCE_EXHAUSTED", RateLimitExceeded),
    ("rateLimitExceeded", RateLimitExceeded),
];

/// Reasons that mean billing.
pub const BILLING: &[&str] = &["BILLING_DISABLED"];

/// gRPC status names (`INVALID_ARGUMENT` and `FAILED_PRECONDITION` are generic).
pub const STATUSES: Table = &[
    ("UNAUTHENTICATED", InvalidApiKey),
    ("PERMISSION_DENIED", PermissionDenied),
    ("NOT_FOUND", NotFound),
    ("RESOURCE_EXHAUSTED", RateLimitExceeded),
    ("INTERNAL", InternalError),
    ("UNKNOWN", InternalError),
    ("UNAVAILABLE", ServiceUnavailable),
    ("DEADLINE_EXCEEDED", Timeout),
    ("CANCELLED", Timeout),
];

/// Reads `details` (`ErrorInfo`, `QuotaFailure`, `RetryInfo`) and legacy `errors[].reason`.
pub fn read_details(inner: &Map<String, Value>, f: &mut Fields) {
    let details = inner.get("details").and_then(Value::as_array);
    for d in details.into_iter().flatten().filter_map(Value::as_object) {
        let ty = d.get("@type").and_then(Value::as_str).unwrap_or("");
        if ty.ends_with("RetryInfo") {
            f.retry_delay = d
                .get("retryDelay")
                .and_then(Value::as_str)
                .and_then(wait::parse_retry_delay);
        } else if ty.ends_with("ErrorInfo") {
            if let Some(r) = d.get("reason").and_then(Value::as_str) {
                f.reasons.push(r.to_owned());
            }
            let md = d.get("metadata").and_then(Value::as_object);
            if md
                .and_then(|m| m.get("quota_limit_value"))
                .and_then(Value::as_str)
                == Some("0")
            {
                f.zero_quota = true;
            }
        } else if ty.ends_with("QuotaFailure") {
            let violations = d.get("violations").and_then(Value::as_array);
            for v in violations
                .into_iter()
                .flatten()
                .filter_map(Value::as_object)
            {
                if let Some(id) = v.get("quotaId").and_then(Value::as_str) {
                    f.quota_ids.push(id.to_owned());
                }
                if v.get("quotaValue").and_then(Value::as_str) == Some("0") {
                    f.zero_quota = true;
                }
            }
        }
    }
    let errors = inner.get("errors").and_then(Value::as_array);
    for e in errors.into_iter().flatten().filter_map(Value::as_object) {
        if let Some(r) = e.get("reason").and_then(Value::as_str) {
            f.reasons.push(r.to_owned());
        }
    }
}

/// The class from reasons, then the gRPC status.
pub fn code(f: &Fields) -> Option<ErrorCode> {
    f.reasons
        .iter()
        .find_map(|r| super::rules::lookup(REASONS, r))
        .or_else(|| {
            f.grpc
                .as_deref()
                .and_then(|s| super::rules::lookup(STATUSES, s))
        })
}
