//! `forwarder child-agent`'s start: what the dial agent does inside the
//! child's namespaces before it serves a single request.
//!
//! While the process still has one thread (capset(2) changes only the
//! calling thread), it probes whether it may dial from clients' addresses
//! ([`super::srcip::probe`]) and installs the return routes for that, then
//! drops every capability except, while it preserves source addresses,
//! CAP_NET_ADMIN and CAP_NET_RAW. It may hold all of them in the
//! container's user namespace, and needs none of the others to dial.

use std::os::fd::RawFd;
use std::path::Path;

use anyhow::Result;

use super::{agent, srcip};
use crate::sys;

/// Runs the dial agent on the inherited socket `fd` or on a listening
/// socket at `socket`, preserving source addresses if `source_ip` asks
/// for it and the namespace permits it (a warning says when it does not).
/// Returns when the forwarder goes away.
pub fn run_agent(fd: Option<RawFd>, socket: Option<&Path>, source_ip: bool) -> Result<()> {
    // Before any thread exists.
    let routing = if source_ip {
        match srcip::probe().and_then(|()| srcip::Routing::install()) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!("source address preservation is off in this child: {e}");
                None
            }
        }
    } else {
        super::netns::clean_stale_logged();
        None
    };
    let keep: &[caps::Capability] = if routing.is_some() {
        &[
            caps::Capability::CAP_NET_ADMIN,
            caps::Capability::CAP_NET_RAW,
        ]
    } else {
        &[]
    };
    sys::drop_thread_capabilities(keep)
        .map_err(|e| anyhow::anyhow!("cannot drop capabilities: {e}"))?;
    // One thread: a dial is a few system calls and a loopback handshake,
    // and a request received, dialed and answered on the thread that read
    // it costs no wake-up of another worker (two per dial with a pool).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the runtime: {e}"))?;
    let r = rt.block_on(agent::run(fd, socket, routing));
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    r
}
