//! Whether the service still wants this task.
//!
//! Protection held while there is work has a cost: under steady load every task
//! always has a client or a job, so a service can neither scale in nor finish a
//! deployment. A task that learns its service no longer wants it can stop taking
//! work and let go ([`TaskProtection::drain`]); ECS then stops it as soon as its
//! protection is released.
//!
//! The watcher ([`Drain`]) asks ECS, every check interval (30 s by default, jittered
//! so that tasks do not ask together), how many tasks the service wants
//! (`DescribeServices`), and, when it runs more than it wants, which ones
//! (`ListTasks` and `DescribeTasks`, only when the service's counts changed). A task
//! is **leaving** when its deployment is no longer the PRIMARY one and the PRIMARY
//! deployment has its tasks running, or when the service runs more tasks than it
//! wants and this task is one of the surplus: every task ranks the running tasks the
//! same way ([`rank`]: old deployments first, then the longest running), so exactly
//! `running - desired` of them leave, without talking to each other. A leaving task
//! is wanted again when the desired count rises before ECS stops it.
//!
//! Faults never make a task leave: without the metadata endpoint (not in ECS), or for
//! a task that is not part of a service, the watcher is off; when the task role may
//! not ask, it says so once and turns off; when ECS is slow, unreachable or answers
//! what cannot be read, the last answer stands, and a verdict to leave that ECS has
//! not confirmed for three check intervals is dropped; when ECS throttles, the
//! watcher backs off.

mod api;
mod decide;
#[cfg(feature = "drain")]
mod ecs;
mod watch;

use std::fmt;
use std::time::Duration;

use tokio::sync::watch as channel;

pub use api::{ApiError, ServiceApi};
pub use decide::{
    Decision, DeploymentView, ServiceView, TaskInfo, TaskView, decide, decide_with_tasks, rank,
};
#[cfg(feature = "drain")]
pub use ecs::EcsService;

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
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaveReason {
    /// A deployment replaces this task: its deployment is no longer the PRIMARY one,
    /// and the PRIMARY deployment has its tasks running.
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
}

impl fmt::Display for LeaveReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Replaced {
                deployment,
                primary,
            } => write!(
                f,
                "replaced by a deployment: this task's deployment {deployment} is no longer PRIMARY and {primary} has its tasks running"
            ),
            Self::Surplus { running, desired } => write!(
                f,
                "scale-in: the service runs {running} tasks and wants {desired}; this task is one of the {} to go",
                running.saturating_sub(*desired)
            ),
        }
    }
}

/// The default check interval: two `DescribeServices` calls a minute per task.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(30);
/// The default bound on one ECS call.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Allowed range of `DRAIN_CHECK_SECONDS`.
pub const CHECK_SECONDS_RANGE: (u64, u64) = (1, 3_600);

/// How often and how patiently the watcher asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainSettings {
    /// The mean time between two checks; each wait is jittered by ±50 %.
    pub check_interval: Duration,
    /// The longest one ECS call may take before it counts as failed.
    pub call_timeout: Duration,
}

impl Default for DrainSettings {
    fn default() -> Self {
        Self {
            check_interval: DEFAULT_CHECK_INTERVAL,
            call_timeout: DEFAULT_CALL_TIMEOUT,
        }
    }
}

/// Whether to watch: the value of `DRAIN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum DrainMode {
    /// On when the task metadata endpoint is there (inside ECS), off elsewhere.
    #[default]
    Auto,
    /// Never ask; the task is always wanted.
    Off,
}

/// What the service wants of this task, kept up to date in the background.
///
/// Cheap to clone. [`Drain::off`] is always [`Membership::Wanted`]; a watcher started
/// with [`Drain::start`] or [`Drain::watch`] asks ECS every check interval, until
/// every clone and subscription is dropped.
#[derive(Debug, Clone)]
pub struct Drain {
    rx: channel::Receiver<Membership>,
    /// Whether a watcher runs (or is starting).
    on: bool,
    /// Keeps an idle channel open, so that `changed()` waits instead of failing.
    _idle: Option<std::sync::Arc<channel::Sender<Membership>>>,
}

impl Drain {
    /// Never leaving: no watcher.
    #[must_use]
    pub fn off() -> Self {
        let (tx, rx) = channel::channel(Membership::Wanted);
        Self {
            rx,
            on: false,
            _idle: Some(std::sync::Arc::new(tx)),
        }
    }

    /// Watches with `api` on behalf of `me`.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    #[must_use]
    pub fn watch<A: ServiceApi>(api: A, me: TaskInfo, settings: DrainSettings) -> Self {
        let (tx, rx) = channel::channel(Membership::Wanted);
        tokio::spawn(watch::Watcher::new(api, me, settings, tx).run());
        Self {
            rx,
            on: true,
            _idle: None,
        }
    }

