//! Peers the bench measures next to the forwarder, each started in this
//! (the parent, here the host's) network namespace listening on
//! 127.0.0.1:PORT:
//!
//! - *socat*: `socat TCP-LISTEN:PORT,bind=127.0.0.1,fork,reuseaddr
//!   EXEC:'ip netns exec CHILD socat STDIO TCP:127.0.0.1:TARGET'`. socat
//!   1.7 cannot dial in another namespace, so every accepted connection
//!   costs a fork of the listener plus a fork/exec of `ip netns exec` and a
//!   second socat inside the child; bytes cross userspace twice (listener
//!   socat, a socketpair, the child socat), 8 KiB per read (socat's
//!   default). It measures the classic "socat + nsenter" recipe, per-
//!   connection process start-up included. With socat's default half-close
//!   timeout (`-t 0.5`) the client sees EOF about 0.5 s after the server
//!   closed (the inner socat exits only then: measured 510 ms against 58 ms
//!   with `-t 0.05`), which bounds its connection rate to about 2 per second
//!   per client; the answer itself arrives after ~7 ms (fork + exec). The
//!   recipe is kept as people use it, with socat's defaults.
//! - *rootlesskit*: RootlessKit's `builtin` port driver, run as the
//!   unprivileged user `fwdtest` in the host namespace
//!   (`rootlesskit --net=slirp4netns --disable-host-loopback
//!   --port-driver=builtin`), its own iperf3 server and echo server inside
//!   *its* child namespace (not the bench's), the port added with
//!   `rootlessctl add-ports 127.0.0.1:PORT:5201/tcp`. Its parent process
//!   copies the bytes in userspace (Go).
//! - *pasta* (Debian `passt`): `pasta --netns /run/netns/CHILD -f
//!   --runas 0 -t 127.0.0.1/PORT:TARGET ...`; loopback-to-loopback
//!   connections take pasta's splice path. pasta drops to `nobody` when
//!   started as root and then cannot enter the namespace, hence `--runas 0`.
//!   It also adds an (unconfigured) tap interface to the bench's child,
//!   which loopback traffic does not use.
//!
//! A peer that cannot start yields an error that the bench shows as
//! "not run: <reason>". Every process is stopped by its PID when the
//! `Peer` is dropped (SIGTERM, then SIGKILL after 3 s); RootlessKit's state
//! directory is removed.

use std::collections::VecDeque;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use forwarder_testkit::wait::try_wait_until_or_abort;

use crate::util::{die_with_parent, output, show, Netns, Proc};

