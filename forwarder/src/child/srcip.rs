//! Source address preservation: the socket dialed in the child carries the
//! client's address and port, so the container's server sees the real
//! client instead of the forwarder.
//!
//! How it works (runs in the child-side agent, the only process that holds
//! CAP_NET_ADMIN and CAP_NET_RAW for it, over the child's namespaces):
//! - **dial.** A socket made in the child (side 1) gets IP_TRANSPARENT (or
//!   IPV6_TRANSPARENT), SO_REUSEADDR and the mark [`MARK`]; it is bound to
//!   the client's address and port, then connected to the target. Setting
//!   the options needs the capabilities, binding afterwards does not: the
//!   agent also makes TCP sockets ahead with them set ([`make_transparent`])
//!   and sends them, with the child's addresses, to the forwarder, which
//!   applies [`source_for`] itself and binds and connects them (TCP only;
//!   a UDP flow also needs its return rule, so it stays with the agent).
//!   SO_REUSEADDR lets two clients with the same address and port reach
//!   different published ports (their 4-tuples differ).
//! - **the return rule.** Every packet the child sends toward a preserved
//!   client must come back to that transparent socket, never leave by the
//!   container's default route (which would lose it, or worse, send it to a
//!   real host of that address). What the child sends back is chosen by
//!   destination and port, or by mark, never by the source the server's
//!   stack picks, because a server bound to the wildcard address has no
//!   source until routing gives it one:
//!   - *TCP.* With `net.ipv4.tcp_fwmark_accept` set, the server's accepted
//!     socket takes the mark of the SYN it came from. One rule per family,
//!     `fwmark MARK lookup TABLE`, sends every packet of such a socket to
//!     [`TABLE`], which holds one route, `local default dev lo`: packets to
//!     the client's (non-local) address are delivered locally, to the
//!     transparent socket.
//!   - *Resets and ICMP errors.* A closed port has no socket to carry a
//!     mark. With `net.ipv4.fwmark_reflect` and `net.ipv6.fwmark_reflect`
//!     set, the kernel's own replies (a TCP RST, an ICMP port or host
//!     unreachable) take the mark of the packet they answer, so the same
//!     rule returns them: a closed port refuses a preserved dial at once,
//!     the IPv6 dial of an IPv4-only service falls back to IPv4 at once, and
//!     a UDP flow to a closed port learns it (the UDP socket carries the
//!     mark too). Packets that arrive from outside the child carry no mark
//!     (crossing namespaces clears it), so the container's own traffic is
//!     unchanged.
//!   - *UDP replies.* A server's UDP socket carries no per-flow mark, so
//!     each flow adds a rule `to CLIENT dport CPORT ipproto udp sport TPORT
//!     lookup T`, without a source selector: a wildcard-bound server's reply
//!     is routed before it has a source. T is a table of the target's
//!     address (one per address dialed, [`TABLE`] + 1 ...), whose one route
//!     `local default dev lo src TARGET` also picks that source, so the
//!     reply matches the connected transparent socket whatever address the
//!     server is bound to. The rule goes at the flow's expiry. (One client
//!     address and port on two targets that differ by address only gets two
//!     rules with the same selectors; the first decides the source of a
//!     wildcard server's replies for both, as the child's own routing would
//!     without a forwarder; servers bound to their address are unaffected.)
//! - **fallback.** A client address configured on an interface of the child,
//!   an IPv6 client reaching an IPv4 target (after the v6->v4 fallback), a
//!   target that is not local in the child, or a bind or rule that fails
//!   (the client's port is a listener's port there) dial as before, from the
//!   child's own address; each reason is logged once. (The child's
//!   addresses are read at most twice a second, not at every dial.)
//! - **teardown.** On exit the agent removes its rules and routes and puts
//!   the sysctls back. A run killed with SIGKILL leaves them; every next
//!   start, with or without source preservation, removes whatever rule
//!   points at one of our tables and those tables' routes
//!   ([`clean_stale`]), and puts back the sysctls the mark rules say that
//!   run had switched on.
//!
//! Needs Linux 4.17 for rules matching ports and protocol (UDP flows);
//! `fwmark_reflect` is older (3.16).

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Mutex;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage, RulePortRange};
use netlink_packet_route::{AddressFamily, IpProtocol, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr as NlAddr};

