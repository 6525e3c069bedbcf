//! The ebpf engine's decisions for a connection after handoff, as pure
//! state machines: no socket, no map, no clock of their own, so they are
//! table-tested without a kernel (and without the `ebpf` feature).
//!
//! Once both sockets are in the sockmap, the kernel moves every byte; the
//! supervisor (`ebpf::supervise`) only watches. For each direction i -> j
//! (sides: 0 = accepted in the parent, 1 = dialed in the child) it observes
//! the sockets and the verdict's counters ([`Observed`]), asks
//! [`Direction::step`] what to do, and carries it out:
//!
//! - **Throttle.** The kernel queues redirected bytes on j's psock without
//!   limit, so when the backlog (redirected but not yet in j's send queue)
//!   passes [`Limits::backlog_high`], side i's receive window is clamped
//!   (TCP_WINDOW_CLAMP) to slow its sender; at half that it is released to
//!   the engine's window cap. While the backlogs of all the engine's connections together
//!   exceed [`Limits::backlog_total_high`], the threshold is
//!   [`Limits::backlog_share`] instead: the backlog is charged to no socket,
//!   so only this bounds the engine's memory. Not once i has seen FIN:
//!   nothing more is coming. The kernel's receive-buffer autotuning raises
//!   a socket's clamp each time it grows the buffer, which would undo the
//!   cap and the throttle alike (and did: a sender ran gigabytes into the
//!   backlog), so every pass re-applies the clamp the direction should
//!   have ([`clamp_to_enforce`]).
//! - **Drain, then FIN.** After side i received FIN, the FIN is passed on
//!   (shutdown(j, SHUT_WR)) only when every byte received on i was
//!   redirected and sits in j's send queue ([`direction_drained`]):
//!   earlier would cut the stream short.
//! - **Stall.** A drain that makes no progress while j has nothing left to
//!   send for [`Limits::drain_stall`] is not waiting for the network: the
//!   connection is reset rather than left hanging.
//! - **Reset.** Bytes the kernel dropped, or a vanished peer entry, reset
//!   the connection: the stream can no longer be whole.
//!
//! [`Pacing`] decides how the supervisor waits between passes.

use std::time::{Duration, Instant};

/// Whether direction `i -> j` has drained after side i saw FIN: every byte
/// received on i was redirected, and all of it is in j's send queue.
///
/// `received_i` is tcpi_bytes_received of side i (data plus one for the
/// FIN), `redirected_i` the verdict's count for side i, `queued_j` the
/// growth of side j's acked + unacked send queue since handoff.
pub fn direction_drained(received_i: u64, redirected_i: u64, queued_j: u64) -> bool {
    received_i.saturating_sub(1) == redirected_i && queued_j >= redirected_i
}

/// The thresholds the decisions use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Backlog above which the sender is throttled (released at half).
    pub backlog_high: u64,
    /// Engine-wide backlog above which every direction is throttled from
    /// `backlog_share` on.
    pub backlog_total_high: u64,
    /// A direction's threshold while the total is over `backlog_total_high`.
    pub backlog_share: u64,
    /// How long a drain may stall with nothing in flight.
    pub drain_stall: Duration,
}

/// What the supervisor saw of direction i -> j in one pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Observed {
    /// Side i has received a FIN (POLLRDHUP).
    pub fin_received: bool,
    /// Bytes the verdict redirected from i to j since handoff.
    pub redirected: u64,
    /// Bytes of this direction the kernel dropped.
    pub dropped: u64,
    /// Growth of side j's send queue (acked + unacked) since handoff.
    pub queued_j: u64,
    /// tcpi_bytes_received of side i (read once it saw FIN).
    pub received_i: u64,
    /// Side j has nothing unsent or unacknowledged.
    pub j_idle: bool,
    /// The backlogs of all the engine's connections together, this one's
    /// included.
    pub engine_total: u64,
}

impl Observed {
    /// Bytes redirected from i but not yet in j's send queue.
    pub fn backlog(&self) -> u64 {
        self.redirected.saturating_sub(self.queued_j)
    }
}

/// What to do to side i's receive window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    Keep,
    /// Clamp it to the throttle; confirm with [`Direction::clamped`].
    Clamp,
    /// Release it to the window cap.
    Release,
}

/// The receive-window clamps the supervisor keeps on a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clamps {
    /// The cap from handoff on, while not throttled.
    pub cap: u32,
    /// The clamp asked for while throttled.
    pub throttle: u32,
    /// A clamp at or below this is a throttle still in place (the kernel
    /// raises a tiny clamp to its own minimum, so the value read back is
    /// not the one set).
    pub throttle_held: u32,
}

