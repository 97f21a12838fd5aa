//! The decision, apart from the calls: given what ECS says of a service and its tasks
//! and what the last decision remembered, which tasks leave and why.
//!
//! The rules, each the way ECS itself would go:
//! - **Deployments run by CodeDeploy or an external controller**: the drain is off;
//!   ECS's task sets are not ours to steer.
//! - **A rolling deployment** (any minimumHealthyPercent and maximumPercent, and
//!   daemon services): an old deployment's task leaves only when the PRIMARY
//!   deployment has enough tasks *ready* to take its place: running, healthy by their
//!   container checks where the service has any, and running past the service's
//!   health check grace period plus a settle time in which a failing load balancer
//!   check would have had ECS replace them; never while the PRIMARY deployment's
//!   `failedTasks` are still rising, never once its rollout has FAILED (a rollback
//!   may need every old task). When ECS cannot start another task before an old one
//!   stops (maximumPercent reached, as at 100 %), old tasks let go a small batch at a
//!   time, within the minimumHealthyPercent ECS keeps itself.
//! - **A blue/green, linear or canary deployment**: the old side leaves only once
//!   production traffic has shifted and the bake time is over (ECS's lifecycle stage
//!   `CLEAN_UP`, or the deployment `SUCCESSFUL`).
//! - **Scale-in**: when the service runs more tasks than it wants, exactly the surplus
//!   leaves, picked as ECS picks: unhealthy tasks first, then tasks on draining
//!   container instances, then from the most crowded Availability Zone, then the
//!   oldest. Tasks ECS started of its own accord since the desired count last fell (a
//!   replacement for an unhealthy task, a task for an under-served zone) are not a
//!   surplus yet: ECS stops what they replace itself unless protection stops it, and
//!   only then is there one to pick.
//! - **A task that has let go stays gone**: tasks already leaving are kept first, and
//!   a task is wanted again only when ECS's own figures say so (the desired count
//!   rose, the deployment failed or was rolled back).

mod deploy;
mod pick;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use super::LeaveReason;
use super::facts::{Controller, Facts, Health, Strategy, TaskFacts};
use super::record::{
    FORGET_AFTER, Leave, Memory, PrimaryWatch, Record, Verdict, digests, millis, time,
};

/// How the decision judges readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Rules {
    /// How long, past the service's health check grace period, a new task must have
    /// run before it counts as ready: long enough for the load balancer to find it
    /// unhealthy and ECS to replace it, had it been (for a service behind one, or
    /// whose containers have no health check).
    pub settle: Duration,
}

impl Rules {
    /// Rules that count a new task ready `settle` past its grace period.
    #[must_use]
    pub fn new(settle: Duration) -> Self {
        Self { settle }
    }
}

/// What a decision concludes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Decision {
    /// The verdict.
    pub verdict: Verdict,
    /// What the next decision remembers.
    pub memory: Memory,
    /// Something is under way (a deployment, a surplus, tasks leaving): decide again
    /// sooner.
    pub busy: bool,
}

/// Decides from `facts` and the previous record.
#[must_use]
pub fn decide(facts: &Facts, prev: &Record, rules: &Rules, now: SystemTime) -> Decision {
    let service = &facts.service;
    let memory = remember(facts, &prev.memory, now);
    if let Some(why) = off(&service.controller) {
        return Decision {
            verdict: Verdict::Off { why },
            memory,
            busy: false,
        };
    }
    let Some(tasks) = &facts.tasks else {
        // Not listed this time: nothing moved since the last listing.
        let verdict = match &prev.verdict {
            Verdict::Off { .. } => Verdict::default(),
            on @ Verdict::On { .. } => on.clone(),
        };
        let busy = !service.at_rest() || prev.leaving().is_some_and(|l| !l.is_empty());
        return Decision {
            verdict,
            memory,
            busy,
        };
    };
    let view = View::new(facts, tasks, rules, &memory, now);
    let before = prev.leaving().cloned().unwrap_or_default();
    let chosen = view.leaving(&before);
    let leaving = keep(&view, before, chosen, recalled(facts, &prev.memory), now);
    let stopping = digests(
        facts
            .stopped
            .iter()
            .map(String::as_str)
            .chain(tasks.iter().filter(|t| t.stopping).map(TaskFacts::id)),
    );
    let busy = !service.at_rest() || !leaving.is_empty();
    Decision {
        verdict: Verdict::On { leaving, stopping },
        memory,
        busy,
    }
}

