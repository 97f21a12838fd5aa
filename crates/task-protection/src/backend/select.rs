//! Choosing a backend: from the environment, or in code.
//!
//! Inside ECS the agent sets `ECS_AGENT_URI` (and `ECS_CONTAINER_METADATA_URI_V4`), so
//! `auto` picks the agent there. Protection is simulated only when asked for
//! (`local`), or when no ECS variable is present at all, and one line says so: a task
//! in ECS whose agent lacks the endpoint is an error, not a silently unprotected
//! service. Deployments set `TASK_PROTECTION_BACKEND=agent`, which without
//! `ECS_AGENT_URI` is always an error.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use super::{Backend, Grant, LocalBackend, ProtectionError, ProtectionRequest};
#[cfg(any(feature = "ecs-api", feature = "drain"))]
use crate::metadata::MetadataError;

/// The variable that carries the agent URI inside a task.
pub(crate) const AGENT_URI_VAR: &str = "ECS_AGENT_URI";
/// The variable that carries the task metadata URI inside a task.
pub(crate) const METADATA_URI_VAR: &str = "ECS_CONTAINER_METADATA_URI_V4";

/// Which backend to use: the value of `TASK_PROTECTION_BACKEND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[non_exhaustive]
pub enum BackendKind {
    /// The agent when `ECS_AGENT_URI` is set; the local simulation when no ECS
    /// variable is set (not in ECS); an error in ECS without `ECS_AGENT_URI`.
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
                name: Self::ENV,
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
    /// A value that the chosen backend needs is not set.
    #[error("{kind_setting}={kind} needs {name}, which is not set{hint}")]
    Missing {
        /// Where the choice came from: `TASK_PROTECTION_BACKEND`, or the call that
        /// made it.
        kind_setting: &'static str,
        /// The backend chosen.
        kind: BackendKind,
        /// The missing value: its environment variable, or the call that sets it.
        name: &'static str,
        /// Why it might be missing.
        hint: &'static str,
    },
    /// A value that cannot be used.
    #[error("{name}={value:?} is not valid: {reason}")]
    Invalid {
        /// Where the value came from: its environment variable, or the call that
        /// set it.
        name: &'static str,
        /// The value.
        value: String,
        /// Why it was refused.
        reason: String,
    },
    /// The process runs in ECS (task metadata is there) but the agent's protection
    /// endpoint is not: simulating would leave a real task unprotected.
    #[error(
        "{metadata_var} is set, so this runs in ECS, but ECS_AGENT_URI is not: the ECS agent \
         is older than 1.65.0 and has no task protection endpoint. Update the agent, or set \
         TASK_PROTECTION_BACKEND=ecs-api to call the ECS API, or =local to run unprotected"
    )]
    NoAgentInEcs {
        /// The variable that showed ECS.
        metadata_var: &'static str,
    },
    /// The task's identity could not be read from task metadata.
    #[cfg(any(feature = "ecs-api", feature = "drain"))]
    #[cfg_attr(docsrs, doc(cfg(any(feature = "ecs-api", feature = "drain"))))]
    #[error(transparent)]
    Discovery(MetadataError),
    /// The backend was compiled out.
    #[error("the {0} backend is not compiled into this build")]
    NotCompiled(BackendKind),
}

/// A value and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Setting {
    value: String,
    /// The environment variable, or the call that set it.
    name: &'static str,
}

/// What selects and configures a backend: read from the environment with
/// [`from_env`](Self::from_env), or built in code.
///
/// ```
/// use task_protection::{BackendConfig, BackendKind};
///
/// let config = BackendConfig::new(BackendKind::Agent)
///     .with_agent_uri("http://169.254.170.2/api/0123");
/// assert_eq!(config.kind(), BackendKind::Agent);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendConfig {
    kind: BackendKind,
    /// Where the choice came from.
    kind_setting: Option<&'static str>,
    agent_uri: Option<Setting>,
    metadata_uri: Option<Setting>,
}

impl BackendConfig {
    /// Backend `kind`, with nothing else set.
    #[must_use]
    pub fn new(kind: BackendKind) -> Self {
        Self {
            kind,
            kind_setting: None,
            agent_uri: None,
            metadata_uri: None,
        }
    }

    /// Reads `TASK_PROTECTION_BACKEND` (unset: `auto`), `ECS_AGENT_URI` and
    /// `ECS_CONTAINER_METADATA_URI_V4`.
    ///
    /// # Errors
    /// When `TASK_PROTECTION_BACKEND` names no backend.
    pub fn from_env() -> Result<Self, BackendConfigError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// Like [`from_env`](Self::from_env), with the variables looked up by `lookup`.
    ///
    /// # Errors
    /// When `TASK_PROTECTION_BACKEND` names no backend.
    pub fn from_vars(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, BackendConfigError> {
        let kind = match lookup(BackendKind::ENV) {
            Some(raw) => raw.parse()?,
            None => BackendKind::Auto,
        };
        let mut config = Self::uris_from(&lookup);
        config.kind = kind;
        config.kind_setting = Some(BackendKind::ENV);
        Ok(config)
    }

    /// Backend `kind`, chosen elsewhere (a command-line flag), with `ECS_AGENT_URI`
    /// and `ECS_CONTAINER_METADATA_URI_V4` read from the environment.
    #[must_use]
    pub fn from_env_with_kind(kind: BackendKind) -> Self {
        let mut config = Self::uris_from(&|name: &str| std::env::var(name).ok());
        config.kind = kind;
        config.kind_setting = Some(BackendKind::ENV);
        config
    }

    fn uris_from(lookup: &dyn Fn(&str) -> Option<String>) -> Self {
        let var = |name: &'static str| {
            lookup(name)
                .filter(|v| !v.trim().is_empty())
                .map(|value| Setting { value, name })
        };
        Self {
            kind: BackendKind::Auto,
            kind_setting: None,
            agent_uri: var(AGENT_URI_VAR),
            metadata_uri: var(METADATA_URI_VAR),
        }
    }

