//! The `spotable-wrapper` binary: run a game server (or prepare one, as an init container).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use clap::{Args as ClapArgs, Parser, Subcommand};
use spotable_edge::LogFormat;
use spotable_fleet::imds::{Identity, Imds, ImdsConfig};
use spotable_fleet::inventory::{Message, Status};

use crate::expand;
use crate::ports::{self, Allocation, PortRange, PortSpec};
use crate::report::{Outbox, ServerInfo};
use crate::supervise::{self, Supervisor};

/// `spotable-wrapper` command line.
#[derive(Debug, Parser)]
#[command(
    name = "spotable-wrapper",
    version,
    args_conflicts_with_subcommands = true,
    about = "Launches a game server: race-free ports, public address, inventory messages, PID-1 \
             duty (signals to the process group, reaping, grace then SIGKILL, exit codes).",
    after_help = "Run mode: spotable-wrapper [FLAGS] -- COMMAND [ARGS...]. The game gets \
                  SPOTABLE_PORT_<NAME> for every port and SERVER_PORT / RCON_PORT / QUERY_PORT \
                  for the ports named game (or server), rcon and query; `$NAME` or `${NAME}` of \
                  these in the game's arguments is replaced by the port."
)]
pub struct Cli {
    #[command(subcommand)]
    sub: Option<Sub>,
    #[command(flatten)]
    common: Common,
    /// The game server and its arguments (after `--`).
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// Init-container mode: allocate ports, write them as an env file, publish `init`, exit.
    Init {
        /// Where to write `NAME=VALUE` lines for the game container.
        #[arg(long, value_name = "PATH")]
        env_file: PathBuf,
        #[command(flatten)]
        common: Box<Common>,
    },
    /// The identity anchor: reads the PROXY v2 header proxies put before each datagram
    /// (`--replica-header proxy-v2`) and gives the game one stable peer per player,
    /// whichever proxy carries the player. Run it beside the game, in its pod.
    Anchor(AnchorArgs),
    /// A landing pad: runs no game, waits for one moved off a reclaimed node (a wrapper with
    /// --migrate) on its migration port, restores it with CRIU and supervises it as the run
    /// mode would. Prints `listening ADDR` once it waits.
    Land {
        #[command(flatten)]
        land: crate::migrate::land::LandArgs,
        #[command(flatten)]
        common: Box<Common>,
    },
    /// Reads the inventory queue and prints the live fleet: status, game, address, node, age.
    /// It consumes the queue and keeps the fleet in --state, so every run shows all of it;
    /// with --peek it leaves the messages for the queue's real consumer (a matchmaker).
    Inventory {
        /// The inventory queue.
        #[arg(long, env = "QUEUE_URL", value_name = "URL")]
        queue_url: String,
        /// Keep reading and reprint every few seconds.
        #[arg(long)]
        watch: bool,
        /// Do not delete: read with a 1 s visibility timeout, so every message returns to
        /// the queue for its consumer, a second later. Each read counts towards a dead-letter
        /// queue's maxReceiveCount, and holds a FIFO group for that second.
        #[arg(long)]
        peek: bool,
        /// Where the fleet is kept between runs.
        #[arg(long, default_value = "spotable-fleet.json", value_name = "PATH")]
        state: PathBuf,
    },
}

/// `spotable-wrapper anchor` flags.
#[derive(Debug, Clone, ClapArgs)]
pub struct AnchorArgs {
    /// Where proxies send (the address the game's Service names).
    #[arg(long, value_name = "ADDR")]
    pub listen: std::net::SocketAddr,
    /// The game's own address, on loopback.
    #[arg(long, value_name = "ADDR")]
    pub game: std::net::SocketAddr,
    /// A network whose sources may speak for players: the proxies' pod network
    /// (repeatable). Nothing is trusted until this is given.
    #[arg(long, value_name = "CIDR")]
    pub trust: Vec<ipnet::IpNet>,
    /// A player without a datagram for this long is forgotten (keep it above the proxy's
    /// --session-timeout).
    #[arg(long, default_value = "2m", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// Most players at once; each holds a socket, so fewer when the open-file limit (less 64
    /// kept for the process) has room for fewer.
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    pub max_players: usize,
    /// Serve /metrics and /healthz here.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<std::net::SocketAddr>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter (RUST_LOG wins when set).
    #[arg(long, default_value = "info", value_name = "FILTER")]
    pub log_level: String,
}