/// ECS's own figures want tasks back: the desired count rose, the PRIMARY deployment
/// failed, or a traffic-shifting deployment rolls back.
fn recalled(facts: &Facts, before: &Memory) -> bool {
    let service = &facts.service;
    before.desired.is_some_and(|d| service.desired > d)
        || service
            .primary()
            .is_some_and(|p| p.rollout == super::facts::Rollout::Failed)
        || facts
            .shift
            .as_ref()
            .is_some_and(|s| s.status.starts_with("ROLLBACK") || s.status.starts_with("STOP"))
}

/// The next leaves: those the rules chose, and of the earlier ones, a task that has let
/// go stays gone: while ECS still wants it running, unless ECS's figures want it back
/// (`recall`); once ECS no longer lists it, for [`FORGET_AFTER`].
fn keep(
    view: &View<'_>,
    before: BTreeMap<String, Leave>,
    chosen: BTreeMap<String, LeaveReason>,
    recall: bool,
    now: SystemTime,
) -> BTreeMap<String, Leave> {
    let at = millis(now);
    let mut leaving: BTreeMap<String, Leave> = chosen
        .into_iter()
        .map(|(id, reason)| {
            let leave = match before.get(&id) {
                // The first reason stays: a task's mind is not changed by new numbers.
                Some(l) => Leave {
                    seen: at,
                    ..l.clone()
                },
                None => Leave {
                    reason,
                    since: at,
                    seen: at,
                },
            };
            (id, leave)
        })
        .collect();
    for (id, leave) in before {
        if leaving.contains_key(&id) {
            continue;
        }
        let wanted = view.wanted.iter().any(|t| t.id() == id);
        // A surplus that ECS resolved itself (it stopped another task, unprotected or
        // unhealthy, before this one let go): the service wants every task it still
        // runs, this one too.
        let surplus_gone = matches!(leave.reason, LeaveReason::Surplus { .. })
            && view.wanted.len() <= view.facts.service.desired as usize;
        if wanted {
            if !recall && !surplus_gone {
                leaving.insert(id, Leave { seen: at, ..leave });
            }
        } else if time(leave.seen) + FORGET_AFTER > now {
            leaving.insert(id, leave);
        }
    }
    leaving
}

fn off(controller: &Controller) -> Option<String> {
    let name = match controller {
        Controller::Ecs => return None,
        Controller::CodeDeploy => "CODE_DEPLOY",
        Controller::External => "EXTERNAL",
        Controller::Other(other) => other.as_str(),
    };
    Some(format!(
        "the service's deployments are run by the {name} controller, which moves task sets \
         itself; the drain stays off and protection holds as it would without it"
    ))
}

/// The memory the next decision starts from.
fn remember(facts: &Facts, before: &Memory, now: SystemTime) -> Memory {
    let service = &facts.service;
    let mut memory = before.clone();
    if before.desired.is_some_and(|d| service.desired < d) {
        memory.desired_fell_at = Some(millis(now));
    }
    memory.desired = Some(service.desired);
    memory.primary = service.primary().map(|p| match &before.primary {
        Some(w) if w.id == p.id && w.failed_tasks == p.failed_tasks => w.clone(),
        _ => PrimaryWatch {
            id: p.id.clone(),
            failed_tasks: p.failed_tasks,
            since: millis(now),
        },
    });
    if facts.tasks.is_some() {
        memory.listed_digest = Some(service.digest());
        memory.listed_at = Some(millis(now));
    }
    memory
}

/// The facts of one decision, with what every rule needs of them.
struct View<'a> {
    facts: &'a Facts,
    rules: &'a Rules,
    memory: &'a Memory,
    now: SystemTime,
    /// Tasks whose desired status is RUNNING.
    wanted: Vec<&'a TaskFacts>,
    /// Of those, the RUNNING ones.
    serving: Vec<&'a TaskFacts>,
    /// Some task of the service reports a container health check: then a task still
    /// UNKNOWN has not passed its checks yet.
    checked: bool,
}

