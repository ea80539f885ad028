//! The replica set: who the game-server replicas are, and the one interface through which
//! every discovery source (static list, Kubernetes) changes it.
//!
//! A source publishes complete snapshots; the data plane never sees partial updates. Workers
//! are woken and pick up the newest snapshot between packet batches, so publishing costs the
//! hot path nothing.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

/// Lifecycle of one replica as discovery sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ReplicaState {
    /// Serving and not terminating.
    Ready,
    /// Terminating but still serving: keeps its sessions' traffic, is never primary, takes no
    /// new sessions.
    Draining,
}

impl ReplicaState {
    /// Label value used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::Ready => "ready",
            ReplicaState::Draining => "draining",
        }
    }
}

/// One replica endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Replica {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it may be used for.
    pub state: ReplicaState,
}

impl Replica {
    /// A ready replica at `addr`.
    pub fn ready(addr: SocketAddr) -> Self {
        Self {
            addr,
            state: ReplicaState::Ready,
        }
    }
}

/// An immutable, complete view of the replica set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Increases with every publish.
    pub version: u64,
    /// Sorted by address, one entry per address. With games, every game's replicas.
    pub replicas: Vec<Replica>,
    /// The games behind a token-routing proxy, by name; empty without token routing.
    pub games: Vec<Game>,
    /// Replicas that moved (a game carried to a landing pad): each old address and the new
    /// one, a member of this set. Sessions on the old one go on on the new, in place.
    pub moves: Vec<Move>,
}

/// A replica that moved: the same game, at a new address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Move {
    /// Where it was.
    pub from: SocketAddr,
    /// Where it is.
    pub to: SocketAddr,
}

/// One game behind a token-routing proxy: a group of redundant replicas, reached through
/// its tokens, with its own dedupe settings.
#[derive(Debug, Clone)]
pub struct Game {
    /// Its name (a Service's `spotable.io/game` label, a `[[game]]` table's `name`).
    pub name: Arc<str>,
    /// Tokens that route to it, each of the proxy's token length.
    pub tokens: Vec<Vec<u8>>,
    /// Its replicas (sorted by address, one entry per address; `games` empty).
    pub replicas: Arc<Snapshot>,
    /// Its settings: the proxy's, with the game's own dedupe mode and fan-out.
    pub settings: Arc<crate::session::Settings>,
    /// What the workers counted for it, as of their last tick. Kept across publishes while
    /// the game stays in the set; not part of its identity.
    pub counters: Arc<GameCounters>,
}

impl PartialEq for Game {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.tokens == other.tokens
            && self.replicas == other.replicas
            && self.settings == other.settings
    }
}

impl Eq for Game {}

/// A game's traffic, summed over the workers. Workers add their own tallies on every tick, so
/// no shared cache line is written per packet. Its open sessions are counted exactly (a
/// session opening or closing touches them once) and its packet budget is drawn in grants:
/// both are what hold a game to its share of the proxy.
#[derive(Debug, Default)]
pub struct GameCounters {
    /// Sessions open now, over every worker's table.
    open: AtomicUsize,
    /// Its `max_pps`, shared by the workers.
    budget: crate::ratelimit::SharedBudget,
    packets: AtomicU64,
    delivered: AtomicU64,
    drops: AtomicU64,
    promoted: AtomicU64,
    demoted: AtomicU64,
    /// Its sessions' replicas were seen to diverge: new sessions start as `primary` would.
    divergent: AtomicBool,
    /// The replicas it diverged among, and when it was last logged.
    divergence: Mutex<Divergence>,
}

#[derive(Debug, Default)]
struct Divergence {
    among: Vec<SocketAddr>,
    logged: Option<Instant>,
}

/// How often a game's divergence is logged at most.
pub const DIVERGENCE_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// One worker's additions to a [`GameCounters`] since its last flush.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GameTally {
    /// Client datagrams routed to the game.
    pub packets: u64,
    /// Answers delivered to its players.
    pub delivered: u64,
    /// Its players' datagrams dropped after routing (rate, session limit, no replica…).
    pub drops: u64,
    /// Sessions that began to trust a second replica (agreement before trust).
    pub promoted: u64,
    /// Sessions that fell back to one replica because their replicas diverged.
    pub demoted: u64,
}

