//! The soak (issue 10): 2,000 concurrent connections of mixed traffic for
//! 60 s through each engine, every byte checked, the forwarder's RSS within
//! 10% and its descriptors within 1% of their values at the end of warm-up,
//! and the BPF maps holding exactly the open connections, then empty. See
//! `harness/soak.rs` for the traffic and the checks; `cargo xtask soak
//! --minutes N` runs these tests for longer (`FWD_SOAK_SECS`,
//! `FWD_SOAK_CONNS`).
//!
//! The engines run one after the other (each soak loads the machine's two
//! CPUs on its own, and holds several thousand descriptors in this process).

use std::sync::Mutex;

use forwarder_tests::soak::{self, Config};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn soak(args: &[&str], engine: &str) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let report = soak::run(args, engine, &Config::from_env());
    assert!(report.checkpoints.len() >= 2, "{report}");
}

#[test]
fn soak_ebpf() {
    soak(&["--mode", "ebpf"], "ebpf");
}

#[test]
fn soak_splice() {
    soak(&["--mode", "splice"], "splice");
}

#[test]
fn soak_copy() {
    soak(&["--mode", "copy"], "copy");
}
