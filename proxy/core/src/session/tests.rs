//! The session table's rules, in simulated time: admission, routing, dedupe, replica changes,
//! games side by side.

use super::*;

const MS: Duration = Duration::from_millis(1);

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn settings(mode: Mode) -> Settings {
    Settings {
        mode,
        agreement: Agreement::Off,
        session_timeout: Duration::from_secs(60),
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
        window: Duration::from_secs(1),
        max_entries: 1024,
    }
}

/// `sequence` mode with the number at offset 0, resynchronising after two answers.
fn sequence(width: crate::dedupe::Width, endian: crate::dedupe::Endian) -> Mode {
    Mode::Sequence {
        spec: crate::dedupe::SequenceSpec {
            offset: 0,
            width,
            endian,
        },
        window: Duration::from_secs(1),
        max_entries: 64,
        resync_after: 2,
    }
}

fn snapshot(version: u64, replicas: &[(u16, ReplicaState)]) -> Arc<Snapshot> {
    Arc::new(crate::replicas::test_snapshot(version, replicas))
}

fn table(settings: Settings, max: usize, replicas: &[u16]) -> SessionTable {
    let replicas: Vec<_> = replicas.iter().map(|&p| (p, ReplicaState::Ready)).collect();
    SessionTable::new(
        Arc::new(settings),
        Admission::new(max),
        snapshot(1, &replicas),
        42,
    )
}

fn apply(t: &mut SessionTable, snapshot: Arc<Snapshot>, now: Instant) -> ApplyReport {
    let mut closed = Vec::new();
    let report = t.apply(snapshot, now, &mut closed);
    let closed: Vec<_> = closed.iter().map(|c| (c.id, c.reason)).collect();
    assert!(closed.is_empty(), "unexpected closes: {closed:?}");
    report
}

fn open(t: &mut SessionTable, client: u16, now: Instant) -> SessionId {
    match t.on_client(0, addr(client), 10, now) {
        ClientVerdict::Forward { id, .. } => id,
        other => panic!("expected forward, got {other:?}"),
    }
}

#[test]
fn first_datagram_opens_a_session_and_fans_out() {
    let now = crate::epoch();
    let mut t = table(settings(copies()), 10, &[7001, 7002, 7003]);
    let ClientVerdict::Forward {
        id: 0,
        opened: true,
        targets,
        body,
        header: None,
    } = t.on_client(0, addr(5000), 10, now)
    else {
        panic!("first datagram must open session 0");
    };
    assert_eq!(body, 0..10, "without tokens, the whole datagram");
    let mut targets = targets.to_vec();
    targets.sort();
    assert_eq!(targets, [addr(7001), addr(7002), addr(7003)]);
    assert!(matches!(
        t.on_client(0, addr(5000), 10, now),
        ClientVerdict::Forward {
            id: 0,
            opened: false,
            ..
        }
    ));
    // Same client on another listener is another session.
    assert!(matches!(
        t.on_client(1, addr(5000), 10, now),
        ClientVerdict::Forward {
            id: 1,
            opened: true,
            ..
        }
    ));
}

#[test]
fn answers_are_deduplicated_and_only_from_replicas() {
    let now = crate::epoch();
    let mut t = table(settings(copies()), 10, &[7001, 7002]);
    let id = open(&mut t, 5000, now);
    let deliver = AnswerVerdict::Deliver {
        listener: 0,
        client: addr(5000),
        failover: false,
    };
    assert_eq!(t.on_answer(id, addr(7002), b"a", now), deliver);
    assert_eq!(
        t.on_answer(id, addr(7001), b"a", now),
        AnswerVerdict::Duplicate {
            behind: Some(Duration::ZERO)
        }
    );
    assert_eq!(
        t.on_answer(id, addr(6666), b"b", now),
        AnswerVerdict::Drop(DropReason::NotReplica)
    );
    assert_eq!(
        t.on_answer(id + 1, addr(7001), b"b", now),
        AnswerVerdict::Drop(DropReason::UnknownSession)
    );
}

#[test]
fn empty_and_oversized_datagrams_are_dropped() {
    let now = crate::epoch();
    let mut t = table(settings(copies()), 10, &[7001]);
    assert_eq!(
        t.on_client(0, addr(1), 0, now),
        ClientVerdict::Drop(DropReason::Empty)
    );
    assert_eq!(
        t.on_client(0, addr(1), 1501, now),
        ClientVerdict::Drop(DropReason::Oversized)
    );
    assert!(t.is_empty(), "a dropped datagram must not open a session");
}

#[test]
fn session_limit_holds_across_tables_and_frees_on_close() {
    let now = crate::epoch();
    let s = Arc::new(settings(copies()));
    let admission = Admission::new(3);
    let snap = snapshot(1, &[(7001, ReplicaState::Ready)]);
    let mut a = SessionTable::new(s.clone(), admission.clone(), snap.clone(), 1);
    let mut b = SessionTable::new(s, admission.clone(), snap, 2);
    open(&mut a, 1, now);
    let id = open(&mut a, 2, now);
    open(&mut b, 3, now);
    assert_eq!(
        b.on_client(0, addr(4), 10, now),
        ClientVerdict::Drop(DropReason::SessionLimit)
    );
    assert_eq!(admission.in_use(), 3);
    a.close(id);
    open(&mut b, 4, now);
    drop(a);
    assert_eq!(admission.in_use(), 2);
}

