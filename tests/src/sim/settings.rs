//! How the simulated service is configured on the ECS side: its deployment
//! configuration, load balancer, container health check, Availability Zones, capacity
//! and the account's API throttling, with the deployment files' values as defaults
//! (`copilot/*/manifest.yml`, `cloudformation/task-protection.yml`). The settings where
//! ECS's own behaviour is not documented are in [`Unknowns`], each with every variant.
//!
//! Durations may be shorter than ECS allows (a health check every second), so that a
//! test runs at its own pace; [`Settings::validate`] refuses only what makes no sense.

use std::time::Duration;

/// The service, as ECS is told of it.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `desiredCount` to start with.
    pub desired: u32,
    /// `schedulingStrategy`.
    pub scheduling: Scheduling,
    /// `deploymentController.type`.
    pub controller: Controller,
    /// `deploymentConfiguration.strategy` (and its bake time).
    pub strategy: Strategy,
    /// `deploymentConfiguration.minimumHealthyPercent`.
    pub minimum_healthy_percent: u32,
    /// `deploymentConfiguration.maximumPercent`.
    pub maximum_percent: u32,
    /// `deploymentConfiguration.deploymentCircuitBreaker`, when enabled.
    pub circuit_breaker: Option<CircuitBreaker>,
    /// `healthCheckGracePeriodSeconds`: load balancer and container health check
    /// failures are ignored this long after a task starts running.
    pub health_check_grace: Duration,
    /// The target group the service registers its tasks with, if any.
    pub target_group: Option<TargetGroup>,
    /// The essential container's health check (`healthCheck` in the task definition).
    pub container_check: Option<ContainerCheck>,
    /// From SIGTERM to SIGKILL (`stopTimeout`).
    pub stop_timeout: Duration,
    /// The Availability Zones of the service's subnets.
    pub zones: Vec<String>,
    /// `availabilityZoneRebalancing` is `ENABLED`.
    pub rebalancing: bool,
    /// Fargate, or EC2 container instances.
    pub launch: Launch,
    /// Without any health check, a task counts as healthy this long after it starts
    /// running.
    pub healthy_without_checks_after: Duration,
    /// The account's API token buckets and the other callers that share them.
    pub throttling: Throttling,
    /// What ECS does where its documentation does not say.
    pub unknowns: Unknowns,
}

/// `schedulingStrategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduling {
    /// The desired count of tasks.
    Replica,
    /// One task on each ACTIVE container instance (EC2 only).
    Daemon,
}

/// `deploymentController.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controller {
    /// ECS deploys: rolling or blue/green.
    Ecs,
    /// CodeDeploy deploys with task sets.
    CodeDeploy,
    /// A third-party tool deploys with task sets.
    External,
}

impl Controller {
    /// ECS's spelling.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ecs => "ECS",
            Self::CodeDeploy => "CODE_DEPLOY",
            Self::External => "EXTERNAL",
        }
    }
}

/// `deploymentConfiguration.strategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Old tasks replaced by new ones within minimumHealthyPercent and maximumPercent.
    Rolling,
    /// The new side brought to 100 % beside the old, traffic shifted, a bake time, then
    /// the old side cleaned up.
    BlueGreen {
        /// `bakeTimeInMinutes`, at a test's pace.
        bake: Duration,
        /// How long each stage that waits on nothing lasts (lifecycle hooks would make
        /// it longer), so that an observer can see it.
        stage: Duration,
    },
}

/// `deploymentCircuitBreaker` with `enable: true`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitBreaker {
    /// `rollback`.
    pub rollback: bool,
}

/// The target group's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetGroup {
    /// Its health check.
    pub check: TargetCheck,
    /// `deregistration_delay.timeout_seconds`.
    pub deregistration_delay: Duration,
}

/// The target group's health check (`GET /healthz`, 200).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetCheck {
    /// `HealthCheckIntervalSeconds`.
    pub interval: Duration,
    /// `HealthCheckTimeoutSeconds`.
    pub timeout: Duration,
    /// `HealthyThresholdCount`.
    pub healthy: u32,
    /// `UnhealthyThresholdCount`.
    pub unhealthy: u32,
}

