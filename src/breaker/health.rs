//! Active health checks: a background prober that asks the upstream now and then whether it
//! is up, so that a circuit opens before live traffic finds the upstream down, and an open
//! circuit goes half-open as soon as the upstream is back.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use axum::{body::Body, http::{Request, Response, StatusCode}};
//! use llm_layers::breaker::{CircuitBreakerLayer, CircuitState, HealthCheck, SINGLE_KEY};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! tokio::time::pause();
//! let breaker = CircuitBreakerLayer::builder().name("openai").build().unwrap();
//! let handle = breaker.handle();
//!
//! // The probe goes through a service of your own: usually a clone of the upstream client.
//! // This one is an upstream that is down.
//! let upstream = tower::service_fn(|_req: Request<Body>| async {
//!     Ok::<_, std::convert::Infallible>(
//!         Response::builder().status(StatusCode::SERVICE_UNAVAILABLE).body(Body::empty()).unwrap(),
//!     )
//! });
//! let check = HealthCheck::builder()
//!     .interval(Duration::from_secs(10))
//!     .timeout(Duration::from_secs(2))
//!     .failures_to_open(2)
//!     .seed(7)
//!     .build()
//!     .unwrap();
//! // Keep the task: dropping it stops the prober.
//! let task = handle.spawn_health_check(check, upstream);
//!
//! // The first probe goes out at once, the second about 10 s later: no live call was made.
//! tokio::time::sleep(Duration::from_secs(12)).await;
//! assert_eq!(handle.state(SINGLE_KEY), Some(CircuitState::Open));
//!
//! // The prober ends with the breaker: it holds only a weak reference to its circuits.
//! drop(breaker);
//! drop(handle);
//! tokio::time::sleep(Duration::from_secs(12)).await;
//! assert!(task.is_finished());
//! # }
//! ```
//!
//! # Rules
//!
//! - **What is sent.** By default `GET /v1/models` (it spends no tokens), or the method, path
//!   (or absolute URI) and headers given to the builder, or any request made by the factory of
//!   [`BreakerHandle::spawn_health_check_with`]. The request goes through the service you
//!   give, which is not wrapped in the breaker: the probe is no live call, it is neither
//!   admitted nor refused, nor counted in the circuit's window.
//! - **When.** The first probe at once, then every [`interval`](HealthCheckBuilder::interval)
//!   `× (1 ± jitter)`, from a seeded [`fastrand::Rng`], after the previous probe ended. Each
//!   probe has its own [`timeout`](HealthCheckBuilder::timeout) (readiness and answer head).
//!   Time is tokio's: under `tokio::time::pause` the prober runs in paused time.
//! - **How an answer counts.** The breaker's own [`policy`](super::CircuitBreakerLayerBuilder::policy)
//!   decides, as for a live call ([`DefaultPolicy`](crate::policy::DefaultPolicy) by default):
//!   a success (`2xx`) passes; a failure that counts against a circuit (`5xx`, `529`, a
//!   transport error) fails, and so does the probe timeout. What the caller caused is
//!   [`Inconclusive`](ProbeResult::Inconclusive): `401`/`403` mean the probe's key is bad or
//!   lacks a permission, and `404` that the upstream does not serve the probe's path. None of
//!   them is an upstream outage, so they must not open a circuit (a revoked key would
//!   otherwise take every model down), and they are no proof of health either: the run of
//!   failures stays as it was, and the event is logged at `warn` so the operator fixes the
//!   probe. `429` is inconclusive too unless the breaker
//!   [trips on rate limits](super::CircuitBreakerLayerBuilder::trip_on_rate_limit). The body
//!   of the answer is not read.
//! - **What it moves.** [`failures_to_open`](HealthCheckBuilder::failures_to_open) failing
//!   probes in a row open a closed circuit ([`TransitionReason::HealthCheckFailed`](super::TransitionReason::HealthCheckFailed));
//!   one failing probe re-opens a half-open one. A passing probe moves an open circuit to
//!   half-open at once ([`TransitionReason::HealthCheckPassed`](super::TransitionReason::HealthCheckPassed)),
//!   and the live half-open probes close it: a probe of `/v1/models` shows that the upstream
//!   answers, not that it serves completions, so it does not close a circuit by itself. A
//!   circuit under a manual [`CircuitMode`](super::CircuitMode) is not moved.
//! - **Events.** Every probe is a [`BreakerEvent::HealthCheck`](super::BreakerEvent::HealthCheck)
//!   (to the `on_event` hook and `tracing`), so probe results can be counted.
//! - **Lifetime.** Starting is explicit and needs a tokio runtime (the spawn functions panic
//!   outside one, like `tokio::spawn`). The task holds only a weak reference to the breaker's
//!   circuits, so it ends at its next wake-up once the layer, every service it built and every
//!   handle are dropped, dropping the probe service. The returned [`HealthCheckTask`] aborts
//!   the task when dropped: keep it as long as the probes should run.

