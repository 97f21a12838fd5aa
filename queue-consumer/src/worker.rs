//! The worker loop: receive while there are free slots, hand each message to its own
//! task ([`in_flight`](crate::in_flight)), and drain on shutdown.
//!
//! The task polls SQS unprotected. A received job takes a protection guard before it
//! starts and keeps it until its message is deleted or handed back, so an idle worker
//! makes no protection calls and ECS can scale it in, while a busy one is protected
//! exactly while it holds work. Concurrency is a semaphore of slots: a receive asks for
//! at most the free slots (and at most ten, SQS's limit; it waits [`RECEIVE_GATHER`] for
//! more slots to free up first), and a message holds its slot
//! until it is settled. While a message waits for protection, no more are received.
//!
//! Shutdown has a fixed budget, whatever SQS and ECS do: after the first signal no
//! new poll starts (one already on its way is let finish and its messages handed
//! straight back); running jobs get the grace period, which a second signal ends at
//! once; then the last deletes and hand-backs get [`SETTLE_BUDGET`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use task_protection::cli::Signal;
use task_protection::{Rejection, TaskProtection};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::Backoff;
use crate::config::WorkerSettings;
use crate::handler::{BoxedHandler, Handler};
use crate::in_flight::{self, Order};
use crate::queue::{ErrorKind, MAX_BATCH, Message, Queue, SqsError};
use crate::settle::{SettleQueue, Settler};
use crate::stats::Stats;

/// How long a receive waits for more slots to free up before it asks for fewer
/// messages than a full batch: one `ReceiveMessage` for ten jobs rather than three
/// for three, four and three, at the cost of starting a job up to this much later.
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
}

/// One queue the worker works, and the settler of its messages.
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
    /// The grace period is over: hand back running jobs.
    pub(crate) abandon: CancellationToken,
    /// The settle budget is over: stop every SQS call and retry.
    pub(crate) give_up: CancellationToken,
    /// Messages waiting for protection; the receive loop waits while there are any.
    pub(crate) awaiting_protection: watch::Sender<usize>,
    pub(crate) stats: Arc<Stats>,
    /// Running jobs, for the settler and the drain.
    jobs: TaskTracker,
    refusal: Mutex<Option<Rejection>>,
    fatal: Mutex<Option<SqsError>>,
    /// Cancelled when the receive loop has ended.
    receiving_ended: CancellationToken,
}

impl Shared {
    pub(crate) fn refuse(&self, rejection: Rejection) {
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
        Self {
            queues: vec![(None, queue)],
            protection,
            settings,
            handler: BoxedHandler::new(handler),
        }
    }

    /// Works `queue` as well, a topic-specific queue called `name`. All queues share
    /// the worker's slots; each has its own long poll, and a freed slot goes to the
    /// queue that has waited longest for one, so a flooded queue does not starve
    /// the others.
    #[must_use]
    pub fn with_queue(mut self, name: impl Into<String>, queue: Queue) -> Self {
        self.queues.push((Some(name.into()), queue));
        self
    }

