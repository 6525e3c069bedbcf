//! The bench's request/response workloads: an echo server (the hidden
//! `bench-echo` subcommand, run inside the child namespace with
//! `ip netns exec`) and a small tokio load generator.
//!
//! Method:
//! - *ping-pong*: one connection (TCP_NODELAY on both ends), a message of
//!   SIZE bytes written, the same SIZE bytes read back, N times in a row;
//!   each round trip is timed with a monotonic clock. 100 unrecorded round
//!   trips first. Reported as p50/p99/p99.9/max in microseconds.
//! - *connection rate*: C clients, each an OS thread of its own with
//!   blocking sockets, in a loop for a fixed duration:
//!   connect, send the 1-byte request `!`, read the 1-byte answer, read EOF,
//!   close. The echo server answers `!` and closes first, so the TIME_WAIT
//!   state ends up on the server side (in the child), not on the client's
//!   ephemeral ports. *setup time* = from before connect() to the answer
//!   byte: it covers the forwarder's accept, its dial in the child and one
//!   round trip (connect() alone returns as soon as the forwarder's kernel
//!   accepted, before the child is dialed). Reported: completed connections
//!   per second, p99 setup time, and failures (each operation has a 5 s
//!   limit; a failure is counted, the client goes on). One tokio thread
//!   for all clients, as before, was itself the bottleneck: direct
//!   loopback reached about half the rate that a thread per client
//!   reaches, and which system the scheduler put beside that one thread
//!   decided a repetition's rate.
//! - the other workloads' clients run on a current-thread tokio runtime
//!   on a thread of their own. For *direct* that thread first enters the
//!   child namespace (setns), so the sockets it creates, and the threads
//!   it starts, live there.

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// The line the echo server prints once it listens.
pub const ECHO_READY: &str = "bench-echo: listening";
/// The request byte that makes the echo server answer and close.
const ONE_SHOT: u8 = b'!';
/// The limit for any single network operation of the load generator.
const OP_LIMIT: Duration = Duration::from_secs(5);

/// `bench-echo --bind ADDR`: echoes every byte back; a read of exactly the
/// one byte `!` is answered and the connection closed (the connection-rate
/// workload).
pub fn echo_server(bind: SocketAddr) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    rt.block_on(async move {
        let l = TcpListener::bind(bind)
            .await
            .with_context(|| format!("bench-echo: binding {bind}"))?;
        println!("{ECHO_READY} on {bind}");
        std::io::stdout().flush().context("writing to stdout")?;
        loop {
            let (s, _) = match l.accept().await {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("bench-echo: accept: {e}");
                    // Do not spin on a lasting error (out of descriptors).
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            tokio::spawn(async move {
                let _ = echo(s).await;
            });
        }
    })
}

async fn echo(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    // Small: the scale workload holds 10,000 connections open here.
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        s.write_all(&buf[..n]).await?;
        if n == 1 && buf[0] == ONE_SHOT {
            return Ok(());
        }
    }
}

