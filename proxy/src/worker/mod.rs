//! One data-plane thread: its own poll, its own front sockets, its own sessions.
//!
//! `SO_REUSEPORT` hashes each client's 4-tuple to one socket of the group, so a client always
//! lands on the same worker. Sessions are therefore worker-local and the hot path takes no lock.
//!
//! The worker's logic (batching, pending sockets, connect switching, delivery, ticks) is generic
//! over [`Net`]: the kernel's sockets in production ([`Sockets`]), an in-memory network driven
//! with simulated time in this module's unit tests.

mod sockets;

#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mio::Token;

pub(crate) use sockets::{Front, Sockets};

use crate::loglimit::LogLimit;
use crate::proxy_header::{self, ReplicaHeader};
use crate::server::Shared;
use crate::session::{
    AnswerVerdict, ClientVerdict, CloseReason, Closed, DropReason, ListenerId, RateLimited,
    SessionId, SessionTable,
};
use crate::stats::{self, UpstreamError};
use crate::transit::Direction;
use crate::udp::{MAX_UDP_PAYLOAD, RecvBatch, SendOutcome};

const WAKER: Token = Token(0);
const FRONT_BASE: usize = 1;
const SESSION_BASE: usize = 1 << 16;
/// Error readiness of session sockets (ICMP reports queued), read before their answers.
const ERROR_BASE: usize = 1 << 40;
/// Client datagrams taken per `recvmmsg`.
const FRONT_BATCH: usize = 32;
/// Replica answers buffered before they are delivered in one `sendmmsg` per listener.
const ANSWER_ARENA: usize = 64;
/// Batches read from one socket before giving the others a turn.
const BATCHES_PER_TURN: usize = 8;
/// Session expiry and metric flush period.
const TICK: Duration = Duration::from_millis(100);
/// Lines about single clients or sessions written per event before the rest are summed up.
const CLIENT_LINES: usize = 10;

/// The token of front socket `listener`.
fn front_token(listener: usize) -> Token {
    Token(FRONT_BASE + listener)
}

/// The token of session `id`'s upstream socket.
fn session_token(id: SessionId) -> Token {
    Token(SESSION_BASE + id)
}

/// The token of errors queued on session `id`'s upstream socket.
fn error_token(id: SessionId) -> Token {
    Token(ERROR_BASE + id)
}

/// Test hook: `SPOTABLE_TEST_FAULT=worker-panic-after-ms=N` makes worker 0 panic N ms after
/// it starts, so tests can watch the process notice a dead worker. Unset in production.
pub(crate) fn injected_fault() -> Option<Duration> {
    let spec = std::env::var("SPOTABLE_TEST_FAULT").ok()?;
    let ms = spec.strip_prefix("worker-panic-after-ms=")?.parse().ok()?;
    Some(Duration::from_millis(ms))
}

/// What the worker's logic asks of the network. Every call is non-blocking; readiness comes
/// back to [`Worker::turn`] as tokens ([`front_token`], [`session_token`], `WAKER`).
pub(crate) trait Net {
    /// A session's own upstream socket.
    type Upstream: std::fmt::Debug;

