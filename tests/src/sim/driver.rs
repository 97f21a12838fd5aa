//! The real-time driver: the pure core run against the world. Every tick it reaps
//! exited processes and notes ready ones, runs a scheduler step, and applies the
//! effects: real processes of the service's binary as tasks, the TCP load balancer,
//! health checks over loopback and with the binary's own `healthcheck` command. The
//! HTTP server answers the tasks' calls with the same model.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use nix::sys::signal::Signal;

use super::api::{self, Answer, Caller};
use super::balancer::{self, Balancer};
use super::effect::{Effect, StopSignal};
use super::model::{Model, Revision, Status};
use super::scheduler;
use super::server::Server;
use super::settings::{Settings, TargetCheck};
use crate::process::Service;

/// How often the driver steps.
const TICK: Duration = Duration::from_millis(100);

/// When a started task counts as RUNNING.
#[derive(Debug, Clone, Copy)]
pub enum Ready {
    /// Once its port (the first of [`SimConfig::ports`]) accepts connections.
    Port,
    /// Once it has printed a line containing this.
    Line(&'static str),
}

/// The service to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The binary each task runs.
    pub binary: &'static str,
    /// Its environment, besides what the simulator sets (the agent, metadata and ECS
    /// API endpoints, AWS credentials and Region, the ports below).
    pub env: Vec<(String, String)>,
    /// When a task counts as RUNNING.
    pub ready: Ready,
    /// Variables that get a fresh loopback port for each task; the first is the
    /// task's port (its target's, and the one [`Ready::Port`] waits for).
    pub ports: Vec<&'static str>,
    /// The ECS side.
    pub ecs: Settings,
}

impl SimConfig {
    /// The websocket server as the deployment files run it ([`Settings::websocket`]).
    #[must_use]
    pub fn websocket(desired: u32) -> Self {
        Self {
            binary: "websocket",
            env: Vec::new(),
            ready: Ready::Port,
            ports: vec!["PORT"],
            ecs: Settings::websocket(desired),
        }
    }

    /// The worker as the deployment files run it ([`Settings::queue_consumer`]), its
    /// health endpoint on `HEALTH_PORT`.
    #[must_use]
    pub fn queue_consumer(desired: u32) -> Self {
        Self {
            binary: "queue-consumer",
            env: Vec::new(),
            ready: Ready::Line("Long polling"),
            ports: vec!["HEALTH_PORT"],
            ecs: Settings::queue_consumer(desired),
        }
    }

    /// The deployment files' shape at a test's pace: the target group checks every
    /// second (healthy after 2, unhealthy after 2), the container every second (3
    /// retries, a start period of 2 s), failures count 5 s after a task runs (the
    /// grace period), and a deregistration delay of 3 s.
    #[must_use]
    pub fn at_test_pace(mut self) -> Self {
        let s = &mut self.ecs;
        if let Some(tg) = &mut s.target_group {
            tg.check = TargetCheck {
                interval: Duration::from_secs(1),
                timeout: Duration::from_secs(1),
                healthy: 2,
                unhealthy: 2,
            };
            tg.deregistration_delay = Duration::from_secs(3);
            s.health_check_grace = Duration::from_secs(5);
        }
        if let Some(check) = &mut s.container_check {
            check.interval = Duration::from_secs(1);
            check.timeout = Duration::from_secs(2);
            check.retries = 3;
            check.start_period = Duration::from_secs(2);
        }
        self
    }

    /// Adds environment variables.
    #[must_use]
    pub fn env<'a>(mut self, vars: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        self.env
            .extend(vars.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())));
        self
    }
}

/// The model, shared by the driver, the server and the test.
#[derive(Debug, Clone)]
pub struct Shared(Arc<Mutex<Model>>);

impl Shared {
    /// Shares `model`.
    #[must_use]
    pub fn new(model: Model) -> Self {
        Self(Arc::new(Mutex::new(model)))
    }

    /// The model, locked.
    pub fn lock(&self) -> MutexGuard<'_, Model> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The driver's clock: time since the simulation began, on tokio's clock.
#[derive(Debug)]
pub struct Clock {
    start: tokio::time::Instant,
}

impl Clock {
    /// A clock whose time zero is now.
    #[must_use]
    pub fn started() -> Self {
        Self {
            start: tokio::time::Instant::now(),
        }
    }

    /// Now, as the model counts time.
    #[must_use]
    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }
}

/// Every task's process, stopped ones included (for their logs), and its environment.
type ProcessMap = BTreeMap<String, (Service, Vec<(String, String)>)>;
/// The same, shared.
type Processes = Arc<Mutex<ProcessMap>>;

/// A running simulation; dropping it kills every task.
#[derive(Debug)]
pub struct Simulator {
    model: Shared,
    clock: Arc<Clock>,
    balancer: Option<Balancer>,
    processes: Processes,
    server: Arc<Server>,
    driver: tokio::task::JoinHandle<()>,
    dead: tokio::task::JoinHandle<()>,
}