/// The routing table of our own in the child (an arbitrary number that no
/// distribution uses; "fwdr" in ASCII).
pub const TABLE: u32 = 0x6677_6472;
/// How many target addresses get a UDP return table ([`TABLE`] + 1 to
/// [`TABLE`] + this); flows to further addresses are not preserved.
const TARGET_TABLES: u32 = 256;
/// The mark on transparent sockets and on the server's accepted ones.
pub const MARK: u32 = 0x6677_6472;
/// Priority of the mark rules (before `main` at 32766).
const PRIO_MARK: u32 = 16_100;
/// Priority of the UDP per-flow rules.
const PRIO_FLOW: u32 = 16_101;

/// A sysctl of the child that source preservation switches on, and the bit
/// that says so in the mark rules' protocol ([`PROTO_BASE`]).
struct Sysctl {
    path: &'static str,
    bit: u8,
}

const FWMARK_ACCEPT: Sysctl = Sysctl {
    path: "/proc/sys/net/ipv4/tcp_fwmark_accept",
    bit: 1,
};
const REFLECT4: Sysctl = Sysctl {
    path: "/proc/sys/net/ipv4/fwmark_reflect",
    bit: 2,
};
const REFLECT6: Sysctl = Sysctl {
    path: "/proc/sys/net/ipv6/fwmark_reflect",
    bit: 4,
};
static SYSCTLS: [Sysctl; 3] = [FWMARK_ACCEPT, REFLECT4, REFLECT6];

/// The protocol (who installed it) on the mark rules is this plus the bits
/// of the sysctls this run switched on (they were 0): a run killed with
/// SIGKILL leaves the rules, and the next start reads from them which
/// sysctls to put back.
const PROTO_BASE: u8 = 0xe8;
/// What an older release wrote when it had switched `tcp_fwmark_accept` on.
const PROTO_LEGACY_FWMARK_ACCEPT: u8 = 0xf6;

/// Why source preservation cannot be switched on in this child.
#[derive(Debug, thiserror::Error)]
pub enum SourceIpError {
    #[error("netlink: {0} (policy routing in the child needs CAP_NET_ADMIN there)")]
    Netlink(io::Error),
    #[error("cannot set {0}: {1} (needs CAP_NET_ADMIN over the child's network namespace)")]
    Sysctl(&'static str, io::Error),
    #[error("IP_TRANSPARENT: {0} (needs CAP_NET_RAW or CAP_NET_ADMIN in the child)")]
    Transparent(io::Error),
}

/// A NETLINK_ROUTE socket in this thread's network namespace, used
/// synchronously (each request waits for its acknowledgement).
struct Netlink {
    sock: Socket,
    seq: u32,
}

impl Netlink {
    fn open() -> io::Result<Netlink> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&NlAddr::new(0, 0))?;
        Ok(Netlink { sock, seq: 0 })
    }

    /// Sends one request and collects the messages of the answer until the
    /// acknowledgement (or the end of a dump).
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        self.sock.send(&buf, 0)?;
        let mut out = Vec::new();
        loop {
            let (data, _) = self.sock.recv_from_full()?;
            let mut off = 0;
            while off < data.len() {
                let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[off..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = m.header.length as usize;
                if len == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "empty netlink message",
                    ));
                }
                off += len;
                if m.header.sequence_number != self.seq {
                    continue;
                }
                match m.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(out),
                            Some(_) => Err(e.to_io()),
                        }
                    }
                    NetlinkPayload::InnerMessage(i) => out.push(i),
                    _ => {}
                }
            }
        }
    }

    /// A request that creates, and fails if it exists already.
    fn create(&mut self, msg: RouteNetlinkMessage) -> io::Result<()> {
        self.request(msg, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)
            .map(drop)
    }

    /// A request that deletes; gone already is fine.
    fn delete(&mut self, msg: RouteNetlinkMessage) -> io::Result<()> {
        self.request(msg, NLM_F_ACK)
            .map(drop)
            .or_else(|e| ignore(e, &[libc::ENOENT, libc::ESRCH]))
    }
}

