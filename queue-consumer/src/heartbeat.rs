//! The visibility heartbeat: while the worker holds a message (waiting for
//! protection, running its job, settling it), its visibility timeout is extended
//! before it lapses, so no other worker receives it meanwhile.
//!
//! SQS counts a new visibility timeout from the `ChangeMessageVisibility` call, so
//! each extension is simply the configured timeout again, sent when half of the
//! current one is left. SQS also refuses to keep a message in flight for more than
//! 12 h from its receipt: the extension is cut to what is left of that, computed
//! when the call is sent (a retry is sent later than planned), and once nothing is
//! left the heartbeat stops.
//!
//! A [`Keeper`] runs the heartbeat of one message *inline*: the message's task awaits
//! each extension before it does anything else with the message, so an extension is
//! never in flight while the message is handed back (it would make it invisible
//! again). When the heartbeat stops for good (the handle is no longer valid, the task
//! role may not extend, the 12 h limit), the keeper says so once and cancels
//! [`Keeper::lost`] when the message may be received by another worker.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::queue::{ErrorKind, Message, Queue, SqsError};

/// SQS's limit on a message's time in flight.
pub const MAX_IN_FLIGHT: Duration = Duration::from_secs(12 * 60 * 60);
/// Kept back from the 12 h limit: SQS starts counting when it sends the message,
/// a little before the worker sees it.
pub const CAP_MARGIN: Duration = Duration::from_secs(60);
/// Least wait before retrying a failed extension.
const MIN_RETRY: Duration = Duration::from_millis(200);

/// The next thing the heartbeat does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// At `at`, extend; the timeout is [`Heartbeat::timeout_at`] the time of sending.
    Extend {
        /// When to call.
        at: Instant,
    },
    /// SQS's 12 h limit is reached: the message becomes visible at `lapses_at`.
    CapReached {
        /// When the current visibility runs out.
        lapses_at: Instant,
    },
}

/// The heartbeat's plan for one message.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    visibility: Duration,
    cap_end: Instant,
    lapses_at: Instant,
    retry_at: Option<Instant>,
}

impl Heartbeat {
    /// A heartbeat for a message received at `received_at` with `visibility`.
    #[must_use]
    pub fn new(received_at: Instant, visibility: Duration) -> Self {
        Self {
            visibility,
            cap_end: received_at + MAX_IN_FLIGHT.saturating_sub(CAP_MARGIN),
            lapses_at: received_at + visibility,
            retry_at: None,
        }
    }

    /// When the message becomes visible again, unless extended.
    #[must_use]
    pub fn lapses_at(&self) -> Instant {
        self.lapses_at
    }

    /// The timeout to ask for in a call sent at `now`: the configured one, cut to what
    /// is left before the 12 h limit. `None` when an extension would gain nothing.
    #[must_use]
    pub fn timeout_at(&self, now: Instant) -> Option<Duration> {
        let timeout = self
            .visibility
            .min(self.cap_end.saturating_duration_since(now));
        // Shorter than a second, or not past where it lapses now: nothing gained.
        (timeout >= Duration::from_secs(1) && now + timeout > self.lapses_at).then_some(timeout)
    }

    /// What to do next: extend when half a visibility timeout is left (or at the
    /// retry time after a failure).
    #[must_use]
    pub fn next(&self) -> Beat {
        let planned = self
            .lapses_at
            .checked_sub(self.visibility / 2)
            .unwrap_or(self.lapses_at);
        let at = self.retry_at.unwrap_or(planned);
        if self.timeout_at(at).is_some() {
            Beat::Extend { at }
        } else {
            Beat::CapReached {
                lapses_at: self.lapses_at,
            }
        }
    }

    /// An extension to `timeout`, sent at `sent_at`, succeeded.
    pub fn extended(&mut self, sent_at: Instant, timeout: Duration) {
        self.lapses_at = sent_at + timeout;
        self.retry_at = None;
    }

    /// An extension sent at `now` failed in a way that may pass: try again soon, but
    /// not hot.
    pub fn failed(&mut self, now: Instant) {
        self.retry_at = Some(now + (self.visibility / 8).max(MIN_RETRY));
    }
}

/// Whether the worker still holds a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    /// Extended on schedule.
    Kept,
    /// No more extensions; the message may go to another worker from `at`.
    Ending { at: Instant },
    /// The message may already be with another worker (or gone).
    Lost,
}

