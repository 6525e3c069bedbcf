//! The local-client path: a local client's sends, and the container
//! server's replies, move into the forwarder's other socket inside the
//! sender's own `sendmsg()`.
//!
//! How it works
//! ------------
//! Four sockets make one forwarded connection from a client on this host:
//! C (the client's, parent namespace), A (accepted by the forwarder), B
//! (dialed by the forwarder in the child namespace) and S (accepted by the
//! container's server). With no forwarder C would talk to S over one TCP
//! hop; here C's bytes go into B's send queue and S's into A's, so each
//! direction still crosses exactly one TCP hop (B -> S, A -> C).
//!
//! - [`fwd_sockops`] runs for every TCP socket of the cgroup it is attached
//!   to (the whole host by default). It only reads: it never writes `reply`
//!   nor callback flags. It admits a socket into [`FWD_MSG_SOCKS`] in two
//!   cases and no other:
//!   - C: `ACTIVE_ESTABLISHED`, its peer one of the forwarder's listen
//!     endpoints in [`FWD_LISTEN`] (namespace cookie included);
//!   - S: `PASSIVE_ESTABLISHED`, its peer an endpoint the forwarder
//!     registered in [`FWD_DIALED`] before dialing from it.
//!
//!   It records the socket's cookie and `snd_una` (the first sequence
//!   number of its data) in the socket's own storage [`FWD_SELF`], and its
//!   tuple -> cookie in [`FWD_ADMITTED`], where the controller finds it from
//!   A's or B's addresses.
//!
//!   It also recognises the forwarder's own sockets of such a connection:
//!   A (`PASSIVE_ESTABLISHED` on a listen endpoint, its client C admitted)
//!   and B (`ACTIVE_ESTABLISHED` from a registered dial endpoint). On these
//!   two, and on no other socket, it turns on the RTT callback, and from it
//!   keeps the target's acknowledged sequence in [`FWD_ACKS`].
//! - [`fwd_msg`] runs inside every `sendmsg()` of an admitted socket. The
//!   controller's [`Link`] (by cookie) says where the bytes may go; the
//!   program's own [`Flow`] says what it did. While *armed* and within the
//!   credit, it redirects the send into the target's send queue (egress,
//!   no `BPF_F_INGRESS`). Otherwise the bytes take the socket's own TCP
//!   path (C -> A, S -> B), which the controller relays with splice, and
//!   the socket is *disarmed*.
//! - Switching to the redirect needs agreement: the program arms only when
//!   the socket's TCP-path bytes (`write_seq - base`, read through
//!   `bpf_skc_to_tcp_sock`) equal [`Link::arm_at`], the bytes the
//!   controller has relayed into the target. It runs under the sender's
//!   socket lock, so no TCP-path byte can slip in between the check and
//!   the redirect, and a redirected byte never overtakes one sent by TCP.
//!   Switching back to TCP is always safe.
//! - A socket that turns on an upper-layer protocol after admission (kTLS
//!   runs the program on plaintext records) is never redirected again.
//! - The credit keeps the target's queue below its send buffer, so a
//!   redirect never waits on the target: a sender is only ever held back
//!   by its own socket, whose poll and wake-ups are TCP's. The queue after
//!   a redirect is what went into the target (the relay's [`Link::arm_at`]
//!   plus the redirects) less what the target's peer acknowledged
//!   ([`FWD_ACKS`]); it must stay within [`Link::cap`]. The credit is kept
//!   in the kernel, from the target's own acknowledgements: no round trip
//!   to userspace, which on a busy machine may wait milliseconds for a
//!   CPU.
#![allow(clippy::missing_safety_doc)]

use aya_ebpf::{
    bindings::{
        bpf_sock, sk_action::SK_PASS, BPF_NOEXIST, BPF_SK_STORAGE_GET_F_CREATE,
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
    },
    btf_maps::SkStorage,
    helpers::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_sk_storage_get, bpf_skc_to_tcp_sock,
    },
    macros::{btf_map, map, sk_msg, sock_ops},
    maps::{Array, HashMap, LruHashMap, SockHash},
    programs::{SkMsgContext, SockOpsContext},
};
use forwarder_common::{
    Acks, Admission, Counters, Endpoint, Flow, Link, Tuple, MAX_LOCAL, ROLE_CLIENT, ROLE_SERVER,
};

