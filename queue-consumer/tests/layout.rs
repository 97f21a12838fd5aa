//! The crate's files fit their rooms: none over 700 lines, and no two modules import
//! each other, even by a detour, so that the flow of a message (receive → dispatch →
//! run → settle) reads top-down, each module using only what lies below it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_LINES: usize = 700;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn crate_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn no_file_is_over_700_lines() {
    let mut files = Vec::new();
    for dir in ["src", "examples", "tests"] {
        rust_files(&crate_root().join(dir), &mut files);
    }
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let lines = std::fs::read_to_string(f).ok()?.lines().count();
            (lines > MAX_LINES).then(|| format!("{}: {lines} lines", f.display()))
        })
        .collect();
    assert!(files.len() > 10, "too few files found: {files:?}");
    assert!(long.is_empty(), "over {MAX_LINES} lines: {long:?}");
}

/// The library's modules (by their path under `crate::`, `queue::error` for
/// `src/queue/error.rs`) and the modules each one's code names, tests left out.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = crate_root().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let module_of = |path: &Path| -> String {
        let rel = path.strip_prefix(&src).unwrap_or(path).with_extension("");
        let parts: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .filter(|c| c != "mod")
            .collect();
        parts.join("::")
    };
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(f)).collect();
    // What the crate root re-exports, by name: `crate::Worker` is `worker`'s.
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap_or_default();
    let mut reexports: BTreeMap<String, String> = BTreeMap::new();
    for item in lib.split(';') {
        let Some(rest) = item.trim().strip_prefix("pub use ") else {
            continue;
        };
        let (module, names) = rest.split_once("::").unwrap_or((rest, ""));
        for name in names.split(|c: char| !(c.is_alphanumeric() || c == '_')) {
            if !name.is_empty() && modules.contains(module) {
                reexports.insert(name.to_owned(), module.to_owned());
            }
        }
    }
    let mut graph = BTreeMap::new();
    for file in &files {
        let module = module_of(file);
        // The binary's own modules and the crate root are above everything.
        if matches!(module.as_str(), "lib" | "main" | "sleep") {
            continue;
        }
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let mut uses = BTreeSet::new();
        for line in code.lines().map(str::trim) {
            if line.starts_with("//") {
                continue;
            }
            let mut rest = line;
            while let Some(at) = rest.find("crate::") {
                rest = &rest[at + "crate::".len()..];
                let path: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                // The longest module the path names: `queue::error::SqsError` is in
                // `queue::error`, `queue::Queue` in `queue`.
                let segments: Vec<&str> = path.split("::").collect();
                let named = (1..=segments.len())
                    .rev()
                    .map(|n| segments[..n].join("::"))
                    .find(|m| modules.contains(m))
                    .or_else(|| reexports.get(segments[0]).cloned());
                if let Some(named) = named
                    && named != module
                {
                    uses.insert(named);
                }
            }
        }
        graph.insert(module, uses);
    }
    graph
}

#[test]
fn no_module_imports_one_that_imports_it() {
    let graph = imports();
    assert!(graph.len() > 10, "too few modules found: {graph:?}");
    // Depth-first: a module met again on the current path closes a circle.
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        circles: &mut Vec<String>,
    ) {
        if done.contains(m) {
            return;
        }
        if let Some(at) = path.iter().position(|p| p == m) {
            let mut circle = path[at..].to_vec();
            circle.push(m.to_owned());
            circles.push(circle.join(" → "));
            return;
        }
        path.push(m.to_owned());
        for next in graph.get(m).into_iter().flatten() {
            visit(next, graph, path, done, circles);
        }
        path.pop();
        done.insert(m.to_owned());
    }
    let mut circles = Vec::new();
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        visit(m, &graph, &mut Vec::new(), &mut done, &mut circles);
    }
    assert!(
        circles.is_empty(),
        "modules importing in a circle: {circles:#?}"
    );
}

#[test]
fn a_message_flows_top_down_through_receive_dispatch_run_settle() {
    let graph = imports();
    let uses = |a: &str, b: &str| graph.get(a).is_some_and(|u| u.contains(b));
    for (upper, lower) in [
        ("worker", "receive"),
        ("receive", "dispatch"),
        ("dispatch", "run"),
        ("dispatch", "settle"),
    ] {
        assert!(
            uses(upper, lower),
            "{upper} does not use {lower}: {graph:#?}"
        );
    }
}
