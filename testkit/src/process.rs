//! Processes a run starts: child processes stopped (by PID) when dropped,
//! pipes read line by line, and a running forwarder read through its
//! JSON-lines stdout with its log (stderr) kept whole. `xtask` starts one
//! with [`Forwarder::start`]; the suite's harness prepares its own command
//! (namespace, test user, limits) and hands it to [`Forwarder::spawn`].

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::decode_event;
use crate::wait::{try_wait_until, try_wait_until_or_abort};

/// A command line for messages: program and arguments, space-separated.
pub fn show(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Makes the command's process receive `sig` when its parent (xtask, the test) dies, so that an
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

    /// Sends a signal to it, by PID; refused once it has exited (its PID
    /// may then be reused), which this checks first.
    pub fn signal(&mut self, sig: libc::c_int) -> Result<()> {
        let pid = self
            .pid()
            .with_context(|| format!("{} was already stopped", self.name))?;
        if let Some(st) = self.try_wait()? {
            bail!("{} (PID {pid}) has already exited ({st})", self.name);
        }
        let pid = libc::pid_t::try_from(pid).context("PID out of range")?;
        // SAFETY: plain kill(2) on our own, not yet reaped, child.
        if unsafe { libc::kill(pid, sig) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("signalling {} (PID {pid})", self.name));
        }
        Ok(())
    }

    /// Sends a signal to its process group, as `systemctl stop`,
    /// `timeout` and a terminal's Ctrl-C do: it must lead one (spawned
    /// with `process_group(0)`, so the group's id is its PID). Refused
    /// once it has exited, like [`Proc::signal`].
    pub fn signal_group(&mut self, sig: libc::c_int) -> Result<()> {
        let pid = self
            .pid()
            .with_context(|| format!("{} was already stopped", self.name))?;
        if let Some(st) = self.try_wait()? {
            bail!("{} (PID {pid}) has already exited ({st})", self.name);
        }
        let pgid = libc::pid_t::try_from(pid).context("PID out of range")?;
        // SAFETY: plain getpgid(2) and killpg(2); the group is the one our
        // own, not yet reaped, child leads (checked first).
        if unsafe { libc::getpgid(pgid) } != pgid {
            bail!("{} (PID {pid}) does not lead a process group", self.name);
        }
        // SAFETY: as above.
        if unsafe { libc::killpg(pgid, sig) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("signalling the process group of {}", self.name));
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
    /// that (and says so). If it has already exited, returns that status.
    pub fn stop(&mut self, sig: libc::c_int, limit: Duration) -> Result<ExitStatus> {
        if let Some(st) = self.try_wait()? {
            self.child = None;
            return Ok(st);
        }
        self.signal(sig)?;
        let what = format!("{} to exit after signal {sig}", self.name);
        match try_wait_until_or_abort(limit, &what, || self.try_wait())? {
            Ok(st) => {
                self.child = None;
                Ok(st)
            }
            Err(timed_out) => {
                let pid = self.pid();
                if let Some(mut c) = self.child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                bail!(
                    "{} (PID {pid:?}) did not exit within {limit:?} of signal {sig}; killed it \
                     ({timed_out})",
                    self.name
                );
            }
        }
    }
}

impl Proc {
    /// Kills it (SIGKILL, by PID) and reaps it, if it is still ours.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Child::kill is kill(pid, SIGKILL) on this child only.
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
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

/// How long a forwarder may take to report `ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How many of its last log lines [`Forwarder::start`]'s error messages
/// quote.
const LOG_TAIL: usize = 30;

/// A running `forwarder run ...`, its stdout read as JSON lines and, when
/// its stderr is piped, the whole of its log kept.
pub struct Forwarder {
    proc: Proc,
    pid: u32,
    events: Receiver<String>,
    /// Its stderr, whole, when piped (empty when inherited).
    log: Arc<Mutex<String>>,
    /// Disconnects when the log reader reaches the end of the pipe.
    log_eof: Option<Receiver<()>>,
    /// Set when the log reader has reached the end of the pipe (or there
    /// is no pipe): `log` then holds everything the process wrote.
    log_ended: Arc<AtomicBool>,
    /// How many of the log's last lines error messages quote (`None`:
    /// all of it).
    log_tail: Option<usize>,
    /// The `{"event":"ready",...}` line.
    pub ready: serde_json::Value,
    name: String,
}

impl Forwarder {
    /// Starts `BIN run ARGS...` in this namespace and waits for its ready
    /// line. With `quiet`, its log (stderr) is kept and its last lines are
    /// shown only if it fails; otherwise it goes to our stderr. It gets
    /// SIGTERM if we die.
    pub fn start(bin: &Path, args: &[String], quiet: bool, name: &str) -> Result<Self> {
        let mut cmd = Command::new(bin);
        cmd.arg("run").args(args).stderr(if quiet {
            Stdio::piped()
        } else {
            Stdio::inherit()
        });
        die_with_parent(&mut cmd, libc::SIGTERM);
        Self::spawn(&mut cmd, name, READY_TIMEOUT, Some(LOG_TAIL))
    }

