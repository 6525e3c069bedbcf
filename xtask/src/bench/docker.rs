//! The bench's *rootless Docker* workload: the comparison a Docker user
//! would make. One container, published by RootlessKit's builtin port
//! driver and by forwarder (each engine), measured the same way in one run.
//!
//! Method:
//! - rootless dockerd as the unprivileged test user, set up exactly as the
//!   end-to-end suite does (`crate::e2e`: Debian's `dockerd-rootless.sh`,
//!   slirp4netns, vfs storage, the busybox image with the static echo
//!   server); first with `DOCKERD_ROOTLESS_ROOTLESSKIT_PORT_DRIVER=builtin`
//!   (RootlessKit's own driver), then with `none` and `forwarder
//!   attach-docker --mode ENGINE` for each engine in turn (as the test user
//!   with CAP_BPF + CAP_NET_ADMIN as ambient capabilities, as
//!   `contrib/systemd` advises for the ebpf engine);
//! - for each system the same container is started with `docker run -p
//!   127.0.0.1:P:80 -p 127.0.0.1:Q:7` (busybox `httpd` serving the suite's
//!   1 GiB file, the echo server on 7) and removed afterwards;
//! - *download*: one HTTP GET of the 1 GiB file over loopback, the client
//!   in this namespace (busybox httpd sends with sendfile): Gbit/s;
//! - *rate*: connect, 1-byte request/response, close against the echo
//!   server with 1 and 32 concurrent clients (`load::conn_rate`);
//! - repeated `reps` times per system, systems one after the other (dockerd
//!   is restarted between RootlessKit's driver and forwarder's, so the
//!   systems cannot be interleaved as in the other workloads).
//!
//! Skipped, with the reason printed and reported, where rootless Docker
//! cannot run (`e2e::unavailable`) or fails to start.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};

use super::{free_ports, median, Plan, CLIENTS, ENGINES};
use crate::e2e::{self, Dockerd, Env, Fwd};
use crate::load;

/// The container's name while a system is measured.
const NAME: &str = "fwd-bench";
/// The echo server's port in the container.
const ECHO: u16 = 7;

/// One system's runs.
#[derive(Debug, Default, serde::Serialize)]
pub struct Row {
    /// "rootlesskit" or an engine (`--mode`).
    pub name: String,
    pub label: String,
    /// The engine the forwarder reported (auto's pick).
    pub engine: Option<String>,
    /// Download Gbit/s per repetition.
    pub gbit: Vec<f64>,
    /// Connections per second per repetition, by concurrent clients.
    pub conn_per_s: BTreeMap<usize, Vec<f64>>,
    /// Why the system has no (or not all) figures.
    pub failed: Option<String>,
}

/// The workload's outcome.
#[derive(Debug, Default, serde::Serialize)]
pub struct DockerResults {
    /// Why the workload did not run at all.
    pub skipped: Option<String>,
    pub rows: Vec<Row>,
    pub download_bytes: u64,
}

/// Runs the workload; never fails the bench: problems become `skipped` or
/// a row's `failed`.
pub fn run(plan: &Plan, bin: &Path) -> DockerResults {
    let mut res = DockerResults::default();
    if let Some(why) = e2e::unavailable() {
        eprintln!("bench: rootless Docker not run: {why}");
        res.skipped = Some(why);
        return res;
    }
    let env = match e2e::prepare(false) {
        Ok(e) => e,
        Err(e) => {
            let why = format!("set-up failed: {e:#}");
            eprintln!("bench: rootless Docker not run: {why}");
            res.skipped = Some(why);
            return res;
        }
    };
    res.download_bytes = std::fs::metadata(env.www.join("big")).map_or(0, |m| m.len());
    // RootlessKit's builtin driver.
    let mut row = Row {
        name: "rootlesskit".into(),
        label: "RootlessKit builtin port driver (Docker's default)".into(),
        ..Row::default()
    };
    match Dockerd::start(&env, "builtin") {
        Ok(mut d) => {
            if let Err(e) = e2e::ensure_image(&env).and_then(|()| measure(plan, &env, &mut row)) {
                row.failed = Some(format!("{e:#}"));
            }
            let _ = d.stop();
        }
        Err(e) => row.failed = Some(format!("dockerd did not start: {e:#}")),
    }
    report_row(&row);
    res.rows.push(row);
    // forwarder, each engine, beside one dockerd without a port driver.
    let mut dockerd = match Dockerd::start(&env, "none") {
        Ok(d) => Some(d),
        Err(e) => {
            let why = format!("dockerd (port driver none) did not start: {e:#}");
            for mode in ENGINES {
                res.rows.push(Row {
                    name: mode.into(),
                    label: format!("forwarder `--mode {mode}`"),
                    failed: Some(why.clone()),
                    ..Row::default()
                });
            }
            None
        }
    };
    if dockerd.is_some() {
        for mode in ENGINES {
            let mut row = Row {
                name: mode.into(),
                label: format!("forwarder `--mode {mode}`"),
                ..Row::default()
            };
            let r = e2e::ensure_image(&env).and_then(|()| {
                let mut fwd = Fwd::start(&env, bin, Some("+bpf,+net_admin"), &["--mode", mode])?;
                let engine = fwd.ready["engine"].as_str().unwrap_or("?").to_string();
                if mode == "auto" {
                    row.label = format!("forwarder `--mode auto` (picked {engine})");
                }
                row.engine = Some(engine);
                let r = measure(plan, &env, &mut row);
                let _ = fwd.proc.stop(libc::SIGTERM, Duration::from_secs(10));
                r
            });
            if let Err(e) = r {
                row.failed = Some(format!("{e:#}"));
            }
            report_row(&row);
            res.rows.push(row);
        }
    }
    if let Some(d) = dockerd.as_mut() {
        let _ = d.stop();
    }
    res
}

