//! The forwarder's side of the child-side dial agent
//! ([`crate::child::agent`], which documents the protocol): starting an
//! agent in the container's namespaces ([`spawn`]) or connecting to one a
//! runtime started, and [`AgentClient`], the dialer that asks it for each
//! connection's socket and implements [`Dial`] like the in-process one.
//!
//! Requests carry an id; replies may come back in any order and are
//! matched to their waiting dial by it. Connections whose source the agent
//! would not preserve anyway (clients at 127.0.0.1 or ::1) skip it: root
//! mode dials them from its thread in the child; rootless, from TCP and
//! UDP sockets the agent made ahead and sent in one reply
//! ([`crate::wire::AgentSockets`]), which this side binds and connects. A
//! request is bounded by the dial timeout; an agent that goes away fails
//! every pending dial at once, and the port manager then restarts it or
//! ends the run.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::socket::MsgFlags;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::child::dial::{self, Dial, DialFailure, DialFuture, DialRequest};
use crate::child::netns::{self, ChildDialer, Kind, SocketPool};
use crate::child::srcip;
use crate::sys::{self, SeqPacket};
use crate::wire::spec::{ApiSpec, PortSpec};
use crate::wire::{
    AgentFlowClosed, AgentReply, AgentRequest, AgentSockets, AGENT_HELLO, AGENT_MAX_MESSAGE,
    AGENT_MAX_SOCKETS,
};

/// Largest request or reply.
const MAX_MESSAGE: usize = AGENT_MAX_MESSAGE;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentTarget {
    /// In the user and network namespaces of this process (rootless).
    Pid(u32),
    /// In this network namespace file, in the forwarder's own user
    /// namespace (root mode with source preservation).
    Netns(std::path::PathBuf),
}

/// A started agent: the process, the forwarder's end of its socket, and
/// whether source preservation is on in it.
pub type Spawned = (std::process::Child, OwnedFd, bool);

/// Starts `forwarder child-agent` in the namespaces of `target`: the child
/// process joins the target's user namespace (allowed to the namespace's
/// owner) when it differs from ours and then its network namespace before
/// exec, and serves one end of a socket pair. `source_ip` asks it to
/// preserve client addresses ([`crate::child::srcip`]) where the child permits.
/// Returns the process and the other end, for [`AgentClient::new`], and
/// whether source preservation is on. Needs no runtime.
pub fn spawn(target: &AgentTarget, source_ip: bool) -> anyhow::Result<Spawned> {
    use anyhow::Context as _;
    let (userns, netns, what) = match target {
        AgentTarget::Pid(pid) => {
            let open = |ns: &str| {
                std::fs::File::open(format!("/proc/{pid}/ns/{ns}"))
                    .with_context(|| format!("cannot open /proc/{pid}/ns/{ns}"))
            };
            let same_user = {
                let a = std::fs::metadata(format!("/proc/{pid}/ns/user"));
                let b = std::fs::metadata("/proc/self/ns/user");
                match (a, b) {
                    (Ok(a), Ok(b)) => {
                        use std::os::unix::fs::MetadataExt;
                        a.ino() == b.ino() && a.dev() == b.dev()
                    }
                    _ => false,
                }
            };
            let userns = open("user")?;
            (
                (!same_user).then_some(userns),
                open("net")?,
                format!("PID {pid}"),
            )
        }
        AgentTarget::Netns(path) => (
            None,
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
            path.display().to_string(),
        ),
    };
    let (ours, theirs) = sys::seqpacket_pair()?;
    let exe = std::env::current_exe().context("locating the forwarder binary")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["child-agent", "--fd", "3"]);
    if source_ip {
        cmd.arg("--source-ip");
    }
    sys::enter_namespaces_on_exec(
        &mut cmd,
        userns.as_ref().map(|u| u.as_fd()),
        netns.as_fd(),
        theirs.as_fd(),
    );
    let child = cmd.spawn().with_context(|| {
        format!(
            "cannot start the dial agent in the namespaces of {what} (joining a user \
             namespace is allowed to its owner, entering a network namespace needs \
             CAP_SYS_ADMIN over its user namespace)"
        )
    })?;
    drop(theirs);
    let mut child = child;
    match await_hello(&ours, HELLO_TIMEOUT) {
        Ok(on) => Ok((child, ours, on)),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e).context("the dial agent did not start")
        }
    }
}

