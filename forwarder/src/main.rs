//! forwarder: publishes ports of a rootless container's network namespace
//! on the host, moving each connection's bytes inside the kernel where BPF
//! is permitted. This file only dispatches the command line
//! ([`forwarder::cli::args`]); the work is in the library (`lib.rs`).

// The command line holds no unsafe code (the library keeps it in `sys`).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser as _;

use forwarder::child::setup;
use forwarder::cli::args::{self, AttachArgs, Cli, Command, PortsAction};
use forwarder::cli::client;
use forwarder::engine::kernel;
use forwarder::parent::rootlesskit;
use forwarder::startup;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = args::validate(&cli) {
        e.exit();
    }
    if let Some(r) = args::generate(&cli.command) {
        return exit(r);
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    exit(match cli.command {
        // Start-up builds its own runtime once capabilities are dropped.
        Command::Run(a) => startup::run(a.config(), startup::Shutdown::Signals).and_then(ended),
        Command::ChildAgent {
            socket,
            fd,
            source_ip,
        } => setup::run_agent(fd, socket.as_deref(), source_ip),
        Command::Status { api_socket } => with_runtime(client::status(&api_socket)),
        Command::Check { json } => kernel::check(json),
        Command::AttachDocker(a) => attach_docker(a),
        Command::Completions { .. } | Command::Man { .. } => Ok(()),
        Command::Ports { api_socket, action } => with_runtime(async move {
            // validate() has refused a missing socket already.
            let socket = api_socket.unwrap_or_default();
            match action {
                PortsAction::Add { specs } => client::add(&socket, &specs).await,
                PortsAction::Ls { json } => client::list(&socket, json).await,
                PortsAction::Rm { ids } => client::remove(&socket, &ids).await,
            }
        }),
    })
}

/// Status 0, or the error's chain on stderr and status 1.
fn exit(r: Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("forwarder: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `forwarder attach-docker`: finds the dockerd's state directory, then
/// runs attached to it.
fn attach_docker(a: AttachArgs) -> Result<()> {
    let uid = a.uid.unwrap_or_else(|| nix::unistd::getuid().as_raw());
    let dir = rootlesskit::find_docker_state_dir(uid)?;
    if a.print {
        println!("{}", dir.display());
        return Ok(());
    }
    tracing::info!(state_dir = %dir.display(), uid, "found a rootless dockerd");
    startup::run(a.ports.config(Some(dir)), startup::Shutdown::Signals).and_then(ended)
}

/// The exit status of a run: 0 only when asked to stop (signal). The child
/// or the dial agent going away is a failure (status 1, as RootlessKit
/// exits when its child does), so a unit with `Restart=on-failure` starts
/// the forwarder again against a restarted runtime.
fn ended(r: startup::Report) -> Result<()> {
    match r.ending {
        startup::Ending::Requested => Ok(()),
        startup::Ending::ChildExited(pid) => Err(anyhow::anyhow!(
            "the child process {pid} exited; its ports are closed"
        )),
        startup::Ending::AgentLost(why) => Err(anyhow::anyhow!(
            "the dial agent exited and cannot be restarted: {why}"
        )),
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
