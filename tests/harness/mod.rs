//! The integration suite's harness: network namespaces made for each test,
//! sockets created inside them, test servers, deterministic data with
//! hashes, and a wrapper around the real forwarder binary that checks for
//! leaked descriptors and BPF map entries.
//!
//! Everything runs as root (namespaces, BPF); traffic stays on loopback
//! inside the namespaces a test created.

pub mod data;
pub mod iperf;
pub mod servers;
pub mod soak;
pub mod udp;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use forwarder_testkit::process::Forwarder;
use forwarder_testkit::procfs;
pub use forwarder_testkit::procfs::{thread_caps, ThreadCaps, CAP_NET_BIND_SERVICE};
pub use forwarder_testkit::wait::{wait_until, wait_until_async};
pub use forwarder_testkit::{
    bpf, drop_to_user, drop_to_user_with, require_root, test_user, user_command, Netns, Privilege,
    TEST_USER,
};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The parent namespace (where the forwarder listens and clients connect)
/// and the child (where the servers are).
pub struct Pair {
    pub parent: Netns,
    pub child: Netns,
    pub privilege: Privilege,
}

impl Pair {
    pub fn new() -> Pair {
        Self::with(Privilege::Root)
    }

    /// A pair for a forwarder running with `privilege`: for the rootless
    /// kinds the child is a user + network namespace of the test user.
    pub fn with(privilege: Privilege) -> Pair {
        let child = match privilege {
            Privilege::Root => Netns::new("c"),
            Privilege::User | Privilege::UserWithBpf | Privilege::UserWithLocalPath => {
                Netns::new_rootless()
            }
        };
        Pair {
            parent: Netns::new("p"),
            child,
            privilege,
        }
    }
}

impl Pair {
    /// A client connected from the parent namespace; panics naming the
    /// address if the connection fails.
    pub async fn client(&self, addr: &str) -> TcpStream {
        self.parent
            .connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
    }

    /// `n` clients of `addr` (an echo server behind it), each checked by
    /// one round trip of `len` bytes, and kept open.
    pub async fn echo_clients(&self, addr: &str, n: u8, len: usize) -> Vec<TcpStream> {
        let mut conns = Vec::new();
        for i in 0..n {
            let mut c = self.client(addr).await;
            echo_roundtrip(&mut c, &vec![i; len]).await;
            conns.push(c);
        }
        conns
    }

    /// Connects to `addr` (an echo server behind it) and asserts that
    /// nothing is echoed within 1 s: the connection waits in the listen
    /// backlog. Returns it, still waiting; `why` says what serving it would
    /// mean.
    pub async fn assert_waits(&self, addr: &str, why: &str) -> TcpStream {
        let mut waiting = self.client(addr).await;
        waiting.write_all(b"waiting").await.expect("write");
        let mut b = [0u8; 7];
        assert!(
            tokio::time::timeout(Duration::from_secs(1), waiting.read_exact(&mut b))
                .await
                .is_err(),
            "{why}"
        );
        waiting
    }

    /// Waits until a new connection to `addr` (an echo server behind it) is
    /// served, retrying while the forwarder resets clients it cannot serve
    /// yet; on timeout panics naming `what`, with the last error and `f`'s
    /// log.
    pub async fn wait_served(&self, addr: &str, timeout: Duration, what: &str, f: &Fwd) {
        wait_until_async(limit(timeout), what, async || {
            let served = async {
                let mut c = self.parent.connect(addr).await?;
                c.write_all(b"again").await?;
                let mut b = [0u8; 5];
                tokio::time::timeout(Duration::from_secs(2), c.read_exact(&mut b)).await??;
                Ok::<_, std::io::Error>(b)
            }
            .await;
            match served {
                Ok(b) if &b == b"again" => Ok(()),
                Ok(b) => Err(format!("echoed {b:?}")),
                Err(e) => Err(format!("{e}; stderr:\n{}", f.stderr())),
            }
        })
        .await;
    }
}

/// Writes `msg` and expects it echoed whole within 5 s.
pub async fn echo_roundtrip(c: &mut TcpStream, msg: &[u8]) {
    c.write_all(msg).await.expect("write");
    let mut got = vec![0u8; msg.len()];
    within(5, "echo", c.read_exact(&mut got))
        .await
        .expect("echo");
    assert_eq!(got, msg);
}

