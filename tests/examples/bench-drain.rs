//! Drain under load, with and without, on a simulated ECS service (`e2e::sim`): a
//! check every 30 s (the default), a target group health check every 5 s with an
//! unhealthy threshold of 2, the container health check every 30 s, a grace period of
//! 30 s, a deregistration delay of 20 s (`Settings::websocket`; the deployment files
//! now set 75 s, which only adds to each stop) and a stop timeout of 35 s, the
//! binary's own drain settings. ECS acts on both health checks.
//!
//! - scale-in: 3 tasks and 300 page-like clients, the desired count lowered to 1;
//! - deployment: 2 tasks and 200 clients, a new deployment.
//!
//! Each runs once with `DRAIN=off` (every task protected as long as it has a client,
//! as before) and once with the drain on, the clients connected for two minutes before
//! the change and the run going on for a minute after it. Reported: the time until the
//! service runs what it wants (or "not within" the limit), the longest any client went
//! without a server, the ECS API calls per task per minute, over the two steady
//! minutes and over every task's whole life, and, after the change, the tasks ECS
//! stopped for failing a health check and the tasks it started to replace them or to
//! rebalance zones. Loopback only; stops by itself within about twenty minutes.
//!
//! ```text
//! cargo build --release -p websocket -p e2e --bins --examples
//! cargo run --release -p e2e --example bench-drain
//! ```

use std::time::{Duration, Instant};

use e2e::crowd::Crowd;
use e2e::sim::{Model, SimConfig, Simulator, StartReason};

struct Outcome {
    done: Option<Duration>,
    longest_gap: Duration,
    steady_calls_per_task_minute: f64,
    calls_per_task_minute: f64,
    sigkills: u64,
    /// Tasks ECS stopped for failing a health check, after the change.
    unhealthy_stops: usize,
    /// Tasks ECS started after the change that the change did not ask for
    /// (replacements of unhealthy tasks, zone rebalancing).
    extra_starts: usize,
}

/// Before the change: clients connected, nothing happening.
const STEADY: Duration = Duration::from_secs(120);
/// After the service runs what it wants (or the limit).
const AFTER: Duration = Duration::from_secs(60);

fn total_calls(m: &Model) -> u64 {
    m.tasks
        .iter()
        .map(e2e::sim::model::Task::api_call_count)
        .sum()
}

fn config(desired: u32, drain: bool) -> SimConfig {
    SimConfig::websocket(desired).env([
        ("RUST_LOG", "warn"),
        ("DRAIN", if drain { "auto" } else { "off" }),
    ])
}

fn alive(m: &Model) -> usize {
    m.alive() as usize
}

/// ECS API calls per task per minute, over every task's life so far.
fn calls_per_task_minute(m: &Model) -> f64 {
    let now = m.now;
    let calls: u64 = m
        .tasks
        .iter()
        .map(e2e::sim::model::Task::api_call_count)
        .sum();
    let minutes: f64 = m
        .tasks
        .iter()
        .map(|t| (t.stopped_at.unwrap_or(now) - t.created_at).as_secs_f64() / 60.0)
        .sum();
    if minutes > 0.0 {
        calls as f64 / minutes
    } else {
        0.0
    }
}

async fn run(
    desired: u32,
    clients: usize,
    drain: bool,
    limit: Duration,
    change: impl FnOnce(&Simulator),
    done: impl Fn(&Model) -> bool,
) -> Outcome {
    let sim = Simulator::start(config(desired, drain)).await;
    let port = sim.balancer().map(e2e::sim::Balancer::port).unwrap_or(0);
    let crowd = Crowd::start(
        &format!("ws://127.0.0.1:{port}/"),
        clients,
        Duration::from_secs(5),
    );
    let settle = Instant::now();
    while crowd.connected() < clients && settle.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Steady: the clients stay, every task protected, the watchers asking.
    let (calls_before, tasks) = {
        let m = sim.model();
        (total_calls(&m), alive(&m))
    };
    tokio::time::sleep(STEADY).await;
    let steady_calls = total_calls(&sim.model()) - calls_before;
    let start = Instant::now();
    let changed_at = sim.now();
    change(&sim);
    let mut finished = None;
    while start.elapsed() < limit {
        if done(&sim.model()) {
            finished = Some(start.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(AFTER).await;
    let m = sim.model();
    Outcome {
        done: finished,
        longest_gap: crowd.longest_gap(),
        steady_calls_per_task_minute: steady_calls as f64
            / (tasks as f64 * STEADY.as_secs_f64() / 60.0),
        calls_per_task_minute: calls_per_task_minute(&m),
        sigkills: m.sigkills,
        unhealthy_stops: m
            .tasks
            .iter()
            .filter(|t| {
                t.stop
                    .as_ref()
                    .is_some_and(|s| s.at >= changed_at && s.reason.unhealthy())
            })
            .count(),
        extra_starts: m
            .tasks
            .iter()
            .filter(|t| {
                t.created_at >= changed_at
                    && matches!(
                        t.start_reason,
                        StartReason::Unhealthy | StartReason::Rebalancing
                    )
            })
            .count(),
    }
}

fn row(what: &str, drain: bool, limit: Duration, o: &Outcome) {
    let done = o.done.map_or_else(
        || format!("not within {} s", limit.as_secs()),
        |d| format!("{:.1} s", d.as_secs_f64()),
    );
    println!(
        "| {what} | {} | {done} | {:.1} s | {:.2} | {:.2} | {} | {} | {} |",
        if drain { "on" } else { "off" },
        o.longest_gap.as_secs_f64(),
        o.steady_calls_per_task_minute,
        o.calls_per_task_minute,
        o.sigkills,
        o.unhealthy_stops,
        o.extra_starts
    );
}

#[tokio::main]
async fn main() {
    println!(
        "| scenario | drain | until the service runs what it wants | longest gap a client saw | ECS API calls per task per minute, steady | the same, over every task's life | SIGKILLs | tasks stopped for failed health checks | replacements and rebalancing starts |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for drain in [false, true] {
        let limit = Duration::from_secs(120);
        let o = run(
            3,
            300,
            drain,
            limit,
            |sim| sim.set_desired(1),
            |m| alive(m) == 1,
        )
        .await;
        row("scale-in 3 → 1, 300 clients", drain, limit, &o);
    }
    for drain in [false, true] {
        let limit = Duration::from_secs(150);
        let o = run(
            2,
            200,
            drain,
            limit,
            |sim| {
                sim.deploy();
            },
            |m| m.live_deployments().count() == 1 && m.primary().completed() && alive(m) == 2,
        )
        .await;
        row("deployment of 2 tasks, 200 clients", drain, limit, &o);
    }
}
