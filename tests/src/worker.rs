//! The worker library run in-process, against moto and the fake agent: for handler
//! and ordering tests that need job code of their own. Signals and exit codes are
//! tested on the binary.
//!
//! With `E2E_TRACE` set, the in-process worker logs to stderr, filtered by `RUST_LOG`
//! (`E2E_TRACE=1 RUST_LOG=queue_consumer=debug cargo nextest run ... --no-capture`).
//! [`Logs::capture`] keeps its lines for a test to read.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use queue_consumer::queue::Queue;
use queue_consumer::{BatchHandler, Handler, Outcome, Worker, WorkerSettings};
use task_protection::cli::Signal;
use task_protection::drain::Membership;
use task_protection::{BackendConfig, BackendKind, ProtectionSettings, TaskProtection};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::agent::FakeAgent;
use crate::moto::{Moto, client_for};

/// A worker running on its own task.
#[derive(Debug)]
pub struct RunningWorker {
    signals: mpsc::UnboundedSender<Signal>,
    task: JoinHandle<Outcome>,
    /// The worker's protection, to watch what it holds.
    pub protection: TaskProtection,
    /// What its health endpoint would answer.
    pub health: std::sync::Arc<queue_consumer::health::Health>,
}

/// Starts a worker on `queue_url` (and the named `topic_queues`) with `handler`,
/// long-polling moto for 1 s and protected through `agent`; `settings` adjusts the
/// rest.
pub async fn spawn_worker(
    handler: impl Handler,
    moto: &Moto,
    agent: &FakeAgent,
    queue_url: &str,
    topic_queues: &[(&str, &str)],
    settings: impl FnOnce(&mut WorkerSettings),
) -> RunningWorker {
    let mut spec = WorkerSpec::new(moto, agent, queue_url).settings(settings);
    for (name, url) in topic_queues {
        spec = spec.topic(name, url);
    }
    spec.spawn(handler).await
}

/// A worker to start: where its SQS and its agent are, its queues and settings.
#[derive(Debug)]
pub struct WorkerSpec {
    endpoint: String,
    agent_uri: String,
    settings: WorkerSettings,
    protection: ProtectionSettings,
    topics: Vec<(String, String)>,
    membership: Option<watch::Receiver<Membership>>,
    following: Option<watch::Receiver<bool>>,
}

impl WorkerSpec {
    /// A worker on `queue_url`, long-polling `moto` for 1 s, protected through
    /// `agent` with the library's default protection settings.
    #[must_use]
    pub fn new(moto: &Moto, agent: &FakeAgent, queue_url: &str) -> Self {
        let mut settings = WorkerSettings::new(queue_url);
        settings.wait = Duration::from_secs(1);
        Self {
            endpoint: moto.endpoint(),
            agent_uri: agent.uri(),
            settings,
            protection: ProtectionSettings::default(),
            topics: Vec::new(),
            membership: None,
            following: None,
        }
    }

    /// Follows `membership`, as the drain watcher would set it.
    #[must_use]
    pub fn membership(mut self, membership: watch::Receiver<Membership>) -> Self {
        self.membership = Some(membership);
        self
    }

    /// Follows the membership only while `on` is true, as the drain watcher's
    /// `Drain::on_changes` says.
    #[must_use]
    pub fn followed_while(mut self, on: watch::Receiver<bool>) -> Self {
        self.following = Some(on);
        self
    }

    /// Reaches the ECS agent at `uri` (`ECS_AGENT_URI`) instead of the fake agent's.
    #[must_use]
    pub fn agent_uri(mut self, uri: &str) -> Self {
        uri.clone_into(&mut self.agent_uri);
        self
    }

    /// Reaches SQS through `endpoint` (a proxy in front of moto).
    #[must_use]
    pub fn via(mut self, endpoint: &str) -> Self {
        endpoint.clone_into(&mut self.endpoint);
        self
    }

