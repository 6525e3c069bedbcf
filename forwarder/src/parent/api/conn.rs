//! Serving the API socket's connections: at most [`MAX_CONNECTIONS`] at
//! once, each phase of a request under its own deadline, and room made
//! for a newcomer at the cap by closing a connection that holds a slot
//! without a request.
//!
//! A connection is either *waiting* (for the head of its next request:
//! just accepted, mid-head, or idle between requests) or *serving* (from
//! a complete request head until the last byte of the answer is written).
//!
//! - Waiting: the head must be complete within [`HEAD_TIMEOUT`] of the
//!   connection's start or of its previous answer; otherwise it is closed
//!   (with a 408 if part of a head arrived).
//! - Serving: the request body must arrive within [`BODY_TIMEOUT`] of its
//!   head (the handler then sees a timed-out body), and a write of the
//!   answer that makes no progress for [`WRITE_TIMEOUT`] fails and closes
//!   the connection.
//! - At the cap, the next connection is accepted and the one that has been
//!   waiting longest is closed for it (again with a 408 if part of a head
//!   arrived). A serving connection is never closed for a newcomer; if all
//!   of them are serving, the newcomer waits until one finishes or starts
//!   waiting, and later clients wait in the listen backlog.
//!
//! Before a connection is closed, what the peer sent and nobody read is
//! read and dropped (up to 64 KiB, without waiting for more): closing a
//! Unix socket with unread data would reset the peer before it sees the
//! 408 or the end of the stream.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{Request, Response};
use axum::Router;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use super::{peer_allowed, BODY_TIMEOUT, HEAD_TIMEOUT, MAX_CONNECTIONS, WRITE_TIMEOUT};
use crate::parent::ratelimit::Every;
use crate::sys;
use crate::wire::ErrorBody;

/// Serves `router` on `listener` until `shutdown` resolves, to this
/// process's own uid and root only; then closes the waiting connections,
/// lets the serving ones finish their answer, and returns once all are
/// closed.
pub(super) async fn serve(
    listener: UnixListener,
    router: Router,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let registry = Arc::new(Registry::new());
    let uid = sys::euid();
    let mut shutdown = pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "API accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // The connection is accepted before it has a slot, so that a
        // slot can be made for it; it is the only one held without one.
        let slot = tokio::select! {
            () = &mut shutdown => break,
            slot = registry.slot() => slot,
        };
        let cred = sys::peer_cred(stream.as_fd()).ok();
        match cred {
            Some(c) if peer_allowed(c.uid, uid) => {
                tokio::spawn(run(stream, slot, router.clone()));
            }
            _ => {
                log_refusal(cred.map(|c| c.uid), cred.map(|c| c.pid));
                tokio::spawn(refuse(stream, slot));
            }
        }
    }
    registry.stop();
    // Every connection holds a permit until it is closed.
    let _all = registry.slots.acquire_many(MAX_CONNECTIONS as u32).await;
    Ok(())
}

/// The connections being served, for making room at the cap and for
/// stopping.
struct Registry {
    slots: Arc<Semaphore>,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    /// Signalled when a connection starts waiting (it could be closed to
    /// make room).
    waiting: Arc<Notify>,
}

impl Registry {
    fn new() -> Registry {
        Registry {
            slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            waiting: Arc::new(Notify::new()),
        }
    }

    fn conns(&self) -> MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for a new connection: a free one, or one made by closing the
    /// connection that has waited longest for a request; if every
    /// connection is serving, waits until one finishes or starts waiting.
    async fn slot(self: &Arc<Self>) -> Slot {
        loop {
            let someone_waits = self.waiting.notified();
            if let Ok(permit) = self.slots.clone().try_acquire_owned() {
                return self.register(permit);
            }
            self.make_room();
            tokio::select! {
                permit = self.slots.clone().acquire_owned() => {
                    if let Ok(permit) = permit {
                        return self.register(permit);
                    }
                }
                () = someone_waits => {}
            }
        }
    }