use crate::FWD_TARGETS;

/// Admitted sockets (C and S) by cookie; [`fwd_msg`] is attached here.
#[map]
static FWD_MSG_SOCKS: SockHash<u64> = SockHash::with_max_entries(MAX_LOCAL, 0);

/// The forwarder's listen endpoints in its own namespace -> port id.
#[map]
static FWD_LISTEN: HashMap<Endpoint, u32> = HashMap::with_max_entries(4096, 0);

/// Endpoints the forwarder dials from in the child namespace.
#[map]
static FWD_DIALED: HashMap<Endpoint, u32> = HashMap::with_max_entries(MAX_LOCAL, 0);

/// Admitted sockets by tuple, for the controller to pair them.
#[map]
static FWD_ADMITTED: LruHashMap<Tuple, u64> = LruHashMap::with_max_entries(MAX_LOCAL, 0);

/// The controller's word per admitted socket (by cookie).
#[map]
static FWD_LINKS: HashMap<u64, Link> = HashMap::with_max_entries(MAX_LOCAL, 0);

/// What the program did per admitted socket (by cookie).
#[map]
static FWD_FLOWS: HashMap<u64, Flow> = HashMap::with_max_entries(MAX_LOCAL, 0);

/// Redirect targets' acknowledged sequence, by cookie. LRU: an entry the
/// controller failed to remove goes by itself, and a missing entry only
/// means no credit (the sender takes TCP).
#[map]
static FWD_ACKS: LruHashMap<u64, Acks> = LruHashMap::with_max_entries(MAX_LOCAL, 0);

/// Path-wide counters.
#[map]
static FWD_COUNTERS: Array<Counters> = Array::with_max_entries(1, 0);

/// Each admitted socket's cookie and base sequence number.
#[btf_map]
static FWD_SELF: SkStorage<Admission> = SkStorage::new();

/// Offset of `write_seq` in the kernel's `struct tcp_sock`, set by the
/// controller from the kernel's BTF before loading (read-only data, so the
/// verifier sees a constant).
#[unsafe(no_mangle)]
static WRITE_SEQ_OFF: u32 = 0;

/// Offsets of `sk_wmem_queued` and `sk_sndbuf` in `struct sock`, which
/// `struct tcp_sock` begins with (set like [`WRITE_SEQ_OFF`]).
#[unsafe(no_mangle)]
static WMEM_OFF: u32 = 0;
#[unsafe(no_mangle)]
static SNDBUF_OFF: u32 = 0;
/// Offset of `icsk_ulp_ops` in `struct inet_connection_sock`.
#[unsafe(no_mangle)]
static ULP_OFF: u32 = 0;

/// Whether the socket behind `sk` has turned on an upper-layer protocol
/// (kTLS): its sends reach the program as plaintext records, which must
/// never be redirected past the ULP. `true` when it cannot be told.
///
/// # Safety
/// `sk` must be a socket pointer the verifier knows (`bpf_sock`).
unsafe fn has_ulp(sk: *mut bpf_sock) -> bool {
    let tp = unsafe { bpf_skc_to_tcp_sock(sk.cast()) };
    if tp.is_null() {
        return true;
    }
    let off = unsafe { core::ptr::read_volatile(&raw const ULP_OFF) };
    let ops = unsafe { core::ptr::read_volatile(tp.cast::<u8>().add(off as usize).cast::<u64>()) };
    ops != 0
}

/// Reads a 32-bit field at a BTF offset of the TCP socket behind `sk`.
///
/// # Safety
/// `sk` must be a socket pointer the verifier knows (`bpf_sock`).
unsafe fn tcp_field(sk: *mut bpf_sock, off: &u32) -> Option<u32> {
    let tp = unsafe { bpf_skc_to_tcp_sock(sk.cast()) };
    if tp.is_null() {
        return None;
    }
    let off = unsafe { core::ptr::read_volatile(off) };
    Some(unsafe { core::ptr::read_volatile(tp.cast::<u8>().add(off as usize).cast::<u32>()) })
}

const AF_INET: u32 = 2;
const RTT_CB: u32 = aya_ebpf::bindings::BPF_SOCK_OPS_RTT_CB;
const RTT_CB_FLAG: i32 = aya_ebpf::bindings::BPF_SOCK_OPS_RTT_CB_FLAG as i32;
const AF_INET6: u32 = 10;

