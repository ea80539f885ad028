//! PID-1 duty: start the game in its own process group, pass stop signals to the whole group,
//! reap every zombie (orphaned grandchildren included), SIGKILL the group after the grace
//! period, and report the game's exit.
//!
//! The wrapper also registers as a child subreaper, so orphans are reparented to it even when
//! it is not PID 1 (a sidecar, a test).

use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::signal::unix::{Signal as Stream, SignalKind, signal};

/// How the game ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl Exit {
    /// The wrapper's own exit code: the game's, or 128 + signal as shells report it.
    pub fn code(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
        }
    }
}

/// Makes orphaned descendants ours to reap.
pub fn become_subreaper() -> nix::Result<()> {
    nix::sys::prctl::set_child_subreaper(true)
}

/// Children whose exit another part of the wrapper waits for itself (CRIU's processes):
/// the reaper leaves them alone.
static OWNED: std::sync::Mutex<Vec<i32>> = std::sync::Mutex::new(Vec::new());

/// Keeps the reaper off child `pid` while it lives.
#[derive(Debug)]
pub struct Owned(i32);

impl Owned {
    /// Claims child `pid`.
    pub fn new(pid: u32) -> Self {
        let pid = i32::try_from(pid).unwrap_or(i32::MAX);
        OWNED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(pid);
        Self(pid)
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        OWNED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|p| *p != self.0);
    }
}

/// Reaps every child that has exited but those [`Owned`]; returns the main child's exit if it
/// is among them.
pub fn reap(main: Pid) -> Option<Exit> {
    let mut exit = None;
    loop {
        match waitpid(main, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => exit = Some(Exit::Code(code)),
            Ok(WaitStatus::Signaled(_, sig, _)) => exit = Some(Exit::Signal(sig as i32)),
            Err(nix::errno::Errno::EINTR) => continue,
            _ => {}
        }
        break;
    }
    let owned = OWNED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    for pid in zombies() {
        if pid != main.as_raw() && !owned.contains(&pid) {
            let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
            tracing::debug!(pid, "reaped an orphan");
        }
    }
    exit
}

/// Our children that have exited and wait to be reaped (orphans reparented to us included).
fn zombies() -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        let Ok(children) = std::fs::read_to_string(task.path().join("children")) else {
            continue;
        };
        for pid in children
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            if state == Some("Z") {
                out.push(pid);
            }
        }
    }
    out
}

/// Signal streams, registered before the game starts so no signal is missed.
#[derive(Debug)]
pub struct Supervisor {
    term: Stream,
    int: Stream,
    hup: Stream,
    chld: Stream,
}

impl Supervisor {
    /// Watches SIGTERM, SIGINT, SIGHUP and SIGCHLD.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            chld: signal(SignalKind::child())?,
        })
    }

    /// Runs until the game (`main`, leader of its own process group) exits. `on_stop` is called
    /// once, with the signal's name, when a stop signal first arrives.
    pub async fn run(
        mut self,
        main: Pid,
        grace: Duration,
        mut on_stop: impl FnMut(&'static str),
    ) -> Exit {
        let mut kill_at: Option<tokio::time::Instant> = None;
        loop {
            if let Some(exit) = reap(main) {
                return exit;
            }
            let deadline = kill_at;
            let forward = |sig: Signal| {
                if let Err(e) = killpg(main, sig) {
                    tracing::warn!(signal = %sig, error = %e, "cannot signal the game");
                }
            };
            tokio::select! {
                _ = self.chld.recv() => {}
                _ = self.term.recv() => {
                    forward(Signal::SIGTERM);
                    if kill_at.is_none() {
                        on_stop("SIGTERM");
                        kill_at = Some(tokio::time::Instant::now() + grace);
                    }
                }
                _ = self.int.recv() => {
                    forward(Signal::SIGINT);
                    if kill_at.is_none() {
                        on_stop("SIGINT");
                        kill_at = Some(tokio::time::Instant::now() + grace);
                    }
                }
                _ = self.hup.recv() => forward(Signal::SIGHUP),
                () = sleep_until(deadline) => {
                    tracing::warn!(grace = ?grace, "grace period over; SIGKILL");
                    forward(Signal::SIGKILL);
                    kill_at = None;
                }
            }
        }
    }
}

