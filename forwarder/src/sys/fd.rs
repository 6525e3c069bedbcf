//! Descriptors: adopting raw ones, registering them with tokio, and
//! waiting on them without a runtime.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::cvt;

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

/// The descriptors of a truncated SCM_RIGHTS message (MSG_CTRUNC), read
/// from the control buffer `space` recvmsg(2) filled (zeroed before): when
/// the receiver runs out of descriptors, or of room, part-way, the kernel
/// still writes one valid header for those it installed, which nix will
/// not iterate. Without this they would stay open, unknown to anyone.
pub fn rights_in_truncated(space: &[u8]) -> Vec<OwnedFd> {
    let hdr = std::mem::size_of::<libc::cmsghdr>();
    if space.len() < hdr {
        return Vec::new();
    }
    // SAFETY: `space` holds at least one cmsghdr; read_unaligned copies it.
    let h: libc::cmsghdr = unsafe { std::ptr::read_unaligned(space.as_ptr().cast()) };
    if h.cmsg_level != libc::SOL_SOCKET || h.cmsg_type != libc::SCM_RIGHTS {
        return Vec::new();
    }
    // SAFETY: CMSG_LEN is arithmetic on its argument.
    let data = unsafe { libc::CMSG_LEN(0) } as usize;
    // cmsg_len is a size_t in glibc and a socklen_t in musl.
    #[allow(clippy::useless_conversion)]
    let len = usize::try_from(h.cmsg_len).unwrap_or(0).min(space.len());
    if len <= data {
        return Vec::new();
    }
    let raw: Vec<RawFd> = space[data..len]
        .chunks_exact(std::mem::size_of::<RawFd>())
        .filter_map(|c| c.try_into().ok().map(RawFd::from_ne_bytes))
        .filter(|&fd| fd >= 0)
        .collect();
    adopt_received(raw)
}

/// accept4(2) with SOCK_CLOEXEC | SOCK_NONBLOCK, owned (rustix: nix's
/// accept4 returns a bare number).
pub fn accept_owned(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    use rustix::net::SocketFlags;
    Ok(rustix::net::accept_with(
        listener,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
    )?)
}

/// Waits up to `timeout` (blocking) for `fd` to be readable; false on
/// timeout.
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let mut pfd = [PollFd::new(fd, PollFlags::POLLIN)];
    Ok(nix::poll::poll(&mut pfd, PollTimeout::from(ms))? > 0)
}
