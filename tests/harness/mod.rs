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

/// A network namespace with loopback up, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        require_root();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("fwt{}-{n}-{tag}", std::process::id());
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// The namespace file.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        let st = Command::new("ip")
            .args(["netns", "exec", &self.name, "sysctl", "-q", "-w"])
            .arg(format!("{key}={value}"))
            .status()
            .expect("sysctl");
        assert!(st.success(), "sysctl {key}={value} in {}", self.name);
    }

    /// Disables IPv6 on every interface of the namespace.
    pub fn disable_ipv6(&self) {
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
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The parent namespace (where the forwarder listens and clients connect)
/// and the child (where the servers are).
pub struct Pair {
    pub parent: Netns,
    pub child: Netns,
}

impl Pair {
    pub fn new() -> Pair {
        Pair {
            parent: Netns::new("p"),
            child: Netns::new("c"),
        }
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

/// A running forwarder, started inside a namespace.
pub struct Fwd {
    child: Option<Child>,
    pub pid: u32,
    events: mpsc::Receiver<Value>,
    stderr: Arc<Mutex<String>>,
    pub ready: Value,
    base_fds: usize,
}

impl Fwd {
    /// Starts `forwarder run --child-netns <child> ARGS...` in `pair.parent`
    /// and waits for its ready line.
    pub fn start(pair: &Pair, args: &[&str]) -> Fwd {
        let mut full = vec![
            "run".to_string(),
            "--child-netns".to_string(),
            pair.child.path().display().to_string(),
        ];
        full.extend(args.iter().map(|a| a.to_string()));
        Self::spawn(&pair.parent, &full, None)
    }

    /// Like [`Fwd::start`], with RLIMIT_NOFILE (soft and hard) set to
    /// `nofile` for the forwarder.
    pub fn start_with_nofile(pair: &Pair, args: &[&str], nofile: u64) -> Fwd {
        let mut full = vec![
            "run".to_string(),
            "--child-netns".to_string(),
            pair.child.path().display().to_string(),
        ];
        full.extend(args.iter().map(|a| a.to_string()));
        Self::spawn(&pair.parent, &full, Some(nofile))
    }

    /// Starts the binary with exactly `args` inside `ns`.
    pub fn spawn(ns: &Netns, args: &[String], nofile: Option<u64>) -> Fwd {
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
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if tx.send(v).is_err() {
                        break;
                    }
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
        f.ready = f.event("ready", Duration::from_secs(20));
        f.base_fds = f.fd_count();
        f
    }

    /// What the forwarder has written to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn event(&mut self, name: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(v) if v["event"] == name => return v,
                Ok(_) => continue,
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
        self.event("stats", Duration::from_secs(30))
    }

    /// Open descriptors of the forwarder.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .map(|d| d.count())
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
    /// leaked: descriptors back to the count at start and, for the ebpf
    /// engine, every BPF map the process holds empty (read from the kernel
    /// directly, not from the forwarder).
    pub async fn assert_clean(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let st = self.stats();
            let fds = self.fd_count();
            let maps = bpf::map_entries(self.pid);
            let busy_maps: Vec<_> = maps.iter().filter(|m| m.entries > 0).collect();
            let ok = st["active"] == 0 && fds <= self.base_fds && busy_maps.is_empty();
            if ok {
                if self.engine() == "ebpf" {
                    assert!(
                        maps.len() >= 3,
                        "expected the forwarder to hold its BPF maps, found {maps:?}"
                    );
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
    pub fn stop(mut self) -> Value {
        let mut child = self.child.take().expect("running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
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
        self.event("stats", Duration::from_secs(10))
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

/// Makes dropping `s` send a reset (SO_LINGER with a zero timeout).
pub fn reset_on_drop(s: &TcpStream) {
    socket2::SockRef::from(s)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER");
}

/// Runs `f` with an overall time limit so no test can hang.
pub async fn within<T>(secs: u64, what: &str, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: did not finish within {secs} s"),
    }
}
