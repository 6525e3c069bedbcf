//! The ebpf engine: established connections are spliced inside the kernel
//! by the sk_skb program of `forwarder-ebpf`; userspace only manages each
//! connection's life.
//!
//! How it works
//! ------------
//! Traffic: every connection when the mode is ebpf (auto mode runs splice,
//! see below). A connection that cannot enter the maps (full) runs on the
//! splice engine instead, which is logged.
//!
//! State: in the kernel, three maps (see `forwarder-common`): FWD_PEERS
//! (cookie -> peer cookie and byte counters), FWD_TARGETS (a SOCKHASH of
//! redirect targets, no program) and FWD_SOCKS (the SOCKHASH whose sockets
//! run the verdict). In userspace, one task per connection holding both
//! sockets, and one epoll set shared by the engine that reports only FIN,
//! error and hang-up (never EPOLLIN: every redirected skb would otherwise
//! wake userspace).
//!
//! Events in a connection's life:
//! - accept, dial: done by the port manager; the pair arrives here. Both
//!   sockets leave tokio's reactor for the same reason as above.
//! - handoff: PEERS entries first, then both sockets into TARGETS, then
//!   both into SOCKS. A socket runs the verdict only once its peer is
//!   already a valid redirect target, so no skb is ever redirected to a
//!   missing key (which the kernel would drop). Bytes that arrived before a
//!   socket entered SOCKS (early data from the client, a server's banner)
//!   wait in its receive queue; setting SO_RCVLOWAT re-runs the socket's
//!   data-ready callback, now the verdict's, which takes the queue in order.
//!   If the second socket cannot enter SOCKS (it saw FIN or RST meanwhile,
//!   or the map is full), both leave SOCKS again, but the first socket's
//!   verdict may already have redirected bytes: they are counted and
//!   waited for until they are in the peer's send queue (removing TARGETS
//!   earlier would drop what the peer's psock still holds), then the splice
//!   engine carries the rest of the connection in order.
//! - data: the verdict redirects each skb to the peer's egress and counts
//!   its bytes in the source socket's PEERS entry. The kernel sends
//!   redirected skbs asynchronously from the peer's psock backlog.
//! - FIN from side i (POLLRDHUP): FINs are not redirected, so the task must
//!   send it on by shutting down side 1-i's write side, but only once every
//!   byte side i received is in 1-i's TCP send queue; shutting down earlier
//!   makes the backlog's send fail with EPIPE and loses the tail. Drained
//!   means: bytes the verdict redirected == tcpi_bytes_received(i) - 1 (the
//!   FIN takes one sequence number) and tcpi_bytes_acked + SIOCOUTQ of 1-i
//!   (less what was there at handoff) has reached that count. Until then the
//!   task re-checks with a backoff from 1 ms to 50 ms.
//! - drain stall: if the peer's TCP send queue is empty, the counts have
//!   not matched and neither has moved for 5 s, bytes were lost in the
//!   kernel: reset, with a warning (bytes still moving slowly, as on a
//!   starved machine, are never a stall).
//! - RST or error on either side (POLLERR): both sockets are closed with
//!   SO_LINGER 0 so each peer sees a reset. Bytes the verdict could not
//!   redirect (counted as dropped) are treated the same way: a forwarder
//!   must not turn lost bytes into a clean EOF.
//! - teardown: when both directions have carried their FIN (or on reset),
//!   the sockets leave SOCKS (no verdict runs after that), then TARGETS and
//!   PEERS; the final counts go to the port's statistics; both sockets
//!   close.
//! - forwarder exit: the port manager shuts the port down
//!   ([`crate::engine::stats::PortStats::closed`]); the connection takes the reset
//!   path above, so its map entries are gone and its bytes counted before
//!   the final stats line.
//!
//! - rare events in the program (a redirect to a peer missing from
//!   TARGETS, an skb of a socket without a PEERS entry) are logged through
//!   aya-log and appear in this process's log at debug level.
//!
//! Fallback: the splice engine ([`super::splice`]), per connection when the
//! maps are full.
//!
//! Speed, and why auto mode does not pick this engine
//! --------------------------------------------------
//! The kernel never sends a redirected skb from the verdict: it queues it
//! on the target's psock and a kernel worker (`sk_psock_backlog`, queued on
//! the CPU that ran the verdict) sends it. When the target's send buffer is
//! full the worker gets EAGAIN and re-arms itself one jiffy later (4 ms at
//! HZ=250); while that timer is pending, the kicks from later verdicts and
//! from the target's write-space callback are no-ops. Once the target has
//! filled, the direction moves about one send buffer per worker run, and
//! the runs are timer-paced: measured on 6.18 with 2 vCPUs, 60-66 runs and
//! 50-59 one-jiffy re-arms a second for 2.2 Gbit/s, in every placement
//! under load, while splice moved 3.4-8.6 Gbit/s in the same rounds. With
//! client and server on one CPU the worker, which cannot move, shares that
//! CPU with both. The controller's flow control below keeps memory bounded
//! but cannot keep the worker clear of EAGAIN: clamping earlier (at the
//! target's send buffer) made it slower, and pausing the verdict instead
//! (out of FWD_SOCKS, back in with SO_RCVLOWAT) helped 30-50% but stays
//! below splice and cannot resume a socket that got its FIN while paused.
//! The throttle itself costs about 200 ms each time it engages: on
//! loopback only a clamp below one MSS stops the sender (a larger one is
//! re-opened by every acknowledgement), the sender then waits for its own
//! zero-window probe (RTO-based, at least 200 ms), and raising the clamp
//! sends no window update (Linux announces a reopened window only when
//! data is consumed or a segment arrives). No kick from userspace
//! (TCP_QUICKACK, SO_RCVLOWAT, a peek) sends one. A far bigger target send
//! buffer (SO_SNDBUFFORCE) keeps the backlog below the throttle and helped
//! most (about 4x unpinned), still below splice, but it needs
//! CAP_NET_ADMIN after start-up, which no thread keeps.
//! Figures and commands: `bench/results/profile.md`. So auto mode runs
//! splice ([`super::AUTO_REASON`]); this engine runs with `--mode ebpf`.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use aya::maps::{HashMap as BpfHashMap, MapData, RingBuf, SockHash};
use aya::programs::SkSkb;
use aya::{Ebpf, EbpfLoader};
use forwarder_common::{
    Peer, GLOBAL_SNDBUF_OFF, GLOBAL_ULP_OFF, GLOBAL_WMEM_OFF, GLOBAL_WRITE_SEQ_OFF, MAP_EVENTS,
    MAP_PEERS, MAP_SOCKS, MAP_TARGETS, PROG_PARSER, PROG_VERDICT,
};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Notify;

