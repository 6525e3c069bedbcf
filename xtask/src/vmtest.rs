//! `cargo xtask vm-test [--kernel 6.1|6.12|all]`: the engine suite on the
//! kernels users run, booted with virtme-ng under QEMU.
//!
//! - Set-up, idempotent and quick when done: the bookworm-backports apt
//!   source, the Debian packages `kmod` (vng runs depmod),
//!   `qemu-system-x86` (from backports: bookworm's 7.2 conflicts with the
//!   backports QEMU tools already installed here), `libseccomp-dev` and
//!   `libcap-ng-dev` (virtiofsd's build needs them), `cargo install
//!   virtiofsd` (Debian 12 does not package it; vng shares the root
//!   filesystem through it) and `pip install virtme-ng`.
//! - Kernels: Debian's cloud kernels of each line
//!   (`linux-image-…-cloud-amd64-unsigned`, 6.12 from bookworm-backports)
//!   fetched with `apt-get download` into `target/vm/debs/` and installed
//!   with `apt-get install ./….deb` (adds `/boot/vmlinuz-…` and
//!   `/lib/modules/…`; the running kernel is untouched). A deb already in
//!   the cache is used as it is: a second run downloads nothing.
//! - Boot: `vng --run /boot/vmlinuz-… --disable-kvm` (TCG: KVM hung on
//!   this kind of machine), the host's root filesystem seen copy-on-write
//!   and read-only to the host (no `--rw`), with one read-write scratch
//!   directory (`--rwdir`, `target/vm/run/LABEL/`) where the guest writes
//!   the test output and exit codes. The guest powers off when the script
//!   ends. xtask waits up to `--timeout` per boot, then kills QEMU (and
//!   vng) by PID; a boot that panics, hangs or leaves no results fails with
//!   the tail of its console (`target/vm/run/LABEL/console.log`).
//! - Inside: the release `engines` test binary (the same one `cargo xtask
//!   test` runs) for the ebpf (verdict only and with a stream parser),
//!   splice and copy engines, big transfers cut to 64 MiB
//!   (`FWD_TEST_BIG_BYTES`) for an emulated CPU. The same selection runs on
//!   the host too, for the host kernel's column.
//! - Also inside: the local-client path's application suite
//!   (`tests/local_apps.rs`, the pseudo-engine `local_apps`: real
//!   programs, kTLS turned on after admission, the path's self-test
//!   against a blocking reader);
//! - and the source-preservation suite (`tests/source_ip.rs`,
//!   shown as the pseudo-engine `source_ip`), root and rootless: the
//!   return rules, marks and `fwmark_reflect` on the kernels users run.
//! - One more boot with `ipv6.disable=1`: no IPv6 in any namespace. It runs
//!   the IPv6 publishing-rule test of `tests/cli.rs`
//!   (`parent_without_ipv6_keeps_the_ipv4_half`: the unspecified-address
//!   port comes up IPv4-only with a warning, tcp6 is refused alone,
//!   /v1/info lists no tcp6) and checks the guest really had no IPv6.
//! - Report: a kernel × engine × case table, `target/vm/vm-matrix.md`;
//!   `--record` also writes `bench/results/vm-matrix.md`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use forwarder_testkit::wait::try_wait_until_or_abort;

use crate::util::{cargo, check_interrupted, is_root, output, root, run as run_cmd, target_dir};

/// Big transfers inside the VMs (and in the host column): 64 MiB.
const BIG_BYTES: u64 = 64 << 20;

/// Time limits inside the guests are stretched this much
/// (`FWD_TEST_TIME_SCALE`): under TCG on a shared 2-core machine the
/// 256-connection, 300-idle-connection and slow-reader cases took longer
/// than their real-hardware limits on every engine, copy included.
const TIME_SCALE: u32 = 6;

/// The engines the matrix covers: the suite's module names, and
/// [`SOURCE_IP`] and [`LOCAL_APPS`] for suites of their own.
const ENGINES: &[&str] = &[
    "ebpf",
    "ebpf_parser",
    "ebpf_local",
    "splice",
    "copy",
    SOURCE_IP,
    LOCAL_APPS,
];

/// The source-preservation suite's cases are listed as `source_ip::CASE`.
const SOURCE_IP: &str = "source_ip";

/// The local-client path's application suite's cases are listed as
/// `local_apps::CASE`.
const LOCAL_APPS: &str = "local_apps";

/// The suites of their own, besides the engines suite.
const OWN_SUITES: [&str; 2] = [SOURCE_IP, LOCAL_APPS];

/// The engines `cargo xtask test` (CI) runs in the 6.1 guest: the two
/// ebpf variants, whose data path is the kernel's sockmap code. The whole
/// 6.1 matrix took 23 minutes in the guest here (QEMU TCG, a shared 2-core
/// machine), too close to CI's 35-minute share with boot and build; splice
/// and copy (plain syscalls, the same on every kernel line) run on demand.
///
/// The application suite (`local_apps`) runs on demand: on 6.1 its
/// splice(2)-reading server got EAGAIN from a blocking splice on an
/// admitted socket in 1 of 3 runs (the path is off there by default).
const CI_ENGINES: &[&str] = &["ebpf", "ebpf_parser", SOURCE_IP];

/// The IPv6 publishing-rule test run in the `ipv6.disable=1` boot.
const IPV6_TEST: &str = "parent_without_ipv6_keeps_the_ipv4_half";

