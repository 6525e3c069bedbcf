//! Helpers shared by the tasks: running commands with errors that name
//! them, the workspace and its target directory, and interrupts. Network
//! namespaces, child processes stopped (by PID) when dropped and a running
//! forwarder read through its JSON-lines stdout come from the test kit
//! (`testkit/`), shared with the netns suite.
//!
//! Clean-up is done by `Drop` guards, so it also happens on error paths.
//! The tasks that start processes (`demo`, `bench`) catch SIGINT, SIGTERM and
//! SIGHUP: an interrupted run then fails like any other error and the guards
//! still run (a killed xtask cannot clean up; its children at least die
//! with it through `PR_SET_PDEATHSIG`).

use std::fmt;
use std::io::Read;
use std::os::unix::process::ExitStatusExt as _;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _, Result};
use forwarder_testkit::wait::try_wait_until_or_abort;

/// A command that ran and failed. `main` exits with its exit code, so
/// `cargo xtask test` fails the way `cargo test` did.
#[derive(Debug)]
pub struct CommandFailed {
    pub cmd: String,
    pub status: ExitStatus,
    /// What it wrote to stderr, when that was captured.
    pub stderr: String,
}

impl CommandFailed {
    /// The exit code to hand on: the command's own, or 128 + signal.
    pub fn exit_code(&self) -> i32 {
        match (self.status.code(), self.status.signal()) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 1,
        }
    }
}

impl fmt::Display for CommandFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` failed ({})", self.cmd, self.status)?;
        let err = self.stderr.trim();
        if !err.is_empty() {
            write!(f, ": {err}")?;
        }
        Ok(())
    }
}

impl std::error::Error for CommandFailed {}

/// Runs a command with inherited stdio; fails (with `CommandFailed`) unless
/// it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = show(cmd);
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{shown}`"))?;
    if !status.success() {
        return Err(CommandFailed {
            cmd: shown,
            status,
            stderr: String::new(),
        }
        .into());
    }
    Ok(())
}

/// Runs a command and returns its stdout; fails with its stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let shown = show(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("cannot start `{shown}`"))?;
    if !out.status.success() {
        return Err(CommandFailed {
            cmd: shown,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What a command run by `output_within` did.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs a command, capturing its output, and kills it (by PID) if it runs
/// longer than `limit`. The exit status is returned, not judged.
pub fn output_within(cmd: &mut Command, limit: Duration) -> Result<Finished> {
    let shown = show(cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    die_with_parent(cmd, libc::SIGKILL);
    let mut child = Proc::spawn(cmd, &shown)?;
    let c = child.child()?;
    let out = drain(c.stdout.take());
    let err = drain(c.stderr.take());
    let what = format!("`{shown}` to finish");
    let status = try_wait_until_or_abort(limit, &what, || -> Result<_> {
        let st = child.try_wait()?;
        if st.is_none() {
            check_interrupted()?;
        }
        Ok(st)
    })?
    // (Proc's drop kills it.)
    .map_err(|timed_out| anyhow!("{timed_out}; killed it"))?;
    let join = |h: std::thread::JoinHandle<String>| h.join().unwrap_or_default();
    Ok(Finished {
        status,
        stdout: join(out),
        stderr: join(err),
    })
}

/// Reads a pipe to its end in a thread.
fn drain<R: Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut s);
        }
        String::from_utf8_lossy(&s).into_owned()
    })
}

/// The workspace root (xtask's parent directory).
pub fn root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// `cargo` run in the workspace root.
pub fn cargo() -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(root());
    c
}

