//! The documentation agrees with the code: every table, command and figure a reader
//! acts on is read here and checked against the binaries, the parsers and the
//! constants, so that a change to either side without the other fails.

mod claims;
mod commands;
mod configuration;
mod links;
mod metrics;

use e2e::workspace_root;

/// The text of `path`, relative to the workspace root.
pub(crate) fn read(path: &str) -> String {
    std::fs::read_to_string(workspace_root().join(path))
        .unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// The rows of the first table after `heading` (a line of its own), as cells with
/// their backticks kept; the header and the separator are left out.
pub(crate) fn table(doc: &str, heading: &str) -> Vec<Vec<String>> {
    let start = doc
        .lines()
        .position(|l| l.trim_end() == heading)
        .unwrap_or_else(|| panic!("no heading {heading:?}"));
    doc.lines()
        .skip(start + 1)
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(|row| {
            row.trim()
                .trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().to_owned())
                .collect()
        })
        .collect()
}

/// `cell` without the backticks around it.
pub(crate) fn plain(cell: &str) -> &str {
    cell.trim().trim_matches('`')
}

/// Every fenced code block of `doc`: its info string and its text.
pub(crate) fn code_blocks(doc: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut open: Option<(String, String)> = None;
    for line in doc.lines() {
        let fence = line.trim_start().strip_prefix("```");
        match (fence, open.take()) {
            (Some(_), Some(block)) => out.push(block),
            (Some(info), None) => open = Some((info.trim().to_owned(), String::new())),
            (None, Some((info, mut text))) => {
                text.push_str(line);
                text.push('\n');
                open = Some((info, text));
            }
            (None, None) => {}
        }
    }
    out
}

/// The documents a reader follows: the READMEs, BENCHMARKS.md and docs/.
pub(crate) fn documents() -> Vec<String> {
    let mut docs: Vec<String> = [
        "README.md",
        "BENCHMARKS.md",
        "queue-consumer/README.md",
        "websocket/README.md",
        "crates/task-protection/README.md",
        "crates/metrics-emf/README.md",
    ]
    .iter()
    .map(|d| (*d).to_owned())
    .filter(|d| workspace_root().join(d).exists())
    .collect();
    for entry in std::fs::read_dir(workspace_root().join("docs"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".md") {
            docs.push(format!("docs/{name}"));
        }
    }
    docs.sort();
    docs
}
