//! The handle services use: holders, guards, and the background driver.
//!
//! Holders are counted with an atomic, so taking and dropping a guard never waits for
//! the network. A single background task owns the [`Machine`](crate::machine) and is
//! the only caller of the backend, so there is never more than one request in flight;
//! holder changes that happen meanwhile simply shape the next decision.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, OnceCell, broadcast, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::backend::{
    AnyBackend, Backend, BackendConfig, BackendConfigError, ProtectionError, ProtectionRequest,
    Rejection,
};
use crate::machine::{Effect, Machine, Next};
use crate::settings::ProtectionSettings;
use crate::state::{
    AtomicCounters, Counters, Events, Phase, ProtectionEvent, ProtectionState, rfc3339,
};

/// How long a request already in flight at shutdown may still take.
const IN_FLIGHT_GRACE: Duration = Duration::from_millis(500);
/// How long the final disable at shutdown may take, including the wait for the
/// 1 s spacing after the previous PUT.
const SHUTDOWN_BUDGET: Duration = Duration::from_secs(3);

/// An awaited acquire did not end in protection.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum AcquireError {
    /// ECS refused; the task is probably being replaced or is not in a service.
    #[error("task protection rejected: {0}")]
    Rejected(Rejection),
    /// ECS did not confirm protection in time; `last_error` says why, when known.
    #[error("task protection not confirmed within {after:?}{}", .last_error.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    TimedOut {
        /// The acquire timeout.
        after: Duration,
        /// The last transient failure.
        last_error: Option<ProtectionError>,
    },
    /// Protection has been shut down.
    #[error("task protection is shut down")]
    ShutDown,
}

/// What [`TaskProtection::shutdown`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShutdownReport {
    /// The task was not protected; no call was needed.
    NotProtected,
    /// A disable PUT succeeded.
    Released,
    /// The disable PUT failed; protection runs out at its expiry.
    Failed(ProtectionError),
}

impl std::fmt::Display for ShutdownReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotProtected => f.write_str("not protected, nothing to release"),
            Self::Released => f.write_str("protection released"),
            Self::Failed(e) => write!(f, "release failed: {e}"),
        }
    }
}

#[derive(Debug)]
struct Shared {
    settings: ProtectionSettings,
    /// The holder count (low 32 bits) and how many times it fell to zero (high 32
    /// bits), in one word: the driver never sees zero holders without also seeing
    /// the release that made it zero, so the quiet second always starts in time.
    holders: AtomicU64,
    /// Wakes the driver when the holder count crosses zero.
    wake: Notify,
    stop: watch::Sender<bool>,
    state: watch::Sender<ProtectionState>,
    events: broadcast::Sender<ProtectionEvent>,
    counters: AtomicCounters,
}

#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
    driver: std::sync::Mutex<Option<JoinHandle<ShutdownReport>>>,
    report: OnceCell<ShutdownReport>,
}

impl Drop for Handle {
    /// Dropping the last handle stops the driver, which still releases protection.
    fn drop(&mut self) {
        self.shared.stop.send_replace(true);
    }
}

/// Task scale-in protection for this ECS task, held while any guard lives.
///
/// Cheap to clone; all clones share one driver. See the [crate docs](crate) for an
/// example.
#[derive(Debug, Clone)]
pub struct TaskProtection {
    handle: Arc<Handle>,
}

/// One holder of protection: a job, a connection. Dropping it releases the hold
/// without waiting; protection ends once the last guard is gone and the maintain
/// window has passed.
#[must_use = "protection is released as soon as the guard is dropped"]
pub struct ProtectionGuard {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ProtectionGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProtectionGuard")
            .field("holders", &self.shared.holder_count())
            .finish()
    }
}

const COUNT_MASK: u64 = 0xFFFF_FFFF;

/// The holder count in a holders word.
fn count(word: u64) -> u64 {
    word & COUNT_MASK
}

/// How many times the count fell to zero, in a holders word.
fn epoch(word: u64) -> u64 {
    word >> 32
}

impl Drop for ProtectionGuard {
    fn drop(&mut self) {
        let last = self
            .shared
            .holders
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |word| {
                Some(if count(word) == 1 {
                    // The last holder: count 0 and the next epoch, in one step.
                    (epoch(word).wrapping_add(1) & COUNT_MASK) << 32
                } else {
                    word.saturating_sub(1)
                })
            })
            .is_ok_and(|word| count(word) == 1);
        if last {
            self.shared.wake.notify_one();
        }
    }
}

impl TaskProtection {
    /// Starts managing protection through `backend`.
    ///
    /// # Panics
    /// When called outside a tokio runtime, as `tokio::spawn` does.
    #[must_use]
    pub fn start<B: Backend>(backend: B, settings: ProtectionSettings) -> Self {
        let (stop, _) = watch::channel(false);
        let (state, _) = watch::channel(ProtectionState::new(backend.simulated()));
        let (events, _) = broadcast::channel(64);
        let shared = Arc::new(Shared {
            settings,
            holders: AtomicU64::new(0),
            wake: Notify::new(),
            stop,
            state,
            events,
            counters: AtomicCounters::default(),
        });
        tracing::info!("Task protection through {}", backend.describe());
        let driver = tokio::spawn(drive(Arc::clone(&shared), backend));
        Self {
            handle: Arc::new(Handle {
                shared,
                driver: std::sync::Mutex::new(Some(driver)),
                report: OnceCell::new(),
            }),
        }
    }

