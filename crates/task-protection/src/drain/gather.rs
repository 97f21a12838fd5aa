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
use super::record::{Record, Verdict, time};

/// The calls of one listing come at most this often: a service of 5,000 tasks takes
/// 100 calls to list, which at once would empty the account's bucket (100 tokens)
/// and throttle every other caller.
const LISTING_PACE: Duration = Duration::from_millis(250);
/// `ListTasks` pages, `DescribeTasks` and `DescribeContainerInstances` calls hold this
/// many.
const PAGE: usize = 100;

/// The calls one listing of `service` takes (ListTasks pages and DescribeTasks).
#[must_use]
pub(super) fn listing_calls(service: &ServiceFacts) -> u32 {
    let size = (service.running + service.pending)
        .max(service.desired)
        .max(1);
    2 * size.div_ceil(100)
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

/// One call, bounded in time.
async fn bounded<T>(
    operation: &str,
    limit: Duration,
    call: impl Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
        Err(ApiError::Unavailable(format!(
            "{operation}: no answer within {limit:?}"
        )))
    })
}

/// Whether the tasks must be listed for this decision.
pub(super) fn needs_listing(
    service: &ServiceFacts,
    prev: &Record,
    relist_after: Duration,
    now: SystemTime,
) -> bool {
    let listed_at = match &prev.verdict {
        Verdict::On {
            listed: Some(l), ..
        } => Some(time(l.at)),
        _ => None,
    };
    listed_at.is_none_or(|at| at + relist_after <= now)
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
    let service = bounded(
        "DescribeServices",
        limit,
        api.describe_service(ask.cluster, ask.service),
    )
    .await?;
    let mut facts = Facts {
        service,
        tasks: None,
        draining_instances: BTreeSet::new(),
        shift: None,
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
    let mut arns = Vec::new();
    let mut next = None;
    loop {
        paced.wait().await;
        let (page, token) = bounded(
            "ListTasks",
            limit,
            api.list_tasks(ask.cluster, ask.service, next.take()),
        )
        .await?;
        arns.extend(page);
        match token {
            Some(token) => next = Some(token),
            None => break,
        }
    }
    let mut tasks = Vec::with_capacity(arns.len());
    for chunk in arns.chunks(PAGE) {
        paced.wait().await;
        tasks.extend(
            bounded(
                "DescribeTasks",
                limit,
                api.describe_tasks(ask.cluster, chunk),
            )
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
        match bounded(
            "DescribeContainerInstances",
            limit,
            api.draining_instances(ask.cluster, chunk),
        )
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
    facts.tasks = Some(tasks);
    if matches!(facts.service.strategy, Strategy::TrafficShift(_))
        && facts.service.deployments.len() > 1
        && let Some(arn) = facts.service.current_deployment.clone()
    {
        // Without the lifecycle stage the old side stays: never leave on doubt.
        match bounded(
            "DescribeServiceDeployments",
            limit,
            api.service_deployment(&arn),
        )
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
