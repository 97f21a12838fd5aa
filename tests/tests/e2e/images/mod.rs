//! The Dockerfiles under `docker/`: read here, built and run in `run.rs`.
//!
//! Read from the files: where the base images come from and that both stages are
//! Debian 13, that the dependencies compile in a layer of their own, and that an
//! arm64 image is cross-compiled on the builder's own platform instead of under
//! emulation. The script that maps a platform to a Rust target, `docker/cross.sh`,
//! runs here for every platform. The images themselves are built with podman and
//! checked from outside in `run.rs`, and broken on purpose in `breaks.rs`.

mod breaks;
mod podman;
mod run;

use std::collections::BTreeMap;
use std::process::Command;

use e2e::workspace_root;

/// The images and the package each one builds.
pub(super) const IMAGES: [(&str, &str); 2] = [
    ("docker/queue-consumer.Dockerfile", "queue-consumer"),
    ("docker/websocket.Dockerfile", "websocket"),
];
const CROSS: &str = "docker/cross.sh";
/// BuildKit's TARGETARCH for each platform Fargate runs, the Rust target for it,
/// Debian's cross compiler package and the C compiler and linker it installs
/// (`<triplet>-gcc`; on its own architecture Debian's gcc has the same name).
const TARGETS: [(&str, &str, &str, &str); 2] = [
    (
        "amd64",
        "x86_64-unknown-linux-gnu",
        "gcc-x86-64-linux-gnu",
        "x86_64-linux-gnu-gcc",
    ),
    (
        "arm64",
        "aarch64-unknown-linux-gnu",
        "gcc-aarch64-linux-gnu",
        "aarch64-linux-gnu-gcc",
    ),
];

/// One instruction of a Dockerfile, continuation lines joined.
#[derive(Debug, Clone)]
pub(super) struct Instruction {
    pub(super) keyword: String,
    pub(super) rest: String,
}

/// One build stage: its `FROM` line and the instructions under it.
#[derive(Debug, Clone)]
pub(super) struct Stage {
    /// `--platform=...` and other flags of `FROM`.
    pub(super) flags: Vec<String>,
    pub(super) image: String,
    pub(super) name: Option<String>,
    pub(super) body: Vec<Instruction>,
}

impl Stage {
    fn runs(&self) -> impl Iterator<Item = &str> {
        self.body
            .iter()
            .filter(|i| i.keyword == "RUN")
            .map(|i| i.rest.as_str())
    }

    fn position(&self, needle: &str) -> Option<usize> {
        self.body.iter().position(|i| i.rest.contains(needle))
    }
}

/// A Dockerfile's raw text and its stages.
pub(super) struct Dockerfile {
    pub(super) text: String,
    pub(super) stages: Vec<Stage>,
}

pub(super) fn dockerfile(relative: &str) -> Dockerfile {
    let path = workspace_root().join(relative);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut instructions = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if pending.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(trimmed);
        let (keyword, rest) = pending.split_once(' ').unwrap_or((pending.as_str(), ""));
        instructions.push(Instruction {
            keyword: keyword.to_uppercase(),
            rest: rest.trim().to_owned(),
        });
        pending.clear();
    }
    let mut stages: Vec<Stage> = Vec::new();
    for instruction in instructions {
        if instruction.keyword == "FROM" {
            let words: Vec<&str> = instruction.rest.split_whitespace().collect();
            let flags: Vec<String> = words
                .iter()
                .take_while(|w| w.starts_with("--"))
                .map(|w| (*w).to_owned())
                .collect();
            let rest = &words[flags.len()..];
            stages.push(Stage {
                flags,
                image: rest.first().map(|s| (*s).to_owned()).unwrap_or_default(),
                name: match rest {
                    [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some((*name).to_owned()),
                    _ => None,
                },
                body: Vec::new(),
            });
        } else if let Some(stage) = stages.last_mut() {
            stage.body.push(instruction);
        }
    }
    Dockerfile { text, stages }
}

/// Runs `docker/cross.sh` with these arguments and variables: (status, stdout, stderr).
fn cross(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let out = Command::new("sh")
        .arg(workspace_root().join(CROSS))
        .args(args)
        .env_remove("TARGETARCH")
        .env_remove("BUILDARCH")
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("cannot run sh {CROSS}: {e}"));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    )
}

