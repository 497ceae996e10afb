//! Cohere, AWS Bedrock, Ollama, and gateways and relays.
//!
//! - Cohere and Bedrock answer a flat `{"message"}`; Bedrock names the exception in the
//!   `x-amzn-errortype` header (`ThrottlingException:http://…`) or in `__type`.
//! - Ollama answers `{"error":"text"}`, and a plain-text `404 page not found` for a wrong path.
//! - Gateways: one-api (`type: one_api_error`, `unmarshal_response_body_failed` when the
//!   upstream sent HTML), Huawei APIG (`error_msg`/`error_code`), LiteLLM (`litellm.…Error:`
//!   prefixes), OpenRouter (`metadata.provider_name`, `metadata.raw`, `error_type`).

use serde_json::{Map, Value};

use crate::error::ErrorCode::{self, *};

use super::envelope::Fields;
use super::rules::Table;

/// AWS exception names (`ValidationException` is generic).
pub const BEDROCK: Table = &[
    ("ThrottlingException", RateLimitExceeded),
    ("TooManyRequestsException", RateLimitExceeded),
    ("ServiceQuotaExceededException", RateLimitExceeded),
    ("AccessDeniedException", PermissionDenied),
    ("ResourceNotFoundException", ModelNotSupported),
    ("ModelNotReadyException", ServiceUnavailable),
    ("ServiceUnavailableException", ServiceUnavailable),
    ("ModelTimeoutException", Timeout),
    ("InternalServerException", InternalError),
    ("ModelErrorException", InternalError),
    ("ModelStreamErrorException", InternalError),
    ("UnrecognizedClientException", InvalidApiKey),
    ("InvalidSignatureException", InvalidApiKey),
    ("IncompleteSignatureException", InvalidApiKey),
    ("MissingAuthenticationTokenException", InvalidApiKey),
    ("ExpiredTokenException", ExpiredApiKey),
];

/// Gateway codes and types.
pub const GATEWAYS: Table = &[
    // one-api / new-api: the upstream answered something that is not JSON, or not at all.
    ("unmarshal_response_body_failed", ServiceUnavailable),
    ("do_request_failed", ServiceUnavailable),
    ("read_response_body_failed", ServiceUnavailable),
    // Huawei APIG throttling.
    ("APIG.0308", RateLimitExceeded),
    // OpenRouter `error_type`.
    ("provider_unavailable", ServiceUnavailable),
    ("provider_overloaded", ServiceUnavailable),
    ("rate_limit", RateLimitExceeded),
];

/// Identifiers that mean billing.
pub const BILLING: &[&str] = &[
    "payment_required",
    "insufficient_credits",
    "insufficient_balance",
    "insufficient_balance_error",
    "credit_limit",
];

/// The family, when the body is a gateway's own shape.
pub fn family(
    o: &Map<String, Value>,
    inner: &Map<String, Value>,
    f: &Fields,
) -> Option<&'static str> {
    let md = inner.get("metadata").and_then(Value::as_object);
    if md.is_some_and(|m| m.contains_key("provider_name") || m.contains_key("raw"))
        || (md.is_some() && o.get("code").is_some_and(Value::is_number))
    {
        Some("openrouter")
    } else if o.contains_key("__type") {
        Some("bedrock")
    } else if o.contains_key("error_msg")
        || f.kind.as_deref() == Some("one_api_error")
        || f.message
            .as_deref()
            .is_some_and(|m| m.starts_with("litellm."))
    {
        Some("gateway")
    } else {
        None
    }
}

/// The exception name in an `x-amzn-errortype` header value.
pub fn amzn_error_type(v: &str) -> Option<String> {
    let name = v.split(':').next()?.trim();
    (!name.is_empty()).then(|| name.to_owned())
}

/// The class from the AWS exception name.
pub fn bedrock_code(f: &Fields) -> Option<ErrorCode> {
    [f.amzn.as_deref(), f.kind.as_deref()]
        .into_iter()
        .flatten()
        .find_map(|id| super::rules::lookup(BEDROCK, id))
}
