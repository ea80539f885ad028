//! The migrating side: on the eviction's SIGTERM, find a landing pad that takes the game,
//! dump the game lazily, send the pad its images, and serve the pad its memory until the
//! last page has left. Any step that fails before the pad runs the game leaves the game
//! running where it was, for the caller's fallback (today's path: SIGTERM to the game).

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::criu::{Criu, CriuError};
use super::wire::{self, Frame, Hello};

/// Where and how to move.
#[derive(Debug, Clone)]
pub struct Plan {
    /// CRIU.
    pub criu: Criu,
    /// The game's pid.
    pub pid: i32,
    /// Pads to try.
    pub pads: Pads,
    /// What the pads are told (its `page_server` is where this side serves memory).
    pub hello: Hello,
    /// Where the images are written.
    pub work_dir: PathBuf,
    /// The whole move, last page included.
    pub within: Duration,
    /// Set to call the move off (a second stop signal): heeded before the game is frozen.
    pub abort: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The identity anchor in front of the game: its players go with the game.
    pub anchor: Option<crate::anchor::Handle>,
}

/// The image file that carries the anchor's players, taken once the game is frozen (so no
/// player the game knows is missing from it).
pub const ANCHOR_FILE: &str = "spotable-anchor.json";

/// Where pads come from.
#[derive(Debug, Clone)]
pub enum Pads {
    /// These, in order (`--pad`).
    Static(Vec<SocketAddr>),
    /// The game's pads in Kubernetes, each claimed with a Lease before it is offered the game.
    Kubernetes {
        /// The API.
        kube: super::kube::Kube,
        /// The game whose pads are wanted.
        game: String,
        /// This node (pads here go down with it).
        node: Option<String>,
        /// Who claims (this pod).
        holder: String,
        /// The runtime the API calls run on.
        runtime: tokio::runtime::Handle,
    },
}

/// A move that succeeded.
#[derive(Debug, Clone)]
pub struct Moved {
    /// The pad that runs the game now.
    pub pad: SocketAddr,
    /// The game's pid there.
    pub pid: u32,
    /// From the freeze to the pad's word that the game runs: the player's pause, but for the
    /// first datagrams' way to the new address.
    pub pause: Duration,
    /// Image bytes sent (memory pages excluded: they follow on demand).
    pub bytes: u64,
    /// From the freeze until the last page left.
    pub last_page: Duration,
}

/// Why a move did not happen.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    /// No pad would take the game; each one's answer.
    #[error("no landing pad took the game ({0})")]
    NoPad(String),
    /// CRIU failed before the pad ran the game.
    #[error(transparent)]
    Criu(#[from] CriuError),
    /// The pad failed to restore it, or the connection broke.
    #[error("the pad at {pad} failed: {why}")]
    Pad {
        /// Which.
        pad: SocketAddr,
        /// Why.
        why: String,
    },
    /// The images could not be read.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Called off before the game was frozen.
    #[error("called off by a second stop signal")]
    Aborted,
}

