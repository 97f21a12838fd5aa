//! The recorder: each metric is registered once and kept behind an `Arc`, so the
//! hot path (a counter's add, a gauge's store) never takes a lock. Only histograms
//! lock, briefly, to keep their bounded sample.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};
use serde_json::{Map, Value, json};

use crate::{EmfConfig, EmfHandle, MAX_SAMPLES};

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
            registry: Arc::new(Registry {
                config,
                metrics: RwLock::default(),
                units: RwLock::default(),
            }),
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

#[derive(Debug)]
enum Metric {
    Counter(Arc<CounterCell>),
    Gauge(Arc<GaugeCell>),
    Histogram(Arc<HistogramCell>),
}

#[derive(Debug)]
pub(crate) struct Registry {
    pub(crate) config: EmfConfig,
    /// By EMF name: the metric's name, with label values appended.
    metrics: RwLock<BTreeMap<String, Metric>>,
    units: RwLock<BTreeMap<String, Unit>>,
}

/// Counts since the last line.
#[derive(Debug, Default)]
struct CounterCell(AtomicU64);

impl CounterFn for CounterCell {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }

    fn absolute(&self, value: u64) {
        self.0.fetch_max(value, Ordering::Relaxed);
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

/// A uniform sample of at most [`MAX_SAMPLES`] values since the last line
/// (reservoir sampling), so memory and line size stay bounded under any load.
#[derive(Debug, Default)]
struct HistogramCell(Mutex<Sample>);

#[derive(Debug, Default)]
struct Sample {
    seen: u64,
    values: Vec<f64>,
}

impl HistogramFn for HistogramCell {
    fn record(&self, value: f64) {
        if !value.is_finite() {
            return; // CloudWatch rejects NaN and infinities.
        }
        let mut sample = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        sample.seen += 1;
        if sample.values.len() < MAX_SAMPLES {
            sample.values.push(value);
        } else {
            let slot = rand::random_range(0..sample.seen);
            if let Some(v) = usize::try_from(slot)
                .ok()
                .and_then(|i| sample.values.get_mut(i))
            {
                *v = value;
            }
        }
    }
}

/// The EMF name of a key: its name, then each label's value, joined by dots.
fn emf_name(key: &Key) -> String {
    let mut name = key.name().to_owned();
    for label in key.labels() {
        name.push('.');
        name.push_str(label.value());
    }
    name
}

fn emf_unit(unit: Option<Unit>) -> &'static str {
    match unit {
        Some(Unit::Count) => "Count",
        Some(Unit::Percent) => "Percent",
        Some(Unit::Seconds) => "Seconds",
        Some(Unit::Milliseconds) => "Milliseconds",
        Some(Unit::Microseconds) => "Microseconds",
        Some(Unit::Bytes) => "Bytes",
        Some(Unit::CountPerSecond) => "Count/Second",
        _ => "None",
    }
}

