//! The copy engine: a plain userspace copy, the portable last resort.
//!
//! How it works
//! ------------
//! Traffic: every connection when `--mode copy` is chosen. The connection's
//! life (handoff, FIN each way, resets, teardown) is the shared driver's,
//! see [`super::relay`]; this file only says how one chunk moves.
//!
//! State: per direction a 64 KiB buffer, taken (from the driver's pool, or
//! allocated) on a readable event and given back once the source has
//! nothing more to read: idle connections hold none. The driver fills it
//! with one read and writes it all out before reading again, so a
//! connection holds at most 128 KiB however slow its reader.

use std::io;
use std::os::fd::AsFd;

use tokio::net::TcpStream;

use super::relay::{self, Chunk, Pool};
use super::{Conn, Engine, EngineKind};
use crate::engine::stats::DataPath;
use crate::sys;

/// Size of each direction's buffer.
pub const BUF_SIZE: usize = 64 * 1024;

/// Buffers of idle directions, for reuse.
static BUFFERS: Pool<Vec<u8>> = Pool::new();

/// The userspace copy engine.
pub struct CopyEngine;

/// One direction's buffer: `buf[start..end]` is pending.
#[derive(Default)]
pub struct CopyChunk {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The direction's first read has been tried (see [`relay`]'s "at
    /// once").
    tried: bool,
}

impl Chunk for CopyChunk {
    fn path(&self) -> DataPath {
        DataPath::Copy
    }

    async fn fill(&mut self, src: &TcpStream) -> io::Result<usize> {
        loop {
            if !self.buf.is_empty() {
                let read = if self.tried {
                    src.try_read(&mut self.buf)
                } else {
                    self.tried = true;
                    sys::read_now(src.as_fd(), &mut self.buf)
                };
                match read {
                    Ok(n) => {
                        self.start = 0;
                        self.end = n;
                        return Ok(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                // Nothing to read: the direction is idle, so is the buffer.
                BUFFERS.release(std::mem::take(&mut self.buf), true);
            }
            if self.tried {
                src.readable().await?;
            }
            self.buf = BUFFERS.acquire(|| Ok(vec![0; BUF_SIZE]))?;
        }
    }

    async fn drain(&mut self, dst: &TcpStream) -> io::Result<()> {
        // The first write is tried at once (see [`relay`]'s "at once").
        let mut at_once = true;
        while self.start < self.end {
            let pending = &self.buf[self.start..self.end];
            let written = if at_once {
                sys::write_now(dst.as_fd(), pending)
            } else {
                dst.writable().await?;
                dst.try_write(pending)
            };
            match written {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => self.start += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => at_once = false,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Drop for CopyChunk {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            BUFFERS.release(std::mem::take(&mut self.buf), true);
        }
    }
}

/// Buffers idle in the pool, and in use by connections.
pub fn pooled() -> (usize, usize) {
    BUFFERS.counts()
}

impl Engine for CopyEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Copy
    }

    fn run(&self, conn: Conn) -> super::Forwarding {
        Box::pin(relay::relay(conn, CopyChunk::default))
    }
}
