//! What ECS knows of the simulated service: its deployments, its tasks (with their
//! protection, health and registration), its container instances, the account's API
//! buckets and every call made. Pure data and queries: time is a [`Duration`] since the
//! simulation began, handed in by whoever drives it; nothing here reads a clock.

mod deployment;
mod task;

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

pub use deployment::{
    Deployment, Instance, InstanceStatus, Progress, Revision, RollbackInfo, Rollout, Stage,
};
pub use task::{Replacing, StartReason, Status, Stop, StopReason, Task};

use super::buckets::Buckets;
use super::health::{Health, Target, TargetGroupRole, TargetState};
use super::settings::{ContainerCheck, Launch, Settings};

/// The cluster's name.
pub const CLUSTER: &str = "sim-cluster";
/// The service's name.
pub const SERVICE: &str = "sim-service";
/// The task definition family.
pub const FAMILY: &str = "sim";
/// The account and Region every ARN names.
pub const ARN_PREFIX: &str = "arn:aws:ecs:us-east-1:123456789012";

/// The cluster's ARN.
#[must_use]
pub fn cluster_arn() -> String {
    format!("{ARN_PREFIX}:cluster/{CLUSTER}")
}

/// The service's ARN.
#[must_use]
pub fn service_arn() -> String {
    format!("{ARN_PREFIX}:service/{CLUSTER}/{SERVICE}")
}

/// A task's ARN from its id.
#[must_use]
pub fn task_arn(id: &str) -> String {
    format!("{ARN_PREFIX}:task/{CLUSTER}/{id}")
}

/// A task definition's ARN from its revision.
#[must_use]
pub fn task_definition_arn(revision: u32) -> String {
    format!("{ARN_PREFIX}:task-definition/{FAMILY}:{revision}")
}

/// The target group's ARN (the production one, or blue/green's alternate).
#[must_use]
pub fn target_group_arn(role: TargetGroupRole) -> String {
    let name = match role {
        TargetGroupRole::Production => "sim-blue/0123456789abcdef",
        TargetGroupRole::Alternate => "sim-green/fedcba9876543210",
    };
    format!("arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/{name}")
}

/// How the ECS API answers, to test the watcher's faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ApiFault {
    /// As ECS does.
    #[default]
    None,
    /// `AccessDeniedException`.
    Denied,
    /// `ThrottlingException`, whatever the buckets hold.
    Throttled,
    /// No answer for this long.
    Slow(Duration),
    /// A 200 whose body is not what the operation returns.
    Malformed,
}

/// The whole simulated service.
#[derive(Debug)]
pub struct Model {
    /// Its settings.
    pub settings: Settings,
    /// The wall-clock time at the simulation's start, for the API's timestamps.
    pub epoch: SystemTime,
    /// The latest time the model was told of.
    pub now: Duration,
    /// The service's desired count.
    pub desired: u32,
    /// Every deployment, oldest first, inactive ones included.
    pub deployments: Vec<Deployment>,
    /// The PRIMARY deployment's id.
    pub primary: String,
    /// Every task ever started, stopped ones included. Tasks are added by the
    /// scheduler only (it keeps an index of them), and never removed.
    pub tasks: Vec<Task>,
    /// Where each task is in `tasks`, by id: thousands of tasks are looked up per call.
    pub(super) index: HashMap<String, usize>,
    /// The container instances, on EC2.
    pub instances: Vec<Instance>,
    /// How the API answers.
    pub fault: ApiFault,
    /// The account's API buckets.
    pub buckets: Buckets,
    /// Protection enables refused with `DEPLOYMENT_BLOCKED`.
    pub blocked: u64,
    /// Tasks killed with SIGKILL at the end of their stop timeout.
    pub sigkills: u64,
    /// Tasks whose process exited while ECS wanted them running.
    pub crashes: u64,
    /// Service events, as ECS writes them.
    pub events: Vec<(Duration, String)>,
    /// A loopback port where nothing answers HTTP: where a misconfigured target
    /// group checks.
    pub misrouted_port: u16,
    /// Effects of changes made between steps (a StopTask), handed out by the next
    /// step.
    pub(super) outbox: Vec<super::effect::Effect>,
    /// The service's revision numbers so far.
    pub(super) next_revision: u32,
    pub(super) next_deployment: u64,
    pub(super) next_task: u64,
}

