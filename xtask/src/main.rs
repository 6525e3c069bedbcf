//! `cargo xtask`: the project's tasks. `demo`, `test` and `bench` run
//! `setup` first, so on a fresh machine the README's two commands are the
//! whole set-up.

mod bench;
mod demo;
mod setup;
mod test;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "forwarder's project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what is missing (Debian packages, rust-src, bpf-linker).
    Setup,
    /// Run the forwarder on a built-in default: a demo namespace and server.
    Demo,
    /// Build everything and run the whole suite (unit and netns tests).
    Test {
        /// Extra arguments for the test binaries (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Throughput against direct loopback, per engine, interleaved.
    Bench(bench::Args),
    /// The demo's HTTP server (runs inside the demo namespace).
    #[command(hide = true)]
    DemoServer {
        #[arg(long = "bind", required = true)]
        binds: Vec<std::net::SocketAddr>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::Demo => demo::run(),
        Command::Test { args } => test::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::DemoServer { binds } => demo::server(&binds),
    }
}