impl Default for Pair {
    fn default() -> Self {
        Self::new()
    }
}

/// The forwarder binary under test.
pub fn forwarder_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FORWARDER_BIN") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/forwarder")
}

/// `forwarder check --json` as root on this kernel, run once per test
/// binary: what auto mode picks here (and why) and the probes.
pub fn check_report() -> &'static Value {
    static REPORT: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    REPORT.get_or_init(|| {
        let out = Command::new(forwarder_bin())
            .args(["check", "--json"])
            .stderr(Stdio::null())
            .output()
            .expect("forwarder check --json");
        assert!(out.status.success(), "forwarder check --json: {out:?}");
        serde_json::from_slice(&out.stdout).expect("forwarder check's JSON")
    })
}

/// Whether the local-client path's self-test passes on this kernel
/// (blocking reads on admitted sockets keep TCP's contract), as
/// `forwarder check` reports it.
pub fn local_self_test_passes() -> bool {
    check_report()["probes"]["local_blocking_read"]["ok"] == true
}

/// Decodes one line of the forwarder's stdout
/// ([`forwarder_testkit::decode_event`]).
pub fn decode_event(line: &str) -> Result<Value, String> {
    forwarder_testkit::decode_event(line).map_err(|e| format!("{e:#}"))
}

/// A running forwarder, started inside a namespace: the test kit's
/// [`Forwarder`] (events, the whole stderr, signals, stopping) with the
/// suite's checks on top: descriptors and BPF maps left behind, the
/// capabilities its threads and dial agents hold.
pub struct Fwd {
    /// `None` once stopped.
    inner: Option<Forwarder>,
    pub pid: u32,
    pub ready: Value,
    base_fds: usize,
}

impl Fwd {
    /// Starts `forwarder run --child-netns <child> ARGS...` in `pair.parent`
    /// and waits for its ready line.
    pub fn start(pair: &Pair, args: &[&str]) -> Fwd {
        Self::start_with(pair, args, None, &[], false)
    }

    /// Like [`Fwd::start`], leading a process group of its own (its dial
    /// agents join it), as a service manager or a shell job starts it:
    /// for [`Fwd::stop_by`] with the whole group.
    pub fn start_in_own_group(pair: &Pair, args: &[&str]) -> Fwd {
        Self::start_with(pair, args, None, &[], true)
    }

    /// Like [`Fwd::start`], with extra environment variables for the
    /// forwarder (its test seams, e.g. FWD_TEST_HANDOFF_GAP_MS).
    pub fn start_with_env(pair: &Pair, args: &[&str], env: &[(&str, &str)]) -> Fwd {
        Self::start_with(pair, args, None, env, false)
    }

    /// Like [`Fwd::start`], with RLIMIT_NOFILE (soft and hard) set to
    /// `nofile` for the forwarder.
    pub fn start_with_nofile(pair: &Pair, args: &[&str], nofile: u64) -> Fwd {
        Self::start_with(pair, args, Some(nofile), &[], false)
    }

    fn start_with(
        pair: &Pair,
        args: &[&str],
        nofile: Option<u64>,
        env: &[(&str, &str)],
        own_group: bool,
    ) -> Fwd {
        // Rootless: name the container's PID, as a user would; the
        // forwarder finds it may not enter and starts its dial agent.
        let mut full = match pair.child.holder_pid() {
            Some(pid) => vec!["run".into(), "--child-pid".into(), pid.to_string()],
            None => vec![
                "run".to_string(),
                "--child-netns".to_string(),
                pair.child.path().display().to_string(),
            ],
        };
        full.extend(args.iter().map(|a| a.to_string()));
        Self::spawn_env(&pair.parent, &full, nofile, pair.privilege, env, own_group)
    }

    /// Starts the binary as root with exactly `args` inside `ns`.
    pub fn spawn(ns: &Netns, args: &[String], nofile: Option<u64>) -> Fwd {
        Self::spawn_as(ns, args, nofile, Privilege::Root)
    }

    /// Starts the binary with exactly `args` inside `ns`, as root or as the
    /// unprivileged test user (optionally with ambient CAP_BPF and
    /// CAP_NET_ADMIN).
    pub fn spawn_as(ns: &Netns, args: &[String], nofile: Option<u64>, privilege: Privilege) -> Fwd {
        Self::spawn_env(ns, args, nofile, privilege, &[], false)
    }

