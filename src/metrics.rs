//! Metrics and tracing: the names every layer reports under, in one place.
//!
//! With the feature `metrics`, every layer counts what it does through the
//! [`metrics`](https://docs.rs/metrics) facade: requests, rejections by code, retries and their
//! stop reasons, circuit transitions, rate-limit admissions and token charges, classifications,
//! authentication outcomes. The application installs the recorder it wants
//! (`metrics-exporter-prometheus`, `metrics-exporter-statsd`, OpenTelemetry through
//! `metrics-exporter-opentelemetry`); the library chooses no exporter. The names and label keys
//! are the constants of this module, and they exist with the feature off too, so dashboards and
//! tests can name them.
//!
//! # Why the `metrics` facade and not OpenTelemetry
//!
//! * **No exporter chosen by the library.** A library that records through the OpenTelemetry
//!   SDK brings its SDK, its runtime and its version into every application; the `metrics`
//!   facade is one small crate, and the application picks the exporter.
//! * **OpenTelemetry is one recorder away**: `metrics-exporter-opentelemetry` forwards the
//!   facade to an OpenTelemetry `Meter`. The instruments that have a name in the OpenTelemetry
//!   GenAI semantic conventions use it ([`TOKEN_USAGE`], with
//!   [`label::TOKEN_TYPE`] = `input` / `output`); the others are `llm_layers.*`.
//! * **Cheap when nobody listens.** With no recorder installed, a call on a success path is
//!   one relaxed atomic load (and a thread-local read) and no allocation; a refusal builds its
//!   small label list first. With the feature off, the layers' calls are empty inline
//!   functions: nothing is compiled in.
//!
//! # Instruments
//!
//! | name | kind | labels | counts |
//! |---|---|---|---|
//! | [`REQUESTS`] `llm_layers.requests` | counter | `layer` | requests each layer was called with |
//! | [`REJECTIONS`] `llm_layers.rejections` | counter | `layer`, `code`, `key_id`, `route` | requests a layer answered itself with an error envelope (the retry layer: a body it could not read for replay, its own attempt timeout or deadline) |
//! | [`AUTH_OUTCOMES`] `llm_layers.auth.outcomes` | counter | `outcome` | `ok`, `missing`, `invalid`, `expired`, `revoked`, `forbidden_model`, `unavailable` (the key store or the identity provider failed) |
//! | [`RETRY_RETRIES`] `llm_layers.retry.retries` | counter | `code` | retries scheduled, by the code of the answer retried |
//! | [`RETRY_ATTEMPTS`] `llm_layers.retry.attempts` | histogram | — | attempts per request the retry layer answered (1: no retry) |
//! | [`RETRY_BUDGET_EXHAUSTED`] `llm_layers.retry.budget_exhausted` | counter | — | retries refused by the retry budget |
//! | [`RETRY_STOPS`] `llm_layers.retry.stops` | counter | `reason` | why a request was not retried (again): [`RetryStop::as_str`](crate::retry::RetryStop::as_str) |
//! | [`BREAKER_STATE`] `llm_layers.breaker.state` | gauge | `name`, `circuit` | 0 closed, 1 open, 2 half-open, set at each transition |
//! | [`BREAKER_TRANSITIONS`] `llm_layers.breaker.transitions` | counter | `name`, `from`, `to`, `reason` | circuit state changes |
//! | [`BREAKER_REJECTIONS`] `llm_layers.breaker.rejections` | counter | `name`, `circuit` | calls an open or probing circuit refused (a fallback may still answer them) |
//! | [`BREAKER_FALLBACKS`] `llm_layers.breaker.fallbacks` | counter | `name`, `fallback`, `outcome` | refused calls sent to a fallback step; `outcome` `ok` or `failed` |
//! | [`BREAKER_PROBES`] `llm_layers.breaker.probes` | counter | `name`, `result` | half-open probe rounds that decided a circuit: `ok`, `failed`, `timed_out`, `dropped` |
//! | [`BREAKER_HEALTH_CHECKS`] `llm_layers.breaker.health_checks` | counter | `name`, `result` | active health-check probes ([`HealthCheck`](crate::breaker::HealthCheck)): [`ProbeResult::as_str`](crate::breaker::ProbeResult::as_str) |
//! | [`RATE_LIMIT_ADMISSIONS`] `llm_layers.rate_limit.admissions` | counter | — | requests admitted |
//! | [`RATE_LIMIT_WAITS`] `llm_layers.rate_limit.waits` | counter | — | refusals turned into a wait (`wait_ms`) |
//! | [`RATE_LIMIT_WAIT`] `llm_layers.rate_limit.wait` | histogram | — | each such wait, in seconds |
//! | [`RATE_LIMIT_TOKENS`] `llm_layers.rate_limit.tokens` | counter | `kind` | tokens `charged` (at admission and for overruns) and `refunded` (estimate above the reported usage) |
//! | [`RATE_LIMIT_IN_FLIGHT`] `llm_layers.rate_limit.in_flight` | gauge | — | requests holding a concurrency slot (layers with a concurrency cap) |
//! | [`NORMALIZE_CLASSIFICATIONS`] `llm_layers.normalize.classifications` | counter | `code`, `provider`, `route` | upstream failures the normalizer turned into envelopes, at the head or in a stream |
//! | [`OPERATION_DURATION`] `gen_ai.client.operation.duration` | histogram | `gen_ai.operation.name`, `error.type` (failures only), `route` | seconds from the normalizer's call to the answer's head (for a held stream, its first event), per attempt: `chat` (chat completions and Responses), `text_completion`, `embeddings`, `other`; `error.type` is the envelope's code |
//! | [`TOKEN_USAGE`] `gen_ai.client.token.usage` | histogram | `gen_ai.token.type` | tokens per answer as its `usage` reports them (read by a rate-limit layer with a token limit) |
//!
//! # Labels and their cardinality
//!
//! Every label value is bounded, and none is a secret:
//!
//! * `layer`, `code`, `outcome`, `reason`, `from`, `to`, `result`, `kind`, `provider` and
//!   `gen_ai.token.type` take values from fixed sets of static strings
//!   ([`ErrorCode::as_str`](crate::ErrorCode::as_str), [`layer`]); a provider family the crate
//!   does not know is `other`.
//! * `name` and `fallback` come from configuration (a breaker's name, a fallback's name).
//! * `key_id` is the id of the [`KeyIdentity`](crate::ext::KeyIdentity) the auth layer
//!   established (never the secret), on the rejections of every layer after auth (validation,
//!   rate limit, retry, breaker); `none` on the auth layer's own (it refused the key) and where
//!   no auth layer ran.
//! * `route` is the route's **template**, the [`Route`](crate::ext::Route) in the request
//!   extensions: [`Stack::route_layer`](crate::stack::Stack::route_layer) inserts its path
//!   (the example gateway gets it that way); an application with its own routing inserts one,
//!   for instance from axum's `MatchedPath` (see [`Route`](crate::ext::Route)). Never the path
//!   the client sent: a query, an id in the path, a path no route matched never become a value.
//!   A request that carries no `Route` has **no `route` label** (its series are the ones it had
//!   before routes were labelled), so a series with `route` came through a route the
//!   application named.
//! * `circuit` is a circuit's key, which may be a client's model.
//! * `key_id`, `route` and `circuit` each go through a bounded set: the first
//!   [`max_label_values`] distinct values (32 by default, see [`set_max_label_values`]) are
//!   kept, every later one is counted as `other`.
//!
//! Each layer takes the key id and the route from the request when it is called, before it
//! hands the request on (two `Arc<str>` clones; nothing without the feature), so that it can
//! label a rejection it answers later, when the request is gone.
//!
//! Instruments on a layer's success path (`requests`, `admissions`, `auth.outcomes{outcome="ok"}`,
//! `tokens`, `in_flight`, the histograms) have static labels only: a key built at compile time,
//! looked up by the recorder on each call, no allocation. The one with a `route`
//! (`gen_ai.client.operation.duration`) has its keys built once per route, when the route is
//! first seen, and looked up (under a read lock) on each call: no allocation either. So do `auth.outcomes`,
//! `retry.retries{code}` and `retry.stops{reason}`, one static key per value (a request sent
//! once because it cannot be replayed records its stop reason on its success path). The other
//! instruments with labels (`rejections`, `classifications`, the breaker's) are on refusal,
//! failure and transition paths only, and build their label list per call. A recorder that is installed
//! after the layers were built sees everything from then on: no handle is cached in a layer.
//!
//! # Tracing fields
//!
//! The layers' `tracing` events use one set of field names ([`field`]):
//!
//! | field | what |
//! |---|---|
//! | `request_id` | the request's id (`x-request-id`), on the span the application opens per request |
//! | `route` | the route's path, on that span too |
//! | `model` | a model name, where an event names one: the client's, Debug-escaped |
//! | `key_id` | the key's id, Debug-escaped (never the secret) |
//! | `code` | the [`ErrorCode`] string of a rejection or failure |
//! | `attempt` | the retry layer's attempt number |
//! | `layer` | the layer's kind, as the metrics' `layer` label: `auth`, `validate`, `rate_limit`, `retry`, `breaker`, `normalize` |
//! | `name` | a breaker's configured name; `circuit` its circuit's key (Debug-escaped) |
//!
//! The rate limit logs its key as `key`, with `key_by` saying what it is (a key id, a client
//! address, a model); header and custom keys, which may be credentials, are never logged.
//!
//! A request's own fields (`request_id`, `route`) belong on the span the application opens per
//! request (the example gateway's `TraceLayer` span); the layers' events are recorded inside it
//! and inherit them. Rejections of a request are logged at `info` (a client's mistake: missing
//! or wrong key, invalid body, rate limit) or `warn` (the gateway's own trouble: a key store
//! down, a circuit opening); what a layer does inside (a retry scheduled, a classification) at
//! `debug`. Every string a client chose (a model, a key id, a header) is recorded with `?`
//! (Debug), so a newline or a control character in it is escaped and cannot forge a log line.
//!
//! # Example
//!
//! ```
//! # #[cfg(feature = "metrics")] {
//! use llm_layers::ext::{KeyIdentity, Route};
//! use llm_layers::metrics::{label, REJECTIONS};
//! use llm_layers::validate::ValidateRequestLayer;
//! use metrics_util::debugging::{DebugValue, DebuggingRecorder};
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! let recorder = DebuggingRecorder::new();
//! let snapshotter = recorder.snapshotter();
//! metrics::with_local_recorder(&recorder, || {
//!     let svc = ValidateRequestLayer::new().layer(service_fn(|_req| async {
//!         Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
//!     }));
//!     let mut req = http::Request::post("/v1/chat/completions")
//!         .header("content-type", "application/json")
//!         .body("{not json".to_owned())
//!         .unwrap();
//!     // What an auth layer and a route layer outside would have left.
//!     req.extensions_mut().insert(KeyIdentity::new("team-a"));
//!     req.extensions_mut().insert(Route::new("/v1/chat/completions"));
//!     let res = futures_util::FutureExt::now_or_never(svc.oneshot(req)).unwrap().unwrap();
//!     assert_eq!(res.status(), 400);
//! });
//! let rejected = snapshotter.snapshot().into_vec().into_iter().find(|(key, ..)| {
//!     let labels: Vec<_> = key.key().labels().map(|l| (l.key(), l.value())).collect();
//!     key.key().name() == REJECTIONS
//!         && labels
//!             == [
//!                 (label::LAYER, "validate"),
//!                 (label::CODE, "invalid_value"),
//!                 (label::KEY_ID, "team-a"),
//!                 (label::ROUTE, "/v1/chat/completions"),
//!             ]
//! });
//! assert!(matches!(rejected, Some((_, _, _, DebugValue::Counter(1)))));
//! # }
//! ```

