//! Spotable's spot agent: learns of interruptions (instance metadata, or EventBridge events
//! through SQS), tells the inventory queue, cordons and drains the node. What it shares with
//! the game-server wrapper (metadata client, notices, inventory) is the `spotable-fleet` crate.

pub mod agent;
pub mod cli;
pub mod drain;
pub mod metrics;
pub mod queue;
pub mod respond;

pub use spotable_fleet::{ensure_crypto_provider, eventbridge, imds, inventory, notice};
