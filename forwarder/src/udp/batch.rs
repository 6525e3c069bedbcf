//! Batched datagram I/O for the UDP relay: preallocated recvmmsg(2) and
//! sendmmsg(2) headers with their control messages (IP_PKTINFO /
//! IPV6_PKTINFO, SO_RXQ_OVFL, UDP_GRO on receive; the source address and
//! UDP_SEGMENT on send), and the grouping of equal-sized datagrams into
//! GSO runs ([`gso_runs`]).

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::RawFd;

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

/// Preallocated recvmmsg/sendmmsg state: `count` buffers of `buf` bytes
/// with their headers, names and control space ([`CTRL`] bytes each).
pub struct Batch {
    count: usize,
    buf: usize,
    bufs: Vec<u8>,
    iov: Vec<libc::iovec>,
    names: Vec<libc::sockaddr_storage>,
    ctrl: Vec<u64>,
    hdrs: Vec<libc::mmsghdr>,
    /// Headers and iovecs for sends (pointing into `bufs`).
    send_iov: Vec<libc::iovec>,
    send_hdrs: Vec<libc::mmsghdr>,
    /// One destination name shared by a send, control space per message.
    send_name: libc::sockaddr_storage,
    send_ctrl: Vec<u64>,
    /// Whether sends try UDP GSO; the largest run it may carry.
    gso: bool,
    gso_max: GsoLimits,
    /// The messages of a send, `(count, segment)` each ([`gso_runs`]).
    runs: Vec<(usize, usize)>,
}

// SAFETY: the raw pointers in the headers only ever point into buffers
// owned by the same Batch (set again before each call), so moving the
// Batch to another thread moves what they point at with it.
unsafe impl Send for Batch {}

impl Batch {
    /// Room for `count` datagrams of at most `buf` bytes each (a datagram
    /// longer than `buf` is reported as [`Batch::truncated`]).
    pub fn new(count: usize, buf: usize) -> Batch {
        // SAFETY: all-zero is a valid value of these C structs.
        let (iov, hdr, name) = unsafe {
            (
                zeroed::<libc::iovec>(),
                zeroed::<libc::mmsghdr>(),
                zeroed::<libc::sockaddr_storage>(),
            )
        };
        Batch {
            count,
            buf,
            // calloc'd: pages are only backed once a datagram reaches them.
            bufs: vec![0; count * buf],
            iov: vec![iov; count],
            names: vec![name; count],
            ctrl: vec![0; count * CTRL / 8],
            hdrs: vec![hdr; count],
            send_iov: vec![iov; count],
            send_hdrs: vec![hdr; count],
            send_name: name,
            send_ctrl: vec![0; count * CTRL / 8],
            gso: true,
            gso_max: GsoLimits::default(),
            runs: Vec::with_capacity(count),
        }
    }

