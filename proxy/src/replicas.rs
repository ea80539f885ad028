//! The replica set: who the game-server replicas are, and the one interface through which
//! every discovery source (static list, Kubernetes) changes it.
//!
//! A source publishes complete snapshots; the data plane never sees partial updates. Workers
//! are woken and pick up the newest snapshot between packet batches, so publishing costs the
//! hot path nothing.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

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
    /// Sorted by address, one entry per address.
    pub replicas: Vec<Replica>,
}

impl Snapshot {
    /// The state of `addr`, if it is a member.
    pub fn state_of(&self, addr: SocketAddr) -> Option<ReplicaState> {
        self.replicas
            .binary_search_by(|r| r.addr.cmp(&addr))
            .ok()
            .map(|i| self.replicas[i].state)
    }

    /// Members a new session should use, at most `limit`: ready replicas, or the draining
    /// ones when nothing else is left (a draining replica still answers; silence does not).
    pub fn for_new_session(&self, limit: usize) -> impl Iterator<Item = &Replica> {
        let any_ready = self.replicas.iter().any(|r| r.state == ReplicaState::Ready);
        let wanted = if any_ready {
            ReplicaState::Ready
        } else {
            ReplicaState::Draining
        };
        self.replicas
            .iter()
            .filter(move |r| r.state == wanted)
            .take(limit)
    }

    /// How many replicas are in `state`.
    pub fn count(&self, state: ReplicaState) -> usize {
        self.replicas.iter().filter(|r| r.state == state).count()
    }
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
    /// `Draining` (the more recent or more capable report). Marks the set synced.
    pub fn publish(&self, mut replicas: Vec<Replica>) {
        replicas.sort();
        replicas.dedup_by_key(|r| r.addr);
        {
            let mut current = self
                .inner
                .current
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if current.replicas == replicas && self.is_synced() {
                return;
            }
            let version = current.version + 1;
            *current = Arc::new(Snapshot { version, replicas });
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
    fn new_sessions_prefer_ready_replicas() {
        let snap = Snapshot {
            version: 1,
            replicas: vec![
                Replica::ready(addr(1)),
                Replica {
                    addr: addr(2),
                    state: ReplicaState::Draining,
                },
                Replica::ready(addr(3)),
            ],
        };
        let picked: Vec<_> = snap.for_new_session(16).map(|r| r.addr).collect();
        assert_eq!(picked, vec![addr(1), addr(3)]);
        assert_eq!(snap.for_new_session(1).count(), 1);
        let draining_only = Snapshot {
            version: 2,
            replicas: vec![Replica {
                addr: addr(2),
                state: ReplicaState::Draining,
            }],
        };
        assert_eq!(draining_only.for_new_session(16).count(), 1);
        assert_eq!(snap.state_of(addr(2)), Some(ReplicaState::Draining));
        assert_eq!(snap.state_of(addr(9)), None);
    }
}
