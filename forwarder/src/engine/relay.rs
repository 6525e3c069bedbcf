//! The userspace relay driver shared by the splice and copy engines.
//!
//! How it works
//! ------------
//! Traffic: every connection of a run whose engine is splice or copy, and
//! connections the ebpf engine could not take (its maps full).
//!
//! State: one tokio task per connection owns both sockets and, per
//! direction, a [`Chunk`] mover (a pipe for splice, a buffer for copy). A
//! mover is held only while its direction has data: taken on a readable
//! event and given back to a small process-wide [`Pool`] as soon as the
//! source has nothing more to read (and the mover is empty), so idle
//! connections, also ones that carried data before, cost two sockets and a
//! task, nothing more. Memory per connection is bounded by two movers'
//! capacity, and the pool by [`POOL_MAX`] movers.
//!
//! Events in a connection's life:
//! - handoff: the port manager has accepted side 0 and dialed side 1; bytes
//!   the client sent early are simply waiting in side 0's receive queue;
//! - data: direction i waits for side i to be readable, moves one chunk into
//!   its mover, then writes all of it to side 1-i before reading again: a
//!   slow reader stops us reading, which stops the sender by TCP flow
//!   control, so nothing piles up in the forwarder;
//! - at once: a direction's first read, and the first write of each chunk,
//!   are tried before asking tokio whether the socket is ready. A new
//!   socket's readiness reaches tokio only at its event loop's next turn,
//!   while the client's request (or the server's banner) and the room to
//!   write it are usually there already; a try that finds nothing (EAGAIN)
//!   falls back to waiting for readiness;
//! - FIN from side i (read returns 0): shut down the write side of 1-i once
//!   the mover is empty; the other direction keeps flowing (half-close);
//! - RST or any error on either side, in either direction, also while a
//!   direction is idle or already finished: both sockets are closed with
//!   SO_LINGER 0 so each peer sees a reset;
//! - teardown: when both directions have ended, both sockets close;
//! - forwarder exit: the port manager shuts the port down
//!   ([`PortStats::closed`]) and the connection is reset like on an error,
//!   so the final stats line counts it as ended.
//!
//! Fallbacks: copy is the last resort; splice needs nothing but pipes.

use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::engine::stats::{DataPath, PortStats};
use crate::engine::Conn;
use crate::sys;

/// How many idle movers of one kind a [`Pool`] keeps for reuse.
pub const POOL_MAX: usize = 64;

/// Idle movers (empty pipes, buffers) kept for the next direction that
/// becomes readable, so a busy connection that drains its source now and
/// then does not create and destroy a pipe each time, and idle connections
/// hold none. Keeps at most [`POOL_MAX`]; the rest are dropped. Also counts
/// the movers in use, so tests and stats can tell that idle connections
/// hold none.
pub struct Pool<T> {
    items: Mutex<Vec<T>>,
    in_use: AtomicUsize,
}

impl<T> Pool<T> {
    pub const fn new() -> Self {
        Pool {
            items: Mutex::new(Vec::new()),
            in_use: AtomicUsize::new(0),
        }
    }

    /// A pooled mover, or a new one from `make`. Every mover acquired must
    /// be given back with [`Pool::release`].
    pub fn acquire(&self, make: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let pooled = self.items.lock().ok().and_then(|mut i| i.pop());
        let item = match pooled {
            Some(item) => item,
            None => make()?,
        };
        self.in_use.fetch_add(1, Ordering::Relaxed);
        Ok(item)
    }

    /// Takes back a mover from [`Pool::acquire`]: kept for reuse when
    /// `reusable` and the pool has room, dropped otherwise.
    pub fn release(&self, item: T, reusable: bool) {
        self.in_use.fetch_sub(1, Ordering::Relaxed);
        if !reusable {
            return;
        }
        if let Ok(mut items) = self.items.lock() {
            if items.len() < POOL_MAX {
                items.push(item);
            }
        }
    }

    /// Movers kept idle in the pool, and movers in use by connections.
    pub fn counts(&self) -> (usize, usize) {
        let idle = self.items.lock().map_or(0, |i| i.len());
        (idle, self.in_use.load(Ordering::Relaxed))
    }
}

impl<T> Default for Pool<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// Moves bytes of one direction in chunks.
pub trait Chunk: Send {
    /// Which counter the bytes go to.
    fn path(&self) -> DataPath;
    /// Waits until `src` is readable and moves up to one chunk out of it.
    /// Returns 0 at EOF. Only called when `pending` is 0.
    fn fill(&mut self, src: &TcpStream) -> impl Future<Output = io::Result<usize>> + Send;
    /// Writes everything pending to `dst`.
    fn drain(&mut self, dst: &TcpStream) -> impl Future<Output = io::Result<()>> + Send;
}

/// Forwards direction `from` -> `1 - from` until EOF, then shuts down the
/// destination's write side.
async fn pump<C: Chunk>(
    sides: &[TcpStream; 2],
    from: usize,
    mut chunk: C,
    stats: &PortStats,
) -> io::Result<()> {
    let (src, dst) = (&sides[from], &sides[1 - from]);
    loop {
        let n = chunk.fill(src).await?;
        if n == 0 {
            return sys::shutdown_write(dst.as_fd());
        }
        stats.add_bytes(from, n as u64, chunk.path());
        chunk.drain(dst).await?;
    }
}

/// Waits for a socket error (RST, timeout) and returns it.
async fn error_of(s: &TcpStream) -> io::Error {
    loop {
        match s.ready(Interest::ERROR).await {
            Ok(r) if r.is_error() => {
                return match sys::take_error(s.as_fd()) {
                    Ok(Some(e)) => e,
                    Ok(None) => io::Error::from(io::ErrorKind::ConnectionReset),
                    Err(e) => e,
                }
            }
            Ok(_) => continue,
            Err(e) => return e,
        }
    }
}

/// Runs both directions of `conn` to completion, then closes it; on any
/// error resets both sides.
pub async fn relay<C: Chunk>(conn: Conn, make: impl Fn() -> C) {
    let Conn { sides, guard } = conn;
    let stats = guard.port().clone();
    let result = {
        let mut f0 = pin!(pump(&sides, 0, make(), &stats));
        let mut f1 = pin!(pump(&sides, 1, make(), &stats));
        let mut done = [false; 2];
        loop {
            let step = tokio::select! {
                r = &mut f0, if !done[0] => r.map(|()| done[0] = true),
                r = &mut f1, if !done[1] => r.map(|()| done[1] = true),
                e = error_of(&sides[0]) => Err(e),
                e = error_of(&sides[1]) => Err(e),
                () = stats.closed() => Err(io::Error::other("the forwarder is stopping")),
            };
            match step {
                Err(e) => break Err(e),
                Ok(()) if done[0] && done[1] => break Ok(()),
                Ok(()) => {}
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(port = stats.id, error = %e, "connection reset");
        for s in &sides {
            let _ = sys::set_linger_zero(s.as_fd());
        }
    }
    drop(sides);
    drop(guard);
}
