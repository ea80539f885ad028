//! Each game held to its share, in simulated time: its session quota (`max_sessions`) and its
//! packet budget (`max_pps`), and the quota's count staying exact through everything that
//! opens, closes or moves sessions.

use proptest::prelude::*;

use super::*;
use crate::token::{TokenAt, TokenSpec};

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn settings() -> Settings {
    Settings {
        mode: Mode::Copies {
            window: Duration::from_secs(1),
            max_entries: 64,
        },
        agreement: Agreement::Off,
        session_timeout: Duration::from_secs(60),
        rate: None,
        max_datagram: 1500,
        fanout: MAX_SLOTS,
        late_join: false,
        replica_header: None,
        max_sessions: None,
        max_pps: None,
        token: Some(spec()),
    }
}

fn spec() -> TokenSpec {
    TokenSpec::new(4, TokenAt::Suffix).unwrap()
}

/// A game with `ports` as replicas and the given limits.
fn game(
    name: &str,
    token: &[u8],
    ports: &[u16],
    max_sessions: Option<usize>,
    max_pps: Option<Rate>,
) -> crate::replicas::GameSpec {
    crate::replicas::GameSpec {
        name: name.into(),
        tokens: vec![token.to_vec()],
        replicas: ports
            .iter()
            .map(|&p| crate::replicas::Replica::ready(addr(p)))
            .collect(),
        settings: Arc::new(Settings {
            max_sessions,
            max_pps,
            ..settings()
        }),
    }
}

fn table(set: &crate::replicas::ReplicaSet, max: usize) -> SessionTable {
    SessionTable::new(Arc::new(settings()), Admission::new(max), set.snapshot(), 7)
}

fn open_in(set: &crate::replicas::ReplicaSet, name: &str) -> usize {
    let snapshot = set.snapshot();
    let g = snapshot.games.iter().find(|g| &*g.name == name).unwrap();
    g.counters.sessions()
}

fn send(
    t: &mut SessionTable,
    client: u16,
    datagram: &[u8],
    now: Instant,
) -> Result<bool, DropReason> {
    match t.on_datagram(0, addr(client), datagram, false, now) {
        ClientVerdict::Forward { opened, .. } => Ok(opened),
        ClientVerdict::Drop(reason) => Err(reason),
    }
}

#[test]
fn a_game_at_its_quota_refuses_new_players_and_the_other_game_is_untouched() {
    let now = crate::epoch();
    let set = crate::replicas::ReplicaSet::new();
    set.publish_games(
        spec(),
        vec![
            game("arena", b"aaaa", &[7001, 7002], Some(3), None),
            game("bazaar", b"bbbb", &[7101], None, None),
        ],
    )
    .unwrap();
    // Two workers' tables share the quota and the proxy's budget of 10.
    let admission = Admission::new(10);
    let new = |set: &crate::replicas::ReplicaSet| {
        SessionTable::new(Arc::new(settings()), admission.clone(), set.snapshot(), 7)
    };
    let (mut t1, mut t2) = (new(&set), new(&set));
    assert_eq!(send(&mut t1, 5000, b"x|aaaa", now), Ok(true));
    assert_eq!(send(&mut t1, 5001, b"x|aaaa", now), Ok(true));
    assert_eq!(send(&mut t2, 5002, b"x|aaaa", now), Ok(true));
    assert_eq!(open_in(&set, "arena"), 3);
    for (t, port) in [(&mut t1, 5003), (&mut t2, 5004)] {
        assert_eq!(
            send(t, port, b"x|aaaa", now),
            Err(DropReason::GameSessionLimit)
        );
    }
    assert_eq!(open_in(&set, "arena"), 3, "a refusal takes nothing");
    assert_eq!(admission.in_use(), 3, "nor from the proxy's budget");
    // Its players that are in carry on; the other game's new players get in.
    assert_eq!(send(&mut t1, 5000, b"y|aaaa", now), Ok(false));
    for port in 6000..6007 {
        assert_eq!(send(&mut t2, port, b"x|bbbb", now), Ok(true));
    }
    assert_eq!(open_in(&set, "bazaar"), 7);
    // The proxy's own limit still holds over both.
    assert_eq!(
        send(&mut t2, 6100, b"x|bbbb", now),
        Err(DropReason::SessionLimit)
    );
    // A session idling out makes room.
    let mut closed = Vec::new();
    t2.expire(now + Duration::from_secs(61), &mut closed);
    assert_eq!(closed.len(), 8);
    assert_eq!(open_in(&set, "arena"), 2);
    assert_eq!(open_in(&set, "bazaar"), 0);
    assert_eq!(send(&mut t2, 5004, b"x|aaaa", now), Ok(true));
    assert_eq!(open_in(&set, "arena"), 3);
}

