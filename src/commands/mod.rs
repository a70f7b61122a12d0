//! What the CLI subcommands do; `main.rs` only parses arguments and calls these.

pub mod admin_addr;
pub mod certs;
pub mod check;
pub mod demo;
pub mod demo_config;
pub mod edit;
pub mod keys;
pub mod promote;
