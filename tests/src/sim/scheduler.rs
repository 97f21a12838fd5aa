//! The service scheduler, one pure step at a time: [`step`] looks at the model at
//! `now`, changes it as ECS's scheduler would, and returns what the world must do
//! ([`Effect`]s). Its rules, each as ECS documents it:
//!
//! - it keeps the desired count, starting tasks of the PRIMARY deployment, with at
//!   most maximumPercent of it RUNNING or PENDING;
//! - a rolling deployment stops old tasks while minimumHealthyPercent of the desired
//!   count stays healthy; scale-in stops the surplus, zone by zone; both stop only
//!   unprotected tasks (protection covers scale-in and deployments only);
//! - a task that fails its target group's or its container's health check after the
//!   grace period is replaced whatever its protection: its replacement starts first
//!   when maximumPercent allows, and it stops once the replacement is healthy;
//!   otherwise unhealthy tasks stop one by one within minimumHealthyPercent;
//! - tasks on a DRAINING container instance are replaced the same way;
//! - zone rebalancing, blue/green stages and the circuit breaker are in their own
//!   modules.

use std::time::Duration;

use super::bluegreen;
use super::deployments;
use super::effect::Effect;
use super::health::{Health, Target, TargetState};
use super::lifecycle;
use super::model::{
    InstanceStatus, Model, Replacing, Revision, SERVICE, StartReason, StopReason, Task, count,
};
use super::settings::{InstanceDraining, Scheduling, UnhealthySurplus};
use super::zones;

/// One step of the scheduler at `now`.
pub fn step(m: &mut Model, now: Duration) -> Vec<Effect> {
    m.now = m.now.max(now);
    m.buckets.call_others(m.now);
    let mut fx = std::mem::take(&mut m.outbox);
    if m.settings.scheduling == Scheduling::Daemon {
        m.desired = count(
            m.instances
                .iter()
                .filter(|i| i.status == InstanceStatus::Active),
        );
    }
    lifecycle::remove_dead_targets(m, &mut fx);
    register_and_check(m, &mut fx);
    note_healthy(m);
    lifecycle::advance_stops(m, &mut fx);
    let side_by_side = deployments::side_by_side(&m.settings);
    if side_by_side {
        bluegreen::advance(m, &mut fx);
    }
    detect_unhealthy(m);
    zones::drain_instances(m, &mut fx);
    replace(m, &mut fx);
    match m.settings.scheduling {
        Scheduling::Replica => {
            start_tasks(m, &mut fx);
            if !side_by_side {
                stop_old(m, &mut fx);
            }
            scale_in(m, &mut fx);
            zones::rebalance(m, &mut fx);
        }
        Scheduling::Daemon => daemon(m, &mut fx),
    }
    deployments::complete_rolling(m, &mut fx);
    fx
}

impl Model {
    /// Sets the service's desired count, as Service Auto Scaling does.
    pub fn set_desired(&mut self, desired: u32) {
        self.desired = desired;
        self.event(format!(
            "(service {SERVICE}) desired count set to {desired}"
        ));
    }

    /// Starts a deployment of `spec` (UpdateService with a new task definition);
    /// returns its id.
    pub fn deploy(&mut self, spec: Revision) -> String {
        deployments::deploy(self, spec)
    }

    /// StopTask: the task stops whatever its protection; `false` for an unknown or
    /// stopped task.
    pub fn stop_task(&mut self, id: &str, reason: &str) -> bool {
        if !self.task(id).is_some_and(Task::wanted) {
            return false;
        }
        let mut fx = std::mem::take(&mut self.outbox);
        lifecycle::stop_task(self, id, StopReason::User(reason.to_owned()), &mut fx);
        self.outbox = fx;
        true
    }

    /// UpdateContainerInstancesState to DRAINING; `false` for an unknown instance.
    pub fn drain_instance(&mut self, arn: &str) -> bool {
        let Some(i) = self.instances.iter_mut().find(|i| i.arn == arn) else {
            return false;
        };
        i.status = InstanceStatus::Draining;
        true
    }

    /// Rolls back the side-by-side deployment under way (before its clean-up);
    /// `false` when there is none.
    pub fn roll_back(&mut self) -> bool {
        bluegreen::roll_back_current(self)
    }
}

