//! Configuration of the retry layer, validated when built.

use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use http::Method;

use crate::body::DEFAULT_BODY_LIMIT;
use crate::error::ApiError;
use crate::policy::{Classify, FailureKind, SharedPolicy};
use crate::request::normalize_path;

use super::backoff::Backoff;
use super::budget::{Budget, RetryBudget};
use super::layer::RetryLayer;

pub use crate::config::ConfigError;

pub(crate) fn config_error(
    field: &'static str,
    message: impl Into<std::borrow::Cow<'static, str>>,
) -> ConfigError {
    ConfigError::new("retry", field, message)
}

/// The largest number of attempts (first try included) a layer may be configured with.
pub const MAX_ATTEMPTS_LIMIT: u32 = 10;

/// What the layer answers when the inner service's last attempt failed with an `Err`
/// (connection refused or reset, a broken body, a `tower::timeout` timeout). A `poll_ready`
/// error of the inner service is not an attempt that failed: it is returned at once in either
/// mode (see [Readiness](crate::retry#readiness)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportErrors {
    /// Answer with the envelope from [`crate::policy::classify_error`]
    /// (`502 service_unavailable` or `504 timeout`). The default: a gateway answers its
    /// callers, and a call fails only when the inner service cannot become ready.
    #[default]
    Envelope,
    /// Return the inner service's last `Err` unchanged, for client stacks that want to see
    /// transport errors as errors.
    Propagate,
}

/// Why the layer did not (or did no longer) retry a request. Put in the response extensions
/// (and the `x-llm-layers-retry-stop` header) whenever the final answer is an error, or the
/// request was never replayable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RetryStop {
    /// The request body was larger than the buffering limit (announced by `content-length`
    /// or the size hint): it was sent once, without retries.
    BodyTooLarge,
    /// The request is not safe to send twice (a `POST` that creates something, without an
    /// `Idempotency-Key`; see [`RetryLayerBuilder::retry_requests`]): it was sent once,
    /// without retries.
    NotIdempotent,
    /// The error is not one a retry can fix (or the predicate refused it, or the upstream
    /// answered `x-should-retry: false`).
    NotRetryable,
    /// A layer of this crate refused the call because of its own state (an open circuit
    /// breaker, marked with [`crate::ext::RefusedLocally`]): answered at once, never waited
    /// on.
    RefusedLocally,
    /// All attempts were used.
    AttemptsExhausted,
    /// The shared retry budget was empty.
    BudgetExhausted,
    /// The server asked for a wait longer than `max_retry_after`.
    HintTooLong,
    /// The server asked for a wait that ends past the overall deadline.
    HintPastDeadline,
    /// The next attempt could not start before the overall deadline.
    Deadline,
}

impl RetryStop {
    /// The reason as written in the `x-llm-layers-retry-stop` header.
    pub const fn as_str(self) -> &'static str {
        match self {
            RetryStop::BodyTooLarge => "body-too-large",
            RetryStop::NotIdempotent => "not-idempotent",
            RetryStop::NotRetryable => "not-retryable",
            RetryStop::RefusedLocally => "refused-locally",
            RetryStop::AttemptsExhausted => "attempts-exhausted",
            RetryStop::BudgetExhausted => "budget-exhausted",
            RetryStop::HintTooLong => "retry-after-too-long",
            RetryStop::HintPastDeadline => "retry-after-past-deadline",
            RetryStop::Deadline => "deadline",
        }
    }
}

impl fmt::Display for RetryStop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One retry about to happen, as shown to the [`RetryLayerBuilder::on_retry`] hook.
#[derive(Debug)]
pub struct RetryEvent<'a> {
    pub(crate) attempt: u32,
    pub(crate) delay: Duration,
    pub(crate) error: &'a ApiError,
}

impl RetryEvent<'_> {
    /// The attempt that failed (1 for the first try).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The wait before the next attempt.
    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// Why the attempt failed.
    pub fn error(&self) -> &ApiError {
        self.error
    }
}

