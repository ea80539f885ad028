//! `compare`'s rows for a real multiplayer server: the tick server behind Spotable in each
//! mode, what its players got before and after a kill. These are rows of behaviour, not
//! speed: snapshots per server tick (1.0 is one world, 2.0 two interleaved), answers from a
//! second world, the gap at the kill.

use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::tick_demo::{self, PlayerStream};

/// One mode's row.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TickRow {
    /// The mode as the proxy was given it.
    pub mode: String,
    /// Mean snapshots per server tick before the kill, over the players.
    pub per_tick_before: f64,
    /// Snapshots from a second world before the kill, all players.
    pub second_world: u64,
    /// Times a player's tick stepped back before the kill, all players.
    pub steps_back: u64,
    /// Longest gap after the kill, over the players whose server died, ms.
    pub gap_at_kill_ms: f64,
    /// Least snapshots per tick after the kill, over the players whose server died.
    pub per_tick_after: f64,
    /// Players whose server died.
    pub players_on_killed: usize,
    /// Sessions the proxy demoted.
    pub sessions_demoted: u64,
}

/// The modes measured, as proxy flags.
pub fn modes() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![
        ("copies (default)", vec![]),
        ("copies, --agreement off", vec!["--agreement", "off"]),
        (
            "sequence on the tick",
            vec![
                "--dedupe",
                "sequence",
                "--sequence-offset",
                "0",
                "--sequence-width",
                "4",
            ],
        ),
        ("primary", vec!["--dedupe", "primary"]),
    ]
}

/// Runs each mode once: 2 tick servers 0.8 s apart, `players` players for `run`, the server
/// the first player hears killed half-way.
pub fn run(players: usize, run: Duration) -> anyhow::Result<Vec<TickRow>> {
    let quiet = |_: String| {};
    modes()
        .into_iter()
        .map(|(name, flags)| {
            let r = tick_demo::play_game(2, &flags, players, run, run / 2, &quiet)?;
            Ok(row(name, &r.players, r.sessions_demoted))
        })
        .collect()
}

fn row(mode: &str, players: &[PlayerStream], sessions_demoted: u64) -> TickRow {
    let killed: Vec<&PlayerStream> = players.iter().filter(|p| p.server_killed).collect();
    TickRow {
        mode: mode.into(),
        per_tick_before: players.iter().map(|p| p.per_tick_before).sum::<f64>()
            / players.len().max(1) as f64,
        second_world: players.iter().map(|p| p.second_world_before as u64).sum(),
        steps_back: players.iter().map(|p| p.steps_back_before as u64).sum(),
        gap_at_kill_ms: killed.iter().map(|p| p.gap_after_ms).fold(0.0, f64::max),
        per_tick_after: killed
            .iter()
            .map(|p| p.per_tick_after)
            .fold(f64::INFINITY, f64::min),
        players_on_killed: killed.len(),
        sessions_demoted,
    }
}

/// The section of BENCHMARKS.md.
pub fn markdown(md: &mut String, rows: &[TickRow], setting: &str) {
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "\n## A real multiplayer server\n\n{setting} A snapshot per server tick is one world; 2.0 \
         is two worlds interleaved (the tick steps back for every player). A second world's \
         snapshots are those from a server other than the player's first, before the kill. The \
         gap and the rate after are over the players whose server was killed.\n\n\
         | mode | snapshots per tick before | second world | steps back | gap at the kill ms | \
         per tick after | players on the killed server | sessions demoted |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in rows {
        let after = if r.players_on_killed == 0 {
            "–".to_string()
        } else {
            format!("{:.2}", r.per_tick_after)
        };
        let _ = writeln!(
            md,
            "| {} | {:.2} | {} | {} | {:.0} | {after} | {} | {} |",
            r.mode,
            r.per_tick_before,
            r.second_world,
            r.steps_back,
            r.gap_at_kill_ms,
            r.players_on_killed,
            r.sessions_demoted
        );
    }
}
