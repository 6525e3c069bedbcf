//! Batched datagram I/O for the UDP relay: recvmmsg(2) and sendmmsg(2)
//! with their control messages (IP_PKTINFO / IPV6_PKTINFO and SO_RXQ_OVFL
//! on receive; the source address and UDP_SEGMENT on send), and the
//! grouping of equal-sized datagrams into GSO runs ([`gso_runs`]).
//!
//! nix makes the calls and encodes and decodes the control messages, so
//! nothing here is unsafe. Three gaps of nix 0.30 shape the code:
//!
//! - its `MultiHeaders` cannot be reused for receiving control messages:
//!   recvmmsg refills only the buffers between calls, not the name and
//!   control lengths the kernel shrank to what it wrote, so after a
//!   datagram without control messages a slot has no control space left
//!   (nix-rust/nix#2813). [`Batch::recv`] prepares fresh headers per call
//!   (three small allocations per call, not per datagram);
//! - its sendmmsg applies one set of control messages to every message
//!   of a call (nix-rust/nix#1954), while a send carries runs of different
//!   GSO segment sizes. [`Batch::send`] makes one sendmmsg per group of
//!   consecutive messages with the same control messages: one call for a
//!   batch of equal datagrams, one more per change of size. It also sizes
//!   the control space exactly, since nix leaves `msg_controllen` at the
//!   space given and the kernel refuses trailing room as a malformed
//!   message.
//!
//! - the only way to learn how many messages its sendmmsg sent is to walk
//!   its results, and that walk reads each slot's address, which a send
//!   never fills (nix leaves the slots uninitialised). So sendmmsg is used
//!   only for connected sockets (the flows' sockets in the child), with
//!   headers typed `()`, whose address slots are zero-sized; sends to a
//!   client from the unconnected parent socket take one sendmsg per
//!   message. A client's replies of one size are one GSO message, so that
//!   is one call per size, as the grouping above makes anyway.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::RawFd;

use nix::errno::Errno;
use nix::sys::socket::{
    recvmmsg, sendmmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, MultiHeaders,
    RecvMsg, SockaddrStorage,
};
use socket2::SockAddr;

/// Control-message space per received datagram (a packet-info message and
/// a drop count fit in 64 bytes).
const CTRL: usize = 128;

/// Where a datagram was addressed (IP_PKTINFO / IPV6_PKTINFO): the
/// address a client wrote to and the interface it came in on (kept for
/// IPv6 link-local addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PktInfo {
    pub ip: IpAddr,
    pub ifindex: u32,
}

/// What one received datagram's control messages said.
#[derive(Debug, Default, Clone, Copy)]
pub struct Ancillary {
    pub local: Option<PktInfo>,
    pub drops: Option<u32>,
}

/// How large a UDP GSO run may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GsoLimits {
    /// Datagrams per run (UDP_MAX_SEGMENTS: 64 in the kernels that brought
    /// UDP GSO; later ones allow more).
    pub segments: usize,
    /// Payload bytes per run: one IPv4 datagram's worth (65,507), so a run
    /// fits either family.
    pub bytes: usize,
    /// Largest segment (datagram) size a run may have: lowered below a size
    /// the route refused (a segment must fit the path MTU), so datagrams
    /// that large go one per message without asking again.
    pub segment: usize,
}

impl Default for GsoLimits {
    fn default() -> Self {
        GsoLimits {
            segments: 64,
            bytes: 65_507,
            segment: usize::MAX,
        }
    }
}

/// Splits `n` datagrams (lengths by index from `len`) into sends, written
/// to `out` as `(count, segment)` per message, in order. A run of two or
/// more datagrams of one length (`segment`), optionally ending with one
/// shorter but non-empty datagram, goes as one UDP GSO message within
/// `max`; anything else goes alone (`segment` 0: no GSO). Empty datagrams
/// always go alone: a GSO message cannot carry them.
pub fn gso_runs(
    n: usize,
    len: impl Fn(usize) -> usize,
    max: GsoLimits,
    out: &mut Vec<(usize, usize)>,
) {
    out.clear();
    let mut i = 0;
    while i < n {
        let seg = len(i);
        let mut count = 1;
        let mut total = seg;
        if seg > 0 && seg <= max.segment {
            while i + count < n && count < max.segments {
                let next = len(i + count);
                if next == 0 || next > seg || total + next > max.bytes {
                    break;
                }
                count += 1;
                total += next;
                if next < seg {
                    // A shorter datagram ends the run.
                    break;
                }
            }
        }
        out.push((count, if count > 1 { seg } else { 0 }));
        i += count;
    }
}

