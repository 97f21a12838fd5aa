//! Which tasks go, in the order ECS itself would stop them: unhealthy tasks first,
//! then tasks on draining container instances, then from the Availability Zone with
//! the most tasks (ECS keeps zones balanced when it scales in), then older
//! deployments' tasks, then the longest running, then by ARN so that every decider
//! picks alike. Tasks already leaving are kept first: a task that has let go stays
//! gone.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use crate::drain::facts::{Health, ServiceFacts, TaskFacts};
use crate::drain::record::Leave;

pub(super) struct Order<'a> {
    pub(super) service: &'a ServiceFacts,
    pub(super) draining: &'a BTreeSet<String>,
}

/// The sort key of a task to go next, smallest first, given how many tasks each zone
/// keeps.
type Key<'a> = (
    bool,
    bool,
    Reverse<usize>,
    (bool, Option<SystemTime>),
    Option<SystemTime>,
    &'a str,
);

impl Order<'_> {
    fn key<'t>(&self, task: &'t TaskFacts, zones: &BTreeMap<Option<&str>, usize>) -> Key<'t> {
        let on_draining = task
            .instance
            .as_ref()
            .is_some_and(|i| self.draining.contains(i));
        (
            task.health != Health::Unhealthy,
            !on_draining,
            Reverse(zones.get(&task.zone.as_deref()).copied().unwrap_or(0)),
            self.deployment_rank(task),
            task.started_at,
            task.arn.as_str(),
        )
    }

    /// Older deployments first: (is PRIMARY, created at). A deployment the service no
    /// longer lists, or none at all, counts as the oldest.
    fn deployment_rank(&self, task: &TaskFacts) -> (bool, Option<SystemTime>) {
        task.deployment
            .as_deref()
            .and_then(|id| self.service.deployments.iter().find(|d| d.id == id))
            .map_or((false, None), |d| (d.primary, d.created_at))
    }

    /// `count` of `candidates`, those in `already` first, then in order; zones are
    /// balanced over every task in `serving`.
    pub(super) fn pick<'t>(
        &self,
        candidates: &[&'t TaskFacts],
        serving: &[&'t TaskFacts],
        count: usize,
        already: &BTreeMap<String, Leave>,
    ) -> Vec<&'t TaskFacts> {
        let mut zones: BTreeMap<Option<&str>, usize> = BTreeMap::new();
        for t in serving {
            *zones.entry(t.zone.as_deref()).or_default() += 1;
        }
        let mut rest: Vec<&TaskFacts> = candidates.to_vec();
        let mut chosen = Vec::with_capacity(count.min(rest.len()));
        for sticky_first in [true, false] {
            while chosen.len() < count {
                let next = rest
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| !sticky_first || already.contains_key(t.id()))
                    .min_by(|(_, a), (_, b)| self.key(a, &zones).cmp(&self.key(b, &zones)))
                    .map(|(i, _)| i);
                let Some(i) = next else { break };
                let task = rest.swap_remove(i);
                if let Some(n) = zones.get_mut(&task.zone.as_deref()) {
                    *n = n.saturating_sub(1);
                }
                chosen.push(task);
            }
        }
        chosen
    }
}
