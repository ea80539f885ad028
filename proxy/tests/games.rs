//! Many games behind one address: two games of two replica processes each behind one
//! listener, routed by a token at the end of every datagram.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::UdpSocket;
use std::time::Duration;

use common::*;
use spotable_fixtures::process::ReplicaProcess;

const MS: Duration = Duration::from_millis(1);
const SECOND: Duration = Duration::from_secs(1);
const TOKEN_A: &[u8] = b"arena-01";
const TOKEN_B: &[u8] = b"arena-02";

struct Games {
    a: Vec<ReplicaProcess>,
    b: Vec<ReplicaProcess>,
    proxy: spotable_fixtures::process::ProxyProcess,
    _dir: TempConfig,
}

/// Replicas of game A answer with `/A` appended, game B's with `/B`: every answer says
/// which game served it, and the copies of one game answer alike.
fn start() -> Games {
    let a: Vec<_> = (0..2).map(|_| replica(&["--tag", "/A"])).collect();
    let b: Vec<_> = (0..2).map(|_| replica(&["--tag", "/B"])).collect();
    let dir = TempConfig::write(
        "games",
        a[0].addr.port(),
        &format!(
            "[[game]]\nname = \"arena-1\"\ntokens = [\"arena-01\"]\nreplicas = [{}]\n\n\
             [[game]]\nname = \"arena-2\"\ntokens = [\"arena-02\"]\nreplicas = [{}]\n",
            toml_list(&a),
            toml_list(&b)
        ),
    );
    let config = dir.arg();
    // One lag histogram per game, as a fleet of many games would run it.
    let proxy = start_proxy(
        &[],
        &[
            "--token-bytes",
            "8",
            "--config",
            &config,
            "--lag-histogram",
            "game",
        ],
    );
    Games {
        a,
        b,
        proxy,
        _dir: dir,
    }
}

fn player(g: &Games) -> UdpSocket {
    client(&g.proxy)
}

#[test]
fn each_token_reaches_only_its_game_with_the_token_cut_off() {
    let g = start();
    let mut lag_before = Vec::new();
    for (token, tag, game) in [(TOKEN_A, b"/A", "arena-1"), (TOKEN_B, b"/B", "arena-2")] {
        let c = player(&g);
        // The session trusts the second copy once it has matched a run of answers…
        let rx = Collector::start(&c);
        stream_with_suffix(&c, 20, MS, token, |_| {});
        assert_each(&rx.finish(20), 20, 1);
        let promoted = ("game", game);
        wait_metric(
            &g.proxy,
            "spotable_sessions_promoted_total",
            &[promoted],
            |v| v >= 1.0,
        );
        let lag = [("game", game)];
        lag_before.push(metric(&g.proxy, "spotable_replica_lag_seconds_count", &lag));
        // …after which every second copy is suppressed behind the first.
        let rx = Collector::start(&c);
        stream_with_suffix(&c, 50, MS, token, |_| {});
        let got = rx.finish(50);
        assert_each(&got, 50, 1);
        for answer in &got {
            // The replica echoed the 48 stamped bytes without the token, then its tag.
            assert_eq!(answer.len(), 48 + 2, "{answer:?}");
            assert!(answer.ends_with(tag), "{answer:?} from the wrong game");
        }
    }
    // Each game's 50 second copies were suppressed: one lag histogram per game holds them.
    for (game, before) in ["arena-1", "arena-2"].into_iter().zip(lag_before) {
        let lag = wait_metric(
            &g.proxy,
            "spotable_replica_lag_seconds_count",
            &[("game", game)],
            |v| v >= before + 50.0,
        );
        assert_eq!(lag - before, 50.0, "{game}");
    }
    let text = metrics(&g.proxy);
    let lag_lines = text
        .lines()
        .filter(|l| l.starts_with("spotable_replica_lag"));
    assert!(lag_lines.clone().all(|l| !l.contains("replica=\"")));
    assert_eq!(lag_lines.count(), 2 * 18, "one histogram per game");
}

#[test]
fn one_replica_of_each_game_killed_costs_no_answer_and_no_duplicate() {
    let mut g = start();
    let (ca, cb) = (player(&g), player(&g));
    let (rxa, rxb) = (Collector::start(&ca), Collector::start(&cb));
    let mut kill_a = g.a.remove(0);
    let mut kill_b = g.b.remove(0);
    // Both games stream at once; half-way, one copy of each dies.
    std::thread::scope(|s| {
        s.spawn(|| {
            stream_with_suffix(&ca, 400, 2 * MS, TOKEN_A, |seq| {
                if seq == 200 {
                    kill_a.process.kill().unwrap();
                }
            })
        });
        s.spawn(|| {
            stream_with_suffix(&cb, 400, 2 * MS, TOKEN_B, |seq| {
                if seq == 200 {
                    kill_b.process.kill().unwrap();
                }
            })
        });
    });
    let (got_a, got_b) = (rxa.finish(400), rxb.finish(400));
    assert_each(&got_a, 400, 1);
    assert_each(&got_b, 400, 1);
    assert!(got_a.iter().all(|a| a.ends_with(b"/A")));
    assert!(got_b.iter().all(|a| a.ends_with(b"/B")));
}

#[test]
fn unknown_and_missing_tokens_are_counted_and_never_fanned_out() {
    let g = start();
    let c = player(&g);
    for datagram in [&b"hello|zzzzzzzz"[..], b"short", b"arena-0"] {
        c.send(datagram).unwrap();
    }
    let dropped = wait_metric(
        &g.proxy,
        "spotable_drops_total",
        &[("reason", "unknown_token")],
        |v| v >= 3.0,
    );
    assert_eq!(dropped, 3.0);
    // Counted in the same flush as the drops: nothing went to a replica.
    assert_eq!(
        metric(&g.proxy, "spotable_upstream_packets_total", &[]),
        0.0
    );
    assert_eq!(metric(&g.proxy, "spotable_sessions_opened_total", &[]), 0.0);
    // The operator hears of it, once per interval rather than per datagram (one client, so
    // one worker).
    let warning = "without a known game token";
    assert!(eventually(5 * SECOND, || log_count(&g.proxy, warning) > 0));
    assert_eq!(log_count(&g.proxy, warning), 1);
    // A known token still works from the same player.
    let rx = Collector::start(&c);
    stream_with_suffix(&c, 5, MS, TOKEN_B, |_| {});
    let got = rx.finish(5);
    assert_each(&got, 5, 1);
}
