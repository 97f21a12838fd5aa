//! A service of thousands of tasks in one process, on paused time: the simulator's
//! pure core ([`step`](crate::sim::step), [`api::ecs`](crate::sim::api::ecs) and its
//! token buckets) driven in virtual time, each task a real drain watcher
//! ([`Drain::watch_on`]) sharing one decision through an in-process store, as the
//! service's tasks share a DynamoDB table. No processes and no sockets: a task is
//! ready a few seconds after ECS starts it, passes every health check, holds
//! protection while it is wanted, lets go a while after it starts leaving (its
//! clients moving or its jobs finishing), and exits a second after SIGTERM.
//!
//! It measures what the drain costs the account (its calls per group of actions,
//! against the documented buckets), what it leaves other callers (their throttled
//! calls), how long a scale-in takes, and whether any task flaps (takes work again
//! after letting go while the service never asked for more).

mod api;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use task_protection::drain::{Clock, Drain, DrainSettings, LocalStore, Membership, TaskInfo};

pub use api::{Counts, FleetApi};

use super::buckets::group_of;
use super::effect::{Effect, StopSignal};
use super::model::{CLUSTER, Model, SERVICE, task_arn};
use super::scheduler::step;
use super::settings::Settings;

/// How often the scheduler looks.
const TICK: Duration = Duration::from_secs(1);
/// From ECS's start to RUNNING.
const STARTUP: Duration = Duration::from_secs(5);
/// From SIGTERM to exit.
const EXIT: Duration = Duration::from_secs(1);

/// What to simulate.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// The service, as ECS runs it.
    pub ecs: Settings,
    /// The drain's settings.
    pub drain: DrainSettings,
    /// How long a task takes to let go of protection once it leaves.
    pub let_go_after: Duration,
    /// The share of the drain's calls throttled besides the buckets' own throttling.
    pub throttle: f64,
}

impl FleetConfig {
    /// `tasks` of the websocket service spread over three zones, the drain's default
    /// settings, tasks that let go 30 s after they start leaving, no extra throttling.
    #[must_use]
    pub fn three_zones(tasks: u32) -> Self {
        let mut ecs = Settings::websocket(tasks);
        ecs.zones = vec![
            "us-east-1a".into(),
            "us-east-1b".into(),
            "us-east-1c".into(),
        ];
        Self {
            ecs,
            drain: DrainSettings::default(),
            let_go_after: Duration::from_secs(30),
            throttle: 0.0,
        }
    }
}

/// The task that follows one task's drain (and, holding its subscription, keeps its
/// watcher running until the task exits).
#[derive(Debug)]
struct Member {
    work: tokio::task::JoinHandle<()>,
}

/// What the simulation counts, besides the model's own counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// Tasks that started to leave.
    pub left: u64,
    /// Tasks wanted again after they let go of protection.
    pub flaps: u64,
    /// Tasks wanted again after they started to leave (before letting go).
    pub recalled: u64,
}

/// A running fleet; dropping it stops everything.
#[derive(Debug)]
pub struct Fleet {
    model: Arc<Mutex<Model>>,
    counts: Arc<Mutex<Counts>>,
    tally: Arc<Mutex<Tally>>,
    start: tokio::time::Instant,
    scheduler: tokio::task::JoinHandle<()>,
    members: Arc<Mutex<BTreeMap<String, Member>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Fleet {
    /// Starts the service; its tasks start with the scheduler's first steps.
    #[must_use]
    pub fn start(config: FleetConfig) -> Self {
        let clock = Clock::new();
        let start = tokio::time::Instant::now();
        let model = Arc::new(Mutex::new(Model::new(config.ecs.clone(), clock.now())));
        let counts = Arc::default();
        let tally = Arc::default();
        let members: Arc<Mutex<BTreeMap<String, Member>>> = Arc::default();
        let driver = Driver {
            config,
            clock,
            start,
            model: Arc::clone(&model),
            counts: Arc::clone(&counts),
            tally: Arc::clone(&tally),
            members: Arc::clone(&members),
            store: LocalStore::common(),
        };
        let scheduler = tokio::spawn(driver.run());
        Self {
            model,
            counts,
            tally,
            start,
            scheduler,
            members,
        }
    }

    /// The model, locked.
    pub fn model(&self) -> MutexGuard<'_, Model> {
        lock(&self.model)
    }

    /// Simulation time.
    #[must_use]
    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// The drain's calls so far.
    #[must_use]
    pub fn counts(&self) -> Counts {
        lock(&self.counts).clone()
    }

    /// The drain's calls so far, by group of actions (as the buckets group them).
    #[must_use]
    pub fn calls_by_group(&self) -> BTreeMap<&'static str, u64> {
        let mut out = BTreeMap::new();
        for (op, n) in &lock(&self.counts).calls {
            *out.entry(group_of(op).unwrap_or("ungrouped")).or_default() += n;
        }
        out
    }

    /// What the simulation counted.
    #[must_use]
    pub fn tally(&self) -> Tally {
        lock(&self.tally).clone()
    }

    /// Sets the desired count, as Service Auto Scaling does.
    pub fn set_desired(&self, desired: u32) {
        self.model().set_desired(desired);
    }

    /// Lets `d` of simulation time pass, in steps of the scheduler's tick.
    pub async fn pass(&self, d: Duration) {
        let until = self.now() + d;
        while self.now() < until {
            tokio::time::sleep(TICK).await;
        }
    }

    /// Waits until `done` holds for the model, at most `timeout` of simulation time;
    /// returns how long it took, or `None`.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        done: impl Fn(&Model) -> bool,
    ) -> Option<Duration> {
        let start = self.now();
        loop {
            if done(&self.model()) {
                return Some(self.now() - start);
            }
            if self.now() - start > timeout {
                return None;
            }
            tokio::time::sleep(TICK).await;
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.scheduler.abort();
        for (_, member) in std::mem::take(&mut *lock(&self.members)) {
            member.work.abort();
        }
    }
}

