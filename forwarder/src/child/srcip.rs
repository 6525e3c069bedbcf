//! Source address preservation: the socket dialed in the child carries the
//! client's address and port, so the container's server sees the real
//! client instead of the forwarder.
//!
//! How it works (runs in the child-side agent, the only process that holds
//! CAP_NET_ADMIN and CAP_NET_RAW for it, over the child's namespaces):
//! - **dial.** A socket made in the child (side 1) gets IP_TRANSPARENT (or
//!   IPV6_TRANSPARENT), SO_REUSEADDR and, for TCP, the mark [`MARK`]; it is
//!   bound to the client's address and port, then connected to the target.
//!   SO_REUSEADDR lets two clients with the same address and port reach
//!   different published ports (their 4-tuples differ).
//! - **TCP return path.** With `net.ipv4.tcp_fwmark_accept` set in the
//!   child, the server's accepted socket takes the mark of the SYN it came
//!   from. One rule per family, `fwmark MARK lookup TABLE`, sends every
//!   packet of such a socket to [`TABLE`], which holds one route, `local
//!   default dev lo`: replies to the client's (non-local) address are
//!   delivered locally, to the transparent socket, and never leave by the
//!   container's default route. Unmarked traffic never matches.
//! - **UDP return path.** A server's UDP socket carries no per-flow mark,
//!   so each flow adds a rule `from TARGET sport TPORT to CLIENT dport CPORT
//!   ipproto udp lookup TABLE` when dialed and removes it at the flow's
//!   expiry (the socket's close): the container's own datagrams keep its
//!   default route.
//! - **fallback.** A client address configured on an interface of the child,
//!   an IPv6 client reaching an IPv4 target (after the v6->v4 fallback), a
//!   target that is not local in the child, or a bind that fails (the
//!   client's port is a listener's port there) dial as before, from the
//!   child's own address; each reason is logged once.
//! - **teardown.** On exit the agent removes its rules and route and puts
//!   `tcp_fwmark_accept` back; after a SIGKILL the next start removes
//!   whatever rule points at [`TABLE`] and the table's routes first.
//!
//! Needs Linux 4.17 for rules matching ports and protocol (UDP flows).

use std::collections::HashSet;
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
/// The mark on transparent TCP sockets and on the server's accepted ones.
pub const MARK: u32 = 0x6677_6472;
/// Priority of the TCP mark rules (before `main` at 32766).
const PRIO_MARK: u32 = 16_100;
/// Priority of the UDP per-flow rules.
const PRIO_FLOW: u32 = 16_101;

const FWMARK_ACCEPT: &str = "/proc/sys/net/ipv4/tcp_fwmark_accept";

/// The protocol (who installed it) on the mark rules when this run
/// switched `tcp_fwmark_accept` on (it was 0): a run killed with SIGKILL
/// leaves the rules, and the next start reads from them that the sysctl is
/// to be put back. Otherwise the rules say `static`.
const PROTO_SET_FWMARK_ACCEPT: u8 = 0xf6;

/// Why source preservation cannot be switched on in this child.
#[derive(Debug, thiserror::Error)]
pub enum SourceIpError {
    #[error("netlink: {0} (policy routing in the child needs CAP_NET_ADMIN there)")]
    Netlink(io::Error),
    #[error(
        "cannot set {FWMARK_ACCEPT}: {0} (needs CAP_NET_ADMIN over the child's network namespace)"
    )]
    Sysctl(io::Error),
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
}

fn family(ip: IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn mark_rule(fam: AddressFamily, set_fwmark_accept: bool) -> RuleMessage {
    let mut r = RuleMessage::default();
    r.header.family = fam;
    r.header.action = RuleAction::ToTable;
    let proto = if set_fwmark_accept {
        RouteProtocol::from(PROTO_SET_FWMARK_ACCEPT)
    } else {
        RouteProtocol::Static
    };
    r.attributes = vec![
        RuleAttribute::Protocol(proto),
        RuleAttribute::Priority(PRIO_MARK),
        RuleAttribute::FwMark(MARK),
        RuleAttribute::FwMask(u32::MAX),
        RuleAttribute::Table(TABLE),
    ];
    r
}

/// The rule that returns a UDP flow's replies: from the target to the
/// client, that protocol and those ports only.
fn flow_rule(target: SocketAddr, client: SocketAddr) -> RuleMessage {
    let mut r = RuleMessage::default();
    r.header.family = family(target.ip());
    let bits = if target.is_ipv4() { 32 } else { 128 };
    r.header.src_len = bits;
    r.header.dst_len = bits;
    r.header.action = RuleAction::ToTable;
    let port = |p| RulePortRange { start: p, end: p };
    r.attributes = vec![
        RuleAttribute::Priority(PRIO_FLOW),
        RuleAttribute::Source(target.ip()),
        RuleAttribute::Destination(client.ip()),
        RuleAttribute::IpProtocol(IpProtocol::Udp),
        RuleAttribute::SourcePortRange(port(target.port())),
        RuleAttribute::DestinationPortRange(port(client.port())),
        RuleAttribute::Table(TABLE),
    ];
    r
}

fn local_route(fam: AddressFamily, lo: u32) -> RouteMessage {
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
        RouteAttribute::Table(TABLE),
        RouteAttribute::Destination(dst),
        RouteAttribute::Oif(lo),
    ];
    r
}

fn ignore(err: io::Error, ok: &[i32]) -> io::Result<()> {
    match err.raw_os_error() {
        Some(e) if ok.contains(&e) => Ok(()),
        _ => Err(err),
    }
}

