//! The identity anchor: beside the game, one stable peer per player, whichever proxy carries
//! the player.
//!
//! Proxies (with `--replica-header proxy-v2`) put a PROXY v2 header naming the player before
//! every datagram. The anchor reads it, and for each player keeps one local UDP socket
//! connected to the game, so the game sees the same peer (that socket) for the player's whole
//! life: across proxy restarts, rollouts and load-balancer re-hashes. The game's answers on
//! that socket go out from the anchor's listen socket to the proxy that most recently carried
//! the player, without a header.
//!
//! Only proxies may speak for players: datagrams from sources outside `--trust`, and datagrams
//! without a valid header, are dropped and counted. The table is bounded (a limit and an idle
//! timeout, both counted), and datagrams are read and answers sent in batches
//! (`recvmmsg`/`sendmmsg`, `spotable-udp`) with buffers allocated once.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use spotable_core::loglimit::LogLimit;
use spotable_core::proxy_header::{self, Header, HeaderError};
use spotable_edge::fds;
use spotable_udp::{RecvBatch, SendBatch};

const LISTEN: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_PLAYER: usize = 2;
/// Datagrams per `recvmmsg`.
const BATCH: usize = 32;
/// Batches read from one socket before others get a turn.
const BATCHES_PER_TURN: usize = 4;
const TICK: Duration = Duration::from_millis(250);
const MAX_DATAGRAM: usize = 65_535;

/// Metric names of the anchor (on the wrapper's admin listener).
pub mod names {
    /// Datagrams passed on, by `direction` (`to_game`, `to_proxy`).
    pub const DATAGRAMS: &str = "spotable_anchor_datagrams_total";
    /// Datagrams dropped, by `reason`.
    pub const DROPS: &str = "spotable_anchor_drops_total";
    /// Players with a socket now.
    pub const PLAYERS: &str = "spotable_anchor_players";
    /// Most players at once: `--max-players`, or fewer when the open-file limit leaves room
    /// for fewer sockets.
    pub const PLAYER_LIMIT: &str = "spotable_anchor_player_limit";
    /// Players forgotten after `--idle-timeout` without a datagram.
    pub const EXPIRED: &str = "spotable_anchor_players_expired_total";
}

/// Why the anchor dropped a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// From a source outside `--trust`.
    Untrusted,
    /// No valid PROXY v2 header (the reason as the decoder gives it).
    Header(HeaderError),
    /// A `LOCAL` header, or a `PROXY` header naming no player.
    NoPlayer,
    /// The player table is full.
    TableFull,
    /// A player's socket could not be opened.
    SocketError,
    /// The kernel refused a send.
    SendFailed,
}

impl Drop {
    /// Every reason's label, for pre-registering the series.
    pub const LABELS: [&str; 10] = [
        "untrusted",
        "truncated",
        "no_signature",
        "version",
        "family",
        "length",
        "no_player",
        "table_full",
        "socket_error",
        "send_failed",
    ];

    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Drop::Untrusted => "untrusted",
            Drop::Header(e) => e.as_str(),
            Drop::NoPlayer => "no_player",
            Drop::TableFull => "table_full",
            Drop::SocketError => "socket_error",
            Drop::SendFailed => "send_failed",
        }
    }
}

/// What the anchor needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where proxies send.
    pub listen: SocketAddr,
    /// The game's own address (loopback, usually).
    pub game: SocketAddr,
    /// Sources allowed to speak for players (the proxies' pod network).
    pub trust: Vec<IpNet>,
    /// A player without a datagram for this long is forgotten.
    pub idle_timeout: Duration,
    /// Most players at once (each holds a socket).
    pub max_players: usize,
    /// Players taken over from the anchor of a game that moved here, each on the local port
    /// the game knew it by.
    pub carried: Vec<spotable_migrate_wire::AnchoredPlayer>,
}

