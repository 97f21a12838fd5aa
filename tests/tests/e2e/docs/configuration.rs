//! docs/configuration.md against `--help` (names, defaults, ranges, values) and
//! against the parsers (each range's ends accepted, one past them refused with the
//! unit named), its rules between settings against what the binaries accept, and
//! its list of variables against every variable the code reads.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::Duration;

use e2e::process::{binary, run_to_exit};
use e2e::workspace_root;

use super::{plain, read, table};

const DOC: &str = "docs/configuration.md";

/// What `--help` or the document says of one setting.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Setting {
    default: String,
    /// `lo..=hi`, the accepted values joined by `, `, or `—`.
    range: String,
}

/// The number range at the end of a `--help` description: `(lo..=hi)`.
fn trailing_range(text: &str) -> Option<String> {
    let text = text.trim_end();
    let open = text.rfind('(')?;
    let inner = text[open + 1..].strip_suffix(')')?;
    let (lo, hi) = inner.split_once("..=")?;
    (lo.parse::<u64>().is_ok() && hi.parse::<u64>().is_ok()).then(|| inner.to_owned())
}

/// Every `[env: NAME=]` in `--help`, with its default, its range (the `(lo..=hi)`
/// ending its description) or its possible values.
fn settings_from_help(help: &str) -> BTreeMap<String, Setting> {
    let mut out = BTreeMap::new();
    let mut description = String::new();
    let mut values: Vec<String> = Vec::new();
    let mut in_values = false;
    let mut current: Option<String> = None;
    for line in help.lines().map(str::trim) {
        if line.starts_with("--") {
            description.clear();
            values.clear();
            in_values = false;
            current = None;
        } else if let Some(rest) = line.strip_prefix("[env: ") {
            let name = rest.split('=').next().unwrap_or_default().to_owned();
            let range = if values.is_empty() {
                trailing_range(&description).unwrap_or_else(|| "—".to_owned())
            } else {
                values.join(", ")
            };
            out.insert(
                name.clone(),
                Setting {
                    default: "—".to_owned(),
                    range,
                },
            );
            current = Some(name);
        } else if let (Some(rest), Some(name)) = (line.strip_prefix("[default: "), &current) {
            if let Some(s) = out.get_mut(name) {
                s.default = rest.trim_end_matches(']').to_owned();
            }
        } else if line == "Possible values:" {
            in_values = true;
        } else if in_values {
            if let Some(item) = line.strip_prefix("- ") {
                values.push(item.split(':').next().unwrap_or_default().to_owned());
            }
        } else if current.is_none() {
            description.push(' ');
            description.push_str(line);
        }
    }
    out
}

/// A row's setting, from the document's default and range cells.
fn from_row(default: &str, range: &str) -> Setting {
    let default = match plain(default) {
        "required" => "—",
        d => d,
    };
    let range = range.split(", ").map(plain).collect::<Vec<_>>().join(", ");
    Setting {
        default: default.to_owned(),
        range,
    }
}

/// The document's settings for `service` (its own table, the task protection
/// table's column, and the drain and metrics tables when its `--help` has them), with
/// each one's unit.
fn documented(
    doc: &str,
    service: &str,
    column: usize,
    shared: &[&str],
) -> BTreeMap<String, (Setting, String)> {
    let mut out = BTreeMap::new();
    let mut add = |rows: Vec<Vec<String>>, default: usize| {
        for row in rows {
            let n = row.len();
            assert!(n >= 5, "a row of {DOC} with too few cells: {row:?}");
            let setting = from_row(&row[default], &row[n - 3]);
            let previous = out.insert(
                plain(&row[0]).to_owned(),
                (setting, plain(&row[n - 2]).to_owned()),
            );
            assert!(previous.is_none(), "{} is in two tables", row[0]);
        }
    };
    add(table(doc, &format!("## {service}")), 1);
    add(table(doc, "## Task protection (both services)"), column);
    for heading in shared {
        add(table(doc, heading), 1);
    }
    out
}

async fn help_of(service: &str) -> String {
    let (status, help, stderr) = run_to_exit(service, &["--help"], &[]).await;
    assert!(status.success(), "{service} --help: {stderr}");
    help
}

