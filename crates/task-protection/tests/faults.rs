//! The promise under agent faults: a holder is never told "protected" while ECS may
//! not be, and an idle task never stays protected. Every check reads ECS's own state
//! from the in-process ECS, which keeps what it applied apart from what it answered.

mod support;

use std::time::Duration;

use support::{FakeEcs, Landing, Reply, settle, websocket_settings, worker_settings};
use task_protection::{
    AcquireError, Phase, ProtectionEvent, ProtectionSettings, ShutdownReport, TaskProtection,
};
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
    assert!(!ecs.protected_at(Instant::now()), "ECS applied the release");
    assert!(
        !p.current().protected,
        "must not claim protection after a 504 release"
    );
    // A job arriving now must not start until ECS protects the task again, and the
    // enable waits until the disable can no longer land after it: 5 s after it left.
    let arrived = Instant::now();
    let guard = p.acquire().await.unwrap();
    assert!(
        ecs.protected_at(Instant::now()),
        "acquire returned unprotected"
    );
    let disable_at = ecs.calls()[1].at;
    let enable_at = ecs.calls()[2].at;
    assert_eq!(
        enable_at - disable_at,
        Duration::from_secs(5),
        "{:?}",
        ecs.calls()
    );
    assert!(arrived.elapsed() <= Duration::from_secs(5));
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
        ecs.protected_at(Instant::now()),
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
    ecs.set_latency(Duration::from_secs(2));
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
        ecs.protected_at(Instant::now()),
        "acquire returned unprotected"
    );
    drop(guard);
}

/// ECS throttling reaches the client after the agent's SDK has retried inside its
/// budget: an earlier try may have been applied. So a throttled release is no longer
/// a confirmed protection, and a holder arriving next waits for a new enable, which
/// waits until the release can no longer land after it.
#[tokio::test(start_paused = true)]
async fn a_throttled_release_may_have_been_applied_so_protection_is_promised_no_more() {
    let (ecs, p, _) = release_answered_with(Reply::AppliedThenThrottled).await;
    assert!(!ecs.protected_at(Instant::now()), "ECS applied the release");
    assert!(!p.current().protected, "{:?}", p.current());
    let arrived = Instant::now();
    let guard = p.acquire().await.unwrap();
    assert!(
        ecs.protected_at(Instant::now()),
        "acquire returned unprotected"
    );
    let calls = ecs.calls();
    assert_eq!(
        calls[2].at - calls[1].at,
        Duration::from_secs(5),
        "{calls:?}"
    );
    assert!(arrived.elapsed() <= Duration::from_secs(5));
    drop(guard);
}

/// The same answer when ECS did not apply the release: the client cannot tell, so it
/// promises nothing either, and the release is tried again.
#[tokio::test(start_paused = true)]
async fn a_throttled_release_is_tried_again() {
    let (ecs, p, _) = release_answered_with(Reply::Throttled).await;
    assert!(
        ecs.protected_at(Instant::now()),
        "ECS refused before acting"
    );
    assert!(!p.current().protected, "{:?}", p.current());
    assert_eq!(p.current().phase, Phase::Releasing);
    advance(Duration::from_secs(11)).await;
    settle().await;
    assert!(!ecs.protected_at(Instant::now()), "{:?}", ecs.calls());
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
    assert!(ecs.protected_at(Instant::now()));
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
    assert_eq!(ecs.calls().len(), 2);
    drop(guard);
    settle().await;
    // The release comes after the quiet second, not after the 10 s cool-down.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let calls = ecs.calls();
    assert_eq!(ecs.disables(), 1, "{calls:?}");
    let at = calls.last().unwrap().at - t0;
    assert!(at <= Duration::from_millis(50_010), "released at {at:?}");
    assert!(!ecs.protected_at(Instant::now()));
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
    assert!(!ecs.protected_at(Instant::now()));
    assert!(!p.current().protected);
    assert_eq!(p.current().phase, Phase::Idle);
}

