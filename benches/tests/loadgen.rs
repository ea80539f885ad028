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

/// The machine stalls the generator across the end of its sending time (SIGSTOP, as a busy
/// host's scheduler might): what fell due is still sent, and still given time to be answered.
#[test]
fn a_stall_across_the_end_still_sends_and_drains_all_that_was_due() {
    let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
    echo.set_read_timeout(Some(Duration::from_millis(10)))
        .unwrap();
    let target = echo.local_addr().unwrap();
    let child = Command::new(exe())
        .args(["loadgen", "--target", &target.to_string()])
        .args(["--bind", "127.0.0.1:0", "--flows", "2", "--rate", "500"])
        .args(["--duration", "1s", "--warmup", "0s", "--drain", "200ms"])
        .arg("--json")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut guard = spotable_fixtures::process::Guard::new(child);
    // Read the report as it comes, so a full pipe never holds the child up.
    let mut stdout = guard.child_mut().stdout.take().unwrap();
    let report = std::thread::spawn(move || {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut out).map(|_| out)
    });
    let mut buf = [0u8; 2048];
    let mut first = None;
    let mut stalled = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "the generator never finished");
        if let Ok((n, from)) = echo.recv_from(&mut buf) {
            let _ = echo.send_to(&buf[..n], from);
            first.get_or_insert_with(Instant::now);
        }
        // Stop it from 0.7 s into its run until well past its end at 1.2 s.
        if !stalled && first.is_some_and(|t: Instant| t.elapsed() >= Duration::from_millis(700)) {
            guard.signal(libc::SIGSTOP).unwrap();
            std::thread::sleep(Duration::from_millis(900));
            guard.signal(libc::SIGCONT).unwrap();
            stalled = true;
        }
        if let Some(status) = guard.child_mut().try_wait().unwrap() {
            let mut err = String::new();
            let _ =
                std::io::Read::read_to_string(guard.child_mut().stderr.as_mut().unwrap(), &mut err);
            assert!(status.success(), "{status}: {err}");
            break;
        }
    }
    assert!(stalled, "the generator finished before the stall");
    let r: Report = serde_json::from_slice(&report.join().unwrap().unwrap()).unwrap();
    assert_eq!(r.sent, 500, "{r:?}");
    assert_eq!(r.lost, 0, "{r:?}");
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
