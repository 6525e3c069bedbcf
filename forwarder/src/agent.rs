//! The child-side dial agent, for forwarders that may not enter the child's
//! network namespace.
//!
//! An unprivileged process cannot setns() into a network namespace owned by
//! another user namespace (it needs CAP_SYS_ADMIN there), which is why
//! RootlessKit dials from a child-side process. `forwarder child-agent`
//! runs inside the container's user and network namespaces and answers dial
//! requests over a SOCK_SEQPACKET Unix socket, returning each connected
//! socket as an SCM_RIGHTS descriptor, or an errno. It applies the same
//! rules as the in-process dialer ([`crate::dial`]), by running the same
//! code against its own namespace.
//!
//! Wire format, one datagram each way per dial (at most [`MAX_MESSAGE`]
//! bytes of JSON):
//! - request `{"id": N, "spec": PortSpec, "ipv6_listener": bool, "source":
//!   "ADDR"}` (`source`, the client's address, optional); a spec whose proto
//!   is udp, udp4 or udp6 asks for a connected UDP socket (a flow of
//!   [`crate::udp`]), any other for a connected TCP stream;
//! - `{"udp_closed": ["REACHED", "LOCAL"]}`: a flow's socket was closed, its
//!   return rule goes ([`crate::srcip`]); no reply;
//! - first, unasked, `{"id": 0, "ok": true, "message": "agent ready",
//!   "source_ip": bool}` once the agent has dropped its capabilities (the
//!   forwarder waits for it);
//! - reply `{"id": N, "ok": true, "reached": "ADDR"}` with the socket
//!   attached, or `{"id": N, "ok": false, "errno": E, "message": "..."}`.
//!
//! A malformed or oversized request gets an error reply, never a crash; a
//! request's work is bounded by the dial timeout. The agent holds no BPF
//! and serves no HTTP, and exits when its peer goes away (EOF on the socket
//! it was given, or its parent's death).

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::dial::{Dial, DialFailure, DialFuture, DialRequest};
use crate::netns::ChildDialer;
use crate::spec::{ApiSpec, PortSpec};
use crate::sys;
use crate::wire::{AgentFlowClosed, AgentReply, AgentRequest, AGENT_MAX_MESSAGE};

/// Largest request or reply.
pub const MAX_MESSAGE: usize = AGENT_MAX_MESSAGE;

/// How long the agent may spend on one dial.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// A SOCK_SEQPACKET socket registered with tokio.
struct Packet(AsyncFd<OwnedFd>);

impl Packet {
    fn new(fd: OwnedFd) -> io::Result<Packet> {
        nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .map_err(io::Error::from)?;
        sys::async_fd(fd, Interest::READABLE | Interest::WRITABLE).map(Packet)
    }

