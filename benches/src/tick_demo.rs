//! `spotable-bench demo --game tick`: the demo with a real multiplayer server. Authoritative
//! tick servers started 0.8 s apart (as pods are), the proxy in its default mode, players
//! streaming inputs, and the server they hear SIGKILLed mid-game. What the players saw: one
//! world (one snapshot a server tick, the tick never stepping back) before the kill and after.

use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use spotable_fixtures::process::{
    ReplicaProcess, loopback_proxy_args, scrape, spawn_proxy, spawn_replica,
};
use spotable_fixtures::tick::{self, PlayerLog};

use crate::demo::DemoArgs;

/// The tick servers' rate.
pub const HZ: u32 = 30;
/// How far apart the servers start.
const APART: Duration = Duration::from_millis(800);
/// Players.
const PLAYERS: usize = 4;

/// What `--json` prints for `--game tick`.
#[derive(Debug, Clone, Serialize)]
pub struct TickReport {
    /// `tick`.
    pub game: &'static str,
    /// The proxy's dedupe mode.
    pub dedupe: String,
    /// Each player's stream.
    pub players: Vec<PlayerStream>,
    /// Sessions the proxy saw diverge and demoted to one replica.
    pub sessions_demoted: u64,
    /// The proxy marked the game divergent.
    pub divergent: bool,
}

/// One player's stream, before the kill and after.
#[derive(Debug, Clone, Serialize)]
pub struct PlayerStream {
    /// Snapshots per server tick before the kill (1.0: one world; 2.0: two interleaved).
    pub per_tick_before: f64,
    /// Times the tick stepped back before the kill (a second world).
    pub steps_back_before: usize,
    /// Snapshots before the kill from a server other than its first one's.
    pub second_world_before: usize,
    /// Whether the server it heard was the one killed.
    pub server_killed: bool,
    /// Snapshots per server tick after the kill.
    pub per_tick_after: f64,
    /// Longest time without a snapshot after the kill, ms.
    pub gap_after_ms: f64,
}

/// Tick servers started [`APART`], a proxy with `flags`, `players` players for `duration`;
/// the server the first player hears SIGKILLed at `kill_at`. `say` tells the story.
pub fn play_game(
    replicas: u8,
    flags: &[&str],
    players: usize,
    duration: Duration,
    kill_at: Duration,
    say: &dyn Fn(String),
) -> anyhow::Result<TickRun> {
    let exe = std::env::current_exe().context("cannot find our own executable")?;
    let mut servers: Vec<(ReplicaProcess, Instant)> = Vec::new();
    for i in 0..replicas {
        if i > 0 {
            std::thread::sleep(APART);
        }
        let p = spawn_replica(&exe, &["tick", "--hz", &HZ.to_string()])?;
        say(format!(
            "  tick server {} on {} (pid {})",
            i + 1,
            p.addr,
            p.process.pid()
        ));
        servers.push((p, Instant::now()));
    }
    let mut extra = vec!["--rate-limit", "0"];
    extra.extend_from_slice(flags);
    let addrs: Vec<SocketAddr> = servers.iter().map(|(p, _)| p.addr).collect();
    let proxy_args = loopback_proxy_args(&addrs, 2, &extra);
    let proxy_args: Vec<&str> = proxy_args.iter().map(String::as_str).collect();
    let proxy = spawn_proxy(&exe, &["proxy"], &proxy_args, false)?;
    let admin = proxy.admin.context("proxy admin address")?;
    say(format!("  proxy on {}\n", proxy.addr));

    let start = Instant::now();
    let until = start + duration;
    let logs: Vec<Arc<Mutex<PlayerLog>>> = (0..players).map(|_| Arc::default()).collect();
    let target = proxy.addr;
    let threads: Vec<_> = logs
        .iter()
        .map(|log| {
            let log = log.clone();
            std::thread::spawn(move || -> std::io::Result<()> {
                let socket = UdpSocket::bind("127.0.0.1:0")?;
                tick::play_into(&socket, target, Duration::from_secs(1) / HZ, until, &log)
            })
        })
        .collect();
    std::thread::sleep(kill_at);
    let started: Vec<Instant> = servers.iter().map(|s| s.1).collect();
    let heard = logs[0]
        .lock()
        .map_err(|_| anyhow::anyhow!("player log poisoned"))?
        .snapshots
        .last()
        .copied()
        .context("the first player heard no server before the kill")?;
    let victim = tick::source(&started, HZ, heard.tick, heard.at);
    servers[victim].0.process.kill()?;
    let kill = Instant::now();
    say(format!(
        "  {:>6.2}s  SIGKILL tick server {}",
        start.elapsed().as_secs_f64(),
        victim + 1
    ));
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("a player panicked"))??;
    }
    // The proxy's workers add their counts on their tick.
    std::thread::sleep(Duration::from_millis(250));
    let sessions_demoted = scrape(admin, "spotable_sessions_demoted_total", &[])? as u64;
    let divergent = scrape(admin, "spotable_game_divergent", &[])? == 1.0;
    let mut streams = Vec::new();
    for (i, log) in logs.iter().enumerate() {
        let log = log
            .lock()
            .map_err(|_| anyhow::anyhow!("player log poisoned"))?
            .clone();
        let Some(last) = log.snapshots.iter().rfind(|s| s.at < kill).copied() else {
            bail!("player {} heard nothing before the kill", i + 1);
        };
        let settled = start + Duration::from_millis(500);
        let before = tick::stream(&log, HZ, settled, kill);
        let end = log
            .snapshots
            .last()
            .map_or(until, |s| s.at + Duration::from_millis(1));
        let after = tick::stream(&log, HZ, kill, end);
        // Its world: the server of its first snapshot; any other's before the kill is a
        // second world.
        let sources: Vec<usize> = log
            .snapshots
            .iter()
            .filter(|s| s.at < kill)
            .map(|s| tick::source(&started, HZ, s.tick, s.at))
            .collect();
        let world = sources.first().copied();
        streams.push(PlayerStream {
            per_tick_before: before.per_tick,
            steps_back_before: before.steps_back,
            second_world_before: sources.iter().filter(|&&s| Some(s) != world).count(),
            server_killed: tick::source(&started, HZ, last.tick, last.at) == victim,
            per_tick_after: after.per_tick,
            gap_after_ms: after.longest_gap.as_secs_f64() * 1e3,
        });
    }
    Ok(TickRun {
        players: streams,
        sessions_demoted,
        divergent,
    })
}

