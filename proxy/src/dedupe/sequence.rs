//! `sequence` mode: protocol-aware dedupe on a sequence number inside the payload.
//!
//! The number is read at a fixed offset, width and byte order. Acceptance uses a sliding
//! window in the style of IPsec anti-replay (RFC 6479): a ring of bitmap words indexed by the
//! number itself, so advancing the window clears whole words instead of shifting bits. Numbers
//! compare in serial-number arithmetic (RFC 1982) modulo 2^(8·width), which makes wrap-around
//! from the largest value back to zero just another step forward.

use std::time::Instant;

use super::{Copies, Slot, Verdict};

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

/// Per-session state of the `sequence` mode.
#[derive(Debug)]
pub struct Sequence {
    spec: SequenceSpec,
    window: ReplayWindow,
    /// Datagrams too short to carry a number (handshakes, pings) are deduplicated by content
    /// instead of being dropped or forwarded once per replica.
    short: Copies,
}

impl Sequence {
    /// State for one session.
    pub fn new(spec: SequenceSpec, short: Copies) -> Self {
        Self {
            spec,
            window: ReplayWindow::new(spec.width),
            short,
        }
    }

    /// Decides the fate of one answer.
    pub fn on_answer(&mut self, slot: Slot, payload: &[u8], now: Instant) -> Verdict {
        match self.spec.read(payload) {
            Some(seq) => self.window.accept(seq),
            None => self.short.on_answer(slot, payload, now),
        }
    }

    /// See [`Copies::take_evictions`].
    pub fn take_evictions(&mut self) -> u64 {
        self.short.take_evictions()
    }

    /// See [`Copies::on_slot_joined`]; sequence numbers need nothing.
    pub fn on_slot_joined(&mut self, slot: Slot) {
        self.short.on_slot_joined(slot);
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
        let now = Instant::now();
        let spec = SequenceSpec {
            offset: 4,
            width: Width::Four,
            endian: Endian::Big,
        };
        let mut s = Sequence::new(
            spec,
            Copies::new(std::time::Duration::from_secs(1), 64, 3, now),
        );
        assert_eq!(s.on_answer(0, b"hi", now), Forward);
        assert_eq!(s.on_answer(1, b"hi", now), Duplicate);
        assert_eq!(s.on_answer(0, b"hdr\0\0\0\0\x07", now), Forward);
        assert_eq!(s.on_answer(1, b"HDR\0\0\0\0\x07", now), Duplicate);
    }
}