#[tokio::test(start_paused = true)]
async fn a_refresh_hanging_past_the_confirmed_expiry_is_not_protection() {
    let settings = ProtectionSettings::builder()
        .duration_minutes(1)
        .maintain_percent(10)
        .refresh_percent(85)
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
    ecs.set_fallback(Reply::HangUnapplied);
    // The refresh goes at 51 s, the least lead these settings allow, and hangs until
    // 59 s; its retry hangs too; ECS's protection ends at 60 s.
    advance(Duration::from_millis(51_500)).await;
    settle().await;
    assert_eq!(ecs.calls().len(), 2, "the refresh is on the wire");
    assert!(p.current().protected);
    for _ in 0..34 {
        advance(Duration::from_millis(250)).await;
        settle().await;
    }
    settle().await;
    assert!(!ecs.protected_at(Instant::now()));
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
    ecs.set_fallback(Reply::Ok);
    let second = waiting.await.unwrap().unwrap();
    assert!(ecs.protected_at(Instant::now()));
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
    assert!(!ecs.protected_at(Instant::now()));
}

#[tokio::test(start_paused = true)]
async fn shutdown_returns_within_its_budget_when_the_agent_hangs() {
    let ecs = FakeEcs::new();
    let p = TaskProtection::start(ecs.clone(), websocket_settings());
    let _guard = p.acquire().await.unwrap();
    ecs.set_fallback(Reply::HangUnapplied);
    advance(Duration::from_secs(5)).await;
    let t = Instant::now();
    let report = p.shutdown().await;
    assert!(t.elapsed() <= Duration::from_secs(6), "{:?}", t.elapsed());
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
    ecs.set_fallback(Reply::AppliedThen504);
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
    released_at_start(&ecs).await;
    ecs.script([Reply::Refused]);
    let guard = p.hold();
    settle().await;
    drop(guard);
    step(Duration::from_secs(30)).await;
    assert_eq!(ecs.disables(), 1, "{:?}", ecs.calls());
    assert_eq!(p.current().phase, Phase::Idle);
}

/// Lets `d` pass in 250 ms steps, so every timer fires on time.
async fn step(d: Duration) {
    let mut left = d;
    while !left.is_zero() {
        let now = left.min(Duration::from_millis(250));
        advance(now).await;
        settle().await;
        left -= now;
    }
}

