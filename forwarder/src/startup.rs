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

use crate::child::dial::Dial;
use crate::child::netns;
pub use crate::cli::args::Config;
use crate::engine::{self, Prepared};
use crate::parent::agent;
use crate::parent::api;
use crate::parent::port::{self, PortManager};
use crate::sys;
use crate::wire::spec::{self, first_conflict, PortRangeSpec, PortSpec};
use crate::wire::{Event, Ready, StatsEvent};

/// The ebpf engine's options: with the local-client path, its cgroup and
/// the child namespace's cookie (known now in root mode).
fn ebpf_options(config: &Config) -> anyhow::Result<engine::ebpf::Options> {
    #[cfg_attr(not(feature = "ebpf"), allow(unused_mut))]
    let mut opts = engine::ebpf::Options {
        parser: config.ebpf_parser,
        ..Default::default()
    };
    #[cfg(feature = "ebpf")]
    if !config.no_local_path && matches!(config.mode, engine::Mode::Ebpf | engine::Mode::Auto) {
        let cgroup = match (&config.bpf_cgroup, engine::local::default_cgroup()) {
            (Some(c), _) => c.clone(),
            (None, Some(c)) => c,
            (None, None) if config.local_path => anyhow::bail!(
                "no cgroup v2 hierarchy found (/sys/fs/cgroup/unified or /sys/fs/cgroup): \
                 mount one, name a cgroup with --bpf-cgroup, or leave out --local-path"
            ),
            (None, None) => {
                tracing::info!(
                    "the local-client path is off: no cgroup v2 hierarchy found \
                     (/sys/fs/cgroup/unified or /sys/fs/cgroup)"
                );
                return Ok(opts);
            }
        };
        opts.local = Some(cgroup);
        opts.local_forced = config.local_path;
        let path = match (&config.child_netns, config.child_pid) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(pid)) => Some(PathBuf::from(format!("/proc/{pid}/ns/net"))),
            _ => None,
        };
        opts.child_netns = path.and_then(|p| netns::netns_cookie(&p).ok());
    }
    Ok(opts)
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
pub(crate) fn emit(event: &Event) {
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
pub(crate) enum MapPrivilege {
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
pub(crate) fn map_privilege(probe_errno: Option<i32>, kernel: (u32, u32)) -> MapPrivilege {
    match probe_errno {
        None => MapPrivilege::None,
        Some(_) if kernel < (5, 8) => MapPrivilege::Keep(caps::Capability::CAP_SYS_ADMIN),
        Some(_) => MapPrivilege::Keep(caps::Capability::CAP_BPF),
    }
}

/// The default `--max-connections` for a descriptor limit: each connection
/// holds two sockets (accepted and dialed); splice also borrows pipes from
/// a bounded pool. Headroom covers the listeners, the API, the engine's
/// own descriptors and the pool.
pub fn default_max_connections(nofile: u64) -> usize {
    let headroom = (nofile / 4).min(256);
    (nofile.saturating_sub(headroom) / 2).max(1) as usize
}

/// The most descriptor-table slots made ahead at start-up
/// ([`sys::reserve_descriptors`]): 128 KiB of kernel memory.
const FD_TABLE_RESERVED: u64 = 16_384;

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

/// Why the process named by `--child-pid` (or RootlessKit's child) cannot
/// be dialed into: found before anything is started in its namespaces, so
/// that it is the first and only thing said.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    #[error("no such process {0}")]
    NoSuchProcess(u32),
    #[error("process {0} has exited (its namespaces are gone)")]
    Exited(u32),
    #[error(
        "permission denied to enter the namespaces of process {pid}{owner} (this forwarder runs \
         as uid {uid}): a process's namespaces are open only to its own user, or to a holder of \
         CAP_SYS_PTRACE over it; run the forwarder as the user that started the container, or as root",
        owner = owner.map(|o| format!(", which runs as uid {o}")).unwrap_or_default()
    )]
    NotPermitted {
        pid: u32,
        owner: Option<u32>,
        uid: u32,
    },
    #[error("cannot open {path}: {cause}")]
    Open { path: String, cause: std::io::Error },
}