#[test]
fn idle_sessions_expire_active_ones_stay() {
    let t0 = crate::epoch();
    let mut s = settings(copies());
    s.session_timeout = Duration::from_secs(60);
    let mut t = table(s, 10, &[7001]);
    let idle = open(&mut t, 1, t0);
    let busy = open(&mut t, 2, t0);
    open(&mut t, 2, t0 + Duration::from_secs(30));
    let mut closed = Vec::new();
    t.expire(t0 + Duration::from_secs(59), &mut closed);
    assert!(closed.is_empty());
    t.expire(t0 + Duration::from_secs(60), &mut closed);
    let ids = |c: &[Closed]| c.iter().map(|c| (c.id, c.reason)).collect::<Vec<_>>();
    assert_eq!(ids(&closed), vec![(idle, CloseReason::Idle)]);
    assert!(t.get(busy).is_some());
    assert_eq!(
        t.on_answer(idle, addr(7001), b"late", t0),
        AnswerVerdict::Drop(DropReason::UnknownSession)
    );
    // Answers from replicas do not keep a session alive: it belongs to the client.
    t.on_answer(busy, addr(7001), b"x", t0 + Duration::from_secs(80));
    t.expire(t0 + Duration::from_secs(90), &mut closed);
    assert_eq!(
        ids(&closed),
        vec![(idle, CloseReason::Idle), (busy, CloseReason::Idle)]
    );
    assert!(t.is_empty());
}

/// A table of one replica whose clients may send `per_second` datagrams, `burst` at once.
fn rate_limited(per_second: u32, burst: u32) -> SessionTable {
    let mut s = settings(copies());
    s.rate = Some(Rate { per_second, burst });
    table(s, 10, &[7001])
}

#[test]
fn rate_limit_per_client() {
    let now = crate::epoch();
    let mut t = rate_limited(10, 2);
    open(&mut t, 1, now);
    open(&mut t, 1, now);
    assert_eq!(
        t.on_client(0, addr(1), 10, now),
        ClientVerdict::Drop(DropReason::RateLimited)
    );
    // Another client has its own budget.
    open(&mut t, 2, now);
    open(&mut t, 1, now + 100 * MS);
    // Being rate limited is not being idle.
    let mut closed = Vec::new();
    let later = now + Duration::from_secs(50);
    for _ in 0..10 {
        t.on_client(0, addr(1), 10, later);
    }
    t.expire(now + Duration::from_secs(100), &mut closed);
    assert_eq!(closed.len(), 1, "only client 2 was idle");
}

#[test]
fn no_replicas_no_session() {
    let now = crate::epoch();
    let mut t = table(settings(copies()), 10, &[]);
    assert_eq!(
        t.on_client(0, addr(1), 10, now),
        ClientVerdict::Drop(DropReason::NoReplicas)
    );
    assert!(t.is_empty());
}

#[test]
fn removed_replica_leaves_running_sessions_new_one_joins_new_sessions_only() {
    let now = crate::epoch();
    let mut t = table(settings(copies()), 10, &[7001, 7002]);
    let old = open(&mut t, 1, now);
    let report = apply(
        &mut t,
        snapshot(
            2,
            &[(7002, ReplicaState::Ready), (7003, ReplicaState::Ready)],
        ),
        now,
    );
    assert_eq!(report.sessions_changed, 1);
    assert_eq!(report.late_joins, 0);
    assert_eq!(
        t.get(old).map(|s| s.members().targets()),
        Some(&[addr(7002)][..])
    );
    assert_eq!(
        t.on_answer(old, addr(7001), b"x", now),
        AnswerVerdict::Drop(DropReason::NotReplica)
    );
    assert_eq!(
        t.on_answer(old, addr(7003), b"x", now),
        AnswerVerdict::Drop(DropReason::NotReplica)
    );
    let new = open(&mut t, 2, now);
    let mut targets = t.get(new).unwrap().members().targets().to_vec();
    targets.sort();
    assert_eq!(targets, [addr(7002), addr(7003)]);
}

#[test]
fn late_join_tops_up_running_sessions() {
    let now = crate::epoch();
    let mut s = settings(copies());
    s.late_join = true;
    s.fanout = 2;
    let mut t = table(s, 10, &[7001, 7002]);
    let id = open(&mut t, 1, now);
    // Nothing to add while the session is full.
    let report = apply(
        &mut t,
        snapshot(
            2,
            &[
                (7001, ReplicaState::Ready),
                (7002, ReplicaState::Ready),
                (7003, ReplicaState::Ready),
            ],
        ),
        now,
    );
    assert_eq!(report.late_joins, 0);
    let report = apply(
        &mut t,
        snapshot(
            3,
            &[(7002, ReplicaState::Ready), (7003, ReplicaState::Ready)],
        ),
        now,
    );
    assert_eq!(report.late_joins, 1);
    // The newcomer took the freed slot.
    assert_eq!(
        t.get(id).map(|s| s.members().targets()),
        Some(&[addr(7003), addr(7002)][..])
    );
    assert!(matches!(
        t.on_answer(id, addr(7003), b"x", now),
        AnswerVerdict::Deliver { .. }
    ));
}

