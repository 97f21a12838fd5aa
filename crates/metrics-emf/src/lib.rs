//! CloudWatch metrics from a container with no agent and no API call: a recorder for
//! the [`metrics`] facade that writes [Embedded Metric Format] lines to stdout, where
//! the awslogs driver ships them and CloudWatch extracts the metrics.
//!
//! Libraries and services call `metrics::counter!`, `gauge!` and `histogram!` as
//! usual; `main` installs this recorder (or any other exporter) once. The cost stays
//! flat whatever the load: a counter is one atomic add, and each interval's lines
//! hold each series once:
//!
//! - a **counter** as its increase over the interval (`Counter::absolute` sets a
//!   total kept elsewhere; the line holds how much it grew, and a total lower than
//!   the last one counts as a restart from zero);
//! - a **gauge** as its current value;
//! - a **histogram** as EMF's distribution object, `{"Values": [...], "Counts":
//!   [...], "Count", "Sum", "Min", "Max"}`, at most 100 values whose counts add up
//!   to the exact count and whose value × count add up to the exact sum, at any
//!   rate (percentiles are approximate: buckets 12.5 % wide).
//!
//! **Labels are dimensions.** `counter!("Closed", "cause" => "client")` is the
//! metric `Closed` with the dimensions configured for the process (such as
//! `Service` and `Environment`) and `cause = client`. Each set of label values is
//! its own line, since a line carries one value per dimension. Mind the
//! cardinality: every distinct combination is a CloudWatch custom metric.
//!
//! **Within CloudWatch's limits**, by one rule: what CloudWatch would refuse is left
//! out, with a warning logged once, and the rest is written.
//! - A metric whose name is empty or over 255 bytes, or is `_aws` or a configured
//!   dimension's name, is not recorded.
//! - A label whose name or value CloudWatch refuses as a dimension (see
//!   [`check_dimension`]), or that is named like a configured dimension or like the
//!   metric itself, is not a dimension; the series is written without it.
//! - A metric has at most 30 dimensions: the configured ones first, then its labels
//!   in name order; labels past the 30th are left out.
//! - A line holds at most 100 metrics; more make more lines.
//! - Values CloudWatch refuses (NaN, infinities, beyond ±2^360) are dropped; a
//!   histogram without values and a gauge without a usable value are left out of
//!   the line.
//!
//! The unit given to `describe_*` is kept whatever the metric's name, as the
//! CloudWatch unit; nanoseconds are written as microseconds and binary multiples of
//! bytes as bytes, converted, since CloudWatch has neither.
//!
//! ```
//! use std::time::Duration;
//! use metrics_emf::{EmfConfig, EmfRecorder};
//!
//! let config = EmfConfig::builder("MyApp")
//!     .interval(Duration::from_secs(60))
//!     .dimension("Service", "worker")
//!     .dimension("Environment", "test")
//!     .build()
//!     .unwrap();
//! let recorder = EmfRecorder::new(config);
//! let handle = recorder.handle();
//! metrics::with_local_recorder(&recorder, || {
//!     metrics::counter!("JobsDone").increment(3);
//!     metrics::gauge!("JobsInFlight").set(2.0);
//!     metrics::histogram!("JobDuration").record(12.5);
//! });
//! let lines = handle.render();
//! let doc: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
//! assert_eq!(doc["JobsDone"], 3);
//! assert_eq!(doc["Service"], "worker");
//! assert_eq!(doc["JobDuration"]["Count"], 1);
//! assert_eq!(doc["_aws"]["CloudWatchMetrics"][0]["Dimensions"][0][1], "Environment");
//! ```
//!
//! The distribution object is the one the OpenTelemetry collector's EMF exporter
//! writes for histograms (`Values`, `Counts`, `Max`, `Min`, `Count`, `Sum`); the
//! `Values`/`Counts` semantics are those of CloudWatch's `PutMetricData`.
//!
//! [Embedded Metric Format]: https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/CloudWatch_Embedded_Metric_Format_Specification.html

#![warn(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod distribution;
mod recorder;
mod rules;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

pub use recorder::EmfRecorder;
use recorder::Registry;
pub use rules::check_dimension;

/// EMF allows at most this many values in one metric's array: a histogram's
/// `Values` hold at most this many.
pub const MAX_SAMPLES: usize = 100;

/// Allowed range of the interval between two writes: at least a second (CloudWatch's
/// finest resolution), at most a day.
pub const INTERVAL_RANGE: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(86_400));

/// Where the metrics go and how they are labelled. Built by
/// [`EmfConfig::builder`], which checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmfConfig {
    namespace: String,
    dimensions: Vec<(String, String)>,
    interval: Duration,
}

