//! The local-client path: a client on this host sends, and the container's
//! server answers, with each byte moved into the forwarder's socket on the
//! other side inside the sender's own `sendmsg()` (`forwarder-ebpf`'s
//! `local` module has the kernel half).
//!
//! How it works
//! ------------
//! Traffic: connections whose client socket C (parent namespace) and whose
//! server socket S (the container's accepted socket, child namespace) the
//! `sock_ops` program admitted. A is the socket the forwarder accepted, B
//! the one it dialed. Every other connection runs on the engine that would
//! have carried it anyway.
//!
//! State: in the kernel, C and S sit in FWD_MSG_SOCKS (the `sk_msg`
//! program runs in their sends), A and B in FWD_TARGETS; FWD_LINKS (ours)
//! and FWD_FLOWS (the program's) hold each sender's credit, agreement
//! point and counters by cookie. In userspace, one task per connection
//! runs the splice relay for the bytes that take TCP (C -> A -> B and
//! S -> B -> A), and a [`Hook`] per connection, shared by both directions,
//! which owns the map entries and a duplicate of A and B for reading their
//! queues.
//!
//! Events in a connection's life:
//! - listen: each published TCP listener's endpoint goes into FWD_LISTEN,
//!   so `sock_ops` admits C when its connect completes;
//! - accept: if C was admitted (found in FWD_ADMITTED by A's addresses),
//!   the dial binds the client's port in the child, registered in
//!   FWD_DIALED first, so `sock_ops` admits S when it is accepted (it can
//!   be before our connect returns); the registration goes when the dial
//!   ends;
//! - handoff: A and B enter FWD_TARGETS, each sender's FLOWS entry, then
//!   its LINKS entry with `arm_at` 0 and a credit: the program arms at C's
//!   (S's) next send if it has sent nothing by TCP yet. Early data (a
//!   request sent right after connect, a server's banner) is in A's (B's)
//!   receive queue: the relay moves it, then moves `arm_at` to what it
//!   relayed, so the program arms only once nothing sent by TCP is left
//!   behind;
//! - data: redirected sends never wake us. The credit is the kernel's
//!   own: the program compares what the target would hold after the send
//!   with [`Link::cap`], from the target's acknowledgements (FWD_ACKS,
//!   kept by `sock_ops` from the target's RTT callback). When the credit
//!   is spent the sender's bytes take TCP, where TCP's flow control holds
//!   it back and wakes it; the relay carries them and re-arms;
//! - FIN from side i: as the splice relay (a FIN always takes TCP, after
//!   every redirected byte, which is already in the target's queue);
//! - RST: as the splice relay. A reset of B can be consumed by C's
//!   redirected send (the kernel clears the target's error on the way), so
//!   an EOF from a socket whose TCP state is CLOSE counts as a reset;
//! - teardown: when both directions end, the hook takes C and S out of
//!   FWD_MSG_SOCKS (their proto is TCP's again), A and B out of
//!   FWD_TARGETS, and the LINKS and FLOWS entries; it counts the
//!   redirected bytes.
//!
//! Fallback: a local client whose server socket was not admitted (the
//! port was taken in the child, the dial went elsewhere) leaves
//! FWD_MSG_SOCKS at once and its connection runs on the engine's other
//! path, as does every non-local client.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context as _;
use aya::maps::{Array, HashMap as BpfHashMap, MapData, SockHash};
use aya::programs::{CgroupAttachMode, SkMsg, SockOps};
use aya::Ebpf;
use forwarder_common::{
    Acks, Counters, Endpoint, Flow, Link, Tuple, MAP_ACKS, MAP_ADMITTED, MAP_COUNTERS, MAP_DIALED,
    MAP_FLOWS, MAP_LINKS, MAP_LISTEN, MAP_MSG_SOCKS, PROG_MSG, PROG_SOCKOPS,
};
use tokio::net::TcpStream;

use super::relay::{self, Chunk};
use super::splice::SpliceChunk;
use super::Conn;
use crate::engine::stats::{DataPath, PortStats};
use crate::sys;