/// The clamp to set on side i, whose clamp reads `current`, if it is
/// above what the direction should have (`throttled` or not): the kernel's
/// receive-buffer autotuning raises the clamp each time it grows the
/// buffer. `None`: it is in place.
pub fn clamp_to_enforce(current: u32, throttled: bool, c: &Clamps) -> Option<u32> {
    if throttled {
        (current > c.throttle_held.max(c.throttle)).then_some(c.throttle)
    } else {
        (current > c.cap).then_some(c.cap)
    }
}

/// What to do about the direction's end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Still open (or draining).
    Open,
    /// Drained: shut down j's write side; confirm with
    /// [`Direction::fin_sent`].
    SendFin,
    /// Reset the connection, for this reason.
    Reset(String),
}

/// One pass's decision for a direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub window: Window,
    pub end: End,
    /// Look again soon: a drain is pending or the sender is throttled.
    pub poll_again: bool,
}

/// The state of one direction i -> j.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Direction {
    /// Side i's receive window is clamped to the throttle.
    throttled: bool,
    /// The FIN has been passed on to side j.
    done: bool,
    /// Since when the drain has made no progress with j idle.
    stalled_since: Option<Instant>,
    /// The counts (redirected, queued in j) at the last look while
    /// draining: a change is progress and restarts the stall clock.
    last_counts: Option<(u64, u64)>,
}

impl Direction {
    /// The FIN has been passed on: nothing more to decide.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Side i's receive window is clamped.
    pub fn is_throttled(&self) -> bool {
        self.throttled
    }

    /// The clamp asked for by [`Window::Clamp`] is in place.
    pub fn clamped(&mut self) {
        self.throttled = true;
    }

    /// The FIN asked for by [`End::SendFin`] was sent.
    pub fn fin_sent(&mut self) {
        self.done = true;
        self.stalled_since = None;
    }

    /// Decides one pass from what was observed at `now`.
    pub fn step(&mut self, o: &Observed, now: Instant, lim: &Limits) -> Step {
        let mut step = Step {
            window: Window::Keep,
            end: End::Open,
            poll_again: false,
        };
        if self.done {
            return step;
        }
        if o.dropped > 0 {
            step.end = End::Reset(format!("{} bytes dropped in the kernel", o.dropped));
            return step;
        }
        let backlog = o.backlog();
        let high = if o.engine_total > lim.backlog_total_high {
            lim.backlog_share
        } else {
            lim.backlog_high
        };
        match self.throttled {
            false if backlog > high && !o.fin_received => {
                step.window = Window::Clamp;
                step.poll_again = true;
            }
            true if backlog <= high / 2 => {
                step.window = Window::Release;
                self.throttled = false;
            }
            true => step.poll_again = true,
            false => {}
        }
        if !o.fin_received {
            return step;
        }
        if direction_drained(o.received_i, o.redirected, o.queued_j) {
            step.end = End::SendFin;
            return step;
        }
        step.poll_again = true;
        let counts = (o.redirected, o.queued_j);
        if !o.j_idle || self.last_counts != Some(counts) {
            // j is still sending, or bytes moved since the last look.
            self.last_counts = Some(counts);
            self.stalled_since = (o.j_idle).then_some(now);
            return step;
        }
        let since = *self.stalled_since.get_or_insert(now);
        if now.duration_since(since) > lim.drain_stall {
            step.end = End::Reset(format!(
                "stalled: received {} redirected {} queued {}",
                o.received_i, o.redirected, o.queued_j
            ));
        }
        step
    }
}

/// How the supervisor waits between passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Yield to the runtime and look again at once.
    Yield,
    /// Sleep this long (or until the next event).
    Sleep(Duration),
    /// Sleep until the next event (FIN, error, the verdict's progress).
    Park,
}

/// The supervisor's waiting: re-checks right after a FIN usually need only
/// microseconds (the FIN's wake-up comes before the verdict has run on the
/// last skb), so a pending drain first yields a few times, then backs off
/// from 1 ms to 20 ms. A throttled direction is re-checked every
/// millisecond so the window reopens as soon as the backlog has drained.
/// With nothing pending it parks until the next event, or, while the
/// connection still holds a share of the engine-wide backlog, for at most
/// 20 ms (the backlog drains without an event).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pacing {
    quick_checks: u32,
    backoff: Duration,
}

impl Default for Pacing {
    fn default() -> Self {
        Pacing {
            quick_checks: 0,
            backoff: Self::FIRST,
        }
    }
}

impl Pacing {
    /// Yields before the first sleep.
    pub const QUICK_CHECKS: u32 = 8;
    const FIRST: Duration = Duration::from_millis(1);
    const MAX: Duration = Duration::from_millis(20);

