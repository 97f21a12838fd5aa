//! The watcher, one per task: reads its service's record, makes the next decision
//! when it is due and nobody else has claimed it, and publishes this task's
//! membership.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;

use super::api::{ApiError, ServiceApi};
use super::decide::{Rules, decide};
use super::facts::ServiceFacts;
use super::gather::{Ask, gather, listing_calls, too_large};
use super::record::{Record, SCHEMA, millis, time};
use super::store::{StoreError, VerdictStore};
use super::{DrainSettings, LeaveReason, Membership};

/// The longest wait between decisions while ECS throttles, in check intervals.
const THROTTLED_MAX_FACTOR: u32 = 8;
/// A listing older than this many check intervals is made again.
const RELIST_AFTER_CHECKS: u32 = 10;
/// Each task deciding for itself lists at most this many tasks; larger services share
/// one decision through a table.
pub(super) const LOCAL_LIST_LIMIT: usize = 50;
/// Each task deciding for itself stretches its interval by one check interval per this
/// many tasks, so that the service's calls stay about the same whatever its size.
const LOCAL_TASKS_PER_INTERVAL: u32 = 10;

/// This task.
#[derive(Debug, Clone)]
pub(super) struct Me {
    pub(super) cluster: String,
    pub(super) service: String,
    /// The task's id, the last part of its ARN.
    pub(super) id: String,
}

/// The wall clock the drain reads: the system's at creation, then moving with tokio's
/// time, so that records age in a test or simulation on paused time too. Watchers
/// simulated in one process share one, so that their clocks agree.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    wall: SystemTime,
    at: Instant,
}

impl Clock {
    /// The system's wall clock now, moving on with tokio's time.
    #[must_use]
    pub fn new() -> Self {
        Self {
            wall: SystemTime::now(),
            at: Instant::now(),
        }
    }

    /// The time now.
    #[must_use]
    pub fn now(&self) -> SystemTime {
        self.wall + self.at.elapsed()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// A wait of `interval` times a random factor in 0.5..1.5: tasks that started together
/// spread their calls instead of asking at the same moment.
fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(rand::random_range(0.5..1.5))
}

/// What the watcher publishes.
#[derive(Debug)]
pub(super) struct Outputs {
    pub(super) membership: watch::Sender<Membership>,
    pub(super) on: watch::Sender<bool>,
}

pub(super) struct Watcher<A, S> {
    api: A,
    store: S,
    me: Me,
    settings: DrainSettings,
    out: Outputs,
    clock: Clock,
    /// One warning per kind of trouble, until it ends.
    warned_store: bool,
    warned_unreadable: bool,
    warned_size: bool,
}

enum Step {
    /// Wait this long, then look again.
    Again(Duration),
    /// The drain is off for good.
    Off,
}

impl<A: ServiceApi, S: VerdictStore> Watcher<A, S> {
    pub(super) fn new(
        api: A,
        store: S,
        me: Me,
        settings: DrainSettings,
        out: Outputs,
        clock: Clock,
    ) -> Self {
        Self {
            api,
            store,
            me,
            settings,
            out,
            clock,
            warned_store: false,
            warned_unreadable: false,
            warned_size: false,
        }
    }

    /// How often a task reads a shared record.
    fn read_interval(&self) -> Duration {
        (self.settings.check_interval() / 3).max(Duration::from_secs(1))
    }

    /// Runs until every receiver is gone, or the drain turns off.
    pub(super) async fn run(mut self) {
        // The first look at a random point of the first interval.
        let first = if self.store.shared() {
            self.read_interval()
        } else {
            self.settings.check_interval()
        };
        let mut wait = first.mul_f64(rand::random_range(0.0..1.0));
        loop {
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.out.membership.closed() => return,
            }
            match self.step().await {
                Step::Again(next) => wait = next,
                Step::Off => return,
            }
        }
    }

    async fn step(&mut self) -> Step {
        let now = self.clock.now();
        let stored = match self.store.read().await {
            Ok(stored) => {
                self.warned_store = false;
                stored
            }
            Err(e) => return self.store_failed(&e),
        };
        let version = stored.as_ref().map_or(0, |s| s.version);
        let mut current = match stored.as_ref().map(|s| s.record.clone()) {
            Some(Ok(record)) => {
                self.warned_unreadable = false;
                Some(record)
            }
            Some(Err(why)) => {
                if !self.warned_unreadable {
                    self.warned_unreadable = true;
                    tracing::warn!(
                        "The drain's record cannot be read ({why}); keeping the last answer"
                    );
                }
                None
            }
            None => None,
        };
        let due = current.as_ref().is_none_or(|r| r.due(now))
            && stored.as_ref().is_none_or(|s| s.claim_free(millis(now)));
        if due {
            let claim_until = now + self.claim_ttl();
            match self
                .store
                .claim(version, &self.me.id, millis(now), millis(claim_until))
                .await
            {
                Ok(true) => {
                    let first;
                    let base = match &current {
                        Some(record) => record.as_ref(),
                        None => {
                            first = Record::first(now);
                            &first
                        }
                    };
                    let Some(next) = self.decide(base, now).await else {
                        return Step::Off;
                    };
                    match self.store.publish(version, &self.me.id, &next).await {
                        Ok(true) => current = Some(Arc::new(next)),
                        // Someone else decided meanwhile: theirs stands.
                        Ok(false) => {}
                        Err(e) => return self.store_failed(&e),
                    }
                }
                Ok(false) => {}
                Err(e) => return self.store_failed(&e),
            }
        }
        if let Some(record) = &current
            && !self.apply(record)
        {
            return Step::Off;
        }
        Step::Again(self.next_wait(current.as_ref(), now))
    }

