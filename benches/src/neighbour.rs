//! `compare`'s noisy-neighbour rows: one game's players measured while another game behind the
//! same proxy is flooded open loop from many ports, far past its packet budget (`max_pps`),
//! against the same flood with tokens no game owns (the floor: what merely reading and
//! dropping costs on the machine) and against no flood at all.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Child;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use spotable_fixtures::process;

use crate::loadgen::Report;

/// The quiet game's token and the flooded game's (both 8 bytes).
const QUIET: &str = "quiet-01";
const NOISY: &str = "noisy-01";
/// A token no game owns: the floor's flood.
const NOBODY: &str = "nobody-1";

/// How the noisy-neighbour rows ran.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    /// The flooded game's `max_pps`.
    pub budget: u32,
    /// The flood: datagrams/s offered, from this many source ports.
    pub flood_rate: u64,
    pub flood_ports: u32,
    /// The quiet game's load: datagrams/s from this many players, for this long per round.
    pub quiet_rate: u64,
    pub quiet_players: u32,
    pub seconds: f64,
    pub rounds: u32,
}

/// One condition the quiet game was measured beside.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// What ran beside it.
    pub beside: String,
    /// The quiet game's players, the median round by p99.
    pub quiet: Report,
    /// The flood's datagrams per second as sent (0 without one).
    pub flood_sent_per_sec: f64,
    /// Flood datagrams the proxy dropped for the budget, and for an unknown token, per second.
    pub budget_drops_per_sec: f64,
    pub unknown_drops_per_sec: f64,
}

/// The rows and how they ran.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Neighbour {
    pub settings: Option<Settings>,
    pub rows: Vec<Row>,
    /// The median over rounds of the quiet game's p99 beside the budgeted flood over its p99
    /// beside the floor in the same round: the two run back to back, so a stall of the shared
    /// machine that moves a whole round moves both.
    #[serde(default)]
    pub p99_vs_floor: Option<f64>,
}

/// What the rows need from `compare`: where its load generator runs.
pub trait Load {
    /// Starts the load generator (`spotable-bench loadgen … --json`) against `target`.
    fn spawn(&self, target: SocketAddr, extra: &[String]) -> anyhow::Result<Child>;
    /// The address the load generator reaches the host's sockets at.
    fn front_ip(&self) -> std::net::Ipv4Addr;
    /// The bench binary (the proxy and the replicas are its subcommands).
    fn exe(&self) -> &Path;
    /// Somewhere for a config file.
    fn tmp(&self) -> &Path;
}

/// The conditions, in the order they are measured each round.
const BESIDE: [&str; 3] = [
    "nothing",
    "a flood of tokens no game owns (the floor)",
    "a flood of a game over its budget",
];

