//! The worker library run in-process, against moto and the fake agent: for handler
//! and ordering tests that need job code of their own. Signals and exit codes are
//! tested on the binary.

use std::time::Duration;

use queue_consumer::queue::Queue;
use queue_consumer::{Handler, Outcome, Worker, WorkerSettings};
use task_protection::cli::Signal;
use task_protection::{BackendConfig, BackendKind, ProtectionSettings, TaskProtection};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::agent::FakeAgent;
use crate::moto::Moto;

/// A worker running on its own task.
#[derive(Debug)]
pub struct RunningWorker {
    signals: mpsc::UnboundedSender<Signal>,
    task: JoinHandle<Outcome>,
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
    let client = moto.client();
    let mut s = WorkerSettings::new(queue_url);
    s.wait = Duration::from_secs(1);
    settings(&mut s);
    let backend = BackendConfig {
        kind: BackendKind::Agent,
        agent_uri: Some(agent.uri()),
        metadata_uri: None,
    };
    let protection = TaskProtection::connect(&backend, ProtectionSettings::default())
        .await
        .unwrap_or_else(|e| panic!("protection: {e}"));
    let mut worker = Worker::new(
        Queue::new(client.clone(), queue_url),
        protection.clone(),
        s,
        handler,
    );
    for (name, url) in topic_queues {
        worker = worker.with_queue(*name, Queue::new(client.clone(), *url));
    }
    let (signals, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let outcome = worker.run(rx).await;
        let _ = protection.shutdown().await;
        outcome
    });
    RunningWorker { signals, task }
}

impl RunningWorker {
    /// Sends SIGTERM and waits up to `within` for the worker to stop.
    pub async fn stop(self, within: Duration) -> Outcome {
        let _ = self.signals.send(Signal::Term);
        tokio::time::timeout(within, self.task)
            .await
            .unwrap_or_else(|_| panic!("the worker did not stop within {within:?}"))
            .unwrap_or_else(|e| panic!("the worker task failed: {e}"))
    }
}
