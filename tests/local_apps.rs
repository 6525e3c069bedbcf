//! Applications we do not control on the local-client path: real clients
//! in the parent namespace (curl, Python's three socket styles, iperf3
//! with sendfile, Rust sockets using the less common parts of the socket
//! API) and real servers in the child (Python's http.server, an echo, a
//! reader using splice(2)), through `--mode ebpf --local-path`. Each case
//! checks the bytes exactly, bounds every wait, and asserts that the
//! path carried bytes (`msg`) and refused no admission.
//!
//! nginx is not installed on the test hosts; no case runs it.
//!
//! FWD_TEST_APPS_MODE=splice runs the same cases through `--mode splice`
//! (no path counts checked), to tell a forwarder or kernel problem from
//! the application's own.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use forwarder_tests::data::{expected_hash, hex, Pattern, Tally};
use forwarder_tests::iperf::{iperf, Iperf};
use forwarder_tests::{limit, wait_until, Fwd, Pair};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The tests of this binary run one at a time: each attaches `sock_ops`
/// at the cgroup root, and the bulk cases would share 2 CPUs.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// True unless FWD_TEST_APPS_MODE=splice asked for the comparison run.
fn local_path() -> bool {
    std::env::var("FWD_TEST_APPS_MODE").as_deref() != Ok("splice")
}

/// A forwarder publishing 127.0.0.1:`port` to the child's `cport`, with
/// the local-client path on (or `--mode splice`, see [`local_path`]).
fn start(pair: &Pair, port: u16, cport: u16) -> Fwd {
    let spec = format!("127.0.0.1:{port}:{cport}");
    let mode: &[&str] = if local_path() {
        &["--mode", "ebpf", "--local-path"]
    } else {
        &["--mode", "splice"]
    };
    let mut args = mode.to_vec();
    args.extend(["-p", &spec]);
    let f = Fwd::start(pair, &args);
    if local_path() {
        assert!(
            f.wait_stderr("local-client path on", Duration::from_secs(5))
                .contains("local-client path on"),
            "{}",
            f.stderr()
        );
    }
    f
}

/// Stops the forwarder after checking it left nothing behind, and asserts
/// that the path carried bytes and refused no admission.
async fn finish(mut f: Fwd) -> Value {
    f.assert_clean().await;
    let st = f.stop();
    if local_path() {
        let msg = st["bytes_by_path"]["msg"].as_u64();
        assert!(msg > Some(0), "nothing on the local path: {st}");
        assert_eq!(
            st["local_path"]["refused"].as_u64(),
            Some(0),
            "admissions refused: {st}"
        );
    }
    st
}

/// Waits until the forwarder has handed `n` connections to the path (each
/// sender's link is in FWD_LINKS, the handoff's last step), so that what a
/// case sends next can take it.
fn wait_handed_off(f: &Fwd, n: u64) {
    if !local_path() {
        return;
    }
    wait_until(
        limit(Duration::from_secs(5)),
        "the handoff to the path",
        || {
            let maps = f.bpf_maps();
            match maps.iter().find(|m| m.name == "FWD_LINKS") {
                Some(m) if m.entries as u64 >= 2 * n => Ok(()),
                _ => Err(format!("maps: {maps:?}")),
            }
        },
    );
}

/// Waits until something accepts connections on 127.0.0.1:`port` in the
/// child (a server started as a process).
fn wait_listening(pair: &Pair, port: u16) {
    wait_until(
        limit(Duration::from_secs(10)),
        &format!("a server on port {port} in the child"),
        || {
            pair.child
                .run(move || TcpStream::connect(("127.0.0.1", port)))
                .map(drop)
                .map_err(|e| e.to_string())
        },
    );
}

/// A process killed when dropped.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cmd` to completion within `secs`; panics with its output if it
/// fails or takes longer. Returns its stdout.
async fn run(cmd: std::process::Command, secs: u64, what: &str, f: &Fwd) -> String {
    run_after(cmd, secs, what, f, None).await
}

