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

use crate::dedupe::{Agreement, Changes, Deduper, MAX_SLOTS, Mode, Slot, SlotState, Verdict};
use crate::proxy_header::ReplicaHeader;
use crate::ratelimit::{Allowance, Limiter, Rate};
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
    /// A new session of a game that holds its `max_sessions` already.
    GameSessionLimit,
    /// Over its game's `max_pps`, the budget all of the game's players share.
    GameRateLimited,
    /// A datagram another Spotable proxy (or this one) sent to a replica, come back in as a
    /// player's: two proxies pointed at each other would pass it back and forth for ever.
    Loop,
}

impl DropReason {
    /// Every reason, for pre-registering metrics.
    pub const ALL: [DropReason; 15] = [
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
        DropReason::GameSessionLimit,
        DropReason::GameRateLimited,
        DropReason::Loop,
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
            DropReason::GameSessionLimit => "game_session_limit",
            DropReason::GameRateLimited => "game_rate_limited",
            DropReason::Loop => "loop",
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
    /// Its last live replica was reported unreachable (ICMP port or host unreachable): gone
    /// before discovery says so.
    Unreachable,
}

impl CloseReason {
    /// Every reason, for pre-registering metrics.
    pub const ALL: [CloseReason; 5] = [
        CloseReason::Idle,
        CloseReason::NoReplicas,
        CloseReason::FromReplica,
        CloseReason::SocketError,
        CloseReason::Unreachable,
    ];

    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Idle => "idle",
            CloseReason::NoReplicas => "no_replicas",
            CloseReason::FromReplica => "from_replica",
            CloseReason::SocketError => "socket_error",
            CloseReason::Unreachable => "unreachable",
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
    /// `copies` and `sequence`: agreement before trust (see [`crate::dedupe::trust`]).
    pub agreement: Agreement,
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
    /// A routed game's limit on its open sessions (over every worker); `None` for none. The
    /// implicit game has only the proxy's `--max-sessions`.
    pub max_sessions: Option<usize>,
    /// A routed game's packet budget: its players' datagrams per second together, over every
    /// worker; `None` for none.
    pub max_pps: Option<Rate>,
}

/// The global session budget, shared by all workers' tables. One atomic touched per session
/// open and close, never per packet. It also holds the counters of the implicit game (a
/// proxy without token routing), which the tables share as they share a routed game's.
#[derive(Debug, Clone)]
pub struct Admission {
    in_use: Arc<AtomicUsize>,
    max: usize,
    implicit: Arc<GameCounters>,
}

impl Admission {
    /// A budget of `max` sessions.
    pub fn new(max: usize) -> Self {
        Self {
            in_use: Arc::new(AtomicUsize::new(0)),
            max,
            implicit: Arc::default(),
        }
    }

    /// The implicit game's counters (a proxy without token routing).
    pub fn implicit_game(&self) -> Arc<GameCounters> {
        self.implicit.clone()
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
    /// Per slot: since when another replica has answered while this one has not (it owes an
    /// answer). A replica that owes one for [`SILENT_AFTER`] is silent in this session.
    owed: Vec<Option<Instant>>,
    /// Per slot: when its replica last answered.
    heard_at: Vec<Option<Instant>>,
}

/// How long a replica may owe an answer that another replica gave before it counts as silent
/// in a session: half the default dedupe window, the lag a replica may have and still agree.
pub const SILENT_AFTER: Duration = Duration::from_secs(1);

impl Members {
    fn new(replicas: Vec<crate::replicas::Replica>, client: SocketAddr) -> Self {
        let mut m = Members {
            addrs: replicas.iter().map(|r| r.addr).collect(),
            states: replicas.iter().map(|r| slot_state(Some(r.state))).collect(),
            targets: Vec::new(),
            wanted: replicas.len(),
            owed: vec![None; replicas.len()],
            heard_at: vec![None; replicas.len()],
        };
        m.rebuild_targets(client);
        m
    }

    /// `slot` answered at `now`: it owes nothing, and every other live replica owes this one.
    fn heard(&mut self, slot: Slot, now: Instant) {
        if let Some(h) = self.heard_at.get_mut(slot) {
            *h = Some(now);
        }
        for (i, (owed, state)) in self.owed.iter_mut().zip(&self.states).enumerate() {
            if i == slot {
                *owed = None;
            } else if owed.is_none() && state.is_live() {
                *owed = Some(now);
            }
        }
    }