#[test]
fn late_join_tops_up_from_the_clients_own_ranking() {
    let now = crate::epoch();
    let mut s = settings(copies());
    s.late_join = true;
    s.fanout = 2;
    let ports = [7001, 7002, 7003, 7004, 7005];
    let mut t = table(s, 10, &ports);
    let id = open(&mut t, 1, now);
    let ranking: Vec<SocketAddr> = t
        .snapshot()
        .ranked(addr(1), ReplicaState::Ready)
        .iter()
        .map(|r| r.addr)
        .collect();
    let mut members = t.get(id).unwrap().members().targets().to_vec();
    members.sort();
    let mut top2 = ranking[..2].to_vec();
    top2.sort();
    assert_eq!(
        members, top2,
        "the session starts on its two best-ranked replicas"
    );
    // Its best replica goes away: the third in its ranking takes the place.
    let remaining: Vec<_> = ports
        .iter()
        .filter(|&&p| addr(p) != ranking[0])
        .map(|&p| (p, ReplicaState::Ready))
        .collect();
    let report = apply(&mut t, snapshot(2, &remaining), now);
    assert_eq!(report.late_joins, 1);
    assert_eq!(report.degraded, 0, "topped up at once");
    let mut members = t.get(id).unwrap().members().targets().to_vec();
    members.sort();
    let mut expected = vec![ranking[1], ranking[2]];
    expected.sort();
    assert_eq!(members, expected);
}

#[test]
fn losing_a_replica_without_late_join_is_degraded_once() {
    let now = crate::epoch();
    let mut t = table(settings(copies()), 10, &[7001, 7002, 7003]);
    open(&mut t, 1, now);
    let r = apply(
        &mut t,
        snapshot(
            2,
            &[(7001, ReplicaState::Ready), (7002, ReplicaState::Ready)],
        ),
        now,
    );
    assert_eq!(r.degraded, 1);
    let r = apply(&mut t, snapshot(3, &[(7001, ReplicaState::Ready)]), now);
    assert_eq!(r.degraded, 0, "already degraded: counted once");
}

#[test]
fn draining_replica_keeps_traffic_and_loses_primary() {
    let now = crate::epoch();
    let mode = Mode::Primary {
        failover_after: 50 * MS,
    };
    let mut t = table(settings(mode), 10, &[7001, 7002]);
    let id = open(&mut t, 1, now);
    assert!(matches!(
        t.on_answer(id, addr(7001), b"x", now),
        AnswerVerdict::Deliver {
            failover: false,
            ..
        }
    ));
    let report = apply(
        &mut t,
        snapshot(
            2,
            &[(7001, ReplicaState::Draining), (7002, ReplicaState::Ready)],
        ),
        now + MS,
    );
    assert_eq!(report.failovers, 1);
    // Still fanned out to, still accepted, but no longer forwarded.
    assert_eq!(
        t.get(id).map(|s| s.members().targets()),
        Some(&[addr(7001), addr(7002)][..])
    );
    assert_eq!(
        t.on_answer(id, addr(7001), b"y", now + 2 * MS),
        AnswerVerdict::Duplicate { behind: None }
    );
    assert!(matches!(
        t.on_answer(id, addr(7002), b"y", now + 2 * MS),
        AnswerVerdict::Deliver { .. }
    ));
}

#[test]
fn copies_mode_survives_replica_loss_without_loss_or_duplicates() {
    // Three replicas answer a stream; one vanishes mid-stream (removed from the set
    // or just silent). The client must see every answer exactly once.
    let t0 = crate::epoch();
    let mut t = table(settings(copies()), 10, &[7001, 7002, 7003]);
    let id = open(&mut t, 1, t0);
    let mut delivered = Vec::new();
    for seq in 0u32..200 {
        let now = t0 + MS * seq;
        let payload = seq.to_be_bytes();
        if seq == 100 {
            apply(
                &mut t,
                snapshot(
                    2,
                    &[(7001, ReplicaState::Ready), (7003, ReplicaState::Ready)],
                ),
                now,
            );
        }
        // Replicas answer in varying order; 7002 dies at 100.
        let mut order = [7001u16, 7002, 7003];
        order.rotate_left(seq as usize % 3);
        for port in order {
            if port == 7002 && seq >= 95 {
                continue;
            }
            if let AnswerVerdict::Deliver { .. } = t.on_answer(id, addr(port), &payload, now) {
                delivered.push(seq);
            }
        }
    }
    assert_eq!(delivered, (0..200).collect::<Vec<_>>());
}

#[test]
fn sequence_mode_through_the_table() {
    let now = crate::epoch();
    let mode = sequence(crate::dedupe::Width::Two, crate::dedupe::Endian::Little);
    let mut t = table(settings(mode), 10, &[7001, 7002]);
    let id = open(&mut t, 1, now);
    // Payloads differ between replicas (timestamps, say); only the number matters.
    assert!(matches!(
        t.on_answer(id, addr(7001), b"\x01\x00 at 10ms", now),
        AnswerVerdict::Deliver { .. }
    ));
    assert_eq!(
        t.on_answer(id, addr(7002), b"\x01\x00 at 11ms", now),
        AnswerVerdict::Duplicate {
            behind: Some(Duration::ZERO)
        }
    );
}

fn ready(ports: &[u16]) -> Vec<(u16, ReplicaState)> {
    ports.iter().map(|&p| (p, ReplicaState::Ready)).collect()
}

