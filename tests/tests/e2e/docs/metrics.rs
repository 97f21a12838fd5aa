//! The worker's metrics table in queue-consumer/README.md against the metric names
//! the real binary writes in its EMF lines. (The websocket's table is checked in
//! `websocket::protocol_doc`.)

use std::collections::BTreeSet;

use super::{plain, read, table};

/// The names in the `CloudWatchMetrics` directives of every EMF line.
fn emitted(lines: &[String]) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in lines.iter().filter(|l| l.contains("\"_aws\"")) {
        let doc: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("EMF line ({e}): {line}"));
        for directive in doc["_aws"]["CloudWatchMetrics"]
            .as_array()
            .into_iter()
            .flatten()
        {
            for metric in directive["Metrics"].as_array().into_iter().flatten() {
                names.insert(metric["Name"].as_str().unwrap_or_default().to_owned());
            }
        }
    }
    names
}

#[tokio::test]
async fn the_worker_readme_lists_exactly_the_metrics_it_writes() {
    let (lines, _, _) = crate::queue_consumer_metrics::run("text", "1").await;
    let written = emitted(&lines);
    let listed: BTreeSet<String> = table(&read("queue-consumer/README.md"), "## Metrics")
        .iter()
        .map(|row| plain(&row[0]).to_owned())
        .collect();
    // The drain's metrics are written only while the drain watcher runs, which it
    // does only inside ECS; the rest from the start.
    let drain: BTreeSet<String> = ["DrainLeaving", "DrainApiCalls", "DrainDuration"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let unlisted: Vec<_> = written.difference(&listed).collect();
    assert!(
        unlisted.is_empty(),
        "written, not in queue-consumer/README.md: {unlisted:?}"
    );
    let unwritten: Vec<_> = listed
        .difference(&written)
        .filter(|n| !drain.contains(*n))
        .collect();
    assert!(
        unwritten.is_empty(),
        "in queue-consumer/README.md, never written: {unwritten:?}"
    );
}