impl TargetCheck {
    /// The deployment files': every 5 s, 4 s timeout, healthy after 2, unhealthy
    /// after 2.
    #[must_use]
    pub fn deployed() -> Self {
        Self {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(4),
            healthy: 2,
            unhealthy: 2,
        }
    }
}

/// A container health check, as a task definition's `healthCheck`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerCheck {
    /// The arguments the task's own binary is run with (`CMD` without the binary).
    pub command: Vec<String>,
    /// `interval`.
    pub interval: Duration,
    /// `timeout`.
    pub timeout: Duration,
    /// `retries`.
    pub retries: u32,
    /// `startPeriod`.
    pub start_period: Duration,
}

impl ContainerCheck {
    /// The deployment files': `<binary> healthcheck` every 30 s, 5 s timeout, 3
    /// retries, a start period of 10 s.
    #[must_use]
    pub fn deployed() -> Self {
        Self {
            command: vec!["healthcheck".to_owned()],
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(5),
            retries: 3,
            start_period: Duration::from_secs(10),
        }
    }
}

/// Where tasks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launch {
    /// `FARGATE`: no container instances.
    Fargate,
    /// `EC2`: this many container instances in each zone.
    Ec2 {
        /// Container instances per zone.
        instances_per_zone: u32,
    },
}

/// The account's API throttling.
#[derive(Debug, Clone, PartialEq)]
pub struct Throttling {
    /// Whether calls take tokens at all.
    pub on: bool,
    /// Other callers of the same account and Region.
    pub others: Vec<OtherCaller>,
}

/// Calls that others make on one bucket (deploy tools, consoles, other services).
#[derive(Debug, Clone, PartialEq)]
pub struct OtherCaller {
    /// Its name, for the counts.
    pub name: String,
    /// An operation of the bucket it calls (`DescribeServices`, `ListTasks`, ...).
    pub operation: String,
    /// Calls a second, steadily.
    pub rate: f64,
    /// Now and then a burst: this many calls at once, every `every`.
    pub burst: Option<(Duration, u32)>,
}

/// Where ECS's documentation is silent: each setting has every variant, and the tests
/// that depend on one say which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unknowns {
    /// What a circuit-breaker rollback does with the last completed deployment.
    pub rollback: RollbackMode,
    /// Whether a DRAINING container instance's protected tasks wait.
    pub instance_draining: InstanceDraining,
    /// What the task metadata endpoint says of a task ECS is deregistering.
    pub metadata_while_deactivating: MetadataWhileDeactivating,
    /// Whether an unhealthy task above the desired count is replaced or only stopped.
    pub unhealthy_surplus: UnhealthySurplus,
    /// Whether zone rebalancing starts a task when every task it could stop is
    /// protected.
    pub rebalancing_with_protection: RebalancingWithProtection,
    /// What `deployments` holds for the CODE_DEPLOY and EXTERNAL controllers.
    pub task_set_deployments: TaskSetDeployments,
}

/// See [`Unknowns::rollback`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RollbackMode {
    /// The last completed deployment becomes PRIMARY again, with the tasks it still
    /// runs (its service deployment goes from COMPLETED back to IN_PROGRESS).
    KeepOldTasks,
    /// A new deployment of the last completed task definition starts new tasks, and
    /// replaces the old ones as any deployment does.
    StartNewTasks,
}

/// See [`Unknowns::instance_draining`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceDraining {
    /// Protected tasks are stopped like the others.
    StopsProtected,
    /// Protected tasks stay until their protection ends.
    WaitsForProtection,
}

/// See [`Unknowns::metadata_while_deactivating`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetadataWhileDeactivating {
    /// `DesiredStatus` RUNNING until SIGTERM: the agent is told to stop the task only
    /// after deregistration.
    Running,
    /// `DesiredStatus` STOPPED from the moment ECS decides to stop the task.
    Stopped,
}

