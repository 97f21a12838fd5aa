//! The protection state machine, free of I/O.
//!
//! It answers one question, again and again: given whether protection is wanted, what
//! ECS last confirmed and when the last PUT went out, what is the next PUT and when?
//! The driver in [`crate::protection`] does the waiting and the calling.
//!
//! The rules, each from a platform fact:
//! - ECS rate-limits protection calls per account and Region, so PUTs go out only on
//!   idle→busy and busy→idle transitions and to refresh before expiry, never per
//!   holder; and never two within `min_put_interval`.
//! - Every enable PUT resets the expiry to now + duration, so a refresh is just
//!   another enable, timed from the `ExpirationDate` ECS returned.
//! - An idle task that stays protected blocks deployments and scale-in, so release
//!   comes as soon as the maintain window (counted from the last successful enable)
//!   has passed, on a timer, not at some later tick.
//! - A stream of short jobs leaves gaps of a few milliseconds with no holder (between
//!   a delete and the next receive). Releasing in such a gap would cost a disable and
//!   an enable a second later, so a release also waits until no holder has been seen
//!   for `min_put_interval`.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::backend::{Grant, ProtectionError, ProtectionRequest, Rejection};
use crate::settings::ProtectionSettings;

/// First retry delay after a transient failure; doubles up to the check interval.
const BACKOFF_BASE: Duration = Duration::from_millis(200);

/// What the driver should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Send this PUT now.
    Put(ProtectionRequest),
    /// Nothing to do until this instant (or a change in holders); `None` is "until a
    /// change".
    Wait(Option<Instant>),
}

/// What an answer changed, for the driver to log and publish.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Effect {
    /// Protection was confirmed until `expires_at`; `refreshed` when it was already held.
    Protected {
        expires_at: SystemTime,
        refreshed: bool,
    },
    /// Protection was released by a disable PUT.
    Released,
    /// Protection ran out without a refresh.
    Lapsed,
    /// ECS refused.
    Rejected(Rejection),
    /// A transient failure; the next attempt waits `retry_in`.
    Failed {
        error: ProtectionError,
        retry_in: Duration,
    },
}

/// The phase shown to observers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Idle,
    Acquiring,
    Protected,
    Releasing,
    Rejected,
}

#[derive(Debug)]
pub(crate) struct Machine {
    minutes: u16,
    duration: Duration,
    maintain: Duration,
    refresh_lead: Duration,
    min_put_interval: Duration,
    check_interval: Duration,

    wanted: bool,
    /// When ECS's confirmed protection runs out, by our clock.
    expires_at: Option<Instant>,
    /// An enable went out and its fate is unknown: ECS may have applied it.
    in_doubt: bool,
    /// Start of the maintain window: the last successful enable.
    last_enable_ok: Option<Instant>,
    /// Start of the last PUT, for the rate limit.
    last_put_at: Option<Instant>,
    /// Transient failures in a row, and when the next attempt may go.
    failures: u32,
    retry_at: Option<Instant>,
    /// After a rejection, no new attempt before this.
    rejected_until: Option<Instant>,
    /// When the last holder was last seen leaving.
    last_release: Option<Instant>,
}

fn later(a: Option<Instant>, b: Instant) -> Instant {
    a.map_or(b, |a| a.max(b))
}

impl Machine {
    pub(crate) fn new(settings: &ProtectionSettings) -> Self {
        Self {
            minutes: settings.duration_minutes(),
            duration: settings.duration(),
            maintain: settings.maintain_window(),
            refresh_lead: settings.refresh_lead(),
            min_put_interval: settings.min_put_interval(),
            check_interval: settings.check_interval(),
            wanted: false,
            expires_at: None,
            in_doubt: false,
            last_enable_ok: None,
            last_put_at: None,
            failures: 0,
            retry_at: None,
            rejected_until: None,
            last_release: None,
        }
    }

    pub(crate) fn set_wanted(&mut self, wanted: bool) {
        self.wanted = wanted;
    }

    /// The holder count fell to zero at `now` (possibly only for a moment).
    pub(crate) fn note_release(&mut self, now: Instant) {
        self.last_release = Some(now);
    }

    pub(crate) fn is_protected(&self) -> bool {
        self.expires_at.is_some()
    }

    /// Whether ECS may hold protection for this task right now.
    pub(crate) fn might_be_protected(&self) -> bool {
        self.expires_at.is_some() || self.in_doubt
    }