/// Like [`run`]; with `go`, writes a line to the command's stdin once
/// `go` returned (the command waits for it).
async fn run_after(
    cmd: std::process::Command,
    secs: u64,
    what: &str,
    f: &Fwd,
    go: Option<&dyn Fn()>,
) -> String {
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true)
        .stdin(if go.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{what}: {e}"));
    if let Some(go) = go {
        go();
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"go\n").await.expect("write to stdin");
    }
    let o = tokio::time::timeout(limit(Duration::from_secs(secs)), child.wait_with_output())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{what} still running after {secs} s; the forwarder's stderr:\n{}",
                f.stderr()
            )
        })
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        o.status.success(),
        "{what} failed ({}): {}{}; the forwarder's stderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        f.stderr()
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// curl downloads 64 MiB from Python's http.server in the child; the file
/// arrives whole (SHA-256).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_downloads_from_python_http_server() {
    let _alone = ONE_AT_A_TIME.lock().await;
    const LEN: u64 = 64 << 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut file = std::fs::File::create(dir.path().join("blob")).expect("blob");
    let (mut p, mut buf) = (Pattern::new(1, LEN), vec![0u8; 64 * 1024]);
    while let Some(n) = p.next_chunk(&mut buf) {
        file.write_all(&buf[..n]).expect("write blob");
    }
    drop(file);
    let pair = Pair::new();
    let _server = Proc(
        pair.child
            .command("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1", "--directory"])
            .arg(dir.path())
            .arg("80")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m http.server"),
    );
    wait_listening(&pair, 80);
    let f = start(&pair, 8080, 80);
    let out = dir.path().join("got");
    let mut curl = pair.parent.command("curl");
    curl.args(["-sS", "--fail", "--max-time", "60", "-o"])
        .arg(&out)
        .arg("http://127.0.0.1:8080/blob");
    run(curl, 60, "curl", &f).await;
    let got = std::fs::read(&out).expect("curl's output");
    assert_eq!(got.len() as u64, LEN, "curl's file is not whole");
    assert_eq!(hex(&Sha256::digest(&got)), expected_hash(1, LEN));
    finish(f).await;
}

/// The Python client: connects to 127.0.0.1:PORT, waits for a line on
/// stdin (the test's word that the connection was handed to the path),
/// writes N bytes (1 KiB first, within the target's credit) while a
/// reader reads the echo (blocking: a writer thread; select: one
/// non-blocking loop; asyncio: a writer and a reader task), half-closes,
/// and prints the SHA-256 of what it sent, of what it read, and the count
/// read.
const PY_CLIENT: &str = r#"
import asyncio, hashlib, random, select, socket, sys, threading
mode, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = random.Random(7).randbytes(n)
CH = 1 << 16
FIRST = 1024

def report(got):
    print(hashlib.sha256(data).hexdigest(), hashlib.sha256(got).hexdigest(), len(got))

if mode == "blocking":
    s = socket.create_connection(("127.0.0.1", port))
    sys.stdin.readline()
    got, failed = bytearray(), []
    def reader():
        try:
            while True:
                b = s.recv(CH)
                if not b:
                    return
                got.extend(b)
        except OSError as e:
            failed.append(e)
    t = threading.Thread(target=reader)
    t.start()
    s.sendall(data[:FIRST])
    s.sendall(data[FIRST:])
    s.shutdown(socket.SHUT_WR)
    t.join()
    if failed:
        sys.exit(f"the reader thread, after {len(got)} bytes: {failed[0]!r}")
    report(bytes(got))
elif mode == "select":
    s = socket.create_connection(("127.0.0.1", port))
    sys.stdin.readline()
    s.setblocking(False)
    view, sent, got, wr = memoryview(data), 0, bytearray(), True
    while True:
        r, w, _ = select.select([s], [s] if wr else [], [], 20)
        if not r and not w:
            sys.exit("select: nothing ready within 20 s")
        if w:
            try:
                sent += s.send(view[sent:sent + (CH if sent else FIRST)])
            except BlockingIOError:
                pass
            if sent == n:
                s.shutdown(socket.SHUT_WR)
                wr = False
        if r:
            try:
                b = s.recv(CH)
            except BlockingIOError:
                continue
            if not b:
                break
            got.extend(b)
    report(bytes(got))
elif mode == "asyncio":
    async def main():
        r, w = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        async def writer():
            w.write(data[:FIRST])
            await w.drain()
            for i in range(FIRST, n, CH):
                w.write(data[i:i + CH])
                await w.drain()
            w.write_eof()
        async def reader():
            got = bytearray()
            while True:
                b = await r.read(CH)
                if not b:
                    return bytes(got)
                got.extend(b)
        _, got = await asyncio.gather(writer(), reader())
        w.close()
        report(got)
    asyncio.run(asyncio.wait_for(main(), 60))
