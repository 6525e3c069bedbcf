//! `cargo xtask bench`: the forwarder's engines against direct loopback and
//! against the peers a user would otherwise run (socat, RootlessKit's
//! builtin driver, pasta: see `peers.rs`), every system on the same
//! workloads in one run:
//!
//! - *throughput*: iperf3, one stream and four streams (`-P 4`), each
//!   direction, with the machine's CPU time (/proc/stat, all CPUs, softirq
//!   and kernel workers included) around every run;
//! - *latency*: 1-byte and 1 KiB ping-pong on one connection (`load.rs`);
//! - *rate*: connect, 1-byte request/response, close, with 1 and 32
//!   concurrent clients (`load.rs`);
//! - *udp*: UDP datagrams, 64 B and 1,400 B: a one-way flood at fixed
//!   offered rates and an echo rate from 32 flows, through the forwarder,
//!   RootlessKit's builtin driver and pasta against direct (`udp.rs`, which
//!   `cargo xtask bench-udp` also runs alone);
//! - *scale*: 10,000 concurrent idle connections (each proven end to end
//!   with a 1-byte echo, 64 being opened at a time), held while the
//!   carrier's RSS and descriptors are read, then closed; the time to open
//!   them all. Runs last: a peer that runs out of descriptors may not
//!   recover, which must not cost it the other workloads;
//! - *rootless Docker*: one container published by RootlessKit's builtin
//!   driver and by forwarder attached to rootless dockerd (each engine):
//!   a 1 GiB download and the connection rate (`docker.rs`; skipped, with
//!   the reason, where rootless Docker cannot run);
//! - with `--profile`, a profile of the ebpf engine's bulk, ping-pong and
//!   connection-rate runs (`profile.rs`).
//!
//! Method:
//! - one throw-away child namespace `fwd-bench-<pid>` with
//!   `iperf3 -s -B 127.0.0.1 -p 5201` and the echo server
//!   (`xtask bench-echo`, 127.0.0.1:7007) inside it;
//! - *direct*: the client inside the child too (the load generator enters
//!   the child with setns): the ceiling;
//! - *ebpf*, *splice*, *copy*: one forwarder per engine (`--mode ...`) in
//!   this namespace publishing `127.0.0.1:<free port>:5201` and
//!   `127.0.0.1:<free port>:7007` into the child, the client here. Each
//!   forwarder is started once and kept for all workloads and repetitions
//!   (a leak or slowdown over time shows up as spread). Its `ready` line
//!   must name the engine asked for; its final statistics (bytes by data
//!   path) go into the report;
//! - the peers likewise listen here on 127.0.0.1:<free port>; one that
//!   cannot start, or fails a throughput run, is reported as "not run:
//!   <reason>" and left out of the later runs; a failure in another
//!   workload is reported in that workload's cell;
//! - forward = the client sends (parent -> child through the forwarder),
//!   reverse = `iperf3 -R` (the server in the child sends);
//! - every workload is repeated `--reps` times (scale: at most 3) and the
//!   systems are interleaved in each repetition (direct, ebpf, splice,
//!   copy, peers, direct, ...), so drift of the machine hits all alike;
//!   throughput starts with one unrecorded 1-s warm-up run of each system;
//! - throughput runs in three placements of iperf3's client and server
//!   (`--placements`): *unpinned* (as users run it; the primary table and
//!   the one the targets are judged on), *split* (client and server pinned
//!   to two different CPUs, `-A a,b`) and *same* (both pinned to one CPU,
//!   `-A a,a`), so no placement can hide a collapse; the forwarder is never
//!   pinned;
//! - *auto*: a forwarder with `--mode auto`, whatever engine it picks, so
//!   the report shows that auto mode is as fast as the best engine;
//! - figures are medians over the repetitions with min-max; ratios are the
//!   median of per-repetition ratios (system / direct of the same
//!   repetition), so machine drift cancels pair by pair; likewise
//!   ebpf / each peer and splice / copy;
//! - resources: for each process that carries the bytes (a forwarder, the
//!   RootlessKit parent, pasta), utime+stime from `/proc/PID/stat` around
//!   the throughput runs per GB iperf3 moved through it; the machine's busy
//!   CPU time (all processes and kernel threads) per GB over the same
//!   runs, which is the honest figure for ebpf (its redirects run in
//!   softirq and kernel-worker context, not charged to the forwarder);
//!   RSS while the idle connections are held (VmRSS), and the peak over
//!   the whole run (VmHWM, read at the end).
//!   socat forks per connection: not measured.
//!
//! Prints a Markdown report and writes it to `bench/results/latest.md`,
//! the raw numbers to `bench/results/latest.json` and a chart to
//! `bench/results/latest.svg` (with `--profile`, also
//! `bench/results/profile.md`). Every process it starts is stopped by its
//! PID; all traffic stays on loopback and in the bench's namespaces.

//
// Where things are: `systems.rs` starts the systems under test (direct,
// the engines, the peers); this file holds the plan and the workloads
// (throughput, latency, rate, scale; `udp.rs`, `docker.rs` and
// `profile.rs` the others); `report.rs` turns the results into the
// Markdown report, the JSON, the chart and the targets.

mod docker;
mod profile;
mod report;
mod systems;
mod timeline;
use forwarder_testkit::procfs as sample;
pub mod udp;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use forwarder_testkit::wait::{try_wait_until, try_wait_until_or_abort};
use serde_json::Value;

use crate::load;
use crate::util::{
    build_forwarder, catch_interrupts, check_interrupted, die_with_parent, output_within, root,
    spawn_ready, Forwarder, Netns, Proc,
};
use sample::{CpuTimes, CpuUse};

