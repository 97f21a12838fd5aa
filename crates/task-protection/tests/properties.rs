//! A model-based check of the promise, over random holders, random agent faults and
//! random moments at which ECS applies each request.
//!
//! The scripted ECS keeps what it *applied* apart from what it *answered*: it can be
//! slow, apply a change and lose the answer, apply it and answer 504, answer 500
//! without applying, throttle, refuse, or be unreachable; and in half the cases it
//! applies each request at a random moment of its flight, up to the agent's budget
//! after it was sent, even after the client gave up, so an earlier request can land
//! after a later one. Holders come and go through both `acquire()` and `hold()`.
//! At every step, with no exception for faults:
//! - whenever `current()` says protected, or an `acquire()` has just returned Ok,
//!   ECS-side protection is on, and the last confirmed expiry has not passed;
//! - with no holder for longer than the stated bound (the linger bound, the spacing
//!   and the retry budget of a healthy agent, and the agent's budget for a request
//!   still landing), ECS-side protection is off (or a release is on the wire);
//! - never two requests in flight, never two PUTs within 1 s.
//!
//! Each case ends either with everyone leaving or with a shutdown while holders
//! remain; a shutdown returns within its budget, and when it reports the task
//! released (or never protected), ECS holds no protection once every request sent
//! has landed.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use support::{FakeEcs, Landing, Reply, settle, worker_settings};
use task_protection::{ProtectionGuard, ProtectionSettings, ShutdownReport, TaskProtection};
use tokio::time::{Instant, advance};

/// How long after it was sent a request may still land, in this fake.
const LANDING: Duration = task_protection::testing::AGENT_BUDGET;
/// How long the library waits before a request of the other kind.
const AGENT_CALL_BUDGET: Duration = Duration::from_secs(5);
/// The library's stated shutdown budget.
const SHUTDOWN_BUDGET: Duration = Duration::from_secs(6);

#[derive(Debug, Clone)]
enum Op {
    Hold,
    Acquire,
    Release,
    /// Let this much time pass.
    Wait(Duration),
    /// From now on the agent answers this way.
    Agent(Reply),
    /// From now on each answer takes this long.
    Latency(Duration),
}

fn reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        6 => Just(Reply::Ok),
        1 => Just(Reply::Throttled),
        1 => Just(Reply::Failure("DEPLOYMENT_BLOCKED")),
        1 => Just(Reply::Hang),
        1 => Just(Reply::HangUnapplied),
        1 => Just(Reply::AppliedThen504),
        1 => Just(Reply::Unapplied500),
        1 => Just(Reply::Refused),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Hold),
        2 => Just(Op::Acquire),
        4 => Just(Op::Release),
        3 => (1u64..2_000).prop_map(|ms| Op::Wait(Duration::from_millis(ms))),
        2 => (1u64..120).prop_map(|s| Op::Wait(Duration::from_secs(s))),
        3 => reply().prop_map(Op::Agent),
        1 => prop_oneof![Just(0u64), 1u64..3_000].prop_map(|ms| Op::Latency(Duration::from_millis(ms))),
    ]
}

/// What the checks found, from the test body or from an acquire that returned.
type Violations = Arc<Mutex<Vec<String>>>;

struct Run {
    ecs: FakeEcs,
    settings: ProtectionSettings,
    protection: TaskProtection,
    guards: Arc<Mutex<Vec<ProtectionGuard>>>,
    violations: Violations,
    /// Set when everyone leaves: an acquire that returns later lets go at once.
    closing: Arc<AtomicBool>,
    /// Since when nobody has held protection.
    idle_since: Option<Instant>,
    /// Since when the agent has answered promptly and well.
    healthy_since: Option<Instant>,
}

/// ECS-side facts a holder's promise rests on, as one line when one fails.
fn promise_broken(ecs: &FakeEcs, now: Instant) -> Option<String> {
    if !ecs.protected_at(now) {
        return Some(format!("ECS has no protection: {:?}", ecs.changes()));
    }
    if ecs.confirmed_expiry().is_none_or(|e| e <= now) {
        return Some(format!(
            "past the last confirmed expiry {:?}",
            ecs.confirmed_expiry()
        ));
    }
    None
}

