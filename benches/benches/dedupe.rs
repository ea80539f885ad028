//! Cost of the sans-io core per packet: each dedupe mode, and a session lookup.
//!
//! Run: `cargo bench -p spotable-bench --bench dedupe`. Reports time per answer (or per
//! client datagram), with 3 replicas answering every payload as in production.

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use spotable_core::dedupe::{Agreement, Deduper, Endian, Mode, SequenceSpec, SlotState, Width};
use spotable_core::replicas::{Replica, Snapshot};
use spotable_core::session::{Admission, ClientVerdict, SessionTable, Settings};

const REPLICAS: usize = 3;

/// Agreement before trust as the proxy runs it by default.
const AGREEMENT: Agreement = Agreement::On {
    failover_after: Duration::from_millis(50),
};

fn modes() -> [(&'static str, Mode); 3] {
    [
        (
            "copies",
            Mode::Copies {
                window: Duration::from_secs(2),
                max_entries: 4096,
            },
        ),
        (
            "sequence",
            Mode::Sequence {
                spec: SequenceSpec {
                    offset: 0,
                    width: Width::Four,
                    endian: Endian::Big,
                },
                window: Duration::from_secs(2),
                max_entries: 4096,
                resync_after: 2,
            },
        ),
        (
            "primary",
            Mode::Primary {
                failover_after: Duration::from_millis(50),
            },
        ),
    ]
}

fn dedupe(c: &mut Criterion) {
    let slots = [SlotState::Ready; REPLICAS];
    for size in [64usize, 1200] {
        let mut group = c.benchmark_group(format!("dedupe/{size}B"));
        group.throughput(Throughput::Elements(REPLICAS as u64));
        let off = (
            "copies, agreement off",
            modes()[0].1.clone(),
            Agreement::Off,
        );
        let modes = modes().into_iter().map(|(n, m)| (n, m, AGREEMENT));
        for (name, mode, agreement) in modes.chain([off]) {
            let start = Instant::now();
            // Deterministic replicas: past the first answers, every session is trusted.
            let mut d = Deduper::new(&mode, agreement, false, 7, start, &slots);
            let mut payload = vec![0u8; size];
            let mut seq = 0u32;
            group.bench_function(name, |b| {
                b.iter(|| {
                    seq = seq.wrapping_add(1);
                    payload[..4].copy_from_slice(&seq.to_be_bytes());
                    // One answer per millisecond: time moves with the stream, so entries
                    // expire and the window holds about 2000 of them.
                    let now = start + Duration::from_millis(u64::from(seq));
                    for slot in 0..REPLICAS {
                        black_box(d.on_answer(slot, black_box(&payload), now, &slots));
                    }
                });
            });
        }
        group.finish();
    }
}

fn session_lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("session");
    group.throughput(Throughput::Elements(1));
    for sessions in [100usize, 10_000] {
        let snapshot = Arc::new(Snapshot {
            version: 1,
            replicas: (0..REPLICAS as u16)
                .map(|p| Replica::ready(SocketAddr::from(([10, 0, 0, 1], 7000 + p))))
                .collect(),
            games: Vec::new(),
            moves: Vec::new(),
        });
        let settings = Settings {
            mode: modes()[0].1.clone(),
            agreement: AGREEMENT,
            session_timeout: Duration::from_secs(60),
            rate: None,
            max_datagram: 1500,
            fanout: REPLICAS,
            late_join: false,
            replica_header: None,
            max_sessions: None,
            max_pps: None,
            token: None,
        };
        let mut table =
            SessionTable::new(Arc::new(settings), Admission::new(sessions), snapshot, 1);
        let now = Instant::now();
        let clients: Vec<SocketAddr> = (0..sessions)
            .map(|i| SocketAddr::from(([192, 168, (i >> 8) as u8, i as u8], 40_000)))
            .collect();
        for &client in &clients {
            assert!(matches!(
                table.on_client(0, client, 64, now),
                ClientVerdict::Forward { .. }
            ));
        }
        let mut i = 0;
        group.bench_function(format!("client_datagram/{sessions}_sessions"), |b| {
            b.iter(|| {
                i = (i + 7919) % sessions;
                black_box(matches!(
                    table.on_client(0, clients[i], 64, now),
                    ClientVerdict::Forward { .. }
                ));
            });
        });
    }
    group.finish();
}

criterion_group!(benches, dedupe, session_lookup);
criterion_main!(benches);
