//! What moving a game costs against its resident memory, for BENCHMARKS.md: the tick server
//! holding 10 MB, 200 MB or 1 GB moved from node A to node B (network namespaces) by CRIU,
//! with the flags the wrapper uses, in both ways CRIU can:
//!
//! - **plain**: the dump streams every page to a page server on B, then B restores; the
//!   game is frozen from the dump's start until it runs on B.
//! - **lazy** (what `--migrate` does): the dump writes the small images and serves memory
//!   from A; B restores at once and fetches pages as the game touches them, and the rest in
//!   the background. The pause ends when the game runs on B; the move ends when the last
//!   page has left A.
//!
//! Moving needs root and CRIU 4.2+ (built from `.ci/vendor` when missing); elsewhere the
//! section says why it was not measured.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use spotable_fixtures::node::Node;

/// Resident memory the game holds in each row, MiB (its ballast; the server adds ~2 MiB).
pub const SIZES_MIB: [u32; 3] = [10, 200, 1024];
const PORT: u16 = 7777;
const PAGES_PORT: u16 = 7101;

/// One way of moving one size, over the runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoveRow {
    /// `plain` or `lazy`.
    pub mode: String,
    /// The game's ballast, MiB.
    pub mib: u32,
    /// Frozen until running on B: each run, ms.
    pub pause_ms: Vec<f64>,
    /// Until the last page left A: each run, ms.
    pub last_page_ms: Vec<f64>,
}

/// What the section shows when moving could not be measured here.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MoveCost {
    /// The rows, when measured.
    pub rows: Vec<MoveRow>,
    /// Why not, when not.
    pub skipped: Option<String>,
}

/// Measures every size both ways, `runs` times each (interleaved).
pub fn measure(runs: usize) -> MoveCost {
    let criu = match spotable_fixtures::criu::ready() {
        Ok(c) => c,
        Err(why) => {
            return MoveCost {
                rows: Vec::new(),
                skipped: Some(why),
            };
        }
    };
    let tick = spotable_fixtures::tick::exe();
    let mut rows: Vec<MoveRow> = Vec::new();
    for _ in 0..runs {
        for &mib in &SIZES_MIB {
            for mode in ["plain", "lazy"] {
                let got = one(&criu, &tick, mib, mode == "lazy");
                let (pause, last) = match got {
                    Ok(x) => x,
                    Err(e) => {
                        return MoveCost {
                            rows,
                            skipped: Some(format!("{mode} move of {mib} MiB failed: {e:#}")),
                        };
                    }
                };
                let i = match rows.iter().position(|r| r.mib == mib && r.mode == mode) {
                    Some(i) => i,
                    None => {
                        rows.push(MoveRow {
                            mode: mode.into(),
                            mib,
                            pause_ms: Vec::new(),
                            last_page_ms: Vec::new(),
                        });
                        rows.len() - 1
                    }
                };
                let row = &mut rows[i];
                row.pause_ms.push(ms(pause));
                row.last_page_ms.push(ms(last));
            }
        }
    }
    MoveCost {
        rows,
        skipped: None,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// A child killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn in_node(node: &Node, program: &Path) -> Command {
    let mut c = node.command(program);
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// Whether process `pid`'s network namespace has a socket on `port` in `table` (`udp`,
/// or `tcp` listening).
fn bound(pid: u32, table: &str, port: u16) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).is_ok_and(|t| {
        t.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local = f.get(1).and_then(|a| a.rsplit_once(':'));
            let listening = table != "tcp" || f.get(3) == Some(&"0A");
            listening && local.and_then(|(_, p)| u16::from_str_radix(p, 16).ok()) == Some(port)
        })
    })
}

