//! `spotable-bench compare`: the same load through every path, in one run.
//!
//! Paths: straight to one replica (the baseline), Spotable at fan-out 1, 2 and 3 and in each
//! dedupe mode, nginx's UDP stream proxy (one upstream) and Quilkin (fan-out 1 and 2; it sends
//! to every endpoint and does not deduplicate). Each is measured closed loop (throughput) and
//! open loop (latency), in rounds interleaved so that machine noise spreads over all paths;
//! the medians are kept. Then a replica is SIGKILLed under load, through Spotable and
//! Quilkin. Results go to `benches/results/` (JSON, SVG plots) and `benches/BENCHMARKS.md`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::loadgen::Report;
use crate::netns::Netns;
use crate::peers::{self, PeerPaths};
use crate::results;
use spotable_fixtures::process::{self, ReplicaProcess};

/// `spotable-bench compare` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct CompareArgs {
    /// Rounds over all paths; each figure is the median of its rounds.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Closed-loop (throughput) time per path and round.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub throughput_time: Duration,
    /// Open-loop (latency) time per path and round.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub latency_time: Duration,
    /// Open-loop rate for the latency runs, datagrams/s (well under every path's capacity).
    #[arg(long, default_value_t = 4000)]
    pub latency_rate: u64,
    /// Flows (players), each its own session.
    #[arg(long, default_value_t = 64)]
    pub flows: u32,
    /// Closed loop: datagrams in flight per flow.
    #[arg(long, default_value_t = 4)]
    pub window: u32,
    /// Payload size in bytes (64…1400).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// A second, throughput-only pass with this payload size (0: skip it).
    #[arg(long, default_value_t = 1400)]
    pub large_payload: usize,
    /// Worker threads / processes for every proxy.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Failover run: rate, length, and when the replica is SIGKILLed.
    #[arg(long, default_value_t = 2000)]
    pub failover_rate: u64,
    #[arg(long, default_value = "4s", value_parser = humantime::parse_duration)]
    pub failover_time: Duration,
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub kill_at: Duration,
    /// Where results go (JSON and plots); BENCHMARKS.md goes beside `results/`.
    #[arg(long, default_value = "benches/results")]
    pub out: PathBuf,
    /// Measure nothing: rewrite BENCHMARKS.md and the plots from a saved results.json.
    #[arg(long, value_name = "FILE")]
    pub from_json: Option<PathBuf>,
    /// Run the load generator on loopback instead of in a network namespace (no root
    /// needed; Quilkin is then skipped, since it ignores loopback clients).
    #[arg(long)]
    pub loopback: bool,
    /// Jitter runs: each replica in a network namespace of its own whose link delays its
    /// answers by this much (`tc netem delay`), independently of the others…
    #[arg(long, default_value = "2ms", value_parser = humantime::parse_duration)]
    pub jitter_delay: Duration,
    /// …varying by this much (normal distribution, `tc netem delay D J distribution normal`).
    #[arg(long, default_value = "1500us", value_parser = humantime::parse_duration)]
    pub jitter: Duration,
    /// Jitter runs: open-loop rate and length per path and round (20 000 datagrams make the
    /// p99.9 a mean of 20).
    #[arg(long, default_value_t = 2000)]
    pub jitter_rate: u64,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub jitter_time: Duration,
    /// Skip the jitter runs.
    #[arg(long)]
    pub no_jitter: bool,
    /// Tick-game rows: players, and how long each mode runs (a server is killed half-way).
    #[arg(long, default_value_t = 8)]
    pub tick_players: usize,
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    pub tick_time: Duration,
    /// Skip the tick-game rows.
    #[arg(long)]
    pub no_tick: bool,
    /// Noisy-neighbour rows: the flooded game's `max_pps`, and the flood (datagrams/s offered,
    /// from this many ports); the quiet game runs at --latency-rate for --latency-time.
    #[arg(long, default_value_t = 2000)]
    pub neighbour_budget: u32,
    #[arg(long, default_value_t = 40_000)]
    pub neighbour_flood_rate: u64,
    #[arg(long, default_value_t = 512)]
    pub neighbour_ports: u32,
    /// An earlier build to measure beside this one (A/B on the same machine, in the same
    /// rounds): a `spotable-bench` or `spotable-proxy` binary, e.g. from `benches/baseline.sh
    /// REV`. Adds its fan-out 1 and 2 rows, and the target that this build is within 3 % of it.
    #[arg(long, value_name = "BIN")]
    pub baseline: Option<PathBuf>,
    /// Skip the noisy-neighbour rows.
    #[arg(long)]
    pub no_neighbour: bool,
    /// Moves of a game per resident size and mode (plain, lazy) for the migration rows;
    /// 0 skips them. They need root and CRIU (built from .ci/vendor when missing).
    #[arg(long, default_value_t = 3)]
    pub move_runs: usize,
}

