//! The worker: receive for each queue while its share of the slots allows
//! ([`receive`](crate::receive)), hand each message to its own task
//! ([`dispatch`](crate::dispatch)), leave the service when it no longer wants this
//! task, and drain on shutdown.
//!
//! The task polls SQS unprotected. A received job takes a protection guard before it
//! starts and keeps it until its message is deleted or handed back, so an idle worker
//! makes no protection calls and ECS can scale it in, while a busy one is protected
//! exactly while it holds work. Concurrency is shared between the queues by
//! [`shares`](crate::shares): a poll holds no slot while it waits, and asks for no
//! more messages than its queue's share leaves room for (at most ten, SQS's limit).
//! Once a slot is free, a receive waits up to [`RECEIVE_GATHER`](crate::RECEIVE_GATHER) for the rest of the
//! previous receive's messages to be settled, so jobs that end together are followed
//! by one receive for all of them. While a message waits for protection, no more are
//! received.
//!
//! Leaving the service ([`Worker::with_membership`]): no new poll starts (one on its
//! way is given up), running jobs finish and are settled (a FIFO group's later
//! messages with them), and the protection library releases protection once the last
//! one is gone. Wanted again, the worker receives again.
//!
//! Shutdown has a fixed budget, whatever SQS and ECS do: after the first signal no
//! new poll starts (one already on its way gets [`POLL_DRAIN`](crate::POLL_DRAIN) and
//! its messages are handed straight back); running jobs get the grace period, which a
//! second signal ends at once, and the later messages of a FIFO group run after their
//! head within it; then the last deletes and hand-backs get [`SETTLE_BUDGET`].

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use task_protection::cli::Signal;
use task_protection::drain::Membership;
use task_protection::{Rejection, TaskProtection};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::batcher::Settler;
use crate::config::WorkerSettings;
use crate::context::{Lane, Shared};
use crate::dead_letter::Redrive;
use crate::handler::{BatchHandler, BoxedHandler, Handler};
use crate::health::Health;
use crate::queue::{Queue, SqsError};
use crate::receive::{PERMANENT_RECEIVE_TRIES, receive_loop};
use crate::shares::Shares;
use crate::stats::Stats;

/// How long the last settle calls may take once every job has ended or been
/// abandoned.
pub const SETTLE_BUDGET: Duration = Duration::from_secs(3);
/// How long [`TaskProtection::shutdown`] may take to release protection, as the
/// library bounds it.
pub const RELEASE_BUDGET: Duration = Duration::from_secs(6);
/// What SIGTERM to exit may take beyond the grace period: the last settles, then the
/// release. `SHUTDOWN_GRACE_SECONDS` is kept this far below the task's stop timeout.
pub const SHUTDOWN_MARGIN: Duration = SETTLE_BUDGET.saturating_add(RELEASE_BUDGET);

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
    ReceiveFailed(ReceiveFailure),
}

/// Receiving from one of the queues failed in a way retrying cannot fix.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceiveFailure {
    /// The queue's URL.
    pub queue_url: String,
    /// The setting that names it: `COPILOT_QUEUE_URI`, or its entry in
    /// `COPILOT_TOPIC_QUEUE_URIS`.
    pub setting: String,
    /// The last error.
    pub error: SqsError,
}

impl std::fmt::Display for ReceiveFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot receive messages from {} ({}): {}",
            self.queue_url, self.setting, self.error
        )
    }
}

impl ReceiveFailure {
    /// What to do about it, for the one line the worker prints before it exits.
    #[must_use]
    pub fn advice(&self) -> String {
        self.error.advice(&self.setting)
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
    /// Whether the membership is followed now; always, when `None`.
    following: Option<watch::Receiver<bool>>,
    health: Arc<Health>,
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
            health: Arc::new(Health::new(
                settings.unhealthy_after,
                settings.protection_unhealthy_after,
            )),
            settings,
            handler,
            membership: None,
            following: None,
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

    /// Follows the membership only while `on` is true, as the drain watcher's
    /// [`Drain::on_changes`](task_protection::drain::Drain::on_changes) says: a
    /// watcher that ECS stops answering (its permissions taken away, say) turns off,
    /// and from then on a refusal of protection ends the worker as it does without a
    /// membership, since nothing else would say that the task goes.
    #[must_use]
    pub fn followed_while(mut self, on: watch::Receiver<bool>) -> Self {
        self.following = Some(on);
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
                redrive: Redrive::default(),
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
            follows_membership: match (&self.membership, self.following) {
                (None, _) => None,
                (Some(_), None) => Some(watch::Sender::new(true).subscribe()),
                (Some(_), Some(on)) => Some(on),
            },
            refused_until: watch::Sender::new(None),
            fatal: Mutex::new(None),
            unprotected: AtomicBool::new(false),
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
            .take()
            .map(|(lane, error)| ReceiveFailure {
                queue_url: shared.lanes[lane].queue.url().to_owned(),
                setting: shared.lanes[lane].setting(),
                error,
            });
        if let Some(failure) = &fatal {
            tracing::error!(
                "Receiving messages failed {PERMANENT_RECEIVE_TRIES} times in a row ({failure}); finishing {} running job(s), then exiting",
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
