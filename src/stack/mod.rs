//! Declarative stacks: one TOML document turned into ready, validated layers.
//!
//! # Why
//!
//! Each layer of this crate has its own builder, checked when built. A gateway needs all of
//! them, configured from one file that operators edit, refused at start when any value is
//! wrong, with the error naming the field. [`StackConfig`] is that file's shape (plain serde
//! structs, so it can also be embedded in a larger configuration of your own), and
//! [`Stack`] holds the layers it builds:
//!
//! | section | builds |
//! |---|---|
//! | `[[keys]]` | the key store of [`ApiKeyAuthLayer`] ([`KeyConfig`]: the auth layer's `[[keys]]` format) |
//! | `[validation]` | [`ValidateRequestLayer`] ([`ValidationConfig`]) |
//! | `[rate_limit]` | [`RateLimitLayer`] ([`RateLimitConfig`]: defaults and tiers; each key's own `rpm`/`tpm`/`concurrency` override them) |
//! | `[retry]` | [`RetryLayer`] ([`RetryConfig`]): attempts, backoff, deadline and budget |
//! | `[breaker]` | [`CircuitBreakerLayer`] ([`BreakerConfig`]) with its fallback model and chain (`[[breaker.fallback]]`, [`FallbackTargetConfig`]) |
//! | `[breaker.health_check]` | a [`HealthCheck`] of the top-level breaker ([`HealthCheckConfig`]), [`Stack::health_check`]; the application starts it |
//! | `[upstream]` | the per-attempt timeout and the normalizer's stream settings ([`UpstreamConfig`], [`Stack::normalize_options`]) |
//! | `[routes."/path"]` | a route's own layers and settings ([`RouteConfig`]) |
//!
//! Each section is a serde struct with `deny_unknown_fields`; string choices are enums
//! ([`BreakerKey`], [`JitterConfig`], [`Backend`], [`RedisFailure`]); a key left out takes the
//! value of the section's `Default` impl (or, where that is `None`, the layer builder's own
//! default). Values with a range the stack knows are checked while the document is read
//! (non-zero durations and counts, percentages, digests, times).
//!
//! # Routes: switches and overrides
//!
//! `[routes."/path"]` sets a route's layers. `auth`, `validate` and `rate_limit` are on unless
//! set to `false`. `validate`, `rate_limit`, `retry`, `breaker` and `upstream` may instead be
//! *tables* that override the top-level section for that route:
//!
//! ```toml
//! [rate_limit.defaults]
//! rpm = 600
//! tpm = 1000000
//!
//! [routes."/v1/embeddings".rate_limit.defaults]
//! rpm = 60            # this route: 60 requests a minute, tpm still 1000000
//!
//! [routes."/v1/completions".retry]
//! max_attempts = 1    # no retries here; backoff, budget... as in [retry]
//! ```
//!
//! **The merge rule:** the route's table is laid over the top-level section key by key. A key
//! the table gives replaces the top-level value; a key it leaves out keeps the top-level value
//! (and a top-level key left out keeps its default). Sub-tables merge the same way one level
//! down (`defaults`, each tier of `tiers`, each model of `context_windows`); lists
//! (`allowed_models`) are replaced whole. A route with an override table gets a layer of its
//! own built from the merged settings (its own buckets, retry budget or circuits); routes
//! without one share the top-level layers. See [`Merge`].
//!
//! # One layer per route
//!
//! [`Stack::route_layer`] gives a route's whole edge stack (auth, validation, rate limit, as
//! its entry says) as one [`RouteLayer`], so a route is guarded with a single
//! `post(handler).layer(stack.route_layer(path))`: no chain of `.layer(a).layer(b)` on a
//! `MethodRouter`, whose inference fails (E0283). The settings of the upstream call are per
//! route too: [`Stack::retry_for`], [`Stack::breaker_for`], [`Stack::attempt_timeout_for`],
//! [`Stack::normalize_options_for`].
//!
//! # Errors
//!
//! Every error is the crate's [`ConfigError`] (layer `"configuration"`) whose
//! [`field`](ConfigError::field) is the TOML path of the refused value, as serde reached it
//! (`breaker.failure_rate`, `keys[2].sha256`, `routes."/v1/chat/completions".rate_limit.defaults.rpm`).
//! A value refused by a layer's builder is reported at the path of the section that was being
//! built (`retry`, `routes."/v1/completions".breaker`), with the builder's message, which
//! names its setting. No message quotes a value of the document (a value may be a secret):
//! where the parser would quote one, `"…"` stands instead.
//!
//! # Example
//!
//! ```
//! use axum::routing::{get, post};
//! use axum::Router;
//! use axum::body::Body;
//! use llm_layers::stack::Stack;
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let stack = Stack::from_toml_str(r#"
//!     [[keys]]
//!     id = "team-a"
//!     secret = "sk-team-a-0123456789abcdef"
//!
//!     [validation]
//!     allowed_models = ["gpt-4o", "gpt-4o-mini"]
//!
//!     [breaker]
//!     failure_rate = 50.0
//!     fallback_model = "gpt-4o-mini"
//!
//!     [routes."/v1/models"]
//!     validate = false
//!
//!     [routes."/healthz"]
//!     auth = false
//!     validate = false
//!     rate_limit = false
//! "#)?;
//!
//! // One layer per route: the layers its entry asks for, auth outermost.
//! let route = |path: &str| stack.route_layer(path);
//! let app: Router = Router::new()
//!     .route("/v1/chat/completions", post(|| async { "{}" }).layer(route("/v1/chat/completions")))
//!     .route("/v1/models", get(|| async { "{}" }).layer(route("/v1/models")))
//!     .route("/healthz", get(|| async { "ok" }).layer(route("/healthz")));
//!
//! // No key: /healthz answers, the chat route refuses with the envelope.
//! let call = |path: &str| {
//!     let method = if path == "/healthz" { "GET" } else { "POST" };
//!     let req = http::Request::builder().method(method).uri(path).body(Body::empty()).unwrap();
//!     app.clone().oneshot(req)
//! };
//! assert_eq!(call("/healthz").await?.status(), 200);
//! assert_eq!(call("/v1/chat/completions").await?.status(), 401);
//!
//! // A wrong value is refused, naming the field.
//! let err = Stack::from_toml_str("[breaker]\nfailure_rate = 120.0").unwrap_err();
//! assert_eq!(err.field(), "breaker.failure_rate");
//! let err = Stack::from_toml_str("[routes.\"/v1/chat\".retry]\nmax_attempts = \"two\"").unwrap_err();
//! assert_eq!(err.field(), "routes.\"/v1/chat\".retry.max_attempts");
//! # Ok(())
//! # }
//! ```

mod build;
mod config;
mod route;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::auth::{ApiKeyAuthLayer, InMemoryKeyStore};
use crate::breaker::{CircuitBreakerLayer, HealthCheck};
use crate::normalize::NormalizeOptions;
use crate::rate_limit::RateLimitLayer;
use crate::retry::RetryLayer;
use crate::validate::ValidateRequestLayer;

pub use self::config::{
    Backend, BreakerConfig, BreakerKey, BreakerOverride, Expiry, FallbackTargetConfig,
    HealthCheckConfig, JitterConfig, KeyConfig, LimitsConfig, LimitsOverride, Merge, Name, Percent,
    RateLimitConfig, RateLimitOverride, RedisFailure, RedisUrl, RetryConfig, RetryOverride,
    RouteConfig, Secret, Sha256Hex, StackConfig, Switch, UpstreamConfig, UpstreamOverride,
    ValidationConfig, ValidationOverride,
};
pub use self::route::{
    EdgeLayers, RouteLayer, SetRoute, Toggle, ToggleBody, ToggleFuture, ToggleService,
};
pub use crate::config::ConfigError;

/// A refused value at a TOML path.
fn refuse(
    field: impl Into<Cow<'static, str>>,
    message: impl Into<Cow<'static, str>>,
) -> ConfigError {
    ConfigError::new("configuration", field, message)
}

/// Which edge layers guard a route, as its `[routes."/path"]` entry says (all on for a route
/// not listed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutePolicy {
    /// API-key authentication.
    pub auth: bool,
    /// Request validation.
    pub validate: bool,
    /// Rate limiting.
    pub rate_limit: bool,
}