/// Buffers for recvmmsg/sendmmsg: `count` of `buf` bytes each, and what
/// the last receive said about each datagram.
pub struct Batch {
    count: usize,
    buf: usize,
    bufs: Vec<u8>,
    /// One entry per datagram of the last receive.
    got: Vec<Received>,
    /// Whether sends try UDP GSO; the largest run it may carry.
    gso: bool,
    gso_max: GsoLimits,
    /// The messages of a send, `(count, segment)` each ([`gso_runs`]).
    runs: Vec<(usize, usize)>,
}

/// One received datagram, as the kernel described it.
#[derive(Debug, Clone, Copy)]
struct Received {
    len: usize,
    truncated: bool,
    source: Option<SocketAddr>,
    ancillary: Ancillary,
}

/// The source-address control message of a send, in the family's struct.
#[derive(Clone, Copy)]
enum Source {
    V4(libc::in_pktinfo),
    V6(libc::in6_pktinfo),
}

impl Source {
    fn new(l: PktInfo) -> Source {
        match l.ip {
            IpAddr::V4(v4) => Source::V4(libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from(v4).to_be(),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            }),
            IpAddr::V6(v6) => {
                // The interface only matters for link-local addresses.
                let link_local = v6.segments()[0] & 0xffc0 == 0xfe80;
                Source::V6(libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: v6.octets(),
                    },
                    ipi6_ifindex: if link_local { l.ifindex } else { 0 },
                })
            }
        }
    }
}

impl Batch {
    /// Room for `count` datagrams of at most `buf` bytes each (a datagram
    /// longer than `buf` is reported as [`Batch::truncated`]).
    pub fn new(count: usize, buf: usize) -> Batch {
        Batch {
            count,
            buf,
            // calloc'd: pages are only backed once a datagram reaches them.
            bufs: vec![0; count * buf],
            got: Vec::with_capacity(count),
            gso: true,
            gso_max: GsoLimits::default(),
            runs: Vec::with_capacity(count),
        }
    }

    /// Receives up to `count` datagrams (recvmmsg(2), Linux 2.6.33);
    /// `Ok(0)` when none is queued.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        let buf = self.buf;
        self.got.clear();
        // Fresh headers: nix's cannot be reused with control messages
        // (see the module comment).
        let mut hdrs = MultiHeaders::<SockaddrStorage>::preallocate(
            self.count,
            Some(Vec::with_capacity(CTRL)),
        );
        let mut iovs: Vec<[IoSliceMut<'_>; 1]> = self
            .bufs
            .chunks_mut(buf)
            .map(|b| [IoSliceMut::new(b)])
            .collect();
        let msgs = match recvmmsg(fd, &mut hdrs, iovs.iter_mut(), MsgFlags::MSG_DONTWAIT, None) {
            Ok(msgs) => msgs,
            Err(Errno::EAGAIN) => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        for m in msgs {
            self.got.push(Received {
                len: m.bytes.min(buf),
                truncated: m.flags.contains(MsgFlags::MSG_TRUNC),
                source: m.address.as_ref().and_then(socket_addr),
                ancillary: ancillary(&m),
            });
        }
        Ok(self.got.len())
    }

    /// The length of received datagram `i` (as much as fitted).
    pub fn len(&self, i: usize) -> usize {
        self.got[i].len
    }

    /// Whether datagram `i` was longer than its buffer.
    pub fn truncated(&self, i: usize) -> bool {
        self.got[i].truncated
    }

    /// The bytes of datagram `i`.
    pub fn data(&self, i: usize) -> &[u8] {
        &self.bufs[i * self.buf..i * self.buf + self.len(i)]
    }

    /// The sender of datagram `i`.
    pub fn source(&self, i: usize) -> Option<SocketAddr> {
        self.got[i].source
    }

    /// What datagram `i`'s control messages said.
    pub fn ancillary(&self, i: usize) -> Ancillary {
        self.got[i].ancillary
    }

    /// Sends datagrams `range` of the buffers on `fd`, to `to` (None: the
    /// socket is connected) from `from` (None: the socket's own address).
    /// Returns how many were sent before the first error, and that error.
    ///
    /// Runs of datagrams of one size ([`gso_runs`]) go as one message each
    /// with UDP_SEGMENT (UDP GSO, Linux 4.18): the stack handles the run as
    /// one packet and cuts it into the original datagrams only where they
    /// are delivered, so boundaries stay exactly as received. The messages
    /// go with sendmmsg(2) (Linux 3.0), one call per group of consecutive
    /// messages with the same segment size (see the module comment): for a
    /// batch of equal datagrams, one call. Where the kernel or the route
    /// refuses GSO (EIO for a device without checksum offload, EINVAL for a
    /// segment above the path MTU, ENOPROTOOPT on an older kernel) the rest
    /// of the range is sent one datagram per message; a refused segment
    /// size is not tried again, and refusals that come from the kernel or
    /// device turn GSO off for this batch for good.
    pub fn send(
        &mut self,
        fd: RawFd,
        range: std::ops::Range<usize>,
        to: Option<&SockAddr>,
        from: Option<PktInfo>,
    ) -> (usize, Option<io::Error>) {
        let to = match to.map(|a| a.as_socket()) {
            None => None,
            Some(Some(a)) => Some(SockaddrStorage::from(a)),
            Some(None) => return (0, Some(io::Error::from(io::ErrorKind::Unsupported))),
        };
        let source = from.map(Source::new);
        let mut start = range.start;
        let mut plain = !self.gso;
        self.plan(start..range.end, plain);
        let mut done = 0;
        while done < self.runs.len() {
            let seg = self.runs[done].1;
            let group = self.runs[done..].iter().take_while(|r| r.1 == seg).count();
            let e = match self.send_group(fd, start, done..done + group, to, source) {
                Ok(n) if n > 0 => {
                    start += self.runs[done..done + n].iter().map(|r| r.0).sum::<usize>();
                    done += n;
                    continue;
                }
                Ok(_) => io::Error::from(io::ErrorKind::WriteZero),
                Err(e) => e,
            };
            let segmented = seg > 0;
            let for_good = matches!(
                e.raw_os_error(),
                Some(libc::EIO | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
            );
            let refused =
                for_good || matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EMSGSIZE));
            if !(segmented && refused) {
                return (start - range.start, Some(e));
            }
            // GSO refused: the rest one datagram per message. A segment
            // size the route refused (EINVAL, EMSGSIZE: above the path MTU)
            // is not asked again; a refusal by the kernel or the device
            // turns GSO off.
            self.gso &= !for_good;
            self.gso_max.segment = self.gso_max.segment.min(seg.saturating_sub(1));
            plain = true;
            self.plan(start..range.end, plain);
            done = 0;
        }
        (start - range.start, None)
    }

