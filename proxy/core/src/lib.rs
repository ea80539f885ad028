//! Spotable's data-path decisions, sans-io: what to do with each client datagram and each
//! replica answer, given the time and the replica set. No socket, no thread, no clock (clippy's
//! `disallowed-methods` keeps `Instant::now` out), so every rule here runs in unit tests and
//! fuzzers with simulated time. The proxy crate's worker does the I/O around it.

pub mod dedupe;
pub mod histogram;
pub mod loglimit;
pub mod marker;
pub mod proxy_header;
pub mod ratelimit;
pub mod replicas;
pub mod session;
pub mod token;

pub use replicas::{Replica, ReplicaSet, ReplicaState};

/// The origin of simulated time in this crate's tests: the clock is read once, and every
/// later instant is this plus a duration the test chooses.
#[cfg(test)]
#[allow(clippy::disallowed_methods)]
pub(crate) fn epoch() -> std::time::Instant {
    std::time::Instant::now()
}
