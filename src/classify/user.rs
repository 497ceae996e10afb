//! Application rules: an application's own mapping from an upstream answer to a code, run
//! before the built-in rules.
//!
//! A [`Classifier`] holds rules in order. Each is a table row ([`Rule`]: an upstream status,
//! a provider code or type, and a message pattern, all optional, all required when given) or a
//! function of the [`Upstream`] answer. The first rule that answers decides the code; the
//! built-in classification still supplies everything else (message, wait, request id, upstream
//! detail), so a rule changes what the error *is*, never what is known about it. With no rule
//! matching, the answer is exactly the built-in one.
//!
//! ```
//! use http::{HeaderMap, StatusCode};
//! use llm_layers::classify::{Classifier, Rule};
//! use llm_layers::error::ErrorCode;
//!
//! let classifier = Classifier::new()
//!     // A relay that sends its own billing code on a 403.
//!     .rule(Rule::to(ErrorCode::InsufficientQuota).status(403).code("QUOTA_EMPTY"))
//!     // A local server whose "slots busy" text is a concurrency limit.
//!     .rule(Rule::to(ErrorCode::ConcurrentLimitExceeded).message("all slots are busy"))
//!     .rule_fn(|up| (up.status().as_u16() == 418).then_some(ErrorCode::InvalidValue));
//!
//! let body = br#"{"error":{"message":"Quota empty","code":"QUOTA_EMPTY"}}"#;
//! let err = classifier
//!     .classify_response(StatusCode::FORBIDDEN, &HeaderMap::new(), body)
//!     .unwrap();
//! assert_eq!(err.code(), ErrorCode::InsufficientQuota);
//!
//! let err = classifier
//!     .classify_response(StatusCode::SERVICE_UNAVAILABLE, &HeaderMap::new(), b"All slots are busy")
//!     .unwrap();
//! assert_eq!(err.code(), ErrorCode::ConcurrentLimitExceeded);
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use http::{HeaderMap, StatusCode};

use crate::error::{ApiError, ErrorCode};

/// The longest message pattern a [`Rule`] accepts, in bytes; longer patterns are cut.
pub const MAX_PATTERN_BYTES: usize = 256;

/// One row of an application's mapping: the conditions that are given must all hold.
///
/// Codes and types compare without regard to ASCII case; the message pattern is a
/// case-insensitive substring of the upstream's message (or, when the upstream sent none, of
/// the classified message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    to: ErrorCode,
    status: Option<u16>,
    code: Option<String>,
    message: Option<String>,
}

impl Rule {
    /// A rule that maps to `code`; with no condition added it matches every error.
    pub fn to(code: ErrorCode) -> Self {
        Rule {
            to: code,
            status: None,
            code: None,
            message: None,
        }
    }

    /// Only this upstream status (`429`, `403`, …).
    pub fn status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    /// Only this provider code or type (`"1113"`, `"Arrearage"`, `"invalid_request_error"`).
    pub fn code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    /// Only messages that contain `pattern` (case-insensitive). An empty pattern is no
    /// condition; a pattern is cut at [`MAX_PATTERN_BYTES`].
    pub fn message(mut self, pattern: impl AsRef<str>) -> Self {
        let p = pattern.as_ref().to_lowercase();
        let mut end = p.len().min(MAX_PATTERN_BYTES);
        while !p.is_char_boundary(end) {
            end -= 1;
        }
        self.message = (end > 0).then(|| p[..end].to_owned());
        self
    }

    fn matches(&self, up: &Upstream<'_>) -> bool {
        if self.status.is_some_and(|s| s != up.status.as_u16()) {
            return false;
        }
        if let Some(code) = &self.code {
            let d = up.classified.upstream_detail();
            let ids = [d.and_then(|d| d.code()), d.and_then(|d| d.kind())];
            if !ids
                .into_iter()
                .flatten()
                .any(|id| id.eq_ignore_ascii_case(code))
            {
                return false;
            }
        }
        if let Some(p) = &self.message {
            let msg = up
                .classified
                .upstream_detail()
                .and_then(|d| d.message())
                .unwrap_or(up.classified.message());
            if !msg.to_lowercase().contains(p.as_str()) {
                return false;
            }
        }
        true
    }
}

/// What a rule function sees: the upstream answer and the built-in classification of it.
#[derive(Debug, Clone, Copy)]
pub struct Upstream<'a> {
    status: StatusCode,
    headers: &'a HeaderMap,
    body: &'a [u8],
    classified: &'a ApiError,
}

impl<'a> Upstream<'a> {
    /// The upstream's status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The upstream's headers.
    pub fn headers(&self) -> &'a HeaderMap {
        self.headers
    }

    /// The upstream's body, as received (possibly cut by the caller's read bound).
    pub fn body(&self) -> &'a [u8] {
        self.body
    }

    /// The built-in classification: its code, and the upstream's own words
    /// ([`ApiError::upstream_detail`]).
    pub fn classified(&self) -> &'a ApiError {
        self.classified
    }
}

type RuleFn = dyn Fn(&Upstream<'_>) -> Option<ErrorCode> + Send + Sync;

#[derive(Clone)]
enum Entry {
    Table(Rule),
    Func(Arc<RuleFn>),
}

/// The built-in classifier plus an application's own rules, which run first.
///
/// Cheap to clone (functions are shared); `Send + Sync`, so one value serves every request.
/// With no rules it answers exactly like [`super::classify_response`].
#[derive(Clone, Default)]
pub struct Classifier {
    rules: Vec<Entry>,
}

impl fmt::Debug for Classifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tables = self
            .rules
            .iter()
            .filter(|e| matches!(e, Entry::Table(_)))
            .count();
        f.debug_struct("Classifier")
            .field("table_rules", &tables)
            .field("function_rules", &(self.rules.len() - tables))
            .finish()
    }
}

impl Classifier {
    /// The built-in rules alone.
    pub fn new() -> Self {
        Classifier::default()
    }

    /// Adds a table rule after the ones already added.
    pub fn rule(mut self, rule: Rule) -> Self {
        self.rules.push(Entry::Table(rule));
        self
    }

    /// Adds a function rule after the ones already added; `None` passes to the next rule.
    pub fn rule_fn(
        mut self,
        f: impl Fn(&Upstream<'_>) -> Option<ErrorCode> + Send + Sync + 'static,
    ) -> Self {
        self.rules.push(Entry::Func(Arc::new(f)));
        self
    }

    /// Whether any rule was added.
    pub fn has_rules(&self) -> bool {
        !self.rules.is_empty()
    }

    /// [`super::classify_response`], then the application's rules.
    pub fn classify_response(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Option<ApiError> {
        self.classify_response_at(status, headers, body, SystemTime::now())
    }

    /// [`super::classify_response_at`], then the application's rules.
    pub fn classify_response_at(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
        now: SystemTime,
    ) -> Option<ApiError> {
        let err = super::classify_response_at(status, headers, body, now)?;
        Some(self.apply(status, headers, body, err))
    }

    /// Applies the application's rules to an error the built-ins already classified (for
    /// callers that classify through another entry point, such as a stream event). Returns
    /// `err` unchanged when no rule answers.
    pub fn apply(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
        err: ApiError,
    ) -> ApiError {
        if self.rules.is_empty() {
            return err;
        }
        let code = {
            let up = Upstream {
                status,
                headers,
                body,
                classified: &err,
            };
            self.rules.iter().find_map(|e| match e {
                Entry::Table(r) => r.matches(&up).then_some(r.to),
                Entry::Func(f) => f(&up),
            })
        };
        match code {
            Some(c) => err.with_code(c),
            None => err,
        }
    }
}