    /// Splits datagrams `range` into messages, `(count, segment)` each in
    /// `self.runs`: one per [`gso_runs`] run, or per datagram when `plain`.
    fn plan(&mut self, range: std::ops::Range<usize>, plain: bool) {
        if plain {
            self.runs.clear();
            self.runs.extend(range.map(|_| (1, 0)));
        } else {
            let got = &self.got;
            let at = range.start;
            gso_runs(
                range.len(),
                |k| got[at + k].len,
                self.gso_max,
                &mut self.runs,
            );
        }
    }

    /// One sendmmsg(2) of messages `msgs` of `self.runs`, which share their
    /// segment size; the first holds datagram `first`. Returns how many
    /// messages went.
    fn send_group(
        &self,
        fd: RawFd,
        first: usize,
        msgs: std::ops::Range<usize>,
        to: Option<SockaddrStorage>,
        source: Option<Source>,
    ) -> io::Result<usize> {
        let runs = &self.runs[msgs];
        let datagrams: usize = runs.iter().map(|r| r.0).sum();
        let iov: Vec<IoSlice<'_>> = (first..first + datagrams)
            .map(|i| IoSlice::new(self.data(i)))
            .collect();
        let mut at = 0;
        let per_msg: Vec<&[IoSlice<'_>]> = runs
            .iter()
            .map(|&(count, _)| {
                at += count;
                &iov[at - count..at]
            })
            .collect();
        let seg = runs.first().map_or(0, |r| r.1) as u16;
        let mut cmsgs = Vec::with_capacity(2);
        // Exactly the space these messages take: nix sends all of it.
        let space = match source {
            Some(Source::V4(ref p)) => {
                cmsgs.push(ControlMessage::Ipv4PacketInfo(p));
                if seg > 0 {
                    nix::cmsg_space!(libc::in_pktinfo, u16)
                } else {
                    nix::cmsg_space!(libc::in_pktinfo)
                }
            }
            Some(Source::V6(ref p)) => {
                cmsgs.push(ControlMessage::Ipv6PacketInfo(p));
                if seg > 0 {
                    nix::cmsg_space!(libc::in6_pktinfo, u16)
                } else {
                    nix::cmsg_space!(libc::in6_pktinfo)
                }
            }
            None if seg > 0 => nix::cmsg_space!(u16),
            None => Vec::new(),
        };
        if seg > 0 {
            cmsgs.push(ControlMessage::UdpGsoSegments(&seg));
        }
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
        if let Some(to) = to {
            // An unconnected socket: one sendmsg a message (see the module
            // comment for why not sendmmsg); what went before an error
            // counts, as sendmmsg would report it.
            for (k, iov) in per_msg.iter().enumerate() {
                if let Err(e) = sendmsg(fd, iov, &cmsgs, flags, Some(&to)) {
                    return if k == 0 { Err(e.into()) } else { Ok(k) };
                }
            }
            return Ok(per_msg.len());
        }
        // A connected socket: no address, so nix's headers hold none (a
        // zero-sized `()`) and walking its results reads nothing unset.
        let space = (space.capacity() > 0).then_some(space);
        let mut hdrs = MultiHeaders::<()>::preallocate(runs.len(), space);
        let addrs = vec![None; runs.len()];
        let sent = sendmmsg(fd, &mut hdrs, &per_msg, &addrs, &cmsgs, flags)?;
        Ok(sent.count())
    }

    /// Whether sends still try UDP GSO (false once the kernel refused it).
    #[cfg(test)]
    pub fn gso(&self) -> bool {
        self.gso
    }
}

/// An IP socket address out of the kernel's.
fn socket_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        Some(SocketAddr::V4((*v4).into()))
    } else {
        a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
    }
}

