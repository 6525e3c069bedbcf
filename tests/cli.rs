//! The command line: bad specs are refused before anything listens, engine
//! selection reports why, and the IPv6 publishing rules.

use std::process::{Command, Stdio};
use std::time::Duration;

use forwarder::wire;
use forwarder_tests::{
    echo_roundtrip, forwarder_bin, limit, require_root, servers, wait_until, wait_until_async,
    within, Fwd, Netns, Pair, Privilege,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[test]
fn bad_specs_are_refused_naming_the_spec() {
    require_root();
    let ns = Netns::new("cli");
    let cases = [
        ("80", "expected"),
        ("0:80", "out of range"),
        ("70000:80", "out of range"),
        ("abc:80", "not a number"),
        ("1.2.3.4.5:80:80", "not an IP address"),
        ("8080:80/sctp", "not supported yet"),
        ("8080:80/sctp7", "unknown protocol"),
        ("[::1:8080:80", "unterminated"),
        ("::1:8080:80", "brackets"),
        ("127.0.0.1:8080:[::1]:80", "family"),
        ("[::1]:8080:80/tcp4", "does not match"),
    ];
    // The test holds 127.0.0.1:9999 in the forwarder's namespace: a
    // forwarder that listened on the valid spec before validating the bad
    // one would fail with "address in use" instead of naming the bad spec.
    let _taken = ns.run(|| std::net::TcpListener::bind("127.0.0.1:9999").expect("bind 9999"));
    for (spec, want) in cases {
        for order in [["127.0.0.1:9999:80", spec], [spec, "127.0.0.1:9999:80"]] {
            let out = ns
                .command(forwarder_bin())
                .args(["run", "--child-netns"])
                .arg(ns.path())
                .args(["-p", order[0], "-p", order[1]])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .output()
                .expect("run forwarder");
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{order:?}: {err}");
            assert!(
                err.contains(spec),
                "{order:?}: message does not name the spec: {err}"
            );
            assert!(err.contains(want), "{order:?}: {err} (want {want:?})");
            assert!(
                !err.to_lowercase().contains("in use"),
                "{order:?}: listened before validating every spec: {err}"
            );
            assert!(out.stdout.is_empty(), "{order:?}: printed {:?}", out.stdout);
        }
    }
}

#[test]
fn nothing_to_publish_and_a_missing_namespace_are_errors() {
    require_root();
    let ns = Netns::new("cli");
    let out = ns
        .command(forwarder_bin())
        .args(["run", "--child-netns", "/proc/self/ns/net"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to publish"));
    let out = ns
        .command(forwarder_bin())
        .args([
            "run",
            "--child-netns",
            "/run/netns/does-not-exist",
            "-p",
            "9:9",
            "--mode",
            "copy",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/run/netns/does-not-exist"), "{err}");
}

/// Runs the forwarder as root without CAP_BPF, CAP_NET_ADMIN and
/// CAP_SYS_ADMIN (setpriv), inside `ns`, which is also its "child".
fn without_bpf(ns: &Netns, args: &[&str]) -> Command {
    let mut c = ns.command("setpriv");
    c.args([
        "--bounding-set",
        "-bpf,-net_admin,-sys_admin",
        "--inh-caps",
        "-bpf,-net_admin,-sys_admin",
    ])
    .arg(forwarder_bin())
    .args(["run", "--child-netns", "/proc/self/ns/net"])
    .args(args);
    c
}

#[test]
fn ebpf_mode_without_bpf_names_the_capability() {
    require_root();
    let ns = Netns::new("cli");
    let out = without_bpf(&ns, &["-p", "127.0.0.1:9998:80", "--mode", "ebpf"])
        .output()
        .expect("setpriv (util-linux)");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("CAP_BPF") && err.contains("CAP_NET_ADMIN"),
        "{err}"
    );
    assert!(err.contains("Operation not permitted"), "{err}");
}

#[tokio::test]
async fn auto_mode_runs_splice_and_says_why() {
    require_root();
    let ns = Netns::new("cli");
    let mut child = without_bpf(&ns, &["-p", "127.0.0.1:9997:80"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("setpriv");
    let mut out = child.stdout.take().expect("stdout");
    let line = tokio::task::spawn_blocking(move || {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while std::io::Read::read(&mut out, &mut byte)
            .map(|n| n == 1)
            .unwrap_or(false)
        {
            if byte[0] == b'\n' {
                break;
            }
            buf.push(byte[0]);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
    .await
    .expect("read");
    let _ = child.kill();
    let out = child.wait_with_output().expect("wait");
    let Ok(wire::Event::Ready(ready)) = serde_json::from_str(&line) else {
        panic!("not a ready event: {line}")
    };
    assert_eq!(ready.engine, wire::EngineKind::Splice);
    let reason = ready.reason;
    assert!(
        reason.contains("faster than the ebpf engine") && reason.contains("--mode ebpf"),
        "{reason}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("engine selected").count(), 1, "{err}");
}

/// A parent without IPv6 accepts `8080:80/tcp`, warns that the IPv6 half
/// was discarded, serves IPv4, and does not offer tcp6 in /v1/info.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parent_without_ipv6_keeps_the_ipv4_half() {
    let pair = Pair::new();
    pair.parent.disable_ipv6();
    servers::echo(pair.child.listen("127.0.0.1:80"));
    let dir = std::env::temp_dir().join(format!("fwt-api-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let sock = dir.join("api.sock");
    let sock_s = sock.display().to_string();
    let f = Fwd::start(
        &pair,
        &[
            "--mode",
            "splice",
            "-p",
            "8080:80/tcp",
            "--api-socket",
            &sock_s,
        ],
    );
    assert_eq!(
        f.ready["listeners"],
        serde_json::json!(["0.0.0.0:8080"]),
        "{}",
        f.ready
    );
    // The warning is logged before the ready line, but stderr is read by
    // another thread: wait for it to arrive.
    let err = f.wait_stderr("discarding the IPv6 half", Duration::from_secs(10));
    assert!(err.contains("discarding the IPv6 half"), "{err}");
    within(10, "IPv4 half", async {
        let mut c = pair.client("127.0.0.1:8080").await;
        c.write_all(b"v4").await.expect("write");
        let mut b = [0u8; 2];
        c.read_exact(&mut b).await.expect("read");
        assert_eq!(&b, b"v4");
    })
    .await;
    let info = Command::new("rootlessctl")
        .args(["--socket", &sock_s, "info", "--json"])
        .output()
        .expect("rootlessctl (cargo xtask setup installs it)");
    let text = String::from_utf8_lossy(&info.stdout);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{text}"));
    let protos = v["portDriver"]["protos"].to_string();
    assert!(
        protos.contains("\"tcp4\"")
            && !protos.contains("tcp6")
            && protos.contains("\"udp4\"")
            && !protos.contains("udp6"),
        "{v}"
    );
    // An explicit IPv6 request fails alone; the forwarder keeps serving.
    let add = Command::new("rootlessctl")
        .args(["--socket", &sock_s, "add-ports", "[::1]:8081:80/tcp6"])
        .output()
        .expect("rootlessctl");
    assert!(!add.status.success());
    assert!(
        String::from_utf8_lossy(&add.stderr).contains("no IPv6"),
        "{add:?}"
    );
    f.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Ports added through the API get the same dial rules: with IPv6
/// disabled in the child, a port published on [::1] via rootlessctl still
/// reaches the child's IPv4 server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_ports_fall_back_to_ipv4_in_the_child() {
    let pair = Pair::new();
    pair.child.disable_ipv6();
    servers::echo(pair.child.listen("127.0.0.1:80"));
    let dir = std::env::temp_dir().join(format!("fwt-api6-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let sock = dir.join("api.sock").display().to_string();
    let f = Fwd::start(&pair, &["--api-socket", &sock]);
    let add = Command::new("rootlessctl")
        .args(["--socket", &sock, "add-ports", "[::1]:8080:80/tcp6"])
        .output()
        .expect("rootlessctl");
    assert!(add.status.success(), "{add:?}");
    within(10, "v6 -> v4 through an API port", async {
        let mut c = pair.client("[::1]:8080").await;
        c.write_all(b"via the API").await.expect("write");
        let mut b = [0u8; 11];
        c.read_exact(&mut b).await.expect("read");
        assert_eq!(&b, b"via the API");
    })
    .await;
    f.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `forwarder ports add|ls|rm` and `forwarder status` against a running
/// forwarder's API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_and_status_commands() {
    let pair = Pair::new();
    servers::echo(pair.child.listen("127.0.0.1:80"));
    let dir = std::env::temp_dir().join(format!("fwt-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let sock = dir.join("api.sock").display().to_string();
    let f = Fwd::start(&pair, &["--mode", "copy", "--api-socket", &sock]);
    let cli = |args: &[&str]| api_client(&sock, args);
    let (ok, out, err) = cli(&["ports", "add", "127.0.0.1:8080:80"]);
    assert!(ok && out.trim() == "1", "{out}{err}");
    let (ok, _, err) = cli(&["ports", "add", "127.0.0.1:8080:81"]);
    assert!(!ok && err.contains("conflict with ID 1"), "{err}");
    let (ok, out, _) = cli(&["ports", "ls"]);
    assert!(
        ok && out.contains("127.0.0.1") && out.contains("8080"),
        "{out}"
    );
    let (ok, out, _) = cli(&["ports", "ls", "--json"]);
    let v: Vec<wire::PortStatus> =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(ok && v[0].spec.child_port == 80, "{v:?}");
    within(10, "traffic", async {
        let mut c = pair.client("127.0.0.1:8080").await;
        c.write_all(b"12345").await.expect("write");
        let mut b = [0u8; 5];
        c.read_exact(&mut b).await.expect("read");
    })
    .await;
    let (ok, out, _) = cli(&["status"]);
    assert!(ok && out.contains("engine: copy"), "{out}");
    let row = out
        .lines()
        .find(|l| l.starts_with("1 "))
        .unwrap_or_default()
        .to_string();
    assert!(
        row.contains("127.0.0.1:8080:80/tcp") && row.contains("5 B"),
        "{out}"
    );
    let (ok, out, _) = cli(&["ports", "rm", "1"]);
    assert!(ok && out.trim() == "1", "{out}");
    let (ok, _, err) = cli(&["ports", "rm", "1"]);
    assert!(!ok && err.contains("unknown id: 1"), "{err}");
    f.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `forwarder ARGS --api-socket SOCK`: (success, stdout, stderr).
fn api_client(sock: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(forwarder_bin())
        .args(args)
        .args(["--api-socket", sock])
        .output()
        .expect("forwarder client");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The dial agent goes away with its forwarder, even when the forwarder is
/// killed outright.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_exits_with_its_forwarder() {
    let pair = Pair::with(forwarder_tests::Privilege::User);
    let f = Fwd::start(&pair, &["-p", "127.0.0.1:8080:80"]);
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", f.pid)).unwrap_or_default();
    let agent: u32 = children
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                .unwrap_or_default()
                .contains("child-agent")
        })
        .expect("the forwarder started no agent");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(f.pid as i32, libc::SIGKILL) };
    wait_until_async(
        limit(Duration::from_secs(5)),
        &format!("agent {agent} to exit with its forwarder"),
        async || {
            let state = std::fs::read_to_string(format!("/proc/{agent}/stat")).unwrap_or_default();
            if state.is_empty() || state.contains(") Z") {
                Ok(())
            } else {
                Err(state)
            }
        },
    )
    .await;
    drop(f);
}

/// `forwarder check --json` as root: the programs load, both variants, and
/// auto mode picks splice, saying ebpf is available; as the
/// unprivileged test user: BPF is refused with the capability named and
/// auto mode picks splice. The text form says the same.
#[test]
fn check_reports_engines_and_the_auto_choice() {
    require_root();
    let run = |mut cmd: Command| -> (serde_json::Value, String) {
        let out = cmd
            .arg("check")
            .arg("--json")
            .stderr(Stdio::piped())
            .output()
            .expect("forwarder check");
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        (v, text)
    };
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    let (root, text) = run(Command::new(forwarder_bin()));
    assert_eq!(root["kernel"]["release"], release.trim(), "{text}");
    assert_eq!(root["probes"]["bpf"]["ok"], true, "{text}");
    assert_eq!(root["engines"]["ebpf"], true, "{text}");
    assert_eq!(root["engines"]["ebpf_parser"], true, "{text}");
    assert_eq!(root["engines"]["splice"], true, "{text}");
    // The local-client path loads here; its self-test decides whether the
    // kernel keeps blocking reads on admitted sockets, and with it auto
    // mode's choice: the path (engine ebpf, others on splice) or splice,
    // saying whether --mode ebpf would work and why the path is off.
    assert_eq!(root["probes"]["local_path"]["ok"], true, "{text}");
    let kept = root["probes"]["local_blocking_read"]["ok"].as_bool();
    let want = match kept {
        Some(true) => "ebpf",
        Some(false) => {
            let why = root["probes"]["local_blocking_read"]["error"]
                .as_str()
                .unwrap_or_default();
            assert!(
                why.contains("tcp_bpf_recvmsg") && why.contains("contrib/kernel"),
                "{text}"
            );
            let reason = root["auto"]["reason"].as_str().unwrap_or_default();
            assert!(
                reason.contains("available")
                    && reason.contains("--mode ebpf")
                    && reason.contains("local-client path is off"),
                "{text}"
            );
            "splice"
        }
        None => panic!("no self-test result: {text}"),
    };
    assert_eq!(root["auto"]["engine"], want, "{text}");
    // The same choice as `run` in auto mode makes here.
    let pair = Pair::new();
    let f = Fwd::start(&pair, &["-p", "127.0.0.1:8095:95"]);
    assert_eq!(f.engine(), want, "{}", f.ready);
    f.stop();

    let (user, text) = run(forwarder_tests::user_command(
        &forwarder_bin().display().to_string(),
    ));
    assert_eq!(user["probes"]["bpf"]["ok"], false, "{text}");
    let err = user["probes"]["bpf"]["error"].as_str().unwrap_or_default();
    assert!(err.contains("CAP_BPF"), "{text}");
    assert_eq!(user["engines"]["ebpf"], false, "{text}");
    assert_eq!(user["auto"]["engine"], "splice", "{text}");

    let out = forwarder_tests::user_command(&forwarder_bin().display().to_string())
        .arg("check")
        .output()
        .expect("forwarder check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("auto mode picks: splice"), "{text}");
    assert!(text.contains(release.trim()), "{text}");
}

/// Runs curl against the API socket (as the test user when `as_user`) and
/// returns (HTTP status, body).
fn curl_api(sock: &str, path: &str, as_user: bool) -> (u32, String) {
    let mut c = if as_user {
        forwarder_tests::user_command("curl")
    } else {
        Command::new("curl")
    };
    let out = c
        .args([
            "-s",
            "--max-time",
            "30",
            "-w",
            "\n%{http_code}",
            "--unix-socket",
            sock,
        ])
        .arg(format!("http://localhost{path}"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// The API serves only the forwarder's own uid and root, even with the
/// socket file's mode loosened: another user gets 403 with a message, the
/// refusals are logged at most once a second, and the owner is still
/// served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_refuses_other_users() {
    use std::os::unix::fs::PermissionsExt;
    let pair = Pair::new();
    let dir = std::env::temp_dir().join(format!("fwt-api403-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    let sock = dir.join("api.sock");
    let sock_s = sock.display().to_string();
    let f = Fwd::start(&pair, &["--mode", "copy", "--api-socket", &sock_s]);
    let mode = std::fs::metadata(&sock)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the API socket's mode");
    // As created, the file's mode already keeps the test user out.
    let (code, _) = curl_api(&sock_s, "/v1/ports", true);
    assert_eq!(code, 0, "the test user connected through a 0600 socket");
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    for _ in 0..20 {
        let (code, body) = curl_api(&sock_s, "/v1/ports", true);
        assert_eq!(code, 403, "{body}");
        let v: wire::ErrorBody =
            serde_json::from_str(&body).unwrap_or_else(|_| panic!("not an error body: {body}"));
        assert!(v.message.contains("permission denied"), "{v:?}");
    }
    let (code, body) = curl_api(&sock_s, "/v1/ports", false);
    assert_eq!((code, body.trim()), (200, "[]"), "root is served");
    let err = f.wait_stderr("refused an API connection", Duration::from_secs(5));
    let lines = err.matches("refused an API connection").count();
    // 20 refusals within a few seconds: a line a second at most.
    assert!((1..=4).contains(&lines), "{lines} log lines:\n{err}");
    f.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// What a client that holds an API connection without a request sends.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Holder {
    /// The first 8 bytes of a request head, then nothing.
    Slow,
    /// Nothing at all.
    Idle,
    /// One whole request (keep-alive), then nothing: idle between
    /// requests.
    KeepAlive,
}

/// Sends `req` on a new API connection and reads the answer to its end
/// (`req` says `connection: close`): the status and the body.
async fn api_exchange(sock: &std::path::Path, req: &str) -> Result<(u16, String), String> {
    let mut c = tokio::net::UnixStream::connect(sock)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    c.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    c.read_to_end(&mut raw)
        .await
        .map_err(|e| format!("read: {e}"))?;
    http_answer(&raw)
        .ok_or_else(|| format!("not an HTTP answer: {:?}", String::from_utf8_lossy(&raw)))
}

/// The status and body of one HTTP/1.1 answer.
fn http_answer(raw: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// A request with a JSON body and `connection: close`.
fn api_request(method: &str, path: &str, body: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Times one request on a new API connection; panics if there is no
/// answer within 10 s or the answer took 1 s or more.
async fn api_within_a_second(sock: &std::path::Path, what: &str, req: &str) -> (u16, String) {
    let t = std::time::Instant::now();
    let r = tokio::time::timeout(limit(Duration::from_secs(10)), api_exchange(sock, req)).await;
    let took = t.elapsed();
    let answer = match r {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => panic!("{what}: {e} after {took:?}"),
        Err(_) => panic!("{what}: no answer after {took:?} (want one within 1 s)"),
    };
    eprintln!("{what}: {} in {took:?}", answer.0);
    assert!(
        took < limit(Duration::from_secs(1)),
        "{what}: answered after {took:?} (want within 1 s)"
    );
    answer
}

/// The API stays responsive while 300 clients hold connections without
/// a request (a partial request head, nothing at all, or idle after a
/// request): `GET /v1/info`, `POST /v1/ports` and `DELETE` each answer
/// within a second; the forwarder holds at most 32 of them (plus the one
/// it is accepting) at any time; every one of them is closed cleanly
/// (an end of stream, after a 408 for a partial head) within the 5 s head
/// timeout; a client whose request head is complete is not closed to
/// make room (it finishes its body after the flood and gets its 201); a
/// client whose body stalls is answered within the 5 s body timeout; and
/// afterwards the forwarder holds no more descriptors than before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_slow_and_idle_clients_cannot_starve_it() {
    let pair = Pair::new();
    let dir = std::env::temp_dir().join(format!("fwt-apislow-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let sock = dir.join("api.sock");
    let sock_s = sock.display().to_string();
    let f = Fwd::start(&pair, &["--mode", "copy", "--api-socket", &sock_s]);
    // One request first, so what it opens lazily is in the baseline.
    let (code, body) = api_exchange(&sock, &api_request("GET", "/v1/info", ""))
        .await
        .expect("GET /v1/info");
    assert_eq!(code, 200, "{body}");
    // Its connection is closed just after the answer's end: the baseline
    // is the count once it holds still.
    let mut last = usize::MAX;
    let base = wait_until(
        limit(Duration::from_secs(2)),
        "the descriptor count to settle",
        || {
            let (was, now) = (last, f.fd_count());
            last = now;
            (now == was).then_some(now).ok_or(now)
        },
    );

    // A well-behaved client mid-request, connected before everyone else
    // (the oldest connection): its head and half its body now, the rest
    // after the flood.
    let spec = r#"{"proto":"tcp4","parentIP":"127.0.0.1","parentPort":8091,"childPort":91}"#;
    let req = api_request("POST", "/v1/ports", spec);
    let (first, rest) = req.split_at(req.len() - spec.len() / 2);
    let mut mid = tokio::net::UnixStream::connect(&sock)
        .await
        .expect("connect");
    mid.write_all(first.as_bytes()).await.expect("write");
    // A client whose body stalls: its head and 10 of 100 bytes.
    let mut stalled = tokio::net::UnixStream::connect(&sock)
        .await
        .expect("connect");
    let stalled_at = std::time::Instant::now();
    stalled
        .write_all(b"POST /v1/ports HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"proto\":")
        .await
        .expect("write");
    let stalled = tokio::spawn(async move {
        let mut raw = Vec::new();
        let r = stalled.read_to_end(&mut raw).await;
        (stalled_at.elapsed(), r.map(|_| raw))
    });

    let mut holders = Vec::new();
    let mut most = 0;
    for i in 0..300 {
        let kind = [Holder::Slow, Holder::Idle, Holder::KeepAlive][i % 3];
        let mut c = tokio::net::UnixStream::connect(&sock)
            .await
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        let opened = std::time::Instant::now();
        let sent = match kind {
            Holder::Slow => c.write_all(b"GET /v1/").await,
            Holder::Idle => Ok(()),
            Holder::KeepAlive => {
                c.write_all(b"GET /v1/info HTTP/1.1\r\nhost: x\r\n\r\n")
                    .await
            }
        };
        holders.push(tokio::spawn(async move {
            // A write that fails found the connection closed already.
            let mut raw = Vec::new();
            let r = match sent {
                Ok(()) => c.read_to_end(&mut raw).await.map(|_| raw),
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(Vec::new()),
                Err(e) => Err(e),
            };
            (kind, opened.elapsed(), r)
        }));
        if i % 25 == 24 {
            most = most.max(f.fd_count());
        }
    }

    // The timed requests, on new connections.
    let (code, body) =
        api_within_a_second(&sock, "GET /v1/info", &api_request("GET", "/v1/info", "")).await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = api_within_a_second(
        &sock,
        "POST /v1/ports",
        &api_request(
            "POST",
            "/v1/ports",
            r#"{"proto":"tcp4","parentIP":"127.0.0.1","parentPort":8092,"childPort":92}"#,
        ),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let added: wire::PortStatus = serde_json::from_str(&body).expect(&body);
    let (code, body) = api_within_a_second(
        &sock,
        "DELETE /v1/ports/ID",
        &api_request("DELETE", &format!("/v1/ports/{}", added.id), ""),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    // (Not sampled after the POST: the added port's listener may still be
    // closing.)
    assert!(
        most <= base + 33,
        "{most} descriptors with 300 API clients, {base} before: more than 32 connections held"
    );

    // The client mid-request was not closed to make room: it completes.
    let answer = within(5, "the client mid-request to be answered", async {
        mid.write_all(rest.as_bytes())
            .await
            .expect("write the rest");
        let mut raw = Vec::new();
        mid.read_to_end(&mut raw).await.map(|_| raw)
    })
    .await
    .expect("the client mid-request was cut off");
    let (code, body) =
        http_answer(&answer).unwrap_or_else(|| panic!("{:?}", String::from_utf8_lossy(&answer)));
    assert_eq!(code, 201, "the client mid-request: {body}");
    let added: wire::PortStatus = serde_json::from_str(&body).expect(&body);
    let (code, body) = api_exchange(
        &sock,
        &api_request("DELETE", &format!("/v1/ports/{}", added.id), ""),
    )
    .await
    .expect("DELETE");
    assert_eq!(code, 200, "{body}");

    // Every holder's connection ends cleanly (no reset), within the head
    // timeout of its start or of its last answer.
    let mut ended = Vec::new();
    within(20, "every holder's connection to be closed", async {
        for h in holders {
            ended.push(h.await.expect("holder task"));
        }
    })
    .await;
    let mut counts = std::collections::BTreeMap::new();
    for (i, (kind, took, r)) in ended.iter().enumerate() {
        let raw = r
            .as_ref()
            .unwrap_or_else(|e| panic!("holder {i} ({kind:?}): {e} after {took:?}"));
        let text = String::from_utf8_lossy(raw);
        assert!(
            *took < limit(Duration::from_secs(8)),
            "holder {i} ({kind:?}) closed after {took:?}"
        );
        let seen = match kind {
            Holder::Idle => text.is_empty(),
            Holder::Slow => text.is_empty() || text.starts_with("HTTP/1.1 408 "),
            Holder::KeepAlive => {
                text.is_empty() || (text.starts_with("HTTP/1.1 200 ") && text.ends_with('}'))
            }
        };
        assert!(seen, "holder {i} ({kind:?}) got {text:?}");
        *counts
            .entry(format!(
                "{kind:?} {}",
                text.get(..12).unwrap_or("(nothing)")
            ))
            .or_insert(0) += 1;
    }
    // Those still held after the flood were closed by the head timeout,
    // not before.
    let last = ended
        .iter()
        .map(|(_, took, _)| *took)
        .max()
        .unwrap_or_default();
    eprintln!(
        "holders' connections ended with: {counts:?}, the last after {last:?}; \
         at most {most} descriptors ({base} before)"
    );
    assert!(
        last >= Duration::from_secs(4),
        "the last holder was closed after {last:?}, before the 5 s head timeout"
    );

    let (took, r) = within(15, "the stalled body to be answered", stalled)
        .await
        .expect("stalled client's task");
    let raw = r.unwrap_or_else(|e| panic!("the stalled body: {e} after {took:?}"));
    let (code, body) =
        http_answer(&raw).unwrap_or_else(|| panic!("{:?}", String::from_utf8_lossy(&raw)));
    assert!(
        (400..500).contains(&code),
        "the stalled body: {code} {body}"
    );
    // Answered by the body timeout: serving, it was never closed to make
    // room.
    assert!(
        took >= Duration::from_secs(4) && took < limit(Duration::from_secs(8)),
        "the stalled body answered after {took:?}, want the 5 s body timeout"
    );

    // Nothing is left behind.
    wait_until(
        limit(Duration::from_secs(2)),
        "the API connections' descriptors to be closed",
        || {
            let fds = f.fd_count();
            (fds <= base)
                .then_some(())
                .ok_or(format!("{fds} descriptors, {base} before the clients"))
        },
    );
    f.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// With --child-pid the forwarder ends with the child, as RootlessKit
/// does: it serves while the child lives, and exits with status 1 naming
/// the child once it has exited, logging the reason once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_forwarder_exits_with_its_child() {
    let pair = Pair::new();
    servers::echo(pair.child.listen("127.0.0.1:80"));
    let mut child = pair
        .child
        .command("sleep")
        .arg("1000")
        .spawn()
        .expect("sleep");
    let pid = child.id();
    let args: Vec<String> = [
        "run",
        "--child-pid",
        &pid.to_string(),
        "--mode",
        "splice",
        "-p",
        "127.0.0.1:8080:80",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut f = Fwd::spawn(&pair.parent, &args, None);
    within(10, "serving while the child lives", async {
        let mut c = pair.client("127.0.0.1:8080").await;
        c.write_all(b"alive").await.expect("write");
        let mut b = [0u8; 5];
        c.read_exact(&mut b).await.expect("read");
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let st = f
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("still running 5 s after its child exited:\n{}", f.stderr()));
    // Status 1, as for any failure: a unit with Restart=on-failure starts
    // it again (contrib/systemd/forwarder.service).
    assert_eq!(st.code(), Some(1), "{st}");
    let err = f.stderr();
    assert!(
        err.contains(&format!("the child process {pid} exited")),
        "{err}"
    );
    assert_eq!(err.matches("the child process exited").count(), 1, "{err}");
}

/// A killed dial agent is restarted while the child lives: the log says so
/// once, the new agent holds no capability, and new connections are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_is_restarted() {
    let pair = Pair::with(forwarder_tests::Privilege::User);
    servers::echo(pair.child.listen("127.0.0.1:80"));
    let f = Fwd::start(&pair, &["-p", "127.0.0.1:8080:80"]);
    let old = f.agent_pids();
    assert_eq!(old.len(), 1, "agents: {old:?}");
    // SAFETY: signalling a process our forwarder started.
    unsafe { libc::kill(old[0] as i32, libc::SIGKILL) };
    wait_until_async(limit(Duration::from_secs(5)), "a new agent", async || {
        let new = f.agent_pids();
        if new.len() == 1 && new != old {
            Ok(())
        } else {
            Err(format!("agents {new:?}; stderr:\n{}", f.stderr()))
        }
    })
    .await;
    // Until the forwarder has switched to the new agent, a dial fails and
    // the client is reset (as documented): retry until served.
    pair.wait_served(
        "127.0.0.1:8080",
        Duration::from_secs(10),
        "a connection served through the new agent",
        &f,
    )
    .await;
    // Once it has dialed, the new agent has dropped its capabilities (it
    // drops them before it serves; checking as soon as its PID appears
    // raced with its start).
    f.assert_least_privilege();
    let err = f.stderr();
    assert_eq!(err.matches("restarted it").count(), 1, "{err}");
    f.stop();
}

/// A server in the child that answers each connection with the port it
/// was reached on, then closes.
fn says_its_port(l: tokio::net::TcpListener) {
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let port = s.local_addr().map(|a| a.port()).unwrap_or(0);
            let _ = s.write_all(port.to_string().as_bytes()).await;
            let _ = s.shutdown().await;
        }
    });
}

/// What the child server reached through `addr` in the parent says.
async fn child_port_via(pair: &Pair, addr: &str) -> String {
    let mut c = pair.client(addr).await;
    let mut got = String::new();
    c.read_to_string(&mut got).await.expect("read");
    got
}

/// Docker-style port ranges: `-p A-B:C-D` publishes every port of the
/// range (each reaching its own child port, TCP and UDP), a range with a
/// taken port is refused whole and leaves nothing listening (at start and
/// through `ports add`), and `A-B:C` publishes the first free port of the
/// range and says which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_ranges_publish_whole_or_not_at_all() {
    let pair = Pair::new();
    for p in 9000..=9003 {
        says_its_port(pair.child.listen(&format!("127.0.0.1:{p}")));
    }
    let udp_child = forwarder_tests::udp::bind_in(&pair.child, "127.0.0.1:9001", None);
    forwarder_tests::udp::whoami(udp_child, "udp9001");
    // 18200 is taken in the parent: `18200-18203:9000` must move on.
    let _taken = pair
        .parent
        .run(|| std::net::TcpListener::bind("127.0.0.1:18200").expect("bind 18200"));
    let dir = std::env::temp_dir().join(format!("fwt-range-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let sock = dir.join("api.sock").display().to_string();
    let f = Fwd::start(
        &pair,
        &[
            "--mode",
            "copy",
            "-p",
            "127.0.0.1:18000-18003:9000-9003",
            "-p",
            "127.0.0.1:18100-18101:9000-9001/udp",
            "-p",
            "127.0.0.1:18200-18203:9000",
            "--api-socket",
            &sock,
        ],
    );
    let listeners: Vec<String> = serde_json::from_value(f.ready["listeners"].clone())
        .unwrap_or_else(|e| panic!("{e}: {}", f.ready));
    let want: Vec<String> = [
        "18000", "18001", "18002", "18003", "18100", "18101", "18201",
    ]
    .iter()
    .map(|p| format!("127.0.0.1:{p}"))
    .collect();
    assert_eq!(listeners, want, "{}", f.ready);
    within(20, "every port of the range", async {
        for (parent, child) in (18000..=18003).zip(9000..=9003) {
            let got = child_port_via(&pair, &format!("127.0.0.1:{parent}")).await;
            assert_eq!(got, child.to_string(), "{parent}");
        }
        let got = child_port_via(&pair, "127.0.0.1:18201").await;
        assert_eq!(got, "9000", "the first free port of 18200-18203");
        let c = forwarder_tests::udp::client_in(&pair.parent, "127.0.0.1:18101");
        c.send(b"?").await.expect("send");
        let mut b = [0u8; 64];
        let n = c.recv(&mut b).await.expect("recv");
        let got = String::from_utf8_lossy(&b[..n]);
        assert!(got.starts_with("udp9001:"), "{got}");
    })
    .await;
    let err = f.wait_stderr("first free port", Duration::from_secs(10));
    assert!(
        err.contains("127.0.0.1:18200-18203:9000") && err.contains("18201"),
        "the log names the range and the port taken: {err}"
    );
    let cli = |args: &[&str]| api_client(&sock, args);
    // 18302 is taken by the test: the whole range is refused, and the
    // ports added before the refusal (18300, 18301) are removed again.
    let _taken2 = pair
        .parent
        .run(|| std::net::TcpListener::bind("127.0.0.1:18302").expect("bind 18302"));
    let (ok, out, err) = cli(&["ports", "add", "127.0.0.1:18300-18303:9000-9003"]);
    assert!(!ok && out.is_empty(), "{out}{err}");
    assert!(
        err.contains("127.0.0.1:18300-18303:9000-9003") && err.contains("removed again"),
        "{err}"
    );
    let (ok, out, _) = cli(&["ports", "ls", "--json"]);
    let ports: Vec<wire::PortStatus> =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(ok && ports.len() == 7, "{ports:?}");
    for p in [18300, 18301, 18303] {
        let r = pair.parent.connect(&format!("127.0.0.1:{p}")).await;
        assert!(
            r.is_err(),
            "{p} is still listening after the range was refused"
        );
    }
    // Through the API, a parent range to one port skips the taken one too
    // (IDs are never reused: 8 and 9 went to the refused range).
    let (ok, out, err) = cli(&["ports", "add", "127.0.0.1:18302-18303:9003"]);
    assert!(ok && out.trim() == "10", "{out}{err}");
    assert!(err.contains("127.0.0.1:18303:9003"), "{err}");
    let got = child_port_via(&pair, "127.0.0.1:18303").await;
    assert_eq!(got, "9003");
    f.stop();
    // At start, a range with a taken port is refused whole: the forwarder
    // exits naming the spec, before its ready line.
    let out = pair
        .parent
        .command(forwarder_bin())
        .args(["run", "--mode", "copy", "--child-netns"])
        .arg(pair.child.path())
        .args(["-p", "127.0.0.1:18400-18403:9000", "-p"])
        .args(["127.0.0.1:18301-18302:9000-9001"])
        .output()
        .expect("run forwarder");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("cannot publish 127.0.0.1:18301-18302:9000-9001") && err.contains("in use"),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "{:?}", out.stdout);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The warnings and errors among a forwarder's log lines.
fn warnings(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect()
}

/// A stop asked for reads as one: SIGTERM or SIGINT to the forwarder's
/// whole process group (what `systemctl stop`, `timeout` and Ctrl-C send:
/// its dial agent gets the signal too), or SIGTERM to the forwarder alone,
/// ends it with status 0 and not one warning or error in its log (or its
/// agent's), as root (the agent preserving source addresses) and rootless
/// (the agent dialing for it). The group's SIGTERM, the racy one, runs
/// three times each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stops_read_as_stops() {
    let stops = [
        ("SIGTERM to its process group", libc::SIGTERM, true),
        ("SIGTERM to its process group", libc::SIGTERM, true),
        ("SIGTERM to its process group", libc::SIGTERM, true),
        ("SIGINT to its process group", libc::SIGINT, true),
        ("SIGTERM to the forwarder alone", libc::SIGTERM, false),
    ];
    for privilege in [Privilege::Root, Privilege::User] {
        let pair = Pair::with(privilege);
        servers::echo(pair.child.listen("127.0.0.1:80"));
        for (what, sig, group) in stops {
            let f =
                Fwd::start_in_own_group(&pair, &["--mode", "splice", "-p", "127.0.0.1:8080:80"]);
            assert_eq!(
                f.agent_pids().len(),
                1,
                "{privilege:?}: the forwarder dials through an agent:\n{}",
                f.stderr()
            );
            within(10, "a connection through the agent", async {
                let mut c = pair.client("127.0.0.1:8080").await;
                echo_roundtrip(&mut c, b"served").await;
            })
            .await;
            let (status, log) = f.stop_by(&[sig], group);
            assert!(
                status.success(),
                "{privilege:?}, {what}: exited with {status}:\n{log}"
            );
            assert!(
                log.contains("shutting down"),
                "{privilege:?}, {what}:\n{log}"
            );
            let bad = warnings(&log);
            assert!(
                bad.is_empty(),
                "{privilege:?}, {what}: a clean stop logged {bad:#?}\nwhole log:\n{log}"
            );
        }
    }
}

/// A PID nothing runs as.
fn unused_pid() -> u32 {
    (999_999..)
        .find(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
        .expect("a free PID")
}

/// A child that cannot be used is the first and only thing said: a missing
/// or wrong `--child-netns` path and a `--child-pid` nothing runs as exit 1
/// naming it, with no warning about source preservation (or anything else)
/// before.
#[test]
fn a_bad_child_is_the_first_thing_said() {
    require_root();
    let ns = Netns::new("cli");
    let pid = unused_pid().to_string();
    let cases = [
        (
            ["--child-netns", "/run/netns/does-not-exist"],
            "cannot open network namespace /run/netns/does-not-exist: No such file or directory"
                .to_string(),
        ),
        (
            ["--child-netns", "/etc/hostname"],
            "/etc/hostname is not a network namespace".to_string(),
        ),
        (["--child-pid", &pid], format!("no such process {pid}")),
    ];
    for (child, want) in cases {
        let out = ns
            .command(forwarder_bin())
            .arg("run")
            .args(child)
            .args(["-p", "127.0.0.1:18090:80", "--mode", "copy"])
            .output()
            .expect("run forwarder");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{child:?}: {err}");
        let first = err.lines().next().unwrap_or_default();
        assert!(
            first.contains(&want),
            "{child:?}: the first line should say {want:?}:\n{err}"
        );
        assert!(warnings(&err).is_empty(), "{child:?}:\n{err}");
        assert!(
            !err.contains("cannot open network namespace /proc/"),
            "{child:?}:\n{err}"
        );
    }
}

/// `--child-pid` naming another user's process, as an unprivileged user:
/// refused with what is wrong (permission to enter that process's
/// namespaces, whose uid it runs as) and what to do about it, not a bare
/// "Permission denied", and nothing before it.
#[test]
fn another_users_process_is_refused_naming_the_fix() {
    require_root();
    let ns = Netns::new("cli");
    let mut sleeper = ns.command("sleep").arg("60").spawn().expect("sleep");
    let pid = sleeper.id();
    let (uid, gid) = forwarder_tests::test_user();
    let mut cmd = ns.command(forwarder_bin());
    // SAFETY: drop_to_user makes only raw syscalls (after the namespace
    // hook, which runs first).
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            forwarder_tests::drop_to_user(uid, gid, false)
        });
    }
    let out = cmd
        .args(["run", "--child-pid", &pid.to_string()])
        .args(["-p", "127.0.0.1:18091:80", "--mode", "copy"])
        .output()
        .expect("run forwarder as the test user");
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let first = err.lines().next().unwrap_or_default();
    for want in [
        format!("permission denied to enter the namespaces of process {pid}"),
        "which runs as uid 0".to_string(),
        format!("this forwarder runs as uid {uid}"),
        "CAP_SYS_PTRACE".to_string(),
        "run the forwarder as the user that started the container, or as root".to_string(),
    ] {
        assert!(
            first.contains(&want),
            "want {want:?} in the first line:\n{err}"
        );
    }
    assert!(warnings(&err).is_empty(), "{err}");
}

/// A command line refused by the checks across options shows the usage
/// of the subcommand at fault (`forwarder run ...`), as clap's own errors
/// do, not the top level's.
#[test]
fn refused_options_show_their_subcommands_usage() {
    let cases: [(&[&str], &str); 3] = [
        (
            &["run", "--child-pid", "1", "-p", "8080:80", "-p", "8080:80"],
            "Usage: forwarder run ",
        ),
        (
            &["attach-docker", "--mode", "copy", "--ebpf-parser"],
            "Usage: forwarder attach-docker ",
        ),
        (&["ports", "ls"], "Usage: forwarder ports "),
    ];
    for (args, want) in cases {
        let out = Command::new(forwarder_bin())
            .args(args)
            .output()
            .expect("forwarder");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: want {want:?}:\n{err}");
        assert!(
            !err.contains("Usage: forwarder <COMMAND>"),
            "{args:?}:\n{err}"
        );
    }
}

/// Sends `head` and then `body` (less than the head's Content-Length) to
/// the API socket, then stalls or, with `close`, shuts the writing half;
/// returns the status and the error message of the reply.
async fn short_body(sock: &std::path::Path, body: &[u8], close: bool) -> (u32, String) {
    let mut s = tokio::net::UnixStream::connect(sock)
        .await
        .expect("connect");
    let head = "POST /v1/ports HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
                Content-Length: 100\r\n\r\n";
    s.write_all(head.as_bytes()).await.expect("head");
    s.write_all(body).await.expect("body");
    if close {
        s.shutdown().await.expect("shutdown");
    }
    let mut reply = Vec::new();
    // The API waits 10 s without progress before it gives up on a read.
    let _ = tokio::time::timeout(limit(Duration::from_secs(40)), async {
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
            reply.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&reply);
            if text.contains("\r\n\r\n{") && text.trim_end().ends_with('}') {
                break;
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&reply).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP reply: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    let v: wire::ErrorBody =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: not an error body: {text}"));
    (code, v.message)
}

/// A POST whose body stops short of its Content-Length is answered for
/// what it is: 408 "not received in time" when the client stalls, 400
/// "incomplete" when it closes first; never "larger than 64 KiB". The
/// forwarder logs no warning about it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_api_body_is_named_for_what_it_is() {
    let pair = Pair::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("api.sock");
    let f = Fwd::start(
        &pair,
        &[
            "--mode",
            "copy",
            "--api-socket",
            &sock.display().to_string(),
        ],
    );
    let (code, msg) = short_body(&sock, b"{", false).await;
    assert_eq!(code, 408, "{msg}");
    assert!(msg.contains("request body not received in time"), "{msg}");
    let (code, msg) = short_body(&sock, b"{", true).await;
    assert_eq!(code, 400, "{msg}");
    assert!(msg.contains("request body incomplete"), "{msg}");
    assert!(!msg.contains("larger than"), "{msg}");
    let log = f.stderr();
    assert!(warnings(&log).is_empty(), "{log}");
    f.stop();
}

/// Out of descriptors, the failures say so and name the limit: with
/// RLIMIT_NOFILE 64, a connection whose dialed socket cannot be received
/// from the dial agent is reset with "out of file descriptors ...
/// LimitNOFILE" in the log (not "agent replied without a socket"), and
/// every warning logged says the same (none unrelated comes first). The
/// clients are at 127.0.0.5, whose address the agent preserves: a client
/// at 127.0.0.1 is dialed by the forwarder's own thread in the child, from
/// sockets made ahead, and never waits on the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_is_named() {
    const NOFILE: usize = 64;
    let pair = Pair::new();
    // The client's address, 127.0.0.5, is the child's too: its source is
    // not preserved, but the agent decides that, so every dial takes the
    // round trip to the agent and a socket sent back (the forwarder dials
    // preserved clients itself, from transparent sockets made ahead).
    let st = pair
        .child
        .command("ip")
        .args(["addr", "add", "127.0.0.5/8", "dev", "lo"])
        .status()
        .expect("ip addr add");
    assert!(st.success(), "ip addr add 127.0.0.5/8 in the child: {st}");
    servers::echo(pair.child.listen("127.0.0.1:80"));
    forwarder_tests::udp::echo(forwarder_tests::udp::bind_in(
        &pair.child,
        "127.0.0.1:53",
        None,
    ));
    let f = Fwd::start_with_nofile(
        &pair,
        &[
            "--mode",
            "copy",
            "--max-connections",
            "1000",
            "-p",
            "127.0.0.1:8080:80",
            "-p",
            "127.0.0.1:8053:53/udp",
        ],
        NOFILE as u64,
    );
    assert_eq!(f.agent_pids().len(), 1, "no agent:\n{}", f.stderr());
    // A UDP flow holds one descriptor (its socket, dialed by the agent).
    let flow = async || {
        let c = forwarder_tests::udp::bind_in(&pair.parent, "127.0.0.5:0", None);
        c.connect("127.0.0.1:8053").await.expect("connect");
        c.send(b"1").await.expect("send");
        let mut b = [0u8; 8];
        within(5, "a UDP echo", c.recv(&mut b)).await.expect("recv");
        c
    };
    let server: std::net::SocketAddr = "127.0.0.1:8080".parse().expect("address");
    let client = Some("127.0.0.5:0".parse().expect("address"));
    // A first connection: whatever the forwarder opens on the way is open.
    let mut first = pair
        .parent
        .connect_from(client, server)
        .await
        .expect("connect");
    echo_roundtrip(&mut first, b"ping").await;
    // The transparent sockets that dial asked the agent for (8, kept:
    // no dial uses them) arrive meanwhile.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut held = vec![first];
    // A TCP connection holds two (accepted, dialed). Leave an odd number
    // free, so that the last connection's accept takes the last one and
    // its dialed socket, sent back by the agent, cannot be received.
    // Descriptors it inherited above the limit (a job server's, say) take
    // no slot.
    let slots_taken = || {
        std::fs::read_dir(format!("/proc/{}/fd", f.pid))
            .expect("the forwarder's descriptors")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<usize>().ok())
            .filter(|&n| n < NOFILE)
            .count()
    };
    let mut flows = Vec::new();
    if (NOFILE - slots_taken()).is_multiple_of(2) {
        flows.push(flow().await);
    }
    let free = NOFILE - slots_taken();
    assert_eq!(free % 2, 1, "{free} descriptors free");
    let fails = within(30, "running out of descriptors", async {
        for _ in 0..free {
            let served = async {
                // The reset may come as early as the connect.
                let mut c = pair.parent.connect_from(client, server).await?;
                let mut b = [0u8; 4];
                c.write_all(b"ping").await?;
                c.read_exact(&mut b).await?;
                Ok::<_, std::io::Error>(c)
            };
            match tokio::time::timeout(Duration::from_secs(5), served).await {
                Ok(Ok(c)) => held.push(c),
                Ok(Err(e)) => return e,
                Err(_) => panic!("a client waited instead of being reset:\n{}", f.stderr()),
            }
        }
        panic!("{free} more connections and none failed:\n{}", f.stderr())
    })
    .await;
    let log = f.wait_stderr("dial in the child failed", Duration::from_secs(5));
    let lines = warnings(&log);
    let dial = lines
        .iter()
        .find(|l| l.contains("dial in the child failed, client reset"))
        .unwrap_or_else(|| panic!("no dial failure logged; the client saw {fails}:\n{log}"));
    assert!(
        dial.contains("could not take the socket the dial agent connected"),
        "{dial}"
    );
    // Every warning names the cause and what to change: the dial's, and
    // the accept loop's (accept(2) wants a free descriptor before it looks
    // for a client, so the loop meets the full table first).
    for l in &lines {
        for want in [
            "Too many open files",
            "out of file descriptors: the limit is 64 (RLIMIT_NOFILE)",
            "LimitNOFILE=",
        ] {
            assert!(
                l.contains(want),
                "{want:?} missing from {l:?}; whole log:\n{log}"
            );
        }
    }
    assert!(!log.contains("without a socket"), "{log}");
    drop(held);
    drop(flows);
}
