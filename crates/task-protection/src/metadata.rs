//! The task metadata endpoint v4: which task this process runs in.

use serde::Deserialize;

use crate::backend::BackendConfigError;

/// The task this process runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskIdentity {
    /// The cluster name or ARN.
    pub cluster: String,
    /// The task ARN.
    pub task_arn: String,
}

#[derive(Deserialize)]
struct TaskMetadata {
    #[serde(rename = "Cluster")]
    cluster: Option<String>,
    #[serde(rename = "TaskARN")]
    task_arn: Option<String>,
}

impl TaskIdentity {
    /// Reads the task's cluster and ARN from the task metadata endpoint v4
    /// (`metadata_uri` is the value of `ECS_CONTAINER_METADATA_URI_V4`).
    ///
    /// # Errors
    /// When the endpoint cannot be reached or its answer lacks either field.
    pub async fn discover(metadata_uri: &str) -> Result<Self, BackendConfigError> {
        let url = format!("{}/task", metadata_uri.trim().trim_end_matches('/'));
        let fail = |reason: String| BackendConfigError::Discovery {
            url: url.clone(),
            reason,
        };
        // The metadata endpoint is link-local, like the agent: never through a proxy.
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(std::time::Duration::from_secs(5))
            .build()
            .map_err(|e| fail(e.to_string()))?;
        let response = client
            .get(&url)
            .send()
            .await
            .map_err(|e| fail(e.to_string()))?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| fail(e.to_string()))?;
        if !status.is_success() {
            return Err(fail(format!(
                "HTTP {status}: {}",
                crate::backend::excerpt(&body)
            )));
        }
        let meta: TaskMetadata = serde_json::from_slice(&body)
            .map_err(|e| fail(format!("{e}; body: {:?}", crate::backend::excerpt(&body))))?;
        match (meta.cluster, meta.task_arn) {
            (Some(cluster), Some(task_arn)) if !cluster.is_empty() && !task_arn.is_empty() => {
                Ok(Self { cluster, task_arn })
            }
            _ => Err(fail(format!(
                "Cluster or TaskARN missing; body: {:?}",
                crate::backend::excerpt(&body)
            ))),
        }
    }
}
