//! Spotable's UDP proxy: fans client datagrams out to redundant game-server replicas and
//! delivers their answers to the client deduplicated.
//!
//! The decisions (sessions, deduplication, replica sets) live in the sans-io `spotable-core`
//! crate, re-exported here; this crate is their I/O: [`udp`] (batched system calls), the
//! private `worker` event loop, discovery, the admin endpoint, and [`server`], which starts
//! and stops it all.

pub mod game_stats;
pub mod kernel;
pub mod replica_stats;
pub mod server;
pub mod stats;
pub mod transit;
mod worker;

pub use server::{Proxy, ProxyConfig, ServerError};
pub use spotable_core::{
    Replica, ReplicaSet, ReplicaState, dedupe, histogram, loglimit, marker, proxy_header,
    ratelimit, replicas, session, token,
};
pub use spotable_udp as udp;
pub mod admin;
pub mod cli;
pub mod config;
pub mod discovery;
