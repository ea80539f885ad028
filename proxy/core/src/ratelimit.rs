//! Per-source packet rate limit.
//!
//! Fan-out turns one client datagram into N upstream datagrams, so an unbounded client is
//! an amplifier aimed at our own replicas. GCRA (a token bucket kept as one timestamp) costs
//! one comparison per packet and no allocation.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// A packet budget that every worker draws on (a game's `max_pps`): the same GCRA, its
/// timestamp one atomic. Workers take it in grants ([`Allowance`]), so the shared line is
/// written about once per grant, never per packet, and only read while the budget is spent.
#[derive(Debug, Default)]
pub struct SharedBudget {
    /// Nanoseconds after `epoch` at which the next packet conforms.
    tat: AtomicU64,
    /// The first `now` seen: what `tat` counts from.
    epoch: OnceLock<Instant>,
}

impl SharedBudget {
    /// Takes up to `want` packets at `rate` as of `now`; returns how many it may send (0: the
    /// budget is spent until later).
    pub fn take(&self, rate: Rate, want: u32, now: Instant) -> u32 {
        let epoch = *self.epoch.get_or_init(|| now);
        let t = u64::try_from(now.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX);
        let interval = 1_000_000_000 / u64::from(rate.per_second.max(1));
        let tolerance = interval.saturating_mul(u64::from(rate.burst.max(1) - 1));
        let mut granted = 0;
        let taken = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                let tat = tat.max(t);
                // The k-th packet conforms while its start, tat + (k-1)·interval, is within
                // the tolerance of now.
                let room = t.saturating_add(tolerance).checked_sub(tat)?;
                let k = (room / interval).saturating_add(1).min(u64::from(want));
                granted = u32::try_from(k).unwrap_or(want);
                (k > 0).then(|| tat.saturating_add(k * interval))
            });
        if taken.is_ok() { granted } else { 0 }
    }
}

/// One worker's share of a [`SharedBudget`]: packets already granted to it.
#[derive(Debug, Default, Clone)]
pub struct Allowance {
    left: u32,
}

impl Allowance {
    /// True when a packet at `now` is within the budget (and is counted against it).
    pub fn allow(&mut self, budget: &SharedBudget, rate: Rate, now: Instant) -> bool {
        if self.left == 0 {
            self.left = budget.take(rate, grant(rate), now);
            if self.left == 0 {
                return false;
            }
        }
        self.left -= 1;
        true
    }
}

/// Packets one draw takes: about 5 ms of the budget, at most 64, so that what workers hold
/// unspent (at most one grant each) stays a sliver of the budget.
fn grant(rate: Rate) -> u32 {
    (rate.per_second / 200).clamp(1, 64).min(rate.burst.max(1))
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

    #[test]
    fn a_shared_budget_holds_every_worker_to_the_rate_together() {
        let t = crate::epoch();
        let rate = Rate {
            per_second: 10_000,
            burst: 1_000,
        };
        let budget = SharedBudget::default();
        let mut workers = [Allowance::default(), Allowance::default()];
        // Three workers' worth of flood, 60 kpps each for 2 s, offered in turn.
        let mut allowed = 0u64;
        for i in 0..120_000u64 {
            let now = t + Duration::from_nanos(i * 16_667);
            if workers[(i % 2) as usize].allow(&budget, rate, now) {
                allowed += 1;
            }
        }
        // 2 s at 10 000/s, the burst, and at most one grant per worker left unspent.
        let most = 20_000 + 1_000 + 2 * 64;
        assert!((19_900..=most).contains(&allowed), "{allowed}");
    }

    #[test]
    fn a_spent_budget_comes_back_with_time_and_no_more() {
        let t = crate::epoch();
        let rate = Rate {
            per_second: 100,
            burst: 10,
        };
        let budget = SharedBudget::default();
        assert_eq!(budget.take(rate, 64, t), 10, "the burst");
        assert_eq!(budget.take(rate, 64, t), 0);
        assert_eq!(budget.take(rate, 64, t + Duration::from_millis(50)), 5);
        // After a long pause, the burst again, never more.
        assert_eq!(budget.take(rate, 64, t + Duration::from_secs(60)), 10);
        let mut a = Allowance::default();
        let later = t + Duration::from_secs(120);
        assert_eq!(
            (0..100).filter(|_| a.allow(&budget, rate, later)).count(),
            10
        );
    }
}
