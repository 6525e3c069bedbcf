//! Dialing inside the child network namespace.
//!
//! A socket belongs to the namespace of the thread that created it, for its
//! whole life. So one OS thread enters the child namespace once, at start,
//! and does nothing but create sockets on request; the connect itself then
//! runs on the tokio runtime like any other socket operation. Where the
//! namespace is the process's own (the agent, which runs inside the
//! child), the caller's thread makes the socket itself.
//!
//! A round trip to that thread costs two wake-ups, so sockets are made
//! ahead: each kind (TCP or UDP, IPv4 or IPv6, see [`Kind`]) has a pool of
//! up to [`POOL_SIZE`] idle sockets, which a dial takes from. The first
//! dial of a kind asks the thread for its socket and for the pool to be
//! filled; a dial that leaves fewer than [`POOL_LOW`] asks for a top-up,
//! which the thread makes in one go, off the connection's path. An empty
//! pool (a burst) is no error: the dial asks the thread for its own socket.
//! A kind no dial asked for stays empty. The idle sockets are counted in
//! the stats (`pooled.sockets`) and close with the dialer.
//!
//! With source preservation ([`ChildDialer::with_source_ip`], in the agent
//! only, which holds the capabilities for it) the caller's thread makes the
//! new socket transparent and binds it to the client's address before the
//! connect, and adds a UDP flow's return rule ([`crate::child::srcip`]); where that
//! does not apply the dial is as without it, the reason logged once.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::child::dial::{self, Dial, DialFuture, DialRequest};
use crate::child::srcip::{self, Routing, Skip};
use crate::sys;

/// Why the child namespace could not be used.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}: {cause}")]
    Open { path: PathBuf, cause: io::Error },
    #[error(
        "cannot enter network namespace {path}: {cause} (entering another process's network \
         namespace needs CAP_SYS_ADMIN over its user namespace: run as root or as the namespace's owner)"
    )]
    Enter { path: PathBuf, cause: io::Error },
    #[error("{path} is not a network namespace (expected /run/netns/NAME or /proc/PID/ns/net)")]
    NotNetns { path: PathBuf },
    #[error("the child namespace's socket thread has stopped")]
    Gone,
}

/// What the socket thread is asked for.
enum Request {
    /// One socket of a kind, sent back.
    One(Kind, oneshot::Sender<io::Result<OwnedFd>>),
    /// Top the pool of a kind up to [`POOL_SIZE`].
    Fill(Kind),
}

/// A kind of socket made ahead: its family and protocol, and whether it
/// is ready for a preserved source (TCP only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind {
    pub ipv6: bool,
    pub udp: bool,
    /// Made with [`srcip::make_transparent`]: only a thread with the
    /// capabilities for it (the agent's) can make these.
    pub transparent: bool,
}

/// How many kinds there are ([`Kind::index`]).
const KINDS: usize = 8;

impl Kind {
    /// A new, unconnected socket of this kind in the calling thread's
    /// namespace.
    pub fn socket(self) -> io::Result<OwnedFd> {
        if self.udp {
            return sys::udp_socket(self.ipv6);
        }
        let fd = sys::tcp_socket(self.ipv6)?;
        if self.transparent {
            srcip::make_transparent(fd.as_fd(), self.ipv6)?;
        }
        Ok(fd)
    }

    /// Whether `fd` is a socket of this kind (what a peer sent in its
    /// place is checked before it is pooled).
    pub fn matches(self, fd: &OwnedFd) -> bool {
        let s = socket2::SockRef::from(fd);
        let ty = if self.udp {
            socket2::Type::DGRAM
        } else {
            socket2::Type::STREAM
        };
        let domain = if self.ipv6 {
            socket2::Domain::IPV6
        } else {
            socket2::Domain::IPV4
        };
        s.r#type().is_ok_and(|t| t == ty) && s.domain().is_ok_and(|d| d == domain)
    }

    fn index(self) -> usize {
        usize::from(self.ipv6) + 2 * usize::from(self.udp) + 4 * usize::from(self.transparent)
    }
}

/// Idle sockets a kind's pool is topped up to.
pub const POOL_SIZE: usize = 8;
/// A dial that leaves fewer idle sockets than this asks for a top-up.
pub const POOL_LOW: usize = 4;

