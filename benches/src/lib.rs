//! Spotable's demo, load generation and benchmark harness. The test replica and the process
//! handles it runs live in `spotable-fixtures`, which the tests use without this crate.

pub mod compare;
pub mod demo;
pub mod fit;
pub mod loadgen;
pub mod migrate_demo;
pub mod move_cost;
pub mod neighbour;
pub mod netns;
pub mod peers;
pub mod results;
pub mod switch;
pub mod tick_demo;
pub mod tick_rows;
pub mod timeline;
