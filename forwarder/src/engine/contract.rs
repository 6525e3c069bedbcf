//! The contract every userspace engine keeps, run in-process against the
//! splice and copy engines on loopback socket pairs (no root, no
//! namespace): a plain `cargo test -p forwarder --lib`.
//!
//! Each case builds what the port manager hands an engine: side 0
//! accepted from a client, side 1 dialed to a server, both real TCP
//! sockets on 127.0.0.1, and checks what the client and the server see:
//!
//! - FIN each way: a half-close passes through after every byte before it,
//!   and the other direction keeps working until it closes too;
//! - reset each way: a peer that resets makes the other peer see a reset
//!   (ECONNRESET), never a clean end of stream;
//! - early data: bytes that both peers wrote before the engine took the
//!   pair (waiting in the sockets' receive queues) arrive first, in order;
//! - when both directions are done the connection is counted as ended,
//!   with its bytes by direction.
//!
//! The ebpf engine keeps the same contract in the netns suite
//! (`tests/engines.rs`), which needs BPF and root.

use std::io;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::copy::CopyEngine;
use super::splice::SpliceEngine;
use super::{Conn, Engine};
use crate::engine::stats::PortStats;

/// What a case gets: the client's and the server's ends, and the port's
/// counters.
struct Rig {
    client: TcpStream,
    server: TcpStream,
    stats: Arc<PortStats>,
}

/// Loopback pairs: (client, side 0) and (side 1, server).
async fn pairs() -> io::Result<([TcpStream; 2], [TcpStream; 2])> {
    let mut out = Vec::new();
    for _ in 0..2 {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let (a, b) = tokio::join!(TcpStream::connect(l.local_addr()?), l.accept());
        out.push([a?, b?.0]);
    }
    let second = out.pop().ok_or(io::ErrorKind::NotFound)?;
    let first = out.pop().ok_or(io::ErrorKind::NotFound)?;
    Ok((first, second))
}

impl Rig {
    /// Connects a client and a server through `engine`; with `early`, the
    /// client and the server write these bytes before the engine takes
    /// the pair.
    async fn start(engine: &dyn Engine, early: Option<(&[u8], &[u8])>) -> Rig {
        let ([mut client, side0], [side1, mut server]) = pairs().await.expect("loopback pairs");
        if let Some((up, down)) = early {
            client.write_all(up).await.expect("early write, client");
            server.write_all(down).await.expect("early write, server");
        }
        let stats = PortStats::new(1);
        engine.spawn(Conn {
            sides: [side0, side1],
            guard: stats.open_connection(),
        });
        Rig {
            client,
            server,
            stats,
        }
    }

    /// Waits until the engine counts the connection as ended.
    async fn ended(&self) {
        ended(&self.stats).await;
    }

    /// Bytes counted [to the child, to the parent].
    fn bytes(&self) -> [u64; 2] {
        [
            self.stats.bytes[0].load(Relaxed),
            self.stats.bytes[1].load(Relaxed),
        ]
    }
}

