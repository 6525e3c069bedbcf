//! The integration suite's harness: network namespaces made for each test,
//! sockets created inside them, test servers, deterministic data with
//! hashes, and a wrapper around the real forwarder binary that checks for
//! leaked descriptors and BPF map entries.
//!
//! Everything runs as root (namespaces, BPF); traffic stays on loopback
//! inside the namespaces a test created.

pub mod bpf;
pub mod data;
pub mod servers;
pub mod soak;
pub mod udp;

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use forwarder::wire;
use serde_json::Value;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Fails clearly when not root: the suite needs namespaces and BPF.
pub fn require_root() {
    // SAFETY: geteuid cannot fail.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the netns suite must run as root (cargo xtask test)"
    );
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) {
    let st = Command::new("ip")
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
    assert!(st.success(), "ip {args:?} failed: {st}");
}

/// The unprivileged user the rootless tests run as (`cargo xtask setup`
/// creates it; created here too if missing).
pub const TEST_USER: &str = "fwdtest";

/// The test user's uid and gid, creating the user if needed.
pub fn test_user() -> (u32, u32) {
    static IDS: std::sync::OnceLock<(u32, u32)> = std::sync::OnceLock::new();
    *IDS.get_or_init(|| {
        let id = |flag: &str| -> Option<u32> {
            let out = Command::new("id").args([flag, TEST_USER]).output().ok()?;
            String::from_utf8_lossy(&out.stdout).trim().parse().ok()
        };
        if id("-u").is_none() {
            let _ = Command::new("useradd")
                .args([
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    TEST_USER,
                ])
                .status();
        }
        (
            id("-u").expect("test user (useradd fwdtest)"),
            id("-g").expect("test user's group"),
        )
    })
}

/// A command that runs as the unprivileged test user.
pub fn user_command(program: &str) -> Command {
    let (uid, gid) = test_user();
    let mut c = Command::new(program);
    // SAFETY: drop_to_user makes only raw syscalls.
    unsafe {
        c.pre_exec(move || drop_to_user(uid, gid, false));
    }
    c
}

/// How the forwarder under test runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Privilege {
    /// As root, entering namespaces the test made with `ip netns`.
    Root,
    /// As the unprivileged test user, against a user + network namespace
    /// that user created (`unshare --user --map-root-user --net`).
    User,
    /// The same, with CAP_BPF and CAP_NET_ADMIN as ambient capabilities.
    UserWithBpf,
}

