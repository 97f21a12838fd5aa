//! Drain in the ECS that users run: the websocket service with the load balancer's
//! and the container's health checks acted on, a deployment whose new tasks never pass
//! their load balancer check, rolling deployments at several percentages, and ECS's
//! blue/green deployment, each under load. The figures are the drain's acceptance
//! criteria; each test names the behaviour of ECS it depends on (see `e2e::sim`).

use std::collections::BTreeMap;
use std::time::Duration;

use e2e::sim::settings::RollbackMode;
use e2e::sim::{Model, Progress, Revision, Rollout, SimConfig, Simulator, Stage, Strategy};

use super::drain::{all_protected, crowd, every_client_served, websocket};

/// What a test notes of the model when a task first says it is leaving.
#[derive(Debug, Clone, PartialEq)]
struct Left {
    /// Simulation time.
    at: Duration,
    /// The stage of the newest deployment then, if it has one.
    stage: Option<Stage>,
    /// The newest deployment then, and its rollout.
    newest: String,
    rollout: Rollout,
}

/// Waits until `done` holds, at most `timeout`, noting when each of `tasks` first
/// logs that it is leaving its service; returns how long it took and the notes.
async fn watch_leaving(
    sim: &Simulator,
    tasks: &[String],
    what: &str,
    timeout: Duration,
    done: impl Fn(&Model) -> bool,
) -> (Duration, BTreeMap<String, Left>) {
    let start = tokio::time::Instant::now();
    let mut left = BTreeMap::new();
    loop {
        let lines = sim.lines();
        for id in tasks {
            if left.contains_key(id) {
                continue;
            }
            if lines
                .iter()
                .any(|(t, l)| t == id && l.contains("Leaving the service"))
            {
                let m = sim.model();
                let newest = m.deployments.last().expect("a deployment");
                left.insert(
                    id.clone(),
                    Left {
                        at: m.now,
                        stage: newest.stage.map(|(s, _)| s),
                        newest: newest.id.clone(),
                        rollout: newest.rollout,
                    },
                );
            }
        }
        if done(&sim.model()) {
            return (start.elapsed(), left);
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}; left: {left:?}\n{}",
            sim.describe()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The ids of the tasks the service wants now.
fn wanted(sim: &Simulator) -> Vec<String> {
    sim.model().wanted().map(|t| t.id.clone()).collect()
}

#[tokio::test]
async fn scale_in_3_to_1_under_300_clients_with_health_checks_acted_on() {
    // ECS replaces a task that fails its target group's or its container's health
    // check whatever its protection; a leaving task must not look unhealthy.
    let sim = Simulator::start(websocket(3, &[])).await;
    let crowd = crowd(&sim, 300).await;
    all_protected(&sim).await;
    let since = sim.now();
    sim.set_desired(1);
    let took = sim
        .wait_for(
            "the service to run one task",
            Duration::from_secs(120),
            |m| m.alive() == 1 && m.wanted().count() == 1,
        )
        .await;
    eprintln!(
        "scale-in 3 -> 1 with 300 clients, health checks acted on, took {took:?}; longest gap {:?}, {} refused or failed connects",
        crowd.longest_gap(),
        crowd.failed_connects()
    );
    {
        let m = sim.model();
        let started = m.tasks.iter().filter(|t| t.created_at >= since).count();
        assert_eq!(
            (m.stopped_since(since), started),
            (2, 0),
            "stopped, started: {}",
            Simulator::describe_with(&m)
        );
        let unhealthy = m
            .tasks
            .iter()
            .filter(|t| t.stop.as_ref().is_some_and(|s| s.reason.unhealthy()))
            .count();
        assert_eq!(
            unhealthy,
            0,
            "stopped as unhealthy: {}",
            Simulator::describe_with(&m)
        );
    }
    every_client_served(&sim, &crowd, 300).await;
}

/// A deployment whose new tasks run, with HEALTHY containers, but whose targets fail
/// (the target group checks the wrong port for them): the circuit breaker fails it and
/// ECS rolls back. No old task may leave or stop meanwhile.
async fn bad_deployment_rolls_back(mode: RollbackMode) {
    let mut config = websocket(2, &[]);
    config.ecs.unknowns.rollback = mode;
    let sim = Simulator::start(config).await;
    let crowd = crowd(&sim, 200).await;
    all_protected(&sim).await;
    let old = sim.model().primary.clone();
    let old_tasks = wanted(&sim);
    let bad = sim.deploy_with(Revision {
        target_port_wrong: true,
        ..Revision::default()
    });
    let (took, left) = watch_leaving(
        &sim,
        &old_tasks,
        "the rollback to complete",
        Duration::from_secs(150),
        |m| {
            m.deployment(&bad).is_some_and(|d| {
                d.rollout == Rollout::Failed && d.progress == Progress::RollbackSuccessful
            }) && m.primary().completed()
        },
    )
    .await;
    eprintln!(
        "rollback of a deployment failing at the load balancer took {took:?}; longest gap {:?}, {} refused or failed connects, {} old tasks left",
        crowd.longest_gap(),
        crowd.failed_connects(),
        left.len()
    );
    {
        let m = sim.model();
        assert_eq!(
            m.primary().revision,
            m.deployment(&old).map(|d| d.revision).unwrap_or_default()
        );
        match mode {
            RollbackMode::KeepOldTasks => {
                assert!(
                    left.is_empty(),
                    "old tasks left: {left:?}\n{}",
                    Simulator::describe_with(&m)
                );
                let stopped: Vec<&String> = old_tasks
                    .iter()
                    .filter(|id| m.task(id).is_some_and(|t| t.stop.is_some()))
                    .collect();
                assert!(
                    stopped.is_empty(),
                    "old tasks stopped: {stopped:?}\n{}",
                    Simulator::describe_with(&m)
                );
            }
            RollbackMode::StartNewTasks => {
                // The rollback is a deployment of its own, which replaces the old tasks;
                // none may leave while the bad deployment is under way.
                let early: Vec<_> = left
                    .iter()
                    .filter(|(_, l)| l.newest == bad && l.rollout == Rollout::InProgress)
                    .collect();
                assert!(
                    early.is_empty(),
                    "left before the rollback: {early:?}\n{}",
                    Simulator::describe_with(&m)
                );
            }
        }
    }
    every_client_served(&sim, &crowd, 200).await;
}

#[tokio::test]
async fn a_deployment_failing_its_load_balancer_check_rolls_back_and_no_old_task_leaves() {
    bad_deployment_rolls_back(RollbackMode::KeepOldTasks).await;
}

#[tokio::test]
async fn a_deployment_failing_its_load_balancer_check_rolls_back_to_new_tasks_and_no_old_task_leaves_first()
 {
    bad_deployment_rolls_back(RollbackMode::StartNewTasks).await;
}

/// A rolling deployment of 2 tasks at `max` / `min` percent under 200 clients.
async fn rolling_under_load(max: u32, min: u32) {
    let mut config: SimConfig = websocket(2, &[]);
    config.ecs.maximum_percent = max;
    config.ecs.minimum_healthy_percent = min;
    let sim = Simulator::start(config).await;
    let crowd = crowd(&sim, 200).await;
    all_protected(&sim).await;
    let deployment = sim.deploy();
    let took = sim
        .wait_for(
            "the deployment to complete",
            Duration::from_secs(150),
            |m| super::drain::completed(m, &deployment, 2),
        )
        .await;
    eprintln!(
        "rolling deployment at {max} %/{min} % of 2 tasks with 200 clients took {took:?}; longest gap {:?}, {} refused or failed connects",
        crowd.longest_gap(),
        crowd.failed_connects()
    );
    every_client_served(&sim, &crowd, 200).await;
}

#[tokio::test]
async fn rolling_deployment_at_200_100_under_load_completes() {
    rolling_under_load(200, 100).await;
}

#[tokio::test]
async fn rolling_deployment_at_100_50_under_load_completes() {
    rolling_under_load(100, 50).await;
}

#[tokio::test]
async fn rolling_deployment_at_100_0_under_load_completes() {
    rolling_under_load(100, 0).await;
}

#[tokio::test]
async fn blue_green_deployment_under_load_shifts_traffic_before_any_old_task_leaves() {
    // ECS brings the green side to 100 % RUNNING before it shifts production traffic
    // to it; until then the blue side carries every client.
    let mut config = websocket(2, &[]);
    config.ecs.strategy = Strategy::BlueGreen {
        bake: Duration::from_secs(10),
        stage: Duration::from_secs(1),
    };
    let sim = Simulator::start(config).await;
    let crowd = crowd(&sim, 200).await;
    all_protected(&sim).await;
    let blue_tasks = wanted(&sim);
    let green = sim.deploy();
    let (took, left) = watch_leaving(
        &sim,
        &blue_tasks,
        "the blue/green deployment to complete",
        Duration::from_secs(150),
        |m| m.deployment(&green).is_some_and(|d| d.completed()),
    )
    .await;
    eprintln!(
        "blue/green deployment of 2 tasks with 200 clients took {took:?}; longest gap {:?}, {} refused or failed connects",
        crowd.longest_gap(),
        crowd.failed_connects()
    );
    let early: Vec<_> = left
        .iter()
        .filter(|(_, l)| l.stage.is_none_or(|s| s < Stage::ProductionTrafficShift))
        .collect();
    assert!(
        early.is_empty(),
        "blue tasks left before production traffic shifted: {early:?}\n{}",
        sim.describe()
    );
    every_client_served(&sim, &crowd, 200).await;
}
