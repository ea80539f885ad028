//! `sequence` mode: protocol-aware dedupe on a sequence number inside the payload.
//!
//! The number is read at a fixed offset, width and byte order. Acceptance uses a sliding
//! window in the style of IPsec anti-replay (RFC 6479): a ring of bitmap words indexed by the
//! number itself, so advancing the window clears whole words instead of shifting bits. Numbers
//! compare in serial-number arithmetic (RFC 1982) modulo 2^(8·width), which makes wrap-around
//! from the largest value back to zero just another step forward.
//!
//! A numbering can also restart: a replica restarts or joins with its own count, or a new
//! player reuses an address and port whose session is still open. The window would reject the
//! new numbers until they pass the old highest, so [`Sequence`] resynchronises as receivers of
//! SMPTE ST 2022-7 streams do: after a few consecutive rejected answers that agree on a new
//! numbering far behind the current one, the new numbering is accepted.

use std::time::{Duration, Instant};

use super::trust::{DIVERGE_AFTER, Disagreement};
use super::{Copies, MAX_SLOTS, Silence, Slot, Verdict};

/// Width of the sequence number in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Width {
    /// 16-bit.
    Two = 2,
    /// 32-bit.
    Four = 4,
    /// 64-bit.
    Eight = 8,
}

impl Width {
    /// From a byte count; only 2, 4 and 8 exist.
    pub fn from_bytes(n: u64) -> Option<Self> {
        match n {
            2 => Some(Width::Two),
            4 => Some(Width::Four),
            8 => Some(Width::Eight),
            _ => None,
        }
    }

    /// Size in bytes.
    pub fn bytes(self) -> usize {
        self as usize
    }

    fn mask(self) -> u64 {
        match self {
            Width::Two => u64::from(u16::MAX),
            Width::Four => u64::from(u32::MAX),
            Width::Eight => u64::MAX,
        }
    }
}

/// Byte order of the sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endian {
    /// Network order.
    Big,
    /// Little-endian, as most game engines write it.
    Little,
}

/// Where the sequence number sits in a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SequenceSpec {
    /// Byte offset of the first byte.
    pub offset: usize,
    /// Size of the number.
    pub width: Width,
    /// Byte order.
    pub endian: Endian,
}

impl SequenceSpec {
    /// Reads the number, or `None` when the payload is too short to hold it.
    pub fn read(&self, payload: &[u8]) -> Option<u64> {
        let end = self.offset.checked_add(self.width.bytes())?;
        let bytes = payload.get(self.offset..end)?;
        let mut buf = [0u8; 8];
        Some(match self.endian {
            Endian::Big => {
                buf[8 - bytes.len()..].copy_from_slice(bytes);
                u64::from_be_bytes(buf)
            }
            Endian::Little => {
                buf[..bytes.len()].copy_from_slice(bytes);
                u64::from_le_bytes(buf)
            }
        })
    }
}

const WORDS: usize = 32;
const RING_BITS: u64 = (WORDS as u64) * 64;
/// How far behind the highest number an answer may be and still be judged: one word of the
/// ring is always being reused, so the usable window is one word short of the ring.
pub const WINDOW: u64 = RING_BITS - 64;

/// Anti-replay window over serial numbers of one width.
#[derive(Debug, Clone)]
pub struct ReplayWindow {
    mask: u64,
    highest: Option<u64>,
    ring: [u64; WORDS],
}

impl ReplayWindow {
    /// Empty window for numbers of `width`.
    pub fn new(width: Width) -> Self {
        Self {
            mask: width.mask(),
            highest: None,
            ring: [0; WORDS],
        }
    }