/// Settings shared by run and init modes.
#[derive(Debug, Clone, ClapArgs)]
pub struct Common {
    /// Inventory queue (SQS); without it nothing is published.
    #[arg(long, env = "QUEUE_URL", value_name = "URL")]
    pub queue_url: Option<String>,
    /// Game type, carried in inventory messages.
    #[arg(long = "type", value_name = "TYPE")]
    pub kind: Option<String>,
    /// A port the game needs: NAME/udp, NAME/tcp or NAME/udp+tcp (repeatable).
    #[arg(long = "port", value_name = "NAME/PROTO")]
    pub ports: Vec<PortSpec>,
    /// Where ports are taken from.
    #[arg(long, default_value = "7000-8000", value_name = "FIRST-LAST")]
    pub port_range: PortRange,
    /// Directory of per-port lock files, shared by every wrapper on the host (a hostPath).
    #[arg(long, default_value = "/var/lock/spotable-ports", value_name = "DIR")]
    pub lock_dir: PathBuf,
    /// Instance metadata base URL.
    #[arg(long, default_value = "http://169.254.169.254", value_name = "URL")]
    pub imds_endpoint: String,
    /// Do not ask instance metadata (other clouds): use the overrides only.
    #[arg(long)]
    pub no_imds: bool,
    /// Public IPv4 to advertise instead of the metadata's.
    #[arg(long, env = "SPOTABLE_PUBLIC_IP", value_name = "IP")]
    pub public_ip: Option<std::net::Ipv4Addr>,
    /// Public hostname to advertise instead of the metadata's.
    #[arg(long, env = "SPOTABLE_PUBLIC_HOSTNAME", value_name = "NAME")]
    pub public_hostname: Option<String>,
    /// Players reach this server through the proxy at HOST:PORT (its load balancer): the
    /// inventory carries this address, and no public address of the server's own.
    #[arg(long, env = "SPOTABLE_FRONT_ADDRESS", value_name = "HOST:PORT", value_parser = parse_front)]
    pub front_address: Option<String>,
    /// The game (match, world) this server is a replica of, as the proxy knows it (the
    /// `spotable.io/game` label).
    #[arg(long, env = "SPOTABLE_GAME", value_name = "NAME")]
    pub game: Option<String>,
    /// A token that routes players to the game through the proxy: UTF-8 text or
    /// `base64:…` (repeatable; the environment variable takes a comma-separated list).
    #[arg(long = "token", env = "SPOTABLE_TOKENS", value_name = "TOKEN", value_delimiter = ',',
          value_parser = parse_token)]
    pub tokens: Vec<String>,
    /// Run the identity anchor on this port (a UDP port named with --port): proxies with
    /// --replica-header proxy-v2 send there, and the game gets an internal loopback port in
    /// the same variables, where the anchor passes each player on from one stable peer.
    #[arg(long, value_name = "PORTNAME")]
    pub anchor: Option<String>,
    /// With --anchor: a network whose sources may speak for players, the proxies' pod
    /// network (repeatable). Nothing is trusted until this is given.
    #[arg(long, value_name = "CIDR")]
    pub anchor_trust: Vec<ipnet::IpNet>,
    /// With --anchor: a player without a datagram for this long is forgotten.
    #[arg(long, default_value = "2m", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub anchor_idle_timeout: Duration,
    /// With --anchor: most players at once; each holds a socket, so fewer when the open-file
    /// limit (less 64 kept for the process) has room for fewer.
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    pub anchor_max_players: usize,
    /// Serve /metrics (the anchor's) and /healthz here.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<std::net::SocketAddr>,
    /// Agones: tell the SDK sidecar (AGONES_SDK_HTTP_PORT) ready, health and shutdown.
    #[arg(long)]
    pub agones: bool,
    /// Agones: time between health reports (keep it under the fleet's health period).
    #[arg(long, default_value = "2s", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub agones_health_interval: Duration,
    /// Stop signal to SIGKILL.
    #[arg(long, default_value = "110s", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub grace: Duration,
    /// On SIGTERM (the eviction), move the running game to a landing pad (`spotable-wrapper
    /// land`) with CRIU instead of stopping it; stop it only when no pad takes it or the move
    /// fails. The game then runs as PID 1 of a PID namespace and in a time namespace of its
    /// own (needs CAP_SYS_ADMIN, CAP_CHECKPOINT_RESTORE, CAP_SYS_PTRACE).
    #[arg(long)]
    pub migrate: bool,
    /// With --migrate: a landing pad to try (HOST:PORT of its migration port), in order
    /// (repeatable).
    #[arg(long = "pad", value_name = "ADDR")]
    pub pads: Vec<std::net::SocketAddr>,
    /// With --migrate: where this wrapper serves the game's memory to the pad, on the pod
    /// network [default: $POD_IP:7101].
    #[arg(long, value_name = "IP:PORT")]
    pub page_server: Option<std::net::SocketAddr>,
    /// With --migrate (and `land`): the Kubernetes API to find and claim pads and publish
    /// moves at [default: the cluster's, with the pod's service account].
    #[arg(long, value_name = "URL")]
    pub kube_api: Option<String>,
    /// With --migrate (and `land`): the criu program, 4.2 or newer.
    #[arg(long, default_value = "criu", value_name = "PATH")]
    pub criu: PathBuf,
    /// With --migrate (and `land`): where CRIU's images are written.
    #[arg(long, default_value = "/tmp/spotable-migrate", value_name = "DIR")]
    pub migrate_dir: PathBuf,
    /// With --migrate: the whole move, the last page of memory included; keep it under the
    /// pod's grace period.
    #[arg(long, default_value = "60s", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub move_within: Duration,
    /// How long the game may take to bind its ports before `ready` is given up.
    #[arg(long, default_value = "5m", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub ready_timeout: Duration,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter (RUST_LOG wins when set).
    #[arg(long, default_value = "info", value_name = "FILTER")]
    pub log_level: String,
}

