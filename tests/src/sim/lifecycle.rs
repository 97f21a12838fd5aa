//! A task's life as ECS runs it: started where the placement says, RUNNING once the
//! driver sees it ready, and stopped the way ECS stops a service task behind a load
//! balancer (desired status STOPPED and DEACTIVATING while the target deregisters,
//! then SIGTERM, then SIGKILL after the stop timeout). Also what the driver reports
//! back: readiness, exits, and the results of health checks.

use std::collections::BTreeMap;
use std::time::Duration;

use super::deployments;
use super::effect::{Effect, StopSignal};
use super::health::{ContainerHealth, TargetState};
use super::model::{Model, SERVICE, StartReason, Status, Stop, StopReason, Task};

/// Starts a task of `deployment` in `zone` on `instance`; returns its id.
pub(super) fn start_task(
    m: &mut Model,
    deployment: &str,
    reason: StartReason,
    (zone, instance): (String, Option<String>),
    fx: &mut Vec<Effect>,
) -> String {
    m.next_task += 1;
    let id = format!("{:032x}", 0xa000_0000_u64 + m.next_task);
    let now = m.now;
    let revision = m.deployment(deployment).map_or(0, |d| d.revision);
    let health = m
        .container_check_of(deployment)
        .map(|check| ContainerHealth::started(&check, now));
    m.index.insert(id.clone(), m.tasks.len());
    m.tasks.push(Task {
        id: id.clone(),
        deployment: deployment.to_owned(),
        revision,
        zone,
        instance,
        status: Status::Pending,
        stopping: false,
        stop: None,
        start_reason: reason,
        created_at: now,
        started_at: None,
        stopped_at: None,
        protected_until: None,
        port: None,
        target: None,
        health,
        replacing: None,
        healthy_at: None,
        exit_code: None,
        api_calls: BTreeMap::new(),
        throttled: 0,
        agent_puts: 0,
    });
    fx.push(Effect::Start { task: id.clone() });
    id
}

/// ECS decides to stop a task: desired status STOPPED; behind a load balancer its
/// target starts deregistering (DEACTIVATING) and SIGTERM waits for the
/// deregistration delay; otherwise SIGTERM comes at the next step.
pub(super) fn stop_task(m: &mut Model, id: &str, reason: StopReason, fx: &mut Vec<Effect>) {
    let now = m.now;
    let Some(task) = m.task_mut(id) else {
        return;
    };
    if task.stopping || task.status == Status::Stopped {
        return;
    }
    task.stopping = true;
    task.replacing = None;
    task.stop = Some(Stop {
        reason,
        at: now,
        sigterm_at: None,
        killed: false,
    });
    if let Some(target) = &mut task.target {
        target.state = TargetState::Draining;
        task.status = Status::Deactivating;
        fx.push(Effect::Deregister {
            task: id.to_owned(),
        });
    } else if task.status == Status::Running {
        task.status = Status::Deactivating;
    }
    // A task that was to replace another no longer does.
    for t in &mut m.tasks {
        if let Some(r) = &mut t.replacing
            && r.by.as_deref() == Some(id)
        {
            r.by = None;
        }
    }
}

