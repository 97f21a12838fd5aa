//! The worker loop: receive for each queue while its share of the slots allows,
//! hand each message to its own task ([`in_flight`](crate::in_flight)), leave the
//! service when it no longer wants this task, and drain on shutdown.
//!
//! The task polls SQS unprotected. A received job takes a protection guard before it
//! starts and keeps it until its message is deleted or handed back, so an idle worker
//! makes no protection calls and ECS can scale it in, while a busy one is protected
//! exactly while it holds work. Concurrency is shared between the queues by
//! [`shares`](crate::shares): a poll holds no slot while it waits, and asks for no
//! more messages than its queue's share leaves room for (at most ten, SQS's limit).
//! Once a slot is free, a receive waits up to [`RECEIVE_GATHER`] for the rest of the
//! previous receive's messages to be settled, so jobs that end together are followed
//! by one receive for all of them. While a message waits for protection, no more are
//! received.
//!
//! Leaving the service ([`Worker::with_membership`]): no new poll starts (one on its
//! way is let finish, and its messages are handed straight back), running jobs finish
//! and are settled, and the protection library releases protection once the last one
//! is gone. Wanted again, the worker receives again.
//!
//! Shutdown has a fixed budget, whatever SQS and ECS do: after the first signal no
//! new poll starts (one already on its way is let finish and its messages handed
//! straight back); running jobs get the grace period, which a second signal ends at
//! once; then the last deletes and hand-backs get [`SETTLE_BUDGET`].

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use task_protection::cli::Signal;
use task_protection::drain::Membership;
use task_protection::{Rejection, TaskProtection};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::Backoff;
use crate::config::WorkerSettings;
use crate::handler::{BatchHandler, BoxedHandler, Handler};
use crate::health::Health;
use crate::in_flight::{self, Dispatch, Order};
use crate::queue::{ErrorKind, Message, Queue, SqsError};
use crate::settle::{SettleQueue, Settler};
use crate::shares::Shares;
use crate::stats::Stats;

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
/// How long the last settle calls may take once every job has ended or been
/// abandoned.
pub const SETTLE_BUDGET: Duration = Duration::from_secs(3);
/// Receives in a row that fail in a way retrying cannot fix (the queue does not
/// exist, the role may not receive, no or unknown credentials) before the worker
/// exits, so ECS restarts the task and a deployment's circuit breaker sees it.
pub const PERMANENT_RECEIVE_TRIES: u32 = 5;

/// Why the worker stopped.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A signal asked it to.
    Stopped(Signal),
    /// ECS refused protection: the task is being replaced, so the worker took no new
    /// work, finished what it had, and stopped.
    ProtectionRefused(Rejection),
    /// Receiving failed [`PERMANENT_RECEIVE_TRIES`] times in a row in a way retrying
    /// cannot fix.
    ReceiveFailed(SqsError),
}

/// What the receive loop does after a receive: the decision, apart from the calls.
#[derive(Debug, PartialEq)]
pub enum AfterReceive {
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
pub struct ReceivePolicy {
    backoff: Backoff,
    short_poll: bool,
    permanent_failures: u32,
}

impl ReceivePolicy {
    /// The policy for a worker whose long poll waits `wait`.
    #[must_use]
    pub fn new(wait: Duration) -> Self {
        Self {
            backoff: Backoff::sqs(),
            short_poll: wait.is_zero(),
            permanent_failures: 0,
        }
    }

