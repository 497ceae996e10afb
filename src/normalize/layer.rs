use tower_layer::Layer;

use super::{NormalizeErrors, NormalizeOptions};

/// Wraps a service that talks to an LLM upstream so that every failure it returns, whatever its
/// format, becomes one JSON envelope response. See the [module docs](super).
#[derive(Debug, Clone, Copy, Default)]
pub struct NormalizeErrorsLayer {
    options: NormalizeOptions,
}

impl NormalizeErrorsLayer {
    /// A layer with the default options: 1 MiB read limit and 5 s read timeout for error
    /// bodies, canonical statuses, OpenAI type strings, in-band SSE errors rewritten in lines up
    /// to 64 KiB.
    pub const fn new() -> Self {
        NormalizeErrorsLayer {
            options: NormalizeOptions::new(),
        }
    }

    /// A layer with the given options.
    pub const fn with_options(options: NormalizeOptions) -> Self {
        NormalizeErrorsLayer { options }
    }
}

impl<S> Layer<S> for NormalizeErrorsLayer {
    type Service = NormalizeErrors<S>;

    fn layer(&self, inner: S) -> Self::Service {
        NormalizeErrors::with_options(inner, self.options)
    }
}
