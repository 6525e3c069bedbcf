//! UDP ports in namespaces: echo over both families, many flows, the
//! largest datagrams, the dial rules, idle expiry, the flow cap, a burst
//! whose every lost datagram must be accounted for, the port API, and the
//! `--max-connections` budget UDP flows share with TCP connections, as
//! root and as an unprivileged user dialing through the child-side agent.

use std::collections::HashSet;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use forwarder_tests::udp::{self, bind_in, client_in, Sink};
use forwarder_tests::{
    echo_roundtrip, limit, servers, test_user, wait_until, wait_until_async, within, Fwd, Pair,
    Privilege,
};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::net::UdpSocket;

fn start(pair: &Pair, extra: &[&str], specs: &[&str]) -> Fwd {
    let mut args: Vec<&str> = extra.to_vec();
    for s in specs {
        args.push("-p");
        args.push(s);
    }
    let f = Fwd::start(pair, &args);
    if pair.privilege != Privilege::Root {
        let needle = "dialing through a child-side agent";
        let err = f.wait_stderr(needle, Duration::from_secs(5));
        assert!(err.contains(needle), "{err}");
    }
    f
}

/// Sends `msg` and waits for its reply. No retry: a datagram that arrives
/// while its flow dials waits for the dial, so none may be lost here.
async fn ask(c: &UdpSocket, msg: &[u8]) -> Vec<u8> {
    c.send(msg).await.expect("send");
    ask_reply(c).await
}

/// Waits for the reply to a datagram sent already.
async fn ask_reply(c: &UdpSocket) -> Vec<u8> {
    let mut buf = vec![0u8; 65_536];
    let n = within(5, "a reply", c.recv(&mut buf)).await.expect("recv");
    buf.truncate(n);
    buf
}

/// The UDP counters of the port publishing `spec`, from a stats line.
fn port_udp(st: &Value, spec: &str) -> Value {
    st["ports"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["spec"] == spec))
        .map(|p| p["udp"].clone())
        .unwrap_or_else(|| panic!("no port {spec} in {st}"))
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

pub async fn echo_both_families(privilege: Privilege) {
    let pair = Pair::with(privilege);
    udp::echo(bind_in(&pair.child, "127.0.0.1:53", None));
    udp::echo(bind_in(&pair.child, "[::1]:53", None));
    let mut f = start(
        &pair,
        &[],
        &["127.0.0.1:5353:53/udp", "[::1]:5353:53/udp6", "5354:53/udp"],
    );
    within(30, "echo", async {
        for to in [
            "127.0.0.1:5353",
            "[::1]:5353",
            "127.0.0.1:5354",
            "[::1]:5354",
        ] {
            let c = client_in(&pair.parent, to);
            for k in 0..3 {
                let msg = format!("hello {to} #{k}");
                assert_eq!(ask(&c, msg.as_bytes()).await, msg.as_bytes(), "{to}");
            }
            // Empty datagrams are datagrams too.
            assert_eq!(ask(&c, b"").await, b"", "{to}");
        }
        // An unspecified-address listener answers from the address the
        // client wrote to: the connected client accepts nothing else.
        let c = client_in(&pair.parent, "127.0.0.2:5354");
        assert_eq!(ask(&c, b"to 127.0.0.2").await, b"to 127.0.0.2");
    })
    .await;
    let st = settled(&mut f);
    f.stop();
    let u = port_udp(&st, "5354:53/udp");
    assert_eq!(n(&u["flows_total"]), 3, "{st}");
    assert_eq!(n(&u["datagrams_to_child"]), 9, "{st}");
    assert_eq!(n(&u["datagrams_to_parent"]), 9, "{st}");
    assert_eq!(n(&u["drops"]["send_error"]), 0, "{st}");
}

pub async fn thousand_flows(privilege: Privilege) {
    let pair = Pair::with(privilege);
    udp::echo(bind_in(&pair.child, "127.0.0.1:53", Some(8 << 20)));
    let mut f = start(&pair, &[], &["127.0.0.1:5353:53/udp"]);
    const FLOWS: usize = 1000;
    let clients: Vec<UdpSocket> = (0..FLOWS)
        .map(|_| client_in(&pair.parent, "127.0.0.1:5353"))
        .collect();
    within(60, "1000 flows", async {
        // Every flow sends at once, then every flow reads its own reply.
        for (i, c) in clients.iter().enumerate() {
            c.send(format!("flow {i} payload {}", "x".repeat(i % 200)).as_bytes())
                .await
                .expect("send");
        }
        let mut tasks = Vec::new();
        for (i, c) in clients.into_iter().enumerate() {
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                let k = tokio::time::timeout(Duration::from_secs(20), c.recv(&mut buf))
                    .await
                    .unwrap_or_else(|_| panic!("flow {i}: no reply"))
                    .expect("recv");
                let want = format!("flow {i} payload {}", "x".repeat(i % 200));
                assert_eq!(
                    String::from_utf8_lossy(&buf[..k]),
                    want,
                    "flow {i} got another flow's reply"
                );
            }));
        }
        for t in tasks {
            t.await.expect("flow task");
        }
    })
    .await;
    let st = settled(&mut f);
    f.stop();
    let u = port_udp(&st, "127.0.0.1:5353:53/udp");
    assert_eq!(n(&u["flows_total"]), FLOWS as u64, "{st}");
    assert_eq!(n(&u["datagrams_to_parent"]), FLOWS as u64, "{st}");
}

