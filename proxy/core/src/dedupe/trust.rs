//! Agreement before trust: which replicas of a session may deliver in `copies` and
//! `sequence` modes.
//!
//! Both modes rest on an assumption about the game (its replicas answer byte for byte alike,
//! or number their answers alike) that most authoritative servers break: two processes' ticks
//! and worlds never coincide, and taking the first copy of each answer from two of them hands
//! the player two worlds interleaved. So a session does not take the assumption on trust:
//!
//! - **Probation.** One replica's answers are delivered, as `primary` mode would (the first
//!   to answer speaks; failover on silence). The others' answers are only compared.
//! - **Trusted.** Once another replica has matched what was delivered for
//!   [`PROMOTE_AFTER`] answers, without being seen to diverge, the first copy of each answer
//!   from any trusted replica is delivered: the fastest carries the stream, and a death costs
//!   nothing.
//! - **Demoted.** When replicas are seen in two worlds, the session falls back to one
//!   replica's answers at once, for the rest of its life, and the table marks its game.
//!
//! The modes gather the evidence (what matched what, who disagrees); this module only
//! decides. A replica that merely lags behind, or wins and loses races under jitter, always
//! matches eventually and is never taken for another world.

use std::time::{Duration, Instant};

use super::{MAX_SLOTS, Primary, Silence, Slot, SlotState, Verdict};

/// Evidence against a replica before its session is taken to hold two worlds: in `copies`,
/// answers it sent first that no other replica has matched (each of two replicas must have
/// this many); in `sequence`, consecutive answers off the delivered numbering. After a desync
/// of trusted replicas, fewer than this many answers of the second world reach the player.
pub const DIVERGE_AFTER: u32 = 4;

/// Answers a replica must match with the delivered stream before its own are delivered.
pub const PROMOTE_AFTER: u32 = 8;

/// Where a session stands on trusting its replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// One replica delivers; the others are compared with it.
    Probation,
    /// Every trusted replica may deliver the first copy.
    Trusted,
    /// Replicas were seen to diverge: one replica delivers for good.
    Demoted,
}

/// How the evidence of a mode reads: which replicas disagree, and whether one disagreeing
/// replica is enough to show two worlds.
#[derive(Debug, Clone, Copy)]
pub struct Disagreement {
    /// Slots whose evidence says they disagree.
    pub slots: u16,
    /// `copies`: a replica ahead of the others (unmatched answers) is only faster, unless
    /// another is ahead of it too, so two must disagree. `sequence`: numbers off the
    /// delivered numbering are another world on their own.
    pub pairwise: bool,
    /// Slots with evidence outstanding (an unmatched answer): their matches do not add up
    /// to a clean run until it is resolved.
    pub unproven: u16,
}

impl Disagreement {
    /// No evidence against anyone.
    pub const NONE: Disagreement = Disagreement {
        slots: 0,
        pairwise: true,
        unproven: 0,
    };

    fn has(&self, slot: Slot) -> bool {
        self.slots & bit(slot) != 0
    }
}

/// A change of stage for the session table to count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Changes {
    /// The session began to trust a second replica.
    pub promoted: bool,
    /// The session fell back to one replica because its replicas diverged.
    pub demoted: bool,
}

/// Per-session trust state (see the module documentation).
#[derive(Debug)]
pub struct Trust {
    stage: Stage,
    /// The replica that delivers outside [`Stage::Trusted`], with `primary` mode's rules.
    leader: Primary,
    failover_after: Duration,
    /// Slots that may deliver in [`Stage::Trusted`].
    trusted: u16,
    /// Matches with the delivered stream, per slot.
    agree: [u32; MAX_SLOTS],
    /// Answers delivered, per slot: on a desync the world the player saw most is kept.
    delivered: [u32; MAX_SLOTS],
    /// [`Stage::Trusted`]: the evidence that every trusted replica has gone quiet.
    silence: Silence,
    changes: Changes,
}

fn bit(slot: Slot) -> u16 {
    1 << slot.min(MAX_SLOTS - 1)
}

fn live_mask(slots: &[SlotState]) -> u16 {
    slots
        .iter()
        .take(MAX_SLOTS)
        .enumerate()
        .filter(|(_, s)| s.is_live())
        .fold(0, |m, (i, _)| m | bit(i))
}

