//! The worker's CloudWatch EMF lines, read from the real binary's stdout and checked
//! against the Embedded Metric Format and against what the test did.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use e2e::agent::FakeAgent;
use e2e::moto::{Moto, aws_env, send};
use e2e::process::Service;
use serde_json::Value;

const STEP: Duration = Duration::from_secs(30);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0))
}

/// Runs the worker on 3 good jobs and 1 bad body with metrics every second, stops
/// it, and returns its lines with the time span of the run.
pub(crate) async fn run(log_format: &str, interval: &str) -> (Vec<String>, u64, u64) {
    let moto = Moto::start().await;
    let agent = FakeAgent::start().await;
    let client = moto.client();
    let queue = moto.create_queue("jobs", 30).await;
    for body in ["10", "20", "abc", "30"] {
        send(&client, &queue, body).await;
    }
    let mut env = aws_env(&moto.endpoint());
    env.extend([
        ("COPILOT_QUEUE_URI", queue.clone()),
        ("ECS_AGENT_URI", agent.uri()),
        ("TASK_PROTECTION_BACKEND", "agent".to_owned()),
        ("RUST_LOG", "info".to_owned()),
        ("LOG_FORMAT", log_format.to_owned()),
        ("METRICS", "emf".to_owned()),
        ("METRICS_INTERVAL_SECONDS", interval.to_owned()),
        ("METRICS_NAMESPACE", "E2E/Worker".to_owned()),
        ("METRICS_SERVICE", "worker-e2e".to_owned()),
        ("METRICS_ENVIRONMENT", "test".to_owned()),
    ]);
    let start = now_ms();
    let mut worker = Service::spawn("queue-consumer", &[], &env);
    worker.wait_for_count(" - Done", 3, STEP).await;
    worker.wait_for_line(" - Rejected", STEP).await;
    // No wait for another interval: the last counts come in the line flushed at exit.
    worker.terminate();
    let status = worker.wait_exit(STEP).await;
    assert!(status.success(), "exit status {status:?}");
    (worker.lines(), start, now_ms())
}

/// Checks every EMF line against the format; returns the sum of each counter.
fn check_emf(
    lines: &[String],
    start: u64,
    end: u64,
    json_logs: bool,
) -> serde_json::Map<String, Value> {
    let mut totals = serde_json::Map::new();
    let mut emf_lines = 0;
    for line in lines {
        if json_logs {
            // Every line, log or metrics, is one whole JSON object.
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not one JSON object ({e}): {line}"));
            assert!(v.is_object(), "{line}");
        }
        if !line.contains("\"_aws\"") {
            continue;
        }
        emf_lines += 1;
        assert!(
            line.starts_with('{') && line.ends_with('}'),
            "not alone on its line: {line}"
        );
        let doc: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("EMF line is not JSON ({e}): {line}"));
        let aws = &doc["_aws"];
        let ts = aws["Timestamp"]
            .as_u64()
            .unwrap_or_else(|| panic!("no Timestamp: {line}"));
        assert!(
            start <= ts && ts <= end + 1000,
            "Timestamp {ts} not in ms of the run: {line}"
        );
        let directives = aws["CloudWatchMetrics"]
            .as_array()
            .unwrap_or_else(|| panic!("{line}"));
        assert!(!directives.is_empty(), "{line}");
        for d in directives {
            assert_eq!(d["Namespace"], "E2E/Worker", "{line}");
            assert_eq!(
                d["Dimensions"],
                serde_json::json!([["Service", "Environment"]]),
                "{line}"
            );
            for m in d["Metrics"].as_array().unwrap_or_else(|| panic!("{line}")) {
                let name = m["Name"].as_str().unwrap_or_else(|| panic!("{line}"));
                assert!(doc.get(name).is_some(), "{name} is not a member: {line}");
                if name == "JobDuration" || name == "ReceiveToStart" {
                    assert_eq!(m["Unit"], "Milliseconds", "{line}");
                }
            }
        }
        assert_eq!(doc["Service"], "worker-e2e", "{line}");
        assert_eq!(doc["Environment"], "test", "{line}");
        for name in [
            "JobsReceived",
            "JobsDone",
            "JobsFailed",
            "JobsHandedBack",
            "BadBodies",
            "JobsDeadLettered",
            "SqsErrors",
        ] {
            let n = doc[name]
                .as_u64()
                .unwrap_or_else(|| panic!("no {name}: {line}"));
            let sum = totals.get(name).and_then(Value::as_u64).unwrap_or(0) + n;
            totals.insert(name.to_owned(), sum.into());
        }
        // A histogram is EMF's distribution object: Values with their Counts, and
        // the exact Count, Sum, Min and Max.
        if let Some(durations) = doc.get("JobDuration") {
            let n = durations["Count"]
                .as_u64()
                .unwrap_or_else(|| panic!("no Count: {line}"));
            let counts: u64 = durations["Counts"]
                .as_array()
                .unwrap_or_else(|| panic!("no Counts: {line}"))
                .iter()
                .filter_map(Value::as_u64)
                .sum();
            assert_eq!(counts, n, "{line}");
            assert_eq!(
                durations["Values"].as_array().map(Vec::len),
                durations["Counts"].as_array().map(Vec::len),
                "{line}"
            );
            let count = totals
                .get("JobDurationCount")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            totals.insert("JobDurationCount".to_owned(), (count + n).into());
        }
    }
    assert!(emf_lines >= 1, "no EMF line");
    totals
}

async fn check(log_format: &str, interval: &str) {
    let (lines, start, end) = run(log_format, interval).await;
    let totals = check_emf(&lines, start, end, log_format == "json");
    let n = |k: &str| totals.get(k).and_then(Value::as_u64).unwrap_or(0);
    assert_eq!(n("JobsReceived"), 4, "{totals:?}");
    assert_eq!(n("JobsDone"), 3, "{totals:?}");
    assert_eq!(n("BadBodies"), 1, "{totals:?}");
    assert_eq!(n("JobsFailed"), 0, "{totals:?}");
    assert_eq!(n("SqsErrors"), 0, "{totals:?}");
    // One handler run per message, the bad body's included.
    assert_eq!(n("JobDurationCount"), 4, "{totals:?}");
}

#[tokio::test]
async fn queue_consumer_metrics_emf_lines_with_text_logs() {
    check("text", "1").await;
}

#[tokio::test]
async fn queue_consumer_metrics_emf_lines_with_json_logs() {
    check("json", "1").await;
}

/// With an interval longer than the run, every count is in the one line written at
/// exit.
#[tokio::test]
async fn queue_consumer_metrics_last_interval_is_written_at_exit() {
    check("text", "3600").await;
}
