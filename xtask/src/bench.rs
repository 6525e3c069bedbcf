//! `cargo xtask bench`: bulk throughput with iperf3, one TCP stream, each
//! direction, for direct loopback inside the child namespace (no
//! forwarder: the ceiling), for the forwarder with each engine and for the
//! peers (socat, RootlessKit's builtin driver, pasta: see `peers.rs`); then
//! request/response latency and connection rate (see `load.rs`) and the
//! forwarder's CPU time and memory.
//!
//! Method:
//! - one throw-away child namespace `fwd-bench-<pid>` with
//!   `iperf3 -s -B 127.0.0.1 -p 5201` and the echo server
//!   (`xtask bench-echo`, 127.0.0.1:7007) inside it;
//! - *direct*: the iperf3 client inside the child too, to 127.0.0.1:5201
//!   (the load generator enters the child with setns);
//! - *ebpf*, *splice*, *copy*: one forwarder per engine (`--mode ...`) in
//!   this namespace publishing `127.0.0.1:<free port>:5201` and
//!   `127.0.0.1:<free port>:7007` into the child, the client here, to
//!   127.0.0.1:<port>. Each forwarder is started once, before the first
//!   run, and kept for all repetitions (a fresh process per run would
//!   measure start-up too; a leak or slowdown over time shows up as spread
//!   instead). Its `ready` line must name the engine asked for; its final
//!   statistics (bytes by data path) go into the report;
//! - the peers likewise listen here on 127.0.0.1:<free port>; one that
//!   cannot start, or fails a run, is reported as "not run: <reason>" and
//!   left out of the later runs; the others go on;
//! - forward = the client sends (parent -> child through the forwarder),
//!   reverse = `iperf3 -R` (the server in the child sends);
//! - the systems are interleaved (direct, ebpf, splice, copy, peers,
//!   direct, ...) in each repetition and direction, so drift of the machine
//!   hits all alike, after one unrecorded 1-s warm-up run of each;
//! - unless `--no-affinity`, iperf3 pins its client and its server to two
//!   different CPUs (`-A a,b`) in every run, so scheduler placement does
//!   not decide results; the forwarder is not pinned;
//! - throughput is iperf3's `end.sum_received.bits_per_second`; reported as
//!   median and min-max in Gbit/s, and as the ratio to direct: the median
//!   of the per-repetition ratios (system / direct of the same repetition
//!   and direction); likewise splice / copy;
//! - resources: for each process that carries the bytes (a forwarder, the
//!   RootlessKit parent, pasta), utime+stime from `/proc/PID/stat` before
//!   the warm-up and after the last throughput run, divided by the bytes
//!   iperf3 moved through it in between (warm-ups included, sum of
//!   `end.sum_received.bytes`); peak RSS is `VmHWM` from
//!   `/proc/PID/status` after all workloads. socat forks per connection:
//!   not measured;
//! - latency and connection rate run after the throughput runs, one system
//!   after the other in the same order.
//!
//! Prints a Markdown report and writes it to `bench/results/latest.md`,
//! the raw numbers to `bench/results/latest.json` and a chart to
//! `bench/results/latest.svg`. Every process it starts is stopped by its
//! PID; all traffic stays on loopback.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

use crate::load;
use crate::peers::{self, Peer};
use crate::util::{
    build_forwarder, catch_interrupts, check_interrupted, die_with_parent, output, output_within,
    root, spawn_ready, Forwarder, Netns, Proc,
};
#[derive(clap::Args)]
pub struct Args {
    /// Repetitions of every system and direction.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    reps: u32,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    duration: u32,
    /// A smoke version of about a minute: 1 repetition of 2 s, 2000 round
    /// trips, 1 s per connection-rate run (overrides --reps/--duration).
    #[arg(long)]
    quick: bool,
    /// Do not pin the iperf3 client and server to CPUs.
    #[arg(long)]
    no_affinity: bool,
    /// Leave out the peers (socat, RootlessKit, pasta).
    #[arg(long)]
    no_peers: bool,
}

