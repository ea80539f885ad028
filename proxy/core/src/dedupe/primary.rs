//! `primary` mode: one replica per session speaks for all.
//!
//! Cheapest mode (no per-payload state), for games whose replicas are not byte-identical.
//! The price: answers the other replicas sent while the primary was failing are not
//! delivered, so a silent death costs up to `failover_after` of answers.
//!
//! Until the session has delivered anything, the primary is only a guess: the first answer
//! that any live replica gives is delivered and its replica becomes the primary. One world
//! still holds (nothing was delivered before), and a one-datagram query is never lost to a
//! pick that happened to fall on a dead or frozen replica.

use std::time::{Duration, Instant};

use super::{MAX_SLOTS, Slot, SlotState, Verdict};

/// Per-session state of the `primary` mode.
#[derive(Debug)]
pub struct Primary {
    failover_after: Duration,
    primary: Option<Slot>,
    /// When the current primary last answered, or when it became primary.
    primary_heard: Instant,
    last_heard: [Option<Instant>; MAX_SLOTS],
    /// Something was delivered: from now on the primary changes only by failover.
    spoken: bool,
}

impl Primary {
    /// State for a session created at `now` over `slots`.
    pub fn new(failover_after: Duration, now: Instant, slots: &[SlotState]) -> Self {
        let mut p = Self {
            failover_after,
            primary: None,
            primary_heard: now,
            last_heard: [None; MAX_SLOTS],
            spoken: false,
        };
        p.primary = p.choose(slots, None);
        p
    }

    /// When `slot`'s replica last answered this session.
    pub fn heard(&self, slot: Slot) -> Option<Instant> {
        self.last_heard.get(slot).copied().flatten()
    }

    /// Notes an answer from `slot` without judging it (the trust layer delivers meanwhile).
    pub fn note(&mut self, slot: Slot, now: Instant) {
        if let Some(h) = self.last_heard.get_mut(slot) {
            *h = Some(now);
        }
        if self.primary == Some(slot) {
            self.primary_heard = now;
        }
    }

    /// Makes `slot` the primary from `now`, as if it had just answered (the trust layer
    /// hands a session back to one replica).
    pub fn take(&mut self, slot: Slot, now: Instant) {
        self.primary = Some(slot);
        self.primary_heard = now;
        self.spoken = true;
    }

    /// How long the primary has been silent at `now`.
    pub fn silence(&self, now: Instant) -> std::time::Duration {
        now.saturating_duration_since(self.primary_heard)
    }

    /// The current primary slot.
    pub fn primary(&self) -> Option<Slot> {
        self.primary
    }

    /// Decides the fate of one answer from `slot`.
    pub fn on_answer(&mut self, slot: Slot, now: Instant, slots: &[SlotState]) -> Verdict {
        if slot >= MAX_SLOTS {
            return Verdict::Duplicate;
        }
        self.last_heard[slot] = Some(now);
        if !self.spoken && slots.get(slot).is_some_and(|s| s.is_live()) {
            // Nothing delivered yet: whoever answers first speaks for the session.
            self.spoken = true;
            self.primary = Some(slot);
            self.primary_heard = now;
            return Verdict::Forward;
        }
        match self.primary {
            Some(p) if p == slot => {
                self.primary_heard = now;
                Verdict::Forward
            }
            Some(_) => {
                let silent = now.saturating_duration_since(self.primary_heard);
                let eligible = slots.get(slot) == Some(&SlotState::Ready);
                if silent >= self.failover_after && eligible {
                    self.primary = Some(slot);
                    self.primary_heard = now;
                    Verdict::ForwardAfterFailover
                } else {
                    Verdict::Duplicate
                }
            }
            None => {
                // No primary could be chosen before (nothing live): take the first to speak.
                self.spoken = true;
                self.primary = Some(slot);
                self.primary_heard = now;
                Verdict::ForwardAfterFailover
            }
        }
    }

    /// A slot was (re)filled; forget what was heard from its previous occupant.
    pub fn on_slot_joined(&mut self, slot: Slot) {
        if let Some(h) = self.last_heard.get_mut(slot) {
            *h = None;
        }
    }

    /// Moves the primary off a replica that is gone or draining. True when it moved.
    pub fn on_slots_changed(&mut self, slots: &[SlotState], now: Instant) -> bool {
        let keep = self
            .primary
            .is_some_and(|p| slots.get(p) == Some(&SlotState::Ready));
        if keep {
            return false;
        }
        let before = self.primary;
        // A draining primary is still better than none at all.
        let next = self.choose(slots, before);
        if next == before {
            return false;
        }
        self.primary = next;
        self.primary_heard = now;
        before.is_some() && next.is_some()
    }