/// A Debian kernel line.
#[derive(Clone, Copy, Debug)]
struct Line {
    /// As given to `--kernel`.
    name: &'static str,
    /// Package name: `linux-image-` + this + a version + `-cloud-amd64-unsigned`.
    prefix: &'static str,
}

const LINES: &[Line] = &[
    Line {
        name: "6.1",
        prefix: "6.1.0-",
    },
    Line {
        name: "6.12",
        prefix: "6.12.",
    },
];

#[derive(clap::Args)]
pub struct Args {
    /// Which kernel line(s) to boot: 6.1, 6.12 or all.
    #[arg(long, default_value = "all")]
    kernel: String,
    /// Test threads inside each VM.
    #[arg(long, default_value_t = 2)]
    threads: u32,
    /// Limit per boot, in minutes; QEMU is killed after it.
    #[arg(long, default_value_t = 45)]
    timeout: u64,
    /// Only these engines (comma-separated: ebpf, ebpf_parser, ebpf_local,
    /// splice, copy) and suites (source_ip, local_apps).
    #[arg(long = "engine", value_delimiter = ',', default_values_t = ENGINES.iter().map(|e| e.to_string()))]
    engines: Vec<String>,
    /// Only cases whose name contains one of these (e.g. `big_transfers`).
    #[arg(long = "case")]
    cases: Vec<String>,
    /// Skip the host column.
    #[arg(long)]
    no_host: bool,
    /// Skip the `ipv6.disable=1` boot.
    #[arg(long)]
    no_ipv6_boot: bool,
    /// Also write bench/results/vm-matrix.md.
    #[arg(long)]
    record: bool,
}

impl Args {
    /// Boots of other tasks (`cargo xtask kernel`): only the limit per
    /// boot matters to [`boot`].
    pub(crate) fn with_timeout(minutes: u64) -> Args {
        Args {
            timeout: minutes,
            ..Args::for_ci()
        }
    }
}

impl Args {
    /// What `cargo xtask test` runs: the 6.1 line, everything else default.
    pub fn for_ci() -> Args {
        Args {
            kernel: "6.1".into(),
            threads: 2,
            timeout: 45,
            engines: CI_ENGINES.iter().map(|e| e.to_string()).collect(),
            cases: Vec::new(),
            no_host: true,
            no_ipv6_boot: false,
            record: false,
        }
    }
}

pub(crate) fn say(msg: &str) {
    println!("vm-test: {msg}");
}

pub(crate) fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).trim_end() == "install ok installed"
        })
}

/// `apt-get` that waits for a lock another apt holds instead of failing.
pub(crate) fn apt_get() -> Command {
    let mut c = Command::new("apt-get");
    c.args(["-o", "DPkg::Lock::Timeout=900", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive");
    c
}

const BACKPORTS_LIST: &str = "/etc/apt/sources.list.d/bookworm-backports.sources";

/// Adds bookworm-backports to apt's sources if no source names it yet.
/// Returns whether it was added (the lists then need an update).
fn ensure_backports() -> Result<bool> {
    let mut texts = vec![fs::read_to_string("/etc/apt/sources.list").unwrap_or_default()];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        for e in dir.flatten() {
            texts.push(fs::read_to_string(e.path()).unwrap_or_default());
        }
    }
    if texts.iter().any(|t| {
        t.lines()
            .any(|l| !l.trim_start().starts_with('#') && l.contains("bookworm-backports"))
    }) {
        return Ok(false);
    }
    say("apt source bookworm-backports: adding");
    fs::write(
        BACKPORTS_LIST,
        "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\n\
         Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
    )
    .with_context(|| format!("writing {BACKPORTS_LIST}"))?;
    Ok(true)
}

/// Installs what booting a kernel with vng needs; quick when present.
pub(crate) fn setup() -> Result<()> {
    let added = ensure_backports()?;
    let mut updated = false;
    let update = |updated: &mut bool| -> Result<()> {
        if !*updated {
            run_cmd(apt_get().arg("update")).context("apt-get update")?;
            *updated = true;
        }
        Ok(())
    };
    if added {
        update(&mut updated)?;
    }
    let plain: Vec<&str> = ["kmod", "libseccomp-dev", "libcap-ng-dev"]
        .into_iter()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if !plain.is_empty() {
        say(&format!("packages {}: installing", plain.join(" ")));
        update(&mut updated)?;
        run_cmd(
            apt_get()
                .args(["install", "-y", "--no-install-recommends"])
                .args(&plain),
        )
        .context("installing vng's and virtiofsd's build dependencies")?;
    }
    if !dpkg_installed("qemu-system-x86") {
        say("package qemu-system-x86 (bookworm-backports): installing");
        update(&mut updated)?;
        run_cmd(apt_get().args([
            "install",
            "-y",
            "--no-install-recommends",
            "-t",
            "bookworm-backports",
            "qemu-system-x86",
        ]))
        .context("installing qemu-system-x86 from bookworm-backports")?;
    }
    if which("virtiofsd").is_none() {
        say("virtiofsd: cargo install (about 3 minutes)");
        run_cmd(Command::new("cargo").args(["install", "--locked", "virtiofsd"]))
            .context("cargo install virtiofsd")?;
    }
    if which("vng").is_none() {
        say("virtme-ng: pip install");
        run_cmd(Command::new("pip").args(["install", "virtme-ng"]))
            .context("pip install virtme-ng")?;
    }
    Ok(())
}

/// A program on PATH (or in cargo's bin directory).
pub(crate) fn which(prog: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(prog)).find(|p| p.is_file())
}

