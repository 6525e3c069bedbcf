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
//!
//! Also here: the per-port counters the engines update ([`stats`]), and
//! what the running kernel offers them and which engine auto mode picks
//! ([`kernel`]).
//!
//! May use: `sys`, `wire`.

#[cfg(test)]
mod contract;
pub(crate) mod copy;
#[cfg(feature = "ebpf")]
pub(crate) mod ebpf;
#[cfg(not(feature = "ebpf"))]
#[path = "ebpf_disabled.rs"]
pub(crate) mod ebpf;
pub(crate) mod handoff;
pub mod kernel;
#[cfg(feature = "ebpf")]
pub(crate) mod local;
pub(crate) mod relay;
pub(crate) mod splice;
pub(crate) mod stats;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::Serialize;
use tokio::net::TcpStream;

use crate::engine::stats::ConnGuard;
pub use crate::wire::{EngineKind, MapEntries, Pooled};

/// The engine chosen by `--mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The fastest path measured for each connection: a local client's
    /// takes the local-client path (sock_ops + sk_msg) where BPF is
    /// permitted and its start-up self-test passes, every other
    /// connection splice. The sk_skb path is slower than splice when
    /// nothing is pinned (`forwarder check` says why), so auto mode never
    /// takes it; `--mode ebpf` does.
    Auto,
    /// In-kernel splicing with an sk_skb sockmap program (CAP_BPF + CAP_NET_ADMIN).
    Ebpf,
    /// splice(2) through pipes.
    Splice,
    /// Userspace copy.
    Copy,
}

/// Options of the ebpf engine (the stand-in built without the `ebpf`
/// feature takes and ignores them).
#[derive(Debug, Clone, Default)]
pub struct EbpfOptions {
    /// Also attach the stream parser program (each skb one message) instead
    /// of running the verdict alone.
    pub parser: bool,
    /// Run the local-client path (`local`) with its `sock_ops` program
    /// attached to this cgroup v2 directory.
    pub local: Option<std::path::PathBuf>,
    /// Fail when the local-client path cannot start, instead of running
    /// without it (`forwarder check`'s probe).
    pub local_required: bool,
    /// Run the local-client path even where its self-test finds that the
    /// kernel breaks blocking reads on admitted sockets (the `local`
    /// module's `probe`; `--local-path`).
    pub local_forced: bool,
    /// Auto mode: connections that do not take the local-client path run
    /// on the splice engine, not the sk_skb path.
    pub splice_others: bool,
    /// The child namespace's cookie, where known at start.
    pub child_netns: Option<u64>,
}

/// A connected pair, ready to be forwarded: `sides[0]` was accepted in the
/// parent namespace, `sides[1]` dialed in the child.
pub struct Conn {
    pub sides: [TcpStream; 2],
    /// Counts the connection as active until dropped; gives the port's
    /// counters.
    pub guard: ConnGuard,
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
        // The dialer's pool, which the caller adds.
        sockets: 0,
    }
}

/// The future that forwards one connection ([`Engine::run`]).
pub type Forwarding = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>>;

/// One way of forwarding established connections.
pub trait Engine: Send + Sync {
    fn kind(&self) -> EngineKind;

    /// Takes ownership of a connection pair: the returned future forwards
    /// it until both directions are closed or one side resets. The port
    /// manager awaits it in the task that accepted and dialed the
    /// connection, so a connection costs one task and one wake-up less
    /// than spawning it would.
    fn run(&self, conn: Conn) -> Forwarding;

    /// Runs [`Engine::run`]'s future in a task of its own.
    fn spawn(&self, conn: Conn) {
        tokio::spawn(self.run(conn));
    }

    /// Bytes moved so far by connections still running, per port id and
    /// direction, when the engine does not count them as it goes.
    fn live_bytes(&self) -> HashMap<u32, [u64; 2]> {
        HashMap::new()
    }

    /// Current BPF map occupancy (ebpf engine only).
    fn map_entries(&self) -> Option<MapEntries> {
        None
    }

