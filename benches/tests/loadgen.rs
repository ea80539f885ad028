//! The load generator against real sockets: a scripted responder that drops, repeats and
//! delays answers by sequence number, a real replica process, and a port with nobody behind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use spotable_bench::loadgen::{self, LoadArgs, Mode, Report};
use spotable_fixtures::process::spawn_replica;
use spotable_fixtures::wire;

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_spotable-bench"))
}

#[derive(Parser)]
struct Wrap {
    #[command(flatten)]
    args: LoadArgs,
}

fn args(target: SocketAddr, extra: &[&str]) -> LoadArgs {
    let target = target.to_string();
    let mut argv = vec!["x", "--target", &target, "--bind", "127.0.0.1:0"];
    argv.extend_from_slice(extra);
    Wrap::parse_from(argv).args
}

/// Answers by sequence number: seq % 5 == 1 never, seq % 7 == 2 twice, seq % 4 == 0 after
/// 150 ms, the rest at once. Runs until `stop`.
fn scripted_responder(stop: Arc<AtomicBool>) -> (SocketAddr, std::thread::JoinHandle<()>) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
    let addr = s.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let mut later: VecDeque<(Instant, SocketAddr, Vec<u8>)> = VecDeque::new();
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            while later
                .front()
                .is_some_and(|(due, _, _)| *due <= Instant::now())
            {
                let (_, to, p) = later.pop_front().unwrap();
                s.send_to(&p, to).unwrap();
            }
            let Ok((n, from)) = s.recv_from(&mut buf) else {
                continue;
            };
            let p = buf[..n].to_vec();
            let seq = wire::seq_of(&p).unwrap();
            if seq % 5 == 1 {
                continue;
            }
            if seq.is_multiple_of(4) {
                later.push_back((Instant::now() + Duration::from_millis(150), from, p));
                continue;
            }
            s.send_to(&p, from).unwrap();
            if seq % 7 == 2 {
                s.send_to(&p, from).unwrap();
            }
        }
    });
    (addr, h)
}

#[test]
fn lost_duplicate_and_late_answers_are_counted_exactly() {
    let stop = Arc::new(AtomicBool::new(false));
    let (addr, h) = scripted_responder(stop.clone());
    // One flow, so sequence numbers are 0..sent; 400/s for 1 s, nothing discarded.
    let r = loadgen::run(&args(
        addr,
        &[
            "--flows",
            "1",
            "--rate",
            "400",
            "--duration",
            "1s",
            "--warmup",
            "0s",
            "--late-after",
            "100ms",
            "--drain",
            "400ms",
        ],
    ))
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    h.join().unwrap();
    assert_eq!(r.sent, 400, "{r:?}");
    let seqs = 0..r.sent;
    let lost = seqs.clone().filter(|s| s % 5 == 1).count() as u64;
    let late = seqs.clone().filter(|s| s % 5 != 1 && s % 4 == 0).count() as u64;
    let dups = seqs
        .clone()
        .filter(|s| s % 5 != 1 && s % 4 != 0 && s % 7 == 2)
        .count() as u64;
    assert_eq!(r.lost, lost);
    assert_eq!(r.late, late);
    assert_eq!(r.duplicates, dups);
    assert_eq!(r.unique, r.sent - lost - late);
    assert_eq!(r.unknown, 0);
    // Late answers took ~150 ms; the rest came back at once.
    assert!(r.rtt_us.max >= 150_000.0, "{:?}", r.rtt_us);
    assert!(r.rtt_us.p50 < 100_000.0, "{:?}", r.rtt_us);
}

#[test]
fn a_replica_that_repeats_itself_shows_as_duplicates_not_throughput() {
    let replica = spawn_replica(exe(), &["replica", "--copies", "3"]).unwrap();
    let r = loadgen::run(&args(
        replica.addr,
        &[
            "--flows",
            "8",
            "--rate",
            "1000",
            "--duration",
            "1s",
            "--warmup",
            "200ms",
        ],
    ))
    .unwrap();
    assert!(r.sent >= 700, "{r:?}");
    assert_eq!(r.lost, 0, "{r:?}");
    assert_eq!(r.unique + r.late, r.sent);
    assert_eq!(r.duplicates, 2 * r.sent);
    assert!((r.received_per_sec / r.answers_per_sec - 3.0).abs() < 0.01);
    // The timelines count from the start, warm-up included: every answer, and first ones.
    let firsts: u32 = r.timeline.iter().sum();
    let all: u32 = r.timeline_all.iter().sum();
    assert!(u64::from(firsts) >= r.sent, "{firsts} < {}", r.sent);
    assert_eq!(all, 3 * firsts);
}

#[test]
fn with_nobody_behind_the_port_everything_is_lost() {
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let r = loadgen::run(&args(
        port,
        &[
            "--flows",
            "4",
            "--rate",
            "500",
            "--duration",
            "500ms",
            "--warmup",
            "0s",
            "--drain",
            "100ms",
        ],
    ))
    .unwrap();
    assert_eq!(r.sent, 250);
    assert_eq!(r.lost, r.sent);
    assert_eq!(r.unique + r.late + r.duplicates, 0);
    assert_eq!(r.answers_per_sec, 0.0);
}

#[test]
fn closed_loop_keeps_its_window_full_and_reports_json() {
    let replica = spawn_replica(exe(), &["replica"]).unwrap();
    let out = Command::new(exe())
        .args([
            "loadgen",
            "--target",
            &replica.addr.to_string(),
            "--bind",
            "127.0.0.1:0",
        ])
        .args([
            "--mode",
            "closed",
            "--flows",
            "4",
            "--window",
            "2",
            "--duration",
            "1s",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Report = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r.mode, Some(Mode::Closed));
    // Far more than a paced run would send: the next datagram leaves on each answer.
    assert!(r.answers_per_sec > 2000.0, "{r:?}");
    assert_eq!(r.duplicates, 0);
    // A full window per flow, refilled on answers: next to nothing goes missing.
    assert!(r.lost * 100 <= r.sent, "{r:?}");
    assert!(!r.cdf.is_empty() && r.rtt_us.p50 > 0.0);
}
