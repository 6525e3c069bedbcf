//! The splice engine: splice(2) through a pipe per direction, so bytes move
//! from one socket's receive queue to the other's send queue by page
//! reference without being copied into userspace.
//!
//! How it works
//! ------------
//! Traffic: every connection when the mode is splice or auto (see
//! [`super::AUTO_REASON`]); also the ebpf engine's overflow (connections
//! that do not fit its maps).
//! The connection's life (handoff, FIN each way, resets, teardown) is the
//! shared driver's, see [`super::relay`]; this file only moves chunks.
//!
//! State: per direction a non-blocking pipe of [`PIPE_SIZE`] bytes, taken
//! (from the driver's pool, or created) on a readable event and given back
//! once the socket is drained and the pipe empty, so idle connections hold
//! no pipe: 10,000 idle connections would otherwise pin 40,000 descriptors
//! and, unprivileged, exceed `fs.pipe-user-pages-soft`, which shrinks every
//! later pipe to one page. A pipe goes back to the pool only when FIONREAD
//! says it is empty, so no byte can cross to another connection. A chunk is
//! spliced socket -> pipe only when the pipe is empty, so EAGAIN on that
//! call always means "socket drained", never "pipe full"; then pipe ->
//! socket until the pipe is empty again.
//!
//! Fallback: the copy engine ([`super::copy`]) where splice is unavailable.

use std::io;
use std::os::fd::AsFd;

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::copy::CopyChunk;
use super::relay::{self, Chunk, Pool};
use super::{Conn, Engine, EngineKind};
use crate::engine::stats::DataPath;
use crate::sys::{self, Pipe};

/// Requested capacity of each direction's pipe: large enough that one
/// chunk spans many TCP segments, small enough to bound memory per
/// connection (2 pipes of 256 KiB).
pub const PIPE_SIZE: usize = 256 * 1024;

/// Empty pipes of idle directions, for reuse.
static PIPES: Pool<Pipe> = Pool::new();

/// Gives a pipe back: to the pool when it is provably empty, else closed.
fn release(pipe: Pipe) {
    let empty = matches!(sys::pipe_pending(&pipe), Ok(0));
    PIPES.release(pipe, empty);
}

/// Pipes idle in the pool, and in use by connections.
pub fn pooled() -> (usize, usize) {
    PIPES.counts()
}

/// The splice(2) engine.
pub struct SpliceEngine;

impl SpliceEngine {
    pub fn new() -> Self {
        SpliceEngine
    }
}

impl Default for SpliceEngine {
    fn default() -> Self {
        Self::new()
    }
}

/// One direction's pipe and how many bytes sit in it; when no pipe can be
/// had (out of descriptors) the direction degrades to a copy buffer rather
/// than dropping the connection.
#[derive(Default)]
pub struct SpliceChunk {
    pipe: Option<Pipe>,
    pending: usize,
    degraded: Option<CopyChunk>,
    /// The direction's first read has been tried (see [`relay`]'s "at
    /// once").
    tried: bool,
}

impl Chunk for SpliceChunk {
    fn path(&self) -> DataPath {
        if self.degraded.is_some() {
            DataPath::Copy
        } else {
            DataPath::Splice
        }
    }

    async fn fill(&mut self, src: &TcpStream) -> io::Result<usize> {
        debug_assert_eq!(self.pending, 0);
        loop {
            if let Some(c) = &mut self.degraded {
                return c.fill(src).await;
            }
            if let Some(pipe) = &self.pipe {
                let (w, cap) = (pipe.write.as_fd(), pipe.capacity);
                let moved = if self.tried {
                    src.try_io(Interest::READABLE, || sys::splice(src.as_fd(), w, cap))
                } else {
                    self.tried = true;
                    sys::splice(src.as_fd(), w, cap)
                };
                match moved {
                    Ok(n) => {
                        self.pending = n;
                        return Ok(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                // Socket drained, pipe empty: the direction is idle.
                if let Some(p) = self.pipe.take() {
                    release(p);
                }
            }
            if self.tried {
                src.readable().await?;
            }
            match PIPES.acquire(|| sys::pipe(PIPE_SIZE)) {
                Ok(p) => self.pipe = Some(p),
                Err(e) if sys::is_resource_exhaustion(&e) => {
                    tracing::debug!(error = %e, "no pipe for splice; copying this direction");
                    self.degraded = Some(CopyChunk::default());
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn drain(&mut self, dst: &TcpStream) -> io::Result<()> {
        if let Some(c) = &mut self.degraded {
            return c.drain(dst).await;
        }
        let Some(pipe) = &self.pipe else {
            return Ok(());
        };
        // The first write is tried at once (see [`relay`]'s "at once").
        let mut at_once = true;
        while self.pending > 0 {
            let r = pipe.read.as_fd();
            let moved = if at_once {
                sys::splice(r, dst.as_fd(), self.pending)
            } else {
                dst.writable().await?;
                dst.try_io(Interest::WRITABLE, || {
                    sys::splice(r, dst.as_fd(), self.pending)
                })
            };
            match moved {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => self.pending -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => at_once = false,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Drop for SpliceChunk {
    fn drop(&mut self) {
        // A pipe with bytes left (a connection that ended mid-chunk) fails
        // release's emptiness check and is closed.
        if let Some(p) = self.pipe.take() {
            release(p);
        }
    }
}

impl Engine for SpliceEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Splice
    }

    fn run(&self, conn: Conn) -> super::Forwarding {
        Box::pin(relay::relay(conn, SpliceChunk::default))
    }
}
