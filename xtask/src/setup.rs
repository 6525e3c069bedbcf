//! `cargo xtask setup`: installs what the build, the tests and the
//! benchmark need, idempotently; quick (a few probes) when nothing is
//! missing.
//!
//! - Debian packages: llvm-22-dev (bpf-linker links against it), iproute2
//!   (`ip netns`), iperf3 (benchmark), rootlesskit (rootlessctl, a real API
//!   client), passt, socat, uidmap, slirp4netns, libcap2-bin (setcap).
//! - rust-src for the nightly toolchain (the eBPF crate builds `core`).
//! - bpf-linker built against LLVM 22 (nightly's LLVM).

use std::process::{Command, Stdio};

use anyhow::{bail, Context as _, Result};

use crate::util::{is_root, output, run as run_cmd};

/// Debian packages the project needs.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "iproute2",
    "iperf3",
    "rootlesskit",
    "passt",
    "socat",
    "uidmap",
    "slirp4netns",
    "libcap2-bin",
    "procps",
];

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn apt() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    for p in PACKAGES {
        let state = if missing.contains(p) {
            "installing"
        } else {
            "ok"
        };
        println!("setup: package {p}: {state}");
    }
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!("missing Debian packages {missing:?}: run `cargo xtask setup` as root");
    }
    run_cmd(Command::new("apt-get").args(["update", "-q"]))?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("installing Debian packages")
}

fn rust_src() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        println!("setup: nightly toolchain: installing");
        run_cmd(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let comps = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if comps.lines().any(|l| l.starts_with("rust-src")) {
        println!("setup: rust-src (nightly): ok");
        return Ok(());
    }
    println!("setup: rust-src (nightly): installing");
    run_cmd(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn bpf_linker() -> Result<()> {
    let ok = Command::new("bpf-linker")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        println!("setup: bpf-linker: ok");
        return Ok(());
    }
    println!("setup: bpf-linker: installing (builds against LLVM 22, about a minute)");
    let install = |locked: bool| {
        let mut c = Command::new("cargo");
        c.args([
            "install",
            "bpf-linker",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", "/usr/lib/llvm-22");
        if locked {
            c.arg("--locked");
        }
        run_cmd(&mut c)
    };
    install(true)
        .or_else(|_| install(false))
        .context("installing bpf-linker")
}

/// Installs whatever is missing.
pub fn run() -> Result<()> {
    apt()?;
    rust_src()?;
    bpf_linker()?;
    Ok(())
}