    fn spawn_env(
        ns: &Netns,
        args: &[String],
        nofile: Option<u64>,
        privilege: Privilege,
        env: &[(&str, &str)],
        own_group: bool,
    ) -> Fwd {
        let ids = match privilege {
            Privilege::Root => None,
            _ => Some(test_user()),
        };
        let caps = privilege.ambient_caps();
        let nsfile = File::open(ns.path()).expect("open netns");
        let nsfd = nsfile.as_raw_fd();
        let mut cmd = Command::new(forwarder_bin());
        cmd.args(args)
            .envs(env.iter().copied())
            .stderr(Stdio::piped());
        if own_group {
            cmd.process_group(0);
        }
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(nsfd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(n) = nofile {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some((uid, gid)) = ids {
                    drop_to_user_with(uid, gid, caps)?;
                }
                Ok(())
            });
        }
        // Failures quote the whole stderr: the cases search it.
        let inner = Forwarder::spawn(
            &mut cmd,
            "the forwarder",
            limit(Duration::from_secs(20)),
            None,
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        drop(nsfile);
        let mut f = Fwd {
            pid: inner.pid(),
            ready: inner.ready.clone(),
            inner: Some(inner),
            base_fds: 0,
        };
        // Leniently: a forwarder that is gone already counts 0 here, which
        // fails the checks against this count rather than passing them.
        f.base_fds = procfs::fd_count(f.pid).unwrap_or(0);
        f
    }

    /// The test kit's forwarder; it is there until [`Fwd::stop`] takes it.
    fn inner(&self) -> &Forwarder {
        self.inner.as_ref().expect("the forwarder was stopped")
    }

    fn inner_mut(&mut self) -> &mut Forwarder {
        self.inner.as_mut().expect("the forwarder was stopped")
    }

