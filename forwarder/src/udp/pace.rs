//! The release of datagrams that waited for their flow's dial, at the
//! pace they came.
//!
//! A new flow's first datagrams wait while its socket is dialed in the
//! child. When many clients appear at once their dials finish close
//! together, and sending each flow's waiting datagrams the moment its dial
//! ends would hand the server in a few hundred microseconds what the
//! clients spread over many milliseconds: a plain server with the default
//! receive buffer (about 200 KiB, some 90 datagrams of 1,400 bytes) drops
//! the excess, and nobody on our side could count it.
//!
//! So the waiting datagrams are replayed, not flushed: each is released at
//! its arrival time (when the relay read it) plus one shift, the longest wait of any dial released
//! in the current replay. The server sees the clients' own spacing, late by
//! the dial time. The shift grows while a replay runs (a dial that took
//! longer than the shift would otherwise release its datagrams at once)
//! and never shrinks during one: dials that end one after another, each
//! flow with one datagram, would otherwise each start a replay of their
//! own and be sent as fast as the dials end. A replay ends once nothing
//! was due for one whole shift; the next dial's wait is then the shift.
//!
//! Order: one queue for every flow of a published address, sorted by
//! release time, ties in the order queued. A flow's datagrams are queued
//! in arrival order and the shift never shrinks while the queue holds any,
//! so they leave in that order. A flow with datagrams in the queue sends
//! its later datagrams through the queue too (the relay keeps the count),
//! so nothing of a flow overtakes its own earlier datagrams.
//!
//! Pure data: tested without sockets or a clock of its own.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Datagrams (or anything) released at their arrival time plus a shift.
pub struct Pacer<T> {
    /// By release time, then by the order queued.
    queue: BTreeMap<(Instant, u64), T>,
    seq: u64,
    shift: Duration,
    /// The latest release time given so far.
    last_due: Option<Instant>,
}

impl<T> Pacer<T> {
    pub fn new() -> Self {
        Pacer {
            queue: BTreeMap::new(),
            seq: 0,
            shift: Duration::ZERO,
            last_due: None,
        }
    }

    /// A dial ended at `now`: queues what waited for it, each item with the
    /// time it arrived (oldest first).
    pub fn release(&mut self, now: Instant, waited: impl IntoIterator<Item = (Instant, T)>) {
        let mut waited = waited.into_iter().peekable();
        let Some((first, _)) = waited.peek() else {
            return;
        };
        let wait = now.saturating_duration_since(*first);
        let ended = self.last_due.is_none_or(|d| now >= d + self.shift);
        self.shift = if ended { wait } else { self.shift.max(wait) };
        for (at, item) in waited {
            self.push_at(at, item);
        }
    }

    /// Queues an item that arrived at `now` behind the queued ones (a flow
    /// that still has items queued).
    pub fn push(&mut self, now: Instant, item: T) {
        self.push_at(now, item);
    }

    fn push_at(&mut self, at: Instant, item: T) {
        self.seq += 1;
        let due = at + self.shift;
        self.last_due = Some(self.last_due.map_or(due, |d| d.max(due)));
        self.queue.insert((due, self.seq), item);
    }

    /// The next item due at or before `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<T> {
        match self.queue.first_key_value() {
            Some(((due, _), _)) if *due <= now => self.queue.pop_first().map(|(_, t)| t),
            _ => None,
        }
    }

    /// When the next item is due, if any is queued.
    pub fn next_due(&self) -> Option<Instant> {
        self.queue.first_key_value().map(|((due, _), _)| *due)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.queue.len()
    }
}

