//! Choosing a backend from the environment.
//!
//! Inside ECS the agent sets `ECS_AGENT_URI`, so `auto` picks the agent there and the
//! local simulation anywhere else. Deployments set `TASK_PROTECTION_BACKEND=agent`, so
//! a task that somehow lacks the agent endpoint fails at start-up instead of running
//! unprotected on the simulation.

use std::fmt;
use std::str::FromStr;

use super::{Backend, Grant, LocalBackend, ProtectionError, ProtectionRequest};

/// Which backend to use: the value of `TASK_PROTECTION_BACKEND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum BackendKind {
    /// The agent when `ECS_AGENT_URI` is set, else the local simulation.
    #[default]
    Auto,
    /// The ECS agent; a missing `ECS_AGENT_URI` is an error.
    Agent,
    /// The ECS API through aws-sdk-ecs, with the task found through task metadata.
    EcsApi,
    /// The local simulation, even inside ECS.
    Local,
}

impl BackendKind {
    /// The environment variable that selects the backend.
    pub const ENV: &'static str = "TASK_PROTECTION_BACKEND";

    /// The spelling used in `TASK_PROTECTION_BACKEND`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Agent => "agent",
            Self::EcsApi => "ecs-api",
            Self::Local => "local",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BackendKind {
    type Err = BackendConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "auto" | "" => Ok(Self::Auto),
            "agent" => Ok(Self::Agent),
            "ecs-api" => Ok(Self::EcsApi),
            "local" => Ok(Self::Local),
            other => Err(BackendConfigError::Invalid {
                variable: Self::ENV,
                value: other.to_owned(),
                reason: "expected one of auto, agent, ecs-api, local".to_owned(),
            }),
        }
    }
}

/// A backend could not be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BackendConfigError {
    /// A variable that the chosen backend needs is not set.
    #[error("{kind_var}={kind} needs {variable}, which is not set{hint}")]
    Missing {
        /// `TASK_PROTECTION_BACKEND`.
        kind_var: &'static str,
        /// The backend chosen.
        kind: BackendKind,
        /// The missing variable.
        variable: &'static str,
        /// Why it might be missing.
        hint: &'static str,
    },
    /// A variable holds a value that cannot be used.
    #[error("{variable}={value:?} is not valid: {reason}")]
    Invalid {
        /// The variable.
        variable: &'static str,
        /// Its value.
        value: String,
        /// Why it was refused.
        reason: String,
    },
    /// The task's identity could not be read from task metadata.
    #[error("cannot read the task's cluster and ARN from {url}: {reason}")]
    Discovery {
        /// The URL asked.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The backend was compiled out.
    #[error("the {0} backend is not compiled into this build")]
    NotCompiled(BackendKind),
}

/// What selects and configures a backend; usually read from the environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendConfig {
    /// `TASK_PROTECTION_BACKEND`.
    pub kind: BackendKind,
    /// `ECS_AGENT_URI`, set by the ECS agent inside a task.
    pub agent_uri: Option<String>,
    /// `ECS_CONTAINER_METADATA_URI_V4`, set by the ECS agent inside a task.
    pub metadata_uri: Option<String>,
}

impl BackendConfig {
    /// Reads `ECS_AGENT_URI` and `ECS_CONTAINER_METADATA_URI_V4` for backend `kind`.
    #[must_use]
    pub fn from_env(kind: BackendKind) -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        Self {
            kind,
            agent_uri: var("ECS_AGENT_URI"),
            metadata_uri: var("ECS_CONTAINER_METADATA_URI_V4"),
        }
    }
}

/// Any of the built-in backends, chosen at run time.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum AnyBackend {
    /// The ECS agent.
    #[cfg(feature = "agent")]
    #[cfg_attr(docsrs, doc(cfg(feature = "agent")))]
    Agent(super::AgentBackend),
    /// The ECS API.
    #[cfg(feature = "ecs-api")]
    #[cfg_attr(docsrs, doc(cfg(feature = "ecs-api")))]
    EcsApi(super::EcsApiBackend),
    /// The local simulation.
    Local(LocalBackend),
}