impl GameCounters {
    /// Adds a worker's tally.
    pub fn add(&self, t: GameTally) {
        self.packets.fetch_add(t.packets, Ordering::Relaxed);
        self.delivered.fetch_add(t.delivered, Ordering::Relaxed);
        self.drops.fetch_add(t.drops, Ordering::Relaxed);
        self.promoted.fetch_add(t.promoted, Ordering::Relaxed);
        self.demoted.fetch_add(t.demoted, Ordering::Relaxed);
    }

    /// The sums so far.
    pub fn read(&self) -> GameTally {
        GameTally {
            packets: self.packets.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            drops: self.drops.load(Ordering::Relaxed),
            promoted: self.promoted.load(Ordering::Relaxed),
            demoted: self.demoted.load(Ordering::Relaxed),
        }
    }

    /// Sessions of the game open now.
    pub fn sessions(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Counts a session opening unless `max` are open already.
    pub fn try_open(&self, max: Option<usize>) -> bool {
        let max = max.unwrap_or(usize::MAX);
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Counts `n` sessions that are open already (moved here from another counter), over any
    /// limit: the limit refuses new sessions, never ones that exist.
    pub fn carry(&self, n: usize) {
        self.open.fetch_add(n, Ordering::AcqRel);
    }

    /// Counts `n` sessions closing (or moving to another counter).
    pub fn release(&self, n: usize) {
        // Never below zero, whatever a caller gets wrong: a count that wrapped would refuse
        // every new session of the game forever.
        let _ = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |o| {
                Some(o.saturating_sub(n))
            });
    }

    /// The game's packet budget.
    pub fn budget(&self) -> &crate::ratelimit::SharedBudget {
        &self.budget
    }

    /// Whether the game's replicas were seen to diverge (and it has not been tried again).
    pub fn is_divergent(&self) -> bool {
        self.divergent.load(Ordering::Acquire)
    }

    /// Marks the game divergent: a session saw its replicas among `replicas` in two worlds.
    /// True when `now` is the time to say so in the log (at most once a minute).
    pub fn mark_divergent(&self, replicas: &[Replica], now: Instant) -> bool {
        let mut d = self
            .divergence
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !self.divergent.swap(true, Ordering::AcqRel) {
            d.among = replicas.iter().map(|r| r.addr).collect();
        }
        let due = d
            .logged
            .is_none_or(|at| now.saturating_duration_since(at) >= DIVERGENCE_LOG_INTERVAL);
        if due {
            d.logged = Some(now);
        }
        due
    }

    /// The game's replicas are now `replicas`: once none of those it diverged among is left
    /// (a new build replaced them all), it is tried again.
    pub fn replicas_changed(&self, replicas: &[Replica]) {
        if !self.is_divergent() {
            return;
        }
        let mut d = self
            .divergence
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let replaced = !replicas.iter().any(|r| d.among.contains(&r.addr));
        if replaced && self.divergent.swap(false, Ordering::AcqRel) {
            d.among.clear();
        }
    }
}

/// A game as a discovery source reports it, before it is published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GameSpec {
    /// See [`Game::name`].
    pub name: Arc<str>,
    /// See [`Game::tokens`].
    pub tokens: Vec<Vec<u8>>,
    /// Its replicas, in any order.
    pub replicas: Vec<Replica>,
    /// See [`Game::settings`].
    pub settings: Arc<crate::session::Settings>,
}

impl Snapshot {
    /// The state of `addr`, if it is a member.
    pub fn state_of(&self, addr: SocketAddr) -> Option<ReplicaState> {
        self.replicas
            .binary_search_by(|r| r.addr.cmp(&addr))
            .ok()
            .map(|i| self.replicas[i].state)
    }

    /// Members a new session of `client` should use, at most `limit`: the ready replicas
    /// ranked highest for this client (see [`rank`]), or the draining ones when nothing else is
    /// left (a draining replica still answers; silence does not). Replicas in `passed_over`
    /// (answering no session while others answer) come after all the others.
    pub fn for_new_session(
        &self,
        client: SocketAddr,
        limit: usize,
        passed_over: &[SocketAddr],
    ) -> Vec<Replica> {
        let any_ready = self.replicas.iter().any(|r| r.state == ReplicaState::Ready);
        let wanted = if any_ready {
            ReplicaState::Ready
        } else {
            ReplicaState::Draining
        };
        let mut ranked = self.ranked(client, wanted);
        if !passed_over.is_empty() {
            // A stable sort keeps the rendezvous order within each group.
            ranked.sort_by_key(|r| passed_over.contains(&r.addr));
        }
        ranked.truncate(limit);
        ranked
    }

