//! The lines the recorder writes, held against CloudWatch's EMF rules and against
//! the work that was recorded.

mod emf_rules;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use metrics::Unit;
use metrics_emf::{EmfConfig, EmfHandle, EmfRecorder};
use serde_json::{Map, Value, json};

type Doc = Map<String, Value>;

fn recorder() -> EmfRecorder {
    EmfRecorder::new(
        EmfConfig::builder("Test")
            .interval(Duration::from_secs(60))
            .dimension("Service", "svc")
            .dimension("Environment", "test")
            .build()
            .unwrap(),
    )
}

/// Renders, checks every line against the rules, and returns the documents.
fn render(handle: &EmfHandle) -> Vec<Doc> {
    handle
        .render()
        .iter()
        .map(|line| emf_rules::check(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

fn directive(doc: &Doc) -> &Value {
    &doc["_aws"]["CloudWatchMetrics"][0]
}

fn dimension_set(doc: &Doc) -> Vec<&str> {
    directive(doc)["Dimensions"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect()
}

fn unit(doc: &Doc, name: &str) -> Option<Value> {
    directive(doc)["Metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["Name"] == name)
        .map(|d| d["Unit"].clone())
}

/// The one document that holds `name`.
fn holding<'a>(docs: &'a [Doc], name: &str) -> &'a Doc {
    let found: Vec<&Doc> = docs.iter().filter(|d| d.contains_key(name)).collect();
    assert_eq!(found.len(), 1, "{name} in {} lines: {docs:?}", found.len());
    found[0]
}

#[test]
fn a_line_holds_each_kind_of_metric_with_its_unit() {
    let r = recorder();
    metrics::with_local_recorder(&r, || {
        metrics::describe_histogram!("JobDuration", Unit::Milliseconds, "job time");
        metrics::describe_gauge!("Queue.Depth", Unit::Count, "with a dot in its name");
        metrics::describe_histogram!("Payload.Size", Unit::Kibibytes, "binary kilobytes");
        metrics::describe_histogram!("Tick", Unit::Nanoseconds, "no nanoseconds in CloudWatch");
        metrics::counter!("JobsDone").increment(2);
        metrics::counter!("JobsDone").increment(1);
        metrics::gauge!("InFlight").set(4.0);
        metrics::gauge!("Queue.Depth").set(7.0);
        metrics::histogram!("JobDuration").record(12.5);
        metrics::histogram!("Payload.Size").record(2.0);
        metrics::histogram!("Tick").record(1500.0);
        metrics::histogram!("Empty").record(f64::NAN);
        metrics::gauge!("Broken").set(f64::INFINITY);
    });
    let docs = render(&r.handle());
    assert_eq!(docs.len(), 1);
    let doc = &docs[0];
    assert_eq!(directive(doc)["Namespace"], "Test");
    assert_eq!(dimension_set(doc), ["Service", "Environment"]);
    assert_eq!(doc["Service"], "svc");
    assert_eq!(doc["JobsDone"], 3);
    assert_eq!(unit(doc, "JobsDone"), Some(json!("Count")));
    assert_eq!(doc["InFlight"], 4.0);
    assert_eq!(unit(doc, "InFlight"), Some(json!("None")));
    assert_eq!(
        doc["JobDuration"],
        json!({"Values": [12.5], "Counts": [1], "Count": 1, "Sum": 12.5, "Min": 12.5, "Max": 12.5})
    );
    assert_eq!(unit(doc, "JobDuration"), Some(json!("Milliseconds")));
    // A dot in the name keeps the unit.
    assert_eq!(unit(doc, "Queue.Depth"), Some(json!("Count")));
    // Units CloudWatch lacks are converted.
    assert_eq!(unit(doc, "Payload.Size"), Some(json!("Bytes")));
    assert_eq!(doc["Payload.Size"]["Sum"], 2048.0);
    assert_eq!(unit(doc, "Tick"), Some(json!("Microseconds")));
    assert_eq!(doc["Tick"]["Values"], json!([1.5]));
    // Nothing CloudWatch would refuse, and no empty distribution.
    assert!(!doc.contains_key("Empty"));
    assert!(!doc.contains_key("Broken"));

    // The next line counts from zero, keeps the gauges, and has no histogram.
    let docs = render(&r.handle());
    assert_eq!(docs[0]["JobsDone"], 0);
    assert_eq!(docs[0]["InFlight"], 4.0);
    assert!(!docs[0].contains_key("JobDuration"));
}

#[test]
fn nothing_registered_writes_no_line() {
    assert!(recorder().handle().render().is_empty());
    let r = recorder();
    metrics::with_local_recorder(&r, || metrics::histogram!("Quiet").record(f64::NAN));
    assert!(
        r.handle().render().is_empty(),
        "a histogram without values says nothing"
    );
}

#[test]
fn labels_become_dimensions_one_line_per_set_of_values() {
    let r = recorder();
    metrics::with_local_recorder(&r, || {
        metrics::counter!("Closed", "cause" => "client").increment(2);
        metrics::counter!("Closed", "cause" => "server").increment(1);
        metrics::histogram!("Latency", "cause" => "client").record(5.0);
        metrics::counter!("Closed").increment(7);
        // Label order does not make another series.
        metrics::counter!("Calls", "b" => "2", "a" => "1").increment(1);
        metrics::counter!("Calls", "a" => "1", "b" => "2").increment(1);
    });
    let docs = render(&r.handle());
    assert_eq!(docs.len(), 4, "{docs:?}");
    let by = |cause: Option<&str>| {
        docs.iter()
            .find(|d| d.get("cause").and_then(Value::as_str) == cause && !d.contains_key("a"))
            .unwrap()
    };
    let client = by(Some("client"));
    assert_eq!(dimension_set(client), ["Service", "Environment", "cause"]);
    assert_eq!(client["Closed"], 2);
    assert_eq!(client["Latency"]["Count"], 1);
    assert_eq!(by(Some("server"))["Closed"], 1);
    let plain = by(None);
    assert_eq!(dimension_set(plain), ["Service", "Environment"]);
    assert_eq!(plain["Closed"], 7);
    let calls = holding(&docs, "Calls");
    assert_eq!(dimension_set(calls), ["Service", "Environment", "a", "b"]);
    assert_eq!(calls["Calls"], 2);
}

#[test]
fn past_cloudwatch_limits_what_would_be_refused_is_left_out() {
    let r = recorder();
    metrics::with_local_recorder(&r, || {
        // 40 labels: 28 fit beside Service and Environment, the first by name.
        let labels: Vec<metrics::Label> = (0..40)
            .map(|i| metrics::Label::new(format!("l{i:02}"), format!("v{i}")))
            .collect();
        metrics::counter!("Wide", labels).increment(1);
        // Labels CloudWatch would refuse as dimensions, or that clash.
        metrics::counter!(
            "Odd",
            "empty" => "",
            "blank" => "  ",
            ":colon" => "x",
            "caf\u{e9}" => "x",
            "ctl" => "a\u{1}b",
            "Service" => "other",
            "Odd" => "self",
            "long" => "v".repeat(1025),
            "ok" => "yes"
        )
        .increment(1);
        // Names CloudWatch would refuse, or that are taken.
        metrics::counter!("").increment(1);
        metrics::counter!("n".repeat(256)).increment(1);
        metrics::counter!("Service").increment(1);
        metrics::counter!("_aws").increment(1);
        // One name, one line: the second kind is not recorded.
        metrics::counter!("Both").increment(1);
        metrics::gauge!("Both").set(5.0);
    });
    let docs = render(&r.handle());
    let wide = holding(&docs, "Wide");
    let set = dimension_set(wide);
    assert_eq!(set.len(), 30);
    assert_eq!(set[..3], ["Service", "Environment", "l00"]);
    assert_eq!(set[29], "l27");
    assert!(!wide.contains_key("l28"));
    let odd = holding(&docs, "Odd");
    assert_eq!(dimension_set(odd), ["Service", "Environment", "ok"]);
    assert_eq!(odd["Service"], "svc", "the configured dimension stands");
    let names: Vec<&String> = docs.iter().flat_map(|d| d.keys()).collect();
    assert!(
        !names.iter().any(|n| n.is_empty() || n.len() > 255),
        "{names:?}"
    );
    assert_eq!(holding(&docs, "Both")["Both"], 1);
}

#[test]
fn more_than_a_hundred_metrics_make_more_lines() {
    let r = recorder();
    metrics::with_local_recorder(&r, || {
        for i in 0..250 {
            metrics::counter!(format!("M{i:03}")).increment(i);
        }
    });
    let docs = render(&r.handle());
    assert_eq!(docs.len(), 3);
    let mut total = 0;
    for doc in &docs {
        assert!(directive(doc)["Metrics"].as_array().unwrap().len() <= 100);
        total += (0..250)
            .filter_map(|i| doc.get(&format!("M{i:03}")).and_then(Value::as_u64))
            .sum::<u64>();
    }
    assert_eq!(total, (0..250).sum::<u64>());
}

#[test]
fn absolute_counters_are_reported_as_increases() {
    let r = recorder();
    let counter = metrics::with_local_recorder(&r, || metrics::counter!("BytesRead"));
    let h = r.handle();
    let next = || render(&h)[0]["BytesRead"].as_u64().unwrap();
    counter.absolute(100);
    assert_eq!(next(), 100);
    counter.absolute(150);
    assert_eq!(next(), 50);
    assert_eq!(next(), 0);
    counter.absolute(150);
    assert_eq!(next(), 0);
    // Lower than before: the source restarted from zero, so all of it is new.
    counter.absolute(20);
    assert_eq!(next(), 20);
    counter.absolute(25);
    counter.increment(5);
    assert_eq!(next(), 10);
}

/// Threads record a known workload as fast as they can while lines are rendered
/// all the while; the lines add up to exactly the work done.
#[test]
fn counts_and_sums_are_exact_at_any_rate() {
    const THREADS: u64 = 4;
    const PER_THREAD: u64 = 250_000;
    let r = recorder();
    let (counter, histogram, labelled) = metrics::with_local_recorder(&r, || {
        metrics::describe_histogram!("Work", Unit::Milliseconds, "work");
        (
            metrics::counter!("Jobs"),
            metrics::histogram!("Work"),
            metrics::histogram!("Work", "kind" => "odd"),
        )
    });
    let handle = r.handle();
    let done = Arc::new(AtomicBool::new(false));
    let renderer = {
        let (handle, done) = (handle.clone(), Arc::clone(&done));
        std::thread::spawn(move || {
            let mut docs = Vec::new();
            while !done.load(Ordering::SeqCst) {
                docs.extend(render(&handle));
                std::thread::sleep(Duration::from_millis(1));
            }
            docs
        })
    };
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (counter, histogram, labelled) =
                (counter.clone(), histogram.clone(), labelled.clone());
            std::thread::spawn(move || {
                for i in 0..PER_THREAD {
                    let v = ((t * PER_THREAD + i) * 7_919) % 1_000_003;
                    counter.increment(1);
                    #[allow(clippy::cast_precision_loss)]
                    if v % 2 == 1 {
                        labelled.record(v as f64);
                    } else {
                        histogram.record(v as f64);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let mut docs = renderer.join().unwrap();
    docs.extend(render(&handle));
    assert!(docs.len() > 2, "lines were written during the work");

    let n = THREADS * PER_THREAD;
    // Values up to a million: 20 powers of two, more buckets than a line holds.
    let expected: Vec<u64> = (0..n).map(|k| (k * 7_919) % 1_000_003).collect();
    let (odd, even): (Vec<u64>, Vec<u64>) = expected.iter().partition(|v| *v % 2 == 1);
    let jobs: u64 = docs.iter().filter_map(|d| d.get("Jobs")?.as_u64()).sum();
    assert_eq!(jobs, n);
    for (labelled, values) in [(false, even), (true, odd)] {
        let (mut count, mut counted, mut sum, mut weighted) = (0, 0.0, 0.0, 0.0);
        let (mut min, mut max) = (f64::MAX, f64::MIN);
        for doc in docs.iter().filter(|d| d.contains_key("kind") == labelled) {
            let Some(work) = doc.get("Work") else {
                continue;
            };
            count += work["Count"].as_u64().unwrap();
            sum += work["Sum"].as_f64().unwrap();
            min = min.min(work["Min"].as_f64().unwrap());
            max = max.max(work["Max"].as_f64().unwrap());
            for (v, c) in work["Values"]
                .as_array()
                .unwrap()
                .iter()
                .zip(work["Counts"].as_array().unwrap())
            {
                counted += c.as_f64().unwrap();
                weighted += v.as_f64().unwrap() * c.as_f64().unwrap();
            }
        }
        #[allow(clippy::cast_precision_loss)]
        let expected_sum = values.iter().sum::<u64>() as f64;
        assert_eq!(count, values.len() as u64);
        #[allow(clippy::cast_precision_loss)]
        let expected_count = values.len() as f64;
        assert_eq!(
            counted, expected_count,
            "Counts add up to the values recorded"
        );
        // Whole numbers: the sum is exact.
        assert_eq!(sum, expected_sum);
        // What CloudWatch computes, value × count, within rounding.
        assert!(
            (weighted - expected_sum).abs() <= expected_sum * 1e-12,
            "{weighted} vs {expected_sum}"
        );
        #[allow(clippy::cast_precision_loss)]
        let (lo, hi) = (
            *values.iter().min().unwrap() as f64,
            *values.iter().max().unwrap() as f64,
        );
        assert_eq!((min, max), (lo, hi));
    }
}

/// A zero interval would write in a busy loop and a huge one overflows the clock
/// (`run` panicked on both); the configuration refuses them, and a namespace
/// CloudWatch would refuse, when it is built.
#[test]
fn the_configuration_refuses_intervals_and_namespaces_cloudwatch_cannot_use() {
    for interval in [
        Duration::ZERO,
        Duration::from_millis(999),
        Duration::from_secs(86_401),
        Duration::MAX,
    ] {
        let err = EmfConfig::builder("Test")
            .interval(interval)
            .build()
            .unwrap_err();
        assert!(
            err.to_string().contains("interval") && err.to_string().contains("out of range"),
            "{err}"
        );
    }
    for interval in [Duration::from_secs(1), Duration::from_secs(86_400)] {
        assert!(
            EmfConfig::builder("Test")
                .interval(interval)
                .build()
                .is_ok()
        );
    }
    let err = EmfConfig::builder("AWS/ECS").build().unwrap_err();
    assert!(err.to_string().contains("AWS/"), "{err}");
    assert_eq!(
        EmfConfig::builder("Test").build().unwrap().interval(),
        Duration::from_secs(60)
    );
}
