//! Agreement before trust through the session table, in simulated time: servers whose
//! replicas agree (byte for byte, or by number) and servers whose replicas never do.

use proptest::prelude::*;

use super::*;
use crate::dedupe::trust::DIVERGE_AFTER;
use crate::dedupe::{Endian, SequenceSpec, Stage, Width};

const MS: Duration = Duration::from_millis(1);
const FAILOVER: Duration = Duration::from_millis(50);

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn settings(mode: Mode) -> Settings {
    Settings {
        mode,
        agreement: Agreement::On {
            failover_after: FAILOVER,
        },
        session_timeout: Duration::from_secs(600),
        rate: None,
        max_datagram: 1500,
        fanout: MAX_SLOTS,
        late_join: false,
        replica_header: None,
        max_sessions: None,
        max_pps: None,
        token: None,
    }
}

fn copies() -> Mode {
    Mode::Copies {
        window: Duration::from_secs(2),
        max_entries: 4096,
    }
}

/// `sequence` on a 4-byte big-endian number at offset 0 (a tick field).
fn tick_field() -> Mode {
    Mode::Sequence {
        spec: SequenceSpec {
            offset: 0,
            width: Width::Four,
            endian: Endian::Big,
        },
        window: Duration::from_secs(2),
        max_entries: 4096,
        resync_after: 2,
    }
}

fn table(mode: Mode, ports: &[u16]) -> SessionTable {
    let replicas: Vec<_> = ports.iter().map(|&p| (p, ReplicaState::Ready)).collect();
    SessionTable::new(
        Arc::new(settings(mode)),
        Admission::new(100),
        Arc::new(crate::replicas::test_snapshot(1, &replicas)),
        42,
    )
}

fn open(t: &mut SessionTable, client: u16, now: Instant) -> SessionId {
    match t.on_client(0, addr(client), 10, now) {
        ClientVerdict::Forward { id, .. } => id,
        other => panic!("expected forward, got {other:?}"),
    }
}

/// An answer a replica sends: when (from the start), from which port, what.
type Answer = (Duration, u16, Vec<u8>);

/// Feeds `answers` in time order to session `id`; returns what reached the player, by port.
fn feed(
    t: &mut SessionTable,
    id: SessionId,
    start: Instant,
    answers: &mut [Answer],
) -> Vec<(u16, Vec<u8>)> {
    answers.sort_by_key(|a| a.0);
    let mut out = Vec::new();
    for (at, port, payload) in answers.iter() {
        if let AnswerVerdict::Deliver { .. } = t.on_answer(id, addr(*port), payload, start + *at) {
            out.push((*port, payload.clone()));
        }
    }
    out
}

/// An authoritative tick server: a snapshot every 33 ms from `first` (its tick then being
/// `tick0`), numbered, with its own world after the number.
fn ticks(port: u16, tick0: u32, first: Duration, until: Duration, world: &[u8]) -> Vec<Answer> {
    let mut out = Vec::new();
    let mut at = first;
    let mut tick = tick0;
    while at < until {
        let mut p = tick.to_be_bytes().to_vec();
        p.extend_from_slice(world);
        p.extend_from_slice(&(tick.wrapping_mul(2654435761)).to_le_bytes());
        out.push((at, port, p));
        at += 33 * MS;
        tick += 1;
    }
    out
}

fn tally(t: &mut SessionTable) -> GameTally {
    t.flush_games();
    t.admission.implicit_game().read()
}

#[test]
fn replicas_that_never_agree_deliver_one_world_and_mark_their_game() {
    // Two tick servers started 0.8 s apart: 24 ticks apart, worlds apart.
    let start = crate::epoch();
    let mut t = table(copies(), &[7001, 7002]);
    let id = open(&mut t, 5000, start);
    let mut answers = ticks(7001, 1024, 5 * MS, Duration::from_secs(3), b"world-a");
    answers.extend(ticks(
        7002,
        1000,
        17 * MS,
        Duration::from_secs(3),
        b"world-b",
    ));
    let got = feed(&mut t, id, start, &mut answers);
    let speaker = got[0].0;
    assert!(
        got.iter().all(|(p, _)| *p == speaker),
        "two worlds reached the player"
    );
    assert!(got.len() >= 88, "one snapshot per tick: {}", got.len());
    assert_eq!(t.get(id).and_then(Session::stage), Some(Stage::Demoted));
    let counted = tally(&mut t);
    assert_eq!((counted.demoted, counted.promoted), (1, 0));
    assert!(t.admission.implicit_game().is_divergent());
    let mut told = Vec::new();
    t.take_divergent(&mut told);
    assert_eq!(told.len(), 1, "due in the log once");
    // The game's next sessions start as primary would.
    let next = open(&mut t, 5001, start + Duration::from_secs(3));
    assert_eq!(t.get(next).and_then(Session::stage), Some(Stage::Demoted));
}