#[derive(clap::Args)]
pub struct Args {
    /// Repetitions of every system and workload (scale: at most 3).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    reps: u32,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    duration: u32,
    /// A smoke version of a few minutes: 1 repetition, 1-s iperf3 runs,
    /// 2000 round trips, 1 s per connection-rate run, 1000 idle connections
    /// (overrides --reps, --duration and --scale-conns).
    #[arg(long)]
    quick: bool,
    /// Only the unpinned placement (same as `--placements unpinned`).
    #[arg(long)]
    no_affinity: bool,
    /// Placements of iperf3's client and server for the throughput runs,
    /// comma-separated; the first is the primary table.
    #[arg(long, value_delimiter = ',', default_value = "unpinned,split,same")]
    placements: Vec<Placement>,
    /// Leave out the peers (socat, RootlessKit, pasta).
    #[arg(long)]
    no_peers: bool,
    /// Also run every forwarder mode with this binary (rows `MODE@base`),
    /// interleaved with this build's in the same run, and report the two
    /// side by side: an A/B against a build from before a change.
    #[arg(long, value_name = "PATH")]
    baseline: Option<std::path::PathBuf>,
    /// The workloads to run, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "scale,throughput,latency,rate,udp,docker"
    )]
    workloads: Vec<Workload>,
    /// Idle connections of the scale workload.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    scale_conns: u32,
    /// Also profile the ebpf engine (perf, BPF run-time statistics) and
    /// write bench/results/profile.md.
    #[arg(long)]
    profile: bool,
}

/// A workload of the bench.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Workload {
    Scale,
    Throughput,
    Latency,
    Rate,
    /// Rootless Docker: RootlessKit's builtin driver against forwarder.
    Docker,
    Udp,
}

/// Where iperf3's client and server run during a throughput run.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// Nothing pinned: the scheduler decides, as for a user.
    Unpinned,
    /// Client and server pinned to two different CPUs.
    Split,
    /// Client and server pinned to the same CPU.
    Same,
}

impl Placement {
    /// iperf3's `-A client,server`, given the first two CPUs we may use.
    pub fn affinity(self, cpus: Option<(usize, usize)>) -> Option<(usize, usize)> {
        match self {
            Placement::Unpinned => None,
            Placement::Split => cpus,
            Placement::Same => cpus.map(|(c, _)| (c, c)),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Placement::Unpinned => "unpinned",
            Placement::Split => "split",
            Placement::Same => "same",
        }
    }

    /// How the runs of this placement were made, for the report.
    pub fn describe(self, cpus: Option<(usize, usize)>) -> String {
        match self.affinity(cpus) {
            None => "nothing pinned (the scheduler places iperf3's client and server, as for \
                     a user)"
                .to_string(),
            Some((c, s)) if c == s => {
                format!("iperf3 client and server both pinned to CPU {c} (`-A {c},{s}`)")
            }
            Some((c, s)) => {
                format!("iperf3 client pinned to CPU {c}, server to CPU {s} (`-A {c},{s}`)")
            }
        }
    }
}

/// The port iperf3 listens on in the child.
const SERVER_PORT: u16 = 5201;
/// The port the echo server listens on in the child.
const ECHO_PORT: u16 = 7007;
/// The forwarder's modes, in the order they run after direct; `auto` runs
/// whatever engine auto mode picks here.
const ENGINES: [&str; 4] = ["ebpf", "splice", "copy", "auto"];
/// The forwarders the loopback workloads run: the modes, and `ebpf-local`,
/// `--mode ebpf --local-path`, which carries the bench's local clients on
/// the local-client path (`ebpf` carries them as every client its
/// sock_ops program does not see: the sk_skb path); `auto-nosrc`, auto mode
/// with `--no-source-ip`.
pub(crate) const FORWARDERS: [&str; 6] =
    ["ebpf", "ebpf-local", "splice", "copy", "auto", "auto-nosrc"];
/// The suffix of a `--baseline` binary's rows.
pub(crate) const BASELINE: &str = "@base";
/// The engines auto mode may pick, against which it is judged.
pub const AUTO_CHOICES: [&str; 3] = ["ebpf", "splice", "copy"];
const DIRECTIONS: [&str; 2] = ["forward", "reverse"];
/// Parallel iperf3 streams.
const STREAMS: [u32; 2] = [1, 4];
/// Ping-pong message sizes.
const SIZES: [usize; 2] = [1, 1024];
/// Concurrent clients of the connection-rate workload.
const CLIENTS: [usize; 3] = [1, 32, 256];
/// Connections being set up at once by the scale workload.
const SCALE_PARALLEL: usize = 64;
/// Descriptors the bench raises its limit to (inherited by the forwarders,
/// the servers and the peers): 10,000 forwarded connections need 20,000.
const NOFILE: u64 = 262_144;

/// A system under test.
#[derive(Clone)]
pub struct System {
    /// Short name: "direct", an engine, a peer.
    pub name: String,
    /// The row label in the report.
    pub label: String,
    /// The iperf3 port here; `None` is direct (client in the child).
    iperf_port: Option<u16>,
    /// The echo port here (direct: `ECHO_PORT`, reached from the child).
    echo_port: Option<u16>,
    /// The process carrying the bytes, for CPU and memory.
    pub pid: Option<u32>,
    /// Set when the system failed: it is left out from then on.
    pub failed: Option<String>,
}

impl System {
    fn is_peer(&self) -> bool {
        self.name != "direct" && !self.is_forwarder()
    }

    /// A forwarder mode, of this build or of the `--baseline` binary.
    fn is_forwarder(&self) -> bool {
        FORWARDERS.contains(&self.name.strip_suffix(BASELINE).unwrap_or(&self.name))
    }
}

/// One iperf3 run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ThrRun {
    pub gbit: f64,
    pub bytes: f64,
    /// The machine's CPU use during the run.
    pub cpu: CpuUse,
}

