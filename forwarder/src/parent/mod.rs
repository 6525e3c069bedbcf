//! The parent side: everything that lives in the host's network namespace
//! and faces clients and the container runtime.
//!
//! - [`port`]: the port manager (add, list, remove) and its listeners; it
//!   accepts each connection, asks a dialer for the child's end and hands
//!   the pair to an engine ([`crate::engine`]) or a datagram to the UDP
//!   relay ([`crate::udp`]).
//! - [`api`]: RootlessKit's port API over a Unix socket, plus `/v1/stats`,
//!   throttled per client by [`ratelimit`].
//! - [`agent`]: the client of the child-side dial agent, one of the two
//!   dialers.
//! - [`rootlesskit`]: attaching to a running RootlessKit instance (its
//!   state directory, child PID and API socket).
//!
//! May use: `child`, `engine`, `udp`, `wire`, `sys`. From `child` it takes
//! the [`crate::child::dial::Dial`] trait and the in-process dialer. Only
//! `startup`, `fuzz` and `main.rs` use this folder.

pub(crate) mod agent;
pub(crate) mod api;
pub(crate) mod port;
pub(crate) mod ratelimit;
pub mod rootlesskit;