#[test]
fn a_divergent_game_is_tried_again_once_its_replicas_are_all_replaced() {
    let start = crate::epoch();
    let mut t = table(copies(), &[7001, 7002]);
    let id = open(&mut t, 5000, start);
    let mut answers = ticks(7001, 5, MS, Duration::from_secs(1), b"a");
    answers.extend(ticks(7002, 9, 2 * MS, Duration::from_secs(1), b"b"));
    feed(&mut t, id, start, &mut answers);
    let counters = t.admission.implicit_game();
    assert!(counters.is_divergent());
    let ready = |ports: &[u16], v| {
        let r: Vec<_> = ports.iter().map(|&p| (p, ReplicaState::Ready)).collect();
        Arc::new(crate::replicas::test_snapshot(v, &r))
    };
    let mut closed = Vec::new();
    // Half replaced: still the old build among them.
    t.apply(ready(&[7001, 7003], 2), start, &mut closed);
    assert!(counters.is_divergent());
    t.apply(ready(&[7003, 7004], 3), start, &mut closed);
    assert!(!counters.is_divergent(), "a new build may be deterministic");
    let next = open(&mut t, 5001, start + Duration::from_secs(2));
    assert_eq!(t.get(next).and_then(Session::stage), Some(Stage::Probation));
}

/// A request every `every` for `n` requests; each replica echoes request i (the same bytes
/// from both) after its delay for that request.
fn echoes(
    n: u32,
    every: Duration,
    mut delay: impl FnMut(u16, u32) -> Option<Duration>,
) -> Vec<Answer> {
    let mut out = Vec::new();
    for i in 0..n {
        for port in [7001, 7002] {
            if let Some(d) = delay(port, i) {
                out.push((every * i + d, port, format!("state {i}").into_bytes()));
            }
        }
    }
    out
}

fn exactly_once(got: &[(u16, Vec<u8>)], n: u32) {
    let mut seen: Vec<&[u8]> = got.iter().map(|(_, p)| &p[..]).collect();
    seen.sort();
    let before = seen.len();
    seen.dedup();
    assert_eq!(before, seen.len(), "duplicates delivered");
    assert_eq!(seen.len() as u32, n, "answers lost");
}

#[test]
fn deterministic_replicas_are_trusted_after_a_run_and_the_fastest_then_delivers() {
    let start = crate::epoch();
    let mut t = table(copies(), &[7001, 7002]);
    let id = open(&mut t, 5000, start);
    // 7001 is faster for the first 50 requests, 7002 after.
    let mut answers = echoes(100, 10 * MS, |port, i| {
        Some(match (port, i < 50) {
            (7001, true) | (7002, false) => MS,
            _ => 4 * MS,
        })
    });
    let got = feed(&mut t, id, start, &mut answers);
    exactly_once(&got, 100);
    assert_eq!(t.get(id).and_then(Session::stage), Some(Stage::Trusted));
    assert!(
        got[50..].iter().all(|(p, _)| *p == 7002),
        "the faster replica carries it"
    );
    assert_eq!(tally(&mut t).promoted, 1);
    assert!(!t.admission.implicit_game().is_divergent());
}

#[test]
fn a_desync_after_trust_lets_at_most_four_answers_of_the_second_world_through() {
    let start = crate::epoch();
    let mut t = table(copies(), &[7001, 7002]);
    let id = open(&mut t, 5000, start);
    let mut answers = echoes(60, 10 * MS, |port, _| {
        Some(if port == 7001 { MS } else { 2 * MS })
    });
    // From request 60 on, each replica's world is its own; 7002 is sometimes first.
    for i in 60..120u32 {
        for (port, d) in [(7001, if i % 3 == 0 { 3 } else { 1 }), (7002, 2)] {
            let at = 10 * MS * i + d * MS;
            answers.push((at, port, format!("state {i} of {port}").into_bytes()));
        }
    }
    let got = feed(&mut t, id, start, &mut answers);
    let after = &got[60..];
    let from = |port| after.iter().filter(|(p, _)| *p == port).count() as u32;
    let second = from(7001).min(from(7002));
    assert!(
        second <= DIVERGE_AFTER,
        "{second} answers of the second world"
    );
    assert_eq!(t.get(id).and_then(Session::stage), Some(Stage::Demoted));
    let counted = tally(&mut t);
    assert_eq!((counted.promoted, counted.demoted), (1, 1));
}

