//! UDP forwarding: `udp`, `udp4` and `udp6` ports.
//!
//! How it works
//! ------------
//! Traffic: every datagram sent to a published UDP address, whatever
//! `--mode` says (`--mode` chooses the TCP engine; UDP always runs here, in
//! userspace). Sides by index: 0 = the parent socket (clients), 1 = the
//! flow's socket in the child.
//!
//! State: one parent socket per published address, owned by one task (the
//! relay, [`serve`]) together with everything else the address needs: its
//! flow table, one set of preallocated batch buffers and headers, and an
//! epoll instance of its own in which the parent socket and every flow
//! socket are registered. Tokio watches that epoll descriptor; when it is
//! readable the relay asks it which sockets are ready. Nothing is shared
//! with other tasks but atomic counters, so the data path takes no lock.
//!
//! Flows: a flow is one client address (IP and port). Its first datagram
//! creates it: the relay asks the dialer (the thread in the child's
//! namespace, or the child-side agent) for a UDP socket created in the
//! child and connected by the same rules as TCP (ParentIP, CHILDIP, IPv6 ->
//! IPv4, see `dial`); until the socket arrives up to
//! [`DIAL_BACKLOG`] datagrams wait in the flow, more are dropped and
//! counted (`dial_backlog`). When the socket arrives, what waited is not
//! flushed: it is replayed at the pace it came, late by the dial time
//! ([`pace`]), so hundreds of flows whose dials end together do not
//! overflow the server's receive queue; the flow's later datagrams queue
//! behind its own until the replay is done. A dial that fails drops what
//! waited (`dial_failed`) and forgets the flow; the client's next datagram
//! tries again. Replies read from the flow's socket go back to the client from
//! the address it wrote to: an unspecified-address listener reads that
//! address from IP_PKTINFO / IPV6_PKTINFO on every datagram and sets it as
//! the source of the replies.
//!
//! Budget: flows and TCP connections share one budget, the port manager's
//! semaphore of `--max-connections` slots. A flow holds a slot (a permit)
//! from its first datagram, while it dials, until it ends; the permit
//! lives in the flow, so every way a flow ends gives it back. The relay
//! never waits for a slot: when none is free, a new client takes the slot
//! of this address's least recently active flow (evicted, as for the flow
//! cap); if this address has no flow to give up, the datagram is dropped
//! and counted (`no_slot`, logged once a second at most). So UDP can never
//! take the last descriptors from TCP's accept loops, nor TCP block the
//! relay.
//!
//! End of a flow: there is no FIN in UDP. A flow with no datagram either
//! way for `--udp-idle-timeout` (default 60 s) expires; when a new client
//! arrives while `--udp-max-flows` (default 4096, per published address)
//! flows are live, or no slot of the budget is free, the least recently
//! active one is evicted first. Either way its child socket is closed and
//! its slot freed; datagrams still queued on it are read, counted
//! (`expired` or `evicted`) and dropped. Removing the port aborts the
//! relay, which closes the parent socket and every flow socket.
//!
//! Batching: the relay reads up to [`BATCH`] datagrams per recvmmsg(2)
//! from the parent socket and sends each run of consecutive datagrams of
//! one flow with one sendmmsg(2); replies are read per flow socket with
//! recvmmsg and sent to the client with one sendmmsg. Within a send,
//! consecutive datagrams of one size travel as one UDP GSO message
//! (UDP_SEGMENT, Linux 4.18; see [`batch::gso_runs`]): the stack builds,
//! routes and loops back one packet per run and cuts it into the original
//! datagrams only at the receiving socket (or the device), so each
//! datagram costs a copy and an enqueue rather than a trip through the IP
//! stack, and boundaries stay exactly as received. A receiver that asked
//! for UDP_GRO gets such a run whole, as it would from a NIC. Where GSO is
//! refused (a segment above the path MTU, a device without checksum
//! offload, a kernel without it) the datagrams go one per message. In the
//! bench this raised the flood rate the relay keeps up with 1.5-1.8x. Buffers are
//! allocated once per relay ([`BATCH`] x 64 KiB, touched only as far as
//! datagrams reach), the message headers nix needs once per call (see
//! [`batch`]); per datagram the relay neither allocates nor locks (a
//! datagram waiting for its flow's dial is the one copy made).
//!
//! Datagrams are kept whole: every buffer holds 65,536 bytes, one more than
//! the largest UDP payload (65,507 bytes over IPv4, 65,527 over IPv6), so
//! a datagram never reaches us truncated; should the kernel flag one
//! (MSG_TRUNC), or refuse to send one because it is too large for the other
//! side's family (EMSGSIZE: a 65,527-byte IPv6 reply to an IPv4 client), it
//! is dropped and counted as `oversize`.
//!
//! Accounting: every datagram that reached one of our sockets and was not
//! delivered is counted under one reason. Datagrams the kernel dropped
//! because a socket's receive queue was full are counted from SO_RXQ_OVFL
//! (the drop count the kernel attaches to each datagram, read on the hot
//! path at no cost) and, at each timer tick and when a flow ends, from
//! SO_MEMINFO's drop counter (the same counter, for drops after the last
//! datagram read): `rx_queue_overflow` for the parent socket,
//! `child_rx_queue_overflow` for flow sockets. Failed sends count as
//! `send_error`; ICMP port-unreachable answers from the child (nothing
//! listens there) as `unreachable`.
//!
//! Why there is no in-kernel UDP path: the ebpf engine redirects TCP
//! bytes between sockets of a sockmap with sk_skb programs, which needs
//! both sockets to be connected streams. A UDP relay would have to rewrite
//! addresses and ports in the packet (tc or XDP programs with a NAT table
//! of flows), which means attaching to interfaces in both namespaces
//! (CAP_NET_ADMIN in the child's user namespace too), computing checksums,
//! handling fragments and IP options, and tracking flows in a map that
//! userspace must still create and expire; the child would see packets
//! that no socket of ours sent, so the dial rules, the per-flow socket and
//! the accounting above would all have to be rebuilt in BPF. Batched
//! recvmmsg/sendmmsg with GSO already moves each datagram with one copy in
//! and one out, at a cost per call and per run rather than per datagram,
//! so we kept UDP in userspace.
//!
//! Files: [`relay`] (the task per address), [`flows`] (the flow table),
//! [`pace`] (the replay of what waited for a dial), [`stats`] (the
//! counters), [`batch`] (recvmmsg/sendmmsg with their control messages,
//! and GSO runs).
//!
//! May use: `child` (the dialers), `sys`, `wire`.

