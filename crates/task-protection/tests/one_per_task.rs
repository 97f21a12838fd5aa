//! Protection is per task: two state machines for one task release each other's
//! protection. In one process, a second `TaskProtection` for the same task shares the
//! first one's; across the containers of a task, one owns protection and the others
//! hold through its `HoldEndpoint`.

mod support;

use std::time::Duration;

use support::{FakeEcs, settle, websocket_settings, worker_settings};
use task_protection::layer::HoldEndpoint;
use task_protection::{Backend, Grant, ProtectionError, ProtectionRequest, TaskProtection};
use tokio::time::{Instant, advance};

/// The scripted agent, as the agent backend of this process's task.
#[derive(Clone)]
struct SameTask(FakeEcs);

impl Backend for SameTask {
    async fn update(&self, request: ProtectionRequest) -> Result<Grant, ProtectionError> {
        self.0.update(request).await
    }

    fn landing_window(&self, request_timeout: Duration) -> Duration {
        self.0.landing_window(request_timeout)
    }

    fn identity(&self) -> Option<String> {
        Some("agent http://169.254.170.2/api/x/task-protection/v1/state".to_owned())
    }

    fn describe(&self) -> String {
        "the task's agent (scripted)".to_owned()
    }
}

/// The worker loop holds a job; an HTTP layer started its own `TaskProtection` from
/// the same environment and has nothing in flight. With two state machines, the
/// idle one would release the task under the job.
#[tokio::test(start_paused = true)]
async fn two_instances_for_one_task_in_one_process_share_one_state_machine() {
    let ecs = FakeEcs::new();
    let worker = TaskProtection::start(SameTask(ecs.clone()), worker_settings());
    let job = worker.acquire().await.unwrap();
    // Other settings: the running ones stay, with a warning.
    let http = TaskProtection::start(SameTask(ecs.clone()), websocket_settings());
    assert_eq!(http.settings(), worker.settings());
    assert_eq!(http.holders(), 1, "the job is held in both");
    let request = http.hold();
    assert_eq!(worker.holders(), 2);
    drop(request);
    // Long past the maintain window of an idle start and of the request.
    for _ in 0..30 {
        advance(Duration::from_secs(1)).await;
        settle().await;
    }
    assert!(ecs.protected_at(Instant::now()), "{:?}", ecs.calls());
    assert_eq!(ecs.disables(), 0, "{:?}", ecs.calls());
    drop(job);
    for _ in 0..8 {
        advance(Duration::from_secs(1)).await;
        settle().await;
    }
    assert!(!ecs.protected_at(Instant::now()), "{:?}", ecs.calls());
    // One shutdown stops it for both.
    http.shutdown().await;
    assert!(worker.try_hold().is_none());
    // A new one after it has stopped is a state machine of its own.
    let again = TaskProtection::start(SameTask(ecs.clone()), worker_settings());
    assert!(again.try_hold().is_some());
}

/// Backends that know no task (the default) share nothing: each is its own.
#[tokio::test(start_paused = true)]
async fn backends_without_an_identity_are_not_shared() {
    let a = TaskProtection::start(FakeEcs::new(), worker_settings());
    let b = TaskProtection::start(FakeEcs::new(), worker_settings());
    let _held = a.hold();
    assert_eq!((a.holders(), b.holders()), (1, 0));
}

/// A holder in this container and one in another, through the hold endpoint:
/// protection lasts while either holds, and goes when both have let go.
#[tokio::test]
async fn a_holder_here_and_one_in_another_container_keep_the_task_protected() {
    let ecs = FakeEcs::new();
    let settings = task_protection::ProtectionSettings::builder()
        .duration_minutes(1)
        .maintain_percent(0)
        .min_put_interval(Duration::from_millis(200))
        .build()
        .unwrap();
    let owner = TaskProtection::start(ecs.clone(), settings);
    let local: axum::Router =
        axum::Router::new().route_service("/protection/hold", HoldEndpoint::new(owner.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/protection/hold", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, local).await.unwrap() });

    let job = owner.acquire().await.unwrap();
    // The other container starts work: it opens the hold and keeps it.
    let mut held = reqwest::get(&url).await.unwrap();
    assert_eq!(held.status(), 200);
    assert_eq!(next_chunk(&mut held).await.as_deref(), Some(&b"held\n"[..]));
    assert_eq!(owner.holders(), 2);
    // This container's job ends; the other's goes on.
    drop(job);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(owner.holders(), 1);
    assert!(ecs.protected_at(Instant::now()), "{:?}", ecs.calls());
    assert_eq!(ecs.disables(), 0, "{:?}", ecs.calls());
    // Its connection stays open with a heartbeat.
    assert_eq!(next_chunk(&mut held).await.as_deref(), Some(&b"\n"[..]));
    // The other container's work ends: it closes the hold, and the task is released.
    drop(held);
    let released = tokio::time::timeout(Duration::from_secs(30), async {
        while owner.holders() > 0 || ecs.protected_at(Instant::now()) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        released.is_ok(),
        "{} holders, {:?}",
        owner.holders(),
        ecs.calls()
    );
    // A task leaving its service turns the other container's work away.
    owner.drain();
    let refused = reqwest::get(&url).await.unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.text().await.unwrap(), "draining\n");
    assert_eq!(owner.holders(), 0);
}

/// The next chunk of a response, within a generous bound.
async fn next_chunk(response: &mut reqwest::Response) -> Option<axum::body::Bytes> {
    tokio::time::timeout(Duration::from_secs(30), response.chunk())
        .await
        .expect("the hold endpoint writes within its heartbeat")
        .unwrap()
}
