//! `cargo xtask bench --profile`, connection setup: where one connection's
//! time goes, step by step, for direct loopback and the forwarder's
//! set-ups (root and rootless, source preservation on, applied and off,
//! each engine), written into `bench/results/profile.md`.
//!
//! Method: one client (this process) in a loop of connect, 1-byte request,
//! 1-byte answer, close, against the bench's echo server, so connections
//! never overlap and every system call of the processes involved belongs
//! to the connection in flight. A bpftrace program on the syscall
//! tracepoints of four processes (the client, the forwarder, its dial
//! agent, the echo servers) notes when each step's system call happens:
//!
//! - the client's `connect()`;
//! - the forwarder's `accept4()` returning the connection;
//! - the request to the agent (`sendmsg`), and the agent reading it;
//! - the `connect()` in the child (by the agent or the forwarder);
//! - the server's `accept4()`;
//! - the agent sending the socket back, the forwarder receiving it;
//! - the forwarder's first relay call (`splice`, `recvfrom`, or a BPF map
//!   update for the ebpf engine);
//! - the server reading the request byte;
//! - the client reading the answer;
//! - after the client's `close()`, the forwarder's second `close()`
//!   (teardown).
//!
//! It prints one line per connection, and this module turns the lines into
//! each step's p50 and p99. Tracing costs time itself (each traced call
//! runs a BPF program, and bpftrace shares the two CPUs), so the figures
//! are larger than untraced ones: they show which steps dominate, and the
//! bench's rate table gives the untraced rates.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use super::{on_echo, Plan, System};
use crate::load;
use crate::util::Netns;

/// The bpftrace program: $1 client, $2 forwarder, $3 agent, $4 to $6
/// echo servers (0 where there is none).
const PROGRAM: &str = r#"
tracepoint:syscalls:sys_enter_connect /pid == $1/ {
  @c = nsecs; @acc = 0; @req = 0; @arecv = 0; @dial = 0; @sacc = 0; @reply = 0;
  @frecv = 0; @relay = 0; @sread = 0; @armed = 1; @tear = 0; @dialer = 0;
}
tracepoint:syscalls:sys_exit_accept4 /@armed && pid == $2 && args->ret >= 0 && @acc == 0/ { @acc = nsecs; }
tracepoint:syscalls:sys_enter_sendmsg /@armed && pid == $2 && @acc && @req == 0/ { @req = nsecs; }
tracepoint:syscalls:sys_exit_recvmsg /@armed && pid == $3 && args->ret > 0 && @req && @arecv == 0/ { @arecv = nsecs; }
tracepoint:syscalls:sys_enter_connect /@armed && (pid == $2 || pid == $3) && @acc && @dial == 0/ { @dial = nsecs; @dialer = pid; }
tracepoint:syscalls:sys_exit_accept4 /@armed && (pid == $4 || pid == $5 || pid == $6) && args->ret >= 0 && @sacc == 0/ { @sacc = nsecs; }
tracepoint:syscalls:sys_enter_sendmsg /@armed && pid == $3 && @dial && @reply == 0/ { @reply = nsecs; }
tracepoint:syscalls:sys_exit_recvmsg /@armed && pid == $2 && args->ret > 0 && @reply && @frecv == 0/ { @frecv = nsecs; }
tracepoint:syscalls:sys_enter_splice,tracepoint:syscalls:sys_enter_recvfrom,tracepoint:syscalls:sys_enter_bpf
/@armed && pid == $2 && @dial && (@req == 0 || @frecv) && @relay == 0/ { @relay = nsecs; }
tracepoint:syscalls:sys_exit_recvfrom /@armed && (pid == $4 || pid == $5 || pid == $6) && args->ret > 0 && @sacc && @sread == 0/ { @sread = nsecs; }
tracepoint:syscalls:sys_exit_recvfrom /@armed && pid == $1 && args->ret == 1/ {
  printf("S %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %d\n",
    @c, @acc, @req, @arecv, @dial, @sacc, @reply, @frecv, @relay, @sread, nsecs, @dialer);
  @armed = 0; @tear = 1;
}
tracepoint:syscalls:sys_enter_close /@tear == 1 && pid == $1/ { @cc = nsecs; @tear = 2; @fc = 0; }
tracepoint:syscalls:sys_enter_close /@tear == 2 && pid == $2/ {
  @fc = @fc + 1;
  if (@fc == 2) { printf("T %lld\n", nsecs - @cc); @tear = 0; }
}
"#;