fn count(field: fn(&mut Counters) -> &mut u64) {
    if let Some(c) = FWD_COUNTERS.get_ptr_mut(0) {
        // SAFETY: c points into a live array value. The BPF target has no
        // atomic read-modify-write in Rust, so two CPUs may lose an
        // increment: these counters are for statistics only.
        unsafe {
            let f = field(&mut *c);
            core::ptr::write_volatile(f, core::ptr::read_volatile(f) + 1);
        }
    }
}

/// The v4-mapped form of an IPv4 address in network byte order.
fn mapped(ip4: u32) -> [u32; 4] {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip4]
}

/// `bpf_sock_ops.remote_port` holds the port in network byte order, in
/// the low 16 bits on current kernels and the high 16 bits on old ones.
fn remote_port(raw: u32) -> u32 {
    let net = if raw & 0xffff != 0 {
        raw & 0xffff
    } else {
        raw >> 16
    };
    u32::from(u16::from_be(net as u16))
}

/// Admits local clients and the container server's sockets of the
/// forwarder's connections, and follows the acknowledgements of the
/// forwarder's own sockets of those connections. Never writes `reply`, and
/// sets callback flags on the forwarder's own sockets A and B only.
#[sock_ops]
pub fn fwd_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == RTT_CB {
        acked(&ctx);
        return 0;
    }
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        return 0;
    }
    let ops = ctx.ops;
    // Every field is read once, unconditionally, at its own constant
    // offset: the verifier refuses a context access through a computed
    // offset, which the compiler makes of a branch-dependent field choice.
    // SAFETY: ops is the program's context; each read is a plain field.
    let (local, remote, lport, rport) = unsafe {
        use core::ptr::read_volatile as rv;
        let l4 = rv(&raw const (*ops).local_ip4);
        let r4 = rv(&raw const (*ops).remote_ip4);
        let l6 = [
            rv(&raw const (*ops).local_ip6[0]),
            rv(&raw const (*ops).local_ip6[1]),
            rv(&raw const (*ops).local_ip6[2]),
            rv(&raw const (*ops).local_ip6[3]),
        ];
        let r6 = [
            rv(&raw const (*ops).remote_ip6[0]),
            rv(&raw const (*ops).remote_ip6[1]),
            rv(&raw const (*ops).remote_ip6[2]),
            rv(&raw const (*ops).remote_ip6[3]),
        ];
        let lport = rv(&raw const (*ops).local_port);
        let rport = remote_port(rv(&raw const (*ops).remote_port));
        match rv(&raw const (*ops).family) {
            AF_INET => (mapped(l4), mapped(r4), lport, rport),
            AF_INET6 => (l6, r6, lport, rport),
            _ => return 0,
        }
    };
    // SAFETY: the helper takes the program's context.
    let netns = unsafe { bpf_get_netns_cookie(ops.cast()) };
    let peer = Endpoint {
        netns,
        addr: remote,
        port: rport,
        _pad: 0,
    };
    let me = Endpoint {
        netns,
        addr: local,
        port: lport,
        _pad: 0,
    };
    let tuple = Tuple {
        netns,
        local,
        remote,
        local_port: lport,
        remote_port: rport,
    };
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        if listened(peer) {
            admit(&ctx, tuple, ROLE_CLIENT);
        } else if dialed(me) {
            follow(&ctx);
        }
    } else if dialed(peer) {
        admit(&ctx, tuple, ROLE_SERVER);
    } else if listened(me) {
        // A: ours only if its client C was admitted (C's connect completed,
        // and with it C's admission, before A was created).
        let c = Tuple {
            netns,
            local: remote,
            remote: local,
            local_port: rport,
            remote_port: lport,
        };
        // SAFETY: a map lookup with a key on the stack.
        if unsafe { FWD_ADMITTED.get(&c) }.is_some() {
            follow(&ctx);
        }
    }
    0
}

/// Whether `peer` is an endpoint the forwarder dials from: registered
/// with its address, or (bound to the unspecified address) by port alone.
fn dialed(peer: Endpoint) -> bool {
    let mut any = peer;
    any.addr = [0; 4];
    // SAFETY: map lookups with keys on the stack.
    unsafe { FWD_DIALED.get(&peer).is_some() || FWD_DIALED.get(&any).is_some() }
}

