//! The facts one decision needs, for as few ECS calls as they allow: one
//! `DescribeServices` every time; the task list (`ListTasks`, `DescribeTasks`, and
//! `DescribeContainerInstances` for tasks on EC2) only when something may have
//! changed since the last listing, or when it has grown old; a traffic-shifting
//! deployment's lifecycle stage only while one runs.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::{Duration, SystemTime};

use super::api::{ApiError, ServiceApi};
use super::facts::{Controller, Facts, ServiceFacts, Strategy};
use super::record::{Record, time};

/// The calls of one listing come at most this often: a service of 5,000 tasks takes
/// 100 calls to list, which at once would empty the account's bucket (100 tokens)
/// and throttle every other caller.
const LISTING_PACE: Duration = Duration::from_millis(250);
/// `ListTasks` pages, `DescribeTasks` and `DescribeContainerInstances` calls hold this
/// many.
const PAGE: usize = 100;

/// The calls one listing of `service` takes (ListTasks pages and DescribeTasks, and
/// at least one page of the stopped tasks).
#[must_use]
pub(super) fn listing_calls(service: &ServiceFacts) -> u32 {
    let size = (service.running + service.pending)
        .max(service.desired)
        .max(1);
    2 * size.div_ceil(100) + 1
}

/// Where and how to ask.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ask<'a> {
    pub(super) cluster: &'a str,
    pub(super) service: &'a str,
    /// The bound on one call.
    pub(super) call_timeout: Duration,
    /// A listing older than this is made again, even when nothing seems to move (and
    /// never more often than once per ten seconds per call it takes).
    pub(super) relist_after: Duration,
    /// The most tasks worth listing (each task deciding for itself lists the service:
    /// beyond this, the calls would grow with the square of the tasks).
    pub(super) list_limit: Option<usize>,
}

/// How often one call is tried while ECS throttles it, as the AWS SDKs' standard
/// retry mode does, before the decision gives up and backs off.
const THROTTLED_TRIES: u32 = 4;

/// One call, bounded in time, tried again after 1, 2 and 4 s (jittered) while ECS
/// throttles it, up to `tries` times: a listing of many calls is not lost to one
/// throttled call among them. (The first call of a decision is tried once: when it is
/// throttled, the decision backs off as a whole.)
async fn bounded<T, F, Fut>(
    operation: &str,
    limit: Duration,
    tries: u32,
    mut call: F,
) -> Result<T, ApiError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ApiError>>,
{
    let max = tries;
    let mut wait = Duration::from_secs(1);
    let mut tries = 1;
    loop {
        let answer = tokio::time::timeout(limit, call())
            .await
            .unwrap_or_else(|_| {
                Err(ApiError::Unavailable(format!(
                    "{operation}: no answer within {limit:?}"
                )))
            });
        match answer {
            Err(ApiError::Throttled(_)) if tries < max => {
                tokio::time::sleep(wait.mul_f64(rand::random_range(0.5..1.5))).await;
                wait *= 2;
                tries += 1;
            }
            other => return other,
        }
    }
}

/// Whether the tasks must be listed for this decision.
pub(super) fn needs_listing(
    service: &ServiceFacts,
    prev: &Record,
    relist_after: Duration,
    now: SystemTime,
) -> bool {
    prev.memory
        .listed_at
        .map(time)
        .is_none_or(|at| at + relist_after <= now)
        || !service.at_rest()
        || prev.leaving().is_some_and(|l| !l.is_empty())
        || prev.memory.listed_digest.as_deref() != Some(service.digest().as_str())
}

/// Whether a service of this size is too large to list from every task.
pub(super) fn too_large(service: &ServiceFacts, limit: Option<usize>) -> bool {
    let size = usize::try_from((service.running + service.pending).max(service.desired))
        .unwrap_or(usize::MAX);
    limit.is_some_and(|limit| size > limit)
}

