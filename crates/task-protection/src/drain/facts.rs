//! What ECS says of a service and its tasks, read into plain types: the inputs of the
//! decision. Each field names the ECS API field it comes from.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

/// Who runs the service's deployments (`deploymentController.type`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Controller {
    /// `ECS`: ECS's own rolling, blue/green, linear or canary deployments.
    #[default]
    Ecs,
    /// `CODE_DEPLOY`: CodeDeploy shifts traffic between task sets.
    CodeDeploy,
    /// `EXTERNAL`: a third-party controller manages task sets.
    External,
    /// A type this crate does not know.
    Other(String),
}

impl Controller {
    /// From `deploymentController.type`; absent means `ECS`.
    #[must_use]
    pub fn parse(value: Option<&str>) -> Self {
        match value {
            None | Some("ECS") => Self::Ecs,
            Some("CODE_DEPLOY") => Self::CodeDeploy,
            Some("EXTERNAL") => Self::External,
            Some(other) => Self::Other(other.to_owned()),
        }
    }
}

/// How an ECS-controlled deployment replaces tasks (`deploymentConfiguration.strategy`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Strategy {
    /// `ROLLING` (the default): new tasks start and old ones stop within
    /// minimumHealthyPercent and maximumPercent.
    #[default]
    Rolling,
    /// `BLUE_GREEN`, `LINEAR` or `CANARY`: the new side runs in full before production
    /// traffic shifts to it, and the old side is kept through a bake time.
    TrafficShift(String),
}

impl Strategy {
    /// From `deploymentConfiguration.strategy`; absent means `ROLLING`.
    #[must_use]
    pub fn parse(value: Option<&str>) -> Self {
        match value {
            None | Some("ROLLING") => Self::Rolling,
            Some(other) => Self::TrafficShift(other.to_owned()),
        }
    }
}

/// `rolloutState` of a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Rollout {
    /// `IN_PROGRESS`.
    InProgress,
    /// `COMPLETED`.
    Completed,
    /// `FAILED`: the circuit breaker tripped, or the deployment was stopped.
    Failed,
    /// Absent (older services and deployment types) or unknown.
    #[default]
    Unknown,
}

impl Rollout {
    /// From `rolloutState`.
    #[must_use]
    pub fn parse(value: Option<&str>) -> Self {
        match value {
            Some("IN_PROGRESS") => Self::InProgress,
            Some("COMPLETED") => Self::Completed,
            Some("FAILED") => Self::Failed,
            _ => Self::Unknown,
        }
    }
}

/// One entry of `deployments` in `DescribeServices`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentFacts {
    /// `id`, `ecs-svc/...`: the `startedBy` of the tasks it starts.
    pub id: String,
    /// `status` is `PRIMARY`: the newest deployment, the one ECS rolls towards.
    pub primary: bool,
    /// `taskDefinition`.
    pub task_definition: String,
    /// `desiredCount`.
    pub desired: u32,
    /// `runningCount`.
    pub running: u32,
    /// `pendingCount`.
    pub pending: u32,
    /// `failedTasks`: tasks of this deployment that failed to start or to stay healthy.
    pub failed_tasks: u32,
    /// `rolloutState`.
    pub rollout: Rollout,
    /// `createdAt`.
    pub created_at: Option<SystemTime>,
}

/// The service, from `DescribeServices`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceFacts {
    /// `desiredCount`.
    pub desired: u32,
    /// `runningCount`.
    pub running: u32,
    /// `pendingCount`.
    pub pending: u32,
    /// `schedulingStrategy` is `DAEMON`: one task per container instance.
    pub daemon: bool,
    /// `deploymentController.type`.
    pub controller: Controller,
    /// `deploymentConfiguration.strategy`.
    pub strategy: Strategy,
    /// `deploymentConfiguration.minimumHealthyPercent` (ECS's default: 100).
    pub minimum_healthy_percent: u32,
    /// `deploymentConfiguration.maximumPercent` (ECS's default: 200).
    pub maximum_percent: u32,
    /// `healthCheckGracePeriodSeconds`: ECS ignores failed load balancer health checks
    /// for this long after a task starts.
    pub grace: Duration,
    /// `deployments`, in ECS's order.
    pub deployments: Vec<DeploymentFacts>,
    /// `currentServiceDeployment`: the ARN of the service deployment ECS is running
    /// or ran last, for its lifecycle stage.
    pub current_deployment: Option<String>,
    /// `loadBalancers` is not empty: ECS also acts on its target group's health
    /// checks, which `healthStatus` does not show.
    pub load_balanced: bool,
}

impl ServiceFacts {
    /// The PRIMARY deployment, when ECS lists one.
    #[must_use]
    pub fn primary(&self) -> Option<&DeploymentFacts> {
        self.deployments.iter().find(|d| d.primary)
    }

