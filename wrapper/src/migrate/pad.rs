//! The landing pad: waits, running no game, for one to arrive on its migration port; takes
//! it only from a trusted peer and only with its ports free; restores it with CRIU (its
//! memory following from the source's page server); then hands it to the caller, which
//! supervises it as the run mode would.

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use spotable_fleet::inventory::Proto;

use super::criu::{Criu, Restored};
use super::wire::{self, Frame, Hello, VERSION};

/// Most image bytes a game may send (memory follows separately, on demand).
const MAX_IMAGES: u64 = 2 << 30;

/// A pad, listening.
#[derive(Debug)]
pub struct Pad {
    listener: TcpListener,
    trust: Vec<IpNet>,
    criu: Criu,
    work_dir: PathBuf,
    anchor: Option<AnchorPolicy>,
}

/// How this pad runs the identity anchor of a game that had one (its `--anchor-*` flags).
#[derive(Debug, Clone)]
pub struct AnchorPolicy {
    /// Sources that may speak for players.
    pub trust: Vec<IpNet>,
    /// A player silent this long is forgotten.
    pub idle_timeout: Duration,
    /// Most players at once.
    pub max_players: usize,
}

/// A game that landed and runs here.
#[derive(Debug)]
pub struct Landed {
    /// What the source said of it.
    pub hello: Hello,
    /// The restored game, its memory still arriving.
    pub restored: Restored,
    /// Its standard output and error.
    pub output: [std::io::PipeReader; 2],
    /// Where the images are (the pad removes them once the game is done with them).
    pub dir: PathBuf,
    /// Who sent it.
    pub from: SocketAddr,
    /// The source's connection, on which it beats until the last page has left.
    pub control: TcpStream,
    /// The identity anchor in front of the game, its players carried over.
    pub anchor: Option<crate::anchor::Running>,
}

