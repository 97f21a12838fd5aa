//! Whether the service still wants this task.
//!
//! Protection held while there is work has a cost: under steady load every task
//! always has a client or a job, so a service can neither scale in nor finish a
//! deployment. A task that learns its service no longer wants it can stop taking
//! work and let go ([`TaskProtection::drain`]); ECS then stops it as soon as its
//! protection is released.
//!
//! **Never less than ECS would keep.** A task leaves only where ECS itself would stop
//! it if it could: the surplus of a scale-in, picked in ECS's own order; an old
//! deployment's task once the new deployment's tasks are ready (running, healthy,
//! settled past the health check grace period) to take its place, or a small batch at
//! a time when ECS cannot start a new task before an old one stops (maximumPercent
//! 100); a blue/green deployment's old side once traffic has shifted and the bake time
//! is over; a task ECS is already stopping. Never while a deployment fails or rolls
//! back, never on doubt (ECS unreachable, slow, throttling, or answering what cannot
//! be read: the last verdict stands), and once a task has let go, only ECS's own
//! figures (the desired count rose, the deployment failed) bring it back. The rules are
//! in [`decide`](fn@decide); deployments run by CodeDeploy or an external controller
//! turn the drain off.
//!
//! **One decision per service.** The decision reads `DescribeServices` and, when
//! something moves, the task list. Each task asking for itself would multiply those
//! calls by the number of tasks, against rate limits ECS shares among every caller of
//! the account and Region. So a decision is made once per check interval for the whole
//! service, by whichever task claims it, and kept in a [`VerdictStore`] every task
//! reads: a DynamoDB table ([`DynamoStore`], `DRAIN_TABLE`) shared by the service's
//! tasks, or, without one, each task's own memory ([`LocalStore`]; each task then
//! decides for itself, at an interval that grows with the service, and lists it only up
//! to 50 tasks).
//!
//! Faults never make a task leave: without the metadata endpoint (not in ECS), for a
//! task that is not part of a service, or when the task role may not ask, the drain
//! turns off, says so once, and [`Drain::is_on`] turns false.

mod api;
mod decide;
#[cfg(feature = "drain")]
mod dynamo;
#[cfg(feature = "drain")]
mod ecs;
mod facts;
mod gather;
mod record;
mod settings;
mod store;
mod watch;

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch as channel;

pub use api::{ApiError, ServiceApi};
pub use decide::{Decision, Rules, decide};
#[cfg(feature = "drain")]
pub use dynamo::{DynamoStore, key};
#[cfg(feature = "drain")]
pub use ecs::EcsService;
pub use facts::{
    Controller, DeploymentFacts, Facts, Health, Rollout, ServiceFacts, ShiftFacts, Strategy,
    TaskFacts, task_id,
};
pub use record::{Leave, Memory, PrimaryWatch, Record, Verdict};
pub use settings::{
    CHECK_SECONDS_RANGE, DEFAULT_CALL_TIMEOUT, DEFAULT_CHECK_INTERVAL, DEFAULT_SETTLE, DrainMode,
    DrainSettings, DrainSettingsBuilder, DrainSettingsError, SETTLE_SECONDS_RANGE,
};
pub use store::{LocalStore, StoreError, Stored, VerdictStore};
pub use watch::Clock;

use crate::TaskProtection;

/// What the service wants of this task.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Membership {
    /// The service wants this task: take work as usual.
    #[default]
    Wanted,
    /// The service wants this task gone: take no new work, finish what is held, and
    /// release protection so that ECS can stop it.
    Leaving(LeaveReason),
}

impl Membership {
    /// Whether the task is leaving.
    #[must_use]
    pub fn is_leaving(&self) -> bool {
        matches!(self, Self::Leaving(_))
    }
}

impl fmt::Display for Membership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Wanted => f.write_str("wanted"),
            Self::Leaving(reason) => write!(f, "leaving: {reason}"),
        }
    }
}

/// Why the service no longer wants this task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "why", rename_all = "snake_case")]
#[non_exhaustive]
pub enum LeaveReason {
    /// A deployment replaces this task, and its new tasks are ready to take its place.
    Replaced {
        /// This task's deployment (`ecs-svc/...`).
        deployment: String,
        /// The PRIMARY deployment.
        primary: String,
    },
    /// The service runs more tasks than it wants, and this task is one of those to go.
    Surplus {
        /// Tasks running.
        running: u32,
        /// Tasks wanted.
        desired: u32,
    },
    /// ECS is stopping this task (a stop, a replacement, a scale-in): it is
    /// deregistered from its load balancer and will get SIGTERM when the
    /// deregistration delay ends. Nothing brings it back.
    Stopping,
}

impl LeaveReason {
    /// Whether ECS has already decided to stop the task: no new client reaches it
    /// through the load balancer, and there is no time to lose.
    #[must_use]
    pub fn is_stopping(&self) -> bool {
        matches!(self, Self::Stopping)
    }
}

