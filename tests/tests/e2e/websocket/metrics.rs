//! The EMF lines the server writes, against the specification and what clients did.

use e2e::agent::FakeAgent;
use e2e::wait_for;
use futures_util::future::join_all;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use super::{STEP, Server, next_text};

/// Every metric the websocket writes outside a drain, the gauge first
/// (`ConnectionsClosedDrain` too is checked in `protocol_doc`).
const METRIC_NAMES: [&str; 12] = [
    "Connections",
    "ConnectionsOpened",
    "ConnectionsRefused",
    "ConnectionsClosedByClient",
    "ConnectionsClosedPingTimeout",
    "ConnectionsClosedSlowReader",
    "ConnectionsClosedOversize",
    "ConnectionsClosedAbuse",
    "ConnectionsClosedShutdown",
    "ConnectionsClosedLifetime",
    "MessagesIn",
    "MessagesOut",
];

/// Checks one EMF line against the specification and returns it parsed: a JSON
/// object with `_aws.Timestamp` in milliseconds and `_aws.CloudWatchMetrics[0]` whose
/// namespace is `namespace`, whose dimension names and metric names are all members
/// of the object with a number (or a histogram's distribution object, at most 100
/// `Values` with their `Counts`) as value, and whose metrics include every websocket
/// metric.
fn check_emf(line: &str, namespace: &str) -> serde_json::Map<String, Value> {
    let doc: Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("an EMF line is not one whole JSON object ({e}): {line}"));
    let doc = doc
        .as_object()
        .expect("an EMF line is a JSON object")
        .clone();
    let aws = &doc["_aws"];
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let ts = u128::from(aws["Timestamp"].as_u64().expect("an integer Timestamp"));
    assert!(
        ts <= now_ms && now_ms - ts < 120_000,
        "Timestamp {ts} is not milliseconds of the last two minutes (now {now_ms})"
    );
    let directive = &aws["CloudWatchMetrics"][0];
    assert_eq!(directive["Namespace"], namespace, "{line}");
    let dimension_sets = directive["Dimensions"].as_array().expect("Dimensions");
    assert!(!dimension_sets.is_empty());
    for set in dimension_sets {
        for name in set.as_array().expect("a dimension set is an array") {
            let name = name.as_str().expect("a dimension name");
            assert!(
                doc[name].is_string(),
                "dimension {name} is not a member: {line}"
            );
        }
    }
    let defined: Vec<&str> = directive["Metrics"]
        .as_array()
        .expect("Metrics")
        .iter()
        .map(|m| m["Name"].as_str().expect("a metric Name"))
        .collect();
    for name in &defined {
        let value = &doc[*name];
        let numbers = |v: &Value| {
            v.as_array()
                .is_some_and(|a| !a.is_empty() && a.len() <= 100 && a.iter().all(Value::is_number))
        };
        let distribution_ok = numbers(&value["Values"])
            && numbers(&value["Counts"])
            && value["Values"].as_array().map(Vec::len) == value["Counts"].as_array().map(Vec::len)
            && ["Count", "Sum", "Min", "Max"]
                .iter()
                .all(|k| value[*k].is_number());
        assert!(
            value.is_number() || distribution_ok,
            "metric {name} is not a member: {line}"
        );
    }
    for name in METRIC_NAMES {
        assert!(defined.contains(&name), "{name} missing from {line}");
    }
    doc
}

/// 40 clients connect, ping, and leave; the EMF lines on stdout add up to that, each
/// is a whole JSON object on a line of its own, and the last one is written at exit.
/// With an interval of an hour, only the line written at exit holds the counts.
async fn websocket_emf_metrics_count_what_clients_did(log_format: &str, interval: &str) {
    const CLIENTS: u64 = 40;
    let agent = FakeAgent::start().await;
    let mut server = Server::start(
        &agent,
        &[
            ("METRICS", "emf".to_owned()),
            ("METRICS_INTERVAL_SECONDS", interval.to_owned()),
            ("METRICS_NAMESPACE", "E2E".to_owned()),
            ("METRICS_SERVICE", "ws-e2e".to_owned()),
            ("LOG_FORMAT", log_format.to_owned()),
        ],
    )
    .await;
    join_all((0..CLIENTS).map(|_| async {
        let mut ws = server.connect().await;
        next_text(&mut ws).await;
        ws.send(Message::text("ping")).await.unwrap();
        assert_eq!(next_text(&mut ws).await, "pong");
        ws.close(None).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
    }))
    .await;
    server.wait_for_connections(0).await;
    let every_second = interval == "1";
    if every_second {
        // At least one line written on the interval, besides the last one at exit.
        server.service.wait_for_line("\"_aws\"", STEP).await;
    }
    server.service.terminate();
    let status = server.service.wait_exit(STEP).await;
    assert_eq!(status.code(), Some(0), "exit status {status}");

    // The process has exited, but its output may still be in the pipe: the line
    // written at exit is the last one.
    let service = &server.service;
    let lines = wait_for("the metrics line written at exit", STEP, || async {
        let lines = service.lines();
        lines
            .last()
            .is_some_and(|l| l.contains("\"_aws\""))
            .then_some(lines)
    })
    .await;
    let mut emf = Vec::new();
    for line in &lines {
        if line.contains("_aws") || line.contains("CloudWatchMetrics") {
            emf.push(check_emf(line, "E2E"));
        } else if log_format == "json" {
            let log: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("a JSON log line does not parse ({e}): {line}"));
            assert!(log.get("_aws").is_none());
        }
    }
    if every_second {
        assert!(emf.len() >= 2, "{} EMF lines", emf.len());
    } else {
        assert_eq!(emf.len(), 1, "only the line written at exit");
    }
    for doc in &emf {
        assert_eq!(doc["Service"], "ws-e2e");
    }
    let sum = |name: &str| -> u64 { emf.iter().map(|d| d[name].as_u64().unwrap()).sum() };
    let closed: u64 = METRIC_NAMES
        .iter()
        .filter(|n| n.starts_with("ConnectionsClosed"))
        .map(|n| sum(n))
        .sum();
    assert_eq!(sum("ConnectionsOpened"), CLIENTS);
    assert_eq!(closed, CLIENTS);
    assert_eq!(sum("ConnectionsClosedByClient"), CLIENTS);
    assert_eq!(sum("ConnectionsRefused"), 0);
    assert_eq!(sum("MessagesIn"), CLIENTS, "one ping each");
    assert_eq!(sum("MessagesOut"), 2 * CLIENTS, "a welcome and a pong each");
    let last = emf.last().unwrap();
    assert_eq!(last["Connections"].as_f64(), Some(0.0));
}

#[tokio::test]
async fn websocket_emf_metrics_with_text_logs() {
    websocket_emf_metrics_count_what_clients_did("text", "1").await;
}

#[tokio::test]
async fn websocket_emf_metrics_last_interval_is_written_at_exit() {
    websocket_emf_metrics_count_what_clients_did("text", "3600").await;
}

#[tokio::test]
async fn websocket_emf_metrics_with_json_logs() {
    websocket_emf_metrics_count_what_clients_did("json", "1").await;
}
