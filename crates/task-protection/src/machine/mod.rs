//! The protection state machine, free of I/O.
//!
//! It answers one question, again and again: given whether protection is wanted, what
//! ECS may hold and when the last PUT went out, what is the next PUT and when? The
//! [driver](crate::driver) does the waiting and the calling.
//!
//! The rules, each from a platform fact:
//! - ECS rate-limits protection calls per account and Region, so PUTs go out only on
//!   idle→busy and busy→idle transitions and to refresh before expiry, never per
//!   holder; and never two within `min_put_interval`.
//! - Every enable PUT resets the expiry to now + duration, so a refresh is just
//!   another enable. Expiries are timed on the monotonic clock from when the PUT left
//!   (ECS applied it no earlier), never from the `ExpirationDate` ECS reports, which
//!   only a wall clock could read: a skewed clock must change nothing.
//! - An idle task that stays protected blocks deployments and scale-in, so release
//!   comes as soon as the maintain window (counted from the last successful enable)
//!   has passed, on a timer, not at some later tick.
//! - Holders come and go with gaps between them (between a delete and the next
//!   receive, between one message of a trickle and the next). Releasing in such a gap
//!   costs a disable and an enable moments later, so a release also waits until no
//!   holder has been seen for the *linger*: the 1 s spacing, or twice the longest of
//!   the recent gaps that the maintain window could have bridged, whichever is longer,
//!   and never longer than the maintain window (or the spacing, if that is longer).
//! - A request whose answer is lost (a timeout, a 5xx, a 504, a reset) may still reach
//!   ECS until the agent's own ECS call gives up, up to [`AGENT_CALL_BUDGET`] after it
//!   was sent. No request of the other kind leaves before then, so a disable can never
//!   be overtaken by an earlier enable, nor an enable by an earlier disable.
//! - A new process knows nothing of what an earlier one in the same task left: ECS's
//!   state is unknown at start, bounded by the duration (the same task definition
//!   ran it), and an idle start releases it once the maintain window has passed.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::backend::{Grant, ProtectionError, ProtectionRequest, Rejection};
use crate::settings::ProtectionSettings;

/// First retry delay after a transient failure; doubles up to the check interval.
const BACKOFF_BASE: Duration = Duration::from_millis(200);

/// How long after it was sent a request whose answer was lost may still reach ECS:
/// the agent's own ECS call has a budget of about 4 s, and a margin.
pub(crate) const AGENT_CALL_BUDGET: Duration = Duration::from_secs(5);

