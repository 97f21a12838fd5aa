//! The recorder: each series (a name and its labels) is registered once and kept
//! behind an `Arc`, so the hot path (a counter's add, a gauge's store) never takes a
//! lock. Only histograms lock, briefly, to add a value to their distribution.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};
use serde_json::{Map, Value, json};

use crate::distribution::Distribution;
use crate::rules::{self, MAX_DIMENSIONS, MAX_METRICS_PER_LINE};
use crate::{EmfConfig, EmfHandle};

/// A `metrics` recorder that renders EMF lines. Install it with
/// `metrics::set_global_recorder`, and write lines with [`EmfRecorder::handle`].
#[derive(Debug)]
pub struct EmfRecorder {
    registry: Arc<Registry>,
}

impl EmfRecorder {
    /// A recorder for `config`.
    #[must_use]
    pub fn new(config: EmfConfig) -> Self {
        Self {
            registry: Arc::new(Registry::new(config)),
        }
    }

    /// The handle that renders and writes this recorder's lines.
    #[must_use]
    pub fn handle(&self) -> EmfHandle {
        EmfHandle {
            registry: Arc::clone(&self.registry),
        }
    }
}

#[derive(Debug, Clone)]
enum Metric {
    Counter(Arc<CounterCell>),
    Gauge(Arc<GaugeCell>),
    Histogram(Arc<HistogramCell>),
}

impl Metric {
    fn kind(&self) -> &'static str {
        match self {
            Self::Counter(_) => "counter",
            Self::Gauge(_) => "gauge",
            Self::Histogram(_) => "histogram",
        }
    }
}

/// One series as it appears in the lines: its labels that became dimensions (valid,
/// sorted by name) and its name. Ordered by labels first, so the series of one line
/// are neighbours.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Series {
    labels: Vec<(String, String)>,
    name: String,
}

#[derive(Debug)]
pub(crate) struct Registry {
    pub(crate) config: EmfConfig,
    /// Every key the facade has asked for, to its series' cell: the lookup on each
    /// `counter!` call.
    by_key: RwLock<HashMap<Key, Metric>>,
    /// Every series, for rendering. Keys that differ only in labels that were left
    /// out share one series.
    series: RwLock<BTreeMap<Series, Metric>>,
    /// Units by metric name, from `describe_*`.
    units: RwLock<HashMap<String, Unit>>,
    /// What has been warned about, so each problem is logged once.
    warned: Mutex<HashSet<String>>,
    /// One render at a time: a counter's increase is its total minus the total the
    /// previous render saw.
    rendering: Mutex<()>,
}

/// A counter's running total, and the total the last line reported.
#[derive(Debug, Default)]
struct CounterCell {
    total: AtomicU64,
    reported: AtomicU64,
}

impl CounterFn for CounterCell {
    fn increment(&self, value: u64) {
        self.total.fetch_add(value, Ordering::Relaxed);
    }

    /// The counter is kept elsewhere (a total read from the system, say): the line
    /// reports how much it grew. A value below the last one means the source
    /// restarted from zero, so all of it is new.
    fn absolute(&self, value: u64) {
        self.total.store(value, Ordering::Relaxed);
    }
}

impl CounterCell {
    /// The increase since the last call.
    fn take_increase(&self) -> u64 {
        let now = self.total.load(Ordering::Relaxed);
        let before = self.reported.swap(now, Ordering::Relaxed);
        now.checked_sub(before).unwrap_or(now)
    }
}

/// The current value, as f64 bits.
#[derive(Debug, Default)]
struct GaugeCell(AtomicU64);

impl GaugeCell {
    fn update(&self, f: impl Fn(f64) -> f64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some(f(f64::from_bits(bits)).to_bits())
            });
    }
}

impl GaugeFn for GaugeCell {
    fn increment(&self, value: f64) {
        self.update(|v| v + value);
    }

    fn decrement(&self, value: f64) {
        self.update(|v| v - value);
    }

    fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::Relaxed);
    }
}