/// Idle sockets in every dialer's pools, for the stats.
static POOLED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Sockets idle in the pools of the child namespace's dialers.
pub fn pooled_sockets() -> usize {
    POOLED.load(Relaxed)
}

/// Asks for a top-up of a kind's pool, off the caller's path.
pub type Refill = Box<dyn Fn(Kind) + Send + Sync>;

/// Sockets made ahead in the child, by [`Kind`]: by the socket thread in
/// root mode, by the agent (rootless) through [`SocketPool::new`]'s refill.
pub struct SocketPool {
    idle: Mutex<[Vec<OwnedFd>; KINDS]>,
    /// The cookie of the namespace the sockets were made in, from the
    /// first one added.
    netns: std::sync::OnceLock<u64>,
    /// A top-up of the kind is asked for and not done yet.
    filling: [std::sync::atomic::AtomicBool; KINDS],
    refill: Refill,
}

impl SocketPool {
    /// An empty pool whose top-ups `refill` asks for; it must end in
    /// [`SocketPool::add`] and [`SocketPool::filled`].
    pub fn new(refill: Refill) -> Arc<Self> {
        Arc::new(SocketPool {
            idle: Mutex::new(Default::default()),
            netns: std::sync::OnceLock::new(),
            filling: Default::default(),
            refill,
        })
    }

    /// An idle socket of the kind, if any; asks for a top-up when few
    /// are left, or none.
    pub fn take(&self, kind: Kind) -> Option<OwnedFd> {
        let (fd, left) = match self.idle.lock() {
            Ok(mut idle) => {
                let v = &mut idle[kind.index()];
                (v.pop(), v.len())
            }
            Err(_) => (None, 0),
        };
        if fd.is_some() {
            POOLED.fetch_sub(1, Relaxed);
        }
        if left < POOL_LOW {
            self.want(kind);
        }
        fd
    }

    /// Whether a socket of the kind is idle; asks for a top-up if not.
    pub fn ready(&self, kind: Kind) -> bool {
        let ready = self
            .idle
            .lock()
            .map(|i| !i[kind.index()].is_empty())
            .unwrap_or(false);
        if !ready {
            self.want(kind);
        }
        ready
    }

    /// Asks for a top-up unless one is under way.
    pub fn want(&self, kind: Kind) {
        if !self.filling[kind.index()].swap(true, Relaxed) {
            (self.refill)(kind);
        }
    }

    /// How many sockets of the kind a top-up should make.
    pub fn missing(&self, kind: Kind) -> usize {
        let have = self
            .idle
            .lock()
            .map(|i| i[kind.index()].len())
            .unwrap_or(POOL_SIZE);
        POOL_SIZE.saturating_sub(have)
    }

    /// The cookie of the namespace the pool's sockets live in, once one
    /// was added.
    pub fn netns_cookie(&self) -> Option<u64> {
        self.netns.get().copied()
    }

    /// Adds sockets of the kind this process made.
    fn add(&self, kind: Kind, made: Vec<OwnedFd>) {
        let n = made.len();
        if self.netns.get().is_none() {
            if let Some(c) = made.first().and_then(|f| sys::netns_cookie(f.as_fd()).ok()) {
                let _ = self.netns.set(c);
            }
        }
        if let Ok(mut idle) = self.idle.lock() {
            idle[kind.index()].extend(made);
            POOLED.fetch_add(n, Relaxed);
        }
    }

    /// Adds sockets of the kind another process (the agent) sent; any
    /// that is not of the kind is closed.
    pub fn add_received(&self, kind: Kind, mut made: Vec<OwnedFd>) {
        made.retain(|f| kind.matches(f));
        self.add(kind, made);
    }

    /// The kind's top-up is done (or failed: the next dial asks again).
    pub fn filled(&self, kind: Kind) {
        self.filling[kind.index()].store(false, Relaxed);
    }

    /// On the socket thread: makes the kind's missing sockets. A failure
    /// (out of descriptors) ends the top-up; the next dial asks again.
    fn fill(&self, kind: Kind) {
        let made: Vec<OwnedFd> = (0..self.missing(kind))
            .map_while(|_| kind.socket().ok())
            .collect();
        self.add(kind, made);
        self.filled(kind);
    }
}