struct Driver {
    config: FleetConfig,
    clock: Clock,
    start: tokio::time::Instant,
    model: Arc<Mutex<Model>>,
    counts: Arc<Mutex<Counts>>,
    tally: Arc<Mutex<Tally>>,
    members: Arc<Mutex<BTreeMap<String, Member>>>,
    store: LocalStore,
}

impl Driver {
    async fn run(self) {
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut starting: Vec<(Duration, String)> = Vec::new();
        let mut exiting: Vec<(Duration, String)> = Vec::new();
        loop {
            ticks.tick().await;
            let now = self.start.elapsed();
            let effects = {
                let mut m = lock(&self.model);
                for (_, id) in starting.extract_if(.., |(at, _)| *at <= now) {
                    m.task_ready(&id, now);
                }
                for (_, id) in exiting.extract_if(.., |(at, _)| *at <= now) {
                    m.process_exited(&id, Some(0), now);
                }
                step(&mut m, now)
            };
            for effect in effects {
                match effect {
                    Effect::Start { task } => {
                        // A port for its target: nothing listens, every check is
                        // answered below.
                        lock(&self.model).assign_port(&task, 1);
                        starting.push((now + STARTUP, task.clone()));
                        self.join(&task);
                    }
                    Effect::ProbeTarget { task, .. } => {
                        lock(&self.model).target_checked(&task, true, now);
                    }
                    Effect::CheckContainer { task, .. } => {
                        lock(&self.model).container_checked(&task, true, now);
                    }
                    Effect::Signal { task, signal } => {
                        let exit = match signal {
                            StopSignal::Term => EXIT,
                            StopSignal::Kill => Duration::ZERO,
                        };
                        exiting.push((now + exit, task.clone()));
                        if let Some(member) = lock(&self.members).remove(&task) {
                            member.work.abort();
                        }
                    }
                    Effect::Register { .. } | Effect::Deregister { .. } | Effect::Remove { .. } => {
                    }
                }
            }
        }
    }

    /// A new task: its drain watcher, and the work that follows it.
    fn join(&self, id: &str) {
        let api = FleetApi {
            model: Arc::clone(&self.model),
            task: id.to_owned(),
            start: self.start,
            throttle: self.config.throttle,
            counts: Arc::clone(&self.counts),
        };
        let drain = Drain::watch_on(
            self.clock,
            api,
            self.store.clone(),
            TaskInfo::new(CLUSTER, task_arn(id), SERVICE),
            self.config.drain.clone(),
        );
        let work = tokio::spawn(work(
            drain.subscribe(),
            Arc::clone(&self.model),
            id.to_owned(),
            self.start,
            self.config.let_go_after,
            Arc::clone(&self.tally),
        ));
        lock(&self.members).insert(id.to_owned(), Member { work });
    }
}

/// A task's work: protected while wanted (as a service under steady load always is),
/// letting go `let_go_after` once leaving; counts the drain's turns.
async fn work(
    mut membership: tokio::sync::watch::Receiver<Membership>,
    model: Arc<Mutex<Model>>,
    id: String,
    start: tokio::time::Instant,
    let_go_after: Duration,
    tally: Arc<Mutex<Tally>>,
) {
    const PROTECTED_FOR: Duration = Duration::from_secs(3_600);
    let protect = |on: bool| {
        let now = start.elapsed();
        if let Some(t) = lock(&model).task_mut(&id) {
            t.protected_until = on.then(|| now + PROTECTED_FOR);
        }
    };
    protect(true);
    let mut leaving_since: Option<tokio::time::Instant> = None;
    let mut let_go = false;
    // Protection is refreshed well before it expires, as the services do.
    let mut refresh = tokio::time::interval(PROTECTED_FOR / 6);
    refresh.tick().await;
    loop {
        if membership.borrow_and_update().is_leaving() {
            let since = *leaving_since.get_or_insert_with(|| {
                lock(&tally).left += 1;
                tokio::time::Instant::now()
            });
            if !let_go {
                tokio::select! {
                    () = tokio::time::sleep_until(since + let_go_after) => {
                        protect(false);
                        let_go = true;
                        continue;
                    }
                    changed = membership.changed() => if changed.is_err() { return },
                }
                continue;
            }
        } else if leaving_since.take().is_some() {
            let mut t = lock(&tally);
            if std::mem::take(&mut let_go) {
                t.flaps += 1;
            } else {
                t.recalled += 1;
            }
            drop(t);
            protect(true);
        }
        tokio::select! {
            changed = membership.changed() => if changed.is_err() { return },
            _ = refresh.tick() => if !let_go { protect(true) },
        }
    }
}
