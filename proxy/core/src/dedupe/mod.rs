//! Response deduplication: which of the replicas' answers reach the client.
//!
//! Every mode is a plain state machine over `(slot, payload, now)`: no sockets, no clocks.
//! A *slot* is the index of a replica inside one session (see [`crate::session`]); slots keep
//! their index for the whole life of the session so per-slot counters stay meaningful when
//! replicas come and go.

mod copies;
mod primary;
mod sequence;
mod silence;
pub mod trust;

use std::time::{Duration, Instant};

pub use copies::{Copies, DIVERGE_OPEN};
pub use primary::Primary;
pub use sequence::{
    Endian, REORDER_TOLERANCE, ReplayWindow, SURVIVOR_SLACK, Sequence, SequenceSpec,
    WINDOW as SEQUENCE_WINDOW, Width,
};
pub use silence::Silence;
pub use trust::{Changes, Stage, Trust};

/// Most replicas one session can fan out to. Per-slot state lives in fixed arrays of this
/// size so the answer path never allocates.
pub const MAX_SLOTS: usize = 16;

/// Index of a replica within one session.
pub type Slot = usize;

/// Where a replica stands, as far as one session is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// Full member: receives fan-out, may be primary.
    Ready,
    /// Terminating but still serving: receives fan-out, never chosen as primary.
    Draining,
    /// Removed from the replica set; its answers are no longer accepted.
    Gone,
}

impl SlotState {
    /// Still part of the session: sends go to it and its answers count.
    pub fn is_live(self) -> bool {
        !matches!(self, SlotState::Gone)
    }
}

/// Which dedupe algorithm a listener uses, with its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Content-addressed: forward the k-th copy of a payload once any replica sent it k times.
    Copies {
        /// How long a payload is remembered after its last copy was seen.
        window: Duration,
        /// Most distinct payloads remembered per session.
        max_entries: usize,
    },
    /// First copy of each sequence number found in the payload.
    Sequence {
        /// Where the number sits in the payload.
        spec: SequenceSpec,
        /// Content dedupe settings for datagrams too short to carry a number.
        window: Duration,
        /// Cap for the content fallback.
        max_entries: usize,
        /// Consecutive answers agreeing on a restarted numbering before it is accepted
        /// (0: never).
        resync_after: u32,
    },
    /// Only the primary replica's answers are forwarded.
    Primary {
        /// Silence of the primary, while another replica answers, that triggers failover.
        failover_after: Duration,
    },
}

impl Mode {
    /// The mode's name, as `--dedupe` spells it.
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Copies { .. } => "copies",
            Mode::Sequence { .. } => "sequence",
            Mode::Primary { .. } => "primary",
        }
    }
}

/// Agreement before trust ([`trust`]) for the `copies` and `sequence` modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agreement {
    /// Take the mode's assumption on trust from the first answer (`--agreement off`).
    Off,
    /// Deliver one replica's answers until another is seen to agree.
    On {
        /// Silence of the one delivering replica, while another answers, before the session
        /// moves to another (as `primary` mode's failover).
        failover_after: Duration,
    },
}

/// What to do with one answer from a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send it to the client.
    Forward,
    /// Send it to the client; the primary moved to this answer's replica first.
    ForwardAfterFailover,
    /// Already delivered (another replica's copy, or a repeated sequence number).
    Duplicate,
    /// Sequence number older than the replay window: cannot tell, so drop.
    Stale,
}

impl Verdict {
    /// Whether the answer goes to the client.
    pub fn forwards(self) -> bool {
        matches!(self, Verdict::Forward | Verdict::ForwardAfterFailover)
    }
}

/// Per-session dedupe state for any mode.
#[derive(Debug)]
pub struct Deduper {
    kind: Kind,
    /// Agreement before trust, for `copies` and `sequence` with [`Agreement::On`].
    trust: Option<Trust>,
}

#[derive(Debug)]
enum Kind {
    Copies(Copies),
    /// Boxed, as it is the largest by far (allocated once per session).
    Sequence(Box<Sequence>),
    Primary(Primary),
}

impl Deduper {
    /// Fresh state for a session created at `now`. `seed` keys the content hash so that
    /// clients cannot aim for collisions. `divergent`: the session's game was seen to
    /// diverge, so with agreement on it starts as `primary` would.
    pub fn new(
        mode: &Mode,
        agreement: Agreement,
        divergent: bool,
        seed: u64,
        now: Instant,
        slots: &[SlotState],
    ) -> Self {
        let kind = match *mode {
            Mode::Copies {
                window,
                max_entries,
            } => Kind::Copies(Copies::new(window, max_entries, seed, now)),
            Mode::Sequence {
                spec,
                window,
                max_entries,
                resync_after,
            } => Kind::Sequence(Box::new(Sequence::new(
                spec,
                Copies::new(window, max_entries, seed, now),
                resync_after,
                now,
            ))),
            Mode::Primary { failover_after } => {
                Kind::Primary(Primary::new(failover_after, now, slots))
            }
        };
        let trust = match (&kind, agreement) {
            (Kind::Primary(_), _) | (_, Agreement::Off) => None,
            (_, Agreement::On { failover_after }) => {
                Some(Trust::new(failover_after, now, slots, divergent))
            }
        };
        Self { kind, trust }
    }