impl Simulator {
    /// Starts the service and waits until its first deployment has completed: its
    /// tasks RUNNING and healthy.
    ///
    /// # Panics
    /// When the settings cannot be simulated, or the tasks do not become healthy
    /// within two minutes.
    pub async fn start(config: SimConfig) -> Self {
        let clock = Arc::new(Clock::started());
        let mut model = Model::new(config.ecs.clone(), SystemTime::now());
        let (dead_port, dead) = balancer::dead_port().await;
        model.misrouted_port = dead_port;
        let model = Shared::new(model);
        let server = Arc::new(Server::start(model.clone(), Arc::clone(&clock)).await);
        let balancer = match config.ecs.target_group {
            Some(_) => Some(Balancer::start().await),
            None => None,
        };
        let processes = Processes::default();
        let driver = tokio::spawn(
            Driver {
                config,
                model: model.clone(),
                clock: Arc::clone(&clock),
                server: Arc::clone(&server),
                balancer: balancer.clone(),
                processes: Arc::clone(&processes),
            }
            .run(),
        );
        let sim = Self {
            model,
            clock,
            balancer,
            processes,
            server,
            driver,
            dead,
        };
        sim.wait_for(
            "the first tasks to run and be healthy",
            Duration::from_secs(120),
            |m| m.primary().completed(),
        )
        .await;
        sim
    }

