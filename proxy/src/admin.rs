//! Admin HTTP endpoints: Prometheus `/metrics`, liveness `/healthz`, readiness `/readyz`, and
//! the games behind a token-routing proxy, `/games` (JSON).
//!
//! These run on the control thread, apart from the data plane, and need one descriptor per
//! connection: the session limit keeps [`spotable_edge::fds::FD_RESERVE`] free for them.

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
    /// Per-replica counts.
    pub replica_stats: Arc<crate::replica_stats::Registry>,
    /// Time-in-proxy histograms.
    pub transit: Arc<crate::transit::Registry>,
    /// How finely the replicas' lag histogram is broken down.
    pub lag_histogram: crate::replica_stats::LagHistogram,
    /// The counters of the implicit game (a proxy without token routing)…
    pub implicit_game: Arc<crate::replicas::GameCounters>,
    /// …and its settings (the proxy's).
    pub settings: Arc<crate::session::Settings>,
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
        .route("/games", get(games))
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
    metrics::gauge!(names::GAMES).set(snapshot.games.len() as f64);
    metrics::gauge!(names::SESSION_LIMIT).set(state.session_limit as f64);
    metrics::gauge!(names::WORKERS_UP).set(state.health.workers_up() as f64);
    let (front, rcvbuf) = crate::kernel::read(&state.front_inodes);
    metrics::counter!(names::FRONT_KERNEL_DROPS).absolute(front);
    metrics::counter!(names::UDP_RCVBUF_ERRORS).absolute(rcvbuf);
    let mut text = spotable_edge::render(&state.metrics);
    text.push_str(&state.replica_stats.render(
        &snapshot,
        std::time::Instant::now(),
        state.lag_histogram,
    ));
    text.push_str(&state.transit.render());
    text.push_str(&crate::game_stats::render(&snapshot, &state.implicit_game));
    text
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

/// `GET /games`: every game, its tokens redacted to a prefix (a token is a player's ticket
/// to a match), its replicas and their states, and its traffic as of the workers' last tick.
/// A proxy without token routing shows its one implicit game, named `""`.
async fn games(State(state): State<AdminState>) -> axum::Json<GamesView> {
    let snapshot = state.replicas.snapshot();
    let view = |name: &str,
                tokens: &[Vec<u8>],
                settings: &crate::session::Settings,
                replicas: &crate::replicas::Snapshot,
                counters: &crate::replicas::GameCounters| {
        let t = counters.read();
        let divergent = counters.is_divergent();
        GameView {
            name: name.to_string(),
            tokens: tokens.iter().map(|t| crate::token::redacted(t)).collect(),
            dedupe: settings.mode.name().into(),
            effective_dedupe: if divergent {
                "primary"
            } else {
                settings.mode.name()
            }
            .into(),
            divergent,
            fanout: settings.fanout,
            replicas: replicas
                .replicas
                .iter()
                .map(|r| ReplicaView {
                    address: r.addr.to_string(),
                    state: r.state.as_str().into(),
                })
                .collect(),
            sessions: counters.sessions() as u64,
            max_sessions: settings.max_sessions,
            max_pps: settings.max_pps.map(|r| r.per_second),
            packets: t.packets,
            delivered: t.delivered,
            drops: t.drops,
            promoted: t.promoted,
            demoted: t.demoted,
        }
    };
    let games = if snapshot.games.is_empty() {
        vec![view(
            "",
            &[],
            &state.settings,
            &snapshot,
            &state.implicit_game,
        )]
    } else {
        snapshot
            .games
            .iter()
            .map(|g| view(&g.name, &g.tokens, &g.settings, &g.replicas, &g.counters))
            .collect()
    };
    axum::Json(GamesView {
        version: snapshot.version,
        synced: state.replicas.is_synced(),
        games,
    })
}

/// The body of `GET /games`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct GamesView {
    /// The replica set's version (increases with every change).
    pub version: u64,
    /// Whether a complete set has been received from the source.
    pub synced: bool,
    /// The games, by name.
    pub games: Vec<GameView>,
}

/// One game in `GET /games`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct GameView {
    /// Its name.
    pub name: String,
    /// Its tokens, redacted to a prefix and a length.
    pub tokens: Vec<String>,
    /// Its dedupe mode, as configured.
    pub dedupe: std::borrow::Cow<'static, str>,
    /// The mode its new sessions start in: `primary` while it is divergent.
    pub effective_dedupe: std::borrow::Cow<'static, str>,
    /// Its replicas were seen to answer in two worlds (and have not all been replaced since).
    pub divergent: bool,
    /// Replicas per session.
    pub fanout: usize,
    /// Its replicas.
    pub replicas: Vec<ReplicaView>,
    /// Sessions open now.
    pub sessions: u64,
    /// Most sessions it may hold (`max_sessions`); `null` for no limit of its own.
    pub max_sessions: Option<usize>,
    /// Its packet budget, datagrams per second (`max_pps`); `null` for none.
    pub max_pps: Option<u32>,
    /// Client datagrams routed to it.
    pub packets: u64,
    /// Answers delivered to its players.
    pub delivered: u64,
    /// Its players' datagrams dropped after routing (rate, budget, session limits, no
    /// replica).
    pub drops: u64,
    /// Sessions that began to trust a second replica.
    pub promoted: u64,
    /// Sessions that fell back to one replica because its replicas diverged.
    pub demoted: u64,
}

/// One replica in `GET /games`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ReplicaView {
    /// `IP:port`.
    pub address: String,
    /// `ready` or `draining`.
    pub state: std::borrow::Cow<'static, str>,
}