/// A kernel ready to boot.
#[derive(Clone, Debug)]
pub(crate) struct Kernel {
    /// Its label: the line's name, and the scratch directory's.
    pub line: &'static str,
    /// `uname -r` inside, e.g. 6.1.0-57-cloud-amd64.
    pub release: String,
    /// The image vng boots.
    pub image: PathBuf,
}

/// The release a package name carries, if it is of `line`.
fn release_of(line: &Line, file_or_pkg: &str) -> Option<String> {
    let name = file_or_pkg.split('_').next()?;
    let rest = name.strip_prefix("linux-image-")?;
    let rel = rest.strip_suffix("-unsigned")?;
    if !rel.starts_with(line.prefix) || !rel.ends_with("-cloud-amd64") {
        return None;
    }
    // 6.1.0-57-cloud-amd64 / 6.12.117+deb12-cloud-amd64: the part after
    // the prefix starts with the ABI or patch number.
    rel[line.prefix.len()..]
        .starts_with(|c: char| c.is_ascii_digit())
        .then(|| rel.to_string())
}

/// Orders releases by their numbers (57 after 9).
fn version_key(rel: &str) -> Vec<u64> {
    rel.split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The newest cached deb of a line.
fn cached_deb(debs: &Path, line: &Line) -> Option<(PathBuf, String)> {
    let mut found: Vec<(PathBuf, String)> = fs::read_dir(debs)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.ends_with(".deb") {
                return None;
            }
            release_of(line, &name).map(|r| (e.path(), r))
        })
        .collect();
    found.sort_by_key(|(_, r)| version_key(r));
    found.pop()
}

/// Finds (cache, else apt) and installs the newest kernel of a line.
fn kernel(line: &Line, debs: &Path) -> Result<Kernel> {
    fs::create_dir_all(debs).with_context(|| format!("creating {}", debs.display()))?;
    let (deb, release) = match cached_deb(debs, line) {
        Some(found) => found,
        None => {
            let search = || -> Result<Vec<String>> {
                let out = output(Command::new("apt-cache").args([
                    "search",
                    "--names-only",
                    "^linux-image-.*-cloud-amd64-unsigned$",
                ]))?;
                let mut rels: Vec<String> = out
                    .lines()
                    .filter_map(|l| l.split_whitespace().next())
                    .filter_map(|p| release_of(line, p))
                    .collect();
                rels.sort_by_key(|r| version_key(r));
                Ok(rels)
            };
            let mut rels = search()?;
            if rels.is_empty() {
                run_cmd(apt_get().arg("update")).context("apt-get update")?;
                rels = search()?;
            }
            let Some(rel) = rels.pop() else {
                bail!(
                    "apt knows no linux-image-{}*-cloud-amd64-unsigned (6.12 is in \
                     bookworm-backports)",
                    line.prefix
                );
            };
            say(&format!(
                "kernel {}: downloading linux-image-{rel}-unsigned",
                line.name
            ));
            run_cmd(
                apt_get()
                    .current_dir(debs)
                    .args(["download", &format!("linux-image-{rel}-unsigned")]),
            )
            .with_context(|| format!("apt-get download of the {} kernel", line.name))?;
            cached_deb(debs, line).context("apt-get download left no .deb")?
        }
    };
    let k = Kernel {
        line: line.name,
        image: PathBuf::from(format!("/boot/vmlinuz-{release}")),
        release,
    };
    let modules = PathBuf::from(format!("/lib/modules/{}/modules.dep", k.release));
    if k.image.is_file() && modules.is_file() {
        say(&format!("kernel {} ({}): ok", line.name, k.release));
    } else {
        say(&format!("kernel {} ({}): installing", line.name, k.release));
        run_cmd(
            apt_get()
                .args(["install", "-y", "--no-install-recommends"])
                .arg(&deb),
        )
        .with_context(|| format!("installing {}", deb.display()))?;
        if !k.image.is_file() {
            bail!(
                "installed {} but {} is missing",
                deb.display(),
                k.image.display()
            );
        }
    }
    Ok(k)
}

/// The release test binaries (`engines`, `cli`) and the forwarder.
struct Binaries {
    forwarder: PathBuf,
    engines: PathBuf,
    source_ip: PathBuf,
    local_apps: PathBuf,
    cli: PathBuf,
}

/// Builds the workspace in release mode and the named test binaries of
/// `tests/`; returns each binary's path by name.
pub(crate) fn build_tests(names: &[&str]) -> Result<BTreeMap<String, PathBuf>> {
    run_cmd(
        cargo()
            .args(["build", "--release"])
            .args(crate::test::WORKSPACE),
    )
    .context("building the workspace")?;
    let mut cmd = cargo();
    cmd.args(["test", "--release", "-p", "forwarder-tests"]);
    for n in names {
        cmd.args(["--test", n]);
    }
    let out = output(cmd.args(["--no-run", "--message-format=json"]))
        .context("building the test binaries")?;
    let mut found = BTreeMap::new();
    for l in out.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
            continue;
        };
        if let (Some(name), Some(exe)) = (v["target"]["name"].as_str(), v["executable"].as_str()) {
            found.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    Ok(found)
}