/// A reply as the reader took it: the reply, the socket that came with it,
/// and why a socket that came with it could not be taken, if one was lost.
type Answer = (AgentReply, Vec<OwnedFd>, Option<io::Error>);

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Answer>>>>;

/// The forwarder's side: sends dial requests to an agent and collects the
/// sockets.
#[derive(Clone)]
pub struct AgentClient {
    sock: Arc<Mutex<Arc<SeqPacket>>>,
    pending: Pending,
    next_id: Arc<AtomicU64>,
    /// Dials instead of the agent once set ([`AgentClient::fall_back_to`]).
    fallback: Arc<Mutex<Option<ChildDialer>>>,
    /// The current agent greeted with source preservation on.
    source_ip: Arc<AtomicBool>,
    /// The forwarder is stopping the agent: its socket closing is expected.
    stopping: Arc<AtomicBool>,
    /// Dials what the agent would dial from the child's own address anyway
    /// ([`AgentClient::dial_local_clients_with`]).
    local: Arc<Mutex<Option<ChildDialer>>>,
    /// That a local client was dialed so is logged once.
    local_logged: Arc<AtomicBool>,
    /// Sockets the agent made ahead: for what it would dial from the
    /// child's own address anyway when there is no `local` dialer
    /// (rootless), and transparent ones for preserved sources (root and
    /// rootless); the forwarder binds and connects them itself.
    pool: Arc<SocketPool>,
    /// The child's addresses as the agent last sent them.
    addresses: Addresses,
}

/// The child's addresses as the agent last sent them, and when they came:
/// they decide whether a client's source is preserved
/// ([`srcip::source_for`]).
type Addresses = Arc<Mutex<Option<(Instant, Arc<HashSet<IpAddr>>)>>>;

