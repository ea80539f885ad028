//! Payloads the demo and the tests send: a sequence number up front, padding after.
//!
//! Layout: bytes 0..8 sequence number (big-endian), then filler up to the requested size. The
//! replica echoes it, so `--dedupe sequence --sequence-offset 0 --sequence-width 8` applies.

/// Smallest stamped payload.
pub const HEADER: usize = 8;

/// Writes a payload of `size` bytes (at least [`HEADER`]) stamped with `seq` into `buf`.
pub fn stamp(buf: &mut Vec<u8>, seq: u64, size: usize) {
    buf.clear();
    buf.extend_from_slice(&seq.to_be_bytes());
    buf.resize(size.max(HEADER), b'.');
}

/// The sequence number of a stamped payload.
pub fn seq_of(payload: &[u8]) -> Option<u64> {
    let head: [u8; HEADER] = payload.get(..HEADER)?.try_into().ok()?;
    Some(u64::from_be_bytes(head))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trip() {
        let mut b = Vec::new();
        stamp(&mut b, 0xDEAD_BEEF, 64);
        assert_eq!(b.len(), 64);
        assert_eq!(seq_of(&b), Some(0xDEAD_BEEF));
        stamp(&mut b, 1, 0);
        assert_eq!(b.len(), HEADER);
        assert_eq!(seq_of(&b[..7]), None);
    }
}
