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

/// Reaps every child that has exited; returns the main child's exit if it is among them.
pub fn reap(main: Pid) -> Option<Exit> {
    let mut exit = None;
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) if pid == main => exit = Some(Exit::Code(code)),
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == main => {
                exit = Some(Exit::Signal(sig as i32));
            }
            Ok(WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _)) => {
                tracing::debug!(pid = pid.as_raw(), "reaped an orphan");
            }
            Ok(WaitStatus::StillAlive) => break,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => break, // ECHILD: nobody left
        }
    }
    exit
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

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
