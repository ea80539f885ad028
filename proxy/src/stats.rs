//! Counters of the data plane.
//!
//! Workers count into plain integers and push the deltas to the `metrics` recorder on every
//! tick: no shared cache line is written per packet.

use metrics::{Counter, counter, describe_counter, describe_gauge};

use crate::session::DropReason;

/// Metric names, in one place so docs, dashboards and tests agree.
pub mod names {
    /// Datagrams received from clients.
    pub const CLIENT_PACKETS: &str = "spotable_client_packets_total";
    /// Bytes received from clients.
    pub const CLIENT_BYTES: &str = "spotable_client_bytes_total";
    /// Datagrams sent to replicas (each fan-out copy counts).
    pub const UPSTREAM_PACKETS: &str = "spotable_upstream_packets_total";
    /// Bytes sent to replicas.
    pub const UPSTREAM_BYTES: &str = "spotable_upstream_bytes_total";
    /// Answers received from replicas.
    pub const REPLICA_PACKETS: &str = "spotable_replica_packets_total";
    /// Bytes received from replicas.
    pub const REPLICA_BYTES: &str = "spotable_replica_bytes_total";
    /// Answers delivered to clients.
    pub const DELIVERED_PACKETS: &str = "spotable_delivered_packets_total";
    /// Bytes delivered to clients.
    pub const DELIVERED_BYTES: &str = "spotable_delivered_bytes_total";
    /// Answers suppressed as duplicates (or standby answers in `primary` mode).
    pub const DUPLICATES: &str = "spotable_duplicates_suppressed_total";
    /// Datagrams dropped, by `reason`.
    pub const DROPS: &str = "spotable_drops_total";
    /// Primary changes in `primary` mode.
    pub const FAILOVERS: &str = "spotable_failovers_total";
    /// Sessions opened.
    pub const SESSIONS_OPENED: &str = "spotable_sessions_opened_total";
    /// Sessions closed for idleness.
    pub const SESSIONS_EXPIRED: &str = "spotable_sessions_expired_total";
    /// Sessions open now.
    pub const SESSIONS: &str = "spotable_sessions";
    /// Replicas known, by `state`.
    pub const REPLICAS: &str = "spotable_replicas";
    /// Replicas that joined running sessions.
    pub const LATE_JOINS: &str = "spotable_late_joins_total";
    /// Content-dedupe entries evicted by the per-session memory cap.
    pub const DEDUPE_EVICTIONS: &str = "spotable_dedupe_evictions_total";
    /// Sessions that fell below the redundancy they started with.
    pub const DEGRADED: &str = "spotable_sessions_degraded_total";
    /// Replica-discovery watch errors (each followed by a retry with backoff).
    pub const WATCH_ERRORS: &str = "spotable_discovery_watch_errors_total";
    /// Seconds since discovery last heard from its source.
    pub const SYNC_AGE: &str = "spotable_discovery_last_sync_age_seconds";
}

/// Registers help texts with the installed recorder.
pub fn describe() {
    use names::*;
    describe_counter!(CLIENT_PACKETS, "Datagrams received from clients");
    describe_counter!(CLIENT_BYTES, "Bytes received from clients");
    describe_counter!(
        UPSTREAM_PACKETS,
        "Datagrams sent to replicas (every fan-out copy)"
    );
    describe_counter!(UPSTREAM_BYTES, "Bytes sent to replicas");
    describe_counter!(REPLICA_PACKETS, "Answers received from replicas");
    describe_counter!(REPLICA_BYTES, "Bytes received from replicas");
    describe_counter!(DELIVERED_PACKETS, "Answers delivered to clients");
    describe_counter!(DELIVERED_BYTES, "Bytes delivered to clients");
    describe_counter!(DUPLICATES, "Replica answers suppressed as duplicates");
    describe_counter!(DROPS, "Datagrams dropped, by reason");
    describe_counter!(FAILOVERS, "Primary replica changes (primary mode)");
    describe_counter!(SESSIONS_OPENED, "Sessions opened");
    describe_counter!(SESSIONS_EXPIRED, "Sessions closed after the idle timeout");
    describe_gauge!(SESSIONS, "Sessions open");
    describe_gauge!(REPLICAS, "Replicas in the set, by state");
    describe_counter!(LATE_JOINS, "Replicas that joined running sessions");
    describe_counter!(
        DEDUPE_EVICTIONS,
        "Dedupe entries evicted by the per-session cap"
    );
}

