//! Sequence-number dedupe against a model.
//!
//! The model keeps a plain set of the numbers seen within the window; the implementation keeps
//! a ring of bitmap words. Both must agree on every verdict, for every width, across wrap-around.
//! Reading the number at arbitrary offsets from arbitrary bytes must never panic.
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use spotable_core::dedupe::{
    Endian, ReplayWindow, SEQUENCE_WINDOW, SequenceSpec, Verdict, Width,
};

struct Model {
    mask: u64,
    highest: Option<u64>,
    seen: HashSet<u64>,
}

impl Model {
    fn accept(&mut self, seq: u64) -> Verdict {
        let seq = seq & self.mask;
        let Some(h) = self.highest else {
            self.highest = Some(seq);
            self.seen.insert(seq);
            return Verdict::Forward;
        };
        let ahead = seq.wrapping_sub(h) & self.mask;
        if ahead != 0 && ahead <= self.mask >> 1 {
            self.highest = Some(seq);
            let mask = self.mask;
            self.seen
                .retain(|&v| (seq.wrapping_sub(v) & mask) < SEQUENCE_WINDOW);
            self.seen.insert(seq);
            return Verdict::Forward;
        }
        let behind = h.wrapping_sub(seq) & self.mask;
        if behind >= SEQUENCE_WINDOW {
            Verdict::Stale
        } else if self.seen.insert(seq) {
            Verdict::Forward
        } else {
            Verdict::Duplicate
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let (width, mask) = match selector % 3 {
        0 => (Width::Two, u64::from(u16::MAX)),
        1 => (Width::Four, u64::from(u32::MAX)),
        _ => (Width::Eight, u64::MAX),
    };
    let spec = SequenceSpec {
        offset: usize::from(selector >> 4),
        width,
        endian: if selector & 8 == 0 {
            Endian::Big
        } else {
            Endian::Little
        },
    };
    let _ = spec.read(rest);

    let mut window = ReplayWindow::new(width);
    let mut model = Model {
        mask,
        highest: None,
        seen: HashSet::new(),
    };
    // Numbers move by small signed steps from a base near the top of the range, so inputs
    // explore reordering, duplicates, window edges and wrap-around rather than random jumps.
    let mut seq = mask - 300;
    for pair in rest.chunks(2) {
        let step = i64::from(i16::from_le_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        seq = seq.wrapping_add_signed(step % 2500) & mask;
        assert_eq!(window.accept(seq), model.accept(seq), "seq {seq} width {width:?}");
    }
});
