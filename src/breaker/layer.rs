use std::sync::Arc;

use tower_layer::Layer;

use super::config::CircuitBreakerLayerBuilder;
use super::registry::{BreakerHandle, Shared};
use super::service::CircuitBreaker;

/// Wraps a service in a [`CircuitBreaker`]. Every service it builds (one per connection on a
/// server) shares the same circuits, so state is per layer, not per clone.
#[derive(Clone)]
pub struct CircuitBreakerLayer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for CircuitBreakerLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBreakerLayer")
            .field("config", self.shared.config())
            .finish()
    }
}

impl CircuitBreakerLayer {
    /// A builder with the defaults described on [`CircuitBreakerLayerBuilder`].
    pub fn builder() -> CircuitBreakerLayerBuilder {
        CircuitBreakerLayerBuilder::default()
    }

    pub(crate) fn from_shared(shared: Arc<Shared>) -> Self {
        CircuitBreakerLayer { shared }
    }

    /// A handle to read state and metrics and to force states at runtime.
    pub fn handle(&self) -> BreakerHandle {
        BreakerHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<S> Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreaker<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker::new(inner, self.shared.clone())
    }
}
