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

/// How long the agent may still be working on a request this client gave up on: its
/// own ECS call has a budget of about 4 s. No other PUT leaves before then, so an
/// abandoned request can never reach ECS after a later one.
pub(crate) const AGENT_CALL_BUDGET: Duration = Duration::from_secs(5);

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
    /// ECS refused an enable.
    Rejected(Rejection),
    /// The request failed; the next attempt of its kind waits `retry_in`.
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

/// What ECS may hold for this task, as far as its answers tell.
///
/// Only a confirmed answer says what ECS did; a timeout, a 5xx or an unreadable
/// answer leaves ECS's state unknown, after a disable as much as after an enable.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Ecs {
    /// Confirmed off, or never turned on by this process.
    Off,
    /// Confirmed on. It lasts at least until `until` (counted from when the PUT left,
    /// so a clock ahead of ECS's cannot stretch it) and ends by itself by `at_most`.
    On {
        until: Instant,
        at_most: Instant,
        reported: SystemTime,
    },
    /// A change whose outcome is unknown: ECS may hold protection, at the latest
    /// until `at_most`. Nothing can be promised to a holder.
    Unknown { at_most: Instant },
}

impl Ecs {
    /// The latest ECS may still hold protection, if it may at all.
    fn at_most(self) -> Option<Instant> {
        match self {
            Self::Off => None,
            Self::On { at_most, .. } | Self::Unknown { at_most } => Some(at_most),
        }
    }

    /// This state with its time bounds applied at `now`, and whether a confirmed
    /// protection ran out in the process.
    fn aged(self, now: Instant) -> (Self, bool) {
        match self {
            Self::On { until, at_most, .. } if until <= now => {
                if at_most > now {
                    (Self::Unknown { at_most }, true)
                } else {
                    (Self::Off, true)
                }
            }
            Self::Unknown { at_most } if at_most <= now => (Self::Off, false),
            other => (other, false),
        }
    }
}

/// A PUT on the wire: what it asked, when it left, and ECS's state before it.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    request: ProtectionRequest,
    sent_at: Instant,
    before: Ecs,
}

#[derive(Debug)]
pub(crate) struct Machine {
    minutes: u16,
    duration: Duration,
    maintain: Duration,
    refresh_lead: Duration,
    min_put_interval: Duration,
    check_interval: Duration,
    request_timeout: Duration,

    wanted: bool,
    /// The task is leaving its service: release as soon as nobody holds, without the
    /// maintain window or the quiet second.
    draining: bool,
    ecs: Ecs,
    in_flight: Option<InFlight>,
    /// Start of the maintain window: the last successful enable.
    last_enable_ok: Option<Instant>,
    /// Start of the last PUT, for the rate limit.
    last_put_at: Option<Instant>,
    /// Failures in a row, and when the next request of the failed kind (enable or
    /// disable) may go. A request of the other kind only waits for the spacing: a
    /// holder arriving after a failed release must not wait out the release's backoff.
    failures: u32,
    retry: Option<(bool, Instant)>,
    /// After ECS refused an enable, no new enable before this. Never gates a release.
    rejected_until: Option<Instant>,
    /// After a request timed out on this side, no PUT before the agent has surely
    /// given up on it too (see [`AGENT_CALL_BUDGET`]).
    abandoned_until: Option<Instant>,
    /// When the last holder was last seen leaving.
    last_release: Option<Instant>,
}

fn later(a: Option<Instant>, b: Instant) -> Instant {
    a.map_or(b, |a| a.max(b))
}

