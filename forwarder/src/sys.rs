//! The thin layer between the controller and the kernel: socket options,
//! splice pipes, namespaces, capabilities and limits the engines need and
//! std/tokio do not offer. socket2 and nix make the calls wherever they
//! cover one; custom code remains only for what neither has (the TCP_INFO
//! prefix, SIOCOUTQ, FIONREAD on a pipe, TCP_WINDOW_CLAMP, SO_RCVLOWAT,
//! poll with POLLRDHUP, pidfd_open) and for registering descriptors with tokio. Every unsafe
//! block of the controller outside the UDP batch path lives here, each
//! wrapped in a function that returns `io::Result`, so the engines' logic
//! stays plain.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use socket2::{Domain, SockRef, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// getsockopt(2) for the options neither socket2 nor nix has.
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

/// setsockopt(2) for the options neither socket2 nor nix has.
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

/// An `int` out of an ioctl that writes one (SIOCOUTQ, FIONREAD).
fn ioctl_int(fd: BorrowedFd<'_>, request: libc::Ioctl) -> io::Result<libc::c_int> {
    let mut n: libc::c_int = 0;
    // SAFETY: the requests passed here write one int.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), request, &mut n) })?;
    Ok(n)
}

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
    let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    let size = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    let capacity = nix::fcntl::fcntl(&write, FcntlArg::F_SETPIPE_SZ(size))
        .or_else(|_| nix::fcntl::fcntl(&write, FcntlArg::F_GETPIPE_SZ))
        .ok()
        .and_then(|n| usize::try_from(n).ok())
        .filter(|&n| n > 0)
        .unwrap_or(65536);
    Ok(Pipe {
        read,
        write,
        capacity,
    })
}

/// Bytes waiting in a pipe (`FIONREAD` on its read end).
pub fn pipe_pending(p: &Pipe) -> io::Result<usize> {
    let n = ioctl_int(p.read.as_fd(), libc::FIONREAD)?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// splice(2) with SPLICE_F_MOVE | SPLICE_F_NONBLOCK. `Ok(0)` is EOF.
pub fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    Ok(nix::fcntl::splice(
        from,
        None,
        to,
        None,
        len,
        SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
    )?)
}

/// Moves the calling thread into the network namespace of `fd` (needs
/// CAP_SYS_ADMIN over the namespace's owning user namespace).
pub fn setns_net(fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)?)
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

/// Sets the process umask for the guard's lifetime.
pub struct Umask(nix::sys::stat::Mode);

impl Umask {
    pub fn set(mask: libc::mode_t) -> Umask {
        Umask(nix::sys::stat::umask(
            nix::sys::stat::Mode::from_bits_truncate(mask),
        ))
    }
}

impl Drop for Umask {
    fn drop(&mut self) {
        nix::sys::stat::umask(self.0);
    }
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
    nix::sys::prctl::set_no_new_privs()?;
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
    let c = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::PeerCredentials)?;
    Ok(c.into())
}

/// The soft RLIMIT_NOFILE.
pub fn nofile_limit() -> io::Result<u64> {
    Ok(getrlimit(Resource::RLIMIT_NOFILE)?.0)
}

/// Raises the soft RLIMIT_NOFILE to the hard limit: a forwarder holds two
/// sockets (and in splice mode up to four pipe ends) per connection.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard.max(soft))
}

/// Raises RLIMIT_MEMLOCK to unlimited: kernels before 5.11 charge BPF maps
/// to it (newer ones use the memory cgroup, so failure is harmless there).
pub fn raise_memlock_limit() -> io::Result<()> {
    Ok(setrlimit(
        Resource::RLIMIT_MEMLOCK,
        libc::RLIM_INFINITY,
        libc::RLIM_INFINITY,
    )?)
}

/// This process's effective uid.
pub fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Asks for SIGTERM when the parent thread exits (PR_SET_PDEATHSIG).
pub fn term_with_parent() -> io::Result<()> {
    Ok(nix::sys::prctl::set_pdeathsig(
        nix::sys::signal::Signal::SIGTERM,
    )?)
}

