//! Sockets: creation, options (socket2 and nix where they have them; the
//! rest by hand, each saying which crate lacks it), TCP counters and
//! states.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use std::time::Duration;

use socket2::{Domain, SockRef, Socket, Type};

use super::{cvt, getsockopt, setsockopt};

/// The kernel's unique, never reused identifier of a socket (`SO_COOKIE`,
/// Linux 4.12). The BPF program sees the same value through
/// `bpf_get_socket_cookie`.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    SockRef::from(&fd).cookie()
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
    let info = tcp_info(fd)?;
    Ok(TcpCounters {
        bytes_received: info.tcpi_bytes_received,
        bytes_acked: info.tcpi_bytes_acked,
        outq: outq(fd)?,
    })
}

/// The kernel's `struct tcp_info` (`TCP_INFO`; socket2, nix and rustix
/// have no getter). An older kernel fills a prefix and leaves the rest
/// zero; `tcpi_bytes_acked` and `tcpi_bytes_received` are there since
/// Linux 4.1.
fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<libc::tcp_info> {
    getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO)
}

/// Bytes written to a TCP socket and not yet acknowledged (`SIOCOUTQ`).
/// Hand-written: rustix's ioctls have FIONREAD but not this one, and nix
/// only has the macros that generate an unsafe ioctl function.
fn outq(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SIOCOUTQ has TIOCOUTQ's number; libc names only the latter.
    // SAFETY: SIOCOUTQ writes one int to the pointer.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut n) })?;
    Ok(n.max(0) as u64)
}

/// Makes the next close() send a reset (SO_LINGER on with a zero timeout).
pub fn set_linger_zero(fd: BorrowedFd<'_>) -> io::Result<()> {
    SockRef::from(&fd).set_linger(Some(Duration::ZERO))
}

/// Sets `SO_RCVLOWAT`. On TCP this also re-runs the socket's data-ready
/// callback when enough bytes are queued (Linux 4.18), which is how bytes
/// that arrived before a socket entered the sockmap are handed to the
/// verdict program. socket2, nix and rustix have no `SO_RCVLOWAT`.
pub fn set_rcvlowat(fd: BorrowedFd<'_>, bytes: i32) -> io::Result<()> {
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, bytes)
}

/// The socket's current receive window clamp (`TCP_WINDOW_CLAMP`; socket2,
/// nix and rustix have no such option, as for the setter below).
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

/// Disables Nagle's algorithm: a relay must not add its own delay.
pub fn set_nodelay(fd: BorrowedFd<'_>) -> io::Result<()> {
    SockRef::from(&fd).set_tcp_nodelay(true)
}

/// Starts a non-blocking `connect()` of `fd` to `addr`. `Ok(true)`: the
/// connection is established on return; `Ok(false)`: the handshake is
/// still under way (wait until writable, then [`take_error`]).
///
/// To a listener on this host the handshake is over before the call
/// returns (loopback runs the SYN, the SYN-ACK and the ACK in the caller's
/// softirq context, and the final state change as the call releases the
/// socket), though the call still says EINPROGRESS. A zero-timeout
/// poll(2) then finds the socket writable, and the caller saves a round
/// through its event loop.
pub fn connect_now(fd: BorrowedFd<'_>, addr: SocketAddr) -> io::Result<bool> {
    use rustix::event::{PollFd, PollFlags, Timespec};
    match SockRef::from(&fd).connect(&addr.into()) {
        Ok(()) => return Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let mut pfd = [PollFd::from_borrowed_fd(fd, PollFlags::OUT)];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    rustix::event::poll(&mut pfd, Some(&now))?;
    let r = pfd[0].revents();
    if r.intersects(PollFlags::ERR | PollFlags::HUP) {
        return Err(take_error(fd)?.unwrap_or_else(|| io::ErrorKind::ConnectionRefused.into()));
    }
    Ok(r.contains(PollFlags::OUT))
}

/// read(2) on a non-blocking socket, whatever an event loop believes of
/// its readiness. `Ok(0)` is EOF.
pub fn read_now(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    use std::io::Read;
    (&*SockRef::from(&fd)).read(buf)
}

/// write(2) on a non-blocking socket, whatever an event loop believes of
/// its readiness.
pub fn write_now(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    use std::io::Write;
    (&*SockRef::from(&fd)).write(buf)
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
    // rustix, not nix: nix has no POLLRDHUP, and its revents() reports
    // nothing at all when a bit it does not know is set.
    use rustix::event::{PollFd, PollFlags, Timespec};
    let mut pfd = fds.map(|fd| PollFd::from_borrowed_fd(fd, PollFlags::RDHUP));
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    rustix::event::poll(&mut pfd, Some(&now))?;
    Ok(pfd.map(|p| {
        let r = p.revents();
        SockState {
            rdhup: r.contains(PollFlags::RDHUP),
            err: r.contains(PollFlags::ERR),
            hup: r.contains(PollFlags::HUP),
        }
    }))
}

/// Creates a non-blocking, close-on-exec TCP socket with TCP_NODELAY (the
/// forwarder passes each write on at once) in the calling thread's network
/// namespace.
pub fn tcp_socket(ipv6: bool) -> io::Result<OwnedFd> {
    let fd = new_socket(ipv6, Type::STREAM)?;
    set_nodelay(fd.as_fd())?;
    Ok(fd)
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
/// Linux 3.6; socket2, nix and rustix have no `SO_MEMINFO`).
pub fn meminfo_drops(fd: BorrowedFd<'_>) -> Option<u32> {
    getsockopt::<[u32; MEMINFO_VARS]>(fd, libc::SOL_SOCKET, libc::SO_MEMINFO)
        .ok()
        .map(|info| info[libc::SK_MEMINFO_DROPS as usize])
}

/// The cookie of the network namespace a socket belongs to
/// (`SO_NETNS_COOKIE`, Linux 5.14); BPF programs see the same value
/// through `bpf_get_netns_cookie`. socket2 has `SO_COOKIE` but not this,
/// nor have nix or rustix.
pub fn netns_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    getsockopt(fd, libc::SOL_SOCKET, libc::SO_NETNS_COOKIE)
}

/// The TCP state of a socket (`tcpi_state`: `libc::TCP_ESTABLISHED`, ...).
pub fn tcp_state(fd: BorrowedFd<'_>) -> io::Result<u8> {
    Ok(tcp_info(fd)?.tcpi_state)
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

    #[test]
    fn a_loopback_connect_is_over_inside_the_call() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        for _ in 0..100 {
            let fd = tcp_socket(false).unwrap();
            assert!(
                connect_now(fd.as_fd(), addr).unwrap(),
                "connected on return"
            );
            let (_s, peer) = l.accept().unwrap();
            assert_eq!(
                SockRef::from(&fd).local_addr().unwrap().as_socket(),
                Some(peer)
            );
        }
        // A closed port refuses inside the call too.
        drop(l);
        let fd = tcp_socket(false).unwrap();
        let e = connect_now(fd.as_fd(), addr).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
    }
}
