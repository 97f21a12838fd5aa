//! Your job code: the [`Handler`] trait, the [`Job`] it is given and the [`Verdict`]
//! it returns.
//!
//! The worker receives, keeps each message invisible, protects the task, settles and
//! drains; a handler only says what one message means. Write a type that implements
//! [`Handler`], or wrap an async function with [`handler_fn`]:
//!
//! ```no_run
//! use queue_consumer::handler::{Job, Verdict, handler_fn};
//!
//! # async fn example(config: queue_consumer::Config) {
//! let handler = handler_fn(|job: Job| async move {
//!     match job.body.parse::<u32>() {
//!         Ok(n) => {
//!             println!("{} from {}: {n}", job.message_id, job.source);
//!             Verdict::Done
//!         }
//!         Err(e) => Verdict::BadInput(format!("not a number: {e}")),
//!     }
//! });
//! queue_consumer::run(config, handler, queue_consumer::signals::listen()).await;
//! # }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Where a message came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The queue's URL.
    pub queue_url: String,
    /// The name of a topic-specific queue in `COPILOT_TOPIC_QUEUE_URIS` (such as
    /// `merchantOrdersEventsQueue`); `None` for `COPILOT_QUEUE_URI`.
    pub queue_name: Option<String>,
    /// The SNS topic the message was published to, when it arrived in an SNS
    /// envelope (raw delivery does not say).
    pub topic_arn: Option<String>,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.topic_arn, &self.queue_name) {
            (Some(topic), _) => write!(f, "{topic}"),
            (None, Some(name)) => write!(f, "{name}"),
            (None, None) => write!(f, "{}", self.queue_url),
        }
    }
}

/// One message, as the handler sees it.
#[derive(Debug, Clone)]
pub struct Job {
    /// The SQS message id (the SNS message id is in [`Job::sns_message_id`]).
    pub message_id: String,
    /// The body: the SNS `Message` when it came in an SNS envelope, else the SQS body.
    pub body: String,
    /// Message attributes: the SNS message attributes from an envelope, else the SQS
    /// message attributes, by name; binary values are left out.
    pub attributes: BTreeMap<String, String>,
    /// How many times SQS has delivered the message, this time included.
    pub receive_count: u32,
    /// The queue, and topic when known, it came from.
    pub source: Source,
    /// The SNS message id, from an envelope.
    pub sns_message_id: Option<String>,
    /// The message group of a FIFO queue.
    pub group_id: Option<String>,
    /// The deduplication id of a FIFO queue.
    pub deduplication_id: Option<String>,
    /// Cancelled when the worker no longer holds the message: its receipt handle
    /// became invalid, or its visibility could not be extended and has run out.
    /// Another worker may then be doing the same job; stop if that matters.
    pub lost: CancellationToken,
}

/// What became of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Done: the message is deleted.
    Done,
    /// Failed in a way that may pass: the message comes back after a backoff that
    /// grows with its receive count.
    Failed(String),
    /// Deliver it again after this long (at most SQS's 12 h).
    RetryAfter(Duration),
    /// The message cannot be worked, now or later: it is not deleted, and comes back
    /// after a growing delay until the queue's redrive policy moves it to the
    /// dead-letter queue.
    BadInput(String),
}

/// The job code the worker runs for each message.
///
/// `handle` runs on its own task: a panic in it is caught and the message retried;
/// at the end of the shutdown grace period its future is dropped and the message
/// handed back, so keep it cancel-safe or idempotent.
pub trait Handler: Send + Sync + 'static {
    /// Works one job.
    fn handle(&self, job: Job) -> impl Future<Output = Verdict> + Send;
}

/// A handler from an async function or closure, as [`handler_fn`] makes.
#[derive(Debug, Clone)]
pub struct HandlerFn<F>(F);

/// Wraps `f`, an async function of a [`Job`], as a [`Handler`].
pub fn handler_fn<F, Fut>(f: F) -> HandlerFn<F>
where
    F: Fn(Job) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Verdict> + Send + 'static,
{
    HandlerFn(f)
}

impl<F, Fut> Handler for HandlerFn<F>
where
    F: Fn(Job) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Verdict> + Send + 'static,
{
    fn handle(&self, job: Job) -> impl Future<Output = Verdict> + Send {
        (self.0)(job)
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = Verdict> + Send + 'static>>;

/// A handler behind one type, so the worker's machinery is not generic.
#[derive(Clone)]
pub(crate) struct BoxedHandler(Arc<dyn Fn(Job) -> BoxFuture + Send + Sync>);

impl fmt::Debug for BoxedHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BoxedHandler")
    }
}

impl BoxedHandler {
    pub(crate) fn new<H: Handler>(handler: H) -> Self {
        let handler = Arc::new(handler);
        Self(Arc::new(move |job| {
            let handler = Arc::clone(&handler);
            Box::pin(async move { handler.handle(job).await })
        }))
    }

    pub(crate) fn call(&self, job: Job) -> BoxFuture {
        (self.0)(job)
    }
}

/// What an SNS notification envelope carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The published message.
    pub message: String,
    /// The topic.
    pub topic_arn: String,
    /// SNS's message id.
    pub message_id: Option<String>,
    /// String (and number, and string array) message attributes.
    pub attributes: BTreeMap<String, String>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawEnvelope {
    r#type: String,
    message: String,
    topic_arn: String,
    message_id: Option<String>,
    #[serde(default)]
    message_attributes: BTreeMap<String, RawAttribute>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawAttribute {
    r#type: String,
    value: String,
}

/// Unwraps an SNS notification envelope (`"Type": "Notification"` with `Message` and
/// `TopicArn`); `None` for anything else, which is then a raw body.
#[must_use]
pub fn unwrap_sns(body: &str) -> Option<Envelope> {
    if !body.trim_start().starts_with('{') {
        return None;
    }
    let raw: RawEnvelope = serde_json::from_str(body).ok()?;
    if raw.r#type != "Notification" {
        return None;
    }
    Some(Envelope {
        message: raw.message,
        topic_arn: raw.topic_arn,
        message_id: raw.message_id,
        attributes: raw
            .message_attributes
            .into_iter()
            .filter(|(_, a)| a.r#type != "Binary")
            .map(|(k, a)| (k, a.value))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sns_envelopes_are_unwrapped_and_anything_else_is_raw() {
        let body = r#"{
          "Type" : "Notification",
          "MessageId" : "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
          "TopicArn" : "arn:aws:sns:us-west-2:123456789012:orders",
          "Subject" : "My First Message",
          "Message" : "250",
          "Timestamp" : "2012-05-02T00:54:06.655Z",
          "SignatureVersion" : "1",
          "MessageAttributes" : {
            "kind" : {"Type":"String","Value":"order_placed"},
            "blob" : {"Type":"Binary","Value":"AAE="}
          }
        }"#;
        let e = unwrap_sns(body).unwrap();
        assert_eq!(e.message, "250");
        assert_eq!(e.topic_arn, "arn:aws:sns:us-west-2:123456789012:orders");
        assert_eq!(
            e.message_id.as_deref(),
            Some("22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324")
        );
        assert_eq!(e.attributes.len(), 1);
        assert_eq!(e.attributes["kind"], "order_placed");
        for raw in [
            "250",
            "",
            "{",
            r#"{"Type":"SubscriptionConfirmation","Message":"x","TopicArn":"t"}"#,
            r#"{"Type":"Notification","TopicArn":"t"}"#,
            r#"{"order": 1}"#,
        ] {
            assert_eq!(unwrap_sns(raw), None, "{raw}");
        }
    }
}
