//! The session table: one session per (listener, client address, game).
//!
//! Sans-io: callers pass datagrams, addresses and `now`; the table answers with verdicts.
//! Opening and closing the session's upstream socket is the caller's job, keyed by the
//! [`SessionId`] the table hands out.
//!
//! Without token routing there is one implicit game: every replica of the snapshot. With it
//! ([`Settings::token`]), each datagram's token picks one of the snapshot's games, the token
//! is cut off, and the game's replicas and dedupe settings serve the session.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use slab::Slab;

use crate::dedupe::{Deduper, MAX_SLOTS, Mode, Slot, SlotState, Verdict};
use crate::proxy_header::ReplicaHeader;
use crate::ratelimit::{Limiter, Rate};
use crate::replicas::{GameCounters, GameTally, ReplicaState, Snapshot};
use crate::token::{TokenRouter, TokenSpec};

/// Dense id of a live session, stable for its lifetime (re-used after it closes).
pub type SessionId = usize;

/// Index of the listener (front address) a session came in on.
pub type ListenerId = u16;

/// Why a datagram was not passed on. Labels the `spotable_drops_total` metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Zero-length client datagram: no game protocol needs one.
    Empty,
    /// Larger than `max_datagram`.
    Oversized,
    /// The client exceeded its packet rate.
    RateLimited,
    /// The session table is full.
    SessionLimit,
    /// No replica to send to.
    NoReplicas,
    /// An answer from an address that is not a current replica of the session.
    NotReplica,
    /// An answer for a session that has closed.
    UnknownSession,
    /// `sequence` mode: number older than the replay window.
    StaleSequence,
    /// The kernel refused a send (buffer full, no route…).
    SendFailed,
    /// Could not open the session's upstream socket.
    SocketError,
    /// A client datagram from a current replica's address: serving it would open a session
    /// for the replica and loop the proxy's own traffic.
    FromReplica,
    /// Token routing: too short to carry a token, or a token no game owns.
    UnknownToken,
}

impl DropReason {
    /// Every reason, for pre-registering metrics.
    pub const ALL: [DropReason; 12] = [
        DropReason::Empty,
        DropReason::Oversized,
        DropReason::RateLimited,
        DropReason::SessionLimit,
        DropReason::NoReplicas,
        DropReason::NotReplica,
        DropReason::UnknownSession,
        DropReason::StaleSequence,
        DropReason::SendFailed,
        DropReason::SocketError,
        DropReason::FromReplica,
        DropReason::UnknownToken,
    ];

    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Empty => "empty",
            DropReason::Oversized => "oversized",
            DropReason::RateLimited => "rate_limited",
            DropReason::SessionLimit => "session_limit",
            DropReason::NoReplicas => "no_replicas",
            DropReason::NotReplica => "not_replica",
            DropReason::UnknownSession => "unknown_session",
            DropReason::StaleSequence => "stale_sequence",
            DropReason::SendFailed => "send_failed",
            DropReason::SocketError => "socket_error",
            DropReason::FromReplica => "from_replica",
            DropReason::UnknownToken => "unknown_token",
        }
    }
}

/// Why a session ended. Labels `spotable_sessions_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// No client datagram for the session timeout.
    Idle,
    /// Its last live replica left: the player's next datagram opens a fresh session.
    NoReplicas,
    /// The client's address became a replica's.
    FromReplica,
    /// Its upstream socket could not be opened or failed.
    SocketError,
}

impl CloseReason {
    /// Every reason, for pre-registering metrics.
    pub const ALL: [CloseReason; 4] = [
        CloseReason::Idle,
        CloseReason::NoReplicas,
        CloseReason::FromReplica,
        CloseReason::SocketError,
    ];

    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Idle => "idle",
            CloseReason::NoReplicas => "no_replicas",
            CloseReason::FromReplica => "from_replica",
            CloseReason::SocketError => "socket_error",
        }
    }
}

/// A session that the table closed; the caller closes its socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed {
    /// The session.
    pub id: SessionId,
    /// Its client.
    pub client: SocketAddr,
    /// Why it closed.
    pub reason: CloseReason,
}

/// Behaviour shared by every session of a proxy (or, for a game's own copy, of a game).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Dedupe algorithm and its parameters.
    pub mode: Mode,
    /// A session with no client datagram for this long is closed.
    pub session_timeout: Duration,
    /// Per-client packet rate limit; `None` for unlimited.
    pub rate: Option<Rate>,
    /// Largest client datagram accepted, in bytes.
    pub max_datagram: usize,
    /// Most replicas one session fans out to (≤ [`MAX_SLOTS`]).
    pub fanout: usize,
    /// Whether replicas that appear later join running sessions.
    pub late_join: bool,
    /// Token routing: the token every client datagram carries; `None` for one implicit game.
    pub token: Option<TokenSpec>,
    /// A header to put before every datagram sent to replicas (the player's identity).
    pub replica_header: Option<ReplicaHeader>,
}

/// The global session budget, shared by all workers' tables. One atomic touched per session
/// open and close, never per packet.
#[derive(Debug, Clone)]
pub struct Admission {
    in_use: Arc<AtomicUsize>,
    max: usize,
}

impl Admission {
    /// A budget of `max` sessions.
    pub fn new(max: usize) -> Self {
        Self {
            in_use: Arc::new(AtomicUsize::new(0)),
            max,
        }
    }

    fn try_acquire(&self) -> bool {
        self.in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok()
    }

    fn release(&self) {
        self.in_use.fetch_sub(1, Ordering::AcqRel);
    }

    /// Sessions open across all tables.
    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Acquire)
    }

    /// The live counter, for readers outside the data plane (metrics).
    pub fn counter(&self) -> Arc<AtomicUsize> {
        self.in_use.clone()
    }
}

/// The replicas of one session, by slot.
#[derive(Debug)]
pub struct Members {
    addrs: Vec<SocketAddr>,
    states: Vec<SlotState>,
    /// Live addresses, rebuilt on change so the send path only reads a slice.
    targets: Vec<SocketAddr>,
    /// How many replicas the session started with: its redundancy.
    wanted: usize,
}

impl Members {
    fn new(replicas: Vec<crate::replicas::Replica>, client: SocketAddr) -> Self {
        let mut m = Members {
            addrs: replicas.iter().map(|r| r.addr).collect(),
            states: replicas.iter().map(|r| slot_state(Some(r.state))).collect(),
            targets: Vec::new(),
            wanted: replicas.len(),
        };
        m.rebuild_targets(client);
        m
    }

    /// Fewer live members than the session started with.
    pub fn is_degraded(&self) -> bool {
        self.live() < self.wanted
    }

    /// Rebuilds the send list. A datagram is never sent back to its own source, whatever
    /// the replica set says: that is how a forwarding loop would start.
    fn rebuild_targets(&mut self, client: SocketAddr) {
        self.targets.clear();
        let live = self.addrs.iter().zip(&self.states);
        self.targets.extend(
            live.filter(|(a, s)| s.is_live() && **a != client)
                .map(|(a, _)| *a),
        );
    }

    /// The live slot holding `addr`.
    pub fn slot_of(&self, addr: SocketAddr) -> Option<Slot> {
        self.addrs
            .iter()
            .zip(&self.states)
            .position(|(a, s)| *a == addr && s.is_live())
    }

    /// Where each slot stands.
    pub fn states(&self) -> &[SlotState] {
        &self.states
    }

    /// Live replica addresses, in slot order.
    pub fn targets(&self) -> &[SocketAddr] {
        &self.targets
    }