/// Lets the start's release of what an earlier process may have left go (the
/// worker's maintain window, 6 s), and checks it went.
async fn released_at_start(ecs: &FakeEcs) {
    step(Duration::from_millis(6_250)).await;
    assert_eq!(ecs.disables(), 1, "{:?}", ecs.calls());
    assert!(!ecs.protected_at(Instant::now()));
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
            assert!(ecs.protected_at(Instant::now()));
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
async fn no_disable_leaves_while_the_agent_may_still_work_on_an_abandoned_enable() {
    // The client gives up after 1 s, but the agent's own ECS call lasts up to 4 s: a
    // disable must not overtake the enable. Another enable may: it changes nothing.
    let settings = worker_settings()
        .to_builder()
        .request_timeout(Duration::from_secs(1))
        .maintain_percent(0)
        .build()
        .unwrap();
    let ecs = FakeEcs::new();
    let p = TaskProtection::start(ecs.clone(), settings);
    step(Duration::from_millis(1_250)).await;
    assert_eq!(ecs.disables(), 1, "the start's release");
    ecs.script([Reply::HangUnapplied]);
    let guard = p.hold();
    step(Duration::from_millis(1_500)).await;
    let enable_at = ecs.calls()[1].at;
    drop(guard);
    step(Duration::from_secs(10)).await;
    let calls = ecs.calls();
    let release = calls
        .iter()
        .skip(2)
        .find(|c| !c.request.enabled)
        .unwrap_or_else(|| panic!("no release: {calls:?}"));
    assert!(
        release.at - enable_at >= Duration::from_secs(5),
        "released {:?} after an abandoned enable: {calls:?}",
        release.at - enable_at
    );
    assert!(!ecs.protected_at(Instant::now()));
}

#[tokio::test(start_paused = true)]
async fn acquire_fails_once_shutdown_has_started() {
    let ecs = FakeEcs::new();
    ecs.set_latency(Duration::from_millis(400));
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
    assert!(!ecs.protected_at(Instant::now()));
    let calls = ecs.calls();
    for pair in calls.windows(2) {
        assert!(
            pair[1].at - pair[0].at >= Duration::from_secs(1),
            "{calls:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_refresh_at_the_least_lead_the_settings_allow_never_lapses() {
    // 85 % of a minute leaves 9 s: the 8 s request timeout and the 1 s spacing.
    let settings = worker_settings()
        .to_builder()
        .refresh_percent(85)
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
    assert_eq!(ecs.lapses(), 0);
    while let Ok(Some(e)) = tokio::time::timeout(Duration::ZERO, events.recv()).await {
        assert!(!matches!(e, ProtectionEvent::Unprotected { .. }), "{e:?}");
    }
}

/// Shutdown with an enable still on the wire whose agent call lands 3 s after it was
/// sent: the disable must leave after it, or the report must not say released.
#[tokio::test(start_paused = true)]
async fn shutdown_reports_released_only_when_no_earlier_request_can_still_land() {
    let ecs = FakeEcs::new();
    let p = TaskProtection::start(ecs.clone(), websocket_settings());
    step(Duration::from_millis(250)).await;
    assert_eq!(ecs.disables(), 1, "the start's release");
    step(Duration::from_secs(2)).await;
    // The enable leaves at 0 s, hangs, and ECS applies it at 3.0 s.
    ecs.set_landing(Landing::After(Duration::from_secs(3)));
    ecs.script([Reply::Hang]);
    let t0 = Instant::now();
    let _guard = p.hold();
    settle().await;
    advance(Duration::from_millis(100)).await;
    settle().await;
    ecs.set_landing(Landing::OnArrival);
    let report = p.shutdown().await;
    let took = t0.elapsed();
    // Every request sent has landed.
    step(Duration::from_secs(5)).await;
    let protected = ecs.protected_at(Instant::now());
    assert!(
        !(report == ShutdownReport::Released && protected),
        "the report says released, but ECS protects the task: {:?} {:?}",
        ecs.calls(),
        ecs.changes()
    );
    assert_eq!(report, ShutdownReport::Released, "{:?}", ecs.calls());
    assert!(!protected);
    assert!(took <= Duration::from_secs(6), "{took:?}");
}

/// A request on the wire at shutdown that answers quickly is waited for: its answer
/// is known, so the disable needs no wait for it.
#[tokio::test(start_paused = true)]
async fn a_request_on_the_wire_at_shutdown_is_waited_for_while_it_may_land() {
    let ecs = FakeEcs::new();
    let p = TaskProtection::start(ecs.clone(), websocket_settings());
    step(Duration::from_secs(2)).await;
    ecs.set_latency(Duration::from_millis(300));
    let t0 = Instant::now();
    let _guard = p.hold();
    settle().await;
    advance(Duration::from_millis(100)).await;
    settle().await;
    let report = p.shutdown().await;
    assert_eq!(report, ShutdownReport::Released, "{:?}", ecs.calls());
    // The enable answered at 0.3 s; the disable at the 1 s spacing, answered 0.3 s on.
    assert_eq!(
        t0.elapsed(),
        Duration::from_millis(1_300),
        "{:?}",
        ecs.calls()
    );
    assert!(!ecs.protected_at(Instant::now()));
}

/// The spacing is kept at shutdown only while the budget allows: past it, the
/// disable goes anyway, and shutdown ends within its budget.
#[tokio::test(start_paused = true)]
async fn shutdown_ends_within_its_budget_whatever_the_spacing() {
    let settings = websocket_settings()
        .to_builder()
        .min_put_interval(Duration::from_secs(20))
        .build()
        .unwrap();
    let ecs = FakeEcs::new();
    let p = TaskProtection::start(ecs.clone(), settings);
    step(Duration::from_secs(21)).await;
    let _guard = p.acquire().await.unwrap();
    let t0 = Instant::now();
    ecs.set_fallback(Reply::HangUnapplied);
    let report = p.shutdown().await;
    assert!(t0.elapsed() <= Duration::from_secs(6), "{:?}", t0.elapsed());
    assert!(matches!(report, ShutdownReport::Failed(_)), "{report:?}");
    assert_eq!(ecs.disables(), 2, "{:?}", ecs.calls());
}

/// A release answered 500 may not have been applied: it is tried again, rather than
/// counted as done and left to the expiry.
#[tokio::test(start_paused = true)]
async fn a_release_answered_500_is_tried_again() {
    let (ecs, p, _) = release_answered_with(Reply::Unapplied500).await;
    assert!(ecs.protected_at(Instant::now()), "the 500 applied nothing");
    step(Duration::from_secs(2)).await;
    assert!(!ecs.protected_at(Instant::now()), "{:?}", ecs.calls());
    assert_eq!(p.current().phase, Phase::Idle);
}

/// Throttling that does not pass is met with a growing backoff, not a PUT a second:
/// ECS's limits are per account, shared by every task.
#[tokio::test(start_paused = true)]
async fn persistent_throttling_is_backed_off() {
    let ecs = FakeEcs::new();
    let p = TaskProtection::start(ecs.clone(), worker_settings());
    released_at_start(&ecs).await;
    ecs.set_fallback(Reply::Throttled);
    let _guard = p.hold();
    step(Duration::from_secs(60)).await;
    let enables = ecs.enables();
    // 0.2 s doubling to the 10 s check interval, with jitter: about a dozen a minute.
    assert!((6..=15).contains(&enables), "{enables} enables in a minute");
}

/// A start that knows nothing, with the agent unreachable: the release is retried
/// while ECS may hold protection, and no longer once even an earlier process's
/// protection would have run out.
#[tokio::test(start_paused = true)]
async fn doubt_ends_at_its_bound_and_with_it_the_retries() {
    let ecs = FakeEcs::new();
    ecs.set_fallback(Reply::Refused);
    let p = TaskProtection::start(ecs.clone(), worker_settings());
    step(Duration::from_secs(66)).await;
    let tried = ecs.disables();
    assert!(tried >= 3, "{tried} tries");
    assert_eq!(p.current().phase, Phase::Idle);
    step(Duration::from_secs(120)).await;
    assert_eq!(ecs.disables(), tried, "{:?}", ecs.calls());
}

/// Shutdown while a refresh is on the wire: nothing is promised from the moment it
/// begins, not only once the refresh answers.
#[tokio::test(start_paused = true)]
async fn shutdown_mid_request_withdraws_the_promise_at_once() {
    let ecs = FakeEcs::new();
    let p = TaskProtection::start(ecs.clone(), worker_settings());
    let _guard = p.acquire().await.unwrap();
    ecs.set_latency(Duration::from_secs(3));
    // The refresh leaves at 48 s.
    step(Duration::from_millis(48_250)).await;
    assert!(ecs.on_wire().is_some_and(|r| r.enabled));
    assert!(p.current().protected);
    let p2 = p.clone();
    let shutting = tokio::spawn(async move { p2.shutdown().await });
    settle().await;
    assert!(ecs.on_wire().is_some(), "the refresh is still on the wire");
    assert!(!p.current().protected, "still promised during shutdown");
    assert_eq!(p.current().phase, Phase::Stopped);
    shutting.await.unwrap();
}

/// An acquire that starts once shutdown has begun fails, even before the driver has
/// seen the stop: it must not be told "protected" just before the release.
#[tokio::test(start_paused = true)]
async fn an_acquire_after_shutdown_began_fails_before_the_driver_runs() {
    let ecs = FakeEcs::new();
    let p = TaskProtection::start(ecs.clone(), worker_settings());
    let _held = p.acquire().await.unwrap();
    let mut shutting = Box::pin(p.shutdown());
    // One poll: the stop is set; the driver has not run since.
    assert!(futures_util::poll!(&mut shutting).is_pending());
    assert!(p.current().protected, "the driver has not run");
    assert_eq!(p.acquire().await.err(), Some(AcquireError::ShutDown));
    shutting.await;
}

/// An enable that ECS applied late in its flight protects until one duration after
/// it landed, not after it was sent: a task that could not release since must not
/// believe its protection over at send + duration.
#[tokio::test(start_paused = true)]
async fn an_enable_that_landed_late_is_not_believed_over_before_it_can_have_ended() {
    let ecs = FakeEcs::new();
    let p = TaskProtection::start(ecs.clone(), worker_settings());
    released_at_start(&ecs).await;
    // The enable is applied, and answered, 3.5 s after it leaves (the agent gives up
    // on ECS at 4 s).
    ecs.set_latency(Duration::from_millis(3_500));
    ecs.set_landing(Landing::After(Duration::from_millis(3_500)));
    let sent = Instant::now();
    let guard = p.acquire().await.unwrap();
    ecs.set_latency(Duration::ZERO);
    ecs.set_landing(Landing::OnArrival);
    // From now on the agent cannot be reached: the release never gets through.
    ecs.set_fallback(Reply::Refused);
    drop(guard);
    // Past send + duration, and before landing + duration.
    let expiry = ecs.expiry().expect("ECS holds protection");
    assert!(expiry >= sent + Duration::from_millis(63_500), "{expiry:?}");
    step(Duration::from_secs(61) - sent.elapsed()).await;
    assert!(ecs.protected_at(Instant::now()));
    let report = p.shutdown().await;
    assert!(
        !matches!(
            report,
            ShutdownReport::NotProtected | ShutdownReport::Released
        ),
        "ECS still protects the task, but the report says {report:?}: {:?}",
        ecs.calls()
    );
}
