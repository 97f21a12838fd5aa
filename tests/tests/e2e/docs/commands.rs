//! Every shell command in a code block of the README and the docs is parsed: the
//! block as a whole by `bash -n`; each command's script, package, binary, example or
//! test target exists; each flag given to one of this workspace's programs is one it
//! has; each path into the repository exists.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use e2e::workspace_root;

use super::{code_blocks, documents, read};

/// A target of a workspace package, from `cargo metadata`.
#[derive(Debug, Clone)]
struct Target {
    kind: String,
    src: PathBuf,
}

/// Every package name, and every target by name.
fn workspace() -> (Vec<String>, BTreeMap<String, Vec<Target>>) {
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(workspace_root())
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("cargo metadata's JSON");
    let mut packages = Vec::new();
    let mut targets: BTreeMap<String, Vec<Target>> = BTreeMap::new();
    for package in meta["packages"].as_array().into_iter().flatten() {
        let name = package["name"].as_str().unwrap_or_default().to_owned();
        for target in package["targets"].as_array().into_iter().flatten() {
            for kind in target["kind"].as_array().into_iter().flatten() {
                targets
                    .entry(target["name"].as_str().unwrap_or_default().to_owned())
                    .or_default()
                    .push(Target {
                        kind: kind.as_str().unwrap_or_default().to_owned(),
                        src: PathBuf::from(target["src_path"].as_str().unwrap_or_default()),
                    });
            }
        }
        packages.push(name);
    }
    (packages, targets)
}

/// Words of one command line, with quotes removed (enough for the docs' commands).
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut quote: Option<char> = None;
    let mut any = false;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                any = true;
            }
            (None, c) if c.is_whitespace() => {
                if any || !word.is_empty() {
                    out.push(std::mem::take(&mut word));
                }
                any = false;
            }
            (None, c) => {
                word.push(c);
                any = true;
            }
        }
    }
    if any || !word.is_empty() {
        out.push(word);
    }
    out
}

/// The commands of a shell block: continuation lines joined, comments and prompts
/// dropped, split at `&&`, `||`, `;` and `|`.
fn commands(block: &str) -> Vec<Vec<String>> {
    let joined = block.replace("\\\n", " ");
    let mut out = Vec::new();
    for line in joined.lines() {
        let line = line.trim().trim_start_matches("$ ");
        let line = match line.find(" #") {
            Some(at) => &line[..at],
            None if line.starts_with('#') => "",
            None => line,
        };
        for part in line
            .split("&&")
            .flat_map(|p| p.split("||"))
            .flat_map(|p| p.split(';'))
            .flat_map(|p| p.split('|'))
        {
            let mut w = words(part);
            // Leading variable assignments.
            while w
                .first()
                .is_some_and(|x| x.contains('=') && !x.starts_with('-'))
            {
                w.remove(0);
            }
            if !w.is_empty() {
                out.push(w);
            }
        }
    }
    out
}

/// The text of every `.rs` file beside `src` (a target's directory), to look flags up.
fn source_text(src: &Path) -> String {
    let dir = src.parent().unwrap_or(src);
    let mut text = String::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "rs") {
            text.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
        }
    }
    if src.file_name().is_some_and(|f| f == "main.rs") {
        return text;
    }
    // A single-file target: its own text, and a directory of its name if any.
    let own = src.with_extension("");
    for entry in std::fs::read_dir(&own).into_iter().flatten().flatten() {
        text.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
    }
    text
}