impl Run {
    fn check(&mut self) -> Result<(), TestCaseError> {
        let now = Instant::now();
        if let Some(v) = self.violations.lock().unwrap().first() {
            return Err(TestCaseError::fail(format!("acquire returned Ok but {v}")));
        }
        let calls = self.ecs.calls();
        prop_assert!(self.ecs.max_in_flight() <= 1, "two requests in flight");
        for pair in calls.windows(2) {
            prop_assert!(
                pair[1].at - pair[0].at >= Duration::from_secs(1),
                "two PUTs within a second: {pair:?}"
            );
        }
        if self.protection.current().protected
            && let Some(broken) = promise_broken(&self.ecs, now)
        {
            return Err(TestCaseError::fail(format!(
                "current() says protected but {broken}"
            )));
        }
        let holders = self.protection.holders();
        if holders > 0 {
            self.idle_since = None;
        } else if self.idle_since.is_none() {
            self.idle_since = Some(now);
        }
        if let (Some(idle), Some(healthy)) = (self.idle_since, self.healthy_since) {
            let s = &self.settings;
            // The linger's bound, then a hung request times out, a pending backoff
            // runs out, the spacing, and a request of the other kind lands.
            let linger_bound = s.maintain_window().max(s.min_put_interval());
            let retry_budget = s.request_timeout() + s.check_interval() + s.min_put_interval();
            let due = (idle + linger_bound + s.min_put_interval()).max(healthy)
                + retry_budget
                + AGENT_CALL_BUDGET;
            let releasing = self.ecs.on_wire().is_some_and(|r| !r.enabled);
            if now > due && !releasing {
                prop_assert!(
                    !self.ecs.protected_at(now),
                    "idle since {:?} ago, agent healthy since {:?} ago, ECS still protected: {:?}",
                    now - idle,
                    now - healthy,
                    calls
                );
            }
        }
        Ok(())
    }

    /// Lets `d` pass in steps of at most 250 ms, checking at each.
    async fn pass(&mut self, d: Duration) -> Result<(), TestCaseError> {
        let step = Duration::from_millis(250);
        let mut left = d;
        while !left.is_zero() {
            let now = step.min(left);
            advance(now).await;
            settle().await;
            left -= now;
            self.check()?;
        }
        Ok(())
    }

    fn set_health(&mut self, healthy: bool) {
        if !healthy {
            self.healthy_since = None;
        } else if self.healthy_since.is_none() {
            self.healthy_since = Some(Instant::now());
        }
    }

    async fn apply(&mut self, op: Op) -> Result<(), TestCaseError> {
        match op {
            Op::Hold => self.guards.lock().unwrap().push(self.protection.hold()),
            Op::Acquire => {
                let p = self.protection.clone();
                let ecs = self.ecs.clone();
                let guards = Arc::clone(&self.guards);
                let violations = Arc::clone(&self.violations);
                let closing = Arc::clone(&self.closing);
                tokio::spawn(async move {
                    if let Ok(guard) = p.acquire().await {
                        if let Some(broken) = promise_broken(&ecs, Instant::now()) {
                            violations.lock().unwrap().push(broken);
                        }
                        if !closing.load(Ordering::SeqCst) {
                            guards.lock().unwrap().push(guard);
                        }
                    }
                });
            }
            Op::Release => {
                let mut guards = self.guards.lock().unwrap();
                if !guards.is_empty() {
                    drop(guards.remove(0));
                }
            }
            Op::Wait(d) => return self.pass(d).await,
            Op::Agent(reply) => {
                self.ecs.set_fallback(reply);
                let healthy = reply == Reply::Ok && self.ecs.latency().is_zero();
                self.set_health(healthy);
            }
            Op::Latency(latency) => {
                self.ecs.set_latency(latency);
                let healthy = latency.is_zero() && self.ecs.fallback() == Reply::Ok;
                self.set_health(healthy);
            }
        }
        settle().await;
        self.check()
    }

