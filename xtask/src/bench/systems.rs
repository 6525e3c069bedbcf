//! The systems under test, started once for the whole bench: direct
//! loopback (no carrier), one forwarder per engine (and one in auto mode),
//! and the peers (socat, RootlessKit, pasta), each publishing the child's
//! iperf3 and echo servers on free ports here.

use std::path::Path;

use anyhow::{bail, Context as _, Result};

use super::{free_ports, Args, System, BASELINE, ECHO_PORT, FORWARDERS, SERVER_PORT};
use crate::peers::{self, Peer};
use crate::util::{Forwarder, Netns};

/// Everything that carries the bench's traffic, kept until the end.
pub struct Carriers {
    /// The report's rows: direct, the engines, the peers (a peer that could
    /// not start is a row with its reason).
    pub systems: Vec<System>,
    /// The forwarders by engine name, for their final statistics.
    pub forwarders: Vec<(String, Forwarder)>,
    /// The peers that run.
    pub peers: Vec<Peer>,
}

/// Starts every system; a forwarder that fails to start, or reports
/// another engine than asked, fails the bench; a peer that fails is
/// reported as not run.
pub fn start(args: &Args, ns: &Netns, bin: &Path, me: &Path) -> Result<Carriers> {
    let ports = free_ports(2 * (2 * FORWARDERS.len() + PEERS.len()))?;
    let mut ports = ports.into_iter();
    let mut next_port = || ports.next().context("out of free ports");
    let mut systems = vec![System {
        name: "direct".into(),
        label: "direct (no forwarder)".into(),
        iperf_port: None,
        echo_port: Some(ECHO_PORT),
        pid: None,
        failed: None,
    }];
    let mut forwarders = Vec::new();
    let builds = std::iter::once((bin, "")).chain(args.baseline.as_deref().map(|b| (b, BASELINE)));
    for (bin, suffix) in builds {
        for mode in FORWARDERS {
            let ports = (next_port()?, next_port()?);
            let (mut sys, fwd) = start_forwarder(ns, bin, mode, ports)?;
            if !suffix.is_empty() {
                sys.name.push_str(suffix);
                sys.label.push_str(" (baseline binary)");
            }
            forwarders.push((sys.name.clone(), fwd));
            systems.push(sys);
        }
    }
    let mut running = Vec::new();
    for (name, label) in PEERS {
        let ports = (next_port()?, next_port()?);
        let started = if args.no_peers {
            Err(anyhow::anyhow!("--no-peers"))
        } else {
            start_peer(ns, me, bin, name, ports)
        };
        let mut sys = System {
            name: name.into(),
            label: label.into(),
            iperf_port: Some(ports.0),
            echo_port: Some(ports.1),
            pid: None,
            failed: None,
        };
        match started {
            Ok(peer) => {
                sys.pid = peer.pid;
                sys.echo_port = peer.echo_port;
                running.push(peer);
            }
            Err(e) => {
                eprintln!("bench: {name} not run: {e:#}");
                sys.failed = Some(format!("{e:#}"));
            }
        }
        systems.push(sys);
    }
    Ok(Carriers {
        systems,
        forwarders,
        peers: running,
    })
}

/// The peers: name and report label. `rootless` is this build's forwarder
/// as rootless Docker runs it (as a user, attached to RootlessKit, every
/// dial through its agent), reported beside the peers it replaces.
const PEERS: [(&str, &str); 4] = [
    ("socat", "socat, fork + `ip netns exec` per connection"),
    ("rootlesskit", "RootlessKit 1.1 builtin port driver"),
    (
        "rootless",
        "forwarder `--mode auto`, rootless (RootlessKit `--port-driver=none`)",
    ),
    ("pasta", "pasta (passt), splice path"),
];

/// A forwarder in `mode` publishing the iperf3 and echo servers on
/// `(port, echo port)`.
fn start_forwarder(
    ns: &Netns,
    bin: &Path,
    mode: &'static str,
    (port, eport): (u16, u16),
) -> Result<(System, Forwarder)> {
    // ebpf-local: the ebpf engine with its local-client path.
    let (engine, extra): (&str, &[&str]) = match mode {
        "ebpf-local" => ("ebpf", &["--local-path"]),
        "auto-nosrc" => ("auto", &["--no-source-ip"]),
        m => (m, &[]),
    };
    let mut args = vec![
        "--child-netns".to_string(),
        ns.path().display().to_string(),
        "--mode".to_string(),
        engine.to_string(),
        "-p".to_string(),
        format!("127.0.0.1:{port}:{SERVER_PORT}"),
        "-p".to_string(),
        format!("127.0.0.1:{eport}:{ECHO_PORT}"),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let flags = std::iter::once(format!("--mode {engine}"))
        .chain(extra.iter().map(|a| a.to_string()))
        .collect::<Vec<_>>()
        .join(" ");
    let name = format!("forwarder {flags}");
    let fwd = Forwarder::start(bin, &args, true, &name)?;
    if engine != "auto" && fwd.engine() != engine {
        bail!("{name} reports engine {:?}", fwd.engine());
    }
    let label = match mode {
        "auto" => format!("forwarder `--mode auto` (picked {})", fwd.engine()),
        "auto-nosrc" => format!(
            "forwarder `--mode auto --no-source-ip` (picked {})",
            fwd.engine()
        ),
        _ => format!("forwarder `{flags}`"),
    };
    let sys = System {
        name: mode.into(),
        label,
        iperf_port: Some(port),
        echo_port: Some(eport),
        pid: Some(fwd.pid()),
        failed: None,
    };
    Ok((sys, fwd))
}

/// A peer publishing the iperf3 and echo servers on `(port, echo port)`.
fn start_peer(ns: &Netns, me: &Path, bin: &Path, name: &str, (p, e): (u16, u16)) -> Result<Peer> {
    eprintln!("bench: starting {name}");
    match name {
        "socat" => peers::socat(ns, (p, SERVER_PORT), (e, ECHO_PORT)),
        "rootlesskit" => peers::rootlesskit(me, (p, SERVER_PORT), (e, ECHO_PORT)),
        "rootless" => peers::rootless_forwarder(me, bin, (p, SERVER_PORT), (e, ECHO_PORT)),
        _ => peers::pasta(ns, (p, SERVER_PORT), (e, ECHO_PORT)),
    }
}
