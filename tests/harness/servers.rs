//! Test servers. Each takes a listener created inside the child namespace
//! and serves every connection on its own task until the test ends.

use std::io;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::data::{Pattern, Tally};

fn serve<F, Fut>(l: TcpListener, f: F)
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(f(s));
        }
    });
}

/// Writes the stream (seed, len) to `w`.
pub async fn send_pattern<W: AsyncWrite + Unpin>(w: &mut W, seed: u64, len: u64) -> io::Result<()> {
    let mut p = Pattern::new(seed, len);
    let mut buf = vec![0u8; 64 * 1024];
    while let Some(n) = p.next_chunk(&mut buf) {
        w.write_all(&buf[..n]).await?;
    }
    Ok(())
}

/// Reads to EOF, counting and hashing.
pub async fn read_tally<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<(u64, String)> {
    let mut t = Tally::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(t.finish());
        }
        t.add(&buf[..n]);
    }
}

/// Echoes everything, half-closing when the client does.
pub fn echo(l: TcpListener) {
    serve(l, |mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    });
}

/// An echo server that is late: until `open` fires its accept queue is
/// full (`filler`, from [`crate::Netns::fill_accept_queue`], holds the only
/// slot), so the kernel drops new SYNs (counted in the namespace's
/// ListenOverflows, see [`crate::Netns::listen_overflows`]) and a dialer's
/// handshake waits for a SYN retransmission: a connect() to a listener
/// that merely has not accepted yet would complete at once from the
/// backlog. Then it takes the filler, reopens the queue and echoes. Each
/// accepted connection (not the filler) is reported on the returned
/// channel.
pub fn late_echo(
    l: TcpListener,
    filler: std::net::TcpStream,
    open: tokio::sync::oneshot::Receiver<()>,
) -> mpsc::UnboundedReceiver<()> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let _ = open.await;
        if let Ok((s, _)) = l.accept().await {
            drop(s);
        }
        drop(filler);
        socket2::SockRef::from(&l)
            .listen(1024)
            .expect("reopen the accept queue");
        serve(l, move |mut s| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(());
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            }
        });
    });
    rx
}

/// Reads to EOF, answers "COUNT HASH\n", then sends `reply_len` bytes of
/// the stream with seed 7 and closes.
pub fn sink_hash(l: TcpListener, reply_len: u64) {
    serve(l, move |mut s| async move {
        let Ok((n, h)) = read_tally(&mut s).await else {
            return;
        };
        if s.write_all(format!("{n} {h}\n").as_bytes()).await.is_err() {
            return;
        }
        let _ = send_pattern(&mut s, 7, reply_len).await;
        let _ = s.shutdown().await;
    });
}

/// Reads a request (len: u64 LE, seed: u64 LE), streams that many bytes of
/// the stream, shuts down its write side and drains until the client
/// closes.
pub fn source(l: TcpListener) {
    serve(l, |mut s| async move {
        let mut req = [0u8; 16];
        if s.read_exact(&mut req).await.is_err() {
            return;
        }
        let len = u64::from_le_bytes(req[..8].try_into().unwrap_or_default());
        let seed = u64::from_le_bytes(req[8..].try_into().unwrap_or_default());
        if send_pattern(&mut s, seed, len).await.is_err() {
            return;
        }
        let _ = s.shutdown().await;
        let _ = read_tally(&mut s).await;
    });
}

/// The banner a [`banner`] server sends first.
pub const BANNER: &[u8] = b"220 banner from the child\r\n";

/// Speaks first (a banner), then echoes.
pub fn banner(l: TcpListener) {
    serve(l, |mut s| async move {
        if s.write_all(BANNER).await.is_err() {
            return;
        }
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    });
}

/// Sends "bye\n" and shuts down its write side first, then reads what the
/// client still sends and reports (count, hash).
pub fn closes_first(l: TcpListener, report: mpsc::UnboundedSender<(u64, String)>) {
    serve(l, move |mut s| {
        let report = report.clone();
        async move {
            if s.write_all(b"bye\n").await.is_err() || s.shutdown().await.is_err() {
                return;
            }
            if let Ok(r) = read_tally(&mut s).await {
                let _ = report.send(r);
            }
        }
    });
}

/// Reads a few bytes, then resets the connection (SO_LINGER 0 close).
pub fn resets(l: TcpListener) {
    serve(l, |mut s| async move {
        let mut b = [0u8; 4];
        let _ = s.read_exact(&mut b).await;
        crate::reset_on_drop(&s);
        drop(s);
    });
}

/// Echoes what it reads (so a client knows its bytes arrived) and reports
/// how each connection's reads end (EOF or an error kind) and when.
pub fn observes(l: TcpListener, report: mpsc::UnboundedSender<(io::Result<u64>, Instant)>) {
    serve(l, move |mut s| {
        let report = report.clone();
        async move {
            let mut total = 0u64;
            let mut buf = [0u8; 4096];
            let r = loop {
                match s.read(&mut buf).await {
                    Ok(0) => break Ok(total),
                    Ok(n) => {
                        total += n as u64;
                        if let Err(e) = s.write_all(&buf[..n]).await {
                            break Err(e);
                        }
                    }
                    Err(e) => break Err(e),
                }
            };
            let _ = report.send((r, Instant::now()));
        }
    });
}

/// A slow reader: reads at most 4 KiB per millisecond (a few MB/s), then
/// answers "COUNT HASH\n". Give its listener a small SO_RCVBUF.
pub fn slow_sink(l: TcpListener) {
    serve(l, |mut s| async move {
        let mut t = Tally::default();
        let mut buf = vec![0u8; 4 * 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => t.add(&buf[..n]),
                Err(_) => return,
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let (n, h) = t.finish();
        let _ = s.write_all(format!("{n} {h}\n").as_bytes()).await;
        let _ = s.shutdown().await;
    });
}

/// Streams data until a write fails, then reports the error and when it
/// happened. Reads nothing.
pub fn firehose(l: TcpListener, report: mpsc::UnboundedSender<(io::Error, Instant)>) {
    serve(l, move |mut s| {
        let report = report.clone();
        async move {
            let mut p = Pattern::new(9, u64::MAX);
            let mut buf = vec![0u8; 64 * 1024];
            while let Some(n) = p.next_chunk(&mut buf) {
                if let Err(e) = s.write_all(&buf[..n]).await {
                    let _ = report.send((e, Instant::now()));
                    return;
                }
            }
        }
    });
}

/// Reads `after` bytes, then resets the connection and reports when.
pub fn resets_after(l: TcpListener, after: usize, report: mpsc::UnboundedSender<Instant>) {
    serve(l, move |mut s| {
        let report = report.clone();
        async move {
            let mut buf = vec![0u8; after];
            if s.read_exact(&mut buf).await.is_err() {
                return;
            }
            crate::reset_on_drop(&s);
            drop(s);
            let _ = report.send(Instant::now());
        }
    });
}