impl Trust {
    /// A session created at `now` over `slots`; `demoted` when its game is known to diverge
    /// (it starts as `primary` would).
    pub fn new(failover_after: Duration, now: Instant, slots: &[SlotState], demoted: bool) -> Self {
        Self {
            stage: if demoted {
                Stage::Demoted
            } else {
                Stage::Probation
            },
            leader: Primary::new(failover_after, now, slots),
            failover_after,
            trusted: 0,
            agree: [0; MAX_SLOTS],
            delivered: [0; MAX_SLOTS],
            silence: Silence::default(),
            changes: Changes::default(),
        }
    }

    /// The session's stage.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// The replica delivering outside [`Stage::Trusted`].
    pub fn leader(&self) -> Option<Slot> {
        self.leader.primary()
    }

    /// The silence after which a replica is taken for gone.
    pub fn failover_after(&self) -> Duration {
        self.failover_after
    }

    /// Stage changes since the last call.
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// Whether `slot`'s fresh answers would reach the player now.
    fn delivers(&self, slot: Slot) -> bool {
        match self.stage {
            Stage::Trusted => self.trusted & bit(slot) != 0,
            Stage::Probation | Stage::Demoted => self.leader.primary() == Some(slot),
        }
    }

    /// Decides whether an answer from `slot` reaches the player. `fresh`: the mode has not
    /// delivered its like yet; `agrees_with`: the slot whose earlier answer it matched (or
    /// that matched it); `against`: the mode's evidence of disagreement.
    pub fn decide(
        &mut self,
        slot: Slot,
        fresh: bool,
        agrees_with: Option<Slot>,
        against: Disagreement,
        now: Instant,
        slots: &[SlotState],
    ) -> Verdict {
        let slot = slot.min(MAX_SLOTS - 1);
        if let Some(other) = agrees_with.filter(|&o| o != slot && o < MAX_SLOTS) {
            let candidate = if self.delivers(other) && !self.delivers(slot) {
                Some(slot)
            } else if self.delivers(slot) && !self.delivers(other) {
                Some(other)
            } else {
                None
            };
            if let Some(c) = candidate {
                self.agree[c] = if against.unproven & bit(c) != 0 {
                    0
                } else {
                    self.agree[c].saturating_add(1)
                };
            }
        }
        if against.slots != 0 {
            for (s, a) in self.agree.iter_mut().enumerate() {
                if against.has(s) {
                    *a = 0;
                }
            }
            self.check_divergence(slot, against, now, slots);
        }
        if self.stage != Stage::Demoted {
            self.promote(against, slots);
        }
        let verdict = match self.stage {
            Stage::Probation | Stage::Demoted => {
                let v = self.leader.on_answer(slot, now, slots);
                if fresh { v } else { Verdict::Duplicate }
            }
            Stage::Trusted => {
                self.leader.note(slot, now);
                if self.trusted & bit(slot) != 0 {
                    self.silence.heard();
                }
                if !fresh {
                    Verdict::Duplicate
                } else if self.trusted & bit(slot) != 0 {
                    Verdict::Forward
                } else if self.trusted_silent(now) && slots[slot] == SlotState::Ready {
                    // Every trusted replica is gone quiet: this one speaks alone.
                    self.stage = Stage::Probation;
                    self.trusted = 0;
                    self.leader.take(slot, now);
                    Verdict::ForwardAfterFailover
                } else {
                    Verdict::Duplicate
                }
            }
        };
        if verdict.forwards() {
            self.delivered[slot] = self.delivered[slot].saturating_add(1);
        }
        verdict
    }

    /// Falls back to one replica when the evidence shows two worlds among those delivering.
    fn check_divergence(
        &mut self,
        answering: Slot,
        against: Disagreement,
        now: Instant,
        slots: &[SlotState],
    ) {
        let live = live_mask(slots);
        let keep = match self.stage {
            Stage::Demoted => return,
            Stage::Probation => {
                let Some(leader) = self.leader.primary() else {
                    return;
                };
                let followers = against.slots & live & !bit(leader);
                let conflict = followers != 0 && (!against.pairwise || against.has(leader));
                if !conflict {
                    return;
                }
                leader
            }
            Stage::Trusted => {
                let suspects = against.slots & live & self.trusted;
                let conflict = if against.pairwise {
                    suspects.count_ones() >= 2
                } else {
                    suspects != 0
                };
                if !conflict {
                    return;
                }
                // Keep the world the player saw most of; with numbers, never the replica
                // that left the delivered numbering.
                let candidates = if against.pairwise {
                    self.trusted & live
                } else {
                    self.trusted & live & !suspects
                };
                let best = (0..MAX_SLOTS)
                    .filter(|&s| candidates & bit(s) != 0)
                    .max_by_key(|&s| (self.delivered[s], s != answering));
                match best.or(self.leader.primary()) {
                    Some(s) => s,
                    None => answering,
                }
            }
        };
        self.stage = Stage::Demoted;
        self.trusted = 0;
        self.leader.take(keep, now);
        self.changes.demoted = true;
    }

