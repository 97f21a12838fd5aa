//! Drain: a protected service still scales in and finishes its deployments under
//! load. Each test runs the real binaries as the tasks of a simulated ECS service
//! (`e2e::sim`): a scheduler that stops only unprotected tasks, a load balancer that
//! sends new connections to healthy tasks, and clients that reconnect as the page
//! does.

use std::time::Duration;

use e2e::crowd::Crowd;
use e2e::sim::{ApiFault, SimConfig, Simulator, Status};
use e2e::wait_for;

/// Checks every 3 s (the default is 30 s), health checks every second, and a
/// deregistration delay of 3 s: the shape of a deployment, at a test's pace.
pub(crate) fn websocket(desired: u32, extra: &[(&str, &str)]) -> SimConfig {
    let mut config = SimConfig::websocket(desired)
        .env([
            ("RUST_LOG", "info"),
            ("DRAIN_CHECK_SECONDS", "3"),
            // A notice, as a user may set one: the clients of a leaving task stay
            // 3 s before they are told to go, and the drain must still hold.
            ("DRAIN_NOTICE_SECONDS", "3"),
            ("SHUTDOWN_GRACE_SECONDS", "5"),
        ])
        .env(extra.iter().copied())
        .at_test_pace();
    config.ecs.stop_timeout = Duration::from_secs(30);
    config
}

/// `n` page-like clients through the load balancer, all connected.
pub(crate) async fn crowd(sim: &Simulator, n: usize) -> Crowd {
    let port = sim.balancer().map(e2e::sim::Balancer::port).unwrap_or(0);
    let crowd = Crowd::start(
        &format!("ws://127.0.0.1:{port}/"),
        n,
        Duration::from_secs(2),
    );
    wait_for(
        "every client to connect",
        Duration::from_secs(60),
        || async { (crowd.connected() == n).then_some(()) },
    )
    .await;
    crowd
}

/// Waits until every task the service wants is protected in ECS.
pub(crate) async fn all_protected(sim: &Simulator) {
    sim.wait_for("every task to be protected", Duration::from_secs(30), |m| {
        m.wanted().all(|t| t.protected(m.now))
    })
    .await;
}

/// Tasks not yet stopped.
pub(crate) fn alive(m: &e2e::sim::Model) -> usize {
    m.alive() as usize
}

/// The deployment `id` has completed, and the service runs `n` tasks.
pub(crate) fn completed(m: &e2e::sim::Model, id: &str, n: usize) -> bool {
    m.primary == id && m.primary().completed() && m.live_deployments().count() == 1 && alive(m) == n
}

/// The end state every drain must reach: every client connected, none without a
/// server for more than 10 s, no task killed, none crashed.
pub(crate) async fn every_client_served(sim: &Simulator, crowd: &Crowd, n: usize) {
    wait_for(
        "every client to be connected",
        Duration::from_secs(30),
        || async { (crowd.connected() == n).then_some(()) },
    )
    .await;
    let gap = crowd.longest_gap();
    assert!(
        gap <= Duration::from_secs(10),
        "a client waited {gap:?} for a server"
    );
    let m = sim.model();
    assert_eq!(
        (m.sigkills, m.crashes),
        (0, 0),
        "{}",
        Simulator::describe_with(&m)
    );
}

#[tokio::test]
async fn websocket_scale_in_under_load_reaches_the_desired_count() {
    let sim = Simulator::start(websocket(3, &[])).await;
    let crowd = crowd(&sim, 300).await;
    all_protected(&sim).await;
    sim.set_desired(1);
    let took = sim
        .wait_for(
            "the service to run one task",
            Duration::from_secs(120),
            |m| alive(m) == 1,
        )
        .await;
    eprintln!("scale-in 3 -> 1 with 300 clients took {took:?}");
    every_client_served(&sim, &crowd, 300).await;
    // The one left is protected again, for its clients.
    all_protected(&sim).await;
}

#[tokio::test]
async fn websocket_deployment_under_load_completes() {
    let sim = Simulator::start(websocket(2, &[])).await;
    let crowd = crowd(&sim, 200).await;
    all_protected(&sim).await;
    let deployment = sim.deploy();
    let took = sim
        .wait_for(
            "the deployment to complete",
            Duration::from_secs(150),
            |m| completed(m, &deployment, 2),
        )
        .await;
    eprintln!("deployment of 2 tasks with 200 clients took {took:?}");
    assert!(
        sim.model()
            .tasks
            .iter()
            .filter(|t| t.status != Status::Stopped)
            .all(|t| t.deployment == deployment),
        "{}",
        sim.describe()
    );
    every_client_served(&sim, &crowd, 200).await;
}

