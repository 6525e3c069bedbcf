//! The shipped systemd units (contrib/systemd) pass `systemd-analyze
//! verify --user`, installed as the README and the unit's header say: the
//! forwarder unit at `~/.config/systemd/user`, the drop-in beside rootless
//! Docker's own `docker.service` (a stand-in shaped like the one
//! dockerd-rootless-setuptool.sh writes), the binary at
//! `~/.cargo/bin/forwarder`.

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