use super::handoff::{self, Clamps, Direction, End, Limits, Observed, Pacing, Wait, Window};
use super::{splice::SpliceEngine, Conn, Engine, EngineKind, MapEntries};
use crate::engine::stats::DataPath;
use crate::sys::{self, EpollFd};

/// The programs, built by `forwarder/build.rs` from `forwarder-ebpf`.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/forwarder"));

/// The supervisor's thresholds (see [`super::handoff`]): a
/// direction whose backlog (bytes redirected but not yet in the peer's TCP
/// send queue) exceeds 32 MiB has its source's receive window clamped
/// until the backlog is half that. While the backlogs of all connections
/// together exceed 64 MiB, a direction is throttled from 1 MiB on: the
/// backlog's skbs are charged to no socket (the kernel's TCP memory limits
/// do not see them), so without an engine-wide bound many busy connections
/// could take the host's memory (100 connections streaming both ways held
/// several GiB before this bound). A drain may stall 5 s with the peer's
/// send queue empty and no count moving before the connection is reset as
/// broken.
const LIMITS: Limits = Limits {
    backlog_high: 32 << 20,
    backlog_total_high: 64 << 20,
    backlog_share: 1 << 20,
    drain_stall: Duration::from_secs(5),
};
/// Receive window cap of both sockets from handoff on: bytes a sender may
/// still send after its direction is throttled (the kernel never takes back
/// a window it advertised), so what a throttled direction can add to its
/// backlog. Enough for full speed on loopback and veth. The throttle's
/// clamp is 1 (the kernel raises it to its minimum, about 2 KiB).
/// Autotuning raises a clamp whenever it grows the receive buffer, so each
/// supervisor pass re-applies these ([`handoff::clamp_to_enforce`]).
const CLAMPS: Clamps = Clamps {
    cap: WINDOW_CAP,
    throttle: 1,
    throttle_held: 64 << 10,
};
const WINDOW_CAP: u32 = 4 << 20;

pub use super::EbpfOptions as Options;

/// Why the ebpf engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(
        "{what}: {} (the ebpf engine needs CAP_BPF and CAP_NET_ADMIN, or root, and a \
         kernel with sockmap support (CONFIG_BPF_STREAM_PARSER, Linux 5.13+): grant them with \
         `setcap cap_bpf,cap_net_admin+ep` on the binary or as ambient capabilities; \
         --mode splice runs without BPF)",
        chain(.cause)
    )]
    Load {
        what: &'static str,
        cause: anyhow::Error,
    },
}

/// An error and its causes, joined with ": ", each message once: aya's
/// errors repeat their cause's text ("failed to create map X: failed to
/// create map X: ...").
fn chain(e: &anyhow::Error) -> String {
    let mut out: Vec<String> = Vec::new();
    for c in e.chain() {
        let m = c.to_string();
        match out.last_mut() {
            Some(last) if last.contains(&m) => {}
            Some(last) if m.contains(last.as_str()) => *last = m,
            _ => out.push(m),
        }
    }
    out.join(": ")
}

/// Why the local-client path is off, logged (a warning when
/// `--local-path` asked for it); the engine runs without it. Returns the
/// reason.
fn local_off(e: &anyhow::Error, opts: &Options) -> String {
    let why = chain(e);
    let others = if opts.splice_others {
        "splice"
    } else {
        "sk_skb"
    };
    let msg = format!(
        "the local-client path is off, every connection takes the {others} path: {why} (it \
         needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON, the kernel's BTF, a cgroup v2 hierarchy \
         and a kernel that keeps blocking reads on sockmap sockets; `forwarder check` tells \
         which is missing)"
    );
    if opts.local_forced {
        tracing::warn!("{msg}");
    } else {
        tracing::info!("{msg}");
    }
    why
}

fn load_err(what: &'static str) -> impl FnOnce(anyhow::Error) -> EbpfError {
    move |cause| EbpfError::Load { what, cause }
}

/// The three maps, behind one lock: each operation is one short syscall.
struct Maps {
    socks: SockHash<MapData, u64>,
    targets: SockHash<MapData, u64>,
    peers: BpfHashMap<MapData, u64, Peer>,
}

