//! The subcommands of the `opsd` binary.

pub mod migrate;
pub mod ops;
pub mod serve;
