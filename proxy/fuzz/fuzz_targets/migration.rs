//! What a landing pad reads from a wrapper moving its game (`spotable-wrapper land`): any
//! bytes are framed or refused, never a panic and never an allocation past the bounds; file
//! names are plain; and what was read writes back and reads again the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spotable_migrate_wire::{Frame, plain_name, read, write};

fuzz_target!(|data: &[u8]| {
    let mut input = std::io::Cursor::new(data);
    while let Ok(frame) = read(&mut input) {
        if let Frame::File { name, .. } = &frame {
            assert!(plain_name(name), "{name:?} is not a plain name");
        }
        let mut out = Vec::new();
        if write(&mut out, &frame).is_err() {
            continue;
        }
        // Re-encoding JSON may grow it past the frame limit (escapes): then only the
        // refusal matters, which `read` returns.
        match read(&mut std::io::Cursor::new(&out)) {
            Ok(again) => assert_eq!(again, frame),
            Err(spotable_migrate_wire::WireError::TooLong { .. }) => {}
            Err(e) => panic!("our own frame did not read back: {e}"),
        }
    }
});