/// What a received datagram's control messages say. None is trusted when
/// they did not all fit (MSG_CTRUNC, which nix reports as an error).
fn ancillary<S>(m: &RecvMsg<'_, '_, S>) -> Ancillary {
    let mut out = Ancillary::default();
    let Ok(cmsgs) = m.cmsgs() else {
        return out;
    };
    for c in cmsgs {
        match c {
            ControlMessageOwned::RxqOvfl(d) => out.drops = Some(d),
            ControlMessageOwned::Ipv4PacketInfo(p) => {
                out.local = Some(PktInfo {
                    ip: Ipv4Addr::from(u32::from_be(p.ipi_addr.s_addr)).into(),
                    ifindex: p.ipi_ifindex as u32,
                });
            }
            ControlMessageOwned::Ipv6PacketInfo(p) => {
                out.local = Some(PktInfo {
                    ip: Ipv6Addr::from(p.ipi6_addr.s6_addr).into(),
                    ifindex: p.ipi6_ifindex,
                });
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(lens: &[usize], max: GsoLimits) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        gso_runs(lens.len(), |i| lens[i], max, &mut out);
        out
    }

    #[test]
    fn gso_runs_group_equal_sizes_and_keep_order() {
        let max = GsoLimits::default();
        // Equal sizes go together; a shorter one may end a run; a longer
        // one, an empty one and a lone one go alone.
        assert_eq!(
            runs(&[100, 100, 100, 40, 100, 200, 0, 0, 7], max),
            vec![(4, 100), (1, 0), (1, 0), (1, 0), (1, 0), (1, 0)]
        );
        assert_eq!(runs(&[64; 5], max), vec![(5, 64)]);
        assert_eq!(runs(&[64, 64, 64, 64, 32, 32], max), vec![(5, 64), (1, 0)]);
        assert_eq!(runs(&[], max), vec![]);
        assert_eq!(runs(&[0, 0], max), vec![(1, 0), (1, 0)]);
        // Two datagrams that together exceed one datagram's worth of
        // payload cannot share a message.
        assert_eq!(runs(&[40_000, 40_000], max), vec![(1, 0), (1, 0)]);
    }

    #[test]
    fn gso_runs_respect_the_limits() {
        let max = GsoLimits {
            segments: 4,
            bytes: 1000,
            ..GsoLimits::default()
        };
        // Ten of 100: four, four, two (segments); ten of 300: three a run
        // (bytes), then one alone.
        assert_eq!(runs(&[100; 10], max), vec![(4, 100), (4, 100), (2, 100)]);
        assert_eq!(
            runs(&[300; 10], max),
            vec![(3, 300), (3, 300), (3, 300), (1, 0)]
        );
        // Segments above a size the route refused go alone.
        let max = GsoLimits {
            segment: 1399,
            ..GsoLimits::default()
        };
        assert_eq!(
            runs(&[1400, 1400, 1399, 1399, 1399, 100], max),
            vec![(1, 0), (1, 0), (4, 1399)]
        );
        // Every datagram is in exactly one message, in order.
        let lens: Vec<usize> = (0..500)
            .map(|i| [1400, 1400, 1400, 9, 0, 64][i % 6])
            .collect();
        let got = runs(&lens, GsoLimits::default());
        assert_eq!(got.iter().map(|r| r.0).sum::<usize>(), lens.len());
        let mut at = 0;
        for (count, seg) in got {
            let run = &lens[at..at + count];
            if seg == 0 {
                assert_eq!(count, 1);
            } else {
                assert!(count >= 2 && run[..count - 1].iter().all(|&l| l == seg));
                assert!(run[count - 1] > 0 && run[count - 1] <= seg);
                assert!(run.iter().sum::<usize>() <= 65_507);
            }
            at += count;
        }
    }
}