    /// Brings the members in line with `snapshot`; returns whether anything changed and the
    /// slots that were (re)filled. A replica that comes back at its old address takes its
    /// slot back (a flap, a re-added endpoint). With `late_join`, free places are filled from
    /// `client`'s rendezvous ranking, up to `fanout`.
    fn apply(
        &mut self,
        snapshot: &Snapshot,
        settings: &Settings,
        client: SocketAddr,
    ) -> (bool, Vec<Slot>) {
        let limit = settings.fanout.min(MAX_SLOTS);
        let mut changed = false;
        let mut joined = Vec::new();
        let mut live = self.live();
        for (slot, (addr, state)) in self.addrs.iter().zip(self.states.iter_mut()).enumerate() {
            let new = slot_state(snapshot.state_of(*addr));
            if new == *state {
                continue;
            }
            if *state == SlotState::Gone {
                if live >= limit {
                    continue;
                }
                live += 1;
                joined.push(slot);
            } else if new == SlotState::Gone {
                live -= 1;
            }
            *state = new;
            changed = true;
        }
        if settings.late_join && self.live() < limit {
            for r in snapshot.ranked(client, ReplicaState::Ready) {
                if self.live() >= limit {
                    break;
                }
                if self.slot_of(r.addr).is_some() {
                    continue;
                }
                let slot = match self.states.iter().position(|s| *s == SlotState::Gone) {
                    Some(slot) => {
                        self.addrs[slot] = r.addr;
                        self.states[slot] = SlotState::Ready;
                        slot
                    }
                    None if self.addrs.len() < MAX_SLOTS => {
                        self.addrs.push(r.addr);
                        self.states.push(SlotState::Ready);
                        self.addrs.len() - 1
                    }
                    None => break,
                };
                joined.push(slot);
                changed = true;
            }
            self.wanted = self.wanted.max(self.live());
        }
        if changed {
            self.rebuild_targets(client);
        }
        (changed, joined)
    }

    fn live(&self) -> usize {
        self.states.iter().filter(|s| s.is_live()).count()
    }
}

fn slot_state(state: Option<ReplicaState>) -> SlotState {
    match state {
        Some(ReplicaState::Ready) => SlotState::Ready,
        Some(ReplicaState::Draining) => SlotState::Draining,
        None => SlotState::Gone,
    }
}

/// One client's session.
#[derive(Debug)]
pub struct Session {
    /// Listener the client talks to.
    pub listener: ListenerId,
    /// The client's address.
    pub client: SocketAddr,
    /// The game it plays (its id in the table).
    pub game: GameId,
    last_active: Instant,
    members: Members,
    dedupe: Deduper,
    limiter: Option<Limiter>,
    /// Datagrams over the rate since the client was last reported, and when that was.
    limited: u64,
    limited_reported: Option<Instant>,
}

impl Session {
    /// The session's replicas.
    pub fn members(&self) -> &Members {
        &self.members
    }
}

/// What to do with a client datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientVerdict<'a> {
    /// Send it to `targets` from the session's upstream socket. When `opened`, the session is
    /// new and its socket must be opened first.
    Forward {
        /// The session.
        id: SessionId,
        /// True for the first datagram of a session.
        opened: bool,
        /// Replica addresses.
        targets: &'a [SocketAddr],
        /// The part of the datagram to send: all of it, or all but the routing token.
        body: Range<usize>,
        /// A header to send before `body` (the session's game asks for one).
        header: Option<ReplicaHeader>,
    },
    /// Drop it, counting the reason.
    Drop(DropReason),
}

/// What to do with a replica's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerVerdict {
    /// Send it to `client` through `listener`.
    Deliver {
        /// Front socket to send from.
        listener: ListenerId,
        /// Destination.
        client: SocketAddr,
        /// The primary moved to this answer's replica.
        failover: bool,
    },
    /// Suppressed: already delivered, or not the primary's.
    Duplicate {
        /// How far behind the delivered copy this one arrived, when known.
        behind: Option<Duration>,
    },
    /// Dropped for a reason worth counting.
    Drop(DropReason),
}

/// What a replica-set change did to the sessions.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ApplyReport {
    /// Sessions whose members changed.
    pub sessions_changed: usize,
    /// Primaries moved because theirs was removed or draining.
    pub failovers: u64,
    /// Replicas that joined running sessions.
    pub late_joins: u64,
    /// Sessions that just fell below the redundancy they started with.
    pub degraded: u64,
}

/// A client held to its rate, as reported once per [`RATE_REPORT_INTERVAL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimited {
    /// The client.
    pub client: SocketAddr,
    /// Datagrams dropped since its last report.
    pub dropped: u64,
}

/// How often one rate-limited client is reported (logged) at most.
pub const RATE_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// A game's id in one table: stable while the game exists, re-used after it is gone.
pub type GameId = usize;

/// The one game of a proxy without token routing.
pub const IMPLICIT_GAME: GameId = 0;

/// A game as one table serves it.
#[derive(Debug)]
struct GameState {
    name: Arc<str>,
    replicas: Arc<Snapshot>,
    settings: Arc<Settings>,
    counters: Arc<GameCounters>,
    /// Counted since the last [`SessionTable::flush_games`].
    tally: GameTally,
}

impl GameState {
    fn flush(&mut self) {
        if self.tally != GameTally::default() {
            self.counters.add(std::mem::take(&mut self.tally));
        }
    }
}

/// Sessions of one worker.
#[derive(Debug)]
pub struct SessionTable {
    settings: Arc<Settings>,
    admission: Admission,
    snapshot: Arc<Snapshot>,
    /// Without token routing, one implicit game (id 0, no name).
    games: Slab<GameState>,
    game_ids: HashMap<Arc<str>, GameId>,
    router: Option<TokenRouter<GameId>>,
    seed: u64,
    by_client: HashMap<(ListenerId, SocketAddr, GameId), SessionId, foldhash::fast::RandomState>,
    sessions: Slab<Session>,
    evictions: u64,
    resyncs: u64,
    /// Sessions with rate-limit drops not yet reported.
    limited: Vec<SessionId>,
}

impl SessionTable {
    /// An empty table. `seed` keys content hashes (pick it at random).
    pub fn new(
        settings: Arc<Settings>,
        admission: Admission,
        snapshot: Arc<Snapshot>,
        seed: u64,
    ) -> Self {
        let mut table = Self {
            settings,
            admission,
            snapshot: Arc::default(),
            games: Slab::new(),
            game_ids: HashMap::new(),
            router: None,
            seed,
            by_client: HashMap::default(),
            sessions: Slab::new(),
            evictions: 0,
            resyncs: 0,
            limited: Vec::new(),
        };
        table.adopt(snapshot);
        table
    }

    /// Sessions in this table.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// True when the table holds no session.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// A session by id.
    pub fn get(&self, id: SessionId) -> Option<&Session> {
        self.sessions.get(id)
    }

