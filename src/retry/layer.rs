//! The layer.

use std::sync::Arc;

use tower_layer::Layer;

use super::config::{RetryLayerBuilder, Shared};
use super::service::Retry;

/// Retries LLM API calls that failed for a reason a retry can fix. See the
/// [module docs](crate::retry).
///
/// Cloning is cheap; clones share the settings and the retry budget.
#[derive(Debug, Clone)]
pub struct RetryLayer {
    shared: Arc<Shared>,
}

impl RetryLayer {
    /// A builder with the defaults: 3 attempts, 0.5 s to 8 s backoff with full jitter, server
    /// waits up to 60 s honoured, the default budget, 4 MiB body limit.
    pub fn builder() -> RetryLayerBuilder {
        RetryLayerBuilder::default()
    }

    /// The layer with every default.
    pub fn new() -> Self {
        RetryLayerBuilder::default()
            .build()
            .expect("the default settings are valid")
    }

    pub(crate) fn from_shared(shared: Arc<Shared>) -> Self {
        RetryLayer { shared }
    }
}

impl Default for RetryLayer {
    fn default() -> Self {
        RetryLayer::new()
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry::new(inner, self.shared.clone())
    }
}
