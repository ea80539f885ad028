//! Per-replica series: which copy of which game answers, wins, or has gone silent.
//!
//! Workers count each replica's answers into a plain map and add it here on their tick; the
//! admin endpoint renders one series per replica of the current set at scrape time, so a
//! replica that leaves the set leaves `/metrics` with it. Cardinality is the replica set's
//! size, bounded by discovery.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use spotable_core::histogram::Histogram;

use crate::replicas::{ReplicaState, Snapshot};

/// Series names.
pub mod names {
    /// Answers received from a replica.
    pub const ANSWERS: &str = "spotable_replica_answers_total";
    /// Answers of a replica that were the first copy and reached the player.
    pub const FIRSTS: &str = "spotable_replica_first_answers_total";
    /// Seconds since a replica last answered (since it joined, if it never has).
    pub const SILENCE: &str = "spotable_replica_silence_seconds";
    /// A replica's state (1 for the state it is in): `ready` or `draining` as discovery says,
    /// or `unresponsive` while it answers no session and new sessions pass it over, or
    /// `unreachable` while the kernel reports its port or host unreachable (ICMP).
    pub const STATE: &str = "spotable_replica_state";
    /// How far behind the delivered copy a replica's suppressed copies arrive.
    pub const LAG: &str = "spotable_replica_lag_seconds";
    /// Replicas of each game routed by token, by `state` (0 when a game has none left).
    pub const GAME_REPLICAS: &str = "spotable_game_replicas";
}

/// How finely `spotable_replica_lag_seconds` is broken down (`--lag-histogram`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LagHistogram {
    /// One per replica, labelled `game` and `replica` (default).
    #[default]
    Replica,
    /// One per game (all its replicas' copies together), labelled `game`.
    Game,
    /// None.
    Off,
}

/// One worker's counts since its last flush, by replica.
#[derive(Debug, Default)]
pub struct Tally {
    by_replica: HashMap<SocketAddr, Counts, foldhash::fast::RandomState>,
}

#[derive(Debug, Clone, Copy)]
struct Counts {
    answers: u64,
    firsts: u64,
    last: Instant,
    lag: Histogram,
}

impl Counts {
    fn new(last: Instant) -> Self {
        Self {
            answers: 0,
            firsts: 0,
            last,
            lag: Histogram::default(),
        }
    }
}

impl Tally {
    /// One answer from `replica` at `now`: delivered (`first`), or a copy that arrived
    /// `behind` the delivered one.
    pub fn answer(
        &mut self,
        replica: SocketAddr,
        first: bool,
        behind: Option<Duration>,
        now: Instant,
    ) {
        let c = self
            .by_replica
            .entry(canonical(replica))
            .or_insert_with(|| Counts::new(now));
        c.answers += 1;
        c.firsts += u64::from(first);
        c.last = now;
        if let Some(b) = behind {
            c.lag.record(b);
        }
    }
}

/// An IPv4-mapped address (as a dual-stack socket reports it) as the IPv4 address it is.
fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(a, |v4| SocketAddr::new(v4.into(), a.port())),
        IpAddr::V4(_) => a,
    }
}

/// The workers' counts summed, by replica.
#[derive(Debug, Default)]
pub struct Registry {
    /// Answers, wins and lag since the replica was first seen; `last`: its last answer, or
    /// when it was first seen.
    totals: Mutex<HashMap<SocketAddr, Counts>>,
    /// When a worker last found each replica answering no session while others answer.
    passed_over: Mutex<HashMap<SocketAddr, Instant>>,
    /// When a worker last had a replica reported unreachable (ICMP) and not heard since.
    unreachable: Mutex<HashMap<SocketAddr, Instant>>,
}

/// How long a worker's finding that a replica is unresponsive stands without being repeated
/// (workers review on every tick).
const PASSED_OVER_FOR: Duration = Duration::from_secs(1);

impl Registry {
    /// Adds a worker's tally and empties it (keeping its memory).
    pub fn flush(&self, tally: &mut Tally) {
        if tally.by_replica.is_empty() {
            return;
        }
        let mut totals = self.totals.lock().unwrap_or_else(PoisonError::into_inner);
        for (addr, c) in tally.by_replica.drain() {
            let t = totals.entry(addr).or_insert_with(|| Counts::new(c.last));
            t.answers += c.answers;
            t.firsts += c.firsts;
            t.last = t.last.max(c.last);
            t.lag.merge(&c.lag);
        }
    }

    /// A worker found these replicas answering none of its sessions at `now`.
    pub fn passed_over(&self, replicas: &[SocketAddr], now: Instant) {
        if replicas.is_empty() {
            return;
        }
        let mut p = self
            .passed_over
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for r in replicas {
            p.insert(canonical(*r), now);
        }
    }