impl Default for RoutePolicy {
    fn default() -> Self {
        RoutePolicy {
            auth: true,
            validate: true,
            rate_limit: true,
        }
    }
}

/// The layers of one listed route: its policy, and the layers it has of its own (built from
/// its override tables merged over the top-level sections).
#[derive(Debug, Clone)]
struct RouteLayers {
    policy: RoutePolicy,
    validate: Option<ValidateRequestLayer>,
    rate_limit: Option<RateLimitLayer>,
    retry: Option<RetryLayer>,
    breaker: Option<CircuitBreakerLayer>,
    attempt_timeout: Option<Duration>,
    normalize: Option<NormalizeOptions>,
}

/// The layers built from a [`StackConfig`]. Cloning a layer out of it shares its state.
#[derive(Debug, Clone)]
pub struct Stack {
    auth: ApiKeyAuthLayer<InMemoryKeyStore>,
    validate: ValidateRequestLayer,
    rate_limit: RateLimitLayer,
    retry: RetryLayer,
    breaker: CircuitBreakerLayer,
    health_check: Option<HealthCheck>,
    attempt_timeout: Duration,
    normalize: NormalizeOptions,
    routes: BTreeMap<String, RouteLayers>,
    keys: usize,
}

impl Stack {
    /// Parses and builds a TOML document.
    pub fn from_toml_str(text: &str) -> Result<Stack, ConfigError> {
        Stack::build(&parse_toml::<StackConfig>(text)?)
    }