impl AgentClient {
    /// Wraps a connected SOCK_SEQPACKET socket to an agent, which greeted
    /// with source preservation `source_ip`. Must run inside the tokio
    /// runtime.
    pub fn new(fd: OwnedFd, source_ip: bool) -> io::Result<AgentClient> {
        let pending: Pending = Default::default();
        let stopping = Arc::new(AtomicBool::new(false));
        let sock = Arc::new(Mutex::new(Self::attach(
            fd,
            pending.clone(),
            stopping.clone(),
        )?));
        let next_id = Arc::new(AtomicU64::new(1));
        let addresses = Addresses::default();
        let pool = agent_pool(
            sock.clone(),
            pending.clone(),
            next_id.clone(),
            addresses.clone(),
        );
        Ok(AgentClient {
            sock,
            pending,
            next_id,
            pool,
            addresses,
            fallback: Arc::new(Mutex::new(None)),
            source_ip: Arc::new(AtomicBool::new(source_ip)),
            stopping,
            local: Arc::new(Mutex::new(None)),
            local_logged: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Asks the agent for the plain IPv4 TCP sockets a rootless dialer
    /// takes, now rather than at the first dial: the first connection
    /// finds its socket made, and the pool's first socket tells the child
    /// namespace's cookie, which the local-client path needs before the
    /// first dial. Must run inside the runtime.
    pub fn fill_ahead(&self) {
        self.pool.want(Kind {
            ipv6: false,
            udp: false,
            transparent: false,
        });
    }

    /// Switches to a new agent's socket (after a restart; the new agent
    /// greeted with `source_ip`); every clone of this client uses it from
    /// now on. Must run inside the runtime.
    pub fn replace(&self, fd: OwnedFd, source_ip: bool) -> io::Result<()> {
        let sock = Self::attach(fd, self.pending.clone(), self.stopping.clone())?;
        if let Ok(mut s) = self.sock.lock() {
            *s = sock;
        }
        self.source_ip.store(source_ip, Relaxed);
        Ok(())
    }

    /// The forwarder is stopping: the agent's socket closing from now on
    /// is not an error worth logging.
    pub fn stopping(&self) {
        self.stopping.store(true, Relaxed);
    }

    /// Asks the agent to stop: shuts its socket down, which it reads as end
    /// of file (it then removes its routing in the child and exits).
    pub fn close(&self) {
        self.stopping();
        if let Ok(s) = self.sock.lock() {
            if let Err(e) = s.shutdown() {
                tracing::debug!(error = %e, "cannot shut the dial agent's socket down");
            }
        }
    }

    /// From now on every clone of this client dials with `dialer` (a thread
    /// in the child's namespace), for an agent that cannot be restarted.
    pub fn fall_back_to(&self, dialer: ChildDialer) {
        if let Ok(mut f) = self.fallback.lock() {
            *f = Some(dialer);
        }
    }

    fn fallback(&self) -> Option<ChildDialer> {
        self.fallback.lock().ok().and_then(|f| f.clone())
    }

    /// From now on connections whose source the agent would not preserve
    /// anyway are dialed with `dialer` (a thread in the child's namespace,
    /// root mode), without the round trip to the agent: those with no
    /// source to preserve and those from the loopback address the child
    /// owns too (127.0.0.1, ::1), which the agent dials from the child's
    /// own address ([`crate::child::srcip::Skip::LocalClient`]). Local
    /// clients are the common case on a host and the one where the round
    /// trip is most of a connection's setup.
    pub fn dial_local_clients_with(&self, dialer: ChildDialer) {
        if let Ok(mut l) = self.local.lock() {
            *l = Some(dialer);
        }
    }

    /// The dialer for this request when it need not go to the agent: the
    /// thread in the child (root mode), or the sockets the agent made
    /// ahead when one of the target's family is there.
    fn local_dialer(&self, req: &DialRequest<'_>, udp: bool) -> Option<ChildDialer> {
        let client = match req.source {
            None => None,
            Some(c) if is_child_loopback(c) => Some(c),
            Some(_) => return None,
        };
        let d = match self.local.lock().ok().and_then(|l| l.clone()) {
            Some(d) => d,
            None if self.pool.ready(Kind {
                ipv6: req.plan().target.is_ipv6(),
                udp,
                transparent: false,
            }) =>
            {
                ChildDialer::from_pool(self.pool.clone())
            }
            None => return None,
        };
        if let Some(client) = client {
            if !self.local_logged.swap(true, Relaxed) {
                tracing::info!(%client,
                    "this connection reaches the child from the forwarder's address, not the client's: {} (logged once)",
                    crate::child::srcip::Skip::LocalClient);
            }
        }
        Some(d)
    }

    /// For a dial whose client's source the agent would preserve: the
    /// client and the child's addresses, when the forwarder can dial it
    /// itself from a transparent socket the agent made ahead (one of the
    /// target's family is there, and the addresses are fresh); else `None`,
    /// and a top-up is asked for so that the next such dial can.
    fn preserving(&self, req: &DialRequest<'_>) -> Option<(SocketAddr, Arc<HashSet<IpAddr>>)> {
        let client = req.source.filter(|c| !is_child_loopback(*c))?;
        if !self.source_ip.load(Relaxed) {
            return None;
        }
        let kind = Kind {
            ipv6: req.plan().target.is_ipv6(),
            udp: false,
            transparent: true,
        };
        let fresh = self
            .addresses
            .lock()
            .ok()
            .and_then(|a| a.clone())
            // As long as the agent itself takes its list as current, which
            // it read at most that long before sending: an address added
            // to the child is seen within twice this.
            .filter(|(at, _)| at.elapsed() < netns::LOCAL_TTL);
        match fresh {
            Some((_, addresses)) if self.pool.ready(kind) => Some((client, addresses)),
            Some(_) => None,
            None => {
                // A top-up brings the addresses, even one of no socket.
                self.pool.want(kind);
                None
            }
        }
    }

    /// Registers a socket and starts the task that reads its replies.
    fn attach(
        fd: OwnedFd,
        pending: Pending,
        stopping: Arc<AtomicBool>,
    ) -> io::Result<Arc<SeqPacket>> {
        let sock = Arc::new(SeqPacket::new(fd)?);
        let (s, p) = (sock.clone(), pending);
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_MESSAGE];
            loop {
                match s.recv(&mut buf).await {
                    Ok(Some(got)) => {
                        let Some(reply) = decode_reply(&buf[..got.len]) else {
                            tracing::warn!("malformed reply from the dial agent");
                            continue;
                        };
                        let waiter = p.lock().ok().and_then(|mut m| m.remove(&reply.id));
                        if let Some(w) = waiter {
                            let _ = w.send((reply, got.fds, got.fds_lost));
                        }
                    }
                    Ok(None) | Err(_) => {
                        if stopping.load(Relaxed) {
                            tracing::debug!("the dial agent has stopped");
                        } else {
                            tracing::error!(
                                "the dial agent is gone: new connections cannot be dialed"
                            );
                        }
                        if let Ok(mut m) = p.lock() {
                            m.clear();
                        }
                        return;
                    }
                }
            }
        });
        Ok(sock)
    }

