//! `cargo xtask demo`: the forwarder's main job on a built-in default.
//!
//! 1. `setup`, then `cargo build --release -p forwarder`.
//! 2. A throw-away child namespace `fwd-demo-<pid>` with lo up.
//! 3. A small HTTP server inside it on 127.0.0.2:80 and 127.0.0.1:80: this
//!    same binary's hidden `demo-server` subcommand, started with
//!    `ip netns exec NAME <xtask> demo-server`. Each answer names the local
//!    address it was reached at.
//! 4. `forwarder run --child-netns /run/netns/NAME -p 127.0.0.2:8080:80
//!    -p 8081:80` in this namespace; we wait for its `ready` line.
//! 5. One GET through each published port with a plain std client: the
//!    first must reach 127.0.0.2:80 in the child (the ParentIP rule), the
//!    second 127.0.0.1:80.
//! 6. SIGUSR1, and from the `stats` line: the engine that carried them and
//!    the bytes counted. Then SIGTERM; the forwarder must exit 0.
//!
//! The server is killed by its PID and the namespace deleted by `Drop`
//! guards, on error paths too. Exits non-zero if a request failed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use crate::util::{build_forwarder, catch_interrupts, spawn_ready, Forwarder, Netns, Proc};

/// The line the server prints once all its sockets listen.
const SERVER_READY: &str = "demo-server: listening";

/// What the demo requests: the published address and where in the child
/// it must arrive.
const REQUESTS: [(&str, &str); 2] = [
    ("127.0.0.2:8080", "127.0.0.2:80"),
    ("127.0.0.1:8081", "127.0.0.1:80"),
];

