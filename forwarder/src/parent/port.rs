//! The port manager: published ports, their listeners and accept loops.
//!
//! Modelled on RootlessKit's `pkg/port`: add, list, remove. Adding a port
//! is all or nothing: every listener of the spec is bound before any accept
//! loop starts, and a failure closes whatever was bound. Removing a port
//! closes its listeners at once; connections already established on it run
//! to their end on their engine. When the forwarder stops, [`PortManager::close_all`]
//! ends every connection (a reset) and waits for them, so the final stats
//! line shows nothing active. UDP ports (udp, udp4, udp6) have one
//! relay task per bound address instead of accept loops, see
//! [`crate::udp`]; removing one closes its flows too.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::child::dial::{Dial, DialRequest};
use crate::engine::stats::{PortStats, Snapshot};
use crate::engine::{Conn, Engine};
use crate::sys;
use crate::udp::{self, UdpOptions, UdpSnapshot, UdpStats};
use crate::wire::spec::{ApiSpec, Expansion, PortRangeSpec, PortSpec};
pub use crate::wire::PortReport;

/// How long a dial in the child may take before the client is reset.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Listen backlog of every published port.
const BACKLOG: i32 = 4096;

/// Why a port could not be added or removed.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("conflict with ID {0}")]
    Conflict(u32),
    #[error("unknown id: {0}")]
    UnknownId(u32),
    #[error("cannot listen on {addr}: the parent namespace has no IPv6")]
    NoIpv6 { addr: SocketAddr },
    #[error("cannot listen on {addr}: {cause}{hint}")]
    Listen {
        addr: SocketAddr,
        cause: io::Error,
        hint: &'static str,
    },
    #[error("conflicts with {0}")]
    Taken(String),
    #[error("no port of {range} is free (the last one tried: {last})")]
    NoFreePort { range: String, last: Box<PortError> },
}

impl PortError {
    pub(crate) fn listen(addr: SocketAddr, cause: io::Error) -> Self {
        let hint = match cause.raw_os_error() {
            Some(libc::EACCES) if addr.port() < 1024 => {
                " (ports below net.ipv4.ip_unprivileged_port_start, 1024 by default, need \
                 CAP_NET_BIND_SERVICE: lower that sysctl or grant the capability)"
            }
            Some(libc::EADDRNOTAVAIL) => " (no such address in the parent namespace)",
            Some(libc::EAFNOSUPPORT) => " (the parent namespace has no IPv6)",
            _ => "",
        };
        PortError::Listen { addr, cause, hint }
    }
}

/// A published port as the API reports it.
#[derive(Debug, Clone)]
pub struct PortStatus {
    pub id: u32,
    /// The spec as the client gave it (what `GET /v1/ports` returns).
    pub api: ApiSpec,
    /// Addresses actually listened on (the IPv6 half may be discarded).
    pub listeners: Vec<SocketAddr>,
}

