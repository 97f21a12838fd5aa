use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::*;
use crate::drain::Membership;
use crate::drain::facts::{DeploymentFacts, Rollout, ServiceFacts, ShiftFacts};
use crate::drain::record::Leave;

const RULES: Rules = Rules {
    settle: Duration::from_secs(30),
};

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// Decisions are made at t = 10,000 s.
fn now() -> SystemTime {
    at(10_000)
}

fn deployment(id: &str, primary: bool, desired: u32, created: u64) -> DeploymentFacts {
    DeploymentFacts {
        id: id.into(),
        primary,
        task_definition: format!("td:{id}"),
        desired,
        running: desired,
        pending: 0,
        failed_tasks: 0,
        rollout: if primary {
            Rollout::InProgress
        } else {
            Rollout::Completed
        },
        created_at: Some(at(created)),
    }
}

fn service(desired: u32, deployments: Vec<DeploymentFacts>) -> ServiceFacts {
    ServiceFacts {
        desired,
        running: desired,
        pending: 0,
        daemon: false,
        controller: Controller::Ecs,
        strategy: Strategy::Rolling,
        minimum_healthy_percent: 100,
        maximum_percent: 200,
        grace: Duration::ZERO,
        deployments,
        current_deployment: None,
        load_balanced: true,
    }
}

/// A task of `deployment` in `zone`, running since `started` (seconds).
fn task(id: &str, deployment: &str, zone: &str, started: u64) -> TaskFacts {
    TaskFacts {
        arn: format!("arn:aws:ecs:us-east-1:1:task/c/{id}"),
        group: Some("service:s".into()),
        deployment: Some(deployment.into()),
        task_definition: Some(format!("td:{deployment}")),
        running: true,
        stopping: false,
        health: Health::Unknown,
        started_at: Some(at(started)),
        zone: Some(zone.into()),
        instance: None,
    }
}

fn facts(service: ServiceFacts, tasks: Vec<TaskFacts>) -> Facts {
    Facts {
        service,
        tasks: Some(tasks),
        draining_instances: BTreeSet::new(),
        shift: None,
        stopped: BTreeSet::new(),
    }
}

fn leaving(d: &Decision) -> Vec<String> {
    d.verdict
        .clone()
        .leaving_ids()
        .into_iter()
        .collect::<Vec<_>>()
}

impl Verdict {
    fn leaving_ids(self) -> BTreeSet<String> {
        match self {
            Verdict::On { leaving, .. } => leaving.into_keys().collect(),
            Verdict::Off { .. } => BTreeSet::new(),
        }
    }
}

/// A previous record whose memory saw `desired` and which had `leaving` leave.
fn prev(desired: u32, leaving: &[&str]) -> Record {
    let mut r = Record::first(at(0));
    r.memory.desired = Some(desired);
    r.decided_at = 1;
    r.verdict = Verdict::On {
        leaving: leaving
            .iter()
            .map(|id| {
                (
                    (*id).to_owned(),
                    Leave {
                        reason: LeaveReason::Surplus {
                            running: 0,
                            desired: 0,
                        },
                        since: 0,
                        seen: millis(now()),
                    },
                )
            })
            .collect(),
        stopping: Vec::new(),
    };
    r
}

fn decide_now(f: &Facts, p: &Record) -> Decision {
    decide(f, p, &RULES, now())
}

#[test]
fn a_steady_service_wants_every_task_and_lists_them() {
    let f = facts(
        service(2, vec![deployment("d1", true, 2, 0)]),
        vec![task("a", "d1", "z1", 0), task("b", "d1", "z2", 0)],
    );
    let d = decide_now(&f, &prev(2, &[]));
    assert!(leaving(&d).is_empty());
    let record = Record {
        decided_at: millis(now()),
        verdict: d.verdict,
        ..Record::first(now())
    };
    assert_eq!(record.membership_of("a"), Some(Membership::Wanted));
}