/// A network namespace with loopback up, deleted on drop: a named one made
/// by root, or one owned by the test user's own user namespace and held by
/// a process of that user.
pub struct Netns {
    pub name: String,
    holder: Option<Child>,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        require_root();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("fwt-{}-{n}-{tag}", std::process::id());
        ip(&["netns", "add", &name]);
        let ns = Netns { name, holder: None };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// A user + network namespace created by the unprivileged test user, as
    /// a rootless container runtime would.
    pub fn new_rootless() -> Netns {
        require_root();
        let (uid, gid) = test_user();
        let mut cmd = Command::new("unshare");
        cmd.args(["--user", "--map-root-user", "--net", "sleep", "infinity"])
            .stdin(Stdio::null());
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let holder = cmd.spawn().expect("unshare (util-linux)");
        let pid = holder.id();
        // Wait until the holder is in its new namespace and its user
        // namespace has its uid and gid maps (unshare writes them after
        // unsharing; joining it before fails with EINVAL).
        let own = std::fs::read_link("/proc/self/ns/net").ok();
        for _ in 0..200 {
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok();
            // unshare execs sleep once the maps are written.
            let mapped = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "sleep");
            if theirs.is_some() && theirs != own && mapped {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let ns = Netns {
            name: format!("pid{pid}"),
            holder: Some(holder),
        };
        let st = Command::new("nsenter")
            .arg(format!("--net={}", ns.path().display()))
            .args(["ip", "link", "set", "lo", "up"])
            .status()
            .expect("nsenter");
        assert!(st.success(), "bringing lo up in {}", ns.name);
        ns
    }

    /// The PID holding a user-owned namespace.
    pub fn holder_pid(&self) -> Option<u32> {
        self.holder.as_ref().map(|c| c.id())
    }

    /// The namespace file.
    pub fn path(&self) -> PathBuf {
        match &self.holder {
            Some(c) => PathBuf::from(format!("/proc/{}/ns/net", c.id())),
            None => PathBuf::from(format!("/run/netns/{}", self.name)),
        }
    }

    /// A command that runs inside this namespace (it enters it between
    /// fork and exec, so the PID is the program's own).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let nsfile = File::open(self.path()).expect("open netns");
        let mut cmd = Command::new(program);
        // SAFETY: only setns between fork and exec; the file moves into the
        // closure and stays open as long as the Command.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(nsfile.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Sets a sysctl inside the namespace (written from a thread that
    /// entered it: /proc/sys/net follows the writer's namespace).
    pub fn sysctl(&self, key: &str, value: &str) {
        let file = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = value.to_string();
        let r = self.run(move || std::fs::write(&file, value));
        assert!(r.is_ok(), "sysctl {key} in {}: {r:?}", self.name);
    }

    /// Disables IPv6 on every interface of the namespace. On a kernel
    /// booted with `ipv6.disable=1` (no IPv6 at all, `cargo xtask vm-test`)
    /// there is nothing to disable.
    pub fn disable_ipv6(&self) {
        if !std::path::Path::new("/proc/sys/net/ipv6").exists() {
            eprintln!("this kernel has no IPv6 (ipv6.disable=1): nothing to disable");
            return;
        }
        self.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
        self.sysctl("net.ipv6.conf.default.disable_ipv6", "1");
        self.sysctl("net.ipv6.conf.lo.disable_ipv6", "1");
    }

    /// Runs `f` on a fresh thread that has entered this namespace: sockets
    /// it creates belong here for their whole life.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let file = File::open(self.path()).expect("open netns");
        std::thread::spawn(move || {
            // SAFETY: setns on this thread only.
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("netns thread panicked")
    }

    /// A listening socket bound in this namespace.
    pub fn listen(&self, addr: &str) -> TcpListener {
        self.listen_with(addr, |_| {})
    }

    /// Fills `l`'s accept queue: shrinks its backlog to zero and connects
    /// one socket to it from inside this namespace, which takes the only
    /// slot until `l` accepts it. Until then the kernel drops SYNs to `l`.
    /// Returns the filler, to keep open meanwhile.
    pub fn fill_accept_queue(&self, l: &TcpListener) -> std::net::TcpStream {
        socket2::SockRef::from(l).listen(0).expect("listen(0)");
        let addr = l.local_addr().expect("local address");
        self.run(move || std::net::TcpStream::connect(addr).expect("filler connection"))
    }

    /// SYNs this namespace dropped because a listener's accept queue was
    /// full (TcpExt ListenOverflows of its /proc/net/netstat).
    pub fn listen_overflows(&self) -> u64 {
        self.run(|| {
            let text = std::fs::read_to_string("/proc/thread-self/net/netstat").expect("netstat");
            let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
            let (names, values) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
            names
                .split_whitespace()
                .zip(values.split_whitespace())
                .find(|(n, _)| *n == "ListenOverflows")
                .and_then(|(_, v)| v.parse().ok())
                .expect("ListenOverflows in /proc/net/netstat")
        })
    }

    /// Like [`Netns::listen`], with socket options set before listen().
    pub fn listen_with(
        &self,
        addr: &str,
        opts: impl FnOnce(&socket2::Socket) + Send + 'static,
    ) -> TcpListener {
        let addr: SocketAddr = addr.parse().expect("address");
        let std = self.run(move || {
            let s = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                None,
            )
            .expect("socket");
            if addr.is_ipv6() {
                s.set_only_v6(true).expect("v6only");
            }
            s.set_reuse_address(true).expect("reuseaddr");
            opts(&s);
            s.bind(&addr.into())
                .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
            s.listen(1024).expect("listen");
            s.set_nonblocking(true).expect("nonblocking");
            std::net::TcpListener::from(s)
        });
        TcpListener::from_std(std).expect("tokio listener")
    }

    /// Connects from inside this namespace.
    pub async fn connect(&self, addr: &str) -> std::io::Result<TcpStream> {
        let addr: SocketAddr = addr.parse().expect("address");
        let fd: OwnedFd = self.run(move || {
            let s = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                None,
            )
            .expect("socket");
            s.set_nonblocking(true).expect("nonblocking");
            s.into()
        });
        TcpSocket::from_std_stream(std::net::TcpStream::from(fd))
            .connect(addr)
            .await
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        match self.holder.take() {
            Some(mut c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            None => {
                let _ = Command::new("ip")
                    .args(["netns", "del", &self.name])
                    .status();
            }
        }
    }
}

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
            Privilege::User | Privilege::UserWithBpf => Netns::new_rootless(),
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

/// Becomes `uid`/`gid` with no capabilities, or with CAP_BPF and
/// CAP_NET_ADMIN raised as ambient capabilities (what `setpriv --inh-caps
/// +bpf,+net_admin --ambient-caps +bpf,+net_admin` does). Runs between
/// fork and exec: raw syscalls only.
pub fn drop_to_user(uid: u32, gid: u32, with_bpf: bool) -> std::io::Result<()> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_BPF: u32 = 39;
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let err = std::io::Error::last_os_error;
    // SAFETY: plain syscalls in the forked child.
    unsafe {
        if with_bpf && libc::prctl(libc::PR_SET_KEEPCAPS, 1) != 0 {
            return Err(err());
        }
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setgid(gid) != 0
            || libc::setuid(uid) != 0
        {
            return Err(err());
        }
        if with_bpf {
            let mut hdr = Header {
                version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
                pid: 0,
            };
            let lo = 1u32 << CAP_NET_ADMIN;
            let hi = 1u32 << (CAP_BPF - 32);
            let data = [
                Data {
                    effective: lo,
                    permitted: lo,
                    inheritable: lo,
                },
                Data {
                    effective: hi,
                    permitted: hi,
                    inheritable: hi,
                },
            ];
            if libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) != 0 {
                return Err(err());
            }
            for cap in [CAP_NET_ADMIN, CAP_BPF] {
                if libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE,
                    cap as libc::c_ulong,
                    0,
                    0,
                ) != 0
                {
                    return Err(err());
                }
            }
        }
    }
    Ok(())
}

