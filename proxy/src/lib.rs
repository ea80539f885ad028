//! Spotable's UDP proxy: fans client datagrams out to redundant game-server replicas and
//! delivers their answers to the client deduplicated.
//!
//! The pure decision logic ([`dedupe`], [`session`], [`replicas`], [`ratelimit`]) is sans-io
//! and deterministic; the socket edge lives in `worker` and `udp`.

pub mod dedupe;
pub mod ratelimit;
pub mod replicas;
pub mod session;
