//! Spotable's UDP proxy: fans client datagrams out to redundant game-server replicas and
//! delivers their answers to the client deduplicated.
//!
//! The decision logic ([`dedupe`], [`session`], [`replicas`], [`ratelimit`]) is sans-io and
//! deterministic; the socket edge is [`udp`] (batched system calls) and the private `worker`
//! event loop; [`server`] starts and stops it all.

pub mod dedupe;
pub mod kernel;
pub mod loglimit;
pub mod ratelimit;
pub mod replicas;
pub mod server;
pub mod session;
pub mod stats;
pub mod udp;
mod worker;

pub use replicas::{Replica, ReplicaSet, ReplicaState};
pub use server::{Proxy, ProxyConfig, ServerError};
pub mod admin;
pub mod cli;
pub mod config;
pub mod discovery;