    /// What [`Self::accept`] would say of `seq`, changing nothing.
    pub fn check(&self, seq: u64) -> Verdict {
        let seq = seq & self.mask;
        let Some(highest) = self.highest else {
            return Verdict::Forward;
        };
        let ahead = seq.wrapping_sub(highest) & self.mask;
        if ahead == 0 {
            return Verdict::Duplicate;
        }
        if ahead <= self.mask >> 1 {
            return Verdict::Forward;
        }
        let behind = highest.wrapping_sub(seq) & self.mask;
        if behind >= WINDOW {
            Verdict::Stale
        } else if self.test(seq) {
            Verdict::Duplicate
        } else {
            Verdict::Forward
        }
    }

    /// How far `seq` lies ahead of the highest number accepted; `None` when it is not ahead
    /// or nothing was accepted yet.
    pub fn ahead(&self, seq: u64) -> Option<u64> {
        let highest = self.highest?;
        let ahead = (seq & self.mask).wrapping_sub(highest) & self.mask;
        (ahead != 0 && ahead <= self.mask >> 1).then_some(ahead)
    }

    /// The highest number accepted.
    pub fn highest(&self) -> Option<u64> {
        self.highest
    }

    /// Records `seq`; true when it was not seen before (and is not too old to tell).
    pub fn accept(&mut self, seq: u64) -> Verdict {
        let seq = seq & self.mask;
        let Some(highest) = self.highest else {
            self.highest = Some(seq);
            self.set(seq);
            return Verdict::Forward;
        };
        let ahead = seq.wrapping_sub(highest) & self.mask;
        if ahead == 0 {
            return Verdict::Duplicate;
        }
        let half = (self.mask >> 1) + 1;
        if ahead < half {
            self.advance(highest, seq);
            self.set(seq);
            return Verdict::Forward;
        }
        let behind = highest.wrapping_sub(seq) & self.mask;
        if behind >= WINDOW {
            return Verdict::Stale;
        }
        if self.test(seq) {
            Verdict::Duplicate
        } else {
            self.set(seq);
            Verdict::Forward
        }
    }

    /// How far `seq` lies behind the highest number accepted; `None` when it is ahead of it or
    /// nothing was accepted yet.
    pub fn behind(&self, seq: u64) -> Option<u64> {
        let highest = self.highest?;
        let seq = seq & self.mask;
        let ahead = seq.wrapping_sub(highest) & self.mask;
        if ahead != 0 && ahead <= self.mask >> 1 {
            return None;
        }
        Some(highest.wrapping_sub(seq) & self.mask)
    }

    /// Forgets everything and starts over with `seq` as the only number seen.
    pub fn reset(&mut self, seq: u64) {
        self.highest = None;
        self.ring = [0; WORDS];
        self.accept(seq);
    }

    /// Serial distance by which `a` lies behind `b` (0 when it does not).
    fn distance_behind(&self, a: u64, b: u64) -> u64 {
        let back = b.wrapping_sub(a) & self.mask;
        if back <= self.mask >> 1 { back } else { 0 }
    }

    /// Clears the words that the window slides over when moving from `from` to `to`.
    fn advance(&mut self, from: u64, to: u64) {
        let word_mask = self.mask >> 6;
        let from_word = from >> 6;
        let steps = ((to >> 6).wrapping_sub(from_word)) & word_mask;
        if steps >= WORDS as u64 {
            self.ring = [0; WORDS];
        } else {
            for i in 1..=steps {
                self.ring[Self::word_index(from_word.wrapping_add(i))] = 0;
            }
        }
        self.highest = Some(to);
    }

    // Every width's modulus (2^16, 2^32, 2^64) is a multiple of the ring size, so indexing
    // by the raw number stays consistent across wrap-around.
    fn word_index(word: u64) -> usize {
        (word % WORDS as u64) as usize
    }

    fn set(&mut self, seq: u64) {
        self.ring[Self::word_index(seq >> 6)] |= 1 << (seq & 63);
    }

    fn test(&self, seq: u64) -> bool {
        self.ring[Self::word_index(seq >> 6)] & (1 << (seq & 63)) != 0
    }
}