    /// Replicas in `state`, best first for `client`.
    pub fn ranked(&self, client: SocketAddr, state: ReplicaState) -> Vec<Replica> {
        let mut v: Vec<(u64, Replica)> = self
            .replicas
            .iter()
            .filter(|r| r.state == state)
            .map(|r| (rank(client, r.addr), *r))
            .collect();
        v.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.addr.cmp(&b.1.addr)));
        v.into_iter().map(|(_, r)| r).collect()
    }

    /// How many replicas are in `state`.
    pub fn count(&self, state: ReplicaState) -> usize {
        self.replicas.iter().filter(|r| r.state == state).count()
    }
}

/// Rendezvous (highest-random-weight) score of `replica` for `client`.
///
/// The hash is unkeyed on purpose: every proxy instance behind the load balancer must rank
/// the same replicas first for the same player, and removing a replica changes the choice
/// only for the players that had it.
pub fn rank(client: SocketAddr, replica: SocketAddr) -> u64 {
    let mut buf = [0u8; 36];
    let mut n = 0;
    for addr in [client, replica] {
        let ip = match addr.ip() {
            std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            std::net::IpAddr::V6(v6) => v6.octets(),
        };
        buf[n..n + 16].copy_from_slice(&ip);
        buf[n + 16..n + 18].copy_from_slice(&addr.port().to_be_bytes());
        n += 18;
    }
    xxhash_rust::xxh3::xxh3_64(&buf)
}

/// Something to poke when a new snapshot is published (a worker's event-loop waker).
pub trait Notify: Send + Sync {
    /// Called after every publish; must not block.
    fn notify(&self);
}

/// Shared handle to the replica set: discovery publishes, workers read.
#[derive(Clone, Default)]
pub struct ReplicaSet {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    current: Mutex<Arc<Snapshot>>,
    subscribers: Mutex<Vec<Arc<dyn Notify>>>,
    synced: AtomicBool,
    /// Since when the source has been failing; `None` while it is healthy.
    out_of_sync: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for ReplicaSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaSet")
            .field("current", &self.snapshot())
            .field("synced", &self.is_synced())
            .finish()
    }
}

impl ReplicaSet {
    /// An empty, not yet synced set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the whole set. Duplicate addresses collapse to one entry; `Ready` wins over
    /// `Draining` (the more recent or more capable report). Marks the set synced. Returns
    /// whether the set changed.
    pub fn publish(&self, replicas: Vec<Replica>) -> bool {
        self.publish_with_moves(replicas, Vec::new())
    }

    /// [`Self::publish`], with the replicas that moved (discovery reports them). A replica
    /// that moved is gone from its old address, whatever a stale report still says of it.
    pub fn publish_with_moves(&self, mut replicas: Vec<Replica>, mut moves: Vec<Move>) -> bool {
        moves.sort();
        moves.dedup();
        replicas.retain(|r| !moves.iter().any(|m| m.from == r.addr));
        self.replace(normalized(replicas), Vec::new(), moves)
    }

    /// Replaces the whole set with `games` (token routing): each game's replicas normalised
    /// as [`publish`](Self::publish) does. Refuses (changing nothing) a token of another
    /// length than `spec`'s or one claimed by two games. Marks the set synced; `Ok(true)`
    /// when it changed.
    pub fn publish_games(
        &self,
        spec: crate::token::TokenSpec,
        mut specs: Vec<GameSpec>,
    ) -> Result<bool, crate::token::TokenError> {
        specs.sort_by(|a, b| a.name.cmp(&b.name));
        specs.dedup_by(|a, b| a.name == b.name);
        let previous = self.snapshot();
        crate::token::TokenRouter::new(
            spec,
            specs.iter().map(|g| (GameName(&g.name), &g.tokens[..])),
        )?;
        let mut all = Vec::new();
        let games = specs
            .into_iter()
            .map(|g| {
                let replicas = normalized(g.replicas);
                all.extend_from_slice(&replicas);
                (g.name, g.tokens, replicas, g.settings)
            })
            .collect::<Vec<_>>();
        let all = normalized(all);
        let games = games
            .into_iter()
            .map(|(name, tokens, replicas, settings)| Game {
                counters: previous
                    .games
                    .binary_search_by(|g| g.name.cmp(&name))
                    .map(|i| previous.games[i].counters.clone())
                    .unwrap_or_default(),
                name,
                tokens,
                // A game's own view carries no version: the set's version covers it.
                replicas: Arc::new(Snapshot {
                    version: 0,
                    replicas,
                    games: Vec::new(),
                    moves: Vec::new(),
                }),
                settings,
            })
            .collect();
        Ok(self.replace(all, games, Vec::new()))
    }

