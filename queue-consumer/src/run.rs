//! Running a message's job: its slot, its protection, and the job itself, run again
//! in place while it fails and later messages of its FIFO group wait.
//!
//! A job starts only if what is left of its message's 12 h in flight holds its
//! longest run ([`WorkerSettings::job_bound`](crate::WorkerSettings::job_bound)) and
//! [`START_MARGIN`]; else the message goes back unworked, for a fresh 12 h.
//!
//! When a job of a chain fails, it is retried in place first ([`FIFO_ATTEMPTS`] runs
//! in all), because handing the group back would cost every later message of the
//! group a receive, and SQS moves a message to the dead-letter queue by its receive
//! count. When it has used up its tries it goes to the dead-letter queue alone
//! ([`dead_letter`](crate::dead_letter)); when it keeps failing short of that, the
//! rest of the chain goes back unworked.

use std::sync::atomic::Ordering;
use std::time::Duration;

use task_protection::ProtectionGuard;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::config::PoisonHead;
use crate::context::Shared;
use crate::dead_letter::used_up;
use crate::handler::{BoxedHandler, Verdict};
use crate::heartbeat::{Keeper, START_MARGIN};
use crate::job::{Ended, hand_back_unstarted, job_of, panic_message, why};
use crate::metrics;
use crate::protect::protect;
use crate::queue::{Message, RedrivePolicy};
use crate::shares::Slot;

/// How many times a failing job of a FIFO chain with later messages runs within one
/// delivery before the chain goes back to SQS.
pub const FIFO_ATTEMPTS: u32 = 3;
/// First wait before a failed FIFO job runs again in place; it doubles.
const FIFO_RETRY_BASE: Duration = Duration::from_secs(1);

/// What a chain hands from one message to the next: its slot, and its protection.
#[derive(Debug)]
pub(crate) struct Turn {
    pub(crate) slot: Slot,
    /// The chain's protection: taken by its first message, and passed on (as a new
    /// hold taken while the old one lives) to each next one, so that a chain that
    /// began before the task started to leave its service finishes protected.
    pub(crate) guard: Option<ProtectionGuard>,
}

impl Turn {
    /// The first message's turn: its slot, and protection still to take.
    pub(crate) fn first(slot: Slot) -> Self {
        Self { slot, guard: None }
    }
}

/// How a job ended, and whether its message has used up its tries and goes to the
/// dead-letter queue alone (see [`dead_letter`](crate::dead_letter)).
#[derive(Debug)]
pub(crate) struct Ran {
    pub(crate) ended: Ended,
    pub(crate) poison: Option<RedrivePolicy>,
}

impl From<Ended> for Ran {
    fn from(ended: Ended) -> Self {
        Self {
            ended,
            poison: None,
        }
    }
}

/// Whether a job that may run `bound` can start with `left` of its message's 12 h:
/// a job cut off at the limit would be delivered again while it still runs.
#[must_use]
pub(crate) fn fits(left: Duration, bound: Duration) -> bool {
    left >= bound.saturating_add(START_MARGIN)
}

