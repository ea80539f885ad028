//! Hostile and broken input: empty, huge and oversized datagrams, floods from many source
//! ports, rate abuse, bad configuration. Counted and survived, never a panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::UdpSocket;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const MS: Duration = Duration::from_millis(1);
const SECOND: Duration = Duration::from_secs(1);

fn recv_one(c: &UdpSocket, timeout: Duration) -> Option<Vec<u8>> {
    c.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = vec![0u8; 65_536];
    c.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
}

#[test]
fn empty_datagram_is_dropped_and_counted_and_opens_no_session() {
    let s = setup(&[&[]], &[]);
    let c = client(&s.proxy);
    c.send(b"").unwrap();
    let drops = wait_metric(
        &s.proxy,
        "spotable_drops_total",
        &[("reason", "empty")],
        |v| v >= 1.0,
    );
    assert_eq!(drops, 1.0);
    assert_eq!(metric(&s.proxy, "spotable_sessions", &[]), 0.0);
    assert_eq!(recv_one(&c, 200 * MS), None);
    // The proxy is still serving.
    c.send(b"after").unwrap();
    assert_eq!(recv_one(&c, 5 * 1000 * MS).as_deref(), Some(&b"after"[..]));
}

#[test]
fn largest_udp_datagram_goes_through_intact() {
    let s = setup(&[&[], &[]], &[]);
    let c = client(&s.proxy);
    let big: Vec<u8> = (0..65_507u32).map(|i| (i % 251) as u8).collect();
    c.send(&big).unwrap();
    let got = recv_one(&c, Duration::from_secs(5)).expect("answer to a 65 507-byte datagram");
    assert_eq!(got.len(), 65_507);
    assert!(got == big, "payload altered");
    assert_eq!(recv_one(&c, 200 * MS), None, "exactly one copy");
}

#[test]
fn datagrams_over_max_datagram_are_dropped_and_counted() {
    let s = setup(&[&[]], &["--max-datagram", "1200"]);
    let c = client(&s.proxy);
    c.send(&[1u8; 1201]).unwrap();
    c.send(&[2u8; 65_507]).unwrap();
    c.send(&[3u8; 1200]).unwrap();
    assert_eq!(recv_one(&c, Duration::from_secs(5)), Some(vec![3u8; 1200]));
    let drops = wait_metric(
        &s.proxy,
        "spotable_drops_total",
        &[("reason", "oversized")],
        |v| v >= 2.0,
    );
    assert_eq!(drops, 2.0);
}