    fn replace(&self, replicas: Vec<Replica>, games: Vec<Game>, moves: Vec<Move>) -> bool {
        self.heard();
        {
            let mut current = self
                .inner
                .current
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if current.replicas == replicas
                && current.games == games
                && current.moves == moves
                && self.is_synced()
            {
                return false;
            }
            let version = current.version + 1;
            *current = Arc::new(Snapshot {
                version,
                replicas,
                games,
                moves,
            });
        }
        self.inner.synced.store(true, Ordering::Release);
        let subscribers = self
            .inner
            .subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        for s in subscribers {
            s.notify();
        }
        true
    }

    /// Records that the source answered (an event, a completed list): the set is as fresh as
    /// the source, however long nothing changed.
    pub fn heard(&self) {
        *self.out_of_sync() = None;
    }

    /// Records that the source failed at `now`; the set is out of sync from the first failure
    /// until the source is heard again.
    pub fn lost(&self, now: Instant) {
        self.out_of_sync().get_or_insert(now);
    }

    /// How long the set has been out of sync with its source at `now`: zero while the source
    /// is healthy, `None` before the first complete set.
    pub fn sync_age(&self, now: Instant) -> Option<std::time::Duration> {
        if !self.is_synced() {
            return None;
        }
        Some(
            self.out_of_sync()
                .map_or(std::time::Duration::ZERO, |since| {
                    now.saturating_duration_since(since)
                }),
        )
    }

    fn out_of_sync(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.inner
            .out_of_sync
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The newest snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// True once a source has published a complete set at least once.
    pub fn is_synced(&self) -> bool {
        self.inner.synced.load(Ordering::Acquire)
    }

    /// Registers a subscriber to be poked on every publish.
    pub fn subscribe(&self, notify: Arc<dyn Notify>) {
        self.inner
            .subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(notify);
    }
}

/// Sorted by address, one entry per address (`Ready` before `Draining`, so Ready wins).
fn normalized(mut replicas: Vec<Replica>) -> Vec<Replica> {
    replicas.sort();
    replicas.dedup_by_key(|r| r.addr);
    replicas
}

/// A game's name where the token router wants something to show in an error.
#[derive(Debug, Clone, Copy)]
struct GameName<'a>(&'a str);

