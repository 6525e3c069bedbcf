//! `cargo xtask test`: set-up, a release build of the whole workspace (the
//! forwarder with its eBPF programs embedded), then every test: the unit
//! tests and the netns integration suite in `tests/`, which runs the built
//! binary (`FORWARDER_BIN`).

use std::process::Command;

use anyhow::{bail, Result};

use crate::util::{is_root, root, run as run_cmd};

pub fn run(args: &[String]) -> Result<()> {
    crate::setup::run()?;
    if !is_root() {
        bail!("the suite creates network namespaces and loads BPF programs: run it as root");
    }
    let root = root();
    run_cmd(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "--all-targets",
    ]))?;
    let bin = root.join("target/release/forwarder");
    run_cmd(
        Command::new("cargo")
            .current_dir(&root)
            .env("FORWARDER_BIN", &bin)
            .args(["test", "--release", "--"])
            .args(args),
    )
}
