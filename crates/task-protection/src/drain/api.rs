//! What the watcher asks ECS, behind a small trait as the protection backends are:
//! the decision is tested on paused time against answers a test scripts, and the
//! real calls ([`EcsService`](super::EcsService)) once against a stand-in that speaks
//! the ECS JSON API.

use std::fmt;
use std::future::Future;

use super::decide::{ServiceView, TaskView};

/// Why an ECS call did not answer usefully; each kind has its own response.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ApiError {
    /// `ThrottlingException`: the account's rate limit. Back off.
    Throttled(String),
    /// `AccessDeniedException`: the task role lacks the permission. The watcher
    /// turns itself off.
    Denied(String),
    /// ECS answered but refused: an unknown service or cluster, a bad parameter.
    Refused(String),
    /// No answer in time, a network failure or a server error.
    Unavailable(String),
    /// An answer the watcher cannot read.
    Malformed(String),
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Throttled(m) => write!(f, "throttled: {m}"),
            Self::Denied(m) => write!(f, "access denied: {m}"),
            Self::Refused(m) => write!(f, "refused: {m}"),
            Self::Unavailable(m) => write!(f, "unavailable: {m}"),
            Self::Malformed(m) => write!(f, "unreadable answer: {m}"),
        }
    }
}

impl std::error::Error for ApiError {}

/// The ECS API calls the watcher makes. Each method is one call (or one per page).
pub trait ServiceApi: Send + Sync + 'static {
    /// `DescribeTasks` for up to any number of tasks (in calls of 100).
    fn describe_tasks(
        &self,
        cluster: &str,
        arns: &[String],
    ) -> impl Future<Output = Result<Vec<TaskView>, ApiError>> + Send;

    /// `DescribeServices` for one service.
    fn describe_service(
        &self,
        cluster: &str,
        service: &str,
    ) -> impl Future<Output = Result<ServiceView, ApiError>> + Send;

    /// `ListTasks` of the service whose desired status is `RUNNING`, every page.
    fn list_tasks(
        &self,
        cluster: &str,
        service: &str,
    ) -> impl Future<Output = Result<Vec<String>, ApiError>> + Send;
}
