//! The scheduler's rules, each checked in the test world: rolling deployments at
//! several percentages, protection, unhealthy tasks, the circuit breaker and its
//! rollbacks, stopping a task.

use std::time::Duration;

use super::health::{Health, TargetState};
use super::model::{Model, Progress, Revision, Rollout, StartReason, Status, StopReason};
use super::settings::{ContainerCheck, RollbackMode, Settings, TargetCheck, UnhealthySurplus};
use super::world::World;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// The websocket service at a test's pace.
pub(super) fn fast(desired: u32) -> Settings {
    let mut s = Settings::websocket(desired);
    s.health_check_grace = secs(3);
    if let Some(tg) = &mut s.target_group {
        tg.check = TargetCheck {
            interval: secs(1),
            timeout: secs(1),
            healthy: 2,
            unhealthy: 2,
        };
        tg.deregistration_delay = secs(2);
    }
    s.container_check = Some(ContainerCheck {
        interval: secs(1),
        timeout: secs(1),
        retries: 3,
        start_period: secs(2),
        ..ContainerCheck::deployed()
    });
    s.stop_timeout = secs(10);
    s
}

fn totals(m: &Model) -> (u32, u32) {
    let total = super::model::count(m.wanted());
    let healthy = super::model::count(m.wanted().filter(|t| m.is_healthy(t)));
    (total, healthy)
}

fn old_alive(m: &Model, old: &str) -> u32 {
    super::model::count(m.tasks.iter().filter(|t| t.alive() && t.deployment == old))
}

/// A rolling deployment at `max`/`min` percent of 2 tasks completes within the bounds.
fn rolling(max: u32, min: u32) {
    let mut s = fast(2);
    s.maximum_percent = max;
    s.minimum_healthy_percent = min;
    let mut w = World::steady(s.clone());
    let old = w.m.primary.clone();
    let new = w.m.deploy(Revision::default());
    let (bound, floor) = (s.maximum_running(2), s.minimum_healthy(2));
    w.run_checking(secs(40), |m| {
        let (total, healthy) = totals(m);
        if total > bound {
            return Err(format!("{total} tasks above {bound}"));
        }
        if healthy < floor {
            return Err(format!("{healthy} healthy below {floor}"));
        }
        Ok(())
    });
    assert!(w.m.primary().completed(), "{:#?}", w.summary());
    assert_eq!(w.m.primary, new);
    assert_eq!(old_alive(&w.m, &old), 0);
    assert!(w.m.deployment(&old).unwrap().inactive);
}

#[test]
fn rolling_deployments_keep_within_maximum_and_minimum_percent() {
    rolling(200, 100);
    rolling(100, 50);
    rolling(150, 50);
    rolling(100, 0);
}

#[test]
fn at_100_percent_maximum_an_old_task_stops_before_a_new_one_starts() {
    let mut s = fast(2);
    s.maximum_percent = 100;
    s.minimum_healthy_percent = 50;
    let mut w = World::steady(s);
    w.m.deploy(Revision::default());
    w.tick();
    // One old task is stopping, no new one yet.
    let stopping = w.m.tasks.iter().filter(|t| t.stopping).count();
    let new = w.m.wanted().filter(|t| t.deployment == w.m.primary).count();
    assert_eq!((stopping, new), (1, 0), "{:#?}", w.summary());
    w.tick();
    assert_eq!(
        w.m.wanted().filter(|t| t.deployment == w.m.primary).count(),
        1
    );
}

#[test]
fn protected_old_tasks_hold_a_deployment_until_released() {
    let mut w = World::steady(fast(2));
    let old: Vec<String> = w.wanted();
    for id in &old {
        w.protect(id);
    }
    w.m.deploy(Revision::default());
    w.run(secs(20));
    assert!(!w.m.primary().completed());
    assert!(old.iter().all(|id| w.m.task(id).unwrap().wanted()));
    assert!(
        w.m.events
            .iter()
            .any(|(_, e)| e
                .contains("was unable to scale in due to (reason 2 tasks under protection)")),
        "{:?}",
        w.m.events
    );
    w.release(&old[0]);
    w.run(secs(2));
    assert!(!w.m.task(&old[0]).unwrap().wanted());
    assert!(w.m.task(&old[1]).unwrap().wanted());
    w.release(&old[1]);
    w.run_until(secs(20), |m| m.primary().completed());
}

