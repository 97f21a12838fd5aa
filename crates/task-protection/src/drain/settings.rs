//! How often and how patiently the drain asks, validated where it is built.

use std::time::Duration;

/// The default check interval: one decision every 30 s per service (shared), or per
/// task (each task deciding for itself).
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(30);
/// The default bound on one ECS call.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// The default settle time: the deployment files' load balancer check (every 5 s, 2
/// failures) and ECS's reaction, with room to spare.
pub const DEFAULT_SETTLE: Duration = Duration::from_secs(30);
/// Allowed range of `DRAIN_CHECK_SECONDS`.
pub const CHECK_SECONDS_RANGE: (u64, u64) = (1, 3_600);
/// Allowed range of `DRAIN_SETTLE_SECONDS`.
pub const SETTLE_SECONDS_RANGE: (u64, u64) = (0, 3_600);
/// Allowed range of the call timeout, in milliseconds.
const CALL_TIMEOUT_MS_RANGE: (u64, u64) = (100, 60_000);

/// Whether to watch: the value of `DRAIN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[non_exhaustive]
pub enum DrainMode {
    /// On when the task metadata endpoint is there (inside ECS), off elsewhere.
    #[default]
    Auto,
    /// Never ask; the task is always wanted.
    Off,
}

/// A setting out of its range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DrainSettingsError {
    /// A duration outside what the drain can use.
    #[error("drain {name} is {value:?}; it must be between {min:?} and {max:?}")]
    OutOfRange {
        /// The setting.
        name: &'static str,
        /// Its value.
        value: Duration,
        /// The least allowed.
        min: Duration,
        /// The most allowed.
        max: Duration,
    },
    /// A DynamoDB table name DynamoDB would refuse.
    #[error(
        "drain table {0:?} is not a DynamoDB table name (3 to 255 of a-z, A-Z, 0-9, '_', '-', '.')"
    )]
    TableName(String),
    /// An empty service name.
    #[error("the drain's service name is empty")]
    EmptyService,
}

/// How often and how patiently the drain asks. Built with [`DrainSettings::builder`],
/// which refuses values the drain cannot use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainSettings {
    check_interval: Duration,
    call_timeout: Duration,
    settle: Duration,
    table: Option<String>,
    service: Option<String>,
}

impl Default for DrainSettings {
    fn default() -> Self {
        Self {
            check_interval: DEFAULT_CHECK_INTERVAL,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            settle: DEFAULT_SETTLE,
            table: None,
            service: None,
        }
    }
}

impl DrainSettings {
    /// A builder starting from the defaults.
    #[must_use]
    pub fn builder() -> DrainSettingsBuilder {
        DrainSettingsBuilder(Self::default())
    }

    /// The mean time between two decisions; each wait is jittered by ±50 %.
    #[must_use]
    pub fn check_interval(&self) -> Duration {
        self.check_interval
    }

    /// The longest one ECS call may take before it counts as failed.
    #[must_use]
    pub fn call_timeout(&self) -> Duration {
        self.call_timeout
    }

    /// How long a new task must have run, past the service's health check grace
    /// period, before it counts as ready to take an old task's place.
    #[must_use]
    pub fn settle(&self) -> Duration {
        self.settle
    }

    /// The DynamoDB table the service's tasks share their decision through, if any.
    #[must_use]
    pub fn table(&self) -> Option<&str> {
        self.table.as_deref()
    }

    /// The ECS service's name, when given (otherwise the task asks ECS).
    #[must_use]
    pub fn service(&self) -> Option<&str> {
        self.service.as_deref()
    }
}

/// Builds [`DrainSettings`]; see each setter for its range.
#[derive(Debug, Clone)]
pub struct DrainSettingsBuilder(DrainSettings);

impl DrainSettingsBuilder {
    /// The mean time between two decisions: 1 s to 1 hour.
    #[must_use]
    pub fn check_interval(mut self, interval: Duration) -> Self {
        self.0.check_interval = interval;
        self
    }

    /// The longest one ECS call may take: 100 ms to 60 s.
    #[must_use]
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.0.call_timeout = timeout;
        self
    }

    /// The settle time: 0 to 1 hour.
    #[must_use]
    pub fn settle(mut self, settle: Duration) -> Self {
        self.0.settle = settle;
        self
    }

    /// Shares one decision per service through this DynamoDB table (partition key
    /// `service`, a string).
    #[must_use]
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.0.table = Some(table.into());
        self
    }

    /// The ECS service's name, which saves each task a `DescribeTasks` at start.
    #[must_use]
    pub fn service(mut self, service: impl Into<String>) -> Self {
        self.0.service = Some(service.into());
        self
    }

    /// The settings.
    ///
    /// # Errors
    /// A duration out of its range, a table name DynamoDB refuses, an empty service.
    pub fn build(self) -> Result<DrainSettings, DrainSettingsError> {
        let s = self.0;
        let secs = Duration::from_secs;
        let millis = Duration::from_millis;
        for (name, value, (min, max)) in [
            (
                "check interval",
                s.check_interval,
                (secs(CHECK_SECONDS_RANGE.0), secs(CHECK_SECONDS_RANGE.1)),
            ),
            (
                "call timeout",
                s.call_timeout,
                (
                    millis(CALL_TIMEOUT_MS_RANGE.0),
                    millis(CALL_TIMEOUT_MS_RANGE.1),
                ),
            ),
            (
                "settle time",
                s.settle,
                (secs(SETTLE_SECONDS_RANGE.0), secs(SETTLE_SECONDS_RANGE.1)),
            ),
        ] {
            if value < min || value > max {
                return Err(DrainSettingsError::OutOfRange {
                    name,
                    value,
                    min,
                    max,
                });
            }
        }
        if let Some(table) = &s.table {
            let valid = (3..=255).contains(&table.len())
                && table
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
            if !valid {
                return Err(DrainSettingsError::TableName(table.clone()));
            }
        }
        if s.service.as_deref().is_some_and(|n| n.trim().is_empty()) {
            return Err(DrainSettingsError::EmptyService);
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_and_huge_intervals_are_refused() {
        for interval in [Duration::ZERO, Duration::from_millis(999), Duration::MAX] {
            assert!(matches!(
                DrainSettings::builder().check_interval(interval).build(),
                Err(DrainSettingsError::OutOfRange {
                    name: "check interval",
                    ..
                })
            ));
        }
        assert!(
            DrainSettings::builder()
                .call_timeout(Duration::ZERO)
                .build()
                .is_err()
        );
        assert!(
            DrainSettings::builder()
                .settle(Duration::MAX)
                .build()
                .is_err()
        );
        assert!(
            DrainSettings::builder()
                .check_interval(Duration::from_secs(3_600))
                .settle(Duration::ZERO)
                .build()
                .is_ok()
        );
    }

    #[test]
    fn table_and_service_names_are_checked() {
        assert!(DrainSettings::builder().table("ab").build().is_err());
        assert!(DrainSettings::builder().table("a b c").build().is_err());
        assert!(
            DrainSettings::builder()
                .table("app-test.drain_1")
                .build()
                .is_ok()
        );
        assert_eq!(
            DrainSettings::builder().service(" ").build(),
            Err(DrainSettingsError::EmptyService)
        );
    }

    #[test]
    fn the_message_names_the_setting_and_its_range() {
        let e = DrainSettings::builder()
            .check_interval(Duration::ZERO)
            .build()
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "drain check interval is 0ns; it must be between 1s and 3600s"
        );
    }
}