    /// The model, locked: read it, or change it.
    pub fn model(&self) -> MutexGuard<'_, Model> {
        self.model.lock()
    }

    /// Now, as the model counts time.
    #[must_use]
    pub fn now(&self) -> Duration {
        self.clock.now()
    }

    /// The load balancer, for a service behind one.
    #[must_use]
    pub fn balancer(&self) -> Option<&Balancer> {
        self.balancer.as_ref()
    }

    /// Sets the service's desired count, as Service Auto Scaling does.
    pub fn set_desired(&self, desired: u32) {
        self.model().set_desired(desired);
    }

    /// Starts a deployment of a new revision like the last; returns its id.
    pub fn deploy(&self) -> String {
        self.deploy_with(Revision::default())
    }

    /// Starts a deployment of `revision`; returns its id.
    pub fn deploy_with(&self, revision: Revision) -> String {
        self.model().deploy(revision)
    }

    /// An ECS API call from outside the service (a test, a deploy tool), counted
    /// against the account's buckets like any.
    pub fn api(&self, operation: &str, body: &serde_json::Value) -> Answer {
        let now = self.clock.now();
        api::ecs(&mut self.model(), Caller::Other, operation, body, now)
    }

    /// The ECS API endpoint for callers outside the service.
    #[must_use]
    pub fn api_endpoint(&self) -> String {
        self.server.other_endpoint()
    }

    /// Waits until `done` holds for the model, checking every 100 ms; returns how long
    /// it took.
    ///
    /// # Panics
    /// After `timeout`, with `what` and the state of every task.
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

    /// One line per deployment and task, for failure messages. A caller that holds
    /// the model's lock passes it to [`Simulator::describe_with`] instead.
    #[must_use]
    pub fn describe(&self) -> String {
        match self.model.0.try_lock() {
            Ok(m) => Self::describe_with(&m),
            Err(std::sync::TryLockError::Poisoned(m)) => Self::describe_with(&m.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => {
                "(the model is locked: describe it with describe_with)".to_owned()
            }
        }
    }

    /// [`Simulator::describe`] of a model already locked.
    #[must_use]
    pub fn describe_with(m: &Model) -> String {
        let mut out = format!(
            "t={:.1}s desired {}, sigkills {}, crashes {}, blocked {}",
            m.now.as_secs_f64(),
            m.desired,
            m.sigkills,
            m.crashes,
            m.blocked,
        );
        for d in m.live_deployments() {
            out.push_str(&format!(
                "\n  deployment {}{} {} {} failures={} stage={:?} {}",
                d.id,
                if d.id == m.primary { " PRIMARY" } else { "" },
                d.rollout.as_str(),
                d.progress.as_str(),
                d.failures,
                d.stage.map(|(s, _)| s.as_str()),
                d.reason,
            ));
        }
        for t in m.tasks.iter().filter(|t| t.alive() || t.stop.is_some()) {
            out.push_str(&format!(
                "\n  {} {} {} {}{} protected={} health={} target={} zone={}{}",
                &t.id[24..],
                t.deployment,
                t.status.as_str(),
                if t.stopping { "(stopping) " } else { "" },
                t.stop.as_ref().map_or(String::new(), |s| s.reason.text()),
                t.protected(m.now),
                t.health_status().as_str(),
                t.target_state().map_or("-", |s| s.as_str()),
                t.zone,
                if t.replacing.is_some() {
                    " (being replaced)"
                } else {
                    ""
                },
            ));
        }
        for (at, e) in m.events.iter().rev().take(8).rev() {
            out.push_str(&format!("\n  [{:.1}s] {e}", at.as_secs_f64()));
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
            .flat_map(|(id, (p, _))| p.lines().into_iter().map(move |l| (id.clone(), l)))
            .collect()
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.driver.abort();
        self.dead.abort();
        // Each process is killed as its handle drops.
        self.processes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

struct Driver {
    config: SimConfig,
    model: Shared,
    clock: Arc<Clock>,
    server: Arc<Server>,
    balancer: Option<Balancer>,
    processes: Processes,
}

impl Driver {
    async fn run(self) {
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            self.reap();
            self.promote().await;
            let (effects, routes) = {
                let mut m = self.model.lock();
                let fx = scheduler::step(&mut m, self.clock.now());
                (fx, m.routable())
            };
            if let Some(lb) = &self.balancer {
                lb.route(routes);
            }
            for effect in effects {
                self.apply(effect);
            }
        }
    }

    fn lock_processes(&self) -> MutexGuard<'_, ProcessMap> {
        self.processes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Processes that exited.
    fn reap(&self) {
        let now = self.clock.now();
        let mut exited = Vec::new();
        for (id, (process, _)) in self.lock_processes().iter_mut() {
            if let Some(status) = process.try_wait() {
                exited.push((id.clone(), status.code()));
            }
        }
        let mut m = self.model.lock();
        for (id, code) in exited {
            m.process_exited(&id, code, now);
        }
    }

    /// Pending tasks that are ready become RUNNING.
    async fn promote(&self) {
        let pending: Vec<(String, Option<u16>)> = self
            .model
            .lock()
            .tasks
            .iter()
            .filter(|t| t.status == Status::Pending && !t.stopping)
            .map(|t| (t.id.clone(), t.port))
            .collect();
        for (id, port) in pending {
            let ready = match (self.config.ready, port) {
                (Ready::Port, Some(port)) => tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok(),
                (Ready::Line(needle), _) => self
                    .lock_processes()
                    .get(&id)
                    .is_some_and(|(p, _)| p.count(needle) > 0),
                (Ready::Port, None) => true,
            };
            if ready {
                self.model.lock().task_ready(&id, self.clock.now());
            }
        }
    }

    fn apply(&self, effect: Effect) {
        match effect {
            Effect::Start { task } => self.start(&task),
            Effect::Register { .. } | Effect::Deregister { .. } => {}
            Effect::Remove { task } => {
                if let Some(lb) = &self.balancer {
                    lb.remove(&task);
                }
            }
            Effect::Signal { task, signal } => {
                if let Some((p, _)) = self.lock_processes().get(&task) {
                    p.signal(match signal {
                        StopSignal::Term => Signal::SIGTERM,
                        StopSignal::Kill => Signal::SIGKILL,
                    });
                }
            }
            Effect::ProbeTarget {
                task,
                port,
                timeout,
            } => {
                let model = self.model.clone();
                let clock = Arc::clone(&self.clock);
                tokio::spawn(async move {
                    let ok = balancer::healthz(port, timeout).await;
                    model.lock().target_checked(&task, ok, clock.now());
                });
            }
            Effect::CheckContainer {
                task,
                command,
                timeout,
            } => {
                let env = self
                    .lock_processes()
                    .get(&task)
                    .map(|(_, env)| env.clone())
                    .unwrap_or_default();
                let model = self.model.clone();
                let clock = Arc::clone(&self.clock);
                let binary = self.config.binary;
                tokio::spawn(async move {
                    let args: Vec<&str> = command.iter().map(String::as_str).collect();
                    let env: Vec<(&str, String)> =
                        env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
                    let ok = crate::process::run_within(binary, &args, &env, timeout).await;
                    model.lock().container_checked(&task, ok, clock.now());
                });
            }
        }
    }

    /// Starts a task's process with its environment.
    fn start(&self, id: &str) {
        let revision_env = {
            let m = self.model.lock();
            m.task(id)
                .and_then(|t| m.deployment(&t.deployment))
                .map(|d| d.spec.env.clone())
                .unwrap_or_default()
        };
        let mut env: Vec<(String, String)> = self.config.env.clone();
        env.extend(revision_env);
        env.extend(self.server.env_for(id));
        env.extend(
            [
                ("TASK_PROTECTION_BACKEND", "agent"),
                ("AWS_REGION", "us-east-1"),
                ("AWS_ACCESS_KEY_ID", "testing"),
                ("AWS_SECRET_ACCESS_KEY", "testing"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
        );
        for (i, var) in self.config.ports.iter().enumerate() {
            let port = crate::free_port();
            env.push(((*var).to_owned(), port.to_string()));
            if i == 0 {
                self.model.lock().assign_port(id, port);
            }
            if *var == "PORT" {
                env.push(("BIND_ADDRESS".to_owned(), "127.0.0.1".to_owned()));
            }
        }
        let vars: Vec<(&str, String)> = env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let process = Service::spawn(self.config.binary, &[], &vars);
        self.lock_processes().insert(id.to_owned(), (process, env));
    }
}