    /// Trusts every live replica that has matched the delivered stream long enough.
    fn promote(&mut self, against: Disagreement, slots: &[SlotState]) {
        let Some(leader) = self.leader.primary() else {
            return;
        };
        for (s, state) in slots.iter().enumerate().take(MAX_SLOTS) {
            if self.agree[s] < PROMOTE_AFTER
                || against.has(s)
                || !state.is_live()
                || self.trusted & bit(s) != 0
                || (self.stage == Stage::Probation && s == leader)
            {
                continue;
            }
            if self.stage == Stage::Probation {
                self.stage = Stage::Trusted;
                self.trusted = bit(leader);
                self.changes.promoted = true;
            }
            self.trusted |= bit(s);
        }
    }

    /// Every trusted replica is silent (see [`Silence`]) as an untrusted one answers.
    fn trusted_silent(&mut self, now: Instant) -> bool {
        self.silence.other(now, self.failover_after)
    }

    /// The player sent a datagram at `now`.
    pub fn on_request(&mut self, now: Instant) {
        self.leader.on_request(now);
        self.silence.asked(now);
    }

    /// A replica joined (or re-used) `slot`: it has matched nothing yet.
    pub fn on_slot_joined(&mut self, slot: Slot) {
        let slot = slot.min(MAX_SLOTS - 1);
        self.agree[slot] = 0;
        self.delivered[slot] = 0;
        self.trusted &= !bit(slot);
        self.leader.on_slot_joined(slot);
    }