    /// Everyone leaves and the agent heals: the release must follow.
    async fn everyone_leaves(&mut self) -> Result<(), TestCaseError> {
        self.closing.store(true, Ordering::SeqCst);
        self.guards.lock().unwrap().clear();
        self.apply(Op::Agent(Reply::Ok)).await?;
        self.apply(Op::Latency(Duration::ZERO)).await?;
        let s = &self.settings;
        let tail = s.acquire_timeout()
            + s.maintain_window()
            + s.request_timeout()
            + s.check_interval()
            + AGENT_CALL_BUDGET
            + Duration::from_secs(3);
        self.pass(tail).await?;
        prop_assert!(
            !self.ecs.protected_at(Instant::now()),
            "still protected after everyone left: {:?}",
            self.ecs.calls()
        );
        Ok(())
    }

    /// Shuts down with holders left and the agent as it is.
    async fn shut_down(&mut self) -> Result<(), TestCaseError> {
        self.closing.store(true, Ordering::SeqCst);
        let start = Instant::now();
        let report = self.protection.shutdown().await;
        let took = start.elapsed();
        prop_assert!(took <= SHUTDOWN_BUDGET, "shutdown took {took:?}");
        self.guards.lock().unwrap().clear();
        // Every request sent has landed by now.
        advance(LANDING + Duration::from_millis(1)).await;
        settle().await;
        prop_assert!(!self.ecs.landing_pending());
        if matches!(
            report,
            ShutdownReport::Released | ShutdownReport::NotProtected
        ) {
            prop_assert!(
                !self.ecs.protected_at(Instant::now()),
                "shutdown said {report:?} but ECS holds protection: {:?} {:?}",
                self.ecs.calls(),
                self.ecs.changes()
            );
        }
        Ok(())
    }
}

fn run(
    ops: Vec<Op>,
    landing: Option<u64>,
    shutdown: bool,
    request_timeout: Duration,
) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    rt.block_on(async {
        let settings = worker_settings()
            .to_builder()
            .request_timeout(request_timeout)
            .build()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let ecs = FakeEcs::new();
        ecs.set_fallback(Reply::Ok);
        if let Some(seed) = landing {
            ecs.set_landing(Landing::Random { seed });
        }
        let mut run = Run {
            protection: TaskProtection::start(ecs.clone(), settings.clone()),
            settings,
            ecs,
            guards: Arc::default(),
            violations: Arc::default(),
            closing: Arc::default(),
            idle_since: None,
            healthy_since: Some(Instant::now()),
        };
        for op in ops {
            run.apply(op).await?;
        }
        if shutdown {
            run.shut_down().await
        } else {
            run.everyone_leaves().await
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 384, ..ProptestConfig::default() })]

    #[test]
    fn the_promise_holds_under_any_agent_answers(
        ops in prop::collection::vec(op(), 1..60),
        landing in prop::option::of(any::<u64>()),
        shutdown in any::<bool>(),
        // A client that gives up sooner than the agent's budget lets requests land
        // after it stopped waiting.
        timeout_secs in prop_oneof![Just(8u64), Just(1u64)],
    ) {
        run(ops, landing, shutdown, Duration::from_secs(timeout_secs))?;
    }
}

/// With a healthy agent, protection never lapses while held and is confirmed within
/// the 1 s spacing of a hold.
#[tokio::test(start_paused = true)]
async fn with_a_healthy_agent_a_hold_is_confirmed_at_once_and_never_lapses() {
    let ecs = FakeEcs::new();
    let p = TaskProtection::start(ecs.clone(), worker_settings());
    for round in 0..20u64 {
        let guard = p.hold();
        let held = Instant::now();
        while !ecs.protected_at(Instant::now()) {
            advance(Duration::from_millis(10)).await;
            settle().await;
            assert!(
                held.elapsed() <= Duration::from_millis(1_100),
                "round {round}"
            );
        }
        step(Duration::from_secs(30 + round * 7)).await;
        drop(guard);
        step(Duration::from_millis(round * 700)).await;
    }
    assert_eq!(ecs.lapses(), 0, "{:?}", ecs.calls());
}

/// Lets `d` pass in 250 ms steps, so timers fire on time.
async fn step(d: Duration) {
    let mut left = d;
    while !left.is_zero() {
        let now = left.min(Duration::from_millis(250));
        advance(now).await;
        settle().await;
        left -= now;
    }
}
