//! Your job code: the [`Handler`] trait (one message at a time) or the
//! [`BatchHandler`] trait (every message of a receive at once), the [`Job`] each is
//! given and the [`Verdict`] or [`BatchResponse`] it returns.
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
//!
//! A batch handler answers in the shape of Lambda's `ReportBatchItemFailures`: the
//! message ids that failed; every other message of the batch is deleted.
//!
//! ```no_run
//! use queue_consumer::handler::{BatchResponse, Job, batch_handler_fn};
//!
//! # async fn example(config: queue_consumer::Config) {
//! let handler = batch_handler_fn(|jobs: Vec<Job>| async move {
//!     let mut response = BatchResponse::default();
//!     for job in &jobs {
//!         if job.body.parse::<u32>().is_err() {
//!             response.fail(&job.message_id);
//!         }
//!     }
//!     response
//! });
//! queue_consumer::run_batch(config, handler, queue_consumer::signals::listen()).await;
//! # }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub use crate::queue::Attribute;
use crate::queue::SqsError;

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
///
/// The worker builds it; [`Job::new`] makes one for a handler's unit tests.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Job {
    /// The SQS message id (the SNS message id is in [`Job::sns_message_id`]).
    pub message_id: String,
    /// The body: the SNS `Message` when it came in an SNS envelope, else the SQS body.
    pub body: String,
    /// Message attributes, binary ones included: the SNS message attributes from an
    /// envelope, else the SQS message attributes, by name.
    pub attributes: BTreeMap<String, Attribute>,
    /// How many times SQS has delivered the message, this time included.
    pub receive_count: u32,
    /// Which run of the job this is within this delivery: 1, or more when a failed
    /// FIFO message is retried in place (see queue-consumer/README.md).
    pub attempt: u32,
    /// When the message was sent (`SentTimestamp`).
    pub sent_at: Option<SystemTime>,
    /// When SQS first delivered it (`ApproximateFirstReceiveTimestamp`).
    pub first_received_at: Option<SystemTime>,
    /// The X-Ray trace header (`AWSTraceHeader`), when the sender had one.
    pub trace_header: Option<String>,
    /// The queue, and topic when known, it came from.
    pub source: Source,
    /// The SNS message id, from an envelope.
    pub sns_message_id: Option<String>,
    /// The message group of a FIFO queue.
    pub group_id: Option<String>,
    /// The deduplication id of a FIFO queue.
    pub deduplication_id: Option<String>,
    /// Cancelled the moment the worker no longer holds the message: its visibility
    /// has run out without a confirmed extension (SQS failing, the extension denied,
    /// SQS's 12 h limit), or its receipt handle became invalid. Another worker may
    /// receive it from then on, not before; stop if that matters.
    pub lost: CancellationToken,
    /// Cancelled when the worker is asked to stop (SIGTERM): the job has the shutdown
    /// grace period left. A job that stops early can return
    /// `Verdict::RetryAfter(Duration::ZERO)` to hand its message back at once.
    pub shutdown: CancellationToken,
    visibility: Visibility,
}

impl Job {
    /// A job with this message id and body, as received once from a standard queue,
    /// and held by nobody (so [`extend_visibility`](Self::extend_visibility) fails):
    /// for a handler's unit tests.
    #[must_use]
    pub fn new(message_id: impl Into<String>, body: impl Into<String>) -> Self {
        Self {
            message_id: message_id.into(),
            body: body.into(),
            attributes: BTreeMap::new(),
            receive_count: 1,
            attempt: 1,
            sent_at: None,
            first_received_at: None,
            trace_header: None,
            source: Source {
                queue_url: String::new(),
                queue_name: None,
                topic_arn: None,
            },
            sns_message_id: None,
            group_id: None,
            deduplication_id: None,
            lost: CancellationToken::new(),
            shutdown: CancellationToken::new(),
            visibility: Visibility::detached(),
        }
    }

    /// The value of the `String` or `Number` attribute `name`.
    #[must_use]
    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes.get(name).and_then(Attribute::as_str)
    }

    /// Keeps the message invisible to other workers for `timeout` from now (cut to
    /// what is left of SQS's 12 h in flight). The worker's heartbeat keeps it
    /// invisible anyway while the job runs; this makes the hold longer, so that if
    /// the task dies the message comes back only after `timeout`. Returns the
    /// timeout SQS accepted.
    ///
    /// # Errors
    /// [`ExtendError::NotHeld`] when the worker no longer holds the message,
    /// [`ExtendError::Sqs`] when SQS refused or did not answer.
    pub async fn extend_visibility(&self, timeout: Duration) -> Result<Duration, ExtendError> {
        self.visibility.extend(timeout).await
    }

    pub(crate) fn with_visibility(mut self, visibility: Visibility) -> Self {
        self.visibility = visibility;
        self
    }
}