impl Model {
    /// A service with `settings`, its first deployment, and no task yet (the first
    /// scheduler step starts them). `epoch` is the wall-clock time of `now` = 0.
    ///
    /// # Panics
    /// When the settings cannot be simulated ([`Settings::validate`]).
    #[must_use]
    pub fn new(settings: Settings, epoch: SystemTime) -> Self {
        if let Err(why) = settings.validate() {
            panic!("the simulator cannot run this service: {why}");
        }
        let mut instances = Vec::new();
        if let Launch::Ec2 { instances_per_zone } = settings.launch {
            for zone in &settings.zones {
                for _ in 0..instances_per_zone {
                    let n = instances.len() + 1;
                    instances.push(Instance {
                        arn: format!(
                            "{ARN_PREFIX}:container-instance/{CLUSTER}/{:032x}",
                            0xc000_0000_u64 + n as u64
                        ),
                        ec2_id: format!("i-{:017x}", 0xe000_u64 + n as u64),
                        zone: zone.clone(),
                        status: InstanceStatus::Active,
                        registered_at: Duration::ZERO,
                    });
                }
            }
        }
        let mut model = Self {
            desired: settings.desired,
            buckets: Buckets::new(settings.throttling.on, settings.throttling.others.clone()),
            settings,
            epoch,
            now: Duration::ZERO,
            deployments: Vec::new(),
            primary: String::new(),
            tasks: Vec::new(),
            index: HashMap::new(),
            instances,
            fault: ApiFault::None,
            blocked: 0,
            sigkills: 0,
            crashes: 0,
            events: Vec::new(),
            misrouted_port: 1,
            outbox: Vec::new(),
            next_revision: 0,
            next_deployment: 1_000_000_000,
            next_task: 0,
        };
        let id = model.add_deployment(Revision::default(), None, Duration::ZERO);
        model.primary = id;
        model
    }

    /// Adds a deployment of `spec` (or of an existing revision); returns its id. It
    /// is not made PRIMARY here.
    pub(super) fn add_deployment(
        &mut self,
        spec: Revision,
        revision: Option<u32>,
        now: Duration,
    ) -> String {
        self.next_deployment += 1;
        let revision = revision.unwrap_or_else(|| {
            self.next_revision += 1;
            self.next_revision
        });
        let id = format!("ecs-svc/{}", self.next_deployment);
        let source = self.live_deployments().map(|d| d.id.clone()).collect();
        self.deployments.push(Deployment {
            id: id.clone(),
            revision,
            spec,
            created_at: now,
            updated_at: now,
            rollout: Rollout::InProgress,
            reason: String::new(),
            failures: 0,
            finished_at: None,
            progress: Progress::InProgress,
            stage: None,
            source,
            rollback: None,
            inactive: false,
        });
        id
    }

    /// The PRIMARY deployment.
    ///
    /// # Panics
    /// Never: the PRIMARY one always exists.
    #[must_use]
    pub fn primary(&self) -> &Deployment {
        self.deployment(&self.primary)
            .expect("the PRIMARY deployment exists")
    }

    /// The deployment with this id.
    #[must_use]
    pub fn deployment(&self, id: &str) -> Option<&Deployment> {
        self.deployments.iter().find(|d| d.id == id)
    }

    /// The deployment with this id, to change.
    pub fn deployment_mut(&mut self, id: &str) -> Option<&mut Deployment> {
        self.deployments.iter_mut().find(|d| d.id == id)
    }

    /// Deployments DescribeServices lists (PRIMARY and ACTIVE), oldest first.
    pub fn live_deployments(&self) -> impl Iterator<Item = &Deployment> {
        self.deployments.iter().filter(|d| !d.inactive)
    }

    /// The task with this id.
    #[must_use]
    pub fn task(&self, id: &str) -> Option<&Task> {
        self.index.get(id).and_then(|&i| self.tasks.get(i))
    }

    /// The task with this id, to change.
    pub fn task_mut(&mut self, id: &str) -> Option<&mut Task> {
        let i = *self.index.get(id)?;
        self.tasks.get_mut(i)
    }

    /// The task with this ARN (or id).
    #[must_use]
    pub fn task_by_arn(&self, arn: &str) -> Option<&Task> {
        let id = arn.rsplit('/').next().unwrap_or(arn);
        self.task(id)
    }