/// Requests each layer was called with; labels `layer`.
pub const REQUESTS: &str = "llm_layers.requests";
/// Requests a layer answered itself with an error envelope; labels `layer`, `code`, `key_id`
/// and, when the request carries a [`Route`](crate::ext::Route), `route`.
pub const REJECTIONS: &str = "llm_layers.rejections";
/// Authentication outcomes; label `outcome`.
pub const AUTH_OUTCOMES: &str = "llm_layers.auth.outcomes";
/// Retries scheduled; label `code` (the answer retried).
pub const RETRY_RETRIES: &str = "llm_layers.retry.retries";
/// Attempts per request the retry layer answered (histogram).
pub const RETRY_ATTEMPTS: &str = "llm_layers.retry.attempts";
/// Retries refused by the retry budget.
pub const RETRY_BUDGET_EXHAUSTED: &str = "llm_layers.retry.budget_exhausted";
/// Why a request was not retried (again); label `reason`.
pub const RETRY_STOPS: &str = "llm_layers.retry.stops";
/// A circuit's state (gauge: 0 closed, 1 open, 2 half-open); labels `name`, `circuit`.
pub const BREAKER_STATE: &str = "llm_layers.breaker.state";
/// Circuit state changes; labels `name`, `from`, `to`, `reason`.
pub const BREAKER_TRANSITIONS: &str = "llm_layers.breaker.transitions";
/// Calls a circuit refused; labels `name`, `circuit`.
pub const BREAKER_REJECTIONS: &str = "llm_layers.breaker.rejections";
/// Refused calls sent to a fallback step; labels `name`, `fallback`, `outcome`.
pub const BREAKER_FALLBACKS: &str = "llm_layers.breaker.fallbacks";
/// Probe rounds that decided a half-open circuit; labels `name`, `result`.
pub const BREAKER_PROBES: &str = "llm_layers.breaker.probes";
/// The time of one call to the upstream, in seconds (OpenTelemetry GenAI); labels
/// `gen_ai.operation.name`, for a failure `error.type`, and (with a
/// [`Route`](crate::ext::Route)) `route`.
pub const OPERATION_DURATION: &str = "gen_ai.client.operation.duration";
/// Active health-check probes by result.
pub const BREAKER_HEALTH_CHECKS: &str = "llm_layers.breaker.health_checks";
/// Requests a rate-limit layer admitted.
pub const RATE_LIMIT_ADMISSIONS: &str = "llm_layers.rate_limit.admissions";
/// Rate-limit refusals turned into a wait.
pub const RATE_LIMIT_WAITS: &str = "llm_layers.rate_limit.waits";
/// Each rate-limit wait, in seconds (histogram).
pub const RATE_LIMIT_WAIT: &str = "llm_layers.rate_limit.wait";
/// Tokens charged and refunded by a rate-limit layer; label `kind`.
pub const RATE_LIMIT_TOKENS: &str = "llm_layers.rate_limit.tokens";
/// Requests holding a rate-limit concurrency slot (gauge).
pub const RATE_LIMIT_IN_FLIGHT: &str = "llm_layers.rate_limit.in_flight";
/// Upstream failures the normalizer classified; labels `code`, `provider` and (with a
/// [`Route`](crate::ext::Route)) `route`.
pub const NORMALIZE_CLASSIFICATIONS: &str = "llm_layers.normalize.classifications";
/// Tokens per answer, as its `usage` reports them (OpenTelemetry GenAI name, histogram); label
/// `gen_ai.token.type`.
pub const TOKEN_USAGE: &str = "gen_ai.client.token.usage";

