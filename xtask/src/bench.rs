//! `cargo xtask bench`: bulk throughput with iperf3, one stream, each
//! direction, for direct loopback inside the child namespace (no
//! forwarder, the ceiling) and for the forwarder with each engine.
//!
//! Method: one iperf3 server inside a throw-away child namespace; one
//! forwarder per engine in this namespace publishing a loopback port to it.
//! Systems are interleaved (direct, ebpf, splice, copy, direct, ...) so
//! machine drift hits all alike; ratios to direct are computed per
//! repetition, then the median is taken. iperf3 pins its client to CPU 0
//! and server to CPU 1 (`-A 0,1`) in every run, so the scheduler's
//! placement does not decide the result. Writes `bench/results/latest.md`
//! and `latest.json`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use crate::util::{output, root, run as run_cmd, Guard, Netns};

#[derive(clap::Args)]
pub struct Args {
    /// Repetitions of every system and direction.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// A one-minute smoke version (2 repetitions of 2 s).
    #[arg(long)]
    quick: bool,
}

const SYSTEMS: [&str; 4] = ["direct", "ebpf", "splice", "copy"];
const SERVER_PORT: u16 = 5201;

/// One iperf3 run; returns Gbit/s received.
fn iperf(ns: Option<&Netns>, port: u16, secs: u64, reverse: bool) -> Result<f64> {
    let mut c = match ns {
        Some(ns) => ns.cmd("iperf3"),
        None => Command::new("iperf3"),
    };
    c.args([
        "-c",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-t",
        &secs.to_string(),
    ])
    .args(["-A", "0,1", "-J"]);
    if reverse {
        c.arg("-R");
    }
    let out = output(&mut c)?;
    let v: serde_json::Value = serde_json::from_str(&out).context("iperf3 JSON")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .with_context(|| format!("no throughput in iperf3 output: {:.200}", out))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub fn run(args: &Args) -> Result<()> {
    crate::setup::run()?;
    let (reps, secs) = if args.quick {
        (2, 2)
    } else {
        (args.reps, args.duration)
    };
    let root = root();
    run_cmd(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "forwarder",
    ]))?;
    let ns = Netns::new(&format!("fwd-bench-{}", std::process::id()))?;
    let mut srv = ns.cmd("iperf3");
    srv.args(["-s", "-B", "127.0.0.1", "-p", &SERVER_PORT.to_string()])
        .stdout(Stdio::null());
    let _server = Guard(Some(srv.spawn().context("starting iperf3 -s")?));

    // One forwarder per engine, kept for the whole run.
    let mut forwarders = Vec::new();
    let mut ports = BTreeMap::new();
    for (i, mode) in ["ebpf", "splice", "copy"].iter().enumerate() {
        let port = 15201 + i as u16;
        let mut c = Command::new(root.join("target/release/forwarder"));
        c.args(["run", "--child-netns", &ns.path(), "--mode", mode])
            .args(["-p", &format!("127.0.0.1:{port}:{SERVER_PORT}")])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = c
            .spawn()
            .with_context(|| format!("starting forwarder --mode {mode}"))?;
        let stdout = child.stdout.take().context("stdout")?;
        forwarders.push(Guard(Some(child)));
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if !line.contains("\"ready\"") {
            bail!("forwarder --mode {mode} did not start: {line}");
        }
        ports.insert(*mode, port);
    }
    std::thread::sleep(Duration::from_millis(300));

    // results[system][direction] = per-rep Gbit/s
    let mut results: BTreeMap<&str, [Vec<f64>; 2]> = BTreeMap::new();
    // warm-up
    iperf(Some(&ns), SERVER_PORT, 1, false)?;
    for rep in 0..reps {
        for (d, reverse) in [false, true].into_iter().enumerate() {
            for sys in SYSTEMS {
                let g = match sys {
                    "direct" => iperf(Some(&ns), SERVER_PORT, secs, reverse)?,
                    m => iperf(None, ports[m], secs, reverse)?,
                };
                eprintln!(
                    "rep {rep} {} {sys}: {g:.1} Gbit/s",
                    if reverse { "reverse" } else { "forward" }
                );
                results.entry(sys).or_default()[d].push(g);
            }
        }
    }
    for mut f in forwarders {
        f.stop(5);
    }

    let kernel = output(Command::new("uname").arg("-r"))?.trim().to_string();
    let date = output(Command::new("date").args(["-u", "+%Y-%m-%d"]))?
        .trim()
        .to_string();
    let cmdline = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
    let mut md = String::new();
    writeln!(
        md,
        "Bulk throughput, iperf3 one stream, {secs} s per run, {reps} interleaved repetitions,"
    )?;
    writeln!(md, "client pinned to CPU 0 and server to CPU 1. {date}, kernel {kernel}, `cargo xtask {cmdline}`.")?;
    writeln!(md)?;
    writeln!(md, "| system | forward Gbit/s median (min-max) | x direct | reverse Gbit/s median (min-max) | x direct |")?;
    writeln!(md, "|---|---|---|---|---|")?;
    let mut json = serde_json::Map::new();
    for sys in SYSTEMS {
        let r = &results[sys];
        let mut cells = Vec::new();
        for d in 0..2 {
            let mut v = r[d].clone();
            let (lo, hi) = v
                .iter()
                .fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(*x), b.max(*x)));
            let med = median(&mut v);
            let mut ratios: Vec<f64> = r[d]
                .iter()
                .zip(&results["direct"][d])
                .map(|(x, base)| x / base)
                .collect();
            let ratio = median(&mut ratios);
            cells.push(format!("{med:.1} ({lo:.1}-{hi:.1}) | {ratio:.2}"));
        }
        writeln!(md, "| {sys} | {} | {} |", cells[0], cells[1])?;
        json.insert(
            sys.to_string(),
            serde_json::json!({"forward": r[0], "reverse": r[1]}),
        );
    }
    let mut sc: Vec<f64> = (0..2)
        .flat_map(|d| {
            results["splice"][d]
                .iter()
                .zip(&results["copy"][d])
                .map(|(s, c)| s / c)
                .collect::<Vec<_>>()
        })
        .collect();
    writeln!(md)?;
    writeln!(
        md,
        "splice / copy, median of per-run ratios over both directions: {:.2}",
        median(&mut sc)
    )?;
    print!("{md}");
    let dir = root.join("bench/results");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("latest.md"), &md)?;
    let meta = serde_json::json!({"date": date, "kernel": kernel, "command": format!("cargo xtask {cmdline}"),
        "seconds": secs, "reps": reps, "gbit_per_s": json});
    std::fs::write(
        dir.join("latest.json"),
        serde_json::to_string_pretty(&meta)?,
    )?;
    Ok(())
}