/// Every value since the last line, as a bounded distribution: exact count, sum,
/// minimum and maximum, and the values themselves to within 12.5 %.
#[derive(Debug, Default)]
struct HistogramCell(Mutex<Distribution>);

impl HistogramFn for HistogramCell {
    fn record(&self, value: f64) {
        // CloudWatch refuses NaN, the infinities and anything beyond ±2^360.
        if rules::is_cloudwatch_value(value) {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .record(value);
        }
    }
}

/// The CloudWatch unit for a `metrics` unit, and the factor that converts values to
/// it. CloudWatch has no nanoseconds and no binary multiples of bytes.
fn cloudwatch_unit(unit: Unit) -> (&'static str, f64) {
    const KIB: f64 = 1024.0;
    match unit {
        Unit::Count => ("Count", 1.0),
        Unit::Percent => ("Percent", 1.0),
        Unit::Seconds => ("Seconds", 1.0),
        Unit::Milliseconds => ("Milliseconds", 1.0),
        Unit::Microseconds => ("Microseconds", 1.0),
        Unit::Nanoseconds => ("Microseconds", 1e-3),
        Unit::Bytes => ("Bytes", 1.0),
        Unit::Kibibytes => ("Bytes", KIB),
        Unit::Mebibytes => ("Bytes", KIB * KIB),
        Unit::Gibibytes => ("Bytes", KIB * KIB * KIB),
        Unit::Tebibytes => ("Bytes", KIB * KIB * KIB * KIB),
        Unit::BitsPerSecond => ("Bits/Second", 1.0),
        Unit::KilobitsPerSecond => ("Kilobits/Second", 1.0),
        Unit::MegabitsPerSecond => ("Megabits/Second", 1.0),
        Unit::GigabitsPerSecond => ("Gigabits/Second", 1.0),
        Unit::TerabitsPerSecond => ("Terabits/Second", 1.0),
        Unit::CountPerSecond => ("Count/Second", 1.0),
    }
}

/// How many warnings are remembered; past that, problems are warned about again
/// rather than the set growing without bound.
const MAX_WARNED: usize = 1024;

impl Registry {
    fn new(mut config: EmfConfig) -> Self {
        let mut warned = HashSet::new();
        // The configured dimensions come first in every dimension set; ones that
        // CloudWatch would refuse, and any past the 30th, are left out.
        let mut kept: Vec<(String, String)> = Vec::new();
        for (name, value) in std::mem::take(&mut config.dimensions) {
            let problem = rules::check_dimension(&name, &value).err().or_else(|| {
                if kept.iter().any(|(n, _)| *n == name) {
                    Some("it is configured twice".to_owned())
                } else if kept.len() == MAX_DIMENSIONS {
                    Some(format!("a dimension set holds at most {MAX_DIMENSIONS}"))
                } else {
                    None
                }
            });
            match problem {
                None => kept.push((name, value)),
                Some(reason) => {
                    tracing::warn!("the EMF dimension {name:?} is left out: {reason}");
                    warned.insert(format!("dimension {name}"));
                }
            }
        }
        config.dimensions = kept;
        Self {
            config,
            by_key: RwLock::default(),
            series: RwLock::default(),
            units: RwLock::default(),
            warned: Mutex::new(warned),
            rendering: Mutex::new(()),
        }
    }

    /// Logs `message` once for `topic`.
    fn warn_once(&self, topic: String, message: impl FnOnce() -> String) {
        let mut warned = self.warned.lock().unwrap_or_else(PoisonError::into_inner);
        if warned.len() >= MAX_WARNED {
            warned.clear();
        }
        if warned.insert(topic) {
            tracing::warn!("{}", message());
        }
    }