/// Waits until the engine counts the port's connection as ended (polled:
/// the counter has no notification).
async fn ended(stats: &PortStats) {
    let wait = async {
        while stats.active.load(Relaxed) != 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("the connection did not end within 10 s");
}

/// Reads to end of stream, within 10 s.
async fn read_all(s: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no end of stream within 10 s"))??;
    Ok(got)
}

/// Makes closing `s` send a reset.
fn reset(s: TcpStream) {
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER");
    drop(s);
}

/// What a read on a peer of a reset connection returns: the reset, not a
/// clean end (reads until then may return data).
async fn sees_reset(s: &mut TcpStream) -> io::Result<()> {
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return Err(io::Error::other("a clean end of stream, not a reset")),
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no reset within 10 s"))?
}

/// The client half-closes after its request; the server still answers, then
/// closes.
async fn fin_from_the_client(engine: &dyn Engine) {
    let mut r = Rig::start(engine, None).await;
    let request = vec![7u8; 300_000];
    r.client.write_all(&request).await.expect("write");
    r.client.shutdown().await.expect("shutdown");
    let got = read_all(&mut r.server).await.expect("server reads to EOF");
    assert_eq!(got.len(), request.len(), "every byte before the FIN");
    r.server
        .write_all(b"answer after FIN")
        .await
        .expect("write");
    r.server.shutdown().await.expect("shutdown");
    let back = read_all(&mut r.client).await.expect("client reads to EOF");
    assert_eq!(back, b"answer after FIN");
    r.ended().await;
    assert_eq!(r.bytes(), [300_000, 16]);
}

/// The server closes first (a banner, then FIN); the client keeps sending.
async fn fin_from_the_server(engine: &dyn Engine) {
    let mut r = Rig::start(engine, None).await;
    r.server.write_all(b"bye").await.expect("write");
    r.server.shutdown().await.expect("shutdown");
    let got = read_all(&mut r.client).await.expect("client reads to EOF");
    assert_eq!(got, b"bye");
    r.client.write_all(b"still here").await.expect("write");
    r.client.shutdown().await.expect("shutdown");
    let up = read_all(&mut r.server).await.expect("server reads to EOF");
    assert_eq!(up, b"still here");
    r.ended().await;
    assert_eq!(r.bytes(), [10, 3]);
}

/// A server reset reaches the client as a reset.
async fn reset_from_the_server(engine: &dyn Engine) {
    let mut r = Rig::start(engine, None).await;
    r.client.write_all(b"ping").await.expect("write");
    let mut b = [0u8; 4];
    r.server.read_exact(&mut b).await.expect("read");
    reset(r.server);
    sees_reset(&mut r.client)
        .await
        .expect("the client sees a reset");
    ended(&r.stats).await;
}

/// A client reset reaches the server as a reset.
async fn reset_from_the_client(engine: &dyn Engine) {
    let mut r = Rig::start(engine, None).await;
    r.server.write_all(b"hello").await.expect("write");
    let mut b = [0u8; 5];
    r.client.read_exact(&mut b).await.expect("read");
    reset(r.client);
    sees_reset(&mut r.server)
        .await
        .expect("the server sees a reset");
    ended(&r.stats).await;
}

/// Bytes written by both peers before the engine took the pair arrive
/// first and in order.
async fn early_data(engine: &dyn Engine) {
    let mut r = Rig::start(engine, Some((b"request before dial", b"banner"))).await;
    r.client.write_all(b" and after").await.expect("write");
    r.client.shutdown().await.expect("shutdown");
    let up = read_all(&mut r.server).await.expect("server reads");
    assert_eq!(up, b"request before dial and after");
    r.server.write_all(b" then more").await.expect("write");
    r.server.shutdown().await.expect("shutdown");
    let down = read_all(&mut r.client).await.expect("client reads");
    assert_eq!(down, b"banner then more");
    r.ended().await;
    assert_eq!(r.bytes(), [29, 16]);
}

/// Runs every case of the contract against one engine.
macro_rules! contract {
    ($($engine:ident: $make:expr;)*) => {$(
        mod $engine {
            use super::*;

            #[tokio::test]
            async fn fin_from_the_client() {
                super::fin_from_the_client(&$make).await;
            }

            #[tokio::test]
            async fn fin_from_the_server() {
                super::fin_from_the_server(&$make).await;
            }

            #[tokio::test]
            async fn reset_from_the_server() {
                super::reset_from_the_server(&$make).await;
            }

            #[tokio::test]
            async fn reset_from_the_client() {
                super::reset_from_the_client(&$make).await;
            }

            #[tokio::test]
            async fn early_data() {
                super::early_data(&$make).await;
            }
        }
    )*};
}

contract! {
    splice: SpliceEngine::new();
    copy: CopyEngine;
}