#[test]
fn flood_from_many_source_ports_is_bounded_by_the_session_limit() {
    let s = setup(&[&[]], &["--max-sessions", "100"]);
    // Warm up one session so the baseline includes a working data path.
    let c = client(&s.proxy);
    c.send(b"warm").unwrap();
    recv_one(&c, Duration::from_secs(5)).expect("warm-up answer");
    let before = rss_kib(s.proxy.process.pid());

    let mut sockets = Vec::new();
    for round in 0..4 {
        for _ in 0..500 {
            let s2 = UdpSocket::bind("127.0.0.1:0").unwrap();
            s2.send_to(&[7u8; 32], s.proxy.addr).unwrap();
            sockets.push(s2);
        }
        // Release the ports of earlier rounds too: the flood keeps coming from new ones.
        if round % 2 == 1 {
            sockets.clear();
        }
        std::thread::sleep(20 * MS);
    }
    // 2001 datagrams were sent: each is read by the proxy or dropped by the kernel at its
    // front socket (counted too), however fast the flood came.
    let accounted = || {
        metric(&s.proxy, "spotable_client_packets_total", &[])
            + metric(&s.proxy, "spotable_front_kernel_drops_total", &[])
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while accounted() < 2001.0 && Instant::now() < deadline {
        std::thread::sleep(20 * MS);
    }
    assert_eq!(
        accounted(),
        2001.0,
        "every datagram read or counted as a kernel drop"
    );
    let received = metric(&s.proxy, "spotable_client_packets_total", &[]);
    // Freed ports get reused, so a few flood datagrams hit admitted sessions: count exactly
    // by invariant rather than by port.
    let drops = metric(
        &s.proxy,
        "spotable_drops_total",
        &[("reason", "session_limit")],
    );
    let forwarded = metric(&s.proxy, "spotable_upstream_packets_total", &[]);
    assert_eq!(
        drops + forwarded,
        received,
        "every datagram forwarded or refused"
    );
    // At most one datagram per admitted session plus port reuse is forwarded; the rest of
    // what was read is refused.
    assert!(drops >= received - 200.0, "{drops} refused of {received}");
    assert_eq!(
        metric(&s.proxy, "spotable_sessions_opened_total", &[]),
        100.0
    );
    assert_eq!(metric(&s.proxy, "spotable_sessions", &[]), 100.0);
    // Said in the log too, at most once per worker in the interval, not once per datagram.
    let warning = "session limit reached";
    assert!(eventually(5 * SECOND, || log_count(&s.proxy, warning) > 0));
    assert!(log_count(&s.proxy, warning) <= 2, "one per worker at most");
    let grown = rss_kib(s.proxy.process.pid()).saturating_sub(before);
    assert!(
        grown < 16 * 1024,
        "resident memory grew by {grown} KiB under the flood"
    );
    // Existing players are not locked out.
    c.send(b"still here").unwrap();
    assert_eq!(
        recv_one(&c, Duration::from_secs(5)).as_deref(),
        Some(&b"still here"[..])
    );
}

#[test]
fn per_client_rate_limit_bounds_fan_out_and_is_counted() {
    let s = setup(&[&[], &[]], &["--rate-limit", "20", "--rate-burst", "5"]);
    let c = client(&s.proxy);
    for _ in 0..50 {
        c.send(b"spam").unwrap();
    }
    let limited = wait_metric(
        &s.proxy,
        "spotable_drops_total",
        &[("reason", "rate_limited")],
        |v| v >= 44.0,
    );
    // 5 in the burst, perhaps one more token accrued while they were sent.
    assert!((44.0..=45.0).contains(&limited), "{limited} rate-limited");
    let upstream = metric(&s.proxy, "spotable_upstream_packets_total", &[]);
    assert!(
        (10.0..=12.0).contains(&upstream),
        "{upstream} sent upstream"
    );
}

#[test]
fn idle_sessions_expire() {
    let s = setup(&[&[]], &["--session-timeout", "1s"]);
    let c = client(&s.proxy);
    c.send(b"x").unwrap();
    recv_one(&c, Duration::from_secs(5)).expect("answer");
    assert_eq!(metric(&s.proxy, "spotable_sessions", &[]), 1.0);
    let expired = wait_metric(&s.proxy, "spotable_sessions_expired_total", &[], |v| {
        v >= 1.0
    });
    assert_eq!(expired, 1.0);
    assert_eq!(metric(&s.proxy, "spotable_sessions", &[]), 0.0);
    // The client comes back: a new session, answers flow again.
    c.send(b"y").unwrap();
    assert_eq!(
        recv_one(&c, Duration::from_secs(5)).as_deref(),
        Some(&b"y"[..])
    );
}

fn run_proxy(args: &[&str]) -> (i32, String) {
    let out = Command::new(proxy_exe()).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), stderr)
}

#[test]
fn invalid_configuration_is_a_one_line_error_naming_the_field_exit_2() {
    let dir = std::env::temp_dir().join(format!("spotable-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_string_lossy().into_owned()
    };
    let unknown = file(
        "unknown.toml",
        "listen = [\"127.0.0.1:0\"]\nmax_sesions = 5\n",
    );
    let bad_type = file(
        "type.toml",
        "listen = [\"127.0.0.1:0\"]\nreplicas = [\"127.0.0.1:1\"]\nsession_timeout = \"soon\"\n",
    );
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--config", &unknown], "unknown field `max_sesions`"),
        (vec!["--config", &bad_type], "type.toml:3: session_timeout:"),
        (
            vec!["--config", "/nonexistent/proxy.toml"],
            "cannot read /nonexistent/proxy.toml",
        ),
        (
            vec!["--listen", "127.0.0.1:0"],
            "replicas: at least one replica",
        ),
        (
            vec![
                "--listen",
                "127.0.0.1:0",
                "--replica",
                "127.0.0.1:1",
                "--sequence-width",
                "3",
            ],
            "--sequence-width",
        ),
        (
            vec![
                "--listen",
                "127.0.0.1:0",
                "--replica",
                "127.0.0.1:1",
                "--dedupe",
                "sequence",
            ],
            "sequence_offset: required",
        ),
        (
            vec!["--listen", "nowhere:7", "--replica", "127.0.0.1:1"],
            "--listen",
        ),
        (
            vec![
                "--listen",
                "127.0.0.1:0",
                "--replica",
                "127.0.0.1:1",
                "--failover-after",
                "x",
            ],
            "--failover-after",
        ),
    ];
    for (args, expected) in cases {
        let (code, stderr) = run_proxy(&args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{args:?}: one line: {stderr}"
        );
        assert!(
            stderr.contains(expected),
            "{args:?}: {stderr:?} lacks {expected:?}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_port_held_by_another_process_is_an_error_not_a_shared_socket() {
    let holder = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap().to_string();
    let (code, stderr) = run_proxy(&["--listen", &addr, "--replica", "127.0.0.1:1"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
}
