//! The protection state machine, driven on paused time against an in-process ECS.
//! Every figure asserted here is a count of PUTs that ECS would have received.

mod support;

use std::time::Duration;

use support::{FakeEcs, Reply, settle, websocket_settings, worker_settings};
use task_protection::{AcquireError, Phase, ProtectionEvent, ShutdownReport, TaskProtection};
use tokio::time::{Instant, advance};

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[tokio::test(start_paused = true)]
async fn thousand_short_jobs_inside_the_maintain_window_cost_one_enable() {
    let ecs = FakeEcs::new();
    let p = TaskProtection::start(ecs.clone(), worker_settings());
    for _ in 0..1_000 {
        let guard = p.acquire().await.unwrap();
        advance(Duration::from_millis(2)).await;
        drop(guard);
        settle().await;
    }
    assert_eq!(ecs.enables(), 1, "{:?}", ecs.calls());
    assert_eq!(ecs.disables(), 0);
    assert_eq!(p.counters().acquire_puts, 1);
    // The last release is followed by exactly one disable, once the window passed.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(ecs.disables(), 1);
    assert_eq!(p.counters().puts(), 2);
    assert!(!ecs.protected_at(Instant::now()));
}

#[tokio::test(start_paused = true)]
async fn a_hold_for_three_durations_refreshes_at_the_mark_and_never_lapses() {
    let ecs = FakeEcs::new();
    let p = TaskProtection::start(ecs.clone(), worker_settings());
    let mut events = p.events();
    let t0 = Instant::now();
    let guard = p.acquire().await.unwrap();
    // Check ECS's own view every second for three minutes.
    for _ in 0..180 {
        advance(Duration::from_secs(1)).await;
        settle().await;
        assert!(
            ecs.protected_at(Instant::now()),
            "lapsed at {:?}",
            t0.elapsed()
        );
    }
    let calls = ecs.calls();
    // One acquire at 0 s, refreshes at 48 s, 96 s, 144 s: 80 % of 60 s each.
    assert_eq!(calls.len(), 4, "{calls:?}");
    for (i, call) in calls.iter().enumerate() {
        let at = secs(call.at - t0);
        let expected = 48.0 * i as f64;
        assert!(
            (at - expected).abs() < 0.1,
            "PUT {i} at {at} s, expected {expected} s"
        );
        assert!(call.request.enabled);
    }
    assert_eq!(p.counters().refresh_puts, 3);
    let mut saw = Vec::new();
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(1), events.recv()).await {
        saw.push(e);
    }
    drop(guard);
    assert_eq!(saw.len(), 4, "{saw:?}");
    assert!(
        !saw.iter()
            .any(|e| matches!(e, ProtectionEvent::Unprotected { .. })),
        "{saw:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_last_release_disables_at_the_maintain_mark_exactly() {
    let ecs = FakeEcs::new();
    let p = TaskProtection::start(ecs.clone(), worker_settings());
    let t0 = Instant::now();
    let guard = p.acquire().await.unwrap();
    advance(Duration::from_secs(2)).await;
    drop(guard);
    settle().await;
    assert_eq!(p.current().phase, Phase::Releasing);
    // Not earlier: the window is 10 % of 1 minute from the enable, so 6 s.
    advance(Duration::from_millis(3_990)).await;
    settle().await;
    assert_eq!(ecs.disables(), 0, "released early");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let calls = ecs.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    let at = secs(calls[1].at - t0);
    assert!(!calls[1].request.enabled);
    assert!((6.0..=6.002).contains(&at), "disable at {at} s");
    assert_eq!(p.current().phase, Phase::Idle);
}

