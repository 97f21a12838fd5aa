//! A world for the core's own tests: the scheduler stepped every 100 ms of a counted
//! clock, tasks that are ready a second after they start and exit half a second after
//! SIGTERM, and health checks that pass unless a test says otherwise. No process, no
//! socket, no sleep.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, UNIX_EPOCH};

use super::effect::{Effect, StopSignal};
use super::model::Model;
use super::scheduler::step;
use super::settings::Settings;

/// The step.
pub(super) const TICK: Duration = Duration::from_millis(100);
/// From start to RUNNING.
const STARTUP: Duration = Duration::from_secs(1);
/// From SIGTERM to exit.
const SHUTDOWN: Duration = Duration::from_millis(500);

/// The world.
pub(super) struct World {
    pub(super) m: Model,
    /// Tasks and when they become ready.
    starting: BTreeMap<String, Duration>,
    /// Tasks and when they exit.
    exiting: BTreeMap<String, Duration>,
    /// Tasks whose container check fails.
    pub(super) sick: BTreeSet<String>,
    /// Tasks whose `/healthz` fails (a leaving websocket task).
    pub(super) refusing: BTreeSet<String>,
    /// Tasks that exit on their own before they are ready.
    pub(super) crashing: BTreeSet<String>,
    /// Every effect, with its time.
    pub(super) log: Vec<(Duration, Effect)>,
    next_port: u16,
}

impl World {
    pub(super) fn new(settings: Settings) -> Self {
        let mut m = Model::new(settings, UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        m.misrouted_port = 1;
        Self {
            m,
            starting: BTreeMap::new(),
            exiting: BTreeMap::new(),
            sick: BTreeSet::new(),
            refusing: BTreeSet::new(),
            crashing: BTreeSet::new(),
            log: Vec::new(),
            next_port: 10_000,
        }
    }

    /// A service started and steady.
    pub(super) fn steady(settings: Settings) -> Self {
        let mut w = Self::new(settings);
        w.run_until(Duration::from_secs(120), |m| m.primary().completed());
        w
    }

    pub(super) fn now(&self) -> Duration {
        self.m.now
    }

    /// One tick.
    pub(super) fn tick(&mut self) {
        let now = self.m.now + TICK;
        let ready: Vec<String> = self
            .starting
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in ready {
            self.starting.remove(&id);
            if self.crashing.contains(&id) {
                self.m.process_exited(&id, Some(1), now);
            } else {
                self.m.task_ready(&id, now);
            }
        }
        let exited: Vec<String> = self
            .exiting
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in exited {
            self.exiting.remove(&id);
            self.m.process_exited(&id, Some(0), now);
        }
        for effect in step(&mut self.m, now) {
            self.apply(&effect, now);
            self.log.push((now, effect));
        }
    }

    fn apply(&mut self, effect: &Effect, now: Duration) {
        match effect {
            Effect::Start { task } => {
                self.next_port += 1;
                self.m.assign_port(task, self.next_port);
                self.starting.insert(task.clone(), now + STARTUP);
            }
            Effect::Signal { task, signal } => {
                let at = if *signal == StopSignal::Kill {
                    now
                } else {
                    now + SHUTDOWN
                };
                self.starting.remove(task);
                self.exiting.entry(task.clone()).or_insert(at);
            }
            Effect::ProbeTarget { task, port, .. } => {
                let ok = *port != self.m.misrouted_port && !self.refusing.contains(task);
                self.m.target_checked(task, ok, now);
            }
            Effect::CheckContainer { task, .. } => {
                let ok = !self.sick.contains(task) && !self.refusing.contains(task);
                self.m.container_checked(task, ok, now);
            }
            Effect::Register { .. } | Effect::Deregister { .. } | Effect::Remove { .. } => {}
        }
    }

    /// Ticks for `d`.
    pub(super) fn run(&mut self, d: Duration) {
        let until = self.m.now + d;
        while self.m.now < until {
            self.tick();
        }
    }

    /// Ticks until `done`, at most `limit`; panics past it.
    pub(super) fn run_until(&mut self, limit: Duration, done: impl Fn(&Model) -> bool) -> Duration {
        let start = self.m.now;
        while !done(&self.m) {
            assert!(
                self.m.now - start < limit,
                "not within {limit:?}: {:#?}",
                self.summary()
            );
            self.tick();
        }
        self.m.now - start
    }

    /// Ticks for `d`, checking `invariant` at every tick.
    pub(super) fn run_checking(
        &mut self,
        d: Duration,
        invariant: impl Fn(&Model) -> Result<(), String>,
    ) {
        let until = self.m.now + d;
        while self.m.now < until {
            self.tick();
            if let Err(why) = invariant(&self.m) {
                panic!("at {:?}: {why}: {:#?}", self.m.now, self.summary());
            }
        }
    }

    /// Ids of tasks ECS wants, oldest first.
    pub(super) fn wanted(&self) -> Vec<String> {
        self.m.wanted().map(|t| t.id.clone()).collect()
    }

    /// Protects `id` for an hour.
    pub(super) fn protect(&mut self, id: &str) {
        let until = self.m.now + Duration::from_secs(3600);
        if let Some(t) = self.m.task_mut(id) {
            t.protected_until = Some(until);
        }
    }

    /// Releases `id`'s protection.
    pub(super) fn release(&mut self, id: &str) {
        if let Some(t) = self.m.task_mut(id) {
            t.protected_until = None;
        }
    }

    pub(super) fn summary(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .m
            .live_deployments()
            .map(|d| {
                format!(
                    "{}{} {} {} failures={} stage={:?}",
                    d.id,
                    if d.id == self.m.primary { "*" } else { "" },
                    d.rollout.as_str(),
                    d.progress.as_str(),
                    d.failures,
                    d.stage.map(|(s, _)| s)
                )
            })
            .collect();
        out.extend(self.m.tasks.iter().filter(|t| t.alive()).map(|t| {
            format!(
                "{} {} {} stopping={} target={:?} health={:?} zone={} replacing={:?}",
                &t.id[24..],
                t.deployment,
                t.status.as_str(),
                t.stopping,
                t.target_state(),
                t.health_status(),
                t.zone,
                t.replacing
            )
        }));
        out.extend(self.m.events.iter().rev().take(6).map(|(_, e)| e.clone()));
        out
    }
}