fn family(ip: IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

/// Whether `table` is one of ours.
fn is_ours(table: u32) -> bool {
    (TABLE..=TABLE + TARGET_TABLES).contains(&table)
}

fn mark_rule(fam: AddressFamily, switched_on: u8) -> RuleMessage {
    let mut r = RuleMessage::default();
    r.header.family = fam;
    r.header.action = RuleAction::ToTable;
    r.attributes = vec![
        RuleAttribute::Protocol(RouteProtocol::from(PROTO_BASE | switched_on)),
        RuleAttribute::Priority(PRIO_MARK),
        RuleAttribute::FwMark(MARK),
        RuleAttribute::FwMask(u32::MAX),
        RuleAttribute::Table(TABLE),
    ];
    r
}

/// Which sysctls a mark rule says its run switched on.
fn switched_on(r: &RuleMessage) -> u8 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Protocol(p) => Some(u8::from(*p)),
            _ => None,
        })
        .map_or(0, |p| match p {
            PROTO_LEGACY_FWMARK_ACCEPT => FWMARK_ACCEPT.bit,
            p if p & !7 == PROTO_BASE => p & 7,
            _ => 0,
        })
}

/// The rule that returns a UDP flow's replies to the table of its target:
/// to the client, from the target's port, UDP only. No source selector: a
/// wildcard-bound server's reply has none when it is routed.
fn flow_rule(target: SocketAddr, client: SocketAddr, table: u32) -> RuleMessage {
    let mut r = RuleMessage::default();
    r.header.family = family(target.ip());
    r.header.dst_len = if target.is_ipv4() { 32 } else { 128 };
    r.header.action = RuleAction::ToTable;
    let port = |p| RulePortRange { start: p, end: p };
    r.attributes = vec![
        RuleAttribute::Priority(PRIO_FLOW),
        RuleAttribute::Destination(client.ip()),
        RuleAttribute::IpProtocol(IpProtocol::Udp),
        RuleAttribute::SourcePortRange(port(target.port())),
        RuleAttribute::DestinationPortRange(port(client.port())),
        RuleAttribute::Table(table),
    ];
    r
}

/// `local default dev lo [src SOURCE] table TABLE`: everything routed by
/// the table is delivered in the child, from `source` where the sender
/// has not bound one.
fn local_route(fam: AddressFamily, lo: u32, table: u32, source: Option<IpAddr>) -> RouteMessage {
    let mut r = RouteMessage::default();
    r.header.address_family = fam;
    r.header.table = RouteHeader::RT_TABLE_UNSPEC;
    r.header.protocol = RouteProtocol::Static;
    r.header.scope = RouteScope::Host;
    r.header.kind = RouteType::Local;
    let dst = if fam == AddressFamily::Inet {
        RouteAddress::Inet(Ipv4Addr::UNSPECIFIED)
    } else {
        RouteAddress::Inet6(Ipv6Addr::UNSPECIFIED)
    };
    r.attributes = vec![
        RouteAttribute::Table(table),
        RouteAttribute::Destination(dst),
        RouteAttribute::Oif(lo),
    ];
    if let Some(src) = source {
        let src = match src {
            IpAddr::V4(a) => RouteAddress::Inet(a),
            IpAddr::V6(a) => RouteAddress::Inet6(a),
        };
        r.attributes.push(RouteAttribute::PrefSource(src));
    }
    r
}

fn ignore(err: io::Error, ok: &[i32]) -> io::Result<()> {
    match err.raw_os_error() {
        Some(e) if ok.contains(&e) => Ok(()),
        _ => Err(err),
    }
}

fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

/// What [`clean`] found.
#[derive(Debug, Default)]
struct Cleaned {
    /// Rules and routes removed.
    removed: usize,
    /// The sysctls the removed mark rules say their run switched on.
    switched_on: u8,
}

