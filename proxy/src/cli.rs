//! The `spotable-proxy` binary's edge: flags, logging, signals, exit codes.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;

use crate::admin::{self, AdminState};
use crate::config::{Args, Config, LoadError, ReplicaSource};
use crate::discovery::{agones, kubernetes};
use crate::replicas::{Replica, ReplicaSet};
use crate::server::Proxy;
use crate::stats;

/// Exit code for bad flags or configuration (as clap uses).
pub const EXIT_USAGE: u8 = 2;

/// Runs the proxy binary: parse, configure, serve until SIGTERM/SIGINT.
pub fn main() -> ExitCode {
    main_from(std::env::args_os())
}

/// [`main`] with explicit arguments (the first is the program name), so other binaries, such
/// as the demo, can run the very same proxy.
pub fn main_from(argv: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    let args = match Args::parse_layers(argv) {
        Ok(a) => a,
        Err(LoadError::Flags(e)) => {
            return ExitCode::from(spotable_edge::clap_exit("spotable-proxy", &e));
        }
        Err(LoadError::Config(e)) => {
            eprintln!("spotable-proxy: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let config = match Config::resolve(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("spotable-proxy: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Err(e) = spotable_edge::init_logging(config.log_format, &config.log_level) {
        eprintln!("spotable-proxy: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("spotable-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: Config) -> anyhow::Result<()> {
    // Every session holds a socket, and the common soft default (1024) is far below a proxy's
    // needs: up to the hard limit.
    spotable_edge::fds::raise_limit();
    let metrics = spotable_edge::install_metrics("spotable-proxy")?;
    stats::describe();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("spotable-control")
        .build()
        .context("cannot start the control runtime")?;
    let replicas = ReplicaSet::new();
    let stopping = Arc::new(AtomicBool::new(false));
    runtime.block_on(async {
        // Before anything is announced: a SIGTERM that comes as soon as the admin listener
        // answers must start the drain, not kill the process with the default action.
        let mut signals = spotable_edge::Signals::new()?;
        let discovery = match &config.replicas {
            ReplicaSource::Static(list) => {
                replicas.publish(list.iter().copied().map(Replica::ready).collect());
                tracing::info!(replicas = ?list, "static replica set");
                None
            }
            ReplicaSource::Games { spec, games } => {
                replicas
                    .publish_games(*spec, games.clone())
                    .context("the games' tokens")?;
                for g in games {
                    tracing::info!(
                        game = %g.name,
                        tokens = g.tokens.len(),
                        replicas = g.replicas.len(),
                        "static game"
                    );
                }
                None
            }
            ReplicaSource::KubernetesGames(watch) => {
                let client = kubernetes::client().await?;
                Some(tokio::spawn(kubernetes::run_services(
                    client,
                    watch.clone(),
                    replicas.clone(),
                )))
            }
            ReplicaSource::AgonesGames(watch) => {
                let client = kubernetes::client().await?;
                Some(tokio::spawn(agones::run(
                    client,
                    watch.clone(),
                    replicas.clone(),
                )))
            }
            ReplicaSource::Kubernetes(source) => {
                let client = kubernetes::client().await?;
                Some(tokio::spawn(kubernetes::run(
                    client,
                    source.clone(),
                    replicas.clone(),
                )))
            }
        };
        let proxy = Proxy::start(config.proxy.clone(), replicas.clone())?;
        let admin_task = match config.admin {
            Some(addr) => {
                let state = AdminState {
                    metrics,
                    replicas: replicas.clone(),
                    sessions: proxy.session_counter(),
                    stopping: stopping.clone(),
                    health: proxy.health(),
                    session_limit: proxy.session_limit(),
                    front_inodes: proxy.front_inodes().into(),
                    replica_stats: proxy.replica_stats(),
                    transit: proxy.transit(),
                    lag_histogram: config.lag_histogram,
                    implicit_game: proxy.implicit_game(),
                    settings: Arc::new(config.proxy.settings.clone()),
                };
                let (_, task) = spotable_edge::serve(addr, admin::router(state))
                    .await
                    .with_context(|| format!("cannot serve admin on {addr}"))?;
                Some(task)
            }
            None => None,
        };
        let health = proxy.health();
        // A lost worker ends the process (after the drain delay, with /healthz failing) so
        // that Kubernetes restarts it: its players would otherwise be rehashed as strangers.
        let (signal, failure) = tokio::select! {
            signal = signals.next() => (signal, None),
            why = health.failed() => ("worker failure", Some(why)),
        };
        stopping.store(true, Ordering::Release);
        if !config.drain_delay.is_zero() {
            tracing::info!(signal, delay = ?config.drain_delay, "draining: not ready, still forwarding");
            tokio::select! {
                _ = tokio::time::sleep(config.drain_delay) => {}
                again = signals.next() => tracing::info!(signal = again, "drain cut short"),
            }
        }
        tracing::info!(signal, "shutting down");
        for task in admin_task.into_iter().chain(discovery) {
            task.abort();
        }
        proxy.shutdown()?;
        match failure {
            Some(why) => Err(anyhow::anyhow!("data plane failed: {why}")),
            None => anyhow::Ok(()),
        }
    })?;
    tracing::info!("stopped");
    Ok(())
}