/// Runs `f` on a fresh current-thread tokio runtime in a new thread that
/// first enters the network namespace `netns` (a namespace file), if any.
pub fn in_netns<T, F, Fut>(netns: Option<String>, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T>>,
{
    let t = std::thread::spawn(move || -> Result<T> {
        if let Some(path) = netns {
            let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            use std::os::fd::AsRawFd as _;
            // SAFETY: setns on a valid namespace fd affects only this thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("entering network namespace {path}"));
            }
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the tokio runtime")?;
        rt.block_on(f())
    });
    match t.join() {
        Ok(r) => r,
        Err(_) => bail!("the load generator thread panicked"),
    }
}

async fn within<T>(
    what: &str,
    fut: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(OP_LIMIT, fut).await {
        Ok(r) => r.with_context(|| what.to_string()),
        Err(_) => bail!("{what}: no answer within {OP_LIMIT:?}"),
    }
}

/// Round-trip times in nanoseconds of `n` ping-pongs of `size` bytes.
pub async fn ping_pong(addr: SocketAddr, size: usize, n: usize) -> Result<Vec<u64>> {
    let mut s = within(&format!("connecting to {addr}"), TcpStream::connect(addr)).await?;
    s.set_nodelay(true).context("TCP_NODELAY")?;
    let msg = vec![b'p'; size];
    let mut back = vec![0u8; size];
    let mut rtts = Vec::with_capacity(n);
    for i in 0..n + 100 {
        let t0 = Instant::now();
        within("sending", s.write_all(&msg)).await?;
        within("receiving the echo", s.read_exact(&mut back)).await?;
        let dt = t0.elapsed();
        if i >= 100 {
            rtts.push(u64::try_from(dt.as_nanos()).unwrap_or(u64::MAX));
        }
    }
    Ok(rtts)
}

/// What a connection-rate run measured.
pub struct ConnRate {
    pub completed: u64,
    pub failed: u64,
    pub secs: f64,
    /// Setup times (connect to first answer byte), nanoseconds.
    pub setup_ns: Vec<u64>,
    /// The first failure, for the report.
    pub first_error: Option<String>,
}

/// One connection of the connection-rate workload, with blocking calls,
/// each bounded by [`OP_LIMIT`] (SO_SNDTIMEO also bounds a blocking
/// connect on Linux): its setup time in nanoseconds.
fn one_connection(addr: SocketAddr, from: Option<std::net::IpAddr>) -> Result<u64> {
    use std::io::Read as _;
    let limit = |what: &str, e: std::io::Error| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            anyhow::anyhow!("{what}: no answer within {OP_LIMIT:?}")
        }
        _ if e.raw_os_error() == Some(libc::EINPROGRESS) => {
            anyhow::anyhow!("{what}: no answer within {OP_LIMIT:?}")
        }
        _ => anyhow::Error::new(e).context(what.to_string()),
    };
    let t0 = Instant::now();
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .context("socket")?;
    if let Some(ip) = from {
        sock.bind(&SocketAddr::new(ip, 0).into())
            .with_context(|| format!("binding the client to {ip}"))?;
    }
    sock.set_write_timeout(Some(OP_LIMIT))
        .context("SO_SNDTIMEO")?;
    sock.set_read_timeout(Some(OP_LIMIT))
        .context("SO_RCVTIMEO")?;
    sock.connect(&addr.into())
        .map_err(|e| limit("connecting", e))?;
    let mut s = std::net::TcpStream::from(sock);
    s.write_all(&[ONE_SHOT])
        .map_err(|e| limit("sending the request", e))?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)
        .map_err(|e| limit("reading the answer", e))?;
    let setup = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let mut rest = [0u8; 16];
    let n = s.read(&mut rest).map_err(|e| limit("reading EOF", e))?;
    if n != 0 {
        bail!("{n} unexpected bytes after the answer");
    }
    Ok(setup)
}

/// What one client thread of [`conn_rate`] counted: completed, failed,
/// setup times, the first error.
type ClientCount = (u64, u64, Vec<u64>, Option<String>);

