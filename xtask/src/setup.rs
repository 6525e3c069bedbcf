//! `cargo xtask setup`: installs what the build, the tests, the demo and
//! the benchmark need, idempotently, and is quick (a few cheap probes, no
//! network) when nothing is missing. One line per item: `ok` or
//! `installing`.
//!
//! - Debian packages (probed with `dpkg-query -W`): llvm-22-dev
//!   (bpf-linker links against LLVM 22), iproute2 (`ip netns`), iperf3
//!   (benchmark), rootlesskit (`rootlessctl`, a real API client), passt,
//!   socat, uidmap, slirp4netns (peers to compare with), libcap2-bin
//!   (`setcap`), procps (`sysctl`, used by the tests), docker.io and
//!   busybox-static (`cargo xtask e2e`: rootless dockerd and an offline
//!   image), systemd (`systemd-analyze verify` of the shipped units),
//!   man-db (`man`, which the install test renders the pages with).
//!   Missing ones are installed with `apt-get update` + `apt-get install -y`.
//! - rust-src for the nightly toolchain (the eBPF crate builds `core` for
//!   bpfel-unknown-none); the nightly toolchain itself if it is missing.
//! - bpf-linker built against LLVM 22, nightly's LLVM. `bpf-linker
//!   --version` prints only its own version ("bpf-linker 0.13.0"), so the
//!   LLVM it uses is read from `ldd` (it links libLLVM.so.22.x
//!   dynamically) or, for a static build, from the features cargo recorded
//!   when it installed it (`$CARGO_HOME/.crates2.json`).
//! - cargo-fuzz (`cargo install`), for the fuzz targets in `fuzz/`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::util::{is_root, output, run as run_cmd, show};

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
    "docker.io",
    "busybox-static",
    "systemd",
    "man-db",
    "linux-perf",
    "bpftrace",
];

/// The LLVM major version nightly uses, which bpf-linker must match.
const LLVM: u32 = 22;

fn item(what: &str, state: &str) {
    println!("setup: {what}: {state}");
}

/// Whether a Debian package is installed.
fn installed(pkg: &str) -> Result<bool> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .context("cannot run dpkg-query (setup supports Debian and derivatives)")?;
    // Exit status 1 with "no packages found" means never installed.
    Ok(out.status.success()
        && String::from_utf8_lossy(&out.stdout).trim_end() == "install ok installed")
}

fn packages() -> Result<()> {
    let mut missing = Vec::new();
    for &p in PACKAGES {
        let ok = installed(p)?;
        item(
            &format!("package {p}"),
            if ok { "ok" } else { "installing" },
        );
        if !ok {
            missing.push(p);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {}: run `cargo xtask setup` as root",
            missing.join(" ")
        );
    }
    run_cmd(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("updating the package lists")?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("installing {}", missing.join(" ")))?;
    for p in missing {
        if !installed(p)? {
            bail!("apt-get succeeded but package {p} is still not installed");
        }
    }
    Ok(())
}

fn rust_src() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("listing rustup toolchains (is rustup installed?)")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        item("nightly toolchain", "installing");
        run_cmd(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))
        .context("installing the nightly toolchain")?;
    }
    let comps = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if comps.lines().any(|l| l.trim() == "rust-src") {
        item("rust-src (nightly)", "ok");
        return Ok(());
    }
    item("rust-src (nightly)", "installing");
    run_cmd(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
        .context("adding rust-src to the nightly toolchain")
}

/// rustfmt and clippy for the default toolchain: `cargo xtask test` runs
/// both as gates.
fn lint_tools() -> Result<()> {
    let comps = output(Command::new("rustup").args(["component", "list", "--installed"]))
        .context("listing rustup components (is rustup installed?)")?;
    let has = |name: &str| comps.lines().any(|l| l.trim().starts_with(name));
    for c in ["rustfmt", "clippy"] {
        if has(c) {
            item(c, "ok");
        } else {
            item(c, "installing");
            run_cmd(Command::new("rustup").args(["component", "add", c]))
                .with_context(|| format!("adding {c} to the default toolchain"))?;
        }
    }
    Ok(())
}

/// `$CARGO_HOME`, by default `~/.cargo`.
fn cargo_home() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
}

