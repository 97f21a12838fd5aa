//! An ECS service on one machine, for the drain tests and benchmarks: the real
//! service binaries run as its tasks, each with its own agent protection endpoint and
//! task metadata endpoint, an ECS JSON API answers them, a scheduler starts and stops
//! tasks as ECS's service scheduler does, and a load balancer sends new connections
//! to the healthy ones. Loopback only.
//!
//! The scheduler, as ECS's:
//! - it keeps the service at its desired count, starting tasks of the PRIMARY
//!   deployment;
//! - it stops only unprotected tasks: the surplus when the desired count falls, and the
//!   old deployment's tasks during a rolling deployment (maximum 200 %, minimum
//!   healthy 100 %: an old task goes only while enough healthy tasks remain);
//! - it stops a task as ECS does one behind a load balancer: deregister, wait the
//!   deregistration delay, SIGTERM, SIGKILL after the stop timeout.
//!
//! - [`model`]: what ECS knows: deployments, tasks, protection, counted calls;
//! - [`api`]: the agent, metadata and ECS API endpoints, in the real shapes;
//! - [`balancer`]: the load balancer and its health checks;
//! - [`scheduler`]: the service scheduler.

pub mod api;
pub mod balancer;
pub mod model;
pub mod scheduler;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

pub use balancer::{Balancer, HealthCheck};
pub use model::{ApiFault, Model, Shared, Status};

use crate::process::Service;

/// When a started task counts as RUNNING.
#[derive(Debug, Clone, Copy)]
pub enum Ready {
    /// Once its `PORT` accepts connections.
    Port,
    /// Once it has printed a line containing this.
    Line(&'static str),
}

/// The service to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The binary each task runs.
    pub binary: &'static str,
    /// Its environment, besides what the simulator sets (the agent, metadata and
    /// ECS API endpoints, AWS credentials and Region, `PORT` for a serving task).
    pub env: Vec<(String, String)>,
    /// The desired count to start with.
    pub desired: u32,
    /// When a task counts as RUNNING.
    pub ready: Ready,
    /// The load balancer's health check, for a service behind one.
    pub health: Option<HealthCheck>,
    /// The target group's deregistration delay.
    pub deregistration_delay: Duration,
    /// From SIGTERM to SIGKILL.
    pub stop_timeout: Duration,
}

/// A running simulation; dropping it kills every task.
#[derive(Debug)]
pub struct Simulator {
    model: Shared,
    balancer: Option<Balancer>,
    processes: Processes,
    scheduler: tokio::task::JoinHandle<()>,
    _api: Arc<api::Api>,
}

/// Every task's process, stopped ones included (for their logs).
pub(crate) type Processes = Arc<Mutex<BTreeMap<String, Service>>>;

impl Simulator {
    /// Starts the service and waits until its tasks are RUNNING (and healthy, behind a
    /// load balancer).
    pub async fn start(config: SimConfig) -> Self {
        let model = Shared::new(config.desired);
        let api = Arc::new(api::Api::start(model.clone()).await);
        let balancer = match config.health {
            Some(check) => Some(Balancer::start(check).await),
            None => None,
        };
        let processes = Processes::default();
        let scheduler = tokio::spawn(
            scheduler::Scheduler::new(
                config.clone(),
                model.clone(),
                Arc::clone(&api),
                balancer.clone(),
                Arc::clone(&processes),
            )
            .run(),
        );
        let sim = Self {
            model,
            balancer,
            processes,
            scheduler,
            _api: api,
        };
        let desired = config.desired;
        sim.wait_for("the first tasks to run", Duration::from_secs(60), |m| {
            m.running(None) >= desired
        })
        .await;
        if let Some(lb) = &sim.balancer {
            crate::wait_for(
                "the first tasks to be healthy",
                Duration::from_secs(60),
                || {
                    let m = sim.model();
                    let ok = m.wanted().all(|t| lb.healthy(&t.id));
                    async move { ok.then_some(()) }
                },
            )
            .await;
        }
        sim
    }

    /// The model, locked: read it, or change the desired count or a fault.
    pub fn model(&self) -> MutexGuard<'_, Model> {
        self.model.lock()
    }

    /// The load balancer's port, for a service behind one.
    #[must_use]
    pub fn balancer(&self) -> Option<&Balancer> {
        self.balancer.as_ref()
    }

    /// Sets the service's desired count, as Service Auto Scaling does.
    pub fn set_desired(&self, desired: u32) {
        self.model().desired = desired;
    }

    /// Starts a deployment; returns its id.
    pub fn deploy(&self) -> String {
        self.model().new_deployment()
    }

    /// Waits until `done` holds for the model, checking every 100 ms.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&Model) -> bool,
    ) -> Duration {
        let start = tokio::time::Instant::now();
        loop {
            if done(&self.model()) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}: {}",
                self.describe()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One line per task and deployment, for failure messages.
    #[must_use]
    pub fn describe(&self) -> String {
        let m = self.model();
        let now = std::time::Instant::now();
        let mut out = format!(
            "desired {}, deployments {:?}, sigkills {}, crashes {}, blocked {}",
            m.desired,
            m.deployments
                .iter()
                .map(|d| (d.id.as_str(), d.completed.is_some()))
                .collect::<Vec<_>>(),
            m.sigkills,
            m.crashes,
            m.blocked,
        );
        for t in &m.tasks {
            out.push_str(&format!(
                "\n  {} {} {}{} protected={} healthy={}",
                &t.id[24..],
                t.deployment,
                t.status.as_str(),
                if t.stopping { " (stopping)" } else { "" },
                t.protected(now),
                self.balancer.as_ref().is_some_and(|lb| lb.healthy(&t.id)),
            ));
        }
        out
    }

    /// Every line every task printed, with the task's id.
    #[must_use]
    pub fn lines(&self) -> Vec<(String, String)> {
        self.processes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .flat_map(|(id, p)| p.lines().into_iter().map(move |l| (id.clone(), l)))
            .collect()
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.scheduler.abort();
        // Each process is killed as its handle drops.
        self.processes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}
