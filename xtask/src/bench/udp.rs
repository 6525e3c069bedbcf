//! UDP through the forwarder against direct loopback in the child,
//! RootlessKit's builtin driver and pasta, in one run on one machine: the
//! `udp` workload of `cargo xtask bench`, and `cargo xtask bench-udp`, which
//! runs it alone (a quick alias that writes `bench/results/udp.md`).
//!
//! - *flood*: one flow sends 64-byte or 1,400-byte datagrams one way at
//!   fixed offered rates for a few seconds; a sink in the child counts what
//!   arrives: datagrams received per second and the loss;
//! - *echo*: 32 flows, each with one datagram in flight (send, wait for the
//!   echo, repeat; a datagram not answered within 100 ms is counted lost
//!   and the flow sends again): echoed datagrams per second.
//!
//! Method: the servers (a counting sink and an echo server, one thread
//! each, plain recv/send) run inside the child namespace of each system:
//! the bench's child namespace for direct and the forwarder, a namespace
//! of its own for pasta (the TCP workloads' pasta holds the bench's),
//! RootlessKit's own child for RootlessKit (run as the unprivileged user
//! `fwdtest`, `--port-driver=builtin`, ports added with `rootlessctl
//! add-ports 127.0.0.1:P:T/udp`). *direct* runs the client inside the
//! child too (the ceiling). The forwarder runs as root with
//! `--child-netns` (`-p 127.0.0.1:P:T/udp`), pasta with `-u
//! 127.0.0.1/P:T`. A system whose echo port does not answer a probe
//! is left out of the echo runs with the reason (pasta 2023-03 forwards
//! datagrams in but loses every reply). Systems are interleaved per
//! repetition; figures are medians with min-max, ratios medians of
//! per-repetition ratios. `--compare-bin` adds a second forwarder binary
//! (A/B of a change in one run). Every process is stopped by its PID;
//! traffic stays on loopback in namespaces the bench made.

use std::fmt::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use forwarder_testkit::wait::{try_wait_until, try_wait_until_or_abort};

use crate::util::{build_forwarder, die_with_parent, output, Forwarder, Netns, Proc};

#[derive(clap::Args)]
pub struct UdpArgs {
    /// Seconds per run.
    #[arg(long, default_value_t = 2)]
    secs: u64,
    /// Repetitions (medians are reported).
    #[arg(long, default_value_t = 3)]
    reps: u32,
    /// Offered rates of the flood, datagrams per second.
    #[arg(long, value_delimiter = ',', default_value = "50000,200000,1000000")]
    rates: Vec<u64>,
    /// Leave out RootlessKit and pasta.
    #[arg(long)]
    no_peers: bool,
    /// Also run this forwarder binary, as system `forwarder-b` (A/B).
    #[arg(long)]
    compare_bin: Option<PathBuf>,
}

/// What the UDP workload runs.
pub struct UdpPlan {
    pub secs: u64,
    pub reps: u32,
    pub rates: Vec<u64>,
    pub peers: bool,
    pub compare_bin: Option<PathBuf>,
}

/// The default offered rates of the flood.
pub const RATES: [u64; 3] = [50_000, 200_000, 1_000_000];
/// Payload sizes.
pub const SIZES: [usize; 2] = [64, 1400];

/// One run of one system.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Sample {
    /// Datagrams received (flood) or echoed (echo) per second.
    pub per_s: f64,
    /// Flood: datagrams sent; echo: datagrams answered.
    pub sent: u64,
    /// Flood: datagrams the sink received; echo: unanswered datagrams.
    pub got_or_lost: u64,
}

/// One row of the table: a payload size and a workload, every system's
/// runs in system order.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub size: usize,
    /// The flood's offered rate; None: echo from 32 flows.
    pub rate: Option<u64>,
    pub runs: Vec<Vec<Sample>>,
}

/// Everything the UDP workload measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct UdpResults {
    pub secs: u64,
    pub reps: u32,
    /// Systems that ran, in column order (direct first).
    pub systems: Vec<String>,
    /// Systems that could not start, with the reason.
    pub not_run: Vec<(String, String)>,
    /// Systems left out of the echo runs, with the reason.
    pub no_echo: Vec<(String, String)>,
    pub rows: Vec<Row>,
}

const SINK: u16 = 9001;
const ECHO: u16 = 9002;
const FLOWS: usize = 32;