/// Empty values (an unset label or annotation through the downward API, an empty
/// ConfigMap key) mean "not given"; [`Common::settle`] drops them.
fn parse_front(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Ok(String::new());
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or("want HOST:PORT, e.g. play.example.com:7777")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err("want HOST:PORT with a host name or address".into());
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(s.to_string()),
        _ => Err(format!("{port:?} is not a port (1 to 65535)")),
    }
}

fn parse_token(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(String::new());
    }
    match spotable_core::token::parse_token(s) {
        Ok(bytes) if !bytes.is_empty() => Ok(s.to_string()),
        Ok(_) => Err("a token cannot be empty".into()),
        Err(e) => Err(e.to_string()),
    }
}

impl Common {
    /// Drops empty values and checks what clap cannot: one kind of address.
    fn settle(mut self) -> Result<Self, String> {
        self.front_address = self.front_address.filter(|a| !a.is_empty());
        self.game = self.game.filter(|g| !g.is_empty());
        self.tokens.retain(|t| !t.is_empty());
        if let Some(name) = &self.anchor {
            let udp = self.ports.iter().any(|p| {
                p.name == *name && p.protos.contains(&spotable_fleet::inventory::Proto::Udp)
            });
            if !udp {
                return Err(format!(
                    "--anchor {name}: no UDP port of that name (add --port {name}/udp)"
                ));
            }
            if self.anchor_max_players == 0 || self.anchor_idle_timeout.is_zero() {
                return Err(
                    "--anchor-max-players and --anchor-idle-timeout must be above zero".into(),
                );
            }
        }
        if self.front_address.is_some()
            && (self.public_ip.is_some() || self.public_hostname.is_some())
        {
            return Err(
                "--front-address cannot be used with --public-ip or --public-hostname: \
                        behind the proxy players use the proxy's address"
                    .into(),
            );
        }
        Ok(self)
    }
}