pub mod probe;

/// The default cgroup v2 hierarchy root, and where hybrid hosts mount it.
pub const CGROUP_ROOTS: [&str; 2] = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"];

/// The target's queue never holds more than this through redirects,
/// whatever its send buffer.
const MAX_CAP: u64 = 4 << 20;

/// How long the handoff waits for the kernel to admit the server's socket
/// after the dial returned (it is normally admitted before).
const ADMIT_WAIT: std::time::Duration = std::time::Duration::from_millis(5);

/// `TCP_CLOSE` of the kernel's TCP states (`tcpi_state`): a socket that
/// was reset (or never connected), unlike CLOSE_WAIT after a FIN.
const TCP_CLOSE: u8 = 7;

/// The cgroup v2 directory to attach to by default: the unified hierarchy
/// of a hybrid host, else the cgroup2 root.
pub fn default_cgroup() -> Option<PathBuf> {
    CGROUP_ROOTS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.procs").exists() && is_cgroup2(p))
}

fn is_cgroup2(p: &Path) -> bool {
    // cgroup2 has cgroup.controllers in every directory; v1 never does.
    p.join("cgroup.controllers").exists()
}

/// Offset in bytes of member `member` of `struct name` in raw BTF (the
/// first struct of that name), `None` if absent or not byte-aligned.
pub fn member_offset(btf: &[u8], struct_name: &[u8], member: &[u8]) -> Option<u32> {
    let u32_at = |off: usize| -> Option<u32> {
        btf.get(off..off + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if btf.get(0..2)? != [0x9f, 0xeb] {
        return None;
    }
    let hdr_len = u32_at(4)? as usize;
    let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
    let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
    let strings = btf.get(hdr_len + str_off..hdr_len + str_off + str_len)?;
    let name = |off: u32| -> Option<&[u8]> {
        let s = strings.get(off as usize..)?;
        Some(&s[..s.iter().position(|&c| c == 0)?])
    };
    let mut at = hdr_len + type_off;
    let end = at + type_len;
    while at + 12 <= end {
        let (name_off, info) = (u32_at(at)?, u32_at(at + 4)?);
        let vlen = (info & 0xffff) as usize;
        let kind = (info >> 24) & 0x1f;
        let kind_flag = info >> 31 == 1;
        at += 12;
        let extra = match kind {
            1 | 14 | 17 => 4,          // int, var, decl_tag
            3 => 12,                   // array
            4 | 5 => 12 * vlen,        // struct, union
            6 | 13 => 8 * vlen,        // enum, func_proto
            15 | 19 => 12 * vlen,      // datasec, enum64
            2 | 7..=12 | 16 | 18 => 0, // ptr, fwd, typedef, qualifiers, func, float, type_tag
            _ => return None,
        };
        if kind == 4 && name(name_off)? == struct_name {
            for m in 0..vlen {
                let mo = at + 12 * m;
                if name(u32_at(mo)?)? == member {
                    let bits = u32_at(mo + 8)?;
                    let bits = if kind_flag { bits & 0x00ff_ffff } else { bits };
                    return (bits % 8 == 0).then_some(bits / 8);
                }
            }
            return None;
        }
        at += extra;
    }
    None
}

/// Offsets the programs read in the running kernel's TCP sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offsets {
    /// `tcp_sock.write_seq`.
    pub write_seq: u32,
    /// `sock.sk_wmem_queued` (`struct tcp_sock` begins with `struct sock`).
    pub wmem_queued: u32,
    /// `sock.sk_sndbuf`.
    pub sndbuf: u32,
    /// `inet_connection_sock.icsk_ulp_ops` (`struct tcp_sock` begins with
    /// `struct inet_connection_sock`).
    pub ulp_ops: u32,
}

/// [`Offsets`] from the running kernel's BTF.
pub fn kernel_offsets() -> anyhow::Result<Offsets> {
    let path = "/sys/kernel/btf/vmlinux";
    let btf = std::fs::read(path)
        .with_context(|| format!("cannot read the kernel's BTF ({path}: CONFIG_DEBUG_INFO_BTF)"))?;
    let find = |s: &[u8], m: &[u8]| {
        member_offset(&btf, s, m).with_context(|| {
            format!(
                "{path} describes no {}.{}",
                String::from_utf8_lossy(s),
                String::from_utf8_lossy(m)
            )
        })
    };
    Ok(Offsets {
        write_seq: find(b"tcp_sock", b"write_seq")?,
        wmem_queued: find(b"sock", b"sk_wmem_queued")?,
        sndbuf: find(b"sock", b"sk_sndbuf")?,
        ulp_ops: find(b"inet_connection_sock", b"icsk_ulp_ops")?,
    })
}

/// `addr` as the programs key it: v4-mapped for IPv4, network byte order.
pub fn key_addr(ip: IpAddr) -> [u32; 4] {
    let v6 = match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

/// The endpoint key of `addr` in namespace `netns`.
pub fn endpoint(netns: u64, addr: SocketAddr) -> Endpoint {
    Endpoint {
        netns,
        addr: key_addr(addr.ip()),
        port: u32::from(addr.port()),
        _pad: 0,
    }
}

/// The tuple of the socket at the other end of a connection whose own
/// addresses are `local` and `peer`: that socket's local is our peer.
pub fn peer_tuple(netns: u64, local: SocketAddr, peer: SocketAddr) -> Tuple {
    Tuple {
        netns,
        local: key_addr(peer.ip()),
        remote: key_addr(local.ip()),
        local_port: u32::from(peer.port()),
        remote_port: u32::from(local.port()),
    }
}

/// The most a target with send buffer `sndbuf` may hold after a redirect:
/// three quarters of it (the buffer is charged per skb, a little more than
/// the bytes), at most [`MAX_CAP`].
pub fn cap(sndbuf: u64) -> u64 {
    (sndbuf / 4 * 3).min(MAX_CAP)
}

struct Maps {
    msg_socks: SockHash<MapData, u64>,
    targets: SockHash<MapData, u64>,
    listen: BpfHashMap<MapData, Endpoint, u32>,
    dialed: BpfHashMap<MapData, Endpoint, u32>,
    admitted: BpfHashMap<MapData, Tuple, u64>,
    links: BpfHashMap<MapData, u64, Link>,
    flows: BpfHashMap<MapData, u64, Flow>,
    counters: Array<MapData, Counters>,
    acks: BpfHashMap<MapData, u64, Acks>,
}

/// The local-client path's programs loaded and attached, and its maps.
pub struct Loaded {
    maps: Maps,
    cgroup: PathBuf,
    /// What the self-test found ([`probe`]).
    pub blocking_read: probe::BlockingRead,
}

/// Why the local-client path stays off on a kernel whose self-test failed.
pub const BLOCKING_READ_BROKEN: &str = "this kernel's tcp_bpf_recvmsg() returns EAGAIN to a \
     blocking reader that write space or a reset wakes (a blocking client that uploads, then \
     waits for the answer, would fail); the fix is in contrib/kernel/, and --local-path runs \
     the path anyway";

/// Loads the `sock_ops` and `sk_msg` programs of `bpf` and attaches them:
/// `sock_ops` to the cgroup `cgroup` through a BPF link (with
/// `BPF_F_ALLOW_MULTI` semantics, so it goes away with this process), and
/// `sk_msg` to FWD_MSG_SOCKS. `targets` is the engine's FWD_TARGETS map.
/// Needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (`bpf_skc_to_tcp_sock`).
///
/// First it runs the self-test ([`probe`]) with `targets`; where the
/// kernel breaks blocking reads on admitted sockets it fails unless
/// `forced`.
pub fn attach(
    bpf: &mut Ebpf,
    cgroup: &Path,
    mut targets: SockHash<MapData, u64>,
    forced: bool,
) -> anyhow::Result<Loaded> {
    let blocking_read = match probe::blocking_read(&mut targets) {
        Ok(probe::BlockingRead::Kept) => probe::BlockingRead::Kept,
        Ok(probe::BlockingRead::Eagain) if forced => {
            tracing::warn!(
                "the local-client path runs as --local-path asks, but {BLOCKING_READ_BROKEN}"
            );
            probe::BlockingRead::Eagain
        }
        Ok(probe::BlockingRead::Eagain) => anyhow::bail!("{BLOCKING_READ_BROKEN}"),
        Err(e) if forced => {
            tracing::warn!(error = %e, "the local-client path runs as --local-path asks, \
                but its self-test did not finish");
            probe::BlockingRead::Eagain
        }
        Err(e) => return Err(e.context("the local-client path's self-test did not finish")),
    };
    fn take<T: TryFrom<aya::maps::Map>>(bpf: &mut Ebpf, name: &str) -> anyhow::Result<T>
    where
        <T as TryFrom<aya::maps::Map>>::Error: std::error::Error + Send + Sync + 'static,
    {
        let m = bpf
            .take_map(name)
            .with_context(|| format!("map {name} missing from the BPF object"))?;
        T::try_from(m).with_context(|| format!("map {name}"))
    }
    let msg_socks: SockHash<MapData, u64> = take(bpf, MAP_MSG_SOCKS)?;
    let msg: &mut SkMsg = bpf
        .program_mut(PROG_MSG)
        .context("program fwd_msg missing from the BPF object")?
        .try_into()?;
    msg.load()
        .context("loading the sk_msg program (it needs CAP_PERFMON)")?;
    msg.attach(msg_socks.fd())
        .context("attaching the sk_msg program")?;
    let dir = std::fs::File::open(cgroup)
        .with_context(|| format!("cannot open the cgroup {}", cgroup.display()))?;
    let ops: &mut SockOps = bpf
        .program_mut(PROG_SOCKOPS)
        .context("program fwd_sockops missing from the BPF object")?
        .try_into()?;
    ops.load().context("loading the sock_ops program")?;
    // Through a BPF link (Linux 5.7+), which always attaches with
    // BPF_F_ALLOW_MULTI semantics and takes no flags: `Single` passes none.
    // Other programs on the cgroup keep running; ours goes with the link.
    ops.attach(&dir, CgroupAttachMode::Single)
        .with_context(|| format!("attaching the sock_ops program to {}", cgroup.display()))?;
    Ok(Loaded {
        maps: Maps {
            msg_socks,
            targets,
            listen: take(bpf, MAP_LISTEN)?,
            dialed: take(bpf, MAP_DIALED)?,
            admitted: take(bpf, MAP_ADMITTED)?,
            links: take(bpf, MAP_LINKS)?,
            flows: take(bpf, MAP_FLOWS)?,
            counters: take(bpf, MAP_COUNTERS)?,
            acks: take(bpf, MAP_ACKS)?,
        },
        cgroup: cgroup.to_owned(),
        blocking_read,
    })
}

/// The local-client path, running.
pub struct Local {
    maps: Mutex<Maps>,
    /// Our own namespace's cookie (C's).
    parent_netns: u64,
    /// The child namespace's cookie (S's), once known.
    child_netns: AtomicU64,
    /// The cgroup the `sock_ops` program is attached to.
    pub cgroup: PathBuf,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Loaded {
    /// Starts the path. `child_netns` is the child namespace's cookie if
    /// known now (else learned from the first dialed socket).
    pub fn start(self, child_netns: Option<u64>) -> io::Result<Arc<Local>> {
        let parent_netns = sys::netns_cookie(sys::tcp_socket(false)?.as_fd())?;
        Ok(Arc::new(Local {
            maps: Mutex::new(self.maps),
            parent_netns,
            child_netns: AtomicU64::new(child_netns.unwrap_or(0)),
            cgroup: self.cgroup,
        }))
    }
}

/// Both admitted sockets of a connection, found at handoff.
pub struct Pair {
    /// Cookies of C and S: the senders whose bytes go to B and A.
    senders: [u64; 2],
}

impl Local {
    /// A listener now accepts at `addr` (or no longer).
    pub fn listening(&self, addr: SocketAddr, on: bool) {
        let key = endpoint(self.parent_netns, addr);
        let mut m = lock(&self.maps);
        let r = if on {
            m.listen.insert(key, 1, 0)
        } else {
            m.listen.remove(&key)
        };
        if let Err(e) = r {
            tracing::warn!(%addr, error = %e, "cannot update the local path's listen map");
        }
    }

    /// C's cookie if the client socket of `a` (accepted) was admitted.
    fn client_of(&self, a: &TcpStream) -> Option<u64> {
        let t = peer_tuple(self.parent_netns, a.local_addr().ok()?, a.peer_addr().ok()?);
        lock(&self.maps).admitted.get(&t, 0).ok()
    }

    /// Before the dial of `a`'s connection: if its client was admitted,
    /// the port to bind in the child (the client's), registered.
    /// `child_netns`, the dialer's knowledge of the child namespace's
    /// cookie, stands in for what a first dialed socket would tell (a
    /// rootless forwarder cannot learn it at start).
    pub fn before_dial(&self, a: &TcpStream, child_netns: Option<u64>) -> Option<u16> {
        if let Some(c) = child_netns {
            let _ = self.child_netns.compare_exchange(0, c, Relaxed, Relaxed);
        }
        let netns = self.child_netns.load(Relaxed);
        if netns == 0 {
            return None;
        }
        self.client_of(a)?;
        let port = a.peer_addr().ok()?.port();
        let key = Endpoint {
            netns,
            addr: [0; 4],
            port: u32::from(port),
            _pad: 0,
        };
        lock(&self.maps).dialed.insert(key, 1, 0).ok()?;
        Some(port)
    }

    /// The dial from `port` ended.
    pub fn after_dial(&self, port: u16) {
        let key = Endpoint {
            netns: self.child_netns.load(Relaxed),
            addr: [0; 4],
            port: u32::from(port),
            _pad: 0,
        };
        let _ = lock(&self.maps).dialed.remove(&key);
    }

    /// Finds C and S for a dialed pair; `None` if either was not admitted
    /// (an admitted one of the two is released).
    pub async fn pair(&self, sides: &[TcpStream; 2]) -> Option<Pair> {
        if let Ok(c) = sys::netns_cookie(sides[1].as_fd()) {
            let _ = self.child_netns.compare_exchange(0, c, Relaxed, Relaxed);
        }
        let Some(c) = self.client_of(&sides[0]) else {
            tracing::trace!("not a local client");
            return None;
        };
        let t = peer_tuple(
            sys::netns_cookie(sides[1].as_fd()).ok()?,
            sides[1].local_addr().ok()?,
            sides[1].peer_addr().ok()?,
        );
        let deadline = tokio::time::Instant::now() + ADMIT_WAIT;
        let s = loop {
            if let Ok(s) = lock(&self.maps).admitted.get(&t, 0) {
                break Some(s);
            }
            if tokio::time::Instant::now() >= deadline {
                break None;
            }
            tokio::task::yield_now().await;
        };
        let mut m = lock(&self.maps);
        let _ = m.admitted.remove(&peer_tuple(
            self.parent_netns,
            sides[0].local_addr().ok()?,
            sides[0].peer_addr().ok()?,
        ));
        let _ = m.admitted.remove(&t);
        match s {
            Some(s) => Some(Pair { senders: [c, s] }),
            None => {
                let _ = m.msg_socks.remove(&c);
                for side in sides {
                    if let Ok(k) = sys::socket_cookie(side.as_fd()) {
                        let _ = m.acks.remove(&k);
                    }
                }
                tracing::debug!(
                    client = c,
                    "local client without an admitted server socket: not on the local path"
                );
                None
            }
        }
    }

    /// Path-wide counters.
    pub fn counters(&self) -> Counters {
        lock(&self.maps).counters.get(&0, 0).unwrap_or_default()
    }
}

/// One connection's map entries and the targets' duplicates; dropped when
/// both directions are done, before the relay closes the sockets.
struct Hook {
    local: Arc<Local>,
    /// C's and S's cookies (senders into B and A).
    senders: [u64; 2],
    /// Cookies of A and B.
    targets: [u64; 2],
    /// Duplicates of A and B, for their counters.
    fds: [OwnedFd; 2],
    /// Bytes the relay moved from side i into side 1-i.
    relayed: [AtomicU64; 2],
    /// The relay has sent (or is sending) a FIN on side i.
    fin_sent: [std::sync::atomic::AtomicBool; 2],
    port: Arc<PortStats>,
}

impl Hook {
    /// Sets sender `cookie`'s link: its target, the target's cap from its
    /// send buffer now and, when given, the new agreement point.
    fn grant(&self, cookie: u64, arm_at: Option<u64>) {
        let Some(i) = self.senders.iter().position(|&c| c == cookie) else {
            return;
        };
        // Sender i (C for 0, S for 1) writes into side 1-i.
        let sndbuf = sys::send_buffer(self.fds[1 - i].as_fd()).unwrap_or(0);
        let mut maps = lock(&self.local.maps);
        let old = maps.links.get(&cookie, 0).unwrap_or_default();
        let link = Link {
            target: self.targets[1 - i],
            cap: cap(sndbuf),
            arm_at: arm_at.unwrap_or(old.arm_at),
        };
        if let Err(e) = maps.links.insert(cookie, link, 0) {
            tracing::debug!(error = %e, "cannot update a local link");
        }
    }
}

impl Drop for Hook {
    fn drop(&mut self) {
        let mut m = lock(&self.local.maps);
        for c in &self.senders {
            let _ = m.msg_socks.remove(c);
        }
        for c in &self.senders {
            let _ = m.links.remove(c);
        }
        for c in &self.targets {
            if let Ok(a) = m.acks.get(c, 0) {
                tracing::debug!(
                    ?a,
                    queued = a.written.wrapping_sub(a.una),
                    "local path: target done"
                );
            }
            let _ = m.targets.remove(c);
            let _ = m.acks.remove(c);
        }
        for (i, c) in self.senders.iter().enumerate() {
            if let Ok(f) = m.flows.get(c, 0) {
                tracing::debug!(
                    side = i,
                    redirected = f.redirected,
                    relayed = self.relayed[i].load(Relaxed),
                    arms = f.arms,
                    fallbacks = f.fallbacks,
                    "local path: sender done"
                );
                self.port.add_bytes(i, f.redirected, DataPath::Msg);
            }
            let _ = m.flows.remove(c);
        }
    }
}

/// A splice chunk that reports what it moved to the hook, and takes a
/// TCP-path EOF from a reset socket for the reset it was.
struct LocalChunk {
    inner: SpliceChunk,
    hook: Arc<Hook>,
    from: usize,
    moved: u64,
}

impl Chunk for LocalChunk {
    fn path(&self) -> DataPath {
        self.inner.path()
    }

    async fn fill(&mut self, src: &TcpStream) -> io::Result<usize> {
        {
            let n = self.inner.fill(src).await?;
            if n == 0 {
                tracing::debug!(side = self.from, state = ?sys::tcp_state(src.as_fd()), counters = ?sys::tcp_counters(src.as_fd()),
                    relayed = self.hook.relayed[self.from].load(Relaxed), "local path: EOF");
                // A socket reaches CLOSE at EOF either by a reset or by the
                // peer's FIN after ours (then it is in TIME_WAIT, and our
                // own socket shows CLOSE): only without our FIN is it a
                // reset.
                let ours = self.hook.fin_sent[self.from].load(Relaxed);
                if !ours && sys::tcp_state(src.as_fd()).ok() == Some(TCP_CLOSE) {
                    return Err(io::Error::from(io::ErrorKind::ConnectionReset));
                }
                // The driver now shuts down the other side's write.
                self.hook.fin_sent[1 - self.from].store(true, Relaxed);
            }
            self.moved = n as u64;
            Ok(n)
        }
    }

    async fn drain(&mut self, dst: &TcpStream) -> io::Result<()> {
        {
            self.inner.drain(dst).await?;
            let total = self.hook.relayed[self.from].fetch_add(self.moved, Relaxed) + self.moved;
            self.moved = 0;
            // Everything this sender passed to TCP up to here is in the
            // target's queue: it may arm again at `total`.
            self.hook.grant(self.hook.senders[self.from], Some(total));
            Ok(())
        }
    }
}

/// Runs a paired connection: both sockets into FWD_TARGETS, the senders'
/// entries, then the splice relay for the TCP path until both directions
/// end; the hook's drop tears the entries down.
pub async fn run(local: Arc<Local>, conn: Conn, pair: Pair) {
    let [a, b] = &conn.sides;
    let setup = (|| -> io::Result<Arc<Hook>> {
        let targets = [
            sys::socket_cookie(a.as_fd())?,
            sys::socket_cookie(b.as_fd())?,
        ];
        let fds = [
            a.as_fd().try_clone_to_owned()?,
            b.as_fd().try_clone_to_owned()?,
        ];
        let hook = Arc::new(Hook {
            local: local.clone(),
            senders: pair.senders,
            targets,
            fds,
            relayed: Default::default(),
            fin_sent: Default::default(),
            port: conn.guard.port().clone(),
        });
        let mut m = lock(&local.maps);
        for (c, fd) in targets.iter().zip([a.as_raw_fd(), b.as_raw_fd()]) {
            m.targets.insert(*c, fd, 0).map_err(io::Error::other)?;
        }
        for c in &pair.senders {
            m.flows
                .insert(c, Flow::default(), 0)
                .map_err(io::Error::other)?;
        }
        drop(m);
        for c in &pair.senders {
            hook.grant(*c, Some(0));
        }
        Ok(hook)
    })();
    let hook = match setup {
        Ok(h) => h,
        Err(e) => {
            tracing::debug!(error = %e, "local path handoff failed; splice carries the connection");
            relay::relay(conn, SpliceChunk::default).await;
            return;
        }
    };
    // The driver makes direction 0's chunk first, then direction 1's.
    let next = std::sync::atomic::AtomicUsize::new(0);
    relay::relay(conn, move || {
        let from = next.fetch_add(1, Relaxed) % 2;
        LocalChunk {
            inner: SpliceChunk::default(),
            hook: hook.clone(),
            from,
            moved: 0,
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A raw BTF blob: header, the given types, then the strings.
    fn btf(types: &[u8], strings: &[u8]) -> Vec<u8> {
        let mut b = vec![0x9f, 0xeb, 1, 0];
        for v in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(types);
        b.extend_from_slice(strings);
        b
    }

    fn words(ws: &[u32]) -> Vec<u8> {
        ws.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    #[test]
    fn write_seq_is_found_in_tcp_sock_past_other_kinds() {
        // strings: 0 "", 1 "int", 5 "tcp_sock", 14 "snd_nxt", 22 "write_seq", 32 "x"
        let strings = b"\0int\0tcp_sock\0snd_nxt\0write_seq\0x\0";
        let mut types = Vec::new();
        // [1] int: kind 1, 4 bytes, + 4
        types.extend(words(&[1, 1 << 24, 4, 32]));
        // [2] struct x { int snd_nxt @0; }: a struct of another name first
        types.extend(words(&[32, (4 << 24) | 1, 4, 14, 1, 0]));
        // [3] enum with 2 values (kind 6): skipped by its size
        types.extend(words(&[0, (6 << 24) | 2, 4, 14, 0, 22, 1]));
        // [4] struct tcp_sock { int snd_nxt @0; int write_seq @ bit 1536; }
        types.extend(words(&[5, (4 << 24) | 2, 256, 14, 1, 0, 22, 1, 1536]));
        assert_eq!(
            member_offset(&btf(&types, strings), b"tcp_sock", b"write_seq"),
            Some(192)
        );
        // A bitfield encoding (kind_flag) keeps the offset in the low 24 bits.
        let mut flagged = Vec::new();
        flagged.extend(words(&[1, 1 << 24, 4, 32]));
        flagged.extend(words(&[
            5,
            (1 << 31) | (4 << 24) | 1,
            256,
            22,
            1,
            (32 << 24) | 64,
        ]));
        assert_eq!(
            member_offset(&btf(&flagged, strings), b"tcp_sock", b"write_seq"),
            Some(8)
        );
    }

    #[test]
    fn write_seq_missing_or_garbage_is_none() {
        let strings = b"\0int\0tcp_sock\0snd_nxt\0";
        let types = words(&[5, (4 << 24) | 1, 256, 14, 0, 0]);
        assert_eq!(
            member_offset(&btf(&types, strings), b"tcp_sock", b"write_seq"),
            None
        );
        assert_eq!(
            member_offset(b"not btf at all, not even close", b"tcp_sock", b"write_seq"),
            None
        );
        assert_eq!(member_offset(&[], b"tcp_sock", b"write_seq"), None);
        // An unknown kind stops the walk rather than misreading what follows.
        let unknown = words(&[0, 31 << 24, 0]);
        assert_eq!(
            member_offset(&btf(&unknown, strings), b"tcp_sock", b"write_seq"),
            None
        );
    }

    #[test]
    fn the_running_kernel_describes_the_fields_read() {
        // Every kernel this project supports (5.13+ with BTF) has them;
        // struct sock's fields lie before tcp_sock's own.
        let o = kernel_offsets().expect("kernel BTF");
        for off in [o.write_seq, o.wmem_queued, o.sndbuf, o.ulp_ops] {
            assert!(off > 0 && off < 4096 && off % 4 == 0, "{o:?}");
        }
        assert!(
            o.wmem_queued < o.write_seq && o.sndbuf < o.write_seq,
            "{o:?}"
        );
        assert!(o.ulp_ops > o.sndbuf && o.ulp_ops < o.write_seq, "{o:?}");
    }

    #[test]
    fn ipv4_keys_are_v4_mapped_whatever_the_socket_family() {
        let v4: IpAddr = "127.0.0.2".parse().unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.2".parse().unwrap();
        assert_eq!(key_addr(v4), key_addr(mapped));
        let k = key_addr(v4);
        assert_eq!(k[0..2], [0, 0]);
        assert_eq!(k[2], u32::from_ne_bytes([0, 0, 0xff, 0xff]));
        assert_eq!(k[3], u32::from_ne_bytes([127, 0, 0, 2]));
        let v6: IpAddr = "2001:db8::10".parse().unwrap();
        assert_ne!(key_addr(v6), key_addr(v4));
        assert_eq!(
            key_addr(v6)[0],
            u32::from_ne_bytes([0x20, 0x01, 0x0d, 0xb8])
        );
    }

    #[test]
    fn the_peer_tuple_is_the_other_end_seen_from_there() {
        let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let peer: SocketAddr = "[::ffff:127.0.0.1]:40000".parse().unwrap();
        let t = peer_tuple(7, local, peer);
        assert_eq!(t.netns, 7);
        assert_eq!((t.local_port, t.remote_port), (40000, 8080));
        assert_eq!(t.local, key_addr(peer.ip()));
        assert_eq!(t.remote, key_addr(local.ip()));
        let e = endpoint(7, local);
        assert_eq!((e.netns, e.addr, e.port), (7, t.remote, 8080));
    }

    #[test]
    fn the_cap_stays_below_the_send_buffer() {
        assert_eq!(cap(0), 0);
        assert_eq!(cap(16384), 12288);
        assert_eq!(cap(4 << 20), 3 << 20);
        assert_eq!(cap(64 << 20), MAX_CAP);
        for b in [1u64, 1000, 87380, 2_621_440, 6 << 20] {
            assert!(cap(b) < b.max(1));
        }
    }
}
