//! The SQS calls the worker makes, what it keeps of a received message, and what an
//! SQS error means for what to do next.
//!
//! Every call has a time limit (a long poll: its wait plus a margin): an SQS call
//! that is accepted and never answered must not hold a slot, a shutdown or the receive
//! loop. Every error gets one [`ErrorKind`], decided here in [`classify`] and
//! [`ErrorKind::of_code`], so callers only match on what to do next.
//!
//! SQS batch calls answer HTTP 200 even when single entries fail, so the batch
//! methods return the failed entries for the caller to judge one by one.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use aws_sdk_sqs::Client;
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
    MessageSystemAttributeName,
};
use tokio::time::Instant;

use crate::handler::Attribute;

/// Most messages one receive or batch call handles: SQS's limit.
pub const MAX_BATCH: usize = 10;
/// Time limit of a call other than a long poll. SQS answers in milliseconds; a call
/// without an answer after this long is treated as lost (outcome unknown).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Added to a long poll's wait for its time limit.
pub const RECEIVE_MARGIN: Duration = Duration::from_secs(5);
/// After SQS denies an operation to the task role, it is not called again for this
/// long: IAM changes take a deployment to fix, and retrying sooner only adds errors.
pub const DENIED_PAUSE: Duration = Duration::from_secs(60);

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
    fn new(operation: &'static str, kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            operation,
            kind,
            code: None,
            message: message.into(),
        }
    }

    fn timed_out(operation: &'static str, after: Duration) -> Self {
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
    /// worker prints before it exits.
    #[must_use]
    pub fn advice(&self) -> String {
        match (self.kind, self.code.as_deref()) {
            (ErrorKind::Denied, _) => format!(
                "the task role lacks {}: grant it on this queue (see copilot/queue-consumer/addons)",
                self.action()
            ),
            (_, Some("AWS.SimpleQueueService.NonExistentQueue" | "QueueDoesNotExist")) => {
                "check COPILOT_QUEUE_URI, and QUEUE_REGION or the Region in the queue URL"
                    .to_owned()
            }
            (_, Some("NoCredentials")) => {
                "no AWS credentials: give the task a task role".to_owned()
            }
            _ => "check the queue URL, the Region and the task role".to_owned(),
        }
    }
}

/// The IAM action an SQS operation needs: a batch call needs its single call's.
fn iam_action(operation: &str) -> String {
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

/// A received message, as the worker keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The message id, for logs.
    pub id: String,
    /// The handle that deletes it or changes its visibility.
    pub receipt_handle: String,
    /// The body.
    pub body: String,
    /// How many times SQS has delivered it, this time included.
    pub receive_count: u32,
    /// When the receive returned it.
    pub received_at: Instant,
    /// The message group, on a FIFO queue.
    pub group_id: Option<String>,
    /// The deduplication id, on a FIFO queue.
    pub deduplication_id: Option<String>,
    /// When it was sent (`SentTimestamp`).
    pub sent_at: Option<SystemTime>,
    /// When SQS first delivered it (`ApproximateFirstReceiveTimestamp`).
    pub first_received_at: Option<SystemTime>,
    /// The X-Ray trace header (`AWSTraceHeader`).
    pub trace_header: Option<String>,
    /// SQS message attributes, by name, binary ones included.
    pub attributes: std::collections::BTreeMap<String, Attribute>,
}

/// An SQS timestamp attribute: milliseconds since the epoch.
fn epoch_ms(text: &str) -> Option<SystemTime> {
    let ms: u64 = text.parse().ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_millis(ms))
}

/// A message attribute as the handler sees it; `None` for one without a value of
/// its type.
fn attribute(value: &aws_sdk_sqs::types::MessageAttributeValue) -> Option<Attribute> {
    let data_type = value.data_type().to_owned();
    if data_type.starts_with("Binary") {
        Some(Attribute::Binary {
            value: value.binary_value()?.as_ref().to_vec(),
            data_type,
        })
    } else {
        Some(Attribute::Text {
            value: value.string_value()?.to_owned(),
            data_type,
        })
    }
}