/// See [`Unknowns::unhealthy_surplus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnhealthySurplus {
    /// Every unhealthy task gets a replacement first, within maximumPercent.
    Replaced,
    /// An unhealthy task the service could do without is stopped, not replaced.
    StoppedOnly,
}

/// See [`Unknowns::rebalancing_with_protection`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebalancingWithProtection {
    /// No task is started unless one in an over-served zone can be stopped.
    ChecksFirst,
    /// The task is started; when the task to stop is protected once it is healthy,
    /// rebalancing stops, the started task is surplus for scale-in to stop, and
    /// rebalancing tries again: a loop for as long as the protection lasts.
    StartsAnyway,
}

/// See [`Unknowns::task_set_deployments`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskSetDeployments {
    /// `deployments` is empty.
    Empty,
    /// `deployments` lists the PRIMARY task set as a deployment.
    Primary,
}

impl Default for Unknowns {
    fn default() -> Self {
        Self {
            rollback: RollbackMode::KeepOldTasks,
            instance_draining: InstanceDraining::StopsProtected,
            metadata_while_deactivating: MetadataWhileDeactivating::Running,
            unhealthy_surplus: UnhealthySurplus::Replaced,
            rebalancing_with_protection: RebalancingWithProtection::ChecksFirst,
            task_set_deployments: TaskSetDeployments::Empty,
        }
    }
}

impl Settings {
    /// The websocket service of the deployment files: behind the target group
    /// (every 5 s, 2/2, deregistration delay 20 s), `websocket healthcheck` as the
    /// container check, a grace period of 30 s (the template's; Copilot's default is
    /// 60 s), rolling at 100 %/200 % with the circuit breaker and rollback, a stop
    /// timeout of 35 s, two zones with rebalancing (the default for a service created
    /// without the setting), Fargate.
    #[must_use]
    pub fn websocket(desired: u32) -> Self {
        Self {
            desired,
            scheduling: Scheduling::Replica,
            controller: Controller::Ecs,
            strategy: Strategy::Rolling,
            minimum_healthy_percent: 100,
            maximum_percent: 200,
            circuit_breaker: Some(CircuitBreaker { rollback: true }),
            health_check_grace: Duration::from_secs(30),
            target_group: Some(TargetGroup {
                check: TargetCheck::deployed(),
                deregistration_delay: Duration::from_secs(20),
            }),
            container_check: Some(ContainerCheck::deployed()),
            stop_timeout: Duration::from_secs(35),
            zones: vec!["us-east-1a".to_owned(), "us-east-1b".to_owned()],
            rebalancing: true,
            launch: Launch::Fargate,
            healthy_without_checks_after: Duration::from_secs(40),
            throttling: Throttling {
                on: true,
                others: Vec::new(),
            },
            unknowns: Unknowns::default(),
        }
    }

    /// The queue-consumer service of the deployment files: no load balancer,
    /// `queue-consumer healthcheck` as the container check, no grace period, a stop
    /// timeout of 40 s; otherwise as [`Settings::websocket`].
    #[must_use]
    pub fn queue_consumer(desired: u32) -> Self {
        Self {
            health_check_grace: Duration::ZERO,
            target_group: None,
            stop_timeout: Duration::from_secs(40),
            ..Self::websocket(desired)
        }
    }