    /// How many front sockets (listeners) this worker reads.
    fn listeners(&self) -> usize;
    /// The realtime clock, as the kernel stamps received datagrams (since the Unix epoch).
    fn clock(&self) -> Duration;
    /// The address front `listener` is bound to (for replica headers).
    fn listen_addr(&self, listener: usize) -> SocketAddr;
    /// Reads client datagrams from front `listener` into slots `start..` of `batch`.
    fn recv_front(
        &mut self,
        listener: usize,
        batch: &mut RecvBatch,
        start: usize,
    ) -> io::Result<usize>;
    /// Sends `(answer, client)` pairs from front `listener`.
    fn send_front<'a>(
        &mut self,
        listener: usize,
        items: impl IntoIterator<Item = (&'a [u8], SocketAddr)>,
    ) -> SendOutcome;
    /// A socket of its own for session `id`, on an ephemeral port (IPv6 dual-stack when
    /// `v6`); its readiness is reported as `session_token(id)`.
    fn open(&mut self, id: SessionId, v6: bool) -> io::Result<Self::Upstream>;
    /// Closes a session's socket.
    fn close(&mut self, socket: Self::Upstream);
    /// Drains the ICMP reports queued on a session's socket (each tied to the replica address
    /// the provoking datagram went to) into `out`; their readiness is `error_token(id)`.
    fn errors(
        &mut self,
        socket: &Self::Upstream,
        out: &mut Vec<crate::udp::SendError>,
    ) -> io::Result<usize>;
    /// Reads replica answers into slots `start..` of `batch`.
    fn recv(
        &mut self,
        socket: &Self::Upstream,
        batch: &mut RecvBatch,
        start: usize,
    ) -> io::Result<usize>;
    /// Associates the socket with one replica (it then hears only that one).
    fn connect(&mut self, socket: &Self::Upstream, to: SocketAddr) -> io::Result<()>;
    /// Dissolves the association; the port stays.
    fn disconnect(&mut self, socket: &Self::Upstream) -> io::Result<()>;
    /// Sends on a connected socket.
    fn send(&mut self, socket: &Self::Upstream, payload: &[u8]) -> io::Result<usize>;
    /// Sends one payload to every target.
    fn fan_out(
        &mut self,
        socket: &Self::Upstream,
        payload: &[u8],
        targets: &[SocketAddr],
    ) -> SendOutcome;
}

/// Data-path warnings, each at most one line per interval.
#[derive(Debug, Default)]
struct Logs {
    socket: LogLimit,
    front_receive: LogLimit,
    upstream_receive: LogLimit,
    disconnect: LogLimit,
    session_limit: LogLimit,
    unknown_token: LogLimit,
    game_session_limit: LogLimit,
    game_rate_limited: LogLimit,
    forwarding_loop: LogLimit,
    unreachable: LogLimit,
}

impl Logs {
    /// The drops an operator must hear of, not only count: a full table turns players away,
    /// unknown tokens mean a matchmaker and the proxies disagree about the games, and a game
    /// held to its limits is flooded or was given too little.
    fn dropped(&mut self, reason: DropReason, client: SocketAddr, now: Instant) {
        let (limit, what) = match reason {
            DropReason::SessionLimit => (
                &mut self.session_limit,
                "session limit reached: a new client was turned away (--max-sessions)",
            ),
            DropReason::UnknownToken => (
                &mut self.unknown_token,
                "a datagram without a known game token was dropped",
            ),
            DropReason::GameSessionLimit => (
                &mut self.game_session_limit,
                "a game at its max_sessions turned a new client away (see /games)",
            ),
            DropReason::Loop => (
                &mut self.forwarding_loop,
                "a datagram a Spotable proxy sent to a replica came back as a player's and was \
                 dropped: some replica address leads to a proxy (this one or another)",
            ),
            DropReason::GameRateLimited => (
                &mut self.game_rate_limited,
                "a game's players are over its max_pps: datagrams dropped (see /games)",
            ),
            _ => return,
        };
        if let Some(held) = limit.hit(now) {
            tracing::warn!(%client, held, "{what}");
        }
    }
}

#[derive(Debug)]
struct Upstream<S> {
    socket: S,
    v6: bool,
    /// The one replica the socket is connected to, while the session has exactly one. A
    /// connected socket sends on a cached route with no address to copy in: the common
    /// fan-out-1 path costs what a plain UDP proxy's does.
    connected: Option<SocketAddr>,
}

