//! The decision, apart from the calls: given what ECS says of the service and its
//! tasks, is this task wanted or one of those to go?
//!
//! Every task of a service runs the same rule on the same facts, without talking to
//! the others, so together they pick exactly the surplus: the tasks of old
//! deployments first, then the longest running, then by ARN.

use std::cmp::Ordering;
use std::time::SystemTime;

use super::{LeaveReason, Membership};

/// This task, as ECS describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskInfo {
    /// The cluster's name or ARN (`Cluster` in task metadata).
    pub cluster: String,
    /// This task's ARN.
    pub task_arn: String,
    /// The service it belongs to (from `group`, `service:NAME`).
    pub service: String,
    /// The deployment that started it (`startedBy`, `ecs-svc/...`), when known.
    pub deployment: Option<String>,
}

/// One deployment of the service, from `DescribeServices`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentView {
    /// `id`, `ecs-svc/...`.
    pub id: String,
    /// `status` is `PRIMARY`: the newest deployment.
    pub primary: bool,
    /// Tasks it wants.
    pub desired: u32,
    /// Tasks of it running.
    pub running: u32,
    /// When it was created.
    pub created_at: Option<SystemTime>,
}

/// The service, from `DescribeServices`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceView {
    /// Tasks the service wants.
    pub desired: u32,
    /// Tasks running.
    pub running: u32,
    /// Its deployments.
    pub deployments: Vec<DeploymentView>,
}

/// One task of the service, from `ListTasks` and `DescribeTasks`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskView {
    /// Its ARN.
    pub arn: String,
    /// `group`: `service:NAME` for a service's task.
    pub group: Option<String>,
    /// The deployment that started it (`startedBy`).
    pub deployment: Option<String>,
    /// When it started running.
    pub started_at: Option<SystemTime>,
    /// `lastStatus` is `RUNNING`.
    pub running: bool,
}

/// What the facts say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// This membership follows from the service alone.
    Known(Membership),
    /// The service runs more tasks than it wants: which go depends on the task list.
    NeedTasks,
}

/// Decides from the service alone, when it can.
#[must_use]
pub fn decide(me: &TaskInfo, service: &ServiceView) -> Decision {
    if let Some(reason) = replaced(me, service) {
        return Decision::Known(Membership::Leaving(reason));
    }
    if service.running > service.desired {
        Decision::NeedTasks
    } else {
        Decision::Known(Membership::Wanted)
    }
}

/// A deployment replaces this task once its own deployment is no longer the PRIMARY
/// one and the PRIMARY deployment has all the tasks it wants running.
fn replaced(me: &TaskInfo, service: &ServiceView) -> Option<LeaveReason> {
    let mine = me.deployment.as_deref()?;
    let primary = service.deployments.iter().find(|d| d.primary)?;
    let ready = primary.desired > 0 && primary.running >= primary.desired;
    (primary.id != mine && ready).then(|| LeaveReason::Replaced {
        deployment: mine.to_owned(),
        primary: primary.id.clone(),
    })
}

/// Decides with the task list: the surplus are the first `running - desired` running
/// tasks in [`rank`] order. A task that does not find itself among the running ones
/// stays wanted: never leave on doubt.
#[must_use]
pub fn decide_with_tasks(me: &TaskInfo, service: &ServiceView, tasks: &[TaskView]) -> Membership {
    let mut running: Vec<&TaskView> = tasks.iter().filter(|t| t.running).collect();
    if !running.iter().any(|t| t.arn == me.task_arn) {
        return Membership::Wanted;
    }
    let count = u32::try_from(running.len()).unwrap_or(u32::MAX);
    let surplus = count.saturating_sub(service.desired);
    running.sort_by(|a, b| rank(service, a, b));
    let leaving = running
        .iter()
        .take(usize::try_from(surplus).unwrap_or(usize::MAX))
        .any(|t| t.arn == me.task_arn);
    if leaving {
        Membership::Leaving(LeaveReason::Surplus {
            running: count,
            desired: service.desired,
        })
    } else {
        Membership::Wanted
    }
}

/// The order in which tasks go: those of older deployments first (the PRIMARY one
/// last), then the longest running, then by ARN, so every task ranks alike.
#[must_use]
pub fn rank(service: &ServiceView, a: &TaskView, b: &TaskView) -> Ordering {
    deployment_rank(service, a)
        .cmp(&deployment_rank(service, b))
        .then_with(|| a.started_at.cmp(&b.started_at))
        .then_with(|| a.arn.cmp(&b.arn))
}

