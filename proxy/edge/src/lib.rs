//! The process edge every Spotable binary shares: log setup, stop signals, the admin HTTP
//! listener, the Prometheus recorder and the open-file limit. One implementation, so the
//! binaries behave alike.

pub mod fds;

use std::net::SocketAddr;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// Log output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Problems at the edge.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// The log filter does not parse.
    #[error("log_level: {0}")]
    LogFilter(String),
    /// The metrics recorder could not be installed (one per process).
    #[error("cannot install the metrics recorder: {0}")]
    Metrics(String),
    /// Signal handlers could not be set up.
    #[error("cannot watch {0}: {1}")]
    Signal(&'static str, std::io::Error),
}

/// Logs to stderr in `format`, filtered by `RUST_LOG` when set, else by `level`.
pub fn init_logging(format: LogFormat, level: &str) -> Result<(), EdgeError> {
    use std::io::IsTerminal;
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.is_empty() => EnvFilter::try_new(env),
        _ => EnvFilter::try_new(level),
    }
    .map_err(|e| EdgeError::LogFilter(e.to_string()))?;
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

/// Installs the Prometheus recorder for `program`; its handle renders `/metrics`.
pub fn install_metrics(program: &'static str) -> Result<PrometheusHandle, EdgeError> {
    install_metrics_with_buckets(program, &[])
}

/// [`install_metrics`], rendering the named histograms with these bucket bounds (the others
/// as summaries). Registers `spotable_build_info{program, version} 1`, so a dashboard can
/// tell which build each process runs.
pub fn install_metrics_with_buckets(
    program: &'static str,
    buckets: &[(&str, &[f64])],
) -> Result<PrometheusHandle, EdgeError> {
    use metrics_exporter_prometheus::Matcher;
    let mut builder = PrometheusBuilder::new();
    for (name, bounds) in buckets {
        builder = builder
            .set_buckets_for_metric(Matcher::Full((*name).to_string()), bounds)
            .map_err(|e| EdgeError::Metrics(e.to_string()))?;
    }
    let handle = builder
        .install_recorder()
        .map_err(|e| EdgeError::Metrics(e.to_string()))?;
    metrics::describe_gauge!(
        BUILD_INFO,
        "Always 1; the labels say which program and version this process runs"
    );
    metrics::gauge!(BUILD_INFO, "program" => program, "version" => env!("CARGO_PKG_VERSION"))
        .set(1.0);
    Ok(handle)
}

/// The series naming the build.
pub const BUILD_INFO: &str = "spotable_build_info";

/// Renders the recorder for a scrape.
pub fn render(handle: &PrometheusHandle) -> String {
    handle.run_upkeep();
    handle.render()
}

/// Binds `addr` and serves `router` until the returned task is aborted.
pub async fn serve(
    addr: SocketAddr,
    router: axum::Router,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "admin server failed");
        }
    });
    tracing::info!(addr = %local, "admin listening");
    Ok((local, task))
}

/// SIGTERM and SIGINT, as a stream.
#[derive(Debug)]
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Starts watching both.
    pub fn new() -> Result<Self, EdgeError> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate()).map_err(|e| EdgeError::Signal("SIGTERM", e))?,
            int: signal(SignalKind::interrupt()).map_err(|e| EdgeError::Signal("SIGINT", e))?,
        })
    }

    /// The next one, by name.
    pub async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Runs `main` on a current-thread runtime and turns its outcome into the process exit code:
/// `Ok(code)` exits with `code` (clamped to 0..=255), an error is logged, printed as one line
/// prefixed by `program`, and exits 1.
pub fn block_on<E: std::fmt::Display>(
    program: &str,
    main: impl std::future::Future<Output = Result<i32, E>>,
) -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{program}: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main) {
        Ok(code) => std::process::ExitCode::from(u8::try_from(code.clamp(0, 255)).unwrap_or(1)),
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("{program}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Prints a clap parse failure as one line (or the help text) and gives the exit code:
/// 0 for `--help` / `--version`, 2 for bad arguments.
pub fn clap_exit(program: &str, e: &clap::Error) -> u8 {
    if !e.use_stderr() {
        let _ = e.print();
        return 0;
    }
    eprintln!("{program}: {}", clap_line(e));
    2
}

/// clap's error as one line: its first paragraph names the problem and the argument (a
/// missing argument is on its second line); its tips ("a similar argument exists:
/// '--max-sessions'") follow after `; `. Usage and `--help` hints are left out.
pub fn clap_line(e: &clap::Error) -> String {
    let text = e.to_string();
    let mut parts: Vec<String> = vec![
        text.lines()
            .take_while(|l| !l.trim().is_empty())
            .map(str::trim)
            .collect::<Vec<_>>()
            .join(" ")
            .trim_start_matches("error: ")
            .to_string(),
    ];
    parts.extend(
        text.lines()
            .map(str::trim)
            .filter(|l| l.starts_with("tip:"))
            .map(str::to_string),
    );
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn clap_errors_keep_their_suggestions_on_one_line() {
        let cmd = clap::Command::new("x").arg(clap::Arg::new("max-sessions").long("max-sessions"));
        let e = cmd
            .try_get_matches_from(["x", "--max-sesions", "3"])
            .expect_err("unknown flag");
        let line = super::clap_line(&e);
        assert!(!line.contains('\n'), "{line}");
        assert!(
            line.starts_with("unexpected argument '--max-sesions'"),
            "{line}"
        );
        assert!(
            line.ends_with("tip: a similar argument exists: '--max-sessions'"),
            "{line}"
        );
    }
}
