//! Configuration of the validation layer: which checks run, the model list, the context windows.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use crate::body::DEFAULT_BODY_LIMIT;
use crate::request::{CharEstimator, TokenEstimator};

use super::{ValidateRequestLayer, ValidationRule};

/// The context windows (prompt plus output, in tokens) known out of the box.
///
/// A model name is matched exactly first, then by the longest entry it starts with, where the
/// entry ends the name or is followed by `-`, `:` or `@` (so `gpt-4o-2024-08-06` uses `gpt-4o`,
/// and `gpt-4.5-preview` does not fall back to `gpt-4`). A fine-tune (`ft:gpt-4o-mini:org::id`)
/// uses its base model's window. Models not in the table are not checked.
pub const DEFAULT_CONTEXT_WINDOWS: &[(&str, u64)] = &[
    // OpenAI
    ("gpt-5", 400_000),
    ("gpt-4.1", 1_047_576),
    ("gpt-4.5", 128_000),
    ("gpt-4o", 128_000),
    ("gpt-4o-mini", 128_000),
    ("chatgpt-4o", 128_000),
    ("gpt-4-turbo", 128_000),
    ("gpt-4-1106-preview", 128_000),
    ("gpt-4-0125-preview", 128_000),
    ("gpt-4-vision-preview", 128_000),
    ("gpt-4", 8_192),
    ("gpt-4-32k", 32_768),
    ("gpt-3.5-turbo", 16_385),
    ("gpt-3.5-turbo-instruct", 4_096),
    ("o1", 200_000),
    ("o1-mini", 128_000),
    ("o1-preview", 128_000),
    ("o3", 200_000),
    ("o3-mini", 200_000),
    ("o4-mini", 200_000),
    // Anthropic
    ("claude-", 200_000),
    // Google
    ("gemini-1.5-pro", 2_097_152),
    ("gemini-1.5-flash", 1_048_576),
    ("gemini-2.0-flash", 1_048_576),
    ("gemini-2.5-pro", 1_048_576),
    ("gemini-2.5-flash", 1_048_576),
];

/// How many model names a `model_not_supported` message lists at most, by default.
pub const DEFAULT_MAX_LISTED_MODELS: usize = 16;

pub use crate::config::ConfigError;

fn config_error(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::new("validation", field, message.into())
}

/// Which checks run. Every check is on by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Checks {
    pub(crate) content_type: bool,
    pub(crate) required_fields: bool,
    pub(crate) params: bool,
    pub(crate) messages: bool,
    pub(crate) endpoint: bool,
    pub(crate) context_length: bool,
}

/// The accepted models in configuration order, and the same names for lookups.
pub(crate) type ModelList = (Vec<Box<str>>, HashSet<Box<str>>);

/// The state every clone of the layer and its services shares.
pub(crate) struct Shared {
    pub(crate) checks: Checks,
    pub(crate) body_limit: usize,
    pub(crate) estimator: Arc<dyn TokenEstimator>,
    /// The allow-list in configuration order, and the same names for lookups.
    pub(crate) models: Option<ModelList>,
    pub(crate) max_listed_models: usize,
    pub(crate) windows: Vec<(Box<str>, u64)>,
    /// The rules of the user's own, in the order added.
    pub(crate) rules: Vec<Box<dyn ValidationRule>>,
}

impl Shared {
    /// Whether any check needs the body (otherwise LLM requests are not buffered either).
    pub(crate) fn needs_body(&self) -> bool {
        let c = self.checks;
        c.required_fields
            || c.params
            || c.messages
            || c.endpoint
            || c.context_length
            || self.models.is_some()
            || !self.rules.is_empty()
    }

    /// Whether the built-in checks read the body's fields ([`Fields`](crate::fields::Fields)).
    pub(crate) fn reads_fields(&self) -> bool {
        let c = self.checks;
        c.endpoint || c.required_fields || c.params || c.messages || self.models.is_some()
    }

