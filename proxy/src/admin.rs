//! Admin HTTP endpoints: Prometheus `/metrics`, liveness `/healthz`, readiness `/readyz`.
//!
//! These run on the control thread, apart from the data plane, and need one descriptor per
//! connection: the session limit keeps [`crate::server::FD_RESERVE`] free for them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::replicas::{ReplicaSet, ReplicaState};
use crate::server::Health;
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
    /// The data plane's health: liveness fails once a worker is lost.
    pub health: Arc<Health>,
    /// Sessions allowed at once.
    pub session_limit: usize,
    /// Front socket inodes, for their kernel drop counters.
    pub front_inodes: Arc<[u64]>,
}

impl AdminState {
    /// Ready when a complete replica set is known, it is not empty, and we are not stopping.
    pub fn is_ready(&self) -> bool {
        !self.stopping.load(Ordering::Acquire)
            && self.health.failure().is_none()
            && self.replicas.is_synced()
            && !self.replicas.snapshot().replicas.is_empty()
    }
}

/// The admin routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
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
    if let Some(age) = state.replicas.sync_age(std::time::Instant::now()) {
        metrics::gauge!(names::SYNC_AGE).set(age.as_secs_f64());
    }
    metrics::gauge!(names::SESSION_LIMIT).set(state.session_limit as f64);
    metrics::gauge!(names::WORKERS_UP).set(state.health.workers_up() as f64);
    let (front, rcvbuf) = crate::kernel::read(&state.front_inodes);
    metrics::counter!(names::FRONT_KERNEL_DROPS).absolute(front);
    metrics::counter!(names::UDP_RCVBUF_ERRORS).absolute(rcvbuf);
    spotable_edge::render(&state.metrics)
}

async fn healthz(State(state): State<AdminState>) -> (StatusCode, String) {
    match state.health.failure() {
        None => (StatusCode::OK, "ok\n".into()),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("failed: {why}\n")),
    }
}

async fn readyz(State(state): State<AdminState>) -> (StatusCode, &'static str) {
    if state.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}