/// Numbers a replica's own stream may step back (reordering on the path) before the step is
/// taken for a restart of its numbering.
pub const REORDER_TOLERANCE: u64 = 16;

/// How far ahead of the delivered numbering a replica may be and still count on it (half the
/// window): further, its numbers are another numbering, not a faster replica.
pub(super) const AHEAD_LIMIT: u64 = WINDOW / 2;

/// Numbers a survivor may be behind the delivered numbering, once the replica that delivered
/// it is gone, before its own numbering is taken at once instead of waiting for it to catch up.
pub const SURVIVOR_SLACK: u64 = 3;

/// What restart detection makes of a number the window rejects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rejected {
    /// An ordinary copy, reordered or lagging: the window's verdict stands.
    Keep,
    /// Part of a restarted numbering, not accepted yet.
    Restart,
    /// A restarted numbering agreed on long enough: start over from it.
    Resync,
}

/// What to do with the window when an answer is delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Commit {
    /// Record the number.
    Accept,
    /// Start over from it (a restarted numbering, or a survivor's).
    Reset,
}

/// Per-session state of the `sequence` mode.
#[derive(Debug)]
pub struct Sequence {
    spec: SequenceSpec,
    window: ReplayWindow,
    /// Datagrams too short to carry a number (handshakes, pings) are deduplicated by content
    /// instead of being dropped or forwarded once per replica.
    short: Copies,
    /// Consecutive rejected answers on a new numbering before it is accepted; 0 never.
    resync_after: u32,
    /// Each slot's last number: a restart shows as a slot's own stream stepping back.
    last: [Option<u64>; MAX_SLOTS],
    /// Slots whose stream stepped back far behind the current numbering.
    diverged: u32,
    /// The run of rejected answers on a new numbering: its length and latest number.
    run: u32,
    run_at: u64,
    resyncs: u64,
    /// When the last numbers were delivered, by number modulo the ring's size: a copy of one
    /// of them lags behind it by its arrival's distance.
    delivered: [(u64, Instant); DELIVERED_RING],
    /// See [`Copies::lag`].
    lag: Option<Duration>,
    /// The replica whose answer set the highest number delivered.
    owner: Option<Slot>,
    /// The evidence that the owner has gone quiet.
    silence: Silence,
    /// The first number delivered since the numbering (re)started: a replica's numbers
    /// before it predate the session, and say nothing of agreement.
    first: Option<u64>,
    /// Per replica, answers in a row off the delivered numbering (agreement's evidence).
    off: [u32; MAX_SLOTS],
}

/// Delivery times remembered per session: a copy further behind than this many numbers has
/// no lag recorded (it is far behind either way, and its silence and wins show it).
const DELIVERED_RING: usize = 32;

impl Sequence {
    /// State for one session; see [`Sequence`] for `resync_after`.
    pub fn new(spec: SequenceSpec, short: Copies, resync_after: u32, now: Instant) -> Self {
        Self {
            spec,
            window: ReplayWindow::new(spec.width),
            short,
            resync_after,
            last: [None; MAX_SLOTS],
            diverged: 0,
            run: 0,
            run_at: 0,
            resyncs: 0,
            delivered: [(u64::MAX, now); DELIVERED_RING],
            lag: None,
            owner: None,
            silence: Silence::default(),
            first: None,
            off: [0; MAX_SLOTS],
        }
    }

    /// See [`Copies::lag`].
    pub fn lag(&self) -> Option<Duration> {
        self.lag
    }

    /// Judges an answer and notes when a delivered number went out, or how far a copy of
    /// one lags behind it.
    pub fn on_answer(&mut self, slot: Slot, payload: &[u8], now: Instant) -> Verdict {
        self.judge(slot, payload, now, false, |fresh, _, _| {
            if fresh {
                Verdict::Forward
            } else {
                Verdict::Duplicate
            }
        })
    }

    /// The replica whose answer set the highest number delivered.
    pub fn owner(&self) -> Option<Slot> {
        self.owner
    }

