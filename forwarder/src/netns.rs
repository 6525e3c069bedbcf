//! Dialing inside the child network namespace.
//!
//! A socket belongs to the namespace of the thread that created it, for its
//! whole life. So one OS thread enters the child namespace once, at start,
//! and does nothing but create sockets on request; the connect itself then
//! runs on the tokio runtime like any other socket operation.

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;

use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::oneshot;

use crate::dial::{self, DialPlan};
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

/// (IPv6?, UDP?, where to send the new socket)
type Request = (bool, bool, oneshot::Sender<io::Result<OwnedFd>>);

/// Creates sockets in the child namespace and dials with them.
#[derive(Clone)]
pub struct ChildDialer {
    tx: mpsc::Sender<Request>,
}

impl ChildDialer {
    /// Opens `path` (`/run/netns/NAME` or `/proc/PID/ns/net`) and starts the
    /// socket thread inside it; the thread then drops every capability.
    /// Fails at once if the namespace cannot be entered. Needs no runtime.
    pub fn new(path: &Path) -> Result<Self, NetnsError> {
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
        let (ready_tx, ready_rx) = mpsc::channel::<io::Result<()>>();
        let thread = thread::Builder::new()
            .name("child-netns".into())
            .spawn(move || {
                // Once inside, this thread gives up every capability: it
                // only creates sockets, which needs none.
                let entered = if same {
                    Ok(())
                } else {
                    sys::setns_net(ns.as_fd())
                }
                .and_then(|()| sys::drop_thread_capabilities(&[]));
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                drop(ns);
                if !ok {
                    return;
                }
                while let Ok((ipv6, udp, reply)) = rx.recv() {
                    let sock = if udp {
                        sys::udp_socket(ipv6)
                    } else {
                        sys::tcp_socket(ipv6)
                    };
                    let _ = reply.send(sock);
                }
            })
            .map_err(|cause| NetnsError::Enter {
                path: path.to_owned(),
                cause,
            })?;
        let r = match ready_rx.recv() {
            Ok(Ok(())) => return Ok(ChildDialer { tx }),
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

    async fn raw_socket(&self, ipv6: bool, udp: bool) -> io::Result<OwnedFd> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((ipv6, udp, tx))
            .map_err(|_| io::Error::other(NetnsError::Gone))?;
        rx.await.map_err(|_| io::Error::other(NetnsError::Gone))?
    }

    /// Creates a TCP socket of the given family inside the child namespace.
    pub async fn socket(&self, ipv6: bool) -> io::Result<TcpSocket> {
        let fd = self.raw_socket(ipv6, false).await?;
        Ok(TcpSocket::from_std_stream(std::net::TcpStream::from(fd)))
    }

    /// Creates a UDP socket inside the child namespace and connects it to
    /// `addr` (connecting a UDP socket sends nothing and does not block).
    pub async fn connect_udp(&self, addr: SocketAddr) -> io::Result<OwnedFd> {
        let fd = self.raw_socket(addr.is_ipv6(), true).await?;
        crate::udp::connect(&fd, addr)?;
        Ok(fd)
    }

    /// Executes a [`DialPlan`] for a UDP flow: as [`ChildDialer::dial`],
    /// with a connected UDP socket. The IPv4 fallback applies when the
    /// connect fails for lack of IPv6 (no route or no address in the child).
    pub async fn dial_udp(&self, plan: DialPlan) -> Result<(OwnedFd, SocketAddr), DialFailure> {
        match self.connect_udp(plan.target).await {
            Ok(s) => Ok((s, plan.target)),
            Err(e) => match plan.fallback {
                Some(fb) if dial::should_fall_back(&e) => match self.connect_udp(fb).await {
                    Ok(s) => Ok((s, fb)),
                    Err(e2) => Err(DialFailure {
                        errno: e2.raw_os_error(),
                        message: format!("{}: {e}; IPv4 fallback {fb}: {e2}", plan.target),
                    }),
                },
                _ => Err(DialFailure {
                    errno: e.raw_os_error(),
                    message: format!("{}: {e}", plan.target),
                }),
            },
        }
    }

    /// Connects to `addr` inside the child namespace.
    pub async fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let sock = self.socket(addr.is_ipv6()).await?;
        let stream = sock.connect(addr).await?;
        Ok(stream)
    }

    /// Executes a [`DialPlan`]: the target, then the IPv4 fallback when the
    /// IPv6 dial failed for lack of IPv6. Returns the stream and the address
    /// actually reached.
    pub async fn dial(&self, plan: DialPlan) -> Result<(TcpStream, SocketAddr), DialFailure> {
        match self.connect(plan.target).await {
            Ok(s) => Ok((s, plan.target)),
            Err(e) => match plan.fallback {
                Some(fb) if dial::should_fall_back(&e) => {
                    tracing::debug!(target = %plan.target, error = %e, fallback = %fb,
                        "IPv6 dial failed, retrying over IPv4");
                    match self.connect(fb).await {
                        Ok(s) => Ok((s, fb)),
                        Err(e2) => Err(DialFailure {
                            errno: e2.raw_os_error(),
                            message: format!("{}: {e}; IPv4 fallback {fb}: {e2}", plan.target),
                        }),
                    }
                }
                _ => Err(DialFailure {
                    errno: e.raw_os_error(),
                    message: format!("{}: {e}", plan.target),
                }),
            },
        }
    }
}

/// A dial that failed: the errno of the last attempt and a message naming
/// the addresses tried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DialFailure {
    pub errno: Option<i32>,
    pub message: String,
}

/// Where connections are dialed: from a thread inside the child's network
/// namespace, or through a child-side agent ([`crate::agent`]) when this
/// process may not enter the namespace. Both apply the same rules
/// ([`crate::dial`]).
#[derive(Clone)]
pub enum Dialer {
    Netns(ChildDialer),
    Agent(crate::agent::AgentClient),
}

impl Dialer {
    /// Dials the child for a connection accepted by a listener of `spec`.
    pub async fn dial(
        &self,
        spec: &crate::spec::PortSpec,
        ipv6_listener: bool,
    ) -> Result<(TcpStream, SocketAddr), DialFailure> {
        match self {
            Dialer::Netns(d) => d.dial(dial::plan(spec, ipv6_listener)).await,
            Dialer::Agent(a) => a.dial(spec, ipv6_listener).await,
        }
    }

    /// Creates and connects a UDP socket in the child for a flow received
    /// by a socket of `spec` (same rules as [`Dialer::dial`]).
    pub async fn dial_udp(
        &self,
        spec: &crate::spec::PortSpec,
        ipv6_listener: bool,
    ) -> Result<(OwnedFd, SocketAddr), DialFailure> {
        match self {
            Dialer::Netns(d) => d.dial_udp(dial::plan(spec, ipv6_listener)).await,
            Dialer::Agent(a) => a.dial_udp(spec, ipv6_listener).await,
        }
    }
}