    /// What to do after `result`.
    pub fn after(&mut self, result: Result<Vec<Message>, SqsError>) -> AfterReceive {
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

/// An SQS worker with task protection.
#[derive(Debug)]
pub struct Worker {
    queues: Vec<(Option<String>, Queue)>,
    protection: TaskProtection,
    settings: WorkerSettings,
    handler: BoxedHandler,
    membership: Option<watch::Receiver<Membership>>,
    health: Arc<Health>,
}

/// One queue the worker works, and the batcher of its calls.
#[derive(Debug)]
pub(crate) struct Lane {
    pub(crate) queue: Queue,
    /// Its name in `COPILOT_TOPIC_QUEUE_URIS`; `None` for `COPILOT_QUEUE_URI`.
    pub(crate) name: Option<String>,
    pub(crate) settle: SettleQueue,
}

/// What every message task shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) lanes: Vec<Lane>,
    pub(crate) handler: BoxedHandler,
    pub(crate) protection: TaskProtection,
    pub(crate) settings: WorkerSettings,
    /// No new receives and no new jobs: on a signal, a refusal, or a fatal receive.
    pub(crate) stop_receiving: CancellationToken,
    /// A signal came: the handlers' [`Job::shutdown`](crate::Job::shutdown).
    pub(crate) shutdown: CancellationToken,
    /// The grace period is over: hand back running jobs.
    pub(crate) abandon: CancellationToken,
    /// The settle budget is over: stop every SQS call and retry.
    pub(crate) give_up: CancellationToken,
    /// The task is leaving its service: no new receives and no new jobs, until it is
    /// wanted again.
    pub(crate) leaving: watch::Sender<bool>,
    /// Messages waiting for protection; the receive loops wait while there are any.
    pub(crate) awaiting_protection: watch::Sender<usize>,
    /// How the queues share the slots.
    pub(crate) shares: Arc<Shares>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) health: Arc<Health>,
    /// Running jobs, for the drain.
    jobs: TaskTracker,
    refusal: Mutex<Option<Rejection>>,
    /// Whether the worker follows its service's membership (the drain watcher is
    /// on): then a refusal is no sign that this task goes, only that it may not take
    /// work now.
    follows_membership: bool,
    /// Until when the receive loops wait after a refusal that did not end the worker.
    pub(crate) refused_until: watch::Sender<Option<Instant>>,
    fatal: Mutex<Option<SqsError>>,
    /// Cancelled when the receive loops have ended.
    receiving_ended: CancellationToken,
}

impl Shared {
    /// ECS refused protection. Without a membership to follow the task is being
    /// replaced: the worker takes no more work and ends. Following one, a refusal
    /// (`DEPLOYMENT_BLOCKED` while a deployment's old tasks still hold protection) is
    /// no sign that this task goes, and the drain watcher says when it does: the
    /// worker receives nothing for the protection's check interval, the cool-down
    /// during which ECS is not asked again, then receives again.
    pub(crate) fn refuse(&self, rejection: Rejection) {
        if self.follows_membership {
            let pause = self.protection.settings().check_interval();
            let now = Instant::now();
            let paused = self.refused_until.send_if_modified(|until| {
                let fresh = until.is_none_or(|t| t <= now);
                if fresh {
                    *until = Some(now + pause);
                }
                fresh
            });
            if paused {
                tracing::warn!(
                    "Task protection refused ({rejection}) while the service still wants this task; receiving again in {}s",
                    pause.as_secs_f64()
                );
            }
            return;
        }
        self.refusal
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(rejection);
        self.stop_receiving.cancel();
    }

