//! The sample's job: a body that is a number of milliseconds, and a handler that
//! waits that long, standing in for real work.
//!
//! A body is parsed into a [`JobDuration`] first, so the work never sees an unchecked
//! string. To turn this sample into a real worker, write your own
//! [`Handler`](queue_consumer::handler::Handler) and pass it to
//! [`queue_consumer::run`] in `main.rs`; nothing in the library needs to change.

use std::fmt;
use std::time::Duration;

use queue_consumer::handler::{Handler, Job, Verdict};

/// How much of a rejected body is quoted in logs; bodies can be up to 1 MiB.
const EXCERPT_CHARS: usize = 32;

/// A job's duration: a whole number of milliseconds in `0..=MAX_JOB_MS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct JobDuration(Duration);

impl JobDuration {
    /// Parses a message body: ASCII digits, optionally surrounded by whitespace, at
    /// most `max`.
    ///
    /// # Errors
    /// [`BadBody`] saying why; the body is quoted only in part.
    pub(crate) fn parse(body: &str, max: Duration) -> Result<Self, BadBody> {
        let text = body.trim();
        if text.is_empty() {
            return Err(BadBody::Empty);
        }
        if !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(BadBody::NotANumber {
                excerpt: excerpt(text),
            });
        }
        let max_ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
        let too_long = || BadBody::TooLong {
            excerpt: excerpt(text),
            digits: text.len(),
            max_ms,
        };
        // Leading zeros aside, more than 20 digits overflow u64: no need to read 10 MB.
        let significant = text.trim_start_matches('0');
        if significant.len() > 20 {
            return Err(too_long());
        }
        let ms: u64 = if significant.is_empty() {
            0
        } else {
            significant.parse().map_err(|_| too_long())?
        };
        if ms > max_ms {
            return Err(too_long());
        }
        Ok(Self(Duration::from_millis(ms)))
    }

    /// The duration.
    #[must_use]
    pub(crate) fn get(self) -> Duration {
        self.0
    }

    /// The duration in whole milliseconds.
    #[must_use]
    pub(crate) fn as_millis(self) -> u64 {
        u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX)
    }
}

impl fmt::Display for JobDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} milliseconds", self.as_millis())
    }
}

/// Why a message body is not a job. Such a message is never worked: retrying cannot
/// fix it, so it is left for the queue's redrive policy to move to the dead-letter
/// queue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BadBody {
    /// No body, or only whitespace.
    #[error("the body is empty")]
    Empty,
    /// Something other than digits.
    #[error("the body {excerpt:?} is not a whole number of milliseconds")]
    NotANumber {
        /// The start of the body.
        excerpt: String,
    },
    /// A number larger than `MAX_JOB_MS`.
    #[error("the body {excerpt:?} ({digits} digits) is more than MAX_JOB_MS={max_ms}")]
    TooLong {
        /// The start of the body.
        excerpt: String,
        /// How many digits it has.
        digits: usize,
        /// The limit.
        max_ms: u64,
    },
}

fn excerpt(text: &str) -> String {
    let mut out: String = text.chars().take(EXCERPT_CHARS).collect();
    if text.chars().nth(EXCERPT_CHARS).is_some() {
        out.push('…');
    }
    out
}

/// The sample handler: waits for the duration the body names, without blocking a
/// thread, and stops when the message is no longer held.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sleep {
    /// Longest job accepted; a longer body is bad input.
    pub(crate) max_job: Duration,
}

impl Handler for Sleep {
    async fn handle(&self, job: Job) -> Verdict {
        let duration = match JobDuration::parse(&job.body, self.max_job) {
            Ok(d) => d,
            Err(reason) => return Verdict::BadInput(reason.to_string()),
        };
        let id = &job.message_id;
        tracing::info!(message_id = %id, "{id} - Working for {duration}");
        tokio::select! {
            () = tokio::time::sleep(duration.get()) => Verdict::Done,
            // The worker neither deletes nor hands back a message it no longer holds.
            () = job.lost.cancelled() => Verdict::Failed("the message is no longer held".to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_secs(3600);

    fn ms(body: &str) -> Result<u64, BadBody> {
        JobDuration::parse(body, MAX).map(JobDuration::as_millis)
    }

    #[test]
    fn whole_milliseconds_parse() {
        assert_eq!(ms("10000"), Ok(10_000));
        assert_eq!(ms("0"), Ok(0));
        assert_eq!(ms(" 250\n"), Ok(250));
        assert_eq!(ms("000042"), Ok(42));
        assert_eq!(ms("3600000"), Ok(3_600_000));
        let d = JobDuration::parse("1500", MAX).unwrap();
        assert_eq!(d.to_string(), "1500 milliseconds");
        assert_eq!(d.get(), Duration::from_millis(1500));
    }

    #[test]
    fn junk_is_rejected_with_a_reason() {
        assert_eq!(ms(""), Err(BadBody::Empty));
        assert_eq!(ms("  \n"), Err(BadBody::Empty));
        for junk in ["abc", "-5", "+5", "1e9", "1.5", "12 34", "١٢", "0x10"] {
            assert!(
                matches!(ms(junk), Err(BadBody::NotANumber { .. })),
                "{junk}: {:?}",
                ms(junk)
            );
        }
        assert_eq!(
            ms("abc").unwrap_err().to_string(),
            "the body \"abc\" is not a whole number of milliseconds"
        );
    }

    #[test]
    fn too_long_is_rejected_without_reading_it_all() {
        assert!(matches!(
            ms("3600001"),
            Err(BadBody::TooLong {
                max_ms: 3_600_000,
                ..
            })
        ));
        assert!(matches!(
            ms("18446744073709551616"),
            Err(BadBody::TooLong { .. })
        ));
        let huge = "9".repeat(10 * 1024 * 1024);
        let err = ms(&huge).unwrap_err();
        assert!(matches!(
            err,
            BadBody::TooLong {
                digits: 10_485_760,
                ..
            }
        ));
        // The log line quotes only the start.
        assert!(err.to_string().len() < 120, "{err}");
        // Leading zeros do not make a small number too long.
        assert_eq!(ms(&format!("{}7", "0".repeat(100))), Ok(7));
    }

    #[test]
    fn the_limit_is_inclusive() {
        let max = Duration::from_millis(5);
        assert!(JobDuration::parse("5", max).is_ok());
        assert!(JobDuration::parse("6", max).is_err());
        assert!(JobDuration::parse("0", Duration::ZERO).is_ok());
    }

    fn job(body: &str) -> Job {
        Job::new("m", body)
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_takes_the_duration_and_stops_when_lost() {
        let h = Sleep { max_job: MAX };
        let start = tokio::time::Instant::now();
        assert_eq!(h.handle(job("90000")).await, Verdict::Done);
        assert_eq!(start.elapsed(), Duration::from_secs(90));
        let j = job("90000");
        let lost = j.lost.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            lost.cancel();
        });
        assert!(matches!(h.handle(j).await, Verdict::Failed(_)));
        assert_eq!(start.elapsed(), Duration::from_secs(95));
        assert!(matches!(h.handle(job("abc")).await, Verdict::BadInput(_)));
    }
}