    /// The series `key` is written as, or why it is not written at all.
    ///
    /// The rules, in order: a name CloudWatch refuses (empty, over 255 bytes) or one
    /// that a configured dimension or `_aws` already uses is not recorded. Each label
    /// becomes a dimension, except one whose name or value CloudWatch refuses, one
    /// named like a configured dimension (the configured value stands) or like the
    /// metric itself; those are left out. Of a label repeated, the last value counts.
    /// Labels are taken in name order until the dimension set holds 30 dimensions,
    /// CloudWatch's limit; the rest are left out.
    fn series_of(&self, key: &Key) -> Result<Series, String> {
        let name = key.name();
        rules::check_metric_name(name)?;
        if name == "_aws" || self.config.dimensions.iter().any(|(d, _)| d == name) {
            return Err("the name is taken by a dimension or by _aws".to_owned());
        }
        let mut labels: BTreeMap<&str, &str> = BTreeMap::new();
        for label in key.labels() {
            let (label_name, value) = (label.key(), label.value());
            let refused = rules::check_dimension(label_name, value).err().or_else(|| {
                if label_name == name || label_name == "_aws" {
                    Some("the name is the metric's own, or _aws".to_owned())
                } else if self.config.dimensions.iter().any(|(d, _)| d == label_name) {
                    Some("a configured dimension has that name".to_owned())
                } else {
                    None
                }
            });
            match refused {
                None => {
                    labels.insert(label_name, value);
                }
                Some(reason) => self.warn_once(format!("label {name} {label_name}"), || {
                    format!(
                        "the label {label_name:?} of metric {name:?} is not a dimension: {reason}"
                    )
                }),
            }
        }
        let room = MAX_DIMENSIONS - self.config.dimensions.len();
        if labels.len() > room {
            self.warn_once(format!("labels {name}"), || {
                format!(
                    "metric {name:?} has {} labels; only the first {room} by name become dimensions (CloudWatch allows {MAX_DIMENSIONS} per metric)",
                    labels.len()
                )
            });
        }
        Ok(Series {
            labels: labels
                .into_iter()
                .take(room)
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            name: name.to_owned(),
        })
    }