/// Moves every stop along: SIGTERM once the deregistration delay has passed (the
/// target's connections are closed then), SIGKILL at the end of the stop timeout.
pub(super) fn advance_stops(m: &mut Model, fx: &mut Vec<Effect>) {
    let now = m.now;
    let delay = m
        .settings
        .target_group
        .map_or(Duration::ZERO, |tg| tg.deregistration_delay);
    let stop_timeout = m.settings.stop_timeout;
    let mut killed = Vec::new();
    for task in &mut m.tasks {
        if task.status == Status::Stopped {
            continue;
        }
        let Some(stop) = &mut task.stop else {
            continue;
        };
        match stop.sigterm_at {
            None => {
                let wait = if task.target.is_some() {
                    delay
                } else {
                    Duration::ZERO
                };
                if now >= stop.at + wait {
                    stop.sigterm_at = Some(now);
                    task.status = Status::Stopping;
                    if task.target.take().is_some() {
                        fx.push(Effect::Remove {
                            task: task.id.clone(),
                        });
                    }
                    fx.push(Effect::Signal {
                        task: task.id.clone(),
                        signal: StopSignal::Term,
                    });
                }
            }
            Some(at) if !stop.killed && now >= at + stop_timeout => {
                stop.killed = true;
                fx.push(Effect::Signal {
                    task: task.id.clone(),
                    signal: StopSignal::Kill,
                });
                killed.push(task.id.clone());
            }
            Some(_) => {}
        }
    }
    for id in killed {
        m.sigkills += 1;
        m.event(format!(
            "(service {SERVICE}) task {id} killed at its stop timeout"
        ));
    }
}

/// Targets of tasks whose process has exited are removed from the load balancer.
pub(super) fn remove_dead_targets(m: &mut Model, fx: &mut Vec<Effect>) {
    for task in &mut m.tasks {
        if task.status == Status::Stopped && task.target.take().is_some() {
            fx.push(Effect::Remove {
                task: task.id.clone(),
            });
        }
    }
}

impl Model {
    /// The driver gave the task a port (before it starts).
    pub fn assign_port(&mut self, id: &str, port: u16) {
        if let Some(t) = self.task_mut(id) {
            t.port = Some(port);
        }
    }

    /// The task is ready (its port accepts, or it said it is): RUNNING.
    pub fn task_ready(&mut self, id: &str, now: Duration) {
        self.now = self.now.max(now);
        if let Some(t) = self.task_mut(id)
            && t.status == Status::Pending
            && !t.stopping
        {
            t.status = Status::Running;
            t.started_at = Some(now);
        }
    }

    /// The task's process exited with `code` (`None`: killed by a signal).
    pub fn process_exited(&mut self, id: &str, code: Option<i32>, now: Duration) {
        self.now = self.now.max(now);
        let Some(t) = self.task_mut(id) else {
            return;
        };
        if t.status == Status::Stopped {
            return;
        }
        let crashed = !t.stopping;
        let never_ran = t.started_at.is_none();
        let deployment = t.deployment.clone();
        t.status = Status::Stopped;
        t.stopped_at = Some(now);
        t.protected_until = None;
        t.exit_code = code;
        t.replacing = None;
        if crashed {
            t.stopping = true;
            t.stop = Some(Stop {
                reason: StopReason::EssentialExited,
                at: now,
                sigterm_at: None,
                killed: false,
            });
            self.crashes += 1;
            self.event(format!(
                "(service {SERVICE}) task {id} stopped: essential container exited"
            ));
            // The circuit breaker's first stage: a task that never reached RUNNING.
            if never_ran {
                deployments::task_failed(self, &deployment);
            }
        }
        for t in &mut self.tasks {
            if let Some(r) = &mut t.replacing
                && r.by.as_deref() == Some(id)
            {
                r.by = None;
            }
        }
    }

    /// One target group health check of the task came back.
    pub fn target_checked(&mut self, id: &str, ok: bool, now: Duration) {
        self.now = self.now.max(now);
        let Some(tg) = self.settings.target_group else {
            return;
        };
        if let Some(target) = self.task_mut(id).and_then(|t| t.target.as_mut()) {
            target.checked(&tg.check, ok);
        }
    }

    /// One container health check of the task came back.
    pub fn container_checked(&mut self, id: &str, ok: bool, now: Duration) {
        self.now = self.now.max(now);
        let Some(deployment) = self.task(id).map(|t| t.deployment.clone()) else {
            return;
        };
        let Some(check) = self.container_check_of(&deployment) else {
            return;
        };
        if let Some(health) = self.task_mut(id).and_then(|t| t.health.as_mut()) {
            health.checked(&check, ok, now);
        }
    }
}
