//! A FIFO message that has used up its tries, moved to the dead-letter queue by the
//! worker itself, alone.
//!
//! SQS counts a receive for every message of a group that goes back with a failing
//! one, and moves a message to the dead-letter queue by that count: left to SQS, a
//! message that keeps failing takes the later messages of its group to the
//! dead-letter queue with it, each at the same receive count, before they ever ran
//! (Lambda's FIFO event source does the same). So when a message of a FIFO chain fails
//! its last allowed try, the worker does to it what SQS's redrive would, and to it
//! alone: it sends a copy to the dead-letter queue the queue's redrive policy names
//! (body, message attributes, group, trace header), deletes it from the queue, and
//! the rest of its group goes on, in order, with the receive counts they had.
//!
//! Its tries are counted as SQS counts receives, with each run in place as one more:
//! `(receive count - 1) + runs in this delivery` against `maxReceiveCount` (each
//! earlier delivery ran it at least once). A message that can never work
//! ([`Verdict::BadInput`](crate::Verdict::BadInput)) goes at once.
//!
//! The policy is read with `GetQueueAttributes` when first needed and again when it
//! is older than [`POLICY_TTL`]; without it (no policy, or the task role may not read
//! it) a failing message goes back as SQS would have it. `FIFO_POISON_HEAD=stop-group`
//! keeps SQS's behaviour.

use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::queue::{Message, Queue, RedrivePolicy, SqsError};

/// How long a queue's redrive policy, once read, is taken to hold.
pub(crate) const POLICY_TTL: Duration = Duration::from_secs(5 * 60);
/// How long a failed read of the policy stands before it is tried again.
const FAILED_READ_TTL: Duration = Duration::from_secs(60);
/// Tries of the copy's `SendMessage` while its errors may pass.
const SEND_TRIES: u32 = 3;

/// What the worker knows of one queue's redrive policy.
#[derive(Debug, Default)]
pub(crate) struct Redrive {
    /// When it was read, and what it was (`None`: none, or unreadable).
    known: tokio::sync::Mutex<Option<(Instant, Option<RedrivePolicy>)>>,
}

impl Redrive {
    /// The redrive policy of `queue`, read at most every [`POLICY_TTL`].
    pub(crate) async fn policy(&self, queue: &Queue) -> Option<RedrivePolicy> {
        let mut known = self.known.lock().await;
        if let Some((until, policy)) = known.as_ref()
            && Instant::now() < *until
        {
            return policy.clone();
        }
        let (policy, ttl) = match queue.redrive_policy().await {
            Ok(policy) => (policy, POLICY_TTL),
            Err(e) => {
                tracing::warn!(
                    "Cannot read the redrive policy of {} ({e}): a FIFO message that keeps failing goes back as SQS would have it, with the later messages of its group. Grant sqs:GetQueueAttributes on the queue",
                    queue.url()
                );
                (None, FAILED_READ_TTL)
            }
        };
        *known = Some((Instant::now() + ttl, policy.clone()));
        policy
    }
}

/// Whether a message received `receive_count` times that has just failed its
/// `runs`-th run of this delivery has used up its tries under `policy`.
#[must_use]
pub(crate) fn used_up(receive_count: u32, runs: u32, policy: &RedrivePolicy) -> bool {
    receive_count.saturating_sub(1).saturating_add(runs) >= policy.max_receive_count
}

/// Sends a copy of `message`, received from `queue`, to `policy`'s dead-letter
/// queue, trying again (a few times) while that may work. Returns the dead-letter
/// queue's URL.
///
/// # Errors
/// When the copy could not be sent: the dead-letter queue cannot be named, SQS
/// refused it (say, the task role lacks `sqs:SendMessage` on it), or it kept failing.
pub(crate) async fn send_copy(
    queue: &Queue,
    message: &Message,
    policy: &RedrivePolicy,
) -> Result<String, SqsError> {
    let url = policy
        .dead_letter_url(queue.url())
        .ok_or_else(|| SqsError {
            operation: "SendMessage",
            kind: crate::queue::ErrorKind::Permanent,
            code: None,
            message: format!(
                "no queue URL for the dead-letter queue {}",
                policy.dead_letter_target_arn
            ),
        })?;
    let dead_letters = queue.at(url.clone());
    let mut backoff = Backoff::sqs();
    let mut tries = 0;
    loop {
        tries += 1;
        match dead_letters.send_copy(message).await {
            Ok(()) => return Ok(url),
            Err(e) if e.kind.may_pass() && tries < SEND_TRIES => {
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_run_counts_as_a_try_and_every_earlier_delivery_as_one() {
        let policy = RedrivePolicy {
            dead_letter_target_arn: "arn:aws:sqs:us-east-1:1:jobs-dlq.fifo".to_owned(),
            max_receive_count: 3,
        };
        // First delivery: the third run is the last try.
        assert!(!used_up(1, 2, &policy));
        assert!(used_up(1, 3, &policy));
        // Third delivery: its first run is.
        assert!(used_up(3, 1, &policy));
        assert!(!used_up(2, 1, &policy));
        // Past the count (a policy lowered meanwhile): at once.
        assert!(used_up(9, 1, &policy));
    }
}
