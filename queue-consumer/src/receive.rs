//! Receiving: one loop per queue, asking SQS for no more messages than the queue's
//! share of the slots leaves room for (at most ten, SQS's limit), and deciding what
//! follows each receive ([`ReceivePolicy`]).
//!
//! A poll holds no slot while it waits. Once a slot is free, a receive waits up to
//! [`RECEIVE_GATHER`] for the rest of the previous receive's messages to be settled,
//! so jobs that end together are followed by one receive for all of them. While a
//! message waits for protection, while the task is leaving its service, or after a
//! refusal that did not end the worker, no more are received.

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::backoff::Backoff;
use crate::context::Shared;
use crate::dispatch::dispatch;
use crate::queue::{ErrorKind, Message, SqsError};

/// How long a receive waits, once a slot is free, for the rest of the previous
/// receive's messages to be settled before it asks for fewer than a full batch: one
/// `ReceiveMessage` for ten jobs that end together rather than several, at the cost
/// of starting a job up to this much later. It never waits for messages of older
/// receives (a long job).
pub const RECEIVE_GATHER: Duration = Duration::from_millis(50);

/// How long a long poll on its way at SIGTERM may still take. An answer already on
/// the wire arrives within it, and its messages are handed straight back; a poll
/// still waiting on an empty queue is dropped then, so an idle worker exits at once.
/// The cost, bounded: messages SQS hands to a dropped poll wait out their visibility
/// timeout.
pub const POLL_DRAIN: Duration = Duration::from_secs(2);
/// Pause after an empty short poll (`QUEUE_WAIT_SECONDS=0`).
const SHORT_POLL_PAUSE: Duration = Duration::from_secs(1);
/// Receives in a row that fail in a way retrying cannot fix (the queue does not
/// exist, the role may not receive, no or unknown credentials) before the worker
/// exits, so ECS restarts the task and a deployment's circuit breaker sees it.
pub const PERMANENT_RECEIVE_TRIES: u32 = 5;

/// What the receive loop does after a receive: the decision, apart from the calls.
#[derive(Debug, PartialEq)]
pub(crate) enum AfterReceive {
    /// Start these messages.
    Dispatch(Vec<Message>),
    /// Poll again at once (a long poll came back empty).
    Poll,
    /// Wait this long, then poll again.
    Pause(Duration),
    /// The receive failed: wait this long, then try again.
    Retry(Duration, SqsError),
    /// Stop: this error will not pass.
    Exit(SqsError),
}

/// Decides what follows each receive: backoff after errors, a bounded number of
/// tries for errors that will not pass, a paced short poll.
#[derive(Debug, Clone)]
pub(crate) struct ReceivePolicy {
    backoff: Backoff,
    short_poll: bool,
    permanent_failures: u32,
}

impl ReceivePolicy {
    /// The policy for a worker whose long poll waits `wait`.
    #[must_use]
    pub(crate) fn new(wait: Duration) -> Self {
        Self {
            backoff: Backoff::sqs(),
            short_poll: wait.is_zero(),
            permanent_failures: 0,
        }
    }

    /// What to do after `result`.
    pub(crate) fn after(&mut self, result: Result<Vec<Message>, SqsError>) -> AfterReceive {
        match result {
            Ok(messages) => {
                self.backoff.reset();
                self.permanent_failures = 0;
                if !messages.is_empty() {
                    AfterReceive::Dispatch(messages)
                } else if self.short_poll {
                    // Short polling returns at once on an empty queue: pace it, or the
                    // worker would call SQS in a hot loop.
                    AfterReceive::Pause(SHORT_POLL_PAUSE)
                } else {
                    AfterReceive::Poll
                }
            }
            Err(e) => {
                if matches!(e.kind, ErrorKind::Permanent | ErrorKind::Denied) {
                    self.permanent_failures += 1;
                    if self.permanent_failures >= PERMANENT_RECEIVE_TRIES {
                        return AfterReceive::Exit(e);
                    }
                } else {
                    self.permanent_failures = 0;
                }
                AfterReceive::Retry(self.backoff.next_delay(), e)
            }
        }
    }
}

