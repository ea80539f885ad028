//! The replica program and the demo, as the processes users and tests run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::UdpSocket;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use spotable_bench::process::spawn_replica;

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_spotable-bench"))
}

fn ask(replica: std::net::SocketAddr, payload: &[u8], expect: usize) -> Vec<Vec<u8>> {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    s.send_to(payload, replica).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while let Ok(n) = s.recv(&mut buf) {
        got.push(buf[..n].to_vec());
        if got.len() > expect {
            break;
        }
    }
    got
}

#[test]
fn replica_echoes_deterministically() {
    let a = spawn_replica(exe(), &[]).unwrap();
    let b = spawn_replica(exe(), &[]).unwrap();
    assert_eq!(ask(a.addr, b"tick 1", 1), vec![b"tick 1".to_vec()]);
    assert_eq!(ask(a.addr, b"tick 1", 1), ask(b.addr, b"tick 1", 1));
}

#[test]
fn replica_repeats_and_tags_on_request() {
    let r = spawn_replica(exe(), &["--copies", "3", "--tag", "/r7"]).unwrap();
    assert_eq!(ask(r.addr, b"x", 3), vec![b"x/r7".to_vec(); 3]);
}

#[test]
fn replica_dies_on_sigkill() {
    let mut r = spawn_replica(exe(), &[]).unwrap();
    r.process.kill().unwrap();
    assert!(ask(r.addr, b"anyone?", 1).is_empty());
}

#[test]
fn demo_reports_no_loss_and_no_duplicate_across_a_replica_kill() {
    let out = Command::new(exe())
        .args([
            "demo",
            "--duration",
            "3s",
            "--kill-at",
            "1500ms",
            "--rate",
            "300",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |name: &str| -> u64 {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from:\n{stdout}"))
    };
    assert_eq!(field("sent"), 900);
    assert_eq!(field("received"), 900);
    assert_eq!(field("lost"), 0);
    assert_eq!(field("duplicates delivered"), 0);
    // 3 replicas for half the run, 2 for the rest: 2 + 1 copies suppressed per datagram.
    let suppressed = field("duplicates suppressed");
    assert!(
        (1300..=1500).contains(&suppressed),
        "{suppressed} suppressed"
    );
    assert!(stdout.contains("SIGKILL replica 2"), "{stdout}");
}

#[test]
fn demo_rejects_a_kill_after_the_end() {
    let out = Command::new(exe())
        .args(["demo", "--duration", "1s", "--kill-at", "2s"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--kill-at"));
}