/// One connection's milestones (ns; 0: did not happen on this path), in
/// the order of the program's `S` line.
#[derive(Debug, Clone, Copy, Default)]
struct Milestones {
    connect: u64,
    accepted: u64,
    request: u64,
    agent_got: u64,
    dial: u64,
    server_accepted: u64,
    agent_replied: u64,
    forwarder_got: u64,
    relay: u64,
    server_read: u64,
    answer: u64,
    /// The PID that called `connect()` in the child.
    dialer: u64,
}

impl Milestones {
    fn parse(line: &str) -> Option<Self> {
        let v: Vec<u64> = line
            .strip_prefix("S ")?
            .split_whitespace()
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        let [connect, accepted, request, agent_got, dial, server_accepted, agent_replied, forwarder_got, relay, server_read, answer, dialer] =
            v[..]
        else {
            return None;
        };
        Some(Milestones {
            connect,
            accepted,
            request,
            agent_got,
            dial,
            server_accepted,
            agent_replied,
            forwarder_got,
            relay,
            server_read,
            answer,
            dialer,
        })
    }

    /// The forwarder (`fwd`) dialed itself: the messages to and from the
    /// agent in the meantime were a pool's top-up, not this dial.
    fn dialed_by(mut self, fwd: u32) -> Self {
        if self.dialer == u64::from(fwd) {
            self.request = 0;
            self.agent_got = 0;
            self.agent_replied = 0;
            self.forwarder_got = 0;
        }
        self
    }

    /// The steps this connection went through: (step, ns).
    fn steps(&self) -> Vec<(&'static str, u64)> {
        let m = self;
        let or = |a: u64, b: u64| if a != 0 { a } else { b };
        let mut v = Vec::new();
        let mut step = |name, from: u64, to: u64| {
            if from != 0 && to != 0 && to >= from {
                v.push((name, to - from));
            }
        };
        step(STEPS[0], m.connect, m.accepted);
        step(STEPS[1], m.accepted, m.request);
        step(STEPS[2], m.request, m.agent_got);
        step(STEPS[3], or(m.agent_got, m.accepted), m.dial);
        step(STEPS[4], or(m.dial, m.connect), m.server_accepted);
        step(STEPS[5], m.dial, m.agent_replied);
        step(STEPS[6], m.agent_replied, m.forwarder_got);
        step(STEPS[7], or(m.forwarder_got, m.dial), m.relay);
        step(STEPS[8], or(m.relay, m.server_accepted), m.server_read);
        step(STEPS[9], m.server_read, m.answer);
        step(STEPS[10], m.connect, m.answer);
        v
    }
}

/// The report's rows, in order.
const STEPS: [&str; 12] = [
    "client `connect()` to the forwarder's `accept4()` returning it",
    "accepted to the request sent to the agent",
    "the request reaching the agent",
    "to the `connect()` in the child (from the request, or the accept)",
    "`connect()` (direct: the client's) to the server's `accept4()`",
    "`connect()` to the agent sending the socket",
    "the socket reaching the forwarder",
    "to the forwarder's first relay call or map update",
    "to the server reading the request byte",
    "to the client reading the answer",
    "**setup: `connect()` to the answer**",
    "teardown: client `close()` to the forwarder's second `close()`",
];

/// A profiled set-up: its column title, the system to connect to and the
/// client's address.
struct Config<'a> {
    title: String,
    sys: &'a System,
    from: Option<IpAddr>,
}

