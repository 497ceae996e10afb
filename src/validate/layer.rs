//! The layer.

use std::sync::Arc;

use tower_layer::Layer;

use super::config::{Shared, ValidateBuilder};
use super::service::Validate;
use crate::error::ApiError;
use crate::request::RequestView;

/// Validates LLM requests before they reach the inner service; see the [module docs](super).
///
/// Cloning is cheap: clones share one configuration behind an `Arc`.
#[derive(Clone, Debug)]
pub struct ValidateRequestLayer {
    pub(crate) shared: Arc<Shared>,
}

impl ValidateRequestLayer {
    /// Every check on, any model accepted, [`DEFAULT_CONTEXT_WINDOWS`](super::DEFAULT_CONTEXT_WINDOWS),
    /// a 4 MiB body limit and the character-based token estimate.
    pub fn new() -> Self {
        ValidateBuilder::new()
            .build()
            .expect("the default configuration is valid")
    }

    /// A builder to choose the checks, models, context windows, body limit and estimator.
    pub fn builder() -> ValidateBuilder {
        ValidateBuilder::new()
    }

    /// Runs the built-in body checks of this configuration on an already parsed request,
    /// without a service: `Ok` when the request would pass, else the error it would be
    /// answered with. The checks of the body's fields read [`RequestView::bytes`]; a view that
    /// kept no body is checked for its models and context length only. (The `content-type`
    /// and size checks and the [rules](super::ValidationRule) of your own need the HTTP
    /// request and are not run here.)
    pub fn check(&self, view: &RequestView) -> Result<(), ApiError> {
        super::rules::check(&self.shared, view, view.bytes().map(|b| &b[..]), None)
    }
}

impl Default for ValidateRequestLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for ValidateRequestLayer {
    type Service = Validate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Validate {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}