    /// Notes an answer from `slot` at `now`: whether the owner of the numbering is silent
    /// (see [`Silence`]) over `window`.
    pub fn owner_silent(&mut self, slot: Slot, now: Instant, window: Duration) -> bool {
        if self.owner.is_none_or(|o| o == slot) {
            self.silence.heard();
            return false;
        }
        self.silence.other(now, window)
    }

    /// The player sent a datagram at `now`.
    pub fn on_request(&mut self, now: Instant) {
        self.silence.asked(now);
    }

    /// Judges an answer, letting `decide` choose whether it reaches the player from what it
    /// is: fresh (a number not delivered yet), the replica it matched, and the evidence of
    /// disagreement. `owner_gone`: the replica whose numbering was delivered ([`Self::owner`])
    /// is gone (removed, or silent while others answer); a survivor behind it is then
    /// delivered at once, its numbering taken, instead of waiting to catch up.
    pub fn judge(
        &mut self,
        slot: Slot,
        payload: &[u8],
        now: Instant,
        owner_gone: bool,
        decide: impl FnOnce(bool, Option<Slot>, Disagreement) -> Verdict,
    ) -> Verdict {
        self.lag = None;
        let slot = slot.min(MAX_SLOTS - 1);
        let Some(seq) = self.spec.read(payload) else {
            let against = self.disagreement();
            let verdict = self.short.judge(slot, payload, now, |fresh, _, _| {
                decide(fresh, None, against)
            });
            self.lag = self.short.lag();
            return verdict;
        };
        let (commit, matched, rejected) = self.classify(slot, seq, owner_gone);
        let verdict = decide(commit.is_some(), matched, self.disagreement());
        let cell = &mut self.delivered[(seq % DELIVERED_RING as u64) as usize];
        match (commit, verdict.forwards()) {
            (Some(how), true) => {
                *cell = (seq, now);
                match how {
                    Commit::Accept => {
                        self.window.accept(seq);
                    }
                    Commit::Reset => {
                        self.first = None;
                        self.window.reset(seq);
                        self.run = 0;
                        self.diverged = 0;
                        self.resyncs += 1;
                    }
                }
                if self.window.highest() == Some(seq & self.spec.width.mask()) {
                    if self.owner != Some(slot) {
                        self.silence.heard();
                    }
                    self.owner = Some(slot);
                }
                self.first.get_or_insert(seq);
                if how == Commit::Accept {
                    self.run = 0;
                    self.diverged &= !(1 << slot);
                }
            }
            _ if verdict == Verdict::Duplicate && cell.0 == seq => {
                self.lag = Some(now.saturating_duration_since(cell.1));
            }
            _ => {}
        }
        if commit.is_some() { verdict } else { rejected }
    }

    /// The evidence against each replica: answers in a row off the delivered numbering.
    fn disagreement(&self) -> Disagreement {
        let mut d = Disagreement {
            slots: 0,
            pairwise: false,
            unproven: 0,
        };
        for (s, &off) in self.off.iter().enumerate() {
            if off >= DIVERGE_AFTER {
                d.slots |= 1 << s;
            }
            if off > 0 {
                d.unproven |= 1 << s;
            }
        }
        d
    }

