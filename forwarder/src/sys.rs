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
use std::mem::{size_of, zeroed, MaybeUninit};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use socket2::{Domain, SockAddr, SockRef, Socket, Type};
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

// ---------------------------------------------------------------------------
// UDP: batched datagram I/O with packet info and drop counts (udp.rs).

/// Control-message space per received datagram (a packet-info message and
/// a drop count fit in 64 bytes).
const CTRL: usize = 128;

/// setsockopt(2) of an `int` option.
pub fn set_int_option(fd: BorrowedFd<'_>, level: i32, name: i32, val: i32) -> io::Result<()> {
    setsockopt(fd, level, name, val)
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

/// Where a datagram was addressed (IP_PKTINFO / IPV6_PKTINFO): the
/// address a client wrote to and the interface it came in on (kept for
/// IPv6 link-local addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PktInfo {
    pub ip: IpAddr,
    pub ifindex: u32,
}

/// What one received datagram's control messages said.
#[derive(Debug, Default, Clone, Copy)]
pub struct Ancillary {
    pub local: Option<PktInfo>,
    pub drops: Option<u32>,
}

/// How large a UDP GSO run may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GsoLimits {
    /// Datagrams per run (UDP_MAX_SEGMENTS: 64 in the kernels that brought
    /// UDP GSO; later ones allow more).
    pub segments: usize,
    /// Payload bytes per run: one IPv4 datagram's worth (65,507), so a run
    /// fits either family.
    pub bytes: usize,
    /// Largest segment (datagram) size a run may have: lowered below a size
    /// the route refused (a segment must fit the path MTU), so datagrams
    /// that large go one per message without asking again.
    pub segment: usize,
}

impl Default for GsoLimits {
    fn default() -> Self {
        GsoLimits {
            segments: 64,
            bytes: 65_507,
            segment: usize::MAX,
        }
    }
}

/// Splits `n` datagrams (lengths by index from `len`) into sends, written
/// to `out` as `(count, segment)` per message, in order. A run of two or
/// more datagrams of one length (`segment`), optionally ending with one
/// shorter but non-empty datagram, goes as one UDP GSO message within
/// `max`; anything else goes alone (`segment` 0: no GSO). Empty datagrams
/// always go alone: a GSO message cannot carry them.
pub fn gso_runs(
    n: usize,
    len: impl Fn(usize) -> usize,
    max: GsoLimits,
    out: &mut Vec<(usize, usize)>,
) {
    out.clear();
    let mut i = 0;
    while i < n {
        let seg = len(i);
        let mut count = 1;
        let mut total = seg;
        if seg > 0 && seg <= max.segment {
            while i + count < n && count < max.segments {
                let next = len(i + count);
                if next == 0 || next > seg || total + next > max.bytes {
                    break;
                }
                count += 1;
                total += next;
                if next < seg {
                    // A shorter datagram ends the run.
                    break;
                }
            }
        }
        out.push((count, if count > 1 { seg } else { 0 }));
        i += count;
    }
}

/// Preallocated recvmmsg/sendmmsg state: `count` buffers of `buf` bytes
/// with their headers, names and control space ([`CTRL`] bytes each).
pub struct Batch {
    count: usize,
    buf: usize,
    bufs: Vec<u8>,
    iov: Vec<libc::iovec>,
    names: Vec<libc::sockaddr_storage>,
    ctrl: Vec<u64>,
    hdrs: Vec<libc::mmsghdr>,
    /// Headers and iovecs for sends (pointing into `bufs`).
    send_iov: Vec<libc::iovec>,
    send_hdrs: Vec<libc::mmsghdr>,
    /// One destination name shared by a send, control space per message.
    send_name: libc::sockaddr_storage,
    send_ctrl: Vec<u64>,
    /// Whether sends try UDP GSO; the largest run it may carry.
    gso: bool,
    gso_max: GsoLimits,
    /// The messages of a send, `(count, segment)` each ([`gso_runs`]).
    runs: Vec<(usize, usize)>,
}

