//! The players of a `fit` run: built-in ones sending varied payloads, the players of a
//! studio's capture replayed with their recorded timing, or the studio's own client run as
//! programs (for handshakes a replay cannot pass, such as a server-made challenge).

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::evidence::Seen;
use super::relay::Relay;
use super::servers::Group;

/// What one player sent and got.
#[derive(Debug, Clone, Default)]
pub(super) struct Played {
    /// What it sent.
    pub(super) sent: Vec<Seen>,
    /// What it got.
    pub(super) got: Vec<Seen>,
}

/// A player's datagrams, each with when it goes (from the players' start).
pub(crate) type Script = Vec<(Duration, Vec<u8>)>;

/// Where the players' datagrams come from.
#[derive(Debug, Clone)]
pub(super) enum Source {
    /// `n` built-in players at `rate` datagrams a second each.
    BuiltIn {
        /// Players.
        n: usize,
        /// Datagrams a second each.
        rate: u32,
    },
    /// Each client of a capture: its datagrams to the server, from the first one's time.
    Capture(Vec<Script>),
    /// `n` copies of a client program (`sh -c`, `{target}` replaced by the proxy's address).
    Client {
        /// The command line.
        command: String,
        /// How many.
        n: usize,
    },
}

impl Source {
    /// Players as the run will have them.
    pub(super) fn players(&self) -> usize {
        match self {
            Source::BuiltIn { n, .. } | Source::Client { n, .. } => *n,
            Source::Capture(c) => c.len(),
        }
    }
}

/// Reads a capture: the server is the endpoint most peers talk to (on a tie, the lower
/// port); every other endpoint is one player, its datagrams to the server replayed.
pub(super) fn capture(path: &Path) -> anyhow::Result<Source> {
    capture_scripts(path).map(Source::Capture)
}

/// The players of a capture, each its datagrams to the server with their timing.
pub(crate) fn capture_scripts(path: &Path) -> anyhow::Result<Vec<Script>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let c = spotable_pcap::read(&bytes).with_context(|| format!("{}", path.display()))?;
    let mut peers: HashMap<SocketAddr, std::collections::HashSet<SocketAddr>> = HashMap::new();
    for d in &c.datagrams {
        peers.entry(d.dst).or_default().insert(d.src);
        peers.entry(d.src).or_default().insert(d.dst);
    }
    let Some(server) = peers
        .iter()
        .max_by_key(|(a, p)| (p.len(), std::cmp::Reverse(a.port())))
        .map(|(a, _)| *a)
    else {
        bail!("{}: no UDP datagram in the capture", path.display());
    };
    let start = c
        .datagrams
        .iter()
        .find(|d| d.dst == server)
        .map(|d| d.at)
        .unwrap_or_default();
    let mut players: Vec<(SocketAddr, Script)> = Vec::new();
    for d in c.datagrams.iter().filter(|d| d.dst == server) {
        let at = d.at.saturating_sub(start);
        match players.iter_mut().find(|(a, _)| *a == d.src) {
            Some((_, v)) => v.push((at, d.payload.to_vec())),
            None => players.push((d.src, vec![(at, d.payload.to_vec())])),
        }
    }
    if players.is_empty() {
        bail!("{}: no datagram to the server {server}", path.display());
    }
    Ok(players.into_iter().map(|(_, v)| v).collect())
}

/// Players running until `until`; their records grow as they play.
#[derive(Debug)]
pub(super) struct Running {
    logs: Vec<Arc<Mutex<Played>>>,
    threads: Vec<JoinHandle<()>>,
    /// The studio's clients and the relay that sees what they send and get.
    clients: Option<(Vec<Group>, Relay)>,
}

