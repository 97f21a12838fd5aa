//! One call of a [`BatchHandler`](crate::handler::BatchHandler) for the messages of
//! one receive.
//!
//! Every message keeps its own task, keeper, slot and protection guard; when it is
//! ready to start it joins the batch ([`Member::work`]), or withdraws (handed back,
//! no longer held). Once every message of the receive has joined or withdrawn, the
//! handler is called once with the jobs that joined, in the order SQS returned them,
//! and its [`BatchResponse`] becomes one verdict per message.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::handler::{BatchResponse, BoxFuture, Job, Verdict};
use crate::job::{Ended, panic_message};

type BatchFn = Arc<dyn Fn(Vec<Job>) -> BoxFuture<BatchResponse> + Send + Sync>;

enum Entry {
    Join(usize, Box<Job>, oneshot::Sender<Ended>),
    Withdraw,
}

/// One message's place in its batch.
#[derive(Debug)]
pub(crate) struct Member {
    index: usize,
    tx: Option<mpsc::UnboundedSender<Entry>>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Join(i, ..) => write!(f, "Join({i})"),
            Self::Withdraw => f.write_str("Withdraw"),
        }
    }
}

impl Member {
    /// Joins the batch with `job` and waits for its verdict.
    pub(crate) async fn work(mut self, job: Job) -> Ended {
        let (reply, verdict) = oneshot::channel();
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Entry::Join(self.index, Box::new(job), reply));
        }
        // No verdict: the batch was abandoned at the end of the grace period.
        verdict
            .await
            .unwrap_or(Ended::Verdict(Verdict::RetryAfter(Duration::ZERO)))
    }

    /// Leaves the batch without a job.
    pub(crate) fn withdraw(self) {}
}

impl Drop for Member {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Entry::Withdraw);
        }
    }
}

/// What a batch needs besides its handler.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// `JOB_TIMEOUT_SECONDS`, for the whole call.
    pub(crate) timeout: Option<Duration>,
    /// The end of the shutdown grace period.
    pub(crate) abandon: CancellationToken,
    /// On a FIFO queue, a message after a failed one of its group is not done.
    pub(crate) fifo: bool,
}

/// Starts a batch of `n` messages; returns their members, in order.
pub(crate) fn start(handler: BatchFn, n: usize, limits: Limits) -> Vec<Member> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(collect(handler, n, limits, rx));
    (0..n)
        .map(|index| Member {
            index,
            tx: Some(tx.clone()),
        })
        .collect()
}

async fn collect(
    handler: BatchFn,
    n: usize,
    limits: Limits,
    mut rx: mpsc::UnboundedReceiver<Entry>,
) {
    let mut joined: Vec<Option<(Job, oneshot::Sender<Ended>)>> = (0..n).map(|_| None).collect();
    let mut accounted = 0;
    while accounted < n {
        match rx.recv().await {
            Some(Entry::Join(i, job, reply)) => {
                if let Some(slot) = joined.get_mut(i) {
                    *slot = Some((*job, reply));
                }
                accounted += 1;
            }
            Some(Entry::Withdraw) => accounted += 1,
            None => break,
        }
    }
    let (jobs, replies): (Vec<Job>, Vec<oneshot::Sender<Ended>>) =
        joined.into_iter().flatten().unzip();
    if jobs.is_empty() {
        return;
    }
    let ids: Vec<(String, Option<String>)> = jobs
        .iter()
        .map(|j| (j.message_id.clone(), j.group_id.clone()))
        .collect();
    let mut task = tokio::spawn(handler(jobs));
    let outcome = tokio::select! {
        r = &mut task => match r {
            Ok(response) => Outcome::Response(response),
            Err(e) => Outcome::Panicked(panic_message(e)),
        },
        () = sleep_opt(limits.timeout) => {
            task.abort();
            Outcome::TimedOut(limits.timeout.unwrap_or_default())
        }
        () = limits.abandon.cancelled() => {
            task.abort();
            return;
        }
    };
    let verdicts = verdicts(&ids, outcome, limits.fifo);
    for (reply, ended) in replies.into_iter().zip(verdicts) {
        let _ = reply.send(ended);
    }
}

/// How a batch call ended.
#[derive(Debug)]
enum Outcome {
    Response(BatchResponse),
    Panicked(String),
    TimedOut(Duration),
}

/// One verdict per message, in order, from the handler's response (or its failure).
fn verdicts(ids: &[(String, Option<String>)], outcome: Outcome, fifo: bool) -> Vec<Ended> {
    let response = match outcome {
        Outcome::Response(r) => r,
        Outcome::Panicked(why) => {
            return ids.iter().map(|_| Ended::Panicked(why.clone())).collect();
        }
        Outcome::TimedOut(after) => return ids.iter().map(|_| Ended::TimedOut(after)).collect(),
    };
    let mut failed_groups: HashSet<&str> = HashSet::new();
    ids.iter()
        .map(|(id, group)| {
            let group = group.as_deref().filter(|_| fifo);
            if let Some(g) = group
                && failed_groups.contains(g)
            {
                return Ended::Skipped;
            }
            if response.failed(id) {
                if let Some(g) = group {
                    failed_groups.insert(g);
                }
                Ended::Verdict(Verdict::Failed(
                    "reported failed by the batch handler".to_owned(),
                ))
            } else {
                Ended::Verdict(Verdict::Done)
            }
        })
        .collect()
}

async fn sleep_opt(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[(&str, Option<&str>)]) -> Vec<(String, Option<String>)> {
        v.iter()
            .map(|(i, g)| ((*i).to_owned(), g.map(str::to_owned)))
            .collect()
    }

    fn names(v: &[Ended]) -> Vec<&'static str> {
        v.iter()
            .map(|e| match e {
                Ended::Verdict(Verdict::Done) => "done",
                Ended::Verdict(_) => "failed",
                Ended::Skipped => "skipped",
                Ended::Panicked(_) => "panicked",
                Ended::TimedOut(_) => "timed out",
            })
            .collect()
    }

    #[test]
    fn the_failures_listed_are_retried_and_the_rest_deleted() {
        let mut r = BatchResponse::default();
        r.fail("b");
        let v = verdicts(
            &ids(&[("a", None), ("b", None), ("c", None)]),
            Outcome::Response(r),
            false,
        );
        assert_eq!(names(&v), ["done", "failed", "done"]);
    }

    #[test]
    fn on_a_fifo_queue_a_group_stops_at_its_first_failure() {
        let mut r = BatchResponse::default();
        r.fail("a1");
        let v = verdicts(
            &ids(&[("a1", Some("a")), ("b1", Some("b")), ("a2", Some("a"))]),
            Outcome::Response(r.clone()),
            true,
        );
        assert_eq!(names(&v), ["failed", "done", "skipped"]);
        // A standard queue's groups mean nothing.
        let v = verdicts(
            &ids(&[("a1", Some("a")), ("a2", Some("a"))]),
            Outcome::Response(r),
            false,
        );
        assert_eq!(names(&v), ["failed", "done"]);
    }

    #[test]
    fn a_panic_or_a_timeout_fails_the_whole_batch() {
        let v = verdicts(
            &ids(&[("a", None), ("b", None)]),
            Outcome::Panicked("boom".to_owned()),
            false,
        );
        assert_eq!(names(&v), ["panicked", "panicked"]);
        let v = verdicts(
            &ids(&[("a", None)]),
            Outcome::TimedOut(Duration::from_secs(5)),
            false,
        );
        assert_eq!(names(&v), ["timed out"]);
    }
}