impl Drop for SocketPool {
    fn drop(&mut self) {
        if let Ok(idle) = self.idle.get_mut() {
            POOLED.fetch_sub(idle.iter().map(Vec::len).sum(), Relaxed);
        }
    }
}

/// Creates sockets in the child namespace and dials with them.
#[derive(Clone)]
pub struct ChildDialer {
    /// The socket thread; none for a dialer whose sockets all come from
    /// its pool ([`ChildDialer::from_pool`]).
    tx: Option<mpsc::Sender<Request>>,
    /// Sockets made ahead by the socket thread.
    pool: Arc<SocketPool>,
    /// The namespace is this process's own: sockets are made by the
    /// caller's thread, without a round trip to the socket thread (the
    /// agent, which runs inside the child).
    inline: bool,
    /// Source address preservation, when on ([`crate::child::srcip`]).
    source_ip: Option<Arc<SourceIp>>,
}

/// Source preservation's state in a dialer: the routing installed in the
/// child and which fallbacks were logged already.
pub struct SourceIp {
    routing: Routing,
    logged: AtomicU8,
    /// The child's own addresses, read at most every [`LOCAL_TTL`].
    local: Mutex<Option<(Instant, Arc<HashSet<IpAddr>>)>>,
}

/// [`SourceIp::log_once`] bits beyond the [`Skip`] reasons.
const LOG_BIND_FAILED: u8 = Skip::RemoteTarget as u8 + 1;
const LOG_NO_RETURN_RULE: u8 = Skip::RemoteTarget as u8 + 2;
const LOG_TUPLE_BUSY: u8 = Skip::RemoteTarget as u8 + 3;

/// The waits, in milliseconds, after each preserved dial that finds the
/// client's address and port still connected to the target
/// ([`ChildDialer::connect_from`]): 15 ms in all.
const TUPLE_WAITS_MS: [u64; 4] = [1, 2, 4, 8];

/// How long the child's address list is taken as current: reading it is a
/// netlink dump, too dear for every dial of a burst of new connections.
/// An address added to the child meanwhile is seen that much later.
pub const LOCAL_TTL: Duration = Duration::from_millis(500);

impl SourceIp {
    /// The source to bind for a dial of `target` by `client`, or `None`
    /// (logged once per reason).
    fn source(&self, client: SocketAddr, target: SocketAddr) -> Option<SocketAddr> {
        match srcip::source_for(client, target, &self.local_addresses()) {
            Ok(s) => Some(s),
            Err(why) => {
                self.log_once(why as u8, &why.to_string(), client, target);
                None
            }
        }
    }

    /// The child's own addresses, read at most [`LOCAL_TTL`] ago.
    pub fn local_addresses(&self) -> Arc<HashSet<IpAddr>> {
        let now = Instant::now();
        let Ok(mut cached) = self.local.lock() else {
            return Arc::new(srcip::local_addresses());
        };
        match &*cached {
            Some((at, set)) if now.duration_since(*at) < LOCAL_TTL => set.clone(),
            _ => {
                let set = Arc::new(srcip::local_addresses());
                *cached = Some((now, set.clone()));
                set
            }
        }
    }

    fn log_once(&self, bit: u8, why: &str, client: SocketAddr, target: SocketAddr) {
        let bit = 1u8 << bit;
        if self.logged.fetch_or(bit, Relaxed) & bit == 0 {
            tracing::info!(%client, %target,
                "this connection reaches the child from the forwarder's address, not the client's: {why} (logged once)");
        }
    }

    /// Logs, once, that `src` could not be bound for a dial (the dial
    /// then goes on from the child's own address).
    fn bind_failed(&self, src: SocketAddr, e: &io::Error, client: SocketAddr, target: SocketAddr) {
        self.log_once(
            LOG_BIND_FAILED,
            &format!("cannot bind {src} in the child: {e}"),
            client,
            target,
        );
    }

    /// The routing installed in the child.
    pub fn routing(&self) -> &Routing {
        &self.routing
    }
}

impl ChildDialer {
    /// Opens `path` (`/run/netns/NAME` or `/proc/PID/ns/net`) and starts the
    /// socket thread inside it; the thread then drops every capability.
    /// Fails at once if the namespace cannot be entered. Needs no runtime.
    pub fn new(path: &Path) -> Result<Self, NetnsError> {
        Self::start(path, false)
    }

