//! The in-kernel data path of the ebpf engine.
//!
//! How it works
//! ------------
//! Both sockets of a forwarded connection sit in [`FWD_SOCKS`], a SOCKHASH
//! with [`fwd_verdict`] attached as its stream verdict program (and, in the
//! `--ebpf-parser` variant, [`fwd_parser`] as stream parser). When a TCP
//! segment's payload reaches a socket's receive path, the kernel runs the
//! verdict on it instead of queueing it for userspace. The verdict looks up
//! the socket's [`Peer`] by cookie in [`FWD_PEERS`] and redirects the skb
//! to the *egress* of the peer socket, found by cookie in [`FWD_TARGETS`]:
//! the kernel queues it on the peer's psock and a kernel worker sends it.
//! No byte of an established connection enters userspace.
//!
//! The verdict counts the bytes it redirected (and those it could not) in
//! the socket's [`Peer`] entry; the controller uses the counts for
//! statistics, for flow control and to know when a direction has drained
//! after a FIN (FINs and resets are not redirected: the controller
//! propagates them). Every 2 MiB a socket redirects, the verdict writes the
//! socket's cookie to [`FWD_EVENTS`] so the controller checks that
//! connection's backlog: the kernel itself applies no back-pressure to
//! egress redirects.
//!
//! Rare events (an skb of a socket without a [`Peer`] entry, a redirect to
//! a peer missing from [`FWD_TARGETS`], which the kernel drops) are logged
//! with aya-log at debug level; the controller prints them in its log.
//! Nothing is logged per packet on the normal path.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::bpf_get_socket_cookie,
    macros::{map, stream_parser, stream_verdict},
    maps::{HashMap, RingBuf, SockHash},
    programs::SkBuffContext,
};
use aya_log_ebpf::debug;
use forwarder_common::{Peer, CHECK_SHIFT, MAX_SOCKETS};

mod local;

/// Sockets whose incoming bytes the verdict handles, by cookie.
#[map]
static FWD_SOCKS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

/// Redirect targets, by cookie. No program attached.
#[map]
static FWD_TARGETS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

/// Socket cookie -> where its bytes go and what was counted.
#[map]
static FWD_PEERS: HashMap<u64, Peer> = HashMap::with_max_entries(MAX_SOCKETS, 0);

/// Cookies of sockets that crossed another 2 MiB of redirected bytes.
#[map]
static FWD_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Stream parser for the parser variant: every skb is one whole message.
#[stream_parser]
pub fn fwd_parser(ctx: SkBuffContext) -> u32 {
    ctx.len()
}

/// Redirects the skb to the egress of the socket's peer.
#[stream_verdict]
pub fn fwd_verdict(ctx: SkBuffContext) -> u32 {
    // SAFETY: the helper takes the program's context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let Some(peer) = FWD_PEERS.get_ptr_mut(&cookie) else {
        // Not a socket of ours (cannot happen: entries are added before the
        // socket enters FWD_SOCKS): leave the bytes to userspace.
        debug!(
            &ctx,
            "socket {} has no peer entry: {} bytes left in its receive queue",
            cookie,
            ctx.len()
        );
        return SK_PASS;
    };
    let len = u64::from(ctx.len());
    if len == 0 {
        // A bare FIN reaches the verdict as an empty skb. Redirecting it
        // would make the peer's psock backlog send 0 bytes, which the
        // kernel reports as EPIPE on the peer and from then on drops
        // everything redirected to it. FINs are the controller's job.
        return SK_DROP;
    }
    // SAFETY: peer points into a map value that lives while this program
    // runs; the counters are only touched atomically.
    let peer_cookie = unsafe { (*peer).peer_cookie };
    let verdict = FWD_TARGETS.redirect_skb(&ctx, peer_cookie, 0) as u32;
    // The verdict of one socket never runs concurrently with itself (the
    // kernel holds that socket's lock), and each counter belongs to one
    // socket, so a plain add is race-free; the aligned 64-bit store is seen
    // whole by the controller's lookups.
    // SAFETY: peer points into a live map value.
    unsafe {
        let counter = if verdict == SK_PASS {
            &raw mut (*peer).bytes
        } else {
            &raw mut (*peer).dropped
        };
        let old = counter.read_volatile();
        counter.write_volatile(old + len);
        if verdict == SK_PASS && (old >> CHECK_SHIFT) != ((old + len) >> CHECK_SHIFT) {
            // Best effort: if the ring is full the next crossing retries.
            let _ = FWD_EVENTS.output::<u64>(cookie, 0);
        }
    }
    if verdict == SK_PASS {
        SK_PASS
    } else {
        debug!(
            &ctx,
            "redirect from socket {} to missing peer {}: {} bytes dropped",
            cookie,
            peer_cookie,
            len
        );
        SK_DROP
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// The GPL-compatible licence the kernel requires for sockmap helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
