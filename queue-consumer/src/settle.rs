//! Settling messages: deleting those whose job is done, and setting the visibility of
//! those handed back, in batches.
//!
//! Jobs that finish together are settled in one `DeleteMessageBatch` (or
//! `ChangeMessageVisibilityBatch`) call: SQS bills and rate-limits per request, and a
//! batch takes up to ten entries. A batch goes out as soon as every message the worker
//! holds is waiting in it, when it is full, or after a short linger, so a lone job is
//! never held back. Each entry's result is checked, because single entries can fail
//! inside an HTTP 200.
//!
//! A message keeps its concurrency slot and its protection guard until it is settled:
//! the task stays protected until the message is deleted or handed back.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use task_protection::ProtectionGuard;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::queue::{EntryFailure, MAX_BATCH, Queue, SqsError};
use crate::stats::Stats;

/// How long a finished job may wait for others to share its batch call.
const LINGER: Duration = Duration::from_millis(50);
/// How long a failing settle call is retried. Past the visibility timeout SQS may
/// deliver the message again anyway, so this bounds the work, not the outcome.
const RETRY_WINDOW: Duration = Duration::from_secs(60);

/// What to do with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// The job is done: delete it.
    Delete,
    /// Hand it back at once (visibility 0), for another worker.
    HandBack,
    /// Let SQS deliver it again after this long.
    RetryAfter(Duration),
}

/// A message to settle, with the slot and protection it holds until then.
#[derive(Debug)]
pub(crate) struct Settlement {
    pub(crate) message_id: String,
    pub(crate) receipt_handle: String,
    pub(crate) action: Action,
    pub(crate) permit: OwnedSemaphorePermit,
    pub(crate) guard: Option<ProtectionGuard>,
}

impl Settlement {
    fn visibility_secs(&self) -> i32 {
        match self.action {
            Action::Delete | Action::HandBack => 0,
            Action::RetryAfter(d) => i32::try_from(d.as_secs()).unwrap_or(i32::MAX),
        }
    }
}

/// Receives settlements and settles them in batches until every sender is gone.
#[derive(Debug)]
pub(crate) struct Settler {
    pub(crate) queue: Queue,
    pub(crate) rx: mpsc::UnboundedReceiver<Settlement>,
    /// Messages received and not yet settled, counted by the receiver.
    pub(crate) unsettled: Arc<AtomicUsize>,
    /// Stops retries: the worker is exiting.
    pub(crate) give_up: CancellationToken,
    pub(crate) stats: Arc<Stats>,
}

impl Settler {
    pub(crate) async fn run(mut self) {
        let mut deletes: Vec<Settlement> = Vec::new();
        let mut changes: Vec<Settlement> = Vec::new();
        let mut open = true;
        while open || !deletes.is_empty() || !changes.is_empty() {
            if open && deletes.is_empty() && changes.is_empty() {
                match self.rx.recv().await {
                    Some(s) => push(&mut deletes, &mut changes, s),
                    None => open = false,
                }
            }
            let linger_until = Instant::now() + LINGER;
            while open {
                while let Ok(s) = self.rx.try_recv() {
                    push(&mut deletes, &mut changes, s);
                }
                let waiting = deletes.len() + changes.len();
                if deletes.len() >= MAX_BATCH
                    || changes.len() >= MAX_BATCH
                    || waiting >= self.unsettled.load(Ordering::SeqCst)
                {
                    break;
                }
                tokio::select! {
                    s = self.rx.recv() => match s {
                        Some(s) => push(&mut deletes, &mut changes, s),
                        None => open = false,
                    },
                    () = tokio::time::sleep_until(linger_until) => break,
                }
            }
            if !deletes.is_empty() {
                let n = deletes.len().min(MAX_BATCH);
                let batch: Vec<Settlement> = deletes.drain(..n).collect();
                self.settle(batch).await;
            }
            if !changes.is_empty() {
                let n = changes.len().min(MAX_BATCH);
                let batch: Vec<Settlement> = changes.drain(..n).collect();
                self.settle(batch).await;
            }
        }
    }