/// A normal draw (Box–Muller) with this mean and deviation, floored at zero.
fn normal(rng: &mut fastrand::Rng, mean: Duration, sd: Duration) -> Duration {
    let (u1, u2) = (1.0 - rng.f64(), rng.f64());
    let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
    Duration::from_secs_f64((mean.as_secs_f64() + z * sd.as_secs_f64()).max(0.0))
}

#[test]
fn jittery_and_lagging_deterministic_replicas_are_never_demoted_and_fail_over_cleanly() {
    // 2 ms ± 1.5 ms for one, the other 300 ms behind, or all but half the 2 s dedupe
    // window; 200 requests a second. The fast one dies at request 1000.
    for lag in [300, 990] {
        let start = crate::epoch();
        let mut t = table(copies(), &[7001, 7002]);
        let id = open(&mut t, 5000, start);
        let mut rng = fastrand::Rng::with_seed(7);
        let mut answers = echoes(2000, 5 * MS, |port, i| match port {
            7001 if i >= 1000 => None,
            7001 => Some(normal(&mut rng, 2 * MS, Duration::from_micros(1500))),
            _ => Some(lag * MS + normal(&mut rng, 2 * MS, Duration::from_micros(1500))),
        });
        let got = feed(&mut t, id, start, &mut answers);
        exactly_once(&got, 2000);
        assert_eq!(
            t.get(id).and_then(Session::stage),
            Some(Stage::Trusted),
            "{lag} ms"
        );
        let counted = tally(&mut t);
        assert_eq!((counted.promoted, counted.demoted), (1, 0), "{lag} ms");
    }
}

#[test]
fn jitter_both_ways_is_never_taken_for_two_worlds() {
    for seed in 1..20u64 {
        let start = crate::epoch();
        let mut t = table(copies(), &[7001, 7002]);
        let id = open(&mut t, 5000, start);
        let mut rng = fastrand::Rng::with_seed(seed);
        // 1 000 answers a second per replica: reordering across replicas on every answer.
        let mut answers = echoes(3000, MS, |_, _| {
            Some(normal(&mut rng, 2 * MS, Duration::from_micros(1500)))
        });
        let got = feed(&mut t, id, start, &mut answers);
        exactly_once(&got, 3000);
        assert_eq!(tally(&mut t).demoted, 0, "seed {seed}");
    }
}

#[test]
fn a_survivor_behind_on_the_numbering_is_taken_at_once() {
    // `sequence` on the tick: replica 7002 started 0.8 s later (24 ticks behind). The
    // numbers agree, so it is trusted; when 7001 dies, 7002's numbering is taken at once.
    let start = crate::epoch();
    let mut t = table(tick_field(), &[7001, 7002]);
    let id = open(&mut t, 5000, start);
    let kill = Duration::from_secs(2);
    let mut answers = ticks(7001, 1024, 5 * MS, kill, b"a");
    answers.extend(ticks(7002, 1000, 12 * MS, Duration::from_secs(4), b"b"));
    let got = feed(&mut t, id, start, &mut answers);
    assert_eq!(t.get(id).and_then(Session::stage), Some(Stage::Trusted));
    let before = got.iter().filter(|(p, _)| *p == 7001).count();
    let after = got.iter().filter(|(p, _)| *p == 7002).count();
    assert!(before >= 59, "{before}");
    // 2 s of 7002's ticks after the kill, less the failover window.
    assert!(after >= 58, "only {after} of 60 after the kill");
}

