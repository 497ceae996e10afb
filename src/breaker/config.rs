//! Configuration: the builder, its validation, and the knobs' types.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};

use super::events::BreakerEvent;
use super::fallback::{AddTarget, NoFallback, ServiceFallback, Target};
use super::layer::CircuitBreakerLayer;
use super::registry::Shared;
use crate::policy::{Classify, SharedPolicy};
use crate::request::{CharEstimator, KeyFn, RequestHead, TokenEstimator};

pub use crate::config::ConfigError;

fn config_error(
    field: &'static str,
    message: impl Into<std::borrow::Cow<'static, str>>,
) -> ConfigError {
    ConfigError::new("circuit breaker", field, message)
}

/// `d` in nanoseconds, saturated at `u64::MAX` (about 584 years): every duration the breaker
/// computes with goes through this, so no configured value can overflow per request.
pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// `d` in milliseconds, saturated at `u64::MAX`, for log fields.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The most calls a count window holds.
pub(crate) const MAX_COUNT_WINDOW: usize = 1_000_000;
/// The most buckets a time window has.
pub(crate) const MAX_BUCKETS: usize = 10_000;

/// What the circuit remembers to decide when to open.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum WindowKind {
    Count(usize),
    Time(Duration, usize),
    Consecutive(u32),
}

pub(crate) type EventHook = Arc<dyn Fn(&BreakerEvent) + Send + Sync>;

/// How requests are mapped to circuits.
#[derive(Clone, Default)]
pub enum CircuitKey {
    /// One circuit for everything that passes through the layer (the usual choice when the
    /// layer wraps one upstream client).
    #[default]
    Single,
    /// One circuit per upstream: the name given to [`CircuitBreakerLayerBuilder::upstream`] (set it on a
    /// server), else the request URI's authority (`api.openai.com`, what a client sends to),
    /// else `"<unknown>"`. The client's `Host` header is never read.
    Upstream,
    /// One circuit per model, read from the [`RequestView`](crate::request::RequestView) in
    /// the extensions or, when no earlier layer stored one, by buffering and parsing the body
    /// once through [`EnsureView`](crate::request::EnsureView) (bounded by
    /// [`CircuitBreakerLayerBuilder::body_limit`]; a body that is not JSON is answered `400
    /// invalid_value`). A request without a model goes through unguarded.
    Model,
    /// One circuit per upstream and model (`api.openai.com/gpt-4o`).
    UpstreamAndModel,
    /// A key of your own ([`crate::request::KeyFn`], shared with the rate limiter). Returning
    /// `None` sends the request through unguarded.
    Custom(KeyFn),
}

impl CircuitKey {
    /// A key of your own, computed from the request head ([`RequestHead`]: method, URI,
    /// headers, extensions and the [`RequestView`](crate::request::RequestView) an earlier
    /// layer stored). It never reads the body.
    pub fn custom<F>(f: F) -> Self
    where
        F: Fn(&RequestHead<'_>) -> Option<Arc<str>> + Send + Sync + 'static,
    {
        CircuitKey::Custom(Arc::new(f))
    }
}

impl fmt::Debug for CircuitKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CircuitKey::Single => "Single",
            CircuitKey::Upstream => "Upstream",
            CircuitKey::Model => "Model",
            CircuitKey::UpstreamAndModel => "UpstreamAndModel",
            CircuitKey::Custom(_) => "Custom",
        })
    }
}

/// One step of the fallback chain.
#[derive(Clone)]
pub(crate) enum FallbackStep {
    /// The layer's fallback service (typed on the layer, see
    /// [`CircuitBreakerLayerBuilder::fallback_service`]), at `index` of its services.
    Service { name: Arc<str>, index: usize },
    /// The same upstream with the body's `model` rewritten.
    Model { model: Arc<str> },
    /// A fixed response.
    Static {
        name: Arc<str>,
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    },
    /// A target of the chain ([`CircuitBreakerLayerBuilder::fallback_target`]).
    Target(TargetStep),
}

/// A target of the fallback chain, as the walk sees it.
#[derive(Debug, Clone)]
pub(crate) struct TargetStep {
    /// The header value, and the key of its circuit (but see [`TargetStep::key`]).
    pub(crate) name: Arc<str>,
    /// Whether [`Target::name`](super::Target::name) set the name.
    pub(crate) named: bool,
    /// The model the body is rewritten to.
    pub(crate) model: Option<Arc<str>>,
    /// The other upstream's name; `None` for the guarded upstream.
    pub(crate) upstream: Option<Arc<str>>,
    /// The index of its service among the layer's fallback services (unbound upstreams are
    /// numbered in their own order, see [`super::CircuitBreakerLayer::bind_upstreams`]).
    pub(crate) service: Option<usize>,
    /// An upstream named only, bound later by
    /// [`CircuitBreakerLayer::bind_upstreams`](super::CircuitBreakerLayer::bind_upstreams).
    pub(crate) by_name: bool,
    pub(crate) larger_context: bool,
    pub(crate) on_content_policy: bool,
}

