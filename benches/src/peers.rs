//! The peer proxies measured beside Spotable: nginx's stream module and Quilkin, run as real
//! processes with generated configuration. `benches/peers/install.sh` installs them.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use spotable_fixtures::process::Guard;

/// Where the peers are looked for.
#[derive(Debug, Clone)]
pub struct PeerPaths {
    pub nginx: PathBuf,
    pub nginx_stream_module: PathBuf,
    pub quilkin: PathBuf,
}

impl PeerPaths {
    /// Debian's nginx, and Quilkin where `install.sh` puts it (`$SPOTABLE_PEERS`, default
    /// `target/peers`), or on PATH.
    pub fn discover(workspace: &Path) -> Self {
        let peers = std::env::var_os("SPOTABLE_PEERS")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace.join("target/peers"));
        let mut quilkin = peers.join("quilkin/bin/quilkin");
        if !quilkin.exists()
            && let Some(found) = which("quilkin")
        {
            quilkin = found;
        }
        Self {
            nginx: which("nginx").unwrap_or_else(|| PathBuf::from("/usr/sbin/nginx")),
            nginx_stream_module: PathBuf::from("/usr/lib/nginx/modules/ngx_stream_module.so"),
            quilkin,
        }
    }

    /// Why nginx cannot run here, if it cannot.
    pub fn nginx_missing(&self) -> Option<String> {
        if !self.nginx.exists() {
            return Some(format!("{} not found", self.nginx.display()));
        }
        if !self.nginx_stream_module.exists() {
            return Some(format!(
                "{} not found (libnginx-mod-stream)",
                self.nginx_stream_module.display()
            ));
        }
        None
    }

    /// Why Quilkin cannot run here, if it cannot.
    pub fn quilkin_missing(&self) -> Option<String> {
        (!self.quilkin.exists()).then(|| format!("{} not found", self.quilkin.display()))
    }
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// A free UDP port on all addresses (free when asked; the peers bind it right after).
pub fn free_udp_port() -> anyhow::Result<u16> {
    Ok(UdpSocket::bind("0.0.0.0:0")?.local_addr()?.port())
}

/// Starts nginx with one UDP upstream, `workers` worker processes, listening on `port`.
pub fn start_nginx(
    paths: &PeerPaths,
    dir: &Path,
    port: u16,
    upstream: SocketAddr,
    workers: usize,
) -> anyhow::Result<Guard> {
    std::fs::create_dir_all(dir)?;
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "load_module {module};\n\
             worker_processes {workers};\n\
             daemon off;\n\
             master_process on;\n\
             pid {dir}/nginx.pid;\n\
             error_log {dir}/error.log warn;\n\
             events {{ worker_connections 65536; }}\n\
             stream {{\n\
               upstream game {{ server {upstream}; }}\n\
               server {{\n\
                 listen {port} udp reuseport;\n\
                 proxy_pass game;\n\
                 proxy_timeout 30s;\n\
               }}\n\
             }}\n",
            module = paths.nginx_stream_module.display(),
            dir = dir.display(),
        ),
    )?;
    let child = Command::new(&paths.nginx)
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Its workers die with the master only if the group is killed: a SIGKILLed master
        // leaves them behind, holding the port and the machine's memory.
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {}", paths.nginx.display()))?;
    Ok(Guard::group(child))
}

/// Starts Quilkin forwarding every datagram to all `endpoints`, listening on `port`.
pub fn start_quilkin(
    paths: &PeerPaths,
    dir: &Path,
    port: u16,
    endpoints: &[SocketAddr],
    workers: usize,
) -> anyhow::Result<Guard> {
    std::fs::create_dir_all(dir)?;
    let list = endpoints
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let child = Command::new(&paths.quilkin)
        .current_dir(dir)
        .args(["--admin.enabled", "false", "--log-format", "plain", "-q"])
        .args(["--service.udp", "--service.udp.port", &port.to_string()])
        .args(["--service.udp.workers", &workers.to_string()])
        .args(["--provider.static.endpoints", &list])
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("quilkin.log"))?)
        .spawn()
        .with_context(|| format!("cannot start {}", paths.quilkin.display()))?;
    Ok(Guard::new(child))
}

/// Waits until `target` echoes a datagram sent from `source` (the proxy is up and has its
/// upstreams), or fails after `timeout`.
pub fn wait_echo(
    source: Ipv4Addr,
    target: SocketAddr,
    token: &[u8],
    timeout: Duration,
) -> anyhow::Result<()> {
    let s = UdpSocket::bind((source, 0))?;
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    let mut body = Vec::new();
    spotable_fixtures::wire::stamp(&mut body, u64::MAX, 16);
    // A token-routing proxy cuts the token off: the echo is the body alone.
    let probe = [&body[..], token].concat();
    while Instant::now() < deadline {
        let _ = s.send_to(&probe, target);
        if let Ok((n, _)) = s.recv_from(&mut buf)
            && buf[..n] == body[..]
        {
            return Ok(());
        }
    }
    bail!("{target} did not echo within {timeout:?}")
}