    /// The local-client path's counters, when it runs.
    fn local_path(&self) -> Option<crate::wire::LocalPath> {
        None
    }

    /// A published port's listener now accepts at `addr` (`on`), or has
    /// closed (`!on`). The local-client path admits clients of these.
    fn listening(&self, addr: SocketAddr, on: bool) {
        let _ = (addr, on);
    }

    /// Called with an accepted socket before its dial: a port for the dial
    /// to bind, registered so that the container server's socket is
    /// admitted to the local-client path, or `None`. `child_netns` is the
    /// child namespace's cookie where the dialer knows it.
    fn before_dial(&self, accepted: &TcpStream, child_netns: Option<u64>) -> Option<u16> {
        let _ = (accepted, child_netns);
        None
    }

    /// The dial of a port from [`Engine::before_dial`] has ended.
    fn after_dial(&self, port: u16) {
        let _ = port;
    }
}

/// Why auto mode runs splice, also where BPF would load. Measured with
/// `cargo xtask bench` (unpinned placement) on kernel 6.18, 2 vCPUs; the
/// cause is in `bench/results/profile.md` and in [`ebpf`]'s module comment.
pub const AUTO_REASON: &str = "splice is faster than the ebpf engine for bulk traffic when \
     nothing is pinned to CPUs (the kernel sends sk_skb-redirected bytes from a per-socket \
     worker that waits a timer tick whenever the target's send buffer is full); \
     --mode ebpf runs the in-kernel path on request (it needs CAP_BPF and CAP_NET_ADMIN)";

/// Why auto mode runs the ebpf engine with its local-client path on.
pub const AUTO_LOCAL_REASON: &str = "local clients take the local-client path (their sends \
     move inside their own sendmsg(): sock_ops + sk_msg), other connections splice (faster \
     than the sk_skb path when nothing is pinned to CPUs)";

/// An engine chosen and, for ebpf, loaded, but not started: the
/// privileged part of start-up is done, no runtime is needed yet.
pub enum Prepared {
    Ebpf(Box<ebpf::Loaded>),
    Splice,
    Copy,
}

impl Prepared {
    /// Starts the engine. Must run inside the tokio runtime.
    pub fn start(self) -> anyhow::Result<Arc<dyn Engine>> {
        Ok(match self {
            Prepared::Ebpf(l) => Arc::new(l.start()?),
            Prepared::Splice => Arc::new(splice::SpliceEngine::new()),
            Prepared::Copy => Arc::new(copy::CopyEngine),
        })
    }
}

/// Chooses the engine for `mode` and loads the BPF programs if it is
/// ebpf, with the reason it was chosen. Runs before any runtime exists.
pub fn select(mode: Mode, ebpf_opts: ebpf::Options) -> anyhow::Result<(Prepared, String)> {
    match mode {
        Mode::Copy => Ok((Prepared::Copy, "requested with --mode copy".into())),
        Mode::Splice => Ok((Prepared::Splice, "requested with --mode splice".into())),
        Mode::Ebpf => {
            let e = ebpf::EbpfEngine::load(ebpf_opts)?;
            Ok((
                Prepared::Ebpf(Box::new(e)),
                "requested with --mode ebpf".into(),
            ))
        }
        Mode::Auto => {
            if ebpf_opts.local.is_none() {
                return Ok((Prepared::Splice, AUTO_REASON.into()));
            }
            let why = match ebpf::EbpfEngine::load(EbpfOptions {
                splice_others: true,
                ..ebpf_opts
            }) {
                Ok(l) if l.has_local_path() => {
                    return Ok((Prepared::Ebpf(Box::new(l)), AUTO_LOCAL_REASON.into()))
                }
                Ok(l) => l
                    .local_off_reason()
                    .unwrap_or("it did not start")
                    .to_string(),
                Err(e) => e.to_string(),
            };
            Ok((
                Prepared::Splice,
                format!("{AUTO_REASON}; the local-client path is off: {why}"),
            ))
        }
    }
}