    /// Why these settings cannot be simulated, if they cannot.
    ///
    /// # Errors
    /// The first setting that makes no sense, named.
    pub fn validate(&self) -> Result<(), String> {
        if self.minimum_healthy_percent > 100 {
            return Err(format!(
                "minimumHealthyPercent {} is above 100",
                self.minimum_healthy_percent
            ));
        }
        if self.maximum_percent < 100 || self.maximum_percent > 400 {
            return Err(format!(
                "maximumPercent {} is outside 100..=400",
                self.maximum_percent
            ));
        }
        if self.zones.is_empty() {
            return Err("no Availability Zone".to_owned());
        }
        if self.scheduling == Scheduling::Daemon {
            if !matches!(self.launch, Launch::Ec2 { .. }) {
                return Err("DAEMON scheduling needs EC2 container instances".to_owned());
            }
            if self.maximum_percent != 100 {
                return Err("DAEMON scheduling needs maximumPercent 100".to_owned());
            }
        }
        if let Launch::Ec2 { instances_per_zone } = self.launch
            && instances_per_zone == 0
        {
            return Err("EC2 launch with no container instance".to_owned());
        }
        if let Some(tg) = &self.target_group {
            let c = tg.check;
            if c.interval.is_zero() || c.timeout.is_zero() {
                return Err(
                    "the target group's check interval and timeout must be above 0".to_owned(),
                );
            }
            if !(2..=10).contains(&c.healthy) || !(2..=10).contains(&c.unhealthy) {
                return Err("the target group's thresholds must be 2..=10".to_owned());
            }
        }
        if let Some(c) = &self.container_check {
            if c.interval.is_zero() || c.timeout.is_zero() {
                return Err("the container check's interval and timeout must be above 0".to_owned());
            }
            if !(1..=10).contains(&c.retries) {
                return Err("the container check's retries must be 1..=10".to_owned());
            }
        }
        if let Strategy::BlueGreen { stage, .. } = self.strategy
            && stage.is_zero()
        {
            return Err("a blue/green stage must last above 0".to_owned());
        }
        for other in &self.throttling.others {
            if !other.rate.is_finite() || other.rate < 0.0 {
                return Err(format!("other caller {}: rate {}", other.name, other.rate));
            }
            if crate::sim::buckets::group_of(&other.operation).is_none() {
                return Err(format!(
                    "other caller {}: {} is in no throttling group",
                    other.name, other.operation
                ));
            }
        }
        Ok(())
    }

    /// Tasks ECS keeps healthy during a deployment: minimumHealthyPercent of `desired`,
    /// rounded up.
    #[must_use]
    pub fn minimum_healthy(&self, desired: u32) -> u32 {
        (u64::from(desired) * u64::from(self.minimum_healthy_percent))
            .div_ceil(100)
            .try_into()
            .unwrap_or(u32::MAX)
    }

    /// Tasks RUNNING or PENDING at most: maximumPercent of `desired`, rounded down.
    #[must_use]
    pub fn maximum_running(&self, desired: u32) -> u32 {
        (u64::from(desired) * u64::from(self.maximum_percent) / 100)
            .try_into()
            .unwrap_or(u32::MAX)
    }

    /// The circuit breaker's threshold: half the desired count, rounded up, at least 3
    /// and at most 200.
    #[must_use]
    pub fn circuit_breaker_threshold(desired: u32) -> u32 {
        desired.div_ceil(2).clamp(3, 200)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_round_as_ecs_documents() {
        let mut s = Settings::websocket(4);
        s.minimum_healthy_percent = 75;
        s.maximum_percent = 150;
        assert_eq!(s.minimum_healthy(2), 2);
        assert_eq!(s.maximum_running(3), 4);
        s.minimum_healthy_percent = 50;
        assert_eq!(s.minimum_healthy(4), 2);
        assert_eq!(s.minimum_healthy(3), 2);
    }

    #[test]
    fn the_circuit_breaker_threshold_is_half_the_desired_count_within_3_and_200() {
        assert_eq!(Settings::circuit_breaker_threshold(1), 3);
        assert_eq!(Settings::circuit_breaker_threshold(25), 13);
        assert_eq!(Settings::circuit_breaker_threshold(400), 200);
    }

    #[test]
    fn nonsense_is_refused_by_name() {
        let mut s = Settings::websocket(2);
        s.minimum_healthy_percent = 150;
        assert!(s.validate().unwrap_err().contains("minimumHealthyPercent"));
        let mut s = Settings::websocket(2);
        s.scheduling = Scheduling::Daemon;
        assert!(s.validate().unwrap_err().contains("DAEMON"));
        let mut s = Settings::websocket(2);
        s.throttling.others.push(OtherCaller {
            name: "x".into(),
            operation: "Nothing".into(),
            rate: 1.0,
            burst: None,
        });
        assert!(s.validate().unwrap_err().contains("no throttling group"));
        assert_eq!(Settings::queue_consumer(2).validate(), Ok(()));
    }
}