/// Writes the section into `md`. Skipped, with the reason, without
/// bpftrace.
pub fn run(md: &mut String, plan: &Plan, ns: &Netns, systems: &[System]) -> Result<()> {
    writeln!(md, "# Connection setup, step by step\n")?;
    if !crate::util::has_tool("bpftrace") {
        writeln!(
            md,
            "not run: bpftrace is not installed (Debian: bpftrace)\n"
        )?;
        return Ok(());
    }
    let find = |n: &str| systems.iter().find(|s| s.name == n && s.failed.is_none());
    let preserved: IpAddr = [127, 0, 0, 5].into();
    let mut configs = Vec::new();
    let mut add = |title: &str, name: &str, from: Option<IpAddr>| {
        if let Some(sys) = find(name) {
            configs.push(Config {
                title: title.to_string(),
                sys,
                from,
            });
        }
    };
    add("direct", "direct", None);
    add("auto", "auto", None);
    add("auto, source preserved", "auto", Some(preserved));
    add("auto `--no-source-ip`", "auto-nosrc", None);
    add("splice", "splice", None);
    add("ebpf", "ebpf", None);
    add("rootless auto", "rootless", None);
    add(
        "rootless auto, source preserved",
        "rootless",
        Some(preserved),
    );
    writeln!(
        md,
        "Made by `cargo xtask bench --profile`: bpftrace on the syscall tracepoints of the \
         client, the forwarder, its dial agent and the echo server (`xtask/src/bench/timeline.rs` \
         says how).\n\nOne client, {} s per set-up, every connection traced; p50 / p99 in \
         microseconds over the connections. Root unless it says rootless. The client is at \
         127.0.0.1 (an address the child owns too, so its source is not preserved), or at \
         127.0.0.5, which the forwarder preserves: from a transparent socket its dial agent made \
         ahead, and through the agent when it has none (the agent's steps, often only the first \
         connection's). Tracing slows every traced call: read the steps' shares, and the rate \
         table for untraced rates.\n",
        plan.rate_secs.max(3)
    )?;
    let mut columns = Vec::new();
    for c in &configs {
        eprintln!("bench: tracing connection setup through {}", c.title);
        match trace(c, plan, ns) {
            Ok(col) => columns.push((c.title.clone(), col)),
            Err(e) => {
                eprintln!("bench: {}: not traced: {e:#}", c.title);
                writeln!(md, "- {}: not traced: {e:#}", c.title)?;
            }
        }
    }
    writeln!(md)?;
    write!(md, "| step |")?;
    for (t, _) in &columns {
        write!(md, " {t} |")?;
    }
    writeln!(md)?;
    writeln!(md, "|---|{}", "---|".repeat(columns.len()))?;
    for (i, step) in STEPS.iter().enumerate() {
        write!(md, "| {step} |")?;
        for (_, col) in &columns {
            match &col.steps[i] {
                v if v.is_empty() => write!(md, " |")?,
                v => write!(md, " {:.0} / {:.0} |", pct(v, 0.5), pct(v, 0.99))?,
            }
        }
        writeln!(md)?;
    }
    write!(md, "| connections traced (connections/s while traced) |")?;
    for (_, col) in &columns {
        write!(md, " {} ({:.0}) |", col.n, col.rate)?;
    }
    writeln!(md, "\n")?;
    Ok(())
}

/// One traced set-up: each step's durations (us), the connections traced
/// and the rate while traced.
struct Column {
    steps: Vec<Vec<f64>>,
    n: usize,
    rate: f64,
}