/// Servers inside one namespace, stopped on drop.
struct Servers {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Runs `f` on a new thread inside the network namespace file `ns`.
fn thread_in<T: Send + 'static>(
    ns: Option<String>,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> std::thread::JoinHandle<Result<T>> {
    std::thread::spawn(move || {
        if let Some(path) = ns {
            let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            // SAFETY: setns on a valid namespace fd affects only this thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("entering {path}"));
            }
        }
        f()
    })
}

fn bind(addr: &str) -> Result<UdpSocket> {
    let s = UdpSocket::bind(addr).with_context(|| format!("binding {addr}"))?;
    // SO_RCVBUFFORCE: the bench is root (best effort all the same).
    let _ = nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::RcvBufForce, &(16 << 20));
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    Ok(s)
}

/// A counting sink on 127.0.0.1:SINK and an echo server on
/// 127.0.0.1:ECHO inside `ns`.
fn servers(ns: &str) -> Result<Servers> {
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let (st, rc) = (stop.clone(), received.clone());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
    let tx2 = ready_tx.clone();
    thread_in(Some(ns.to_string()), move || {
        let s = match bind(&format!("127.0.0.1:{SINK}")) {
            Ok(s) => s,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return Ok(());
            }
        };
        let _ = ready_tx.send(Ok(()));
        let mut buf = vec![0u8; 65_536];
        while !st.load(Ordering::Relaxed) {
            if s.recv(&mut buf).is_ok() {
                rc.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    });
    let st = stop.clone();
    thread_in(Some(ns.to_string()), move || {
        let s = match bind(&format!("127.0.0.1:{ECHO}")) {
            Ok(s) => s,
            Err(e) => {
                let _ = tx2.send(Err(e));
                return Ok(());
            }
        };
        let _ = tx2.send(Ok(()));
        let mut buf = vec![0u8; 65_536];
        while !st.load(Ordering::Relaxed) {
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&buf[..n], from);
            }
        }
        Ok(())
    });
    for _ in 0..2 {
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("the UDP servers did not start")??;
    }
    Ok(Servers { stop, received })
}

/// One system under test.
struct System {
    name: String,
    /// Where its clients run (None: here).
    client_ns: Option<String>,
    sink: SocketAddr,
    echo: SocketAddr,
    servers: Servers,
    _guards: Vec<Box<dyn std::any::Any>>,
}

/// Sends `size`-byte datagrams to `to` at `rate` a second for `secs`;
/// returns how many were sent.
fn flood(ns: Option<String>, to: SocketAddr, size: usize, rate: u64, secs: u64) -> Result<u64> {
    thread_in(ns, move || {
        let s = UdpSocket::bind("127.0.0.1:0")?;
        s.connect(to)?;
        let buf = vec![0x5au8; size];
        let t0 = Instant::now();
        let end = Duration::from_secs(secs);
        let mut sent = 0u64;
        loop {
            let el = t0.elapsed();
            if el >= end {
                break;
            }
            let due = (el.as_secs_f64() * rate as f64) as u64;
            if sent >= due {
                // Pacing: ahead of the offered rate, so wait for the next
                // datagram's due time.
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            // Send what is due, in bursts of at most 64.
            for _ in 0..(due - sent).min(64) {
                match s.send(&buf) {
                    Ok(_) => sent += 1,
                    Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e).context("sending"),
                }
            }
        }
        Ok(sent)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("flood thread panicked"))?
}

/// 32 flows ping-ponging with `to` for `secs`: (echoes per second,
/// echoes, lost).
fn echo_rate(
    ns: Option<String>,
    to: SocketAddr,
    size: usize,
    secs: u64,
) -> Result<(f64, u64, u64)> {
    thread_in(ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let t0 = Instant::now();
            let end = t0 + Duration::from_secs(secs);
            let mut tasks = Vec::new();
            for _ in 0..FLOWS {
                let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
                s.connect(to).await?;
                tasks.push(tokio::spawn(async move {
                    let msg = vec![0xa5u8; size];
                    let mut buf = vec![0u8; 65_536];
                    let (mut ok, mut lost) = (0u64, 0u64);
                    while Instant::now() < end {
                        if s.send(&msg).await.is_err() {
                            lost += 1;
                            // Do not spin on an immediate error.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                        match tokio::time::timeout(Duration::from_millis(100), s.recv(&mut buf))
                            .await
                        {
                            Ok(Ok(n)) if n == size => ok += 1,
                            _ => lost += 1,
                        }
                    }
                    (ok, lost)
                }));
            }
            let (mut ok, mut lost) = (0, 0);
            for t in tasks {
                let (o, l) = t.await?;
                ok += o;
                lost += l;
            }
            Ok((ok as f64 / t0.elapsed().as_secs_f64(), ok, lost))
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("echo thread panicked"))?
}

fn free_udp_port() -> Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn local(p: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], p))
}

