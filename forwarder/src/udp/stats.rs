//! The UDP relay's counters: datagrams and bytes each way, flows, and
//! every undelivered datagram under one reason ([`Loss`]). Atomics, so the
//! relay task counts without a lock and `/v1/stats` reads at any time; a
//! [`UdpSnapshot`] is what the API reports.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::{Drops, UdpSnapshot};

/// Why a datagram was not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    /// The parent socket's receive queue was full (SO_RXQ_OVFL).
    RxQueueOverflow = 0,
    /// A flow socket's receive queue was full (replies from the child).
    ChildRxQueueOverflow,
    /// Larger than the other side's family allows, or truncated.
    Oversize,
    /// sendmmsg failed (the errno is logged, rate limited).
    SendError,
    /// The child answered ICMP port unreachable: nothing listens there.
    Unreachable,
    /// Queued for a flow that was evicted by the flow cap.
    Evicted,
    /// Queued for a flow that expired.
    Expired,
    /// Waiting for a flow whose dial in the child failed.
    DialFailed,
    /// More than [`super::DIAL_BACKLOG`] datagrams arrived while the flow dialed.
    DialBacklog,
    /// A new client while every slot of `--max-connections` was taken and
    /// this address had no flow to evict.
    NoSlot,
}

const DROP_KINDS: usize = 10;

/// Per-port UDP counters, updated once per batch.
#[derive(Debug, Default)]
pub struct UdpStats {
    /// Datagrams delivered: [to the child, to the parent].
    pub datagrams: [AtomicU64; 2],
    /// Payload bytes delivered: [to the child, to the parent].
    pub bytes: [AtomicU64; 2],
    /// Live flows.
    pub flows: AtomicU64,
    /// Flows ever created (dialed successfully).
    pub flows_total: AtomicU64,
    /// Flows closed by the flow cap.
    pub evictions: AtomicU64,
    /// Flows closed by the idle timeout.
    pub expirations: AtomicU64,
    /// Dials that failed.
    pub dial_failures: AtomicU64,
    /// Undelivered datagrams by [`Loss`] reason.
    pub drops: [AtomicU64; DROP_KINDS],
}

impl UdpStats {
    pub(super) fn lost(&self, why: Loss, n: u64) {
        if n > 0 {
            self.drops[why as usize].fetch_add(n, Relaxed);
        }
    }

    pub(super) fn delivered(&self, to: usize, datagrams: u64, bytes: u64) {
        if datagrams > 0 {
            self.datagrams[to].fetch_add(datagrams, Relaxed);
            self.bytes[to].fetch_add(bytes, Relaxed);
        }
    }

    /// A point-in-time copy.
    pub fn snapshot(&self) -> UdpSnapshot {
        let d = |w: Loss| self.drops[w as usize].load(Relaxed);
        UdpSnapshot {
            datagrams_to_child: self.datagrams[0].load(Relaxed),
            datagrams_to_parent: self.datagrams[1].load(Relaxed),
            bytes_to_child: self.bytes[0].load(Relaxed),
            bytes_to_parent: self.bytes[1].load(Relaxed),
            flows: self.flows.load(Relaxed),
            flows_total: self.flows_total.load(Relaxed),
            evictions: self.evictions.load(Relaxed),
            expirations: self.expirations.load(Relaxed),
            dial_failures: self.dial_failures.load(Relaxed),
            drops: Drops {
                rx_queue_overflow: d(Loss::RxQueueOverflow),
                child_rx_queue_overflow: d(Loss::ChildRxQueueOverflow),
                oversize: d(Loss::Oversize),
                send_error: d(Loss::SendError),
                unreachable: d(Loss::Unreachable),
                evicted: d(Loss::Evicted),
                expired: d(Loss::Expired),
                dial_failed: d(Loss::DialFailed),
                dial_backlog: d(Loss::DialBacklog),
                no_slot: d(Loss::NoSlot),
            },
        }
    }
}

/// Tracks a socket's cumulative kernel drop counter (a u32 that wraps) and
/// turns each reading into the number of new drops.
#[derive(Debug, Default, Clone, Copy)]
pub struct DropCounter {
    last: u32,
}

impl DropCounter {
    /// New drops since the last reading. Readings may arrive out of order
    /// (an older datagram's count after a newer SO_MEMINFO reading): a
    /// reading behind the last one by less than half the range adds nothing.
    pub fn update(&mut self, now: u32) -> u64 {
        let d = now.wrapping_sub(self.last);
        if d == 0 || d > u32::MAX / 2 {
            return 0;
        }
        self.last = now;
        d as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_counter_deltas_and_wraparound() {
        let mut c = DropCounter::default();
        assert_eq!(c.update(0), 0);
        assert_eq!(c.update(5), 5);
        assert_eq!(c.update(5), 0);
        // An older reading arriving late adds nothing.
        assert_eq!(c.update(3), 0);
        assert_eq!(c.update(9), 4);
        let mut c = DropCounter { last: u32::MAX - 1 };
        assert_eq!(c.update(2), 4);
    }

    #[test]
    fn snapshots_name_every_reason_and_add_up() {
        let s = UdpStats::default();
        let all = [
            Loss::RxQueueOverflow,
            Loss::ChildRxQueueOverflow,
            Loss::Oversize,
            Loss::SendError,
            Loss::Unreachable,
            Loss::Evicted,
            Loss::Expired,
            Loss::DialFailed,
            Loss::DialBacklog,
            Loss::NoSlot,
        ];
        assert_eq!(all.len(), DROP_KINDS);
        for (k, w) in all.iter().enumerate() {
            s.lost(*w, 1 << k);
        }
        s.delivered(0, 3, 300);
        s.delivered(1, 2, 20);
        let snap = s.snapshot();
        assert_eq!(snap.drops.total(), (1 << DROP_KINDS) - 1);
        let v = serde_json::to_value(snap).unwrap();
        assert_eq!(v["drops"]["rx_queue_overflow"], 1);
        assert_eq!(v["drops"]["dial_backlog"], 1 << 8);
        assert_eq!(v["drops"]["no_slot"], 1 << 9);
        assert_eq!(v["datagrams_to_child"], 3);
        assert_eq!(v["bytes_to_parent"], 20);
        let mut sum = snap;
        sum += snap;
        assert_eq!(sum.drops.total(), 2 * snap.drops.total());
        assert_eq!(sum.datagrams_to_child, 6);
    }
}