/// The workspace's target directory, as cargo sees it (`target/` unless
/// CARGO_TARGET_DIR or a config says otherwise).
pub fn target_dir() -> Result<PathBuf> {
    let meta = output(cargo().args(["metadata", "--format-version", "1", "--no-deps"]))?;
    let v: serde_json::Value =
        serde_json::from_str(&meta).context("parsing `cargo metadata` output")?;
    v["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("`cargo metadata` names no target_directory")
}

/// Builds the forwarder in release mode and returns the binary's path.
pub fn build_forwarder() -> Result<PathBuf> {
    run(cargo().args(["build", "--release", "-p", "forwarder"]))
        .context("building the forwarder")?;
    let bin = target_dir()?.join("release/forwarder");
    if !bin.is_file() {
        bail!("the build succeeded but {} is missing", bin.display());
    }
    Ok(bin)
}

/// Whether `program --version` runs and succeeds (the tool is installed).
pub fn has_tool(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether we run as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Turns SIGINT, SIGTERM and SIGHUP into a flag (see `check_interrupted`)
/// instead of death, so the clean-up guards run. Ctrl-C also reaches the
/// children (same process group); they exit, and the task fails on that.
pub fn catch_interrupts() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic. Handlers (unlike
        // ignored signals) are reset to the default in exec'd children.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

/// Fails once SIGINT, SIGTERM or SIGHUP arrived.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

pub use forwarder_testkit::process::{die_with_parent, lines, show, Forwarder, Proc};
pub use forwarder_testkit::{decode_event, Netns};

/// Starts a helper server (`cmd`'s stdout must be piped), killed if xtask
/// dies, and waits up to 10 s for its first line to start with `ready`.
pub fn spawn_ready(cmd: &mut Command, name: &str, ready: &str) -> Result<Proc> {
    die_with_parent(cmd, libc::SIGKILL);
    let mut server = Proc::spawn(cmd, name)?;
    let out = server
        .child()?
        .stdout
        .take()
        .with_context(|| format!("{name}'s stdout"))?;
    match lines(out).recv_timeout(Duration::from_secs(10)) {
        Ok(l) if l.starts_with(ready) => Ok(server),
        Ok(l) => bail!("{name} said {l:?} instead of {ready:?}"),
        Err(_) => bail!("{name} did not start (its errors are above)"),
    }
}

/// A moment in UTC, broken down into calendar date and time of day: the
/// dates in the reports, without running `date`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UtcTime {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

impl UtcTime {
    /// The system clock now (a clock before 1970 gives a date before 1970).
    pub fn now() -> UtcTime {
        let secs = match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
        };
        UtcTime::from_unix(secs)
    }

    /// The UTC calendar time `secs` seconds after 1970-01-01 00:00:00 UTC
    /// (proleptic Gregorian calendar, no leap seconds, as Unix time counts).
    pub fn from_unix(secs: i64) -> UtcTime {
        let days = secs.div_euclid(86_400);
        let of_day = secs.rem_euclid(86_400);
        // Days since 1970-01-01 to a civil date, counting in 400-year eras
        // that start on March 1st (so the leap day ends a year).
        let z = days + 719_468; // days since 0000-03-01
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097); // day of era, 0..=146096
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // 0..=399
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of year from March 1st
        let mp = (5 * doy + 2) / 153; // month from March, 0..=11
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        UtcTime {
            year,
            // In range by construction: 1..=12, 1..=31, and under a day.
            month: month as u32,
            day: day as u32,
            hour: (of_day / 3600) as u32,
            minute: (of_day / 60 % 60) as u32,
            second: (of_day % 60) as u32,
        }
    }

    /// `2026-11-29`.
    pub fn date(self) -> String {
        format!("{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }

    /// `2026-11-29 03:23 UTC`.
    pub fn to_minute(self) -> String {
        format!("{} {:02}:{:02} UTC", self.date(), self.hour, self.minute)
    }

    /// `2026-11-29 03:23:32 UTC`.
    pub fn to_second(self) -> String {
        format!(
            "{} {:02}:{:02}:{:02} UTC",
            self.date(),
            self.hour,
            self.minute,
            self.second
        )
    }
}

/// The running kernel's release, as `uname -r` prints it (e.g.
/// `6.1.0-57-cloud-amd64`): the forwarder's reader, so both read it alike.
pub fn kernel_release() -> Result<String> {
    let release = forwarder::engine::kernel::release();
    anyhow::ensure!(!release.is_empty(), "cannot read the kernel release");
    Ok(release)
}

/// One HTTP/1.0 GET of `path` over a fresh connection to `addr`: checks
/// for a 200 status and hands each piece of the body to `body` as it
/// arrives; returns the body's length. `host` is the Host header.
pub fn http_get(
    addr: std::net::SocketAddr,
    host: &str,
    path: &str,
    mut body: impl FnMut(&[u8]),
) -> Result<u64> {
    use std::io::Write as _;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut buf = vec![0u8; 1 << 20];
    let mut head = Vec::new();
    let mut n = 0u64;
    loop {
        let k = s
            .read(&mut buf)
            .with_context(|| format!("reading from {addr}"))?;
        if k == 0 {
            break;
        }
        let mut at = 0;
        // Still in the headers: split them off this read.
        while at < k && !head.ends_with(b"\r\n\r\n") {
            head.push(buf[at]);
            at += 1;
        }
        if head.len() > 16 * 1024 {
            bail!("{addr}: headers too long");
        }
        body(&buf[at..k]);
        n += (k - at) as u64;
    }
    let status = String::from_utf8_lossy(&head);
    if !(status.starts_with("HTTP/1.") && status.contains(" 200 ")) {
        bail!(
            "{addr}{path}: {}",
            status.lines().next().unwrap_or("no answer")
        );
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_time_from_unix_seconds() {
        // Expected values from GNU `date -u -d @SECS '+%Y-%m-%d %H:%M:%S'`.
        for (secs, want) in [
            (0, "1970-01-01 00:00:00 UTC"),
            (-1, "1969-12-31 23:59:59 UTC"),
            (951_782_400, "2000-02-29 00:00:00 UTC"),
            (978_307_199, "2000-12-31 23:59:59 UTC"),
            (1_795_920_000, "2026-11-29 02:40:00 UTC"),
            (1_795_937_012, "2026-11-29 07:23:32 UTC"),
            (4_107_542_399, "2100-02-28 23:59:59 UTC"),
            (4_107_542_400, "2100-03-01 00:00:00 UTC"),
            (253_402_300_799, "9999-12-31 23:59:59 UTC"),
        ] {
            let t = UtcTime::from_unix(secs);
            assert_eq!(t.to_second(), want, "{secs}");
            assert_eq!(t.to_minute(), format!("{} UTC", &want[..16]), "{secs}");
            assert_eq!(t.date(), want[..10], "{secs}");
        }
    }

    #[test]
    fn kernel_release_is_unames() {
        let ours = kernel_release().expect("kernel release");
        let theirs = output(Command::new("uname").arg("-r")).expect("uname -r");
        assert_eq!(ours, theirs.trim());
    }
}
