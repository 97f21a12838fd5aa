//! What the drain costs the account at 10, 100, 1,000 and 5,000 tasks, on the
//! simulator's core in virtual time (`e2e::sim::fleet`): every task a real drain
//! watcher, one decision per service shared through an in-process store as the tasks
//! share a DynamoDB table, the ECS API with the account's documented token buckets.
//!
//! For each size: the drain's ECS calls a second by bucket, at rest (30 minutes after
//! ten minutes of warm-up) and during a scale-in of 30 % (from the change until the
//! service runs what it wants), as a share of the bucket's refill (20 a second), and
//! the reads of the shared record a second (DynamoDB, not ECS). Beside them, what the
//! per-task watcher this replaced would have cost by its schedule: one
//! `DescribeServices` per task per 30 s at rest, and, when the counts change, each
//! task listing the service (`ListTasks` and `DescribeTasks`, one call per 100 tasks
//! each). Runs in about five minutes of real time; no network.
//!
//! ```text
//! cargo run --release -p e2e --example bench-fleet
//! ```

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use e2e::sim::fleet::{Fleet, FleetConfig};

const SERVICE_READS: &str = "Service read actions";
const CLUSTER_READS: &str = "Cluster resource read actions";
const REFILL: f64 = 20.0;

fn config(tasks: u32) -> FleetConfig {
    FleetConfig::three_zones(tasks)
}

fn rate(
    before: &BTreeMap<&'static str, u64>,
    after: &BTreeMap<&'static str, u64>,
    group: &str,
    over: Duration,
) -> f64 {
    let n = after.get(group).copied().unwrap_or(0) - before.get(group).copied().unwrap_or(0);
    n as f64 / over.as_secs_f64().max(1.0)
}

struct Row {
    tasks: u32,
    rest: (f64, f64),
    scale: (f64, f64),
    scale_took: Option<Duration>,
    reads: f64,
}

async fn measure(tasks: u32) -> Row {
    let fleet = Fleet::start(config(tasks));
    fleet
        .wait_for(Duration::from_secs(7_200), |m| {
            m.running(None) == tasks && m.primary().completed()
        })
        .await
        .expect("the fleet starts");
    fleet.pass(Duration::from_secs(600)).await;
    let window = Duration::from_secs(1_800);
    let before = fleet.calls_by_group();
    fleet.pass(window).await;
    let after = fleet.calls_by_group();
    let rest = (
        rate(&before, &after, SERVICE_READS, window),
        rate(&before, &after, CLUSTER_READS, window),
    );
    let target = tasks - tasks * 3 / 10;
    let start = fleet.now();
    let before = fleet.calls_by_group();
    fleet.set_desired(target);
    let scale_took = fleet
        .wait_for(Duration::from_secs(3_600), |m| {
            m.alive() == target && m.wanted().count() == target as usize
        })
        .await;
    let over = fleet.now() - start;
    let after = fleet.calls_by_group();
    let scale = (
        rate(&before, &after, SERVICE_READS, over),
        rate(&before, &after, CLUSTER_READS, over),
    );
    Row {
        tasks,
        rest,
        scale,
        scale_took,
        // Every task reads the record every DRAIN_CHECK_SECONDS / 3, jittered.
        reads: f64::from(tasks) / 10.0,
    }
}

fn pct(rate: f64) -> String {
    format!("{rate:.3}/s ({:.2} %)", rate / REFILL * 100.0)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("a runtime");
    println!(
        "| tasks | at rest: service reads | at rest: cluster reads | scale-in of 30 %: service reads | scale-in: cluster reads | scale-in took | record reads (DynamoDB) | per-task watcher at rest | per-task watcher at a change |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for tasks in [10, 100, 1_000, 5_000] {
        let started = Instant::now();
        let row = runtime.block_on(measure(tasks));
        let n = f64::from(row.tasks);
        let per_task_rest = n / 30.0;
        let per_task_change = n * 2.0 * (n / 100.0).ceil();
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.1}/s | {} | {per_task_change:.0} calls at once |",
            row.tasks,
            pct(row.rest.0),
            pct(row.rest.1),
            pct(row.scale.0),
            pct(row.scale.1),
            row.scale_took.map_or_else(
                || "not within an hour".to_owned(),
                |d| format!("{} s", d.as_secs())
            ),
            row.reads,
            pct(per_task_rest),
        );
        eprintln!("({tasks} tasks simulated in {:.0?})", started.elapsed());
    }
}
