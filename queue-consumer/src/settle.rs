//! Settling a message whose job has ended: deciding what becomes of it (deleted,
//! handed back, retried later), and the calls that do it, tried again while they may
//! work.

use std::sync::atomic::Ordering;
use std::time::Duration;

use task_protection::ProtectionGuard;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::backoff::{Backoff, redelivery_delay};
use crate::batcher::{Answer, Call};
use crate::context::Shared;
use crate::handler::Verdict;
use crate::heartbeat::Keeper;
use crate::job::{Ended, why};
use crate::metrics;
use crate::queue::{ErrorKind, Message};

/// How long a message whose settle keeps failing keeps the task protected. Its job
/// has ended, so a stop now costs at most a second run of it, while protection held
/// through a long SQS outage would block scale-in and deployments all along.
pub const PROTECTED_SETTLE: Duration = Duration::from_secs(60);

/// What to do with a message whose job has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// The job is done: delete it.
    Delete,
    /// It has used up its tries, and later messages of its FIFO group wait: move it to
    /// the dead-letter queue alone (a copy sent there, then [`Moved`](Self::Moved)).
    DeadLetter,
    /// Its copy is in the dead-letter queue: delete it.
    Moved,
    /// Hand it back at once (visibility 0), for another worker.
    HandBack,
    /// Let SQS deliver it again after this long.
    RetryAfter(Duration),
}

impl Action {
    /// Whether it deletes the message.
    fn deletes(self) -> bool {
        matches!(self, Self::Delete | Self::Moved)
    }
}

/// The visibility, in whole seconds, a settle action asks for.
pub(crate) fn visibility_secs(action: Action) -> i32 {
    match action {
        Action::Delete | Action::DeadLetter | Action::Moved | Action::HandBack => 0,
        Action::RetryAfter(d) => i32::try_from(d.as_secs()).unwrap_or(i32::MAX),
    }
}

/// What follows the job's end: log it and choose the settle.
///
/// `poison`: the message has used up its tries (or can never work) while later
/// messages of its FIFO group wait; it goes to the dead-letter queue alone.
pub(crate) fn decide(
    shared: &Shared,
    message: &Message,
    keeper: &Keeper,
    ended: Ended,
    poison: bool,
) -> Action {
    let id = &message.id;
    if poison && !matches!(ended, Ended::Verdict(Verdict::Done)) {
        if matches!(ended, Ended::Verdict(Verdict::BadInput(_))) {
            shared.stats.bad.fetch_add(1, Ordering::Relaxed);
            metrics::count(metrics::BAD_BODIES);
        } else {
            shared.stats.failed.fetch_add(1, Ordering::Relaxed);
            metrics::count(metrics::JOBS_FAILED);
        }
        tracing::error!(
            message_id = %id,
            receive_count = message.receive_count,
            "{id} - Failed: {}; its last try: moving it to the dead-letter queue, alone",
            why(&ended)
        );
        return Action::DeadLetter;
    }
    match ended {
        Ended::Verdict(Verdict::Done) => {
            // Logged before the delete is sent: the group (and the log) moves on now.
            tracing::info!(message_id = %id, "{id} - Done");
            Action::Delete
        }
        Ended::Verdict(Verdict::RetryAfter(after)) if after.is_zero() => Action::HandBack,
        Ended::Verdict(Verdict::RetryAfter(after)) => {
            shared.stats.failed.fetch_add(1, Ordering::Relaxed);
            metrics::count(metrics::JOBS_FAILED);
            let after = keeper.retry_after(after);
            tracing::warn!(message_id = %id, "{id} - Retry asked for; visible again in {}s", after.as_secs());
            Action::RetryAfter(after)
        }
        Ended::Verdict(Verdict::BadInput(reason)) => {
            // Retrying cannot fix bad input. Leaving it invisible for longer each time
            // lets the queue's redrive policy move it to the dead-letter queue after
            // `maxReceiveCount` deliveries, without a hot loop meanwhile.
            shared.stats.bad.fetch_add(1, Ordering::Relaxed);
            metrics::count(metrics::BAD_BODIES);
            let delay = keeper.retry_after(redelivery_delay(message.receive_count));
            tracing::error!(
                message_id = %id,
                receive_count = message.receive_count,
                "{id} - Rejected: {reason}; not deleted, visible again in {}s",
                delay.as_secs()
            );
            Action::RetryAfter(delay)
        }
        Ended::Skipped => {
            tracing::info!(message_id = %id, "{id} - Not done: an earlier message of its group failed; handing it back");
            Action::HandBack
        }
        ended => {
            if matches!(ended, Ended::TimedOut(_)) {
                metrics::count(metrics::JOBS_TIMED_OUT);
            }
            shared.stats.failed.fetch_add(1, Ordering::Relaxed);
            metrics::count(metrics::JOBS_FAILED);
            let delay = keeper.retry_after(redelivery_delay(message.receive_count));
            tracing::error!(
                message_id = %id,
                "{id} - Failed: {}; visible again in {}s",
                why(&ended),
                delay.as_secs()
            );
            Action::RetryAfter(delay)
        }
    }
}