/// The port of the task that is leaving, once one is.
async fn leaving_task(sim: &Simulator) -> (String, u16) {
    wait_for("a task to leave", Duration::from_secs(30), || async {
        for (id, port) in ports(sim) {
            if status(port).await["drain"]["membership"] == "leaving" {
                return Some((id, port));
            }
        }
        None
    })
    .await
}

fn ports(sim: &Simulator) -> Vec<(String, u16)> {
    sim.model()
        .wanted()
        .filter_map(|t| t.port.map(|p| (t.id.clone(), p)))
        .collect()
}

async fn status(port: u16) -> serde_json::Value {
    let Ok(r) = reqwest::get(format!("http://127.0.0.1:{port}/status")).await else {
        return serde_json::Value::Null;
    };
    r.json().await.unwrap_or_default()
}

async fn healthz(port: u16) -> u16 {
    reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
        .await
        .map_or(0, |r| r.status().as_u16())
}

#[tokio::test]
async fn a_leaving_task_is_wanted_again_when_the_desired_count_rises() {
    // Clients stay a minute after the task starts leaving: time to change one's mind.
    let sim = Simulator::start(websocket(2, &[("DRAIN_NOTICE_SECONDS", "60")])).await;
    let crowd = crowd(&sim, 20).await;
    all_protected(&sim).await;
    sim.set_desired(1);
    let (id, port) = leaving_task(&sim).await;
    // Leaving, it stays green for ECS (which replaces a task whose check fails) and
    // refuses new clients at the upgrade instead, with Retry-After.
    assert_eq!(healthz(port).await, 200);
    let refused = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/")).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503);
            assert_eq!(
                response.headers().get("retry-after").map(|v| v.as_bytes()),
                Some(&b"1"[..])
            );
        }
        other => panic!("a leaving task took a new client: {other:?}"),
    }
    let reason = status(port).await["drain"]["reason"].clone();
    assert!(
        reason
            .as_str()
            .is_some_and(|r| r.contains("runs 2 tasks and wants 1")),
        "{reason}"
    );
    // Its clients keep it protected, so ECS cannot stop it yet.
    sim.set_desired(2);
    wait_for(
        "the task to be wanted again",
        Duration::from_secs(30),
        || async { (status(port).await["drain"]["membership"] == "wanted").then_some(()) },
    )
    .await;
    assert_eq!(healthz(port).await, 200);
    // It takes clients again.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/"))
        .await
        .unwrap_or_else(|e| panic!("a wanted task refused a client: {e}"));
    let welcome = futures_util::StreamExt::next(&mut ws).await;
    assert!(matches!(welcome, Some(Ok(_))), "{welcome:?}");
    let m = sim.model();
    let task = m.tasks.iter().find(|t| t.id == id).unwrap();
    assert_eq!(
        task.status,
        Status::Running,
        "{}",
        Simulator::describe_with(&m)
    );
    assert!(!task.stopping);
    drop(m);
    assert_eq!(crowd.connected(), 20);
}

/// Starts two tasks with the ECS API answering `fault`, lowers the desired count to
/// one, and checks that nobody leaves on doubt; then ECS heals and one leaves.
async fn never_leaves_on(fault: ApiFault, expected_line: &str) {
    let sim = Simulator::start(websocket(2, &[])).await;
    let _crowd = crowd(&sim, 10).await;
    all_protected(&sim).await;
    sim.model().fault = fault;
    sim.set_desired(1);
    // Three check intervals and more: no verdict to leave without an answer.
    tokio::time::sleep(Duration::from_secs(12)).await;
    for (_, port) in ports(&sim) {
        assert_eq!(
            healthz(port).await,
            200,
            "left on doubt: {}",
            sim.describe()
        );
    }
    assert_eq!(alive(&sim.model()), 2);
    let lines = sim.lines();
    assert!(
        lines.iter().any(|(_, l)| l.contains(expected_line)),
        "no line with {expected_line:?}"
    );
    sim.model().fault = ApiFault::None;
    sim.wait_for(
        "the service to run one task",
        Duration::from_secs(60),
        |m| alive(m) == 1,
    )
    .await;
}

#[tokio::test]
async fn an_unreachable_ecs_api_keeps_the_last_answer() {
    never_leaves_on(
        ApiFault::Slow(Duration::from_secs(30)),
        "Drain check failed, keeping the last answer (wanted)",
    )
    .await;
}

#[tokio::test]
async fn an_unreadable_ecs_answer_keeps_the_last_answer() {
    never_leaves_on(ApiFault::Malformed, "unreadable answer").await;
}