    fn register(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> Slot {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn::new(self.waiting.clone()));
        self.conns().insert(id, conn.clone());
        Slot {
            conn,
            registry: self.clone(),
            id,
            _permit: permit,
        }
    }

    /// Closes the connection that has waited longest for a request,
    /// unless one is being closed already (its slot is about to be free).
    fn make_room(&self) {
        let conns = self.conns();
        let mut waiting = Vec::new();
        for conn in conns.values() {
            let phase = conn.phase();
            if phase.closing.is_some() {
                return;
            }
            if let Some(since) = phase.waiting_since {
                waiting.push((since, conn));
            }
        }
        waiting.sort_by_key(|(since, _)| *since);
        // One may have completed a request head since it was looked at:
        // then the next one.
        let Some((since, _)) = waiting
            .into_iter()
            .find(|(_, conn)| conn.close_if_waiting(Why::MadeRoom))
        else {
            return;
        };
        if let Some(suppressed) = ROOM_LOG.allow() {
            tracing::warn!(
                waited_ms = since.elapsed().as_millis() as u64,
                suppressed,
                "all {MAX_CONNECTIONS} API connections were taken: closed the one \
                 that had waited longest for a request to make room"
            );
        }
    }

    /// Marks every connection as stopping and wakes it.
    fn stop(&self) {
        for conn in self.conns().values() {
            conn.phase().stopping = true;
            conn.wake.notify_one();
        }
    }
}

static ROOM_LOG: Every = Every::new(Duration::from_secs(10));

/// A connection's hold on one of the [`MAX_CONNECTIONS`] slots, released
/// when its task ends.
struct Slot {
    conn: Arc<Conn>,
    registry: Arc<Registry>,
    id: u64,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.registry.conns().remove(&self.id);
    }
}

/// Why a connection is being closed by the server.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Why {
    /// No complete request head within [`HEAD_TIMEOUT`].
    HeadTimeout,
    /// Closed for a newcomer at the cap.
    MadeRoom,
    /// The server is stopping.
    Stopping,
}

/// What one connection is doing, shared by its task, its service, its
/// I/O and the registry.
struct Conn {
    phase: Mutex<Phase>,
    /// Wakes the connection's task: it is being closed, or the server is
    /// stopping.
    wake: Notify,
    /// The registry's signal that a connection started waiting.
    waiting: Arc<Notify>,
}

struct Phase {
    /// Requests whose head was read and whose answer is not yet written
    /// (hyper serves one at a time).
    requests: u32,
    /// An answer ended and may still be in hyper's buffer.
    unflushed: bool,
    /// When the request body must have arrived, while it is being read.
    body_deadline: Option<Instant>,
    /// Since when the connection has waited for a request head; `None`
    /// while serving.
    waiting_since: Option<Instant>,
    closing: Option<Why>,
    stopping: bool,
}

impl Conn {
    fn new(waiting: Arc<Notify>) -> Conn {
        Conn {
            phase: Mutex::new(Phase {
                requests: 0,
                unflushed: false,
                body_deadline: None,
                waiting_since: Some(Instant::now()),
                closing: None,
                stopping: false,
            }),
            wake: Notify::new(),
            waiting,
        }
    }

    fn phase(&self) -> MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Moves between waiting and serving after a change of `phase`.
    fn settle(&self, phase: &mut Phase) {
        let waiting = phase.requests == 0 && !phase.unflushed;
        match (waiting, phase.waiting_since) {
            (true, None) => {
                phase.waiting_since = Some(Instant::now());
                self.waiting.notify_one();
            }
            (false, Some(_)) => phase.waiting_since = None,
            _ => {}
        }
    }