#[test]
fn a_survivor_behind_is_taken_as_soon_as_discovery_removes_the_owner() {
    let start = crate::epoch();
    let mut t = table(tick_field(), &[7001, 7002]);
    let id = open(&mut t, 5000, start);
    let mut answers = ticks(7001, 1024, 5 * MS, Duration::from_secs(1), b"a");
    answers.extend(ticks(7002, 1000, 12 * MS, Duration::from_secs(1), b"b"));
    feed(&mut t, id, start, &mut answers);
    let mut closed = Vec::new();
    let gone = Arc::new(crate::replicas::test_snapshot(
        2,
        &[(7002, ReplicaState::Ready)],
    ));
    t.apply(gone, start + Duration::from_secs(1), &mut closed);
    // 7002's next tick, 24 behind the last delivered, reaches the player at once.
    let next = ticks(
        7002,
        1000 + 30,
        Duration::from_secs(1) + 5 * MS,
        Duration::from_secs(1) + 6 * MS,
        b"b",
    );
    let (at, port, payload) = &next[0];
    assert!(matches!(
        t.on_answer(id, addr(*port), payload, start + *at),
        AnswerVerdict::Deliver { .. }
    ));
}

#[test]
fn a_quiet_spell_is_not_taken_for_the_owner_of_the_numbering_gone() {
    // Numbered alike, 7002 a few numbers behind; the game pauses for two seconds, then 7002
    // happens to answer first: its numbers are still behind and must not be taken.
    let start = crate::epoch();
    let mut t = table(tick_field(), &[7001, 7002]);
    let id = open(&mut t, 5000, start);
    let mut answers = Vec::new();
    for i in 0..40u32 {
        let at = 33 * MS * i;
        answers.push((at, 7001, (100 + i).to_be_bytes().to_vec()));
        answers.push((at + 20 * MS, 7002, (95 + i).to_be_bytes().to_vec()));
    }
    let resumed = 33 * MS * 40 + Duration::from_secs(2);
    answers.push((resumed, 7002, 135u32.to_be_bytes().to_vec()));
    answers.push((resumed + 5 * MS, 7001, 140u32.to_be_bytes().to_vec()));
    answers.push((resumed + 10 * MS, 7002, 136u32.to_be_bytes().to_vec()));
    let got = feed(&mut t, id, start, &mut answers);
    let after: Vec<&(u16, Vec<u8>)> = got.iter().rev().take(1).collect();
    assert_eq!(after[0].0, 7001, "the owner's next number, not a step back");
    assert!(
        got.windows(2).all(|w| w[0].1 < w[1].1),
        "the numbers delivered never step back"
    );
}

#[test]
fn a_lone_query_is_answered_whichever_replica_is_dead_in_every_mode() {
    let primary = Mode::Primary {
        failover_after: FAILOVER,
    };
    for mode in [copies(), tick_field(), primary] {
        for dead in [7001, 7002] {
            let start = crate::epoch();
            let mut t = table(mode.clone(), &[7001, 7002]);
            // Many players, one query each: whichever replica their session picked first.
            for client in 0..20 {
                let id = open(&mut t, 5000 + client, start);
                let live = if dead == 7001 { 7002 } else { 7001 };
                let v = t.on_answer(id, addr(live), &7u32.to_be_bytes(), start + MS);
                assert!(
                    matches!(
                        v,
                        AnswerVerdict::Deliver {
                            failover: false,
                            ..
                        }
                    ),
                    "{} mode, {dead} dead: {v:?}",
                    mode.name()
                );
            }
        }
    }
}

#[test]
fn a_replica_answering_no_session_is_passed_over_until_it_answers() {
    let start = crate::epoch();
    let mut t = table(copies(), &[7001, 7002]);
    // Players whose sessions hear only 7002.
    let ids: Vec<_> = (0..4).map(|c| open(&mut t, 5000 + c, start)).collect();
    for &id in &ids {
        t.on_answer(id, addr(7002), b"x", start + MS);
    }
    t.review(start + SILENT_AFTER);
    assert!(t.unresponsive().is_empty(), "it had a second to answer");
    t.review(start + SILENT_AFTER + 2 * MS);
    assert_eq!(t.unresponsive(), [addr(7001)]);
    // A new session with one replica gets the one that answers, whatever the ranking says.
    let mut one = settings(copies());
    one.fanout = 1;
    let mut t1 = SessionTable::new(Arc::new(one), Admission::new(100), t.snapshot().clone(), 1);
    t1.unresponsive = vec![addr(7001)];
    for c in 0..16 {
        let id = open(&mut t1, 6000 + c, start);
        assert_eq!(
            t1.get(id).map(|s| s.members().targets().to_vec()),
            Some(vec![addr(7002)])
        );
    }
    // It answers again (a frozen process thawed): no longer passed over.
    t.on_answer(ids[0], addr(7001), b"x", start + 2 * SILENT_AFTER);
    t.review(start + 2 * SILENT_AFTER + MS);
    assert!(t.unresponsive().is_empty());
}