"#;

/// An echo server in the child on `port` that hashes what it echoes and
/// reports (count, SHA-256) of each connection when its client
/// half-closed.
fn hashing_echo(pair: &Pair, port: u16) -> tokio::sync::mpsc::UnboundedReceiver<(u64, String)> {
    let l = pair.child.listen(&format!("127.0.0.1:{port}"));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let (mut t, mut buf) = (Tally::default(), vec![0u8; 64 * 1024]);
                loop {
                    let n = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    t.add(&buf[..n]);
                    if s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = s.shutdown().await;
                let _ = tx.send(t.finish());
            });
        }
    });
    rx
}

/// One Python client of style `mode` echoes 16 MiB through the path:
/// the echo server received exactly what the client sent, and the client
/// read it all back.
async fn python_echo(mode: &str, port: u16) {
    let _alone = ONE_AT_A_TIME.lock().await;
    const LEN: u64 = 16 << 20;
    let pair = Pair::new();
    let mut echoed = hashing_echo(&pair, 7);
    let f = start(&pair, port, 7);
    let mut py = pair.parent.command("python3");
    py.args(["-c", PY_CLIENT, mode, &port.to_string(), &LEN.to_string()]);
    let what = format!("the {mode} Python client");
    let out = run_after(py, 60, &what, &f, Some(&|| wait_handed_off(&f, 1))).await;
    let v: Vec<&str> = out.split_whitespace().collect();
    let [sent, got, n] = v[..] else {
        panic!("the Python client printed {out:?}");
    };
    assert_eq!(
        n,
        LEN.to_string(),
        "the client read back {n} of {LEN} bytes"
    );
    assert_eq!(got, sent, "the client read back other bytes than it sent");
    let server = tokio::time::timeout(limit(Duration::from_secs(10)), echoed.recv())
        .await
        .expect("the echo server's connection to end")
        .expect("the echo server's report");
    assert_eq!(
        server,
        (LEN, sent.to_string()),
        "the server received other bytes"
    );
    finish(f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "without contrib/kernel's tcp_bpf_recvmsg patch (6.18, 6.12.118) a blocking reader thread gets EAGAIN when the writer thread's write space wakes it (fails under CPU load)"]
async fn python_blocking_client_echoes() {
    python_echo("blocking", 8007).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_select_client_echoes() {
    python_echo("select", 8008).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_asyncio_client_echoes() {
    python_echo("asyncio", 8009).await;
}

/// iperf3 -Z (the sender uses sendfile) forward and reverse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iperf3_sendfile_both_ways() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let pair = Pair::new();
    let _server = Iperf::serve(&pair, 96);
    let f = start(&pair, 8096, 96);
    for flags in [&["-Z"][..], &["-Z", "-R"]] {
        iperf(&pair, 8096, flags, &f).await;
    }
    finish(f).await;
}

/// A server in the child on `port` that serves one connection with `serve`
/// on its own thread; its result arrives on the returned channel.
fn serve_one<T: Send + 'static>(
    pair: &Pair,
    port: u16,
    serve: impl FnOnce(TcpStream) -> T + Send + 'static,
) -> mpsc::Receiver<T> {
    let l = pair
        .child
        .run(move || std::net::TcpListener::bind(("127.0.0.1", port)))
        .expect("listen in the child");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        if let Ok((s, _)) = l.accept() {
            s.set_read_timeout(Some(Duration::from_secs(20))).ok();
            s.set_write_timeout(Some(Duration::from_secs(20))).ok();
            let _ = tx.send(serve(s));
        }
    });
    rx
}

/// The server's result, within 20 s.
fn served<T>(rx: &mpsc::Receiver<T>, f: &Fwd) -> T {
    rx.recv_timeout(limit(Duration::from_secs(20)))
        .unwrap_or_else(|e| panic!("the server: {e}; the forwarder's stderr:\n{}", f.stderr()))
}