    /// As [`Self::new`], for a forwarder that does not preserve source
    /// addresses: first, while its thread still holds its capabilities
    /// there, removes what an earlier run's source preservation left in
    /// the namespace ([`srcip::clean_stale`]).
    pub fn new_cleaning(path: &Path) -> Result<Self, NetnsError> {
        Self::start(path, true)
    }

    fn start(path: &Path, clean: bool) -> Result<Self, NetnsError> {
        let ns = File::open(path).map_err(|cause| NetnsError::Open {
            path: path.to_owned(),
            cause,
        })?;
        // Already there (e.g. /proc/self/ns/net): nothing to enter, which
        // also needs no privilege.
        let same = match (ns.metadata(), std::fs::metadata("/proc/thread-self/ns/net")) {
            (Ok(a), Ok(b)) => {
                use std::os::unix::fs::MetadataExt;
                a.dev() == b.dev() && a.ino() == b.ino()
            }
            _ => false,
        };
        let (tx, rx) = mpsc::channel::<Request>();
        let fill_tx = Mutex::new(tx.clone());
        let pool = SocketPool::new(Box::new(move |kind| {
            if let Ok(tx) = fill_tx.lock() {
                let _ = tx.send(Request::Fill(kind));
            }
        }));
        // Weak: the pool (whose refill holds a sender) goes with the last
        // dialer, and the thread with it.
        let thread_pool = Arc::downgrade(&pool);
        let (ready_tx, ready_rx) = mpsc::channel::<io::Result<()>>();
        let thread = thread::Builder::new()
            .name("child-netns".into())
            .spawn(move || {
                // Once inside, this thread gives up every capability: it
                // only creates sockets, which needs none. It gives them up
                // when it could not enter too: until the kernel has reaped
                // it, an exiting thread still shows in /proc with the
                // capabilities it was created with.
                let entered = if same {
                    Ok(())
                } else {
                    sys::setns_net(ns.as_fd())
                };
                if clean && entered.is_ok() {
                    clean_stale_logged();
                }
                let dropped = sys::drop_thread_capabilities(&[]);
                let entered = entered.and(dropped);
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                drop(ns);
                if !ok {
                    return;
                }
                while let Ok(req) = rx.recv() {
                    match req {
                        Request::One(kind, reply) => {
                            let _ = reply.send(kind.socket());
                        }
                        Request::Fill(kind) => {
                            if let Some(pool) = thread_pool.upgrade() {
                                pool.fill(kind);
                            }
                        }
                    }
                }
            })
            .map_err(|cause| NetnsError::Enter {
                path: path.to_owned(),
                cause,
            })?;
        let r = match ready_rx.recv() {
            Ok(Ok(())) => {
                return Ok(ChildDialer {
                    tx: Some(tx),
                    pool,
                    inline: same,
                    source_ip: None,
                })
            }
            // setns(CLONE_NEWNET) answers EINVAL for a file that is not a
            // network namespace (EPERM is the permission case).
            Ok(Err(cause)) if cause.raw_os_error() == Some(libc::EINVAL) => {
                Err(NetnsError::NotNetns {
                    path: path.to_owned(),
                })
            }
            Ok(Err(cause)) => Err(NetnsError::Enter {
                path: path.to_owned(),
                cause,
            }),
            Err(_) => Err(NetnsError::Gone),
        };
        // The thread has ended or is ending: wait for it, so the process is
        // single-threaded again when the caller goes on (joining a user
        // namespace, as the agent's start does, needs that of the forking
        // process's child only, but a clean state is cheap).
        let _ = thread.join();
        r
    }

    /// Dials with the client's address as the source, through `routing`
    /// (installed in this namespace by the caller).
    pub fn with_source_ip(mut self, routing: Routing) -> Self {
        self.source_ip = Some(Arc::new(SourceIp {
            routing,
            logged: AtomicU8::new(0),
            local: Mutex::new(None),
        }));
        self
    }

    /// Source preservation's state, when on.
    pub fn source_ip(&self) -> Option<&Arc<SourceIp>> {
        self.source_ip.as_ref()
    }