/// A running peer.
pub struct Peer {
    /// The port its echo traffic goes to, if it carries one.
    pub echo_port: Option<u16>,
    /// The process that carries the bytes, for CPU and memory figures
    /// (none for socat, which forks per connection).
    pub pid: Option<u32>,
    procs: Vec<(Proc, Log)>,
    dir: Option<PathBuf>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        while let Some((mut p, _)) = self.procs.pop() {
            if p.pid().is_some() {
                let _ = p.stop(libc::SIGTERM, Duration::from_secs(3));
            }
        }
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

type Log = Arc<Mutex<VecDeque<String>>>;

/// Spawns `cmd` with stdout and stderr kept (last 20 lines).
fn spawn_logged(cmd: &mut Command, name: &str) -> Result<(Proc, Log)> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut p = Proc::spawn(cmd, name)?;
    let log: Log = Arc::new(Mutex::new(VecDeque::new()));
    let child = p.child()?;
    let pipes: Vec<Box<dyn std::io::Read + Send>> = [
        child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|e| Box::new(e) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    .collect();
    for pipe in pipes {
        let keep = Arc::clone(&log);
        let rx = crate::util::lines(pipe);
        std::thread::spawn(move || {
            for line in rx {
                if line.contains("Failed to send") && line.contains("syslog") {
                    continue;
                }
                if let Ok(mut l) = keep.lock() {
                    if l.len() == 20 {
                        l.pop_front();
                    }
                    l.push_back(line);
                }
            }
        });
    }
    Ok((p, log))
}

fn tail(log: &Log) -> String {
    match log.lock() {
        Ok(l) if !l.is_empty() => format!(
            "; its output: {}",
            l.iter().cloned().collect::<Vec<_>>().join(" / ")
        ),
        _ => String::new(),
    }
}

/// Waits until something listens on 127.0.0.1:`port` (our own bind fails
/// with EADDRINUSE; no connection is made), failing early if `p` exits.
fn wait_listening(port: u16, p: &mut Proc, log: &Log, limit: Duration) -> Result<()> {
    let what = format!("something to listen on 127.0.0.1:{port}");
    try_wait_until_or_abort(limit, &what, || -> Result<_> {
        if matches!(TcpListener::bind(("127.0.0.1", port)),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse)
        {
            return Ok(true);
        }
        if let Some(st) = p.try_wait()? {
            bail!(
                "it exited ({st}) before listening on port {port}{}",
                tail(log)
            );
        }
        Ok(false)
    })?
    .map_err(|timed_out| anyhow!("{timed_out}{}", tail(log)))
}

/// Whether something in the network namespace of process `pid` listens
/// on TCP `port` (any address), as its /proc/PID/net/tcp and tcp6 list
/// it: a listener inside another namespace, seen without entering it.
fn listens_in(pid: u32, port: u16) -> bool {
    let port = format!(":{port:04X}");
    ["tcp", "tcp6"].iter().any(|table| {
        std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).is_ok_and(|t| {
            t.lines().skip(1).any(|line| {
                // sl local_address rem_address st ...; 0A is LISTEN.
                let mut cols = line.split_whitespace();
                let local = cols.nth(1);
                let state = cols.nth(1);
                local.is_some_and(|a| a.ends_with(&port)) && state == Some("0A")
            })
        })
    })
}

/// One socat listener on `port` relaying into the child's `target`. The
/// colons of the inner address are escaped (`TCP\:127.0.0.1\:PORT`):
/// unescaped, the outer socat splits EXEC's command at them ("wrong number
/// of parameters").
fn socat_one(ns: &Netns, port: u16, target: u16) -> Result<(Proc, Log)> {
    let mut cmd = Command::new("socat");
    cmd.arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr"))
        .arg(format!(
            "EXEC:ip netns exec {} socat STDIO TCP\\:127.0.0.1\\:{target}",
            ns.name
        ));
    die_with_parent(&mut cmd, libc::SIGTERM);
    let (mut p, log) = spawn_logged(&mut cmd, "socat")?;
    wait_listening(port, &mut p, &log, Duration::from_secs(10))
        .with_context(|| format!("starting `{}`", show(&cmd)))?;
    Ok((p, log))
}

/// socat with fork, one listener per target port.
pub fn socat(ns: &Netns, iperf: (u16, u16), echo: (u16, u16)) -> Result<Peer> {
    let a = socat_one(ns, iperf.0, iperf.1)?;
    let b = socat_one(ns, echo.0, echo.1)?;
    Ok(Peer {
        echo_port: Some(echo.0),
        pid: None,
        procs: vec![a, b],
        dir: None,
    })
}

/// `pasta --netns NS -f -q --runas 0`: pasta attached to `ns`, in the
/// foreground, quiet, as root; the caller adds the ports.
pub fn pasta_command(ns: &Netns) -> Command {
    let mut cmd = Command::new("pasta");
    cmd.arg("--netns")
        .arg(ns.path())
        .args(["-f", "-q", "--runas", "0"]);
    cmd
}