    /// Works the topic queue `name` at `url` as well.
    #[must_use]
    pub fn topic(mut self, name: &str, url: &str) -> Self {
        self.topics.push((name.to_owned(), url.to_owned()));
        self
    }

    /// Adjusts the worker settings.
    #[must_use]
    pub fn settings(mut self, f: impl FnOnce(&mut WorkerSettings)) -> Self {
        f(&mut self.settings);
        self
    }

    /// Protection settings other than the library's defaults.
    #[must_use]
    pub fn protection(mut self, settings: ProtectionSettings) -> Self {
        self.protection = settings;
        self
    }

    async fn build(
        self,
        worker: impl FnOnce(Queue, TaskProtection, WorkerSettings) -> Worker,
    ) -> RunningWorker {
        let client = client_for(&self.endpoint);
        let backend = BackendConfig::new(BackendKind::Agent).with_agent_uri(self.agent_uri.clone());
        let protection = TaskProtection::connect(&backend, self.protection)
            .await
            .unwrap_or_else(|e| panic!("protection: {e}"));
        let url = self.settings.queue_url.clone();
        let mut worker = worker(
            Queue::new(client.clone(), url),
            protection.clone(),
            self.settings,
        );
        for (name, url) in &self.topics {
            worker = worker.with_queue(name.clone(), Queue::new(client.clone(), url.clone()));
        }
        if let Some(membership) = self.membership {
            worker = worker.with_membership(membership);
        }
        if let Some(on) = self.following {
            worker = worker.followed_while(on);
        }
        RunningWorker::start(worker, protection)
    }

    /// Starts the worker with `handler` on its own task.
    pub async fn spawn(self, handler: impl Handler) -> RunningWorker {
        self.build(|queue, protection, settings| Worker::new(queue, protection, settings, handler))
            .await
    }

    /// Starts the worker with the batch handler `handler` on its own task.
    pub async fn spawn_batched(self, handler: impl BatchHandler) -> RunningWorker {
        self.build(|queue, protection, settings| {
            Worker::batched(queue, protection, settings, handler)
        })
        .await
    }
}

impl RunningWorker {
    fn start(worker: Worker, protection: TaskProtection) -> Self {
        let health = worker.health();
        if std::env::var_os("E2E_TRACE").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .try_init();
        }
        let (signals, rx) = mpsc::unbounded_channel();
        let released = protection.clone();
        let task = tokio::spawn(async move {
            let outcome = worker.run(rx).await;
            let _ = released.shutdown().await;
            outcome
        });
        Self {
            signals,
            task,
            protection,
            health,
        }
    }

    /// Sends SIGTERM without waiting.
    pub fn terminate(&self) {
        let _ = self.signals.send(Signal::Term);
    }

    /// Sends SIGTERM and waits up to `within` for the worker to stop.
    pub async fn stop(self, within: Duration) -> Outcome {
        self.terminate();
        self.stopped(within).await
    }

    /// Waits up to `within` for the worker to stop by itself.
    pub async fn stopped(self, within: Duration) -> Outcome {
        tokio::time::timeout(within, self.task)
            .await
            .unwrap_or_else(|_| panic!("the worker did not stop within {within:?}"))
            .unwrap_or_else(|e| panic!("the worker task failed: {e}"))
    }
}

/// The log lines of the worker, as text.
#[derive(Debug, Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

/// Kept, and written to stderr as well: the test's output shows them, and a failed
/// assertion (which the worker logs as a panic) among them.
impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// Captures what is logged on this thread, at `info` and above, until the guard
    /// is dropped. A `#[tokio::test]` runs the worker's every task on its one thread.
    #[must_use]
    pub fn capture() -> (Self, tracing::subscriber::DefaultGuard) {
        let logs = Self::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || writer.clone())
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    /// Every line so far.
    #[must_use]
    pub fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(PoisonError::into_inner))
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// How many lines so far contain `needle`.
    #[must_use]
    pub fn count(&self, needle: &str) -> usize {
        self.lines().iter().filter(|l| l.contains(needle)).count()
    }
}
