//! Rate limits for log lines written on the data path: at most one line per reason per
//! interval, each carrying how many were held back since the last one.

use std::time::{Duration, Instant};

/// The interval the data path uses.
pub const LOG_INTERVAL: Duration = Duration::from_secs(5);

/// One reason's budget of log lines.
#[derive(Debug, Clone)]
pub struct LogLimit {
    every: Duration,
    last: Option<Instant>,
    held: u64,
}

impl LogLimit {
    /// At most one line per `every`.
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            held: 0,
        }
    }

    /// An event happened at `now`. `Some(n)` when a line may be written now, `n` being how
    /// many events since the last line were not logged; `None` to stay quiet.
    pub fn hit(&mut self, now: Instant) -> Option<u64> {
        let due = self
            .last
            .is_none_or(|at| now.saturating_duration_since(at) >= self.every);
        if due {
            self.last = Some(now);
            Some(std::mem::take(&mut self.held))
        } else {
            self.held += 1;
            None
        }
    }
}

impl Default for LogLimit {
    fn default() -> Self {
        Self::new(LOG_INTERVAL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_held_back() {
        let t0 = crate::epoch();
        let s = Duration::from_secs(1);
        let mut l = LogLimit::new(5 * s);
        assert_eq!(l.hit(t0), Some(0));
        for i in 1..=1000 {
            assert_eq!(l.hit(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(l.hit(t0 + 5 * s), Some(1000));
        assert_eq!(l.hit(t0 + 6 * s), None);
        assert_eq!(l.hit(t0 + 10 * s), Some(1));
    }
}