/// The `--help` of one of the workspace's binaries, from the build the tests use.
fn help_of(name: &str) -> String {
    let out = std::process::Command::new(e2e::process::binary(name))
        .arg("--help")
        .env_clear()
        .output()
        .unwrap_or_else(|e| panic!("{name} --help: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Checker {
    packages: Vec<String>,
    targets: BTreeMap<String, Vec<Target>>,
    problems: Vec<String>,
}

impl Checker {
    fn target(&self, name: &str, kind: &str) -> Option<&Target> {
        self.targets.get(name)?.iter().find(|t| t.kind == kind)
    }

    /// `flags` are ones the program built from `target` (or, for the services, its
    /// `--help`) knows.
    fn flags_known(&mut self, doc: &str, program: &str, target: Option<&Target>, flags: &[String]) {
        let known = match program {
            "queue-consumer" | "websocket" => help_of(program),
            _ => target.map(|t| source_text(&t.src)).unwrap_or_default(),
        };
        for flag in flags.iter().filter(|f| f.starts_with("--")) {
            let flag = flag.split('=').next().unwrap_or_default();
            if !known.contains(&format!("\"{flag}\""))
                && !known.contains(&format!("{flag} "))
                && !known.contains(&format!("{flag}\n"))
                && !known.contains(&format!("{flag} <"))
            {
                self.problems
                    .push(format!("{doc}: {program} has no flag {flag}"));
            }
        }
    }

    fn cargo(&mut self, doc: &str, words: &[String]) {
        let (own, after) = match words.iter().position(|w| w == "--") {
            Some(at) => (&words[..at], &words[at + 1..]),
            None => (words, &[][..]),
        };
        let mut program: Option<(String, Option<Target>)> = None;
        for pair in own.windows(2) {
            let (flag, value) = (pair[0].as_str(), pair[1].as_str());
            match flag {
                "-p" | "--package" if !self.packages.iter().any(|p| p == value) => {
                    self.problems.push(format!("{doc}: no package {value}"));
                }
                "--bin" | "--example" | "--test" => {
                    let kind = match flag {
                        "--bin" => "bin",
                        "--example" => "example",
                        _ => "test",
                    };
                    let target = self.target(value, kind).cloned();
                    if target.is_none() {
                        self.problems
                            .push(format!("{doc}: no {kind} target {value}"));
                    }
                    if kind != "test" {
                        program = Some((value.to_owned(), target));
                    }
                }
                _ => {}
            }
        }
        if let Some((name, target)) = program {
            self.flags_known(doc, &name, target.as_ref(), after);
        }
    }

    fn command(&mut self, doc: &str, words: &[String]) {
        let root = workspace_root();
        let program = words[0].trim_start_matches("./");
        if program == "cargo" {
            self.cargo(doc, words);
        } else if program.starts_with("scripts/") {
            let path = root.join(program);
            let executable = std::fs::metadata(&path).is_ok_and(|m| {
                std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
            });
            if !executable {
                self.problems
                    .push(format!("{doc}: {program} is not an executable script"));
            }
        } else if let Some(name) = program
            .strip_prefix("target/release/")
            .or_else(|| program.strip_prefix("target/debug/"))
        {
            let target = self.target(name, "bin").cloned();
            if target.is_none() {
                self.problems.push(format!("{doc}: no binary {name}"));
            }
            self.flags_known(doc, name, target.as_ref(), &words[1..]);
        } else if ["queue-consumer", "websocket"].contains(&program) {
            self.flags_known(doc, program, None, &words[1..]);
        }
        // Paths into the repository exist.
        for word in words {
            let word = word.trim_end_matches([',', ')']);
            let first = word.split('/').next().unwrap_or_default();
            let into_repo = word.contains('/')
                && [
                    "copilot",
                    "cloudformation",
                    "docker",
                    "scripts",
                    "crates",
                    "tests",
                    "docs",
                    "queue-consumer",
                    "websocket",
                ]
                .contains(&first);
            if into_repo && !word.contains(['<', '$', '*', '{']) && !root.join(word).exists() {
                self.problems.push(format!("{doc}: {word} does not exist"));
            }
        }
    }
}

#[test]
fn every_command_in_the_docs_parses_and_names_what_exists() {
    let (packages, targets) = workspace();
    let mut checker = Checker {
        packages,
        targets,
        problems: Vec::new(),
    };
    let mut checked = 0;
    for doc in documents() {
        let text = read(&doc);
        for (info, block) in code_blocks(&text) {
            if !["sh", "bash", "shell"].contains(&info.as_str()) {
                continue;
            }
            let syntax = std::process::Command::new("bash")
                .args(["-n", "-c", &block])
                .output()
                .expect("bash runs");
            if !syntax.status.success() {
                checker.problems.push(format!(
                    "{doc}: a block bash cannot parse ({}):\n{block}",
                    String::from_utf8_lossy(&syntax.stderr).trim()
                ));
            }
            for command in commands(&block) {
                checker.command(&doc, &command);
                checked += 1;
            }
        }
    }
    assert!(checked >= 40, "only {checked} commands found");
    assert!(
        checker.problems.is_empty(),
        "{}",
        checker.problems.join("\n")
    );
}

#[test]
fn the_command_parser_sees_what_a_shell_sees() {
    let block = "FOO=1 cargo run -p e2e --example x -- --jobs 2 # comment\nscripts/a && scripts/b 'c d'\n  aws x \\\n    --y z\n";
    let parsed = commands(block);
    assert_eq!(
        parsed[0],
        [
            "cargo",
            "run",
            "-p",
            "e2e",
            "--example",
            "x",
            "--",
            "--jobs",
            "2"
        ]
    );
    assert_eq!(parsed[1], ["scripts/a"]);
    assert_eq!(parsed[2], ["scripts/b", "c d"]);
    assert_eq!(parsed[3], ["aws", "x", "--y", "z"]);
}
