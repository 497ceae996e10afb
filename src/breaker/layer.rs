use std::sync::Arc;

use tower_layer::Layer;

use super::config::CircuitBreakerLayerBuilder;
use super::config::{ConfigError, FallbackStep};
use super::fallback::{NoFallback, ServiceFallback};
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

impl CircuitBreakerLayer<NoFallback> {
    /// The same layer (the same circuits, the same handle) with services bound to the targets
    /// that name an upstream ([`Target::named_upstream`](super::Target::named_upstream), the
    /// TOML stack's `[[breaker.fallback]] upstream = "..."`): `service` is asked for each such
    /// name, in the order of the chain. A name it does not know is refused, naming it.
    pub fn bind_upstreams<S>(
        &self,
        mut service: impl FnMut(&str) -> Option<S>,
    ) -> Result<CircuitBreakerLayer<ServiceFallback<S>>, ConfigError> {
        let mut services = Vec::with_capacity(self.shared.config().unbound);
        for step in &self.shared.config().fallbacks {
            let FallbackStep::Target(t) = step else {
                continue;
            };
            let (true, Some(name)) = (t.by_name, t.upstream.as_deref()) else {
                continue;
            };
            match service(name) {
                Some(s) => services.push(s),
                None => {
                    return Err(ConfigError::new(
                        "circuit breaker",
                        "fallback_target",
                        format!("the fallback target '{}' names the upstream '{name}', which is not defined", t.name),
                    ))
                }
            }
        }
        Ok(CircuitBreakerLayer {
            shared: self.shared.clone(),
            fallback: ServiceFallback(Arc::from(services)),
        })
    }

    /// The upstream names the chain's targets refer to ([`Target::named_upstream`](super::Target::named_upstream)), in order.
    pub fn upstream_names(&self) -> Vec<Arc<str>> {
        self.shared
            .config()
            .fallbacks
            .iter()
            .filter_map(|s| match s {
                FallbackStep::Target(t) if t.by_name => t.upstream.clone(),
                _ => None,
            })
            .collect()
    }
}

impl<S, F: Clone> Layer<S> for CircuitBreakerLayer<F> {
    type Service = CircuitBreaker<S, F>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker::new(inner, self.shared.clone(), self.fallback.clone())
    }
}