mod batch;
mod flows;
mod pace;
mod relay;
mod stats;

use std::time::Duration;

pub use crate::wire::{Drops, UdpSnapshot};
pub use relay::{bind, serve, Published};
pub use stats::UdpStats;

/// Largest UDP payload over IPv4 (65,535 - 20 - 8).
pub const MAX_PAYLOAD_V4: usize = 65_507;
/// Largest UDP payload over IPv6 without jumbograms (65,535 - 8).
pub const MAX_PAYLOAD_V6: usize = 65_527;
/// Size of each datagram buffer: one more than any payload, so a datagram
/// that does not fit is seen as truncated, never silently cut.
const BUF: usize = 65_536;
const _: () = assert!(BUF > MAX_PAYLOAD_V6 && MAX_PAYLOAD_V6 > MAX_PAYLOAD_V4);
/// Datagrams per recvmmsg/sendmmsg call.
pub const BATCH: usize = 32;
/// Datagrams of one flow that may wait for its dial and its paced release
/// ([`pace`]); more are dropped.
pub const DIAL_BACKLOG: usize = 16;
/// How long a flow's dial may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Epoll token of the parent socket (flow sockets use their slot index).
const PARENT: u64 = u64::MAX;
/// Receive buffer asked for each socket (the kernel caps it at
/// net.core.rmem_max).
const RCVBUF: usize = 4 << 20;

/// UDP settings shared by every UDP port.
#[derive(Debug, Clone, Copy)]
pub struct UdpOptions {
    /// A flow with no datagram either way for this long is closed.
    pub idle_timeout: Duration,
    /// Live flows per published address; beyond it the least recently
    /// active flow is evicted.
    pub max_flows: usize,
    /// Flows are dialed from the client's address where the dialer can
    /// ([`crate::child::srcip`]); each closed flow is reported back to the dialer
    /// ([`crate::child::dial::Dial::udp_closed`]) so it can remove the flow's return rule.
    pub source_ip: bool,
}

impl Default for UdpOptions {
    fn default() -> Self {
        UdpOptions {
            idle_timeout: Duration::from_secs(60),
            max_flows: 4096,
            source_ip: false,
        }
    }
}