    /// The wait after a pass that asked to `poll_again` (or not), with a
    /// direction `throttled` (or not), `holding` a backlog share (or not).
    pub fn next(&mut self, poll_again: bool, throttled: bool, holding: bool) -> Wait {
        if !poll_again {
            *self = Pacing::default();
            return if holding {
                Wait::Sleep(Self::MAX)
            } else {
                Wait::Park
            };
        }
        if !throttled && self.quick_checks < Self::QUICK_CHECKS {
            self.quick_checks += 1;
            return Wait::Yield;
        }
        let wait = if throttled { Self::FIRST } else { self.backoff };
        self.backoff = (self.backoff * 2).min(Self::MAX);
        Wait::Sleep(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIM: Limits = Limits {
        backlog_high: 100,
        backlog_total_high: 1000,
        backlog_share: 10,
        drain_stall: Duration::from_secs(5),
    };

    #[test]
    fn drain_rule() {
        // received counts the FIN; nothing redirected yet.
        assert!(!direction_drained(1001, 0, 0));
        // all redirected, not yet queued on the peer.
        assert!(!direction_drained(1001, 1000, 999));
        // all redirected and queued.
        assert!(direction_drained(1001, 1000, 1000));
        // an empty direction: just the FIN.
        assert!(direction_drained(1, 0, 0));
        // the verdict has not seen the last skb yet.
        assert!(!direction_drained(1001, 999, 999));
    }

    fn obs(redirected: u64, queued_j: u64) -> Observed {
        Observed {
            redirected,
            queued_j,
            ..Default::default()
        }
    }

    fn fin(received_i: u64, redirected: u64, queued_j: u64, j_idle: bool) -> Observed {
        Observed {
            fin_received: true,
            received_i,
            redirected,
            queued_j,
            j_idle,
            ..Default::default()
        }
    }

    /// The throttle: clamp above high, hold between, restore at low, and
    /// never after FIN.
    #[test]
    fn throttle_table() {
        let t = Instant::now();
        let mut d = Direction::default();
        // (observed, window, poll again)
        let seq: &[(Observed, Window, bool)] = &[
            (obs(100, 0), Window::Keep, false),
            (obs(201, 100), Window::Clamp, true),
        ];
        for (o, w, again) in seq {
            let s = d.step(o, t, &LIM);
            assert_eq!(
                (s.window, s.poll_again, &s.end),
                (*w, *again, &End::Open),
                "{o:?}"
            );
        }
        // The clamp did not take: nothing recorded, asked again.
        assert!(!d.is_throttled());
        assert_eq!(d.step(&obs(201, 100), t, &LIM).window, Window::Clamp);
        d.clamped();
        let seq: &[(Observed, Window, bool)] = &[
            (obs(300, 100), Window::Keep, true),
            (obs(300, 240), Window::Keep, true),
            (obs(300, 250), Window::Release, false),
            (obs(300, 250), Window::Keep, false),
        ];
        for (o, w, again) in seq {
            let s = d.step(o, t, &LIM);
            assert_eq!((s.window, s.poll_again), (*w, *again), "{o:?}");
        }
        assert!(!d.is_throttled());
        // A sender that already sent FIN is not throttled.
        let mut d = Direction::default();
        assert_eq!(
            d.step(&fin(1000, 500, 0, false), t, &LIM).window,
            Window::Keep
        );
    }

    /// Over the engine-wide total every direction is throttled from its
    /// share, and released at half of it.
    #[test]
    fn engine_wide_total_table() {
        let t = Instant::now();
        let busy = |redirected, queued_j, engine_total| Observed {
            engine_total,
            ..obs(redirected, queued_j)
        };
        let mut d = Direction::default();
        // 50 of backlog: under 100 alone, over the share of 10 once the
        // total passes 1000.
        assert_eq!(d.step(&busy(50, 0, 1000), t, &LIM).window, Window::Keep);
        assert_eq!(d.step(&busy(50, 0, 1001), t, &LIM).window, Window::Clamp);
        d.clamped();
        assert_eq!(d.step(&busy(50, 44, 1001), t, &LIM).window, Window::Keep);
        assert_eq!(d.step(&busy(50, 45, 1001), t, &LIM).window, Window::Release);
    }

    /// The clamp a pass re-applies: autotuning raised it past the cap, or
    /// lifted a throttle; a throttle the kernel rounded up is in place.
    #[test]
    fn clamp_enforcement_table() {
        let c = Clamps {
            cap: 4 << 20,
            throttle: 1,
            throttle_held: 64 << 10,
        };
        // (current, throttled, to set)
        let table: &[(u32, bool, Option<u32>)] = &[
            (4 << 20, false, None),
            (65_535, false, None),
            // Autotuning grew the buffer to 32 MiB and the clamp with it.
            (32 << 20, false, Some(4 << 20)),
            // The throttle as the kernel reads it back (its minimum).
            (2304, true, None),
            (64 << 10, true, None),
            // Autotuning lifted the throttle.
            ((64 << 10) + 1, true, Some(1)),
            (32 << 20, true, Some(1)),
        ];
        for &(current, throttled, want) in table {
            assert_eq!(
                clamp_to_enforce(current, throttled, &c),
                want,
                "clamp {current}, throttled {throttled}"
            );
        }
    }

    /// FIN is passed on only when drained; a stalled drain resets after
    /// the limit; progress restarts the stall clock.
    #[test]
    fn drain_and_stall_table() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let mut d = Direction::default();
        // (observed, at, end, poll again)
        let seq: &[(Observed, Instant, End, bool)] = &[
            // Open: nothing to do.
            (obs(10, 10), s(0), End::Open, false),
            // FIN seen, bytes still in flight to j: wait.
            (fin(1001, 1000, 900, false), s(0), End::Open, true),
            // j idle but not drained: the stall clock starts.
            (fin(1001, 1000, 900, true), s(1), End::Open, true),
            (fin(1001, 1000, 900, true), s(5), End::Open, true),
            // j busy again: the clock restarts.
            (fin(1001, 1000, 950, false), s(7), End::Open, true),
            (fin(1001, 1000, 950, true), s(8), End::Open, true),
            (fin(1001, 1000, 950, true), s(13), End::Open, true),
            (
                fin(1001, 1000, 950, true),
                s(14),
                End::Reset("stalled: received 1001 redirected 1000 queued 950".into()),
                true,
            ),
        ];
        for (o, at, end, again) in seq {
            let st = d.step(o, *at, &LIM);
            assert_eq!((&st.end, st.poll_again), (end, *again), "{o:?} at {at:?}");
        }
        let mut d = Direction::default();
        assert_eq!(
            d.step(&fin(1001, 1000, 1000, true), s(0), &LIM).end,
            End::SendFin
        );
        // Until the FIN is confirmed sent, it is asked for again.
        assert_eq!(
            d.step(&fin(1001, 1000, 1000, true), s(0), &LIM).end,
            End::SendFin
        );
        d.fin_sent();
        assert!(d.is_done());
        assert_eq!(
            d.step(&fin(1001, 1000, 1000, true), s(0), &LIM),
            Step {
                window: Window::Keep,
                end: End::Open,
                poll_again: false
            }
        );
    }

    /// Bytes still moving while j reads idle at every look (the verdict
    /// or the backlog worker running late, the peer acknowledging at
    /// once) are progress: only 5 s without any resets.
    #[test]
    fn slow_progress_is_not_a_stall() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let mut d = Direction::default();
        for k in 0..12u64 {
            let st = d.step(
                &fin(10_001, 4_000 + 500 * k, 3_000 + 500 * k, true),
                s(k),
                &LIM,
            );
            assert_eq!(st.end, End::Open, "second {k}");
        }
        // Then nothing moves: reset after the limit.
        let o = fin(10_001, 9_500, 8_500, true);
        assert_eq!(d.step(&o, s(16), &LIM).end, End::Open);
        assert!(matches!(d.step(&o, s(17), &LIM).end, End::Reset(_)));
    }