async fn compare_with_help(service: &str, column: usize) {
    let help = settings_from_help(&help_of(service).await);
    assert!(help.len() >= 10, "too few settings in --help: {help:?}");
    let mut shared = Vec::new();
    if help.contains_key("DRAIN") {
        shared.push("## Drain (both services)");
    }
    if help.contains_key("METRICS") {
        shared.push("## Metrics (both services)");
    }
    let doc: BTreeMap<String, Setting> = documented(&read(DOC), service, column, &shared)
        .into_iter()
        .map(|(name, (setting, _))| (name, setting))
        .collect();
    assert_eq!(
        doc, help,
        "{DOC} for {service} (left) differs from `{service} --help` (right)"
    );
}

#[tokio::test]
async fn configuration_matches_queue_consumer_help() {
    compare_with_help("queue-consumer", 1).await;
}

#[tokio::test]
async fn configuration_matches_websocket_help() {
    compare_with_help("websocket", 2).await;
}

/// The least a service needs to start here, without AWS: a queue on a port where
/// nobody listens, a port the system picks.
fn base_env(service: &str) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("PATH", std::env::var("PATH").unwrap_or_default()),
        ("TASK_PROTECTION_BACKEND", "local".to_owned()),
        ("AWS_ACCESS_KEY_ID", "test".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "test".to_owned()),
        ("AWS_REGION", "us-east-1".to_owned()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
    ];
    if service == "queue-consumer" {
        env.push((
            "COPILOT_QUEUE_URI",
            "http://127.0.0.1:9/000000000000/settings".to_owned(),
        ));
    } else {
        env.push(("PORT", "0".to_owned()));
    }
    env
}