    /// Sends one datagram, optionally with a descriptor.
    async fn send(&self, data: &[u8], fd: Option<RawFd>) -> io::Result<()> {
        loop {
            let mut guard = self.0.writable().await?;
            let fds;
            let cmsg: Vec<ControlMessage> = match &fd {
                Some(f) => {
                    fds = [*f];
                    vec![ControlMessage::ScmRights(&fds)]
                }
                None => Vec::new(),
            };
            let iov = [IoSlice::new(data)];
            let r = sendmsg::<()>(
                self.0.get_ref().as_raw_fd(),
                &iov,
                &cmsg,
                MsgFlags::MSG_NOSIGNAL,
                None,
            );
            match r {
                Ok(_) => return Ok(()),
                Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Receives one datagram and any descriptors with it. `Ok(None)` at
    /// EOF; `truncated` when the datagram was larger than the buffer.
    async fn recv(&self, buf: &mut [u8]) -> io::Result<Option<(usize, bool, Vec<OwnedFd>)>> {
        loop {
            let mut guard = self.0.readable().await?;
            let mut space = nix::cmsg_space!([RawFd; 4]);
            let mut iov = [IoSliceMut::new(buf)];
            let r = recvmsg::<()>(
                self.0.get_ref().as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            );
            match r {
                Ok(msg) => {
                    let mut fds = Vec::new();
                    if let Ok(cmsgs) = msg.cmsgs() {
                        for c in cmsgs {
                            if let ControlMessageOwned::ScmRights(raw) = c {
                                fds.extend(sys::adopt_received(raw));
                            }
                        }
                    }
                    let n = msg.bytes;
                    let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
                    if n == 0 && !truncated && fds.is_empty() {
                        return Ok(None);
                    }
                    return Ok(Some((n, truncated, fds)));
                }
                Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Longest error message sent, in bytes: JSON escaping at most sextuples
/// it, so the reply stays within one [`MAX_MESSAGE`] datagram whatever the
/// request quoted back (a longer reply would be cut by the reader and its
/// dial never answered).
const MAX_ERROR_TEXT: usize = 512;

fn error_reply(id: u64, errno: i32, message: impl Into<String>) -> AgentReply {
    let mut message = message.into();
    if message.len() > MAX_ERROR_TEXT {
        let mut end = MAX_ERROR_TEXT;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str("...");
    }
    AgentReply {
        id,
        ok: false,
        errno: Some(errno),
        message: Some(message),
        ..Default::default()
    }
}

/// Decodes and validates one request: its id, the spec (checked as the API
/// checks one) and whether the connection was accepted on IPv6; or the
/// error reply to send.
/// A dial request as the agent understood it.
pub(crate) struct Decoded {
    pub id: u64,
    pub spec: PortSpec,
    pub ipv6_listener: bool,
    pub source: Option<SocketAddr>,
    pub bind_port: Option<u16>,
}

pub(crate) fn decode_request(data: &[u8]) -> Result<Decoded, AgentReply> {
    let req: AgentRequest = serde_json::from_slice(data)
        .map_err(|e| error_reply(0, libc::EINVAL, format!("malformed request: {e}")))?;
    let spec = PortSpec::try_from(&req.spec).map_err(|e| error_reply(req.id, libc::EINVAL, e))?;
    let source = match req.source.as_deref().map(str::parse) {
        None => None,
        Some(Ok(a)) => Some(a),
        Some(Err(_)) => {
            return Err(error_reply(
                req.id,
                libc::EINVAL,
                "source is not an address:port",
            ))
        }
    };
    Ok(Decoded {
        id: req.id,
        spec,
        ipv6_listener: req.ipv6_listener,
        source,
        bind_port: req.bind_port,
    })
}

/// Decodes a reply from the agent (the forwarder's side).
pub(crate) fn decode_reply(data: &[u8]) -> Option<AgentReply> {
    serde_json::from_slice(data).ok()
}

/// Handles one request: parse, validate, dial in this namespace.
async fn handle(dialer: &ChildDialer, data: &[u8]) -> (AgentReply, Option<OwnedFd>) {
    let Decoded {
        id,
        spec,
        ipv6_listener,
        source,
        bind_port,
    } = match decode_request(data) {
        Ok(r) => r,
        Err(reply) => return (reply, None),
    };
    let req = DialRequest {
        spec: &spec,
        ipv6_listener,
        source,
        bind_port,
    };
    let dialed = if spec.proto.is_udp() {
        tokio::time::timeout(DIAL_TIMEOUT, dialer.udp(req)).await
    } else {
        tokio::time::timeout(DIAL_TIMEOUT, async {
            let (stream, reached) = dialer.tcp(req).await?;
            let fd = stream
                .into_std()
                .map(OwnedFd::from)
                .map_err(|e| DialFailure {
                    errno: e.raw_os_error(),
                    message: e.to_string(),
                })?;
            Ok((fd, reached))
        })
        .await
    };
    match dialed {
        Ok(Ok((stream, reached))) => (
            AgentReply {
                id,
                ok: true,
                reached: Some(reached.to_string()),
                ..Default::default()
            },
            Some(stream),
        ),
        Ok(Err(f)) => (
            error_reply(id, f.errno.unwrap_or(libc::EIO), f.message),
            None,
        ),
        Err(_) => (error_reply(id, libc::ETIMEDOUT, "dial timed out"), None),
    }
}

/// The greeting the agent sends first on every connection, once it holds
/// no capability and is ready to dial (a reply with id 0).
const HELLO: &str = "agent ready";

/// Serves one connected socket until the peer goes away.
async fn serve_conn(fd: OwnedFd, dialer: ChildDialer) -> io::Result<()> {
    let sock = Arc::new(Packet::new(fd)?);
    let hello = AgentReply {
        id: 0,
        ok: true,
        message: Some(HELLO.into()),
        source_ip: Some(dialer.source_ip().is_some()),
        ..Default::default()
    };
    send_reply(&sock, &hello, None).await?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    while let Some((n, truncated, fds)) = sock.recv(&mut buf).await? {
        drop(fds); // requests carry no descriptors; close any sent anyway
        if truncated {
            let r = error_reply(
                0,
                libc::EMSGSIZE,
                format!("request larger than {MAX_MESSAGE} bytes"),
            );
            let _ = send_reply(&sock, &r, None).await;
            continue;
        }
        if let Ok(c) = serde_json::from_slice::<AgentFlowClosed>(&buf[..n]) {
            if let [Ok(reached), Ok(local)] = c.udp_closed.map(|a| a.parse::<SocketAddr>()) {
                dialer.udp_closed(reached, local);
            }
            continue;
        }
        let data = buf[..n].to_vec();
        let (sock, dialer) = (sock.clone(), dialer.clone());
        tokio::spawn(async move {
            let (reply, dialed) = handle(&dialer, &data).await;
            let fd = dialed.as_ref().map(|s| s.as_fd().as_raw_fd());
            if let Err(e) = send_reply(&sock, &reply, fd).await {
                tracing::debug!(error = %e, "cannot send a reply; the forwarder is gone?");
            }
        });
    }
    Ok(())
}

async fn send_reply(sock: &Packet, reply: &AgentReply, fd: Option<RawFd>) -> io::Result<()> {
    let data = serde_json::to_vec(reply).map_err(io::Error::other)?;
    sock.send(&data, fd).await
}

/// `forwarder child-agent`: serves the descriptor `fd` (a connected
/// SOCK_SEQPACKET socket) or a listening socket at `path`, dialing in the
/// namespace this process is in; with `routing` (source preservation on),
/// from the clients' addresses. Ends on SIGTERM or when its peer goes, and
/// then removes the routing.
pub async fn run(
    fd: Option<RawFd>,
    path: Option<&Path>,
    routing: Option<crate::srcip::Routing>,
) -> anyhow::Result<()> {
    // Die with whoever started us (the forwarder, or a runtime).
    let _ = sys::term_with_parent();
    // Capabilities were dropped by main() before the runtime started: the
    // agent needs none to create and connect sockets, and keeps
    // CAP_NET_ADMIN and CAP_NET_RAW only for source preservation.
    let mut dialer = ChildDialer::new(Path::new("/proc/self/ns/net"))?;
    if let Some(r) = routing {
        dialer = dialer.with_source_ip(r);
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let r = tokio::select! {
        r = serve(fd, path, dialer.clone()) => r,
        _ = term.recv() => Ok(()),
    };
    // The routing goes with the last reference to it: the dialer's tasks
    // end with the runtime; remove it now, while the runtime still runs.
    if let Some(s) = dialer.source_ip() {
        s.routing().teardown();
    }
    r
}

async fn serve(fd: Option<RawFd>, path: Option<&Path>, dialer: ChildDialer) -> anyhow::Result<()> {
    use anyhow::Context as _;
    match (fd, path) {
        (Some(fd), _) => {
            let fd = sys::adopt_fd(fd).with_context(|| format!("--fd {fd}"))?;
            serve_conn(fd, dialer)
                .await
                .context("serving the forwarder")
        }
        (None, Some(path)) => {
            let listener = SeqpacketListener::bind(path)?;
            tracing::info!(socket = %path.display(), "dial agent listening");
            loop {
                let conn = listener.accept().await.context("accepting a forwarder")?;
                let d = dialer.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_conn(conn, d).await {
                        tracing::debug!(error = %e, "forwarder connection ended");
                    }
                });
            }
        }
        (None, None) => anyhow::bail!("child-agent needs --fd N or --socket PATH"),
    }
}

/// A listening SOCK_SEQPACKET Unix socket (mode 0600).
struct SeqpacketListener(AsyncFd<OwnedFd>);

impl SeqpacketListener {
    fn bind(path: &Path) -> anyhow::Result<SeqpacketListener> {
        use anyhow::Context as _;
        match std::fs::symlink_metadata(path) {
            Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
                std::fs::remove_file(path)
                    .with_context(|| format!("removing {}", path.display()))?
            }
            Ok(_) => anyhow::bail!("{} exists and is not a socket", path.display()),
            Err(_) => {}
        }
        let fd = nix::sys::socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        let addr = nix::sys::socket::UnixAddr::new(path)?;
        {
            let _mask = sys::Umask::set(0o177);
            nix::sys::socket::bind(fd.as_raw_fd(), &addr)
                .with_context(|| format!("binding {}", path.display()))?;
        }
        nix::sys::socket::listen(&fd, nix::sys::socket::Backlog::new(64)?)?;
        Ok(SeqpacketListener(sys::async_fd(fd, Interest::READABLE)?))
    }

    async fn accept(&self) -> io::Result<OwnedFd> {
        loop {
            let mut guard = self.0.readable().await?;
            match sys::accept_owned(self.0.get_ref().as_fd()) {
                Ok(fd) => return Ok(fd),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
                Err(e) => return Err(e),
            }
        }
    }
}

/// Where a dial agent the forwarder starts itself runs.
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
/// preserve client addresses ([`crate::srcip`]) where the child permits.
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
    let (ours, theirs) = pair()?;
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

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<(AgentReply, Option<OwnedFd>)>>>>;

/// The forwarder's side: sends dial requests to an agent and collects the
/// sockets.
#[derive(Clone)]
pub struct AgentClient {
    sock: Arc<Mutex<Arc<Packet>>>,
    pending: Pending,
    next_id: Arc<AtomicU64>,
    /// Dials instead of the agent once set ([`AgentClient::fall_back_to`]).
    fallback: Arc<Mutex<Option<ChildDialer>>>,
    /// The current agent greeted with source preservation on.
    source_ip: Arc<AtomicBool>,
    /// The forwarder is stopping the agent: its socket closing is expected.
    stopping: Arc<AtomicBool>,
}

impl AgentClient {
    /// Wraps a connected SOCK_SEQPACKET socket to an agent, which greeted
    /// with source preservation `source_ip`. Must run inside the tokio
    /// runtime.
    pub fn new(fd: OwnedFd, source_ip: bool) -> io::Result<AgentClient> {
        let pending: Pending = Default::default();
        let stopping = Arc::new(AtomicBool::new(false));
        let sock = Self::attach(fd, pending.clone(), stopping.clone())?;
        Ok(AgentClient {
            sock: Arc::new(Mutex::new(sock)),
            pending,
            next_id: Arc::new(AtomicU64::new(1)),
            fallback: Arc::new(Mutex::new(None)),
            source_ip: Arc::new(AtomicBool::new(source_ip)),
            stopping,
        })
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

    /// The forwarder is about to stop the agent: its socket closing from
    /// now on is not an error worth logging.
    pub fn stopping(&self) {
        self.stopping.store(true, Relaxed);
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

    /// Registers a socket and starts the task that reads its replies.
    fn attach(fd: OwnedFd, pending: Pending, stopping: Arc<AtomicBool>) -> io::Result<Arc<Packet>> {
        let sock = Arc::new(Packet::new(fd)?);
        let (s, p) = (sock.clone(), pending);
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_MESSAGE];
            loop {
                match s.recv(&mut buf).await {
                    Ok(Some((n, _, mut fds))) => {
                        let Some(reply) = decode_reply(&buf[..n]) else {
                            tracing::warn!("malformed reply from the dial agent");
                            continue;
                        };
                        let waiter = p.lock().ok().and_then(|mut m| m.remove(&reply.id));
                        if let Some(w) = waiter {
                            let _ = w.send((reply, fds.pop()));
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
        let fd = nix::sys::socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let addr = nix::sys::socket::UnixAddr::new(path)?;
        nix::sys::socket::connect(fd.as_raw_fd(), &addr)?;
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
        if let Err(e) = sock.send(&data, None).await {
            if let Ok(mut m) = self.pending.lock() {
                m.remove(&id);
            }
            return Err(fail(libc::EPIPE, format!("dial agent: {e}")));
        }
        let (reply, fd) = rx
            .await
            .map_err(|_| fail(libc::EPIPE, "the dial agent is gone".into()))?;
        if !reply.ok {
            return Err(DialFailure {
                errno: reply.errno,
                message: reply.message.unwrap_or_else(|| "dial failed".into()),
            });
        }
        let fd = fd.ok_or_else(|| fail(libc::EPROTO, "agent replied without a socket".into()))?;
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
        Box::pin(async move {
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
        Box::pin(self.request(req.spec, req.ipv6_listener, req.source, None))
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
                let _ = sock.send(&data, None).await;
            });
        }
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
    if hello.id == 0 && hello.ok && hello.message.as_deref() == Some(HELLO) {
        Ok(hello.source_ip == Some(true))
    } else {
        Err(bad(format!(
            "unexpected greeting from the dial agent: {hello:?}"
        )))
    }
}

/// A connected pair of SOCK_SEQPACKET sockets (forwarder end, agent end).
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    //! The agent serving one end of a socket pair in this process, dialing
    //! in this process's own namespace.

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn agent() -> (Packet, tokio::task::JoinHandle<io::Result<()>>) {
        let (ours, theirs) = pair().expect("socketpair");
        let dialer = ChildDialer::new(Path::new("/proc/self/ns/net")).expect("own netns");
        let task = tokio::spawn(serve_conn(theirs, dialer));
        let p = Packet::new(ours).expect("packet");
        let mut buf = vec![0u8; MAX_MESSAGE];
        let (n, _, _) = p.recv(&mut buf).await.expect("recv").expect("greeting");
        check_hello(&buf[..n]).expect("greeting");
        (p, task)
    }

    async fn ask(p: &Packet, data: &[u8]) -> (AgentReply, Vec<OwnedFd>) {
        p.send(data, None).await.expect("send");
        let mut buf = vec![0u8; MAX_MESSAGE];
        let (n, _, fds) = p.recv(&mut buf).await.expect("recv").expect("reply");
        (serde_json::from_slice(&buf[..n]).expect("reply JSON"), fds)
    }

    #[tokio::test]
    async fn dials_and_hands_over_the_socket() {
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = server.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = server.accept().await.unwrap();
            s.write_all(b"from the child").await.unwrap();
        });
        let (p, _t) = agent().await;
        let req = format!(
            r#"{{"id":7,"spec":{{"proto":"tcp","parentIP":"127.0.0.1","parentPort":9,"childPort":{port}}},"ipv6_listener":false}}"#
        );
        let (reply, mut fds) = ask(&p, req.as_bytes()).await;
        assert!(reply.ok, "{reply:?}");
        assert_eq!(reply.id, 7);
        assert_eq!(reply.reached, Some(format!("127.0.0.1:{port}")));
        let fd = fds.pop().expect("a socket");
        let std = std::net::TcpStream::from(fd);
        std.set_nonblocking(true).unwrap();
        let mut s = TcpStream::from_std(std).unwrap();
        let mut got = String::new();
        s.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "from the child");
    }

    #[tokio::test]
    async fn hands_over_connected_udp_sockets() {
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        let (p, _t) = agent().await;
        let req = format!(
            r#"{{"id":9,"spec":{{"proto":"udp","parentIP":"127.0.0.1","parentPort":9,"childPort":{port}}},"ipv6_listener":false}}"#
        );
        let (reply, mut fds) = ask(&p, req.as_bytes()).await;
        assert!(reply.ok, "{reply:?}");
        assert_eq!(reply.reached, Some(format!("127.0.0.1:{port}")));
        let sock = std::net::UdpSocket::from(fds.pop().expect("a socket"));
        // A datagram socket, already connected to the server.
        assert_eq!(sock.peer_addr().unwrap(), server.local_addr().unwrap());
        sock.send(b"one datagram").unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = server.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"one datagram");
        assert_eq!(from, sock.local_addr().unwrap());
    }

    #[tokio::test]
    async fn bad_requests_get_error_replies() {
        let (p, task) = agent().await;
        let (r, fds) = ask(&p, b"not json").await;
        assert!(
            !r.ok && r.errno == Some(libc::EINVAL) && fds.is_empty(),
            "{r:?}"
        );
        let (r, _) = ask(&p, br#"{"id":1,"spec":{"proto":"sctp","parentPort":1,"childPort":1},"ipv6_listener":false}"#).await;
        assert!(!r.ok && r.message.unwrap_or_default().contains("not supported"));
        let big = vec![b'x'; MAX_MESSAGE * 4];
        let (r, _) = ask(&p, &big).await;
        assert_eq!(r.errno, Some(libc::EMSGSIZE), "{r:?}");
        // Nothing listens on port 1 here: the errno comes back.
        let (r, _) = ask(&p, br#"{"id":2,"spec":{"proto":"tcp","parentIP":"127.0.0.1","parentPort":1,"childPort":1},"ipv6_listener":false}"#).await;
        assert_eq!(
            (r.id, r.ok, r.errno),
            (2, false, Some(libc::ECONNREFUSED)),
            "{r:?}"
        );
        // Still serving after all that.
        assert!(!task.is_finished());
    }

    #[tokio::test]
    async fn survives_a_peer_that_dies_mid_request() {
        // A server that accepts but never answers keeps the dial pending.
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = server.local_addr().unwrap().port();
        let (p, task) = agent().await;
        let req = format!(
            r#"{{"id":3,"spec":{{"proto":"tcp","parentIP":"127.0.0.1","parentPort":9,"childPort":{port}}},"ipv6_listener":false}}"#
        );
        p.send(req.as_bytes(), None).await.unwrap();
        drop(p); // the forwarder goes away before the reply
        let r = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("agent exits when its peer is gone")
            .expect("no panic");
        assert!(r.is_ok(), "{r:?}");
        drop(server);
    }
}