/// (placement, streams, direction index).
pub type ThrKey = (Placement, u32, usize);

/// The runs of one system in one workload, or why it stopped.
#[derive(Debug, serde::Serialize)]
pub struct Cell<T> {
    pub runs: Vec<T>,
    pub failed: Option<String>,
}

impl<T> Default for Cell<T> {
    fn default() -> Self {
        Cell {
            runs: Vec::new(),
            failed: None,
        }
    }
}

/// One connection-rate run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RateRun {
    pub conn_per_s: f64,
    pub p99_setup_us: f64,
    pub failed: u64,
    pub first_error: Option<String>,
}

/// One scale run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ScaleRun {
    pub conns: usize,
    pub open_secs: f64,
    pub p99_setup_us: f64,
    /// The carrier's VmRSS while all connections were held.
    pub rss_mib: Option<f64>,
    pub fds: Option<usize>,
    /// A forwarder: seconds until it reported no active connection after
    /// the clients closed.
    pub drained_secs: Option<f64>,
}

/// Everything measured.
#[derive(Default)]
pub struct Results {
    pub thr: BTreeMap<String, BTreeMap<ThrKey, Vec<ThrRun>>>,
    pub lat: BTreeMap<usize, BTreeMap<String, Cell<[f64; 4]>>>,
    pub rate: BTreeMap<usize, BTreeMap<String, Cell<RateRun>>>,
    pub scale: BTreeMap<String, Cell<ScaleRun>>,
    /// The carrier process's CPU seconds per GB over the throughput runs.
    pub cpu_per_gb: BTreeMap<String, f64>,
    /// Peak RSS (VmHWM) after all workloads.
    pub peak_rss: BTreeMap<String, f64>,
    /// Bytes iperf3 moved through each system, warm-ups included.
    pub bytes: BTreeMap<String, f64>,
    pub fwd_stats: Vec<(String, Value)>,
    /// The rootless Docker workload.
    pub docker: Option<docker::DockerResults>,
    /// The UDP workload.
    pub udp: Option<udp::UdpResults>,
    /// Rows only the connection-rate workload runs: auto mode with its
    /// clients at [`PRESERVED_CLIENT`] ([`preserved_rows`]).
    pub rate_only: Vec<System>,
}

/// The connection-rate workload's preserved client: an address of the
/// host's loopback that the child does not own, so the forwarder keeps
/// it as the source of its dial.
const PRESERVED_CLIENT: std::net::IpAddr =
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 5));

/// The name suffix of the rows whose clients are at [`PRESERVED_CLIENT`].
const PRESERVED: &str = "-src";

/// Auto mode's forwarders (this build's and the baseline's) again, as
/// rows whose clients are at [`PRESERVED_CLIENT`]: the cost of a preserved
/// source, which clients at 127.0.0.1 (an address the child owns too)
/// never pay.
fn preserved_rows(systems: &[System]) -> Vec<System> {
    systems
        .iter()
        .filter(|s| s.name.strip_suffix(BASELINE).unwrap_or(&s.name) == "auto")
        .map(|s| {
            let mut p = s.clone();
            p.name = match s.name.strip_suffix(BASELINE) {
                Some(n) => format!("{n}{PRESERVED}{BASELINE}"),
                None => format!("{}{PRESERVED}", s.name),
            };
            p.label = format!(
                "{}, client at {PRESERVED_CLIENT} (source preserved)",
                s.label
            );
            p
        })
        .collect()
}

/// The first two CPUs we may run on, for `iperf3 -A client,server`.
fn two_cpus() -> Option<(usize, usize)> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity
    // fills it for this thread.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        set
    };
    let mut cpus = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) });
    Some((cpus.next()?, cpus.next()?))
}

/// Raises this process's descriptor limit (soft and hard) to `NOFILE` or
/// `fs.nr_open`, whichever is lower; children inherit it. Without
/// CAP_SYS_RESOURCE the hard limit cannot rise: then the soft limit goes
/// up to the hard one. Returns the limit and, when it is short of the
/// goal, why.
fn raise_nofile() -> Result<(u64, Option<String>)> {
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(NOFILE);
    let want = NOFILE.min(nr_open);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("reading RLIMIT_NOFILE");
    }
    let raised = libc::rlimit {
        rlim_cur: want,
        rlim_max: want.max(lim.rlim_max),
    };
    // SAFETY: setrlimit with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return Ok((want, None));
    }
    let hard = lim.rlim_max;
    let soft = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    // SAFETY: as above; raising the soft limit up to the hard one needs no
    // privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) } != 0 {
        return Err(std::io::Error::last_os_error()).context("raising RLIMIT_NOFILE");
    }
    Ok((
        hard,
        Some(format!(
            "the hard descriptor limit here is {hard} and raising it needs CAP_SYS_RESOURCE, \
             which this process lacks"
        )),
    ))
}

/// How many connections the scale workload can hold through carriers
/// that keep two sockets each, given the descriptor limit and the most
/// descriptors any carrier holds already, and through a forwarder run with
/// default flags: its `--max-connections` default at that limit (beyond
/// it a forwarder stops accepting, as documented).
fn scale_fit(asked: usize, limit: u64, base_fds: usize) -> usize {
    let room = limit.saturating_sub(base_fds as u64 + 16) / 2;
    asked
        .min(usize::try_from(room).unwrap_or(usize::MAX))
        .min(forwarder::startup::default_max_connections(limit))
}