struct Port {
    spec: PortSpec,
    api: ApiSpec,
    stats: Arc<PortStats>,
    /// Set for UDP ports.
    udp: Option<Arc<UdpStats>>,
    listeners: Vec<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl Port {
    /// Stops the accept loops and waits until their listeners are closed.
    async fn close(mut self) {
        let tasks = std::mem::take(&mut self.tasks);
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[derive(Default)]
struct State {
    next_id: u32,
    ports: BTreeMap<u32, Port>,
    /// Ports removed while their connections may still run: their counters
    /// stay part of the totals.
    retired: Vec<Arc<PortStats>>,
    /// Counters of retired ports that have fully ended.
    retired_total: Snapshot,
    /// UDP counters of removed UDP ports (final once removed).
    retired_udp: UdpSnapshot,
}

/// Shared by every accept loop.
struct Ctx {
    dialer: Arc<dyn Dial>,
    engine: Arc<dyn Engine>,
    udp: UdpOptions,
    /// One permit per TCP connection carried and per live UDP flow
    /// (`--max-connections`), over all ports.
    slots: Arc<Semaphore>,
    max_connections: usize,
    /// Dial with the client's address as the source (the dialer applies it
    /// where it can: [`crate::child::srcip`]).
    source_ip: bool,
}

/// Published ports.
pub struct PortManager {
    ctx: Arc<Ctx>,
    state: Mutex<State>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Binds a listening socket (SO_REUSEADDR; IPv6 sockets are IPv6-only so
/// the IPv4 half can bind the same port; TCP_NODELAY, which every accepted
/// socket inherits, so a small write is forwarded at once).
fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), None)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_reuse_address(true)?;
    sock.set_tcp_nodelay(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(BACKLOG)?;
    Ok(sock.into())
}

/// The listeners of one spec, bound (and, for TCP, listening) but not yet
/// served.
pub type Bound = Vec<(SocketAddr, Listener)>;

/// One bound socket of a port: a TCP listener, or the UDP socket of
/// [`udp::serve`].
pub enum Listener {
    Tcp(std::net::TcpListener),
    Udp(std::os::fd::OwnedFd),
}

/// Binds every listener of `spec` (all or nothing). Needs no runtime, so
/// start-up binds the command line's ports before dropping capabilities.
pub fn bind_spec(spec: &PortSpec) -> Result<Bound, PortError> {
    let mut bound = Vec::new();
    for (addr, optional) in spec.listen_addrs() {
        // An IPv6 wildcard still binds where IPv6 is disabled by sysctl,
        // but could never be reached: treat it as unavailable.
        if addr.is_ipv6() && !sys::ipv6_available() {
            if optional {
                tracing::warn!(spec = %spec,
                    "the parent namespace has no IPv6: discarding the IPv6 half [{}]:{} and keeping IPv4",
                    addr.ip(), addr.port());
                continue;
            }
            return Err(PortError::NoIpv6 { addr });
        }
        let b = if spec.proto.is_udp() {
            udp::bind(addr).map(Listener::Udp)
        } else {
            bind(addr).map(Listener::Tcp)
        };
        match b {
            Ok(l) => bound.push((addr, l)),
            Err(e)
                if optional
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL)
                    ) =>
            {
                tracing::warn!(spec = %spec, error = %e,
                    "the parent namespace has no IPv6: discarding the IPv6 half [{}]:{} and keeping IPv4",
                    addr.ip(), addr.port());
            }
            Err(e) => return Err(PortError::listen(addr, e)),
        }
    }
    Ok(bound)
}

/// Whether a bind failed only because the port is taken.
fn in_use(e: &PortError) -> bool {
    matches!(e, PortError::Listen { cause, .. } if cause.raw_os_error() == Some(libc::EADDRINUSE))
}

/// Binds the listeners of a range spec (see [`PortRangeSpec::expand`]):
/// either every port of the range or, on the first failure, none (what
/// was bound is closed again), or, for a parent range to one child port,
/// the first port of the range that is free. `taken` names the spec that
/// already holds a candidate, if one does: such a port counts as in use
/// without a bind.
/// Needs no runtime, like [`bind_spec`].
pub fn bind_range(
    range: &PortRangeSpec,
    taken: impl Fn(&PortSpec) -> Option<String>,
) -> Result<Vec<(PortSpec, Bound)>, PortError> {
    match range.expand() {
        Expansion::All(specs) => {
            // Dropping `bound` on an error closes what was bound: the
            // range is published whole or not at all.
            let mut bound = Vec::with_capacity(specs.len());
            for spec in specs {
                if let Some(other) = taken(&spec) {
                    return Err(PortError::Taken(other));
                }
                let b = bind_spec(&spec)?;
                bound.push((spec, b));
            }
            Ok(bound)
        }
        Expansion::FirstFree(specs) => {
            let mut last = None;
            for spec in specs {
                let e = match taken(&spec) {
                    Some(other) => PortError::Taken(other),
                    None => match bind_spec(&spec) {
                        Ok(b) => {
                            tracing::info!(range = %range, spec = %spec,
                                "publishing the first free port of the range: {}",
                                spec.parent_port);
                            return Ok(vec![(spec, b)]);
                        }
                        Err(e) if in_use(&e) => e,
                        Err(e) => return Err(e),
                    },
                };
                tracing::debug!(spec = %spec, error = %e, "port of the range taken, trying the next");
                last = Some(e);
            }
            Err(PortError::NoFreePort {
                range: range.to_string(),
                // A parent range holds two ports or more: `last` is set.
                last: Box::new(last.unwrap_or(PortError::Taken(range.to_string()))),
            })
        }
    }
}

impl PortManager {
    #[cfg(test)]
    pub fn new(dialer: Arc<dyn Dial>, engine: Arc<dyn Engine>) -> Self {
        Self::with_max_connections(dialer, engine, Semaphore::MAX_PERMITS)
    }

