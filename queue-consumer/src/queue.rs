//! The SQS calls the worker makes, and what it keeps of a received message.
//!
//! SQS batch calls answer HTTP 200 even when single entries fail, so the batch
//! methods return the failed entries for the caller to judge one by one.

use std::time::Duration;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::error::DisplayErrorContext;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
    MessageSystemAttributeName,
};
use tokio::time::Instant;

/// Most messages one receive or batch call handles: SQS's limit.
pub const MAX_BATCH: usize = 10;

/// An SQS call failed as a whole.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{operation}: {message}")]
pub struct SqsError {
    /// The SQS operation.
    pub operation: &'static str,
    /// What went wrong, with the SDK's error chain.
    pub message: String,
}

impl SqsError {
    fn new(operation: &'static str, err: impl std::error::Error) -> Self {
        Self {
            operation,
            message: DisplayErrorContext(err).to_string(),
        }
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

/// A received message, as the worker keeps it.
#[derive(Debug, Clone)]
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
}

/// A queue and the client that reaches it.
#[derive(Debug, Clone)]
pub struct Queue {
    client: Client,
    url: String,
}

impl Queue {
    /// The queue at `url`, reached through `client`.
    #[must_use]
    pub fn new(client: Client, url: impl Into<String>) -> Self {
        Self {
            client,
            url: url.into(),
        }
    }

    /// The queue's URL.
    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
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
        let max = i32::try_from(max.clamp(1, MAX_BATCH)).unwrap_or(1);
        let output = self
            .client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(max)
            .wait_time_seconds(i32::try_from(wait.as_secs()).unwrap_or(20))
            .visibility_timeout(i32::try_from(visibility.as_secs()).unwrap_or(i32::MAX))
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send()
            .await
            .map_err(|e| SqsError::new("ReceiveMessage", e))?;
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
            let receive_count = m
                .attributes()
                .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                .and_then(|n| n.parse().ok())
                .unwrap_or(1);
            messages.push(Message {
                id,
                receipt_handle,
                body: m.body.unwrap_or_default(),
                receive_count,
                received_at,
            });
        }
        Ok(messages)
    }

    /// Deletes up to ten messages by receipt handle; returns the entries that failed.
    ///
    /// # Errors
    /// When the call fails as a whole.
    pub async fn delete_batch(&self, handles: &[&str]) -> Result<Vec<EntryFailure>, SqsError> {
        let entries = handles
            .iter()
            .enumerate()
            .map(|(i, h)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(*h)
                    .build()
                    .map_err(|e| SqsError::new("DeleteMessageBatch", e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let output = self
            .client
            .delete_message_batch()
            .queue_url(&self.url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| SqsError::new("DeleteMessageBatch", e))?;
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
        let request = entries
            .iter()
            .enumerate()
            .map(|(i, (h, secs))| {
                ChangeMessageVisibilityBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(*h)
                    .visibility_timeout(*secs)
                    .build()
                    .map_err(|e| SqsError::new("ChangeMessageVisibilityBatch", e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let output = self
            .client
            .change_message_visibility_batch()
            .queue_url(&self.url)
            .set_entries(Some(request))
            .send()
            .await
            .map_err(|e| SqsError::new("ChangeMessageVisibilityBatch", e))?;
        Ok(failures(output.failed(), entries.len()))
    }

    /// Sets one message's visibility timeout, counted from now.
    ///
    /// # Errors
    /// When the call fails.
    pub async fn change_visibility(&self, handle: &str, secs: i32) -> Result<(), SqsError> {
        self.client
            .change_message_visibility()
            .queue_url(&self.url)
            .receipt_handle(handle)
            .visibility_timeout(secs)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| SqsError::new("ChangeMessageVisibility", e))
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
