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
//! A [`Keeper`] runs the heartbeat of one message on the message's own task, while the
//! task does other things ([`Keeper::keep_while`]). Its extensions go through the
//! queue's batcher ([`settle`](crate::settle)), so the messages of one receive, which
//! fall due together, are extended in one `ChangeMessageVisibilityBatch`. The job also
//! reaches its keeper, to extend its own message ([`Job::extend_visibility`]).
//!
//! The work never waits for an extension: when it ends, an extension may still be on
//! its way, and [`Keeper::take_in_flight`] hands its answer to the settle, which sends
//! a hand-back again if that extension may have landed after it.
//!
//! The keeper counts the visibility from no later than when SQS hid the message
//! ([`Message::hidden_at`]) and from the sending of each extension SQS confirmed, so
//! it never believes it holds the message longer than it does. The moment that
//! visibility runs out without a confirmed extension (extensions failing, denied,
//! or past the 12 h limit), it cancels [`Keeper::lost`] and the message is no longer
//! held, whatever SQS answers later: another worker may receive it from then on. A
//! receipt handle that no longer works loses the message at once. Either way the
//! keeper says so once.
//!
//! [`Job::extend_visibility`]: crate::handler::Job::extend_visibility

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::batcher::{Answer, Call, SettleQueue};
use crate::handler::{ExtendError, ExtendRequest, Visibility};
use crate::queue::{ErrorKind, Message, SqsError};

