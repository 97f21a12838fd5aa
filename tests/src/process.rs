//! Spawning the workspace's binaries and watching their output.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::Notify;

/// Path of a binary built by this workspace (`cargo build --bins` first; the test
/// command does that), or in the directory `E2E_BINARIES` names: the same tests and
/// benches then measure another build (an earlier commit's, say) in the same run.
#[must_use]
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = std::env::var_os("E2E_BINARIES").map_or_else(
        || {
            exe.parent()
                .and_then(|deps| deps.parent())
                .map(PathBuf::from)
                .unwrap_or_default()
        },
        PathBuf::from,
    );
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first with `cargo build --bins` (scripts/test does)",
        path.display()
    );
    path
}

/// Variables that must not leak from the developer's shell into a service under test.
const SCRUBBED: &[&str] = &[
    "AWS_PROFILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_SQS",
    "ECS_AGENT_URI",
    "ECS_CONTAINER_METADATA_URI_V4",
    "COPILOT_QUEUE_URI",
    "TASK_PROTECTION_BACKEND",
    "RUST_LOG",
    "LOG_FORMAT",
    "PORT",
];

/// A command for binary `name`, without the scrubbed variables.
fn command(name: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(binary(name));
    for var in SCRUBBED {
        cmd.env_remove(var);
    }
    cmd
}

/// A running service whose stdout and stderr lines are collected.
#[derive(Debug)]
pub struct Service {
    name: String,
    child: tokio::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
    changed: Arc<Notify>,
    /// The readers of stdout and stderr; they end when the process closes them.
    pumps: Vec<tokio::task::JoinHandle<()>>,
}

fn pump(
    name: String,
    stream: impl AsyncRead + Unpin + Send + 'static,
    lines: Arc<Mutex<Vec<String>>>,
    changed: Arc<Notify>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut reader = BufReader::new(stream).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            eprintln!("[{name}] {line}");
            lines
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(line);
            changed.notify_waiters();
        }
    })
}

impl Service {
    /// Starts binary `name` with `args` and `env` (on top of a scrubbed environment).
    #[must_use]
    pub fn spawn(name: &str, args: &[&str], env: &[(&str, String)]) -> Self {
        let mut cmd = command(name);
        cmd.args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let changed = Arc::new(Notify::new());
        let mut pumps = Vec::new();
        if let Some(out) = child.stdout.take() {
            pumps.push(pump(
                name.to_owned(),
                out,
                Arc::clone(&lines),
                Arc::clone(&changed),
            ));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(pump(
                name.to_owned(),
                err,
                Arc::clone(&lines),
                Arc::clone(&changed),
            ));
        }
        Self {
            name: name.to_owned(),
            child,
            lines,
            changed,
            pumps,
        }
    }

    /// Every line printed so far.
    #[must_use]
    pub fn lines(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// How many lines so far contain `needle`.
    #[must_use]
    pub fn count(&self, needle: &str) -> usize {
        self.lines().iter().filter(|l| l.contains(needle)).count()
    }

    /// Waits until `n` lines contain `needle`; returns the last of them.
    pub async fn wait_for_count(&self, needle: &str, n: usize, timeout: Duration) -> String {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            let found: Vec<String> = self
                .lines()
                .into_iter()
                .filter(|l| l.contains(needle))
                .collect();
            if found.len() >= n {
                return found.last().cloned().unwrap_or_default();
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!(
                    "{}: timed out after {timeout:?} waiting for {n} line(s) with {needle:?}; saw {}",
                    self.name,
                    found.len()
                );
            }
        }
    }

    /// Waits for a line containing `needle`.
    pub async fn wait_for_line(&self, needle: &str, timeout: Duration) -> String {
        self.wait_for_count(needle, 1, timeout).await
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: Signal) {
        if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }

    /// Sends SIGTERM, as ECS does when it stops a task.
    pub fn terminate(&self) {
        self.signal(Signal::SIGTERM);
    }

    /// Waits for the process to exit, and for its last lines to be read.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let status = match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => panic!("{}: wait failed: {e}", self.name),
            Err(_) => panic!("{}: did not exit within {timeout:?}", self.name),
        };
        // The exit can be seen before the readers reach the end of the pipes.
        for pump in self.pumps.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), pump).await;
        }
        status
    }

    /// The exit status, if the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The process id.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

/// Runs binary `name` to completion with `args` and `env`; returns its status and
/// its stderr.
pub async fn run_to_exit(
    name: &str,
    args: &[&str],
    env: &[(&str, String)],
) -> (ExitStatus, String, String) {
    let out = command(name)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"));
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs binary `name` with `args` and `env` (on top of a scrubbed environment) and
/// says whether it exited with 0 within `timeout`; past it, the process is killed.
/// Its output is dropped. For a container health check's command.
pub async fn run_within(
    name: &str,
    args: &[&str],
    env: &[(&str, String)],
    timeout: Duration,
) -> bool {
    let mut cmd = command(name);
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let Ok(mut child) = cmd.spawn() else {
        return false;
    };
    matches!(
        tokio::time::timeout(timeout, child.wait()).await,
        Ok(Ok(status)) if status.success()
    )
}
