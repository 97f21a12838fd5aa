//! Both binaries against an agent that misbehaves as the real one does: it answers
//! slowly, or applies a release and answers `504 RequestCanceled`. Each check reads
//! ECS's own side from the fake agent (what it applied, and when), never the
//! program's view: a job must not start, nor run, while ECS holds no protection.

use std::time::{Duration, Instant};

use e2e::agent::{Answer, FakeAgent};
use e2e::moto::{Moto, aws_env, send};
use e2e::process::Service;
use e2e::wait_for;
use futures_util::StreamExt;
use tokio_tungstenite::connect_async;

use crate::websocket::Server;

const START: Duration = Duration::from_secs(20);
const STEP: Duration = Duration::from_secs(30);

/// Waits until the agent has seen `n` PUTs; returns when the last one arrived.
async fn wait_puts(agent: &FakeAgent, n: usize) -> Instant {
    wait_for(&format!("{n} protection PUTs"), STEP, || async {
        let puts = agent.puts();
        (puts.len() >= n).then(|| puts[n - 1].at)
    })
    .await
}

/// A worker on moto with its queue, talking to `agent`.
async fn worker(agent: &FakeAgent) -> (Moto, Service, aws_sdk_sqs::Client, String) {
    let moto = Moto::start().await;
    let queue_url = moto.create_queue("jobs", 30).await;
    let mut env = aws_env(&moto.endpoint());
    env.extend([
        ("COPILOT_QUEUE_URI", queue_url.clone()),
        ("ECS_AGENT_URI", agent.uri()),
        ("TASK_PROTECTION_BACKEND", "agent".to_owned()),
        ("RUST_LOG", "info".to_owned()),
    ]);
    let service = Service::spawn("queue-consumer", &[], &env);
    service
        .wait_for_line("Long polling for messages", START)
        .await;
    let client = moto.client();
    (moto, service, client, queue_url)
}

/// Runs a 3 s job sent now, and checks ECS held protection from its start to its end.
async fn job_runs_protected(
    agent: &FakeAgent,
    worker: &Service,
    client: &aws_sdk_sqs::Client,
    queue_url: &str,
) {
    send(client, queue_url, "3000").await;
    worker
        .wait_for_line("Working for 3000 milliseconds", STEP)
        .await;
    let started = Instant::now();
    let done_before = worker.count("- Done");
    worker.wait_for_count("- Done", done_before + 1, STEP).await;
    let done = Instant::now();
    assert!(
        agent.ecs_protected_throughout(started, done),
        "the job ran unprotected: started {:?} ago, ECS changes {:?} (times relative to now)",
        started.elapsed(),
        agent
            .ecs_changes()
            .iter()
            .map(|(t, until)| (t.elapsed(), until.is_some()))
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn worker_never_starts_a_job_while_a_slow_release_is_on_the_wire() {
    let agent = FakeAgent::start().await;
    agent.latency(Duration::from_secs(2));
    let (_moto, mut worker, client, queue_url) = worker(&agent).await;
    send(&client, &queue_url, "300").await;
    worker.wait_for_line("- Done", STEP).await;
    // The release reaches ECS at the maintain mark, and its answer takes 2 s.
    wait_puts(&agent, 2).await;
    assert!(!agent.puts()[1].enabled(), "{:?}", agent.puts());
    job_runs_protected(&agent, &worker, &client, &queue_url).await;
    worker.terminate();
    assert!(worker.wait_exit(STEP).await.success());
}

#[tokio::test]
async fn worker_never_starts_a_job_after_a_release_answered_504() {
    let agent = FakeAgent::start().await;
    agent.script([Answer::Ok, Answer::AppliedThen504]);
    let (_moto, mut worker, client, queue_url) = worker(&agent).await;
    send(&client, &queue_url, "300").await;
    worker.wait_for_line("- Done", STEP).await;
    wait_puts(&agent, 2).await;
    job_runs_protected(&agent, &worker, &client, &queue_url).await;
    worker.terminate();
    assert!(worker.wait_exit(STEP).await.success());
}

#[tokio::test]
async fn websocket_re_enables_at_once_for_a_client_after_a_release_answered_504() {
    let agent = FakeAgent::start().await;
    let server = Server::start(&agent, &[]).await;
    agent.script([Answer::Ok, Answer::AppliedThen504]);
    let url = format!("ws://127.0.0.1:{}/", server.port);
    let (mut first, _) = connect_async(&url).await.unwrap();
    let _welcome = first.next().await;
    wait_puts(&agent, 1).await;
    drop(first);
    // The release goes after the quiet second; ECS applies it and the agent says 504.
    wait_puts(&agent, 2).await;
    assert!(!agent.ecs_protected_at(Instant::now()));
    let arrived = Instant::now();
    let (mut second, _) = connect_async(&url).await.unwrap();
    let _welcome = second.next().await;
    let protected_at = wait_for("ECS protection for the new client", STEP, || async {
        agent.ecs_protected_at(Instant::now()).then(Instant::now)
    })
    .await;
    // The enable waits until the disable, whose answer was lost, can no longer land
    // after it: 5 s after the disable left.
    let waited = protected_at - arrived;
    let after_disable = protected_at - agent.puts()[1].at;
    assert!(
        after_disable <= Duration::from_millis(6_500) && waited <= Duration::from_millis(6_500),
        "ECS protected the new client only {waited:?} after it arrived: {:?}",
        agent.puts()
    );
    drop(second);
}

#[tokio::test]
async fn the_agent_is_reached_directly_whatever_the_proxy_variables_say() {
    let agent = FakeAgent::start().await;
    // A proxy that refuses every connection: anything sent through it fails.
    let dead = format!("http://127.0.0.1:{}", e2e::free_port());
    let proxies = [
        ("HTTP_PROXY", dead.clone()),
        ("HTTPS_PROXY", dead.clone()),
        ("http_proxy", dead.clone()),
        ("https_proxy", dead.clone()),
        ("ALL_PROXY", dead),
    ];
    let server = Server::start(&agent, &proxies).await;
    let (mut ws, _) = connect_async(format!("ws://127.0.0.1:{}/", server.port))
        .await
        .unwrap();
    let _welcome = ws.next().await;
    wait_for("protection through the agent", STEP, || async {
        agent.ecs_protected_at(Instant::now()).then_some(())
    })
    .await;
}