/// Test seam: FWD_TEST_HANDOFF_GAP_MS widens the moment between the two
/// sockets' entry into SOCKS (where the first socket's verdict already
/// runs), so the netns suite can make the second entry fail there
/// deterministically. Unset, it costs one load of a cached value.
fn handoff_gap() {
    static GAP: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    let gap = GAP.get_or_init(|| {
        std::env::var("FWD_TEST_HANDOFF_GAP_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)
    });
    if let Some(d) = gap {
        std::thread::sleep(*d);
    }
}

impl Maps {
    /// Puts a connection into the maps in the order the module comment
    /// explains; on failure takes both sockets out of SOCKS again (the
    /// rest is the caller's, see [`Inner::abandon_handoff`]).
    fn insert(&mut self, cookies: [u64; 2], fds: [RawFd; 2], port_id: u32) -> io::Result<()> {
        let r = (|| -> Result<(), aya::maps::MapError> {
            for i in 0..2 {
                let peer = Peer {
                    peer_cookie: cookies[1 - i],
                    port_id,
                    side: i as u32,
                    ..Default::default()
                };
                self.peers.insert(cookies[i], peer, 0)?;
            }
            for i in 0..2 {
                self.targets.insert(cookies[i], fds[i], 0)?;
            }
            for i in 0..2 {
                if i == 1 {
                    handoff_gap();
                }
                self.socks.insert(cookies[i], fds[i], 0)?;
            }
            Ok(())
        })();
        r.map_err(|e| {
            // Stop the verdicts; what they may have redirected meanwhile is
            // the caller's to wait for ([`Inner::abandon_handoff`]) before
            // TARGETS and PEERS go.
            for c in &cookies {
                let _ = self.socks.remove(c);
            }
            match e {
                aya::maps::MapError::SyscallError(aya::sys::SyscallError { io_error, .. }) => {
                    io_error
                }
                other => io::Error::other(other),
            }
        })
    }

    fn peer(&self, cookie: u64) -> Option<Peer> {
        self.peers.get(&cookie, 0).ok()
    }

    /// Removes a connection: SOCKS first so no verdict runs afterwards.
    /// Returns the final PEERS entries.
    fn remove(&mut self, cookies: [u64; 2]) -> [Option<Peer>; 2] {
        for c in &cookies {
            let _ = self.socks.remove(c);
        }
        for c in &cookies {
            let _ = self.targets.remove(c);
        }
        cookies.map(|c| {
            let p = self.peers.get(&c, 0).ok();
            let _ = self.peers.remove(&c);
            p
        })
    }
}

type MapJob = Box<dyn FnOnce(&mut Maps) + Send>;

/// Where map operations run. On this kernel line any thread may update
/// the maps through the descriptors the engine holds, with no capability
/// (bpf() checks CAP_BPF only to create maps and load programs). Where
/// bpf() checks it on every command (before Linux 5.19 with
/// `kernel.unprivileged_bpf_disabled` set), one thread keeps exactly
/// CAP_BPF and runs every map operation; see `startup::map_privilege`.
enum MapHost {
    Local(Box<Mutex<Maps>>),
    Thread(std::sync::mpsc::Sender<MapJob>),
}

impl MapHost {
    /// Runs `f` on the maps, on the privileged map thread if there is one.
    fn with<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Maps) -> R + Send + 'static,
    ) -> io::Result<R> {
        match self {
            MapHost::Local(m) => Ok(f(&mut lock(m))),
            MapHost::Thread(tx) => {
                let (rtx, rrx) = std::sync::mpsc::sync_channel(1);
                let job: MapJob = Box::new(move |m| {
                    let _ = rtx.send(f(m));
                });
                let gone = || io::Error::other("the BPF map thread has stopped");
                tx.send(job).map_err(|_| gone())?;
                rrx.recv().map_err(|_| gone())
            }
        }
    }

    fn insert(&self, cookies: [u64; 2], fds: [RawFd; 2], port_id: u32) -> io::Result<()> {
        self.with(move |m| m.insert(cookies, fds, port_id))?
    }

    fn peer(&self, cookie: u64) -> Option<Peer> {
        self.with(move |m| m.peer(cookie)).ok().flatten()
    }

    fn remove(&self, cookies: [u64; 2]) -> [Option<Peer>; 2] {
        self.with(move |m| m.remove(cookies))
            .unwrap_or([None, None])
    }

    /// Moves the maps to a new thread `bpf-maps` that keeps exactly `cap`
    /// (and drops everything else) and serves every map operation
    /// from then on. Called before the process drops its capabilities.
    fn move_to_thread(&mut self, cap: caps::Capability) -> io::Result<()> {
        if matches!(self, MapHost::Thread(_)) {
            return Ok(());
        }
        let (tx, rx) = std::sync::mpsc::channel::<MapJob>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
        // On failure the host is left without maps: start-up fails then.
        let MapHost::Local(maps) = std::mem::replace(self, MapHost::Thread(tx)) else {
            return Ok(());
        };
        let mut maps = (*maps).into_inner().unwrap_or_else(|p| p.into_inner());
        std::thread::Builder::new()
            .name("bpf-maps".into())
            .spawn(move || {
                let dropped = sys::drop_thread_capabilities(&[cap]);
                let ok = dropped.is_ok();
                let _ = ready_tx.send(dropped);
                if !ok {
                    return;
                }
                while let Ok(job) = rx.recv() {
                    job(&mut maps);
                }
            })?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("the BPF map thread did not start"))?
    }
}