    /// The same, with the agent URI set in code (inside a task it is the value of
    /// `ECS_AGENT_URI`).
    #[must_use]
    pub fn with_agent_uri(mut self, uri: impl Into<String>) -> Self {
        self.agent_uri = Some(Setting {
            value: uri.into(),
            name: "BackendConfig::with_agent_uri",
        });
        self
    }

    /// The same, with the task metadata URI set in code (inside a task it is the
    /// value of `ECS_CONTAINER_METADATA_URI_V4`).
    #[must_use]
    pub fn with_metadata_uri(mut self, uri: impl Into<String>) -> Self {
        self.metadata_uri = Some(Setting {
            value: uri.into(),
            name: "BackendConfig::with_metadata_uri",
        });
        self
    }

    /// The backend chosen.
    #[must_use]
    pub fn kind(&self) -> BackendKind {
        self.kind
    }

    /// The agent URI, when set.
    #[must_use]
    pub fn agent_uri(&self) -> Option<&str> {
        self.agent_uri.as_ref().map(|s| s.value.as_str())
    }

    /// The task metadata URI, when set.
    #[must_use]
    pub fn metadata_uri(&self) -> Option<&str> {
        self.metadata_uri.as_ref().map(|s| s.value.as_str())
    }

    fn kind_setting(&self) -> &'static str {
        self.kind_setting.unwrap_or("BackendConfig::new")
    }

    /// How to name a missing URI: its variable when the configuration came from the
    /// environment, the call that sets it otherwise.
    fn uri_name(&self, variable: &'static str, call: &'static str) -> &'static str {
        if self.kind_setting.is_some() {
            variable
        } else {
            call
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
    /// Builds the backend that `config` selects. The local simulation only when
    /// asked for (`local`), or for `auto` when neither `ECS_AGENT_URI` nor
    /// `ECS_CONTAINER_METADATA_URI_V4` is set; a warning says so once.
    ///
    /// # Errors
    /// When the chosen backend lacks a value it needs, when `auto` finds ECS without
    /// the agent's endpoint, or when the ECS API backend cannot find its task.
    pub async fn connect(config: &BackendConfig) -> Result<Self, BackendConfigError> {
        match (config.kind, config.agent_uri.as_ref()) {
            (BackendKind::Local, _) => {
                tracing::warn!(
                    "Task protection is simulated: {}=local",
                    config.kind_setting()
                );
                Ok(Self::Local(LocalBackend::new()))
            }
            (BackendKind::Auto | BackendKind::Agent, Some(uri)) => Self::agent(uri),
            (BackendKind::Auto, None) => match &config.metadata_uri {
                Some(meta) => Err(BackendConfigError::NoAgentInEcs {
                    metadata_var: meta.name,
                }),
                None => {
                    tracing::warn!(
                        "Task protection is simulated: neither ECS_AGENT_URI nor \
                         ECS_CONTAINER_METADATA_URI_V4 is set, so this process is not running in ECS"
                    );
                    Ok(Self::Local(LocalBackend::new()))
                }
            },
            (BackendKind::Agent, None) => Err(BackendConfigError::Missing {
                kind_setting: config.kind_setting(),
                kind: BackendKind::Agent,
                name: config.uri_name(AGENT_URI_VAR, "BackendConfig::with_agent_uri"),
                hint: " (the ECS agent sets it inside a task; agent 1.65.0 or later is required)",
            }),
            (BackendKind::EcsApi, _) => Self::ecs_api(config).await,
        }
    }

    #[cfg(feature = "agent")]
    fn agent(uri: &Setting) -> Result<Self, BackendConfigError> {
        Ok(Self::Agent(super::AgentBackend::with_setting(
            &uri.value, uri.name,
        )?))
    }

    #[cfg(not(feature = "agent"))]
    fn agent(_uri: &Setting) -> Result<Self, BackendConfigError> {
        Err(BackendConfigError::NotCompiled(BackendKind::Agent))
    }

    #[cfg(feature = "ecs-api")]
    async fn ecs_api(config: &BackendConfig) -> Result<Self, BackendConfigError> {
        let metadata_uri = config
            .metadata_uri
            .as_ref()
            .ok_or(BackendConfigError::Missing {
                kind_setting: config.kind_setting(),
                kind: BackendKind::EcsApi,
                name: config.uri_name(METADATA_URI_VAR, "BackendConfig::with_metadata_uri"),
                hint: " (the ECS agent sets it inside a task)",
            })?;
        let task = crate::metadata::TaskIdentity::discover(&metadata_uri.value).await?;
        let client = crate::ecs_client::EcsClient::from_env().await;
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

    fn landing_window(&self, request_timeout: Duration) -> Duration {
        match self {
            #[cfg(feature = "agent")]
            Self::Agent(b) => b.landing_window(request_timeout),
            #[cfg(feature = "ecs-api")]
            Self::EcsApi(b) => b.landing_window(request_timeout),
            Self::Local(b) => b.landing_window(request_timeout),
        }
    }

    fn simulated(&self) -> bool {
        matches!(self, Self::Local(_))
    }

    fn identity(&self) -> Option<String> {
        match self {
            #[cfg(feature = "agent")]
            Self::Agent(b) => b.identity(),
            #[cfg(feature = "ecs-api")]
            Self::EcsApi(b) => b.identity(),
            Self::Local(b) => b.identity(),
        }
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
