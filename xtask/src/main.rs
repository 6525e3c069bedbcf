//! `cargo xtask`: the project's tasks (the alias lives in
//! `.cargo/config.toml`). `demo`, `test` and `bench` run `setup` first, so
//! on a fresh machine `cargo xtask demo` and `cargo xtask test` are the
//! whole set-up. Everything runs as root (network namespaces, BPF).
//!
//! When a command that a task runs fails, xtask exits with that command's
//! exit code (so `cargo xtask test` fails the way `cargo test` did);
//! other errors exit 1.

mod bench;
mod chart;
mod demo;
mod e2e;
mod fuzz;
mod install;
mod kernel;
mod links;
mod load;
mod peers;
mod setup;
mod soak;
mod test;
mod util;
mod vmtest;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "forwarder's project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing (Debian packages, rust-src, bpf-linker).
    Setup,
    /// Run the forwarder on a built-in default: a demo namespace and server.
    Demo,
    /// Check the docs' links, build everything in release mode and run the
    /// whole suite, then the fuzz targets (20 s each).
    Test {
        /// Leave out the fuzzing stage (also left out when arguments pick
        /// tests).
        #[arg(long)]
        no_fuzz: bool,
        /// Arguments for the test binaries, after `--` (e.g. `--
        /// --test-threads 2`); before a second `--`, for `cargo test`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Check that every relative link in the Markdown files resolves (the
    /// file, and the heading a #anchor names).
    Links,
    /// Build the forwarder and install it with its man pages
    /// (PREFIX/bin/forwarder, PREFIX/share/man/man1; PREFIX /usr/local).
    Install(install::Args),
    /// Run the fuzz targets (cargo-fuzz, nightly) for a bounded time.
    Fuzz(fuzz::Args),
    /// The soak test alone, for longer: 2,000 connections of mixed traffic
    /// through each engine, leak checks at every checkpoint.
    Soak(soak::Args),
    /// Rootless Docker publishes through forwarder, end to end.
    E2e,
    /// Throughput, latency, connection rate: direct, engines and peers.
    Bench(bench::Args),
    /// The engine suite on Debian's 6.1 and 6.12 kernels, booted with
    /// virtme-ng under QEMU; writes a kernel x engine x case report.
    VmTest(vmtest::Args),
    /// The kernel patches of contrib/kernel/: builds Linux 6.12 without
    /// and with them, boots both and runs the local-client path's
    /// application suite in each; writes the before/after table.
    Kernel(kernel::Args),
    /// UDP: flood and echo rates, direct, forwarder, RootlessKit, pasta.
    BenchUdp(bench::udp::UdpArgs),
    /// The demo's HTTP server (runs inside the demo namespace).
    #[command(hide = true)]
    DemoServer {
        #[arg(long = "bind", required = true)]
        binds: Vec<std::net::SocketAddr>,
    },
    /// The bench's echo server (runs inside the bench namespace).
    #[command(hide = true)]
    BenchEcho {
        #[arg(long)]
        bind: std::net::SocketAddr,
    },
}

fn run(task: Task) -> Result<()> {
    match task {
        Task::Setup => setup::run(),
        Task::Demo => demo::run(),
        Task::Test { no_fuzz, args } => test::run(&args, !no_fuzz),
        Task::Links => links::run(),
        Task::Install(args) => install::run(&args),
        Task::Fuzz(args) => {
            setup::run()?;
            fuzz::run(&args)
        }
        Task::Soak(args) => soak::run(&args),
        Task::Bench(args) => bench::run(&args),
        Task::VmTest(args) => vmtest::run(&args),
        Task::Kernel(args) => kernel::run(&args),
        Task::E2e => e2e::run(),
        Task::BenchUdp(args) => bench::udp::run(&args),
        Task::DemoServer { binds } => demo::server(&binds),
        Task::BenchEcho { bind } => load::echo_server(bind),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            let code = e
                .chain()
                .find_map(|c| c.downcast_ref::<util::CommandFailed>())
                .map_or(1, util::CommandFailed::exit_code);
            ExitCode::from(u8::try_from(code).ok().filter(|&c| c != 0).unwrap_or(1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_args_after_double_dash_are_kept_whole() {
        let cli = Cli::try_parse_from([
            "xtask",
            "test",
            "--",
            "--test",
            "engines",
            "--",
            "--test-threads",
            "1",
        ])
        .unwrap();
        let Task::Test { args, .. } = cli.command else {
            panic!("not the test task");
        };
        assert_eq!(args, ["--test", "engines", "--", "--test-threads", "1"]);
    }
}
