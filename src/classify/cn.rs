//! Chinese providers.
//!
//! - Zhipu / GLM (`open.bigmodel.cn`, `api.z.ai`): numeric string codes, `{"error":{"code":"1113",
//!   "message"}}` or flat `{"code":"1261","message"}`. Billing (`1113`) arrives as a 429.
//! - Moonshot / Kimi: OpenAI envelope with its own `type` names.
//! - DashScope / Qwen (compatible mode): OpenAI envelope with DashScope codes; `Arrearage` is
//!   billing, while a bare `insufficient_quota` without billing words is DashScope's
//!   tokens-per-minute limit (see the billing rule).

use crate::error::ErrorCode::{self, *};

use super::envelope::Fields;
use super::rules::Table;

/// Zhipu numeric codes.
pub const ZHIPU: Table = &[
    ("1000", InvalidApiKey),
    ("1001", InvalidApiKey),
    ("1002", InvalidApiKey),
    ("1003", ExpiredApiKey),
    ("1004", InvalidApiKey),
    ("1110", RevokedApiKey),
    ("1111", InvalidApiKey),
    ("1112", RevokedApiKey),
    ("1120", PermissionDenied),
    ("1121", RevokedApiKey),
    ("1210", InvalidValue),
    ("1211", ModelNotSupported),
    ("1212", InvalidValue),
    ("1213", MissingRequiredField),
    ("1214", InvalidValue),
    ("1220", PermissionDenied),
    ("1221", ModelNotSupported),
    ("1222", NotFound),
    ("1234", InternalError),
    ("1260", ContextLengthExceeded),
    ("1261", ContextLengthExceeded),
    ("1301", ContentPolicyViolation),
    ("1302", RateLimitExceeded),
    ("1303", RateLimitExceeded),
    ("1304", RateLimitExceeded),
    ("1305", ServiceUnavailable),
    ("1308", RateLimitExceeded),
];

/// Zhipu billing codes: in arrears, resource package used up or expired.
pub const ZHIPU_BILLING: &[&str] = &["1113", "1309"];

/// Zhipu codes for limits counted per day or per plan period: a retry cannot help soon.
pub const ZHIPU_LONG_LIMITS: &[&str] = &["1304", "1308"];

/// Moonshot types.
pub const MOONSHOT: Table = &[
    ("invalid_authentication_error", InvalidApiKey),
    ("access_terminated_error", PermissionDenied),
    ("permission_denied_error", PermissionDenied),
    ("resource_not_found_error", NotFound),
    ("rate_limit_reached_error", RateLimitExceeded),
    ("engine_overloaded_error", ServiceUnavailable),
    ("content_filter_error", ContentPolicyViolation),
];

/// DashScope codes.
pub const DASHSCOPE: Table = &[
    ("InvalidApiKey", InvalidApiKey),
    ("invalid_parameter_error", InvalidValue),
    ("InvalidParameter", InvalidValue),
    ("DataInspectionFailed", ContentPolicyViolation),
    ("data_inspection_failed", ContentPolicyViolation),
    ("ModelNotFound", ModelNotSupported),
    ("AccessDenied", PermissionDenied),
    ("Throttling", RateLimitExceeded),
    ("Throttling.RateQuota", RateLimitExceeded),
    ("Throttling.AllocationQuota", RateLimitExceeded),
    ("Throttling.Concurrency", ConcurrentLimitExceeded),
    ("InternalError", InternalError),
];

/// Moonshot and DashScope identifiers that mean billing.
pub const BILLING: &[&str] = &[
    "exceeded_current_quota_error",
    "Arrearage",
    "Throttling.FreeTierOnly",
];

/// Baidu Qianfan (ERNIE) numeric `error_code`s, answered with `error_msg`, often in a 200.
pub const QIANFAN: Table = &[
    ("4", RateLimitExceeded),
    ("17", RateLimitExceeded),
    ("18", RateLimitExceeded),
    ("19", InsufficientQuota),
    ("110", InvalidApiKey),
    ("111", ExpiredApiKey),
    ("336000", InternalError),
    ("336001", InvalidValue),
    ("336002", InvalidValue),
    ("336003", InvalidValue),
    ("336100", ServiceUnavailable),
    ("336501", RateLimitExceeded),
    ("336502", RateLimitExceeded),
];

/// MiniMax `base_resp.status_code`s.
pub const MINIMAX: Table = &[
    ("1001", Timeout),
    ("1002", RateLimitExceeded),
    ("1004", InvalidApiKey),
    ("1013", InternalError),
    ("1026", ContentPolicyViolation),
    ("1027", ContentPolicyViolation),
    ("1039", RateLimitExceeded),
    ("2013", InvalidValue),
];

/// The MiniMax status code, when the body is MiniMax's `base_resp`.
pub fn minimax_code(f: &Fields) -> Option<&str> {
    (f.family == "minimax")
        .then_some(f.code.as_deref())
        .flatten()
}

/// The class of a Qianfan or MiniMax numeric code.
pub fn numeric_code(f: &Fields) -> Option<ErrorCode> {
    let code = f.code.as_deref()?;
    match f.family {
        "qianfan" => super::rules::lookup(QIANFAN, code),
        "minimax" => super::rules::lookup(MINIMAX, code),
        _ => None,
    }
}

/// Whether the code is a Zhipu numeric code: four digits, no `type` beside it (Mistral's
/// numeric codes come with a `type`).
pub fn is_zhipu(f: &Fields) -> bool {
    f.kind.is_none()
        && !matches!(f.family, "minimax" | "qianfan")
        && f.code.as_deref().is_some_and(|c| {
            c.len() == 4 && c.starts_with('1') && c.bytes().all(|b| b.is_ascii_digit())
        })
}

/// The class of a Zhipu code.
pub fn zhipu_code(f: &Fields) -> Option<ErrorCode> {
    if !is_zhipu(f) {
        return None;
    }
    super::rules::lookup(ZHIPU, f.code.as_deref()?)
}

/// The family, when the fields name one of these providers.
pub fn family(f: &Fields) -> Option<&'static str> {
    let ids = || [f.code.as_deref(), f.kind.as_deref()].into_iter().flatten();
    let named = |t: Table, extra: &str| {
        ids().any(|id| id == extra || super::rules::lookup(t, id).is_some())
    };
    if is_zhipu(f) {
        Some("zhipu")
    } else if named(MOONSHOT, "exceeded_current_quota_error") {
        Some("moonshot")
    } else if named(DASHSCOPE, "Arrearage")
        || f.message
            .as_deref()
            .is_some_and(|m| m.starts_with("<4") || m.starts_with("<5"))
    {
        Some("dashscope")
    } else {
        None
    }
}