/// Receives from one queue while its share allows, no message waits for protection
/// and the task is not leaving, until the worker stops receiving; stores a fatal
/// error in `shared` and stops every queue's loop then.
pub(crate) async fn receive_loop(shared: Arc<Shared>, lane: usize, messages: TaskTracker) {
    let queue = shared.lanes[lane].queue.clone();
    let mut policy = ReceivePolicy::new(shared.settings.wait);
    let mut awaiting = shared.awaiting_protection.subscribe();
    let mut load = shared.shares.subscribe();
    let mut leaving = shared.leaving.subscribe();
    let mut refused = shared.refused_until.subscribe();
    // How many chains of the last receive are not yet settled.
    let mut last: Option<Arc<AtomicUsize>> = None;
    loop {
        // When a slot first became free for this receive.
        let mut free_since = None;
        let ask = loop {
            if shared.stop_receiving.is_cancelled() {
                return;
            }
            load.borrow_and_update();
            let (ask, full) = shared.shares.ask(lane);
            let now = Instant::now();
            if ask > 0 {
                free_since.get_or_insert(now);
            }
            let gather_until = last
                .as_ref()
                .zip(free_since)
                .and_then(|(unsettled, since)| {
                    gather_until(
                        since,
                        unsettled.load(std::sync::atomic::Ordering::SeqCst),
                        ask,
                        full,
                        now,
                    )
                });
            // A message waiting for protection could not be worked: take no more.
            let waiting = *awaiting.borrow_and_update() > 0;
            let gone = *leaving.borrow_and_update();
            let refused_until = refused.borrow_and_update().filter(|t| *t > now);
            if ask > 0 && gather_until.is_none() && !waiting && !gone && refused_until.is_none() {
                break ask;
            }
            tokio::select! {
                biased;
                () = shared.stop_receiving.cancelled() => return,
                _ = load.changed() => {}
                _ = awaiting.changed() => {}
                _ = leaving.changed() => {}
                _ = refused.changed() => {}
                () = sleep_until_opt(refused_until) => {}
                () = sleep_until_opt(gather_until) => last = None,
            }
        };
        tracing::info!("Long polling for messages");
        // A poll on its way at SIGTERM gets `POLL_DRAIN` to bring its answer: its
        // messages are handed straight back instead of waiting out their visibility.
        // One on its way when the task starts to leave is given up at once: whatever
        // it brought would only go back, a receive each, and there is no hurry.
        let stopped = async {
            shared.stop_receiving.cancelled().await;
            tokio::time::sleep(POLL_DRAIN).await;
        };
        let received = tokio::select! {
            biased;
            () = shared.abandon.cancelled() => return,
            () = stopped => return,
            () = shared.leaving() => {
                tracing::info!(queue = %queue.url(), "Leaving the service: the poll on its way is given up");
                continue;
            }
            r = queue.receive(ask, shared.settings.wait, shared.settings.visibility) => r,
        };
        shared
            .health
            .received(lane, received.as_ref().map(Vec::len));
        if let Ok(batch) = &received {
            shared.shares.received(lane, ask, batch.len());
        }
        match policy.after(received) {
            AfterReceive::Dispatch(batch) => {
                last = Some(dispatch(&shared, lane, batch, &messages));
            }
            AfterReceive::Poll => {}
            AfterReceive::Retry(wait, e) => {
                tracing::warn!(
                    queue = %queue.url(),
                    "Receiving messages failed on {} ({}), retrying in {:.1}s: {e}",
                    queue.url(),
                    shared.lanes[lane].setting(),
                    wait.as_secs_f64()
                );
                tokio::select! {
                    () = shared.stop_receiving.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
            }
            AfterReceive::Pause(wait) => {
                tokio::select! {
                    () = shared.stop_receiving.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
            }
            AfterReceive::Exit(e) => {
                shared
                    .fatal
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get_or_insert((lane, e));
                shared.stop_receiving.cancel();
                return;
            }
        }
    }
}

/// Until when a receive waits before it asks for `ask` messages rather than `full`:
/// while the chains of the previous receive are not all settled (`unsettled`: their
/// slots free in a bunch, as their batch of deletes comes back), and at most
/// [`RECEIVE_GATHER`] after the first slot became free (`free_since`). Slots held by
/// older chains (a long job) are never waited for. `None`: receive now.
fn gather_until(
    free_since: Instant,
    unsettled: usize,
    ask: usize,
    full: usize,
    now: Instant,
) -> Option<Instant> {
    let until = free_since + RECEIVE_GATHER;
    (ask < full && unsettled > 0 && now < until).then_some(until)
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

    fn error(kind: ErrorKind) -> Result<Vec<Message>, SqsError> {
        Err(SqsError {
            operation: "ReceiveMessage",
            kind,
            code: Some("X".to_owned()),
            message: String::new(),
        })
    }

    #[test]
    fn permanent_errors_end_the_loop_after_a_bounded_number_of_tries() {
        let mut p = ReceivePolicy::new(Duration::from_secs(20));
        for _ in 1..PERMANENT_RECEIVE_TRIES {
            assert!(matches!(
                p.after(error(ErrorKind::Permanent)),
                AfterReceive::Retry(..)
            ));
        }
        assert!(matches!(
            p.after(error(ErrorKind::Denied)),
            AfterReceive::Exit(_)
        ));
    }

    #[test]
    fn errors_that_pass_never_end_the_loop_and_reset_the_count() {
        let mut p = ReceivePolicy::new(Duration::from_secs(20));
        for _ in 0..100 {
            for kind in [
                ErrorKind::Timeout,
                ErrorKind::Throttled,
                ErrorKind::Transient,
            ] {
                let AfterReceive::Retry(wait, _) = p.after(error(kind)) else {
                    panic!("gave up on {kind:?}")
                };
                assert!(wait <= crate::backoff::SQS_RETRY_CAP);
            }
            assert!(matches!(
                p.after(error(ErrorKind::Permanent)),
                AfterReceive::Retry(..)
            ));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_receive_waits_only_for_the_receive_before_it() {
        let t0 = Instant::now();
        let soon = t0 + Duration::from_millis(10);
        // Its messages are being settled: wait for them, a moment at most.
        assert_eq!(gather_until(t0, 3, 7, 10, soon), Some(t0 + RECEIVE_GATHER));
        assert_eq!(gather_until(t0, 3, 7, 10, t0 + RECEIVE_GATHER), None);
        // All settled: what is still held belongs to older receives (a long job).
        assert_eq!(gather_until(t0, 0, 9, 10, soon), None);
        // A full batch to ask for: no reason to wait.
        assert_eq!(gather_until(t0, 3, 10, 10, soon), None);
    }

    #[test]
    fn empty_polls() {
        let mut long = ReceivePolicy::new(Duration::from_secs(20));
        assert_eq!(long.after(Ok(Vec::new())), AfterReceive::Poll);
        let mut short = ReceivePolicy::new(Duration::ZERO);
        assert_eq!(
            short.after(Ok(Vec::new())),
            AfterReceive::Pause(SHORT_POLL_PAUSE)
        );
    }
}
