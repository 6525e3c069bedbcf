//! `cargo xtask test`: the link check (`cargo xtask links`: every
//! relative link in the Markdown files resolves; a dead one fails the task
//! before anything is built), `setup`, the lint gates (`cargo fmt --check`,
//! `cargo clippy --all-targets -- -D warnings`), a release build of the workspace (the
//! forwarder with its eBPF programs embedded: forwarder/build.rs compiles
//! forwarder-ebpf with nightly and bpf-linker), then every test in release
//! mode: the unit tests and the netns integration suite in `tests/`, which
//! runs the binary named by `FORWARDER_BIN`: the one `cargo install
//! --locked --path forwarder` installs into `target/install/bin` from that
//! build, so what users install is what is tested.
//!
//! `--workspace` excludes forwarder-ebpf: it is `no_std` for
//! bpfel-unknown-none and cannot be built for the host (the workspace
//! leaves it out of `default-members` for the same reason); and
//! forwarder-fuzz, which only `cargo fuzz` builds (nightly, coverage
//! instrumentation).
//!
//! The suite includes the soak (`tests/soak.rs`, about 3.5 min). After the
//! tests, each fuzz target runs for [`fuzz::SUITE_SECONDS`] (see
//! [`crate::fuzz`]), unless `--no-fuzz` is given or the extra arguments pick
//! tests.
//!
//! Extra arguments after `--` go to the test binaries
//! (`cargo xtask test -- --test-threads 2`, or a name filter). If they hold
//! a second `--`, what comes before it goes to `cargo test` itself:
//! `cargo xtask test -- --test engines -- --test-threads 1`.
//! A failing build or test run makes xtask exit with cargo's exit code.
//!
//! Without extra arguments the end-to-end suite (`cargo xtask e2e`, rootless
//! Docker publishing through forwarder) and then the VM suite follow: `cargo xtask vm-test
//! --kernel 6.1` (see `vmtest.rs`), unless FWD_SKIP_VM_TEST=1 (for local
//! quick runs; CI runs it).

use anyhow::{bail, Context as _, Result};

use crate::fuzz;
use crate::util::{cargo, is_root, root, run as run_cmd, target_dir};

/// The workspace less the crates plain cargo cannot build for the host.
pub const WORKSPACE: [&str; 5] = [
    "--workspace",
    "--exclude",
    "forwarder-ebpf",
    "--exclude",
    "forwarder-fuzz",
];

/// Splits the extra arguments into (for `cargo test`, for the binaries).
fn split(args: &[String]) -> (&[String], &[String]) {
    match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], &args[i + 1..]),
        None => (&[], args),
    }
}

pub fn run(args: &[String], with_fuzz: bool) -> Result<()> {
    // First, as it takes a second: the docs' links, files and anchors.
    crate::links::run().context("the link check (cargo xtask links)")?;
    crate::setup::run()?;
    if !is_root() {
        bail!("the suite creates network namespaces and loads BPF programs: run it as root");
    }
    // The lint gates: formatting, then clippy with warnings as errors.
    run_cmd(cargo().args(["fmt", "--all", "--", "--check"]))
        .context("cargo fmt --check: run `cargo fmt --all`")?;
    run_cmd(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))
        .context("cargo clippy --all-targets -- -D warnings")?;
    run_cmd(cargo().args(["build", "--release"]).args(WORKSPACE))
        .context("building the workspace")?;
    // The suite runs the binary a user gets from `cargo install --locked
    // --path forwarder` (the BPF object embedded by build.rs): installed
    // from the release build just made (cargo install --path builds in the
    // workspace's target directory, so this is a copy, a few seconds).
    let install = target_dir()?.join("install");
    run_cmd(
        cargo()
            .args(["install", "--locked", "--offline", "--force", "--path"])
            .arg(root().join("forwarder"))
            .arg("--root")
            .arg(&install),
    )
    .context("cargo install --locked --path forwarder")?;
    let bin = install.join("bin/forwarder");
    let (cargo_args, test_args) = split(args);
    let host = run_cmd(
        cargo()
            .env("FORWARDER_BIN", &bin)
            .args(["test", "--release", "--no-fail-fast"])
            .args(WORKSPACE)
            .args(cargo_args)
            .arg("--")
            .args(test_args),
    )
    .context("running the tests");
    if !args.is_empty() {
        println!("test: arguments picked tests: fuzzing and the VM suite are skipped");
        return host;
    }
    // Each later part runs even when an earlier one failed: every result
    // is worth having.
    let mut failures: Vec<anyhow::Error> = host.err().into_iter().collect();
    if with_fuzz {
        if let Err(e) = fuzz::run(&fuzz::Args {
            seconds: fuzz::SUITE_SECONDS,
            targets: Vec::new(),
        }) {
            failures.push(e.context("fuzzing"));
        }
    } else {
        println!("fuzz: skipped (--no-fuzz)");
    }
    // Rootless Docker end to end (`cargo xtask e2e`, a few minutes).
    if let Err(e) = crate::e2e::run() {
        failures.push(e.context("the end-to-end suite (cargo xtask e2e)"));
    }
    // The VM suite (the 6.1 kernel line): FWD_SKIP_VM_TEST=1 skips it for
    // local quick runs; CI never sets it.
    if std::env::var_os("FWD_SKIP_VM_TEST").is_some_and(|v| v == "1") {
        println!("test: FWD_SKIP_VM_TEST=1: the VM suite is skipped");
    } else if let Err(e) = crate::vmtest::run(&crate::vmtest::Args::for_ci()) {
        failures.push(e.context("the VM suite (cargo xtask vm-test --kernel 6.1)"));
    }
    finish(failures)
}

/// Ok if nothing failed; otherwise the first failure, naming the others.
fn finish(mut failures: Vec<anyhow::Error>) -> Result<()> {
    if failures.is_empty() {
        return Ok(());
    }
    let first = failures.remove(0);
    if failures.is_empty() {
        return Err(first);
    }
    let others: Vec<String> = failures.iter().map(|e| format!("{e:#}")).collect();
    Err(first.context(format!("also failed: {}", others.join("; "))))
}

#[cfg(test)]
mod tests {
    use super::split;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn extra_args_go_to_the_binaries_unless_split() {
        let a = s(&["--test-threads", "2"]);
        assert_eq!(split(&a), (&[][..], &a[..]));
        let a = s(&["--test", "engines", "--", "--test-threads", "1"]);
        let (c, t) = split(&a);
        assert_eq!(c, &s(&["--test", "engines"])[..]);
        assert_eq!(t, &s(&["--test-threads", "1"])[..]);
    }
}
