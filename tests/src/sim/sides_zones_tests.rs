//! Blue/green and task-set deployments, Availability Zones, container instances and
//! DAEMON scheduling, each checked in the test world.

use std::time::Duration;

use super::core_tests::fast;
use super::health::TargetGroupRole;
use super::model::{
    InstanceStatus, Model, Progress, Revision, Rollout, Stage, StartReason, StopReason,
};
use super::settings::{
    Controller, InstanceDraining, Launch, RebalancingWithProtection, Scheduling, Strategy,
};
use super::world::World;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn blue_green(desired: u32, bake: u64) -> World {
    let mut s = fast(desired);
    s.strategy = Strategy::BlueGreen {
        bake: secs(bake),
        stage: secs(1),
    };
    World::steady(s)
}

fn stage(m: &Model, id: &str) -> Option<Stage> {
    m.deployment(id).and_then(|d| d.stage).map(|(s, _)| s)
}

#[test]
fn blue_green_brings_green_to_100_percent_before_shifting_traffic_then_bakes_and_cleans_up() {
    let mut w = blue_green(2, 10);
    let blue_tasks = w.wanted();
    let green = w.m.deploy(Revision::default());
    let mut stages = Vec::new();
    let mut shifted_with = None;
    while !w.m.deployment(&green).unwrap().completed() {
        w.tick();
        assert!(w.now() < secs(200), "{:#?}", w.summary());
        let s = stage(&w.m, &green);
        if stages.last() != Some(&s) {
            stages.push(s);
        }
        // Production traffic goes to blue until the shift.
        let routable = w.m.routable();
        let to_green = routable
            .iter()
            .any(|(id, _)| w.m.task(id).unwrap().deployment == green);
        let shifted = s.is_some_and(|s| s >= Stage::ProductionTrafficShift);
        assert_eq!(to_green, shifted, "at {s:?}: {routable:?}");
        if shifted && shifted_with.is_none() {
            shifted_with = Some(
                w.m.wanted()
                    .filter(|t| t.deployment == green && w.m.is_healthy(t))
                    .count(),
            );
        }
        // Blue keeps every task until the clean-up.
        if s.is_some_and(|s| s < Stage::CleanUp) {
            assert!(blue_tasks.iter().all(|id| w.m.task(id).unwrap().wanted()));
        }
    }
    use Stage::*;
    let expected = [
        PreScaleUp,
        ScaleUp,
        PostScaleUp,
        TestTrafficShift,
        PostTestTrafficShift,
        ProductionTrafficShift,
        PostProductionTrafficShift,
        BakeTime,
        CleanUp,
    ];
    assert_eq!(
        stages,
        expected.iter().map(|s| Some(*s)).collect::<Vec<_>>()
    );
    assert_eq!(shifted_with, Some(2), "green at 100 % before the shift");
    assert_eq!(w.m.primary, green);
    assert_eq!(
        w.m.deployment(&green).unwrap().progress,
        Progress::Successful
    );
    assert!(blue_tasks.iter().all(|id| !w.m.task(id).unwrap().alive()));
}

#[test]
fn blue_green_clean_up_waits_for_protected_blue_tasks() {
    let mut w = blue_green(1, 2);
    let blue = w.wanted()[0].clone();
    w.protect(&blue);
    let green = w.m.deploy(Revision::default());
    w.run_until(secs(60), |m| stage(m, &green) == Some(Stage::CleanUp));
    w.run(secs(10));
    assert!(w.m.task(&blue).unwrap().wanted(), "{:#?}", w.summary());
    assert!(!w.m.deployment(&green).unwrap().completed());
    w.release(&blue);
    w.run_until(secs(10), |m| m.deployment(&green).unwrap().completed());
}

#[test]
fn a_blue_green_rollback_during_bake_time_moves_traffic_back_and_stops_green() {
    let mut w = blue_green(2, 60);
    let blue = w.m.primary.clone();
    let blue_tasks = w.wanted();
    let green = w.m.deploy(Revision::default());
    w.run_until(secs(60), |m| stage(m, &green) == Some(Stage::BakeTime));
    assert!(w.m.roll_back());
    assert_eq!(w.m.primary, blue);
    assert!(w.m.routable().iter().all(|(id, _)| blue_tasks.contains(id)));
    let t = w.m.task(&blue_tasks[0]).unwrap();
    assert_eq!(
        t.target.as_ref().unwrap().group,
        TargetGroupRole::Production
    );
    w.run_until(secs(30), |m| {
        m.deployment(&green).unwrap().progress == Progress::RollbackSuccessful
    });
    assert!(
        w.m.tasks
            .iter()
            .filter(|t| t.deployment == green)
            .all(|t| !t.alive())
    );
    assert_eq!(w.wanted(), blue_tasks);
}

