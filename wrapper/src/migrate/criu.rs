//! The `criu` program, as the move uses it: a lazy (post-copy) dump whose page server feeds
//! the pad, and a lazy restore on the pad. CRIU 4.2 or newer (3.17 stops on the vDSO of
//! kernels from 6.13; 4.1 cannot dump UDP sockets there). Lazy dumps need `fs.pipe-max-size`
//! of 4 MiB or more.
//!
//! The game's standard output and error are pipes the wrapper reads: CRIU dumps them as
//! pipes whose other end is outside the game, and the restore takes new ones in their place
//! (`--inherit-fd`), handed to it as its own stdout and stderr, so the game's output goes on
//! into the pad's log.

use std::io::{self, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a dump may take to freeze the game and write its images.
const DUMP_WITHIN: Duration = Duration::from_secs(30);

/// The `criu` program.
#[derive(Debug, Clone)]
pub struct Criu {
    /// Its path (or a name looked up in `PATH`).
    pub binary: PathBuf,
}

/// Why CRIU did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    /// It could not be run.
    #[error("cannot run {binary}: {source}")]
    Spawn {
        /// The program.
        binary: String,
        /// Why.
        source: io::Error,
    },
    /// It ran and failed: the last lines of its log.
    #[error("criu {step} failed: {log}")]
    Failed {
        /// `dump`, `restore`, `lazy-pages`.
        step: &'static str,
        /// The end of its log.
        log: String,
    },
    /// It took too long.
    #[error("criu {0} took too long")]
    Timeout(&'static str),
    /// Waiting on it failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A lazy dump in progress: the images are written, the game is frozen, and the page server
/// serves its memory until the last page has left; then CRIU ends the game.
#[derive(Debug)]
pub struct LazyDump {
    child: Child,
    _owned: crate::supervise::Owned,
    dir: PathBuf,
    /// When the game was frozen (the dump started).
    pub started: Instant,
}

/// A game restored on the pad, its memory still arriving.
#[derive(Debug)]
pub struct Restored {
    /// Its pid (in the pad's PID namespace: the wrapper's view).
    pub pid: i32,
    /// The lazy-pages daemon fetching the rest of its memory.
    pub lazy: Child,
    _owned: crate::supervise::Owned,
    dir: PathBuf,
}

impl Criu {
    /// Starts a lazy dump of `pid`'s tree into `dir`, the page server on `page_server`, and
    /// returns once the images are written and the page server listens.
    pub fn dump_lazy(
        &self,
        pid: i32,
        dir: &Path,
        page_server: SocketAddr,
    ) -> Result<LazyDump, CriuError> {
        let started = Instant::now();
        let mut child = self.spawn(
            Command::new(&self.binary)
                .args(["dump", "-t", &pid.to_string()])
                .arg("-D")
                .arg(dir)
                .args(["--lazy-pages", "--address"])
                .arg(page_server.ip().to_string())
                .args(["--port", &page_server.port().to_string()])
                .args(["-v4", "-o", "dump.log"]),
        )?;
        let owned = crate::supervise::Owned::new(child.id());
        let deadline = started + DUMP_WITHIN;
        loop {
            if listening(page_server.port()) {
                return Ok(LazyDump {
                    _owned: owned,
                    child,
                    dir: dir.to_owned(),
                    started,
                });
            }
            if let Some(status) = child.try_wait()? {
                return Err(CriuError::Failed {
                    step: "dump",
                    log: format!(
                        "exited ({status}) before serving pages: {}",
                        tail(dir, "dump.log")
                    ),
                });
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(CriuError::Timeout("dump"));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Restores the game in `dir` (its memory from `page_server`), detached: the restored
    /// game is reparented to the nearest subreaper, the pad's wrapper. `stdout` and `stderr`
    /// take the place of the pipes the game wrote to (`pipes`: their inodes at the source).
    pub fn restore_lazy(
        &self,
        dir: &Path,
        page_server: SocketAddr,
        pipes: [Option<u64>; 2],
        stdout: Stdio,
        stderr: Stdio,
    ) -> Result<Restored, CriuError> {
        let mut lazy = self.spawn(
            Command::new(&self.binary)
                .args(["lazy-pages", "--page-server", "--address"])
                .arg(page_server.ip().to_string())
                .args(["--port", &page_server.port().to_string()])
                .arg("-D")
                .arg(dir)
                .args(["-v4", "-o", "lazy-pages.log"]),
        )?;
        let owned = crate::supervise::Owned::new(lazy.id());
        // The restore reaches the daemon through a socket in the images' directory.
        let socket = dir.join("lazy-pages.socket");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Some(status) = lazy.try_wait()? {
                return Err(CriuError::Failed {
                    step: "lazy-pages",
                    log: format!("exited ({status}): {}", tail(dir, "lazy-pages.log")),
                });
            }
            if Instant::now() >= deadline {
                let _ = lazy.kill();
                let _ = lazy.wait();
                return Err(CriuError::Timeout("lazy-pages"));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let pidfile = dir.join("restored.pid");
        let mut restore = Command::new(&self.binary);
        restore
            // Stopped until the pad has published the move: a game that speaks first would
            // otherwise answer before any proxy knows its new address, and be dropped.
            .args([
                "restore",
                "--lazy-pages",
                "--restore-detached",
                "--leave-stopped",
            ])
            .arg("-D")
            .arg(dir)
            .arg("--pidfile")
            .arg(&pidfile)
            .args(["-v4", "-o", "restore.log"]);
        for (fd, inode) in pipes.iter().enumerate() {
            if let Some(inode) = inode {
                restore.args(["--inherit-fd", &format!("fd[{}]:pipe:[{inode}]", fd + 1)]);
            }
        }
        let mut restoring = restore
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|source| CriuError::Spawn {
                binary: self.binary.display().to_string(),
                source,
            })?;
        let status = {
            let _owned = crate::supervise::Owned::new(restoring.id());
            restoring.wait()?
        };
        if !status.success() {
            let _ = lazy.kill();
            let _ = lazy.wait();
            return Err(CriuError::Failed {
                step: "restore",
                log: tail(dir, "restore.log"),
            });
        }
        let pid = std::fs::read_to_string(&pidfile)?
            .trim()
            .parse()
            .map_err(|_| CriuError::Failed {
                step: "restore",
                log: "no pid in its pidfile".into(),
            })?;
        Ok(Restored {
            pid,
            _owned: owned,
            lazy,
            dir: dir.to_owned(),
        })
    }

    fn spawn(&self, cmd: &mut Command) -> Result<Child, CriuError> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| CriuError::Spawn {
                binary: self.binary.display().to_string(),
                source,
            })
    }
}

impl LazyDump {
    /// Waits until the last page has left (CRIU then ends the game), up to `within`.
    /// `beat` runs every few milliseconds meanwhile (the source's heartbeat to the pad).
    pub fn finish(
        mut self,
        within: Duration,
        mut beat: impl FnMut(),
    ) -> Result<Duration, CriuError> {
        let deadline = Instant::now() + within;
        loop {
            beat();
            if let Some(status) = self.child.try_wait()? {
                return if status.success() {
                    Ok(self.started.elapsed())
                } else {
                    Err(CriuError::Failed {
                        step: "dump",
                        log: tail(&self.dir, "dump.log"),
                    })
                };
            }
            if Instant::now() >= deadline {
                self.abort();
                return Err(CriuError::Timeout("dump"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops serving pages: CRIU lets the game go on where it stood (the move is off;
    /// checked on this kernel: a SIGTERMed lazy dump resumes the game).
    pub fn abort(mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Restored {
    /// Waits for the last page to arrive: `Ok` once the game's memory is all here, an error
    /// when the source went away first (the game cannot go on). `lost` set meanwhile (the
    /// source went silent) ends the wait.
    ///
    /// Either way the game is SIGKILLed before the daemon is: once the daemon is gone its
    /// missing pages read as zeros, and a game running on zeros would send players garbage.
    pub fn pages(&mut self, lost: &std::sync::atomic::AtomicBool) -> Result<(), CriuError> {
        let status = loop {
            if let Some(status) = self.lazy.try_wait()? {
                break status;
            }
            if lost.load(std::sync::atomic::Ordering::Acquire) {
                super::pad::kill_group(self.pid);
                let _ = self.lazy.kill();
                let _ = self.lazy.wait();
                return Err(CriuError::Failed {
                    step: "lazy-pages",
                    log: format!(
                        "the source went silent before the last page ({})",
                        tail(&self.dir, "lazy-pages.log")
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        if status.success() {
            Ok(())
        } else {
            super::pad::kill_group(self.pid);
            Err(CriuError::Failed {
                step: "lazy-pages",
                log: tail(&self.dir, "lazy-pages.log"),
            })
        }
    }
}

/// Whether a TCP socket listens on `port` in this network namespace.
fn listening(port: u16) -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|table| {
        std::fs::read_to_string(table).is_ok_and(|t| {
            t.lines().skip(1).any(|l| {
                let mut f = l.split_whitespace();
                let local = f.nth(1);
                let state = f.nth(1);
                state == Some("0A")
                    && local
                        .and_then(|a| a.rsplit_once(':'))
                        .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                        == Some(port)
            })
        })
    })
}

/// The last lines of a CRIU log in `dir`, for an error message.
pub fn tail(dir: &Path, log: &str) -> String {
    let mut text = String::new();
    let _ = std::fs::File::open(dir.join(log)).and_then(|mut f| f.read_to_string(&mut text));
    let lines: Vec<&str> = text
        .lines()
        .rev()
        .filter(|l| l.contains("Error") || l.contains("rror"))
        .take(3)
        .collect();
    if lines.is_empty() {
        text.lines()
            .rev()
            .take(3)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join(" | ")
    } else {
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }
}