    /// Settles one batch of the same kind, retrying what may succeed later.
    async fn settle(&self, mut batch: Vec<Settlement>) {
        let started = Instant::now();
        let mut backoff = Backoff::sqs();
        let mut finished: Vec<Settlement> = Vec::with_capacity(batch.len());
        loop {
            let deleting = batch.first().is_some_and(|s| s.action == Action::Delete);
            let result = if deleting {
                let handles: Vec<&str> = batch.iter().map(|s| s.receipt_handle.as_str()).collect();
                self.queue.delete_batch(&handles).await
            } else {
                let entries: Vec<(&str, i32)> = batch
                    .iter()
                    .map(|s| (s.receipt_handle.as_str(), s.visibility_secs()))
                    .collect();
                self.queue.change_visibility_batch(&entries).await
            };
            let error = match result {
                Ok(failures) => {
                    let mut retry = Vec::new();
                    for (i, s) in batch.drain(..).enumerate() {
                        match failures.iter().find(|f| f.index == i) {
                            None => {
                                self.succeeded(&s);
                                finished.push(s);
                            }
                            Some(f) if f.sender_fault => {
                                entry_failed(&s, f, "not retried");
                                finished.push(s);
                            }
                            Some(f) => {
                                entry_failed(&s, f, "retrying");
                                retry.push(s);
                            }
                        }
                    }
                    batch = retry;
                    None
                }
                Err(e) => Some(e),
            };
            if batch.is_empty() {
                break;
            }
            if self.give_up.is_cancelled() || started.elapsed() >= RETRY_WINDOW {
                self.abandon(&mut batch, &mut finished, error.as_ref());
                break;
            }
            let wait = backoff.next_delay();
            if let Some(e) = &error {
                tracing::warn!(
                    "Settling {} message(s) failed, retrying in {wait:?}: {e}",
                    batch.len()
                );
            }
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.give_up.cancelled() => {}
            }
        }
        self.release(finished);
    }

    fn succeeded(&self, s: &Settlement) {
        let id = &s.message_id;
        match s.action {
            Action::Delete => {
                self.stats.done.fetch_add(1, Ordering::Relaxed);
                tracing::info!(message_id = %id, "{id} - Done");
            }
            Action::HandBack => {
                self.stats.handed_back.fetch_add(1, Ordering::Relaxed);
                tracing::info!(message_id = %id, "{id} - Handed back");
            }
            Action::RetryAfter(d) => {
                tracing::info!(message_id = %id, "{id} - Visible again in {}s", d.as_secs());
            }
        }
    }

    fn abandon(
        &self,
        batch: &mut Vec<Settlement>,
        finished: &mut Vec<Settlement>,
        error: Option<&SqsError>,
    ) {
        for s in batch.drain(..) {
            let id = &s.message_id;
            let why = error.map_or_else(|| "entry failed".to_owned(), ToString::to_string);
            tracing::error!(
                message_id = %id,
                "{id} - Could not be settled ({why}); SQS delivers it again once its visibility timeout passes"
            );
            finished.push(s);
        }
    }

    /// Frees the slots of settled messages at once, so the next receive can ask for
    /// all of them together, and drops their protection guards.
    fn release(&self, finished: Vec<Settlement>) {
        let mut slots: Option<OwnedSemaphorePermit> = None;
        let mut guards = Vec::with_capacity(finished.len());
        let n = finished.len();
        for s in finished {
            match &mut slots {
                Some(all) => all.merge(s.permit),
                None => slots = Some(s.permit),
            }
            guards.push(s.guard);
        }
        self.unsettled.fetch_sub(n, Ordering::SeqCst);
        drop(guards);
        drop(slots);
    }
}

fn push(deletes: &mut Vec<Settlement>, changes: &mut Vec<Settlement>, s: Settlement) {
    if s.action == Action::Delete {
        deletes.push(s);
    } else {
        changes.push(s);
    }
}

fn entry_failed(s: &Settlement, f: &EntryFailure, then: &str) {
    let id = &s.message_id;
    let what = if s.action == Action::Delete {
        "Delete"
    } else {
        "Visibility change"
    };
    tracing::warn!(
        message_id = %id,
        "{id} - {what} failed ({}: {}), {then}",
        f.code,
        f.message
    );
}
