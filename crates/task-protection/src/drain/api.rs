//! What the drain asks ECS, behind a small trait as the protection backends are: the
//! decision is tested on paused time against answers a test scripts or a simulated
//! service gives, and the real calls ([`EcsService`](super::EcsService)) once against a
//! stand-in that speaks the ECS JSON API.

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;

use super::facts::{ServiceFacts, ShiftFacts, TaskFacts};

/// Why an ECS call did not answer usefully; each kind has its own response.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ApiError {
    /// `ThrottlingException`: the account's rate limit. Back off; it is no sign of
    /// anything about the service.
    Throttled(String),
    /// `AccessDeniedException`: the task role lacks the permission. The drain turns
    /// itself off.
    Denied(String),
    /// ECS answered but refused: an unknown service or cluster, a bad parameter.
    Refused(String),
    /// No answer in time, a network failure or a server error.
    Unavailable(String),
    /// An answer that cannot be read.
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

/// The ECS API calls the drain makes, each method one call: every call counts against
/// the account's rate limits, shared by every caller in the account and Region, and
/// the drain paces them itself.
pub trait ServiceApi: Send + Sync + 'static {
    /// `DescribeServices` for one service.
    fn describe_service(
        &self,
        cluster: &str,
        service: &str,
    ) -> impl Future<Output = Result<ServiceFacts, ApiError>> + Send;

    /// One page of `ListTasks` of the service (up to 100 ARNs) whose desired status is
    /// RUNNING, or STOPPED when `stopped` (ECS lists stopped tasks for about an hour),
    /// from `next` (the previous page's token), and the next page's token.
    fn list_tasks(
        &self,
        cluster: &str,
        service: &str,
        stopped: bool,
        next: Option<String>,
    ) -> impl Future<Output = Result<(Vec<String>, Option<String>), ApiError>> + Send;

    /// `DescribeTasks` of up to 100 tasks.
    fn describe_tasks(
        &self,
        cluster: &str,
        arns: &[String],
    ) -> impl Future<Output = Result<Vec<TaskFacts>, ApiError>> + Send;

    /// Of up to 100 container instances, the DRAINING ones
    /// (`DescribeContainerInstances`).
    fn draining_instances(
        &self,
        cluster: &str,
        instances: &[String],
    ) -> impl Future<Output = Result<BTreeSet<String>, ApiError>> + Send;

    /// Where a service deployment stands (`DescribeServiceDeployments` of the ARN
    /// `DescribeServices` gives as `currentServiceDeployment`).
    fn service_deployment(
        &self,
        arn: &str,
    ) -> impl Future<Output = Result<ShiftFacts, ApiError>> + Send;
}