/// RootlessKit (builtin driver) as `fwdtest`, with the servers in its
/// child and UDP ports added through rootlessctl.
fn rootlesskit() -> Result<System> {
    let dir = PathBuf::from(format!("/tmp/fwd-bench-udp-rk-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    output(Command::new("chown").arg("fwdtest:fwdtest").arg(&dir))
        .context("no user fwdtest (cargo xtask setup creates it)")?;
    let state = dir.join("state");
    let user = |program: &str| {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid",
            "fwdtest",
            "--regid",
            "fwdtest",
            "--init-groups",
            "env",
        ])
        .arg(format!("HOME={}", dir.display()))
        .arg(program)
        .current_dir(&dir);
        c
    };
    let mut cmd = user("rootlesskit");
    cmd.args([
        "--net=slirp4netns",
        "--disable-host-loopback",
        "--port-driver=builtin",
    ])
    .arg(format!("--state-dir={}", state.display()))
    .args(["sleep", "infinity"])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    die_with_parent(&mut cmd, libc::SIGTERM);
    let mut proc = Proc::spawn(&mut cmd, "rootlesskit")?;
    let sock = state.join("api.sock");
    let what = format!(
        "rootlesskit to write its child_pid and make {}",
        sock.display()
    );
    let child_pid = try_wait_until_or_abort(Duration::from_secs(15), &what, || -> Result<_> {
        if let Some(st) = proc.try_wait()? {
            bail!("rootlesskit exited ({st}) before it started");
        }
        let read = std::fs::read_to_string(state.join("child_pid")).unwrap_or_default();
        Ok(match read.trim().parse::<u32>() {
            Err(_) => Err("no child_pid yet"),
            Ok(_) if !sock.exists() => Err("no API socket yet"),
            Ok(pid) => Ok(pid),
        })
    })??;
    let ns = format!("/proc/{child_pid}/ns/net");
    let servers = servers(&ns)?;
    let (ps, pe) = (free_udp_port()?, free_udp_port()?);
    for (p, t) in [(ps, SINK), (pe, ECHO)] {
        output(
            user("rootlessctl")
                .arg("--socket")
                .arg(&sock)
                .args(["add-ports", &format!("127.0.0.1:{p}:{t}/udp")]),
        )
        .context("rootlessctl add-ports .../udp")?;
    }
    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    Ok(System {
        name: "rootlesskit".into(),
        client_ns: None,
        sink: local(ps),
        echo: local(pe),
        servers,
        // Dropped in order: the process first, then its directory.
        _guards: vec![Box::new(proc), Box::new(Dir(dir))],
    })
}

