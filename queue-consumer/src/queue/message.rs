//! A received message as the worker keeps it, and its attributes.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

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
    /// No later than when SQS hid it: its visibility timeout and its 12 h in flight
    /// are counted from here, so the worker never believes it holds the message
    /// longer than it does.
    pub hidden_at: Instant,
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
    pub attributes: BTreeMap<String, Attribute>,
}

/// An SQS timestamp attribute: milliseconds since the epoch.
pub(super) fn epoch_ms(text: &str) -> Option<SystemTime> {
    let ms: u64 = text.parse().ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_millis(ms))
}

/// A message attribute as the handler sees it; `None` for one without a value of
/// its type.
pub(super) fn attribute(value: &aws_sdk_sqs::types::MessageAttributeValue) -> Option<Attribute> {
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

/// One message attribute: SQS's (or, from an SNS envelope, SNS's) data type and
/// value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attribute {
    /// A `String` or `Number` attribute (or a custom type such as `Number.float`).
    Text {
        /// The data type, as sent.
        data_type: String,
        /// The value.
        value: String,
    },
    /// A `Binary` attribute (or a custom type such as `Binary.png`).
    Binary {
        /// The data type, as sent.
        data_type: String,
        /// The bytes.
        value: Vec<u8>,
    },
}

impl Attribute {
    /// The value of a `String` or `Number` attribute.
    #[must_use]
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::Text { value, .. } => Some(value),
            Self::Binary { .. } => None,
        }
    }

    /// The bytes of the value: the text's for a `String` or `Number`.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Self::Text { value, .. } => value.as_bytes(),
            Self::Binary { value, .. } => value,
        }
    }

    /// The data type, such as `String`, `Number.int` or `Binary`.
    #[must_use]
    pub fn data_type(&self) -> &str {
        match self {
            Self::Text { data_type, .. } | Self::Binary { data_type, .. } => data_type,
        }
    }
}
