//! The test kit: what the netns suite (`tests/`) and `xtask` (bench, demo,
//! e2e) both need, in one place.
//!
//! - [`netns`]: network namespaces made for a run and deleted on drop,
//!   sockets and commands inside them, the unprivileged test user;
//! - [`procfs`]: readings from /proc (CPU time, memory, descriptors,
//!   threads' capabilities, dial agents, BPF program statistics);
//! - [`bpf`]: the BPF maps a process holds and their entries, read from
//!   the kernel directly;
//! - [`process`]: child processes stopped by PID when dropped, pipes read
//!   line by line, and [`process::Forwarder`], the one way both run a
//!   forwarder: its stdout events, its whole log, signals, stopping;
//! - [`wait`]: waiting for a condition, with a failure that names it,
//!   instead of sleeping for a guess;
//! - [`decode_event`]: the forwarder's stdout lines, read with its own wire
//!   types.
//!
//! Everything that makes namespaces runs as root; traffic stays on
//! loopback inside the namespaces a run created.

pub mod bpf;
pub mod netns;
pub mod process;
pub mod procfs;
pub mod wait;

pub use netns::{
    drop_to_user, drop_to_user_with, require_root, test_user, user_command, Netns, Privilege,
    TEST_USER,
};

use anyhow::Context as _;

/// Decodes one line of the forwarder's stdout with the wire types the
/// forwarder writes it with ([`forwarder::wire::Event`]), so a line that
/// drifts from them fails whoever reads it. The event is handed on as
/// JSON for the caller to index.
pub fn decode_event(line: &str) -> anyhow::Result<serde_json::Value> {
    let ev: forwarder::wire::Event = serde_json::from_str(line)
        .with_context(|| format!("stdout line is not a wire::Event: {line}"))?;
    Ok(serde_json::to_value(ev)?)
}
