//! Task metadata v4: which task this process runs in, and what ECS wants of it.
//!
//! `GET $ECS_CONTAINER_METADATA_URI_V4/task` is served by the same agent server as
//! the protection endpoint, behind the same limiter: it can answer `429` with a
//! plain-text body, and `500` while the agent cannot read its own state
//! (`ecs-agent/tmds/handlers/v4/handlers.go`). Start-up therefore reads it with
//! retries ([`MetadataEndpoint::task_with_retries`]); a caller that polls it (the
//! drain asks for `DesiredStatus` about once a second) reads it once a time
//! ([`MetadataEndpoint::task`]) and lets its own loop retry.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;

use crate::backend::{BackendConfigError, excerpt};
use crate::link_local::{Failure, LinkLocal};

/// How long one read may take: the endpoint is local and answers from memory.
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// How long [`TaskIdentity::discover`] keeps trying, in all.
pub const DISCOVERY_PATIENCE: Duration = Duration::from_secs(20);
/// The first wait between two tries; it doubles up to [`MAX_BACKOFF`], each jittered.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The task this process runs in: the two fields every ECS API call about it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskIdentity {
    /// The cluster name (EC2) or ARN (Fargate).
    pub cluster: String,
    /// The task ARN.
    pub task_arn: String,
}

/// What task metadata v4 says of the task, `GET $ECS_CONTAINER_METADATA_URI_V4/task`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct TaskMetadata {
    /// `Cluster`: the cluster's short name on EC2, its ARN on Fargate.
    #[serde(rename = "Cluster")]
    pub cluster: String,
    /// `TaskARN`.
    #[serde(rename = "TaskARN")]
    pub task_arn: String,
    /// `DesiredStatus`: `RUNNING`, or `STOPPED` once ECS has decided to stop the task.
    #[serde(rename = "DesiredStatus")]
    pub desired_status: String,
    /// `KnownStatus`: `PENDING`, `RUNNING`, `STOPPED`, ...
    #[serde(rename = "KnownStatus")]
    pub known_status: String,
    /// `Family` of the task definition.
    #[serde(rename = "Family", default)]
    pub family: Option<String>,
    /// `Revision` of the task definition.
    #[serde(rename = "Revision", default)]
    pub revision: Option<String>,
    /// `AvailabilityZone`, where the agent reports it.
    #[serde(rename = "AvailabilityZone", default)]
    pub availability_zone: Option<String>,
    /// `LaunchType` (`EC2`, `FARGATE`, ...), where the agent reports it.
    #[serde(rename = "LaunchType", default)]
    pub launch_type: Option<String>,
    /// `ServiceName`: only on EC2 (and ECS Anywhere, Managed Instances) with a recent
    /// agent; never on Fargate.
    #[serde(rename = "ServiceName", default)]
    pub service_name: Option<String>,
}

impl TaskMetadata {
    /// Whether ECS has decided to stop the task (`DesiredStatus` is `STOPPED`).
    #[must_use]
    pub fn is_stopping(&self) -> bool {
        self.desired_status == "STOPPED"
    }

    /// The cluster and ARN.
    #[must_use]
    pub fn identity(&self) -> TaskIdentity {
        TaskIdentity {
            cluster: self.cluster.clone(),
            task_arn: self.task_arn.clone(),
        }
    }
}

/// Why task metadata could not be read.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum MetadataError {
    /// The metadata URI cannot be used.
    #[error("{uri:?} is not a task metadata URI: {reason}")]
    InvalidUri {
        /// The URI given.
        uri: String,
        /// Why it was refused.
        reason: String,
    },
    /// No connection could be made.
    #[error("cannot connect to {url}")]
    Unreachable {
        /// The URL asked.
        url: String,
        /// Why.
        #[source]
        source: crate::backend::Cause,
    },
    /// The request was sent, and no answer came back whole.
    #[error("no answer from {url}")]
    Transport {
        /// The URL asked.
        url: String,
        /// Why.
        #[source]
        source: crate::backend::Cause,
    },
    /// No answer within [`READ_TIMEOUT`].
    #[error("no answer from {url} within {after:?}")]
    Timeout {
        /// The URL asked.
        url: String,
        /// The timeout.
        after: Duration,
    },
    /// An answer other than 200.
    #[error("{url} answered HTTP {status}: {excerpt:?}")]
    Status {
        /// The URL asked.
        url: String,
        /// HTTP status.
        status: u16,
        /// The start of the body.
        excerpt: String,
    },
    /// A 200 that does not describe a task.
    #[error("{url} answered what is not task metadata ({reason}): {excerpt:?}")]
    Malformed {
        /// The URL asked.
        url: String,
        /// What is wrong with it.
        reason: String,
        /// The start of the body.
        excerpt: String,
    },
}

impl PartialEq for MetadataError {
    /// The same kind of error with the same text, causes included.
    fn eq(&self, other: &Self) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
            && crate::ErrorChain(self).to_string() == crate::ErrorChain(other).to_string()
    }
}

impl Eq for MetadataError {}

impl MetadataError {
    /// Whether trying again may succeed: the agent's limiter (429), a server error,
    /// a timeout or a connection problem. A wrong URI, a 404 or an answer that is not
    /// task metadata will not change.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } | Self::Transport { .. } | Self::Timeout { .. } => true,
            Self::Status { status, .. } => *status == 429 || *status >= 500,
            Self::InvalidUri { .. } | Self::Malformed { .. } => false,
        }
    }
}

/// The task metadata endpoint v4 of this task. Cheap to clone; clones share one
/// connection.
#[derive(Debug, Clone)]
pub struct MetadataEndpoint {
    client: Arc<LinkLocal>,
    url: String,
}

