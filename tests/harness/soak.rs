//! The soak: many concurrent connections of mixed traffic through one
//! forwarder for a long time, every byte checked, while the forwarder's
//! memory, descriptors and BPF maps are watched for slow leaks.
//!
//! Used by `tests/soak.rs` (60 s per engine in `cargo xtask test`) and by
//! `cargo xtask soak --minutes N`, which runs that same test binary for
//! longer (`FWD_SOAK_SECS`, `FWD_SOAK_CONNS`).
//!
//! The traffic: one task per client slot (2,000 by default), each holding
//! one connection at a time to an echo server in the child and doing, with
//! a pause of 50-500 ms between steps:
//! - 60%: a ping-pong of 1-8 messages of 1 B to 16 KiB, each echoed whole;
//! - 15%: a bulk echo of 64 KiB to 1 MiB, written and read at once (at most
//!   32 slots at a time);
//! - 5%: a download of 64 KiB to 1 MiB on a second, short connection from a
//!   server that then closes first;
//! - 20%: silence for 1-3 s (an idle connection).
//!
//! After 1 to 16 steps the connection ends: 70% by a half-close (the client
//! shuts down its write side and must read a clean EOF, nothing more), 20%
//! by a plain close, 10% by a reset. Every byte received is compared with
//! what was sent (or, for downloads, with the server's deterministic
//! stream); any error, mismatch or step over 60 s is a failure.
//!
//! Checkpoints: at the end of the warm-up and then at regular times every
//! slot finishes its step, holds an open, proven connection and waits; once
//! the forwarder reports exactly that many active connections and no pipe
//! or buffer in use, its RSS, descriptors (less the pooled idle pipes and
//! sockets, bounded by design) and BPF map entries are read from /proc and the
//! kernel. Each later checkpoint must be within 10% (RSS) and 1%
//! (descriptors) of the warm-up's, and each contract map must hold exactly
//! two entries per connection. At the end every connection closes, the
//! harness's leak check runs (descriptors back to the start, maps empty),
//! and the forwarder's own byte counts must equal the bytes the clients
//! sent and received.

use std::fmt;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Barrier, Semaphore};

use crate::data::Pattern;
use crate::{servers, Fwd, Pair};

/// The echo server: where it listens in the child, where clients connect
/// in the parent, and the spec publishing it.
const ECHO: (&str, &str, &str) = ("127.0.0.1:80", "127.0.0.1:8080", "127.0.0.1:8080:80");
/// The download server, likewise.
const SOURCE: (&str, &str, &str) = ("127.0.0.1:81", "127.0.0.1:8081", "127.0.0.1:8081:81");
/// Longest any one step may take.
const STEP_LIMIT: Duration = Duration::from_secs(60);

/// How long and how wide.
#[derive(Debug, Clone)]
pub struct Config {
    /// Concurrent client connections.
    pub connections: usize,
    /// The whole run, warm-up included.
    pub duration: Duration,
    /// Time before the reference checkpoint.
    pub warmup: Duration,
    /// Time between later checkpoints.
    pub every: Duration,
}

impl Config {
    /// `connections` for `duration`: a quarter of it (15 s to 2 min) is
    /// warm-up, then a checkpoint every sixth (10 s to 5 min) and one at the
    /// end.
    pub fn new(connections: usize, duration: Duration) -> Config {
        let clamp = |d: Duration, lo: u64, hi: u64| {
            d.clamp(Duration::from_secs(lo), Duration::from_secs(hi))
        };
        Config {
            connections,
            duration,
            warmup: clamp(duration / 4, 15, 120).min(duration / 2),
            every: clamp(duration / 6, 10, 300),
        }
    }

    /// 2,000 connections for 60 s, or `FWD_SOAK_CONNS` for `FWD_SOAK_SECS`.
    pub fn from_env() -> Config {
        let var = |k: &str, d: u64| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(d)
        };
        Config::new(
            var("FWD_SOAK_CONNS", 2000) as usize,
            Duration::from_secs(var("FWD_SOAK_SECS", 60)),
        )
    }
}

/// One reading of the forwarder at a checkpoint.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub at: Duration,
    pub active: u64,
    pub fds: usize,
    /// Descriptors of idle pooled pipes (two each) and sockets.
    pub pooled_fds: usize,
    pub rss_kib: u64,
    /// (name, entries) of the BPF maps the process holds.
    pub maps: Vec<(String, usize)>,
}

impl Checkpoint {
    /// Descriptors less the pooled idle pipes and sockets.
    pub fn fds_held(&self) -> usize {
        self.fds.saturating_sub(self.pooled_fds)
    }
}