/// Which proxy a path goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Proxy {
    Direct,
    Spotable,
    Nginx,
    Quilkin,
}

impl Proxy {
    pub fn label(self) -> &'static str {
        match self {
            Proxy::Direct => "direct",
            Proxy::Spotable => "Spotable",
            Proxy::Nginx => "nginx",
            Proxy::Quilkin => "Quilkin",
        }
    }
}

/// One path: a proxy, how many replicas it sends to, (Spotable) its dedupe mode, and whether
/// the players' datagrams carry a routing token ([`TOKEN`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub proxy: Proxy,
    pub fanout: usize,
    pub dedupe: Option<String>,
    #[serde(default)]
    pub token: bool,
    /// PROXY v2 headers to an identity anchor in front of each replica.
    #[serde(default)]
    pub anchor: bool,
    /// Spotable: the `--baseline` build, not this one.
    #[serde(default)]
    pub baseline: bool,
}

/// The routing token of the token paths: one game behind the proxy, as a fleet would have
/// hundreds.
pub const TOKEN: &str = "bench-01";

impl Route {
    pub fn name(&self) -> String {
        match &self.dedupe {
            Some(d) if self.baseline => {
                format!("{} ×{} ({d}, baseline)", self.proxy.label(), self.fanout)
            }
            Some(d) if self.anchor => {
                format!(
                    "{} ×{} ({d}, PROXY v2 + anchor)",
                    self.proxy.label(),
                    self.fanout
                )
            }
            Some(d) if self.token => {
                format!("{} ×{} ({d}, token)", self.proxy.label(), self.fanout)
            }
            Some(d) => format!("{} ×{} ({d})", self.proxy.label(), self.fanout),
            None if self.proxy == Proxy::Direct => "direct".to_string(),
            None => format!("{} ×{}", self.proxy.label(), self.fanout),
        }
    }
}

/// The measured figures of one path.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathResult {
    pub path: Route,
    /// Median round's closed-loop report, and every round's throughput.
    pub throughput: Report,
    pub throughput_rounds: Vec<f64>,
    /// Median round's open-loop report.
    pub latency: Report,
    /// Closed-loop report with the large payload (median round), if that pass ran.
    pub large: Option<Report>,
    /// Anchor paths: the anchors' CPU time per datagram they carried (each direction
    /// counted), in µs, over the median closed-loop round.
    #[serde(default)]
    pub anchor_cpu_us: Option<f64>,
}

/// A path measured with jittery replica links: first answers' round trips.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JitterResult {
    pub path: Route,
    /// The median round by p99.
    pub report: Report,
}

/// A failover run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailoverResult {
    pub path: Route,
    pub kill_at_ms: f64,
    pub report: Report,
}

/// Everything one `compare` run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub machine: Vec<(String, String)>,
    pub settings: Vec<(String, String)>,
    pub paths: Vec<PathResult>,
    pub failover: Vec<FailoverResult>,
    /// The jitter runs, and the link setting they ran with (empty when skipped).
    #[serde(default)]
    pub jitter: Vec<JitterResult>,
    #[serde(default)]
    pub jitter_setting: String,
    /// The tick game's rows (one run per mode), and how they ran.
    #[serde(default)]
    pub tick: Vec<crate::tick_rows::TickRow>,
    #[serde(default)]
    pub tick_setting: String,
    /// What moving a game costs against its memory.
    #[serde(default)]
    pub moves: crate::move_cost::MoveCost,
    /// A game's players beside another game's flood.
    #[serde(default)]
    pub neighbour: crate::neighbour::Neighbour,
    /// Paths not measured, and why.
    pub skipped: Vec<(String, String)>,
    pub seconds: f64,
}

/// Runs `cmd` (the bench binary, wherever it runs) as the load generator against `target`,
/// sending from `bind`, and reads its JSON report.
fn run_loadgen(
    mut cmd: std::process::Command,
    target: SocketAddr,
    bind: &str,
    extra: &[String],
) -> anyhow::Result<Report> {
    let out = cmd
        .arg("loadgen")
        .args(["--target", &target.to_string(), "--bind", bind, "--json"])
        .args(extra)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run the load generator")?;
    if !out.status.success() {
        bail!("load generator failed ({})", out.status);
    }
    serde_json::from_slice(&out.stdout).context("load generator report")
}

