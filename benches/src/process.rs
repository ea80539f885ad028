//! Child processes that die with their owner: replicas and proxies for the demo and tests.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};

/// A child process that is SIGKILLed and reaped when dropped.
#[derive(Debug)]
pub struct Guard {
    child: Child,
    killed: bool,
}

impl Guard {
    /// Wraps a spawned child.
    pub fn new(child: Child) -> Self {
        Self {
            child,
            killed: false,
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL now (a spot node vanishing), and reap.
    pub fn kill(&mut self) -> std::io::Result<()> {
        if !self.killed {
            self.child.kill()?;
            self.child.wait()?;
            self.killed = true;
        }
        Ok(())
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) without waiting.
    pub fn signal(&self, signal: i32) -> std::io::Result<()> {
        let pid = i32::try_from(self.child.id()).map_err(std::io::Error::other)?;
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::kill(pid, signal) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Waits for the child to exit by itself, up to `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                self.killed = true;
                return Ok(status);
            }
            if std::time::Instant::now() >= deadline {
                bail!("process {} still running after {timeout:?}", self.pid());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The underlying child.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// A replica process and the address it listens on.
#[derive(Debug)]
pub struct ReplicaProcess {
    /// The process.
    pub process: Guard,
    /// Its UDP address.
    pub addr: SocketAddr,
}

/// Starts `exe replica <args>` and waits for it to report its address.
pub fn spawn_replica(exe: &Path, args: &[&str]) -> anyhow::Result<ReplicaProcess> {
    let mut child = Command::new(exe)
        .arg("replica")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    let stdout = child.stdout.take().context("replica stdout")?;
    let mut process = Guard::new(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("listening ")
        .ok_or_else(|| anyhow!("replica said {line:?} instead of its address"))?
        .parse()
        .context("replica address")?;
    if process.child_mut().try_wait()?.is_some() {
        bail!("replica exited at start");
    }
    Ok(ReplicaProcess { process, addr })
}

/// A proxy process with the addresses it reported in its log.
#[derive(Debug)]
pub struct ProxyProcess {
    /// The process.
    pub process: Guard,
    /// Its first UDP front address.
    pub addr: SocketAddr,
    /// Its admin HTTP address, if `--admin` was given.
    pub admin: Option<SocketAddr>,
    /// Every line it has logged so far.
    pub log: Log,
}

/// A process's log lines, collected as it writes them.
#[derive(Debug, Clone, Default)]
pub struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn push(&self, line: String) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(line);
    }

    /// The lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Starts a proxy (`program` with `prefix` arguments, then `args`) and reads its text log until
/// it has reported its front address and, when `--admin` is among `args`, its admin address.
/// With `echo`, the rest of its log is passed to our stderr, prefixed, for failure analysis.
pub fn spawn_proxy(
    program: &Path,
    prefix: &[&str],
    args: &[&str],
    echo: bool,
) -> anyhow::Result<ProxyProcess> {
    spawn_proxy_env(program, prefix, args, echo, &[])
}

/// [`spawn_proxy`] with extra environment variables (e.g. `KUBECONFIG`).
pub fn spawn_proxy_env(
    program: &Path,
    prefix: &[&str],
    args: &[&str],
    echo: bool,
    envs: &[(&str, &str)],
) -> anyhow::Result<ProxyProcess> {
    let mut child = Command::new(program)
        .args(prefix)
        .args(args)
        .envs(envs.iter().copied())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", program.display()))?;
    let stderr = child.stderr.take().context("proxy stderr")?;
    let process = Guard::new(child);
    let want_admin = args.contains(&"--admin");
    let (tx, rx) = mpsc::channel();
    let log = Log::default();
    let collected = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let addr = |key: &str| {
                line.split_once(key)
                    .and_then(|(_, rest)| rest.split_whitespace().next())
                    .and_then(|a| a.parse::<SocketAddr>().ok())
            };
            if line.contains("admin listening") {
                let _ = tx.send(("admin", addr("addr=")));
            } else if line.contains(" listening") {
                let _ = tx.send(("front", addr("addr=")));
            }
            if echo {
                eprintln!("  [proxy] {line}");
            }
            collected.push(line);
        }
        let _ = tx.send(("exit", None));
    });
    let (mut front, mut admin) = (None, None);
    while front.is_none() || (want_admin && admin.is_none()) {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(("front", a)) if front.is_none() => front = a,
            Ok(("admin", a)) => admin = a,
            Ok(("exit", _)) => bail!("proxy exited before it was listening"),
            Ok(_) => {}
            Err(_) => bail!("proxy did not report its addresses within 20 s"),
        }
    }
    Ok(ProxyProcess {
        process,
        addr: front.context("front address")?,
        admin,
        log,
    })
}

/// Arguments for a proxy on loopback: ephemeral front and admin ports, `workers` threads,
/// the given replicas, then `extra`.
pub fn loopback_proxy_args(replicas: &[SocketAddr], workers: usize, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]
        .map(String::from)
        .to_vec();
    args.extend(["--workers".to_string(), workers.to_string()]);
    for r in replicas {
        args.extend(["--replica".to_string(), r.to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// `GET path` over plain HTTP/1.0; returns status code and body.
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("bad HTTP response: {head:?}"))?;
    Ok((status, body.to_string()))
}