#[test]
fn scale_in_stops_only_unprotected_surplus() {
    let mut w = World::steady(fast(3));
    let ids = w.wanted();
    w.protect(&ids[0]);
    w.protect(&ids[1]);
    w.m.set_desired(1);
    w.run(secs(10));
    // One unprotected: it goes; the other surplus waits.
    assert_eq!(w.m.wanted().count(), 2, "{:#?}", w.summary());
    assert!(!w.m.task(&ids[2]).unwrap().wanted());
    w.release(&ids[1]);
    w.run_until(secs(10), |m| m.alive() == 1);
    assert_eq!(w.m.started_since(secs(0), StartReason::Unhealthy), 0);
}

#[test]
fn an_unhealthy_target_is_replaced_first_whatever_its_protection() {
    let mut w = World::steady(fast(2));
    let ids = w.wanted();
    let sick = ids[0].clone();
    w.protect(&sick);
    w.refusing.insert(sick.clone());
    let since = w.now();
    // Two failed checks a second apart, past the grace period: a replacement starts.
    w.run_until(secs(5), |m| {
        m.started_since(since, StartReason::Unhealthy) == 1
    });
    let t = w.m.task(&sick).unwrap();
    assert!(t.wanted(), "stopped before its replacement was healthy");
    assert_eq!(t.target_state(), Some(TargetState::Unhealthy));
    // Once the replacement is healthy, the protected unhealthy task is stopped.
    w.run_until(secs(10), |m| !m.task(&sick).unwrap().wanted());
    let t = w.m.task(&sick).unwrap();
    assert_eq!(
        t.stop.as_ref().unwrap().reason,
        StopReason::LoadBalancerHealth
    );
    assert_eq!(t.status, Status::Deactivating);
    assert_eq!(w.m.wanted().count(), 2);
}

#[test]
fn without_room_unhealthy_tasks_stop_one_by_one() {
    let mut s = fast(2);
    s.maximum_percent = 100;
    s.minimum_healthy_percent = 50;
    let mut w = World::steady(s);
    let ids = w.wanted();
    w.sick.extend(ids.iter().cloned());
    w.run_until(secs(10), |m| m.tasks.iter().any(|t| t.stopping));
    let stopping = w.m.tasks.iter().filter(|t| t.stopping && t.alive()).count();
    assert_eq!(stopping, 1, "{:#?}", w.summary());
    assert_eq!(
        w.m.tasks
            .iter()
            .find(|t| t.stopping)
            .unwrap()
            .stop
            .as_ref()
            .unwrap()
            .reason,
        StopReason::ContainerHealth
    );
}

#[test]
fn an_unhealthy_surplus_task_is_replaced_or_only_stopped_as_set() {
    for (mode, replacements) in [
        (UnhealthySurplus::Replaced, 1),
        (UnhealthySurplus::StoppedOnly, 0),
    ] {
        let mut s = fast(3);
        s.unknowns.unhealthy_surplus = mode;
        let mut w = World::steady(s);
        let ids = w.wanted();
        for id in &ids {
            w.protect(id);
        }
        w.m.set_desired(2);
        let since = w.now();
        w.refusing.insert(ids[0].clone());
        w.run_until(secs(15), |m| !m.task(&ids[0]).unwrap().wanted());
        assert_eq!(
            w.m.started_since(since, StartReason::Unhealthy),
            replacements,
            "{mode:?}: {:#?}",
            w.summary()
        );
    }
}