/// Starts the players of `source` against `target` until `until`; times from `origin`.
pub(super) fn start(
    source: &Source,
    target: SocketAddr,
    origin: Instant,
    until: Instant,
) -> anyhow::Result<Running> {
    let mut running = Running {
        logs: Vec::new(),
        threads: Vec::new(),
        clients: None,
    };
    let mut spawn = |script: Script| -> anyhow::Result<()> {
        let socket = UdpSocket::bind(if target.is_ipv4() {
            "127.0.0.1:0"
        } else {
            "[::1]:0"
        })?;
        let log = Arc::new(Mutex::new(Played::default()));
        let l = log.clone();
        running.threads.push(std::thread::spawn(move || {
            replay(&socket, target, &script, origin, until, &l);
        }));
        running.logs.push(log);
        Ok(())
    };
    match source {
        Source::BuiltIn { n, rate } => {
            let length = until.saturating_duration_since(Instant::now());
            let every = Duration::from_secs(1) / (*rate).max(1);
            for p in 0..*n {
                let mut rng = fastrand::Rng::with_seed(p as u64 + 1);
                let count = (length.as_secs_f64() / every.as_secs_f64()) as u32;
                let script = (0..count)
                    .map(|i| {
                        // A number, the player, and bytes that vary in length and content.
                        let mut d = u64::from(i + 1).to_be_bytes().to_vec();
                        d.extend_from_slice(&(p as u32).to_be_bytes());
                        let extra = rng.usize(0..48);
                        d.extend((0..extra).map(|_| rng.u8(..)));
                        (every * i, d)
                    })
                    .collect();
                spawn(script)?;
            }
        }
        Source::Capture(players) => {
            for script in players {
                spawn(script.clone())?;
            }
        }
        Source::Client { command, n } => {
            let relay = Relay::start(target, origin)?;
            let line = command.replace("{target}", &relay.addr.to_string());
            let mut groups = Vec::new();
            for _ in 0..*n {
                groups.push(Group::spawn("sh", &["-c".into(), line.clone()], &[])?);
            }
            running.clients = Some((groups, relay));
        }
    }
    Ok(running)
}

/// Sends `script` from `socket` on its timing from when the run's players start, and records
/// what comes back, until `until`.
fn replay(
    socket: &UdpSocket,
    target: SocketAddr,
    script: &[(Duration, Vec<u8>)],
    origin: Instant,
    until: Instant,
    log: &Mutex<Played>,
) {
    let lock = || log.lock().unwrap_or_else(PoisonError::into_inner);
    let begin = Instant::now();
    let mut next = 0;
    let mut buf = vec![0u8; 65_536];
    loop {
        let now = Instant::now();
        if now >= until {
            return;
        }
        while let Some((at, bytes)) = script.get(next).filter(|(at, _)| begin + *at <= now) {
            let _ = (at, socket.send_to(bytes, target));
            lock().sent.push(Seen {
                at: origin.elapsed(),
                bytes: bytes.clone(),
            });
            next += 1;
        }
        let due = script
            .get(next)
            .map_or(until, |(at, _)| (begin + *at).min(until));
        let wait = due.saturating_duration_since(Instant::now());
        let _ = socket.set_read_timeout(Some(wait.max(Duration::from_micros(200))));
        if let Ok((n, _)) = socket.recv_from(&mut buf) {
            lock().got.push(Seen {
                at: origin.elapsed(),
                bytes: buf[..n].to_vec(),
            });
        }
    }
}

impl Running {
    /// What each player got so far (the studio's clients: what crossed their relay).
    pub(super) fn so_far(&self) -> Vec<Played> {
        if let Some((_, relay)) = &self.clients {
            return relay
                .logs()
                .into_values()
                .map(|l| Played {
                    sent: l.sent,
                    got: l.answers,
                })
                .collect();
        }
        self.logs
            .iter()
            .map(|l| l.lock().unwrap_or_else(PoisonError::into_inner).clone())
            .collect()
    }

    /// Waits for the players to finish (the studio's clients are stopped), and returns what
    /// each sent and got.
    pub(super) fn finish(mut self) -> Vec<Played> {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let played = self.so_far();
        // Dropping the groups kills the clients, then the relay stops.
        self.clients = None;
        played
    }
}