type Predicate = Box<dyn Fn(&ApiError) -> bool + Send + Sync>;
type RequestPredicate = Box<dyn Fn(&Method, &str) -> bool + Send + Sync>;
type Hook = Box<dyn Fn(&RetryEvent<'_>) + Send + Sync>;

/// Settings shared by every clone of one layer and its services.
pub(crate) struct Shared {
    pub(crate) max_attempts: u32,
    pub(crate) backoff: Backoff,
    pub(crate) max_retry_after: Duration,
    pub(crate) hint_jitter: Duration,
    pub(crate) deadline: Option<Duration>,
    pub(crate) attempt_timeout: Option<Duration>,
    pub(crate) body_limit: usize,
    pub(crate) attempts_header: bool,
    pub(crate) mark_exhausted: bool,
    pub(crate) transport_errors: TransportErrors,
    pub(crate) budget: Option<Budget>,
    pub(crate) seed: Option<u64>,
    pub(crate) seq: AtomicU64,
    pub(crate) predicate: Option<Predicate>,
    pub(crate) requests: Option<RequestPredicate>,
    pub(crate) idempotency_keys: bool,
    pub(crate) on_retry: Option<Hook>,
    pub(crate) policy: SharedPolicy,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryConfig")
            .field("max_attempts", &self.max_attempts)
            .field("backoff", &self.backoff)
            .field("max_retry_after", &self.max_retry_after)
            .field("hint_jitter", &self.hint_jitter)
            .field("deadline", &self.deadline)
            .field("attempt_timeout", &self.attempt_timeout)
            .field("body_limit", &self.body_limit)
            .field("attempts_header", &self.attempts_header)
            .field("mark_exhausted", &self.mark_exhausted)
            .field("transport_errors", &self.transport_errors)
            .field("budget", &self.budget.is_some())
            .field("seeded", &self.seed.is_some())
            .field("predicate", &self.predicate.is_some())
            .field("requests", &self.requests.is_some())
            .field("idempotency_keys", &self.idempotency_keys)
            .field("on_retry", &self.on_retry.is_some())
            .field("policy", &self.policy)
            .finish()
    }
}

impl Shared {
    /// Whether to retry after `err`, a failure of `kind` (the policy's word for an answer,
    /// the built-in table for a transport error). `said` is the upstream's own
    /// `x-should-retry` on a raw answer: `false` is never retried; `true` is retried whatever
    /// the kind (as the official SDKs do), unless the predicate refuses; without it the kind
    /// and the predicate decide: a kind that is never retried
    /// ([`FailureKind::never_retried`]) is not, whatever the predicate says; else the
    /// predicate, else [`FailureKind::retried_by_default`] (with, when the kind is the
    /// built-in one for the error's code, [`ApiError::is_retryable`]'s word on long waits and
    /// requests that can never fit).
    pub(crate) fn wants_retry(
        &self,
        err: &ApiError,
        kind: FailureKind,
        said: Option<bool>,
    ) -> bool {
        match said {
            Some(false) => false,
            Some(true) => self.predicate.as_ref().is_none_or(|p| p(err)),
            None => {
                if kind.never_retried() {
                    return false;
                }
                match &self.predicate {
                    Some(p) => p(err),
                    None => {
                        kind.retried_by_default()
                            && (kind != FailureKind::of(err.code()) || err.is_retryable())
                    }
                }
            }
        }
    }

    /// Whether the request may be sent more than once: it carries an `Idempotency-Key`, or the
    /// request rule accepts its method and path. No allocation unless the path needs
    /// normalizing.
    pub(crate) fn replayable<B>(&self, req: &http::Request<B>) -> bool {
        let method = req.method();
        let path = req.uri().path();
        let by_rule = match &self.requests {
            None => {
                super::safety::idempotent(method)
                    || (*method == Method::POST
                        && super::safety::generation_path(&normalize_path(path)))
            }
            Some(p) => p(method, &normalize_path(path)),
        };
        by_rule
            || req
                .headers()
                .get(super::safety::IDEMPOTENCY_KEY)
                .is_some_and(|v| !v.is_empty())
    }
}

/// Builds a [`RetryLayer`]. Every setting has a default; [`RetryLayerBuilder::build`] checks
/// them all and names the first one out of range.
pub struct RetryLayerBuilder {
    max_attempts: u32,
    backoff: Backoff,
    max_retry_after: Duration,
    hint_jitter: Duration,
    deadline: Option<Duration>,
    attempt_timeout: Option<Duration>,
    body_limit: usize,
    attempts_header: bool,
    mark_exhausted: bool,
    transport_errors: TransportErrors,
    budget: Option<RetryBudget>,
    seed: Option<u64>,
    predicate: Option<Predicate>,
    requests: Option<RequestPredicate>,
    idempotency_keys: bool,
    on_retry: Option<Hook>,
    policy: SharedPolicy,
}

impl fmt::Debug for RetryLayerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryLayerBuilder")
            .field("max_attempts", &self.max_attempts)
            .field("backoff", &self.backoff)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