/// Sends `payload` to `targets`: on the connected socket when there is one target, otherwise
/// one batch to all (disconnecting first, so every replica's answers are received again).
fn send_upstream<N: Net>(
    net: &mut N,
    up: &mut Upstream<N::Upstream>,
    payload: &[u8],
    targets: &[SocketAddr],
    logs: &mut Logs,
    now: Instant,
) -> SendOutcome {
    if let [only] = targets
        && (up.v6 == only.is_ipv6())
    {
        if up.connected != Some(*only) && net.connect(&up.socket, *only).is_ok() {
            up.connected = Some(*only);
        }
        if up.connected == Some(*only) {
            return match net.send(&up.socket, payload) {
                Ok(n) => SendOutcome {
                    sent: 1,
                    bytes: n as u64,
                    failed: 0,
                },
                Err(_) => SendOutcome {
                    sent: 0,
                    bytes: 0,
                    failed: 1,
                },
            };
        }
    }
    if up.connected.is_some() {
        if let Err(e) = net.disconnect(&up.socket)
            && let Some(held) = logs.disconnect.hit(now)
        {
            tracing::warn!(error = %e, held, "cannot disconnect an upstream socket");
        }
        up.connected = None;
    }
    net.fan_out(&up.socket, payload, targets)
}

#[derive(Debug, Clone, Copy)]
struct Delivery {
    listener: ListenerId,
    client: SocketAddr,
    slot: usize,
}

/// One worker's state and logic, over its network `N`.
#[derive(Debug)]
pub(crate) struct Worker<N: Net> {
    net: N,
    ready: Vec<Token>,
    pending: Vec<Token>,
    upstreams: Vec<Option<Upstream<N::Upstream>>>,
    table: SessionTable,
    front_rx: RecvBatch,
    answers: RecvBatch,
    answers_used: usize,
    deliveries: Vec<Delivery>,
    local: stats::Local,
    sink: stats::Sink,
    shared: Arc<Shared>,
    /// The replica-set version this worker's sessions follow, for [`crate::Proxy`] to report.
    applied: Arc<AtomicU64>,
    closed: Vec<Closed>,
    limited: Vec<RateLimited>,
    logs: Logs,
    /// When the injected fault fires (tests only).
    fault_at: Option<Instant>,
    next_tick: Instant,
    /// A replica header and the datagram it goes before.
    scratch: Vec<u8>,
    /// Answers per replica since the last tick.
    per_replica: crate::replica_stats::Tally,
    /// Time in the proxy since the last tick.
    transit: crate::transit::Local,
    /// Receive times of the client datagrams of the batch being forwarded.
    forwarded_at: Vec<Duration>,
    /// The realtime clock at the start of this turn: a datagram's receive time when the
    /// kernel gave none (kernel timestamps are off by default: they cost throughput).
    turn_clock: Duration,
    /// The replica-set version whose replicas were last registered as seen.
    per_replica_version: u64,
    /// Games newly seen to diverge, due in the log.
    divergent: Vec<Arc<str>>,
    /// ICMP reports read from a session's socket.
    reports: Vec<crate::udp::SendError>,
}

impl<N: Net> Worker<N> {
    /// A worker over `net`, started at `now`.
    pub(crate) fn new(
        net: N,
        table: SessionTable,
        max_datagram: usize,
        shared: Arc<Shared>,
        applied: Arc<AtomicU64>,
        fault_at: Option<Instant>,
        now: Instant,
    ) -> Self {
        applied.store(table.snapshot().version, Ordering::Release);
        // Replicas are silent from when they join: the first set, from the start.
        shared.replica_stats.seen(table.snapshot(), now);
        let per_replica_version = table.snapshot().version;
        Self {
            net,
            ready: Vec::with_capacity(1024),
            pending: Vec::new(),
            upstreams: Vec::new(),
            table,
            // One byte more than accepted, so an oversized datagram shows as such.
            front_rx: RecvBatch::new(FRONT_BATCH, max_datagram.saturating_add(1)),
            answers: RecvBatch::new(ANSWER_ARENA, MAX_UDP_PAYLOAD + 1),
            answers_used: 0,
            deliveries: Vec::with_capacity(ANSWER_ARENA),
            local: stats::Local::default(),
            sink: stats::Sink::new(),
            shared,
            applied,
            closed: Vec::new(),
            limited: Vec::new(),
            logs: Logs::default(),
            fault_at,
            next_tick: now + TICK,
            scratch: Vec::with_capacity(proxy_header::MAX_ENCODED + max_datagram),
            per_replica: crate::replica_stats::Tally::default(),
            per_replica_version,
            transit: crate::transit::Local::default(),
            forwarded_at: Vec::with_capacity(FRONT_BATCH),
            turn_clock: Duration::ZERO,
            divergent: Vec::new(),
            reports: Vec::new(),
        }
    }