    /// Spawns a prepared command (the caller chooses the program, its
    /// arguments and what runs before exec: a namespace, a user, limits)
    /// and waits up to `ready_timeout` for its ready line. Its stdin is
    /// /dev/null and its stdout is read here; if the caller piped its
    /// stderr (`Stdio::piped()`), the whole of it is kept
    /// ([`Forwarder::stderr`]). Error messages quote the last `log_tail`
    /// lines of that log, or all of it with `None`.
    pub fn spawn(
        cmd: &mut Command,
        name: &str,
        ready_timeout: Duration,
        log_tail: Option<usize>,
    ) -> Result<Self> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped());
        let mut proc = Proc::spawn(cmd, name)?;
        let pid = proc.pid().context("the forwarder's PID")?;
        let child = proc.child()?;
        let stdout = child.stdout.take().context("the forwarder's stdout")?;
        let log = Arc::new(Mutex::new(String::new()));
        let log_ended = Arc::new(AtomicBool::new(child.stderr.is_none()));
        let log_eof = child.stderr.take().map(|mut stderr| {
            let sink = Arc::clone(&log);
            let ended = Arc::clone(&log_ended);
            let (eof, log_eof) = mpsc::channel::<()>();
            std::thread::spawn(move || {
                let _eof = eof;
                // Set after the last read is appended, whichever way the
                // loop ends.
                struct Ended(Arc<AtomicBool>);
                impl Drop for Ended {
                    fn drop(&mut self) {
                        self.0.store(true, Ordering::SeqCst);
                    }
                }
                let _ended = Ended(ended);
                let mut buf = [0u8; 4096];
                while let Ok(n) = stderr.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut s) = sink.lock() {
                        s.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                }
            });
            log_eof
        });
        let mut fwd = Forwarder {
            proc,
            pid,
            events: lines(stdout),
            log,
            log_eof,
            log_ended,
            log_tail,
            ready: serde_json::Value::Null,
            name: name.to_string(),
        };
        fwd.ready = fwd
            .event("ready", ready_timeout)
            .with_context(|| format!("starting {name} (`{}`)", show(cmd)))?;
        Ok(fwd)
    }

    /// The engine its ready line names.
    pub fn engine(&self) -> &str {
        self.ready["engine"].as_str().unwrap_or("?")
    }

    /// Its PID (also after it has exited).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// What it has written to stderr so far (empty unless piped).
    pub fn stderr(&self) -> String {
        self.log.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// A handle on its stderr that outlives [`Forwarder::stop`] (the
    /// reader thread keeps appending until the pipe closes).
    pub fn stderr_handle(&self) -> Arc<Mutex<String>> {
        Arc::clone(&self.log)
    }

    /// Whether its stderr has been read to the end of the pipe, so that the
    /// [`Forwarder::stderr_handle`] holds all of it; outlives
    /// [`Forwarder::stop`]. The pipe ends once the process and whatever
    /// inherited it (its dial agents) have exited.
    pub fn stderr_ended(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.log_ended)
    }

    /// Waits up to `limit` for `needle` to appear on its stderr (read by a
    /// background thread, so a line logged before an event on stdout may
    /// reach us after it). Returns stderr as it is then, with or without
    /// the needle: the caller judges it (and quotes it if it lacks it).
    pub fn wait_stderr(&self, needle: &str, limit: Duration) -> String {
        let what = format!("{needle:?} on {}'s stderr", self.name);
        try_wait_until(limit, &what, || {
            let err = self.stderr();
            err.contains(needle).then_some(err)
        })
        .unwrap_or_else(|_| self.stderr())
    }

    /// Waits up to `limit` for its log to reach the end of the pipe (once
    /// it has exited, so that the last lines are read).
    fn wait_log_eof(&self, limit: Duration) {
        if let Some(eof) = &self.log_eof {
            let _ = eof.recv_timeout(limit);
        }
    }

    /// Its log for error messages: the last `log_tail` lines, or all.
    fn log_for_errors(&self) -> String {
        let log = self.stderr();
        let lines: Vec<&str> = log.lines().collect();
        if lines.is_empty() {
            return String::new();
        }
        let from = match self.log_tail {
            Some(n) => lines.len().saturating_sub(n),
            None => 0,
        };
        let what = if from == 0 {
            "its log (stderr)"
        } else {
            "its last log lines"
        };
        format!("\n{what}:\n  {}", lines[from..].join("\n  "))
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
                        self.log_for_errors()
                    );
                }
                Err(RecvTimeoutError::Disconnected) => {
                    // Its log read to the end, and its exit status once it
                    // is reapable (it may just have closed its stdout).
                    self.wait_log_eof(Duration::from_secs(1));
                    let what = format!("{} to exit after closing its stdout", self.name);
                    let proc = &mut self.proc;
                    let exited =
                        try_wait_until_or_abort(Duration::from_secs(1), &what, || proc.try_wait())?;
                    let status = match exited {
                        Ok(st) => format!("exited ({st})"),
                        Err(_) => "closed its stdout".to_string(),
                    };
                    bail!(
                        "{} {status} before its {name:?} event{}",
                        self.name,
                        self.log_for_errors()
                    );
                }
            }
        }
    }

    /// Sends SIGUSR1 and returns the stats line it answers with (waiting
    /// up to 10 s).
    pub fn stats(&mut self) -> Result<serde_json::Value> {
        self.stats_within(Duration::from_secs(10))
    }

    /// Sends SIGUSR1 and waits up to `limit` for the stats line.
    pub fn stats_within(&mut self, limit: Duration) -> Result<serde_json::Value> {
        self.proc.signal(libc::SIGUSR1)?;
        self.event("stats", limit)
    }

    /// Sends it a signal, by PID (refused once it has exited).
    pub fn signal(&mut self, sig: libc::c_int) -> Result<()> {
        self.proc.signal(sig)
    }

    /// Sends a signal to the process group it leads (spawned with
    /// `process_group(0)`), its dial agents included.
    pub fn signal_group(&mut self, sig: libc::c_int) -> Result<()> {
        self.proc.signal_group(sig)
    }

    /// Its exit status, if it has exited (by itself or a signal).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        self.proc.try_wait()
    }

    /// Waits up to `limit` for it to exit by itself; `None` if it has not.
    pub fn wait_exit(&mut self, limit: Duration) -> Result<Option<ExitStatus>> {
        let what = format!("{} to exit", self.name);
        let proc = &mut self.proc;
        Ok(try_wait_until_or_abort(limit, &what, || proc.try_wait())?.ok())
    }

    /// Kills it outright (SIGKILL, by PID) and reaps it, if still running.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Stops it with SIGTERM; fails unless it exits 0 within 10 s. Returns
    /// the last stats line it wrote on the way out, if any.
    pub fn stop(self) -> Result<Option<serde_json::Value>> {
        self.stop_within(Duration::from_secs(10))
    }

    /// Like [`Forwarder::stop`], waiting up to `limit` for the exit (then
    /// killing it and failing).
    pub fn stop_within(mut self, limit: Duration) -> Result<Option<serde_json::Value>> {
        let status = self
            .proc
            .stop(libc::SIGTERM, limit)
            .map_err(|e| anyhow!("{e:#}{}", self.log_for_errors()))?;
        self.wait_log_eof(Duration::from_millis(500));
        if !status.success() {
            return Err(anyhow!(
                "{} exited with {status} after SIGTERM{}",
                self.name,
                self.log_for_errors()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A "forwarder" that logs 40 numbered lines and exits before its
    /// ready line.
    fn failing() -> Command {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "i=1; while [ $i -le 40 ]; do echo \"log line $i.\" >&2; i=$((i+1)); done; exit 3",
        ])
        .stderr(Stdio::piped());
        cmd
    }

    #[test]
    fn errors_quote_the_log_tail() {
        let Err(e) = Forwarder::spawn(&mut failing(), "fake", Duration::from_secs(10), Some(30))
        else {
            panic!("a process without a ready line started");
        };
        let e = format!("{e:#}");
        assert!(e.contains("exited (exit status: 3)"), "{e}");
        assert!(
            e.contains("log line 11.") && e.contains("log line 40."),
            "{e}"
        );
        assert!(!e.contains("log line 10."), "{e}");
    }

    #[test]
    fn errors_quote_the_whole_log() {
        let Err(e) = Forwarder::spawn(&mut failing(), "fake", Duration::from_secs(10), None) else {
            panic!("a process without a ready line started");
        };
        let e = format!("{e:#}");
        assert!(
            e.contains("log line 1.") && e.contains("log line 40."),
            "{e}"
        );
    }
}
