//! forwarder: publishes ports of a rootless container's network namespace
//! on the host, splicing each connection inside the kernel where BPF is
//! permitted.

mod agent;
mod api;
mod client;
mod dial;
mod engine;
mod netns;
mod port;
mod spec;
mod stats;
mod sys;
mod udp;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use tokio::signal::unix::{signal, SignalKind};

use engine::Mode;
use port::PortManager;
use spec::PortSpec;

#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Publish ports of a child network namespace in this (the parent) namespace.
    Run(RunArgs),
    /// Show the ports of a running forwarder with their traffic figures.
    Status {
        /// The forwarder's API socket.
        #[arg(long, value_name = "PATH")]
        api_socket: PathBuf,
    },
    /// The child-side dial agent: runs inside the container's user and
    /// network namespaces and dials for an unprivileged forwarder.
    ChildAgent {
        /// Listen for forwarders on this Unix SOCK_SEQPACKET socket.
        #[arg(long, value_name = "PATH", conflicts_with = "fd")]
        socket: Option<PathBuf>,
        /// Serve an inherited, connected SOCK_SEQPACKET socket.
        #[arg(long, value_name = "N")]
        fd: Option<i32>,
    },
    /// Add, list or remove ports of a running forwarder.
    Ports {
        /// The forwarder's API socket.
        #[arg(long, value_name = "PATH", global = true)]
        api_socket: Option<PathBuf>,
        #[command(subcommand)]
        action: PortsAction,
    },
}

#[derive(Subcommand)]
enum PortsAction {
    /// Publish ports (same SPEC syntax as `run -p`); prints each new ID.
    Add {
        #[arg(value_name = "SPEC", value_parser = parse_spec, required = true)]
        specs: Vec<PortSpec>,
    },
    /// List the published ports.
    #[command(alias = "list")]
    Ls {
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove ports by ID; their established connections run to their end.
    #[command(alias = "remove")]
    Rm {
        #[arg(value_name = "ID", required = true)]
        ids: Vec<u32>,
    },
}

#[derive(Args)]
struct RunArgs {
    /// The child's network namespace file (/run/netns/NAME, /proc/PID/ns/net).
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present_any = ["child_pid", "child_agent"],
        conflicts_with_all = ["child_pid", "child_agent"]
    )]
    child_netns: Option<PathBuf>,
    /// The container's PID: its network namespace is entered directly when
    /// permitted, otherwise a child-side dial agent is started in its user
    /// and network namespaces.
    #[arg(long, value_name = "PID", conflicts_with = "child_agent")]
    child_pid: Option<u32>,
    /// Dial through an agent (`forwarder child-agent --socket PATH`) that a
    /// runtime started inside the container.
    #[arg(long, value_name = "SOCKET")]
    child_agent: Option<PathBuf>,
    /// A port to publish: [PARENTIP:]PARENTPORT:[CHILDIP:]CHILDPORT[/PROTO],
    /// PROTO one of tcp (the default), tcp4, tcp6, udp, udp4, udp6; IPv6
    /// addresses in brackets. Repeatable.
    #[arg(short = 'p', long = "publish", value_name = "SPEC", value_parser = parse_spec)]
    publish: Vec<PortSpec>,
    /// Which engine carries the bytes.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    mode: Mode,
    /// ebpf engine variant: attach a stream parser program in front of the
    /// verdict (the default runs the verdict alone).
    #[arg(long)]
    ebpf_parser: bool,
    /// Serve RootlessKit's port API on this Unix socket (mode 0600), so
    /// rootlessctl, dockerd and nerdctl can add and remove ports.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// A UDP flow (one client address) with no datagram either way for this
    /// many seconds is closed. Fractions allowed (0.5).
    #[arg(long, value_name = "SECONDS", default_value = "60", value_parser = parse_seconds)]
    udp_idle_timeout: std::time::Duration,
    /// Live UDP flows per published address; a new client beyond it evicts
    /// the least recently active flow.
    #[arg(long, value_name = "N", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..))]
    udp_max_flows: u32,
}

fn parse_seconds(s: &str) -> Result<std::time::Duration, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 1e9 => Ok(std::time::Duration::from_secs_f64(v)),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}

fn parse_spec(s: &str) -> Result<PortSpec, String> {
    s.parse::<PortSpec>().map_err(|e| e.to_string())
}

