//! Race-free port allocation.
//!
//! A port is ours when two things hold: we hold its lock file (an advisory `flock` in a
//! directory every wrapper on the host shares), and it can be bound for each protocol it needs.
//! The lock is kept for the wrapper's whole life, so no other wrapper can hand the port out
//! while our game runs; the test binds are kept until just before the game starts, so nothing
//! else grabs the port in between either. The old launcher bound TCP port 0 and closed it,
//! which raced between servers and said nothing about UDP.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use spotable_fleet::inventory::{Port, Proto};

/// `name/udp`, `name/tcp` or `name/udp+tcp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    /// Port name (`game`, `rcon`…).
    pub name: String,
    /// Protocols that must be free.
    pub protos: Vec<Proto>,
}

impl FromStr for PortSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, protos) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected NAME/udp, NAME/tcp or NAME/udp+tcp"))?;
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid {
            return Err(format!(
                "{name:?}: a port name is letters, digits, '-' or '_'"
            ));
        }
        let mut list = Vec::new();
        for p in protos.split('+') {
            list.push(match p {
                "udp" => Proto::Udp,
                "tcp" => Proto::Tcp,
                other => return Err(format!("{other:?}: protocol must be udp or tcp")),
            });
        }
        list.sort();
        list.dedup();
        Ok(Self {
            name: name.into(),
            protos: list,
        })
    }
}

/// `7000-8000`, inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// First port.
    pub start: u16,
    /// Last port.
    pub end: u16,
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, b) = s
            .split_once('-')
            .ok_or("expected FIRST-LAST, e.g. 7000-8000")?;
        let start: u16 = a
            .trim()
            .parse()
            .map_err(|_| format!("{a:?} is not a port"))?;
        let end: u16 = b
            .trim()
            .parse()
            .map_err(|_| format!("{b:?} is not a port"))?;
        if start == 0 || start > end {
            return Err("the range must be FIRST-LAST with 0 < FIRST <= LAST".into());
        }
        Ok(Self { start, end })
    }
}

/// Why no ports could be had.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// The lock directory is unusable.
    #[error("cannot use lock directory {dir}: {source}")]
    LockDir {
        /// Directory.
        dir: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// Every port of the range is taken.
    #[error("no free port left in {start}-{end} for {name}")]
    Exhausted {
        /// The port being allocated.
        name: String,
        /// Range start.
        start: u16,
        /// Range end.
        end: u16,
    },
    /// Two ports with one name.
    #[error("port {0} is named twice")]
    Duplicate(String),
}

enum Hold {
    Udp(#[allow(dead_code)] UdpSocket),
    Tcp(#[allow(dead_code)] TcpListener),
}

/// Ports allocated to this wrapper, with their locks (and, until released, test binds).
pub struct Allocation {
    /// Name → port.
    pub ports: BTreeMap<String, Port>,
    /// Protocols each port was checked for.
    pub protos: BTreeMap<String, Vec<Proto>>,
    _locks: Vec<File>,
    holds: Vec<Hold>,
}

impl std::fmt::Debug for Allocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Allocation")
            .field("ports", &self.ports)
            .finish()
    }
}

impl Allocation {
    /// Closes the test binds so the game can bind its ports; the locks stay.
    pub fn release_binds(&mut self) {
        self.holds.clear();
    }

    /// Environment for the game: `SPOTABLE_PORT_<NAME>` for every port, and the conventional
    /// `SERVER_PORT` (`game` or `server`), `RCON_PORT`, `QUERY_PORT`.
    pub fn env(&self) -> Vec<(String, String)> {
        self.env_for_game(None)
    }

    /// [`env`](Self::env), with the port `name` given to the game as `port` instead: the
    /// anchor holds the real one and passes the game's traffic on to `port` on loopback.
    pub fn env_for_game(&self, anchored: Option<(&str, u16)>) -> Vec<(String, String)> {
        let mut env = Vec::new();
        for (name, p) in &self.ports {
            let upper = name.to_ascii_uppercase().replace('-', "_");
            let port = match anchored {
                Some((a, internal)) if a == name => internal,
                _ => p.port,
            };
            env.push((format!("SPOTABLE_PORT_{upper}"), port.to_string()));
            let conventional = match name.as_str() {
                "game" | "server" => Some("SERVER_PORT"),
                "rcon" => Some("RCON_PORT"),
                "query" => Some("QUERY_PORT"),
                _ => None,
            };
            if let Some(var) = conventional {
                env.push((var.to_string(), port.to_string()));
            }
        }
        env
    }
}