impl FallbackStep {
    pub(crate) fn name(&self) -> &str {
        match self {
            FallbackStep::Service { name, .. } | FallbackStep::Static { name, .. } => name,
            FallbackStep::Model { model } => model,
            FallbackStep::Target(t) => &t.name,
        }
    }

    /// The step as a target: every step but a fixed response (the legacy steps are targets
    /// without marks).
    pub(crate) fn target(&self) -> Option<TargetStep> {
        match self {
            FallbackStep::Static { .. } => None,
            FallbackStep::Target(t) => Some(t.clone()),
            FallbackStep::Model { model } => Some(TargetStep {
                name: model.clone(),
                named: false,
                model: Some(model.clone()),
                upstream: None,
                service: None,
                by_name: false,
                larger_context: false,
                on_content_policy: false,
            }),
            FallbackStep::Service { name, index } => Some(TargetStep {
                name: name.clone(),
                named: true,
                model: None,
                upstream: Some(name.clone()),
                service: Some(*index),
                by_name: false,
                larger_context: false,
                on_content_policy: false,
            }),
        }
    }
}

impl fmt::Debug for FallbackStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FallbackStep::Service { name, .. } => write!(f, "Service({name:?})"),
            FallbackStep::Model { model } => write!(f, "Model({model:?})"),
            FallbackStep::Static { name, status, .. } => write!(f, "Static({name:?}, {status})"),
            FallbackStep::Target(t) => write!(f, "Target({:?})", t.name),
        }
    }
}

/// A manual override of the automatic state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CircuitMode {
    /// The circuit opens, probes and closes on its own (the default).
    Auto,
    /// Every call passes; nothing is recorded.
    Disabled,
    /// Every call is rejected (or degraded through the fallback chain).
    ForcedOpen,
    /// Every call passes; calls, failures and slow calls are counted and the window is kept,
    /// but the circuit never changes state. Useful to observe thresholds before enforcing them.
    MetricsOnly,
}

impl CircuitMode {
    pub(crate) fn to_u8(self) -> u8 {
        match self {
            CircuitMode::Auto => 0,
            CircuitMode::Disabled => 1,
            CircuitMode::ForcedOpen => 2,
            CircuitMode::MetricsOnly => 3,
        }
    }
    pub(crate) fn from_u8(v: u8) -> CircuitMode {
        match v {
            1 => CircuitMode::Disabled,
            2 => CircuitMode::ForcedOpen,
            3 => CircuitMode::MetricsOnly,
            _ => CircuitMode::Auto,
        }
    }
}

/// The validated configuration, shared by every circuit of a layer.
pub(crate) struct Config {
    pub(crate) name: Arc<str>,
    pub(crate) window: WindowKind,
    pub(crate) failure_rate: f64,
    pub(crate) slow_call: Option<(Duration, f64)>,
    pub(crate) minimum_calls: u64,
    pub(crate) probes: u16,
    pub(crate) probe_timeout: Duration,
    pub(crate) call_timeout: Option<Duration>,
    pub(crate) open_duration: Duration,
    pub(crate) backoff_multiplier: f64,
    pub(crate) max_open_duration: Duration,
    pub(crate) jitter: f64,
    pub(crate) seed: u64,
    pub(crate) policy: SharedPolicy,
    pub(crate) trip_on_rate_limit: bool,
    pub(crate) estimator: Arc<dyn TokenEstimator>,
    pub(crate) key_by: CircuitKey,
    pub(crate) upstream: Option<Arc<str>>,
    pub(crate) max_keys: usize,
    pub(crate) max_key_len: usize,
    pub(crate) body_limit: usize,
    pub(crate) fallbacks: Vec<FallbackStep>,
    /// Whether the chain holds [`CircuitBreakerLayerBuilder::fallback_target`] entries: then
    /// every step has its own circuit and the chain is also walked past fallback-worthy
    /// answers, not only past an open primary.
    pub(crate) walk_on_answer: bool,
    /// How many targets name an upstream no service is bound to yet.
    pub(crate) unbound: usize,
    pub(crate) on_event: Option<EventHook>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("name", &self.name)
            .field("window", &self.window)
            .field("failure_rate", &self.failure_rate)
            .field("slow_call", &self.slow_call)
            .field("minimum_calls", &self.minimum_calls)
            .field("probes", &self.probes)
            .field("probe_timeout", &self.probe_timeout)
            .field("call_timeout", &self.call_timeout)
            .field("open_duration", &self.open_duration)
            .field("backoff_multiplier", &self.backoff_multiplier)
            .field("max_open_duration", &self.max_open_duration)
            .field("jitter", &self.jitter)
            .field("trip_on_rate_limit", &self.trip_on_rate_limit)
            .field("key_by", &self.key_by)
            .field("upstream", &self.upstream)
            .field("max_keys", &self.max_keys)
            .field("max_key_len", &self.max_key_len)
            .field("fallbacks", &self.fallbacks)
            .finish_non_exhaustive()
    }
}

