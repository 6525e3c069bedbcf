//! The command line's arguments: the clap definitions of every subcommand,
//! the checks across options that clap cannot express, and the one place
//! a [`Config`] is built from them.
//!
//! `run` and `attach-docker` share [`PortOptions`] (flattened into both),
//! so an option added there reaches both subcommands, their completions
//! and their man pages at once.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand};

use crate::engine::Mode;
use crate::udp::UdpOptions;
use crate::wire::spec::{self, PortRangeSpec};

/// What `forwarder run` (or `attach-docker`) was asked to do, built from
/// the arguments once ([`RunArgs::config`], [`PortOptions::config`]) and
/// consumed by [`crate::startup::run`].
#[derive(Debug, Clone)]
pub struct Config {
    pub child_netns: Option<PathBuf>,
    pub child_pid: Option<u32>,
    pub child_agent: Option<PathBuf>,
    /// Attach to this RootlessKit state directory: its `child_pid` and
    /// `api.sock` stand in for `child_pid` and `api_socket`
    /// ([`crate::parent::rootlesskit`]).
    pub rootlesskit_state_dir: Option<PathBuf>,
    /// `-p` specs, port ranges included.
    pub publish: Vec<PortRangeSpec>,
    pub mode: Mode,
    pub ebpf_parser: bool,
    pub api_socket: Option<PathBuf>,
    /// `None`: derived from the descriptor limit
    /// ([`crate::startup::default_max_connections`]).
    pub max_connections: Option<usize>,
    /// UDP flow expiry and cap.
    pub udp: UdpOptions,
    /// Preserve client addresses where the child permits
    /// ([`crate::child::srcip`]; `--no-source-ip` clears it).
    pub source_ip: bool,
    /// Run the local-client path ([`crate::engine`]'s `local` module) even
    /// where its self-test finds the kernel's blocking reads broken.
    pub local_path: bool,
    /// Never run the local-client path.
    pub no_local_path: bool,
    /// The cgroup v2 directory the local path's `sock_ops` program watches
    /// (`None`: the whole host).
    pub bpf_cgroup: Option<PathBuf>,
}

/// `forwarder`: every subcommand.
#[derive(Parser)]
#[command(version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand)]
pub enum Command {
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
        /// Dial from the clients' addresses (IP_TRANSPARENT and policy
        /// routing in this namespace; keeps CAP_NET_ADMIN and CAP_NET_RAW).
        #[arg(long)]
        source_ip: bool,
    },
    /// Show the kernel, which engines can run here and which one auto
    /// mode would pick, and why.
    Check {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Attach to the current user's running rootless dockerd: find its
    /// RootlessKit state directory (ROOTLESSKIT_STATE_DIR in dockerd's
    /// environment) and run as with `run --rootlesskit-state-dir DIR`.
    AttachDocker(AttachArgs),
    /// Print a shell completion script: `forwarder completions bash >
    /// /etc/bash_completion.d/forwarder` (also zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (forwarder.1 and one per subcommand) into DIR.
    #[command(hide = true)]
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Add, list or remove ports of a running forwarder.
    Ports {
        /// The forwarder's API socket (required).
        #[arg(long, value_name = "PATH", global = true)]
        api_socket: Option<PathBuf>,
        #[command(subcommand)]
        action: PortsAction,
    },
}

/// `ports`' actions.
#[derive(Subcommand)]
pub enum PortsAction {
    /// Publish ports (same SPEC syntax as `run -p`); prints each new ID.
    Add {
        #[arg(value_name = "SPEC", value_parser = parse_spec, required = true)]
        specs: Vec<PortRangeSpec>,
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

/// Where `run` dials: exactly one of the four.
#[derive(Args)]
#[group(id = "child", required = true, multiple = false)]
pub struct ChildOptions {
    /// The child's network namespace file (/run/netns/NAME, /proc/PID/ns/net).
    #[arg(long, value_name = "PATH")]
    pub child_netns: Option<PathBuf>,
    /// The container's PID: its network namespace is entered directly when
    /// permitted, otherwise a child-side dial agent is started in its user
    /// and network namespaces.
    #[arg(long, value_name = "PID")]
    pub child_pid: Option<u32>,
    /// Dial through an agent (`forwarder child-agent --socket PATH`) that a
    /// runtime started inside the container.
    #[arg(long, value_name = "SOCKET")]
    pub child_agent: Option<PathBuf>,
    /// Attach to a RootlessKit started with --port-driver=none: dial in the
    /// namespaces of its child_pid and serve the port API at its api.sock
    /// (RootlessKit's own socket is set aside and restored on exit).
    #[arg(
        long,
        value_name = "DIR",
        env = "ROOTLESSKIT_STATE_DIR",
        conflicts_with = "api_socket"
    )]
    pub rootlesskit_state_dir: Option<PathBuf>,
}

