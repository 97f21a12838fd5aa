//! Deployments: when an old deployment's tasks may let go.

use std::collections::BTreeMap;

use super::View;
use crate::drain::LeaveReason;
use crate::drain::facts::{DeploymentFacts, Rollout, TaskFacts};
use crate::drain::record::Leave;
use crate::drain::record::time;

/// `a * percent / 100`, rounded down (ECS rounds maximumPercent down).
fn percent_down(a: usize, percent: u32) -> usize {
    a.saturating_mul(usize::try_from(percent).unwrap_or(usize::MAX)) / 100
}

/// `a * percent / 100`, rounded up (ECS rounds minimumHealthyPercent up).
fn percent_up(a: usize, percent: u32) -> usize {
    a.saturating_mul(usize::try_from(percent).unwrap_or(usize::MAX))
        .div_ceil(100)
}

impl View<'_> {
    /// A rolling deployment (and a daemon service's): old tasks let go only as the
    /// PRIMARY deployment's ready tasks can carry the service, or, when ECS cannot
    /// start another task until one stops, a small batch within ECS's own floor.
    pub(super) fn rolling(
        &self,
        primary: &DeploymentFacts,
        old: &[&TaskFacts],
        already: &BTreeMap<String, Leave>,
    ) -> Vec<(String, LeaveReason)> {
        if primary.rollout == Rollout::Failed {
            // The circuit breaker tripped: a rollback may need every old task.
            return Vec::new();
        }
        let service = &self.facts.service;
        // A PRIMARY whose tasks are still failing is not ready, whatever runs now.
        let failing = primary.failed_tasks > 0
            && self
                .memory
                .primary
                .as_ref()
                .is_none_or(|w| time(w.since) + self.rules.settle > self.now);
        let ready = if failing {
            0
        } else {
            self.serving
                .iter()
                .filter(|t| t.deployment.as_deref() == Some(primary.id.as_str()) && self.ready(t))
                .count()
        };
        let desired = usize::try_from(service.desired).unwrap_or(usize::MAX);
        // Old tasks the PRIMARY's ready ones can replace without the service serving
        // fewer than it wants.
        let mut allowed = (ready + old.len()).saturating_sub(desired);
        let ceiling = if service.daemon {
            desired
        } else {
            percent_down(desired, service.maximum_percent)
        };
        // ECS must stop an old task before it can start another of the PRIMARY's: the
        // service is at its maximumPercent, the PRIMARY does not have all its tasks,
        // and those it has are ready (a PRIMARY whose tasks fail gets no more room).
        let primary_tasks: Vec<&&TaskFacts> = self
            .wanted
            .iter()
            .filter(|t| t.deployment.as_deref() == Some(primary.id.as_str()))
            .collect();
        let stalled = self.wanted.len() >= ceiling
            && primary_tasks.len() < desired
            && primary_tasks.iter().all(|t| self.ready(t))
            && !failing;
        if stalled {
            // A small batch at a time, within the floor ECS keeps itself.
            let floor = percent_up(desired, service.minimum_healthy_percent);
            let room = self.serving.len().saturating_sub(floor);
            let batch = desired.div_ceil(10).max(1).min(room);
            allowed = allowed.max(batch);
        }
        // An old task that has let go stays gone: only a failed rollout brings it back.
        let sticky = old.iter().filter(|t| already.contains_key(t.id())).count();
        let count = allowed.max(sticky);
        self.order()
            .pick(old, &self.serving, count, already)
            .into_iter()
            .map(|t| (t.id().to_owned(), replaced(t, primary)))
            .collect()
    }

    /// Blue/green, linear and canary: the old side carries production traffic until it
    /// has shifted and the bake time is over, and is ECS's way back until then.
    pub(super) fn traffic_shift(
        &self,
        primary: &DeploymentFacts,
        old: &[&TaskFacts],
    ) -> Vec<(String, LeaveReason)> {
        if primary.rollout == Rollout::Failed
            || !self
                .facts
                .shift
                .as_ref()
                .is_some_and(crate::drain::facts::ShiftFacts::old_side_released)
        {
            return Vec::new();
        }
        old.iter()
            .map(|t| (t.id().to_owned(), replaced(t, primary)))
            .collect()
    }
}

fn replaced(task: &TaskFacts, primary: &DeploymentFacts) -> LeaveReason {
    LeaveReason::Replaced {
        deployment: task.deployment.clone().unwrap_or_default(),
        primary: primary.id.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_round_as_ecs_rounds_them() {
        assert_eq!(percent_down(3, 150), 4);
        assert_eq!(percent_down(2, 100), 2);
        assert_eq!(percent_up(3, 50), 2);
        assert_eq!(percent_up(3, 0), 0);
        assert_eq!(percent_up(2, 100), 2);
    }
}