/// Builds a [`CircuitBreakerLayer`]; [`CircuitBreakerLayerBuilder::build`] validates every value.
///
/// Defaults: a count window of the last 100 calls, 50 % failure rate, at least 10 calls before
/// any decision, no slow-call rule, 3 half-open probes with a 30 s probe timeout, 30 s open
/// growing ×2 per re-opening up to 5 min with ±10 % jitter, 429s not counted, one circuit
/// ([`CircuitKey::Single`]), at most 1,024 keys, no fallback, the crate's
/// [`DefaultPolicy`](crate::policy::DefaultPolicy).
///
/// `F` is the type of the fallback service, [`NoFallback`] until
/// [`fallback_service`](CircuitBreakerLayerBuilder::fallback_service) sets one.
///
/// Extremes: a value that can never work is refused by [`CircuitBreakerLayerBuilder::build`] with a
/// [`ConfigError`] naming the method (`open_duration`, `count_window`, ...). Durations are
/// saturated instead: anything longer than `u64::MAX` nanoseconds (about 584 years, so
/// `Duration::MAX` too) is taken as that, and a wait that far ahead is simply never reached;
/// an open duration grown past the maximum by the multiplier is capped. No accepted value
/// panics or wraps while serving requests.
#[must_use]
pub struct CircuitBreakerLayerBuilder<F = NoFallback> {
    name: Arc<str>,
    window: WindowKind,
    failure_rate: f64,
    slow_call: Option<(Duration, f64)>,
    minimum_calls: u64,
    probes: u32,
    probe_timeout: Duration,
    call_timeout: Option<Duration>,
    open_duration: Duration,
    backoff_multiplier: f64,
    max_open_duration: Duration,
    jitter: f64,
    seed: Option<u64>,
    policy: SharedPolicy,
    trip_on_rate_limit: bool,
    key_by: CircuitKey,
    upstream: Option<Arc<str>>,
    max_keys: usize,
    max_key_len: usize,
    body_limit: usize,
    fallbacks: Vec<FallbackStep>,
    unbound: usize,
    fallback: F,
    on_event: Option<EventHook>,
}

impl<F> fmt::Debug for CircuitBreakerLayerBuilder<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerLayerBuilder")
            .field("name", &self.name)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl Default for CircuitBreakerLayerBuilder {
    fn default() -> Self {
        CircuitBreakerLayerBuilder {
            name: Arc::from("upstream"),
            window: WindowKind::Count(100),
            failure_rate: 50.0,
            slow_call: None,
            minimum_calls: 10,
            probes: 3,
            probe_timeout: Duration::from_secs(30),
            call_timeout: None,
            open_duration: Duration::from_secs(30),
            backoff_multiplier: 2.0,
            max_open_duration: Duration::from_secs(300),
            jitter: 0.1,
            seed: None,
            policy: SharedPolicy::default(),
            trip_on_rate_limit: false,
            key_by: CircuitKey::Single,
            upstream: None,
            max_keys: 1024,
            max_key_len: 256,
            body_limit: crate::body::DEFAULT_BODY_LIMIT,
            fallbacks: Vec::new(),
            unbound: 0,
            fallback: NoFallback,
            on_event: None,
        }
    }
}