impl<'a> View<'a> {
    fn new(
        facts: &'a Facts,
        tasks: &'a [TaskFacts],
        rules: &'a Rules,
        memory: &'a Memory,
        now: SystemTime,
    ) -> Self {
        let wanted: Vec<&TaskFacts> = tasks.iter().filter(|t| !t.stopping).collect();
        let serving = wanted.iter().copied().filter(|t| t.running).collect();
        let checked = tasks.iter().any(|t| t.health != Health::Unknown);
        Self {
            facts,
            rules,
            memory,
            now,
            wanted,
            serving,
            checked,
        }
    }

    /// Running long enough past the grace period for a failing load balancer check to
    /// have had it replaced. Without a load balancer, a container health check is the
    /// whole of ECS's view: a task it finds HEALTHY is settled at once (a task without
    /// any check still waits the settle time, as ECS waits before it counts one
    /// healthy).
    fn settled(&self, task: &TaskFacts) -> bool {
        let service = &self.facts.service;
        let settle = if service.load_balanced || !self.checked {
            self.rules.settle
        } else {
            Duration::ZERO
        };
        let age = service.grace + settle;
        task.running && task.started_at.is_some_and(|s| s + age <= self.now)
    }

    /// Running, settled, and healthy where the service's containers are checked.
    fn ready(&self, task: &TaskFacts) -> bool {
        let healthy = match task.health {
            Health::Healthy => true,
            Health::Unhealthy => false,
            _ => !self.checked,
        };
        healthy && self.settled(task)
    }

    fn leaving(&self, already: &BTreeMap<String, Leave>) -> BTreeMap<String, LeaveReason> {
        let service = &self.facts.service;
        let primary = service.primary();
        let old: Vec<&TaskFacts> = self
            .serving
            .iter()
            .copied()
            .filter(|t| matches!((&t.deployment, primary), (Some(d), Some(p)) if *d != p.id))
            .collect();
        let chosen = match primary {
            Some(primary) if !old.is_empty() => match &service.strategy {
                Strategy::Rolling => self.rolling(primary, &old, already),
                Strategy::TrafficShift(_) => self.traffic_shift(primary, &old),
            },
            _ => self.surplus(already),
        };
        chosen.into_iter().collect()
    }

    /// How many tasks ECS started of its own accord since the desired count last
    /// fell, and has not yet settled.
    fn young(&self) -> usize {
        let fell = self.memory.desired_fell_at.map(time);
        self.wanted
            .iter()
            .filter(|t| !self.settled(t))
            .filter(|t| match (fell, t.started_at) {
                (Some(fell), Some(started)) => started >= fell,
                _ => true,
            })
            .count()
    }

    /// Scale-in: exactly the surplus, in ECS's order, those already leaving first.
    fn surplus(&self, already: &BTreeMap<String, Leave>) -> Vec<(String, LeaveReason)> {
        let desired = usize::try_from(self.facts.service.desired).unwrap_or(usize::MAX);
        let surplus = self.serving.len().saturating_sub(desired);
        let sticky = self
            .serving
            .iter()
            .filter(|t| already.contains_key(t.id()))
            .count();
        // ECS's own starts are not a surplus yet, but they do not bring back a task
        // that has let go: only a rise of the desired count does.
        let count = surplus
            .saturating_sub(self.young())
            .max(sticky.min(surplus));
        let reason = LeaveReason::Surplus {
            running: u32::try_from(self.serving.len()).unwrap_or(u32::MAX),
            desired: self.facts.service.desired,
        };
        self.order()
            .pick(&self.serving, &self.serving, count, already)
            .into_iter()
            .map(|t| (t.id().to_owned(), reason.clone()))
            .collect()
    }

    fn order(&self) -> pick::Order<'_> {
        pick::Order {
            service: &self.facts.service,
            draining: &self.facts.draining_instances,
        }
    }
}

#[cfg(test)]
mod tests;
