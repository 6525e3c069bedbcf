//! `cargo xtask bench-udp`: UDP through the forwarder against direct
//! loopback in the child, RootlessKit's builtin driver and pasta, in one
//! run on one machine:
//!
//! - *flood*: one flow sends 64-byte or 1,400-byte datagrams one way at
//!   fixed offered rates for a few seconds; a sink in the child counts what
//!   arrives: datagrams received per second and the loss;
//! - *echo*: 32 flows, each with one datagram in flight (send, wait for the
//!   echo, repeat; a datagram not answered within 100 ms is counted lost
//!   and the flow sends again): echoed datagrams per second.
//!
//! Method: the servers (a counting sink and an echo server, one thread
//! each, plain recv/send) run inside the child namespace of each system:
//! the bench's own throw-away namespace `fwd-bench-udp-<pid>` for direct,
//! the forwarder and pasta, RootlessKit's own child for RootlessKit (run as
//! the unprivileged user `fwdtest`, `--port-driver=builtin`, ports added
//! with `rootlessctl add-ports 127.0.0.1:P:T/udp`). *direct* runs the
//! client inside the child too (the ceiling). The forwarder runs as root
//! with `--child-netns` (`-p 127.0.0.1:P:T/udp`), pasta with `-u
//! 127.0.0.1/P:T`. Systems are interleaved per repetition; figures are
//! medians. Writes `bench/results/udp.md`. Every process is stopped by its
//! PID; traffic stays on loopback in namespaces the bench made.

use std::fmt::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::util::{build_forwarder, die_with_parent, output, Forwarder, Netns, Proc};

#[derive(clap::Args)]
pub struct UdpArgs {
    /// Seconds per run.
    #[arg(long, default_value_t = 3)]
    secs: u64,
    /// Repetitions (medians are reported).
    #[arg(long, default_value_t = 3)]
    reps: u32,
    /// Offered rates of the flood, datagrams per second.
    #[arg(long, value_delimiter = ',', default_value = "50000,200000,1000000")]
    rates: Vec<u64>,
    /// Leave out RootlessKit and pasta.
    #[arg(long)]
    no_peers: bool,
}

const SINK: u16 = 9001;
const ECHO: u16 = 9002;
const FLOWS: usize = 32;

/// Servers inside one namespace, stopped on drop.
struct Servers {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Runs `f` on a new thread inside the network namespace file `ns`.
fn thread_in<T: Send + 'static>(
    ns: Option<String>,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> std::thread::JoinHandle<Result<T>> {
    std::thread::spawn(move || {
        if let Some(path) = ns {
            let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            // SAFETY: setns on a valid namespace fd affects only this thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("entering {path}"));
            }
        }
        f()
    })
}

fn bind(addr: &str) -> Result<UdpSocket> {
    let s = UdpSocket::bind(addr).with_context(|| format!("binding {addr}"))?;
    let v: libc::c_int = 16 << 20;
    // SAFETY: v lives for the call. (SO_RCVBUFFORCE: the bench is root.)
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    Ok(s)
}

/// A counting sink on 127.0.0.1:SINK and an echo server on
/// 127.0.0.1:ECHO inside `ns`.
fn servers(ns: &str) -> Result<Servers> {
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let (st, rc) = (stop.clone(), received.clone());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
    let tx2 = ready_tx.clone();
    thread_in(Some(ns.to_string()), move || {
        let s = match bind(&format!("127.0.0.1:{SINK}")) {
            Ok(s) => s,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return Ok(());
            }
        };
        let _ = ready_tx.send(Ok(()));
        let mut buf = vec![0u8; 65_536];
        while !st.load(Ordering::Relaxed) {
            if s.recv(&mut buf).is_ok() {
                rc.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    });
    let st = stop.clone();
    thread_in(Some(ns.to_string()), move || {
        let s = match bind(&format!("127.0.0.1:{ECHO}")) {
            Ok(s) => s,
            Err(e) => {
                let _ = tx2.send(Err(e));
                return Ok(());
            }
        };
        let _ = tx2.send(Ok(()));
        let mut buf = vec![0u8; 65_536];
        while !st.load(Ordering::Relaxed) {
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&buf[..n], from);
            }
        }
        Ok(())
    });
    for _ in 0..2 {
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("the UDP servers did not start")??;
    }
    Ok(Servers { stop, received })
}

/// One system under test.
struct System {
    name: String,
    /// Where its clients run (None: here).
    client_ns: Option<String>,
    sink: SocketAddr,
    echo: SocketAddr,
    servers: Servers,
    _guards: Vec<Box<dyn std::any::Any>>,
}