/// Decodes one line of the forwarder's stdout with the wire types the
/// forwarder writes it with ([`forwarder::wire::Event`]), so a line that
/// drifts from them fails the test that reads it. The event is handed on as
/// JSON for the cases to index.
pub fn decode_event(line: &str) -> Result<Value, String> {
    serde_json::from_str::<wire::Event>(line)
        .map_err(|e| format!("stdout line is not a wire::Event ({e}): {line}"))
        .and_then(|ev| serde_json::to_value(ev).map_err(|e| e.to_string()))
}

/// A running forwarder, started inside a namespace.
pub struct Fwd {
    child: Option<Child>,
    pub pid: u32,
    events: mpsc::Receiver<Result<Value, String>>,
    stderr: Arc<Mutex<String>>,
    pub ready: Value,
    base_fds: usize,
}

impl Fwd {
    /// Starts `forwarder run --child-netns <child> ARGS...` in `pair.parent`
    /// and waits for its ready line.
    pub fn start(pair: &Pair, args: &[&str]) -> Fwd {
        Self::start_with(pair, args, None)
    }

    /// Like [`Fwd::start`], with RLIMIT_NOFILE (soft and hard) set to
    /// `nofile` for the forwarder.
    pub fn start_with_nofile(pair: &Pair, args: &[&str], nofile: u64) -> Fwd {
        Self::start_with(pair, args, Some(nofile))
    }

