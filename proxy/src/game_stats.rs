//! Per-game series: how far each game's replicas are trusted (agreement before trust), and
//! how many sessions each holds against its quota.
//!
//! Rendered at scrape time from the games' shared counters, one series per game of the
//! current set (the implicit game of a proxy without tokens has no `game` label), so a game
//! that leaves the set leaves `/metrics` with it.

use std::fmt::Write as _;

use crate::replicas::{GameCounters, Snapshot};

/// Series names.
pub mod names {
    /// 1 while a game's replicas are known to answer in two worlds (its new sessions start
    /// as `primary`), else 0.
    pub const DIVERGENT: &str = "spotable_game_divergent";
    /// Sessions that began to trust a second replica, by game.
    pub const PROMOTED: &str = "spotable_sessions_promoted_total";
    /// Sessions that fell back to one replica, by game and `reason`.
    pub const DEMOTED: &str = "spotable_sessions_demoted_total";
    /// Sessions open now, by game (what `max_sessions` holds it to).
    pub const SESSIONS: &str = "spotable_game_sessions";
}

/// The series of every game in `snapshot` (or of the implicit game, counted in `implicit`).
pub fn render(snapshot: &Snapshot, implicit: &GameCounters) -> String {
    let games: Vec<(&str, &GameCounters)> = if snapshot.games.is_empty() {
        vec![("", implicit)]
    } else {
        snapshot
            .games
            .iter()
            .map(|g| (&*g.name, &*g.counters))
            .collect()
    };
    let mut out = String::new();
    let mut series =
        |name: &str, kind: &str, help: &str, extra: &str, value: &dyn Fn(&GameCounters) -> u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (game, counters) in &games {
                let mut labels = match *game {
                    "" => String::new(),
                    g => format!("game=\"{}\"", crate::replica_stats::escape(g)),
                };
                if !extra.is_empty() {
                    if !labels.is_empty() {
                        labels.push(',');
                    }
                    labels.push_str(extra);
                }
                let _ = writeln!(out, "{name}{{{labels}}} {}", value(counters));
            }
        };
    series(
        names::DIVERGENT,
        "gauge",
        "1 while a game's replicas are known to answer in two worlds: its sessions deliver one \
         replica's answers, and new ones start as primary until every replica is replaced",
        "",
        &|c| u64::from(c.is_divergent()),
    );
    series(
        names::SESSIONS,
        "gauge",
        "Sessions open now, by game, over every worker (a game's max_sessions holds it)",
        "",
        &|c| c.sessions() as u64,
    );
    series(
        names::PROMOTED,
        "counter",
        "Sessions that began to trust a second replica after it matched the delivered answers",
        "",
        &|c| c.read().promoted,
    );
    series(
        names::DEMOTED,
        "counter",
        "Sessions that fell back to one replica's answers, by reason",
        "reason=\"divergence\"",
        &|c| c.read().demoted,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replicas::{GameSpec, Replica, ReplicaSet};
    use crate::token::{TokenAt, TokenSpec};

    #[test]
    fn one_series_per_game_and_the_implicit_game_unlabelled() {
        let implicit = GameCounters::default();
        let text = render(&Snapshot::default(), &implicit);
        assert_eq!(
            spotable_fixtures::metrics_text::value(&text, names::DIVERGENT, &[]),
            Some(0.0)
        );
        assert!(spotable_fixtures::metrics_text::without_help(&text).is_empty());
        let set = ReplicaSet::new();
        let spec = TokenSpec::new(4, TokenAt::Suffix).unwrap();
        let settings = std::sync::Arc::new(crate::server::settings_for_tests());
        let game = |name: &str, token: &[u8], port| GameSpec {
            name: name.into(),
            tokens: vec![token.to_vec()],
            replicas: vec![Replica::ready(std::net::SocketAddr::from((
                [127, 0, 0, 1],
                port,
            )))],
            settings: settings.clone(),
        };
        set.publish_games(
            spec,
            vec![game("arena", b"aaaa", 7001), game("bazaar", b"bbbb", 7002)],
        )
        .unwrap();
        let snap = set.snapshot();
        let now = std::time::Instant::now();
        snap.games[1]
            .counters
            .mark_divergent(&snap.games[1].replicas.replicas, now);
        snap.games[1].counters.add(crate::replicas::GameTally {
            demoted: 3,
            promoted: 2,
            ..Default::default()
        });
        let text = render(&snap, &implicit);
        let v = |name, labels: &[(&str, &str)]| {
            spotable_fixtures::metrics_text::value(&text, name, labels).unwrap()
        };
        assert_eq!(v(names::DIVERGENT, &[("game", "arena")]), 0.0);
        assert_eq!(v(names::DIVERGENT, &[("game", "bazaar")]), 1.0);
        assert_eq!(v(names::PROMOTED, &[("game", "bazaar")]), 2.0);
        assert_eq!(
            v(
                names::DEMOTED,
                &[("game", "bazaar"), ("reason", "divergence")]
            ),
            3.0
        );
        assert!(spotable_fixtures::metrics_text::without_help(&text).is_empty());
    }
}