    /// When the worker must run again if nothing becomes ready: at the next tick, or `None`
    /// (at once) while sockets are left pending with data not yet read.
    pub(crate) fn wake_at(&self) -> Option<Instant> {
        self.pending.is_empty().then_some(self.next_tick)
    }

    /// One pass: handles the sockets in `ready` and those left pending by the last pass,
    /// delivers the answers read, and ticks when a tick is due.
    pub(crate) fn turn(&mut self, ready: &[Token], now: Instant) {
        self.turn_clock = self.net.clock();
        self.ready.clear();
        self.ready.extend_from_slice(ready);
        self.ready.append(&mut self.pending);
        for i in 0..self.ready.len() {
            let token = self.ready[i];
            let drained = match token {
                WAKER => {
                    self.on_wake(now);
                    true
                }
                Token(t) if t >= ERROR_BASE => {
                    self.on_errors(t - ERROR_BASE, now);
                    true
                }
                Token(t) if t >= SESSION_BASE => self.on_upstream(t - SESSION_BASE, now),
                Token(t) => self.on_front(t - FRONT_BASE, now),
            };
            if !drained && !self.pending.contains(&token) {
                self.pending.push(token);
            }
        }
        self.flush_deliveries();
        if now >= self.next_tick {
            self.tick(now);
            self.next_tick = now + TICK;
        }
    }

    fn on_wake(&mut self, now: Instant) {
        let snapshot = self.shared.replicas.snapshot();
        let version = snapshot.version;
        if version == self.table.snapshot().version {
            return;
        }
        self.closed.clear();
        let moves = snapshot.moves.clone();
        let report = self.table.apply(snapshot, now, &mut self.closed);
        self.close_sockets();
        if !moves.is_empty() {
            self.follow_moves(&moves, now);
        }
        self.applied.store(version, Ordering::Release);
        self.local.failovers += report.failovers;
        self.local.late_joins += report.late_joins;
        self.local.degraded += report.degraded;
        if report.degraded > 0 {
            tracing::warn!(
                sessions = report.degraded,
                "sessions lost a replica and run with less redundancy"
            );
        }
    }

    /// Points sockets connected to a replica that moved at its new address now, not at the
    /// player's next datagram: a connected socket takes datagrams only from its peer, and a
    /// moved game that speaks first would otherwise be unheard until then.
    fn follow_moves(&mut self, moves: &[crate::replicas::Move], now: Instant) {
        for up in self.upstreams.iter_mut().flatten() {
            let Some(to) = up
                .connected
                .and_then(|c| moves.iter().find(|m| m.from == c))
                .map(|m| m.to)
            else {
                continue;
            };
            if up.v6 == to.is_ipv6() && self.net.connect(&up.socket, to).is_ok() {
                up.connected = Some(to);
                continue;
            }
            // Not reconnectable here: unconnected, it hears everyone until the next send.
            if let Err(e) = self.net.disconnect(&up.socket)
                && let Some(held) = self.logs.disconnect.hit(now)
            {
                tracing::warn!(error = %e, held, "cannot disconnect an upstream socket");
            }
            up.connected = None;
        }
    }

