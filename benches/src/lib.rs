//! Spotable's demo, test replica, load generation and benchmark helpers.
//!
//! The replica program here is what the proxy's integration tests and the demo run as real
//! child processes.

pub mod compare;
pub mod demo;
pub mod loadgen;
pub mod metrics_text;
pub mod netns;
pub mod peers;
pub mod process;
pub mod replica;
pub mod results;
pub mod wire;
