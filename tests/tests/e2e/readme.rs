//! The README's configuration tables agree with what the binaries' `--help` says.

use std::collections::BTreeMap;

use e2e::process::run_to_exit;
use e2e::workspace_root;

/// Every `[env: NAME=]` in `--help`, with its `[default: ...]` when there is one.
fn settings_from_help(help: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in help.lines().map(str::trim) {
        if line.starts_with('-') {
            current = None;
        }
        if let Some(rest) = line.strip_prefix("[env: ") {
            let name = rest.split('=').next().unwrap_or_default().to_owned();
            out.insert(name.clone(), "—".to_owned());
            current = Some(name);
        } else if let (Some(rest), Some(name)) = (line.strip_prefix("[default: "), &current) {
            out.insert(name.clone(), rest.trim_end_matches(']').to_owned());
        }
    }
    out
}

/// Rows of the README tables under `heading`, as cells without backticks.
fn table(readme: &str, heading: &str) -> Vec<Vec<String>> {
    let start = readme
        .find(heading)
        .unwrap_or_else(|| panic!("README has no {heading:?}"));
    readme[start..]
        .lines()
        .skip(1)
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(|row| {
            row.trim_matches('|')
                .split('|')
                .map(|c| c.trim().trim_matches('`').to_owned())
                .collect()
        })
        .collect()
}

/// The README's settings for `service`: its own table, the task protection table's
/// `column`, and the metrics table when `with_metrics` (the service's `--help` lists
/// `METRICS`).
fn readme_settings(
    readme: &str,
    service: &str,
    column: usize,
    with_metrics: bool,
    with_drain: bool,
) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = table(readme, &format!("### {service}\n"))
        .into_iter()
        .map(|row| {
            let default = if row[1] == "required" {
                "—".to_owned()
            } else {
                row[1].clone()
            };
            (row[0].clone(), default)
        })
        .collect();
    for row in table(readme, "### Task protection (both services)") {
        out.insert(row[0].clone(), row[column].clone());
    }
    if with_metrics {
        for row in table(readme, "### Metrics (both services)") {
            out.insert(row[0].clone(), row[1].clone());
        }
    }
    if with_drain {
        for row in table(readme, "### Drain (both services)") {
            out.insert(row[0].clone(), row[1].clone());
        }
    }
    out
}

async fn check(service: &str, column: usize) {
    let (status, help, stderr) = run_to_exit(service, &["--help"], &[]).await;
    assert!(status.success(), "{service} --help: {stderr}");
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let actual = settings_from_help(&help);
    let documented = readme_settings(
        &readme,
        service,
        column,
        actual.contains_key("METRICS"),
        actual.contains_key("DRAIN"),
    );
    assert!(
        actual.len() >= 10,
        "too few settings parsed from --help: {actual:?}"
    );
    assert_eq!(
        documented, actual,
        "README's configuration for {service} (left) differs from `{service} --help` (right)"
    );
}

#[tokio::test]
async fn readme_configuration_matches_queue_consumer_help() {
    check("queue-consumer", 1).await;
}

#[tokio::test]
async fn readme_configuration_matches_websocket_help() {
    check("websocket", 2).await;
}

/// The margin below the stop timeout that `SHUTDOWN_GRACE_SECONDS` needs, as `--help`
/// and the README state it, is the one the worker keeps.
#[tokio::test]
async fn readme_and_help_state_the_grace_periods_margin() {
    let margin = queue_consumer::worker::SHUTDOWN_MARGIN.as_secs();
    let said = format!("Keep it {margin} s below");
    let (status, help, stderr) = run_to_exit("queue-consumer", &["--help"], &[]).await;
    assert!(status.success(), "{stderr}");
    let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(help.contains(&said), "--help does not say {said:?}: {help}");
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let row = table(&readme, "### queue-consumer\n")
        .into_iter()
        .find(|row| row[0] == "SHUTDOWN_GRACE_SECONDS")
        .unwrap_or_else(|| panic!("no SHUTDOWN_GRACE_SECONDS row"));
    assert!(row[2].contains(&said), "README says: {}", row[2]);
    assert!(
        readme.contains(&format!("at most the grace period plus {margin} s")),
        "the README's shutdown budget is not {margin} s"
    );
}

/// The README's handler examples are the examples the workspace compiles.
#[test]
fn readme_custom_handler_is_the_compiled_example() {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    for name in ["custom-handler", "batch-handler"] {
        let example = std::fs::read_to_string(
            workspace_root().join(format!("queue-consumer/examples/{name}.rs")),
        )
        .unwrap();
        let code = example
            .find("use queue_consumer::config")
            .map(|at| &example[at..])
            .unwrap_or_else(|| panic!("the example {name} has no imports"));
        assert!(
            readme.contains(&format!("```rust\n{code}```")),
            "README's {name} differs from queue-consumer/examples/{name}.rs"
        );
    }
}
