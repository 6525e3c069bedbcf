//! Per-port and total counters.
//!
//! Userspace engines add bytes as they move them. The ebpf engine's bytes
//! are counted by the BPF program per socket; the engine folds a
//! connection's counters into its port when the connection ends and
//! reports live connections' counters on demand (`Engine::live_bytes`;
//! the engine module uses this one, never the other way round).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;

use tokio::sync::Notify;

pub use crate::wire::{ByPath, Snapshot};

/// Which mechanism moved a byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPath {
    /// Redirected by the sk_skb program; never entered userspace.
    Bpf = 0,
    /// Moved by splice(2) through a pipe; never copied into userspace.
    Splice = 1,
    /// Copied through a userspace buffer.
    Copy = 2,
    /// Moved by the sk_msg program inside the sender's own sendmsg(), into
    /// the forwarder's socket on the other side (the local-client path).
    Msg = 3,
}

/// Counters of one published port. Direction index 0 is parent -> child
/// (bytes read from the accepted socket), 1 is child -> parent.
#[derive(Debug, Default)]
pub struct PortStats {
    pub id: u32,
    pub active: AtomicU64,
    pub connections: AtomicU64,
    pub dial_failures: AtomicU64,
    pub bytes: [AtomicU64; 2],
    pub by_path: [AtomicU64; 4],
    /// Set when the forwarder stops: the port's connections end now
    /// instead of running to their end ([`PortStats::closed`]).
    shutting_down: AtomicBool,
    shutdown: Notify,
}

impl PortStats {
    pub fn new(id: u32) -> Arc<Self> {
        Arc::new(PortStats {
            id,
            ..Default::default()
        })
    }

    /// Counts `n` bytes read from side `from` and moved by `path`.
    pub fn add_bytes(&self, from: usize, n: u64, path: DataPath) {
        self.bytes[from].fetch_add(n, Relaxed);
        self.by_path[path as usize].fetch_add(n, Relaxed);
    }

    /// Tells the port's connections to end now (the forwarder stops).
    pub fn shut_down(&self) {
        self.shutting_down.store(true, SeqCst);
        self.shutdown.notify_waiters();
    }

    /// Completes once [`PortStats::shut_down`] was called: engines select
    /// on it to tear a connection down (and account for it) before exit.
    pub async fn closed(&self) {
        loop {
            // Created before the check: notify_waiters wakes it even if it
            // was never polled.
            let woken = self.shutdown.notified();
            if self.shutting_down.load(SeqCst) {
                return;
            }
            woken.await;
        }
    }

    /// Marks a connection as started; the guard marks it ended when dropped.
    pub fn open_connection(self: &Arc<Self>) -> ConnGuard {
        self.connections.fetch_add(1, Relaxed);
        self.active.fetch_add(1, Relaxed);
        ConnGuard(self.clone(), None)
    }

    pub fn snapshot(&self, live: [u64; 2]) -> Snapshot {
        let bpf_live = live[0] + live[1];
        Snapshot {
            active: self.active.load(Relaxed),
            connections: self.connections.load(Relaxed),
            dial_failures: self.dial_failures.load(Relaxed),
            bytes_to_child: self.bytes[0].load(Relaxed) + live[0],
            bytes_to_parent: self.bytes[1].load(Relaxed) + live[1],
            bytes_by_path: ByPath {
                bpf: self.by_path[0].load(Relaxed) + bpf_live,
                splice: self.by_path[1].load(Relaxed),
                copy: self.by_path[2].load(Relaxed),
                msg: self.by_path[3].load(Relaxed),
            },
        }
    }
}

/// Decrements the port's active count when the connection ends, and
/// gives back its slot under `--max-connections`.
#[derive(Debug)]
pub struct ConnGuard(Arc<PortStats>, Option<tokio::sync::OwnedSemaphorePermit>);

impl ConnGuard {
    /// Keeps `slot` taken until the connection ends.
    pub fn hold(mut self, slot: tokio::sync::OwnedSemaphorePermit) -> Self {
        self.1 = Some(slot);
        self
    }

    pub fn port(&self) -> &Arc<PortStats> {
        &self.0
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
    }
}