/// What became of one start with `var=value`: `Err(stderr)` when it was refused as
/// a bad setting (exit code 2), `Ok` when it was still running after `patience` or
/// exited otherwise (a queue nobody serves is not a bad setting).
async fn start_with(
    service: &str,
    settings: &[(&str, String)],
    patience: Duration,
) -> Result<(), String> {
    let mut child = tokio::process::Command::new(binary(service))
        .env_clear()
        .envs(base_env(service))
        .envs(settings.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {service}: {e}"));
    let stderr = child.stderr.take();
    let read_stderr = async move {
        let mut text = String::new();
        if let Some(mut s) = stderr {
            let _ = tokio::io::AsyncReadExt::read_to_string(&mut s, &mut text).await;
        }
        text
    };
    match tokio::time::timeout(patience, child.wait()).await {
        Ok(Ok(status)) if status.code() == Some(2) => Err(read_stderr.await),
        _ => {
            let _ = child.kill().await;
            Ok(())
        }
    }
}

/// Long enough for a refusal, which comes before anything else at start, on a slow
/// machine; an accepted value is simply still running then.
const PATIENCE: Duration = Duration::from_secs(3);

/// `lo..=hi` as numbers.
fn bounds(range: &str) -> Option<(u64, u64)> {
    let (lo, hi) = range.split_once("..=")?;
    Some((lo.parse().ok()?, hi.parse().ok()?))
}

/// Names of settings the rules between settings narrow: their ends are checked
/// against the rules' table instead.
fn ruled(doc: &str) -> BTreeSet<String> {
    table(doc, "## Rules between settings")
        .iter()
        .map(|row| plain(&row[0]).to_owned())
        .collect()
}

async fn ranges_hold(service: &'static str, column: usize) {
    let doc = read(DOC);
    let help = settings_from_help(&help_of(service).await);
    let mut shared = Vec::new();
    if help.contains_key("DRAIN") {
        shared.push("## Drain (both services)");
    }
    if help.contains_key("METRICS") {
        shared.push("## Metrics (both services)");
    }
    let ruled = ruled(&doc);
    let mut checks = Vec::new();
    for (name, (setting, unit)) in documented(&doc, service, column, &shared) {
        let Some((lo, hi)) = bounds(&setting.range) else {
            continue;
        };
        let allowed = match unit.as_str() {
            "—" => format!("allowed {lo}..={hi}"),
            unit => format!("allowed {lo}..={hi} {unit}"),
        };
        let mut refused = vec![hi + 1];
        if lo > 0 {
            refused.push(lo - 1);
        }
        for value in refused {
            let name = name.clone();
            let allowed = allowed.clone();
            checks.push(tokio::spawn(async move {
                let said = start_with(service, &[(&name, value.to_string())], PATIENCE)
                    .await
                    .err()
                    .unwrap_or_else(|| {
                        panic!("{service} accepted {name}={value}, out of {DOC}'s range")
                    });
                let expected = format!("{name}={value} is out of range: {allowed}");
                assert!(
                    said.lines().any(|l| l.trim_end().ends_with(&expected)),
                    "{service} with {name}={value}: {said:?}, not ending with {expected:?}"
                );
            }));
        }
        if !ruled.contains(&name) {
            for value in [lo, hi] {
                let name = name.clone();
                checks.push(tokio::spawn(async move {
                    if let Err(said) =
                        start_with(service, &[(&name, value.to_string())], PATIENCE).await
                    {
                        panic!("{service} refused {name}={value}, inside {DOC}'s range: {said}");
                    }
                }));
            }
        }
    }
    assert!(checks.len() >= 20, "too few ranges in {DOC}");
    for check in checks {
        check
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    }
}

#[tokio::test]
async fn queue_consumer_accepts_exactly_the_documented_ranges() {
    ranges_hold("queue-consumer", 1).await;
}

#[tokio::test]
async fn websocket_accepts_exactly_the_documented_ranges() {
    ranges_hold("websocket", 2).await;
}

/// The table of what the protection rules leave of each range, per service: both
/// ends accepted, one past either end refused.
#[tokio::test]
async fn the_rules_between_settings_hold_as_documented() {
    let doc = read(DOC);
    let rows = table(&doc, "## Rules between settings");
    assert!(rows.len() >= 3, "{rows:?}");
    let mut checks = Vec::new();
    for row in rows {
        for (service, cell) in [("queue-consumer", &row[1]), ("websocket", &row[2])] {
            let name = plain(&row[0]).to_owned();
            let (lo, hi) = bounds(plain(cell)).unwrap_or_else(|| panic!("{row:?}"));
            let mut cases = vec![(lo, true), (hi, true), (hi + 1, false)];
            if lo > 0 {
                cases.push((lo - 1, false));
            }
            for (value, accepted) in cases {
                let name = name.clone();
                checks.push(tokio::spawn(async move {
                    let outcome =
                        start_with(service, &[(&name, value.to_string())], PATIENCE).await;
                    assert_eq!(
                        outcome.is_ok(),
                        accepted,
                        "{service} with {name}={value}: {outcome:?} ({DOC} says {})",
                        if accepted { "accepted" } else { "refused" }
                    );
                }));
            }
        }
    }
    for check in checks {
        check
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    }
}

/// Every variable the code reads, as a flag's `env` or directly, is in the
/// document; every variable the document lists as read from the environment only is
/// read by the code, or is one of the AWS SDK's or tracing's own.
#[test]
fn every_variable_the_code_reads_is_documented() {
    let doc = read(DOC);
    let mut read_by_code = BTreeSet::new();
    for dir in [
        "crates/task-protection/src",
        "crates/metrics-emf/src",
        "queue-consumer/src",
        "websocket/src",
    ] {
        for file in rust_files(&workspace_root().join(dir)) {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            for pattern in ["env = \"", "var(\"", "var_os(\"", ": &str = \""] {
                for piece in text.split(pattern).skip(1) {
                    let name = piece.split('"').next().unwrap_or_default();
                    let is_variable = name.len() > 2
                        && name.contains('_')
                        && name
                            .chars()
                            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
                    // ECS's failure reasons are written as constants too.
                    if is_variable && !["TASK_NOT_VALID", "DEPLOYMENT_BLOCKED"].contains(&name) {
                        read_by_code.insert(name.to_owned());
                    }
                }
            }
        }
    }
    assert!(
        read_by_code.contains("ECS_AGENT_URI") && read_by_code.contains("WORKER_CONCURRENCY"),
        "{read_by_code:?}"
    );
    let missing: Vec<_> = read_by_code
        .iter()
        .filter(|name| !doc.contains(&format!("`{name}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "read by the code, not in {DOC}: {missing:?}"
    );
    for row in table(&doc, "## Read from the environment only") {
        for name in row[0].split(", ").map(plain) {
            let own = name.starts_with("AWS_")
                || ["RUST_LOG", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"].contains(&name);
            assert!(
                own || read_by_code.contains(name),
                "{DOC} lists {name}, which the code does not read"
            );
        }
    }
}

fn rust_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}