struct Inner {
    /// The local-client path, when on.
    local: Option<Arc<super::local::Local>>,
    /// Auto mode: connections off the local-client path run on
    /// [`Inner::fallback`] rather than the sk_skb path.
    splice_others: bool,
    maps: MapHost,
    epoll: AsyncFd<EpollFd>,
    events: tokio::sync::Mutex<AsyncFd<RingBuf<MapData>>>,
    waiters: Mutex<HashMap<u64, Arc<Notify>>>,
    fallback: SpliceEngine,
    fallback_logged: std::sync::atomic::AtomicBool,
    /// The sum of every direction's backlog as last measured by its
    /// connection (see [`LIMITS`]).
    backlog_total: std::sync::atomic::AtomicU64,
    /// Keeps the programs loaded and attached.
    _bpf: Mutex<Ebpf>,
}

/// The in-kernel engine. Minimum kernel: 5.13 (stream verdict without a
/// parser); developed and tested on 6.18.
pub struct EbpfEngine {
    inner: Arc<Inner>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The programs loaded and attached and the maps created, before any
/// runtime exists: the privileged half of the engine's start-up.
pub struct Loaded {
    local: Option<(super::local::Loaded, Option<u64>)>,
    /// Why the local-client path is off, when it was asked for and is.
    local_off: Option<String>,
    splice_others: bool,
    maps: MapHost,
    events: RingBuf<MapData>,
    epoll: Epoll,
    bpf: Ebpf,
}

impl EbpfEngine {
    /// Loads and attaches the programs and creates the maps and the epoll
    /// set (needs CAP_BPF and CAP_NET_ADMIN). Needs no runtime: call it
    /// before dropping capabilities, then [`Loaded::start`] in the runtime.
    pub fn load(opts: Options) -> Result<Loaded, EbpfError> {
        let _ = sys::raise_memlock_limit();
        // The local-client path reads `write_seq` of `struct tcp_sock` at
        // the offset the running kernel's BTF gives.
        let mut local_cgroup = opts.local.clone();
        let mut local_off_why = None;
        let offsets = super::local::Offsets {
            write_seq: 0,
            wmem_queued: 0,
            sndbuf: 0,
            ulp_ops: 0,
        };
        let offsets = match &local_cgroup {
            Some(_) => match super::local::kernel_offsets() {
                Ok(o) => o,
                Err(e) if opts.local_required => {
                    return Err(load_err("cannot start the local-client path")(e))
                }
                Err(e) => {
                    local_off_why = Some(local_off(&e, &opts));
                    local_cgroup = None;
                    offsets
                }
            },
            None => offsets,
        };
        let mut bpf = EbpfLoader::new()
            .override_global(GLOBAL_WRITE_SEQ_OFF, &offsets.write_seq, true)
            .override_global(GLOBAL_WMEM_OFF, &offsets.wmem_queued, true)
            .override_global(GLOBAL_SNDBUF_OFF, &offsets.sndbuf, true)
            .override_global(GLOBAL_ULP_OFF, &offsets.ulp_ops, true)
            .load(PROGRAMS)
            .map_err(|e| load_err("cannot load the eBPF programs")(e.into()))?;
        let take = |bpf: &mut Ebpf, name: &str| {
            bpf.take_map(name)
                .with_context(|| format!("map {name} missing from the BPF object"))
        };
        let socks: SockHash<MapData, u64> = take(&mut bpf, MAP_SOCKS)
            .and_then(|m| Ok(SockHash::try_from(m)?))
            .map_err(load_err("cannot create the socket map"))?;
        let targets: SockHash<MapData, u64> = take(&mut bpf, MAP_TARGETS)
            .and_then(|m| Ok(SockHash::try_from(m)?))
            .map_err(load_err("cannot create the target map"))?;
        let peers: BpfHashMap<MapData, u64, Peer> = take(&mut bpf, MAP_PEERS)
            .and_then(|m| Ok(BpfHashMap::try_from(m)?))
            .map_err(load_err("cannot create the peer map"))?;
        let events: RingBuf<MapData> = take(&mut bpf, MAP_EVENTS)
            .and_then(|m| Ok(RingBuf::try_from(m)?))
            .map_err(load_err("cannot create the event ring"))?;
        let mut progs = vec![PROG_VERDICT];
        if opts.parser {
            progs.insert(0, PROG_PARSER);
        }
        for name in progs {
            let prog: &mut SkSkb = bpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the BPF object"))
                .and_then(|p| Ok(p.try_into()?))
                .map_err(load_err("cannot find the sk_skb program"))?;
            prog.load()
                .with_context(|| format!("loading {name}"))
                .map_err(load_err("cannot load the sk_skb program"))?;
            prog.attach(socks.fd())
                .with_context(|| format!("attaching {name} to {MAP_SOCKS}"))
                .map_err(load_err("cannot attach the sk_skb program"))?;
        }
        let local = match &local_cgroup {
            Some(cgroup) => {
                let attached = targets
                    .fd()
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(anyhow::Error::from)
                    .and_then(|fd| Ok(MapData::from_fd(fd)?))
                    .and_then(|md| Ok(SockHash::try_from(aya::maps::Map::SockHash(md))?))
                    .and_then(|dup| super::local::attach(&mut bpf, cgroup, dup, opts.local_forced));
                match attached {
                    Ok(l) => Some((l, opts.child_netns)),
                    Err(e) if opts.local_required => {
                        return Err(load_err("cannot start the local-client path")(e))
                    }
                    Err(e) => {
                        local_off_why = Some(local_off(&e, &opts));
                        None
                    }
                }
            }
            None => None,
        };
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
            .map_err(|e| load_err("cannot create an epoll set")(e.into()))?;
        Ok(Loaded {
            local,
            local_off: local_off_why,
            splice_others: opts.splice_others,
            maps: MapHost::Local(Box::new(Mutex::new(Maps {
                socks,
                targets,
                peers,
            }))),
            events,
            epoll,
            bpf,
        })
    }
}

impl Loaded {
    /// Whether the local-client path runs.
    pub fn has_local_path(&self) -> bool {
        self.local.is_some()
    }

