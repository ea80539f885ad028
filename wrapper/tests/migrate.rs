//! Moving the game off a reclaimed node, with real processes: nodes are network namespaces,
//! the game is the authoritative tick server behind the real proxy (`primary`, one copy),
//! the wrapper runs it with `--migrate` on node A, a landing pad waits on node B, the real
//! agent hears a spot notice from the fake instance metadata and evicts the game's pod (the
//! test plays the kubelet: SIGTERM to the wrapper), and node A is destroyed once the move is
//! done. Everything Kubernetes is the fake API; CRIU is built from the vendored source.
//!
//! These tests need root and CRIU: where they cannot run they skip with one line, and under
//! `CI=true` they fail instead.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::UdpSocket;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use spotable_fixtures::imds::FakeImds;
use spotable_fixtures::kube::FakeApi;
use spotable_fixtures::migration::{LEASES, SLICES, Stage, StageOptions, slice};
use spotable_fixtures::process::{scrape, scrape_until, workspace_binary};
use spotable_fixtures::tick::{self, PlayerLog};

const HZ: u32 = 30;
const PLAYERS: usize = 4;
const PORT: u16 = 7777;

/// The tick game on node A (and a rival on C), `ballast_mib` resident, a pad on B.
fn stage(criu: &std::path::Path, ballast_mib: u32, rival: bool) -> Stage {
    stage_with(criu, ballast_mib, rival, false)
}

fn stage_with(criu: &std::path::Path, ballast_mib: u32, rival: bool, anchor: bool) -> Stage {
    // Behind the anchor the game listens on loopback; the anchor holds the game's port.
    let listen = if anchor { "127.0.0.1" } else { "0.0.0.0" };
    Stage::start(&StageOptions {
        wrapper: env!("CARGO_BIN_EXE_spotable-wrapper").into(),
        proxy: workspace_binary("spotable-proxy", "spotable-proxy"),
        criu: criu.to_path_buf(),
        game: vec![
            tick::exe().display().to_string(),
            "--hz".into(),
            HZ.to_string(),
            "--ballast-mib".into(),
            ballast_mib.to_string(),
            "--listen".into(),
            format!("{listen}:$SERVER_PORT"),
        ],
        port: PORT,
        ready_line: Some(if anchor {
            "listening 127.0.0.1:".into()
        } else {
            format!("listening 0.0.0.0:{PORT}")
        }),
        rival,
        anchor,
        inventory: true,
        echo: true,
    })
    .unwrap()
}

/// Players through the proxy until `until`, recording into shared logs.
fn players(
    scene: &Stage,
    until: Instant,
) -> (Vec<Arc<Mutex<PlayerLog>>>, Vec<std::thread::JoinHandle<()>>) {
    let target = scene.proxy.addr;
    let logs: Vec<Arc<Mutex<PlayerLog>>> = (0..PLAYERS).map(|_| Arc::default()).collect();
    let threads = logs
        .iter()
        .map(|log| {
            let log = log.clone();
            std::thread::spawn(move || {
                let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
                tick::play_into(&socket, target, Duration::from_secs(1) / HZ, until, &log).unwrap();
            })
        })
        .collect();
    (logs, threads)
}

