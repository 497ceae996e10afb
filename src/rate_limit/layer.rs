//! The layer.

use std::sync::Arc;

use tower_layer::Layer;

use super::config::RateLimitLayerBuilder;
use super::service::RateLimit;
use super::shared::Shared;
use super::RateLimitHandle;

/// Applies [`RateLimit`] to a service. Every clone, and every service it makes, shares the same
/// buckets.
#[derive(Clone)]
pub struct RateLimitLayer {
    shared: Arc<Shared>,
}

impl RateLimitLayer {
    /// A builder; see [`RateLimitLayerBuilder`].
    pub fn builder() -> RateLimitLayerBuilder {
        RateLimitLayerBuilder::default()
    }

    pub(crate) fn from_shared(shared: Arc<Shared>) -> Self {
        RateLimitLayer { shared }
    }

    /// A handle to observe and sweep the layer's state.
    pub fn handle(&self) -> RateLimitHandle {
        RateLimitHandle {
            shared: self.shared.clone(),
        }
    }
}

impl std::fmt::Debug for RateLimitLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitLayer").finish_non_exhaustive()
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit::new(inner, self.shared.clone())
    }
}
