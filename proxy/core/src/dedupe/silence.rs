//! When the replica a session relies on counts as gone quiet, shared by `primary`'s
//! failover, the trusted set of agreement before trust and `sequence`'s numbering owner.
//!
//! Silence is evidence against the watched replica only while the session is alive: it owes
//! an answer to a player's datagram for the window, or another replica has been answering
//! without a pause for the window while it said nothing. Counting from the watched replica's
//! own last answer instead would take every quiet spell (a turn, a pause, a spectator) for a
//! death, and fail over whenever a standby happens to answer first when play resumes: for a
//! server whose replicas differ, a switch of worlds.

use std::time::{Duration, Instant};

/// The evidence of silence against one watched replica (or set of replicas).
#[derive(Debug, Clone, Copy, Default)]
pub struct Silence {
    /// The first player datagram since the watched replica last answered.
    asked: Option<Instant>,
    /// Since when others have answered without a pause longer than the window…
    others_since: Option<Instant>,
    /// …and when one last did.
    last_other: Option<Instant>,
}

impl Silence {
    /// The watched replica answered: nothing is held against it.
    pub fn heard(&mut self) {
        *self = Self::default();
    }

    /// The player sent a datagram at `now`.
    pub fn asked(&mut self, now: Instant) {
        self.asked.get_or_insert(now);
    }

    /// Another replica answered at `now`: whether the watched one is silent, for `window`.
    pub fn other(&mut self, now: Instant, window: Duration) -> bool {
        if self
            .last_other
            .is_some_and(|l| now.saturating_duration_since(l) > window)
        {
            // A pause: nobody answered; it says nothing against the watched replica.
            self.others_since = None;
        }
        self.last_other = Some(now);
        let since = *self.others_since.get_or_insert(now);
        now.saturating_duration_since(since) >= window
            || self
                .asked
                .is_some_and(|a| now.saturating_duration_since(a) >= window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const W: Duration = Duration::from_millis(50);

    #[test]
    fn others_answering_without_a_pause_for_the_window() {
        let t = crate::epoch();
        let mut s = Silence::default();
        for i in 0..5u32 {
            assert!(!s.other(t + 10 * MS * i, W), "{i}");
        }
        assert!(s.other(t + 50 * MS, W));
        s.heard();
        assert!(!s.other(t + 60 * MS, W));
    }

    #[test]
    fn a_pause_of_everyone_is_no_evidence() {
        let t = crate::epoch();
        let mut s = Silence::default();
        assert!(!s.other(t, W));
        // Two seconds of nothing, then another replica answers first: not silence.
        assert!(!s.other(t + 2000 * MS, W));
        assert!(!s.other(t + 2020 * MS, W));
    }

    #[test]
    fn a_datagram_owed_for_the_window() {
        // Others answer only now and then (slower than the window), but the player's datagram
        // has waited for the watched replica for the window.
        let t = crate::epoch();
        let mut s = Silence::default();
        s.asked(t);
        s.asked(t + 30 * MS);
        assert!(!s.other(t + 10 * MS, W));
        assert!(!s.other(t + 49 * MS, W));
        assert!(s.other(t + 120 * MS, W), "owed since t");
        s.heard();
        s.asked(t + 130 * MS);
        assert!(!s.other(t + 131 * MS, W));
    }
}