/// Runs the wrapper binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => return ExitCode::from(spotable_edge::clap_exit("spotable-wrapper", &e)),
    };
    let (common, mode) = match cli.sub {
        Some(Sub::Inventory {
            queue_url,
            watch,
            peek,
            state,
        }) => return inventory(&queue_url, watch, peek, &state),
        Some(Sub::Anchor(args)) => return anchor(args),
        Some(Sub::Land { land, common }) => {
            let common = match common.settle() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("spotable-wrapper: {e}");
                    return ExitCode::from(2);
                }
            };
            if let Err(e) = spotable_edge::init_logging(common.log_format, &common.log_level) {
                eprintln!("spotable-wrapper: {e}");
                return ExitCode::from(2);
            }
            return spotable_edge::block_on(
                "spotable-wrapper",
                crate::migrate::land::run(common, land),
            );
        }
        Some(Sub::Init { common, .. }) if common.anchor.is_some() => {
            eprintln!(
                "spotable-wrapper: --anchor: the anchor runs beside the game, in run mode, not \
                 in an init container (run `spotable-wrapper anchor` as a sidecar instead)"
            );
            return ExitCode::from(2);
        }
        Some(Sub::Init { common, .. }) if common.agones => {
            eprintln!(
                "spotable-wrapper: --agones: the SDK is told by the wrapper that runs the game, \
                 not by an init container"
            );
            return ExitCode::from(2);
        }
        Some(Sub::Init { env_file, common }) => (*common, Mode::Init(env_file)),
        None if cli.command.is_empty() => {
            eprintln!(
                "spotable-wrapper: no game command: spotable-wrapper [FLAGS] -- COMMAND [ARGS...]"
            );
            return ExitCode::from(2);
        }
        None => (cli.common, Mode::Run(cli.command)),
    };
    let common = match common.settle() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("spotable-wrapper: {e}");
            return ExitCode::from(2);
        }
    };
    if common.ports.is_empty() {
        eprintln!("spotable-wrapper: --port: at least one port is required (e.g. --port game/udp)");
        return ExitCode::from(2);
    }
    if let Err(e) = spotable_edge::init_logging(common.log_format, &common.log_level) {
        eprintln!("spotable-wrapper: {e}");
        return ExitCode::from(2);
    }
    spotable_edge::block_on("spotable-wrapper", run(common, mode))
}

fn anchor(args: AnchorArgs) -> ExitCode {
    if args.max_players == 0 {
        eprintln!("spotable-wrapper: --max-players: must be at least 1");
        return ExitCode::from(2);
    }
    if args.idle_timeout.is_zero() {
        eprintln!("spotable-wrapper: --idle-timeout: must be greater than zero");
        return ExitCode::from(2);
    }
    if let Err(e) = spotable_edge::init_logging(args.log_format, &args.log_level) {
        eprintln!("spotable-wrapper: {e}");
        return ExitCode::from(2);
    }
    spotable_edge::block_on("spotable-wrapper", run_anchor(args))
}

async fn run_anchor(args: AnchorArgs) -> Result<i32, BoxError> {
    use crate::anchor::Config;
    spotable_edge::fds::raise_limit();
    let metrics = spotable_edge::install_metrics("spotable-wrapper")?;
    let config = Config {
        listen: args.listen,
        game: args.game,
        trust: args.trust.clone(),
        idle_timeout: args.idle_timeout,
        max_players: args.max_players,
        carried: Vec::new(),
    };
    let running = crate::anchor::spawn(config)
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let local = running.local;
    let admin = match args.admin {
        Some(addr) => Some(
            spotable_edge::serve(addr, admin_router(metrics))
                .await
                .map_err(|e| format!("cannot serve admin on {addr}: {e}"))?
                .1,
        ),
        None => None,
    };
    tracing::info!(listen = %local, game = %args.game, trust = ?args.trust, "anchor running");
    println!("listening {local}");
    let mut signals = spotable_edge::Signals::new()?;
    let signal = signals.next().await;
    tracing::info!(signal, "anchor stopping");
    if let Some(task) = admin {
        task.abort();
    }
    running.stop().map_err(|e| format!("anchor failed: {e}"))?;
    Ok(0)
}

/// Ends a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `/metrics` and `/healthz` for the wrapper's admin listener.
fn admin_router(metrics: metrics_exporter_prometheus::PrometheusHandle) -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move { spotable_edge::render(&metrics) }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
}