    /// A worker holds these replicas unreachable at `now` (reported by ICMP, not heard since).
    pub fn unreachable(&self, replicas: impl Iterator<Item = SocketAddr>, now: Instant) {
        let mut u = self
            .unreachable
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for r in replicas {
            u.insert(canonical(r), now);
        }
    }

    /// Notes when each replica of `snapshot` was first seen, so a replica that never answers
    /// is silent from when it joined (workers call this when their set changes).
    pub fn seen(&self, snapshot: &Snapshot, now: Instant) {
        let mut totals = self.totals.lock().unwrap_or_else(PoisonError::into_inner);
        for r in &snapshot.replicas {
            totals
                .entry(canonical(r.addr))
                .or_insert_with(|| Counts::new(now));
        }
    }

    /// The series of every replica in `snapshot` (each game's, labelled with it) at `now`,
    /// the lag histogram broken down by `lag`; forgets replicas no longer in it.
    pub fn render(&self, snapshot: &Snapshot, now: Instant, lag: LagHistogram) -> String {
        let mut totals = self.totals.lock().unwrap_or_else(PoisonError::into_inner);
        let mut rows: Vec<(&str, SocketAddr, ReplicaState)> = Vec::new();
        if snapshot.games.is_empty() {
            rows.extend(snapshot.replicas.iter().map(|r| ("", r.addr, r.state)));
        } else {
            for g in &snapshot.games {
                rows.extend(
                    g.replicas
                        .replicas
                        .iter()
                        .map(|r| (&*g.name, r.addr, r.state)),
                );
            }
        }
        let present: std::collections::HashSet<SocketAddr> =
            rows.iter().map(|(_, a, _)| canonical(*a)).collect();
        totals.retain(|a, _| present.contains(a));
        let mut passed_over = self
            .passed_over
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        passed_over.retain(|a, at| {
            present.contains(a) && now.saturating_duration_since(*at) < PASSED_OVER_FOR
        });
        let mut unreachable = self
            .unreachable
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        unreachable.retain(|a, at| {
            present.contains(a) && now.saturating_duration_since(*at) < PASSED_OVER_FOR
        });
        // Unresponsive (unreachable) until it answers again.
        let unresponsive =
            |addr: SocketAddr, t: &Counts| passed_over.get(&addr).is_some_and(|at| t.last < *at);
        let dead =
            |addr: SocketAddr, t: &Counts| unreachable.get(&addr).is_some_and(|at| t.last < *at);
        let mut out = String::new();
        let mut series = |name: &str, kind: &str, help: &str, value: &dyn Fn(&Counts) -> f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (game, addr, _) in &rows {
                let t = *totals
                    .entry(canonical(*addr))
                    .or_insert_with(|| Counts::new(now));
                let _ = writeln!(out, "{name}{{{}}} {}", labels(game, *addr), value(&t));
            }
        };
        series(
            names::ANSWERS,
            "counter",
            "Answers received from a replica",
            &|t| t.answers as f64,
        );
        series(
            names::FIRSTS,
            "counter",
            "Answers of a replica that were the first copy and reached the player",
            &|t| t.firsts as f64,
        );
        series(
            names::SILENCE,
            "gauge",
            "Seconds since a replica last answered (since it joined, if it never has)",
            &|t| {
                now.saturating_duration_since(t.last)
                    .max(Duration::ZERO)
                    .as_secs_f64()
            },
        );
        if lag != LagHistogram::Off {
            let _ = writeln!(
                out,
                "# HELP {s} How far behind the delivered copy a replica's suppressed copies \
                 arrive (copies and sequence modes; a replica that always wins has none)\n\
                 # TYPE {s} histogram",
                s = names::LAG
            );
        }
        match lag {
            LagHistogram::Replica => {
                for (game, addr, _) in &rows {
                    if let Some(t) = totals.get(&canonical(*addr)) {
                        t.lag.write(&mut out, names::LAG, &labels(game, *addr));
                    }
                }
            }
            LagHistogram::Game => {
                // Rows come grouped by game, in the snapshot's order.
                for group in rows.chunk_by(|a, b| a.0 == b.0) {
                    let mut sum = Histogram::default();
                    for (_, addr, _) in group {
                        if let Some(t) = totals.get(&canonical(*addr)) {
                            sum.merge(&t.lag);
                        }
                    }
                    let game = group[0].0;
                    let labels = match game {
                        "" => String::new(),
                        g => format!("game=\"{}\"", escape(g)),
                    };
                    sum.write(&mut out, names::LAG, &labels);
                }
            }
            LagHistogram::Off => {}
        }
        let _ = writeln!(
            out,
            "# HELP {s} A replica's state: 1 for the state it is in\n# TYPE {s} gauge",
            s = names::STATE
        );
        if !snapshot.games.is_empty() {
            let _ = writeln!(
                out,
                "# HELP {n} Replicas of each game routed by token, by state\n# TYPE {n} gauge",
                n = names::GAME_REPLICAS
            );
        }
        for g in &snapshot.games {
            for s in [ReplicaState::Ready, ReplicaState::Draining] {
                let n = g.replicas.replicas.iter().filter(|r| r.state == s).count();
                let _ = writeln!(
                    out,
                    "{}{{game=\"{}\",state=\"{}\"}} {n}",
                    names::GAME_REPLICAS,
                    escape(&g.name),
                    s.as_str()
                );
            }
        }
        for (game, addr, state) in &rows {
            let a = canonical(*addr);
            let gone = totals.get(&a).is_some_and(|t| dead(a, t));
            let silent = !gone && totals.get(&a).is_some_and(|t| unresponsive(a, t));
            let fine = !silent && !gone;
            let states = [
                ("ready", fine && *state == ReplicaState::Ready),
                ("draining", fine && *state == ReplicaState::Draining),
                ("unresponsive", silent),
                ("unreachable", gone),
            ];
            for (name, on) in states {
                let _ = writeln!(
                    out,
                    "{}{{{},state=\"{name}\"}} {}",
                    names::STATE,
                    labels(game, *addr),
                    u8::from(on)
                );
            }
        }
        out
    }
}