/// Where the load generator runs and what it targets.
struct Env {
    exe: PathBuf,
    netns: Option<Netns>,
    /// The address proxies and replicas are reached at by the load generator.
    front_ip: Ipv4Addr,
    tmp: PathBuf,
    peers: PeerPaths,
    /// `--baseline`: the earlier build the baseline paths run.
    baseline: Option<PathBuf>,
}

impl Env {
    fn loadgen(&self, target: SocketAddr, extra: &[String]) -> anyhow::Result<Report> {
        let (cmd, bind) = self.command();
        run_loadgen(cmd, target, &bind, extra)
    }

    /// The load generator on the host itself, sending from a non-loopback address (the jitter
    /// runs: their replicas sit in namespaces of their own, reached over the host).
    fn loadgen_on_host(&self, target: SocketAddr, extra: &[String]) -> anyhow::Result<Report> {
        let cmd = std::process::Command::new(&self.exe);
        run_loadgen(cmd, target, "0.0.0.0:0", extra)
    }

    fn command(&self) -> (std::process::Command, String) {
        match &self.netns {
            Some(ns) => (ns.command(&self.exe), format!("{}:0", ns.ns_ip)),
            None => (
                std::process::Command::new(&self.exe),
                "127.0.0.1:0".to_string(),
            ),
        }
    }

    fn replicas(&self, n: usize) -> anyhow::Result<Vec<ReplicaProcess>> {
        (0..n)
            .map(|_| process::spawn_replica(&self.exe, &["replica", "--listen", "0.0.0.0:0"]))
            .collect()
    }
}

impl crate::neighbour::Load for Env {
    fn spawn(&self, target: SocketAddr, extra: &[String]) -> anyhow::Result<std::process::Child> {
        let (mut cmd, bind) = self.command();
        cmd.arg("loadgen")
            .args(["--target", &target.to_string(), "--bind", &bind, "--json"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot run the load generator")
    }

    fn front_ip(&self) -> Ipv4Addr {
        self.front_ip
    }

    fn exe(&self) -> &Path {
        &self.exe
    }

    fn tmp(&self) -> &Path {
        &self.tmp
    }
}

/// A path made ready: its processes (dropped = killed), and the address to load.
struct Running {
    target: SocketAddr,
    replicas: Vec<ReplicaProcess>,
    anchors: Vec<ReplicaProcess>,
    _proxy: Option<process::Guard>,
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields.get(i).context("short /proc stat")?.parse::<f64>()?)
    };
    // utime and stime are fields 14 and 15: indices 11 and 12 after the name.
    let hz = rustix::param::clock_ticks_per_second() as f64;
    Ok((ticks(11)? + ticks(12)?) / hz)
}

fn on_loopback(r: &ReplicaProcess) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), r.addr.port())
}

fn start(env: &Env, path: &Route, workers: usize) -> anyhow::Result<Running> {
    let replicas = env.replicas(path.fanout)?;
    let upstreams: Vec<SocketAddr> = replicas.iter().map(on_loopback).collect();
    let direct = SocketAddr::new(env.front_ip.into(), replicas[0].addr.port());
    start_with(env, path, workers, replicas, upstreams, direct)
}