/// Loopback ports free right now, distinct.
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let held = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").context("finding a free port"))
        .collect::<Result<Vec<_>>>()?;
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// One iperf3 client run with `streams` parallel streams; returns Gbit/s
/// received and the bytes received.
fn iperf(
    ns: &Netns,
    sys: &System,
    secs: u32,
    streams: u32,
    reverse: bool,
    cpus: Option<(usize, usize)>,
) -> Result<(f64, f64)> {
    let (mut cmd, port) = match sys.iperf_port {
        None => (ns.ip_exec("iperf3"), SERVER_PORT),
        Some(port) => (Command::new("iperf3"), port),
    };
    cmd.args(["-c", "127.0.0.1", "-J", "--connect-timeout", "5000"])
        .args(["-p", &port.to_string(), "-t", &secs.to_string()]);
    if streams > 1 {
        cmd.args(["-P", &streams.to_string()]);
    }
    if reverse {
        cmd.arg("-R");
    }
    if let Some((c, s)) = cpus {
        cmd.args(["-A", &format!("{c},{s}")]);
    }
    let limit = Duration::from_secs(u64::from(secs) + 30);
    // The server takes a moment to accept the next test after one ends
    // ("the server is busy"): retry that, for a few seconds.
    let what = format!("iperf3's server to take the test to {}", sys.name);
    let (done, v) = try_wait_until_or_abort(IPERF_BUSY, &what, || -> Result<_> {
        let done = output_within(&mut cmd, limit)?;
        let v: Value = serde_json::from_str(&done.stdout).with_context(|| {
            format!(
                "iperf3 ({}) wrote no JSON: {}{}",
                done.status,
                done.stdout.trim(),
                done.stderr.trim()
            )
        })?;
        if let Some(err) = v["error"].as_str() {
            if err.contains("busy") {
                return Ok(Err(format!("iperf3: {err}")));
            }
            bail!("iperf3 to {} failed: {err}", sys.name);
        }
        Ok(Ok((done, v)))
    })??;
    if !done.status.success() {
        bail!("iperf3 to {} failed ({})", sys.name, done.status);
    }
    let recv = &v["end"]["sum_received"];
    let bits = recv["bits_per_second"].as_f64().with_context(|| {
        format!(
            "no end.sum_received.bits_per_second from iperf3 to {}",
            sys.name
        )
    })?;
    Ok((bits / 1e9, recv["bytes"].as_f64().unwrap_or(0.0)))
}

/// How long the forwarders' last connections are given to close before
/// their final statistics.
const FINAL_SETTLE: Duration = Duration::from_secs(1);

/// How long an iperf3 server that answers "busy" (still ending the last
/// test) is retried.
const IPERF_BUSY: Duration = Duration::from_secs(5);

pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

/// Median of the element-wise ratios a[i] / b[i].
pub fn ratio(a: &[f64], b: &[f64]) -> f64 {
    median(&a.iter().zip(b).map(|(x, y)| x / y).collect::<Vec<_>>())
}

/// Median of the element-wise differences a[i] - b[i].
pub fn difference(a: &[f64], b: &[f64]) -> f64 {
    median(&a.iter().zip(b).map(|(x, y)| x - y).collect::<Vec<_>>())
}

/// Starts the iperf3 server in the child and waits until it listens. Its
/// stdout is drained for as long as it runs.
fn iperf_server(ns: &Netns) -> Result<Proc> {
    let mut cmd = ns.ip_exec("iperf3");
    cmd.args(["-s", "-B", "127.0.0.1", "-p", &SERVER_PORT.to_string()])
        .arg("--forceflush")
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    die_with_parent(&mut cmd, libc::SIGKILL);
    let mut server = Proc::spawn(&mut cmd, "the iperf3 server")?;
    let out = server.child()?.stdout.take().context("iperf3's stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if line.contains("Server listening") {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(());
                }
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(10))
        .context("the iperf3 server did not start listening (its errors are above)")?;
    Ok(server)
}

/// Starts the echo server (`xtask bench-echo`) in the child.
fn echo_server(ns: &Netns, me: &Path) -> Result<Proc> {
    let mut cmd = ns.ip_exec(me);
    cmd.args(["bench-echo", "--bind", &format!("127.0.0.1:{ECHO_PORT}")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    spawn_ready(&mut cmd, "the echo server", load::ECHO_READY)
}

/// Where the load generator reaches a system's echo server, and whether it
/// must run inside the child (direct).
fn echo_addr(sys: &System) -> Option<(bool, SocketAddr)> {
    let port = sys.echo_port?;
    Some((
        sys.iperf_port.is_none(),
        SocketAddr::from(([127, 0, 0, 1], port)),
    ))
}

/// Runs a load-generator workload against a system's echo port (from
/// inside the child namespace for direct), or says why it cannot run.
fn on_echo<T, F, Fut>(sys: &System, ns: &Netns, work: F) -> std::result::Result<T, String>
where
    T: Send + 'static,
    F: FnOnce(SocketAddr) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T>>,
{
    match (&sys.failed, echo_addr(sys)) {
        (Some(why), _) => Err(why.clone()),
        (None, None) => Err("no echo port".to_string()),
        (None, Some((in_child, addr))) => {
            let netns = in_child.then(|| ns.path().display().to_string());
            load::in_netns(netns, move || work(addr)).map_err(|e| format!("{e:#}"))
        }
    }
}

pub fn run(args: &Args) -> Result<()> {
    // Processes orphaned below us (the iperf3 inside RootlessKit, killed by
    // its parent-death signal) are reparented to this process instead of
    // to PID 1, which may not reap them, and reaped once all is stopped.
    // SAFETY: prctl with an integer argument.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let r = run_inner(args);
    reap_orphans();
    r
}

/// Reaps the orphans reparented to us (see `run`); every child we started
/// ourselves was already waited for by its guard.
fn reap_orphans() {
    let mut reaped = 0u32;
    let none_left = try_wait_until(Duration::from_secs(2), "the orphans to exit", || loop {
        let mut status = 0;
        // SAFETY: plain waitpid(2) for any child, not blocking.
        match unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) } {
            pid if pid < 0 => return Ok(()), // ECHILD: none left
            0 => return Err(format!("{reaped} reaped, some still running")),
            _ => reaped += 1,
        }
    });
    // Not an error: init reaps what is left once the bench exits.
    if let Err(timed_out) = none_left {
        eprintln!("bench: {timed_out}; leaving them to init");
    }
}

