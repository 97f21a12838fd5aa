//! Whether the service still wants this task.
//!
//! Protection held while there is work has a cost: under steady load every task
//! always has a client or a job, so a service can neither scale in nor finish a
//! deployment. A task that learns its service no longer wants it can stop taking
//! work and let go ([`TaskProtection::drain`](crate::TaskProtection::drain)); ECS
//! then stops it as soon as its protection is released.

use std::fmt;

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
