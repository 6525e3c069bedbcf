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
//! counted (`dial_backlog`). A dial that fails drops what waited
//! (`dial_failed`) and forgets the flow; the client's next datagram tries
//! again. Replies read from the flow's socket go back to the client from
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
//! (UDP_SEGMENT, Linux 4.18; see [`sys::gso_runs`]): the stack builds,
//! routes and loops back one packet per run and cuts it into the original
//! datagrams only at the receiving socket (or the device), so each
//! datagram costs a copy and an enqueue rather than a trip through the IP
//! stack, and boundaries stay exactly as received. A receiver that asked
//! for UDP_GRO gets such a run whole, as it would from a NIC. Where GSO is
//! refused (a segment above the path MTU, a device without checksum
//! offload, a kernel without it) the datagrams go one per message. In the
//! bench this raised the flood rate the relay keeps up with 1.5-1.8x. Buffers and
//! headers are allocated once per relay ([`BATCH`] x 64 KiB, touched only
//! as far as datagrams reach); per datagram the relay neither allocates
//! nor locks (a datagram waiting for its flow's dial is the one copy made).
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

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use serde::{Deserialize, Serialize};
use socket2::{Domain, SockAddr, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::dial::{Dial, DialFailure, DialRequest};
use crate::spec::PortSpec;
use crate::sys::{self, Batch};

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
/// Datagrams that may wait for a flow's dial; more are dropped.
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
    /// ([`crate::srcip`]); each closed flow is reported back to the dialer
    /// ([`Dial::udp_closed`]) so it can remove the flow's return rule.
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

/// Why a datagram was not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    /// The parent socket's receive queue was full (SO_RXQ_OVFL).
    RxQueueOverflow = 0,
    /// A flow socket's receive queue was full (replies from the child).
    ChildRxQueueOverflow,
    /// Larger than the other side's family allows, or truncated.
    Oversize,
    /// sendmmsg failed (the errno is logged, rate limited).
    SendError,
    /// The child answered ICMP port unreachable: nothing listens there.
    Unreachable,
    /// Queued for a flow that was evicted by the flow cap.
    Evicted,
    /// Queued for a flow that expired.
    Expired,
    /// Waiting for a flow whose dial in the child failed.
    DialFailed,
    /// More than [`DIAL_BACKLOG`] datagrams arrived while the flow dialed.
    DialBacklog,
    /// A new client while every slot of `--max-connections` was taken and
    /// this address had no flow to evict.
    NoSlot,
}

const DROP_KINDS: usize = 10;

/// Per-port UDP counters, updated once per batch.
#[derive(Debug, Default)]
pub struct UdpStats {
    /// Datagrams delivered: [to the child, to the parent].
    pub datagrams: [AtomicU64; 2],
    /// Payload bytes delivered: [to the child, to the parent].
    pub bytes: [AtomicU64; 2],
    /// Live flows.
    pub flows: AtomicU64,
    /// Flows ever created (dialed successfully).
    pub flows_total: AtomicU64,
    /// Flows closed by the flow cap.
    pub evictions: AtomicU64,
    /// Flows closed by the idle timeout.
    pub expirations: AtomicU64,
    /// Dials that failed.
    pub dial_failures: AtomicU64,
    /// Undelivered datagrams by [`Loss`] reason.
    pub drops: [AtomicU64; DROP_KINDS],
}

impl UdpStats {
    fn lost(&self, why: Loss, n: u64) {
        if n > 0 {
            self.drops[why as usize].fetch_add(n, Relaxed);
        }
    }

    fn delivered(&self, to: usize, datagrams: u64, bytes: u64) {
        if datagrams > 0 {
            self.datagrams[to].fetch_add(datagrams, Relaxed);
            self.bytes[to].fetch_add(bytes, Relaxed);
        }
    }

    /// A point-in-time copy.
    pub fn snapshot(&self) -> UdpSnapshot {
        let d = |w: Loss| self.drops[w as usize].load(Relaxed);
        UdpSnapshot {
            datagrams_to_child: self.datagrams[0].load(Relaxed),
            datagrams_to_parent: self.datagrams[1].load(Relaxed),
            bytes_to_child: self.bytes[0].load(Relaxed),
            bytes_to_parent: self.bytes[1].load(Relaxed),
            flows: self.flows.load(Relaxed),
            flows_total: self.flows_total.load(Relaxed),
            evictions: self.evictions.load(Relaxed),
            expirations: self.expirations.load(Relaxed),
            dial_failures: self.dial_failures.load(Relaxed),
            drops: Drops {
                rx_queue_overflow: d(Loss::RxQueueOverflow),
                child_rx_queue_overflow: d(Loss::ChildRxQueueOverflow),
                oversize: d(Loss::Oversize),
                send_error: d(Loss::SendError),
                unreachable: d(Loss::Unreachable),
                evicted: d(Loss::Evicted),
                expired: d(Loss::Expired),
                dial_failed: d(Loss::DialFailed),
                dial_backlog: d(Loss::DialBacklog),
                no_slot: d(Loss::NoSlot),
            },
        }
    }
}

/// Undelivered datagrams by reason (see [`Loss`]).
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