/// Every instrument name, for dashboards and tests.
pub const ALL: &[&str] = &[
    REQUESTS,
    REJECTIONS,
    AUTH_OUTCOMES,
    RETRY_RETRIES,
    RETRY_ATTEMPTS,
    RETRY_BUDGET_EXHAUSTED,
    RETRY_STOPS,
    BREAKER_STATE,
    BREAKER_TRANSITIONS,
    BREAKER_REJECTIONS,
    BREAKER_FALLBACKS,
    BREAKER_PROBES,
    BREAKER_HEALTH_CHECKS,
    OPERATION_DURATION,
    RATE_LIMIT_ADMISSIONS,
    RATE_LIMIT_WAITS,
    RATE_LIMIT_WAIT,
    RATE_LIMIT_TOKENS,
    RATE_LIMIT_IN_FLIGHT,
    NORMALIZE_CLASSIFICATIONS,
    TOKEN_USAGE,
];

/// The label keys.
pub mod label {
    /// The layer: [`super::layer`].
    pub const LAYER: &str = "layer";
    /// An [`ErrorCode::as_str`](crate::ErrorCode::as_str).
    pub const CODE: &str = "code";
    /// A key id (bounded), `none` when no key was established.
    pub const KEY_ID: &str = "key_id";
    /// A route's template ([`Route`](crate::ext::Route), bounded); absent when the request
    /// carried none.
    pub const ROUTE: &str = "route";
    /// An authentication outcome.
    pub const OUTCOME: &str = "outcome";
    /// A retry stop reason, or a circuit transition's reason.
    pub const REASON: &str = "reason";
    /// A breaker's configured name.
    pub const NAME: &str = "name";
    /// A circuit's key (bounded).
    pub const CIRCUIT: &str = "circuit";
    /// A circuit state before a transition.
    pub const FROM: &str = "from";
    /// A circuit state after a transition.
    pub const TO: &str = "to";
    /// A fallback step's name.
    pub const FALLBACK: &str = "fallback";
    /// A probe round's result.
    pub const RESULT: &str = "result";
    /// `charged` or `refunded` tokens.
    pub const KIND: &str = "kind";
    /// The provider family a failure was classified from.
    pub const PROVIDER: &str = "provider";
    /// `input` or `output` (OpenTelemetry GenAI).
    pub const TOKEN_TYPE: &str = "gen_ai.token.type";
    /// `chat`, `text_completion`, `embeddings` or `other` (OpenTelemetry GenAI).
    pub const OPERATION_NAME: &str = "gen_ai.operation.name";
    /// The code of a failed operation (OpenTelemetry's `error.type`).
    pub const ERROR_TYPE: &str = "error.type";
}

/// Times one call to the upstream for [`OPERATION_DURATION`]: started when the normalizer is
/// called, recorded when its answer's head is ready. Zero-sized, and nothing, without the
/// `metrics` feature.
#[derive(Debug, Clone)]
pub(crate) struct OperationTimer {
    #[cfg(feature = "metrics")]
    start: tokio::time::Instant,
    #[cfg(feature = "metrics")]
    operation: &'static str,
    // The request's route and key (for the classifications counted at the head).
    labels: RequestLabels,
}

impl OperationTimer {
    /// Starts timing a call to `path`, with the route its extensions name.
    #[inline]
    pub(crate) fn start(path: &str, ext: &http::Extensions) -> OperationTimer {
        #[cfg(feature = "metrics")]
        {
            use crate::request::Endpoint;
            let operation = match Endpoint::from_path(path) {
                Endpoint::ChatCompletions | Endpoint::Responses => "chat",
                Endpoint::Completions => "text_completion",
                Endpoint::Embeddings => "embeddings",
                _ => OTHER,
            };
            OperationTimer {
                start: tokio::time::Instant::now(),
                operation,
                labels: RequestLabels::capture(ext),
            }
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = path;
            OperationTimer {
                labels: RequestLabels::capture(ext),
            }
        }
    }

    /// The labels of the request timed: its route and key.
    #[inline]
    pub(crate) fn labels(&self) -> &RequestLabels {
        &self.labels
    }

