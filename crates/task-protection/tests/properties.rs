//! Properties of the state machine over random holder churn, passing time and agent
//! answers, on paused time against the in-process ECS.

mod support;

use std::time::Duration;

use proptest::prelude::*;
use support::{FakeEcs, Reply, settle, worker_settings};
use task_protection::TaskProtection;
use tokio::time::{Instant, advance};

#[derive(Debug, Clone)]
enum Op {
    Hold,
    Release,
    /// Let this much time pass.
    Wait(Duration),
    /// From now on the agent answers this way.
    Agent(Reply),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Hold),
        3 => Just(Op::Release),
        3 => (1u64..2_000).prop_map(|ms| Op::Wait(Duration::from_millis(ms))),
        2 => (1u64..120).prop_map(|s| Op::Wait(Duration::from_secs(s))),
        2 => prop_oneof![
            3 => Just(Reply::Ok),
            1 => Just(Reply::Throttled),
            1 => Just(Reply::Failure("DEPLOYMENT_BLOCKED")),
            1 => Just(Reply::Hang),
        ]
        .prop_map(Op::Agent),
    ]
}

struct Run {
    ecs: FakeEcs,
    protection: TaskProtection,
    guards: Vec<task_protection::ProtectionGuard>,
    /// When the holder count last went from zero to one.
    held_since: Option<Instant>,
    healthy_throughout: bool,
}

impl Run {
    fn check(&self) -> Result<(), TestCaseError> {
        let calls = self.ecs.calls();
        prop_assert!(self.ecs.lock().max_in_flight <= 1, "two requests in flight");
        for pair in calls.windows(2) {
            prop_assert!(
                pair[1].at - pair[0].at >= Duration::from_secs(1),
                "two PUTs within a second: {pair:?}"
            );
        }
        if self.healthy_throughout {
            prop_assert_eq!(
                self.ecs.lock().lapses,
                0,
                "protection ran out while held: {:?}",
                calls
            );
        }
        if self.healthy_throughout
            && let Some(since) = self.held_since
        {
            // The enable waits at most the 1 s spacing after a disable.
            if since.elapsed() > Duration::from_millis(1_100) {
                prop_assert!(
                    self.ecs.ecs_protected(Instant::now()),
                    "held for {:?} but ECS has no protection: {calls:?}",
                    since.elapsed()
                );
            }
        }
        Ok(())
    }

    /// Lets `d` pass in steps of at most 250 ms, checking the properties at each.
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

    async fn apply(&mut self, op: Op) -> Result<(), TestCaseError> {
        match op {
            Op::Hold => {
                if self.guards.is_empty() {
                    self.held_since = Some(Instant::now());
                }
                self.guards.push(self.protection.hold());
            }
            Op::Release => {
                self.guards.pop();
                if self.guards.is_empty() {
                    self.held_since = None;
                }
            }
            Op::Wait(d) => return self.pass(d).await,
            Op::Agent(reply) => {
                if self.healthy_throughout {
                    return Ok(());
                }
                self.ecs.always(reply);
            }
        }
        settle().await;
        self.check()
    }
}

fn run(ops: Vec<Op>, healthy_throughout: bool) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    rt.block_on(async {
        let settings = worker_settings();
        let ecs = FakeEcs::new();
        let mut run = Run {
            protection: TaskProtection::start(ecs.clone(), settings.clone()),
            ecs,
            guards: Vec::new(),
            held_since: None,
            healthy_throughout,
        };
        for op in ops {
            run.apply(op).await?;
        }
        // All holders leave and the agent is healthy: protection must be off by the
        // end of the maintain window plus one request (plus, after failures, the
        // request timeout and one backoff that may still be pending).
        run.guards.clear();
        run.held_since = None;
        run.ecs.always(Reply::Ok);
        settle().await;
        let bound = if healthy_throughout {
            settings.maintain_window() + Duration::from_millis(1)
        } else {
            settings.maintain_window()
                + settings.request_timeout()
                + settings.check_interval()
                + settings.min_put_interval()
                + Duration::from_millis(1)
        };
        run.pass(bound).await?;
        prop_assert!(
            !run.ecs.ecs_protected(Instant::now()),
            "still protected {bound:?} after the last release: {:?}",
            run.ecs.calls()
        );
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn with_a_healthy_agent_protection_follows_the_holders(ops in prop::collection::vec(op(), 1..60)) {
        run(ops, true)?;
    }

    #[test]
    fn with_any_agent_answers_the_limits_hold_and_protection_ends(ops in prop::collection::vec(op(), 1..60)) {
        run(ops, false)?;
    }
}
