//! The SQS calls the worker makes and what it keeps of a received message; what an
//! SQS error means is in [`error`].
//!
//! Every call has a time limit (a long poll: its wait plus a margin): an SQS call
//! that is accepted and never answered must not hold a slot, a shutdown or the receive
//! loop.
//!
//! SQS batch calls answer HTTP 200 even when single entries fail, so the batch
//! methods return the failed entries for the caller to judge one by one.

mod error;
mod message;
mod redrive;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::primitives::Blob;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
    MessageAttributeValue, MessageSystemAttributeName, MessageSystemAttributeNameForSends,
    MessageSystemAttributeValue, QueueAttributeName,
};
use tokio::time::Instant;

use error::iam_action;
pub use error::{EntryFailure, ErrorKind, SqsError, classify};
pub use message::{Attribute, Message};
use message::{attribute, epoch_ms};
pub use redrive::RedrivePolicy;

/// Most messages one receive or batch call handles: SQS's limit.
pub const MAX_BATCH: usize = 10;
/// Time limit of a call other than a long poll. SQS answers in milliseconds; a call
/// without an answer after this long is treated as lost (outcome unknown).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Added to a long poll's wait for its time limit.
pub const RECEIVE_MARGIN: Duration = Duration::from_secs(5);
/// How long a receive's answer is taken to be on its way at most. SQS hides a message
/// when it answers the receive that returns it: the worker counts the message as
/// hidden from this long (at most a quarter of its visibility) before the answer
/// arrived, and never from before the request was sent.
pub const ANSWER_TRANSIT: Duration = Duration::from_secs(1);
/// After SQS denies an operation to the task role, it is not called again for this
/// long: IAM changes take a deployment to fix, and retrying sooner only adds errors.
pub const DENIED_PAUSE: Duration = Duration::from_secs(60);

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
        let asked_at = Instant::now();
        let output = self
            .call(OP, wait + RECEIVE_MARGIN, async {
                request.await.map_err(|e| classify(OP, &e))
            })
            .await?;
        let received_at = Instant::now();
        let hidden_at = received_at
            .checked_sub(ANSWER_TRANSIT.min(visibility / 4))
            .map_or(asked_at, |t| t.max(asked_at));
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
                hidden_at,
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

    /// The queue at `url`, reached through the same client.
    #[must_use]
    pub fn at(&self, url: impl Into<String>) -> Self {
        Self::new(self.client.clone(), url)
    }

    /// The queue's redrive policy; `None` when it has none.
    ///
    /// # Errors
    /// When the call fails, or the policy cannot be read.
    pub async fn redrive_policy(&self) -> Result<Option<RedrivePolicy>, SqsError> {
        const OP: &str = "GetQueueAttributes";
        let request = self
            .client
            .get_queue_attributes()
            .queue_url(&self.url)
            .attribute_names(QueueAttributeName::RedrivePolicy)
            .send();
        let output = self
            .call(OP, CALL_TIMEOUT, async {
                request.await.map_err(|e| classify(OP, &e))
            })
            .await?;
        let Some(raw) = output
            .attributes
            .and_then(|a| a.get(&QueueAttributeName::RedrivePolicy).cloned())
            .filter(|raw| !raw.trim().is_empty())
        else {
            return Ok(None);
        };
        RedrivePolicy::parse(&raw)
            .map(Some)
            .map_err(|why| SqsError::new(OP, ErrorKind::Permanent, why))
    }

    /// Sends a copy of `message` to this queue: its body, its message attributes and
    /// its trace header; on a FIFO queue its group, with its message id as the
    /// deduplication id (so that sending it again within five minutes adds nothing).
    ///
    /// # Errors
    /// When the call fails, or an attribute cannot be sent.
    pub async fn send_copy(&self, message: &Message) -> Result<(), SqsError> {
        const OP: &str = "SendMessage";
        let invalid = |e: aws_sdk_sqs::error::BuildError| {
            SqsError::new(OP, ErrorKind::Permanent, e.to_string())
        };
        let mut request = self
            .client
            .send_message()
            .queue_url(&self.url)
            .message_body(&message.body);
        for (name, attribute) in &message.attributes {
            let value = match attribute {
                Attribute::Text { data_type, value } => MessageAttributeValue::builder()
                    .data_type(data_type)
                    .string_value(value),
                Attribute::Binary { data_type, value } => MessageAttributeValue::builder()
                    .data_type(data_type)
                    .binary_value(Blob::new(value.clone())),
            };
            request = request.message_attributes(name, value.build().map_err(invalid)?);
        }
        if let Some(group) = &message.group_id {
            request = request
                .message_group_id(group)
                .message_deduplication_id(&message.id);
        }
        if let Some(trace) = &message.trace_header {
            let value = MessageSystemAttributeValue::builder()
                .data_type("String")
                .string_value(trace)
                .build()
                .map_err(invalid)?;
            request = request.message_system_attributes(
                MessageSystemAttributeNameForSends::AwsTraceHeader,
                value,
            );
        }
        let request = request.send();
        self.call(OP, CALL_TIMEOUT, async {
            request.await.map(|_| ()).map_err(|e| classify(OP, &e))
        })
        .await
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
