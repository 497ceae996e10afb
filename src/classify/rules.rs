//! The decision: from the status and what the body says to one [`ErrorCode`].
//!
//! Order (the first that answers wins):
//! 1. billing, whatever the status: a billing code or type, status 402, or billing words;
//! 2. the provider's own code or type, through the family tables;
//! 3. the status, refined by the message for the statuses that do not decide alone
//!    (400/422 and other 4xx, 404, 403, 429, 500, and errors inside a 200);
//! 4. refinements: an expired or revoked key, a not-found model, a rate limit that is really
//!    a request too large, a concurrency limit, or a daily / zero quota (never worth a retry).

use crate::error::ErrorCode::{self, *};
use crate::error::TypeStyle;

use super::envelope::Fields;
use super::{anthropic, cn, google, openai, others};

/// A table from a provider identifier to a code.
pub type Table = &'static [(&'static str, ErrorCode)];

/// Looks `id` up, ignoring ASCII case.
pub fn lookup(table: Table, id: &str) -> Option<ErrorCode> {
    table
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(id))
        .map(|(_, c)| *c)
}

/// The outcome of the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// The code.
    pub code: ErrorCode,
    /// The request can never succeed as sent, or not within any sensible retry budget.
    pub never_fits: bool,
    /// The message speaks of a daily or hourly limit: without a stated wait, a retry soon is
    /// pointless; with one (a sliding window), the wait decides.
    pub long_limit: bool,
}

fn any(hay: &str, needles: &[&str]) -> bool {
    needles.iter().any(|n| hay.contains(n))
}

const BILLING_WORDS: &[&str] = &[
    "credit balance",
    "insufficient balance",
    "insufficient_balance",
    "insufficient credit",
    "insufficient funds",
    "out of credits",
    "plan and billing",
    "billing details",
    "payment required",
    "purchase credits",
    "account is in arrears",
    "余额不足",
    "欠费",
    "请充值",
];

fn is_billing(status: u16, f: &Fields) -> bool {
    let ids = || {
        [f.code.as_deref(), f.kind.as_deref()]
            .into_iter()
            .flatten()
            .chain(f.reasons.iter().map(String::as_str))
    };
    let lists: [&[&str]; 5] = [
        openai::BILLING,
        anthropic::BILLING,
        google::BILLING,
        cn::BILLING,
        others::BILLING,
    ];
    if ids().any(|id| {
        lists
            .iter()
            .any(|l| l.iter().any(|b| b.eq_ignore_ascii_case(id)))
    }) {
        return true;
    }
    if cn::is_zhipu(f) && cn::ZHIPU_BILLING.contains(&f.code.as_deref().unwrap_or("")) {
        return true;
    }
    if status == 402 {
        return true;
    }
    // Google's RESOURCE_EXHAUSTED says "check your plan and billing details" for per-minute
    // limits: its structure decides, not its words.
    if f.grpc.as_deref() == Some("RESOURCE_EXHAUSTED") || !f.quota_ids.is_empty() {
        return false;
    }
    let words = any(&f.hay, BILLING_WORDS);
    if ids().any(|id| id.eq_ignore_ascii_case("insufficient_quota")) {
        // OpenAI sends code and type `insufficient_quota` with billing words. DashScope sends the
        // code alone on a 429 for its tokens-per-minute limit.
        let typed = f.kind.as_deref() == Some("insufficient_quota");
        return typed || words || status != 429;
    }
    words
}

/// The class from the provider's own identifiers.
fn structured(f: &Fields) -> Option<ErrorCode> {
    if let Some(c) = cn::zhipu_code(f) {
        return Some(c);
    }
    let tables: [Table; 5] = [
        openai::TABLE,
        anthropic::TABLE,
        cn::MOONSHOT,
        cn::DASHSCOPE,
        others::GATEWAYS,
    ];
    let known = |id: &str| tables.iter().find_map(|t| lookup(t, id));
    f.code
        .as_deref()
        .and_then(known)
        .or_else(|| own_envelope(f))
        .or_else(|| f.kind.as_deref().and_then(known))
        .or_else(|| others::bedrock_code(f))
        .or_else(|| google::code(f))
}

