//! The `spotable-agent` binary's edge: flags, clients, admin endpoints, signals.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use axum::routing::get;
use clap::Parser;

use crate::agent::{Agent, AgentConfig};
use crate::drain::{self, Drainer};
use crate::queue::{QueueAgent, QueueConfig};
use crate::respond::{Policy, Responder, Webhook};
use spotable_edge::LogFormat;
use spotable_fleet::imds::{Imds, ImdsConfig};
use spotable_fleet::inventory::Publisher;
use spotable_fleet::notice::Action;

/// `spotable-agent` command line.
#[derive(Debug, Parser)]
#[command(
    name = "spotable-agent",
    version,
    about = "Spot interruption agent: on a notice, tells the inventory queue, cordons the node \
             and drains its pods before the deadline. Notices come from the node's instance \
             metadata (a DaemonSet with --node-name) or, for the whole cluster, from an \
             EventBridge interruption queue (a Deployment with --interruption-queue-url).",
    after_help = "Durations take units: 500ms, 2s, 1m. SQS settings follow the AWS SDK \
                  (AWS_REGION, credentials, AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_SQS); Kubernetes \
                  access is in-cluster or KUBECONFIG."
)]
pub struct Args {
    /// This node's Kubernetes name (from the downward API in a DaemonSet): IMDS mode.
    #[arg(
        long,
        env = "NODE_NAME",
        value_name = "NODE",
        required_unless_present = "interruption_queue_url"
    )]
    pub node_name: Option<String>,
    /// Queue mode: read interruption events (EventBridge rules to SQS) for every node of the
    /// cluster from this queue, instead of polling instance metadata.
    #[arg(long, value_name = "URL", value_parser = http_url, conflicts_with = "node_name")]
    pub interruption_queue_url: Option<String>,
    /// Post a JSON summary of every handled notice to this URL (Slack, PagerDuty…).
    #[arg(long, value_name = "URL", value_parser = http_url)]
    pub webhook_url: Option<String>,
    /// Time a webhook post may take; it never holds up the drain.
    #[arg(long, default_value = "5s", value_name = "DURATION", value_parser = positive_duration)]
    pub webhook_timeout: Duration,
    /// This agent's pod name, reported as the source of Kubernetes Events.
    #[arg(
        long,
        env = "POD_NAME",
        default_value = "spotable-agent",
        value_name = "NAME"
    )]
    pub pod_name: String,
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
    let metrics = spotable_edge::install_metrics_with_buckets(
        "spotable-agent",
        &[(
            crate::metrics::names::DRAIN_SECONDS,
            &crate::metrics::DRAIN_BUCKETS,
        )],
    )?;
    crate::metrics::describe();
    let kube_config = kube::Config::infer()
        .await
        .map_err(|e| format!("cannot find Kubernetes settings (in-cluster or KUBECONFIG): {e}"))?;
    let client = drain::client(kube_config)?;
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
    let policy = Policy {
        rebalance: args.rebalance,
        drain_timeout: args.drain_timeout,
        dry_run: args.dry_run,
        publish_timeout: Duration::from_secs(2),
    };
    let mut responder =
        Responder::new(policy, publisher).with_events(client.clone(), &args.pod_name);
    if let Some(url) = &args.webhook_url {
        responder = responder.with_webhook(Webhook::new(url.clone(), args.webhook_timeout)?);
    }
    let work: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
        match (&args.interruption_queue_url, &args.node_name) {
            (Some(url), _) => {
                let queue = QueueAgent::new(
                    QueueConfig::new(url.clone()),
                    spotable_fleet::inventory::sqs_client().await,
                    crate::queue::autoscaling_client().await,
                    client,
                    responder,
                );
                tracing::info!(
                    queue = url,
                    dry_run = args.dry_run,
                    "reading the interruption queue"
                );
                Box::pin(queue.run())
            }
            (None, Some(node)) => {
                let imds = Imds::new(ImdsConfig {
                    endpoint: args.imds_endpoint.clone(),
                    ..ImdsConfig::default()
                })?;
                let config = AgentConfig {
                    node: node.clone(),
                    policy: responder.policy().clone(),
                    maintenance_lead: args.maintenance_lead,
                };
                let drainer = Drainer::new(client, node.clone(), args.dry_run);
                let agent = Agent::with_responder(config, imds, responder, drainer);
                tracing::info!(
                    node,
                    imds = args.imds_endpoint,
                    dry_run = args.dry_run,
                    "watching for interruption notices"
                );
                Box::pin(agent.run(args.poll_interval))
            }
            (None, None) => {
                return Err("--node-name or --interruption-queue-url is required".into());
            }
        };
    let mut signals = spotable_edge::Signals::new()?;
    tokio::select! {
        () = work => {}
        signal = signals.next() => tracing::info!(signal, "stopping"),
    }
    if let Some(task) = admin {
        task.abort();
    }
    Ok(())
}
