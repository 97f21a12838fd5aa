//! What every part of a running worker shares: its queues, handler, protection and
//! settings, and the switches of its phases (receiving, leaving, shutdown, the end of
//! the grace period, the end of the settle budget).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use task_protection::{Rejection, TaskProtection};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::batcher::SettleQueue;
use crate::config::WorkerSettings;
use crate::dead_letter::Redrive;
use crate::handler::BoxedHandler;
use crate::health::Health;
use crate::queue::{Queue, SqsError};
use crate::shares::Shares;
use crate::stats::Stats;

/// One queue the worker works, and the batcher of its calls.
#[derive(Debug)]
pub(crate) struct Lane {
    pub(crate) queue: Queue,
    /// Its name in `COPILOT_TOPIC_QUEUE_URIS`; `None` for `COPILOT_QUEUE_URI`.
    pub(crate) name: Option<String>,
    pub(crate) settle: SettleQueue,
    /// Its redrive policy, as far as it is known.
    pub(crate) redrive: Redrive,
}

impl Lane {
    /// The setting that names this queue, for errors: `COPILOT_QUEUE_URI`, or its
    /// entry in `COPILOT_TOPIC_QUEUE_URIS`.
    pub(crate) fn setting(&self) -> String {
        match &self.name {
            None => "COPILOT_QUEUE_URI".to_owned(),
            Some(name) => format!("COPILOT_TOPIC_QUEUE_URIS[{name:?}]"),
        }
    }
}

/// The reason ECS gives when it refuses protection to a task that is not part of a
/// service (started with `RunTask`).
pub(crate) const NOT_IN_A_SERVICE: &str = "TASK_NOT_VALID";

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
    pub(crate) jobs: TaskTracker,
    pub(crate) refusal: Mutex<Option<Rejection>>,
    /// Whether the worker follows its service's membership (the drain watcher is
    /// on, read live): then a refusal is no sign that this task goes, only that it
    /// may not take work now.
    pub(crate) follows_membership: Option<watch::Receiver<bool>>,
    /// Until when the receive loops wait after a refusal that did not end the worker.
    pub(crate) refused_until: watch::Sender<Option<Instant>>,
    /// The receive error that ended the worker, and the lane it came from.
    pub(crate) fatal: Mutex<Option<(usize, SqsError)>>,
    /// ECS refused protection because the task is not part of a service: nothing
    /// scales it in, and jobs run without protection.
    pub(crate) unprotected: AtomicBool,
    /// Cancelled when the receive loops have ended.
    pub(crate) receiving_ended: CancellationToken,
}

impl Shared {
    /// Whether a membership is followed now.
    pub(crate) fn follows_membership(&self) -> bool {
        self.follows_membership
            .as_ref()
            .is_some_and(|on| *on.borrow())
    }

    /// ECS refused protection. Without a membership to follow the task is being
    /// replaced: the worker takes no more work and ends. Following one, a refusal
    /// (`DEPLOYMENT_BLOCKED` while a deployment's old tasks still hold protection) is
    /// no sign that this task goes, and the drain watcher says when it does: the
    /// worker receives nothing for the protection's check interval, the cool-down
    /// during which ECS is not asked again, then receives again.
    pub(crate) fn refuse(&self, rejection: Rejection) {
        if self.follows_membership() {
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

    /// ECS refused protection to a task that is not part of a service, which nothing
    /// scales in or replaces for a deployment: from now on jobs run without asking
    /// for protection. Said once.
    pub(crate) fn work_unprotected(&self, rejection: &Rejection) {
        if !self.unprotected.swap(true, Ordering::SeqCst) {
            tracing::warn!(
                "Task protection refused ({rejection}): this task is not part of an ECS service (a standalone task, started with RunTask), which ECS never scales in; working without protection"
            );
        }
    }

    /// Whether jobs run without protection (see [`work_unprotected`](Self::work_unprotected)).
    pub(crate) fn is_unprotected(&self) -> bool {
        self.unprotected.load(Ordering::SeqCst)
    }

    /// The refusal that ended the worker, if one did.
    pub(crate) fn refusal(&self) -> Option<Rejection> {
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