/// Checks that process `pid` exists and that this process may open its
/// network namespace (opening `/proc/PID/ns/*` needs ptrace read access:
/// the same user, or CAP_SYS_PTRACE over it).
fn check_child_pid(pid: u32) -> Result<(), ChildError> {
    let path = format!("/proc/{pid}/ns/net");
    let cause = match std::fs::File::open(&path) {
        Ok(_) => return Ok(()),
        Err(e) => e,
    };
    match cause.raw_os_error() {
        Some(libc::ENOENT | libc::ESRCH) if !Path::new(&format!("/proc/{pid}")).exists() => {
            Err(ChildError::NoSuchProcess(pid))
        }
        Some(libc::ENOENT | libc::ESRCH) => Err(ChildError::Exited(pid)),
        Some(libc::EACCES | libc::EPERM) => Err(ChildError::NotPermitted {
            pid,
            owner: process_uid(pid),
            uid: sys::euid(),
        }),
        _ => Err(ChildError::Open { path, cause }),
    }
}

/// The effective uid process `pid` runs as (`Uid:` in its status).
fn process_uid(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Opens the child's namespace or starts the agent. The child is checked
/// first (the process exists and may be opened, the path is a network
/// namespace), so that a wrong one is the only thing reported. With source
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
        Some(pid) => {
            check_child_pid(pid)?;
            agent::AgentTarget::Pid(pid)
        }
        None => agent::AgentTarget::Netns(path.clone()),
    };
    // Where this process may enter the namespace (root mode), a thread of
    // its own in there dials, or stands by in case the agent dies; on its
    // way in it removes what a killed run's source preservation left (an
    // agent started next installs its own). A process whose namespace
    // this one may not enter gets an agent.
    let direct = match netns::ChildDialer::new_cleaning(&path) {
        Ok(d) => Some(d),
        Err(netns::NetnsError::Enter { cause, .. })
            if config.child_pid.is_some() && cause.raw_os_error() == Some(libc::EPERM) =>
        {
            None
        }
        Err(e) => return Err(e.into()),
    };
    let mut agent_error = None;
    if config.source_ip {
        match agent::spawn(&target, true) {
            Ok((child, fd, true)) => {
                tracing::info!(
                    agent_pid = child.id(),
                    "preserving client addresses: dialing through a child-side agent"
                );
                return Ok(DialSetup::Agent {
                    fd,
                    process: Some((child, target)),
                    source_ip: true,
                    fallback: direct,
                });
            }
            // It said why; kept for a rootless forwarder, which needs it
            // anyway.
            Ok((mut child, fd, false)) => match direct {
                Some(d) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Ok(DialSetup::Netns(d));
                }
                None => return Ok(rootless_agent(config, child, fd, target)),
            },
            Err(e) => agent_error = Some(e),
        }
    }
    let warn_source_ip = |e: anyhow::Error| {
        tracing::warn!(error = %format!("{e:#}"),
            "source address preservation is off: cannot start the dial agent");
    };
    match direct {
        Some(d) => {
            if let Some(e) = agent_error {
                warn_source_ip(e);
            }
            Ok(DialSetup::Netns(d))
        }
        None => {
            // Said after the start that succeeds, or not at all: the error
            // of a start that fails again is the one that matters.
            let (child, fd, _) = agent::spawn(&target, false)?;
            if let Some(e) = agent_error {
                warn_source_ip(e);
            }
            Ok(rootless_agent(config, child, fd, target))
        }
    }
}

/// A forwarder that may not enter the child's namespace dials through the
/// agent it started there.
fn rootless_agent(
    config: &Config,
    child: std::process::Child,
    fd: OwnedFd,
    target: agent::AgentTarget,
) -> DialSetup {
    tracing::info!(
        pid = config.child_pid,
        agent_pid = child.id(),
        "not permitted to enter the child's network namespace; dialing through a child-side agent"
    );
    DialSetup::Agent {
        fd,
        process: Some((child, target)),
        source_ip: false,
        fallback: None,
    }
}

/// Step 0: attaches to the RootlessKit of `--rootlesskit-state-dir`, whose
/// child PID and API socket then stand in for the configuration's.
fn attach_rootlesskit(
    config: &mut Config,
) -> Result<Option<crate::parent::rootlesskit::Attachment>> {
    let Some(dir) = &config.rootlesskit_state_dir else {
        return Ok(None);
    };
    let a = crate::parent::rootlesskit::Attachment::attach(dir, |sock| {
        crate::cli::client::info_blocking(sock).map_err(|e| format!("{e:#}"))
    })?;
    tracing::info!(state_dir = %dir.display(), child_pid = a.child_pid,
        "attached to RootlessKit");
    config.child_pid = Some(a.child_pid);
    config.api_socket = Some(a.api_socket.clone());
    Ok(Some(a))
}