impl fmt::Display for LeaveReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Replaced {
                deployment,
                primary,
            } => write!(
                f,
                "replaced by a deployment: this task's deployment {deployment} is no longer PRIMARY and {primary} has tasks ready to take its place"
            ),
            Self::Surplus { running, desired } => write!(
                f,
                "scale-in: the service runs {running} tasks and wants {desired}; this task is one of the {} to go",
                running.saturating_sub(*desired)
            ),
            Self::Stopping => f.write_str("ECS is stopping this task"),
        }
    }
}

/// This task, as the drain needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TaskInfo {
    /// The cluster's name or ARN (`Cluster` in task metadata).
    pub cluster: String,
    /// This task's ARN.
    pub task_arn: String,
    /// The service it belongs to.
    pub service: String,
}

impl TaskInfo {
    /// This task.
    #[must_use]
    pub fn new(
        cluster: impl Into<String>,
        task_arn: impl Into<String>,
        service: impl Into<String>,
    ) -> Self {
        Self {
            cluster: cluster.into(),
            task_arn: task_arn.into(),
            service: service.into(),
        }
    }
}

/// What the service wants of this task, kept up to date in the background.
///
/// Cheap to clone. [`Drain::off`] is always [`Membership::Wanted`]; a watcher started
/// with [`Drain::start`], [`Drain::watch`] or [`Drain::watch_with`] runs until every
/// clone and subscription is dropped, or until it turns off.
#[derive(Debug, Clone)]
pub struct Drain {
    membership: channel::Receiver<Membership>,
    on: channel::Receiver<bool>,
    /// Keeps idle channels open, so that `changed()` waits instead of failing.
    _idle: Option<Arc<(channel::Sender<Membership>, channel::Sender<bool>)>>,
}

impl Drain {
    /// Never leaving: no watcher.
    #[must_use]
    pub fn off() -> Self {
        let (membership_tx, membership) = channel::channel(Membership::Wanted);
        let (on_tx, on) = channel::channel(false);
        Self {
            membership,
            on,
            _idle: Some(Arc::new((membership_tx, on_tx))),
        }
    }

    /// Watches with `api` on behalf of `task`, this task deciding for itself
    /// ([`LocalStore`]).
    ///
    /// # Panics
    /// Outside a tokio runtime.
    #[must_use]
    pub fn watch<A: ServiceApi>(api: A, task: TaskInfo, settings: DrainSettings) -> Self {
        Self::watch_with(api, LocalStore::new(), task, settings)
    }

    /// Watches with `api` on behalf of `task`, sharing decisions through `store`.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    #[must_use]
    pub fn watch_with<A: ServiceApi, S: VerdictStore>(
        api: A,
        store: S,
        task: TaskInfo,
        settings: DrainSettings,
    ) -> Self {
        Self::watch_on(Clock::new(), api, store, task, settings)
    }

    /// As [`Drain::watch_with`], reading time from `clock`: watchers simulated in one
    /// process share one clock.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    #[must_use]
    pub fn watch_on<A: ServiceApi, S: VerdictStore>(
        clock: Clock,
        api: A,
        store: S,
        task: TaskInfo,
        settings: DrainSettings,
    ) -> Self {
        let (drain, out) = Self::on();
        let me = watch::Me {
            id: task_id(&task.task_arn).to_owned(),
            cluster: task.cluster,
            service: task.service,
        };
        tokio::spawn(watch::Watcher::new(api, store, me, settings, out, clock).run());
        drain
    }

    /// A drain that is on, and the senders its watcher publishes with.
    fn on() -> (Self, watch::Outputs) {
        let (membership_tx, membership) = channel::channel(Membership::Wanted);
        let (on_tx, on) = channel::channel(true);
        (
            Self {
                membership,
                on,
                _idle: None,
            },
            watch::Outputs {
                membership: membership_tx,
                on: on_tx,
            },
        )
    }

    /// Whether a watcher asks ECS now: `false` for [`Drain::off`], and once the
    /// watcher has turned itself off (the task role may not ask, the task is not part
    /// of a service, the service's deployments are not ECS's). While it is `false`,
    /// the task is always wanted and services behave as they would without a drain.
    #[must_use]
    pub fn is_on(&self) -> bool {
        *self.on.borrow()
    }

    /// A live view of [`is_on`](Self::is_on), to await the drain turning off.
    #[must_use]
    pub fn on_changes(&self) -> channel::Receiver<bool> {
        self.on.clone()
    }

    /// The membership now.
    #[must_use]
    pub fn membership(&self) -> Membership {
        self.membership.borrow().clone()
    }

    /// A live view of the membership, to await its changes.
    #[must_use]
    pub fn subscribe(&self) -> channel::Receiver<Membership> {
        self.membership.clone()
    }

    /// Keeps `protection` draining while this task is leaving
    /// ([`TaskProtection::drain`]) and taking holders while it is wanted, until the
    /// protection is shut down. For services whose only reaction to leaving is to
    /// take no new holders, such as those behind the HTTP layer.
    pub fn follow(&self, protection: &TaskProtection) {
        let mut rx = self.membership.clone();
        let protection = protection.clone();
        tokio::spawn(async move {
            loop {
                if rx.borrow_and_update().is_leaving() {
                    protection.drain();
                } else {
                    protection.undrain();
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
    }
}

#[cfg(feature = "drain")]
mod start;