/// Removes every rule that points at one of our tables and those tables'
/// routes: what a forwarder killed with SIGKILL left behind, or what
/// [`Routing`] installed.
fn clean(nl: &mut Netlink) -> io::Result<Cleaned> {
    let mut done = Cleaned::default();
    for fam in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut q = RuleMessage::default();
        q.header.family = fam;
        for m in nl.request(RouteNetlinkMessage::GetRule(q), NLM_F_DUMP)? {
            let RouteNetlinkMessage::NewRule(r) = m else {
                continue;
            };
            let ours = r
                .attributes
                .iter()
                .any(|a| matches!(a, RuleAttribute::Table(t) if is_ours(*t)));
            if ours {
                done.switched_on |= switched_on(&r);
                nl.delete(RouteNetlinkMessage::DelRule(r))?;
                done.removed += 1;
            }
        }
        let mut q = RouteMessage::default();
        q.header.address_family = fam;
        for m in nl.request(RouteNetlinkMessage::GetRoute(q), NLM_F_DUMP)? {
            let RouteNetlinkMessage::NewRoute(r) = m else {
                continue;
            };
            if is_ours(route_table(&r)) {
                nl.delete(RouteNetlinkMessage::DelRoute(r))?;
                done.removed += 1;
            }
        }
    }
    Ok(done)
}

/// Puts back to 0 the sysctls in `bits`.
fn switch_off(bits: u8) -> Result<(), SourceIpError> {
    for s in SYSCTLS.iter().filter(|s| bits & s.bit != 0) {
        std::fs::write(s.path, "0").map_err(|e| SourceIpError::Sysctl(s.path, e))?;
    }
    Ok(())
}

/// Removes what an earlier run's source preservation left in this thread's
/// network namespace (after a SIGKILL): rules, routes and the sysctls it
/// had switched on. For a start that does not preserve source addresses;
/// [`Routing::install`] does the same first. Returns how many rules and
/// routes it removed.
pub fn clean_stale() -> Result<usize, SourceIpError> {
    let mut nl = Netlink::open().map_err(SourceIpError::Netlink)?;
    let done = clean(&mut nl).map_err(SourceIpError::Netlink)?;
    switch_off(done.switched_on)?;
    Ok(done.removed)
}

fn lo_index() -> u32 {
    nix::net::if_::if_nametoindex("lo").unwrap_or(1)
}

/// The UDP flows' return rules: one per client and target, counted (two
/// published ports may reach one target from one client).
type Flows = HashMap<(SocketAddr, SocketAddr), usize>;

/// The netlink socket and what was installed through it.
struct Installed {
    nl: Netlink,
    /// The table of each target address that has had a UDP flow.
    targets: HashMap<IpAddr, u32>,
    flows: Flows,
}

/// The policy routing installed in the child while source preservation is
/// on; removed when dropped.
pub struct Routing {
    inner: Mutex<Installed>,
    /// The sysctls this run switched on, with what they were.
    restore: Mutex<Vec<(&'static Sysctl, String)>>,
}

/// Why a UDP flow's return rule was not added.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    #[error("more than {TARGET_TABLES} target addresses")]
    TooManyTargets,
    #[error("netlink: {0}")]
    Netlink(#[from] io::Error),
}

impl Routing {
    /// Cleans what an earlier run left, then installs the mark rules and
    /// the local routes (IPv6 only where the child has IPv6) and sets the
    /// sysctls. Fails, with everything undone, when the child does not
    /// permit it.
    pub fn install() -> Result<Routing, SourceIpError> {
        let mut nl = Netlink::open().map_err(SourceIpError::Netlink)?;
        let stale = clean(&mut nl).map_err(SourceIpError::Netlink)?;
        // A killed run had switched them on: back to what they were first.
        switch_off(stale.switched_on)?;
        if stale.removed > 0 {
            tracing::info!(
                removed = stale.removed,
                "removed the source-address routing an earlier run left in the child"
            );
        }
        let ipv6 = std::path::Path::new("/proc/sys/net/ipv6").exists();
        let routing = Routing {
            inner: Mutex::new(Installed {
                nl,
                targets: HashMap::new(),
                flows: HashMap::new(),
            }),
            restore: Mutex::new(Vec::new()),
        };
        // From here, dropping `routing` undoes what is done.
        let mut on = 0u8;
        for s in SYSCTLS.iter().filter(|s| ipv6 || s.bit != REFLECT6.bit) {
            let was =
                std::fs::read_to_string(s.path).map_err(|e| SourceIpError::Sysctl(s.path, e))?;
            if was.trim() != "1" {
                std::fs::write(s.path, "1").map_err(|e| SourceIpError::Sysctl(s.path, e))?;
                on |= s.bit;
                if let Ok(mut r) = routing.restore.lock() {
                    r.push((s, was.trim().to_string()));
                }
            }
        }
        let lo = lo_index();
        let mut fams = vec![AddressFamily::Inet];
        if ipv6 {
            fams.push(AddressFamily::Inet6);
        }
        if let Ok(mut inner) = routing.inner.lock() {
            for fam in fams {
                inner
                    .nl
                    .create(RouteNetlinkMessage::NewRoute(local_route(
                        fam, lo, TABLE, None,
                    )))
                    .map_err(SourceIpError::Netlink)?;
                inner
                    .nl
                    .create(RouteNetlinkMessage::NewRule(mark_rule(fam, on)))
                    .map_err(SourceIpError::Netlink)?;
            }
        }
        Ok(routing)
    }

