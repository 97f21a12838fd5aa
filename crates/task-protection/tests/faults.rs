//! The promise under agent faults: a holder is never told "protected" while ECS may
//! not be, and an idle task never stays protected. Every check reads ECS's own state
//! from the in-process ECS, which keeps what it applied apart from what it answered.

mod support;

use std::time::Duration;

use support::{FakeEcs, Reply, settle, websocket_settings, worker_settings};
use task_protection::{AcquireError, Phase, ProtectionEvent, ProtectionSettings, TaskProtection};
use tokio::time::{Instant, advance};

/// Protected, then released at the maintain mark (6 s), with the disable answered by `reply`.
async fn release_answered_with(reply: Reply) -> (FakeEcs, TaskProtection, Instant) {
    let ecs = FakeEcs::new();
    let p = TaskProtection::start(ecs.clone(), worker_settings());
    let t0 = Instant::now();
    drop(p.acquire().await.unwrap());
    settle().await;
    ecs.script([reply]);
    // Timers fire on the next millisecond tick.
    advance(Duration::from_millis(6_010)).await;
    settle().await;
    assert_eq!(ecs.disables(), 1, "{:?}", ecs.calls());
    (ecs, p, t0)
}

#[tokio::test(start_paused = true)]
async fn a_release_applied_but_answered_504_leaves_the_task_maybe_unprotected() {
    let (ecs, p, _) = release_answered_with(Reply::AppliedThen504).await;
    assert!(
        !ecs.ecs_protected(Instant::now()),
        "ECS applied the release"
    );
    assert!(
        !p.current().protected,
        "must not claim protection after a 504 release"
    );
    // A job arriving now must not start until ECS protects the task again.
    let arrived = Instant::now();
    let guard = p.acquire().await.unwrap();
    assert!(
        ecs.ecs_protected(Instant::now()),
        "acquire returned unprotected"
    );
    assert!(
        arrived.elapsed() <= Duration::from_millis(1_100),
        "the enable waited {:?}, more than the 1 s spacing",
        arrived.elapsed()
    );
    assert_eq!(ecs.enables(), 2, "{:?}", ecs.calls());
    drop(guard);
}

#[tokio::test(start_paused = true)]
async fn a_release_that_timed_out_leaves_the_task_maybe_unprotected() {
    let (ecs, p, _) = release_answered_with(Reply::Hang).await;
    assert!(
        !p.current().protected,
        "a disable in flight is not protection"
    );
    advance(p.settings().request_timeout()).await;
    settle().await;
    assert!(!p.current().protected);
    let guard = p.acquire().await.unwrap();
    assert!(
        ecs.ecs_protected(Instant::now()),
        "acquire returned unprotected"
    );
    drop(guard);
}

#[tokio::test(start_paused = true)]
async fn acquire_during_an_in_flight_release_waits_for_a_later_enable() {
    let ecs = FakeEcs::new();
    let p = TaskProtection::start(ecs.clone(), worker_settings());
    drop(p.acquire().await.unwrap());
    settle().await;
    ecs.latency(Duration::from_secs(2));
    // The disable goes out at 6 s and is answered at 8 s.
    advance(Duration::from_millis(6_500)).await;
    settle().await;
    assert_eq!(ecs.disables(), 1);
    assert!(!p.current().protected, "a disable is on the wire");
    let guard = p.acquire().await.unwrap();
    let calls = ecs.calls();
    let last = calls.last().unwrap();
    assert!(last.request.enabled, "{calls:?}");
    assert!(
        ecs.ecs_protected(Instant::now()),
        "acquire returned unprotected"
    );
    drop(guard);
}

#[tokio::test(start_paused = true)]
async fn a_throttled_release_keeps_the_confirmed_protection() {
    let (ecs, p, _) = release_answered_with(Reply::Throttled).await;
    // ECS refused before acting: still protected, as confirmed.
    assert!(ecs.ecs_protected(Instant::now()));
    assert!(p.current().protected);
    assert_eq!(p.current().phase, Phase::Releasing);
    // And the release is retried.
    advance(Duration::from_secs(11)).await;
    settle().await;
    assert!(!ecs.ecs_protected(Instant::now()), "{:?}", ecs.calls());
    assert_eq!(p.current().phase, Phase::Idle);
}

