//! `cargo xtask e2e`: rootless Docker publishes ports through forwarder,
//! end to end, as a user would run it.
//!
//! For each configuration (forwarder in auto mode as a plain user, and with
//! CAP_BPF + CAP_NET_ADMIN as ambient capabilities):
//!
//! 1. rootless dockerd (Debian's `dockerd-rootless.sh`, RootlessKit with
//!    `--port-driver=none`, slirp4netns, vfs storage) starts as the
//!    unprivileged test user, with its data under `target/e2e`;
//! 2. `forwarder attach-docker` starts as the same user and takes over
//!    RootlessKit's API socket;
//! 3. a busybox image (imported from Debian's `busybox-static` and a tiny
//!    static echo server compiled from `xtask/fixtures/echo.rs`, no
//!    registry) runs `httpd` and the echo with `-p 127.0.0.2:8080:80
//!    -p 8081:80 -p 127.0.0.1:8082:80/tcp -p 8053:53/udp`, serving a 1 GiB
//!    file of known SHA-256 from a read-only bind mount;
//! 4. checks: each published address answers (8081 over IPv4 and IPv6,
//!    UDP 8053 over both: datagrams come back unchanged),
//!    the 1 GiB download's checksum, `docker restart` re-adds the ports,
//!    `docker rm -f` removes them, and stopping dockerd leaves no listener
//!    (the forwarder exits when the container's namespaces go) and puts
//!    RootlessKit's socket back.
//!
//! Every check is reported as a row; the task fails if any failed.

use std::io::Write;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use sha2::{Digest, Sha256};

use forwarder_testkit::wait::{try_wait_until, try_wait_until_or_abort};

use crate::util::{self, die_with_parent, output, Proc};

/// The unprivileged user dockerd and forwarder run as (`setup` creates it).
const USER: &str = "fwdtest";
/// The image the suite imports (also the bench's rootless Docker row).
pub const IMAGE: &str = "forwarder-e2e-busybox:3";
/// Size of the download checked end to end.
const BIG: u64 = 1 << 30;
/// The published ports: (what `docker run -p` is given, addresses to try).
const PUBLISH: &[(&str, &[&str])] = &[
    ("127.0.0.2:8080:80", &["127.0.0.2:8080"]),
    ("8081:80", &["127.0.0.1:8081", "[::1]:8081"]),
    ("127.0.0.1:8082:80/tcp", &["127.0.0.1:8082"]),
    ("8053:53/udp", &["127.0.0.1:8053", "[::1]:8053"]),
];
/// Entries the API lists for [`PUBLISH`]: dockerd asks for `0.0.0.0` and
/// `::` for a spec without an address.
const API_PORTS: usize = 6;

/// Whether a [`PUBLISH`] spec is a UDP port.
fn is_udp(spec: &str) -> bool {
    spec.ends_with("/udp")
}

/// How the forwarder runs.
#[derive(Clone, Copy, Debug)]
enum Config {
    /// As the plain user: auto mode finds no BPF permission.
    Plain,
    /// With CAP_BPF + CAP_NET_ADMIN as ambient capabilities.
    WithBpf,
}

impl Config {
    fn name(self) -> &'static str {
        match self {
            Config::Plain => "auto, plain user",
            Config::WithBpf => "auto, CAP_BPF+CAP_NET_ADMIN",
        }
    }
}

/// The test user's ids and the suite's directories.
pub struct Env {
    uid: u32,
    gid: u32,
    work: PathBuf,
    home: PathBuf,
    runtime: PathBuf,
    /// Served read-only by the container's httpd: `index.html` and `big`.
    pub www: PathBuf,
    big_sha: String,
}

