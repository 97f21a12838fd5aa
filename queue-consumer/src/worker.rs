//! The worker loop: receive while there are free slots, run each job under task
//! protection, settle its message, and drain on shutdown.
//!
//! The task polls SQS unprotected. A received job takes a protection guard before it
//! starts and keeps it until its message is deleted or handed back, so an idle worker
//! makes no protection calls and ECS can scale it in, while a busy one is protected
//! exactly while it holds work. Concurrency is a semaphore of slots: a receive asks for
//! at most the free slots (and at most ten, SQS's limit), and a message holds its slot
//! until it is settled.

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use task_protection::cli::Signal;
use task_protection::{AcquireError, ProtectionGuard, Rejection, TaskProtection};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::{Backoff, redelivery_delay};
use crate::config::WorkerSettings;
use crate::heartbeat;
use crate::job::{self, Job, JobDuration};
use crate::queue::{MAX_BATCH, Message, Queue};
use crate::settle::{Action, Settlement, Settler};
use crate::stats::Stats;

/// Pause after an empty short poll (`QUEUE_WAIT_SECONDS=0`).
const SHORT_POLL_PAUSE: Duration = Duration::from_secs(1);
/// How long the last settle calls may take once every job has ended.
const SETTLE_BUDGET: Duration = Duration::from_secs(3);

/// Why the worker stopped.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A signal asked it to.
    Stopped(Signal),
    /// ECS refused protection: the task is being replaced, so the worker took no new
    /// work, finished what it had, and stopped.
    ProtectionRefused(Rejection),
}

/// An SQS worker with task protection.
#[derive(Debug)]
pub struct Worker {
    queue: Queue,
    protection: TaskProtection,
    settings: WorkerSettings,
}

#[derive(Debug)]
struct Shared {
    queue: Queue,
    protection: TaskProtection,
    settings: WorkerSettings,
    /// No new receives and no new jobs: on a signal, or when protection is refused.
    stop_receiving: CancellationToken,
    /// The grace period is over: hand back running jobs.
    abandon: CancellationToken,
    refusal: Mutex<Option<Rejection>>,
    unsettled: Arc<AtomicUsize>,
    settle_tx: mpsc::UnboundedSender<Settlement>,
    stats: Arc<Stats>,
}

impl Shared {
    fn settle(&self, settlement: Settlement) {
        // The settler lives until every sender is gone, so this cannot fail.
        let _ = self.settle_tx.send(settlement);
    }

