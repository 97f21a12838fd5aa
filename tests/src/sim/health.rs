//! The two health checks ECS acts on, as state machines fed with each check's result:
//! the target group's (`GET /healthz` on the task's port, by the load balancer) and
//! the essential container's (the task's own binary run with the task definition's
//! `healthCheck` command, by the agent). The checks themselves are run by the driver;
//! this module only says when one is due and what its results make of the task.

use std::time::Duration;

use super::settings::{ContainerCheck, TargetCheck};

/// A target's state in its target group, as `DescribeTargetHealth` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetState {
    /// Registered, not yet `healthy` passes in a row.
    Initial,
    /// Passed `healthy` checks in a row (and not failed `unhealthy` since).
    Healthy,
    /// Failed `unhealthy` checks in a row.
    Unhealthy,
    /// Deregistering: no new connections; checks stop.
    Draining,
}

impl TargetState {
    /// ELB's spelling.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Initial => "initial",
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
            Self::Draining => "draining",
        }
    }
}

/// Which of the service's target groups a target is in: production traffic goes to
/// one, the other (blue/green's alternate target group) gets none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetGroupRole {
    /// The production listener's.
    Production,
    /// The alternate one, during a blue/green deployment.
    Alternate,
}

/// A task's registration in the target group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Its port.
    pub port: u16,
    /// Its state.
    pub state: TargetState,
    /// Which target group.
    pub group: TargetGroupRole,
    /// Passes in a row.
    pub passed: u32,
    /// Failures in a row.
    pub failed: u32,
    /// When the next check is due.
    pub next_check: Duration,
    /// A check is under way.
    pub checking: bool,
    /// When it was registered.
    pub registered_at: Duration,
}

impl Target {
    /// Registered at `now`; the first check one interval later.
    #[must_use]
    pub fn registered(
        port: u16,
        group: TargetGroupRole,
        check: &TargetCheck,
        now: Duration,
    ) -> Self {
        Self {
            port,
            state: TargetState::Initial,
            group,
            passed: 0,
            failed: 0,
            next_check: now + check.interval,
            checking: false,
            registered_at: now,
        }
    }

    /// Whether a check is due at `now`; if so, it is under way.
    pub fn check_due(&mut self, check: &TargetCheck, now: Duration) -> bool {
        if self.state == TargetState::Draining || self.checking || now < self.next_check {
            return false;
        }
        self.checking = true;
        self.next_check = now + check.interval;
        true
    }

    /// One check's result. Thresholds as ELB documents them: `healthy` passes in a
    /// row make a target healthy, `unhealthy` failures in a row unhealthy.
    pub fn checked(&mut self, check: &TargetCheck, ok: bool) {
        self.checking = false;
        if self.state == TargetState::Draining {
            return;
        }
        if ok {
            self.passed += 1;
            self.failed = 0;
            if self.passed >= check.healthy {
                self.state = TargetState::Healthy;
            }
        } else {
            self.failed += 1;
            self.passed = 0;
            if self.failed >= check.unhealthy {
                self.state = TargetState::Unhealthy;
            }
        }
    }
}

/// A container's health, as ECS reports it (`healthStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// No check defined, or not yet a verdict.
    Unknown,
    /// The last check passed.
    Healthy,
    /// `retries` checks in a row failed (after the start period).
    Unhealthy,
}

impl Health {
    /// ECS's spelling.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "UNKNOWN",
            Self::Healthy => "HEALTHY",
            Self::Unhealthy => "UNHEALTHY",
        }
    }
}

/// The essential container's health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerHealth {
    /// The verdict.
    pub status: Health,
    /// Since when.
    pub since: Duration,
    /// Failures in a row that count.
    pub failed: u32,
    /// When the container started (the start period counts from it).
    pub started: Duration,
    /// When the next check is due.
    pub next_check: Duration,
    /// A check is under way.
    pub checking: bool,
    /// Checks run, and how many failed.
    pub runs: u64,
    /// Checks that failed.
    pub failures: u64,
}

