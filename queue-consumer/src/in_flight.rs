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
use tokio::sync::{OwnedSemaphorePermit, oneshot};
use tokio::time::Instant;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::backoff::{Backoff, redelivery_delay};
use crate::handler::{Job, Source, Verdict, unwrap_sns};
use crate::heartbeat::Keeper;
use crate::metrics;
use crate::queue::{ErrorKind, Message};
use crate::settle::Action;
use crate::worker::Shared;

/// Where a message of a FIFO queue stands in its group's order within one receive.
#[derive(Debug, Default)]
pub(crate) struct Order {
    /// The message before it in its group: it sends its slot when its message is
    /// deleted, or nothing (a dropped sender) when it failed, so this one waits.
    pub(crate) after: Option<oneshot::Receiver<OwnedSemaphorePermit>>,
    /// The message after it in its group.
    pub(crate) before: Option<oneshot::Sender<OwnedSemaphorePermit>>,
}

/// Runs one message to its end. `job_phase` is dropped once its job has ended (or
/// never started), so the settler knows no more work is coming from it. A message
/// that waits for the one before it in its FIFO group comes without a slot
/// (`permit` is `None`) and is given that message's slot when its turn comes.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    lane: usize,
    message: Message,
    permit: Option<OwnedSemaphorePermit>,
    order: Order,
    job_phase: TaskTrackerToken,
) {
    let _in_flight = metrics::InFlight::new();
    let id = message.id.clone();
    let queue = &shared.lanes[lane].queue;
    let mut keeper = Keeper::new(
        queue.clone(),
        &message,
        shared.settings.visibility,
        shared.give_up.clone(),
    );
    let mut permit = permit;
    let mut action = None;
    let mut guard = None;
    if let Some(after) = order.after {
        let stop = shared.stop_receiving.clone();
        let turn = keeper
            .keep_while(async {
                tokio::select! {
                    biased;
                    r = after => r.ok(),
                    () = stop.cancelled() => None,
                }
            })
            .await;
        match turn {
            Some(p) => permit = Some(p),
            None if !keeper.is_lost() => {
                // The message before it in its group was not done: it must come first,
                // so this one goes back unworked (SQS delivers no message of a group
                // while one of the group is in flight).
                tracing::info!(message_id = %id, "{id} - Not started: an earlier message of its group is not done; handing it back");
                action = Some(Action::HandBack);
            }
            None => {}
        }
    }
    if permit.is_some() && !keeper.is_lost() {
        if shared.stop_receiving.is_cancelled() {
            // A long poll that was on its way at SIGTERM: hand its messages straight back.
            tracing::info!(message_id = %id, "{id} - Received while stopping; handing it back");
            action = Some(Action::HandBack);
        } else {
            (action, guard) = run(&shared, lane, &mut keeper, &message).await;
        }
    }
    drop(job_phase);
    let mut settled = false;
    if let Some(action) = action {
        settled = settle(&shared, lane, &mut keeper, &message, action, &mut guard).await
            && action == Action::Delete;
    }
    // Settled (or given up): the slot and the protection hold go last. The next
    // message of the group gets the slot only when this one is deleted.
    drop(guard);
    if let (true, Some(before), Some(p)) = (settled, order.before, permit.take()) {
        let _ = before.send(p);
    }
    drop(permit);
}

/// The job as the handler sees it.
fn job_of(shared: &Shared, lane: usize, message: &Message, keeper: &Keeper) -> Job {
    let lane = &shared.lanes[lane];
    let mut source = Source {
        queue_url: lane.queue.url().to_owned(),
        queue_name: lane.name.clone(),
        topic_arn: None,
    };
    let (body, attributes, sns_message_id) = match unwrap_sns(&message.body) {
        Some(envelope) => {
            source.topic_arn = Some(envelope.topic_arn);
            (envelope.message, envelope.attributes, envelope.message_id)
        }
        None => (message.body.clone(), message.attributes.clone(), None),
    };
    Job {
        message_id: message.id.clone(),
        body,
        attributes,
        receive_count: message.receive_count,
        source,
        sns_message_id,
        group_id: message.group_id.clone(),
        deduplication_id: message.deduplication_id.clone(),
        lost: keeper.lost.clone(),
    }
}