/// What a player saw: its snapshots before the move and after it.
fn check_player(i: usize, log: &PlayerLog, moved_at: Instant, end: Instant, max_gap: Duration) {
    let s = &log.snapshots;
    assert!(!s.is_empty(), "player {i} heard nothing");
    let first = s[0].at;
    // No player disconnected: snapshots go on to the end.
    let last = s.last().unwrap();
    assert!(
        end.saturating_duration_since(last.at) < Duration::from_millis(300),
        "player {i}: nothing after {:?} before the end",
        end.saturating_duration_since(last.at)
    );
    let stream = tick::stream(log, HZ, first, end);
    assert!(
        stream.longest_gap <= max_gap,
        "player {i}: a gap of {:?}",
        stream.longest_gap
    );
    // One game, carried on: the tick never steps back or repeats, and the game still counts
    // four players (a player it forgot would come back as a fifth).
    assert_eq!(stream.steps_back, 0, "player {i}: the tick stepped back");
    assert!(
        s.windows(2).all(|w| w[1].tick > w[0].tick),
        "player {i}: a tick twice"
    );
    let before = s.iter().rfind(|x| x.at < moved_at).unwrap();
    let after = s
        .iter()
        .find(|x| x.at > moved_at + Duration::from_millis(300))
        .unwrap();
    // The game's clocks (its own time namespace) go on from where the dump stopped them: it
    // lives through the pause as if none had passed, so it runs behind by the pause at most.
    let elapsed_ticks = after.at.duration_since(before.at).as_secs_f64() * f64::from(HZ);
    let paused_ticks = max_gap.as_secs_f64() * f64::from(HZ);
    let ticks = f64::from(after.tick - before.tick);
    assert!(
        ticks <= elapsed_ticks + 2.0 && ticks >= elapsed_ticks - paused_ticks - 2.0,
        "player {i}: tick {} then {} over {elapsed_ticks:.1} ticks of time",
        before.tick,
        after.tick
    );
    assert!(
        after.last_input > before.last_input,
        "player {i}: its inputs were forgotten"
    );
}

#[test]
fn a_spot_notice_moves_the_game_to_a_pad_and_no_player_notices() {
    let Some(criu) = spotable_fixtures::criu::require("migration tests") else {
        return;
    };
    moves_and_carries_on(&criu, 0, false, Duration::from_millis(250));
}

#[test]
fn a_game_behind_the_anchor_sees_the_same_peer_for_each_player_after_the_move() {
    let Some(criu) = spotable_fixtures::criu::require("migration tests") else {
        return;
    };
    // The game counts players by peer: a player whose peer changed would be a fifth.
    moves_and_carries_on(&criu, 0, true, Duration::from_millis(250));
}

#[test]
fn a_game_with_200_mb_resident_moves_within_300_ms() {
    let Some(criu) = spotable_fixtures::criu::require("migration tests") else {
        return;
    };
    moves_and_carries_on(&criu, 200, false, Duration::from_millis(300));
}

