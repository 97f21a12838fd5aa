//! The drain at fleet scale, on paused time: thousands of simulated tasks, each a real
//! drain watcher, sharing one decision per service, against the simulator's ECS API
//! and its account-wide token buckets (`e2e::sim::fleet`). What it costs the account,
//! what it leaves other callers, how long a scale-in takes, and no task flapping
//! while ECS throttles.

use std::time::Duration;

use e2e::sim::fleet::{Fleet, FleetConfig};
use e2e::sim::settings::OtherCaller;

/// The documented refill of the service read and cluster resource read buckets.
const REFILL: f64 = 20.0;

fn config(tasks: u32) -> FleetConfig {
    FleetConfig::three_zones(tasks)
}

/// Starts a fleet of `tasks` and waits until they all run.
async fn running(config: FleetConfig) -> Fleet {
    let tasks = config.ecs.desired;
    let fleet = Fleet::start(config);
    let took = fleet
        .wait_for(Duration::from_secs(3_600), |m| {
            m.running(None) == tasks && m.primary().completed()
        })
        .await;
    assert!(
        took.is_some(),
        "the fleet did not start: {} running",
        fleet.model().running(None)
    );
    fleet
}

/// The drain's calls a second by group over `window`.
async fn rates(fleet: &Fleet, window: Duration) -> Vec<(&'static str, f64)> {
    let before = fleet.calls_by_group();
    fleet.pass(window).await;
    let after = fleet.calls_by_group();
    after
        .iter()
        .map(|(group, n)| {
            let base = before.get(group).copied().unwrap_or(0);
            (*group, (n - base) as f64 / window.as_secs_f64())
        })
        .collect()
}

async fn steady_cost(tasks: u32) {
    let fleet = running(config(tasks)).await;
    // Past the start's own listings.
    fleet.pass(Duration::from_secs(600)).await;
    let rates = rates(&fleet, Duration::from_secs(1_800)).await;
    eprintln!("{tasks} tasks, steady: the drain's calls a second {rates:?}");
    for (group, rate) in rates {
        assert!(
            rate <= REFILL / 10.0,
            "{group}: {rate:.2} calls a second, over 10 % of the refill"
        );
    }
    assert_eq!(fleet.tally().left, 0);
}

#[tokio::test(start_paused = true)]
async fn a_thousand_tasks_at_rest_cost_under_a_tenth_of_each_bucket() {
    steady_cost(1_000).await;
}

#[tokio::test(start_paused = true)]
async fn five_thousand_tasks_at_rest_cost_under_a_tenth_of_each_bucket() {
    steady_cost(5_000).await;
}

#[tokio::test(start_paused = true)]
async fn a_scale_in_from_1000_to_700_ends_within_ten_minutes_and_others_are_served() {
    let mut config = config(1_000);
    // Other callers of the account: a deploy pipeline and a console, steadily, and a
    // burst now and then (CloudFormation reading a stack's services).
    config.ecs.throttling.others = vec![
        OtherCaller {
            name: "pipeline".into(),
            operation: "DescribeServices".into(),
            rate: 5.0,
            burst: Some((Duration::from_secs(60), 20)),
        },
        OtherCaller {
            name: "console".into(),
            operation: "DescribeTasks".into(),
            rate: 5.0,
            burst: Some((Duration::from_secs(60), 20)),
        },
    ];
    let fleet = running(config).await;
    fleet.pass(Duration::from_secs(120)).await;
    let before: Vec<(u64, u64)> = fleet
        .model()
        .buckets
        .other_counts
        .values()
        .map(|c| (c.calls, c.throttled))
        .collect();
    fleet.set_desired(700);
    let took = fleet
        .wait_for(Duration::from_secs(1_800), |m| {
            m.alive() == 700 && m.wanted().count() == 700
        })
        .await;
    let m = fleet.model();
    let (calls, throttled) = m
        .buckets
        .other_counts
        .values()
        .zip(&before)
        .fold((0, 0), |(c, t), (now, (c0, t0))| {
            (c + now.calls - c0, t + now.throttled - t0)
        });
    drop(m);
    let share = throttled as f64 / calls.max(1) as f64;
    eprintln!(
        "scale-in 1000 -> 700 took {took:?}; other callers: {throttled} of {calls} throttled; tally {:?}",
        fleet.tally()
    );
    let took = took.expect("the scale-in ended within 30 minutes");
    assert!(took <= Duration::from_secs(600), "took {took:?}");
    assert!(share < 0.01, "{share:.4} of other callers' calls throttled");
    let tally = fleet.tally();
    assert_eq!((tally.left, tally.flaps), (300, 0), "{tally:?}");
}

#[tokio::test(start_paused = true)]
async fn four_hours_with_forty_percent_of_calls_throttled_make_no_task_flap() {
    let mut config = config(1_000);
    config.throttle = 0.4;
    let fleet = running(config).await;
    fleet.set_desired(700);
    fleet.pass(Duration::from_secs(4 * 3_600)).await;
    let tally = fleet.tally();
    let counts = fleet.counts();
    eprintln!("four hours at 40 % throttled: {tally:?}; {counts:?}");
    // The scale-in happened through the drain (protection never lapsed by itself).
    assert_eq!(fleet.model().alive(), 700);
    assert_eq!(tally.left, 300, "{tally:?}");
    assert_eq!((tally.flaps, tally.recalled), (0, 0), "{tally:?}");
    assert!(
        counts.throttled * 10 >= counts.calls.values().sum::<u64>() * 3,
        "{counts:?}"
    );
}