    /// Records the call's time; `error` is the code of a failed answer.
    #[inline]
    pub(crate) fn finish(&self, error: Option<ErrorCode>) {
        #[cfg(feature = "metrics")]
        {
            let seconds = self.start.elapsed().as_secs_f64();
            if let Some(route) = self.labels.route.as_deref() {
                imp::route_duration(route, self.operation, error, seconds);
                return;
            }
            match (error, self.operation) {
                (None, "chat") => imp::histogram(
                    imp::static_key!(OPERATION_DURATION, label::OPERATION_NAME => "chat"),
                    seconds,
                ),
                (None, "text_completion") => imp::histogram(
                    imp::static_key!(OPERATION_DURATION, label::OPERATION_NAME => "text_completion"),
                    seconds,
                ),
                (None, "embeddings") => imp::histogram(
                    imp::static_key!(OPERATION_DURATION, label::OPERATION_NAME => "embeddings"),
                    seconds,
                ),
                (None, _) => imp::histogram(
                    imp::static_key!(OPERATION_DURATION, label::OPERATION_NAME => OTHER),
                    seconds,
                ),
                (Some(code), operation) => imp::histogram(
                    &::metrics::Key::from_parts(
                        OPERATION_DURATION,
                        vec![
                            ::metrics::Label::from_static_parts(label::OPERATION_NAME, operation),
                            ::metrics::Label::from_static_parts(label::ERROR_TYPE, code.as_str()),
                        ],
                    ),
                    seconds,
                ),
            }
        }
        #[cfg(not(feature = "metrics"))]
        let _ = error;
    }
}

/// What a layer's rejection and classification counts say about the request: the key id the
/// auth layer established and the [`Route`](crate::ext::Route), taken from the request's
/// extensions when the layer is called (a layer that answers later no longer holds them).
/// With the `metrics` feature two `Arc<str>` clones (no allocation); without it zero-sized,
/// and nothing.
#[derive(Debug, Clone, Default)]
pub(crate) struct RequestLabels {
    #[cfg(feature = "metrics")]
    key_id: Option<std::sync::Arc<str>>,
    #[cfg(feature = "metrics")]
    route: Option<std::sync::Arc<str>>,
}

impl RequestLabels {
    /// No key and no route (`key_id="none"`, no `route` label).
    #[allow(dead_code)] // not every layer set needs it
    pub(crate) const NONE: RequestLabels = RequestLabels {
        #[cfg(feature = "metrics")]
        key_id: None,
        #[cfg(feature = "metrics")]
        route: None,
    };

    /// The key id and the route the extensions hold.
    #[inline]
    pub(crate) fn capture(ext: &http::Extensions) -> RequestLabels {
        #[cfg(feature = "metrics")]
        {
            RequestLabels {
                key_id: ext
                    .get::<crate::ext::KeyIdentity>()
                    .map(|k| k.id_arc().clone()),
                route: ext.get::<crate::ext::Route>().map(|r| r.as_arc().clone()),
            }
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = ext;
            RequestLabels {}
        }
    }

    /// The route the extensions hold, and no key (`key_id="none"`): the auth layer's, which
    /// refuses the key it was given.
    #[inline]
    pub(crate) fn route_only(ext: &http::Extensions) -> RequestLabels {
        #[cfg(feature = "metrics")]
        {
            RequestLabels {
                key_id: None,
                route: ext.get::<crate::ext::Route>().map(|r| r.as_arc().clone()),
            }
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = ext;
            RequestLabels {}
        }
    }

    /// Counts one rejection by `layer` with `code`, with this key id and route.
    #[inline]
    pub(crate) fn rejected(&self, layer: &'static str, code: ErrorCode) {
        #[cfg(feature = "metrics")]
        imp::rejected(
            layer,
            code,
            match self.key_id.as_deref() {
                Some(id) => imp::KEY_IDS.label(id),
                None => ::metrics::SharedString::const_str(NO_KEY),
            },
            self.route.as_deref(),
        );
        #[cfg(not(feature = "metrics"))]
        let _ = (layer, code);
    }

    /// Counts one upstream failure the normalizer classified, with this route.
    #[inline]
    pub(crate) fn classified(&self, err: &crate::ApiError) {
        #[cfg(feature = "metrics")]
        imp::classified(err, self.route.as_deref());
        #[cfg(not(feature = "metrics"))]
        let _ = err;
    }
}

/// The values of the `layer` label (and of the `layer` tracing field for layers with no
/// configured name).
pub mod layer {
    /// The auth layer.
    pub const AUTH: &str = "auth";
    /// The validation layer.
    pub const VALIDATE: &str = "validate";
    /// The rate-limit layer.
    pub const RATE_LIMIT: &str = "rate_limit";
    /// The retry layer.
    pub const RETRY: &str = "retry";
    /// The circuit breaker.
    pub const BREAKER: &str = "breaker";
    /// The error normalizer.
    pub const NORMALIZE: &str = "normalize";
}

/// The tracing field names every layer uses.
pub mod field {
    /// The request's id.
    pub const REQUEST_ID: &str = "request_id";
    /// The route's path.
    pub const ROUTE: &str = "route";
    /// A model name (Debug-escaped).
    pub const MODEL: &str = "model";
    /// A key's id (Debug-escaped).
    pub const KEY_ID: &str = "key_id";
    /// An error code.
    pub const CODE: &str = "code";
    /// An attempt number.
    pub const ATTEMPT: &str = "attempt";
    /// The layer's kind ([`super::layer`]).
    pub const LAYER: &str = "layer";
    /// A breaker's configured name.
    pub const NAME: &str = "name";
    /// A circuit's key (Debug-escaped).
    pub const CIRCUIT: &str = "circuit";
}

/// The label value for a key id, route or circuit past the bounded set.
pub const OTHER: &str = "other";
/// The `key_id` label value when no key was established.
pub const NO_KEY: &str = "none";

static MAX_LABEL_VALUES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(32);

/// Sets how many distinct values each bounded label (`key_id`, `route`, `circuit`) keeps before it
/// counts further ones as `other`. Values already kept stay kept. The default is 32.
pub fn set_max_label_values(n: usize) {
    MAX_LABEL_VALUES.store(n, std::sync::atomic::Ordering::Relaxed);
}

/// How many distinct values each bounded label keeps ([`set_max_label_values`]).
pub fn max_label_values() -> usize {
    MAX_LABEL_VALUES.load(std::sync::atomic::Ordering::Relaxed)
}

use crate::ErrorCode;

#[cfg(feature = "metrics")]
mod imp {
    use std::collections::{HashMap, HashSet};
    use std::sync::{Arc, Mutex, OnceLock, RwLock};

    use ::metrics::{Key, Label, Level, Metadata, SharedString};

    use super::{label, layer, OTHER};
    use crate::ErrorCode;

