//! Waiting for a condition instead of sleeping for a guess.
//!
//! [`wait_until`] (and [`wait_until_async`] inside a runtime) polls a
//! closure until it reports the condition met, pausing briefly between
//! polls, and panics once the time is up with a message that names what
//! was awaited, how long it was awaited, how many times it was checked,
//! and what the last check saw. [`try_wait_until`] is the same wait
//! returning the timeout as an error, for callers that report rather than
//! panic, and [`try_wait_until_or_abort`] is that wait for a check that
//! can also fail outright (the process awaited has exited, a command could
//! not run), which ends the wait at once with the check's own error.
//!
//! The closure says whether the condition holds by what it returns (see
//! [`Condition`]):
//!
//! - `bool`: met or not; nothing to hand back, nothing to describe;
//! - `Option<T>`: `Some(value)` is met and hands `value` back;
//! - `Result<T, S>`: `Ok(value)` is met and hands `value` back; `Err(state)`
//!   is not met yet, and `state` (its `Display`) is what the failure
//!   message quotes if the time runs out on it.
//!
//! The time limit is taken as given: the netns suite stretches it with its
//! `limit()` (FWD_TEST_TIME_SCALE) before passing it, as it does every
//! other limit.

use std::convert::Infallible;
use std::fmt;
use std::time::{Duration, Instant};

/// What a polled closure returns: whether the awaited condition holds
/// and, if it does, the value handed back to the caller.
pub trait Condition {
    /// Handed back once the condition holds.
    type Value;

    /// `Ok(value)` if the condition holds; otherwise `Err` with a
    /// description of what was seen instead, if there is one.
    fn check(self) -> Result<Self::Value, Option<String>>;
}

impl Condition for bool {
    type Value = ();

    fn check(self) -> Result<(), Option<String>> {
        if self {
            Ok(())
        } else {
            Err(None)
        }
    }
}

impl<T> Condition for Option<T> {
    type Value = T;

    fn check(self) -> Result<T, Option<String>> {
        self.ok_or(None)
    }
}

impl<T, S: fmt::Display> Condition for Result<T, S> {
    type Value = T;

    fn check(self) -> Result<T, Option<String>> {
        self.map_err(|state| Some(state.to_string()))
    }
}

/// The wait timed out: what was awaited, for how long, and what the last
/// check saw. Its `Display` is the message [`wait_until`] panics with.
#[derive(Debug, Clone)]
pub struct TimedOut {
    pub what: String,
    pub timeout: Duration,
    pub elapsed: Duration,
    pub checks: u32,
    /// The last check's description of what it saw, if it gave one.
    pub last: Option<String>,
}

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "timed out waiting for {}: not so after {:.2?} (limit {:?}, {} checks)",
            self.what, self.elapsed, self.timeout, self.checks
        )?;
        if let Some(last) = &self.last {
            write!(f, "; last seen: {last}")?;
        }
        Ok(())
    }
}

impl std::error::Error for TimedOut {}

/// The first pause between polls; each pause doubles, up to
/// [`LONGEST_PAUSE`]. Short at first so a condition that is met at once
/// costs little, longer later so a slow check (a stats round trip, a
/// command) is not run back to back for seconds.
const FIRST_PAUSE: Duration = Duration::from_millis(10);
const LONGEST_PAUSE: Duration = Duration::from_millis(100);

/// The bookkeeping both forms of the wait share.
struct Attempts {
    start: Instant,
    timeout: Duration,
    pause: Duration,
    checks: u32,
}

impl Attempts {
    fn new(timeout: Duration) -> Attempts {
        Attempts {
            start: Instant::now(),
            timeout,
            pause: FIRST_PAUSE,
            checks: 0,
        }
    }

    /// After a check that failed: how long to pause before the next one,
    /// or the timeout if there is no time left. The last pause is cut
    /// short so that one check always comes at the limit itself.
    fn after_failure(&mut self, what: &str, last: Option<String>) -> Result<Duration, TimedOut> {
        self.checks += 1;
        let elapsed = self.start.elapsed();
        if elapsed >= self.timeout {
            return Err(TimedOut {
                what: what.to_string(),
                timeout: self.timeout,
                elapsed,
                checks: self.checks,
                last,
            });
        }
        let pause = self.pause.min(self.timeout - elapsed);
        self.pause = (self.pause * 2).min(LONGEST_PAUSE);
        Ok(pause)
    }
}