/// Measures the rows: `rounds` rounds of the three conditions, interleaved.
pub fn run(load: &dyn Load, s: &Settings, workers: usize) -> anyhow::Result<Neighbour> {
    let replicas: Vec<_> = (0..2)
        .map(|_| process::spawn_replica(load.exe(), &["replica", "--listen", "127.0.0.1:0"]))
        .collect::<anyhow::Result<_>>()?;
    let config = load.tmp().join("neighbour.toml");
    std::fs::write(
        &config,
        format!(
            "[[game]]\nname = \"quiet\"\ntokens = [\"{QUIET}\"]\nreplicas = [\"{}\"]\n\n\
             [[game]]\nname = \"noisy\"\ntokens = [\"{NOISY}\"]\nreplicas = [\"{}\"]\nmax_pps = {}\n",
            replicas[0].addr, replicas[1].addr, s.budget
        ),
    )?;
    let config = config.display().to_string();
    let workers = workers.to_string();
    // The per-player limit is off: the flood's ports each send more than a player would, and
    // the game's budget is what is measured.
    let args = [
        "--listen",
        "0.0.0.0:0",
        "--admin",
        "127.0.0.1:0",
        "--workers",
        &workers,
        "--log-level",
        // The proxy says where it listens at info; the rest only when it matters.
        "warn,spotable_proxy::server=info,spotable_edge=info",
        "--rate-limit",
        "0",
        "--token-bytes",
        "8",
        "--config",
        &config,
    ];
    let proxy = process::spawn_proxy(load.exe(), &["proxy"], &args, false)?;
    let admin = proxy.admin.context("the proxy has no admin address")?;
    let target = SocketAddr::new(load.front_ip().into(), proxy.addr.port());
    let quiet_load = |suffix: &str, rate: u64, flows: u32, secs: f64| -> Vec<String> {
        [
            "--mode",
            "open",
            "--rate",
            &rate.to_string(),
            "--flows",
            &flows.to_string(),
            "--payload",
            "64",
            "--duration",
            &format!("{}ms", (secs * 1000.0) as u64),
            "--warmup",
            "500ms",
            "--suffix",
            suffix,
        ]
        .map(String::from)
        .to_vec()
    };
    let drops =
        |reason: &str| process::scrape(admin, "spotable_drops_total", &[("reason", reason)]);
    let mut measured: Vec<Vec<Row>> = vec![Vec::new(); BESIDE.len()];
    for _ in 0..s.rounds {
        for (i, beside) in BESIDE.iter().enumerate() {
            let flood = match i {
                0 => None,
                1 => Some(NOBODY),
                _ => Some(NOISY),
            };
            let (budget0, unknown0) = (drops("game_rate_limited")?, drops("unknown_token")?);
            // The flood starts first and outlasts the quiet game's run (and its warm-up).
            let flooding = flood
                .map(|token| {
                    let secs = s.seconds + 1.5;
                    load.spawn(
                        target,
                        &quiet_load(token, s.flood_rate, s.flood_ports, secs),
                    )
                })
                .transpose()?;
            let quiet = load.spawn(
                target,
                &quiet_load(QUIET, s.quiet_rate, s.quiet_players, s.seconds),
            )?;
            let quiet = report(quiet)?;
            let flood_report = flooding.map(report).transpose()?;
            let seconds = flood_report.as_ref().map_or(1.0, |r| r.seconds.max(1e-3));
            measured[i].push(Row {
                beside: (*beside).into(),
                quiet,
                flood_sent_per_sec: flood_report
                    .as_ref()
                    .map_or(0.0, |r| r.sent as f64 / seconds),
                budget_drops_per_sec: (drops("game_rate_limited")? - budget0) / seconds,
                unknown_drops_per_sec: (drops("unknown_token")? - unknown0) / seconds,
            });
        }
    }
    drop(proxy);
    drop(replicas);
    let mut ratios: Vec<f64> = measured[1]
        .iter()
        .zip(&measured[2])
        .map(|(floor, budgeted)| budgeted.quiet.rtt_us.p99 / floor.quiet.rtt_us.p99.max(1e-9))
        .collect();
    ratios.sort_by(f64::total_cmp);
    let p99_vs_floor = ratios.get(ratios.len() / 2).copied();
    let rows = measured
        .into_iter()
        .map(|mut rounds| {
            rounds.sort_by(|a, b| a.quiet.rtt_us.p99.total_cmp(&b.quiet.rtt_us.p99));
            rounds.swap_remove(rounds.len() / 2)
        })
        .collect();
    Ok(Neighbour {
        settings: Some(s.clone()),
        rows,
        p99_vs_floor,
    })
}

fn report(child: Child) -> anyhow::Result<Report> {
    let out = child.wait_with_output().context("load generator")?;
    anyhow::ensure!(
        out.status.success(),
        "load generator failed ({})",
        out.status
    );
    serde_json::from_slice(&out.stdout).context("load generator report")
}