#[test]
fn a_deployment_failing_only_at_the_load_balancer_is_rolled_back_keeping_the_old_tasks() {
    let mut w = World::steady(fast(2));
    let old = w.m.primary.clone();
    let old_tasks = w.wanted();
    let bad = w.m.deploy(Revision {
        target_port_wrong: true,
        ..Revision::default()
    });
    w.run_until(secs(60), |m| {
        m.deployment(&bad).unwrap().rollout == Rollout::Failed
    });
    let d = w.m.deployment(&bad).unwrap();
    assert_eq!(
        d.reason,
        "ECS deployment circuit breaker: tasks failed to start."
    );
    assert!(d.failures >= 3);
    // The new tasks' containers were healthy all along: only the targets failed.
    assert!(
        w.m.tasks
            .iter()
            .filter(|t| t.deployment == bad && t.started_at.is_some())
            .all(|t| t
                .health
                .as_ref()
                .is_some_and(|h| h.runs > 0 && h.failures == 0))
    );
    assert_eq!(w.m.primary, old);
    w.run_until(secs(30), |m| m.primary().completed());
    assert_eq!(
        w.m.deployment(&bad).unwrap().progress,
        Progress::RollbackSuccessful
    );
    // The old tasks never stopped.
    assert_eq!(w.wanted(), old_tasks);
    assert!(
        old_tasks
            .iter()
            .all(|id| w.m.task(id).unwrap().stop.is_none())
    );
}

#[test]
fn a_rollback_starting_new_tasks_replaces_the_old_ones_like_a_deployment() {
    let mut s = fast(2);
    s.unknowns.rollback = RollbackMode::StartNewTasks;
    let mut w = World::steady(s);
    let old = w.m.primary.clone();
    let old_tasks = w.wanted();
    let bad = w.m.deploy(Revision {
        target_port_wrong: true,
        ..Revision::default()
    });
    w.run_until(secs(60), |m| {
        m.deployment(&bad).unwrap().rollout == Rollout::Failed
    });
    let rollback = w.m.primary.clone();
    assert!(rollback != old && rollback != bad);
    w.run_until(secs(60), |m| m.primary().completed());
    assert!(old_tasks.iter().all(|id| !w.m.task(id).unwrap().alive()));
    assert_eq!(
        w.m.primary().revision,
        w.m.deployment(&old).unwrap().revision
    );
}

#[test]
fn a_task_that_never_runs_counts_for_the_circuit_breaker_and_without_rollback_the_deployment_stalls()
 {
    let mut s = fast(2);
    s.circuit_breaker = Some(super::settings::CircuitBreaker { rollback: false });
    let mut w = World::steady(s);
    let bad = w.m.deploy(Revision::default());
    // Every task of the new deployment crashes before it is ready.
    for _ in 0..200 {
        let new: Vec<String> =
            w.m.tasks
                .iter()
                .filter(|t| t.deployment == bad)
                .map(|t| t.id.clone())
                .collect();
        w.crashing.extend(new);
        w.tick();
    }
    let d = w.m.deployment(&bad).unwrap();
    assert_eq!(
        (d.rollout, d.progress),
        (Rollout::Failed, Progress::Stopped)
    );
    assert_eq!(w.m.primary, bad);
    // A FAILED deployment launches nothing more, and the old tasks stay.
    let launched = w.m.tasks.iter().filter(|t| t.deployment == bad).count();
    w.run(secs(10));
    assert_eq!(
        w.m.tasks.iter().filter(|t| t.deployment == bad).count(),
        launched
    );
    assert_eq!(w.m.wanted().count(), 2);
}

#[test]
fn a_stopped_task_is_deactivating_with_desired_status_stopped_until_sigterm() {
    let mut w = World::steady(fast(2));
    let id = w.wanted()[0].clone();
    assert!(w.m.stop_task(&id, "Task stopped by user"));
    w.tick();
    let t = w.m.task(&id).unwrap();
    assert_eq!((t.status, t.wanted()), (Status::Deactivating, false));
    assert_eq!(t.stop.as_ref().unwrap().reason.code(), "UserInitiated");
    // The deregistration delay (2 s), then SIGTERM.
    w.run(secs(1));
    assert_eq!(w.m.task(&id).unwrap().status, Status::Deactivating);
    w.run(secs(2));
    assert_ne!(w.m.task(&id).unwrap().status, Status::Deactivating);
    // A replacement keeps the desired count.
    w.run_until(secs(10), |m| {
        m.wanted().filter(|t| m.is_healthy(t)).count() == 2
    });
}