#[test]
fn a_code_deploy_task_set_becomes_primary_when_traffic_shifts() {
    let mut s = fast(1);
    s.controller = Controller::CodeDeploy;
    let mut w = World::steady(s);
    let original = w.m.primary.clone();
    let replacement = w.m.deploy(Revision::default());
    assert_eq!(w.m.primary, original);
    w.run_until(secs(60), |m| {
        stage(m, &replacement) >= Some(Stage::ProductionTrafficShift)
    });
    assert_eq!(w.m.primary, replacement);
    w.run_until(secs(60), |m| {
        m.deployment(&replacement).unwrap().completed()
    });
}

#[test]
fn tasks_spread_over_zones_and_scale_in_keeps_them_balanced() {
    let mut s = fast(4);
    s.zones = vec!["a".into(), "b".into()];
    let mut w = World::steady(s);
    let per = |m: &Model, z: &str| m.wanted().filter(|t| t.zone == z).count();
    assert_eq!((per(&w.m, "a"), per(&w.m, "b")), (2, 2));
    w.m.set_desired(2);
    w.run_until(secs(20), |m| m.alive() == 2);
    assert_eq!((per(&w.m, "a"), per(&w.m, "b")), (1, 1));
}

#[test]
fn rebalancing_starts_in_the_under_served_zone_then_stops_an_unprotected_task() {
    let mut s = fast(2);
    s.zones = vec!["a".into(), "b".into()];
    let mut w = World::steady(s);
    // Both tasks end up in zone a (as after a drain picked by age, or an outage).
    let ids = w.wanted();
    for id in &ids {
        w.m.task_mut(id).unwrap().zone = "a".into();
    }
    w.run_until(secs(20), |m| {
        m.wanted().filter(|t| t.zone == "b").count() == 1
            && m.wanted().count() == 2
            && m.wanted().all(|t| m.is_healthy(t))
    });
    assert_eq!(w.m.started_since(secs(0), StartReason::Rebalancing), 1);
    let stopped: Vec<_> = ids
        .iter()
        .filter(|id| !w.m.task(id).unwrap().wanted())
        .collect();
    assert_eq!(stopped.len(), 1);
    assert_eq!(
        w.m.task(stopped[0]).unwrap().stop.as_ref().unwrap().reason,
        StopReason::Rebalancing
    );
}

#[test]
fn rebalancing_with_every_candidate_protected_checks_first_or_starts_anyway_as_set() {
    for (mode, starts) in [
        (RebalancingWithProtection::ChecksFirst, false),
        (RebalancingWithProtection::StartsAnyway, true),
    ] {
        let mut s = fast(2);
        s.zones = vec!["a".into(), "b".into()];
        s.unknowns.rebalancing_with_protection = mode;
        let mut w = World::steady(s);
        for id in w.wanted() {
            w.m.task_mut(&id).unwrap().zone = "a".into();
            w.protect(&id);
        }
        w.run(secs(10));
        // Starting anyway, the started task is the surplus scale-in stops, and
        // rebalancing tries again: a loop, for as long as the protection lasts.
        let started = w.m.started_since(secs(0), StartReason::Rebalancing);
        assert_eq!(started > 0, starts, "{mode:?}: {started}");
        // Nothing protected is stopped either way.
        assert!(w.m.wanted().filter(|t| t.zone == "a").count() == 2);
    }
}

#[test]
fn no_rebalancing_at_maximum_percent_100() {
    let mut s = fast(2);
    s.maximum_percent = 100;
    s.minimum_healthy_percent = 50;
    s.zones = vec!["a".into(), "b".into()];
    let mut w = World::steady(s);
    for id in w.wanted() {
        w.m.task_mut(&id).unwrap().zone = "a".into();
    }
    w.run(secs(10));
    assert_eq!(w.m.started_since(secs(0), StartReason::Rebalancing), 0);
}

fn on_ec2(instances_per_zone: u32) -> World {
    let mut s = fast(2);
    s.zones = vec!["a".into(), "b".into()];
    s.launch = Launch::Ec2 { instances_per_zone };
    World::steady(s)
}

#[test]
fn a_draining_instance_s_tasks_are_replaced_first_then_stopped() {
    let mut w = on_ec2(2);
    let t = w.m.wanted().next().unwrap().clone();
    let instance = t.instance.clone().unwrap();
    w.protect(&t.id);
    assert!(w.m.drain_instance(&instance));
    w.run_until(secs(20), |m| !m.task(&t.id).unwrap().wanted());
    assert_eq!(w.m.started_since(secs(0), StartReason::InstanceDraining), 1);
    assert!(
        w.m.wanted()
            .all(|x| x.instance.as_deref() != Some(instance.as_str()))
    );
    assert_eq!(w.m.wanted().count(), 2);
}