#[test]
fn the_quota_follows_a_game_that_leaves_and_comes_back_between_two_adoptions() {
    let now = crate::epoch();
    let set = crate::replicas::ReplicaSet::new();
    let both = || {
        vec![
            game("arena", b"aaaa", &[7001], Some(2), None),
            game("bazaar", b"bbbb", &[7101], None, None),
        ]
    };
    set.publish_games(spec(), both()).unwrap();
    let mut t = table(&set, 100);
    assert_eq!(send(&mut t, 5000, b"x|aaaa", now), Ok(true));
    assert_eq!(send(&mut t, 5001, b"x|aaaa", now), Ok(true));
    let before = set.snapshot().games[0].counters.clone();
    // Gone and back before this table looked: the game has new counters.
    set.publish_games(spec(), vec![game("bazaar", b"bbbb", &[7101], None, None)])
        .unwrap();
    set.publish_games(spec(), both()).unwrap();
    assert_eq!(open_in(&set, "arena"), 0);
    apply_quietly(&mut t, &set, now);
    assert_eq!(
        open_in(&set, "arena"),
        2,
        "its sessions moved to the new count"
    );
    assert_eq!(before.sessions(), 0, "and left the old one");
    assert_eq!(
        send(&mut t, 5002, b"x|aaaa", now),
        Err(DropReason::GameSessionLimit)
    );
    // Gone for good: its sessions close and give their places back.
    set.publish_games(spec(), vec![game("bazaar", b"bbbb", &[7101], None, None)])
        .unwrap();
    let counters = set.snapshot().games[0].counters.clone();
    let mut closed = Vec::new();
    let last = t.snapshot().games[0].counters.clone();
    t.apply(set.snapshot(), now, &mut closed);
    assert_eq!(closed.len(), 2);
    assert_eq!(last.sessions(), 0);
    assert_eq!(counters.sessions(), 0);
}

fn apply_quietly(t: &mut SessionTable, set: &crate::replicas::ReplicaSet, now: Instant) {
    let mut closed = Vec::new();
    t.apply(set.snapshot(), now, &mut closed);
    assert!(closed.is_empty(), "{closed:?}");
}

#[test]
fn a_game_over_its_budget_is_dropped_before_any_session_and_the_other_is_not() {
    let now = crate::epoch();
    let set = crate::replicas::ReplicaSet::new();
    let budget = Rate {
        per_second: 1000,
        burst: 100,
    };
    set.publish_games(
        spec(),
        vec![
            game("arena", b"aaaa", &[7001], None, Some(budget)),
            game("bazaar", b"bbbb", &[7101], None, None),
        ],
    )
    .unwrap();
    let (mut t1, mut t2) = (table(&set, 10_000), table(&set, 10_000));
    // A flood from 2 000 ports at once, over two workers: the burst gets through.
    let mut passed = 0;
    for port in 0..2000u16 {
        let t = if port % 2 == 0 { &mut t1 } else { &mut t2 };
        match send(t, 10_000 + port, b"x|aaaa", now) {
            Ok(_) => passed += 1,
            Err(reason) => assert_eq!(reason, DropReason::GameRateLimited),
        }
    }
    assert_eq!(passed, 100);
    assert_eq!(
        open_in(&set, "arena"),
        100,
        "a dropped datagram opens nothing"
    );
    // Beside it, the other game is served in full.
    for port in 0..500u16 {
        assert_eq!(send(&mut t1, 30_000 + port, b"x|bbbb", now), Ok(true));
    }
    // 100 ms later, 100 more (the rate), whichever worker sees them.
    let later = now + Duration::from_millis(100);
    let more = (0..1000u16)
        .filter(|p| {
            let t = if p % 2 == 0 { &mut t1 } else { &mut t2 };
            send(t, 10_000 + p, b"y|aaaa", later).is_ok()
        })
        .count();
    assert!((99..=101).contains(&more), "{more}");
}

