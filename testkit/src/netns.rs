//! Network namespaces made for a test or a bench run, deleted on drop:
//! named ones made by root with `ip netns`, or one owned by the
//! unprivileged test user's own user namespace; sockets and commands
//! created inside them; and the unprivileged test user.

use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::wait::try_wait_until;

/// Fails clearly when not root: the suite needs namespaces and BPF.
pub fn require_root() {
    // SAFETY: geteuid cannot fail.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the netns suite must run as root (cargo xtask test)"
    );
}

/// How long `unshare` may take to make a rootless namespace (it takes
/// milliseconds; the limit is for a loaded machine).
const HOLDER_READY: Duration = Duration::from_secs(10);

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
    /// The same, with CAP_PERFMON too: what the local-client path needs.
    UserWithLocalPath,
}

impl Privilege {
    /// The capabilities the forwarder holds as ambient ones (numbers as
    /// in `linux/capability.h`).
    pub fn ambient_caps(self) -> &'static [u32] {
        match self {
            Privilege::Root | Privilege::User => &[],
            Privilege::UserWithBpf => &[CAP_NET_ADMIN, CAP_BPF],
            Privilege::UserWithLocalPath => &[CAP_NET_ADMIN, CAP_PERFMON, CAP_BPF],
        }
    }

    /// Whether the forwarder runs as the unprivileged test user.
    pub fn is_user(self) -> bool {
        self != Privilege::Root
    }
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// A network namespace with loopback up, deleted on drop: a named one made
/// by root, or one owned by the test user's own user namespace and held by
/// a process of that user.
pub struct Netns {
    pub name: String,
    holder: Option<Child>,
}

/// Runs `ip ARGS`, failing with its stderr.
fn ip_checked(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("running ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Netns {
    /// `ip netns add NAME` and `ip -n NAME link set lo up`, for callers
    /// that report errors instead of panicking (xtask). 127.0.0.0/8 is all
    /// local on lo, so 127.0.0.2 needs no address of its own.
    pub fn named(name: &str) -> anyhow::Result<Netns> {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            bail!("creating a network namespace needs root");
        }
        ip_checked(&["netns", "add", name])
            .with_context(|| format!("creating network namespace {name}"))?;
        let ns = Netns {
            name: name.to_string(),
            holder: None,
        };
        ip_checked(&["-n", name, "link", "set", "lo", "up"])
            .with_context(|| format!("bringing up lo in {name}"))?;
        Ok(ns)
    }

    /// A command that runs inside a named namespace through `ip netns
    /// exec` (which also mounts a /sys of the namespace).
    pub fn ip_exec(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec"]).arg(&self.name).arg(program);
        c
    }

    /// A fresh named namespace `fwt-PID-N-TAG`; panics if it cannot be made
    /// (tests).
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
        let mut holder = cmd.spawn().expect("unshare (util-linux)");
        let pid = holder.id();
        // Wait until the holder is in its new namespace and its user
        // namespace has its uid and gid maps (unshare writes them after
        // unsharing; joining it before fails with EINVAL). Going on
        // without them only fails later, less clearly (nsenter, the
        // forwarder's setns), so running out of time fails here; so does
        // unshare exiting (user namespaces not allowed, say).
        let own = std::fs::read_link("/proc/self/ns/net").ok();
        let what = format!("unshare (PID {pid}) to make its user and network namespaces");
        let ready = try_wait_until(HOLDER_READY, &what, || {
            if let Ok(Some(st)) = holder.try_wait() {
                panic!("unshare (PID {pid}), making a rootless namespace, exited ({st})");
            }
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok();
            // unshare execs sleep once the maps are written.
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if theirs.is_none() || theirs == own {
                Err("its network namespace is still ours".to_string())
            } else if comm.trim() != "sleep" {
                Err(format!(
                    "it has not exec'd sleep yet (it is {:?})",
                    comm.trim()
                ))
            } else {
                Ok(())
            }
        });
        if let Err(timed_out) = ready {
            let _ = holder.kill();
            let _ = holder.wait();
            panic!("{timed_out}");
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
        self.connect_from(None, addr.parse().expect("address"))
            .await
    }

    /// Connects from inside this namespace, from `from` (port 0: chosen
    /// by the kernel) where given.
    pub async fn connect_from(
        &self,
        from: Option<SocketAddr>,
        addr: SocketAddr,
    ) -> std::io::Result<TcpStream> {
        let fd: OwnedFd = self.run(move || {
            let s = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                None,
            )
            .expect("socket");
            if let Some(from) = from {
                s.bind(&from.into())
                    .unwrap_or_else(|e| panic!("bind the client to {from}: {e}"));
            }
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
                if let Err(e) = ip_checked(&["netns", "del", &self.name]) {
                    eprintln!("warning: deleting network namespace {}: {e:#}", self.name);
                }
            }
        }
    }
}

/// Becomes `uid`/`gid` with no capabilities, or with CAP_BPF and
/// CAP_NET_ADMIN raised as ambient capabilities (what `setpriv --inh-caps
/// +bpf,+net_admin --ambient-caps +bpf,+net_admin` does). Runs between
/// fork and exec: raw syscalls only.
pub fn drop_to_user(uid: u32, gid: u32, with_bpf: bool) -> std::io::Result<()> {
    let caps: &[u32] = if with_bpf {
        Privilege::UserWithBpf.ambient_caps()
    } else {
        &[]
    };
    drop_to_user_with(uid, gid, caps)
}

/// Becomes `uid`/`gid` with `caps` (numbers as in `linux/capability.h`)
/// raised as ambient capabilities, or none. Runs between fork and exec:
/// raw syscalls only.
pub fn drop_to_user_with(uid: u32, gid: u32, caps: &[u32]) -> std::io::Result<()> {
    let with_caps = !caps.is_empty();
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
        if with_caps && libc::prctl(libc::PR_SET_KEEPCAPS, 1) != 0 {
            return Err(err());
        }
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setgid(gid) != 0
            || libc::setuid(uid) != 0
        {
            return Err(err());
        }
        if with_caps {
            let mut hdr = Header {
                version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
                pid: 0,
            };
            let (mut lo, mut hi) = (0u32, 0u32);
            for &c in caps {
                if c < 32 {
                    lo |= 1 << c;
                } else {
                    hi |= 1 << (c - 32);
                }
            }
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
            for &cap in caps {
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