/// What a soak did and saw.
#[derive(Debug, Default)]
pub struct Report {
    pub engine: String,
    pub connections: usize,
    pub elapsed: Duration,
    pub opened: u64,
    pub steps: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub half_closes: u64,
    pub resets: u64,
    pub checkpoints: Vec<Checkpoint>,
    pub peak_rss_kib: u64,
    pub peak_fds: usize,
    pub errors: Vec<String>,
    pub error_count: u64,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        writeln!(
            f,
            "soak {}: {} connections for {:.0} s: {} opened, {} steps, {:.0} MiB sent and {:.0} MiB received (all checked), {} half-closes, {} resets, {} errors",
            self.engine,
            self.connections,
            self.elapsed.as_secs_f64(),
            self.opened,
            self.steps,
            mib(self.bytes_sent),
            mib(self.bytes_received),
            self.half_closes,
            self.resets,
            self.error_count,
        )?;
        writeln!(
            f,
            "  peak between checkpoints: RSS {} KiB, {} descriptors",
            self.peak_rss_kib, self.peak_fds
        )?;
        for c in &self.checkpoints {
            writeln!(
                f,
                "  checkpoint {:>5.0} s: {} active, RSS {} KiB, {} descriptors ({} held, {} pooled), maps {:?}",
                c.at.as_secs_f64(),
                c.active,
                c.rss_kib,
                c.fds,
                c.fds_held(),
                c.pooled_fds,
                c.maps
            )?;
        }
        for e in &self.errors {
            writeln!(f, "  error: {e}")?;
        }
        Ok(())
    }
}

/// Counters shared by the client tasks.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    checkpoint: AtomicBool,
    opened: AtomicU64,
    steps: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
    half_closes: AtomicU64,
    resets: AtomicU64,
    error_count: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Shared {
    fn error(&self, slot: usize, what: String) {
        self.error_count.fetch_add(1, Relaxed);
        if let Ok(mut e) = self.errors.lock() {
            if e.len() < 20 {
                e.push(format!("slot {slot}: {what}"));
            }
        }
    }
}

/// xorshift64*: each slot's choices and bytes, reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    /// Roughly log-uniform in `1..=max` (small sizes as often as big ones).
    fn size(&mut self, max: u64) -> usize {
        let bits = self.range(0, 63 - u64::from(max.leading_zeros()));
        self.range(1, (1u64 << bits).min(max)) as usize
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let x = self.next().to_le_bytes();
            chunk.copy_from_slice(&x[..chunk.len()]);
        }
    }
}

type StepResult = Result<(), String>;

fn io_err(what: &str) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// One client slot's connection and its traffic.
struct Slot {
    id: usize,
    rng: Rng,
    conn: Option<TcpStream>,
    steps_left: u64,
    shared: Arc<Shared>,
    bulk: Arc<Semaphore>,
}

impl Slot {
    async fn connect(&mut self, addr: &str) -> Result<TcpStream, String> {
        let c = TcpStream::connect(addr)
            .await
            .map_err(io_err(&format!("connect {addr}")))?;
        self.shared.opened.fetch_add(1, Relaxed);
        Ok(c)
    }

    /// An open connection that has just echoed a message.
    async fn ensure_open(&mut self) -> StepResult {
        if self.conn.is_none() {
            self.conn = Some(self.connect(ECHO.1).await?);
            self.steps_left = self.rng.range(1, 16);
        }
        self.ping_pong(1).await
    }

    async fn ping_pong(&mut self, rounds: u64) -> StepResult {
        for _ in 0..rounds {
            let mut msg = vec![0u8; self.rng.size(16 << 10)];
            self.rng.fill(&mut msg);
            let c = self.conn.as_mut().ok_or("no connection")?;
            c.write_all(&msg).await.map_err(io_err("ping write"))?;
            let mut got = vec![0u8; msg.len()];
            c.read_exact(&mut got).await.map_err(io_err("pong read"))?;
            if got != msg {
                return Err(format!("{} bytes echoed differ", msg.len()));
            }
            self.shared.sent.fetch_add(msg.len() as u64, Relaxed);
            self.shared.received.fetch_add(msg.len() as u64, Relaxed);
        }
        Ok(())
    }

