//! Response deduplication: which of the replicas' answers reach the client.
//!
//! Every mode is a plain state machine over `(slot, payload, now)`: no sockets, no clocks.
//! A *slot* is the index of a replica inside one session (see [`crate::session`]); slots keep
//! their index for the whole life of the session so per-slot counters stay meaningful when
//! replicas come and go.

mod copies;
mod primary;
mod sequence;

use std::time::{Duration, Instant};

pub use copies::Copies;
pub use primary::Primary;
pub use sequence::{
    Endian, REORDER_TOLERANCE, ReplayWindow, Sequence, SequenceSpec, WINDOW as SEQUENCE_WINDOW,
    Width,
};

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
pub enum Deduper {
    /// See [`Copies`].
    Copies(Copies),
    /// See [`Sequence`]; boxed, as it is the largest by far (allocated once per session).
    Sequence(Box<Sequence>),
    /// See [`Primary`].
    Primary(Primary),
}

impl Deduper {
    /// Fresh state for a session created at `now`. `seed` keys the content hash so that
    /// clients cannot aim for collisions.
    pub fn new(mode: &Mode, seed: u64, now: Instant, slots: &[SlotState]) -> Self {
        match *mode {
            Mode::Copies {
                window,
                max_entries,
            } => Deduper::Copies(Copies::new(window, max_entries, seed, now)),
            Mode::Sequence {
                spec,
                window,
                max_entries,
                resync_after,
            } => Deduper::Sequence(Box::new(Sequence::new(
                spec,
                Copies::new(window, max_entries, seed, now),
                resync_after,
                now,
            ))),
            Mode::Primary { failover_after } => {
                Deduper::Primary(Primary::new(failover_after, now, slots))
            }
        }
    }

    /// Decides the fate of `payload`, answered by the replica in `slot`.
    pub fn on_answer(
        &mut self,
        slot: Slot,
        payload: &[u8],
        now: Instant,
        slots: &[SlotState],
    ) -> Verdict {
        match self {
            Deduper::Copies(c) => c.on_answer(slot, payload, now),
            Deduper::Sequence(s) => s.on_answer(slot, payload, now),
            Deduper::Primary(p) => p.on_answer(slot, now, slots),
        }
    }

    /// When the last answer was a duplicate, how far behind the delivered copy it arrived
    /// (`primary` mode, where standby answers are not copies of delivered ones: never).
    pub fn lag(&self) -> Option<Duration> {
        match self {
            Deduper::Copies(c) => c.lag(),
            Deduper::Sequence(s) => s.lag(),
            Deduper::Primary(_) => None,
        }
    }

    /// A replica joined (or re-used) `slot` of a running session.
    pub fn on_slot_joined(&mut self, slot: Slot) {
        match self {
            Deduper::Copies(c) => c.on_slot_joined(slot),
            Deduper::Sequence(s) => s.on_slot_joined(slot),
            Deduper::Primary(p) => p.on_slot_joined(slot),
        }
    }

    /// Content entries dropped by the memory cap since the last call.
    pub fn take_evictions(&mut self) -> u64 {
        match self {
            Deduper::Copies(c) => c.take_evictions(),
            Deduper::Sequence(s) => s.take_evictions(),
            Deduper::Primary(_) => 0,
        }
    }

    /// Restarted numberings accepted since the last call (`sequence` mode).
    pub fn take_resyncs(&mut self) -> u64 {
        match self {
            Deduper::Sequence(s) => s.take_resyncs(),
            Deduper::Copies(_) | Deduper::Primary(_) => 0,
        }
    }

    /// Slot states changed. Returns true when this moved the primary.
    pub fn on_slots_changed(&mut self, slots: &[SlotState], now: Instant) -> bool {
        match self {
            Deduper::Primary(p) => p.on_slots_changed(slots, now),
            Deduper::Copies(_) | Deduper::Sequence(_) => false,
        }
    }
}