    /// A manager that carries at most `max` connections at once over all
    /// its ports: beyond it the accept loops stop accepting (clients wait
    /// in the listen backlog) until a connection ends.
    pub fn with_max_connections(
        dialer: Arc<dyn Dial>,
        engine: Arc<dyn Engine>,
        max: usize,
    ) -> Self {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        PortManager {
            ctx: Arc::new(Ctx {
                dialer,
                engine,
                udp: UdpOptions::default(),
                slots: Arc::new(Semaphore::new(max)),
                max_connections: max,
                source_ip: false,
            }),
            state: Mutex::new(State {
                next_id: 1,
                ..Default::default()
            }),
        }
    }

    /// Sets the UDP flow options (before any port is added).
    pub fn with_udp_options(mut self, opts: UdpOptions) -> Self {
        if let Some(ctx) = Arc::get_mut(&mut self.ctx) {
            ctx.udp = opts;
        }
        self
    }

    /// Passes clients' addresses to the dialer as the source to bind
    /// (before any port is added): the dialer has source preservation on.
    pub fn with_source_ip(mut self, on: bool) -> Self {
        if let Some(ctx) = Arc::get_mut(&mut self.ctx) {
            ctx.source_ip = on;
            ctx.udp.source_ip = on;
        }
        self
    }

    /// Whether source preservation is on: asked for, and the dialer (an
    /// agent, or the thread that replaced a lost one) applies it.
    pub fn source_ip(&self) -> bool {
        self.ctx.source_ip && self.ctx.dialer.preserves_source()
    }

    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.ctx.engine
    }

    /// Publishes a port; `api` is how the client spelled it. Must run
    /// inside the tokio runtime.
    pub fn add(&self, spec: PortSpec, api: ApiSpec) -> Result<PortStatus, PortError> {
        let mut st = lock(&self.state);
        if let Some((id, _)) = st.ports.iter().find(|(_, p)| p.spec.conflicts_with(&spec)) {
            return Err(PortError::Conflict(*id));
        }
        let bound = bind_spec(&spec)?;
        self.publish(&mut st, spec, api, bound)
    }

    /// Publishes a port whose listeners [`bind_spec`] bound earlier. Must
    /// run inside the tokio runtime.
    pub fn add_bound(
        &self,
        spec: PortSpec,
        api: ApiSpec,
        bound: Bound,
    ) -> Result<PortStatus, PortError> {
        let mut st = lock(&self.state);
        if let Some((id, _)) = st.ports.iter().find(|(_, p)| p.spec.conflicts_with(&spec)) {
            return Err(PortError::Conflict(*id));
        }
        self.publish(&mut st, spec, api, bound)
    }