/// A queue and the client that reaches it.
#[derive(Debug, Clone)]
pub struct Queue {
    client: Client,
    url: String,
    /// IAM actions SQS denied (`sqs:ChangeMessageVisibility` covers the single and
    /// the batch call), with when they may be tried again. Shared by clones.
    denied: Arc<Mutex<HashMap<String, Instant>>>,
}

impl Queue {
    /// The queue at `url`, reached through `client`.
    #[must_use]
    pub fn new(client: Client, url: impl Into<String>) -> Self {
        Self {
            client,
            url: url.into(),
            denied: Arc::default(),
        }
    }

    /// Runs one call of `operation` within `limit`, or answers at once while a recent
    /// denial of it lasts. A denial is logged once, naming the missing permission.
    async fn call<T>(
        &self,
        operation: &'static str,
        limit: Duration,
        call: impl Future<Output = Result<T, SqsError>>,
    ) -> Result<T, SqsError> {
        // A receive is never paused: the receive loop gives up after a few tries.
        let pausable = operation != "ReceiveMessage";
        let action = iam_action(operation);
        if pausable {
            let denied = self.denied.lock().unwrap_or_else(PoisonError::into_inner);
            if denied
                .get(&action)
                .is_some_and(|until| Instant::now() < *until)
            {
                return Err(SqsError::new(
                    operation,
                    ErrorKind::Denied,
                    "not called: denied less than a minute ago",
                ));
            }
        }
        let result = match tokio::time::timeout(limit, call).await {
            Ok(r) => r,
            Err(_) => Err(SqsError::timed_out(operation, limit)),
        };
        if result.is_err() {
            crate::metrics::count(crate::metrics::SQS_ERRORS);
        }
        if let Err(e) = &result
            && e.kind == ErrorKind::Denied
            && pausable
        {
            let now = Instant::now();
            let earlier = self
                .denied
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(action.clone(), now + DENIED_PAUSE);
            // Calls already on their way when the first denial came are not news.
            if earlier.is_none_or(|until| until <= now) {
                tracing::error!(
                    operation,
                    "SQS denied {operation} on {}: the task role lacks {action}. Grant it on this queue (the worker's IAM addon in copilot/queue-consumer/addons does) and redeploy; not calling it again for {}s ({})",
                    self.url,
                    DENIED_PAUSE.as_secs(),
                    e.message
                );
            }
        }
        result
    }

    /// The queue's URL.
    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether it is a FIFO queue (its name ends in `.fifo`).
    #[must_use]
    pub fn is_fifo(&self) -> bool {
        self.url.ends_with(".fifo")
    }

