//! The identity anchor with real processes: proxies with `--replica-header proxy-v2`, an
//! anchor (`spotable-wrapper anchor`) in front of each copy of a stateful test game, and a
//! player who moves from one proxy to another as the first dies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use spotable_fixtures::process::{
    ProxyProcess, ReplicaProcess, loopback_proxy_args, spawn_proxy, spawn_replica, workspace_binary,
};

fn wrapper() -> &'static str {
    env!("CARGO_BIN_EXE_spotable-wrapper")
}

fn game() -> ReplicaProcess {
    spawn_replica(&spotable_fixtures::replica::exe(), &["--stateful"]).unwrap()
}

/// A free loopback TCP port for an admin listener.
fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// An anchor in front of `game`, reporting on `admin`.
fn anchor(game: SocketAddr, admin: SocketAddr, extra: &[&str]) -> ReplicaProcess {
    let game = game.to_string();
    let admin = admin.to_string();
    let mut args = vec![
        "anchor",
        "--listen",
        "127.0.0.1:0",
        "--game",
        &game,
        "--admin",
        &admin,
    ];
    args.extend_from_slice(extra);
    spawn_replica(std::path::Path::new(wrapper()), &args).unwrap()
}

fn proxy(replicas: &[SocketAddr]) -> ProxyProcess {
    let exe = workspace_binary("spotable-proxy", "spotable-proxy");
    let args = loopback_proxy_args(replicas, 1, &["--replica-header", "proxy-v2"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    spawn_proxy(&exe, &[], &args, true).unwrap()
}

fn metric(admin: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    spotable_fixtures::process::scrape(admin, name, labels).unwrap()
}

fn wait_metric(
    admin: SocketAddr,
    name: &str,
    labels: &[(&str, &str)],
    ok: impl Fn(f64) -> bool,
) -> f64 {
    spotable_fixtures::process::scrape_until(admin, name, labels, ok).unwrap()
}

/// One answer of the stateful game: the sequence number it echoes, and the game's count of
/// datagrams from this peer and of peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Answer {
    seq: u64,
    count: u64,
    peers: u64,
}

fn parse(answer: &[u8]) -> Answer {
    let seq = u64::from_be_bytes(answer[..8].try_into().unwrap());
    let text = std::str::from_utf8(&answer[8..]).unwrap();
    let (count, peers) = text
        .strip_prefix('#')
        .and_then(|t| t.split_once('/'))
        .unwrap_or_else(|| panic!("not a stateful answer: {text:?}"));
    Answer {
        seq,
        count: count.parse().unwrap(),
        peers: peers.parse().unwrap(),
    }
}

/// Sends `seqs` to `to` at a steady pace, then reads answers until every sequence number
/// has one or the deadline passes.
fn play(c: &UdpSocket, to: SocketAddr, seqs: std::ops::Range<u64>) -> Vec<Answer> {
    let want = (seqs.end - seqs.start) as usize;
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    for seq in seqs {
        c.send_to(&seq.to_be_bytes(), to).unwrap();
        std::thread::sleep(Duration::from_millis(1));
        while let Ok(n) = c.recv(&mut buf) {
            got.push(parse(&buf[..n]));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    c.set_nonblocking(false).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    while got.len() < want && Instant::now() < deadline {
        if let Ok(n) = c.recv(&mut buf) {
            got.push(parse(&buf[..n]));
        }
    }
    c.set_nonblocking(true).unwrap();
    got
}

#[test]
fn a_player_moving_to_another_proxy_stays_one_peer_and_keeps_its_state() {
    let games = [game(), game()];
    let admins = [free_port(), free_port()];
    let anchors: Vec<ReplicaProcess> = games
        .iter()
        .zip(admins)
        .map(|(g, admin)| anchor(g.addr, admin, &["--trust", "127.0.0.0/8"]))
        .collect();
    let replicas: Vec<SocketAddr> = anchors.iter().map(|a| a.addr).collect();
    let mut a = proxy(&replicas);
    let b = proxy(&replicas);

    let player = UdpSocket::bind("127.0.0.1:0").unwrap();
    player.set_nonblocking(true).unwrap();
    // Through proxy A: both copies see one peer and count on.
    let first = play(&player, a.addr, 0..200);
    // A dies under the player, who goes on through B (as an NLB re-hash would send it).
    a.process.kill().unwrap();
    let second = play(&player, b.addr, 200..400);

    let all: Vec<Answer> = first.iter().chain(&second).copied().collect();
    let mut per_seq: HashMap<u64, usize> = HashMap::new();
    for x in &all {
        *per_seq.entry(x.seq).or_default() += 1;
    }
    assert!(
        per_seq.values().all(|&n| n == 1),
        "a duplicate reached the player"
    );
    assert_eq!(per_seq.len(), 400, "lost answers: {}", 400 - per_seq.len());
    assert!(
        all.iter().all(|x| x.peers == 1),
        "a game saw the player as a second peer"
    );
    // The game's state for the player continues: its count goes on from where A left it.
    for x in &all {
        assert_eq!(x.count, x.seq + 1, "state reset at {x:?}");
    }
    for admin in admins {
        assert_eq!(
            wait_metric(admin, "spotable_anchor_players", &[], |v| v == 1.0),
            1.0
        );
        assert_eq!(
            metric(
                admin,
                "spotable_anchor_drops_total",
                &[("reason", "untrusted")]
            ),
            0.0
        );
    }
}

fn header(player: SocketAddr) -> Vec<u8> {
    let mut h = [0u8; spotable_core::proxy_header::MAX_ENCODED];
    let n = spotable_core::proxy_header::encode(player, "127.0.0.1:7777".parse().unwrap(), &mut h);
    h[..n].to_vec()
}

#[test]
fn untrusted_sources_and_headerless_datagrams_are_dropped_and_counted() {
    let g = game();
    let admin = free_port();
    // Only 10.0.0.0/8 may speak for players: loopback may not.
    let a = anchor(g.addr, admin, &["--trust", "10.0.0.0/8"]);
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut forged = header("192.0.2.7:4000".parse().unwrap());
    forged.extend_from_slice(b"I am 192.0.2.7");
    for _ in 0..5 {
        s.send_to(&forged, a.addr).unwrap();
    }
    assert_eq!(
        wait_metric(
            admin,
            "spotable_anchor_drops_total",
            &[("reason", "untrusted")],
            |v| v == 5.0
        ),
        5.0
    );
    // Nothing trusted at all: everything is dropped, and the anchor says why at start.
    let admin = free_port();
    let none = anchor(g.addr, admin, &[]);
    s.send_to(&forged, none.addr).unwrap();
    wait_metric(
        admin,
        "spotable_anchor_drops_total",
        &[("reason", "untrusted")],
        |v| v == 1.0,
    );
    // A trusted source without a header is not a player.
    let admin = free_port();
    let trusting = anchor(g.addr, admin, &["--trust", "127.0.0.0/8"]);
    s.send_to(b"no header here", trusting.addr).unwrap();
    assert_eq!(
        wait_metric(
            admin,
            "spotable_anchor_drops_total",
            &[("reason", "no_signature")],
            |v| v == 1.0
        ),
        1.0
    );
    assert_eq!(metric(admin, "spotable_anchor_players", &[]), 0.0);
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn a_flood_of_player_addresses_stays_within_the_table_limit_and_expires() {
    let g = game();
    let admin = free_port();
    let a = anchor(
        g.addr,
        admin,
        &[
            "--trust",
            "127.0.0.0/8",
            "--max-players",
            "50",
            "--idle-timeout",
            // Longer than the flood takes, so no player leaves before the table is full.
            "8s",
        ],
    );
    let before = open_fds(a.process.pid());
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    // In rounds of 50, each read before the next is sent (the kernel drops what overflows a
    // socket buffer, and this test is about the table, not the buffer).
    let handled = || {
        metric(
            admin,
            "spotable_anchor_datagrams_total",
            &[("direction", "to_game")],
        ) + metric(
            admin,
            "spotable_anchor_drops_total",
            &[("reason", "table_full")],
        )
    };
    for round in 0..10u32 {
        for i in round * 50..(round + 1) * 50 {
            let player = SocketAddr::from(([198, 51, (i >> 8) as u8, i as u8], 4000));
            let mut d = header(player);
            d.extend_from_slice(b"hello");
            s.send_to(&d, a.addr).unwrap();
        }
        let want = f64::from((round + 1) * 50);
        let deadline = Instant::now() + Duration::from_secs(10);
        while handled() < want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let full = wait_metric(
        admin,
        "spotable_anchor_drops_total",
        &[("reason", "table_full")],
        |v| v == 450.0,
    );
    assert_eq!(full, 450.0, "every player beyond the limit is refused");
    assert_eq!(metric(admin, "spotable_anchor_players", &[]), 50.0);
    let during = open_fds(a.process.pid());
    assert!(
        during <= before + 50 + 2,
        "{during} descriptors for 50 players (from {before})"
    );
    // Idle players are forgotten, and their sockets closed.
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(admin, "spotable_anchor_players", &[]) > 0.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(metric(admin, "spotable_anchor_players", &[]), 0.0);
    assert_eq!(
        metric(admin, "spotable_anchor_players_expired_total", &[]),
        50.0
    );
    assert!(open_fds(a.process.pid()) <= before + 2);
}

/// The soft and hard open-file limits of process `pid`.
fn fd_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let mut numbers = line
        .split_whitespace()
        .filter_map(|w| w.parse::<u64>().ok());
    (numbers.next().unwrap(), numbers.next().unwrap())
}

#[test]
fn under_a_low_open_file_limit_players_are_capped_and_the_admin_still_answers() {
    let g = game();
    let admin = free_port();
    let log = std::env::temp_dir().join(format!("spotable-anchor-fds-{}.log", admin.port()));
    // 100 descriptors, hard limit too: 64 are kept for the process, so 36 players fit, far
    // below --max-players. Without the cap, players would take the descriptors the admin
    // listener needs, and fail one by one as socket errors.
    let script = format!("ulimit -n 100 && exec \"$0\" \"$@\" 2>{}", log.display());
    let (game_addr, admin_addr) = (g.addr.to_string(), admin.to_string());
    let a = spawn_replica(
        std::path::Path::new("sh"),
        &[
            "-c",
            &script,
            wrapper(),
            "anchor",
            "--listen",
            "127.0.0.1:0",
            "--game",
            &game_addr,
            "--admin",
            &admin_addr,
            "--trust",
            "127.0.0.0/8",
            "--max-players",
            "1000",
        ],
    )
    .unwrap();
    assert_eq!(fd_limits(a.process.pid()), (100, 100));
    assert_eq!(
        wait_metric(admin, "spotable_anchor_player_limit", &[], |v| v == 36.0),
        36.0
    );
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let players: Vec<SocketAddr> = (0..60u8)
        .map(|i| SocketAddr::from(([198, 51, 100, i], 4000)))
        .collect();
    for &player in &players {
        let mut d = header(player);
        d.extend_from_slice(&1u64.to_be_bytes());
        s.send_to(&d, a.addr).unwrap();
    }
    let full = wait_metric(
        admin,
        "spotable_anchor_drops_total",
        &[("reason", "table_full")],
        |v| v >= 24.0,
    );
    assert_eq!(full, 24.0);
    assert_eq!(metric(admin, "spotable_anchor_players", &[]), 36.0);
    assert_eq!(
        metric(
            admin,
            "spotable_anchor_drops_total",
            &[("reason", "socket_error")]
        ),
        0.0
    );
    // A player who got in is still served.
    let mut d = header(players[0]);
    d.extend_from_slice(&2u64.to_be_bytes());
    let mut got = None;
    let deadline = Instant::now() + Duration::from_secs(5);
    while got.is_none() && Instant::now() < deadline {
        s.send_to(&d, a.addr).unwrap();
        got = answer(&s, Duration::from_millis(100)).map(|a| parse(&a));
    }
    assert!(got.is_some_and(|a| a.peers <= 36), "{got:?}");
    // Said once in the log, not per player.
    let text = std::fs::read_to_string(&log).unwrap();
    let lines = |needle: &str| text.lines().filter(|l| l.contains(needle)).count();
    assert_eq!(lines("does not fit the open-file limit"), 1, "{text}");
    assert_eq!(lines("player table full"), 1, "{text}");
    let _ = std::fs::remove_file(&log);
}

/// Reads one answer, waiting up to `within`.
fn answer(s: &UdpSocket, within: Duration) -> Option<Vec<u8>> {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 512];
    s.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
}

#[test]
fn in_run_mode_the_anchor_holds_the_port_and_the_game_gets_an_internal_one() {
    let dir = std::env::temp_dir().join(format!("spotable-anchor-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // One port in the range: the anchor's, known to the test.
    let port = 21_000 + u16::try_from(std::process::id() % 5000).unwrap();
    let admin = free_port();
    let replica = spotable_fixtures::replica::exe();
    let game_limit = dir.join("game-fd-limit");
    // The wrapper starts with a soft open-file limit of 256; the game must keep it.
    let child = std::process::Command::new("sh")
        .args(["-c", "ulimit -Sn 256 && exec \"$0\" \"$@\""])
        .arg(wrapper())
        .args(["--no-imds", "--port", "game/udp"])
        .args(["--port-range", &format!("{port}-{port}")])
        .args(["--lock-dir", dir.join("locks").to_str().unwrap()])
        .args(["--anchor", "game", "--anchor-trust", "127.0.0.0/8"])
        .args(["--admin", &admin.to_string()])
        .arg("--")
        .args(["sh", "-c"])
        .arg(format!(
            "ulimit -Sn > {} && exec \"$0\" \"$@\"",
            game_limit.display()
        ))
        .arg(&replica)
        .args(["--stateful", "--listen", "127.0.0.1:${SERVER_PORT}"])
        .env_remove("QUEUE_URL")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = spotable_fixtures::process::Guard::new(child);
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut d = header("192.0.2.7:4000".parse().unwrap());
    d.extend_from_slice(&7u64.to_be_bytes());
    // The anchor and the game start together: ask until the game answers.
    let deadline = Instant::now() + Duration::from_secs(10);
    let got = loop {
        let _ = s.send_to(&d, ("127.0.0.1", port));
        if let Some(a) = answer(&s, Duration::from_millis(100)) {
            break a;
        }
        assert!(Instant::now() < deadline, "no answer through the anchor");
    };
    // The game answered the anchor's peer for the player, on its internal port.
    let first = parse(&got);
    assert_eq!((first.seq, first.peers), (7, 1));
    assert_eq!(
        wait_metric(admin, "spotable_anchor_players", &[], |v| v == 1.0),
        1.0
    );
    let game_fd_limit = std::fs::read_to_string(&game_limit).unwrap();
    let wrapper_fd_limits = fd_limits(guard.pid());
    // SIGTERM stops the game and the anchor with it (a SIGKILL would orphan the game).
    guard.signal(15).unwrap();
    let status = guard.wait_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!(
        status.code(),
        Some(128 + 15),
        "the game died of the SIGTERM passed on"
    );
    let _ = std::fs::remove_dir_all(&dir);
    // Checked once the game is gone (a failed assertion before would orphan it). The anchor's
    // sockets count against the wrapper's limit, raised to the hard one once the game had
    // started with the limit it was given.
    assert_eq!(game_fd_limit.trim(), "256");
    let (soft, hard) = wrapper_fd_limits;
    assert_eq!(soft, hard);
}
