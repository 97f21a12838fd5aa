//! Dispatching a receive: each message on its own task, from its receipt until it
//! is settled. On a FIFO queue the messages of one group in one receive form a
//! *chain*: they run one after the other on one slot, each as soon as the job before
//! it is done.
//!
//! Each message has its own task, so nothing one message waits for (a slot, ECS, a
//! slow or failing SQS call, its job) holds back another. The task keeps the
//! message's visibility extended the whole time ([`Keeper`]), including while it
//! waits and while its delete is retried, so SQS never delivers it to another worker
//! meanwhile; the job is [`run`](crate::run), then the message is
//! [`settle`](crate::settle)d.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::backoff::redelivery_delay;
use crate::context::Shared;
use crate::dead_letter;
use crate::handler::BoxedHandler;
use crate::heartbeat::Keeper;
use crate::metrics;
use crate::queue::{Message, RedrivePolicy};
use crate::run::{Turn, run};
use crate::settle::{Action, decide, settle};
use crate::shares::Slot;

/// Where a message of a FIFO queue stands in its chain.
#[derive(Debug, Default)]
pub(crate) struct Order {
    /// The message before it: it sends the chain's turn when its job is done (or it
    /// went to the dead-letter queue), or nothing (a dropped sender) when it was not,
    /// so this one goes back unworked.
    pub(crate) after: Option<oneshot::Receiver<Turn>>,
    /// The message after it.
    pub(crate) before: Option<oneshot::Sender<Turn>>,
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

/// Starts a task for each message of a receive; returns the count of its chains not
/// yet settled.
///
/// On a FIFO queue with a handler of one job at a time, the messages of one group in
/// the batch form a chain: they run one after the other on one slot, so the slots
/// left over go to other groups at once. A batch handler gets the whole batch in
/// order instead, each message on its own slot.
pub(crate) fn dispatch(
    shared: &Arc<Shared>,
    lane: usize,
    batch: Vec<Message>,
    messages: &TaskTracker,
) -> Arc<AtomicUsize> {
    let fifo = shared.lanes[lane].queue.is_fifo();
    let unsettled = Arc::new(AtomicUsize::new(0));
    let cohort = TaskTracker::new();
    let mut members = match &shared.handler {
        BoxedHandler::Batch(h) => crate::batch::start(
            Arc::clone(h),
            batch.len(),
            crate::batch::Limits {
                timeout: shared.settings.job_timeout,
                abandon: shared.abandon.clone(),
                fifo,
            },
        )
        .into_iter()
        .map(Some)
        .collect(),
        BoxedHandler::Each(_) => Vec::new(),
    };
    let chains = fifo && members.is_empty();
    let mut last_of_group: HashMap<String, usize> = HashMap::new();
    let mut orders: Vec<Order> = Vec::new();
    for (i, message) in batch.iter().enumerate() {
        let mut order = Order::default();
        if chains
            && let Some(group) = &message.group_id
            && let Some(prev) = last_of_group.insert(group.clone(), i)
        {
            let (tx, rx) = oneshot::channel::<Turn>();
            orders[prev].before = Some(tx);
            order.after = Some(rx);
        }
        orders.push(order);
    }
    for (i, (message, order)) in batch.into_iter().zip(orders).enumerate() {
        // A message waiting for its group's turn gets the chain's slot then.
        let slot = order
            .after
            .is_none()
            .then(|| shared.shares.slot(lane, &unsettled));
        shared
            .stats
            .received
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        crate::metrics::count(crate::metrics::JOBS_RECEIVED);
        let id = &message.id;
        tracing::info!(message_id = %id, receive_count = message.receive_count, "{id} - Received");
        let job_phase = (shared.jobs.token(), cohort.token());
        messages.spawn(handle(
            Arc::clone(shared),
            Dispatch {
                lane,
                message,
                slot,
                order,
                cohort: cohort.clone(),
                job_phase,
                batch: members.get_mut(i).and_then(Option::take),
            },
        ));
    }
    unsettled
}

/// Runs one message to its end: its turn, its job, its settle.
///
/// A message after others of its group waits for the one before it as long as that
/// one may still finish: through the shutdown grace period and while the task leaves
/// its service, since no other worker could take it before its group's earlier
/// messages are done anyway, and handing it back would cost it a receive.
pub(crate) async fn handle(shared: Arc<Shared>, dispatch: Dispatch) {
    let _in_flight = metrics::InFlight::new();
    let Dispatch {
        lane,
        message,
        slot,
        order,
        cohort,
        job_phase,
        batch,
    } = dispatch;
    let id = message.id.clone();
    let mut keeper = Keeper::new(
        shared.lanes[lane].settle.clone(),
        shared.lanes[lane].queue.url(),
        &message,
        shared.settings.visibility,
    );
    let mut action = None;
    let first = order.after.is_none();
    let mut turn = match order.after {
        None => slot.map(Turn::first),
        Some(after) => {
            let lost = keeper.lost.clone();
            let turn = keeper
                .keep_while(async {
                    tokio::select! {
                        biased;
                        r = after => r.ok(),
                        () = lost.cancelled() => None,
                    }
                })
                .await;
            if turn.is_none() && !keeper.is_lost() {
                // The message before it in its group was not done: it must come
                // first, so this one goes back unworked (SQS delivers no message of a
                // group while one of the group is in flight).
                tracing::info!(message_id = %id, "{id} - Not started: an earlier message of its group is not done; handing it back");
                action = Some(Action::HandBack);
            }
            turn
        }
    };
    let mut before = order.before;
    let mut batch = batch;
    let mut poison = None;
    if let Some(t) = turn
        .as_mut()
        .filter(|_| action.is_none() && !keeper.is_lost())
    {
        if first && (shared.stop_receiving.is_cancelled() || shared.is_leaving()) {
            // A long poll that was on its way at SIGTERM or when the task started to
            // leave its service: its messages go straight back.
            tracing::info!(message_id = %id, "{id} - Received while stopping; handing it back");
            action = Some(Action::HandBack);
        } else {
            let ran = run(
                &shared,
                lane,
                &mut keeper,
                &message,
                t,
                batch.take(),
                before.is_some(),
            )
            .await;
            if let Some(ran) = ran {
                poison = ran.poison;
                action = Some(decide(
                    &shared,
                    &message,
                    &keeper,
                    ran.ended,
                    poison.is_some(),
                ));
            }
        }
    }
    drop(job_phase);
    // A message that did not join its batch (handed back unworked) leaves it now, so
    // the batch need not wait for this one's settle.
    drop(batch);
    if action == Some(Action::DeadLetter)
        && let Some(policy) = poison
    {
        action = Some(move_to_dead_letters(&shared, lane, &mut keeper, &message, &policy).await);
    }
    let (mut slot, mut guard) = turn.map_or((None, None), |t| (Some(t.slot), t.guard));
    // Done (or moved): the group moves on now, on this slot and with a hold of this
    // protection, while this delete is batched.
    if matches!(action, Some(Action::Delete | Action::Moved))
        && let Some(next) = before.take()
        && let Some(s) = slot.take()
    {
        let passed = Turn {
            slot: s,
            guard: guard.as_ref().map(|_| shared.protection.hold()),
        };
        // The next message may have gone (the worker is stopping): the slot then
        // goes with this one's settle.
        slot = next.send(passed).err().map(|back| back.slot);
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

/// Moves a message that has used up its tries to the dead-letter queue: a copy sent
/// there first, then (by the settle) its delete. If the copy cannot be sent, it goes
/// back as SQS would have it, with the rest of its group.
async fn move_to_dead_letters(
    shared: &Shared,
    lane: usize,
    keeper: &mut Keeper,
    message: &Message,
    policy: &RedrivePolicy,
) -> Action {
    let id = &message.id;
    let queue = &shared.lanes[lane].queue;
    match keeper
        .keep_while(dead_letter::send_copy(queue, message, policy))
        .await
    {
        Ok(url) => {
            tracing::warn!(
                message_id = %id,
                receive_count = message.receive_count,
                "{id} - Moved to the dead-letter queue {url} alone, its tries used up (maxReceiveCount {}); the later messages of its group go on",
                policy.max_receive_count
            );
            Action::Moved
        }
        Err(e) => {
            let delay = keeper.retry_after(redelivery_delay(message.receive_count));
            tracing::error!(
                message_id = %id,
                "{id} - Not moved to the dead-letter queue ({e}): it goes back as SQS would have it, visible again in {}s, with the later messages of its group",
                delay.as_secs()
            );
            Action::RetryAfter(delay)
        }
    }
}