    /// Why the local-client path is off, where it was asked for.
    pub fn local_off_reason(&self) -> Option<&str> {
        self.local_off.as_deref()
    }

    /// What the local-client path's self-test found, where it ran.
    pub fn local_blocking_read(&self) -> Option<super::local::probe::BlockingRead> {
        self.local.as_ref().map(|(l, _)| l.blocking_read.clone())
    }

    /// Probes whether a thread without any capability may operate on the
    /// maps through the held descriptors: a lookup of a missing key on a
    /// short-lived thread that first drops every capability. `Ok` when the
    /// kernel answered "no such key", the errno otherwise.
    pub fn probe_unprivileged_map_access(&self) -> io::Result<()> {
        let MapHost::Local(maps) = &self.maps else {
            return Ok(());
        };
        let maps = lock(maps);
        std::thread::scope(|s| {
            s.spawn(|| {
                sys::drop_thread_capabilities(&[])?;
                match maps.peers.get(&0, 0) {
                    Ok(_) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                    Err(aya::maps::MapError::SyscallError(e)) => Err(e.io_error),
                    Err(e) => Err(io::Error::other(e)),
                }
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the probe thread panicked")))
        })
    }

    /// Moves every map operation to one thread that keeps exactly `cap`
    /// (CAP_BPF, for kernels where bpf() checks it on every command). Must
    /// be called before the process drops its capabilities.
    pub fn keep_capability_on_map_thread(&mut self, cap: caps::Capability) -> io::Result<()> {
        self.maps.move_to_thread(cap)
    }

    /// Registers the epoll set and the event ring with the runtime and
    /// starts the engine's two tasks. Must run inside the tokio runtime;
    /// needs no capability.
    pub fn start(self) -> Result<EbpfEngine, EbpfError> {
        let Loaded {
            local,
            local_off: _,
            splice_others,
            maps,
            events,
            epoll,
            mut bpf,
        } = self;
        let local = match local {
            Some((l, netns)) => {
                let l = l
                    .start(netns)
                    .map_err(|e| load_err("cannot start the local-client path")(e.into()))?;
                tracing::info!(cgroup = %l.cgroup.display(),
                    "local-client path on: local clients' sends move inside their own sendmsg()");
                Some(l)
            }
            None => None,
        };
        let epoll = sys::async_fd(EpollFd(epoll), Interest::READABLE)
            .map_err(|e| load_err("cannot register the epoll set")(e.into()))?;
        let events = sys::async_fd(events, Interest::READABLE)
            .map_err(|e| load_err("cannot register the event ring")(e.into()))?;
        let logger = spawn_bpf_logger(&mut bpf);
        let inner = Arc::new(Inner {
            local,
            splice_others,
            maps,
            epoll,
            events: tokio::sync::Mutex::new(events),
            waiters: Mutex::new(HashMap::new()),
            fallback: SpliceEngine::new(),
            fallback_logged: Default::default(),
            backlog_total: Default::default(),
            _bpf: Mutex::new(bpf),
        });
        let dispatcher = tokio::spawn(dispatch(inner.clone()));
        let ring = tokio::spawn(dispatch_events(inner.clone()));
        Ok(EbpfEngine {
            inner,
            tasks: [Some(dispatcher), Some(ring), logger]
                .into_iter()
                .flatten()
                .collect(),
        })
    }
}

impl Drop for EbpfEngine {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Forwards the programs' aya-log records (rare events such as a redirect
/// to a missing peer, at debug level; see `forwarder-ebpf`) to this
/// process's log until the engine stops. Without the log map the engine
/// still runs, without those messages.
fn spawn_bpf_logger(bpf: &mut Ebpf) -> Option<tokio::task::JoinHandle<()>> {
    let logger = match aya_log::EbpfLogger::init(bpf) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "the BPF programs' log is unavailable");
            return None;
        }
    };
    let mut fd = match sys::async_fd(logger, Interest::READABLE) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the BPF programs' log");
            return None;
        }
    };
    Some(tokio::spawn(async move {
        loop {
            let mut guard = match fd.readable_mut().await {
                Ok(g) => g,
                Err(e) => {
                    tracing::warn!(error = %e, "the BPF programs' log failed; no more messages from it");
                    return;
                }
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads the shared epoll set and wakes the connections it names.
async fn dispatch(inner: Arc<Inner>) {
    let mut events = vec![EpollEvent::empty(); 256];
    loop {
        let mut guard = match inner.epoll.readable().await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "epoll set failed; FIN and reset detection stops");
                return;
            }
        };
        match inner
            .epoll
            .get_ref()
            .0
            .wait(&mut events, EpollTimeout::ZERO)
        {
            Ok(0) => guard.clear_ready(),
            Ok(n) => {
                let waiters = lock(&inner.waiters);
                for ev in &events[..n] {
                    if let Some(w) = waiters.get(&ev.data()) {
                        w.notify_one();
                    }
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                tracing::error!(error = %e, "epoll_wait failed");
                guard.clear_ready();
            }
        }
    }
}

/// Reads the verdict's events (a socket crossed another 2 MiB) and wakes
/// the connection, which then checks its backlog.
async fn dispatch_events(inner: Arc<Inner>) {
    let mut ring = inner.events.lock().await;
    loop {
        let mut guard = match ring.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "event ring failed; flow control stops");
                return;
            }
        };
        let mut woke = false;
        while let Some(item) = guard.get_inner_mut().next() {
            woke = true;
            let Ok(bytes) = <[u8; 8]>::try_from(&item[..]) else {
                continue;
            };
            let cookie = u64::from_ne_bytes(bytes);
            if let Some(w) = lock(&inner.waiters).get(&cookie) {
                w.notify_one();
            }
        }
        if !woke {
            guard.clear_ready();
        }
    }
}