fn sooner(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl Machine {
    pub(crate) fn new(settings: &ProtectionSettings) -> Self {
        Self {
            minutes: settings.duration_minutes(),
            duration: settings.duration(),
            maintain: settings.maintain_window(),
            // A refresh must be able to take its whole timeout, plus the spacing,
            // before the expiry; with a lead shorter than that it would lapse.
            refresh_lead: settings
                .refresh_lead()
                .max(settings.request_timeout() + settings.min_put_interval())
                .min(settings.duration() / 2),
            min_put_interval: settings.min_put_interval(),
            check_interval: settings.check_interval(),
            request_timeout: settings.request_timeout(),
            wanted: false,
            draining: false,
            ecs: Ecs::Off,
            in_flight: None,
            last_enable_ok: None,
            last_put_at: None,
            failures: 0,
            retry: None,
            rejected_until: None,
            abandoned_until: None,
            last_release: None,
        }
    }

    pub(crate) fn set_wanted(&mut self, wanted: bool) {
        self.wanted = wanted;
    }

    pub(crate) fn set_draining(&mut self, draining: bool) {
        self.draining = draining;
    }

    /// The holder count fell to zero at `now` (possibly only for a moment).
    pub(crate) fn note_release(&mut self, now: Instant) {
        self.last_release = Some(now);
    }

    /// Whether ECS has confirmed protection that lasts past `now`: the only state in
    /// which a holder may be told it is protected.
    pub(crate) fn is_protected(&self, now: Instant) -> bool {
        matches!(self.ecs, Ecs::On { until, .. } if until > now)
    }

    /// Whether ECS may hold protection for this task right now.
    pub(crate) fn might_be_protected(&self, now: Instant) -> bool {
        self.ecs.at_most().is_some_and(|t| t > now)
    }

    /// The expiry ECS reported for the protection it confirmed, while it lasts.
    pub(crate) fn reported_expiry(&self, now: Instant) -> Option<SystemTime> {
        match self.ecs {
            Ecs::On {
                until, reported, ..
            } if until > now => Some(reported),
            _ => None,
        }
    }

    pub(crate) fn phase(&self, now: Instant) -> Phase {
        let protected = self.is_protected(now);
        if self.rejected_until.is_some_and(|t| t > now) && !protected {
            Phase::Rejected
        } else if self.wanted {
            if protected {
                Phase::Protected
            } else {
                Phase::Acquiring
            }
        } else if self.might_be_protected(now) || self.in_flight.is_some() {
            Phase::Releasing
        } else {
            Phase::Idle
        }
    }

    /// Applies the clock to what ECS may hold: a confirmed protection runs out at its
    /// expiry whatever is on the wire, and doubt ends at its bound.
    pub(crate) fn take_lapse(&mut self, now: Instant) -> Option<Effect> {
        let (ecs, lapsed) = self.ecs.aged(now);
        self.ecs = ecs;
        lapsed.then_some(Effect::Lapsed)
    }

    /// When the clock next changes what ECS may hold.
    pub(crate) fn lapse_deadline(&self) -> Option<Instant> {
        match self.ecs {
            Ecs::Off => None,
            Ecs::On { until, .. } => Some(until),
            Ecs::Unknown { at_most } => Some(at_most),
        }
    }

    /// The earliest the next PUT may start for the 1 s spacing alone.
    pub(crate) fn spacing_end(&self, now: Instant) -> Instant {
        later(
            self.abandoned_until,
            later(self.last_put_at.map(|t| t + self.min_put_interval), now),
        )
    }

    /// The next PUT and when. Call [`take_lapse`](Self::take_lapse) first.
    pub(crate) fn poll(&self, now: Instant) -> Next {
        let cool_down = self.rejected_until.filter(|t| *t > now);
        // Wake for whatever changes the published state even when no PUT is due.
        let wake = sooner(self.lapse_deadline(), cool_down);
        if self.in_flight.is_some() {
            return Next::Wait(wake);
        }
        let backoff = |enabled: bool| {
            self.retry
                .filter(|(kind, _)| *kind == enabled)
                .map(|(_, at)| at)
        };
        let spacing = self.spacing_end(now);
        let (request, due) = if self.wanted {
            if cool_down.is_some() {
                // ECS refused; wait out the cool-down before asking again. Any
                // protection still held runs out on its own.
                return Next::Wait(wake);
            }
            let due = match self.ecs {
                Ecs::On { until, .. } => until.checked_sub(self.refresh_lead).unwrap_or(now),
                // Wanted and unknown: only a confirmed enable ends the doubt.
                Ecs::Off | Ecs::Unknown { .. } => now,
            };
            (
                ProtectionRequest::enable(self.minutes),
                later(backoff(true), due.max(spacing)),
            )
        } else {
            if self.ecs.at_most().is_none() {
                return Next::Wait(wake);
            }
            // A leaving task lets go as soon as nobody holds: the maintain window and
            // the quiet second only save calls for work that may still come.
            let (window_end, quiet_end) = if self.draining {
                (now, None)
            } else {
                (
                    self.last_enable_ok.map_or(now, |t| t + self.maintain),
                    self.last_release.map(|t| t + self.min_put_interval),
                )
            };
            let due = later(backoff(false), later(quiet_end, window_end.max(spacing)));
            // A disable due at or after `bound` never goes: the bound passes first
            // and the protection lapses by itself, which saves the call.
            (ProtectionRequest::disable(), due)
        };
        if due <= now {
            Next::Put(request)
        } else {
            Next::Wait(sooner(Some(due), wake))
        }
    }

    /// Records that `request` leaves now. Until its answer, a disable leaves ECS's
    /// state unknown; an enable cannot shorten a confirmed protection.
    pub(crate) fn on_sent(&mut self, now: Instant, request: ProtectionRequest) {
        self.last_put_at = Some(now);
        let before = self.ecs;
        self.ecs = match (request.enabled, before) {
            (true, Ecs::On { .. }) | (false, Ecs::Off) => before,
            (true, _) => Ecs::Unknown {
                at_most: later(before.at_most(), now + self.request_timeout + self.duration),
            },
            (false, Ecs::On { at_most, .. } | Ecs::Unknown { at_most }) => Ecs::Unknown { at_most },
        };
        self.in_flight = Some(InFlight {
            request,
            sent_at: now,
            before,
        });
    }

    /// Whether the next PUT would be a retry after a failure.
    pub(crate) fn retrying(&self) -> bool {
        self.failures > 0
    }

    /// Applies the answer to the PUT in flight.
    pub(crate) fn on_answer(
        &mut self,
        now: Instant,
        answer: Result<Grant, ProtectionError>,
    ) -> Effect {
        let flight = self.in_flight.take().unwrap_or(InFlight {
            request: ProtectionRequest::disable(),
            sent_at: now,
            before: self.ecs,
        });
        let request = flight.request;
        let answer = answer.and_then(|grant| self.check_grant(request, grant));
        match answer {
            Ok(Some((reported, remaining))) => {
                self.failures = 0;
                self.retry = None;
                self.rejected_until = None;
                let refreshed = matches!(self.ecs, Ecs::On { .. });
                // ECS applied the enable somewhere between sending and now: its
                // protection lasts at least from the send, at most from now.
                let until = (now + remaining).min(flight.sent_at + self.duration);
                self.ecs = Ecs::On {
                    until,
                    // ECS applied it before now, for `duration`: a bound that no
                    // clock can move.
                    at_most: now + self.duration,
                    reported,
                };
                self.last_enable_ok = Some(now);
                Effect::Protected {
                    expires_at: reported,
                    refreshed,
                }
            }
            Ok(None) => {
                self.failures = 0;
                self.retry = None;
                self.ecs = Ecs::Off;
                Effect::Released
            }
            Err(ProtectionError::Rejected(rejection)) if request.enabled => {
                // ECS refused before acting: its state is what it was.
                self.ecs = flight.before.aged(now).0;
                self.failures = 0;
                self.retry = None;
                self.rejected_until = Some(now + self.check_interval);
                Effect::Rejected(rejection)
            }
            Err(error) => {
                if matches!(error, ProtectionError::Timeout(_)) {
                    self.abandoned_until = Some(flight.sent_at + AGENT_CALL_BUDGET);
                }
                if error.maybe_applied() {
                    // ECS may have acted: an enable may have extended protection (to at
                    // most now + duration); a disable leaves it unknown, as on the wire.
                    if request.enabled {
                        self.ecs = match self.ecs {
                            Ecs::On {
                                until,
                                at_most,
                                reported,
                            } => Ecs::On {
                                until,
                                at_most: at_most.max(now + self.duration),
                                reported,
                            },
                            other => Ecs::Unknown {
                                at_most: later(other.at_most(), now + self.duration),
                            },
                        };
                    }
                } else {
                    self.ecs = flight.before.aged(now).0;
                }
                self.failures = self.failures.saturating_add(1);
                // A refused disable (say, access denied) is not worth a fast retry.
                let retry_in = if matches!(error, ProtectionError::Rejected(_)) {
                    self.check_interval
                } else {
                    self.backoff()
                };
                self.retry = Some((request.enabled, now + retry_in));
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
        m.on_sent(t0, ProtectionRequest::enable(1));
        let e = m.on_answer(t0, ok(true));
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
        m.on_sent(t0, ProtectionRequest::enable(1));
        let rejected = Err(ProtectionError::Rejected(Rejection {
            reason: "DEPLOYMENT_BLOCKED".into(),
            detail: None,
            status: Some(200),
        }));
        m.on_answer(t0, rejected);
        assert_eq!(m.phase(t0), Phase::Rejected);
        assert_eq!(m.poll(t0), Next::Wait(Some(t0 + Duration::from_secs(10))));
        let t1 = t0 + Duration::from_secs(10);
        m.on_sent(t1, ProtectionRequest::enable(1));
        let e = m.on_answer(t1, Err(ProtectionError::Timeout(Duration::from_secs(8))));
        let Effect::Failed { retry_in, .. } = e else {
            panic!("{e:?}")
        };
        assert!(retry_in >= Duration::from_millis(100) && retry_in <= Duration::from_millis(200));
        assert!(
            m.might_be_protected(t1),
            "a timed-out enable may have been applied"
        );
        assert!(!m.is_protected(t1), "but it is no promise");
        m.set_wanted(false);
        // The agent may still be on the abandoned call for its ~4 s budget.
        assert!(matches!(m.poll(t1 + Duration::from_secs(1)), Next::Wait(_)));
        assert!(matches!(m.poll(t1 + Duration::from_secs(5)), Next::Put(r) if !r.enabled));
    }
}