impl AnyBackend {
    /// Builds the backend that `config` selects. For `auto` outside ECS this is the
    /// local simulation, and a warning says so once.
    ///
    /// # Errors
    /// When the chosen backend lacks a variable it needs, or cannot find its task.
    pub async fn connect(config: &BackendConfig) -> Result<Self, BackendConfigError> {
        match (config.kind, config.agent_uri.as_deref()) {
            (BackendKind::Local, _) => Ok(Self::local()),
            (BackendKind::Auto, None) => {
                tracing::warn!(
                    "Task protection is simulated: ECS_AGENT_URI is not set, so this process is not running in ECS"
                );
                Ok(Self::Local(LocalBackend::new()))
            }
            (BackendKind::Auto | BackendKind::Agent, Some(uri)) => Self::agent(uri),
            (BackendKind::Agent, None) => Err(BackendConfigError::Missing {
                kind_var: BackendKind::ENV,
                kind: BackendKind::Agent,
                variable: "ECS_AGENT_URI",
                hint: " (the ECS agent sets it inside a task; agent 1.65.0 or later is required)",
            }),
            (BackendKind::EcsApi, _) => Self::ecs_api(config).await,
        }
    }

    fn local() -> Self {
        tracing::warn!("Task protection is simulated: {}=local", BackendKind::ENV);
        Self::Local(LocalBackend::new())
    }

    #[cfg(feature = "agent")]
    fn agent(uri: &str) -> Result<Self, BackendConfigError> {
        Ok(Self::Agent(super::AgentBackend::new(uri)?))
    }

    #[cfg(not(feature = "agent"))]
    fn agent(_uri: &str) -> Result<Self, BackendConfigError> {
        Err(BackendConfigError::NotCompiled(BackendKind::Agent))
    }

    #[cfg(feature = "ecs-api")]
    async fn ecs_api(config: &BackendConfig) -> Result<Self, BackendConfigError> {
        let metadata_uri = config
            .metadata_uri
            .as_deref()
            .ok_or(BackendConfigError::Missing {
                kind_var: BackendKind::ENV,
                kind: BackendKind::EcsApi,
                variable: "ECS_CONTAINER_METADATA_URI_V4",
                hint: " (the ECS agent sets it inside a task)",
            })?;
        let task = crate::metadata::TaskIdentity::discover(metadata_uri).await?;
        // The state machine retries with its own backoff and rate limit.
        let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .load()
            .await;
        let client = aws_sdk_ecs::Client::new(&sdk);
        Ok(Self::EcsApi(super::EcsApiBackend::new(client, task)))
    }

    #[cfg(not(feature = "ecs-api"))]
    #[allow(clippy::unused_async)]
    async fn ecs_api(_config: &BackendConfig) -> Result<Self, BackendConfigError> {
        Err(BackendConfigError::NotCompiled(BackendKind::EcsApi))
    }
}

impl Backend for AnyBackend {
    async fn update(&self, request: ProtectionRequest) -> Result<Grant, ProtectionError> {
        match self {
            #[cfg(feature = "agent")]
            Self::Agent(b) => b.update(request).await,
            #[cfg(feature = "ecs-api")]
            Self::EcsApi(b) => b.update(request).await,
            Self::Local(b) => b.update(request).await,
        }
    }

    fn simulated(&self) -> bool {
        matches!(self, Self::Local(_))
    }

    fn describe(&self) -> String {
        match self {
            #[cfg(feature = "agent")]
            Self::Agent(b) => b.describe(),
            #[cfg(feature = "ecs-api")]
            Self::EcsApi(b) => b.describe(),
            Self::Local(b) => b.describe(),
        }
    }
}