/// `run`'s options: where to dial, the API socket, and the options it
/// shares with `attach-docker`.
#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub child: ChildOptions,
    /// Serve RootlessKit's port API on this Unix socket (mode 0600), so
    /// rootlessctl, dockerd and nerdctl can add and remove ports.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    #[command(flatten)]
    pub ports: PortOptions,
}

impl RunArgs {
    /// The run's configuration.
    pub fn config(self) -> Config {
        let c = self.child;
        let mut config = self.ports.config(c.rootlesskit_state_dir);
        config.child_netns = c.child_netns;
        config.child_pid = c.child_pid;
        config.child_agent = c.child_agent;
        config.api_socket = self.api_socket;
        config
    }
}

/// What is published and how: the options `run` and `attach-docker` share.
#[derive(Args)]
pub struct PortOptions {
    /// A port to publish: [PARENTIP:]PARENTPORT:[CHILDIP:]CHILDPORT[/PROTO],
    /// PROTO one of tcp (the default), tcp4, tcp6, udp, udp4, udp6; IPv6
    /// addresses in brackets. Ports may be ranges (8000-8010:9000-9010,
    /// published whole or not at all), or a parent range to one child port
    /// (8000-8010:80: the first free port of the range). Repeatable.
    #[arg(short = 'p', long = "publish", value_name = "SPEC", value_parser = parse_spec)]
    pub publish: Vec<PortRangeSpec>,
    /// Which engine carries the bytes.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    pub mode: Mode,
    /// ebpf engine variant: attach a stream parser program in front of the
    /// verdict (the default runs the verdict alone). Only with --mode ebpf
    /// or auto.
    #[arg(long)]
    pub ebpf_parser: bool,
    /// TCP connections and UDP flows carried at once, one budget over all
    /// ports. At the limit TCP stops accepting (clients wait in the listen
    /// backlog) until a slot frees; a new UDP client evicts the least
    /// recently active flow of its port, or is dropped (counted as
    /// `no_slot`) if that port has none. Default: what the descriptor limit
    /// allows, two per connection plus headroom.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: Option<u32>,
    /// A UDP flow (one client address) with no datagram either way for this
    /// many seconds is closed. Fractions allowed (0.5).
    #[arg(long, value_name = "SECONDS", default_value = "60", value_parser = parse_seconds)]
    pub udp_idle_timeout: Duration,
    /// Live UDP flows per published address; a new client beyond it evicts
    /// the least recently active flow. Flows also count against
    /// --max-connections.
    #[arg(long, value_name = "N", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub udp_max_flows: u32,
    /// Dial from the forwarder's own address in the child, as before,
    /// instead of the client's (source preservation is on by default where
    /// the child permits it: IP_TRANSPARENT and policy routing there).
    #[arg(long)]
    pub no_source_ip: bool,
    /// Run the local-client path (local clients' bytes move inside their
    /// own send calls: sock_ops + sk_msg, needs CAP_PERFMON as well) also
    /// where its start-up self-test finds that the kernel returns EAGAIN
    /// to blocking reads on admitted sockets. Without this flag, auto and
    /// ebpf modes run the path where BPF is permitted and the self-test
    /// passes (see docs/architecture.md).
    #[arg(long, conflicts_with = "no_local_path")]
    pub local_path: bool,
    /// Never run the local-client path: local clients take the same path
    /// as every other connection.
    #[arg(long)]
    pub no_local_path: bool,
    /// The cgroup v2 directory whose TCP sockets the local-client path may
    /// admit (default: the whole host, /sys/fs/cgroup/unified on hybrid
    /// hosts, else /sys/fs/cgroup).
    #[arg(long, value_name = "PATH")]
    pub bpf_cgroup: Option<PathBuf>,
}