    /// Tasks whose desired status is RUNNING.
    pub fn wanted(&self) -> impl Iterator<Item = &Task> {
        self.tasks.iter().filter(|t| t.wanted())
    }

    /// Tasks RUNNING (not being stopped), of one deployment or of all.
    #[must_use]
    pub fn running(&self, deployment: Option<&str>) -> u32 {
        count(
            self.tasks
                .iter()
                .filter(|t| t.running())
                .filter(|t| deployment.is_none_or(|d| t.deployment == d)),
        )
    }

    /// How many tasks of a deployment ECS still wants running.
    #[must_use]
    pub fn wanted_of(&self, deployment: &str) -> u32 {
        count(self.wanted().filter(|t| t.deployment == deployment))
    }

    /// Tasks not yet stopped.
    #[must_use]
    pub fn alive(&self) -> u32 {
        count(self.tasks.iter().filter(|t| t.alive()))
    }

    /// Whether ECS counts the task healthy at the model's `now`: RUNNING, its target
    /// healthy behind a load balancer, its container HEALTHY where a check is defined,
    /// and without any check, RUNNING for `healthy_without_checks_after`.
    #[must_use]
    pub fn is_healthy(&self, task: &Task) -> bool {
        if !task.running() {
            return false;
        }
        let has_lb = self.settings.target_group.is_some();
        let lb_ok = !has_lb || task.target_state() == Some(TargetState::Healthy);
        let container_ok = task
            .health
            .as_ref()
            .is_none_or(|h| h.status == Health::Healthy);
        if !has_lb && task.health.is_none() {
            return task
                .started_at
                .is_some_and(|s| self.now >= s + self.settings.healthy_without_checks_after);
        }
        lb_ok && container_ok
    }

    /// The container check of a deployment's tasks.
    #[must_use]
    pub fn container_check_of(&self, deployment: &str) -> Option<ContainerCheck> {
        self.deployment(deployment)
            .and_then(|d| d.spec.container_check.clone())
            .or_else(|| self.settings.container_check.clone())
    }

    /// Where the load balancer sends new connections: the registered targets in the
    /// production target group that are healthy, or, when none is, every one of them
    /// (an ALB fails open when all its targets are unhealthy). Initial targets get
    /// nothing until they pass.
    #[must_use]
    pub fn routable(&self) -> Vec<(String, u16)> {
        let in_production: Vec<(&Task, &Target)> = self
            .tasks
            .iter()
            .filter_map(|t| t.target.as_ref().map(|target| (t, target)))
            .filter(|(_, target)| {
                target.group == TargetGroupRole::Production && target.state != TargetState::Draining
            })
            .collect();
        let healthy: Vec<(String, u16)> = in_production
            .iter()
            .filter(|(_, target)| target.state == TargetState::Healthy)
            .map(|(t, target)| (t.id.clone(), target.port))
            .collect();
        if !healthy.is_empty() {
            return healthy;
        }
        in_production
            .iter()
            .filter(|(_, target)| target.state == TargetState::Unhealthy)
            .map(|(t, target)| (t.id.clone(), target.port))
            .collect()
    }

    /// Records a service event (not twice in a row).
    pub fn event(&mut self, text: String) {
        if self.events.last().is_none_or(|(_, last)| *last != text) {
            self.events.push((self.now, text));
        }
    }

    /// Tasks started after `since`, for a reason.
    #[must_use]
    pub fn started_since(&self, since: Duration, reason: StartReason) -> u32 {
        count(
            self.tasks
                .iter()
                .filter(|t| t.created_at >= since && t.start_reason == reason),
        )
    }

    /// Tasks ECS decided to stop after `since`.
    #[must_use]
    pub fn stopped_since(&self, since: Duration) -> u32 {
        count(
            self.tasks
                .iter()
                .filter(|t| t.stop.as_ref().is_some_and(|s| s.at >= since)),
        )
    }

    /// The wall-clock time of `at`.
    #[must_use]
    pub fn wall(&self, at: Duration) -> SystemTime {
        self.epoch + at
    }
}

/// A count as `u32`.
pub(super) fn count<T>(iter: impl Iterator<Item = T>) -> u32 {
    u32::try_from(iter.count()).unwrap_or(u32::MAX)
}
