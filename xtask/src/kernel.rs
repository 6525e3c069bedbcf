//! `cargo xtask kernel`: the kernel patches of `contrib/kernel/`, built
//! and proven. Linux 6.12 from Debian's `linux-source-6.12` is built twice
//! with one configuration (`contrib/kernel/config.fragment` over
//! virtme-ng's minimal one): as released ("stock") and with every
//! `contrib/kernel/*.patch` applied ("patched"). Each image boots under
//! virtme-ng (the host's root filesystem, copy-on-write, as in `cargo
//! xtask vm-test`) and runs:
//!
//! - the local-client path's application suite (`tests/local_apps.rs`),
//!   its ignored cases included: those are the ones a kernel limit fails;
//! - `forwarder check --json`: the path's start-up self-test, and what
//!   auto mode picks on that kernel.
//!
//! The report, a case × kernel table, goes to `target/kernel/report.md`;
//! `--record` also writes `contrib/kernel/RESULTS.md`.
//!
//! - Set-up: the Debian packages a kernel build needs (`linux-source-6.12`,
//!   `flex`, `bison`, `bc`, `libelf-dev`, `libssl-dev`, `dwarves` for
//!   BTF) and vm-test's (QEMU, virtiofsd, vng).
//! - Build: `target/kernel/linux-source-6.12/`, `make bzImage` with all
//!   cores. The first build takes about 12 minutes on 2 cores; the patched
//!   one rebuilds only what the patches touch. An image already built for
//!   the same patches is reused (`--rebuild` forces both).

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::util::{check_interrupted, is_root, output, root, run as run_cmd, target_dir};
use crate::vmtest::{self, Kernel, Outcome};

/// The Debian package holding the source.
const SOURCE_PKG: &str = "linux-source-6.12";

/// Limit per boot, in minutes.
const BOOT_MINUTES: u64 = 20;

#[derive(clap::Args)]
pub struct Args {
    /// Build both images again, from a clean tree.
    #[arg(long)]
    rebuild: bool,
    /// Also write contrib/kernel/RESULTS.md.
    #[arg(long)]
    record: bool,
}

fn say(msg: &str) {
    println!("kernel: {msg}");
}

/// The patches, in the order they apply.
fn patches() -> Result<Vec<PathBuf>> {
    let dir = root().join("contrib/kernel");
    let mut v: Vec<PathBuf> = fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "patch"))
        .collect();
    v.sort();
    if v.is_empty() {
        bail!("no patches in {}", dir.display());
    }
    Ok(v)
}

/// Installs what building the kernel needs.
fn build_setup() -> Result<()> {
    let missing: Vec<&str> = [
        SOURCE_PKG,
        "flex",
        "bison",
        "bc",
        "libelf-dev",
        "libssl-dev",
        "dwarves",
        "cpio",
    ]
    .into_iter()
    .filter(|p| !vmtest::dpkg_installed(p))
    .collect();
    if !missing.is_empty() {
        say(&format!("packages {}: installing", missing.join(" ")));
        run_cmd(vmtest::apt_get().arg("update")).context("apt-get update")?;
        run_cmd(
            vmtest::apt_get()
                .args(["install", "-y", "--no-install-recommends"])
                .args(&missing),
        )
        .context("installing the kernel build's packages")?;
    }
    Ok(())
}

/// The source tree, extracted from Debian's tarball if absent.
fn source_tree(work: &Path, fresh: bool) -> Result<PathBuf> {
    let tree = work.join(SOURCE_PKG);
    if fresh && tree.exists() {
        fs::remove_dir_all(&tree).with_context(|| format!("removing {}", tree.display()))?;
    }
    if !tree.join("Makefile").is_file() {
        let tarball = format!("/usr/src/{SOURCE_PKG}.tar.xz");
        say(&format!("extracting {tarball}"));
        fs::create_dir_all(work)?;
        run_cmd(Command::new("tar").args(["xf", &tarball, "-C"]).arg(work))
            .with_context(|| format!("extracting {tarball}"))?;
    }
    Ok(tree)
}

/// A marker in the tree saying the patches are applied.
fn marker(tree: &Path) -> PathBuf {
    tree.join(".forwarder-patches-applied")
}

/// Applies (`reverse` false) or takes back the patches.
fn patch_tree(tree: &Path, patches: &[PathBuf], reverse: bool) -> Result<()> {
    let list: Vec<&PathBuf> = if reverse {
        patches.iter().rev().collect()
    } else {
        patches.iter().collect()
    };
    for p in list {
        let mut cmd = Command::new("patch");
        cmd.args(["-p1", "--forward", "--quiet"]).current_dir(tree);
        if reverse {
            cmd.arg("-R");
        }
        let file = fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
        run_cmd(cmd.stdin(file)).with_context(|| {
            format!(
                "{} {} in {}",
                if reverse { "reverting" } else { "applying" },
                p.display(),
                tree.display()
            )
        })?;
    }
    if reverse {
        let _ = fs::remove_file(marker(tree));
    } else {
        fs::write(marker(tree), "")?;
    }
    Ok(())
}