    fn publish(
        &self,
        st: &mut State,
        spec: PortSpec,
        api: ApiSpec,
        bound: Bound,
    ) -> Result<PortStatus, PortError> {
        let mut listening = Vec::with_capacity(bound.len());
        for (addr, l) in bound {
            let l = match l {
                Listener::Tcp(l) => {
                    Served::Tcp(TcpListener::from_std(l).map_err(|e| PortError::listen(addr, e))?)
                }
                Listener::Udp(fd) => Served::Udp(fd),
            };
            listening.push((addr, l));
        }
        let bound = listening;
        let id = st.next_id;
        st.next_id += 1;
        let stats = PortStats::new(id);
        let udp_stats = spec.proto.is_udp().then(|| Arc::new(UdpStats::default()));
        let listeners: Vec<SocketAddr> = bound.iter().map(|(a, _)| *a).collect();
        let tasks = bound
            .into_iter()
            .map(|(addr, b)| match (b, &udp_stats) {
                (Served::Tcp(l), _) => tokio::spawn(accept_loop(
                    l,
                    addr,
                    spec.clone(),
                    stats.clone(),
                    self.ctx.clone(),
                )),
                (Served::Udp(sock), u) => tokio::spawn(udp::serve(udp::Published {
                    sock,
                    addr,
                    spec: spec.clone(),
                    stats: u.clone().unwrap_or_default(),
                    dialer: self.ctx.dialer.clone(),
                    opts: self.ctx.udp,
                    slots: self.ctx.slots.clone(),
                })),
            })
            .collect();
        if !spec.proto.is_udp() {
            for a in &listeners {
                self.ctx.engine.listening(*a, true);
            }
        }
        tracing::info!(id, spec = %spec, listeners = ?listeners, "port published");
        st.ports.insert(
            id,
            Port {
                spec: spec.clone(),
                api: api.clone(),
                stats,
                udp: udp_stats,
                listeners: listeners.clone(),
                tasks,
            },
        );
        Ok(PortStatus { id, api, listeners })
    }

    /// Tells the engine that a TCP port's listeners are gone.
    fn unlisten(&self, port: &Port) {
        if !port.spec.proto.is_udp() {
            for a in &port.listeners {
                self.ctx.engine.listening(*a, false);
            }
        }
    }

    /// Ports in id order.
    pub fn list(&self) -> Vec<PortStatus> {
        lock(&self.state)
            .ports
            .iter()
            .map(|(id, p)| PortStatus {
                id: *id,
                api: p.api.clone(),
                listeners: p.listeners.clone(),
            })
            .collect()
    }

    /// Unpublishes a port: its listeners are closed when this returns, its
    /// established connections run to their end.
    pub async fn remove(&self, id: u32) -> Result<(), PortError> {
        let port = {
            let mut st = lock(&self.state);
            let port = st.ports.remove(&id).ok_or(PortError::UnknownId(id))?;
            st.retired.push(port.stats.clone());
            port
        };
        tracing::info!(id, spec = %port.spec, "port removed");
        self.unlisten(&port);
        let udp = port.udp.clone();
        port.close().await;
        if let Some(u) = udp {
            // The relays are gone: the counters are final.
            lock(&self.state).retired_udp += u.snapshot();
        }
        Ok(())
    }