#[tokio::test(start_paused = true)]
async fn after_a_rejection_with_nobody_holding_the_cool_down_ends() {
    let ecs = FakeEcs::new();
    let p = TaskProtection::start(ecs.clone(), worker_settings());
    ecs.script([Reply::Failure("DEPLOYMENT_BLOCKED")]);
    assert!(matches!(p.acquire().await, Err(AcquireError::Rejected(_))));
    settle().await;
    assert_eq!(p.current().phase, Phase::Rejected);
    // During the cool-down a new acquire fails at once, without a call.
    assert!(matches!(p.acquire().await, Err(AcquireError::Rejected(_))));
    assert_eq!(ecs.enables(), 1);
    advance(Duration::from_secs(11)).await;
    settle().await;
    assert_eq!(p.current().phase, Phase::Idle, "the cool-down is over");
    let guard = p.acquire().await.unwrap();
    assert_eq!(
        ecs.enables(),
        2,
        "ECS must be asked again after the cool-down"
    );
    assert!(ecs.ecs_protected(Instant::now()));
    drop(guard);
}

#[tokio::test(start_paused = true)]
async fn a_refused_refresh_does_not_delay_the_release() {
    let ecs = FakeEcs::new();
    let p = TaskProtection::start(ecs.clone(), worker_settings());
    let t0 = Instant::now();
    let guard = p.acquire().await.unwrap();
    ecs.script([Reply::Failure("DEPLOYMENT_BLOCKED")]);
    // The refresh at 48 s is refused; the holder leaves at 49 s.
    advance(Duration::from_secs(49)).await;
    settle().await;
    assert_eq!(ecs.lock().calls.len(), 2);
    drop(guard);
    settle().await;
    // The release comes after the quiet second, not after the 10 s cool-down.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let calls = ecs.calls();
    assert_eq!(ecs.disables(), 1, "{calls:?}");
    let at = calls.last().unwrap().at - t0;
    assert!(at <= Duration::from_millis(50_010), "released at {at:?}");
    assert!(!ecs.ecs_protected(Instant::now()));
}

#[tokio::test(start_paused = true)]
async fn a_protection_that_runs_out_before_a_release_could_go_is_left_to_lapse() {
    // Maintain the whole minute: the release would come when the protection refused
    // a refresh at 48 s runs out anyway, so no call is worth making.
    let settings = ProtectionSettings::builder()
        .duration_minutes(1)
        .maintain_percent(100)
        .refresh_percent(80)
        .check_interval(Duration::from_secs(10))
        .build()
        .unwrap();
    let ecs = FakeEcs::new();
    let p = TaskProtection::start(ecs.clone(), settings);
    let guard = p.acquire().await.unwrap();
    ecs.script([Reply::Failure("DEPLOYMENT_BLOCKED")]);
    advance(Duration::from_secs(49)).await;
    settle().await;
    drop(guard);
    // The maintain window (60 s) reaches the expiry: no release call, it lapses.
    advance(Duration::from_secs(30)).await;
    settle().await;
    assert_eq!(ecs.disables(), 0, "{:?}", ecs.calls());
    assert!(!ecs.ecs_protected(Instant::now()));
    assert!(!p.current().protected);
    assert_eq!(p.current().phase, Phase::Idle);
}