/// Protects the task, then works the job. Returns what to do with the message (none
/// when it is no longer held) and the guard to keep until that is done.
async fn run(
    shared: &Shared,
    lane: usize,
    keeper: &mut Keeper,
    message: &Message,
) -> (Option<Action>, Option<ProtectionGuard>) {
    let id = message.id.clone();
    let guard = match protect(shared, keeper, &id).await {
        Ok(guard) => guard,
        Err(action) => return (action, None),
    };
    let job = job_of(shared, lane, message, keeper);
    tracing::info!(message_id = %id, source = %job.source, "{id} - Started ({})", job.source);
    // The job runs on its own task: it makes progress while an extension is awaited,
    // a panic in it is caught (and the message retried), and the grace period's end
    // can abort it.
    ::metrics::histogram!(metrics::RECEIVE_TO_START)
        .record(metrics::ms(message.received_at.elapsed()));
    let started = tokio::time::Instant::now();
    let mut task = tokio::spawn(shared.handler.call(job));
    let abandon = shared.abandon.clone();
    let ended = keeper
        .keep_while(async {
            tokio::select! {
                r = &mut task => Some(r),
                () = abandon.cancelled() => None,
            }
        })
        .await;
    if ended.is_some() {
        ::metrics::histogram!(metrics::JOB_DURATION).record(metrics::ms(started.elapsed()));
    }
    let action = match ended {
        None => {
            task.abort();
            tracing::warn!(
                message_id = %id,
                "{id} - Still working at the end of the shutdown grace period; handing it back"
            );
            Some(Action::HandBack)
        }
        Some(_) if keeper.is_lost() => {
            tracing::warn!(
                message_id = %id,
                "{id} - Stopped: the message is no longer held; neither deleted nor handed back"
            );
            None
        }
        Some(Ok(Verdict::Done)) => Some(Action::Delete),
        Some(Ok(Verdict::Failed(why))) => Some(failed(shared, message, &why)),
        Some(Ok(Verdict::RetryAfter(after))) => {
            shared.stats.failed.fetch_add(1, Ordering::Relaxed);
            metrics::count(metrics::JOBS_FAILED);
            let after = after.min(MAX_RETRY_AFTER);
            tracing::warn!(message_id = %id, "{id} - Retry asked for; visible again in {}s", after.as_secs());
            Some(Action::RetryAfter(after))
        }
        Some(Ok(Verdict::BadInput(reason))) => {
            // Retrying cannot fix bad input. Leaving it invisible for longer each time
            // lets the queue's redrive policy move it to the dead-letter queue after
            // `maxReceiveCount` deliveries, without a hot loop meanwhile.
            shared.stats.bad.fetch_add(1, Ordering::Relaxed);
            metrics::count(metrics::BAD_BODIES);
            let delay = redelivery_delay(message.receive_count);
            tracing::error!(
                message_id = %id,
                receive_count = message.receive_count,
                "{id} - Rejected: {reason}; not deleted, visible again in {}s",
                delay.as_secs()
            );
            Some(Action::RetryAfter(delay))
        }
        Some(Err(e)) => Some(failed(shared, message, &format!("the job panicked: {e}"))),
    };
    (action, Some(guard))
}

/// The longest visibility SQS accepts, and so the longest retry-after.
const MAX_RETRY_AFTER: std::time::Duration =
    std::time::Duration::from_secs(crate::config::MAX_VISIBILITY_SECONDS);

fn failed(shared: &Shared, message: &Message, why: &str) -> Action {
    let id = &message.id;
    shared.stats.failed.fetch_add(1, Ordering::Relaxed);
    metrics::count(metrics::JOBS_FAILED);
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
            Some(Err(AcquireError::Draining)) => {
                tracing::info!(message_id = %id, "{id} - Not started: this task is leaving its service; handing it back");
                return Err(Some(Action::HandBack));
            }
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
    lane: usize,
    keeper: &mut Keeper,
    message: &Message,
    action: Action,
    guard: &mut Option<ProtectionGuard>,
) -> bool {
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
            return false;
        }
        let reply = shared.lanes[lane]
            .settle
            .submit(&message.receipt_handle, action);
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
                return false;
            }
            Some(Ok(())) => {
                succeeded(shared, id, action);
                return true;
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
            return false;
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
            metrics::count(metrics::JOBS_DONE);
            tracing::info!(message_id = %id, "{id} - Done");
        }
        Action::HandBack => {
            shared.stats.handed_back.fetch_add(1, Ordering::Relaxed);
            metrics::count(metrics::JOBS_HANDED_BACK);
            tracing::info!(message_id = %id, "{id} - Handed back");
        }
        Action::RetryAfter(d) => {
            tracing::info!(message_id = %id, "{id} - Visible again in {}s", d.as_secs());
        }
    }
}