    /// What must match between two looks for nothing to have happened meanwhile:
    /// counts, deployments and their states.
    #[must_use]
    pub fn digest(&self) -> String {
        let mut out = format!("{}/{}/{}", self.desired, self.running, self.pending);
        for d in &self.deployments {
            out.push_str(&format!(
                ";{}:{}:{}/{}/{}:{}:{:?}",
                d.id,
                u8::from(d.primary),
                d.desired,
                d.running,
                d.pending,
                d.failed_tasks,
                d.rollout
            ));
        }
        out
    }

    /// A service at rest: it runs what it wants, one deployment, completed (or of a
    /// kind that reports no rollout state).
    #[must_use]
    pub fn at_rest(&self) -> bool {
        self.running == self.desired
            && self.pending == 0
            && self.deployments.len() <= 1
            && self
                .deployments
                .iter()
                .all(|d| matches!(d.rollout, Rollout::Completed | Rollout::Unknown))
    }
}

/// `healthStatus` of a task: from its containers' health checks only (ECS does not
/// put the load balancer's view of a target here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Health {
    /// `HEALTHY`.
    Healthy,
    /// `UNHEALTHY`: ECS replaces the task whatever its protection.
    Unhealthy,
    /// `UNKNOWN`: no container health check, or none has passed or failed yet.
    #[default]
    Unknown,
}

impl Health {
    /// From `healthStatus`.
    #[must_use]
    pub fn parse(value: Option<&str>) -> Self {
        match value {
            Some("HEALTHY") => Self::Healthy,
            Some("UNHEALTHY") => Self::Unhealthy,
            _ => Self::Unknown,
        }
    }
}

/// One task of the service, from `ListTasks` and `DescribeTasks`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskFacts {
    /// `taskArn`.
    pub arn: String,
    /// `group`: `service:NAME` for a service's task.
    pub group: Option<String>,
    /// `startedBy`: the deployment that started it (`ecs-svc/...`).
    pub deployment: Option<String>,
    /// `taskDefinitionArn`.
    pub task_definition: Option<String>,
    /// `lastStatus` is `RUNNING`.
    pub running: bool,
    /// `desiredStatus` is `STOPPED`: ECS is stopping it (a stop, a replacement, a
    /// scale-in of an unprotected task).
    pub stopping: bool,
    /// `healthStatus`.
    pub health: Health,
    /// `startedAt`: when it became RUNNING.
    pub started_at: Option<SystemTime>,
    /// `availabilityZone`.
    pub zone: Option<String>,
    /// `containerInstanceArn` (EC2 and managed instances; none on Fargate).
    pub instance: Option<String>,
}

impl TaskFacts {
    /// The task's id: the last part of its ARN.
    #[must_use]
    pub fn id(&self) -> &str {
        task_id(&self.arn)
    }
}

/// A task's id from its ARN (`arn:aws:ecs:region:account:task/cluster/ID`), or the
/// text itself when it has no `/`.
#[must_use]
pub fn task_id(arn: &str) -> &str {
    arn.rsplit('/').next().unwrap_or(arn)
}

/// Where an ECS blue/green, linear or canary deployment stands, from
/// `DescribeServiceDeployments`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShiftFacts {
    /// `status`: `PENDING`, `IN_PROGRESS`, `SUCCESSFUL`, `STOPPED`,
    /// `ROLLBACK_REQUESTED`, ...
    pub status: String,
    /// `lifecycleStage`: `SCALE_UP`, `PRODUCTION_TRAFFIC_SHIFT`, `BAKE_TIME`,
    /// `CLEAN_UP`, ...
    pub stage: Option<String>,
}

impl ShiftFacts {
    /// Production traffic has shifted and the bake time is over: ECS is cleaning up
    /// the old side, or has finished.
    #[must_use]
    pub fn old_side_released(&self) -> bool {
        let rolling_back = self.status.starts_with("ROLLBACK") || self.status.starts_with("STOP");
        !rolling_back && (self.status == "SUCCESSFUL" || self.stage.as_deref() == Some("CLEAN_UP"))
    }
}

/// Everything one decision reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// The service.
    pub service: ServiceFacts,
    /// Its tasks whose desired status is RUNNING, when they were listed this time.
    pub tasks: Option<Vec<TaskFacts>>,
    /// Container instances of those tasks that are DRAINING.
    pub draining_instances: BTreeSet<String>,
    /// The traffic-shifting deployment in progress, when there is one and it was read.
    pub shift: Option<ShiftFacts>,
    /// The ids of the tasks ECS lists with desired status STOPPED (stopping, or
    /// stopped within about an hour), when the tasks were listed this time.
    pub stopped: BTreeSet<String>,
}