fn build() -> Result<Binaries> {
    let found = build_tests(&["engines", "cli", "source_ip", "local_apps"])?;
    let get = |n: &str| {
        found
            .get(n)
            .cloned()
            .with_context(|| format!("cargo built no `{n}` test binary"))
    };
    Ok(Binaries {
        forwarder: target_dir()?.join("release/forwarder"),
        engines: get("engines")?,
        source_ip: get("source_ip")?,
        local_apps: get("local_apps")?,
        cli: get("cli")?,
    })
}

/// How one case ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Pass,
    Fail,
    /// Started but no result: the run was cut (timeout, panic).
    Unfinished,
}

/// Results of one column: case name -> outcome.
#[derive(Debug, Default)]
struct Column {
    /// Header: kernel release.
    title: String,
    results: BTreeMap<String, Outcome>,
    /// A failed case's panic message.
    details: BTreeMap<String, String>,
    /// Why the run as a whole failed, if it did.
    error: Option<String>,
    took: Duration,
}

/// Reads libtest's `test NAME ... ok|FAILED` lines.
pub(crate) fn parse_libtest(text: &str) -> BTreeMap<String, Outcome> {
    let mut r = BTreeMap::new();
    for l in text.lines() {
        let Some(rest) = l.strip_prefix("test ") else {
            continue;
        };
        let Some((name, verdict)) = rest.split_once(" ... ") else {
            continue;
        };
        let o = match verdict.trim() {
            "ok" => Outcome::Pass,
            v if v.starts_with("FAILED") => Outcome::Fail,
            _ => continue,
        };
        r.insert(name.trim().to_string(), o);
    }
    r
}

/// Each failed case's panic message, from libtest's `---- NAME stdout
/// ----` sections (the lines after "panicked at", up to three).
pub(crate) fn failure_details(text: &str) -> BTreeMap<String, String> {
    let mut r = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut lines = text.lines().peekable();
    while let Some(l) = lines.next() {
        if let Some(name) = l
            .strip_prefix("---- ")
            .and_then(|x| x.strip_suffix(" stdout ----"))
        {
            current = Some(name.to_string());
            continue;
        }
        if let (Some(name), true) = (&current, l.contains("panicked at")) {
            let mut msg = Vec::new();
            while let Some(m) = lines.peek() {
                if m.is_empty()
                    || m.starts_with("note:")
                    || m.starts_with("---- ")
                    || msg.len() == 3
                {
                    break;
                }
                msg.push(m.trim().to_string());
                lines.next();
            }
            r.entry(name.clone()).or_insert_with(|| msg.join(" "));
            current = None;
        }
    }
    r
}

/// The libtest arguments selecting the matrix's cases.
fn test_args() -> Vec<String> {
    let mut v: Vec<String> = ENGINES.iter().map(|e| format!("{e}::")).collect();
    // `ebpf::` also matches `rootless_ebpf::`.
    v.extend(["--skip".into(), "rootless".into()]);
    v
}

/// Keeps only cases of the `--engine`s whose name contains one of the
/// `--case` filters.
fn case_filter(args: &Args, name: &str) -> bool {
    let engine = name.split_once("::").map_or("", |(e, _)| e);
    args.engines.iter().any(|e| e == engine)
        && (args.cases.is_empty() || args.cases.iter().any(|c| name.contains(c.as_str())))
}

/// The names libtest would run with these arguments.
fn list_cases(bin: &Path, args: &[String]) -> Result<Vec<String>> {
    let out = output(
        Command::new(bin)
            .args(args)
            .args(["--list", "--format", "terse"]),
    )?;
    Ok(out
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_string)
        .collect())
}

/// Runs the selection on the host kernel.
fn host_column(bins: &Binaries, cases: &[String], args: &Args, dir: &Path) -> Result<Column> {
    let release = crate::util::kernel_release()?.trim().to_string();
    say(&format!("host ({release}): {} cases", cases.len()));
    let t0 = Instant::now();
    let mut col = Column {
        title: format!("host {release}"),
        ..Default::default()
    };
    for (suite, bin, run_args) in suite_runs(bins, cases, args) {
        let out = Command::new(&bin)
            .env("FORWARDER_BIN", &bins.forwarder)
            .env("FWD_TEST_BIG_BYTES", BIG_BYTES.to_string())
            .args(&run_args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running the {suite} suite on the host"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        fs::write(dir.join(format!("host-{suite}.out")), text.as_bytes())?;
        add_results(&mut col, &suite, &text);
    }
    col.took = t0.elapsed();
    complete(&mut col, cases);
    Ok(col)
}

/// The test binary of a suite of its own ([`OWN_SUITES`]).
fn own_suite_bin<'a>(bins: &'a Binaries, suite: &str) -> &'a PathBuf {
    if suite == SOURCE_IP {
        &bins.source_ip
    } else {
        &bins.local_apps
    }
}