impl<F> CircuitBreakerLayerBuilder<F> {
    /// The breaker's name, used in rejection messages, events and the handle (`"openai"`).
    /// Never put a URL with credentials here; it is shown to callers.
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = name.into();
        self
    }

    /// Decide over the last `calls` recorded calls.
    pub fn count_window(mut self, calls: usize) -> Self {
        self.window = WindowKind::Count(calls);
        self
    }

    /// Decide over the calls of the last `duration`, kept in `buckets` buckets (a bucket
    /// leaves the window whole).
    pub fn time_window(mut self, duration: Duration, buckets: usize) -> Self {
        self.window = WindowKind::Time(duration, buckets);
        self
    }

    /// Instead of a rate, open after `failures` failures in a row (a success resets the run;
    /// the minimum number of calls and the slow-call rule do not apply).
    pub fn consecutive_failures(mut self, failures: u32) -> Self {
        self.window = WindowKind::Consecutive(failures);
        self
    }

    /// Open when at least `percent` % of the window's calls failed (0 < percent ≤ 100).
    pub fn failure_rate(mut self, percent: f64) -> Self {
        self.failure_rate = percent;
        self
    }

    /// A call is slow when its response head takes longer than `duration` (for a stream: the
    /// time to first byte); open when at least `percent` % of the window's calls were slow.
    pub fn slow_calls(mut self, duration: Duration, percent: f64) -> Self {
        self.slow_call = Some((duration, percent));
        self
    }

    /// No decision before the window holds `calls` calls.
    pub fn minimum_calls(mut self, calls: u64) -> Self {
        self.minimum_calls = calls;
        self
    }

    /// How many probe calls half-open admits; all must succeed to close, one failure re-opens.
    pub fn half_open_probes(mut self, probes: u32) -> Self {
        self.probes = probes;
        self
    }

    /// A probe that has not answered after `timeout` counts as failed and opens the circuit
    /// again.
    ///
    /// A timer in the probe's response future enforces it: when it fires, the probe is
    /// failed at once (the call itself goes on, unless the [call
    /// timeout](CircuitBreakerLayerBuilder::call_timeout) ends it; its late answer is ignored). A call that
    /// finds every probe slot taken past the newest probe's timeout also counts them as failed
    /// (for futures nobody polls).
    ///
    /// The timer needs a tokio runtime with time enabled (as `#[tokio::main]` and every axum
    /// or hyper server have; a runtime built without `enable_time` panics on it, like
    /// `tokio::time::timeout`). Called outside any tokio runtime, no timer is set and only the
    /// next call finds an overdue probe.
    pub fn probe_timeout(mut self, timeout: Duration) -> Self {
        self.probe_timeout = timeout;
        self
    }

    /// The breaker's own timeout of each call it guards (off by default): an upstream that has
    /// not answered (the response head) after `timeout` is given up on, the caller is answered
    /// `504 timeout`, and the call counts as a failure. A timer in the response future
    /// enforces it, so it needs a tokio runtime with time enabled (without a runtime, no timer
    /// is set).
    ///
    /// It also lets the breaker learn from calls dropped by a timeout outside it: a call
    /// dropped after running at least `timeout` counts as a timed-out failure.
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = Some(timeout);
        self
    }

    /// How long the circuit stays open the first time.
    pub fn open_duration(mut self, duration: Duration) -> Self {
        self.open_duration = duration;
        self
    }

    /// Each re-opening without a close in between multiplies the open duration by
    /// `multiplier` (≥ 1), up to `max`.
    pub fn open_backoff(mut self, multiplier: f64, max: Duration) -> Self {
        self.backoff_multiplier = multiplier;
        self.max_open_duration = max;
        self
    }

    /// The longest the circuit stays open, however often it re-opens (default 5 min), keeping
    /// the multiplier of [`CircuitBreakerLayerBuilder::open_backoff`]. Must not be shorter than the open duration
    /// (refused as `open_backoff`).
    pub fn max_open_duration(mut self, max: Duration) -> Self {
        self.max_open_duration = max;
        self
    }

    /// Spread open durations by ± `fraction` (0 ≤ fraction ≤ 1) so circuits opened together
    /// do not probe together.
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.jitter = fraction;
        self
    }

    /// Seeds the jitter, for reproducible open durations.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Count 429 throttling (`rate_limit_exceeded`, `concurrent_limit_exceeded`) as failures.
    /// Off by default: throttling says the caller is too fast, not that the upstream is down.
    pub fn trip_on_rate_limit(mut self, trip: bool) -> Self {
        self.trip_on_rate_limit = trip;
        self
    }

    /// The failure policy ([`crate::policy`]) that classifies each answer: per response head
    /// and, for a successful head, at the end of its body. A failure counts against the
    /// circuit when its [`FailureKind`](crate::policy::FailureKind) says so
    /// ([`counts_against_circuit`](crate::policy::FailureKind::counts_against_circuit), with
    /// [`trip_on_rate_limit`](Self::trip_on_rate_limit)); a `Caller` or `Other` failure is
    /// ignored. Default: [`DefaultPolicy`](crate::policy::DefaultPolicy). A closure
    /// `Fn(StatusCode, &HeaderMap, Option<&ApiError>) -> Outcome` is a policy too.
    ///
    /// Transport errors (`Err` from the inner service) are not the policy's: they are
    /// classified by [`policy::classify_error_ref`](crate::policy::classify_error_ref)
    /// (`timeout` or `service_unavailable`) and always count as failures.
    ///
    /// ```
    /// use http::StatusCode;
    /// use llm_layers::breaker::CircuitBreakerLayer;
    /// use llm_layers::policy::{Classify, DefaultPolicy, FailureKind, Outcome};
    /// use llm_layers::ErrorCode;
    ///
    /// // This upstream answers 404 while a model is being deployed: count it.
    /// let layer = CircuitBreakerLayer::builder()
    ///     .policy(|status: StatusCode, headers: &http::HeaderMap, err: Option<&llm_layers::ApiError>| {
    ///         if status == StatusCode::NOT_FOUND {
    ///             return Outcome::failure(ErrorCode::NotFound, FailureKind::Transient);
    ///         }
    ///         DefaultPolicy.classify_response(status, headers, err)
    ///     })
    ///     .build()
    ///     .unwrap();
    /// # let _ = layer;
    /// ```
    pub fn policy(mut self, policy: impl Classify) -> Self {
        self.policy = SharedPolicy::new(policy);
        self
    }

    /// How requests map to circuits.
    pub fn key_by(mut self, key_by: CircuitKey) -> Self {
        self.key_by = key_by;
        self
    }

    /// The upstream this breaker guards (`"api.openai.com"`): with [`CircuitKey::Upstream`] and
    /// [`CircuitKey::UpstreamAndModel`], requests are keyed on this name, whatever they say.
    ///
    /// Set it on a server-side breaker (on an axum `Router`, a gateway): there the request's
    /// URI authority comes from the client (an absolute-form request line, HTTP/2
    /// `:authority`), and a client that could choose its key could step around an open
    /// circuit. Without it, the upstream is the request URI's authority (what a client-side
    /// breaker sees: the URL its application chose), else `"<unknown>"`; the `Host` header is
    /// never read.
    pub fn upstream(mut self, name: impl Into<Arc<str>>) -> Self {
        self.upstream = Some(name.into());
        self
    }

    /// At most `keys` circuits (default 1,024). When a new key arrives at the bound, a
    /// circuit is forgotten to make room: one that is closed, automatic, idle and without a
    /// failure in its window, not used since the registry last looked at it (a clock with a
    /// second chance, at most 16 circuits looked at per new key, so the cost does not grow
    /// with the number of keys). Open, half-open and failing circuits are kept, so churn of
    /// new keys cannot reset a circuit on its way to opening. When none of those looked at
    /// can go, the new key shares one overflow circuit (key `"<overflow>"`).
    pub fn max_keys(mut self, keys: usize) -> Self {
        self.max_keys = keys;
        self
    }

    /// The longest key stored, in bytes (default 256, at least 64). A longer key (a model
    /// name of 600 KB) is stored as its first bytes followed by `~sha256:` and 128 bits of its
    /// SHA-256 in hex, `bytes` long at most: distinct long keys keep distinct circuits, and
    /// the memory of keyed state stays bounded by `max_keys × max_key_len`. The request itself
    /// goes on unchanged (the upstream decides what the name is worth).
    /// [`BreakerHandle`](super::BreakerHandle) lookups map a long key the same way.
    pub fn max_key_len(mut self, bytes: usize) -> Self {
        self.max_key_len = bytes;
        self
    }

    /// The most bytes buffered to read the model (keyed by model) or rewrite it (model
    /// fallback). Longer bodies are answered with `413 request_too_large`.
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// Adds a fallback step: while the circuit is open, send the request to the same upstream
    /// with the JSON body's `model` set to `model`. The response carries
    /// `x-llm-layers-fallback: <model>`.
    ///
    /// The body is buffered (at most [`CircuitBreakerLayerBuilder::body_limit`] bytes) only on this degraded
    /// path, and not again when the breaker already read it for the model; with circuits per
    /// model, a backup model whose own circuit is open is skipped.
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use axum::body::Body;
    /// use http::{Request, Response};
    /// use http_body_util::BodyExt;
    /// use llm_layers::body::LayerBody;
    /// use llm_layers::breaker::{CircuitBreakerLayer, CircuitKey, CircuitMode};
    /// use tower::{Layer, ServiceExt};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let seen = Arc::new(Mutex::new(Vec::new()));
    /// let upstream = tower::service_fn({
    ///     let seen = seen.clone();
    ///     move |req: Request<LayerBody<Body>>| {
    ///         let seen = seen.clone();
    ///         async move {
    ///             let body = req.into_body().collect().await.unwrap().to_bytes();
    ///             seen.lock().unwrap().push(body);
    ///             Ok::<_, std::convert::Infallible>(Response::new(Body::from("{}")))
    ///         }
    ///     }
    /// });
    /// let layer = CircuitBreakerLayer::builder()
    ///     .key_by(CircuitKey::Model)
    ///     .fallback_model("gpt-4o-mini")
    ///     .build()
    ///     .unwrap();
    /// layer.handle().set_mode_for("gpt-4o", CircuitMode::ForcedOpen);
    ///
    /// let req = Request::post("/v1/chat/completions")
    ///     .body(Body::from(r#"{"model":"gpt-4o","messages":[]}"#))
    ///     .unwrap();
    /// let res = layer.layer(upstream).oneshot(req).await.unwrap();
    /// assert_eq!(res.headers()["x-llm-layers-fallback"], "gpt-4o-mini");
    /// assert_eq!(&seen.lock().unwrap()[0][..], br#"{"messages":[],"model":"gpt-4o-mini"}"#);
    /// # }
    /// ```
    pub fn fallback_model(mut self, model: impl Into<Arc<str>>) -> Self {
        self.fallbacks.push(FallbackStep::Model {
            model: model.into(),
        });
        self
    }

    /// Adds a fallback step: while the circuit is open, answer with this fixed response
    /// (`x-llm-layers-fallback: <name>` is added).
    pub fn fallback_response(
        mut self,
        name: impl Into<Arc<str>>,
        status: StatusCode,
        content_type: &'static str,
        body: impl Into<Bytes>,
    ) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static(content_type),
        );
        self.fallbacks.push(FallbackStep::Static {
            name: name.into(),
            status,
            headers,
            body: body.into(),
        });
        self
    }

    /// Adds a target to the fallback chain: a model on the guarded upstream
    /// ([`Target::model`]), another upstream's service ([`Target::upstream`], typed: every
    /// such service of a layer is one type `S`, and the layer becomes a
    /// `CircuitBreakerLayer<ServiceFallback<S>>`), or an upstream bound later by name
    /// ([`Target::named_upstream`], see [`CircuitBreakerLayer::bind_upstreams`]).
    ///
    /// A chain with targets is walked in order, each target at most once per request: past
    /// the primary while its circuit is open, and past the primary or a target that answered
    /// `service_unavailable` (`503`, `529`), `timeout`, or failed to connect; a
    /// `context_length_exceeded` answer goes on only to targets marked
    /// [`Target::larger_context`], a `content_policy_violation` answer only to targets
    /// marked [`Target::on_content_policy`]. Every target has its own circuit in this layer
    /// (the same open duration and backoff), which records its answers; a target whose
    /// circuit is open is skipped. The walk stops at the retry layer's deadline
    /// ([`Deadline`](crate::ext::Deadline)) when there is one, else after
    /// [`call_timeout`](CircuitBreakerLayerBuilder::call_timeout) when set. The other steps
    /// ([`fallback_model`](CircuitBreakerLayerBuilder::fallback_model),
    /// [`fallback_service`](CircuitBreakerLayerBuilder::fallback_service),
    /// [`fallback_response`](CircuitBreakerLayerBuilder::fallback_response)) take part as
    /// unmarked targets. See the [module docs](super#fallback-chains).
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use bytes::Bytes;
    /// use http::{Request, Response, StatusCode};
    /// use http_body_util::{BodyExt, Full};
    /// use llm_layers::body::LayerBody;
    /// use llm_layers::breaker::{CircuitBreakerLayer, Target};
    /// use tower::{Layer, ServiceExt};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// // The primary is overloaded.
    /// let primary = tower::service_fn(|_: Request<LayerBody<Full<Bytes>>>| async {
    ///     let mut res = Response::new(Full::new(Bytes::new()));
    ///     *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    ///     Ok::<_, Infallible>(res)
    /// });
    /// let backup = |answer: &'static str| {
    ///     tower::service_fn(move |_: Request<LayerBody<Full<Bytes>>>| async move {
    ///         Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(answer))))
    ///     })
    /// };
    /// let layer = CircuitBreakerLayer::builder()
    ///     .fallback_target(Target::upstream("azure", backup("azure")).with_model("gpt-4o"))
    ///     .fallback_target(Target::upstream("backup", backup("backup")))
    ///     .build()
    ///     .unwrap();
    /// let body = Full::new(Bytes::from(r#"{"model":"gpt-4o","messages":[]}"#));
    /// let res = layer.layer(primary).oneshot(Request::new(body)).await.unwrap();
    /// assert_eq!(res.headers()["x-llm-layers-fallback"], "azure/gpt-4o");
    /// assert_eq!(&res.into_body().collect().await.unwrap().to_bytes()[..], b"azure");
    /// # }
    /// ```
    pub fn fallback_target<U>(
        self,
        target: Target<U>,
    ) -> CircuitBreakerLayerBuilder<<F as AddTarget<U>>::Out>
    where
        F: AddTarget<U>,
    {
        let name = target.target_name();
        let (fallback, index) = self.fallback.add(target.via);
        let mut unbound = self.unbound;
        let by_name = target.upstream.is_some() && index.is_none();
        let service = if by_name {
            unbound += 1;
            Some(unbound - 1)
        } else {
            index
        };
        let mut fallbacks = self.fallbacks;
        fallbacks.push(FallbackStep::Target(TargetStep {
            name,
            named: target.name.is_some(),
            model: target.model,
            upstream: target.upstream,
            service,
            by_name,
            larger_context: target.larger_context,
            on_content_policy: target.on_content_policy,
        }));
        CircuitBreakerLayerBuilder {
            name: self.name,
            window: self.window,
            failure_rate: self.failure_rate,
            slow_call: self.slow_call,
            minimum_calls: self.minimum_calls,
            probes: self.probes,
            probe_timeout: self.probe_timeout,
            call_timeout: self.call_timeout,
            open_duration: self.open_duration,
            backoff_multiplier: self.backoff_multiplier,
            max_open_duration: self.max_open_duration,
            jitter: self.jitter,
            seed: self.seed,
            policy: self.policy,
            trip_on_rate_limit: self.trip_on_rate_limit,
            key_by: self.key_by,
            upstream: self.upstream,
            max_keys: self.max_keys,
            max_key_len: self.max_key_len,
            body_limit: self.body_limit,
            fallbacks,
            unbound,
            fallback,
            on_event: self.on_event,
        }
    }

    /// Calls `f` for every state transition, rejection and fallback (after the tracing
    /// event). Keep it quick: it runs inline.
    pub fn on_event<H>(mut self, f: H) -> Self
    where
        H: Fn(&BreakerEvent) + Send + Sync + 'static,
    {
        self.on_event = Some(Arc::new(f));
        self
    }

    /// Validates the configuration and builds the layer.
    pub fn build(self) -> Result<CircuitBreakerLayer<F>, ConfigError> {
        let pct = |field, v: f64| {
            if v.is_finite() && v > 0.0 && v <= 100.0 {
                Ok(v)
            } else {
                Err(config_error(
                    field,
                    format!("a percentage must be within (0, 100], got {v}"),
                ))
            }
        };
        pct("failure_rate", self.failure_rate)?;
        if self.name.is_empty() {
            return Err(config_error("name", "must not be empty"));
        }
        match self.window {
            WindowKind::Count(0) => {
                return Err(config_error("count_window", "must hold at least 1 call"))
            }
            WindowKind::Count(n) if n > MAX_COUNT_WINDOW => {
                return Err(config_error(
                    "count_window",
                    format!("must hold at most {MAX_COUNT_WINDOW} calls, got {n}"),
                ))
            }
            WindowKind::Count(n) if (self.minimum_calls as u128) > n as u128 => {
                return Err(config_error(
                    "minimum_calls",
                    format!(
                        "{} is more than the count window of {n} calls, so the circuit could never open",
                        self.minimum_calls
                    ),
                ))
            }
            WindowKind::Time(d, _) if d.is_zero() => {
                return Err(config_error("time_window", "duration must not be zero"))
            }
            WindowKind::Time(_, 0) => {
                return Err(config_error("time_window", "needs at least 1 bucket"))
            }
            WindowKind::Time(_, b) if b > MAX_BUCKETS => {
                return Err(config_error(
                    "time_window",
                    format!("at most {MAX_BUCKETS} buckets, got {b}"),
                ))
            }
            WindowKind::Time(d, b) if d.as_nanos() < b as u128 => {
                return Err(config_error(
                    "time_window",
                    "more buckets than nanoseconds in the window",
                ))
            }
            WindowKind::Consecutive(0) => {
                return Err(config_error(
                    "consecutive_failures",
                    "must be at least 1",
                ))
            }
            _ => {}
        }
        if self.minimum_calls == 0 {
            return Err(config_error("minimum_calls", "must be at least 1"));
        }
        if let Some((d, rate)) = self.slow_call {
            if d.is_zero() {
                return Err(config_error("slow_calls", "duration must not be zero"));
            }
            pct("slow_calls", rate)?;
        }
        if self.probes == 0 || self.probes > u16::MAX as u32 {
            return Err(config_error(
                "half_open_probes",
                format!("must be within 1..=65535, got {}", self.probes),
            ));
        }
        if self.probe_timeout.is_zero() {
            return Err(config_error("probe_timeout", "must not be zero"));
        }
        if self.call_timeout.is_some_and(|d| d.is_zero()) {
            return Err(config_error("call_timeout", "must not be zero"));
        }
        if self.open_duration.is_zero() {
            return Err(config_error("open_duration", "must not be zero"));
        }
        if !(self.backoff_multiplier.is_finite() && self.backoff_multiplier >= 1.0) {
            return Err(config_error(
                "open_backoff",
                format!(
                    "the multiplier must be at least 1, got {}",
                    self.backoff_multiplier
                ),
            ));
        }
        if self.max_open_duration < self.open_duration {
            return Err(config_error(
                "open_backoff",
                "the maximum open duration is shorter than open_duration",
            ));
        }
        if !(self.jitter.is_finite() && (0.0..=1.0).contains(&self.jitter)) {
            return Err(config_error(
                "jitter",
                format!("must be within [0, 1], got {}", self.jitter),
            ));
        }
        if self.max_keys == 0 {
            return Err(config_error("max_keys", "must be at least 1"));
        }
        if self.max_key_len < super::registry::MIN_KEY_LEN {
            return Err(config_error(
                "max_key_len",
                format!(
                    "must be at least {} bytes, got {}",
                    super::registry::MIN_KEY_LEN,
                    self.max_key_len
                ),
            ));
        }
        if self.upstream.as_deref().is_some_and(str::is_empty) {
            return Err(config_error("upstream", "must not be empty"));
        }
        if self.body_limit == 0 {
            return Err(config_error("body_limit", "must be at least 1 byte"));
        }
        let bound = self.fallbacks.iter().any(|s| match s {
            FallbackStep::Service { .. } => true,
            FallbackStep::Target(t) => t.service.is_some() && !t.by_name,
            _ => false,
        });
        if bound && self.unbound > 0 {
            return Err(config_error(
                "fallback_target",
                "targets bound later by name (Target::named_upstream) cannot be mixed with typed fallback services",
            ));
        }
        let mut names = std::collections::HashSet::new();
        for step in &self.fallbacks {
            if matches!(step, FallbackStep::Target(_)) && !names.insert(step.name()) {
                return Err(config_error(
                    "fallback_target",
                    format!("two targets are named '{}'; each target is tried once and has its own circuit, so names must differ", step.name()),
                ));
            }
            if step.name().is_empty() {
                return Err(config_error(
                    "fallback",
                    "a fallback needs a non-empty name or model",
                ));
            }
            if HeaderValue::from_str(step.name()).is_err() {
                return Err(config_error(
                    "fallback",
                    "a fallback name must be a valid header value",
                ));
            }
        }
        let config = Config {
            name: self.name,
            window: self.window,
            failure_rate: self.failure_rate,
            slow_call: self.slow_call,
            minimum_calls: self.minimum_calls,
            probes: self.probes as u16,
            probe_timeout: self.probe_timeout,
            call_timeout: self.call_timeout,
            open_duration: self.open_duration,
            backoff_multiplier: self.backoff_multiplier,
            max_open_duration: self.max_open_duration,
            jitter: self.jitter,
            seed: self.seed.unwrap_or_else(|| fastrand::u64(..)),
            policy: self.policy,
            trip_on_rate_limit: self.trip_on_rate_limit,
            estimator: Arc::new(CharEstimator),
            key_by: self.key_by,
            upstream: self.upstream,
            max_keys: self.max_keys,
            max_key_len: self.max_key_len,
            body_limit: self.body_limit,
            walk_on_answer: self
                .fallbacks
                .iter()
                .any(|s| matches!(s, FallbackStep::Target(_))),
            fallbacks: self.fallbacks,
            unbound: self.unbound,
            on_event: self.on_event,
        };
        Ok(CircuitBreakerLayer::from_parts(
            Arc::new(Shared::new(config)),
            self.fallback,
        ))
    }
}

