//! `spotable-bench demo --migrate`: one copy of a game moved off a reclaimed node. Two
//! simulated nodes (network namespaces), the game under `spotable-wrapper --migrate` on A
//! behind the proxy (`primary`), a landing pad on B, the real agent on A. A spot notice from
//! the fake instance metadata; the agent evicts the game's pod (the demo plays the kubelet:
//! SIGTERM to the wrapper); the wrapper moves the game to the pad; node A is lost (every
//! process SIGKILLed, the namespace deleted) once the last page has left. What the players
//! saw, drawn as a timeline: the pause, nothing lost, nothing twice, nobody disconnected.

use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use serde::Serialize;

use spotable_fixtures::imds::FakeImds;
use spotable_fixtures::migration::{Stage, StageOptions};
use spotable_fixtures::process::{scrape, workspace_binary};
use spotable_fixtures::tick::{self, Snapshot};

use crate::demo::DemoArgs;
use crate::fit::players::{Script, capture_scripts};

/// The game's UDP port (fixed, as in a pod).
const PORT: u16 = 7777;
/// The tick server's rate, and the built-in players' input rate.
const HZ: u32 = 30;
/// Built-in players.
const PLAYERS: usize = 4;
/// Narrowest timeline cell, and most cells in a row.
const CELL: Duration = Duration::from_millis(50);
const COLUMNS: u128 = 100;

/// What `--json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateReport {
    /// Whether the game moved (and did not fall back to stopping).
    pub moved: bool,
    /// The longest time a player went without an answer after the notice, ms.
    pub pause_ms: f64,
    /// For the tick server, server ticks no player got; for any game, plus the datagrams
    /// the proxy had to drop.
    pub lost: u64,
    /// Answers a player got twice (the tick server's ticks repeated or stepping back; any
    /// other game's byte-identical answers).
    pub duplicates: u64,
    /// Players whose answers did not go on to the end.
    pub players_disconnected: u64,
    /// When things happened (UNIX seconds).
    pub events: Events,
}

/// When things happened, in UNIX seconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Events {
    /// The spot notice appeared in the instance metadata.
    pub notice: f64,
    /// The game's wrapper said it moved (or gave up).
    pub moved: f64,
    /// Node A was destroyed.
    pub node_lost: f64,
}

/// One player's answers: when, and their bytes.
type Answers = Arc<Mutex<Vec<(Instant, Vec<u8>)>>>;