pub async fn largest_datagrams(privilege: Privilege) {
    let pair = Pair::with(privilege);
    udp::echo(bind_in(&pair.child, "127.0.0.1:53", Some(1 << 20)));
    udp::echo(bind_in(&pair.child, "[::1]:53", Some(1 << 20)));
    let mut f = start(&pair, &[], &["127.0.0.1:5353:53/udp", "[::1]:5353:53/udp"]);
    within(30, "largest datagrams", async {
        for (to, max) in [("127.0.0.1:5353", 65_507usize), ("[::1]:5353", 65_527)] {
            let c = client_in(&pair.parent, to);
            udp::force_rcvbuf(&c, 1 << 20);
            for len in [max, max - 1, 1, max] {
                let msg: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
                let got = ask(&c, &msg).await;
                assert_eq!(got.len(), len, "{to}: datagram of {len} bytes");
                assert!(got == msg, "{to}: {len} bytes came back altered");
            }
            // One byte more cannot even be sent over this family.
            let e = c.send(&vec![0u8; max + 1]).await.expect_err("too large");
            assert_eq!(e.raw_os_error(), Some(libc::EMSGSIZE));
        }
    })
    .await;
    let st = settled(&mut f);
    f.stop();
    for spec in ["127.0.0.1:5353:53/udp", "[::1]:5353:53/udp"] {
        let u = port_udp(&st, spec);
        assert_eq!(n(&u["drops"]["oversize"]), 0, "{st}");
        assert_eq!(n(&u["datagrams_to_parent"]), 4, "{st}");
    }
}

pub async fn parent_ip_rule(privilege: Privilege) {
    let pair = Pair::with(privilege);
    udp::whoami(bind_in(&pair.child, "127.0.0.1:53", None), "one");
    udp::whoami(bind_in(&pair.child, "127.0.0.2:53", None), "two");
    let f = start(
        &pair,
        &[],
        &[
            "127.0.0.2:5353:53/udp",
            "127.0.0.1:5354:127.0.0.2:53/udp",
            "127.0.0.1:5355:53/udp",
        ],
    );
    within(30, "dial rules", async {
        for (to, tag) in [
            // ParentIP: 127.0.0.2 is dialed as is.
            ("127.0.0.2:5353", "two:"),
            // CHILDIP wins.
            ("127.0.0.1:5354", "two:"),
            // Otherwise 127.0.0.1.
            ("127.0.0.1:5355", "one:"),
        ] {
            let c = client_in(&pair.parent, to);
            let got = String::from_utf8(ask(&c, b"who").await).expect("utf8");
            assert!(got.starts_with(tag), "{to}: {got} (want {tag}...)");
        }
    })
    .await;
    f.stop();
}

pub async fn ipv6_fallback(privilege: Privilege) {
    let pair = Pair::with(privilege);
    pair.child.disable_ipv6();
    udp::echo(bind_in(&pair.child, "127.0.0.1:53", None));
    let mut f = start(&pair, &[], &["[::1]:5353:53/udp", "[::]:5354:53/udp"]);
    within(30, "IPv6 -> IPv4 fallback", async {
        for to in ["[::1]:5353", "[::1]:5354"] {
            let c = client_in(&pair.parent, to);
            assert_eq!(ask(&c, b"over IPv4").await, b"over IPv4", "{to}");
        }
    })
    .await;
    let st = settled(&mut f);
    f.stop();
    assert_eq!(
        n(&port_udp(&st, "[::1]:5353:53/udp")["dial_failures"]),
        0,
        "{st}"
    );
}

/// The forwarder's stats once its UDP counters stopped moving. The relay
/// counts a datagram after the send that delivered it returns, so a client
/// can hold its reply a moment before the counter shows it.
fn settled(f: &mut Fwd) -> Value {
    // The counters as last read, and since when they have read so.
    let mut last: Option<(Value, Instant)> = None;
    wait_until(
        limit(Duration::from_secs(5)),
        "the UDP counters to stay still for 50 ms",
        || {
            let st = f.stats();
            match &last {
                Some((before, since)) if before["udp"] == st["udp"] => {
                    if since.elapsed() >= Duration::from_millis(50) {
                        return Ok(st);
                    }
                }
                _ => last = Some((st.clone(), Instant::now())),
            }
            Err(st)
        },
    )
}