    pub(super) static META: Metadata<'static> =
        Metadata::new("llm_layers", Level::INFO, Some("llm_layers::metrics"));

    /// A key with static labels, built at compile time.
    macro_rules! static_key {
        ($name:expr $(, $k:expr => $v:expr)*) => {{
            static LABELS: &[::metrics::Label] = &[$(::metrics::Label::from_static_parts($k, $v)),*];
            static KEY: ::metrics::Key = ::metrics::Key::from_static_parts($name, LABELS);
            &KEY
        }};
    }
    pub(super) use static_key;

    /// The static key of `$name` with `$label` = the code's string: one per code, built at
    /// compile time, so a fixed label set costs no allocation.
    macro_rules! code_key {
        ($name:expr, $label:expr, $code:expr) => {
            match $code {
            crate::ErrorCode::InvalidApiKey => imp::static_key!($name, $label => crate::ErrorCode::InvalidApiKey.as_str()),
            crate::ErrorCode::ExpiredApiKey => imp::static_key!($name, $label => crate::ErrorCode::ExpiredApiKey.as_str()),
            crate::ErrorCode::RevokedApiKey => imp::static_key!($name, $label => crate::ErrorCode::RevokedApiKey.as_str()),
            crate::ErrorCode::MissingRequiredField => imp::static_key!($name, $label => crate::ErrorCode::MissingRequiredField.as_str()),
            crate::ErrorCode::InvalidValue => imp::static_key!($name, $label => crate::ErrorCode::InvalidValue.as_str()),
            crate::ErrorCode::ModelNotSupported => imp::static_key!($name, $label => crate::ErrorCode::ModelNotSupported.as_str()),
            crate::ErrorCode::ContextLengthExceeded => imp::static_key!($name, $label => crate::ErrorCode::ContextLengthExceeded.as_str()),
            crate::ErrorCode::RateLimitExceeded => imp::static_key!($name, $label => crate::ErrorCode::RateLimitExceeded.as_str()),
            crate::ErrorCode::InsufficientQuota => imp::static_key!($name, $label => crate::ErrorCode::InsufficientQuota.as_str()),
            crate::ErrorCode::ConcurrentLimitExceeded => imp::static_key!($name, $label => crate::ErrorCode::ConcurrentLimitExceeded.as_str()),
            crate::ErrorCode::InternalError => imp::static_key!($name, $label => crate::ErrorCode::InternalError.as_str()),
            crate::ErrorCode::ServiceUnavailable => imp::static_key!($name, $label => crate::ErrorCode::ServiceUnavailable.as_str()),
            crate::ErrorCode::ContentPolicyViolation => imp::static_key!($name, $label => crate::ErrorCode::ContentPolicyViolation.as_str()),
            crate::ErrorCode::PermissionDenied => imp::static_key!($name, $label => crate::ErrorCode::PermissionDenied.as_str()),
            crate::ErrorCode::Timeout => imp::static_key!($name, $label => crate::ErrorCode::Timeout.as_str()),
            crate::ErrorCode::RequestTooLarge => imp::static_key!($name, $label => crate::ErrorCode::RequestTooLarge.as_str()),
            crate::ErrorCode::UpstreamBlocked => imp::static_key!($name, $label => crate::ErrorCode::UpstreamBlocked.as_str()),
            crate::ErrorCode::NotFound => imp::static_key!($name, $label => crate::ErrorCode::NotFound.as_str()),
            }
        };
    }
    pub(super) use code_key;

    /// The static key of `$name` with `$label` = the stop reason's string.
    macro_rules! stop_key {
        ($name:expr, $label:expr, $stop:expr) => {
            #[allow(unreachable_patterns)]
            match $stop {
            crate::retry::RetryStop::BodyTooLarge => imp::static_key!($name, $label => crate::retry::RetryStop::BodyTooLarge.as_str()),
            crate::retry::RetryStop::NotIdempotent => imp::static_key!($name, $label => crate::retry::RetryStop::NotIdempotent.as_str()),
            crate::retry::RetryStop::NotRetryable => imp::static_key!($name, $label => crate::retry::RetryStop::NotRetryable.as_str()),
            crate::retry::RetryStop::RefusedLocally => imp::static_key!($name, $label => crate::retry::RetryStop::RefusedLocally.as_str()),
            crate::retry::RetryStop::AttemptsExhausted => imp::static_key!($name, $label => crate::retry::RetryStop::AttemptsExhausted.as_str()),
            crate::retry::RetryStop::BudgetExhausted => imp::static_key!($name, $label => crate::retry::RetryStop::BudgetExhausted.as_str()),
            crate::retry::RetryStop::HintTooLong => imp::static_key!($name, $label => crate::retry::RetryStop::HintTooLong.as_str()),
            crate::retry::RetryStop::HintPastDeadline => imp::static_key!($name, $label => crate::retry::RetryStop::HintPastDeadline.as_str()),
            crate::retry::RetryStop::Deadline => imp::static_key!($name, $label => crate::retry::RetryStop::Deadline.as_str()),
                _ => imp::static_key!($name, $label => crate::metrics::OTHER),
            }
        };
    }
    pub(super) use stop_key;

    pub(super) fn counter(key: &Key, n: u64) {
        ::metrics::with_recorder(|r| r.register_counter(key, &META)).increment(n);
    }

    pub(super) fn histogram(key: &Key, v: f64) {
        ::metrics::with_recorder(|r| r.register_histogram(key, &META)).record(v);
    }

    pub(super) fn gauge_set(key: &Key, v: f64) {
        ::metrics::with_recorder(|r| r.register_gauge(key, &META)).set(v);
    }

    pub(super) fn gauge_add(key: &Key, v: f64) {
        ::metrics::with_recorder(|r| r.register_gauge(key, &META)).increment(v);
    }

    /// The first [`max_label_values`](super::max_label_values) distinct values of one label.
    pub(super) struct Bounded(OnceLock<Mutex<HashSet<Arc<str>>>>);

    impl Bounded {
        pub(super) const fn new() -> Self {
            Bounded(OnceLock::new())
        }

        pub(super) fn label(&self, value: &str) -> SharedString {
            let set = self.0.get_or_init(Default::default);
            let mut set = set.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(kept) = set.get(value) {
                return SharedString::from(kept.clone());
            }
            if set.len() >= super::max_label_values() {
                return SharedString::const_str(OTHER);
            }
            let kept: Arc<str> = Arc::from(value);
            set.insert(kept.clone());
            SharedString::from(kept)
        }
    }

    #[cfg_attr(not(feature = "rate-limit"), allow(dead_code))] // the rate-limit layer's
    pub(super) static KEY_IDS: Bounded = Bounded::new();
    pub(super) static CIRCUITS: Bounded = Bounded::new();

