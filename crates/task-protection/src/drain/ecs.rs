//! The drain's ECS calls through aws-sdk-ecs, with the standard AWS configuration (so
//! `AWS_ENDPOINT_URL_ECS` points them at a stand-in) and the SDK's own retries off:
//! the drain paces itself and backs off when throttled.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use aws_sdk_ecs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ecs::types::DesiredStatus;

use super::api::{ApiError, ServiceApi};
use super::facts::{
    Controller, DeploymentFacts, Health, Rollout, ServiceFacts, ShiftFacts, Strategy, TaskFacts,
};
use crate::EcsClient;

/// [`ServiceApi`] through aws-sdk-ecs, on the crate's [`EcsClient`] (its SDK retries
/// off: the drain paces and retries itself).
#[derive(Debug, Clone)]
pub struct EcsService {
    client: EcsClient,
}

impl EcsService {
    /// A client from the standard AWS configuration (credentials, Region,
    /// `AWS_ENDPOINT_URL_ECS`), with the SDK's retries off.
    pub async fn from_env() -> Self {
        Self::new(EcsClient::from_env().await)
    }

    /// A client for a local stand-in of the ECS API at `endpoint` (a simulator, a test
    /// server): Region `us-east-1`, fixed credentials, no retries.
    #[must_use]
    pub fn for_endpoint(endpoint: &str) -> Self {
        Self::new(EcsClient::with_endpoint(
            endpoint,
            "us-east-1",
            "local",
            "local",
        ))
    }

    /// The drain's calls through `client`.
    #[must_use]
    pub fn new(client: EcsClient) -> Self {
        Self { client }
    }
}

fn classify<E, R>(operation: &'static str, err: SdkError<E, R>) -> ApiError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match err {
        SdkError::ServiceError(service) => {
            let e = service.err();
            let code = e.code().unwrap_or_default().to_owned();
            let message = e.message().unwrap_or_default().to_owned();
            let text = format!("{operation}: {code}: {message}");
            match code.as_str() {
                "ThrottlingException" | "RequestLimitExceeded" | "TooManyRequestsException" => {
                    ApiError::Throttled(text)
                }
                "AccessDeniedException" | "UnauthorizedOperation" | "AccessDenied" => {
                    ApiError::Denied(text)
                }
                "ServerException" | "InternalFailure" | "ServiceUnavailable" => {
                    ApiError::Unavailable(text)
                }
                _ => ApiError::Refused(text),
            }
        }
        SdkError::TimeoutError(_) => ApiError::Unavailable(format!("{operation}: timed out")),
        SdkError::DispatchFailure(e) => {
            ApiError::Unavailable(format!("{operation}: cannot reach ECS: {e:?}"))
        }
        SdkError::ResponseError(e) => {
            ApiError::Malformed(format!("{operation}: unreadable answer: {e:?}"))
        }
        other => ApiError::Unavailable(format!("{operation}: {other}")),
    }
}

fn time(t: Option<&aws_sdk_ecs::primitives::DateTime>) -> Option<SystemTime> {
    t.and_then(|t| SystemTime::try_from(*t).ok())
}

fn count(operation: &str, field: &str, value: i32) -> Result<u32, ApiError> {
    u32::try_from(value)
        .map_err(|_| ApiError::Malformed(format!("{operation}: {field} is {value}")))
}

fn counted() {
    ::metrics::counter!(crate::metrics::DRAIN_API_CALLS).increment(1);
}

fn deployment(d: &aws_sdk_ecs::types::Deployment) -> Result<DeploymentFacts, ApiError> {
    const OP: &str = "DescribeServices";
    let Some(id) = d.id() else {
        return Err(ApiError::Malformed(format!(
            "{OP}: a deployment without id"
        )));
    };
    Ok(DeploymentFacts {
        id: id.to_owned(),
        primary: d.status() == Some("PRIMARY"),
        task_definition: d.task_definition().unwrap_or_default().to_owned(),
        desired: count(OP, "a deployment's desiredCount", d.desired_count())?,
        running: count(OP, "a deployment's runningCount", d.running_count())?,
        pending: count(OP, "a deployment's pendingCount", d.pending_count())?,
        failed_tasks: count(OP, "a deployment's failedTasks", d.failed_tasks())?,
        rollout: Rollout::parse(d.rollout_state().map(|r| r.as_str())),
        created_at: time(d.created_at()),
    })
}