/// The suites to run for `cases`, each as (name, test binary, libtest
/// arguments): the engines suite, and each suite of its own for its
/// `SUITE::` cases (named there without the prefix).
fn suite_runs(
    bins: &Binaries,
    cases: &[String],
    args: &Args,
) -> Vec<(String, PathBuf, Vec<String>)> {
    let base = || {
        vec![
            "--exact".to_string(),
            "--test-threads".into(),
            args.threads.to_string(),
        ]
    };
    let mut runs = Vec::new();
    let engines: Vec<&String> = cases
        .iter()
        .filter(|c| !OWN_SUITES.iter().any(|s| c.starts_with(&format!("{s}::"))))
        .collect();
    if !engines.is_empty() {
        let mut a = base();
        a.extend(engines.into_iter().cloned());
        runs.push(("engines".to_string(), bins.engines.clone(), a));
    }
    for suite in OWN_SUITES {
        let prefix = format!("{suite}::");
        let mine: Vec<&String> = cases.iter().filter(|c| c.starts_with(&prefix)).collect();
        if !mine.is_empty() {
            let mut a = base();
            a.extend(mine.iter().map(|c| c[prefix.len()..].to_string()));
            runs.push((suite.to_string(), own_suite_bin(bins, suite).clone(), a));
        }
    }
    runs
}

/// Adds one suite's libtest output to a column (a suite of its own's
/// names get their prefix).
fn add_results(col: &mut Column, suite: &str, text: &str) {
    let name = |n: String| {
        if OWN_SUITES.contains(&suite) {
            format!("{suite}::{n}")
        } else {
            n
        }
    };
    col.results
        .extend(parse_libtest(text).into_iter().map(|(n, o)| (name(n), o)));
    col.details
        .extend(failure_details(text).into_iter().map(|(n, d)| (name(n), d)));
}

/// Marks cases without a result as unfinished.
fn complete(col: &mut Column, cases: &[String]) {
    for c in cases {
        col.results.entry(c.clone()).or_insert(Outcome::Unfinished);
    }
}

/// PIDs of every descendant of `pid`.
fn descendants(pid: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            // "pid (comm) state ppid ...": comm may hold spaces.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u32>().ok());
            if let Some(pp) = ppid {
                parent_of.push((p, pp));
            }
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(x) = frontier.pop() {
        for &(p, pp) in &parent_of {
            if pp == x && !out.contains(&p) {
                out.push(p);
                frontier.push(p);
            }
        }
    }
    out
}

fn kill(pid: u32) {
    // SAFETY: kill has no memory-safety preconditions; the PID is one of
    // our own children's tree.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
}

/// The last `n` lines of a file.
pub(crate) fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The scratch directory of a boot.
fn run_dir(label: &str) -> Result<PathBuf> {
    Ok(target_dir()?.join("vm/run").join(label))
}

/// One boot: runs `script` (a shell script written to the scratch
/// directory) and waits for it. Returns the scratch directory.
pub(crate) fn boot(
    k: &Kernel,
    label: &str,
    append: &[&str],
    script: &str,
    args: &Args,
) -> Result<PathBuf> {
    let dir = run_dir(label)?;
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let script_path = dir.join("run.sh");
    fs::write(&script_path, script)?;
    let console = dir.join("console.log");
    let log = fs::File::create(&console)?;
    let mut cmd = vng_command(k, &dir, &script_path, append, log)?;
    say(&format!(
        "boot {label}: {} (console: {})",
        k.release,
        console.display()
    ));
    let mut child = cmd.spawn().context("starting vng")?;
    let t0 = Instant::now();
    let status = wait_for_guest(&mut child, t0, k, label, &console, args)?;
    let console_text = fs::read_to_string(&console).unwrap_or_default();
    if console_text.contains("Kernel panic") {
        bail!(
            "boot {label} ({}): kernel panic. Console tail:\n{}",
            k.release,
            tail(&console, 40)
        );
    }
    if !dir.join("done").is_file() {
        bail!(
            "boot {label} ({}): the guest script did not finish (vng {:?}). Console tail:\n{}",
            k.release,
            status,
            tail(&console, 40)
        );
    }
    say(&format!(
        "boot {label}: done in {:.0} s",
        t0.elapsed().as_secs_f64()
    ));
    Ok(dir)
}

/// The vng command that boots kernel `k` without KVM (2 CPUs, 2 GiB),
/// `dir` shared read-write, `append` on the kernel command line, runs
/// `script_path` and writes its console to `log`; killed if xtask dies.
fn vng_command(
    k: &Kernel,
    dir: &Path,
    script_path: &Path,
    append: &[&str],
    log: fs::File,
) -> Result<Command> {
    let mut cmd = Command::new(which("vng").context("vng is not installed")?);
    cmd.arg("--run")
        .arg(&k.image)
        .args([
            "--disable-kvm",
            "--cpus",
            "2",
            "--memory",
            "2G",
            "--verbose",
        ])
        .arg(format!("--rwdir={}", dir.display()));
    for a in append {
        cmd.args(["--append", a]);
    }
    cmd.arg("--exec")
        .arg(format!("sh {}", script_path.display()))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // virtiofsd is found on PATH.
    if let Some(v) = which("virtiofsd") {
        if let Some(d) = v.parent() {
            let path = std::env::var_os("PATH").unwrap_or_default();
            let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
            dirs.push(d.to_path_buf());
            cmd.env("PATH", std::env::join_paths(dirs)?);
        }
    }
    crate::util::die_with_parent(&mut cmd, libc::SIGKILL);
    Ok(cmd)
}