/// Whether `peer` is a listen endpoint of the forwarder: exactly, or by a
/// wildcard listener of the same port (`0.0.0.0` for IPv4, `::` for both).
fn listened(peer: Endpoint) -> bool {
    // SAFETY: map lookups with keys on the stack.
    unsafe {
        if FWD_LISTEN.get(&peer).is_some() {
            return true;
        }
        let mut any = peer;
        if peer.addr[0] == 0 && peer.addr[1] == 0 && peer.addr[2] == mapped(0)[2] {
            any.addr = mapped(0);
            if FWD_LISTEN.get(&any).is_some() {
                return true;
            }
        }
        any.addr = [0; 4];
        FWD_LISTEN.get(&any).is_some()
    }
}

/// The target's queue state now: `snd_una`, `write_seq`, the memory it
/// holds and its send buffer. `None` if the socket is not a full TCP
/// socket.
fn target_state(ctx: &SockOpsContext) -> Option<(u32, u32, u32, u32)> {
    // SAFETY: reading the context's fields and its socket pointer, which
    // is checked for null.
    unsafe {
        let sk: *mut bpf_sock = (*ctx.ops).__bindgen_anon_2.sk;
        if sk.is_null() {
            return None;
        }
        let una = (*ctx.ops).snd_una;
        let written = tcp_field(sk, &WRITE_SEQ_OFF)?;
        let wmem = tcp_field(sk, &WMEM_OFF)?;
        let sndbuf = tcp_field(sk, &SNDBUF_OFF)?;
        Some((una, written, wmem, sndbuf))
    }
}

/// Starts following the acknowledgements of the forwarder's own socket
/// (a redirect target): its RTT callback on, its state recorded.
fn follow(ctx: &SockOpsContext) {
    // SAFETY: the helper takes the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    let Some((una, written, wmem, sndbuf)) = target_state(ctx) else {
        return;
    };
    let acks = Acks {
        base: una,
        una,
        written,
        wmem,
        sndbuf,
        _pad: 0,
    };
    if FWD_ACKS.insert(&cookie, &acks, 0).is_ok() && ctx.set_cb_flags(RTT_CB_FLAG).is_ok() {
        count(|c| &mut c.targets);
    }
}

/// A target's `snd_una` moved: its state again.
fn acked(ctx: &SockOpsContext) {
    // SAFETY: the helper takes the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    let Some((una, written, wmem, sndbuf)) = target_state(ctx) else {
        return;
    };
    if let Some(a) = FWD_ACKS.get_ptr_mut(&cookie) {
        // SAFETY: a points into a live map value; only this socket's
        // callbacks, which its lock serialises, write it.
        unsafe {
            core::ptr::write_volatile(&raw mut (*a).una, una);
            core::ptr::write_volatile(&raw mut (*a).written, written);
            core::ptr::write_volatile(&raw mut (*a).wmem, wmem);
            core::ptr::write_volatile(&raw mut (*a).sndbuf, sndbuf);
        }
    }
}

fn admit(ctx: &SockOpsContext, tuple: Tuple, role: u32) {
    let ops = ctx.ops;
    // SAFETY: reading the context's socket pointer; checked for null.
    let sk: *mut bpf_sock = unsafe { (*ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    // SAFETY: the helper takes the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ops.cast()) };
    // SAFETY: reading a field of the context.
    let base = unsafe { (*ops).snd_una };
    let mut adm = Admission { cookie, base, role };
    // SAFETY: the map pointer is the static's address, which the loader
    // relocates; sk was checked; the value is copied in.
    let stored = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&FWD_SELF).cast_mut().cast(),
            sk.cast(),
            core::ptr::from_mut(&mut adm).cast(),
            BPF_SK_STORAGE_GET_F_CREATE.into(),
        )
    };
    if stored.is_null() {
        count(|c| &mut c.refused);
        return;
    }
    // SAFETY: ops is the program's context.
    if FWD_MSG_SOCKS
        .update(cookie, unsafe { &mut *ops }, BPF_NOEXIST.into())
        .is_err()
    {
        count(|c| &mut c.refused);
        return;
    }
    let _ = FWD_ADMITTED.insert(&tuple, &cookie, 0);
    if role == ROLE_CLIENT {
        count(|c| &mut c.clients);
    } else {
        count(|c| &mut c.servers);
    }
}

