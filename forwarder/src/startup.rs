//! Start-up and life of `forwarder run`, in the order least privilege
//! needs.
//!
//! capset(2) changes only the calling thread, so every privileged step runs
//! while the process has a single thread, and one drop follows:
//!
//! 1. validate the configuration;
//! 2. claim the API socket (a second forwarder on it fails here, before it
//!    loads BPF or listens anywhere);
//! 3. load and attach the BPF programs, create the maps (CAP_BPF,
//!    CAP_NET_ADMIN), and probe whether map updates through the held
//!    descriptors need a capability on this kernel ([`map_privilege`]);
//! 4. open the child's namespace: its socket thread enters it (CAP_SYS_ADMIN
//!    over the namespace's user namespace) and drops every capability once
//!    inside; or start or connect the dial agent;
//! 5. bind the command line's listeners;
//! 6. drop capabilities: the main thread keeps at most CAP_NET_BIND_SERVICE
//!    (ports added later through the API may be privileged);
//! 7. only then start the runtime, whose threads inherit the reduced sets.
//!
//! After that every thread holds at most CAP_NET_BIND_SERVICE, except, on
//! kernels where bpf() checks CAP_BPF on every command, one `bpf-maps`
//! thread that keeps exactly CAP_BPF and runs every map operation.

use std::io::Write as _;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

use crate::dial::Dial;
use crate::engine::{self, Mode, Prepared};
use crate::port::{self, PortManager};
use crate::spec::{self, Expansion, PortRangeSpec, PortSpec};
use crate::wire::{Event, Ready, StatsEvent};
use crate::{agent, api, netns, sys};

/// What `forwarder run` was asked to do.
#[derive(Debug, Clone)]
pub struct Config {
    pub child_netns: Option<PathBuf>,
    pub child_pid: Option<u32>,
    pub child_agent: Option<PathBuf>,
    /// Attach to this RootlessKit state directory: its `child_pid` and
    /// `api.sock` stand in for `child_pid` and `api_socket`
    /// ([`crate::rootlesskit`]).
    pub rootlesskit_state_dir: Option<PathBuf>,
    /// `-p` specs, port ranges included.
    pub publish: Vec<PortRangeSpec>,
    pub mode: Mode,
    pub ebpf_parser: bool,
    pub api_socket: Option<PathBuf>,
    /// `None`: derived from the descriptor limit ([`default_max_connections`]).
    pub max_connections: Option<usize>,
    /// UDP flow expiry and cap.
    pub udp: crate::udp::UdpOptions,
    /// Preserve client addresses where the child permits
    /// ([`crate::srcip`]; `--no-source-ip` clears it).
    pub source_ip: bool,
}

/// The first two `-p` specs that would listen on the same address and
/// port, as texts. A parent range to one child port takes whichever of
/// its ports is free, so only its own conflicts with no free port left
/// are found when binding.
pub fn first_conflict(publish: &[PortRangeSpec]) -> Option<(String, String)> {
    let fixed: Vec<(&PortRangeSpec, PortSpec)> = publish
        .iter()
        .flat_map(|r| match r.expand() {
            Expansion::All(specs) => specs.into_iter().map(|s| (r, s)).collect(),
            Expansion::FirstFree(_) => Vec::new(),
        })
        .collect();
    for (i, (ra, a)) in fixed.iter().enumerate() {
        if let Some((rb, b)) = fixed[..i]
            .iter()
            .find(|(rb, b)| !std::ptr::eq(*rb, *ra) && b.conflicts_with(a))
        {
            let show = |r: &PortRangeSpec, s: &PortSpec| {
                if r.parent.count() == 1 {
                    s.to_string()
                } else {
                    format!("{s} (of {r})")
                }
            };
            return Some((show(ra, a), show(rb, b)));
        }
    }
    None
}

/// How a run is told to stop.
pub enum Shutdown {
    /// SIGTERM or SIGINT; SIGUSR1 prints a stats line.
    Signals,
    /// The sender is sent to or dropped (tests, library callers).
    #[allow(dead_code)]
    Channel(oneshot::Receiver<()>),
}

