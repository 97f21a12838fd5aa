//! Deployments: a new one becomes PRIMARY (for a rolling or an ECS blue/green
//! deployment), its rollout is IN_PROGRESS until the service is steady (COMPLETED), and
//! the deployment circuit breaker fails it (FAILED) once as many of its tasks have
//! failed as its threshold, rolling back to the last COMPLETED deployment when told
//! to. What a rollback does with that deployment's tasks is a setting.

use super::effect::Effect;
use super::model::{Model, Progress, Revision, RollbackInfo, Rollout, SERVICE, Stage, count};
use super::settings::{Controller, RollbackMode, Settings, Strategy};

/// Whether deployments run side by side (ECS blue/green, or task sets of the
/// CODE_DEPLOY and EXTERNAL controllers) rather than rolling.
#[must_use]
pub(super) fn side_by_side(settings: &Settings) -> bool {
    settings.controller != Controller::Ecs
        || matches!(settings.strategy, Strategy::BlueGreen { .. })
}

/// Starts a deployment of `spec`; returns its id.
pub(super) fn deploy(m: &mut Model, spec: Revision) -> String {
    let now = m.now;
    let id = m.add_deployment(spec, None, now);
    begin(m, &id);
    m.event(format!(
        "(service {SERVICE}) has started a deployment ({id})"
    ));
    id
}

/// Makes a new deployment the one being rolled out: the previous PRIMARY one stops
/// being rolled out; a rolling or ECS blue/green deployment becomes PRIMARY at once,
/// a task set only once it has the production traffic.
fn begin(m: &mut Model, id: &str) {
    let now = m.now;
    let previous = m.primary.clone();
    if let Some(d) = m.deployment_mut(&previous)
        && d.rollout == Rollout::InProgress
        && d.progress == Progress::InProgress
    {
        d.progress = Progress::Stopped;
        d.updated_at = now;
    }
    if side_by_side(&m.settings) {
        if let Some(d) = m.deployment_mut(id) {
            d.stage = Some((Stage::PreScaleUp, now));
        }
        if m.settings.controller == Controller::Ecs {
            m.primary = id.to_owned();
        }
    } else {
        m.primary = id.to_owned();
    }
}

/// A task of `deployment` failed (it never reached RUNNING, or it was stopped for
/// failing a health check): the circuit breaker counts it while that deployment is
/// being rolled out, and fails the deployment at its threshold.
pub(super) fn task_failed(m: &mut Model, deployment: &str) {
    let threshold = Settings::circuit_breaker_threshold(m.desired);
    let breaker = m.settings.circuit_breaker;
    let now = m.now;
    let Some(d) = m.deployment_mut(deployment) else {
        return;
    };
    if d.rollout != Rollout::InProgress || d.progress != Progress::InProgress {
        return;
    }
    d.failures += 1;
    d.updated_at = now;
    if breaker.is_some() && d.failures >= threshold {
        fail(m, deployment, "tasks failed to start.");
    }
}

/// A task of `deployment` became healthy: the failure count starts over
/// (`resetOnHealthyTask`, true by default).
pub(super) fn task_healthy(m: &mut Model, deployment: &str) {
    if let Some(d) = m.deployment_mut(deployment)
        && d.rollout == Rollout::InProgress
    {
        d.failures = 0;
    }
}

/// The circuit breaker fails `id`; with rollback, the last COMPLETED deployment is
/// rolled back to.
pub(super) fn fail(m: &mut Model, id: &str, why: &str) {
    let now = m.now;
    let rollback = m.settings.circuit_breaker.is_some_and(|b| b.rollback);
    let target = m
        .deployments
        .iter()
        .filter(|d| d.id != id && d.completed())
        .max_by_key(|d| d.finished_at)
        .map(|d| d.id.clone());
    if let Some(d) = m.deployment_mut(id) {
        d.rollout = Rollout::Failed;
        d.reason = format!("ECS deployment circuit breaker: {why}");
        d.finished_at = Some(now);
        d.updated_at = now;
        d.progress = if rollback && target.is_some() {
            Progress::RollbackInProgress
        } else {
            Progress::Stopped
        };
    }
    m.event(format!(
        "(service {SERVICE}) (deployment {id}) deployment failed: {why}"
    ));
    let Some(target) = target.filter(|_| rollback) else {
        return;
    };
    if side_by_side(&m.settings) {
        super::bluegreen::roll_back(m, id);
        return;
    }
    let reason = format!("ECS deployment circuit breaker: rolling back to deploymentId {target}.");
    let to = match m.settings.unknowns.rollback {
        RollbackMode::KeepOldTasks => {
            if let Some(d) = m.deployment_mut(&target) {
                // Listed again, even if it no longer had a task: it starts what it
                // lacks.
                d.inactive = false;
                d.rollout = Rollout::InProgress;
                d.progress = Progress::InProgress;
                d.reason.clone_from(&reason);
                d.finished_at = None;
                d.updated_at = now;
            }
            target.clone()
        }
        RollbackMode::StartNewTasks => {
            let (spec, revision) = m
                .deployment(&target)
                .map(|d| (d.spec.clone(), d.revision))
                .unwrap_or_default();
            let new = m.add_deployment(spec, Some(revision), now);
            if let Some(d) = m.deployment_mut(&new) {
                d.reason.clone_from(&reason);
            }
            new
        }
    };
    m.primary.clone_from(&to);
    if let Some(d) = m.deployment_mut(id) {
        d.rollback = Some(RollbackInfo {
            to: to.clone(),
            started_at: now,
            reason,
        });
    }
    m.event(format!(
        "(service {SERVICE}) (deployment {to}) rolling back from deployment {id}"
    ));
}