use std::sync::{Arc, Weak};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Uri};
use tower_service::Service;

use super::circuit::Verdict;
use super::config::{nanos, ConfigError};
use super::events::{emit, BreakerEvent, ProbeResult};
use super::registry::{BreakerHandle, Shared, SINGLE_KEY};

fn refuse(field: &'static str, message: impl Into<std::borrow::Cow<'static, str>>) -> ConfigError {
    ConfigError::new("health check", field, message)
}

/// The shortest interval between probes.
const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// The most failures in a row a check can ask for.
const MAX_FAILURES_TO_OPEN: u32 = 1000;

/// A validated health-check configuration ([`HealthCheck::builder`]); start it with
/// [`BreakerHandle::spawn_health_check`].
#[derive(Clone)]
pub struct HealthCheck {
    key: Arc<str>,
    interval: Duration,
    timeout: Duration,
    jitter: f64,
    failures_to_open: u32,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    seed: u64,
}

impl std::fmt::Debug for HealthCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Header values may be credentials: only their names are shown.
        f.debug_struct("HealthCheck")
            .field("key", &self.key)
            .field("interval", &self.interval)
            .field("timeout", &self.timeout)
            .field("jitter", &self.jitter)
            .field("failures_to_open", &self.failures_to_open)
            .field("method", &self.method)
            .field("uri", &self.uri)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl HealthCheck {
    /// A builder with the defaults: the circuit [`SINGLE_KEY`], every 10 s ± 10 %, a 5 s
    /// timeout, 3 failures in a row to open, `GET /v1/models`.
    pub fn builder() -> HealthCheckBuilder {
        HealthCheckBuilder::default()
    }

    /// The key of the circuit the probes steer.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The time between two probes, before jitter.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Each probe's own timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The jitter, a fraction of the interval.
    pub fn jitter(&self) -> f64 {
        self.jitter
    }

    /// Failing probes in a row that open a closed circuit.
    pub fn failures_to_open(&self) -> u32 {
        self.failures_to_open
    }

    /// The probe's URI: a path (`/v1/models`) or an absolute URI.
    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// The default probe request: the method, URI and headers configured, an empty body.
    pub fn request<B: Default>(&self) -> Request<B> {
        let mut req = Request::new(B::default());
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.headers_mut() = self.headers.clone();
        req
    }

    /// The wait before the next probe: the interval `× (1 ± jitter)`.
    fn delay(&self, rng: &mut fastrand::Rng) -> Duration {
        let factor = 1.0 + self.jitter * (2.0 * rng.f64() - 1.0);
        Duration::from_nanos((nanos(self.interval) as f64 * factor) as u64)
    }
}

/// Builds a [`HealthCheck`]; [`build`](Self::build) validates every value.
#[derive(Debug, Clone)]
pub struct HealthCheckBuilder {
    key: Arc<str>,
    interval: Duration,
    timeout: Duration,
    jitter: f64,
    failures_to_open: u32,
    method: Method,
    path: String,
    headers: Vec<(String, HiddenValue)>,
    seed: Option<u64>,
}