#[test]
fn without_any_check_a_task_is_healthy_40_seconds_after_it_runs() {
    let mut s = Settings::queue_consumer(1);
    s.container_check = None;
    let mut w = World::new(s);
    w.run(secs(30));
    assert!(!w.m.primary().completed());
    w.run_until(secs(15), |m| m.primary().completed());
    assert_eq!(w.m.tasks[0].health_status(), Health::Unknown);
}

#[test]
fn a_rollback_to_a_deployment_whose_tasks_all_stopped_starts_them_again() {
    let mut w = World::steady(fast(2));
    let old = w.m.primary.clone();
    let old_tasks = w.wanted();
    let bad = w.m.deploy(Revision {
        target_port_wrong: true,
        ..Revision::default()
    });
    // The old tasks fail their checks (a leaving task answering 503) and are stopped.
    w.refusing.extend(old_tasks.iter().cloned());
    w.run_until(secs(60), |m| {
        m.deployment(&bad).unwrap().rollout == Rollout::Failed
    });
    w.refusing.clear();
    assert_eq!(w.m.primary, old);
    w.run_until(secs(60), |m| m.primary().completed());
    assert!(old_tasks.iter().all(|id| !w.m.task(id).unwrap().alive()));
    assert_eq!(w.m.running(Some(&old)), 2);
}

#[test]
fn a_fleet_of_1000_tasks_starts_and_scales_in_to_700_evenly_over_three_zones() {
    let mut s = fast(1000);
    s.zones = vec!["a".into(), "b".into(), "c".into()];
    let mut w = World::steady(s);
    assert_eq!(w.m.wanted().count(), 1000);
    w.m.set_desired(700);
    w.run_until(secs(30), |m| m.alive() == 700);
    let per = |z: &str| w.m.wanted().filter(|t| t.zone == z).count();
    let (a, b, c) = (per("a"), per("b"), per("c"));
    assert!(a.max(b).max(c) - a.min(b).min(c) <= 1, "{a} {b} {c}");
    assert_eq!(w.m.started_since(secs(0), StartReason::Unhealthy), 0);
}

#[test]
fn failures_within_the_grace_period_are_ignored() {
    let mut s = fast(2);
    s.health_check_grace = secs(30);
    let mut w = World::steady(s);
    let sick = w.wanted()[0].clone();
    w.refusing.insert(sick.clone());
    w.run(secs(15));
    assert_eq!(
        w.m.task(&sick).unwrap().target_state(),
        Some(TargetState::Unhealthy)
    );
    assert_eq!(w.m.started_since(secs(0), StartReason::Unhealthy), 0);
    assert!(w.m.task(&sick).unwrap().replacing.is_none());
    w.run_until(secs(30), |m| {
        m.started_since(secs(0), StartReason::Unhealthy) == 1
    });
}

#[test]
fn a_new_target_gets_no_connection_until_it_passes_its_checks() {
    let mut w = World::steady(fast(1));
    w.m.set_desired(2);
    let new = loop {
        w.tick();
        if let Some(t) =
            w.m.tasks
                .iter()
                .find(|t| t.target_state() == Some(TargetState::Initial))
        {
            break t.id.clone();
        }
        assert!(w.now() < secs(60));
    };
    assert!(w.m.routable().iter().all(|(id, _)| *id != new));
    w.run_until(secs(10), |m| {
        m.task(&new).unwrap().target_state() == Some(TargetState::Healthy)
    });
    assert!(w.m.routable().iter().any(|(id, _)| *id == new));
}
