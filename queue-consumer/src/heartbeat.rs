//! The visibility heartbeat: while a job runs, its message's visibility timeout is
//! extended before it lapses, so no other worker receives it meanwhile.
//!
//! SQS counts a new visibility timeout from the `ChangeMessageVisibility` call, so
//! each extension is simply the configured timeout again, sent when half of the
//! current one is left. SQS also refuses to keep a message in flight for more than
//! 12 h from its receipt; near that limit the extension shrinks, and once nothing is
//! left the heartbeat stops and says so.

use std::time::Duration;

use tokio::time::Instant;

use crate::queue::{Message, Queue};

/// SQS's limit on a message's time in flight.
pub const MAX_IN_FLIGHT: Duration = Duration::from_secs(12 * 60 * 60);
/// Kept back from the 12 h limit: SQS starts counting when it sends the message,
/// a little before the worker sees it.
const CAP_MARGIN: Duration = Duration::from_secs(60);
/// Least wait before retrying a failed extension.
const MIN_RETRY: Duration = Duration::from_millis(200);

/// The next thing the heartbeat does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// At `at`, set the visibility timeout to `timeout`.
    Extend {
        /// When to call.
        at: Instant,
        /// The new timeout, counted from the call.
        timeout: Duration,
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
}

impl Heartbeat {
    /// A heartbeat for a message received at `received_at` with `visibility`.
    #[must_use]
    pub fn new(received_at: Instant, visibility: Duration) -> Self {
        Self {
            visibility,
            cap_end: received_at + MAX_IN_FLIGHT.saturating_sub(CAP_MARGIN),
            lapses_at: received_at + visibility,
        }
    }

    /// When the message becomes visible again, unless extended.
    #[must_use]
    pub fn lapses_at(&self) -> Instant {
        self.lapses_at
    }

    /// What to do next: extend when half a visibility timeout is left.
    #[must_use]
    pub fn next(&self) -> Beat {
        let at = self
            .lapses_at
            .checked_sub(self.visibility / 2)
            .unwrap_or(self.lapses_at);
        let left = self.cap_end.saturating_duration_since(at);
        let timeout = self.visibility.min(left);
        // An extension shorter than a second, or one that would not push the message
        // out past where it is now, gains nothing.
        if timeout < Duration::from_secs(1) || at + timeout <= self.lapses_at {
            Beat::CapReached {
                lapses_at: self.lapses_at,
            }
        } else {
            Beat::Extend { at, timeout }
        }
    }

    /// An extension to `timeout`, sent at `sent_at`, succeeded.
    pub fn extended(&mut self, sent_at: Instant, timeout: Duration) {
        self.lapses_at = sent_at + timeout;
    }

    /// When to retry after an extension sent at `now` failed.
    #[must_use]
    pub fn retry_at(&self, now: Instant) -> Instant {
        now + (self.visibility / 8).max(MIN_RETRY)
    }
}

/// Keeps `message` invisible while the returned future is polled. It never
/// completes; drop it when the job ends.
pub(crate) async fn keep_invisible(
    queue: &Queue,
    message: &Message,
    visibility: Duration,
) -> std::convert::Infallible {
    let id = &message.id;
    let mut heartbeat = Heartbeat::new(message.received_at, visibility);
    let mut wake_at = None;
    loop {
        let (at, timeout) = match heartbeat.next() {
            Beat::Extend { at, timeout } => (wake_at.unwrap_or(at), timeout),
            Beat::CapReached { lapses_at } => {
                let left = lapses_at.saturating_duration_since(Instant::now());
                tracing::warn!(
                    message_id = %id,
                    "{id} - Cannot extend visibility past SQS's 12 h limit; it becomes visible again in {}s",
                    left.as_secs()
                );
                return std::future::pending::<std::convert::Infallible>().await;
            }
        };
        tokio::time::sleep_until(at).await;
        let sent_at = Instant::now();
        let secs = i32::try_from(timeout.as_secs()).unwrap_or(i32::MAX);
        match queue.change_visibility(&message.receipt_handle, secs).await {
            Ok(()) => {
                tracing::debug!(message_id = %id, "{id} - Visibility extended by {secs}s");
                heartbeat.extended(sent_at, timeout);
                wake_at = None;
            }
            Err(e) => {
                let retry = heartbeat.retry_at(Instant::now());
                tracing::warn!(message_id = %id, "{id} - Extending visibility failed, retrying: {e}");
                wake_at = Some(retry);
            }
        }
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
                at: t0 + Duration::from_secs(15),
                timeout: V
            }
        );
        hb.extended(t0 + Duration::from_secs(16), V);
        assert_eq!(hb.lapses_at(), t0 + Duration::from_secs(46));
        assert_eq!(
            hb.next(),
            Beat::Extend {
                at: t0 + Duration::from_secs(31),
                timeout: V
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_ten_minute_job_is_covered_throughout() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(t0, V);
        let end = t0 + Duration::from_secs(600);
        while let Beat::Extend { at, timeout } = hb.next() {
            if at >= end {
                break;
            }
            assert!(at < hb.lapses_at(), "extension after the lapse");
            hb.extended(at, timeout);
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
                Beat::Extend { at, timeout } => {
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
        let hb = Heartbeat::new(t0, V);
        assert!(hb.retry_at(t0) - t0 >= Duration::from_secs(3));
        let short = Heartbeat::new(t0, Duration::from_secs(1));
        assert_eq!(short.retry_at(t0) - t0, MIN_RETRY);
    }
}
