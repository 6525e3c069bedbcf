//! iperf3 as a peer: its server in the child, its client in the parent.

use std::process::{Child, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::{limit, wait_until_async, Fwd, Pair};

/// iperf3's server in the child, on `port`, until dropped.
pub struct Iperf(Child);

impl Iperf {
    pub fn serve(pair: &Pair, port: u16) -> Iperf {
        let child = pair
            .child
            .command("iperf3")
            .args(["-s", "-B", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("iperf3 -s (cargo xtask setup installs iperf3)");
        Iperf(child)
    }
}

impl Drop for Iperf {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One iperf3 run of 2 s from the parent to `port` with extra `flags`
/// (`-R`: the server sends; `-Z`: sendfile): the bytes received.
pub async fn iperf(pair: &Pair, port: u16, flags: &[&str], f: &Fwd) -> u64 {
    let mut cmd = pair.parent.command("iperf3");
    cmd.args(["-c", "127.0.0.1", "-p", &port.to_string(), "-t", "2", "-J"]);
    cmd.args(flags);
    // The server may not listen yet the first time.
    let o = wait_until_async(
        limit(Duration::from_secs(10)),
        &format!("iperf3 to port {port} to succeed"),
        async || {
            let o = cmd.output().expect("iperf3 -c");
            if o.status.success() {
                Ok(o)
            } else {
                Err(format!(
                    "iperf3: {}{}; the forwarder's stderr:\n{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr),
                    f.stderr()
                ))
            }
        },
    )
    .await;
    let v: Value = serde_json::from_slice(&o.stdout).expect("iperf3 JSON");
    let bytes = v["end"]["sum_received"]["bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no bytes received in iperf3's report: {v}"));
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0);
    eprintln!(
        "iperf3 {flags:?} to {port}: {bytes} bytes, {:.1} Gbit/s",
        bps / 1e9
    );
    assert!(bytes > 0, "iperf3 moved nothing: {v}");
    bytes
}