/// Tracks a socket's cumulative kernel drop counter (a u32 that wraps) and
/// turns each reading into the number of new drops.
#[derive(Debug, Default, Clone, Copy)]
pub struct DropCounter {
    last: u32,
}

impl DropCounter {
    /// New drops since the last reading. Readings may arrive out of order
    /// (an older datagram's count after a newer SO_MEMINFO reading): a
    /// reading behind the last one by less than half the range adds nothing.
    pub fn update(&mut self, now: u32) -> u64 {
        let d = now.wrapping_sub(self.last);
        if d == 0 || d > u32::MAX / 2 {
            return 0;
        }
        self.last = now;
        d as u64
    }
}

// ---------------------------------------------------------------------------
// The flow table: a map from client address to slot, and the slots in a
// doubly linked list ordered by last activity (head = most recent).

const NIL: usize = usize::MAX;

struct Slot<T> {
    key: SocketAddr,
    val: Option<T>,
    last_ms: u64,
    prev: usize,
    next: usize,
}

/// Flows by client address with O(1) lookup, touch, eviction of the least
/// recently active and expiry. Slot indices are stable while a flow lives
/// (they are the flow sockets' epoll tokens) and reused after. Capacity is
/// reserved up front: inserting never allocates once `cap` slots exist.
pub struct FlowTable<T> {
    map: HashMap<SocketAddr, usize>,
    slots: Vec<Slot<T>>,
    free: Vec<usize>,
    head: usize,
    tail: usize,
    cap: usize,
}

impl<T> FlowTable<T> {
    /// A table for at most `cap` flows (at least 1).
    pub fn new(cap: usize) -> Self {
        let cap = cap.max(1);
        FlowTable {
            map: HashMap::with_capacity(cap),
            slots: Vec::with_capacity(cap),
            free: Vec::with_capacity(cap),
            head: NIL,
            tail: NIL,
            cap,
        }
    }

    /// Live flows.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// No live flow.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The slot of `key`'s flow.
    pub fn find(&self, key: &SocketAddr) -> Option<usize> {
        self.map.get(key).copied()
    }

    pub fn get(&self, idx: usize) -> Option<&T> {
        self.slots.get(idx).and_then(|s| s.val.as_ref())
    }

    pub fn get_mut(&mut self, idx: usize) -> Option<&mut T> {
        self.slots.get_mut(idx).and_then(|s| s.val.as_mut())
    }

    /// The client address of a live slot.
    #[cfg(test)]
    pub fn key(&self, idx: usize) -> Option<SocketAddr> {
        self.slots
            .get(idx)
            .filter(|s| s.val.is_some())
            .map(|s| s.key)
    }

    fn unlink(&mut self, idx: usize) {
        let (prev, next) = (self.slots[idx].prev, self.slots[idx].next);
        match prev {
            NIL => self.head = next,
            p => self.slots[p].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.slots[n].prev = prev,
        }
    }

    fn push_front(&mut self, idx: usize) {
        self.slots[idx].prev = NIL;
        self.slots[idx].next = self.head;
        if self.head != NIL {
            self.slots[self.head].prev = idx;
        }
        self.head = idx;
        if self.tail == NIL {
            self.tail = idx;
        }
    }

    /// Marks a flow active at `now_ms`.
    pub fn touch(&mut self, idx: usize, now_ms: u64) {
        if self.get(idx).is_none() {
            return;
        }
        self.slots[idx].last_ms = now_ms;
        if self.head != idx {
            self.unlink(idx);
            self.push_front(idx);
        }
    }

    /// Adds a flow for `key` (which must not be present). When the table is
    /// full the least recently active flow is removed first and returned.
    pub fn insert(
        &mut self,
        key: SocketAddr,
        val: T,
        now_ms: u64,
    ) -> (usize, Option<(SocketAddr, T)>) {
        debug_assert!(!self.map.contains_key(&key));
        let evicted = if self.len() >= self.cap {
            self.remove(self.tail)
        } else {
            None
        };
        let slot = Slot {
            key,
            val: Some(val),
            last_ms: now_ms,
            prev: NIL,
            next: NIL,
        };
        let idx = match self.free.pop() {
            Some(i) => {
                self.slots[i] = slot;
                i
            }
            None => {
                self.slots.push(slot);
                self.slots.len() - 1
            }
        };
        self.push_front(idx);
        self.map.insert(key, idx);
        (idx, evicted)
    }

    /// Removes a live flow.
    pub fn remove(&mut self, idx: usize) -> Option<(SocketAddr, T)> {
        let val = self.slots.get_mut(idx)?.val.take()?;
        self.unlink(idx);
        let key = self.slots[idx].key;
        self.map.remove(&key);
        self.free.push(idx);
        Some((key, val))
    }

    /// Removes and returns the least recently active flow.
    pub fn pop_lru(&mut self) -> Option<(SocketAddr, T)> {
        self.remove(self.tail)
    }

    /// Whether the table holds its cap of flows.
    pub fn is_full(&self) -> bool {
        self.len() >= self.cap
    }

    /// Removes and returns the least recently active flow if it has been
    /// idle for `idle_ms` or more at `now_ms`.
    pub fn pop_expired(&mut self, now_ms: u64, idle_ms: u64) -> Option<(SocketAddr, T)> {
        let t = self.tail;
        if t == NIL || now_ms.saturating_sub(self.slots[t].last_ms) < idle_ms {
            return None;
        }
        self.remove(t)
    }