/// Keeps one message invisible while its task does other things.
#[derive(Debug)]
pub(crate) struct Keeper {
    queue: Queue,
    id: String,
    handle: String,
    heartbeat: Heartbeat,
    hold: Hold,
    /// Failed extensions in a row, so a failing SQS is reported once, not per retry.
    failures: u32,
    /// Cancelled once the message may be received by another worker.
    pub(crate) lost: CancellationToken,
    /// Stops an extension in flight: the worker is exiting.
    give_up: CancellationToken,
}

impl Keeper {
    pub(crate) fn new(
        queue: Queue,
        message: &Message,
        visibility: Duration,
        give_up: CancellationToken,
    ) -> Self {
        Self {
            queue,
            id: message.id.clone(),
            handle: message.receipt_handle.clone(),
            heartbeat: Heartbeat::new(message.received_at, visibility),
            hold: Hold::Kept,
            failures: 0,
            lost: CancellationToken::new(),
            give_up,
        }
    }

    /// Polls `work` to completion, extending the message's visibility meanwhile. An
    /// extension is awaited before `work` is polled again, so when this returns no
    /// extension is in flight.
    pub(crate) async fn keep_while<F: Future>(&mut self, work: F) -> F::Output {
        let mut work = std::pin::pin!(work);
        loop {
            let wake = self.wake_at();
            tokio::select! {
                biased;
                r = &mut work => return r,
                () = sleep_until_opt(wake) => self.step().await,
            }
        }
    }

    /// Whether the message may already be with another worker.
    pub(crate) fn is_lost(&self) -> bool {
        self.hold == Hold::Lost
    }

    fn wake_at(&self) -> Option<Instant> {
        match self.hold {
            Hold::Kept => Some(match self.heartbeat.next() {
                Beat::Extend { at } => at,
                Beat::CapReached { lapses_at } => lapses_at,
            }),
            Hold::Ending { at } => Some(at),
            Hold::Lost => None,
        }
    }

    async fn step(&mut self) {
        match (self.hold, self.heartbeat.next()) {
            (Hold::Ending { .. }, _) => self.lose(),
            (Hold::Kept, Beat::CapReached { lapses_at }) => {
                let id = &self.id;
                tracing::warn!(
                    message_id = %id,
                    "{id} - Cannot extend visibility past SQS's 12 h limit; it may be delivered again now"
                );
                self.hold = Hold::Ending { at: lapses_at };
                self.lose();
            }
            (Hold::Kept, Beat::Extend { .. }) => self.extend().await,
            (Hold::Lost, _) => {}
        }
    }

    async fn extend(&mut self) {
        let sent_at = Instant::now();
        let Some(timeout) = self.heartbeat.timeout_at(sent_at) else {
            self.hold = Hold::Ending {
                at: self.heartbeat.lapses_at(),
            };
            return;
        };
        let secs = i32::try_from(timeout.as_secs()).unwrap_or(i32::MAX);
        let result = tokio::select! {
            r = self.queue.change_visibility(&self.handle, secs) => r,
            () = self.give_up.cancelled() => return,
        };
        let id = &self.id;
        match result {
            Ok(()) => {
                if self.failures > 0 {
                    tracing::info!(message_id = %id, "{id} - Visibility extended again");
                }
                tracing::debug!(message_id = %id, "{id} - Visibility extended by {secs}s");
                self.heartbeat.extended(sent_at, timeout);
                self.failures = 0;
            }
            Err(e) if e.kind.may_pass() => {
                if self.failures == 0 {
                    let left = self
                        .heartbeat
                        .lapses_at()
                        .saturating_duration_since(Instant::now());
                    tracing::warn!(
                        message_id = %id,
                        "{id} - Extending visibility failed, retrying until it works ({}s of visibility left): {e}",
                        left.as_secs()
                    );
                }
                self.failures += 1;
                self.heartbeat.failed(Instant::now());
            }
            Err(e) => self.stop(&e),
        }
    }

