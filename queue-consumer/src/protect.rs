//! Waiting for ECS to confirm protection before a job starts, keeping the message
//! meanwhile.

use std::time::Duration;

use task_protection::{AcquireError, ProtectionGuard};
use tokio::time::Instant;

use crate::context::{NOT_IN_A_SERVICE, Shared};
use crate::handler::Verdict;
use crate::heartbeat::Keeper;
use crate::job::{Ended, hand_back_unstarted};

/// Counts a message as waiting for protection while it lives; the receive loops take
/// no new messages meanwhile. The last one to stop waiting clears the health's
/// record of the wait.
struct Waiting<'a>(&'a Shared);

impl<'a> Waiting<'a> {
    fn new(shared: &'a Shared) -> Self {
        shared.awaiting_protection.send_modify(|n| *n += 1);
        Self(shared)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut last = false;
        self.0.awaiting_protection.send_modify(|n| {
            *n = n.saturating_sub(1);
            last = *n == 0;
        });
        if last {
            self.0.health.not_waiting_for_protection();
        }
    }
}

/// Waits for ECS to confirm protection, keeping the message meanwhile. `None`: the
/// job runs without protection, as the task is not part of a service.
///
/// A protection fault must not cost the message a receive: handing it back would have
/// SQS count a delivery each time, and an agent outage would move good messages to
/// the dead-letter queue unworked. So the message is kept, its visibility extended,
/// for as long as protection takes (the health check turns unhealthy when that is
/// long); only a refusal (the task is being replaced), the task leaving its service,
/// or the worker stopping hands it back. A refusal because the task is not part of a
/// service is no reason to stop: such a task is never scaled in, and its jobs run
/// unprotected.
pub(crate) async fn protect(
    shared: &Shared,
    keeper: &mut Keeper,
    id: &str,
) -> Result<Option<ProtectionGuard>, Option<Ended>> {
    if shared.is_unprotected() {
        return Ok(None);
    }
    let _waiting = Waiting::new(shared);
    // Held across attempts, so protection stays wanted between two acquires.
    let _wanted = shared.protection.hold();
    let started = Instant::now();
    loop {
        let stop = shared.stop_receiving.clone();
        let leaving = shared.leaving();
        let lost = keeper.lost.clone();
        let acquired = keeper
            .keep_while(async {
                tokio::select! {
                    biased;
                    () = stop.cancelled() => None,
                    () = leaving => None,
                    () = lost.cancelled() => None,
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
            Some(Ok(guard)) => {
                shared.health.not_waiting_for_protection();
                return Ok(Some(guard));
            }
            Some(Err(AcquireError::Rejected(r))) if r.reason() == NOT_IN_A_SERVICE => {
                shared.work_unprotected(&r);
                return Ok(None);
            }
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
                shared.health.waiting_for_protection(started, e.to_string());
                tracing::warn!(
                    message_id = %id,
                    "{id} - Still waiting for task protection after {}s ({}); keeping the message, receiving no more until protection works",
                    started.elapsed().as_secs(),
                    task_protection::ErrorChain(&e)
                );
            }
        }
    }
}