/// Step 1: refuses a configuration with nothing to do or conflicting
/// specs; raises RLIMIT_NOFILE and returns the connection limit.
fn validate(config: &Config) -> Result<usize> {
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
    // Two descriptors a connection and some for pipes and the rest, up to
    // the cap: beyond it the table grows as it would anyway.
    let slots = (max_connections as u64 * 2 + 1024)
        .min(nofile)
        .min(FD_TABLE_RESERVED);
    if let Err(e) = sys::reserve_descriptors(slots as u32) {
        tracing::debug!(slots, error = %e, "cannot grow the descriptor table ahead");
    }
    let table = sys::descriptor_table_size().unwrap_or(0);
    tracing::debug!(nofile, max_connections, table, "limits");
    Ok(max_connections)
}

/// Step 3, after loading: whether map updates need a capability on this
/// kernel; if so a `bpf-maps` thread keeps it (returned) and runs them.
fn map_thread(loaded: &mut engine::ebpf::Loaded) -> Result<Option<caps::Capability>> {
    let probe = loaded.probe_unprivileged_map_access();
    let errno = probe.err().map(|e| e.raw_os_error().unwrap_or(libc::EIO));
    // An unreadable release counts as an old kernel: keep the capability.
    let line = engine::kernel::Version::running().map_or((0, 0), |v| v.line());
    match map_privilege(errno, line) {
        MapPrivilege::None => {
            tracing::debug!("BPF map updates through held descriptors need no capability here");
            Ok(None)
        }
        MapPrivilege::Keep(cap) => {
            loaded
                .keep_capability_on_map_thread(cap)
                .context("cannot start the BPF map thread")?;
            tracing::info!(capability = %cap,
                "bpf() checks a capability on every command on this kernel (unprivileged_bpf_disabled before Linux 5.19): the bpf-maps thread keeps it, every other thread drops it");
            Ok(Some(cap))
        }
    }
}

/// Step 5: binds every `-p` spec's listeners, a range whole or not at all.
fn bind_all(publish: &[PortRangeSpec]) -> Result<Vec<(PortSpec, port::Bound)>> {
    let mut bound: Vec<(PortSpec, port::Bound)> = Vec::new();
    for range in publish {
        let b = port::bind_range(range, |s| {
            bound
                .iter()
                .find(|(b, _)| b.conflicts_with(s))
                .map(|(b, _)| b.to_string())
        })
        .with_context(|| format!("cannot publish {range}"))?;
        bound.extend(b);
    }
    Ok(bound)
}

/// Runs the forwarder: start-up in the order the module comment gives,
/// then serving until `shutdown`. Returns what the run did.
pub fn run(mut config: Config, shutdown: Shutdown) -> Result<Report> {
    // 0. Attached to a RootlessKit: its child_pid and api.sock stand in for
    // --child-pid and --api-socket; its own socket is put back on exit
    // (also on an error from here on: the attachment's drop).
    let mut attachment = attach_rootlesskit(&mut config)?;
    // 1. Validate.
    let max_connections = validate(&config)?;
    // 2. The API socket.
    let api_listener = config.api_socket.as_deref().map(api::bind).transpose()?;
    // 3. BPF.
    let (mut prepared, reason) = engine::select(config.mode, ebpf_options(&config)?)?;
    let map_thread_keeps = match &mut prepared {
        Prepared::Ebpf(loaded) => map_thread(loaded)?,
        _ => None,
    };
    // 4. The child's namespace, or the agent.
    let dial = prepare_dialer(&config)?;
    // 5. Listeners.
    let bound = bind_all(&config.publish)?;
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
    let child_pid = config.child_pid.or_else(|| match &config.child_netns {
        Some(p) => pid_of_netns(p),
        None => None,
    });
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
        let child_watch = child_watch
            .map(|(pid, fd)| {
                sys::async_fd(fd, tokio::io::Interest::READABLE)
                    .map(|fd| (pid, fd))
                    .context("cannot watch the child process")
            })
            .transpose()?;
        // Handlers first: a SIGUSR1 that arrives after "ready" but before
        // its handler would otherwise kill the process (the default action).
        let (mut stops, mut usr1) = Stops::new(shutdown)?;
        let engine = prepared.start()?;
        let source_ip = dial.source_ip();
        let (dialer, mut agent) = AgentWatch::from_setup(dial)?;
        let variant = variant(engine.kind(), config.mode, config.ebpf_parser);
        tracing::info!(engine = %engine.kind(), variant, %reason, "engine selected");
        let ports = Arc::new(
            PortManager::with_max_connections(dialer, engine, max_connections)
                .with_udp_options(config.udp)
                .with_source_ip(source_ip),
        );
        let listeners = publish(&ports, bound)?;
        let api = ApiServer::start(
            config.api_socket.as_deref(),
            api_listener,
            api::ApiState {
                ports: ports.clone(),
                state_dir: String::new(),
                child_pid,
                network_driver,
            },
        )?;
        let ready = Ready {
            engine: ports.engine().kind(),
            variant: variant.map(String::from),
            reason: reason.clone(),
            listeners,
        };
        emit(&Event::Ready(ready.clone()));
        let mut agent_check = tokio::time::interval(Duration::from_millis(200));
        let ending = loop {
            tokio::select! {
                () = stops.requested() => break Ending::Requested,
                pid = child_exit(child_watch.as_ref()) => {
                    tracing::error!(pid, "the child process exited: stopping, nothing is left to forward to");
                    break Ending::ChildExited(pid);
                }
                () = recv(&mut usr1) => emit(&stats_event(&ports)),
                _ = agent_check.tick(), if agent.is_running() => {
                    if let Some(ending) = agent.check(source_ip).await {
                        break ending;
                    }
                }
            }
        };
        tracing::info!("shutting down");
        // From here on the agent's socket closing is part of the stop.
        agent.stopping();
        api.stop(config.api_socket.as_deref()).await;
        ports.close_all(Duration::from_secs(2)).await;
        let stats = StatsEvent::from(api::stats(&ports));
        emit(&Event::Stats(Box::new(stats.clone())));
        agent.stop().await;
        Ok((ready, stats, ending))
    }
}

