//! The `spotable-proxy` binary's edge: flags, logging, signals, exit codes.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use clap::Parser;
use metrics_exporter_prometheus::PrometheusBuilder;
use tracing_subscriber::EnvFilter;

use crate::admin::{self, AdminState};
use crate::config::{Args, Config, LogFormat, ReplicaSource};
use crate::discovery::kubernetes;
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
    let args = match Args::try_parse_from(argv) {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("spotable-proxy: {}", first.trim_start_matches("error: "));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let config = match Config::load(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("spotable-proxy: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Err(e) = init_logging(config.log_format, &config.log_level) {
        eprintln!("spotable-proxy: log_level: {e}");
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

fn init_logging(format: LogFormat, level: &str) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.is_empty() => EnvFilter::try_new(env)?,
        _ => EnvFilter::try_new(level)?,
    };
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}

fn run(config: Config) -> anyhow::Result<()> {
    let metrics = PrometheusBuilder::new()
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    stats::describe();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("spotable-control")
        .build()
        .context("cannot start the control runtime")?;
    let replicas = ReplicaSet::new();
    let stopping = Arc::new(AtomicBool::new(false));
    runtime.block_on(async {
        let discovery = match &config.replicas {
            ReplicaSource::Static(list) => {
                replicas.publish(list.iter().copied().map(Replica::ready).collect());
                tracing::info!(replicas = ?list, "static replica set");
                None
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
                };
                let (local, task) = admin::serve(addr, state)
                    .await
                    .with_context(|| format!("cannot serve admin on {addr}"))?;
                tracing::info!(addr = %local, "admin listening");
                Some(task)
            }
            None => None,
        };
        let mut signals = Signals::new()?;
        let signal = signals.next().await;
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
        anyhow::Ok(())
    })?;
    tracing::info!("stopped");
    Ok(())
}

/// SIGTERM and SIGINT, as a stream.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("cannot watch SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot watch SIGINT")?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