/// Polls the forwarder's stats until `ok` holds for the port, or panics.
fn wait_udp(f: &mut Fwd, spec: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    wait_until(limit(Duration::from_secs(10)), what, || {
        let st = f.stats();
        let u = port_udp(&st, spec);
        if ok(&u) {
            Ok(u)
        } else {
            Err(format!("{st}\n{}", f.stderr()))
        }
    })
}

pub async fn idle_expiry(privilege: Privilege) {
    let pair = Pair::with(privilege);
    udp::whoami(bind_in(&pair.child, "127.0.0.1:53", None), "s");
    let spec = "127.0.0.1:5353:53/udp";
    let mut f = start(&pair, &["--udp-idle-timeout", "2"], &[spec]);
    let base = f.fd_count();
    let c = client_in(&pair.parent, "127.0.0.1:5353");
    let first = within(10, "first", ask(&c, b"1")).await;
    let again = within(10, "again", ask(&c, b"2")).await;
    assert_eq!(first, again, "a live flow keeps its socket in the child");
    let u = wait_udp(&mut f, spec, "one live flow", |u| u["flows"] == 1);
    assert_eq!(u["expirations"], 0);
    // The flow's socket (and whatever the first dial set up lazily).
    let with_flow = f.fd_count();
    assert!(
        with_flow > base,
        "no socket for the flow: {with_flow} <= {base}"
    );
    // Idle for longer than the timeout: the flow and its socket are gone.
    wait_udp(&mut f, spec, "the flow expires", |u| {
        u["flows"] == 0 && u["expirations"] == 1
    });
    assert_eq!(
        f.fd_count(),
        with_flow - 1,
        "the flow's socket was not closed"
    );
    // The next datagram makes a new flow with a new socket in the child.
    let later = within(10, "after expiry", ask(&c, b"3")).await;
    assert_ne!(first, later, "the expired flow's socket was reused");
    f.stop();
}

pub async fn flow_cap(privilege: Privilege) {
    let pair = Pair::with(privilege);
    udp::whoami(bind_in(&pair.child, "127.0.0.1:53", None), "s");
    let spec = "127.0.0.1:5353:53/udp";
    let mut f = start(&pair, &["--udp-max-flows", "3"], &[spec]);
    let c: Vec<UdpSocket> = (0..4)
        .map(|_| client_in(&pair.parent, "127.0.0.1:5353"))
        .collect();
    let mut seen = Vec::new();
    within(30, "flow cap", async {
        // Flows 0, 1, 2; then 0 is used again, so 1 is the least recently
        // active when flow 3 arrives and is the one evicted.
        for sock in &c[..3] {
            seen.push(ask(sock, b"x").await);
        }
        assert_eq!(ask(&c[0], b"x").await, seen[0]);
        seen.push(ask(&c[3], b"x").await);
        assert_eq!(ask(&c[2], b"x").await, seen[2], "flow 2 was evicted");
        assert_eq!(ask(&c[0], b"x").await, seen[0], "flow 0 was evicted");
        assert_eq!(ask(&c[3], b"x").await, seen[3], "flow 3 was evicted");
        // Flow 1 was evicted: it comes back with a new child socket (and
        // evicts flow 2, now the least recently active).
        let back = ask(&c[1], b"x").await;
        assert_ne!(back, seen[1], "flow 1 kept its socket past the cap");
        assert_ne!(ask(&c[2], b"x").await, seen[2], "flow 2 was not evicted");
    })
    .await;
    let distinct: HashSet<&Vec<u8>> = seen.iter().collect();
    assert_eq!(distinct.len(), 4);
    let u = wait_udp(&mut f, spec, "evictions counted", |u| u["evictions"] == 3);
    assert_eq!(u["flows"], 3, "{u}");
    assert_eq!(u["flows_total"], 6, "{u}");
    f.stop();
}

