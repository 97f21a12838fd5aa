//! The metrics the worker records through the [`metrics`](::metrics) facade, for any
//! exporter the service installs (the binary writes CloudWatch EMF lines). Each count
//! is also in [`Stats`](crate::stats::Stats), logged at exit.

/// Counter: messages received.
pub const JOBS_RECEIVED: &str = "JobsReceived";
/// Counter: jobs done and their messages deleted.
pub const JOBS_DONE: &str = "JobsDone";
/// Counter: jobs that failed (an error, a retry asked for, a panic) and will be retried.
pub const JOBS_FAILED: &str = "JobsFailed";
/// Counter: jobs stopped by `JOB_TIMEOUT_SECONDS` (counted in `JobsFailed` too).
pub const JOBS_TIMED_OUT: &str = "JobsTimedOut";
/// Counter: messages handed back for another worker (shutdown, refused protection).
pub const JOBS_HANDED_BACK: &str = "JobsHandedBack";
/// Counter: messages the handler refused as bad input, left for the dead-letter queue.
pub const BAD_BODIES: &str = "BadBodies";
/// Counter: FIFO messages that used up their tries while later messages of their
/// group waited, moved to the dead-letter queue alone by the worker.
pub const JOBS_DEAD_LETTERED: &str = "JobsDeadLettered";
/// Counter: SQS calls that failed (or single entries of a batch call).
pub const SQS_ERRORS: &str = "SqsErrors";
/// Gauge: messages held by the worker, from receipt until settled.
pub const JOBS_IN_FLIGHT: &str = "JobsInFlight";
/// Histogram, milliseconds: how long the handler ran.
pub const JOB_DURATION: &str = "JobDuration";
/// Histogram, milliseconds: from the receive that brought a message to its handler's
/// start (protection and, on a FIFO queue, the group's turn included).
pub const RECEIVE_TO_START: &str = "ReceiveToStart";

/// Describes the units, and registers every count at zero, so an exporter writes
/// each from the start: an alarm needs a zero, not a gap.
pub(crate) fn describe() {
    use ::metrics::{Unit, counter, describe_gauge, describe_histogram, gauge};
    describe_histogram!(JOB_DURATION, Unit::Milliseconds, "handler run time");
    describe_histogram!(
        RECEIVE_TO_START,
        Unit::Milliseconds,
        "time from receipt to the handler's start"
    );
    describe_gauge!(JOBS_IN_FLIGHT, Unit::Count, "messages held");
    for name in [
        JOBS_RECEIVED,
        JOBS_DONE,
        JOBS_FAILED,
        JOBS_TIMED_OUT,
        JOBS_HANDED_BACK,
        BAD_BODIES,
        JOBS_DEAD_LETTERED,
        SQS_ERRORS,
    ] {
        counter!(name).increment(0);
    }
    gauge!(JOBS_IN_FLIGHT).set(0.0);
}

/// Adds one to a counter.
pub(crate) fn count(name: &'static str) {
    ::metrics::counter!(name).increment(1);
}

/// Counts a held message in [`JOBS_IN_FLIGHT`] while it lives.
pub(crate) struct InFlight;

impl InFlight {
    pub(crate) fn new() -> Self {
        ::metrics::gauge!(JOBS_IN_FLIGHT).increment(1.0);
        Self
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        ::metrics::gauge!(JOBS_IN_FLIGHT).decrement(1.0);
    }
}

/// Milliseconds in `d`, for a histogram.
pub(crate) fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
