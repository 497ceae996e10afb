//! The decision: from the status and what the body says to one [`ErrorCode`].
//!
//! Order (the first that answers wins):
//! 1. billing, whatever the status: a billing code or type, status 402, or billing words;
//! 2. the provider's own code or type, through the family tables;
//! 3. the status, refined by the message for the statuses that do not decide alone
//!    (400/422 and other 4xx, 404, 403, 429, 500, and errors inside a 200);
//! 4. refinements: an expired or revoked key, a not-found model, a rate limit that is really
//!    a request too large, a concurrency limit, a monthly limit (a quota), or a daily / zero
//!    quota (never worth a retry);
//! 5. the wait ([`with_wait`], applied by the caller once the explicit wait is known).

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
    /// The code is billing by the message's words alone (no billing code, type or status).
    pub by_words: bool,
    /// A rate limit whose words speak of the server's capacity ("out of capacity", "model
    /// busy"): without an explicit wait it is `service_unavailable`.
    pub capacity: bool,
}

fn any(hay: &str, needles: &[&str]) -> bool {
    needles.iter().any(|n| hay.contains(n))
}

/// Billing and balance, in the languages providers answer in.
const BILLING_WORDS: &[&str] = &[
    "credit balance",
    "insufficient balance",
    "insufficient account balance",
    "insufficient_balance",
    "insufficient credit",
    "insufficient funds",
    "out of credits",
    "more credits",
    "have any credits",
    "credit limit exceeded",
    "credit_limit",
    "account is in good standing",
    "overdue-payment",
    "overdue payment",
    "set inference limit",
    "plan and billing",
    "billing details",
    "payment required",
    "purchase credits",
    "account is in arrears",
    "余额不足",
    "欠费",
    "请充值",
    "充值后",
    "额度不足",
    "額度不足",
    "餘額不足",
];

/// Every billing word holds one of these: most messages hold none, and are spared the list.
const BILLING_ANCHORS: &[&str] = &[
    "credit",
    "balanc",
    "billing",
    "payment",
    "fund",
    "standing",
    "overdue",
    "inference",
    "purchase",
    "arrear",
    "余额",
    "欠费",
    "充值",
    "额度",
    "額度",
    "餘額",
];

/// Why an answer is billing: its identifiers or status (final), or only its words (a short
/// explicit wait on a 429 overrides those).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Billing {
    Id,
    Words,
}

fn is_billing(status: u16, f: &Fields) -> Option<Billing> {
    let billing = billing_inner(status, f);
    match billing {
        Some(true) => Some(Billing::Id),
        Some(false) => Some(Billing::Words),
        None => None,
    }
}

/// `Some(true)` by identifier or status, `Some(false)` by words, `None` when not billing.
fn billing_inner(status: u16, f: &Fields) -> Option<bool> {
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
        return Some(true);
    }
    if cn::is_zhipu(f) && cn::ZHIPU_BILLING.contains(&f.code.as_deref().unwrap_or("")) {
        return Some(true);
    }
    if cn::minimax_code(f).is_some_and(|c| c == "1008") {
        return Some(true);
    }
    if status == 402 {
        return Some(true);
    }
    // Google's RESOURCE_EXHAUSTED says "check your plan and billing details" for per-minute
    // limits: its structure decides, not its words.
    if f.grpc.as_deref() == Some("RESOURCE_EXHAUSTED") || !f.quota_ids.is_empty() {
        return None;
    }
    let words = any(&f.hay, BILLING_ANCHORS) && any(&f.hay, BILLING_WORDS);
    if ids().any(|id| id.eq_ignore_ascii_case("insufficient_quota")) {
        // OpenAI sends code and type `insufficient_quota` with billing words. DashScope sends the
        // code alone on a 429 for its tokens-per-minute limit; relays send it with load words.
        let typed = f.kind.as_deref() == Some("insufficient_quota");
        if (typed && !any(&f.hay, OVERLOAD_WORDS)) || status != 429 {
            return Some(true);
        }
        return words.then_some(false);
    }
    words.then_some(false)
}

