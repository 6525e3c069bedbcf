//! Socket and namespace syscalls the engines need and std/tokio do not
//! offer. Every unsafe block of the controller lives here, each wrapped in a
//! function that returns `io::Result`, so the engines' logic stays plain.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn getsockopt<T: Copy>(fd: BorrowedFd<'_>, level: i32, name: i32) -> io::Result<T> {
    let mut val = MaybeUninit::<T>::zeroed();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: val is a writable buffer of len bytes.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            val.as_mut_ptr().cast(),
            &mut len,
        )
    })?;
    // SAFETY: zero-initialised and partially written by the kernel; T is
    // plain data.
    Ok(unsafe { val.assume_init() })
}

fn setsockopt<T: Copy>(fd: BorrowedFd<'_>, level: i32, name: i32, val: T) -> io::Result<()> {
    // SAFETY: &val is a readable buffer of size_of::<T>() bytes.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&val as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// The kernel's unique, never reused identifier of a socket (`SO_COOKIE`,
/// Linux 4.12). The BPF program sees the same value through
/// `bpf_get_socket_cookie`.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    getsockopt::<u64>(fd, libc::SOL_SOCKET, libc::SO_COOKIE)
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
    let mut outq: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut outq) })?;
    Ok(TcpCounters {
        bytes_received: info.bytes_received,
        bytes_acked: info.bytes_acked,
        outq: outq.max(0) as u64,
    })
}

/// Makes the next close() send a reset (SO_LINGER on with a zero timeout).
pub fn set_linger_zero(fd: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt(
        fd,
        libc::SOL_SOCKET,
        libc::SO_LINGER,
        libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )
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

/// Disables Nagle's algorithm: a relay must not add its own delay.
pub fn set_nodelay(fd: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1i32)
}

/// Reads and clears the socket's pending error (`SO_ERROR`).
pub fn take_error(fd: BorrowedFd<'_>) -> io::Result<Option<io::Error>> {
    let e: i32 = getsockopt(fd, libc::SOL_SOCKET, libc::SO_ERROR)?;
    Ok((e != 0).then(|| io::Error::from_raw_os_error(e)))
}

/// Shuts down the write side (sends FIN once queued data is out).
pub fn shutdown_write(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    cvt(unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) }).map(drop)
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

/// A pipe for splice(2), non-blocking on both ends.
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
    /// The pipe's capacity in bytes.
    pub capacity: usize,
}

/// Creates a non-blocking pipe and asks for `size` bytes of capacity (the
/// kernel may round it or, above `fs.pipe-max-size`, refuse: then the
/// default of 64 KiB stays).
pub fn pipe(size: usize) -> io::Result<Pipe> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds has room for two descriptors.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 returned two fresh descriptors that we now own.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on a fresh pipe.
    let set = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) };
    let capacity = if set > 0 {
        set as usize
    } else {
        // SAFETY: as above.
        let got = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        if got > 0 {
            got as usize
        } else {
            65536
        }
    };
    Ok(Pipe {
        read,
        write,
        capacity,
    })
}

/// Bytes waiting in a pipe (`FIONREAD` on its read end).
pub fn pipe_pending(p: &Pipe) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    cvt(unsafe { libc::ioctl(p.read.as_raw_fd(), libc::FIONREAD, &mut n) })?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// splice(2) with SPLICE_F_MOVE | SPLICE_F_NONBLOCK. `Ok(0)` is EOF.
pub fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: null offsets: both fds use their file position (pipe/socket).
    let n = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Moves the calling thread into the network namespace of `fd` (needs
/// CAP_SYS_ADMIN over the namespace's owning user namespace).
pub fn setns_net(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall; affects only the calling thread.
    cvt(unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) }).map(drop)
}