fn wait(
    what: &str,
    within: Duration,
    mut ok: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while !ok()? {
        if Instant::now() >= deadline {
            bail!("{what}: not within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

fn run_ok(mut c: Command, what: &str, dir: &Path, log: &str) -> anyhow::Result<()> {
    let status = c.status().with_context(|| format!("cannot run {what}"))?;
    if !status.success() {
        let text = std::fs::read_to_string(dir.join(log)).unwrap_or_default();
        let errors: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("rror"))
            .take(3)
            .collect();
        bail!("{what} failed ({status}): {}", errors.join(" | "));
    }
    Ok(())
}

fn copy_images(from: &Path, to: &Path) -> anyhow::Result<()> {
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let name = e.file_name();
        if e.file_type()?.is_file() && !name.to_string_lossy().ends_with(".log") {
            std::fs::copy(e.path(), to.join(&name))?;
        }
    }
    Ok(())
}

/// One move: (pause, until the last page left A).
fn one(criu: &Path, tick: &Path, mib: u32, lazy: bool) -> anyhow::Result<(Duration, Duration)> {
    let (a, b) = (Node::create()?, Node::create()?);
    let work = std::env::temp_dir().join(format!("spotable-move-cost-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let (dir_a, dir_b): (PathBuf, PathBuf) = (work.join("a"), work.join("b"));
    std::fs::create_dir_all(&dir_a)?;
    std::fs::create_dir_all(&dir_b)?;
    let result = move_once(criu, tick, mib, lazy, &a, &b, &dir_a, &dir_b);
    let _ = std::fs::remove_dir_all(&work);
    result
}

#[allow(clippy::too_many_arguments)]
fn move_once(
    criu: &Path,
    tick: &Path,
    mib: u32,
    lazy: bool,
    a: &Node,
    b: &Node,
    dir_a: &Path,
    dir_b: &Path,
) -> anyhow::Result<(Duration, Duration)> {
    // The game as the wrapper runs it: PID 1 of its own PID and time namespaces.
    let mut game = in_node(a, Path::new("unshare"));
    game.args(["--pid", "--fork", "--time", "setsid", "--"])
        .arg(tick)
        .args([
            "--ballast-mib",
            &mib.to_string(),
            "--listen",
            &format!("0.0.0.0:{PORT}"),
        ]);
    let unshare = Killed(game.spawn().context("cannot start the game")?);
    let unshare_pid = unshare.0.id();
    wait("the game binds its port", Duration::from_secs(30), || {
        Ok(bound(unshare_pid, "udp", PORT))
    })?;
    let pid: i32 =
        std::fs::read_to_string(format!("/proc/{unshare_pid}/task/{unshare_pid}/children"))?
            .split_whitespace()
            .next()
            .context("unshare has no child")?
            .parse()?;
    let criu_in = |node: &Node| {
        let mut c = in_node(node, criu);
        c.args(["-v4"]);
        c
    };
    let start = Instant::now();
    if !lazy {
        let mut server = criu_in(b);
        server
            .args(["page-server", "-D"])
            .arg(dir_b)
            .args([
                "--address",
                &b.ip.to_string(),
                "--port",
                &PAGES_PORT.to_string(),
            ])
            .args(["-o", "page-server.log"]);
        let server = Killed(server.spawn()?);
        let server_pid = server.0.id();
        wait("the page server listens", Duration::from_secs(10), || {
            Ok(bound(server_pid, "tcp", PAGES_PORT))
        })?;
        let start = Instant::now();
        let mut dump = criu_in(a);
        dump.args(["dump", "-t", &pid.to_string(), "-D"])
            .arg(dir_a)
            .args(["--page-server", "--address", &b.ip.to_string()])
            .args(["--port", &PAGES_PORT.to_string(), "-o", "dump.log"]);
        run_ok(dump, "criu dump", dir_a, "dump.log")?;
        copy_images(dir_a, dir_b)?;
        let mut restore = criu_in(b);
        restore
            .args(["restore", "--restore-detached", "-D"])
            .arg(dir_b)
            .args(["-o", "restore.log"]);
        run_ok(restore, "criu restore", dir_b, "restore.log")?;
        let pause = start.elapsed();
        drop(server);
        return Ok((pause, pause));
    }
    let mut dump = criu_in(a);
    dump.args(["dump", "-t", &pid.to_string(), "-D"])
        .arg(dir_a)
        .args(["--lazy-pages", "--address", &a.ip.to_string()])
        .args(["--port", &PAGES_PORT.to_string(), "-o", "dump.log"]);
    let mut dump = Killed(dump.spawn()?);
    let dump_pid = dump.0.id();
    wait("the dump serves pages", Duration::from_secs(30), || {
        if let Some(s) = dump.0.try_wait()? {
            bail!("criu dump exited ({s}) before serving pages");
        }
        Ok(bound(dump_pid, "tcp", PAGES_PORT))
    })?;
    copy_images(dir_a, dir_b)?;
    let mut daemon = criu_in(b);
    daemon
        .args([
            "lazy-pages",
            "--page-server",
            "--address",
            &a.ip.to_string(),
        ])
        .args(["--port", &PAGES_PORT.to_string(), "-D"])
        .arg(dir_b)
        .args(["-o", "lazy-pages.log"]);
    let _daemon = Killed(daemon.spawn()?);
    let socket = dir_b.join("lazy-pages.socket");
    wait("the lazy-pages daemon", Duration::from_secs(10), || {
        Ok(socket.exists())
    })?;
    let mut restore = criu_in(b);
    restore
        .args(["restore", "--lazy-pages", "--restore-detached", "-D"])
        .arg(dir_b)
        .args(["-o", "restore.log"]);
    run_ok(restore, "criu restore", dir_b, "restore.log")?;
    let pause = start.elapsed();
    wait("the last page leaves A", Duration::from_secs(120), || {
        Ok(dump.0.try_wait()?.is_some())
    })?;
    Ok((pause, start.elapsed()))
}

/// The section of BENCHMARKS.md.
pub fn markdown(md: &mut String, m: &MoveCost) {
    let _ = writeln!(
        md,
        "\n## Moving a game (`--migrate`)\n\n\
         The tick server holding the given memory, moved between two network namespaces by \
         CRIU 4.2.1 with the wrapper's flags (median of the runs; every run in brackets). \
         *pause*: from the dump's start until the game runs on the new node, the longest the \
         players can go unanswered; *last page*: until the last page has left the old node, \
         which must come before the node is reclaimed. The players' own view of a lazy move \
         (through the proxy) is `spotable-bench demo --migrate`.\n"
    );
    if let Some(why) = &m.skipped {
        let _ = writeln!(md, "Not measured in this run: {why}\n");
    }
    if m.rows.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "| resident | mode | pause ms | last page ms |\n|---:|---|---:|---:|"
    );
    for r in &m.rows {
        let each = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            md,
            "| {} MiB | {} | {:.0} ({}) | {:.0} ({}) |",
            r.mib,
            r.mode,
            median(&r.pause_ms),
            each(&r.pause_ms),
            median(&r.last_page_ms),
            each(&r.last_page_ms)
        );
    }
}