    /// The context window of `model`: exact name, then the longest matching prefix.
    pub(crate) fn context_window(&self, model: &str) -> Option<u64> {
        let model = match model.strip_prefix("ft:") {
            Some(rest) => rest.split(':').next().unwrap_or(rest),
            None => model,
        };
        let mut best: Option<(usize, u64)> = None;
        for (name, window) in &self.windows {
            let name = &**name;
            if name == model {
                return Some(*window);
            }
            if model.len() > name.len()
                && model.starts_with(name)
                && (name.ends_with('-')
                    || matches!(model.as_bytes()[name.len()], b'-' | b':' | b'@'))
                && best.is_none_or(|(len, _)| name.len() > len)
            {
                best = Some((name.len(), *window));
            }
        }
        best.map(|(_, w)| w)
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ValidateConfig")
            .field("checks", &self.checks)
            .field("body_limit", &self.body_limit)
            .field("models", &self.models.as_ref().map(|(list, _)| list.len()))
            .field("context_windows", &self.windows.len())
            .field("rules", &self.rules.len())
            .finish_non_exhaustive()
    }
}

/// Builds a [`ValidateRequestLayer`]; every check is on by default, any model is accepted, and
/// the context windows are [`DEFAULT_CONTEXT_WINDOWS`].
///
/// ```
/// use llm_layers::validate::ValidateRequestLayer;
///
/// let layer = ValidateRequestLayer::builder()
///     .allowed_models(["gpt-4o", "gpt-4o-mini"])
///     .context_window("my-finetune", 32_000)
///     .check_messages(false)
///     .body_limit(1024 * 1024)
///     .build()
///     .unwrap();
/// # drop(layer);
///
/// let err = ValidateRequestLayer::builder().body_limit(0).build().unwrap_err();
/// assert_eq!(err.field(), "body_limit");
/// ```
#[must_use]
pub struct ValidateBuilder {
    checks: Checks,
    body_limit: usize,
    estimator: Arc<dyn TokenEstimator>,
    models: Option<Vec<String>>,
    max_listed_models: usize,
    windows: Vec<(String, u64)>,
    rules: Vec<Box<dyn ValidationRule>>,
}

impl fmt::Debug for ValidateBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ValidateBuilder")
            .field("checks", &self.checks)
            .field("body_limit", &self.body_limit)
            .field("rules", &self.rules.len())
            .finish_non_exhaustive()
    }
}

impl Default for ValidateBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ValidateBuilder {
    /// The defaults: every check on, any model, [`DEFAULT_CONTEXT_WINDOWS`],
    /// [`DEFAULT_BODY_LIMIT`], the [`CharEstimator`].
    pub fn new() -> Self {
        ValidateBuilder {
            checks: Checks {
                content_type: true,
                required_fields: true,
                params: true,
                messages: true,
                endpoint: true,
                context_length: true,
            },
            body_limit: DEFAULT_BODY_LIMIT,
            estimator: Arc::new(CharEstimator),
            models: None,
            max_listed_models: DEFAULT_MAX_LISTED_MODELS,
            windows: DEFAULT_CONTEXT_WINDOWS
                .iter()
                .map(|(n, w)| ((*n).to_owned(), *w))
                .collect(),
            rules: Vec::new(),
        }
    }

    /// Whether a `content-type` other than `application/json` (parameters such as `charset`
    /// allowed) is refused with `400 invalid_value`. A missing `content-type` is refused too.
    pub fn check_content_type(mut self, on: bool) -> Self {
        self.checks.content_type = on;
        self
    }

    /// Whether a missing `model`, `messages` (chat), `prompt` (completions) or `input`
    /// (embeddings, responses) is refused with `400 missing_required_field`, and one of those
    /// fields of the wrong JSON type (`messages` not an array, or empty) with
    /// `400 invalid_value`.
    pub fn check_required_fields(mut self, on: bool) -> Self {
        self.checks.required_fields = on;
        self
    }

    /// Whether out-of-range or wrongly typed sampling parameters (`temperature`, `top_p`, `n`,
    /// `max_tokens`, `max_completion_tokens`, `max_output_tokens`, `presence_penalty`,
    /// `frequency_penalty`, `stream`) are refused with `400 invalid_value`.
    pub fn check_params(mut self, on: bool) -> Self {
        self.checks.params = on;
        self
    }

    /// Whether chat messages with an unknown role or missing content are refused with
    /// `400 invalid_value`.
    pub fn check_messages(mut self, on: bool) -> Self {
        self.checks.messages = on;
        self
    }

    /// Whether `messages` sent to `/v1/completions` or `prompt` sent to `/v1/chat/completions`
    /// is refused with `400 invalid_value` naming the right endpoint.
    pub fn check_endpoint(mut self, on: bool) -> Self {
        self.checks.endpoint = on;
        self
    }

