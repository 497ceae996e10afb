use std::sync::Arc;

use tower_layer::Layer;

use super::{NormalizeErrors, NormalizeOptions};
use crate::classify::Classifier;

/// Wraps a service that talks to an LLM upstream so that every failure it returns, whatever its
/// format, becomes one JSON envelope response. See the [module docs](super).
#[derive(Debug, Clone, Default)]
pub struct NormalizeErrorsLayer {
    options: NormalizeOptions,
    classifier: Option<Arc<Classifier>>,
}

impl NormalizeErrorsLayer {
    /// A layer with the default options: 1 MiB read limit and 5 s read timeout for error
    /// bodies, canonical statuses, OpenAI type strings, in-band SSE errors rewritten in lines up
    /// to 64 KiB.
    pub const fn new() -> Self {
        NormalizeErrorsLayer {
            options: NormalizeOptions::new(),
            classifier: None,
        }
    }

    /// A layer with the given options.
    pub const fn with_options(options: NormalizeOptions) -> Self {
        NormalizeErrorsLayer {
            options,
            classifier: None,
        }
    }

    /// Classify upstream answers with `classifier`: its application rules run before the
    /// built-in ones, for error answers, errors inside a `200` and in-band stream errors alike
    /// (see the [module docs](super#application-rules)). A classifier without rules changes
    /// nothing and costs nothing per request.
    pub fn classifier(mut self, classifier: impl Into<Arc<Classifier>>) -> Self {
        let classifier = classifier.into();
        self.classifier = classifier.has_rules().then_some(classifier);
        self
    }
}

impl<S> Layer<S> for NormalizeErrorsLayer {
    type Service = NormalizeErrors<S>;

    fn layer(&self, inner: S) -> Self::Service {
        NormalizeErrors::with_options(inner, self.options).with_classifier(self.classifier.clone())
    }
}
