//! `cargo xtask bench --profile`: where the time goes when the ebpf engine
//! misses a target, written to `bench/results/profile.md`.
//!
//! For each workload (one-stream bulk each way, 1-byte ping-pong, 32-client
//! connection rate) the ebpf forwarder and direct loopback run once more
//! under `perf record -e cpu-clock -g` (a software clock, so it works in
//! VMs without hardware counters): system-wide for bulk and ping-pong, so
//! kernel workers and softirq are seen; the forwarder's process alone for
//! the connection rate. The report gives the share of samples per command
//! and the hottest symbols, each CPU's busy share (/proc/stat) and, with
//! `kernel.bpf_stats_enabled` switched on for the duration (and restored),
//! how often the BPF programs ran and for how long.

use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use super::{iperf, on_echo, Placement, Plan, System};
use crate::load;
use crate::util::{output_within, Netns, Proc};
use forwarder_testkit::procfs::{self as sample, CpuTimes};

/// Kernel functions that mark the stages of the data path: the sending
/// and receiving system calls, the TCP receive, the verdict, the psock
/// worker that sends redirected skbs, and the copies to and from user
/// memory.
const STAGES: &[&str] = &[
    "__x64_sys_sendto",
    "__x64_sys_write",
    "__x64_sys_read",
    "__x64_sys_recvfrom",
    "tcp_v4_rcv",
    "sk_psock_verdict_recv",
    "sk_psock_backlog",
    "tcp_sendmsg_locked",
    "_copy_from_iter",
    "_copy_to_iter",
    "process_backlog",
];

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Turns on BPF run-time statistics; restores the old value when dropped.
struct BpfStats {
    old: String,
}

impl BpfStats {
    fn enable() -> Result<Self> {
        let old = std::fs::read_to_string(STATS_SYSCTL)
            .with_context(|| format!("reading {STATS_SYSCTL} (kernel 5.1+)"))?;
        std::fs::write(STATS_SYSCTL, "1").with_context(|| format!("writing {STATS_SYSCTL}"))?;
        Ok(BpfStats {
            old: old.trim().to_string(),
        })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(STATS_SYSCTL, &self.old);
    }
}

/// A running `perf record`, stopped with SIGINT.
struct Perf {
    proc: Proc,
    data: String,
}

impl Perf {
    /// `target`: `None` for all CPUs, or one process.
    fn start(target: Option<u32>, tag: &str) -> Result<Self> {
        let data = format!("/tmp/fwd-bench-perf-{}-{tag}.data", std::process::id());
        let mut cmd = Command::new("perf");
        cmd.args([
            "record",
            "-q",
            "-e",
            "cpu-clock",
            "-F",
            "999",
            "-g",
            "-o",
            &data,
        ]);
        match target {
            None => cmd.arg("-a"),
            Some(pid) => cmd.args(["-p", &pid.to_string()]),
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let proc = Proc::spawn(&mut cmd, "perf record")?;
        // perf needs a moment before it samples, and says nothing when it
        // starts (-q): a fixed pause, which at worst loses the first
        // samples of the profile.
        std::thread::sleep(Duration::from_millis(300));
        Ok(Perf { proc, data })
    }

    /// Stops recording; returns the report's lines for `sort` (e.g.
    /// "comm", "sym"), entries above `limit` percent, at most `top`.
    fn finish(mut self) -> Result<Recorded> {
        use std::os::unix::process::ExitStatusExt as _;
        let st = self.proc.stop(libc::SIGINT, Duration::from_secs(30))?;
        // perf writes its data on SIGINT, then ends by that signal.
        if !st.success() && st.signal() != Some(libc::SIGINT) {
            bail!("perf record ended with {st}");
        }
        Ok(Recorded { data: self.data })
    }
}

struct Recorded {
    data: String,
}

impl Recorded {
    /// The report's lines for `sort` (e.g. "comm", "sym"), self time,
    /// entries above `limit` percent, at most `top`.
    fn report(&self, sort: &str, limit: f64, top: usize) -> Result<String> {
        let lines = self.lines(&["--no-children", "--sort", sort])?;
        Ok(lines
            .into_iter()
            .filter(|l| percent(l) >= limit)
            .take(top)
            .collect::<Vec<_>>()
            .join("\n"))
    }

    /// Time inside each system call, callees included, above `limit`
    /// percent: where a process's kernel time goes, call by call.
    fn syscalls(&self, limit: f64) -> Result<String> {
        let lines = self.lines(&["--children", "--sort", "sym"])?;
        Ok(lines
            .into_iter()
            .filter(|l| l.contains("__x64_sys_") && percent(l) >= limit)
            .collect::<Vec<_>>()
            .join("\n"))
    }

    /// Time inside each of the kernel functions `syms`, callees included.
    fn inclusive(&self, syms: &[&str]) -> Result<String> {
        let lines = self.lines(&["--children", "--sort", "sym"])?;
        Ok(lines
            .into_iter()
            .filter(|l| {
                l.split_whitespace()
                    .last()
                    .is_some_and(|name| syms.contains(&name))
            })
            .collect::<Vec<_>>()
            .join("\n"))
    }