fn report_row(row: &Row) {
    let rates = row
        .conn_per_s
        .iter()
        .map(|(c, v)| format!("{:.0} conn/s with {c}", median(v)))
        .collect::<Vec<_>>()
        .join(", ");
    eprintln!(
        "bench: docker {:12} {:.2} Gbit/s, {rates}{}",
        row.name,
        median(&row.gbit),
        row.failed
            .as_deref()
            .map(|f| format!(" (failed: {f})"))
            .unwrap_or_default()
    );
}

/// Starts the container, runs the repetitions into `row`, removes it.
fn measure(plan: &Plan, env: &Env, row: &mut Row) -> Result<()> {
    let ports = free_ports(2)?;
    let (http, echo) = (ports[0], ports[1]);
    let _ = env.docker(&["rm", "-f", NAME]);
    let p_http = format!("127.0.0.1:{http}:80");
    let p_echo = format!("127.0.0.1:{echo}:{ECHO}");
    let mount = format!("{}:/www:ro", env.www.display());
    let script = format!("/bin/echo-server {ECHO} & exec /bin/busybox httpd -f -p 80 -h /www");
    env.docker(&[
        "run",
        "-d",
        "--name",
        NAME,
        "-p",
        &p_http,
        "-p",
        &p_echo,
        "-v",
        &mount,
        e2e::IMAGE,
        "/bin/busybox",
        "sh",
        "-c",
        &script,
    ])?;
    let http_addr = SocketAddr::from(([127, 0, 0, 1], http));
    let echo_addr = SocketAddr::from(([127, 0, 0, 1], echo));
    let r = (|| -> Result<()> {
        e2e::within(
            Duration::from_secs(15),
            "the published ports to answer",
            || {
                download(http_addr, "/index.html")?;
                let mut s = TcpStream::connect_timeout(&echo_addr, Duration::from_secs(2))?;
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                s.write_all(b"x")?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b)?;
                Ok(())
            },
        )?;
        let dur = Duration::from_secs(plan.rate_secs);
        for rep in 1..=plan.reps {
            let (n, secs) = download(http_addr, "/big")?;
            let gbit = (n * 8) as f64 / secs / 1e9;
            eprintln!(
                "bench: rep {rep}/{} docker download {:12} {gbit:6.2} Gbit/s",
                plan.reps, row.name
            );
            row.gbit.push(gbit);
            for clients in CLIENTS {
                let c =
                    load::in_netns(None, move || load::conn_rate(echo_addr, None, clients, dur))?;
                ensure!(
                    c.completed > 0,
                    "no connection completed with {clients} clients: {}",
                    c.first_error.unwrap_or_default()
                );
                let rate = c.completed as f64 / c.secs;
                eprintln!(
                    "bench: rep {rep}/{} docker connect {clients:2} clients {:12} {rate:8.0} conn/s, {} failed",
                    plan.reps, row.name, c.failed
                );
                row.conn_per_s.entry(clients).or_default().push(rate);
            }
        }
        Ok(())
    })();
    let _ = env.docker(&["rm", "-f", NAME]);
    r
}

/// One HTTP/1.0 GET: the body's length and the seconds from connect to
/// the last byte. No checksum (the end-to-end suite checks one): hashing
/// would be the bottleneck.
fn download(addr: SocketAddr, path: &str) -> Result<(u64, f64)> {
    let t = Instant::now();
    let n = crate::util::http_get(addr, "bench", path, |_| {})?;
    Ok((n, t.elapsed().as_secs_f64()))
}