    pub(crate) fn phase(&self, now: Instant) -> Phase {
        if self.rejected_until.is_some_and(|t| t > now) && !self.is_protected() {
            Phase::Rejected
        } else if self.is_protected() {
            if self.wanted {
                Phase::Protected
            } else {
                Phase::Releasing
            }
        } else if self.wanted {
            Phase::Acquiring
        } else {
            Phase::Idle
        }
    }

    /// Protection confirmed earlier ran out at `now` without a refresh.
    pub(crate) fn take_lapse(&mut self, now: Instant) -> Option<Effect> {
        match self.expires_at {
            Some(t) if t <= now => {
                self.expires_at = None;
                Some(Effect::Lapsed)
            }
            _ => None,
        }
    }

    /// The earliest a PUT may start: the rate limit and any retry backoff.
    fn earliest_put(&self, now: Instant) -> Instant {
        let rate = self.last_put_at.map(|t| t + self.min_put_interval);
        later(self.retry_at, later(rate, now))
    }

    /// The next PUT and when. Call [`take_lapse`](Self::take_lapse) first.
    pub(crate) fn poll(&self, now: Instant) -> Next {
        let earliest = self.earliest_put(now);
        let (request, due) = if self.wanted {
            if let Some(until) = self.rejected_until.filter(|t| *t > now) {
                // ECS refused; wait out the cool-down before asking again. Any
                // protection still held runs out on its own.
                return Next::Wait(Some(self.expires_at.map_or(until, |e| e.min(until))));
            }
            let due = self
                .expires_at
                .map_or(now, |e| e.checked_sub(self.refresh_lead).unwrap_or(now));
            (ProtectionRequest::enable(self.minutes), due.max(earliest))
        } else if let Some(expires) = self.expires_at {
            let window_end = self.last_enable_ok.map_or(now, |t| t + self.maintain);
            let quiet_end = self.last_release.map(|t| t + self.min_put_interval);
            let due = later(quiet_end, window_end.max(earliest));
            let due = later(self.rejected_until, due);
            if due >= expires {
                // It runs out before a disable could go: let it lapse, save the call.
                return Next::Wait(Some(expires));
            }
            (ProtectionRequest::disable(), due)
        } else if self.in_doubt {
            // An enable may have been applied after all: make sure it is off.
            (
                ProtectionRequest::disable(),
                later(self.rejected_until, earliest),
            )
        } else {
            return Next::Wait(None);
        };
        if due <= now {
            Next::Put(request)
        } else {
            Next::Wait(Some(self.expires_at.map_or(due, |e| e.min(due))))
        }
    }

    /// Records that `request` starts now.
    pub(crate) fn on_sent(&mut self, now: Instant) {
        self.last_put_at = Some(now);
    }

    /// Whether the next PUT would be a retry after a transient failure.
    pub(crate) fn retrying(&self) -> bool {
        self.failures > 0
    }

    /// Applies the answer to a PUT that started at `sent_at`.
    pub(crate) fn on_answer(
        &mut self,
        now: Instant,
        sent_at: Instant,
        request: ProtectionRequest,
        answer: Result<Grant, ProtectionError>,
    ) -> Effect {
        let answer = answer.and_then(|grant| self.check_grant(request, grant));
        match answer {
            Ok(expiry) => {
                self.failures = 0;
                self.retry_at = None;
                self.rejected_until = None;
                self.in_doubt = false;
                if let Some((expires_at, remaining)) = expiry {
                    let refreshed = self.expires_at.is_some();
                    // Never trust an expiry past what was asked for, counted from when
                    // the request left: clocks can differ.
                    self.expires_at = Some((now + remaining).min(sent_at + self.duration));
                    self.last_enable_ok = Some(now);
                    Effect::Protected {
                        expires_at,
                        refreshed,
                    }
                } else {
                    self.expires_at = None;
                    Effect::Released
                }
            }
            Err(ProtectionError::Rejected(rejection)) => {
                self.failures = 0;
                self.retry_at = None;
                self.rejected_until = Some(now + self.check_interval);
                Effect::Rejected(rejection)
            }
            Err(error) => {
                if request.enabled && error.maybe_applied() {
                    self.in_doubt = true;
                }
                self.failures = self.failures.saturating_add(1);
                let retry_in = self.backoff();
                self.retry_at = Some(now + retry_in);
                Effect::Failed { error, retry_in }
            }
        }
    }