    /// Adds the return rule of one UDP flow (and its target's table the
    /// first time).
    pub fn add_flow(&self, target: SocketAddr, client: SocketAddr) -> Result<(), FlowError> {
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?;
        if let Some(n) = inner.flows.get_mut(&(client, target)) {
            *n += 1;
            return Ok(());
        }
        let table = match inner.targets.get(&target.ip()) {
            Some(t) => *t,
            None => {
                let n = u32::try_from(inner.targets.len()).unwrap_or(u32::MAX);
                if n >= TARGET_TABLES {
                    return Err(FlowError::TooManyTargets);
                }
                let table = TABLE + 1 + n;
                let route = local_route(family(target.ip()), lo_index(), table, Some(target.ip()));
                inner
                    .nl
                    .create(RouteNetlinkMessage::NewRoute(route))
                    .or_else(|e| ignore(e, &[libc::EEXIST]))?;
                inner.targets.insert(target.ip(), table);
                table
            }
        };
        inner
            .nl
            .create(RouteNetlinkMessage::NewRule(flow_rule(
                target, client, table,
            )))
            .or_else(|e| ignore(e, &[libc::EEXIST]))?;
        inner.flows.insert((client, target), 1);
        Ok(())
    }

    /// Removes the return rule of one UDP flow (when no other flow uses it).
    pub fn remove_flow(&self, target: SocketAddr, client: SocketAddr) -> io::Result<()> {
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?;
        match inner.flows.get_mut(&(client, target)) {
            Some(n) if *n > 1 => {
                *n -= 1;
                return Ok(());
            }
            Some(_) => {}
            None => return Ok(()),
        }
        inner.flows.remove(&(client, target));
        let Some(&table) = inner.targets.get(&target.ip()) else {
            return Ok(());
        };
        inner.nl.delete(RouteNetlinkMessage::DelRule(flow_rule(
            target, client, table,
        )))
    }

    /// Removes the rules and the routes and puts the sysctls back. Dials
    /// after this go out with the client's address but their replies are
    /// not returned: call it at exit only.
    pub fn teardown(&self) {
        if let Ok(mut inner) = self.inner.lock() {
            if let Err(e) = clean(&mut inner.nl) {
                tracing::warn!(error = %e, "cannot remove the source-address routing in the child");
            }
            inner.flows.clear();
            inner.targets.clear();
        }
        if let Ok(mut restore) = self.restore.lock() {
            for (s, was) in restore.drain(..) {
                let _ = std::fs::write(s.path, was);
            }
        }
    }
}

impl Drop for Routing {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// The addresses configured on the child's interfaces (this thread's
/// namespace).
pub fn local_addresses() -> HashSet<IpAddr> {
    let mut set = HashSet::new();
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            let Some(s) = a.address else { continue };
            if let Some(v4) = s.as_sockaddr_in() {
                set.insert(IpAddr::V4(v4.ip()));
            } else if let Some(v6) = s.as_sockaddr_in6() {
                set.insert(IpAddr::V6(v6.ip()));
            }
        }
    }
    set
}