    /// Closes every listener (shutdown).
    ///
    /// Then ends every connection still running, on every port ever
    /// published (each engine resets both sides, counts the connection's
    /// bytes and empties its map entries), and waits up to `grace` for
    /// them, so the stats taken next are final: nothing active.
    pub async fn close_all(&self, grace: Duration) {
        let ports = {
            let mut st = lock(&self.state);
            let ports = std::mem::take(&mut st.ports);
            st.retired.extend(ports.values().map(|p| p.stats.clone()));
            ports
        };
        for (_, p) in ports {
            self.unlisten(&p);
            let udp = p.udp.clone();
            p.close().await;
            if let Some(u) = udp {
                lock(&self.state).retired_udp += u.snapshot();
            }
        }
        let retired = lock(&self.state).retired.clone();
        for p in &retired {
            p.shut_down();
        }
        let deadline = tokio::time::Instant::now() + grace;
        while retired.iter().any(|p| p.active.load(Relaxed) > 0)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// UDP counters over every UDP port ever published.
    pub fn udp_total(&self) -> UdpSnapshot {
        let st = lock(&self.state);
        let mut total = st.retired_udp;
        for p in st.ports.values() {
            if let Some(u) = &p.udp {
                total += u.snapshot();
            }
        }
        total
    }

    /// Per-port statistics and the total over all ports ever published.
    pub fn stats(&self) -> (Vec<PortReport>, Snapshot) {
        let live = self.ctx.engine.live_bytes();
        let mut st = lock(&self.state);
        // A retired port nothing refers to any more (listeners closed, last
        // connection ended) is folded into one total to keep memory flat.
        let mut folded = Snapshot::default();
        st.retired.retain(|p| {
            let gone = Arc::strong_count(p) == 1;
            if gone {
                folded += p.snapshot([0, 0]);
            }
            !gone
        });
        st.retired_total += folded;
        let mut total = st.retired_total;
        let ru = st.retired_udp;
        total.bytes_to_child += ru.bytes_to_child;
        total.bytes_to_parent += ru.bytes_to_parent;
        total.bytes_by_path.copy += ru.bytes_to_child + ru.bytes_to_parent;
        total.dial_failures += ru.dial_failures;
        for p in &st.retired {
            total += p.snapshot(live.get(&p.id).copied().unwrap_or_default());
        }
        let ports: Vec<PortReport> = st
            .ports
            .iter()
            .map(|(id, p)| {
                let mut stats = p.stats.snapshot(live.get(id).copied().unwrap_or_default());
                let udp = p.udp.as_ref().map(|u| u.snapshot());
                let engine = match &udp {
                    Some(u) => {
                        // Datagrams are copied through userspace buffers.
                        stats.bytes_to_child += u.bytes_to_child;
                        stats.bytes_to_parent += u.bytes_to_parent;
                        stats.bytes_by_path.copy += u.bytes_to_child + u.bytes_to_parent;
                        stats.dial_failures += u.dial_failures;
                        "udp".to_string()
                    }
                    None => self.ctx.engine.kind().to_string(),
                };
                PortReport {
                    id: *id,
                    spec: p.spec.to_string(),
                    engine,
                    stats,
                    udp,
                }
            })
            .collect();
        for p in &ports {
            total += p.stats;
        }
        (ports, total)
    }
}

/// A bound socket of a port.
enum Served {
    Tcp(TcpListener),
    Udp(std::os::fd::OwnedFd),
}

/// Accepts connections on one listener forever; never exits on errors.
async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    spec: PortSpec,
    stats: Arc<PortStats>,
    ctx: Arc<Ctx>,
) {
    let mut last_warn: Option<std::time::Instant> = None;
    loop {
        // At the limit, stop accepting (clients wait in the backlog,
        // established connections keep running) until a slot frees. An
        // idle listener holds no slot: the budget is shared with every
        // other listener and with UDP flows, so the slot is taken only once
        // a client is there.
        if ctx.slots.available_permits() == 0 {
            limit_reached(ctx.max_connections);
            match ctx.slots.acquire().await {
                Ok(p) => drop(p),
                Err(_) => return, // closed: never happens
            }
        }
        match listener.accept().await {
            Ok((sock, client)) => {
                // Another listener or a UDP flow may have taken the free
                // slot meanwhile: this client then waits, accepted but not
                // yet dialed, as it would have in the backlog.
                let slot = match ctx.slots.clone().try_acquire_owned() {
                    Ok(p) => p,
                    Err(_) => {
                        limit_reached(ctx.max_connections);
                        match ctx.slots.clone().acquire_owned().await {
                            Ok(p) => p,
                            Err(_) => return,
                        }
                    }
                };
                tokio::spawn(handle(
                    sock,
                    client,
                    addr.is_ipv6(),
                    spec.clone(),
                    stats.clone(),
                    ctx.clone(),
                    slot,
                ));
            }
            Err(e) if sys::is_resource_exhaustion(&e) => {
                // Out of descriptors or memory: the connection waits in the
                // backlog; back off instead of spinning, keep serving.
                if last_warn.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                    last_warn = Some(std::time::Instant::now());
                    match sys::descriptor_hint(&e) {
                        Some(hint) => {
                            tracing::warn!(%addr, error = %e, "cannot accept: {hint}; backing off")
                        }
                        None => tracing::warn!(%addr, error = %e, "accept failed, backing off"),
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                tracing::debug!(%addr, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

/// Rate limit for the connection-limit warning, shared by all ports.
static LIMIT_WARN: crate::parent::ratelimit::Every =
    crate::parent::ratelimit::Every::new(Duration::from_secs(1));

/// Logs that the connection limit is reached, once a second at most.
fn limit_reached(max: usize) {
    if LIMIT_WARN.allow().is_some() {
        tracing::warn!(
            max_connections = max,
            "connection limit reached: not accepting until a connection ends (--max-connections)"
        );
    }
}

/// Rate limit for dial-failure warnings, shared by all ports.
static DIAL_WARN: crate::parent::ratelimit::Every =
    crate::parent::ratelimit::Every::new(Duration::from_secs(1));

/// Dials the child for one accepted connection (from `client`, by a
/// listener of `spec` on an IPv6 address when `ipv6_listener`) and runs the
/// engine's forwarding of the pair in this task; on failure resets the
/// client.
async fn handle(
    sock: TcpStream,
    client: SocketAddr,
    ipv6_listener: bool,
    spec: PortSpec,
    stats: Arc<PortStats>,
    ctx: Arc<Ctx>,
    slot: tokio::sync::OwnedSemaphorePermit,
) {
    let guard = stats.open_connection().hold(slot);
    // A local client whose socket the kernel admitted to the local path:
    // the dial binds a port known in advance, so the container server's
    // socket can be admitted too (`engine::local`).
    let bind_port = ctx.engine.before_dial(&sock, ctx.dialer.netns_cookie());
    let req = DialRequest {
        spec: &spec,
        ipv6_listener,
        source: ctx.source_ip.then_some(client),
        bind_port,
    };
    let dialed = tokio::select! {
        d = tokio::time::timeout(DIAL_TIMEOUT, ctx.dialer.tcp(req)) => d,
        () = stats.closed() => {
            if let Some(p) = bind_port {
                ctx.engine.after_dial(p);
            }
            let _ = sys::set_linger_zero(sock.as_fd());
            return;
        }
    };
    if let Some(p) = bind_port {
        ctx.engine.after_dial(p);
    }
    match dialed {
        Ok(Ok((child, _reached))) => {
            // Both sockets have TCP_NODELAY already: the accepted one from
            // its listener, the dialed one from `sys::tcp_socket`.
            ctx.engine
                .run(Conn {
                    sides: [sock, child],
                    guard,
                })
                .await;
        }
        Ok(Err(e)) => dial_failed(sock, &spec, &stats, &e.to_string()),
        Err(_) => dial_failed(
            sock,
            &spec,
            &stats,
            &format!("timed out after {DIAL_TIMEOUT:?}"),
        ),
    }
}

fn dial_failed(sock: TcpStream, spec: &PortSpec, stats: &PortStats, why: &str) {
    stats.dial_failures.fetch_add(1, Relaxed);
    let _ = sys::set_linger_zero(sock.as_fd());
    drop(sock);
    if let Some(suppressed) = DIAL_WARN.allow() {
        tracing::warn!(port = stats.id, spec = %spec, suppressed,
            "dial in the child failed, client reset: {why}");
    }
}

#[cfg(test)]
mod tests {
    //! The port manager against a fake [`Dial`]: no namespace, no root.
    //! The fake records every request and connects to a server of this
    //! process (or fails), so these check what the manager asks of its
    //! dialer and what it does with the answer.

    use super::*;
    use crate::child::dial::{DialFailure, DialFuture};
    use crate::engine::copy::CopyEngine;
    use std::os::fd::OwnedFd;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// What the fake saw of one dial: the plan's target, the listener's
    /// family and the source to bind.
    type Seen = (SocketAddr, bool, Option<SocketAddr>);

    struct FakeDial {
        /// Where every dial really connects; `None`: every dial fails.
        server: Option<SocketAddr>,
        preserves: bool,
        seen: Mutex<Vec<Seen>>,
    }

    impl FakeDial {
        fn new(server: Option<SocketAddr>, preserves: bool) -> Arc<FakeDial> {
            Arc::new(FakeDial {
                server,
                preserves,
                seen: Mutex::new(Vec::new()),
            })
        }
    }

    impl Dial for FakeDial {
        fn tcp<'a>(&'a self, req: DialRequest<'a>) -> DialFuture<'a, TcpStream> {
            self.seen.lock().expect("seen").push((
                req.plan().target,
                req.ipv6_listener,
                req.source,
            ));
            Box::pin(async move {
                let server = self
                    .server
                    .ok_or_else(|| DialFailure::new(libc::ECONNREFUSED, "fake: refused"))?;
                let s = TcpStream::connect(server)
                    .await
                    .map_err(|e| DialFailure::new(libc::EIO, e.to_string()))?;
                Ok((s, server))
            })
        }

        fn udp<'a>(&'a self, _req: DialRequest<'a>) -> DialFuture<'a, OwnedFd> {
            Box::pin(async { Err(DialFailure::new(libc::EPROTONOSUPPORT, "fake: no udp")) })
        }

        fn preserves_source(&self) -> bool {
            self.preserves
        }
    }

    /// A port of this machine free right now.
    fn free_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    }

    fn publish(m: &PortManager, text: &str) -> PortStatus {
        let spec: PortSpec = text.parse().expect("spec");
        let api = ApiSpec::from(&spec);
        m.add(spec, api).expect("add")
    }

    /// An echo server of this process; returns its address.
    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 64];
                    while let Ok(n) = s.read(&mut b).await {
                        if n == 0 || s.write_all(&b[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn carries_a_connection_and_asks_the_dialer_by_the_plan() {
        let server = echo_server().await;
        let fake = FakeDial::new(Some(server), true);
        let m = PortManager::new(fake.clone(), Arc::new(CopyEngine)).with_source_ip(true);
        let p = free_port();
        let st = publish(&m, &format!("127.0.0.1:{p}:127.0.0.2:7007"));
        assert_eq!(m.list().len(), 1);
        let mut c = TcpStream::connect(("127.0.0.1", p)).await.expect("connect");
        c.write_all(b"ping").await.expect("write");
        let mut b = [0u8; 4];
        c.read_exact(&mut b).await.expect("echo");
        assert_eq!(&b, b"ping");
        let seen = fake.seen.lock().expect("seen").clone();
        let me = c.local_addr().expect("addr");
        assert_eq!(
            seen,
            vec![("127.0.0.2:7007".parse().expect("addr"), false, Some(me))]
        );
        m.remove(st.id).await.expect("remove");
        assert!(m.list().is_empty());
    }

    #[tokio::test]
    async fn a_failed_dial_resets_the_client_and_the_port_keeps_serving() {
        let fake = FakeDial::new(None, false);
        let m = PortManager::new(fake.clone(), Arc::new(CopyEngine));
        let p = free_port();
        publish(&m, &format!("127.0.0.1:{p}:80"));
        for _ in 0..2 {
            let mut c = TcpStream::connect(("127.0.0.1", p)).await.expect("connect");
            let mut b = [0u8; 1];
            let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut b))
                .await
                .expect("an answer within 5 s");
            let e = r.expect_err("a reset, not EOF or data");
            assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
        }
        // No source asked for: source preservation is off.
        assert!(fake
            .seen
            .lock()
            .expect("seen")
            .iter()
            .all(|s| s.2.is_none()));
        let (ports, _) = m.stats();
        assert_eq!(ports[0].stats.dial_failures, 2);
        assert_eq!(m.list().len(), 1);
    }

    #[test]
    fn source_preservation_needs_a_dialer_that_applies_it() {
        let engine: Arc<dyn Engine> = Arc::new(CopyEngine);
        let m = |asked: bool, preserves: bool| {
            PortManager::new(FakeDial::new(None, preserves), engine.clone())
                .with_source_ip(asked)
                .source_ip()
        };
        assert!(m(true, true));
        assert!(!m(true, false));
        assert!(!m(false, true));
        assert!(!m(false, false));
    }
}
