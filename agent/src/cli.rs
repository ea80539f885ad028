//! The `spotable-agent` binary's edge: flags, clients, admin endpoints, signals.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use axum::routing::get;
use clap::Parser;

use crate::agent::{Agent, AgentConfig};
use crate::drain::{self, Drainer};
use crate::imds::{Imds, ImdsConfig};
use crate::inventory::Publisher;
use crate::notice::Action;
use spotable_edge::LogFormat;

/// `spotable-agent` command line.
#[derive(Debug, Parser)]
#[command(
    name = "spotable-agent",
    version,
    about = "Spot interruption agent: on a notice from instance metadata, tells the inventory \
             queue, cordons the node and drains its pods before the deadline.",
    after_help = "Durations take units: 500ms, 2s, 1m. SQS settings follow the AWS SDK \
                  (AWS_REGION, credentials, AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_SQS); Kubernetes \
                  access is in-cluster or KUBECONFIG."
)]
pub struct Args {
    /// This node's Kubernetes name (from the downward API in a DaemonSet).
    #[arg(long, env = "NODE_NAME", value_name = "NODE")]
    pub node_name: String,
    /// Instance metadata base URL.
    #[arg(long, default_value = "http://169.254.169.254", value_name = "URL", value_parser = http_url)]
    pub imds_endpoint: String,
    /// Inventory queue (SQS); without it nothing is published.
    #[arg(long, env = "QUEUE_URL", value_name = "URL", value_parser = http_url)]
    pub queue_url: Option<String>,
    /// How often instance metadata is polled.
    #[arg(long, default_value = "2s", value_name = "DURATION", value_parser = positive_duration)]
    pub poll_interval: Duration,
    /// What a rebalance recommendation leads to.
    #[arg(long, default_value = "cordon", value_name = "ignore|cordon|drain")]
    pub rebalance: Action,
    /// Longest a drain may take (a spot notice's own deadline applies when sooner).
    #[arg(long, default_value = "110s", value_name = "DURATION", value_parser = positive_duration)]
    pub drain_timeout: Duration,
    /// Act on scheduled maintenance once it is this close.
    #[arg(long, default_value = "10m", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub maintenance_lead: Duration,
    /// Log what would be done; change nothing, publish nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// HTTP address for /metrics and /healthz [default: off].
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<SocketAddr>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter (tracing `EnvFilter` syntax; RUST_LOG wins when set).
    #[arg(long, default_value = "info", value_name = "FILTER")]
    pub log_level: String,
}

fn http_url(s: &str) -> Result<String, String> {
    if s.starts_with("http://") || s.starts_with("https://") {
        Ok(s.trim_end_matches('/').to_string())
    } else {
        Err("must be an http:// or https:// URL".into())
    }
}

fn positive_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

/// Runs the agent binary.
pub fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => return ExitCode::from(spotable_edge::clap_exit("spotable-agent", &e)),
    };
    if let Err(e) = spotable_edge::init_logging(args.log_format, &args.log_level) {
        eprintln!("spotable-agent: {e}");
        return ExitCode::from(2);
    }
    spotable_edge::block_on("spotable-agent", async { run(args).await.map(|()| 0) })
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let metrics = spotable_edge::install_metrics()?;
    crate::agent::describe_metrics();
    let kube_config = kube::Config::infer()
        .await
        .map_err(|e| format!("cannot find Kubernetes settings (in-cluster or KUBECONFIG): {e}"))?;
    let client = drain::client(kube_config)?;
    let imds = Imds::new(ImdsConfig {
        endpoint: args.imds_endpoint.clone(),
        ..ImdsConfig::default()
    })?;
    let publisher = match &args.queue_url {
        Some(url) => Some(Publisher::from_env(url.clone()).await),
        None => {
            tracing::warn!("no --queue-url: interruptions will not be published");
            None
        }
    };
    let admin = match args.admin {
        Some(addr) => {
            let router = axum::Router::new()
                .route(
                    "/metrics",
                    get(move || std::future::ready(spotable_edge::render(&metrics))),
                )
                .route("/healthz", get(|| async { "ok\n" }));
            Some(spotable_edge::serve(addr, router).await?.1)
        }
        None => None,
    };
    let agent = Agent::new(
        AgentConfig {
            node: args.node_name.clone(),
            rebalance: args.rebalance,
            drain_timeout: args.drain_timeout,
            dry_run: args.dry_run,
            publish_timeout: Duration::from_secs(2),
            maintenance_lead: args.maintenance_lead,
        },
        imds,
        publisher,
        Drainer::new(client, args.node_name.clone(), args.dry_run),
    );
    tracing::info!(
        node = args.node_name,
        imds = args.imds_endpoint,
        dry_run = args.dry_run,
        "watching for interruption notices"
    );
    let mut signals = spotable_edge::Signals::new()?;
    tokio::select! {
        () = agent.run(args.poll_interval) => {}
        signal = signals.next() => tracing::info!(signal, "stopping"),
    }
    if let Some(task) = admin {
        task.abort();
    }
    Ok(())
}
