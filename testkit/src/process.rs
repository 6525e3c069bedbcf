//! Processes a run starts: child processes stopped (by PID) when dropped,
//! pipes read line by line, and a running forwarder read through its
//! JSON-lines stdout.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::decode_event;

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