    /// A request head was read: the connection serves it until its answer
    /// is written, unless it is being closed already.
    fn start_request(self: &Arc<Self>, has_body: bool) -> Option<Serving> {
        let mut phase = self.phase();
        if phase.closing.is_some() {
            return None;
        }
        phase.requests += 1;
        if has_body {
            phase.body_deadline = Some(Instant::now() + BODY_TIMEOUT);
        }
        self.settle(&mut phase);
        Some(Serving(self.clone()))
    }

    fn body_done(&self) {
        self.phase().body_deadline = None;
    }

    fn body_deadline(&self) -> Option<Instant> {
        self.phase().body_deadline
    }

    fn flushed(&self) {
        let mut phase = self.phase();
        if phase.unflushed {
            phase.unflushed = false;
            self.settle(&mut phase);
        }
    }

    /// Marks the connection as closing if it is waiting for a request.
    fn close_if_waiting(&self, why: Why) -> bool {
        let mut phase = self.phase();
        if phase.waiting_since.is_none() || phase.closing.is_some() {
            return false;
        }
        phase.closing = Some(why);
        drop(phase);
        self.wake.notify_one();
        true
    }

    /// The next thing the connection's task must act on: closing it
    /// (made room, head timeout, or stopping while waiting), or the
    /// server stopping while it serves (once, unless `stop_seen`).
    async fn next_event(&self, stop_seen: bool) -> Event {
        loop {
            let woken = self.wake.notified();
            let check_at = {
                let mut phase = self.phase();
                let now = Instant::now();
                if let Some(why) = phase.closing {
                    return Event::Close(why);
                }
                match phase.waiting_since {
                    Some(_) if phase.stopping => {
                        phase.closing = Some(Why::Stopping);
                        return Event::Close(Why::Stopping);
                    }
                    Some(since) if now >= since + HEAD_TIMEOUT => {
                        phase.closing = Some(Why::HeadTimeout);
                        return Event::Close(Why::HeadTimeout);
                    }
                    Some(since) => since + HEAD_TIMEOUT,
                    None if phase.stopping && !stop_seen => return Event::Stop,
                    // It waits again no sooner than now: look then.
                    None => now + HEAD_TIMEOUT,
                }
            };
            tokio::select! {
                () = woken => {}
                () = tokio::time::sleep_until(check_at) => {}
            }
        }
    }
}

enum Event {
    Close(Why),
    Stop,
}

/// Held from a request's head until its answer's body is done; then the
/// connection waits again once the answer is flushed.
struct Serving(Arc<Conn>);

impl Drop for Serving {
    fn drop(&mut self) {
        let mut phase = self.0.phase();
        phase.requests = phase.requests.saturating_sub(1);
        phase.body_deadline = None;
        phase.unflushed = true;
        self.0.settle(&mut phase);
    }
}

/// Serves one connection until it ends or is closed.
async fn run(stream: UnixStream, slot: Slot, router: Router) {
    let conn = slot.conn.clone();
    let service = ConnService {
        router: TowerToHyperService::new(router),
        conn: conn.clone(),
    };
    let mut http = http1::Builder::new()
        // Ours: HEAD_TIMEOUT, from the connection's start or last answer.
        .header_read_timeout(None)
        .serve_connection(TokioIo::new(Timed::new(stream, conn.clone())), service);
    let mut stop_seen = false;
    loop {
        tokio::select! {
            served = &mut http => {
                if let Err(e) = served {
                    tracing::debug!(error = %e, "API connection ended");
                }
                drain(&http.into_parts().io.into_inner().stream);
                return;
            }
            event = conn.next_event(stop_seen) => match event {
                Event::Close(why) => {
                    let parts = http.into_parts();
                    close(parts.io.into_inner().stream, !parts.read_buf.is_empty(), why);
                    return;
                }
                Event::Stop => {
                    stop_seen = true;
                    Pin::new(&mut http).graceful_shutdown();
                }
            },
        }
    }
}

