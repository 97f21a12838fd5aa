//! What observers see: the current state, the event stream and the counters.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::broadcast;
use tokio_stream::Stream;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use crate::backend::{ProtectionError, Rejection};

/// Formats a wall-clock time as RFC 3339 in UTC, e.g. `2026-11-28T10:00:00Z`, to the
/// microsecond, with as many fractional digits as that needs (none for a whole second).
#[must_use]
pub fn rfc3339(t: SystemTime) -> String {
    use time::format_description::well_known::Rfc3339;
    use time::{Duration, OffsetDateTime};
    let utc = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => Duration::try_from(after)
            .ok()
            .and_then(|d| OffsetDateTime::UNIX_EPOCH.checked_add(d)),
        Err(before) => Duration::try_from(before.duration())
            .ok()
            .and_then(|d| OffsetDateTime::UNIX_EPOCH.checked_sub(d)),
    };
    // Past year 9999 RFC 3339 has no spelling; say what the time is anyway.
    utc.and_then(|utc| utc.replace_microsecond(utc.microsecond()).ok())
        .and_then(|utc| utc.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("{t:?}"))
}

/// Where the task's protection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Phase {
    /// No holder, not protected.
    Idle,
    /// A holder exists; protection is being requested.
    Acquiring,
    /// Protected, with holders.
    Protected,
    /// Protected, no holder left: kept for the maintain window, then released.
    Releasing,
    /// ECS refused; holders exist but no new attempt before the cool-down ends.
    Rejected,
    /// Shut down; protection is no longer managed.
    Stopped,
    /// The backend is misconfigured (see `last_error`): nothing is sent any more.
    Misconfigured,
}

/// A snapshot of the task's protection, from [`TaskProtection::state`](crate::TaskProtection::state).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct ProtectionState {
    /// What the task is doing about protection.
    pub phase: Phase,
    /// Whether ECS has confirmed protection that has not yet run out.
    pub protected: bool,
    /// When the confirmed protection ends.
    #[serde(serialize_with = "ser_time")]
    pub expires_at: Option<SystemTime>,
    /// The task ARN, once an answer has named it.
    pub task_arn: Option<String>,
    /// True when protection is simulated because the process is not in ECS.
    pub simulated: bool,
    /// The last refusal from ECS.
    #[serde(serialize_with = "ser_display")]
    pub last_rejection: Option<Rejection>,
    /// The last failure, cleared by the next success.
    #[serde(serialize_with = "ser_error")]
    pub last_error: Option<ProtectionError>,
    #[serde(skip)]
    pub(crate) rejections: u64,
}

impl ProtectionState {
    pub(crate) fn new(simulated: bool) -> Self {
        Self {
            phase: Phase::Idle,
            protected: false,
            expires_at: None,
            task_arn: None,
            simulated,
            last_rejection: None,
            last_error: None,
            rejections: 0,
        }
    }
}

#[allow(clippy::ref_option)]
fn ser_time<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&rfc3339(*t)),
        None => s.serialize_none(),
    }
}

#[allow(clippy::ref_option)]
fn ser_display<S: serde::Serializer, T: std::fmt::Display>(
    v: &Option<T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.serialize_str(&v.to_string()),
        None => s.serialize_none(),
    }
}

#[allow(clippy::ref_option)]
fn ser_error<S: serde::Serializer>(v: &Option<ProtectionError>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(e) => s.serialize_str(&crate::ErrorChain(e).to_string()),
        None => s.serialize_none(),
    }
}

/// A change in protection: the original `ProtectionManager`'s three events.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ProtectionEvent {
    /// ECS confirmed protection until `expires_at`; `refreshed` when it extended a
    /// protection already held.
    Protected {
        /// When it ends.
        expires_at: SystemTime,
        /// An extension rather than a first acquire.
        refreshed: bool,
    },
    /// The task is no longer protected; `lapsed` when it ran out rather than being
    /// released by a disable PUT.
    Unprotected {
        /// Ran out instead of being released.
        lapsed: bool,
    },
    /// ECS refused protection: the task is probably being replaced.
    Rejected(Rejection),
}