/// How a movable game's supervision ended.
#[derive(Debug)]
pub enum Outcome<M> {
    /// The game was moved; it runs elsewhere.
    Moved(M),
    /// The game ended here.
    Exited(Exit),
}

impl Supervisor {
    /// As [`Supervisor::run`], for a game that can be moved: `main` is the wrapper's child
    /// (the game's parent outside its PID namespace), `game` the game (its own process
    /// group). The first stop signal starts `mover` (a blocking move, in a thread) instead of
    /// passing the signal on. When the move succeeds the game is gone from here; when it fails,
    /// the signal is passed on then, `on_stop` is called and the grace period starts. A second
    /// stop signal during the move sets `abort`, which the move heeds before it freezes the
    /// game.
    pub async fn run_movable<M: Send + 'static>(
        mut self,
        main: Pid,
        game: Pid,
        grace: Duration,
        abort: std::sync::Arc<std::sync::atomic::AtomicBool>,
        mover: impl FnOnce() -> Result<M, String> + Send + 'static,
        mut on_stop: impl FnMut(&'static str),
    ) -> Outcome<M> {
        let mut mover = Some(mover);
        let mut moving: Option<tokio::task::JoinHandle<Result<M, String>>> = None;
        let mut kill_at: Option<tokio::time::Instant> = None;
        let mut stopped: Option<&'static str> = None;
        let forward = |sig: Signal| {
            for group in [game, main] {
                let _ = killpg(group, sig);
            }
        };
        loop {
            if let Some(exit) = reap(main) {
                // A moved game ends here when its last page has left: the move's word decides.
                return match moving.take() {
                    Some(handle) => match handle.await {
                        Ok(Ok(m)) => Outcome::Moved(m),
                        _ => Outcome::Exited(exit),
                    },
                    None => Outcome::Exited(exit),
                };
            }
            let deadline = kill_at;
            let stop = |name: &'static str, stopped: &mut Option<&'static str>| {
                if stopped.is_none() {
                    *stopped = Some(name);
                    true
                } else {
                    false
                }
            };
            tokio::select! {
                _ = self.chld.recv() => {}
                _ = self.term.recv() => {
                    if stop("SIGTERM", &mut stopped) {
                        if let Some(m) = mover.take() {
                            moving = Some(tokio::task::spawn_blocking(m));
                        }
                    } else if moving.is_some() {
                        abort.store(true, std::sync::atomic::Ordering::Release);
                    } else {
                        forward(Signal::SIGTERM);
                    }
                }
                _ = self.int.recv() => {
                    if stop("SIGINT", &mut stopped) {
                        if let Some(m) = mover.take() {
                            moving = Some(tokio::task::spawn_blocking(m));
                        }
                    } else if moving.is_some() {
                        abort.store(true, std::sync::atomic::Ordering::Release);
                    } else {
                        forward(Signal::SIGINT);
                    }
                }
                _ = self.hup.recv() => forward(Signal::SIGHUP),
                result = join(&mut moving) => {
                    moving = None;
                    match result {
                        Ok(m) => return Outcome::Moved(m),
                        Err(why) => {
                            tracing::warn!(why, "the game could not be moved; stopping it here");
                            let name = stopped.unwrap_or("SIGTERM");
                            forward(if name == "SIGINT" { Signal::SIGINT } else { Signal::SIGTERM });
                            on_stop(name);
                            kill_at = Some(tokio::time::Instant::now() + grace);
                        }
                    }
                }
                () = sleep_until(deadline) => {
                    tracing::warn!(grace = ?grace, "grace period over; SIGKILL");
                    forward(Signal::SIGKILL);
                    kill_at = None;
                }
            }
        }
    }
}

/// The move's result, once it is done; pending while there is none.
async fn join<M>(
    moving: &mut Option<tokio::task::JoinHandle<Result<M, String>>>,
) -> Result<M, String> {
    match moving {
        Some(handle) => match handle.await {
            Ok(result) => result,
            Err(e) => Err(format!("the move panicked: {e}")),
        },
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