/// What a pass over one direction looks at.
struct Pass<'a> {
    socks: &'a [std::net::TcpStream; 2],
    /// Side i's cookie (its verdict counters).
    cookie_i: u64,
    /// Side j's send queue at handoff.
    base_j: u64,
    /// The direction's source side.
    i: usize,
    /// Side i has received a FIN.
    fin_received: bool,
}

enum Outcome {
    Closed,
    /// A peer's reset or error, or the forwarder stopping.
    Reset(String),
    /// The supervisor's own verdict that the stream cannot be whole
    /// (bytes dropped in the kernel, a stalled drain): reset, and warn.
    Broken(String),
}

impl Inner {
    /// Runs one connection from handoff to teardown.
    async fn run(self: Arc<Self>, conn: Conn) {
        if let Some(l) = &self.local {
            if let Some(pair) = l.pair(&conn.sides).await {
                super::local::run(l.clone(), conn, pair).await;
                return;
            }
        }
        if self.splice_others {
            self.fallback.run(conn).await;
            return;
        }
        let Conn { sides, guard } = conn;
        let port = guard.port().clone();
        let [a, b] = sides;
        let socks = match (a.into_std(), b.into_std()) {
            (Ok(a), Ok(b)) => [a, b],
            _ => return, // deregistration failed: the sockets are closed
        };
        let (cookies, base) = match self.prepare(&socks) {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "cannot prepare a connection's sockets for BPF; the splice engine takes it");
                self.fall_back(socks, guard);
                return;
            }
        };
        let fds = [socks[0].as_raw_fd(), socks[1].as_raw_fd()];
        if let Err(e) = self.maps.insert(cookies, fds, port.id) {
            if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                // A side already saw FIN (CLOSE_WAIT): the kernel admits only
                // established sockets into a sockmap.
                tracing::debug!("connection half-closed before handoff; splice engine takes it");
            } else if !self.fallback_logged.swap(true, Relaxed) {
                tracing::warn!(error = %e,
                    "cannot put a connection into the BPF maps (full?); such connections run on the splice engine");
            }
            if self.abandon_handoff(&socks, cookies, base, &port).await {
                self.fall_back(socks, guard);
            }
            return;
        }
        let notify = Arc::new(Notify::new());
        {
            let mut w = lock(&self.waiters);
            w.insert(cookies[0], notify.clone());
            w.insert(cookies[1], notify.clone());
        }
        // This connection's share of the engine-wide backlog total.
        let mut reported = [0u64; 2];
        let outcome = match self.watch(&socks, cookies) {
            // At exit the connection is torn down here, so its bytes are
            // counted and its map entries removed before the final stats.
            Ok(()) => tokio::select! {
                o = self.supervise(&socks, cookies, base, &notify, &mut reported) => o,
                () = port.closed() => Outcome::Reset("the forwarder is stopping".into()),
            },
            Err(e) => Outcome::Reset(format!("cannot watch the sockets: {e}")),
        };
        self.backlog_total
            .fetch_sub(reported[0] + reported[1], Relaxed);
        {
            let mut w = lock(&self.waiters);
            w.remove(&cookies[0]);
            w.remove(&cookies[1]);
        }
        let finals = self.maps.remove(cookies);
        for (i, p) in finals.iter().enumerate() {
            if let Some(p) = p {
                port.add_bytes(i, p.bytes, DataPath::Bpf);
            }
        }
        let reset = match &outcome {
            Outcome::Closed => false,
            Outcome::Reset(why) => {
                tracing::debug!(port = port.id, %why, "resetting connection");
                true
            }
            Outcome::Broken(why) => {
                tracing::warn!(port = port.id, %why, "resetting a broken connection");
                true
            }
        };
        if reset {
            for s in &socks {
                let _ = sys::set_linger_zero(s.as_fd());
            }
        }
        drop(socks);
        drop(guard);
    }

    /// Before handoff: both cookies, each side's send queue (acked +
    /// unacked) now, and both windows capped.
    fn prepare(&self, socks: &[std::net::TcpStream; 2]) -> io::Result<([u64; 2], [u64; 2])> {
        let cookies = [
            sys::socket_cookie(socks[0].as_fd())?,
            sys::socket_cookie(socks[1].as_fd())?,
        ];
        let base = [
            sys::tcp_counters(socks[0].as_fd())?.queued(),
            sys::tcp_counters(socks[1].as_fd())?.queued(),
        ];
        for s in socks {
            sys::set_window_clamp(s.as_fd(), WINDOW_CAP)?;
        }
        Ok((cookies, base))
    }

    /// After a handoff that failed half-way (one socket entered SOCKS, the
    /// other could not: it saw FIN or RST meanwhile). Both are out of SOCKS
    /// again, but the verdict of the first may have redirected bytes in
    /// between: they are counted, and waited for until they are in the
    /// peer's TCP send queue (taking TARGETS away earlier would drop what
    /// the peer's psock still holds), so the splice engine continues the
    /// stream in order. Returns false, having reset both sockets, where
    /// those bytes cannot be accounted for (dropped, or stalled for
    /// [`Limits::drain_stall`]).
    async fn abandon_handoff(
        &self,
        socks: &[std::net::TcpStream; 2],
        cookies: [u64; 2],
        base: [u64; 2],
        port: &Arc<crate::engine::stats::PortStats>,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + LIMITS.drain_stall;
        let mut whole = true;
        for i in 0..2 {
            while let Some(p) = self.maps.peer(cookies[i]) {
                if p.dropped > 0 {
                    whole = false;
                    break;
                }
                let queued_j = sys::tcp_counters(socks[1 - i].as_fd())
                    .map(|c| c.queued().saturating_sub(base[1 - i]))
                    .unwrap_or(0);
                if queued_j >= p.bytes {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    whole = false;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let finals = self.maps.remove(cookies);
        for (i, p) in finals.iter().enumerate() {
            if let Some(p) = p {
                port.add_bytes(i, p.bytes, DataPath::Bpf);
            }
        }
        if !whole {
            tracing::warn!(
                port = port.id,
                "bytes redirected during a failed handoff were lost; resetting the connection"
            );
            for s in socks {
                let _ = sys::set_linger_zero(s.as_fd());
            }
        }
        whole
    }

    /// Hands a connection the maps cannot take to the splice engine.
    fn fall_back(&self, socks: [std::net::TcpStream; 2], guard: crate::engine::stats::ConnGuard) {
        let [a, b] = socks;
        match (
            tokio::net::TcpStream::from_std(a),
            tokio::net::TcpStream::from_std(b),
        ) {
            (Ok(a), Ok(b)) => self.fallback.spawn(Conn {
                sides: [a, b],
                guard,
            }),
            _ => tracing::warn!("cannot hand a connection to the splice engine; closing it"),
        }
    }

    fn watch(&self, socks: &[std::net::TcpStream; 2], cookies: [u64; 2]) -> io::Result<()> {
        let ep = &self.epoll.get_ref().0;
        for (s, c) in socks.iter().zip(cookies) {
            ep.add(
                s.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET, c),
            )?;
        }
        // Hand the bytes queued before handoff to the verdict (see above).
        for s in socks {
            sys::set_rcvlowat(s.as_fd(), 1)?;
        }
        Ok(())
    }

    /// Watches a connection until both FINs have been carried or a reset.
    /// Woken by FIN/error events on either socket and by the verdict's
    /// every-2-MiB events; polls with a backoff only while a direction is
    /// draining or throttled, and every 20 ms while a backlog it reported
    /// to the engine-wide total is not yet back to zero. `reported` holds
    /// what it added to that total, for the caller to take back.
    async fn supervise(
        &self,
        socks: &[std::net::TcpStream; 2],
        cookies: [u64; 2],
        base: [u64; 2],
        notify: &Notify,
        reported: &mut [u64; 2],
    ) -> Outcome {
        let fd = |i: usize| -> BorrowedFd<'_> { socks[i].as_fd() };
        // dirs[i]: direction i -> 1-i.
        let mut dirs = [Direction::default(), Direction::default()];
        let mut pacing = Pacing::default();
        loop {
            let st = match sys::poll_states([fd(0), fd(1)]) {
                Ok(s) => s,
                Err(e) => return Outcome::Reset(format!("poll: {e}")),
            };
            for (i, s) in st.iter().enumerate() {
                if s.err {
                    let e = sys::take_error(fd(i)).ok().flatten();
                    return Outcome::Reset(format!(
                        "side {i}: {}",
                        e.map_or_else(|| "error".to_string(), |e| e.to_string())
                    ));
                }
            }
            let mut poll_again = false;
            for i in 0..2 {
                if dirs[i].is_done() {
                    continue;
                }
                let pass = Pass {
                    socks,
                    cookie_i: cookies[i],
                    base_j: base[1 - i],
                    i,
                    fin_received: st[i].rdhup,
                };
                match self.pass(&pass, &mut dirs[i], &mut reported[i]) {
                    Ok(again) => poll_again |= again,
                    Err(outcome) => return outcome,
                }
            }
            if dirs.iter().all(Direction::is_done) {
                return Outcome::Closed;
            }
            // A backlog drains without waking us: while this connection
            // holds a share of the engine-wide total, look again soon so the
            // total does not keep a stale share.
            let holding = reported.iter().any(|&b| b > 0);
            let throttled = dirs.iter().any(Direction::is_throttled);
            match pacing.next(poll_again, throttled, holding) {
                Wait::Yield => tokio::task::yield_now().await,
                Wait::Sleep(d) => {
                    tokio::select! {
                        _ = notify.notified() => {}
                        _ = tokio::time::sleep(d) => {}
                    }
                }
                Wait::Park => notify.notified().await,
            }
        }
    }

    /// One pass over direction i -> j: observe, keep the engine-wide
    /// backlog total current (`reported` is this direction's share of it),
    /// decide ([`Direction::step`]) and carry the decision out. Returns
    /// whether to look again soon, or how the connection ends.
    fn pass(&self, p: &Pass<'_>, dir: &mut Direction, reported: &mut u64) -> Result<bool, Outcome> {
        let (i, j) = (p.i, 1 - p.i);
        let fd = |k: usize| -> BorrowedFd<'_> { p.socks[k].as_fd() };
        let mut observed = self
            .observe(p.socks, p.cookie_i, p.base_j, i, p.fin_received)
            .map_err(Outcome::Reset)?;
        let backlog = observed.backlog();
        if backlog > *reported {
            self.backlog_total.fetch_add(backlog - *reported, Relaxed);
        } else {
            self.backlog_total.fetch_sub(*reported - backlog, Relaxed);
        }
        *reported = backlog;
        observed.engine_total = self.backlog_total.load(Relaxed);
        tracing::trace!(side = i, ?observed, "observed");
        let step = dir.step(&observed, Instant::now(), &LIMITS);
        match step.window {
            Window::Keep => {}
            Window::Clamp => {
                if sys::set_window_clamp(fd(i), CLAMPS.throttle).is_ok() {
                    tracing::trace!(side = i, "throttling the sender");
                    dir.clamped();
                }
            }
            Window::Release => {
                tracing::trace!(side = i, "releasing the sender");
                let _ = sys::set_window_clamp(fd(i), CLAMPS.cap);
            }
        }
        // Autotuning may have raised the clamp since the last pass.
        if !observed.fin_received {
            if let Some(c) = sys::window_clamp(fd(i))
                .ok()
                .and_then(|cur| handoff::clamp_to_enforce(cur, dir.is_throttled(), &CLAMPS))
            {
                tracing::trace!(side = i, clamp = c, "re-applying the receive window clamp");
                let _ = sys::set_window_clamp(fd(i), c);
            }
        }
        match step.end {
            End::Open => {}
            End::SendFin => {
                sys::shutdown_write(fd(j))
                    .map_err(|e| Outcome::Reset(format!("shutdown side {j}: {e}")))?;
                dir.fin_sent();
            }
            End::Reset(why) => return Err(Outcome::Broken(format!("direction {i}->{j}: {why}"))),
        }
        Ok(step.poll_again)
    }

    /// Reads what [`Direction::step`] needs about direction i -> j: the
    /// verdict's counters for side i, and side j's send queue (side i's
    /// received bytes once it saw FIN). An error is a reason to reset.
    fn observe(
        &self,
        socks: &[std::net::TcpStream; 2],
        cookie_i: u64,
        base_j: u64,
        i: usize,
        fin_received: bool,
    ) -> Result<Observed, String> {
        let peer = self
            .maps
            .peer(cookie_i)
            .ok_or_else(|| "peer entry vanished".to_string())?;
        let cj = sys::tcp_counters(socks[1 - i].as_fd()).map_err(|e| format!("TCP_INFO: {e}"))?;
        let received_i = if fin_received {
            sys::tcp_counters(socks[i].as_fd())
                .map_err(|e| format!("TCP_INFO: {e}"))?
                .bytes_received
        } else {
            0
        };
        Ok(Observed {
            fin_received,
            redirected: peer.bytes,
            dropped: peer.dropped,
            queued_j: cj.queued().saturating_sub(base_j),
            received_i,
            // Nothing unsent or unacknowledged: a drain that still has not
            // completed is not waiting for the network.
            j_idle: cj.outq == 0,
            // Filled in by the caller, which keeps the total.
            engine_total: 0,
        })
    }
}

impl Engine for EbpfEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Ebpf
    }

    fn run(&self, conn: Conn) -> super::Forwarding {
        Box::pin(self.inner.clone().run(conn))
    }

    fn listening(&self, addr: std::net::SocketAddr, on: bool) {
        if let Some(l) = &self.inner.local {
            l.listening(addr, on);
        }
    }

    fn before_dial(
        &self,
        accepted: &tokio::net::TcpStream,
        child_netns: Option<u64>,
    ) -> Option<u16> {
        self.inner
            .local
            .as_ref()?
            .before_dial(accepted, child_netns)
    }

    fn after_dial(&self, port: u16) {
        if let Some(l) = &self.inner.local {
            l.after_dial(port);
        }
    }

    fn live_bytes(&self) -> HashMap<u32, [u64; 2]> {
        self.inner
            .maps
            .with(|maps| {
                let mut out: HashMap<u32, [u64; 2]> = HashMap::new();
                for (_, p) in maps.peers.iter().flatten() {
                    if let Some(slot) = out.entry(p.port_id).or_default().get_mut(p.side as usize) {
                        *slot += p.bytes;
                    }
                }
                out
            })
            .unwrap_or_default()
    }

    fn local_path(&self) -> Option<crate::wire::LocalPath> {
        let c = self.inner.local.as_ref()?.counters();
        Some(crate::wire::LocalPath {
            clients: c.clients,
            servers: c.servers,
            refused: c.refused,
            redirect_failed: c.redirect_failed,
            targets: c.targets,
        })
    }

    fn map_entries(&self) -> Option<MapEntries> {
        self.inner
            .maps
            .with(|maps| MapEntries {
                sockets: maps.socks.keys().count() as u64,
                targets: maps.targets.keys().count() as u64,
                peers: maps.peers.keys().count() as u64,
            })
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::chain;

    #[test]
    fn error_chains_say_each_thing_once() {
        let e = anyhow::anyhow!("failed to create map `M`: Operation not permitted")
            .context("failed to create map `M`")
            .context("map error");
        assert_eq!(
            chain(&e),
            "map error: failed to create map `M`: Operation not permitted"
        );
    }
}