impl Env {
    /// `setpriv` to the test user (with the ambient capabilities of
    /// `caps`, if any), then `program`, with the user's environment.
    fn as_user(&self, caps: Option<&str>, program: &str) -> Command {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid",
            &self.uid.to_string(),
            "--regid",
            &self.gid.to_string(),
            "--clear-groups",
        ]);
        if let Some(caps) = caps {
            c.args(["--inh-caps", caps, "--ambient-caps", caps]);
        }
        c.arg(program)
            .env_clear()
            .env(
                "PATH",
                "/usr/share/docker.io/contrib:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("HOME", &self.home)
            .env("XDG_RUNTIME_DIR", &self.runtime)
            .env(
                "DOCKER_HOST",
                format!("unix://{}/docker.sock", self.runtime.display()),
            )
            .env("DOCKER_CONFIG", self.home.join(".docker"))
            .current_dir(&self.home);
        c
    }

    /// `docker ARGS` as the test user, against its rootless dockerd.
    pub fn docker(&self, args: &[&str]) -> Result<String> {
        output(self.as_user(None, "docker").args(args))
    }
}

fn id(flag: &str) -> Result<u32> {
    output(Command::new("id").args([flag, USER]))?
        .trim()
        .parse()
        .with_context(|| format!("`id {flag} {USER}`"))
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown {}", path.display()))
}

/// Makes the directories, the image tarball and the 1 GiB file (kept
/// between runs; its hash is recomputed, cheaply, from the generator).
/// `hash_big`: compute the 1 GiB file's SHA-256 (`big_sha`, minutes in a
/// debug build) even if the file is already there; the bench needs none.
pub fn prepare(hash_big: bool) -> Result<Env> {
    let (uid, gid) = (id("-u")?, id("-g")?);
    let work = util::target_dir()?.join("e2e");
    let home = work.join("home");
    let runtime = PathBuf::from(format!("/run/user/{uid}"));
    let www = work.join("www");
    for d in [&work, &home, &runtime, &www] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    // The test user must reach its home and the served files through
    // target/.
    use std::os::unix::fs::PermissionsExt as _;
    for d in [&work, &www] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
    }
    for a in work.ancestors().skip(1) {
        let mode = std::fs::metadata(a)?.permissions().mode();
        ensure!(
            mode & 0o001 != 0,
            "{} (mode {mode:o}) is not searchable by others: the test user cannot reach {}",
            a.display(),
            work.display()
        );
    }
    chown(&home, uid, gid)?;
    chown(&runtime, uid, gid)?;
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700))?;
    std::fs::write(www.join("index.html"), "hello from the container\n")?;
    let big = www.join("big");
    let big_sha = write_big(&big, hash_big)?;
    Ok(Env {
        uid,
        gid,
        work,
        home,
        runtime,
        www,
        big_sha,
    })
}

