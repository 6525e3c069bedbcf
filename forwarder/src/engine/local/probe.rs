//! The start-up self-test of the local-client path: does a blocking read
//! on a socket in a sockmap keep TCP's contract on this kernel?
//!
//! Every socket the path admits runs the `tcp_bpf` proto, whose
//! `recvmsg` (`tcp_bpf_recvmsg`) waits on the socket's one wait queue.
//! Write space and error reports wake that queue too, and a reader so
//! woken with nothing to read returns EAGAIN, where `tcp_recvmsg` would
//! wait on. A blocking client that uploaded more than its send buffer
//! holds and then waits for the answer is woken exactly so, and a Python
//! program raises `BlockingIOError` from a blocking socket. The fix, a
//! few lines in `net/ipv4/tcp_bpf.c`, is in `contrib/kernel/`.
//!
//! The test reproduces the wake: socket X enters a sockhash (no program
//! needed: any sockmap member runs `tcp_bpf`), a thread blocks in
//! `recv(X)`, X's send buffer is filled with non-blocking sends (the
//! kernel marks it SOCK_NOSPACE) and then drained by its peer, whose ACKs
//! wake X's queue. The reader either returns EAGAIN at once (the bug) or
//! keeps waiting and reads the byte its peer sends last (the contract).
//! It takes a few milliseconds on loopback in our own namespace.

use std::io::{self, Read as _, Write as _};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use aya::maps::{MapData, SockHash};
use socket2::SockRef;

use crate::sys;

/// The key the probe socket takes in the map: never a socket cookie
/// (cookies count up from 1).
const PROBE_KEY: u64 = u64::MAX;

/// How long the probe's reader may wait in all.
const READER_TIMEOUT: Duration = Duration::from_secs(2);

/// What the probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockingRead {
    /// The reader kept waiting through the wake-up and read the byte.
    Kept,
    /// The reader got EAGAIN from a wake-up without data (the kernel bug).
    Eagain,
}

/// Runs the probe with `map`, a sockhash with no program attached (the
/// probe socket is in it only for the probe). Needs what updating the map
/// needs (CAP_BPF and CAP_NET_ADMIN).
pub fn blocking_read(map: &mut SockHash<MapData, u64>) -> anyhow::Result<BlockingRead> {
    use anyhow::Context as _;
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("probe: listen on 127.0.0.1")?;
    // Small buffers: a few kilobytes fill X's send queue and the window.
    SockRef::from(&l).set_recv_buffer_size(4096)?;
    let x = TcpStream::connect(l.local_addr()?).context("probe: connect")?;
    let (mut y, _) = l.accept().context("probe: accept")?;
    SockRef::from(&x).set_send_buffer_size(4096)?;
    map.insert(PROBE_KEY, x.as_fd(), 0)
        .context("probe: put a socket into a sockhash")?;
    let found = run(&x, &mut y);
    let _ = map.remove(&PROBE_KEY);
    found
}

fn run(x: &TcpStream, y: &mut TcpStream) -> anyhow::Result<BlockingRead> {
    let (tid_tx, tid_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    let mut reader = x.try_clone()?;
    reader.set_read_timeout(Some(READER_TIMEOUT))?;
    let t0 = Instant::now();
    std::thread::Builder::new()
        .name("local-probe".into())
        .spawn(move || {
            let _ = tid_tx.send(sys::gettid());
            let mut b = [0u8; 1];
            let _ = done_tx.send(reader.read(&mut b));
        })?;
    let tid = tid_rx.recv()?;
    // The reader must be asleep in recv() before the wake-up comes.
    while !sys::thread_sleeping(tid)? {
        anyhow::ensure!(
            t0.elapsed() < READER_TIMEOUT / 2,
            "probe: the reader thread never blocked"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(5));
    // Fill X's send queue: the last send finds no room (SOCK_NOSPACE).
    let chunk = [0u8; 1024];
    let sx = SockRef::from(x);
    loop {
        match sx.send_with_flags(&chunk, libc::MSG_DONTWAIT) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(anyhow::Error::from(e).context("probe: fill the send queue")),
        }
        anyhow::ensure!(
            t0.elapsed() < READER_TIMEOUT / 2,
            "probe: the send queue never filled"
        );
    }
    // Drain it from the peer: the ACKs give X room, and X's write space
    // wakes its wait queue, where the reader sleeps.
    y.set_nonblocking(true)?;
    let mut buf = vec![0u8; 64 * 1024];
    let drained = loop {
        match y.read(&mut buf) {
            Ok(0) => anyhow::bail!("probe: the peer saw EOF"),
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(anyhow::Error::from(e).context("probe: drain")),
        }
        if let Ok(r) = done_rx.try_recv() {
            break Some(r);
        }
        if sys::tcp_counters(x.as_fd())?.outq == 0 {
            break None;
        }
        anyhow::ensure!(
            t0.elapsed() < READER_TIMEOUT / 2,
            "probe: the send queue never drained"
        );
        std::thread::sleep(Duration::from_micros(200));
    };
    // The wake-up, if any, has come: give a woken reader time to return.
    let early = match drained {
        Some(r) => Some(r),
        None => done_rx.recv_timeout(Duration::from_millis(20)).ok(),
    };
    let woke = early.is_some();
    let result = match early {
        Some(r) => r,
        None => {
            y.set_nonblocking(false)?;
            y.write_all(b"!")?;
            done_rx.recv_timeout(READER_TIMEOUT)?
        }
    };
    tracing::debug!(?result, took = ?t0.elapsed(), woken_early = woke, "local-client path self-test");
    match result {
        Ok(1) if !woke => Ok(BlockingRead::Kept),
        // The bug's signature: EAGAIN right after the wake-up, before its
        // peer sent anything (an EAGAIN later is the read timeout).
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && woke => Ok(BlockingRead::Eagain),
        other => anyhow::bail!("probe: the reader got {other:?} (woken early: {woke})"),
    }
}
