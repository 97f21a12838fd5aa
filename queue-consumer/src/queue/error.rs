//! What an SQS error means for what to do next: every error gets one [`ErrorKind`],
//! decided here in [`classify`] and [`ErrorKind::of_code`], so callers only match on
//! what to do next.

use std::fmt;
use std::time::Duration;

use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

/// What an SQS error means for what to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No answer within the time limit, or the connection broke after sending: SQS
    /// may or may not have applied the call.
    Timeout,
    /// SQS asked to slow down; nothing was applied.
    Throttled,
    /// A failure that may pass: connection refused, 5xx.
    Transient,
    /// The task role lacks the IAM permission for the operation (`AccessDenied`).
    Denied,
    /// Retrying cannot help: the queue does not exist, the credentials are missing or
    /// unknown, the receipt handle is no longer valid, the request is invalid.
    Permanent,
}

impl ErrorKind {
    /// The kind of an SQS error code (from an error answer or a failed batch entry).
    #[must_use]
    pub fn of_code(code: &str, server_fault: bool) -> Self {
        match code {
            "AccessDenied" | "AccessDeniedException" => Self::Denied,
            "ThrottlingException" | "Throttling" | "RequestThrottled" | "KmsThrottled" => {
                Self::Throttled
            }
            "InternalError" | "InternalFailure" | "ServiceUnavailable" => Self::Transient,
            _ if server_fault => Self::Transient,
            _ => Self::Permanent,
        }
    }

    /// Whether trying the same call again later may succeed.
    #[must_use]
    pub fn may_pass(self) -> bool {
        matches!(self, Self::Timeout | Self::Throttled | Self::Transient)
    }
}

/// An SQS call failed as a whole (or, for a batch, one entry failed).
#[derive(Debug, Clone)]
pub struct SqsError {
    /// The SQS operation.
    pub operation: &'static str,
    /// What to do about it.
    pub kind: ErrorKind,
    /// SQS's error code, when it answered with one.
    pub code: Option<String>,
    /// What went wrong, with the SDK's error chain.
    pub message: String,
}

impl fmt::Display for SqsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.code {
            Some(code) => write!(f, "{}: {code}: {}", self.operation, self.message),
            None => write!(f, "{}: {}", self.operation, self.message),
        }
    }
}

impl std::error::Error for SqsError {}

/// Errors are equal when they mean the same: same operation, kind and code.
impl PartialEq for SqsError {
    fn eq(&self, other: &Self) -> bool {
        self.operation == other.operation && self.kind == other.kind && self.code == other.code
    }
}

impl SqsError {
    pub(super) fn new(
        operation: &'static str,
        kind: ErrorKind,
        message: impl Into<String>,
    ) -> Self {
        Self {
            operation,
            kind,
            code: None,
            message: message.into(),
        }
    }

    pub(super) fn timed_out(operation: &'static str, after: Duration) -> Self {
        Self::new(
            operation,
            ErrorKind::Timeout,
            format!("no answer within {}s (timed out)", after.as_secs()),
        )
    }

    /// The IAM action this operation needs, e.g. `sqs:ChangeMessageVisibility`.
    #[must_use]
    pub fn action(&self) -> String {
        let op = self
            .operation
            .strip_suffix("Batch")
            .unwrap_or(self.operation);
        format!("sqs:{op}")
    }

    /// What to do about an error that retrying cannot fix, for the one line the
    /// worker prints before it exits; `setting` names the queue's variable.
    #[must_use]
    pub fn advice(&self, setting: &str) -> String {
        match (self.kind, self.code.as_deref()) {
            (ErrorKind::Denied, _) => format!(
                "the task role lacks {}: grant it on this queue (see copilot/queue-consumer/addons)",
                self.action()
            ),
            (_, Some("AWS.SimpleQueueService.NonExistentQueue" | "QueueDoesNotExist")) => {
                format!("check {setting}, and QUEUE_REGION or the Region in the queue URL")
            }
            (_, Some("NoCredentials")) => {
                "no AWS credentials: give the task a task role".to_owned()
            }
            _ => format!("check {setting}, the Region and the task role"),
        }
    }
}