/// Deletes the message or sets its visibility, trying again while that may work.
///
/// During a delete the heartbeat goes on, even between tries, so a failing delete
/// never lets the message lapse and its job run again elsewhere. A visibility change
/// stops the heartbeat and is sent at once, even with an extension on its way: if
/// that extension may have landed after it, the change is sent again. The protection
/// `guard` is dropped [`PROTECTED_SETTLE`] after the first try, to the second, however
/// the tries go.
///
/// A delete is tried on even once the message is no longer held (its visibility ran
/// out while SQS failed): the job is done, and a delete that lands before another
/// worker receives the message spares it a second run. A hand-back is not: there is
/// nothing left to give back.
pub(crate) async fn settle(
    shared: &Shared,
    lane: usize,
    keeper: &mut Keeper,
    message: &Message,
    action: Action,
    guard: &mut Option<ProtectionGuard>,
    cohort: &TaskTracker,
) {
    let id = &message.id;
    let what = if action.deletes() {
        "Delete"
    } else {
        "Hand-back"
    };
    let protect_until = Instant::now() + PROTECTED_SETTLE;
    let call = if action.deletes() {
        Call::Delete
    } else {
        Call::Visibility {
            secs: visibility_secs(action),
            extension: false,
        }
    };
    let mut extension = if action.deletes() {
        None
    } else {
        keeper.take_in_flight()
    };
    let mut backoff = Backoff::sqs();
    let mut tries = 0u32;
    let mut reported = false;
    let mut lost_reported = false;
    loop {
        if keeper.is_lost() {
            if !action.deletes() {
                tracing::warn!(message_id = %id, "{id} - {what} not sent: the message is no longer held");
                return;
            }
            if !lost_reported {
                tracing::warn!(message_id = %id, "{id} - Its visibility ran out while its delete was tried: another worker may run it again; trying on");
                lost_reported = true;
            }
        }
        // An extension answered before this change is sent landed before it.
        if let Some(pending) = &mut extension
            && !matches!(pending.try_recv(), Err(oneshot::error::TryRecvError::Empty))
        {
            extension = None;
        }
        let reply = shared.lanes[lane]
            .settle
            .submit(&message.receipt_handle, call, Some(cohort));
        let answer = keep(
            keeper,
            action,
            bounded(shared, guard, protect_until, id, what, async {
                reply.await.ok()
            }),
        )
        .await
        .flatten();
        let error = match answer {
            None => {
                tracing::error!(
                    message_id = %id,
                    "{id} - Not settled before exit; SQS delivers it again once its visibility timeout passes"
                );
                return;
            }
            Some(Ok(())) => {
                if !reported {
                    succeeded(shared, id, action);
                    reported = true;
                }
                // An extension that was on its way may have landed after this change.
                if let Some(pending) = extension.take()
                    && may_have_landed(shared, pending).await
                {
                    tracing::debug!(message_id = %id, "{id} - An extension may have landed after the {what}; sending it again");
                    continue;
                }
                return;
            }
            Some(Err(e)) => e,
        };
        if !error.kind.may_pass() {
            let then = if error.kind == ErrorKind::Denied {
                "not retried"
            } else {
                "not retried: the receipt handle no longer works"
            };
            let queue = shared.lanes[lane].queue.url();
            tracing::warn!(
                message_id = %id,
                %queue,
                "{id} - {what} failed on {queue} ({error}), {then}; SQS delivers it again once its visibility timeout passes"
            );
            return;
        }
        let wait = backoff.next_delay();
        tries += 1;
        if tries == 1 {
            let state = if error.kind == ErrorKind::Timeout {
                "outcome unknown"
            } else {
                "failed"
            };
            let queue = shared.lanes[lane].queue.url();
            tracing::warn!(
                message_id = %id,
                %queue,
                "{id} - {what} {state} on {queue} ({error}); keeping the message and trying again"
            );
        } else {
            tracing::debug!(message_id = %id, "{id} - {what} try {tries} failed: {error}");
        }
        keep(
            keeper,
            action,
            bounded(shared, guard, protect_until, id, what, async {
                tokio::time::sleep(wait).await;
            }),
        )
        .await;
        if shared.give_up.is_cancelled() {
            tracing::error!(
                message_id = %id,
                "{id} - Not settled before exit; SQS delivers it again once its visibility timeout passes"
            );
            return;
        }
    }
}

