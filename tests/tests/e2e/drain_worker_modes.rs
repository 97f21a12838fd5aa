//! Drain of the worker in the ECS that users run, its container health check acted
//! on: a deployment at maximumPercent 100 with a backlog, and a deployment whose new
//! tasks fail their container health check, which the circuit breaker rolls back.
//! Nothing lost, nothing worked twice.

use std::time::Duration;

use e2e::moto::{Moto, queue_counts, send};
use e2e::sim::{ContainerCheck, Progress, Revision, Rollout, SimConfig, Simulator};
use e2e::wait_for;

/// The worker at a test's pace, against `queue`: four slots, short polls, a check of
/// its service every 3 s, both health checks every second.
fn worker(moto: &Moto, queue: &str, desired: u32) -> SimConfig {
    let moto_env = moto.env();
    let mut config = SimConfig::queue_consumer(desired)
        .env(moto_env.iter().map(|(k, v)| (*k, v.as_str())))
        .env([
            ("COPILOT_QUEUE_URI", queue),
            ("WORKER_CONCURRENCY", "4"),
            ("QUEUE_WAIT_SECONDS", "2"),
            ("DRAIN_CHECK_SECONDS", "3"),
            ("RUST_LOG", "info"),
        ])
        .at_test_pace();
    config.ecs.stop_timeout = Duration::from_secs(40);
    config
}

/// Sends `n` jobs of `ms` milliseconds, one every `every`, in the background; returns
/// their message ids when done.
fn produce(
    moto: &Moto,
    queue: &str,
    n: usize,
    ms: u64,
    every: Duration,
) -> tokio::task::JoinHandle<Vec<String>> {
    let client = moto.client();
    let queue = queue.to_owned();
    tokio::spawn(async move {
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            ids.push(send(&client, &queue, &ms.to_string()).await);
            tokio::time::sleep(every).await;
        }
        ids
    })
}

/// Every job of `ids` was started and done exactly once, and the queue is empty.
async fn each_job_once(sim: &Simulator, moto: &Moto, queue: &str, ids: &[String]) {
    let client = moto.client();
    wait_for("every job to be done", Duration::from_secs(180), || async {
        let done = sim
            .lines()
            .iter()
            .filter(|(_, l)| l.contains(" - Done"))
            .count();
        (done >= ids.len()).then_some(())
    })
    .await;
    // "Done" is logged before the delete: wait for the last deletes. A message whose
    // delete was lost would come back and run again, which the count below catches.
    wait_for("the queue to be empty", Duration::from_secs(60), || async {
        (queue_counts(&client, queue).await == Some((0, 0))).then_some(())
    })
    .await;
    let lines = sim.lines();
    for id in ids {
        let started = lines
            .iter()
            .filter(|(_, l)| l.contains(&format!("{id} - Started")))
            .count();
        let done = lines
            .iter()
            .filter(|(_, l)| l.contains(&format!("{id} - Done")))
            .count();
        assert_eq!(
            (started, done),
            (1, 1),
            "message {id}: lost or worked twice\n{}",
            sim.describe()
        );
    }
    let m = sim.model();
    assert_eq!(
        (m.sigkills, m.crashes),
        (0, 0),
        "{}",
        Simulator::describe_with(&m)
    );
}

#[tokio::test]
async fn worker_deployment_at_100_50_with_a_backlog_completes_and_loses_nothing() {
    // At maximumPercent 100 ECS starts no new task before an old one stops; with a
    // backlog every old task is protected.
    let moto = Moto::start().await;
    let queue = moto.create_queue("jobs", 30).await;
    let mut config = worker(&moto, &queue, 2);
    config.ecs.maximum_percent = 100;
    config.ecs.minimum_healthy_percent = 50;
    let sim = Simulator::start(config).await;
    // Jobs of 800 ms at 20 a second, twice what two tasks of four slots can work.
    let producer = produce(&moto, &queue, 600, 800, Duration::from_millis(50));
    let client = moto.client();
    wait_for("a backlog", Duration::from_secs(60), || async {
        let (visible, _) = queue_counts(&client, &queue).await?;
        (visible >= 20).then_some(())
    })
    .await;
    let deployment = sim.deploy();
    let took = sim
        .wait_for(
            "the deployment to complete",
            Duration::from_secs(150),
            |m| super::drain::completed(m, &deployment, 2),
        )
        .await;
    eprintln!("worker deployment at 100 %/50 % with a backlog took {took:?}");
    let (backlog, _) = queue_counts(&client, &queue)
        .await
        .expect("the queue's counts");
    assert!(
        backlog > 0,
        "the deployment waited for the backlog to end: {}",
        sim.describe()
    );
    let ids = producer.await.expect("the producer finishes");
    each_job_once(&sim, &moto, &queue, &ids).await;
}

#[tokio::test]
async fn worker_deployment_failing_its_container_check_rolls_back_and_old_tasks_keep_working() {
    // The new revision's container health check fails (it asks a port where nothing
    // listens): its tasks run and even work jobs, but are never healthy, so the
    // circuit breaker fails the deployment and ECS rolls back. Old tasks must keep
    // working throughout.
    let moto = Moto::start().await;
    let queue = moto.create_queue("jobs", 30).await;
    let config = worker(&moto, &queue, 2);
    let mut broken = config
        .ecs
        .container_check
        .clone()
        .expect("a container check");
    broken.command = ["healthcheck", "--health-port", "1"]
        .map(str::to_owned)
        .to_vec();
    let sim = Simulator::start(config).await;
    let producer = produce(&moto, &queue, 300, 500, Duration::from_millis(100));
    let old_tasks: Vec<String> = sim.model().wanted().map(|t| t.id.clone()).collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let bad = sim.deploy_with(Revision {
        container_check: Some(ContainerCheck { ..broken }),
        ..Revision::default()
    });
    let took = sim
        .wait_for("the rollback to complete", Duration::from_secs(150), |m| {
            m.deployment(&bad).is_some_and(|d| {
                d.rollout == Rollout::Failed && d.progress == Progress::RollbackSuccessful
            }) && m.primary().completed()
        })
        .await;
    eprintln!("rollback of a worker deployment failing its container check took {took:?}");
    let lines = sim.lines();
    let left: Vec<&String> = old_tasks
        .iter()
        .filter(|id| {
            lines
                .iter()
                .any(|(t, l)| t == *id && l.contains("Leaving the service"))
        })
        .collect();
    assert!(
        left.is_empty(),
        "old tasks left before the new ones were healthy: {left:?}\n{}",
        sim.describe()
    );
    {
        let m = sim.model();
        assert!(
            old_tasks
                .iter()
                .all(|id| m.task(id).is_some_and(|t| t.stop.is_none())),
            "an old task stopped: {}",
            Simulator::describe_with(&m)
        );
    }
    let ids = producer.await.expect("the producer finishes");
    each_job_once(&sim, &moto, &queue, &ids).await;
}
