//! The child-side dial agent, for forwarders that may not enter the child's
//! network namespace.
//!
//! An unprivileged process cannot setns() into a network namespace owned by
//! another user namespace (it needs CAP_SYS_ADMIN there), which is why
//! RootlessKit dials from a child-side process. `forwarder child-agent`
//! runs inside the container's user and network namespaces and answers dial
//! requests over a SOCK_SEQPACKET Unix socket, returning each connected
//! socket as an SCM_RIGHTS descriptor, or an errno. It applies the same
//! rules as the in-process dialer ([`crate::child::dial`]), by running the same
//! code against its own namespace.
//!
//! Wire format, one datagram each way per dial (at most [`MAX_MESSAGE`]
//! bytes of JSON):
//! - request `{"id": N, "spec": PortSpec, "ipv6_listener": bool, "source":
//!   "ADDR"}` (`source`, the client's address, optional); a spec whose proto
//!   is udp, udp4 or udp6 asks for a connected UDP socket (a flow of
//!   [`crate::udp`]), any other for a connected TCP stream;
//! - `{"udp_closed": ["REACHED", "LOCAL"]}`: a flow's socket was closed, its
//!   return rule goes ([`crate::child::srcip`]); no reply;
//! - `{"id": N, "sockets": K, "ipv6": bool, "udp": bool}`: K fresh,
//!   unconnected TCP (UDP with `"udp": true`) sockets of this namespace (32
//!   at most), all attached to one reply `{"id": N, "ok": true}`; the
//!   forwarder binds and connects them itself, for connections and flows
//!   whose source it does not preserve, without a round trip per
//!   connection;
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

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::child::dial::{Dial, DialFailure, DialRequest};
use crate::child::netns::ChildDialer;
use crate::sys::{self, SeqPacket, SeqpacketListener};
use crate::wire::spec::PortSpec;
use crate::wire::{
    AgentFlowClosed, AgentReply, AgentRequest, AgentSockets, AGENT_HELLO, AGENT_MAX_MESSAGE,
    AGENT_MAX_SOCKETS,
};

/// Largest request or reply.
pub const MAX_MESSAGE: usize = AGENT_MAX_MESSAGE;

/// How long the agent may spend on one dial.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

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
        Ok(Err(f)) => {
            // Out of descriptors here is not the forwarder's: say whose.
            let message = match f.errno {
                Some(libc::EMFILE | libc::ENFILE) => format!("in the dial agent: {}", f.message),
                _ => f.message,
            };
            (error_reply(id, f.errno.unwrap_or(libc::EIO), message), None)
        }
        Err(_) => (error_reply(id, libc::ETIMEDOUT, "dial timed out"), None),
    }
}

/// Serves one connected socket until the peer goes away.
async fn serve_conn(fd: OwnedFd, dialer: ChildDialer) -> io::Result<()> {
    let sock = Arc::new(SeqPacket::new(fd)?);
    let hello = AgentReply {
        id: 0,
        ok: true,
        message: Some(AGENT_HELLO.into()),
        source_ip: Some(dialer.source_ip().is_some()),
        ..Default::default()
    };
    send_reply(&sock, &hello, &[]).await?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    while let Some(got) = sock.recv(&mut buf).await? {
        let (n, truncated) = (got.len, got.truncated);
        drop(got.fds); // requests carry no descriptors; close any sent anyway
        if truncated {
            let r = error_reply(
                0,
                libc::EMSGSIZE,
                format!("request larger than {MAX_MESSAGE} bytes"),
            );
            let _ = send_reply(&sock, &r, &[]).await;
            continue;
        }
        if let Ok(r) = serde_json::from_slice::<AgentSockets>(&buf[..n]) {
            let kind = crate::child::netns::Kind {
                ipv6: r.ipv6,
                udp: r.udp,
                transparent: r.transparent && !r.udp,
            };
            // Transparent sockets are for preserved sources, with the
            // child's addresses that decide which sources are preserved.
            let addresses = match (kind.transparent, dialer.source_ip()) {
                (false, _) => None,
                (true, Some(s)) => Some(s.local_addresses().iter().copied().collect()),
                (true, None) => {
                    let r = error_reply(r.id, libc::EPERM, "source preservation is off");
                    let _ = send_reply(&sock, &r, &[]).await;
                    continue;
                }
            };
            let made: Vec<OwnedFd> = (0..r.sockets.min(AGENT_MAX_SOCKETS))
                .map_while(|_| kind.socket().ok())
                .collect();
            let reply = AgentReply {
                id: r.id,
                ok: true,
                addresses,
                ..Default::default()
            };
            let fds: Vec<RawFd> = made.iter().map(|f| f.as_raw_fd()).collect();
            if let Err(e) = send_reply(&sock, &reply, &fds).await {
                tracing::debug!(error = %e, "cannot send sockets; the forwarder is gone?");
            }
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
            let fd: Vec<RawFd> = dialed.iter().map(|s| s.as_fd().as_raw_fd()).collect();
            if let Err(e) = send_reply(&sock, &reply, &fd).await {
                tracing::debug!(error = %e, "cannot send a reply; the forwarder is gone?");
            }
        });
    }
    Ok(())
}