/// Sends `size`-byte datagrams to `to` at `rate` a second for `secs`;
/// returns how many were sent.
fn flood(ns: Option<String>, to: SocketAddr, size: usize, rate: u64, secs: u64) -> Result<u64> {
    thread_in(ns, move || {
        let s = UdpSocket::bind("127.0.0.1:0")?;
        s.connect(to)?;
        let buf = vec![0x5au8; size];
        let t0 = Instant::now();
        let end = Duration::from_secs(secs);
        let mut sent = 0u64;
        loop {
            let el = t0.elapsed();
            if el >= end {
                break;
            }
            let due = (el.as_secs_f64() * rate as f64) as u64;
            if sent >= due {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            // Send what is due, in bursts of at most 64.
            for _ in 0..(due - sent).min(64) {
                match s.send(&buf) {
                    Ok(_) => sent += 1,
                    Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e).context("sending"),
                }
            }
        }
        Ok(sent)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("flood thread panicked"))?
}

/// 32 flows ping-ponging with `to` for `secs`: (echoes per second, lost).
fn echo_rate(ns: Option<String>, to: SocketAddr, size: usize, secs: u64) -> Result<(f64, u64)> {
    thread_in(ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let t0 = Instant::now();
            let end = t0 + Duration::from_secs(secs);
            let mut tasks = Vec::new();
            for _ in 0..FLOWS {
                let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
                s.connect(to).await?;
                tasks.push(tokio::spawn(async move {
                    let msg = vec![0xa5u8; size];
                    let mut buf = vec![0u8; 65_536];
                    let (mut ok, mut lost) = (0u64, 0u64);
                    while Instant::now() < end {
                        if s.send(&msg).await.is_err() {
                            lost += 1;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                        match tokio::time::timeout(Duration::from_millis(100), s.recv(&mut buf))
                            .await
                        {
                            Ok(Ok(n)) if n == size => ok += 1,
                            _ => lost += 1,
                        }
                    }
                    (ok, lost)
                }));
            }
            let (mut ok, mut lost) = (0, 0);
            for t in tasks {
                let (o, l) = t.await?;
                ok += o;
                lost += l;
            }
            Ok((ok as f64 / t0.elapsed().as_secs_f64(), lost))
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("echo thread panicked"))?
}

fn free_udp_port() -> Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn local(p: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], p))
}

