//! What a migrating wrapper and a landing pad say to each other over the migration port (TCP).
//!
//! Frames, each a kind byte, a big-endian `u32` length and that many bytes:
//!
//! - source → pad: [`Frame::Hello`] (the game, as JSON: [`Hello`]), then one [`Frame::File`]
//!   per chunk of each CRIU image file (a name, then bytes), then [`Frame::Done`];
//! - pad → source: [`Frame::Accept`] or [`Frame::Refuse`] after the hello, then
//!   [`Frame::Restored`] (the game runs on the pad) or [`Frame::Failed`];
//! - source → pad, while the game's memory is still leaving: [`Frame::Alive`] every
//!   [`HEARTBEAT`], then [`Frame::Sent`] once the last page has left. A pad that hears
//!   nothing for [`SOURCE_SILENCE`] before that takes the source for dead (a node lost
//!   mid-transfer closes no connection).
//!
//! The pad reads bytes from the network, so every length is bounded before anything is
//! allocated, names are plain file names (no path, no `..`), and the whole is fuzzed
//! (`proxy/fuzz`, target `migration`). Only peers in the pad's `--trust` networks get this far.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// The protocol's version, in every hello.
pub const VERSION: u32 = 1;
/// Largest hello or reply.
pub const MAX_MESSAGE: usize = 64 << 10;
/// Largest chunk of a file in one frame.
pub const MAX_CHUNK: usize = 4 << 20;
/// Longest image file name.
pub const MAX_NAME: usize = 255;
/// How often a source says it is alive while its page server runs.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_millis(250);
/// Silence after which a pad takes the source for dead.
pub const SOURCE_SILENCE: std::time::Duration = std::time::Duration::from_secs(2);

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The game that comes (boxed: it is far larger than every other frame).
    Hello(Box<Hello>),
    /// Part of an image file: its name and the next bytes of it.
    File {
        /// A plain file name.
        name: String,
        /// Bytes to append to it.
        data: Vec<u8>,
    },
    /// Every image file has been sent.
    Done,
    /// The pad takes the game.
    Accept,
    /// The pad does not (busy, a port taken, an untrusted source…), and why.
    Refuse(String),
    /// The game runs on the pad: its pid there.
    Restored(u32),
    /// The restore failed, and why.
    Failed(String),
    /// The source is alive, its memory still leaving.
    Alive,
    /// The game's last page has left the source.
    Sent,
}

/// What the source tells the pad about the game.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// [`VERSION`].
    pub version: u32,
    /// Where the pad fetches the game's memory from: the source's CRIU page server.
    pub page_server: std::net::SocketAddr,
    /// The game's named UDP and TCP ports, which the pad must have free.
    pub ports: std::collections::BTreeMap<String, spotable_fleet::inventory::Port>,
    /// The game's address as the proxies know it (`IP:PORT`), which the pad's takes over.
    pub address: Option<String>,
    /// The source pod, when in Kubernetes.
    pub pod: Option<spotable_fleet::inventory::PodRef>,
    /// The source's node.
    pub node: Option<String>,
    /// The identity anchor in front of the game, when it has one: the pad runs one in its
    /// place with the same players on the same local ports.
    #[serde(default)]
    pub anchor: Option<Anchored>,
    /// The inodes of the pipes the game's standard output and error are (the pad gives it
    /// new ones in their place).
    #[serde(default)]
    pub pipes: [Option<u64>; 2],
}

/// The anchor a moving game had in front of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Anchored {
    /// The named port the anchor holds (one of [`Hello::ports`]).
    pub port_name: String,
    /// The loopback UDP port the game listens on behind it, which the pad must have free.
    pub game_port: u16,
    /// Its players.
    pub players: Vec<AnchoredPlayer>,
}

/// One player of an anchor, as the game knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnchoredPlayer {
    /// The player's address (from the proxies' PROXY v2 header).
    pub player: std::net::SocketAddr,
    /// The local port of the anchor's socket for the player: the game's peer for it.
    pub port: u16,
    /// The proxy that most recently carried the player, where the game's answers go.
    pub carrier: std::net::SocketAddr,
}