    /// Flows from least to most recently active.
    #[cfg(test)]
    pub fn lru_order(&self) -> Vec<SocketAddr> {
        let mut out = Vec::with_capacity(self.len());
        let mut i = self.tail;
        while i != NIL {
            out.push(self.slots[i].key);
            i = self.slots[i].prev;
        }
        out
    }
}

// ---------------------------------------------------------------------------
// System-call helpers.

/// Options every socket of ours gets: drop counts on each datagram
/// (SO_RXQ_OVFL, Linux 2.6.33) and a larger receive buffer: RCVBUF bytes
/// where CAP_NET_ADMIN allows (SO_RCVBUFFORCE, while the forwarder still
/// holds it at start), else as much as net.core.rmem_max allows.
fn prepare(fd: BorrowedFd<'_>) -> io::Result<()> {
    sys::set_int_option(fd, libc::SOL_SOCKET, libc::SO_RXQ_OVFL, 1)?;
    if sys::set_int_option(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, RCVBUF as i32).is_err() {
        let _ = socket2::SockRef::from(&fd).set_recv_buffer_size(RCVBUF);
    }
    Ok(())
}

/// Binds a published UDP address in the calling thread's namespace. An
/// unspecified address asks for the destination address of each datagram
/// (IP_PKTINFO / IPV6_RECVPKTINFO) so replies leave from it. IPv6 sockets
/// are IPv6-only so the IPv4 half can bind the same port. No SO_REUSEADDR:
/// for UDP it would let two sockets share the address silently.
pub fn bind(addr: SocketAddr) -> io::Result<OwnedFd> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM.cloexec(), None)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_nonblocking(true)?;
    prepare(sock.as_fd())?;
    if addr.ip().is_unspecified() {
        match addr {
            SocketAddr::V4(_) => {
                sys::set_int_option(sock.as_fd(), libc::IPPROTO_IP, libc::IP_PKTINFO, 1)?
            }
            SocketAddr::V6(_) => {
                sys::set_int_option(sock.as_fd(), libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)?
            }
        }
    }
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

/// Where replies to a client leave from: the address it wrote to and the
/// interface it came in on (kept for IPv6 link-local addresses).
use crate::sys::PktInfo as Local;

/// Reads and discards what is queued on a socket that is being closed;
/// returns how many datagrams there were (at most `limit`).
fn drain(fd: BorrowedFd<'_>, limit: u64) -> u64 {
    let mut n = 0;
    while n < limit {
        if let Err(e) = sys::recv_discard(fd) {
            if e.raw_os_error() == Some(libc::ECONNREFUSED) {
                continue; // a pending ICMP error, not a datagram
            }
            break;
        }
        n += 1;
    }
    n
}

// ---------------------------------------------------------------------------
// The relay.

enum FlowState {
    /// Waiting for the child socket; datagrams that came meanwhile.
    Dialing(Vec<Vec<u8>>),
    Ready {
        sock: OwnedFd,
        drops: DropCounter,
    },
}

struct Flow {
    /// Matches a dial's answer to the flow that asked (slots are reused).
    id: u64,
    /// The client's address in kernel form, for sendmmsg.
    client: SockAddr,
    /// The address the client wrote to (unspecified listeners only).
    local: Option<Local>,
    state: FlowState,
    /// The flow's slot of the shared `--max-connections` budget, given back
    /// when the flow is dropped.
    slot: OwnedSemaphorePermit,
}

type DialResult = (usize, u64, Result<(OwnedFd, SocketAddr), DialFailure>);

struct Relay {
    parent: OwnedFd,
    addr: SocketAddr,
    /// Replies need an explicit source address.
    pktinfo: bool,
    spec: PortSpec,
    dialer: Arc<dyn Dial>,
    opts: UdpOptions,
    stats: Arc<UdpStats>,
    /// The budget shared with TCP connections (`--max-connections`).
    slots: Arc<Semaphore>,
    ep: AsyncFd<sys::EpollFd>,
    flows: FlowTable<Flow>,
    batch: Box<Batch>,
    parent_drops: DropCounter,
    next_id: u64,
    started: Instant,
    dial_tx: mpsc::UnboundedSender<DialResult>,
    last_warn: Option<Instant>,
    suppressed: u64,
}

/// Serves one published UDP address until the task is aborted. `sock` is
/// from [`bind`]; each flow holds one permit of `slots`, the budget shared
/// with TCP connections.
pub async fn serve(
    sock: OwnedFd,
    addr: SocketAddr,
    spec: PortSpec,
    stats: Arc<UdpStats>,
    dialer: Arc<dyn Dial>,
    opts: UdpOptions,
    slots: Arc<Semaphore>,
) {
    let (dial_tx, mut dial_rx) = mpsc::unbounded_channel();
    let mut relay = match Relay::new(sock, addr, spec, stats, dialer, opts, slots, dial_tx) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(%addr, error = %e, "cannot start the UDP relay");
            return;
        }
    };
    let tick = (opts.idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut timer = tokio::time::interval(tick);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut events = [EpollEvent::empty(); 64];
    loop {
        tokio::select! {
            biased;
            Some(r) = dial_rx.recv() => relay.dialed(r),
            _ = timer.tick() => relay.tick(),
            ready = relay.ep.readable() => {
                let mut guard = match ready {
                    Ok(g) => g,
                    Err(e) => {
                        tracing::error!(%addr, error = %e, "UDP relay stopped");
                        return;
                    }
                };
                match relay.ep.get_ref().0.wait(&mut events, 0u8) {
                    Ok(0) => guard.clear_ready(),
                    Ok(n) => {
                        let now = relay.now_ms();
                        for ev in &events[..n] {
                            match ev.data() {
                                PARENT => relay.relay_clients(now),
                                idx => relay.relay_replies(idx as usize, now),
                            }
                        }
                    }
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => {
                        tracing::error!(%addr, error = %e, "epoll_wait failed; UDP relay stopped");
                        return;
                    }
                }
            }
        }
    }
}

