//! `spotable-bench fit` as a studio runs it: on the deterministic replica, on a server
//! numbering its answers alike with other bytes unlike, on the tick server from a capture,
//! and on commands that do not start or answer nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_spotable-bench"))
}

/// Runs `fit --json` with `args`; returns its findings (it must succeed).
fn fit(args: &[&str], command: &[&str]) -> serde_json::Value {
    let out = Command::new(exe())
        .args(["fit", "--json", "--secs", "4"])
        .args(args)
        .arg("--")
        .args(command)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fit failed:\n{stderr}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"))
}

fn replica() -> String {
    spotable_fixtures::replica::exe().display().to_string()
}

#[test]
fn byte_identical_replicas_fit_copies_and_lose_nothing_in_it() {
    let r = fit(&[], &[&replica(), "--listen", "127.0.0.1:{port}"]);
    assert_eq!(r["recommended"], "copies", "{r:#}");
    assert_eq!(r["sequence"], serde_json::Value::Null);
    assert_eq!(r["evidence"]["identical"], true);
    let copies = &r["modes"]["copies"];
    assert_eq!(copies["lost"], 0, "{copies:#}");
    assert_eq!(copies["duplicates"], 0);
    assert_eq!(copies["second_world"], 0);
    assert_eq!(copies["sessions_demoted"], 0);
    assert!(copies["players_affected"].as_u64().unwrap() >= 1);
}

#[test]
fn replicas_numbering_alike_with_other_bytes_unlike_fit_sequence_on_that_number() {
    // Each replica echoes the player's 8-byte number and appends its own port: numbered
    // alike, unlike bytes.
    let r = fit(
        &["--players", "3"],
        &[
            &replica(),
            "--listen",
            "127.0.0.1:{port}",
            "--tag",
            "{port}",
        ],
    );
    assert_eq!(r["recommended"], "sequence", "{r:#}");
    assert_eq!(r["evidence"]["identical"], false);
    let field = &r["sequence"];
    assert_eq!(field["offset"], 0);
    assert_eq!(field["width"], 8);
    assert_eq!(field["endian"], "be");
    let sequence = &r["modes"]["sequence"];
    assert_eq!(sequence["duplicates"], 0, "{sequence:#}");
    assert_eq!(sequence["lost"], 0);
}

#[test]
fn the_tick_server_fits_primary_from_a_capture_of_its_players() {
    // Four players' inputs, 33 ms apart for 5 s, as tcpdump would have recorded them.
    let server: SocketAddr = "10.0.0.1:7777".parse().unwrap();
    let mut datagrams = Vec::new();
    let inputs: Vec<[u8; 8]> = (1..=150u64).map(u64::to_be_bytes).collect();
    for p in 0..4u16 {
        let player: SocketAddr = SocketAddr::from(([10, 0, 0, 2], 40_000 + p));
        for (i, input) in inputs.iter().enumerate() {
            let at = Duration::from_secs(1_700_000_000)
                + Duration::from_millis(33 * i as u64 + 7 * u64::from(p));
            datagrams.push((at, player, server, &input[..]));
            // The server's answers are in the capture too; only the players' are replayed.
            datagrams.push((at, server, player, b"snapshot".as_slice()));
        }
    }
    datagrams.sort_by_key(|d| d.0);
    let dir = std::env::temp_dir().join(format!("spotable-fit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let capture = dir.join("players.pcap");
    std::fs::write(&capture, spotable_pcap::write(&datagrams)).unwrap();
    let tick = spotable_fixtures::tick::exe().display().to_string();
    let r = fit(
        &["--capture", capture.to_str().unwrap()],
        &[&tick, "--listen", "127.0.0.1:{port}"],
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(r["recommended"], "primary", "{r:#}");
    assert_eq!(r["evidence"]["players"], 4);
    assert_eq!(r["evidence"]["identical"], false);
    // The tick counts up in each replica on its own clock, a second apart.
    let tick_field = &r["evidence"]["numberings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["field"]["offset"] == 0)
        .expect("the tick field")
        .clone();
    assert_eq!(tick_field["agree"], false);
    assert!(tick_field["apart_ms"].as_f64().unwrap() >= 900.0);
    // Primary keeps one world; so does copies, by demoting the sessions it saw diverge.
    for mode in ["primary", "copies"] {
        let m = &r["modes"][mode];
        assert_eq!(m["second_world"], 0, "{mode}: {m:#}");
        assert_eq!(m["duplicates"], 0, "{mode}");
        assert!(m["players_affected"].as_u64().unwrap() >= 1, "{mode}");
    }
    assert_eq!(r["modes"]["copies"]["sessions_demoted"], 4);
    assert!(r["advice"].as_str().unwrap().contains("failover costs"));
}

/// Processes whose command line holds `marker`.
fn running(marker: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .filter(|c| String::from_utf8_lossy(c).contains(marker))
        .count()
}

#[test]
fn a_command_that_does_not_start_or_answers_nothing_gets_a_clear_error_and_no_leftover() {
    let run = |command: &[&str]| {
        let out = Command::new(exe())
            .args(["fit", "--secs", "4", "--"])
            .args(command)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&["/nonexistent/game-server", "{port}"]);
    assert!(
        err.contains("cannot start /nonexistent/game-server"),
        "{err}"
    );
    let err = run(&["sh", "-c", "echo 'missing map file' >&2; exit 3"]);
    assert!(
        err.contains("exited") && err.contains("missing map file"),
        "{err}"
    );
    // Binds its port and never answers.
    let marker = format!("fit-silent-{}", std::process::id());
    let silent = format!(
        "import socket, sys, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('127.0.0.1', int(sys.argv[1])))\ntime.sleep(600)\n# {marker}"
    );
    let err = run(&["python3", "-c", &silent, "{port}"]);
    assert!(err.contains("no replica answered any player"), "{err}");
    assert_eq!(running(&marker), 0, "a replica outlived fit");
}