/// A descriptor that its value owns for its whole life, as tokio's
/// registration requires: it stays open and the same until the value is
/// dropped. Implemented here, for the types that do, and nowhere else.
pub trait OwnsFd: AsRawFd {}

impl OwnsFd for OwnedFd {}

/// An epoll instance, owned.
pub struct EpollFd(pub nix::sys::epoll::Epoll);

impl AsRawFd for EpollFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0 .0.as_raw_fd()
    }
}

impl OwnsFd for EpollFd {}

#[cfg(feature = "ebpf")]
impl OwnsFd for aya::maps::RingBuf<aya::maps::MapData> {}

#[cfg(feature = "ebpf")]
impl<T> OwnsFd for aya_log::EbpfLogger<T> {}

/// Registers `inner` with the tokio reactor for `interest`.
pub fn async_fd<T: OwnsFd>(inner: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    // SAFETY: OwnsFd: the descriptor stays open and the same for the
    // value's, and so the AsyncFd's, whole life.
    unsafe { AsyncFd::register_with_interest(inner, interest) }.map_err(|e| e.into_parts().1)
}

/// Takes ownership of a descriptor this process was handed by number (a
/// command-line `--fd N` from the parent that started it).
///
/// # Errors
/// EBADF unless `fd` is open.
pub fn adopt_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD only reads the descriptor's flags.
    cvt(unsafe { libc::fcntl(fd, libc::F_GETFD) })?;
    // SAFETY: open (checked above), and handed to this process alone by
    // its parent: nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Descriptors that arrived as SCM_RIGHTS ancillary data (nix hands them
/// over as numbers): the kernel installed them for this process just now.
pub fn adopt_received(raw: Vec<RawFd>) -> Vec<OwnedFd> {
    raw.into_iter()
        // SAFETY: fresh descriptors the kernel installed for us with the
        // message; nothing else refers to them.
        .map(|f| unsafe { OwnedFd::from_raw_fd(f) })
        .collect()
}

/// accept4(2) with SOCK_CLOEXEC | SOCK_NONBLOCK, owned.
pub fn accept_owned(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    use nix::sys::socket::SockFlag;
    let fd = nix::sys::socket::accept4(
        listener.as_raw_fd(),
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )?;
    // SAFETY: accept4 returned a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Waits up to `timeout` (blocking) for `fd` to be readable; false on
/// timeout.
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let mut pfd = [PollFd::new(fd, PollFlags::POLLIN)];
    Ok(nix::poll::poll(&mut pfd, PollTimeout::from(ms))? > 0)
}

/// Arranges for `cmd`'s child, between fork and exec, to join the user
/// namespace `userns` (when given: allowed to the namespace's owner), then
/// the network namespace `netns` (CAP_SYS_ADMIN over its user namespace),
/// to find `fd3` on descriptor 3, and to get SIGTERM when this thread ends.
pub fn enter_namespaces_on_exec(
    cmd: &mut std::process::Command,
    userns: Option<BorrowedFd<'_>>,
    netns: BorrowedFd<'_>,
    fd3: BorrowedFd<'_>,
) {
    use std::os::unix::process::CommandExt;
    let (user_fd, net_fd, agent_fd) = (
        userns.map(|f| f.as_raw_fd()),
        netns.as_raw_fd(),
        fd3.as_raw_fd(),
    );
    // SAFETY: only async-signal-safe calls between fork and exec, on
    // descriptors the caller keeps open until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            // Namespaces first: the namespace files may sit on descriptor
            // 3, which the dup2 below replaces.
            if let Some(u) = user_fd {
                if libc::setns(u, libc::CLONE_NEWUSER) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::setns(net_fd, libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            if agent_fd == 3 {
                // dup2 onto itself would leave close-on-exec set.
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(agent_fd, 3) < 0 {
                return Err(io::Error::last_os_error());
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
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