impl Default for RetryLayerBuilder {
    fn default() -> Self {
        RetryLayerBuilder {
            max_attempts: 3,
            backoff: Backoff::default(),
            max_retry_after: Duration::from_secs(60),
            hint_jitter: Duration::from_millis(100),
            deadline: None,
            attempt_timeout: None,
            body_limit: DEFAULT_BODY_LIMIT,
            attempts_header: true,
            mark_exhausted: true,
            transport_errors: TransportErrors::Envelope,
            budget: Some(RetryBudget::default()),
            seed: None,
            predicate: None,
            requests: None,
            idempotency_keys: false,
            on_retry: None,
            policy: SharedPolicy::default(),
        }
    }
}

impl RetryLayerBuilder {
    /// Attempts in total, the first try included (default 3, at most
    /// [`MAX_ATTEMPTS_LIMIT`]). `1` turns retries off (and body buffering with them).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// The backoff between attempts when the server gives no hint (default: 0.5 s base, 8 s
    /// cap, full jitter).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// The longest server-requested wait (`retry-after-ms`, `retry-after`, ...) the layer
    /// honours (default 60 s). A longer hint ends the retries at once with the upstream's
    /// answer.
    pub fn max_retry_after(mut self, wait: Duration) -> Self {
        self.max_retry_after = wait;
        self
    }

    /// The jitter added on top of a server-requested wait: the next attempt starts in
    /// `[hint, hint + jitter]` (default 100 ms, at most 5 s).
    pub fn hint_jitter(mut self, jitter: Duration) -> Self {
        self.hint_jitter = jitter;
        self
    }