impl CircuitBreakerLayerBuilder<NoFallback> {
    /// Adds a fallback step: while the circuit is open, send the request to `service` (a
    /// backup upstream or provider). The response carries `x-llm-layers-fallback: <name>`.
    ///
    /// The service is typed: the layer becomes a `CircuitBreakerLayer<ServiceFallback<S>>`,
    /// and the breaker is a service only when `S` takes the same requests as the guarded
    /// service (`Request<LayerBody<B>>`) and answers the same responses and errors, that is
    /// `S: Service<Request<LayerBody<B>>, Response = Response<ResBody>, Error =
    /// Inner::Error> + Clone`. A mismatch does not compile. One fallback service per layer;
    /// its place in the chain is where this is called.
    ///
    /// ```compile_fail,E0599
    /// use std::convert::Infallible;
    /// use bytes::Bytes;
    /// use http::{Request, Response};
    /// use http_body_util::Full;
    /// use llm_layers::body::LayerBody;
    /// use llm_layers::breaker::CircuitBreakerLayer;
    /// use tower::{Layer, ServiceExt};
    ///
    /// // The guarded service answers `Full<Bytes>` bodies ...
    /// let upstream = tower::service_fn(|_: Request<LayerBody<Full<Bytes>>>| async {
    ///     Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    /// });
    /// // ... the backup answers `String` bodies: the breaker is no service.
    /// let backup = tower::service_fn(|_: Request<LayerBody<Full<Bytes>>>| async {
    ///     Ok::<_, Infallible>(Response::new(String::new()))
    /// });
    /// let layer = CircuitBreakerLayer::builder().fallback_service("backup", backup).build().unwrap();
    /// let _ = layer.layer(upstream).oneshot(Request::new(Full::new(Bytes::new())));
    /// ```
    ///
    /// With matching types it does:
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use bytes::Bytes;
    /// use http::{Request, Response, StatusCode};
    /// use http_body_util::Full;
    /// use llm_layers::body::LayerBody;
    /// use llm_layers::breaker::{CircuitBreakerLayer, CircuitMode};
    /// use tower::{Layer, ServiceExt};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let upstream = tower::service_fn(|_: Request<LayerBody<Full<Bytes>>>| async {
    ///     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("primary"))))
    /// });
    /// let backup = tower::service_fn(|_: Request<LayerBody<Full<Bytes>>>| async {
    ///     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("backup"))))
    /// });
    /// let layer = CircuitBreakerLayer::builder().fallback_service("backup", backup).build().unwrap();
    /// layer.handle().set_mode(CircuitMode::ForcedOpen);
    /// let res = layer.layer(upstream).oneshot(Request::new(Full::new(Bytes::new()))).await.unwrap();
    /// assert_eq!(res.status(), StatusCode::OK);
    /// assert_eq!(res.headers()["x-llm-layers-fallback"], "backup");
    /// # }
    /// ```
    pub fn fallback_service<S>(
        self,
        name: impl Into<Arc<str>>,
        service: S,
    ) -> CircuitBreakerLayerBuilder<ServiceFallback<S>> {
        let mut fallbacks = self.fallbacks;
        fallbacks.push(FallbackStep::Service {
            name: name.into(),
            index: 0,
        });
        CircuitBreakerLayerBuilder {
            name: self.name,
            window: self.window,
            failure_rate: self.failure_rate,
            slow_call: self.slow_call,
            minimum_calls: self.minimum_calls,
            probes: self.probes,
            probe_timeout: self.probe_timeout,
            call_timeout: self.call_timeout,
            open_duration: self.open_duration,
            backoff_multiplier: self.backoff_multiplier,
            max_open_duration: self.max_open_duration,
            jitter: self.jitter,
            seed: self.seed,
            policy: self.policy,
            trip_on_rate_limit: self.trip_on_rate_limit,
            key_by: self.key_by,
            upstream: self.upstream,
            max_keys: self.max_keys,
            max_key_len: self.max_key_len,
            body_limit: self.body_limit,
            fallbacks,
            unbound: self.unbound,
            fallback: ServiceFallback(Arc::from(vec![service])),
            on_event: self.on_event,
        }
    }
}