/// The 1 GiB file: a xorshift stream, written once; returns its SHA-256
/// (empty if the file was there and `hash` is false).
fn write_big(path: &Path, hash: bool) -> Result<String> {
    let fresh = std::fs::metadata(path)
        .map(|m| m.len() != BIG)
        .unwrap_or(true);
    if !fresh && !hash {
        return Ok(String::new());
    }
    let mut file = if fresh {
        Some(std::io::BufWriter::new(std::fs::File::create(path)?))
    } else {
        None
    };
    let mut h = Sha256::new();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..(BIG >> 20) {
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        h.update(&buf);
        if let Some(f) = file.as_mut() {
            f.write_all(&buf)?;
        }
    }
    if let Some(mut f) = file {
        f.flush()?;
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Why rootless Docker cannot run here, if it cannot (checked before
/// anything starts): `setup` installs what is needed.
pub fn unavailable() -> Option<String> {
    if !util::is_root() {
        return Some("needs root (starts rootless dockerd as the test user)".into());
    }
    if !Path::new("/usr/share/docker.io/contrib/dockerd-rootless.sh").is_file() {
        return Some(
            "no /usr/share/docker.io/contrib/dockerd-rootless.sh (Debian's docker.io)".into(),
        );
    }
    if !Path::new("/bin/busybox").is_file() {
        return Some("no /bin/busybox (Debian's busybox-static)".into());
    }
    if id("-u").is_err() {
        return Some(format!("no user {USER} (cargo xtask setup creates it)"));
    }
    None
}

/// Imports the suite's image unless dockerd has it.
pub fn ensure_image(env: &Env) -> Result<()> {
    if env.docker(&["image", "inspect", IMAGE]).is_err() {
        let image = env.work.join("busybox.tar");
        make_image_tar(&image, &env.work)?;
        env.docker(&["import", &image.display().to_string(), IMAGE])?;
    }
    Ok(())
}

/// A rootless dockerd of the test user; stopped (SIGTERM to RootlessKit,
/// by PID) on drop.
pub struct Dockerd {
    proc: Proc,
    log: PathBuf,
}

impl Dockerd {
    /// Starts it with RootlessKit's port driver `port_driver` (`none` for
    /// forwarder, `builtin` for RootlessKit's own) and waits until it
    /// answers.
    pub fn start(env: &Env, port_driver: &str) -> Result<Dockerd> {
        let log = env.work.join("dockerd.log");
        let logf = std::fs::File::create(&log)?;
        let mut cmd = env.as_user(None, "dockerd-rootless.sh");
        cmd.env("DOCKERD_ROOTLESS_ROOTLESSKIT_PORT_DRIVER", port_driver)
            .args(["--storage-driver=vfs", "--data-root"])
            .arg(env.home.join("docker"))
            .arg("--exec-root")
            .arg(env.runtime.join("docker-exec"))
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf);
        die_with_parent(&mut cmd, libc::SIGTERM);
        let proc = Proc::spawn(&mut cmd, "rootless dockerd")?;
        let mut d = Dockerd { proc, log };
        let answered = try_wait_until_or_abort(
            Duration::from_secs(60),
            "rootless dockerd to answer `docker info`",
            || -> Result<_> {
                let answer = env.docker(&["info", "--format", "{{.ServerVersion}}"]);
                if answer.is_err() {
                    if let Some(st) = d.proc.try_wait()? {
                        bail!("rootless dockerd exited ({st}){}", d.log_tail());
                    }
                }
                Ok(answer.map_err(|e| format!("{e:#}")))
            },
        )?;
        if let Err(timed_out) = answered {
            bail!("{timed_out}{}", d.log_tail());
        }
        Ok(d)
    }

    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        format!(
            "\ndockerd's last log lines:\n  {}",
            lines[lines.len().saturating_sub(15)..].join("\n  ")
        )
    }

    pub fn stop(&mut self) -> Result<()> {
        self.proc
            .stop(libc::SIGTERM, Duration::from_secs(30))
            .map(|_| ())
    }
}

/// `forwarder attach-docker` as the test user.
pub struct Fwd {
    pub proc: Proc,
    /// Its `ready` line.
    pub ready: serde_json::Value,
    log: PathBuf,
}

impl Fwd {
    /// Starts `forwarder attach-docker ARGS` as the test user, with the
    /// ambient capabilities `caps` (setpriv syntax: `+bpf,+net_admin`),
    /// and waits for its ready line.
    pub fn start(env: &Env, bin: &Path, caps: Option<&str>, args: &[&str]) -> Result<Fwd> {
        let log = env.work.join("forwarder.log");
        let mut cmd = env.as_user(caps, &bin.display().to_string());
        cmd.arg("attach-docker")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?);
        die_with_parent(&mut cmd, libc::SIGTERM);
        let mut proc = Proc::spawn(&mut cmd, "forwarder attach-docker")?;
        let out = proc.child()?.stdout.take().context("stdout")?;
        let lines = util::lines(out);
        let line = lines.recv_timeout(Duration::from_secs(20)).map_err(|_| {
            anyhow::anyhow!(
                "forwarder attach-docker wrote no ready line: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        })?;
        let ready = util::decode_event(&line)
            .with_context(|| format!("the forwarder's first line: {line:?}"))?;
        ensure!(
            ready["event"] == "ready",
            "expected a ready line, got {line}"
        );
        // Keep reading stdout so the forwarder never blocks on it.
        std::thread::spawn(move || for _ in lines {});
        Ok(Fwd { proc, ready, log })
    }
}

/// One HTTP GET over a fresh connection; the body's SHA-256 and length.
fn get(addr: &str, path: &str) -> Result<(String, u64, Vec<u8>)> {
    let addr: SocketAddr = addr.parse().with_context(|| format!("address {addr}"))?;
    let mut h = Sha256::new();
    let mut first = Vec::new();
    let n = util::http_get(addr, "e2e", path, |piece| {
        if first.len() < 256 {
            first.extend_from_slice(&piece[..piece.len().min(256 - first.len())]);
        }
        h.update(piece);
    })?;
    Ok((format!("{:x}", h.finalize()), n, first))
}

/// Datagrams to `addr` and their echoes, over one flow and over a second
/// one (a second client socket).
fn udp_echo(addr: &str) -> Result<()> {
    let to: SocketAddr = addr.parse().with_context(|| format!("address {addr}"))?;
    let local = if to.is_ipv6() {
        "[::1]:0"
    } else {
        "127.0.0.1:0"
    };
    for flow in 0..2 {
        let s = UdpSocket::bind(local)?;
        s.connect(to)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        for i in 0..3 {
            let msg = format!("e2e datagram {i} of flow {flow} to {addr}");
            s.send(msg.as_bytes())
                .with_context(|| format!("sending to {addr}"))?;
            let mut buf = [0u8; 2048];
            let n = s
                .recv(&mut buf)
                .with_context(|| format!("no echo from {addr}"))?;
            ensure!(
                &buf[..n] == msg.as_bytes(),
                "{addr} echoed {:?} to {msg:?}",
                String::from_utf8_lossy(&buf[..n])
            );
        }
    }
    Ok(())
}

/// Every published address answers: the index page over TCP, the echo
/// over UDP.
fn all_answer() -> Result<String> {
    let mut tried = Vec::new();
    for (spec, addrs) in PUBLISH {
        for a in *addrs {
            if is_udp(spec) {
                udp_echo(a)?;
                tried.push(format!("udp {a}"));
                continue;
            }
            let (_, _, body) = get(a, "/")?;
            ensure!(
                body.starts_with(b"hello from the container"),
                "{a} answered {:?}",
                String::from_utf8_lossy(&body)
            );
            tried.push(a.to_string());
        }
    }
    Ok(tried.join(", "))
}

/// Connections to every published address are refused; a datagram to a
/// UDP one meets ICMP port unreachable (nothing listens).
fn none_answer() -> Result<String> {
    for (spec, addrs) in PUBLISH {
        for a in *addrs {
            let addr: SocketAddr = a.parse()?;
            if is_udp(spec) {
                let local = if addr.is_ipv6() {
                    "[::1]:0"
                } else {
                    "127.0.0.1:0"
                };
                let s = UdpSocket::bind(local)?;
                s.connect(addr)?;
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                s.send(b"anyone?")?;
                let mut buf = [0u8; 64];
                match s.recv(&mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                    Err(e) => bail!("udp {a}: {e} (expected port unreachable)"),
                    Ok(_) => bail!("udp {a} still answers"),
                }
                continue;
            }
            match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                Err(e) => bail!("{a}: {e} (expected a refusal)"),
                Ok(_) => bail!("{a} still accepts connections"),
            }
        }
    }
    Ok("every published address refuses".into())
}

/// How many ports the forwarder's API lists (asked with its own client).
fn api_ports(env: &Env, bin: &Path, state_dir: &Path) -> Result<usize> {
    let out = output(
        env.as_user(None, &bin.display().to_string())
            .args(["ports", "ls", "--json", "--api-socket"])
            .arg(state_dir.join("api.sock")),
    )?;
    let v: serde_json::Value = serde_json::from_str(&out).context("the API's port list")?;
    Ok(v.as_array().map_or(0, Vec::len))
}

/// Waits up to `limit` for `check` to pass and returns what it returned;
/// past the limit, fails naming `what` (what is awaited) and quoting the
/// last check's error.
pub fn within<T>(limit: Duration, what: &str, mut check: impl FnMut() -> Result<T>) -> Result<T> {
    Ok(try_wait_until(limit, what, || {
        check().map_err(|e| format!("{e:#}"))
    })?)
}

/// A check's outcome.
struct Row {
    config: &'static str,
    check: &'static str,
    secs: f64,
    result: Result<String>,
}

/// One configuration's rows: each check is timed, said on stderr and
/// appended.
struct Checks<'r> {
    config: Config,
    rows: &'r mut Vec<Row>,
}

impl Checks<'_> {
    /// Runs one check and records its outcome (a failed check does not stop
    /// the configuration).
    fn row(&mut self, check: &'static str, f: &mut dyn FnMut() -> Result<String>) {
        let t = Instant::now();
        let result = f();
        eprintln!(
            "e2e: {:<28} {:<40} {}",
            self.config.name(),
            check,
            match &result {
                Ok(s) => format!("ok ({s})"),
                Err(e) => format!("FAILED: {e:#}"),
            }
        );
        self.rows.push(Row {
            config: self.config.name(),
            check,
            secs: t.elapsed().as_secs_f64(),
            result,
        });
    }
}

