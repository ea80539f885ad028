//! One game cannot take the fleet down: two games behind one listener, one of them flooded,
//! with real processes and real sockets on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use spotable_fixtures::process::ReplicaProcess;

const MS: Duration = Duration::from_millis(1);
const FLOODED: &[u8] = b"arena-01";
const QUIET: &[u8] = b"arena-02";

type Started = (
    Vec<ReplicaProcess>,
    spotable_fixtures::process::ProxyProcess,
    TempConfig,
);

/// Two games of two echo replicas each; `arena-1` with `limits` in its table.
fn start(limits: &str, proxy_args: &[&str]) -> Started {
    let replicas: Vec<_> = (0..4).map(|_| replica(&[])).collect();
    let config = TempConfig::write(
        "tenants",
        replicas[0].addr.port(),
        &format!(
            "[[game]]\nname = \"arena-1\"\ntokens = [\"arena-01\"]\nreplicas = [{}]\n{limits}\n\n\
             [[game]]\nname = \"arena-2\"\ntokens = [\"arena-02\"]\nreplicas = [{}]\n",
            toml_list(&replicas[..2]),
            toml_list(&replicas[2..])
        ),
    );
    let file = config.arg();
    let mut args = vec!["--token-bytes", "8", "--config", &file];
    args.extend_from_slice(proxy_args);
    let proxy = start_proxy(&[], &args);
    (replicas, proxy, config)
}

/// Sends one datagram of game `token` from each of `ports` sockets every 100 ms until stopped.
struct Flood {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flood {
    fn start(proxy: std::net::SocketAddr, ports: usize, token: &'static [u8]) -> Self {
        let sockets: Vec<UdpSocket> = (0..ports)
            .map(|_| {
                let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                s.connect(proxy).unwrap();
                s.set_nonblocking(true).unwrap();
                s
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut datagram = b"flood|".to_vec();
            datagram.extend_from_slice(token);
            let mut sink = [0u8; 64];
            while !flag.load(Ordering::Acquire) {
                for s in &sockets {
                    let _ = s.send(&datagram);
                    while s.recv(&mut sink).is_ok() {}
                }
                std::thread::sleep(100 * MS);
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A game's open sessions as `GET /games` shows them.
fn game_sessions(proxy: &spotable_fixtures::process::ProxyProcess, game: &str) -> u64 {
    let (status, body) =
        spotable_fixtures::process::http_get(proxy.admin.unwrap(), "/games").unwrap();
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["games"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == game)
        .and_then(|g| g["sessions"].as_u64())
        .unwrap()
}

#[test]
fn a_game_flooded_from_many_ports_holds_its_quota_and_the_other_games_players_get_in() {
    // The flood and the players' sockets: more than the default soft limit of descriptors.
    spotable_edge::fds::raise_limit();
    let (_replicas, proxy, _config) = start("max_sessions = 300", &["--max-sessions", "1200"]);
    let flood = Flood::start(proxy.addr, 1500, FLOODED);
    let game = [("game", "arena-1")];
    wait_metric(&proxy, "spotable_game_sessions", &game, |v| v >= 300.0);
    let refused = [("reason", "game_session_limit")];
    wait_metric(&proxy, "spotable_drops_total", &refused, |v| v >= 1200.0);

    // Beside the flood, 40 new players of the other game, all at once: every answer, once.
    let players: Vec<_> = (0..40)
        .map(|_| {
            let c = client(&proxy);
            std::thread::spawn(move || {
                let rx = Collector::start(&c);
                stream_with_suffix(&c, 50, 4 * MS, QUIET, |_| {});
                rx.finish(50)
            })
        })
        .collect();
    for p in players {
        assert_each(&p.join().unwrap(), 50, 1);
    }
    assert_eq!(game_sessions(&proxy, "arena-2"), 40);
    assert_eq!(
        metric(&proxy, "spotable_game_sessions", &[("game", "arena-2")]),
        40.0
    );
    // The flooded game never held more than its quota, and still holds it exactly.
    assert_eq!(game_sessions(&proxy, "arena-1"), 300);
    assert_eq!(metric(&proxy, "spotable_game_sessions", &game), 300.0);
    assert_eq!(
        metric(
            &proxy,
            "spotable_drops_total",
            &[("reason", "session_limit")]
        ),
        0.0,
        "the proxy's own table never filled"
    );
    drop(flood);
    let (status, _) =
        spotable_fixtures::process::http_get(proxy.admin.unwrap(), "/healthz").unwrap();
    assert_eq!(status, 200);
}

/// A free UDP port on `ip` (the proxy binds it next).
fn free_port(ip: &str) -> u16 {
    UdpSocket::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn two_proxies_named_as_each_others_replica_pass_a_player_datagram_on_once_and_stay_healthy() {
    // Each listens on an address of its own too, the other's replica: a typo in two tables.
    let (pa, pb) = (free_port("127.0.0.2"), free_port("127.0.0.3"));
    let (a_front, b_front) = (format!("127.0.0.2:{pa}"), format!("127.0.0.3:{pb}"));
    let a = start_proxy(
        &[],
        &[
            "--listen",
            &a_front,
            "--replica",
            &b_front,
            "--rate-limit",
            "0",
        ],
    );
    let b = start_proxy(
        &[],
        &[
            "--listen",
            &b_front,
            "--replica",
            &a_front,
            "--rate-limit",
            "0",
        ],
    );
    let player = UdpSocket::bind("127.0.0.1:0").unwrap();
    player.send_to(b"hello", &a_front).unwrap();
    let looped = [("reason", "loop")];
    wait_metric(&b, "spotable_drops_total", &looped, |v| v >= 1.0);
    let upstream = |p: &spotable_fixtures::process::ProxyProcess| {
        metric(p, "spotable_upstream_packets_total", &[])
    };
    // B counts the drop and what it sent upstream in the same flush of the worker that read
    // the datagram: with B having sent nothing, the datagram has nowhere further to go.
    let (sent_a, sent_b) = (upstream(&a), upstream(&b));
    assert!(
        sent_a + sent_b <= 64.0,
        "{} datagrams went round",
        sent_a + sent_b
    );
    assert_eq!(sent_a, 1.0, "the player's datagram, to B");
    assert_eq!(sent_b, 0.0, "B took it for what it is");
    for p in [&a, &b] {
        let (status, _) =
            spotable_fixtures::process::http_get(p.admin.unwrap(), "/healthz").unwrap();
        assert_eq!(status, 200);
    }
}