    /// Writes `len` bytes and reads their echo at the same time.
    async fn bulk_echo(&mut self) -> StepResult {
        let bulk = self.bulk.clone();
        let _permit = bulk.acquire().await.map_err(|e| e.to_string())?;
        let len = self.rng.range(64 << 10, 1 << 20) as usize;
        let seed = self.rng.next() | 1;
        let c = self.conn.as_mut().ok_or("no connection")?;
        let (mut r, mut w) = c.split();
        let write = async {
            let mut g = Rng(seed);
            let mut buf = vec![0u8; 64 << 10];
            let mut left = len;
            while left > 0 {
                let n = left.min(buf.len());
                g.fill(&mut buf[..n]);
                w.write_all(&buf[..n]).await.map_err(io_err("bulk write"))?;
                left -= n;
            }
            Ok::<(), String>(())
        };
        let read = async {
            let mut g = Rng(seed);
            let (mut buf, mut want) = (vec![0u8; 64 << 10], vec![0u8; 64 << 10]);
            let mut got = 0;
            while got < len {
                // Regenerate in the writer's 64 KiB steps: read exactly up
                // to each step's end.
                let step = (len - got).min(buf.len());
                g.fill(&mut want[..step]);
                r.read_exact(&mut buf[..step])
                    .await
                    .map_err(io_err("bulk read"))?;
                if buf[..step] != want[..step] {
                    return Err(format!("bulk echo differs after {got} of {len} bytes"));
                }
                got += step;
            }
            Ok::<(), String>(())
        };
        let (a, b) = tokio::join!(write, read);
        a.and(b)?;
        self.shared.sent.fetch_add(len as u64, Relaxed);
        self.shared.received.fetch_add(len as u64, Relaxed);
        Ok(())
    }

    /// A download on its own connection; the server closes first.
    async fn download(&mut self) -> StepResult {
        let len = self.rng.range(64 << 10, 1 << 20);
        let seed = self.rng.next() % 1000;
        let mut c = self.connect(SOURCE.1).await?;
        let mut req = [0u8; 16];
        req[..8].copy_from_slice(&len.to_le_bytes());
        req[8..].copy_from_slice(&seed.to_le_bytes());
        c.write_all(&req)
            .await
            .map_err(io_err("download request"))?;
        self.shared.sent.fetch_add(16, Relaxed);
        let mut p = Pattern::new(seed, len);
        let (mut buf, mut want) = (vec![0u8; 64 << 10], vec![0u8; 64 << 10]);
        let mut got = 0u64;
        loop {
            let n = c.read(&mut buf).await.map_err(io_err("download read"))?;
            if n == 0 {
                break;
            }
            let mut off = 0;
            while off < n {
                let k = p
                    .next_chunk(&mut want[..n - off])
                    .ok_or_else(|| format!("download longer than {len} bytes"))?;
                if buf[off..off + k] != want[..k] {
                    return Err(format!("download differs after {} bytes", got + off as u64));
                }
                off += k;
            }
            got += n as u64;
        }
        if got != len {
            return Err(format!("download ended after {got} of {len} bytes"));
        }
        self.shared.received.fetch_add(len, Relaxed);
        c.shutdown().await.map_err(io_err("download shutdown"))?;
        Ok(())
    }

    /// Ends the connection: half-close (70%), close (20%) or reset (10%).
    async fn close(&mut self) -> StepResult {
        let Some(mut c) = self.conn.take() else {
            return Ok(());
        };
        match self.rng.range(0, 9) {
            0..=6 => {
                c.shutdown().await.map_err(io_err("half-close"))?;
                let mut b = [0u8; 64];
                match c.read(&mut b).await {
                    Ok(0) => {}
                    Ok(n) => return Err(format!("{n} stray bytes after a half-close")),
                    Err(e) => return Err(format!("reading EOF after a half-close: {e}")),
                }
                self.shared.half_closes.fetch_add(1, Relaxed);
            }
            7 | 8 => drop(c),
            _ => {
                socket2::SockRef::from(&c)
                    .set_linger(Some(Duration::ZERO))
                    .map_err(io_err("SO_LINGER"))?;
                drop(c);
                self.shared.resets.fetch_add(1, Relaxed);
            }
        }
        Ok(())
    }

    async fn step(&mut self) -> StepResult {
        if self.conn.is_none() {
            self.conn = Some(self.connect(ECHO.1).await?);
            self.steps_left = self.rng.range(1, 16);
        }
        match self.rng.range(0, 99) {
            0..=59 => {
                let rounds = self.rng.range(1, 8);
                self.ping_pong(rounds).await?
            }
            60..=74 => self.bulk_echo().await?,
            75..=79 => self.download().await?,
            _ => tokio::time::sleep(Duration::from_millis(self.rng.range(1000, 3000))).await,
        }
        self.shared.steps.fetch_add(1, Relaxed);
        self.steps_left = self.steps_left.saturating_sub(1);
        if self.steps_left == 0 {
            self.close().await?;
        }
        Ok(())
    }

