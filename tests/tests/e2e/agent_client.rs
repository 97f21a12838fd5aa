//! The library's agent client against the agent's connection handling: its server
//! closes a keep-alive connection after 5 s idle, and a request sent on a connection
//! it is closing fails after it was sent, which the state machine must count as
//! "ECS may have applied it" (a failure, and 5 s more before a request of the other
//! kind). The client retires idle connections before the agent closes them, and
//! sends a request that met a close once more on a new connection.

use std::time::{Duration, Instant};

use e2e::agent::{FakeAgent, IdleClose};
use task_protection::{AgentBackend, ProtectionSettings, TaskProtection};

const STEP: Duration = Duration::from_secs(30);

/// One minute, maintain 10 %: a release 6 s after the enable.
fn settings() -> ProtectionSettings {
    ProtectionSettings::builder()
        .duration_minutes(1)
        .maintain_percent(10)
        .build()
        .unwrap()
}

async fn released(agent: &FakeAgent) -> Instant {
    e2e::wait_for("the release", STEP, || async {
        agent.puts().iter().find(|p| !p.enabled()).map(|p| p.at)
    })
    .await
}

/// The agent closes the connection of the enable 5 s after answering it, and the
/// client sees the close only when it sends on it again: the release, 6 s later,
/// must go out on a new connection, at once and without a failure.
#[tokio::test]
async fn a_release_six_seconds_after_the_last_request_meets_no_closed_connection() {
    let agent = FakeAgent::start().await;
    agent.idle_close(Duration::from_secs(5), IdleClose::Unseen);
    let protection = TaskProtection::start(AgentBackend::new(&agent.uri()).unwrap(), settings());
    let job = protection.acquire().await.unwrap();
    let enabled_at = agent.puts()[0].at;
    drop(job);
    let release_at = released(&agent).await;
    let counters = protection.counters();
    assert_eq!(
        (counters.failures, counters.retries),
        (0, 0),
        "{counters:?}, {:?}",
        protection.current()
    );
    // Released at the maintain mark (6 s after the enable, and the 1 s quiet time
    // after the job), not 5 s later after a failure.
    let after = release_at - enabled_at;
    assert!(
        after >= Duration::from_secs(6) && after < Duration::from_millis(8_500),
        "released {after:?} after the enable"
    );
    assert!(agent.released());
    assert_eq!(agent.connections(), 2, "a new connection for the release");
    assert_eq!(
        agent.requests_met_close(),
        0,
        "the client retired the idle one"
    );
    assert!(!agent.ecs_protected_at(Instant::now()));
}

/// An agent that closes idle connections sooner than the client retires them (the
/// endpoint of Fargate is another implementation, whose timeout is not published):
/// the request that meets the close is sent once more on a new connection, and
/// nothing counts as failed.
#[tokio::test]
async fn a_request_that_meets_a_close_is_sent_once_more_on_a_new_connection() {
    let agent = FakeAgent::start().await;
    agent.idle_close(Duration::from_secs(1), IdleClose::Unseen);
    let settings = ProtectionSettings::builder()
        .duration_minutes(1)
        .maintain_percent(0)
        .build()
        .unwrap();
    let protection = TaskProtection::start(AgentBackend::new(&agent.uri()).unwrap(), settings);
    let job = protection.acquire().await.unwrap();
    // The release goes after the 1 s quiet time and the 1 s spacing: the enable's
    // connection has been closed by then.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    drop(job);
    released(&agent).await;
    e2e::wait_for("ECS released", STEP, || async {
        (!protection.current().protected && !agent.ecs_protected_at(Instant::now())).then_some(())
    })
    .await;
    let counters = protection.counters();
    assert_eq!(
        (counters.failures, counters.retries),
        (0, 0),
        "{counters:?}"
    );
    assert_eq!(agent.puts().len(), 2, "{:?}", agent.puts());
    assert_eq!(agent.requests_met_close(), 1);
    assert_eq!(agent.connections(), 2, "one new connection for the release");
}