    /// The cell for `key`, made with `make` on first use; `None` when the key is not
    /// recorded or already names a metric of another kind.
    fn register(&self, key: &Key, make: fn() -> Metric) -> Option<Metric> {
        if let Some(found) = self
            .by_key
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
        {
            return Some(found.clone());
        }
        let series = match self.series_of(key) {
            Ok(series) => series,
            Err(reason) => {
                self.warn_once(format!("metric {}", key.name()), || {
                    format!("metric {:?} is not recorded: {reason}", key.name())
                });
                return None;
            }
        };
        let metric = self
            .series
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(series)
            .or_insert_with(make)
            .clone();
        self.by_key
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.clone(), metric.clone());
        Some(metric)
    }

    /// Warns, once, that `key` asked for a `wanted` but is recorded as `found` (when
    /// it is recorded at all): one name in one line cannot be two metrics.
    fn wrong_kind(&self, key: &Key, wanted: &str, found: Option<&Metric>) {
        if let Some(found) = found {
            self.warn_once(format!("kind {} {wanted}", key.name()), || {
                format!(
                    "metric {:?} is a {} already; the {wanted} of that name is not recorded",
                    key.name(),
                    found.kind()
                )
            });
        }
    }

    fn describe(&self, key: &KeyName, unit: Option<Unit>) {
        if let Some(unit) = unit {
            self.units
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(key.as_str().to_owned(), unit);
        }
    }

    /// The EMF lines for everything recorded since the last call, stamped `now_ms`:
    /// one line per set of label values, each with at most 100 metrics.
    pub(crate) fn render(&self, now_ms: u64) -> Vec<String> {
        let _one_at_a_time = self
            .rendering
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let series = self.series.read().unwrap_or_else(PoisonError::into_inner);
        let units = self.units.read().unwrap_or_else(PoisonError::into_inner);
        let mut lines = Vec::new();
        let mut group: Vec<(&str, &'static str, Value)> = Vec::new();
        let mut entries = series.iter().peekable();
        while let Some((s, metric)) = entries.next() {
            let unit = units.get(&s.name).copied();
            if let Some((unit, value)) = Self::value(metric, unit) {
                group.push((&s.name, unit, value));
            }
            let last_of_line = entries
                .peek()
                .is_none_or(|(next, _)| next.labels != s.labels);
            if last_of_line {
                for chunk in group.chunks(MAX_METRICS_PER_LINE) {
                    lines.push(self.line(now_ms, &s.labels, chunk));
                }
                group.clear();
            }
        }
        lines
    }

    /// What `metric` says this time, with its CloudWatch unit; `None` when it has
    /// nothing to say (a histogram without values, a gauge CloudWatch would refuse).
    fn value(metric: &Metric, unit: Option<Unit>) -> Option<(&'static str, Value)> {
        let (unit, factor) = match (metric, unit) {
            (Metric::Counter(_), None) => ("Count", 1.0),
            (_, None) => ("None", 1.0),
            (_, Some(unit)) => cloudwatch_unit(unit),
        };
        let value = match metric {
            Metric::Counter(c) => {
                let increase = c.take_increase();
                #[allow(clippy::float_cmp, clippy::cast_precision_loss)]
                if factor == 1.0 {
                    json!(increase)
                } else {
                    json!(increase as f64 * factor)
                }
            }
            Metric::Gauge(g) => {
                let v = f64::from_bits(g.0.load(Ordering::Relaxed)) * factor;
                if !rules::is_cloudwatch_value(v) {
                    return None;
                }
                json!(v)
            }
            Metric::Histogram(h) => {
                let taken =
                    std::mem::take(&mut *h.0.lock().unwrap_or_else(PoisonError::into_inner));
                taken.to_emf(factor)?
            }
        };
        Some((unit, value))
    }

    /// One EMF document: the dimensions, the metrics, and the directive naming them.
    fn line(
        &self,
        now_ms: u64,
        labels: &[(String, String)],
        metrics: &[(&str, &'static str, Value)],
    ) -> String {
        let config = &self.config;
        let mut root = Map::new();
        let mut dimension_set = Vec::new();
        for (name, value) in config.dimensions.iter().chain(labels) {
            root.insert(name.clone(), json!(value));
            dimension_set.push(name.as_str());
        }
        let mut definitions = Vec::with_capacity(metrics.len());
        for (name, unit, value) in metrics {
            definitions.push(json!({"Name": name, "Unit": unit}));
            root.insert((*name).to_owned(), value.clone());
        }
        root.insert(
            "_aws".to_owned(),
            json!({
                "Timestamp": now_ms,
                "CloudWatchMetrics": [{
                    "Namespace": config.namespace,
                    "Dimensions": [dimension_set],
                    "Metrics": definitions,
                }],
            }),
        );
        Value::Object(root).to_string()
    }
}

impl Recorder for EmfRecorder {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, _description: SharedString) {
        self.registry.describe(&key, unit);
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, _description: SharedString) {
        self.registry.describe(&key, unit);
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, _description: SharedString) {
        self.registry.describe(&key, unit);
    }

    fn register_counter(&self, key: &Key, _metadata: &Metadata<'_>) -> Counter {
        match self
            .registry
            .register(key, || Metric::Counter(Arc::default()))
        {
            Some(Metric::Counter(c)) => Counter::from_arc(c),
            other => {
                self.registry.wrong_kind(key, "counter", other.as_ref());
                Counter::noop()
            }
        }
    }

    fn register_gauge(&self, key: &Key, _metadata: &Metadata<'_>) -> Gauge {
        match self
            .registry
            .register(key, || Metric::Gauge(Arc::default()))
        {
            Some(Metric::Gauge(g)) => Gauge::from_arc(g),
            other => {
                self.registry.wrong_kind(key, "gauge", other.as_ref());
                Gauge::noop()
            }
        }
    }

    fn register_histogram(&self, key: &Key, _metadata: &Metadata<'_>) -> Histogram {
        match self
            .registry
            .register(key, || Metric::Histogram(Arc::default()))
        {
            Some(Metric::Histogram(h)) => Histogram::from_arc(h),
            other => {
                self.registry.wrong_kind(key, "histogram", other.as_ref());
                Histogram::noop()
            }
        }
    }
}
