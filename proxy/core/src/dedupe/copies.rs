//! `copies` mode: content-addressed dedupe that never drops a legitimate repeat.
//!
//! For every distinct payload we count how many times each replica has sent it. The k-th copy
//! from any replica is forwarded the moment its count passes what was already forwarded; all
//! other copies are duplicates. With deterministic replicas, the client sees each payload
//! exactly as many times as one replica sent it, whichever replica is fastest and whichever dies.
//!
//! The same counts are the evidence for agreement before trust ([`super::trust`]): a copy that
//! another replica has already sent *matches* it; a copy sent first is *open* until another
//! replica matches it. Deterministic replicas match each other whichever is ahead; replicas
//! in two worlds leave their copies open.

use std::collections::hash_map::Entry as MapEntry;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::trust::{DIVERGE_AFTER, Disagreement};
use super::{MAX_SLOTS, Slot, Verdict};

type Map = HashMap<u64, Entry, foldhash::fast::RandomState>;

/// Open copies of one replica that show it in another world even when identical answers
/// (acks, pings) keep matching in between.
pub const DIVERGE_OPEN: u32 = 16;

#[derive(Debug, Clone, Copy)]
struct Entry {
    forwarded: u32,
    /// Most copies any one replica has sent.
    seen: u32,
    /// The replica that sent copy number `seen` first, and how many of its copies are open.
    origin: u8,
    open: u32,
    counts: [u32; MAX_SLOTS],
    last_seen: Instant,
    /// When a copy was last forwarded: later copies lag behind it by their arrival's distance.
    forwarded_at: Instant,
    /// Insertion number, matching this entry's item in the eviction queue.
    serial: u64,
}

/// The evidence against each replica: a run of copies it sent first with no match, or many
/// open copies. Replicas with any open copy have not proven a clean run either.
fn disagreement(open: &[u32; MAX_SLOTS], leads: &[u32; MAX_SLOTS]) -> Disagreement {
    let mut d = Disagreement::NONE;
    for s in 0..MAX_SLOTS {
        if leads[s] >= DIVERGE_AFTER || open[s] >= DIVERGE_OPEN {
            d.slots |= 1 << s;
        }
        if open[s] > 0 {
            d.unproven |= 1 << s;
        }
    }
    d
}

/// Per-session state of the `copies` mode.
#[derive(Debug)]
pub struct Copies {
    entries: Map,
    /// Keys in insertion order, so the cap evicts in O(1). Each item carries its entry's
    /// serial, so an item can never remove a later entry that re-used its key.
    order: VecDeque<(u64, u64)>,
    next_serial: u64,
    window: Duration,
    max_entries: usize,
    seed: u64,
    last_sweep: Instant,
    evictions: u64,
    /// How far the last answer judged a duplicate arrived behind the copy that was delivered.
    lag: Option<Duration>,
    /// Per replica: copies it sent first that no other has matched yet…
    open: [u32; MAX_SLOTS],
    /// …and how many it sent first in a row with no match either way.
    leads: [u32; MAX_SLOTS],
}

impl Copies {
    /// `window`: how long a payload is remembered after its last copy; `max_entries`: hard cap
    /// on remembered payloads (oldest evicted first).
    pub fn new(window: Duration, max_entries: usize, seed: u64, now: Instant) -> Self {
        Self {
            entries: Map::default(),
            order: VecDeque::new(),
            next_serial: 0,
            window,
            max_entries: max_entries.max(1),
            seed,
            last_sweep: now,
            evictions: 0,
            lag: None,
            open: [0; MAX_SLOTS],
            leads: [0; MAX_SLOTS],
        }
    }

    /// Decides the fate of one copy of `payload` from `slot`: the first copy beyond what was
    /// delivered goes to the player.
    pub fn on_answer(&mut self, slot: Slot, payload: &[u8], now: Instant) -> Verdict {
        self.judge(slot, payload, now, |fresh, _, _| {
            if fresh {
                Verdict::Forward
            } else {
                Verdict::Duplicate
            }
        })
    }

