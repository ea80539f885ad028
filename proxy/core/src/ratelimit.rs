//! Per-source packet rate limit.
//!
//! Fan-out turns one client datagram into N upstream datagrams, so an unbounded client is
//! an amplifier aimed at our own replicas. GCRA (a token bucket kept as one timestamp) costs
//! one comparison per packet and no allocation.

use std::time::{Duration, Instant};

/// Rate and burst of one limiter; `None` in the config means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Sustained packets per second (> 0).
    pub per_second: u32,
    /// Packets that may arrive back to back (> 0).
    pub burst: u32,
}

/// Generic cell rate algorithm state for one source.
#[derive(Debug, Clone)]
pub struct Limiter {
    interval: Duration,
    tolerance: Duration,
    /// Theoretical arrival time of the next conforming packet.
    tat: Instant,
}

impl Limiter {
    /// A limiter that starts with its full burst available at `now`.
    pub fn new(rate: Rate, now: Instant) -> Self {
        let interval = Duration::from_secs(1) / rate.per_second.max(1);
        let tolerance = interval * rate.burst.max(1).saturating_sub(1);
        Self {
            interval,
            tolerance,
            tat: now,
        }
    }

    /// True when a packet arriving at `now` conforms (and is counted).
    pub fn allow(&mut self, now: Instant) -> bool {
        let tat = self.tat.max(now);
        if tat.saturating_duration_since(now) > self.tolerance {
            return false;
        }
        self.tat = tat + self.interval;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_steady_rate() {
        let t = crate::epoch();
        let mut l = Limiter::new(
            Rate {
                per_second: 100,
                burst: 5,
            },
            t,
        );
        assert_eq!((0..10).filter(|_| l.allow(t)).count(), 5);
        // 10 ms later one more packet conforms.
        let t2 = t + Duration::from_millis(10);
        assert!(l.allow(t2));
        assert!(!l.allow(t2));
        // After a long pause the burst is back, never more.
        let t3 = t + Duration::from_secs(10);
        assert_eq!((0..10).filter(|_| l.allow(t3)).count(), 5);
    }

    #[test]
    fn sustained_rate_is_respected() {
        let t = crate::epoch();
        let mut l = Limiter::new(
            Rate {
                per_second: 1000,
                burst: 1,
            },
            t,
        );
        // 10 000 packets offered over one second at 10 kpps: about 1000 get through.
        let allowed = (0..10_000u64)
            .filter(|i| l.allow(t + Duration::from_micros(i * 100)))
            .count();
        assert!((999..=1001).contains(&allowed), "{allowed}");
    }
}