/// A header value kept out of `Debug`.
#[derive(Clone)]
struct HiddenValue(String);

impl std::fmt::Debug for HiddenValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<hidden>")
    }
}

impl Default for HealthCheckBuilder {
    fn default() -> Self {
        HealthCheckBuilder {
            key: Arc::from(SINGLE_KEY),
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
            jitter: 0.1,
            failures_to_open: 3,
            method: Method::GET,
            path: "/v1/models".to_owned(),
            headers: Vec::new(),
            seed: None,
        }
    }
}

impl HealthCheckBuilder {
    /// The key of the circuit the probes steer: the upstream's name with
    /// [`CircuitKey::Upstream`](super::CircuitKey::Upstream), `upstream/model` with
    /// [`CircuitKey::UpstreamAndModel`](super::CircuitKey::UpstreamAndModel), a model with
    /// [`CircuitKey::Model`](super::CircuitKey::Model). Ignored with
    /// [`CircuitKey::Single`](super::CircuitKey::Single) (the one circuit). Default
    /// [`SINGLE_KEY`].
    pub fn key(mut self, key: impl Into<Arc<str>>) -> Self {
        self.key = key.into();
        self
    }

    /// The time between two probes, from the end of one to the start of the next, before
    /// jitter (at least 100 ms; default 10 s).
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Each probe's timeout, for readiness and the answer's head (more than zero, at most the
    /// interval; default 5 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The jitter of the interval, a fraction in `[0, 1)` (default 0.1: ± 10 %), so that
    /// replicas do not probe in step.
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.jitter = fraction;
        self
    }

    /// Failing probes in a row that open a closed circuit (1 to 1000; default 3).
    pub fn failures_to_open(mut self, failures: u32) -> Self {
        self.failures_to_open = failures;
        self
    }

    /// The probe's method (default `GET`).
    pub fn method(mut self, method: Method) -> Self {
        self.method = method;
        self
    }

    /// The probe's path (`/v1/models`, the default) or absolute `http(s)://` URI.
    pub fn path(mut self, path: impl Into<String>) -> Self {
        self.path = path.into();
        self
    }

    /// Adds a header to the probe request (its value is never shown by `Debug`).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), HiddenValue(value.into())));
        self
    }

    /// The seed of the jitter (default: random).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Checks every value.
    pub fn build(self) -> Result<HealthCheck, ConfigError> {
        if self.key.is_empty() {
            return Err(refuse("key", "must not be empty"));
        }
        if self.interval < MIN_INTERVAL {
            return Err(refuse(
                "interval",
                format!("must be at least 100 ms, got {:?}", self.interval),
            ));
        }
        if self.timeout.is_zero() || self.timeout > self.interval {
            return Err(refuse(
                "timeout",
                format!(
                    "must be more than zero and at most the interval ({:?}), got {:?}",
                    self.interval, self.timeout
                ),
            ));
        }
        if !(0.0..1.0).contains(&self.jitter) {
            return Err(refuse(
                "jitter",
                format!("must be in [0, 1), got {}", self.jitter),
            ));
        }
        if self.failures_to_open == 0 || self.failures_to_open > MAX_FAILURES_TO_OPEN {
            return Err(refuse(
                "failures_to_open",
                format!(
                    "must be between 1 and {MAX_FAILURES_TO_OPEN}, got {}",
                    self.failures_to_open
                ),
            ));
        }
        let uri: Uri = self
            .path
            .parse()
            .map_err(|_| refuse("path", "not a valid path or URI"))?;
        let absolute = matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some();
        if !(absolute || (uri.scheme().is_none() && self.path.starts_with('/'))) {
            return Err(refuse(
                "path",
                "must be a path starting with `/` or an http:// or https:// URI",
            ));
        }
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            // The URI is logged and shown by `Debug`: credentials go in a header.
            return Err(refuse(
                "path",
                "must not hold credentials (`user:password@`); send them in a header",
            ));
        }
        let mut headers = HeaderMap::new();
        for (name, value) in &self.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| refuse("header", format!("{name:?} is not a header name")))?;
            let mut value = HeaderValue::from_str(&value.0)
                .map_err(|_| refuse("header", format!("the value of {name} is not valid")))?;
            value.set_sensitive(true);
            headers.append(name, value);
        }
        Ok(HealthCheck {
            key: self.key,
            interval: self.interval,
            timeout: self.timeout,
            jitter: self.jitter,
            failures_to_open: self.failures_to_open,
            method: self.method,
            uri,
            headers,
            seed: self.seed.unwrap_or_else(|| fastrand::u64(..)),
        })
    }
}