    /// For an enable: the expiry ECS reported and the time left. `None` for a disable.
    fn check_grant(
        &self,
        request: ProtectionRequest,
        grant: Grant,
    ) -> Result<Option<(SystemTime, Duration)>, ProtectionError> {
        let unexpected = |reason: &str| ProtectionError::Malformed {
            status: 200,
            reason: reason.to_owned(),
            excerpt: format!(
                "ProtectionEnabled={} ExpirationDate={:?}",
                grant.enabled,
                grant.expires_at.map(crate::state::rfc3339)
            ),
        };
        match (request.enabled, grant.enabled) {
            (false, false) => Ok(None),
            (false, true) => Err(unexpected("protection still enabled after a disable")),
            (true, false) => Err(unexpected("protection not enabled after an enable")),
            (true, true) => {
                let wall_now = SystemTime::now();
                let expires_at = grant.expires_at.unwrap_or(wall_now + self.duration);
                match expires_at.duration_since(wall_now) {
                    Ok(remaining) if !remaining.is_zero() => {
                        Ok(Some((expires_at, remaining.min(self.duration))))
                    }
                    _ => Err(unexpected("ExpirationDate is not in the future")),
                }
            }
        }
    }

    /// Capped exponential backoff with equal jitter: half fixed, half random.
    fn backoff(&self) -> Duration {
        let exp = self.failures.saturating_sub(1).min(16);
        let full = BACKOFF_BASE
            .saturating_mul(1 << exp)
            .min(self.check_interval.max(BACKOFF_BASE));
        let half = full / 2;
        let jitter_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
        half + Duration::from_millis(rand::random_range(0..=jitter_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ProtectionSettings {
        ProtectionSettings::builder()
            .duration_minutes(1)
            .maintain_percent(10)
            .refresh_percent(80)
            .build()
            .unwrap()
    }

    fn ok(enabled: bool) -> Result<Grant, ProtectionError> {
        Ok(Grant {
            enabled,
            expires_at: enabled.then(|| SystemTime::now() + Duration::from_secs(60)),
            task_arn: None,
        })
    }

    #[test]
    fn idle_machine_waits_forever() {
        let m = Machine::new(&settings());
        assert_eq!(m.poll(Instant::now()), Next::Wait(None));
    }

    #[test]
    fn enable_then_refresh_then_release_at_the_maintain_mark() {
        let t0 = Instant::now();
        let mut m = Machine::new(&settings());
        m.set_wanted(true);
        assert_eq!(m.poll(t0), Next::Put(ProtectionRequest::enable(1)));
        m.on_sent(t0);
        let e = m.on_answer(t0, t0, ProtectionRequest::enable(1), ok(true));
        assert!(matches!(
            e,
            Effect::Protected {
                refreshed: false,
                ..
            }
        ));
        // Refresh at 80 % of 60 s, give or take the wall-clock read.
        let Next::Wait(Some(at)) = m.poll(t0) else {
            panic!("expected a refresh timer")
        };
        let secs = (at - t0).as_secs_f64();
        assert!((47.5..=48.0).contains(&secs), "{secs}");
        m.set_wanted(false);
        assert_eq!(m.poll(t0), Next::Wait(Some(t0 + Duration::from_secs(6))));
        assert_eq!(
            m.poll(t0 + Duration::from_secs(6)),
            Next::Put(ProtectionRequest::disable())
        );
    }

    #[test]
    fn rejection_cools_down_and_transient_backs_off() {
        let t0 = Instant::now();
        let mut m = Machine::new(&settings());
        m.set_wanted(true);
        m.on_sent(t0);
        let rejected = Err(ProtectionError::Rejected(Rejection {
            reason: "DEPLOYMENT_BLOCKED".into(),
            detail: None,
            status: Some(200),
        }));
        m.on_answer(t0, t0, ProtectionRequest::enable(1), rejected);
        assert_eq!(m.phase(t0), Phase::Rejected);
        assert_eq!(m.poll(t0), Next::Wait(Some(t0 + Duration::from_secs(10))));
        let t1 = t0 + Duration::from_secs(10);
        m.on_sent(t1);
        let e = m.on_answer(
            t1,
            t1,
            ProtectionRequest::enable(1),
            Err(ProtectionError::Timeout(Duration::from_secs(8))),
        );
        let Effect::Failed { retry_in, .. } = e else {
            panic!("{e:?}")
        };
        assert!(retry_in >= Duration::from_millis(100) && retry_in <= Duration::from_millis(200));
        assert!(
            m.might_be_protected(),
            "a timed-out enable may have been applied"
        );
        m.set_wanted(false);
        assert!(matches!(m.poll(t1 + Duration::from_secs(1)), Next::Put(r) if !r.enabled));
    }
}