/// Runs one configuration's checks, appending a row each.
fn configuration(env: &Env, bin: &Path, config: Config, rows: &mut Vec<Row>) -> Result<()> {
    let mut checks = Checks { config, rows };
    let mut dockerd = Dockerd::start(env, "none")?;
    ensure_image(env)?;
    let state_dir = PathBuf::from(
        output(Command::new(bin).args([
            "attach-docker",
            "--print",
            "--uid",
            &env.uid.to_string(),
        ]))?
        .trim(),
    );
    let caps = match config {
        Config::Plain => None,
        Config::WithBpf => Some("+bpf,+net_admin"),
    };
    let mut fwd = Fwd::start(env, bin, caps, &[])?;
    let engine = fwd.ready["engine"].as_str().unwrap_or("?").to_string();
    checks.row("forwarder attached", &mut || {
        ensure!(
            state_dir.join("api.sock.rootlesskit").exists(),
            "RootlessKit's socket was not set aside"
        );
        Ok(format!(
            "engine {engine}, state dir {}",
            state_dir.display()
        ))
    });
    let _ = env.docker(&["rm", "-f", "web"]);
    let mount = format!("{}:/www:ro", env.www.display());
    let run = web_run(&mount);
    container_checks(env, bin, &state_dir, &run, &mut checks);
    // Leave a container publishing, then stop dockerd under it.
    env.docker(&run)?;
    within(
        Duration::from_secs(10),
        "every published port to answer",
        all_answer,
    )?;
    checks.row("dockerd stops: no listener", &mut || {
        dockerd_stops(&mut dockerd, &mut fwd)
    });
    Ok(())
}