/// Removes every rule that points at [`TABLE`] and the table's routes: what
/// a forwarder killed with SIGKILL left behind, or what [`Routing`] installed.
/// Returns whether a removed rule says its run had switched
/// `tcp_fwmark_accept` on.
fn clean(nl: &mut Netlink) -> io::Result<bool> {
    let mut set_fwmark_accept = false;
    for fam in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut q = RuleMessage::default();
        q.header.family = fam;
        let rules = nl.request(RouteNetlinkMessage::GetRule(q), NLM_F_DUMP)?;
        for m in rules {
            let RouteNetlinkMessage::NewRule(r) = m else {
                continue;
            };
            let ours = r
                .attributes
                .iter()
                .any(|a| matches!(a, RuleAttribute::Table(t) if *t == TABLE));
            if ours {
                set_fwmark_accept |= r.attributes.iter().any(|a| {
                    matches!(a, RuleAttribute::Protocol(p)
                        if u8::from(*p) == PROTO_SET_FWMARK_ACCEPT)
                });
                nl.request(RouteNetlinkMessage::DelRule(r), NLM_F_ACK)
                    .or_else(|e| ignore(e, &[libc::ENOENT]).map(|()| Vec::new()))?;
            }
        }
        let lo = lo_index();
        nl.request(
            RouteNetlinkMessage::DelRoute(local_route(fam, lo)),
            NLM_F_ACK,
        )
        .or_else(|e| ignore(e, &[libc::ESRCH, libc::ENOENT]).map(|()| Vec::new()))?;
    }
    Ok(set_fwmark_accept)
}

fn lo_index() -> u32 {
    nix::net::if_::if_nametoindex("lo").unwrap_or(1)
}

/// The policy routing installed in the child while source preservation is
/// on; removed when dropped.
pub struct Routing {
    nl: Mutex<Netlink>,
    fwmark_accept_was: Mutex<Option<String>>,
}

impl Routing {
    /// Cleans what an earlier run left, then installs the TCP mark rules and
    /// the local routes (IPv6 only where the child has IPv6) and sets
    /// `tcp_fwmark_accept`. Fails, with everything undone, when the child
    /// does not permit it.
    pub fn install() -> Result<Routing, SourceIpError> {
        let mut nl = Netlink::open().map_err(SourceIpError::Netlink)?;
        if clean(&mut nl).map_err(SourceIpError::Netlink)? {
            // A killed run had switched it on: back to what it was first.
            std::fs::write(FWMARK_ACCEPT, "0").map_err(SourceIpError::Sysctl)?;
        }
        let ipv6 = std::path::Path::new("/proc/sys/net/ipv6").exists();
        let routing = Routing {
            nl: Mutex::new(nl),
            fwmark_accept_was: Mutex::new(None),
        };
        let was = std::fs::read_to_string(FWMARK_ACCEPT).map_err(SourceIpError::Sysctl)?;
        let set = was.trim() != "1";
        if set {
            std::fs::write(FWMARK_ACCEPT, "1").map_err(SourceIpError::Sysctl)?;
            if let Ok(mut w) = routing.fwmark_accept_was.lock() {
                *w = Some(was.trim().to_string());
            }
        }
        let lo = lo_index();
        let mut fams = vec![AddressFamily::Inet];
        if ipv6 {
            fams.push(AddressFamily::Inet6);
        }
        if let Ok(mut nl) = routing.nl.lock() {
            for fam in fams {
                nl.request(
                    RouteNetlinkMessage::NewRoute(local_route(fam, lo)),
                    NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
                )
                .map_err(SourceIpError::Netlink)?;
                nl.request(
                    RouteNetlinkMessage::NewRule(mark_rule(fam, set)),
                    NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
                )
                .map_err(SourceIpError::Netlink)?;
            }
        }
        Ok(routing)
    }

    /// Adds the return rule of one UDP flow.
    pub fn add_flow(&self, target: SocketAddr, client: SocketAddr) -> io::Result<()> {
        let mut nl = self.nl.lock().map_err(|_| io::Error::other("poisoned"))?;
        nl.request(
            RouteNetlinkMessage::NewRule(flow_rule(target, client)),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
        .or_else(|e| ignore(e, &[libc::EEXIST]))
    }

    /// Removes the return rule of one UDP flow.
    pub fn remove_flow(&self, target: SocketAddr, client: SocketAddr) -> io::Result<()> {
        let mut nl = self.nl.lock().map_err(|_| io::Error::other("poisoned"))?;
        nl.request(
            RouteNetlinkMessage::DelRule(flow_rule(target, client)),
            NLM_F_ACK,
        )
        .map(drop)
        .or_else(|e| ignore(e, &[libc::ENOENT]))
    }
}

impl Routing {
    /// Removes the rules and the route and puts `tcp_fwmark_accept` back.
    /// Dials after this go out with the client's address but their replies
    /// are not returned: call it at exit only.
    pub fn teardown(&self) {
        if let Ok(mut nl) = self.nl.lock() {
            if let Err(e) = clean(&mut nl) {
                tracing::warn!(error = %e, "cannot remove the source-address routing in the child");
            }
        }
        if let Some(was) = self
            .fwmark_accept_was
            .lock()
            .ok()
            .and_then(|mut w| w.take())
        {
            let _ = std::fs::write(FWMARK_ACCEPT, was);
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

/// Makes `fd` (a fresh TCP or UDP socket) transparent and binds it to
/// `source`; `mark` sets [`MARK`] (TCP).
pub fn bind_transparent(fd: BorrowedFd<'_>, source: SocketAddr, mark: bool) -> io::Result<()> {
    let s = socket2::SockRef::from(&fd);
    if source.is_ipv4() {
        s.set_ip_transparent_v4(true)?;
    } else {
        s.set_ip_transparent_v6(true)?;
    }
    s.set_reuse_address(true)?;
    if mark {
        s.set_mark(MARK)?;
    }
    s.bind(&source.into())
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