    /// Judges one copy of `payload` from `slot`, letting `decide` choose whether it reaches
    /// the player from what it is: fresh (beyond what was delivered), the replica it matched,
    /// and the evidence of disagreement so far.
    pub fn judge(
        &mut self,
        slot: Slot,
        payload: &[u8],
        now: Instant,
        decide: impl FnOnce(bool, Option<Slot>, Disagreement) -> Verdict,
    ) -> Verdict {
        debug_assert!(slot < MAX_SLOTS);
        let slot = slot.min(MAX_SLOTS - 1);
        self.maybe_sweep(now);
        let key = xxhash_rust::xxh3::xxh3_64_with_seed(payload, self.seed);
        self.lag = None;
        let entry = match self.entries.entry(key) {
            MapEntry::Occupied(e) => e.into_mut(),
            MapEntry::Vacant(v) => {
                let serial = self.next_serial;
                self.next_serial += 1;
                self.order.push_back((key, serial));
                v.insert(Entry {
                    forwarded: 0,
                    seen: 0,
                    origin: 0,
                    open: 0,
                    counts: [0; MAX_SLOTS],
                    last_seen: now,
                    forwarded_at: now,
                    serial,
                })
            }
        };
        entry.last_seen = now;
        let count = &mut entry.counts[slot];
        *count = count.saturating_add(1);
        let count = *count;
        let origin = usize::from(entry.origin);
        let matched = if count > entry.seen {
            // First with this copy: open until another replica sends it too.
            if origin != slot {
                self.open[origin] = self.open[origin].saturating_sub(entry.open);
                entry.open = 0;
            }
            entry.seen = count;
            entry.origin = slot as u8;
            entry.open += 1;
            self.open[slot] += 1;
            self.leads[slot] = self.leads[slot].saturating_add(1);
            None
        } else if origin != slot {
            if entry.open > 0 {
                entry.open -= 1;
                self.open[origin] = self.open[origin].saturating_sub(1);
            }
            self.leads[slot] = 0;
            self.leads[origin] = 0;
            Some(origin)
        } else {
            None
        };
        let against = disagreement(&self.open, &self.leads);
        let fresh = count > entry.forwarded;
        let verdict = decide(fresh, matched, against);
        if verdict.forwards() {
            entry.forwarded = count;
            entry.forwarded_at = now;
        } else if !fresh {
            self.lag = Some(now.saturating_duration_since(entry.forwarded_at));
        }
        while self.entries.len() > self.max_entries {
            self.evict_oldest();
        }
        verdict
    }

    /// Forgets an entry's open copies (it expired or was evicted).
    fn close(open: &mut [u32; MAX_SLOTS], e: &Entry) {
        let o = usize::from(e.origin);
        open[o] = open[o].saturating_sub(e.open);
    }

    /// A replica that joins late is assumed to be in step with the others: without this, its
    /// counters would start at zero and it could not carry the stream alone until it had
    /// re-sent every payload already forwarded.
    pub fn on_slot_joined(&mut self, slot: Slot) {
        let slot = slot.min(MAX_SLOTS - 1);
        for entry in self.entries.values_mut() {
            entry.counts[slot] = entry.forwarded;
            if usize::from(entry.origin) == slot {
                entry.open = 0;
            }
        }
        self.open[slot] = 0;
        self.leads[slot] = 0;
    }

    /// How far behind the delivered copy the last answer arrived, when it was a duplicate.
    pub fn lag(&self) -> Option<Duration> {
        self.lag
    }

    /// Payloads currently remembered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries dropped to respect the cap since the last call (each one risks a duplicate).
    pub fn take_evictions(&mut self) -> u64 {
        std::mem::take(&mut self.evictions)
    }

    fn maybe_sweep(&mut self, now: Instant) {
        if now.saturating_duration_since(self.last_sweep) < self.window {
            return;
        }
        self.last_sweep = now;
        self.sweep(now);
    }

    /// Drops entries quiet for a whole window. Runs at most once per window, so its O(n)
    /// cost is spread over every answer of that window.
    fn sweep(&mut self, now: Instant) {
        let window = self.window;
        let open = &mut self.open;
        self.entries.retain(|_, e| {
            let keep = now.saturating_duration_since(e.last_seen) < window;
            if !keep {
                Self::close(open, e);
            }
            keep
        });
        let entries = &self.entries;
        self.order
            .retain(|(k, serial)| entries.get(k).is_some_and(|e| e.serial == *serial));
        // Give memory back after a burst; keep some headroom to avoid churn.
        if self.entries.capacity() > 64 && self.entries.len() < self.entries.capacity() / 4 {
            self.entries.shrink_to(self.entries.len() * 2);
            self.order.shrink_to(self.entries.len() * 2);
        }
    }

