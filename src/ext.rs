//! Values that layers leave in request and response extensions for each other.
//!
//! Layers never import each other; they meet here. The auth layer inserts a [`KeyIdentity`] that
//! the rate-limit layer keys on; the retry layer records [`Attempts`] on the response; every
//! layer that rejects puts its [`crate::error::ApiError`] in the response extensions.

use std::fmt;
use std::sync::Arc;

/// The caller's API key, as established by an authentication layer: an id that is safe to log,
/// a tier, and the key's own limits. It never holds the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyIdentity {
    id: Arc<str>,
    tier: Option<Arc<str>>,
    limits: KeyLimits,
}

impl KeyIdentity {
    /// An identity with the given id, no tier and no limits of its own.
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        KeyIdentity {
            id: id.into(),
            tier: None,
            limits: KeyLimits::new(),
        }
    }

    /// Sets the tier (`"free"`, `"pro"`).
    pub fn with_tier(mut self, tier: impl Into<Arc<str>>) -> Self {
        self.tier = Some(tier.into());
        self
    }

    /// Sets the key's own limits.
    pub fn with_limits(mut self, limits: KeyLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The key's id, safe to log.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The key's id as a shared string.
    pub fn id_arc(&self) -> &Arc<str> {
        &self.id
    }

    /// The key's tier.
    pub fn tier(&self) -> Option<&str> {
        self.tier.as_deref()
    }

    /// The key's own limits.
    pub fn limits(&self) -> &KeyLimits {
        &self.limits
    }
}

impl fmt::Debug for KeyIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyIdentity")
            .field("id", &self.id)
            .field("tier", &self.tier)
            .field("limits", &self.limits)
            .finish()
    }
}

/// Limits attached to one key, for a rate-limit layer to read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyLimits {
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u64>,
    concurrency: Option<u32>,
}

impl KeyLimits {
    /// No limits.
    pub const fn new() -> Self {
        KeyLimits {
            requests_per_minute: None,
            tokens_per_minute: None,
            concurrency: None,
        }
    }

    /// Requests per minute.
    pub const fn requests_per_minute(mut self, n: u32) -> Self {
        self.requests_per_minute = Some(n);
        self
    }

    /// LLM tokens per minute.
    pub const fn tokens_per_minute(mut self, n: u64) -> Self {
        self.tokens_per_minute = Some(n);
        self
    }

    /// Requests in flight at once.
    pub const fn concurrency(mut self, n: u32) -> Self {
        self.concurrency = Some(n);
        self
    }

    /// Requests per minute, if limited.
    pub const fn rpm(&self) -> Option<u32> {
        self.requests_per_minute
    }

    /// Tokens per minute, if limited.
    pub const fn tpm(&self) -> Option<u64> {
        self.tokens_per_minute
    }

    /// Requests in flight at once, if limited.
    pub const fn max_concurrency(&self) -> Option<u32> {
        self.concurrency
    }
}

/// How many attempts a retry layer made for this response (1 when the first one answered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attempts(pub u32);

/// Left in a response's extensions, beside its [`crate::error::ApiError`], by a layer that
/// refused the call itself because of its own state (an open or probing circuit), before the
/// call reached the upstream.
///
/// A wait such a response reports (`retry-after`) is how long that local state lasts, not a hint
/// from the upstream. A retry layer outside it must not sleep on it: it answers at once, so an
/// open circuit fails fast through the whole stack and parked requests do not hold slots of the
/// layers further out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefusedLocally {
    /// What refused, for logs and stop reasons (`"circuit_breaker"`).
    pub by: &'static str,
}

impl RefusedLocally {
    /// A refusal by a circuit breaker.
    pub const CIRCUIT_BREAKER: RefusedLocally = RefusedLocally {
        by: "circuit_breaker",
    };
}

/// When the whole call must be answered, left in the request extensions by a retry layer with a
/// deadline (`deadline` of [`RetryLayer`](crate::retry::RetryLayer)), for the layers inside: a
/// circuit breaker stops walking its fallback chain there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deadline(pub tokio::time::Instant);

/// The route a request came in by, as its **template** (`/v1/chat/completions`,
/// `/v1/models/{id}`), never the path the client sent: no ids, no query. Left in the request
/// extensions for the layers' metrics (`route` label of `llm_layers.rejections`,
/// `llm_layers.normalize.classifications`, `gen_ai.client.operation.duration`, see
/// [`crate::metrics`]).
///
/// The TOML stack's per-route layer ([`Stack::route_layer`](crate::stack::Stack::route_layer))
/// inserts it for its path (with the `metrics` feature; without it nothing reads it, and
/// nothing is inserted). An application with its own routing inserts it itself, once per
/// request, outside the layers: from a constant per route, or from axum's `MatchedPath`
/// (the route's template, as the router matched it):
///
/// ```
/// use axum::extract::{MatchedPath, Request};
/// use axum::routing::post;
/// use llm_layers::ext::Route;
///
/// // Outside the layers (`Router::layer` wraps every route; `MatchedPath` is set by then).
/// async fn set_route(mut req: Request, next: axum::middleware::Next) -> axum::response::Response {
///     if let Some(path) = req.extensions().get::<MatchedPath>() {
///         let route = Route::new(path.as_str());
///         req.extensions_mut().insert(route);
///     }
///     next.run(req).await
/// }
///
/// let app: axum::Router = axum::Router::new()
///     .route("/v1/chat/completions", post(|| async { "ok" }))
///     .layer(axum::middleware::from_fn(set_route));
/// # let _ = app;
/// ```
///
/// A value is a label value as it is: the metrics keep the first
/// [`max_label_values`](crate::metrics::max_label_values) distinct routes and count every
/// further one as `other`. Put the raw request path here and the metrics lose their routes to
/// `other` after the first few client URLs.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Route(Arc<str>);

impl Route {
    /// The route with this template.
    pub fn new(template: impl Into<Arc<str>>) -> Self {
        Route(template.into())
    }

    /// The route's template.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The route's template as a shared string.
    pub fn as_arc(&self) -> &Arc<str> {
        &self.0
    }
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Route").field(&self.0).finish()
    }
}