    /// A permanent failure: the heartbeat stops, and the job learns when it no longer
    /// holds its message.
    fn stop(&mut self, e: &SqsError) {
        let id = &self.id;
        if e.kind == ErrorKind::Denied {
            // The handle is still good: the message is ours until it lapses. The
            // denial itself is logged once by the queue.
            let at = self.heartbeat.lapses_at();
            let left = at.saturating_duration_since(Instant::now());
            tracing::warn!(
                message_id = %id,
                "{id} - Visibility cannot be extended; another worker may receive it in {}s",
                left.as_secs()
            );
            self.hold = Hold::Ending { at };
        } else {
            tracing::warn!(
                message_id = %id,
                "{id} - No longer held: {e}; stopping its heartbeat and its job"
            );
            self.lose();
        }
    }

    fn lose(&mut self) {
        self.hold = Hold::Lost;
        self.lost.cancel();
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V: Duration = Duration::from_secs(30);

    #[tokio::test(start_paused = true)]
    async fn extends_when_half_the_timeout_is_left() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(t0, V);
        assert_eq!(
            hb.next(),
            Beat::Extend {
                at: t0 + Duration::from_secs(15)
            }
        );
        assert_eq!(hb.timeout_at(t0 + Duration::from_secs(15)), Some(V));
        hb.extended(t0 + Duration::from_secs(16), V);
        assert_eq!(hb.lapses_at(), t0 + Duration::from_secs(46));
        assert_eq!(
            hb.next(),
            Beat::Extend {
                at: t0 + Duration::from_secs(31)
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_ten_minute_job_is_covered_throughout() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(t0, V);
        let end = t0 + Duration::from_secs(600);
        while let Beat::Extend { at } = hb.next() {
            if at >= end {
                break;
            }
            assert!(at < hb.lapses_at(), "extension after the lapse");
            hb.extended(at, hb.timeout_at(at).unwrap());
        }
        assert!(hb.lapses_at() > end);
    }

    #[tokio::test(start_paused = true)]
    async fn stops_at_the_twelve_hour_limit() {
        let t0 = Instant::now();
        let v = Duration::from_secs(3 * 60 * 60);
        let mut hb = Heartbeat::new(t0, v);
        let mut last = t0;
        let mut steps = 0;
        loop {
            match hb.next() {
                Beat::Extend { at } => {
                    let timeout = hb.timeout_at(at).unwrap();
                    assert!(at + timeout <= t0 + MAX_IN_FLIGHT, "past 12 h");
                    hb.extended(at, timeout);
                    last = at + timeout;
                    steps += 1;
                    assert!(steps < 100, "never stops");
                }
                Beat::CapReached { lapses_at } => {
                    assert_eq!(lapses_at, last);
                    break;
                }
            }
        }
        assert!(t0 + MAX_IN_FLIGHT - last <= CAP_MARGIN + Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn retries_soon_but_not_hot() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(t0, V);
        hb.failed(t0 + Duration::from_secs(15));
        let Beat::Extend { at } = hb.next() else {
            panic!("stopped")
        };
        assert!(at - (t0 + Duration::from_secs(15)) >= Duration::from_secs(3));
        let mut short = Heartbeat::new(t0, Duration::from_secs(1));
        short.failed(t0);
        assert_eq!(short.next(), Beat::Extend { at: t0 + MIN_RETRY });
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_near_the_limit_asks_only_for_what_is_left() {
        // Eight-hour visibility: the first extension is planned at 4 h and may ask for
        // 7 h 59 min. Failing retries are sent later and later; each must ask for
        // less, never past the 12 h limit, or SQS refuses every one of them.
        let t0 = Instant::now();
        let v = Duration::from_secs(8 * 3600);
        let mut hb = Heartbeat::new(t0, v);
        let Beat::Extend { at } = hb.next() else {
            panic!("stopped")
        };
        assert_eq!(at, t0 + Duration::from_secs(4 * 3600));
        let planned = hb.timeout_at(at).unwrap();
        assert_eq!(at + planned, t0 + MAX_IN_FLIGHT - CAP_MARGIN);
        let mut now = at;
        for _ in 0..5 {
            hb.failed(now);
            let Beat::Extend { at } = hb.next() else {
                panic!("stopped")
            };
            assert_eq!(at, now + v / 8);
            now = at;
            let timeout = hb.timeout_at(now).unwrap();
            assert!(timeout < planned);
            assert_eq!(now + timeout, t0 + MAX_IN_FLIGHT - CAP_MARGIN);
        }
    }
}