/// Waits for vng (started at `t0`) to exit. Past the timeout or on an
/// interrupt it kills QEMU, then the rest of vng's tree, and fails with the
/// console's tail.
fn wait_for_guest(
    child: &mut std::process::Child,
    t0: Instant,
    k: &Kernel,
    label: &str,
    console: &Path,
    args: &Args,
) -> Result<Option<std::process::ExitStatus>> {
    let pid = child.id();
    let limit = Duration::from_secs(args.timeout * 60);
    let what = format!("the guest booted with {label} to end");
    let ended = try_wait_until_or_abort(limit.saturating_sub(t0.elapsed()), &what, || {
        let st = child.try_wait()?;
        if st.is_none() {
            check_interrupted()?;
        }
        Ok::<_, anyhow::Error>(st)
    });
    let why = match ended {
        Ok(Ok(st)) => return Ok(Some(st)),
        Ok(Err(timed_out)) => format!("no end within {} minutes ({timed_out})", args.timeout),
        Err(e) => format!("{e:#}"),
    };
    // QEMU first (it holds the guest), then vng and the rest.
    let tree = descendants(pid);
    for &p in &tree {
        if fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.starts_with("qemu-system"))
        {
            kill(p);
        }
    }
    for &p in &tree {
        kill(p);
    }
    kill(pid);
    let _ = child.wait();
    bail!(
        "boot {label} ({}): {why}; killed QEMU. Console tail:\n{}",
        k.release,
        tail(console, 40)
    );
}

/// The guest script: writes `kernel`, each run's output and exit code,
/// then `done`, into the scratch directory.
fn guest_script(
    dir_hint: &str,
    runs: &[(String, PathBuf, Vec<String>)],
    bins: &Binaries,
) -> String {
    let mut s = String::from("#!/bin/sh\n# Written by cargo xtask vm-test; runs inside the VM.\n");
    let _ = writeln!(s, "cd \"$(dirname \"$0\")\" || exit 1");
    let _ = writeln!(s, "# {dir_hint}");
    let _ = writeln!(s, "uname -r > kernel");
    let _ = writeln!(s, "cat /proc/cmdline > cmdline");
    let _ = writeln!(
        s,
        "if [ -e /proc/sys/net/ipv6 ]; then echo yes > ipv6; else echo no > ipv6; fi"
    );
    let _ = writeln!(s, "export FORWARDER_BIN='{}'", bins.forwarder.display());
    let _ = writeln!(s, "export FWD_TEST_BIG_BYTES={BIG_BYTES}");
    let _ = writeln!(s, "export FWD_TEST_TIME_SCALE={TIME_SCALE}");
    for (name, bin, args) in runs {
        let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
        let _ = writeln!(
            s,
            "start=$(date +%s); '{}' {} > {name}.out 2>&1; echo $? > {name}.rc; \
             echo $(( $(date +%s) - start )) > {name}.secs",
            bin.display(),
            quoted.join(" ")
        );
    }
    let _ = writeln!(s, "touch done");
    s
}

pub(crate) fn read_trim(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_default().trim().to_string()
}

/// Boots a kernel and runs the engine matrix in it.
fn vm_column(k: &Kernel, bins: &Binaries, cases: &[String], args: &Args) -> Column {
    let runs = suite_runs(bins, cases, args);
    let script = guest_script("engines matrix", &runs, bins);
    let t0 = Instant::now();
    let mut col = Column {
        title: k.release.clone(),
        ..Default::default()
    };
    let booted = boot(k, k.line, &[], &script, args);
    // Whatever the guest wrote is read even when the boot failed (a hang
    // or panic part-way still tells which cases had finished).
    if let Ok(dir) = run_dir(k.line) {
        for (suite, _, _) in &runs {
            let text = fs::read_to_string(dir.join(format!("{suite}.out"))).unwrap_or_default();
            add_results(&mut col, suite, &text);
        }
        let rel = read_trim(&dir.join("kernel"));
        if booted.is_ok() && rel != k.release {
            col.error = Some(format!("the guest ran {rel}, not {}", k.release));
        }
    }
    if let Err(e) = booted {
        col.error = Some(format!("{e:#}"));
    }
    col.took = t0.elapsed();
    complete(&mut col, cases);
    col
}

/// The `ipv6.disable=1` boot: returns (outcome, detail).
fn ipv6_boot(k: &Kernel, bins: &Binaries, args: &Args) -> (Outcome, String) {
    let script = guest_script(
        "IPv6 publishing rules without IPv6",
        &[(
            "cli".into(),
            bins.cli.clone(),
            vec!["--exact".into(), IPV6_TEST.into()],
        )],
        bins,
    );
    match boot(
        k,
        &format!("{}-noipv6", k.line),
        &["ipv6.disable=1"],
        &script,
        args,
    ) {
        Ok(dir) => {
            if read_trim(&dir.join("ipv6")) != "no" {
                return (
                    Outcome::Fail,
                    "the guest still had IPv6 (/proc/sys/net/ipv6 exists)".into(),
                );
            }
            let out = fs::read_to_string(dir.join("cli.out")).unwrap_or_default();
            match parse_libtest(&out).get(IPV6_TEST) {
                Some(Outcome::Pass) => (Outcome::Pass, String::new()),
                _ => (Outcome::Fail, tail(&dir.join("cli.out"), 40)),
            }
        }
        Err(e) => (Outcome::Unfinished, format!("{e:#}")),
    }
}