/// Older deployments first: (is PRIMARY, created at). A deployment the service no
/// longer lists, or none at all, counts as the oldest.
fn deployment_rank(service: &ServiceView, task: &TaskView) -> (bool, Option<SystemTime>) {
    task.deployment
        .as_deref()
        .and_then(|id| service.deployments.iter().find(|d| d.id == id))
        .map_or((false, None), |d| (d.primary, d.created_at))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    fn at(secs: u64) -> Option<SystemTime> {
        Some(UNIX_EPOCH + Duration::from_secs(secs))
    }

    fn me(arn: &str, deployment: &str) -> TaskInfo {
        TaskInfo {
            cluster: "c".into(),
            task_arn: arn.into(),
            service: "s".into(),
            deployment: Some(deployment.into()),
        }
    }

    fn deployment(
        id: &str,
        primary: bool,
        desired: u32,
        running: u32,
        created: u64,
    ) -> DeploymentView {
        DeploymentView {
            id: id.into(),
            primary,
            desired,
            running,
            created_at: at(created),
        }
    }

    fn task(arn: &str, deployment: &str, started: u64) -> TaskView {
        TaskView {
            arn: arn.into(),
            group: Some("service:s".into()),
            deployment: Some(deployment.into()),
            started_at: at(started),
            running: true,
        }
    }

    fn service(desired: u32, running: u32, deployments: Vec<DeploymentView>) -> ServiceView {
        ServiceView {
            desired,
            running,
            deployments,
        }
    }

    #[test]
    fn a_steady_service_wants_every_task() {
        let s = service(3, 3, vec![deployment("d1", true, 3, 3, 0)]);
        assert_eq!(
            decide(&me("a", "d1"), &s),
            Decision::Known(Membership::Wanted)
        );
    }

    #[test]
    fn exactly_the_surplus_leaves_the_longest_running_first() {
        let s = service(1, 3, vec![deployment("d1", true, 1, 3, 0)]);
        let tasks = [
            task("a", "d1", 30),
            task("b", "d1", 10),
            task("c", "d1", 20),
        ];
        assert_eq!(decide(&me("a", "d1"), &s), Decision::NeedTasks);
        let verdicts: Vec<bool> = ["a", "b", "c"]
            .iter()
            .map(|arn| decide_with_tasks(&me(arn, "d1"), &s, &tasks).is_leaving())
            .collect();
        // b and c started first: they go; a stays.
        assert_eq!(verdicts, [false, true, true]);
        assert_eq!(
            decide_with_tasks(&me("b", "d1"), &s, &tasks),
            Membership::Leaving(LeaveReason::Surplus {
                running: 3,
                desired: 1
            })
        );
    }

    #[test]
    fn whatever_the_order_of_the_list_every_task_picks_the_same_surplus() {
        let s = service(
            2,
            5,
            vec![
                deployment("old", false, 0, 2, 0),
                deployment("new", true, 2, 3, 100),
            ],
        );
        let mut tasks = vec![
            task("n1", "new", 200),
            task("o1", "old", 50),
            task("n2", "new", 150),
            task("o2", "old", 40),
            task("n3", "new", 150),
        ];
        let leaving = |tasks: &[TaskView]| -> Vec<String> {
            tasks
                .iter()
                .filter(|t| {
                    decide_with_tasks(&me(&t.arn, t.deployment.as_deref().unwrap()), &s, tasks)
                        .is_leaving()
                })
                .map(|t| t.arn.clone())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect()
        };
        let first = leaving(&tasks);
        // The old deployment's two first, then the longest-running new one (n2 before
        // n3 by ARN at the same start).
        assert_eq!(first, ["n2", "o1", "o2"]);
        tasks.reverse();
        assert_eq!(leaving(&tasks), first);
        tasks.swap(0, 3);
        assert_eq!(leaving(&tasks), first);
    }

    #[test]
    fn an_old_deployment_leaves_once_the_primary_has_its_tasks_running() {
        let starting = service(
            2,
            3,
            vec![
                deployment("new", true, 2, 1, 100),
                deployment("old", false, 2, 2, 0),
            ],
        );
        assert_eq!(decide(&me("o1", "old"), &starting), Decision::NeedTasks);
        let ready = service(
            2,
            4,
            vec![
                deployment("new", true, 2, 2, 100),
                deployment("old", false, 2, 2, 0),
            ],
        );
        assert_eq!(
            decide(&me("o1", "old"), &ready),
            Decision::Known(Membership::Leaving(LeaveReason::Replaced {
                deployment: "old".into(),
                primary: "new".into()
            }))
        );
        // The new deployment's own tasks are wanted, by the list too.
        assert_eq!(decide(&me("n1", "new"), &ready), Decision::NeedTasks);
        let tasks = [
            task("o1", "old", 0),
            task("o2", "old", 1),
            task("n1", "new", 200),
            task("n2", "new", 201),
        ];
        assert!(!decide_with_tasks(&me("n1", "new"), &ready, &tasks).is_leaving());
        assert!(decide_with_tasks(&me("o2", "old"), &ready, &tasks).is_leaving());
    }

    #[test]
    fn doubt_never_makes_a_task_leave() {
        let s = service(1, 3, vec![deployment("d1", true, 1, 3, 0)]);
        // Not in the list (a stale list): wanted.
        let tasks = [task("b", "d1", 10), task("c", "d1", 20)];
        assert_eq!(
            decide_with_tasks(&me("a", "d1"), &s, &tasks),
            Membership::Wanted
        );
        // No deployment known for this task: the deployment rule does not apply.
        let mut unknown = me("a", "d1");
        unknown.deployment = None;
        let s = service(2, 2, vec![deployment("new", true, 2, 2, 100)]);
        assert_eq!(decide(&unknown, &s), Decision::Known(Membership::Wanted));
        // A PRIMARY that wants nothing has nothing running to replace this task with.
        let s = service(
            0,
            1,
            vec![
                deployment("new", true, 0, 0, 100),
                deployment("d1", false, 1, 1, 0),
            ],
        );
        assert_eq!(decide(&me("a", "d1"), &s), Decision::NeedTasks);
    }

    #[test]
    fn pending_tasks_are_not_counted_as_running() {
        let s = service(2, 3, vec![deployment("d1", true, 2, 3, 0)]);
        let mut tasks = vec![task("a", "d1", 1), task("b", "d1", 2), task("c", "d1", 3)];
        tasks[2].running = false;
        // Two running, two wanted: nobody leaves.
        assert!(!decide_with_tasks(&me("a", "d1"), &s, &tasks).is_leaving());
    }
}
