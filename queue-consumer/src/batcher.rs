//! The batched SQS calls of one queue: deleting the messages whose job is done, and
//! setting the visibility of messages handed back, retried later or kept (the
//! heartbeat's extensions).
//!
//! SQS bills and rate-limits per request, and a batch call takes up to ten entries,
//! so requests that come together go out together:
//!
//! - a delete or hand-back waits (at most [`LINGER`]) for the other jobs of its
//!   *cohort*, the messages of the same receive, which were started together and tend
//!   to end together; it never waits for a job of another receive, such as a long
//!   job that started earlier;
//! - an extension waits [`EXTEND_LINGER`] for the extensions of the messages received
//!   with it, which fall due at the same moment: one call keeps a whole receive
//!   invisible;
//! - a batch goes out as soon as it is full, or nothing it holds can be joined.
//!
//! Each batch call runs on its own, so a slow or failing call holds back no other
//! message; each entry's result goes back to the message's own task, which decides
//! whether to try again (single entries can fail inside an HTTP 200).
//!
//! A visibility change replaces an extension of the same message that has not been
//! sent yet (its requester sees its reply dropped): an extension sent after a
//! hand-back would make the message invisible again.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::queue::{MAX_BATCH, Queue, SqsError};

/// How long a settled message may wait for the rest of its cohort to share its call.
pub(crate) const LINGER: Duration = Duration::from_millis(50);
/// How long an extension waits for the extensions due with it.
pub(crate) const EXTEND_LINGER: Duration = Duration::from_millis(20);

/// The answer to one entry: `Ok` when SQS applied it.
pub(crate) type Answer = Result<(), SqsError>;

/// One call for one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Call {
    /// `DeleteMessageBatch`.
    Delete,
    /// `ChangeMessageVisibilityBatch` to this many seconds; `extension` when it keeps
    /// the message rather than letting it go.
    Visibility { secs: i32, extension: bool },
}

/// One entry to send; the answer comes back on `reply`.
#[derive(Debug)]
struct Request {
    receipt_handle: String,
    call: Call,
    /// The jobs received with the message: a batch waits for them to end.
    cohort: Option<TaskTracker>,
    reply: oneshot::Sender<Answer>,
}

impl Request {
    fn is_extension(&self) -> bool {
        matches!(
            self.call,
            Call::Visibility {
                extension: true,
                ..
            }
        )
    }

    fn waits_for_jobs(&self) -> bool {
        self.cohort.as_ref().is_some_and(|c| !c.is_empty())
    }
}

/// The sending side: message tasks submit here.
#[derive(Debug, Clone)]
pub(crate) struct SettleQueue {
    tx: mpsc::UnboundedSender<Request>,
}

impl SettleQueue {
    /// Submits `call` for the message `receipt_handle`; the answer arrives on the
    /// returned receiver. A dropped answer means it was never sent: replaced by a
    /// later change, or the worker is exiting.
    pub(crate) fn submit(
        &self,
        receipt_handle: &str,
        call: Call,
        cohort: Option<&TaskTracker>,
    ) -> oneshot::Receiver<Answer> {
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(Request {
            receipt_handle: receipt_handle.to_owned(),
            call,
            cohort: cohort.cloned(),
            reply,
        });
        rx
    }
}

/// Gathers requests into batches until every sender is gone.
#[derive(Debug)]
pub(crate) struct Settler {
    queue: Queue,
    rx: mpsc::UnboundedReceiver<Request>,
    calls: TaskTracker,
}

/// Requests waiting to go out, by call.
#[derive(Debug, Default)]
struct Pending {
    deletes: Vec<Request>,
    changes: Vec<Request>,
}

impl Pending {
    fn push(&mut self, r: Request) {
        match r.call {
            Call::Delete => self.deletes.push(r),
            Call::Visibility { extension, .. } => {
                if !extension {
                    // An extension not yet sent must not follow the change: drop it.
                    self.changes
                        .retain(|p| !(p.is_extension() && p.receipt_handle == r.receipt_handle));
                }
                self.changes.push(r);
            }
        }
    }

    fn full(&self) -> bool {
        self.deletes.len() >= MAX_BATCH || self.changes.len() >= MAX_BATCH
    }

