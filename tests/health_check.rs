//! Active health checks: probes through a real 127.0.0.1 upstream open a circuit with no live
//! traffic, a passing probe takes it half-open and live probes close it; the probe timeout,
//! the jitter and the task's end with the layer.
//!
//! Time is tokio's paused clock. Where a probe crosses a real socket, the clock's
//! auto-advance is held off ([`HoldClock`]) so that time moves only by `advance`, never while
//! the socket is being served: every wait is exact, none is real time.

mod common_hyper;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use llm_layers::body::LayerBody;
use llm_layers::breaker::{
    BreakerEvent, CircuitBreakerLayer, CircuitState, HealthCheck, ProbeResult, TransitionReason,
    SINGLE_KEY,
};
use tokio::sync::mpsc;
use tokio::time::{advance, Instant};
use tower::{Layer, ServiceExt};

/// Holds off the paused clock's auto-advance while it lives: tokio does not auto-advance
/// while a blocking task runs, and this one waits until the guard is dropped.
struct HoldClock(Option<std::sync::mpsc::Sender<()>>);

impl HoldClock {
    fn new() -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        tokio::task::spawn_blocking(move || {
            let _ = rx.recv();
        });
        HoldClock(Some(tx))
    }
}

impl Drop for HoldClock {
    fn drop(&mut self) {
        self.0.take();
    }
}

/// An upstream on 127.0.0.1 that answers every request with the status it is set to (`0`:
/// never answers), and counts requests.
struct Upstream {
    addr: std::net::SocketAddr,
    status: Arc<AtomicU16>,
    hits: Arc<AtomicUsize>,
    arrived: Arc<tokio::sync::Notify>,
}

async fn upstream(status: u16) -> Upstream {
    let st = Arc::new(AtomicU16::new(status));
    let hits = Arc::new(AtomicUsize::new(0));
    let arrived = Arc::new(tokio::sync::Notify::new());
    let (s, h, a) = (st.clone(), hits.clone(), arrived.clone());
    let addr = common_hyper::serve(tower::service_fn(move |_req: Request<Incoming>| {
        let status = s.load(Ordering::SeqCst);
        h.fetch_add(1, Ordering::SeqCst);
        a.notify_one();
        async move {
            if status == 0 {
                std::future::pending::<()>().await;
            }
            Ok::<_, Infallible>(
                Response::builder()
                    .status(status)
                    .body(Full::new(Bytes::from_static(b"{}")))
                    .unwrap(),
            )
        }
    }))
    .await;
    Upstream {
        addr,
        status: st,
        hits,
        arrived,
    }
}

type Events = mpsc::UnboundedReceiver<BreakerEvent>;

fn breaker() -> (CircuitBreakerLayer, Events) {
    let (tx, rx) = mpsc::unbounded_channel();
    let layer = CircuitBreakerLayer::builder()
        .name("probe-test")
        .half_open_probes(2)
        .open_duration(Duration::from_secs(120))
        .seed(1)
        .on_event(move |ev| {
            let _ = tx.send(ev.clone());
        })
        .build()
        .unwrap();
    (layer, rx)
}

fn check(base: &str) -> HealthCheck {
    HealthCheck::builder()
        .path(format!("{base}/v1/models"))
        .interval(Duration::from_secs(10))
        .timeout(Duration::from_secs(2))
        .jitter(0.1)
        .failures_to_open(3)
        .seed(9)
        .build()
        .unwrap()
}

/// The next health-check event: (result, status, failures in a row).
async fn probe(rx: &mut Events) -> (ProbeResult, Option<u16>, u32, Duration) {
    loop {
        match rx.recv().await.expect("the breaker lives") {
            BreakerEvent::HealthCheck {
                result,
                status,
                consecutive_failures,
                elapsed,
                ..
            } => return (result, status, consecutive_failures, elapsed),
            BreakerEvent::StateChanged { .. } => panic!("a transition before its probe event"),
            _ => {}
        }
    }
}