    /// Reads client datagrams; false when the socket still had data after our turn.
    fn on_front(&mut self, listener: usize, now: Instant) -> bool {
        if listener >= self.net.listeners() {
            return true;
        }
        for _ in 0..BATCHES_PER_TURN {
            let n = match self.net.recv_front(listener, &mut self.front_rx, 0) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) => {
                    if let Some(held) = self.logs.front_receive.hit(now) {
                        tracing::warn!(error = %e, held, "receive from clients failed");
                    }
                    return true;
                }
            };
            self.forwarded_at.clear();
            for i in 0..n {
                if self.on_client(listener as ListenerId, i, now) {
                    let at = self.front_rx.received(i).unwrap_or(self.turn_clock);
                    self.forwarded_at.push(at);
                }
            }
            // One clock read per batch: each datagram counts until the batch's last send.
            if !self.forwarded_at.is_empty() {
                let sent = self.net.clock();
                for &at in &self.forwarded_at {
                    self.transit.record(Direction::ToReplicas, at, sent);
                }
            }
            if n < self.front_rx.capacity() {
                return true;
            }
        }
        false
    }

    /// Handles client datagram `i` of the front batch; true when it was sent on.
    fn on_client(&mut self, listener: ListenerId, i: usize, now: Instant) -> bool {
        let d = self.front_rx.get(i);
        self.local.client_packets += 1;
        self.local.client_bytes += d.payload.len() as u64;
        let Some(client) = d.from else {
            return false;
        };
        // A proxy's own datagram to a replica, back as a player's: serving it would start a
        // loop through every proxy on the way.
        if self.front_rx.tos(i).is_some_and(crate::marker::is_marked) {
            self.local.drop(DropReason::Loop, 1);
            self.logs.dropped(DropReason::Loop, client, now);
            return false;
        }
        let verdict = self
            .table
            .on_datagram(listener, client, d.payload, d.truncated, now);
        let (id, opened, targets, body, header) = match verdict {
            ClientVerdict::Forward {
                id,
                opened,
                targets,
                body,
                header,
            } => (id, opened, targets, body, header),
            ClientVerdict::Drop(reason) => {
                self.local.drop(reason, 1);
                self.logs.dropped(reason, client, now);
                return false;
            }
        };
        if opened {
            let v6 = targets.iter().any(SocketAddr::is_ipv6);
            match self.net.open(id, v6) {
                Ok(socket) => {
                    if self.upstreams.len() <= id {
                        self.upstreams.resize_with(id + 1, || None);
                    }
                    self.upstreams[id] = Some(Upstream {
                        socket,
                        v6,
                        connected: None,
                    });
                    self.local.sessions_opened += 1;
                    tracing::debug!(%client, session = id, "session opened");
                }
                Err(e) => {
                    if let Some(held) = self.logs.socket.hit(now) {
                        tracing::warn!(
                            %client, error = %e, held,
                            "cannot open upstream socket; datagram dropped"
                        );
                    }
                    self.table.close(id);
                    self.local.drop(DropReason::SocketError, 1);
                    return false;
                }
            }
        }
        let Some(up) = self.upstreams.get_mut(id).and_then(Option::as_mut) else {
            self.local.drop(DropReason::SocketError, 1);
            return false;
        };
        let mut payload = d.payload.get(body).unwrap_or_default();
        if let Some(ReplicaHeader::ProxyV2) = header {
            // Header and body in one buffer: one copy of the datagram, no allocation (the
            // scratch buffer is the worker's, sized once).
            let mut h = [0u8; proxy_header::MAX_ENCODED];
            let n =
                proxy_header::encode(client, self.net.listen_addr(usize::from(listener)), &mut h);
            self.scratch.clear();
            self.scratch.extend_from_slice(&h[..n]);
            self.scratch.extend_from_slice(payload);
            payload = &self.scratch;
        }
        let out = send_upstream(&mut self.net, up, payload, targets, &mut self.logs, now);
        self.local.upstream_packets += out.sent;
        self.local.upstream_bytes += out.bytes;
        self.local.drop(DropReason::SendFailed, out.failed);
        out.sent > 0
    }

    /// Reads a session's replica answers; false when data remained after our turn.
    fn on_upstream(&mut self, id: SessionId, now: Instant) -> bool {
        for _ in 0..BATCHES_PER_TURN {
            if self.answers_used == self.answers.capacity() {
                self.flush_deliveries();
            }
            let Some(up) = self.upstreams.get(id).and_then(Option::as_ref) else {
                return true;
            };
            let start = self.answers_used;
            let n = match self.net.recv(&up.socket, &mut self.answers, start) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) => {
                    // A replica's or the network's ICMP report comes here too, its details in
                    // the error queue (read them first); answers may still be queued behind
                    // it (edge-triggered: read on). Anything else ends this turn.
                    let kind = UpstreamError::of(&e);
                    if kind.is_report() {
                        if self.on_errors(id, now) == 0 {
                            self.local.upstream_error(kind);
                        }
                        continue;
                    }
                    self.local.upstream_error(kind);
                    if let Some(held) = self.logs.upstream_receive.hit(now) {
                        tracing::warn!(session = id, error = %e, held, "receive from replicas failed");
                    }
                    return true;
                }
            };
            self.answers_used += n;
            for slot in start..start + n {
                let d = self.answers.get(slot);
                self.local.replica_packets += 1;
                self.local.replica_bytes += d.payload.len() as u64;
                let Some(from) = d.from else { continue };
                if d.truncated {
                    self.local.drop(DropReason::Oversized, 1);
                    continue;
                }
                match self.table.on_answer(id, from, d.payload, now) {
                    AnswerVerdict::Deliver {
                        listener,
                        client,
                        failover,
                    } => {
                        self.per_replica.answer(from, true, None, now);
                        if failover {
                            self.local.failovers += 1;
                        }
                        self.deliveries.push(Delivery {
                            listener,
                            client,
                            slot,
                        });
                    }
                    AnswerVerdict::Duplicate { behind } => {
                        self.per_replica.answer(from, false, behind, now);
                        self.local.duplicates += 1;
                    }
                    AnswerVerdict::Drop(reason) => self.local.drop(reason, 1),
                }
            }
            if start + n < self.answers.capacity() {
                return true;
            }
        }
        false
    }

    /// Reads the ICMP reports queued on session `id`'s socket and acts on them: a replica whose
    /// port or host is unreachable leaves the session at once (see
    /// [`SessionTable::on_unreachable`]). Returns how many reports were read.
    fn on_errors(&mut self, id: SessionId, now: Instant) -> usize {
        let Some(up) = self.upstreams.get(id).and_then(Option::as_ref) else {
            return 0;
        };
        self.reports.clear();
        if let Err(e) = self.net.errors(&up.socket, &mut self.reports) {
            if let Some(held) = self.logs.upstream_receive.hit(now) {
                tracing::warn!(session = id, error = %e, held, "reading ICMP reports failed");
            }
            return 0;
        }
        let n = self.reports.len();
        for i in 0..n {
            let report = self.reports[i];
            let kind = UpstreamError::of_errno(report.errno);
            self.local.upstream_error(kind);
            if !matches!(
                kind,
                UpstreamError::Refused | UpstreamError::HostUnreachable
            ) {
                continue;
            }
            let out = self.table.on_unreachable(id, report.to, now);
            if out.failover {
                self.local.failovers += 1;
            }
            if let Some(closed) = out.closed {
                if let Some(held) = self.logs.unreachable.hit(now) {
                    tracing::info!(
                        client = %closed.client,
                        replica = %report.to,
                        held,
                        "session closed: its last replica is unreachable; the player's next \
                         datagram opens a new session"
                    );
                }
                self.closed.clear();
                self.closed.push(closed);
                self.close_sockets();
                break;
            }
        }
        n
    }

    /// Sends buffered answers to their clients, one batch per listener.
    fn flush_deliveries(&mut self) {
        if !self.deliveries.is_empty() {
            for l in 0..self.net.listeners() {
                let answers = &self.answers;
                let items = self
                    .deliveries
                    .iter()
                    .filter(|d| usize::from(d.listener) == l)
                    .map(|d| (answers.get(d.slot).payload, d.client));
                let out = self.net.send_front(l, items);
                self.local.delivered_packets += out.sent;
                self.local.delivered_bytes += out.bytes;
                self.local.drop(DropReason::SendFailed, out.failed);
            }
            let sent = self.net.clock();
            for d in &self.deliveries {
                let at = self.answers.received(d.slot).unwrap_or(self.turn_clock);
                self.transit.record(Direction::ToClients, at, sent);
            }
            self.deliveries.clear();
        }
        self.answers_used = 0;
    }

    fn tick(&mut self, now: Instant) {
        self.closed.clear();
        self.table.expire(now, &mut self.closed);
        self.close_sockets();
        self.limited.clear();
        self.table.rate_limited(now, &mut self.limited);
        self.local.rate_limited_clients += self.limited.len() as u64;
        for r in self.limited.iter().take(CLIENT_LINES) {
            tracing::warn!(client = %r.client, dropped = r.dropped, "client over its packet rate");
        }
        if let Some(more) = self
            .limited
            .len()
            .checked_sub(CLIENT_LINES)
            .filter(|&n| n > 0)
        {
            tracing::warn!(clients = more, "more clients over their packet rate");
        }
        self.local.evictions += self.table.take_evictions();
        self.local.resyncs += self.table.take_resyncs();
        self.table.review(now);
        self.divergent.clear();
        self.table.take_divergent(&mut self.divergent);
        for game in &self.divergent {
            let game = if game.is_empty() {
                "(the only game)"
            } else {
                game
            };
            tracing::warn!(
                game,
                "this game's replicas answer in two worlds (not byte for byte alike, or not \
                 numbered alike): its sessions deliver one replica's answers, and new sessions \
                 start as `primary` until every replica has been replaced"
            );
        }
        self.sink.flush(&mut self.local);
        self.table.flush_games();
        let snapshot = self.table.snapshot();
        if snapshot.version != self.per_replica_version {
            self.per_replica_version = snapshot.version;
            self.shared.replica_stats.seen(snapshot, now);
        }
        self.shared.replica_stats.flush(&mut self.per_replica);
        self.shared
            .replica_stats
            .passed_over(self.table.unresponsive(), now);
        self.shared
            .replica_stats
            .unreachable(self.table.unreachable(now), now);
        self.shared.transit.flush(&mut self.transit);
        if self.fault_at.is_some_and(|at| now >= at) {
            panic!("injected fault (SPOTABLE_TEST_FAULT)");
        }
    }

    /// Closes the sockets of the sessions in `self.closed`; counts and tells why.
    fn close_sockets(&mut self) {
        let mut told = 0;
        for c in &self.closed {
            if let Some(up) = self.upstreams.get_mut(c.id).and_then(Option::take) {
                self.net.close(up.socket);
            }
            self.local.closed(c.reason);
            match c.reason {
                CloseReason::Idle => {
                    self.local.sessions_expired += 1;
                    tracing::debug!(client = %c.client, session = c.id, "session expired");
                }
                CloseReason::NoReplicas if told < CLIENT_LINES => {
                    told += 1;
                    tracing::info!(
                        client = %c.client,
                        "session closed: its last replica left; the player's next datagram \
                         opens a new session"
                    );
                }
                CloseReason::FromReplica if told < CLIENT_LINES => {
                    told += 1;
                    tracing::info!(client = %c.client, "session closed: its client is now a replica");
                }
                _ => {}
            }
        }
        let untold = self
            .closed
            .iter()
            // Idle closes are routine; unreachable ones are logged where they happen.
            .filter(|c| !matches!(c.reason, CloseReason::Idle | CloseReason::Unreachable))
            .count()
            .saturating_sub(told);
        if untold > 0 {
            tracing::info!(
                sessions = untold,
                "more sessions closed for the same reasons"
            );
        }
    }
}

impl Worker<Sockets> {
    /// Runs until shutdown is signalled; an error is the event loop failing.
    pub(crate) fn run(mut self) -> io::Result<()> {
        let mut ready = Vec::with_capacity(1024);
        while !self.shared.shutdown.load(Ordering::Acquire) {
            let timeout = self.wake_at().map_or(Duration::ZERO, |t| {
                t.saturating_duration_since(Instant::now())
            });
            if let Err(e) = self.net.wait(timeout, &mut ready) {
                self.sink.flush(&mut self.local);
                return Err(e);
            }
            self.turn(&ready, Instant::now());
        }
        self.sink.flush(&mut self.local);
        Ok(())
    }
}
