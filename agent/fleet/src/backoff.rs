//! The one retry backoff of the node-side programs (backon's jittered exponential).

use std::time::Duration;

/// Pauses from `first`, doubling up to `max`, each with up to 100 % jitter (backon draws it
/// from fastrand), without end: the caller decides when to stop (a deadline, an attempt count).
pub fn pauses(first: Duration, max: Duration) -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(first)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_to_the_cap_and_never_end() {
        let first = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        let p: Vec<_> = pauses(first, max).take(50).collect();
        assert_eq!(p.len(), 50, "no end of its own");
        assert!(p[0] >= first && p[0] <= first * 2, "{:?}", p[0]);
        assert!(
            p.iter().all(|d| *d <= max * 2),
            "capped (jitter adds at most the base)"
        );
        assert!(p[49] >= max, "reaches the cap: {:?}", p[49]);
    }
}
