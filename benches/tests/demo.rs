//! The demo, as the process users run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_spotable-bench"))
}

/// Runs the demo with `args`; returns its output and a reader of its summary's numbers.
fn demo(args: &[&str]) -> (String, impl Fn(&str) -> u64) {
    let out = Command::new(exe()).arg("demo").args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = stdout.clone();
    let field = move |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from:\n{text}"))
    };
    (stdout, field)
}

#[test]
fn demo_reports_no_loss_and_no_duplicate_across_a_replica_kill() {
    let (stdout, field) = demo(&["--duration", "3s", "--kill-at", "1500ms", "--rate", "300"]);
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
fn demo_draws_its_timeline_and_reports_it_as_json() {
    let dir = std::env::temp_dir().join(format!("spotable-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("timeline.svg");
    let out = Command::new(exe())
        .args([
            "demo",
            "--duration",
            "2s",
            "--kill-at",
            "1s",
            "--rate",
            "300",
            "--json",
        ])
        .arg("--plot")
        .arg(&svg)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("SIGKILL replica 2"),
        "the text goes to stderr: {stderr}"
    );
    let r: spotable_bench::demo::DemoReport = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (r.sent, r.received, r.lost, r.duplicates_delivered),
        (600, 600, 0, 0)
    );
    let t = &r.timeline;
    assert_eq!(t.replicas.len(), 3);
    assert_eq!(t.bucket_ms, 10.0);
    assert_eq!(t.player.iter().sum::<u32>(), 600);
    let after = (t.kill_ms / t.bucket_ms) as usize + 2;
    for (i, rep) in t.replicas.iter().enumerate() {
        let late: u32 = rep.answers[after..].iter().sum();
        if i == t.killed {
            assert_eq!(late, 0, "the killed replica answers nothing after the kill");
            assert!(rep.answers[..after].iter().sum::<u32>() >= 250);
        } else {
            assert_eq!(
                rep.answers.iter().sum::<u32>(),
                600,
                "a live replica answers all"
            );
        }
    }
    // Every answer was first from exactly one replica, and the proxy delivered every one.
    let firsts: u32 = t.replicas.iter().flat_map(|r| r.first.iter()).sum();
    assert_eq!(firsts, 600);
    let delivered: u64 = t.replicas.iter().map(|r| r.proxy_first_answers).sum();
    assert_eq!(delivered, 600);
    let drawn = std::fs::read_to_string(&svg).unwrap();
    assert!(drawn.starts_with("<svg") || drawn.contains("<svg"));
    assert!(drawn.contains("SIGKILL replica 2"), "the kill is marked");
    assert!(drawn.contains("copy delivered from replica 3"));
    let _ = std::fs::remove_dir_all(&dir);
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

#[test]
fn switch_demo_shows_one_peer_per_game_when_a_proxy_dies_under_the_player() {
    let (stdout, field) = demo(&[
        "--switch-proxy",
        "--duration",
        "3s",
        "--kill-at",
        "1500ms",
        "--rate",
        "300",
    ]);
    assert_eq!(field("sent"), 900);
    assert_eq!(field("peers each game saw"), 1);
    assert_eq!(field("game state resets"), 0);
    assert_eq!(field("duplicates delivered"), 0);
    // Only what was in flight to A at the kill may be lost.
    assert!(field("lost (in flight to A)") <= 5, "{stdout}");
    assert!(stdout.contains("SIGKILL proxy A"), "{stdout}");
}

#[test]
fn demo_with_the_tick_server_gives_every_player_one_world_through_a_kill() {
    let out = Command::new(exe())
        .args([
            "demo",
            "--game",
            "tick",
            "--duration",
            "4s",
            "--kill-at",
            "2s",
            "--json",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let players = r["players"].as_array().unwrap();
    assert_eq!(players.len(), 4);
    for p in players {
        assert_eq!(p["steps_back_before"], 0, "{p}");
        assert!(p["per_tick_before"].as_f64().unwrap() <= 1.02, "{p}");
        assert!(p["per_tick_after"].as_f64().unwrap() >= 0.9, "{p}");
    }
    assert!(players.iter().any(|p| p["server_killed"] == true));
    assert_eq!(r["divergent"], true);
    assert_eq!(r["sessions_demoted"], 4);
}

/// `demo --migrate --json` with `extra` args; `None` where moving cannot run here.
fn migrate_demo(extra: &[&str]) -> Option<serde_json::Value> {
    spotable_fixtures::criu::require("demo --migrate")?;
    let mut args = vec![
        "demo",
        "--migrate",
        "--json",
        "--duration",
        "4s",
        "--kill-at",
        "1500ms",
    ];
    args.extend_from_slice(extra);
    let out = Command::new(exe()).args(&args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("N notice, M moved, X node A lost"),
        "no timeline: {stderr}"
    );
    Some(serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}")))
}

fn check_moved(r: &serde_json::Value) {
    assert_eq!(r["moved"], true, "{r:#}");
    assert_eq!(r["lost"], 0, "{r:#}");
    assert_eq!(r["duplicates"], 0, "{r:#}");
    assert_eq!(r["players_disconnected"], 0, "{r:#}");
    let pause = r["pause_ms"].as_f64().unwrap();
    assert!(pause > 0.0 && pause < 1000.0, "{r:#}");
    let at = |k: &str| r["events"][k].as_f64().unwrap();
    assert!(
        at("notice") < at("moved") && at("moved") <= at("node_lost"),
        "{r:#}"
    );
}

#[test]
fn demo_migrate_moves_the_tick_server_and_nobody_notices() {
    if let Some(r) = migrate_demo(&[]) {
        check_moved(&r);
    }
}

#[test]
fn demo_migrate_moves_a_game_that_only_answers_with_its_players_replayed_from_a_capture() {
    // Two players' inputs, 33 ms apart for 4 s, as tcpdump would have recorded them.
    let server: std::net::SocketAddr = "10.0.0.1:7777".parse().unwrap();
    let inputs: Vec<[u8; 8]> = (1..=120u64).map(u64::to_be_bytes).collect();
    let mut datagrams = Vec::new();
    for p in 0..2u16 {
        let player = std::net::SocketAddr::from(([10, 0, 0, 2], 40_000 + p));
        for (i, input) in inputs.iter().enumerate() {
            let at = std::time::Duration::from_secs(1_700_000_000)
                + std::time::Duration::from_millis(33 * i as u64 + 5 * u64::from(p));
            datagrams.push((at, player, server, &input[..]));
        }
    }
    datagrams.sort_by_key(|d| d.0);
    let dir = std::env::temp_dir().join(format!("spotable-demo-migrate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let capture = dir.join("players.pcap");
    std::fs::write(&capture, spotable_pcap::write(&datagrams)).unwrap();
    // A game that never speaks first: it answers each datagram (the echo replica).
    let echo = spotable_fixtures::replica::exe().display().to_string();
    let r = migrate_demo(&[
        "--capture",
        capture.to_str().unwrap(),
        "--",
        &echo,
        "--listen",
        "0.0.0.0:{port}",
    ]);
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(r) = r {
        check_moved(&r);
    }
}