    /// Receives up to `count` datagrams (recvmmsg(2), Linux 2.6.33);
    /// `Ok(0)` when none is queued.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        let base = self.bufs.as_mut_ptr();
        let ctrl = self.ctrl.as_mut_ptr();
        let buf = self.buf;
        for i in 0..self.count {
            // SAFETY: offsets stay inside the buffers allocated in new().
            unsafe {
                self.iov[i] = libc::iovec {
                    iov_base: base.add(i * buf).cast(),
                    iov_len: buf,
                };
                let h = &mut self.hdrs[i];
                h.msg_len = 0;
                h.msg_hdr.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
                h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                h.msg_hdr.msg_iov = &mut self.iov[i];
                h.msg_hdr.msg_iovlen = 1;
                h.msg_hdr.msg_control = ctrl.add(i * CTRL / 8).cast();
                h.msg_hdr.msg_controllen = CTRL;
                h.msg_hdr.msg_flags = 0;
            }
        }
        // SAFETY: every header points at memory owned by self.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                self.count as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(0);
            }
            return Err(e);
        }
        Ok(n as usize)
    }

    /// The length of received datagram `i` (as much as fitted).
    pub fn len(&self, i: usize) -> usize {
        (self.hdrs[i].msg_len as usize).min(self.buf)
    }

    /// Whether datagram `i` was longer than its buffer.
    pub fn truncated(&self, i: usize) -> bool {
        self.hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0
    }

    /// The bytes of datagram `i`.
    pub fn data(&self, i: usize) -> &[u8] {
        &self.bufs[i * self.buf..i * self.buf + self.len(i)]
    }

    /// The sender of datagram `i`.
    pub fn source(&self, i: usize) -> Option<SocketAddr> {
        let len = self.hdrs[i].msg_hdr.msg_namelen as usize;
        let ss = &self.names[i];
        // SAFETY: the kernel filled names[i] with a sockaddr of `len` bytes
        // of the family it names; each cast reads within the storage.
        unsafe {
            match ss.ss_family as i32 {
                libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
                    let a = &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>();
                    Some(SocketAddr::from((
                        Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                        u16::from_be(a.sin_port),
                    )))
                }
                libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
                    let a = &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
                    Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                        Ipv6Addr::from(a.sin6_addr.s6_addr),
                        u16::from_be(a.sin6_port),
                        a.sin6_flowinfo,
                        a.sin6_scope_id,
                    )))
                }
                _ => None,
            }
        }
    }

    /// What datagram `i`'s control messages said.
    pub fn ancillary(&self, i: usize) -> Ancillary {
        let mut out = Ancillary::default();
        let h = &self.hdrs[i].msg_hdr;
        // SAFETY: the kernel wrote msg_controllen bytes of well-formed
        // control messages into our control space; CMSG_* walk within it.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(h);
            while !c.is_null() {
                let data = libc::CMSG_DATA(c);
                match ((*c).cmsg_level, (*c).cmsg_type) {
                    (libc::SOL_SOCKET, libc::SO_RXQ_OVFL) => {
                        out.drops = Some(std::ptr::read_unaligned(data.cast::<u32>()));
                    }
                    (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                        let p = std::ptr::read_unaligned(data.cast::<libc::in_pktinfo>());
                        out.local = Some(PktInfo {
                            ip: Ipv4Addr::from(u32::from_be(p.ipi_addr.s_addr)).into(),
                            ifindex: p.ipi_ifindex as u32,
                        });
                    }
                    (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                        let p = std::ptr::read_unaligned(data.cast::<libc::in6_pktinfo>());
                        out.local = Some(PktInfo {
                            ip: Ipv6Addr::from(p.ipi6_addr.s6_addr).into(),
                            ifindex: p.ipi6_ifindex,
                        });
                    }
                    _ => {}
                }
                c = libc::CMSG_NXTHDR(h, c);
            }
        }
        out
    }

    /// Sends datagrams `range` of the buffers on `fd`, to `to` (None: the
    /// socket is connected) from `from` (None: the socket's own address).
    /// Returns how many were sent before the first error, and that error.
    ///
    /// One sendmmsg(2) (Linux 3.0) carries the whole range. Runs of
    /// datagrams of one size ([`gso_runs`]) go as one message each with
    /// UDP_SEGMENT (UDP GSO, Linux 4.18): the stack handles the run as one
    /// packet and cuts it into the original datagrams only where they are
    /// delivered, so boundaries stay exactly as received. Where the kernel
    /// or the route refuses GSO (EIO for a device without checksum offload,
    /// EINVAL for a segment above the path MTU, ENOPROTOOPT on an older
    /// kernel) the rest of the range is sent one datagram per message; a
    /// refused segment size is not tried again, and refusals that come from
    /// the kernel or device turn GSO off for this batch for good.
    pub fn send(
        &mut self,
        fd: RawFd,
        range: std::ops::Range<usize>,
        to: Option<&SockAddr>,
        from: Option<PktInfo>,
    ) -> (usize, Option<io::Error>) {
        let (name, namelen) = match to {
            Some(a) => {
                // SAFETY: a SockAddr holds at most a sockaddr_storage.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        a.as_ptr().cast::<u8>(),
                        (&mut self.send_name as *mut libc::sockaddr_storage).cast::<u8>(),
                        a.len() as usize,
                    )
                };
                (
                    (&mut self.send_name as *mut libc::sockaddr_storage).cast(),
                    a.len(),
                )
            }
            None => (std::ptr::null_mut(), 0),
        };
        let mut start = range.start;
        let mut plain = !self.gso;
        let mut msgs = self.build_send(start..range.end, name, namelen, from, plain);
        let mut done = 0;
        while done < msgs {
            // SAFETY: the headers point at memory owned by self.
            let n = unsafe {
                libc::sendmmsg(
                    fd,
                    self.send_hdrs.as_mut_ptr().add(done),
                    (msgs - done) as libc::c_uint,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n > 0 {
                for h in &self.send_hdrs[done..done + n as usize] {
                    start += h.msg_hdr.msg_iovlen;
                }
                done += n as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            let segmented = self.send_hdrs[done].msg_hdr.msg_iovlen > 1;
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
            let seg = self.runs[done].1;
            self.gso_max.segment = self.gso_max.segment.min(seg.saturating_sub(1));
            plain = true;
            msgs = self.build_send(start..range.end, name, namelen, from, plain);
            done = 0;
        }
        (start - range.start, None)
    }

    /// Fills the send headers for datagrams `range`: one message per
    /// [`gso_runs`] run (or per datagram when `plain`); returns how many.
    fn build_send(
        &mut self,
        range: std::ops::Range<usize>,
        name: *mut libc::c_void,
        namelen: libc::socklen_t,
        from: Option<PktInfo>,
        plain: bool,
    ) -> usize {
        let base = self.bufs.as_mut_ptr();
        let buf = self.buf;
        for (k, i) in range.clone().enumerate() {
            // SAFETY: offsets stay inside bufs.
            self.send_iov[k] = libc::iovec {
                iov_base: unsafe { base.add(i * buf) }.cast(),
                iov_len: self.len(i),
            };
        }
        let mut runs = std::mem::take(&mut self.runs);
        if plain {
            runs.clear();
            runs.extend(range.clone().map(|_| (1, 0)));
        } else {
            let hdrs = &self.hdrs;
            let cap = self.buf;
            let at = range.start;
            let len = |k: usize| (hdrs[at + k].msg_len as usize).min(cap);
            gso_runs(range.len(), len, self.gso_max, &mut runs);
        }
        let mut first = 0;
        for (m, &(count, seg)) in runs.iter().enumerate() {
            let ctrl_len = self.encode_send_ctrl(m, from, seg);
            let ctrl = if ctrl_len > 0 {
                // SAFETY: message m's control space lies inside send_ctrl.
                unsafe { self.send_ctrl.as_mut_ptr().add(m * CTRL / 8) }.cast()
            } else {
                std::ptr::null_mut()
            };
            let h = &mut self.send_hdrs[m];
            h.msg_len = 0;
            h.msg_hdr.msg_name = name;
            h.msg_hdr.msg_namelen = namelen;
            h.msg_hdr.msg_iov = &mut self.send_iov[first];
            h.msg_hdr.msg_iovlen = count;
            h.msg_hdr.msg_control = ctrl;
            h.msg_hdr.msg_controllen = ctrl_len;
            h.msg_hdr.msg_flags = 0;
            first += count;
        }
        let msgs = runs.len();
        self.runs = runs;
        msgs
    }

    /// Writes message `m`'s control messages: the source address (`from`)
    /// and the segment size of a GSO run (`seg` > 0); returns their length.
    fn encode_send_ctrl(&mut self, m: usize, from: Option<PktInfo>, seg: usize) -> usize {
        let mut len = match from {
            Some(l) => self.encode_pktinfo(m, l),
            None => 0,
        };
        if seg > 0 {
            // SAFETY: message m's CTRL bytes (8-aligned) hold the packet
            // info (at most 40 bytes) and this message (24 bytes) after it.
            unsafe {
                let c = self
                    .send_ctrl
                    .as_mut_ptr()
                    .add(m * CTRL / 8)
                    .cast::<u8>()
                    .add(len) as *mut libc::cmsghdr;
                (*c).cmsg_level = libc::SOL_UDP;
                (*c).cmsg_type = libc::UDP_SEGMENT;
                (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg as u16);
                len += libc::CMSG_SPACE(size_of::<u16>() as u32) as usize;
            }
        }
        len
    }

    /// Whether sends still try UDP GSO (false once the kernel refused it).
    #[cfg(test)]
    pub fn gso(&self) -> bool {
        self.gso
    }

    /// Writes an IP_PKTINFO / IPV6_PKTINFO message choosing the source
    /// address of a send; returns its length.
    fn encode_pktinfo(&mut self, m: usize, l: PktInfo) -> usize {
        // SAFETY: a msghdr pointing at message m's control space (CTRL
        // bytes, 8-aligned) is what CMSG_FIRSTHDR needs; both messages fit.
        unsafe {
            let mut h: libc::msghdr = zeroed();
            h.msg_control = self.send_ctrl.as_mut_ptr().add(m * CTRL / 8).cast();
            h.msg_controllen = CTRL;
            let c = libc::CMSG_FIRSTHDR(&h);
            match l.ip {
                IpAddr::V4(v4) => {
                    let len = size_of::<libc::in_pktinfo>() as u32;
                    (*c).cmsg_level = libc::IPPROTO_IP;
                    (*c).cmsg_type = libc::IP_PKTINFO;
                    (*c).cmsg_len = libc::CMSG_LEN(len) as _;
                    let p = libc::in_pktinfo {
                        ipi_ifindex: 0,
                        ipi_spec_dst: libc::in_addr {
                            s_addr: u32::from(v4).to_be(),
                        },
                        ipi_addr: libc::in_addr { s_addr: 0 },
                    };
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast(), p);
                    libc::CMSG_SPACE(len) as usize
                }
                IpAddr::V6(v6) => {
                    let len = size_of::<libc::in6_pktinfo>() as u32;
                    (*c).cmsg_level = libc::IPPROTO_IPV6;
                    (*c).cmsg_type = libc::IPV6_PKTINFO;
                    (*c).cmsg_len = libc::CMSG_LEN(len) as _;
                    // The interface only matters for link-local addresses.
                    let link_local = v6.segments()[0] & 0xffc0 == 0xfe80;
                    let p = libc::in6_pktinfo {
                        ipi6_addr: libc::in6_addr {
                            s6_addr: v6.octets(),
                        },
                        ipi6_ifindex: if link_local { l.ifindex } else { 0 },
                    };
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast(), p);
                    libc::CMSG_SPACE(len) as usize
                }
            }
        }
    }
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