    /// Connects to an agent listening at `path`; the socket is for
    /// [`AgentClient::new`]. Needs no runtime.
    pub fn connect(path: &Path) -> io::Result<(OwnedFd, bool)> {
        let fd = sys::seqpacket_connect(path)?;
        let on = await_hello(&fd, HELLO_TIMEOUT)?;
        Ok((fd, on))
    }

    async fn request(
        &self,
        spec: &PortSpec,
        ipv6_listener: bool,
        source: Option<SocketAddr>,
        bind_port: Option<u16>,
    ) -> Result<(OwnedFd, SocketAddr), DialFailure> {
        let fail = |errno: i32, message: String| DialFailure {
            errno: Some(errno),
            message,
        };
        let id = self.next_id.fetch_add(1, Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut m) = self.pending.lock() {
            m.insert(id, tx);
        }
        let req = AgentRequest {
            id,
            spec: ApiSpec::from(spec),
            ipv6_listener,
            source: source.map(|s| s.to_string()),
            bind_port,
        };
        let data = serde_json::to_vec(&req).map_err(|e| fail(libc::EINVAL, e.to_string()))?;
        let sock = match self.sock.lock() {
            Ok(s) => s.clone(),
            Err(_) => return Err(fail(libc::EPIPE, "dial agent: lock poisoned".into())),
        };
        if let Err(e) = sock.send(&data, &[]).await {
            if let Ok(mut m) = self.pending.lock() {
                m.remove(&id);
            }
            return Err(fail(libc::EPIPE, format!("dial agent: {e}")));
        }
        let (reply, mut fds, lost) = rx
            .await
            .map_err(|_| fail(libc::EPIPE, "the dial agent is gone".into()))?;
        let fd = fds.pop();
        if !reply.ok {
            return Err(DialFailure {
                errno: reply.errno,
                message: reply.message.unwrap_or_else(|| "dial failed".into()),
            });
        }
        let fd = match (fd, lost) {
            (Some(fd), _) => fd,
            (None, Some(e)) => return Err(socket_lost(&e)),
            (None, None) => {
                return Err(fail(libc::EPROTO, "agent replied without a socket".into()))
            }
        };
        let reached = reply
            .reached
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        Ok((fd, reached))
    }
}

/// Asks the agent to dial: it applies the same rules in the child and
/// passes the connected socket back.
impl Dial for AgentClient {
    fn netns_cookie(&self) -> Option<u64> {
        self.pool.netns_cookie()
    }

    fn preserves_source(&self) -> bool {
        match self.fallback() {
            Some(d) => d.preserves_source(),
            None => self.source_ip.load(Relaxed),
        }
    }

    fn tcp<'a>(&'a self, req: DialRequest<'a>) -> DialFuture<'a, TcpStream> {
        if let Some(d) = self.fallback() {
            return Box::pin(async move { d.tcp(req).await });
        }
        let local = self.local_dialer(&req, false);
        let preserved = match local {
            None => self.preserving(&req),
            Some(_) => None,
        };
        Box::pin(async move {
            if let Some(r) = dial_local(local, |d| async move { d.tcp(req).await }).await {
                return r;
            }
            if let Some((client, addresses)) = preserved {
                let pool = &self.pool;
                let dial = |addr| dial_preserved(pool, client, addr, &addresses);
                match dial::execute(req.plan(), dial).await {
                    Err(f) if f.errno == Some(libc::EAGAIN) => {}
                    r => return r.map_err(netns::explain),
                }
            }
            let (fd, reached) = self
                .request(req.spec, req.ipv6_listener, req.source, req.bind_port)
                .await?;
            let fail = |e: io::Error| DialFailure::new(libc::EIO, e.to_string());
            let std = std::net::TcpStream::from(fd);
            std.set_nonblocking(true).map_err(fail)?;
            TcpStream::from_std(std).map(|s| (s, reached)).map_err(fail)
        })
    }

