//! The counters the API and the events report, as serialized: the engine
//! in use, bytes and connections of a TCP port, datagrams, flows and drops
//! of a UDP port, BPF map entries and pooled buffers. The live counters
//! are atomics beside the code that counts (`engine::stats`, `udp`); they
//! produce these snapshots.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The engine actually running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

/// Entries in the BPF maps, for leak checks.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MapEntries {
    pub sockets: u64,
    pub targets: u64,
    pub peers: u64,
}

/// The local-client path's admissions and redirects, counted by its
/// programs in the kernel (ebpf engine with the path on).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LocalPath {
    /// Local clients' sockets admitted.
    pub clients: u64,
    /// Container servers' sockets admitted.
    pub servers: u64,
    /// Admissions the kernel refused (another program holds the socket, or
    /// the map is full): those sockets stay on the TCP path.
    pub refused: u64,
    /// Redirects the kernel refused (the target was gone).
    pub redirect_failed: u64,
    /// The forwarder's own sockets whose acknowledgements the programs
    /// follow.
    pub targets: u64,
}

/// The splice and copy paths' movers (the relay's pools): idle ones kept
/// for reuse, and ones in use by connections that are moving data. Each
/// pipe holds two descriptors. And the TCP and UDP sockets made ahead in
/// the child's namespace for dials, one descriptor each.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pooled {
    pub pipes: usize,
    pub pipes_in_use: usize,
    pub buffers: usize,
    pub buffers_in_use: usize,
    #[serde(default)]
    pub sockets: usize,
}

/// Bytes by data path.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ByPath {
    /// Redirected by the sk_skb program.
    pub bpf: u64,
    pub splice: u64,
    pub copy: u64,
    /// Moved by the sk_msg program in the sender's own call.
    #[serde(default)]
    pub msg: u64,
}

/// A point-in-time copy of a port's (or the total's) counters.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Snapshot {
    pub active: u64,
    pub connections: u64,
    pub dial_failures: u64,
    pub bytes_to_child: u64,
    pub bytes_to_parent: u64,
    pub bytes_by_path: ByPath,
}

impl std::ops::AddAssign for Snapshot {
    fn add_assign(&mut self, o: Snapshot) {
        self.active += o.active;
        self.connections += o.connections;
        self.dial_failures += o.dial_failures;
        self.bytes_to_child += o.bytes_to_child;
        self.bytes_to_parent += o.bytes_to_parent;
        self.bytes_by_path.bpf += o.bytes_by_path.bpf;
        self.bytes_by_path.splice += o.bytes_by_path.splice;
        self.bytes_by_path.copy += o.bytes_by_path.copy;
        self.bytes_by_path.msg += o.bytes_by_path.msg;
    }
}

/// Undelivered datagrams by reason (the UDP relay's `Loss` reasons).
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Drops {
    pub rx_queue_overflow: u64,
    pub child_rx_queue_overflow: u64,
    pub oversize: u64,
    pub send_error: u64,
    pub unreachable: u64,
    pub evicted: u64,
    pub expired: u64,
    pub dial_failed: u64,
    pub dial_backlog: u64,
    /// New clients turned away: the shared `--max-connections` budget was
    /// exhausted and this address had no flow to evict.
    #[serde(default)]
    pub no_slot: u64,
}

impl Drops {
    /// All undelivered datagrams.
    pub fn total(&self) -> u64 {
        self.rx_queue_overflow
            + self.child_rx_queue_overflow
            + self.oversize
            + self.send_error
            + self.unreachable
            + self.evicted
            + self.expired
            + self.dial_failed
            + self.dial_backlog
            + self.no_slot
    }
}

/// A UDP port's counters as `/v1/stats` reports them.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct UdpSnapshot {
    pub datagrams_to_child: u64,
    pub datagrams_to_parent: u64,
    pub bytes_to_child: u64,
    pub bytes_to_parent: u64,
    /// Live flows.
    pub flows: u64,
    pub flows_total: u64,
    pub evictions: u64,
    pub expirations: u64,
    pub dial_failures: u64,
    pub drops: Drops,
}

impl std::ops::AddAssign for UdpSnapshot {
    fn add_assign(&mut self, o: UdpSnapshot) {
        self.datagrams_to_child += o.datagrams_to_child;
        self.datagrams_to_parent += o.datagrams_to_parent;
        self.bytes_to_child += o.bytes_to_child;
        self.bytes_to_parent += o.bytes_to_parent;
        self.flows += o.flows;
        self.flows_total += o.flows_total;
        self.evictions += o.evictions;
        self.expirations += o.expirations;
        self.dial_failures += o.dial_failures;
        let (a, b) = (&mut self.drops, o.drops);
        a.rx_queue_overflow += b.rx_queue_overflow;
        a.child_rx_queue_overflow += b.child_rx_queue_overflow;
        a.oversize += b.oversize;
        a.send_error += b.send_error;
        a.unreachable += b.unreachable;
        a.evicted += b.evicted;
        a.expired += b.expired;
        a.dial_failed += b.dial_failed;
        a.dial_backlog += b.dial_backlog;
        a.no_slot += b.no_slot;
    }
}
