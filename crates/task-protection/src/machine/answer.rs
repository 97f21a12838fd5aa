//! What an answer does to what ECS may hold: the one place that reads the outcome of
//! a PUT, for every request, the shutdown's last disable included.
//!
//! - A confirmed enable protects from when it was sent (ECS applied it no earlier)
//!   for one duration, and at the latest until one duration after an earlier enable
//!   that may still land.
//! - A confirmed disable is off, unless an earlier enable may still land after it.
//! - A refusal leaves ECS as it was; so does an answer that shows ECS was never
//!   called (the agent's limiter, a wrong URL, nothing sent).
//! - Any other failure may have been applied: it may land until the backend's
//!   landing window has passed since it was sent, and no request of the other kind
//!   leaves before then.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::{BACKOFF_BASE, Ecs, Effect, InFlight, Machine, later};
use crate::backend::{Grant, ProtectionError, ProtectionRequest};

impl Machine {
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
            Err(ProtectionError::Rejected(rejection)) if rejection.reason() == "TASK_NOT_VALID" => {
                // Not a service task: ECS protects nothing here, so a disable has
                // nothing left to do.
                self.ecs = Ecs::Off;
                self.failures = 0;
                self.retry = None;
                Effect::Released
            }
            Err(error @ ProtectionError::Misdirected { .. }) => {
                // The request never reached ECS, and none will: stop here.
                self.ecs = flight.before.aged(now).0;
                self.misconfigured = Some(error.clone());
                Effect::Misconfigured(error)
            }
            Err(error) => {
                if error.maybe_applied() {
                    // It may still reach ECS until the agent gives up on it.
                    let window = flight.sent_at + self.landing;
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
            grant.is_enabled(),
            grant.expires_at().map(crate::state::rfc3339)
        ),
    };
    match (request.enabled, grant.is_enabled()) {
        (false, false) => Ok(None),
        (false, true) => Err(unexpected("protection still enabled after a disable")),
        (true, false) => Err(unexpected("protection not enabled after an enable")),
        (true, true) => Ok(Some(
            grant
                .expires_at()
                .unwrap_or_else(|| SystemTime::now() + duration),
        )),
    }
}