fn trace(c: &Config<'_>, plan: &Plan, ns: &Netns) -> Result<Column> {
    let client = std::process::id();
    let (fwd, agent) = match c.sys.name.as_str() {
        "direct" => (0, 0),
        _ => {
            let pid = c.sys.pid.context("no PID")?;
            let agents = forwarder_testkit::procfs::children_running(pid, "child-agent");
            (pid, agents.first().copied().unwrap_or(0))
        }
    };
    // The bench's, RootlessKit's and the rootless forwarder's.
    let echo = echo_servers();
    let server = |i: usize| echo.get(i).copied().unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("fwd-bench-trace-{client}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let prog = dir.join("setup.bt");
    std::fs::write(&prog, PROGRAM).context("writing the bpftrace program")?;
    let out = dir.join("setup.out");
    let secs = plan.rate_secs.max(3);
    let mut bt = Command::new("bpftrace")
        .args(["-B", "full", "-o"])
        .arg(&out)
        .arg(&prog)
        .args([client, fwd, agent, server(0), server(1), server(2)].map(|p| p.to_string()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting bpftrace")?;
    let pid = bt.id();
    // Attached once it has written its banner to the output file.
    let attached = forwarder_testkit::wait::try_wait_until_or_abort(
        Duration::from_secs(30),
        "bpftrace to attach",
        || -> Result<bool, String> {
            if let Ok(Some(st)) = bt.try_wait() {
                return Err(format!("bpftrace exited: {st}"));
            }
            Ok(std::fs::read_to_string(&out)
                .map(|s| s.contains("Attaching"))
                .unwrap_or(false))
        },
    );
    let attached = match attached {
        Ok(Ok(())) => Ok(()),
        Ok(Err(timed_out)) => Err(timed_out.to_string()),
        Err(e) => Err(e),
    };
    if let Err(e) = attached {
        let _ = bt.kill();
        let _ = bt.wait();
        bail!("{e}");
    }
    let from = c.from;
    let dur = Duration::from_secs(secs);
    let run = on_echo(c.sys, ns, move |addr| async move {
        load::conn_rate(addr, from, 1, dur).await
    });
    // SIGINT: bpftrace flushes and exits.
    // SAFETY: kill(2) on the PID of the child we started.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let _ = bt.wait();
    let run = run.map_err(anyhow::Error::msg)?;
    if run.completed == 0 {
        bail!(
            "no connection completed: {}",
            run.first_error.unwrap_or_default()
        );
    }
    let text = std::fs::read_to_string(&out).context("reading bpftrace's output");
    let _ = std::fs::remove_dir_all(&dir);
    let text = text?;
    let mut steps = vec![Vec::new(); STEPS.len()];
    let mut n = 0;
    for line in text.lines() {
        if let Some(m) = Milestones::parse(line) {
            n += 1;
            for (name, ns) in m.dialed_by(fwd).steps() {
                if let Some(i) = STEPS.iter().position(|s| *s == name) {
                    steps[i].push(ns as f64 / 1000.0);
                }
            }
        } else if let Some(t) = line
            .strip_prefix("T ")
            .and_then(|t| t.trim().parse::<u64>().ok())
        {
            steps[STEPS.len() - 1].push(t as f64 / 1000.0);
        }
    }
    if n == 0 {
        bail!("bpftrace saw no connection");
    }
    Ok(Column {
        steps,
        n,
        rate: run.completed as f64 / run.secs,
    })
}

/// The `q` quantile of `v` (nearest rank).
fn pct(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() as f64 * q) as usize).min(s.len() - 1)]
}

/// The PIDs of the echo servers (`xtask bench-echo`; not the shells or
/// RootlessKit processes whose command lines name it).
fn echo_servers() -> Vec<u32> {
    procs()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| c.split(|&b| b == 0).nth(1) == Some(b"bench-echo".as_slice()))
                .unwrap_or(false)
        })
        .collect()
}

fn procs() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_follow_the_path_taken() {
        // Through the agent: every milestone.
        let m = Milestones::parse("S 100 200 300 400 500 600 700 800 900 1000 1100 7").unwrap();
        let s = m.steps();
        assert_eq!(s.len(), 11);
        assert_eq!(s[0], (STEPS[0], 100));
        assert_eq!(
            s[3],
            (STEPS[3], 100),
            "the dial counts from the agent's read"
        );
        assert_eq!(
            s[7],
            (STEPS[7], 100),
            "the relay counts from the socket's arrival"
        );
        assert_eq!(s[10], (STEPS[10], 1000));
        // Direct: connect, the server's accept and read, the answer.
        // The forwarder (PID 7) dialed: a top-up's messages are not steps.
        let m = m.dialed_by(7);
        assert_eq!(m.steps().len(), 7);
        assert_eq!(
            m.steps()[1],
            (STEPS[3], 300),
            "the dial counts from the accept"
        );
        let m = Milestones::parse("S 100 0 0 0 0 150 0 0 0 170 200 0").unwrap();
        let s = m.steps();
        assert_eq!(
            s,
            vec![
                (STEPS[4], 50),
                (STEPS[8], 20),
                (STEPS[9], 30),
                (STEPS[10], 100)
            ]
        );
        assert!(Milestones::parse("T 5").is_none());
        assert!(Milestones::parse("S 1 2").is_none());
    }
}