    fn start_with(pair: &Pair, args: &[&str], nofile: Option<u64>) -> Fwd {
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
        Self::spawn_as(&pair.parent, &full, nofile, pair.privilege)
    }

    /// Starts the binary as root with exactly `args` inside `ns`.
    pub fn spawn(ns: &Netns, args: &[String], nofile: Option<u64>) -> Fwd {
        Self::spawn_as(ns, args, nofile, Privilege::Root)
    }

    /// Starts the binary with exactly `args` inside `ns`, as root or as the
    /// unprivileged test user (optionally with ambient CAP_BPF and
    /// CAP_NET_ADMIN).
    pub fn spawn_as(ns: &Netns, args: &[String], nofile: Option<u64>, privilege: Privilege) -> Fwd {
        let ids = match privilege {
            Privilege::Root => None,
            _ => Some(test_user()),
        };
        let with_bpf = privilege == Privilege::UserWithBpf;
        let nsfile = File::open(ns.path()).expect("open netns");
        let nsfd = nsfile.as_raw_fd();
        let mut cmd = Command::new(forwarder_bin());
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
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
                    drop_to_user(uid, gid, with_bpf)?;
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", forwarder_bin().display()));
        drop(nsfile);
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(decode_event(&line)).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().expect("stderr");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
        let mut f = Fwd {
            child: Some(child),
            pid,
            events: rx,
            stderr,
            ready: Value::Null,
            base_fds: 0,
        };
        f.ready = f.event("ready", limit(Duration::from_secs(20)));
        f.base_fds = f.fd_count();
        f
    }

    /// Waits up to `timeout` for the forwarder to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A handle on the forwarder's stderr that outlives [`Fwd::stop`].
    pub fn stderr_handle(&self) -> Arc<Mutex<String>> {
        self.stderr.clone()
    }

