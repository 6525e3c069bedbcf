//! `forwarder status` and `forwarder ports add|ls|rm`: a small client of
//! the API for people who do not have rootlessctl.

use std::path::Path;

use anyhow::{bail, Context as _, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use crate::wire::spec::{ApiSpec, Expansion, PortRangeSpec, PortSpec};
use crate::wire::{ErrorBody, PortStatus, Stats};

/// One HTTP/1.1 request over the API socket.
async fn request(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<String>,
) -> Result<(StatusCode, Bytes)> {
    let stream = UnixStream::connect(socket)
        .await
        .with_context(|| format!("cannot connect to the API socket {}", socket.display()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake with the API socket")?;
    let driver = tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "forwarder");
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .context("building the request")?;
    let resp = sender
        .send_request(req)
        .await
        .context("sending the request")?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .context("reading the response")?
        .to_bytes();
    driver.abort();
    Ok((status, bytes))
}

/// Turns a non-2xx reply into an error carrying the API's message.
fn check(status: StatusCode, body: &Bytes) -> Result<()> {
    if status.is_success() {
        return Ok(());
    }
    let msg = serde_json::from_slice::<ErrorBody>(body)
        .map(|e| e.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned());
    bail!("{status}: {msg}")
}

/// `GET /v1/info` of any RootlessKit-compatible API socket.
pub(crate) async fn info(socket: &Path) -> Result<serde_json::Value> {
    let (status, bytes) = request(socket, Method::GET, "/v1/info", None).await?;
    check(status, &bytes)?;
    serde_json::from_slice(&bytes).context("decoding the reply")
}

/// [`info`] for callers outside a runtime (start-up): runs it on a
/// short-lived thread of its own, with a 5 s limit.
pub fn info_blocking(socket: &Path) -> Result<serde_json::Value> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting a runtime")?;
            rt.block_on(async {
                tokio::time::timeout(std::time::Duration::from_secs(5), info(socket))
                    .await
                    .context("no answer within 5 s")?
            })
        })
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the request thread panicked")))
    })
}

/// `POST /v1/ports` of one spec: the new ID, or the API's refusal (the
/// outer error is a failure to ask at all).
async fn post(socket: &Path, spec: &PortSpec) -> Result<Result<u32>> {
    let body = serde_json::to_string(&ApiSpec::from(spec))?;
    let (status, bytes) = request(socket, Method::POST, "/v1/ports", Some(body)).await?;
    Ok(check(status, &bytes).and_then(|()| {
        let st: PortStatus = serde_json::from_slice(&bytes).context("decoding the reply")?;
        Ok(st.id)
    }))
}

/// Publishes one `-p` spec through the API, one port per request, pushing
/// each new ID to `added`: every port of a range, or the first port of a
/// parent range that the forwarder accepts (a refusal moves on to the next;
/// stderr says which port was taken).
async fn add_range(socket: &Path, range: &PortRangeSpec, added: &mut Vec<u32>) -> Result<()> {
    match range.expand() {
        Expansion::All(specs) => {
            for spec in specs {
                let id = post(socket, &spec)
                    .await
                    .and_then(|r| r)
                    .with_context(|| format!("adding {spec}"))?;
                added.push(id);
            }
            Ok(())
        }
        Expansion::FirstFree(specs) => {
            let mut last = None;
            for spec in specs {
                match post(socket, &spec).await? {
                    Ok(id) => {
                        eprintln!(
                            "{range}: published {spec} (port {}, the first free port of the range)",
                            spec.parent_port
                        );
                        added.push(id);
                        return Ok(());
                    }
                    Err(e) => last = Some(e.context(format!("adding {spec}"))),
                }
            }
            let e = last.unwrap_or_else(|| anyhow::anyhow!("the range is empty"));
            Err(e.context("no port of the range could be published"))
        }
    }
}

/// `forwarder ports add SPEC...`: all or nothing. If one spec (or one port
/// of a range) is refused, the ports this call already added are removed
/// again before the error is reported, and no ID is printed.
pub async fn add(socket: &Path, specs: &[PortRangeSpec]) -> Result<()> {
    let mut added: Vec<u32> = Vec::new();
    for range in specs {
        if let Err(e) = add_range(socket, range, &mut added).await {
            let mut undone = Vec::new();
            for id in added.iter().rev() {
                let path = format!("/v1/ports/{id}");
                if let Ok((st, b)) = request(socket, Method::DELETE, &path, None).await {
                    if check(st, &b).is_ok() {
                        undone.push(*id);
                    }
                }
            }
            let note = match (added.len(), undone.len()) {
                (0, _) => String::new(),
                (a, u) if a == u => {
                    format!(" (the {a} port(s) added before it were removed again)")
                }
                (a, u) => format!(
                    " ({a} port(s) were added before it; only {u} could be removed again: \
                     check `forwarder ports ls`)"
                ),
            };
            return Err(e.context(format!("adding {range}{note}")));
        }
    }
    for id in added {
        println!("{id}");
    }
    Ok(())
}