    /// Waits up to `timeout` for the forwarder to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.inner_mut()
            .wait_exit(timeout)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Stops it with `signals` (in order: `[SIGTERM]`, or systemd's
    /// `[SIGTERM, SIGCONT]`), sent to the forwarder alone or, with
    /// `whole_group`, to the process group it leads
    /// ([`Fwd::start_in_own_group`]: its dial agents get them too, as from
    /// `systemctl stop`, `timeout` or Ctrl-C). Waits for the exit and for
    /// its stderr to close (it and its agents gone); returns its exit
    /// status and everything it and its agents logged.
    pub fn stop_by(mut self, signals: &[libc::c_int], whole_group: bool) -> (ExitStatus, String) {
        let mut inner = self.inner.take().expect("running");
        for (i, &sig) in signals.iter().enumerate() {
            // Gone after the first: the rest would find no one.
            if i > 0 && matches!(inner.try_wait(), Ok(Some(_))) {
                break;
            }
            let sent = if whole_group {
                inner.signal_group(sig)
            } else {
                inner.signal(sig)
            };
            sent.unwrap_or_else(|e| panic!("{e:#}\nstderr:\n{}", inner.stderr()));
        }
        let status = inner
            .wait_exit(limit(Duration::from_secs(10)))
            .unwrap_or_else(|e| panic!("{e:#}"))
            .unwrap_or_else(|| {
                panic!(
                    "still running 10 s after signals {signals:?}; stderr:\n{}",
                    inner.stderr()
                )
            });
        let ended = inner.stderr_ended();
        wait_until(
            limit(Duration::from_secs(5)),
            "the forwarder's stderr to close (it and its dial agents exited)",
            || ended.load(std::sync::atomic::Ordering::SeqCst),
        );
        (status, inner.stderr())
    }

    /// A handle on the forwarder's stderr that outlives [`Fwd::stop`].
    pub fn stderr_handle(&self) -> Arc<Mutex<String>> {
        self.inner().stderr_handle()
    }

    /// What the forwarder has written to stderr so far.
    pub fn stderr(&self) -> String {
        self.inner().stderr()
    }

    /// Waits up to `timeout` for `needle` to appear on stderr (read by a
    /// background thread, so a line logged before an event on stdout may
    /// reach us after it). Returns stderr as it is then.
    pub fn wait_stderr(&self, needle: &str, timeout: Duration) -> String {
        self.inner().wait_stderr(needle, timeout)
    }

    /// The hash and socket maps the forwarder holds, counted by the kernel.
    pub fn bpf_maps(&self) -> Vec<bpf::MapInfo> {
        bpf::map_entries(self.pid)
    }

    /// The engine the forwarder runs.
    pub fn engine(&self) -> String {
        self.ready["engine"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Asks for a stats line (SIGUSR1).
    pub fn stats(&mut self) -> Value {
        self.inner_mut()
            .stats_within(limit(Duration::from_secs(30)))
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Open descriptors of the forwarder. Like the other readings of
    /// /proc below, panics if the forwarder is gone: a 0 read from a dead
    /// process would pass the checks that bound these readings.
    pub fn fd_count(&self) -> usize {
        procfs::fd_count(self.pid)
            .unwrap_or_else(|e| panic!("the forwarder {} is gone? {e:#}", self.pid))
    }

    /// Open pipe descriptors of the forwarder.
    pub fn pipe_fd_count(&self) -> usize {
        procfs::pipe_fd_count(self.pid)
            .unwrap_or_else(|e| panic!("the forwarder {} is gone? {e:#}", self.pid))
    }

    /// User + system CPU time in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        procfs::cpu_ticks(self.pid)
            .unwrap_or_else(|e| panic!("the forwarder {} is gone? {e:#}", self.pid))
    }

    /// Every thread of the forwarder with its effective capabilities.
    pub fn thread_caps(&self) -> Vec<ThreadCaps> {
        thread_caps(self.pid)
    }

    /// The child-side dial agents the forwarder started (its children
    /// running `child-agent`).
    pub fn agent_pids(&self) -> Vec<u32> {
        procfs::children_running(self.pid, "child-agent")
    }

    /// Asserts that every thread of the forwarder holds at most
    /// CAP_NET_BIND_SERVICE and every thread of its agents nothing but, for
    /// source preservation, CAP_NET_ADMIN and CAP_NET_RAW.
    pub fn assert_least_privilege(&self) {
        let threads = self.thread_caps();
        assert!(!threads.is_empty(), "no threads read for {}", self.pid);
        let bad: Vec<_> = threads
            .iter()
            .filter(|t| t.eff & !CAP_NET_BIND_SERVICE != 0 || t.prm & !CAP_NET_BIND_SERVICE != 0)
            .collect();
        assert!(
            bad.is_empty(),
            "forwarder threads hold more than CAP_NET_BIND_SERVICE: {bad:?} (all: {threads:?})"
        );
        for agent in self.agent_pids() {
            let threads = thread_caps(agent);
            let bad: Vec<_> = threads
                .iter()
                .filter(|t| t.eff & !AGENT_MAY_KEEP != 0 || t.prm & !AGENT_MAY_KEEP != 0)
                .collect();
            assert!(
                bad.is_empty(),
                "dial agent {agent} threads hold more than CAP_NET_ADMIN and CAP_NET_RAW: {bad:?}"
            );
        }
    }

    /// The effective capability set (CapEff of /proc/PID/status).
    pub fn cap_eff(&self) -> u64 {
        procfs::status_caps(self.pid, "CapEff:").unwrap_or(u64::MAX)
    }

    /// Resident memory in KiB.
    pub fn rss_kib(&self) -> u64 {
        procfs::status_kib(self.pid, "VmRSS:")
            .unwrap_or_else(|e| panic!("the forwarder {} is gone? {e:#}", self.pid))
    }

    /// Waits until every connection has ended and checks that nothing
    /// leaked: descriptors back to the count at start (plus two for each
    /// idle pipe the splice path keeps for reuse, at most 64 pipes), no
    /// pipe or buffer in use and, for the ebpf engine, every BPF map the
    /// process holds empty but the listen endpoints (read from the kernel
    /// directly, not from the forwarder).
    pub async fn assert_clean(&mut self) {
        let base_fds = self.base_fds;
        let maps = wait_until_async(
            limit(Duration::from_secs(10)),
            "every connection to end and nothing to be left in use",
            async || {
                let st = self.stats();
                let fds = self.fd_count();
                let maps = bpf::map_entries(self.pid);
                // FWD_LISTEN holds the published ports' listen endpoints (the
                // local-client path's configuration), not connections.
                let busy_maps: Vec<_> = maps
                    .iter()
                    .filter(|m| m.entries > 0 && m.name != "FWD_LISTEN")
                    .collect();
                let pooled = &st["pooled"];
                let pooled_pipes = pooled["pipes"].as_u64().unwrap_or(u64::MAX);
                // The dialer's sockets made ahead: at most a pool per kind.
                let pooled_sockets = pooled["sockets"].as_u64().unwrap_or(u64::MAX);
                let ok = st["active"] == 0
                    && pooled_pipes <= 64
                    && pooled_sockets <= 48
                    && fds as u64 <= base_fds as u64 + 2 * pooled_pipes + pooled_sockets
                    && pooled["pipes_in_use"] == 0
                    && pooled["buffers_in_use"] == 0
                    && busy_maps.is_empty();
                if ok {
                    return Ok(maps);
                }
                Err(format!(
                    "active {} fds {fds} (at start {base_fds}), maps {busy_maps:?}\nstats {st}\nstderr:\n{}",
                    st["active"],
                    self.stderr()
                ))
            },
        )
        .await;
        if self.engine() == "ebpf" {
            // The contract's maps must be among those checked, or the check
            // would pass whatever the forwarder left.
            for name in ["FWD_SOCKS", "FWD_TARGETS", "FWD_PEERS"] {
                assert!(
                    maps.iter().any(|m| m.name == name),
                    "expected the forwarder to hold the map {name}, found {maps:?}"
                );
            }
        }
    }

    /// SIGTERM; asserts a clean exit and returns the final stats line.
    /// BPF maps the forwarder held must be gone from the kernel soon after
    /// it exits (nothing pinned or left attached). Returns once its stderr
    /// has been read to the end, so a [`Fwd::stderr_handle`] taken before
    /// holds everything it and its agents logged.
    pub fn stop(mut self) -> Value {
        let map_ids: Vec<u32> = self.bpf_maps().iter().map(|m| m.id).collect();
        let inner = self.inner.take().expect("running");
        let stderr = inner.stderr_handle();
        let stderr = move || stderr.lock().map(|s| s.clone()).unwrap_or_default();
        let stderr_ended = inner.stderr_ended();
        let stats = inner
            .stop_within(limit(Duration::from_secs(10)))
            .unwrap_or_else(|e| panic!("{e:#}"))
            .unwrap_or_else(|| {
                panic!(
                    "no \"stats\" event from the forwarder as it stopped; stderr:\n{}",
                    stderr()
                )
            });
        wait_until(
            limit(Duration::from_secs(5)),
            "the BPF maps the forwarder held to be freed after it exited",
            || {
                let left: Vec<u32> = map_ids
                    .iter()
                    .copied()
                    .filter(|&id| bpf::map_exists(id))
                    .collect();
                if left.is_empty() {
                    return Ok(());
                }
                Err(format!("maps {left:?} remain; stderr:\n{}", stderr()))
            },
        );
        wait_until(
            limit(Duration::from_secs(5)),
            "the forwarder's stderr to close (it and its dial agents exited)",
            || stderr_ended.load(std::sync::atomic::Ordering::SeqCst),
        );
        stats
    }
}

impl Drop for Fwd {
    /// A case that fails (or is done with it) kills the forwarder outright.
    fn drop(&mut self) {
        if let Some(f) = self.inner.as_mut() {
            f.kill();
        }
    }
}

/// What a dial agent may keep while it preserves source addresses:
/// CAP_NET_ADMIN and CAP_NET_RAW.
pub const AGENT_MAY_KEEP: u64 = (1 << 12) | (1 << 13);

/// Makes dropping `s` send a reset (SO_LINGER with a zero timeout).
pub fn reset_on_drop(s: &TcpStream) {
    socket2::SockRef::from(s)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER");
}

/// How much longer than on real hardware the suite waits before calling a
/// case hung: FWD_TEST_TIME_SCALE (default 1). `cargo xtask vm-test` sets it
/// for guests on an emulated CPU, which run the same cases many times
/// slower. It stretches the time limits only, never what a case checks.
pub fn time_scale() -> u32 {
    std::env::var("FWD_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n >= 1)
        .unwrap_or(1)
}

/// A time limit, stretched by [`time_scale`].
pub fn limit(d: Duration) -> Duration {
    d * time_scale()
}

/// Runs `f` with an overall time limit (stretched by [`time_scale`]) so no
/// test can hang.
pub async fn within<T>(secs: u64, what: &str, f: impl std::future::Future<Output = T>) -> T {
    let secs = secs * u64::from(time_scale());
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: did not finish within {secs} s"),
    }
}