/// Registers RUNNING tasks with the target group, and says which health checks are
/// due.
fn register_and_check(m: &mut Model, fx: &mut Vec<Effect>) {
    let now = m.now;
    let tg = m.settings.target_group;
    for i in 0..m.tasks.len() {
        let t = &m.tasks[i];
        if !t.alive() {
            continue;
        }
        let deployment = t.deployment.clone();
        let wrong_port = m
            .deployment(&deployment)
            .is_some_and(|d| d.spec.target_port_wrong);
        let group = bluegreen::group_of(m, &deployment);
        let check = m.container_check_of(&deployment);
        let misrouted = m.misrouted_port;
        let t = &mut m.tasks[i];
        if let Some(tg) = tg {
            if t.running()
                && t.target.is_none()
                && let Some(port) = t.port
            {
                t.target = Some(Target::registered(port, group, &tg.check, now));
                fx.push(Effect::Register {
                    task: t.id.clone(),
                    port,
                });
            }
            if let Some(target) = &mut t.target
                && target.check_due(&tg.check, now)
            {
                fx.push(Effect::ProbeTarget {
                    task: t.id.clone(),
                    port: if wrong_port { misrouted } else { target.port },
                    timeout: tg.check.timeout,
                });
            }
        }
        let checking = t.stop.as_ref().is_none_or(|s| s.sigterm_at.is_none());
        if let (Some(check), Some(health)) = (check, &mut t.health)
            && checking
            && health.check_due(now)
        {
            fx.push(Effect::CheckContainer {
                task: t.id.clone(),
                command: check.command.clone(),
                timeout: check.timeout,
            });
        }
    }
}

/// Tasks that became healthy: their deployment's circuit breaker starts over.
fn note_healthy(m: &mut Model) {
    let now = m.now;
    let newly: Vec<(usize, String)> = m
        .tasks
        .iter()
        .enumerate()
        .filter(|(_, t)| t.healthy_at.is_none() && m.is_healthy(t))
        .map(|(i, t)| (i, t.deployment.clone()))
        .collect();
    for (i, deployment) in newly {
        m.tasks[i].healthy_at = Some(now);
        deployments::task_healthy(m, &deployment);
    }
}

/// Tasks that fail a health check ECS acts on, past the grace period, are marked for
/// replacement; the circuit breaker counts them.
fn detect_unhealthy(m: &mut Model) {
    let now = m.now;
    let grace = m.settings.health_check_grace;
    let mut failed = Vec::new();
    for t in &mut m.tasks {
        if !t.running() || t.replacing.is_some() {
            continue;
        }
        if t.started_at.is_none_or(|s| now < s + grace) {
            continue;
        }
        let reason = if t.target_state() == Some(TargetState::Unhealthy) {
            StopReason::LoadBalancerHealth
        } else if t.health_status() == Health::Unhealthy {
            StopReason::ContainerHealth
        } else {
            continue;
        };
        failed.push((t.id.clone(), t.deployment.clone(), reason.clone()));
        t.replacing = Some(Replacing { reason, by: None });
    }
    for (id, deployment, reason) in failed {
        let why = if reason == StopReason::LoadBalancerHealth {
            "failed its target group's health checks"
        } else {
            "failed its container health checks"
        };
        m.event(format!("(service {SERVICE}) (task {id}) {why}."));
        deployments::task_failed(m, &deployment);
    }
}

/// Whether the scheduler keeps `deployment` at the desired count.
fn kept(m: &Model, deployment: &str) -> bool {
    if deployments::side_by_side(&m.settings) {
        bluegreen::kept_sides(m).iter().any(|d| d == deployment)
    } else {
        m.primary == deployment
    }
}

/// Tasks of a deployment that stay: wanted and not waiting for their replacement.
fn staying_of(m: &Model, deployment: &str) -> u32 {
    count(
        m.wanted()
            .filter(|t| t.deployment == deployment)
            .filter(|t| t.replacing.as_ref().is_none_or(|r| r.by.is_none())),
    )
}

/// Tasks ECS counts healthy now.
fn healthy_count(m: &Model) -> u32 {
    count(m.wanted().filter(|t| m.is_healthy(t)))
}

/// Tasks RUNNING or PENDING that ECS wants.
fn total(m: &Model) -> u32 {
    count(m.wanted())
}