fn apply_closing(
    t: &mut SessionTable,
    snap: Arc<Snapshot>,
    now: Instant,
) -> Vec<(SessionId, CloseReason)> {
    let mut closed = Vec::new();
    t.apply(snap, now, &mut closed);
    closed.iter().map(|c| (c.id, c.reason)).collect()
}

fn targets(t: &SessionTable, id: SessionId) -> Vec<SocketAddr> {
    let mut v = t.get(id).unwrap().members().targets().to_vec();
    v.sort();
    v
}

#[test]
fn a_rolling_replacement_closes_the_session_and_the_next_datagram_reconnects() {
    // A,B -> A,B,C -> A draining -> B,C -> B,C,D -> B draining -> C,D; no late join.
    let now = crate::epoch();
    let (a, b, c, d) = (7001, 7002, 7003, 7004);
    let mut t = table(settings(copies()), 10, &[a, b]);
    let id = open(&mut t, 1, now);
    let steps: [&[(u16, ReplicaState)]; 5] = [
        &ready(&[a, b, c]),
        &[
            (a, ReplicaState::Draining),
            (b, ReplicaState::Ready),
            (c, ReplicaState::Ready),
        ],
        &ready(&[b, c]),
        &ready(&[b, c, d]),
        &[
            (b, ReplicaState::Draining),
            (c, ReplicaState::Ready),
            (d, ReplicaState::Ready),
        ],
    ];
    for (v, step) in steps.iter().enumerate() {
        let closed = apply_closing(&mut t, snapshot(v as u64 + 2, step), now);
        assert!(closed.is_empty(), "step {v}: {closed:?}");
        assert!(matches!(
            t.on_client(0, addr(1), 10, now),
            ClientVerdict::Forward { id: i, opened: false, .. } if i == id
        ));
    }
    assert_eq!(targets(&t, id), [addr(b)], "only the draining B is left");
    // B leaves: the session has no live replica and closes.
    let closed = apply_closing(&mut t, snapshot(9, &ready(&[c, d])), now);
    assert_eq!(closed, [(id, CloseReason::NoReplicas)]);
    assert!(t.is_empty());
    assert_eq!(t.admission.in_use(), 0, "its budget is returned");
    // The player's next datagram is a fresh session on the live replicas.
    let ClientVerdict::Forward {
        id: fresh,
        opened: true,
        ..
    } = t.on_client(0, addr(1), 10, now)
    else {
        panic!("no fresh session");
    };
    assert_eq!(targets(&t, fresh), [addr(c), addr(d)]);
    assert!(matches!(
        t.on_answer(fresh, addr(d), b"x", now),
        AnswerVerdict::Deliver { .. }
    ));
}

#[test]
fn all_replicas_flapping_away_closes_and_their_return_readmits() {
    let now = crate::epoch();
    let mut t = table(settings(copies()), 10, &[7001, 7002]);
    let id = open(&mut t, 1, now);
    let closed = apply_closing(&mut t, snapshot(2, &[]), now);
    assert_eq!(closed, [(id, CloseReason::NoReplicas)]);
    // While there is nothing to send to, no session opens (and none is left deaf).
    assert_eq!(
        t.on_client(0, addr(1), 10, now),
        ClientVerdict::Drop(DropReason::NoReplicas)
    );
    assert!(t.is_empty());
    apply_closing(&mut t, snapshot(3, &ready(&[7001, 7002])), now);
    let id = open(&mut t, 1, now);
    assert_eq!(targets(&t, id), [addr(7001), addr(7002)]);
}

#[test]
fn a_replica_returning_at_its_address_takes_its_slot_back() {
    let now = crate::epoch();
    let mode = Mode::Primary {
        failover_after: 50 * MS,
    };
    let mut t = table(settings(mode), 10, &[7001, 7002]);
    let id = open(&mut t, 1, now);
    apply(&mut t, snapshot(2, &ready(&[7002])), now);
    assert_eq!(targets(&t, id), [addr(7002)]);
    assert_eq!(
        t.on_answer(id, addr(7001), b"x", now),
        AnswerVerdict::Drop(DropReason::NotReplica)
    );
    // Removed and re-added (or not-ready for a moment): back in its old slot.
    let report = apply(&mut t, snapshot(3, &ready(&[7001, 7002])), now);
    assert_eq!(report.late_joins, 1);
    assert_eq!(targets(&t, id), [addr(7001), addr(7002)]);
    let slots = t.get(id).unwrap().members().states().to_vec();
    assert_eq!(slots, [SlotState::Ready, SlotState::Ready]);
    assert!(!t.get(id).unwrap().members().is_degraded());
    // Its answers count again.
    assert_ne!(
        t.on_answer(id, addr(7001), b"y", now),
        AnswerVerdict::Drop(DropReason::NotReplica)
    );
    // It comes back draining: a member, but never primary.
    apply(&mut t, snapshot(4, &ready(&[7002])), now);
    apply(
        &mut t,
        snapshot(
            5,
            &[(7001, ReplicaState::Draining), (7002, ReplicaState::Ready)],
        ),
        now,
    );
    assert_eq!(targets(&t, id), [addr(7001), addr(7002)]);
}