    /// Removes the oldest inserted entry: O(1) amortised, stale queue items skipped.
    fn evict_oldest(&mut self) {
        while let Some((key, serial)) = self.order.pop_front() {
            if self.entries.get(&key).is_some_and(|e| e.serial == serial) {
                if let Some(e) = self.entries.remove(&key) {
                    Self::close(&mut self.open, &e);
                }
                self.evictions += 1;
                return;
            }
        }
        // The queue lost track (cannot happen: every entry has its item). Stay bounded.
        self.entries.clear();
        self.open = [0; MAX_SLOTS];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dedupe::Verdict::{Duplicate, Forward};

    fn copies() -> (Copies, Instant) {
        let now = crate::epoch();
        (Copies::new(Duration::from_secs(1), 1024, 7, now), now)
    }

    #[test]
    fn first_copy_wins_later_copies_dropped() {
        let (mut c, t) = copies();
        assert_eq!(c.on_answer(1, b"state 1", t), Forward);
        assert_eq!(c.on_answer(0, b"state 1", t), Duplicate);
        assert_eq!(c.on_answer(2, b"state 1", t), Duplicate);
        assert_eq!(c.on_answer(0, b"state 2", t), Forward);
    }

    #[test]
    fn a_duplicate_reports_how_far_behind_the_delivered_copy_it_came() {
        let (mut c, t) = copies();
        let ms = Duration::from_millis;
        assert_eq!(c.on_answer(1, b"s1", t), Forward);
        assert_eq!(c.lag(), None);
        assert_eq!(c.on_answer(0, b"s1", t + ms(2)), Duplicate);
        assert_eq!(c.lag(), Some(ms(2)));
        assert_eq!(c.on_answer(2, b"s1", t + ms(7)), Duplicate);
        assert_eq!(c.lag(), Some(ms(7)));
        assert_eq!(c.on_answer(2, b"s2", t + ms(8)), Forward);
        assert_eq!(c.lag(), None, "a delivered answer lags nothing");
    }

    #[test]
    fn legitimate_repeats_are_never_lost() {
        // Each replica sends the same keepalive three times; the client must see it three times.
        let (mut c, t) = copies();
        let mut forwarded = 0;
        for round in 0..3 {
            for slot in [0, 1, 2] {
                if c.on_answer(slot, b"keepalive", t + Duration::from_millis(round)) == Forward {
                    forwarded += 1;
                }
            }
        }
        assert_eq!(forwarded, 3);
    }

    #[test]
    fn fastest_replica_carries_the_stream_when_others_lag() {
        let (mut c, t) = copies();
        // Replica 0 sends "k" twice before replica 1 sends it at all.
        assert_eq!(c.on_answer(0, b"k", t), Forward);
        assert_eq!(c.on_answer(0, b"k", t), Forward);
        assert_eq!(c.on_answer(1, b"k", t), Duplicate);
        assert_eq!(c.on_answer(1, b"k", t), Duplicate);
        // Replica 0 dies; replica 1's third copy is new.
        assert_eq!(c.on_answer(1, b"k", t), Forward);
    }

    #[test]
    fn entries_expire_after_quiet_window() {
        let (mut c, t) = copies();
        assert_eq!(c.on_answer(0, b"x", t), Forward);
        assert_eq!(
            c.on_answer(1, b"x", t + Duration::from_millis(5)),
            Duplicate
        );
        let later = t + Duration::from_secs(3);
        assert_eq!(c.on_answer(0, b"x", later), Forward);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn continuous_repeats_keep_the_entry_alive() {
        // A keepalive every 400 ms with a 1 s window: counters must never reset, or a lagging
        // replica's copy would be forwarded as new.
        let (mut c, t) = copies();
        let mut forwarded = 0;
        for i in 0..20u64 {
            let at = t + Duration::from_millis(400 * i);
            if c.on_answer(0, b"ka", at) == Forward {
                forwarded += 1;
            }
            if c.on_answer(1, b"ka", at + Duration::from_millis(900)) == Forward {
                forwarded += 1;
            }
        }
        assert_eq!(forwarded, 20);
    }

    #[test]
    fn cap_evicts_in_insertion_order_after_expiry() {
        let now = crate::epoch();
        let mut c = Copies::new(Duration::from_secs(1), 2, 1, now);
        c.on_answer(0, b"a", now);
        // "a" expires and is inserted again, after "b": "b" is now the oldest.
        let later = now + Duration::from_secs(2);
        c.on_answer(0, b"b", later);
        c.on_answer(0, b"a", later);
        c.on_answer(0, b"c", later);
        assert_eq!(c.len(), 2);
        assert_eq!(c.on_answer(1, b"a", later), Duplicate, "a survived");
        assert_eq!(c.on_answer(1, b"c", later), Duplicate);
        assert_eq!(c.take_evictions(), 1, "b went");
    }

    #[test]
    fn cap_bounds_memory_and_evicts_oldest() {
        let now = crate::epoch();
        let mut c = Copies::new(Duration::from_secs(60), 4, 1, now);
        for i in 0..10u8 {
            c.on_answer(0, &[i], now + Duration::from_millis(u64::from(i)));
        }
        assert_eq!(c.len(), 4);
        assert_eq!(c.take_evictions(), 6);
        // The newest entries are still known.
        assert_eq!(c.on_answer(1, &[9], now), Duplicate);
    }

    #[test]
    fn late_joiner_is_assumed_in_step() {
        let (mut c, t) = copies();
        assert_eq!(c.on_answer(0, b"ka", t), Forward);
        assert_eq!(c.on_answer(0, b"ka", t), Forward);
        c.on_slot_joined(3);
        // The newcomer's next keepalive is the third one, not a duplicate of the first.
        assert_eq!(c.on_answer(3, b"ka", t), Forward);
        assert_eq!(c.on_answer(0, b"ka", t), Duplicate);
    }

    #[test]
    fn empty_payloads_are_deduplicated_too() {
        let (mut c, t) = copies();
        assert_eq!(c.on_answer(0, b"", t), Forward);
        assert_eq!(c.on_answer(1, b"", t), Duplicate);
    }
}
