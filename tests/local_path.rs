//! The local-client path of `--mode ebpf` (sock_ops admission, sk_msg
//! redirect inside the sender's own call) with real peers, measured alone:
//! this binary runs after the engines suite, not beside it, so the CPU and
//! path shares it asserts are not another test's load. The correctness
//! cases (early data, half-close, resets, the flow-control contract, ...)
//! run through the path in the engines suite's `ebpf` configuration.

use std::time::{Duration, Instant};

use forwarder_tests::iperf::{iperf, Iperf};
use forwarder_tests::{Fwd, Pair};
use serde_json::Value;

/// A count the stats must carry; panics with them if it is missing, where
/// reading it as 0 could pass a bound.
fn count(st: &Value, path: &[&str]) -> u64 {
    path.iter()
        .fold(st, |v, k| &v[k])
        .as_u64()
        .unwrap_or_else(|| panic!("no {} in the stats: {st}", path.join(".")))
}

/// The tests of this binary run one at a time: a share of the bytes
/// depends on the machine's load (see `local_path_moves_bytes_...`).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn finish(mut f: Fwd) -> Value {
    f.assert_clean().await;
    f.stop()
}

/// Asserts that the senders' own calls moved most of `moved` bytes
/// (counted as msg) and nothing took the sk_skb path. Most, not all: on
/// these 2 CPUs a quiet machine moves 69–95% so (iperf3 never pauses, so
/// a writer whose credit ran out stays on the relay for a while).
fn assert_local(st: &Value, moved: u64) {
    let by = &st["bytes_by_path"];
    let msg = count(st, &["bytes_by_path", "msg"]);
    assert!(
        msg > moved / 2,
        "the senders' own calls should have moved most of the {moved} bytes: {st}"
    );
    assert_eq!(by["bpf"], 0, "bytes took the sk_skb path: {st}");
    assert_eq!(by["copy"], 0, "bytes copied in userspace: {st}");
    assert_admitted_own(st);
}

/// Asserts that the path admitted exactly this forwarder's connections:
/// one client socket and one server socket for each, no other, and none
/// refused.
fn assert_admitted_own(st: &Value) {
    let conns = st["connections"].as_u64().expect("connections");
    let lp = &st["local_path"];
    for k in ["clients", "servers"] {
        let n = lp[k]
            .as_u64()
            .unwrap_or_else(|| panic!("no local_path.{k} in the stats: {st}"));
        assert_eq!(n, conns, "local_path.{k} against {conns} connections: {st}");
    }
    assert_eq!(lp["refused"].as_u64(), Some(0), "admissions refused: {st}");
}

/// iperf3 through `--mode ebpf`, forward and reverse, on an otherwise
/// quiet machine: a local client's bytes and the server's replies move
/// inside the sender's own sendmsg() (counted as msg), not through the
/// relay nor the sk_skb path, and the forwarder's CPU stays a small
/// fraction of the transfers' time. Failed first without `--local-path`
/// (msg 0: every byte took sk_skb). Under load the share falls: a reader
/// that falls behind spends its writer's credit, the writer's bytes take
/// the relay until it pauses, and iperf3 never pauses (two at once on
/// these 2 CPUs moved 15% as msg); the other test shows that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_path_moves_bytes_in_the_senders_call() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let pair = Pair::new();
    let _server = Iperf::serve(&pair, 93);
    let f = Fwd::start(
        &pair,
        &["--mode", "ebpf", "--local-path", "-p", "127.0.0.1:8093:93"],
    );
    assert!(
        f.wait_stderr("local-client path on", Duration::from_secs(5))
            .contains("local-client path on"),
        "{}",
        f.stderr()
    );
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let (cpu0, t0) = (f.cpu_ticks(), Instant::now());
    let mut moved = 0;
    for reverse in [false, true] {
        let flags: &[&str] = if reverse { &["-R"] } else { &[] };
        moved += iperf(&pair, 8093, flags, &f).await;
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = f.cpu_ticks().saturating_sub(cpu0) as f64 / hz;
    let stderr = f.stderr();
    let st = finish(f).await;
    let relayed = count(&st, &["bytes_by_path", "splice"]) as f64 / 1e9;
    eprintln!(
        "forwarder CPU {cpu:.2} s during {wall:.2} s; {moved} bytes, {relayed:.2} GB relayed"
    );
    // The forwarder works only for what the relay carries (what a sender
    // writes while its credit is spent), with splice: about 0.3 s a GB
    // here. Allowed: 0.6 s a GB, plus 5% of the time for the rest (the
    // control path, the stats); twice that in the VM guests.
    let scale = if forwarder_tests::time_scale() > 1 {
        2.0
    } else {
        1.0
    };
    let allowed = scale * (0.05 * wall + 0.6 * relayed);
    assert!(
        cpu < allowed,
        "forwarder used {cpu:.2} s of CPU during {wall:.2} s of iperf3, {relayed:.2} GB relayed \
         (allowed {allowed:.2} s); stats: {st}\nstderr:\n{stderr}"
    );
    assert_local(&st, moved);
}

/// Two forwarders on one host at once, each with its own child and port:
/// each admits only the clients of its own listeners and the servers it
/// dialed, so each carries exactly its own transfer, part of it on its
/// local path (how much depends on the load: two iperf3 at once fill both
/// CPUs), none on the sk_skb path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_forwarders_each_take_their_own_clients() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let (p1, p2) = (Pair::new(), Pair::new());
    let (_s1, _s2) = (Iperf::serve(&p1, 94), Iperf::serve(&p2, 95));
    let f1 = Fwd::start(
        &p1,
        &["--mode", "ebpf", "--local-path", "-p", "127.0.0.1:8094:94"],
    );
    let f2 = Fwd::start(
        &p2,
        &["--mode", "ebpf", "--local-path", "-p", "127.0.0.1:8095:95"],
    );
    let (a, b) = tokio::join!(iperf(&p1, 8094, &[], &f1), iperf(&p2, 8095, &["-R"], &f2));
    let (st1, st2) = (finish(f1).await, finish(f2).await);
    for st in [&st1, &st2] {
        let by = &st["bytes_by_path"];
        assert!(
            by["msg"].as_u64() > Some(0),
            "nothing on the local path: {st}"
        );
        assert_eq!(by["bpf"], 0, "bytes took the sk_skb path: {st}");
        assert_eq!(by["copy"], 0, "bytes copied in userspace: {st}");
        assert_admitted_own(st);
    }
    // Each forwarder's counters hold its own transfer only: what iperf3
    // received, plus its control connection and what was still in flight
    // when it stopped counting; never the other's gigabytes.
    for (st, n) in [(&st1, a), (&st2, b)] {
        let total = count(st, &["bytes_to_child"]) + count(st, &["bytes_to_parent"]);
        assert!(
            total >= n && total < n + n / 10,
            "a forwarder counted {total} bytes for its {n}: {st}"
        );
    }
}
