//! The ECS API itself: aws-sdk-ecs `UpdateTaskProtection`.
//!
//! Useful where the agent endpoint is not available (an older agent) or when the
//! caller wants SDK credentials and endpoints. The task finds its own cluster and ARN
//! at `$ECS_CONTAINER_METADATA_URI_V4/task`. As with the agent, a `failures` entry in
//! a 200 answer is a refusal.

use aws_sdk_ecs::error::{ProvideErrorMetadata, SdkError};

use crate::metadata::TaskIdentity;

use super::{Backend, Grant, ProtectionError, ProtectionRequest, Rejection, classify_error};

/// Sends protection updates through the ECS API.
#[derive(Debug, Clone)]
pub struct EcsApiBackend {
    client: aws_sdk_ecs::Client,
    task: TaskIdentity,
}

impl EcsApiBackend {
    /// A backend for `task`, using `client`.
    ///
    /// Give the client a configuration with retries disabled
    /// (`RetryConfig::disabled()`): the state machine retries, and SDK retries would
    /// hide throttling from it and break its one-request-at-a-time rule.
    #[must_use]
    pub fn new(client: aws_sdk_ecs::Client, task: TaskIdentity) -> Self {
        Self { client, task }
    }

    /// The task whose protection this backend sets.
    #[must_use]
    pub fn task(&self) -> &TaskIdentity {
        &self.task
    }
}

fn classify_sdk_error<E, R>(err: SdkError<E, R>) -> ProtectionError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + HasStatus,
{
    match err {
        SdkError::ServiceError(service) => {
            let status = service.raw().status_code();
            let e = service.err();
            classify_error(
                status,
                e.code().unwrap_or_default().to_owned(),
                e.message().unwrap_or_default().to_owned(),
            )
        }
        SdkError::TimeoutError(_) => ProtectionError::Transport("SDK timeout".to_owned()),
        SdkError::DispatchFailure(e) => ProtectionError::Transport(format!("{e:?}")),
        SdkError::ResponseError(e) => {
            let status = e.raw().status_code();
            ProtectionError::malformed(
                status,
                "the ECS answer could not be read",
                format!("{e:?}").as_bytes(),
            )
        }
        other => ProtectionError::Transport(other.to_string()),
    }
}

/// The HTTP status of a raw SDK response.
trait HasStatus {
    fn status_code(&self) -> u16;
}

impl HasStatus for aws_sdk_ecs::config::http::HttpResponse {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

impl Backend for EcsApiBackend {
    async fn update(&self, request: ProtectionRequest) -> Result<Grant, ProtectionError> {
        let output = self
            .client
            .update_task_protection()
            .cluster(&self.task.cluster)
            .tasks(&self.task.task_arn)
            .protection_enabled(request.enabled)
            .set_expires_in_minutes(request.expires_in_minutes.map(i32::from))
            .send()
            .await
            .map_err(classify_sdk_error)?;
        if let Some(failure) = output.failures().first() {
            return Err(ProtectionError::Rejected(Rejection {
                reason: failure.reason().unwrap_or("UNKNOWN").to_owned(),
                detail: failure.detail().map(str::to_owned),
                status: Some(200),
            }));
        }
        let Some(task) = output.protected_tasks().first() else {
            return Err(ProtectionError::malformed(
                200,
                "neither protectedTasks nor failures in answer",
                format!("{output:?}").as_bytes(),
            ));
        };
        let expires_at = task
            .expiration_date()
            .and_then(|d| std::time::SystemTime::try_from(*d).ok());
        Ok(Grant {
            enabled: task.protection_enabled(),
            expires_at,
            task_arn: task.task_arn().map(str::to_owned),
        })
    }

    fn describe(&self) -> String {
        format!(
            "ECS API UpdateTaskProtection for {} in {}",
            self.task.task_arn, self.task.cluster
        )
    }
}