#[test]
fn a_returning_replica_does_not_exceed_the_fanout() {
    let now = crate::epoch();
    let mut s = settings(copies());
    s.late_join = true;
    s.fanout = 2;
    let mut t = table(s, 10, &[7001, 7002]);
    let id = open(&mut t, 1, now);
    let gone = t.get(id).unwrap().members().targets()[0];
    let stays = t.get(id).unwrap().members().targets()[1];
    // The slot is topped up by late join, then the old replica returns: two stay two.
    let others: Vec<_> = [stays.port(), 7003]
        .into_iter()
        .map(|p| (p, ReplicaState::Ready))
        .collect();
    apply(&mut t, snapshot(2, &others), now);
    let mut all = others.clone();
    all.push((gone.port(), ReplicaState::Ready));
    apply(&mut t, snapshot(3, &all), now);
    assert_eq!(t.get(id).unwrap().members().targets().len(), 2);
}

#[test]
fn a_replica_address_never_opens_a_session() {
    let now = crate::epoch();
    let mut t = table(settings(copies()), 10, &[7001, 7002]);
    assert_eq!(
        t.on_client(0, addr(7001), 10, now),
        ClientVerdict::Drop(DropReason::FromReplica)
    );
    assert!(t.is_empty());
    // A player whose address later turns up as a replica loses its session.
    let id = open(&mut t, 7003, now);
    let closed = apply_closing(&mut t, snapshot(2, &ready(&[7001, 7002, 7003])), now);
    assert_eq!(closed, [(id, CloseReason::FromReplica)]);
    assert_eq!(
        t.on_client(0, addr(7003), 10, now),
        ClientVerdict::Drop(DropReason::FromReplica)
    );
}

#[test]
fn nothing_is_ever_sent_back_to_its_source() {
    // The general guard below the from-replica rule: members never target the client.
    let replicas = vec![
        crate::replicas::Replica::ready(addr(1)),
        crate::replicas::Replica::ready(addr(2)),
    ];
    let m = Members::new(replicas, addr(1));
    assert_eq!(m.targets(), [addr(2)]);
}

#[test]
fn rate_limited_clients_are_reported_once_per_interval() {
    let now = crate::epoch();
    let mut t = rate_limited(1, 1);
    open(&mut t, 1, now);
    open(&mut t, 2, now);
    for _ in 0..5 {
        t.on_client(0, addr(1), 10, now);
    }
    t.on_client(0, addr(2), 10, now);
    let mut out = Vec::new();
    t.rate_limited(now, &mut out);
    out.sort_by_key(|r| r.client);
    assert_eq!(
        out,
        [
            RateLimited {
                client: addr(1),
                dropped: 5
            },
            RateLimited {
                client: addr(2),
                dropped: 1
            }
        ]
    );
    // More drops within the interval wait; after it, they are reported with their count.
    let later = now + Duration::from_millis(500);
    for _ in 0..3 {
        t.on_client(0, addr(1), 10, later);
    }
    out.clear();
    t.rate_limited(later, &mut out);
    assert!(out.is_empty());
    t.rate_limited(now + RATE_REPORT_INTERVAL, &mut out);
    assert_eq!(
        out,
        [RateLimited {
            client: addr(1),
            dropped: 3
        }]
    );
    out.clear();
    t.rate_limited(now + 3 * RATE_REPORT_INTERVAL, &mut out);
    assert!(out.is_empty(), "nothing new to report");
}

#[test]
fn sequence_resync_through_the_table_counts_stale_and_resyncs() {
    let now = crate::epoch();
    let mode = sequence(crate::dedupe::Width::Four, crate::dedupe::Endian::Big);
    let mut t = table(settings(mode), 10, &[7001, 7002]);
    let id = open(&mut t, 1, now);
    for n in 0u32..100 {
        t.on_answer(id, addr(7001), &n.to_be_bytes(), now);
        t.on_answer(id, addr(7002), &n.to_be_bytes(), now);
    }
    // The same address, a new player: the replicas number from 0 again.
    assert_eq!(
        t.on_answer(id, addr(7001), &0u32.to_be_bytes(), now),
        AnswerVerdict::Drop(DropReason::StaleSequence)
    );
    assert!(matches!(
        t.on_answer(id, addr(7002), &0u32.to_be_bytes(), now),
        AnswerVerdict::Deliver { .. }
    ));
    assert_eq!(t.take_resyncs(), 1);
}

// ---- Token routing: games side by side ----

use crate::replicas::{GameSpec, GameTally, Replica, ReplicaSet};
use crate::token::{TokenAt, TokenSpec};

fn spec(at: TokenAt) -> TokenSpec {
    TokenSpec::new(4, at).unwrap()
}

fn game(name: &str, token: &[u8], ports: &[u16], mode: Mode) -> GameSpec {
    let mut s = settings(mode);
    s.token = Some(spec(TokenAt::Suffix));
    GameSpec {
        name: name.into(),
        tokens: vec![token.to_vec()],
        replicas: ports.iter().map(|&p| Replica::ready(addr(p))).collect(),
        settings: Arc::new(s),
    }
}

/// A table routing by a 4-byte token at `at`, over the games `set` holds.
fn routing_table(set: &ReplicaSet, at: TokenAt) -> SessionTable {
    let mut s = settings(copies());
    s.token = Some(spec(at));
    SessionTable::new(Arc::new(s), Admission::new(100), set.snapshot(), 42)
}