async fn send_reply(sock: &SeqPacket, reply: &AgentReply, fds: &[RawFd]) -> io::Result<()> {
    let data = serde_json::to_vec(reply).map_err(io::Error::other)?;
    sock.send(&data, fds).await
}

/// How long an agent started by a forwarder keeps serving after a SIGTERM
/// or SIGINT while that forwarder lives, waiting for it to close the
/// socket. A signal sent to the whole process group reaches the forwarder
/// too, which takes a few milliseconds to stop its ports and then closes
/// the socket; an agent signalled alone exits after this.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// `forwarder child-agent`: serves the descriptor `fd` (a connected
/// SOCK_SEQPACKET socket) or a listening socket at `path`, dialing in the
/// namespace this process is in; with `routing` (source preservation on),
/// from the clients' addresses. Ends when its peer goes (end of file on
/// `fd`, or the death of the process that started it), and then removes
/// the routing.
///
/// On SIGTERM or SIGINT an agent listening at `path` (a runtime's) ends at
/// once. An agent serving `fd` belongs to the forwarder that started it,
/// which stops it by closing the socket: the signal is most likely one
/// sent to both of them (`systemctl stop`, `timeout`, Ctrl-C), and exiting
/// first would make the forwarder report its agent lost in the middle of
/// a clean stop. It keeps serving for [`STOP_GRACE`] at most, less if its
/// parent is gone.
pub async fn run(
    fd: Option<RawFd>,
    path: Option<&Path>,
    routing: Option<crate::child::srcip::Routing>,
) -> anyhow::Result<()> {
    // Die with whoever started us (the forwarder, or a runtime).
    let _ = sys::term_with_parent();
    let parent = nix::unistd::getppid();
    // Capabilities were dropped by main() before the runtime started: the
    // agent needs none to create and connect sockets, and keeps
    // CAP_NET_ADMIN and CAP_NET_RAW only for source preservation.
    let mut dialer = ChildDialer::new(Path::new("/proc/self/ns/net"))?;
    if let Some(r) = routing {
        dialer = dialer.with_source_ip(r);
    }
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let served = serve(fd, path, dialer.clone());
    tokio::pin!(served);
    let r = tokio::select! {
        r = &mut served => r,
        _ = async { tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} } } => {
            if fd.is_some() && nix::unistd::getppid() == parent {
                tracing::debug!("asked to stop: serving until the forwarder closes the socket");
                tokio::time::timeout(STOP_GRACE, &mut served)
                    .await
                    .unwrap_or(Ok(()))
            } else {
                Ok(())
            }
        }
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

#[cfg(test)]
mod tests {
    //! The agent serving one end of a socket pair in this process, dialing
    //! in this process's own namespace.

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn agent() -> (SeqPacket, tokio::task::JoinHandle<io::Result<()>>) {
        let (ours, theirs) = sys::seqpacket_pair().expect("socketpair");
        let dialer = ChildDialer::new(Path::new("/proc/self/ns/net")).expect("own netns");
        let task = tokio::spawn(serve_conn(theirs, dialer));
        let p = SeqPacket::new(ours).expect("packet");
        let mut buf = vec![0u8; MAX_MESSAGE];
        let got = p.recv(&mut buf).await.expect("recv").expect("greeting");
        let hello: AgentReply = serde_json::from_slice(&buf[..got.len]).expect("greeting JSON");
        assert!(hello.id == 0 && hello.ok && hello.message.as_deref() == Some(AGENT_HELLO));
        (p, task)
    }

    async fn ask(p: &SeqPacket, data: &[u8]) -> (AgentReply, Vec<OwnedFd>) {
        p.send(data, &[]).await.expect("send");
        let mut buf = vec![0u8; MAX_MESSAGE];
        let got = p.recv(&mut buf).await.expect("recv").expect("reply");
        assert!(got.fds_lost.is_none(), "{:?}", got.fds_lost);
        (
            serde_json::from_slice(&buf[..got.len]).expect("reply JSON"),
            got.fds,
        )
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
        p.send(req.as_bytes(), &[]).await.unwrap();
        drop(p); // the forwarder goes away before the reply
        let r = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("agent exits when its peer is gone")
            .expect("no panic");
        assert!(r.is_ok(), "{r:?}");
        drop(server);
    }
}
