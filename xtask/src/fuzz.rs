//! `cargo xtask fuzz` (and the fuzzing stage of `cargo xtask test`): runs
//! each cargo-fuzz target in `fuzz/` for a bounded time with libFuzzer.
//!
//! - Build: `cargo +nightly fuzz build` with debug assertions (overflow
//!   checks) and no sanitizer: the decoders are safe Rust, so
//!   AddressSanitizer would only slow the build and the runs down; libFuzzer
//!   still catches panics, aborts, timeouts and memory blow-ups.
//! - Inputs: the corpus grown by earlier runs (`target/fuzz/corpus/TARGET`,
//!   where new inputs go), the committed seeds (`fuzz/seeds/TARGET`) and
//!   every input that once failed (`fuzz/regressions/TARGET`), plus the
//!   dictionary `fuzz/spec.dict`.
//! - A failure leaves the input in `target/fuzz/artifacts/TARGET/`; the
//!   error says how to keep it as a regression (a file in
//!   `fuzz/regressions/TARGET/`, which `cargo test -p forwarder --lib`
//!   replays through `forwarder::fuzz`).
//!
//! `cargo xtask setup` installs cargo-fuzz.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};

use crate::util::{cargo, root, run as run_cmd, target_dir};

/// The targets, in `fuzz/Cargo.toml`.
pub const TARGETS: &[&str] = &["port_spec_text", "api_port_body", "agent_message"];

/// Seconds per target in `cargo xtask test`: about a minute in all.
pub const SUITE_SECONDS: u64 = 20;

/// Longest input tried: the API takes up to 64 KiB, the agent 4 KiB; specs
/// and request bodies that matter are far shorter.
const MAX_LEN: u32 = 4096;

#[derive(clap::Args)]
pub struct Args {
    /// Seconds to run each target.
    #[arg(long, default_value_t = SUITE_SECONDS)]
    pub seconds: u64,
    /// Targets to run (default: all).
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    pub targets: Vec<String>,
}

/// `cargo +nightly fuzz` in the workspace root, on the fuzz crate.
fn cargo_fuzz(action: &str) -> std::process::Command {
    let mut c = cargo();
    c.args(["+nightly", "fuzz", action, "--fuzz-dir", "fuzz"])
        .args(["--sanitizer", "none", "--debug-assertions"]);
    c
}

/// Builds every target, then runs each for `args.seconds`.
pub fn run(args: &Args) -> Result<()> {
    let targets: Vec<&str> = if args.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        args.targets.iter().map(String::as_str).collect()
    };
    let t = Instant::now();
    run_cmd(&mut cargo_fuzz("build")).context("building the fuzz targets")?;
    println!(
        "fuzz: built {} targets in {:.0} s",
        TARGETS.len(),
        t.elapsed().as_secs_f64()
    );
    let work = target_dir()?.join("fuzz");
    for target in targets {
        run_one(target, args.seconds, &work)?;
    }
    Ok(())
}

fn run_one(target: &str, seconds: u64, work: &Path) -> Result<()> {
    let dir = |p: PathBuf| -> Result<PathBuf> {
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(p)
    };
    let corpus = dir(work.join("corpus").join(target))?;
    let artifacts = dir(work.join("artifacts").join(target))?;
    let fuzz = root().join("fuzz");
    let mut inputs = vec![corpus];
    for kind in ["seeds", "regressions"] {
        let d = fuzz.join(kind).join(target);
        if d.is_dir() {
            inputs.push(d);
        }
    }
    let t = Instant::now();
    let mut cmd = cargo_fuzz("run");
    cmd.arg(target)
        .args(&inputs)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-max_len={MAX_LEN}"))
        .arg(format!("-dict={}", fuzz.join("spec.dict").display()))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        // One input may take at most 10 s; libFuzzer's default is 20 min.
        .arg("-timeout=10")
        .arg("-print_final_stats=1");
    if let Err(e) = run_cmd(&mut cmd) {
        bail!(
            "{e:#}\nfuzz target {target} failed: the input is in {}; keep it as a regression \
             (copy it to fuzz/regressions/{target}/ with a name saying what it found, fix the \
             bug, and `cargo test -p forwarder --lib fuzz` replays it)",
            artifacts.display()
        );
    }
    println!(
        "fuzz: {target}: no failure in {:.0} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
