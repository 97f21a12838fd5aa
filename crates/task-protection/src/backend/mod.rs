//! Where protection PUTs go: the ECS agent, the ECS API, or a local simulation.
//!
//! A backend makes exactly one call per [`Backend::update`] and classifies the answer.
//! It never retries: retry, backoff and rate limiting belong to the state machine, which
//! sees every call and so can keep the account-wide ECS rate limit.

use std::fmt;
use std::future::Future;
use std::time::SystemTime;

#[cfg(feature = "agent")]
mod agent;
#[cfg(feature = "ecs-api")]
mod ecs_api;
mod local;
mod select;

#[cfg(feature = "agent")]
#[cfg_attr(docsrs, doc(cfg(feature = "agent")))]
pub use agent::AgentBackend;
#[cfg(feature = "ecs-api")]
#[cfg_attr(docsrs, doc(cfg(feature = "ecs-api")))]
pub use ecs_api::EcsApiBackend;
pub use local::LocalBackend;
pub use select::{AnyBackend, BackendConfig, BackendConfigError, BackendKind};

/// One protection PUT: enable for some minutes, or disable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtectionRequest {
    /// `ProtectionEnabled`.
    pub enabled: bool,
    /// `ExpiresInMinutes`; always `None` when disabling, as ECS expects.
    pub expires_in_minutes: Option<u16>,
}

impl ProtectionRequest {
    /// Enable (or extend) protection for `minutes` from now.
    #[must_use]
    pub fn enable(minutes: u16) -> Self {
        Self {
            enabled: true,
            expires_in_minutes: Some(minutes),
        }
    }

    /// Disable protection.
    #[must_use]
    pub fn disable() -> Self {
        Self {
            enabled: false,
            expires_in_minutes: None,
        }
    }
}

/// What ECS confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Whether the task is now protected.
    pub enabled: bool,
    /// When protection ends, as ECS reported it.
    pub expires_at: Option<SystemTime>,
    /// The task's ARN, when the answer names it.
    pub task_arn: Option<String>,
}

/// ECS answered, and refused. Retrying will not help soon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// `Reason` of a `failure` (`TASK_NOT_VALID`, `DEPLOYMENT_BLOCKED`, ...) or the
    /// error `Code` (`AccessDeniedException`, ...).
    pub reason: String,
    /// `Detail` or `Message`, when given.
    pub detail: Option<String>,
    /// The HTTP status of the answer, when there was one.
    pub status: Option<u16>,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)?;
        if let Some(detail) = &self.detail {
            write!(f, " ({detail})")?;
        }
        Ok(())
    }
}

/// Who throttled a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThrottledBy {
    /// ECS itself: `ThrottlingException`, which the agent passes on as HTTP 400.
    Ecs,
    /// The agent's own limiter: HTTP 429 with a text body.
    Agent,
}

/// Why a protection call did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtectionError {
    /// ECS refused: a `failure` in a 200 answer, or a client error such as
    /// `AccessDeniedException`. Not retried.
    #[error("refused by ECS: {0}")]
    Rejected(Rejection),
    /// Rate limited; retried after a backoff.
    #[error("throttled by {}: {message}", match .by { ThrottledBy::Ecs => "ECS", ThrottledBy::Agent => "the ECS agent" })]
    Throttled {
        /// ECS or the agent.
        by: ThrottledBy,
        /// What the answer said.
        message: String,
    },
    /// A server-side failure (5xx, including the agent's 504 `RequestCanceled`).
    #[error("server error: HTTP {status} {code}: {message}")]
    Server {
        /// HTTP status.
        status: u16,
        /// Error code, when the body named one.
        code: String,
        /// Error message.
        message: String,
    },
    /// The request could not be sent: connection refused, DNS. ECS cannot have
    /// acted on it.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The request went out but did not complete: connection reset, TLS, a broken
    /// answer. ECS may have acted on it.
    #[error("request failed: {0}")]
    Transport(String),
    /// No answer within the request timeout.
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The answer could not be understood. Quotes the start of the body.
    #[error("unexpected answer (HTTP {status}): {reason}; body: {excerpt:?}")]
    Malformed {
        /// HTTP status.
        status: u16,
        /// What was wrong with it.
        reason: String,
        /// The first bytes of the body, as text.
        excerpt: String,
    },
}

impl ProtectionError {
    /// Whether trying again later may succeed. Everything but a rejection is.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        !matches!(self, Self::Rejected(_))
    }

    /// Whether ECS may have applied the request although the answer was lost.
    pub(crate) fn maybe_applied(&self) -> bool {
        matches!(
            self,
            Self::Server { .. } | Self::Transport(_) | Self::Timeout(_) | Self::Malformed { .. }
        )
    }

    /// A malformed-answer error that quotes at most 200 characters of `body`.
    #[must_use]
    pub fn malformed(status: u16, reason: impl Into<String>, body: &[u8]) -> Self {
        Self::Malformed {
            status,
            reason: reason.into(),
            excerpt: excerpt(body),
        }
    }
}

/// At most 200 characters of `body`, lossily decoded, with an ellipsis when cut.
pub(crate) fn excerpt(body: &[u8]) -> String {
    const MAX: usize = 200;
    let text = String::from_utf8_lossy(body);
    let mut out: String = text.chars().take(MAX).collect();
    if text.chars().nth(MAX).is_some() {
        out.push('…');
    }
    out
}

/// Sorts an error answer (`Code`, `Message`) into throttled, server or refused.
#[cfg_attr(not(any(feature = "agent", feature = "ecs-api")), allow(dead_code))]
pub(crate) fn classify_error(status: u16, code: String, message: String) -> ProtectionError {
    if code == "ThrottlingException" || code == "RequestLimitExceeded" || status == 429 {
        ProtectionError::Throttled {
            by: ThrottledBy::Ecs,
            message: if message.is_empty() { code } else { message },
        }
    } else if status >= 500 || code == "ServerException" || code == "RequestCanceled" {
        ProtectionError::Server {
            status,
            code,
            message,
        }
    } else {
        ProtectionError::Rejected(Rejection {
            reason: if code.is_empty() {
                format!("HTTP {status}")
            } else {
                code
            },
            detail: (!message.is_empty()).then_some(message),
            status: Some(status),
        })
    }
}

/// Somewhere to send protection PUTs.
///
/// Implementations make one call per `update` and classify the answer; they do not
/// retry, sleep or rate limit. The state machine does that, and it calls `update` at
/// most once at a time.
pub trait Backend: Send + Sync + 'static {
    /// Sends one protection PUT.
    fn update(
        &self,
        request: ProtectionRequest,
    ) -> impl Future<Output = Result<Grant, ProtectionError>> + Send;

    /// True when protection is simulated rather than set on a real ECS task.
    fn simulated(&self) -> bool {
        false
    }

    /// A short description for logs, e.g. `ECS agent at http://169.254.170.2/api/...`.
    fn describe(&self) -> String;
}