/// The port iperf3 listens on in the child.
const SERVER_PORT: u16 = 5201;
/// The port the echo server listens on in the child.
const ECHO_PORT: u16 = 7007;
/// The engines, in the order they run after direct.
const ENGINES: [&str; 3] = ["ebpf", "splice", "copy"];
const DIRECTIONS: [&str; 2] = ["forward", "reverse"];
/// Ping-pong message sizes.
const SIZES: [usize; 2] = [1, 1024];
/// Concurrent clients of the connection-rate workload.
const CLIENTS: [usize; 2] = [1, 32];

/// A system under test.
struct System {
    /// Short name: "direct", an engine, a peer.
    name: String,
    /// The row label in the report.
    label: String,
    /// The iperf3 port here; `None` is direct (client in the child).
    iperf_port: Option<u16>,
    /// The echo port here (direct: `ECHO_PORT`, reached from the child).
    echo_port: Option<u16>,
    /// The process carrying the bytes, for CPU and memory.
    pid: Option<u32>,
    /// Set when the system failed: it is left out from then on.
    failed: Option<String>,
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

/// Loopback ports free right now, distinct.
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let held = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").context("finding a free port"))
        .collect::<Result<Vec<_>>>()?;
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// One iperf3 client run; returns Gbit/s received and the bytes received.
fn iperf(
    ns: &Netns,
    sys: &System,
    secs: u32,
    reverse: bool,
    cpus: Option<(usize, usize)>,
) -> Result<(f64, f64)> {
    let (mut cmd, port) = match sys.iperf_port {
        None => (ns.cmd("iperf3"), SERVER_PORT),
        Some(port) => (Command::new("iperf3"), port),
    };
    cmd.args(["-c", "127.0.0.1", "-J", "--connect-timeout", "5000"])
        .args(["-p", &port.to_string(), "-t", &secs.to_string()]);
    if reverse {
        cmd.arg("-R");
    }
    if let Some((c, s)) = cpus {
        cmd.args(["-A", &format!("{c},{s}")]);
    }
    let limit = Duration::from_secs(u64::from(secs) + 30);
    // The server takes a moment to accept the next test after one ends
    // ("the server is busy"): retry that, a few times.
    for attempt in 1.. {
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
            if err.contains("busy") && attempt < 5 {
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
            bail!("iperf3 to {} failed: {err}", sys.name);
        }
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
        return Ok((bits / 1e9, recv["bytes"].as_f64().unwrap_or(0.0)));
    }
    unreachable!("the retry loop returns")
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

/// Median of the element-wise ratios a[i] / b[i].
fn ratio(a: &[f64], b: &[f64]) -> f64 {
    median(&a.iter().zip(b).map(|(x, y)| x / y).collect::<Vec<_>>())
}

/// Starts the iperf3 server in the child and waits until it listens. Its
/// stdout is drained for as long as it runs.
fn iperf_server(ns: &Netns) -> Result<Proc> {
    let mut cmd = ns.cmd("iperf3");
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
    let mut cmd = ns.cmd(me);
    cmd.args(["bench-echo", "--bind", &format!("127.0.0.1:{ECHO_PORT}")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    spawn_ready(&mut cmd, "the echo server", load::ECHO_READY)
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces), from field 3.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/PID/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        f.get(i)
            .and_then(|s| s.parse::<f64>().ok())
            .context("malformed /proc/PID/stat")
    };
    // utime and stime are fields 14 and 15: indices 11 and 12 here.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((ticks(11)? + ticks(12)?) / hz)
}

/// Peak resident set size (VmHWM) in MiB.
fn peak_rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .context("no VmHWM in /proc/PID/status")
}

/// Latency of one system: p50, p99, p99.9, max in µs, or why not.
type Lat = Result<[f64; 4], String>;

/// Connection rate of one system: conn/s, p99 setup µs, failures, first
/// error.
type Rate = Result<(f64, f64, u64, Option<String>), String>;

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
            let netns = in_child.then(|| ns.path());
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
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let mut status = 0;
        // SAFETY: plain waitpid(2) for any child, not blocking.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid < 0 {
            return; // ECHILD: none left
        }
        if pid == 0 {
            if std::time::Instant::now() > deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn run_inner(args: &Args) -> Result<()> {
    crate::setup::run()?;
    catch_interrupts();
    let (reps, secs, round_trips, rate_secs) = if args.quick {
        (1, 2, 2000, 1)
    } else {
        (args.reps, args.duration, 20000, 5)
    };
    let cpus = if args.no_affinity { None } else { two_cpus() };
    let bin = build_forwarder()?;
    let me = std::env::current_exe().context("locating the xtask binary")?;

    // Other load skews every number: say how much there was.
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_string());
    let ns = Netns::new(&format!("fwd-bench-{}", std::process::id()))?;
    let _server = iperf_server(&ns)?;
    let _echo = echo_server(&ns, &me)?;

    let ports = free_ports(2 * (ENGINES.len() + 3))?;
    let mut ports = ports.into_iter();
    let mut next_port = || ports.next().context("out of free ports");
    let mut forwarders = Vec::new();
    let mut systems = vec![System {
        name: "direct".into(),
        label: "direct (no forwarder)".into(),
        iperf_port: None,
        echo_port: Some(ECHO_PORT),
        pid: None,
        failed: None,
    }];
    for mode in ENGINES {
        let (port, eport) = (next_port()?, next_port()?);
        let args = [
            "--child-netns".to_string(),
            ns.path(),
            "--mode".to_string(),
            mode.to_string(),
            "-p".to_string(),
            format!("127.0.0.1:{port}:{SERVER_PORT}"),
            "-p".to_string(),
            format!("127.0.0.1:{eport}:{ECHO_PORT}"),
        ];
        let name = format!("forwarder --mode {mode}");
        let fwd = Forwarder::start(&bin, &args, true, &name)?;
        if fwd.engine() != mode {
            bail!("{name} reports engine {:?}", fwd.engine());
        }
        systems.push(System {
            name: mode.into(),
            label: format!("forwarder `--mode {mode}`"),
            iperf_port: Some(port),
            echo_port: Some(eport),
            pid: fwd.pid(),
            failed: None,
        });
        forwarders.push((mode, fwd));
    }

    // The peers: each either runs or is reported with the reason it does not.
    let mut running_peers: Vec<Peer> = Vec::new();
    let peer_labels = [
        ("socat", "socat, fork + `ip netns exec` per connection"),
        ("rootlesskit", "RootlessKit 1.1 builtin port driver"),
        ("pasta", "pasta (passt), splice path"),
    ];
    for (name, label) in peer_labels {
        let (p, e) = (next_port()?, next_port()?);
        let started = if args.no_peers {
            Err(anyhow::anyhow!("--no-peers"))
        } else {
            eprintln!("bench: starting {name}");
            match name {
                "socat" => peers::socat(&ns, (p, SERVER_PORT), (e, ECHO_PORT)),
                "rootlesskit" => peers::rootlesskit(&me, (p, SERVER_PORT), (e, ECHO_PORT)),
                _ => peers::pasta(&ns, (p, SERVER_PORT), (e, ECHO_PORT)),
            }
        };
        let mut sys = System {
            name: name.into(),
            label: label.into(),
            iperf_port: Some(p),
            echo_port: Some(e),
            pid: None,
            failed: None,
        };
        match started {
            Ok(peer) => {
                sys.pid = peer.pid;
                sys.echo_port = peer.echo_port;
                running_peers.push(peer);
            }
            Err(e) => {
                eprintln!("bench: {name} not run: {e:#}");
                sys.failed = Some(format!("{e:#}"));
            }
        }
        systems.push(sys);
    }

    let cpu_before: BTreeMap<String, f64> = systems
        .iter()
        .filter_map(|s| Some((s.name.clone(), cpu_seconds(s.pid?).ok()?)))
        .collect();
    let mut bytes: BTreeMap<String, f64> = BTreeMap::new();

    eprintln!(
        "bench: {reps} repetitions x {} systems x 2 directions x {secs} s, after a warm-up",
        systems.iter().filter(|s| s.failed.is_none()).count()
    );
    for sys in systems.iter_mut().filter(|s| s.failed.is_none()) {
        check_interrupted()?;
        match iperf(&ns, sys, 1, false, cpus) {
            Ok((_, b)) => *bytes.entry(sys.name.clone()).or_default() += b,
            Err(e) if sys.is_peer() => sys.failed = Some(format!("warm-up: {e:#}")),
            Err(e) => return Err(e).with_context(|| format!("warm-up of {}", sys.name)),
        }
    }
    // results[system][direction] = Gbit/s per repetition
    let mut results: BTreeMap<String, [Vec<f64>; 2]> = BTreeMap::new();
    for rep in 1..=reps {
        for (d, dir) in DIRECTIONS.iter().enumerate() {
            for sys in systems.iter_mut().filter(|s| s.failed.is_none()) {
                check_interrupted()?;
                let (g, b) = match iperf(&ns, sys, secs, d == 1, cpus) {
                    Ok(r) => r,
                    Err(e) if sys.is_peer() => {
                        sys.failed = Some(format!("repetition {rep}, {dir}: {e:#}"));
                        continue;
                    }
                    Err(e) => {
                        return Err(e)
                            .with_context(|| format!("repetition {rep}, {dir}, {}", sys.name))
                    }
                };
                eprintln!(
                    "bench: rep {rep}/{reps} {dir:7} {:11} {g:6.2} Gbit/s",
                    sys.name
                );
                results.entry(sys.name.clone()).or_default()[d].push(g);
                *bytes.entry(sys.name.clone()).or_default() += b;
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    // CPU seconds per GB moved, over the throughput runs only.
    let mut cpu_per_gb: BTreeMap<String, f64> = BTreeMap::new();
    for sys in &systems {
        let (Some(pid), Some(before)) = (sys.pid, cpu_before.get(&sys.name)) else {
            continue;
        };
        if let (Ok(after), Some(b)) = (cpu_seconds(pid), bytes.get(&sys.name)) {
            if *b > 0.0 {
                cpu_per_gb.insert(sys.name.clone(), (after - before) / (b / 1e9));
            }
        }
    }

    // Latency: ping-pong per size, one system after the other.
    let mut latency: BTreeMap<usize, Vec<(String, Lat)>> = BTreeMap::new();
    for size in SIZES {
        for sys in &systems {
            check_interrupted()?;
            let r = on_echo(sys, &ns, move |addr| async move {
                load::ping_pong(addr, size, round_trips)
                    .await
                    .map(|rtts| load::latency_summary(&rtts))
            });
            match &r {
                Ok(l) => eprintln!(
                    "bench: ping-pong {size:4} B {:11} p50 {:.1} p99 {:.1} us",
                    sys.name, l[0], l[1]
                ),
                Err(e) => eprintln!("bench: ping-pong {size:4} B {:11} not run: {e}", sys.name),
            }
            latency.entry(size).or_default().push((sys.name.clone(), r));
        }
    }
    // Connection rate per number of clients.
    let mut rate: BTreeMap<usize, Vec<(String, Rate)>> = BTreeMap::new();
    for clients in CLIENTS {
        for sys in &systems {
            check_interrupted()?;
            let dur = Duration::from_secs(rate_secs);
            let r = on_echo(sys, &ns, move |addr| async move {
                load::conn_rate(addr, clients, dur).await.map(|c| {
                    let p99 = load::latency_summary(&c.setup_ns)[1];
                    (c.completed as f64 / c.secs, p99, c.failed, c.first_error)
                })
            });
            match &r {
                Ok((cps, p99, failed, _)) => eprintln!(
                    "bench: connect {clients:2} clients {:11} {cps:8.0} conn/s p99 {p99:.0} us, {failed} failed",
                    sys.name
                ),
                Err(e) => eprintln!("bench: connect {clients:2} clients {:11} not run: {e}", sys.name),
            }
            rate.entry(clients).or_default().push((sys.name.clone(), r));
            // Let TIME_WAIT and the forwarder settle between systems.
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    let peak_rss: BTreeMap<String, f64> = systems
        .iter()
        .filter_map(|s| Some((s.name.clone(), peak_rss_mib(s.pid?).ok()?)))
        .collect();

    // Final statistics of each forwarder, then a clean stop.
    std::thread::sleep(Duration::from_millis(500));
    let mut fwd_stats = Vec::new();
    for (mode, mut fwd) in forwarders {
        let stats = fwd.stats()?;
        fwd.stop()?;
        fwd_stats.push((mode, stats));
    }
    drop(running_peers);

    let report = Report {
        reps,
        secs,
        round_trips,
        rate_secs,
        cpus,
        systems: &systems,
        results: &results,
        fwd_stats: &fwd_stats,
        load,
        latency: &latency,
        rate: &rate,
        cpu_per_gb: &cpu_per_gb,
        peak_rss: &peak_rss,
        bytes: &bytes,
    };
    let (md, json) = report.render()?;
    print!("{md}");
    let dir = root().join("bench/results");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    write_atomic(&dir.join("latest.md"), md.as_bytes())?;
    let json = serde_json::to_string_pretty(&json).context("serializing the results")?;
    write_atomic(&dir.join("latest.json"), format!("{json}\n").as_bytes())?;
    write_atomic(&dir.join("latest.svg"), report.svg().as_bytes())?;
    eprintln!(
        "bench: wrote {0}/latest.md, {0}/latest.json and {0}/latest.svg",
        dir.display()
    );
    Ok(())
}

impl System {
    fn is_peer(&self) -> bool {
        !matches!(self.name.as_str(), "direct" | "ebpf" | "splice" | "copy")
    }
}

/// Writes via a temporary file and a rename, so an interrupted run leaves
/// the previous results whole.
fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", path.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

struct Report<'a> {
    reps: u32,
    secs: u32,
    round_trips: usize,
    rate_secs: u64,
    cpus: Option<(usize, usize)>,
    systems: &'a [System],
    results: &'a BTreeMap<String, [Vec<f64>; 2]>,
    fwd_stats: &'a [(&'static str, Value)],
    /// /proc/loadavg before the first run.
    load: String,
    latency: &'a BTreeMap<usize, Vec<(String, Lat)>>,
    rate: &'a BTreeMap<usize, Vec<(String, Rate)>>,
    cpu_per_gb: &'a BTreeMap<String, f64>,
    peak_rss: &'a BTreeMap<String, f64>,
    bytes: &'a BTreeMap<String, f64>,
}

fn first_line(mut cmd: Command) -> String {
    output(&mut cmd)
        .ok()
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".to_string())
}

/// A reason fit for one table cell.
fn cell(reason: &str) -> String {
    let r = reason.replace(['|', '\n'], " ");
    let r: String = r.chars().take(300).collect();
    format!("not run: {r}")
}

impl Report<'_> {
    fn label(&self, name: &str) -> String {
        self.systems
            .iter()
            .find(|s| s.name == name)
            .map_or_else(|| name.to_string(), |s| s.label.clone())
    }

    fn render(&self) -> Result<(String, Value)> {
        let (reps, secs) = (self.reps, self.secs);
        let mut date = Command::new("date");
        date.args(["-u", "+%Y-%m-%d %H:%M:%S UTC"]);
        let date = first_line(date);
        let mut uname = Command::new("uname");
        uname.arg("-r");
        let kernel = first_line(uname);
        let mut iperf = Command::new("iperf3");
        iperf.arg("--version");
        let iperf = first_line(iperf);
        let ncpu = std::thread::available_parallelism().map_or(0, |n| n.get());
        let command = std::iter::once("cargo xtask".to_string())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" ");
        let pinning = match self.cpus {
            Some((c, s)) => {
                format!("iperf3 client pinned to CPU {c}, server to CPU {s} (`-A {c},{s}`)")
            }
            None => "no CPU pinning".to_string(),
        };
        let direct = self.results.get("direct").context("no direct results")?;

        let mut md = String::new();
        writeln!(
            md,
            "# Throughput: forwarder engines against direct loopback\n"
        )?;
        writeln!(md, "- date: {date}; kernel {kernel}; {ncpu} CPUs; {iperf}")?;
        writeln!(
            md,
            "- load average (1, 5, 15 min) before the first run: {}",
            self.load
        )?;
        writeln!(md, "- command: `{command}`")?;
        writeln!(
            md,
            "- iperf3, one TCP stream, {secs} s per run, {reps} repetitions; the systems \
             interleaved in each repetition and direction; {pinning}; all on loopback"
        )?;
        writeln!(
            md,
            "- direct: client and server both in the child namespace; engines: one \
             forwarder per engine, kept for all repetitions, publishing 127.0.0.1:PORT \
             into the child; forward = the client (parent) sends, reverse = `-R`"
        )?;
        writeln!(
            md,
            "- peers, in the host namespace on 127.0.0.1:PORT: socat (`TCP-LISTEN:PORT,fork` + \
             `EXEC:ip netns exec CHILD socat STDIO TCP\\:127.0.0.1\\:5201`, two processes started \
             per connection); RootlessKit as user fwdtest (slirp4netns, builtin port driver, \
             its servers in its own child namespace); pasta `--netns CHILD -t 127.0.0.1/PORT:5201`"
        )?;
        writeln!(
            md,
            "- Gbit/s: median (min-max) of iperf3's received rate; x direct: median of the \
             per-repetition ratios to direct\n"
        )?;
        writeln!(
            md,
            "| system | forward Gbit/s | forward x direct | reverse Gbit/s | reverse x direct |"
        )?;
        writeln!(md, "|---|---|---|---|---|")?;
        let mut systems = serde_json::Map::new();
        for sys in self.systems {
            let mut entry = serde_json::Map::new();
            let mut row = format!("| {} |", sys.label);
            match self.results.get(&sys.name) {
                Some(r) if !r[0].is_empty() && !r[1].is_empty() => {
                    for (d, dir) in DIRECTIONS.iter().enumerate() {
                        let (lo, hi) = min_max(&r[d]);
                        let (med, x) = (median(&r[d]), ratio(&r[d], &direct[d]));
                        write!(row, " {med:.1} ({lo:.1}-{hi:.1}) | {x:.2} |")?;
                        entry.insert(
                            dir.to_string(),
                            json!({"gbit_per_s": r[d], "median": med, "min": lo, "max": hi,
                                   "ratio_to_direct": x}),
                        );
                    }
                }
                _ => {
                    let why = sys.failed.as_deref().unwrap_or("no results");
                    write!(row, " {} | | | |", cell(why))?;
                }
            }
            if let Some(why) = &sys.failed {
                entry.insert("not_run".into(), json!(why));
            }
            writeln!(md, "{row}")?;
            systems.insert(sys.name.clone(), Value::Object(entry));
        }
        let mut splice_copy = serde_json::Map::new();
        if let (Some(s), Some(c)) = (self.results.get("splice"), self.results.get("copy")) {
            let f = ratio(&s[0], &c[0]);
            let r = ratio(&s[1], &c[1]);
            writeln!(
                md,
                "\nsplice / copy (median of per-repetition ratios): forward {f:.2}, reverse {r:.2}"
            )?;
            splice_copy.insert("forward".into(), json!(f));
            splice_copy.insert("reverse".into(), json!(r));
        }
        let failed: Vec<_> = self
            .systems
            .iter()
            .filter_map(|s| Some((s, s.failed.as_ref()?)))
            .collect();
        if !failed.is_empty() {
            writeln!(md, "\nNot run, in full:\n")?;
            for (s, why) in failed {
                writeln!(md, "- {}: {}", s.name, why.replace('\n', " "))?;
            }
        }
        writeln!(
            md,
            "\nBytes each forwarder carried, by data path (its final statistics):\n"
        )?;
        for (mode, st) in self.fwd_stats.iter() {
            let paths = st["bytes_by_path"]
                .as_object()
                .map(|p| {
                    p.iter()
                        .map(|(k, v)| format!("{k} {:.2} GB", v.as_f64().unwrap_or(f64::NAN) / 1e9))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_else(|| "none reported".to_string());
            writeln!(
                md,
                "- {mode}: {paths}; {} connections, {} active at the end",
                st["connections"], st["active"]
            )?;
        }

        // Latency.
        writeln!(
            md,
            "\n## Request/response latency\n\n\
             One connection, TCP_NODELAY, a message of SIZE bytes echoed back, {} round trips \
             after 100 unrecorded; the load generator is a single-threaded tokio client \
             (in the child for direct), the echo server `xtask bench-echo` in the child \
             (RootlessKit: in its own child). Microseconds.\n",
            self.round_trips
        )?;
        writeln!(
            md,
            "| system | size | p50 us | p99 us | p99.9 us | max us |"
        )?;
        writeln!(md, "|---|---|---|---|---|---|")?;
        let mut lat_json = serde_json::Map::new();
        for (size, rows) in self.latency {
            let mut m = serde_json::Map::new();
            for (name, r) in rows {
                match r {
                    Ok(l) => {
                        writeln!(
                            md,
                            "| {} | {size} B | {:.1} | {:.1} | {:.1} | {:.1} |",
                            self.label(name),
                            l[0],
                            l[1],
                            l[2],
                            l[3]
                        )?;
                        m.insert(
                            name.clone(),
                            json!({"p50_us": l[0], "p99_us": l[1], "p999_us": l[2], "max_us": l[3]}),
                        );
                    }
                    Err(e) => {
                        writeln!(
                            md,
                            "| {} | {size} B | {} | | | |",
                            self.label(name),
                            cell(e)
                        )?;
                        m.insert(name.clone(), json!({"not_run": e}));
                    }
                }
            }
            lat_json.insert(format!("{size}"), Value::Object(m));
        }

        // Connection rate.
        writeln!(
            md,
            "\n## Connection rate\n\n\
             Each client in a loop for {} s: connect, 1-byte request, 1-byte answer, the server \
             closes, the client closes. setup = connect() to the answer byte. socat: each \
             connection's EOF reaches the client only when the inner socat exits, 0.5 s after \
             the server closed (socat's default `-t 0.5`), which bounds its rate.\n",
            self.rate_secs
        )?;
        writeln!(md, "| system | clients | conn/s | p99 setup us | failed |")?;
        writeln!(md, "|---|---|---|---|---|")?;
        let mut rate_json = serde_json::Map::new();
        for (clients, rows) in self.rate {
            let mut m = serde_json::Map::new();
            for (name, r) in rows {
                match r {
                    Ok((cps, p99, failed, first)) => {
                        let f = match first {
                            Some(e) if *failed > 0 => {
                                format!("{failed} (first: {})", e.replace('|', " "))
                            }
                            _ => failed.to_string(),
                        };
                        writeln!(
                            md,
                            "| {} | {clients} | {cps:.0} | {p99:.0} | {f} |",
                            self.label(name)
                        )?;
                        m.insert(
                            name.clone(),
                            json!({"conn_per_s": cps, "p99_setup_us": p99, "failed": failed,
                                   "first_error": first}),
                        );
                    }
                    Err(e) => {
                        writeln!(md, "| {} | {clients} | {} | | |", self.label(name), cell(e))?;
                        m.insert(name.clone(), json!({"not_run": e}));
                    }
                }
            }
            rate_json.insert(format!("{clients}"), Value::Object(m));
        }

        // Resources.
        writeln!(
            md,
            "\n## Resources of the process that carries the bytes\n\n\
             CPU: utime+stime over the throughput runs (warm-ups included) per GB iperf3 \
             received through it; peak RSS: VmHWM after all workloads. socat starts \
             processes per connection and is not measured; RootlessKit: its parent process \
             (slirp4netns not included). ebpf: the redirect runs in softirq and kernel \
             worker context, which is not charged to the forwarder, so its figure counts \
             only the controller.\n"
        )?;
        writeln!(md, "| system | GB moved | CPU s per GB | peak RSS MiB |")?;
        writeln!(md, "|---|---|---|---|")?;
        let mut res_json = serde_json::Map::new();
        for sys in self.systems.iter().filter(|s| s.name != "direct") {
            let gb = self.bytes.get(&sys.name).map(|b| b / 1e9);
            let cpu = self.cpu_per_gb.get(&sys.name);
            let rss = self.peak_rss.get(&sys.name);
            let show = |v: Option<f64>, p: usize| {
                v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.p$}"))
            };
            writeln!(
                md,
                "| {} | {} | {} | {} |",
                sys.label,
                show(gb, 2),
                show(cpu.copied(), 3),
                show(rss.copied(), 1)
            )?;
            res_json.insert(
                sys.name.clone(),
                json!({"gb_moved": gb, "cpu_s_per_gb": cpu, "peak_rss_mib": rss, "pid": sys.pid}),
            );
        }

        let json = json!({
            "date": date,
            "kernel": kernel,
            "cpus": ncpu,
            "iperf3": iperf,
            "command": command,
            "seconds_per_run": secs,
            "repetitions": reps,
            "iperf3_affinity": self.cpus.map(|(c, s)| [c, s]),
            "forwarders_kept_across_repetitions": true,
            "systems": systems,
            "splice_over_copy": splice_copy,
            "load_average_before": self.load,
            "forwarder_stats": self
                .fwd_stats
                .iter()
                .map(|(m, st)| (m.to_string(), st.clone()))
                .collect::<serde_json::Map<_, _>>(),
            "latency": {"round_trips": self.round_trips, "by_size_bytes": lat_json},
            "connection_rate": {"seconds": self.rate_secs, "by_clients": rate_json},
            "resources": res_json,
        });
        Ok((md, json))
    }

    /// Bar charts: throughput (forward, reverse medians) and 1-byte
    /// latency (p50, p99) per system.
    fn svg(&self) -> String {
        let thr: Vec<(String, Vec<f64>)> = self
            .systems
            .iter()
            .filter_map(|s| {
                let r = self.results.get(&s.name)?;
                (!r[0].is_empty() && !r[1].is_empty())
                    .then(|| (s.name.clone(), vec![median(&r[0]), median(&r[1])]))
            })
            .collect();
        let lat: Vec<(String, Vec<f64>)> = self
            .latency
            .get(&1)
            .map(|rows| {
                rows.iter()
                    .filter_map(|(n, r)| {
                        Some((n.clone(), r.as_ref().ok().map(|l| vec![l[0], l[1]])?))
                    })
                    .collect()
            })
            .unwrap_or_default();
        crate::chart::svg(&[
            crate::chart::Panel {
                title: "Throughput, iperf3 one stream (Gbit/s, median)",
                series: &["forward", "reverse"],
                rows: &thr,
            },
            crate::chart::Panel {
                title: "Ping-pong latency, 1 byte (microseconds)",
                series: &["p50", "p99"],
                rows: &lat,
            },
        ])
    }
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
    }
}
