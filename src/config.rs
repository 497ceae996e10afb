//! The error every layer's builder returns for a value it refuses.

use std::borrow::Cow;
use std::fmt;

/// A configuration value was refused when a layer was built. The message names the layer and
/// the field (`invalid retry setting `max_attempts`: must be between 1 and 10, got 0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    layer: &'static str,
    field: Cow<'static, str>,
    message: Cow<'static, str>,
}

impl ConfigError {
    /// A refused value of `layer`'s setting `field`.
    pub fn new(
        layer: &'static str,
        field: impl Into<Cow<'static, str>>,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        ConfigError {
            layer,
            field: field.into(),
            message: message.into(),
        }
    }

    /// The layer whose builder refused the value (`"retry"`, `"circuit breaker"`, ...).
    pub fn layer(&self) -> &'static str {
        self.layer
    }

    /// The setting (builder method or config field) whose value was refused.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// Why the value was refused.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid {} setting `{}`: {}",
            self.layer, self.field, self.message
        )
    }
}

impl std::error::Error for ConfigError {}
