//! Drives `copies` dedupe and the whole session table with arbitrary operations.
//!
//! `copies` is checked against a naive model that remembers every payload forever (the
//! window and cap are set beyond what one input can reach), so any divergence is a bug in the
//! counting, not an expiry effect. The session table is driven with client datagrams, answers
//! from any address, replica-set changes and time jumps, checking its invariants.
#![no_main]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use spotable_core::dedupe::{Agreement, Copies, MAX_SLOTS, Mode, Verdict};
use spotable_core::replicas::{Replica, ReplicaState, Snapshot};
use spotable_core::session::{
    Admission, AnswerVerdict, ClientVerdict, SessionTable, Settings,
};

fn addr(port: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7000 + u16::from(port)))
}

fn copies_against_model(data: &[u8], now: Instant) {
    let mut copies = Copies::new(Duration::from_secs(3600), usize::MAX, 1, now);
    let mut model: HashMap<&[u8], ([u32; MAX_SLOTS], u32)> = HashMap::new();
    let mut rest = data;
    while let [head, tail @ ..] = rest {
        let slot = usize::from(head & 0x0f);
        let len = usize::from(head >> 4).min(tail.len());
        let (payload, tail) = tail.split_at(len);
        rest = tail;
        let (counts, forwarded) = model.entry(payload).or_insert(([0; MAX_SLOTS], 0));
        counts[slot] += 1;
        let expected = if counts[slot] > *forwarded {
            *forwarded = counts[slot];
            Verdict::Forward
        } else {
            Verdict::Duplicate
        };
        assert_eq!(copies.on_answer(slot, payload, now), expected);
    }
}

fn table_ops(data: &[u8], start: Instant) {
    let settings = Settings {
        mode: match data.first().map(|b| b % 3) {
            Some(0) => Mode::Copies {
                window: Duration::from_millis(100),
                max_entries: 8,
            },
            Some(1) => Mode::Sequence {
                spec: spotable_core::dedupe::SequenceSpec {
                    offset: 1,
                    width: spotable_core::dedupe::Width::Two,
                    endian: spotable_core::dedupe::Endian::Little,
                },
                window: Duration::from_millis(100),
                max_entries: 8,
                resync_after: 2,
            },
            _ => Mode::Primary {
                failover_after: Duration::from_millis(20),
            },
        },
        agreement: if data.get(2).is_some_and(|b| b & 1 == 1) {
            Agreement::On {
                failover_after: Duration::from_millis(20),
            }
        } else {
            Agreement::Off
        },
        session_timeout: Duration::from_millis(500),
        rate: None,
        max_datagram: 64,
        fanout: 4,
        late_join: data.get(1).is_some_and(|b| b & 1 == 1),
        replica_header: None,
        max_sessions: None,
        max_pps: None,
        token: None,
    };
    let admission = Admission::new(6);
    let mut table = SessionTable::new(
        Arc::new(settings),
        admission.clone(),
        Arc::new(Snapshot {
            version: 1,
            replicas: (0..3).map(|p| Replica::ready(addr(p))).collect(),
            games: Vec::new(),
            moves: Vec::new(),
        }),
        9,
    );
    let mut now = start;
    let mut version = 1;
    let mut closed = Vec::new();
    for chunk in data.chunks(4) {
        let [op, a, b, c] = [0, 1, 2, 3].map(|i| chunk.get(i).copied().unwrap_or(0));
        match op % 5 {
            0 => {
                // Now and then from a replica's address: that must never open a session.
                let client = if a & 0x80 != 0 {
                    addr(a % 8)
                } else {
                    SocketAddr::from(([10, 0, 0, a % 8], 5000))
                };
                let snapshot = table.snapshot().clone();
                if let ClientVerdict::Forward { targets, .. } =
                    table.on_client(0, client, usize::from(b), now)
                {
                    assert!(!targets.is_empty() && targets.len() <= 4);
                    for t in targets {
                        assert!(snapshot.state_of(*t).is_some(), "target not a replica");
                    }
                }
            }
            1 => {
                let from = addr(a % 8);
                let known = table.get(usize::from(b % 8)).map(|s| s.members().slot_of(from));
                let v = table.on_answer(usize::from(b % 8), from, chunk, now);
                if let AnswerVerdict::Deliver { .. } = v {
                    assert!(matches!(known, Some(Some(_))), "delivered from a non-member");
                }
            }
            2 => {
                version += 1;
                let replicas = (0..8u8)
                    .filter(|p| a & (1 << p) != 0)
                    .map(|p| Replica {
                        addr: addr(p),
                        state: if b & (1 << p) != 0 {
                            ReplicaState::Draining
                        } else {
                            ReplicaState::Ready
                        },
                    })
                    .collect();
                let snapshot = Arc::new(Snapshot {
                    version,
                    replicas,
                    games: Vec::new(),
                    moves: Vec::new(),
                });
                closed.clear();
                table.apply(snapshot.clone(), now, &mut closed);
                // No session is left deaf, and no replica is anyone's player.
                for c in &closed {
                    assert!(table.get(c.id).is_none(), "closed session still present");
                }
                for id in 0..8 {
                    if let Some(s) = table.get(id) {
                        assert!(!s.members().targets().is_empty(), "deaf session");
                        assert!(snapshot.state_of(s.client).is_none(), "replica as client");
                        assert!(!s.members().targets().contains(&s.client));
                    }
                }
            }
            3 => now += Duration::from_millis(u64::from(c) * 4),
            _ => {
                closed.clear();
                table.expire(now, &mut closed);
            }
        }
        assert_eq!(admission.in_use(), table.len());
        assert!(table.len() <= 6);
    }
}

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    copies_against_model(data, now);
    table_ops(data, now);
});