/// `forwarder ports ls`
pub async fn list(socket: &Path, as_json: bool) -> Result<()> {
    let (status, bytes) = request(socket, Method::GET, "/v1/ports", None).await?;
    check(status, &bytes)?;
    if as_json {
        println!("{}", String::from_utf8_lossy(&bytes));
        return Ok(());
    }
    let ports: Vec<PortStatus> = serde_json::from_slice(&bytes).context("decoding the reply")?;
    println!(
        "{:<4} {:<6} {:<24} {:<11} {:<24} {:<10}",
        "ID", "PROTO", "PARENTIP", "PARENTPORT", "CHILDIP", "CHILDPORT"
    );
    for p in ports {
        println!(
            "{:<4} {:<6} {:<24} {:<11} {:<24} {:<10}",
            p.id,
            p.spec.proto,
            p.spec.parent_ip,
            p.spec.parent_port,
            p.spec.child_ip,
            p.spec.child_port
        );
    }
    Ok(())
}

/// `forwarder ports rm ID...`
pub async fn remove(socket: &Path, ids: &[u32]) -> Result<()> {
    for id in ids {
        let (status, bytes) =
            request(socket, Method::DELETE, &format!("/v1/ports/{id}"), None).await?;
        check(status, &bytes).with_context(|| format!("removing port {id}"))?;
        println!("{id}");
    }
    Ok(())
}

/// Formats a byte count for people.
fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `forwarder status`
pub async fn status(socket: &Path) -> Result<()> {
    let (status, bytes) = request(socket, Method::GET, "/v1/stats", None).await?;
    check(status, &bytes)?;
    let st: Stats = serde_json::from_slice(&bytes).context("decoding the reply")?;
    println!("engine: {}", st.engine);
    if let Some(m) = st.shared.bpf_map_entries {
        println!(
            "bpf maps: {} sockets, {} targets, {} peers",
            m.sockets, m.targets, m.peers
        );
    }
    if let Some(l) = st.shared.local_path {
        println!(
            "local-client path: {} clients, {} servers admitted, {} refused, {} redirects failed",
            l.clients, l.servers, l.refused, l.redirect_failed
        );
    }
    println!(
        "{:<6} {:<30} {:>7} {:>8} {:>10} {:>12} {:>12}",
        "ID", "SPEC", "ACTIVE", "TOTAL", "DIALFAIL", "TO-CHILD", "TO-PARENT"
    );
    let row = |id: &str, spec: &str, s: &crate::wire::Snapshot| {
        println!(
            "{:<6} {:<30} {:>7} {:>8} {:>10} {:>12} {:>12}",
            id,
            spec,
            s.active,
            s.connections,
            s.dial_failures,
            human(s.bytes_to_child),
            human(s.bytes_to_parent)
        )
    };
    for p in &st.ports {
        row(&p.id.to_string(), &p.spec, &p.stats);
    }
    // The total also counts ports removed since the start.
    row("total", "(incl. removed ports)", &st.total);
    print_udp(&st);
    let b = st.total.bytes_by_path;
    println!(
        "bytes by path: msg {}, bpf {}, splice {}, copy {}",
        human(b.msg),
        human(b.bpf),
        human(b.splice),
        human(b.copy)
    );
    Ok(())
}

/// `forwarder status`'s UDP table and drop counts, for UDP ports only.
fn print_udp(st: &Stats) {
    let udp: Vec<_> = st
        .ports
        .iter()
        .filter_map(|p| p.udp.map(|u| (p.id.to_string(), u)))
        .collect();
    if !udp.is_empty() {
        println!(
            "{:<6} {:>7} {:>8} {:>12} {:>12} {:>12} {:>12} {:>9}",
            "UDP",
            "FLOWS",
            "EVICTED",
            "DGRAMS-IN",
            "DGRAMS-OUT",
            "TO-CHILD",
            "TO-PARENT",
            "DROPPED"
        );
        for (id, u) in udp
            .iter()
            .chain(std::iter::once(&("total".to_string(), st.shared.udp)))
        {
            println!(
                "{:<6} {:>7} {:>8} {:>12} {:>12} {:>12} {:>12} {:>9}",
                id,
                u.flows,
                u.evictions,
                u.datagrams_to_child,
                u.datagrams_to_parent,
                human(u.bytes_to_child),
                human(u.bytes_to_parent),
                u.drops.total()
            );
        }
        let d = st.shared.udp.drops;
        if d.total() > 0 {
            println!(
                "udp drops: rx queue {}, child rx queue {}, oversize {}, send error {}, \
                 unreachable {}, evicted {}, expired {}, dial failed {}, dial backlog {}, no slot {}",
                d.rx_queue_overflow,
                d.child_rx_queue_overflow,
                d.oversize,
                d.send_error,
                d.unreachable,
                d.evicted,
                d.expired,
                d.dial_failed,
                d.dial_backlog,
                d.no_slot
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn human_sizes() {
        assert_eq!(super::human(0), "0 B");
        assert_eq!(super::human(1536), "1.5 KiB");
        assert_eq!(super::human(3 << 30), "3.0 GiB");
    }
}
