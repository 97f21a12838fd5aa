//! Where protection PUTs go: the ECS agent, the ECS API, or a local simulation.
//!
//! A backend makes exactly one call per [`Backend::update`] and classifies the answer.
//! It never retries: retry, backoff and rate limiting belong to the state machine, which
//! sees every call and so can keep the account-wide ECS rate limit.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

#[cfg(feature = "agent")]
mod agent;
#[cfg(any(feature = "agent", feature = "testing"))]
pub(crate) mod answer;
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

/// How long the ECS agent works on one PUT: its own call to ECS is cancelled after
/// 4 s (`ecsCallTimeout` in the agent's `agent/handlers/task_server_setup.go`), so a
/// PUT whose answer was lost can change ECS's state until then, and a margin.
pub const AGENT_LANDING_WINDOW: Duration = Duration::from_secs(5);

/// Added to a backend's own bound on a call, for the time between ECS receiving a
/// request and applying it.
pub const LANDING_MARGIN: Duration = Duration::from_secs(1);

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
    enabled: bool,
    expires_at: Option<SystemTime>,
    task_arn: Option<String>,
}

impl Grant {
    /// ECS protects the task until `expires_at`, as it reported.
    #[must_use]
    pub fn protected_until(expires_at: SystemTime) -> Self {
        Self {
            enabled: true,
            expires_at: Some(expires_at),
            task_arn: None,
        }
    }

    /// ECS protects the task; the answer gave no expiry (the state machine then
    /// assumes the duration it asked for).
    #[must_use]
    pub fn protected() -> Self {
        Self {
            enabled: true,
            expires_at: None,
            task_arn: None,
        }
    }

    /// ECS no longer protects the task.
    #[must_use]
    pub fn unprotected() -> Self {
        Self {
            enabled: false,
            expires_at: None,
            task_arn: None,
        }
    }

    /// The same, naming the task.
    #[must_use]
    pub fn with_task_arn(mut self, task_arn: impl Into<String>) -> Self {
        self.task_arn = Some(task_arn.into());
        self
    }

    /// Whether the task is now protected.
    #[must_use]
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// When protection ends, as ECS reported it.
    #[must_use]
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.expires_at
    }

    /// The task's ARN, when the answer names it.
    #[must_use]
    pub fn task_arn(&self) -> Option<&str> {
        self.task_arn.as_deref()
    }
}

/// ECS answered, and refused. Retrying will not help soon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    reason: String,
    detail: Option<String>,
    status: Option<u16>,
}

impl Rejection {
    /// A refusal for `reason`: the `Reason` of a `failure` (`TASK_NOT_VALID`,
    /// `DEPLOYMENT_BLOCKED`, ...) or an error `Code` (`AccessDeniedException`, ...).
    #[must_use]
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            detail: None,
            status: None,
        }
    }

    /// The same, with the answer's `Detail` or `Message`.
    #[must_use]
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// The same, with the HTTP status of the answer.
    #[must_use]
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    /// `Reason` of a `failure` or the error `Code`.
    #[must_use]
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// `Detail` or `Message`, when given.
    #[must_use]
    pub fn detail(&self) -> Option<&str> {
        self.detail.as_deref()
    }

    /// The HTTP status of the answer, when there was one.
    #[must_use]
    pub fn status(&self) -> Option<u16> {
        self.status
    }
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
#[non_exhaustive]
pub enum ThrottledBy {
    /// ECS itself, called directly (the ECS API backend, whose SDK retries are
    /// off): ECS refused before acting.
    Ecs,
    /// ECS, called by the agent: `ThrottlingException` passed on as HTTP 400. The
    /// agent's SDK retries inside its 4 s budget, so an earlier try of the same PUT
    /// may have gone through before the last one was throttled.
    EcsThroughAgent,
    /// The agent's own limiter: HTTP 429 with a text body. ECS was not called.
    Agent,
}

impl fmt::Display for ThrottledBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ecs => "ECS",
            Self::EcsThroughAgent => "ECS (through the agent)",
            Self::Agent => "the ECS agent",
        })
    }
}

/// What made a request fail below HTTP: an I/O error, the HTTP client's error.
pub type Cause = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// Why a protection call did not succeed.
///
/// Failures below HTTP keep their cause as [`source`](std::error::Error::source);
/// [`ErrorChain`](crate::ErrorChain) writes an error with its causes on one line.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ProtectionError {
    /// ECS refused: a `failure` in a 200 answer, or a client error such as
    /// `AccessDeniedException`. Not retried.
    #[error("refused by ECS: {0}")]
    Rejected(Rejection),
    /// Rate limited; retried after a backoff.
    #[error("throttled by {by}: {message}")]
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
    #[error("unreachable: {message}")]
    Unreachable {
        /// What could not be done, e.g. `cannot connect to 169.254.170.2:80`.
        message: String,
        /// Why.
        #[source]
        source: Option<Cause>,
    },
    /// The request went out but did not complete: connection reset, a broken
    /// answer. ECS may have acted on it.
    #[error("request failed: {message}")]
    Transport {
        /// What failed, e.g. `the connection closed before an answer`.
        message: String,
        /// Why.
        #[source]
        source: Option<Cause>,
    },
    /// No answer within the request timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
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
    /// The answer came from something other than the agent's task protection
    /// endpoint (its router's plain-text 404 or 405): the agent URI is wrong. ECS was
    /// not called, and trying again will not help.
    #[error(
        "{url} is not the ECS agent's task protection endpoint (HTTP {status}, body {excerpt:?}): check {setting}"
    )]
    Misdirected {
        /// The URL the PUT went to.
        url: String,
        /// Where the agent URI came from: `ECS_AGENT_URI`, or the call that set it.
        setting: &'static str,
        /// HTTP status.
        status: u16,
        /// The first bytes of the body, as text.
        excerpt: String,
    },
}

