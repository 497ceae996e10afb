//! OpenAI-style `{"error":{"message","type","param","code"}}` and its many compatible
//! implementations: OpenAI, Azure OpenAI, Groq, Mistral, DeepSeek, xAI, vLLM/SGLang,
//! OpenRouter, Helicone, LiteLLM.
//!
//! Only codes and types that decide the class on their own are listed. Generic ones
//! (`invalid_request_error`, `server_error`, `BadRequestError`) are left to the status and
//! the message.

use crate::error::ErrorCode::*;

use super::rules::Table;

/// Codes and types, matched without regard to case.
pub const TABLE: Table = &[
    // Keys.
    ("invalid_api_key", InvalidApiKey),
    ("api_key_required", InvalidApiKey),
    ("missing_api_key", InvalidApiKey),
    ("invalid_authentication", InvalidApiKey),
    ("unauthorized", InvalidApiKey),
    ("account_deactivated", RevokedApiKey),
    ("api_key_revoked", RevokedApiKey),
    // Requests.
    ("missing_required_parameter", MissingRequiredField),
    ("missing", MissingRequiredField),
    ("invalid_value", InvalidValue),
    ("unknown_parameter", InvalidValue),
    ("unsupported_parameter", InvalidValue),
    ("unsupported_value", InvalidValue),
    ("invalid_type", InvalidValue),
    ("mutually_exclusive_parameters", InvalidValue),
    ("extra_forbidden", InvalidValue),
    ("model_not_found", ModelNotSupported),
    ("model_not_supported", ModelNotSupported),
    ("unsupported_model", ModelNotSupported),
    ("DeploymentNotFound", ModelNotSupported),
    ("OperationNotSupported", ModelNotSupported),
    ("context_length_exceeded", ContextLengthExceeded),
    // llama.cpp server.
    ("exceed_context_size_error", ContextLengthExceeded),
    ("content_filter", ContentPolicyViolation),
    ("content_policy_violation", ContentPolicyViolation),
    ("ResponsibleAIPolicyViolation", ContentPolicyViolation),
    ("unsupported_country_region_territory", PermissionDenied),
    ("request_forbidden", PermissionDenied),
    ("permission_denied", PermissionDenied),
    // Limits. OpenAI's 429 types are `requests` and `tokens`.
    ("rate_limit_exceeded", RateLimitExceeded),
    ("rate_limited", RateLimitExceeded),
    ("throttling_error", RateLimitExceeded),
    ("too_many_requests", RateLimitExceeded),
    ("requests", RateLimitExceeded),
    ("tokens", RateLimitExceeded),
    ("engine_overloaded", ServiceUnavailable),
    ("timeout", Timeout),
];

/// Codes and types that mean billing (`insufficient_quota` has its own rule: DashScope uses
/// it for a rate limit).
pub const BILLING: &[&str] = &["billing_not_active", "billing_hard_limit_reached"];