#[tokio::test(start_paused = true)]
async fn throttled_then_ok_succeeds_after_backoff() {
    let ecs = FakeEcs::new();
    ecs.script([Reply::Throttled, Reply::Throttled, Reply::Ok]);
    let p = TaskProtection::start(ecs.clone(), worker_settings());
    let t0 = Instant::now();
    let guard = p.acquire().await.expect("acquired after backoff");
    let waited = t0.elapsed();
    let c = p.counters();
    assert_eq!((c.acquire_puts, c.retries, c.failures), (3, 2, 2), "{c:?}");
    // Two backoffs of at least 100 ms and 200 ms, and the 1 s spacing between PUTs.
    assert!(waited >= Duration::from_secs(2), "{waited:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    assert!(p.current().protected);
    drop(guard);
}

#[tokio::test(start_paused = true)]
async fn a_rejection_fails_the_acquire_at_once_and_fires_the_event() {
    let ecs = FakeEcs::new();
    ecs.set_fallback(Reply::Failure("DEPLOYMENT_BLOCKED"));
    let p = TaskProtection::start(ecs.clone(), worker_settings());
    let mut events = p.events();
    let t0 = Instant::now();
    let err = p.acquire().await.unwrap_err();
    assert_eq!(t0.elapsed(), Duration::ZERO, "no retry, no wait");
    assert!(
        matches!(&err, AcquireError::Rejected(r) if r.reason() == "DEPLOYMENT_BLOCKED"),
        "{err}"
    );
    assert!(
        matches!(events.recv().await, Some(ProtectionEvent::Rejected(r)) if r.reason() == "DEPLOYMENT_BLOCKED")
    );
    assert_eq!(p.counters().rejections, 1);
    assert_eq!(ecs.calls().len(), 1);
    // During the cool-down a new acquire fails without a call.
    let err = p.acquire().await.unwrap_err();
    assert!(matches!(err, AcquireError::Rejected(_)));
    assert_eq!(ecs.calls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_hundred_concurrent_acquires_cost_one_put() {
    let ecs = FakeEcs::new();
    ecs.set_latency(Duration::from_millis(50));
    let p = TaskProtection::start(ecs.clone(), worker_settings());
    let guards = futures_util::future::join_all((0..100).map(|_| p.acquire())).await;
    assert!(guards.iter().all(Result::is_ok));
    assert_eq!(p.holders(), 100);
    assert_eq!(ecs.calls().len(), 1);
    assert_eq!(ecs.max_in_flight(), 1);
}

/// 10,000 holder changes in 3 s: one every 0.3 ms, alternating hold and release.
async fn churn(p: &TaskProtection) {
    let mut guard = None;
    for i in 0..10_000 {
        if i % 2 == 0 {
            guard = Some(p.hold());
        } else {
            guard = None;
        }
        advance(Duration::from_micros(300)).await;
    }
    drop(guard);
}

#[tokio::test(start_paused = true)]
async fn a_churn_of_ten_thousand_changes_costs_at_most_four_puts_and_ends_released() {
    for settings in [worker_settings(), websocket_settings()] {
        let ecs = FakeEcs::new();
        let p = TaskProtection::start(ecs.clone(), settings.clone());
        churn(&p).await;
        tokio::time::sleep(settings.maintain_window() + Duration::from_secs(2)).await;
        let calls = ecs.calls();
        eprintln!(
            "churn with maintain {}%: {} PUTs",
            settings.maintain_percent(),
            calls.len()
        );
        assert!(calls.len() <= 4, "{} PUTs: {calls:?}", calls.len());
        assert!(!calls.last().unwrap().request.enabled, "ends released");
        assert!(!ecs.protected_at(Instant::now()));
        for pair in calls.windows(2) {
            assert!(pair[1].at - pair[0].at >= Duration::from_secs(1));
        }
        assert_eq!(p.current().phase, Phase::Idle);
    }
}

#[tokio::test(start_paused = true)]
async fn hold_registers_at_once_and_changes_while_in_flight_coalesce() {
    let ecs = FakeEcs::new();
    ecs.set_latency(Duration::from_secs(2));
    let p = TaskProtection::start(ecs.clone(), websocket_settings());
    let guard = p.hold();
    assert_eq!(p.holders(), 1);
    settle().await;
    assert_eq!(p.current().phase, Phase::Acquiring);
    // Gone again while the enable is in flight: the next request is the disable,
    // sent once the answer is in and a second has passed since the enable.
    advance(Duration::from_millis(500)).await;
    drop(guard);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let calls = ecs.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(calls[0].request.enabled && !calls[1].request.enabled);
    assert_eq!(ecs.max_in_flight(), 1);
}

#[tokio::test(start_paused = true)]
async fn shutdown_while_held_disables_at_once() {
    let ecs = FakeEcs::new();
    let p = TaskProtection::start(ecs.clone(), worker_settings());
    let _guard = p.acquire().await.unwrap();
    advance(Duration::from_secs(3)).await;
    let t0 = Instant::now();
    let report = p.shutdown().await;
    assert_eq!(report, ShutdownReport::Released);
    assert!(t0.elapsed() <= Duration::from_secs(2));
    let calls = ecs.calls();
    assert_eq!(calls.len(), 2);
    assert!(!calls[1].request.enabled);
    assert!(!ecs.protected_at(Instant::now()));
    assert_eq!(p.current().phase, Phase::Stopped);
    assert!(matches!(p.acquire().await, Err(AcquireError::ShutDown)));
    assert_eq!(
        p.shutdown().await,
        ShutdownReport::Released,
        "same report again"
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_at_start_releases_what_an_earlier_process_may_have_left() {
    let ecs = FakeEcs::new();
    let p = TaskProtection::start(ecs.clone(), worker_settings());
    assert_eq!(p.shutdown().await, ShutdownReport::Released);
    assert_eq!(ecs.disables(), 1, "{:?}", ecs.calls());
    assert_eq!(ecs.calls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn shutdown_when_idle_and_released_makes_no_call() {
    let ecs = FakeEcs::new();
    let p = TaskProtection::start(ecs.clone(), worker_settings());
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(ecs.calls().len(), 1, "the start's release");
    assert_eq!(p.shutdown().await, ShutdownReport::NotProtected);
    assert_eq!(ecs.calls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_enable_that_timed_out_is_undone_when_no_longer_wanted() {
    let ecs = FakeEcs::new();
    ecs.script([Reply::Hang]);
    let p = TaskProtection::start(ecs.clone(), worker_settings());
    let err = {
        let acquire = p.acquire();
        tokio::pin!(acquire);
        // Give up before the retry succeeds.
        tokio::time::timeout(Duration::from_secs(5), &mut acquire).await
    };
    assert!(err.is_err(), "still waiting after the first timeout");
    tokio::time::sleep(Duration::from_secs(30)).await;
    // ECS applied the enable that never answered; the client must switch it off.
    assert!(!ecs.protected_at(Instant::now()), "{:?}", ecs.calls());
    assert!(!ecs.calls().last().unwrap().request.enabled);
}

#[tokio::test(start_paused = true)]
async fn acquire_gives_up_within_the_acquire_timeout() {
    let ecs = FakeEcs::new();
    ecs.set_fallback(Reply::Hang);
    let p = TaskProtection::start(ecs.clone(), worker_settings());
    let t0 = Instant::now();
    let err = p.acquire().await.unwrap_err();
    assert_eq!(t0.elapsed(), p.settings().acquire_timeout());
    let AcquireError::TimedOut { last_error, .. } = &err else {
        panic!("{err}")
    };
    assert!(last_error.is_some(), "{err}");
    // The cause is the error's source, not flattened into its text.
    let source = std::error::Error::source(&err).expect("the last error as source");
    assert!(source.to_string().contains("no answer within"), "{source}");
    assert_eq!(
        task_protection::ErrorChain(&err).to_string(),
        "task protection not confirmed within 30s: no answer within 8s"
    );
}

#[tokio::test(start_paused = true)]
async fn a_stream_of_jobs_with_short_gaps_does_not_flap() {
    // A worker at concurrency 1: each 100 ms job is followed by a 5 ms gap with no
    // holder (delete, then the next receive), for 40 s.
    let ecs = FakeEcs::new();
    let p = TaskProtection::start(ecs.clone(), worker_settings());
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(40) {
        let guard = p.acquire().await.unwrap();
        advance(Duration::from_millis(100)).await;
        drop(guard);
        advance(Duration::from_millis(5)).await;
    }
    assert_eq!(ecs.calls().len(), 1, "{:?}", ecs.calls());
    let idle_from = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let calls = ecs.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    // Released one quiet second after the last job: the maintain window had passed.
    let at = calls[1].at - idle_from;
    assert!(!calls[1].request.enabled);
    assert!(at <= Duration::from_millis(1_001), "{at:?}");
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

/// Holds for `job`, then lets `gap` pass with no holder, `n` times.
async fn trickle(p: &TaskProtection, n: usize, job: Duration, gap: Duration) {
    for _ in 0..n {
        let guard = p.acquire().await.unwrap();
        step(job).await;
        drop(guard);
        settle().await;
        step(gap).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_steady_trickle_of_one_job_a_second_costs_an_enable_and_its_refreshes() {
    let ecs = FakeEcs::new();
    let p = TaskProtection::start(ecs.clone(), worker_settings());
    step(Duration::from_secs(7)).await;
    assert_eq!(ecs.calls().len(), 1, "the start's release");
    // One 50 ms job a second for two minutes: each gap is 950 ms.
    let t0 = Instant::now();
    trickle(
        &p,
        120,
        Duration::from_millis(50),
        Duration::from_millis(950),
    )
    .await;
    let calls: Vec<_> = ecs.calls().into_iter().skip(1).collect();
    // The first gaps are under the quiet second; then the linger follows the gaps.
    assert!(
        calls.iter().all(|c| c.request.enabled),
        "released within the trickle: {calls:?}"
    );
    // An enable and a refresh every 48 s: at most 2 PUTs a minute.
    assert!(
        calls.len() <= 4,
        "{} PUTs in two minutes: {calls:?}",
        calls.len()
    );
    assert_eq!(ecs.lapses(), 0);
    // The trickle stops: released within the maintain window of the last job.
    let last_job_end = t0 + Duration::from_secs(120) - Duration::from_millis(950);
    step(Duration::from_secs(6)).await;
    let release = ecs.calls().last().copied().unwrap();
    assert!(!release.request.enabled, "{:?}", ecs.calls());
    assert!(release.at - last_job_end <= Duration::from_secs(6));
    assert!(!ecs.protected_at(Instant::now()));
}

#[tokio::test(start_paused = true)]
async fn the_linger_never_passes_the_maintain_window() {
    let ecs = FakeEcs::new();
    let p = TaskProtection::start(ecs.clone(), worker_settings());
    step(Duration::from_secs(7)).await;
    // Gaps of 5 s, which the 6 s maintain window could bridge: twice that is 10 s,
    // but the linger stops at the window.
    trickle(&p, 4, Duration::from_millis(100), Duration::from_secs(5)).await;
    let guard = p.acquire().await.unwrap();
    step(Duration::from_secs(20)).await;
    drop(guard);
    settle().await;
    let left = Instant::now();
    step(Duration::from_secs(10)).await;
    let release = ecs.calls().last().copied().unwrap();
    assert!(!release.request.enabled, "{:?}", ecs.calls());
    assert_eq!(
        release.at - left,
        Duration::from_secs(6),
        "{:?}",
        ecs.calls()
    );
}

#[tokio::test(start_paused = true)]
async fn after_a_long_idle_a_lone_long_job_is_released_a_quiet_second_after_it() {
    let ecs = FakeEcs::new();
    let p = TaskProtection::start(ecs.clone(), worker_settings());
    step(Duration::from_secs(600)).await;
    let guard = p.acquire().await.unwrap();
    step(Duration::from_secs(20)).await;
    drop(guard);
    settle().await;
    let left = Instant::now();
    step(Duration::from_secs(3)).await;
    let release = ecs.calls().last().copied().unwrap();
    assert!(!release.request.enabled, "{:?}", ecs.calls());
    assert_eq!(release.at - left, Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn a_restarted_process_releases_the_protection_an_earlier_one_left() {
    for (settings, within) in [
        (websocket_settings(), Duration::ZERO),
        (worker_settings(), Duration::from_secs(6)),
    ] {
        let ecs = FakeEcs::new();
        // An earlier process in this task left it protected for 30 minutes.
        ecs.protect_until(Instant::now() + Duration::from_secs(1_800));
        let start = Instant::now();
        let p = TaskProtection::start(ecs.clone(), settings);
        settle().await;
        step(within + Duration::from_millis(250)).await;
        assert!(!ecs.protected_at(Instant::now()), "{:?}", ecs.calls());
        let calls = ecs.calls();
        assert_eq!(calls.len(), 1, "{calls:?}");
        assert!(calls[0].at - start <= within);
        assert_eq!(p.shutdown().await, ShutdownReport::NotProtected);
        assert_eq!(ecs.calls().len(), 1);
    }
}

#[tokio::test(start_paused = true)]
async fn a_job_at_start_costs_an_enable_and_no_release() {
    let ecs = FakeEcs::new();
    ecs.protect_until(Instant::now() + Duration::from_secs(1_800));
    let p = TaskProtection::start(ecs.clone(), worker_settings());
    let guard = p.acquire().await.unwrap();
    let calls = ecs.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(calls[0].request.enabled);
    drop(guard);
}

#[tokio::test(start_paused = true)]
async fn a_skewed_wall_clock_changes_no_timing() {
    for offset in [-3_600, -50, 50, 3_600] {
        let ecs = FakeEcs::new();
        ecs.set_clock_offset(offset);
        let p = TaskProtection::start(ecs.clone(), worker_settings());
        let t0 = Instant::now();
        let guard = p.acquire().await.unwrap();
        step(Duration::from_secs(60)).await;
        let calls = ecs.calls();
        // The enable and one refresh at 48 s, whatever ECS's clock says.
        assert_eq!(calls.len(), 2, "offset {offset}: {calls:?}");
        assert_eq!(calls[1].at - t0, Duration::from_secs(48), "offset {offset}");
        assert_eq!(ecs.lapses(), 0);
        assert!(p.current().protected);
        drop(guard);
    }
}

#[tokio::test(start_paused = true)]
async fn a_standalone_task_stops_asking_once_ecs_says_it_is_not_a_service_task() {
    let ecs = FakeEcs::new();
    ecs.set_fallback(Reply::Failure("TASK_NOT_VALID"));
    let p = TaskProtection::start(ecs.clone(), worker_settings());
    step(Duration::from_secs(60)).await;
    assert_eq!(ecs.calls().len(), 1, "{:?}", ecs.calls());
    assert_eq!(p.current().phase, Phase::Idle);
}