/// One replica's answers: at which millisecond, and whether it is an ack that every replica
/// sends alike (as many servers acknowledge inputs) or its own snapshot.
fn arb_stream() -> impl Strategy<Value = Vec<(u16, bool)>> {
    prop::collection::vec((0u16..20, prop::bool::weighted(0.3)), 20..120)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Replicas that never agree (each snapshot its own, acks alike), answering in any order
    /// but never silent for the failover window: the player hears one of them only.
    #[test]
    fn replicas_that_never_agree_never_reach_the_player_together(
        streams in prop::collection::vec(arb_stream(), 2..4),
        mode in 0..2u8,
    ) {
        let start = crate::epoch();
        let ports: Vec<u16> = (0..streams.len() as u16).map(|i| 7001 + i).collect();
        let mode = if mode == 0 { copies() } else { tick_field() };
        let mut t = table(mode, &ports);
        let id = open(&mut t, 5000, start);
        let mut answers = Vec::new();
        // Every replica answers until the first one stops: none falls silent for the
        // failover window while another answers.
        let end = streams
            .iter()
            .map(|s| s.iter().map(|&(gap, _)| u32::from(gap)).sum::<u32>())
            .min()
            .unwrap_or(0);
        for (r, stream) in streams.iter().enumerate() {
            let mut at = Duration::ZERO;
            for (i, &(gap, ack)) in stream.iter().enumerate() {
                at += u32::from(gap) * MS;
                let payload = if ack {
                    b"ack".to_vec()
                } else {
                    // Numbers far apart (never the same numbering), worlds apart.
                    let n = (r as u32) * 1_000_000 + i as u32;
                    let mut p = n.to_be_bytes().to_vec();
                    p.push(r as u8);
                    p
                };
                if at <= end * MS {
                    answers.push((at, ports[r], payload));
                }
            }
        }
        let got = feed(&mut t, id, start, &mut answers);
        let mut speakers: Vec<u16> = got.iter().map(|(p, _)| *p).collect();
        speakers.dedup();
        prop_assert!(speakers.len() <= 1, "answers from {speakers:?}");
    }
}

#[test]
fn a_moved_replica_keeps_its_slot_and_its_sessions_at_the_new_address() {
    // One replica (a game moved off a reclaimed node): discovery reports the pad's address
    // as the old one's move, in the same snapshot that drops the old one. In every mode.
    for mode in [
        copies(),
        tick_field(),
        Mode::Primary {
            failover_after: FAILOVER,
        },
    ] {
        let name = mode.name();
        let start = crate::epoch();
        let mut t = table(mode, &[7001]);
        let id = open(&mut t, 5000, start);
        assert!(
            matches!(
                t.on_answer(id, addr(7001), &1u32.to_be_bytes(), start + MS),
                AnswerVerdict::Deliver { .. }
            ),
            "{name}"
        );
        let mut moved = crate::replicas::test_snapshot(2, &[(7009, ReplicaState::Ready)]);
        moved.moves = vec![crate::replicas::Move {
            from: addr(7001),
            to: addr(7009),
        }];
        let mut closed = Vec::new();
        let report = t.apply(Arc::new(moved), start + 2 * MS, &mut closed);
        assert!(
            closed.is_empty(),
            "{name}: the session lives on: {closed:?}"
        );
        assert_eq!((report.late_joins, report.degraded), (0, 0), "{name}");
        assert_eq!(
            t.get(id).map(|s| s.members().targets().to_vec()),
            Some(vec![addr(7009)]),
            "{name}"
        );
        // The same session, the same player, no new one opened: the game speaks first, and
        // goes on from where it was (the next tick).
        assert!(
            matches!(
                t.on_answer(id, addr(7009), &2u32.to_be_bytes(), start + 3 * MS),
                AnswerVerdict::Deliver {
                    failover: false,
                    ..
                }
            ),
            "{name}"
        );
        assert!(
            matches!(
                t.on_client(0, addr(5000), 10, start + 4 * MS),
                ClientVerdict::Forward { opened: false, .. }
            ),
            "{name}"
        );
        assert_eq!(
            t.on_answer(id, addr(7001), &3u32.to_be_bytes(), start + 5 * MS),
            AnswerVerdict::Drop(DropReason::NotReplica),
            "{name}: the old address is no replica any more"
        );
    }
}
