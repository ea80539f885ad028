//! Real game servers through the real proxy: an authoritative tick server whose replicas
//! never agree, deterministic replicas that do (under jitter and lag), and one-datagram
//! queries with a replica dead or frozen.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use spotable_fixtures::process::{ProxyProcess, ReplicaProcess, spawn_replica};
use spotable_fixtures::tick::{self, PlayerLog};
use spotable_fixtures::wire;

const HZ: u32 = 30;

/// The tick games run one at a time: on a small CI machine two of them at once, beside the
/// other tests, can stall a server for longer than the failover window.
static ONE_GAME_AT_A_TIME: Mutex<()> = Mutex::new(());
const PLAYERS: usize = 4;
const MS: Duration = Duration::from_millis(1);

/// Two tick servers started `apart` (as two pods are), and a proxy with `extra` flags.
struct TickGame {
    servers: Vec<(ReplicaProcess, Instant)>,
    proxy: ProxyProcess,
    _turn: std::sync::MutexGuard<'static, ()>,
}

fn tick_game(apart: Duration, extra: &[&str]) -> TickGame {
    let turn = ONE_GAME_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let hz = HZ.to_string();
    let mut servers = Vec::new();
    for i in 0..2 {
        if i > 0 {
            std::thread::sleep(apart);
        }
        let p = spawn_replica(&tick::exe(), &["--hz", &hz]).expect("tick server starts");
        servers.push((p, Instant::now()));
    }
    let addrs: Vec<SocketAddr> = servers.iter().map(|(p, _)| p.addr).collect();
    let proxy = start_proxy(&addrs, extra);
    TickGame {
        servers,
        proxy,
        _turn: turn,
    }
}

impl TickGame {
    /// Which server a snapshot of `tick` received at `at` came from.
    fn source(&self, tick: u32, at: Instant) -> usize {
        let started: Vec<Instant> = self.servers.iter().map(|s| s.1).collect();
        tick::source(&started, HZ, tick, at)
    }
}

/// Players through the proxy for `run`; `at_kill` runs `kill_after` in, with their logs so far.
fn play(
    g: &mut TickGame,
    run: Duration,
    kill_after: Duration,
    at_kill: impl FnOnce(&mut TickGame, &[Arc<Mutex<PlayerLog>>]),
) -> Vec<PlayerLog> {
    let until = Instant::now() + run;
    let target = g.proxy.addr;
    let logs: Vec<Arc<Mutex<PlayerLog>>> = (0..PLAYERS).map(|_| Arc::default()).collect();
    let threads: Vec<_> = logs
        .iter()
        .map(|log| {
            let log = log.clone();
            std::thread::spawn(move || {
                let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
                let every = Duration::from_secs(1) / HZ;
                tick::play_into(&socket, target, every, until, &log).unwrap();
            })
        })
        .collect();
    std::thread::sleep(kill_after);
    at_kill(g, &logs);
    for t in threads {
        t.join().unwrap();
    }
    logs.iter().map(|l| l.lock().unwrap().clone()).collect()
}

/// Kills the server that player 0 hears; returns which one and when.
fn kill_player_zeros_server(g: &mut TickGame, logs: &[Arc<Mutex<PlayerLog>>]) -> (usize, Instant) {
    let last = *logs[0]
        .lock()
        .unwrap()
        .snapshots
        .last()
        .expect("player 0 hears a server");
    let victim = g.source(last.tick, last.at);
    g.servers[victim].0.process.kill().unwrap();
    (victim, Instant::now())
}

#[test]
fn a_tick_server_in_the_default_mode_is_one_world_before_a_kill_and_after() {
    let mut g = tick_game(Duration::from_millis(800), &[]);
    let start = Instant::now();
    let mut killed = None;
    let logs = play(
        &mut g,
        Duration::from_secs(6),
        Duration::from_secs(3),
        |g, logs| {
            killed = Some(kill_player_zeros_server(g, logs));
        },
    );
    let (victim, kill) = killed.unwrap();
    let mut failed_over = 0;
    for (i, log) in logs.iter().enumerate() {
        // Settled in (the first snapshots take a tick to come) until the kill.
        let before = tick::stream(log, HZ, start + Duration::from_millis(500), kill);
        assert_eq!(
            before.steps_back, 0,
            "player {i}: a second world before the kill"
        );
        assert!(
            before.per_tick <= 1.02 && before.per_tick >= 0.95,
            "player {i}: {:.3} snapshots per tick before the kill",
            before.per_tick
        );
        let heard = log.snapshots.iter().rfind(|s| s.at < kill).unwrap();
        if g.source(heard.tick, heard.at) == victim {
            failed_over += 1;
            let end = log.snapshots.last().unwrap().at + Duration::from_millis(1);
            let after = tick::stream(log, HZ, kill, end);
            assert!(
                after.per_tick >= 0.9,
                "player {i}: {:.3} snapshots per tick after the kill (gap {:?})",
                after.per_tick,
                after.longest_gap
            );
        }
    }
    assert!(failed_over >= 1, "the kill hit player 0's server");
    // The proxy saw two worlds, and says so.
    let demoted = wait_metric(&g.proxy, "spotable_sessions_demoted_total", &[], |v| {
        v >= PLAYERS as f64
    });
    assert_eq!(demoted, PLAYERS as f64, "each session demoted once");
    assert_eq!(metric(&g.proxy, "spotable_game_divergent", &[]), 1.0);
    assert_eq!(
        metric(&g.proxy, "spotable_sessions_promoted_total", &[]),
        0.0
    );
    assert!(
        g.proxy
            .log
            .lines()
            .iter()
            .filter(|l| l.contains("answer in two worlds"))
            .count()
            == 1,
        "one log line for the game"
    );
}