    fn lines(&self, args: &[&str]) -> Result<Vec<String>> {
        let mut cmd = Command::new("perf");
        cmd.args(["report", "-i", &self.data, "--stdio", "-g", "none"])
            .args(args);
        let out = output_within(&mut cmd, Duration::from_secs(120))?;
        if !out.status.success() {
            bail!("perf report failed: {}", out.stderr.trim());
        }
        Ok(out
            .stdout
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| l.trim_end().to_string())
            .collect())
    }
}

/// The first percentage on a perf report line.
fn percent(line: &str) -> f64 {
    line.split_whitespace()
        .next()
        .and_then(|f| f.strip_suffix('%'))
        .and_then(|f| f.parse().ok())
        .unwrap_or(0.0)
}

impl Drop for Recorded {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.data);
        let _ = std::fs::remove_file(format!("{}.old", self.data));
    }
}

/// One workload run under a system-wide `perf record`, with the machine's
/// CPU use and the BPF statistics of process `pid` before it.
struct Profiled {
    rec: Recorded,
    secs: f64,
    cpu: sample::CpuUse,
    bpf0: sample::BpfReading,
}

impl Profiled {
    fn run<T>(pid: u32, tag: &str, work: impl FnOnce() -> Result<T>) -> Result<(Self, T)> {
        let bpf0 = sample::bpf_programs(pid)?;
        let cpu0 = CpuTimes::now()?;
        let perf = Perf::start(None, tag)?;
        let t0 = Instant::now();
        let out = work()?;
        let rec = perf.finish()?;
        let secs = t0.elapsed().as_secs_f64();
        let cpu = cpu0.until(&CpuTimes::now()?);
        Ok((
            Profiled {
                rec,
                secs,
                cpu,
                bpf0,
            },
            out,
        ))
    }
}

impl Profiled {
    /// The BPF statistics of `pid` (if given), then the samples by command
    /// and the hottest symbols.
    fn write(&self, md: &mut String, pid: Option<u32>, bytes: f64) -> Result<()> {
        if let Some(pid) = pid {
            writeln!(md, "{}", bpf_delta(pid, &self.bpf0, self.secs, bytes)?)?;
        }
        block(md, "Samples by command", &self.rec.report("comm", 1.0, 12)?)?;
        block(
            md,
            "The data path's stages, callees included (all CPUs)",
            &self.rec.inclusive(STAGES)?,
        )?;
        block(
            md,
            "Hottest symbols",
            &self.rec.report("comm,sym", 1.5, 25)?,
        )
    }
}

/// The BPF programs' run counts and time between two readings.
fn bpf_delta(pid: u32, before: &sample::BpfReading, secs: f64, bytes: f64) -> Result<String> {
    let after = sample::bpf_programs(pid)?;
    let mut s = String::new();
    for (id, (kind, st)) in &after {
        let (c0, t0) = before
            .get(id)
            .map_or((0, 0), |(_, b)| (b.run_cnt, b.run_time_ns));
        let (cnt, ns) = (
            st.run_cnt - c0.min(st.run_cnt),
            st.run_time_ns - t0.min(st.run_time_ns),
        );
        if cnt == 0 {
            continue;
        }
        writeln!(
            s,
            "- program {id} ({kind}): {cnt} runs, {:.0} ns per run, {:.1} ms in all = {:.2}% of one CPU over {secs:.1} s{}",
            ns as f64 / cnt as f64,
            ns as f64 / 1e6,
            ns as f64 / 1e9 / secs * 100.0,
            if bytes > 0.0 {
                format!(", {:.0} bytes per run", bytes / cnt as f64)
            } else {
                String::new()
            }
        )?;
    }
    if s.is_empty() {
        s.push_str("- no BPF program ran\n");
    }
    Ok(s)
}

fn busy(cpu: &sample::CpuUse) -> String {
    cpu.per_cpu_busy
        .iter()
        .enumerate()
        .map(|(i, f)| format!("CPU{i} {:.0}%", f * 100.0))
        .collect::<Vec<_>>()
        .join(", ")
}

fn block(md: &mut String, title: &str, body: &str) -> Result<()> {
    writeln!(md, "{title}:\n\n```\n{body}\n```\n")?;
    Ok(())
}

/// Where the hand-written part of `profile.md` starts; `--profile` keeps
/// everything from this line on when it rewrites the file.
pub const KEPT_MARKER: &str = "<!-- kept by `cargo xtask bench --profile` -->";