/// Replaces the tasks marked for it (unhealthy, on a DRAINING instance, or moved by
/// zone rebalancing).
fn replace(m: &mut Model, fx: &mut Vec<Effect>) {
    let now = m.now;
    let max = m.settings.maximum_running(m.desired);
    let min = m.settings.minimum_healthy(m.desired);
    let daemon = m.settings.scheduling == Scheduling::Daemon;
    let waits = m.settings.unknowns.instance_draining == InstanceDraining::WaitsForProtection;
    let mut marked: Vec<(String, Replacing)> = m
        .tasks
        .iter()
        .filter(|t| t.wanted())
        .filter_map(|t| t.replacing.clone().map(|r| (t.id.clone(), r)))
        .collect();
    marked.sort_by_key(|(id, _)| m.task(id).map(|t| t.created_at));
    for (id, r) in marked {
        let Some(task) = m.task(&id) else {
            continue;
        };
        let deployment = task.deployment.clone();
        let protected = task.protected(now);
        let holds = match r.reason {
            StopReason::InstanceDraining => waits && protected,
            StopReason::Rebalancing => protected,
            _ => false,
        };
        if let Some(by) = &r.by {
            let ready = m.task(by).is_some_and(|b| m.is_healthy(b));
            if ready && !holds {
                lifecycle::stop_task(m, &id, r.reason.clone(), fx);
            } else if ready && r.reason == StopReason::Rebalancing {
                // Protection blocks rebalancing: it stops, and the task it started is
                // the service's surplus.
                if let Some(t) = m.task_mut(&id) {
                    t.replacing = None;
                }
                m.event(format!(
                    "(service {SERVICE}) AZ Rebalancing stopped: tasks under protection"
                ));
            }
            continue;
        }
        if r.reason == StopReason::Rebalancing || holds {
            continue;
        }
        let surplus = staying_of(m, &deployment) > m.desired;
        let stop_only = daemon
            || (r.reason.unhealthy()
                && surplus
                && m.settings.unknowns.unhealthy_surplus == UnhealthySurplus::StoppedOnly);
        if !stop_only
            && kept(m, &deployment)
            && deployments::launchable(m, &deployment)
            && total(m) < max
            && let Some(place) = zones::place(m, None)
        {
            let why = if r.reason == StopReason::InstanceDraining {
                StartReason::InstanceDraining
            } else {
                StartReason::Unhealthy
            };
            let new = lifecycle::start_task(m, &deployment, why, place, fx);
            if let Some(t) = m.task_mut(&id) {
                t.replacing = Some(Replacing {
                    reason: r.reason.clone(),
                    by: Some(new),
                });
            }
            continue;
        }
        // No room to start first: one by one, within minimumHealthyPercent.
        let in_flight = m.tasks.iter().any(|t| {
            t.alive() && t.stop.as_ref().is_some_and(|s| s.reason == r.reason) && t.stopping
        });
        let healthy = m.task(&id).is_some_and(|t| m.is_healthy(t));
        if !in_flight && (!healthy || healthy_count(m) > min || daemon) {
            lifecycle::stop_task(m, &id, r.reason.clone(), fx);
        }
    }
}

/// Starts tasks up to the desired count: the PRIMARY deployment's within
/// maximumPercent (rolling), or each side kept side by side (a blue/green green side
/// is brought to 100 % whatever maximumPercent).
fn start_tasks(m: &mut Model, fx: &mut Vec<Effect>) {
    let side_by_side = deployments::side_by_side(&m.settings);
    let sides = if side_by_side {
        bluegreen::kept_sides(m)
    } else {
        vec![m.primary.clone()]
    };
    let max = m.settings.maximum_running(m.desired);
    for side in sides {
        if !deployments::launchable(m, &side) {
            continue;
        }
        let reason = match m.deployment(&side) {
            Some(d) if !d.source.is_empty() && !d.completed() => StartReason::Deployment,
            _ => StartReason::Desired,
        };
        while staying_of(m, &side) < m.desired && (side_by_side || total(m) < max) {
            let Some(place) = zones::place(m, None) else {
                m.event(format!(
                    "(service {SERVICE}) was unable to place a task because no container instance met all of its requirements."
                ));
                break;
            };
            lifecycle::start_task(m, &side, reason, place, fx);
        }
    }
}

/// The protection event, as ECS writes it.
fn blocked_event(m: &mut Model, deployment: &str, blocked: usize) {
    if blocked > 0 {
        m.event(format!(
            "(service {SERVICE}, taskSet {deployment}) was unable to scale in due to (reason {blocked} tasks under protection)"
        ));
    }
}