impl PortOptions {
    /// A configuration that publishes these ports, attached to the
    /// RootlessKit of `rootlesskit_state_dir` if given, with no other
    /// child option and no API socket of its own.
    pub fn config(self, rootlesskit_state_dir: Option<PathBuf>) -> Config {
        Config {
            child_netns: None,
            child_pid: None,
            child_agent: None,
            rootlesskit_state_dir,
            publish: self.publish,
            mode: self.mode,
            ebpf_parser: self.ebpf_parser,
            api_socket: None,
            max_connections: self.max_connections.map(|n| n as usize),
            udp: UdpOptions {
                idle_timeout: self.udp_idle_timeout,
                max_flows: self.udp_max_flows as usize,
                source_ip: false,
            },
            source_ip: !self.no_source_ip,
            local_path: self.local_path,
            no_local_path: self.no_local_path,
            bpf_cgroup: self.bpf_cgroup,
        }
    }
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 1e9 => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}

/// `attach-docker`: `run` without the child options, which it finds.
#[derive(Args)]
pub struct AttachArgs {
    /// The dockerd's user (default: the caller's uid).
    #[arg(long, value_name = "UID")]
    pub uid: Option<u32>,
    /// Only print the state directory found, and exit.
    #[arg(long)]
    pub print: bool,
    #[command(flatten)]
    pub ports: PortOptions,
}

/// Checks across options that clap's attributes cannot express, so that
/// every bad command line exits 2 before anything listens. The error
/// shows the usage of the subcommand at fault, as clap's own do.
pub fn validate(cli: &Cli) -> Result<(), clap::Error> {
    use clap::error::ErrorKind;
    let (publish, mode, parser, sub) = match &cli.command {
        Command::Run(a) => (&a.ports.publish, a.ports.mode, a.ports.ebpf_parser, "run"),
        Command::AttachDocker(a) => (
            &a.ports.publish,
            a.ports.mode,
            a.ports.ebpf_parser,
            "attach-docker",
        ),
        Command::Ports {
            api_socket: None, ..
        } => {
            return Err(subcommand_error(
                "ports",
                ErrorKind::MissingRequiredArgument,
                "`ports` needs --api-socket PATH (the forwarder's API socket)",
            ))
        }
        _ => return Ok(()),
    };
    let err = |kind, msg: String| Err(subcommand_error(sub, kind, msg));
    if parser && matches!(mode, Mode::Splice | Mode::Copy) {
        return err(
            ErrorKind::ArgumentConflict,
            "--ebpf-parser chooses a variant of the ebpf engine: it needs --mode ebpf or auto"
                .into(),
        );
    }
    if let Some((a, b)) = spec::first_conflict(publish) {
        return err(
            ErrorKind::ArgumentConflict,
            format!("-p {b} and -p {a} would listen on the same address and port"),
        );
    }
    Ok(())
}

/// An error formatted with the usage of subcommand `name` (`forwarder run
/// ...`), not the top level's.
fn subcommand_error(
    name: &str,
    kind: clap::error::ErrorKind,
    msg: impl std::fmt::Display,
) -> clap::Error {
    use clap::CommandFactory as _;
    let mut cmd = Cli::command();
    // Gives each subcommand its usage name ("forwarder run").
    cmd.build();
    match cmd.find_subcommand_mut(name) {
        Some(sub) => sub.error(kind, msg),
        None => cmd.error(kind, msg),
    }
}

fn parse_spec(s: &str) -> Result<PortRangeSpec, String> {
    s.parse::<PortRangeSpec>().map_err(|e| e.to_string())
}

