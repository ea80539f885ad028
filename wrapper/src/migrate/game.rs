//! A game the wrapper can move: PID 1 of a PID namespace of its own (so a restore never
//! collides on PIDs), in a time namespace (so its monotonic clock does not jump between
//! nodes), a session leader, with its output on pipes the wrapper reads and passes on to its
//! own (so CRIU can hand the pad new pipes in their place). `unshare` and `setsid` from
//! util-linux make the namespaces and the session: no unsafe code in the wrapper.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A started movable game.
#[derive(Debug)]
pub struct Movable {
    /// `unshare`, the game's parent outside its PID namespace (leader of its own group).
    pub unshare: Child,
    /// The game: PID 1 inside, this pid outside; its own session and group.
    pub pid: i32,
    /// The inodes of the pipes its standard output and error are.
    pub pipes: [Option<u64>; 2],
}

/// Starts `program args` with `envs` as a movable game; its output lines go on to ours.
pub fn spawn(
    program: &OsString,
    args: &[OsString],
    envs: &[(String, String)],
) -> std::io::Result<Movable> {
    let mut unshare = Command::new("unshare")
        // No --kill-child: its parent-death signal would be dumped with the game and kill
        // it on the pad the moment CRIU's restore detaches from it.
        .args(["--pid", "--fork", "--time", "setsid", "--"])
        .arg(program)
        .args(args)
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()?;
    if let Some(out) = unshare.stdout.take() {
        pass_on(out, false);
    }
    if let Some(err) = unshare.stderr.take() {
        pass_on(err, true);
    }
    let pid = child_of(&mut unshare)?;
    let pipes = [pipe_inode(pid, 1), pipe_inode(pid, 2)];
    Ok(Movable {
        unshare,
        pid,
        pipes,
    })
}

/// Copies lines from `from` to our stdout (or stderr) as they come, until it closes.
pub fn pass_on(from: impl std::io::Read + Send + 'static, to_stderr: bool) {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            let _ = if to_stderr {
                writeln!(std::io::stderr().lock(), "{line}")
            } else {
                writeln!(std::io::stdout().lock(), "{line}")
            };
        }
    });
}

/// The pid of `unshare`'s one child (the game), once it has forked.
fn child_of(unshare: &mut Child) -> std::io::Result<i32> {
    let id = unshare.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let children = std::fs::read_to_string(format!("/proc/{id}/task/{id}/children"))?;
        if let Some(pid) = children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
        {
            return Ok(pid);
        }
        if let Some(status) = unshare.try_wait()? {
            return Err(std::io::Error::other(format!(
                "unshare exited ({status}) before the game started (it needs CAP_SYS_ADMIN \
                 for the PID and time namespaces)"
            )));
        }
        if Instant::now() >= deadline {
            return Err(std::io::Error::other("the game did not start within 10 s"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The inode of the pipe that `pid`'s file descriptor `fd` is, if it is one.
pub fn pipe_inode(pid: i32, fd: u32) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
    link.to_str()?
        .strip_prefix("pipe:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}