/// Why the run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// Asked to (signal or channel).
    Requested,
    /// The process given with --child-pid exited: its namespace is gone
    /// (or going), nothing is left to forward to.
    ChildExited(u32),
    /// The dial agent died while the child lives and could not be
    /// restarted.
    AgentLost(String),
}

/// What a run did, for the caller and tests.
#[allow(dead_code)] // read by tests and library callers
#[derive(Debug, Clone)]
pub struct Report {
    /// The ready line's contents (engine, reason, listeners).
    pub ready: Ready,
    /// The final stats line's contents, taken after teardown.
    pub stats: StatsEvent,
    pub ending: Ending,
    /// The capability kept on the map thread, if any.
    pub map_thread_keeps: Option<caps::Capability>,
}

/// Writes one event as a line on stdout (the machine-readable channel;
/// logs go to stderr).
pub fn emit(event: &Event) {
    let Ok(line) = serde_json::to_string(event) else {
        return;
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The stats line of the stdout channel.
fn stats_event(ports: &PortManager) -> Event {
    Event::Stats(Box::new(api::stats(ports).into()))
}

/// The PID behind a `/proc/PID/ns/net` path, for `/v1/info`.
fn pid_of_netns(path: &Path) -> Option<u32> {
    let mut parts = path.strip_prefix("/proc").ok()?.components();
    let pid = parts.next()?.as_os_str().to_str()?.parse().ok()?;
    (parts.as_path() == Path::new("ns/net")).then_some(pid)
}

/// What map operations need on this kernel, decided from a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapPrivilege {
    /// Any thread may update the maps through the held descriptors.
    None,
    /// bpf() checks this capability on every command: one thread keeps it
    /// and runs every map operation.
    Keep(caps::Capability),
}

/// Decides what the thread that updates the BPF maps must keep, from the
/// errno of the probe (a lookup through a held map descriptor by a thread
/// without any capability; `None` = it worked) and the kernel version.
///
/// Since Linux 5.19 bpf() checks `kernel.unprivileged_bpf_disabled` only
/// when creating maps and loading programs; before, on every command, so a
/// map update after the drop fails with EPERM. CAP_BPF exists since 5.8;
/// before it, CAP_SYS_ADMIN is what bpf() wants. Any other probe failure is
/// treated as "needs it" too: keeping one capability on one thread is
/// safer than an engine that fails on its first connection.
pub fn map_privilege(probe_errno: Option<i32>, kernel: (u32, u32)) -> MapPrivilege {
    match probe_errno {
        None => MapPrivilege::None,
        Some(_) if kernel < (5, 8) => MapPrivilege::Keep(caps::Capability::CAP_SYS_ADMIN),
        Some(_) => MapPrivilege::Keep(caps::Capability::CAP_BPF),
    }
}

/// The running kernel's (major, minor).
fn kernel_version() -> (u32, u32) {
    let rel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut it = rel
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse().ok());
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// The default `--max-connections` for a descriptor limit: each connection
/// holds two sockets (accepted and dialed); splice also borrows pipes from
/// a bounded pool. Headroom covers the listeners, the API, the engine's
/// own descriptors and the pool.
pub fn default_max_connections(nofile: u64) -> usize {
    let headroom = (nofile / 4).min(256);
    (nofile.saturating_sub(headroom) / 2).max(1) as usize
}

/// How the child is dialed, prepared before the runtime starts.
enum DialSetup {
    Netns(netns::ChildDialer),
    Agent {
        fd: OwnedFd,
        /// The agent this forwarder started, and where (to restart it).
        process: Option<(std::process::Child, agent::AgentTarget)>,
        /// Source preservation is on in the agent.
        source_ip: bool,
        /// Root mode: a thread in the child's namespace that dials (without
        /// source preservation) if the agent dies, since a new one cannot
        /// be started once capabilities are dropped.
        fallback: Option<netns::ChildDialer>,
    },
}

impl DialSetup {
    fn source_ip(&self) -> bool {
        matches!(
            self,
            DialSetup::Agent {
                source_ip: true,
                ..
            }
        )
    }
}

/// Opens the child's namespace or starts the agent. With source
/// preservation asked for, an agent does the dialing, in root mode too: it
/// alone keeps the capabilities that needs. Where the child does not permit
/// it (the agent logs why), dialing is as without it.
fn prepare_dialer(config: &Config) -> Result<DialSetup> {
    if let Some(sock) = &config.child_agent {
        let (fd, source_ip) = agent::AgentClient::connect(sock)
            .with_context(|| format!("cannot connect to the dial agent at {}", sock.display()))?;
        tracing::info!(agent = %sock.display(), source_ip, "dialing through the child-side agent");
        return Ok(DialSetup::Agent {
            fd,
            process: None,
            source_ip,
            fallback: None,
        });
    }
    let path = match (&config.child_netns, config.child_pid) {
        (Some(p), _) => p.clone(),
        (None, Some(pid)) => PathBuf::from(format!("/proc/{pid}/ns/net")),
        (None, None) => {
            anyhow::bail!("one of --child-netns, --child-pid or --child-agent is required")
        }
    };
    let target = match config.child_pid {
        Some(pid) => agent::AgentTarget::Pid(pid),
        None => agent::AgentTarget::Netns(path.clone()),
    };
    let mut unused_agent = None;
    if config.source_ip {
        match agent::spawn(&target, true) {
            Ok((child, fd, true)) => {
                tracing::info!(
                    agent_pid = child.id(),
                    "preserving client addresses: dialing through a child-side agent"
                );
                // Where this process may enter the namespace (root mode).
                let fallback = netns::ChildDialer::new(&path).ok();
                return Ok(DialSetup::Agent {
                    fd,
                    process: Some((child, target)),
                    source_ip: true,
                    fallback,
                });
            }
            // It said why; kept for a rootless forwarder, which needs it
            // anyway.
            Ok(spawned) => unused_agent = Some(spawned),
            Err(e) => tracing::warn!(error = %format!("{e:#}"),
                "source address preservation is off: cannot start the dial agent"),
        }
    }
    match (netns::ChildDialer::new(&path), config.child_pid) {
        (Ok(d), _) => {
            if let Some((mut child, _, _)) = unused_agent {
                let _ = child.kill();
                let _ = child.wait();
            }
            Ok(DialSetup::Netns(d))
        }
        (Err(netns::NetnsError::Enter { cause, .. }), Some(pid))
            if cause.raw_os_error() == Some(libc::EPERM) =>
        {
            let (child, fd, _) = match unused_agent {
                Some(a) => a,
                None => agent::spawn(&target, false)?,
            };
            tracing::info!(pid, agent_pid = child.id(),
                "not permitted to enter the child's network namespace; dialing through a child-side agent");
            Ok(DialSetup::Agent {
                fd,
                process: Some((child, target)),
                source_ip: false,
                fallback: None,
            })
        }
        (Err(e), _) => Err(e.into()),
    }
}

/// Runs the forwarder: start-up in the order the module comment gives,
/// then serving until `shutdown`. Returns what the run did.
pub fn run(mut config: Config, shutdown: Shutdown) -> Result<Report> {
    // 0. Attached to a RootlessKit: its child_pid and api.sock stand in for
    // --child-pid and --api-socket; its own socket is put back on exit
    // (also on an error from here on: the attachment's drop).
    let mut attachment = match &config.rootlesskit_state_dir {
        Some(dir) => {
            let a = crate::rootlesskit::Attachment::attach(dir, |sock| {
                crate::client::info_blocking(sock).map_err(|e| format!("{e:#}"))
            })?;
            tracing::info!(state_dir = %dir.display(), child_pid = a.child_pid,
                "attached to RootlessKit");
            config.child_pid = Some(a.child_pid);
            config.api_socket = Some(a.api_socket.clone());
            Some(a)
        }
        None => None,
    };
    // 1. Validate.
    if config.publish.is_empty() && config.api_socket.is_none() {
        anyhow::bail!(
            "nothing to publish: give at least one -p SPEC, or --api-socket to add ports later"
        );
    }
    if let Some((a, b)) = first_conflict(&config.publish) {
        anyhow::bail!("cannot publish {a}: conflicts with {b}");
    }
    let nofile = match sys::raise_nofile_limit() {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise RLIMIT_NOFILE");
            sys::nofile_limit().unwrap_or(1024)
        }
    };
    let max_connections = config
        .max_connections
        .unwrap_or_else(|| default_max_connections(nofile));
    tracing::debug!(nofile, max_connections, "limits");
    // 2. The API socket.
    let api_listener = config.api_socket.as_deref().map(api::bind).transpose()?;
    // 3. BPF.
    let (mut prepared, reason) = engine::select(
        config.mode,
        engine::ebpf::Options {
            parser: config.ebpf_parser,
        },
    )?;
    let mut map_thread_keeps = None;
    if let Prepared::Ebpf(loaded) = &mut prepared {
        let probe = loaded.probe_unprivileged_map_access();
        let errno = probe.err().map(|e| e.raw_os_error().unwrap_or(libc::EIO));
        match map_privilege(errno, kernel_version()) {
            MapPrivilege::None => {
                tracing::debug!("BPF map updates through held descriptors need no capability here")
            }
            MapPrivilege::Keep(cap) => {
                loaded
                    .keep_capability_on_map_thread(cap)
                    .context("cannot start the BPF map thread")?;
                tracing::info!(capability = %cap,
                    "bpf() checks a capability on every command on this kernel (unprivileged_bpf_disabled before Linux 5.19): the bpf-maps thread keeps it, every other thread drops it");
                map_thread_keeps = Some(cap);
            }
        }
    }
    // 4. The child's namespace, or the agent.
    let dial = prepare_dialer(&config)?;
    // 5. Listeners.
    let mut bound: Vec<(PortSpec, port::Bound)> = Vec::new();
    for range in &config.publish {
        let b = port::bind_range(range, |s| {
            bound
                .iter()
                .find(|(b, _)| b.conflicts_with(s))
                .map(|(b, _)| b.to_string())
        })
        .with_context(|| format!("cannot publish {range}"))?;
        bound.extend(b);
    }
    // Watch the child (--child-pid): the forwarder ends with it, as
    // RootlessKit does. With --child-netns the forwarder's own reference
    // keeps the namespace alive, so there is nothing to watch.
    let child_watch = match config.child_pid {
        Some(pid) => Some((
            pid,
            sys::pidfd_open(pid).with_context(|| {
                format!("cannot watch the child process {pid} (pidfd_open, Linux 5.3)")
            })?,
        )),
        None => None,
    };
    // 6. One drop. Ports added later may be privileged: keep
    // CAP_NET_BIND_SERVICE (where we hold it).
    sys::drop_thread_capabilities(&[caps::Capability::CAP_NET_BIND_SERVICE])
        .context("cannot drop capabilities")?;
    tracing::debug!(
        cap_eff = format!("{:#x}", sys::thread_cap_eff()),
        "capabilities dropped"
    );
    // 7. The runtime.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let netns_path = match (&config.child_netns, config.child_pid) {
        (Some(p), _) => p.clone(),
        (None, Some(pid)) => PathBuf::from(format!("/proc/{pid}/ns/net")),
        (None, None) => PathBuf::new(),
    };
    let child_pid = config.child_pid.or_else(|| pid_of_netns(&netns_path));
    let serve = Serve {
        config,
        prepared,
        reason,
        dial,
        bound,
        api_listener,
        child_pid,
        max_connections,
        child_watch,
    };
    let network_driver = attachment.as_ref().and_then(|a| a.network_driver.clone());
    let result = rt.block_on(serve.run(shutdown, network_driver));
    // Connections still running are torn down with the runtime; the BPF
    // programs and maps are released when the engine is dropped.
    rt.shutdown_timeout(Duration::from_secs(1));
    if let Some(a) = attachment.as_mut() {
        a.restore();
    }
    result.map(|(ready, stats, ending)| Report {
        ready,
        stats,
        ending,
        map_thread_keeps,
    })
}