/// SQS's limit on a message's time in flight.
pub const MAX_IN_FLIGHT: Duration = Duration::from_secs(12 * 60 * 60);
/// Kept back from the 12 h limit: SQS starts counting when it sends the message,
/// a little before the worker sees it.
pub const CAP_MARGIN: Duration = Duration::from_secs(60);
/// Kept free of a message's 12 h in flight after its job's longest run: the time its
/// delete takes, with a few tries. A job starts only if what is left of the 12 h
/// holds its longest run and this.
pub const START_MARGIN: Duration = Duration::from_secs(60);
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

    /// Whether the visibility has run out at `now`: the message may be with another
    /// worker from then on.
    #[must_use]
    pub fn lapsed(&self, now: Instant) -> bool {
        now >= self.lapses_at
    }

    /// An extension to `timeout`, sent at `sent_at`, succeeded.
    pub fn extended(&mut self, sent_at: Instant, timeout: Duration) {
        self.lapses_at = sent_at + timeout;
        self.retry_at = None;
    }

    /// The longest timeout a call sent at `now` may ask for: what is left before the
    /// 12 h limit, counted from receipt.
    #[must_use]
    pub fn cap_at(&self, now: Instant) -> Duration {
        self.cap_end.saturating_duration_since(now)
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

/// An extension on its way.
#[derive(Debug)]
struct Extension {
    sent_at: Instant,
    timeout: Duration,
    answer: oneshot::Receiver<Answer>,
    /// The job, when it asked for this one.
    asker: Option<oneshot::Sender<Result<Duration, ExtendError>>>,
}

/// Keeps one message invisible while its task does other things.
#[derive(Debug)]
pub(crate) struct Keeper {
    settle: SettleQueue,
    /// The queue's URL, for the lines that say an extension failed.
    queue: String,
    id: String,
    handle: String,
    heartbeat: Heartbeat,
    hold: Hold,
    /// Failed extensions in a row, so a failing SQS is reported once, not per retry.
    failures: u32,
    /// Why the last extension failed, for the line that says the message is lost.
    last_error: Option<SqsError>,
    /// Cancelled once the message may be received by another worker.
    pub(crate) lost: CancellationToken,
    in_flight: Option<Extension>,
    /// The job's requests to extend, and the sending side the job gets.
    requests: mpsc::UnboundedReceiver<ExtendRequest>,
    requester: mpsc::UnboundedSender<ExtendRequest>,
    /// Requests of the job waiting for the extension on its way.
    asked: VecDeque<ExtendRequest>,
}

impl Keeper {
    pub(crate) fn new(
        settle: SettleQueue,
        queue: &str,
        message: &Message,
        visibility: Duration,
    ) -> Self {
        let (requester, requests) = mpsc::unbounded_channel();
        Self {
            settle,
            queue: queue.to_owned(),
            id: message.id.clone(),
            handle: message.receipt_handle.clone(),
            heartbeat: Heartbeat::new(message.hidden_at, visibility),
            hold: Hold::Kept,
            failures: 0,
            last_error: None,
            lost: CancellationToken::new(),
            in_flight: None,
            requests,
            requester,
            asked: VecDeque::new(),
        }
    }

    /// The job's handle on this keeper.
    pub(crate) fn visibility(&self) -> Visibility {
        Visibility::new(self.requester.clone())
    }

    /// Polls `work` to completion, extending the message's visibility meanwhile.
    /// `work` never waits for an extension; one may still be on its way when this
    /// returns (see [`take_in_flight`](Self::take_in_flight)).
    pub(crate) async fn keep_while<F: Future>(&mut self, work: F) -> F::Output {
        let mut work = std::pin::pin!(work);
        loop {
            self.send_asked();
            let wake = self.wake_at();
            tokio::select! {
                biased;
                r = &mut work => return r,
                answer = answer_of(self.in_flight.as_mut()) => self.landed(answer),
                Some(request) = self.requests.recv() => self.asked.push_back(request),
                () = sleep_until_opt(wake) => self.step(),
            }
        }
    }

    /// Whether the message may already be with another worker: it was lost, or its
    /// visibility has run out (even before the keeper has said so).
    pub(crate) fn is_lost(&self) -> bool {
        self.hold == Hold::Lost || self.heartbeat.lapsed(Instant::now())
    }

    /// What is left of the 12 h SQS allows the message in flight, less the margin.
    pub(crate) fn window_left(&self) -> Duration {
        self.heartbeat.cap_at(Instant::now())
    }

    /// The answer of the extension on its way, if any: the caller now owns it.
    pub(crate) fn take_in_flight(&mut self) -> Option<oneshot::Receiver<Answer>> {
        let e = self.in_flight.take()?;
        if let Some(asker) = e.asker {
            let _ = asker.send(Err(ExtendError::NotHeld));
        }
        Some(e.answer)
    }

    /// The visibility a retry after `after` may ask for now: `after`, cut to what is
    /// left before SQS's 12 h limit.
    pub(crate) fn retry_after(&self, after: Duration) -> Duration {
        after.min(self.heartbeat.cap_at(Instant::now()))
    }

    /// When to wake next: for the next extension (unless one is on its way), and in
    /// any case when the visibility runs out.
    fn wake_at(&self) -> Option<Instant> {
        let lapse = self.heartbeat.lapses_at();
        match self.hold {
            Hold::Lost => None,
            Hold::Ending { at } => Some(at.min(lapse)),
            Hold::Kept if self.in_flight.is_some() => Some(lapse),
            Hold::Kept => Some(match self.heartbeat.next() {
                Beat::Extend { at } => at.min(lapse),
                Beat::CapReached { lapses_at } => lapses_at,
            }),
        }
    }

    fn step(&mut self) {
        let now = Instant::now();
        if self.hold == Hold::Lost {
            return;
        }
        if self.heartbeat.lapsed(now) {
            self.lapse();
            return;
        }
        if let (Hold::Kept, Beat::Extend { .. }) = (self.hold, self.heartbeat.next())
            && self.in_flight.is_none()
        {
            match self.heartbeat.timeout_at(now) {
                Some(timeout) => self.send(now, timeout, None),
                None => {
                    self.hold = Hold::Ending {
                        at: self.heartbeat.lapses_at(),
                    };
                }
            }
        }
    }

    /// The visibility has run out without a confirmed extension: the message may go
    /// to another worker now, whatever SQS answers later.
    fn lapse(&mut self) {
        let id = &self.id;
        if matches!(self.heartbeat.next(), Beat::CapReached { .. }) {
            tracing::warn!(
                message_id = %id,
                "{id} - Cannot extend visibility past SQS's 12 h limit; it may be delivered again now"
            );
        } else if let Some(e) = &self.last_error {
            tracing::warn!(
                message_id = %id,
                "{id} - No longer held: its visibility ran out without a confirmed extension (the last try: {e}); another worker may receive it now"
            );
        } else {
            tracing::warn!(
                message_id = %id,
                "{id} - No longer held: its visibility ran out; another worker may receive it now"
            );
        }
        self.lose();
    }

    /// Sends the job's next request, when no extension is on its way.
    fn send_asked(&mut self) {
        if self.in_flight.is_some() {
            return;
        }
        while let Ok(request) = self.requests.try_recv() {
            self.asked.push_back(request);
        }
        let Some((timeout, asker)) = self.asked.pop_front() else {
            return;
        };
        let now = Instant::now();
        if self.hold != Hold::Kept || self.heartbeat.lapsed(now) {
            let _ = asker.send(Err(ExtendError::NotHeld));
            return;
        }
        let timeout = timeout
            .min(self.heartbeat.cap_at(now))
            .max(Duration::from_secs(1));
        self.send(now, timeout, Some(asker));
    }

    fn send(
        &mut self,
        now: Instant,
        timeout: Duration,
        asker: Option<oneshot::Sender<Result<Duration, ExtendError>>>,
    ) {
        let secs = i32::try_from(timeout.as_secs()).unwrap_or(i32::MAX);
        let answer = self.settle.submit(
            &self.handle,
            Call::Visibility {
                secs,
                extension: true,
            },
            None,
        );
        self.in_flight = Some(Extension {
            sent_at: now,
            timeout: Duration::from_secs(u64::try_from(secs).unwrap_or(0)),
            answer,
            asker,
        });
    }

    fn landed(&mut self, answer: Result<Answer, oneshot::error::RecvError>) {
        let Some(e) = self.in_flight.take() else {
            return;
        };
        // Lost already, or answered only after the visibility ran out: SQS may have
        // applied it after another worker received the message. Either way the
        // message is no longer held.
        if self.hold == Hold::Lost || self.heartbeat.lapsed(Instant::now()) {
            if self.hold != Hold::Lost {
                self.lapse();
            }
            if let Some(asker) = e.asker {
                let _ = asker.send(Err(ExtendError::NotHeld));
            }
            return;
        }
        let id = &self.id;
        let reply = match answer {
            // Not sent: the worker is exiting.
            Err(_) => Err(ExtendError::NotHeld),
            Ok(Ok(())) => {
                if self.failures > 0 {
                    tracing::info!(message_id = %id, "{id} - Visibility extended again");
                }
                tracing::debug!(message_id = %id, "{id} - Visibility extended by {}s", e.timeout.as_secs());
                self.heartbeat.extended(e.sent_at, e.timeout);
                self.failures = 0;
                self.last_error = None;
                Ok(e.timeout)
            }
            Ok(Err(error)) if error.kind.may_pass() => {
                if self.failures == 0 {
                    let left = self
                        .heartbeat
                        .lapses_at()
                        .saturating_duration_since(Instant::now());
                    tracing::warn!(
                        message_id = %id,
                        queue = %self.queue,
                        "{id} - Extending visibility failed on {}, retrying while {}s of visibility are left: {error}",
                        self.queue,
                        left.as_secs()
                    );
                }
                self.failures += 1;
                self.last_error = Some(error.clone());
                self.heartbeat.failed(Instant::now());
                Err(ExtendError::Sqs(error))
            }
            Ok(Err(error)) => {
                self.stop(&error);
                Err(ExtendError::Sqs(error))
            }
        };
        if let Some(asker) = e.asker {
            let _ = asker.send(reply);
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
            self.last_error = Some(e.clone());
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

/// The answer of the extension on its way; never resolves when there is none.
async fn answer_of(in_flight: Option<&mut Extension>) -> Result<Answer, oneshot::error::RecvError> {
    match in_flight {
        Some(e) => (&mut e.answer).await,
        None => std::future::pending().await,
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
