//! Settling messages: deleting those whose job is done, and setting the visibility of
//! those handed back, in batches.
//!
//! Jobs that finish together are settled in one `DeleteMessageBatch` (or
//! `ChangeMessageVisibilityBatch`) call: SQS bills and rate-limits per request, and a
//! batch takes up to ten entries. A batch goes out as soon as no job is still running
//! (nothing else could join it), when it is full, or after a short linger, so a lone
//! job is never held back. Each batch call runs on its own, so a slow or failing call
//! holds back no other message; each entry's result goes back to the message's own
//! task, which decides whether to try again (single entries can fail inside an HTTP
//! 200).

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::queue::{MAX_BATCH, Queue, SqsError};

/// How long a finished job may wait for others to share its batch call.
const LINGER: Duration = Duration::from_millis(50);

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

impl Action {
    fn visibility_secs(self) -> i32 {
        match self {
            Self::Delete | Self::HandBack => 0,
            Self::RetryAfter(d) => i32::try_from(d.as_secs()).unwrap_or(i32::MAX),
        }
    }
}

/// One settle call for one message; the answer comes back on `reply`.
#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) receipt_handle: String,
    pub(crate) action: Action,
    pub(crate) reply: oneshot::Sender<Result<(), SqsError>>,
}

/// The sending side: message tasks submit here.
#[derive(Debug, Clone)]
pub(crate) struct SettleQueue {
    tx: mpsc::UnboundedSender<Request>,
}

impl SettleQueue {
    /// Submits one settle call; the answer arrives on the returned receiver. A dropped
    /// receiver means the settler is gone (the worker is exiting).
    pub(crate) fn submit(
        &self,
        receipt_handle: &str,
        action: Action,
    ) -> oneshot::Receiver<Result<(), SqsError>> {
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(Request {
            receipt_handle: receipt_handle.to_owned(),
            action,
            reply,
        });
        rx
    }
}

/// Gathers settle requests into batches until every sender is gone.
#[derive(Debug)]
pub(crate) struct Settler {
    queue: Queue,
    rx: mpsc::UnboundedReceiver<Request>,
    /// Jobs still running: while none is, no request can join a batch, so it goes out
    /// at once instead of lingering.
    jobs: TaskTracker,
    calls: TaskTracker,
}

impl Settler {
    pub(crate) fn new(queue: Queue, jobs: TaskTracker) -> (Self, SettleQueue) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Self {
                queue,
                rx,
                jobs,
                calls: TaskTracker::new(),
            },
            SettleQueue { tx },
        )
    }

    pub(crate) async fn run(mut self) {
        let mut deletes: Vec<Request> = Vec::new();
        let mut changes: Vec<Request> = Vec::new();
        let mut open = true;
        while open {
            match self.rx.recv().await {
                Some(r) => push(&mut deletes, &mut changes, r),
                None => break,
            }
            let linger_until = Instant::now() + LINGER;
            loop {
                while let Ok(r) = self.rx.try_recv() {
                    push(&mut deletes, &mut changes, r);
                }
                if deletes.len() >= MAX_BATCH || changes.len() >= MAX_BATCH || self.jobs.is_empty()
                {
                    break;
                }
                tokio::select! {
                    r = self.rx.recv() => match r {
                        Some(r) => push(&mut deletes, &mut changes, r),
                        None => { open = false; break; }
                    },
                    () = tokio::time::sleep_until(linger_until) => break,
                }
            }
            while !deletes.is_empty() {
                let n = deletes.len().min(MAX_BATCH);
                self.send(deletes.drain(..n).collect());
            }
            while !changes.is_empty() {
                let n = changes.len().min(MAX_BATCH);
                self.send(changes.drain(..n).collect());
            }
        }
        self.calls.close();
        self.calls.wait().await;
    }

    /// Makes one batch call on its own task and answers each request.
    fn send(&self, batch: Vec<Request>) {
        let queue = self.queue.clone();
        self.calls.spawn(async move {
            let deleting = batch.first().is_some_and(|r| r.action == Action::Delete);
            let (operation, result) = if deleting {
                let handles: Vec<&str> = batch.iter().map(|r| r.receipt_handle.as_str()).collect();
                ("DeleteMessageBatch", queue.delete_batch(&handles).await)
            } else {
                let entries: Vec<(&str, i32)> = batch
                    .iter()
                    .map(|r| (r.receipt_handle.as_str(), r.action.visibility_secs()))
                    .collect();
                (
                    "ChangeMessageVisibilityBatch",
                    queue.change_visibility_batch(&entries).await,
                )
            };
            if let Ok(failures) = &result {
                for _ in failures {
                    crate::metrics::count(crate::metrics::SQS_ERRORS);
                }
            }
            for (i, request) in batch.into_iter().enumerate() {
                let answer = match &result {
                    Ok(failures) => failures
                        .iter()
                        .find(|f| f.index == i)
                        .map_or(Ok(()), |f| Err(f.to_error(operation))),
                    Err(e) => Err(e.clone()),
                };
                let _ = request.reply.send(answer);
            }
        });
    }
}

fn push(deletes: &mut Vec<Request>, changes: &mut Vec<Request>, r: Request) {
    if r.action == Action::Delete {
        deletes.push(r);
    } else {
        changes.push(r);
    }
}