#[test]
fn a_scale_in_sends_exactly_the_surplus_and_keeps_the_zones_balanced() {
    // Zones z1: a, b, c; z2: d, e; z3: f. Three must go; what stays is one per zone.
    let tasks = vec![
        task("a", "d1", "z1", 10),
        task("b", "d1", "z1", 20),
        task("c", "d1", "z1", 30),
        task("d", "d1", "z2", 5),
        task("e", "d1", "z2", 40),
        task("f", "d1", "z3", 1),
    ];
    let mut s = service(3, vec![deployment("d1", true, 3, 0)]);
    s.running = 6;
    let d = decide_now(&facts(s, tasks), &prev(6, &[]));
    // z1 loses two (its oldest first), z2 its oldest.
    assert_eq!(leaving(&d), ["a", "b", "d"]);
    assert!(d.busy);
}

#[test]
fn unhealthy_tasks_and_tasks_on_draining_instances_go_first() {
    let mut tasks = vec![
        task("a", "d1", "z1", 10),
        task("b", "d1", "z1", 20),
        task("c", "d1", "z1", 30),
    ];
    tasks[2].health = Health::Unhealthy;
    tasks[1].instance = Some("i-draining".into());
    let mut s = service(1, vec![deployment("d1", true, 1, 0)]);
    s.running = 3;
    let mut f = facts(s, tasks);
    f.draining_instances.insert("i-draining".into());
    assert_eq!(leaving(&decide_now(&f, &prev(3, &[]))), ["b", "c"]);
}

#[test]
fn a_task_ecs_starts_of_its_own_accord_is_no_surplus_until_it_has_settled() {
    // ECS replaces an unhealthy task: the replacement runs beside it. Nobody else
    // leaves; the unhealthy one is ECS's to stop.
    let mut s = service(2, vec![deployment("d1", true, 2, 0)]);
    s.running = 3;
    let young = task("new", "d1", "z1", 9_990);
    let tasks = vec![task("a", "d1", "z1", 10), task("b", "d1", "z2", 20), young];
    let d = decide_now(&facts(s.clone(), tasks.clone()), &prev(2, &[]));
    assert!(leaving(&d).is_empty(), "{d:?}");
    // Once it has settled and the surplus remains (ECS could not stop the task it
    // replaced: a protected task in an over-served zone), the pick follows the zones.
    let later = decide(
        &facts(s, tasks),
        &prev(2, &[]),
        &RULES,
        now() + Duration::from_secs(60),
    );
    assert_eq!(leaving(&later), ["a"]);
}

#[test]
fn after_a_fall_of_the_desired_count_older_tasks_leave_at_once() {
    let mut s = service(1, vec![deployment("d1", true, 1, 0)]);
    s.running = 2;
    let mut p = prev(2, &[]);
    // A task younger than the settle time, but older than the fall.
    let tasks = vec![task("a", "d1", "z1", 9_990), task("b", "d1", "z1", 9_995)];
    let d = decide_now(&facts(s, tasks), &p);
    assert_eq!(leaving(&d), ["a"]);
    assert_eq!(d.memory.desired_fell_at, Some(millis(now())));
    p.memory = d.memory;
}

#[test]
fn a_task_that_has_let_go_stays_gone_until_the_desired_count_rises() {
    let mut s = service(2, vec![deployment("d1", true, 2, 0)]);
    s.running = 3;
    // c is already leaving though a would rank first now.
    let tasks = vec![
        task("a", "d1", "z1", 1),
        task("b", "d1", "z1", 2),
        task("c", "d1", "z1", 3),
    ];
    let d = decide_now(&facts(s.clone(), tasks.clone()), &prev(2, &["c"]));
    assert_eq!(leaving(&d), ["c"]);
    // A young task beside it does not bring it back either.
    let mut with_young = tasks.clone();
    with_young.push(task("y", "d1", "z1", 9_999));
    s.running = 4;
    let d = decide_now(&facts(s.clone(), with_young), &prev(2, &["c"]));
    assert_eq!(leaving(&d), ["c"]);
    // The desired count rises to three: wanted again.
    s.desired = 3;
    s.running = 3;
    let d = decide_now(&facts(s, tasks), &prev(2, &["c"]));
    assert!(leaving(&d).is_empty());
}