    async fn raw_socket(&self, ipv6: bool, udp: bool) -> io::Result<OwnedFd> {
        let kind = Kind {
            ipv6,
            udp,
            transparent: false,
        };
        if self.inline {
            return kind.socket();
        }
        if let Some(fd) = self.pool.take(kind) {
            return Ok(fd);
        }
        let Some(thread) = &self.tx else {
            // No socket made ahead is left: EAGAIN, which the pool's
            // filler reads as "dial another way".
            return Err(io::Error::from_raw_os_error(libc::EAGAIN));
        };
        let (tx, rx) = oneshot::channel();
        thread
            .send(Request::One(kind, tx))
            .map_err(|_| io::Error::other(NetnsError::Gone))?;
        rx.await.map_err(|_| io::Error::other(NetnsError::Gone))?
    }

    /// A dialer whose sockets all come from `pool`, filled by someone else
    /// (the agent, for a rootless forwarder): a dial fails with EAGAIN when
    /// the pool of its kind is empty. No source preservation.
    pub fn from_pool(pool: Arc<SocketPool>) -> Self {
        ChildDialer {
            tx: None,
            pool,
            inline: false,
            source_ip: None,
        }
    }

    /// Creates a TCP socket of the given family inside the child namespace.
    pub async fn socket(&self, ipv6: bool) -> io::Result<OwnedFd> {
        self.raw_socket(ipv6, false).await
    }

    /// Creates a UDP socket inside the child namespace and connects it to
    /// `addr` (connecting a UDP socket sends nothing and does not block).
    pub async fn connect_udp(&self, addr: SocketAddr) -> io::Result<OwnedFd> {
        let fd = self.raw_socket(addr.is_ipv6(), true).await?;
        socket2::SockRef::from(&fd).connect(&addr.into())?;
        Ok(fd)
    }

    /// Connects to `addr` from `port` of the unspecified address where that
    /// port can be bound ([`DialRequest::bind_port`]), else from any port.
    async fn connect_port(&self, addr: SocketAddr, port: Option<u16>) -> io::Result<TcpStream> {
        let sock = self.socket(addr.is_ipv6()).await?;
        if let Some(port) = port {
            let any: std::net::IpAddr = if addr.is_ipv6() {
                std::net::Ipv6Addr::UNSPECIFIED.into()
            } else {
                std::net::Ipv4Addr::UNSPECIFIED.into()
            };
            if let Err(e) = socket2::SockRef::from(&sock).bind(&SocketAddr::new(any, port).into()) {
                tracing::debug!(port, error = %e, "cannot bind the dial's port; dialing from an ephemeral one");
                return connect(self.socket(addr.is_ipv6()).await?, addr).await;
            }
        }
        connect(sock, addr).await
    }

    /// Connects to `addr` from `client`'s address and port where source
    /// preservation applies, else from any address and port.
    async fn connect_from(
        &self,
        addr: SocketAddr,
        client: SocketAddr,
        port: Option<u16>,
    ) -> io::Result<TcpStream> {
        let Some(s) = &self.source_ip else {
            return self.connect_port(addr, port).await;
        };
        let Some(src) = s.source(client, addr) else {
            return self.connect_port(addr, port).await;
        };
        // The client's address and port toward this target can still be
        // held by the dial of its previous connection: the client's own
        // socket is gone as soon as it has closed, ours a moment later, and
        // a client that reuses its port at once (a tight loop of short
        // connections) can come back within that moment. A few short waits
        // cover that; a tuple held for longer (a client reaching two ports
        // that lead to one target, from one address and port, at once)
        // dials from the child's own address, logged once.
        for wait_ms in TUPLE_WAITS_MS {
            let sock = self.socket(addr.is_ipv6()).await?;
            if let Err(e) = srcip::bind_transparent(sock.as_fd(), src) {
                s.bind_failed(src, &e, client, addr);
                return self.connect_port(addr, port).await;
            }
            match connect(sock, addr).await {
                Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
                    tokio::time::sleep(Duration::from_millis(wait_ms)).await;
                }
                r => return r,
            }
        }
        s.log_once(
            LOG_TUPLE_BUSY,
            &format!("{src} is still connected to {addr} in the child"),
            client,
            addr,
        );
        self.connect_port(addr, port).await
    }

    /// A UDP socket connected to `addr` from `client`'s address and port
    /// where source preservation applies (with the flow's return rule
    /// added), else as [`Self::connect_udp`].
    async fn connect_udp_from(&self, addr: SocketAddr, client: SocketAddr) -> io::Result<OwnedFd> {
        let Some(s) = &self.source_ip else {
            return self.connect_udp(addr).await;
        };
        let Some(src) = s.source(client, addr) else {
            return self.connect_udp(addr).await;
        };
        let fd = self.raw_socket(addr.is_ipv6(), true).await?;
        if let Err(e) = srcip::bind_transparent(fd.as_fd(), src) {
            s.bind_failed(src, &e, client, addr);
            return self.connect_udp(addr).await;
        }
        if let Err(e) = s.routing.add_flow(addr, src) {
            s.log_once(
                LOG_NO_RETURN_RULE,
                &format!("cannot return its replies: {e}"),
                client,
                addr,
            );
            return self.connect_udp(addr).await;
        }
        if let Err(e) = socket2::SockRef::from(&fd).connect(&addr.into()) {
            let _ = s.routing.remove_flow(addr, src);
            return Err(e);
        }
        Ok(fd)
    }
}