/// The `docker run` arguments of the test container `web`: every port of
/// PUBLISH published, `mount` (the web root) mounted, httpd and the echo
/// server running.
fn web_run(mount: &str) -> Vec<&str> {
    let mut run = vec!["run", "-d", "--name", "web"];
    for (p, _) in PUBLISH {
        run.extend(["-p", p]);
    }
    run.extend([
        "-v",
        mount,
        IMAGE,
        "/bin/busybox",
        "sh",
        "-c",
        "/bin/echo-server 53 & exec /bin/busybox httpd -f -p 80 -h /www",
    ]);
    run
}

/// The container's life through the forwarder: `docker run` (`run`)
/// publishes, a 1 GiB download arrives whole, a restart re-adds the ports
/// and `docker rm -f` removes them.
fn container_checks(env: &Env, bin: &Path, state_dir: &Path, run: &[&str], checks: &mut Checks) {
    checks.row("docker run -p publishes", &mut || {
        env.docker(run)?;
        within(
            Duration::from_secs(10),
            "every published port to answer",
            all_answer,
        )
    });
    checks.row("1 GiB download, SHA-256", &mut || {
        let t = Instant::now();
        let (sha, n, _) = get("127.0.0.1:8081", "/big")?;
        ensure!(n == BIG, "received {n} bytes of {BIG}");
        ensure!(
            sha == env.big_sha,
            "checksum {sha}, expected {}",
            env.big_sha
        );
        Ok(format!(
            "{:.1} Gbit/s",
            (BIG * 8) as f64 / t.elapsed().as_secs_f64() / 1e9
        ))
    });
    checks.row("docker restart re-adds", &mut || {
        env.docker(&["restart", "-t", "1", "web"])?;
        let s = within(
            Duration::from_secs(10),
            "every published port to answer",
            all_answer,
        )?;
        let n = api_ports(env, bin, state_dir)?;
        ensure!(n == API_PORTS, "{n} ports in the API, expected {API_PORTS}");
        Ok(s)
    });
    checks.row("docker rm -f removes", &mut || {
        env.docker(&["rm", "-f", "web"])?;
        let n = within(Duration::from_secs(10), "the API to list no port", || {
            let n = api_ports(env, bin, state_dir)?;
            ensure!(n == 0, "{n} ports left in the API");
            Ok(n)
        })?;
        Ok(format!("{n} ports; {}", none_answer()?))
    });
}