fn report(what: &str, problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{what}:\n  - {}",
        problems.join("\n  - ")
    );
}

/// Every `FROM` names a registry host that CI and CodeBuild pull from without
/// Docker Hub's anonymous rate limit (a bare `rust:...` is Docker Hub); no
/// `# syntax=` line, which would pull a frontend image from Docker Hub.
fn check_sources(relative: &str, file: &Dockerfile, problems: &mut Vec<String>) {
    if file
        .text
        .lines()
        .any(|l| l.trim_start().starts_with('#') && l.to_lowercase().contains("syntax="))
    {
        problems.push(format!(
            "{relative}: a `# syntax=` line pulls the Dockerfile frontend from Docker Hub; the builtin one does"
        ));
    }
    let names: Vec<&str> = file
        .stages
        .iter()
        .filter_map(|s| s.name.as_deref())
        .collect();
    for stage in &file.stages {
        if names.contains(&stage.image.as_str()) {
            continue;
        }
        let host = stage.image.split('/').next().unwrap_or_default();
        let named_host = stage.image.contains('/') && (host.contains('.') || host.contains(':'));
        if !named_host || host == "docker.io" || host.ends_with(".docker.io") {
            problems.push(format!(
                "{relative}: FROM {} pulls from Docker Hub, which rate-limits anonymous pulls; use public.ecr.aws/docker/library/...",
                stage.image
            ));
        }
    }
}

/// The stage that runs `cargo build` for `package`.
fn build_stage<'a>(file: &'a Dockerfile, package: &str) -> Option<&'a Stage> {
    file.stages.iter().find(|s| {
        s.runs()
            .any(|r| r.contains("cargo build") && r.contains(&format!("-p {package}")))
    })
}

/// The dependencies compile in a layer of their own, from the lock file and the
/// manifests only, before the project's sources are copied in.
fn check_dependency_layer(
    relative: &str,
    file: &Dockerfile,
    package: &str,
    problems: &mut Vec<String>,
) {
    let Some(stage) = build_stage(file, package) else {
        problems.push(format!(
            "{relative}: no stage runs `cargo build ... -p {package}`"
        ));
        return;
    };
    let cook = stage.body.iter().position(|i| {
        i.keyword == "RUN"
            && i.rest.contains("cargo chef cook --release --locked")
            && i.rest.contains(&format!("-p {package}"))
    });
    let sources = stage
        .body
        .iter()
        .position(|i| i.keyword == "COPY" && i.rest == ". .");
    match (cook, sources) {
        (Some(c), Some(s)) if c < s => {}
        _ => problems.push(format!(
            "{relative}: no `cargo chef cook --release --locked ... -p {package}` before the sources are copied (`COPY . .`); every build would compile all dependencies"
        )),
    }
    for run in stage.runs() {
        if (run.contains("cargo build") || run.contains("cargo chef cook"))
            && !run.contains("--locked")
        {
            problems.push(format!("{relative}: `{run}` does not pass --locked"));
        }
    }
}

