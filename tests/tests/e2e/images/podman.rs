//! Building the images from the real Dockerfiles with podman, and running them.
//!
//! Registries of base images cannot be reached here, so `docker/stand-in-bases.sh`
//! builds the runtime base from Debian 13's packages the way distroless does and
//! tags it `gcr.io/distroless/cc-debian13:nonroot`; every build runs with
//! `--pull=never`, so nothing is ever pulled.
//!
//! What is built: each Dockerfile's runtime stage exactly as written (`FROM`, `COPY`,
//! `USER`, `EXPOSE`, `HEALTHCHECK`, `ENTRYPOINT`), with the stage it copies the binary
//! from replaced by this workspace's release build of the package: the same compiler,
//! `Cargo.lock` and release profile the builder stage uses. The builder stage itself
//! is not built here: it compiles every dependency again inside the image, once per
//! image, which would cost CI about twice the suite's own release build
//! (BENCHMARKS.md, "Images"), and its rust image installs a toolchain that this
//! machine could only copy from its own.
//!
//! Podman on this machine: `--runtime runc --cgroup-manager cgroupfs` (crun refuses
//! its hybrid cgroups), host networking (the containers reach moto and the fake ECS
//! agent on loopback, and the tests reach the containers), ulimits below the
//! machine's hard limits, and `--format docker`, which keeps `HEALTHCHECK` (the OCI
//! format drops it).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use e2e::{wait_for, workspace_root};

/// The global flags every podman command needs on this machine.
const PODMAN: [&str; 4] = ["--runtime", "runc", "--cgroup-manager", "cgroupfs"];
/// Limits below this machine's hard limits (nofile 20000); podman's defaults exceed
/// them and the container would not start.
const ULIMITS: [&str; 4] = [
    "--ulimit",
    "nofile=16384:16384",
    "--ulimit",
    "nproc=4096:4096",
];
/// The stand-in base every runtime stage starts from.
pub(super) const RUNTIME_BASE: &str = "gcr.io/distroless/cc-debian13:nonroot";

fn podman() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("podman");
    cmd.args(PODMAN).stdin(Stdio::null()).kill_on_drop(true);
    cmd
}

/// Runs podman with `args`: (exit code, stdout, stderr).
pub(super) async fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = podman().args(args).output().await.unwrap_or_else(|e| {
        panic!("cannot run podman ({e}); scripts/setup installs podman, runc and mmdebstrap")
    });
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    )
}

/// Where the images' build contexts and the lock that serialises builds live.
fn images_dir() -> PathBuf {
    let dir = release_dir()
        .parent()
        .map_or_else(|| workspace_root().join("target"), Path::to_path_buf)
        .join("images");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {dir:?}: {e}"));
    dir
}

/// `target/release`, beside the profile this test binary was built with.
fn release_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test> → target/release
    exe.ancestors()
        .nth(3)
        .map_or_else(|| workspace_root().join("target"), Path::to_path_buf)
        .join("release")
}

/// Runs `program args` under an exclusive lock on `target/images/.lock`, so that
/// tests running in parallel build each base and image once.
async fn locked(program: &Path, args: &[&str]) -> (Option<i32>, String) {
    let lock = images_dir().join(".lock");
    let out = tokio::process::Command::new("flock")
        .arg(&lock)
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run flock {program:?}: {e}"));
    (
        out.status.code(),
        format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Builds (once) the stand-in for the runtime base.
async fn stand_in_bases() {
    let script = workspace_root().join("docker/stand-in-bases.sh");
    let (status, out) = locked(&script, &["runtime"]).await;
    assert_eq!(
        status,
        Some(0),
        "docker/stand-in-bases.sh runtime failed (scripts/setup installs podman, runc and mmdebstrap):\n{out}"
    );
}

/// The Dockerfile podman builds for `package`: the runtime stage of `dockerfile`
/// verbatim, after a stage of the name it copies from that holds the release
/// binary where the build stage would have put it.
pub(super) fn runtime_stage_dockerfile(dockerfile: &str, package: &str) -> String {
    let lines: Vec<&str> = dockerfile.lines().collect();
    let start = lines
        .iter()
        .rposition(|l| l.trim_start().to_uppercase().starts_with("FROM "))
        .expect("the Dockerfile has a FROM");
    let runtime = lines[start..].join("\n");
    // COPY --from=<stage> <source> <destination>: the stage and the source path.
    let copy = lines[start..]
        .iter()
        .find_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            match words.as_slice() {
                ["COPY", from, source, _] => from
                    .strip_prefix("--from=")
                    .map(|stage| (stage.to_owned(), (*source).to_owned())),
                _ => None,
            }
        })
        .unwrap_or_else(|| {
            panic!("the runtime stage of {package}'s Dockerfile has no COPY --from")
        });
    format!(
        "# The runtime stage of docker/{package}.Dockerfile as written, its binary from the\n\
         # workspace's release build (tests/tests/e2e/images/podman.rs).\n\
         FROM scratch AS {stage}\n\
         COPY {package} {source}\n\n\
         {runtime}\n",
        stage = copy.0,
        source = copy.1,
    )
}