/// The run's settings after `--quick`.
pub struct Plan {
    pub reps: u32,
    pub secs: u32,
    pub round_trips: usize,
    pub rate_secs: u64,
    pub scale_conns: usize,
    pub scale_reps: u32,
    /// The first two CPUs we may use (pinned placements).
    pub cpus: Option<(usize, usize)>,
    /// Placements of the throughput runs; the first is the primary one.
    pub placements: Vec<Placement>,
    pub workloads: Vec<Workload>,
    /// Why the scale workload holds fewer connections than asked.
    pub scale_note: Option<String>,
}

impl Plan {
    fn new(args: &Args) -> Self {
        let cpus = two_cpus();
        let mut placements = if args.no_affinity {
            vec![Placement::Unpinned]
        } else {
            args.placements.clone()
        };
        // Keep the order given, without repeats; with one CPU nothing can
        // be split.
        let mut seen = Vec::new();
        placements.retain(|p| {
            let keep = !seen.contains(p) && (cpus.is_some() || *p == Placement::Unpinned);
            seen.push(*p);
            keep
        });
        if placements.is_empty() {
            placements.push(Placement::Unpinned);
        }
        let mut workloads = args.workloads.clone();
        workloads.sort();
        workloads.dedup();
        if args.quick {
            Plan {
                reps: 1,
                secs: 1,
                round_trips: 2000,
                rate_secs: 1,
                scale_conns: 1000,
                scale_reps: 1,
                cpus,
                placements,
                workloads,
                scale_note: None,
            }
        } else {
            Plan {
                reps: args.reps,
                secs: args.duration,
                round_trips: 20000,
                rate_secs: 2,
                scale_conns: args.scale_conns as usize,
                scale_reps: args.reps.min(3),
                cpus,
                placements,
                workloads,
                scale_note: None,
            }
        }
    }

    fn has(&self, w: Workload) -> bool {
        self.workloads.contains(&w)
    }
}

fn run_inner(args: &Args) -> Result<()> {
    crate::setup::run()?;
    catch_interrupts();
    let plan = Plan::new(args);
    let (nofile, nofile_short) = raise_nofile()?;
    let bin = build_forwarder()?;
    let me = std::env::current_exe().context("locating the xtask binary")?;

    // Other load skews every number: say how much there was.
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_string());
    let ns = Netns::named(&format!("fwd-bench-{}", std::process::id()))?;
    // The scale workload dials 10,000 connections per system and
    // repetition from the child's 127.0.0.1 to one server port, and each
    // leaves a TIME_WAIT there: give the child's dialers the whole port
    // range (this namespace's setting only).
    crate::util::run(
        ns.ip_exec("sysctl")
            .args(["-qw", "net.ipv4.ip_local_port_range=1024 65000"]),
    )
    .context("widening the child namespace's ephemeral port range")?;
    let _server = iperf_server(&ns)?;
    let _echo = echo_server(&ns, &me)?;

    let mut carriers = systems::start(args, &ns, &bin, &me)?;
    let mut plan = plan;
    let limits = Limits {
        nofile,
        nofile_short,
    };
    let (mut res, profile_md) = run_workloads(args, &mut plan, &ns, &bin, &mut carriers, &limits)?;

    // Final statistics of each forwarder, once the last workload's
    // connections have closed (any still open after a second are what
    // the report calls active at the end), then a clean stop.
    for (mode, mut fwd) in carriers.forwarders {
        let mut last = None;
        let what = format!("{mode} to report no active connection");
        let drained = try_wait_until_or_abort(FINAL_SETTLE, &what, || -> Result<_> {
            let st = fwd.stats()?;
            let done = st["active"] == 0;
            let active = st["active"].to_string();
            last = Some(st);
            Ok(if done {
                Ok(())
            } else {
                Err(format!("{active} active"))
            })
        })?;
        if let Err(timed_out) = drained {
            eprintln!("bench: {timed_out}; reporting them");
        }
        let stats = last.context("no statistics")?;
        fwd.stop()?;
        res.fwd_stats.push((mode, stats));
    }
    drop(carriers.peers);

    let report = report::Report {
        plan: &plan,
        systems: &carriers.systems,
        res: &res,
        machine: report::Machine::read(load, nofile),
    };
    write_results(args, &report, profile_md)
}

/// The descriptor limit the bench runs with, and why it is short of what
/// the scale workload asks for, if it is.
struct Limits {
    nofile: u64,
    nofile_short: Option<String>,
}

/// Runs the workloads the plan names over every system, in the bench's
/// order (scale and Docker last); with `--profile`, also the profile.
fn run_workloads(
    args: &Args,
    plan: &mut Plan,
    ns: &Netns,
    bin: &Path,
    carriers: &mut systems::Carriers,
    limits: &Limits,
) -> Result<(Results, Option<String>)> {
    let systems = &mut carriers.systems;
    let mut res = Results::default();
    if plan.has(Workload::Throughput) {
        throughput(plan, ns, systems, &mut res)?;
    }
    if plan.has(Workload::Latency) {
        latency(plan, ns, systems, &mut res)?;
    }
    if plan.has(Workload::Rate) {
        rate(plan, ns, systems, &mut res)?;
    }
    if plan.has(Workload::Udp) {
        eprintln!("bench: udp");
        let udp_plan = udp::UdpPlan {
            secs: if args.quick { 1 } else { 2 },
            reps: plan.reps,
            rates: udp::RATES.to_vec(),
            peers: !args.no_peers,
            compare_bin: None,
        };
        res.udp = Some(udp::measure(&udp_plan, ns, bin)?);
    }
    // Scale last: a peer that runs out of descriptors may not recover
    // (RootlessKit's listener stops accepting), which must not cost it the
    // other workloads.
    if plan.has(Workload::Scale) {
        fit_scale(plan, systems, limits);
        scale(plan, ns, systems, &mut carriers.forwarders, &mut res)?;
    }
    if plan.has(Workload::Docker) {
        check_interrupted()?;
        res.docker = Some(docker::run(plan, bin));
    }
    for s in systems.iter() {
        if let Some(rss) = s.pid.and_then(|p| sample::peak_rss_mib(p).ok()) {
            res.peak_rss.insert(s.name.clone(), rss);
        }
    }
    let profile_md = if args.profile {
        let mut md = profile::run(plan, ns, systems)?;
        timeline::run(&mut md, plan, ns, systems)?;
        Some(md)
    } else {
        None
    };
    Ok((res, profile_md))
}

