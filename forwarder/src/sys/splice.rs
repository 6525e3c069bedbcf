//! Pipes and splice(2), the splice engine's movers.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags};

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
    let n = rustix::io::ioctl_fionread(&p.read)?;
    Ok(usize::try_from(n).unwrap_or(usize::MAX))
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