#[test]
fn protected_tasks_on_a_draining_instance_wait_when_set_to() {
    let mut w = on_ec2(2);
    w.m.settings.unknowns.instance_draining = InstanceDraining::WaitsForProtection;
    let t = w.m.wanted().next().unwrap().clone();
    w.protect(&t.id);
    w.m.drain_instance(t.instance.as_deref().unwrap());
    w.run(secs(20));
    assert!(w.m.task(&t.id).unwrap().wanted());
    w.release(&t.id);
    w.run_until(secs(20), |m| !m.task(&t.id).unwrap().wanted());
}

#[test]
fn daemon_runs_one_task_per_instance_and_deploys_instance_by_instance() {
    let mut s = fast(0);
    s.zones = vec!["a".into(), "b".into()];
    s.launch = Launch::Ec2 {
        instances_per_zone: 2,
    };
    s.scheduling = Scheduling::Daemon;
    s.maximum_percent = 100;
    s.minimum_healthy_percent = 50;
    let mut w = World::steady(s);
    assert_eq!((w.m.desired, w.m.wanted().count()), (4, 4));
    let new = w.m.deploy(Revision::default());
    w.run_checking(secs(60), |m| {
        let per_instance = m.instances.iter().all(|i| {
            m.wanted()
                .filter(|t| t.instance.as_deref() == Some(&i.arn))
                .count()
                <= 1
        });
        let healthy = m.wanted().filter(|t| m.is_healthy(t)).count();
        if !per_instance {
            return Err("two tasks on one instance".into());
        }
        if healthy < 2 {
            return Err(format!("{healthy} healthy"));
        }
        Ok(())
    });
    assert_eq!(w.m.primary, new);
    assert!(w.m.primary().completed(), "{:#?}", w.summary());
    // Draining an instance stops its daemon task, and none replaces it.
    let arn = w.m.instances[0].arn.clone();
    w.m.drain_instance(&arn);
    w.run(secs(10));
    assert_eq!(w.m.desired, 3);
    assert!(
        w.m.wanted()
            .all(|t| t.instance.as_deref() != Some(arn.as_str()))
    );
    assert_eq!(w.m.instances[0].status, InstanceStatus::Draining);
}

#[test]
fn other_callers_share_the_buckets_with_the_tasks() {
    let mut s = fast(1);
    s.throttling.others.push(super::settings::OtherCaller {
        name: "pipeline".into(),
        operation: "DescribeServices".into(),
        rate: 25.0,
        burst: None,
    });
    let mut w = World::steady(s);
    // 25 a second against a refill of 20: the first 100 tokens last 20 s, then one
    // call in five is refused.
    w.run(secs(25));
    let before = w.m.buckets.other_counts["pipeline"].clone();
    w.run(secs(20));
    let after = w.m.buckets.other_counts["pipeline"].clone();
    let (calls, throttled) = (
        after.calls - before.calls,
        after.throttled - before.throttled,
    );
    assert!((495..=505).contains(&calls), "{calls}");
    assert!((95..=105).contains(&throttled), "{throttled}");
    assert_eq!(w.m.primary().rollout, Rollout::Completed);
}

#[test]
fn one_task_over_two_zones_is_balanced() {
    let mut s = fast(1);
    s.zones = vec!["a".into(), "b".into()];
    let mut w = World::steady(s);
    w.run(secs(10));
    assert_eq!(w.m.started_since(secs(0), StartReason::Rebalancing), 0);
    assert_eq!(w.m.tasks.len(), 1);
}

#[test]
fn a_blue_green_deployment_stopped_by_a_newer_one_before_its_shift_winds_down() {
    let mut w = blue_green(1, 30);
    let first_green = w.m.deploy(Revision::default());
    w.run_until(secs(30), |m| {
        stage(m, &first_green) == Some(Stage::PostScaleUp)
    });
    let second_green = w.m.deploy(Revision::default());
    w.run_until(secs(60), |m| m.deployment(&first_green).unwrap().inactive);
    assert!(
        w.m.tasks
            .iter()
            .filter(|t| t.deployment == first_green)
            .all(|t| !t.alive())
    );
    assert_eq!(
        w.m.deployment(&first_green).unwrap().progress,
        Progress::Stopped
    );
    w.run_until(secs(120), |m| {
        m.deployment(&second_green).unwrap().completed()
    });
}
