//! The `queue-consumer` binary when its surroundings are not what it expects: a task
//! outside any service, a topic queue that does not exist, a health check run
//! without its port. Each answer names what is wrong.

use std::time::Duration;

use aws_sdk_sqs::Client;
use e2e::agent::{Answer, FakeAgent};
use e2e::moto::{Moto, aws_env, queue_counts, send_all};
use e2e::process::{Service, run_to_exit};
use e2e::wait_for;

const BIN: &str = "queue-consumer";
const STEP: Duration = Duration::from_secs(20);

fn env(moto: &Moto, agent: &FakeAgent, queue: &str) -> Vec<(&'static str, String)> {
    let mut env = aws_env(&moto.endpoint());
    env.extend([
        ("COPILOT_QUEUE_URI", queue.to_owned()),
        ("ECS_AGENT_URI", agent.uri()),
        ("TASK_PROTECTION_BACKEND", "agent".to_owned()),
        ("QUEUE_WAIT_SECONDS", "1".to_owned()),
        ("RUST_LOG", "info".to_owned()),
    ]);
    env
}

async fn wait_empty(client: &Client, queue: &str) {
    wait_for("the queue to be emptied", STEP, || async {
        (queue_counts(client, queue).await == Some((0, 0))).then_some(())
    })
    .await;
}

#[tokio::test]
async fn queue_consumer_standalone_task_works_unprotected_with_one_warning() {
    // ECS refuses protection to a task that is not part of a service (RunTask):
    // nothing scales such a task in, so the worker works without it.
    let moto = Moto::start().await;
    let agent = FakeAgent::start().await;
    agent.always(Answer::Failure("TASK_NOT_VALID"));
    let client = moto.client();
    let queue = moto.create_queue("jobs", 30).await;
    send_all(&client, &queue, None, &vec!["50".to_owned(); 5]).await;
    let mut worker = Service::spawn(BIN, &[], &env(&moto, &agent, &queue));
    worker.wait_for_count(" - Done", 5, STEP).await;
    wait_empty(&client, &queue).await;
    assert_eq!(
        worker.count("working without protection"),
        1,
        "{:#?}",
        worker.lines()
    );
    assert_eq!(worker.count(" - Handed back"), 0, "{:#?}", worker.lines());
    // No protection request per message: the release at start and one enable.
    let puts = agent.puts().len();
    assert!(puts <= 2, "{puts} protection requests");
    assert!(worker.try_wait().is_none(), "the worker exited");
    worker.terminate();
    assert!(worker.wait_exit(STEP).await.success());
}

#[tokio::test]
async fn queue_consumer_a_missing_topic_queue_is_named_with_its_variable() {
    let moto = Moto::start().await;
    let agent = FakeAgent::start().await;
    let queue = moto.create_queue("jobs", 30).await;
    let missing = format!("{}/123456789012/no-such-orders", moto.endpoint());
    let mut env = env(&moto, &agent, &queue);
    env.push((
        "COPILOT_TOPIC_QUEUE_URIS",
        format!(r#"{{"orders": "{missing}"}}"#),
    ));
    let mut worker = Service::spawn(BIN, &[], &env);
    let status = worker.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(1), "{:#?}", worker.lines());
    let errors: Vec<String> = worker
        .lines()
        .into_iter()
        .filter(|l| l.starts_with("queue-consumer: error: "))
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    let error = &errors[0];
    assert!(error.contains(&missing), "{error}");
    assert!(error.contains("COPILOT_TOPIC_QUEUE_URIS"), "{error}");
    assert!(error.contains("orders"), "{error}");
    assert!(!error.contains(&queue), "names the good queue: {error}");
    assert!(!error.contains("COPILOT_QUEUE_URI,"), "{error}");
    // The retries before it name the queue too.
    let retries: Vec<String> = worker
        .lines()
        .into_iter()
        .filter(|l| l.contains("Receiving messages failed"))
        .collect();
    assert!(!retries.is_empty(), "{:#?}", worker.lines());
    assert!(retries.iter().all(|l| l.contains(&missing)), "{retries:#?}");
}

#[tokio::test]
async fn queue_consumer_healthcheck_exits_0_or_1_only() {
    // Docker reserves exit code 2; a health check exits 0 (healthy) or 1.
    for (env, says) in [
        (vec![], "is not set"),
        (vec![("HEALTH_PORT", "abc".to_owned())], "abc"),
        (vec![("HEALTH_PORT", "0".to_owned())], "HEALTH_PORT=0"),
        (
            vec![("HEALTH_PORT", "70000".to_owned())],
            "HEALTH_PORT=70000",
        ),
    ] {
        let (status, stdout, stderr) = run_to_exit(BIN, &["healthcheck"], &env).await;
        assert_eq!(status.code(), Some(1), "{env:?}: {stdout} {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{env:?}: {stderr}");
        assert!(
            stderr.contains("HEALTH_PORT") && stderr.contains(says),
            "{env:?}: {stderr}"
        );
    }
    let (status, stdout, _) = run_to_exit(BIN, &["healthcheck", "--help"], &[]).await;
    assert!(status.success());
    assert!(stdout.contains("HEALTH_PORT"), "{stdout}");
}
