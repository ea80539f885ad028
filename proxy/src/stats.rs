//! Counters of the data plane.
//!
//! Workers count into plain integers and push the deltas to the `metrics` recorder on every
//! tick: no shared cache line is written per packet.

use metrics::{Counter, counter, describe_counter, describe_gauge};

use crate::session::{CloseReason, DropReason};

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
    /// Seconds since discovery was last known to be in sync with its source (0 while its
    /// watch is healthy, idle or not).
    pub const SYNC_AGE: &str = "spotable_discovery_last_sync_age_seconds";
    /// Sessions closed, by `reason`.
    pub const SESSIONS_CLOSED: &str = "spotable_sessions_closed_total";
    /// `sequence` mode: restarted numberings accepted.
    pub const SEQUENCE_RESYNCS: &str = "spotable_sequence_resyncs_total";
    /// Clients over their rate, once per client per report interval.
    pub const RATE_LIMITED_CLIENTS: &str = "spotable_rate_limited_clients_total";
    /// Errors read from upstream sockets (ICMP reports and others), by `reason`.
    pub const UPSTREAM_ERRORS: &str = "spotable_upstream_errors_total";
    /// Datagrams the kernel dropped on the front sockets (receive buffer full).
    pub const FRONT_KERNEL_DROPS: &str = "spotable_front_kernel_drops_total";
    /// UDP receive-buffer errors of the whole network namespace (the pod's, in Kubernetes):
    /// upstream sockets' kernel drops show here.
    pub const UDP_RCVBUF_ERRORS: &str = "spotable_udp_receive_buffer_errors_total";
    /// Session limit in force (`--max-sessions`, capped by the file-descriptor limit).
    pub const SESSION_LIMIT: &str = "spotable_session_limit";
    /// Data-plane workers running.
    pub const WORKERS_UP: &str = "spotable_workers_up";
    /// Games routed by token now.
    pub const GAMES: &str = "spotable_games";
    /// Problems that keep discovered games (or parts of them) out, as last logged.
    pub const GAME_PROBLEMS: &str = "spotable_game_problems";
}

/// An error an upstream socket reported, as counted in [`names::UPSTREAM_ERRORS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamError {
    /// ICMP port unreachable: nothing listens at the replica's port.
    Refused,
    /// ICMP host unreachable (or host down).
    HostUnreachable,
    /// ICMP network unreachable (or network down).
    NetUnreachable,
    /// ICMP fragmentation needed: the datagram exceeds the path MTU.
    MessageTooBig,
    /// Anything else.
    Other,
}

impl UpstreamError {
    /// Every kind, for pre-registering metrics.
    pub const ALL: [UpstreamError; 5] = [
        UpstreamError::Refused,
        UpstreamError::HostUnreachable,
        UpstreamError::NetUnreachable,
        UpstreamError::MessageTooBig,
        UpstreamError::Other,
    ];

    /// Classifies an error from a receive on an upstream socket.
    pub fn of(e: &std::io::Error) -> Self {
        e.raw_os_error()
            .map_or(UpstreamError::Other, Self::of_errno)
    }

    /// Classifies an error number (a receive's, or one read from the error queue).
    pub fn of_errno(errno: i32) -> Self {
        match errno {
            libc::ECONNREFUSED => UpstreamError::Refused,
            libc::EHOSTUNREACH | libc::EHOSTDOWN => UpstreamError::HostUnreachable,
            libc::ENETUNREACH | libc::ENETDOWN => UpstreamError::NetUnreachable,
            libc::EMSGSIZE => UpstreamError::MessageTooBig,
            _ => UpstreamError::Other,
        }
    }

