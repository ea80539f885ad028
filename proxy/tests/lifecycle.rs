//! A fleet's real life against the real binary: a replica talking to the proxy, descriptors
//! running out, a worker dying, clients over their rate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use spotable_fixtures::process::{http_get, loopback_proxy_args, spawn_proxy_env};

const MS: Duration = Duration::from_millis(1);

/// A replica played by the test that echoes everything it receives, counting it.
struct EchoReplica {
    socket: UdpSocket,
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl EchoReplica {
    fn start() -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_read_timeout(Some(20 * MS)).unwrap();
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, n, halt) = (socket.try_clone().unwrap(), received.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !halt.load(Ordering::Acquire) {
                if let Ok((len, from)) = s.recv_from(&mut buf) {
                    n.fetch_add(1, Ordering::AcqRel);
                    let _ = s.send_to(&buf[..len], from);
                }
            }
        });
        Self {
            socket,
            received,
            stop,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.socket.local_addr().unwrap()
    }
}

impl Drop for EchoReplica {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

#[test]
fn a_replica_sending_to_the_listener_starts_no_loop() {
    // Echoing replicas: if the proxy served the replica as a player, its datagram would be
    // fanned out to both, echoed, delivered back to the first, echoed to the proxy, and so on.
    let (r1, r2) = (EchoReplica::start(), EchoReplica::start());
    let proxy = start_proxy(&[r1.addr(), r2.addr()], &["--rate-limit", "0"]);
    r1.socket
        .send_to(b"hello from a replica", proxy.addr)
        .unwrap();
    let dropped = wait_metric(
        &proxy,
        "spotable_drops_total",
        &[("reason", "from_replica")],
        |v| v >= 1.0,
    );
    assert_eq!(
        dropped, 1.0,
        "the replica's datagram is dropped and counted"
    );
    // A loop starts with a forward. The worker counts a datagram's drop and any forward of
    // it in the same flush, so once the drop shows, the absence of a forward is certain.
    assert_eq!(metric(&proxy, "spotable_client_packets_total", &[]), 1.0);
    assert_eq!(metric(&proxy, "spotable_upstream_packets_total", &[]), 0.0);
    assert_eq!(
        r2.received.load(Ordering::Acquire),
        0,
        "fanned out to a replica"
    );
    assert_eq!(metric(&proxy, "spotable_sessions_opened_total", &[]), 0.0);
    // Players are still served.
    let c = client(&proxy);
    c.send(b"player").unwrap();
    let mut buf = [0u8; 64];
    let n = c.recv(&mut buf).unwrap_or(0);
    assert!(
        n > 0 || eventually(Duration::from_secs(2), || c.recv(&mut buf).is_ok()),
        "a player got no answer"
    );
}

#[test]
fn out_of_descriptors_the_proxy_stays_healthy_and_quiet() {
    let replica = EchoReplica::start();
    let args = loopback_proxy_args(&[replica.addr()], 2, &["--rate-limit", "0"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let proxy_path = proxy_exe();
    let prefix = ["--nofile=1024:1024", proxy_path.to_str().unwrap()];
    let proxy = spawn_proxy_env(Path::new("prlimit"), &prefix, &args, false, &[]).unwrap();
    let admin = proxy.admin.expect("admin");
    let limit = wait_metric(&proxy, "spotable_session_limit", &[], |v| v > 0.0);
    assert!(
        (800.0..1024.0).contains(&limit),
        "session limit {limit} does not fit 1024 descriptors"
    );
    assert_eq!(log_count(&proxy, "does not fit the open-file limit"), 1);

    // 2 000 players on distinct addresses, three datagrams each, /healthz probed throughout.
    let mut slowest = Duration::ZERO;
    for round in 0..3 {
        for i in 0..2000u32 {
            let ip = std::net::Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250) as u8 + 1);
            let s = UdpSocket::bind((ip, 0)).unwrap();
            s.send_to(format!("{round}/{i}").as_bytes(), proxy.addr)
                .unwrap();
            if i % 250 == 0 {
                let t = Instant::now();
                let (status, _) = http_get(admin, "/healthz").unwrap();
                slowest = slowest.max(t.elapsed());
                assert_eq!(status, 200);
            }
        }
    }
    assert!(
        slowest < Duration::from_secs(1),
        "/healthz took {slowest:?}"
    );
    let refused = wait_metric(
        &proxy,
        "spotable_drops_total",
        &[("reason", "session_limit")],
        |v| v > 0.0,
    );
    assert!(
        refused > 0.0,
        "sessions beyond the limit are refused, counted"
    );
    assert_eq!(http_get(admin, "/metrics").unwrap().0, 200);
    assert_eq!(
        metric(
            &proxy,
            "spotable_drops_total",
            &[("reason", "socket_error")]
        ),
        0.0
    );
    let lines = proxy.log.lines();
    assert!(
        lines.len() < 50,
        "{} log lines:\n{}",
        lines.len(),
        lines.join("\n")
    );
}

#[test]
fn a_dead_worker_fails_health_and_ends_the_process() {
    let replica = EchoReplica::start();
    let args = loopback_proxy_args(&[replica.addr()], 2, &["--drain-delay", "2s"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut proxy = spawn_proxy_env(
        &proxy_exe(),
        &[],
        &args,
        true,
        &[("SPOTABLE_TEST_FAULT", "worker-panic-after-ms=1500")],
    )
    .unwrap();
    let admin = proxy.admin.unwrap();
    assert_eq!(http_get(admin, "/healthz").unwrap().0, 200);
    assert_eq!(metric(&proxy, "spotable_workers_up", &[]), 2.0);
    let mut body = String::new();
    assert!(
        eventually(Duration::from_secs(10), || {
            match http_get(admin, "/healthz") {
                Ok((503, b)) => {
                    body = b;
                    true
                }
                _ => false,
            }
        }),
        "/healthz never failed"
    );
    assert!(body.contains("worker 0 panicked"), "{body}");
    assert_eq!(http_get(admin, "/readyz").unwrap().0, 503);
    let status = proxy.process.wait_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(status.code(), Some(1), "exit status {status}");
    assert!(log_count(&proxy, "worker 0 panicked") >= 1);
}

#[test]
fn a_client_over_its_rate_is_logged_once_per_interval() {
    let replica = EchoReplica::start();
    let proxy = start_proxy(&[replica.addr()], &["--rate-limit", "10"]);
    let c = client(&proxy);
    for i in 0..300u32 {
        c.send(&i.to_be_bytes()).unwrap();
    }
    assert!(
        eventually(Duration::from_secs(5), || log_count(
            &proxy,
            "client over its packet rate"
        ) == 1),
        "no line for the rate-limited client"
    );
    let clients = wait_metric(&proxy, "spotable_rate_limited_clients_total", &[], |v| {
        v >= 1.0
    });
    assert_eq!(clients, 1.0);
    let dropped = metric(
        &proxy,
        "spotable_drops_total",
        &[("reason", "rate_limited")],
    );
    assert!(dropped >= 250.0, "{dropped}");
    // More drops within the interval add no line.
    for i in 0..300u32 {
        c.send(&i.to_be_bytes()).unwrap();
    }
    wait_metric(
        &proxy,
        "spotable_drops_total",
        &[("reason", "rate_limited")],
        |v| v >= dropped + 250.0,
    );
    assert_eq!(log_count(&proxy, "client over its packet rate"), 1);
}
