//! Helpers shared by the tasks: running commands with errors that name
//! them, the workspace and its target directory, throw-away network
//! namespaces, child processes stopped (by PID) when dropped, and a running
//! forwarder read through its JSON-lines stdout.
//!
//! Clean-up is done by `Drop` guards, so it also happens on error paths.
//! The tasks that start processes (`demo`, `bench`) catch SIGINT, SIGTERM and
//! SIGHUP: an interrupted run then fails like any other error and the guards
//! still run (a killed xtask cannot clean up; its children at least die
//! with it through `PR_SET_PDEATHSIG`).

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};

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

/// A command line for messages: program and arguments, space-separated.
pub fn show(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

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
    let c = child.child.as_mut().context("no child")?;
    let out = drain(c.stdout.take());
    let err = drain(c.stderr.take());
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            bail!("`{shown}` did not finish within {limit:?}; killed it");
        }
        check_interrupted()?;
        std::thread::sleep(Duration::from_millis(20));
    };
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

/// Makes the command's process receive `sig` when xtask dies, so that an
/// xtask killed outright leaves no server behind. (`ip netns exec` execs
/// its program without forking, so this reaches the program itself.)
pub fn die_with_parent(cmd: &mut Command, sig: libc::c_int) {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork
    // and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
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

pub use forwarder_testkit::{decode_event, Netns};

/// A child process we started; killed (SIGKILL, by its PID) and reaped on
/// drop unless it was stopped before.
pub struct Proc {
    name: String,
    child: Option<Child>,
}

impl Proc {
    /// Spawns `cmd`; `name` is used in messages.
    pub fn spawn(cmd: &mut Command, name: &str) -> Result<Self> {
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} (`{}`)", show(cmd)))?;
        Ok(Proc {
            name: name.to_string(),
            child: Some(child),
        })
    }

    /// Its PID.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The child itself (to take its pipes).
    pub fn child(&mut self) -> Result<&mut Child> {
        self.child
            .as_mut()
            .with_context(|| format!("{} was already stopped", self.name))
    }

    /// Sends a signal to it, by PID.
    pub fn signal(&self, sig: libc::c_int) -> Result<()> {
        let pid = self
            .pid()
            .with_context(|| format!("{} was already stopped", self.name))?;
        let pid = libc::pid_t::try_from(pid).context("PID out of range")?;
        // SAFETY: plain kill(2) on our own, not yet reaped, child.
        if unsafe { libc::kill(pid, sig) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("signalling {} (PID {pid})", self.name));
        }
        Ok(())
    }

    /// Its exit status, if it has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        let name = self.name.clone();
        match self.child.as_mut() {
            None => Ok(None),
            Some(c) => c.try_wait().with_context(|| format!("waiting for {name}")),
        }
    }

    /// Sends `sig` and waits up to `limit` for it to exit; kills it after
    /// that (and says so).
    pub fn stop(&mut self, sig: libc::c_int, limit: Duration) -> Result<ExitStatus> {
        self.signal(sig)?;
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.try_wait()? {
                self.child = None;
                return Ok(st);
            }
            if Instant::now() > deadline {
                let pid = self.pid();
                if let Some(mut c) = self.child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                bail!(
                    "{} (PID {pid:?}) did not exit within {limit:?} of signal {sig}; killed it",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Child::kill is kill(pid, SIGKILL) on this child only.
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Reads a pipe line by line in a thread; lines arrive on the receiver,
/// which disconnects at end of file.
pub fn lines<R: Read + Send + 'static>(r: R) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

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

/// How long a forwarder may take to report `ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `forwarder run ...`, its stdout read as JSON lines.
pub struct Forwarder {
    proc: Proc,
    events: Receiver<String>,
    /// The last lines of its stderr, when not inherited.
    log: Option<Arc<Mutex<VecDeque<String>>>>,
    /// The `{"event":"ready",...}` line.
    pub ready: serde_json::Value,
    name: String,
}

impl Forwarder {
    /// Starts `BIN run ARGS...` in this namespace and waits for its ready
    /// line. With `quiet`, its log (stderr) is kept and shown only if it
    /// fails; otherwise it goes to our stderr.
    pub fn start(bin: &Path, args: &[String], quiet: bool, name: &str) -> Result<Self> {
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(if quiet {
                Stdio::piped()
            } else {
                Stdio::inherit()
            });
        die_with_parent(&mut cmd, libc::SIGTERM);
        let mut proc = Proc::spawn(&mut cmd, name)?;
        let child = proc.child()?;
        let stdout = child.stdout.take().context("the forwarder's stdout")?;
        let log = child.stderr.take().map(|stderr| {
            let log = Arc::new(Mutex::new(VecDeque::new()));
            let keep = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Ok(mut l) = keep.lock() {
                        if l.len() == 30 {
                            l.pop_front();
                        }
                        l.push_back(line);
                    }
                }
            });
            log
        });
        let mut fwd = Forwarder {
            proc,
            events: lines(stdout),
            log,
            ready: serde_json::Value::Null,
            name: name.to_string(),
        };
        fwd.ready = fwd
            .event("ready", READY_TIMEOUT)
            .with_context(|| format!("starting {name} (`{}`)", show(&cmd)))?;
        Ok(fwd)
    }

    /// The engine its ready line names.
    pub fn engine(&self) -> &str {
        self.ready["engine"].as_str().unwrap_or("?")
    }

    /// Its PID.
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// Its stderr's last lines, for error messages.
    fn log_tail(&self) -> String {
        match self.log.as_ref().and_then(|l| l.lock().ok()) {
            Some(l) if !l.is_empty() => format!(
                "\nits last log lines:\n  {}",
                l.iter().cloned().collect::<Vec<_>>().join("\n  ")
            ),
            _ => String::new(),
        }
    }

    /// Waits for the next stdout line whose `event` is `name`.
    pub fn event(&mut self, name: &str, limit: Duration) -> Result<serde_json::Value> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(line) => {
                    let v = decode_event(&line)
                        .with_context(|| format!("{} wrote {line:?}", self.name))?;
                    if v["event"] == name {
                        return Ok(v);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!(
                        "{} wrote no {name:?} event within {limit:?}{}",
                        self.name,
                        self.log_tail()
                    );
                }
                Err(RecvTimeoutError::Disconnected) => {
                    // Give it a moment to be reapable, for the status.
                    std::thread::sleep(Duration::from_millis(100));
                    let status = match self.proc.try_wait()? {
                        Some(st) => format!("exited ({st})"),
                        None => "closed its stdout".to_string(),
                    };
                    bail!(
                        "{} {status} before its {name:?} event{}",
                        self.name,
                        self.log_tail()
                    );
                }
            }
        }
    }

    /// Sends SIGUSR1 and returns the stats line it answers with.
    pub fn stats(&mut self) -> Result<serde_json::Value> {
        self.proc.signal(libc::SIGUSR1)?;
        self.event("stats", Duration::from_secs(10))
    }

    /// Stops it with SIGTERM; fails unless it exits 0 within 10 s. Returns
    /// the stats line it writes on the way out, if any.
    pub fn stop(mut self) -> Result<Option<serde_json::Value>> {
        let status = self.proc.stop(libc::SIGTERM, Duration::from_secs(10))?;
        if !status.success() {
            return Err(anyhow!(
                "{} exited with {status} after SIGTERM{}",
                self.name,
                self.log_tail()
            ));
        }
        let mut last = None;
        while let Ok(line) = self.events.recv_timeout(Duration::from_secs(2)) {
            let v = decode_event(&line).with_context(|| format!("{} wrote {line:?}", self.name))?;
            if v["event"] == "stats" {
                last = Some(v);
            }
        }
        Ok(last)
    }
}

impl Drop for Forwarder {
    /// On error paths: SIGTERM first, so it can release what it holds;
    /// `Proc`'s drop kills it if it takes longer than 3 s.
    fn drop(&mut self) {
        if self.proc.pid().is_some() {
            let _ = self.proc.stop(libc::SIGTERM, Duration::from_secs(3));
        }
    }
}
