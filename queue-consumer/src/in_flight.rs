//! One received message, from its receipt until it is settled: its visibility kept,
//! protection taken, its job run, and the message deleted or handed back.
//!
//! Each message has its own task, so nothing one message waits for (ECS, a slow or
//! failing SQS call, its job) holds back another. The task keeps the message's
//! visibility extended the whole time ([`Keeper`]), including while it waits for
//! protection and while its delete is retried, so SQS never delivers it to another
//! worker meanwhile, and it keeps its concurrency slot and its protection guard until
//! the message is settled.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use task_protection::{AcquireError, ProtectionGuard};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::backoff::{Backoff, redelivery_delay};
use crate::heartbeat::Keeper;
use crate::job::{self, Job, JobContext, JobDuration, JobError};
use crate::queue::{ErrorKind, Message};
use crate::settle::Action;
use crate::worker::Shared;

/// Runs one message to its end. `job_phase` is dropped once its job has ended (or
/// never started), so the settler knows no more work is coming from it.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    message: Message,
    permit: OwnedSemaphorePermit,
    job_phase: TaskTrackerToken,
) {
    let id = message.id.clone();
    let mut keeper = Keeper::new(
        shared.queue.clone(),
        &message,
        shared.settings.visibility,
        shared.give_up.clone(),
    );
    let (action, guard) = if shared.stop_receiving.is_cancelled() {
        // A long poll that was on its way at SIGTERM: hand its messages straight back.
        tracing::info!(message_id = %id, "{id} - Received while stopping; handing it back");
        (Some(Action::HandBack), None)
    } else {
        match JobDuration::parse(&message.body, shared.settings.max_job) {
            Err(reason) => {
                // Retrying cannot fix a bad body. Leaving it invisible for longer each
                // time lets the queue's redrive policy move it to the dead-letter queue
                // after `maxReceiveCount` deliveries, without a hot loop meanwhile.
                shared.stats.bad.fetch_add(1, Ordering::Relaxed);
                let delay = redelivery_delay(message.receive_count);
                tracing::error!(
                    message_id = %id,
                    receive_count = message.receive_count,
                    "{id} - Rejected: {reason}; not worked, not deleted, visible again in {}s",
                    delay.as_secs()
                );
                (Some(Action::RetryAfter(delay)), None)
            }
            Ok(duration) => {
                let job = Job {
                    id: id.clone(),
                    duration,
                };
                run(&shared, &mut keeper, job, &message).await
            }
        }
    };
    drop(job_phase);
    let mut guard = guard;
    if let Some(action) = action {
        settle(&shared, &mut keeper, &message, action, &mut guard).await;
    }
    // Settled (or given up): the slot and the protection hold go last.
    drop(guard);
    drop(permit);
}

/// Protects the task, then works the job. Returns what to do with the message (none
/// when it is no longer held) and the guard to keep until that is done.
async fn run(
    shared: &Shared,
    keeper: &mut Keeper,
    job: Job,
    message: &Message,
) -> (Option<Action>, Option<ProtectionGuard>) {
    let id = job.id.clone();
    let guard = match protect(shared, keeper, &id).await {
        Ok(guard) => guard,
        Err(action) => return (action, None),
    };
    tracing::info!(message_id = %id, "{id} - Working for {}", job.duration);
    let ctx = JobContext {
        receive_count: message.receive_count,
        lost: keeper.lost.clone(),
    };
    // The job runs on its own task: it makes progress while an extension is awaited,
    // a panic in it is caught, and the grace period's end can abort it.
    let mut task = tokio::spawn(async move { job::work(&job, &ctx).await });
    let abandon = shared.abandon.clone();
    let ended = keeper
        .keep_while(async {
            tokio::select! {
                r = &mut task => Some(r),
                () = abandon.cancelled() => None,
            }
        })
        .await;
    let action = match ended {
        None => {
            task.abort();
            tracing::warn!(
                message_id = %id,
                "{id} - Still working at the end of the shutdown grace period; handing it back"
            );
            Some(Action::HandBack)
        }
        Some(Ok(Ok(()))) => Some(Action::Delete),
        Some(Ok(Err(JobError::Lost))) => {
            tracing::warn!(
                message_id = %id,
                "{id} - Stopped: the message is no longer held; neither deleted nor handed back"
            );
            None
        }
        Some(Ok(Err(e))) => Some(failed(shared, message, &e.to_string())),
        Some(Err(e)) => Some(failed(shared, message, &format!("the job panicked: {e}"))),
    };
    (action, Some(guard))
}

fn failed(shared: &Shared, message: &Message, why: &str) -> Action {
    let id = &message.id;
    shared.stats.failed.fetch_add(1, Ordering::Relaxed);
    let delay = redelivery_delay(message.receive_count);
    tracing::error!(
        message_id = %id,
        "{id} - Failed: {why}; visible again in {}s",
        delay.as_secs()
    );
    Action::RetryAfter(delay)
}

/// Counts a message as waiting for protection while it lives; the receive loop takes
/// no new messages meanwhile.
struct Waiting<'a>(&'a tokio::sync::watch::Sender<usize>);