/// The build runs on the builder's platform and compiles for the image's: the
/// stage everything compiles in is `FROM --platform=$BUILDPLATFORM`, the build
/// stage reads TARGETARCH and passes the Rust target cross.sh gives, after
/// cross.sh has set the toolchain up; the binary comes from that target's
/// directory; the runtime stage has no `--platform`, so it is the image's own.
fn check_cross_compile(
    relative: &str,
    file: &Dockerfile,
    package: &str,
    problems: &mut Vec<String>,
) {
    let Some(first) = file.stages.first() else {
        problems.push(format!("{relative}: no FROM"));
        return;
    };
    if !first.flags.iter().any(|f| f == "--platform=$BUILDPLATFORM") {
        problems.push(format!(
            "{relative}: the first stage is not FROM --platform=$BUILDPLATFORM; an arm64 image would compile under emulation"
        ));
    }
    // Every compiling stage descends from a $BUILDPLATFORM stage.
    let mut on_build_platform: Vec<&str> = Vec::new();
    for stage in &file.stages {
        let inherits = on_build_platform.contains(&stage.image.as_str());
        let own = stage.flags.iter().any(|f| f == "--platform=$BUILDPLATFORM");
        if inherits || own {
            if let Some(name) = &stage.name {
                on_build_platform.push(name);
            }
        } else if stage.runs().any(|r| r.contains("cargo ")) {
            problems.push(format!(
                "{relative}: stage {:?} runs cargo on the image's platform",
                stage.name
            ));
        }
    }
    let Some(last) = file.stages.last() else {
        return;
    };
    if !last.flags.is_empty() {
        problems.push(format!(
            "{relative}: the runtime stage has {:?}; without a flag it is the image's own platform",
            last.flags
        ));
    }
    let Some(stage) = build_stage(file, package) else {
        return;
    };
    let args: Vec<&str> = stage
        .body
        .iter()
        .filter(|i| i.keyword == "ARG")
        .flat_map(|i| i.rest.split_whitespace())
        .collect();
    for arg in ["TARGETARCH", "BUILDARCH"] {
        if !args.contains(&arg) {
            problems.push(format!(
                "{relative}: the build stage does not declare ARG {arg}; BuildKit only passes the platform ARGs a stage declares"
            ));
        }
    }
    let setup = stage.position("cross.sh setup");
    let copied = stage
        .body
        .iter()
        .position(|i| i.keyword == "COPY" && i.rest.contains(CROSS));
    let cook = stage.position("cargo chef cook");
    match (copied, setup, cook) {
        (Some(c), Some(s), Some(k)) if c < s && s < k => {}
        _ => problems.push(format!(
            "{relative}: the build stage must COPY {CROSS}, run `cross.sh setup`, then cook"
        )),
    }
    // cross.sh comes from the build context, which .dockerignore must not cut, and
    // so does .cargo/config.toml (jemalloc's settings), which cargo chef's recipe
    // carries into the dependency layer.
    let ignored =
        std::fs::read_to_string(workspace_root().join(".dockerignore")).unwrap_or_default();
    for line in ignored.lines().map(str::trim) {
        for needed in [CROSS, ".cargo/config.toml"] {
            if !line.is_empty()
                && !line.starts_with('#')
                && needed.starts_with(line.trim_end_matches('*'))
            {
                problems.push(format!(
                    ".dockerignore line {line:?} keeps {needed} out of the build context"
                ));
            }
        }
    }
    let target = "--target \"$(cross.sh target)\"";
    for run in stage.runs() {
        if (run.contains("cargo build") || run.contains("cargo chef cook")) && !run.contains(target)
        {
            problems.push(format!("{relative}: `{run}` does not pass {target}"));
        }
    }
    let from_target = format!("\"target/$(cross.sh target)/release/{package}\"");
    if !stage.runs().any(|r| r.contains(&from_target)) {
        problems.push(format!(
            "{relative}: the binary is not taken from {from_target}"
        ));
    }
    // Each target's linker and C compiler, by the names the cross packages give.
    let env: BTreeMap<&str, &str> = stage
        .body
        .iter()
        .filter(|i| i.keyword == "ENV")
        .flat_map(|i| i.rest.split_whitespace())
        .filter_map(|pair| pair.split_once('='))
        .collect();
    for (_, rust_target, _, gcc) in TARGETS {
        let upper = rust_target.replace('-', "_").to_uppercase();
        let lower = rust_target.replace('-', "_");
        for (var, want) in [
            (format!("CARGO_TARGET_{upper}_LINKER"), gcc.to_owned()),
            (format!("CC_{lower}"), gcc.to_owned()),
        ] {
            if env.get(var.as_str()) != Some(&want.as_str()) {
                problems.push(format!(
                    "{relative}: ENV {var} is {:?}, expected {want}",
                    env.get(var.as_str())
                ));
            }
        }
    }
}

#[test]
fn the_images_build_from_sources_without_docker_hub() {
    let mut problems = Vec::new();
    for (relative, package) in IMAGES {
        let file = dockerfile(relative);
        check_sources(relative, &file, &mut problems);
        check_dependency_layer(relative, &file, package, &mut problems);
    }
    report("the Dockerfiles", &problems);
}

