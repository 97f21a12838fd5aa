//! Figures and code the docs state, against the constants and the sources they come
//! from: the worker's shutdown budget, the handler examples, the mutation lists, the
//! library's install lines.

use super::{code_blocks, plain, read, table};
use e2e::process::run_to_exit;

/// The shutdown margin the worker keeps below the stop timeout, and its two parts,
/// as `--help`, docs/configuration.md and queue-consumer/README.md state them, are
/// the worker's constants; the release part is the library's own bound with the
/// agent.
#[tokio::test]
async fn the_shutdown_arithmetic_is_the_code_s() {
    use queue_consumer::worker::{RELEASE_BUDGET, SETTLE_BUDGET, SHUTDOWN_MARGIN};
    let (margin, settle, release) = (
        SHUTDOWN_MARGIN.as_secs(),
        SETTLE_BUDGET.as_secs(),
        RELEASE_BUDGET.as_secs(),
    );
    assert_eq!(margin, settle + release);
    // TaskProtection::shutdown takes at most the agent's landing window and a second
    // for the final answer.
    assert_eq!(
        RELEASE_BUDGET,
        task_protection::backend::AGENT_LANDING_WINDOW + std::time::Duration::from_secs(1)
    );
    let said = format!(
        "Keep it {margin} s below the task's stop timeout: {settle} s for the last deletes and hand-backs, and up to {release} s to release protection"
    );
    let (status, help, stderr) = run_to_exit("queue-consumer", &["--help"], &[]).await;
    assert!(status.success(), "{stderr}");
    let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(help.contains(&said), "--help does not say {said:?}: {help}");
    let doc = read("docs/configuration.md");
    let row = table(&doc, "## queue-consumer")
        .into_iter()
        .find(|row| plain(&row[0]) == "SHUTDOWN_GRACE_SECONDS")
        .unwrap_or_else(|| panic!("no SHUTDOWN_GRACE_SECONDS row"));
    let meaning = row.last().cloned().unwrap_or_default();
    assert!(
        meaning.contains(&format!("Keep it {margin} s below")),
        "docs/configuration.md says: {meaning}"
    );
    let worker = read("queue-consumer/README.md");
    let worker = worker.split_whitespace().collect::<Vec<_>>().join(" ");
    for claim in [
        format!(
            "the last deletes and hand-backs get {settle} s, and releasing protection up to {release} s"
        ),
        format!("at most the grace period plus {margin} s"),
    ] {
        assert!(
            worker.contains(&claim),
            "queue-consumer/README.md does not say {claim:?}"
        );
    }
}

/// The handler examples in queue-consumer/README.md are the examples the workspace
/// compiles.
#[test]
fn the_worker_readme_s_handlers_are_the_compiled_examples() {
    let readme = read("queue-consumer/README.md");
    for name in ["custom-handler", "batch-handler"] {
        let example = read(&format!("queue-consumer/examples/{name}.rs"));
        let code = example
            .find("use queue_consumer::config")
            .map(|at| &example[at..])
            .unwrap_or_else(|| panic!("the example {name} has no imports"));
        assert!(
            readme.contains(&format!("```rust\n{code}```")),
            "queue-consumer/README.md's {name} differs from queue-consumer/examples/{name}.rs"
        );
    }
}

/// docs/testing.md gives each mutation list's size as the list has it.
#[test]
fn the_mutation_counts_are_the_lists() {
    let doc = read("docs/testing.md");
    for list in [
        "scripts/mutations/task_protection.py",
        "scripts/mutations/drain.py",
    ] {
        let count = read(list).matches("\n (\"").count();
        assert!(count > 10, "{list}: {count}");
        let line = doc
            .lines()
            .find(|l| l.contains(&format!("scripts/mutate {list} ")) && l.contains("mutations"))
            .unwrap_or_else(|| panic!("docs/testing.md does not run {list}"));
        assert!(
            line.contains(&format!("# {count} mutations")),
            "{list} has {count} mutations; docs/testing.md: {line}"
        );
    }
}

/// The value of `key = "..."` in an inline table or a manifest line.
fn string_of(text: &str, key: &str) -> Option<String> {
    let rest = text.split(&format!("{key} = \"")).nth(1)?;
    Some(rest.split('"').next()?.to_owned())
}

/// Every `task-protection = ...` line the READMEs give names the crate's version (the
/// tag `v<version>` for git), features the crate has, and the crate's path.
#[test]
fn the_library_s_install_lines_name_what_exists() {
    let manifest = read("crates/task-protection/Cargo.toml");
    let version = string_of(&manifest, "version").unwrap_or_default();
    let features: Vec<&str> = manifest
        .split("[features]")
        .nth(1)
        .unwrap_or_default()
        .lines()
        .take_while(|l| !l.starts_with('['))
        .filter(|l| !l.starts_with('#') && l.contains(" = "))
        .filter_map(|l| l.split(" = ").next())
        .collect();
    assert!(features.contains(&"tower"), "{features:?}");
    let mut lines = 0;
    for doc in ["README.md", "crates/task-protection/README.md"] {
        for (info, block) in code_blocks(&read(doc)) {
            if info != "toml" {
                continue;
            }
            for line in block
                .lines()
                .filter(|l| l.starts_with("task-protection = "))
            {
                lines += 1;
                let value = line.trim_start_matches("task-protection = ");
                let wanted = if value.starts_with('"') {
                    Some(value.trim_matches('"').to_owned())
                } else {
                    string_of(value, "version")
                };
                if let Some(wanted) = wanted {
                    assert!(
                        version.starts_with(&wanted),
                        "{doc}: {line} is not version {version}"
                    );
                }
                if let Some(tag) = string_of(value, "tag") {
                    assert_eq!(tag, format!("v{version}"), "{doc}: {line}");
                }
                if let Some(path) = string_of(value, "path") {
                    assert!(path.ends_with("/crates/task-protection"), "{doc}: {line}");
                }
                let listed = value.split("features = [").nth(1).unwrap_or_default();
                let listed = listed.split(']').next().unwrap_or_default();
                for feature in listed
                    .split(',')
                    .map(|f| f.trim().trim_matches('"'))
                    .filter(|f| !f.is_empty())
                {
                    assert!(
                        features.contains(&feature),
                        "{doc}: {line}: no feature {feature}"
                    );
                }
            }
        }
    }
    assert!(lines >= 4, "only {lines} install lines");
    for doc in ["README.md", "crates/task-protection/README.md"] {
        assert!(
            read(doc).contains("not on crates.io yet"),
            "{doc} must say the crates.io line is for later"
        );
    }
}
