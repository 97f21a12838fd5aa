//! What ECS knows of the simulated service: its deployments, its tasks and their
//! protection, and every call the tasks made. Shared by the API stand-in (which
//! reads and changes it when a task calls) and the scheduler (which acts on it).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

/// The cluster's name.
pub const CLUSTER: &str = "sim-cluster";
/// The service's name.
pub const SERVICE: &str = "sim-service";
/// The account and Region every ARN names.
const ARN_PREFIX: &str = "arn:aws:ecs:us-east-1:123456789012";

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

/// Where a task stands, as ECS's `lastStatus` says.
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

/// One task.
#[derive(Debug, Clone)]
pub struct Task {
    /// Its id (the last part of its ARN).
    pub id: String,
    /// The deployment that started it.
    pub deployment: String,
    /// `lastStatus`.
    pub status: Status,
    /// ECS wants it stopped.
    pub stopping: bool,
    /// When it was started, and when it became RUNNING.
    pub created: Instant,
    /// When it became RUNNING, on the wall clock (`startedAt`).
    pub started_at: Option<SystemTime>,
    /// When its process exited.
    pub stopped_at: Option<Instant>,
    /// ECS-side protection: until this instant.
    pub protected_until: Option<Instant>,
    /// The port it listens on, if it serves.
    pub port: Option<u16>,
    /// Calls it made to the ECS API, by operation.
    pub api_calls: BTreeMap<String, u64>,
    /// Protection PUTs it made to its agent.
    pub agent_puts: u64,
}

impl Task {
    /// Whether ECS holds protection for it at `now`.
    #[must_use]
    pub fn protected(&self, now: Instant) -> bool {
        self.protected_until.is_some_and(|t| t > now)
    }

    /// Whether its desired status is RUNNING.
    #[must_use]
    pub fn wanted(&self) -> bool {
        !self.stopping && self.status != Status::Stopped
    }

    /// Every ECS API call it made.
    #[must_use]
    pub fn api_call_count(&self) -> u64 {
        self.api_calls.values().sum()
    }
}

/// One deployment.
#[derive(Debug, Clone)]
pub struct Deployment {
    /// `ecs-svc/...`.
    pub id: String,
    /// When it was created.
    pub created_at: SystemTime,
    /// When it finished, if it has.
    pub completed: Option<Instant>,
}

/// How the ECS API answers a task, to test the watcher's faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ApiFault {
    /// As ECS does.
    #[default]
    None,
    /// `AccessDeniedException`.
    Denied,
    /// `ThrottlingException`.
    Throttled,
    /// No answer for this long.
    Slow(Duration),
    /// A 200 whose body is not what the operation returns.
    Malformed,
}

/// The whole simulated service.
#[derive(Debug)]
pub struct Model {
    /// The service's desired count.
    pub desired: u32,
    /// Deployments, oldest first; the last is PRIMARY.
    pub deployments: Vec<Deployment>,
    /// Every task ever started, stopped ones included.
    pub tasks: Vec<Task>,
    /// How the API answers.
    pub fault: ApiFault,
    /// Protection enables refused with `DEPLOYMENT_BLOCKED`.
    pub blocked: u64,
    /// Tasks killed with SIGKILL at the end of their stop timeout.
    pub sigkills: u64,
    /// Tasks whose process exited while ECS wanted them running.
    pub crashes: u64,
    /// Service events, as ECS writes them.
    pub events: Vec<(Instant, String)>,
    next_deployment: u64,
    next_task: u64,
}

/// The model, shared.
#[derive(Debug, Clone)]
pub struct Shared(Arc<Mutex<Model>>);

impl Shared {
    /// A service that wants `desired` tasks, with its first deployment.
    #[must_use]
    pub fn new(desired: u32) -> Self {
        let mut model = Model {
            desired,
            deployments: Vec::new(),
            tasks: Vec::new(),
            fault: ApiFault::None,
            blocked: 0,
            sigkills: 0,
            crashes: 0,
            events: Vec::new(),
            next_deployment: 1_000_000_000,
            next_task: 0,
        };
        model.new_deployment();
        Self(Arc::new(Mutex::new(model)))
    }

    /// The model, locked.
    pub fn lock(&self) -> MutexGuard<'_, Model> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Model {
    /// Starts a deployment, which becomes the PRIMARY one.
    pub fn new_deployment(&mut self) -> String {
        self.next_deployment += 1;
        let id = format!("ecs-svc/{}", self.next_deployment);
        self.deployments.push(Deployment {
            id: id.clone(),
            created_at: SystemTime::now(),
            completed: None,
        });
        id
    }

    /// The PRIMARY deployment's id.
    #[must_use]
    pub fn primary(&self) -> &str {
        self.deployments.last().map_or("", |d| d.id.as_str())
    }

    /// Registers a new task of the PRIMARY deployment; returns its id.
    pub fn new_task(&mut self, port: Option<u16>) -> String {
        self.next_task += 1;
        let id = format!("{:032x}", 0xa000_0000_u64 + self.next_task);
        self.tasks.push(Task {
            id: id.clone(),
            deployment: self.primary().to_owned(),
            status: Status::Pending,
            stopping: false,
            created: Instant::now(),
            started_at: None,
            stopped_at: None,
            protected_until: None,
            port,
            api_calls: BTreeMap::new(),
            agent_puts: 0,
        });
        id
    }

    /// The task with this id.
    pub fn task_mut(&mut self, id: &str) -> Option<&mut Task> {
        self.tasks.iter_mut().find(|t| t.id == id)
    }

    /// The task with this ARN.
    #[must_use]
    pub fn task_by_arn(&self, arn: &str) -> Option<&Task> {
        self.tasks.iter().find(|t| task_arn(&t.id) == arn)
    }

    /// Tasks whose desired status is RUNNING.
    pub fn wanted(&self) -> impl Iterator<Item = &Task> {
        self.tasks.iter().filter(|t| t.wanted())
    }

    /// Tasks RUNNING (not being stopped), of one deployment or of all.
    #[must_use]
    pub fn running(&self, deployment: Option<&str>) -> u32 {
        let n = self
            .tasks
            .iter()
            .filter(|t| t.status == Status::Running && !t.stopping)
            .filter(|t| deployment.is_none_or(|d| t.deployment == d))
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// How many tasks of a deployment ECS still wants running.
    #[must_use]
    pub fn wanted_of(&self, deployment: &str) -> u32 {
        let n = self.wanted().filter(|t| t.deployment == deployment).count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Records a service event.
    pub fn event(&mut self, text: String) {
        if self.events.last().is_none_or(|(_, last)| *last != text) {
            self.events.push((Instant::now(), text));
        }
    }
}
