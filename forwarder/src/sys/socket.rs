//! Sockets: creation, options the crates lack, TCP counters and states.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use socket2::{Domain, SockRef, Socket, Type};

use super::{cvt, getsockopt, ioctl_int, setsockopt};

/// The kernel's unique, never reused identifier of a socket (`SO_COOKIE`,
/// Linux 4.12). The BPF program sees the same value through
/// `bpf_get_socket_cookie`.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    SockRef::from(&fd).cookie()
}

/// The prefix of the kernel's `struct tcp_info` up to the byte counters
/// (`tcpi_bytes_received` is there since Linux 4.1).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct TcpInfoPrefix {
    u8s: [u8; 8],
    u32s: [u32; 24],
    pacing_rate: u64,
    max_pacing_rate: u64,
    bytes_acked: u64,
    bytes_received: u64,
}

/// Byte counters of one TCP socket, as the drain check needs them.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct TcpCounters {
    /// `tcpi_bytes_received`: sequence space received in order, which
    /// includes one for a received FIN.
    pub bytes_received: u64,
    /// `tcpi_bytes_acked`: sequence space the peer acknowledged.
    pub bytes_acked: u64,
    /// `SIOCOUTQ`: bytes written to the socket and not yet acknowledged.
    pub outq: u64,
}

impl TcpCounters {
    /// Everything ever queued for sending on this socket (acked or not).
    pub fn queued(&self) -> u64 {
        self.bytes_acked + self.outq
    }
}

/// Reads [`TcpCounters`] of a TCP socket.
pub fn tcp_counters(fd: BorrowedFd<'_>) -> io::Result<TcpCounters> {
    let info: TcpInfoPrefix = getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO)?;
    let outq = ioctl_int(fd, libc::TIOCOUTQ)?;
    Ok(TcpCounters {
        bytes_received: info.bytes_received,
        bytes_acked: info.bytes_acked,
        outq: outq.max(0) as u64,
    })
}

/// Makes the next close() send a reset (SO_LINGER on with a zero timeout).
pub fn set_linger_zero(fd: BorrowedFd<'_>) -> io::Result<()> {
    SockRef::from(&fd).set_linger(Some(Duration::ZERO))
}

/// Sets `SO_RCVLOWAT`. On TCP this also re-runs the socket's data-ready
/// callback when enough bytes are queued (Linux 4.18), which is how bytes
/// that arrived before a socket entered the sockmap are handed to the
/// verdict program.
pub fn set_rcvlowat(fd: BorrowedFd<'_>, bytes: i32) -> io::Result<()> {
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, bytes)
}

/// The socket's current receive window clamp (`TCP_WINDOW_CLAMP`).
pub fn window_clamp(fd: BorrowedFd<'_>) -> io::Result<u32> {
    getsockopt::<i32>(fd, libc::IPPROTO_TCP, libc::TCP_WINDOW_CLAMP).map(|v| v.max(0) as u32)
}

/// Caps the receive window the socket advertises (`TCP_WINDOW_CLAMP`; the
/// kernel raises values below half of SOCK_MIN_RCVBUF to that minimum).
/// Race-free with the socket's receive path: the kernel applies it under
/// the socket lock.
pub fn set_window_clamp(fd: BorrowedFd<'_>, bytes: u32) -> io::Result<()> {
    setsockopt(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_WINDOW_CLAMP,
        bytes.min(i32::MAX as u32) as i32,
    )
}

/// Lets an IPv6 socket bind a non-local address (`IPV6_TRANSPARENT`,
/// CAP_NET_ADMIN or CAP_NET_RAW; socket2 has only the IPv4 option).
pub fn set_ipv6_transparent(fd: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt(fd, libc::SOL_IPV6, libc::IPV6_TRANSPARENT, 1 as libc::c_int)
}

/// Disables Nagle's algorithm: a relay must not add its own delay.
pub fn set_nodelay(fd: BorrowedFd<'_>) -> io::Result<()> {
    SockRef::from(&fd).set_tcp_nodelay(true)
}

/// Reads and clears the socket's pending error (`SO_ERROR`).
pub fn take_error(fd: BorrowedFd<'_>) -> io::Result<Option<io::Error>> {
    SockRef::from(&fd).take_error()
}

/// Shuts down the write side (sends FIN once queued data is out).
pub fn shutdown_write(fd: BorrowedFd<'_>) -> io::Result<()> {
    SockRef::from(&fd).shutdown(Shutdown::Write)
}

/// What poll(2) says about a socket right now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockState {
    /// The peer sent FIN (or the connection is gone).
    pub rdhup: bool,
    /// An error is pending (reset, timeout, EPIPE).
    pub err: bool,
    /// Both directions are shut down.
    pub hup: bool,
}

/// Polls sockets without blocking and reports their state.
pub fn poll_states<const N: usize>(fds: [BorrowedFd<'_>; N]) -> io::Result<[SockState; N]> {
    // Custom: nix has no POLLRDHUP, and its revents() reports nothing at
    // all when a bit it does not know is set.
    let mut pfd = fds.map(|fd| libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    });
    // SAFETY: pfd is an array of N pollfd.
    cvt(unsafe { libc::poll(pfd.as_mut_ptr(), N as libc::nfds_t, 0) })?;
    Ok(pfd.map(|p| SockState {
        rdhup: p.revents & libc::POLLRDHUP != 0,
        err: p.revents & libc::POLLERR != 0,
        hup: p.revents & libc::POLLHUP != 0,
    }))
}