/// A visibility change the handler asked for could not be made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExtendError {
    /// The worker no longer holds the message (settled, lost, or the job is over).
    #[error("the message is no longer held")]
    NotHeld,
    /// SQS refused, or did not answer.
    #[error(transparent)]
    Sqs(#[from] SqsError),
}

/// What a handler's request to extend its message's visibility carries.
pub(crate) type ExtendRequest = (Duration, oneshot::Sender<Result<Duration, ExtendError>>);

/// The handler's side of its message's heartbeat.
#[derive(Debug, Clone)]
pub(crate) struct Visibility(Option<mpsc::UnboundedSender<ExtendRequest>>);

impl Visibility {
    pub(crate) fn new(tx: mpsc::UnboundedSender<ExtendRequest>) -> Self {
        Self(Some(tx))
    }

    fn detached() -> Self {
        Self(None)
    }

    async fn extend(&self, timeout: Duration) -> Result<Duration, ExtendError> {
        let tx = self.0.as_ref().ok_or(ExtendError::NotHeld)?;
        let (reply, answer) = oneshot::channel();
        tx.send((timeout, reply))
            .map_err(|_| ExtendError::NotHeld)?;
        answer.await.unwrap_or(Err(ExtendError::NotHeld))
    }
}

/// What became of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Done: the message is deleted.
    Done,
    /// Failed in a way that may pass: the message comes back after a backoff that
    /// grows with its receive count.
    Failed(String),
    /// Deliver it again after this long (at most what is left of SQS's 12 h in
    /// flight); `Duration::ZERO` hands it back at once.
    RetryAfter(Duration),
    /// The message cannot be worked, now or later: it is not deleted, and comes back
    /// after a growing delay until the queue's redrive policy moves it to the
    /// dead-letter queue.
    BadInput(String),
}

/// The job code the worker runs for each message.
///
/// `handle` runs on its own task: a panic in it is caught and the message retried;
/// at the end of the shutdown grace period (or of `JOB_TIMEOUT_SECONDS`) its future
/// is dropped and the message handed back (or retried), so keep it cancel-safe or
/// idempotent.
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

/// What a [`BatchHandler`] says about its batch, in the shape of Lambda's
/// `SQSBatchResponse` for `ReportBatchItemFailures`: the messages that failed (retried
/// with backoff); every other message of the batch is done and deleted. An empty
/// list means every message is done.
///
/// On a FIFO queue, a message after a failed one of the same group is not deleted
/// either, whatever the list says: it is handed back so that the group keeps its
/// order (Lambda asks the function to report those itself).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchResponse {
    /// The messages that failed.
    pub batch_item_failures: Vec<BatchItemFailure>,
}

/// One failed message of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchItemFailure {
    /// Its SQS message id ([`Job::message_id`]).
    pub item_identifier: String,
}

impl BatchResponse {
    /// Reports the message `message_id` as failed.
    pub fn fail(&mut self, message_id: &str) {
        self.batch_item_failures.push(BatchItemFailure {
            item_identifier: message_id.to_owned(),
        });
    }

    /// Whether the message `message_id` was reported as failed.
    #[must_use]
    pub fn failed(&self, message_id: &str) -> bool {
        self.batch_item_failures
            .iter()
            .any(|f| f.item_identifier == message_id)
    }
}

/// Job code that works every message of a receive (up to ten) at once, for work that
/// is cheaper in bulk (one database transaction, one downstream call).
///
/// Its jobs come in the order SQS returned them. Like [`Handler::handle`], it runs on
/// its own task: a panic fails the whole batch, and so does `JOB_TIMEOUT_SECONDS`.
pub trait BatchHandler: Send + Sync + 'static {
    /// Works one batch.
    fn handle_batch(&self, jobs: Vec<Job>) -> impl Future<Output = BatchResponse> + Send;
}

/// A batch handler from an async function or closure, as [`batch_handler_fn`] makes.
#[derive(Debug, Clone)]
pub struct BatchHandlerFn<F>(F);