fn two_games(mode_b: Mode) -> ReplicaSet {
    let set = ReplicaSet::new();
    set.publish_games(
        spec(TokenAt::Suffix),
        vec![
            game("arena", b"aaaa", &[7001, 7002], copies()),
            game("bazaar", b"bbbb", &[7101, 7102], mode_b),
        ],
    )
    .unwrap();
    set
}

/// (session, sorted targets, body) of a forwarded datagram.
fn routed(
    t: &mut SessionTable,
    client: u16,
    datagram: &[u8],
    now: Instant,
) -> (SessionId, Vec<u16>, Range<usize>) {
    match t.on_datagram(0, addr(client), datagram, false, now) {
        ClientVerdict::Forward {
            id, targets, body, ..
        } => {
            let mut ports: Vec<u16> = targets.iter().map(SocketAddr::port).collect();
            ports.sort_unstable();
            (id, ports, body)
        }
        other => panic!("{datagram:?} not forwarded: {other:?}"),
    }
}

#[test]
fn suffix_tokens_route_each_game_to_its_replicas_and_are_cut_off() {
    let now = crate::epoch();
    let set = two_games(copies());
    let mut t = routing_table(&set, TokenAt::Suffix);
    let (_, targets, body) = routed(&mut t, 5000, b"move left|aaaa", now);
    assert_eq!((targets, body), (vec![7001, 7002], 0..10));
    let (_, targets, body) = routed(&mut t, 5001, b"jump|bbbb", now);
    assert_eq!((targets, body), (vec![7101, 7102], 0..5));
}

#[test]
fn prefix_tokens_are_read_and_cut_at_the_start() {
    let now = crate::epoch();
    let set = two_games(copies());
    let mut t = routing_table(&set, TokenAt::Prefix);
    let (_, targets, body) = routed(&mut t, 5000, b"bbbb|jump", now);
    assert_eq!((targets, body), (vec![7101, 7102], 4..9));
    // The same bytes at the end route nowhere.
    assert_eq!(
        t.on_datagram(0, addr(5000), b"jump|bbbb", false, now),
        ClientVerdict::Drop(DropReason::UnknownToken)
    );
}

#[test]
fn short_datagrams_and_unknown_tokens_are_dropped_and_open_nothing() {
    let now = crate::epoch();
    let set = two_games(copies());
    let mut t = routing_table(&set, TokenAt::Suffix);
    for (datagram, reason) in [
        (&b"aaa"[..], DropReason::UnknownToken),
        (b"", DropReason::UnknownToken),
        (b"hello|zzzz", DropReason::UnknownToken),
        (b"aaaa", DropReason::Empty),
    ] {
        assert_eq!(
            t.on_datagram(0, addr(5000), datagram, false, now),
            ClientVerdict::Drop(reason),
            "{datagram:?}"
        );
    }
    assert_eq!(
        t.on_client(0, addr(5000), 10, now),
        ClientVerdict::Drop(DropReason::UnknownToken),
        "no implicit game to fall into"
    );
    assert!(t.is_empty());
    let mut big = vec![0u8; 1501];
    big[1497..].copy_from_slice(b"aaaa");
    assert_eq!(
        t.on_datagram(0, addr(5000), &big, false, now),
        ClientVerdict::Drop(DropReason::Oversized),
        "the limit counts the token"
    );
}

#[test]
fn a_client_switching_token_is_a_new_session_for_the_new_game() {
    let now = crate::epoch();
    let set = two_games(copies());
    let mut t = routing_table(&set, TokenAt::Suffix);
    let (a, _, _) = routed(&mut t, 5000, b"x|aaaa", now);
    let (b, targets, _) = routed(&mut t, 5000, b"x|bbbb", now);
    assert_ne!(a, b, "same client, other game: another session");
    assert_eq!(targets, vec![7101, 7102]);
    assert_eq!(t.len(), 2);
    assert_eq!(t.get(a).map(|s| s.game), t.game_id("arena"));
    assert_eq!(t.get(b).map(|s| s.game), t.game_id("bazaar"));
    // Each session hears only its own game's replicas.
    assert!(matches!(
        t.on_answer(a, addr(7001), b"state", now),
        AnswerVerdict::Deliver { .. }
    ));
    assert_eq!(
        t.on_answer(a, addr(7101), b"state", now),
        AnswerVerdict::Drop(DropReason::NotReplica)
    );
    // Back on the first token: the first session again.
    assert_eq!(routed(&mut t, 5000, b"y|aaaa", now).0, a);
}

#[test]
fn each_game_deduplicates_by_its_own_mode() {
    let now = crate::epoch();
    let set = two_games(Mode::Primary {
        failover_after: Duration::from_millis(50),
    });
    let mut t = routing_table(&set, TokenAt::Suffix);
    let (a, _, _) = routed(&mut t, 5000, b"x|aaaa", now);
    let (b, _, _) = routed(&mut t, 5001, b"x|bbbb", now);
    // arena (copies): the same payload from both replicas is delivered once.
    assert!(matches!(
        t.on_answer(a, addr(7001), b"s1", now),
        AnswerVerdict::Deliver { .. }
    ));
    assert_eq!(
        t.on_answer(a, addr(7002), b"s1", now),
        AnswerVerdict::Duplicate {
            behind: Some(Duration::ZERO)
        }
    );
    assert!(matches!(
        t.on_answer(a, addr(7002), b"s2", now),
        AnswerVerdict::Deliver { .. }
    ));
    // bazaar (primary): only the primary's answers pass, whatever their bytes.
    let primary = t.get(b).unwrap().members().targets()[0];
    let other = if primary == addr(7101) {
        addr(7102)
    } else {
        addr(7101)
    };
    assert!(matches!(
        t.on_answer(b, primary, b"p1", now),
        AnswerVerdict::Deliver { .. }
    ));
    assert_eq!(
        t.on_answer(b, other, b"o1", now),
        AnswerVerdict::Duplicate { behind: None }
    );
}