/// Everything start-up prepared, for the runtime half.
struct Serve {
    config: Config,
    prepared: Prepared,
    reason: String,
    dial: DialSetup,
    bound: Vec<(PortSpec, port::Bound)>,
    api_listener: Option<std::os::unix::net::UnixListener>,
    child_pid: Option<u32>,
    max_connections: usize,
    child_watch: Option<(u32, OwnedFd)>,
}

impl Serve {
    async fn run(
        self,
        shutdown: Shutdown,
        network_driver: Option<serde_json::Value>,
    ) -> Result<(Ready, StatsEvent, Ending)> {
        let Serve {
            config,
            prepared,
            reason,
            dial,
            bound,
            api_listener,
            child_pid,
            max_connections,
            child_watch,
        } = self;
        let child_watch = match child_watch {
            Some((pid, fd)) => Some((
                pid,
                sys::async_fd(fd, tokio::io::Interest::READABLE)
                    .context("cannot watch the child process")?,
            )),
            None => None,
        };
        // Handlers first: a SIGUSR1 that arrives after "ready" but before
        // its handler would otherwise kill the process (the default action).
        let (mut term, mut int, mut usr1, mut stop_rx) = match shutdown {
            Shutdown::Signals => (
                Some(signal(SignalKind::terminate())?),
                Some(signal(SignalKind::interrupt())?),
                Some(signal(SignalKind::user_defined1())?),
                None,
            ),
            Shutdown::Channel(rx) => (None, None, None, Some(rx)),
        };
        let engine = prepared.start()?;
        let source_ip = dial.source_ip();
        let mut fallback = None;
        let (dialer, mut agent_process, agent_client) = match dial {
            DialSetup::Netns(d) => (Arc::new(d) as Arc<dyn Dial>, None, None),
            DialSetup::Agent {
                fd,
                process,
                fallback: fb,
                source_ip,
            } => {
                fallback = fb;
                let client = agent::AgentClient::new(fd, source_ip)
                    .context("cannot talk to the dial agent")?;
                let dialer: Arc<dyn Dial> = Arc::new(client.clone());
                (dialer, process, Some(client))
            }
        };
        let mut agent_check = tokio::time::interval(Duration::from_millis(200));
        // The ebpf engine's program layout, named in the log and the ready
        // line.
        let variant =
            (engine.kind() == engine::EngineKind::Ebpf).then_some(if config.ebpf_parser {
                "parser+verdict"
            } else {
                "verdict"
            });
        tracing::info!(engine = %engine.kind(), variant, %reason, "engine selected");
        let ports = Arc::new(
            PortManager::with_max_connections(dialer, engine, max_connections)
                .with_udp_options(config.udp)
                .with_source_ip(source_ip),
        );
        let mut listeners = Vec::new();
        for (spec, b) in bound {
            let st = ports
                .add_bound(spec.clone(), spec::ApiSpec::from(&spec), b)
                .with_context(|| format!("cannot publish {spec}"))?;
            listeners.extend(st.listeners.iter().copied());
        }
        let (stop_api, api_stopped) = oneshot::channel::<()>();
        let api_task = match (&config.api_socket, api_listener) {
            (Some(path), Some(listener)) => {
                let listener = tokio::net::UnixListener::from_std(listener)
                    .context("cannot serve the API socket")?;
                let state = Arc::new(api::ApiState {
                    ports: ports.clone(),
                    state_dir: path
                        .parent()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                    child_pid,
                    network_driver,
                });
                tracing::info!(socket = %path.display(), "serving the port API");
                Some(tokio::spawn(api::serve(listener, state, async {
                    let _ = api_stopped.await;
                })))
            }
            _ => None,
        };
        let ready = Ready {
            engine: ports.engine().kind(),
            variant: variant.map(String::from),
            reason: reason.clone(),
            listeners,
        };
        emit(&Event::Ready(ready.clone()));

        let ending = loop {
            tokio::select! {
                _ = recv(&mut term) => break Ending::Requested,
                _ = recv(&mut int) => break Ending::Requested,
                _ = async {
                    match stop_rx.as_mut() {
                        Some(rx) => {
                            let _ = rx.await;
                        }
                        None => std::future::pending().await,
                    }
                } => break Ending::Requested,
                pid = async {
                    match child_watch.as_ref() {
                        Some((pid, fd)) => {
                            let _ = fd.readable().await;
                            *pid
                        }
                        None => std::future::pending().await,
                    }
                } => {
                    tracing::error!(pid, "the child process exited: stopping, nothing is left to forward to");
                    break Ending::ChildExited(pid);
                }
                _ = recv(&mut usr1) => emit(&stats_event(&ports)),
                _ = agent_check.tick(), if agent_process.is_some() => {
                    let exited = agent_process
                        .as_mut()
                        .and_then(|(c, _)| c.try_wait().ok().flatten());
                    let (Some(status), Some((_, target)), Some(client)) =
                        (exited, agent_process.as_ref(), agent_client.as_ref())
                    else {
                        continue;
                    };
                    let target = target.clone();
                    if matches!(target, agent::AgentTarget::Pid(pid) if !process_alive(pid)) {
                        // The child's pidfd ends the run next.
                        agent_process = None;
                        continue;
                    }
                    match respawn_agent(target.clone(), source_ip).await.and_then(|(child, fd, on)| {
                        client.replace(fd, on).map_err(anyhow::Error::from)?;
                        Ok(child)
                    }) {
                        Ok(child) => {
                            tracing::warn!(%status, agent_pid = child.id(),
                                "the dial agent exited while the child lives; restarted it");
                            agent_process = Some((child, target));
                        }
                        Err(e) if fallback.is_some() => {
                            if let Some(d) = fallback.take() {
                                client.fall_back_to(d);
                            }
                            tracing::warn!(%status, error = %format!("{e:#}"),
                                "the dial agent exited and cannot be restarted: dialing from the forwarder's own thread in the child, without source address preservation");
                            agent_process = None;
                        }
                        Err(e) => {
                            tracing::error!(error = %format!("{e:#}"), "the dial agent exited and cannot be restarted: stopping");
                            break Ending::AgentLost(format!("{e:#}"));
                        }
                    }
                }
            }
        };
        tracing::info!("shutting down");
        let _ = stop_api.send(());
        if let Some(t) = api_task {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        if let Some(path) = &config.api_socket {
            let _ = std::fs::remove_file(path);
        }
        ports.close_all(Duration::from_secs(2)).await;
        let stats = StatsEvent::from(api::stats(&ports));
        emit(&Event::Stats(Box::new(stats.clone())));
        if let Some((c, _)) = agent_process.as_mut() {
            if let Some(client) = &agent_client {
                client.stopping();
            }
            stop_agent(c).await;
        }
        Ok((ready, stats, ending))
    }
}

/// Asks the agent to stop (SIGTERM: it removes its routing in the child
/// first), then kills it if it has not within 2 s.
async fn stop_agent(c: &mut std::process::Child) {
    if let Ok(pid) = i32::try_from(c.id()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    for _ in 0..100 {
        if matches!(c.try_wait(), Ok(Some(_))) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = c.kill();
    let _ = c.wait();
}

/// Whether `pid` still runs (not a zombie).
fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Starts a new dial agent for `pid` from a thread that lives as long as
/// the process (the agent's parent-death signal follows the thread that
/// forked it, and the runtime's blocking threads come and go).
async fn respawn_agent(target: agent::AgentTarget, source_ip: bool) -> Result<agent::Spawned> {
    type Job = (
        (agent::AgentTarget, bool),
        oneshot::Sender<Result<agent::Spawned>>,
    );
    static SPAWNER: std::sync::OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<Job>>> =
        std::sync::OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let _ = std::thread::Builder::new()
            .name("agent-spawner".into())
            .spawn(move || {
                while let Ok(((target, source_ip), reply)) = rx.recv() {
                    let _ = reply.send(agent::spawn(&target, source_ip));
                }
            });
        std::sync::Mutex::new(tx)
    });
    let (rtx, rrx) = oneshot::channel();
    tx.lock()
        .map_err(|_| anyhow::anyhow!("agent spawner lock poisoned"))?
        .send(((target, source_ip), rtx))
        .map_err(|_| anyhow::anyhow!("the agent spawner thread has stopped"))?;
    rrx.await
        .map_err(|_| anyhow::anyhow!("the agent spawner thread has stopped"))?
}

/// Waits for a signal, or forever without a handler.
async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use caps::Capability::{CAP_BPF, CAP_SYS_ADMIN};

