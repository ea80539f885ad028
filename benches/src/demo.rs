//! The one-command demo: replicas, proxy and a player on loopback, and a replica SIGKILLed
//! mid-stream, as a reclaimed spot node would take it.

use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use spotable_fixtures::metrics_text;
use spotable_fixtures::process::{
    ReplicaProcess, http_get, loopback_proxy_args, spawn_proxy, spawn_replica,
};
use spotable_fixtures::wire;

use crate::timeline::{self, Timeline};
use serde::{Deserialize, Serialize};

/// `spotable-bench demo` flags.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Replica processes to start.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(2..=16))]
    pub replicas: u8,
    /// Client datagrams per second.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=50_000))]
    pub rate: u32,
    /// How long the client streams.
    #[arg(long, default_value = "8s", value_parser = humantime_parse)]
    pub duration: Duration,
    /// When the second replica is SIGKILLed.
    #[arg(long, default_value = "4s", value_parser = humantime_parse)]
    pub kill_at: Duration,
    /// Datagram size in bytes.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(8..=1400))]
    pub payload: u16,
    /// Dedupe mode handed to the proxy.
    #[arg(long, default_value = "copies")]
    pub dedupe: String,
    /// Instead: two proxies and a player moving from one to the other as the first is
    /// SIGKILLed at --kill-at; each copy of a stateful game sits behind the identity anchor.
    #[arg(long)]
    pub switch_proxy: bool,
    /// The game: `echo`, the deterministic replica answering each datagram; or `tick`, an
    /// authoritative multiplayer server (fixed tick, a snapshot of its own world to every
    /// player), whose replicas never agree: the proxy must give each player one world.
    #[arg(long, value_enum, default_value = "echo")]
    pub game: DemoGame,
    /// Also draw the run as an SVG timeline: answers per replica per 10 ms, the copy the
    /// player got, the kill and the gap.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<std::path::PathBuf>,
    /// Print the summary and the timeline as JSON on stdout (the text goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Instead: ONE copy of the game on a simulated node A, a landing pad on node B, a spot
    /// notice at --kill-at; the agent evicts the game, its wrapper moves it to the pad with
    /// CRIU (root, CRIU 4.2+: built from .ci/vendor when missing), node A is lost once the
    /// move is done. The game is the tick server, or the COMMAND after `--`.
    #[arg(long)]
    pub migrate: bool,
    /// With --migrate: replay the players of this capture (tcpdump -w) instead of built-in
    /// ones, each client address one player, with its recorded timing.
    #[arg(long, value_name = "FILE.pcap", requires = "migrate")]
    pub capture: Option<std::path::PathBuf>,
    /// With --migrate: the game server; `{port}` in its arguments becomes its UDP port,
    /// which is also in SERVER_PORT. It must bind 0.0.0.0 (the pad's address differs).
    #[arg(last = true, value_name = "COMMAND", requires = "migrate")]
    pub command: Vec<String>,
}

/// The demo's game server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoGame {
    /// Deterministic: every replica answers each datagram with its bytes.
    Echo,
    /// Authoritative tick server: each replica its own world.
    Tick,
}

/// What `--json` prints: the summary, and the timeline `--plot` draws.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DemoReport {
    /// Datagrams the player sent.
    pub sent: u64,
    /// Distinct answers it received.
    pub received: u64,
    /// Datagrams never answered.
    pub lost: u64,
    /// Extra copies it received.
    pub duplicates_delivered: u64,
    /// Copies the proxy suppressed.
    pub duplicates_suppressed: u64,
    /// Longest silence before the kill, ms.
    pub gap_before_ms: f64,
    /// Longest silence from the kill on, ms.
    pub gap_after_ms: f64,
    /// Per 10 ms: each replica's answers and wins, and the player's stream.
    pub timeline: Timeline,
}

fn humantime_parse(s: &str) -> Result<Duration, String> {
    let d: Duration = s
        .parse::<humantime::Duration>()
        .map_err(|e| e.to_string())?
        .into();
    Ok(d)
}

/// What the player experienced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// Datagrams the client sent.
    pub sent: u64,
    /// Distinct answers received.
    pub received: u64,
    /// Datagrams never answered.
    pub lost: u64,
    /// Answers received more than once (extra copies).
    pub duplicates_delivered: u64,
    /// Copies the proxy suppressed, from its metrics.
    pub duplicates_suppressed: u64,
    /// Longest silence between two answers before the kill.
    pub gap_before: Duration,
    /// Longest silence between two answers from the kill on (spanning the kill itself).
    pub gap_after: Duration,
}