    #[cfg_attr(not(feature = "rate-limit"), allow(dead_code))] // the rate-limit layer's
    pub(super) fn key_id(ext: &http::Extensions) -> SharedString {
        match ext.get::<crate::ext::KeyIdentity>() {
            Some(k) => KEY_IDS.label(k.id()),
            None => SharedString::const_str(super::NO_KEY),
        }
    }

    pub(super) fn rejected(
        layer: &'static str,
        code: ErrorCode,
        key_id: SharedString,
        route: Option<&str>,
    ) {
        let mut labels = Vec::with_capacity(4);
        labels.push(Label::from_static_parts(label::LAYER, layer));
        labels.push(Label::from_static_parts(label::CODE, code.as_str()));
        labels.push(Label::new(label::KEY_ID, key_id));
        if let Some(route) = route {
            labels.push(Label::new(label::ROUTE, ROUTES.get(route).label.clone()));
        }
        counter(&Key::from_parts(super::REJECTIONS, labels), 1);
    }

    pub(super) fn classified(err: &crate::ApiError, route: Option<&str>) {
        let mut labels = Vec::with_capacity(3);
        labels.push(Label::from_static_parts(label::CODE, err.code().as_str()));
        labels.push(Label::from_static_parts(
            label::PROVIDER,
            provider(err.provider()),
        ));
        if let Some(route) = route {
            labels.push(Label::new(label::ROUTE, ROUTES.get(route).label.clone()));
        }
        counter(
            &Key::from_parts(super::NORMALIZE_CLASSIFICATIONS, labels),
            1,
        );
    }

    /// The operations of `gen_ai.operation.name`, in the order of [`RouteKeys::durations`].
    const OPERATIONS: [&str; 4] = ["chat", "text_completion", "embeddings", OTHER];

    /// One route's label value, and its keys of the success path built once: a success costs
    /// a lookup in [`ROUTES`] and no allocation.
    pub(super) struct RouteKeys {
        pub(super) label: SharedString,
        durations: [Key; 4],
    }

    impl RouteKeys {
        fn new(label: SharedString) -> RouteKeys {
            let durations = OPERATIONS.map(|op| {
                Key::from_parts(
                    super::OPERATION_DURATION,
                    vec![
                        Label::from_static_parts(label::OPERATION_NAME, op),
                        Label::new(label::ROUTE, label.clone()),
                    ],
                )
            });
            RouteKeys { label, durations }
        }
    }

    /// The first [`max_label_values`](super::max_label_values) distinct routes, each with its
    /// keys; every later one is `other`.
    pub(super) struct Routes {
        // Read-locked on each call (a route seen before), write-locked to keep a new one.
        kept: OnceLock<RwLock<HashMap<Arc<str>, Arc<RouteKeys>>>>,
        other: OnceLock<Arc<RouteKeys>>,
    }

    impl Routes {
        pub(super) const fn new() -> Self {
            Routes {
                kept: OnceLock::new(),
                other: OnceLock::new(),
            }
        }

        pub(super) fn get(&self, route: &str) -> Arc<RouteKeys> {
            let kept = self.kept.get_or_init(Default::default);
            if let Some(keys) = kept.read().unwrap_or_else(|e| e.into_inner()).get(route) {
                return Arc::clone(keys);
            }
            let mut kept = kept.write().unwrap_or_else(|e| e.into_inner());
            if let Some(keys) = kept.get(route) {
                return Arc::clone(keys);
            }
            if kept.len() >= super::max_label_values() {
                return Arc::clone(
                    self.other
                        .get_or_init(|| Arc::new(RouteKeys::new(SharedString::const_str(OTHER)))),
                );
            }
            let value: Arc<str> = Arc::from(route);
            let keys = Arc::new(RouteKeys::new(SharedString::from(value.clone())));
            kept.insert(value, Arc::clone(&keys));
            keys
        }
    }

    pub(super) static ROUTES: Routes = Routes::new();

    /// `gen_ai.client.operation.duration` of a call on `route`.
    pub(super) fn route_duration(
        route: &str,
        operation: &'static str,
        error: Option<ErrorCode>,
        seconds: f64,
    ) {
        let keys = ROUTES.get(route);
        match error {
            None => {
                let i = OPERATIONS
                    .iter()
                    .position(|op| *op == operation)
                    .unwrap_or(OPERATIONS.len() - 1);
                histogram(&keys.durations[i], seconds);
            }
            Some(code) => histogram(
                &Key::from_parts(
                    super::OPERATION_DURATION,
                    vec![
                        Label::from_static_parts(label::OPERATION_NAME, operation),
                        Label::from_static_parts(label::ERROR_TYPE, code.as_str()),
                        Label::new(label::ROUTE, keys.label.clone()),
                    ],
                ),
                seconds,
            ),
        }
    }

    pub(super) fn request(layer: &'static str) {
        let key = match layer {
            layer::AUTH => static_key!(super::REQUESTS, label::LAYER => layer::AUTH),
            layer::VALIDATE => static_key!(super::REQUESTS, label::LAYER => layer::VALIDATE),
            layer::RATE_LIMIT => static_key!(super::REQUESTS, label::LAYER => layer::RATE_LIMIT),
            layer::RETRY => static_key!(super::REQUESTS, label::LAYER => layer::RETRY),
            layer::BREAKER => static_key!(super::REQUESTS, label::LAYER => layer::BREAKER),
            _ => static_key!(super::REQUESTS, label::LAYER => layer::NORMALIZE),
        };
        counter(key, 1);
    }

    /// The provider families the classifier names, as static strings.
    pub(super) fn provider(p: Option<&str>) -> &'static str {
        const KNOWN: &[&str] = &[
            "openai",
            "anthropic",
            "google",
            "bedrock",
            "ollama",
            "openrouter",
            "gateway",
            "qianfan",
            "dashscope",
            "moonshot",
            "zhipu",
            "minimax",
            "generic",
            "html",
            "text",
            "status",
            "sse",
            "transport",
            "redirect",
        ];
        match p {
            None => "unknown",
            Some(p) => KNOWN.iter().find(|k| **k == p).copied().unwrap_or(OTHER),
        }
    }
}

/// Counts one request into a layer.
#[inline]
pub(crate) fn request(layer: &'static str) {
    #[cfg(feature = "metrics")]
    imp::request(layer);
    #[cfg(not(feature = "metrics"))]
    let _ = layer;
}