    fn record(&mut self, what: &str, r: StepResult) {
        if let Err(e) = r {
            self.shared.error(self.id, format!("{what}: {e}"));
            self.conn = None;
        }
    }

    async fn run(mut self, barrier: Arc<Barrier>) {
        loop {
            if self.shared.checkpoint.load(Relaxed) {
                let r = tokio::time::timeout(STEP_LIMIT, self.ensure_open())
                    .await
                    .unwrap_or_else(|_| Err("timed out".into()));
                self.record("checkpoint connection", r);
                barrier.wait().await; // the driver reads the forwarder...
                barrier.wait().await; // ...and lets everyone go on
                continue;
            }
            if self.shared.stop.load(Relaxed) {
                break;
            }
            let r = tokio::time::timeout(STEP_LIMIT, self.step())
                .await
                .unwrap_or_else(|_| Err("a step timed out".into()));
            self.record("step", r);
            let pause = self.rng.range(50, 500);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        let r = tokio::time::timeout(STEP_LIMIT, self.close())
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
        self.record("final close", r);
    }
}

/// Raises this process's soft descriptor limit to the hard one, which must
/// allow `need`: the clients and the servers' accepted sockets live here.
fn raise_nofile(need: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    assert!(
        lim.rlim_cur >= need,
        "the soak needs {need} descriptors in the test process; the hard limit is {}",
        lim.rlim_cur
    );
}

/// A runtime whose threads all live in `ns`'s network namespace, so the
/// sockets its tasks create (client connections) belong there.
fn runtime_in(ns: &crate::Netns) -> tokio::runtime::Runtime {
    let file = Arc::new(File::open(ns.path()).expect("open netns"));
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(move || {
            // SAFETY: setns on the new thread only.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                eprintln!(
                    "soak: a client thread cannot enter the parent namespace: {}",
                    std::io::Error::last_os_error()
                );
                // Its sockets would be on the host: never carry on.
                std::process::abort();
            }
        })
        .build()
        .expect("client runtime")
}

/// Waits until the forwarder reports `active` connections and nothing in
/// use, then reads it.
fn checkpoint(f: &mut Fwd, at: Duration, active: usize) -> Result<Checkpoint, String> {
    let what = format!(
        "the forwarder to settle at {active} active connections with nothing in use (checkpoint at {at:?})"
    );
    forwarder_testkit::wait::try_wait_until(Duration::from_secs(30), &what, || {
        let st = f.stats();
        let pooled = &st["pooled"];
        let settled = st["active"].as_u64() == Some(active as u64)
            && pooled["pipes_in_use"] == 0
            && pooled["buffers_in_use"] == 0;
        if !settled {
            return Err(st.to_string());
        }
        // Settled, so the stats carry the pool: a missing count is a
        // fault, not zero pooled descriptors.
        let pipes = pooled["pipes"]
            .as_u64()
            .ok_or_else(|| format!("no pooled pipe count in {st}"))?;
        let sockets = pooled["sockets"]
            .as_u64()
            .ok_or_else(|| format!("no pooled socket count in {st}"))?;
        let maps = f
            .bpf_maps()
            .into_iter()
            .map(|m| (m.name, m.entries))
            .collect();
        Ok(Checkpoint {
            at,
            active: active as u64,
            fds: f.fd_count(),
            pooled_fds: 2 * pipes as usize + sockets as usize,
            rss_kib: f.rss_kib(),
            maps,
        })
    })
    .map_err(|e| e.to_string())
}

/// Checks a later checkpoint against the warm-up's.
fn check_against(warm: &Checkpoint, c: &Checkpoint, engine: &str) -> Result<(), String> {
    let rss = c.rss_kib as f64 / warm.rss_kib.max(1) as f64;
    if !(0.9..=1.1).contains(&rss) {
        return Err(format!(
            "RSS {} KiB at {:?} is {:+.1}% of the warm-up's {} KiB (limit 10%)",
            c.rss_kib,
            c.at,
            (rss - 1.0) * 100.0,
            warm.rss_kib
        ));
    }
    let (a, b) = (warm.fds_held() as f64, c.fds_held() as f64);
    if (b - a).abs() > 0.01 * a {
        return Err(format!(
            "{} descriptors held at {:?} against {} at the end of warm-up (limit 1%)",
            c.fds_held(),
            c.at,
            warm.fds_held()
        ));
    }
    if engine == "ebpf" {
        for name in ["FWD_SOCKS", "FWD_TARGETS", "FWD_PEERS"] {
            let n = c.maps.iter().find(|(m, _)| m == name).map(|(_, n)| *n);
            if n != Some(2 * c.active as usize) {
                return Err(format!(
                    "{name} holds {n:?} entries at {:?} with {} connections open (two per connection expected)",
                    c.at, c.active
                ));
            }
        }
    }
    Ok(())
}