/// Lowers the scale workload's connection count to what the descriptor
/// limit allows the forwarders, saying why in the plan.
fn fit_scale(plan: &mut Plan, systems: &[System], limits: &Limits) {
    let base = systems
        .iter()
        .filter(|s| s.is_forwarder())
        .filter_map(|s| sample::fd_count(s.pid?).ok())
        .max()
        .unwrap_or(0);
    let fit = scale_fit(plan.scale_conns, limits.nofile, base);
    if fit < plan.scale_conns {
        let why = format!(
            "{fit} connections instead of {}: {}; a forwarder holds two sockets per \
             connection and already {base} other descriptors, and with default flags \
             accepts at most {} connections at this limit (`--max-connections`)",
            plan.scale_conns,
            limits
                .nofile_short
                .as_deref()
                .unwrap_or("the descriptor limit"),
            forwarder::startup::default_max_connections(limits.nofile)
        );
        eprintln!("bench: scale: {why}");
        plan.scale_note = Some(why);
        plan.scale_conns = fit;
    }
}

/// Prints the report and writes it, the raw numbers, the chart and (with
/// `--profile`) the profile into bench/results.
fn write_results(args: &Args, report: &report::Report, profile_md: Option<String>) -> Result<()> {
    let (md, json) = report.render()?;
    print!("{md}");
    let dir = root().join("bench/results");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    write_atomic(&dir.join("latest.md"), md.as_bytes())?;
    let json = serde_json::to_string_pretty(&json).context("serializing the results")?;
    write_atomic(&dir.join("latest.json"), format!("{json}\n").as_bytes())?;
    write_atomic(&dir.join("latest.svg"), report.svg().as_bytes())?;
    if let Some(p) = profile_md {
        // The hand-written investigation at the end of profile.md (from
        // its marker on) is kept across regenerations.
        let path = dir.join("profile.md");
        let kept = std::fs::read_to_string(&path)
            .ok()
            .and_then(|old| old.find(profile::KEPT_MARKER).map(|i| old[i..].to_string()))
            .unwrap_or_default();
        write_atomic(&path, format!("{p}\n{kept}").as_bytes())?;
    }
    eprintln!(
        "bench: wrote {0}/latest.md, {0}/latest.json and {0}/latest.svg{1}",
        dir.display(),
        if args.profile { " and profile.md" } else { "" }
    );
    Ok(())
}

/// Throughput: a warm-up of each system, then per repetition, stream
/// count and direction one run of each system, the machine's CPU time
/// read around every run, and the carriers' own CPU time around it all.
fn throughput(plan: &Plan, ns: &Netns, systems: &mut [System], res: &mut Results) -> Result<()> {
    let cpu_before: BTreeMap<String, f64> = systems
        .iter()
        .filter_map(|s| Some((s.name.clone(), sample::cpu_seconds(s.pid?).ok()?)))
        .collect();
    let (reps, secs) = (plan.reps, plan.secs);
    eprintln!(
        "bench: throughput, {reps} repetitions x {} placements x {} systems x {} stream counts x 2 directions x {secs} s, after a warm-up",
        plan.placements.len(),
        systems.iter().filter(|s| s.failed.is_none()).count(),
        STREAMS.len()
    );
    warm_up(ns, systems, res)?;
    for rep in 1..=reps {
        for &place in &plan.placements {
            for streams in STREAMS {
                for d in 0..DIRECTIONS.len() {
                    for sys in systems.iter_mut().filter(|s| s.failed.is_none()) {
                        check_interrupted()?;
                        thr_run(plan, ns, sys, rep, (place, streams, d), res)?;
                    }
                }
            }
        }
    }
    carrier_cpu_per_gb(systems, &cpu_before, res);
    Ok(())
}

/// A 1-s unpinned iperf3 run through each system that has not failed; a
/// peer that fails it is marked failed, anything else failing is an error.
fn warm_up(ns: &Netns, systems: &mut [System], res: &mut Results) -> Result<()> {
    for sys in systems.iter_mut().filter(|s| s.failed.is_none()) {
        check_interrupted()?;
        match iperf(ns, sys, 1, 1, false, None) {
            Ok((_, b)) => *res.bytes.entry(sys.name.clone()).or_default() += b,
            Err(e) if sys.is_peer() => sys.failed = Some(format!("warm-up: {e:#}")),
            Err(e) => return Err(e).with_context(|| format!("warm-up of {}", sys.name)),
        }
    }
    Ok(())
}