/// A rolling deployment (or a service's first) completes once its tasks are the service's desired count,
/// RUNNING and healthy, and no other deployment has a task left; the others become
/// INACTIVE, and a deployment it rolled back from is ROLLBACK_SUCCESSFUL.
pub(super) fn complete_rolling(m: &mut Model, _fx: &mut Vec<Effect>) {
    let now = m.now;
    let primary = m.primary.clone();
    let mut others_alive = false;
    for d in &m.deployments {
        if d.id != primary
            && !d.inactive
            && m.tasks.iter().any(|t| t.alive() && t.deployment == d.id)
        {
            others_alive = true;
        }
    }
    // Deployments with no task left and not PRIMARY are gone from the list.
    let alive: Vec<String> = m
        .tasks
        .iter()
        .filter(|t| t.alive())
        .map(|t| t.deployment.clone())
        .collect();
    for d in &mut m.deployments {
        if d.id != primary
            && !d.inactive
            && !alive.contains(&d.id)
            && d.rollout != Rollout::InProgress
        {
            d.inactive = true;
            d.updated_at = now;
        }
    }
    let healthy = count(
        m.tasks
            .iter()
            .filter(|t| t.deployment == primary && m.is_healthy(t)),
    );
    let ready = !others_alive && healthy >= m.desired;
    let Some(d) = m.deployment_mut(&primary) else {
        return;
    };
    // A deployment side by side completes at the end of its clean-up.
    if d.rollout != Rollout::InProgress || d.stage.is_some() || !ready {
        return;
    }
    d.rollout = Rollout::Completed;
    d.progress = Progress::Successful;
    d.finished_at = Some(now);
    d.updated_at = now;
    d.failures = 0;
    for d in &mut m.deployments {
        if d.id != primary && !d.inactive {
            d.inactive = true;
            d.updated_at = now;
        }
        if d.rollback.as_ref().is_some_and(|r| r.to == primary)
            && d.progress == Progress::RollbackInProgress
        {
            d.progress = Progress::RollbackSuccessful;
            d.updated_at = now;
        }
    }
    m.event(format!("(service {SERVICE}) has reached a steady state."));
    m.event(format!(
        "(service {SERVICE}) (deployment {primary}) deployment completed."
    ));
}

/// Whether the PRIMARY deployment may launch tasks: not a FAILED one.
#[must_use]
pub(super) fn launchable(m: &Model, deployment: &str) -> bool {
    m.deployment(deployment)
        .is_some_and(|d| d.rollout != Rollout::Failed && !d.inactive)
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;
    use crate::sim::settings::Settings;

    #[test]
    fn a_deployment_becomes_primary_and_the_breaker_fails_it_at_its_threshold() {
        let mut m = Model::new(Settings::websocket(2), UNIX_EPOCH);
        let first = m.primary.clone();
        // Pretend the first completed.
        if let Some(d) = m.deployment_mut(&first) {
            d.rollout = Rollout::Completed;
            d.progress = Progress::Successful;
        }
        let second = deploy(&mut m, Revision::default());
        assert_eq!(m.primary, second);
        task_failed(&mut m, &second);
        task_failed(&mut m, &second);
        task_healthy(&mut m, &second);
        task_failed(&mut m, &second);
        task_failed(&mut m, &second);
        assert_eq!(m.deployment(&second).unwrap().rollout, Rollout::InProgress);
        task_failed(&mut m, &second);
        let d = m.deployment(&second).unwrap();
        assert_eq!(d.rollout, Rollout::Failed);
        assert_eq!(d.progress, Progress::RollbackInProgress);
        assert_eq!(
            d.reason,
            "ECS deployment circuit breaker: tasks failed to start."
        );
        // Rolled back to the first, which is PRIMARY and in progress again.
        assert_eq!(m.primary, first);
        assert_eq!(m.primary().rollout, Rollout::InProgress);
    }

    #[test]
    fn a_rollback_that_starts_new_tasks_is_a_new_deployment_of_the_old_revision() {
        let mut s = Settings::websocket(2);
        s.unknowns.rollback = RollbackMode::StartNewTasks;
        let mut m = Model::new(s, UNIX_EPOCH);
        let first = m.primary.clone();
        if let Some(d) = m.deployment_mut(&first) {
            d.rollout = Rollout::Completed;
        }
        let second = deploy(&mut m, Revision::default());
        for _ in 0..3 {
            task_failed(&mut m, &second);
        }
        assert_ne!(m.primary, first);
        assert_ne!(m.primary, second);
        assert_eq!(m.primary().revision, m.deployment(&first).unwrap().revision);
        assert!(
            m.primary()
                .reason
                .contains(&format!("rolling back to deploymentId {first}"))
        );
    }

    #[test]
    fn without_a_completed_deployment_there_is_no_rollback() {
        let mut m = Model::new(Settings::websocket(2), UNIX_EPOCH);
        let second = deploy(&mut m, Revision::default());
        for _ in 0..3 {
            task_failed(&mut m, &second);
        }
        assert_eq!(m.primary, second);
        assert_eq!(m.primary().rollout, Rollout::Failed);
        assert!(!launchable(&m, &second));
    }
}