/// One worker's counters since the last flush.
#[derive(Debug, Default)]
pub struct Local {
    /// See [`names::CLIENT_PACKETS`].
    pub client_packets: u64,
    /// See [`names::CLIENT_BYTES`].
    pub client_bytes: u64,
    /// See [`names::UPSTREAM_PACKETS`].
    pub upstream_packets: u64,
    /// See [`names::UPSTREAM_BYTES`].
    pub upstream_bytes: u64,
    /// See [`names::REPLICA_PACKETS`].
    pub replica_packets: u64,
    /// See [`names::REPLICA_BYTES`].
    pub replica_bytes: u64,
    /// See [`names::DELIVERED_PACKETS`].
    pub delivered_packets: u64,
    /// See [`names::DELIVERED_BYTES`].
    pub delivered_bytes: u64,
    /// See [`names::DUPLICATES`].
    pub duplicates: u64,
    /// See [`names::FAILOVERS`].
    pub failovers: u64,
    /// See [`names::SESSIONS_OPENED`].
    pub sessions_opened: u64,
    /// See [`names::SESSIONS_EXPIRED`].
    pub sessions_expired: u64,
    /// See [`names::LATE_JOINS`].
    pub late_joins: u64,
    /// See [`names::DEDUPE_EVICTIONS`].
    pub evictions: u64,
    /// See [`names::DEGRADED`].
    pub degraded: u64,
    drops: [u64; DropReason::ALL.len()],
}

impl Local {
    /// Counts one dropped datagram.
    pub fn drop(&mut self, reason: DropReason, n: u64) {
        self.drops[reason as usize] += n;
    }
}

/// Handles to the recorder's counters, resolved once per worker.
#[derive(Debug)]
pub struct Sink {
    client_packets: Counter,
    client_bytes: Counter,
    upstream_packets: Counter,
    upstream_bytes: Counter,
    replica_packets: Counter,
    replica_bytes: Counter,
    delivered_packets: Counter,
    delivered_bytes: Counter,
    duplicates: Counter,
    failovers: Counter,
    sessions_opened: Counter,
    sessions_expired: Counter,
    late_joins: Counter,
    evictions: Counter,
    degraded: Counter,
    drops: Vec<Counter>,
}

impl Sink {
    /// Resolves every handle (registering the series so they show as 0 before traffic).
    pub fn new() -> Self {
        use names::*;
        Self {
            client_packets: counter!(CLIENT_PACKETS),
            client_bytes: counter!(CLIENT_BYTES),
            upstream_packets: counter!(UPSTREAM_PACKETS),
            upstream_bytes: counter!(UPSTREAM_BYTES),
            replica_packets: counter!(REPLICA_PACKETS),
            replica_bytes: counter!(REPLICA_BYTES),
            delivered_packets: counter!(DELIVERED_PACKETS),
            delivered_bytes: counter!(DELIVERED_BYTES),
            duplicates: counter!(DUPLICATES),
            failovers: counter!(FAILOVERS),
            sessions_opened: counter!(SESSIONS_OPENED),
            sessions_expired: counter!(SESSIONS_EXPIRED),
            late_joins: counter!(LATE_JOINS),
            evictions: counter!(DEDUPE_EVICTIONS),
            degraded: counter!(DEGRADED),
            drops: DropReason::ALL
                .iter()
                .map(|r| counter!(DROPS, "reason" => r.as_str()))
                .collect(),
        }
    }

    /// Moves `local`'s counts into the recorder and zeroes them.
    pub fn flush(&self, local: &mut Local) {
        let l = std::mem::take(local);
        let pairs = [
            (&self.client_packets, l.client_packets),
            (&self.client_bytes, l.client_bytes),
            (&self.upstream_packets, l.upstream_packets),
            (&self.upstream_bytes, l.upstream_bytes),
            (&self.replica_packets, l.replica_packets),
            (&self.replica_bytes, l.replica_bytes),
            (&self.delivered_packets, l.delivered_packets),
            (&self.delivered_bytes, l.delivered_bytes),
            (&self.duplicates, l.duplicates),
            (&self.failovers, l.failovers),
            (&self.sessions_opened, l.sessions_opened),
            (&self.sessions_expired, l.sessions_expired),
            (&self.late_joins, l.late_joins),
            (&self.evictions, l.evictions),
            (&self.degraded, l.degraded),
        ];
        for (counter, n) in pairs {
            if n > 0 {
                counter.increment(n);
            }
        }
        for (counter, n) in self.drops.iter().zip(l.drops) {
            if n > 0 {
                counter.increment(n);
            }
        }
    }
}

impl Default for Sink {
    fn default() -> Self {
        Self::new()
    }
}