/// The class from the provider's own identifiers.
fn structured(f: &Fields) -> Option<ErrorCode> {
    if let Some(c) = cn::zhipu_code(f).or_else(|| cn::numeric_code(f)) {
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

/// Message rules for statuses that do not decide alone, in order. Each group is one meaning,
/// in the wordings seen across providers, relays and local servers.
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
            "authentication failed",
            "not authenticated",
            "unauthenticated",
            "api key required",
            "api key is required",
            "provide an api key",
            "api key expired",
            "api key or ak/sk",
        ],
        InvalidApiKey,
    ),
    // Disabled or deactivated accounts and organisations.
    (
        &[
            "organization has been disabled",
            "account has been disabled",
            "account has been deactivated",
            "deactivated account",
            "account is deactivated",
            "account has been suspended",
            "账户已被禁用",
            "账号已被封禁",
        ],
        RevokedApiKey,
    ),
    (
        &[
            "organization has been restricted",
            "account has been restricted",
            "country, region, or territory",
            "location is not supported",
            "not supported in your region",
            "region not supported",
            "unsupported region",
            "不支持的地区",
        ],
        PermissionDenied,
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
            "data_inspection_failed",
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
            "maximum tokens you requested exceeds",
        ],
        InvalidValue,
    ),
    (
        &[
            "context length",
            "context_length",
            "context window",
            "context limit",
            "context size",
            "exceed_context_size",
            "prompt is too long",
            "prompt too long",
            "prompt exceeds max length",
            "too many tokens",
            "input token count",
            "maximum number of tokens",
            "input is too long",
            "maximum input length",
            "`inputs` tokens",
            "`inputs` must have less than",
            "reduce the length of the messages",
            "上下文长度",
            "超过最大长度",
        ],
        ContextLengthExceeded,
    ),
    // A model that exists but cannot be used this way.
    (
        &[
            "does not support tools",
            "does not support chat",
            "does not support generate",
            "does not support embedding",
            "try pulling it first",
        ],
        ModelNotSupported,
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
    "no models loaded",
    "模型不存在",
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
            "permission denied",
            "access denied",
            "no permission",
            "无权限",
        ],
        PermissionDenied,
    ),
    (
        &["concurrent request", "concurrency limit", "并发"],
        ConcurrentLimitExceeded,
    ),
    (
        &[
            "rate limit",
            "too many requests",
            "ratelimit",
            "request limit reached",
            "requests limit",
            "请求过于频繁",
            "访问过于频繁",
            "负载已饱和",
        ],
        RateLimitExceeded,
    ),
    (
        &[
            "overloaded",
            "temporarily unavailable",
            "service unavailable",
            "out of capacity",
        ],
        ServiceUnavailable,
    ),
];

fn mentions_model(hay: &str) -> bool {
    // NVIDIA NIM calls a hosted model a function; Ark calls a deployment an endpoint.
    hay.contains("model")
        || hay.contains("deployment")
        || hay.contains("function '")
        || hay.contains("endpoint")
        || hay.contains("模型")
}

