//! `primary` mode: one replica per session speaks for all.
//!
//! Cheapest mode (no per-payload state), for games whose replicas are not byte-identical.
//! The price: answers the other replicas sent while the primary was failing are not
//! delivered, so a silent death costs up to `failover_after` of answers.
//!
//! The primary fails over when it is silent in the sense of [`Silence`]: it owes the player an
//! answer for `failover_after`, or another replica has answered without a pause that long.
//!
//! Until the session has delivered anything, the primary is only a guess: the first answer
//! that any live replica gives is delivered and its replica becomes the primary. One world
//! still holds (nothing was delivered before), and a one-datagram query is never lost to a
//! pick that happened to fall on a dead or frozen replica.

use std::time::{Duration, Instant};

use super::{MAX_SLOTS, Silence, Slot, SlotState, Verdict};

/// Per-session state of the `primary` mode.
#[derive(Debug)]
pub struct Primary {
    failover_after: Duration,
    primary: Option<Slot>,
    /// When the current primary last answered, or when it became primary.
    primary_heard: Instant,
    /// The evidence that the primary has gone quiet.
    silence: Silence,
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
            silence: Silence::default(),
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
            self.silence.heard();
        }
    }

    /// The player sent a datagram at `now`.
    pub fn on_request(&mut self, now: Instant) {
        self.silence.asked(now);
    }

    /// Makes `slot` the primary from `now`, as if it had just answered (the trust layer
    /// hands a session back to one replica).
    pub fn take(&mut self, slot: Slot, now: Instant) {
        self.primary = Some(slot);
        self.primary_heard = now;
        self.silence.heard();
        self.spoken = true;
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
            self.take(slot, now);
            return Verdict::Forward;
        }
        match self.primary {
            Some(p) if p == slot => {
                self.primary_heard = now;
                self.silence.heard();
                Verdict::Forward
            }
            Some(_) => {
                let silent = self.silence.other(now, self.failover_after);
                let eligible = slots.get(slot) == Some(&SlotState::Ready);
                if silent && eligible {
                    self.primary = Some(slot);
                    self.primary_heard = now;
                    self.silence.heard();
                    Verdict::ForwardAfterFailover
                } else {
                    Verdict::Duplicate
                }
            }
            None => {
                // No primary could be chosen before (nothing live): take the first to speak.
                self.take(slot, now);
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
        self.silence.heard();
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
        for ms in [10, 30, 50] {
            assert_eq!(p.on_answer(1, t + ms * MS, &slots), Duplicate, "{ms}");
        }
        // Replica 1 has answered for 50 ms without a pause, and the primary has not.
        assert_eq!(p.on_answer(1, t + 60 * MS, &slots), ForwardAfterFailover);
        assert_eq!(p.primary(), Some(1));
        assert_eq!(p.on_answer(0, t + 61 * MS, &slots), Duplicate);
    }

    #[test]
    fn a_first_answer_owes_the_player_nothing_more() {
        // The query that opened the session was answered by the first speaker: a later
        // datagram, answered first by the other replica, finds nothing owed.
        let t = crate::epoch();
        let slots = [Ready, Ready];
        let mut p = Primary::new(30 * MS, t, &slots);
        p.on_request(t);
        assert_eq!(p.on_answer(1, t + MS, &slots), Forward);
        assert_eq!(p.on_answer(0, t + 2 * MS, &slots), Duplicate);
        p.on_request(t + 100 * MS);
        assert_eq!(p.on_answer(0, t + 101 * MS, &slots), Duplicate);
        assert_eq!(p.on_answer(1, t + 102 * MS, &slots), Forward);
    }

    #[test]
    fn after_a_quiet_spell_a_standby_answering_first_is_no_failover() {
        // A turn-based game: a request every second, both replicas answer, either first.
        let t = crate::epoch();
        let slots = [Ready, Ready];
        let mut p = Primary::new(50 * MS, t, &slots);
        assert_eq!(p.on_answer(0, t, &slots), Forward);
        for turn in 1..5u32 {
            let at = t + 1000 * MS * turn;
            assert_eq!(p.on_answer(1, at, &slots), Duplicate, "turn {turn}");
            assert_eq!(p.on_answer(0, at + 2 * MS, &slots), Forward, "turn {turn}");
        }
        // And a standby 300 ms behind the primary never takes over.
        for turn in 5..10u32 {
            let at = t + 1000 * MS * turn;
            assert_eq!(p.on_answer(0, at, &slots), Forward);
            assert_eq!(p.on_answer(1, at + 300 * MS, &slots), Duplicate);
        }
        assert_eq!(p.primary(), Some(0));
    }

    #[test]
    fn primary_that_never_speaks_is_replaced() {
        let t = crate::epoch();
        let slots = [Ready, Ready];
        let mut p = Primary::new(50 * MS, t, &slots);
        assert_eq!(p.on_answer(1, t, &slots), Forward, "speaks first");
        assert_eq!(p.on_answer(0, t + MS, &slots), Duplicate);
        // Replica 1 falls silent while replica 0 goes on: 0 takes over after the window.
        assert_eq!(p.on_answer(0, t + 30 * MS, &slots), Duplicate);
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
