//! The ECS API itself: aws-sdk-ecs `UpdateTaskProtection`.
//!
//! Useful where the agent endpoint is not available (an older agent) or when the
//! caller wants SDK credentials and endpoints. The task finds its own cluster and ARN
//! at `$ECS_CONTAINER_METADATA_URI_V4/task`. As with the agent, a `failures` entry in
//! a 200 answer is a refusal.

use std::time::Duration;

use aws_sdk_ecs::error::{ProvideErrorMetadata, SdkError};

use crate::ecs_client::EcsClient;
use crate::metadata::TaskIdentity;

use super::{
    Backend, Grant, LANDING_MARGIN, ProtectionError, ProtectionRequest, Rejection, ThrottledBy,
    classify_error,
};

/// Sends protection updates through the ECS API.
#[derive(Debug, Clone)]
pub struct EcsApiBackend {
    client: EcsClient,
    task: TaskIdentity,
}

impl EcsApiBackend {
    /// A backend for `task`, calling ECS with `client`.
    #[must_use]
    pub fn new(client: EcsClient, task: TaskIdentity) -> Self {
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
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + HasStatus + 'static,
{
    match err {
        SdkError::ServiceError(service) => {
            let status = service.raw().status_code();
            let e = service.err();
            classify_error(
                status,
                e.code().unwrap_or_default().to_owned(),
                e.message().unwrap_or_default().to_owned(),
                ThrottledBy::Ecs,
            )
        }
        SdkError::ResponseError(e) => {
            let status = e.raw().status_code();
            ProtectionError::malformed(
                status,
                "the ECS answer could not be read",
                format!("{e:?}").as_bytes(),
            )
        }
        // Whether the request left is not known here: ECS may have acted on it.
        other => ProtectionError::transport("the ECS API call failed").caused_by(other),
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
            .sdk()
            .update_task_protection()
            .cluster(&self.task.cluster)
            .tasks(&self.task.task_arn)
            .protection_enabled(request.enabled)
            .set_expires_in_minutes(request.expires_in_minutes.map(i32::from))
            .send()
            .await
            .map_err(classify_sdk_error)?;
        if let Some(failure) = output.failures().first() {
            let mut rejection =
                Rejection::new(failure.reason().unwrap_or("UNKNOWN")).with_status(200);
            if let Some(detail) = failure.detail() {
                rejection = rejection.with_detail(detail);
            }
            return Err(ProtectionError::Rejected(rejection));
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
        let grant = match (task.protection_enabled(), expires_at) {
            (true, Some(at)) => Grant::protected_until(at),
            (true, None) => Grant::protected(),
            (false, _) => Grant::unprotected(),
        };
        Ok(match task.task_arn() {
            Some(arn) => grant.with_task_arn(arn),
            None => grant,
        })
    }

    /// ECS gets the request straight from this process: once the state machine stops
    /// waiting for an answer, ECS may still be working on it, with no budget of its
    /// own that this side knows of. So the window is the request timeout itself, and
    /// the margin.
    fn landing_window(&self, request_timeout: Duration) -> Duration {
        request_timeout.saturating_add(LANDING_MARGIN)
    }

    fn identity(&self) -> Option<String> {
        Some(format!("ECS API {}", self.task.task_arn))
    }

    fn describe(&self) -> String {
        format!(
            "ECS API UpdateTaskProtection for {} in {}",
            self.task.task_arn, self.task.cluster
        )
    }
}
