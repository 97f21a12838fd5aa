//! Waiting for ECS to confirm protection before a job starts, keeping the message
//! meanwhile.

use std::time::Duration;

use task_protection::{AcquireError, ProtectionGuard};
use tokio::time::Instant;

use crate::context::Shared;
use crate::handler::Verdict;
use crate::heartbeat::Keeper;
use crate::job::{Ended, hand_back_unstarted};

/// Counts a message as waiting for protection while it lives; the receive loops take
/// no new messages meanwhile.
struct Waiting<'a>(&'a tokio::sync::watch::Sender<usize>);

impl<'a> Waiting<'a> {
    fn new(count: &'a tokio::sync::watch::Sender<usize>) -> Self {
        count.send_modify(|n| *n += 1);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Waits for ECS to confirm protection, keeping the message meanwhile.
///
/// A protection fault must not cost the message a receive: handing it back would have
/// SQS count a delivery each time, and an agent outage would move good messages to
/// the dead-letter queue unworked. So the message is kept, its visibility extended,
/// for as long as protection takes; only a refusal (the task is being replaced), the
/// task leaving its service, or the worker stopping hands it back.
pub(crate) async fn protect(
    shared: &Shared,
    keeper: &mut Keeper,
    id: &str,
) -> Result<ProtectionGuard, Option<Ended>> {
    let _waiting = Waiting::new(&shared.awaiting_protection);
    // Held across attempts, so protection stays wanted between two acquires.
    let _wanted = shared.protection.hold();
    let started = Instant::now();
    loop {
        let stop = shared.stop_receiving.clone();
        let leaving = shared.leaving();
        let acquired = keeper
            .keep_while(async {
                tokio::select! {
                    biased;
                    () = stop.cancelled() => None,
                    () = leaving => None,
                    r = shared.protection.acquire() => Some(r),
                }
            })
            .await;
        if keeper.is_lost() {
            tracing::warn!(message_id = %id, "{id} - Not started: the message is no longer held");
            return Err(None);
        }
        match acquired {
            None => return Err(hand_back_unstarted(shared, keeper, id)),
            Some(Ok(guard)) => return Ok(guard),
            Some(Err(AcquireError::Rejected(r))) => {
                tracing::warn!(message_id = %id, "{id} - Not started: task protection refused ({r}); handing it back");
                shared.refuse(r);
                return Err(Some(Ended::Verdict(Verdict::RetryAfter(Duration::ZERO))));
            }
            Some(Err(AcquireError::ShutDown)) => {
                return Err(Some(Ended::Verdict(Verdict::RetryAfter(Duration::ZERO))));
            }
            Some(Err(AcquireError::Draining)) => {
                return Err(hand_back_unstarted(shared, keeper, id));
            }
            Some(Err(e)) => {
                if shared.is_leaving() {
                    return Err(hand_back_unstarted(shared, keeper, id));
                }
                tracing::warn!(
                    message_id = %id,
                    "{id} - Still waiting for task protection after {}s ({e}); keeping the message, receiving no more until protection works",
                    started.elapsed().as_secs()
                );
            }
        }
    }
}