    fn refuse(&self, rejection: Rejection) {
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

impl Worker {
    /// A worker on `queue`, protecting its task through `protection`.
    #[must_use]
    pub fn new(queue: Queue, protection: TaskProtection, settings: WorkerSettings) -> Self {
        Self {
            queue,
            protection,
            settings,
        }
    }

    /// Works the queue until `shutdown` resolves or ECS refuses protection, then
    /// drains: running jobs get the grace period, and every message received is
    /// either deleted after success or made visible again.
    ///
    /// It does not release protection; the caller shuts [`TaskProtection`] down.
    pub async fn run(self, shutdown: impl Future<Output = Signal>) -> Outcome {
        let (settle_tx, settle_rx) = mpsc::unbounded_channel();
        let unsettled = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(Stats::default());
        let give_up = CancellationToken::new();
        let mut settler = tokio::spawn(
            Settler {
                queue: self.queue.clone(),
                rx: settle_rx,
                unsettled: Arc::clone(&unsettled),
                give_up: give_up.clone(),
                stats: Arc::clone(&stats),
            }
            .run(),
        );
        let grace = self.settings.shutdown_grace;
        let shared = Arc::new(Shared {
            queue: self.queue,
            protection: self.protection,
            settings: self.settings,
            stop_receiving: CancellationToken::new(),
            abandon: CancellationToken::new(),
            refusal: Mutex::new(None),
            unsettled,
            settle_tx,
            stats: Arc::clone(&stats),
        });
        let tracker = TaskTracker::new();
        let mut shutdown = pin!(shutdown);

        let mut signal = tokio::select! {
            s = &mut shutdown => Some(s),
            () = receive_loop(&shared, &tracker) => None,
        };
        // Dropping the receive future above aborts a long poll in progress. Should its
        // answer have been on the wire, those messages come back after their
        // visibility timeout, like those of a crashed worker.
        shared.stop_receiving.cancel();
        tracker.close();

        if signal.is_none() {
            let why = shared
                .refusal()
                .map_or_else(String::new, |r| format!(" ({r})"));
            tracing::warn!(
                "Task protection refused{why}: this task is being replaced. Taking no new work; finishing {} running job(s)",
                tracker.len()
            );
            tokio::select! {
                () = tracker.wait() => {}
                s = &mut shutdown => signal = Some(s),
            }
        }
        if let Some(s) = signal {
            tracing::info!(
                "Received {} signal, will quit when all work is done",
                s.name()
            );
            let deadline = Instant::now() + grace;
            tokio::select! {
                () = tracker.wait() => {}
                () = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(
                        "The shutdown grace period of {}s is over; handing back {} running job(s)",
                        grace.as_secs(),
                        tracker.len()
                    );
                    shared.abandon.cancel();
                    tracker.wait().await;
                }
            }
        }
        let outcome = match (signal, shared.refusal()) {
            (None, Some(r)) => Outcome::ProtectionRefused(r),
            (Some(s), _) => Outcome::Stopped(s),
            // The receive loop only ends on a refusal or a signal.
            (None, None) => Outcome::Stopped(Signal::Term),
        };
        // Every job has ended; dropping the last sender lets the settler finish.
        drop(shared);
        if tokio::time::timeout(SETTLE_BUDGET, &mut settler)
            .await
            .is_err()
        {
            give_up.cancel();
            let _ = settler.await;
        }
        tracing::info!("Worker stopped: {stats}");
        outcome
    }
}

async fn receive_loop(shared: &Arc<Shared>, tracker: &TaskTracker) {
    let slots = Arc::new(Semaphore::new(shared.settings.concurrency.max(1)));
    let mut backoff = Backoff::sqs();
    loop {
        let first = tokio::select! {
            biased;
            () = shared.stop_receiving.cancelled() => return,
            p = Arc::clone(&slots).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let mut permits = vec![first];
        while permits.len() < MAX_BATCH {
            match Arc::clone(&slots).try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        tracing::info!("Long polling for messages");
        let received = tokio::select! {
            biased;
            () = shared.stop_receiving.cancelled() => return,
            r = shared.queue.receive(permits.len(), shared.settings.wait, shared.settings.visibility) => r,
        };
        match received {
            Ok(messages) => {
                backoff.reset();
                if messages.is_empty() && shared.settings.wait.is_zero() {
                    // Short polling returns at once on an empty queue: pace it, or the
                    // worker would call SQS in a hot loop.
                    drop(permits);
                    tokio::select! {
                        () = shared.stop_receiving.cancelled() => return,
                        () = tokio::time::sleep(SHORT_POLL_PAUSE) => {}
                    }
                    continue;
                }
                for message in messages {
                    let Some(permit) = permits.pop() else {
                        tracing::warn!(
                            "{} - Received more messages than asked for; it comes back after its visibility timeout",
                            message.id
                        );
                        continue;
                    };
                    dispatch(shared, tracker, message, permit);
                }
            }
            Err(e) => {
                drop(permits);
                let wait = backoff.next_delay();
                tracing::warn!(
                    "Receiving messages failed, retrying in {:.1}s: {e}",
                    wait.as_secs_f64()
                );
                tokio::select! {
                    () = shared.stop_receiving.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// Starts the job of a received message, or rejects its body.
fn dispatch(
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    message: Message,
    permit: OwnedSemaphorePermit,
) {
    shared.unsettled.fetch_add(1, Ordering::SeqCst);
    shared.stats.received.fetch_add(1, Ordering::Relaxed);
    let id = message.id.clone();
    tracing::info!(message_id = %id, receive_count = message.receive_count, "{id} - Received");
    match JobDuration::parse(&message.body, shared.settings.max_job) {
        Err(reason) => {
            // Retrying cannot fix a bad body. Leaving it invisible for longer each time
            // lets the queue's redrive policy move it to the dead-letter queue after
            // `maxReceiveCount` deliveries, without a hot loop meanwhile.
            shared.stats.bad.fetch_add(1, Ordering::Relaxed);
            let delay = redelivery_delay(message.receive_count);
            tracing::error!(
                message_id = %id,
                receive_count = message.receive_count,
                "{id} - Rejected: {reason}; not worked, not deleted, visible again in {}s",
                delay.as_secs()
            );
            shared.settle(Settlement {
                message_id: message.id,
                receipt_handle: message.receipt_handle,
                action: Action::RetryAfter(delay),
                permit,
                guard: None,
            });
        }
        Ok(duration) => {
            let job = Job { id, duration };
            tracker.spawn(run_job(Arc::clone(shared), job, message, permit));
        }
    }
}

async fn run_job(shared: Arc<Shared>, job: Job, message: Message, permit: OwnedSemaphorePermit) {
    let (action, guard) = tokio::select! {
        r = process(&shared, &job, &message) => r,
        never = heartbeat::keep_invisible(&shared.queue, &message, shared.settings.visibility) => {
            match never {}
        }
    };
    shared.settle(Settlement {
        message_id: message.id,
        receipt_handle: message.receipt_handle,
        action,
        permit,
        guard,
    });
}

/// Protects the task, then works the job. Returns what to do with the message and
/// the guard to hold until that is done.
async fn process(
    shared: &Shared,
    job: &Job,
    message: &Message,
) -> (Action, Option<ProtectionGuard>) {
    let id = &job.id;
    let acquired = tokio::select! {
        biased;
        () = shared.stop_receiving.cancelled() => {
            tracing::info!(message_id = %id, "{id} - Not started: the worker is stopping; handing it back");
            return (Action::HandBack, None);
        }
        r = shared.protection.acquire() => r,
    };
    let guard = match acquired {
        Ok(guard) => guard,
        Err(AcquireError::Rejected(r)) => {
            tracing::warn!(message_id = %id, "{id} - Not started: task protection refused ({r}); handing it back");
            shared.refuse(r);
            return (Action::HandBack, None);
        }
        Err(e) => {
            tracing::warn!(message_id = %id, "{id} - Not started: {e}; handing it back");
            return (Action::HandBack, None);
        }
    };
    tracing::info!(message_id = %id, "{id} - Working for {}", job.duration);
    tokio::select! {
        r = job::work(job) => match r {
            Ok(()) => (Action::Delete, Some(guard)),
            Err(e) => {
                shared.stats.failed.fetch_add(1, Ordering::Relaxed);
                let delay = redelivery_delay(message.receive_count);
                tracing::error!(
                    message_id = %id,
                    "{id} - Failed: {e}; visible again in {}s",
                    delay.as_secs()
                );
                (Action::RetryAfter(delay), Some(guard))
            }
        },
        () = shared.abandon.cancelled() => {
            tracing::warn!(
                message_id = %id,
                "{id} - Still working at the end of the shutdown grace period; handing it back"
            );
            (Action::HandBack, Some(guard))
        }
    }
}