/// Waits until `sys` echoes a datagram.
fn probe(sys: &System) -> Result<()> {
    let (ns, to) = (sys.client_ns.clone(), sys.echo);
    thread_in(ns, move || {
        let s = UdpSocket::bind("127.0.0.1:0")?;
        s.connect(to)?;
        // How long each probe's echo is awaited before the next probe.
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        let mut b = [0u8; 8];
        try_wait_until(
            Duration::from_secs(5),
            &format!("an echo from {to}"),
            || {
                let _ = s.send(b"probe");
                s.recv(&mut b).is_ok()
            },
        )?;
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("probe panicked"))?
}

/// Waits until `sys`'s sink counts a datagram.
fn probe_sink(sys: &System) -> Result<()> {
    let received = || sys.servers.received.load(Ordering::Relaxed);
    let what = format!("a probe to reach the sink through {}", sys.sink);
    try_wait_until_or_abort(Duration::from_secs(5), &what, || -> Result<_> {
        let before = received();
        let (ns, to) = (sys.client_ns.clone(), sys.sink);
        thread_in(ns, move || {
            let s = UdpSocket::bind("127.0.0.1:0")?;
            let _ = s.send_to(b"probe", to);
            Ok(())
        })
        .join()
        .map_err(|_| anyhow!("probe panicked"))??;
        // This probe counted, or is given up on for the next one.
        Ok(try_wait_until(Duration::from_millis(200), "the probe", || {
            received() > before
        })
        .is_ok())
    })??;
    Ok(())
}

/// A forwarder publishing the sink and the echo server of `ns`.
fn forwarder(bin: &Path, ns: &Netns, name: &str, shared: &Arc<AtomicU64>) -> Result<System> {
    let (ps, pe) = (free_udp_port()?, free_udp_port()?);
    let fwd_args: Vec<String> = [
        "--child-netns".to_string(),
        ns.path().display().to_string(),
        "-p".into(),
        format!("127.0.0.1:{ps}:{SINK}/udp"),
        "-p".into(),
        format!("127.0.0.1:{pe}:{ECHO}/udp"),
    ]
    .into();
    let fwd = Forwarder::start(bin, &fwd_args, true, name)?;
    Ok(System {
        name: name.into(),
        client_ns: None,
        sink: local(ps),
        echo: local(pe),
        servers: Servers {
            stop: Arc::new(AtomicBool::new(false)),
            received: shared.clone(),
        },
        _guards: vec![Box::new(fwd)],
    })
}

/// pasta forwarding UDP only, attached to a namespace of its own with its
/// own servers: the main bench's TCP pasta already holds the bench's child
/// namespace, and a second pasta there forwards nothing.
fn pasta() -> Result<System> {
    let ns = Netns::named(&format!("fwd-bench-udp-pasta-{}", std::process::id()))?;
    let servers = servers(&ns.path().display().to_string())?;
    let (ps, pe) = (free_udp_port()?, free_udp_port()?);
    let mut cmd = crate::peers::pasta_command(&ns);
    cmd.args(["-u", &format!("127.0.0.1/{ps}:{SINK}")])
        .args(["-u", &format!("127.0.0.1/{pe}:{ECHO}")])
        .args(["-t", "none", "-T", "none", "-U", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    die_with_parent(&mut cmd, libc::SIGTERM);
    let p = Proc::spawn(&mut cmd, "pasta")?;
    Ok(System {
        name: "pasta".into(),
        client_ns: None,
        sink: local(ps),
        echo: local(pe),
        servers,
        // Dropped in order: pasta first, then its namespace.
        _guards: vec![Box::new(p), Box::new(ns)],
    })
}

/// Runs the UDP workload with its servers in `ns` (which must not already
/// use UDP ports 9001 and 9002).
pub fn measure(plan: &UdpPlan, ns: &Netns, bin: &Path) -> Result<UdpResults> {
    let mut res = UdpResults {
        secs: plan.secs,
        reps: plan.reps,
        ..Default::default()
    };
    let mut systems = start_systems(plan, ns, bin, &mut res)?;
    let echoes = probe_systems(&mut systems, &mut res);
    res.systems = systems.iter().map(|s| s.name.clone()).collect();
    for size in SIZES {
        for &rate in &plan.rates {
            res.rows.push(flood_row(plan, &systems, size, rate)?);
        }
        res.rows.push(echo_row(plan, &systems, &echoes, size)?);
    }
    drop(systems);
    Ok(res)
}

/// Starts the systems to measure: direct (servers in `ns`), the forwarder
/// (and the one to compare with), and the peers if asked for; a peer that
/// cannot start is recorded in `res.not_run`.
fn start_systems(
    plan: &UdpPlan,
    ns: &Netns,
    bin: &Path,
    res: &mut UdpResults,
) -> Result<Vec<System>> {
    let mut systems = vec![System {
        name: "direct".into(),
        client_ns: Some(ns.path().display().to_string()),
        sink: local(SINK),
        echo: local(ECHO),
        servers: servers(&ns.path().display().to_string())?,
        _guards: Vec::new(),
    }];
    let shared = systems[0].servers.received.clone();
    systems.push(forwarder(bin, ns, "forwarder", &shared)?);
    if let Some(b) = &plan.compare_bin {
        systems.push(forwarder(b, ns, "forwarder-b", &shared)?);
    }
    if plan.peers {
        match rootlesskit() {
            Ok(s) => systems.push(s),
            Err(e) => res.not_run.push(("rootlesskit".into(), format!("{e:#}"))),
        }
        match pasta() {
            Ok(s) => systems.push(s),
            Err(e) => res.not_run.push(("pasta".into(), format!("{e:#}"))),
        }
    }
    Ok(systems)
}

/// Drops the systems whose sink does not answer (into `res.not_run`),
/// finds which of the rest echo (the others into `res.no_echo`) and says
/// both on stderr. Returns, per remaining system, whether it echoes.
fn probe_systems(systems: &mut Vec<System>, res: &mut UdpResults) -> Vec<bool> {
    systems.retain(|s| match probe_sink(s) {
        Ok(()) => true,
        Err(e) => {
            res.not_run.push((s.name.clone(), format!("{e:#}")));
            false
        }
    });
    let echoes: Vec<bool> = systems
        .iter()
        .map(|s| match probe(s) {
            Ok(()) => true,
            Err(e) => {
                res.no_echo.push((s.name.clone(), format!("{e:#}")));
                false
            }
        })
        .collect();
    for (name, why) in &res.not_run {
        eprintln!("bench udp: {name}: not run: {why}");
    }
    for (name, why) in &res.no_echo {
        eprintln!("bench udp: {name}: no echo runs: {why}");
    }
    echoes
}

/// The flood row for one size and offered rate: every repetition floods
/// each system in turn and counts what its sink received.
fn flood_row(plan: &UdpPlan, systems: &[System], size: usize, rate: u64) -> Result<Row> {
    let mut runs = vec![Vec::new(); systems.len()];
    for _ in 0..plan.reps {
        crate::util::check_interrupted()?;
        for (k, s) in systems.iter().enumerate() {
            let before = s.servers.received.load(Ordering::Relaxed);
            let sent = flood(s.client_ns.clone(), s.sink, size, rate, plan.secs)?;
            // Part of the measurement: what arrives within 300 ms of the
            // flood's end counts (datagrams still queued in the carrier);
            // later ones are lost. There is no end to wait for.
            std::thread::sleep(Duration::from_millis(300));
            let got = s.servers.received.load(Ordering::Relaxed) - before;
            runs[k].push(Sample {
                per_s: got as f64 / plan.secs as f64,
                sent,
                got_or_lost: got,
            });
        }
    }
    eprintln!("bench udp: {size} B flood at {rate}/s done");
    Ok(Row {
        size,
        rate: Some(rate),
        runs,
    })
}

/// The echo row for one size: every repetition runs the echo rate through
/// each system that echoes (`echoes[k]`).
fn echo_row(plan: &UdpPlan, systems: &[System], echoes: &[bool], size: usize) -> Result<Row> {
    let mut runs = vec![Vec::new(); systems.len()];
    for _ in 0..plan.reps {
        crate::util::check_interrupted()?;
        for (k, s) in systems.iter().enumerate() {
            if !echoes[k] {
                continue;
            }
            let (r, ok, lost) = echo_rate(s.client_ns.clone(), s.echo, size, plan.secs)?;
            runs[k].push(Sample {
                per_s: r,
                sent: ok,
                got_or_lost: lost,
            });
        }
    }
    eprintln!("bench udp: {size} B echo done");
    Ok(Row {
        size,
        rate: None,
        runs,
    })
}

impl UdpResults {
    fn col(&self, name: &str) -> Option<usize> {
        self.systems.iter().position(|s| s == name)
    }

    fn per_s(&self, row: &Row, name: &str) -> Vec<f64> {
        self.col(name)
            .map(|k| row.runs[k].iter().map(|x| x.per_s).collect())
            .unwrap_or_default()
    }

    /// Median of per-repetition ratios of `a` to `b` in `row`.
    pub fn ratio(&self, row: &Row, a: &str, b: &str) -> Option<f64> {
        let (x, y) = (self.per_s(row, a), self.per_s(row, b));
        if x.is_empty() || x.len() != y.len() {
            return None;
        }
        let r = super::ratio(&x, &y);
        r.is_finite().then_some(r)
    }

    fn workload(row: &Row) -> String {
        match row.rate {
            Some(r) => format!("flood at {r}/s"),
            None => format!("echo, {FLOWS} flows"),
        }
    }

    /// The targets: forwarder >= 2x RootlessKit and >= 0.5x direct in
    /// datagrams per second, for the echo and the fastest flood, each size:
    /// (what, figure, bound).
    pub fn targets(&self) -> Vec<(String, Option<f64>, f64)> {
        let mut t = Vec::new();
        let top = self.rows.iter().filter_map(|r| r.rate).max();
        for row in &self.rows {
            if row.rate.is_some() && row.rate != top {
                continue;
            }
            let w = Self::workload(row);
            for (other, bound) in [("rootlesskit", 2.0), ("direct", 0.5)] {
                t.push((
                    format!("UDP {} B {w}, datagrams/s, forwarder x {other}", row.size),
                    self.ratio(row, "forwarder", other),
                    bound,
                ));
            }
        }
        t
    }

    /// The Markdown table (a heading at `level`) and notes.
    pub fn render(&self, md: &mut String, level: &str) {
        let _ = writeln!(
            md,
            "{level} UDP\n\n{} s per run, {} repetitions interleaved; datagrams per second \
             received by the sink (flood: loss = 1 - received/sent) or echoed (echo from \
             {FLOWS} flows, one datagram in flight each); median (min-max). Ratios are \
             medians of per-repetition ratios.\n",
            self.secs, self.reps
        );
        let mut cols: Vec<String> = self.systems.clone();
        for other in ["rootlesskit", "direct"] {
            if self.col(other).is_some() && self.col("forwarder").is_some() {
                cols.push(format!("forwarder / {other}"));
            }
        }
        if self.col("forwarder-b").is_some() {
            cols.push("forwarder / forwarder-b".into());
        }
        let _ = writeln!(md, "| payload | workload | {} |", cols.join(" | "));
        let _ = writeln!(md, "|---|---|{}", "---|".repeat(cols.len()));
        for row in &self.rows {
            let mut cells = Vec::new();
            for (k, runs) in row.runs.iter().enumerate() {
                if runs.is_empty() {
                    let why = self
                        .no_echo
                        .iter()
                        .find(|(n, _)| *n == self.systems[k])
                        .map_or("not run", |_| "no echo (see below)");
                    cells.push(why.to_string());
                    continue;
                }
                let v: Vec<f64> = runs.iter().map(|x| x.per_s).collect();
                let (lo, hi) = super::min_max(&v);
                let mut c = format!("{:.0} ({lo:.0}-{hi:.0})", super::median(&v));
                match row.rate {
                    Some(_) => {
                        let loss: Vec<f64> = runs
                            .iter()
                            .map(|x| 100.0 * (1.0 - x.got_or_lost as f64 / x.sent.max(1) as f64))
                            .collect();
                        let _ = write!(c, ", loss {:.1}%", super::median(&loss));
                    }
                    None => {
                        let lost: u64 = runs.iter().map(|x| x.got_or_lost).sum();
                        let _ = write!(c, ", {lost} lost");
                    }
                }
                cells.push(c);
            }
            for other in ["rootlesskit", "direct", "forwarder-b"] {
                if self.col(other).is_some() && self.col("forwarder").is_some() {
                    cells.push(
                        self.ratio(row, "forwarder", other)
                            .map_or("n/a".into(), |r| format!("{r:.2}x")),
                    );
                }
            }
            let _ = writeln!(
                md,
                "| {} B | {} | {} |",
                row.size,
                Self::workload(row),
                cells.join(" | ")
            );
        }
        let _ = writeln!(md);
        for (name, why) in &self.not_run {
            let _ = writeln!(md, "- {name}: not run: {}", why.replace('\n', " "));
        }
        for (name, why) in &self.no_echo {
            let _ = writeln!(md, "- {name}: no echo runs: {}", why.replace('\n', " "));
        }
        let _ = writeln!(md);
    }
}

/// `cargo xtask bench-udp`: the UDP workload alone.
pub fn run(args: &UdpArgs) -> Result<()> {
    crate::setup::run()?;
    crate::util::catch_interrupts();
    let bin = build_forwarder()?;
    let ns = Netns::named(&format!("fwd-bench-udp-{}", std::process::id()))?;
    let plan = UdpPlan {
        secs: args.secs,
        reps: args.reps,
        rates: args.rates.clone(),
        peers: !args.no_peers,
        compare_bin: args.compare_bin.clone(),
    };
    let res = measure(&plan, &ns, &bin)?;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "`cargo xtask {}`, {}\n",
        std::env::args().skip(1).collect::<Vec<_>>().join(" "),
        crate::util::UtcTime::now().to_minute()
    );
    res.render(&mut md, "#");
    let _ = writeln!(md, "\n## Targets\n");
    for (what, fig, bound) in res.targets() {
        let verdict = match fig {
            Some(x) if x >= bound => "met",
            Some(_) => "**missed**",
            None => "not measured",
        };
        let fig = fig.map_or("n/a".into(), |x| format!("{x:.2}x"));
        let _ = writeln!(md, "- {what}: {fig} (goal >= {bound}x): {verdict}");
    }
    println!("{md}");
    let path = crate::util::root().join("bench/results/udp.md");
    std::fs::write(&path, &md).with_context(|| format!("writing {}", path.display()))?;
    drop(ns);
    Ok(())
}
