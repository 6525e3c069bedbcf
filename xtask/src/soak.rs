//! `cargo xtask soak --minutes N`: the suite's soak test (`tests/soak.rs`,
//! driven by `tests/harness/soak.rs`) for longer, one engine after the other,
//! with its report printed. The same test binary runs in `cargo xtask test`
//! for 60 s per engine; here `FWD_SOAK_SECS` and `FWD_SOAK_CONNS` stretch it.

use anyhow::{bail, Context as _, Result};

use crate::util::{build_forwarder, cargo, is_root, run as run_cmd};

const ENGINES: &[&str] = &["ebpf", "splice", "copy"];

#[derive(clap::Args)]
pub struct Args {
    /// Minutes per engine, warm-up included.
    #[arg(long, default_value_t = 10)]
    minutes: u64,
    /// Concurrent connections.
    #[arg(long, default_value_t = 2000)]
    connections: u32,
    /// Engines to soak (default: all three).
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(ENGINES))]
    engines: Vec<String>,
}

pub fn run(args: &Args) -> Result<()> {
    crate::setup::run()?;
    if !is_root() {
        bail!("the soak creates network namespaces and loads BPF programs: run it as root");
    }
    if args.minutes == 0 {
        bail!("--minutes must be at least 1");
    }
    let bin = build_forwarder()?;
    let engines: Vec<&str> = if args.engines.is_empty() {
        ENGINES.to_vec()
    } else {
        args.engines.iter().map(String::as_str).collect()
    };
    let mut cmd = cargo();
    cmd.env("FORWARDER_BIN", &bin)
        .env("FWD_SOAK_SECS", (args.minutes * 60).to_string())
        .env("FWD_SOAK_CONNS", args.connections.to_string())
        .args([
            "test",
            "--release",
            "-p",
            "forwarder-tests",
            "--test",
            "soak",
        ])
        .args(["--", "--nocapture", "--test-threads", "1", "--exact"])
        .args(engines.iter().map(|e| format!("soak_{e}")));
    run_cmd(&mut cmd).context("running the soak")
}
