//! One received message, from its receipt until it is settled: its visibility kept,
//! a slot and protection taken, its job run, and the message deleted or handed back.
//!
//! Each message has its own task, so nothing one message waits for (a slot, ECS, a
//! slow or failing SQS call, its job) holds back another. The task keeps the
//! message's visibility extended the whole time ([`Keeper`]), including while it
//! waits and while its delete is retried, so SQS never delivers it to another worker
//! meanwhile, and it keeps its protection guard until the message is settled.
//!
//! On a FIFO queue the messages of one group in one receive form a *chain*: they run
//! one after the other on one slot, each as soon as the job before it is done (its
//! delete is batched with the rest of the chain's). When a job of a chain fails, it
//! is retried in place first ([`FIFO_ATTEMPTS`] runs in all), because handing the
//! group back would cost every later message of the group a receive, and SQS moves a
//! message to the dead-letter queue by its receive count; only when it keeps failing
//! does the rest of the chain go back unworked.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use task_protection::{AcquireError, ProtectionGuard};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::backoff::{Backoff, redelivery_delay};
use crate::handler::{BoxedHandler, Job, Source, Verdict, unwrap_sns};
use crate::heartbeat::Keeper;
use crate::metrics;
use crate::queue::{ErrorKind, Message};
use crate::settle::{Action, Answer, Call, visibility_secs};
use crate::shares::Slot;
use crate::worker::Shared;

/// How many times a failing job of a FIFO chain with later messages runs within one
/// delivery before the chain goes back to SQS.
pub const FIFO_ATTEMPTS: u32 = 3;
/// First wait before a failed FIFO job runs again in place; it doubles.
const FIFO_RETRY_BASE: Duration = Duration::from_secs(1);

/// How long a message whose settle keeps failing keeps the task protected. Its job
/// has ended, so a stop now costs at most a second run of it, while protection held
/// through a long SQS outage would block scale-in and deployments all along.
pub const PROTECTED_SETTLE: Duration = Duration::from_secs(60);

/// Where a message of a FIFO queue stands in its chain.
#[derive(Debug, Default)]
pub(crate) struct Order {
    /// The message before it: it sends the chain's slot when its job is done, or
    /// nothing (a dropped sender) when it was not, so this one goes back unworked.
    pub(crate) after: Option<oneshot::Receiver<Slot>>,
    /// The message after it.
    pub(crate) before: Option<oneshot::Sender<Slot>>,
}

/// What a message task is given.
#[derive(Debug)]
pub(crate) struct Dispatch {
    pub(crate) lane: usize,
    pub(crate) message: Message,
    /// The chain's slot, for its first message; later ones get it through `order`.
    pub(crate) slot: Option<Slot>,
    pub(crate) order: Order,
    /// The jobs of its receive: a settle waits for them to end, to share a call.
    pub(crate) cohort: TaskTracker,
    /// Held while its job may still run: for the settle batching and the drain.
    pub(crate) job_phase: (TaskTrackerToken, TaskTrackerToken),
    /// Its place in a batch handler's call.
    pub(crate) batch: Option<crate::batch::Member>,
}

/// How a job ended.
#[derive(Debug)]
pub(crate) enum Ended {
    /// The handler's verdict.
    Verdict(Verdict),
    /// It panicked (the message that says why).
    Panicked(String),
    /// `JOB_TIMEOUT_SECONDS` passed.
    TimedOut(Duration),
    /// A batch handler did not get to it: an earlier message of its group failed.
    Skipped,
}

impl Ended {
    /// Whether running it again may help: a failure, a panic, a timeout.
    fn may_pass(&self) -> bool {
        matches!(
            self,
            Self::Verdict(Verdict::Failed(_)) | Self::Panicked(_) | Self::TimedOut(_)
        )
    }
}