/// Polls `condition` until it holds, for at most `timeout`, and returns
/// what it handed back; on timeout returns [`TimedOut`] instead of
/// panicking. The condition is checked at once, then after pauses of
/// 10 ms growing to 100 ms, and once more at the limit. Blocks the calling
/// thread: in async code use [`wait_until_async`].
pub fn try_wait_until<C: Condition>(
    timeout: Duration,
    what: &str,
    mut condition: impl FnMut() -> C,
) -> Result<C::Value, TimedOut> {
    match try_wait_until_or_abort(timeout, what, || Ok::<C, Infallible>(condition())) {
        Ok(outcome) => outcome,
        Err(never) => match never {},
    }
}

/// [`try_wait_until`] for a check that can also fail outright: `condition`
/// returns `Ok` with a [`Condition`] (met, or not yet), or `Err(e)` when
/// there is no point waiting any longer (the process awaited has exited,
/// the user interrupted, a command failed), which ends the wait at once
/// and is returned as the outer error, as it is. The inner result is the
/// wait's own: the value handed back, or [`TimedOut`].
///
/// With `anyhow`, `?` in the closure (give it a return type, `||
/// -> anyhow::Result<_>`) aborts, and `try_wait_until_or_abort(...)??`
/// returns either failure; map the inner error first to add to the
/// timeout's message (a log's tail, say).
///
/// ```
/// use std::time::Duration;
/// use forwarder_testkit::wait::try_wait_until_or_abort;
///
/// let mut polls = 0;
/// let r = try_wait_until_or_abort(Duration::from_secs(5), "the fifth poll", || {
///     polls += 1;
///     if polls == 3 {
///         return Err("the counter broke at 3");
///     }
///     Ok(polls == 5)
/// });
/// assert_eq!(r.unwrap_err(), "the counter broke at 3");
/// assert_eq!(polls, 3);
/// ```
pub fn try_wait_until_or_abort<C: Condition, E>(
    timeout: Duration,
    what: &str,
    mut condition: impl FnMut() -> Result<C, E>,
) -> Result<Result<C::Value, TimedOut>, E> {
    let mut attempts = Attempts::new(timeout);
    loop {
        match condition()?.check() {
            Ok(v) => return Ok(Ok(v)),
            Err(last) => match attempts.after_failure(what, last) {
                Ok(pause) => std::thread::sleep(pause),
                Err(timed_out) => return Ok(Err(timed_out)),
            },
        }
    }
}

/// Polls `condition` until it holds, for at most `timeout`, and returns
/// what it handed back (nothing for a `bool`, the value of `Some` or
/// `Ok`). Panics on timeout naming `what` (phrase it as what is awaited:
/// "the agent to exit"), the time waited and the last state an `Err`
/// described.
///
/// Blocks the calling thread between polls; in async code, whose tasks
/// must keep running meanwhile, use [`wait_until_async`].
///
/// ```
/// use std::time::Duration;
/// use forwarder_testkit::wait::wait_until;
///
/// let mut polls = 0;
/// let n = wait_until(Duration::from_secs(1), "the third poll", || {
///     polls += 1;
///     if polls == 3 { Ok(polls) } else { Err(format!("poll {polls}")) }
/// });
/// assert_eq!(n, 3);
/// ```
#[track_caller]
pub fn wait_until<C: Condition>(
    timeout: Duration,
    what: &str,
    condition: impl FnMut() -> C,
) -> C::Value {
    match try_wait_until(timeout, what, condition) {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    }
}