impl MetadataEndpoint {
    /// The endpoint at `metadata_uri`, the value of `ECS_CONTAINER_METADATA_URI_V4`
    /// (`http://169.254.170.2/v4/<id>`).
    ///
    /// # Errors
    /// When `metadata_uri` is not an absolute `http://` URL.
    pub fn new(metadata_uri: &str) -> Result<Self, MetadataError> {
        let client = LinkLocal::new(metadata_uri).map_err(|reason| MetadataError::InvalidUri {
            uri: metadata_uri.to_owned(),
            reason,
        })?;
        Ok(Self {
            url: client.url("/task"),
            client: Arc::new(client),
        })
    }

    /// The URL read: `$ECS_CONTAINER_METADATA_URI_V4/task`.
    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Reads the task's metadata once, within [`READ_TIMEOUT`].
    ///
    /// # Errors
    /// Any failure; [`MetadataError::is_transient`] says whether to try again.
    pub async fn task(&self) -> Result<TaskMetadata, MetadataError> {
        self.read::<TaskMetadata>().await
    }

    /// Reads `/task` once as a `T`.
    async fn read<T: serde::de::DeserializeOwned + HasIdentity>(&self) -> Result<T, MetadataError> {
        let url = &self.url;
        let answer = tokio::time::timeout(
            READ_TIMEOUT,
            self.client.send(http::Method::GET, "/task", None),
        )
        .await
        .map_err(|_| MetadataError::Timeout {
            url: url.clone(),
            after: READ_TIMEOUT,
        })?
        .map_err(|failure| match failure {
            Failure::NotSent(e) => MetadataError::Unreachable {
                url: url.clone(),
                source: Arc::from(e),
            },
            Failure::Lost(e) => MetadataError::Transport {
                url: url.clone(),
                source: Arc::new(e),
            },
        })?;
        if answer.status != 200 {
            return Err(MetadataError::Status {
                url: url.clone(),
                status: answer.status,
                excerpt: excerpt(&answer.body).trim_end().to_owned(),
            });
        }
        let meta: T =
            serde_json::from_slice(&answer.body).map_err(|e| MetadataError::Malformed {
                url: url.clone(),
                reason: e.to_string(),
                excerpt: excerpt(&answer.body),
            })?;
        let (cluster, task_arn) = meta.fields();
        if cluster.is_empty() || task_arn.is_empty() {
            return Err(MetadataError::Malformed {
                url: url.clone(),
                reason: "Cluster or TaskARN is empty".to_owned(),
                excerpt: excerpt(&answer.body),
            });
        }
        Ok(meta)
    }

    /// Reads the task's metadata, trying again after a transient failure (backoff
    /// from 100 ms doubling to 2 s, jittered) for up to `patience` in all.
    ///
    /// # Errors
    /// The first failure that is not transient, or the last one once `patience` is
    /// spent.
    pub async fn task_with_retries(
        &self,
        patience: Duration,
    ) -> Result<TaskMetadata, MetadataError> {
        self.read_with_retries::<TaskMetadata>(patience).await
    }

    async fn read_with_retries<T: serde::de::DeserializeOwned + HasIdentity>(
        &self,
        patience: Duration,
    ) -> Result<T, MetadataError> {
        let deadline = Instant::now() + patience;
        let mut backoff = FIRST_BACKOFF;
        loop {
            match self.read::<T>().await {
                Ok(meta) => return Ok(meta),
                Err(e) if !e.is_transient() => return Err(e),
                Err(e) => {
                    let half = backoff / 2;
                    let jitter_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
                    let wait = half + Duration::from_millis(rand::random_range(0..=jitter_ms));
                    if Instant::now() + wait >= deadline {
                        return Err(e);
                    }
                    tracing::debug!(
                        "Task metadata not read yet ({}); trying again in {wait:?}",
                        crate::ErrorChain(&e)
                    );
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

impl TaskIdentity {
    /// Reads the task's cluster and ARN from the task metadata endpoint v4
    /// (`metadata_uri` is the value of `ECS_CONTAINER_METADATA_URI_V4`), trying again
    /// after a transient failure for up to [`DISCOVERY_PATIENCE`].
    ///
    /// # Errors
    /// When the URI is not usable, or the endpoint does not answer with the task's
    /// metadata in that time.
    pub async fn discover(metadata_uri: &str) -> Result<Self, BackendConfigError> {
        let endpoint =
            MetadataEndpoint::new(metadata_uri).map_err(BackendConfigError::Discovery)?;
        // Only the two fields it needs: an agent that leaves out others still
        // serves a task its identity.
        endpoint
            .read_with_retries::<IdentityFields>(DISCOVERY_PATIENCE)
            .await
            .map(|meta| TaskIdentity {
                cluster: meta.cluster,
                task_arn: meta.task_arn,
            })
            .map_err(BackendConfigError::Discovery)
    }
}

/// What [`TaskIdentity::discover`] reads of the task metadata.
#[derive(Deserialize)]
struct IdentityFields {
    #[serde(rename = "Cluster")]
    cluster: String,
    #[serde(rename = "TaskARN")]
    task_arn: String,
}

/// A metadata answer's cluster and task ARN, which every one must have.
trait HasIdentity {
    fn fields(&self) -> (&str, &str);
}

impl HasIdentity for TaskMetadata {
    fn fields(&self) -> (&str, &str) {
        (&self.cluster, &self.task_arn)
    }
}

impl HasIdentity for IdentityFields {
    fn fields(&self) -> (&str, &str) {
        (&self.cluster, &self.task_arn)
    }
}
