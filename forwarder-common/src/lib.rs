//! Types shared by the forwarder's eBPF programs and its controller.
//!
//! Everything here is `#[repr(C)]` plain data: the controller writes these
//! values into BPF maps and the sk_skb program reads and updates them in the
//! kernel. With the `user` feature the types also implement
//! `bytemuck::Pod` and `aya::Pod`, which aya needs to copy them in and out
//! of maps.
#![no_std]

/// Name of the SOCKHASH whose sockets run the verdict program (key: socket
/// cookie). A socket enters it only once its redirect target exists.
pub const MAP_SOCKS: &str = "FWD_SOCKS";
/// Name of the SOCKHASH holding redirect targets (key: socket cookie). No
/// program is attached to it.
pub const MAP_TARGETS: &str = "FWD_TARGETS";
/// Name of the HASH from a socket's cookie to its [`Peer`].
pub const MAP_PEERS: &str = "FWD_PEERS";

/// Name of the ring buffer through which the verdict tells the controller
/// that a socket has redirected another [`CHECK_SHIFT`]-sized chunk.
pub const MAP_EVENTS: &str = "FWD_EVENTS";

/// The verdict emits an event each time a socket's redirected byte count
/// crosses a multiple of `1 << CHECK_SHIFT` (2 MiB), so the controller can
/// check that socket's backlog without polling idle connections.
pub const CHECK_SHIFT: u32 = 21;

/// Name of the stream verdict program.
pub const PROG_VERDICT: &str = "fwd_verdict";
/// Name of the stream parser program (optional variant).
pub const PROG_PARSER: &str = "fwd_parser";

/// Default capacity of the socket maps: 2 entries per connection.
pub const MAX_SOCKETS: u32 = 131_072;

/// What the verdict program needs to know about one socket of a forwarded
/// connection, keyed by that socket's cookie in [`MAP_PEERS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Peer {
    /// Cookie of the socket that this socket's bytes are redirected to
    /// (its key in [`MAP_TARGETS`]).
    pub peer_cookie: u64,
    /// Bytes the program redirected from this socket to the peer; updated
    /// atomically by the program.
    pub bytes: u64,
    /// Bytes the program could not redirect (the target was missing) and
    /// the kernel dropped. Non-zero means the connection lost data and must
    /// be reset.
    pub dropped: u64,
    /// The published port this connection belongs to (for statistics).
    pub port_id: u32,
    /// 0 = accepted in the parent, 1 = dialed in the child.
    pub side: u32,
}

// SAFETY: Peer is repr(C) plain data without padding (3 x u64 + 2 x u32)
// and valid for any bit pattern, which is what aya's Pod requires.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Peer {}