/// The first of `codes` the message rules give (the groups of other codes are not read).
fn text_among(hay: &str, codes: &[ErrorCode]) -> Option<ErrorCode> {
    let first = |rules: &[(&[&str], ErrorCode)]| {
        rules
            .iter()
            .filter(|(_, c)| codes.contains(c))
            .find(|(needles, _)| any(hay, needles))
            .map(|(_, c)| *c)
    };
    first(TEXT_RULES)
        .or_else(|| {
            (codes.contains(&ModelNotSupported) && mentions_model(hay) && any(hay, MODEL_TROUBLE))
                .then_some(ModelNotSupported)
        })
        .or_else(|| first(LATER_RULES))
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
/// Load words: a provider-side problem, also in relays' Chinese messages.
const OVERLOAD_WORDS: &[&str] = &["overloaded", "high load", "capacity", "负载", "繁忙"];
/// Words of a 429 that is the server's capacity, not the caller's limit. An explicit short
/// wait still makes the 429 a rate limit.
const CAPACITY_WORDS: &[&str] = &[
    "overloaded",
    "out of capacity",
    "no capacity",
    "at capacity",
    "capacity exceeded",
    "model busy",
    "model is busy",
    "server is busy",
    "high demand",
];

/// The text classes that decide even on a 5xx or inside a 200: a provider may answer an
/// overlong prompt or a filtered input with a server error.
const SERVER_SIDE_TEXT: &[ErrorCode] = &[ContextLengthExceeded, ContentPolicyViolation];

fn by_status(status: u16, hay: &str) -> ErrorCode {
    let text = || by_text(hay);
    match status {
        401 => InvalidApiKey,
        402 => InsufficientQuota,
        403 if any(hay, REVOKED_WORDS) => RevokedApiKey,
        403 => text_among(hay, &[InvalidApiKey, RevokedApiKey, ContentPolicyViolation])
            .unwrap_or(PermissionDenied),
        404 => text_among(hay, &[ModelNotSupported]).unwrap_or(NotFound),
        408 => Timeout,
        413 => RequestTooLarge,
        429 if hay.contains("overloaded") => ServiceUnavailable,
        429 => text_among(hay, &[ConcurrentLimitExceeded]).unwrap_or(RateLimitExceeded),
        400..=499 => text().unwrap_or(InvalidValue),
        500..=599 => match text_among(hay, SERVER_SIDE_TEXT) {
            Some(c) => c,
            None if status == 500 && any(hay, OVERLOAD_WORDS) => ServiceUnavailable,
            None => super::code_for_status_u16(status),
        },
        // An error inside a successful answer (a stream event, an OpenRouter 200).
        200..=299 => text().unwrap_or(InternalError),
        s => super::code_for_status_u16(s),
    }
}

const CONCURRENCY_WORDS: &[&str] = &["concurren", "并发"];
const LONG_LIMIT_WORDS: &[&str] = &[
    "per day",
    "per-day",
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
/// Calendar windows: a limit that resets with the month is a quota, not a rate.
const CALENDAR_WORDS: &[&str] = &[
    "per month",
    "monthly",
    "this month",
    "per-month",
    "本月",
    "每月",
];
const TOO_LARGE_WORDS: &[&str] = &["request too large", "request is too large"];

/// Decides the code for an error answer with the given (effective) status.
pub fn decide(status: u16, f: &Fields) -> Verdict {
    let hay = f.hay.as_str();
    if let Some(billing) = is_billing(status, f) {
        return Verdict {
            code: InsufficientQuota,
            never_fits: false,
            long_limit: false,
            by_words: billing == Billing::Words,
            capacity: false,
        };
    }
    let code = structured(f)
        // A server-error type on a client-error status (Ollama's and relays' `api_error` on a
        // 400 or 404), or on a gateway status, says less than the status.
        .filter(|c| *c != InternalError || !matches!(status, 400..=499 | 502..=504 | 529))
        .unwrap_or_else(|| by_status(status, hay));
    let mut never_fits = false;
    let code = match code {
        InvalidApiKey if hay.contains("expired") => ExpiredApiKey,
        InvalidApiKey if any(hay, REVOKED_WORDS) => RevokedApiKey,
        NotFound if mentions_model(hay) => ModelNotSupported,
        RateLimitExceeded | ConcurrentLimitExceeded if any(hay, TOO_LARGE_WORDS) => RequestTooLarge,
        RateLimitExceeded if any(hay, CONCURRENCY_WORDS) => ConcurrentLimitExceeded,
        RateLimitExceeded if any(hay, CALENDAR_WORDS) => InsufficientQuota,
        c => c,
    };
    let capacity = code == RateLimitExceeded
        && ((status == 429 && any(hay, CAPACITY_WORDS))
            || f.reasons.iter().any(|r| r == "MODEL_CAPACITY_EXHAUSTED"));
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
        by_words: false,
        capacity,
    }
}

/// The longest wait that still reads as a rate limit's window.
pub const SHORT_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// The rules that need the explicit wait (header, `RetryInfo` or a hint in the text): a 429
/// whose billing reading comes only from its words but that states a wait of at most
/// [`SHORT_WAIT`] is a rate limit; a rate limit worded as the server's capacity is
/// `service_unavailable` unless it states a wait.
pub fn with_wait(status: u16, verdict: Verdict, wait: Option<std::time::Duration>) -> ErrorCode {
    match (verdict.code, wait) {
        (InsufficientQuota, Some(w)) if status == 429 && verdict.by_words && w <= SHORT_WAIT => {
            RateLimitExceeded
        }
        (RateLimitExceeded, None) if verdict.capacity => ServiceUnavailable,
        (c, _) => c,
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