fn inventory(queue_url: &str, watch: bool, peek: bool, state: &std::path::Path) -> ExitCode {
    spotable_edge::block_on(
        "spotable-wrapper",
        read_fleet(queue_url, watch, peek, state),
    )
}

async fn read_fleet(
    queue_url: &str,
    watch: bool,
    peek: bool,
    state: &std::path::Path,
) -> Result<i32, BoxError> {
    let client = spotable_fleet::inventory::sqs_client().await;
    let mut fleet = crate::fleet::Fleet::load(state)?;
    loop {
        let mut read = 0;
        // Peeking, a message comes back a second later: stop at the first one seen twice.
        let mut seen = std::collections::HashSet::new();
        loop {
            let mut receive = client
                .receive_message()
                .queue_url(queue_url)
                .max_number_of_messages(10)
                .wait_time_seconds(if watch { 2 } else { 1 });
            if peek {
                receive = receive.visibility_timeout(1);
            }
            let out = receive.send().await.map_err(|e| {
                format!(
                    "cannot read {queue_url}: {}",
                    aws_sdk_sqs::error::DisplayErrorContext(e)
                )
            })?;
            let messages = out.messages.unwrap_or_default();
            let mut fresh = 0;
            for m in &messages {
                if !seen.insert(m.message_id().unwrap_or_default().to_string()) {
                    continue;
                }
                fresh += 1;
                match serde_json::from_str::<Message>(m.body().unwrap_or_default()) {
                    Ok(msg) => fleet.apply(&msg),
                    Err(e) => eprintln!("spotable-wrapper: skipping a message: {e}"),
                }
                read += 1;
            }
            // Saved before deleted: a message gone from the queue is never lost.
            if fresh > 0 {
                fleet.save(state)?;
            }
            if messages.is_empty() || (peek && fresh < messages.len()) {
                break;
            }
            if peek {
                continue;
            }
            for h in messages.iter().filter_map(|m| m.receipt_handle()) {
                client
                    .delete_message()
                    .queue_url(queue_url)
                    .receipt_handle(h)
                    .send()
                    .await
                    .map_err(|e| aws_sdk_sqs::error::DisplayErrorContext(e).to_string())?;
            }
        }
        let now = SystemTime::now();
        fleet.prune(now, Duration::from_secs(600));
        fleet.save(state)?;
        print!("{}", fleet.table(now));
        if !watch {
            tracing::debug!(read, "inventory read");
            return Ok(0);
        }
        println!();
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

enum Mode {
    Run(Vec<OsString>),
    Init(PathBuf),
}

type BoxError = Box<dyn std::error::Error>;

/// The admin listener (`--admin`), serving until the returned guard is dropped.
pub(crate) async fn admin(common: &Common) -> Result<Option<impl Drop>, BoxError> {
    Ok(match common.admin {
        Some(addr) => {
            let metrics = spotable_edge::install_metrics("spotable-wrapper")?;
            let (_, task) = spotable_edge::serve(addr, admin_router(metrics))
                .await
                .map_err(|e| format!("cannot serve admin on {addr}: {e}"))?;
            Some(AbortOnDrop(task))
        }
        None => None,
    })
}

async fn run(common: Common, mode: Mode) -> Result<i32, BoxError> {
    let _admin = admin(&common).await?;
    let mut alloc = ports::allocate(&common.ports, common.port_range, &common.lock_dir)?;
    tracing::info!(ports = ?alloc.ports, "ports allocated");
    let identity = identity(&common).await?;
    let server = ServerInfo::new(&common, &alloc.ports, identity);
    let outbox = Outbox::start(common.queue_url.clone()).await;
    outbox.send(server.message(Status::Init));
    match mode {
        Mode::Init(env_file) => {
            write_env_file(&env_file, &alloc)?;
            tracing::info!(path = %env_file.display(), "env file written");
            outbox.close(Duration::from_secs(10)).await;
            Ok(0)
        }
        Mode::Run(command) => {
            let code = launch(&common, &mut alloc, &server, &outbox, command).await?;
            outbox.close(Duration::from_secs(5).min(common.grace)).await;
            Ok(code)
        }
    }
}

async fn launch(
    common: &Common,
    alloc: &mut Allocation,
    server: &ServerInfo,
    outbox: &Outbox,
    command: Vec<OsString>,
) -> Result<i32, BoxError> {
    use std::os::unix::process::CommandExt;
    if let Err(e) = supervise::become_subreaper() {
        tracing::warn!(error = %e, "cannot become a child subreaper; orphans go to PID 1");
    }
    let supervisor = Supervisor::new()?;
    let sdk = match common.agones {
        true => Some(crate::agones::Sdk::from_env()?),
        false => None,
    };
    // With --anchor, the game's port for that name is an internal loopback one, held until
    // the game starts like the others.
    let internal = match &common.anchor {
        Some(name) => {
            let hold = std::net::UdpSocket::bind("127.0.0.1:0")?;
            let port = hold.local_addr()?.port();
            Some((name.clone(), port, hold))
        }
        None => None,
    };
    alloc.release_binds();
    let anchor = match &internal {
        Some((name, port, _)) => {
            let listen = alloc
                .ports
                .get(name)
                .map(|p| p.port)
                .ok_or("no anchored port")?;
            let config = crate::anchor::Config {
                listen: (std::net::Ipv4Addr::UNSPECIFIED, listen).into(),
                game: (std::net::Ipv4Addr::LOCALHOST, *port).into(),
                trust: common.anchor_trust.clone(),
                idle_timeout: common.anchor_idle_timeout,
                max_players: common.anchor_max_players,
                carried: Vec::new(),
            };
            let running = crate::anchor::spawn(config)
                .map_err(|e| format!("anchor: cannot listen on port {listen}: {e}"))?;
            tracing::info!(listen = %running.local, game_port = port, "anchor running");
            Some(running)
        }
        None => None,
    };
    let env = alloc.env_for_game(internal.as_ref().map(|(n, p, _)| (n.as_str(), *p)));
    let internal = internal.map(|(name, port, hold)| {
        drop(hold);
        (name, port)
    });
    let args: Vec<OsString> = command[1..]
        .iter()
        .map(|a| expand::expand(a, &env))
        .collect();
    let spawned = if common.migrate {
        crate::migrate::game::spawn(&command[0], &args, &env)
            .map(|m| (m.unshare, Some((m.pid, m.pipes))))
    } else {
        std::process::Command::new(&command[0])
            .args(&args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .process_group(0)
            .spawn()
            .map(|c| (c, None))
    };
    let (child, movable) = match spawned {
        Ok(c) => c,
        Err(e) => {
            let mut m = server.message(Status::Terminated);
            m.exit_code = Some(127);
            m.reason = Some(format!("spawn failed: {e}"));
            outbox.send(m);
            return Err(format!("cannot start {:?}: {e}", command[0]).into());
        }
    };
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
    match movable {
        Some((game, _)) => tracing::info!(pid = game, "game started, movable"),
        None => tracing::info!(pid = pid.as_raw(), "game started"),
    }
    if anchor.is_some() {
        // A socket per player: the anchor may need more descriptors than the container's soft
        // limit. Raised now, after the fork, so the game keeps the limit it was given.
        spotable_edge::fds::raise_limit();
    }
    let health = sdk
        .clone()
        .map(|sdk| tokio::spawn(sdk.health_loop(common.agones_health_interval)));
    // `ready` once the game holds every port it asked for.
    let ready = {
        // An anchored port is the anchor's: the game's is the internal one.
        let wanted: Vec<(u16, Vec<_>)> = alloc
            .ports
            .iter()
            .map(|(n, p)| {
                let port = match &internal {
                    Some((a, internal)) if a == n => *internal,
                    _ => p.port,
                };
                (port, alloc.protos.get(n).cloned().unwrap_or_default())
            })
            .collect();
        let message = server.message(Status::Ready);
        let outbox = outbox.clone();
        let timeout = common.ready_timeout;
        let sdk = sdk.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            loop {
                let all = wanted
                    .iter()
                    .all(|(port, protos)| protos.iter().all(|p| ports::in_use(*port, *p)));
                if all {
                    tracing::info!("the game is ready: its ports are bound");
                    outbox.send(message);
                    if let Some(sdk) = sdk {
                        let left = timeout.saturating_sub(start.elapsed());
                        match sdk.call_until("/ready", left).await {
                            Ok(()) => tracing::info!("Agones: ready"),
                            Err(e) => tracing::error!(error = %e, "Agones: cannot report ready"),
                        }
                    }
                    return;
                }
                if start.elapsed() > timeout {
                    tracing::warn!("the game did not bind its ports in time; no ready message");
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let on_stop = |signal: &'static str| {
        tracing::info!(signal, "stopping the game");
        let mut m = server.message(Status::Terminating);
        m.reason = Some(signal.into());
        outbox.send(m);
    };
    let (exit, moved) = match movable {
        None => (supervisor.run(pid, common.grace, on_stop).await, None),
        Some((game, pipes)) => {
            crate::migrate::names::describe();
            let in_front = match (&anchor, &internal) {
                (Some(running), Some((name, port))) => Some(crate::migrate::AnchorInFront {
                    handle: running.handle.clone(),
                    port_name: name.clone(),
                    game_port: *port,
                }),
                _ => None,
            };
            let plan = crate::migrate::plan(common, &alloc.ports, server, game, pipes, in_front)?;
            let abort = plan.abort.clone();
            let mover = move || crate::migrate::carry_out(&plan);
            let game = nix::unistd::Pid::from_raw(game);
            match supervisor
                .run_movable(pid, game, common.grace, abort, mover, on_stop)
                .await
            {
                supervise::Outcome::Exited(exit) => (exit, None),
                supervise::Outcome::Moved(moved) => (supervise::Exit::Code(0), Some(moved)),
            }
        }
    };
    ready.abort();
    if let Some(h) = health {
        h.abort();
    }
    if let Some(a) = anchor
        && let Err(e) = a.stop()
    {
        tracing::warn!(error = %e, "anchor failed");
    }
    drop(child);
    tracing::info!(exit = ?exit, "game exited");
    if let Some(sdk) = &sdk {
        // The GameServer is done: Agones deletes it rather than wait for a health timeout.
        match sdk.call_until("/shutdown", Duration::from_secs(5)).await {
            Ok(()) => tracing::info!("Agones: shutdown"),
            Err(e) => tracing::warn!(error = %e, "Agones: cannot report shutdown"),
        }
    }
    let mut m = server.message(Status::Terminated);
    m.exit_code = Some(exit.code());
    m.reason = Some(match (exit, &moved) {
        (_, Some(moved)) => format!("moved to {}", moved.pad),
        (supervise::Exit::Code(_), None) => "exit".into(),
        (supervise::Exit::Signal(s), None) => format!("signal {s}"),
    });
    outbox.send(m);
    Ok(exit.code())
}

pub(crate) async fn identity(common: &Common) -> Result<Identity, BoxError> {
    let mut id = Identity::default();
    if !common.no_imds {
        let imds = Imds::new(ImdsConfig {
            endpoint: common.imds_endpoint.clone(),
            timeout: Duration::from_secs(1),
            attempts: 2,
            ..ImdsConfig::default()
        })?;
        match imds.identity().await {
            Ok(found) => id = found,
            Err(e) if common.front_address.is_some() => {
                tracing::warn!(error = %e, "instance metadata unavailable; no region or instance id");
            }
            Err(e) if common.public_ip.is_some() || common.public_hostname.is_some() => {
                tracing::warn!(error = %e, "instance metadata unavailable; using the overrides");
            }
            Err(e) => {
                return Err(format!(
                    "cannot find the public address: {e} (set --public-ip / --public-hostname, \
                     or --no-imds outside AWS)"
                )
                .into());
            }
        }
    }
    if let Some(ip) = common.public_ip {
        id.public_ipv4 = Some(ip.to_string());
    }
    if let Some(h) = &common.public_hostname {
        id.public_hostname = Some(h.clone());
    }
    if common.front_address.is_some() {
        // Players cannot reach the server itself: advertising its address would send them
        // around the proxy, or nowhere.
        id.public_ipv4 = None;
        id.public_hostname = None;
    }
    Ok(id)
}

fn write_env_file(path: &std::path::Path, alloc: &Allocation) -> std::io::Result<()> {
    let mut text = String::new();
    for (k, v) in alloc.env() {
        text.push_str(&format!("{k}={v}\n"));
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}