/// Runs the soak against a forwarder started with `args` (which must report
/// `expect_engine`), as root in fresh namespaces. Panics on any failure,
/// after printing the report.
pub fn run(args: &[&str], expect_engine: &str, cfg: &Config) -> Report {
    crate::require_root();
    let n = cfg.connections;
    raise_nofile(3 * n as u64 + 1000);
    let pair = Pair::new();
    let servers_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("server runtime");
    {
        let _g = servers_rt.enter();
        servers::echo(pair.child.listen(ECHO.0));
        servers::source(pair.child.listen(SOURCE.0));
    }
    let mut full: Vec<&str> = args.to_vec();
    full.extend(["-p", ECHO.2, "-p", SOURCE.2]);
    let mut f = Fwd::start(&pair, &full);
    assert_eq!(f.engine(), expect_engine, "stderr:\n{}", f.stderr());
    let clients = runtime_in(&pair.parent);
    let shared = Arc::new(Shared::default());
    let barrier = Arc::new(Barrier::new(n + 1));
    let bulk = Arc::new(Semaphore::new(32));
    let start = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|id| {
            let slot = Slot {
                id,
                rng: Rng(0x5EED_0000 + id as u64 * 7919),
                conn: None,
                steps_left: 0,
                shared: shared.clone(),
                bulk: bulk.clone(),
            };
            clients.spawn(slot.run(barrier.clone()))
        })
        .collect();
    let mut report = Report {
        engine: expect_engine.to_string(),
        connections: n,
        ..Default::default()
    };
    let mut next = cfg.warmup;
    let mut failure = None;
    loop {
        let now = start.elapsed();
        if now >= next {
            shared.checkpoint.store(true, Relaxed);
            let arrived = clients.block_on(async {
                tokio::time::timeout(2 * STEP_LIMIT, barrier.wait())
                    .await
                    .is_ok()
            });
            assert!(
                arrived,
                "the clients did not reach the checkpoint at {now:?} within {:?}",
                2 * STEP_LIMIT
            );
            let c = checkpoint(&mut f, start.elapsed(), n);
            shared.checkpoint.store(false, Relaxed);
            clients.block_on(barrier.wait());
            match (c, report.checkpoints.first().cloned()) {
                (Err(e), _) => {
                    failure.get_or_insert(e);
                }
                (Ok(c), Some(warm)) => {
                    if let Err(e) = check_against(&warm, &c, expect_engine) {
                        failure.get_or_insert(e);
                    }
                    report.checkpoints.push(c);
                }
                (Ok(c), None) => report.checkpoints.push(c),
            }
            if now >= cfg.duration || failure.is_some() {
                break;
            }
            next = (next + cfg.every).min(cfg.duration);
        }
        report.peak_rss_kib = report.peak_rss_kib.max(f.rss_kib());
        report.peak_fds = report.peak_fds.max(f.fd_count());
        // The soak's sampling pace, not a wait for a condition.
        std::thread::sleep(Duration::from_secs(1));
    }
    shared.stop.store(true, Relaxed);
    clients.block_on(async {
        for t in tasks {
            let _ = tokio::time::timeout(2 * STEP_LIMIT, t).await;
        }
    });
    report.elapsed = start.elapsed();
    let c = &shared;
    report.opened = c.opened.load(Relaxed);
    report.steps = c.steps.load(Relaxed);
    report.bytes_sent = c.sent.load(Relaxed);
    report.bytes_received = c.received.load(Relaxed);
    report.half_closes = c.half_closes.load(Relaxed);
    report.resets = c.resets.load(Relaxed);
    report.error_count = c.error_count.load(Relaxed);
    report.errors = c.errors.lock().map(|e| e.clone()).unwrap_or_default();
    eprintln!("{report}");
    assert!(failure.is_none(), "{}", failure.unwrap_or_default());
    assert_eq!(report.error_count, 0, "client errors; see the report above");
    servers_rt.block_on(f.assert_clean());
    let st = f.stop();
    assert_eq!(
        (
            st["bytes_to_child"].as_u64(),
            st["bytes_to_parent"].as_u64()
        ),
        (Some(report.bytes_sent), Some(report.bytes_received)),
        "the forwarder's byte counts against what the clients sent and received: {st}"
    );
    assert_eq!(
        st["connections"].as_u64(),
        Some(report.opened),
        "connections counted by the forwarder: {st}"
    );
    clients.shutdown_background();
    servers_rt.shutdown_background();
    report
}
