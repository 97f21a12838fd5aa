//! A task leaving its service: it honours the holders it has, refuses new ones, and
//! lets go of protection as soon as the last holder has gone, judged by what ECS holds.

mod support;

use std::time::Duration;

use support::{FakeEcs, settle, worker_settings};
use task_protection::{AcquireError, TaskProtection};
use tokio::time::{Instant, advance};

#[tokio::test(start_paused = true)]
async fn a_draining_task_keeps_its_holders_refuses_new_ones_and_lets_go_at_once() {
    let ecs = FakeEcs::new();
    let p = TaskProtection::start(ecs.clone(), worker_settings());
    let job = p.acquire().await.unwrap();
    // Two seconds into the job: well inside the 6 s maintain window.
    advance(Duration::from_secs(2)).await;
    p.drain();
    settle().await;
    assert!(p.is_draining());
    assert!(p.try_hold().is_none(), "a new holder while draining");
    assert_eq!(p.acquire().await.err(), Some(AcquireError::Draining));
    // The holder it has keeps its protection.
    advance(Duration::from_secs(10)).await;
    settle().await;
    assert!(ecs.protected_at(Instant::now()), "{:?}", ecs.calls());
    assert!(p.current().protected);
    assert_eq!(ecs.disables(), 0);
    // The last holder goes: released at once, without the maintain window or the
    // quiet second.
    drop(job);
    settle().await;
    advance(Duration::from_millis(1)).await;
    settle().await;
    assert_eq!(ecs.disables(), 1, "{:?}", ecs.calls());
    assert!(!ecs.protected_at(Instant::now()));
}

#[tokio::test(start_paused = true)]
async fn a_task_wanted_again_takes_holders_and_keeps_the_maintain_window() {
    let ecs = FakeEcs::new();
    let p = TaskProtection::start(ecs.clone(), worker_settings());
    p.drain();
    assert!(p.try_hold().is_none());
    p.undrain();
    assert!(!p.is_draining());
    let job = p.try_hold().expect("taking holders again");
    settle().await;
    assert!(ecs.protected_at(Instant::now()));
    drop(job);
    // Not draining: the 6 s maintain window holds.
    advance(Duration::from_secs(5)).await;
    settle().await;
    assert_eq!(ecs.disables(), 0, "{:?}", ecs.calls());
    advance(Duration::from_millis(1_100)).await;
    settle().await;
    assert_eq!(ecs.disables(), 1, "{:?}", ecs.calls());
}

#[tokio::test(start_paused = true)]
async fn hold_still_registers_while_draining_for_work_already_taken_on() {
    let ecs = FakeEcs::new();
    let p = TaskProtection::start(ecs.clone(), worker_settings());
    p.drain();
    let taken = p.hold();
    settle().await;
    assert_eq!(p.holders(), 1);
    assert!(ecs.protected_at(Instant::now()), "{:?}", ecs.calls());
    drop(taken);
    settle().await;
    advance(Duration::from_millis(1_001)).await;
    settle().await;
    assert!(!ecs.protected_at(Instant::now()), "{:?}", ecs.calls());
}

#[tokio::test(start_paused = true)]
async fn try_hold_after_shutdown_is_refused() {
    let p = TaskProtection::start(FakeEcs::new(), worker_settings());
    p.shutdown().await;
    assert!(p.try_hold().is_none());
}
