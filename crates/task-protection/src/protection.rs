//! The handle services use: holders and guards.
//!
//! Holders are counted with an atomic, so taking and dropping a guard never waits for
//! the network. A single background task, the [driver](crate::driver), owns the
//! state machine and is the only caller of the backend.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, OnceCell, broadcast, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::backend::{
    AnyBackend, Backend, BackendConfig, BackendConfigError, ProtectionError, Rejection,
};
use crate::settings::ProtectionSettings;
use crate::state::{AtomicCounters, Counters, Events, Phase, ProtectionEvent, ProtectionState};

/// An awaited acquire did not end in protection.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum AcquireError {
    /// ECS refused; the task is probably being replaced or is not in a service.
    #[error("task protection rejected: {0}")]
    Rejected(Rejection),
    /// ECS did not confirm protection in time; `last_error`, the error's source,
    /// says why, when known.
    #[error("task protection not confirmed within {after:?}")]
    TimedOut {
        /// The acquire timeout.
        after: Duration,
        /// The last transient failure.
        #[source]
        last_error: Option<ProtectionError>,
    },
    /// The backend is misconfigured (the agent URI leads elsewhere): no protection
    /// can be had, and none is asked for any more.
    #[error("task protection cannot work")]
    Misconfigured(#[source] ProtectionError),
    /// Protection has been shut down.
    #[error("task protection is shut down")]
    ShutDown,
    /// The task is leaving its service ([`TaskProtection::drain`]): it takes on no
    /// new work.
    #[error("the task is leaving its service and takes no new work")]
    Draining,
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
    /// The disable was confirmed, but an earlier request whose answer was lost may
    /// still reach ECS after it (why, in words): the task may stay protected until
    /// that protection expires.
    Doubtful(String),
}

impl std::fmt::Display for ShutdownReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotProtected => f.write_str("not protected, nothing to release"),
            Self::Released => f.write_str("protection released"),
            Self::Failed(e) => write!(f, "release failed: {}", crate::ErrorChain(e)),
            Self::Doubtful(why) => write!(f, "released, in doubt: {why}"),
        }
    }
}

/// What the handles, the guards and the driver share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) settings: ProtectionSettings,
    /// The holder count (low 32 bits) and how many times it fell to zero (high 32
    /// bits), in one word: the driver never sees zero holders without also seeing
    /// the release that made it zero, so the quiet second always starts in time.
    pub(crate) holders: AtomicU64,
    /// Wakes the driver when the holder count crosses zero.
    pub(crate) wake: Notify,
    pub(crate) stop: watch::Sender<bool>,
    /// The task is leaving its service: no new holders, and no lingering once the
    /// last one has gone.
    pub(crate) draining: AtomicBool,
    pub(crate) state: watch::Sender<ProtectionState>,
    pub(crate) events: broadcast::Sender<ProtectionEvent>,
    pub(crate) counters: AtomicCounters,
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

/// The running state machines of this process, by backend identity: one per task.
static RUNNING: std::sync::Mutex<Vec<(String, std::sync::Weak<Handle>)>> =
    std::sync::Mutex::new(Vec::new());

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
pub(crate) fn count(word: u64) -> u64 {
    word & COUNT_MASK
}

