//! The relay: one task per published UDP address, owning its parent
//! socket, its flows and their sockets, its batch buffers and its epoll
//! instance (see the module above for how it works).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::socket::{setsockopt, sockopt};
use socket2::{Domain, SockAddr, SockRef, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::batch::Batch;
use super::flows::FlowTable;
use super::pace::Pacer;
use super::stats::{DropCounter, Loss, UdpStats};
use super::*;
use crate::child::dial::{Dial, DialFailure, DialRequest};
use crate::sys;
use crate::wire::spec::PortSpec;

/// Options every socket of ours gets: drop counts on each datagram
/// (SO_RXQ_OVFL, Linux 2.6.33) and a larger receive buffer: RCVBUF bytes
/// where CAP_NET_ADMIN allows (SO_RCVBUFFORCE, while the forwarder still
/// holds it at start), else as much as net.core.rmem_max allows.
fn prepare(fd: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt(&fd, sockopt::RxqOvfl, &1)?;
    if setsockopt(&fd, sockopt::RcvBufForce, &RCVBUF).is_err() {
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
            SocketAddr::V4(_) => setsockopt(&sock, sockopt::Ipv4PacketInfo, &true)?,
            SocketAddr::V6(_) => setsockopt(&sock, sockopt::Ipv6RecvPacketInfo, &true)?,
        }
    }
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

/// Where replies to a client leave from: the address it wrote to and the
/// interface it came in on (kept for IPv6 link-local addresses).
use super::batch::PktInfo as Local;

/// Reads and discards what is queued on a socket that is being closed;
/// returns how many datagrams there were (at most `limit`).
fn drain(fd: BorrowedFd<'_>, limit: u64) -> u64 {
    let mut n = 0;
    while n < limit {
        // MSG_TRUNC: the datagram is dropped whole; one byte of room.
        let mut byte = [std::mem::MaybeUninit::uninit()];
        let flags = libc::MSG_DONTWAIT | libc::MSG_TRUNC;
        if let Err(e) = SockRef::from(&fd).recv_with_flags(&mut byte, flags) {
            if e.raw_os_error() == Some(libc::ECONNREFUSED) {
                continue; // a pending ICMP error, not a datagram
            }
            break;
        }
        n += 1;
    }
    n
}

/// Counts a datagram the child answered with ICMP port unreachable, on the
/// flow socket `sock`, and says so the first time for this port.
fn unreachable(stats: &UdpStats, warned: &mut bool, spec: &PortSpec, sock: BorrowedFd<'_>) {
    stats.lost(Loss::Unreachable, 1);
    if !std::mem::replace(warned, true) {
        let target = SockRef::from(&sock)
            .peer_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .map_or_else(|| "the target".to_string(), |a| a.to_string());
        tracing::warn!(%spec,
            "nothing listens at {target} in the child: its datagrams are dropped and counted as unreachable (logged once for this port)");
    }
}

// ---------------------------------------------------------------------------
// The relay.

enum FlowState {
    /// Waiting for the child socket; datagrams that came meanwhile, with
    /// the time each came.
    Dialing(Vec<(Instant, Vec<u8>)>),
    Ready {
        sock: OwnedFd,
        drops: DropCounter,
        /// Datagrams of this flow in the relay's [`Pacer`]: while there
        /// are any, later ones queue behind them.
        paced: usize,
    },
}

/// A datagram in the [`Pacer`]: for flow slot `idx` while its id is `id`.
struct PacedDatagram {
    idx: usize,
    id: u64,
    data: Vec<u8>,
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
    /// Datagrams that waited for their flow's dial, released at the pace
    /// they came.
    pacer: Pacer<PacedDatagram>,
    last_warn: Option<Instant>,
    suppressed: u64,
    /// Whether "nothing listens at the target" was logged (once a port).
    warned_unreachable: bool,
}

/// A published UDP address and what its relay works with.
pub struct Published {
    /// The parent socket, from [`bind`].
    pub sock: OwnedFd,
    /// The address it is bound to.
    pub addr: SocketAddr,
    pub spec: PortSpec,
    pub stats: Arc<UdpStats>,
    pub dialer: Arc<dyn Dial>,
    pub opts: UdpOptions,
    /// The budget shared with TCP connections: each flow holds a permit.
    pub slots: Arc<Semaphore>,
}

/// Serves one published UDP address until the task is aborted.
pub async fn serve(p: Published) {
    let (addr, opts) = (p.addr, p.opts);
    let (dial_tx, mut dial_rx) = mpsc::unbounded_channel();
    let mut relay = match Relay::new(p, dial_tx) {
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
        let due = relay.pacer.next_due();
        tokio::select! {
            biased;
            Some(r) = dial_rx.recv() => relay.dialed(r),
            () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now).into()), if due.is_some() => {
                relay.release_due();
            }
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
    fn new(p: Published, dial_tx: mpsc::UnboundedSender<DialResult>) -> io::Result<Relay> {
        let Published {
            sock: parent,
            addr,
            spec,
            stats,
            dialer,
            opts,
            slots,
        } = p;
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
            pacer: Pacer::new(),
            last_warn: None,
            suppressed: 0,
            warned_unreachable: false,
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
                let now = Instant::now();
                for i in range {
                    if pending.len() < DIAL_BACKLOG {
                        pending.push((now, self.batch.data(i).to_vec()));
                    } else {
                        self.stats.lost(Loss::DialBacklog, 1);
                    }
                }
            }
            FlowState::Ready { paced, .. } if *paced > 0 => {
                // Behind its own datagrams that are still being replayed.
                let now = Instant::now();
                for i in range {
                    if *paced < DIAL_BACKLOG {
                        *paced += 1;
                        let data = self.batch.data(i).to_vec();
                        self.pacer.push(
                            now,
                            PacedDatagram {
                                idx,
                                id: flow.id,
                                data,
                            },
                        );
                    } else {
                        self.stats.lost(Loss::DialBacklog, 1);
                    }
                }
            }
            FlowState::Ready { sock, .. } => {
                let fd = sock.as_raw_fd();
                let mut start = range.start;
                let mut retried = false;
                let mut failed = None;
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
                            unreachable(
                                &self.stats,
                                &mut self.warned_unreachable,
                                &self.spec,
                                sock.as_fd(),
                            );
                            retried = true;
                        }
                        Some(libc::EMSGSIZE) => {
                            self.stats.lost(Loss::Oversize, 1);
                            start += 1;
                        }
                        _ => {
                            self.stats.lost(Loss::SendError, 1);
                            start += 1;
                            failed = Some(e);
                        }
                    }
                }
                if let Some(e) = failed {
                    self.warn("sending to the child failed", &e);
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
                let pending = match &mut flow.state {
                    FlowState::Dialing(p) => std::mem::take(p),
                    FlowState::Ready { .. } => Vec::new(),
                };
                flow.state = FlowState::Ready {
                    sock,
                    drops: DropCounter::default(),
                    paced: pending.len(),
                };
                let id = flow.id;
                let waited = pending
                    .into_iter()
                    .map(|(at, data)| (at, PacedDatagram { idx, id, data }));
                self.pacer.release(Instant::now(), waited);
                self.release_due();
            }
            Err(f) => self.dial_failed(idx, &f.message),
        }
    }

    /// Sends the paced datagrams that are due to their flows' sockets.
    fn release_due(&mut self) {
        let now = Instant::now();
        while let Some(d) = self.pacer.pop_due(now) {
            let Some(flow) = self.flows.get_mut(d.idx).filter(|f| f.id == d.id) else {
                continue; // its flow ended and counted it
            };
            let FlowState::Ready { sock, paced, .. } = &mut flow.state else {
                continue;
            };
            *paced -= 1;
            let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
            let send = || SockRef::from(&*sock).send_with_flags(&d.data, flags);
            let mut sent = send();
            if matches!(&sent, Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED)) {
                // An earlier datagram's ICMP port unreachable, reported
                // on this send, which did not happen: count that one and
                // send this one again.
                unreachable(
                    &self.stats,
                    &mut self.warned_unreachable,
                    &self.spec,
                    sock.as_fd(),
                );
                sent = send();
            }
            match sent {
                Ok(_) => self.stats.delivered(0, 1, d.data.len() as u64),
                Err(e) => {
                    let why = match e.raw_os_error() {
                        Some(libc::EMSGSIZE) => Loss::Oversize,
                        Some(libc::ECONNREFUSED) => Loss::Unreachable,
                        _ => Loss::SendError,
                    };
                    self.stats.lost(why, 1);
                }
            }
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
            FlowState::Ready {
                sock,
                mut drops,
                paced,
            } => {
                // Its datagrams still in the pacer are skipped there.
                self.stats.lost(why, paced as u64);
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
        let FlowState::Ready { sock, drops, .. } = &mut flow.state else {
            return;
        };
        let fd = sock.as_raw_fd();
        let n = match self.batch.recv(fd) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                // ICMP port unreachable for a datagram we sent: nothing
                // listens at the target in the child.
                unreachable(
                    &self.stats,
                    &mut self.warned_unreachable,
                    &self.spec,
                    sock.as_fd(),
                );
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
    fn control_messages_survive_batches_without_them() {
        // One Batch read again and again: after reads whose datagrams
        // carried no control message, a datagram that carries one (the
        // drop count SO_RXQ_OVFL attaches once the queue overflowed) must
        // still show it. Headers whose control space shrank to what the
        // last read used would lose it.
        let (rx, port) = bound("127.0.0.1:0");
        setsockopt(&rx, sockopt::RcvBuf, &2048).unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let dst = SocketAddr::from(([127, 0, 0, 1], port));
        let mut b = Batch::new(BATCH, BUF);
        tx.send_to(b"first", dst).unwrap();
        assert_eq!(b.recv(rx.as_raw_fd()).unwrap(), 1);
        assert_eq!(b.ancillary(0).drops, None, "no drop yet");
        // Overflow the small queue, then drain what it kept.
        for _ in 0..200 {
            tx.send_to(&[7u8; 1000], dst).unwrap();
        }
        while b.recv(rx.as_raw_fd()).unwrap() > 0 {}
        tx.send_to(b"after", dst).unwrap();
        assert_eq!(b.recv(rx.as_raw_fd()).unwrap(), 1);
        assert_eq!(b.data(0), b"after");
        let drops = b.ancillary(0).drops;
        assert!(
            drops.is_some_and(|d| d > 0),
            "the drop count was lost: {drops:?}"
        );
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