/// The ebpf engine's program layout, named in the log and the ready line.
fn variant(kind: engine::EngineKind, mode: engine::Mode, parser: bool) -> Option<&'static str> {
    (kind == engine::EngineKind::Ebpf).then_some(match (mode, parser) {
        (engine::Mode::Auto, _) => "local+splice",
        (_, true) => "parser+verdict",
        (_, false) => "verdict",
    })
}

/// Publishes the listeners bound at start-up; returns their addresses.
fn publish(
    ports: &PortManager,
    bound: Vec<(PortSpec, port::Bound)>,
) -> Result<Vec<std::net::SocketAddr>> {
    let mut listeners = Vec::new();
    for (spec, b) in bound {
        let st = ports
            .add_bound(spec.clone(), spec::ApiSpec::from(&spec), b)
            .with_context(|| format!("cannot publish {spec}"))?;
        listeners.extend(st.listeners.iter().copied());
    }
    Ok(listeners)
}

/// What ends a run on request: SIGTERM or SIGINT, or the caller's channel
/// (library callers).
struct Stops {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
    channel: Option<oneshot::Receiver<()>>,
}

impl Stops {
    /// The stops, and SIGUSR1's handler (a stats line) where signals are
    /// handled.
    fn new(shutdown: Shutdown) -> Result<(Stops, Option<tokio::signal::unix::Signal>)> {
        Ok(match shutdown {
            Shutdown::Signals => (
                Stops {
                    term: Some(signal(SignalKind::terminate())?),
                    int: Some(signal(SignalKind::interrupt())?),
                    channel: None,
                },
                Some(signal(SignalKind::user_defined1())?),
            ),
            Shutdown::Channel(rx) => (
                Stops {
                    term: None,
                    int: None,
                    channel: Some(rx),
                },
                None,
            ),
        })
    }