    #[test]
    fn map_privilege_table() {
        // (probe errno, kernel) -> what the map thread keeps
        let cases = [
            (None, (6, 18), MapPrivilege::None),
            (None, (5, 4), MapPrivilege::None),
            (Some(libc::EPERM), (5, 15), MapPrivilege::Keep(CAP_BPF)),
            (Some(libc::EPERM), (5, 8), MapPrivilege::Keep(CAP_BPF)),
            (Some(libc::EPERM), (5, 4), MapPrivilege::Keep(CAP_SYS_ADMIN)),
            (Some(libc::EACCES), (5, 10), MapPrivilege::Keep(CAP_BPF)),
            (Some(libc::EIO), (6, 1), MapPrivilege::Keep(CAP_BPF)),
        ];
        for (errno, kernel, want) in cases {
            assert_eq!(map_privilege(errno, kernel), want, "{errno:?} {kernel:?}");
        }
    }

    #[test]
    fn default_max_connections_leaves_headroom() {
        assert_eq!(default_max_connections(1024), 384);
        assert_eq!(default_max_connections(1 << 20), ((1 << 20) - 256) / 2);
        assert_eq!(default_max_connections(64), 24);
        assert_eq!(default_max_connections(1), 1);
    }

    /// The whole start-up in this process, on a thread of its own (the
    /// capability drop is per thread): serves, stops when told, reports.
    #[test]
    fn run_serves_until_told_to_stop() {
        use std::io::{Read, Write};
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let sp = server.local_addr().unwrap().port();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = server.accept() {
                let mut b = [0u8; 5];
                if s.read_exact(&mut b).is_ok() {
                    let _ = s.write_all(&b);
                }
            }
        });
        let fp = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = Config {
            child_netns: Some(PathBuf::from("/proc/self/ns/net")),
            child_pid: None,
            child_agent: None,
            rootlesskit_state_dir: None,
            publish: vec![format!("127.0.0.1:{fp}:{sp}").parse().unwrap()],
            mode: Mode::Copy,
            ebpf_parser: false,
            api_socket: None,
            max_connections: None,
            udp: Default::default(),
            source_ip: false,
        };
        let (stop, stopped) = oneshot::channel();
        let t = std::thread::spawn(move || {
            let r = run(config, Shutdown::Channel(stopped));
            (r, sys::thread_cap_eff())
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut c = loop {
            match std::net::TcpStream::connect(("127.0.0.1", fp)) {
                Ok(c) => break c,
                Err(e) if std::time::Instant::now() > deadline => panic!("connect: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"hello").unwrap();
        let mut b = [0u8; 5];
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hello");
        drop(c);
        let _ = stop.send(());
        let (r, eff) = t.join().unwrap();
        let r = r.unwrap();
        assert_eq!(r.ending, Ending::Requested);
        assert_eq!(r.ready.engine, engine::EngineKind::Copy, "{:?}", r.ready);
        assert_eq!(r.stats.total.connections, 1, "{:?}", r.stats);
        assert_eq!(
            r.stats.total.active, 0,
            "taken after teardown: {:?}",
            r.stats
        );
        assert_eq!(r.map_thread_keeps, None);
        assert_eq!(eff & !(1 << 10), 0, "the thread kept {eff:#x}");
    }

    #[test]
    fn netns_paths_name_their_pid() {
        assert_eq!(pid_of_netns(Path::new("/proc/42/ns/net")), Some(42));
        assert_eq!(pid_of_netns(Path::new("/run/netns/x")), None);
    }
}