/// A client socket in the parent, connected to 127.0.0.1:`port`, with
/// 10 s read and write timeouts so no case hangs.
fn client(pair: &Pair, port: u16) -> TcpStream {
    let s = pair
        .parent
        .run(move || TcpStream::connect(("127.0.0.1", port)))
        .unwrap_or_else(|e| panic!("connect to {port}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    s.set_write_timeout(Some(Duration::from_secs(10))).ok();
    s
}

/// A server that reads with splice(2), socket → pipe → file, counts 16 MiB
/// and the right hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_reading_server() {
    use nix::fcntl::{splice, SpliceFFlags};
    let _alone = ONE_AT_A_TIME.lock().await;
    const LEN: u64 = 16 << 20;
    let pair = Pair::new();
    let done = serve_one(&pair, 9, |s| {
        let (rp, wp) = nix::unistd::pipe().expect("pipe");
        let mut file = tempfile::tempfile().expect("tempfile");
        let mut total = 0u64;
        loop {
            let n = splice(&s, None, &wp, None, 1 << 20, SpliceFFlags::SPLICE_F_MOVE)
                .expect("splice socket -> pipe");
            if n == 0 {
                break;
            }
            let mut left = n;
            while left > 0 {
                left -= splice(&rp, None, &file, None, left, SpliceFFlags::SPLICE_F_MOVE)
                    .expect("splice pipe -> file");
            }
            total += n as u64;
        }
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        std::io::Seek::rewind(&mut file).expect("rewind");
        loop {
            let n = file.read(&mut buf).expect("read the file");
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        (total, hex(&h.finalize()))
    });
    let f = start(&pair, 8009, 9);
    let mut c = client(&pair, 8009);
    wait_handed_off(&f, 1);
    // A first send within the target's credit takes the path; the bulk
    // after it may take TCP (a writer that never pauses, on a busy host).
    let (mut p, mut buf) = (Pattern::new(3, LEN), vec![0u8; 64 * 1024]);
    let mut first = true;
    while let Some(n) = p.next_chunk(&mut buf[..if first { 1024 } else { 64 * 1024 }]) {
        c.write_all(&buf[..n]).expect("send");
        first = false;
    }
    c.shutdown(Shutdown::Write).expect("shutdown");
    let got = served(&done, &f);
    assert_eq!(
        got,
        (LEN, expected_hash(3, LEN)),
        "the splice reader's bytes"
    );
    drop(c);
    finish(f).await;
}

/// One connection through a fresh forwarder to a child server running
/// `serve`, handed to the path before `client_side` runs on (and closes)
/// it. Returns what each side returned.
async fn socket_case<T: Send + 'static, U>(
    serve: impl FnOnce(TcpStream) -> T + Send + 'static,
    client_side: impl FnOnce(TcpStream) -> U,
) -> (T, U) {
    let pair = Pair::new();
    let done = serve_one(&pair, 10, serve);
    let f = start(&pair, 8010, 10);
    let c = client(&pair, 8010);
    wait_handed_off(&f, 1);
    let mine = client_side(c);
    let theirs = served(&done, &f);
    finish(f).await;
    (theirs, mine)
}

/// Echoes until EOF.
fn echo_until_eof(mut s: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 || s.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

/// Waits up to 5 s until `c` is readable (poll); returns what FIONREAD
/// says it holds then.
fn wait_readable(c: &TcpStream) -> usize {
    let mut pfd = libc::pollfd {
        fd: c.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let r = unsafe {
        libc::poll(
            &mut pfd,
            1,
            limit(Duration::from_secs(5)).as_millis() as i32,
        )
    };
    assert_eq!(r, 1, "nothing to read within 5 s");
    fionread(c)
}

/// What FIONREAD says `c` holds.
fn fionread(c: &TcpStream) -> usize {
    let mut avail: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the pointer.
    let r = unsafe { libc::ioctl(c.as_raw_fd(), libc::FIONREAD, &mut avail) };
    assert_eq!(r, 0, "FIONREAD: {}", std::io::Error::last_os_error());
    avail as usize
}

/// MSG_PEEK shows the bytes that the next read then returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peek_then_read() {
    let _alone = ONE_AT_A_TIME.lock().await;
    socket_case(echo_until_eof, |mut c| {
        let c = &mut c;
        c.write_all(b"peek at me").expect("send");
        wait_readable(c);
        let mut peeked = [0u8; 10];
        let n = c.peek(&mut peeked).expect("peek");
        assert!(n > 0, "MSG_PEEK returned nothing from a readable socket");
        let mut read = [0u8; 10];
        c.read_exact(&mut read[..n]).expect("read");
        assert_eq!(read[..n], peeked[..n], "read other bytes than peeked");
        c.read_exact(&mut read[n..]).expect("read the rest");
        assert_eq!(&read, b"peek at me");
        c.shutdown(Shutdown::Write).expect("shutdown");
    })
    .await;
}

/// FIONREAD counts what arrived before it is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "before the stable fix (in 6.12.118, not in 6.18.44) tcp_bpf_ioctl answers FIONREAD on an admitted socket from the psock queue only: 0 while bytes wait in its TCP receive queue"]
async fn fionread_counts_what_arrived() {
    let _alone = ONE_AT_A_TIME.lock().await;
    socket_case(echo_until_eof, |mut c| {
        c.write_all(b"0123456789").expect("send");
        wait_readable(&c);
        let t0 = Instant::now();
        while fionread(&c) < 10 && t0.elapsed() < limit(Duration::from_secs(2)) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(fionread(&c), 10, "FIONREAD once 10 bytes arrived");
        let mut small = [0u8; 10];
        c.read_exact(&mut small).expect("read");
        assert_eq!(&small, b"0123456789");
        assert_eq!(fionread(&c), 0, "FIONREAD after reading everything");
        c.shutdown(Shutdown::Write).expect("shutdown");
    })
    .await;
}

/// MSG_WAITALL returns a whole 1 MiB message in one call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waitall_returns_the_whole_message() {
    let _alone = ONE_AT_A_TIME.lock().await;
    socket_case(echo_until_eof, |mut c| {
        let c = &mut c;
        // A first round trip takes the path (the 1 MiB send alone is more
        // than the target's credit at first, and takes TCP).
        c.write_all(b"warm").expect("send");
        let mut warm = [0u8; 4];
        c.read_exact(&mut warm).expect("read");
        assert_eq!(&warm, b"warm");
        const LEN: usize = 1 << 20;
        let mut p = Pattern::new(4, LEN as u64);
        let mut msg = vec![0u8; LEN];
        let mut off = 0;
        while let Some(n) = p.next_chunk(&mut msg[off..]) {
            off += n;
        }
        let writer = {
            let mut w = c.try_clone().expect("clone");
            let msg = msg.clone();
            std::thread::spawn(move || w.write_all(&msg))
        };
        let mut got = vec![0u8; LEN];
        let n = socket2::SockRef::from(&*c)
            .recv_with_flags(
                // SAFETY: u8 and MaybeUninit<u8> have one layout; recv only writes.
                unsafe {
                    &mut *(got.as_mut_slice() as *mut [u8] as *mut [std::mem::MaybeUninit<u8>])
                },
                libc::MSG_WAITALL,
            )
            .expect("recv MSG_WAITALL");
        writer.join().expect("writer").expect("send 1 MiB");
        assert_eq!(n, LEN, "MSG_WAITALL returned part of the message");
        assert!(got == msg, "MSG_WAITALL returned other bytes");
        c.shutdown(Shutdown::Write).expect("shutdown");
    })
    .await;
}

/// SO_RCVLOWAT: a read waits for that many bytes, and poll does not call
/// the socket readable below it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rcvlowat_is_respected() {
    let _alone = ONE_AT_A_TIME.lock().await;
    socket_case(echo_until_eof, |mut c| {
        let c = &mut c;
        let lowat: libc::c_int = 1000;
        // SAFETY: a valid int option of the right size.
        let r = unsafe {
            libc::setsockopt(
                c.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                &lowat as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "SO_RCVLOWAT: {}", std::io::Error::last_os_error());
        c.write_all(&[1u8; 600]).expect("send");
        // Time for the echo to arrive.
        std::thread::sleep(Duration::from_millis(300));
        let mut pfd = libc::pollfd {
            fd: c.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, 300) };
        assert_eq!(
            r, 0,
            "poll called 600 bytes readable under SO_RCVLOWAT 1000"
        );
        let later = {
            let mut w = c.try_clone().expect("clone");
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                w.write_all(&[2u8; 600])
            })
        };
        let t0 = Instant::now();
        let mut buf = [0u8; 4096];
        let n = c.read(&mut buf).expect("read");
        later.join().expect("writer").expect("send");
        assert!(
            n >= 1000,
            "read returned {n} bytes under SO_RCVLOWAT 1000 after {:?}",
            t0.elapsed()
        );
        let mut rest = vec![0u8; 1200 - n];
        c.read_exact(&mut rest).expect("read the rest");
        let all: Vec<u8> = buf[..n].iter().chain(&rest).copied().collect();
        assert_eq!(all[..600], [1u8; 600]);
        assert_eq!(all[600..], [2u8; 600]);
        c.shutdown(Shutdown::Write).expect("shutdown");
    })
    .await;
}

