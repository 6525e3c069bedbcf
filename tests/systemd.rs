//! The shipped systemd units (contrib/systemd) pass `systemd-analyze
//! verify --user`, installed as the README and the unit's header say: the
//! forwarder unit at `~/.config/systemd/user`, the drop-in beside rootless
//! Docker's own `docker.service` (a stand-in shaped like the one
//! dockerd-rootless-setuptool.sh writes), the binary at
//! `~/.cargo/bin/forwarder`; and stopping the unit the way systemd does
//! leaves nothing but a clean stop in its journal.

use std::path::Path;
use std::process::Command;

fn install(from: &Path, to: &Path) {
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).expect("unit directory");
    }
    std::fs::copy(from, to).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
}

/// Runs `systemd-analyze verify --user` on the units in a home of its own;
/// returns (success, everything it printed).
fn verify(forwarder_unit: &Path) -> (bool, String) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let home = tmp.path().join("home");
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).expect("runtime dir");
    let units = home.join(".config/systemd/user");
    let contrib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/systemd");
    install(forwarder_unit, &units.join("forwarder.service"));
    install(
        &contrib.join("docker.service.d/forwarder.conf"),
        &units.join("docker.service.d/forwarder.conf"),
    );
    std::fs::write(
        units.join("docker.service"),
        "[Unit]\nDescription=Docker Application Container Engine (Rootless)\n\n\
         [Service]\nExecStart=/bin/true\nType=notify\nNotifyAccess=all\n\n\
         [Install]\nWantedBy=default.target\n",
    )
    .expect("docker.service");
    install(
        &forwarder_tests::forwarder_bin(),
        &home.join(".cargo/bin/forwarder"),
    );
    let out = Command::new("systemd-analyze")
        .args(["verify", "--user"])
        .arg(units.join("forwarder.service"))
        .arg(units.join("docker.service"))
        .env("HOME", &home)
        .env("XDG_RUNTIME_DIR", &run)
        .output()
        .expect("systemd-analyze (Debian's systemd package)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && text.trim().is_empty(), text)
}

#[test]
fn shipped_units_verify() {
    let contrib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/systemd");
    let (ok, text) = verify(&contrib.join("forwarder.service"));
    assert!(ok, "systemd-analyze verify: {text}");
}

#[test]
fn a_broken_unit_fails_verification() {
    // The check itself can fail: a unit with a bad directive and a
    // dependency on a unit that does not exist.
    let tmp = tempfile::tempdir().expect("tempdir");
    let contrib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/systemd");
    let good = std::fs::read_to_string(contrib.join("forwarder.service")).expect("unit");
    let bad = tmp.path().join("forwarder.service");
    std::fs::write(
        &bad,
        good.replace("Restart=on-failure", "Restart=sometimes")
            .replace("BindsTo=docker.service", "BindsTo=dockerd-missing.service"),
    )
    .expect("bad unit");
    let (ok, text) = verify(&bad);
    assert!(!ok, "a broken unit passed: {text}");
    assert!(text.contains("sometimes"), "{text}");
}

/// The value of `key=` in the `[Service]` section of a unit, if set.
fn service_setting(unit: &str, key: &str) -> Option<String> {
    let mut in_service = false;
    let mut found = None;
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service {
            if let Some(v) = line.strip_prefix(key).and_then(|r| r.strip_prefix('=')) {
                found = Some(v.trim().to_string());
            }
        }
    }
    found
}

/// Stopping the shipped unit is clean in the journal. As the unit says
/// (KillMode= and KillSignal= unset: control-group and SIGTERM),
/// `systemctl stop` sends SIGTERM, then SIGCONT, to every process of the
/// unit's cgroup at once: the forwarder and its dial agent. Here the
/// forwarder runs as the unit runs it (the unprivileged user, dialing
/// through its agent in the container's user and network namespaces, as
/// `attach-docker` does for RootlessKit's child) in a process group of its
/// own, which holds the same two processes, and the group gets those
/// signals: the forwarder exits 0 (the unit ends inactive, not failed) and
/// its stderr, the journal's, holds no warning or error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_unit_is_clean() {
    use forwarder_tests::{echo_roundtrip, servers, within, Fwd, Pair, Privilege};
    forwarder_tests::require_root();
    let contrib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/systemd");
    let unit = std::fs::read_to_string(contrib.join("forwarder.service")).expect("unit");
    // What this test does is what systemd does for these settings; a unit
    // that changes them needs the test changed with it.
    let mode = service_setting(&unit, "KillMode");
    let signal = service_setting(&unit, "KillSignal");
    assert!(
        matches!(mode.as_deref(), None | Some("control-group"))
            && matches!(signal.as_deref(), None | Some("SIGTERM") | Some("TERM")),
        "the unit stops with KillMode={mode:?} KillSignal={signal:?}: update this test"
    );
    assert!(
        unit.contains("ExecStart=%h/.cargo/bin/forwarder attach-docker"),
        "the unit runs something else now: update this test\n{unit}"
    );
    let pair = Pair::with(Privilege::User);
    servers::echo(pair.child.listen("127.0.0.1:80"));
    let f = Fwd::start_in_own_group(&pair, &["-p", "127.0.0.1:8080:80"]);
    assert_eq!(f.agent_pids().len(), 1, "no agent:\n{}", f.stderr());
    within(10, "a connection through the agent", async {
        let mut c = pair.client("127.0.0.1:8080").await;
        echo_roundtrip(&mut c, b"served").await;
    })
    .await;
    let (status, log) = f.stop_by(&[libc::SIGTERM, libc::SIGCONT], true);
    assert!(status.success(), "exited with {status}:\n{log}");
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    assert!(
        bad.is_empty(),
        "the journal would hold {bad:#?}\nwhole log:\n{log}"
    );
}