/// `clients` concurrent loops of connect, 1-byte request/response, close,
/// for `dur`; each client's socket bound to `from` where given. Each
/// client is an OS thread of its own with blocking sockets, as a simple
/// client is; the threads start in the caller's network namespace.
pub async fn conn_rate(
    addr: SocketAddr,
    from: Option<std::net::IpAddr>,
    clients: usize,
    dur: Duration,
) -> Result<ConnRate> {
    let start = Instant::now();
    let end = start + dur;
    let client = move || -> ClientCount {
        let (mut ok, mut failed, mut setups, mut first) = (0u64, 0u64, Vec::new(), None);
        while Instant::now() < end {
            match one_connection(addr, from) {
                Ok(ns) => {
                    ok += 1;
                    setups.push(ns);
                }
                Err(e) => {
                    failed += 1;
                    first.get_or_insert_with(|| format!("{e:#}"));
                    // Do not spin on an immediate error.
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        (ok, failed, setups, first)
    };
    let threads = (0..clients)
        .map(|_| {
            std::thread::Builder::new()
                .name("bench-client".into())
                .stack_size(256 * 1024)
                .spawn(client)
        })
        .collect::<std::io::Result<Vec<_>>>()
        .context("starting the client threads")?;
    // Joined off the runtime's thread: a server on the same runtime (the
    // tests') must go on running.
    let counts = tokio::task::spawn_blocking(move || {
        threads
            .into_iter()
            .map(|t| t.join())
            .collect::<std::result::Result<Vec<ClientCount>, _>>()
    })
    .await
    .context("joining the client threads")?
    .map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
    let mut r = ConnRate {
        completed: 0,
        failed: 0,
        secs: 0.0,
        setup_ns: Vec::new(),
        first_error: None,
    };
    for (ok, failed, setups, first) in counts {
        r.completed += ok;
        r.failed += failed;
        r.setup_ns.extend(setups);
        if r.first_error.is_none() {
            r.first_error = first;
        }
    }
    r.secs = start.elapsed().as_secs_f64();
    Ok(r)
}

/// What the scale workload measured: connections opened and held.
pub struct Held {
    /// The open connections; dropping them closes them.
    pub streams: Vec<TcpStream>,
    /// From the first connect() to the last connection's echo.
    pub open_secs: f64,
    /// Setup times (connect to echo), nanoseconds.
    pub setup_ns: Vec<u64>,
    /// The first failure, which stopped the opening; the connections
    /// opened until then are still held, so the carrier can be inspected.
    pub error: Option<String>,
}

/// Opens `n` connections, at most `parallel` being set up at a time, and
/// proves each end to end with a 1-byte round trip (connect() alone
/// completes in the forwarder's kernel before the child is dialed). The
/// first failure stops the opening.
pub async fn hold(addr: SocketAddr, n: usize, parallel: usize) -> Held {
    let start = Instant::now();
    let mut streams = Vec::with_capacity(n);
    let mut setup_ns = Vec::with_capacity(n);
    let mut tasks = tokio::task::JoinSet::new();
    let mut started = 0;
    let mut error = None;
    while streams.len() < n && error.is_none() {
        while started < n && tasks.len() < parallel {
            started += 1;
            tasks.spawn(async move {
                let t0 = Instant::now();
                let mut s = within("connecting", TcpStream::connect(addr)).await?;
                within("sending", s.write_all(b"h")).await?;
                let mut b = [0u8; 1];
                within("reading the echo", s.read_exact(&mut b)).await?;
                let dt = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
                Ok::<_, anyhow::Error>((s, dt))
            });
        }
        let Some(done) = tasks.join_next().await else {
            break;
        };
        match done {
            Ok(Ok((s, dt))) => {
                streams.push(s);
                setup_ns.push(dt);
            }
            Ok(Err(e)) => {
                error = Some(format!("connection {} of {n}: {e:#}", streams.len() + 1));
            }
            Err(e) => error = Some(format!("a connecting task failed: {e}")),
        }
    }
    Held {
        streams,
        open_secs: start.elapsed().as_secs_f64(),
        setup_ns,
        error,
    }
}

/// The `q`-quantile (0..=1) of sorted samples, nearest rank.
pub fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// p50, p99, p99.9 and max of nanosecond samples, in microseconds.
pub fn latency_summary(samples: &[u64]) -> [f64; 4] {
    let mut v = samples.to_vec();
    v.sort_unstable();
    let us = |ns: u64| ns as f64 / 1e3;
    [
        us(quantile(&v, 0.5)),
        us(quantile(&v, 0.99)),
        us(quantile(&v, 0.999)),
        us(v.last().copied().unwrap_or(0)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server (the bench's own handler) on a free loopback port.
    async fn echo_here() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(echo(s));
            }
        });
        addr
    }

    #[tokio::test]
    async fn hold_opens_and_proves_every_connection() {
        let addr = echo_here().await;
        let held = hold(addr, 50, 8).await;
        assert_eq!(held.error, None);
        assert_eq!(held.streams.len(), 50);
        assert_eq!(held.setup_ns.len(), 50);
        // A server that closes at once: the first failure stops the
        // opening and is reported, with what was opened until then.
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let closing = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                drop(s);
            }
        });
        let held = hold(closing, 5, 1).await;
        let err = held.error.expect("a failure");
        assert!(err.starts_with("connection 1 of 5"), "{err}");
        assert!(held.streams.is_empty());
    }

    #[tokio::test]
    async fn ping_pong_and_connection_rate_against_the_echo_server() {
        let addr = echo_here().await;
        let rtts = ping_pong(addr, 1024, 50).await.expect("ping-pong");
        assert_eq!(rtts.len(), 50);
        let c = conn_rate(addr, None, 4, Duration::from_millis(200))
            .await
            .expect("rate");
        assert!(c.completed > 0 && c.failed == 0, "{:?}", c.first_error);
        assert_eq!(c.setup_ns.len() as u64, c.completed);
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(quantile(&v, 0.5), 500);
        assert_eq!(quantile(&v, 0.99), 990);
        assert_eq!(quantile(&v, 0.999), 999);
        assert_eq!(quantile(&v, 1.0), 1000);
        assert_eq!(quantile(&[], 0.5), 0);
        assert_eq!(latency_summary(&[3000, 1000, 2000]), [2.0, 3.0, 3.0, 3.0]);
    }
}