    /// Slot states changed: gone replicas stop being trusted; a trusted set left with one
    /// replica is back on probation with it. True when the delivering replica moved.
    pub fn on_slots_changed(&mut self, slots: &[SlotState], now: Instant) -> bool {
        if self.stage == Stage::Trusted {
            self.trusted &= live_mask(slots);
            if self.trusted.count_ones() >= 2 {
                return false;
            }
            self.stage = Stage::Probation;
            if let Some(s) = (0..MAX_SLOTS).find(|&s| self.trusted & bit(s) != 0) {
                self.leader.take(s, now);
            }
            self.trusted = 0;
        }
        self.leader.on_slots_changed(slots, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SlotState::{Gone, Ready};
    use Verdict::{Duplicate, Forward, ForwardAfterFailover};

    const MS: Duration = Duration::from_millis(1);
    const NONE: Disagreement = Disagreement::NONE;

    fn trust(slots: &[SlotState]) -> (Trust, Instant) {
        let t = crate::epoch();
        (Trust::new(50 * MS, t, slots, false), t)
    }

    #[test]
    fn one_replica_delivers_until_another_has_matched_a_run() {
        let slots = [Ready, Ready];
        let (mut tr, t) = trust(&slots);
        // Replica 1 speaks first: it leads. Replica 0's matches earn it trust, whether it
        // matched the leader (lagging) or the leader matched it (ahead).
        assert_eq!(tr.decide(1, true, None, NONE, t, &slots), Forward);
        for i in 0..PROMOTE_AFTER / 2 {
            assert_eq!(tr.decide(0, false, Some(1), NONE, t, &slots), Duplicate);
            // Fresh answers of the follower are compared, never delivered.
            assert_eq!(tr.decide(0, true, None, NONE, t, &slots), Duplicate);
            assert_eq!(tr.stage(), Stage::Probation, "after {i}");
            assert_eq!(tr.decide(1, true, Some(0), NONE, t, &slots), Forward);
        }
        assert_eq!(tr.stage(), Stage::Trusted);
        assert!(tr.take_changes().promoted);
        // Now the first copy from either.
        assert_eq!(tr.decide(0, true, None, NONE, t, &slots), Forward);
        assert_eq!(tr.decide(1, false, Some(0), NONE, t, &slots), Duplicate);
    }

    #[test]
    fn pairwise_disagreement_demotes_to_the_most_delivered_world() {
        let slots = [Ready, Ready];
        let (mut tr, t) = trust(&slots);
        tr.decide(0, true, None, NONE, t, &slots);
        for _ in 0..PROMOTE_AFTER {
            tr.decide(1, false, Some(0), NONE, t, &slots);
            tr.decide(0, true, None, NONE, t, &slots);
        }
        assert_eq!(tr.stage(), Stage::Trusted);
        tr.take_changes();
        // One replica ahead of the other is only faster.
        let ahead = Disagreement {
            slots: 0b10,
            ..NONE
        };
        assert_eq!(tr.decide(1, true, None, ahead, t, &slots), Forward);
        assert_eq!(tr.stage(), Stage::Trusted);
        // Both ahead of each other: two worlds. Replica 0 delivered more: it stays.
        let both = Disagreement {
            slots: 0b11,
            ..NONE
        };
        assert_eq!(tr.decide(1, true, None, both, t, &slots), Duplicate);
        assert_eq!(tr.stage(), Stage::Demoted);
        assert!(tr.take_changes().demoted);
        assert_eq!(tr.leader(), Some(0));
        assert_eq!(tr.decide(0, true, None, NONE, t, &slots), Forward);
        // Demoted for good: matching again earns nothing.
        for _ in 0..2 * PROMOTE_AFTER {
            assert_eq!(tr.decide(1, false, Some(0), NONE, t, &slots), Duplicate);
        }
        assert_eq!(tr.stage(), Stage::Demoted);
    }

    #[test]
    fn a_follower_off_the_numbering_demotes_on_its_own() {
        let slots = [Ready, Ready];
        let (mut tr, t) = trust(&slots);
        tr.decide(0, true, None, NONE, t, &slots);
        let off = Disagreement {
            slots: 0b10,
            pairwise: false,
            unproven: 0,
        };
        assert_eq!(tr.decide(1, true, None, off, t, &slots), Duplicate);
        assert_eq!(tr.stage(), Stage::Demoted);
        assert_eq!(tr.leader(), Some(0));
    }

    #[test]
    fn a_diverging_follower_is_never_trusted_even_between_matches() {
        // Identical acks match, snapshots differ: each open snapshot leaves it unproven, so
        // its matches never add up to a run.
        let slots = [Ready, Ready, Ready];
        let (mut tr, t) = trust(&slots);
        tr.decide(0, true, None, NONE, t, &slots);
        let unproven = Disagreement {
            unproven: 0b100,
            ..NONE
        };
        for _ in 0..5 * PROMOTE_AFTER {
            tr.decide(2, false, Some(0), unproven, t, &slots);
            tr.decide(2, true, None, unproven, t, &slots);
        }
        assert_eq!(tr.stage(), Stage::Probation);
    }

    #[test]
    fn a_trusted_pair_losing_a_member_is_back_on_probation_with_the_other() {
        let mut slots = [Ready, Ready];
        let (mut tr, t) = trust(&slots);
        tr.decide(0, true, None, NONE, t, &slots);
        for _ in 0..PROMOTE_AFTER {
            tr.decide(1, false, Some(0), NONE, t, &slots);
        }
        assert_eq!(tr.stage(), Stage::Trusted);
        slots[0] = Gone;
        tr.on_slots_changed(&slots, t + MS);
        assert_eq!(tr.stage(), Stage::Probation);
        assert_eq!(tr.leader(), Some(1));
        assert_eq!(tr.decide(1, true, None, NONE, t + 2 * MS, &slots), Forward);
    }

    #[test]
    fn an_untrusted_replica_speaks_when_every_trusted_one_is_silent() {
        let slots = [Ready, Ready, Ready];
        let (mut tr, t) = trust(&slots);
        tr.decide(0, true, None, NONE, t, &slots);
        for _ in 0..PROMOTE_AFTER {
            tr.decide(1, false, Some(0), NONE, t, &slots);
        }
        assert_eq!(tr.stage(), Stage::Trusted);
        assert_eq!(
            tr.decide(2, true, None, NONE, t + 10 * MS, &slots),
            Duplicate
        );
        assert_eq!(
            tr.decide(2, true, None, NONE, t + 60 * MS, &slots),
            ForwardAfterFailover
        );
        assert_eq!(tr.leader(), Some(2));
    }

    #[test]
    fn a_session_of_a_divergent_game_starts_demoted() {
        let slots = [Ready, Ready];
        let t = crate::epoch();
        let mut tr = Trust::new(50 * MS, t, &slots, true);
        assert_eq!(tr.stage(), Stage::Demoted);
        assert_eq!(tr.decide(1, true, None, NONE, t, &slots), Forward);
        for _ in 0..2 * PROMOTE_AFTER {
            tr.decide(0, false, Some(1), NONE, t, &slots);
        }
        assert_eq!(tr.stage(), Stage::Demoted);
        assert_eq!(tr.take_changes(), Changes::default());
    }
}