/// RootlessKit (builtin driver) as `fwdtest`, with the servers in its
/// child and UDP ports added through rootlessctl.
fn rootlesskit() -> Result<System> {
    let dir = PathBuf::from(format!("/tmp/fwd-bench-udp-rk-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    output(Command::new("chown").arg("fwdtest:fwdtest").arg(&dir))
        .context("no user fwdtest (cargo xtask setup creates it)")?;
    let state = dir.join("state");
    let user = |program: &str| {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid",
            "fwdtest",
            "--regid",
            "fwdtest",
            "--init-groups",
            "env",
        ])
        .arg(format!("HOME={}", dir.display()))
        .arg(program)
        .current_dir(&dir);
        c
    };
    let mut cmd = user("rootlesskit");
    cmd.args([
        "--net=slirp4netns",
        "--disable-host-loopback",
        "--port-driver=builtin",
    ])
    .arg(format!("--state-dir={}", state.display()))
    .args(["sleep", "infinity"])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    die_with_parent(&mut cmd, libc::SIGTERM);
    let proc = Proc::spawn(&mut cmd, "rootlesskit")?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let (child_pid, sock) = loop {
        let sock = state.join("api.sock");
        if let Ok(p) = std::fs::read_to_string(state.join("child_pid")) {
            if let Ok(p) = p.trim().parse::<u32>() {
                if sock.exists() {
                    break (p, sock);
                }
            }
        }
        if Instant::now() > deadline {
            bail!("rootlesskit did not start within 15 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let ns = format!("/proc/{child_pid}/ns/net");
    let servers = servers(&ns)?;
    let (ps, pe) = (free_udp_port()?, free_udp_port()?);
    for (p, t) in [(ps, SINK), (pe, ECHO)] {
        output(
            user("rootlessctl")
                .arg("--socket")
                .arg(&sock)
                .args(["add-ports", &format!("127.0.0.1:{p}:{t}/udp")]),
        )
        .context("rootlessctl add-ports .../udp")?;
    }
    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    Ok(System {
        name: "rootlesskit".into(),
        client_ns: None,
        sink: local(ps),
        echo: local(pe),
        servers,
        // Dropped in order: the process first, then its directory.
        _guards: vec![Box::new(proc), Box::new(Dir(dir))],
    })
}

/// Waits until `sys` echoes a datagram.
fn probe(sys: &System) -> Result<()> {
    let (ns, to) = (sys.client_ns.clone(), sys.echo);
    thread_in(ns, move || {
        let s = UdpSocket::bind("127.0.0.1:0")?;
        s.connect(to)?;
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        let mut b = [0u8; 8];
        for _ in 0..50 {
            let _ = s.send(b"probe");
            if s.recv(&mut b).is_ok() {
                return Ok(());
            }
        }
        bail!("no echo from {to}")
    })
    .join()
    .map_err(|_| anyhow::anyhow!("probe panicked"))?
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

pub fn run(args: &UdpArgs) -> Result<()> {
    crate::setup::run()?;
    let bin = build_forwarder()?;
    let child = Netns::new(&format!("fwd-bench-udp-{}", std::process::id()))?;
    let mut systems = Vec::new();
    systems.push(System {
        name: "direct".into(),
        client_ns: Some(child.path()),
        sink: local(SINK),
        echo: local(ECHO),
        servers: servers(&child.path())?,
        _guards: Vec::new(),
    });
    let shared = systems[0].servers.received.clone();
    let (ps, pe) = (free_udp_port()?, free_udp_port()?);
    let fwd_args: Vec<String> = [
        "--child-netns".to_string(),
        child.path(),
        "-p".into(),
        format!("127.0.0.1:{ps}:{SINK}/udp"),
        "-p".into(),
        format!("127.0.0.1:{pe}:{ECHO}/udp"),
    ]
    .into();
    let fwd = Forwarder::start(&bin, &fwd_args, true, "forwarder")?;
    systems.push(System {
        name: "forwarder".into(),
        client_ns: None,
        sink: local(ps),
        echo: local(pe),
        servers: Servers {
            stop: Arc::new(AtomicBool::new(false)),
            received: shared.clone(),
        },
        _guards: vec![Box::new(fwd)],
    });
    if !args.no_peers {
        match rootlesskit() {
            Ok(s) => systems.push(s),
            Err(e) => eprintln!("rootlesskit: not run: {e:#}"),
        }
        let (ps, pe) = (free_udp_port()?, free_udp_port()?);
        let mut cmd = Command::new("pasta");
        cmd.args(["--netns", &child.path(), "-f", "-q", "--runas", "0"])
            .args(["-u", &format!("127.0.0.1/{ps}:{SINK}")])
            .args(["-u", &format!("127.0.0.1/{pe}:{ECHO}")])
            .args(["-t", "none", "-T", "none", "-U", "none"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        die_with_parent(&mut cmd, libc::SIGTERM);
        match Proc::spawn(&mut cmd, "pasta") {
            Ok(p) => systems.push(System {
                name: "pasta".into(),
                client_ns: None,
                sink: local(ps),
                echo: local(pe),
                servers: Servers {
                    stop: Arc::new(AtomicBool::new(false)),
                    received: shared.clone(),
                },
                _guards: vec![Box::new(p)],
            }),
            Err(e) => eprintln!("pasta: not run: {e:#}"),
        }
    }
    systems.retain(|s| match probe(s) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("{}: not run: {e:#}", s.name);
            false
        }
    });
    let mut md = String::new();
    let _ = writeln!(
        md,
        "UDP, {} s per run, median of {} repetitions (`cargo xtask bench-udp`)\n",
        args.secs, args.reps
    );
    let _ = writeln!(
        md,
        "| payload | workload | {} |",
        systems
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(md, "|---|---|{}", "---|".repeat(systems.len()));
    for size in [64usize, 1400] {
        for &rate in &args.rates {
            let mut cells = vec![Vec::new(); systems.len()];
            for _ in 0..args.reps {
                for (k, s) in systems.iter().enumerate() {
                    let before = s.servers.received.load(Ordering::Relaxed);
                    let sent = flood(s.client_ns.clone(), s.sink, size, rate, args.secs)?;
                    std::thread::sleep(Duration::from_millis(300));
                    let got = s.servers.received.load(Ordering::Relaxed) - before;
                    cells[k].push((got as f64 / args.secs as f64, sent, got));
                }
            }
            let row: Vec<String> = cells
                .into_iter()
                .map(|c| {
                    let per_s = median(c.iter().map(|x| x.0).collect());
                    let loss = median(
                        c.iter()
                            .map(|x| 100.0 * (1.0 - x.2 as f64 / (x.1.max(1)) as f64))
                            .collect(),
                    );
                    format!("{:.0}/s, loss {loss:.1}%", per_s)
                })
                .collect();
            let _ = writeln!(md, "| {size} B | flood at {rate}/s | {} |", row.join(" | "));
        }
        let mut cells = vec![Vec::new(); systems.len()];
        let mut lost = vec![0u64; systems.len()];
        for _ in 0..args.reps {
            for (k, s) in systems.iter().enumerate() {
                let (r, l) = echo_rate(s.client_ns.clone(), s.echo, size, args.secs)?;
                cells[k].push(r);
                lost[k] += l;
            }
        }
        let meds: Vec<f64> = cells.into_iter().map(median).collect();
        let direct = meds.first().copied().unwrap_or(f64::NAN);
        let row: Vec<String> = meds
            .iter()
            .zip(&lost)
            .map(|(m, l)| format!("{m:.0}/s ({:.2}x direct, {l} lost)", m / direct))
            .collect();
        let _ = writeln!(
            md,
            "| {size} B | echo, {FLOWS} flows | {} |",
            row.join(" | ")
        );
    }
    println!("{md}");
    let path = crate::util::root().join("bench/results/udp.md");
    std::fs::write(&path, &md).with_context(|| format!("writing {}", path.display()))?;
    drop(systems);
    drop(child);
    Ok(())
}