/// pasta attached to the bench's child namespace.
pub fn pasta(ns: &Netns, iperf: (u16, u16), echo: (u16, u16)) -> Result<Peer> {
    let mut cmd = pasta_command(ns);
    cmd.args(["-t", &format!("127.0.0.1/{}:{}", iperf.0, iperf.1)])
        .args(["-t", &format!("127.0.0.1/{}:{}", echo.0, echo.1)])
        .args(["-T", "none", "-u", "none", "-U", "none"]);
    die_with_parent(&mut cmd, libc::SIGTERM);
    let (mut p, log) = spawn_logged(&mut cmd, "pasta")?;
    for port in [iperf.0, echo.0] {
        wait_listening(port, &mut p, &log, Duration::from_secs(10))
            .with_context(|| format!("starting `{}`", show(&cmd)))?;
    }
    Ok(Peer {
        echo_port: Some(echo.0),
        pid: p.pid(),
        procs: vec![(p, log)],
        dir: None,
    })
}

/// The unprivileged user RootlessKit runs as (`cargo xtask setup`).
const RK_USER: &str = "fwdtest";

fn as_user(program: &str, home: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid",
        RK_USER,
        "--regid",
        RK_USER,
        "--init-groups",
        "env",
    ])
    .arg(format!("HOME={}", home.display()))
    .arg(program);
    c
}

/// RootlessKit's builtin port driver with iperf3 and the echo server
/// (`xtask`, the binary at `me`, which `fwdtest` must be able to run)
/// inside its own child namespace.
pub fn rootlesskit(me: &Path, iperf: (u16, u16), echo: (u16, u16)) -> Result<Peer> {
    rootless(me, None, iperf, echo)
}

/// The forwarder (the binary at `fwd`, auto mode, default flags) as
/// rootless Docker runs it: as `fwdtest`, attached to a RootlessKit
/// started with `--port-driver=none` (`--rootlesskit-state-dir`), which
/// runs iperf3 and the echo server in its child namespace. The ports are
/// added through the forwarder's RootlessKit API with rootlessctl, as
/// dockerd does. The returned peer's process is the forwarder.
pub fn rootless_forwarder(
    me: &Path,
    fwd: &Path,
    iperf: (u16, u16),
    echo: (u16, u16),
) -> Result<Peer> {
    rootless(me, Some(fwd), iperf, echo)
}

