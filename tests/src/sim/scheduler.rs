//! The service scheduler: keeps the desired count, rolls deployments, and stops only
//! unprotected tasks, the way ECS stops a task behind a load balancer.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;

use super::api::Api;
use super::model::{SERVICE, Shared, Status};
use super::{Balancer, Processes, Ready, SimConfig};
use crate::process::Service;

/// How often the scheduler looks.
const TICK: Duration = Duration::from_millis(200);

/// Where a stop stands.
#[derive(Debug, Clone, Copy)]
struct Stop {
    started: Instant,
    sigterm: Option<Instant>,
}

pub(super) struct Scheduler {
    config: SimConfig,
    model: Shared,
    api: Arc<Api>,
    balancer: Option<Balancer>,
    processes: Processes,
    stops: HashMap<String, Stop>,
}

impl Scheduler {
    pub(super) fn new(
        config: SimConfig,
        model: Shared,
        api: Arc<Api>,
        balancer: Option<Balancer>,
        processes: Processes,
    ) -> Self {
        Self {
            config,
            model,
            api,
            balancer,
            processes,
            stops: HashMap::new(),
        }
    }

    pub(super) async fn run(mut self) {
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            self.reap();
            self.promote().await;
            self.advance_stops();
            self.start_tasks();
            self.stop_tasks();
            self.complete_deployments();
        }
    }

    fn healthy(&self, id: &str) -> bool {
        self.balancer.as_ref().is_none_or(|lb| lb.healthy(id))
    }

    /// Processes that exited: a stop completed, or a crash.
    fn reap(&mut self) {
        let mut processes = self
            .processes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut model = self.model.lock();
        let mut crashed = Vec::new();
        for task in &mut model.tasks {
            if task.status == Status::Stopped {
                continue;
            }
            let Some(process) = processes.get_mut(&task.id) else {
                continue;
            };
            if process.try_wait().is_none() {
                continue;
            }
            task.status = Status::Stopped;
            task.stopped_at = Some(Instant::now());
            task.protected_until = None;
            self.stops.remove(&task.id);
            if let Some(lb) = &self.balancer {
                lb.remove(&task.id);
            }
            if !task.stopping {
                // Its essential container exited: ECS counts the task stopped.
                task.stopping = true;
                crashed.push(task.id.clone());
            }
        }
        for id in crashed {
            model.crashes += 1;
            model.event(format!(
                "(service {SERVICE}) task {id} stopped: essential container exited"
            ));
        }
    }

    /// Pending tasks that are ready become RUNNING, and join the load balancer.
    async fn promote(&mut self) {
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
                    .processes
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(&id)
                    .is_some_and(|p| p.count(needle) > 0),
                (Ready::Port, None) => true,
            };
            if !ready {
                continue;
            }
            if let Some(task) = self.model.lock().task_mut(&id)
                && task.status == Status::Pending
            {
                task.status = Status::Running;
                task.started_at = Some(SystemTime::now());
                if let (Some(lb), Some(port)) = (&self.balancer, port) {
                    lb.register(&id, port);
                }
            }
        }
    }

    /// Deregistration delay, then SIGTERM, then SIGKILL after the stop timeout.
    fn advance_stops(&mut self) {
        let now = Instant::now();
        let processes = self
            .processes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut model = self.model.lock();
        for (id, stop) in &mut self.stops {
            let Some(process) = processes.get(id) else {
                continue;
            };
            match stop.sigterm {
                None if now - stop.started >= self.config.deregistration_delay => {
                    if let Some(lb) = &self.balancer {
                        lb.remove(id);
                    }
                    process.signal(Signal::SIGTERM);
                    stop.sigterm = Some(now);
                    if let Some(task) = model.task_mut(id) {
                        task.status = Status::Stopping;
                    }
                }
                Some(at) if now - at >= self.config.stop_timeout => {
                    process.signal(Signal::SIGKILL);
                    stop.sigterm = Some(now + Duration::from_secs(3_600));
                    model.sigkills += 1;
                    model.event(format!(
                        "(service {SERVICE}) task {id} killed at its stop timeout"
                    ));
                }
                _ => {}
            }
        }
    }

    /// Starts tasks of the PRIMARY deployment up to the desired count, with at most
    /// 200 % of it running at once.
    fn start_tasks(&mut self) {
        loop {
            let mut model = self.model.lock();
            let desired = model.desired;
            let primary = model.primary().to_owned();
            let total = u32::try_from(model.wanted().count()).unwrap_or(u32::MAX);
            if model.wanted_of(&primary) >= desired || total >= desired.saturating_mul(2) {
                return;
            }
            let port = matches!(self.config.ready, Ready::Port).then(crate::free_port);
            let id = model.new_task(port);
            drop(model);
            let mut env: Vec<(&str, String)> = self
                .config
                .env
                .iter()
                .map(|(k, v)| (k.as_str(), v.clone()))
                .collect();
            let api_env = self.api.env_for(&id);
            env.extend(api_env.iter().map(|(k, v)| (k.as_str(), v.clone())));
            env.extend([
                ("TASK_PROTECTION_BACKEND", "agent".to_owned()),
                ("AWS_REGION", "us-east-1".to_owned()),
                ("AWS_ACCESS_KEY_ID", "testing".to_owned()),
                ("AWS_SECRET_ACCESS_KEY", "testing".to_owned()),
            ]);
            if let Some(port) = port {
                env.extend([
                    ("PORT", port.to_string()),
                    ("BIND_ADDRESS", "127.0.0.1".to_owned()),
                ]);
            }
            let process = Service::spawn(self.config.binary, &[], &env);
            self.processes
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(id, process);
        }
    }

    /// Stops unprotected tasks the service no longer wants: those of old deployments
    /// while enough healthy tasks remain, and the surplus over the desired count.
    fn stop_tasks(&mut self) {
        let now = Instant::now();
        let mut model = self.model.lock();
        let desired = model.desired;
        let primary = model.primary().to_owned();
        let mut healthy = model
            .wanted()
            .filter(|t| t.status == Status::Running && self.healthy(&t.id))
            .count();
        let desired_n = usize::try_from(desired).unwrap_or(usize::MAX);
        let mut primary_wanted = model.wanted().filter(|t| t.deployment == primary).count();
        // Old deployments first, oldest first; then the PRIMARY's surplus, oldest first.
        let order: Vec<usize> = {
            let rank = |deployment: &str| {
                model
                    .deployments
                    .iter()
                    .position(|d| d.id == deployment)
                    .unwrap_or(0)
            };
            let mut order: Vec<usize> = (0..model.tasks.len())
                .filter(|&i| model.tasks[i].wanted())
                .collect();
            order.sort_by_key(|&i| (rank(&model.tasks[i].deployment), model.tasks[i].created));
            order
        };
        let mut protected_blocking = 0;
        let mut to_stop = Vec::new();
        for i in order {
            let task = &model.tasks[i];
            let is_healthy = task.status == Status::Running && self.healthy(&task.id);
            if task.deployment == primary {
                // Scale-in: the surplus over the desired count.
                if primary_wanted <= desired_n {
                    continue;
                }
            } else if is_healthy && healthy <= desired_n {
                // A rolling deployment keeps 100 % healthy: an old task goes only once
                // a new one can take its place.
                continue;
            }
            if task.protected(now) {
                protected_blocking += 1;
                continue;
            }
            to_stop.push(task.id.clone());
            if task.deployment == primary {
                primary_wanted -= 1;
            }
            if is_healthy {
                healthy -= 1;
            }
        }
        if protected_blocking > 0 {
            model.event(format!(
                "(service {SERVICE}) was unable to scale in due to (reason {protected_blocking} tasks under protection)"
            ));
        }
        for id in to_stop {
            if let Some(task) = model.task_mut(&id) {
                task.stopping = true;
                if task.status != Status::Pending {
                    task.status = Status::Deactivating;
                }
            }
            if let Some(lb) = &self.balancer {
                lb.deregister(&id);
            }
            self.stops.insert(
                id,
                Stop {
                    started: now,
                    sigterm: None,
                },
            );
        }
    }

    /// Old deployments without tasks are gone; the PRIMARY completes once it runs
    /// every task the service wants and no other deployment remains.
    fn complete_deployments(&mut self) {
        let mut model = self.model.lock();
        let primary = model.primary().to_owned();
        let alive: Vec<String> = model
            .tasks
            .iter()
            .filter(|t| t.status != Status::Stopped)
            .map(|t| t.deployment.clone())
            .collect();
        model
            .deployments
            .retain(|d| d.id == primary || alive.contains(&d.id));
        let done = model.deployments.len() == 1 && model.running(Some(&primary)) >= model.desired;
        if let Some(d) = model.deployments.last_mut()
            && done
            && d.completed.is_none()
        {
            d.completed = Some(Instant::now());
        }
    }
}