pub async fn burst_accounted(privilege: Privilege) {
    let pair = Pair::with(privilege);
    const LEN: usize = 200;
    const COUNT: u64 = 100_000;
    let sink = Sink::start(bind_in(&pair.child, "127.0.0.1:53", Some(32 << 20)), LEN);
    let spec = "127.0.0.1:5353:53/udp";
    let mut f = start(&pair, &[], &[spec]);
    let c = client_in(&pair.parent, "127.0.0.1:5353");
    let c = c.into_std().expect("std");
    c.set_nonblocking(false).expect("blocking");
    // The first datagram makes the flow; wait until it is up, so the burst
    // measures the data path rather than the dial backlog.
    c.send(&[0u8; LEN]).expect("send");
    wait_udp(&mut f, spec, "flow up", |u| u["datagrams_to_child"] == 1);
    let payload = [7u8; LEN];
    for _ in 1..COUNT {
        c.send(&payload).expect("send");
    }
    // Every datagram sent either reached the child's socket or is in one
    // of the forwarder's drop counters; the sink's own queue overflows are
    // the kernel's to report, read from the sink's socket.
    // Strictly: a missing or malformed drop count read as 0 would hide
    // datagrams lost without being counted.
    let dropped = |u: &Value| -> u64 {
        u["drops"]
            .as_object()
            .unwrap_or_else(|| panic!("no drop counts: {u}"))
            .values()
            .map(n)
            .sum()
    };
    let u = wait_udp(&mut f, spec, "every datagram accounted for", |u| {
        n(&u["datagrams_to_child"]) + dropped(u) == COUNT
    });
    let forwarded = n(&u["datagrams_to_child"]);
    let (recv, sink_drops) = wait_until(
        limit(Duration::from_secs(10)),
        "every datagram the forwarder counted as sent to reach the child's socket",
        || {
            let r = sink.received.load(Ordering::Relaxed);
            let d = udp::socket_drops(&*sink.socket);
            if r + d == forwarded {
                Ok((r, d))
            } else {
                Err(format!(
                    "the sink got {r} and dropped {d} of the {forwarded} forwarded: {u}"
                ))
            }
        },
    );
    eprintln!(
        "burst of {COUNT}: forwarded {}, parent queue drops {}, send errors {}; sink got {recv}, sink drops {sink_drops}",
        u["datagrams_to_child"], u["drops"]["rx_queue_overflow"], u["drops"]["send_error"]
    );
    assert_eq!(
        recv + sink_drops,
        n(&u["datagrams_to_child"]),
        "datagrams the forwarder counted as sent never reached the child: {u}"
    );
    assert_eq!(sink.wrong.load(Ordering::Relaxed), 0, "datagrams altered");
    assert_eq!(u["drops"]["oversize"], 0, "{u}");
    f.stop();
}