impl PartialEq for ProtectionError {
    /// The same kind of error with the same text, causes included.
    fn eq(&self, other: &Self) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
            && crate::ErrorChain(self).to_string() == crate::ErrorChain(other).to_string()
    }
}

impl Eq for ProtectionError {}

impl ProtectionError {
    /// Whether trying again later may succeed. Everything but a rejection and a
    /// misdirected request is.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        !matches!(self, Self::Rejected(_) | Self::Misdirected { .. })
    }

    /// Whether ECS may have applied the request although the answer says otherwise
    /// or was lost.
    #[must_use]
    pub fn maybe_applied(&self) -> bool {
        matches!(
            self,
            Self::Server { .. }
                | Self::Transport { .. }
                | Self::Timeout(_)
                | Self::Malformed { .. }
                | Self::Throttled {
                    by: ThrottledBy::EcsThroughAgent,
                    ..
                }
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

    /// The request went out and failed; `message` says how. Add the cause with
    /// [`caused_by`](Self::caused_by).
    #[must_use]
    pub fn transport(message: impl Into<String>) -> Self {
        Self::Transport {
            message: message.into(),
            source: None,
        }
    }

    /// The request could not be sent; `message` says what. Add the cause with
    /// [`caused_by`](Self::caused_by).
    #[must_use]
    pub fn unreachable(message: impl Into<String>) -> Self {
        Self::Unreachable {
            message: message.into(),
            source: None,
        }
    }

    /// The same error, with `cause` as its source: for [`Transport`](Self::Transport)
    /// and [`Unreachable`](Self::Unreachable); any other is returned unchanged.
    #[must_use]
    pub fn caused_by(mut self, cause: impl std::error::Error + Send + Sync + 'static) -> Self {
        if let Self::Transport { source, .. } | Self::Unreachable { source, .. } = &mut self {
            *source = Some(Arc::new(cause));
        }
        self
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

/// Sorts an ECS error answer (`Code`, `Message`) into throttled, server or refused;
/// `throttled_by` says who a throttle is from.
#[cfg(any(feature = "agent", feature = "ecs-api", feature = "testing"))]
pub(crate) fn classify_error(
    status: u16,
    code: String,
    message: String,
    throttled_by: ThrottledBy,
) -> ProtectionError {
    if code == "ThrottlingException" || code == "RequestLimitExceeded" || status == 429 {
        ProtectionError::Throttled {
            by: throttled_by,
            message: if message.is_empty() { code } else { message },
        }
    } else if status >= 500 || code == "ServerException" || code == "RequestCanceled" {
        ProtectionError::Server {
            status,
            code,
            message,
        }
    } else {
        let reason = if code.is_empty() {
            format!("HTTP {status}")
        } else {
            code
        };
        let mut rejection = Rejection::new(reason).with_status(status);
        if !message.is_empty() {
            rejection = rejection.with_detail(message);
        }
        ProtectionError::Rejected(rejection)
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

    /// How long after it was sent a request whose answer was lost (a timeout, a 5xx,
    /// a broken connection) may still change what ECS holds, when the state machine
    /// waits `request_timeout` for an answer. No request of the other kind leaves
    /// before then, so an enable can never land after a later disable.
    ///
    /// By default the request timeout and [`LANDING_MARGIN`]: whatever the backend
    /// calls may finish its work until the caller gives up, and a little after. A
    /// backend whose far end bounds its own work may say less.
    fn landing_window(&self, request_timeout: Duration) -> Duration {
        request_timeout.saturating_add(LANDING_MARGIN)
    }

    /// True when protection is simulated rather than set on a real ECS task.
    fn simulated(&self) -> bool {
        false
    }

    /// The task this backend sets protection for, when it knows: two
    /// [`TaskProtection`](crate::TaskProtection)s started in one process on backends
    /// with the same identity share one state machine, so that neither releases
    /// what the other holds. `None` (the default) shares nothing.
    fn identity(&self) -> Option<String> {
        None
    }

    /// A short description for logs, e.g. `ECS agent at http://169.254.170.2/api/...`.
    fn describe(&self) -> String;
}