    fn refusal(&self) -> Option<Rejection> {
        self.refusal
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether the task is leaving its service now.
    pub(crate) fn is_leaving(&self) -> bool {
        *self.leaving.borrow()
    }

    /// Resolves once the task is leaving its service (at once if it is).
    pub(crate) fn leaving(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.leaving.subscribe();
        async move {
            if rx.wait_for(|leaving| *leaving).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// The next signal; never resolves once no more can come.
async fn next_signal(signals: &mut mpsc::UnboundedReceiver<Signal>) -> Signal {
    match signals.recv().await {
        Some(s) => s,
        None => std::future::pending().await,
    }
}

impl Worker {
    /// A worker on `queue` running `handler` for each message, protecting its task
    /// through `protection`.
    #[must_use]
    pub fn new(
        queue: Queue,
        protection: TaskProtection,
        settings: WorkerSettings,
        handler: impl Handler,
    ) -> Self {
        Self::with_handler(queue, protection, settings, BoxedHandler::each(handler))
    }

    /// A worker on `queue` running `handler` once for the messages of each receive
    /// (up to ten), protecting its task through `protection`.
    #[must_use]
    pub fn batched(
        queue: Queue,
        protection: TaskProtection,
        settings: WorkerSettings,
        handler: impl BatchHandler,
    ) -> Self {
        Self::with_handler(queue, protection, settings, BoxedHandler::batch(handler))
    }

    fn with_handler(
        queue: Queue,
        protection: TaskProtection,
        settings: WorkerSettings,
        handler: BoxedHandler,
    ) -> Self {
        Self {
            queues: vec![(None, queue)],
            protection,
            health: Arc::new(Health::new(settings.unhealthy_after)),
            settings,
            handler,
            membership: None,
        }
    }

    /// Works `queue` as well, a topic-specific queue called `name`. All queues share
    /// the worker's slots, by the weights in [`WorkerSettings::weights`]; each has its
    /// own long poll, which holds no slot while it waits.
    #[must_use]
    pub fn with_queue(mut self, name: impl Into<String>, queue: Queue) -> Self {
        self.queues.push((Some(name.into()), queue));
        self
    }

    /// Follows whether the service still wants this task. While `membership` says
    /// [`Membership::Leaving`], the worker takes no new work: it drains protection
    /// ([`TaskProtection::drain`]), starts no new receive (the messages of a poll
    /// already on its way go straight back), and lets running jobs finish and be
    /// settled; protection is released once the last one is gone. Wanted again, it
    /// undrains and receives again.
    ///
    /// A worker that follows a membership does not end when ECS refuses protection:
    /// the membership says when the task goes. It hands the message back and
    /// receives nothing for the protection's check interval, then goes on.
    #[must_use]
    pub fn with_membership(mut self, membership: watch::Receiver<Membership>) -> Self {
        self.membership = Some(membership);
        self
    }

    /// What `/healthz` reports for this worker: whether receiving works.
    #[must_use]
    pub fn health(&self) -> Arc<Health> {
        Arc::clone(&self.health)
    }

    /// Works the queue until a signal arrives on `signals`, ECS refuses protection or
    /// receiving fails for good, then drains: running jobs get the grace period (a
    /// second signal ends it), and every message received is deleted after success or
    /// made visible again, within [`SETTLE_BUDGET`].
    ///
    /// A panic in a handler is logged as one error event (one line in JSON logs).
    ///
    /// It does not release protection; the caller shuts [`TaskProtection`] down.
    pub async fn run(self, mut signals: mpsc::UnboundedReceiver<Signal>) -> Outcome {
        crate::metrics::describe();
        crate::panics::log_as_events();
        let mut lanes = Vec::new();
        let mut settlers = Vec::new();
        let mut weights = Vec::new();
        for (name, queue) in self.queues {
            let (settler, settle) = Settler::new(queue.clone());
            settlers.push(tokio::spawn(settler.run()));
            weights.push(self.settings.weight(name.as_deref()));
            self.health.watch(queue.url());
            lanes.push(Lane {
                queue,
                name,
                settle,
            });
        }
        let stats = Arc::new(Stats::default());
        let grace = self.settings.shutdown_grace;
        let shares = Shares::new(self.settings.concurrency, &weights);
        let jobs = TaskTracker::new();
        let shared = Arc::new(Shared {
            lanes,
            handler: self.handler,
            protection: self.protection,
            settings: self.settings,
            stop_receiving: CancellationToken::new(),
            shutdown: CancellationToken::new(),
            abandon: CancellationToken::new(),
            give_up: CancellationToken::new(),
            leaving: watch::Sender::new(false),
            awaiting_protection: watch::Sender::new(0),
            shares,
            stats: Arc::clone(&stats),
            health: self.health,
            jobs: jobs.clone(),
            refusal: Mutex::new(None),
            follows_membership: self.membership.is_some(),
            refused_until: watch::Sender::new(None),
            fatal: Mutex::new(None),
            receiving_ended: CancellationToken::new(),
        });
        if let Some(membership) = self.membership {
            tokio::spawn(follow_membership(Arc::clone(&shared), membership));
        }
        let messages = TaskTracker::new();
        let loops = TaskTracker::new();
        for lane in 0..shared.lanes.len() {
            loops.spawn(receive_loop(Arc::clone(&shared), lane, messages.clone()));
        }
        loops.close();
        {
            let ended = shared.receiving_ended.clone();
            tokio::spawn(async move {
                loops.wait().await;
                ended.cancel();
            });
        }

        let mut signal = tokio::select! {
            s = next_signal(&mut signals) => Some(s),
            () = shared.receiving_ended.cancelled() => None,
        };
        if signal.is_some() {
            shared.shutdown.cancel();
        }
        shared.stop_receiving.cancel();
        jobs.close();
        messages.close();
        let fatal = shared
            .fatal
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(e) = &fatal {
            tracing::error!(
                "Receiving messages failed {PERMANENT_RECEIVE_TRIES} times in a row ({e}); finishing {} running job(s), then exiting",
                jobs.len()
            );
        } else if signal.is_none() {
            let why = shared
                .refusal()
                .map_or_else(String::new, |r| format!(" ({r})"));
            tracing::warn!(
                "Task protection refused{why}: this task is being replaced. Taking no new work; finishing {} running job(s)",
                jobs.len()
            );
            tokio::select! {
                () = jobs.wait() => {}
                s = next_signal(&mut signals) => {
                    shared.shutdown.cancel();
                    signal = Some(s);
                }
            }
        }
        if let Some(s) = signal {
            tracing::info!(
                "Received {} signal, will quit when all work is done",
                s.name()
            );
        }
        if signal.is_some() || fatal.is_some() {
            let deadline = Instant::now() + grace;
            let drained = async {
                shared.receiving_ended.cancelled().await;
                jobs.wait().await;
            };
            tokio::select! {
                () = drained => {}
                () = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(
                        "The shutdown grace period of {}s is over; handing back {} running job(s)",
                        grace.as_secs(),
                        jobs.len()
                    );
                }
                s = next_signal(&mut signals) => {
                    tracing::warn!(
                        "Received a second {} signal: ending the grace period now; handing back {} running job(s)",
                        s.name(),
                        jobs.len()
                    );
                }
            }
            shared.abandon.cancel();
        }
        tokio::select! {
            r = tokio::time::timeout(SETTLE_BUDGET, messages.wait()) => {
                if r.is_err() {
                    tracing::warn!(
                        "The last deletes and hand-backs took more than {}s; leaving {} message(s) to SQS's visibility timeout",
                        SETTLE_BUDGET.as_secs(),
                        messages.len()
                    );
                }
            }
            _ = next_signal(&mut signals) => {}
        }
        shared.give_up.cancel();
        messages.wait().await;
        shared.receiving_ended.cancelled().await;
        let outcome = match (signal, shared.refusal(), fatal) {
            (_, _, Some(e)) => Outcome::ReceiveFailed(e),
            (Some(s), _, None) => Outcome::Stopped(s),
            (None, Some(r), None) => Outcome::ProtectionRefused(r),
            // The receive loop only ends on a refusal, a fatal error or a signal.
            (None, None, None) => Outcome::Stopped(Signal::Term),
        };
        // Every message task has ended; dropping the last sender ends the settlers.
        drop(shared);
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            futures_util::future::join_all(settlers),
        )
        .await;
        tracing::info!("Worker stopped: {stats}");
        outcome
    }
}

/// Leaves the service and comes back as `membership` says.
async fn follow_membership(shared: Arc<Shared>, mut membership: watch::Receiver<Membership>) {
    loop {
        let now = membership.borrow_and_update().clone();
        let leaving = now.is_leaving();
        if leaving != shared.is_leaving() {
            if let Membership::Leaving(reason) = &now {
                tracing::warn!(
                    jobs = shared.jobs.len(),
                    "Leaving the service: {reason}; taking no new work"
                );
                shared.protection.drain();
            } else {
                tracing::info!("Wanted by the service again; receiving");
                shared.protection.undrain();
            }
            shared.leaving.send_replace(leaving);
        }
        tokio::select! {
            r = membership.changed() => if r.is_err() { return },
            () = shared.stop_receiving.cancelled() => return,
        }
    }
}

/// Receives from one queue while its share allows, no message waits for protection
/// and the task is not leaving, until the worker stops receiving; stores a fatal
/// error in `shared` and stops every queue's loop then.
async fn receive_loop(shared: Arc<Shared>, lane: usize, messages: TaskTracker) {
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
        // One on its way when the task starts to leave is let finish.
        let stopped = async {
            shared.stop_receiving.cancelled().await;
            tokio::time::sleep(POLL_DRAIN).await;
        };
        let received = tokio::select! {
            biased;
            () = shared.abandon.cancelled() => return,
            () = stopped => return,
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
                    "Receiving messages failed, retrying in {:.1}s: {e}",
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
                    .get_or_insert(e);
                shared.stop_receiving.cancel();
                return;
            }
        }
    }
}

/// Starts a task for each message of a receive; returns the count of its chains not
/// yet settled.
///
/// On a FIFO queue with a handler of one job at a time, the messages of one group in
/// the batch form a chain: they run one after the other on one slot, so the slots
/// left over go to other groups at once. A batch handler gets the whole batch in
/// order instead, each message on its own slot.
fn dispatch(
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
            let (tx, rx) = oneshot::channel();
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
        messages.spawn(in_flight::handle(
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