pub async fn rootlessctl_api(privilege: Privilege) {
    let pair = Pair::with(privilege);
    udp::echo(bind_in(&pair.child, "127.0.0.1:53", None));
    // One directory per variant: the root and rootless ones may run at
    // the same time.
    let dir = std::env::temp_dir().join(format!("fwt-udp-{}-{privilege:?}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    if privilege != Privilege::Root {
        let (uid, gid) = test_user();
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).expect("chown");
    }
    let sock = dir.join("api.sock").display().to_string();
    let mut f = start(&pair, &["--api-socket", &sock], &[]);
    let ctl = |args: &[&str]| {
        let out = Command::new("rootlessctl")
            .args(["--socket", &sock])
            .args(args)
            .output()
            .expect("rootlessctl (cargo xtask setup installs rootlesskit)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, out) = ctl(&["info", "--json"]);
    assert!(
        ok && out.contains("\"udp\"") && out.contains("\"udp4\""),
        "{out}"
    );
    // TCP and UDP on the same port are separate ports.
    let (ok, out) = ctl(&["add-ports", "127.0.0.1:5353:53/udp"]);
    assert!(ok && out.trim() == "1", "{out}");
    let (ok, out) = ctl(&["add-ports", "127.0.0.1:5353:53/tcp"]);
    assert!(ok && out.trim() == "2", "{out}");
    let (ok, out) = ctl(&["add-ports", "127.0.0.1:5353:54/udp4"]);
    assert!(!ok && out.contains("conflict with ID 1"), "{out}");
    let (ok, out) = ctl(&["list-ports"]);
    assert!(ok && out.contains("udp"), "{out}");
    within(20, "through the API's port", async {
        let c = client_in(&pair.parent, "127.0.0.1:5353");
        assert_eq!(ask(&c, b"via rootlessctl").await, b"via rootlessctl");
    })
    .await;
    // `forwarder status` shows the UDP port's datagrams and flows.
    let out = Command::new(forwarder_tests::forwarder_bin())
        .args(["status", "--api-socket", &sock])
        .output()
        .expect("forwarder status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let row = text
        .lines()
        .skip_while(|l| !l.starts_with("UDP"))
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>();
    // ID, FLOWS, EVICTED, DGRAMS-IN, DGRAMS-OUT, ...
    assert_eq!(row.get(..5), Some(&["1", "1", "0", "1", "1"][..]), "{text}");
    let (ok, out) = ctl(&["remove-ports", "1"]);
    assert!(ok, "{out}");
    // The address is free again once removed (bind_in panics otherwise).
    drop(bind_in(&pair.parent, "127.0.0.1:5353", None));
    let st = settled(&mut f);
    f.stop();
    assert_eq!(n(&st["udp"]["datagrams_to_child"]), 1, "{st}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits `secs` for a reply that must not come.
async fn no_reply(c: &UdpSocket, secs: u64) -> bool {
    let mut buf = vec![0u8; 2048];
    tokio::time::timeout(Duration::from_secs(secs), c.recv(&mut buf))
        .await
        .is_err()
}

/// `--max-connections` is one budget for TCP connections and UDP flows:
/// with 8 slots, 5 TCP connections and 3 flows fill it. Then a sixth TCP
/// client waits (not served), a new client of the UDP port that has flows
/// takes the slot of its least recently active flow (evicted), and a new
/// client of a UDP port without flows is dropped and counted as `no_slot`
/// (logged), never blocking anything. Established TCP connections and the
/// flows that kept their slots keep serving. When two TCP connections end,
/// the waiting TCP client is served and the dropped UDP client gets a flow
/// on its next datagram.
pub async fn shared_budget(privilege: Privilege) {
    let pair = Pair::with(privilege);
    servers::echo(pair.child.listen("127.0.0.1:80"));
    udp::whoami(bind_in(&pair.child, "127.0.0.1:53", None), "a");
    udp::whoami(bind_in(&pair.child, "127.0.0.1:54", None), "b");
    let (ua, ub) = ("127.0.0.1:5353:53/udp", "127.0.0.1:5354:54/udp");
    let mut f = start(
        &pair,
        &["--max-connections", "8"],
        &["127.0.0.1:8080:80", ua, ub],
    );
    let mut tcp = within(
        20,
        "5 TCP connections",
        pair.echo_clients("127.0.0.1:8080", 5, 100),
    )
    .await;
    let fa: Vec<UdpSocket> = (0..4)
        .map(|_| client_in(&pair.parent, "127.0.0.1:5353"))
        .collect();
    let mut seen = Vec::new();
    within(20, "3 flows", async {
        for c in &fa[..3] {
            seen.push(ask(c, b"x").await);
        }
    })
    .await;
    wait_udp(&mut f, ua, "3 flows", |u| u["flows"] == 3);
    assert_eq!(f.stats()["active"].as_u64(), Some(5));
    // TCP at the limit: the flows hold 3 of the 8 slots.
    let mut waiting = pair
        .assert_waits(
            "127.0.0.1:8080",
            "a sixth TCP connection was served while 3 UDP flows hold slots of \
             --max-connections 8",
        )
        .await;
    // A new client of port a: flow 0, the least recently active, gives up
    // its slot.
    within(10, "a fourth flow on a", async {
        seen.push(ask(&fa[3], b"x").await);
        assert_eq!(ask(&fa[1], b"x").await, seen[1], "flow 1 lost its socket");
        assert_eq!(ask(&fa[2], b"x").await, seen[2], "flow 2 lost its socket");
    })
    .await;
    let u = wait_udp(&mut f, ua, "flow 0 evicted", |u| u["evictions"] == 1);
    assert_eq!(u["flows"], 3, "{u}");
    assert_eq!(u["drops"]["no_slot"], 0, "{u}");
    // A new client of port b, which has no flow to give up: dropped and
    // counted, the relay goes on.
    let gb = client_in(&pair.parent, "127.0.0.1:5354");
    gb.send(b"y").await.expect("send");
    assert!(
        no_reply(&gb, 1).await,
        "port b served a flow beyond the budget"
    );
    let u = wait_udp(&mut f, ub, "no_slot counted", |u| {
        u["drops"]["no_slot"] == 1
    });
    assert_eq!(u["flows"], 0, "{u}");
    let err = f.wait_stderr("datagram from a new client dropped", Duration::from_secs(5));
    assert!(
        err.contains("datagram from a new client dropped"),
        "no log line for the dropped client: {err}"
    );
    assert!(err.contains("connection limit reached"), "{err}");
    // Everything established keeps serving.
    within(20, "established at the limit", async {
        for (i, c) in tcp.iter_mut().enumerate() {
            echo_roundtrip(c, &[i as u8 ^ 0x5a; 100]).await;
        }
        for (k, c) in fa[1..].iter().enumerate() {
            assert_eq!(ask(c, b"x").await, seen[k + 1]);
        }
    })
    .await;
    // Two TCP connections end: the waiting one is served, and port b's
    // client gets a flow on its next datagram.
    drop(tcp.drain(..2));
    within(10, "the waiting connection served", async {
        let mut b = [0u8; 7];
        waiting.read_exact(&mut b).await.expect("echo");
        assert_eq!(&b, b"waiting");
    })
    .await;
    // Port b's client may expect a flow only once both ended connections
    // have given their slots back (the waiting one took one of them):
    // before that its datagram is rightly dropped as no_slot.
    wait_until(
        limit(Duration::from_secs(10)),
        "the ended connections to end (4 active)",
        || {
            let st = f.stats();
            (st["active"].as_u64() == Some(4)).then_some(()).ok_or(st)
        },
    );
    // A datagram sent before the slots were back is rightly dropped: send
    // until one is answered.
    let got = wait_until_async(
        limit(Duration::from_secs(10)),
        "port b to answer once the slots were freed",
        async || {
            gb.send(b"z").await.expect("send");
            let mut buf = vec![0u8; 2048];
            match tokio::time::timeout(Duration::from_millis(200), gb.recv(&mut buf)).await {
                Ok(Ok(k)) => Ok(buf[..k].to_vec()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("no answer within 200 ms".to_string()),
            }
        },
    )
    .await;
    assert!(
        got.starts_with(b"b:"),
        "port b answered {got:?} after the slots were freed"
    );
    let u = wait_udp(&mut f, ub, "a flow on b", |u| u["flows"] == 1);
    assert_eq!(u["drops"]["no_slot"], 1, "{u}");
    let st = f.stats();
    assert_eq!(st["active"].as_u64(), Some(4), "{st}");
    drop((tcp, waiting));
    f.stop();
}

/// A datagram that says which one it is: `k` in its first four bytes, a
/// pattern of `k` after.
fn numbered(k: usize, len: usize) -> Vec<u8> {
    let mut d: Vec<u8> = (0..len).map(|i| (i * 31 + k) as u8).collect();
    d[..4].copy_from_slice(&(k as u32).to_be_bytes());
    d
}

pub async fn gso_refused_by_the_route(privilege: Privilege) {
    // Loopback with an Ethernet MTU on both sides. Runs of 1,400-byte
    // datagrams fit the path MTU and go as GSO packets; runs of 4,000-byte
    // ones cannot (a GSO segment must fit the path MTU), so the kernel
    // refuses them and the forwarder sends them one by one, fragmented:
    // every datagram must still arrive whole, both ways, none counted lost.
    let pair = Pair::with(privilege);
    for ns in [&pair.parent, &pair.child] {
        let out = ns
            .command("ip")
            .args(["link", "set", "lo", "mtu", "1500"])
            .output()
            .expect("ip link");
        assert!(out.status.success(), "{out:?}");
    }
    udp::echo(bind_in(&pair.child, "127.0.0.1:53", Some(8 << 20)));
    let spec = "127.0.0.1:5353:53/udp";
    let mut f = start(&pair, &[], &[spec]);
    let c = client_in(&pair.parent, "127.0.0.1:5353");
    udp::force_rcvbuf(&c, 8 << 20);
    const ROUNDS: usize = 20;
    const WINDOW: usize = 16;
    within(60, "bursts over a 1500-byte MTU", async {
        assert_eq!(ask(&c, b"up").await, b"up");
        for len in [4000usize, 1400] {
            for round in 0..ROUNDS {
                let ks: Vec<usize> = (round * WINDOW..(round + 1) * WINDOW).collect();
                for &k in &ks {
                    c.send(&numbered(k, len)).await.expect("send");
                }
                let mut got = HashSet::new();
                let mut buf = vec![0u8; 65_536];
                for _ in &ks {
                    let n = within(5, "a reply", c.recv(&mut buf)).await.expect("recv");
                    let k = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                    assert_eq!(n, len, "datagram {k}: wrong length");
                    assert!(buf[..n] == numbered(k, len)[..], "datagram {k} altered");
                    got.insert(k);
                }
                assert_eq!(got, ks.into_iter().collect(), "{len} bytes");
            }
        }
    })
    .await;
    let st = settled(&mut f);
    f.stop();
    let u = port_udp(&st, spec);
    let all = (2 * ROUNDS * WINDOW + 1) as u64;
    assert_eq!(n(&u["datagrams_to_child"]), all, "{st}");
    assert_eq!(n(&u["datagrams_to_parent"]), all, "{st}");
    for (why, v) in u["drops"].as_object().expect("drops") {
        assert_eq!(v, 0, "{why}: {st}");
    }
}

/// A rootless forwarder publishing 127.0.0.1:19000/udp to a plain echo
/// server at 127.0.0.1:9000 in the child, and its one agent.
struct AgentEcho {
    pair: Pair,
    server: Arc<std::net::UdpSocket>,
    f: Fwd,
    agent: Pid,
}

impl AgentEcho {
    fn start() -> AgentEcho {
        let pair = Pair::with(Privilege::User);
        let server = echo_thread(bind_in(&pair.child, "127.0.0.1:9000", None));
        let f = start(&pair, &[], &["127.0.0.1:19000:9000/udp"]);
        let agents = f.agent_pids();
        assert_eq!(agents.len(), 1, "no agent:\n{}", f.stderr());
        let agent = Pid::from_raw(agents[0] as i32);
        AgentEcho {
            pair,
            server,
            f,
            agent,
        }
    }
}

/// Stops (SIGSTOP) or resumes (SIGCONT) the agent.
fn signal(agent: Pid, sig: Signal) {
    nix::sys::signal::kill(agent, sig).unwrap_or_else(|e| panic!("{sig} to the agent: {e}"));
}

/// Rootless, a flow of a client at 127.0.0.1 (whose address the child has
/// too, so it is not preserved) gets a UDP socket the agent made ahead:
/// with the agent stopped (SIGSTOP), as many new local flows as were made
/// ahead are still answered at once.
pub async fn local_flows_do_not_wait_on_the_agent() {
    let AgentEcho {
        pair,
        server: _server,
        mut f,
        agent,
    } = AgentEcho::start();
    // The first flow asks for the sockets to be made.
    let first = client_in(&pair.parent, "127.0.0.1:19000");
    assert_eq!(ask(&first, b"first").await, b"first");
    let deadline = Instant::now() + limit(Duration::from_secs(5));
    let pooled = loop {
        let st = f.stats();
        let p = n(&st["pooled"]["sockets"]);
        if p >= 8 || Instant::now() > deadline {
            break p;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(pooled >= 8, "{pooled} sockets made ahead, want 8");
    signal(agent, Signal::SIGSTOP);
    let mut answered = 0;
    for k in 0..8u8 {
        let c = client_in(&pair.parent, "127.0.0.1:19000");
        c.send(&[k; 100]).await.expect("send");
        let mut buf = vec![0u8; 2048];
        let wait = limit(Duration::from_secs(2));
        if let Ok(Ok(n)) = tokio::time::timeout(wait, c.recv(&mut buf)).await {
            assert_eq!(&buf[..n], &[k; 100][..]);
            answered += 1;
        }
    }
    // The sockets made ahead are used up: the next flow waits for the
    // agent, and is answered once it goes on.
    let ninth = client_in(&pair.parent, "127.0.0.1:19000");
    ninth.send(b"ninth").await.expect("send");
    let mut buf = vec![0u8; 2048];
    let early = tokio::time::timeout(Duration::from_millis(300), ninth.recv(&mut buf)).await;
    signal(agent, Signal::SIGCONT);
    assert_eq!(answered, 8, "new local flows waited on the stopped agent");
    assert!(
        early.is_err(),
        "a flow was answered with the agent stopped and no socket left"
    );
    assert_eq!(ask_reply(&ninth).await, b"ninth");
    f.stop();
}

/// The burst tests compare the forwarder with a plain server's own receive
/// queue, which another test running beside them on two CPUs can overflow
/// with no forwarder at all (the direct run failed so), and a relay that
/// loses its CPU for a few milliseconds must then send on what queued
/// meanwhile at once: they run alone, every other test of this file
/// shares.
static QUIET: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

async fn shared() -> tokio::sync::RwLockReadGuard<'static, ()> {
    QUIET.read().await
}

async fn alone() -> tokio::sync::RwLockWriteGuard<'static, ()> {
    let g = QUIET.write().await;
    // The kernel tears down the namespaces of the tests before in a
    // worker of its own, which takes a CPU for a while: let it finish.
    tokio::time::sleep(Duration::from_secs(1)).await;
    g
}

macro_rules! suite {
    ($($name:ident: $privilege:ident;)*) => {$(
        mod $name {
            use forwarder_tests::Privilege;
            const P: Privilege = Privilege::$privilege;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn echo_both_families() { let _q = super::shared().await; super::echo_both_families(P).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn thousand_flows() { let _q = super::shared().await; super::thousand_flows(P).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn largest_datagrams() { let _q = super::shared().await; super::largest_datagrams(P).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn parent_ip_rule() { let _q = super::shared().await; super::parent_ip_rule(P).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn ipv6_fallback() { let _q = super::shared().await; super::ipv6_fallback(P).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn idle_expiry() { let _q = super::shared().await; super::idle_expiry(P).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn flow_cap() { let _q = super::shared().await; super::flow_cap(P).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn burst_accounted() { let _q = super::shared().await; super::burst_accounted(P).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn rootlessctl_api() { let _q = super::shared().await; super::rootlessctl_api(P).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn shared_budget() { let _q = super::shared().await; super::shared_budget(P).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn gso_refused_by_the_route() { let _q = super::shared().await; super::gso_refused_by_the_route(P).await }
        }
    )*};
}

suite! {
    root: Root;
    // Unprivileged, given the container's PID: UDP sockets come from the
    // child-side agent.
    rootless: User;
}

/// An echo server on a blocking thread of its own, with the default
/// receive buffer, as a plain server has; returns its drop counter's
/// socket.
fn echo_thread(s: UdpSocket) -> Arc<std::net::UdpSocket> {
    let s = Arc::new(s.into_std().expect("std"));
    s.set_nonblocking(false).expect("blocking");
    let t = s.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = t.recv_from(&mut buf) {
            let _ = t.send_to(&buf[..n], from);
        }
    });
    s
}

/// 300 new flows × 5 datagrams (1 to 1,400 bytes), paced 50 per 2 ms, the
/// flows taking turns: returns how many replies came back, and every
/// reply's bytes are checked.
fn flow_burst(clients: &[std::net::UdpSocket]) -> usize {
    send_burst(clients);
    collect_burst(clients)
}

const ROUNDS: usize = 5;

/// The sending half of [`flow_burst`].
fn send_burst(clients: &[std::net::UdpSocket]) {
    let len = |c: usize, r: usize| 1 + (c * 7 + r * 331) % 1400;
    let mut sent = 0;
    for r in 0..ROUNDS {
        for (c, s) in clients.iter().enumerate() {
            let msg = vec![(c % 251) as u8; len(c, r)];
            s.send(&msg).expect("send");
            sent += 1;
            if sent % 50 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

/// The receiving half of [`flow_burst`]: the replies, each checked.
fn collect_burst(clients: &[std::net::UdpSocket]) -> usize {
    let mut got = 0;
    let mut buf = vec![0u8; 2048];
    let deadline = Instant::now() + limit(Duration::from_secs(3));
    while Instant::now() < deadline && got < clients.len() * ROUNDS {
        let mut any = false;
        for (c, s) in clients.iter().enumerate() {
            while let Ok(n) = s.recv(&mut buf) {
                assert!(buf[..n].iter().all(|b| *b == (c % 251) as u8), "flow {c}");
                got += 1;
                any = true;
            }
        }
        if !any {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    got
}

fn burst_clients(ns: &forwarder_tests::Netns, to: &str) -> Vec<std::net::UdpSocket> {
    (0..300)
        .map(|_| {
            let s = client_in(ns, to).into_std().expect("std");
            s.set_nonblocking(true).expect("nonblocking");
            s
        })
        .collect()
}

/// A burst of new flows arrives whole at a plain server, as it does with
/// no forwarder: the datagrams that wait for their flow's dial must not
/// reach the server all at once (flushed, 94-98 of 1,500 were lost in two
/// runs of three). Whole in at least 8 of 10 runs, and no run below 97%:
/// now and then a run loses a few at the server's receive buffer (1 to 25
/// seen, in about one run of 30), when the forwarder's threads, the server
/// and the clients share the two CPUs; with no forwarder, none is lost.
pub async fn new_flow_burst(privilege: Privilege, extra: &[&str]) {
    let pair = Pair::with(privilege);
    let server = echo_thread(bind_in(&pair.child, "127.0.0.1:9000", None));
    let mut f = start(&pair, extra, &["127.0.0.1:19000:9000/udp"]);
    let mut short = Vec::new();
    for run in 0..10 {
        let direct = burst_clients(&pair.child, "127.0.0.1:9000");
        let got = tokio::task::block_in_place(|| flow_burst(&direct));
        assert_eq!(got, 1500, "run {run}: direct to the server, no forwarder");
        let through = burst_clients(&pair.parent, "127.0.0.1:19000");
        let got = tokio::task::block_in_place(|| flow_burst(&through));
        if got < 1500 {
            let st = f.stats();
            short.push(format!(
                "run {run}: {got} of 1500 back; server drops {}; {}",
                udp::socket_drops(&*server),
                port_udp(&st, "127.0.0.1:19000:9000/udp")
            ));
            assert!(got >= 1455, "through the forwarder:\n{}", short.join("\n"));
        }
    }
    assert!(
        short.len() <= 2,
        "through the forwarder, not whole in {} runs of 10:\n{}",
        short.len(),
        short.join("\n")
    );
    f.stop();
}

/// The same burst while the agent that dials the flows is stopped: all
/// 1,500 datagrams wait for their dials, and the agent, once it goes on,
/// answers the 300 dials in a few milliseconds. The waiting datagrams must
/// reach the server at the pace they came, not in one flush: flushed, the
/// server dropped 485-728 of them. Paced, a run may still lose a few (up
/// to 1%) when the relay loses its CPU for some milliseconds while 300
/// flows start at once and must then send on what queued meanwhile (seen:
/// 4 in one run of 35 in CI); more than that is a failure.
pub async fn burst_behind_a_stalled_agent() {
    let AgentEcho {
        pair,
        server,
        mut f,
        agent,
    } = AgentEcho::start();
    for run in 0..5 {
        let through = burst_clients(&pair.parent, "127.0.0.1:19000");
        signal(agent, Signal::SIGSTOP);
        tokio::task::block_in_place(|| send_burst(&through));
        signal(agent, Signal::SIGCONT);
        let got = tokio::task::block_in_place(|| collect_burst(&through));
        let st = f.stats();
        assert!(
            got >= 1485,
            "run {run}: {got} of 1500 back; server drops {}; {}",
            udp::socket_drops(&*server),
            port_udp(&st, "127.0.0.1:19000:9000/udp")
        );
    }
    f.stop();
}

/// 300 new flows x 5 datagrams, 10 runs a test: with the flows of earlier
/// runs still open, the forwarder passes 256, 512, 1,024 and 2,048
/// descriptors while the bursts run. Every one of them must reach the
/// server: no dial may stall behind the kernel's descriptor table, and the
/// datagrams that waited for a dial must not be flushed at once.
mod new_flows {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn burst_arrives_whole_root() {
        let _alone = super::alone().await;
        super::new_flow_burst(Privilege::Root, &[]).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn burst_arrives_whole_root_no_source_ip() {
        let _alone = super::alone().await;
        super::new_flow_burst(Privilege::Root, &["--no-source-ip"]).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn burst_arrives_whole_rootless() {
        let _alone = super::alone().await;
        super::new_flow_burst(Privilege::User, &[]).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn local_flows_do_not_wait_on_the_agent() {
        let _q = super::shared().await;
        super::local_flows_do_not_wait_on_the_agent().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn burst_behind_a_stalled_agent() {
        let _alone = super::alone().await;
        super::burst_behind_a_stalled_agent().await
    }
}