/// A stream of [`ProtectionEvent`]s, from [`TaskProtection::events`](crate::TaskProtection::events).
///
/// Each subscriber has its own buffer of 64 events; one that falls behind skips the
/// oldest rather than slowing protection down.
#[derive(Debug)]
pub struct Events {
    inner: BroadcastStream<ProtectionEvent>,
}

impl Events {
    pub(crate) fn new(rx: broadcast::Receiver<ProtectionEvent>) -> Self {
        Self {
            inner: BroadcastStream::new(rx),
        }
    }

    /// The next event; `None` once protection is shut down and dropped.
    pub async fn recv(&mut self) -> Option<ProtectionEvent> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }
}

impl Stream for Events {
    type Item = ProtectionEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            match Pin::new(&mut self.inner).poll_next(cx) {
                Poll::Ready(Some(Err(BroadcastStreamRecvError::Lagged(_)))) => {}
                Poll::Ready(Some(Ok(event))) => return Poll::Ready(Some(event)),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Counts of what protection has cost, from [`TaskProtection::counters`](crate::TaskProtection::counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Counters {
    /// Enable PUTs sent while not protected.
    pub acquire_puts: u64,
    /// Enable PUTs sent to extend a protection already held.
    pub refresh_puts: u64,
    /// Disable PUTs.
    pub release_puts: u64,
    /// PUTs that were retries after a transient failure (also counted above).
    pub retries: u64,
    /// Transient failures: throttling, 5xx, timeouts, connection errors.
    pub failures: u64,
    /// Refusals from ECS.
    pub rejections: u64,
}

impl Counters {
    /// Every PUT sent.
    #[must_use]
    pub fn puts(&self) -> u64 {
        self.acquire_puts + self.refresh_puts + self.release_puts
    }
}

#[derive(Debug, Default)]
pub(crate) struct AtomicCounters {
    pub(crate) acquire_puts: AtomicU64,
    pub(crate) refresh_puts: AtomicU64,
    pub(crate) release_puts: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) rejections: AtomicU64,
}

/// One of the things [`Counters`] counts, each also a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Count {
    AcquirePut,
    RefreshPut,
    ReleasePut,
    Retry,
    Failure,
    Rejection,
}

impl AtomicCounters {
    /// Counts one, in [`Counters`] and in the `metrics` facade (see [`crate::metrics`]).
    pub(crate) fn bump(&self, count: Count) {
        use crate::metrics as m;
        let (cell, name) = match count {
            Count::AcquirePut => (&self.acquire_puts, m::ENABLE_PUTS),
            Count::RefreshPut => (&self.refresh_puts, m::REFRESH_PUTS),
            Count::ReleasePut => (&self.release_puts, m::RELEASE_PUTS),
            Count::Retry => (&self.retries, m::RETRIES),
            Count::Failure => (&self.failures, m::FAILURES),
            Count::Rejection => (&self.rejections, m::REJECTIONS),
        };
        cell.fetch_add(1, Ordering::Relaxed);
        ::metrics::counter!(name).increment(1);
    }

    pub(crate) fn snapshot(&self) -> Counters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counters {
            acquire_puts: get(&self.acquire_puts),
            refresh_puts: get(&self.refresh_puts),
            release_puts: get(&self.release_puts),
            retries: get(&self.retries),
            failures: get(&self.failures),
            rejections: get(&self.rejections),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::rfc3339;

    #[test]
    fn rfc3339_is_utc_to_the_microsecond() {
        let t = UNIX_EPOCH + Duration::from_secs(1_665_023_356);
        assert_eq!(rfc3339(t), "2022-10-06T02:29:16Z");
        assert_eq!(
            rfc3339(t + Duration::from_millis(250)),
            "2022-10-06T02:29:16.25Z"
        );
        assert_eq!(
            rfc3339(t + Duration::from_nanos(123_456_789)),
            "2022-10-06T02:29:16.123456Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_secs(1)),
            "1969-12-31T23:59:59Z"
        );
        // Years past 9999 have no RFC 3339 form; the text still names the time.
        let far = UNIX_EPOCH + Duration::from_secs(253_402_300_800);
        assert!(rfc3339(far).contains("253402300800"), "{}", rfc3339(far));
    }
}