    fn store_failed(&mut self, e: &StoreError) -> Step {
        match e {
            StoreError::Unusable(why) => {
                tracing::warn!(
                    "Drain is off: its table cannot be used ({why}); check DRAIN_TABLE and \
                     grant dynamodb:GetItem, dynamodb:UpdateItem and dynamodb:PutItem on it"
                );
                self.turn_off();
                Step::Off
            }
            StoreError::Unavailable(why) => {
                if !self.warned_store {
                    self.warned_store = true;
                    tracing::warn!(
                        "The drain's table does not answer ({why}); keeping the last answer ({})",
                        *self.out.membership.borrow()
                    );
                }
                Step::Again(jittered(self.read_interval()))
            }
        }
    }

    /// How long a claim holds: long enough for a decision's calls (a paced listing of
    /// 5,000 tasks takes about 25 s).
    fn claim_ttl(&self) -> Duration {
        (self.settings.check_interval() * 2).max(Duration::from_secs(120))
    }

    /// When to look next.
    fn next_wait(&self, record: Option<&Arc<Record>>, now: SystemTime) -> Duration {
        if self.store.shared() {
            return jittered(self.read_interval());
        }
        record
            .and_then(|r| time(r.due_at).duration_since(now).ok())
            .unwrap_or(Duration::ZERO)
            .max(Duration::from_millis(100))
    }

    /// The wait before the next decision.
    fn interval(&self, service: &ServiceFacts, busy: bool) -> Duration {
        let base = self.settings.check_interval();
        if self.store.shared() {
            // One decision serves the whole service: decide sooner while it moves, but
            // list no more than about one call a second on average.
            if busy {
                (base / 3).max(Duration::from_secs(1) * listing_calls(service))
            } else {
                base
            }
        } else {
            let size = (service.running + service.pending).max(service.desired);
            jittered(base * size.div_ceil(LOCAL_TASKS_PER_INTERVAL).max(1))
        }
    }

    /// Asks ECS and decides; `None` when the task role may not ask.
    async fn decide(&mut self, prev: &Record, now: SystemTime) -> Option<Record> {
        let check = self.settings.check_interval();
        let ask = Ask {
            cluster: &self.me.cluster,
            service: &self.me.service,
            call_timeout: self.settings.call_timeout(),
            relist_after: check * RELIST_AFTER_CHECKS,
            list_limit: (!self.store.shared()).then_some(LOCAL_LIST_LIMIT),
        };
        match gather(&self.api, ask, prev, now).await {
            Ok(facts) => {
                if too_large(&facts.service, ask.list_limit) && !self.warned_size {
                    self.warned_size = true;
                    tracing::warn!(
                        "The service runs more than {LOCAL_LIST_LIMIT} tasks: each task deciding \
                         for itself would list them all, so this task no longer lists them and \
                         leaves only when its own deployment is replaced. Set DRAIN_TABLE so that \
                         one decision serves every task"
                    );
                }
                let rules = Rules {
                    settle: self.settings.settle(),
                };
                let decision = decide(&facts, prev, &rules, now);
                let wait = self.interval(&facts.service, decision.busy);
                Some(Record {
                    schema: SCHEMA,
                    decided_at: millis(now),
                    due_at: millis(now + wait),
                    verdict: decision.verdict,
                    memory: decision.memory,
                    throttled: 0,
                })
            }
            Err(ApiError::Denied(why)) => {
                tracing::warn!(
                    "Drain is off: the task role may not ask ECS about its service ({why}); \
                     grant ecs:DescribeServices, ecs:ListTasks and ecs:DescribeTasks to turn it on"
                );
                self.turn_off();
                None
            }
            Err(ApiError::Throttled(why)) => {
                let throttled = prev.throttled.saturating_add(1);
                let factor = 2u32.saturating_pow(throttled).min(THROTTLED_MAX_FACTOR);
                let wait = jittered(check * factor);
                tracing::warn!(
                    "Drain check throttled by ECS ({why}); keeping the last answer, next check in {:.0}s",
                    wait.as_secs_f64()
                );
                Some(Record {
                    due_at: millis(now + wait),
                    throttled,
                    ..prev.clone()
                })
            }
            Err(e) => {
                tracing::warn!(
                    "Drain check failed, keeping the last answer ({}): {e}",
                    *self.out.membership.borrow()
                );
                Some(Record {
                    due_at: millis(now + jittered(check)),
                    ..prev.clone()
                })
            }
        }
    }

    /// Publishes what `record` says of this task; `false` when it turns the drain off.
    fn apply(&mut self, record: &Record) -> bool {
        if let Some(why) = record.off() {
            tracing::info!("Drain is off for this service: {why}");
            self.turn_off();
            return false;
        }
        if let Some(membership) = record.membership_of(&self.me.id) {
            self.publish(membership);
        }
        true
    }

    fn turn_off(&self) {
        self.publish(Membership::Wanted);
        self.out.on.send_replace(false);
    }

    fn publish(&self, membership: Membership) {
        self.out.membership.send_if_modified(|m| {
            // ECS is stopping this task: nothing brings it back.
            if *m == membership || *m == Membership::Leaving(LeaveReason::Stopping) {
                return false;
            }
            match &membership {
                Membership::Leaving(reason) => {
                    tracing::warn!(reason = %reason, "Leaving the service: {reason}");
                }
                Membership::Wanted => tracing::info!("Wanted by the service again"),
            }
            *m = membership;
            true
        });
        let leaving = self.out.membership.borrow().is_leaving();
        ::metrics::gauge!(crate::metrics::DRAIN_LEAVING).set(if leaving { 1.0 } else { 0.0 });
    }
}