/// The demo's HTTP server (`cargo xtask demo-server --bind ADDR...`):
/// answers every request with the address it was reached at, then closes.
pub fn server(binds: &[SocketAddr]) -> Result<()> {
    let listeners = binds
        .iter()
        .map(|a| TcpListener::bind(a).with_context(|| format!("demo-server: binding {a}")))
        .collect::<Result<Vec<_>>>()?;
    println!("{SERVER_READY} on {binds:?}");
    std::io::stdout().flush().context("writing to stdout")?;
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            std::thread::spawn(move || {
                for conn in l.incoming() {
                    match conn {
                        Ok(s) => {
                            std::thread::spawn(move || {
                                if let Err(e) = answer(s) {
                                    eprintln!("demo-server: {e:#}");
                                }
                            });
                        }
                        Err(e) => eprintln!("demo-server: accept: {e}"),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// Reads one request head and answers it.
fn answer(mut s: TcpStream) -> Result<()> {
    let local = s.local_addr().context("local address")?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 65536 {
        match s.read(&mut buf).context("reading the request")? {
            0 => break,
            n => req.extend_from_slice(&buf[..n]),
        }
    }
    let body = format!("hello from the child namespace, reached at {local}\n");
    write!(
        s,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .context("writing the answer")?;
    Ok(())
}

/// One response: its body and the bytes each way.
struct Response {
    body: String,
    sent: usize,
    received: usize,
}

/// GET / over a fresh connection; the answer must be `200` and complete.
fn get(addr: &str) -> Result<Response> {
    let sock: SocketAddr = addr
        .parse()
        .with_context(|| format!("bad address {addr}"))?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let req = format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .with_context(|| format!("sending the request to {addr}"))?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).with_context(|| {
        let what = match resp.is_empty() {
            true => "reading the answer",
            false => "reading the rest of the answer",
        };
        format!("{what} from {addr}")
    })?;
    let text = String::from_utf8_lossy(&resp);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("incomplete answer from {addr}: {text:?}");
    };
    if !head.starts_with("HTTP/1.1 200 ") {
        bail!("unexpected answer from {addr}: {head:?}");
    }
    Ok(Response {
        body: body.trim_end().to_string(),
        sent: req.len(),
        received: resp.len(),
    })
}

/// `cargo xtask demo`: a child namespace with an HTTP server, the
/// forwarder publishing it, a GET through each published port, the
/// forwarder's statistics, then a clean stop.
pub fn run() -> Result<()> {
    crate::setup::run()?;
    catch_interrupts();
    let bin = build_forwarder()?;

    let ns = Netns::named(&format!("fwd-demo-{}", std::process::id()))?;
    println!("child namespace: {}", ns.path().display());
    let server = start_server(&ns)?;
    let mut fwd = start_forwarder(&bin, &ns)?;
    let (failed, sent, received) = send_requests();
    print_stats(&mut fwd, sent, received)?;
    fwd.stop().context("stopping the forwarder")?;
    println!("forwarder stopped cleanly");
    // `server` (killed by PID) and `ns` (deleted) are cleaned up on drop.
    drop(server);
    drop(ns);
    if failed > 0 {
        bail!("{failed} of {} requests failed", REQUESTS.len());
    }
    println!("demo ok");
    Ok(())
}

/// Starts `xtask demo-server` in `ns` on the two child addresses of
/// REQUESTS and waits until it is ready.
fn start_server(ns: &Netns) -> Result<Proc> {
    let me = std::env::current_exe().context("locating the xtask binary")?;
    let mut cmd = ns.ip_exec(&me);
    cmd.args([
        "demo-server",
        "--bind",
        REQUESTS[0].1,
        "--bind",
        REQUESTS[1].1,
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped());
    let server = spawn_ready(&mut cmd, "the demo server", SERVER_READY)?;
    println!(
        "HTTP server in the child on {} and {} (PID {})",
        REQUESTS[0].1,
        REQUESTS[1].1,
        server.pid().unwrap_or(0)
    );
    Ok(server)
}

/// Starts the forwarder publishing 127.0.0.2:8080 and port 8081 to port 80
/// in `ns`, shows its command line and what it said when ready.
fn start_forwarder(bin: &Path, ns: &Netns) -> Result<Forwarder> {
    let args: Vec<String> = [
        "--child-netns",
        &ns.path().display().to_string(),
        "-p",
        "127.0.0.2:8080:80",
        "-p",
        "8081:80",
    ]
    .map(String::from)
    .to_vec();
    println!("$ {} run {}", bin.display(), args.join(" "));
    let fwd = Forwarder::start(bin, &args, false, "the forwarder")?;
    println!(
        "forwarder ready (PID {}): engine {} ({}), listening on {}",
        fwd.pid(),
        fwd.engine(),
        fwd.ready["reason"].as_str().unwrap_or("no reason given"),
        fwd.ready["listeners"]
    );
    Ok(fwd)
}

/// GETs each published address and checks the answer came from the
/// expected child address. Returns (failed requests, bytes sent, bytes
/// received).
fn send_requests() -> (usize, usize, usize) {
    let (mut failed, mut sent, mut received) = (0, 0, 0);
    for (addr, expect) in REQUESTS {
        match get(addr) {
            Ok(r) => {
                println!("GET http://{addr}/ -> {}", r.body);
                sent += r.sent;
                received += r.received;
                if !r.body.ends_with(&format!("reached at {expect}")) {
                    eprintln!("  FAILED: expected to reach {expect} in the child");
                    failed += 1;
                }
            }
            Err(e) => {
                println!("GET http://{addr}/ -> FAILED: {e:#}");
                failed += 1;
            }
        }
    }
    (failed, sent, received)
}

/// Shows what the forwarder says it carried, beside what the client sent
/// and received.
fn print_stats(fwd: &mut Forwarder, sent: usize, received: usize) -> Result<()> {
    let stats = fwd.stats().context("asking the forwarder for statistics")?;
    println!(
        "carried by the {} engine: {} connections ({} active, {} dial failures); \
         {} bytes to the child, {} bytes to the parent (the client sent {sent} and received {received})",
        stats["engine"].as_str().unwrap_or("?"),
        stats["connections"],
        stats["active"],
        stats["dial_failures"],
        stats["bytes_to_child"],
        stats["bytes_to_parent"],
    );
    if let Some(paths) = stats["bytes_by_path"].as_object() {
        let by: Vec<String> = paths.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("bytes by data path: {}", by.join(", "));
    }
    if let Some(maps) = stats.get("bpf_map_entries") {
        println!("BPF map entries: {maps}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_answers_with_its_address() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || answer(l.accept().unwrap().0).unwrap());
        let r = get(&addr.to_string()).unwrap();
        t.join().unwrap();
        assert_eq!(
            r.body,
            format!("hello from the child namespace, reached at {addr}")
        );
        assert!(r.received > r.body.len());
    }
}