/// Why a dial does not carry the client's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// The client's address is configured in the child.
    LocalClient,
    /// An IPv6 client, an IPv4 target (or the reverse).
    Family,
    /// The target is not an address of the child: its replies could not
    /// be told from the container's other traffic.
    RemoteTarget,
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Skip::LocalClient => "the client's address is an address of the child",
            Skip::Family => "the client's address family differs from the dialed address's",
            Skip::RemoteTarget => "the dialed address is not an address of the child",
        })
    }
}

/// The source to bind for a dial of `target` by `client`, or why none.
pub fn source_for(
    client: SocketAddr,
    target: SocketAddr,
    local: &HashSet<IpAddr>,
) -> Result<SocketAddr, Skip> {
    let client = SocketAddr::new(client.ip().to_canonical(), client.port());
    if client.is_ipv4() != target.is_ipv4() {
        return Err(Skip::Family);
    }
    if local.contains(&client.ip()) {
        return Err(Skip::LocalClient);
    }
    if !(target.ip().is_loopback() || local.contains(&target.ip())) {
        return Err(Skip::RemoteTarget);
    }
    Ok(client)
}

/// Makes `fd` (a fresh TCP or UDP socket) transparent, marks it with
/// [`MARK`] (so that its peer's answers, the kernel's resets and ICMP
/// errors included, return to it) and binds it to `source`.
pub fn bind_transparent(fd: BorrowedFd<'_>, source: SocketAddr) -> io::Result<()> {
    make_transparent(fd, source.is_ipv6())?;
    socket2::SockRef::from(&fd).bind(&source.into())
}

/// What [`bind_transparent`] does before binding: IP_TRANSPARENT (or
/// IPV6_TRANSPARENT), SO_REUSEADDR and [`MARK`]. Needs CAP_NET_ADMIN (or
/// CAP_NET_RAW) over the socket's namespace; binding the result to a
/// client's address then needs nothing, so the agent makes such sockets
/// ahead and the forwarder binds and connects them.
pub fn make_transparent(fd: BorrowedFd<'_>, ipv6: bool) -> io::Result<()> {
    let s = socket2::SockRef::from(&fd);
    if ipv6 {
        s.set_ip_transparent_v6(true)?;
    } else {
        s.set_ip_transparent_v4(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_mark(MARK)
}

/// Checks that this thread may make a socket transparent.
pub fn probe() -> Result<(), SourceIpError> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .map_err(SourceIpError::Transparent)?;
    s.set_ip_transparent_v4(true)
        .map_err(SourceIpError::Transparent)?;
    let _ = s.as_fd();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_table() {
        let local: HashSet<IpAddr> = ["127.0.0.1", "::1", "10.0.2.100"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        // (client, target, result)
        let cases: &[(&str, &str, Result<&str, Skip>)] = &[
            ("192.0.2.7:4000", "127.0.0.1:80", Ok("192.0.2.7:4000")),
            ("127.0.0.5:4000", "127.0.0.1:80", Ok("127.0.0.5:4000")),
            ("[::ffff:192.0.2.7]:9", "127.0.0.1:80", Ok("192.0.2.7:9")),
            ("[2001:db8::7]:9", "[::1]:80", Ok("[2001:db8::7]:9")),
            ("127.0.0.1:4000", "127.0.0.1:80", Err(Skip::LocalClient)),
            ("10.0.2.100:4000", "10.0.2.100:80", Err(Skip::LocalClient)),
            ("[2001:db8::7]:9", "127.0.0.1:80", Err(Skip::Family)),
            ("192.0.2.7:4000", "10.0.2.100:80", Ok("192.0.2.7:4000")),
            ("192.0.2.7:4000", "10.9.9.9:80", Err(Skip::RemoteTarget)),
        ];
        for (c, t, want) in cases {
            let got = source_for(sa(c), sa(t), &local);
            assert_eq!(got, want.map(sa), "{c} -> {t}");
        }
    }
}
