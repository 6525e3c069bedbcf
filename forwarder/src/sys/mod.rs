//! The platform layer: the thin layer between the controller and the
//! kernel, for what the engines need and std/tokio do not offer. socket2,
//! nix, rustix and libc make the calls wherever they cover one; what
//! remains is written here, each unsafe block with its SAFETY comment and
//! wrapped in a function that returns `io::Result`, so the callers' logic
//! stays plain. Split by concern:
//!
//! - [`socket`]: socket creation and options, TCP counters and states;
//! - [`splice`]: pipes and splice(2);
//! - [`process`]: namespaces, capabilities, limits and process handles;
//! - [`fd`]: descriptors: ownership, tokio registration, waiting;
//! - [`seqpacket`]: the dial agent's SOCK_SEQPACKET transport.
//!
//! The UDP batch I/O (recvmmsg/sendmmsg with control messages) lives
//! beside the relay, in `udp::batch`.
//!
//! May use: nothing. Every other folder builds on this one.

pub mod fd;
pub mod process;
pub mod seqpacket;
pub mod socket;
pub mod splice;

pub use fd::*;
pub use process::*;
pub use seqpacket::*;
pub use socket::*;
pub use splice::*;

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsRawFd, BorrowedFd};

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

/// Whether an accept/socket error means "out of descriptors or memory":
/// back off and keep serving.
pub fn is_resource_exhaustion(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}

/// setsockopt(2) of an `int` option.
pub fn set_int_option(fd: BorrowedFd<'_>, level: i32, name: i32, val: i32) -> io::Result<()> {
    setsockopt(fd, level, name, val)
}