/// How many recent gaps between holders the linger looks at.
const GAPS_KEPT: usize = 8;

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
    /// Protection was confirmed; `refreshed` when it was already held.
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
    /// Confirmed off.
    Off,
    /// Confirmed on. It lasts at least until `until` (the send time plus the
    /// duration: ECS applied it no earlier) and ends by itself by `at_most`.
    On {
        until: Instant,
        at_most: Instant,
        reported: SystemTime,
    },
    /// Unknown: ECS may hold protection, at the latest until `at_most`. Nothing can
    /// be promised to a holder.
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
    /// maintain window or the linger.
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
    /// Until when an earlier disable (`[0]`) or enable (`[1]`) whose answer was lost
    /// may still reach ECS. A request of the other kind waits for it.
    may_land: [Option<Instant>; 2],
    /// When the last holder was last seen leaving.
    last_release: Option<Instant>,
    /// Recent gaps between the last holder leaving and the next one arriving, short
    /// enough for the maintain window to bridge: they set the linger.
    gaps: VecDeque<Duration>,
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
    /// A machine for a process starting at `now`, which knows nothing of what ECS
    /// holds: an earlier process in the same task may have left it protected, for at
    /// most one duration.
    pub(crate) fn new(settings: &ProtectionSettings, now: Instant) -> Self {
        Self {
            minutes: settings.duration_minutes(),
            duration: settings.duration(),
            maintain: settings.maintain_window(),
            refresh_lead: settings.refresh_lead(),
            min_put_interval: settings.min_put_interval(),
            check_interval: settings.check_interval(),
            request_timeout: settings.request_timeout(),
            wanted: false,
            draining: false,
            ecs: Ecs::Unknown {
                at_most: now + settings.duration() + AGENT_CALL_BUDGET,
            },
            in_flight: None,
            // An idle start releases that doubt once the maintain window has passed,
            // as after an enable.
            last_enable_ok: Some(now),
            last_put_at: None,
            failures: 0,
            retry: None,
            rejected_until: None,
            may_land: [None, None],
            last_release: None,
            gaps: VecDeque::with_capacity(GAPS_KEPT),
        }
    }

    pub(crate) fn set_wanted(&mut self, wanted: bool, now: Instant) {
        if wanted
            && !self.wanted
            && let Some(left) = self.last_release
        {
            // A holder after a gap: remember it if the maintain window could bridge it.
            let gap = now.saturating_duration_since(left);
            if gap <= self.linger_bound() {
                if self.gaps.len() == GAPS_KEPT {
                    self.gaps.pop_front();
                }
                self.gaps.push_back(gap);
            }
        }
        self.wanted = wanted;
    }

    pub(crate) fn set_draining(&mut self, draining: bool) {
        self.draining = draining;
    }

    /// The holder count fell to zero at `now` (possibly only for a moment).
    pub(crate) fn note_release(&mut self, now: Instant) {
        self.last_release = Some(now);
    }

    /// The longest a release ever lingers after the last holder left.
    fn linger_bound(&self) -> Duration {
        self.maintain.max(self.min_put_interval)
    }

    /// How long no holder must be seen before a release: the spacing, or twice the
    /// longest recent gap the maintain window could bridge, within
    /// [`linger_bound`](Self::linger_bound).
    pub(crate) fn linger(&self) -> Duration {
        let longest = self.gaps.iter().max().copied().unwrap_or_default();
        (longest * 2).clamp(self.min_put_interval, self.linger_bound())
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

    /// The earliest a PUT of this kind may start: the 1 s spacing, and no earlier
    /// request of the other kind may still reach ECS after it.
    pub(crate) fn spacing_end(&self, now: Instant, enabled: bool) -> Instant {
        let other = self.may_land[usize::from(!enabled)];
        later(
            other,
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
                later(backoff(true), due.max(self.spacing_end(now, true))),
            )
        } else {
            if self.ecs.at_most().is_none() {
                return Next::Wait(wake);
            }
            // A leaving task lets go as soon as nobody holds: the maintain window and
            // the linger only save calls for work that may still come.
            let (window_end, quiet_end) = if self.draining {
                (now, None)
            } else {
                (
                    self.last_enable_ok.map_or(now, |t| t + self.maintain),
                    self.last_release.map(|t| t + self.linger()),
                )
            };
            let due = later(
                backoff(false),
                later(quiet_end, window_end.max(self.spacing_end(now, false))),
            );
            // A disable due at or after the bound never goes: the bound passes first
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
                at_most: later(
                    before.at_most(),
                    now + self.request_timeout.max(AGENT_CALL_BUDGET) + self.duration,
                ),
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

    /// The latest an enable that may still land would end: landing by its window,
    /// then one duration.
    fn late_enable_end(&self, now: Instant) -> Instant {
        later(self.may_land[1], now) + self.duration
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
        let answer = answer.and_then(|grant| check_grant(request, grant, self.duration));
        match answer {
            Ok(Some(reported)) => {
                self.failures = 0;
                self.retry = None;
                self.rejected_until = None;
                let refreshed = matches!(self.ecs, Ecs::On { .. });
                // ECS applied the enable somewhere between sending and now: its
                // protection lasts at least from the send, and ends at the latest one
                // duration after now (or after an earlier enable that may still land).
                self.ecs = Ecs::On {
                    until: flight.sent_at + self.duration,
                    at_most: self.late_enable_end(now),
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
                // Off, unless an earlier enable may still land after this disable did:
                // it may have landed as soon as it was sent.
                self.ecs = match self.may_land[1].filter(|t| *t > flight.sent_at) {
                    Some(_) => Ecs::Unknown {
                        at_most: self.late_enable_end(now),
                    },
                    None => Ecs::Off,
                };
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
            Err(ProtectionError::Rejected(rejection)) if rejection.reason == "TASK_NOT_VALID" => {
                // Not a service task: ECS protects nothing here, so a disable has
                // nothing left to do.
                self.ecs = Ecs::Off;
                self.failures = 0;
                self.retry = None;
                Effect::Released
            }
            Err(error) => {
                if error.maybe_applied() {
                    // It may still reach ECS until the agent gives up on it.
                    let window = flight.sent_at + AGENT_CALL_BUDGET;
                    let slot = &mut self.may_land[usize::from(request.enabled)];
                    *slot = Some(later(*slot, window));
                    // ECS may have acted: an enable may have extended protection; a
                    // disable leaves it unknown, as on the wire.
                    if request.enabled {
                        let at_most = self.late_enable_end(now);
                        self.ecs = match self.ecs {
                            Ecs::On {
                                until,
                                at_most: before,
                                reported,
                            } => Ecs::On {
                                until,
                                at_most: before.max(at_most),
                                reported,
                            },
                            other => Ecs::Unknown {
                                at_most: later(other.at_most(), at_most),
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

/// For an enable: the expiry ECS reported (for display only; timing is monotonic).
/// `None` for a disable.
fn check_grant(
    request: ProtectionRequest,
    grant: Grant,
    duration: Duration,
) -> Result<Option<SystemTime>, ProtectionError> {
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
        (true, true) => Ok(Some(
            grant
                .expires_at
                .unwrap_or_else(|| SystemTime::now() + duration),
        )),
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

    /// A machine past its start: ECS confirmed off.
    fn released(t0: Instant) -> Machine {
        let mut m = Machine::new(&settings(), t0);
        m.on_sent(t0, ProtectionRequest::disable());
        m.on_answer(t0, ok(false));
        m
    }

    #[test]
    fn an_idle_start_releases_what_an_earlier_process_may_have_left_then_waits_forever() {
        let t0 = Instant::now();
        let m = Machine::new(&settings(), t0);
        assert!(m.might_be_protected(t0), "unknown at start");
        assert!(!m.is_protected(t0), "and no promise");
        // One disable once the maintain window of the start has passed.
        assert_eq!(m.poll(t0), Next::Wait(Some(t0 + Duration::from_secs(6))));
        assert_eq!(
            m.poll(t0 + Duration::from_secs(6)),
            Next::Put(ProtectionRequest::disable())
        );
        let m = released(t0);
        assert_eq!(m.poll(t0 + Duration::from_secs(7)), Next::Wait(None));
    }

    #[test]
    fn a_holder_at_start_enables_at_once() {
        let t0 = Instant::now();
        let mut m = Machine::new(&settings(), t0);
        m.set_wanted(true, t0);
        assert_eq!(m.poll(t0), Next::Put(ProtectionRequest::enable(1)));
    }

    #[test]
    fn enable_then_refresh_then_release_at_the_maintain_mark() {
        let t0 = Instant::now();
        let mut m = released(t0);
        let t1 = t0 + Duration::from_secs(1);
        m.set_wanted(true, t1);
        assert_eq!(m.poll(t1), Next::Put(ProtectionRequest::enable(1)));
        m.on_sent(t1, ProtectionRequest::enable(1));
        let e = m.on_answer(t1, ok(true));
        assert!(matches!(
            e,
            Effect::Protected {
                refreshed: false,
                ..
            }
        ));
        // Refresh at 80 % of 60 s after the send, on the monotonic clock.
        assert_eq!(m.poll(t1), Next::Wait(Some(t1 + Duration::from_secs(48))));
        m.set_wanted(false, t1);
        assert_eq!(m.poll(t1), Next::Wait(Some(t1 + Duration::from_secs(6))));
        assert_eq!(
            m.poll(t1 + Duration::from_secs(6)),
            Next::Put(ProtectionRequest::disable())
        );
    }

    #[test]
    fn a_skewed_expiry_changes_nothing() {
        let t0 = Instant::now();
        for skew in [-3_600_i64, -50, 0, 50, 3_600] {
            let mut m = released(t0);
            let t1 = t0 + Duration::from_secs(1);
            m.set_wanted(true, t1);
            m.on_sent(t1, ProtectionRequest::enable(1));
            let wall = SystemTime::now() + Duration::from_secs(60);
            let reported = if skew >= 0 {
                wall + Duration::from_secs(skew.unsigned_abs())
            } else {
                wall - Duration::from_secs(skew.unsigned_abs())
            };
            let e = m.on_answer(
                t1,
                Ok(Grant {
                    enabled: true,
                    expires_at: Some(reported),
                    task_arn: None,
                }),
            );
            assert!(matches!(e, Effect::Protected { .. }), "{skew}: {e:?}");
            assert_eq!(
                m.poll(t1),
                Next::Wait(Some(t1 + Duration::from_secs(48))),
                "{skew}"
            );
            assert!(m.is_protected(t1 + Duration::from_secs(59)), "{skew}");
        }
    }

    #[test]
    fn the_linger_follows_the_recent_gaps_within_the_maintain_window() {
        let t0 = Instant::now();
        let mut m = released(t0);
        assert_eq!(m.linger(), Duration::from_secs(1));
        let mut t = t0;
        for _ in 0..5 {
            m.set_wanted(true, t);
            t += Duration::from_millis(50);
            m.set_wanted(false, t);
            m.note_release(t);
            t += Duration::from_millis(1_200);
        }
        assert_eq!(m.linger(), Duration::from_millis(2_400));
        // A long pause is not a gap the maintain window would bridge: not counted.
        m.set_wanted(true, t + Duration::from_secs(30));
        assert_eq!(m.linger(), Duration::from_millis(2_400));
        // Gaps near the window: the linger stops at the window.
        for _ in 0..GAPS_KEPT {
            m.set_wanted(false, t);
            m.note_release(t);
            t += Duration::from_secs(5);
            m.set_wanted(true, t);
        }
        assert_eq!(m.linger(), Duration::from_secs(6));
    }

    #[test]
    fn no_request_leaves_before_one_of_the_other_kind_can_no_longer_land() {
        let t0 = Instant::now();
        let mut m = released(t0);
        let t1 = t0 + Duration::from_secs(1);
        m.set_wanted(true, t1);
        m.on_sent(t1, ProtectionRequest::enable(1));
        let e = m.on_answer(
            t1 + Duration::from_secs(4),
            Err(ProtectionError::Server {
                status: 504,
                code: "RequestCanceled".into(),
                message: String::new(),
            }),
        );
        assert!(matches!(e, Effect::Failed { .. }));
        // Another enable may go after the backoff; a disable only once the first
        // enable can no longer land.
        let t2 = t1 + Duration::from_millis(4_500);
        assert!(matches!(m.poll(t2), Next::Put(r) if r.enabled));
        m.set_wanted(false, t2);
        m.note_release(t2);
        let Next::Wait(Some(at)) = m.poll(t2) else {
            panic!("{:?}", m.poll(t2))
        };
        assert!(at >= t1 + AGENT_CALL_BUDGET, "{:?}", at - t1);
    }

    #[test]
    fn a_release_sent_while_an_earlier_enable_may_land_is_no_release() {
        // Only shutdown's budget could send it that early; the answer must not claim
        // ECS off when the earlier enable may land after it.
        let t0 = Instant::now();
        let mut m = released(t0);
        m.on_sent(t0, ProtectionRequest::enable(1));
        m.on_answer(
            t0,
            Err(ProtectionError::Server {
                status: 500,
                code: String::new(),
                message: String::new(),
            }),
        );
        let t1 = t0 + Duration::from_secs(1);
        m.on_sent(t1, ProtectionRequest::disable());
        assert_eq!(m.on_answer(t1, ok(false)), Effect::Released);
        assert!(m.might_be_protected(t1), "the enable may still land");
        assert!(m.might_be_protected(t0 + Duration::from_secs(64)));
    }

    #[test]
    fn rejection_cools_down_and_transient_backs_off() {
        let t0 = Instant::now();
        let mut m = released(t0);
        m.set_wanted(true, t0);
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
        m.set_wanted(false, t1);
        // The agent may still be on the abandoned call for its ~4 s budget.
        assert!(matches!(m.poll(t1 + Duration::from_secs(1)), Next::Wait(_)));
        assert!(matches!(m.poll(t1 + Duration::from_secs(5)), Next::Put(r) if !r.enabled));
    }
}