/// Closes a waiting connection: a 408 first if part of a request head
/// arrived, then [`drain`]. Never waits.
fn close(stream: UnixStream, partial_head: bool, why: Why) {
    tracing::debug!(?why, partial_head, "closing an API connection");
    let message = match why {
        Why::HeadTimeout => format!(
            "no complete request head within {} s",
            HEAD_TIMEOUT.as_secs()
        ),
        Why::MadeRoom => format!(
            "closed to make room: all {MAX_CONNECTIONS} API connections were taken, \
             and this one had waited longest for a request"
        ),
        Why::Stopping => String::new(),
    };
    if partial_head && why != Why::Stopping {
        let body = serde_json::to_string(&ErrorBody { message }).unwrap_or_default();
        let reply = format!(
            "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.try_write(reply.as_bytes());
    }
    drain(&stream);
}

/// Reads and drops what the peer sent and nobody read, up to 64 KiB,
/// without waiting for more: closing a Unix socket with unread data
/// resets the peer.
fn drain(stream: &UnixStream) {
    let mut buf = [0u8; 4096];
    for _ in 0..16 {
        match stream.try_read(&mut buf) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
}

/// The router as hyper's service for one connection: marks the
/// connection as serving for each request.
#[derive(Clone)]
struct ConnService {
    router: TowerToHyperService<Router>,
    conn: Arc<Conn>,
}

/// A request that came as its connection was being closed: not served.
#[derive(Debug, thiserror::Error)]
#[error("the API connection is being closed")]
struct Closing;

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<Answer>;
    type Error = Closing;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Closing>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let Some(serving) = self.conn.start_request(!req.body().is_end_stream()) else {
            return Box::pin(std::future::ready(Err(Closing)));
        };
        let conn = self.conn.clone();
        let req = req.map(|body| Body::new(RequestBody { body, conn }));
        let answer = hyper::service::Service::call(&self.router, req);
        Box::pin(async move {
            let Ok(resp) = answer.await;
            Ok(resp.map(|body| Answer {
                body,
                _serving: serving,
            }))
        })
    }
}

/// A request's body: its deadline ends when it ends or is dropped.
struct RequestBody {
    body: Incoming,
    conn: Arc<Conn>,
}

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) || self.body.is_end_stream() {
            self.conn.body_done();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        self.conn.body_done();
    }
}

/// An answer's body, holding its connection in the serving phase until
/// hyper is done with it.
struct Answer {
    body: Body,
    _serving: Serving,
}

