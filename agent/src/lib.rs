//! Spotable's spot agent, and the library it shares with the game-server wrapper.
//!
//! Shared (always built): [`imds`], the EC2 instance-metadata client, and [`inventory`], the
//! inventory message schema and its SQS publisher. With the default `kubernetes` feature: the
//! agent's interruption handling (cordon, taint, evict).

#[cfg(feature = "kubernetes")]
pub mod agent;
#[cfg(feature = "kubernetes")]
pub mod cli;
#[cfg(feature = "kubernetes")]
pub mod drain;
pub mod imds;
pub mod inventory;
pub mod notice;
#[cfg(feature = "testing")]
pub mod testing;