// SAFETY: the raw pointers in the headers only ever point into buffers
// owned by the same Batch (set again before each call), so moving the
// Batch to another thread moves what they point at with it.
unsafe impl Send for Batch {}

impl Batch {
    /// Room for `count` datagrams of at most `buf` bytes each (a datagram
    /// longer than `buf` is reported as [`Batch::truncated`]).
    pub fn new(count: usize, buf: usize) -> Batch {
        // SAFETY: all-zero is a valid value of these C structs.
        let (iov, hdr, name) = unsafe {
            (
                zeroed::<libc::iovec>(),
                zeroed::<libc::mmsghdr>(),
                zeroed::<libc::sockaddr_storage>(),
            )
        };
        Batch {
            count,
            buf,
            // calloc'd: pages are only backed once a datagram reaches them.
            bufs: vec![0; count * buf],
            iov: vec![iov; count],
            names: vec![name; count],
            ctrl: vec![0; count * CTRL / 8],
            hdrs: vec![hdr; count],
            send_iov: vec![iov; count],
            send_hdrs: vec![hdr; count],
            send_name: name,
            send_ctrl: vec![0; count * CTRL / 8],
            gso: true,
            gso_max: GsoLimits::default(),
            runs: Vec::with_capacity(count),
        }
    }

    /// Receives up to `count` datagrams (recvmmsg(2), Linux 2.6.33);
    /// `Ok(0)` when none is queued.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        let base = self.bufs.as_mut_ptr();
        let ctrl = self.ctrl.as_mut_ptr();
        let buf = self.buf;
        for i in 0..self.count {
            // SAFETY: offsets stay inside the buffers allocated in new().
            unsafe {
                self.iov[i] = libc::iovec {
                    iov_base: base.add(i * buf).cast(),
                    iov_len: buf,
                };
                let h = &mut self.hdrs[i];
                h.msg_len = 0;
                h.msg_hdr.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
                h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                h.msg_hdr.msg_iov = &mut self.iov[i];
                h.msg_hdr.msg_iovlen = 1;
                h.msg_hdr.msg_control = ctrl.add(i * CTRL / 8).cast();
                h.msg_hdr.msg_controllen = CTRL;
                h.msg_hdr.msg_flags = 0;
            }
        }
        // SAFETY: every header points at memory owned by self.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                self.count as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(0);
            }
            return Err(e);
        }
        Ok(n as usize)
    }

    /// The length of received datagram `i` (as much as fitted).
    pub fn len(&self, i: usize) -> usize {
        (self.hdrs[i].msg_len as usize).min(self.buf)
    }

    /// Whether datagram `i` was longer than its buffer.
    pub fn truncated(&self, i: usize) -> bool {
        self.hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0
    }

    /// The bytes of datagram `i`.
    pub fn data(&self, i: usize) -> &[u8] {
        &self.bufs[i * self.buf..i * self.buf + self.len(i)]
    }

    /// The sender of datagram `i`.
    pub fn source(&self, i: usize) -> Option<SocketAddr> {
        let len = self.hdrs[i].msg_hdr.msg_namelen as usize;
        let ss = &self.names[i];
        // SAFETY: the kernel filled names[i] with a sockaddr of `len` bytes
        // of the family it names; each cast reads within the storage.
        unsafe {
            match ss.ss_family as i32 {
                libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
                    let a = &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>();
                    Some(SocketAddr::from((
                        Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                        u16::from_be(a.sin_port),
                    )))
                }
                libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
                    let a = &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
                    Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                        Ipv6Addr::from(a.sin6_addr.s6_addr),
                        u16::from_be(a.sin6_port),
                        a.sin6_flowinfo,
                        a.sin6_scope_id,
                    )))
                }
                _ => None,
            }
        }
    }

    /// What datagram `i`'s control messages said.
    pub fn ancillary(&self, i: usize) -> Ancillary {
        let mut out = Ancillary::default();
        let h = &self.hdrs[i].msg_hdr;
        // SAFETY: the kernel wrote msg_controllen bytes of well-formed
        // control messages into our control space; CMSG_* walk within it.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(h);
            while !c.is_null() {
                let data = libc::CMSG_DATA(c);
                match ((*c).cmsg_level, (*c).cmsg_type) {
                    (libc::SOL_SOCKET, libc::SO_RXQ_OVFL) => {
                        out.drops = Some(std::ptr::read_unaligned(data.cast::<u32>()));
                    }
                    (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                        let p = std::ptr::read_unaligned(data.cast::<libc::in_pktinfo>());
                        out.local = Some(PktInfo {
                            ip: Ipv4Addr::from(u32::from_be(p.ipi_addr.s_addr)).into(),
                            ifindex: p.ipi_ifindex as u32,
                        });
                    }
                    (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                        let p = std::ptr::read_unaligned(data.cast::<libc::in6_pktinfo>());
                        out.local = Some(PktInfo {
                            ip: Ipv6Addr::from(p.ipi6_addr.s6_addr).into(),
                            ifindex: p.ipi6_ifindex,
                        });
                    }
                    _ => {}
                }
                c = libc::CMSG_NXTHDR(h, c);
            }
        }
        out
    }

    /// Sends datagrams `range` of the buffers on `fd`, to `to` (None: the
    /// socket is connected) from `from` (None: the socket's own address).
    /// Returns how many were sent before the first error, and that error.
    ///
    /// One sendmmsg(2) (Linux 3.0) carries the whole range. Runs of
    /// datagrams of one size ([`gso_runs`]) go as one message each with
    /// UDP_SEGMENT (UDP GSO, Linux 4.18): the stack handles the run as one
    /// packet and cuts it into the original datagrams only where they are
    /// delivered, so boundaries stay exactly as received. Where the kernel
    /// or the route refuses GSO (EIO for a device without checksum offload,
    /// EINVAL for a segment above the path MTU, ENOPROTOOPT on an older
    /// kernel) the rest of the range is sent one datagram per message; a
    /// refused segment size is not tried again, and refusals that come from
    /// the kernel or device turn GSO off for this batch for good.
    pub fn send(
        &mut self,
        fd: RawFd,
        range: std::ops::Range<usize>,
        to: Option<&SockAddr>,
        from: Option<PktInfo>,
    ) -> (usize, Option<io::Error>) {
        let (name, namelen) = match to {
            Some(a) => {
                // SAFETY: a SockAddr holds at most a sockaddr_storage.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        a.as_ptr().cast::<u8>(),
                        (&mut self.send_name as *mut libc::sockaddr_storage).cast::<u8>(),
                        a.len() as usize,
                    )
                };
                (
                    (&mut self.send_name as *mut libc::sockaddr_storage).cast(),
                    a.len(),
                )
            }
            None => (std::ptr::null_mut(), 0),
        };
        let mut start = range.start;
        let mut plain = !self.gso;
        let mut msgs = self.build_send(start..range.end, name, namelen, from, plain);
        let mut done = 0;
        while done < msgs {
            // SAFETY: the headers point at memory owned by self.
            let n = unsafe {
                libc::sendmmsg(
                    fd,
                    self.send_hdrs.as_mut_ptr().add(done),
                    (msgs - done) as libc::c_uint,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n > 0 {
                for h in &self.send_hdrs[done..done + n as usize] {
                    start += h.msg_hdr.msg_iovlen;
                }
                done += n as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            let segmented = self.send_hdrs[done].msg_hdr.msg_iovlen > 1;
            let for_good = matches!(
                e.raw_os_error(),
                Some(libc::EIO | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
            );
            let refused =
                for_good || matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EMSGSIZE));
            if !(segmented && refused) {
                return (start - range.start, Some(e));
            }
            // GSO refused: the rest one datagram per message. A segment
            // size the route refused (EINVAL, EMSGSIZE: above the path MTU)
            // is not asked again; a refusal by the kernel or the device
            // turns GSO off.
            self.gso &= !for_good;
            let seg = self.runs[done].1;
            self.gso_max.segment = self.gso_max.segment.min(seg.saturating_sub(1));
            plain = true;
            msgs = self.build_send(start..range.end, name, namelen, from, plain);
            done = 0;
        }
        (start - range.start, None)
    }

    /// Fills the send headers for datagrams `range`: one message per
    /// [`gso_runs`] run (or per datagram when `plain`); returns how many.
    fn build_send(
        &mut self,
        range: std::ops::Range<usize>,
        name: *mut libc::c_void,
        namelen: libc::socklen_t,
        from: Option<PktInfo>,
        plain: bool,
    ) -> usize {
        let base = self.bufs.as_mut_ptr();
        let buf = self.buf;
        for (k, i) in range.clone().enumerate() {
            // SAFETY: offsets stay inside bufs.
            self.send_iov[k] = libc::iovec {
                iov_base: unsafe { base.add(i * buf) }.cast(),
                iov_len: self.len(i),
            };
        }
        let mut runs = std::mem::take(&mut self.runs);
        if plain {
            runs.clear();
            runs.extend(range.clone().map(|_| (1, 0)));
        } else {
            let hdrs = &self.hdrs;
            let cap = self.buf;
            let at = range.start;
            let len = |k: usize| (hdrs[at + k].msg_len as usize).min(cap);
            gso_runs(range.len(), len, self.gso_max, &mut runs);
        }
        let mut first = 0;
        for (m, &(count, seg)) in runs.iter().enumerate() {
            let ctrl_len = self.encode_send_ctrl(m, from, seg);
            let ctrl = if ctrl_len > 0 {
                // SAFETY: message m's control space lies inside send_ctrl.
                unsafe { self.send_ctrl.as_mut_ptr().add(m * CTRL / 8) }.cast()
            } else {
                std::ptr::null_mut()
            };
            let h = &mut self.send_hdrs[m];
            h.msg_len = 0;
            h.msg_hdr.msg_name = name;
            h.msg_hdr.msg_namelen = namelen;
            h.msg_hdr.msg_iov = &mut self.send_iov[first];
            h.msg_hdr.msg_iovlen = count;
            h.msg_hdr.msg_control = ctrl;
            h.msg_hdr.msg_controllen = ctrl_len;
            h.msg_hdr.msg_flags = 0;
            first += count;
        }
        let msgs = runs.len();
        self.runs = runs;
        msgs
    }

    /// Writes message `m`'s control messages: the source address (`from`)
    /// and the segment size of a GSO run (`seg` > 0); returns their length.
    fn encode_send_ctrl(&mut self, m: usize, from: Option<PktInfo>, seg: usize) -> usize {
        let mut len = match from {
            Some(l) => self.encode_pktinfo(m, l),
            None => 0,
        };
        if seg > 0 {
            // SAFETY: message m's CTRL bytes (8-aligned) hold the packet
            // info (at most 40 bytes) and this message (24 bytes) after it.
            unsafe {
                let c = self
                    .send_ctrl
                    .as_mut_ptr()
                    .add(m * CTRL / 8)
                    .cast::<u8>()
                    .add(len) as *mut libc::cmsghdr;
                (*c).cmsg_level = libc::SOL_UDP;
                (*c).cmsg_type = libc::UDP_SEGMENT;
                (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg as u16);
                len += libc::CMSG_SPACE(size_of::<u16>() as u32) as usize;
            }
        }
        len
    }

    /// Whether sends still try UDP GSO (false once the kernel refused it).
    pub fn gso(&self) -> bool {
        self.gso
    }

    /// Writes an IP_PKTINFO / IPV6_PKTINFO message choosing the source
    /// address of a send; returns its length.
    fn encode_pktinfo(&mut self, m: usize, l: PktInfo) -> usize {
        // SAFETY: a msghdr pointing at message m's control space (CTRL
        // bytes, 8-aligned) is what CMSG_FIRSTHDR needs; both messages fit.
        unsafe {
            let mut h: libc::msghdr = zeroed();
            h.msg_control = self.send_ctrl.as_mut_ptr().add(m * CTRL / 8).cast();
            h.msg_controllen = CTRL;
            let c = libc::CMSG_FIRSTHDR(&h);
            match l.ip {
                IpAddr::V4(v4) => {
                    let len = size_of::<libc::in_pktinfo>() as u32;
                    (*c).cmsg_level = libc::IPPROTO_IP;
                    (*c).cmsg_type = libc::IP_PKTINFO;
                    (*c).cmsg_len = libc::CMSG_LEN(len) as _;
                    let p = libc::in_pktinfo {
                        ipi_ifindex: 0,
                        ipi_spec_dst: libc::in_addr {
                            s_addr: u32::from(v4).to_be(),
                        },
                        ipi_addr: libc::in_addr { s_addr: 0 },
                    };
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast(), p);
                    libc::CMSG_SPACE(len) as usize
                }
                IpAddr::V6(v6) => {
                    let len = size_of::<libc::in6_pktinfo>() as u32;
                    (*c).cmsg_level = libc::IPPROTO_IPV6;
                    (*c).cmsg_type = libc::IPV6_PKTINFO;
                    (*c).cmsg_len = libc::CMSG_LEN(len) as _;
                    // The interface only matters for link-local addresses.
                    let link_local = v6.segments()[0] & 0xffc0 == 0xfe80;
                    let p = libc::in6_pktinfo {
                        ipi6_addr: libc::in6_addr {
                            s6_addr: v6.octets(),
                        },
                        ipi6_ifindex: if link_local { l.ifindex } else { 0 },
                    };
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast(), p);
                    libc::CMSG_SPACE(len) as usize
                }
            }
        }
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

    fn runs(lens: &[usize], max: GsoLimits) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        gso_runs(lens.len(), |i| lens[i], max, &mut out);
        out
    }

    #[test]
    fn gso_runs_group_equal_sizes_and_keep_order() {
        let max = GsoLimits::default();
        // Equal sizes go together; a shorter one may end a run; a longer
        // one, an empty one and a lone one go alone.
        assert_eq!(
            runs(&[100, 100, 100, 40, 100, 200, 0, 0, 7], max),
            vec![(4, 100), (1, 0), (1, 0), (1, 0), (1, 0), (1, 0)]
        );
        assert_eq!(runs(&[64; 5], max), vec![(5, 64)]);
        assert_eq!(runs(&[64, 64, 64, 64, 32, 32], max), vec![(5, 64), (1, 0)]);
        assert_eq!(runs(&[], max), vec![]);
        assert_eq!(runs(&[0, 0], max), vec![(1, 0), (1, 0)]);
        // Two datagrams that together exceed one datagram's worth of
        // payload cannot share a message.
        assert_eq!(runs(&[40_000, 40_000], max), vec![(1, 0), (1, 0)]);
    }

    #[test]
    fn gso_runs_respect_the_limits() {
        let max = GsoLimits {
            segments: 4,
            bytes: 1000,
            ..GsoLimits::default()
        };
        // Ten of 100: four, four, two (segments); ten of 300: three a run
        // (bytes), then one alone.
        assert_eq!(runs(&[100; 10], max), vec![(4, 100), (4, 100), (2, 100)]);
        assert_eq!(
            runs(&[300; 10], max),
            vec![(3, 300), (3, 300), (3, 300), (1, 0)]
        );
        // Segments above a size the route refused go alone.
        let max = GsoLimits {
            segment: 1399,
            ..GsoLimits::default()
        };
        assert_eq!(
            runs(&[1400, 1400, 1399, 1399, 1399, 100], max),
            vec![(1, 0), (1, 0), (4, 1399)]
        );
        // Every datagram is in exactly one message, in order.
        let lens: Vec<usize> = (0..500)
            .map(|i| [1400, 1400, 1400, 9, 0, 64][i % 6])
            .collect();
        let got = runs(&lens, GsoLimits::default());
        assert_eq!(got.iter().map(|r| r.0).sum::<usize>(), lens.len());
        let mut at = 0;
        for (count, seg) in got {
            let run = &lens[at..at + count];
            if seg == 0 {
                assert_eq!(count, 1);
            } else {
                assert!(count >= 2 && run[..count - 1].iter().all(|&l| l == seg));
                assert!(run[count - 1] > 0 && run[count - 1] <= seg);
                assert!(run.iter().sum::<usize>() <= 65_507);
            }
            at += count;
        }
    }

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