/// SO_SNDTIMEO: a writer whose reader stalls gets EAGAIN within about its
/// timeout, not a hang; the reader then gets every byte written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sndtimeo_expires_when_the_reader_stalls() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let (go, wait) = mpsc::channel::<()>();
    let (drained, sent) = socket_case(
        move |mut s| {
            // Stalls until the client saw its timeout, then drains.
            let _ = wait.recv_timeout(Duration::from_secs(30));
            let mut buf = vec![0u8; 1 << 20];
            let mut n = 0u64;
            while let Ok(k) = s.read(&mut buf) {
                if k == 0 {
                    break;
                }
                n += k as u64;
            }
            n
        },
        move |mut c| {
            c.set_write_timeout(Some(Duration::from_millis(500)))
                .expect("SO_SNDTIMEO");
            // A first send within the target's credit takes the path.
            c.write_all(&[5u8; 1024]).expect("send");
            let chunk = vec![5u8; 64 * 1024];
            let mut sent = 1024u64;
            let t0 = Instant::now();
            let (e, took) = loop {
                let t = Instant::now();
                match c.write(&chunk) {
                    Ok(n) => sent += n as u64,
                    Err(e) => break (e, t.elapsed()),
                }
                assert!(
                    t0.elapsed() < limit(Duration::from_secs(20)),
                    "wrote {sent} bytes in 20 s to a stalled reader"
                );
            };
            assert_eq!(
                e.raw_os_error(),
                Some(libc::EAGAIN),
                "the write to a stalled reader failed with {e}, not EAGAIN"
            );
            assert!(
                took >= Duration::from_millis(400) && took < limit(Duration::from_secs(3)),
                "the timed-out write took {took:?} with SO_SNDTIMEO 500 ms"
            );
            eprintln!("{sent} bytes written before EAGAIN after {took:?}");
            go.send(()).ok();
            c.shutdown(Shutdown::Write).expect("shutdown");
            sent
        },
    )
    .await;
    assert!(sent > 0, "nothing written before the timeout");
    assert_eq!(drained, sent, "the reader got other than what was written");
}