/// Counts one rejection by `layer` with `code`, with the key the extensions name.
#[cfg_attr(not(feature = "rate-limit"), allow(dead_code))] // the rate-limit layer's
#[inline]
pub(crate) fn rejected(layer: &'static str, code: ErrorCode, ext: &http::Extensions) {
    #[cfg(feature = "metrics")]
    imp::rejected(
        layer,
        code,
        imp::key_id(ext),
        ext.get::<crate::ext::Route>()
            .map(crate::ext::Route::as_str),
    );
    #[cfg(not(feature = "metrics"))]
    let _ = (layer, code, ext);
}

/// Counts one request the auth layer accepted.
#[inline]
pub(crate) fn auth_ok() {
    #[cfg(feature = "metrics")]
    imp::counter(imp::static_key!(AUTH_OUTCOMES, label::OUTCOME => "ok"), 1);
}

/// Counts one request the auth layer refused with `code` (`missing`: no key at all).
#[inline]
pub(crate) fn auth_rejected(code: ErrorCode, missing: bool) {
    #[cfg(feature = "metrics")]
    {
        let key = match code {
            ErrorCode::InvalidApiKey if missing => {
                imp::static_key!(AUTH_OUTCOMES, label::OUTCOME => "missing")
            }
            ErrorCode::InvalidApiKey => {
                imp::static_key!(AUTH_OUTCOMES, label::OUTCOME => "invalid")
            }
            ErrorCode::ExpiredApiKey => {
                imp::static_key!(AUTH_OUTCOMES, label::OUTCOME => "expired")
            }
            ErrorCode::RevokedApiKey => {
                imp::static_key!(AUTH_OUTCOMES, label::OUTCOME => "revoked")
            }
            ErrorCode::PermissionDenied => {
                imp::static_key!(AUTH_OUTCOMES, label::OUTCOME => "forbidden_model")
            }
            ErrorCode::ServiceUnavailable => {
                imp::static_key!(AUTH_OUTCOMES, label::OUTCOME => "unavailable")
            }
            _ => imp::static_key!(AUTH_OUTCOMES, label::OUTCOME => OTHER),
        };
        // The rejection itself (`layer="auth"`, with the route) is counted where the auth
        // layer's future answers with it.
        imp::counter(key, 1);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (code, missing);
}

/// Counts one retry scheduled after an answer with `code`.
#[inline]
pub(crate) fn retry_scheduled(code: ErrorCode) {
    #[cfg(feature = "metrics")]
    imp::counter(imp::code_key!(RETRY_RETRIES, label::CODE, code), 1);
    #[cfg(not(feature = "metrics"))]
    let _ = code;
}

/// Records how a request through the retry layer ended: its attempts (0 for the layer's own
/// refusal, not recorded) and why it was not retried (again), if it was not.
#[inline]
pub(crate) fn retry_finished(attempts: u32, stop: Option<crate::retry::RetryStop>) {
    #[cfg(feature = "metrics")]
    {
        if attempts > 0 {
            imp::histogram(imp::static_key!(RETRY_ATTEMPTS), f64::from(attempts));
        }
        if let Some(stop) = stop {
            if stop == crate::retry::RetryStop::BudgetExhausted {
                imp::counter(imp::static_key!(RETRY_BUDGET_EXHAUSTED), 1);
            }
            imp::counter(imp::stop_key!(RETRY_STOPS, label::REASON, stop), 1);
        }
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (attempts, stop);
}

/// Counts one request a rate-limit layer admitted, and the tokens charged for it.
#[cfg_attr(not(feature = "rate-limit"), allow(dead_code))] // the rate-limit layer's
#[inline]
pub(crate) fn rate_limit_admitted(tokens: Option<u64>) {
    #[cfg(feature = "metrics")]
    {
        imp::counter(imp::static_key!(RATE_LIMIT_ADMISSIONS), 1);
        if let Some(n) = tokens.filter(|n| *n > 0) {
            imp::counter(
                imp::static_key!(RATE_LIMIT_TOKENS, label::KIND => "charged"),
                n,
            );
        }
    }
    #[cfg(not(feature = "metrics"))]
    let _ = tokens;
}

/// Counts one rate-limit refusal turned into a wait of `wait`.
#[cfg_attr(not(feature = "rate-limit"), allow(dead_code))] // the rate-limit layer's
#[inline]
pub(crate) fn rate_limit_wait(wait: std::time::Duration) {
    #[cfg(feature = "metrics")]
    {
        imp::counter(imp::static_key!(RATE_LIMIT_WAITS), 1);
        imp::histogram(imp::static_key!(RATE_LIMIT_WAIT), wait.as_secs_f64());
    }
    #[cfg(not(feature = "metrics"))]
    let _ = wait;
}

/// Records the settlement of a token charge: `charged` at admission, `actual` reported.
#[cfg_attr(not(feature = "rate-limit"), allow(dead_code))] // the rate-limit layer's
#[inline]
pub(crate) fn rate_limit_settled(charged: u64, actual: u64) {
    #[cfg(feature = "metrics")]
    {
        if actual > charged {
            imp::counter(
                imp::static_key!(RATE_LIMIT_TOKENS, label::KIND => "charged"),
                actual - charged,
            );
        } else if actual < charged {
            imp::counter(
                imp::static_key!(RATE_LIMIT_TOKENS, label::KIND => "refunded"),
                charged - actual,
            );
        }
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (charged, actual);
}

/// A concurrency slot taken (`+1`) or given back (`-1`).
#[cfg_attr(not(feature = "rate-limit"), allow(dead_code))] // the rate-limit layer's
#[inline]
pub(crate) fn rate_limit_in_flight(delta: i8) {
    #[cfg(feature = "metrics")]
    imp::gauge_add(imp::static_key!(RATE_LIMIT_IN_FLIGHT), f64::from(delta));
    #[cfg(not(feature = "metrics"))]
    let _ = delta;
}

/// Records the token usage one answer reported.
#[cfg_attr(not(feature = "rate-limit"), allow(dead_code))] // the rate-limit layer's
#[inline]
pub(crate) fn token_usage(input: Option<u64>, output: Option<u64>) {
    #[cfg(feature = "metrics")]
    {
        if let Some(n) = input {
            imp::histogram(
                imp::static_key!(TOKEN_USAGE, label::TOKEN_TYPE => "input"),
                n as f64,
            );
        }
        if let Some(n) = output {
            imp::histogram(
                imp::static_key!(TOKEN_USAGE, label::TOKEN_TYPE => "output"),
                n as f64,
            );
        }
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (input, output);
}

/// Counts one call a circuit refused.
#[inline]
pub(crate) fn breaker_refused(name: &std::sync::Arc<str>, circuit: &str) {
    #[cfg(feature = "metrics")]
    imp::counter(
        &::metrics::Key::from_parts(
            BREAKER_REJECTIONS,
            vec![
                ::metrics::Label::new(label::NAME, name.clone()),
                ::metrics::Label::new(label::CIRCUIT, imp::CIRCUITS.label(circuit)),
            ],
        ),
        1,
    );
    #[cfg(not(feature = "metrics"))]
    let _ = (name, circuit);
}

/// Records one breaker event: transitions, the state gauge, probe rounds, fallbacks.
#[inline]
pub(crate) fn breaker_event(ev: &crate::breaker::BreakerEvent) {
    #[cfg(feature = "metrics")]
    {
        use crate::breaker::{BreakerEvent, CircuitState, TransitionReason};
        use ::metrics::{Key, Label};
        match ev {
            BreakerEvent::StateChanged {
                name,
                key,
                from,
                to,
                reason,
                ..
            } => {
                let reason_str = match reason {
                    TransitionReason::FailureRate => "failure_rate",
                    TransitionReason::SlowCallRate => "slow_call_rate",
                    TransitionReason::OpenElapsed => "open_elapsed",
                    TransitionReason::ProbeFailed => "probe_failed",
                    TransitionReason::ProbeTimedOut => "probe_timed_out",
                    TransitionReason::ProbeDropped => "probe_dropped",
                    TransitionReason::ProbesSucceeded => "probes_succeeded",
                    TransitionReason::Reset => "reset",
                    TransitionReason::HealthCheckFailed => "health_check_failed",
                    TransitionReason::HealthCheckPassed => "health_check_passed",
                    #[allow(unreachable_patterns)]
                    _ => OTHER,
                };
                let circuit = imp::CIRCUITS.label(key);
                imp::counter(
                    &Key::from_parts(
                        BREAKER_TRANSITIONS,
                        vec![
                            Label::new(label::NAME, name.clone()),
                            Label::from_static_parts(label::FROM, from.as_str()),
                            Label::from_static_parts(label::TO, to.as_str()),
                            Label::from_static_parts(label::REASON, reason_str),
                        ],
                    ),
                    1,
                );
                let state = match to {
                    CircuitState::Closed => 0.0,
                    CircuitState::Open => 1.0,
                    CircuitState::HalfOpen => 2.0,
                };
                imp::gauge_set(
                    &Key::from_parts(
                        BREAKER_STATE,
                        vec![
                            Label::new(label::NAME, name.clone()),
                            Label::new(label::CIRCUIT, circuit),
                        ],
                    ),
                    state,
                );
                let probe = match reason {
                    TransitionReason::ProbesSucceeded => Some("ok"),
                    TransitionReason::ProbeFailed => Some("failed"),
                    TransitionReason::ProbeTimedOut => Some("timed_out"),
                    TransitionReason::ProbeDropped => Some("dropped"),
                    _ => None,
                };
                if let Some(result) = probe {
                    imp::counter(
                        &Key::from_parts(
                            BREAKER_PROBES,
                            vec![
                                Label::new(label::NAME, name.clone()),
                                Label::from_static_parts(label::RESULT, result),
                            ],
                        ),
                        1,
                    );
                }
            }
            BreakerEvent::Fallback {
                name, fallback, ok, ..
            } => imp::counter(
                &Key::from_parts(
                    BREAKER_FALLBACKS,
                    vec![
                        Label::new(label::NAME, name.clone()),
                        Label::new(label::FALLBACK, fallback.clone()),
                        Label::from_static_parts(label::OUTCOME, if *ok { "ok" } else { "failed" }),
                    ],
                ),
                1,
            ),
            BreakerEvent::HealthCheck { name, result, .. } => imp::counter(
                &Key::from_parts(
                    BREAKER_HEALTH_CHECKS,
                    vec![
                        Label::new(label::NAME, name.clone()),
                        Label::from_static_parts(label::RESULT, result.as_str()),
                    ],
                ),
                1,
            ),
            // Counted where the refusal is noted, whether or not a hook is set.
            BreakerEvent::Rejected { .. } => {}
            #[allow(unreachable_patterns)]
            _ => {}
        }
    }
    #[cfg(not(feature = "metrics"))]
    let _ = ev;
}

#[cfg(all(test, feature = "metrics"))]
mod tests {
    use super::*;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    #[test]
    fn bounded_labels_keep_the_first_values_then_say_other() {
        let set = imp::Bounded::new();
        let max = max_label_values();
        for i in 0..max {
            assert_eq!(&*set.label(&format!("v{i}")), format!("v{i}"));
        }
        assert_eq!(&*set.label("v0"), "v0");
        assert_eq!(&*set.label("one-too-many"), OTHER);
    }

    #[test]
    fn routes_keep_the_first_values_then_say_other() {
        let routes = imp::Routes::new();
        let max = max_label_values();
        for i in 0..max {
            assert_eq!(&*routes.get(&format!("/v{i}")).label, format!("/v{i}"));
        }
        assert_eq!(&*routes.get("/v0").label, "/v0");
        let past = routes.get("/one-too-many");
        assert_eq!(&*past.label, OTHER);
        // The same keys for every route past the bound.
        assert!(std::sync::Arc::ptr_eq(&past, &routes.get("/and-another")));
    }

    #[test]
    fn success_path_counters_use_static_keys() {
        let recorder = DebuggingRecorder::new();
        let snap = recorder.snapshotter();
        ::metrics::with_local_recorder(&recorder, || {
            request(layer::AUTH);
            request(layer::AUTH);
            auth_ok();
            rate_limit_settled(100, 40);
            rate_limit_settled(10, 25);
        });
        let got: Vec<_> = snap
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(k, _, _, v)| {
                let labels: Vec<String> = k
                    .key()
                    .labels()
                    .map(|l| format!("{}={}", l.key(), l.value()))
                    .collect();
                (k.key().name().to_owned(), labels.join(","), v)
            })
            .collect();
        let find = |name: &str, labels: &str| {
            got.iter()
                .find(|(n, l, _)| n == name && l == labels)
                .and_then(|(_, _, v)| match v {
                    DebugValue::Counter(n) => Some(*n),
                    _ => None,
                })
        };
        assert_eq!(find(REQUESTS, "layer=auth"), Some(2));
        assert_eq!(find(AUTH_OUTCOMES, "outcome=ok"), Some(1));
        assert_eq!(find(RATE_LIMIT_TOKENS, "kind=refunded"), Some(60));
        assert_eq!(find(RATE_LIMIT_TOKENS, "kind=charged"), Some(15));
    }
}