/// One iperf3 run of repetition `rep` through `sys` for `key` (placement,
/// streams, direction), with the machine's CPU use around it, into
/// `res`; then a short pause. A peer that fails is marked failed (and not
/// run again), anything else failing is an error.
fn thr_run(
    plan: &Plan,
    ns: &Netns,
    sys: &mut System,
    rep: u32,
    key: ThrKey,
    res: &mut Results,
) -> Result<()> {
    let (place, streams, d) = key;
    let (reps, secs, dir) = (plan.reps, plan.secs, DIRECTIONS[d]);
    let pin = place.affinity(plan.cpus);
    let pname = place.name();
    let before = CpuTimes::now()?;
    let (gbit, bytes) = match iperf(ns, sys, secs, streams, d == 1, pin) {
        Ok(r) => r,
        Err(e) if sys.is_peer() => {
            sys.failed = Some(format!(
                "repetition {rep}, {pname}, {streams} stream(s) {dir}: {e:#}"
            ));
            return Ok(());
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "repetition {rep}, {pname}, {streams} stream(s) {dir}, {}",
                    sys.name
                )
            })
        }
    };
    let cpu = before.until(&CpuTimes::now()?);
    eprintln!(
        "bench: rep {rep}/{reps} {pname:8} x{streams} {dir:7} {:11} {gbit:6.2} Gbit/s, CPUs busy {}",
        sys.name,
        cpu.per_cpu_busy
            .iter()
            .map(|f| format!("{:.0}%", f * 100.0))
            .collect::<Vec<_>>()
            .join(" ")
    );
    res.thr
        .entry(sys.name.clone())
        .or_default()
        .entry(key)
        .or_default()
        .push(ThrRun { gbit, bytes, cpu });
    *res.bytes.entry(sys.name.clone()).or_default() += bytes;
    // Pacing between runs, so one run's tail (closing streams, the
    // server's end of test) does not overlap the next one's start.
    std::thread::sleep(Duration::from_millis(200));
    Ok(())
}

/// Each carrier's own CPU seconds (since `cpu_before`) per GB it carried,
/// into `res.cpu_per_gb`.
fn carrier_cpu_per_gb(systems: &[System], cpu_before: &BTreeMap<String, f64>, res: &mut Results) {
    for sys in systems.iter() {
        let (Some(pid), Some(before)) = (sys.pid, cpu_before.get(&sys.name)) else {
            continue;
        };
        if let (Ok(after), Some(b)) = (sample::cpu_seconds(pid), res.bytes.get(&sys.name)) {
            if *b > 0.0 {
                res.cpu_per_gb
                    .insert(sys.name.clone(), (after - before) / (b / 1e9));
            }
        }
    }
}

/// Runs a repeated workload: per repetition, key (size, clients) and
/// system, `run` (given the repetition) once into that system's cell, skipping a cell once it has
/// failed. `pause` separates the systems.
fn repeated<K: Copy + Ord, T>(
    plan: &Plan,
    systems: &[System],
    keys: &[K],
    cells: &mut BTreeMap<K, BTreeMap<String, Cell<T>>>,
    pause: Duration,
    mut run: impl FnMut(&System, K, u32) -> std::result::Result<T, String>,
) -> Result<()> {
    for rep in 1..=plan.reps {
        for &key in keys {
            for sys in systems {
                check_interrupted()?;
                let cell = cells
                    .entry(key)
                    .or_default()
                    .entry(sys.name.clone())
                    .or_default();
                if cell.failed.is_some() {
                    continue;
                }
                match run(sys, key, rep) {
                    Ok(r) => cell.runs.push(r),
                    Err(e) => cell.failed = Some(e),
                }
                std::thread::sleep(pause);
            }
        }
    }
    Ok(())
}

/// Ping-pong latency per repetition, size and system.
fn latency(plan: &Plan, ns: &Netns, systems: &[System], res: &mut Results) -> Result<()> {
    let n = plan.round_trips;
    repeated(
        plan,
        systems,
        &SIZES,
        &mut res.lat,
        Duration::ZERO,
        |sys, size, rep| {
            let r = on_echo(sys, ns, move |addr| async move {
                load::ping_pong(addr, size, n)
                    .await
                    .map(|rtts| load::latency_summary(&rtts))
            });
            match &r {
                Ok(l) => eprintln!(
                    "bench: rep {rep}/{} ping-pong {size:4} B {:11} p50 {:.1} p99 {:.1} p99.9 {:.1} us",
                    plan.reps, sys.name, l[0], l[1], l[2]
                ),
                Err(e) => eprintln!("bench: ping-pong {size:4} B {:11} not run: {e}", sys.name),
            }
            r
        },
    )
}

/// Connection rate per repetition, client count and system; between
/// systems a pause lets TIME_WAIT and the forwarder settle.
fn rate(plan: &Plan, ns: &Netns, systems: &[System], res: &mut Results) -> Result<()> {
    let dur = Duration::from_secs(plan.rate_secs);
    let pause = Duration::from_millis(300);
    res.rate_only = preserved_rows(systems);
    let rows: Vec<System> = systems.iter().chain(&res.rate_only).cloned().collect();
    repeated(
        plan,
        &rows,
        &CLIENTS,
        &mut res.rate,
        pause,
        |sys, clients, rep| {
            let from = sys
                .name
                .strip_suffix(BASELINE)
                .unwrap_or(&sys.name)
                .ends_with(PRESERVED)
                .then_some(PRESERVED_CLIENT);
            let r = on_echo(sys, ns, move |addr| async move {
                load::conn_rate(addr, from, clients, dur)
                    .await
                    .map(|c| RateRun {
                        conn_per_s: c.completed as f64 / c.secs,
                        p99_setup_us: load::latency_summary(&c.setup_ns)[1],
                        failed: c.failed,
                        first_error: c.first_error,
                    })
            });
            // Not one connection completed: that is a failure, not a rate.
            let r = r.and_then(|run| match (&run.first_error, run.conn_per_s > 0.0) {
                (Some(e), false) => Err(format!("no connection completed; first error: {e}")),
                _ => Ok(run),
            });
            match &r {
                Ok(run) => eprintln!(
                "bench: rep {rep}/{} connect {clients:2} clients {:11} {:8.0} conn/s p99 {:.0} us, {} failed",
                plan.reps, sys.name, run.conn_per_s, run.p99_setup_us, run.failed
            ),
                Err(e) => eprintln!(
                    "bench: connect {clients:2} clients {:11} not run: {e}",
                    sys.name
                ),
            }
            r
        },
    )
}

