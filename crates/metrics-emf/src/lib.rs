//! CloudWatch metrics from a container with no agent and no API call: a recorder for
//! the [`metrics`] facade that writes one [Embedded Metric Format] line per interval
//! to stdout, where the awslogs driver ships it and CloudWatch extracts the metrics.
//!
//! Libraries and services call `metrics::counter!`, `gauge!` and `histogram!` as
//! usual; `main` installs this recorder (or any other exporter) once. The cost stays
//! flat whatever the load: a counter is one atomic add, and the line written each
//! interval holds each metric once — counters as their increase over the interval,
//! gauges as their current value, histograms as a uniform sample of at most 100
//! values (EMF's limit for a value array).
//!
//! ```
//! use std::time::Duration;
//! use metrics_emf::{EmfConfig, EmfRecorder};
//!
//! let config = EmfConfig::new("MyApp", Duration::from_secs(60))
//!     .dimension("Service", "worker")
//!     .dimension("Environment", "test");
//! let recorder = EmfRecorder::new(config);
//! let handle = recorder.handle();
//! metrics::with_local_recorder(&recorder, || {
//!     metrics::counter!("JobsDone").increment(3);
//!     metrics::gauge!("JobsInFlight").set(2.0);
//! });
//! let line = handle.render();
//! let doc: serde_json::Value = serde_json::from_str(&line).unwrap();
//! assert_eq!(doc["JobsDone"], 3);
//! assert_eq!(doc["Service"], "worker");
//! ```
//!
//! [Embedded Metric Format]: https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/CloudWatch_Embedded_Metric_Format_Specification.html

#![warn(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod recorder;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

pub use recorder::EmfRecorder;
use recorder::Registry;

/// EMF allows at most this many values in one metric's array.
pub const MAX_SAMPLES: usize = 100;

/// Where the metrics go and how they are labelled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmfConfig {
    namespace: String,
    dimensions: Vec<(String, String)>,
    interval: Duration,
}

impl EmfConfig {
    /// Metrics under `namespace`, written every `interval`.
    #[must_use]
    pub fn new(namespace: impl Into<String>, interval: Duration) -> Self {
        Self {
            namespace: namespace.into(),
            dimensions: Vec::new(),
            interval,
        }
    }

    /// Adds a dimension, such as the service or environment name. Empty values are
    /// left out: CloudWatch rejects a dimension without a value.
    #[must_use]
    pub fn dimension(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let value = value.into();
        if !value.is_empty() {
            self.dimensions.push((name.into(), value));
        }
        self
    }

    /// The interval between two lines.
    #[must_use]
    pub fn interval(&self) -> Duration {
        self.interval
    }
}

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
    /// The EMF line for what was recorded since the last one, without a newline, or
    /// an empty string when no metric is registered: a line without metrics says
    /// nothing. Counters restart from zero and histogram samples are cleared.
    #[must_use]
    pub fn render(&self) -> String {
        self.registry.render(now_millis())
    }

    /// Writes one line to stdout in a single write, so it never interleaves with a
    /// log line written through the same stdout.
    pub fn flush(&self) {
        let mut line = self.render();
        if line.is_empty() {
            return;
        }
        line.push('\n');
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        if let Err(e) = out.write_all(line.as_bytes()).and_then(|()| out.flush()) {
            tracing::warn!("cannot write metrics: {e}");
        }
    }

    /// Writes a line every interval until `stop` resolves, then one last line.
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
