//! The command line: the arguments `forwarder` takes ([`args`]) and the
//! client of a running forwarder's API ([`client`], behind `forwarder
//! ports` and `forwarder status`).
//!
//! May use: `engine`, `udp`, `wire`. From the first two it takes only the
//! modes and the UDP options a configuration names. `main.rs` puts the
//! command line together with [`crate::startup`], which uses this folder.

pub mod args;
pub mod client;