fn epoch(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Runs the demo; fails when the game did not move.
pub fn run(args: &DemoArgs) -> anyhow::Result<MigrateReport> {
    let json = args.json;
    macro_rules! say {
        ($($t:tt)*) => {
            if json { eprintln!($($t)*) } else { println!($($t)*) }
        };
    }
    let criu = spotable_fixtures::criu::ready()
        .map_err(|why| anyhow::anyhow!("demo --migrate cannot run here: {why}"))?;
    let tick_game = args.command.is_empty();
    let game: Vec<String> = if tick_game {
        vec![
            tick::exe().display().to_string(),
            "--hz".into(),
            HZ.to_string(),
            "--listen".into(),
            "0.0.0.0:$SERVER_PORT".into(),
        ]
    } else {
        args.command
            .iter()
            .map(|a| a.replace("{port}", &PORT.to_string()))
            .collect()
    };
    let scripts: Option<Vec<Script>> = match &args.capture {
        Some(path) => Some(capture_scripts(path)?),
        None => None,
    };
    say!(
        "Spotable demo --migrate: one copy of {} on node A, a landing pad on node B, a spot \
         notice at {:?}.",
        if tick_game {
            "the tick server"
        } else {
            "your game"
        },
        args.kill_at
    );
    let mut stage = Stage::start(&StageOptions {
        wrapper: workspace_binary("spotable-wrapper", "spotable-wrapper"),
        proxy: workspace_binary("spotable-proxy", "spotable-proxy"),
        criu,
        game,
        port: PORT,
        ready_line: tick_game.then(|| format!("listening 0.0.0.0:{PORT}")),
        rival: false,
        anchor: false,
        inventory: false,
        echo: false,
    })
    .context("cannot set the stage")?;
    say!(
        "  node A {} (the game, {PORT}/udp), node B {} (the pad), proxy {}",
        stage.a.ip,
        stage.b.ip,
        stage.proxy.addr
    );
    let imds = stage.runtime.block_on(FakeImds::start())?;
    imds.set_identity("i-0demo", "eu-west-1", "ip-a.example", "203.0.113.10");
    let agent = workspace_binary("spotable-agent", "spotable-agent");
    let _agent = stage.agent(&agent, &imds.endpoint(), false)?;

    // The players.
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let n = scripts.as_ref().map_or(PLAYERS, Vec::len);
    let logs: Vec<Answers> = (0..n).map(|_| Answers::default()).collect();
    let threads: Vec<_> = logs
        .iter()
        .enumerate()
        .map(|(i, log)| {
            let (log, stop, target) = (log.clone(), stop.clone(), stage.proxy.addr);
            let script = scripts.as_ref().map(|s| s[i].clone());
            std::thread::spawn(move || play(target, script, start, &stop, &log))
        })
        .collect();
    let deadline = start + Duration::from_secs(10);
    while logs.iter().any(|l| lock(l).is_empty()) {
        if Instant::now() >= deadline {
            bail!("not every player got an answer from the game within 10 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    say!("  {n} players in the game\n");
    let notice_at = start + args.kill_at;
    std::thread::sleep(notice_at.saturating_duration_since(Instant::now()));

    // The notice, the eviction, the move, the node lost.
    let mut events = Events::default();
    let time = humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(120));
    imds.set(
        "meta-data/spot/instance-action",
        &format!(r#"{{"action": "terminate", "time": "{time}"}}"#),
    );
    events.notice = epoch(SystemTime::now());
    let notice = Instant::now();
    say!("{:>7.2} s  spot notice for node A", secs(start, notice));
    stage.kubelet(Duration::from_secs(15))?;
    let evicted = Instant::now();
    say!(
        "{:>7.2} s  the agent evicted the game's pod: SIGTERM to its wrapper",
        secs(start, evicted)
    );
    let status = stage.source.exit(Duration::from_secs(90))?;
    events.moved = epoch(SystemTime::now());
    let moved_at = Instant::now();
    let moved = stage.source.said("the game moved");
    match stage.source.find("the game moved") {
        Some(line) => say!(
            "{:>7.2} s  the game moved to node B ({})",
            secs(start, moved_at),
            fields(&line, &["pause_ms", "bytes", "last_page_ms"])
        ),
        None => say!(
            "{:>7.2} s  the game did NOT move ({status}): {}",
            secs(start, moved_at),
            stage
                .source
                .find("could not be moved")
                .unwrap_or_else(|| "no reason given".into())
        ),
    }
    if moved {
        stage
            .pad
            .wait_for_within("the game's memory is all here", Duration::from_secs(60))?;
    }
    stage.a.destroy();
    events.node_lost = epoch(SystemTime::now());
    let lost_at = Instant::now();
    say!(
        "{:>7.2} s  node A lost: every process SIGKILLed, its namespace deleted",
        secs(start, lost_at)
    );
    let end = (start + args.duration).max(lost_at + Duration::from_secs(2));
    std::thread::sleep(end.saturating_duration_since(Instant::now()));
    stop.store(true, Ordering::Release);
    for t in threads {
        let _ = t.join();
    }
    let admin = stage.proxy.admin.context("the proxy's admin address")?;
    let dropped = scrape(admin, "spotable_drops_total", &[]).unwrap_or(0.0) as u64;

    // What the players saw.
    let answers: Vec<Vec<(Instant, Vec<u8>)>> = logs.iter().map(|l| lock(l).clone()).collect();
    let mut report = MigrateReport {
        moved,
        pause_ms: 0.0,
        lost: dropped,
        duplicates: 0,
        players_disconnected: 0,
        events,
    };
    for (i, got) in answers.iter().enumerate() {
        // A player replayed from a capture stops when its capture ends: it is disconnected
        // only if it went unanswered for its last half second of playing.
        let stopped = scripts
            .as_ref()
            .and_then(|s| s[i].last())
            .map_or(end, |(at, _)| (start + *at).min(end));
        let after: Vec<Instant> = got
            .iter()
            .map(|(at, _)| *at)
            .filter(|at| *at >= notice)
            .collect();
        let mut prev = notice;
        for at in &after {
            report.pause_ms = report
                .pause_ms
                .max(at.duration_since(prev).as_secs_f64() * 1e3);
            prev = *at;
        }
        if stopped.saturating_duration_since(prev) > Duration::from_millis(500) {
            report.players_disconnected += 1;
        }
        if tick_game {
            let ticks: Vec<u32> = got
                .iter()
                .filter_map(|(at, d)| Snapshot::parse(d, *at))
                .map(|s| s.tick)
                .collect();
            for w in ticks.windows(2) {
                if w[1] <= w[0] {
                    report.duplicates += 1;
                } else {
                    report.lost += u64::from(w[1] - w[0] - 1);
                }
            }
        } else {
            let mut seen = HashSet::new();
            report.duplicates += got
                .iter()
                .filter(|(_, d)| !seen.insert(d.as_slice()))
                .count() as u64;
        }
    }
    say!(
        "\n{}",
        draw(
            &answers,
            start,
            end,
            &[(notice, 'N'), (moved_at, 'M'), (lost_at, 'X')]
        )
    );
    say!("  (the proxy dropped {dropped} datagrams)");
    say!(
        "moved: {}   longest pause: {:.0} ms   lost: {}   duplicates: {}   players disconnected: {}",
        report.moved,
        report.pause_ms,
        report.lost,
        report.duplicates,
        report.players_disconnected
    );
    if json {
        println!("{}", serde_json::to_string(&report)?);
    }
    if !report.moved {
        bail!("the game did not move: it was stopped instead");
    }
    Ok(report)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn secs(start: Instant, at: Instant) -> f64 {
    at.duration_since(start).as_secs_f64()
}

/// `key=value` of the given keys in a log line.
fn fields(line: &str, keys: &[&str]) -> String {
    line.split_whitespace()
        .filter(|w| keys.iter().any(|k| w.starts_with(&format!("{k}="))))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One player until `stop`: the capture's datagrams with their timing, or a numbered input
/// every tick; every answer recorded.
fn play(
    target: SocketAddr,
    script: Option<Script>,
    start: Instant,
    stop: &AtomicBool,
    log: &Mutex<Vec<(Instant, Vec<u8>)>>,
) {
    let Ok(socket) = UdpSocket::bind("127.0.0.1:0") else {
        return;
    };
    let every = Duration::from_secs(1) / HZ;
    let mut next = 0usize;
    let mut input = 0u64;
    let mut due = start;
    let mut buf = [0u8; 65_536];
    while !stop.load(Ordering::Acquire) {
        let now = Instant::now();
        match &script {
            Some(s) => {
                while let Some((at, payload)) = s.get(next)
                    && start + *at <= now
                {
                    let _ = socket.send_to(payload, target);
                    next += 1;
                }
                due = s.get(next).map_or(now + every, |(at, _)| start + *at);
            }
            None if now >= due => {
                input += 1;
                let _ = socket.send_to(&input.to_be_bytes(), target);
                due += every;
            }
            None => {}
        }
        let wait = due
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_micros(200), Duration::from_millis(20));
        let _ = socket.set_read_timeout(Some(wait));
        if let Ok((n, _)) = socket.recv_from(&mut buf) {
            lock(log).push((Instant::now(), buf[..n].to_vec()));
        }
    }
}

/// Each player's answers per cell (`█` some, `·` none), the events marked above.
fn draw(
    answers: &[Vec<(Instant, Vec<u8>)>],
    start: Instant,
    end: Instant,
    marks: &[(Instant, char)],
) -> String {
    let span = end.duration_since(start).as_millis();
    let cell = CELL.as_millis().max(span.div_ceil(COLUMNS)).max(1);
    let cells = span.div_ceil(cell).max(1) as usize;
    let cell_of = |at: Instant| (at.saturating_duration_since(start).as_millis() / cell) as usize;
    let mut out = String::new();
    let mut top = vec![' '; cells];
    for (at, c) in marks {
        // Events in one cell go side by side.
        let mut i = cell_of(*at).min(cells - 1);
        while top[i] != ' ' && i + 1 < cells {
            i += 1;
        }
        top[i] = *c;
    }
    out.push_str(&format!("          {}\n", top.iter().collect::<String>()));
    for (i, got) in answers.iter().enumerate() {
        let mut row = vec!['·'; cells];
        for (at, _) in got {
            if let Some(slot) = row.get_mut(cell_of(*at)) {
                *slot = '█';
            }
        }
        out.push_str(&format!(
            "player {:>2} {}\n",
            i + 1,
            row.iter().collect::<String>()
        ));
    }
    out.push_str(&format!(
        "          one cell = {cell} ms;  N notice, M moved, X node A lost"
    ));
    out
}