/// Creates a non-blocking, close-on-exec TCP socket in the calling thread's
/// network namespace.
pub fn tcp_socket(ipv6: bool) -> io::Result<OwnedFd> {
    new_socket(ipv6, Type::STREAM)
}

/// Creates a non-blocking, close-on-exec UDP socket in the calling thread's
/// network namespace.
pub fn udp_socket(ipv6: bool) -> io::Result<OwnedFd> {
    new_socket(ipv6, Type::DGRAM)
}

fn new_socket(ipv6: bool, ty: Type) -> io::Result<OwnedFd> {
    let domain = if ipv6 { Domain::IPV6 } else { Domain::IPV4 };
    Socket::new(domain, ty.nonblocking().cloexec(), None).map(OwnedFd::from)
}

/// Whether this network namespace has usable IPv6: an IPv6 socket can be
/// created and bound to ::1 (disabling IPv6 by sysctl removes ::1).
pub fn ipv6_available() -> bool {
    let Ok(sock) = Socket::new(Domain::IPV6, Type::STREAM, None) else {
        return false;
    };
    let addr = std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0));
    sock.bind(&addr.into()).is_ok()
}

/// The peer's credentials of a connected Unix socket (`SO_PEERCRED`): the
/// pid, uid and gid of the process that connected, as of connect().
pub fn peer_cred(fd: BorrowedFd<'_>) -> io::Result<libc::ucred> {
    let c = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::PeerCredentials)?;
    Ok(c.into())
}

/// Entries of SO_MEMINFO's answer (SK_MEMINFO_VARS).
const MEMINFO_VARS: usize = libc::SK_MEMINFO_DROPS as usize + 1;

/// The kernel's drop counter of a socket (SO_MEMINFO, SK_MEMINFO_DROPS;
/// Linux 3.6).
pub fn meminfo_drops(fd: BorrowedFd<'_>) -> Option<u32> {
    getsockopt::<[u32; MEMINFO_VARS]>(fd, libc::SOL_SOCKET, libc::SO_MEMINFO)
        .ok()
        .map(|info| info[libc::SK_MEMINFO_DROPS as usize])
}

/// Sends one datagram on a connected socket without blocking.
pub fn send_nonblocking(fd: BorrowedFd<'_>, data: &[u8]) -> io::Result<usize> {
    // SAFETY: data is a readable buffer of data.len() bytes.
    let r = unsafe {
        libc::send(
            fd.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Receives and discards one queued datagram without blocking; returns its
/// length.
pub fn recv_discard(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut byte = [0u8; 1];
    // SAFETY: a one-byte buffer; MSG_TRUNC only reports the length.
    let r = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            byte.as_mut_ptr().cast(),
            1,
            libc::MSG_DONTWAIT | libc::MSG_TRUNC,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// The cookie of the network namespace a socket belongs to
/// (`SO_NETNS_COOKIE`, Linux 5.14); BPF programs see the same value
/// through `bpf_get_netns_cookie`.
pub fn netns_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    getsockopt(fd, libc::SOL_SOCKET, libc::SO_NETNS_COOKIE)
}

/// The TCP state of a socket (`tcpi_state`: `libc::TCP_ESTABLISHED`, ...).
pub fn tcp_state(fd: BorrowedFd<'_>) -> io::Result<u8> {
    let info: TcpInfoPrefix = getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO)?;
    Ok(info.u8s[0])
}

/// The socket's current send buffer size (`SO_SNDBUF`, as autotuned).
pub fn send_buffer(fd: BorrowedFd<'_>) -> io::Result<u64> {
    SockRef::from(&fd).send_buffer_size().map(|n| n as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    #[test]
    fn tcp_info_layout_matches_kernel() {
        // bytes_acked/bytes_received sit at offsets 120/128 of struct tcp_info.
        assert_eq!(std::mem::offset_of!(TcpInfoPrefix, bytes_acked), 120);
        assert_eq!(std::mem::offset_of!(TcpInfoPrefix, bytes_received), 128);
    }

    #[test]
    fn counters_follow_a_loopback_transfer() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let base_c = tcp_counters(c.as_fd()).unwrap();
        let base_s = tcp_counters(s.as_fd()).unwrap();
        c.write_all(&[7u8; 1000]).unwrap();
        let mut buf = [0u8; 1000];
        s.read_exact(&mut buf).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(s.read(&mut buf).unwrap(), 0);
        let after_s = tcp_counters(s.as_fd()).unwrap();
        // 1000 data bytes plus one for the FIN.
        assert_eq!(after_s.bytes_received - base_s.bytes_received, 1001);
        let after_c = tcp_counters(c.as_fd()).unwrap();
        assert!(after_c.queued() - base_c.queued() >= 1000);
        assert_ne!(
            socket_cookie(c.as_fd()).unwrap(),
            socket_cookie(s.as_fd()).unwrap()
        );
    }
}