impl Relay {
    #[allow(clippy::too_many_arguments)]
    fn new(
        parent: OwnedFd,
        addr: SocketAddr,
        spec: PortSpec,
        stats: Arc<UdpStats>,
        dialer: Arc<dyn Dial>,
        opts: UdpOptions,
        slots: Arc<Semaphore>,
        dial_tx: mpsc::UnboundedSender<DialResult>,
    ) -> io::Result<Relay> {
        let ep = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io::Error::from)?;
        ep.add(&parent, EpollEvent::new(EpollFlags::EPOLLIN, PARENT))
            .map_err(io::Error::from)?;
        let ep = sys::async_fd(sys::EpollFd(ep), Interest::READABLE)?;
        Ok(Relay {
            pktinfo: addr.ip().is_unspecified(),
            parent,
            addr,
            spec,
            dialer,
            opts,
            stats,
            slots,
            ep,
            flows: FlowTable::new(opts.max_flows),
            batch: Box::new(Batch::new(BATCH, BUF)),
            parent_drops: DropCounter::default(),
            next_id: 1,
            started: Instant::now(),
            dial_tx,
            last_warn: None,
            suppressed: 0,
        })
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Logs at most one warning a second; counts the rest.
    fn warn(&mut self, what: &str, why: &dyn std::fmt::Display) {
        let now = Instant::now();
        if self
            .last_warn
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return;
        }
        self.last_warn = Some(now);
        let suppressed = std::mem::take(&mut self.suppressed);
        tracing::warn!(addr = %self.addr, spec = %self.spec, suppressed, "{what}: {why}");
    }

    /// Datagrams from clients: one batch from the parent socket.
    fn relay_clients(&mut self, now: u64) {
        let n = match self.batch.recv(self.parent.as_raw_fd()) {
            Ok(n) => n,
            Err(e) => {
                // ICMP errors for replies we sent land here; nothing lost.
                if e.raw_os_error() != Some(libc::ECONNREFUSED) {
                    self.warn("receiving on the published socket failed", &e);
                }
                return;
            }
        };
        let mut i = 0;
        while i < n {
            let anc = self.batch.ancillary(i);
            if let Some(d) = anc.drops {
                let new = self.parent_drops.update(d);
                self.stats.lost(Loss::RxQueueOverflow, new);
            }
            let Some(src) = self.batch.source(i) else {
                i += 1;
                continue;
            };
            if self.batch.truncated(i) {
                self.stats.lost(Loss::Oversize, 1);
                i += 1;
                continue;
            }
            let idx = match self.flows.find(&src) {
                Some(idx) => idx,
                None => {
                    self.new_flow(src, anc.local, now);
                    match self.flows.find(&src) {
                        Some(idx) => idx,
                        None => {
                            i += 1;
                            continue;
                        }
                    }
                }
            };
            self.flows.touch(idx, now);
            // The run of datagrams from the same client that follow.
            let mut end = i + 1;
            while end < n && !self.batch.truncated(end) && self.batch.source(end) == Some(src) {
                if let Some(d) = self.batch.ancillary(end).drops {
                    let new = self.parent_drops.update(d);
                    self.stats.lost(Loss::RxQueueOverflow, new);
                }
                end += 1;
            }
            if let Some(flow) = self.flows.get_mut(idx) {
                if anc.local.is_some() {
                    flow.local = anc.local;
                }
            }
            self.send_to_child(idx, i..end);
            i = end;
        }
    }

    /// Sends datagrams `range` of the batch to flow `idx`'s child socket,
    /// or queues them while it dials.
    fn send_to_child(&mut self, idx: usize, range: std::ops::Range<usize>) {
        let Some(flow) = self.flows.get_mut(idx) else {
            return;
        };
        match &mut flow.state {
            FlowState::Dialing(pending) => {
                for i in range {
                    if pending.len() < DIAL_BACKLOG {
                        pending.push(self.batch.data(i).to_vec());
                    } else {
                        self.stats.lost(Loss::DialBacklog, 1);
                    }
                }
            }
            FlowState::Ready { sock, .. } => {
                let fd = sock.as_raw_fd();
                let mut start = range.start;
                let mut retried = false;
                while start < range.end {
                    let (sent, err) = self.batch.send(fd, start..range.end, None, None);
                    let bytes: usize = (start..start + sent).map(|i| self.batch.len(i)).sum();
                    self.stats.delivered(0, sent as u64, bytes as u64);
                    start += sent;
                    let Some(e) = err else { break };
                    match e.raw_os_error() {
                        // An earlier datagram's ICMP port unreachable,
                        // reported on this send, which did not happen:
                        // count the earlier one and send this one again.
                        Some(libc::ECONNREFUSED) if !retried => {
                            self.stats.lost(Loss::Unreachable, 1);
                            retried = true;
                        }
                        Some(libc::EMSGSIZE) => {
                            self.stats.lost(Loss::Oversize, 1);
                            start += 1;
                        }
                        _ => {
                            self.stats.lost(Loss::SendError, 1);
                            start += 1;
                            self.warn("sending to the child failed", &e);
                        }
                    }
                }
            }
        }
    }

    /// Takes the least recently active flow's slot, closing that flow as
    /// evicted.
    fn evict_lru(&mut self) -> Option<OwnedSemaphorePermit> {
        let (_, old) = self.flows.pop_lru()?;
        self.stats.evictions.fetch_add(1, Relaxed);
        Some(self.close(old, Loss::Evicted))
    }

    /// Creates the flow of a new client and starts its dial. It needs a
    /// slot of the shared budget: a free one, else the least recently
    /// active flow's (evicted); with neither the datagram that asked is
    /// dropped as `no_slot`. Never waits.
    fn new_flow(&mut self, client: SocketAddr, local: Option<Local>, now: u64) {
        let slot = if self.flows.is_full() {
            self.evict_lru()
        } else {
            None
        };
        let slot = match slot {
            Some(s) => s,
            None => match self.slots.clone().try_acquire_owned() {
                Ok(s) => s,
                Err(_) => match self.evict_lru() {
                    Some(s) => s,
                    None => {
                        self.stats.lost(Loss::NoSlot, 1);
                        self.warn(
                            "connection limit reached, datagram from a new client dropped",
                            &"every slot of --max-connections is taken and this port has no flow to evict",
                        );
                        return;
                    }
                },
            },
        };
        let id = self.next_id;
        self.next_id += 1;
        let flow = Flow {
            id,
            client: SockAddr::from(client),
            local,
            state: FlowState::Dialing(Vec::with_capacity(4)),
            slot,
        };
        let (idx, evicted) = self.flows.insert(client, flow, now);
        if let Some((_, old)) = evicted {
            // Not reached: a full table was made room in above.
            self.stats.evictions.fetch_add(1, Relaxed);
            drop(self.close(old, Loss::Evicted));
        }
        let (dialer, spec, tx) = (self.dialer.clone(), self.spec.clone(), self.dial_tx.clone());
        let ipv6 = self.addr.is_ipv6();
        let source_ip = self.opts.source_ip;
        tokio::spawn(async move {
            let req = DialRequest {
                bind_port: None,
                spec: &spec,
                ipv6_listener: ipv6,
                source: source_ip.then_some(client),
            };
            let r = match tokio::time::timeout(DIAL_TIMEOUT, dialer.udp(req)).await {
                Ok(r) => r,
                Err(_) => Err(DialFailure {
                    errno: Some(libc::ETIMEDOUT),
                    message: format!("timed out after {DIAL_TIMEOUT:?}"),
                }),
            };
            let _ = tx.send((idx, id, r));
        });
    }

    /// A dial answered: start the flow, or drop what waited for it.
    fn dialed(&mut self, (idx, id, result): DialResult) {
        let ours = matches!(self.flows.get(idx), Some(f) if f.id == id);
        if !ours {
            // Evicted or expired meanwhile; the socket is closed.
            if let Ok((sock, _)) = &result {
                self.closed(sock.as_fd());
            }
            return;
        }
        match result {
            Ok((sock, _reached)) => {
                let _ = prepare(sock.as_fd());
                if let Err(e) = self
                    .ep
                    .get_ref()
                    .0
                    .add(&sock, EpollEvent::new(EpollFlags::EPOLLIN, idx as u64))
                {
                    self.dial_failed(idx, &format!("epoll: {e}"));
                    return;
                }
                self.stats.flows.fetch_add(1, Relaxed);
                self.stats.flows_total.fetch_add(1, Relaxed);
                let Some(flow) = self.flows.get_mut(idx) else {
                    return;
                };
                let pending = match std::mem::replace(
                    &mut flow.state,
                    FlowState::Ready {
                        sock,
                        drops: DropCounter::default(),
                    },
                ) {
                    FlowState::Dialing(p) => p,
                    FlowState::Ready { .. } => Vec::new(),
                };
                let FlowState::Ready { sock, .. } = &flow.state else {
                    return;
                };
                for d in pending {
                    if let Err(e) = sys::send_nonblocking(sock.as_fd(), &d) {
                        let why = if e.raw_os_error() == Some(libc::EMSGSIZE) {
                            Loss::Oversize
                        } else {
                            Loss::SendError
                        };
                        self.stats.lost(why, 1);
                    } else {
                        self.stats.delivered(0, 1, d.len() as u64);
                    }
                }
            }
            Err(f) => self.dial_failed(idx, &f.message),
        }
    }

    fn dial_failed(&mut self, idx: usize, why: &str) {
        self.stats.dial_failures.fetch_add(1, Relaxed);
        if let Some((_, flow)) = self.flows.remove(idx) {
            if let FlowState::Dialing(p) = &flow.state {
                self.stats.lost(Loss::DialFailed, p.len() as u64);
            }
            // Dropping the flow gives its slot back.
        }
        self.warn("dial in the child failed, datagrams dropped", &why);
    }

    /// Closes a removed flow, counting what was queued for it as `why`,
    /// and returns its slot (dropping it gives it back to the budget).
    fn close(&mut self, flow: Flow, why: Loss) -> OwnedSemaphorePermit {
        let Flow { state, slot, .. } = flow;
        match state {
            FlowState::Dialing(p) => self.stats.lost(why, p.len() as u64),
            FlowState::Ready { sock, mut drops } => {
                if let Some(d) = sys::meminfo_drops(sock.as_fd()) {
                    let new = drops.update(d);
                    self.stats.lost(Loss::ChildRxQueueOverflow, new);
                }
                self.stats.lost(why, drain(sock.as_fd(), 1 << 20));
                self.stats.flows.fetch_sub(1, Relaxed);
                self.closed(sock.as_fd());
                // Dropping the socket also removes it from the epoll set.
            }
        }
        slot
    }

    /// Tells the dialer a flow socket goes (source preservation: its
    /// return rule is removed).
    fn closed(&self, sock: BorrowedFd<'_>) {
        if !self.opts.source_ip {
            return;
        }
        let s = socket2::SockRef::from(&sock);
        let (Ok(peer), Ok(local)) = (s.peer_addr(), s.local_addr()) else {
            return;
        };
        if let (Some(peer), Some(local)) = (peer.as_socket(), local.as_socket()) {
            self.dialer.udp_closed(peer, local);
        }
    }

    /// Replies from the child: one batch from flow `idx`'s socket.
    fn relay_replies(&mut self, idx: usize, now: u64) {
        let Some(flow) = self.flows.get_mut(idx) else {
            return;
        };
        let FlowState::Ready { sock, drops } = &mut flow.state else {
            return;
        };
        let fd = sock.as_raw_fd();
        let n = match self.batch.recv(fd) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                // ICMP port unreachable for a datagram we sent: nothing
                // listens at the target in the child.
                self.stats.lost(Loss::Unreachable, 1);
                return;
            }
            Err(e) => {
                self.warn("receiving from the child failed", &e);
                return;
            }
        };
        let mut newest = None;
        for i in 0..n {
            if let Some(d) = self.batch.ancillary(i).drops {
                newest = Some(d);
            }
        }
        if let Some(d) = newest {
            let new = drops.update(d);
            self.stats.lost(Loss::ChildRxQueueOverflow, new);
        }
        let (client, local) = (flow.client.clone(), flow.local);
        self.flows.touch(idx, now);
        let from = if self.pktinfo { local } else { None };
        let parent = self.parent.as_raw_fd();
        // Truncation cannot happen (buffers exceed any payload); count it
        // should the kernel say otherwise, and send the rest.
        let mut start = 0;
        while start < n {
            let mut end = start;
            while end < n && !self.batch.truncated(end) {
                end += 1;
            }
            let mut s = start;
            while s < end {
                let (sent, err) = self.batch.send(parent, s..end, Some(&client), from);
                let bytes: usize = (s..s + sent).map(|i| self.batch.len(i)).sum();
                self.stats.delivered(1, sent as u64, bytes as u64);
                s += sent;
                if let Some(e) = err {
                    let why = if e.raw_os_error() == Some(libc::EMSGSIZE) {
                        Loss::Oversize
                    } else {
                        self.warn("sending to the client failed", &e);
                        Loss::SendError
                    };
                    self.stats.lost(why, 1);
                    s += 1;
                }
            }
            if end < n {
                self.stats.lost(Loss::Oversize, 1);
                end += 1;
            }
            start = end;
        }
    }

    /// Timer: expire idle flows, catch up on receive-queue drops.
    fn tick(&mut self) {
        let now = self.now_ms();
        let idle = self.opts.idle_timeout.as_millis() as u64;
        while let Some((_, flow)) = self.flows.pop_expired(now, idle) {
            if matches!(flow.state, FlowState::Ready { .. }) {
                self.stats.expirations.fetch_add(1, Relaxed);
            }
            drop(self.close(flow, Loss::Expired));
        }
        if let Some(d) = sys::meminfo_drops(self.parent.as_fd()) {
            let new = self.parent_drops.update(d);
            self.stats.lost(Loss::RxQueueOverflow, new);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn lru_order_follows_activity() {
        let mut t = FlowTable::new(8);
        for p in 1..=4 {
            t.insert(a(p), p, p as u64);
        }
        assert_eq!(t.lru_order(), vec![a(1), a(2), a(3), a(4)]);
        let i2 = t.find(&a(2)).unwrap();
        t.touch(i2, 10);
        assert_eq!(t.lru_order(), vec![a(1), a(3), a(4), a(2)]);
        let i1 = t.find(&a(1)).unwrap();
        t.touch(i1, 11);
        assert_eq!(t.lru_order(), vec![a(3), a(4), a(2), a(1)]);
        // Touching the most recent one changes nothing.
        t.touch(i1, 12);
        assert_eq!(t.lru_order(), vec![a(3), a(4), a(2), a(1)]);
        assert_eq!(t.remove(t.find(&a(4)).unwrap()), Some((a(4), 4)));
        assert_eq!(t.lru_order(), vec![a(3), a(2), a(1)]);
        assert_eq!(t.len(), 3);
        assert_eq!(t.find(&a(4)), None);
    }

    #[test]
    fn the_cap_evicts_the_least_recently_active() {
        let mut t = FlowTable::new(3);
        for p in 1..=3 {
            let (_, ev) = t.insert(a(p), p, p as u64);
            assert!(ev.is_none());
        }
        // Flow 1 is used again: flow 2 is now the least recently active.
        t.touch(t.find(&a(1)).unwrap(), 5);
        let (idx, ev) = t.insert(a(4), 4, 6);
        assert_eq!(ev, Some((a(2), 2)));
        assert_eq!(t.len(), 3);
        // The freed slot is reused: no growth beyond the cap.
        assert!(idx < 3, "{idx}");
        assert_eq!(t.get(idx), Some(&4));
        assert_eq!(t.key(idx), Some(a(4)));
        let (_, ev) = t.insert(a(5), 5, 7);
        assert_eq!(ev, Some((a(3), 3)));
        assert_eq!(t.lru_order(), vec![a(1), a(4), a(5)]);
        assert!(t.slots.len() <= 3);
    }

    #[test]
    fn expiry_takes_only_idle_flows_oldest_first() {
        let mut t = FlowTable::new(10);
        t.insert(a(1), 1, 0);
        t.insert(a(2), 2, 100);
        t.insert(a(3), 3, 200);
        t.touch(t.find(&a(1)).unwrap(), 250);
        // idle timeout 100 ms at t=260: flows 2 (160 ms idle) and 3 (60
        // ms)... only 2 qualifies; 1 was touched at 250.
        assert_eq!(t.pop_expired(260, 100), Some((a(2), 2)));
        assert_eq!(t.pop_expired(260, 100), None);
        assert_eq!(t.pop_expired(300, 100), Some((a(3), 3)));
        assert_eq!(t.pop_expired(349, 100), None);
        assert_eq!(t.pop_expired(350, 100), Some((a(1), 1)));
        assert_eq!(t.len(), 0);
        assert_eq!(t.pop_expired(u64::MAX, 0), None);
    }

    #[test]
    fn a_full_table_churns_without_growing() {
        let mut t = FlowTable::new(100);
        for p in 0..10_000u16 {
            let now = p as u64;
            match t.find(&a(p % 150)) {
                Some(i) => t.touch(i, now),
                None => {
                    t.insert(a(p % 150), p, now);
                }
            }
            assert!(t.len() <= 100);
        }
        assert_eq!(t.len(), 100);
        assert!(t.slots.len() <= 100);
        assert_eq!(t.lru_order().len(), 100);
    }

    #[test]
    fn drop_counter_deltas_and_wraparound() {
        let mut c = DropCounter::default();
        assert_eq!(c.update(0), 0);
        assert_eq!(c.update(5), 5);
        assert_eq!(c.update(5), 0);
        // An older reading arriving late adds nothing.
        assert_eq!(c.update(3), 0);
        assert_eq!(c.update(9), 4);
        let mut c = DropCounter { last: u32::MAX - 1 };
        assert_eq!(c.update(2), 4);
    }

    #[test]
    fn snapshots_name_every_reason_and_add_up() {
        let s = UdpStats::default();
        let all = [
            Loss::RxQueueOverflow,
            Loss::ChildRxQueueOverflow,
            Loss::Oversize,
            Loss::SendError,
            Loss::Unreachable,
            Loss::Evicted,
            Loss::Expired,
            Loss::DialFailed,
            Loss::DialBacklog,
            Loss::NoSlot,
        ];
        assert_eq!(all.len(), DROP_KINDS);
        for (k, w) in all.iter().enumerate() {
            s.lost(*w, 1 << k);
        }
        s.delivered(0, 3, 300);
        s.delivered(1, 2, 20);
        let snap = s.snapshot();
        assert_eq!(snap.drops.total(), (1 << DROP_KINDS) - 1);
        let v = serde_json::to_value(snap).unwrap();
        assert_eq!(v["drops"]["rx_queue_overflow"], 1);
        assert_eq!(v["drops"]["dial_backlog"], 1 << 8);
        assert_eq!(v["drops"]["no_slot"], 1 << 9);
        assert_eq!(v["datagrams_to_child"], 3);
        assert_eq!(v["bytes_to_parent"], 20);
        let mut sum = snap;
        sum += snap;
        assert_eq!(sum.drops.total(), 2 * snap.drops.total());
        assert_eq!(sum.datagrams_to_child, 6);
    }

    /// A relay socket ([`bind`]) on `addr` and its port.
    fn bound(addr: &str) -> (OwnedFd, u16) {
        let s = bind(addr.parse().unwrap()).unwrap();
        let port = socket2::SockRef::from(&s)
            .local_addr()
            .unwrap()
            .as_socket()
            .unwrap()
            .port();
        (s, port)
    }

    #[test]
    fn batch_round_trip_on_loopback() {
        // The preallocated recvmmsg/sendmmsg headers, checked against the
        // kernel on this namespace's loopback: payloads and boundaries
        // kept, the sender's address and the destination address read back.
        let (rx, port) = bound("0.0.0.0:0");
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let dst = SocketAddr::from(([127, 0, 0, 1], port));
        let sizes = [0usize, 1, 64, 1400, MAX_PAYLOAD_V4];
        for (k, n) in sizes.iter().enumerate() {
            tx.send_to(&vec![k as u8; *n], dst).unwrap();
        }
        // Loopback delivers synchronously: everything is queued already.
        let mut b = Batch::new(BATCH, BUF);
        let n = b.recv(rx.as_raw_fd()).unwrap();
        assert_eq!(n, sizes.len());
        let mut got = Vec::new();
        for i in 0..n {
            assert!(!b.truncated(i));
            assert_eq!(b.source(i), Some(tx.local_addr().unwrap()));
            let anc = b.ancillary(i);
            assert_eq!(anc.local.map(|l| l.ip), Some(dst.ip()));
            got.push(b.data(i).to_vec());
        }
        assert_eq!(got.len(), sizes.len());
        for (k, n) in sizes.iter().enumerate() {
            assert_eq!(got[k].len(), *n);
            assert!(got[k].iter().all(|x| *x == k as u8));
        }
        // Send the batch back to the sender from the address it wrote to.
        let to = SockAddr::from(tx.local_addr().unwrap());
        let (sent, err) = b.send(
            rx.as_raw_fd(),
            0..sizes.len(),
            Some(&to),
            Some(Local {
                ip: dst.ip(),
                ifindex: 0,
            }),
        );
        assert!(err.is_none(), "{err:?}");
        assert_eq!(sent, sizes.len());
        let mut buf = vec![0u8; BUF];
        for n in sizes {
            let (len, from) = tx.recv_from(&mut buf).unwrap();
            assert_eq!((len, from), (n, dst));
        }
    }

    #[test]
    fn gso_sends_runs_as_one_packet_and_keeps_boundaries() {
        // Datagrams read into a batch, then sent on from a chosen source
        // address (packet info and segment size in one control buffer):
        // runs of one size go as one GSO packet (a receiver that asked for
        // UDP_GRO gets such a run whole, with its segment size), and a
        // plain receiver gets every datagram exactly as it was, from the
        // chosen address.
        for (any, src) in [("0.0.0.0:0", "127.0.0.2"), ("[::]:0", "::1")] {
            let (rx, port) = bound(any);
            let src: std::net::IpAddr = src.parse().unwrap();
            let dst = SocketAddr::new(src, port);
            let local = |ip: std::net::IpAddr| SocketAddr::new(ip, 0);
            let tx = std::net::UdpSocket::bind(local(src)).unwrap();
            let mut sizes = vec![1000usize; 20];
            sizes.extend([300, 0, 64, 64, 64, 64, 64, 1]);
            for (k, n) in sizes.iter().enumerate() {
                tx.send_to(&vec![k as u8; *n], dst).unwrap();
            }
            let mut b = Batch::new(BATCH, BUF);
            assert_eq!(b.recv(rx.as_raw_fd()).unwrap(), sizes.len());
            let plain = std::net::UdpSocket::bind(local(src)).unwrap();
            let gro = std::net::UdpSocket::bind(local(src)).unwrap();
            nix::sys::socket::setsockopt(&gro, nix::sys::socket::sockopt::UdpGroSegment, &true)
                .unwrap();
            let from = Some(Local {
                ip: src,
                ifindex: 0,
            });
            for to in [&plain, &gro] {
                let to = SockAddr::from(to.local_addr().unwrap());
                let (sent, err) = b.send(rx.as_raw_fd(), 0..sizes.len(), Some(&to), from);
                assert!(err.is_none(), "{err:?}");
                assert_eq!(sent, sizes.len());
                assert!(b.gso(), "the kernel refused GSO on loopback");
            }
            plain.set_nonblocking(true).unwrap();
            let mut buf = vec![0u8; BUF];
            for (k, n) in sizes.iter().enumerate() {
                let (len, from) = plain.recv_from(&mut buf).unwrap();
                assert_eq!((len, from), (*n, dst), "datagram {k}");
                assert!(buf[..len].iter().all(|x| *x == k as u8), "datagram {k}");
            }
            assert!(plain.recv(&mut buf).is_err(), "more datagrams than sent");
            // The GRO receiver: the 20 of 1000 bytes and the 300 after
            // them in one read, segment size 1000.
            assert_eq!(gro_read(&gro, &mut buf), (20 * 1000 + 300, vec![1000]));
        }
    }

    /// One read from a UDP_GRO socket: its length and segment sizes.
    fn gro_read(s: &std::net::UdpSocket, buf: &mut [u8]) -> (usize, Vec<i32>) {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, SockaddrStorage};
        let mut iov = [std::io::IoSliceMut::new(buf)];
        let mut space = nix::cmsg_space!(i32);
        let m = recvmsg::<SockaddrStorage>(
            s.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        )
        .unwrap();
        let segs = m
            .cmsgs()
            .unwrap()
            .filter_map(|c| match c {
                ControlMessageOwned::UdpGroSegments(s) => Some(s),
                _ => None,
            })
            .collect();
        (m.bytes, segs)
    }
}