/// Builds the image of `package` from `dockerfile` (the text of its Dockerfile, or a
/// deliberately broken copy) and returns its tag. Identical inputs build once.
pub(super) async fn build(package: &str, dockerfile: &str) -> String {
    stand_in_bases().await;
    let binary = release_dir().join(package);
    let meta = std::fs::metadata(&binary).unwrap_or_else(|e| {
        panic!(
            "{} is missing ({e}): build it first with `cargo build --release --locked -p queue-consumer -p websocket` (scripts/test does)",
            binary.display()
        )
    });
    let derived = runtime_stage_dockerfile(dockerfile, package);
    // The base's id too: a rebuilt stand-in makes a new image.
    let (_, base, _) = run(&["image", "inspect", "--format", "{{.Id}}", RUNTIME_BASE]).await;
    let mut hasher = DefaultHasher::new();
    base.hash(&mut hasher);
    derived.hash(&mut hasher);
    meta.len().hash(&mut hasher);
    meta.modified().ok().hash(&mut hasher);
    let id = format!("{:016x}", hasher.finish());
    let tag = format!("localhost/task-protection-e2e/{package}:{id}");
    let context = images_dir().join(format!("{package}-{id}"));
    std::fs::create_dir_all(&context).unwrap_or_else(|e| panic!("cannot create {context:?}: {e}"));
    std::fs::write(context.join("Dockerfile"), &derived).expect("write the Dockerfile");
    std::fs::copy(&binary, context.join(package)).expect("copy the binary");
    let context = context.display().to_string();
    let script = format!(
        "podman image exists {tag} || podman {podman} build --quiet --format docker --pull=never --network host -t {tag} {context}",
        podman = PODMAN.join(" ")
    );
    let (status, out) = locked(Path::new("sh"), &["-c", &script]).await;
    assert_eq!(status, Some(0), "podman build of {package} failed:\n{out}");
    tag
}

/// A running container, removed on drop.
#[derive(Debug)]
pub(super) struct Container {
    pub(super) name: String,
}

impl Container {
    /// `podman run -d` of `image` with `env`, on the host's network. `Err` with
    /// podman's own words when it cannot start.
    pub(super) async fn start(image: &str, env: &[(&str, String)]) -> Result<Self, String> {
        let name = format!("e2e-{}-{}", std::process::id(), rand::random::<u32>());
        let mut args: Vec<String> = ["run", "-d", "--name", &name, "--network", "host"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        args.extend(ULIMITS.iter().map(|s| (*s).to_owned()));
        for (k, v) in env {
            args.push("-e".to_owned());
            args.push(format!("{k}={v}"));
        }
        args.push(image.to_owned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let container = Self { name };
        let (status, _, err) = run(&args).await;
        if status == Some(0) {
            Ok(container)
        } else {
            Err(format!("podman run exited {status:?}: {err}"))
        }
    }

    /// `podman inspect --format <format>` of the container.
    pub(super) async fn inspect(&self, format: &str) -> String {
        run(&["inspect", "--format", format, &self.name]).await.1
    }

    /// The host's process id of the container's PID 1, while it runs.
    pub(super) async fn pid(&self) -> Option<u32> {
        self.inspect("{{.State.Pid}}")
            .await
            .parse()
            .ok()
            .filter(|p| *p > 0)
    }

    /// Everything the container wrote so far, stdout and stderr.
    pub(super) async fn logs(&self) -> String {
        let (_, out, err) = run(&["logs", &self.name]).await;
        format!("{out}\n{err}")
    }

    /// Waits for a line of the container's output that contains `needle`.
    pub(super) async fn wait_for_log(&self, needle: &str, timeout: Duration) {
        wait_for(
            &format!("{} to write {needle:?}", self.name),
            timeout,
            || async { self.logs().await.contains(needle).then_some(()) },
        )
        .await;
    }

    /// `podman exec` in the container, with extra variables: (exit code, output).
    pub(super) async fn exec(
        &self,
        env: &[(&str, &str)],
        command: &[&str],
    ) -> (Option<i32>, String) {
        let mut args = vec!["exec".to_owned()];
        for (k, v) in env {
            args.push("-e".to_owned());
            args.push(format!("{k}={v}"));
        }
        args.push(self.name.clone());
        args.extend(command.iter().map(|s| (*s).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (status, out, err) = run(&args).await;
        (status, format!("{out}{err}"))
    }

    /// The image's own HEALTHCHECK, run once: (exit code, output).
    pub(super) async fn healthcheck(&self) -> (Option<i32>, String) {
        let (status, out, err) = run(&["healthcheck", "run", &self.name]).await;
        (status, format!("{out}{err}"))
    }

    /// `podman stop -t <timeout>`: SIGTERM to PID 1, SIGKILL after `timeout`, as ECS
    /// stops a task with its `StopTimeout`. Returns how long it took and the exit
    /// code.
    pub(super) async fn stop(&self, timeout: Duration) -> (Duration, Option<i32>) {
        let started = Instant::now();
        let secs = timeout.as_secs().to_string();
        let (status, _, err) = run(&["stop", "-t", &secs, &self.name]).await;
        let took = started.elapsed();
        assert_eq!(status, Some(0), "podman stop {}: {err}", self.name);
        (took, self.inspect("{{.State.ExitCode}}").await.parse().ok())
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = std::process::Command::new("podman")
            .args(PODMAN)
            .args(["rm", "-f", "-t", "0", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
