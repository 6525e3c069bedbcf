//! The platform layer: the thin layer between the controller and the
//! kernel, for what the engines need and std/tokio do not offer. The crates
//! make the calls: socket2 (sockets and their common options, cookies,
//! IPV6_TRANSPARENT, flagged send/recv), nix (namespaces, rlimits, umask,
//! prctl, pipes, splice, fcntl, poll, epoll, SO_PEERCRED, the UDP socket
//! options, SOCK_SEQPACKET messages with SCM_RIGHTS), rustix (poll with
//! POLLRDHUP, pidfd_open, FIONREAD, accept4 returning an owned
//! descriptor) and libc (the `tcp_info` struct). Wrapped here, each in a
//! function that returns `io::Result`, so the callers' logic stays plain.
//!
//! What remains hand-written, each unsafe block with its SAFETY comment,
//! because no crate has it (as of socket2 0.6, nix 0.30, rustix 1.1):
//!
//! - getsockopt/setsockopt of `SO_RCVLOWAT`, `TCP_WINDOW_CLAMP`,
//!   `TCP_INFO`, `SO_NETNS_COOKIE` and `SO_MEMINFO` ([`socket`]): none of
//!   the three has these options (nix's `sockopt_impl!` is not exported);
//! - the `SIOCOUTQ` ioctl ([`socket`]): rustix has FIONREAD only, nix only
//!   the macros that generate an unsafe ioctl function;
//! - adopting descriptors by number ([`fd`]): a `--fd N` from the parent,
//!   and nix's SCM_RIGHTS and accept4, which hand out `RawFd`s;
//! - registering a descriptor with tokio ([`fd`]): `AsyncFd` is safe only
//!   for types that own their descriptor, which [`OwnsFd`] promises;
//! - the pre-exec hook of the dial agent ([`process`]): `pre_exec` is
//!   unsafe by contract; inside it nix makes the calls but dup2 onto
//!   descriptor 3, for which nix wants an `OwnedFd` we do not have.
//!
//! Split by concern:
//!
//! - [`socket`]: socket creation and options, TCP counters and states;
//! - [`mod@splice`]: pipes and splice(2);
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

/// getsockopt(2) for the options socket2, nix and rustix all lack (see
/// each caller).
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

/// setsockopt(2) for the options socket2, nix and rustix all lack (see
/// each caller).
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

/// Whether an accept/socket error means "out of descriptors or memory":
/// back off and keep serving.
pub fn is_resource_exhaustion(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}

/// For an error that means "out of file descriptors", what it means and
/// what to change, to follow the error in a log line or a dial failure:
/// EMFILE, this process's RLIMIT_NOFILE (named with its value); ENFILE,
/// the system's table (fs.file-max). `None` for any other error.
pub fn descriptor_hint(err: &io::Error) -> Option<String> {
    match err.raw_os_error()? {
        libc::EMFILE => Some(format!(
            "out of file descriptors: the limit is {} (RLIMIT_NOFILE); raise it \
             (LimitNOFILE= in a systemd unit, ulimit -n in a shell) or lower --max-connections",
            nofile_limit().map_or_else(|_| "unknown".to_string(), |n| n.to_string())
        )),
        libc::ENFILE => Some(
            "the system is out of file descriptors (fs.file-max): raise it or close others"
                .to_string(),
        ),
        _ => None,
    }
}