/// Stops dockerd under a publishing container: the forwarder must exit
/// with status 1 saying its child process exited, and nothing may answer.
fn dockerd_stops(dockerd: &mut Dockerd, fwd: &mut Fwd) -> Result<String> {
    dockerd.stop()?;
    let st = within(Duration::from_secs(15), "the forwarder to exit", || {
        fwd.proc
            .try_wait()?
            .context("the forwarder is still running")
    })?;
    let log = std::fs::read_to_string(&fwd.log).unwrap_or_default();
    let last = log.lines().last().unwrap_or("").to_string();
    // Status 1 with the reason: the unit's Restart=on-failure then
    // starts it again against a restarted dockerd.
    ensure!(
        !st.success() && last.contains("the child process") && last.contains("exited"),
        "the forwarder exited ({st}) without saying its child exited: {last}"
    );
    Ok(format!(
        "forwarder exited ({st}): {last}; {}",
        none_answer()?
    ))
}

/// A tarball holding `/bin/busybox` (Debian's busybox-static) and
/// `/bin/echo-server` (UDP and TCP echo, compiled here, static).
fn make_image_tar(path: &Path, work: &Path) -> Result<()> {
    let root = path.with_extension("root");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("bin"))?;
    std::fs::create_dir_all(root.join("www"))?;
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .context("copying /bin/busybox (Debian's busybox-static)")?;
    let src = work.join("echo.rs");
    std::fs::write(&src, include_str!("../fixtures/echo.rs"))?;
    util::run(
        Command::new("rustc")
            .args([
                "--edition",
                "2021",
                "-O",
                "-C",
                "target-feature=+crt-static",
            ])
            .args(["-C", "strip=symbols", "-o"])
            .arg(root.join("bin/echo-server"))
            .arg(&src),
    )
    .context("compiling the echo server (static, glibc's libc.a)")?;
    util::run(
        Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(path)
            .arg("."),
    )?;
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

pub fn run() -> Result<()> {
    crate::setup::run()?;
    ensure!(
        util::is_root(),
        "the e2e suite starts rootless dockerd as the test user: run it as root"
    );
    util::catch_interrupts();
    let bin = util::build_forwarder()?;
    let t = Instant::now();
    let env = prepare(true)?;
    let mut rows = Vec::new();
    for config in [Config::Plain, Config::WithBpf] {
        if let Err(e) = configuration(&env, &bin, config, &mut rows) {
            rows.push(Row {
                config: config.name(),
                check: "set-up",
                secs: 0.0,
                result: Err(e),
            });
        }
    }
    println!("\n| configuration | check | s | result |\n|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.1} | {} |",
            r.config,
            r.check,
            r.secs,
            match &r.result {
                Ok(s) => format!("ok: {s}"),
                Err(e) => format!("FAILED: {e:#}"),
            }
        );
    }
    let failed = rows.iter().filter(|r| r.result.is_err()).count();
    println!(
        "\ne2e: {} passed, {failed} failed in {:.0} s",
        rows.len() - failed,
        t.elapsed().as_secs_f64()
    );
    if failed > 0 {
        bail!("{failed} end-to-end checks failed");
    }
    Ok(())
}