/// Half-close: the server sees EOF after the request, then still replies,
/// and the client reads the reply and then EOF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_then_reply() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let (request, ()) = socket_case(
        |mut s| {
            let mut req = Vec::new();
            s.read_to_end(&mut req).expect("read the request to EOF");
            s.write_all(b"reply after your FIN").expect("reply");
            req
        },
        |mut c| {
            c.write_all(b"request, then FIN").expect("send");
            c.shutdown(Shutdown::Write).expect("shutdown");
            let mut reply = Vec::new();
            c.read_to_end(&mut reply).expect("read the reply to EOF");
            assert_eq!(reply, b"reply after your FIN");
        },
    )
    .await;
    assert_eq!(request, b"request, then FIN");
}

/// Closes `s` with a reset (SO_LINGER 0).
fn reset(s: TcpStream) {
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
    drop(s);
}

/// What reading `s` to the end gives: the bytes, or the error. A polling
/// reader (non-blocking, poll before each read, as event loops do) reads
/// again after EAGAIN.
fn read_rest(mut s: TcpStream, polling: bool) -> std::io::Result<Vec<u8>> {
    let mut rest = Vec::new();
    if !polling {
        return s.read_to_end(&mut rest).map(|_| rest);
    }
    s.set_nonblocking(true).expect("O_NONBLOCK");
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let mut pfd = libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, 1000) };
        assert!(r >= 0, "poll: {}", std::io::Error::last_os_error());
        match s.read(&mut buf) {
            Ok(0) => return Ok(rest),
            Ok(n) => rest.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        assert!(
            t0.elapsed() < limit(Duration::from_secs(10)),
            "neither EOF nor an error within 10 s"
        );
    }
}

/// Asserts that `got` is ECONNRESET.
fn assert_reset(got: std::io::Result<Vec<u8>>, who: &str) {
    match got {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("{who} saw {other:?} after the other side's reset, not ECONNRESET"),
    }
}