/// Redirects an admitted socket's send into its target's send queue while
/// armed and within credit; otherwise lets it take TCP.
#[sk_msg]
pub fn fwd_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: every pointer below is checked for null before use and
    // points into kernel objects that live while the program runs.
    unsafe { verdict(&ctx) }
}

unsafe fn verdict(ctx: &SkMsgContext) -> u32 {
    let sk: *mut bpf_sock = unsafe { (*ctx.msg).__bindgen_anon_3.sk };
    if sk.is_null() {
        return SK_PASS;
    }
    let adm = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&FWD_SELF).cast_mut().cast(),
            sk.cast(),
            core::ptr::null_mut(),
            0,
        )
    }
    .cast::<Admission>();
    if adm.is_null() {
        return SK_PASS;
    }
    let (cookie, base) = unsafe { ((*adm).cookie, (*adm).base) };
    let Some(link) = (unsafe { FWD_LINKS.get(&cookie) }).copied() else {
        return SK_PASS;
    };
    let Some(flow) = FWD_FLOWS.get_ptr_mut(&cookie) else {
        return SK_PASS;
    };
    let flow = unsafe { &mut *flow };
    if unsafe { has_ulp(sk) } {
        // kTLS (or another ULP) came on after admission: TCP from now on.
        flow.armed = 0;
        return SK_PASS;
    }
    let size = u64::from(ctx.size());
    let within = match unsafe { FWD_ACKS.get(&link.target) } {
        Some(a) => room(a, &link, flow.redirected, size),
        None => false,
    };
    if flow.armed == 0 {
        if !within || !agreed(sk, base, link.arm_at) {
            return SK_PASS;
        }
        flow.armed = 1;
        flow.arms += 1;
    } else if !within {
        flow.armed = 0;
        flow.fallbacks += 1;
        return SK_PASS;
    }
    let mut target = link.target;
    if FWD_TARGETS.redirect_msg(ctx, &mut target, 0) as u32 != SK_PASS {
        // The target is gone (the connection is ending): TCP carries it.
        flow.armed = 0;
        count(|c| &mut c.redirect_failed);
        return SK_PASS;
    }
    flow.redirected += size;
    SK_PASS
}

/// Whether the target has room for `size` more bytes, in two measures
/// (sequence arithmetic, mod 2^32):
/// - bytes: all that went in (the relay's `arm_at` plus the redirects)
///   less what its peer acknowledged stays within the link's cap;
/// - memory: what the kernel compares with the send buffer. The memory at
///   the last callback, plus the bytes written since and now at the
///   memory-per-byte the queue had then (segments split for a small
///   window cost more than their bytes), at least 1.25 and at most 4,
///   stays within 7/8 of the send buffer. Memory only shrinks with
///   acknowledgements, which run the callback.
fn room(a: &Acks, link: &Link, redirected: u64, size: u64) -> bool {
    let written = link.arm_at.wrapping_add(redirected) as u32;
    let after = written.wrapping_add(size as u32);
    let acked = a.una.wrapping_sub(a.base);
    if u64::from(after.wrapping_sub(acked)) > link.cap {
        return false;
    }
    let at_cb = a.written.wrapping_sub(a.base);
    // Negative when the relay wrote before it moved arm_at: nothing new.
    let since = (written.wrapping_sub(at_cb) as i32).max(0) as u64;
    let queued = u64::from(a.written.wrapping_sub(a.una));
    // Memory per byte, in eighths.
    let per_byte = if queued > 0 {
        (u64::from(a.wmem) * 8 / queued).clamp(10, 32)
    } else {
        10
    };
    let need = u64::from(a.wmem) + (since + size) * per_byte / 8;
    need <= u64::from(a.sndbuf) / 8 * 7
}

/// Whether every byte this socket sent by TCP since admission has been
/// relayed into the target: `write_seq - base == arm_at` (mod 2^32).
unsafe fn agreed(sk: *mut bpf_sock, base: u32, arm_at: u64) -> bool {
    match unsafe { tcp_field(sk, &WRITE_SEQ_OFF) } {
        Some(seq) => seq.wrapping_sub(base) == arm_at as u32,
        None => false,
    }
}