/// A running health check. Dropping it aborts the task; the task also ends by itself once the
/// breaker is gone (see the module documentation).
#[derive(Debug)]
#[must_use = "dropping the task stops the health check"]
pub struct HealthCheckTask {
    task: tokio::task::JoinHandle<()>,
}

impl HealthCheckTask {
    /// Whether the task has ended (the breaker is gone, or it was aborted).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops the task now.
    pub fn abort(&self) {
        self.task.abort();
    }
}

impl Drop for HealthCheckTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl BreakerHandle {
    /// Starts `check` against `service` with the default probe request
    /// ([`HealthCheck::request`]). See [`spawn_health_check_with`](Self::spawn_health_check_with).
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime, like `tokio::spawn`.
    pub fn spawn_health_check<S, B, ResB>(&self, check: HealthCheck, service: S) -> HealthCheckTask
    where
        S: Service<Request<B>, Response = Response<ResB>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Send + 'static,
        B: Default + Send + 'static,
        ResB: Send + 'static,
    {
        let template = check.clone();
        self.spawn_health_check_with(check, service, move || template.request())
    }

    /// Starts `check` against `service`, each probe request made by `make_request` (a request
    /// with a body, another path per model, ...). The task runs on the current tokio runtime,
    /// holds only a weak reference to this breaker's circuits and ends with them; the
    /// returned [`HealthCheckTask`] aborts it when dropped.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime, like `tokio::spawn`.
    pub fn spawn_health_check_with<S, B, ResB, F>(
        &self,
        check: HealthCheck,
        service: S,
        make_request: F,
    ) -> HealthCheckTask
    where
        S: Service<Request<B>, Response = Response<ResB>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Send + 'static,
        B: Send + 'static,
        ResB: Send + 'static,
        F: FnMut() -> Request<B> + Send + 'static,
    {
        let weak = Arc::downgrade(&self.shared);
        HealthCheckTask {
            task: tokio::spawn(run(weak, check, service, make_request)),
        }
    }
}

/// The circuit a check steers: the one circuit with `Single`, else the key's (created when
/// new, as [`BreakerHandle::set_mode_for`] does).
fn circuit_of(shared: &Shared, key: &str) -> Arc<super::circuit::Circuit> {
    if matches!(shared.config().key_by, super::CircuitKey::Single) {
        shared.single.clone()
    } else {
        shared.circuit(key)
    }
}