/// Configures the tree: vng's minimal configuration, the fragment, and a
/// local version naming the build.
fn configure(tree: &Path) -> Result<()> {
    let fragment = root().join("contrib/kernel/config.fragment");
    let vng = vmtest::which("vng").context("vng is not installed")?;
    run_cmd(
        Command::new(vng)
            .args(["--kconfig", "--config"])
            .arg(&fragment)
            .current_dir(tree),
    )
    .context("vng --kconfig")?;
    run_cmd(
        Command::new("./scripts/config")
            .args(["--set-str", "LOCALVERSION", "-fwd"])
            .current_dir(tree),
    )?;
    run_cmd(
        Command::new("make")
            .arg("olddefconfig")
            .current_dir(tree)
            .stdout(std::process::Stdio::null()),
    )
    .context("make olddefconfig")?;
    Ok(())
}

/// `make bzImage` with every core; returns the image's path in the tree.
fn make(tree: &Path, log: &Path) -> Result<PathBuf> {
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    let log_file = fs::File::create(log)?;
    let status = Command::new("make")
        .arg(format!("-j{jobs}"))
        .arg("bzImage")
        .current_dir(tree)
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .status()
        .context("starting make")?;
    if !status.success() {
        bail!(
            "make bzImage failed ({status}); the end of {}:\n{}",
            log.display(),
            vmtest::tail(log, 30)
        );
    }
    Ok(tree.join("arch/x86/boot/bzImage"))
}

/// The release string the tree builds.
fn kernel_release(tree: &Path) -> Result<String> {
    Ok(output(
        Command::new("make")
            .args(["-s", "kernelrelease"])
            .current_dir(tree),
    )?
    .trim()
    .to_string())
}

/// Builds both images (or finds them built for these patches).
fn build_images(work: &Path, patches: &[PathBuf], rebuild: bool) -> Result<[Kernel; 2]> {
    let stock = work.join("bzImage-stock");
    let patched = work.join("bzImage-patched");
    // The patched image is current if it was built from these patches.
    let mut stamp = String::new();
    for p in patches {
        stamp.push_str(&fs::read_to_string(p)?);
    }
    stamp.push_str(&fs::read_to_string(
        root().join("contrib/kernel/config.fragment"),
    )?);
    let stamp_file = work.join("patched.stamp");
    let current = !rebuild
        && stock.is_file()
        && patched.is_file()
        && fs::read_to_string(&stamp_file).is_ok_and(|s| s == stamp);
    let tree = source_tree(work, rebuild)?;
    if !current {
        if marker(&tree).exists() {
            patch_tree(&tree, patches, true)?;
        }
        configure(&tree)?;
        say("building the stock image (about 12 minutes on 2 cores the first time)");
        let img = make(&tree, &work.join("build-stock.log"))?;
        fs::copy(&img, &stock)?;
        check_interrupted()?;
        patch_tree(&tree, patches, false)?;
        say("building the patched image");
        let img = make(&tree, &work.join("build-patched.log"))?;
        fs::copy(&img, &patched)?;
        fs::write(&stamp_file, &stamp)?;
    } else {
        say("images built for these patches: reused");
    }
    let release = kernel_release(&tree)?;
    Ok([
        Kernel {
            line: "6.12-stock",
            release: release.clone(),
            image: stock,
        },
        Kernel {
            line: "6.12-patched",
            release,
            image: patched,
        },
    ])
}

/// The release binaries: the forwarder and the `local_apps` test binary.
fn binaries() -> Result<(PathBuf, PathBuf)> {
    let apps = vmtest::build_tests(&["local_apps"])?
        .remove("local_apps")
        .context("cargo built no local_apps test binary")?;
    Ok((target_dir()?.join("release/forwarder"), apps))
}

/// What one boot found.
struct Column {
    title: String,
    results: std::collections::BTreeMap<String, Outcome>,
    details: std::collections::BTreeMap<String, String>,
    /// `forwarder check --json` in the guest.
    check: serde_json::Value,
    error: Option<String>,
}

/// The guest script: the suite (ignored cases too, one at a time), then
/// `forwarder check --json`.
fn script(forwarder: &Path, apps: &Path) -> String {
    let mut s = String::from("#!/bin/sh\n# Written by cargo xtask kernel; runs inside the VM.\n");
    let _ = writeln!(s, "cd \"$(dirname \"$0\")\" || exit 1");
    let _ = writeln!(s, "uname -r > kernel");
    let _ = writeln!(s, "export FORWARDER_BIN='{}'", forwarder.display());
    // Time limits stretched for an emulated CPU, as in vm-test.
    let _ = writeln!(s, "export FWD_TEST_TIME_SCALE=6");
    let _ = writeln!(
        s,
        "'{}' --include-ignored --test-threads 1 > local_apps.out 2>&1; echo $? > local_apps.rc",
        apps.display()
    );
    let _ = writeln!(
        s,
        "'{}' check --json > check.json 2> check.err",
        forwarder.display()
    );
    let _ = writeln!(s, "touch done");
    s
}

