//! `GET /metrics`: the layers' metrics (`llm_layers::metrics`) in the Prometheus text format,
//! through `metrics-exporter-prometheus`.
//!
//! The gateway installs the Prometheus recorder as the process's recorder at start
//! ([`install`]), before any layer records; the route renders it through its handle. The route
//! sits outside the per-route stacks: no key, no limits, as Prometheus scrapes it. Expose it
//! on an internal address only.

use std::time::Duration;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use llm_layers::metrics::{OPERATION_DURATION, RATE_LIMIT_WAIT, RETRY_ATTEMPTS, TOKEN_USAGE};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

/// The Prometheus text format's content type.
pub const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The exporter's settings: the layers' histograms as Prometheus histograms with buckets that
/// fit them (attempts per request, tokens per answer, seconds of a rate-limit wait, seconds of
/// a call upstream: the OpenTelemetry GenAI conventions' advised buckets).
fn builder() -> PrometheusBuilder {
    let buckets: [(&str, &[f64]); 4] = [
        (RETRY_ATTEMPTS, &[1.0, 2.0, 3.0, 5.0, 10.0]),
        (
            TOKEN_USAGE,
            &[
                16.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0,
            ],
        ),
        (RATE_LIMIT_WAIT, &[0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 30.0]),
        (
            OPERATION_DURATION,
            &[
                0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96,
                81.92,
            ],
        ),
    ];
    buckets
        .into_iter()
        .fold(PrometheusBuilder::new(), |b, (name, values)| {
            b.set_buckets_for_metric(Matcher::Full(name.to_owned()), values)
                .expect("bucket lists are not empty")
        })
}

/// A Prometheus recorder, not installed: for tests, which install it for their own thread only
/// (`metrics::set_default_local_recorder`).
#[allow(dead_code)] // the tests'
pub fn recorder() -> PrometheusRecorder {
    builder().build_recorder()
}

/// Installs a Prometheus recorder as the process's global recorder and returns its handle.
/// Histograms are drained every 5 s by a task of the current runtime, so their memory stays
/// bounded between scrapes. Fails when a recorder is already installed.
#[allow(dead_code)] // the tests use `recorder`
pub fn install() -> Result<PrometheusHandle, String> {
    let handle = builder()
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// The `GET /metrics` route over `handle`, to merge into the gateway's router.
pub fn router(handle: PrometheusHandle) -> Router {
    Router::new()
        .route("/metrics", get(render))
        .with_state(handle)
}

async fn render(State(handle): State<PrometheusHandle>) -> impl IntoResponse {
    ([(CONTENT_TYPE, CONTENT_TYPE_TEXT)], handle.render())
}