/// A rolling deployment stops old deployments' unprotected tasks while enough healthy
/// tasks remain (unhealthy and pending ones first, then the oldest). A FAILED PRIMARY
/// stops nothing.
fn stop_old(m: &mut Model, fx: &mut Vec<Effect>) {
    let now = m.now;
    let primary = m.primary.clone();
    if !deployments::launchable(m, &primary) {
        return;
    }
    let min = m.settings.minimum_healthy(m.desired);
    let mut healthy = healthy_count(m);
    let mut old: Vec<(&Task, bool)> = m
        .wanted()
        .filter(|t| t.deployment != primary && t.replacing.is_none())
        .map(|t| (t, m.is_healthy(t)))
        .collect();
    old.sort_by_key(|(t, h)| (*h, t.created_at));
    let mut blocked = 0;
    let mut stops = Vec::new();
    for (t, is_healthy) in old {
        if is_healthy && healthy <= min {
            continue;
        }
        if t.protected(now) {
            blocked += 1;
            continue;
        }
        if is_healthy {
            healthy -= 1;
        }
        stops.push(t.id.clone());
    }
    for id in stops {
        lifecycle::stop_task(
            m,
            &id,
            StopReason::Scheduler {
                deployment: primary.clone(),
            },
            fx,
        );
    }
    blocked_event(m, &primary, blocked);
}

/// Scale-in: each kept side's tasks above the desired count stop, unprotected ones
/// only, zone by zone.
fn scale_in(m: &mut Model, fx: &mut Vec<Effect>) {
    let now = m.now;
    let sides = if deployments::side_by_side(&m.settings) {
        bluegreen::kept_sides(m)
    } else {
        vec![m.primary.clone()]
    };
    for side in sides {
        let surplus = staying_of(m, &side).saturating_sub(m.desired) as usize;
        if surplus == 0 {
            continue;
        }
        let staying: Vec<&Task> = m
            .wanted()
            .filter(|t| t.deployment == side)
            .filter(|t| t.replacing.as_ref().is_none_or(|r| r.by.is_none()))
            .collect();
        // A replacement whose task is still being replaced is not surplus: it is what
        // the replaced task is waiting for.
        let replacements: Vec<&str> = m
            .wanted()
            .filter_map(|t| t.replacing.as_ref().and_then(|r| r.by.as_deref()))
            .collect();
        let free: Vec<&Task> = staying
            .iter()
            .copied()
            .filter(|t| !t.protected(now) && !replacements.contains(&t.id.as_str()))
            .collect();
        let blocked = staying.len() - free.len();
        let stops = zones::scale_in_order(m, &free, surplus);
        let short = surplus.saturating_sub(stops.len());
        for id in stops {
            lifecycle::stop_task(
                m,
                &id,
                StopReason::Scheduler {
                    deployment: side.clone(),
                },
                fx,
            );
        }
        if short > 0 {
            blocked_event(m, &side, blocked);
        }
    }
}

/// DAEMON: one task of the PRIMARY deployment on each ACTIVE container instance; a
/// deployment stops an old task (unprotected, within minimumHealthyPercent) before its
/// replacement starts on the same instance.
fn daemon(m: &mut Model, fx: &mut Vec<Effect>) {
    let now = m.now;
    let primary = m.primary.clone();
    let min = m.settings.minimum_healthy(m.desired);
    let instances: Vec<(String, String)> = m
        .instances
        .iter()
        .filter(|i| i.status == InstanceStatus::Active)
        .map(|i| (i.arn.clone(), i.zone.clone()))
        .collect();
    let mut blocked = 0;
    for (arn, zone) in instances {
        let on: Vec<&Task> = m
            .wanted()
            .filter(|t| t.instance.as_deref() == Some(&arn))
            .collect();
        if on.is_empty() {
            if deployments::launchable(m, &primary) {
                lifecycle::start_task(
                    m,
                    &primary,
                    StartReason::Desired,
                    (zone, Some(arn.clone())),
                    fx,
                );
            }
            continue;
        }
        let old = on
            .iter()
            .find(|t| t.deployment != primary && t.replacing.is_none())
            .map(|t| (t.id.clone(), t.protected(now), m.is_healthy(t)));
        if let Some((id, protected, healthy)) = old {
            if protected {
                blocked += 1;
            } else if !healthy || healthy_count(m) > min {
                lifecycle::stop_task(
                    m,
                    &id,
                    StopReason::Scheduler {
                        deployment: primary.clone(),
                    },
                    fx,
                );
            }
        }
    }
    blocked_event(m, &primary, blocked);
}