fn moves_and_carries_on(criu: &std::path::Path, ballast_mib: u32, anchor: bool, max_gap: Duration) {
    let mut scene = stage_with(criu, ballast_mib, false, anchor);
    let imds = scene.runtime.block_on(FakeImds::start()).unwrap();
    imds.set_identity("i-0aaa", "eu-west-1", "ip-a.example", "1.2.3.4");
    let agent = workspace_binary("spotable-agent", "spotable-agent");
    let _agent = scene.agent(&agent, &imds.endpoint(), true).unwrap();
    let start = Instant::now();
    let end = start + Duration::from_secs(7);
    let (logs, threads) = players(&scene, end);
    // Every player is in the game before the notice.
    let deadline = start + Duration::from_secs(5);
    while logs.iter().any(|l| l.lock().unwrap().snapshots.len() < 20) {
        assert!(
            Instant::now() < deadline,
            "the players never got into the game"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let time =
        humantime::format_rfc3339_seconds(std::time::SystemTime::now() + Duration::from_secs(120));
    imds.set(
        "meta-data/spot/instance-action",
        &format!(r#"{{"action": "terminate", "time": "{time}"}}"#),
    );
    scene.kubelet(Duration::from_secs(10)).unwrap();
    let moved_at = Instant::now();
    let status = scene.source.exit(Duration::from_secs(20)).unwrap();
    assert!(status.success(), "the source wrapper: {status}");
    assert!(scene.source.said("the game moved"));
    scene.pad.wait_for("the game's memory is all here").unwrap();
    // The kubelet and the endpoint controller: the old pod's endpoint goes; node A is lost.
    scene.api.apply(SLICES, slice("tick-1", &[], PORT));
    scene.a.destroy();
    for t in threads {
        t.join().unwrap();
    }
    for (i, log) in logs.iter().enumerate() {
        check_player(i, &log.lock().unwrap(), moved_at, end, max_gap);
    }
    // The pad claimed by a Lease, published as the game's endpoint in the old one's place,
    // and the proxy followed: no session was opened again, no datagram lost a replica.
    assert!(scene.api.get(LEASES, "spotable-pad-pad-b").is_some());
    let moved = scene
        .api
        .get(SLICES, "tick-moved-pad-b")
        .expect("the move published");
    assert_eq!(
        moved["metadata"]["annotations"]["spotable.io/moved-from"],
        format!("{}:{PORT}", scene.a.ip)
    );
    let admin = scene.proxy.admin.unwrap();
    assert_eq!(
        scrape(admin, "spotable_sessions_opened_total", &[]).unwrap(),
        PLAYERS as f64
    );
    assert_eq!(
        scrape(admin, "spotable_replicas", &[("state", "ready")]).unwrap(),
        1.0
    );
    // The game still counts every player: none was forgotten and none came back as new.
    for (i, log) in logs.iter().enumerate() {
        let log = log.lock().unwrap();
        let raw = log.snapshots.last().unwrap();
        assert_eq!(
            raw.players, PLAYERS as u32,
            "player {i}: the game counts {}",
            raw.players
        );
    }
    assert!(scene.pad.said("a game landed"));
    if anchor {
        let line = scene
            .pad
            .find("its players carried over")
            .expect("the pad ran no anchor");
        assert!(line.contains(&format!("players={PLAYERS}")), "{line}");
    }
    // The inventory: the new server ready, then moved, naming the old pod and address.
    let messages = scene.inventory();
    let of = |pod: &str| -> Vec<&str> {
        messages
            .iter()
            .filter(|m| m["pod"]["name"] == pod)
            .map(|m| m["status"].as_str().unwrap())
            .collect()
    };
    assert_eq!(of("pad-b"), ["ready", "moved"], "{messages:#?}");
    let moved = messages.iter().find(|m| m["status"] == "moved").unwrap();
    assert_eq!(moved["moved_from"]["pod"]["name"], "game-a");
    assert_eq!(
        moved["moved_from"]["address"],
        format!("{}:{PORT}", scene.a.ip)
    );
}

#[test]
fn the_source_dying_mid_transfer_ends_the_restored_copy_and_frees_the_pad() {
    let Some(criu) = spotable_fixtures::criu::require("migration tests") else {
        return;
    };
    // 1 GB resident: its pages take seconds to follow, and the source dies meanwhile.
    let mut scene = stage(&criu, 1024, false);
    let start = Instant::now();
    let (logs, threads) = players(&scene, start + Duration::from_secs(12));
    let deadline = start + Duration::from_secs(5);
    while logs.iter().any(|l| l.lock().unwrap().snapshots.len() < 10) {
        assert!(
            Instant::now() < deadline,
            "the players never got into the game"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    scene
        .source
        .signal(nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    scene.pad.wait_for("a game landed").unwrap();
    assert!(
        !scene.pad.said("the game's memory is all here"),
        "the pages were all here before the source died: nothing was tested"
    );
    let restored: i32 = scene
        .b
        .pids()
        .into_iter()
        .find(|p| *p != scene.pad.pid())
        .expect("the restored game runs on node B");
    scene.a.destroy();
    let died = Instant::now();
    scene
        .pad
        .wait_for("the game's memory stopped arriving")
        .unwrap();
    scene
        .pad
        .wait_for("landing pad waiting for a game again")
        .unwrap();
    eprintln!("the pad gave up {:?} after the source died", died.elapsed());
    // Nothing left behind: the pad alone in node B, no images, no endpoint, no claim.
    assert!(!std::path::Path::new(&format!("/proc/{restored}")).exists());
    assert_eq!(scene.b.pids(), vec![scene.pad.pid()]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while scene.api.get(SLICES, "tick-moved-pad-b").is_some()
        || scene.api.get(LEASES, "spotable-pad-pad-b").is_some()
    {
        assert!(
            Instant::now() < deadline,
            "the pad still published or claimed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pad_dir = scene.dir.join(&scene.b.name);
    let left: Vec<_> = std::fs::read_dir(&pad_dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "images left behind: {left:?}");
    // The proxy has no replica to send to: the sessions end as they would today.
    let admin = scene.proxy.admin.unwrap();
    scrape_until(admin, "spotable_replicas", &[("state", "ready")], |v| {
        v == 0.0
    })
    .unwrap();
    // The inventory says what happened; the Events too.
    let messages = scene.inventory();
    let pad: Vec<&Value> = messages
        .iter()
        .filter(|m| m["pod"]["name"] == "pad-b")
        .collect();
    let statuses: Vec<&str> = pad.iter().map(|m| m["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["ready", "moved", "terminated"], "{messages:#?}");
    assert!(pad[2]["reason"].as_str().unwrap().contains("move failed"));
    assert!(scene.api.actions().iter().any(|a| a.verb == "CREATE"
        && a.path.contains("/events")
        && a.body["reason"] == "GameLost"));
    drop(threads);
}

#[test]
fn two_games_moving_at_once_race_for_one_pad_and_exactly_one_wins() {
    let Some(criu) = spotable_fixtures::criu::require("migration tests") else {
        return;
    };
    let mut scene = stage(&criu, 0, true);
    // No pad is an endpoint of the game until it holds one.
    let b = scene.b.ip.to_string();
    let endpoints = |api: &FakeApi| -> Vec<String> {
        ["tick-1", "tick-2", "tick-moved-pad-b"]
            .iter()
            .filter_map(|n| api.get(SLICES, n))
            .flat_map(|s| {
                s["endpoints"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|e| e["addresses"][0].as_str().map(String::from))
            })
            .collect()
    };
    assert!(!endpoints(&scene.api).contains(&b));
    // Both kubelets at once.
    let (_, rival) = scene.rival.as_mut().unwrap();
    rival.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    scene
        .source
        .signal(nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    let a_status = scene.source.exit(Duration::from_secs(30)).unwrap();
    let (_, rival) = scene.rival.as_mut().unwrap();
    let c_status = rival.exit(Duration::from_secs(30)).unwrap();
    let a_moved = scene.source.said("the game moved");
    let c_moved = rival.said("the game moved");
    assert!(
        a_moved ^ c_moved,
        "exactly one game moves (A: {a_moved}, C: {c_moved})"
    );
    let (winner, loser, loser_status, winner_status) = if a_moved {
        ("game-a", &*rival, c_status, a_status)
    } else {
        ("game-c", &scene.source, a_status, c_status)
    };
    assert!(winner_status.success(), "{winner_status}");
    // The other had no pad: it fell back to stopping its game, as without --migrate.
    assert!(loser.said("landing pad did not take the game"));
    assert!(
        loser.said("the game could not be moved; stopping it here"),
        "the loser did not fall back"
    );
    let _ = loser_status;
    // One claim, its holder the winner; the loser's creation refused by the API server.
    let lease = scene.api.get(LEASES, "spotable-pad-pad-b").unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], winner);
    let claims: Vec<String> = scene
        .api
        .actions()
        .iter()
        .filter(|a| a.path.ends_with("/leases/spotable-pad-pad-b"))
        .map(|a| a.verb.clone())
        .collect();
    assert_eq!(
        claims.iter().filter(|v| *v == "CREATE").count(),
        1,
        "{claims:?}"
    );
    // Now the pad is the winner's endpoint.
    scene.pad.wait_for("the game's memory is all here").unwrap();
    assert!(endpoints(&scene.api).contains(&b));
}
