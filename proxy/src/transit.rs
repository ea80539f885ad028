//! Time a datagram spends in the proxy, both ways: from the worker's turn that read it (or,
//! with `--kernel-timestamps`, from the kernel's receive timestamp, so time queued in the socket
//! counts) to the send of the batch it went out in.
//!
//! Each worker counts into its own histograms with one clock read per batch; the registry
//! adds them up on the worker's tick, and the admin endpoint writes them out at scrape time.

use std::fmt::Write as _;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use spotable_core::histogram::Histogram;

/// Series names.
pub mod names {
    /// Kernel receipt to send, by `direction`.
    pub const TRANSIT: &str = "spotable_transit_seconds";
}

/// Which way a datagram went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// A client's datagram, fanned out to replicas.
    ToReplicas,
    /// A replica's answer, delivered to its client.
    ToClients,
}

impl Direction {
    const ALL: [Direction; 2] = [Direction::ToReplicas, Direction::ToClients];

    fn as_str(self) -> &'static str {
        match self {
            Direction::ToReplicas => "to_replicas",
            Direction::ToClients => "to_clients",
        }
    }
}

/// One worker's histograms since its last flush.
#[derive(Debug, Default)]
pub struct Local {
    by_direction: [Histogram; 2],
}

impl Local {
    /// A datagram the kernel `received` went out (in a batch that ended) at `sent`; both
    /// on the realtime clock, which may step: a send "before" its receipt counts as zero.
    pub fn record(&mut self, direction: Direction, received: Duration, sent: Duration) {
        self.by_direction[direction as usize].record(sent.saturating_sub(received));
    }
}

/// The workers' histograms summed.
#[derive(Debug, Default)]
pub struct Registry {
    totals: Mutex<[Histogram; 2]>,
}

impl Registry {
    /// Adds a worker's histograms and empties them.
    pub fn flush(&self, local: &mut Local) {
        if local.by_direction.iter().all(Histogram::is_empty) {
            return;
        }
        let mut totals = self.totals.lock().unwrap_or_else(PoisonError::into_inner);
        for (t, l) in totals.iter_mut().zip(&mut local.by_direction) {
            t.merge(l);
            *l = Histogram::default();
        }
    }

    /// The histogram family, both directions present from the start.
    pub fn render(&self) -> String {
        let totals = *self.totals.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP {n} Time from a datagram's receipt (the worker's turn, or the kernel's \
             timestamp with --kernel-timestamps) to the send of the batch it left in, by \
             direction\n# TYPE {n} histogram",
            n = names::TRANSIT
        );
        for d in Direction::ALL {
            totals[d as usize].write(
                &mut out,
                names::TRANSIT,
                &format!("direction=\"{}\"", d.as_str()),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_add_up_and_a_clock_step_back_counts_as_zero() {
        let registry = Registry::default();
        let (mut a, mut b) = (Local::default(), Local::default());
        let t = Duration::from_secs(1_700_000_000);
        a.record(Direction::ToReplicas, t, t + Duration::from_micros(30));
        b.record(Direction::ToReplicas, t, t + Duration::from_micros(700));
        b.record(Direction::ToClients, t, t - Duration::from_secs(1));
        registry.flush(&mut a);
        registry.flush(&mut b);
        registry.flush(&mut b); // emptied by the first flush: nothing counted twice
        let text = registry.render();
        let v = |name: &str, labels: &[(&str, &str)]| {
            spotable_fixtures::metrics_text::value(&text, name, labels).unwrap()
        };
        let count = format!("{}_count", names::TRANSIT);
        let bucket = format!("{}_bucket", names::TRANSIT);
        assert_eq!(v(&count, &[("direction", "to_replicas")]), 2.0);
        assert_eq!(v(&count, &[("direction", "to_clients")]), 1.0);
        assert_eq!(
            v(&bucket, &[("direction", "to_replicas"), ("le", "0.00005")]),
            1.0
        );
        assert_eq!(
            v(&bucket, &[("direction", "to_clients"), ("le", "0.00001")]),
            1.0
        );
        assert!(spotable_fixtures::metrics_text::without_help(&text).is_empty());
    }
}
