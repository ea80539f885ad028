//! The studio's server command as replicas, and any other program `fit` starts: each in a
//! process group of its own, killed with its group when dropped, and (through `setpriv
//! --pdeathsig`, where util-linux has it) killed by the kernel should `fit` itself die.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How long a server may take to bind its port.
const BIND_WITHIN: Duration = Duration::from_secs(10);
const SETPRIV: &str = "/usr/bin/setpriv";

/// A started program and its process group; both die when this is dropped.
#[derive(Debug)]
pub(super) struct Group {
    child: Child,
    output: Arc<Mutex<VecDeque<String>>>,
    /// One message from each output reader as it reaches the end of its pipe.
    finished: std::sync::mpsc::Receiver<()>,
    readers: usize,
}

impl Group {
    /// Starts `program args`, with `envs`, in a process group of its own; keeps the last lines
    /// it prints for error messages.
    pub(super) fn spawn(
        program: &str,
        args: &[String],
        envs: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        if !runnable(program) {
            bail!("cannot start {program}: no such program (or not executable)");
        }
        let mut cmd = if Path::new(SETPRIV).exists() {
            let mut c = Command::new(SETPRIV);
            c.args(["--pdeathsig", "KILL", "--", program]);
            c
        } else {
            Command::new(program)
        };
        cmd.args(args)
            .envs(envs.iter().map(|(k, v)| (*k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {program}"))?;
        let output: Arc<Mutex<VecDeque<String>>> = Arc::default();
        let pipes: [Option<Box<dyn std::io::Read + Send>>; 2] = [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ];
        let (done, finished) = std::sync::mpsc::channel();
        let mut readers = 0;
        for pipe in pipes.into_iter().flatten() {
            let out = output.clone();
            let done = done.clone();
            readers += 1;
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut o = out.lock().unwrap_or_else(PoisonError::into_inner);
                    if o.len() == 20 {
                        o.pop_front();
                    }
                    o.push_back(line);
                }
                let _ = done.send(());
            });
        }
        Ok(Self {
            child,
            output,
            finished,
            readers,
        })
    }

    /// The last lines it printed, once it has exited: what it wrote just before may still be
    /// in the pipes, so this waits (a second at most, in case a child of its own holds them
    /// open) for the readers to reach their end.
    pub(super) fn last_words(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(1);
        while self.readers > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.finished.recv_timeout(left).is_err() {
                break;
            }
            self.readers -= 1;
        }
        self.output()
    }

    /// The last lines it printed.
    pub(super) fn output(&self) -> String {
        let o = self.output.lock().unwrap_or_else(PoisonError::into_inner);
        o.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Its exit status, if it has exited.
    pub(super) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILLs the group (a node vanishing) and reaps the program.
    pub(super) fn kill(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether `program` names an executable file, itself or in `PATH`.
fn runnable(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        return executable(Path::new(program));
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| executable(&dir.join(program))))
}

/// One replica of the studio's server.
#[derive(Debug)]
pub(super) struct Server {
    /// Where it answers.
    pub(super) addr: SocketAddr,
    /// The process.
    pub(super) group: Group,
}

/// Starts `command` with `{port}` in its arguments replaced by a free UDP port (and the port
/// in `SERVER_PORT`, as the wrapper gives it), and waits until it has bound that port.
pub(super) fn start(command: &[String]) -> anyhow::Result<Server> {
    let (program, rest) = command
        .split_first()
        .context("no server command given (after --)")?;
    let port = free_port()?;
    let args: Vec<String> = rest
        .iter()
        .map(|a| a.replace("{port}", &port.to_string()))
        .collect();
    let mut group = Group::spawn(program, &args, &[("SERVER_PORT", port.to_string())])?;
    let deadline = Instant::now() + BIND_WITHIN;
    loop {
        if let Some(addr) = bound(port) {
            return Ok(Server { addr, group });
        }
        if let Some(status) = group.exited() {
            bail!(
                "the server command exited ({status}) before it bound UDP port {port}:\n{}",
                group.last_words()
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "the server command did not bind UDP port {port} within {BIND_WITHIN:?}: put \
                 {{port}} in its arguments, or have it read SERVER_PORT\n{}",
                group.output()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A UDP port free on loopback now (the server binds it next; a race with another program
/// shows as a server that cannot bind, reported as such).
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Where to reach whatever has bound UDP `port`: IPv4 loopback, or IPv6 loopback when only
/// an IPv6 socket holds it.
fn bound(port: u16) -> Option<SocketAddr> {
    let holds = |table: &str| {
        std::fs::read_to_string(table).is_ok_and(|t| {
            t.lines().skip(1).any(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|local| local.rsplit_once(':'))
                    .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                    == Some(port)
            })
        })
    };
    if holds("/proc/net/udp") {
        Some(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
    } else if holds("/proc/net/udp6") {
        Some(SocketAddr::from((Ipv6Addr::LOCALHOST, port)))
    } else {
        None
    }
}