/// What [`play_game`] saw.
#[derive(Debug, Clone)]
pub struct TickRun {
    /// Each player's stream.
    pub players: Vec<PlayerStream>,
    /// Sessions the proxy demoted.
    pub sessions_demoted: u64,
    /// The proxy marked the game divergent.
    pub divergent: bool,
}

/// Runs it; fails when a player saw two worlds, or too little after the kill.
pub fn run(args: &DemoArgs) -> anyhow::Result<TickReport> {
    if args.plot.is_some() {
        bail!("--plot draws the echo game's timeline; --game tick reports its streams only");
    }
    if args.kill_at >= args.duration {
        bail!("--kill-at must come before the end of --duration");
    }
    let json = args.json;
    let say = |line: String| {
        if json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    };
    say(format!(
        "Spotable demo, a real multiplayer server: {} authoritative tick servers ({HZ} Hz) \
         started {}ms apart, {PLAYERS} players, --dedupe {}.",
        args.replicas,
        APART.as_millis(),
        args.dedupe
    ));
    say(format!(
        "The server the first player hears is SIGKILLed at {:?}.\n",
        args.kill_at
    ));
    let mut flags = vec!["--dedupe", args.dedupe.as_str()];
    if args.dedupe == "sequence" {
        flags.extend(["--sequence-offset", "0", "--sequence-width", "4"]);
    }
    let TickRun {
        players,
        sessions_demoted,
        divergent,
    } = play_game(
        args.replicas,
        &flags,
        PLAYERS,
        args.duration,
        args.kill_at,
        &say,
    )?;

    say(format!(
        "  {:<8} {:>16} {:>12} {:>14} {:>15} {:>13}",
        "player", "per tick before", "steps back", "server killed", "per tick after", "gap after"
    ));
    for (i, p) in players.iter().enumerate() {
        say(format!(
            "  {:<8} {:>16.3} {:>12} {:>14} {:>15.3} {:>10.0} ms",
            i + 1,
            p.per_tick_before,
            p.steps_back_before,
            if p.server_killed { "yes" } else { "no" },
            p.per_tick_after,
            p.gap_after_ms
        ));
    }
    say(format!(
        "  sessions demoted (replicas seen in two worlds): {sessions_demoted}; game divergent: {}",
        if divergent { "yes" } else { "no" }
    ));
    let report = TickReport {
        game: "tick",
        dedupe: args.dedupe.clone(),
        players,
        sessions_demoted,
        divergent,
    };
    let two_worlds = report
        .players
        .iter()
        .any(|p| p.steps_back_before > 0 || p.per_tick_before > 1.02);
    let starved = report.players.iter().any(|p| p.per_tick_after < 0.9);
    if json {
        println!("{}", serde_json::to_string(&report)?);
    }
    if two_worlds {
        bail!("a player saw two worlds before the kill");
    }
    if starved {
        bail!("a player got under 0.9 snapshots per tick after the kill");
    }
    say(
        "\nOne world for every player: one snapshot a server tick, the tick never stepping \
         back, and the game carried on after its server died."
            .into(),
    );
    Ok(report)
}