#[tokio::test(start_paused = true)]
async fn a_refresh_hanging_past_the_confirmed_expiry_is_not_protection() {
    let settings = ProtectionSettings::builder()
        .duration_minutes(1)
        .maintain_percent(10)
        .refresh_percent(95)
        .check_interval(Duration::from_secs(10))
        .build()
        .unwrap();
    let ecs = FakeEcs::new();
    let p = TaskProtection::start(ecs.clone(), settings);
    let mut events = p.events();
    let guard = p.acquire().await.unwrap();
    assert!(matches!(
        events.recv().await,
        Some(ProtectionEvent::Protected { .. })
    ));
    ecs.always(Reply::HangUnapplied);
    // The refresh goes at 57 s and hangs until 65 s; ECS's protection ends at 60 s.
    advance(Duration::from_millis(57_500)).await;
    settle().await;
    assert_eq!(ecs.calls().len(), 2, "the refresh is on the wire");
    assert!(p.current().protected);
    advance(Duration::from_millis(2_501)).await;
    settle().await;
    assert!(!ecs.ecs_protected(Instant::now()));
    let state = p.current();
    assert!(!state.protected, "still claims protection after expiry");
    assert_eq!(state.phase, Phase::Acquiring);
    assert_eq!(
        events.recv().await,
        Some(ProtectionEvent::Unprotected { lapsed: true })
    );
    // A new job waits rather than starting unprotected.
    let p2 = p.clone();
    let waiting = tokio::spawn(async move { p2.acquire().await });
    advance(Duration::from_secs(1)).await;
    settle().await;
    assert!(!waiting.is_finished(), "acquire returned while unprotected");
    ecs.always(Reply::Ok);
    let second = waiting.await.unwrap().unwrap();
    assert!(ecs.ecs_protected(Instant::now()));
    drop((guard, second));
}

#[tokio::test(start_paused = true)]
async fn shutdown_keeps_the_one_second_spacing() {
    let ecs = FakeEcs::new();
    let p = TaskProtection::start(ecs.clone(), websocket_settings());
    let _guard = p.acquire().await.unwrap();
    advance(Duration::from_millis(200)).await;
    p.shutdown().await;
    let calls = ecs.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    let gap = calls[1].at - calls[0].at;
    assert!(
        gap >= Duration::from_secs(1),
        "disable {gap:?} after the enable"
    );
    assert!(!ecs.ecs_protected(Instant::now()));
}

#[tokio::test(start_paused = true)]
async fn shutdown_returns_within_its_budget_when_the_agent_hangs() {
    let ecs = FakeEcs::new();
    let p = TaskProtection::start(ecs.clone(), websocket_settings());
    let _guard = p.acquire().await.unwrap();
    ecs.always(Reply::HangUnapplied);
    advance(Duration::from_secs(5)).await;
    let t = Instant::now();
    let report = p.shutdown().await;
    assert!(
        t.elapsed() <= Duration::from_millis(3_500),
        "{:?}",
        t.elapsed()
    );
    assert!(
        matches!(report, task_protection::ShutdownReport::Failed(_)),
        "{report:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_shutdown_release_answered_504_is_reported_as_failed() {
    let ecs = FakeEcs::new();
    let p = TaskProtection::start(ecs.clone(), websocket_settings());
    let _guard = p.acquire().await.unwrap();
    ecs.always(Reply::AppliedThen504);
    advance(Duration::from_secs(5)).await;
    let report = p.shutdown().await;
    assert!(
        matches!(report, task_protection::ShutdownReport::Failed(_)),
        "{report:?}"
    );
    assert!(!p.current().protected);
}

#[tokio::test(start_paused = true)]
async fn an_enable_refused_at_the_connection_is_not_in_doubt() {
    // Nothing was sent, so nothing can have been applied: no disable follows.
    let ecs = FakeEcs::new();
    let p = TaskProtection::start(ecs.clone(), worker_settings());
    ecs.script([Reply::Refused]);
    let guard = p.hold();
    settle().await;
    drop(guard);
    advance(Duration::from_secs(30)).await;
    settle().await;
    assert_eq!(ecs.disables(), 0, "{:?}", ecs.calls());
    assert_eq!(p.current().phase, Phase::Idle);
}

/// The release edge under real threads: a holder that `acquire()` told "protected"
/// never sees a disable reach ECS while it holds.
#[test]
fn no_disable_reaches_ecs_while_an_acquired_guard_is_held() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        let settings = ProtectionSettings::builder()
            .duration_minutes(1)
            .maintain_percent(0)
            .min_put_interval(Duration::ZERO)
            .build()
            .unwrap();
        let ecs = FakeEcs::new();
        let p = TaskProtection::start(ecs.clone(), settings);
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let mut rounds = 0;
        while std::time::Instant::now() < deadline {
            let guard = p.acquire().await.unwrap();
            let disables = ecs.disables();
            for _ in 0..(rounds % 7) {
                tokio::task::yield_now().await;
            }
            assert_eq!(
                ecs.disables(),
                disables,
                "a disable went out while a guard was held (round {rounds})"
            );
            assert!(ecs.ecs_protected(Instant::now()));
            drop(guard);
            for _ in 0..(rounds % 5) {
                tokio::task::yield_now().await;
            }
            rounds += 1;
        }
        assert!(
            ecs.disables() > 10,
            "the edge was not exercised: {rounds} rounds"
        );
    });
}