/// The next transition: (from, to, reason).
async fn transition(rx: &mut Events) -> (CircuitState, CircuitState, TransitionReason) {
    loop {
        if let BreakerEvent::StateChanged {
            from, to, reason, ..
        } = rx.recv().await.expect("the breaker lives")
        {
            return (from, to, reason);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_dead_upstream_opens_the_circuit_from_probes_alone_and_its_return_closes_it() {
    let _hold = HoldClock::new();
    let up = upstream(503).await;
    let base = format!("http://{}", up.addr);
    let (layer, mut rx) = breaker();
    let handle = layer.handle();
    let client = common_hyper::client::<Empty<Bytes>>();
    let _task = handle.spawn_health_check(check(&base), client);

    // Three failing probes, about 10 s apart: the circuit opens with no live call.
    for n in 1..=3 {
        if n > 1 {
            advance(Duration::from_secs(11)).await;
        }
        assert_eq!(
            probe(&mut rx).await,
            (ProbeResult::Failed, Some(503), n, Duration::ZERO)
        );
        if n < 3 {
            assert_eq!(handle.state(SINGLE_KEY), Some(CircuitState::Closed));
        }
    }
    assert_eq!(
        transition(&mut rx).await,
        (
            CircuitState::Closed,
            CircuitState::Open,
            TransitionReason::HealthCheckFailed
        )
    );
    let m = handle.metrics(SINGLE_KEY).unwrap();
    assert_eq!(m.state, CircuitState::Open);
    assert_eq!((m.calls, m.rejections), (0, 0), "no live traffic");
    assert_eq!(up.hits.load(Ordering::SeqCst), 3);
    let open_for = m.open_for.unwrap();
    assert!(
        (Duration::from_secs(108)..=Duration::from_secs(132)).contains(&open_for),
        "{open_for:?}"
    );
    assert_eq!(m.until_half_open, Some(open_for));

    // The upstream comes back: the next probe takes the circuit half-open long before its
    // open duration has passed.
    up.status.store(200, Ordering::SeqCst);
    advance(Duration::from_secs(11)).await;
    assert_eq!(
        probe(&mut rx).await,
        (ProbeResult::Passed, Some(200), 0, Duration::ZERO)
    );
    assert_eq!(
        transition(&mut rx).await,
        (
            CircuitState::Open,
            CircuitState::HalfOpen,
            TransitionReason::HealthCheckPassed
        )
    );
    let m = handle.metrics(SINGLE_KEY).unwrap();
    assert_eq!(
        (m.state, m.probes_out, m.until_half_open),
        (CircuitState::HalfOpen, 0, None)
    );

    // Live calls are the half-open probes: two successes close it.
    let live = layer.layer(common_hyper::client::<LayerBody<Empty<Bytes>>>());
    for _ in 0..2 {
        let req = Request::post(format!("{base}/v1/chat/completions"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let res = live.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        res.into_body().collect().await.unwrap();
    }
    assert_eq!(
        transition(&mut rx).await,
        (
            CircuitState::HalfOpen,
            CircuitState::Closed,
            TransitionReason::ProbesSucceeded
        )
    );
    let m = handle.metrics(SINGLE_KEY).unwrap();
    assert_eq!((m.state, m.calls), (CircuitState::Closed, 2));
    assert_eq!(up.hits.load(Ordering::SeqCst), 6);
}

#[tokio::test(start_paused = true)]
async fn a_closed_port_is_a_failing_probe() {
    let _hold = HoldClock::new();
    // A port nothing listens on: bind, read the port, close.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (layer, mut rx) = breaker();
    let handle = layer.handle();
    let check = HealthCheck::builder()
        .path(format!("http://{addr}/v1/models"))
        .interval(Duration::from_secs(10))
        .timeout(Duration::from_secs(2))
        .failures_to_open(1)
        .seed(3)
        .build()
        .unwrap();
    let _task = handle.spawn_health_check(check, common_hyper::client::<Empty<Bytes>>());
    let (result, status, failures, _) = probe(&mut rx).await;
    assert_eq!((result, status, failures), (ProbeResult::Failed, None, 1));
    assert_eq!(
        transition(&mut rx).await,
        (
            CircuitState::Closed,
            CircuitState::Open,
            TransitionReason::HealthCheckFailed
        )
    );
}

#[tokio::test(start_paused = true)]
async fn the_probe_timeout_fires_on_a_hung_upstream() {
    let _hold = HoldClock::new();
    let up = upstream(0).await;
    let (layer, mut rx) = breaker();
    let handle = layer.handle();
    let check = HealthCheck::builder()
        .path(format!("http://{}/v1/models", up.addr))
        .interval(Duration::from_secs(10))
        .timeout(Duration::from_secs(2))
        .failures_to_open(1)
        .build()
        .unwrap();
    let _task = handle.spawn_health_check(check, common_hyper::client::<Empty<Bytes>>());
    // The probe reached the upstream, which holds it.
    up.arrived.notified().await;
    advance(Duration::from_millis(1999)).await;
    tokio::task::yield_now().await;
    assert!(rx.try_recv().is_err(), "no result before the timeout");
    advance(Duration::from_millis(1)).await;
    assert_eq!(
        probe(&mut rx).await,
        (ProbeResult::TimedOut, None, 1, Duration::from_secs(2))
    );
    assert_eq!(transition(&mut rx).await.1, CircuitState::Open);
}

/// An in-process probe service: answers `status`, notes when it is dropped.
struct Probe {
    status: StatusCode,
    dropped: Arc<AtomicBool>,
}

impl tower::Service<Request<Empty<Bytes>>> for Probe {
    type Response = Response<Empty<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;
    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: Request<Empty<Bytes>>) -> Self::Future {
        let mut res = Response::new(Empty::new());
        *res.status_mut() = self.status;
        std::future::ready(Ok(res))
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn probes_are_jittered_within_bounds_and_repeat_with_the_seed() {
    async fn times(seed: u64) -> Vec<Duration> {
        let (layer, mut rx) = breaker();
        let check = HealthCheck::builder()
            .interval(Duration::from_secs(10))
            .timeout(Duration::from_secs(1))
            .jitter(0.25)
            .seed(seed)
            .build()
            .unwrap();
        let probe_svc = Probe {
            status: StatusCode::OK,
            dropped: Arc::default(),
        };
        let _task = layer.handle().spawn_health_check(check, probe_svc);
        let start = Instant::now();
        let mut at = Vec::new();
        for _ in 0..50 {
            assert_eq!(probe(&mut rx).await.0, ProbeResult::Passed);
            at.push(start.elapsed());
        }
        at
    }
    let a = times(5).await;
    assert_eq!(a[0], Duration::ZERO, "the first probe goes out at once");
    let gaps: Vec<Duration> = a.windows(2).map(|w| w[1] - w[0]).collect();
    for g in &gaps {
        assert!(
            (Duration::from_millis(7500)..=Duration::from_millis(12500)).contains(g),
            "{g:?}"
        );
    }
    assert!(
        gaps.iter().any(|g| *g < Duration::from_millis(9000)),
        "{gaps:?}"
    );
    assert!(
        gaps.iter().any(|g| *g > Duration::from_millis(11000)),
        "{gaps:?}"
    );
    assert_eq!(a, times(5).await, "the same seed, the same schedule");
    assert_ne!(a, times(6).await);
}

#[tokio::test(start_paused = true)]
async fn the_task_ends_with_the_layer_and_drops_the_probe_service() {
    let (layer, mut rx) = breaker();
    let handle = layer.handle();
    let dropped = Arc::new(AtomicBool::new(false));
    let probe_svc = Probe {
        status: StatusCode::SERVICE_UNAVAILABLE,
        dropped: dropped.clone(),
    };
    let check = HealthCheck::builder()
        .interval(Duration::from_secs(10))
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let task = handle.spawn_health_check(check, probe_svc);
    assert_eq!(probe(&mut rx).await.0, ProbeResult::Failed);
    // A service built by the layer keeps the circuits alive, and so the task.
    let svc = layer.layer(tower::service_fn(
        |_: Request<LayerBody<Empty<Bytes>>>| async {
            Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
        },
    ));
    drop(layer);
    drop(handle);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(!task.is_finished());
    assert!(!dropped.load(Ordering::SeqCst));
    assert_eq!(probe(&mut rx).await.0, ProbeResult::Failed);

    // The last holder goes: the task ends at its next wake-up, dropping the probe service.
    drop(svc);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(task.is_finished());
    assert!(dropped.load(Ordering::SeqCst));
}

#[tokio::test(start_paused = true)]
async fn dropping_the_task_stops_the_probes() {
    let (layer, mut rx) = breaker();
    let dropped = Arc::new(AtomicBool::new(false));
    let probe_svc = Probe {
        status: StatusCode::OK,
        dropped: dropped.clone(),
    };
    let check = HealthCheck::builder().build().unwrap();
    let task = layer.handle().spawn_health_check(check, probe_svc);
    assert_eq!(probe(&mut rx).await.0, ProbeResult::Passed);
    drop(task);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(dropped.load(Ordering::SeqCst));
    assert!(
        rx.try_recv().is_err(),
        "no probe after the task was dropped"
    );
}

#[tokio::test(start_paused = true)]
async fn a_refused_probe_is_inconclusive_and_moves_nothing() {
    let (layer, mut rx) = breaker();
    let handle = layer.handle();
    let check = HealthCheck::builder().failures_to_open(1).build().unwrap();
    for status in [
        StatusCode::UNAUTHORIZED,
        StatusCode::FORBIDDEN,
        StatusCode::NOT_FOUND,
    ] {
        let probe_svc = Probe {
            status,
            dropped: Arc::default(),
        };
        let task = handle.spawn_health_check(check.clone(), probe_svc);
        assert_eq!(
            probe(&mut rx).await,
            (
                ProbeResult::Inconclusive,
                Some(status.as_u16()),
                0,
                Duration::ZERO
            )
        );
        drop(task);
        assert_eq!(handle.state(SINGLE_KEY), Some(CircuitState::Closed));
    }
}

/// A probe service whose answer can be changed.
struct Switch(Arc<AtomicU16>);

impl tower::Service<Request<Empty<Bytes>>> for Switch {
    type Response = Response<Empty<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;
    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: Request<Empty<Bytes>>) -> Self::Future {
        let mut res = Response::new(Empty::new());
        *res.status_mut() = StatusCode::from_u16(self.0.load(Ordering::SeqCst)).unwrap();
        std::future::ready(Ok(res))
    }
}

#[tokio::test(start_paused = true)]
async fn a_failing_probe_reopens_a_half_open_circuit_and_a_forced_mode_is_left_alone() {
    let (layer, mut rx) = breaker();
    let handle = layer.handle();
    let status = Arc::new(AtomicU16::new(503));
    let check = HealthCheck::builder()
        .interval(Duration::from_secs(10))
        .timeout(Duration::from_secs(1))
        .failures_to_open(1)
        .build()
        .unwrap();
    let _task = handle.spawn_health_check(check, Switch(status.clone()));
    assert_eq!(
        transition(&mut rx).await.2,
        TransitionReason::HealthCheckFailed
    );
    status.store(200, Ordering::SeqCst);
    assert_eq!(
        transition(&mut rx).await,
        (
            CircuitState::Open,
            CircuitState::HalfOpen,
            TransitionReason::HealthCheckPassed
        )
    );
    // Half-open: one failing probe is enough, whatever `failures_to_open`.
    status.store(500, Ordering::SeqCst);
    assert_eq!(
        transition(&mut rx).await,
        (
            CircuitState::HalfOpen,
            CircuitState::Open,
            TransitionReason::HealthCheckFailed
        )
    );
    assert_eq!(handle.metrics(SINGLE_KEY).unwrap().openings, 2);

    // Forced closed by hand (disabled): failing probes report, and move nothing.
    handle.reset(SINGLE_KEY);
    assert_eq!(transition(&mut rx).await.2, TransitionReason::Reset);
    handle.set_mode_for(SINGLE_KEY, llm_layers::breaker::CircuitMode::Disabled);
    for _ in 0..3 {
        assert_eq!(probe(&mut rx).await.0, ProbeResult::Failed);
    }
    assert_eq!(handle.state(SINGLE_KEY), Some(CircuitState::Closed));
}

/// Probe results and the transitions they cause are metrics (feature `metrics`).
#[cfg(feature = "metrics")]
#[tokio::test(start_paused = true)]
async fn probe_results_and_their_transitions_are_counted() {
    use llm_layers::metrics::{BREAKER_HEALTH_CHECKS, BREAKER_TRANSITIONS};
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    // The probe task runs on this thread (a current-thread runtime), under this recorder.
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);
    let _hold = HoldClock::new();
    let up = upstream(503).await;
    let base = format!("http://{}", up.addr);
    let (layer, mut rx) = breaker();
    let _task = layer
        .handle()
        .spawn_health_check(check(&base), common_hyper::client::<Empty<Bytes>>());
    for n in 1..=3 {
        if n > 1 {
            advance(Duration::from_secs(11)).await;
        }
        assert_eq!(probe(&mut rx).await.0, ProbeResult::Failed);
    }
    transition(&mut rx).await;
    up.status.store(200, Ordering::SeqCst);
    advance(Duration::from_secs(11)).await;
    assert_eq!(probe(&mut rx).await.0, ProbeResult::Passed);
    transition(&mut rx).await;

    let snapshot = snapshotter.snapshot().into_vec();
    let count = |name: &str, labels: &[(&str, &str)]| {
        snapshot.iter().find_map(|(key, _, _, value)| {
            let key = key.key();
            let same = key.name() == name
                && key.labels().count() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| key.labels().any(|l| l.key() == *k && l.value() == *v));
            match (same, value) {
                (true, DebugValue::Counter(n)) => Some(*n),
                _ => None,
            }
        })
    };
    let name = ("name", "probe-test");
    assert_eq!(
        count(BREAKER_HEALTH_CHECKS, &[name, ("result", "failed")]),
        Some(3)
    );
    assert_eq!(
        count(BREAKER_HEALTH_CHECKS, &[name, ("result", "passed")]),
        Some(1)
    );
    let moved = |from, to, reason| {
        count(
            BREAKER_TRANSITIONS,
            &[name, ("from", from), ("to", to), ("reason", reason)],
        )
    };
    assert_eq!(moved("closed", "open", "health_check_failed"), Some(1));
    assert_eq!(moved("open", "half_open", "health_check_passed"), Some(1));
}