/// Scale: per repetition and system, open `scale_conns` connections, read
/// the carrier's RSS and descriptors while they are held, close them and
/// (a forwarder) wait until it reports none active.
fn scale(
    plan: &Plan,
    ns: &Netns,
    systems: &[System],
    forwarders: &mut [(String, Forwarder)],
    res: &mut Results,
) -> Result<()> {
    let n = plan.scale_conns;
    eprintln!(
        "bench: scale, {} repetition(s) x {n} idle connections per system",
        plan.scale_reps
    );
    for rep in 1..=plan.scale_reps {
        for sys in systems {
            check_interrupted()?;
            let cell = res.scale.entry(sys.name.clone()).or_default();
            if cell.failed.is_some() {
                continue;
            }
            if sys.name == "socat" {
                cell.failed = Some(format!(
                    "socat forks two processes per connection: {n} connections would be {} processes",
                    2 * n
                ));
                continue;
            }
            let mut run = match hold_idle(ns, sys, n) {
                Ok(run) => run,
                Err(e) => {
                    eprintln!("bench: scale {:11} not run: {e}", sys.name);
                    cell.failed = Some(e);
                    continue;
                }
            };
            await_closed(forwarders, sys, &mut run, cell)?;
            eprintln!(
                "bench: rep {rep}/{} scale {:11} {} connections in {:.2} s, RSS {} MiB, {} fds",
                plan.scale_reps,
                sys.name,
                run.conns,
                run.open_secs,
                run.rss_mib.map_or("n/a".into(), |r| format!("{r:.1}")),
                run.fds.map_or("n/a".into(), |f| f.to_string()),
            );
            cell.runs.push(run);
        }
    }
    Ok(())
}

/// Opens `n` idle connections through `sys`, reads the carrier's RSS and
/// descriptors while they are held (after half a second to settle), then
/// closes them. Fails with the reason, and the descriptors held, if not
/// all could be opened.
fn hold_idle(ns: &Netns, sys: &System, n: usize) -> std::result::Result<ScaleRun, String> {
    let pid = sys.pid;
    on_echo(sys, ns, move |addr| async move {
        let held = load::hold(addr, n, SCALE_PARALLEL).await;
        // Let the carrier settle (tasks parked, buffers returned).
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_mib = pid.and_then(|p| sample::rss_mib(p).ok());
        let fds = pid.and_then(|p| sample::fd_count(p).ok());
        if let Some(e) = held.error {
            bail!(
                "{e} (with {} connections open; the carrier held {} descriptors)",
                held.streams.len(),
                fds.map_or_else(|| "n/a".to_string(), |f| f.to_string())
            );
        }
        let run = ScaleRun {
            conns: held.streams.len(),
            open_secs: held.open_secs,
            p99_setup_us: load::latency_summary(&held.setup_ns)[1],
            rss_mib,
            fds,
            drained_secs: None,
        };
        drop(held.streams);
        Ok(run)
    })
}

/// After the clients closed: a forwarder is polled until it reports no
/// active connection (the time goes into `run.drained_secs`; still active
/// after 30 s fails the cell); a peer or direct gets a second.
fn await_closed(
    forwarders: &mut [(String, Forwarder)],
    sys: &System,
    run: &mut ScaleRun,
    cell: &mut Cell<ScaleRun>,
) -> Result<()> {
    let Some((_, fwd)) = forwarders.iter_mut().find(|(m, _)| *m == sys.name) else {
        // A peer or direct: give the closes a moment. Nothing tells when
        // they are done (direct has no process; a peer no count of its
        // connections), so this one is a fixed pause.
        std::thread::sleep(Duration::from_secs(1));
        return Ok(());
    };
    let t0 = Instant::now();
    let what = format!("{} to report no active connection", sys.name);
    let drained = try_wait_until_or_abort(Duration::from_secs(30), &what, || -> Result<_> {
        let st = fwd.stats()?;
        Ok(if st["active"] == 0 {
            Ok(())
        } else {
            Err(format!("{} connections active", st["active"]))
        })
    })?;
    match drained {
        Ok(()) => run.drained_secs = Some(t0.elapsed().as_secs_f64()),
        Err(timed_out) => {
            cell.failed = Some(format!(
                "still active 30 s after the clients closed ({timed_out})"
            ))
        }
    }
    Ok(())
}

/// Writes via a temporary file and a rename, so an interrupted run leaves
/// the previous results whole.
fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", path.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ratios() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(min_max(&[2.0, 5.0, 1.0]), (1.0, 5.0));
        assert_eq!(ratio(&[2.0, 9.0, 3.0], &[4.0, 3.0, 3.0]), 1.0);
        assert_eq!(difference(&[12.0, 9.0, 30.0], &[4.0, 3.0, 3.0]), 8.0);
    }

    #[test]
    fn scale_fits_the_descriptor_limit() {
        assert_eq!(scale_fit(10_000, 262_144, 30), 10_000);
        // 20,000 descriptors, 30 in use, 16 spare would hold 9,977 pairs;
        // a forwarder's default --max-connections is (20000 - 256) / 2.
        assert_eq!(scale_fit(10_000, 20_000, 30), 9_872);
        assert_eq!(scale_fit(10_000, 20_000, 2_000), 8_992);
        assert_eq!(scale_fit(10_000, 10, 30), 0);
    }
}