#[test]
fn a_game_that_leaves_closes_its_sessions_only_and_its_token_stops_routing() {
    let now = crate::epoch();
    let set = two_games(copies());
    let mut t = routing_table(&set, TokenAt::Suffix);
    let (a, _, _) = routed(&mut t, 5000, b"x|aaaa", now);
    let (b, _, _) = routed(&mut t, 5001, b"x|bbbb", now);
    set.publish_games(
        spec(TokenAt::Suffix),
        vec![game("arena", b"aaaa", &[7001, 7002], copies())],
    )
    .unwrap();
    let mut closed = Vec::new();
    t.apply(set.snapshot(), now, &mut closed);
    let closed: Vec<_> = closed.iter().map(|c| (c.id, c.reason)).collect();
    assert_eq!(closed, vec![(b, CloseReason::NoReplicas)]);
    assert!(t.get(a).is_some(), "the other game's session stays");
    assert_eq!(t.game_id("bazaar"), None);
    assert_eq!(
        t.on_datagram(0, addr(5001), b"x|bbbb", false, now),
        ClientVerdict::Drop(DropReason::UnknownToken)
    );
    // It comes back with other replicas: a fresh session there.
    set.publish_games(
        spec(TokenAt::Suffix),
        vec![
            game("arena", b"aaaa", &[7001, 7002], copies()),
            game("bazaar", b"bbbb", &[7201], copies()),
        ],
    )
    .unwrap();
    apply(&mut t, set.snapshot(), now);
    assert_eq!(routed(&mut t, 5001, b"x|bbbb", now).1, vec![7201]);
    assert_eq!(routed(&mut t, 5000, b"y|aaaa", now).0, a);
}

fn counted(set: &ReplicaSet, name: &str) -> GameTally {
    let snapshot = set.snapshot();
    let g = snapshot.games.iter().find(|g| &*g.name == name).unwrap();
    g.counters.read()
}

/// A game's open sessions, over every table: exact at once, no flush needed.
fn open_in(set: &ReplicaSet, name: &str) -> usize {
    let snapshot = set.snapshot();
    let g = snapshot.games.iter().find(|g| &*g.name == name).unwrap();
    g.counters.sessions()
}

#[test]
fn each_game_counts_its_traffic_and_two_tables_add_up() {
    let now = crate::epoch();
    let set = two_games(copies());
    let mut t1 = routing_table(&set, TokenAt::Suffix);
    let mut t2 = routing_table(&set, TokenAt::Suffix);
    let (a, _, _) = routed(&mut t1, 5000, b"x|aaaa", now);
    routed(&mut t1, 5000, b"y|aaaa", now);
    routed(&mut t2, 5001, b"x|aaaa", now);
    routed(&mut t2, 5002, b"x|bbbb", now);
    assert_eq!(
        t1.on_datagram(0, addr(5000), b"aaaa", false, now),
        ClientVerdict::Drop(DropReason::Empty)
    );
    assert!(matches!(
        t1.on_answer(a, addr(7001), b"s1", now),
        AnswerVerdict::Deliver { .. }
    ));
    assert_eq!(
        t1.on_answer(a, addr(7002), b"s1", now),
        AnswerVerdict::Duplicate {
            behind: Some(Duration::ZERO)
        }
    );
    assert_eq!(
        counted(&set, "arena"),
        GameTally::default(),
        "until a flush"
    );
    assert_eq!(open_in(&set, "arena"), 2, "sessions count at once");
    t1.flush_games();
    t2.flush_games();
    assert_eq!(
        counted(&set, "arena"),
        GameTally {
            packets: 4,
            delivered: 1,
            drops: 1,
            ..GameTally::default()
        }
    );
    assert_eq!(open_in(&set, "bazaar"), 1);
    // A republish keeps the counters; closing sessions brings the count down.
    set.publish_games(
        spec(TokenAt::Suffix),
        vec![
            game("arena", b"aaaa", &[7001], copies()),
            game("bazaar", b"bbbb", &[7101, 7102], copies()),
        ],
    )
    .unwrap();
    assert_eq!(counted(&set, "arena").packets, 4);
    let mut closed = Vec::new();
    t1.expire(now + Duration::from_secs(3600), &mut closed);
    assert_eq!(open_in(&set, "arena"), 1);
    drop(t2);
    assert_eq!(
        open_in(&set, "arena"),
        0,
        "a table dropped gives its sessions back"
    );
    assert_eq!(open_in(&set, "bazaar"), 0);
}