    /// Whether the error is a replica's or the network's report about one datagram (ICMP),
    /// after which the socket reads on as before.
    pub fn is_report(self) -> bool {
        !matches!(self, UpstreamError::Other)
    }

    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamError::Refused => "refused",
            UpstreamError::HostUnreachable => "host_unreachable",
            UpstreamError::NetUnreachable => "net_unreachable",
            UpstreamError::MessageTooBig => "message_too_big",
            UpstreamError::Other => "other",
        }
    }
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
    describe_counter!(
        DEGRADED,
        "Sessions that fell below the redundancy they started with"
    );
    describe_counter!(
        WATCH_ERRORS,
        "Replica-discovery watch errors, each followed by a retry"
    );
    describe_gauge!(
        SYNC_AGE,
        "Seconds since discovery was last known in sync with its source (0 while healthy)"
    );
    describe_counter!(SESSIONS_CLOSED, "Sessions closed, by reason");
    describe_counter!(
        SEQUENCE_RESYNCS,
        "Restarted sequence numberings accepted (sequence mode)"
    );
    describe_counter!(
        RATE_LIMITED_CLIENTS,
        "Clients over their packet rate, once per client per report interval"
    );
    describe_counter!(
        UPSTREAM_ERRORS,
        "Errors reported on upstream sockets (ICMP and others), by reason"
    );
    describe_counter!(
        FRONT_KERNEL_DROPS,
        "Datagrams the kernel dropped on the front sockets (receive buffer full)"
    );
    describe_counter!(
        UDP_RCVBUF_ERRORS,
        "UDP receive-buffer errors in the proxy's network namespace"
    );
    describe_gauge!(
        SESSION_LIMIT,
        "Sessions allowed at once (max_sessions capped by the file-descriptor limit)"
    );
    describe_gauge!(WORKERS_UP, "Data-plane workers running");
    describe_gauge!(GAMES, "Games routed by token");
    describe_gauge!(
        GAME_PROBLEMS,
        "Problems keeping discovered games or their parts out (see the proxy's warnings)"
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
    /// See [`names::SEQUENCE_RESYNCS`].
    pub resyncs: u64,
    /// See [`names::RATE_LIMITED_CLIENTS`].
    pub rate_limited_clients: u64,
    drops: [u64; DropReason::ALL.len()],
    closed: [u64; CloseReason::ALL.len()],
    upstream_errors: [u64; UpstreamError::ALL.len()],
}

impl Local {
    /// Counts `n` dropped datagrams.
    pub fn drop(&mut self, reason: DropReason, n: u64) {
        self.drops[reason as usize] += n;
    }

    /// Datagrams dropped for `reason` since the last flush.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize]
    }

    /// Counts one closed session.
    pub fn closed(&mut self, reason: CloseReason) {
        self.closed[reason as usize] += 1;
    }

    /// Counts one upstream socket error.
    pub fn upstream_error(&mut self, kind: UpstreamError) {
        self.upstream_errors[kind as usize] += 1;
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
    resyncs: Counter,
    rate_limited_clients: Counter,
    drops: Vec<Counter>,
    closed: Vec<Counter>,
    upstream_errors: Vec<Counter>,
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
            resyncs: counter!(SEQUENCE_RESYNCS),
            rate_limited_clients: counter!(RATE_LIMITED_CLIENTS),
            drops: DropReason::ALL
                .iter()
                .map(|r| counter!(DROPS, "reason" => r.as_str()))
                .collect(),
            closed: CloseReason::ALL
                .iter()
                .map(|r| counter!(SESSIONS_CLOSED, "reason" => r.as_str()))
                .collect(),
            upstream_errors: UpstreamError::ALL
                .iter()
                .map(|r| counter!(UPSTREAM_ERRORS, "reason" => r.as_str()))
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
            (&self.resyncs, l.resyncs),
            (&self.rate_limited_clients, l.rate_limited_clients),
        ];
        for (counter, n) in pairs {
            if n > 0 {
                counter.increment(n);
            }
        }
        let labelled = self
            .drops
            .iter()
            .zip(l.drops)
            .chain(self.closed.iter().zip(l.closed))
            .chain(self.upstream_errors.iter().zip(l.upstream_errors));
        for (counter, n) in labelled {
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