/// Wraps `f`, an async function of the jobs of one receive, as a [`BatchHandler`].
pub fn batch_handler_fn<F, Fut>(f: F) -> BatchHandlerFn<F>
where
    F: Fn(Vec<Job>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = BatchResponse> + Send + 'static,
{
    BatchHandlerFn(f)
}

impl<F, Fut> BatchHandler for BatchHandlerFn<F>
where
    F: Fn(Vec<Job>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = BatchResponse> + Send + 'static,
{
    fn handle_batch(&self, jobs: Vec<Job>) -> impl Future<Output = BatchResponse> + Send {
        (self.0)(jobs)
    }
}

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The handler the worker runs, behind one type, so its machinery is not generic.
#[derive(Clone)]
pub(crate) enum BoxedHandler {
    /// One job at a time.
    Each(Arc<dyn Fn(Job) -> BoxFuture<Verdict> + Send + Sync>),
    /// Every job of a receive at once.
    Batch(Arc<dyn Fn(Vec<Job>) -> BoxFuture<BatchResponse> + Send + Sync>),
}

impl fmt::Debug for BoxedHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Each(_) => "BoxedHandler::Each",
            Self::Batch(_) => "BoxedHandler::Batch",
        })
    }
}

impl BoxedHandler {
    pub(crate) fn each<H: Handler>(handler: H) -> Self {
        let handler = Arc::new(handler);
        Self::Each(Arc::new(move |job| {
            let handler = Arc::clone(&handler);
            Box::pin(async move { handler.handle(job).await })
        }))
    }

    pub(crate) fn batch<H: BatchHandler>(handler: H) -> Self {
        let handler = Arc::new(handler);
        Self::Batch(Arc::new(move |jobs| {
            let handler = Arc::clone(&handler);
            Box::pin(async move { handler.handle_batch(jobs).await })
        }))
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
    /// The message attributes; a binary one is decoded from the envelope's base64.
    pub attributes: BTreeMap<String, Attribute>,
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
    let mut attributes = BTreeMap::new();
    for (name, a) in raw.message_attributes {
        let attribute = if a.r#type.starts_with("Binary") {
            match aws_smithy_types::base64::decode(&a.value) {
                Ok(value) => Attribute::Binary {
                    data_type: a.r#type,
                    value,
                },
                Err(e) => {
                    // The envelope is SNS's own: a value that is not base64 is a
                    // sign of a hand-made envelope. Keep the rest of the message.
                    tracing::warn!("The SNS attribute {name} is not base64 ({e}); left out");
                    continue;
                }
            }
        } else {
            Attribute::Text {
                data_type: a.r#type,
                value: a.value,
            }
        };
        attributes.insert(name, attribute);
    }
    Some(Envelope {
        message: raw.message,
        topic_arn: raw.topic_arn,
        message_id: raw.message_id,
        attributes,
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
            "count" : {"Type":"Number","Value":"3"},
            "blob" : {"Type":"Binary","Value":"AAE="},
            "junk" : {"Type":"Binary","Value":"not base64!"}
          }
        }"#;
        let e = unwrap_sns(body).unwrap();
        assert_eq!(e.message, "250");
        assert_eq!(e.topic_arn, "arn:aws:sns:us-west-2:123456789012:orders");
        assert_eq!(
            e.message_id.as_deref(),
            Some("22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324")
        );
        assert_eq!(e.attributes.len(), 3);
        assert_eq!(e.attributes["kind"].as_str(), Some("order_placed"));
        assert_eq!(e.attributes["count"].data_type(), "Number");
        assert_eq!(
            e.attributes["blob"],
            Attribute::Binary {
                data_type: "Binary".to_owned(),
                value: vec![0, 1]
            }
        );
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

    #[test]
    fn batch_responses_name_the_failed_messages() {
        let mut r = BatchResponse::default();
        assert!(!r.failed("a"));
        r.fail("a");
        assert!(r.failed("a"));
        assert!(!r.failed("b"));
        assert_eq!(r.batch_item_failures[0].item_identifier, "a");
    }

    #[tokio::test]
    async fn a_job_made_for_a_test_is_held_by_nobody() {
        let job = Job::new("m", "body");
        assert_eq!(job.receive_count, 1);
        assert_eq!(
            job.extend_visibility(Duration::from_secs(60)).await,
            Err(ExtendError::NotHeld)
        );
    }
}
