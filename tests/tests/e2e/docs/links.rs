//! Every relative link in the docs leads to a file that exists, and every `#anchor`
//! to a heading of it, as GitHub makes anchors: so moving a section or a file breaks
//! a test, not a reader's click.

use std::path::Path;

use e2e::workspace_root;

/// GitHub's anchor for a heading: lower case, punctuation other than `-` and `_`
/// dropped, spaces as `-`.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors_of(doc: &str) -> Vec<String> {
    let mut fenced = false;
    doc.lines()
        .filter(|l| {
            if l.trim_start().starts_with("```") {
                fenced = !fenced;
            }
            !fenced && l.starts_with('#')
        })
        .map(|l| anchor(l.trim_start_matches('#')))
        .collect()
}

/// The targets of `[text](target)` links in `doc`.
fn links(doc: &str) -> Vec<String> {
    doc.split("](")
        .skip(1)
        .filter_map(|rest| rest.split(')').next())
        .map(|t| t.split_whitespace().next().unwrap_or_default().to_owned())
        .filter(|t| !t.is_empty() && !t.contains("://") && !t.starts_with("mailto:"))
        .collect()
}

#[test]
fn every_relative_link_in_the_docs_resolves() {
    let root = workspace_root();
    let docs = super::documents();
    let mut problems = Vec::new();
    let mut checked = 0;
    for doc in &docs {
        let text = super::read(doc);
        let dir = Path::new(doc).parent().unwrap_or(Path::new(""));
        for link in links(&text) {
            checked += 1;
            let (path, fragment) = link.split_once('#').unwrap_or((&link, ""));
            let target = if path.is_empty() {
                root.join(doc)
            } else {
                root.join(dir).join(path)
            };
            if !target.exists() {
                problems.push(format!("{doc}: {link}: no {}", target.display()));
                continue;
            }
            if !fragment.is_empty() && target.is_file() {
                let heads = anchors_of(&std::fs::read_to_string(&target).unwrap_or_default());
                if !heads.iter().any(|h| h == fragment) {
                    problems.push(format!("{doc}: {link}: no heading #{fragment}"));
                }
            }
        }
    }
    assert!(checked >= 20, "only {checked} links");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn anchors_are_made_as_github_makes_them() {
    assert_eq!(
        anchor(" Topics, FIFO queues and your own job code"),
        "topics-fifo-queues-and-your-own-job-code"
    );
    assert_eq!(anchor(" 8.1 Prerequisites"), "81-prerequisites");
    assert_eq!(
        anchor(" Read from the environment only"),
        "read-from-the-environment-only"
    );
}