impl Registry {
    fn register<T>(
        &self,
        key: &Key,
        get: impl Fn(&Metric) -> Option<Arc<T>>,
        make: impl FnOnce(Arc<T>) -> Metric,
    ) -> Option<Arc<T>>
    where
        T: Default,
    {
        let name = emf_name(key);
        if let Some(found) = self
            .metrics
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&name)
        {
            return get(found);
        }
        let mut metrics = self.metrics.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(found) = metrics.get(&name) {
            return get(found);
        }
        let cell = Arc::new(T::default());
        metrics.insert(name, make(Arc::clone(&cell)));
        Some(cell)
    }

    fn describe(&self, key: &KeyName, unit: Option<Unit>) {
        if let Some(unit) = unit {
            self.units
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(key.as_str().to_owned(), unit);
        }
    }

    /// One EMF document for everything recorded since the last, stamped `now_ms`.
    pub(crate) fn render(&self, now_ms: u64) -> String {
        let metrics = self.metrics.read().unwrap_or_else(PoisonError::into_inner);
        let units = self.units.read().unwrap_or_else(PoisonError::into_inner);
        let mut root = Map::new();
        let mut definitions = Vec::new();
        for (name, metric) in metrics.iter() {
            let base = name.split('.').next().unwrap_or(name);
            let unit = units.get(base).copied();
            let value = match metric {
                Metric::Counter(c) => json!(c.0.swap(0, Ordering::Relaxed)),
                Metric::Gauge(g) => {
                    let v = f64::from_bits(g.0.load(Ordering::Relaxed));
                    if !v.is_finite() {
                        continue;
                    }
                    json!(v)
                }
                Metric::Histogram(h) => {
                    let values = {
                        let mut sample = h.0.lock().unwrap_or_else(PoisonError::into_inner);
                        sample.seen = 0;
                        std::mem::take(&mut sample.values)
                    };
                    if values.is_empty() {
                        continue; // EMF has no empty arrays: nothing to say this time.
                    }
                    json!(values)
                }
            };
            let unit = match (metric, unit) {
                (Metric::Counter(_), None) => "Count",
                (_, unit) => emf_unit(unit),
            };
            definitions.push(json!({"Name": name, "Unit": unit}));
            root.insert(name.clone(), value);
        }
        if definitions.is_empty() {
            return String::new();
        }
        let config = &self.config;
        let keys: Vec<&str> = config.dimensions.iter().map(|(k, _)| k.as_str()).collect();
        for (k, v) in &config.dimensions {
            root.insert(k.clone(), json!(v));
        }
        // EMF allows at most 100 metrics per directive.
        let directives: Vec<Value> = definitions
            .chunks(100)
            .map(|chunk| {
                json!({
                    "Namespace": config.namespace,
                    "Dimensions": [keys],
                    "Metrics": chunk,
                })
            })
            .collect();
        root.insert(
            "_aws".to_owned(),
            json!({"Timestamp": now_ms, "CloudWatchMetrics": directives}),
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
        self.registry
            .register(
                key,
                |m| match m {
                    Metric::Counter(c) => Some(Arc::clone(c)),
                    _ => None,
                },
                Metric::Counter,
            )
            .map_or_else(Counter::noop, Counter::from_arc)
    }

    fn register_gauge(&self, key: &Key, _metadata: &Metadata<'_>) -> Gauge {
        self.registry
            .register(
                key,
                |m| match m {
                    Metric::Gauge(g) => Some(Arc::clone(g)),
                    _ => None,
                },
                Metric::Gauge,
            )
            .map_or_else(Gauge::noop, Gauge::from_arc)
    }

    fn register_histogram(&self, key: &Key, _metadata: &Metadata<'_>) -> Histogram {
        self.registry
            .register(
                key,
                |m| match m {
                    Metric::Histogram(h) => Some(Arc::clone(h)),
                    _ => None,
                },
                Metric::Histogram,
            )
            .map_or_else(Histogram::noop, Histogram::from_arc)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn recorder() -> EmfRecorder {
        EmfRecorder::new(
            EmfConfig::new("Test", Duration::from_secs(60))
                .dimension("Service", "svc")
                .dimension("Environment", ""),
        )
    }

    #[test]
    fn a_line_follows_the_emf_specification() {
        let r = recorder();
        metrics::with_local_recorder(&r, || {
            metrics::describe_histogram!("JobDuration", Unit::Milliseconds, "job time");
            metrics::counter!("JobsDone").increment(2);
            metrics::counter!("JobsDone").increment(1);
            metrics::counter!("Closed", "cause" => "client").increment(1);
            metrics::gauge!("InFlight").set(4.0);
            metrics::histogram!("JobDuration").record(12.5);
            metrics::histogram!("Empty").record(f64::NAN);
        });
        let doc: Value = serde_json::from_str(&r.handle().render()).unwrap();
        let aws = &doc["_aws"];
        assert!(aws["Timestamp"].as_u64().unwrap() > 1_600_000_000_000);
        let directive = &aws["CloudWatchMetrics"][0];
        assert_eq!(directive["Namespace"], "Test");
        assert_eq!(directive["Dimensions"], json!([["Service"]]));
        assert_eq!(doc["Service"], "svc");
        assert!(doc.get("Environment").is_none(), "empty dimension left out");
        for def in directive["Metrics"].as_array().unwrap() {
            let name = def["Name"].as_str().unwrap();
            assert!(doc.get(name).is_some(), "{name} is not a member");
        }
        assert_eq!(doc["JobsDone"], 3);
        assert_eq!(doc["Closed.client"], 1);
        assert_eq!(doc["InFlight"], 4.0);
        assert_eq!(doc["JobDuration"], json!([12.5]));
        assert!(doc.get("Empty").is_none(), "no empty arrays");
        let unit = |n: &str| {
            directive["Metrics"]
                .as_array()
                .unwrap()
                .iter()
                .find(|d| d["Name"] == n)
                .map(|d| d["Unit"].clone())
        };
        assert_eq!(unit("JobDuration"), Some(json!("Milliseconds")));
        assert_eq!(unit("JobsDone"), Some(json!("Count")));
        // The next line counts from zero and keeps the gauge.
        let doc: Value = serde_json::from_str(&r.handle().render()).unwrap();
        assert_eq!(doc["JobsDone"], 0);
        assert_eq!(doc["InFlight"], 4.0);
        assert!(doc.get("JobDuration").is_none());
    }

    #[test]
    fn a_histogram_keeps_at_most_a_hundred_values_of_any_number() {
        let r = recorder();
        metrics::with_local_recorder(&r, || {
            for i in 0..100_000 {
                metrics::histogram!("Latency").record(f64::from(i));
            }
        });
        let doc: Value = serde_json::from_str(&r.handle().render()).unwrap();
        let values = doc["Latency"].as_array().unwrap();
        assert_eq!(values.len(), MAX_SAMPLES);
        // A uniform sample: not just the first hundred.
        let late = values
            .iter()
            .filter(|v| v.as_f64().unwrap() >= 50_000.0)
            .count();
        assert!(
            (20..=80).contains(&late),
            "{late} of 100 from the second half"
        );
    }
}