    /// Works the queue until a signal arrives on `signals`, ECS refuses protection or
    /// receiving fails for good, then drains: running jobs get the grace period (a
    /// second signal ends it), and every message received is deleted after success or
    /// made visible again, within [`SETTLE_BUDGET`].
    ///
    /// It does not release protection; the caller shuts [`TaskProtection`] down.
    pub async fn run(self, mut signals: mpsc::UnboundedReceiver<Signal>) -> Outcome {
        crate::metrics::describe();
        let jobs = TaskTracker::new();
        let mut lanes = Vec::new();
        let mut settlers = Vec::new();
        for (name, queue) in self.queues {
            let (settler, settle) = Settler::new(queue.clone(), jobs.clone());
            settlers.push(tokio::spawn(settler.run()));
            lanes.push(Lane {
                queue,
                name,
                settle,
            });
        }
        let stats = Arc::new(Stats::default());
        let grace = self.settings.shutdown_grace;
        let shared = Arc::new(Shared {
            lanes,
            handler: self.handler,
            protection: self.protection,
            settings: self.settings,
            stop_receiving: CancellationToken::new(),
            abandon: CancellationToken::new(),
            give_up: CancellationToken::new(),
            awaiting_protection: watch::Sender::new(0),
            stats: Arc::clone(&stats),
            jobs: jobs.clone(),
            refusal: Mutex::new(None),
            fatal: Mutex::new(None),
            receiving_ended: CancellationToken::new(),
        });
        let messages = TaskTracker::new();
        let slots = Arc::new(Semaphore::new(shared.settings.concurrency.max(1)));
        let loops = TaskTracker::new();
        for lane in 0..shared.lanes.len() {
            loops.spawn(receive_loop(
                Arc::clone(&shared),
                lane,
                Arc::clone(&slots),
                messages.clone(),
            ));
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
                s = next_signal(&mut signals) => signal = Some(s),
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
        // Every message task has ended; dropping the last sender ends the settler.
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

/// Receives from one queue while there are free slots and no message waits for
/// protection, until the worker stops receiving; stores a fatal error in `shared`
/// and stops every queue's loop then.
async fn receive_loop(
    shared: Arc<Shared>,
    lane: usize,
    slots: Arc<Semaphore>,
    messages: TaskTracker,
) {
    let queue = shared.lanes[lane].queue.clone();
    let fifo = queue.is_fifo();
    let mut policy = ReceivePolicy::new(shared.settings.wait);
    let mut awaiting = shared.awaiting_protection.subscribe();
    loop {
        let first = tokio::select! {
            biased;
            () = shared.stop_receiving.cancelled() => break,
            p = Arc::clone(&slots).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let mut permits = vec![first];
        // Slots free in bunches, as a batch of deletes comes back: wait a moment for
        // the rest of a bunch, so one receive asks for all of them.
        let full = shared.settings.concurrency.clamp(1, MAX_BATCH);
        let gather_until = Instant::now() + RECEIVE_GATHER;
        while permits.len() < full {
            if let Ok(p) = Arc::clone(&slots).try_acquire_owned() {
                permits.push(p);
                continue;
            }
            tokio::select! {
                biased;
                () = shared.stop_receiving.cancelled() => break,
                p = Arc::clone(&slots).acquire_owned() => match p {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                },
                () = tokio::time::sleep_until(gather_until) => break,
            }
        }
        // A message waiting for protection could not be worked: take no more.
        let clear = async {
            let _ = awaiting.wait_for(|n| *n == 0).await.is_ok();
        };
        tokio::select! {
            biased;
            () = shared.stop_receiving.cancelled() => break,
            () = clear => {}
        }
        tracing::info!("Long polling for messages");
        // A poll on its way at SIGTERM gets `POLL_DRAIN` to bring its answer: its
        // messages are handed straight back instead of waiting out their visibility.
        let stopped = async {
            shared.stop_receiving.cancelled().await;
            tokio::time::sleep(POLL_DRAIN).await;
        };
        let received = tokio::select! {
            biased;
            () = shared.abandon.cancelled() => break,
            () = stopped => break,
            r = queue.receive(permits.len(), shared.settings.wait, shared.settings.visibility) => r,
        };
        match policy.after(received) {
            AfterReceive::Dispatch(batch) => {
                // On a FIFO queue, the messages of one group in a batch run one after
                // the other, each on the slot of the one before, so the slots left
                // over go to other groups at once.
                let mut last_of_group: HashMap<String, usize> = HashMap::new();
                let mut orders: Vec<Order> = Vec::new();
                for (i, message) in batch.iter().enumerate() {
                    let mut order = Order::default();
                    if fifo
                        && let Some(group) = &message.group_id
                        && let Some(prev) = last_of_group.insert(group.clone(), i)
                    {
                        let (tx, rx) = oneshot::channel();
                        orders[prev].before = Some(tx);
                        order.after = Some(rx);
                    }
                    orders.push(order);
                }
                for (message, order) in batch.into_iter().zip(orders) {
                    let Some(permit) = permits.pop() else {
                        tracing::warn!(
                            "{} - Received more messages than asked for; it comes back after its visibility timeout",
                            message.id
                        );
                        continue;
                    };
                    // A message waiting for its group's turn holds no slot.
                    let permit = if order.after.is_some() {
                        drop(permit);
                        None
                    } else {
                        Some(permit)
                    };
                    shared
                        .stats
                        .received
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    crate::metrics::count(crate::metrics::JOBS_RECEIVED);
                    let id = &message.id;
                    tracing::info!(message_id = %id, receive_count = message.receive_count, "{id} - Received");
                    let token = shared.jobs.token();
                    messages.spawn(in_flight::handle(
                        Arc::clone(&shared),
                        lane,
                        message,
                        permit,
                        order,
                        token,
                    ));
                }
            }
            AfterReceive::Poll => {}
            AfterReceive::Retry(wait, e) => {
                tracing::warn!(
                    "Receiving messages failed, retrying in {:.1}s: {e}",
                    wait.as_secs_f64()
                );
                drop(permits);
                tokio::select! {
                    () = shared.stop_receiving.cancelled() => break,
                    () = tokio::time::sleep(wait) => {}
                }
            }
            AfterReceive::Pause(wait) => {
                drop(permits);
                tokio::select! {
                    () = shared.stop_receiving.cancelled() => break,
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
                break;
            }
        }
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