    /// Live replicas that have owed an answer for [`SILENT_AFTER`] at `now`.
    pub fn silent(&self, now: Instant) -> impl Iterator<Item = SocketAddr> + '_ {
        self.addrs
            .iter()
            .zip(&self.states)
            .zip(&self.owed)
            .filter(move |((_, s), owed)| {
                s.is_live()
                    && owed.is_some_and(|t| now.saturating_duration_since(t) >= SILENT_AFTER)
            })
            .map(|((a, _), _)| *a)
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
        // A replica that moved keeps its slot at its new address: the same game, the same
        // players, the same upstream socket (the game still knows each player by it).
        for m in &snapshot.moves {
            let taken = self.addrs.contains(&m.to);
            if let Some(slot) = self.addrs.iter().position(|a| *a == m.from)
                && !taken
                && snapshot.state_of(m.to).is_some()
            {
                self.addrs[slot] = m.to;
                changed = true;
            }
        }
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
                self.owed[slot] = None;
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
                        self.owed[slot] = None;
                        self.heard_at[slot] = None;
                        slot
                    }
                    None if self.addrs.len() < MAX_SLOTS => {
                        self.addrs.push(r.addr);
                        self.states.push(SlotState::Ready);
                        self.owed.push(None);
                        self.heard_at.push(None);
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

    /// Where the session stands on trusting its replicas (`None`: agreement does not apply).
    pub fn stage(&self) -> Option<crate::dedupe::Stage> {
        self.dedupe.stage()
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

/// What a replica's unreachable report did to its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UnreachableReport {
    /// The replica was the one delivering alone, and another took over.
    pub failover: bool,
    /// It was the session's last live replica: the session closed.
    pub closed: Option<Closed>,
}

/// How long a replica reported unreachable is passed over by new sessions, unless it is heard
/// from first: long enough for the player's next datagrams, short enough that a restarted
/// process at the same address is soon used again.
pub const UNREACHABLE_FOR: Duration = Duration::from_secs(1);

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
    /// This worker's grant of the game's packet budget.
    allowance: Allowance,
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
    /// Games whose divergence is due in the log.
    divergent: Vec<Arc<str>>,
    /// Replicas that answer no session while others answer (see [`Self::review`]).
    unresponsive: Vec<SocketAddr>,
    /// Replicas reported unreachable (ICMP), and when last.
    unreachable: Vec<(SocketAddr, Instant)>,
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
            divergent: Vec::new(),
            unresponsive: Vec::new(),
            unreachable: Vec::new(),
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
        let Some(g) = self.games.get_mut(game) else {
            return ClientVerdict::Drop(DropReason::NoReplicas);
        };
        g.tally.packets += 1;
        // Counted as dropped until it is forwarded.
        g.tally.drops += 1;
        if body.is_empty() {
            return ClientVerdict::Drop(DropReason::Empty);
        }
        // Before any session is looked up or opened: a game over its budget costs the others
        // no more than reading its datagrams.
        if let Some(rate) = g.settings.max_pps
            && !g.allowance.allow(g.counters.budget(), rate, now)
        {
            return ClientVerdict::Drop(DropReason::GameRateLimited);
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
        session.dedupe.on_request(now);
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
        let chosen = if self.unreachable.is_empty() {
            g.replicas
                .for_new_session(client, limit, &self.unresponsive)
        } else {
            // A replica the kernel just reported dead is left out while any other is there.
            let passed_over = self.passed_over(now);
            let mut chosen = g.replicas.for_new_session(client, limit, &passed_over);
            let dead = |r: &crate::replicas::Replica| {
                self.unreachable.iter().any(|(a, at)| {
                    *a == r.addr && now.saturating_duration_since(*at) < UNREACHABLE_FOR
                })
            };
            if chosen.iter().any(|r| !dead(r)) {
                chosen.retain(|r| !dead(r));
            }
            chosen
        };
        let members = Members::new(chosen, client);
        if members.targets.is_empty() {
            return Err(DropReason::NoReplicas);
        }
        if !g.counters.try_open(g.settings.max_sessions) {
            return Err(DropReason::GameSessionLimit);
        }
        if !self.admission.try_acquire() {
            g.counters.release(1);
            return Err(DropReason::SessionLimit);
        }
        let seed = self.seed ^ (self.sessions.vacant_key() as u64).rotate_left(17);
        let dedupe = Deduper::new(
            &g.settings.mode,
            g.settings.agreement,
            g.counters.is_divergent(),
            seed,
            now,
            &members.states,
        );
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
        Ok(id)
    }

    /// Replicas new sessions put last: unresponsive, or reported unreachable lately.
    fn passed_over(&self, now: Instant) -> Vec<SocketAddr> {
        let mut v = self.unresponsive.clone();
        v.extend(
            self.unreachable
                .iter()
                .filter(|(_, at)| now.saturating_duration_since(*at) < UNREACHABLE_FOR)
                .map(|(a, _)| *a),
        );
        v
    }

    /// The kernel tied an ICMP port or host unreachable to a datagram session `id` sent to
    /// `replica`: its process (or host) is gone, whatever discovery says yet. It leaves the
    /// session at once, as if discovery had removed it: the primary (or the one replica a
    /// session not yet in agreement delivers) fails over now rather than after
    /// `--failover-after` of silence, and a session left with no live replica closes, so the
    /// player's next datagram opens a fresh one. Should discovery still list it later, it takes
    /// its slot back as any returning replica does.
    pub fn on_unreachable(
        &mut self,
        id: SessionId,
        replica: SocketAddr,
        now: Instant,
    ) -> UnreachableReport {
        let Some(session) = self.sessions.get_mut(id) else {
            return UnreachableReport::default();
        };
        let Some(slot) = session.members.slot_of(replica) else {
            return UnreachableReport::default();
        };
        match self.unreachable.iter_mut().find(|(a, _)| *a == replica) {
            Some((_, at)) => *at = now,
            None => self.unreachable.push((replica, now)),
        }
        session.members.states[slot] = SlotState::Gone;
        session.members.owed[slot] = None;
        session.members.rebuild_targets(session.client);
        if session.members.live() == 0 {
            let closed = Closed {
                id,
                client: session.client,
                reason: CloseReason::Unreachable,
            };
            self.close(id);
            return UnreachableReport {
                failover: false,
                closed: Some(closed),
            };
        }
        UnreachableReport {
            failover: session
                .dedupe
                .on_slots_changed(&session.members.states, now),
            closed: None,
        }
    }

    /// Replicas reported unreachable within [`UNREACHABLE_FOR`] of `now` and not heard from
    /// since; forgets the rest.
    pub fn unreachable(&mut self, now: Instant) -> impl Iterator<Item = SocketAddr> + '_ {
        self.unreachable
            .retain(|(_, at)| now.saturating_duration_since(*at) < UNREACHABLE_FOR);
        self.unreachable.iter().map(|(a, _)| *a)
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
        session.members.heard(slot, now);
        if !self.unreachable.is_empty() {
            self.unreachable.retain(|(a, _)| *a != from);
        }
        let verdict = session
            .dedupe
            .on_answer(slot, payload, now, &session.members.states);
        let changes = session.dedupe.take_changes();
        if changes != Changes::default()
            && let Some(g) = self.games.get_mut(session.game)
        {
            g.tally.promoted += u64::from(changes.promoted);
            g.tally.demoted += u64::from(changes.demoted);
            if changes.demoted
                && g.counters.mark_divergent(&g.replicas.replicas, now)
                && !self.divergent.contains(&g.name)
            {
                self.divergent.push(g.name.clone());
            }
        }
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
            if let Some(g) = self.games.get(s.game) {
                g.counters.release(1);
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
                Some(g) => {
                    g.counters.replicas_changed(&snapshot.replicas);
                    g.replicas = snapshot.clone();
                }
                None => {
                    let implicit = GameState {
                        name: Arc::from(""),
                        replicas: snapshot.clone(),
                        settings: self.settings.clone(),
                        counters: self.admission.implicit_game(),
                        tally: GameTally::default(),
                        allowance: Allowance::default(),
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
                                let open = open.count();
                                let g = &mut self.games[id];
                                g.flush();
                                g.counters.release(open);
                                game.counters.carry(open);
                                g.counters = game.counters.clone();
                            }
                            let g = &mut self.games[id];
                            g.counters.replicas_changed(&game.replicas.replicas);
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
                                allowance: Allowance::default(),
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

    /// Games newly seen to diverge, whose divergence is due in the log, since the last call.
    pub fn take_divergent(&mut self, out: &mut Vec<Arc<str>>) {
        out.append(&mut self.divergent);
    }

    /// Looks for replicas that answer no session while others answer (each owes answers in
    /// some session for [`SILENT_AFTER`] and gave none in that time): new sessions pass them
    /// over until they answer again. Runs on the worker's tick; O(sessions).
    pub fn review(&mut self, now: Instant) {
        self.unresponsive.clear();
        for (_, s) in &self.sessions {
            for addr in s.members.silent(now) {
                if !self.unresponsive.contains(&addr) {
                    self.unresponsive.push(addr);
                }
            }
        }
        if self.unresponsive.is_empty() {
            return;
        }
        // A replica heard in any session lately is alive, if slow to some.
        for (_, s) in &self.sessions {
            for (addr, heard) in s.members.addrs.iter().zip(&s.members.heard_at) {
                if heard.is_some_and(|h| now.saturating_duration_since(h) < SILENT_AFTER) {
                    self.unresponsive.retain(|a| a != addr);
                }
            }
        }
        self.unresponsive.sort_unstable();
    }

    /// Replicas passed over for new sessions as of the last [`Self::review`].
    pub fn unresponsive(&self) -> &[SocketAddr] {
        &self.unresponsive
    }
}

impl Drop for SessionTable {
    fn drop(&mut self) {
        for (_, s) in &self.sessions {
            self.admission.release();
            if let Some(g) = self.games.get(s.game) {
                g.counters.release(1);
            }
        }
    }
}

#[cfg(test)]
mod quota_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod trust_tests;