async fn run<S, B, ResB, F>(weak: Weak<Shared>, check: HealthCheck, mut service: S, mut make: F)
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: 'static,
    F: FnMut() -> Request<B>,
{
    let mut rng = fastrand::Rng::with_seed(check.seed);
    let mut failures: u32 = 0;
    loop {
        if weak.strong_count() == 0 {
            return;
        }
        let start = tokio::time::Instant::now();
        let answer = tokio::time::timeout(check.timeout, async {
            std::future::poll_fn(|cx| service.poll_ready(cx)).await?;
            service.call(make()).await
        })
        .await;
        let elapsed = start.elapsed();
        // Only now, and only for the record, is the breaker held.
        let Some(shared) = weak.upgrade() else {
            return;
        };
        let cfg = shared.config();
        let (result, status) = match answer {
            Err(_) => (ProbeResult::TimedOut, None),
            Ok(Err(e)) => {
                let code = crate::policy::classify_error_ref(&e).code();
                let verdict = Verdict::of(
                    crate::policy::Outcome::for_code(code),
                    cfg.trip_on_rate_limit,
                );
                (probe_result(verdict), None)
            }
            Ok(Ok(res)) => {
                let verdict = super::circuit::head_verdict(cfg, &res);
                (probe_result(verdict), Some(res.status().as_u16()))
            }
        };
        match result {
            ProbeResult::Passed => failures = 0,
            ProbeResult::Failed | ProbeResult::TimedOut => failures = failures.saturating_add(1),
            ProbeResult::Inconclusive => {}
        }
        let circuit = circuit_of(&shared, &check.key);
        emit(
            &cfg.on_event,
            BreakerEvent::HealthCheck {
                name: cfg.name.clone(),
                key: circuit.key.clone(),
                result,
                status,
                elapsed,
                consecutive_failures: failures,
            },
        );
        match result {
            ProbeResult::Passed => {
                circuit.health_passed();
            }
            ProbeResult::Failed | ProbeResult::TimedOut => {
                circuit.health_failed(failures, check.failures_to_open);
            }
            ProbeResult::Inconclusive => {}
        }
        drop(circuit);
        drop(shared);
        tokio::time::sleep(check.delay(&mut rng)).await;
    }
}

fn probe_result(verdict: Verdict) -> ProbeResult {
    match verdict {
        Verdict::Success => ProbeResult::Passed,
        Verdict::Failure => ProbeResult::Failed,
        Verdict::Ignored => ProbeResult::Inconclusive,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builder_refuses_what_cannot_work() {
        let field = |b: HealthCheckBuilder| b.build().unwrap_err().field().to_owned();
        let b = HealthCheck::builder;
        assert_eq!(field(b().interval(Duration::from_millis(10))), "interval");
        assert_eq!(field(b().timeout(Duration::ZERO)), "timeout");
        assert_eq!(field(b().timeout(Duration::from_secs(11))), "timeout");
        assert_eq!(field(b().jitter(1.0)), "jitter");
        assert_eq!(field(b().jitter(f64::NAN)), "jitter");
        assert_eq!(field(b().failures_to_open(0)), "failures_to_open");
        assert_eq!(field(b().path("v1/models")), "path");
        assert_eq!(field(b().path("ftp://x/v1")), "path");
        assert_eq!(field(b().key("")), "key");
        assert_eq!(field(b().path("http://user:pw@host/v1/models")), "path");
        assert_eq!(field(b().header("bad name", "x")), "header");
        let ok = b()
            .path("https://api.openai.com/v1/models")
            .header("authorization", "Bearer sk-secret")
            .build()
            .unwrap();
        assert_eq!(ok.uri().host(), Some("api.openai.com"));
        let shown = format!(
            "{ok:?} {:?}",
            b().header("authorization", "Bearer sk-secret")
        );
        assert!(!shown.contains("sk-secret"), "{shown}");
    }

    #[test]
    fn delays_stay_within_the_jitter_and_repeat_with_the_seed() {
        let check = HealthCheck::builder()
            .interval(Duration::from_secs(10))
            .timeout(Duration::from_secs(1))
            .jitter(0.2)
            .seed(42)
            .build()
            .unwrap();
        let delays = |seed| {
            let mut rng = fastrand::Rng::with_seed(seed);
            (0..1000).map(|_| check.delay(&mut rng)).collect::<Vec<_>>()
        };
        let a = delays(42);
        assert!(a
            .iter()
            .all(|d| (Duration::from_secs(8)..=Duration::from_secs(12)).contains(d)));
        assert_eq!(a, delays(42));
        assert_ne!(a, delays(43));
        // The jitter is used, not just allowed.
        assert!(a.iter().any(|d| *d < Duration::from_millis(8500)));
        assert!(a.iter().any(|d| *d > Duration::from_millis(11500)));
    }
}