    /// Whether a watcher asks ECS; `false` for [`Drain::off`] (the task is then always
    /// wanted).
    #[must_use]
    pub fn is_on(&self) -> bool {
        self.on
    }

    /// The membership now.
    #[must_use]
    pub fn membership(&self) -> Membership {
        self.rx.borrow().clone()
    }

    /// A live view of the membership, to await its changes.
    #[must_use]
    pub fn subscribe(&self) -> channel::Receiver<Membership> {
        self.rx.clone()
    }

    /// Keeps `protection` draining while this task is leaving
    /// ([`TaskProtection::drain`]) and taking holders while it is wanted, until the
    /// protection is shut down. For services whose only reaction to leaving is to
    /// take no new holders, such as those behind the HTTP layer.
    pub fn follow(&self, protection: &TaskProtection) {
        let mut rx = self.rx.clone();
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
impl Drain {
    /// Starts watching from the environment: this task's cluster and ARN from the task
    /// metadata endpoint (`metadata_uri`, the value of `ECS_CONTAINER_METADATA_URI_V4`),
    /// its service and deployment from `DescribeTasks`, and the ECS API through the
    /// standard AWS configuration.
    ///
    /// Never fails: without the metadata endpoint (not in ECS), for a task that is not
    /// part of a service, or when the role may not ask, the watcher is off, said once
    /// in the log, and the task is always wanted.
    pub async fn start(
        mode: DrainMode,
        metadata_uri: Option<&str>,
        settings: DrainSettings,
    ) -> Self {
        if mode == DrainMode::Off {
            tracing::info!("Drain is off (DRAIN=off)");
            return Self::off();
        }
        let Some(metadata_uri) = metadata_uri else {
            tracing::info!(
                "Drain is off: ECS_CONTAINER_METADATA_URI_V4 is not set, so this process is not running in ECS"
            );
            return Self::off();
        };
        let identity = match crate::metadata::TaskIdentity::discover(metadata_uri).await {
            Ok(identity) => identity,
            Err(e) => {
                tracing::warn!("Drain is off: {e}");
                return Self::off();
            }
        };
        let api = EcsService::from_env().await;
        let (tx, rx) = channel::channel(Membership::Wanted);
        tokio::spawn(async move {
            if let Some(me) = identify(&api, identity, settings).await {
                tracing::info!(
                    service = %me.service,
                    deployment = me.deployment.as_deref().unwrap_or("unknown"),
                    "Drain is on: asking ECS about service {} every {:?} or so",
                    me.service,
                    settings.check_interval
                );
                watch::Watcher::new(api, me, settings, tx).run().await;
            }
        });
        Self {
            rx,
            on: true,
            _idle: None,
        }
    }
}

/// This task's service and deployment, from `DescribeTasks` on itself, retried while
/// ECS is unavailable or throttles. `None` when the watcher cannot work: the reason
/// is logged once.
#[cfg(feature = "drain")]
async fn identify(
    api: &impl ServiceApi,
    identity: crate::metadata::TaskIdentity,
    settings: DrainSettings,
) -> Option<TaskInfo> {
    let arns = [identity.task_arn.clone()];
    let mut wait = Duration::from_secs(1);
    loop {
        let call = api.describe_tasks(&identity.cluster, &arns);
        let answer = tokio::time::timeout(settings.call_timeout, call)
            .await
            .unwrap_or_else(|_| Err(ApiError::Unavailable("DescribeTasks: no answer".to_owned())));
        ::metrics::counter!(crate::metrics::DRAIN_API_CALLS).increment(1);
        match answer {
            Ok(tasks) => {
                let Some(task) = tasks.into_iter().find(|t| t.arn == identity.task_arn) else {
                    tracing::warn!(
                        "Drain is off: DescribeTasks does not know this task ({})",
                        identity.task_arn
                    );
                    return None;
                };
                let Some(service) = task
                    .group
                    .as_deref()
                    .and_then(|g| g.strip_prefix("service:"))
                else {
                    tracing::info!(
                        group = task.group.as_deref().unwrap_or(""),
                        "Drain is off: this task is not part of a service"
                    );
                    return None;
                };
                return Some(TaskInfo {
                    cluster: identity.cluster,
                    task_arn: identity.task_arn,
                    service: service.to_owned(),
                    deployment: task.deployment,
                });
            }
            Err(ApiError::Denied(why)) => {
                tracing::warn!(
                    "Drain is off: the task role may not describe its own task ({why}); \
                     grant ecs:DescribeTasks, ecs:DescribeServices and ecs:ListTasks to turn it on"
                );
                return None;
            }
            Err(e @ (ApiError::Refused(_) | ApiError::Malformed(_))) => {
                tracing::warn!("Drain is off: {e}");
                return None;
            }
            Err(e) => {
                tracing::warn!(
                    "Drain cannot identify this task yet ({e}); trying again in {wait:?}"
                );
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(settings.check_interval);
            }
        }
    }
}