const HELLO: u8 = 1;
const FILE: u8 = 2;
const DONE: u8 = 3;
const ACCEPT: u8 = 10;
const REFUSE: u8 = 11;
const RESTORED: u8 = 12;
const FAILED: u8 = 13;
const ALIVE: u8 = 20;
const SENT: u8 = 21;

/// Why bytes were not a frame.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The connection failed or ended.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// A frame kind this version does not know.
    #[error("unknown frame kind {0}")]
    Kind(u8),
    /// A frame longer than its kind allows.
    #[error("frame of {len} bytes is over the {max}-byte limit")]
    TooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A hello or reply that does not parse.
    #[error("bad message: {0}")]
    Message(String),
    /// A file name that is not a plain file name.
    #[error("bad image file name {0:?}")]
    Name(String),
}

/// Reads one frame.
pub fn read(r: &mut impl Read) -> Result<Frame, WireError> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head)?;
    let kind = head[0];
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let max = match kind {
        FILE => 2 + MAX_NAME + MAX_CHUNK,
        HELLO | REFUSE | FAILED => MAX_MESSAGE,
        RESTORED => 4,
        DONE | ACCEPT | ALIVE | SENT => 0,
        other => return Err(WireError::Kind(other)),
    };
    if len > max {
        return Err(WireError::TooLong { len, max });
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    let text = |b: Vec<u8>| String::from_utf8(b).map_err(|e| WireError::Message(e.to_string()));
    Ok(match kind {
        HELLO => {
            let hello: Hello =
                serde_json::from_slice(&body).map_err(|e| WireError::Message(e.to_string()))?;
            Frame::Hello(Box::new(hello))
        }
        FILE => {
            let n = usize::from(u16::from_be_bytes([
                *body
                    .first()
                    .ok_or(WireError::Message("empty file frame".into()))?,
                *body
                    .get(1)
                    .ok_or(WireError::Message("short file frame".into()))?,
            ]));
            let name = body
                .get(2..2 + n)
                .ok_or(WireError::Message("file name past the frame".into()))?;
            let name = text(name.to_vec())?;
            if !plain_name(&name) {
                return Err(WireError::Name(name));
            }
            let data = body[2 + n..].to_vec();
            Frame::File { name, data }
        }
        DONE => Frame::Done,
        ACCEPT => Frame::Accept,
        REFUSE => Frame::Refuse(text(body)?),
        RESTORED => {
            let b: [u8; 4] = body
                .try_into()
                .map_err(|_| WireError::Message("restored: want 4 bytes".into()))?;
            Frame::Restored(u32::from_be_bytes(b))
        }
        FAILED => Frame::Failed(text(body)?),
        ALIVE => Frame::Alive,
        SENT => Frame::Sent,
        other => return Err(WireError::Kind(other)),
    })
}

/// A file name with no directory in it: CRIU's images are plain files of one directory.
pub fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name != "."
        && name != ".."
        && !name.contains(['/', '\0'])
}

/// Writes one frame.
pub fn write(w: &mut impl Write, frame: &Frame) -> io::Result<()> {
    let (kind, body): (u8, Vec<u8>) = match frame {
        Frame::Hello(h) => (HELLO, serde_json::to_vec(h).map_err(io::Error::other)?),
        Frame::File { name, data } => {
            if !plain_name(name) || data.len() > MAX_CHUNK {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("cannot send {name:?} ({} bytes) in one frame", data.len()),
                ));
            }
            let mut b = Vec::with_capacity(2 + name.len() + data.len());
            b.extend_from_slice(&(name.len() as u16).to_be_bytes());
            b.extend_from_slice(name.as_bytes());
            b.extend_from_slice(data);
            (FILE, b)
        }
        Frame::Done => (DONE, Vec::new()),
        Frame::Accept => (ACCEPT, Vec::new()),
        Frame::Refuse(why) => (REFUSE, clip(why)),
        Frame::Restored(pid) => (RESTORED, pid.to_be_bytes().to_vec()),
        Frame::Failed(why) => (FAILED, clip(why)),
        Frame::Alive => (ALIVE, Vec::new()),
        Frame::Sent => (SENT, Vec::new()),
    };
    let mut head = [0u8; 5];
    head[0] = kind;
    head[1..].copy_from_slice(&(body.len() as u32).to_be_bytes());
    w.write_all(&head)?;
    w.write_all(&body)?;
    w.flush()
}