#[test]
fn a_tick_server_with_sequence_on_the_tick_takes_the_survivors_numbering_at_once() {
    let seq = [
        "--dedupe",
        "sequence",
        "--sequence-offset",
        "0",
        "--sequence-width",
        "4",
    ];
    let mut g = tick_game(Duration::from_millis(800), &seq);
    let mut killed = None;
    let logs = play(
        &mut g,
        Duration::from_secs(6),
        Duration::from_secs(3),
        |g, logs| {
            killed = Some(kill_player_zeros_server(g, logs));
        },
    );
    let (victim, kill) = killed.unwrap();
    // The numbering delivered is the server's ahead (started first); it was killed.
    assert_eq!(victim, 0, "player 0 heard the server ahead");
    for (i, log) in logs.iter().enumerate() {
        let end = log.snapshots.last().unwrap().at + Duration::from_millis(1);
        let after = tick::stream(log, HZ, kill, end);
        assert!(
            after.per_tick >= 0.95,
            "player {i}: {:.3} snapshots per tick after the kill (gap {:?})",
            after.per_tick,
            after.longest_gap
        );
    }
}

#[test]
fn deterministic_replicas_under_jitter_and_lag_are_never_demoted_and_lose_nothing() {
    let mut s = setup(
        &[
            &["--delay", "2ms", "--jitter", "1500us"],
            &["--delay", "300ms", "--jitter", "1500us"],
        ],
        &[],
    );
    let c = client(&s.proxy);
    let rx = Collector::start(&c);
    // 5 ms apart: the lagging replica is 60 answers behind. The fast one dies half-way.
    stream(&c, 400, 5 * MS, |seq| {
        if seq == 200 {
            s.replicas[0].process.kill().unwrap();
        }
    });
    assert_each(&rx.finish(400), 400, 1);
    assert_eq!(
        metric(&s.proxy, "spotable_sessions_demoted_total", &[]),
        0.0
    );
    assert_eq!(metric(&s.proxy, "spotable_game_divergent", &[]), 0.0);
    assert_eq!(
        metric(&s.proxy, "spotable_sessions_promoted_total", &[]),
        1.0
    );
}

/// One query per session from `queries` new players; how many got their one answer.
fn queries(proxy: &ProxyProcess, queries: u64) -> u64 {
    let mut answered = 0;
    let mut buf = [0u8; 128];
    let mut payload = Vec::new();
    for n in 0..queries {
        let c = client(proxy);
        c.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        wire::stamp(&mut payload, n, 16);
        c.send(&payload).unwrap();
        if let Ok(len) = c.recv(&mut buf) {
            assert_eq!(wire::seq_of(&buf[..len]), Some(n));
            answered += 1;
        }
    }
    answered
}

#[test]
fn one_query_per_session_with_a_replica_dead_or_frozen_is_always_answered() {
    let sequence = [
        "--dedupe",
        "sequence",
        "--sequence-offset",
        "0",
        "--sequence-width",
        "8",
    ];
    let modes: [&[&str]; 3] = [&[], &["--dedupe", "primary"], &sequence];
    for mode in modes {
        for freeze in [false, true] {
            let mut s = setup(&[&[], &[]], mode);
            assert_eq!(queries(&s.proxy, 4), 4, "{mode:?}: both replicas up");
            let victim = s.replicas[0].addr.to_string();
            if freeze {
                s.replicas[0].process.signal(libc::SIGSTOP).unwrap();
            } else {
                s.replicas[0].process.kill().unwrap();
            }
            assert_eq!(
                queries(&s.proxy, 40),
                40,
                "{mode:?}, replica {}",
                if freeze { "frozen" } else { "dead" }
            );
            // The silent replica is shown as such, and passed over for new sessions: a frozen
            // one as unresponsive; a dead one as unreachable while the kernel's reports are
            // fresh (ICMP port unreachable), unresponsive after.
            let state = [("replica", victim.as_str()), ("state", "unresponsive")];
            let dead = [("replica", victim.as_str()), ("state", "unreachable")];
            let shown = eventually(Duration::from_secs(10), || {
                let on = |labels: &[(&str, &str)]| {
                    metric(&s.proxy, "spotable_replica_state", labels) == 1.0
                };
                on(&state) || (!freeze && on(&dead))
            });
            assert!(shown, "{mode:?}: the replica is not shown silent");
            if freeze {
                s.replicas[0].process.signal(libc::SIGCONT).unwrap();
                // Thawed, it answers the queries it held and is no longer passed over.
                assert_eq!(queries(&s.proxy, 4), 4);
                assert_eq!(
                    wait_metric(&s.proxy, "spotable_replica_state", &state, |v| v == 0.0),
                    0.0,
                    "{mode:?}: thawed"
                );
            }
        }
    }
}
