//! Capture files from a studio (`spotable-bench fit --capture`): any bytes are read or
//! refused, never a panic, and every datagram read lies inside the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(capture) = spotable_pcap::read(data) {
        let range = data.as_ptr_range();
        for d in &capture.datagrams {
            let p = d.payload.as_ptr_range();
            assert!(range.start <= p.start && p.end <= range.end);
        }
        // What was read writes back and reads again the same (IPv4 only).
        let v4: Vec<_> = capture
            .datagrams
            .iter()
            .filter(|d| d.src.is_ipv4() && d.dst.is_ipv4() && d.payload.len() < 60_000)
            .map(|d| (d.at, d.src, d.dst, d.payload))
            .collect();
        let again = spotable_pcap::write(&v4);
        let reread = spotable_pcap::read(&again).expect("our own capture");
        assert_eq!(reread.datagrams.len(), v4.len());
        for (a, b) in reread.datagrams.iter().zip(&v4) {
            assert_eq!((a.src, a.dst, a.payload), (b.1, b.2, b.3));
        }
    }
});