impl<'a> Waiting<'a> {
    fn new(count: &'a tokio::sync::watch::Sender<usize>) -> Self {
        count.send_modify(|n| *n += 1);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Waits for ECS to confirm protection, keeping the message meanwhile.
///
/// A protection fault must not cost the message a receive: handing it back would have
/// SQS count a delivery each time, and an agent outage would move good messages to
/// the dead-letter queue unworked. So the message is kept, its visibility extended,
/// for as long as protection takes; only a refusal (the task is being replaced) or
/// the worker stopping hands it back.
async fn protect(
    shared: &Shared,
    keeper: &mut Keeper,
    id: &str,
) -> Result<ProtectionGuard, Option<Action>> {
    let _waiting = Waiting::new(&shared.awaiting_protection);
    // Held across attempts, so protection stays wanted between two acquires.
    let _wanted = shared.protection.hold();
    let started = Instant::now();
    loop {
        let stop = shared.stop_receiving.clone();
        let acquired = keeper
            .keep_while(async {
                tokio::select! {
                    biased;
                    () = stop.cancelled() => None,
                    r = shared.protection.acquire() => Some(r),
                }
            })
            .await;
        if keeper.is_lost() {
            tracing::warn!(message_id = %id, "{id} - Not started: the message is no longer held");
            return Err(None);
        }
        match acquired {
            None => {
                tracing::info!(message_id = %id, "{id} - Not started: the worker is stopping; handing it back");
                return Err(Some(Action::HandBack));
            }
            Some(Ok(guard)) => return Ok(guard),
            Some(Err(AcquireError::Rejected(r))) => {
                tracing::warn!(message_id = %id, "{id} - Not started: task protection refused ({r}); handing it back");
                shared.refuse(r);
                return Err(Some(Action::HandBack));
            }
            Some(Err(AcquireError::ShutDown)) => return Err(Some(Action::HandBack)),
            Some(Err(e)) => {
                tracing::warn!(
                    message_id = %id,
                    "{id} - Still waiting for task protection after {}s ({e}); keeping the message, receiving no more until protection works",
                    started.elapsed().as_secs()
                );
            }
        }
    }
}

/// How long a message whose settle keeps failing keeps the task protected. Its job
/// has ended, so a stop now costs at most a second run of it, while protection held
/// through a long SQS outage would block scale-in and deployments all along.
const PROTECTED_SETTLE: std::time::Duration = std::time::Duration::from_secs(60);

/// Deletes the message or sets its visibility, trying again while that may work.
///
/// The heartbeat goes on between tries, so a failing delete never lets the message
/// lapse and its job run again elsewhere. During a delete it goes on even while the
/// call is on its way (extending a message being deleted is harmless); a visibility
/// change is only sent once no extension is in flight, which would undo it. The
/// protection `guard` is dropped once tries have failed for [`PROTECTED_SETTLE`].
async fn settle(
    shared: &Shared,
    keeper: &mut Keeper,
    message: &Message,
    action: Action,
    guard: &mut Option<ProtectionGuard>,
) {
    let started = Instant::now();
    let id = &message.id;
    let what = if action == Action::Delete {
        "Delete"
    } else {
        "Hand-back"
    };
    let mut backoff = Backoff::sqs();
    let mut tries = 0u32;
    loop {
        if keeper.is_lost() {
            tracing::warn!(message_id = %id, "{id} - {what} not sent: the message is no longer held");
            return;
        }
        let reply = shared.settle.submit(&message.receipt_handle, action);
        let give_up = shared.give_up.clone();
        let answer = async {
            tokio::select! {
                r = reply => r.ok(),
                () = give_up.cancelled() => None,
            }
        };
        let answer = if action == Action::Delete {
            keeper.keep_while(answer).await
        } else {
            answer.await
        };
        let error = match answer {
            None => {
                tracing::error!(
                    message_id = %id,
                    "{id} - Not settled before exit; SQS delivers it again once its visibility timeout passes"
                );
                return;
            }
            Some(Ok(())) => {
                succeeded(shared, id, action);
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
            tracing::warn!(
                message_id = %id,
                "{id} - {what} failed ({error}), {then}; SQS delivers it again once its visibility timeout passes"
            );
            return;
        }
        let wait = backoff.next_delay();
        tries += 1;
        if started.elapsed() >= PROTECTED_SETTLE && guard.take().is_some() {
            tracing::warn!(
                message_id = %id,
                "{id} - {what} still failing after {}s; trying on, but no longer keeping the task protected for it",
                PROTECTED_SETTLE.as_secs()
            );
        }
        if tries == 1 {
            let state = if error.kind == ErrorKind::Timeout {
                "outcome unknown"
            } else {
                "failed"
            };
            tracing::warn!(
                message_id = %id,
                "{id} - {what} {state} ({error}); keeping the message and trying again"
            );
        } else {
            tracing::debug!(message_id = %id, "{id} - {what} try {tries} failed: {error}");
        }
        let give_up = shared.give_up.clone();
        keeper
            .keep_while(async {
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = give_up.cancelled() => {}
                }
            })
            .await;
    }
}

fn succeeded(shared: &Shared, id: &str, action: Action) {
    match action {
        Action::Delete => {
            shared.stats.done.fetch_add(1, Ordering::Relaxed);
            tracing::info!(message_id = %id, "{id} - Done");
        }
        Action::HandBack => {
            shared.stats.handed_back.fetch_add(1, Ordering::Relaxed);
            tracing::info!(message_id = %id, "{id} - Handed back");
        }
        Action::RetryAfter(d) => {
            tracing::info!(message_id = %id, "{id} - Visible again in {}s", d.as_secs());
        }
    }
}
