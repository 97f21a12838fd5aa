//! Waiting before trying again: after an SQS error, and before a failed message is
//! delivered again.

use std::time::Duration;

use rand::Rng;

/// First wait after an SQS error.
pub const SQS_RETRY_BASE: Duration = Duration::from_millis(250);
/// Longest wait after SQS errors: about one long poll, so a worker notices a
/// recovered endpoint within 20 s without hammering a failing one.
pub const SQS_RETRY_CAP: Duration = Duration::from_secs(20);

/// First delay before a bad or failed message is delivered again.
pub const REDELIVERY_BASE: Duration = Duration::from_secs(30);
/// Longest delay before a bad or failed message is delivered again.
pub const REDELIVERY_CAP: Duration = Duration::from_secs(15 * 60);

/// Exponential backoff with jitter: the n-th wait is drawn from the upper half of
/// `min(base * 2^n, cap)`. Many workers retrying a recovered endpoint then spread out,
/// and a wait is never close to zero, so a failing call can never loop hot.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    failures: u32,
}

impl Backoff {
    /// A backoff from `base` doubling up to `cap`.
    #[must_use]
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            failures: 0,
        }
    }

    /// The backoff for SQS calls.
    #[must_use]
    pub fn sqs() -> Self {
        Self::new(SQS_RETRY_BASE, SQS_RETRY_CAP)
    }

    /// The ceiling of the next wait, without jitter.
    #[must_use]
    pub fn ceiling(&self) -> Duration {
        exponential(self.base, self.cap, self.failures)
    }

    /// Records a failure and returns how long to wait.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let half = ceiling / 2;
        let jitter_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
        half + Duration::from_millis(rand::rng().random_range(0..=jitter_ms))
    }

    /// Records a success: the next failure starts again from `base`.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

fn exponential(base: Duration, cap: Duration, exponent: u32) -> Duration {
    let factor = 2u32.saturating_pow(exponent.min(31));
    base.saturating_mul(factor).min(cap)
}

/// How long a message that could not be worked stays invisible before SQS delivers
/// it again, by its `ApproximateReceiveCount`: 30 s, 60 s, 120 s ... up to 15 min.
///
/// Each delivery counts towards the queue's `maxReceiveCount`, so a message that can
/// never succeed reaches the dead-letter queue after a few minutes instead of being
/// received again at every long poll.
#[must_use]
pub fn redelivery_delay(receive_count: u32) -> Duration {
    exponential(
        REDELIVERY_BASE,
        REDELIVERY_CAP,
        receive_count.saturating_sub(1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_with_jitter_up_to_the_cap() {
        let mut b = Backoff::sqs();
        let mut ceilings = Vec::new();
        for _ in 0..12 {
            let ceiling = b.ceiling();
            let d = b.next_delay();
            assert!(d >= ceiling / 2 && d <= ceiling, "{d:?} vs {ceiling:?}");
            ceilings.push(ceiling.as_millis());
        }
        assert_eq!(
            ceilings[..8],
            [250, 500, 1000, 2000, 4000, 8000, 16_000, 20_000]
        );
        assert_eq!(*ceilings.last().unwrap(), 20_000);
        b.reset();
        assert_eq!(b.ceiling(), SQS_RETRY_BASE);
    }

    #[test]
    fn many_failures_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(20));
        for _ in 0..1000 {
            assert!(b.next_delay() <= Duration::from_secs(20));
        }
    }

    #[test]
    fn redelivery_backs_off_by_receive_count() {
        let secs: Vec<u64> = (0..=8).map(|n| redelivery_delay(n).as_secs()).collect();
        assert_eq!(secs, [30, 30, 60, 120, 240, 480, 900, 900, 900]);
        assert_eq!(redelivery_delay(u32::MAX), REDELIVERY_CAP);
    }
}