/// The IAM action an SQS operation needs: a batch call needs its single call's.
pub(super) fn iam_action(operation: &str) -> String {
    let op = operation.strip_suffix("Batch").unwrap_or(operation);
    format!("sqs:{op}")
}

/// The kind of an SDK error, decided in one place.
pub fn classify<E>(operation: &'static str, err: &SdkError<E>) -> SqsError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let context = DisplayErrorContext(err).to_string();
    let (kind, code) = match err {
        SdkError::ServiceError(e) => {
            let status = e.raw().status().as_u16();
            let code = e.err().code().map(str::to_owned);
            let kind = code.as_deref().map_or(
                if status >= 500 {
                    ErrorKind::Transient
                } else {
                    ErrorKind::Permanent
                },
                |c| ErrorKind::of_code(c, status >= 500),
            );
            (kind, code)
        }
        SdkError::TimeoutError(_) => (ErrorKind::Timeout, None),
        SdkError::DispatchFailure(d) if d.is_timeout() => (ErrorKind::Timeout, None),
        // No identity: the credential chain found nothing to sign with.
        _ if context.contains("credentials") || context.contains("identity") => {
            (ErrorKind::Permanent, Some("NoCredentials".to_owned()))
        }
        SdkError::ConstructionFailure(_) => (ErrorKind::Permanent, None),
        // A connection broken mid-call: the request may have been applied.
        SdkError::ResponseError(_) => (ErrorKind::Timeout, None),
        _ => (ErrorKind::Transient, None),
    };
    let message = match err {
        SdkError::ServiceError(e) => e.err().message().unwrap_or("").to_owned(),
        _ => context,
    };
    SqsError {
        operation,
        kind,
        code,
        message,
    }
}

/// One entry of a batch call failed inside an HTTP 200.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryFailure {
    /// The entry's index in the batch.
    pub index: usize,
    /// SQS's error code, e.g. `ReceiptHandleIsInvalid`.
    pub code: String,
    /// SQS's message.
    pub message: String,
    /// True when the request itself was wrong (retrying will not help).
    pub sender_fault: bool,
}

impl EntryFailure {
    /// The failure as an error of `operation`.
    #[must_use]
    pub fn to_error(&self, operation: &'static str) -> SqsError {
        SqsError {
            operation,
            kind: ErrorKind::of_code(&self.code, !self.sender_fault),
            code: Some(self.code.clone()),
            message: self.message.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_have_one_kind_each() {
        let kind = |c| ErrorKind::of_code(c, false);
        assert_eq!(kind("AccessDenied"), ErrorKind::Denied);
        assert_eq!(kind("AccessDeniedException"), ErrorKind::Denied);
        assert_eq!(kind("RequestThrottled"), ErrorKind::Throttled);
        assert_eq!(kind("ThrottlingException"), ErrorKind::Throttled);
        assert_eq!(kind("InternalError"), ErrorKind::Transient);
        for permanent in [
            "AWS.SimpleQueueService.NonExistentQueue",
            "QueueDoesNotExist",
            "InvalidClientTokenId",
            "SignatureDoesNotMatch",
            "ReceiptHandleIsInvalid",
            "MessageNotInflight",
        ] {
            assert_eq!(kind(permanent), ErrorKind::Permanent, "{permanent}");
        }
        assert_eq!(ErrorKind::of_code("Whatever", true), ErrorKind::Transient);
        assert!(ErrorKind::Timeout.may_pass());
        assert!(!ErrorKind::Denied.may_pass());
    }

    #[test]
    fn a_denial_names_the_iam_action() {
        let e = SqsError::new("ChangeMessageVisibilityBatch", ErrorKind::Denied, "no");
        assert_eq!(e.action(), "sqs:ChangeMessageVisibility");
        assert!(
            e.advice("COPILOT_QUEUE_URI")
                .contains("sqs:ChangeMessageVisibility"),
            "{}",
            e.advice("COPILOT_QUEUE_URI")
        );
        let e = SqsError::new("ReceiveMessage", ErrorKind::Denied, "no");
        assert_eq!(e.action(), "sqs:ReceiveMessage");
    }
}
