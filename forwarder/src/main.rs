//! forwarder: publishes ports of a rootless container's network namespace
//! on the host, splicing each connection inside the kernel where BPF is
//! permitted.

mod dial;
mod engine;
mod netns;
mod port;
mod spec;
mod stats;
mod sys;

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
}

#[derive(Args)]
struct RunArgs {
    /// The child's network namespace file (/run/netns/NAME, /proc/PID/ns/net).
    #[arg(long, value_name = "PATH", required_unless_present = "child_pid", conflicts_with = "child_pid")]
    child_netns: Option<PathBuf>,
    /// Shorthand for --child-netns /proc/PID/ns/net.
    #[arg(long, value_name = "PID")]
    child_pid: Option<u32>,
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

fn stats_event(ports: &PortManager) -> serde_json::Value {
    let (per_port, total) = ports.stats();
    let mut v = json!({
        "event": "stats",
        "engine": ports.engine().kind(),
        "ports": per_port,
    });
    if let (Some(obj), Ok(serde_json::Value::Object(t))) = (v.as_object_mut(), serde_json::to_value(total)) {
        obj.extend(t);
        if let Some(m) = ports.engine().map_entries() {
            obj.insert("bpf_map_entries".into(), json!(m));
        }
    }
    v
}

async fn run(args: RunArgs) -> Result<()> {
    let netns = match (&args.child_netns, args.child_pid) {
        (Some(p), _) => p.clone(),
        (None, Some(pid)) => PathBuf::from(format!("/proc/{pid}/ns/net")),
        (None, None) => anyhow::bail!("one of --child-netns or --child-pid is required"),
    };
    if args.publish.is_empty() {
        anyhow::bail!("nothing to publish: give at least one -p SPEC");
    }
    match sys::raise_nofile_limit() {
        Ok(n) => tracing::debug!(nofile = n, "file descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise RLIMIT_NOFILE"),
    }
    let dialer = netns::ChildDialer::new(&netns)?;
    let (engine, reason) = engine::select(
        args.mode,
        engine::ebpf::Options {
            parser: args.ebpf_parser,
        },
    )?;
    tracing::info!(engine = %engine.kind(), %reason, "engine selected");
    let ports = Arc::new(PortManager::new(dialer, engine));
    let mut listeners = Vec::new();
    for spec in &args.publish {
        let st = ports
            .add(spec.clone())
            .with_context(|| format!("cannot publish {spec}"))?;
        listeners.extend(st.listeners.iter().map(|a| a.to_string()));
    }
    emit(json!({
        "event": "ready",
        "engine": ports.engine().kind(),
        "reason": reason,
        "listeners": listeners,
    }));

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = usr1.recv() => emit(stats_event(&ports)),
        }
    }
    tracing::info!("shutting down");
    ports.close_all();
    emit(stats_event(&ports));
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
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("forwarder: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Run(args) => run(args).await,
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
