//! Source address preservation: a server in the child sees the
//! client's own address and port, and its replies come back to the client,
//! although the child has a default route elsewhere, as a real container
//! has. Clients sit on documentation addresses of a link in the
//! parent namespace, or on 127.0.0.5; as root and rootless (the agent);
//! TCP and UDP; and the child's routing is as it was after the forwarder
//! exits, is killed, or is killed with its agent (then the next start
//! cleans up).

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use forwarder_tests::udp::bind_in;
use forwarder_tests::{limit, wait_until, wait_until_async, within, Fwd, Netns, Pair, Privilege};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UdpSocket};

const CLIENT4: &str = "192.0.2.2";
const CLIENT6: &str = "2001:db8::2";

/// Runs `ip ARGS` inside `ns` and asserts it worked.
fn ip_in(ns: &Netns, args: &[&str]) {
    let st = ns
        .command("ip")
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
    assert!(st.success(), "ip {args:?} in {}: {st}", ns.name);
}

/// The output of `ip ARGS` inside `ns`.
fn ip_out(ns: &Netns, args: &[&str]) -> String {
    let out = ns.command("ip").args(args).output().expect("ip");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A pair where the parent has a link with the clients' addresses
/// and the child a default route out of a link of its own (so replies to a
/// client that take the main table never come back).
fn pair(privilege: Privilege) -> Pair {
    let pair = Pair::with(privilege);
    let p = &pair.parent;
    // Veth pairs with both ends in one namespace (this kernel may lack
    // the dummy driver).
    ip_in(
        p,
        &["link", "add", "cl0", "type", "veth", "peer", "name", "cl1"],
    );
    ip_in(p, &["link", "set", "cl0", "up"]);
    ip_in(p, &["link", "set", "cl1", "up"]);
    ip_in(p, &["addr", "add", &format!("{CLIENT4}/24"), "dev", "cl0"]);
    ip_in(
        p,
        &[
            "addr",
            "add",
            &format!("{CLIENT6}/64"),
            "dev",
            "cl0",
            "nodad",
        ],
    );
    let c = &pair.child;
    ip_in(
        c,
        &[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
        ],
    );
    ip_in(c, &["link", "set", "eth0", "up"]);
    ip_in(c, &["link", "set", "eth1", "up"]);
    ip_in(c, &["addr", "add", "198.51.100.2/24", "dev", "eth0"]);
    ip_in(
        c,
        &["addr", "add", "2001:db8:1::2/64", "dev", "eth0", "nodad"],
    );
    ip_in(c, &["route", "add", "default", "via", "198.51.100.1"]);
    ip_in(
        c,
        &["-6", "route", "add", "default", "via", "2001:db8:1::1"],
    );
    // IPv6 installs an address's local route only once the link's carrier
    // is seen up (the kernel's link watch, up to a second after `up`), so
    // a test's "before" snapshot must wait for it or it races it.
    wait_local_route(p, CLIENT6);
    wait_local_route(c, "2001:db8:1::2");
    pair
}

/// Waits until `addr`'s local route is in `ns`'s IPv6 local table.
fn wait_local_route(ns: &Netns, addr: &str) {
    let want = format!("local {addr} ");
    wait_until(
        limit(Duration::from_secs(5)),
        &format!("the local route of {addr}"),
        || {
            let table = ip_out(ns, &["-6", "route", "show", "table", "local"]);
            table.contains(&want).then_some(()).ok_or(table)
        },
    );
}

/// The child's routing state: rules, every table's routes, and the
/// sysctl the TCP return path sets.
fn routing_state(ns: &Netns) -> String {
    let sysctls = ns.run(|| {
        [
            "ipv4/tcp_fwmark_accept",
            "ipv4/fwmark_reflect",
            "ipv6/fwmark_reflect",
        ]
        .map(|k| {
            let v = std::fs::read_to_string(format!("/proc/sys/net/{k}")).unwrap_or_default();
            format!("{k}={}", v.trim())
        })
        .join(" ")
    });
    // Link-local addresses come and go with the veths' address
    // configuration on their own: not ours to compare.
    [
        ip_out(ns, &["-4", "rule", "show"]),
        ip_out(ns, &["-6", "rule", "show"]),
        ip_out(ns, &["-4", "route", "show", "table", "all"]),
        ip_out(ns, &["-6", "route", "show", "table", "all"]),
        sysctls,
    ]
    .join("\n")
    .lines()
    .filter(|l| !l.contains("fe80:"))
    .collect::<Vec<_>>()
    .join("\n")
}

/// A TCP server in the child that sends the peer address it sees as a
/// line, then echoes.
fn tcp_whoami(l: TcpListener) {
    tokio::spawn(async move {
        while let Ok((mut s, peer)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(format!("{peer}\n").as_bytes()).await;
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// Connects from `from` (port chosen by the kernel) in the parent to `to`:
/// the client's address and the connection, whose first line will be the
/// server's report. (The connect is over once the forwarder's listener
/// has the connection; the report comes only after the dial.)
async fn tcp_connect(
    pair: &Pair,
    from: &str,
    to: &str,
) -> (SocketAddr, BufReader<tokio::net::TcpStream>) {
    let (from, to): (SocketAddr, SocketAddr) =
        (from.parse().expect("from"), to.parse().expect("to"));
    let s = within(
        10,
        "the connection",
        pair.parent.connect_from(Some(from), to),
    )
    .await
    .unwrap_or_else(|e| panic!("connect {from} -> {to}: {e}"));
    (s.local_addr().expect("local"), BufReader::new(s))
}

/// Connects from `from` (port chosen by the kernel) in the parent to `to`,
/// returns the peer address the child's server reports, and checks the
/// echo (the return path).
async fn tcp_ask(pair: &Pair, from: &str, to: &str) -> (SocketAddr, String) {
    let (me, mut r) = tcp_connect(pair, from, to).await;
    let mut line = String::new();
    within(10, "the server's report", r.read_line(&mut line))
        .await
        .expect("read the report");
    let mut s = r.into_inner();
    s.write_all(b"echo me").await.expect("write");
    let mut buf = [0u8; 7];
    within(10, "the echo", s.read_exact(&mut buf))
        .await
        .expect("read the echo");
    assert_eq!(&buf, b"echo me");
    (me, line.trim().to_string())
}

fn start(pair: &Pair, extra: &[&str]) -> Fwd {
    Fwd::start(pair, extra)
}

async fn tcp_sees_clients(privilege: Privilege, mode: &str) {
    let pair = pair(privilege);
    let before = routing_state(&pair.child);
    tcp_whoami(pair.child.listen("127.0.0.1:80"));
    tcp_whoami(pair.child.listen("[::1]:80"));
    // The API socket (root only: the test user cannot reach a root-owned
    // temporary directory).
    let dir = tempfile::tempdir().expect("tmp dir");
    let sock = dir.path().join("api.sock");
    let sock_s = sock.display().to_string();
    let mut args = vec![
        "--mode",
        mode,
        "-p",
        "8080:80/tcp4",
        "-p",
        "[::]:8080:80/tcp6",
    ];
    if privilege == Privilege::Root {
        args.extend(["--api-socket", &sock_s]);
    }
    let f = start(&pair, &args);
    if mode != "auto" {
        assert_eq!(f.engine(), mode, "{}", f.ready);
    }
    if privilege == Privilege::Root {
        let info = forwarder::cli::client::info_blocking(&sock).expect("GET /v1/info");
        assert_eq!(info["portDriver"]["sourceIP"], true, "{info}");
    }
    let needle = "preserving client addresses";
    let err = f.wait_stderr(needle, Duration::from_secs(5));
    assert!(err.contains(needle), "{err}");
    for (from, to) in [
        (format!("{CLIENT4}:0"), format!("{CLIENT4}:8080")),
        ("127.0.0.5:0".to_string(), "127.0.0.1:8080".to_string()),
        (format!("[{CLIENT6}]:0"), format!("[{CLIENT6}]:8080")),
    ] {
        let (me, seen) = tcp_ask(&pair, &from, &to).await;
        assert_eq!(
            seen,
            me.to_string(),
            "{from} -> {to}: the server saw {seen}"
        );
    }
    // A client on the child's own address (127.0.0.1) falls back: the
    // server sees the forwarder's socket in the child.
    let (me, seen) = tcp_ask(&pair, "127.0.0.1:0", "127.0.0.1:8080").await;
    assert_ne!(seen, me.to_string());
    assert!(seen.starts_with("127.0.0.1:"), "{seen}");
    assert_ne!(routing_state(&pair.child), before, "no routing installed?");
    let stderr = f.stderr_handle();
    // stop() returns once the forwarder's stderr is read to its end, the
    // agent's last lines included.
    f.stop();
    assert_eq!(routing_state(&pair.child), before, "routing left behind");
    // Stopping the agent at exit is no failure worth an error line.
    let err = stderr.lock().map(|s| s.clone()).unwrap_or_default();
    assert!(!err.contains("ERROR"), "errors at a clean stop:\n{err}");
}

#[tokio::test]
async fn tcp_root_copy() {
    tcp_sees_clients(Privilege::Root, "copy").await;
}

#[tokio::test]
async fn tcp_root_splice() {
    tcp_sees_clients(Privilege::Root, "splice").await;
}

#[tokio::test]
async fn tcp_root_ebpf() {
    tcp_sees_clients(Privilege::Root, "ebpf").await;
}

#[tokio::test]
async fn tcp_rootless_agent() {
    tcp_sees_clients(Privilege::User, "auto").await;
}

/// `--no-source-ip`: today's behaviour, and nothing is installed.
#[tokio::test]
async fn tcp_off() {
    let pair = pair(Privilege::Root);
    let before = routing_state(&pair.child);
    tcp_whoami(pair.child.listen("127.0.0.1:80"));
    let dir = tempfile::tempdir().expect("tmp dir");
    let sock = dir.path().join("api.sock");
    let sock_s = sock.display().to_string();
    let f = start(
        &pair,
        &[
            "--no-source-ip",
            "-p",
            "8080:80/tcp4",
            "--api-socket",
            &sock_s,
        ],
    );
    let info = forwarder::cli::client::info_blocking(&sock).expect("GET /v1/info");
    assert_eq!(info["portDriver"]["sourceIP"], false, "{info}");
    assert!(
        f.agent_pids().is_empty(),
        "root mode without source preservation needs no agent"
    );
    let (_, seen) = tcp_ask(&pair, &format!("{CLIENT4}:0"), &format!("{CLIENT4}:8080")).await;
    assert!(seen.starts_with("127.0.0.1:"), "{seen}");
    assert_eq!(routing_state(&pair.child), before);
    f.stop();
}

/// Connects from `from` (bound with SO_REUSEADDR, so that one address
/// and port can reach two published ports) in the parent to `to`, reads
/// the server's report of the address it sees, checks the echo, and
/// returns the report with the connection, still open.
async fn tcp_ask_reusing(pair: &Pair, from: &str, to: &str) -> (String, tokio::net::TcpStream) {
    let (from, to): (SocketAddr, SocketAddr) =
        (from.parse().expect("from"), to.parse().expect("to"));
    let s = pair.parent.run(move || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        s.set_reuse_address(true).expect("reuseaddr");
        s.bind(&from.into()).expect("bind");
        s.connect(&to.into()).expect("connect");
        s.set_nonblocking(true).expect("nonblocking");
        std::net::TcpStream::from(s)
    });
    let mut s = tokio::net::TcpStream::from_std(s).expect("tokio");
    let mut line = String::new();
    let mut r = BufReader::new(&mut s);
    within(10, "the report", r.read_line(&mut line))
        .await
        .expect("the report (a reset: the dial failed)");
    s.write_all(b"x").await.expect("write");
    let mut b = [0u8; 1];
    within(10, "the echo", s.read_exact(&mut b))
        .await
        .expect("echo");
    (line.trim().to_string(), s)
}

/// Two clients with the same address and port, on two published ports,
/// are both served (from the same source address and port in the child).
#[tokio::test]
async fn same_client_two_ports() {
    let pair = pair(Privilege::Root);
    tcp_whoami(pair.child.listen("127.0.0.1:80"));
    tcp_whoami(pair.child.listen("127.0.0.1:81"));
    let f = start(&pair, &["-p", "8080:80/tcp4", "-p", "8081:81/tcp4"]);
    let from = format!("{CLIENT4}:40000");
    let (seen_a, _a) = tcp_ask_reusing(&pair, &from, &format!("{CLIENT4}:8080")).await;
    let (seen_b, _b) = tcp_ask_reusing(&pair, &from, &format!("{CLIENT4}:8081")).await;
    assert_eq!([seen_a, seen_b], [from.clone(), from]);
    f.stop();
}

/// One client address and port on two published ports that lead to one
/// target: the second dial's 4-tuple in the child is the first's, which
/// is still connected. It is served from the child's own address (logged
/// once) instead of being reset, and the first keeps the client's.
#[tokio::test]
async fn same_client_one_target_two_ports() {
    let pair = pair(Privilege::Root);
    tcp_whoami(pair.child.listen("127.0.0.1:80"));
    let f = start(&pair, &["-p", "8080:80/tcp4", "-p", "8081:80/tcp4"]);
    let from = format!("{CLIENT4}:40001");
    let (first, _a) = tcp_ask_reusing(&pair, &from, &format!("{CLIENT4}:8080")).await;
    let (second, _b) = tcp_ask_reusing(&pair, &from, &format!("{CLIENT4}:8081")).await;
    assert_eq!(first, from);
    assert!(second.starts_with("127.0.0.1:"), "{second}");
    let needle = "is still connected to";
    let err = f.wait_stderr(needle, Duration::from_secs(5));
    assert!(err.contains(needle), "{err}");
    f.stop();
}

/// After SIGKILL the agent (told by its parent's death) removes the
/// routing; killed together with its agent, the next start does.
#[tokio::test]
async fn routing_cleaned_after_sigkill() {
    let pair = pair(Privilege::Root);
    let before = routing_state(&pair.child);
    tcp_whoami(pair.child.listen("127.0.0.1:80"));
    let f = start(&pair, &["-p", "8080:80/tcp4"]);
    tcp_ask(&pair, &format!("{CLIENT4}:0"), &format!("{CLIENT4}:8080")).await;
    let agents = f.agent_pids();
    assert_eq!(agents.len(), 1, "{agents:?}");
    kill9(f.pid);
    wait_gone(agents[0]).await;
    assert_eq!(routing_state(&pair.child), before, "after SIGKILL");
    drop(f);

    let f = start(&pair, &["-p", "8080:80/tcp4"]);
    let agents = f.agent_pids();
    kill_both(f.pid, agents[0]).await;
    assert_ne!(routing_state(&pair.child), before, "nothing left to clean?");
    drop(f);
    let f = start(&pair, &["-p", "8080:80/tcp4"]);
    tcp_ask(&pair, &format!("{CLIENT4}:0"), &format!("{CLIENT4}:8080")).await;
    f.stop();
    assert_eq!(
        routing_state(&pair.child),
        before,
        "the next start cleaned up"
    );
}

/// SIGKILL for a forwarder and its agent, with no chance for either to
/// clean up: the forwarder is stopped first, so it cannot start a new
/// agent when the first dies, and the agent goes before the forwarder, so
/// it never sees its parent's death.
async fn kill_both(forwarder: u32, agent: u32) {
    let st = Command::new("kill")
        .args(["-STOP", &forwarder.to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
    kill9(agent);
    wait_gone(agent).await;
    kill9(forwarder);
    wait_gone(forwarder).await;
}

fn kill9(pid: u32) {
    let st = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
}

async fn wait_gone(pid: u32) {
    wait_until_async(
        limit(Duration::from_secs(5)),
        &format!("process {pid} to exit"),
        async || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let gone = stat.is_empty()
                || stat
                    .rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
            gone.then_some(()).ok_or(stat)
        },
    )
    .await;
}

/// A UDP server in the child that answers each datagram with the sender's
/// address as it sees it.
fn udp_whoami(s: UdpSocket) {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((_, from)) = s.recv_from(&mut buf).await {
            let _ = s.send_to(from.to_string().as_bytes(), from).await;
        }
    });
}

/// UDP clients are seen with their own address by servers bound to
/// `servers` (IPv4, IPv6; port 53), and every reply comes back. Wildcard
/// servers' replies are routed before they have a source, so only a rule
/// that matches by destination and ports can return them.
async fn udp_sees_clients(privilege: Privilege, servers: [&str; 2]) {
    let pair = pair(privilege);
    let before = routing_state(&pair.child);
    for s in servers {
        udp_whoami(bind_in(&pair.child, s, None));
    }
    let f = start(
        &pair,
        &[
            "--udp-idle-timeout",
            "1",
            "-p",
            "5353:53/udp4",
            "-p",
            "[::]:5353:53/udp6",
        ],
    );
    for (from, to) in [
        (format!("{CLIENT4}:0"), format!("{CLIENT4}:5353")),
        ("127.0.0.5:0".to_string(), "127.0.0.1:5353".to_string()),
        (format!("[{CLIENT6}]:0"), format!("[{CLIENT6}]:5353")),
    ] {
        let c = bind_in(&pair.parent, &from, None);
        c.connect(&to).await.expect("connect");
        let me = c.local_addr().expect("local");
        // Two round trips: the flow's first datagram and one on the
        // established flow.
        for _ in 0..2 {
            c.send(b"who").await.expect("send");
            let mut buf = vec![0u8; 2048];
            let n = within(5, "a reply", c.recv(&mut buf))
                .await
                .unwrap_or_else(|e| panic!("{from} -> {to}: {e}\n{}", f.stderr()));
            assert_eq!(
                String::from_utf8_lossy(&buf[..n]),
                me.to_string(),
                "{from} -> {to}"
            );
        }
    }
    // Each flow added one rule; they go at the flows' expiry.
    let flows = |st: &str| st.matches("ipproto udp").count();
    assert_eq!(
        flows(&routing_state(&pair.child)),
        3,
        "{}",
        routing_state(&pair.child)
    );
    wait_until_async(
        limit(Duration::from_secs(10)),
        "the flows' rules to go at their expiry",
        async || {
            let state = routing_state(&pair.child);
            (flows(&state) == 0).then_some(()).ok_or(state)
        },
    )
    .await;
    let st = f.stop();
    assert_eq!(routing_state(&pair.child), before, "routing left behind");
    let lost: u64 = st["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .filter_map(|p| p["udp"]["drops"].as_object())
        .flat_map(|d| d.values().map(|v| v.as_u64().expect("a count")))
        .sum();
    assert_eq!(lost, 0, "{st}");
}

#[tokio::test]
async fn udp_root() {
    udp_sees_clients(Privilege::Root, ["127.0.0.1:53", "[::1]:53"]).await;
}

#[tokio::test]
async fn udp_rootless_agent() {
    udp_sees_clients(Privilege::User, ["127.0.0.1:53", "[::1]:53"]).await;
}

/// The child's default route really takes replies away: without the local
/// route of the forwarder's table, a transparent dial gets no answer and
/// the client learns nothing from the server (the routing is what the
/// other cases prove).
#[tokio::test]
async fn without_the_return_route_replies_are_lost() {
    let pair = pair(Privilege::Root);
    tcp_whoami(pair.child.listen("127.0.0.1:80"));
    let f = start(&pair, &["-p", "8080:80/tcp4"]);
    tcp_ask(&pair, &format!("{CLIENT4}:0"), &format!("{CLIENT4}:8080")).await;
    ip_in(
        &pair.child,
        &["-4", "route", "flush", "table", "1719100530"],
    );
    let mut c = pair.client(&format!("{CLIENT4}:8080")).await;
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(3), c.read(&mut buf)).await;
    assert!(
        !matches!(r, Ok(Ok(n)) if n > 0),
        "the server answered without the return route: {r:?}"
    );
    drop(c);
    f.stop();
}

/// Root mode: a killed agent cannot be restarted once the forwarder has
/// dropped its capabilities; the forwarder says so once and keeps serving
/// from its own thread in the child, without source preservation.
#[tokio::test]
async fn root_agent_killed_falls_back() {
    let pair = pair(Privilege::Root);
    tcp_whoami(pair.child.listen("127.0.0.1:80"));
    let dir = tempfile::tempdir().expect("tmp dir");
    let sock = dir.path().join("api.sock");
    let sock_s = sock.display().to_string();
    let f = start(&pair, &["-p", "8080:80/tcp4", "--api-socket", &sock_s]);
    let source_ip = || {
        let info = forwarder::cli::client::info_blocking(&sock).expect("GET /v1/info");
        info["portDriver"]["sourceIP"].clone()
    };
    assert_eq!(source_ip(), true);
    let (me, seen) = tcp_ask(&pair, &format!("{CLIENT4}:0"), &format!("{CLIENT4}:8080")).await;
    assert_eq!(seen, me.to_string());
    let agents = f.agent_pids();
    assert_eq!(agents.len(), 1, "{agents:?}");
    kill9(agents[0]);
    let needle = "dialing from the forwarder's own thread in the child";
    let err = f.wait_stderr(needle, Duration::from_secs(10));
    assert!(err.contains(needle), "{err}");
    let (_, seen) = tcp_ask(&pair, &format!("{CLIENT4}:0"), &format!("{CLIENT4}:8080")).await;
    assert!(seen.starts_with("127.0.0.1:"), "{seen}");
    // The API tells the truth about the fallback.
    assert_eq!(source_ip(), false, "/v1/info after the fallback");
    f.assert_least_privilege();
    f.stop();
}

/// Connects from `from` to `to` and returns how long until the connection
/// is reset (the forwarder's answer to a dial that failed), or panics with
/// what came instead.
async fn reset_after(pair: &Pair, from: &str, to: &str) -> Duration {
    let (from, to): (SocketAddr, SocketAddr) =
        (from.parse().expect("from"), to.parse().expect("to"));
    let t = std::time::Instant::now();
    let connected = within(
        10,
        "the connection",
        pair.parent.connect_from(Some(from), to),
    )
    .await;
    // The reset can come before the connect has been seen to complete.
    let mut s = match connected {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return t.elapsed(),
        Err(e) => panic!("connect {from} -> {to}: {e}"),
    };
    let mut buf = [0u8; 16];
    let r = within(15, "the reset", s.read(&mut buf)).await;
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => t.elapsed(),
        other => panic!("{from} -> {to}: expected a reset, got {other:?}"),
    }
}

/// A closed port in the child resets a preserved client as fast as a
/// loopback one (which is not preserved): the child's RST must come back
/// to the forwarder's transparent socket, not leave by the child's default
/// route while the dial waits for its timeout.
async fn closed_port_resets_at_once(privilege: Privilege, mode: &str) {
    let pair = pair(privilege);
    let f = start(
        &pair,
        &[
            "--mode",
            mode,
            "-p",
            "8082:82/tcp4",
            "-p",
            "[::]:8082:82/tcp6",
        ],
    );
    let reference = reset_after(&pair, "127.0.0.1:0", "127.0.0.1:8082").await;
    for (from, to) in [
        (format!("{CLIENT4}:0"), format!("{CLIENT4}:8082")),
        ("127.0.0.5:0".to_string(), "127.0.0.1:8082".to_string()),
        (format!("[{CLIENT6}]:0"), format!("[{CLIENT6}]:8082")),
    ] {
        let took = reset_after(&pair, &from, &to).await;
        assert!(
            took < reference + limit(Duration::from_secs(1)),
            "{from} -> {to} ({privilege:?}, {mode}): reset after {took:?}, a loopback client after {reference:?}\n{}",
            f.stderr()
        );
    }
    f.stop();
}

#[tokio::test]
async fn closed_port_resets_at_once_root_splice() {
    closed_port_resets_at_once(Privilege::Root, "splice").await;
}

#[tokio::test]
async fn closed_port_resets_at_once_root_ebpf() {
    closed_port_resets_at_once(Privilege::Root, "ebpf").await;
}

#[tokio::test]
async fn closed_port_resets_at_once_rootless() {
    closed_port_resets_at_once(Privilege::User, "auto").await;
}

/// An IPv6 client of a service that listens on IPv4 only reaches it by the
/// IPv4 fallback, as soon as the IPv6 dial is refused (from the child's
/// own address then: a client's IPv6 address cannot be an IPv4 source).
async fn ipv6_client_falls_back(privilege: Privilege, mode: &str) {
    let pair = pair(privilege);
    tcp_whoami(pair.child.listen("127.0.0.1:81"));
    let f = start(&pair, &["--mode", mode, "-p", "[::]:8081:81/tcp6"]);
    for from in [format!("[{CLIENT6}]:0"), "[::1]:0".to_string()] {
        let to = if from.starts_with("[::1]") {
            "[::1]:8081".to_string()
        } else {
            format!("[{CLIENT6}]:8081")
        };
        let t = std::time::Instant::now();
        let (_, seen) = tcp_ask(&pair, &from, &to).await;
        let took = t.elapsed();
        assert!(
            seen.starts_with("127.0.0.1:"),
            "{from}: the server saw {seen}"
        );
        assert!(
            took < limit(Duration::from_secs(2)),
            "{from} -> {to} ({privilege:?}, {mode}): served after {took:?}\n{}",
            f.stderr()
        );
    }
    f.stop();
}

#[tokio::test]
async fn ipv6_client_falls_back_root_splice() {
    ipv6_client_falls_back(Privilege::Root, "splice").await;
}

#[tokio::test]
async fn ipv6_client_falls_back_root_ebpf() {
    ipv6_client_falls_back(Privilege::Root, "ebpf").await;
}

#[tokio::test]
async fn ipv6_client_falls_back_rootless() {
    ipv6_client_falls_back(Privilege::User, "auto").await;
}

#[tokio::test]
async fn udp_wildcard_servers_answer_root() {
    udp_sees_clients(Privilege::Root, ["0.0.0.0:53", "[::]:53"]).await;
}

#[tokio::test]
async fn udp_wildcard_servers_answer_rootless() {
    udp_sees_clients(Privilege::User, ["0.0.0.0:53", "[::]:53"]).await;
}

/// UDP to a child port where nothing listens is counted `unreachable` for
/// every client, preserved or not, and said once per port.
async fn udp_closed_port_unreachable(privilege: Privilege) {
    let pair = pair(privilege);
    let mut f = start(&pair, &["-p", "5357:57/udp4", "-p", "[::]:5358:58/udp6"]);
    let clients = [
        (format!("{CLIENT4}:0"), format!("{CLIENT4}:5357")),
        ("127.0.0.5:0".to_string(), "127.0.0.1:5357".to_string()),
        (format!("[{CLIENT6}]:0"), format!("[{CLIENT6}]:5358")),
    ];
    let mut want = 0;
    for (from, to) in &clients {
        let c = bind_in(&pair.parent, from, None);
        c.connect(to).await.expect("connect");
        // One at a time: each one's ICMP error is read before the next is
        // sent, so none hides another.
        for _ in 0..3 {
            c.send(b"anyone?").await.expect("send");
            want += 1;
            wait_until(
                limit(Duration::from_secs(5)),
                &format!("{from} -> {to}: datagram {want} counted unreachable"),
                || {
                    let st = f.stats();
                    let got: u64 = st["ports"]
                        .as_array()
                        .expect("ports")
                        .iter()
                        .map(|p| p["udp"]["drops"]["unreachable"].as_u64().unwrap_or(0))
                        .sum();
                    (got == want).then_some(()).ok_or(format!("{got}: {st}"))
                },
            );
        }
    }
    let err = f.stderr();
    let said = err.matches("nothing listens at").count();
    assert_eq!(said, 2, "one warning per port:\n{err}");
    f.stop();
}

#[tokio::test]
async fn udp_closed_port_unreachable_root() {
    udp_closed_port_unreachable(Privilege::Root).await;
}

#[tokio::test]
async fn udp_closed_port_unreachable_rootless() {
    udp_closed_port_unreachable(Privilege::User).await;
}

/// A start without source preservation removes what a killed run with it
/// left in the child: rules, routes and sysctls.
async fn no_source_ip_start_cleans(privilege: Privilege) {
    let pair = pair(privilege);
    let before = routing_state(&pair.child);
    tcp_whoami(pair.child.listen("127.0.0.1:80"));
    let f = start(&pair, &["-p", "8080:80/tcp4"]);
    tcp_ask(&pair, &format!("{CLIENT4}:0"), &format!("{CLIENT4}:8080")).await;
    let agents = f.agent_pids();
    assert_eq!(agents.len(), 1, "{agents:?}");
    kill_both(f.pid, agents[0]).await;
    assert_ne!(routing_state(&pair.child), before, "nothing left to clean?");
    drop(f);
    let f = start(&pair, &["--no-source-ip", "-p", "8080:80/tcp4"]);
    assert_eq!(
        routing_state(&pair.child),
        before,
        "a --no-source-ip start left the killed run's routing\n{}",
        f.stderr()
    );
    let (_, seen) = tcp_ask(&pair, &format!("{CLIENT4}:0"), &format!("{CLIENT4}:8080")).await;
    assert!(seen.starts_with("127.0.0.1:"), "{seen}");
    f.stop();
}

#[tokio::test]
async fn no_source_ip_start_cleans_root() {
    no_source_ip_start_cleans(Privilege::Root).await;
}

#[tokio::test]
async fn no_source_ip_start_cleans_rootless() {
    no_source_ip_start_cleans(Privilege::User).await;
}

/// One client address and port on two published ports whose targets differ
/// only by address (servers bound to each): both flows are preserved and
/// answered, and each flow's rule goes with it alone.
#[tokio::test]
async fn udp_same_client_two_targets() {
    let pair = pair(Privilege::Root);
    udp_whoami(bind_in(&pair.child, "127.0.0.1:55", None));
    udp_whoami(bind_in(&pair.child, "127.0.0.2:55", None));
    let f = start(
        &pair,
        &[
            "--udp-idle-timeout",
            "1",
            "-p",
            "5355:55/udp4",
            "-p",
            "0.0.0.0:5359:127.0.0.2:55/udp4",
        ],
    );
    let from: SocketAddr = format!("{CLIENT4}:40001").parse().expect("from");
    let mut clients = Vec::new();
    for port in [5355, 5359] {
        let c = pair.parent.run(move || {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
                .expect("socket");
            s.set_reuse_address(true).expect("reuseaddr");
            s.bind(&from.into()).expect("bind");
            s.set_nonblocking(true).expect("nonblocking");
            std::net::UdpSocket::from(s)
        });
        let c = UdpSocket::from_std(c).expect("tokio");
        c.connect(format!("{CLIENT4}:{port}"))
            .await
            .expect("connect");
        clients.push(c);
    }
    let flows = |st: &str| st.matches("ipproto udp").count();
    for round in 0..2 {
        for (i, c) in clients.iter().enumerate() {
            c.send(b"who").await.expect("send");
            let mut buf = vec![0u8; 2048];
            let n = within(5, "a reply", c.recv(&mut buf)).await.expect("recv");
            assert_eq!(
                String::from_utf8_lossy(&buf[..n]),
                from.to_string(),
                "client {i}, round {round}"
            );
        }
        assert_eq!(flows(&routing_state(&pair.child)), 2);
    }
    wait_until_async(
        limit(Duration::from_secs(10)),
        "the flows' rules to go at their expiry",
        async || {
            let state = routing_state(&pair.child);
            (flows(&state) == 0).then_some(()).ok_or(state)
        },
    )
    .await;
    f.stop();
}

/// A client at 127.0.0.1, whose address the child owns too, is dialed from
/// a socket made ahead, without a request to the agent: in root mode by the
/// forwarder's own thread in the child, which makes them; rootless from
/// sockets the agent made in one go. With the agent stopped (SIGSTOP) such
/// clients are still served at once (root: any number; rootless: as many
/// as were made ahead), while a client whose address is preserved waits
/// for the agent; the stats count the sockets made ahead.
async fn local_clients_do_not_wait_on_the_agent(privilege: Privilege) {
    let pair = pair(privilege);
    tcp_whoami(pair.child.listen("127.0.0.1:80"));
    let mut f = start(&pair, &["-p", "127.0.0.1:8080:80"]);
    let agents = f.agent_pids();
    assert_eq!(agents.len(), 1, "no agent:\n{}", f.stderr());
    // The first local connection fills the pool.
    let (_, seen) = tcp_ask(&pair, "127.0.0.1:0", "127.0.0.1:8080").await;
    assert!(seen.starts_with("127.0.0.1:"), "{seen}");
    let pooled = wait_until(limit(Duration::from_secs(5)), "sockets made ahead", || {
        let n = f.stats()["pooled"]["sockets"].as_u64().unwrap_or(0);
        (n > 0).then_some(n).ok_or(n)
    });
    assert!(pooled <= 8, "{pooled} sockets made ahead, want at most 8");
    let agent = nix::unistd::Pid::from_raw(agents[0] as i32);
    nix::sys::signal::kill(agent, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP the agent");
    // A preserved client waits on the stopped agent, while local clients
    // are served, more than the pool holds; then the agent goes on.
    let preserved = async {
        let r = tcp_ask(&pair, "127.0.0.5:0", "127.0.0.1:8080").await;
        (r, std::time::Instant::now())
    };
    let locals = async {
        let n = match privilege {
            Privilege::Root => 20,
            _ => pooled,
        };
        for _ in 0..n {
            let (_, seen) = within(2, "a local client with the agent stopped", async {
                tcp_ask(&pair, "127.0.0.1:0", "127.0.0.1:8080").await
            })
            .await;
            assert!(seen.starts_with("127.0.0.1:"), "{seen}");
        }
        let resumed = std::time::Instant::now();
        nix::sys::signal::kill(agent, nix::sys::signal::Signal::SIGCONT)
            .expect("SIGCONT the agent");
        resumed
    };
    let (((me, seen), served), resumed) = tokio::join!(preserved, locals);
    assert!(
        served > resumed,
        "a preserved client was served with the agent stopped"
    );
    assert_eq!(seen, me.to_string(), "the agent preserves 127.0.0.5");
    f.stop();
}

#[tokio::test]
async fn local_clients_do_not_wait_on_the_agent_root() {
    local_clients_do_not_wait_on_the_agent(Privilege::Root).await;
}

#[tokio::test]
async fn local_clients_do_not_wait_on_the_agent_rootless() {
    local_clients_do_not_wait_on_the_agent(Privilege::User).await;
}

/// A preserved client's connection is dialed by the forwarder itself, from
/// a transparent socket the agent made ahead, when the agent's list of the
/// child's addresses is fresh: with the agent stopped (SIGSTOP), such
/// connections still reach the server with the client's address. Once the
/// list is older than its half-second lifetime, the next connection waits
/// for the agent, and is served, preserved, when the agent runs again.
async fn preserved_dials_do_not_wait_on_the_agent(privilege: Privilege) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let pair = pair(privilege);
    tcp_whoami(pair.child.listen("127.0.0.1:80"));
    let f = start(&pair, &["-p", "8080:80/tcp4"]);
    let (from, to) = (format!("{CLIENT4}:0"), format!("{CLIENT4}:8080"));
    // The first preserved dial goes to the agent and asks for sockets
    // made ahead, which bring the child's addresses.
    let (me, seen) = tcp_ask(&pair, &from, &to).await;
    assert_eq!(seen, me.to_string());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let agents = f.agent_pids();
    assert_eq!(agents.len(), 1, "{agents:?}");
    let agent = Pid::from_raw(agents[0] as i32);
    kill(agent, Signal::SIGSTOP).expect("SIGSTOP to the agent");
    for _ in 0..3 {
        let (me, seen) = tcp_ask(&pair, &from, &to).await;
        assert_eq!(seen, me.to_string(), "dialed with the agent stopped");
    }
    // The addresses are stale now: the next dial waits for the agent.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (me, mut r) = tcp_connect(&pair, &from, &to).await;
    let mut line = String::new();
    let waited = tokio::time::timeout(Duration::from_millis(300), r.read_line(&mut line))
        .await
        .is_err();
    kill(agent, Signal::SIGCONT).expect("SIGCONT to the agent");
    assert!(
        waited,
        "a dial with stale addresses did not wait for the agent: {line:?}"
    );
    within(10, "the server's report", r.read_line(&mut line))
        .await
        .expect("read the report");
    assert_eq!(line.trim(), me.to_string());
    f.stop();
}

#[tokio::test]
async fn preserved_dials_do_not_wait_on_the_agent_root() {
    preserved_dials_do_not_wait_on_the_agent(Privilege::Root).await;
}

#[tokio::test]
async fn preserved_dials_do_not_wait_on_the_agent_rootless() {
    preserved_dials_do_not_wait_on_the_agent(Privilege::User).await;
}