#[test]
fn an_ecs_start_in_place_of_another_task_does_not_bring_a_leaver_back() {
    // Scale-in 3 -> 2: c leaves; before it lets go, ECS replaces a (unhealthy) with y.
    // Three run for two wanted, one of them young: the surplus is still c's, and ECS
    // stops c once it has let go.
    let mut s = service(2, vec![deployment("d1", true, 2, 0)]);
    s.running = 3;
    let tasks = vec![
        task("b", "d1", "z1", 2),
        task("c", "d1", "z1", 3),
        task("y", "d1", "z2", 9_999),
    ];
    let d = decide_now(&facts(s, tasks), &prev(2, &["c"]));
    assert_eq!(leaving(&d), ["c"]);
}

fn rolling(
    desired: u32,
    min: u32,
    max: u32,
    old: &[&str],
    new: &[(&str, u64)],
) -> (ServiceFacts, Vec<TaskFacts>) {
    let mut s = service(
        desired,
        vec![
            deployment("new", true, desired, 100),
            deployment("old", false, 0, 0),
        ],
    );
    s.minimum_healthy_percent = min;
    s.maximum_percent = max;
    let mut tasks: Vec<TaskFacts> = old.iter().map(|id| task(id, "old", "z1", 1)).collect();
    tasks.extend(
        new.iter()
            .map(|(id, started)| task(id, "new", "z1", *started)),
    );
    s.running = u32::try_from(tasks.len()).unwrap();
    (s, tasks)
}

#[test]
fn an_old_task_leaves_only_once_the_primary_has_ready_tasks_to_take_its_place() {
    // 200/100: two new tasks running, but for less than the settle time.
    let (s, tasks) = rolling(2, 100, 200, &["o1", "o2"], &[("n1", 9_990), ("n2", 9_990)]);
    assert!(leaving(&decide_now(&facts(s.clone(), tasks), &prev(2, &[]))).is_empty());
    // Settled: both old tasks go.
    let (s, tasks) = rolling(2, 100, 200, &["o1", "o2"], &[("n1", 100), ("n2", 100)]);
    let d = decide_now(&facts(s, tasks), &prev(2, &[]));
    assert_eq!(leaving(&d), ["o1", "o2"]);
    assert!(matches!(
        &d.verdict,
        Verdict::On { leaving, .. } if leaving["o1"].reason == LeaveReason::Replaced {
            deployment: "old".into(), primary: "new".into()
        }
    ));
    // One of two settled: one old task goes.
    let (s, tasks) = rolling(2, 100, 200, &["o1", "o2"], &[("n1", 100), ("n2", 9_999)]);
    assert_eq!(
        leaving(&decide_now(&facts(s, tasks), &prev(2, &[]))),
        ["o1"]
    );
}

#[test]
fn where_containers_are_checked_ready_means_healthy() {
    let (s, mut tasks) = rolling(2, 100, 200, &["o1", "o2"], &[("n1", 100), ("n2", 100)]);
    for t in &mut tasks {
        t.health = if t.deployment.as_deref() == Some("old") {
            Health::Healthy
        } else {
            Health::Unknown
        };
    }
    assert!(leaving(&decide_now(&facts(s.clone(), tasks.clone()), &prev(2, &[]))).is_empty());
    tasks[2].health = Health::Healthy;
    tasks[3].health = Health::Unhealthy;
    assert_eq!(
        leaving(&decide_now(&facts(s, tasks), &prev(2, &[]))),
        ["o1"]
    );
}

#[test]
fn a_failing_or_failed_deployment_keeps_every_old_task() {
    let (mut s, tasks) = rolling(2, 100, 200, &["o1", "o2"], &[("n1", 100), ("n2", 100)]);
    // Tasks of the PRIMARY keep failing: its failedTasks rose just now.
    s.deployments[0].failed_tasks = 2;
    let d = decide_now(&facts(s.clone(), tasks.clone()), &prev(2, &[]));
    assert!(leaving(&d).is_empty());
    // One that had let go before stays gone while the rollout has not failed: a
    // PRIMARY failing its checks is no figure of ECS's that wants it back.
    let d = decide_now(&facts(s.clone(), tasks.clone()), &prev(2, &["o1"]));
    assert_eq!(leaving(&d), ["o1"]);
    // The circuit breaker tripped: the old tasks that had let go are wanted again.
    s.deployments[0].rollout = Rollout::Failed;
    let d = decide_now(&facts(s, tasks), &prev(2, &["o1"]));
    assert!(leaving(&d).is_empty());
}

