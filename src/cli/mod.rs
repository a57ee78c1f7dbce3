//! The subcommands of the `opsd` binary.

mod health;
pub mod migrate;
pub mod ops;
pub mod serve;