impl std::fmt::Display for GameName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// A snapshot of loopback replicas `127.0.0.1:<port>` in the given states, for tests.
#[cfg(test)]
pub(crate) fn test_snapshot(version: u64, replicas: &[(u16, ReplicaState)]) -> Snapshot {
    Snapshot {
        version,
        replicas: replicas
            .iter()
            .map(|&(port, state)| Replica {
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                state,
            })
            .collect(),
        games: Vec::new(),
        moves: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    struct Count(AtomicUsize);
    impl Notify for Count {
        fn notify(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn publish_sorts_dedups_versions_and_notifies() {
        let set = ReplicaSet::new();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        set.subscribe(count.clone());
        assert!(!set.is_synced());
        set.publish(vec![
            Replica {
                addr: addr(2),
                state: ReplicaState::Draining,
            },
            Replica::ready(addr(1)),
            Replica::ready(addr(2)),
        ]);
        let snap = set.snapshot();
        assert!(set.is_synced());
        assert_eq!(snap.version, 1);
        assert_eq!(
            snap.replicas,
            vec![Replica::ready(addr(1)), Replica::ready(addr(2))]
        );
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        // Publishing the same set again is not a change.
        set.publish(vec![Replica::ready(addr(2)), Replica::ready(addr(1))]);
        assert_eq!(set.snapshot().version, 1);
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_replica_that_moved_is_gone_from_its_old_address_while_a_stale_report_lists_it() {
        // The pad publishes the move before the old pod's endpoint is withdrawn: for that
        // moment both addresses are listed, and the old one must not come back as a replica.
        let set = ReplicaSet::new();
        let moved = Move {
            from: addr(1),
            to: addr(9),
        };
        set.publish_with_moves(
            vec![Replica::ready(addr(1)), Replica::ready(addr(9))],
            vec![moved, moved],
        );
        let snap = set.snapshot();
        assert_eq!(snap.replicas, vec![Replica::ready(addr(9))]);
        assert_eq!(snap.moves, vec![moved]);
        // Once the old endpoint is withdrawn nothing changes.
        assert!(!set.publish_with_moves(vec![Replica::ready(addr(9))], vec![moved]));
    }

    fn snap(replicas: &[(u16, ReplicaState)]) -> Snapshot {
        test_snapshot(1, replicas)
    }

    #[test]
    fn sync_age_grows_only_while_the_source_fails() {
        let set = ReplicaSet::new();
        let t0 = crate::epoch();
        let s = std::time::Duration::from_secs(1);
        assert_eq!(set.sync_age(t0), None, "nothing listed yet");
        set.publish(vec![Replica::ready(addr(1))]);
        // Healthy and idle for a long time: still in sync.
        assert_eq!(set.sync_age(t0 + 600 * s), Some(std::time::Duration::ZERO));
        set.lost(t0 + 10 * s);
        set.lost(t0 + 20 * s);
        assert_eq!(
            set.sync_age(t0 + 25 * s),
            Some(15 * s),
            "from the first failure"
        );
        set.heard();
        assert_eq!(set.sync_age(t0 + 30 * s), Some(std::time::Duration::ZERO));
    }

    #[test]
    fn new_sessions_prefer_ready_replicas() {
        let s = snap(&[
            (1, ReplicaState::Ready),
            (2, ReplicaState::Draining),
            (3, ReplicaState::Ready),
        ]);
        let client = addr(40_000);
        let mut picked: Vec<_> = s
            .for_new_session(client, 16, &[])
            .iter()
            .map(|r| r.addr)
            .collect();
        picked.sort();
        assert_eq!(picked, vec![addr(1), addr(3)]);
        assert_eq!(s.for_new_session(client, 1, &[]).len(), 1);
        let draining_only = snap(&[(2, ReplicaState::Draining)]);
        assert_eq!(draining_only.for_new_session(client, 16, &[]).len(), 1);
        assert_eq!(s.state_of(addr(2)), Some(ReplicaState::Draining));
        assert_eq!(s.state_of(addr(9)), None);
    }

    #[test]
    fn rendezvous_choice_is_stable_and_spread() {
        let all: Vec<_> = (1..=6).map(|p| (p, ReplicaState::Ready)).collect();
        let s = snap(&all);
        let mut load = [0usize; 7];
        for c in 0..600u16 {
            let client = SocketAddr::from(([192, 0, 2, (c % 200) as u8], 30_000 + c));
            let picked = s.for_new_session(client, 2, &[]);
            assert_eq!(picked.len(), 2);
            assert_ne!(picked[0].addr, picked[1].addr);
            // Same client, same choice, whatever the order of discovery.
            let mut shuffled = s.clone();
            shuffled.replicas.reverse();
            assert_eq!(shuffled.for_new_session(client, 2, &[]), picked);
            for r in &picked {
                load[usize::from(r.addr.port())] += 1;
            }
        }
        // 1200 picks over 6 replicas: each near 200.
        for (port, n) in load.iter().enumerate().skip(1) {
            assert!((120..=280).contains(n), "replica {port} got {n}");
        }
    }

    #[test]
    fn removing_a_replica_moves_only_the_clients_that_had_it() {
        let all: Vec<_> = (1..=6).map(|p| (p, ReplicaState::Ready)).collect();
        let before = snap(&all);
        let after = snap(&all[1..]);
        for c in 0..500u16 {
            let client = SocketAddr::from(([198, 51, 100, 7], 20_000 + c));
            let old = before.for_new_session(client, 2, &[]);
            let new = after.for_new_session(client, 2, &[]);
            if old.iter().all(|r| r.addr != addr(1)) {
                assert_eq!(old, new, "client {client} moved without cause");
            } else {
                let kept: Vec<_> = old.iter().filter(|r| r.addr != addr(1)).collect();
                assert!(kept.iter().all(|r| new.contains(r)), "survivor dropped");
            }
        }
    }
}
