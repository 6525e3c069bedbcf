//! `cargo xtask bench`: bulk throughput with iperf3, one TCP stream, each
//! direction, for direct loopback inside the child namespace (no
//! forwarder: the ceiling) and for the forwarder with each engine.
//!
//! Method:
//! - one throw-away child namespace `fwd-bench-<pid>` with
//!   `iperf3 -s -B 127.0.0.1 -p 5201` inside it;
//! - *direct*: the iperf3 client inside the child too, to 127.0.0.1:5201;
//! - *ebpf*, *splice*, *copy*: one forwarder per engine (`--mode ...`) in
//!   this namespace publishing `127.0.0.1:<free port>:5201` into the child,
//!   the client here, to 127.0.0.1:<port>. Each forwarder is started once,
//!   before the first run, and kept for all repetitions (a fresh process
//!   per run would measure start-up too; a leak or slowdown over time shows
//!   up as spread instead). Its `ready` line must name the engine asked for;
//!   its final statistics (bytes by data path) go into the report;
//! - forward = the client sends (parent -> child through the forwarder),
//!   reverse = `iperf3 -R` (the server in the child sends);
//! - the systems are interleaved (direct, ebpf, splice, copy, direct, ...)
//!   in each repetition and direction, so drift of the machine hits all
//!   alike, after one unrecorded 1-s warm-up run of each;
//! - unless `--no-affinity`, iperf3 pins its client and its server to two
//!   different CPUs (`-A a,b`) in every run, so scheduler placement does
//!   not decide results; the forwarder is not pinned;
//! - throughput is iperf3's `end.sum_received.bits_per_second`; reported as
//!   median and min-max in Gbit/s, and as the ratio to direct: the median
//!   of the per-repetition ratios (system / direct of the same repetition
//!   and direction); likewise splice / copy.
//!
//! Prints a Markdown report and writes it to `bench/results/latest.md`,
//! the raw numbers to `bench/results/latest.json`. Every process it starts
//! is stopped by its PID; all traffic stays on loopback.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

use crate::util::{
    build_forwarder, catch_interrupts, check_interrupted, die_with_parent, output, output_within,
    root, Forwarder, Netns, Proc,
};

#[derive(clap::Args)]
pub struct Args {
    /// Repetitions of every system and direction.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    reps: u32,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    duration: u32,
    /// A smoke version: 2 repetitions of 2 s (overrides --reps/--duration).
    #[arg(long)]
    quick: bool,
    /// Do not pin the iperf3 client and server to CPUs.
    #[arg(long)]
    no_affinity: bool,
}

/// The port iperf3 listens on in the child.
const SERVER_PORT: u16 = 5201;
/// The engines, in the order they run after direct.
const ENGINES: [&str; 3] = ["ebpf", "splice", "copy"];
const DIRECTIONS: [&str; 2] = ["forward", "reverse"];