/// Runs one message to its end.
pub(crate) async fn handle(shared: Arc<Shared>, dispatch: Dispatch) {
    let _in_flight = metrics::InFlight::new();
    let Dispatch {
        lane,
        message,
        mut slot,
        order,
        cohort,
        job_phase,
        batch,
    } = dispatch;
    let id = message.id.clone();
    let mut keeper = Keeper::new(
        shared.lanes[lane].settle.clone(),
        &message,
        shared.settings.visibility,
    );
    let mut action = None;
    let mut guard = None;
    if let Some(after) = order.after {
        let stop = shared.stop_receiving.clone();
        let leaving = shared.leaving();
        let turn = keeper
            .keep_while(async {
                tokio::select! {
                    biased;
                    r = after => r.ok(),
                    () = stop.cancelled() => None,
                    () = leaving => None,
                }
            })
            .await;
        match turn {
            Some(s) => slot = Some(s),
            None if !keeper.is_lost() => {
                // The message before it in its group was not done (or the worker is
                // stopping): it must come first, so this one goes back unworked (SQS
                // delivers no message of a group while one of the group is in flight).
                tracing::info!(message_id = %id, "{id} - Not started: an earlier message of its group is not done; handing it back");
                action = Some(Action::HandBack);
            }
            None => {}
        }
    }
    let mut before = order.before;
    let mut batch = batch;
    if let Some(s) = slot
        .as_mut()
        .filter(|_| action.is_none() && !keeper.is_lost())
    {
        if shared.stop_receiving.is_cancelled() || shared.is_leaving() {
            // A long poll that was on its way at SIGTERM or when the task started to
            // leave its service: its messages go straight back.
            tracing::info!(message_id = %id, "{id} - Received while stopping; handing it back");
            action = Some(Action::HandBack);
        } else {
            let ended;
            (ended, guard) = run(
                &shared,
                lane,
                &mut keeper,
                &message,
                s,
                batch.take(),
                before.is_some(),
            )
            .await;
            if let Some(ended) = ended {
                action = decide(&shared, &message, &keeper, ended);
            }
        }
    }
    drop(job_phase);
    // A message that did not join its batch (handed back unworked) leaves it now, so
    // the batch need not wait for this one's settle.
    drop(batch);
    // Done: the group moves on now, on this slot, while this delete is batched.
    if action == Some(Action::Delete)
        && let Some(next) = before.take()
        && let Some(s) = slot.take()
    {
        // The next message may have gone (the worker is stopping): the slot then
        // goes with this one's settle.
        slot = next.send(s).err();
    }
    drop(before);
    if let Some(action) = action {
        settle(
            &shared,
            lane,
            &mut keeper,
            &message,
            action,
            &mut guard,
            &cohort,
        )
        .await;
    }
    // Settled (or given up): the slot and the protection hold go last.
    drop(guard);
    drop(slot);
}

/// The job as the handler sees it.
fn job_of(shared: &Shared, lane: usize, message: &Message, keeper: &Keeper, attempt: u32) -> Job {
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
    let mut job = Job::new(message.id.clone(), body).with_visibility(keeper.visibility());
    job.attributes = attributes;
    job.receive_count = message.receive_count;
    job.attempt = attempt;
    job.sent_at = message.sent_at;
    job.first_received_at = message.first_received_at;
    job.trace_header.clone_from(&message.trace_header);
    job.source = source;
    job.sns_message_id = sns_message_id;
    job.group_id.clone_from(&message.group_id);
    job.deduplication_id.clone_from(&message.deduplication_id);
    job.lost = keeper.lost.clone();
    job.shutdown = shared.shutdown.clone();
    job
}