    #[test]
    fn kernel_drops_reset() {
        let mut d = Direction::default();
        let o = Observed {
            dropped: 3,
            ..obs(10, 0)
        };
        assert_eq!(
            d.step(&o, Instant::now(), &LIM).end,
            End::Reset("3 bytes dropped in the kernel".into())
        );
    }

    #[test]
    fn pacing_table() {
        let mut p = Pacing::default();
        for _ in 0..Pacing::QUICK_CHECKS {
            assert_eq!(p.next(true, false, false), Wait::Yield);
        }
        let ms = Duration::from_millis;
        for want in [1, 2, 4, 8, 16, 20, 20] {
            assert_eq!(p.next(true, false, false), Wait::Sleep(ms(want)));
        }
        // Throttled: every millisecond, whatever the backoff.
        assert_eq!(p.next(true, true, false), Wait::Sleep(ms(1)));
        // Quiet: park, and start over.
        assert_eq!(p.next(false, false, false), Wait::Park);
        assert_eq!(p.next(true, false, false), Wait::Yield);
        // Quiet but holding a share of the total: 20 ms at most.
        assert_eq!(p.next(false, false, true), Wait::Sleep(ms(20)));
        // Throttled from the start: no yields.
        let mut p = Pacing::default();
        assert_eq!(p.next(true, true, false), Wait::Sleep(ms(1)));
    }
}