/// A system under test: `None` is direct, else an engine and its port.
struct System {
    name: &'static str,
    engine: Option<(&'static str, u16)>,
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

/// One iperf3 client run; returns Gbit/s received.
fn iperf(
    ns: &Netns,
    sys: &System,
    secs: u32,
    reverse: bool,
    cpus: Option<(usize, usize)>,
) -> Result<f64> {
    let (mut cmd, port) = match sys.engine {
        None => (ns.cmd("iperf3"), SERVER_PORT),
        Some((_, port)) => (Command::new("iperf3"), port),
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
        return v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .map(|b| b / 1e9)
            .with_context(|| {
                format!(
                    "no end.sum_received.bits_per_second from iperf3 to {}",
                    sys.name
                )
            });
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

pub fn run(args: &Args) -> Result<()> {
    crate::setup::run()?;
    catch_interrupts();
    let (reps, secs) = if args.quick {
        (2, 2)
    } else {
        (args.reps, args.duration)
    };
    let cpus = if args.no_affinity { None } else { two_cpus() };
    let bin = build_forwarder()?;

    // Other load skews every number: say how much there was.
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_string());
    let ns = Netns::new(&format!("fwd-bench-{}", std::process::id()))?;
    let _server = iperf_server(&ns)?;

    let ports = free_ports(ENGINES.len())?;
    let mut forwarders = Vec::new();
    let mut systems = vec![System {
        name: "direct",
        engine: None,
    }];
    for (mode, port) in ENGINES.into_iter().zip(ports) {
        let args = [
            "--child-netns".to_string(),
            ns.path(),
            "--mode".to_string(),
            mode.to_string(),
            "-p".to_string(),
            format!("127.0.0.1:{port}:{SERVER_PORT}"),
        ];
        let name = format!("forwarder --mode {mode}");
        let fwd = Forwarder::start(&bin, &args, true, &name)?;
        if fwd.engine() != mode {
            bail!("{name} reports engine {:?}", fwd.engine());
        }
        forwarders.push((mode, fwd));
        systems.push(System {
            name: mode,
            engine: Some((mode, port)),
        });
    }

    eprintln!(
        "bench: {reps} repetitions x {} systems x 2 directions x {secs} s, after a warm-up",
        systems.len()
    );
    for sys in &systems {
        check_interrupted()?;
        iperf(&ns, sys, 1, false, cpus).with_context(|| format!("warm-up of {}", sys.name))?;
    }
    // results[system][direction] = Gbit/s per repetition
    let mut results: BTreeMap<&str, [Vec<f64>; 2]> = BTreeMap::new();
    for rep in 1..=reps {
        for (d, dir) in DIRECTIONS.iter().enumerate() {
            for sys in &systems {
                check_interrupted()?;
                let g = iperf(&ns, sys, secs, d == 1, cpus)
                    .with_context(|| format!("repetition {rep}, {dir}, {}", sys.name))?;
                eprintln!(
                    "bench: rep {rep}/{reps} {dir:7} {:6} {g:6.2} Gbit/s",
                    sys.name
                );
                results.entry(sys.name).or_default()[d].push(g);
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    // Final statistics of each forwarder, then a clean stop.
    std::thread::sleep(Duration::from_millis(500));
    let mut fwd_stats = Vec::new();
    for (mode, mut fwd) in forwarders {
        let stats = fwd.stats()?;
        fwd.stop()?;
        fwd_stats.push((mode, stats));
    }

    let report = Report {
        reps,
        secs,
        cpus,
        systems: &systems,
        results: &results,
        fwd_stats: &fwd_stats,
        load,
    };
    let (md, json) = report.render()?;
    print!("{md}");
    let dir = root().join("bench/results");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    write_atomic(&dir.join("latest.md"), md.as_bytes())?;
    let json = serde_json::to_string_pretty(&json).context("serializing the results")?;
    write_atomic(&dir.join("latest.json"), format!("{json}\n").as_bytes())?;
    eprintln!(
        "bench: wrote {0}/latest.md and {0}/latest.json",
        dir.display()
    );
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

struct Report<'a> {
    reps: u32,
    secs: u32,
    cpus: Option<(usize, usize)>,
    systems: &'a [System],
    results: &'a BTreeMap<&'a str, [Vec<f64>; 2]>,
    fwd_stats: &'a [(&'static str, Value)],
    /// /proc/loadavg before the first run.
    load: String,
}

fn first_line(mut cmd: Command) -> String {
    output(&mut cmd)
        .ok()
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".to_string())
}

impl Report<'_> {
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
            let r = self.results.get(sys.name).context("missing results")?;
            let label = match sys.engine {
                None => "direct (no forwarder)".to_string(),
                Some((mode, _)) => format!("forwarder `--mode {mode}`"),
            };
            let mut row = format!("| {label} |");
            let mut entry = serde_json::Map::new();
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
            writeln!(md, "{row}")?;
            systems.insert(sys.name.to_string(), Value::Object(entry));
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
        });
        Ok((md, json))
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