/// Takes a slot and protection, then works the job (again, in place, while it fails
/// and later messages of its FIFO group wait). Returns how it ended (none when it
/// did not start, or the message is no longer held; then the action is in the log).
/// The chain's guard is left in `turn`, to keep until the message is settled.
pub(crate) async fn run(
    shared: &Shared,
    lane: usize,
    keeper: &mut Keeper,
    message: &Message,
    turn: &mut Turn,
    mut batch: Option<crate::batch::Member>,
    followers: bool,
) -> Option<Ran> {
    let id = &message.id;
    if !turn.slot.can_run() {
        let stop = shared.stop_receiving.clone();
        let leaving = shared.leaving();
        let lost = keeper.lost.clone();
        let slot = &mut turn.slot;
        let waited = keeper
            .keep_while(async {
                tokio::select! {
                    biased;
                    () = stop.cancelled() => false,
                    () = leaving => false,
                    () = lost.cancelled() => false,
                    () = slot.run() => true,
                }
            })
            .await;
        if !waited {
            return hand_back_unstarted(shared, keeper, id).map(Ran::from);
        }
    }
    if turn.guard.is_none() {
        match protect(shared, keeper, id).await {
            Ok(guard) => turn.guard = guard,
            Err(ended) => {
                if let Some(b) = batch.take() {
                    b.withdraw();
                }
                return ended.map(Ran::from);
            }
        }
    }
    let bound = shared.settings.job_bound();
    let mut attempt = 1;
    let mut retry = Backoff::new(FIFO_RETRY_BASE, FIFO_RETRY_BASE * 8);
    let mut failed: Option<Ended> = None;
    loop {
        let left = keeper.window_left();
        if !fits(left, bound) {
            if let Some(b) = batch.take() {
                b.withdraw();
            }
            if let Some(ended) = failed {
                // Run again in place, it could be cut off: it goes back as failed.
                return Some(ended.into());
            }
            tracing::warn!(
                message_id = %id,
                "{id} - Not started: it has {}s left of the 12 h SQS keeps a message in flight, and its job may take {}s (MAX_JOB_MS, JOB_TIMEOUT_SECONDS) and {}s to settle; handing it back, for a fresh 12 h",
                left.as_secs(),
                bound.as_secs(),
                START_MARGIN.as_secs()
            );
            return Some(Ended::Verdict(Verdict::RetryAfter(Duration::ZERO)).into());
        }
        let job = job_of(shared, lane, message, keeper, attempt);
        tracing::info!(message_id = %id, source = %job.source, "{id} - Started ({})", job.source);
        ::metrics::histogram!(metrics::RECEIVE_TO_START)
            .record(metrics::ms(message.received_at.elapsed()));
        let started = Instant::now();
        let ended = match batch.take() {
            Some(member) => {
                let abandon = shared.abandon.clone();
                keeper
                    .keep_while(async {
                        tokio::select! {
                            e = member.work(job) => Some(e),
                            () = abandon.cancelled() => None,
                        }
                    })
                    .await
            }
            None => {
                let BoxedHandler::Each(handler) = &shared.handler else {
                    unreachable!("a batch handler's jobs come with a batch member");
                };
                work(shared, keeper, handler(job)).await
            }
        };
        let Some(ended) = ended else {
            tracing::warn!(
                message_id = %id,
                "{id} - Still working at the end of the shutdown grace period; handing it back"
            );
            return Some(Ended::Verdict(Verdict::RetryAfter(Duration::ZERO)).into());
        };
        ::metrics::histogram!(metrics::JOB_DURATION).record(metrics::ms(started.elapsed()));
        if keeper.is_lost() {
            tracing::warn!(
                message_id = %id,
                "{id} - Stopped: the message is no longer held; neither deleted nor handed back"
            );
            return None;
        }
        if !followers {
            return Some(ended.into());
        }
        // Later messages of its group wait: they must not pay for this one.
        let bad = matches!(ended, Ended::Verdict(Verdict::BadInput(_)));
        if (bad || ended.may_pass()) && shared.settings.poison_head == PoisonHead::DeadLetter {
            let lane = &shared.lanes[lane];
            if let Some(policy) = lane.redrive.policy(&lane.queue).await
                && (bad || used_up(message.receive_count, attempt, &policy))
            {
                return Some(Ran {
                    ended,
                    poison: Some(policy),
                });
            }
        }
        let retry_in_place = ended.may_pass()
            && attempt < FIFO_ATTEMPTS
            && !shared.stop_receiving.is_cancelled()
            && !shared.is_leaving();
        if !retry_in_place {
            return Some(ended.into());
        }
        let wait = retry.next_delay();
        attempt += 1;
        shared.stats.failed.fetch_add(1, Ordering::Relaxed);
        metrics::count(metrics::JOBS_FAILED);
        tracing::warn!(
            message_id = %id,
            "{id} - Failed: {}; running it again in {:.1}s (run {attempt} of {FIFO_ATTEMPTS}), so that the later messages of its group keep their receive count",
            why(&ended),
            wait.as_secs_f64()
        );
        let abandon = shared.abandon.clone();
        let stop = shared.stop_receiving.clone();
        let waited = keeper
            .keep_while(async {
                tokio::select! {
                    () = tokio::time::sleep(wait) => true,
                    () = abandon.cancelled() => false,
                    () = stop.cancelled() => false,
                }
            })
            .await;
        if !waited || keeper.is_lost() {
            return Some(ended.into());
        }
        failed = Some(ended);
    }
}

/// Runs one job on its own task, under the job timeout and the grace period. `None`
/// when the grace period ended first.
async fn work(
    shared: &Shared,
    keeper: &mut Keeper,
    job: crate::handler::BoxFuture<Verdict>,
) -> Option<Ended> {
    // The job runs on its own task: it makes progress while the keeper works, a panic
    // in it is caught (and the message retried), and the grace period's end or the job
    // timeout can abort it.
    let mut task = tokio::spawn(job);
    let abandon = shared.abandon.clone();
    let timeout = shared.settings.job_timeout;
    let ended = keeper
        .keep_while(async {
            tokio::select! {
                r = &mut task => Some(match r {
                    Ok(v) => Ended::Verdict(v),
                    Err(e) => Ended::Panicked(panic_message(e)),
                }),
                () = sleep_opt(timeout) => Some(Ended::TimedOut(timeout.unwrap_or_default())),
                () = abandon.cancelled() => None,
            }
        })
        .await;
    if !matches!(ended, Some(Ended::Verdict(_) | Ended::Panicked(_))) {
        task.abort();
    }
    ended
}

async fn sleep_opt(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}
