//! UDP helpers: sockets bound inside a test's namespaces and servers in the
//! child.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;

use crate::Netns;

/// A UDP socket bound to `addr` inside `ns` (port 0 picks one), with a
/// receive buffer of `rcvbuf` bytes if given (SO_RCVBUFFORCE: root).
pub fn bind_in(ns: &Netns, addr: &str, rcvbuf: Option<usize>) -> UdpSocket {
    let addr: SocketAddr = addr.parse().expect("address");
    let std = ns.run(move || {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::DGRAM,
            None,
        )
        .expect("socket");
        if addr.is_ipv6() {
            s.set_only_v6(true).expect("v6only");
        }
        if let Some(n) = rcvbuf {
            force_rcvbuf(&s, n);
        }
        s.bind(&addr.into())
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        s.set_nonblocking(true).expect("nonblocking");
        std::net::UdpSocket::from(s)
    });
    UdpSocket::from_std(std).expect("tokio socket")
}

/// SO_RCVBUFFORCE, so a test socket is not the bottleneck (best effort:
/// without CAP_NET_ADMIN the default stays).
pub fn force_rcvbuf(s: &impl std::os::fd::AsFd, n: usize) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = setsockopt(s, sockopt::RcvBufForce, &n);
}

/// The kernel's count of datagrams a socket dropped (SO_MEMINFO).
pub fn socket_drops(s: &impl AsRawFd) -> u64 {
    let mut info = [0u32; 9];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: valid out-pointers of the given size.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    assert_eq!(r, 0, "SO_MEMINFO: {}", std::io::Error::last_os_error());
    info[libc::SK_MEMINFO_DROPS as usize] as u64
}

/// A client socket in `ns` connected to `to`: it only accepts datagrams
/// from exactly that address, so a reply from any other source address
/// (or port) never arrives.
pub fn client_in(ns: &Netns, to: &str) -> UdpSocket {
    let to: SocketAddr = to.parse().expect("address");
    let any = if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
    let s = bind_in(ns, any, None);
    let std = s.into_std().expect("std");
    std.connect(to).expect("connect");
    UdpSocket::from_std(std).expect("tokio socket")
}

/// Echoes every datagram back to its sender.
pub fn echo(s: UdpSocket) {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let _ = s.send_to(&buf[..n], from).await;
        }
    });
}

/// Answers every datagram with `tag` followed by the sender's address as
/// the server saw it (`tag:ADDR`): which server, and which flow socket.
pub fn whoami(s: UdpSocket, tag: &'static str) {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((_, from)) = s.recv_from(&mut buf).await {
            let _ = s.send_to(format!("{tag}:{from}").as_bytes(), from).await;
        }
    });
}

/// Counts datagrams (and checks each is `len` bytes) until dropped.
pub struct Sink {
    pub received: Arc<AtomicU64>,
    pub wrong: Arc<AtomicU64>,
    pub socket: Arc<std::net::UdpSocket>,
}

impl Sink {
    /// Starts counting on a blocking thread (so the test's runtime does
    /// not slow it down).
    pub fn start(s: UdpSocket, len: usize) -> Sink {
        let std = Arc::new(s.into_std().expect("std"));
        std.set_nonblocking(false).expect("blocking");
        std.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let received = Arc::new(AtomicU64::new(0));
        let wrong = Arc::new(AtomicU64::new(0));
        let (r, w, sock) = (received.clone(), wrong.clone(), std.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            loop {
                match sock.recv(&mut buf) {
                    Ok(n) => {
                        r.fetch_add(1, Ordering::Relaxed);
                        if n != len {
                            w.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        if Arc::strong_count(&sock) == 1 {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        Sink {
            received,
            wrong,
            socket: std,
        }
    }
}
