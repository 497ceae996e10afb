use std::sync::Arc;

use tower_layer::Layer;

use super::config::CircuitBreakerLayerBuilder;
use super::fallback::NoFallback;
use super::registry::{BreakerHandle, Shared};
use super::service::CircuitBreaker;

/// Wraps a service in a [`CircuitBreaker`]. Every service it builds (one per connection on a
/// server) shares the same circuits, so state is per layer, not per clone.
///
/// `F` is the fallback service's type ([`NoFallback`] without one), see
/// [`CircuitBreakerLayerBuilder::fallback_service`].
#[derive(Clone)]
pub struct CircuitBreakerLayer<F = NoFallback> {
    shared: Arc<Shared>,
    fallback: F,
}

impl<F> std::fmt::Debug for CircuitBreakerLayer<F> {
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
}

impl<F> CircuitBreakerLayer<F> {
    pub(crate) fn from_parts(shared: Arc<Shared>, fallback: F) -> Self {
        CircuitBreakerLayer { shared, fallback }
    }

    /// A handle to read state and metrics and to force states at runtime.
    pub fn handle(&self) -> BreakerHandle {
        BreakerHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<S, F: Clone> Layer<S> for CircuitBreakerLayer<F> {
    type Service = CircuitBreaker<S, F>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker::new(inner, self.shared.clone(), self.fallback.clone())
    }
}