    /// Whether number `seq` from `slot` would be new to the player (and how the window would
    /// take it), which replica it matched, and the verdict when it is not new; updates the
    /// evidence and the restart detection.
    fn classify(
        &mut self,
        slot: Slot,
        seq: u64,
        owner_gone: bool,
    ) -> (Option<Commit>, Option<Slot>, Verdict) {
        let bit = 1u32 << slot;
        let previous = self.last[slot].replace(seq);
        let off = |me: &mut Self| me.off[slot] = me.off[slot].saturating_add(1);
        match self.window.check(seq) {
            Verdict::Forward | Verdict::ForwardAfterFailover => {
                let before_first = self
                    .first
                    .is_some_and(|f| self.window.distance_behind(seq, f) > 0);
                let matched = match self.window.behind(seq) {
                    // A hole far behind, within what was delivered: a number the delivered
                    // stream never had.
                    Some(b) if b > REORDER_TOLERANCE && !before_first => {
                        off(self);
                        None
                    }
                    Some(_) => None,
                    None if self.window.ahead(seq).is_some_and(|a| a > AHEAD_LIMIT) => {
                        off(self);
                        None
                    }
                    None => {
                        // Another replica already past it: they number alike.
                        let mask = self.spec.width.mask();
                        let last = &self.last;
                        let other = (0..MAX_SLOTS).find(|&o| {
                            o != slot
                                && last[o]
                                    .is_some_and(|l| l.wrapping_sub(seq) & mask <= AHEAD_LIMIT)
                        });
                        if other.is_some() {
                            self.off[slot] = 0;
                        }
                        other
                    }
                };
                (Some(Commit::Accept), matched, Verdict::Duplicate)
            }
            Verdict::Duplicate => {
                let behind = self.window.behind(seq).unwrap_or(0);
                if behind > SURVIVOR_SLACK && owner_gone && self.owner.is_some_and(|o| o != slot) {
                    self.off[slot] = 0;
                    return (Some(Commit::Reset), self.owner, Verdict::Duplicate);
                }
                match self.rejected(bit, seq, previous, behind) {
                    Rejected::Keep => {
                        self.off[slot] = 0;
                        (None, self.owner, Verdict::Duplicate)
                    }
                    Rejected::Restart => {
                        off(self);
                        (None, None, Verdict::Stale)
                    }
                    Rejected::Resync => (Some(Commit::Reset), None, Verdict::Stale),
                }
            }
            Verdict::Stale => {
                off(self);
                let behind = self.window.behind(seq).unwrap_or(u64::MAX);
                match self.rejected(bit, seq, previous, behind) {
                    Rejected::Resync => (Some(Commit::Reset), None, Verdict::Stale),
                    Rejected::Keep | Rejected::Restart => (None, None, Verdict::Stale),
                }
            }
        }
    }

    /// Restart detection for a number the window rejects.
    fn rejected(&mut self, bit: u32, seq: u64, previous: Option<u64>, behind: u64) -> Rejected {
        // Close behind the highest, it is an ordinary copy or a reordered one.
        if behind <= REORDER_TOLERANCE {
            self.diverged &= !bit;
            return Rejected::Keep;
        }
        // Far behind. A replica lagging on the current numbering moves forward on its own
        // stream; a restarted one stepped back (or, new in this slot, started far behind).
        let stepped_back =
            previous.is_none_or(|p| self.window.distance_behind(seq, p) > REORDER_TOLERANCE);
        if stepped_back {
            self.diverged |= bit;
        }
        if self.diverged & bit == 0 {
            return Rejected::Keep;
        }
        // Answers agree on a new numbering when each lies near the run's latest number.
        let agrees = self.run > 0
            && self.window.distance_behind(seq, self.run_at) <= REORDER_TOLERANCE
            && self.window.distance_behind(self.run_at, seq) <= REORDER_TOLERANCE;
        self.run = if agrees { self.run + 1 } else { 1 };
        self.run_at = seq;
        if self.resync_after > 0 && self.run >= self.resync_after {
            Rejected::Resync
        } else {
            Rejected::Restart
        }
    }

    /// See [`Copies::take_evictions`].
    pub fn take_evictions(&mut self) -> u64 {
        self.short.take_evictions()
    }

    /// Numberings restarted and accepted since the last call.
    pub fn take_resyncs(&mut self) -> u64 {
        std::mem::take(&mut self.resyncs)
    }

