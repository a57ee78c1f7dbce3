//! The subcommands of the `opsd` binary.

pub mod ops;
pub mod serve;