#[tokio::test]
async fn access_denied_turns_drain_off_and_the_service_works_as_before() {
    let sim = Simulator::start(websocket(1, &[])).await;
    sim.model().fault = ApiFault::Denied;
    // The first check comes within one interval.
    wait_for("the drain to turn off", Duration::from_secs(20), || async {
        sim.lines()
            .iter()
            .any(|(_, l)| l.contains("Drain is off: the task role may not ask ECS"))
            .then_some(())
    })
    .await;
    let crowd = crowd(&sim, 5).await;
    all_protected(&sim).await;
    // One warning, then no call at all.
    let calls = sim.model().tasks[0].api_call_count();
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(sim.model().tasks[0].api_call_count(), calls);
    let warnings = sim
        .lines()
        .iter()
        .filter(|(_, l)| l.contains("Drain is off"))
        .count();
    assert_eq!(warnings, 1);
    assert_eq!(crowd.connected(), 5);
}

#[tokio::test]
async fn a_throttled_watcher_backs_off() {
    let sim = Simulator::start(websocket(1, &[("DRAIN_CHECK_SECONDS", "1")])).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = sim.model().tasks[0]
        .api_calls
        .get("DescribeServices")
        .copied();
    sim.model().fault = ApiFault::Throttled;
    tokio::time::sleep(Duration::from_secs(20)).await;
    let after = sim.model().tasks[0]
        .api_calls
        .get("DescribeServices")
        .copied();
    let asked = after.unwrap_or(0) - before.unwrap_or(0);
    // Twenty seconds at one a second would be twenty; backing off, a handful.
    assert!(asked <= 8, "{asked} checks in 20 s while throttled");
    assert!(
        sim.lines()
            .iter()
            .any(|(_, l)| l.contains("Drain check throttled by ECS")),
    );
}

#[tokio::test]
async fn queue_consumer_deployment_with_a_steady_backlog_loses_and_repeats_nothing() {
    let moto = e2e::moto::Moto::start().await;
    let queue = moto.create_queue("jobs", 30).await;
    let moto_env = moto.env();
    let mut config = SimConfig::queue_consumer(2)
        .env(moto_env.iter().map(|(k, v)| (*k, v.as_str())))
        .env([
            ("COPILOT_QUEUE_URI", queue.as_str()),
            ("WORKER_CONCURRENCY", "4"),
            ("QUEUE_WAIT_SECONDS", "2"),
            ("DRAIN_CHECK_SECONDS", "3"),
            ("RUST_LOG", "info"),
        ])
        .at_test_pace();
    config.ecs.stop_timeout = Duration::from_secs(40);
    let sim = Simulator::start(config).await;
    // Jobs of 800 ms at 20 a second, twice what two tasks of four slots can work:
    // a backlog that grows for as long as they come, and lasts a minute more.
    let client = moto.client();
    let producer = tokio::spawn({
        let client = client.clone();
        let queue = queue.clone();
        async move {
            let mut ids = Vec::new();
            for _ in 0..600 {
                ids.push(e2e::moto::send(&client, &queue, "800").await);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            ids
        }
    });
    wait_for("a backlog", Duration::from_secs(60), || async {
        let (visible, _) = e2e::moto::queue_counts(&client, &queue).await?;
        (visible >= 20).then_some(())
    })
    .await;
    let deployment = sim.deploy();
    let took = sim
        .wait_for(
            "the deployment to complete",
            Duration::from_secs(120),
            |m| completed(m, &deployment, 2),
        )
        .await;
    eprintln!("worker deployment with a backlog took {took:?}");
    let (backlog, _) = e2e::moto::queue_counts(&client, &queue)
        .await
        .expect("the queue's counts");
    assert!(
        backlog > 0,
        "the deployment waited for the backlog to end: {}",
        sim.describe()
    );
    assert!(
        sim.model()
            .tasks
            .iter()
            .filter(|t| t.status != Status::Stopped)
            .all(|t| t.deployment == deployment)
    );
    let ids = producer.await.expect("the producer finishes");
    wait_for("every job to be done", Duration::from_secs(120), || async {
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
        (e2e::moto::queue_counts(&client, &queue).await == Some((0, 0))).then_some(())
    })
    .await;
    let lines = sim.lines();
    for id in &ids {
        let started = lines
            .iter()
            .filter(|(_, l)| l.contains(&format!("{id} - Started")))
            .count();
        let done = lines
            .iter()
            .filter(|(_, l)| l.contains(&format!("{id} - Done")))
            .count();
        assert_eq!((started, done), (1, 1), "message {id}: {}", sim.describe());
    }
    let m = sim.model();
    assert_eq!(
        (m.sigkills, m.crashes),
        (0, 0),
        "{}",
        Simulator::describe_with(&m)
    );
}
