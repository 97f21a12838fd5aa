//! Starting the drain from the environment of an ECS task.

use std::time::Duration;

use super::api::{ApiError, ServiceApi};
use super::watch::{Clock, Me, Watcher};
use super::{Drain, DrainMode, DrainSettings, DynamoStore, EcsService, LocalStore, task_id};
use crate::metadata::TaskIdentity;

impl Drain {
    /// Starts watching from the environment: this task's cluster and ARN from the task
    /// metadata endpoint (`metadata_uri`, the value of `ECS_CONTAINER_METADATA_URI_V4`),
    /// its service from the settings or from `DescribeTasks` on itself, the ECS API and
    /// the table (when the settings name one) through the standard AWS configuration.
    ///
    /// Never fails: without the metadata endpoint (not in ECS), for a task that is not
    /// part of a service, or when the role may not ask, the drain is off, said once in
    /// the log, and the task is always wanted.
    pub async fn start(
        mode: DrainMode,
        metadata_uri: Option<&str>,
        settings: DrainSettings,
    ) -> Self {
        if mode == DrainMode::Off {
            tracing::info!("Drain is off (DRAIN=off)");
            return Self::off();
        }
        let Some(metadata_uri) = metadata_uri else {
            tracing::info!(
                "Drain is off: ECS_CONTAINER_METADATA_URI_V4 is not set, so this process is not running in ECS"
            );
            return Self::off();
        };
        let identity = match TaskIdentity::discover(metadata_uri).await {
            Ok(identity) => identity,
            Err(e) => {
                tracing::warn!("Drain is off: {e}");
                return Self::off();
            }
        };
        let api = EcsService::from_env().await;
        let (drain, out) = Self::on();
        let clock = Clock::new();
        tokio::spawn(async move {
            let service = match settings.service() {
                Some(service) => service.to_owned(),
                None => match identify(&api, &identity, &settings).await {
                    Some(service) => service,
                    None => {
                        out.membership.send_replace(super::Membership::Wanted);
                        out.on.send_replace(false);
                        return;
                    }
                },
            };
            let me = Me {
                id: task_id(&identity.task_arn).to_owned(),
                cluster: identity.cluster.clone(),
                service,
            };
            match settings.table() {
                Some(table) => {
                    let store = DynamoStore::from_env(table, &me.cluster, &me.service).await;
                    announce(&me, &settings, Some(store.key()));
                    Watcher::new(api, store, me, settings, out, clock)
                        .run()
                        .await;
                }
                None => {
                    announce(&me, &settings, None);
                    Watcher::new(api, LocalStore::new(), me, settings, out, clock)
                        .run()
                        .await;
                }
            }
        });
        drain
    }
}

fn announce(me: &Me, settings: &DrainSettings, key: Option<&str>) {
    let how = key.map_or_else(
        || "each task deciding for itself".to_owned(),
        |key| format!("one decision for the service, shared under {key}"),
    );
    tracing::info!(
        service = %me.service,
        "Drain is on: asking ECS about service {} every {:?} or so, {how}",
        me.service,
        settings.check_interval()
    );
}

/// This task's service, from `DescribeTasks` on itself, retried while ECS is
/// unavailable or throttles, after a random part of an interval so that tasks starting
/// together do not ask together. `None` when the drain cannot work: the reason is
/// logged once.
async fn identify(
    api: &impl ServiceApi,
    identity: &TaskIdentity,
    settings: &DrainSettings,
) -> Option<String> {
    let arns = [identity.task_arn.clone()];
    tokio::time::sleep(
        settings
            .check_interval()
            .mul_f64(rand::random_range(0.0..0.5)),
    )
    .await;
    let mut wait = Duration::from_secs(1);
    loop {
        let call = api.describe_tasks(&identity.cluster, &arns);
        let answer = tokio::time::timeout(settings.call_timeout(), call)
            .await
            .unwrap_or_else(|_| Err(ApiError::Unavailable("DescribeTasks: no answer".to_owned())));
        match answer {
            Ok(tasks) => {
                let Some(task) = tasks.into_iter().find(|t| t.arn == identity.task_arn) else {
                    tracing::warn!(
                        "Drain is off: DescribeTasks does not know this task ({})",
                        identity.task_arn
                    );
                    return None;
                };
                let Some(service) = task
                    .group
                    .as_deref()
                    .and_then(|g| g.strip_prefix("service:"))
                else {
                    tracing::info!(
                        group = task.group.as_deref().unwrap_or(""),
                        "Drain is off: this task is not part of a service"
                    );
                    return None;
                };
                return Some(service.to_owned());
            }
            Err(ApiError::Denied(why)) => {
                tracing::warn!(
                    "Drain is off: the task role may not describe its own task ({why}); \
                     grant ecs:DescribeTasks, ecs:DescribeServices and ecs:ListTasks to turn it on"
                );
                return None;
            }
            Err(e @ (ApiError::Refused(_) | ApiError::Malformed(_))) => {
                tracing::warn!("Drain is off: {e}");
                return None;
            }
            Err(e) => {
                tracing::warn!(
                    "Drain cannot identify this task yet ({e}); trying again in {wait:?}"
                );
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(settings.check_interval());
            }
        }
    }
}