    /// Best successor: a ready replica heard most recently, then the next ready one in order
    /// after `after`; a draining one only when no ready replica is left.
    fn choose(&self, slots: &[SlotState], after: Option<Slot>) -> Option<Slot> {
        let n = slots.len().min(MAX_SLOTS);
        if n == 0 {
            return None;
        }
        let start = after.map_or(0, |a| a + 1);
        let order = (0..n).map(|i| (start + i) % n);
        let pick = |wanted: SlotState| {
            order
                .clone()
                .filter(|&s| slots[s] == wanted)
                // max_by_key keeps the last maximum; iterate in reverse so ties go to the
                // first in order.
                .rev()
                .max_by_key(|&s| self.last_heard[s])
        };
        pick(SlotState::Ready).or_else(|| pick(SlotState::Draining))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SlotState::{Draining, Gone, Ready};
    use Verdict::{Duplicate, Forward, ForwardAfterFailover};

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn only_primary_is_forwarded() {
        let t = crate::epoch();
        let slots = [Ready, Ready, Ready];
        let mut p = Primary::new(50 * MS, t, &slots);
        assert_eq!(p.primary(), Some(0));
        assert_eq!(p.on_answer(0, t, &slots), Forward);
        assert_eq!(p.on_answer(1, t, &slots), Duplicate);
        assert_eq!(p.on_answer(0, t, &slots), Forward);
        assert_eq!(p.on_answer(2, t + MS, &slots), Duplicate);
    }

    #[test]
    fn the_first_answer_of_a_session_is_delivered_whoever_gives_it() {
        // The pick fell on replica 0, which is dead: the live replica's only answer (a
        // one-datagram query) must not be dropped as a standby's.
        let t = crate::epoch();
        let slots = [Ready, Ready];
        let mut p = Primary::new(50 * MS, t, &slots);
        assert_eq!(p.primary(), Some(0));
        assert_eq!(p.on_answer(1, t + MS, &slots), Forward, "not a failover");
        assert_eq!(p.primary(), Some(1));
        // From then on one world: the other replica is a standby.
        assert_eq!(p.on_answer(0, t + 2 * MS, &slots), Duplicate);
        assert_eq!(p.on_answer(1, t + 3 * MS, &slots), Forward);
        // A gone replica's late answer never speaks first.
        let mut q = Primary::new(50 * MS, t, &[Gone, Ready]);
        assert_eq!(q.on_answer(0, t, &[Gone, Ready]), Duplicate);
        assert_eq!(q.on_answer(1, t, &[Gone, Ready]), Forward);
    }

    #[test]
    fn silent_primary_fails_over_to_a_speaking_replica() {
        let t = crate::epoch();
        let slots = [Ready, Ready];
        let mut p = Primary::new(50 * MS, t, &slots);
        assert_eq!(p.on_answer(0, t, &slots), Forward);
        assert_eq!(p.on_answer(1, t + 10 * MS, &slots), Duplicate);
        assert_eq!(p.on_answer(1, t + 49 * MS, &slots), Duplicate);
        assert_eq!(p.on_answer(1, t + 50 * MS, &slots), ForwardAfterFailover);
        assert_eq!(p.primary(), Some(1));
        assert_eq!(p.on_answer(0, t + 51 * MS, &slots), Duplicate);
    }

    #[test]
    fn primary_that_never_speaks_is_replaced() {
        let t = crate::epoch();
        let slots = [Ready, Ready];
        let mut p = Primary::new(50 * MS, t, &slots);
        assert_eq!(p.on_answer(1, t, &slots), Forward, "speaks first");
        assert_eq!(p.on_answer(0, t + MS, &slots), Duplicate);
        // Replica 1 falls silent while replica 0 goes on: 0 takes over after the window.
        assert_eq!(p.on_answer(0, t + 60 * MS, &slots), ForwardAfterFailover);
    }

    #[test]
    fn removed_primary_moves_at_once() {
        let t = crate::epoch();
        let mut slots = [Ready, Ready, Ready];
        let mut p = Primary::new(50 * MS, t, &slots);
        assert_eq!(p.on_answer(0, t, &slots), Forward);
        p.on_answer(2, t, &slots);
        p.on_answer(1, t + MS, &slots);
        slots[0] = Gone;
        assert!(p.on_slots_changed(&slots, t + 2 * MS));
        // The most recently heard ready replica takes over.
        assert_eq!(p.primary(), Some(1));
        assert_eq!(p.on_answer(1, t + 3 * MS, &slots), Forward);
    }

    #[test]
    fn draining_replica_is_never_chosen_while_a_ready_one_exists() {
        let t = crate::epoch();
        let mut slots = [Ready, Draining, Ready];
        let mut p = Primary::new(50 * MS, t, &slots);
        assert_eq!(p.primary(), Some(0));
        assert_eq!(p.on_answer(0, t, &slots), Forward);
        // The draining replica keeps speaking while the primary is silent: no failover to it.
        assert_eq!(p.on_answer(1, t + 100 * MS, &slots), Duplicate);
        slots[0] = Draining;
        assert!(p.on_slots_changed(&slots, t + 101 * MS));
        assert_eq!(p.primary(), Some(2));
        // Only draining replicas left: better one of them than silence.
        slots[2] = Gone;
        assert!(p.on_slots_changed(&slots, t + 102 * MS));
        assert!(matches!(p.primary(), Some(0 | 1)));
    }

    #[test]
    fn no_live_replica_then_first_speaker_wins() {
        let t = crate::epoch();
        let slots = [Gone, Gone];
        let mut p = Primary::new(50 * MS, t, &slots);
        assert_eq!(p.primary(), None);
        let slots = [Gone, Ready];
        assert_eq!(p.on_answer(1, t, &slots), Forward);
        assert_eq!(p.primary(), Some(1));
    }
}