    /// Reads, parses and builds a TOML file.
    pub fn from_toml_file(path: impl AsRef<Path>) -> Result<Stack, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| refuse("path", format!("cannot read {}: {e}", path.display())))?;
        Stack::from_toml_str(&text)
    }

    /// Builds the layers, checking every value.
    pub fn build(config: &StackConfig) -> Result<Stack, ConfigError> {
        let store = build::key_store(&config.keys)?;
        let auth = ApiKeyAuthLayer::builder(store)
            .build()
            .map_err(|e| refuse("keys", e.to_string()))?;
        let validate = build::validate("validation", &config.validation)?;
        let rate_limit = build::rate_limit("rate_limit", &config.rate_limit)?;
        let retry = build::retry("retry", &config.retry)?;
        let breaker = build::breaker("breaker", &config.breaker)?;
        let health_check = build::health_check("breaker", &config.breaker)?;
        let attempt_timeout = Duration::from_millis(config.upstream.attempt_timeout_ms.get());
        let normalize = config.upstream.normalize_options();

        let mut routes = BTreeMap::new();
        for (path, route) in &config.routes {
            let at = format!("routes.{}", route_segment(path));
            if !path.starts_with('/') {
                return Err(refuse(at, "a route is a path starting with `/`"));
            }
            let own = |section: &str| format!("{at}.{section}");
            let layers = RouteLayers {
                policy: RoutePolicy {
                    auth: route.auth,
                    validate: route.validate.is_on(),
                    rate_limit: route.rate_limit.is_on(),
                },
                validate: match route.validate.overrides() {
                    Some(p) => Some(build::validate(
                        &own("validate"),
                        &config::merged(&config.validation, p),
                    )?),
                    None => None,
                },
                rate_limit: match route.rate_limit.overrides() {
                    Some(p) => Some(build::rate_limit(
                        &own("rate_limit"),
                        &config::merged(&config.rate_limit, p),
                    )?),
                    None => None,
                },
                retry: match &route.retry {
                    Some(p) => Some(build::retry(
                        &own("retry"),
                        &config::merged(&config.retry, p),
                    )?),
                    None => None,
                },
                breaker: match &route.breaker {
                    Some(p) if p.health_check.is_some() => {
                        return Err(refuse(
                            own("breaker.health_check"),
                            "health checks are set in the top-level [breaker.health_check]",
                        ))
                    }
                    Some(p) => Some(build::breaker(
                        &own("breaker"),
                        &config::merged(&config.breaker, p),
                    )?),
                    None => None,
                },
                attempt_timeout: route.upstream.as_ref().map(|p| {
                    let u = config::merged(&config.upstream, p);
                    Duration::from_millis(u.attempt_timeout_ms.get())
                }),
                normalize: route
                    .upstream
                    .as_ref()
                    .map(|p| config::merged(&config.upstream, p).normalize_options()),
            };
            routes.insert(path.clone(), layers);
        }
        Ok(Stack {
            auth,
            validate,
            rate_limit,
            retry,
            breaker,
            health_check,
            attempt_timeout,
            normalize,
            routes,
            keys: config.keys.len(),
        })
    }

    /// The number of API keys configured.
    pub fn key_count(&self) -> usize {
        self.keys
    }

    /// The authentication layer.
    pub fn auth(&self) -> ApiKeyAuthLayer<InMemoryKeyStore> {
        self.auth.clone()
    }

    /// The top-level validation layer.
    pub fn validate(&self) -> ValidateRequestLayer {
        self.validate.clone()
    }

    /// The top-level rate limiter (buckets shared with every clone).
    pub fn rate_limit(&self) -> RateLimitLayer {
        self.rate_limit.clone()
    }

    /// The top-level retry layer (budget shared with every clone).
    pub fn retry(&self) -> RetryLayer {
        self.retry.clone()
    }

    /// The top-level circuit breaker (state shared with every clone).
    pub fn breaker(&self) -> CircuitBreakerLayer {
        self.breaker.clone()
    }

    /// The health check of `[breaker.health_check]`, for the top-level breaker's circuit it
    /// names; start it with [`BreakerHandle::spawn_health_check`](crate::breaker::BreakerHandle::spawn_health_check)
    /// on [`breaker`](Self::breaker)'s handle, through a client of the upstream.
    pub fn health_check(&self) -> Option<&HealthCheck> {
        self.health_check.as_ref()
    }

    /// The per-attempt timeout of upstream calls.
    pub fn attempt_timeout(&self) -> Duration {
        self.attempt_timeout
    }

    /// The normalizer's options of upstream calls: the stream settings of `[upstream]`
    /// (`hold_first_event`, `first_event_max_bytes`, `first_event_timeout_ms`,
    /// `stream_idle_timeout_ms`, `stream_total_timeout_ms`), the other options at their
    /// defaults.
    pub fn normalize_options(&self) -> NormalizeOptions {
        self.normalize
    }

    /// The normalizer's options of the route's upstream calls: its `upstream` override merged
    /// over `[upstream]`, else the top-level ones.
    pub fn normalize_options_for(&self, path: &str) -> NormalizeOptions {
        self.routes
            .get(path)
            .and_then(|r| r.normalize)
            .unwrap_or(self.normalize)
    }

    /// Which edge layers guard a route: its `[routes."/path"]` entry, else everything on.
    pub fn policy(&self, path: &str) -> RoutePolicy {
        self.routes.get(path).map(|r| r.policy).unwrap_or_default()
    }

    /// The routes listed in the document, with their policies.
    pub fn routes(&self) -> impl Iterator<Item = (&str, &RoutePolicy)> {
        self.routes.iter().map(|(k, v)| (k.as_str(), &v.policy))
    }

    /// The auth layer if the route's policy asks for it.
    pub fn auth_for(&self, path: &str) -> Option<ApiKeyAuthLayer<InMemoryKeyStore>> {
        self.policy(path).auth.then(|| self.auth())
    }

    /// The route's rate limiter if its policy asks for one: its own (with its own buckets)
    /// when the route overrides `rate_limit`, else the top-level one.
    pub fn rate_limit_for(&self, path: &str) -> Option<RateLimitLayer> {
        match self.routes.get(path) {
            Some(r) if !r.policy.rate_limit => None,
            Some(RouteLayers {
                rate_limit: Some(own),
                ..
            }) => Some(own.clone()),
            _ => Some(self.rate_limit()),
        }
    }

    /// The route's validation layer if its policy asks for one: its own when the route
    /// overrides `validate`, else the top-level one.
    pub fn validate_for(&self, path: &str) -> Option<ValidateRequestLayer> {
        match self.routes.get(path) {
            Some(r) if !r.policy.validate => None,
            Some(RouteLayers {
                validate: Some(own),
                ..
            }) => Some(own.clone()),
            _ => Some(self.validate()),
        }
    }

    /// The retry layer of the route's upstream calls: its own (with its own budget) when the
    /// route overrides `retry`, else the top-level one.
    pub fn retry_for(&self, path: &str) -> RetryLayer {
        match self.routes.get(path).and_then(|r| r.retry.as_ref()) {
            Some(own) => own.clone(),
            None => self.retry(),
        }
    }

    /// The circuit breaker of the route's upstream calls: its own (with its own circuits)
    /// when the route overrides `breaker`, else the top-level one.
    pub fn breaker_for(&self, path: &str) -> CircuitBreakerLayer {
        match self.routes.get(path).and_then(|r| r.breaker.as_ref()) {
            Some(own) => own.clone(),
            None => self.breaker(),
        }
    }

    /// The per-attempt timeout of the route's upstream calls: its `upstream` override, else
    /// the top-level one.
    pub fn attempt_timeout_for(&self, path: &str) -> Duration {
        self.routes
            .get(path)
            .and_then(|r| r.attempt_timeout)
            .unwrap_or(self.attempt_timeout)
    }

    /// Whether a listed route overrides the settings of its upstream calls (`retry`,
    /// `breaker` or `upstream`), so that it needs an upstream service of its own.
    pub fn has_own_upstream_layers(&self, path: &str) -> bool {
        self.routes.get(path).is_some_and(|r| {
            r.retry.is_some() || r.breaker.is_some() || r.attempt_timeout.is_some()
        })
    }

    /// The route's whole edge stack as one layer: auth (outermost), validation, rate limit,
    /// as [`auth_for`](Self::auth_for), [`validate_for`](Self::validate_for) and
    /// [`rate_limit_for`](Self::rate_limit_for) give them. Use it as
    /// `post(handler).layer(stack.route_layer(path))`; [`RouteLayer::with_auth`] puts another
    /// auth layer in.
    pub fn route_layer(&self, path: &str) -> RouteLayer {
        RouteLayer {
            route: crate::ext::Route::new(path),
            auth: self.auth_for(path),
            validate: self.validate_for(path),
            rate_limit: self.rate_limit_for(path),
        }
    }
}