#[test]
fn at_maximum_percent_100_old_tasks_let_go_one_at_a_time() {
    // 100/50 with two old tasks and nothing new: ECS cannot start a new one.
    let (s, tasks) = rolling(2, 50, 100, &["o1", "o2"], &[]);
    let d = decide_now(&facts(s.clone(), tasks.clone()), &prev(2, &[]));
    assert_eq!(leaving(&d), ["o1"]);
    // While o1 still runs, nobody else goes.
    assert_eq!(
        leaving(&decide_now(&facts(s, tasks), &prev(2, &["o1"]))),
        ["o1"]
    );
    // o1 has stopped; the new task is starting: o2 waits for it.
    let (s, tasks) = rolling(2, 50, 100, &["o2"], &[("n1", 9_995)]);
    assert!(leaving(&decide_now(&facts(s, tasks), &prev(2, &[]))).is_empty());
    // The new task is ready: o2 goes.
    let (s, tasks) = rolling(2, 50, 100, &["o2"], &[("n1", 100)]);
    assert_eq!(
        leaving(&decide_now(&facts(s, tasks), &prev(2, &[]))),
        ["o2"]
    );
    // The new task runs but fails its container check: o2 stays, whatever the stall.
    let (s, mut tasks) = rolling(2, 50, 100, &["o2"], &[("n1", 100)]);
    tasks[0].health = Health::Healthy;
    tasks[1].health = Health::Unhealthy;
    assert!(leaving(&decide_now(&facts(s, tasks), &prev(2, &[]))).is_empty());
    // 100/0 likewise, one at a time; 100/100 never (ECS could not proceed either).
    let (s, tasks) = rolling(3, 0, 100, &["o1", "o2", "o3"], &[]);
    assert_eq!(
        leaving(&decide_now(&facts(s, tasks), &prev(3, &[]))),
        ["o1"]
    );
    let (s, tasks) = rolling(2, 100, 100, &["o1", "o2"], &[]);
    assert!(leaving(&decide_now(&facts(s, tasks), &prev(2, &[]))).is_empty());
}

#[test]
fn a_traffic_shifting_deployment_keeps_the_old_side_until_clean_up() {
    let (mut s, tasks) = rolling(2, 100, 200, &["o1", "o2"], &[("n1", 100), ("n2", 100)]);
    s.strategy = Strategy::TrafficShift("BLUE_GREEN".into());
    let mut f = facts(s, tasks);
    for (status, stage, released) in [
        ("IN_PROGRESS", "SCALE_UP", false),
        ("IN_PROGRESS", "PRODUCTION_TRAFFIC_SHIFT", false),
        ("IN_PROGRESS", "BAKE_TIME", false),
        ("ROLLBACK_IN_PROGRESS", "CLEAN_UP", false),
        ("IN_PROGRESS", "CLEAN_UP", true),
        ("SUCCESSFUL", "CLEAN_UP", true),
    ] {
        f.shift = Some(ShiftFacts {
            status: status.into(),
            stage: Some(stage.into()),
        });
        let d = decide_now(&f, &prev(2, &[]));
        assert_eq!(!leaving(&d).is_empty(), released, "{status} {stage}");
    }
    // Without the lifecycle (not read, or denied): nobody leaves.
    f.shift = None;
    assert!(leaving(&decide_now(&f, &prev(2, &[]))).is_empty());
}

#[test]
fn code_deploy_and_external_controllers_turn_the_drain_off() {
    let mut s = service(2, vec![]);
    s.controller = Controller::CodeDeploy;
    let d = decide_now(&facts(s.clone(), vec![]), &prev(2, &[]));
    assert!(matches!(&d.verdict, Verdict::Off { why } if why.contains("CODE_DEPLOY")));
    s.controller = Controller::External;
    assert!(matches!(
        decide_now(&facts(s, vec![]), &prev(2, &[])).verdict,
        Verdict::Off { .. }
    ));
}