    fn udp<'a>(&'a self, req: DialRequest<'a>) -> DialFuture<'a, OwnedFd> {
        if let Some(d) = self.fallback() {
            return Box::pin(async move { d.udp(req).await });
        }
        let local = self.local_dialer(&req, true);
        Box::pin(async move {
            if let Some(r) = dial_local(local, |d| async move { d.udp(req).await }).await {
                return r;
            }
            self.request(req.spec, req.ipv6_listener, req.source, None)
                .await
        })
    }

    fn udp_closed(&self, reached: SocketAddr, local: SocketAddr) {
        let msg = AgentFlowClosed {
            udp_closed: [reached.to_string(), local.to_string()],
        };
        let (Ok(data), Ok(sock)) = (serde_json::to_vec(&msg), self.sock.lock()) else {
            return;
        };
        let sock = sock.clone();
        // Best effort: a lost message leaves one narrow rule until the agent
        // exits (and removes them all).
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move {
                let _ = sock.send(&data, &[]).await;
            });
        }
    }
}

/// Dials with `local` ([`AgentClient::local_dialer`]'s answer): `None`
/// when there is no such dialer, or when its sockets made ahead ran out
/// mid-dial (EAGAIN, an IPv4 fallback): the agent dials then.
async fn dial_local<T, F, Fut>(
    local: Option<ChildDialer>,
    dial: F,
) -> Option<Result<(T, SocketAddr), DialFailure>>
where
    F: FnOnce(ChildDialer) -> Fut,
    Fut: std::future::Future<Output = Result<(T, SocketAddr), DialFailure>>,
{
    match dial(local?).await {
        Err(f) if f.errno == Some(libc::EAGAIN) => None,
        r => Some(r),
    }
}

// A reply's sockets must fit in what a receive makes room for.
const _: () = assert!(AGENT_MAX_SOCKETS as usize <= sys::MAX_FDS);

/// Dials `addr` for `client` from a transparent socket of `pool` bound to
/// the client's address, as the agent would. Whatever the agent would do
/// otherwise (dial from the child's own address, with a line in its log,
/// because the source does not apply or cannot be bound; wait for the
/// client's address and port to be free toward the target), and an empty
/// pool, fail with EAGAIN: the agent dials then.
async fn dial_preserved(
    pool: &SocketPool,
    client: SocketAddr,
    addr: SocketAddr,
    addresses: &HashSet<IpAddr>,
) -> io::Result<TcpStream> {
    let again = || io::Error::from_raw_os_error(libc::EAGAIN);
    let source = srcip::source_for(client, addr, addresses).map_err(|_| again())?;
    let kind = Kind {
        ipv6: addr.is_ipv6(),
        udp: false,
        transparent: true,
    };
    let fd = pool.take(kind).ok_or_else(again)?;
    socket2::SockRef::from(&fd)
        .bind(&source.into())
        .map_err(|_| again())?;
    match netns::connect(fd, addr).await {
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Err(again()),
        r => r,
    }
}