    /// Builds the backend that `config` selects and starts managing protection.
    ///
    /// # Errors
    /// When the backend cannot be set up: see [`AnyBackend::connect`].
    pub async fn connect(
        config: &BackendConfig,
        settings: ProtectionSettings,
    ) -> Result<Self, BackendConfigError> {
        Ok(Self::start(AnyBackend::connect(config).await?, settings))
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    /// Registers a holder at once and pursues protection in the background.
    ///
    /// Use it where work must not wait for ECS, such as greeting a websocket client.
    pub fn hold(&self) -> ProtectionGuard {
        let shared = self.shared();
        if count(shared.holders.fetch_add(1, Ordering::SeqCst)) == 0 {
            shared.wake.notify_one();
        }
        ProtectionGuard {
            shared: Arc::clone(shared),
        }
    }

    /// Registers a holder and returns once ECS has confirmed protection.
    ///
    /// Returns at once when the task is already protected. Never waits longer than
    /// the acquire timeout.
    ///
    /// # Errors
    /// [`AcquireError::Rejected`] as soon as ECS refuses (or at once while a recent
    /// refusal's cool-down lasts), [`AcquireError::TimedOut`] when ECS cannot be
    /// reached in time, [`AcquireError::ShutDown`] after [`shutdown`](Self::shutdown).
    pub async fn acquire(&self) -> Result<ProtectionGuard, AcquireError> {
        let mut rx = self.shared().state.subscribe();
        let seen = {
            let s = rx.borrow_and_update();
            match s.phase {
                Phase::Stopped => return Err(AcquireError::ShutDown),
                Phase::Rejected => {
                    if let Some(r) = &s.last_rejection {
                        return Err(AcquireError::Rejected(r.clone()));
                    }
                }
                _ => {}
            }
            s.rejections
        };
        let guard = self.hold();
        let after = self.shared().settings.acquire_timeout();
        let deadline = Instant::now() + after;
        loop {
            {
                let s = rx.borrow_and_update();
                if s.protected {
                    return Ok(guard);
                }
                if s.rejections != seen
                    && let Some(r) = &s.last_rejection
                {
                    return Err(AcquireError::Rejected(r.clone()));
                }
                if s.phase == Phase::Stopped {
                    return Err(AcquireError::ShutDown);
                }
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(AcquireError::ShutDown),
                Err(_) => {
                    let last_error = rx.borrow().last_error.clone();
                    return Err(AcquireError::TimedOut { after, last_error });
                }
            }
        }
    }

    /// The number of live guards.
    #[must_use]
    pub fn holders(&self) -> usize {
        usize::try_from(self.shared().holder_count()).unwrap_or(usize::MAX)
    }

    /// A live view of the state, for status pages and tests.
    #[must_use]
    pub fn state(&self) -> watch::Receiver<ProtectionState> {
        self.shared().state.subscribe()
    }

    /// The state right now.
    #[must_use]
    pub fn current(&self) -> ProtectionState {
        self.shared().state.borrow().clone()
    }

    /// A new subscription to protection events. Any number may exist.
    #[must_use]
    pub fn events(&self) -> Events {
        Events::new(self.shared().events.subscribe())
    }

    /// What protection has cost so far.
    #[must_use]
    pub fn counters(&self) -> Counters {
        self.shared().counters.snapshot()
    }

    /// The settings in force.
    #[must_use]
    pub fn settings(&self) -> &ProtectionSettings {
        &self.shared().settings
    }

    /// Stops managing protection and disables it at once, best effort, within
    /// about 3.5 s: a request already in flight gets 0.5 s, and the disable 3 s,
    /// including the 1 s spacing after the previous PUT. A draining task must not stay protected. Holders that remain are
    /// ignored from now on; later calls return the same report.
    pub async fn shutdown(&self) -> ShutdownReport {
        self.handle
            .report
            .get_or_init(|| async {
                self.shared().stop.send_replace(true);
                let driver = self
                    .handle
                    .driver
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take();
                match driver {
                    Some(driver) => driver.await.unwrap_or_else(|e| {
                        ShutdownReport::Failed(ProtectionError::Transport(format!(
                            "the protection driver ended abnormally: {e}"
                        )))
                    }),
                    None => ShutdownReport::NotProtected,
                }
            })
            .await
            .clone()
    }
}

async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

async fn sleep_until(until: Option<Instant>) {
    match until {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

async fn drive<B: Backend>(shared: Arc<Shared>, backend: B) -> ShutdownReport {
    let mut machine = Machine::new(&shared.settings);
    let mut stop = shared.stop.subscribe();
    let mut epoch_seen = 0;
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
        machine.set_wanted(count(word) > 0);
        if let Some(effect) = machine.take_lapse(now) {
            shared.apply(effect, None);
        }
        shared.publish(&machine, now);
        match machine.poll(now) {
            Next::Put(request) => {
                if !request.enabled {
                    // Withdraw the promise before the disable can leave, then look at
                    // the holders once more: a holder arriving now either sees "not
                    // protected" (and waits for a new enable) or is seen here.
                    shared.withdraw();
                    if shared.holder_count() > 0 {
                        continue;
                    }
                }
                send(&shared, &backend, &mut machine, request, &mut stop).await;
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
    shut_down(&shared, &backend, &mut machine).await
}

/// Counts the PUT by kind and records that it leaves now.
fn start_put(shared: &Shared, machine: &mut Machine, request: ProtectionRequest) -> Instant {
    let counters = &shared.counters;
    let now = Instant::now();
    let kind = match (request.enabled, machine.is_protected(now)) {
        (false, _) => &counters.release_puts,
        (true, true) => &counters.refresh_puts,
        (true, false) => &counters.acquire_puts,
    };
    AtomicCounters::bump(kind);
    if machine.retrying() {
        AtomicCounters::bump(&counters.retries);
    }
    machine.on_sent(now, request);
    shared.publish(machine, now);
    now
}

/// Sends one PUT and applies its answer. While it is on the wire the clock still
/// rules: a confirmed protection that runs out meanwhile is published as lapsed.
async fn send<B: Backend>(
    shared: &Shared,
    backend: &B,
    machine: &mut Machine,
    request: ProtectionRequest,
    stop: &mut watch::Receiver<bool>,
) {
    let sent_at = start_put(shared, machine, request);
    let mut timeout = shared.settings.request_timeout();
    let call = backend.update(request);
    tokio::pin!(call);
    let mut stopping = false;
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
            () = stopped(stop), if !stopping => {
                // Shutting down mid-request: let it land if it is quick, then move on
                // to the final disable.
                stopping = true;
                timeout = timeout.min(sent_at.elapsed() + IN_FLIGHT_GRACE);
            }
        }
    };
    let task_arn = result.as_ref().ok().and_then(|g| g.task_arn.clone());
    let now = Instant::now();
    let effect = machine.on_answer(now, result);
    shared.apply(effect, task_arn);
    shared.publish(machine, now);
}

async fn shut_down<B: Backend>(
    shared: &Shared,
    backend: &B,
    machine: &mut Machine,
) -> ShutdownReport {
    machine.set_wanted(false);
    let start = Instant::now();
    if let Some(effect) = machine.take_lapse(start) {
        shared.apply(effect, None);
    }
    let report = if machine.might_be_protected(start) {
        // Keep the 1 s spacing when the budget allows it; a draining task that stays
        // protected blocks the deployment, so past that the disable goes anyway.
        let budget_end = start + SHUTDOWN_BUDGET;
        let spaced = machine.spacing_end(start);
        if spaced < budget_end {
            tokio::time::sleep_until(spaced).await;
        }
        let sent_at = start_put(shared, machine, ProtectionRequest::disable());
        let left = budget_end.saturating_duration_since(sent_at);
        let result = tokio::time::timeout(left, backend.update(ProtectionRequest::disable()))
            .await
            .unwrap_or(Err(ProtectionError::Timeout(left)));
        // The same answer handling as every other request.
        match machine.on_answer(Instant::now(), result) {
            Effect::Released => ShutdownReport::Released,
            Effect::Failed { error, .. } => ShutdownReport::Failed(error),
            Effect::Rejected(r) => ShutdownReport::Failed(ProtectionError::Rejected(r)),
            Effect::Protected { .. } | Effect::Lapsed => {
                ShutdownReport::Failed(ProtectionError::Malformed {
                    status: 200,
                    reason: "protection still enabled after a disable".to_owned(),
                    excerpt: String::new(),
                })
            }
        }
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
        ShutdownReport::Failed(e) => {
            AtomicCounters::bump(&shared.counters.failures);
            tracing::warn!("Task protection release at shutdown failed: {e}");
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
    fn holder_count(&self) -> u64 {
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
        };
        let protected = machine.is_protected(now);
        let expires_at = machine.reported_expiry(now);
        self.state.send_if_modified(|s| {
            let changed =
                s.phase != phase || s.protected != protected || s.expires_at != expires_at;
            s.phase = phase;
            s.protected = protected;
            s.expires_at = expires_at;
            changed
        });
    }

    /// No longer promises protection: a disable is about to leave.
    fn withdraw(&self) {
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
                AtomicCounters::bump(&counters.rejections);
                tracing::warn!("Task protection rejected: {rejection}");
                self.state.send_modify(|s| {
                    s.last_rejection = Some(rejection.clone());
                    s.rejections += 1;
                });
                Some(ProtectionEvent::Rejected(rejection))
            }
            Effect::Failed { error, retry_in } => {
                AtomicCounters::bump(&counters.failures);
                tracing::warn!("Task protection request failed, retrying in {retry_in:?}: {error}");
                self.state.send_modify(|s| s.last_error = Some(error));
                None
            }
        };
        if let Some(event) = event {
            let _ = self.events.send(event);
        }
    }
}