impl Plan {
    /// Moves the game; on an error the game still runs here (or, once the pad has it, there:
    /// only a failure after the pad ran the game leaves it nowhere, which CRIU's page server
    /// reports as a failed dump).
    pub fn run(&self) -> Result<Moved, MoveError> {
        let start = Instant::now();
        let aborted = || self.abort.load(std::sync::atomic::Ordering::Acquire);
        if aborted() {
            return Err(MoveError::Aborted);
        }
        let (pad, mut stream) = self.claim()?;
        let dir = self.work_dir.join(format!("dump-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        if aborted() {
            return Err(MoveError::Aborted);
        }
        let dump = self
            .criu
            .dump_lazy(self.pid, &dir, self.hello.page_server)?;
        if let (Some(anchor), Some(anchored)) = (&self.anchor, &self.hello.anchor) {
            let mut now = anchored.clone();
            now.players = anchor.players();
            let written = serde_json::to_vec(&now)
                .map_err(std::io::Error::other)
                .and_then(|json| std::fs::write(dir.join(ANCHOR_FILE), json));
            if let Err(e) = written {
                dump.abort();
                return Err(e.into());
            }
        }
        let frozen = dump.started;
        let sent = match send_images(&mut stream, &dir) {
            Ok(bytes) => bytes,
            Err(e) => {
                dump.abort();
                return Err(MoveError::Pad {
                    pad,
                    why: format!("sending the images: {e}"),
                });
            }
        };
        let left = self.within.saturating_sub(start.elapsed());
        let _ = stream.set_read_timeout(Some(left.max(Duration::from_secs(1))));
        let pid = match wire::read(&mut stream) {
            Ok(Frame::Restored(pid)) => pid,
            Ok(Frame::Failed(why)) => {
                dump.abort();
                return Err(MoveError::Pad { pad, why });
            }
            Ok(other) => {
                dump.abort();
                return Err(MoveError::Pad {
                    pad,
                    why: format!("unexpected {other:?}"),
                });
            }
            Err(e) => {
                dump.abort();
                return Err(MoveError::Pad {
                    pad,
                    why: e.to_string(),
                });
            }
        };
        let pause = frozen.elapsed();
        // The pad takes our silence for our death: beat until the last page has left.
        let mut beaten = Instant::now();
        let last_page = dump.finish(self.within.saturating_sub(start.elapsed()), || {
            if beaten.elapsed() >= wire::HEARTBEAT {
                beaten = Instant::now();
                let _ = wire::write(&mut stream, &Frame::Alive);
            }
        })?;
        let _ = wire::write(&mut stream, &Frame::Sent);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(Moved {
            pad,
            pid,
            pause,
            bytes: sent,
            last_page,
        })
    }

    /// The first pad that accepts the hello (in Kubernetes, one this move claimed first).
    fn claim(&self) -> Result<(SocketAddr, TcpStream), MoveError> {
        let mut answers = Vec::new();
        match &self.pads {
            Pads::Static(pads) => {
                for &pad in pads {
                    match offer(pad, &self.hello) {
                        Ok(stream) => return Ok((pad, stream)),
                        Err(why) => answers.push(format!("{pad}: {why}")),
                    }
                }
            }
            Pads::Kubernetes {
                kube,
                game,
                node,
                holder,
                runtime,
            } => {
                let pads = runtime
                    .block_on(kube.pads(game, node.as_deref()))
                    .map_err(|e| MoveError::NoPad(format!("cannot list pads: {e}")))?;
                for pad in pads {
                    match runtime.block_on(kube.claim(&pad.name, holder)) {
                        Ok(true) => {}
                        Ok(false) => {
                            answers.push(format!("{}: claimed by another move", pad.name));
                            continue;
                        }
                        Err(e) => {
                            answers.push(format!("{}: {e}", pad.name));
                            continue;
                        }
                    }
                    match offer(pad.addr, &self.hello) {
                        Ok(stream) => return Ok((pad.addr, stream)),
                        Err(why) => {
                            answers.push(format!("{} ({}): {why}", pad.name, pad.addr));
                            let _ = runtime.block_on(kube.release(&pad.name));
                        }
                    }
                }
            }
        }
        for a in &answers {
            tracing::warn!(answer = a, "landing pad did not take the game");
        }
        if answers.is_empty() {
            answers.push("none known".into());
        }
        Err(MoveError::NoPad(answers.join("; ")))
    }
}

/// Offers the game to `pad`: the connection when it accepts, else why not.
fn offer(pad: SocketAddr, hello: &Hello) -> Result<TcpStream, String> {
    let mut stream =
        TcpStream::connect_timeout(&pad, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    wire::write(&mut stream, &Frame::Hello(Box::new(hello.clone()))).map_err(|e| e.to_string())?;
    match wire::read(&mut stream) {
        Ok(Frame::Accept) => Ok(stream),
        Ok(Frame::Refuse(why)) => Err(why),
        Ok(other) => Err(format!("unexpected {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// Sends every image file of `dir` (CRIU's logs stay here), then `Done`; returns the bytes.
fn send_images(stream: &mut TcpStream, dir: &Path) -> std::io::Result<u64> {
    let mut bytes = 0;
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| !n.ends_with(".log"))
        .collect();
    names.sort();
    for name in names {
        let data = std::fs::read(dir.join(&name))?;
        bytes += data.len() as u64;
        if data.is_empty() {
            wire::write(stream, &Frame::File { name, data })?;
            continue;
        }
        for chunk in data.chunks(wire::MAX_CHUNK) {
            wire::write(
                stream,
                &Frame::File {
                    name: name.clone(),
                    data: chunk.to_vec(),
                },
            )?;
        }
    }
    wire::write(stream, &Frame::Done)?;
    Ok(bytes)
}