/// What a server reading (`polling` or blocking) sees after the client's
/// reset (SO_LINGER 0, then close).
async fn server_after_client_reset(polling: bool) -> std::io::Result<Vec<u8>> {
    let (server_saw, ()) = socket_case(
        move |mut s| {
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).expect("the first bytes");
            read_rest(s, polling)
        },
        |mut c| {
            c.write_all(b"hello").expect("send");
            std::thread::sleep(Duration::from_millis(200));
            reset(c);
        },
    )
    .await;
    server_saw
}

/// A client's reset reaches the server as ECONNRESET, not a clean EOF.
async fn client_reset_reaches_the_server(polling: bool) {
    let _alone = ONE_AT_A_TIME.lock().await;
    assert_reset(server_after_client_reset(polling).await, "the server");
}

/// The server's reset reaches the (admitted) client as ECONNRESET.
async fn server_reset_reaches_the_client(polling: bool) {
    let _alone = ONE_AT_A_TIME.lock().await;
    let ((), client_saw) = socket_case(
        |mut s| {
            // Written after the handoff: the client speaks first.
            let mut go = [0u8; 2];
            s.read_exact(&mut go).expect("the client's go");
            s.write_all(b"bye").expect("send");
            std::thread::sleep(Duration::from_millis(200));
            reset(s);
        },
        move |mut c| {
            c.write_all(b"go").expect("send");
            let mut buf = [0u8; 3];
            c.read_exact(&mut buf).expect("the first bytes");
            assert_eq!(&buf, b"bye");
            read_rest(c, polling)
        },
    )
    .await;
    assert_reset(client_saw, "the client");
}