/// The quiet game's loss beside the budgeted flood, in percent, and its p99 there against its
/// p99 beside the floor: the two figures the goal is set on.
pub fn goals(n: &Neighbour) -> Option<(f64, f64)> {
    let [_, floor, budgeted] = n.rows.as_slice() else {
        return None;
    };
    let q = &budgeted.quiet;
    let lost = 100.0 * q.lost as f64 / (q.sent.max(1) as f64);
    let unpaired = q.rtt_us.p99 / floor.quiet.rtt_us.p99.max(1e-9);
    Some((lost, n.p99_vs_floor.unwrap_or(unpaired)))
}

/// The section of BENCHMARKS.md.
pub fn markdown(md: &mut String, n: &Neighbour) {
    let Some(s) = &n.settings else {
        return;
    };
    let _ = writeln!(
        md,
        "\n## A noisy neighbour\n\nTwo games behind one proxy (token routing, the workers as \
         above). The quiet game's {} players send {} datagrams/s together for {:.0} s (open \
         loop); beside them a flood of {} datagrams/s offered from {} source ports, either with \
         tokens no game owns (the floor: what reading and dropping costs on this machine) or \
         with the tokens of a game whose `max_pps` is {}. Median round of {} by the quiet game's \
         p99; ratios against the quiet game alone. The goal on the p99 is judged on the median \
         over rounds of the ratio to the floor within each round (they run back to back, so a \
         stall of the shared machine moves both): {}.\n\n\
         | beside the quiet game | its p50 µs | its p99 µs | p99 vs alone | lost | flood sent/s | \
         dropped for the budget/s | dropped as unknown/s |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|",
        s.quiet_players,
        s.quiet_rate,
        s.seconds,
        s.flood_rate,
        s.flood_ports,
        s.budget,
        s.rounds,
        n.p99_vs_floor
            .map_or("not measured".into(), |r| format!("{r:.2}×"))
    );
    let alone = n.rows.first().map_or(1.0, |r| r.quiet.rtt_us.p99.max(1e-9));
    for r in &n.rows {
        let q = &r.quiet;
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.2} | {} of {} | {:.0} | {:.0} | {:.0} |",
            r.beside,
            q.rtt_us.p50,
            q.rtt_us.p99,
            q.rtt_us.p99 / alone,
            q.lost,
            q.sent,
            r.flood_sent_per_sec,
            r.budget_drops_per_sec,
            r.unknown_drops_per_sec
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(beside: &str, sent: u64, lost: u64, p99: f64) -> Row {
        Row {
            beside: beside.into(),
            quiet: Report {
                sent,
                lost,
                rtt_us: crate::loadgen::Percentiles {
                    p50: p99 / 2.0,
                    p99,
                    ..Default::default()
                },
                ..Report::default()
            },
            flood_sent_per_sec: 40_000.0,
            budget_drops_per_sec: 38_000.0,
            unknown_drops_per_sec: 0.0,
        }
    }

    #[test]
    fn the_goals_are_loss_beside_the_budgeted_flood_and_its_p99_against_the_floor() {
        let mut n = Neighbour {
            settings: Some(Settings {
                budget: 2000,
                flood_rate: 40_000,
                flood_ports: 512,
                quiet_rate: 4000,
                quiet_players: 64,
                seconds: 3.0,
                rounds: 3,
            }),
            p99_vs_floor: None,
            rows: vec![
                row(BESIDE[0], 12_000, 0, 300.0),
                row(BESIDE[1], 12_000, 0, 800.0),
                row(BESIDE[2], 12_000, 60, 1000.0),
            ],
        };
        assert_eq!(goals(&n), Some((0.5, 1.25)));
        let mut md = String::new();
        markdown(&mut md, &n);
        assert!(
            md.contains("| a flood of a game over its budget | 500 | 1000 | 3.33 | 60 of 12000 |"),
            "{md}"
        );
        // Paired within rounds, when measured so, the median ratio is the one judged.
        n.p99_vs_floor = Some(1.1);
        assert_eq!(goals(&n), Some((0.5, 1.1)));
        n.rows.pop();
        assert_eq!(goals(&n), None, "not measured");
    }
}