/// A Markdown table's head: the `lead` columns, then one per title.
pub(crate) fn table_head<'a>(s: &mut String, lead: &[&str], titles: impl Iterator<Item = &'a str>) {
    let titles: Vec<&str> = titles.collect();
    let _ = writeln!(s, "| {} | {} |", lead.join(" | "), titles.join(" | "));
    let _ = writeln!(s, "|{}", "---|".repeat(lead.len() + titles.len()));
}

/// Every case name of the columns' results, sorted, once.
pub(crate) fn case_names<'a>(
    results: impl Iterator<Item = &'a BTreeMap<String, Outcome>>,
) -> Vec<&'a String> {
    let mut names: Vec<&String> = results.flat_map(|r| r.keys()).collect();
    names.sort();
    names.dedup();
    names
}

pub(crate) fn mark(o: Option<&Outcome>) -> &'static str {
    match o {
        Some(Outcome::Pass) => "pass",
        Some(Outcome::Fail) => "**FAIL**",
        Some(Outcome::Unfinished) => "not run",
        None => "",
    }
}

/// The report: one table per engine, a row per case, a column per kernel.
fn report(cols: &[Column], ipv6: Option<&(String, Outcome, String)>, date: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Engine suite by kernel (`cargo xtask vm-test`, {date})\n"
    );
    let _ = writeln!(
        s,
        "Big transfers cut to {} MiB; guests boot under QEMU TCG (2 vCPUs); the host \
         column runs the same binary on the host kernel.\n",
        BIG_BYTES >> 20
    );
    table_head(
        &mut s,
        &["engine", "case"],
        cols.iter().map(|c| c.title.as_str()),
    );
    for n in case_names(cols.iter().map(|c| &c.results)) {
        let (engine, case) = n.split_once("::").unwrap_or(("", n));
        let _ = write!(s, "| {engine} | {case} |");
        for c in cols {
            let _ = write!(s, " {} |", mark(c.results.get(n)));
        }
        s.push('\n');
    }
    let _ = write!(s, "| | **run time** |");
    for c in cols {
        let _ = write!(s, " {:.0} min |", c.took.as_secs_f64() / 60.0);
    }
    s.push('\n');
    if let Some((rel, o, detail)) = ipv6 {
        let _ = writeln!(
            s,
            "\n`ipv6.disable=1` boot of {rel}, `cli::{IPV6_TEST}`: {}",
            mark(Some(o))
        );
        if !detail.is_empty() {
            let _ = writeln!(s, "\n```\n{detail}\n```");
        }
    }
    for c in cols {
        if let Some(e) = &c.error {
            let _ = writeln!(
                s,
                "\n{}: {}\n",
                c.title,
                e.lines().next().unwrap_or_default()
            );
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

/// Records the report in `bench/results/vm-matrix.md`, which the docs
/// link to (docs/testing.md).
fn record(text: &str) -> Result<()> {
    let results = root().join("bench/results/vm-matrix.md");
    fs::write(&results, text).with_context(|| format!("writing {}", results.display()))?;
    say(&format!("recorded {}", results.display()));
    Ok(())
}

pub fn run(args: &Args) -> Result<()> {
    if !is_root() {
        bail!("vm-test installs packages and kernels and runs the netns suite: run it as root");
    }
    let lines = selected_lines(args)?;
    crate::util::catch_interrupts();
    crate::setup::run()?;
    setup()?;
    let debs = target_dir()?.join("vm/debs");
    let kernels = lines
        .iter()
        .map(|l| kernel(l, &debs))
        .collect::<Result<Vec<_>>>()?;
    let bins = build()?;
    let cases = selected_cases(&bins, args)?;
    let vmdir = target_dir()?.join("vm");
    let mut cols = Vec::new();
    if !args.no_host {
        cols.push(host_column(&bins, &cases, args, &vmdir)?);
    }
    let (vm_cols, ipv6) = boot_all(&kernels, &bins, &cases, args);
    if vm_cols.len() != kernels.len() {
        bail!("a boot's thread panicked");
    }
    cols.extend(vm_cols);
    check_interrupted()?;
    let date = crate::util::UtcTime::now().date();
    let text = report(&cols, ipv6.as_ref(), &date);
    let path = vmdir.join("vm-matrix.md");
    fs::write(&path, &text)?;
    println!("{text}");
    say(&format!("report: {}", path.display()));
    if args.record {
        record(&text)?;
    }
    let failed = failures(&cols, ipv6.as_ref());
    if !failed.is_empty() {
        bail!("vm-test failed:\n{}", failed.join("\n"));
    }
    Ok(())
}

/// The kernel lines `--kernel` asks for.
fn selected_lines(args: &Args) -> Result<Vec<&'static Line>> {
    Ok(match args.kernel.as_str() {
        "all" => LINES.iter().collect(),
        k => vec![LINES
            .iter()
            .find(|l| l.name == k)
            .with_context(|| format!("--kernel {k}: expected 6.1, 6.12 or all"))?],
    })
}

/// The engine-suite cases to run: checks `--engine`, then lists the
/// suite's cases and keeps those the arguments select (at least one).
fn selected_cases(bins: &Binaries, args: &Args) -> Result<Vec<String>> {
    for e in &args.engines {
        if !ENGINES.contains(&e.as_str()) {
            bail!("--engine {e}: expected one of {}", ENGINES.join(", "));
        }
    }
    let mut own = Vec::new();
    for suite in OWN_SUITES {
        let bin = own_suite_bin(bins, suite);
        // Ignored cases (kernel limits, see their reasons) stay out.
        let ignored = list_cases(bin, &["--ignored".to_string()])?;
        own.extend(
            list_cases(bin, &[])?
                .into_iter()
                .filter(|c| !ignored.contains(c))
                .map(|c| format!("{suite}::{c}")),
        );
    }
    let cases: Vec<String> = list_cases(&bins.engines, &test_args())?
        .into_iter()
        .chain(own)
        .filter(|c| case_filter(args, c))
        .collect();
    if cases.is_empty() {
        bail!("no cases selected");
    }
    Ok(cases)
}

/// Boots every kernel with the cases, and the first once more with
/// ipv6.disable=1 (unless `--no-ipv6-boot`). Returns the columns of the
/// boots whose thread did not panic and the IPv6 boot's (release, outcome,
/// detail).
fn boot_all(
    kernels: &[Kernel],
    bins: &Binaries,
    cases: &[String],
    args: &Args,
) -> (Vec<Column>, Option<(String, Outcome, String)>) {
    // The boots run at the same time: each guest's vCPUs are host
    // threads, and on a shared machine several guests finish sooner than
    // one after the other.
    std::thread::scope(|scope| {
        let ipv6 = (!args.no_ipv6_boot).then(|| {
            let k = &kernels[0];
            scope.spawn(move || {
                let (o, detail) = ipv6_boot(k, bins, args);
                say(&format!("ipv6.disable=1 boot: {}", mark(Some(&o))));
                (k.release.clone(), o, detail)
            })
        });
        let handles: Vec<_> = kernels
            .iter()
            .map(|k| {
                scope.spawn(move || {
                    let col = vm_column(k, bins, cases, args);
                    say(&format!(
                        "{}: {} of {} cases passed in {:.0} s",
                        col.title,
                        col.results
                            .values()
                            .filter(|o| **o == Outcome::Pass)
                            .count(),
                        cases.len(),
                        col.took.as_secs_f64()
                    ));
                    col
                })
            })
            .collect();
        let cols: Vec<Column> = handles.into_iter().filter_map(|h| h.join().ok()).collect();
        (cols, ipv6.and_then(|h| h.join().ok()))
    })
}

/// One line per failure: a column's error, each case that did not pass,
/// and the IPv6 boot if it did not pass (with its detail).
fn failures(cols: &[Column], ipv6: Option<&(String, Outcome, String)>) -> Vec<String> {
    let mut failed = Vec::new();
    for c in cols {
        if let Some(e) = &c.error {
            failed.push(format!("{}: {e}", c.title));
        }
        for (n, o) in &c.results {
            if *o != Outcome::Pass {
                failed.push(format!("{}: {n}: {}", c.title, mark(Some(o))));
            }
        }
    }
    if let Some((rel, o, d)) = ipv6 {
        if *o != Outcome::Pass {
            failed.push(format!(
                "{rel} ipv6.disable=1: {IPV6_TEST}: {}\n{d}",
                mark(Some(o))
            ));
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names_map_to_releases_of_their_line() {
        let l61 = &LINES[0];
        let l612 = &LINES[1];
        assert_eq!(
            release_of(
                l61,
                "linux-image-6.1.0-57-cloud-amd64-unsigned_6.1.192-3_amd64.deb"
            )
            .as_deref(),
            Some("6.1.0-57-cloud-amd64")
        );
        assert_eq!(
            release_of(l612, "linux-image-6.12.117+deb12-cloud-amd64-unsigned").as_deref(),
            Some("6.12.117+deb12-cloud-amd64")
        );
        assert_eq!(
            release_of(l61, "linux-image-6.12.117+deb12-cloud-amd64-unsigned"),
            None
        );
        assert_eq!(
            release_of(l612, "linux-image-6.1.0-57-cloud-amd64-unsigned"),
            None
        );
        assert_eq!(release_of(l61, "linux-image-6.1.0-57-amd64-unsigned"), None);
        assert!(version_key("6.1.0-57-cloud-amd64") > version_key("6.1.0-9-cloud-amd64"));
    }

    #[test]
    fn libtest_lines_give_outcomes() {
        let r = parse_libtest(
            "running 3 tests\ntest ebpf::resets ... ok\ntest copy::x ... FAILED\n\
             noise\ntest splice::y ... ignored\n",
        );
        assert_eq!(r.get("ebpf::resets"), Some(&Outcome::Pass));
        assert_eq!(r.get("copy::x"), Some(&Outcome::Fail));
        assert_eq!(r.get("splice::y"), None);
    }

    #[test]
    fn failure_messages_come_from_the_stdout_sections() {
        let out = "failures:\n\n---- copy::slow stdout ----\n\
                   thread 'copy::slow' (9) panicked at tests/harness/mod.rs:768:19:\n\
                   slow reader: did not finish within 90 s\n\
                   note: run with `RUST_BACKTRACE=1`\n\n\
                   ---- ebpf::x stdout ----\nnoise\n\
                   thread 'ebpf::x' (3) panicked at tests/engines.rs:1:1:\nbad\nhash\n\n";
        let d = failure_details(out);
        assert_eq!(
            d.get("copy::slow").map(String::as_str),
            Some("slow reader: did not finish within 90 s")
        );
        assert_eq!(d.get("ebpf::x").map(String::as_str), Some("bad hash"));
        assert_eq!(d.len(), 2);
    }
}
