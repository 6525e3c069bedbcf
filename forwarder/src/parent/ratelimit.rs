//! Rate limits for log lines that clients can provoke (dial failures, a
//! full connection limit, refused API peers): at most one line per period,
//! measured on the monotonic clock from the last line logged (not reset on
//! the wall-clock second, which let two lines through a fraction of a
//! second apart), with the count of lines left out since.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const NEVER: u64 = u64::MAX;

/// One rate-limited kind of log line.
pub struct Every {
    period_ms: u64,
    last_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl Every {
    /// At most one line per `period`.
    pub const fn new(period: Duration) -> Every {
        Every {
            period_ms: period.as_millis() as u64,
            last_ms: AtomicU64::new(NEVER),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines left out since the last one)` if a line may be logged
    /// now; `None` (and the line is counted as left out) otherwise.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(now_ms())
    }

    fn allow_at(&self, now: u64) -> Option<u64> {
        let last = self.last_ms.load(Relaxed);
        let due = last == NEVER || now >= last.saturating_add(self.period_ms);
        if due
            && self
                .last_ms
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Relaxed));
        }
        self.suppressed.fetch_add(1, Relaxed);
        None
    }
}

/// Milliseconds on the monotonic clock since the first call.
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_period_from_the_last_line() {
        let e = Every::new(Duration::from_secs(1));
        assert_eq!(e.allow_at(0), Some(0), "the first line goes out");
        // 250 ms later, across a wall-clock second or not: held back.
        assert_eq!(e.allow_at(250), None);
        assert_eq!(e.allow_at(999), None);
        // A full period after the last line: out, saying two were left out.
        assert_eq!(e.allow_at(1000), Some(2));
        assert_eq!(e.allow_at(1999), None);
        assert_eq!(e.allow_at(5000), Some(1));
    }
}