/// Runs `work` with the heartbeat going on while the message is to be deleted (so a
/// failing delete never lets it lapse and its job run again elsewhere), and without
/// it while its visibility is to change: an extension would undo the change.
async fn keep<T>(keeper: &mut Keeper, action: Action, work: impl Future<Output = T>) -> T {
    if action.deletes() {
        keeper.keep_while(work).await
    } else {
        work.await
    }
}

/// Runs `work` until it ends or the settle budget is over (`None`), dropping the
/// protection `guard` at `protect_until` meanwhile.
async fn bounded<T>(
    shared: &Shared,
    guard: &mut Option<ProtectionGuard>,
    protect_until: Instant,
    id: &str,
    what: &str,
    work: impl Future<Output = T>,
) -> Option<T> {
    let mut work = std::pin::pin!(work);
    loop {
        tokio::select! {
            r = &mut work => return Some(r),
            () = shared.give_up.cancelled() => return None,
            () = tokio::time::sleep_until(protect_until), if guard.is_some() => {
                guard.take();
                tracing::warn!(
                    message_id = %id,
                    "{id} - {what} still not done after {}s; trying on, but no longer keeping the task protected for it",
                    PROTECTED_SETTLE.as_secs()
                );
            }
        }
    }
}

/// Whether an extension sent before a visibility change may have been applied after
/// it: it was sent (not replaced) and did not fail for sure. Waits for its answer
/// within the settle budget.
async fn may_have_landed(shared: &Shared, pending: oneshot::Receiver<Answer>) -> bool {
    let answer = tokio::select! {
        r = pending => r,
        () = shared.give_up.cancelled() => return false,
    };
    match answer {
        // Never sent: replaced by the change, or the worker is exiting.
        Err(_) => false,
        Ok(Ok(())) => true,
        Ok(Err(e)) => e.kind == ErrorKind::Timeout,
    }
}

fn succeeded(shared: &Shared, id: &str, action: Action) {
    match action {
        Action::Delete => {
            shared.stats.done.fetch_add(1, Ordering::Relaxed);
            metrics::count(metrics::JOBS_DONE);
            tracing::debug!(message_id = %id, "{id} - Deleted");
        }
        Action::HandBack => {
            shared.stats.handed_back.fetch_add(1, Ordering::Relaxed);
            metrics::count(metrics::JOBS_HANDED_BACK);
            tracing::info!(message_id = %id, "{id} - Handed back");
        }
        Action::Moved => {
            shared.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            metrics::count(metrics::JOBS_DEAD_LETTERED);
            tracing::debug!(message_id = %id, "{id} - Deleted; its copy is in the dead-letter queue");
        }
        Action::RetryAfter(d) => {
            tracing::info!(message_id = %id, "{id} - Visible again in {}s", d.as_secs());
        }
        // Decided, never sent: the move turns it into `Moved` or a retry.
        Action::DeadLetter => {}
    }
}