    /// Long-polls for up to `max` messages, each made invisible for `visibility`.
    ///
    /// # Errors
    /// When the call fails.
    pub async fn receive(
        &self,
        max: usize,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<Message>, SqsError> {
        const OP: &str = "ReceiveMessage";
        let max = i32::try_from(max.clamp(1, MAX_BATCH)).unwrap_or(1);
        let request = self
            .client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(max)
            .wait_time_seconds(i32::try_from(wait.as_secs()).unwrap_or(20))
            .visibility_timeout(i32::try_from(visibility.as_secs()).unwrap_or(i32::MAX))
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .message_attribute_names("All")
            .send();
        let output = self
            .call(OP, wait + RECEIVE_MARGIN, async {
                request.await.map_err(|e| classify(OP, &e))
            })
            .await?;
        let received_at = Instant::now();
        let mut messages = Vec::new();
        for m in output.messages.unwrap_or_default() {
            let id = m.message_id().unwrap_or("(no message id)").to_owned();
            let Some(receipt_handle) = m.receipt_handle().map(str::to_owned) else {
                // Without a handle the message can be neither deleted nor handed back;
                // SQS delivers it again once its visibility timeout passes.
                tracing::error!(message_id = %id, "{id} - Received without a receipt handle; skipped");
                continue;
            };
            let system = |name| m.attributes().and_then(|a| a.get(&name)).cloned();
            let receive_count = system(MessageSystemAttributeName::ApproximateReceiveCount)
                .and_then(|n| n.parse().ok())
                .unwrap_or(1);
            let group_id = system(MessageSystemAttributeName::MessageGroupId);
            let deduplication_id = system(MessageSystemAttributeName::MessageDeduplicationId);
            let sent_at = system(MessageSystemAttributeName::SentTimestamp)
                .as_deref()
                .and_then(epoch_ms);
            let first_received_at =
                system(MessageSystemAttributeName::ApproximateFirstReceiveTimestamp)
                    .as_deref()
                    .and_then(epoch_ms);
            let trace_header = system(MessageSystemAttributeName::AwsTraceHeader);
            let attributes = m
                .message_attributes()
                .map(|a| {
                    a.iter()
                        .filter_map(|(k, v)| Some((k.clone(), attribute(v)?)))
                        .collect()
                })
                .unwrap_or_default();
            messages.push(Message {
                id,
                receipt_handle,
                body: m.body.unwrap_or_default(),
                receive_count,
                received_at,
                group_id,
                deduplication_id,
                sent_at,
                first_received_at,
                trace_header,
                attributes,
            });
        }
        Ok(messages)
    }

    /// Deletes up to ten messages by receipt handle; returns the entries that failed.
    ///
    /// # Errors
    /// When the call fails as a whole.
    pub async fn delete_batch(&self, handles: &[&str]) -> Result<Vec<EntryFailure>, SqsError> {
        const OP: &str = "DeleteMessageBatch";
        let entries = handles
            .iter()
            .enumerate()
            .map(|(i, h)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(*h)
                    .build()
                    .map_err(|e| SqsError::new(OP, ErrorKind::Permanent, e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let request = self
            .client
            .delete_message_batch()
            .queue_url(&self.url)
            .set_entries(Some(entries))
            .send();
        let output = self
            .call(OP, CALL_TIMEOUT, async {
                request.await.map_err(|e| classify(OP, &e))
            })
            .await?;
        Ok(failures(output.failed(), handles.len()))
    }

    /// Sets the visibility timeout of up to ten messages; returns the entries that
    /// failed.
    ///
    /// # Errors
    /// When the call fails as a whole.
    pub async fn change_visibility_batch(
        &self,
        entries: &[(&str, i32)],
    ) -> Result<Vec<EntryFailure>, SqsError> {
        const OP: &str = "ChangeMessageVisibilityBatch";
        let request = entries
            .iter()
            .enumerate()
            .map(|(i, (h, secs))| {
                ChangeMessageVisibilityBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(*h)
                    .visibility_timeout(*secs)
                    .build()
                    .map_err(|e| SqsError::new(OP, ErrorKind::Permanent, e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let request = self
            .client
            .change_message_visibility_batch()
            .queue_url(&self.url)
            .set_entries(Some(request))
            .send();
        let output = self
            .call(OP, CALL_TIMEOUT, async {
                request.await.map_err(|e| classify(OP, &e))
            })
            .await?;
        Ok(failures(output.failed(), entries.len()))
    }

    /// Sets one message's visibility timeout, counted from now.
    ///
    /// # Errors
    /// When the call fails.
    pub async fn change_visibility(&self, handle: &str, secs: i32) -> Result<(), SqsError> {
        const OP: &str = "ChangeMessageVisibility";
        let request = self
            .client
            .change_message_visibility()
            .queue_url(&self.url)
            .receipt_handle(handle)
            .visibility_timeout(secs)
            .send();
        self.call(OP, CALL_TIMEOUT, async {
            request.await.map(|_| ()).map_err(|e| classify(OP, &e))
        })
        .await
    }
}

fn failures(failed: &[aws_sdk_sqs::types::BatchResultErrorEntry], len: usize) -> Vec<EntryFailure> {
    failed
        .iter()
        .filter_map(|f| {
            let index: usize = f.id().parse().ok().filter(|i| *i < len)?;
            Some(EntryFailure {
                index,
                code: f.code().to_owned(),
                message: f.message().unwrap_or_default().to_owned(),
                sender_fault: f.sender_fault(),
            })
        })
        .collect()
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
            e.advice().contains("sqs:ChangeMessageVisibility"),
            "{}",
            e.advice()
        );
        let e = SqsError::new("ReceiveMessage", ErrorKind::Denied, "no");
        assert_eq!(e.action(), "sqs:ReceiveMessage");
    }
}