impl HttpBody for Answer {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A connection's socket under the serving phase's deadlines: a read
/// while a request body is due fails at [`BODY_TIMEOUT`] after its head,
/// and a write that makes no progress for [`WRITE_TIMEOUT`] fails. It also
/// tells the connection when hyper has flushed an answer.
struct Timed {
    stream: UnixStream,
    conn: Arc<Conn>,
    body_timer: Option<Pin<Box<Sleep>>>,
    write_timer: Option<Pin<Box<Sleep>>>,
}

impl Timed {
    fn new(stream: UnixStream, conn: Arc<Conn>) -> Timed {
        Timed {
            stream,
            conn,
            body_timer: None,
            write_timer: None,
        }
    }
}

/// Polls a timer set for `at`, (re)arming it first if needed.
fn poll_timer(timer: &mut Option<Pin<Box<Sleep>>>, at: Instant, cx: &mut Context<'_>) -> bool {
    match timer {
        Some(t) if t.deadline() == at => {}
        Some(t) => t.as_mut().reset(at),
        None => *timer = Some(Box::pin(tokio::time::sleep_until(at))),
    }
    timer
        .as_mut()
        .is_some_and(|t| t.as_mut().poll(cx).is_ready())
}

impl AsyncRead for Timed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(r) => Poll::Ready(r),
            Poll::Pending => match this.conn.body_deadline() {
                Some(at) if poll_timer(&mut this.body_timer, at, cx) => {
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "the request body did not arrive within {} s",
                            BODY_TIMEOUT.as_secs()
                        ),
                    )))
                }
                _ => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Timed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.stream).poll_write(cx, buf) {
            Poll::Ready(r) => {
                this.write_timer = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let at = match &this.write_timer {
                    Some(t) => t.deadline(),
                    None => Instant::now() + WRITE_TIMEOUT,
                };
                if poll_timer(&mut this.write_timer, at, cx) {
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the API client read nothing of its answer",
                    )))
                } else {
                    Poll::Pending
                }
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.stream).poll_flush(cx);
        if let Poll::Ready(Ok(())) = flushed {
            self.conn.flushed();
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

static REFUSAL_LOG: Every = Every::new(Duration::from_secs(1));

/// Logs a refused peer, once a second at most.
fn log_refusal(uid: Option<u32>, pid: Option<i32>) {
    if let Some(suppressed) = REFUSAL_LOG.allow() {
        tracing::warn!(
            ?uid,
            ?pid,
            suppressed,
            "refused an API connection: only this forwarder's uid and root may use the API"
        );
    }
}

/// Answers a refused peer with 403 and closes, within a second. It holds a
/// slot meanwhile, as a connection waiting for a request: a newcomer at
/// the cap may close it first.
async fn refuse(mut stream: UnixStream, slot: Slot) {
    let body = serde_json::to_string(&ErrorBody {
        message: "permission denied: only the forwarder's own user and root may use this API"
            .into(),
    })
    .unwrap_or_default();
    let reply = format!(
        "HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    // Read the request head first: closing a Unix socket with unread data
    // resets the peer before it sees the reply. Everything is bounded by
    // one second and 16 KiB.
    let answer = tokio::time::timeout(Duration::from_secs(1), async {
        let mut buf = vec![0u8; 16 * 1024];
        let mut seen = 0;
        while seen < buf.len() {
            let n = stream.read(&mut buf[seen..]).await?;
            if n == 0 {
                break;
            }
            seen += n;
            if buf[..seen].windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        stream.write_all(reply.as_bytes()).await?;
        stream.shutdown().await?;
        // Drain what else the peer sent until it closes.
        while stream.read(&mut buf).await? > 0 {}
        Ok::<(), io::Error>(())
    });
    tokio::select! {
        _ = answer => {}
        _ = slot.conn.next_event(true) => {}
    }
    // Closed before its slot is given back.
    drop(stream);
    drop(slot);
}

#[cfg(test)]
mod tests {
    //! The cap and the phases with real sockets: a served socket, clients
    //! that hold connections in each phase, and a newcomer.

    use super::*;
    use axum::routing::{get, post};

    /// Serves a router with `GET /` (answers at once) and `POST /echo`
    /// (answers with its body once all of it arrived) on a fresh socket
    /// until `stop` resolves.
    async fn server_until(
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> (
        tempfile::TempDir,
        std::path::PathBuf,
        tokio::task::JoinHandle<io::Result<()>>,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("api.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let router = Router::new()
            .route("/", get(|| async { "hello" }))
            .route("/echo", post(|body: String| async move { body }));
        let task = tokio::spawn(serve(listener, router, stop));
        (dir, path, task)
    }

    async fn server() -> (tempfile::TempDir, std::path::PathBuf) {
        let (dir, path, _) = server_until(std::future::pending()).await;
        (dir, path)
    }

    async fn connect(path: &std::path::Path) -> UnixStream {
        UnixStream::connect(path).await.expect("connect")
    }

    /// Reads to the end of the stream, within a second: well before
    /// HEAD_TIMEOUT, so a connection that ends here was closed for
    /// another reason.
    async fn read_all(c: &mut UnixStream) -> io::Result<String> {
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(1), c.read_to_end(&mut raw))
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        Ok(String::from_utf8_lossy(&raw).into_owned())
    }

    /// Whether the server still holds `c` open (nothing to read yet).
    async fn still_open(c: &UnixStream) -> bool {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut b = [0u8; 1];
        matches!(c.try_read(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    const GET: &[u8] = b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_the_cap_the_longest_waiting_connection_makes_room() {
        let (_dir, path) = server().await;
        // The oldest sent part of a head; the rest sent nothing.
        let mut slow = connect(&path).await;
        slow.write_all(b"GET / HT").await.expect("write");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut idle = Vec::new();
        for _ in 1..MAX_CONNECTIONS {
            idle.push(connect(&path).await);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut c = connect(&path).await;
        c.write_all(GET).await.expect("write");
        let answer = read_all(&mut c).await.expect("the newcomer's answer");
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        // The slow one made room, with a 408 and a clean end.
        let closed = read_all(&mut slow).await.expect("no reset");
        assert!(closed.starts_with("HTTP/1.1 408 "), "{closed}");
        assert!(closed.contains("to make room"), "{closed}");
        // The newcomer's slot is free again: fill it. The next newcomer
        // then closes the idle one that waited longest: an end of stream,
        // nothing else.
        let _filler = connect(&path).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut c = connect(&path).await;
        c.write_all(GET).await.expect("write");
        assert!(read_all(&mut c).await.expect("answer").contains("hello"));
        assert_eq!(read_all(&mut idle[0]).await.expect("no reset"), "");
        assert!(still_open(&idle[1]).await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_serving_a_request_is_never_closed_for_room() {
        let (_dir, path) = server().await;
        // Every slot serves a request whose body is not all there yet.
        let head =
            b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\nconnection: close\r\n\r\nab";
        let mut busy = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let mut c = connect(&path).await;
            c.write_all(head).await.expect("write");
            busy.push(c);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut c = connect(&path).await;
        c.write_all(GET).await.expect("write");
        // The newcomer waits; nobody is closed for it.
        assert!(still_open(&c).await);
        for b in &busy {
            assert!(still_open(b).await);
        }
        // One finishes its request: its answer is whole, and the newcomer
        // gets the slot.
        busy[0].write_all(b"cd").await.expect("write");
        let answer = read_all(&mut busy[0]).await.expect("answer");
        assert!(answer.ends_with("abcd"), "{answer}");
        let answer = read_all(&mut c).await.expect("answer");
        assert!(answer.contains("hello"), "{answer}");
        for b in &mut busy[1..] {
            b.write_all(b"cd").await.expect("write");
            let answer = read_all(b).await.expect("answer");
            assert!(answer.ends_with("abcd"), "{answer}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_keep_alive_connection_makes_room() {
        let (_dir, path) = server().await;
        let mut kept = connect(&path).await;
        kept.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 1024];
        let n = kept.read(&mut buf).await.expect("answer");
        assert!(String::from_utf8_lossy(&buf[..n]).ends_with("hello"));
        // It waits from its answer's flush on: well before the others.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut others = Vec::new();
        for _ in 1..MAX_CONNECTIONS {
            others.push(connect(&path).await);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The kept-alive connection waited longest (since its answer).
        let mut c = connect(&path).await;
        c.write_all(GET).await.expect("write");
        assert!(read_all(&mut c).await.expect("answer").contains("hello"));
        assert_eq!(read_all(&mut kept).await.expect("no reset"), "");
        assert!(still_open(&others[0]).await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stopping_closes_the_waiting_and_finishes_the_serving() {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (_dir, path, task) = server_until(async {
            let _ = stopped.await;
        })
        .await;
        let mut idle = connect(&path).await;
        let mut busy = connect(&path).await;
        busy.write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n\r\nab")
            .await
            .expect("write");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = stop.send(());
        assert_eq!(read_all(&mut idle).await.expect("no reset"), "");
        assert!(!task.is_finished());
        busy.write_all(b"cd").await.expect("write");
        let answer = read_all(&mut busy).await.expect("answer, then the end");
        assert!(answer.ends_with("abcd"), "{answer}");
        let served = tokio::time::timeout(Duration::from_secs(1), task).await;
        assert!(matches!(served, Ok(Ok(Ok(())))), "{served:?}");
    }
}