    /// The replica snapshot new sessions are built from.
    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.snapshot
    }

    /// Adds what this table counted per game to the games' shared counters (on every tick).
    pub fn flush_games(&mut self) {
        for (_, g) in &mut self.games {
            g.flush();
        }
    }

    /// The name of game `id` (empty for the implicit game).
    pub fn game_name(&self, id: GameId) -> Option<&str> {
        self.games.get(id).map(|g| &*g.name)
    }

    /// The id of game `name` in this table, while the table serves it.
    pub fn game_id(&self, name: &str) -> Option<GameId> {
        self.game_ids.get(name).copied()
    }

    /// A client datagram arrived from `client` on `listener` (`truncated`: it was larger
    /// than the receive buffer). With token routing, its token picks the game and is cut off
    /// ([`ClientVerdict::Forward`]'s `body`).
    pub fn on_datagram(
        &mut self,
        listener: ListenerId,
        client: SocketAddr,
        datagram: &[u8],
        truncated: bool,
        now: Instant,
    ) -> ClientVerdict<'_> {
        if truncated || datagram.len() > self.settings.max_datagram {
            return ClientVerdict::Drop(DropReason::Oversized);
        }
        let (game, body) = match &self.router {
            None => (IMPLICIT_GAME, 0..datagram.len()),
            Some(router) => match router.route(datagram) {
                Ok(routed) => routed,
                Err(_) => return ClientVerdict::Drop(DropReason::UnknownToken),
            },
        };
        self.on_body(listener, client, game, body, now)
    }

    /// A client datagram of `len` bytes, without token routing (one implicit game). A
    /// token-routing table has no implicit game: it needs the bytes ([`Self::on_datagram`]).
    pub fn on_client(
        &mut self,
        listener: ListenerId,
        client: SocketAddr,
        len: usize,
        now: Instant,
    ) -> ClientVerdict<'_> {
        if len > self.settings.max_datagram {
            return ClientVerdict::Drop(DropReason::Oversized);
        }
        if self.router.is_some() {
            return ClientVerdict::Drop(DropReason::UnknownToken);
        }
        self.on_body(listener, client, IMPLICIT_GAME, 0..len, now)
    }

    fn on_body(
        &mut self,
        listener: ListenerId,
        client: SocketAddr,
        game: GameId,
        body: Range<usize>,
        now: Instant,
    ) -> ClientVerdict<'_> {
        let Some(tally) = self.games.get_mut(game).map(|g| &mut g.tally) else {
            return ClientVerdict::Drop(DropReason::NoReplicas);
        };
        tally.packets += 1;
        // Counted as dropped until it is forwarded.
        tally.drops += 1;
        if body.is_empty() {
            return ClientVerdict::Drop(DropReason::Empty);
        }
        let (id, opened) = match self.by_client.get(&(listener, client, game)) {
            Some(&id) => (id, false),
            None => match self.open(listener, client, game, now) {
                Ok(id) => (id, true),
                Err(reason) => return ClientVerdict::Drop(reason),
            },
        };
        let Some(session) = self.sessions.get_mut(id) else {
            return ClientVerdict::Drop(DropReason::UnknownSession);
        };
        // A client over its rate is still present: activity counts before the limit.
        session.last_active = now;
        if let Some(limiter) = &mut session.limiter
            && !limiter.allow(now)
        {
            if session.limited == 0 {
                self.limited.push(id);
            }
            session.limited += 1;
            return ClientVerdict::Drop(DropReason::RateLimited);
        }
        if session.members.targets.is_empty() {
            return ClientVerdict::Drop(DropReason::NoReplicas);
        }
        let header = match self.games.get_mut(game) {
            Some(g) => {
                g.tally.drops -= 1;
                g.settings.replica_header
            }
            None => None,
        };
        ClientVerdict::Forward {
            id,
            opened,
            targets: &session.members.targets,
            body,
            header,
        }
    }

    fn open(
        &mut self,
        listener: ListenerId,
        client: SocketAddr,
        game: GameId,
        now: Instant,
    ) -> Result<SessionId, DropReason> {
        // A replica's own address never becomes a player: its datagrams would be fanned out
        // to the replicas, answered, delivered back to it, and so on.
        if self.snapshot.state_of(client).is_some() {
            return Err(DropReason::FromReplica);
        }
        let Some(g) = self.games.get(game) else {
            return Err(DropReason::NoReplicas);
        };
        let limit = g.settings.fanout.min(MAX_SLOTS);
        let members = Members::new(g.replicas.for_new_session(client, limit), client);
        if members.targets.is_empty() {
            return Err(DropReason::NoReplicas);
        }
        if !self.admission.try_acquire() {
            return Err(DropReason::SessionLimit);
        }
        let seed = self.seed ^ (self.sessions.vacant_key() as u64).rotate_left(17);
        let dedupe = Deduper::new(&g.settings.mode, seed, now, &members.states);
        let id = self.sessions.insert(Session {
            listener,
            client,
            game,
            last_active: now,
            members,
            dedupe,
            limiter: self.settings.rate.map(|r| Limiter::new(r, now)),
            limited: 0,
            limited_reported: None,
        });
        self.by_client.insert((listener, client, game), id);
        if let Some(g) = self.games.get_mut(game) {
            g.tally.sessions += 1;
        }
        Ok(id)
    }

    /// An answer arrived on session `id`'s upstream socket from `from`.
    pub fn on_answer(
        &mut self,
        id: SessionId,
        from: SocketAddr,
        payload: &[u8],
        now: Instant,
    ) -> AnswerVerdict {
        let Some(session) = self.sessions.get_mut(id) else {
            return AnswerVerdict::Drop(DropReason::UnknownSession);
        };
        let Some(slot) = session.members.slot_of(from) else {
            return AnswerVerdict::Drop(DropReason::NotReplica);
        };
        let verdict = session
            .dedupe
            .on_answer(slot, payload, now, &session.members.states);
        match verdict {
            Verdict::Forward | Verdict::ForwardAfterFailover => {
                if let Some(g) = self.games.get_mut(session.game) {
                    g.tally.delivered += 1;
                }
                // Only a new payload can push an entry out, and a new payload is forwarded;
                // likewise only a forwarded answer completes a resync.
                self.evictions += session.dedupe.take_evictions();
                self.resyncs += session.dedupe.take_resyncs();
                AnswerVerdict::Deliver {
                    listener: session.listener,
                    client: session.client,
                    failover: verdict == Verdict::ForwardAfterFailover,
                }
            }
            Verdict::Duplicate => AnswerVerdict::Duplicate {
                behind: session.dedupe.lag(),
            },
            Verdict::Stale => AnswerVerdict::Drop(DropReason::StaleSequence),
        }
    }

    /// Closes sessions idle since before `now - session_timeout`, appending their ids to
    /// `closed` so the caller can close their sockets.
    pub fn expire(&mut self, now: Instant, closed: &mut Vec<Closed>) {
        let timeout = self.settings.session_timeout;
        let start = closed.len();
        closed.extend(
            self.sessions
                .iter()
                .filter(|(_, s)| now.saturating_duration_since(s.last_active) >= timeout)
                .map(|(id, s)| Closed {
                    id,
                    client: s.client,
                    reason: CloseReason::Idle,
                }),
        );
        for c in &closed[start..] {
            self.close(c.id);
        }
    }

    /// Closes one session (its socket failed, or the worker is shutting down).
    pub fn close(&mut self, id: SessionId) {
        if let Some(s) = self.sessions.try_remove(id) {
            self.by_client.remove(&(s.listener, s.client, s.game));
            self.admission.release();
            if let Some(g) = self.games.get_mut(s.game) {
                g.tally.sessions -= 1;
            }
        }
    }

    /// Adopts a new replica snapshot: removed replicas leave every session at once, draining
    /// ones stop being primary, returning ones take their slot back, and with `late_join` new
    /// ones join running sessions. A session left without a live replica, whose game is gone,
    /// or whose client is now a replica, is closed and appended to `closed`: the player's next
    /// datagram opens a fresh session on the replicas there are.
    pub fn apply(
        &mut self,
        snapshot: Arc<Snapshot>,
        now: Instant,
        closed: &mut Vec<Closed>,
    ) -> ApplyReport {
        let mut report = ApplyReport::default();
        let start = closed.len();
        let gone = self.adopt(snapshot);
        for (id, s) in self.sessions.iter_mut() {
            let close = |reason| Closed {
                id,
                client: s.client,
                reason,
            };
            if self.snapshot.state_of(s.client).is_some() {
                closed.push(close(CloseReason::FromReplica));
                continue;
            }
            let Some(game) = self.games.get(s.game).filter(|_| !gone.contains(&s.game)) else {
                closed.push(close(CloseReason::NoReplicas));
                continue;
            };
            let was_degraded = s.members.is_degraded();
            let (changed, joined) = s.members.apply(&game.replicas, &game.settings, s.client);
            if !changed {
                continue;
            }
            if s.members.live() == 0 {
                closed.push(close(CloseReason::NoReplicas));
                continue;
            }
            if s.members.is_degraded() && !was_degraded {
                report.degraded += 1;
            }
            report.sessions_changed += 1;
            for slot in &joined {
                s.dedupe.on_slot_joined(*slot);
            }
            report.late_joins += joined.len() as u64;
            if s.dedupe.on_slots_changed(&s.members.states, now) {
                report.failovers += 1;
            }
        }
        for c in &closed[start..] {
            self.close(c.id);
        }
        // Only now, with their sessions closed, may a gone game's id serve another game.
        for g in gone {
            self.games.remove(g).flush();
        }
        report
    }

    /// Takes `snapshot` as the table's games: updates the ones it knows, adds new ones (with
    /// fresh ids), rebuilds the token router. Returns the ids of games no longer in it, still
    /// held so that their sessions can be closed first.
    fn adopt(&mut self, snapshot: Arc<Snapshot>) -> Vec<GameId> {
        let mut gone = Vec::new();
        match self.settings.token {
            None => match self.games.get_mut(IMPLICIT_GAME) {
                Some(g) => g.replicas = snapshot.clone(),
                None => {
                    let implicit = GameState {
                        name: Arc::from(""),
                        replicas: snapshot.clone(),
                        settings: self.settings.clone(),
                        counters: Arc::default(),
                        tally: GameTally::default(),
                    };
                    let id = self.games.insert(implicit);
                    debug_assert_eq!(id, IMPLICIT_GAME);
                }
            },
            Some(spec) => {
                let mut kept = std::collections::HashSet::new();
                for game in &snapshot.games {
                    let id = match self.game_ids.get(&game.name) {
                        Some(&id) => {
                            if !Arc::ptr_eq(&self.games[id].counters, &game.counters) {
                                // The game left the set and came back between two of our
                                // adoptions: its sessions here count in the new counters.
                                let open = self.sessions.iter().filter(|(_, s)| s.game == id);
                                let open = open.count() as i64;
                                let g = &mut self.games[id];
                                g.flush();
                                g.counters = game.counters.clone();
                                g.tally.sessions = open;
                            }
                            let g = &mut self.games[id];
                            g.replicas = game.replicas.clone();
                            g.settings = game.settings.clone();
                            id
                        }
                        None => {
                            let id = self.games.insert(GameState {
                                name: game.name.clone(),
                                replicas: game.replicas.clone(),
                                settings: game.settings.clone(),
                                counters: game.counters.clone(),
                                tally: GameTally::default(),
                            });
                            self.game_ids.insert(game.name.clone(), id);
                            id
                        }
                    };
                    kept.insert(id);
                }
                self.game_ids.retain(|_, id| {
                    let keep = kept.contains(id);
                    if !keep {
                        gone.push(*id);
                    }
                    keep
                });
                let ids = &self.game_ids;
                let tokens = snapshot
                    .games
                    .iter()
                    .filter_map(|g| ids.get(&g.name).map(|&id| (id, &g.tokens[..])));
                // ReplicaSet::publish_games refuses what the router would; should a set get
                // here anyway, it routes nothing rather than the wrong game.
                self.router = TokenRouter::new(spec, tokens)
                    .or_else(|_| TokenRouter::new(spec, std::iter::empty()))
                    .ok();
            }
        }
        self.snapshot = snapshot;
        gone
    }

    /// Clients held to their rate since they were last reported, each at most once per
    /// [`RATE_REPORT_INTERVAL`]; the rest wait for a later call.
    pub fn rate_limited(&mut self, now: Instant, out: &mut Vec<RateLimited>) {
        let sessions = &mut self.sessions;
        self.limited.retain(|&id| {
            let Some(s) = sessions.get_mut(id) else {
                return false;
            };
            let due = s
                .limited_reported
                .is_none_or(|at| now.saturating_duration_since(at) >= RATE_REPORT_INTERVAL);
            if !due || s.limited == 0 {
                return s.limited > 0;
            }
            out.push(RateLimited {
                client: s.client,
                dropped: std::mem::take(&mut s.limited),
            });
            s.limited_reported = Some(now);
            false
        });
    }

    /// Restarted `sequence` numberings accepted since the last call.
    pub fn take_resyncs(&mut self) -> u64 {
        std::mem::take(&mut self.resyncs)
    }

    /// Content-dedupe entries evicted by the per-session cap since the last call; each one
    /// risks a duplicate, so it is worth a metric.
    pub fn take_evictions(&mut self) -> u64 {
        std::mem::take(&mut self.evictions)
    }
}