/// Takes a slot and protection, then works the job (again, in place, while it fails
/// and later messages of its FIFO group wait). Returns how it ended (none when it
/// did not start, or the message is no longer held; then the action is in the log)
/// and the guard to keep until the message is settled.
async fn run(
    shared: &Shared,
    lane: usize,
    keeper: &mut Keeper,
    message: &Message,
    slot: &mut Slot,
    mut batch: Option<crate::batch::Member>,
    followers: bool,
) -> (Option<Ended>, Option<ProtectionGuard>) {
    let id = &message.id;
    if !slot.can_run() {
        let stop = shared.stop_receiving.clone();
        let leaving = shared.leaving();
        let waited = keeper
            .keep_while(async {
                tokio::select! {
                    biased;
                    () = stop.cancelled() => false,
                    () = leaving => false,
                    () = slot.run() => true,
                }
            })
            .await;
        if !waited {
            return (hand_back_unstarted(shared, keeper, id), None);
        }
    }
    let guard = match protect(shared, keeper, id).await {
        Ok(guard) => guard,
        Err(ended) => {
            if let Some(b) = batch.take() {
                b.withdraw();
            }
            return (ended, None);
        }
    };
    let mut attempt = 1;
    let mut retry = Backoff::new(FIFO_RETRY_BASE, FIFO_RETRY_BASE * 8);
    loop {
        let job = job_of(shared, lane, message, keeper, attempt);
        tracing::info!(message_id = %id, source = %job.source, "{id} - Started ({})", job.source);
        ::metrics::histogram!(metrics::RECEIVE_TO_START)
            .record(metrics::ms(message.received_at.elapsed()));
        let started = Instant::now();
        let ended = match batch.take() {
            Some(member) => {
                let abandon = shared.abandon.clone();
                keeper
                    .keep_while(async {
                        tokio::select! {
                            e = member.work(job) => Some(e),
                            () = abandon.cancelled() => None,
                        }
                    })
                    .await
            }
            None => {
                let BoxedHandler::Each(handler) = &shared.handler else {
                    unreachable!("a batch handler's jobs come with a batch member");
                };
                work(shared, keeper, handler(job)).await
            }
        };
        let Some(ended) = ended else {
            tracing::warn!(
                message_id = %id,
                "{id} - Still working at the end of the shutdown grace period; handing it back"
            );
            return (
                Some(Ended::Verdict(Verdict::RetryAfter(Duration::ZERO))),
                Some(guard),
            );
        };
        ::metrics::histogram!(metrics::JOB_DURATION).record(metrics::ms(started.elapsed()));
        if keeper.is_lost() {
            tracing::warn!(
                message_id = %id,
                "{id} - Stopped: the message is no longer held; neither deleted nor handed back"
            );
            return (None, Some(guard));
        }
        let retry_in_place = followers
            && ended.may_pass()
            && attempt < FIFO_ATTEMPTS
            && !shared.stop_receiving.is_cancelled()
            && !shared.is_leaving();
        if !retry_in_place {
            return (Some(ended), Some(guard));
        }
        let wait = retry.next_delay();
        attempt += 1;
        shared.stats.failed.fetch_add(1, Ordering::Relaxed);
        metrics::count(metrics::JOBS_FAILED);
        tracing::warn!(
            message_id = %id,
            "{id} - Failed: {}; running it again in {:.1}s (run {attempt} of {FIFO_ATTEMPTS}), so that the later messages of its group keep their receive count",
            why(&ended),
            wait.as_secs_f64()
        );
        let abandon = shared.abandon.clone();
        let stop = shared.stop_receiving.clone();
        let waited = keeper
            .keep_while(async {
                tokio::select! {
                    () = tokio::time::sleep(wait) => true,
                    () = abandon.cancelled() => false,
                    () = stop.cancelled() => false,
                }
            })
            .await;
        if !waited || keeper.is_lost() {
            return (Some(ended), Some(guard));
        }
    }
}

/// Runs one job on its own task, under the job timeout and the grace period. `None`
/// when the grace period ended first.
async fn work(
    shared: &Shared,
    keeper: &mut Keeper,
    job: crate::handler::BoxFuture<Verdict>,
) -> Option<Ended> {
    // The job runs on its own task: it makes progress while the keeper works, a panic
    // in it is caught (and the message retried), and the grace period's end or the job
    // timeout can abort it.
    let mut task = tokio::spawn(job);
    let abandon = shared.abandon.clone();
    let timeout = shared.settings.job_timeout;
    let ended = keeper
        .keep_while(async {
            tokio::select! {
                r = &mut task => Some(match r {
                    Ok(v) => Ended::Verdict(v),
                    Err(e) => Ended::Panicked(panic_message(e)),
                }),
                () = sleep_opt(timeout) => Some(Ended::TimedOut(timeout.unwrap_or_default())),
                () = abandon.cancelled() => None,
            }
        })
        .await;
    if !matches!(ended, Some(Ended::Verdict(_) | Ended::Panicked(_))) {
        task.abort();
    }
    ended
}

async fn sleep_opt(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// What a join error says, in one line.
pub(crate) fn panic_message(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return format!("the job's task ended: {e}");
    }
    let payload = e.into_panic();
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned());
    format!("the job panicked: {}", text.replace('\n', " "))
}

fn why(ended: &Ended) -> String {
    match ended {
        Ended::Verdict(Verdict::Failed(why) | Verdict::BadInput(why)) => why.clone(),
        Ended::Verdict(v) => format!("{v:?}"),
        Ended::Panicked(why) => why.clone(),
        Ended::TimedOut(after) => format!(
            "timed out after {}s (JOB_TIMEOUT_SECONDS); the job was stopped",
            after.as_secs()
        ),
        Ended::Skipped => "an earlier message of its group failed".to_owned(),
    }
}

/// What follows the job's end: log it and choose the settle.
fn decide(shared: &Shared, message: &Message, keeper: &Keeper, ended: Ended) -> Option<Action> {
    let id = &message.id;
    Some(match ended {
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
    })
}