/// The facts, or the first failure.
pub(super) async fn gather<A: ServiceApi>(
    api: &A,
    ask: Ask<'_>,
    prev: &Record,
    now: SystemTime,
) -> Result<Facts, ApiError> {
    let limit = ask.call_timeout;
    let service = bounded("DescribeServices", limit, 1, || {
        api.describe_service(ask.cluster, ask.service)
    })
    .await?;
    let mut facts = Facts {
        service,
        tasks: None,
        draining_instances: BTreeSet::new(),
        shift: None,
        stopped: BTreeSet::new(),
    };
    let relist_after = ask
        .relist_after
        .max(Duration::from_secs(10) * listing_calls(&facts.service));
    if facts.service.controller != Controller::Ecs
        || !needs_listing(&facts.service, prev, relist_after, now)
        || too_large(&facts.service, ask.list_limit)
    {
        return Ok(facts);
    }
    let mut paced = Paced::default();
    let arns = list(api, ask, false, &mut paced).await?;
    let mut tasks = Vec::with_capacity(arns.len());
    for chunk in arns.chunks(PAGE) {
        paced.wait().await;
        tasks.extend(
            bounded("DescribeTasks", limit, THROTTLED_TRIES, || {
                api.describe_tasks(ask.cluster, chunk)
            })
            .await?,
        );
    }
    let instances: Vec<String> = tasks
        .iter()
        .filter_map(|t| t.instance.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    for chunk in instances.chunks(PAGE) {
        // Which instances drain only orders the pick: without it, the pick goes by
        // zone and age, so a refusal is no reason to stop (throttling still is).
        paced.wait().await;
        match bounded("DescribeContainerInstances", limit, THROTTLED_TRIES, || {
            api.draining_instances(ask.cluster, chunk)
        })
        .await
        {
            Ok(draining) => facts.draining_instances.extend(draining),
            Err(e @ ApiError::Throttled(_)) => return Err(e),
            Err(e) => {
                tracing::debug!("Draining container instances unknown: {e}");
                break;
            }
        }
    }
    // Listed after the running ones: a task that stopped meanwhile is in one list or
    // the other.
    facts.stopped = list(api, ask, true, &mut paced)
        .await?
        .iter()
        .map(|arn| super::facts::task_id(arn).to_owned())
        .collect();
    facts.tasks = Some(tasks);
    if matches!(facts.service.strategy, Strategy::TrafficShift(_))
        && facts.service.deployments.len() > 1
        && let Some(arn) = facts.service.current_deployment.clone()
    {
        // Without the lifecycle stage the old side stays: never leave on doubt.
        match bounded("DescribeServiceDeployments", limit, THROTTLED_TRIES, || {
            api.service_deployment(&arn)
        })
        .await
        {
            Ok(shift) => facts.shift = Some(shift),
            Err(e @ ApiError::Throttled(_)) => return Err(e),
            Err(e) => tracing::warn!(
                "The traffic-shifting deployment's stage is unknown, so its old tasks stay: {e}"
            ),
        }
    }
    Ok(facts)
}

/// Every page of `ListTasks` (RUNNING, or STOPPED), paced; each ARN once, though a
/// listing made while tasks start and stop need not be one snapshot.
async fn list<A: ServiceApi>(
    api: &A,
    ask: Ask<'_>,
    stopped: bool,
    paced: &mut Paced,
) -> Result<Vec<String>, ApiError> {
    let mut arns = Vec::new();
    let mut seen = BTreeSet::new();
    let mut next = None;
    loop {
        paced.wait().await;
        let (page, token) = bounded("ListTasks", ask.call_timeout, THROTTLED_TRIES, || {
            api.list_tasks(ask.cluster, ask.service, stopped, next.clone())
        })
        .await?;
        arns.extend(page.into_iter().filter(|arn| seen.insert(arn.clone())));
        match token {
            Some(token) => next = Some(token),
            None => return Ok(arns),
        }
    }
}

/// Spaces the calls of one listing by [`LISTING_PACE`].
#[derive(Debug, Default)]
struct Paced {
    last: Option<tokio::time::Instant>,
}

impl Paced {
    async fn wait(&mut self) {
        if let Some(last) = self.last {
            tokio::time::sleep_until(last + LISTING_PACE).await;
        }
        self.last = Some(tokio::time::Instant::now());
    }
}