    /// A replica joined (or re-used) `slot`: its stream starts afresh.
    pub fn on_slot_joined(&mut self, slot: Slot) {
        self.short.on_slot_joined(slot);
        let slot = slot.min(MAX_SLOTS - 1);
        self.last[slot] = None;
        self.diverged &= !(1 << slot);
        self.off[slot] = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dedupe::Verdict::{Duplicate, Forward, Stale};

    #[test]
    fn reads_every_width_and_endianness() {
        let p = [0xAA, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08];
        let spec = |width, endian| SequenceSpec {
            offset: 1,
            width,
            endian,
        };
        assert_eq!(spec(Width::Two, Endian::Big).read(&p), Some(0x0102));
        assert_eq!(spec(Width::Two, Endian::Little).read(&p), Some(0x0201));
        assert_eq!(spec(Width::Four, Endian::Big).read(&p), Some(0x01020304));
        assert_eq!(spec(Width::Four, Endian::Little).read(&p), Some(0x04030201));
        assert_eq!(
            spec(Width::Eight, Endian::Big).read(&p),
            Some(0x0102030405060708)
        );
        assert_eq!(
            spec(Width::Eight, Endian::Little).read(&p),
            Some(0x0807060504030201)
        );
        assert_eq!(spec(Width::Eight, Endian::Big).read(&p[..8]), None);
        let far = SequenceSpec {
            offset: usize::MAX,
            width: Width::Eight,
            endian: Endian::Big,
        };
        assert_eq!(far.read(&p), None);
    }

    #[test]
    fn first_copy_of_each_number() {
        let mut w = ReplayWindow::new(Width::Four);
        assert_eq!(w.accept(10), Forward);
        assert_eq!(w.accept(10), Duplicate);
        assert_eq!(w.accept(11), Forward);
        assert_eq!(w.accept(11), Duplicate);
        assert_eq!(w.accept(10), Duplicate);
    }

    #[test]
    fn reordering_within_the_window() {
        let mut w = ReplayWindow::new(Width::Four);
        for s in [5, 9, 7, 6, 8] {
            assert_eq!(w.accept(s), Forward, "{s}");
        }
        for s in [5, 6, 7, 8, 9] {
            assert_eq!(w.accept(s), Duplicate, "{s}");
        }
        // Late but inside the window: accepted once.
        assert_eq!(w.accept(5000), Forward);
        assert_eq!(w.accept(5000 - WINDOW + 1), Forward);
        assert_eq!(w.accept(5000 - WINDOW + 1), Duplicate);
        assert_eq!(w.accept(5000 - WINDOW), Stale);
    }

    #[test]
    fn wraps_around_every_width() {
        for (width, max) in [
            (Width::Two, u64::from(u16::MAX)),
            (Width::Four, u64::from(u32::MAX)),
            (Width::Eight, u64::MAX),
        ] {
            let mut w = ReplayWindow::new(width);
            let start = max - 100;
            let mut s = start;
            for _ in 0..300 {
                assert_eq!(w.accept(s), Forward, "{width:?} {s}");
                assert_eq!(w.accept(s), Duplicate, "{width:?} {s}");
                s = s.wrapping_add(1) & max;
            }
            // Numbers from before the wrap are still recognised as old, not new.
            assert_eq!(w.accept(max), Duplicate, "{width:?}");
            assert_eq!(w.accept(0), Duplicate, "{width:?}");
        }
    }

    #[test]
    fn reordering_across_wrap() {
        let mut w = ReplayWindow::new(Width::Two);
        assert_eq!(w.accept(65534), Forward);
        assert_eq!(w.accept(1), Forward);
        assert_eq!(w.accept(65535), Forward);
        assert_eq!(w.accept(0), Forward);
        assert_eq!(w.accept(65535), Duplicate);
        assert_eq!(w.accept(2), Forward);
    }

    #[test]
    fn big_jump_clears_the_window() {
        let mut w = ReplayWindow::new(Width::Four);
        assert_eq!(w.accept(1), Forward);
        assert_eq!(w.accept(1 + 10 * RING_BITS), Forward);
        // A number sharing a ring slot with an old one is not mistaken for a repeat.
        assert_eq!(w.accept(2 + 10 * RING_BITS - RING_BITS / 2), Forward);
    }

    #[test]
    fn short_datagrams_fall_back_to_content() {
        let now = crate::epoch();
        let spec = SequenceSpec {
            offset: 4,
            width: Width::Four,
            endian: Endian::Big,
        };
        let mut s = Sequence::new(
            spec,
            Copies::new(std::time::Duration::from_secs(1), 64, 3, now),
            2,
            now,
        );
        assert_eq!(s.on_answer(0, b"hi", now), Forward);
        assert_eq!(s.on_answer(1, b"hi", now), Duplicate);
        assert_eq!(s.on_answer(0, b"hdr\0\0\0\0\x07", now), Forward);
        assert_eq!(s.on_answer(1, b"HDR\0\0\0\0\x07", now), Duplicate);
    }

    fn stream(resync_after: u32) -> Sequence {
        let spec = SequenceSpec {
            offset: 0,
            width: Width::Four,
            endian: Endian::Big,
        };
        let now = crate::epoch();
        Sequence::new(
            spec,
            Copies::new(std::time::Duration::from_secs(1), 64, 3, now),
            resync_after,
            now,
        )
    }

    #[test]
    fn a_copy_lags_behind_the_delivered_number_short_ones_too() {
        let t0 = crate::epoch();
        let ms = std::time::Duration::from_millis;
        let mut s = stream(0);
        assert_eq!(s.on_answer(0, &7u32.to_be_bytes(), t0), Forward);
        assert_eq!(s.lag(), None);
        assert_eq!(s.on_answer(0, &8u32.to_be_bytes(), t0 + ms(1)), Forward);
        assert_eq!(s.on_answer(1, &7u32.to_be_bytes(), t0 + ms(3)), Duplicate);
        assert_eq!(s.lag(), Some(ms(3)));
        assert_eq!(s.on_answer(1, &8u32.to_be_bytes(), t0 + ms(4)), Duplicate);
        assert_eq!(s.lag(), Some(ms(3)));
        // Forty numbers on, 8's delivery time is forgotten: no lag rather than a wrong one.
        for n in 9..48u32 {
            assert_eq!(s.on_answer(0, &n.to_be_bytes(), t0 + ms(5)), Forward);
        }
        assert_eq!(s.on_answer(1, &9u32.to_be_bytes(), t0 + ms(6)), Duplicate);
        assert_eq!(s.lag(), None, "9 shares its cell with 41, delivered since");
        // Too short for a number: content decides, and reports the lag the same way.
        assert_eq!(s.on_answer(0, b"hi", t0 + ms(10)), Forward);
        assert_eq!(s.on_answer(2, b"hi", t0 + ms(12)), Duplicate);
        assert_eq!(s.lag(), Some(ms(2)));
    }

    fn answer(s: &mut Sequence, slot: Slot, seq: u32) -> Verdict {
        s.on_answer(slot, &seq.to_be_bytes(), crate::epoch())
    }

    /// Two replicas answer `range` in lockstep; returns the numbers delivered.
    fn lockstep(s: &mut Sequence, range: std::ops::Range<u32>) -> Vec<u32> {
        let mut out = Vec::new();
        for n in range {
            for slot in [0, 1] {
                if answer(s, slot, n).forwards() {
                    out.push(n);
                }
            }
        }
        out
    }

    #[test]
    fn a_player_reusing_an_address_gets_a_new_numbering_after_k_answers() {
        // Old player reached 500; a new one on the same address and port starts again at 0.
        let mut s = stream(2);
        assert_eq!(lockstep(&mut s, 0..500), (0..500).collect::<Vec<_>>());
        // Both replicas' copies of 0 agree on the new numbering: accepted at the second.
        assert_eq!(
            answer(&mut s, 0, 0),
            Stale,
            "counted as stale, not duplicate"
        );
        assert_eq!(answer(&mut s, 1, 0), Forward);
        assert_eq!(s.take_resyncs(), 1);
        assert_eq!(lockstep(&mut s, 1..100), (1..100).collect::<Vec<_>>());
        assert_eq!(s.take_resyncs(), 0);
    }

    #[test]
    fn resync_waits_for_k_agreeing_answers() {
        let mut s = stream(4);
        lockstep(&mut s, 0..300);
        assert_eq!(answer(&mut s, 0, 0), Stale);
        assert_eq!(answer(&mut s, 1, 0), Stale);
        assert_eq!(answer(&mut s, 0, 1), Stale);
        assert_eq!(answer(&mut s, 1, 1), Forward, "the fourth agreeing answer");
        assert_eq!(answer(&mut s, 0, 2), Forward);
        // Without resync the new numbering would stay dropped until it passed 299.
        let mut never = stream(0);
        lockstep(&mut never, 0..300);
        let dropped: Vec<_> = (0..50).map(|n| answer(&mut never, 0, n)).collect();
        assert!(dropped.iter().all(|v| !v.forwards()));
    }

    #[test]
    fn a_restarted_replica_beyond_the_window_takes_over_when_alone() {
        // Replica 0 died at 5000; its replacement (slot 1, late-joined) counts from 7.
        let mut s = stream(2);
        for n in 0..5000 {
            answer(&mut s, 0, n);
        }
        assert_eq!(answer(&mut s, 1, 7), Stale);
        assert_eq!(answer(&mut s, 1, 8), Forward);
        assert_eq!(answer(&mut s, 1, 9), Forward);
        assert_eq!(answer(&mut s, 1, 9), Duplicate);
    }

    #[test]
    fn a_restarted_replica_does_not_interleave_while_a_peer_answers() {
        // Slot 1 restarts at 0 while slot 0 keeps the stream going: every answer of slot 0
        // comes between two of slot 1's, so the run never reaches K.
        let mut s = stream(2);
        lockstep(&mut s, 0..400);
        for n in 400..600u32 {
            assert_eq!(answer(&mut s, 0, n), Forward);
            assert_eq!(answer(&mut s, 1, n - 400), Stale, "{n}");
        }
        assert_eq!(s.take_resyncs(), 0);
    }

    #[test]
    fn a_lagging_replica_is_never_taken_for_a_restart() {
        // Slot 1 pauses, then flushes 100 answers the other replica already delivered.
        let mut s = stream(2);
        lockstep(&mut s, 0..100);
        for n in 100..300 {
            assert_eq!(answer(&mut s, 0, n), Forward);
        }
        for n in 100..300 {
            assert_eq!(answer(&mut s, 1, n), Duplicate, "{n}");
        }
        // Reordered copies and small steps back are ordinary duplicates too.
        for n in [299, 290, 295, 285, 299] {
            assert_eq!(answer(&mut s, 1, n), Duplicate, "{n}");
        }
        assert_eq!(s.take_resyncs(), 0);
    }

    #[test]
    fn answers_that_disagree_do_not_add_up() {
        // Far-behind answers scattered over the old range are not one new numbering.
        let mut s = stream(2);
        lockstep(&mut s, 0..1000);
        for n in [10, 300, 600, 50, 900] {
            assert_eq!(answer(&mut s, 0, n), Stale, "{n}");
        }
        assert_eq!(s.take_resyncs(), 0);
    }

    #[test]
    fn a_joined_slot_starts_afresh() {
        let mut s = stream(2);
        lockstep(&mut s, 0..100);
        s.on_slot_joined(1);
        // Its first answer far behind counts as a step back, as for any new stream.
        assert_eq!(answer(&mut s, 1, 3), Stale);
        assert_eq!(answer(&mut s, 0, 100), Forward);
    }
}