/// The first executable `name` on PATH.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Which LLVM major version a bpf-linker binary uses, if that can be told.
fn linker_llvm(bin: &Path) -> Option<u32> {
    // Dynamic build: "libLLVM.so.22.1 => /usr/lib/llvm-22/lib/..." (older
    // LLVMs name it libLLVM-17.so).
    if let Ok(out) = Command::new("ldd").arg(bin).output() {
        if let Some(v) = llvm_from_ldd(&String::from_utf8_lossy(&out.stdout)) {
            return Some(v);
        }
    }
    // Static build installed by cargo: the features it was built with.
    let json = std::fs::read_to_string(cargo_home()?.join(".crates2.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&json).ok()?;
    v["installs"]
        .as_object()?
        .iter()
        .filter(|(k, _)| k.starts_with("bpf-linker "))
        .flat_map(|(_, i)| i["features"].as_array().cloned().unwrap_or_default())
        .filter_map(|f| f.as_str()?.strip_prefix("llvm-")?.parse().ok())
        .max()
}

/// The libLLVM major version in `ldd` output.
fn llvm_from_ldd(text: &str) -> Option<u32> {
    let lib = text.split_whitespace().find(|w| w.starts_with("libLLVM"))?;
    let digits: String = lib
        .trim_start_matches("libLLVM")
        .trim_start_matches(".so")
        .trim_start_matches(['-', '.'])
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fn bpf_linker() -> Result<()> {
    let found = on_path("bpf-linker").or_else(|| {
        let p = cargo_home()?.join("bin/bpf-linker");
        p.is_file().then_some(p)
    });
    let problem = match &found {
        None => "not found".to_string(),
        Some(bin) => {
            let runs = Command::new(bin)
                .arg("--version")
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            match linker_llvm(bin) {
                _ if !runs => format!("{} --version fails", bin.display()),
                Some(LLVM) => String::new(),
                Some(v) => format!("built against LLVM {v}"),
                None => "unknown LLVM version".to_string(),
            }
        }
    };
    if problem.is_empty() {
        item(&format!("bpf-linker (LLVM {LLVM})"), "ok");
    } else {
        item(
            &format!("bpf-linker (LLVM {LLVM})"),
            &format!("installing ({problem}; cargo install takes about a minute)"),
        );
        let install = |locked: bool| {
            let mut c = Command::new("cargo");
            c.args(["install", "bpf-linker", "--force", "--no-default-features"])
                .args(["--features", &format!("llvm-{LLVM}")])
                .env("LLVM_PREFIX", format!("/usr/lib/llvm-{LLVM}"));
            if locked {
                c.arg("--locked");
            }
            let shown = show(&c);
            run_cmd(&mut c).with_context(|| format!("installing bpf-linker (`{shown}`)"))
        };
        if let Err(e) = install(true) {
            eprintln!("setup: {e:#}; trying again without --locked");
            install(false)?;
        }
    }
    // aya-build runs bpf-linker from PATH: make sure cargo's bin directory
    // is on it for the builds this xtask starts.
    if on_path("bpf-linker").is_none() {
        let bin = cargo_home()
            .map(|h| h.join("bin"))
            .context("neither CARGO_HOME nor HOME is set")?;
        if !bin.join("bpf-linker").is_file() {
            bail!(
                "bpf-linker is installed but neither on PATH nor in {}",
                bin.display()
            );
        }
        eprintln!(
            "setup: note: {} is not on PATH; adding it for this run",
            bin.display()
        );
        let mut paths = vec![bin];
        paths.extend(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ));
        let path = std::env::join_paths(paths).context("building PATH")?;
        // Still single-threaded here: nothing else reads the environment.
        std::env::set_var("PATH", path);
    } else if let (Some(first), Some(home)) = (on_path("bpf-linker"), cargo_home()) {
        if !problem.is_empty() && !first.starts_with(&home) {
            eprintln!(
                "setup: warning: {} comes first on PATH, not the bpf-linker just installed in {}",
                first.display(),
                home.join("bin").display()
            );
        }
    }
    Ok(())
}

/// The cargo-fuzz release installed (0.13.2 builds with this toolchain;
/// pinned so a fresh machine gets the same one).
const CARGO_FUZZ: &str = "0.13.2";

/// cargo-fuzz, which `cargo xtask fuzz` and the fuzzing stage of `cargo
/// xtask test` run (`cargo +nightly fuzz`).
fn cargo_fuzz() -> Result<()> {
    let found = on_path("cargo-fuzz").or_else(|| {
        let p = cargo_home()?.join("bin/cargo-fuzz");
        p.is_file().then_some(p)
    });
    let works = found.as_ref().is_some_and(|bin| {
        Command::new(bin)
            .args(["fuzz", "--version"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    });
    if works {
        item("cargo-fuzz", "ok");
        return Ok(());
    }
    item(
        "cargo-fuzz",
        &format!("installing {CARGO_FUZZ} (cargo install takes a few minutes)"),
    );
    let install = |locked: bool| {
        let mut c = Command::new("cargo");
        c.args(["install", "cargo-fuzz", "--force", "--version", CARGO_FUZZ]);
        if locked {
            c.arg("--locked");
        }
        let shown = show(&c);
        run_cmd(&mut c).with_context(|| format!("installing cargo-fuzz (`{shown}`)"))
    };
    if let Err(e) = install(true) {
        eprintln!("setup: {e:#}; trying again without --locked");
        install(false)?;
    }
    Ok(())
}

/// The unprivileged user the rootless tests run as.
pub const TEST_USER: &str = "fwdtest";

/// The rootless tests' prerequisites: an unprivileged user with
/// subordinate uid/gid ranges (RootlessKit maps them with newuidmap) and a
/// /dev/net/tun that users may open (slirp4netns; Debian's udev rule makes
/// it 0666, minimal images leave it 0600).
fn rootless() -> Result<()> {
    let exists = Command::new("id")
        .arg(TEST_USER)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if exists {
        item(&format!("test user {TEST_USER}"), "ok");
    } else {
        item(&format!("test user {TEST_USER}"), "installing");
        if !is_root() {
            bail!("creating the test user {TEST_USER} needs root");
        }
        run_cmd(Command::new("useradd").args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            TEST_USER,
        ]))?;
    }
    for (file, flag) in [
        ("/etc/subuid", "--add-subuids"),
        ("/etc/subgid", "--add-subgids"),
    ] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text
            .lines()
            .any(|l| l.starts_with(&format!("{TEST_USER}:")))
        {
            item(&format!("{file} range for {TEST_USER}"), "ok");
            continue;
        }
        item(&format!("{file} range for {TEST_USER}"), "installing");
        run_cmd(Command::new("usermod").args([flag, "300000-365535", TEST_USER]))?;
    }
    let tun = Path::new("/dev/net/tun");
    if let Ok(meta) = std::fs::metadata(tun) {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o006 == 0o006 {
            item("/dev/net/tun usable by users", "ok");
        } else {
            item("/dev/net/tun usable by users", "installing");
            std::fs::set_permissions(tun, std::fs::Permissions::from_mode(0o666))
                .context("chmod 0666 /dev/net/tun")?;
        }
    }
    Ok(())
}

/// Installs whatever is missing.
pub fn run() -> Result<()> {
    packages()?;
    rust_src()?;
    lint_tools()?;
    bpf_linker()?;
    cargo_fuzz()?;
    rootless()?;
    tracefs()?;
    Ok(())
}

/// The tracing file system, which bpftrace's and perf's tracepoints need
/// (`cargo xtask bench --profile`), mounted where the kernel puts it.
fn tracefs() -> Result<()> {
    const AT: &str = "/sys/kernel/tracing";
    let mounted = std::path::Path::new(AT).join("events").is_dir();
    item(
        &format!("tracefs at {AT}"),
        if mounted { "ok" } else { "mounting" },
    );
    if mounted || !is_root() {
        return Ok(());
    }
    run_cmd(Command::new("mount").args(["-t", "tracefs", "tracefs", AT]))
        .with_context(|| format!("mounting tracefs at {AT}"))
}

#[cfg(test)]
mod tests {
    use super::llvm_from_ldd;

    #[test]
    fn reads_the_llvm_version_from_ldd() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibLLVM.so.22.1 => /usr/lib/llvm-22/lib/libLLVM.so.22.1 (0x00007f60)\n";
        assert_eq!(llvm_from_ldd(ldd), Some(22));
        assert_eq!(
            llvm_from_ldd("\tlibLLVM-17.so.1 => /usr/lib/x/libLLVM-17.so.1 (0x1)"),
            Some(17)
        );
        assert_eq!(llvm_from_ldd("\tnot a dynamic executable"), None);
    }
}