/// [`srcip::clean_stale`] in this thread's namespace, saying what it did;
/// a namespace this process may not change has nothing of ours in it.
pub fn clean_stale_logged() {
    match srcip::clean_stale() {
        Ok(0) => {}
        Ok(removed) => tracing::info!(
            removed,
            "removed the source-address routing an earlier run left in the child"
        ),
        Err(e) => {
            tracing::debug!(error = %e, "cannot look for an earlier run's source-address routing")
        }
    }
}

/// The cookie of the network namespace at `path` (`SO_NETNS_COOKIE` of a
/// socket made there by a short-lived thread; entering needs CAP_SYS_ADMIN
/// over the namespace's owner).
pub fn netns_cookie(path: &Path) -> io::Result<u64> {
    let ns = File::open(path)?;
    thread::scope(|s| {
        s.spawn(|| {
            sys::setns_net(ns.as_fd())?;
            let sock = sys::tcp_socket(false)?;
            sys::netns_cookie(sock.as_fd())
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the namespace probe thread panicked")))
    })
}

/// A dial failure that ran out of descriptors also says which limit and
/// what to change ([`sys::descriptor_hint`]).
pub(crate) fn explain(mut f: dial::DialFailure) -> dial::DialFailure {
    let e = f.errno.map(io::Error::from_raw_os_error);
    if let Some(hint) = e.as_ref().and_then(sys::descriptor_hint) {
        f.message = format!("{}: {hint}", f.message);
    }
    f
}

/// Connects the non-blocking TCP socket `fd` to `addr`, without a round
/// through the event loop when the handshake is over inside the call (a
/// server on this host, see [`sys::connect_now`]).
pub(crate) async fn connect(fd: OwnedFd, addr: SocketAddr) -> io::Result<TcpStream> {
    let done = sys::connect_now(fd.as_fd(), addr)?;
    let stream = TcpStream::from_std(std::net::TcpStream::from(fd))?;
    if !done {
        stream.writable().await?;
        if let Some(e) = stream.take_error()? {
            return Err(e);
        }
    }
    Ok(stream)
}

/// Executes the request's [`dial::DialPlan`] in this namespace. For UDP the
/// IPv4 fallback applies when the connect fails for lack of IPv6 (no route
/// or no address in the child).
impl Dial for ChildDialer {
    fn netns_cookie(&self) -> Option<u64> {
        self.pool.netns_cookie()
    }

    fn preserves_source(&self) -> bool {
        self.source_ip.is_some()
    }

    fn tcp<'a>(&'a self, req: DialRequest<'a>) -> DialFuture<'a, TcpStream> {
        let port = req.bind_port;
        Box::pin(async move {
            match req.source {
                Some(client) => {
                    dial::execute(req.plan(), move |a| self.connect_from(a, client, port)).await
                }
                None => dial::execute(req.plan(), move |a| self.connect_port(a, port)).await,
            }
            .map_err(explain)
        })
    }

    fn udp<'a>(&'a self, req: DialRequest<'a>) -> DialFuture<'a, OwnedFd> {
        Box::pin(async move {
            match req.source {
                Some(client) => {
                    dial::execute(req.plan(), move |a| self.connect_udp_from(a, client)).await
                }
                None => dial::execute(req.plan(), |a| self.connect_udp(a)).await,
            }
            .map_err(explain)
        })
    }

    fn udp_closed(&self, reached: SocketAddr, local: SocketAddr) {
        if let Some(s) = &self.source_ip {
            if let Err(e) = s.routing.remove_flow(reached, local) {
                tracing::warn!(error = %e, flow = %local, "cannot remove a UDP flow's return rule");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn sockets(n: usize) -> Vec<OwnedFd> {
        (0..n)
            .map(|_| sys::tcp_socket(false).expect("socket"))
            .collect()
    }

    #[test]
    fn a_pool_asks_once_for_a_top_up_and_only_when_low() {
        let v4 = Kind {
            ipv6: false,
            udp: false,
            transparent: false,
        };
        let asked = Arc::new(AtomicUsize::new(0));
        let a = asked.clone();
        let pool = SocketPool::new(Box::new(move |kind| {
            if kind
                == (Kind {
                    ipv6: false,
                    udp: false,
                    transparent: false,
                })
            {
                a.fetch_add(1, Relaxed);
            }
        }));
        // Empty: not ready, and one top-up is asked for, however often
        // it is asked while under way.
        assert!(!pool.ready(v4));
        assert!(pool.take(v4).is_none());
        assert_eq!(asked.load(Relaxed), 1);
        assert_eq!(pool.missing(v4), POOL_SIZE);
        pool.add(v4, sockets(POOL_SIZE));
        pool.filled(v4);
        assert!(pool.ready(v4));
        assert!(
            !pool.ready(Kind {
                ipv6: true,
                udp: false,
                transparent: false
            }),
            "the families are apart"
        );
        assert!(
            !pool.ready(Kind {
                ipv6: false,
                udp: true,
                transparent: false
            }),
            "the protocols are apart"
        );
        // What another process sent that is not of the kind is not pooled.
        pool.add_received(
            Kind {
                ipv6: false,
                udp: true,
                transparent: false,
            },
            sockets(1),
        );
        assert_eq!(
            pool.missing(Kind {
                ipv6: false,
                udp: true,
                transparent: false
            }),
            POOL_SIZE
        );
        // Taking down to the low mark asks for nothing; below it, once.
        for _ in 0..POOL_SIZE - POOL_LOW {
            assert!(pool.take(v4).is_some());
        }
        assert_eq!(asked.load(Relaxed), 1);
        assert!(pool.take(v4).is_some());
        assert_eq!(asked.load(Relaxed), 2);
        assert!(pool.take(v4).is_some());
        assert_eq!(asked.load(Relaxed), 2, "a top-up is under way");
        assert_eq!(pool.missing(v4), POOL_LOW + 2);
    }

    #[tokio::test]
    async fn a_dialer_from_a_pool_says_eagain_when_it_is_empty() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let addr = l.local_addr().expect("addr");
        let v4 = Kind {
            ipv6: false,
            udp: false,
            transparent: false,
        };
        let pool = SocketPool::new(Box::new(|_| {}));
        let d = ChildDialer::from_pool(pool.clone());
        let e = d.connect_port(addr, None).await.expect_err("no socket");
        assert_eq!(e.raw_os_error(), Some(libc::EAGAIN));
        pool.add(v4, sockets(1));
        d.connect_port(addr, None)
            .await
            .expect("connects a pooled socket");
        assert!(!pool.ready(v4));
        // A UDP dial takes a UDP socket of the target's family.
        let u = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        let to = u.local_addr().expect("addr");
        let e = d.connect_udp(to).await.expect_err("no UDP socket");
        assert_eq!(e.raw_os_error(), Some(libc::EAGAIN));
        let made = (0..2).map(|_| sys::udp_socket(false).expect("udp socket"));
        pool.add(
            Kind {
                ipv6: false,
                udp: true,
                transparent: false,
            },
            made.collect(),
        );
        let fd = d.connect_udp(to).await.expect("connects a pooled socket");
        assert_eq!(
            socket2::SockRef::from(&fd)
                .peer_addr()
                .ok()
                .and_then(|a| a.as_socket()),
            Some(to)
        );
        assert_eq!(
            pool.missing(Kind {
                ipv6: false,
                udp: true,
                transparent: false
            }),
            POOL_SIZE - 1
        );
    }
}