/// Allocates one port per spec from `range`, using lock files under `lock_dir`.
pub fn allocate(
    specs: &[PortSpec],
    range: PortRange,
    lock_dir: &Path,
) -> Result<Allocation, PortError> {
    std::fs::create_dir_all(lock_dir).map_err(|source| PortError::LockDir {
        dir: lock_dir.into(),
        source,
    })?;
    let mut alloc = Allocation {
        ports: BTreeMap::new(),
        protos: BTreeMap::new(),
        _locks: Vec::new(),
        holds: Vec::new(),
    };
    let span = u32::from(range.end - range.start) + 1;
    // Start at a different place per process so wrappers starting together rarely collide.
    let offset = std::process::id() % span;
    for spec in specs {
        if alloc.ports.contains_key(&spec.name) {
            return Err(PortError::Duplicate(spec.name.clone()));
        }
        let mut found = false;
        for i in 0..span {
            let port = range.start + u16::try_from((offset + i) % span).unwrap_or(0);
            if alloc.ports.values().any(|p| p.port == port) {
                continue;
            }
            let path = lock_dir.join(format!("port-{port}.lock"));
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|source| PortError::LockDir {
                    dir: lock_dir.into(),
                    source,
                })?;
            if file.try_lock().is_err() {
                continue;
            }
            let Some(holds) = bind_all(port, &spec.protos) else {
                continue; // dropping `file` unlocks it
            };
            alloc.ports.insert(
                spec.name.clone(),
                Port {
                    port,
                    proto: spec.protos.first().copied().unwrap_or(Proto::Udp),
                },
            );
            alloc.protos.insert(spec.name.clone(), spec.protos.clone());
            alloc._locks.push(file);
            alloc.holds.extend(holds);
            found = true;
            break;
        }
        if !found {
            return Err(PortError::Exhausted {
                name: spec.name.clone(),
                start: range.start,
                end: range.end,
            });
        }
    }
    Ok(alloc)
}

fn bind_all(port: u16, protos: &[Proto]) -> Option<Vec<Hold>> {
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    protos
        .iter()
        .map(|p| match p {
            Proto::Udp => UdpSocket::bind(addr).ok().map(Hold::Udp),
            Proto::Tcp => TcpListener::bind(addr).ok().map(Hold::Tcp),
        })
        .collect()
}

/// Whether something now holds `port` for `proto` (the game has bound it).
pub fn in_use(port: u16, proto: Proto) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    match proto {
        Proto::Udp => UdpSocket::bind(addr).is_err(),
        Proto::Tcp => std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_and_ranges_parse() {
        assert_eq!(
            "game/udp".parse::<PortSpec>(),
            Ok(PortSpec {
                name: "game".into(),
                protos: vec![Proto::Udp]
            })
        );
        assert_eq!(
            "voice/tcp+udp".parse::<PortSpec>().unwrap().protos,
            vec![Proto::Udp, Proto::Tcp]
        );
        assert!("game".parse::<PortSpec>().is_err());
        assert!("game/sctp".parse::<PortSpec>().is_err());
        assert!("ga me/udp".parse::<PortSpec>().is_err());
        assert_eq!(
            "7000-8000".parse::<PortRange>(),
            Ok(PortRange {
                start: 7000,
                end: 8000
            })
        );
        assert!("8000-7000".parse::<PortRange>().is_err());
        assert!("0-10".parse::<PortRange>().is_err());
        assert!("7000".parse::<PortRange>().is_err());
    }

    #[test]
    fn ports_in_use_or_locked_are_skipped_and_env_is_named() {
        let dir = std::env::temp_dir().join(format!("spotable-ports-{}", std::process::id()));
        let base = 41_000 + u16::try_from(std::process::id() % 1000).unwrap() * 10;
        let range = PortRange {
            start: base,
            end: base + 9,
        };
        // Hold every port but two: one UDP-busy, the rest locked by another allocation.
        let busy_udp = UdpSocket::bind(("0.0.0.0", base)).ok();
        let specs: Vec<PortSpec> = vec!["game/udp".parse().unwrap(), "rcon/tcp".parse().unwrap()];
        let a = allocate(&specs, range, &dir).unwrap();
        let b = allocate(&specs, range, &dir).unwrap();
        let mut all: Vec<u16> = a
            .ports
            .values()
            .chain(b.ports.values())
            .map(|p| p.port)
            .collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 4, "distinct across allocations: {a:?} {b:?}");
        if busy_udp.is_some() {
            assert!(a.ports["game"].port != base && b.ports["game"].port != base);
        }
        let env = a.env();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get("SERVER_PORT"), get("SPOTABLE_PORT_GAME"));
        assert_eq!(get("RCON_PORT"), Some(a.ports["rcon"].port.to_string()));
        drop(a);
        drop(b);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