    /// An overall deadline for all attempts and the waits between them, counted from the
    /// call (default none). No wait is scheduled that would end past it, and an attempt still
    /// running at the deadline is answered with `504 timeout`. It covers the wait for the
    /// response head only; a streamed body is not cut. A value too large for the clock
    /// (`Duration::MAX`) saturates: no deadline in practice.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// A timeout for each attempt's response head (default none). An attempt that takes
    /// longer is dropped and counts as a retryable `timeout`. A value too large for the clock
    /// saturates.
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = Some(timeout);
        self
    }

    /// The largest request body buffered for replay (default
    /// [`DEFAULT_BODY_LIMIT`], 4 MiB).
    pub fn body_limit(mut self, limit: usize) -> Self {
        self.body_limit = limit;
        self
    }

    /// Whether to write the `x-llm-layers-attempts` (and `x-llm-layers-retry-stop`) response
    /// headers (default true). The [`crate::ext::Attempts`] extension is always set.
    pub fn attempts_header(mut self, on: bool) -> Self {
        self.attempts_header = on;
        self
    }

    /// When the layer retried (two attempts or more) and then gave up on an error it would
    /// otherwise have retried (attempts, budget or deadline used up, a server wait over
    /// `max_retry_after` or past the deadline), overwrite `x-should-retry` on the response with
    /// `false`, so the official SDKs calling a gateway do not retry what the gateway already
    /// retried: without it, an SDK with `max_retries = 2` in front of a gateway with
    /// `max_attempts = 3` sends up to 9 upstream requests. A stop on the first attempt, or a
    /// refusal by a local layer, is never marked: the upstream's (or that layer's)
    /// `x-should-retry` and `retry-after` stand (see the
    /// [module docs](crate::retry#x-should-retry-retry-after-and-the-stop-reason-on-the-answer)).
    /// Default true; `false` hands the upstream's `x-should-retry` on as it was.
    pub fn mark_exhausted(mut self, on: bool) -> Self {
        self.mark_exhausted = on;
        self
    }

    /// What to answer when the last attempt failed with a transport error (default
    /// [`TransportErrors::Envelope`]).
    pub fn transport_errors(mut self, mode: TransportErrors) -> Self {
        self.transport_errors = mode;
        self
    }

    /// The retry budget shared by every clone of the layer (default
    /// [`RetryBudget::default`]: 10 s window, 10 per second floor, 20 %).
    pub fn budget(mut self, budget: RetryBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// No shared budget: every request may use all its attempts.
    pub fn no_budget(mut self) -> Self {
        self.budget = None;
        self
    }

    /// Seeds the jitter: request number `n` to retry draws from
    /// `fastrand::Rng::with_seed(seed + n)`, so delays are reproducible in tests.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Replaces the default decision (the failure's [`FailureKind`] is
    /// [retried by default](FailureKind::retried_by_default), and [`ApiError::is_retryable`])
    /// with `predicate`. Failures a retry can never fix ([`FailureKind::never_retried`]: auth,
    /// permission, quota, invalid or oversized requests, content policy, `upstream_blocked`)
    /// are never retried, whatever it answers, unless the upstream answered
    /// `x-should-retry: true`; an upstream `x-should-retry: false` is never retried.
    /// `predicate` is still asked (and may refuse) when the upstream said `true`.
    pub fn retry_if<F>(mut self, predicate: F) -> Self
    where
        F: Fn(&ApiError) -> bool + Send + Sync + 'static,
    {
        self.predicate = Some(Box::new(predicate));
        self
    }

    /// Chooses which requests may be sent more than once, by method and path (default
    /// [`safe_to_retry`](super::safe_to_retry): idempotent methods, and `POST`s to generation
    /// endpoints). The path reaches `predicate` as an upstream that decodes paths routes it
    /// ([`normalize_path`](crate::request::normalize_path)), without the query. A request
    /// carrying an `Idempotency-Key` is always retryable, whatever `predicate` answers; any
    /// other request it refuses is sent once, untouched and unbuffered
    /// ([`RetryStop::NotIdempotent`]).
    pub fn retry_requests<F>(mut self, predicate: F) -> Self
    where
        F: Fn(&Method, &str) -> bool + Send + Sync + 'static,
    {
        self.requests = Some(Box::new(predicate));
        self
    }

    /// Adds a generated `Idempotency-Key` (a random UUID, the same on every attempt) to each
    /// request with a non-idempotent method (`POST`, `PATCH`) that has none, so that every
    /// such request becomes retryable and an upstream that honours the header does the work
    /// once (default false). The key is drawn from a process-wide random source, never from
    /// [`seed`](Self::seed), so that keys never repeat across restarts. With
    /// `max_attempts(1)` the layer is off and adds nothing.
    pub fn idempotency_keys(mut self, on: bool) -> Self {
        self.idempotency_keys = on;
        self
    }

    /// Calls `hook` before each retry with the failed attempt's number, the wait and the error.
    pub fn on_retry<F>(mut self, hook: F) -> Self
    where
        F: Fn(&RetryEvent<'_>) + Send + Sync + 'static,
    {
        self.on_retry = Some(Box::new(hook));
        self
    }

    /// What a response head means (default [`DefaultPolicy`](crate::policy::DefaultPolicy),
    /// the crate's [table](crate::policy)): the policy sees the status, the headers and the
    /// [`ApiError`] an inner normalizer left in the extensions. An answer it calls a
    /// [success](crate::policy::Outcome::Success) is never retried; a failure is retried
    /// according to its [`FailureKind`] (see [`retry_if`](Self::retry_if) and the
    /// [module docs](crate::retry#what-is-retried)). The wait hint and the upstream's
    /// `x-should-retry` are still read from the answer. Any closure
    /// `Fn(StatusCode, &HeaderMap, Option<&ApiError>) -> Outcome` is a policy.
    pub fn policy(mut self, policy: impl Classify) -> Self {
        self.policy = SharedPolicy::new(policy);
        self
    }

    /// Checks the settings and builds the layer.
    pub fn build(self) -> Result<RetryLayer, ConfigError> {
        if self.max_attempts == 0 || self.max_attempts > MAX_ATTEMPTS_LIMIT {
            return Err(config_error(
                "max_attempts",
                format!(
                    "must be between 1 and {MAX_ATTEMPTS_LIMIT}, got {}",
                    self.max_attempts
                ),
            ));
        }
        if self.hint_jitter > Duration::from_secs(5) {
            return Err(config_error("hint_jitter", "must be at most 5 s"));
        }
        if self.deadline.is_some_and(|d| d.is_zero()) {
            return Err(config_error("deadline", "must be positive"));
        }
        if self.attempt_timeout.is_some_and(|d| d.is_zero()) {
            return Err(config_error("attempt_timeout", "must be positive"));
        }
        if self.body_limit == 0 {
            return Err(config_error("body_limit", "must be positive"));
        }
        let shared = Shared {
            max_attempts: self.max_attempts,
            backoff: self.backoff,
            max_retry_after: self.max_retry_after,
            hint_jitter: self.hint_jitter,
            deadline: self.deadline,
            attempt_timeout: self.attempt_timeout,
            body_limit: self.body_limit,
            attempts_header: self.attempts_header,
            mark_exhausted: self.mark_exhausted,
            transport_errors: self.transport_errors,
            budget: self.budget.as_ref().map(Budget::new),
            seed: self.seed,
            seq: AtomicU64::new(0),
            predicate: self.predicate,
            requests: self.requests,
            idempotency_keys: self.idempotency_keys,
            on_retry: self.on_retry,
            policy: self.policy,
        };
        Ok(RetryLayer::from_shared(Arc::new(shared)))
    }
}