/// Who may speak for a player: pure, so it can be tested without sockets.
pub fn trusted(trust: &[IpNet], source: IpAddr) -> bool {
    let source = match source {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    trust.iter().any(|net| net.contains(&source))
}

/// What to do with one datagram that reached the listen socket: pure.
pub fn classify(
    trust: &[IpNet],
    from: SocketAddr,
    datagram: &[u8],
) -> Result<(SocketAddr, usize), Drop> {
    if !trusted(trust, from.ip()) {
        return Err(Drop::Untrusted);
    }
    match proxy_header::decode(datagram).map_err(Drop::Header)? {
        (Header::Proxy { source, .. }, at) => Ok((source, at)),
        (Header::Local | Header::Unknown, _) => Err(Drop::NoPlayer),
    }
}

#[derive(Debug)]
struct Player {
    addr: SocketAddr,
    socket: UdpSocket,
    /// The proxy that most recently carried the player: where its answers go.
    carrier: SocketAddr,
    last: Instant,
}

/// Counts since the last flush to the metrics recorder.
#[derive(Debug, Default)]
struct Tally {
    to_game: u64,
    to_proxy: u64,
    expired: u64,
    drops: HashMap<&'static str, u64>,
}

impl Tally {
    fn drop(&mut self, why: Drop, n: u64) {
        *self.drops.entry(why.as_str()).or_default() += n;
    }

    fn flush(&mut self, players: usize) {
        metrics::counter!(names::DATAGRAMS, "direction" => "to_game").increment(self.to_game);
        metrics::counter!(names::DATAGRAMS, "direction" => "to_proxy").increment(self.to_proxy);
        metrics::counter!(names::EXPIRED).increment(self.expired);
        for (reason, n) in self.drops.drain() {
            metrics::counter!(names::DROPS, "reason" => reason).increment(n);
        }
        metrics::gauge!(names::PLAYERS).set(players as f64);
        self.to_game = 0;
        self.to_proxy = 0;
        self.expired = 0;
    }
}

/// Registers the anchor's series (present at zero from the start) and their help.
pub fn describe(limit: usize) {
    use metrics::{describe_counter, describe_gauge};
    describe_counter!(
        names::DATAGRAMS,
        "Datagrams the anchor passed on, by direction"
    );
    describe_counter!(names::DROPS, "Datagrams the anchor dropped, by reason");
    describe_gauge!(names::PLAYERS, "Players with a socket of their own now");
    describe_gauge!(
        names::PLAYER_LIMIT,
        "Most players at once (--max-players, capped by the open-file limit)"
    );
    describe_counter!(names::EXPIRED, "Players forgotten after the idle timeout");
    for direction in ["to_game", "to_proxy"] {
        metrics::counter!(names::DATAGRAMS, "direction" => direction).absolute(0);
    }
    for reason in Drop::LABELS {
        metrics::counter!(names::DROPS, "reason" => reason).absolute(0);
    }
    metrics::counter!(names::EXPIRED).absolute(0);
    metrics::gauge!(names::PLAYERS).set(0.0);
    metrics::gauge!(names::PLAYER_LIMIT).set(limit as f64);
}

/// A running anchor: stop it with [`Handle::stop`].
#[derive(Debug, Clone)]
pub struct Handle {
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    table: Arc<std::sync::Mutex<Vec<spotable_migrate_wire::AnchoredPlayer>>>,
}

impl Handle {
    /// The players now, each with the local port the game knows it by and its carrier: what
    /// a landing pad's anchor needs for the game to see the same peers after a move.
    pub fn players(&self) -> Vec<spotable_migrate_wire::AnchoredPlayer> {
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Asks the loop to end; it returns at its next wake-up.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.waker.wake();
    }
}

/// A running anchor thread.
#[derive(Debug)]
pub struct Running {
    /// The bound listen address.
    pub local: SocketAddr,
    /// Stops it.
    pub handle: Handle,
    /// The thread; its result is the loop's.
    pub thread: std::thread::JoinHandle<io::Result<()>>,
}

impl Running {
    /// Stops the loop and waits for it.
    pub fn stop(self) -> io::Result<()> {
        self.handle.stop();
        self.thread
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the anchor thread panicked")))
    }
}

/// Binds and runs an anchor on a thread of its own. Its batches hold raw pointers into its
/// own buffers, so it is built on the thread that runs it, which reports back how binding
/// went.
pub fn spawn(config: Config) -> io::Result<Running> {
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("spotable-anchor".into())
        .spawn(move || match Anchor::bind(config) {
            Ok((anchor, handle)) => {
                let local = anchor.local_addr();
                let _ = bound_tx.send(local.map(|l| (l, handle)));
                anchor.run()
            }
            Err(e) => {
                let _ = bound_tx.send(Err(e));
                Ok(())
            }
        })?;
    let (local, handle) = bound_rx
        .recv()
        .map_err(|_| io::Error::other("the anchor thread ended before binding"))??;
    Ok(Running {
        local,
        handle,
        thread,
    })
}

/// The anchor's sockets and table.
#[derive(Debug)]
pub struct Anchor {
    config: Config,
    poll: Poll,
    listen: UdpSocket,
    players: Slab<Player>,
    by_addr: HashMap<SocketAddr, usize>,
    rx: RecvBatch,
    answers: RecvBatch,
    tx: SendBatch,
    tally: Tally,
    stop: Arc<AtomicBool>,
    /// The player limit in force: `max_players`, or what the open-file limit leaves room for.
    limit: usize,
    logs: Logs,
    /// The table as [`Handle::players`] reads it, rewritten when a player comes, goes or
    /// changes carrier (never per datagram otherwise).
    table: Arc<std::sync::Mutex<Vec<spotable_migrate_wire::AnchoredPlayer>>>,
    table_changed: bool,
}

/// Warnings the anchor writes on its data path, each rate-limited.
#[derive(Debug)]
struct Logs {
    untrusted: LogLimit,
    table_full: LogLimit,
    socket: LogLimit,
}

impl Default for Logs {
    fn default() -> Self {
        Self {
            untrusted: LogLimit::new(Duration::from_secs(60)),
            table_full: LogLimit::default(),
            socket: LogLimit::default(),
        }
    }
}

/// Why no socket could be opened for a new player.
#[derive(Debug)]
enum Refused {
    /// The table holds as many players as the limit in force.
    Full,
    /// Opening, connecting or registering the socket failed.
    Socket(io::Error),
}

impl Anchor {
    /// Binds the listen socket; returns the anchor and a handle to stop it.
    pub fn bind(config: Config) -> io::Result<(Self, Handle)> {
        let poll = Poll::new()?;
        let mut listen = UdpSocket::bind(config.listen)?;
        poll.registry()
            .register(&mut listen, LISTEN, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let stop = Arc::new(AtomicBool::new(false));
        let table = Arc::default();
        let mut anchor = Self {
            poll,
            listen,
            players: Slab::new(),
            by_addr: HashMap::new(),
            rx: RecvBatch::new(BATCH, MAX_DATAGRAM),
            answers: RecvBatch::new(BATCH, MAX_DATAGRAM),
            tx: SendBatch::new(BATCH),
            tally: Tally::default(),
            stop: stop.clone(),
            limit: config.max_players,
            logs: Logs::default(),
            table: Arc::clone(&table),
            table_changed: false,
            config,
        };
        anchor.take_over()?;
        Ok((anchor, Handle { stop, waker, table }))
    }

    /// Opens each carried player's socket on the port the game knew it by: the game, moved
    /// here, sees the same peer for each. A port taken here fails the whole (the pad then
    /// refuses the game rather than let it take players for strangers).
    fn take_over(&mut self) -> io::Result<()> {
        let now = Instant::now();
        for c in std::mem::take(&mut self.config.carried) {
            let key = open_player(
                &self.poll,
                &mut self.players,
                usize::MAX,
                self.config.game,
                Some(c.port),
                c.player,
                c.carrier,
                now,
            )
            .map_err(|e| match e {
                Refused::Socket(e) => io::Error::new(
                    e.kind(),
                    format!("the port {} the game knew {} by: {e}", c.port, c.player),
                ),
                Refused::Full => io::Error::other("player table full"),
            })?;
            self.by_addr.insert(c.player, key);
        }
        self.table_changed = true;
        self.publish_table();
        Ok(())
    }

    /// Rewrites what [`Handle::players`] reads, when the table changed.
    fn publish_table(&mut self) {
        if !self.table_changed {
            return;
        }
        self.table_changed = false;
        let now: Vec<spotable_migrate_wire::AnchoredPlayer> = self
            .players
            .iter()
            .filter_map(|(_, p)| {
                Some(spotable_migrate_wire::AnchoredPlayer {
                    player: p.addr,
                    port: p.socket.local_addr().ok()?.port(),
                    carrier: p.carrier,
                })
            })
            .collect();
        *self
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = now;
    }

    /// The bound listen address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listen.local_addr()
    }

    /// Runs until stopped.
    pub fn run(mut self) -> io::Result<()> {
        describe(self.config.max_players);
        self.refresh_limit();
        if self.config.trust.is_empty() {
            tracing::error!(
                "anchor: no --trust: every datagram is dropped until the proxies' network is \
                 trusted (e.g. --trust 10.0.0.0/8)"
            );
        }
        let mut events = Events::with_capacity(256);
        let mut next_tick = Instant::now() + TICK;
        let mut pending: Vec<Token> = Vec::new();
        let mut ready: Vec<Token> = Vec::new();
        while !self.stop.load(Ordering::Acquire) {
            let timeout = if pending.is_empty() {
                next_tick.saturating_duration_since(Instant::now())
            } else {
                Duration::ZERO
            };
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            ready.clear();
            ready.extend(events.iter().map(|e| e.token()));
            ready.append(&mut pending);
            ready.sort_unstable();
            ready.dedup();
            let now = Instant::now();
            for &token in &ready {
                let more = match token {
                    WAKER => false,
                    LISTEN => self.on_listen(now),
                    Token(t) => self.on_game(t - FIRST_PLAYER),
                };
                if more {
                    pending.push(token);
                }
            }
            self.publish_table();
            if now >= next_tick {
                self.expire(now);
                self.refresh_limit();
                self.tally.flush(self.players.len());
                next_tick = now + TICK;
            }
        }
        self.tally.flush(self.players.len());
        Ok(())
    }

    /// Reads datagrams from proxies; true when data may remain.
    fn on_listen(&mut self, now: Instant) -> bool {
        for _ in 0..BATCHES_PER_TURN {
            let n = match self.rx.recv(self.listen.as_raw_fd(), 0) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) => {
                    tracing::debug!(error = %e, "anchor: receive failed");
                    return false;
                }
            };
            for i in 0..n {
                let d = self.rx.get(i);
                let Some(from) = d.from else { continue };
                if d.truncated {
                    self.tally
                        .drop(Drop::Header(HeaderError::Length(d.payload.len())), 1);
                    continue;
                }
                let (player, at) = match classify(&self.config.trust, from, d.payload) {
                    Ok(p) => p,
                    Err(why) => {
                        self.tally.drop(why, 1);
                        if why == Drop::Untrusted
                            && let Some(held) = self.logs.untrusted.hit(now)
                        {
                            tracing::warn!(%from, held, "anchor: datagram from an untrusted source dropped (see --trust)");
                        }
                        continue;
                    }
                };
                let key = match self.by_addr.get(&player) {
                    Some(&k) => k,
                    None => match open_player(
                        &self.poll,
                        &mut self.players,
                        self.limit,
                        self.config.game,
                        None,
                        player,
                        from,
                        now,
                    ) {
                        Ok(k) => {
                            self.by_addr.insert(player, k);
                            self.table_changed = true;
                            tracing::debug!(%player, "anchor: new player");
                            k
                        }
                        Err(Refused::Full) => {
                            self.tally.drop(Drop::TableFull, 1);
                            if let Some(held) = self.logs.table_full.hit(now) {
                                tracing::warn!(
                                    limit = self.limit,
                                    max_players = self.config.max_players,
                                    held,
                                    "anchor: player table full; a new player was dropped"
                                );
                            }
                            continue;
                        }
                        Err(Refused::Socket(e)) => {
                            self.tally.drop(Drop::SocketError, 1);
                            if let Some(held) = self.logs.socket.hit(now) {
                                tracing::warn!(error = %e, held, "anchor: cannot open a socket for a new player");
                            }
                            continue;
                        }
                    },
                };
                let p = &mut self.players[key];
                if p.carrier != from {
                    p.carrier = from;
                    self.table_changed = true;
                }
                p.last = now;
                match p.socket.send(&d.payload[at..]) {
                    Ok(_) => self.tally.to_game += 1,
                    Err(_) => self.tally.drop(Drop::SendFailed, 1),
                }
            }
            if n < BATCH {
                return false;
            }
        }
        true
    }

    /// Reads the game's answers to one player and sends them to its carrier in one batch;
    /// true when data may remain.
    fn on_game(&mut self, key: usize) -> bool {
        for _ in 0..BATCHES_PER_TURN {
            let Some(p) = self.players.get(key) else {
                return false;
            };
            let n = match self.answers.recv(p.socket.as_raw_fd(), 0) {
                Ok(n) => n,
                // ICMP errors (the game restarting) and would-block alike: read on later.
                Err(_) => return false,
            };
            let carrier = p.carrier;
            let answers = &self.answers;
            let out = self.tx.send_all(
                self.listen.as_raw_fd(),
                (0..n).map(|i| (answers.get(i).payload, carrier)),
                self.config.listen.is_ipv6(),
            );
            self.tally.to_proxy += out.sent;
            self.tally.drop(Drop::SendFailed, out.failed);
            if n < BATCH {
                return false;
            }
        }
        true
    }

    /// Caps the player limit by the open-file limit, which may change at run time (the
    /// wrapper raises it once the game has started with the one it was given).
    fn refresh_limit(&mut self) {
        let max = self.config.max_players;
        let Some((soft, hard)) = fds::limits() else {
            return;
        };
        let limit = fds::budget(max, soft, fds::FD_RESERVE);
        if limit != self.limit {
            if fds::budget(max, hard, fds::FD_RESERVE) < max {
                tracing::warn!(
                    max_players = max,
                    fd_limit = hard,
                    limit,
                    "anchor: --max-players does not fit the open-file limit; players capped \
                     (raise the container's nofile hard limit to allow more)"
                );
            } else {
                tracing::info!(limit, fd_limit = soft, "anchor: player limit");
            }
            self.limit = limit;
        }
        metrics::gauge!(names::PLAYER_LIMIT).set(limit as f64);
    }

    fn expire(&mut self, now: Instant) {
        let timeout = self.config.idle_timeout;
        let gone: Vec<usize> = self
            .players
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.last) >= timeout)
            .map(|(k, _)| k)
            .collect();
        for k in gone {
            let mut p = self.players.remove(k);
            let _ = self.poll.registry().deregister(&mut p.socket);
            self.by_addr.remove(&p.addr);
            self.tally.expired += 1;
            self.table_changed = true;
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn open_player(
    poll: &Poll,
    players: &mut Slab<Player>,
    limit: usize,
    game: SocketAddr,
    port: Option<u16>,
    addr: SocketAddr,
    carrier: SocketAddr,
    now: Instant,
) -> Result<usize, Refused> {
    if players.len() >= limit {
        return Err(Refused::Full);
    }
    let port = port.unwrap_or(0);
    let any: SocketAddr = match game {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, port).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, port).into(),
    };
    let open = || -> io::Result<UdpSocket> {
        let socket = UdpSocket::bind(any)?;
        socket.connect(game)?;
        Ok(socket)
    };
    let mut socket = open().map_err(Refused::Socket)?;
    let entry = players.vacant_entry();
    let key = entry.key();
    poll.registry()
        .register(&mut socket, Token(key + FIRST_PLAYER), Interest::READABLE)
        .map_err(Refused::Socket)?;
    entry.insert(Player {
        addr,
        socket,
        carrier,
        last: now,
    });
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_trusted_sources_with_a_player_header_pass() {
        let trust = nets(&["10.0.0.0/8", "fd00::/8"]);
        let mut h = [0u8; proxy_header::MAX_ENCODED];
        let n = proxy_header::encode(addr("192.0.2.7:4000"), addr("10.1.1.1:7777"), &mut h);
        let mut datagram = h[..n].to_vec();
        datagram.extend_from_slice(b"move");
        assert_eq!(
            classify(&trust, addr("10.2.3.4:55000"), &datagram),
            Ok((addr("192.0.2.7:4000"), n))
        );
        // The same bytes from the internet, or from an IPv4-mapped untrusted source.
        assert_eq!(
            classify(&trust, addr("192.0.2.7:4000"), &datagram),
            Err(Drop::Untrusted)
        );
        assert_eq!(
            classify(&trust, addr("[::ffff:192.0.2.9]:1"), &datagram),
            Err(Drop::Untrusted)
        );
        assert!(classify(&trust, addr("[::ffff:10.0.0.9]:1"), &datagram).is_ok());
        assert!(classify(&trust, addr("[fd00::9]:1"), &datagram).is_ok());
        // Nothing is trusted by default.
        assert_eq!(
            classify(&[], addr("10.2.3.4:55000"), &datagram),
            Err(Drop::Untrusted)
        );
        // A trusted source without a header, or with a LOCAL one.
        assert_eq!(
            classify(&trust, addr("10.2.3.4:1"), b"move"),
            Err(Drop::Header(HeaderError::Signature))
        );
        let mut local = datagram.clone();
        local[12] = 0x20;
        assert_eq!(
            classify(&trust, addr("10.2.3.4:1"), &local),
            Err(Drop::NoPlayer)
        );
    }
}
