//! SOCK_SEQPACKET Unix sockets, the dial agent's transport: a connected
//! socket registered with tokio, a listener, a connected pair, and a
//! blocking connect. nix makes every call; nothing here is unsafe.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::{accept_owned, adopt_received, async_fd, Umask};

/// A connected SOCK_SEQPACKET socket registered with tokio: one
/// datagram per message, descriptors passed as SCM_RIGHTS.
pub struct SeqPacket(AsyncFd<OwnedFd>);

/// One datagram from [`SeqPacket::recv`].
#[derive(Debug)]
pub struct Received {
    /// Its length (at most the buffer's).
    pub len: usize,
    /// It was larger than the buffer: the rest is lost.
    pub truncated: bool,
    /// The descriptors that came with it.
    pub fds: Vec<OwnedFd>,
    /// Descriptors were attached but this process could not take them
    /// (the kernel closed them and set MSG_CTRUNC): why, as far as a probe
    /// tells (EMFILE or ENFILE when it is out of descriptors).
    pub fds_lost: Option<io::Error>,
}

impl SeqPacket {
    /// Registers a connected socket (made non-blocking here).
    pub fn new(fd: OwnedFd) -> io::Result<SeqPacket> {
        nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .map_err(io::Error::from)?;
        async_fd(fd, Interest::READABLE | Interest::WRITABLE).map(SeqPacket)
    }

    /// Sends one datagram with `fds` attached (at most 253, the kernel's
    /// SCM_MAX_FD).
    pub async fn send(&self, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
        loop {
            let mut guard = self.0.writable().await?;
            let cmsg: Vec<ControlMessage> = if fds.is_empty() {
                Vec::new()
            } else {
                vec![ControlMessage::ScmRights(fds)]
            };
            let iov = [IoSlice::new(data)];
            let r = sendmsg::<()>(
                self.0.get_ref().as_raw_fd(),
                &iov,
                &cmsg,
                MsgFlags::MSG_NOSIGNAL,
                None,
            );
            match r {
                Ok(_) => return Ok(()),
                Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Why descriptors attached to a datagram were dropped on receipt: the
    /// kernel does that when it cannot install them, which is almost
    /// always a full descriptor table. Duplicating one of ours tells: it
    /// fails the same way then.
    fn why_fds_lost(&self) -> io::Error {
        match self.0.get_ref().as_fd().try_clone_to_owned() {
            Err(e) => e,
            Ok(_probe) => io::Error::other(
                "descriptors sent with a message were dropped on receipt (MSG_CTRUNC)",
            ),
        }
    }

    /// Shuts the socket down both ways: the peer reads end of file, and
    /// this side's pending and later receives end too.
    pub fn shutdown(&self) -> io::Result<()> {
        nix::sys::socket::shutdown(
            self.0.get_ref().as_raw_fd(),
            nix::sys::socket::Shutdown::Both,
        )
        .map_err(io::Error::from)
    }

    /// Receives one datagram and any descriptors with it. `Ok(None)` at
    /// EOF.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<Option<Received>> {
        loop {
            let mut guard = self.0.readable().await?;
            // Room for the most descriptors a peer sends in one datagram
            // (the agent's sockets made ahead): with less, the kernel
            // truncates (MSG_CTRUNC) and the descriptors it did install
            // cannot be read back from the control data.
            let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
            let mut iov = [IoSliceMut::new(buf)];
            let r = recvmsg::<()>(
                self.0.get_ref().as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            );
            match r {
                Ok(msg) => {
                    let mut fds = Vec::new();
                    if let Ok(cmsgs) = msg.cmsgs() {
                        for c in cmsgs {
                            if let ControlMessageOwned::ScmRights(raw) = c {
                                fds.extend(adopt_received(raw));
                            }
                        }
                    }
                    let len = msg.bytes;
                    let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
                    let ctrunc = msg.flags.contains(MsgFlags::MSG_CTRUNC);
                    // Truncated (out of descriptors mid-way): nix will not
                    // read the control data, but the kernel describes the
                    // descriptors it did install, which are ours to close.
                    if ctrunc {
                        fds = super::fd::rights_in_truncated(&space);
                    }
                    if len == 0 && !truncated && !ctrunc && fds.is_empty() {
                        return Ok(None);
                    }
                    let fds_lost = ctrunc.then(|| self.why_fds_lost());
                    return Ok(Some(Received {
                        len,
                        truncated,
                        fds,
                        fds_lost,
                    }));
                }
                Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// The most descriptors [`SeqPacket::recv`] takes from one datagram.
pub const MAX_FDS: usize = 32;

/// A listening SOCK_SEQPACKET Unix socket (mode 0600).
pub struct SeqpacketListener(AsyncFd<OwnedFd>);

impl SeqpacketListener {
    /// Binds and listens at `path`, replacing a stale socket file there
    /// (but nothing else).
    pub fn bind(path: &Path) -> anyhow::Result<SeqpacketListener> {
        use anyhow::Context as _;
        match std::fs::symlink_metadata(path) {
            Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
                std::fs::remove_file(path)
                    .with_context(|| format!("removing {}", path.display()))?
            }
            Ok(_) => anyhow::bail!("{} exists and is not a socket", path.display()),
            Err(_) => {}
        }
        let fd = nix::sys::socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        let addr = nix::sys::socket::UnixAddr::new(path)?;
        {
            let _mask = Umask::set(0o177);
            nix::sys::socket::bind(fd.as_raw_fd(), &addr)
                .with_context(|| format!("binding {}", path.display()))?;
        }
        nix::sys::socket::listen(&fd, nix::sys::socket::Backlog::new(64)?)?;
        Ok(SeqpacketListener(async_fd(fd, Interest::READABLE)?))
    }

    /// The next connection.
    pub async fn accept(&self) -> io::Result<OwnedFd> {
        loop {
            let mut guard = self.0.readable().await?;
            match accept_owned(self.0.get_ref().as_fd()) {
                Ok(fd) => return Ok(fd),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
                Err(e) => return Err(e),
            }
        }
    }
}

/// A connected pair of SOCK_SEQPACKET sockets (forwarder end, agent end).
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io::Error::from)
}

/// Connects (blocking) to a SOCK_SEQPACKET socket listening at `path`.
pub fn seqpacket_connect(path: &Path) -> io::Result<OwnedFd> {
    let fd = nix::sys::socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = nix::sys::socket::UnixAddr::new(path)?;
    nix::sys::socket::connect(fd.as_raw_fd(), &addr)?;
    Ok(fd)
}