#[tokio::test(start_paused = true)]
async fn no_put_leaves_while_the_agent_may_still_work_on_an_abandoned_one() {
    // The client gives up after 1 s, but the agent's own ECS call lasts up to 4 s: a
    // later PUT must not overtake it.
    let settings = worker_settings()
        .to_builder()
        .request_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let ecs = FakeEcs::new();
    let p = TaskProtection::start(ecs.clone(), settings);
    let t0 = Instant::now();
    ecs.script([Reply::HangUnapplied]);
    let guard = p.hold();
    let _ = tokio::time::timeout(Duration::from_secs(30), p.acquire()).await;
    let calls = ecs.calls();
    assert!(calls.len() >= 2, "{calls:?}");
    let gap = calls[1].at - calls[0].at;
    assert!(
        gap >= Duration::from_secs(5),
        "retried {gap:?} after an abandoned call"
    );
    assert!(calls[0].at - t0 < Duration::from_millis(10));
    drop(guard);
}

#[tokio::test(start_paused = true)]
async fn acquire_fails_once_shutdown_has_started() {
    let ecs = FakeEcs::new();
    ecs.latency(Duration::from_millis(400));
    let p = TaskProtection::start(ecs.clone(), websocket_settings());
    let _held = p.acquire().await.unwrap();
    // The disable waits for the 1 s spacing; meanwhile nobody may be told "protected".
    let p2 = p.clone();
    let shutting = tokio::spawn(async move { p2.shutdown().await });
    settle().await;
    assert!(!p.current().protected);
    assert!(matches!(p.acquire().await, Err(AcquireError::ShutDown)));
    shutting.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn shutdown_tries_again_after_a_quick_failure() {
    let ecs = FakeEcs::new();
    let p = TaskProtection::start(ecs.clone(), websocket_settings());
    let _held = p.acquire().await.unwrap();
    advance(Duration::from_secs(5)).await;
    ecs.script([Reply::Throttled, Reply::Refused]);
    let report = p.shutdown().await;
    assert_eq!(
        report,
        task_protection::ShutdownReport::Released,
        "{:?}",
        ecs.calls()
    );
    assert!(!ecs.ecs_protected(Instant::now()));
    let calls = ecs.calls();
    for pair in calls.windows(2) {
        assert!(
            pair[1].at - pair[0].at >= Duration::from_secs(1),
            "{calls:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_refresh_late_in_the_duration_still_comes_before_the_expiry() {
    // Refresh at 100 %: taken literally it would always lapse first.
    let settings = worker_settings()
        .to_builder()
        .refresh_percent(100)
        .build()
        .unwrap();
    let ecs = FakeEcs::new();
    let p = TaskProtection::start(ecs.clone(), settings);
    let mut events = p.events();
    let _held = p.acquire().await.unwrap();
    for _ in 0..(180 * 4) {
        advance(Duration::from_millis(250)).await;
        settle().await;
        assert!(p.current().protected);
    }
    assert_eq!(ecs.lock().lapses, 0);
    while let Ok(Some(e)) = tokio::time::timeout(Duration::ZERO, events.recv()).await {
        assert!(!matches!(e, ProtectionEvent::Unprotected { .. }), "{e:?}");
    }
}
