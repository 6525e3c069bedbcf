//! `cargo xtask demo`: the forwarder's main job on a built-in default.
//!
//! Creates a throw-away child namespace, starts a small HTTP server in it on
//! 127.0.0.2:80 and 127.0.0.1:80, runs the forwarder in this namespace
//! publishing `127.0.0.2:8080:80` and `8081:80`, requests through both, and
//! prints the answers, the engine and the bytes counted. Everything it
//! started is stopped and the namespace deleted, also on errors.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use crate::util::{root, run as run_cmd, Guard, Netns};

/// The demo's HTTP server: answers every request with the address it was
/// reached at, then closes.
pub fn server(binds: &[SocketAddr]) -> Result<()> {
    let mut handles = Vec::new();
    for addr in binds {
        let l = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        handles.push(std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
                let mut buf = [0u8; 4096];
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = s.read(&mut buf);
                let body = format!("hello from the child namespace, reached at {local}\n");
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        }));
    }
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

fn get(addr: &str) -> Result<String> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)
        .with_context(|| format!("reading the answer from {addr}"))?;
    if !resp.starts_with("HTTP/1.1 200") {
        bail!("unexpected answer from {addr}: {resp:?}");
    }
    Ok(resp
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .trim()
        .to_string())
}

pub fn run() -> Result<()> {
    crate::setup::run()?;
    let root = root();
    run_cmd(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "forwarder",
    ]))?;
    let ns = Netns::new(&format!("fwd-demo-{}", std::process::id()))?;
    let me = std::env::current_exe().context("locating xtask")?;
    let me = me.to_str().context("non-UTF-8 path")?;
    let mut server = ns.cmd(me);
    server.args([
        "demo-server",
        "--bind",
        "127.0.0.2:80",
        "--bind",
        "127.0.0.1:80",
    ]);
    let _server = Guard(Some(server.spawn().context("starting the demo server")?));

    let mut fwd = Command::new(root.join("target/release/forwarder"));
    fwd.args([
        "run",
        "--child-netns",
        &ns.path(),
        "-p",
        "127.0.0.2:8080:80",
        "-p",
        "8081:80",
    ])
    .stdout(Stdio::piped());
    let mut child = fwd.spawn().context("starting the forwarder")?;
    let stdout = child.stdout.take().context("forwarder stdout")?;
    let mut fwd = Guard(Some(child));
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let event = |name: &str| -> Result<serde_json::Value> {
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(10))
                .with_context(|| format!("no {name} event from the forwarder"))?;
            let v: serde_json::Value = serde_json::from_str(&line)
                .with_context(|| format!("bad line from the forwarder: {line}"))?;
            if v["event"] == name {
                return Ok(v);
            }
        }
    };
    let ready = event("ready")?;
    println!(
        "forwarder ready: engine {} ({}), listening on {}",
        ready["engine"], ready["reason"], ready["listeners"]
    );
    // The server may still be starting: retry briefly.
    let mut answers = Vec::new();
    for addr in ["127.0.0.2:8080", "127.0.0.1:8081"] {
        let mut last = None;
        for _ in 0..50 {
            match get(addr) {
                Ok(a) => {
                    last = Some(Ok(a));
                    break;
                }
                Err(e) => {
                    last = Some(Err(e));
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        let answer = last.context("no attempt")??;
        println!("GET http://{addr}/ -> {answer}");
        answers.push(answer);
    }
    fwd.signal(libc::SIGUSR1);
    let stats = event("stats")?;
    println!(
        "carried by the {} engine: {} connections, {} bytes to the child, {} bytes back; by path: {}",
        stats["engine"],
        stats["connections"],
        stats["bytes_to_child"],
        stats["bytes_to_parent"],
        stats["bytes_by_path"]
    );
    match fwd.stop(5) {
        Some(st) if st.success() => {}
        other => bail!("the forwarder did not stop cleanly: {other:?}"),
    }
    if !answers[0].contains("127.0.0.2:80") || !answers[1].contains("127.0.0.1:80") {
        bail!("answers did not follow the ParentIP rule: {answers:?}");
    }
    println!(
        "demo ok: 127.0.0.2:8080 reached 127.0.0.2:80 in the child, 8081 reached 127.0.0.1:80"
    );
    Ok(())
}