/// A reason, cut to what a frame carries (at a character boundary).
fn clip(s: &str) -> Vec<u8> {
    let mut end = s.len().min(MAX_MESSAGE);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.as_bytes()[..end].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        let mut ports = std::collections::BTreeMap::new();
        ports.insert(
            "game".to_string(),
            spotable_fleet::inventory::Port {
                port: 7777,
                proto: spotable_fleet::inventory::Proto::Udp,
            },
        );
        Hello {
            version: VERSION,
            page_server: "10.0.1.5:7101".parse().unwrap(),
            ports,
            address: Some("10.0.1.5:7777".into()),
            pod: None,
            node: Some("ip-10-0-1-5".into()),
            anchor: Some(Anchored {
                port_name: "game".into(),
                game_port: 41000,
                players: vec![AnchoredPlayer {
                    player: "203.0.113.7:40000".parse().unwrap(),
                    port: 51234,
                    carrier: "10.0.9.1:33000".parse().unwrap(),
                }],
            }),
            pipes: [Some(275_293), None],
        }
    }

    #[test]
    fn every_frame_round_trips() {
        let frames = [
            Frame::Hello(Box::new(hello())),
            Frame::File {
                name: "pages-1.img".into(),
                data: vec![7; 1000],
            },
            Frame::Done,
            Frame::Accept,
            Frame::Refuse("busy".into()),
            Frame::Restored(4242),
            Frame::Failed("restore: bad size".into()),
            Frame::Alive,
            Frame::Sent,
        ];
        let mut buf = Vec::new();
        for f in &frames {
            write(&mut buf, f).unwrap();
        }
        let mut r = &buf[..];
        for f in &frames {
            assert_eq!(&read(&mut r).unwrap(), f);
        }
        assert!(matches!(read(&mut r), Err(WireError::Io(_))));
    }

    #[test]
    fn what_comes_from_the_network_is_bounded_and_names_stay_in_the_directory() {
        // A length past the limit is refused before anything is allocated.
        let huge = [FILE, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            read(&mut &huge[..]),
            Err(WireError::TooLong { .. })
        ));
        for name in ["../etc/passwd", "a/b", "..", ".", ""] {
            let mut body = (name.len() as u16).to_be_bytes().to_vec();
            body.extend_from_slice(name.as_bytes());
            let mut f = vec![FILE];
            f.extend_from_slice(&(body.len() as u32).to_be_bytes());
            f.extend_from_slice(&body);
            assert!(
                matches!(read(&mut &f[..]), Err(WireError::Name(_))),
                "{name}"
            );
            assert!(
                write(
                    &mut Vec::new(),
                    &Frame::File {
                        name: name.into(),
                        data: vec![]
                    }
                )
                .is_err()
            );
        }
        assert!(matches!(
            read(&mut &[99u8, 0, 0, 0, 0][..]),
            Err(WireError::Kind(99))
        ));
        // A hello with a field this version does not know is refused.
        let mut json = serde_json::to_value(hello()).unwrap();
        json["surprise"] = serde_json::json!(1);
        let body = serde_json::to_vec(&json).unwrap();
        let mut f = vec![HELLO];
        f.extend_from_slice(&(body.len() as u32).to_be_bytes());
        f.extend_from_slice(&body);
        assert!(matches!(read(&mut &f[..]), Err(WireError::Message(_))));
    }
}