/// [`wait_until`] for async code: `condition` is an async closure
/// (`async || ...`, which may borrow what it uses), and the
/// pauses between polls yield to the runtime (tokio) instead of blocking
/// its thread, so servers and clients on the same runtime keep running.
pub async fn wait_until_async<C: Condition>(
    timeout: Duration,
    what: &str,
    mut condition: impl AsyncFnMut() -> C,
) -> C::Value {
    let mut attempts = Attempts::new(timeout);
    loop {
        match condition().await.check() {
            Ok(v) => return v,
            Err(last) => match attempts.after_failure(what, last) {
                Ok(pause) => tokio::time::sleep(pause).await,
                Err(e) => panic!("{e}"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_what_the_condition_hands_back() {
        let mut n = 0;
        let got = wait_until(Duration::from_secs(5), "the fifth poll", || {
            n += 1;
            (n == 5).then_some(n * 10)
        });
        assert_eq!(got, 50);
    }

    #[test]
    fn a_condition_already_met_does_not_pause() {
        let t = Instant::now();
        wait_until(Duration::from_secs(5), "true", || true);
        assert!(t.elapsed() < FIRST_PAUSE, "{:?}", t.elapsed());
    }

    #[test]
    fn the_timeout_names_what_and_the_last_state() {
        let mut n = 0;
        let e = try_wait_until(
            Duration::from_millis(120),
            "the counter to reach 1000",
            || {
                n += 1;
                if n >= 1000 {
                    Ok(())
                } else {
                    Err(format!("counter at {n}"))
                }
            },
        )
        .unwrap_err();
        assert!(e.elapsed >= Duration::from_millis(120), "{e}");
        assert!(e.checks >= 3 && e.checks < 20, "{e}");
        let msg = e.to_string();
        assert!(msg.contains("the counter to reach 1000"), "{msg}");
        assert!(
            msg.contains(&format!("last seen: counter at {}", e.checks)),
            "{msg}"
        );
    }

    #[test]
    #[should_panic(expected = "timed out waiting for nothing to happen")]
    fn wait_until_panics_on_timeout() {
        wait_until(Duration::from_millis(30), "nothing to happen", || false);
    }

    #[test]
    fn a_zero_timeout_still_checks_once() {
        let mut checked = 0;
        let e = try_wait_until(Duration::ZERO, "x", || {
            checked += 1;
            false
        })
        .unwrap_err();
        assert_eq!((checked, e.checks), (1, 1));
        assert_eq!(e.last, None);
    }

    #[test]
    fn an_abort_ends_the_wait_at_once() {
        let mut checked = 0;
        let t = Instant::now();
        let r = try_wait_until_or_abort(Duration::from_secs(5), "the child to listen", || {
            checked += 1;
            if checked == 2 {
                return Err("the child exited");
            }
            Ok(Err::<(), _>("not listening"))
        });
        assert_eq!(r.unwrap_err(), "the child exited");
        assert_eq!(checked, 2);
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }

    #[test]
    fn without_an_abort_the_inner_result_is_the_wait() {
        let mut n = 0;
        let got = try_wait_until_or_abort(Duration::from_secs(5), "the third poll", || {
            n += 1;
            Ok::<_, String>((n == 3).then_some(n))
        });
        assert_eq!(got.unwrap().unwrap(), 3);

        let e = try_wait_until_or_abort(Duration::from_millis(30), "never", || {
            Ok::<_, String>(Err::<(), _>("still not"))
        })
        .unwrap()
        .unwrap_err();
        assert_eq!(e.last.as_deref(), Some("still not"));
        assert!(e.to_string().contains("timed out waiting for never"), "{e}");
    }

    #[test]
    fn anyhow_errors_abort_through_question_marks() {
        fn waits(fail: bool) -> anyhow::Result<u32> {
            let mut n = 0;
            let v = try_wait_until_or_abort(
                Duration::from_secs(5),
                "the value",
                || -> anyhow::Result<_> {
                    n += 1;
                    if fail {
                        anyhow::bail!("gave up at check {n}");
                    }
                    Ok((n == 2).then_some(n))
                },
            )??;
            Ok(v)
        }
        assert_eq!(waits(false).unwrap(), 2);
        assert_eq!(waits(true).unwrap_err().to_string(), "gave up at check 1");
    }

    #[tokio::test]
    async fn the_async_form_lets_other_tasks_run() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        // On a current-thread runtime this task runs only while the wait
        // yields between polls.
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            let _ = tx.send(7);
        });
        let mut rx = rx;
        // The closure may borrow mutably what it polls.
        let got = wait_until_async(Duration::from_secs(5), "the value", async || {
            rx.try_recv().ok()
        })
        .await;
        assert_eq!(got, 7);
    }
}
