//! The watcher's ECS calls through aws-sdk-ecs: `DescribeTasks`, `DescribeServices`
//! and `ListTasks`, with the standard AWS configuration (so `AWS_ENDPOINT_URL_ECS`
//! points them at a stand-in) and the SDK's own retries off: the watcher paces itself
//! and backs off when throttled.

use std::time::SystemTime;

use aws_sdk_ecs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ecs::types::DesiredStatus;

use super::api::{ApiError, ServiceApi};
use super::decide::{DeploymentView, ServiceView, TaskView};

/// `DescribeTasks` takes at most this many tasks a call.
const DESCRIBE_BATCH: usize = 100;

/// [`ServiceApi`] through aws-sdk-ecs.
#[derive(Debug, Clone)]
pub struct EcsService {
    client: aws_sdk_ecs::Client,
}

impl EcsService {
    /// Calls ECS with `client`. Give it a configuration with retries disabled
    /// (`RetryConfig::disabled()`): the watcher backs off itself.
    #[must_use]
    pub fn new(client: aws_sdk_ecs::Client) -> Self {
        Self { client }
    }

    /// A client from the standard AWS configuration, with retries off.
    pub async fn from_env() -> Self {
        let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .load()
            .await;
        Self::new(aws_sdk_ecs::Client::new(&sdk))
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

impl ServiceApi for EcsService {
    async fn describe_tasks(
        &self,
        cluster: &str,
        arns: &[String],
    ) -> Result<Vec<TaskView>, ApiError> {
        let mut out = Vec::with_capacity(arns.len());
        for chunk in arns.chunks(DESCRIBE_BATCH) {
            let answer = self
                .client
                .describe_tasks()
                .cluster(cluster)
                .set_tasks(Some(chunk.to_vec()))
                .send()
                .await
                .map_err(|e| classify("DescribeTasks", e))?;
            for task in answer.tasks() {
                let Some(arn) = task.task_arn() else {
                    return Err(ApiError::Malformed(
                        "DescribeTasks: a task without taskArn".to_owned(),
                    ));
                };
                out.push(TaskView {
                    arn: arn.to_owned(),
                    group: task.group().map(str::to_owned),
                    deployment: task.started_by().map(str::to_owned),
                    started_at: time(task.started_at()),
                    running: task.last_status() == Some("RUNNING")
                        && task.desired_status() == Some("RUNNING"),
                });
            }
        }
        Ok(out)
    }

    async fn describe_service(
        &self,
        cluster: &str,
        service: &str,
    ) -> Result<ServiceView, ApiError> {
        const OP: &str = "DescribeServices";
        let answer = self
            .client
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
        let mut deployments = Vec::with_capacity(s.deployments().len());
        for d in s.deployments() {
            let Some(id) = d.id() else {
                return Err(ApiError::Malformed(format!(
                    "{OP}: a deployment without id"
                )));
            };
            deployments.push(DeploymentView {
                id: id.to_owned(),
                primary: d.status() == Some("PRIMARY"),
                desired: count(OP, "a deployment's desiredCount", d.desired_count())?,
                running: count(OP, "a deployment's runningCount", d.running_count())?,
                created_at: time(d.created_at()),
            });
        }
        Ok(ServiceView {
            desired: count(OP, "desiredCount", s.desired_count())?,
            running: count(OP, "runningCount", s.running_count())?,
            deployments,
        })
    }

    async fn list_tasks(&self, cluster: &str, service: &str) -> Result<Vec<String>, ApiError> {
        let mut arns = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let answer = self
                .client
                .list_tasks()
                .cluster(cluster)
                .service_name(service)
                .desired_status(DesiredStatus::Running)
                .set_next_token(next.take())
                .send()
                .await
                .map_err(|e| classify("ListTasks", e))?;
            arns.extend(answer.task_arns().iter().cloned());
            match answer.next_token() {
                Some(token) if !token.is_empty() => next = Some(token.to_owned()),
                _ => return Ok(arns),
            }
        }
    }
}