/// Counts what a client received: per-sequence arrivals in time order.
pub fn summarize(sent: u64, arrivals: &[(u64, Duration)], kill: Duration) -> Summary {
    let mut counts = vec![0u32; sent as usize];
    for &(seq, _) in arrivals {
        if let Some(c) = counts.get_mut(seq as usize) {
            *c += 1;
        }
    }
    let received = counts.iter().filter(|&&c| c > 0).count() as u64;
    let duplicates_delivered = counts.iter().map(|&c| u64::from(c.saturating_sub(1))).sum();
    let (mut gap_before, mut gap_after) = (Duration::ZERO, Duration::ZERO);
    for pair in arrivals.windows(2) {
        let gap = pair[1].1.saturating_sub(pair[0].1);
        if pair[1].1 < kill {
            gap_before = gap_before.max(gap);
        } else {
            gap_after = gap_after.max(gap);
        }
    }
    Summary {
        sent,
        received,
        lost: sent - received,
        duplicates_delivered,
        duplicates_suppressed: 0,
        gap_before,
        gap_after,
    }
}

/// Runs the demo; fails when the player lost an answer or got a duplicate.
pub fn run(args: &DemoArgs) -> anyhow::Result<Summary> {
    if args.kill_at >= args.duration {
        bail!("--kill-at must come before the end of --duration");
    }
    // Under --json, stdout carries the JSON alone; the text goes to stderr.
    let json = args.json;
    macro_rules! say {
        ($($t:tt)*) => {
            if json { eprintln!($($t)*) } else { println!($($t)*) }
        };
    }
    let timeline = args.json || args.plot.is_some();
    let exe = std::env::current_exe().context("cannot find our own executable")?;
    say!(
        "Spotable demo: {} replicas, one proxy, a player sending {} datagrams/s for {:?}.",
        args.replicas,
        args.rate,
        args.duration
    );
    say!(
        "Replica 2 will be SIGKILLed at {:?}, as a reclaimed spot node would be.\n",
        args.kill_at
    );

    let replica_args: &[&str] = if timeline {
        &["replica", "--log-answers"]
    } else {
        &["replica"]
    };
    let mut replicas: Vec<ReplicaProcess> = (0..args.replicas)
        .map(|_| spawn_replica(&exe, replica_args))
        .collect::<anyhow::Result<_>>()?;
    for (i, r) in replicas.iter().enumerate() {
        say!(
            "  replica {} listening on {} (pid {})",
            i + 1,
            r.addr,
            r.process.pid()
        );
    }
    let mut extra = vec!["--rate-limit", "0", "--dedupe", args.dedupe.as_str()];
    if args.dedupe == "sequence" {
        extra.extend(["--sequence-offset", "0", "--sequence-width", "8"]);
    }
    let addrs: Vec<_> = replicas.iter().map(|r| r.addr).collect();
    let proxy_args = loopback_proxy_args(&addrs, 2, &extra);
    let proxy_args: Vec<&str> = proxy_args.iter().map(String::as_str).collect();
    let proxy = spawn_proxy(&exe, &["proxy"], &proxy_args, false)?;
    let admin = proxy.admin.context("proxy admin address")?;
    say!(
        "  proxy listening on {} (metrics on http://{admin}/metrics)\n",
        proxy.addr
    );

    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.connect(proxy.addr)?;
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    let start = Instant::now();
    let start_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let done = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let receiver = {
        let socket = socket.try_clone()?;
        let done = done.clone();
        let received = received.clone();
        std::thread::spawn(move || {
            let mut arrivals = Vec::new();
            let mut buf = [0u8; 2048];
            while !done.load(Ordering::Acquire) {
                if let Ok(n) = socket.recv(&mut buf)
                    && let Some(seq) = wire::seq_of(&buf[..n])
                {
                    arrivals.push((seq, start.elapsed()));
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
            arrivals
        })
    };

    let total = (args.duration.as_secs_f64() * f64::from(args.rate)) as u64;
    let interval = Duration::from_secs(1) / args.rate;
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("  {bar:40} {pos:>6}/{len} sent  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut buf = Vec::new();
    let mut killed = false;
    let mut last_line = Instant::now();
    for seq in 0..total {
        let due = start + interval * seq as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        if !killed && start.elapsed() >= args.kill_at {
            replicas[KILLED].process.kill()?;
            killed = true;
            let line = format!(
                "  {:>6.2}s  SIGKILL replica 2",
                start.elapsed().as_secs_f64()
            );
            if bar.is_hidden() {
                say!("{line}");
            } else {
                bar.println(line);
            }
        }
        wire::stamp(&mut buf, seq, usize::from(args.payload));
        socket.send(&buf)?;
        bar.set_position(seq + 1);
        let got = received.load(Ordering::Relaxed);
        bar.set_message(format!("{got} answers received"));
        if bar.is_hidden() && last_line.elapsed() >= Duration::from_secs(1) {
            say!(
                "  {:>6.2}s  sent {}  received {got}",
                start.elapsed().as_secs_f64(),
                seq + 1
            );
            last_line = Instant::now();
        }
    }
    // Let the last answers arrive.
    std::thread::sleep(Duration::from_millis(300));
    done.store(true, Ordering::Release);
    let arrivals = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))?;
    bar.finish_and_clear();

    let mut summary = summarize(total, &arrivals, args.kill_at);
    let (_, metrics) = http_get(admin, "/metrics")?;
    summary.duplicates_suppressed =
        metrics_text::value(&metrics, "spotable_duplicates_suppressed_total", &[]).unwrap_or(0.0)
            as u64;
    let picture = if timeline {
        Some(draw(
            args, &replicas, &arrivals, &metrics, start_us, &summary, interval,
        )?)
    } else {
        None
    };
    drop(proxy);
    drop(replicas);

    say!("  sent                    {}", summary.sent);
    say!("  received                {}", summary.received);
    say!("  lost                    {}", summary.lost);
    say!("  duplicates delivered    {}", summary.duplicates_delivered);
    say!(
        "  duplicates suppressed   {}",
        summary.duplicates_suppressed
    );
    say!("  longest gap before kill {:.1} ms", ms(summary.gap_before));
    say!("  longest gap after kill  {:.1} ms", ms(summary.gap_after));
    say!("  (one datagram every {:.1} ms)", ms(interval));
    if summary.lost > 0 || summary.duplicates_delivered > 0 {
        bail!(
            "the player saw {} lost and {} duplicate answers",
            summary.lost,
            summary.duplicates_delivered
        );
    }
    say!("\nThe player lost nothing and saw no duplicate while a replica died.");
    if let Some(t) = picture {
        if let Some(path) = &args.plot {
            say!("Timeline drawn in {}", path.display());
        }
        if json {
            let report = DemoReport {
                sent: summary.sent,
                received: summary.received,
                lost: summary.lost,
                duplicates_delivered: summary.duplicates_delivered,
                duplicates_suppressed: summary.duplicates_suppressed,
                gap_before_ms: ms(summary.gap_before),
                gap_after_ms: ms(summary.gap_after),
                timeline: t,
            };
            println!("{}", serde_json::to_string(&report)?);
        }
    }
    Ok(summary)
}

/// Collects the replicas' answer logs into the timeline, and draws it when asked.
fn draw(
    args: &DemoArgs,
    replicas: &[ReplicaProcess],
    arrivals: &[(u64, Duration)],
    metrics: &str,
    start_us: u64,
    summary: &Summary,
    interval: Duration,
) -> anyhow::Result<Timeline> {
    // The live replicas' last lines may still be in their pipes: wait (with a deadline) until
    // each has logged the last number it answered.
    let last = summary.sent.saturating_sub(1);
    let deadline = Instant::now() + Duration::from_secs(5);
    let answers = loop {
        let answers: Vec<Vec<(u64, u64)>> = replicas
            .iter()
            .map(|r| timeline::parse_answers(&r.log.lines()))
            .collect();
        let complete = answers
            .iter()
            .enumerate()
            .all(|(i, a)| i == KILLED || a.iter().any(|&(seq, _)| seq == last));
        if complete || Instant::now() >= deadline {
            break answers;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let (mut lines, player) = timeline::build(
        &answers,
        arrivals,
        start_us,
        args.duration + Duration::from_millis(300),
    );
    for (line, r) in lines.iter_mut().zip(replicas) {
        line.addr = r.addr.to_string();
        line.proxy_first_answers = metrics_text::value(
            metrics,
            "spotable_replica_first_answers_total",
            &[("replica", &line.addr)],
        )
        .unwrap_or(0.0) as u64;
    }
    let t = Timeline {
        bucket_ms: ms(timeline::BUCKET),
        kill_ms: ms(args.kill_at),
        killed: KILLED,
        interval_ms: ms(interval),
        replicas: lines,
        player,
        gap_after_ms: ms(summary.gap_after),
    };
    if let Some(path) = &args.plot {
        timeline::plot(&t, path)?;
    }
    Ok(t)
}

/// The replica the demo kills (0-based): "replica 2".
const KILLED: usize = 1;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_counts_loss_duplicates_and_gaps() {
        let ms = Duration::from_millis;
        let arrivals = [
            (0, ms(0)),
            (1, ms(10)),
            (1, ms(11)),
            (3, ms(40)),
            (4, ms(45)),
        ];
        let s = summarize(5, &arrivals, ms(20));
        assert_eq!(s.received, 4);
        assert_eq!(s.lost, 1);
        assert_eq!(s.duplicates_delivered, 1);
        assert_eq!(s.gap_before, ms(10));
        assert_eq!(s.gap_after, ms(29));
    }
}
