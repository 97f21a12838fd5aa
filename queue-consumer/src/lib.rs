//! `queue-consumer`: an SQS worker for a Copilot Worker Service, protected from ECS
//! scale-in only while it holds work.
//!
//! It long-polls the queues Copilot gives it (`COPILOT_QUEUE_URI`, and the
//! topic-specific ones in `COPILOT_TOPIC_QUEUE_URIS`), runs a [`Handler`] for each
//! message (unwrapped from its SNS envelope when it has one), and deletes the message
//! once the handler says it is done. On a FIFO queue the messages of a group run one
//! at a time, in order. Polling is unprotected: a
//! job takes task protection before it starts and keeps it until its message is
//! deleted or handed back, so an idle worker can always be scaled in, and a busy one
//! never loses a job to a scale-in or a deployment.
//!
//! The binary only parses its settings and calls [`run`] with its sample handler
//! and the shutdown signal; tests can call [`run`] (or [`Worker::run`]) with
//! handlers and signals of their own.
//!
//! A message flows top-down through the modules, each using only those below it:
//!
//! - [`worker`]: the phases of a run: receiving, leaving the service, shutdown;
//! - `receive`: one long-poll loop per queue, within its share of the slots
//!   (`shares`);
//! - `dispatch`: each message of a receive on its own task; a FIFO group's messages
//!   as a chain, one after the other;
//! - `run`: a message's slot, its protection (`protect`) and its job (`job`, and
//!   `batch` for a batch handler), run again in place while a FIFO group waits;
//! - `settle`: what becomes of the message (deleted, handed back, retried later, or
//!   moved to the dead-letter queue by `dead_letter`), and the calls that do it;
//! - [`heartbeat`]: keeping a held message invisible, and saying when it is not;
//! - `batcher`: the batched SQS calls of one queue;
//! - [`queue`]: the SQS calls, their time limits, and what their errors mean.
//!
//! Beside them: [`config`] (settings, from flags or environment variables),
//! [`handler`] (the [`Handler`] and [`BatchHandler`] traits, the [`handler::Job`]
//! they are given, SNS envelopes), `context` (what a running worker shares),
//! [`health`] (`/healthz` and the `healthcheck` subcommand) and [`signals`].

pub mod backoff;
mod batch;
mod batcher;
pub mod config;
mod context;
mod dead_letter;
mod dispatch;
pub mod handler;
pub mod health;
pub mod heartbeat;
mod job;
pub mod metrics;
mod panics;
mod protect;
pub mod queue;
mod receive;
mod run;
mod settle;
mod shares;
pub mod signals;
pub mod stats;
pub mod worker;

use aws_config::BehaviorVersion;
use aws_config::meta::region::RegionProviderChain;
use aws_config::retry::RetryConfig;
use aws_sdk_sqs::config::Region;
use task_protection::cli::Signal;
use task_protection::{BackendConfigError, SettingsError, TaskProtection};
use tokio::sync::mpsc;

pub use config::{Config, WorkerSettings};
pub use handler::{
    BatchHandler, BatchResponse, Handler, Job, Verdict, batch_handler_fn, handler_fn,
};
pub use heartbeat::START_MARGIN;
pub use queue::Queue;
pub use receive::{PERMANENT_RECEIVE_TRIES, POLL_DRAIN, RECEIVE_GATHER};
pub use run::FIFO_ATTEMPTS;
pub use settle::PROTECTED_SETTLE;
pub use worker::{Outcome, ReceiveFailure, Worker};

