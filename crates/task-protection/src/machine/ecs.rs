//! What ECS may hold for this task: the one state every rule reads.

use std::time::SystemTime;

use tokio::time::Instant;

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
    pub(crate) fn at_most(self) -> Option<Instant> {
        match self {
            Self::Off => None,
            Self::On { at_most, .. } | Self::Unknown { at_most } => Some(at_most),
        }
    }

    /// This state with its time bounds applied at `now`, and whether a confirmed
    /// protection ran out in the process.
    pub(crate) fn aged(self, now: Instant) -> (Self, bool) {
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
