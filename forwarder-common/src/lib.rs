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

// ---------------------------------------------------------------------
// The local-client path: sock_ops admission and the sk_msg redirect.
// ---------------------------------------------------------------------

/// Name of the SOCKHASH whose sockets run the sk_msg program (key: socket
/// cookie): the local client's socket C and the container server's
/// accepted socket S, admitted by the sock_ops program.
pub const MAP_MSG_SOCKS: &str = "FWD_MSG_SOCKS";
/// Name of the HASH of published listen endpoints in the parent namespace
/// ([`Endpoint`] -> port id).
pub const MAP_LISTEN: &str = "FWD_LISTEN";
/// Name of the HASH of endpoints the forwarder is about to dial from in
/// the child namespace ([`Endpoint`] -> 1).
pub const MAP_DIALED: &str = "FWD_DIALED";
/// Name of the LRU HASH from an admitted socket's [`Tuple`] to its cookie.
pub const MAP_ADMITTED: &str = "FWD_ADMITTED";
/// Name of the HASH from an admitted socket's cookie to its [`Link`]
/// (written by the controller only).
pub const MAP_LINKS: &str = "FWD_LINKS";
/// Name of the HASH from an admitted socket's cookie to its [`Flow`]
/// (written by the sk_msg program only, once the controller created it).
pub const MAP_FLOWS: &str = "FWD_FLOWS";
/// Name of the socket-local storage holding each admitted socket's
/// [`Admission`].
pub const MAP_SELF: &str = "FWD_SELF";
/// Name of the HASH from a redirect target's cookie (A or B of a
/// connection on the local path) to its [`Acks`], kept by the sock_ops
/// program.
pub const MAP_ACKS: &str = "FWD_ACKS";
/// Name of the ARRAY of path-wide counters ([`Counters`], one entry).
pub const MAP_COUNTERS: &str = "FWD_COUNTERS";

/// Name of the sock_ops program.
pub const PROG_SOCKOPS: &str = "fwd_sockops";
/// Name of the sk_msg program.
pub const PROG_MSG: &str = "fwd_msg";
/// Name of the global (read-only data) holding the offset of `write_seq`
/// in the running kernel's `struct tcp_sock`, from its BTF.
pub const GLOBAL_WRITE_SEQ_OFF: &str = "WRITE_SEQ_OFF";
/// Name of the global holding the offset of `sk_wmem_queued` in the
/// kernel's `struct sock` (the start of `struct tcp_sock`).
pub const GLOBAL_WMEM_OFF: &str = "WMEM_OFF";
/// Name of the global holding the offset of `sk_sndbuf` in `struct sock`.
pub const GLOBAL_SNDBUF_OFF: &str = "SNDBUF_OFF";
/// Name of the global holding the offset of `icsk_ulp_ops` in `struct
/// inet_connection_sock` (the start of `struct tcp_sock`).
pub const GLOBAL_ULP_OFF: &str = "ULP_OFF";

/// Capacity of the local path's maps (sockets).
pub const MAX_LOCAL: u32 = 65_536;

/// An address and port in one network namespace. IPv4 addresses are held
/// v4-mapped (`::ffff:a.b.c.d`), so an AF_INET socket and an AF_INET6
/// socket with a v4-mapped address give the same key. The unspecified
/// address (`::` or `::ffff:0.0.0.0`) stands for a wildcard listener.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Endpoint {
    /// The namespace's cookie (`SO_NETNS_COOKIE`).
    pub netns: u64,
    /// Network byte order, as the kernel's `bpf_sock_ops` gives it.
    pub addr: [u32; 4],
    /// Host byte order.
    pub port: u32,
    pub _pad: u32,
}

/// Both ends of a socket, seen from that socket, in its namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Tuple {
    pub netns: u64,
    /// Network byte order, v4-mapped for IPv4.
    pub local: [u32; 4],
    pub remote: [u32; 4],
    /// Host byte order.
    pub local_port: u32,
    pub remote_port: u32,
}

/// What sock_ops recorded when it admitted a socket, in the socket's own
/// storage (the sk_msg program cannot compute its socket's cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Admission {
    pub cookie: u64,
    /// `snd_una` at admission: the first sequence number of the socket's
    /// data, so `write_seq - base` is what it has passed to TCP since.
    pub base: u32,
    /// [`ROLE_CLIENT`] or [`ROLE_SERVER`].
    pub role: u32,
}

/// The admitted socket is a local client (C).
pub const ROLE_CLIENT: u32 = 1;
/// The admitted socket is the container server's accepted socket (S).
pub const ROLE_SERVER: u32 = 2;

/// The controller's word to the sk_msg program about one admitted socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Link {
    /// Cookie of the forwarder's socket whose send queue this socket's
    /// sends go into (its key in [`MAP_TARGETS`]).
    pub target: u64,
    /// The most bytes the target's send queue may hold (sent and not yet
    /// acknowledged, or not yet sent) after a redirect: below its send
    /// buffer, so that a redirect never waits on the target.
    pub cap: u64,
    /// The program may switch to the redirect only while the socket's
    /// TCP-path bytes (`write_seq - base`, mod 2^32) equal this: every
    /// byte it sent by TCP has been relayed into the target's queue. It is
    /// also what the relay has written into the target.
    pub arm_at: u64,
}

/// A redirect target's acknowledged sequence space, kept by the sock_ops
/// program from the target's RTT callback (which runs after `snd_una`
/// moved). The target's queue holds `written - (una - base)` bytes, where
/// `written` is what the relay and the redirects put into it (the target
/// writes nothing before the handoff).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Acks {
    /// `snd_una` when the target was established.
    pub base: u32,
    /// `snd_una` at the last callback.
    pub una: u32,
    /// `write_seq` at the last callback.
    pub written: u32,
    /// `sk_wmem_queued` at the last callback: the memory the kernel
    /// compares with the send buffer before it lets a sender queue more.
    pub wmem: u32,
    /// `sk_sndbuf` at the last callback.
    pub sndbuf: u32,
    pub _pad: u32,
}

/// What the sk_msg program did for one admitted socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Flow {
    /// Bytes redirected into the target's send queue.
    pub redirected: u64,
    /// 1 while sends are redirected, 0 while they take TCP.
    pub armed: u64,
    /// Times the credit ran out and the socket went back to TCP.
    pub fallbacks: u64,
    /// Times the socket switched (back) to the redirect.
    pub arms: u64,
}

/// Path-wide counters (index 0 of [`MAP_COUNTERS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Counters {
    /// Local clients admitted.
    pub clients: u64,
    /// Container servers' sockets admitted.
    pub servers: u64,
    /// Admissions refused by the kernel (another program holds the socket:
    /// EBUSY, or the map is full).
    pub refused: u64,
    /// Redirects the kernel refused (the target was gone).
    pub redirect_failed: u64,
    /// Redirect targets (the forwarder's A and B) whose acknowledgements
    /// the program follows.
    pub targets: u64,
}

// SAFETY: each type is repr(C) plain data without padding, valid for any
// bit pattern, which is what aya's Pod requires.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Endpoint {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Tuple {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Link {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Flow {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Counters {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Acks {}