/// How many times the count fell to zero, in a holders word.
pub(crate) fn epoch(word: u64) -> u64 {
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
    /// Protection is per task, so there is one state machine per task in a process:
    /// when a `TaskProtection` whose backend has the same
    /// [`identity`](Backend::identity) is already running here (say, the worker loop
    /// started one and the HTTP layer starts another from the same environment), the
    /// new handle shares it, and a line says so (a warning when the settings differ:
    /// the running ones stay). Two state machines for one task would release each
    /// other's protection. Across the containers of a task, see the crate docs.
    ///
    /// # Panics
    /// When called outside a tokio runtime, as `tokio::spawn` does.
    #[must_use]
    pub fn start<B: Backend>(backend: B, settings: ProtectionSettings) -> Self {
        let Some(identity) = backend.identity() else {
            return Self::spawn(backend, settings);
        };
        let mut running = RUNNING
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        running.retain(|(_, handle)| handle.strong_count() > 0);
        let live = running
            .iter()
            .filter(|(id, _)| *id == identity)
            .find_map(|(_, handle)| handle.upgrade())
            .filter(|handle| !*handle.shared.stop.borrow());
        if let Some(handle) = live {
            if handle.shared.settings == settings {
                tracing::info!(
                    "Task protection through {} is already running in this process; sharing it",
                    backend.describe()
                );
            } else {
                tracing::warn!(
                    "Task protection through {} is already running in this process with other \
                     settings; sharing it, with its settings: one task has one protection",
                    backend.describe()
                );
            }
            return Self { handle };
        }
        let protection = Self::spawn(backend, settings);
        running.retain(|(id, _)| *id != identity);
        running.push((identity, Arc::downgrade(&protection.handle)));
        protection
    }

    fn spawn<B: Backend>(backend: B, settings: ProtectionSettings) -> Self {
        let (stop, _) = watch::channel(false);
        let (state, _) = watch::channel(ProtectionState::new(backend.simulated()));
        let (events, _) = broadcast::channel(64);
        let shared = Arc::new(Shared {
            settings,
            holders: AtomicU64::new(0),
            wake: Notify::new(),
            stop,
            draining: AtomicBool::new(false),
            state,
            events,
            counters: AtomicCounters::default(),
        });
        tracing::info!("Task protection through {}", backend.describe());
        let driver = tokio::spawn(crate::driver::drive(Arc::clone(&shared), backend));
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

    /// Registers a holder at once, unless the task is leaving its service
    /// ([`drain`](Self::drain)) or protection is shut down: then `None`, and the work
    /// should go elsewhere.
    ///
    /// Use it where new work arrives, such as a websocket upgrade or an HTTP request.
    #[must_use]
    pub fn try_hold(&self) -> Option<ProtectionGuard> {
        let guard = self.hold();
        // Pairs with `drain`: either the drain sees this holder, or this sees the drain.
        std::sync::atomic::fence(Ordering::SeqCst);
        (!self.refuses_new_holders()).then_some(guard)
    }

    fn refuses_new_holders(&self) -> bool {
        self.shared().draining.load(Ordering::SeqCst) || *self.shared().stop.borrow()
    }

    /// The task is leaving its service (a scale-in or a deployment wants it gone):
    /// from now on [`try_hold`](Self::try_hold) and [`acquire`](Self::acquire) refuse
    /// new holders, the holders there are keep their protection, and protection is
    /// released as soon as the last of them has gone, without the maintain window.
    /// [`hold`](Self::hold) still registers: it is for work already taken on.
    pub fn drain(&self) {
        if !self.shared().draining.swap(true, Ordering::SeqCst) {
            tracing::info!(
                holders = self.holders(),
                "Draining: no new holders; protection is released when the last one has gone"
            );
            self.shared().wake.notify_one();
        }
    }

    /// The task is wanted again: new holders are welcome, and releases wait for the
    /// maintain window as before.
    pub fn undrain(&self) {
        if self.shared().draining.swap(false, Ordering::SeqCst) {
            tracing::info!("No longer draining: taking new holders again");
            self.shared().wake.notify_one();
        }
    }

    /// Whether [`drain`](Self::drain) is in force.
    #[must_use]
    pub fn is_draining(&self) -> bool {
        self.shared().draining.load(Ordering::SeqCst)
    }

    /// Registers a holder and returns once ECS has confirmed protection.
    ///
    /// Returns at once when the task is already protected. Never waits longer than
    /// the acquire timeout.
    ///
    /// # Errors
    /// [`AcquireError::Rejected`] as soon as ECS refuses (or at once while a recent
    /// refusal's cool-down lasts), [`AcquireError::TimedOut`] when ECS cannot be
    /// reached in time, [`AcquireError::ShutDown`] after [`shutdown`](Self::shutdown),
    /// [`AcquireError::Draining`] while the task is leaving ([`drain`](Self::drain)).
    pub async fn acquire(&self) -> Result<ProtectionGuard, AcquireError> {
        let mut rx = self.shared().state.subscribe();
        let seen = {
            let s = rx.borrow_and_update();
            match s.phase {
                Phase::Stopped => return Err(AcquireError::ShutDown),
                Phase::Misconfigured => {
                    if let Some(e) = &s.last_error {
                        return Err(AcquireError::Misconfigured(e.clone()));
                    }
                }
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
        // Pairs with the driver's fence between withdrawing the promise and looking
        // at the holders: one of the two sides sees the other.
        std::sync::atomic::fence(Ordering::SeqCst);
        if *self.shared().stop.borrow() {
            return Err(AcquireError::ShutDown);
        }
        if self.shared().draining.load(Ordering::SeqCst) {
            return Err(AcquireError::Draining);
        }
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
                if s.phase == Phase::Misconfigured
                    && let Some(e) = &s.last_error
                {
                    return Err(AcquireError::Misconfigured(e.clone()));
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

    /// Stops managing protection and disables it at once, best effort, within the
    /// backend's landing window and a second: 6 s with the agent
    /// ([`Backend::landing_window`]). Usually that is one round trip to the agent; the
    /// rest is for the worst case: a request still in flight gets until it can no
    /// longer reach ECS (the agent gives up on its own ECS call about 4 s after it was
    /// sent), and the disable leaves after it, and after the 1 s spacing, so that
    /// nothing sent earlier can protect the task again after the release. A draining task must not
    /// stay protected. Holders that remain are ignored from now on; later calls return
    /// the same report.
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
                        ShutdownReport::Failed(
                            ProtectionError::transport("the protection driver ended abnormally")
                                .caused_by(e),
                        )
                    }),
                    None => ShutdownReport::NotProtected,
                }
            })
            .await
            .clone()
    }
}