/// The code of this crate's own envelope (an llm-layers gateway upstream): a wire `code` with
/// the `type` this crate writes for it, in either style.
fn own_envelope(f: &Fields) -> Option<ErrorCode> {
    let code = f.code.as_deref()?.parse::<ErrorCode>().ok()?;
    let kind = f.kind.as_deref()?;
    [TypeStyle::OpenAi, TypeStyle::Descriptive]
        .into_iter()
        .any(|style| code.error_type(style) == kind)
        .then_some(code)
}

/// Message rules for statuses that do not decide alone, in order.
const TEXT_RULES: &[(&[&str], ErrorCode)] = &[
    (
        &[
            "incorrect api key",
            "invalid api key",
            "api key not valid",
            "invalid x-api-key",
            "invalid api token",
            "invalid authentication",
            "authentication fails",
            "api key required",
            "api key is required",
            "provide an api key",
            "api key expired",
        ],
        InvalidApiKey,
    ),
    (
        &[
            "content management policy",
            "content filter",
            "content_filter",
            "content policy",
            "safety system",
            "safety filter",
            "inappropriate content",
            "datainspectionfailed",
            "content exists risk",
            "flagged by",
            "敏感",
            "不安全",
        ],
        ContentPolicyViolation,
    ),
    // Asking for too much output is a bad value (lower max_tokens), not an overlong prompt.
    (
        &[
            "'max_tokens' or 'max_completion_tokens' is too large",
            "maximum allowed number of output tokens",
            "invalid max_tokens",
        ],
        InvalidValue,
    ),
    (
        &[
            "context length",
            "context_length",
            "context window",
            "context limit",
            "prompt is too long",
            "prompt too long",
            "prompt exceeds max length",
            "too many tokens",
            "input token count",
            "maximum number of tokens",
            "input is too long",
            "reduce the length of the messages",
        ],
        ContextLengthExceeded,
    ),
];

const MODEL_TROUBLE: &[&str] = &[
    "does not exist",
    "doesn't exist",
    "not exist",
    "not found",
    "is invalid",
    "not supported",
    "unknown model",
    "invalid model",
    "no such model",
    "is not available",
];

const LATER_RULES: &[(&[&str], ErrorCode)] = &[
    (
        &[
            "missing required",
            "is required",
            "required parameter",
            "must provide",
            "field required",
        ],
        MissingRequiredField,
    ),
    (
        &[
            "country, region, or territory",
            "location is not supported",
            "not supported in your region",
            "region not supported",
            "permission denied",
            "access denied",
        ],
        PermissionDenied,
    ),
    (
        &["rate limit", "too many requests", "ratelimit"],
        RateLimitExceeded,
    ),
    (
        &[
            "overloaded",
            "temporarily unavailable",
            "service unavailable",
        ],
        ServiceUnavailable,
    ),
];

fn mentions_model(hay: &str) -> bool {
    hay.contains("model") || hay.contains("deployment")
}

/// The message rules alone.
fn by_text(hay: &str) -> Option<ErrorCode> {
    let first = |rules: &[(&[&str], ErrorCode)]| {
        rules
            .iter()
            .find(|(needles, _)| any(hay, needles))
            .map(|(_, c)| *c)
    };
    first(TEXT_RULES)
        .or_else(|| (mentions_model(hay) && any(hay, MODEL_TROUBLE)).then_some(ModelNotSupported))
        .or_else(|| first(LATER_RULES))
}

const REVOKED_WORDS: &[&str] = &["deactivated", "revoked", "deleted", "suspended"];
const OVERLOAD_WORDS: &[&str] = &["overloaded", "high load", "capacity"];

fn by_status(status: u16, hay: &str) -> ErrorCode {
    match status {
        401 => InvalidApiKey,
        402 => InsufficientQuota,
        403 if any(hay, REVOKED_WORDS) => RevokedApiKey,
        403 => PermissionDenied,
        404 => NotFound,
        408 => Timeout,
        413 => RequestTooLarge,
        429 if hay.contains("overloaded") => ServiceUnavailable,
        429 => RateLimitExceeded,
        400..=499 => by_text(hay).unwrap_or(InvalidValue),
        500 if any(hay, OVERLOAD_WORDS) => ServiceUnavailable,
        // An error inside a successful answer (a stream event, an OpenRouter 200).
        200..=299 => by_text(hay).unwrap_or(InternalError),
        s => super::code_for_status_u16(s),
    }
}