/// The path's start-up self-test (`forwarder check`'s
/// `local_blocking_read`) tells what a real blocking reader meets on this
/// kernel: ECONNRESET after the client's reset where it passes, EAGAIN
/// where it finds the kernel's bug (auto mode then leaves the path off).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_test_agrees_with_a_blocking_reader() {
    if !local_path() {
        return;
    }
    let kept = forwarder_tests::local_self_test_passes();
    let _alone = ONE_AT_A_TIME.lock().await;
    match (kept, server_after_client_reset(false).await) {
        (true, Err(e)) if e.kind() == ErrorKind::ConnectionReset => {}
        (false, Err(e)) if e.kind() == ErrorKind::WouldBlock => {}
        (kept, other) => panic!(
            "the self-test says blocking reads are {}, but a blocking server \
             reading after the client's reset saw {other:?}",
            if kept { "kept" } else { "broken" }
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reset_reaches_a_polling_server() {
    client_reset_reaches_the_server(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_reset_reaches_a_polling_client() {
    server_reset_reaches_the_client(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "without contrib/kernel's tcp_bpf_recvmsg patch (6.18, 6.12.118) a blocking recv() on an admitted socket that a reset wakes returns EAGAIN, not ECONNRESET"]
async fn client_reset_reaches_a_blocking_server() {
    client_reset_reaches_the_server(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "without contrib/kernel's tcp_bpf_recvmsg patch (6.18, 6.12.118) a blocking recv() on an admitted socket that a reset wakes returns EAGAIN, not ECONNRESET"]
async fn server_reset_reaches_a_blocking_client() {
    server_reset_reaches_the_client(false).await;
}

/// The kTLS parameters both sides of [`ktls_on_after_admission`] use:
/// TLS 1.2, AES-GCM-128, a fixed key, IV, salt and record sequence, so
/// that the same plaintext makes the same records on any connection.
fn ktls_params() -> libc::tls12_crypto_info_aes_gcm_128 {
    // SAFETY: a plain C struct of integers and byte arrays; all zeros is valid.
    let mut info: libc::tls12_crypto_info_aes_gcm_128 = unsafe { std::mem::zeroed() };
    info.info.version = libc::TLS_1_2_VERSION;
    info.info.cipher_type = libc::TLS_CIPHER_AES_GCM_128;
    info.key = [7; 16];
    info.iv = [1, 2, 3, 4, 5, 6, 7, 8];
    info.salt = [9, 8, 7, 6];
    info.rec_seq = [0; 8];
    info
}

/// Turns on kTLS for sending on `s`: `TCP_ULP` "tls", then `TLS_TX`.
/// Returns the first step's error as `Err(("TCP_ULP", e))` and the
/// second's as `Err(("TLS_TX", e))`.
fn ktls_tx(s: &TcpStream) -> Result<(), (&'static str, std::io::Error)> {
    let fd = s.as_raw_fd();
    let ulp = b"tls";
    // SAFETY: the option value is a valid buffer of the given length.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_TCP,
            libc::TCP_ULP,
            ulp.as_ptr().cast(),
            ulp.len() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(("TCP_ULP", std::io::Error::last_os_error()));
    }
    let info = ktls_params();
    // SAFETY: the option value is the crypto info struct, of its own size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_TLS,
            libc::TLS_TX,
            (&info as *const libc::tls12_crypto_info_aes_gcm_128).cast(),
            std::mem::size_of_val(&info) as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(("TLS_TX", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The plaintext [`ktls_on_after_admission`] sends: 3 records' worth.
fn ktls_plaintext() -> Vec<u8> {
    (0..40_000u32).map(|i| (i % 251) as u8).collect()
}

/// What a server reads when a client in the child sends
/// [`ktls_plaintext`] over kTLS straight to it, no forwarder between:
/// the records the kernel makes. `Err` says why kTLS cannot be used here
/// (`modprobe tls` is tried once).
fn ktls_reference(pair: &Pair) -> Result<Vec<u8>, String> {
    let attempt = || -> Result<Vec<u8>, (&'static str, std::io::Error)> {
        pair.child.run(|| {
            let l = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("listen");
            let addr = l.local_addr().expect("local address");
            let c = TcpStream::connect(addr).expect("connect");
            let (mut s, _) = l.accept().expect("accept");
            ktls_tx(&c)?;
            let mut c = c;
            c.write_all(&ktls_plaintext()).expect("send over kTLS");
            c.shutdown(Shutdown::Write).expect("shutdown");
            s.set_read_timeout(Some(Duration::from_secs(10))).ok();
            let mut got = Vec::new();
            s.read_to_end(&mut got).expect("read the records");
            Ok(got)
        })
    };
    match attempt() {
        Ok(v) => Ok(v),
        Err(("TCP_ULP", e)) if e.raw_os_error() == Some(libc::ENOENT) => {
            let _ = std::process::Command::new("modprobe")
                .arg("tls")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            attempt().map_err(|(what, e)| format!("{what}: {e}"))
        }
        Err((what, e)) => Err(format!("{what}: {e}")),
    }
}

/// kTLS turned on after admission: the client's plaintext must never be
/// redirected past the encryption. Either the kernel refuses TLS on a
/// socket in a sockmap (EINVAL, newer kernels) and the bytes go on as
/// plain TCP, or the server reads exactly the records a direct connection
/// with the same keys carries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ktls_on_after_admission() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let want = match ktls_reference(&Pair::new()) {
        Ok(v) => v,
        Err(why) => {
            eprintln!("skipped: this kernel cannot send kTLS (CONFIG_TLS): {why}");
            return;
        }
    };
    let plain = ktls_plaintext();
    assert!(
        want.len() > plain.len() && want[0] == 0x17,
        "the reference is not TLS records: {} bytes, first {:#x}",
        want.len(),
        want[0]
    );
    let (got, refused) = socket_case(
        |mut s| {
            let mut hello = [0u8; 5];
            s.read_exact(&mut hello).expect("the plain hello");
            s.write_all(b"ok").expect("answer");
            // Polling reads: a blocking one can meet the kernel's
            // tcp_bpf_recvmsg EAGAIN, which is not what this case checks.
            read_rest(s, true).expect("read to EOF")
        },
        |mut c| {
            // Before kTLS: a round trip on the path.
            c.write_all(b"hello").expect("send");
            let mut ok = [0u8; 2];
            c.read_exact(&mut ok).expect("the answer");
            let refused = match ktls_tx(&c) {
                Ok(()) => false,
                Err((what, e)) => {
                    assert_eq!(
                        e.raw_os_error(),
                        Some(libc::EINVAL),
                        "{what} on an admitted socket failed with {e}, not EINVAL"
                    );
                    eprintln!("the kernel refuses kTLS on an admitted socket ({what}: {e})");
                    true
                }
            };
            c.write_all(&ktls_plaintext()).expect("send");
            c.shutdown(Shutdown::Write).expect("shutdown");
            read_rest(c, true).expect("EOF");
            refused
        },
    )
    .await;
    if refused {
        assert!(got == plain, "the plain bytes after a refused kTLS differ");
    } else {
        assert!(
            got == want,
            "the server read {} bytes, not the {} bytes of records a direct \
             connection carries (plaintext redirected past kTLS: {})",
            got.len(),
            want.len(),
            got == plain
        );
    }
}