    /// What the forwarder has written to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits up to `timeout` for `needle` to appear on stderr (read by a
    /// background thread, so a line logged before an event on stdout may
    /// reach us after it). Returns stderr as it is then.
    pub fn wait_stderr(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let err = self.stderr();
            if err.contains(needle) || Instant::now() > deadline {
                return err;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The hash and socket maps the forwarder holds, counted by the kernel.
    pub fn bpf_maps(&self) -> Vec<bpf::MapInfo> {
        bpf::map_entries(self.pid)
    }

    fn event(&mut self, name: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(Ok(v)) if v["event"] == name => return v,
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => panic!("{e}"),
                Err(_) => {
                    let status = self
                        .child
                        .as_mut()
                        .and_then(|c| c.try_wait().ok().flatten());
                    std::thread::sleep(Duration::from_millis(100));
                    panic!(
                        "no {name:?} event from the forwarder (exit status {status:?}); stderr:\n{}",
                        self.stderr()
                    );
                }
            }
        }
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
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid as i32, libc::SIGUSR1) };
        self.event("stats", limit(Duration::from_secs(30)))
    }

    /// Open descriptors of the forwarder.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Open pipe descriptors of the forwarder.
    pub fn pipe_fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .map(|d| {
                d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                    .filter(|t| t.to_string_lossy().starts_with("pipe:"))
                    .count()
            })
            .unwrap_or(0)
    }

    /// User + system CPU time in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let f: Vec<&str> = after.split_whitespace().collect();
        // fields 14 and 15 of stat; after ")" they are at 11 and 12.
        f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
    }

    /// Every thread of the forwarder with its effective capabilities.
    pub fn thread_caps(&self) -> Vec<ThreadCaps> {
        thread_caps(self.pid)
    }

    /// The child-side dial agents the forwarder started (its children
    /// running `child-agent`).
    pub fn agent_pids(&self) -> Vec<u32> {
        // Children are listed per thread that forked them.
        let children: String = std::fs::read_dir(format!("/proc/{}/task", self.pid))
            .map(|d| {
                d.flatten()
                    .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        children
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                    .unwrap_or_default()
                    .contains("child-agent")
            })
            .collect()
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
        std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(u64::MAX)
    }

    /// Resident memory in KiB.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// Waits until every connection has ended and checks that nothing
    /// leaked: descriptors back to the count at start (plus two for each
    /// idle pipe the splice path keeps for reuse, at most 64 pipes), no
    /// pipe or buffer in use and, for the ebpf engine, every BPF map the
    /// process holds empty (read from the kernel directly, not from the
    /// forwarder).
    pub async fn assert_clean(&mut self) {
        let deadline = Instant::now() + limit(Duration::from_secs(10));
        loop {
            let st = self.stats();
            let fds = self.fd_count();
            let maps = bpf::map_entries(self.pid);
            let busy_maps: Vec<_> = maps.iter().filter(|m| m.entries > 0).collect();
            let pooled = &st["pooled"];
            let pooled_pipes = pooled["pipes"].as_u64().unwrap_or(u64::MAX);
            let ok = st["active"] == 0
                && pooled_pipes <= 64
                && fds as u64 <= self.base_fds as u64 + 2 * pooled_pipes
                && pooled["pipes_in_use"] == 0
                && pooled["buffers_in_use"] == 0
                && busy_maps.is_empty();
            if ok {
                if self.engine() == "ebpf" {
                    // The contract's maps must be among those checked, or
                    // the check would pass whatever the forwarder left.
                    for name in ["FWD_SOCKS", "FWD_TARGETS", "FWD_PEERS"] {
                        assert!(
                            maps.iter().any(|m| m.name == name),
                            "expected the forwarder to hold the map {name}, found {maps:?}"
                        );
                    }
                }
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "not clean after 10 s: active {} fds {fds} (at start {}), maps {busy_maps:?}\nstats {st}\nstderr:\n{}",
                    st["active"],
                    self.base_fds,
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM; asserts a clean exit and returns the final stats line.
    /// BPF maps the forwarder held must be gone from the kernel soon after
    /// it exits (nothing pinned or left attached).
    pub fn stop(mut self) -> Value {
        let map_ids: Vec<u32> = self.bpf_maps().iter().map(|m| m.id).collect();
        let mut child = self.child.take().expect("running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let deadline = Instant::now() + limit(Duration::from_secs(10));
        let status = loop {
            if let Some(st) = child.try_wait().expect("wait") {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "forwarder did not exit within 10 s of SIGTERM; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            status.success(),
            "forwarder exited with {status}; stderr:\n{}",
            self.stderr()
        );
        let stats = self.event("stats", limit(Duration::from_secs(10)));
        let deadline = Instant::now() + limit(Duration::from_secs(5));
        loop {
            let left: Vec<u32> = map_ids
                .iter()
                .copied()
                .filter(|&id| bpf::map_exists(id))
                .collect();
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "BPF maps {left:?} outlived the forwarder by 5 s; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        stats
    }
}

impl Drop for Fwd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// CAP_NET_BIND_SERVICE as a bit of a capability set.
pub const CAP_NET_BIND_SERVICE: u64 = 1 << 10;

/// What a dial agent may keep while it preserves source addresses:
/// CAP_NET_ADMIN and CAP_NET_RAW.
pub const AGENT_MAY_KEEP: u64 = (1 << 12) | (1 << 13);

/// One thread's name and capability sets, from /proc/PID/task/TID/status.
#[derive(Debug, Clone)]
pub struct ThreadCaps {
    pub tid: u32,
    pub name: String,
    /// CapEff.
    pub eff: u64,
    /// CapPrm.
    pub prm: u64,
}

/// Every thread of `pid` with its capability sets.
pub fn thread_caps(pid: u32) -> Vec<ThreadCaps> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
        };
        let hex = |k: &str| {
            field(k)
                .and_then(|v| u64::from_str_radix(&v, 16).ok())
                .unwrap_or(u64::MAX)
        };
        out.push(ThreadCaps {
            tid,
            name: field("Name:").unwrap_or_default(),
            eff: hex("CapEff:"),
            prm: hex("CapPrm:"),
        });
    }
    out
}

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