    /// Until when the batch may wait for more; `None`: send it now.
    fn linger_until(&self, first_at: Instant) -> Option<Instant> {
        let all = || self.deletes.iter().chain(&self.changes);
        if all().any(Request::waits_for_jobs) {
            Some(first_at + LINGER)
        } else if self.changes.iter().any(Request::is_extension) {
            Some(first_at + EXTEND_LINGER)
        } else {
            None
        }
    }
}

impl Settler {
    pub(crate) fn new(queue: Queue) -> (Self, SettleQueue) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Self {
                queue,
                rx,
                calls: TaskTracker::new(),
            },
            SettleQueue { tx },
        )
    }

    pub(crate) async fn run(mut self) {
        let mut pending = Pending::default();
        let mut open = true;
        while open {
            match self.rx.recv().await {
                Some(r) => pending.push(r),
                None => break,
            }
            let first_at = Instant::now();
            loop {
                while let Ok(r) = self.rx.try_recv() {
                    pending.push(r);
                }
                if pending.full() {
                    break;
                }
                let Some(until) = pending.linger_until(first_at) else {
                    break;
                };
                tokio::select! {
                    r = self.rx.recv() => match r {
                        Some(r) => pending.push(r),
                        None => { open = false; break; }
                    },
                    () = tokio::time::sleep_until(until) => break,
                }
            }
            self.flush(&mut pending);
        }
        self.flush(&mut pending);
        self.calls.close();
        self.calls.wait().await;
    }

    fn flush(&self, pending: &mut Pending) {
        while !pending.deletes.is_empty() {
            let n = pending.deletes.len().min(MAX_BATCH);
            self.send(pending.deletes.drain(..n).collect());
        }
        while !pending.changes.is_empty() {
            let n = pending.changes.len().min(MAX_BATCH);
            self.send(pending.changes.drain(..n).collect());
        }
    }

    /// Makes one batch call on its own task and answers each request.
    fn send(&self, batch: Vec<Request>) {
        let queue = self.queue.clone();
        self.calls.spawn(async move {
            let deleting = batch.first().is_some_and(|r| r.call == Call::Delete);
            let (operation, result) = if deleting {
                let handles: Vec<&str> = batch.iter().map(|r| r.receipt_handle.as_str()).collect();
                ("DeleteMessageBatch", queue.delete_batch(&handles).await)
            } else {
                let entries: Vec<(&str, i32)> = batch
                    .iter()
                    .map(|r| {
                        let secs = match r.call {
                            Call::Visibility { secs, .. } => secs,
                            Call::Delete => 0,
                        };
                        (r.receipt_handle.as_str(), secs)
                    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn request(handle: &str, call: Call, cohort: Option<TaskTracker>) -> Request {
        Request {
            receipt_handle: handle.to_owned(),
            call,
            cohort,
            reply: oneshot::channel().0,
        }
    }

    const EXTEND: Call = Call::Visibility {
        secs: 30,
        extension: true,
    };
    const HAND_BACK: Call = Call::Visibility {
        secs: 0,
        extension: false,
    };

    #[tokio::test(start_paused = true)]
    async fn a_batch_waits_only_for_its_own_cohort() {
        let t0 = Instant::now();
        let cohort = TaskTracker::new();
        let running = cohort.token();
        let mut p = Pending::default();
        p.push(request("a", Call::Delete, Some(cohort.clone())));
        assert_eq!(p.linger_until(t0), Some(t0 + LINGER));
        drop(running);
        // Its cohort has ended: nothing else can join, whatever runs elsewhere.
        assert_eq!(p.linger_until(t0), None);
        p.push(request("b", EXTEND, None));
        assert_eq!(p.linger_until(t0), Some(t0 + EXTEND_LINGER));
    }

    #[test]
    fn a_change_replaces_an_unsent_extension_of_the_same_message() {
        let mut p = Pending::default();
        p.push(request("a", EXTEND, None));
        p.push(request("b", EXTEND, None));
        p.push(request("a", HAND_BACK, None));
        let calls: Vec<(&str, Call)> = p
            .changes
            .iter()
            .map(|r| (r.receipt_handle.as_str(), r.call))
            .collect();
        assert_eq!(calls, [("b", EXTEND), ("a", HAND_BACK)]);
    }
}