/// Starts `path` in front of `replicas` (reached at `upstreams`; `direct`: where the load
/// generator reaches the first one itself).
fn start_with(
    env: &Env,
    path: &Route,
    workers: usize,
    replicas: Vec<ReplicaProcess>,
    mut upstreams: Vec<SocketAddr>,
    direct: SocketAddr,
) -> anyhow::Result<Running> {
    // An identity anchor in front of each replica; the proxy then sends PROXY v2 headers.
    let anchors = if path.anchor {
        let anchors = upstreams
            .iter()
            .map(|u| {
                let game = u.to_string();
                process::spawn_replica(
                    &env.exe,
                    &["anchor", "--listen", "127.0.0.1:0", "--game", &game],
                )
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        upstreams = anchors.iter().map(|a| a.addr).collect();
        anchors
    } else {
        Vec::new()
    };
    let (target, proxy) = match path.proxy {
        Proxy::Direct => (direct, None),
        Proxy::Spotable => {
            let mut args: Vec<String> = vec![
                "--listen".into(),
                "0.0.0.0:0".into(),
                "--workers".into(),
                workers.to_string(),
                "--log-level".into(),
                "warn,spotable_proxy::server=info".into(),
                // The per-player limit (1000/s by default) guards against floods; the load
                // generator's flows send faster than any player, and the peers have none.
                "--rate-limit".into(),
                "0".into(),
            ];
            if path.token {
                let games = env.tmp.join("games.toml");
                let replicas: Vec<String> = upstreams.iter().map(|u| format!("\"{u}\"")).collect();
                std::fs::write(
                    &games,
                    format!(
                        "[[game]]\nname = \"bench\"\ntokens = [\"{TOKEN}\"]\nreplicas = [{}]\n",
                        replicas.join(", ")
                    ),
                )?;
                args.extend([
                    // The game's packet budget is off for the same reason as the
                    // per-player limit: the flows send faster than a game's players.
                    "--game-max-pps".into(),
                    "0".into(),
                    "--token-bytes".into(),
                    TOKEN.len().to_string(),
                    "--config".into(),
                    games.display().to_string(),
                ]);
            } else {
                for u in &upstreams {
                    args.extend(["--replica".into(), u.to_string()]);
                }
            }
            if path.anchor {
                args.extend(["--replica-header".into(), "proxy-v2".into()]);
            }
            let dedupe = path.dedupe.as_deref().unwrap_or("copies");
            args.extend(["--dedupe".into(), dedupe.into()]);
            if dedupe == "sequence" {
                args.extend(["--sequence-offset", "0", "--sequence-width", "8"].map(String::from));
            }
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let p = match (&env.baseline, path.baseline) {
                (Some(bin), true) => {
                    // A spotable-bench runs the proxy as a subcommand; a spotable-proxy is it.
                    let bench = bin
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().contains("bench"));
                    let prefix: &[&str] = if bench { &["proxy"] } else { &[] };
                    process::spawn_proxy(bin, prefix, &refs, false)?
                }
                _ => process::spawn_proxy(&env.exe, &["proxy"], &refs, false)?,
            };
            (
                SocketAddr::new(env.front_ip.into(), p.addr.port()),
                Some(p.process),
            )
        }
        Proxy::Nginx => {
            let port = peers::free_udp_port()?;
            let g = peers::start_nginx(
                &env.peers,
                &env.tmp.join("nginx"),
                port,
                upstreams[0],
                workers,
            )?;
            (SocketAddr::new(env.front_ip.into(), port), Some(g))
        }
        Proxy::Quilkin => {
            let port = peers::free_udp_port()?;
            let g = peers::start_quilkin(
                &env.peers,
                &env.tmp.join("quilkin"),
                port,
                &upstreams,
                workers,
            )?;
            (SocketAddr::new(env.front_ip.into(), port), Some(g))
        }
    };
    let suffix = if path.token { TOKEN.as_bytes() } else { &[] };
    peers::wait_echo(env.front_ip, target, suffix, Duration::from_secs(15))
        .with_context(|| format!("{} is not answering", path.name()))?;
    Ok(Running {
        target,
        replicas,
        anchors,
        _proxy: proxy,
    })
}

fn median_by(reports: &mut [Report], key: impl Fn(&Report) -> f64) -> Report {
    reports.sort_by(|a, b| key(a).total_cmp(&key(b)));
    reports[reports.len() / 2].clone()
}

/// A plain path: no token, no anchor.
fn route(proxy: Proxy, fanout: usize, dedupe: Option<&str>) -> Route {
    Route {
        proxy,
        fanout,
        dedupe: dedupe.map(String::from),
        token: false,
        anchor: false,
        baseline: false,
    }
}

/// The paths of a full comparison.
pub fn paths() -> Vec<Route> {
    let p = route;
    vec![
        p(Proxy::Direct, 1, None),
        p(Proxy::Nginx, 1, None),
        p(Proxy::Quilkin, 1, None),
        p(Proxy::Quilkin, 2, None),
        p(Proxy::Spotable, 1, Some("copies")),
        p(Proxy::Spotable, 2, Some("copies")),
        p(Proxy::Spotable, 3, Some("copies")),
        p(Proxy::Spotable, 2, Some("sequence")),
        p(Proxy::Spotable, 2, Some("primary")),
        Route {
            token: true,
            ..p(Proxy::Spotable, 2, Some("copies"))
        },
        Route {
            anchor: true,
            ..p(Proxy::Spotable, 1, Some("copies"))
        },
    ]
}

/// The jitter paths: the baseline, nginx's one upstream, Quilkin's two copies (it delivers
/// every copy; the player keeps the first) and Spotable with one, two and three.
pub fn jitter_paths() -> Vec<Route> {
    let p = route;
    vec![
        p(Proxy::Direct, 1, None),
        p(Proxy::Nginx, 1, None),
        p(Proxy::Quilkin, 2, None),
        p(Proxy::Spotable, 1, Some("copies")),
        p(Proxy::Spotable, 2, Some("copies")),
        p(Proxy::Spotable, 3, Some("copies")),
    ]
}

/// A duration as one word a command line takes: `1500us`, `2ms`.
fn compact(d: Duration) -> String {
    let us = d.as_micros();
    if us.is_multiple_of(1000) {
        format!("{}ms", us / 1000)
    } else {
        format!("{us}us")
    }
}

/// Load generator flags for an open-loop run at `rate` for `time` after `warmup`, with the
/// comparison's flows and payload.
fn open_loop(args: &CompareArgs, rate: u64, time: Duration, warmup: &str) -> Vec<String> {
    vec![
        "--mode".into(),
        "open".into(),
        "--rate".into(),
        rate.to_string(),
        "--flows".into(),
        args.flows.to_string(),
        "--payload".into(),
        args.payload.to_string(),
        "--duration".into(),
        humantime::format_duration(time).to_string(),
        "--warmup".into(),
        warmup.into(),
    ]
}

/// Replicas whose answers jitter, independently: each in a network namespace of its own,
/// behind a link that `tc netem` delays, or, where the kernel has no netem, delaying its own
/// answers by the same law (the test replica's `--delay D --jitter J`). The load generator runs
/// on the host. First answers' round trips per path, median round by p99; paths in `skip` are
/// left out. Returns the results and how the links were made.
fn run_jitter(
    env: &Env,
    args: &CompareArgs,
    skip: &[String],
    bar: &ProgressBar,
) -> anyhow::Result<(Vec<JitterResult>, String)> {
    let paths: Vec<Route> = jitter_paths()
        .into_iter()
        .filter(|p| !skip.contains(&p.name()))
        .collect();
    let most = paths.iter().map(|p| p.fanout).max().unwrap_or(1);
    let (d, j) = (compact(args.jitter_delay), compact(args.jitter));
    let spaces: Vec<Netns> = (0..most as u8)
        .map(Netns::replica)
        .collect::<anyhow::Result<_>>()?;
    let netem = spaces
        .iter()
        .try_for_each(|ns| ns.netem(&["delay", &d, &j, "distribution", "normal"]));
    let mut replica_args: Vec<String> = vec!["replica".into()];
    let how = match netem {
        Ok(()) => format!(
            "each replica in its own network namespace, its answers delayed by `tc netem \
             delay {d} {j} distribution normal` on its own link"
        ),
        Err(e) => {
            bar.suspend(|| {
                eprintln!(
                    "compare: jitter without netem ({e:#}): each replica delays its own answers"
                );
            });
            replica_args.extend(["--delay".into(), d.clone(), "--jitter".into(), j.clone()]);
            format!(
                "each replica in its own network namespace; this kernel has no netem, so each \
                 delays its own answers by the same law (`spotable-bench replica --delay {d} \
                 --jitter {j}`: a normal draw per answer, floored at 0, so answers may overtake \
                 each other), independently of the others"
            )
        }
    };
    let setting = format!(
        "{how}; the load generator on the host; open loop, {} datagrams/s for {}, {} flows",
        args.jitter_rate,
        humantime::format_duration(args.jitter_time),
        args.flows
    );
    let ip = Path::new("ip");
    let mut rounds: Vec<Vec<Report>> = vec![Vec::new(); paths.len()];
    for round in 0..args.rounds {
        for (i, path) in paths.iter().enumerate() {
            bar.set_message(format!("jitter round {} · {}", round + 1, path.name()));
            let replicas = spaces[..path.fanout]
                .iter()
                .map(|ns| {
                    let mut argv = ns.exec_args(&env.exe);
                    argv.extend(replica_args.iter().cloned());
                    argv.extend(["--listen".into(), format!("{}:0", ns.ns_ip)]);
                    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
                    process::spawn_replica(ip, &argv)
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let upstreams: Vec<SocketAddr> = replicas.iter().map(|r| r.addr).collect();
            let direct = upstreams[0];
            let running = start_with(env, path, args.workers, replicas, upstreams, direct)?;
            let load = open_loop(args, args.jitter_rate, args.jitter_time, "500ms");
            rounds[i].push(env.loadgen_on_host(running.target, &load)?);
            drop(running);
            bar.inc(1);
        }
    }
    let results = paths
        .into_iter()
        .zip(rounds)
        .map(|(path, mut reports)| {
            let mut report = median_by(&mut reports, |r| r.rtt_us.p99);
            report.timeline.clear();
            report.timeline_all.clear();
            JitterResult { path, report }
        })
        .collect();
    Ok((results, setting))
}

/// Runs the comparison and writes its results.
pub fn run(args: &CompareArgs) -> anyhow::Result<()> {
    let began = Instant::now();
    let workspace = workspace_root();
    let out = if args.out.is_absolute() {
        args.out.clone()
    } else {
        workspace.join(&args.out)
    };
    if let Some(saved) = &args.from_json {
        let text = std::fs::read_to_string(saved)
            .with_context(|| format!("cannot read {}", saved.display()))?;
        let all: Results = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a compare results file", saved.display()))?;
        results::write(&all, &out)?;
        println!("{}", results::summary(&all));
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let netns = if args.loopback {
        None
    } else {
        crate::netns::remove_stale();
        match Netns::create() {
            Ok(ns) => Some(ns),
            Err(e) => {
                eprintln!(
                    "compare: no network namespace ({e:#}); running on loopback, without Quilkin \
                     (it ignores loopback clients). Run as root with iproute2 for the full set."
                );
                None
            }
        }
    };
    let tmp = workspace.join("benches/results/tmp");
    std::fs::create_dir_all(&tmp)?;
    let env = Env {
        exe,
        front_ip: netns.as_ref().map_or(Ipv4Addr::LOCALHOST, |n| n.host_ip),
        netns,
        tmp,
        peers: PeerPaths::discover(&workspace),
        baseline: args.baseline.clone(),
    };

    let mut skipped = Vec::new();
    let mut todo = Vec::new();
    let mut all_paths = paths();
    if let Some(bin) = &args.baseline {
        anyhow::ensure!(bin.is_file(), "--baseline {}: no such file", bin.display());
        for fanout in [1, 2] {
            all_paths.push(Route {
                baseline: true,
                ..route(Proxy::Spotable, fanout, Some("copies"))
            });
        }
    }
    for path in all_paths {
        let why = match path.proxy {
            Proxy::Nginx => env.peers.nginx_missing(),
            Proxy::Quilkin if env.netns.is_none() => Some(
                "needs a network namespace (root, iproute2): it ignores loopback clients".into(),
            ),
            Proxy::Quilkin => env.peers.quilkin_missing(),
            _ => None,
        };
        match why {
            Some(why) => {
                eprintln!(
                    "compare: skipping {}: {why} (benches/peers/install.sh installs it)",
                    path.name()
                );
                skipped.push((path.name(), why));
            }
            None => todo.push(path),
        }
    }

    let load = |mode: &str, time: Duration, payload: usize| -> Vec<String> {
        let mut v: Vec<String> = vec![
            "--mode".into(),
            mode.into(),
            "--flows".into(),
            args.flows.to_string(),
            "--payload".into(),
            payload.to_string(),
            "--duration".into(),
            humantime::format_duration(time).to_string(),
            "--warmup".into(),
            "500ms".into(),
        ];
        if mode == "closed" {
            v.extend(["--window".into(), args.window.to_string()]);
        } else {
            v.extend(["--rate".into(), args.latency_rate.to_string()]);
        }
        v
    };
    // The large-payload pass covers the rows of the headline table.
    let large = |p: &Route| {
        args.large_payload > 0
            && !p.token
            && !p.anchor
            && p.fanout <= 2
            && matches!(p.dedupe.as_deref(), None | Some("copies"))
    };

    let jitter = !args.no_jitter && env.netns.is_some();
    let jitter_runs = if jitter {
        jitter_paths().len() as u64 * u64::from(args.rounds)
    } else {
        0
    };
    let tick_runs = if args.no_tick { 0 } else { 1 };
    let move_runs = u64::from(args.move_runs > 0);
    let neighbour_runs = u64::from(!args.no_neighbour);
    let runs = todo.len() as u64 * u64::from(args.rounds)
        + 2
        + jitter_runs
        + tick_runs
        + move_runs
        + neighbour_runs;
    let bar = ProgressBar::new(runs).with_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut closed: Vec<Vec<Report>> = vec![Vec::new(); todo.len()];
    let mut open: Vec<Vec<Report>> = vec![Vec::new(); todo.len()];
    let mut big: Vec<Vec<Report>> = vec![Vec::new(); todo.len()];
    let mut anchor_cpu: Vec<Vec<f64>> = vec![Vec::new(); todo.len()];
    let mut failed: Vec<Option<String>> = vec![None; todo.len()];
    for round in 0..args.rounds {
        for (i, path) in todo.iter().enumerate() {
            if failed[i].is_some() {
                bar.inc(1);
                continue;
            }
            bar.set_message(format!("round {} · {}", round + 1, path.name()));
            let running = match start(&env, path, args.workers) {
                Ok(r) => r,
                // A peer that will not run here is reported, not fatal; Spotable's own
                // paths and the baseline are.
                Err(e) if matches!(path.proxy, Proxy::Nginx | Proxy::Quilkin) => {
                    bar.suspend(|| eprintln!("compare: skipping {}: {e:#}", path.name()));
                    failed[i] = Some(format!("did not start: {e:#}"));
                    bar.inc(1);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let tp = args.throughput_time;
            let with_token = |mut v: Vec<String>| {
                if path.token {
                    v.extend(["--suffix".into(), TOKEN.into()]);
                }
                v
            };
            let pids: Vec<u32> = running.anchors.iter().map(|a| a.process.pid()).collect();
            let cpu =
                |pids: &[u32]| -> f64 { pids.iter().filter_map(|p| cpu_seconds(*p).ok()).sum() };
            let (cpu0, wall0) = (cpu(&pids), Instant::now());
            let report = env.loadgen(
                running.target,
                &with_token(load("closed", tp, args.payload)),
            )?;
            if !pids.is_empty() {
                // Datagrams through the anchors per second: every answer went in and out.
                let carried = 2.0 * report.received_per_sec * wall0.elapsed().as_secs_f64();
                anchor_cpu[i].push((cpu(&pids) - cpu0) * 1e6 / carried.max(1.0));
            }
            closed[i].push(report);
            open[i].push(env.loadgen(
                running.target,
                &with_token(load("open", args.latency_time, args.payload)),
            )?);
            if large(path) {
                big[i].push(env.loadgen(running.target, &load("closed", tp, args.large_payload))?);
            }
            drop(running);
            bar.inc(1);
        }
    }
    let mut results = Vec::new();
    for (i, path) in todo.iter().enumerate() {
        if let Some(why) = &failed[i] {
            skipped.push((path.name(), why.clone()));
            continue;
        }
        let rounds: Vec<f64> = closed[i].iter().map(|r| r.answers_per_sec).collect();
        let throughput = median_by(&mut closed[i], |r| r.answers_per_sec);
        let latency = median_by(&mut open[i], |r| r.rtt_us.p50);
        let mut large = (!big[i].is_empty()).then(|| median_by(&mut big[i], |r| r.answers_per_sec));
        // Timelines matter for the failover runs only; CDFs for the latency runs.
        let mut throughput = throughput;
        let mut latency = latency;
        for r in [Some(&mut throughput), Some(&mut latency), large.as_mut()]
            .into_iter()
            .flatten()
        {
            r.timeline.clear();
            r.timeline_all.clear();
        }
        throughput.cdf.clear();
        if let Some(l) = large.as_mut() {
            l.cdf.clear();
        }
        anchor_cpu[i].sort_by(f64::total_cmp);
        let anchor_cpu_us = anchor_cpu[i].get(anchor_cpu[i].len() / 2).copied();
        results.push(PathResult {
            path: path.clone(),
            throughput,
            throughput_rounds: rounds,
            latency,
            large,
            anchor_cpu_us,
        });
    }

    let mut failover = Vec::new();
    for path in results.iter().map(|r| &r.path).filter(|p| {
        p.fanout == 2
            && !p.token
            && !p.anchor
            && matches!(p.dedupe.as_deref(), None | Some("copies"))
    }) {
        bar.set_message(format!("failover · {}", path.name()));
        let mut running = start(&env, path, args.workers)?;
        let victim = running.replicas.remove(0);
        let kill_at = args.kill_at;
        let killer = std::thread::spawn(move || {
            let mut victim = victim;
            std::thread::sleep(kill_at);
            let _ = victim.process.kill();
        });
        let report = env.loadgen(
            running.target,
            &open_loop(args, args.failover_rate, args.failover_time, "0s"),
        )?;
        let _ = killer.join();
        failover.push(FailoverResult {
            path: path.clone(),
            kill_at_ms: kill_at.as_secs_f64() * 1000.0,
            report,
        });
        bar.inc(1);
    }
    let skipped_names: Vec<String> = skipped.iter().map(|(n, _)| n.clone()).collect();
    let (jitter, jitter_setting) = if jitter {
        run_jitter(&env, args, &skipped_names, &bar)?
    } else {
        (Vec::new(), String::new())
    };
    let (tick, tick_setting) = if args.no_tick {
        (Vec::new(), String::new())
    } else {
        bar.set_message("tick game");
        let rows = crate::tick_rows::run(args.tick_players, args.tick_time)?;
        bar.inc(1);
        let setting = format!(
            "Two authoritative tick servers (`spotable-bench tick`, {} Hz) started 0.8 s apart, \
             behind Spotable ×2 on loopback; {} players send an input every tick for {}; the \
             server the first player hears is SIGKILLed half-way.",
            crate::tick_demo::HZ,
            args.tick_players,
            humantime::format_duration(args.tick_time)
        );
        (rows, setting)
    };
    let neighbour = if args.no_neighbour {
        crate::neighbour::Neighbour::default()
    } else {
        bar.set_message("a noisy neighbour");
        let settings = crate::neighbour::Settings {
            budget: args.neighbour_budget,
            flood_rate: args.neighbour_flood_rate,
            flood_ports: args.neighbour_ports,
            quiet_rate: args.latency_rate,
            quiet_players: args.flows,
            seconds: args.latency_time.as_secs_f64(),
            // Its p99s rest on 1 % of a few thousand samples: more rounds than the paths.
            rounds: args.rounds.max(5),
        };
        // A section that cannot run here is reported, not fatal: the rest of the run stands.
        let n = crate::neighbour::run(&env, &settings, args.workers).unwrap_or_else(|e| {
            bar.suspend(|| eprintln!("compare: no noisy-neighbour rows: {e:#}"));
            skipped.push(("noisy neighbour".into(), format!("{e:#}")));
            crate::neighbour::Neighbour::default()
        });
        bar.inc(1);
        n
    };
    let moves = if args.move_runs == 0 {
        crate::move_cost::MoveCost {
            rows: Vec::new(),
            skipped: Some("--move-runs 0".into()),
        }
    } else {
        bar.set_message("moving a game");
        let m = crate::move_cost::measure(args.move_runs);
        bar.inc(1);
        m
    };
    bar.finish_and_clear();

    let all = Results {
        machine: results::machine(&env.peers),
        settings: vec![
            ("rounds".into(), args.rounds.to_string()),
            ("flows".into(), args.flows.to_string()),
            ("payload".into(), format!("{} B (and {} B for throughput)", args.payload, args.large_payload)),
            ("Spotable flags".into(), "--workers N --dedupe MODE --rate-limit 0 (the per-player flood limit is off, as the peers have none)".into()),
            (
                "closed-loop window".into(),
                format!("{} per flow", args.window),
            ),
            (
                "throughput run".into(),
                humantime::format_duration(args.throughput_time).to_string(),
            ),
            (
                "latency run".into(),
                format!(
                    "{} at {} datagrams/s",
                    humantime::format_duration(args.latency_time),
                    args.latency_rate
                ),
            ),
            ("workers per proxy".into(), args.workers.to_string()),
            (
                "load generator".into(),
                if env.netns.is_some() {
                    "in a network namespace, over a veth pair".into()
                } else {
                    "on loopback".into()
                },
            ),
        ],
        paths: results,
        failover,
        jitter,
        jitter_setting,
        tick,
        tick_setting,
        moves,
        neighbour,
        skipped,
        seconds: began.elapsed().as_secs_f64(),
    };
    results::write(&all, &out)?;
    println!("{}", results::summary(&all));
    Ok(())
}

/// The workspace root: where `benches/` is, found from the current directory upward.
fn workspace_root() -> PathBuf {
    let mut dir = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    loop {
        if dir.join("benches/Cargo.toml").is_file() {
            return dir;
        }
        if !dir.pop() {
            return PathBuf::from(".");
        }
    }
}