/// What the property test does to two workers' tables and the published games.
#[derive(Debug, Clone)]
enum Op {
    /// A datagram of client `port` to game 0 (arena), 1 (bazaar) or neither, on table `t`.
    Datagram { t: usize, port: u16, game: u8 },
    /// Table `t` expires what idled for `secs`.
    Expire { t: usize, secs: u64 },
    /// A new set is published: `arena` in one of its variants (0: gone), `bazaar` always.
    Publish { arena: u8 },
    /// Table `t` adopts the newest set.
    Apply { t: usize },
    /// Table `t` closes a session (its socket failed).
    Close { t: usize, nth: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..2usize, 0..12u16, 0..3u8).prop_map(|(t, port, game)| Op::Datagram { t, port, game }),
        1 => (0..2usize, 0..90u64).prop_map(|(t, secs)| Op::Expire { t, secs }),
        1 => (0..4u8).prop_map(|arena| Op::Publish { arena }),
        2 => (0..2usize).prop_map(|t| Op::Apply { t }),
        1 => (0..2usize, 0..8usize).prop_map(|(t, nth)| Op::Close { t, nth }),
    ]
}

fn arena(variant: u8) -> Option<crate::replicas::GameSpec> {
    let limit = Some(4);
    match variant {
        0 => None,
        1 => Some(game("arena", b"aaaa", &[7001, 7002], limit, None)),
        // Replicas replaced: its sessions lose theirs and close, or keep one.
        2 => Some(game("arena", b"aaaa", &[7002, 7003], limit, None)),
        // A token switch: the same game, reached by another token.
        _ => Some(game("arena", b"cccc", &[7001], limit, None)),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// However sessions open, idle out, close, and however the game leaves, returns, changes
    /// replicas or tokens, every counter a game ever had holds exactly the sessions that
    /// count in it, and a session is refused for the quota only when the game is full.
    #[test]
    fn a_games_session_count_never_drifts(ops in proptest::collection::vec(op(), 1..120)) {
        let start = crate::epoch();
        let set = crate::replicas::ReplicaSet::new();
        let publish = |variant: u8| {
            let mut games: Vec<_> = arena(variant).into_iter().collect();
            games.push(game("bazaar", b"bbbb", &[7101], Some(3), None));
            set.publish_games(spec(), games).unwrap();
        };
        publish(1);
        let mut tables = [table(&set, 8), table(&set, 8)];
        let mut every: Vec<Arc<GameCounters>> = Vec::new();
        let mut clock = [start, start];
        for op in ops {
            for g in &set.snapshot().games {
                if !every.iter().any(|c| Arc::ptr_eq(c, &g.counters)) {
                    every.push(g.counters.clone());
                }
            }
            match op {
                Op::Datagram { t, port, game } => {
                    let token: &[u8] = match game {
                        0 => b"x|aaaa",
                        1 => b"x|bbbb",
                        _ => b"x|cccc",
                    };
                    let table = &mut tables[t];
                    let routed = table.router.as_ref().and_then(|r| r.route(token).ok());
                    let full = routed.map(|(id, _)| {
                        let g = &table.games[id];
                        (g.counters.sessions(), g.settings.max_sessions)
                    });
                    if let Err(DropReason::GameSessionLimit) = send(table, port, token, clock[t]) {
                        // At the quota, or past it by sessions carried over from the game's
                        // earlier counters (the quota refuses new sessions, never open ones).
                        let (open, max) = full.unwrap();
                        prop_assert!(max.is_some_and(|m| open >= m), "refused at {} of {:?}", open, max);
                    }
                }
                Op::Expire { t, secs } => {
                    clock[t] += Duration::from_secs(secs);
                    let mut closed = Vec::new();
                    tables[t].expire(clock[t], &mut closed);
                }
                Op::Publish { arena } => publish(arena),
                Op::Apply { t } => {
                    let mut closed = Vec::new();
                    tables[t].apply(set.snapshot(), clock[t], &mut closed);
                }
                Op::Close { t, nth } => {
                    if let Some(id) = tables[t].sessions.iter().map(|(id, _)| id).nth(nth) {
                        tables[t].close(id);
                    }
                }
            }
            for c in &every {
                let held: usize = tables
                    .iter()
                    .map(|t| {
                        t.sessions
                            .iter()
                            .filter(|(_, s)| Arc::ptr_eq(&t.games[s.game].counters, c))
                            .count()
                    })
                    .sum();
                prop_assert_eq!(c.sessions(), held);
            }
        }
        drop(tables);
        for c in &every {
            prop_assert_eq!(c.sessions(), 0, "every place given back");
        }
    }
}