impl EmfConfig {
    /// Metrics under `namespace`, written every minute unless
    /// [`interval`](EmfConfigBuilder::interval) says otherwise.
    pub fn builder(namespace: impl Into<String>) -> EmfConfigBuilder {
        EmfConfigBuilder {
            config: Self {
                namespace: namespace.into(),
                dimensions: Vec::new(),
                interval: Duration::from_secs(60),
            },
        }
    }

    /// The CloudWatch namespace.
    #[must_use]
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The interval between two writes.
    #[must_use]
    pub fn interval(&self) -> Duration {
        self.interval
    }
}

/// Builds an [`EmfConfig`]; [`build`](Self::build) checks the namespace and the
/// interval.
#[derive(Debug, Clone)]
#[must_use]
pub struct EmfConfigBuilder {
    config: EmfConfig,
}

impl EmfConfigBuilder {
    /// Writes every `interval`, within [`INTERVAL_RANGE`] (default one minute).
    pub fn interval(mut self, interval: Duration) -> Self {
        self.config.interval = interval;
        self
    }

    /// Adds a dimension to every metric, such as the service or environment name.
    /// Empty values are left out: CloudWatch rejects a dimension without a value.
    /// So is a dimension CloudWatch would refuse (see [`check_dimension`]), a name
    /// given twice, and any past the 30th, with a warning when the recorder starts.
    pub fn dimension(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let value = value.into();
        if !value.is_empty() {
            self.config.dimensions.push((name.into(), value));
        }
        self
    }

    /// The configuration, checked.
    ///
    /// # Errors
    /// When CloudWatch would refuse the namespace ([`check_namespace`]), or the
    /// interval is outside [`INTERVAL_RANGE`] (zero would write in a busy loop; a
    /// huge one overflows the clock).
    pub fn build(self) -> Result<EmfConfig, EmfConfigError> {
        let config = self.config;
        check_namespace(&config.namespace).map_err(|reason| EmfConfigError::Namespace {
            namespace: config.namespace.clone(),
            reason,
        })?;
        let (lo, hi) = INTERVAL_RANGE;
        if config.interval < lo || config.interval > hi {
            return Err(EmfConfigError::Interval {
                interval: config.interval,
            });
        }
        Ok(config)
    }
}

/// An [`EmfConfig`] that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EmfConfigError {
    /// CloudWatch would refuse the namespace.
    Namespace {
        /// The namespace given.
        namespace: String,
        /// Why.
        reason: String,
    },
    /// The interval is outside [`INTERVAL_RANGE`].
    Interval {
        /// The interval given.
        interval: Duration,
    },
}

impl std::fmt::Display for EmfConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Namespace { namespace, reason } => {
                write!(f, "the EMF namespace {namespace:?} is not valid: {reason}")
            }
            Self::Interval { interval } => write!(
                f,
                "the EMF interval {interval:?} is out of range: allowed {:?}..={:?}",
                INTERVAL_RANGE.0, INTERVAL_RANGE.1
            ),
        }
    }
}

impl std::error::Error for EmfConfigError {}

/// Whether `namespace` is one CloudWatch accepts: 1 to 255 characters, each a
/// letter, a digit or one of `. - _ / # :` (and not starting with `AWS/`).
///
/// # Errors
/// Says what is wrong with it.
pub fn check_namespace(namespace: &str) -> Result<(), String> {
    if namespace.is_empty() || namespace.len() > 255 {
        return Err("must be 1 to 255 characters".to_owned());
    }
    if namespace.starts_with("AWS/") {
        return Err("must not start with AWS/, which is reserved".to_owned());
    }
    match namespace
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || ".-_/#: ".contains(*c)))
    {
        Some(c) => Err(format!("{c:?} is not allowed")),
        None => Ok(()),
    }
}

/// Renders and writes the lines of one [`EmfRecorder`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct EmfHandle {
    registry: Arc<Registry>,
}

impl EmfHandle {
    /// The EMF lines for what was recorded since the last call, each one JSON
    /// document without a newline: one line per set of label values (and per 100
    /// metrics), none when no metric is registered. Counters restart from zero and
    /// histograms are emptied.
    #[must_use]
    pub fn render(&self) -> Vec<String> {
        self.registry.render(now_millis())
    }

    /// Writes the lines to stdout in a single write, so they never interleave with a
    /// log line written through the same stdout.
    pub fn flush(&self) {
        let lines = self.render();
        if lines.is_empty() {
            return;
        }
        let mut text = lines.join("\n");
        text.push('\n');
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            tracing::warn!("cannot write metrics: {e}");
        }
    }

    /// Writes the lines every interval until `stop` resolves, then once more.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) {
        let interval = self.registry.config.interval;
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = ticks.tick() => self.flush(),
                () = &mut stop => break,
            }
        }
        self.flush();
    }
}

fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

// The README's examples are compiled and run with the doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeExamples;