    /// Whether estimated prompt tokens plus `max_tokens` beyond the model's context window is
    /// refused with `400 context_length_exceeded`. Embedding requests are not checked (their
    /// limit is per input).
    pub fn check_context_length(mut self, on: bool) -> Self {
        self.checks.context_length = on;
        self
    }

    /// Accepts only these models; others are refused with `400 model_not_supported`, whose
    /// message lists the accepted ones (at most [`max_listed_models`](Self::max_listed_models)).
    /// Every model the upstream may use is checked: the deployment in an Azure-style path, the
    /// body's `model` and each of its `models` (see the [module docs](super)).
    pub fn allowed_models<I, M>(mut self, models: I) -> Self
    where
        I: IntoIterator<Item = M>,
        M: Into<String>,
    {
        self.models = Some(models.into_iter().map(Into::into).collect());
        self
    }

    /// How many model names a `model_not_supported` message lists at most (default 16).
    pub fn max_listed_models(mut self, n: usize) -> Self {
        self.max_listed_models = n;
        self
    }

    /// Sets the context window of a model name or prefix (see [`DEFAULT_CONTEXT_WINDOWS`] for
    /// how names match), replacing any earlier entry for the same name.
    pub fn context_window(mut self, model: impl Into<String>, tokens: u64) -> Self {
        let model = model.into();
        self.windows.retain(|(n, _)| *n != model);
        self.windows.push((model, tokens));
        self
    }

    /// Forgets every context window, the defaults included; only those set afterwards count.
    pub fn clear_context_windows(mut self) -> Self {
        self.windows.clear();
        self
    }

    /// The most body bytes read; a longer body is refused with `413 request_too_large`
    /// (default [`DEFAULT_BODY_LIMIT`], 4 MiB). The limit holds when an earlier layer already
    /// read the body, by its `content-length` or the length its view recorded.
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// The token estimator for the context check (default [`CharEstimator`]).
    pub fn estimator(mut self, estimator: impl TokenEstimator) -> Self {
        self.estimator = Arc::new(estimator);
        self
    }

    /// Adds a rule of your own ([`ValidationRule`], or a closure
    /// `Fn(&RequestHead<'_>, &Bytes) -> Result<(), ApiError>`), run after the built-in checks
    /// and the rules added before it. A rule that fails answers the request with its
    /// [`ApiError`](crate::ApiError)'s envelope. A layer with a rule reads the body of every
    /// request it validates, whichever built-in checks are switched off.
    pub fn rule(mut self, rule: impl ValidationRule) -> Self {
        self.rules.push(Box::new(rule));
        self
    }

    /// Checks the configuration and builds the layer.
    ///
    /// Fails when `body_limit` is 0, a context window is 0 or its name is empty, or the model
    /// list is empty or holds an empty name.
    pub fn build(self) -> Result<ValidateRequestLayer, ConfigError> {
        if self.body_limit == 0 {
            return Err(config_error("body_limit", "must be at least 1 byte"));
        }
        for (name, tokens) in &self.windows {
            if name.is_empty() {
                return Err(config_error("context_window", "the model name is empty"));
            }
            if *tokens == 0 {
                return Err(config_error(
                    "context_window",
                    format!("the window of {name:?} must be at least 1 token"),
                ));
            }
        }
        let models = match self.models {
            None => None,
            Some(list) => {
                if list.is_empty() {
                    return Err(config_error(
                        "allowed_models",
                        "the list is empty, so every request would be refused",
                    ));
                }
                if list.iter().any(String::is_empty) {
                    return Err(config_error("allowed_models", "a model name is empty"));
                }
                let mut order: Vec<Box<str>> = Vec::with_capacity(list.len());
                let mut set = HashSet::with_capacity(list.len());
                for m in list {
                    let m: Box<str> = m.into_boxed_str();
                    if set.insert(m.clone()) {
                        order.push(m);
                    }
                }
                Some((order, set))
            }
        };
        let shared = Shared {
            checks: self.checks,
            body_limit: self.body_limit,
            estimator: self.estimator,
            models,
            max_listed_models: self.max_listed_models,
            windows: self
                .windows
                .into_iter()
                .map(|(n, w)| (n.into_boxed_str(), w))
                .collect(),
            rules: self.rules,
        };
        Ok(ValidateRequestLayer {
            shared: Arc::new(shared),
        })
    }
}
