//! A task, as ECS knows it: where it stands, why it was started and why it is being
//! stopped, its protection, its registration and health, and the calls it made.

use std::collections::BTreeMap;
use std::time::Duration;

use super::target_group_arn;
use crate::sim::health::{ContainerHealth, Health, Target, TargetGroupRole, TargetState};

/// Where a task stands, as ECS's `lastStatus` says (PROVISIONING, ACTIVATING and
/// DEPROVISIONING are folded into their neighbours).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Started, not yet ready.
    Pending,
    /// Ready: serving, or long polling.
    Running,
    /// Being stopped: deregistered from the load balancer, waiting out the delay.
    Deactivating,
    /// SIGTERM sent.
    Stopping,
    /// Its process has exited.
    Stopped,
}

impl Status {
    /// ECS's spelling.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Running => "RUNNING",
            Self::Deactivating => "DEACTIVATING",
            Self::Stopping => "STOPPING",
            Self::Stopped => "STOPPED",
        }
    }
}

/// Why ECS started a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartReason {
    /// To reach the desired count (the service's start, a scale-out, a task that
    /// stopped on its own).
    Desired,
    /// A deployment's new task.
    Deployment,
    /// A replacement for an unhealthy task.
    Unhealthy,
    /// A replacement for a task on a DRAINING container instance.
    InstanceDraining,
    /// Availability Zone rebalancing.
    Rebalancing,
}

/// Why ECS stops a task: `stoppedReason` and `stopCode`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// Scale-in, or an old deployment's task replaced.
    Scheduler {
        /// The deployment whose scaling stops it.
        deployment: String,
    },
    /// It failed the target group's health checks.
    LoadBalancerHealth,
    /// Its essential container failed its health checks.
    ContainerHealth,
    /// StopTask.
    User(String),
    /// Its container instance is DRAINING.
    InstanceDraining,
    /// Availability Zone rebalancing.
    Rebalancing,
    /// Its essential container exited.
    EssentialExited,
}

impl StopReason {
    /// `stoppedReason`, as ECS writes it.
    #[must_use]
    pub fn text(&self) -> String {
        match self {
            Self::Scheduler { deployment } => {
                format!("Scaling activity initiated by (deployment {deployment})")
            }
            Self::LoadBalancerHealth => format!(
                "Task failed ELB health checks in (target-group {})",
                target_group_arn(TargetGroupRole::Production)
            ),
            Self::ContainerHealth => "Task failed container health checks".to_owned(),
            Self::User(reason) => reason.clone(),
            Self::InstanceDraining => "Container instance is DRAINING".to_owned(),
            Self::Rebalancing => "AZ Rebalancing".to_owned(),
            Self::EssentialExited => "Essential container in task exited".to_owned(),
        }
    }

    /// `stopCode`.
    #[must_use]
    pub fn code(&self) -> &'static str {
        match self {
            Self::User(_) => "UserInitiated",
            Self::EssentialExited => "EssentialContainerExited",
            _ => "ServiceSchedulerInitiated",
        }
    }

    /// Whether it is a stop for health.
    #[must_use]
    pub fn unhealthy(&self) -> bool {
        matches!(self, Self::LoadBalancerHealth | Self::ContainerHealth)
    }
}

/// A stop under way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stop {
    /// Why.
    pub reason: StopReason,
    /// When ECS decided it (`stoppingAt`).
    pub at: Duration,
    /// When SIGTERM was sent.
    pub sigterm_at: Option<Duration>,
    /// Whether SIGKILL was sent.
    pub killed: bool,
}

/// A task that ECS is replacing, and by which task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replacing {
    /// Why it goes.
    pub reason: StopReason,
    /// Its replacement, once started.
    pub by: Option<String>,
}

/// One task.
#[derive(Debug, Clone)]
pub struct Task {
    /// Its id (the last part of its ARN).
    pub id: String,
    /// The deployment (or task set) that started it (`startedBy`).
    pub deployment: String,
    /// Its task definition revision.
    pub revision: u32,
    /// Its Availability Zone.
    pub zone: String,
    /// Its container instance's ARN, on EC2.
    pub instance: Option<String>,
    /// `lastStatus`.
    pub status: Status,
    /// `desiredStatus` is STOPPED.
    pub stopping: bool,
    /// The stop under way.
    pub stop: Option<Stop>,
    /// Why it was started.
    pub start_reason: StartReason,
    /// When it was started (`createdAt`).
    pub created_at: Duration,
    /// When it became RUNNING (`startedAt`).
    pub started_at: Option<Duration>,
    /// When its process exited (`stoppedAt`).
    pub stopped_at: Option<Duration>,
    /// ECS-side protection: until then.
    pub protected_until: Option<Duration>,
    /// Its port, for a task that serves (assigned by the driver).
    pub port: Option<u16>,
    /// Its target, once registered.
    pub target: Option<Target>,
    /// Its container health check, when one is defined.
    pub health: Option<ContainerHealth>,
    /// ECS is replacing it.
    pub replacing: Option<Replacing>,
    /// When it first counted as healthy.
    pub healthy_at: Option<Duration>,
    /// Its process's exit code, once exited.
    pub exit_code: Option<i32>,
    /// Calls it made to the ECS API, by operation (throttled ones included).
    pub api_calls: BTreeMap<String, u64>,
    /// Of those, throttled.
    pub throttled: u64,
    /// Protection PUTs it made to its agent.
    pub agent_puts: u64,
}

impl Task {
    /// Whether ECS holds protection for it at `now`.
    #[must_use]
    pub fn protected(&self, now: Duration) -> bool {
        self.protected_until.is_some_and(|t| t > now)
    }

    /// Whether its desired status is RUNNING.
    #[must_use]
    pub fn wanted(&self) -> bool {
        !self.stopping && self.status != Status::Stopped
    }

    /// RUNNING, and not being stopped.
    #[must_use]
    pub fn running(&self) -> bool {
        self.status == Status::Running && !self.stopping
    }

    /// Its process has not exited yet.
    #[must_use]
    pub fn alive(&self) -> bool {
        self.status != Status::Stopped
    }

    /// `healthStatus`: the essential container's, UNKNOWN without a check.
    #[must_use]
    pub fn health_status(&self) -> Health {
        self.health.as_ref().map_or(Health::Unknown, |h| h.status)
    }

    /// Every ECS API call it made.
    #[must_use]
    pub fn api_call_count(&self) -> u64 {
        self.api_calls.values().sum()
    }

    /// Its target's state, if registered.
    #[must_use]
    pub fn target_state(&self) -> Option<TargetState> {
        self.target.as_ref().map(|t| t.state)
    }
}
