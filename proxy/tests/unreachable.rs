//! Failover on ICMP: the kernel's port unreachable, tied to the replica that caused it, with
//! real processes on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn a_primary_whose_process_dies_is_failed_over_on_the_kernels_word_not_after_silence() {
    // Each replica tags its answers, so the player sees which one speaks.
    let mut s = setup(
        &[&["--tag", "/A"], &["--tag", "/B"]],
        &["--dedupe", "primary", "--rate-limit", "0"],
    );
    let player = client(&s.proxy);
    // The first to answer is the session's primary.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 256];
    let primary = loop {
        assert!(Instant::now() < deadline, "no answer");
        player.send(b"hello").unwrap();
        if let Ok(n) = player.recv(&mut buf) {
            break usize::from(buf[..n].ends_with(b"/B"));
        }
    };
    let rx = Collector::start(&player);
    stream(&player, 1000, Duration::from_millis(2), |seq| {
        if seq == 500 {
            // Both were up and answering (the standby's answers counted, not delivered).
            for r in &s.replicas {
                let replica = r.addr.to_string();
                let labels = [("replica", replica.as_str())];
                let answered = metric(&s.proxy, "spotable_replica_answers_total", &labels);
                assert!(answered >= 400.0, "{replica} answered {answered}");
            }
            s.replicas[primary].process.kill().unwrap();
        }
    });
    let answers = rx.finish_at_seq(999);
    let unique = distinct_seqs(&answers);
    // From shortly before the kill to the end: what the death cost (a stall of the machine
    // elsewhere would be primary mode's ordinary silence rule, not this).
    let lost: Vec<u64> = (490..1000)
        .filter(|n| unique.binary_search(n).is_err())
        .collect();
    assert!(lost.len() <= 3, "{} lost: {lost:?}", lost.len());
    let standby = if primary == 0 { &b"/B"[..] } else { &b"/A"[..] };
    assert!(answers.last().unwrap().1.ends_with(standby));
    assert!(metric(&s.proxy, "spotable_failovers_total", &[]) >= 1.0);
    let refused = [("reason", "refused")];
    assert!(metric(&s.proxy, "spotable_upstream_errors_total", &refused) >= 1.0);
}