    /// Decides the fate of `payload`, answered by the replica in `slot`.
    pub fn on_answer(
        &mut self,
        slot: Slot,
        payload: &[u8],
        now: Instant,
        slots: &[SlotState],
    ) -> Verdict {
        match (&mut self.kind, &mut self.trust) {
            (Kind::Copies(c), None) => c.on_answer(slot, payload, now),
            (Kind::Copies(c), Some(t)) => c.judge(slot, payload, now, |fresh, matched, d| {
                t.decide(slot, fresh, matched, d, now, slots)
            }),
            (Kind::Sequence(s), None) => s.on_answer(slot, payload, now),
            (Kind::Sequence(s), Some(t)) => {
                let silent = s.owner_silent(slot, now, t.failover_after());
                let owner_gone = s
                    .owner()
                    .is_some_and(|o| slots.get(o).is_none_or(|st| !st.is_live()) || silent);
                s.judge(slot, payload, now, owner_gone, |fresh, matched, d| {
                    t.decide(slot, fresh, matched, d, now, slots)
                })
            }
            (Kind::Primary(p), _) => p.on_answer(slot, now, slots),
        }
    }

    /// When the last answer was a duplicate, how far behind the delivered copy it arrived
    /// (`primary` mode, where standby answers are not copies of delivered ones: never).
    pub fn lag(&self) -> Option<Duration> {
        match &self.kind {
            Kind::Copies(c) => c.lag(),
            Kind::Sequence(s) => s.lag(),
            Kind::Primary(_) => None,
        }
    }

    /// Where the session stands on trusting its replicas (`None`: agreement does not apply).
    pub fn stage(&self) -> Option<Stage> {
        self.trust.as_ref().map(Trust::stage)
    }

    /// Whether the session delivers one replica's answers only, as `primary` does: in that
    /// mode, or demoted after its replicas diverged.
    pub fn is_primary(&self) -> bool {
        matches!(self.kind, Kind::Primary(_)) || self.stage() == Some(Stage::Demoted)
    }

    /// Trust stage changes since the last call.
    pub fn take_changes(&mut self) -> Changes {
        self.trust
            .as_mut()
            .map(Trust::take_changes)
            .unwrap_or_default()
    }

    /// The player sent a datagram at `now`: a replica the session relies on owes it an
    /// answer (see [`Silence`]).
    pub fn on_request(&mut self, now: Instant) {
        match &mut self.kind {
            Kind::Primary(p) => p.on_request(now),
            Kind::Sequence(s) => s.on_request(now),
            Kind::Copies(_) => {}
        }
        if let Some(t) = &mut self.trust {
            t.on_request(now);
        }
    }

    /// A replica joined (or re-used) `slot` of a running session.
    pub fn on_slot_joined(&mut self, slot: Slot) {
        match &mut self.kind {
            Kind::Copies(c) => c.on_slot_joined(slot),
            Kind::Sequence(s) => s.on_slot_joined(slot),
            Kind::Primary(p) => p.on_slot_joined(slot),
        }
        if let Some(t) = &mut self.trust {
            t.on_slot_joined(slot);
        }
    }

    /// Content entries dropped by the memory cap since the last call.
    pub fn take_evictions(&mut self) -> u64 {
        match &mut self.kind {
            Kind::Copies(c) => c.take_evictions(),
            Kind::Sequence(s) => s.take_evictions(),
            Kind::Primary(_) => 0,
        }
    }

    /// Restarted numberings accepted since the last call (`sequence` mode).
    pub fn take_resyncs(&mut self) -> u64 {
        match &mut self.kind {
            Kind::Sequence(s) => s.take_resyncs(),
            Kind::Copies(_) | Kind::Primary(_) => 0,
        }
    }

    /// Slot states changed. Returns true when this moved the replica that delivers alone.
    pub fn on_slots_changed(&mut self, slots: &[SlotState], now: Instant) -> bool {
        match (&mut self.kind, &mut self.trust) {
            (Kind::Primary(p), _) => p.on_slots_changed(slots, now),
            (_, Some(t)) => t.on_slots_changed(slots, now),
            (_, None) => false,
        }
    }
}
