//! Spotable's game-server wrapper: race-free ports, public address, inventory messages, and
//! PID-1 duty for the game process.
#![forbid(unsafe_code)]

pub mod agones;
pub mod anchor;
pub mod cli;
pub mod expand;
pub mod fleet;
pub mod migrate;
pub mod ports;
mod report;
pub mod supervise;
