//! A deployment (or task set) and a container instance, as ECS knows them.

use std::time::Duration;

use super::{ARN_PREFIX, CLUSTER, SERVICE};
use crate::sim::settings::ContainerCheck;

/// `rolloutState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rollout {
    /// Under way.
    InProgress,
    /// Reached a steady state.
    Completed,
    /// The circuit breaker failed it.
    Failed,
}

impl Rollout {
    /// ECS's spelling.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InProgress => "IN_PROGRESS",
            Self::Completed => "COMPLETED",
            Self::Failed => "FAILED",
        }
    }
}

/// A service deployment's `status` (`DescribeServiceDeployments`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Not started.
    Pending,
    /// Under way.
    InProgress,
    /// Done.
    Successful,
    /// Stopped by a newer deployment.
    Stopped,
    /// Being rolled back.
    RollbackInProgress,
    /// Rolled back.
    RollbackSuccessful,
}

impl Progress {
    /// ECS's spelling.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::InProgress => "IN_PROGRESS",
            Self::Successful => "SUCCESSFUL",
            Self::Stopped => "STOPPED",
            Self::RollbackInProgress => "ROLLBACK_IN_PROGRESS",
            Self::RollbackSuccessful => "ROLLBACK_SUCCESSFUL",
        }
    }
}

/// A blue/green deployment's `lifecycleStage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// The green side has not started.
    PreScaleUp,
    /// The green side scales up to 100 %, without traffic.
    ScaleUp,
    /// The green side runs; blue has all production traffic.
    PostScaleUp,
    /// Test traffic shifts to green.
    TestTrafficShift,
    /// Green has the test traffic.
    PostTestTrafficShift,
    /// Production traffic shifts to green.
    ProductionTrafficShift,
    /// Green has the production traffic.
    PostProductionTrafficShift,
    /// Both sides run after the shift, for the bake time.
    BakeTime,
    /// The blue side is being stopped.
    CleanUp,
}

impl Stage {
    /// ECS's spelling.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PreScaleUp => "PRE_SCALE_UP",
            Self::ScaleUp => "SCALE_UP",
            Self::PostScaleUp => "POST_SCALE_UP",
            Self::TestTrafficShift => "TEST_TRAFFIC_SHIFT",
            Self::PostTestTrafficShift => "POST_TEST_TRAFFIC_SHIFT",
            Self::ProductionTrafficShift => "PRODUCTION_TRAFFIC_SHIFT",
            Self::PostProductionTrafficShift => "POST_PRODUCTION_TRAFFIC_SHIFT",
            Self::BakeTime => "BAKE_TIME",
            Self::CleanUp => "CLEAN_UP",
        }
    }
}

/// What a deployment deploys: a task definition revision and its service revision's
/// settings. A test makes a bad revision with it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revision {
    /// Environment on top of the service's.
    pub env: Vec<(String, String)>,
    /// A container health check other than the service's.
    pub container_check: Option<ContainerCheck>,
    /// The target group checks a port where the task does not listen: the tasks run
    /// and their containers are HEALTHY, but their targets never are.
    pub target_port_wrong: bool,
}

/// A circuit-breaker rollback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackInfo {
    /// The deployment rolled back to.
    pub to: String,
    /// When.
    pub started_at: Duration,
    /// Why.
    pub reason: String,
}

/// One deployment (or task set).
#[derive(Debug, Clone)]
pub struct Deployment {
    /// `ecs-svc/...`.
    pub id: String,
    /// Its task definition revision.
    pub revision: u32,
    /// What it deploys.
    pub spec: Revision,
    /// When it was created.
    pub created_at: Duration,
    /// When it last changed.
    pub updated_at: Duration,
    /// `rolloutState`.
    pub rollout: Rollout,
    /// `rolloutStateReason`.
    pub reason: String,
    /// The circuit breaker's failure count (`failedTasks`).
    pub failures: u32,
    /// When it finished (completed, failed, rolled back).
    pub finished_at: Option<Duration>,
    /// Its service deployment's `status`.
    pub progress: Progress,
    /// Its blue/green lifecycle stage, and since when.
    pub stage: Option<(Stage, Duration)>,
    /// The deployments it replaces (`sourceServiceRevisions`).
    pub source: Vec<String>,
    /// The rollback that undid it.
    pub rollback: Option<RollbackInfo>,
    /// INACTIVE: no longer listed by DescribeServices.
    pub inactive: bool,
}

impl Deployment {
    /// Its service deployment's ARN.
    #[must_use]
    pub fn arn(&self) -> String {
        format!(
            "{ARN_PREFIX}:service-deployment/{CLUSTER}/{SERVICE}/{}",
            &self.id[8..]
        )
    }

    /// Its service revision's ARN.
    #[must_use]
    pub fn revision_arn(&self) -> String {
        format!(
            "{ARN_PREFIX}:service-revision/{CLUSTER}/{SERVICE}/{}",
            &self.id[8..]
        )
    }

    /// Whether it completed (`rolloutState` COMPLETED).
    #[must_use]
    pub fn completed(&self) -> bool {
        self.rollout == Rollout::Completed
    }
}

/// A container instance's `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceStatus {
    /// Takes tasks.
    Active,
    /// Takes no new task; its service tasks are replaced.
    Draining,
}

/// One EC2 container instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// Its ARN.
    pub arn: String,
    /// Its EC2 instance id.
    pub ec2_id: String,
    /// Its zone.
    pub zone: String,
    /// ACTIVE or DRAINING.
    pub status: InstanceStatus,
    /// When it registered.
    pub registered_at: Duration,
}
