//! Admin HTTP endpoints: Prometheus `/metrics`, liveness `/healthz`, readiness `/readyz`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::replicas::{ReplicaSet, ReplicaState};
use crate::stats::names;

/// What the endpoints report on.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// Renders the recorder.
    pub metrics: PrometheusHandle,
    /// The replica set, for gauges and readiness.
    pub replicas: ReplicaSet,
    /// Open sessions (read at scrape time).
    pub sessions: Arc<AtomicUsize>,
    /// Set when shutdown begins: readiness turns false so load balancers move on.
    pub stopping: Arc<AtomicBool>,
}

impl AdminState {
    /// Ready when a complete replica set is known, it is not empty, and we are not stopping.
    pub fn is_ready(&self) -> bool {
        !self.stopping.load(Ordering::Acquire)
            && self.replicas.is_synced()
            && !self.replicas.snapshot().replicas.is_empty()
    }
}

/// The admin routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(state): State<AdminState>) -> String {
    // Gauges are sampled at scrape time: nothing on the data path keeps them current.
    metrics::gauge!(names::SESSIONS).set(state.sessions.load(Ordering::Acquire) as f64);
    let snapshot = state.replicas.snapshot();
    for s in [ReplicaState::Ready, ReplicaState::Draining] {
        metrics::gauge!(names::REPLICAS, "state" => s.as_str()).set(snapshot.count(s) as f64);
    }
    if let Some(at) = state.replicas.last_sync() {
        metrics::gauge!(names::SYNC_AGE).set(at.elapsed().as_secs_f64());
    }
    spotable_edge::render(&state.metrics)
}

async fn readyz(State(state): State<AdminState>) -> (StatusCode, &'static str) {
    if state.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}
