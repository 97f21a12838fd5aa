//! The metrics this crate records through the [`metrics`] facade, for any
//! exporter the service installs (the services here write CloudWatch EMF lines).
//! Each count is also in [`Counters`](crate::Counters).

/// Gauge: 1 while ECS has confirmed protection that has not run out, else 0.
pub const PROTECTED: &str = "ProtectionProtected";
/// Counter: enable PUTs sent while not protected.
pub const ENABLE_PUTS: &str = "ProtectionEnablePuts";
/// Counter: enable PUTs that extend a protection already held.
pub const REFRESH_PUTS: &str = "ProtectionRefreshPuts";
/// Counter: disable PUTs.
pub const RELEASE_PUTS: &str = "ProtectionReleasePuts";
/// Counter: PUTs that retried a failed one.
pub const RETRIES: &str = "ProtectionRetries";
/// Counter: ECS refused protection (`DEPLOYMENT_BLOCKED`, `AccessDeniedException`, ...).
pub const REJECTIONS: &str = "ProtectionRejections";
/// Counter: requests that failed (throttled, 5xx, timeouts, unreachable).
pub const FAILURES: &str = "ProtectionFailures";
/// Histogram, milliseconds: from the moment protection is wanted and not held (a
/// first holder arrives) to ECS confirming it.
pub const ACQUIRE_LATENCY: &str = "ProtectionAcquireLatency";

/// Gauge: 1 while the service no longer wants this task (it is leaving), else 0.
pub const DRAIN_LEAVING: &str = "DrainLeaving";
/// Counter: ECS API calls the drain watcher made.
pub const DRAIN_API_CALLS: &str = "DrainApiCalls";
/// Histogram, milliseconds: from the start of a drain to protection released.
pub const DRAIN_DURATION: &str = "DrainDuration";

/// Describes the units, and registers every count at zero, so an exporter writes
/// each from the start: an alarm on rejections needs a zero, not a gap.
pub(crate) fn describe() {
    use ::metrics::{Unit, counter, describe_gauge, describe_histogram, gauge};
    describe_histogram!(
        ACQUIRE_LATENCY,
        Unit::Milliseconds,
        "time to confirmed protection"
    );
    describe_gauge!(PROTECTED, Unit::Count, "1 while protected");
    describe_histogram!(
        DRAIN_DURATION,
        Unit::Milliseconds,
        "from the start of a drain to protection released"
    );
    for name in [
        ENABLE_PUTS,
        REFRESH_PUTS,
        RELEASE_PUTS,
        RETRIES,
        REJECTIONS,
        FAILURES,
    ] {
        counter!(name).increment(0);
    }
    gauge!(PROTECTED).set(0.0);
}