#[test]
fn arm64_images_cross_compile_on_the_build_platform() {
    let mut problems = Vec::new();
    for (relative, package) in IMAGES {
        check_cross_compile(relative, &dockerfile(relative), package, &mut problems);
    }
    report("cross-compiling", &problems);
}

#[test]
fn cross_sh_maps_each_platform_to_its_target_and_toolchain() {
    for (arch, rust_target, gcc_package, _) in TARGETS {
        let (status, out, err) = cross(&["target"], &[("TARGETARCH", arch), ("BUILDARCH", arch)]);
        assert_eq!((status, out.as_str()), (Some(0), rust_target), "{err}");
        // make (the rust image has none, and jemalloc builds with it); from the
        // other architecture, the cross compiler and the target's C library too.
        let (status, out, err) = cross(&["packages"], &[("TARGETARCH", arch), ("BUILDARCH", arch)]);
        assert_eq!((status, out.as_str()), (Some(0), "make"), "{err}");
        let other = TARGETS
            .iter()
            .find(|(a, ..)| *a != arch)
            .map_or("", |(a, ..)| a);
        let (status, out, err) =
            cross(&["packages"], &[("TARGETARCH", arch), ("BUILDARCH", other)]);
        assert_eq!(status, Some(0), "{err}");
        assert_eq!(
            out.split_whitespace().collect::<Vec<_>>(),
            [
                "make".to_owned(),
                gcc_package.to_owned(),
                format!("libc6-dev-{arch}-cross")
            ],
        );
    }
    // Anything else fails with a line that says what is supported.
    let (status, _, err) = cross(&["target"], &[("TARGETARCH", "riscv64")]);
    assert_eq!(status, Some(1));
    assert!(err.contains("amd64 or arm64"), "{err}");
    let (status, _, err) = cross(&["target"], &[]);
    assert_eq!(status, Some(1), "{err}");
    let (status, _, err) = cross(&[], &[("TARGETARCH", "amd64")]);
    assert_eq!(status, Some(2));
    assert!(err.contains("usage"), "{err}");
}

#[test]
fn release_binaries_carry_no_symbols() {
    // `strip = "debuginfo"` left the symbol tables, several MB per binary. With
    // `strip = true` a panic still names its file and line (they are compiled in);
    // only a backtrace loses its function names, and the images have no debugger.
    let manifest = std::fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
    let release = manifest
        .split("[profile.release]")
        .nth(1)
        .and_then(|rest| rest.split("\n[").next())
        .expect("Cargo.toml has a [profile.release]");
    let strip: Vec<&str> = release
        .lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.trim() == "strip")
        .map(|(_, v)| v.trim())
        .collect();
    assert_eq!(strip, ["true"], "[profile.release] strip must be true");
}

/// The builder and the runtime image are the same Debian release, the one the
/// distroless project still patches: Debian 13. A binary linked against a newer
/// glibc than the runtime's would not start; an older runtime gets no fixes
/// (distroless ends its Debian 12 images in September 2026). The stand-in the image
/// tests build is tagged with the very name the Dockerfiles use.
#[test]
fn both_stages_are_debian_13_and_the_stand_in_has_the_runtime_name() {
    let mut problems = Vec::new();
    for (relative, _) in IMAGES {
        let file = dockerfile(relative);
        let (Some(first), Some(last)) = (file.stages.first(), file.stages.last()) else {
            problems.push(format!("{relative}: no stages"));
            continue;
        };
        if !first.image.ends_with("-slim-trixie") {
            problems.push(format!(
                "{relative}: the builder is {}, not a Debian 13 (trixie) rust image",
                first.image
            ));
        }
        if last.image != podman::RUNTIME_BASE {
            problems.push(format!(
                "{relative}: the runtime is {}, not {}",
                last.image,
                podman::RUNTIME_BASE
            ));
        }
    }
    let script = std::fs::read_to_string(workspace_root().join("docker/stand-in-bases.sh"))
        .expect("docker/stand-in-bases.sh");
    if !script.contains(&format!("RUNTIME_TAG={}", podman::RUNTIME_BASE)) {
        problems.push(format!(
            "docker/stand-in-bases.sh does not tag its runtime base {}",
            podman::RUNTIME_BASE
        ));
    }
    report("Debian 13", &problems);
}
