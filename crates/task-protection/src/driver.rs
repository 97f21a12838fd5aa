//! The background driver: the one task that owns the state machine and calls the
//! backend, so there is never more than one request in flight; holder changes that
//! happen meanwhile simply shape the next decision.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::ErrorChain;
use crate::backend::{Backend, ProtectionError, ProtectionRequest};
use crate::machine::{Effect, Machine, Next};
use crate::protection::{Shared, ShutdownReport, count, epoch};
use crate::state::{Count, Phase, ProtectionEvent, rfc3339};

/// How long shutdown may take in all, for a backend whose requests may land until
/// `landing` after they were sent (6 s for the agent). A request in flight gets until
/// it can no longer reach ECS (at most `landing` after shutdown began); the final
/// disable leaves after it, and after the spacing when the budget allows, and has at
/// least [`FINAL_ANSWER`] to be answered.
pub(crate) fn shutdown_budget(landing: Duration) -> Duration {
    landing + FINAL_ANSWER
}

/// The least time the final disable gets for its answer.
const FINAL_ANSWER: Duration = Duration::from_secs(1);

async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

async fn sleep_until(until: Option<Instant>) {
    match until {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

pub(crate) async fn drive<B: Backend>(shared: Arc<Shared>, backend: B) -> ShutdownReport {
    let landing = backend.landing_window(shared.settings.request_timeout());
    let mut machine = Machine::new(&shared.settings, Instant::now(), landing);
    let mut stop = shared.stop.subscribe();
    let mut epoch_seen = 0;
    // When protection became wanted and was not held: the start of a holder's wait.
    let mut wanted_since: Option<Instant> = None;
    crate::metrics::describe();
    // When the stop was first seen: shutdown's budget counts from then.
    let mut stop_seen = None;
    // When the current drain began, until protection is released: its duration is a
    // metric.
    let mut drain_began: Option<Instant> = None;
    let mut drain_timed = false;
    loop {
        if *stop.borrow_and_update() {
            break;
        }
        let now = Instant::now();
        let word = shared.holders.load(Ordering::SeqCst);
        if epoch(word) != epoch_seen {
            epoch_seen = epoch(word);
            machine.note_release(now);
        }
        machine.set_wanted(count(word) > 0, now);
        let draining = shared.draining.load(Ordering::SeqCst);
        machine.set_draining(draining);
        if !draining {
            (drain_began, drain_timed) = (None, false);
        } else if drain_began.is_none() {
            drain_began = Some(now);
        }
        if let Some(effect) = machine.take_lapse(now) {
            shared.apply(effect, None);
        }
        shared.publish(&machine, now);
        if let Some(began) = drain_began
            && !drain_timed
            && !machine.might_be_protected(now)
        {
            drain_timed = true;
            ::metrics::histogram!(crate::metrics::DRAIN_DURATION)
                .record(now.duration_since(began).as_secs_f64() * 1000.0);
        }
        wanted_since = match (count(word) > 0, machine.is_protected(now), wanted_since) {
            (false, _, _) => None,
            (true, false, None) => Some(now),
            (true, true, Some(since)) => {
                ::metrics::histogram!(crate::metrics::ACQUIRE_LATENCY)
                    .record(now.duration_since(since).as_secs_f64() * 1000.0);
                None
            }
            (true, _, since) => since,
        };
        match machine.poll(now) {
            Next::Put(request) => {
                if !request.enabled {
                    // Withdraw the promise before the disable can leave, then look at
                    // the holders once more: a holder arriving now either sees "not
                    // protected" (and waits for a new enable) or is seen here.
                    shared.withdraw();
                    std::sync::atomic::fence(Ordering::SeqCst);
                    if shared.holder_count() > 0 {
                        tokio::task::yield_now().await;
                        continue;
                    }
                }
                if let Some(at) = send(&shared, &backend, &mut machine, request, &mut stop).await {
                    stop_seen = Some(at);
                    break;
                }
            }
            Next::Wait(until) => {
                tokio::select! {
                    () = sleep_until(until) => {}
                    () = shared.wake.notified() => {}
                    () = stopped(&mut stop) => {}
                }
            }
        }
    }
    let stop_seen = stop_seen.unwrap_or_else(Instant::now);
    shut_down(&shared, &backend, &mut machine, stop_seen).await
}

/// Counts the PUT by kind and records that it leaves now.
fn start_put(shared: &Shared, machine: &mut Machine, request: ProtectionRequest) -> Instant {
    let counters = &shared.counters;
    let now = Instant::now();
    let kind = match (request.enabled, machine.is_protected(now)) {
        (false, _) => Count::ReleasePut,
        (true, true) => Count::RefreshPut,
        (true, false) => Count::AcquirePut,
    };
    counters.bump(kind);
    if machine.retrying() {
        counters.bump(Count::Retry);
    }
    machine.on_sent(now, request);
    shared.publish(machine, now);
    now
}

/// Sends one PUT and applies its answer. While it is on the wire the clock still
/// rules: a confirmed protection that runs out meanwhile is published as lapsed.
/// Returns when a stop was seen meanwhile.
async fn send<B: Backend>(
    shared: &Shared,
    backend: &B,
    machine: &mut Machine,
    request: ProtectionRequest,
    stop: &mut watch::Receiver<bool>,
) -> Option<Instant> {
    let sent_at = start_put(shared, machine, request);
    let mut timeout = shared.settings.request_timeout();
    let call = backend.update(request);
    tokio::pin!(call);
    let mut stopping = None;
    let result = loop {
        tokio::select! {
            r = &mut call => break r,
            () = tokio::time::sleep_until(sent_at + timeout) => {
                break Err(ProtectionError::Timeout(timeout));
            }
            () = sleep_until(machine.lapse_deadline()) => {
                let now = Instant::now();
                if let Some(effect) = machine.take_lapse(now) {
                    shared.apply(effect, None);
                }
                shared.publish(machine, now);
            }
            () = stopped(stop), if stopping.is_none() => {
                // Shutting down mid-request: no promise from now on. Wait for the
                // answer while the request may still reach ECS, not longer: after
                // that, the final disable cannot be overtaken by it.
                stopping = Some(Instant::now());
                shared.stopping();
                timeout = timeout.min(machine.landing_window());
            }
        }
    };
    let task_arn = result
        .as_ref()
        .ok()
        .and_then(|g| g.task_arn().map(str::to_owned));
    let now = Instant::now();
    let effect = machine.on_answer(now, result);
    shared.apply(effect, task_arn);
    if stopping.is_none() {
        shared.publish(machine, now);
    }
    stopping
}

async fn shut_down<B: Backend>(
    shared: &Shared,
    backend: &B,
    machine: &mut Machine,
    start: Instant,
) -> ShutdownReport {
    machine.set_wanted(false, Instant::now());
    if let Some(effect) = machine.take_lapse(start) {
        shared.apply(effect, None);
    }
    shared.stopping();
    let report = if let Some(error) = machine.misconfigured() {
        // Nothing this backend sends reaches ECS.
        ShutdownReport::Failed(error.clone())
    } else if machine.might_be_protected(start) {
        // Wait for the spacing, and for any earlier enable that may still reach ECS,
        // when the budget allows; a draining task that stays protected blocks the
        // deployment, so past that the disable goes anyway.
        let budget_end = start + shutdown_budget(machine.landing_window());
        let latest = budget_end - FINAL_ANSWER;
        let mut report;
        loop {
            let now = Instant::now();
            let send_at = machine.spacing_end(now, false).min(latest.max(now));
            tokio::time::sleep_until(send_at).await;
            let sent_at = start_put(shared, machine, ProtectionRequest::disable());
            let left = budget_end
                .saturating_duration_since(sent_at)
                .max(FINAL_ANSWER);
            let result = tokio::time::timeout(left, backend.update(ProtectionRequest::disable()))
                .await
                .unwrap_or(Err(ProtectionError::Timeout(left)));
            // The same answer handling as every other request.
            let now = Instant::now();
            report = match machine.on_answer(now, result) {
                Effect::Released if machine.might_be_protected(now) => ShutdownReport::Doubtful(
                    "an earlier enable whose answer was lost may still reach ECS after the disable"
                        .to_owned(),
                ),
                Effect::Released => ShutdownReport::Released,
                Effect::Failed { error, .. } | Effect::Misconfigured(error) => {
                    ShutdownReport::Failed(error)
                }
                Effect::Rejected(r) => ShutdownReport::Failed(ProtectionError::Rejected(r)),
                Effect::Protected { .. } | Effect::Lapsed => {
                    ShutdownReport::Failed(ProtectionError::Malformed {
                        status: 200,
                        reason: "protection still enabled after a disable".to_owned(),
                        excerpt: String::new(),
                    })
                }
            };
            // A quick failure (throttled, unreachable) is worth another try while
            // the budget lasts.
            let retry_at = Instant::now() + Duration::from_millis(200);
            let again = matches!(report, ShutdownReport::Failed(_))
                && machine.might_be_protected(Instant::now())
                && machine.spacing_end(retry_at, false) + FINAL_ANSWER <= budget_end;
            if !again {
                break;
            }
            tokio::time::sleep_until(retry_at).await;
        }
        report
    } else {
        ShutdownReport::NotProtected
    };
    match &report {
        ShutdownReport::Released => {
            tracing::info!("Task protection released");
            let _ = shared
                .events
                .send(ProtectionEvent::Unprotected { lapsed: false });
        }
        ShutdownReport::NotProtected => tracing::debug!("Task protection shut down; not protected"),
        ShutdownReport::Doubtful(why) => {
            tracing::warn!("Task protection released, but in doubt: {why}");
        }
        ShutdownReport::Failed(e) => {
            shared.counters.bump(Count::Failure);
            tracing::warn!(
                "Task protection release at shutdown failed: {}",
                ErrorChain(e)
            );
        }
    }
    let now = Instant::now();
    let protected = machine.is_protected(now);
    let expires_at = machine.reported_expiry(now);
    shared.state.send_modify(|s| {
        s.phase = Phase::Stopped;
        s.protected = protected;
        s.expires_at = expires_at;
    });
    report
}

impl Shared {
    pub(crate) fn holder_count(&self) -> u64 {
        count(self.holders.load(Ordering::SeqCst))
    }

    /// Publishes what the machine says now: the phase, and protection only while
    /// ECS has confirmed it and it has not run out.
    fn publish(&self, machine: &Machine, now: Instant) {
        let phase = match machine.phase(now) {
            crate::machine::Phase::Idle => Phase::Idle,
            crate::machine::Phase::Acquiring => Phase::Acquiring,
            crate::machine::Phase::Protected => Phase::Protected,
            crate::machine::Phase::Releasing => Phase::Releasing,
            crate::machine::Phase::Rejected => Phase::Rejected,
            crate::machine::Phase::Misconfigured => Phase::Misconfigured,
        };
        let protected = machine.is_protected(now);
        let expires_at = machine.reported_expiry(now);
        ::metrics::gauge!(crate::metrics::PROTECTED).set(if protected { 1.0 } else { 0.0 });
        self.state.send_if_modified(|s| {
            let changed =
                s.phase != phase || s.protected != protected || s.expires_at != expires_at;
            s.phase = phase;
            s.protected = protected;
            s.expires_at = expires_at;
            changed
        });
    }

    /// Shutting down: no promise from now on, and acquires fail.
    fn stopping(&self) {
        ::metrics::gauge!(crate::metrics::PROTECTED).set(0.0);
        self.state.send_if_modified(|s| {
            let changed = s.protected || s.phase != Phase::Stopped;
            s.protected = false;
            s.expires_at = None;
            s.phase = Phase::Stopped;
            changed
        });
    }

    /// No longer promises protection: a disable is about to leave.
    fn withdraw(&self) {
        ::metrics::gauge!(crate::metrics::PROTECTED).set(0.0);
        self.state.send_if_modified(|s| {
            let changed = s.protected || s.phase != Phase::Releasing;
            s.protected = false;
            s.expires_at = None;
            s.phase = Phase::Releasing;
            changed
        });
    }

    /// Logs an effect, counts it and sends its event. [`publish`](Self::publish)
    /// then shows the state it left.
    fn apply(&self, effect: Effect, task_arn: Option<String>) {
        let counters = &self.counters;
        let event = match effect {
            Effect::Protected {
                expires_at,
                refreshed,
            } => {
                let at = rfc3339(expires_at);
                if refreshed {
                    tracing::info!(expires_at = %at, "Task protection refreshed");
                } else {
                    tracing::info!(expires_at = %at, "Task protection acquired");
                }
                self.state.send_modify(|s| {
                    s.last_error = None;
                    if task_arn.is_some() {
                        s.task_arn = task_arn;
                    }
                });
                Some(ProtectionEvent::Protected {
                    expires_at,
                    refreshed,
                })
            }
            Effect::Released | Effect::Lapsed => {
                let lapsed = effect == Effect::Lapsed;
                if !lapsed {
                    tracing::info!("Task protection released");
                } else if self.holder_count() > 0 {
                    tracing::warn!("Task protection lapsed before it could be refreshed");
                } else {
                    tracing::info!("Task protection released (expired)");
                }
                if !lapsed {
                    self.state.send_modify(|s| s.last_error = None);
                }
                Some(ProtectionEvent::Unprotected { lapsed })
            }
            Effect::Rejected(rejection) => {
                counters.bump(Count::Rejection);
                tracing::warn!("Task protection rejected: {rejection}");
                self.state.send_modify(|s| {
                    s.last_rejection = Some(rejection.clone());
                    s.rejections += 1;
                });
                Some(ProtectionEvent::Rejected(rejection))
            }
            Effect::Failed { error, retry_in } => {
                counters.bump(Count::Failure);
                tracing::warn!(
                    "Task protection request failed, retrying in {retry_in:?}: {}",
                    ErrorChain(&error)
                );
                self.state.send_modify(|s| s.last_error = Some(error));
                None
            }
            Effect::Misconfigured(error) => {
                counters.bump(Count::Failure);
                tracing::error!(
                    "Task protection cannot work, and sends nothing more: {}",
                    ErrorChain(&error)
                );
                self.state.send_modify(|s| s.last_error = Some(error));
                None
            }
        };
        if let Some(event) = event {
            let _ = self.events.send(event);
        }
    }
}
