//! The watcher: asks ECS every check interval, with jitter, whether the service
//! still wants this task, and publishes the answer.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::api::{ApiError, ServiceApi};
use super::decide::{Decision, ServiceView, TaskInfo, TaskView, decide, decide_with_tasks};
use super::{DrainSettings, Membership};

/// How many check intervals a "leaving" verdict is kept without a fresh answer: a
/// task never leaves on doubt.
const STALE_AFTER_CHECKS: u32 = 3;
/// The longest wait between checks while ECS throttles, in check intervals.
const THROTTLED_MAX_FACTOR: u32 = 8;
/// How many checks a task list is reused while the service looks the same.
const LIST_REUSE_CHECKS: u32 = 10;

/// One check's result.
enum Checked {
    Membership(Membership),
    Failed(ApiError),
}

pub(super) struct Watcher<A> {
    pub(super) api: A,
    pub(super) me: TaskInfo,
    pub(super) settings: DrainSettings,
    pub(super) tx: watch::Sender<Membership>,
    /// The task list of the last surplus, with the service view it was listed for.
    listed: Option<(ServiceView, Vec<TaskView>, u32)>,
}

/// The same service with fewer tasks running: only stops happened.
fn fewer_running(before: &ServiceView, now: &ServiceView) -> bool {
    let ids = |s: &ServiceView| {
        s.deployments
            .iter()
            .map(|d| (d.id.clone(), d.primary, d.desired))
            .collect::<Vec<_>>()
    };
    now.desired == before.desired && now.running < before.running && ids(now) == ids(before)
}

/// A wait of `interval` times a random factor in 0.5..1.5: tasks that started together
/// spread their calls instead of asking ECS at the same moment.
fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(rand::random_range(0.5..1.5))
}

impl<A: ServiceApi> Watcher<A> {
    pub(super) fn new(
        api: A,
        me: TaskInfo,
        settings: DrainSettings,
        tx: watch::Sender<Membership>,
    ) -> Self {
        Self {
            api,
            me,
            settings,
            tx,
            listed: None,
        }
    }

    /// Runs until every receiver is gone, or ECS denies the calls.
    pub(super) async fn run(mut self) {
        let interval = self.settings.check_interval;
        // The first check at a random point of the first interval.
        let mut wait = interval.mul_f64(rand::random_range(0.0..1.0));
        let mut last_answer = Instant::now();
        let mut throttled = 0u32;
        loop {
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.tx.closed() => return,
            }
            wait = jittered(interval);
            match self.check().await {
                Checked::Membership(membership) => {
                    last_answer = Instant::now();
                    throttled = 0;
                    self.publish(membership);
                }
                Checked::Failed(ApiError::Denied(why)) => {
                    tracing::warn!(
                        "Drain is off: the task role may not ask ECS about its service ({why}); \
                         grant ecs:DescribeServices, ecs:ListTasks and ecs:DescribeTasks to turn it on"
                    );
                    self.publish(Membership::Wanted);
                    return;
                }
                Checked::Failed(ApiError::Throttled(why)) => {
                    throttled = throttled.saturating_add(1);
                    let factor = 2u32.saturating_pow(throttled).min(THROTTLED_MAX_FACTOR);
                    wait = jittered(interval * factor);
                    tracing::warn!(
                        "Drain check throttled by ECS ({why}); next check in {:.0}s",
                        wait.as_secs_f64()
                    );
                }
                Checked::Failed(e) => {
                    tracing::warn!(
                        "Drain check failed, keeping the last answer ({}): {e}",
                        *self.tx.borrow()
                    );
                }
            }
            // A verdict to leave that ECS has not confirmed for a while is dropped.
            let stale = last_answer.elapsed() > interval * STALE_AFTER_CHECKS;
            if stale && self.tx.borrow().is_leaving() {
                tracing::warn!(
                    "No answer from ECS for {:.0}s: wanted again until ECS says otherwise",
                    last_answer.elapsed().as_secs_f64()
                );
                self.publish(Membership::Wanted);
            }
        }
    }

    fn publish(&self, membership: Membership) {
        self.tx.send_if_modified(|m| {
            if *m == membership {
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
        ::metrics::gauge!(crate::metrics::DRAIN_LEAVING).set(if self.tx.borrow().is_leaving() {
            1.0
        } else {
            0.0
        });
    }

    /// One call, bounded in time and counted.
    async fn call<T>(
        &self,
        operation: &'static str,
        call: impl std::future::Future<Output = Result<T, ApiError>>,
    ) -> Result<T, ApiError> {
        ::metrics::counter!(crate::metrics::DRAIN_API_CALLS).increment(1);
        let limit = self.settings.call_timeout;
        tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
            Err(ApiError::Unavailable(format!(
                "{operation}: no answer within {limit:?}"
            )))
        })
    }

    async fn check(&mut self) -> Checked {
        let me = &self.me;
        let service = match self
            .call(
                "DescribeServices",
                self.api.describe_service(&me.cluster, &me.service),
            )
            .await
        {
            Ok(service) => service,
            Err(e) => return Checked::Failed(e),
        };
        match decide(me, &service) {
            Decision::Known(membership) => {
                self.listed = None;
                Checked::Membership(membership)
            }
            Decision::NeedTasks => {
                let wanted = !self.tx.borrow().is_leaving();
                let reuse = match &mut self.listed {
                    Some((seen, _, uses))
                        if *uses < LIST_REUSE_CHECKS
                            && (*seen == service || wanted && fewer_running(seen, &service)) =>
                    {
                        *uses += 1;
                        true
                    }
                    _ => false,
                };
                if reuse {
                    // A wanted task stays wanted while tasks stop and nothing else
                    // changes: whichever stopped, its rank among the rest and the
                    // surplus both fall by one at most.
                    if wanted
                        && self
                            .listed
                            .as_ref()
                            .is_some_and(|(seen, _, _)| *seen != service)
                    {
                        return Checked::Membership(Membership::Wanted);
                    }
                }
                if !reuse {
                    match self.running_tasks().await {
                        Ok(tasks) => self.listed = Some((service.clone(), tasks, 0)),
                        Err(e) => return Checked::Failed(e),
                    }
                }
                let tasks = self
                    .listed
                    .as_ref()
                    .map_or(&[][..], |(_, t, _)| t.as_slice());
                Checked::Membership(decide_with_tasks(&self.me, &service, tasks))
            }
        }
    }

    async fn running_tasks(&self) -> Result<Vec<TaskView>, ApiError> {
        let me = &self.me;
        let arns = self
            .call("ListTasks", self.api.list_tasks(&me.cluster, &me.service))
            .await?;
        if arns.is_empty() {
            return Ok(Vec::new());
        }
        self.call("DescribeTasks", self.api.describe_tasks(&me.cluster, &arns))
            .await
    }
}