    /// A stop was asked for.
    async fn requested(&mut self) {
        let channel = async {
            match self.channel.as_mut() {
                Some(rx) => {
                    let _ = rx.await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = recv(&mut self.term) => {}
            () = recv(&mut self.int) => {}
            () = channel => {}
        }
    }
}

/// The PID given with --child-pid, once that process has exited; never
/// without one.
async fn child_exit(watch: Option<&(u32, tokio::io::unix::AsyncFd<OwnedFd>)>) -> u32 {
    match watch {
        Some((pid, fd)) => {
            let _ = fd.readable().await;
            *pid
        }
        None => std::future::pending().await,
    }
}

/// The port API's server task, if an API socket was asked for.
struct ApiServer {
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    stop: Option<oneshot::Sender<()>>,
}

impl ApiServer {
    /// Serves `state` on the socket claimed at start-up (its state
    /// directory is the socket's).
    fn start(
        path: Option<&Path>,
        listener: Option<std::os::unix::net::UnixListener>,
        mut state: api::ApiState,
    ) -> Result<ApiServer> {
        let (Some(path), Some(listener)) = (path, listener) else {
            return Ok(ApiServer {
                task: None,
                stop: None,
            });
        };
        let listener =
            tokio::net::UnixListener::from_std(listener).context("cannot serve the API socket")?;
        state.state_dir = path
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let (stop, stopped) = oneshot::channel::<()>();
        tracing::info!(socket = %path.display(), "serving the port API");
        let task = tokio::spawn(api::serve(listener, Arc::new(state), async {
            let _ = stopped.await;
        }));
        Ok(ApiServer {
            task: Some(task),
            stop: Some(stop),
        })
    }

    /// Stops serving (2 s for requests in progress) and removes the socket.
    async fn stop(self, path: Option<&Path>) {
        if let Some(stop) = self.stop {
            let _ = stop.send(());
        }
        if let Some(t) = self.task {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        if let Some(path) = path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The dial agent this forwarder runs, watched for its exit: restarted
/// while the child lives, or replaced by the thread kept in the child's
/// namespace (root mode), or the run ends.
struct AgentWatch {
    process: Option<(std::process::Child, agent::AgentTarget)>,
    client: Option<agent::AgentClient>,
    /// Root mode: dials from the forwarder's own thread in the child if the
    /// agent dies.
    fallback: Option<netns::ChildDialer>,
}

impl AgentWatch {
    /// The dialer the port manager uses, and the agent to watch (none when
    /// the forwarder dials from its own thread in the child).
    fn from_setup(dial: DialSetup) -> Result<(Arc<dyn Dial>, AgentWatch)> {
        match dial {
            DialSetup::Netns(d) => Ok((
                Arc::new(d),
                AgentWatch {
                    process: None,
                    client: None,
                    fallback: None,
                },
            )),
            DialSetup::Agent {
                fd,
                process,
                fallback,
                source_ip,
            } => {
                let client = agent::AgentClient::new(fd, source_ip)
                    .context("cannot talk to the dial agent")?;
                // Root mode: the thread in the child dials what the agent
                // would not preserve, without the round trip. Rootless: the
                // agent makes every socket, the first ones now.
                match &fallback {
                    Some(d) => client.dial_local_clients_with(d.clone()),
                    None => client.fill_ahead(),
                }
                Ok((
                    Arc::new(client.clone()),
                    AgentWatch {
                        process,
                        client: Some(client),
                        fallback,
                    },
                ))
            }
        }
    }

    /// A started agent is being watched.
    fn is_running(&self) -> bool {
        self.process.is_some()
    }

    /// Looks at the agent: if it exited, restarts it, falls back, or says
    /// the run must end.
    async fn check(&mut self, source_ip: bool) -> Option<Ending> {
        let exited = self
            .process
            .as_mut()
            .and_then(|(c, _)| c.try_wait().ok().flatten());
        let (Some(status), Some((_, target)), Some(client)) =
            (exited, self.process.as_ref(), self.client.as_ref())
        else {
            return None;
        };
        let target = target.clone();
        if matches!(target, agent::AgentTarget::Pid(pid) if !process_alive(pid)) {
            // The child's pidfd ends the run next.
            self.process = None;
            return None;
        }
        let respawned =
            respawn_agent(target.clone(), source_ip)
                .await
                .and_then(|(child, fd, on)| {
                    client.replace(fd, on).map_err(anyhow::Error::from)?;
                    Ok(child)
                });
        match respawned {
            Ok(child) => {
                tracing::warn!(%status, agent_pid = child.id(),
                    "the dial agent exited while the child lives; restarted it");
                self.process = Some((child, target));
                None
            }
            Err(e) => {
                self.process = None;
                if let Some(d) = self.fallback.take() {
                    client.fall_back_to(d);
                    tracing::warn!(%status, error = %format!("{e:#}"),
                        "the dial agent exited and cannot be restarted: dialing from the forwarder's own thread in the child, without source address preservation");
                    return None;
                }
                tracing::error!(error = %format!("{e:#}"), "the dial agent exited and cannot be restarted: stopping");
                Some(Ending::AgentLost(format!("{e:#}")))
            }
        }
    }

    /// The run is ending: the agent's socket closing is expected from now
    /// on (a signal to the whole process group reached the agent too).
    fn stopping(&self) {
        if let Some(client) = &self.client {
            client.stopping();
        }
    }

    /// Stops the agent this forwarder started (it removes its routing in
    /// the child first).
    async fn stop(&mut self) {
        if let (Some((c, _)), Some(client)) = (self.process.as_mut(), &self.client) {
            client.close();
            stop_agent(c).await;
        }
    }
}

/// Waits up to 2 s for an agent asked to stop (its socket closed: it
/// removes its routing in the child, then exits), then kills it.
async fn stop_agent(c: &mut std::process::Child) {
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
    use crate::engine::Mode;
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
            local_path: false,
            no_local_path: false,
            bpf_cgroup: None,
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