impl ServiceApi for EcsService {
    async fn describe_service(
        &self,
        cluster: &str,
        service: &str,
    ) -> Result<ServiceFacts, ApiError> {
        const OP: &str = "DescribeServices";
        counted();
        let answer = self
            .client
            .sdk()
            .describe_services()
            .cluster(cluster)
            .services(service)
            .send()
            .await
            .map_err(|e| classify(OP, e))?;
        let Some(s) = answer.services().first() else {
            let why = answer
                .failures()
                .first()
                .map(|f| f.reason().unwrap_or("no reason").to_owned())
                .unwrap_or_else(|| "no service in the answer".to_owned());
            return Err(ApiError::Refused(format!("{OP}: {service}: {why}")));
        };
        let config = s.deployment_configuration();
        let deployments = s
            .deployments()
            .iter()
            .map(deployment)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ServiceFacts {
            desired: count(OP, "desiredCount", s.desired_count())?,
            running: count(OP, "runningCount", s.running_count())?,
            pending: count(OP, "pendingCount", s.pending_count())?,
            daemon: s.scheduling_strategy().map(|s| s.as_str()) == Some("DAEMON"),
            controller: Controller::parse(s.deployment_controller().map(|c| c.r#type().as_str())),
            strategy: Strategy::parse(config.and_then(|c| c.strategy()).map(|s| s.as_str())),
            minimum_healthy_percent: config
                .and_then(aws_sdk_ecs::types::DeploymentConfiguration::minimum_healthy_percent)
                .and_then(|p| u32::try_from(p).ok())
                .unwrap_or(100),
            maximum_percent: config
                .and_then(aws_sdk_ecs::types::DeploymentConfiguration::maximum_percent)
                .and_then(|p| u32::try_from(p).ok())
                .unwrap_or(200),
            grace: Duration::from_secs(
                s.health_check_grace_period_seconds()
                    .and_then(|g| u64::try_from(g).ok())
                    .unwrap_or(0),
            ),
            deployments,
            current_deployment: s.current_service_deployment().map(str::to_owned),
            load_balanced: !s.load_balancers().is_empty(),
        })
    }

    async fn list_tasks(
        &self,
        cluster: &str,
        service: &str,
        stopped: bool,
        next: Option<String>,
    ) -> Result<(Vec<String>, Option<String>), ApiError> {
        counted();
        let answer = self
            .client
            .sdk()
            .list_tasks()
            .cluster(cluster)
            .service_name(service)
            .desired_status(if stopped {
                DesiredStatus::Stopped
            } else {
                DesiredStatus::Running
            })
            .set_next_token(next)
            .send()
            .await
            .map_err(|e| classify("ListTasks", e))?;
        let next = answer
            .next_token()
            .filter(|t| !t.is_empty())
            .map(str::to_owned);
        Ok((answer.task_arns().to_vec(), next))
    }

    async fn describe_tasks(
        &self,
        cluster: &str,
        arns: &[String],
    ) -> Result<Vec<TaskFacts>, ApiError> {
        counted();
        let answer = self
            .client
            .sdk()
            .describe_tasks()
            .cluster(cluster)
            .set_tasks(Some(arns.to_vec()))
            .send()
            .await
            .map_err(|e| classify("DescribeTasks", e))?;
        let mut out = Vec::with_capacity(arns.len());
        for task in answer.tasks() {
            let Some(arn) = task.task_arn() else {
                return Err(ApiError::Malformed(
                    "DescribeTasks: a task without taskArn".to_owned(),
                ));
            };
            out.push(TaskFacts {
                arn: arn.to_owned(),
                group: task.group().map(str::to_owned),
                deployment: task.started_by().map(str::to_owned),
                task_definition: task.task_definition_arn().map(str::to_owned),
                running: task.last_status() == Some("RUNNING"),
                stopping: task.desired_status() == Some("STOPPED"),
                health: Health::parse(task.health_status().map(|h| h.as_str())),
                started_at: time(task.started_at()),
                zone: task.availability_zone().map(str::to_owned),
                instance: task.container_instance_arn().map(str::to_owned),
            });
        }
        Ok(out)
    }

    async fn draining_instances(
        &self,
        cluster: &str,
        instances: &[String],
    ) -> Result<BTreeSet<String>, ApiError> {
        counted();
        let answer = self
            .client
            .sdk()
            .describe_container_instances()
            .cluster(cluster)
            .set_container_instances(Some(instances.to_vec()))
            .send()
            .await
            .map_err(|e| classify("DescribeContainerInstances", e))?;
        Ok(answer
            .container_instances()
            .iter()
            .filter(|i| i.status() == Some("DRAINING"))
            .filter_map(|i| i.container_instance_arn().map(str::to_owned))
            .collect())
    }

    async fn service_deployment(&self, arn: &str) -> Result<ShiftFacts, ApiError> {
        const OP: &str = "DescribeServiceDeployments";
        counted();
        let answer = self
            .client
            .sdk()
            .describe_service_deployments()
            .service_deployment_arns(arn)
            .send()
            .await
            .map_err(|e| classify(OP, e))?;
        let Some(d) = answer.service_deployments().first() else {
            return Err(ApiError::Refused(format!("{OP}: {arn} is unknown")));
        };
        Ok(ShiftFacts {
            status: d
                .status()
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default(),
            stage: d.lifecycle_stage().map(|s| s.as_str().to_owned()),
        })
    }
}