/// Reads a TOML document into any serde type, the way [`Stack::from_toml_str`] reads a
/// [`StackConfig`]: a refused value is a [`ConfigError`] at its TOML path (from
/// `serde_path_to_error`), with its line, and without quoting values of the document. Use it
/// for a document that holds a stack's sections beside tables of your own.
pub fn parse_toml<T: DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    let line_of = |span: Option<std::ops::Range<usize>>| {
        span.map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
    };
    let de = toml::Deserializer::parse(text).map_err(|e| {
        let message = redact(e.message().trim());
        match line_of(e.span()) {
            Some(n) => refuse(format!("line {n}"), format!("{message} (line {n})")),
            None => refuse("toml", message),
        }
    })?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = toml_path(e.path());
        let inner = e.inner();
        let mut message = redact(inner.message().trim());
        let line = line_of(inner.span());
        if let Some(n) = line {
            message.push_str(&format!(" (line {n})"));
        }
        let field = match (field, line) {
            (Some(f), _) => f,
            (None, Some(n)) => format!("line {n}"),
            (None, None) => "toml".to_owned(),
        };
        refuse(field, message)
    })
}

/// A serde path as TOML writes it: `routes."/v1/chat".retry`, `keys[2].sha256`. `None` for
/// the document itself.
fn toml_path(path: &serde_path_to_error::Path) -> Option<String> {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            // How the TOML parser hands a datetime to serde (a map of one private key): the
            // value is the datetime itself.
            Segment::Map { key } if key == "$__toml_private_datetime" => break,
            // A route is always written quoted, as its table header is.
            Segment::Map { key } if out == "routes" => {
                out.push('.');
                out.push_str(&route_segment(key));
            }
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&key_segment(key));
            }
            Segment::Unknown => {}
        }
    }
    (!out.is_empty()).then_some(out)
}