#[test]
fn a_task_ecs_is_stopping_learns_it_from_either_listing() {
    // b is described as stopping; c is no longer listed as wanted but as stopped.
    let mut tasks = vec![task("a", "d1", "z1", 0), task("b", "d1", "z1", 0)];
    tasks[1].stopping = true;
    let mut f = facts(service(1, vec![deployment("d1", true, 1, 0)]), tasks);
    f.stopped.insert("c".into());
    let d = decide_now(&f, &prev(1, &[]));
    let record = Record {
        decided_at: millis(now()),
        verdict: d.verdict,
        ..Record::first(now())
    };
    for id in ["b", "c"] {
        assert_eq!(
            record.membership_of(id),
            Some(Membership::Leaving(LeaveReason::Stopping)),
            "{id}"
        );
    }
    assert_eq!(record.membership_of("a"), Some(Membership::Wanted));
}

#[test]
fn a_task_that_has_left_stays_named_until_long_after_ecs_stopped_it() {
    let s = service(1, vec![deployment("d1", true, 1, 0)]);
    // x left earlier; now neither listing shows it (it stopped a while ago).
    let f = facts(s.clone(), vec![task("a", "d1", "z1", 0)]);
    let d = decide_now(&f, &prev(1, &["x"]));
    assert_eq!(leaving(&d), ["x"]);
    let d = decide(
        &f,
        &prev(1, &["x"]),
        &RULES,
        now() + Duration::from_secs(3_601),
    );
    assert!(leaving(&d).is_empty());
}

#[test]
fn a_listing_that_misses_tasks_never_brings_one_back() {
    // Two of three leave for a scale-in 3 -> 1; a listing made while ECS stopped one
    // shows only two tasks, one of them leaving: the other leaver is not recalled.
    let mut s = service(1, vec![deployment("d1", true, 1, 0)]);
    s.running = 2;
    let tasks = vec![task("a", "d1", "z1", 1), task("c", "d1", "z1", 3)];
    let d = decide_now(&facts(s, tasks), &prev(1, &["a", "b"]));
    assert_eq!(leaving(&d), ["a", "b"]);
}

#[test]
fn a_surplus_ecs_resolved_itself_brings_its_leaver_back() {
    // Scale-in 3 -> 2: a leaves; before it lets go, ECS stops c (idle and
    // unprotected, or unhealthy). The service now runs what it wants, a among them:
    // a leave kept now would hold a out of work that ECS will never stop it for.
    let mut s = service(2, vec![deployment("d1", true, 2, 0)]);
    s.running = 2;
    let tasks = vec![task("a", "d1", "z1", 1), task("b", "d1", "z2", 2)];
    let mut f = facts(s.clone(), tasks.clone());
    f.stopped.insert("c".to_owned());
    let d = decide_now(&f, &prev(2, &["a"]));
    assert!(leaving(&d).is_empty(), "{:?}", leaving(&d));
    // While the surplus lasts, the leaver stays gone.
    s.running = 3;
    let mut three = tasks;
    three.push(task("c", "d1", "z3", 3));
    let d = decide_now(&facts(s, three), &prev(2, &["a"]));
    assert_eq!(leaving(&d), ["a"]);
}

#[test]
fn without_a_listing_the_last_verdict_stands() {
    let s = service(2, vec![deployment("d1", true, 2, 0)]);
    let f = Facts {
        service: s,
        tasks: None,
        draining_instances: BTreeSet::new(),
        shift: None,
        stopped: BTreeSet::new(),
    };
    let p = prev(2, &["x"]);
    let d = decide_now(&f, &p);
    assert_eq!(leaving(&d), ["x"]);
}

#[test]
fn without_a_load_balancer_a_healthy_container_is_ready_at_once() {
    let (mut s, mut tasks) = rolling(2, 100, 200, &["o1", "o2"], &[("n1", 9_999), ("n2", 9_999)]);
    s.load_balanced = false;
    for t in &mut tasks {
        t.health = Health::Healthy;
    }
    assert_eq!(
        leaving(&decide_now(&facts(s.clone(), tasks.clone()), &prev(2, &[]))),
        ["o1", "o2"]
    );
    // Behind a load balancer it still waits: its targets may yet fail.
    s.load_balanced = true;
    assert!(leaving(&decide_now(&facts(s, tasks), &prev(2, &[]))).is_empty());
}