fn labels(game: &str, addr: SocketAddr) -> String {
    if game.is_empty() {
        format!("replica=\"{addr}\"")
    } else {
        format!("game=\"{}\",replica=\"{addr}\"", escape(game))
    }
}

/// A label value as the exposition format quotes it.
pub(crate) fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replicas::{Replica, ReplicaSet};

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn counts_add_up_silence_grows_and_leavers_vanish() {
        let t0 = Instant::now();
        let set = ReplicaSet::new();
        set.publish(vec![
            Replica::ready(addr(7001)),
            Replica {
                addr: addr(7002),
                state: ReplicaState::Draining,
            },
        ]);
        let registry = Registry::default();
        registry.seen(&set.snapshot(), t0);
        let (mut w1, mut w2) = (Tally::default(), Tally::default());
        w1.answer(addr(7001), true, None, t0);
        w1.answer(addr(7001), false, Some(Duration::from_millis(3)), t0);
        // A dual-stack socket reports the same replica IPv4-mapped.
        w2.answer("[::ffff:127.0.0.1]:7001".parse().unwrap(), true, None, t0);
        registry.flush(&mut w1);
        registry.flush(&mut w2);
        let text = registry.render(
            &set.snapshot(),
            t0 + Duration::from_secs(3),
            LagHistogram::Replica,
        );
        let v = |name: &str, labels: &[(&str, &str)]| {
            spotable_fixtures::metrics_text::value(&text, name, labels).unwrap()
        };
        let a = [("replica", "127.0.0.1:7001")];
        let b = [("replica", "127.0.0.1:7002")];
        assert_eq!(v(names::ANSWERS, &a), 3.0);
        assert_eq!(v(names::FIRSTS, &a), 2.0);
        assert_eq!(v(names::SILENCE, &a), 3.0);
        let lag = format!("{}_bucket", names::LAG);
        let le = |le| [("replica", "127.0.0.1:7001"), ("le", le)];
        assert_eq!(v(&lag, &le("0.0025")), 0.0);
        assert_eq!(v(&lag, &le("0.005")), 1.0);
        let lag_count = format!("{}_count", names::LAG);
        assert_eq!(v(&lag_count, &a), 1.0);
        assert_eq!(v(&lag_count, &b), 0.0, "present at zero");
        assert_eq!(v(names::ANSWERS, &b), 0.0, "present at zero");
        assert_eq!(
            v(
                names::STATE,
                &[("replica", "127.0.0.1:7002"), ("state", "draining")]
            ),
            1.0
        );
        assert!(spotable_fixtures::metrics_text::without_help(&text).is_empty());
        // 7002 never answers: its silence grows from when it joined.
        assert_eq!(v(names::SILENCE, &b), 3.0);
        let later = registry.render(
            &set.snapshot(),
            t0 + Duration::from_secs(10),
            LagHistogram::Replica,
        );
        let silence_b = spotable_fixtures::metrics_text::value(&later, names::SILENCE, &b);
        assert_eq!(silence_b, Some(10.0));
        // 7001 leaves the set: its series go.
        set.publish(vec![Replica::ready(addr(7002))]);
        let gone = registry.render(
            &set.snapshot(),
            t0 + Duration::from_secs(11),
            LagHistogram::Replica,
        );
        assert!(!gone.contains("127.0.0.1:7001"), "{gone}");
    }

    /// A set of games routed by 4-byte tokens: (name, token, replicas).
    fn games(list: Vec<(&str, &[u8], Vec<Replica>)>) -> ReplicaSet {
        let settings = std::sync::Arc::new(crate::server::settings_for_tests());
        let set = ReplicaSet::new();
        let spec = crate::token::TokenSpec::new(4, crate::token::TokenAt::Suffix).unwrap();
        let specs = list
            .into_iter()
            .map(|(name, token, replicas)| crate::replicas::GameSpec {
                name: name.into(),
                tokens: vec![token.to_vec()],
                replicas,
                settings: settings.clone(),
            })
            .collect();
        set.publish_games(spec, specs).unwrap();
        set
    }

    #[test]
    fn games_show_their_replica_counts_even_at_zero_and_label_their_replicas() {
        let set = games(vec![
            ("arena", b"aaaa", vec![Replica::ready(addr(7001))]),
            ("empty", b"bbbb", vec![]),
        ]);
        let t0 = Instant::now();
        let text = Registry::default().render(&set.snapshot(), t0, LagHistogram::Replica);
        let v = |labels: &[(&str, &str)]| {
            spotable_fixtures::metrics_text::value(&text, names::GAME_REPLICAS, labels)
        };
        assert_eq!(v(&[("game", "arena"), ("state", "ready")]), Some(1.0));
        assert_eq!(
            v(&[("game", "empty"), ("state", "ready")]),
            Some(0.0),
            "{text}"
        );
        assert_eq!(v(&[("game", "empty"), ("state", "draining")]), Some(0.0));
        let answers = spotable_fixtures::metrics_text::value(
            &text,
            names::ANSWERS,
            &[("game", "arena"), ("replica", "127.0.0.1:7001")],
        );
        assert_eq!(answers, Some(0.0));
        assert!(spotable_fixtures::metrics_text::without_help(&text).is_empty());
    }

    #[test]
    fn the_lag_histogram_per_game_adds_its_replicas_up_and_off_leaves_it_out() {
        let two = vec![Replica::ready(addr(7001)), Replica::ready(addr(7002))];
        let set = games(vec![
            ("arena", b"aaaa", two),
            ("quiet", b"bbbb", vec![Replica::ready(addr(7003))]),
        ]);
        let t0 = Instant::now();
        let registry = Registry::default();
        let mut w = Tally::default();
        w.answer(addr(7001), false, Some(Duration::from_millis(3)), t0);
        w.answer(addr(7002), false, Some(Duration::from_millis(30)), t0);
        w.answer(addr(7002), false, Some(Duration::from_millis(30)), t0);
        registry.flush(&mut w);

        let text = registry.render(&set.snapshot(), t0, LagHistogram::Game);
        let v = |labels: &[(&str, &str)]| {
            spotable_fixtures::metrics_text::value(&text, &format!("{}_count", names::LAG), labels)
        };
        assert_eq!(v(&[("game", "arena")]), Some(3.0), "{text}");
        assert_eq!(v(&[("game", "quiet")]), Some(0.0), "present at zero");
        let bucket = |le: &str| {
            spotable_fixtures::metrics_text::value(
                &text,
                &format!("{}_bucket", names::LAG),
                &[("game", "arena"), ("le", le)],
            )
        };
        assert_eq!(bucket("0.005"), Some(1.0));
        assert_eq!(bucket("0.05"), Some(3.0));
        let lag_lines = text
            .lines()
            .filter(|l| l.starts_with(names::LAG))
            .collect::<Vec<_>>();
        assert!(lag_lines.iter().all(|l| !l.contains("replica=")));
        // 16 buckets, a sum and a count per game.
        assert_eq!(lag_lines.len(), 2 * 18, "{lag_lines:#?}");
        assert!(spotable_fixtures::metrics_text::without_help(&text).is_empty());
        // Everything else is still per replica.
        let answers = spotable_fixtures::metrics_text::value(
            &text,
            names::ANSWERS,
            &[("game", "arena"), ("replica", "127.0.0.1:7002")],
        );
        assert_eq!(answers, Some(2.0));

        let off = registry.render(&set.snapshot(), t0, LagHistogram::Off);
        assert!(!off.contains(names::LAG), "{off}");
        assert!(off.contains(names::ANSWERS));
        assert!(spotable_fixtures::metrics_text::without_help(&off).is_empty());
    }
}