impl<T> Default for Pacer<T> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Everything due at `now`, in order.
    fn due(p: &mut Pacer<u32>, now: Instant) -> Vec<u32> {
        std::iter::from_fn(|| p.pop_due(now)).collect()
    }

    #[test]
    fn dials_that_end_together_keep_the_arrival_spacing() {
        // Three flows' datagrams came 1 ms apart; all three dials end at
        // t0 + 10 ms. They leave 1 ms apart from then on, not at once.
        let t0 = Instant::now();
        let mut p = Pacer::new();
        let end = t0 + ms(10);
        p.release(end, [(t0, 1), (t0 + ms(3), 4)]);
        p.release(end, [(t0 + ms(1), 2)]);
        p.release(end, [(t0 + ms(2), 3)]);
        assert_eq!(due(&mut p, end), [1]);
        assert_eq!(p.next_due(), Some(end + ms(1)));
        assert_eq!(due(&mut p, end + ms(1)), [2]);
        assert_eq!(due(&mut p, end + ms(2)), [3]);
        assert_eq!(due(&mut p, end + ms(3)), [4]);
        assert_eq!((p.len(), p.next_due()), (0, None));
    }

    #[test]
    fn a_slower_dial_during_a_replay_shifts_what_follows() {
        let t0 = Instant::now();
        let mut p = Pacer::new();
        // Waited 2 ms: due now and 1 ms later.
        p.release(t0 + ms(2), [(t0, 1), (t0 + ms(1), 2)]);
        // A flow that came at t0 + 0.5 ms is dialed at t0 + 8 ms: its
        // wait (7.5 ms) becomes the shift: due at once, behind 1 and 2.
        p.release(t0 + ms(8), [(t0 + Duration::from_micros(500), 3)]);
        // Flow 3 still has a datagram queued: its next one is queued too,
        // at its arrival plus the larger shift.
        p.push(t0 + ms(8), 4);
        assert_eq!(due(&mut p, t0 + ms(8)), [1, 2, 3]);
        assert_eq!(
            p.next_due(),
            Some(t0 + ms(8) + Duration::from_micros(7_500))
        );
        assert_eq!(due(&mut p, t0 + ms(15)), Vec::<u32>::new());
        assert_eq!(due(&mut p, t0 + ms(16)), [4]);
    }

    #[test]
    fn dials_that_end_one_by_one_keep_the_arrival_spacing() {
        // Flows of one datagram each, 1 ms apart; their dials end 0.1 ms
        // apart from t0 + 5 ms. The first goes at once, the queue is then
        // empty, yet the rest keep their 1 ms spacing.
        let t0 = Instant::now();
        let mut p = Pacer::new();
        let mut sent = Vec::new();
        for k in 0..4u32 {
            let end = t0 + ms(5) + Duration::from_micros(100 * u64::from(k));
            p.release(end, [(t0 + ms(u64::from(k)), k)]);
            while let Some(due) = p.next_due().filter(|d| *d <= end) {
                sent.push((p.pop_due(end).unwrap(), due - t0));
            }
        }
        while let Some(due) = p.next_due() {
            sent.push((p.pop_due(due).unwrap(), due - t0));
        }
        let want: Vec<_> = (0..4).map(|k| (k, ms(5 + u64::from(k)))).collect();
        assert_eq!(sent, want);
    }

    #[test]
    fn the_shift_starts_again_after_a_quiet_shift() {
        let t0 = Instant::now();
        let mut p = Pacer::new();
        p.release(t0 + ms(50), [(t0, 1)]);
        assert_eq!(due(&mut p, t0 + ms(50)), [1]);
        // Within one shift of the last release: still the replay's shift.
        p.release(t0 + ms(61), [(t0 + ms(60), 2)]);
        assert_eq!(p.next_due(), Some(t0 + ms(110)));
        assert_eq!(due(&mut p, t0 + ms(110)), [2]);
        // Quiet for a whole shift after that: a fast dial goes at once.
        p.release(t0 + ms(171), [(t0 + ms(170), 3), (t0 + ms(170), 4)]);
        assert_eq!(due(&mut p, t0 + ms(171)), [3, 4]);
        p.release(t0 + ms(180), std::iter::empty());
        assert_eq!(p.len(), 0);
    }
}