/// A message that waited and will not start: handed back, unless it is lost.
fn hand_back_unstarted(shared: &Shared, keeper: &Keeper, id: &str) -> Option<Ended> {
    if keeper.is_lost() {
        tracing::warn!(message_id = %id, "{id} - Not started: the message is no longer held");
        return None;
    }
    let why = if shared.is_leaving() {
        "the task is leaving its service"
    } else {
        "the worker is stopping"
    };
    tracing::info!(message_id = %id, "{id} - Not started: {why}; handing it back");
    Some(Ended::Verdict(Verdict::RetryAfter(Duration::ZERO)))
}

/// Counts a message as waiting for protection while it lives; the receive loops take
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
/// for as long as protection takes; only a refusal (the task is being replaced), the
/// task leaving its service, or the worker stopping hands it back.
async fn protect(
    shared: &Shared,
    keeper: &mut Keeper,
    id: &str,
) -> Result<ProtectionGuard, Option<Ended>> {
    let _waiting = Waiting::new(&shared.awaiting_protection);
    // Held across attempts, so protection stays wanted between two acquires.
    let _wanted = shared.protection.hold();
    let started = Instant::now();
    loop {
        let stop = shared.stop_receiving.clone();
        let leaving = shared.leaving();
        let acquired = keeper
            .keep_while(async {
                tokio::select! {
                    biased;
                    () = stop.cancelled() => None,
                    () = leaving => None,
                    r = shared.protection.acquire() => Some(r),
                }
            })
            .await;
        if keeper.is_lost() {
            tracing::warn!(message_id = %id, "{id} - Not started: the message is no longer held");
            return Err(None);
        }
        match acquired {
            None => return Err(hand_back_unstarted(shared, keeper, id)),
            Some(Ok(guard)) => return Ok(guard),
            Some(Err(AcquireError::Rejected(r))) => {
                tracing::warn!(message_id = %id, "{id} - Not started: task protection refused ({r}); handing it back");
                shared.refuse(r);
                return Err(Some(Ended::Verdict(Verdict::RetryAfter(Duration::ZERO))));
            }
            Some(Err(AcquireError::ShutDown)) => {
                return Err(Some(Ended::Verdict(Verdict::RetryAfter(Duration::ZERO))));
            }
            Some(Err(AcquireError::Draining)) => {
                return Err(hand_back_unstarted(shared, keeper, id));
            }
            Some(Err(e)) => {
                if shared.is_leaving() {
                    return Err(hand_back_unstarted(shared, keeper, id));
                }
                tracing::warn!(
                    message_id = %id,
                    "{id} - Still waiting for task protection after {}s ({}); keeping the message, receiving no more until protection works",
                    started.elapsed().as_secs(),
                    task_protection::ErrorChain(&e)
                );
            }
        }
    }
}

/// Deletes the message or sets its visibility, trying again while that may work.
///
/// During a delete the heartbeat goes on, even between tries, so a failing delete
/// never lets the message lapse and its job run again elsewhere. A visibility change
/// stops the heartbeat and is sent at once, even with an extension on its way: if
/// that extension may have landed after it, the change is sent again. The protection `guard` is dropped [`PROTECTED_SETTLE`] after
/// the first try, to the second, however the tries go.
async fn settle(
    shared: &Shared,
    lane: usize,
    keeper: &mut Keeper,
    message: &Message,
    action: Action,
    guard: &mut Option<ProtectionGuard>,
    cohort: &TaskTracker,
) {
    let id = &message.id;
    let what = if action == Action::Delete {
        "Delete"
    } else {
        "Hand-back"
    };
    let protect_until = Instant::now() + PROTECTED_SETTLE;
    let call = match action {
        Action::Delete => Call::Delete,
        a => Call::Visibility {
            secs: visibility_secs(a),
            extension: false,
        },
    };
    let mut extension = if action == Action::Delete {
        None
    } else {
        keeper.take_in_flight()
    };
    let mut backoff = Backoff::sqs();
    let mut tries = 0u32;
    let mut reported = false;
    loop {
        if keeper.is_lost() {
            tracing::warn!(message_id = %id, "{id} - {what} not sent: the message is no longer held");
            return;
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
            tracing::warn!(
                message_id = %id,
                "{id} - {what} failed ({error}), {then}; SQS delivers it again once its visibility timeout passes"
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
            tracing::warn!(
                message_id = %id,
                "{id} - {what} {state} ({error}); keeping the message and trying again"
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
    if action == Action::Delete {
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
        Action::RetryAfter(d) => {
            tracing::info!(message_id = %id, "{id} - Visible again in {}s", d.as_secs());
        }
    }
}