/// Creates a non-blocking, close-on-exec TCP socket in the calling thread's
/// network namespace.
pub fn tcp_socket(ipv6: bool) -> io::Result<OwnedFd> {
    let domain = if ipv6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain syscall.
    let fd = cvt(unsafe {
        libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Creates a non-blocking, close-on-exec UDP socket in the calling thread's
/// network namespace.
pub fn udp_socket(ipv6: bool) -> io::Result<OwnedFd> {
    let domain = if ipv6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain syscall.
    let fd = cvt(unsafe {
        libc::socket(
            domain,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets the process umask for the guard's lifetime.
pub struct Umask(libc::mode_t);

impl Umask {
    pub fn set(mask: libc::mode_t) -> Umask {
        // SAFETY: umask cannot fail.
        Umask(unsafe { libc::umask(mask) })
    }
}

impl Drop for Umask {
    fn drop(&mut self) {
        // SAFETY: restores the previous mask.
        unsafe { libc::umask(self.0) };
    }
}

/// Whether this network namespace has usable IPv6: an IPv6 socket can be
/// created and bound to ::1 (disabling IPv6 by sysctl removes ::1).
pub fn ipv6_available() -> bool {
    let Ok(sock) = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None) else {
        return false;
    };
    let addr = std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0));
    sock.bind(&addr.into()).is_ok()
}

/// Reduces the calling thread's capabilities to `keep` (those of them it
/// holds): the bounding set first (while CAP_SETPCAP may still be
/// effective), then ambient, inheritable, effective and permitted, and sets
/// no_new_privs so no later exec can gain any back.
///
/// capset(2) changes only the calling thread, so every thread that existed
/// before must drop its own; threads created afterwards inherit the reduced
/// sets. Returns an error only when the permitted set could not be reduced.
pub fn drop_thread_capabilities(keep: &[caps::Capability]) -> io::Result<()> {
    use caps::{CapSet, CapsHashSet};
    let permitted = caps::read(None, CapSet::Permitted).map_err(io::Error::other)?;
    let keep: CapsHashSet = permitted
        .iter()
        .filter(|c| keep.contains(c))
        .copied()
        .collect();
    // Best effort: without CAP_SETPCAP the bounding set stays, which only
    // matters to exec of a binary with file capabilities (no_new_privs
    // below covers that too).
    for cap in caps::all() {
        if !keep.contains(&cap) {
            let _ = caps::drop(None, CapSet::Bounding, cap);
        }
    }
    let _ = caps::clear(None, CapSet::Ambient);
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new()).map_err(io::Error::other)?;
    caps::set(None, CapSet::Effective, &keep).map_err(io::Error::other)?;
    caps::set(None, CapSet::Permitted, &keep).map_err(io::Error::other)?;
    // SAFETY: prctl with constant arguments.
    cvt(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
    Ok(())
}

/// The calling thread's effective capability set as a bit mask (CapEff of
/// `/proc/thread-self/status`), for logs and checks.
pub fn thread_cap_eff() -> u64 {
    std::fs::read_to_string("/proc/thread-self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(u64::MAX)
}

/// Opens a pidfd for `pid` (Linux 5.3): readable once the process exits.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; returns a fresh descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The peer's credentials of a connected Unix socket (`SO_PEERCRED`): the
/// pid, uid and gid of the process that connected, as of connect().
pub fn peer_cred(fd: BorrowedFd<'_>) -> io::Result<libc::ucred> {
    getsockopt::<libc::ucred>(fd, libc::SOL_SOCKET, libc::SO_PEERCRED)
}

/// The soft RLIMIT_NOFILE.
pub fn nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is a valid out-pointer.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    Ok(lim.rlim_cur)
}

/// Raises the soft RLIMIT_NOFILE to the hard limit: a forwarder holds two
/// sockets (and in splice mode up to four pipe ends) per connection.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is a valid out-pointer.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: lim is valid.
        cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) })?;
    }
    Ok(lim.rlim_cur)
}

/// Whether an accept/socket error means "out of descriptors or memory":
/// back off and keep serving.
pub fn is_resource_exhaustion(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
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