pub fn run(plan: &Plan, ns: &Netns, systems: &[System]) -> Result<String> {
    let mut md = String::new();
    writeln!(md, "# Profile of the ebpf engine\n")?;
    let kernel = crate::util::kernel_release().unwrap_or_default();
    writeln!(
        md,
        "Made by `{}` on {}, kernel {}; `perf record -e cpu-clock -F 999 -g`, \
         BPF run-time statistics from /proc/PID/fdinfo with kernel.bpf_stats_enabled=1 for the \
         duration. Percentages are shares of all samples (idle CPUs appear as `swapper`).\n",
        std::iter::once("cargo xtask".to_string())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" "),
        crate::util::UtcTime::now().to_minute(),
        kernel.trim()
    )?;
    let find = |n: &str| systems.iter().find(|s| s.name == n && s.failed.is_none());
    let (Some(ebpf), Some(direct)) = (find("ebpf"), find("direct")) else {
        writeln!(md, "not run: the ebpf forwarder or direct is not available")?;
        return Ok(md);
    };
    let pid = ebpf.pid.context("the ebpf forwarder's PID")?;
    if !crate::util::has_tool("perf") {
        writeln!(md, "not run: perf is not installed (Debian: linux-perf)")?;
        return Ok(md);
    }
    let _stats = BpfStats::enable()?;
    bulk(&mut md, plan, ns, pid, [direct, ebpf])?;
    ping_pong(&mut md, plan, ns, pid, [direct, ebpf])?;
    conn_rate(&mut md, plan, ns, pid, ebpf)?;
    Ok(md)
}

/// Bulk, one stream, each direction, through `systems` (direct, ebpf);
/// `pid` is the ebpf forwarder's.
fn bulk(md: &mut String, plan: &Plan, ns: &Netns, pid: u32, systems: [&System; 2]) -> Result<()> {
    for (d, dir) in ["forward", "reverse"].iter().enumerate() {
        writeln!(md, "## Bulk, one stream, {dir}\n")?;
        for sys in systems {
            eprintln!("bench: profiling {dir} bulk through {}", sys.name);
            let (run, (gbit, bytes)) =
                Profiled::run(pid, &format!("bulk-{d}-{}", sys.name), || {
                    iperf(
                        ns,
                        sys,
                        plan.secs,
                        1,
                        d == 1,
                        Placement::Split.affinity(plan.cpus),
                    )
                })?;
            writeln!(
                md,
                "### {}: {gbit:.1} Gbit/s; busy {}\n",
                sys.label,
                busy(&run.cpu)
            )?;
            run.write(md, (sys.name == "ebpf").then_some(pid), bytes)?;
        }
    }
    Ok(())
}

/// Ping-pong, 1 byte, through `systems` (direct, ebpf).
fn ping_pong(
    md: &mut String,
    plan: &Plan,
    ns: &Netns,
    pid: u32,
    systems: [&System; 2],
) -> Result<()> {
    writeln!(md, "## Ping-pong, 1 byte\n")?;
    for sys in systems {
        eprintln!("bench: profiling ping-pong through {}", sys.name);
        let n = plan.round_trips;
        let (run, lat) = Profiled::run(pid, &format!("pingpong-{}", sys.name), || {
            on_echo(sys, ns, move |addr| async move {
                load::ping_pong(addr, 1, n)
                    .await
                    .map(|r| load::latency_summary(&r))
            })
            .map_err(anyhow::Error::msg)
        })?;
        writeln!(
            md,
            "### {}: p50 {:.1} us, p99 {:.1} us over {n} round trips; busy {}\n",
            sys.label,
            lat[0],
            lat[1],
            busy(&run.cpu)
        )?;
        run.write(md, (sys.name == "ebpf").then_some(pid), 0.0)?;
    }
    Ok(())
}

/// Connection rate, 32 clients, through the ebpf forwarder: its own time.
fn conn_rate(md: &mut String, plan: &Plan, ns: &Netns, pid: u32, ebpf: &System) -> Result<()> {
    writeln!(
        md,
        "## Connection rate, 32 clients: the ebpf forwarder's own time\n"
    )?;
    eprintln!("bench: profiling the connection rate through ebpf");
    let cpu_before = sample::cpu_seconds(pid)?;
    let perf = Perf::start(Some(pid), "rate-ebpf")?;
    let dur = Duration::from_secs(plan.rate_secs.max(2));
    let c = on_echo(ebpf, ns, move |addr| async move {
        load::conn_rate(addr, None, 32, dur).await
    })
    .map_err(anyhow::Error::msg)?;
    let rec = perf.finish()?;
    let fwd_cpu = sample::cpu_seconds(pid)? - cpu_before;
    writeln!(
        md,
        "{} connections in {:.1} s ({:.0}/s); the forwarder used {:.2} CPU s, {:.0} us per connection\n",
        c.completed,
        c.secs,
        c.completed as f64 / c.secs,
        fwd_cpu,
        fwd_cpu / c.completed.max(1) as f64 * 1e6
    )?;
    block(
        md,
        "Time inside each system call, callees included (forwarder threads)",
        &rec.syscalls(1.0)?,
    )?;
    block(
        md,
        "Hottest symbols (forwarder threads)",
        &rec.report("comm,dso,sym", 1.0, 30)?,
    )?;
    Ok(())
}