/// `completions` and `man`: generated from the clap definitions above.
pub fn generate(command: &Command) -> Option<Result<()>> {
    use clap::CommandFactory as _;
    match command {
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(*shell, &mut cmd, "forwarder", &mut std::io::stdout());
            Some(Ok(()))
        }
        Command::Man { dir } => Some(
            std::fs::create_dir_all(dir)
                .and_then(|()| clap_mangen::generate_to(Cli::command(), dir))
                .with_context(|| format!("writing man pages into {}", dir.display())),
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    /// Parses and validates a command line as `main` does.
    fn parse(args: &[&str]) -> Result<Cli, ErrorKind> {
        let cli = Cli::try_parse_from(args).map_err(|e| e.kind())?;
        validate(&cli).map_err(|e| e.kind())?;
        Ok(cli)
    }

    #[test]
    fn run_needs_exactly_one_child_option() {
        let e = Cli::try_parse_from(["forwarder", "run", "-p", "8080:80"])
            .err()
            .expect("refused");
        let text = e.to_string();
        for opt in [
            "--child-netns",
            "--child-pid",
            "--child-agent",
            "--rootlesskit-state-dir",
        ] {
            assert!(text.contains(opt), "usage names {opt}: {text}");
        }
        assert_eq!(
            parse(&[
                "forwarder",
                "run",
                "--child-pid",
                "1",
                "--child-netns",
                "/x"
            ])
            .err(),
            Some(ErrorKind::ArgumentConflict)
        );
        assert!(parse(&["forwarder", "run", "--child-pid", "1", "-p", "8080:80"]).is_ok());
    }

    #[test]
    fn conflicting_specs_are_refused_before_anything_listens() {
        let run = |specs: &[&str]| {
            let mut a = vec!["forwarder", "run", "--child-pid", "1"];
            for s in specs {
                a.extend(["-p", s]);
            }
            parse(&a).err()
        };
        assert_eq!(
            run(&["8080:80", "8080:81"]),
            Some(ErrorKind::ArgumentConflict)
        );
        assert_eq!(
            run(&["127.0.0.1:8080:80", "8080:81"]),
            Some(ErrorKind::ArgumentConflict)
        );
        assert_eq!(run(&["127.0.0.1:8080:80", "127.0.0.2:8080:80"]), None);
        assert_eq!(run(&["0.0.0.0:8080:80", "[::]:8080:80"]), None);
        // Ranges: every port of an all-or-nothing range counts; a parent
        // range to one child port takes a free one when binding.
        assert_eq!(
            run(&["8000-8010:9000-9010", "127.0.0.1:8010:80"]),
            Some(ErrorKind::ArgumentConflict)
        );
        assert_eq!(run(&["8000-8010:9000-9010", "8011-8012:9000-9001"]), None);
        assert_eq!(run(&["8000:80", "8000-8001:81"]), None);
        assert_eq!(
            run(&["8000-8010:9000-9004"]),
            Some(ErrorKind::ValueValidation)
        );
        // A bad spec is clap's own error, as before.
        assert_eq!(run(&["8080:0"]), Some(ErrorKind::ValueValidation));
    }

    #[test]
    fn refusals_show_the_subcommands_usage() {
        let usage = |args: &[&str]| {
            let cli = Cli::try_parse_from(args).expect("parses");
            validate(&cli).expect_err("refused").to_string()
        };
        let e = usage(&[
            "forwarder",
            "run",
            "--child-pid",
            "1",
            "-p",
            "80:80",
            "-p",
            "80:80",
        ]);
        assert!(e.contains("Usage: forwarder run "), "{e}");
        let e = usage(&[
            "forwarder",
            "attach-docker",
            "--mode",
            "copy",
            "--ebpf-parser",
        ]);
        assert!(e.contains("Usage: forwarder attach-docker "), "{e}");
        let e = usage(&["forwarder", "ports", "ls"]);
        assert!(e.contains("Usage: forwarder ports "), "{e}");
    }

    #[test]
    fn parser_variant_only_with_the_ebpf_engine() {
        let base = ["forwarder", "run", "--child-pid", "1", "-p", "8080:80"];
        for (mode, ok) in [
            ("ebpf", true),
            ("auto", true),
            ("splice", false),
            ("copy", false),
        ] {
            let mut a = base.to_vec();
            a.extend(["--mode", mode, "--ebpf-parser"]);
            assert_eq!(parse(&a).is_ok(), ok, "--mode {mode}");
        }
    }

    #[test]
    fn ports_and_status_need_the_socket_alike() {
        assert_eq!(
            parse(&["forwarder", "ports", "ls"]).err(),
            Some(ErrorKind::MissingRequiredArgument)
        );
        assert_eq!(
            parse(&["forwarder", "status"]).err(),
            Some(ErrorKind::MissingRequiredArgument)
        );
        assert!(parse(&["forwarder", "ports", "ls", "--api-socket", "/s"]).is_ok());
    }

    #[test]
    fn completions_and_man_pages_come_from_the_definitions() {
        use clap::CommandFactory as _;
        let mut out = Vec::new();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut Cli::command(),
            "forwarder",
            &mut out,
        );
        let bash = String::from_utf8_lossy(&out);
        for word in ["attach-docker", "--rootlesskit-state-dir", "--child-pid"] {
            assert!(bash.contains(word), "{word}");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let r = generate(&Command::Man {
            dir: dir.path().to_owned(),
        });
        assert!(matches!(r, Some(Ok(()))));
        let page = std::fs::read_to_string(dir.path().join("forwarder-run.1")).expect("page");
        assert!(page.contains("rootlesskit\\-state\\-dir"), "{page}");
    }
}
