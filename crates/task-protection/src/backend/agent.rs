//! The ECS agent's task protection endpoint: `$ECS_AGENT_URI/task-protection/v1/state`.
//!
//! How its answers are read is in [`answer`](super::answer); how its connections are
//! kept, in [`link_local`](crate::link_local).

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::answer::{Endpoint, classify};
use super::{
    AGENT_LANDING_WINDOW, Backend, BackendConfigError, Grant, ProtectionError, ProtectionRequest,
};
use crate::link_local::{Failure, LinkLocal};

/// The path under `ECS_AGENT_URI`.
const STATE_PATH: &str = "/task-protection/v1/state";

/// Sends protection PUTs to the ECS agent.
#[derive(Debug, Clone)]
pub struct AgentBackend {
    client: Arc<LinkLocal>,
    url: String,
    /// Where the URI came from, for errors: `ECS_AGENT_URI` or `AgentBackend::new`.
    setting: &'static str,
}

/// The PUT body; field names are PascalCase, and the agent rejects unknown fields.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct PutBody {
    protection_enabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_in_minutes: Option<u16>,
}

impl AgentBackend {
    /// A backend for the agent at `agent_uri`, such as the value of `ECS_AGENT_URI`
    /// (`http://169.254.170.2/api/<id>`).
    ///
    /// The agent serves plain `http` on a link-local address, and this client carries
    /// no TLS stack, so that an agent-only build stays small: an `https` URL is
    /// refused here rather than failing at the first request.
    ///
    /// # Errors
    /// When `agent_uri` is not an absolute `http://` URL.
    pub fn new(agent_uri: &str) -> Result<Self, BackendConfigError> {
        Self::with_setting(agent_uri, "AgentBackend::new")
    }

    /// The same, naming where the URI came from in errors.
    pub(crate) fn with_setting(
        agent_uri: &str,
        setting: &'static str,
    ) -> Result<Self, BackendConfigError> {
        let client = LinkLocal::new(agent_uri).map_err(|reason| BackendConfigError::Invalid {
            name: setting,
            value: agent_uri.to_owned(),
            reason,
        })?;
        Ok(Self {
            url: client.url(STATE_PATH),
            client: Arc::new(client),
            setting,
        })
    }

    /// The full URL PUTs go to.
    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
    }

    async fn send(&self, request: ProtectionRequest) -> Result<Grant, ProtectionError> {
        let body = PutBody {
            protection_enabled: request.enabled,
            expires_in_minutes: request.expires_in_minutes,
        };
        let json = serde_json::to_vec(&body).unwrap_or_default();
        let answer = self
            .client
            .send(http::Method::PUT, STATE_PATH, Some(json))
            .await
            .map_err(|failure| match failure {
                // Nothing reached the agent, so ECS cannot have acted.
                Failure::NotSent(e) => ProtectionError::unreachable(format!(
                    "cannot connect to the ECS agent at {}",
                    self.client.address()
                ))
                .caused_by(BoxedCause(e)),
                Failure::Lost(e) => ProtectionError::transport(format!(
                    "no answer from the ECS agent at {}",
                    self.client.address()
                ))
                .caused_by(e),
            })?;
        classify(
            answer.status,
            &answer.body,
            Endpoint {
                url: &self.url,
                setting: self.setting,
            },
        )
    }
}

/// A boxed error as an error type of its own, to keep it as a source.
#[derive(Debug)]
struct BoxedCause(Box<dyn std::error::Error + Send + Sync>);

impl std::fmt::Display for BoxedCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BoxedCause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl Backend for AgentBackend {
    async fn update(&self, request: ProtectionRequest) -> Result<Grant, ProtectionError> {
        self.send(request).await
    }

    /// The agent cancels its own ECS call 4 s after it got the PUT, whatever the
    /// client waits.
    fn landing_window(&self, _request_timeout: Duration) -> Duration {
        AGENT_LANDING_WINDOW
    }

    /// Every agent backend in a process sets protection for the process's task.
    fn identity(&self) -> Option<String> {
        Some(format!("agent {}", self.url))
    }

    fn describe(&self) -> String {
        format!("ECS agent at {}", self.url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_body_is_exact_pascal_case() {
        let on = serde_json::to_string(&PutBody {
            protection_enabled: true,
            expires_in_minutes: Some(5),
        })
        .unwrap();
        assert_eq!(on, r#"{"ProtectionEnabled":true,"ExpiresInMinutes":5}"#);
        let off = serde_json::to_string(&PutBody {
            protection_enabled: false,
            expires_in_minutes: None,
        })
        .unwrap();
        assert_eq!(off, r#"{"ProtectionEnabled":false}"#);
    }
}
