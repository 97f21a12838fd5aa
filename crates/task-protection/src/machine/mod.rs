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
//! - A request whose answer is lost (a timeout, a 5xx, a 504, a reset, ECS throttling
//!   after the agent's own retries) may still reach ECS until the backend's landing
//!   window has passed since it was sent ([`Backend::landing_window`]: 5 s for the
//!   agent, whose own ECS call gives up after 4 s; the request timeout and a margin
//!   for the ECS API). No request of the other kind leaves before then, so a disable
//!   can never be overtaken by an earlier enable, nor an enable by an earlier disable.
//! - An answer that shows the backend itself is wrong (the agent URI leads elsewhere)
//!   stops all requests: retrying cannot help, and one error says what to fix.
//! - A new process knows nothing of what an earlier one in the same task left: ECS's
//!   state is unknown at start, bounded by the duration (the same task definition
//!   ran it), and an idle start releases it once the maintain window has passed.

//!
//! [`Backend::landing_window`]: crate::Backend::landing_window

mod answer;
mod ecs;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::backend::{ProtectionError, ProtectionRequest, Rejection};
use crate::settings::ProtectionSettings;
use ecs::Ecs;

/// First retry delay after a transient failure; doubles up to the check interval.
const BACKOFF_BASE: Duration = Duration::from_millis(200);

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
    /// The backend is misconfigured: no request goes any more.
    Misconfigured(ProtectionError),
}

/// The phase shown to observers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Idle,
    Acquiring,
    Protected,
    Releasing,
    Rejected,
    Misconfigured,
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
    /// How long after it was sent a request whose answer was lost may still land.
    landing: Duration,

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
    /// The backend answered that it is misconfigured: nothing more is sent.
    misconfigured: Option<ProtectionError>,
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
    /// most one duration. A request whose answer is lost may land until `landing`
    /// after it was sent.
    pub(crate) fn new(settings: &ProtectionSettings, now: Instant, landing: Duration) -> Self {
        Self {
            minutes: settings.duration_minutes(),
            duration: settings.duration(),
            maintain: settings.maintain_window(),
            refresh_lead: settings.refresh_lead(),
            min_put_interval: settings.min_put_interval(),
            check_interval: settings.check_interval(),
            request_timeout: settings.request_timeout(),
            landing,
            wanted: false,
            draining: false,
            ecs: Ecs::Unknown {
                at_most: now + settings.duration() + landing,
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
            misconfigured: None,
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
        if self.misconfigured.is_some() {
            Phase::Misconfigured
        } else if self.rejected_until.is_some_and(|t| t > now) && !protected {
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

    /// Why no request goes any more, once the backend has shown it is misconfigured.
    pub(crate) fn misconfigured(&self) -> Option<&ProtectionError> {
        self.misconfigured.as_ref()
    }

    /// How long after it was sent a request whose answer was lost may still land.
    pub(crate) fn landing_window(&self) -> Duration {
        self.landing
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
        if self.in_flight.is_some() || self.misconfigured.is_some() {
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
                    now + self.request_timeout.max(self.landing) + self.duration,
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
}