impl ContainerHealth {
    /// A container started at `now`: UNKNOWN, the first check one interval later
    /// (Docker runs the first check `interval` after the start).
    #[must_use]
    pub fn started(check: &ContainerCheck, now: Duration) -> Self {
        Self {
            status: Health::Unknown,
            since: now,
            failed: 0,
            started: now,
            next_check: now + check.interval,
            checking: false,
            runs: 0,
            failures: 0,
        }
    }

    /// Whether a check is due at `now`; if so, it is under way. Checks never overlap.
    pub fn check_due(&mut self, now: Duration) -> bool {
        if self.checking || now < self.next_check {
            return false;
        }
        self.checking = true;
        true
    }

    /// One check's result at `now`. A pass makes the container HEALTHY (and ends the
    /// start period); a failure during the start period does not count; `retries`
    /// counted failures in a row make it UNHEALTHY (the task definition reference,
    /// `HealthCheck`).
    pub fn checked(&mut self, check: &ContainerCheck, ok: bool, now: Duration) {
        self.checking = false;
        self.runs += 1;
        self.next_check = now + check.interval;
        let before = self.status;
        if ok {
            self.failed = 0;
            self.status = Health::Healthy;
        } else {
            self.failures += 1;
            let in_start_period =
                self.status == Health::Unknown && now < self.started + check.start_period;
            if !in_start_period {
                self.failed += 1;
                if self.failed >= check.retries {
                    self.status = Health::Unhealthy;
                }
            }
        }
        if self.status != before {
            self.since = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn a_target_is_healthy_after_the_healthy_threshold_and_unhealthy_after_the_other() {
        let check = TargetCheck::deployed();
        let mut t = Target::registered(1, TargetGroupRole::Production, &check, s(0));
        assert!(!t.check_due(&check, s(4)));
        assert!(t.check_due(&check, s(5)));
        // Under way: not due again until it is back.
        assert!(!t.check_due(&check, s(11)));
        t.checked(&check, true);
        assert_eq!(t.state, TargetState::Initial);
        assert!(t.check_due(&check, s(11)));
        t.checked(&check, true);
        assert_eq!(t.state, TargetState::Healthy);
        t.checked(&check, false);
        assert_eq!(t.state, TargetState::Healthy);
        t.checked(&check, false);
        assert_eq!(t.state, TargetState::Unhealthy);
        // A target that never passes goes from initial to unhealthy.
        let mut t = Target::registered(1, TargetGroupRole::Alternate, &check, s(0));
        t.checked(&check, false);
        t.checked(&check, false);
        assert_eq!(t.state, TargetState::Unhealthy);
        t.state = TargetState::Draining;
        assert!(!t.check_due(&check, s(100)));
    }

    #[test]
    fn a_container_is_unhealthy_after_its_retries_outside_the_start_period() {
        let check = ContainerCheck::deployed();
        let mut h = ContainerHealth::started(&check, s(0));
        assert!(!h.check_due(s(29)));
        assert!(h.check_due(s(30)));
        // Past the start period: failures count.
        h.checked(&check, false, s(30));
        h.checked(&check, false, s(60));
        assert_eq!(h.status, Health::Unknown);
        h.checked(&check, false, s(90));
        assert_eq!(h.status, Health::Unhealthy);
        assert_eq!(h.since, s(90));
        h.checked(&check, true, s(120));
        assert_eq!(h.status, Health::Healthy);
    }

    #[test]
    fn failures_in_the_start_period_do_not_count_until_a_pass_ends_it() {
        let check = ContainerCheck {
            interval: s(1),
            start_period: s(10),
            ..ContainerCheck::deployed()
        };
        let mut h = ContainerHealth::started(&check, s(0));
        for t in 1..=5 {
            h.checked(&check, false, s(t));
        }
        assert_eq!((h.status, h.failed), (Health::Unknown, 0));
        h.checked(&check, true, s(6));
        assert_eq!(h.status, Health::Healthy);
        // The start period is over once it passed: failures count from now on.
        for t in 7..=9 {
            h.checked(&check, false, s(t));
        }
        assert_eq!(h.status, Health::Unhealthy);
    }
}