/// RootlessKit as `fwdtest` with iperf3 and the echo server inside; its
/// builtin port driver, or (`fwd` given) none and that forwarder attached.
fn rootless(me: &Path, fwd: Option<&Path>, iperf: (u16, u16), echo: (u16, u16)) -> Result<Peer> {
    output(Command::new("id").arg(RK_USER))
        .with_context(|| format!("no user {RK_USER} (cargo xtask setup creates it)"))?;
    let tag = if fwd.is_some() { "rlfwd" } else { "rk" };
    let dir = PathBuf::from(format!("/tmp/fwd-bench-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut peer = Peer {
        echo_port: None,
        pid: None,
        procs: Vec::new(),
        dir: Some(dir.clone()),
    };
    output(
        Command::new("chown")
            .arg(format!("{RK_USER}:{RK_USER}"))
            .arg(&dir),
    )?;
    let state = dir.join("state");
    // The echo server is copied where fwdtest can run it. iperf3 dies with
    // its parent, the shell that becomes the echo server, which RootlessKit
    // kills when it stops (it makes no PID namespace here).
    let echo_bin = dir.join("xtask");
    std::fs::copy(me, &echo_bin).with_context(|| format!("copying {}", me.display()))?;
    let script = format!(
        "setpriv --pdeathsig KILL iperf3 -s -B 127.0.0.1 -p {} & exec {} bench-echo --bind 127.0.0.1:{}",
        iperf.1,
        echo_bin.display(),
        echo.1
    );
    let mut cmd = as_user("rootlesskit", &dir);
    cmd.args(["--net=slirp4netns", "--disable-host-loopback"])
        .arg(if fwd.is_some() {
            "--port-driver=none"
        } else {
            "--port-driver=builtin"
        })
        .arg(format!("--state-dir={}", state.display()))
        .args(["sh", "-c", &script])
        .current_dir(&dir);
    // (PR_SET_PDEATHSIG does not survive setpriv's change of user; the
    // Peer's drop stops it.)
    let (mut p, log) = spawn_logged(&mut cmd, "rootlesskit")?;
    peer.pid = p.pid();
    let sock = state.join("api.sock");
    let what = format!("rootlesskit to make {}", sock.display());
    try_wait_until_or_abort(Duration::from_secs(15), &what, || -> Result<_> {
        if sock.exists() {
            return Ok(true);
        }
        if let Some(st) = p.try_wait()? {
            bail!("rootlesskit exited ({st}){}", tail(&log));
        }
        Ok(false)
    })?
    .map_err(|timed_out| anyhow!("{timed_out}{}", tail(&log)))?;
    peer.procs.push((p, log));
    if let Some(fwd) = fwd {
        // The forwarder takes RootlessKit's API socket over.
        let bin = dir.join("forwarder");
        std::fs::copy(fwd, &bin).with_context(|| format!("copying {}", fwd.display()))?;
        let mut cmd = as_user(&bin.display().to_string(), &dir);
        cmd.arg("run")
            .arg(format!("--rootlesskit-state-dir={}", state.display()))
            .current_dir(&dir);
        let (p, log) = spawn_logged(&mut cmd, "rootless forwarder")?;
        peer.pid = p.pid();
        peer.procs.push((p, log));
        let (p, log) = peer.procs.last_mut().context("the forwarder")?;
        let what = "the forwarder to serve the API".to_string();
        try_wait_until_or_abort(Duration::from_secs(15), &what, || -> Result<_> {
            if let Some(st) = p.try_wait()? {
                bail!("the rootless forwarder exited ({st}){}", tail(log));
            }
            let mut ls = as_user("rootlessctl", &dir);
            ls.arg("--socket").arg(&sock).arg("list-ports");
            Ok(output(&mut ls).is_ok())
        })?
        .map_err(|timed_out| anyhow!("{timed_out}{}", tail(log)))?;
    }
    for (port, target) in [iperf, echo] {
        let mut add = as_user("rootlessctl", &dir);
        add.arg("--socket")
            .arg(&sock)
            .args(["add-ports", &format!("127.0.0.1:{port}:{target}/tcp")]);
        output(&mut add).context("rootlessctl add-ports")?;
    }
    let (p, log) = peer.procs.last_mut().context("rootlesskit")?;
    for port in [iperf.0, echo.0] {
        wait_listening(port, p, log, Duration::from_secs(10))?;
    }
    // The servers inside start asynchronously (RootlessKit's listeners
    // above are its own): wait until both listen in its child namespace,
    // seen through the child's PID, which it writes to child_pid.
    let child_pid = state.join("child_pid");
    let what = format!(
        "iperf3 and the echo server to listen on 127.0.0.1:{} and :{} inside RootlessKit",
        iperf.1, echo.1
    );
    try_wait_until_or_abort(Duration::from_secs(10), &what, || -> Result<_> {
        if let Some(st) = p.try_wait()? {
            bail!("rootlesskit exited ({st}){}", tail(log));
        }
        let read = std::fs::read_to_string(&child_pid).unwrap_or_default();
        let Ok(child) = read.trim().parse::<u32>() else {
            return Ok(Err(format!("no PID in {}", child_pid.display())));
        };
        let missing: Vec<u16> = [iperf.1, echo.1]
            .into_iter()
            .filter(|&port| !listens_in(child, port))
            .collect();
        Ok(if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "nothing listens on {missing:?} in the namespace of PID {child}"
            ))
        })
    })?
    .map_err(|timed_out| anyhow!("{timed_out}{}", tail(log)))?;
    peer.echo_port = Some(echo.0);
    Ok(peer)
}