/// The worker could not start: a configuration problem, reported with exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A protection setting is out of range.
    #[error(transparent)]
    Protection(#[from] SettingsError),
    /// The protection backend cannot be set up.
    #[error(transparent)]
    Backend(#[from] BackendConfigError),
    /// No Region is configured and the queue URL names none.
    #[error("no AWS Region for the queue: set QUEUE_REGION or AWS_REGION, or use an AWS queue URL")]
    NoRegion,
    /// The Region is not a Region name.
    #[error("the AWS Region {0:?} is not valid (set QUEUE_REGION or AWS_REGION)")]
    BadRegion(String),
    /// A setting names something that is not there.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// A drain setting is out of range.
    #[error(transparent)]
    Drain(#[from] task_protection::drain::DrainSettingsError),
    /// The health endpoint's port cannot be used.
    #[error("cannot listen on 127.0.0.1:{port} (HEALTH_PORT): {source}")]
    HealthPort {
        /// The port.
        port: u16,
        /// Why.
        source: std::io::Error,
    },
}

/// Runs the worker with `config` and `handler` until a signal arrives on `signals` (or ECS refuses
/// protection, or receiving fails for good), then drains and releases task protection.
/// A second signal ends the shutdown grace period at once.
///
/// # Errors
/// [`StartError`] when the configuration cannot work; nothing has been received then.
pub async fn run(
    config: Config,
    handler: impl Handler,
    signals: mpsc::UnboundedReceiver<Signal>,
) -> Result<Outcome, StartError> {
    start(config, signals, |queue, protection, settings| {
        Worker::new(queue, protection, settings, handler)
    })
    .await
}

/// As [`run`], with a handler that works the messages of each receive at once.
///
/// # Errors
/// [`StartError`] when the configuration cannot work; nothing has been received then.
pub async fn run_batch(
    config: Config,
    handler: impl BatchHandler,
    signals: mpsc::UnboundedReceiver<Signal>,
) -> Result<Outcome, StartError> {
    start(config, signals, |queue, protection, settings| {
        Worker::batched(queue, protection, settings, handler)
    })
    .await
}

async fn start(
    config: Config,
    signals: mpsc::UnboundedReceiver<Signal>,
    worker: impl FnOnce(Queue, TaskProtection, WorkerSettings) -> Worker,
) -> Result<Outcome, StartError> {
    let settings = config.worker_settings();
    settings.check()?;
    let protection_settings = config.protection.settings()?;
    let client = sqs_client(&settings.queue_url, config.queue_region.as_deref()).await?;
    let health = match config.health_port() {
        Some(port) => Some(
            health::listen(port)
                .await
                .map_err(|source| StartError::HealthPort { port, source })?,
        ),
        None => None,
    };
    let protection =
        TaskProtection::connect(&config.protection.backend_config(), protection_settings).await?;
    // Off outside ECS, and with DRAIN=off: then the worker follows no membership, and a
    // refusal of protection ends it as the task is being replaced.
    let drain = config.drain.start().await?;
    tracing::info!(
        queue = %settings.queue_url,
        concurrency = settings.concurrency,
        "Working {} with up to {} job(s) at once",
        settings.queue_url,
        settings.concurrency
    );
    let queue = Queue::new(client.clone(), settings.queue_url.clone());
    let topic_queues = settings.topic_queues.clone();
    let mut worker = worker(queue, protection.clone(), settings);
    for (name, url) in topic_queues {
        tracing::info!(queue = %url, "Working the topic queue {name} as well: {url}");
        worker = worker.with_queue(name, Queue::new(client.clone(), url));
    }
    if drain.is_on() {
        worker = worker
            .with_membership(drain.subscribe())
            .followed_while(drain.on_changes());
    }
    if let Some(listener) = health {
        let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
        tracing::info!(port, "Health endpoint on http://127.0.0.1:{port}/healthz");
        tokio::spawn(health::serve(listener, worker.health()));
    }
    let outcome = worker.run(signals).await;
    // A draining task must not stay protected: release now rather than at expiry.
    let report = protection.shutdown().await;
    tracing::debug!("Task protection at exit: {report}");
    drop(drain);
    Ok(outcome)
}

/// An SQS client from the standard AWS configuration (including `AWS_ENDPOINT_URL`),
/// in `region` when given, else the queue URL's Region, else the configured one
/// (`AWS_REGION`): a queue lives in the Region its URL names, wherever the task runs.
///
/// The SDK's own retries are off: the worker decides about every failed call by its
/// kind, and bounds each call in time itself.
///
/// # Errors
/// [`StartError::NoRegion`] when none of them names a Region.
pub async fn sqs_client(
    queue_url: &str,
    region: Option<&str>,
) -> Result<aws_sdk_sqs::Client, StartError> {
    let chain = RegionProviderChain::first_try(region.map(|r| Region::new(r.to_owned())))
        .or_else(config::region_from_queue_url(queue_url).map(Region::new))
        .or_default_provider();
    let shared = aws_config::defaults(BehaviorVersion::latest())
        .region(chain)
        .retry_config(RetryConfig::disabled())
        .load()
        .await;
    match shared.region().map(Region::as_ref) {
        None | Some("") => return Err(StartError::NoRegion),
        Some(r) if !r.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') => {
            return Err(StartError::BadRegion(r.to_owned()));
        }
        Some(_) => {}
    }
    Ok(aws_sdk_sqs::Client::new(&shared))
}