fn boot(k: &Kernel, script: &str) -> Column {
    let mut col = Column {
        title: format!("{} ({})", k.line, k.release),
        results: Default::default(),
        details: Default::default(),
        check: serde_json::Value::Null,
        error: None,
    };
    let args = vmtest::Args::with_timeout(BOOT_MINUTES);
    let label = format!("kernel-{}", k.line);
    match vmtest::boot(k, &label, &[], script, &args) {
        Ok(dir) => {
            let out = fs::read_to_string(dir.join("local_apps.out")).unwrap_or_default();
            col.results = vmtest::parse_libtest(&out);
            col.details = vmtest::failure_details(&out);
            col.check = fs::read_to_string(dir.join("check.json"))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or(serde_json::Value::Null);
            let rel = vmtest::read_trim(&dir.join("kernel"));
            if rel != k.release {
                col.error = Some(format!("the guest ran {rel}, not {}", k.release));
            }
        }
        Err(e) => col.error = Some(format!("{e:#}")),
    }
    col
}

/// The report: a row per case, a column per image, then the self-test and
/// auto mode's choice.
fn report(cols: &[Column], patches: &[PathBuf], date: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# The kernel patches, before and after (`cargo xtask kernel`, {date})\n"
    );
    let _ = writeln!(
        s,
        "Linux 6.12 from Debian's `{SOURCE_PKG}`, built with \
         [config.fragment](config.fragment) over virtme-ng's minimal \
         configuration, as released and with:\n"
    );
    for p in patches {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        let _ = writeln!(s, "- [{name}]({name})");
    }
    let _ = writeln!(
        s,
        "\nEach image booted under QEMU (TCG, 2 vCPUs) and ran the local-client \
         path's application suite (`tests/local_apps.rs`, ignored cases included) \
         through `--mode ebpf --local-path`, then `forwarder check`.\n"
    );
    vmtest::table_head(&mut s, &["case"], cols.iter().map(|c| c.title.as_str()));
    for n in vmtest::case_names(cols.iter().map(|c| &c.results)) {
        let _ = write!(s, "| {n} |");
        for c in cols {
            let _ = write!(s, " {} |", vmtest::mark(c.results.get(n)));
        }
        s.push('\n');
    }
    let _ = write!(s, "| self-test: blocking reads on admitted sockets |");
    for c in cols {
        let p = &c.check["probes"]["local_blocking_read"];
        let _ = write!(
            s,
            " {} |",
            match p["ok"].as_bool() {
                Some(true) => "kept",
                Some(false) => "EAGAIN",
                None => "not run",
            }
        );
    }
    let _ = write!(s, "\n| auto mode picks |");
    for c in cols {
        let _ = write!(
            s,
            " {} |",
            c.check["auto"]["engine"].as_str().unwrap_or("?")
        );
    }
    s.push('\n');
    for c in cols {
        if let Some(e) = &c.error {
            let _ = writeln!(s, "\n{}: {}", c.title, e.lines().next().unwrap_or_default());
        }
        if !c.details.is_empty() {
            let _ = writeln!(s, "\nFailures on {}:\n", c.title);
            for (n, d) in &c.details {
                let _ = writeln!(s, "- `{n}`: {d}");
            }
        }
    }
    s
}

pub fn run(args: &Args) -> Result<()> {
    if !is_root() {
        bail!("cargo xtask kernel installs packages and boots kernels: run it as root");
    }
    crate::util::catch_interrupts();
    crate::setup::run()?;
    vmtest::setup()?;
    build_setup()?;
    let patches = patches()?;
    let work = target_dir()?.join("kernel");
    fs::create_dir_all(&work)?;
    let kernels = build_images(&work, &patches, args.rebuild)?;
    let (forwarder, apps) = binaries()?;
    let script = script(&forwarder, &apps);
    let mut cols = Vec::new();
    for k in &kernels {
        check_interrupted()?;
        say(&format!("booting {} ({})", k.line, k.image.display()));
        cols.push(boot(k, &script));
    }
    let date = crate::util::UtcTime::now().date();
    let text = report(&cols, &patches, &date);
    let path = work.join("report.md");
    fs::write(&path, &text)?;
    println!("{text}");
    say(&format!("report: {}", path.display()));
    if args.record {
        let results = root().join("contrib/kernel/RESULTS.md");
        fs::write(&results, &text).with_context(|| format!("writing {}", results.display()))?;
        say(&format!("recorded {}", results.display()));
    }
    // The patched kernel must pass every case; the stock one is the
    // "before" and fails where the patches matter.
    let patched = &cols[1];
    let failed: Vec<&String> = patched
        .results
        .iter()
        .filter(|(_, o)| **o != Outcome::Pass)
        .map(|(n, _)| n)
        .collect();
    if patched.error.is_some() || patched.results.is_empty() || !failed.is_empty() {
        bail!(
            "the patched kernel did not pass: {:?} {}",
            failed,
            patched.error.as_deref().unwrap_or("")
        );
    }
    Ok(())
}
