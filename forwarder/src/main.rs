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
mod startup;
mod stats;
mod sys;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use engine::Mode;
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
    /// A port to publish: [PARENTIP:]PARENTPORT:[CHILDIP:]CHILDPORT[/tcp|/tcp4|/tcp6],
    /// IPv6 addresses in brackets. Repeatable.
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
    /// Connections carried at once; beyond it the forwarder stops accepting
    /// (clients wait in the listen backlog) until one ends. Default: what
    /// the descriptor limit allows, two per connection plus headroom.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: Option<u32>,
}

impl From<RunArgs> for startup::Config {
    fn from(a: RunArgs) -> Self {
        startup::Config {
            child_netns: a.child_netns,
            child_pid: a.child_pid,
            child_agent: a.child_agent,
            publish: a.publish,
            mode: a.mode,
            ebpf_parser: a.ebpf_parser,
            api_socket: a.api_socket,
            max_connections: a.max_connections.map(|n| n as usize),
        }
    }
}

fn parse_spec(s: &str) -> Result<PortSpec, String> {
    s.parse::<PortSpec>().map_err(|e| e.to_string())
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
    let result = match cli.command {
        // Start-up builds its own runtime once capabilities are dropped.
        Command::Run(args) => {
            startup::run(args.into(), startup::Shutdown::Signals).and_then(|r| match r.ending {
                startup::Ending::Requested => Ok(()),
                startup::Ending::ChildExited(pid) => Err(anyhow::anyhow!(
                    "the child process {pid} exited; its ports are closed"
                )),
                startup::Ending::AgentLost(why) => Err(anyhow::anyhow!(
                    "the dial agent exited and cannot be restarted: {why}"
                )),
            })
        }
        Command::ChildAgent { socket, fd } => {
            // Before any thread exists: the agent keeps no capability (it
            // may hold all of them in the container's user namespace).
            match sys::drop_thread_capabilities(&[]) {
                Ok(()) => with_runtime(agent::run(fd, socket.as_deref())),
                Err(e) => Err(anyhow::anyhow!("cannot drop capabilities: {e}")),
            }
        }
        Command::Status { api_socket } => with_runtime(client::status(&api_socket)),
        Command::Ports { api_socket, action } => with_runtime(async move {
            let socket =
                api_socket.ok_or_else(|| anyhow::anyhow!("--api-socket PATH is required"))?;
            match action {
                PortsAction::Add { specs } => client::add(&socket, &specs).await,
                PortsAction::Ls { json } => client::list(&socket, json).await,
                PortsAction::Rm { ids } => client::remove(&socket, &ids).await,
            }
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("forwarder: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `f` on a multi-threaded runtime.
fn with_runtime(f: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the runtime: {e}"))?;
    let r = rt.block_on(f);
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    r
}
