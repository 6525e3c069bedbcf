//! Engines: what carries the bytes of an established connection pair.
//!
//! The port manager accepts a connection in the parent namespace, dials its
//! counterpart in the child and hands the pair to the engine chosen for this
//! run. Sides are named by index everywhere: 0 = accepted in the parent,
//! 1 = dialed in the child, so one function forwards either direction
//! (`from` = i, `to` = 1 - i).
//!
//! - [`ebpf`]: an sk_skb program redirects each socket's bytes to its peer
//!   inside the kernel; userspace only watches for FIN and resets.
//! - [`splice`]: splice(2) through a pipe per direction.
//! - [`copy`]: a plain read/write through a userspace buffer.
//!
//! splice and copy share one driver ([`relay`]); they differ only in how a
//! chunk is moved.

pub mod copy;
pub mod ebpf;
pub mod relay;
pub mod splice;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use crate::stats::ConnGuard;

/// The engine chosen by `--mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// ebpf when the BPF programs load and attach here, otherwise splice.
    Auto,
    /// In-kernel splicing with an sk_skb sockmap program (CAP_BPF + CAP_NET_ADMIN).
    Ebpf,
    /// splice(2) through pipes.
    Splice,
    /// Userspace copy.
    Copy,
}

/// The engine actually running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    Ebpf,
    Splice,
    Copy,
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineKind::Ebpf => "ebpf",
            EngineKind::Splice => "splice",
            EngineKind::Copy => "copy",
        })
    }
}

/// A connected pair, ready to be forwarded: `sides[0]` was accepted in the
/// parent namespace, `sides[1]` dialed in the child.
pub struct Conn {
    pub sides: [TcpStream; 2],
    /// Counts the connection as active until dropped; gives the port's
    /// counters.
    pub guard: ConnGuard,
}

/// Entries in the BPF maps, for leak checks.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MapEntries {
    pub sockets: u64,
    pub targets: u64,
    pub peers: u64,
}

/// The splice and copy paths' movers (see [`relay::Pool`]): idle ones kept
/// for reuse, and ones in use by connections that are moving data. Each
/// pipe holds two descriptors.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pooled {
    pub pipes: usize,
    pub pipes_in_use: usize,
    pub buffers: usize,
    pub buffers_in_use: usize,
}

/// What the pools hold now.
pub fn pooled() -> Pooled {
    let (pipes, pipes_in_use) = splice::pooled();
    let (buffers, buffers_in_use) = copy::pooled();
    Pooled {
        pipes,
        pipes_in_use,
        buffers,
        buffers_in_use,
    }
}

/// One way of forwarding established connections.
pub trait Engine: Send + Sync {
    fn kind(&self) -> EngineKind;

    /// Takes ownership of a connection pair and forwards it until both
    /// directions are closed or one side resets. Must not block.
    fn spawn(&self, conn: Conn);

    /// Bytes moved so far by connections still running, per port id and
    /// direction, when the engine does not count them as it goes.
    fn live_bytes(&self) -> HashMap<u32, [u64; 2]> {
        HashMap::new()
    }

    /// Current BPF map occupancy (ebpf engine only).
    fn map_entries(&self) -> Option<MapEntries> {
        None
    }
}

/// Builds the engine for `mode`, with the reason it was chosen.
pub fn select(mode: Mode, ebpf_opts: ebpf::Options) -> anyhow::Result<(Arc<dyn Engine>, String)> {
    // Kernel lines where the ebpf engine loads but is not safe (crate::kernel).
    if let (Mode::Auto, Some(why)) = (mode, crate::kernel::auto_refuses_ebpf()) {
        let reason = format!("ebpf not chosen automatically: {why}");
        return Ok((Arc::new(splice::SpliceEngine::new()), reason));
    }
    match mode {
        Mode::Copy => Ok((
            Arc::new(copy::CopyEngine),
            "requested with --mode copy".into(),
        )),
        Mode::Splice => Ok((
            Arc::new(splice::SpliceEngine::new()),
            "requested with --mode splice".into(),
        )),
        Mode::Ebpf => {
            let e = ebpf::EbpfEngine::new(ebpf_opts)?;
            Ok((Arc::new(e), "requested with --mode ebpf".into()))
        }
        Mode::Auto => match ebpf::EbpfEngine::new(ebpf_opts) {
            Ok(e) => Ok((
                Arc::new(e),
                "BPF sockmap programs loaded and attached".into(),
            )),
            Err(err) => Ok((
                Arc::new(splice::SpliceEngine::new()),
                format!("ebpf unavailable: {err:#}"),
            )),
        },
    }
}