#[test]
fn a_replica_change_in_one_game_leaves_the_other_alone() {
    let now = crate::epoch();
    let set = two_games(copies());
    let mut t = routing_table(&set, TokenAt::Suffix);
    let (a, _, _) = routed(&mut t, 5000, b"x|aaaa", now);
    let (b, _, _) = routed(&mut t, 5001, b"x|bbbb", now);
    set.publish_games(
        spec(TokenAt::Suffix),
        vec![
            game("arena", b"aaaa", &[7001, 7002], copies()),
            game("bazaar", b"bbbb", &[7102], copies()),
        ],
    )
    .unwrap();
    let report = apply(&mut t, set.snapshot(), now);
    assert_eq!(report.sessions_changed, 1);
    assert_eq!(report.degraded, 1);
    assert_eq!(t.get(b).unwrap().members().targets(), [addr(7102)]);
    assert_eq!(t.get(a).unwrap().members().targets().len(), 2);
}

#[test]
fn a_set_with_a_shared_or_misfit_token_is_refused_whole() {
    let set = two_games(copies());
    let before = set.snapshot();
    let e = set
        .publish_games(
            spec(TokenAt::Suffix),
            vec![
                game("arena", b"aaaa", &[7001], copies()),
                game("bazaar", b"aaaa", &[7101], copies()),
            ],
        )
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "token aa… (4 bytes) belongs to both arena and bazaar"
    );
    assert!(
        set.publish_games(
            spec(TokenAt::Suffix),
            vec![game("arena", b"aaaaa", &[7001], copies())]
        )
        .is_err()
    );
    assert_eq!(set.snapshot(), before, "nothing changed");
}

fn primary() -> Mode {
    Mode::Primary {
        failover_after: Duration::from_millis(50),
    }
}

#[test]
fn an_unreachable_primary_fails_over_at_once_and_is_sent_nothing_more() {
    let now = crate::epoch();
    let mut t = table(settings(primary()), 10, &[7001, 7002]);
    let id = open(&mut t, 5000, now);
    // The first to answer speaks for the session.
    assert!(matches!(
        t.on_answer(id, addr(7001), b"a", now),
        AnswerVerdict::Deliver {
            failover: false,
            ..
        }
    ));
    assert_eq!(
        t.on_answer(id, addr(7002), b"b", now),
        AnswerVerdict::Duplicate { behind: None }
    );
    // Its process dies; the kernel says so at the next datagram: no 50 ms of silence needed.
    let later = now + MS;
    let r = t.on_unreachable(id, addr(7001), later);
    assert_eq!(
        r,
        UnreachableReport {
            failover: true,
            closed: None
        }
    );
    assert_eq!(t.get(id).unwrap().members().targets(), [addr(7002)]);
    assert!(matches!(
        t.on_answer(id, addr(7002), b"c", later),
        AnswerVerdict::Deliver { .. }
    ));
    // A report about a replica the session no longer has, or a stranger, changes nothing.
    assert_eq!(
        t.on_unreachable(id, addr(7001), later),
        UnreachableReport::default()
    );
    assert_eq!(
        t.on_unreachable(id, addr(9999), later),
        UnreachableReport::default()
    );
}

#[test]
fn a_session_whose_last_replica_is_unreachable_closes_and_the_next_opens_elsewhere() {
    let now = crate::epoch();
    let mut s = settings(copies());
    s.fanout = 1;
    let mut t = table(s, 10, &[7001, 7002]);
    let id = open(&mut t, 5000, now);
    let first = t.get(id).unwrap().members().targets()[0];
    let other = if first == addr(7001) {
        addr(7002)
    } else {
        addr(7001)
    };
    let r = t.on_unreachable(id, first, now);
    assert_eq!(
        r.closed,
        Some(Closed {
            id,
            client: addr(5000),
            reason: CloseReason::Unreachable
        })
    );
    assert!(t.is_empty());
    assert_eq!(t.unreachable(now).collect::<Vec<_>>(), [first]);
    // The player's next datagram opens a fresh session, on the replica that is there.
    let id = open(&mut t, 5000, now + MS);
    assert_eq!(t.get(id).unwrap().members().targets(), [other]);
    // Forgotten once the time is up (a restarted process at that address is used again)…
    assert_eq!(t.unreachable(now + UNREACHABLE_FOR).count(), 0);
}

#[test]
fn a_replica_reported_unreachable_that_answers_is_trusted_again() {
    let now = crate::epoch();
    let mut t = table(settings(copies()), 10, &[7001, 7002]);
    let a = open(&mut t, 5000, now);
    let b = open(&mut t, 5001, now);
    t.on_unreachable(a, addr(7001), now);
    assert_eq!(t.unreachable(now).collect::<Vec<_>>(), [addr(7001)]);
    // Another session still has it, and hears it: it was a passing loss, not a death.
    assert!(matches!(
        t.on_answer(b, addr(7001), b"x", now + MS),
        AnswerVerdict::Deliver { .. }
    ));
    assert_eq!(t.unreachable(now + MS).count(), 0);
    // The session that dropped it takes it back when discovery next speaks of it.
    let report = apply(&mut t, snapshot(2, &ready(&[7001, 7002, 7003])), now + MS);
    assert_eq!(
        report.sessions_changed, 1,
        "the other had nothing to change (no late join)"
    );
    assert!(t.get(a).unwrap().members().targets().contains(&addr(7001)));
}