/// One key of a TOML path: bare when TOML allows it, else quoted; a key that does not look
/// like a name or a route path is not repeated (a stray value written as a key may be a
/// secret).
fn key_segment(key: &str) -> Cow<'_, str> {
    let bare = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    let path_like = |c: char| bare(c) || "./*:{}".contains(c);
    if !key.is_empty() && key.chars().all(bare) {
        Cow::Borrowed(key)
    } else if key.len() <= 200 && key.chars().all(path_like) {
        Cow::Owned(format!("\"{key}\""))
    } else {
        Cow::Borrowed("\"…\"")
    }
}

/// A route's key in a TOML path: always quoted (`routes."/v1/chat/completions"`).
fn route_segment(key: &str) -> Cow<'_, str> {
    match key_segment(key) {
        Cow::Borrowed(k) if k == key => Cow::Owned(format!("\"{key}\"")),
        other => other,
    }
}

/// A parser message without the values it quotes (`invalid type: string "sk-..."`,
/// ``unknown variant `sk-...` ``): a value of a configuration file may be a secret. Names of
/// keys and variants (plain identifiers and numbers) stay.
fn redact(message: &str) -> String {
    let plain = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-')
            && !s.contains("sk-")
    };
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find(['"', '`']) {
        let quote = rest.as_bytes()[i] as char;
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        match after.find(quote) {
            Some(j) => {
                let inner = &after[..j];
                out.push(quote);
                out.push_str(if quote == '`' && plain(inner) {
                    inner
                } else {
                    "…"
                });
                out.push(quote);
                rest = &after[j + 1..];
            }
            None => {
                out.push(quote);
                out.push('…');
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests;