/// Writes one JSON object as a line on stdout (the machine-readable
/// channel; logs go to stderr).
fn emit(v: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// The stats line of the stdout channel: the totals at top level, then the
/// ports and (ebpf) the map occupancy.
fn stats_event(ports: &PortManager) -> serde_json::Value {
    let st = api::stats(ports);
    let mut v = json!({ "event": "stats", "engine": st.engine, "ports": st.ports });
    if let (Some(obj), Ok(serde_json::Value::Object(t))) =
        (v.as_object_mut(), serde_json::to_value(st.total))
    {
        obj.extend(t);
        if let Some(m) = st.bpf_map_entries {
            obj.insert("bpf_map_entries".into(), json!(m));
        }
        obj.insert("pooled".into(), json!(st.pooled));
        obj.insert("udp".into(), json!(st.udp));
    }
    v
}

/// The PID behind a `/proc/PID/ns/net` path, for `/v1/info`.
fn pid_of_netns(path: &std::path::Path) -> Option<u32> {
    let mut parts = path.strip_prefix("/proc").ok()?.components();
    let pid = parts.next()?.as_os_str().to_str()?.parse().ok()?;
    (parts.as_path() == std::path::Path::new("ns/net")).then_some(pid)
}

/// Chooses how to dial in the child: enter its namespace, or go through a
/// child-side agent (started here for --child-pid when entering is not
/// permitted, or given with --child-agent).
fn dialer(args: &RunArgs) -> Result<(netns::Dialer, Option<std::process::Child>)> {
    if let Some(sock) = &args.child_agent {
        let client = agent::AgentClient::connect(sock)
            .with_context(|| format!("cannot connect to the dial agent at {}", sock.display()))?;
        tracing::info!(agent = %sock.display(), "dialing through the child-side agent");
        return Ok((netns::Dialer::Agent(client), None));
    }
    let path = match (&args.child_netns, args.child_pid) {
        (Some(p), _) => p.clone(),
        (None, Some(pid)) => PathBuf::from(format!("/proc/{pid}/ns/net")),
        (None, None) => {
            anyhow::bail!("one of --child-netns, --child-pid or --child-agent is required")
        }
    };
    match (netns::ChildDialer::new(&path), args.child_pid) {
        (Ok(d), _) => Ok((netns::Dialer::Netns(d), None)),
        (Err(netns::NetnsError::Enter { cause, .. }), Some(pid))
            if cause.raw_os_error() == Some(libc::EPERM) =>
        {
            let (child, client) = agent::spawn_in(pid)?;
            tracing::info!(pid, agent_pid = child.id(),
                "not permitted to enter the child's network namespace; dialing through a child-side agent");
            Ok((netns::Dialer::Agent(client), Some(child)))
        }
        (Err(e), _) => Err(e.into()),
    }
}

async fn run(args: RunArgs) -> Result<()> {
    // Handlers first: a SIGUSR1 that arrives after "ready" but before its
    // handler would otherwise kill the process (the default action).
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let netns = match (&args.child_netns, args.child_pid) {
        (Some(p), _) => p.clone(),
        (None, Some(pid)) => PathBuf::from(format!("/proc/{pid}/ns/net")),
        (None, None) => PathBuf::new(),
    };
    if args.publish.is_empty() && args.api_socket.is_none() {
        anyhow::bail!(
            "nothing to publish: give at least one -p SPEC, or --api-socket to add ports later"
        );
    }
    match sys::raise_nofile_limit() {
        Ok(n) => tracing::debug!(nofile = n, "file descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise RLIMIT_NOFILE"),
    }
    // Claim the API socket first: a second forwarder on the same socket
    // must fail before it loads BPF or listens anywhere.
    let api_listener = args.api_socket.as_deref().map(api::bind).transpose()?;
    let (engine, reason) = engine::select(
        args.mode,
        engine::ebpf::Options {
            parser: args.ebpf_parser,
        },
    )?;
    let (dialer, mut agent_child) = dialer(&args)?;
    tracing::info!(engine = %engine.kind(), %reason, "engine selected");
    let ports = Arc::new(
        PortManager::new(dialer, engine).with_udp_options(udp::UdpOptions {
            idle_timeout: args.udp_idle_timeout,
            max_flows: args.udp_max_flows as usize,
        }),
    );
    let mut listeners = Vec::new();
    for spec in &args.publish {
        let st = ports
            .add(spec.clone(), spec::ApiSpec::from(spec))
            .with_context(|| format!("cannot publish {spec}"))?;
        listeners.extend(st.listeners.iter().map(|a| a.to_string()));
    }
    // Everything privileged is done: BPF objects loaded, namespace entered
    // or agent started, listeners bound.
    sys::drop_capabilities();
    let (stop_api, api_stopped) = tokio::sync::oneshot::channel::<()>();
    let api_task = match (&args.api_socket, api_listener) {
        (Some(path), Some(listener)) => {
            let state = Arc::new(api::ApiState {
                ports: ports.clone(),
                state_dir: path
                    .parent()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                child_pid: args.child_pid.or_else(|| pid_of_netns(&netns)),
            });
            tracing::info!(socket = %path.display(), "serving the port API");
            Some(tokio::spawn(api::serve(listener, state, async {
                let _ = api_stopped.await;
            })))
        }
        _ => None,
    };
    emit(json!({
        "event": "ready",
        "engine": ports.engine().kind(),
        "reason": reason,
        "listeners": listeners,
    }));

    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = usr1.recv() => emit(stats_event(&ports)),
        }
    }
    tracing::info!("shutting down");
    let _ = stop_api.send(());
    if let Some(t) = api_task {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), t).await;
    }
    if let Some(path) = &args.api_socket {
        let _ = std::fs::remove_file(path);
    }
    ports.close_all().await;
    emit(stats_event(&ports));
    if let Some(c) = agent_child.as_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("forwarder: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Run(args) => run(args).await,
            Command::Status { api_socket } => client::status(&api_socket).await,
            Command::ChildAgent { socket, fd } => agent::run(fd, socket.as_deref()).await,
            Command::Ports { api_socket, action } => {
                let socket =
                    api_socket.ok_or_else(|| anyhow::anyhow!("--api-socket PATH is required"))?;
                match action {
                    PortsAction::Add { specs } => client::add(&socket, &specs).await,
                    PortsAction::Ls { json } => client::list(&socket, json).await,
                    PortsAction::Rm { ids } => client::remove(&socket, &ids).await,
                }
            }
        }
    });
    // Connections still running are torn down with the runtime; the BPF
    // programs and maps are released when the engine is dropped.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("forwarder: {e:#}");
            ExitCode::FAILURE
        }
    }
}