const CONCURRENCY_WORDS: &[&str] = &["concurren", "并发"];
const LONG_LIMIT_WORDS: &[&str] = &[
    "per day",
    "(tpd)",
    " tpd ",
    "tpd rate limit",
    "(rpd)",
    "daily",
    "hourly",
    "per hour",
    "今日",
    "每日",
    "每天",
];
const TOO_LARGE_WORDS: &[&str] = &["request too large", "request is too large"];

/// Decides the code for an error answer with the given (effective) status.
pub fn decide(status: u16, f: &Fields) -> Verdict {
    let hay = f.hay.as_str();
    if is_billing(status, f) {
        return Verdict {
            code: InsufficientQuota,
            never_fits: false,
            long_limit: false,
        };
    }
    let code = structured(f).unwrap_or_else(|| by_status(status, hay));
    let mut never_fits = false;
    let code = match code {
        InvalidApiKey if hay.contains("expired") => ExpiredApiKey,
        InvalidApiKey if any(hay, REVOKED_WORDS) => RevokedApiKey,
        NotFound if mentions_model(hay) => ModelNotSupported,
        RateLimitExceeded | ConcurrentLimitExceeded if any(hay, TOO_LARGE_WORDS) => RequestTooLarge,
        RateLimitExceeded if any(hay, CONCURRENCY_WORDS) => ConcurrentLimitExceeded,
        c => c,
    };
    let mut long_limit = false;
    if code == RequestTooLarge {
        never_fits = true;
    }
    if code == RateLimitExceeded {
        let long_quota = f.quota_ids.iter().any(|q| {
            let q = q.to_ascii_lowercase();
            q.contains("perday") || q.contains("perhour")
        });
        let zhipu_long =
            cn::is_zhipu(f) && cn::ZHIPU_LONG_LIMITS.contains(&f.code.as_deref().unwrap_or(""));
        // A zero quota, or a quota the provider declares daily or hourly (Google's retryDelay
        // then describes the next window, not this quota): no sensible retry budget helps.
        never_fits = f.zero_quota || long_quota || zhipu_long;
        long_limit = any(hay, LONG_LIMIT_WORDS);
    }
    Verdict {
        code,
        never_fits,
        long_limit,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(msg: &str) -> Fields {
        Fields {
            message: Some(msg.into()),
            hay: msg.to_lowercase(),
            ..Fields::default()
        }
    }

    #[test]
    fn text_rules_on_400() {
        let d = |m: &str| decide(400, &fields(m)).code;
        assert_eq!(
            d("prompt is too long: 5 tokens > 4 maximum"),
            ContextLengthExceeded
        );
        assert_eq!(d("The model `x` does not exist"), ModelNotSupported);
        assert_eq!(
            d("messages: at least one message is required"),
            MissingRequiredField
        );
        assert_eq!(d("Incorrect API key provided"), InvalidApiKey);
        assert_eq!(d("API key expired. Please renew"), ExpiredApiKey);
        assert_eq!(d("temperature must be at most 2"), InvalidValue);
        assert_eq!(d("Your credit balance is too low"), InsufficientQuota);
    }

    #[test]
    fn rate_limit_refinements() {
        let d = |m: &str| decide(429, &fields(m));
        assert_eq!(d("Request too large for gpt-4o").code, RequestTooLarge);
        assert!(d("Request too large for gpt-4o").never_fits);
        assert_eq!(
            d("max organization concurrency: 1").code,
            ConcurrentLimitExceeded
        );
        assert!(d("Too many tokens per day").long_limit);
        assert!(!d("Too many tokens per minute").long_limit);
        assert_eq!(
            d("The engine is currently overloaded").code,
            ServiceUnavailable
        );
    }

    #[test]
    fn statuses_alone() {
        let d = |s| decide(s, &Fields::default()).code;
        assert_eq!(d(401), InvalidApiKey);
        assert_eq!(d(402), InsufficientQuota);
        assert_eq!(d(404), NotFound);
        assert_eq!(d(422), InvalidValue);
        assert_eq!(d(500), InternalError);
        assert_eq!(d(529), ServiceUnavailable);
        assert_eq!(d(504), Timeout);
        assert_eq!(d(200), InternalError);
    }
}