/// A pool of sockets the agent behind `sock` makes ahead: a top-up is one
/// [`AgentSockets`] request, whose reply carries the sockets.
fn agent_pool(
    sock: Arc<Mutex<Arc<SeqPacket>>>,
    pending: Pending,
    next_id: Arc<AtomicU64>,
    addresses: Addresses,
) -> Arc<SocketPool> {
    let me: Arc<std::sync::OnceLock<std::sync::Weak<SocketPool>>> = Default::default();
    let weak = me.clone();
    let pool = SocketPool::new(Box::new(move |kind: Kind| {
        let Some(pool) = weak.get().and_then(std::sync::Weak::upgrade) else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            pool.filled(kind);
            return;
        };
        let (sock, pending) = (sock.lock().ok().map(|s| s.clone()), pending.clone());
        let addresses = addresses.clone();
        let id = next_id.fetch_add(1, Relaxed);
        rt.spawn(async move {
            let want = u8::try_from(pool.missing(kind))
                .unwrap_or(AGENT_MAX_SOCKETS)
                .min(AGENT_MAX_SOCKETS);
            let msg = AgentSockets {
                id,
                sockets: want,
                ipv6: kind.ipv6,
                udp: kind.udp,
                transparent: kind.transparent,
            };
            let (tx, rx) = oneshot::channel();
            if let Ok(mut m) = pending.lock() {
                m.insert(id, tx);
            }
            let sent = match (sock, serde_json::to_vec(&msg)) {
                (Some(sock), Ok(data)) => sock.send(&data, &[]).await.is_ok(),
                _ => false,
            };
            if sent {
                match rx.await {
                    Ok((reply, fds, _)) if reply.ok => {
                        tracing::debug!(
                            sockets = fds.len(),
                            ?kind,
                            "sockets made ahead by the agent"
                        );
                        if let (Some(a), Ok(mut held)) = (reply.addresses, addresses.lock()) {
                            *held = Some((Instant::now(), Arc::new(a.into_iter().collect())));
                        }
                        pool.add_received(kind, fds);
                    }
                    r => tracing::debug!(ok = r.is_ok(), "no sockets from the agent"),
                }
            } else if let Ok(mut m) = pending.lock() {
                m.remove(&id);
            }
            pool.filled(kind);
        });
    }));
    let _ = me.set(Arc::downgrade(&pool));
    pool
}

/// A client at the loopback address every namespace owns (127.0.0.1,
/// ::1, or 127.0.0.1 mapped into IPv6): the child has it too, so the
/// agent would not preserve it.
fn is_child_loopback(client: SocketAddr) -> bool {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    match client.ip().to_canonical() {
        IpAddr::V4(v4) => v4 == Ipv4Addr::LOCALHOST,
        IpAddr::V6(v6) => v6 == Ipv6Addr::LOCALHOST,
    }
}

/// The dial failure for a socket the agent dialed and sent that this
/// process could not take: named by its cause (out of descriptors, with
/// what to change), since the agent did its part.
fn socket_lost(e: &io::Error) -> DialFailure {
    let why = match sys::descriptor_hint(e) {
        Some(hint) => format!("{e}: {hint}"),
        None => e.to_string(),
    };
    DialFailure {
        errno: Some(e.raw_os_error().unwrap_or(libc::EPROTO)),
        message: format!("the forwarder could not take the socket the dial agent connected: {why}"),
    }
}

/// How long a starting agent may take to greet.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits (blocking, no runtime needed) for the agent's greeting on a
/// connected socket; returns whether source preservation is on there.
fn await_hello(fd: &OwnedFd, timeout: Duration) -> io::Result<bool> {
    if !sys::wait_readable(fd.as_fd(), timeout)? {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no greeting from the dial agent within {timeout:?}"),
        ));
    }
    let mut buf = [0u8; MAX_MESSAGE];
    let n = nix::sys::socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
    check_hello(&buf[..n])
}

/// Whether a datagram is the agent's greeting, and whether it says source
/// preservation is on.
fn check_hello(data: &[u8]) -> io::Result<bool> {
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    if data.is_empty() {
        return Err(bad("the dial agent exited before greeting".into()));
    }
    let hello: AgentReply = serde_json::from_slice(data)
        .map_err(|e| bad(format!("the dial agent's greeting is not valid: {e}")))?;
    if hello.id == 0 && hello.ok && hello.message.as_deref() == Some(AGENT_HELLO) {
        Ok(hello.source_ip == Some(true))
    } else {
        Err(bad(format!(
            "unexpected greeting from the dial agent: {hello:?}"
        )))
    }
}

/// Decodes a reply from the agent (the forwarder's side).
pub(crate) fn decode_reply(data: &[u8]) -> Option<AgentReply> {
    serde_json::from_slice(data).ok()
}
