//! Latency histograms with fixed buckets, for the data path: recording is a short scan of a
//! constant array and two additions into memory the worker owns, so every datagram can count;
//! workers merge theirs into a shared one on their tick, and the admin endpoint writes it out
//! as a Prometheus histogram.
//!
//! The exposition is the classic one (`_bucket{le}`, `_sum`, `_count`): Prometheus' native
//! histograms need the protobuf format, which the text exporter does not speak. The bounds are
//! chosen for this program instead: a proxy's transit is tens of microseconds, and a replica's
//! lag behind its peers from a fraction of a millisecond to a lost frame.

use std::fmt::Write as _;
use std::time::Duration;

/// Upper bounds of the buckets, in nanoseconds: 10 µs to 1 s, about 2.5 per decade.
pub const BOUNDS_NS: [u64; 15] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    1_000_000_000,
];

/// Counts by bucket (the last one past every bound), and their sum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Histogram {
    counts: [u64; BOUNDS_NS.len() + 1],
    sum_ns: u64,
}

impl Histogram {
    /// Counts one observation.
    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BOUNDS_NS
            .iter()
            .position(|&b| ns <= b)
            .unwrap_or(BOUNDS_NS.len());
        self.counts[i] += 1;
        self.sum_ns = self.sum_ns.saturating_add(ns);
    }

    /// Observations counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.count() == 0
    }

    /// Adds `other`'s observations to these.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts) {
            *a += b;
        }
        self.sum_ns = self.sum_ns.saturating_add(other.sum_ns);
    }

    /// Writes the `_bucket`, `_sum` and `_count` lines of series `name` with `labels` (already
    /// formatted, `k="v",…`, or empty). HELP and TYPE are the caller's, once per name.
    pub fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c;
            let le = BOUNDS_NS
                .get(i)
                .map_or_else(|| "+Inf".to_owned(), |&ns| seconds(ns));
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", seconds(self.sum_ns));
        let _ = writeln!(out, "{name}_count{braces} {cumulative}");
    }
}

/// Nanoseconds as seconds, without a float's noise for the bounds (0.00001, not 1.0000000000000001e-5).
fn seconds(ns: u64) -> String {
    let whole = ns / 1_000_000_000;
    let frac = ns % 1_000_000_000;
    if frac == 0 {
        return whole.to_string();
    }
    let digits = format!("{frac:09}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_inclusive_and_sum_in_seconds() {
        let mut h = Histogram::default();
        h.record(Duration::from_micros(10)); // on the first bound: in it
        h.record(Duration::from_micros(11));
        h.record(Duration::from_millis(3));
        h.record(Duration::from_secs(5)); // past every bound
        let mut other = Histogram::default();
        other.record(Duration::ZERO);
        h.merge(&other);
        assert_eq!(h.count(), 5);
        let mut out = String::new();
        h.write(&mut out, "x_seconds", "replica=\"a\"");
        let line = |le: &str| {
            out.lines()
                .find(|l| l.starts_with(&format!("x_seconds_bucket{{replica=\"a\",le=\"{le}\"}}")))
                .unwrap_or_else(|| panic!("no bucket {le} in {out}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_owned()
        };
        assert_eq!(line("0.00001"), "2");
        assert_eq!(line("0.000025"), "3");
        assert_eq!(line("0.0025"), "3");
        assert_eq!(line("0.005"), "4");
        assert_eq!(line("1"), "4");
        assert_eq!(line("+Inf"), "5");
        assert!(
            out.contains("x_seconds_sum{replica=\"a\"} 5.003021\n"),
            "{out}"
        );
        assert!(out.contains("x_seconds_count{replica=\"a\"} 5\n"), "{out}");
        let mut bare = String::new();
        Histogram::default().write(&mut bare, "y", "");
        assert!(
            bare.contains("y_bucket{le=\"+Inf\"} 0\ny_sum 0\ny_count 0\n"),
            "{bare}"
        );
    }
}