impl Pad {
    /// Listens on `listen` (TCP) for games from `trust`ed networks.
    /// A game behind an anchor is taken only with `anchor` (this pad's anchor flags).
    pub fn bind(
        listen: SocketAddr,
        trust: Vec<IpNet>,
        criu: Criu,
        work_dir: PathBuf,
        anchor: Option<AnchorPolicy>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            listener: TcpListener::bind(listen)?,
            trust,
            criu,
            work_dir,
            anchor,
        })
    }

    /// Where sources connect.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// While `busy` is set (a game runs here), refuses every source at once, so it tries
    /// another pad instead of waiting on this one.
    pub fn refuse_while(&self, busy: std::sync::Arc<std::sync::atomic::AtomicBool>) {
        let Ok(listener) = self.listener.try_clone() else {
            return;
        };
        std::thread::spawn(move || {
            if listener.set_nonblocking(true).is_err() {
                return;
            }
            while busy.load(std::sync::atomic::Ordering::Acquire) {
                match listener.accept() {
                    Ok((mut stream, peer)) => {
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                        let _ = wire::read(&mut stream);
                        let _ = wire::write(
                            &mut stream,
                            &Frame::Refuse("busy: a game runs here".into()),
                        );
                        tracing::info!(%peer, "refused a game: one runs here already");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
            let _ = listener.set_nonblocking(false);
        });
    }

    /// Waits for a game and restores it. `announce` runs once it runs here and before the
    /// source is told so (publishing the move, so that proxies follow before the old address
    /// goes away); its error fails the move. A game that cannot land is refused or failed,
    /// and the pad waits on.
    pub fn land(
        &self,
        mut announce: impl FnMut(&Hello, i32) -> Result<(), String>,
        mut freed: impl FnMut(),
    ) -> std::io::Result<Landed> {
        loop {
            let (mut stream, peer) = match self.listener.accept() {
                Ok(got) => got,
                // Still non-blocking from a refusing spell that is ending.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err(e) => return Err(e),
            };
            let _ = stream.set_nonblocking(false);
            if !self.trust.iter().any(|n| n.contains(&peer.ip())) {
                tracing::warn!(%peer, "migration from an untrusted address refused");
                continue;
            }
            match self.take(&mut stream, peer, &mut announce) {
                Ok(landed) => return Ok(landed),
                Err(why) => {
                    tracing::warn!(%peer, why, "a game did not land");
                    let _ = wire::write(&mut stream, &Frame::Failed(why));
                    freed();
                }
            }
        }
    }

    /// One source's game: `Err` when it did not land (the source is told).
    fn take(
        &self,
        stream: &mut TcpStream,
        peer: SocketAddr,
        announce: &mut impl FnMut(&Hello, i32) -> Result<(), String>,
    ) -> Result<Landed, String> {
        let _ = stream.set_nodelay(true);
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let hello = match wire::read(stream) {
            Ok(Frame::Hello(h)) => *h,
            Ok(other) => return Err(format!("expected a hello, got {other:?}")),
            Err(e) => return Err(e.to_string()),
        };
        if let Err(why) = check(&hello, self.anchor.is_some()) {
            let _ = wire::write(stream, &Frame::Refuse(why.clone()));
            return Err(why);
        }
        wire::write(stream, &Frame::Accept).map_err(|e| e.to_string())?;
        let dir = self.work_dir.join(format!("land-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let result = self.receive_and_restore(stream, &dir, &hello, announce);
        match result {
            Ok((restored, output, anchor)) => {
                wire::write(stream, &Frame::Restored(restored.pid.unsigned_abs()))
                    .map_err(|e| e.to_string())?;
                Ok(Landed {
                    hello,
                    restored,
                    output,
                    dir,
                    from: peer,
                    control: stream.try_clone().map_err(|e| e.to_string())?,
                    anchor,
                })
            }
            Err(why) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(why)
            }
        }
    }

    fn receive_and_restore(
        &self,
        stream: &mut TcpStream,
        dir: &std::path::Path,
        hello: &Hello,
        announce: &mut impl FnMut(&Hello, i32) -> Result<(), String>,
    ) -> Result<
        (
            Restored,
            [std::io::PipeReader; 2],
            Option<crate::anchor::Running>,
        ),
        String,
    > {
        let mut total = 0u64;
        loop {
            match wire::read(stream).map_err(|e| e.to_string())? {
                Frame::File { name, data } => {
                    total += data.len() as u64;
                    if total > MAX_IMAGES {
                        return Err(format!("images over {MAX_IMAGES} bytes"));
                    }
                    let mut f = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(dir.join(&name))
                        .map_err(|e| e.to_string())?;
                    f.write_all(&data).map_err(|e| e.to_string())?;
                }
                Frame::Done => break,
                other => return Err(format!("expected images, got {other:?}")),
            }
        }
        // The anchor's players as the source had them once the game was frozen.
        let anchored = match std::fs::read(dir.join(super::source::ANCHOR_FILE)) {
            Ok(json) => Some(
                serde_json::from_slice::<wire::Anchored>(&json)
                    .map_err(|e| format!("bad anchor players: {e}"))?,
            ),
            Err(_) => hello.anchor.clone(),
        };
        let (out_r, out_w) = std::io::pipe().map_err(|e| e.to_string())?;
        let (err_r, err_w) = std::io::pipe().map_err(|e| e.to_string())?;
        let mut restored = self
            .criu
            .restore_lazy(
                dir,
                hello.page_server,
                hello.pipes,
                out_w.into(),
                err_w.into(),
            )
            .map_err(|e| e.to_string())?;
        // The anchor first, with every player on the port the game knows it by: the game's
        // first words to a player must find its socket.
        let anchor = match (&anchored, &self.anchor) {
            (Some(a), Some(policy)) => {
                let started = hello
                    .ports
                    .get(&a.port_name)
                    .ok_or_else(|| format!("no port {} for the anchor", a.port_name))
                    .and_then(|p| {
                        crate::anchor::spawn(crate::anchor::Config {
                            listen: (std::net::Ipv4Addr::UNSPECIFIED, p.port).into(),
                            game: (std::net::Ipv4Addr::LOCALHOST, a.game_port).into(),
                            trust: policy.trust.clone(),
                            idle_timeout: policy.idle_timeout,
                            max_players: policy.max_players,
                            carried: a.players.clone(),
                        })
                        .map_err(|e| format!("the anchor: {e}"))
                    });
                match started {
                    Ok(running) => {
                        tracing::info!(
                            players = a.players.len(),
                            listen = %running.local,
                            "anchor running, its players carried over"
                        );
                        Some(running)
                    }
                    Err(why) => {
                        kill_group(restored.pid);
                        let _ = restored.lazy.kill();
                        let _ = restored.lazy.wait();
                        return Err(why);
                    }
                }
            }
            _ => None,
        };
        if let Err(why) = announce(hello, restored.pid) {
            // Nobody can reach it: better no game than one the proxies do not know.
            kill_group(restored.pid);
            let _ = restored.lazy.kill();
            let _ = restored.lazy.wait();
            return Err(format!("could not announce the move: {why}"));
        }
        // The game goes on once a proxy has followed (a player's datagram waits on one of
        // its UDP ports), or after FOLLOW_WITHIN for a game nobody is sending to.
        let udp: Vec<u16> = hello
            .ports
            .values()
            .filter(|p| p.proto == Proto::Udp)
            .map(|p| p.port)
            .chain(anchored.as_ref().map(|a| a.game_port))
            .collect();
        let deadline = std::time::Instant::now() + FOLLOW_WITHIN;
        while !udp.iter().any(|p| queued(*p)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(restored.pid),
            nix::sys::signal::Signal::SIGCONT,
        );
        Ok((restored, [out_r, err_r], anchor))
    }
}

/// Longest a restored game waits, stopped, for the proxies to follow its move.
const FOLLOW_WITHIN: Duration = Duration::from_millis(150);

/// Whether a datagram waits on UDP `port` in this network namespace (`/proc/net/udp{,6}`:
/// the local address's port, then the `tx_queue:rx_queue` column).
fn queued(port: u16) -> bool {
    ["/proc/net/udp", "/proc/net/udp6"]
        .iter()
        .any(|table| std::fs::read_to_string(table).is_ok_and(|t| udp_queued(&t, port)))
}

/// [`queued`] over a table's text.
fn udp_queued(table: &str, port: u16) -> bool {
    table.lines().skip(1).any(|l| {
        let mut f = l.split_whitespace();
        let local = f.nth(1);
        let queues = f.nth(2);
        local
            .and_then(|a| a.rsplit_once(':'))
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
            == Some(port)
            && queues
                .and_then(|q| q.split_once(':'))
                .and_then(|(_, rx)| u64::from_str_radix(rx, 16).ok())
                .is_some_and(|rx| rx > 0)
    })
}

/// Whether this pad can take the game: the protocol's version, its ports free here, and an
/// anchor here (`anchors`) when it had one.
fn check(hello: &Hello, anchors: bool) -> Result<(), String> {
    if hello.version != VERSION {
        return Err(format!(
            "protocol version {} (this pad speaks {VERSION})",
            hello.version
        ));
    }
    if let Some(a) = &hello.anchor {
        if !anchors {
            return Err(
                "the game is behind an anchor and this pad runs none (--anchor-trust)".into(),
            );
        }
        if hello
            .ports
            .get(&a.port_name)
            .is_none_or(|p| p.proto == Proto::Tcp)
        {
            return Err(format!(
                "the anchor's port {} is not a UDP port of the game",
                a.port_name
            ));
        }
        if std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, a.game_port)).is_err() {
            return Err(format!(
                "the game's port {} behind the anchor is taken here",
                a.game_port
            ));
        }
    }
    for (name, p) in &hello.ports {
        let free = match p.proto {
            Proto::Udp => std::net::UdpSocket::bind(("0.0.0.0", p.port)).is_ok(),
            Proto::Tcp => TcpListener::bind(("0.0.0.0", p.port)).is_ok(),
        };
        if !free {
            return Err(format!("port {name} ({}) is taken here", p.port));
        }
    }
    Ok(())
}

/// Listens to the source until its last page has left: `Ok` then; an error, with `lost`
/// set, when it falls silent for [`wire::SOURCE_SILENCE`] or says something else first.
pub fn watch_source(
    mut control: TcpStream,
    lost: &std::sync::atomic::AtomicBool,
) -> Result<(), String> {
    let _ = control.set_read_timeout(Some(wire::SOURCE_SILENCE));
    let why = loop {
        match wire::read(&mut control) {
            Ok(Frame::Alive) => {}
            Ok(Frame::Sent) => return Ok(()),
            Ok(other) => break format!("the source said {other:?} while its pages left"),
            Err(wire::WireError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break format!("nothing from the source for {:?}", wire::SOURCE_SILENCE);
            }
            Err(e) => break format!("the source's connection failed: {e}"),
        }
    };
    lost.store(true, std::sync::atomic::Ordering::Release);
    Err(why)
}

/// SIGKILLs a restored game's process group (it leads its own session).
pub fn kill_group(pid: i32) {
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_datagram_waiting_on_the_games_port_is_seen_in_the_udp_table() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  120: 00000000:1E61 00000000:0000 07 00000000:00000340 00:00000000 00000000     0        0 4242 2 0000000000000000 0
  121: 00000000:1E62 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4243 2 0000000000000000 0
";
        assert!(udp_queued(table, 7777), "0x1E61 has 0x340 bytes waiting");
        assert!(!udp_queued(table, 7778), "0x1E62 has none");
        assert!(!udp_queued(table, 7779), "no such socket");
    }
}
