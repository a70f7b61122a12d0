//! What the CLI subcommands do; `main.rs` only parses arguments and calls these.

pub mod check;
pub mod demo;
pub mod keys;