impl Drop for SessionTable {
    fn drop(&mut self) {
        for _ in 0..self.sessions.len() {
            self.admission.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn settings(mode: Mode) -> Settings {
        Settings {
            mode,
            session_timeout: Duration::from_secs(60),
            rate: None,
            max_datagram: 1500,
            fanout: MAX_SLOTS,
            late_join: false,
            replica_header: None,
            token: None,
        }
    }

    fn copies() -> Mode {
        Mode::Copies {
            window: Duration::from_secs(1),
            max_entries: 1024,
        }
    }

    /// `sequence` mode with the number at offset 0, resynchronising after two answers.
    fn sequence(width: crate::dedupe::Width, endian: crate::dedupe::Endian) -> Mode {
        Mode::Sequence {
            spec: crate::dedupe::SequenceSpec {
                offset: 0,
                width,
                endian,
            },
            window: Duration::from_secs(1),
            max_entries: 64,
            resync_after: 2,
        }
    }

    fn snapshot(version: u64, replicas: &[(u16, ReplicaState)]) -> Arc<Snapshot> {
        Arc::new(crate::replicas::test_snapshot(version, replicas))
    }

    fn table(settings: Settings, max: usize, replicas: &[u16]) -> SessionTable {
        let replicas: Vec<_> = replicas.iter().map(|&p| (p, ReplicaState::Ready)).collect();
        SessionTable::new(
            Arc::new(settings),
            Admission::new(max),
            snapshot(1, &replicas),
            42,
        )
    }

    fn apply(t: &mut SessionTable, snapshot: Arc<Snapshot>, now: Instant) -> ApplyReport {
        let mut closed = Vec::new();
        let report = t.apply(snapshot, now, &mut closed);
        let closed: Vec<_> = closed.iter().map(|c| (c.id, c.reason)).collect();
        assert!(closed.is_empty(), "unexpected closes: {closed:?}");
        report
    }

    fn open(t: &mut SessionTable, client: u16, now: Instant) -> SessionId {
        match t.on_client(0, addr(client), 10, now) {
            ClientVerdict::Forward { id, .. } => id,
            other => panic!("expected forward, got {other:?}"),
        }
    }

    #[test]
    fn first_datagram_opens_a_session_and_fans_out() {
        let now = crate::epoch();
        let mut t = table(settings(copies()), 10, &[7001, 7002, 7003]);
        let ClientVerdict::Forward {
            id: 0,
            opened: true,
            targets,
            body,
            header: None,
        } = t.on_client(0, addr(5000), 10, now)
        else {
            panic!("first datagram must open session 0");
        };
        assert_eq!(body, 0..10, "without tokens, the whole datagram");
        let mut targets = targets.to_vec();
        targets.sort();
        assert_eq!(targets, [addr(7001), addr(7002), addr(7003)]);
        assert!(matches!(
            t.on_client(0, addr(5000), 10, now),
            ClientVerdict::Forward {
                id: 0,
                opened: false,
                ..
            }
        ));
        // Same client on another listener is another session.
        assert!(matches!(
            t.on_client(1, addr(5000), 10, now),
            ClientVerdict::Forward {
                id: 1,
                opened: true,
                ..
            }
        ));
    }

    #[test]
    fn answers_are_deduplicated_and_only_from_replicas() {
        let now = crate::epoch();
        let mut t = table(settings(copies()), 10, &[7001, 7002]);
        let id = open(&mut t, 5000, now);
        let deliver = AnswerVerdict::Deliver {
            listener: 0,
            client: addr(5000),
            failover: false,
        };
        assert_eq!(t.on_answer(id, addr(7002), b"a", now), deliver);
        assert_eq!(
            t.on_answer(id, addr(7001), b"a", now),
            AnswerVerdict::Duplicate {
                behind: Some(Duration::ZERO)
            }
        );
        assert_eq!(
            t.on_answer(id, addr(6666), b"b", now),
            AnswerVerdict::Drop(DropReason::NotReplica)
        );
        assert_eq!(
            t.on_answer(id + 1, addr(7001), b"b", now),
            AnswerVerdict::Drop(DropReason::UnknownSession)
        );
    }

    #[test]
    fn empty_and_oversized_datagrams_are_dropped() {
        let now = crate::epoch();
        let mut t = table(settings(copies()), 10, &[7001]);
        assert_eq!(
            t.on_client(0, addr(1), 0, now),
            ClientVerdict::Drop(DropReason::Empty)
        );
        assert_eq!(
            t.on_client(0, addr(1), 1501, now),
            ClientVerdict::Drop(DropReason::Oversized)
        );
        assert!(t.is_empty(), "a dropped datagram must not open a session");
    }

    #[test]
    fn session_limit_holds_across_tables_and_frees_on_close() {
        let now = crate::epoch();
        let s = Arc::new(settings(copies()));
        let admission = Admission::new(3);
        let snap = snapshot(1, &[(7001, ReplicaState::Ready)]);
        let mut a = SessionTable::new(s.clone(), admission.clone(), snap.clone(), 1);
        let mut b = SessionTable::new(s, admission.clone(), snap, 2);
        open(&mut a, 1, now);
        let id = open(&mut a, 2, now);
        open(&mut b, 3, now);
        assert_eq!(
            b.on_client(0, addr(4), 10, now),
            ClientVerdict::Drop(DropReason::SessionLimit)
        );
        assert_eq!(admission.in_use(), 3);
        a.close(id);
        open(&mut b, 4, now);
        drop(a);
        assert_eq!(admission.in_use(), 2);
    }

    #[test]
    fn idle_sessions_expire_active_ones_stay() {
        let t0 = crate::epoch();
        let mut s = settings(copies());
        s.session_timeout = Duration::from_secs(60);
        let mut t = table(s, 10, &[7001]);
        let idle = open(&mut t, 1, t0);
        let busy = open(&mut t, 2, t0);
        open(&mut t, 2, t0 + Duration::from_secs(30));
        let mut closed = Vec::new();
        t.expire(t0 + Duration::from_secs(59), &mut closed);
        assert!(closed.is_empty());
        t.expire(t0 + Duration::from_secs(60), &mut closed);
        let ids = |c: &[Closed]| c.iter().map(|c| (c.id, c.reason)).collect::<Vec<_>>();
        assert_eq!(ids(&closed), vec![(idle, CloseReason::Idle)]);
        assert!(t.get(busy).is_some());
        assert_eq!(
            t.on_answer(idle, addr(7001), b"late", t0),
            AnswerVerdict::Drop(DropReason::UnknownSession)
        );
        // Answers from replicas do not keep a session alive: it belongs to the client.
        t.on_answer(busy, addr(7001), b"x", t0 + Duration::from_secs(80));
        t.expire(t0 + Duration::from_secs(90), &mut closed);
        assert_eq!(
            ids(&closed),
            vec![(idle, CloseReason::Idle), (busy, CloseReason::Idle)]
        );
        assert!(t.is_empty());
    }

    #[test]
    fn rate_limit_per_client() {
        let now = crate::epoch();
        let mut s = settings(copies());
        s.rate = Some(Rate {
            per_second: 10,
            burst: 2,
        });
        let mut t = table(s, 10, &[7001]);
        open(&mut t, 1, now);
        open(&mut t, 1, now);
        assert_eq!(
            t.on_client(0, addr(1), 10, now),
            ClientVerdict::Drop(DropReason::RateLimited)
        );
        // Another client has its own budget.
        open(&mut t, 2, now);
        open(&mut t, 1, now + 100 * MS);
        // Being rate limited is not being idle.
        let mut closed = Vec::new();
        let later = now + Duration::from_secs(50);
        for _ in 0..10 {
            t.on_client(0, addr(1), 10, later);
        }
        t.expire(now + Duration::from_secs(100), &mut closed);
        assert_eq!(closed.len(), 1, "only client 2 was idle");
    }

    #[test]
    fn no_replicas_no_session() {
        let now = crate::epoch();
        let mut t = table(settings(copies()), 10, &[]);
        assert_eq!(
            t.on_client(0, addr(1), 10, now),
            ClientVerdict::Drop(DropReason::NoReplicas)
        );
        assert!(t.is_empty());
    }

    #[test]
    fn removed_replica_leaves_running_sessions_new_one_joins_new_sessions_only() {
        let now = crate::epoch();
        let mut t = table(settings(copies()), 10, &[7001, 7002]);
        let old = open(&mut t, 1, now);
        let report = apply(
            &mut t,
            snapshot(
                2,
                &[(7002, ReplicaState::Ready), (7003, ReplicaState::Ready)],
            ),
            now,
        );
        assert_eq!(report.sessions_changed, 1);
        assert_eq!(report.late_joins, 0);
        assert_eq!(
            t.get(old).map(|s| s.members().targets()),
            Some(&[addr(7002)][..])
        );
        assert_eq!(
            t.on_answer(old, addr(7001), b"x", now),
            AnswerVerdict::Drop(DropReason::NotReplica)
        );
        assert_eq!(
            t.on_answer(old, addr(7003), b"x", now),
            AnswerVerdict::Drop(DropReason::NotReplica)
        );
        let new = open(&mut t, 2, now);
        let mut targets = t.get(new).unwrap().members().targets().to_vec();
        targets.sort();
        assert_eq!(targets, [addr(7002), addr(7003)]);
    }

    #[test]
    fn late_join_tops_up_running_sessions() {
        let now = crate::epoch();
        let mut s = settings(copies());
        s.late_join = true;
        s.fanout = 2;
        let mut t = table(s, 10, &[7001, 7002]);
        let id = open(&mut t, 1, now);
        // Nothing to add while the session is full.
        let report = apply(
            &mut t,
            snapshot(
                2,
                &[
                    (7001, ReplicaState::Ready),
                    (7002, ReplicaState::Ready),
                    (7003, ReplicaState::Ready),
                ],
            ),
            now,
        );
        assert_eq!(report.late_joins, 0);
        let report = apply(
            &mut t,
            snapshot(
                3,
                &[(7002, ReplicaState::Ready), (7003, ReplicaState::Ready)],
            ),
            now,
        );
        assert_eq!(report.late_joins, 1);
        // The newcomer took the freed slot.
        assert_eq!(
            t.get(id).map(|s| s.members().targets()),
            Some(&[addr(7003), addr(7002)][..])
        );
        assert!(matches!(
            t.on_answer(id, addr(7003), b"x", now),
            AnswerVerdict::Deliver { .. }
        ));
    }

    #[test]
    fn late_join_tops_up_from_the_clients_own_ranking() {
        let now = crate::epoch();
        let mut s = settings(copies());
        s.late_join = true;
        s.fanout = 2;
        let ports = [7001, 7002, 7003, 7004, 7005];
        let mut t = table(s, 10, &ports);
        let id = open(&mut t, 1, now);
        let ranking: Vec<SocketAddr> = t
            .snapshot()
            .ranked(addr(1), ReplicaState::Ready)
            .iter()
            .map(|r| r.addr)
            .collect();
        let mut members = t.get(id).unwrap().members().targets().to_vec();
        members.sort();
        let mut top2 = ranking[..2].to_vec();
        top2.sort();
        assert_eq!(
            members, top2,
            "the session starts on its two best-ranked replicas"
        );
        // Its best replica goes away: the third in its ranking takes the place.
        let remaining: Vec<_> = ports
            .iter()
            .filter(|&&p| addr(p) != ranking[0])
            .map(|&p| (p, ReplicaState::Ready))
            .collect();
        let report = apply(&mut t, snapshot(2, &remaining), now);
        assert_eq!(report.late_joins, 1);
        assert_eq!(report.degraded, 0, "topped up at once");
        let mut members = t.get(id).unwrap().members().targets().to_vec();
        members.sort();
        let mut expected = vec![ranking[1], ranking[2]];
        expected.sort();
        assert_eq!(members, expected);
    }

    #[test]
    fn losing_a_replica_without_late_join_is_degraded_once() {
        let now = crate::epoch();
        let mut t = table(settings(copies()), 10, &[7001, 7002, 7003]);
        open(&mut t, 1, now);
        let r = apply(
            &mut t,
            snapshot(
                2,
                &[(7001, ReplicaState::Ready), (7002, ReplicaState::Ready)],
            ),
            now,
        );
        assert_eq!(r.degraded, 1);
        let r = apply(&mut t, snapshot(3, &[(7001, ReplicaState::Ready)]), now);
        assert_eq!(r.degraded, 0, "already degraded: counted once");
    }

    #[test]
    fn draining_replica_keeps_traffic_and_loses_primary() {
        let now = crate::epoch();
        let mode = Mode::Primary {
            failover_after: 50 * MS,
        };
        let mut t = table(settings(mode), 10, &[7001, 7002]);
        let id = open(&mut t, 1, now);
        assert!(matches!(
            t.on_answer(id, addr(7001), b"x", now),
            AnswerVerdict::Deliver {
                failover: false,
                ..
            }
        ));
        let report = apply(
            &mut t,
            snapshot(
                2,
                &[(7001, ReplicaState::Draining), (7002, ReplicaState::Ready)],
            ),
            now + MS,
        );
        assert_eq!(report.failovers, 1);
        // Still fanned out to, still accepted, but no longer forwarded.
        assert_eq!(
            t.get(id).map(|s| s.members().targets()),
            Some(&[addr(7001), addr(7002)][..])
        );
        assert_eq!(
            t.on_answer(id, addr(7001), b"y", now + 2 * MS),
            AnswerVerdict::Duplicate { behind: None }
        );
        assert!(matches!(
            t.on_answer(id, addr(7002), b"y", now + 2 * MS),
            AnswerVerdict::Deliver { .. }
        ));
    }

    #[test]
    fn copies_mode_survives_replica_loss_without_loss_or_duplicates() {
        // Three replicas answer a stream; one vanishes mid-stream (removed from the set
        // or just silent). The client must see every answer exactly once.
        let t0 = crate::epoch();
        let mut t = table(settings(copies()), 10, &[7001, 7002, 7003]);
        let id = open(&mut t, 1, t0);
        let mut delivered = Vec::new();
        for seq in 0u32..200 {
            let now = t0 + MS * seq;
            let payload = seq.to_be_bytes();
            if seq == 100 {
                apply(
                    &mut t,
                    snapshot(
                        2,
                        &[(7001, ReplicaState::Ready), (7003, ReplicaState::Ready)],
                    ),
                    now,
                );
            }
            // Replicas answer in varying order; 7002 dies at 100.
            let mut order = [7001u16, 7002, 7003];
            order.rotate_left(seq as usize % 3);
            for port in order {
                if port == 7002 && seq >= 95 {
                    continue;
                }
                if let AnswerVerdict::Deliver { .. } = t.on_answer(id, addr(port), &payload, now) {
                    delivered.push(seq);
                }
            }
        }
        assert_eq!(delivered, (0..200).collect::<Vec<_>>());
    }

    #[test]
    fn sequence_mode_through_the_table() {
        let now = crate::epoch();
        let mode = sequence(crate::dedupe::Width::Two, crate::dedupe::Endian::Little);
        let mut t = table(settings(mode), 10, &[7001, 7002]);
        let id = open(&mut t, 1, now);
        // Payloads differ between replicas (timestamps, say); only the number matters.
        assert!(matches!(
            t.on_answer(id, addr(7001), b"\x01\x00 at 10ms", now),
            AnswerVerdict::Deliver { .. }
        ));
        assert_eq!(
            t.on_answer(id, addr(7002), b"\x01\x00 at 11ms", now),
            AnswerVerdict::Duplicate {
                behind: Some(Duration::ZERO)
            }
        );
    }

    fn ready(ports: &[u16]) -> Vec<(u16, ReplicaState)> {
        ports.iter().map(|&p| (p, ReplicaState::Ready)).collect()
    }

    fn apply_closing(
        t: &mut SessionTable,
        snap: Arc<Snapshot>,
        now: Instant,
    ) -> Vec<(SessionId, CloseReason)> {
        let mut closed = Vec::new();
        t.apply(snap, now, &mut closed);
        closed.iter().map(|c| (c.id, c.reason)).collect()
    }

    fn targets(t: &SessionTable, id: SessionId) -> Vec<SocketAddr> {
        let mut v = t.get(id).unwrap().members().targets().to_vec();
        v.sort();
        v
    }

    #[test]
    fn a_rolling_replacement_closes_the_session_and_the_next_datagram_reconnects() {
        // A,B -> A,B,C -> A draining -> B,C -> B,C,D -> B draining -> C,D; no late join.
        let now = crate::epoch();
        let (a, b, c, d) = (7001, 7002, 7003, 7004);
        let mut t = table(settings(copies()), 10, &[a, b]);
        let id = open(&mut t, 1, now);
        let steps: [&[(u16, ReplicaState)]; 5] = [
            &ready(&[a, b, c]),
            &[
                (a, ReplicaState::Draining),
                (b, ReplicaState::Ready),
                (c, ReplicaState::Ready),
            ],
            &ready(&[b, c]),
            &ready(&[b, c, d]),
            &[
                (b, ReplicaState::Draining),
                (c, ReplicaState::Ready),
                (d, ReplicaState::Ready),
            ],
        ];
        for (v, step) in steps.iter().enumerate() {
            let closed = apply_closing(&mut t, snapshot(v as u64 + 2, step), now);
            assert!(closed.is_empty(), "step {v}: {closed:?}");
            assert!(matches!(
                t.on_client(0, addr(1), 10, now),
                ClientVerdict::Forward { id: i, opened: false, .. } if i == id
            ));
        }
        assert_eq!(targets(&t, id), [addr(b)], "only the draining B is left");
        // B leaves: the session has no live replica and closes.
        let closed = apply_closing(&mut t, snapshot(9, &ready(&[c, d])), now);
        assert_eq!(closed, [(id, CloseReason::NoReplicas)]);
        assert!(t.is_empty());
        assert_eq!(t.admission.in_use(), 0, "its budget is returned");
        // The player's next datagram is a fresh session on the live replicas.
        let ClientVerdict::Forward {
            id: fresh,
            opened: true,
            ..
        } = t.on_client(0, addr(1), 10, now)
        else {
            panic!("no fresh session");
        };
        assert_eq!(targets(&t, fresh), [addr(c), addr(d)]);
        assert!(matches!(
            t.on_answer(fresh, addr(d), b"x", now),
            AnswerVerdict::Deliver { .. }
        ));
    }

    #[test]
    fn all_replicas_flapping_away_closes_and_their_return_readmits() {
        let now = crate::epoch();
        let mut t = table(settings(copies()), 10, &[7001, 7002]);
        let id = open(&mut t, 1, now);
        let closed = apply_closing(&mut t, snapshot(2, &[]), now);
        assert_eq!(closed, [(id, CloseReason::NoReplicas)]);
        // While there is nothing to send to, no session opens (and none is left deaf).
        assert_eq!(
            t.on_client(0, addr(1), 10, now),
            ClientVerdict::Drop(DropReason::NoReplicas)
        );
        assert!(t.is_empty());
        apply_closing(&mut t, snapshot(3, &ready(&[7001, 7002])), now);
        let id = open(&mut t, 1, now);
        assert_eq!(targets(&t, id), [addr(7001), addr(7002)]);
    }

    #[test]
    fn a_replica_returning_at_its_address_takes_its_slot_back() {
        let now = crate::epoch();
        let mode = Mode::Primary {
            failover_after: 50 * MS,
        };
        let mut t = table(settings(mode), 10, &[7001, 7002]);
        let id = open(&mut t, 1, now);
        apply(&mut t, snapshot(2, &ready(&[7002])), now);
        assert_eq!(targets(&t, id), [addr(7002)]);
        assert_eq!(
            t.on_answer(id, addr(7001), b"x", now),
            AnswerVerdict::Drop(DropReason::NotReplica)
        );
        // Removed and re-added (or not-ready for a moment): back in its old slot.
        let report = apply(&mut t, snapshot(3, &ready(&[7001, 7002])), now);
        assert_eq!(report.late_joins, 1);
        assert_eq!(targets(&t, id), [addr(7001), addr(7002)]);
        let slots = t.get(id).unwrap().members().states().to_vec();
        assert_eq!(slots, [SlotState::Ready, SlotState::Ready]);
        assert!(!t.get(id).unwrap().members().is_degraded());
        // Its answers count again.
        assert_ne!(
            t.on_answer(id, addr(7001), b"y", now),
            AnswerVerdict::Drop(DropReason::NotReplica)
        );
        // It comes back draining: a member, but never primary.
        apply(&mut t, snapshot(4, &ready(&[7002])), now);
        apply(
            &mut t,
            snapshot(
                5,
                &[(7001, ReplicaState::Draining), (7002, ReplicaState::Ready)],
            ),
            now,
        );
        assert_eq!(targets(&t, id), [addr(7001), addr(7002)]);
    }

    #[test]
    fn a_returning_replica_does_not_exceed_the_fanout() {
        let now = crate::epoch();
        let mut s = settings(copies());
        s.late_join = true;
        s.fanout = 2;
        let mut t = table(s, 10, &[7001, 7002]);
        let id = open(&mut t, 1, now);
        let gone = t.get(id).unwrap().members().targets()[0];
        let stays = t.get(id).unwrap().members().targets()[1];
        // The slot is topped up by late join, then the old replica returns: two stay two.
        let others: Vec<_> = [stays.port(), 7003]
            .into_iter()
            .map(|p| (p, ReplicaState::Ready))
            .collect();
        apply(&mut t, snapshot(2, &others), now);
        let mut all = others.clone();
        all.push((gone.port(), ReplicaState::Ready));
        apply(&mut t, snapshot(3, &all), now);
        assert_eq!(t.get(id).unwrap().members().targets().len(), 2);
    }

    #[test]
    fn a_replica_address_never_opens_a_session() {
        let now = crate::epoch();
        let mut t = table(settings(copies()), 10, &[7001, 7002]);
        assert_eq!(
            t.on_client(0, addr(7001), 10, now),
            ClientVerdict::Drop(DropReason::FromReplica)
        );
        assert!(t.is_empty());
        // A player whose address later turns up as a replica loses its session.
        let id = open(&mut t, 7003, now);
        let closed = apply_closing(&mut t, snapshot(2, &ready(&[7001, 7002, 7003])), now);
        assert_eq!(closed, [(id, CloseReason::FromReplica)]);
        assert_eq!(
            t.on_client(0, addr(7003), 10, now),
            ClientVerdict::Drop(DropReason::FromReplica)
        );
    }

    #[test]
    fn nothing_is_ever_sent_back_to_its_source() {
        // The general guard below the from-replica rule: members never target the client.
        let replicas = vec![
            crate::replicas::Replica::ready(addr(1)),
            crate::replicas::Replica::ready(addr(2)),
        ];
        let m = Members::new(replicas, addr(1));
        assert_eq!(m.targets(), [addr(2)]);
    }

    #[test]
    fn rate_limited_clients_are_reported_once_per_interval() {
        let now = crate::epoch();
        let mut s = settings(copies());
        s.rate = Some(Rate {
            per_second: 1,
            burst: 1,
        });
        let mut t = table(s, 10, &[7001]);
        open(&mut t, 1, now);
        open(&mut t, 2, now);
        for _ in 0..5 {
            t.on_client(0, addr(1), 10, now);
        }
        t.on_client(0, addr(2), 10, now);
        let mut out = Vec::new();
        t.rate_limited(now, &mut out);
        out.sort_by_key(|r| r.client);
        assert_eq!(
            out,
            [
                RateLimited {
                    client: addr(1),
                    dropped: 5
                },
                RateLimited {
                    client: addr(2),
                    dropped: 1
                }
            ]
        );
        // More drops within the interval wait; after it, they are reported with their count.
        let later = now + Duration::from_millis(500);
        for _ in 0..3 {
            t.on_client(0, addr(1), 10, later);
        }
        out.clear();
        t.rate_limited(later, &mut out);
        assert!(out.is_empty());
        t.rate_limited(now + RATE_REPORT_INTERVAL, &mut out);
        assert_eq!(
            out,
            [RateLimited {
                client: addr(1),
                dropped: 3
            }]
        );
        out.clear();
        t.rate_limited(now + 3 * RATE_REPORT_INTERVAL, &mut out);
        assert!(out.is_empty(), "nothing new to report");
    }

    #[test]
    fn sequence_resync_through_the_table_counts_stale_and_resyncs() {
        let now = crate::epoch();
        let mode = sequence(crate::dedupe::Width::Four, crate::dedupe::Endian::Big);
        let mut t = table(settings(mode), 10, &[7001, 7002]);
        let id = open(&mut t, 1, now);
        for n in 0u32..100 {
            t.on_answer(id, addr(7001), &n.to_be_bytes(), now);
            t.on_answer(id, addr(7002), &n.to_be_bytes(), now);
        }
        // The same address, a new player: the replicas number from 0 again.
        assert_eq!(
            t.on_answer(id, addr(7001), &0u32.to_be_bytes(), now),
            AnswerVerdict::Drop(DropReason::StaleSequence)
        );
        assert!(matches!(
            t.on_answer(id, addr(7002), &0u32.to_be_bytes(), now),
            AnswerVerdict::Deliver { .. }
        ));
        assert_eq!(t.take_resyncs(), 1);
    }

    // ---- Token routing: games side by side ----

    use crate::replicas::{GameSpec, GameTally, Replica, ReplicaSet};
    use crate::token::{TokenAt, TokenSpec};

    fn spec(at: TokenAt) -> TokenSpec {
        TokenSpec::new(4, at).unwrap()
    }

    fn game(name: &str, token: &[u8], ports: &[u16], mode: Mode) -> GameSpec {
        let mut s = settings(mode);
        s.token = Some(spec(TokenAt::Suffix));
        GameSpec {
            name: name.into(),
            tokens: vec![token.to_vec()],
            replicas: ports.iter().map(|&p| Replica::ready(addr(p))).collect(),
            settings: Arc::new(s),
        }
    }

    /// A table routing by a 4-byte token at `at`, over the games `set` holds.
    fn routing_table(set: &ReplicaSet, at: TokenAt) -> SessionTable {
        let mut s = settings(copies());
        s.token = Some(spec(at));
        SessionTable::new(Arc::new(s), Admission::new(100), set.snapshot(), 42)
    }

    fn two_games(mode_b: Mode) -> ReplicaSet {
        let set = ReplicaSet::new();
        set.publish_games(
            spec(TokenAt::Suffix),
            vec![
                game("arena", b"aaaa", &[7001, 7002], copies()),
                game("bazaar", b"bbbb", &[7101, 7102], mode_b),
            ],
        )
        .unwrap();
        set
    }

    /// (session, sorted targets, body) of a forwarded datagram.
    fn routed(
        t: &mut SessionTable,
        client: u16,
        datagram: &[u8],
        now: Instant,
    ) -> (SessionId, Vec<u16>, Range<usize>) {
        match t.on_datagram(0, addr(client), datagram, false, now) {
            ClientVerdict::Forward {
                id, targets, body, ..
            } => {
                let mut ports: Vec<u16> = targets.iter().map(SocketAddr::port).collect();
                ports.sort_unstable();
                (id, ports, body)
            }
            other => panic!("{datagram:?} not forwarded: {other:?}"),
        }
    }

    #[test]
    fn suffix_tokens_route_each_game_to_its_replicas_and_are_cut_off() {
        let now = crate::epoch();
        let set = two_games(copies());
        let mut t = routing_table(&set, TokenAt::Suffix);
        let (_, targets, body) = routed(&mut t, 5000, b"move left|aaaa", now);
        assert_eq!((targets, body), (vec![7001, 7002], 0..10));
        let (_, targets, body) = routed(&mut t, 5001, b"jump|bbbb", now);
        assert_eq!((targets, body), (vec![7101, 7102], 0..5));
    }

    #[test]
    fn prefix_tokens_are_read_and_cut_at_the_start() {
        let now = crate::epoch();
        let set = two_games(copies());
        let mut t = routing_table(&set, TokenAt::Prefix);
        let (_, targets, body) = routed(&mut t, 5000, b"bbbb|jump", now);
        assert_eq!((targets, body), (vec![7101, 7102], 4..9));
        // The same bytes at the end route nowhere.
        assert_eq!(
            t.on_datagram(0, addr(5000), b"jump|bbbb", false, now),
            ClientVerdict::Drop(DropReason::UnknownToken)
        );
    }

    #[test]
    fn short_datagrams_and_unknown_tokens_are_dropped_and_open_nothing() {
        let now = crate::epoch();
        let set = two_games(copies());
        let mut t = routing_table(&set, TokenAt::Suffix);
        for (datagram, reason) in [
            (&b"aaa"[..], DropReason::UnknownToken),
            (b"", DropReason::UnknownToken),
            (b"hello|zzzz", DropReason::UnknownToken),
            (b"aaaa", DropReason::Empty),
        ] {
            assert_eq!(
                t.on_datagram(0, addr(5000), datagram, false, now),
                ClientVerdict::Drop(reason),
                "{datagram:?}"
            );
        }
        assert_eq!(
            t.on_client(0, addr(5000), 10, now),
            ClientVerdict::Drop(DropReason::UnknownToken),
            "no implicit game to fall into"
        );
        assert!(t.is_empty());
        let mut big = vec![0u8; 1501];
        big[1497..].copy_from_slice(b"aaaa");
        assert_eq!(
            t.on_datagram(0, addr(5000), &big, false, now),
            ClientVerdict::Drop(DropReason::Oversized),
            "the limit counts the token"
        );
    }

    #[test]
    fn a_client_switching_token_is_a_new_session_for_the_new_game() {
        let now = crate::epoch();
        let set = two_games(copies());
        let mut t = routing_table(&set, TokenAt::Suffix);
        let (a, _, _) = routed(&mut t, 5000, b"x|aaaa", now);
        let (b, targets, _) = routed(&mut t, 5000, b"x|bbbb", now);
        assert_ne!(a, b, "same client, other game: another session");
        assert_eq!(targets, vec![7101, 7102]);
        assert_eq!(t.len(), 2);
        assert_eq!(t.get(a).map(|s| s.game), t.game_id("arena"));
        assert_eq!(t.get(b).map(|s| s.game), t.game_id("bazaar"));
        // Each session hears only its own game's replicas.
        assert!(matches!(
            t.on_answer(a, addr(7001), b"state", now),
            AnswerVerdict::Deliver { .. }
        ));
        assert_eq!(
            t.on_answer(a, addr(7101), b"state", now),
            AnswerVerdict::Drop(DropReason::NotReplica)
        );
        // Back on the first token: the first session again.
        assert_eq!(routed(&mut t, 5000, b"y|aaaa", now).0, a);
    }

    #[test]
    fn each_game_deduplicates_by_its_own_mode() {
        let now = crate::epoch();
        let set = two_games(Mode::Primary {
            failover_after: Duration::from_millis(50),
        });
        let mut t = routing_table(&set, TokenAt::Suffix);
        let (a, _, _) = routed(&mut t, 5000, b"x|aaaa", now);
        let (b, _, _) = routed(&mut t, 5001, b"x|bbbb", now);
        // arena (copies): the same payload from both replicas is delivered once.
        assert!(matches!(
            t.on_answer(a, addr(7001), b"s1", now),
            AnswerVerdict::Deliver { .. }
        ));
        assert_eq!(
            t.on_answer(a, addr(7002), b"s1", now),
            AnswerVerdict::Duplicate {
                behind: Some(Duration::ZERO)
            }
        );
        assert!(matches!(
            t.on_answer(a, addr(7002), b"s2", now),
            AnswerVerdict::Deliver { .. }
        ));
        // bazaar (primary): only the primary's answers pass, whatever their bytes.
        let primary = t.get(b).unwrap().members().targets()[0];
        let other = if primary == addr(7101) {
            addr(7102)
        } else {
            addr(7101)
        };
        assert!(matches!(
            t.on_answer(b, primary, b"p1", now),
            AnswerVerdict::Deliver { .. }
        ));
        assert_eq!(
            t.on_answer(b, other, b"o1", now),
            AnswerVerdict::Duplicate { behind: None }
        );
    }

    #[test]
    fn a_game_that_leaves_closes_its_sessions_only_and_its_token_stops_routing() {
        let now = crate::epoch();
        let set = two_games(copies());
        let mut t = routing_table(&set, TokenAt::Suffix);
        let (a, _, _) = routed(&mut t, 5000, b"x|aaaa", now);
        let (b, _, _) = routed(&mut t, 5001, b"x|bbbb", now);
        set.publish_games(
            spec(TokenAt::Suffix),
            vec![game("arena", b"aaaa", &[7001, 7002], copies())],
        )
        .unwrap();
        let mut closed = Vec::new();
        t.apply(set.snapshot(), now, &mut closed);
        let closed: Vec<_> = closed.iter().map(|c| (c.id, c.reason)).collect();
        assert_eq!(closed, vec![(b, CloseReason::NoReplicas)]);
        assert!(t.get(a).is_some(), "the other game's session stays");
        assert_eq!(t.game_id("bazaar"), None);
        assert_eq!(
            t.on_datagram(0, addr(5001), b"x|bbbb", false, now),
            ClientVerdict::Drop(DropReason::UnknownToken)
        );
        // It comes back with other replicas: a fresh session there.
        set.publish_games(
            spec(TokenAt::Suffix),
            vec![
                game("arena", b"aaaa", &[7001, 7002], copies()),
                game("bazaar", b"bbbb", &[7201], copies()),
            ],
        )
        .unwrap();
        apply(&mut t, set.snapshot(), now);
        assert_eq!(routed(&mut t, 5001, b"x|bbbb", now).1, vec![7201]);
        assert_eq!(routed(&mut t, 5000, b"y|aaaa", now).0, a);
    }

    fn counted(set: &ReplicaSet, name: &str) -> GameTally {
        let snapshot = set.snapshot();
        let g = snapshot.games.iter().find(|g| &*g.name == name).unwrap();
        g.counters.read()
    }

    #[test]
    fn each_game_counts_its_traffic_and_two_tables_add_up() {
        let now = crate::epoch();
        let set = two_games(copies());
        let mut t1 = routing_table(&set, TokenAt::Suffix);
        let mut t2 = routing_table(&set, TokenAt::Suffix);
        let (a, _, _) = routed(&mut t1, 5000, b"x|aaaa", now);
        routed(&mut t1, 5000, b"y|aaaa", now);
        routed(&mut t2, 5001, b"x|aaaa", now);
        routed(&mut t2, 5002, b"x|bbbb", now);
        assert_eq!(
            t1.on_datagram(0, addr(5000), b"aaaa", false, now),
            ClientVerdict::Drop(DropReason::Empty)
        );
        assert!(matches!(
            t1.on_answer(a, addr(7001), b"s1", now),
            AnswerVerdict::Deliver { .. }
        ));
        assert_eq!(
            t1.on_answer(a, addr(7002), b"s1", now),
            AnswerVerdict::Duplicate {
                behind: Some(Duration::ZERO)
            }
        );
        assert_eq!(
            counted(&set, "arena"),
            GameTally::default(),
            "until a flush"
        );
        t1.flush_games();
        t2.flush_games();
        assert_eq!(
            counted(&set, "arena"),
            GameTally {
                sessions: 2,
                packets: 4,
                delivered: 1,
                drops: 1,
            }
        );
        assert_eq!(counted(&set, "bazaar").sessions, 1);
        // A republish keeps the counters; closing sessions brings the count down.
        set.publish_games(
            spec(TokenAt::Suffix),
            vec![
                game("arena", b"aaaa", &[7001], copies()),
                game("bazaar", b"bbbb", &[7101, 7102], copies()),
            ],
        )
        .unwrap();
        assert_eq!(counted(&set, "arena").packets, 4);
        let mut closed = Vec::new();
        t1.expire(now + Duration::from_secs(3600), &mut closed);
        t1.flush_games();
        assert_eq!(counted(&set, "arena").sessions, 1);
        // No flush without news: the hot path's tallies only.
        t1.flush_games();
        assert_eq!(counted(&set, "arena").sessions, 1);
    }

    #[test]
    fn a_replica_change_in_one_game_leaves_the_other_alone() {
        let now = crate::epoch();
        let set = two_games(copies());
        let mut t = routing_table(&set, TokenAt::Suffix);
        let (a, _, _) = routed(&mut t, 5000, b"x|aaaa", now);
        let (b, _, _) = routed(&mut t, 5001, b"x|bbbb", now);
        set.publish_games(
            spec(TokenAt::Suffix),
            vec![
                game("arena", b"aaaa", &[7001, 7002], copies()),
                game("bazaar", b"bbbb", &[7102], copies()),
            ],
        )
        .unwrap();
        let report = apply(&mut t, set.snapshot(), now);
        assert_eq!(report.sessions_changed, 1);
        assert_eq!(report.degraded, 1);
        assert_eq!(t.get(b).unwrap().members().targets(), [addr(7102)]);
        assert_eq!(t.get(a).unwrap().members().targets().len(), 2);
    }

    #[test]
    fn a_set_with_a_shared_or_misfit_token_is_refused_whole() {
        let set = two_games(copies());
        let before = set.snapshot();
        let e = set
            .publish_games(
                spec(TokenAt::Suffix),
                vec![
                    game("arena", b"aaaa", &[7001], copies()),
                    game("bazaar", b"aaaa", &[7101], copies()),
                ],
            )
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "token aa… (4 bytes) belongs to both arena and bazaar"
        );
        assert!(
            set.publish_games(
                spec(TokenAt::Suffix),
                vec![game("arena", b"aaaaa", &[7001], copies())]
            )
            .is_err()
        );
        assert_eq!(set.snapshot(), before, "nothing changed");
    }
}
