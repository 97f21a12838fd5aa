//! Protection settings, validated once at the edge.
//!
//! The four settings mean what the four options of the original `ProtectionManager`
//! meant. Each is checked against the range ECS accepts, so a bad value is a start-up
//! error, not a rejected API call an hour later. The error names where the value came
//! from: its environment variable when it was read from one, the builder method that
//! set it otherwise.

use std::fmt;
use std::time::Duration;

/// Names of the environment variables that configure protection.
pub mod env {
    /// How long each acquire or refresh protects the task, in minutes.
    pub const DURATION_MINUTES: &str = "PROTECTION_DURATION_MINUTES";
    /// Keep protection this share of the duration after the last successful PUT.
    pub const MAINTAIN_PERCENT: &str = "PROTECTION_MAINTAIN_PERCENT";
    /// Refresh protection once this share of the duration has passed.
    pub const REFRESH_PERCENT: &str = "PROTECTION_REFRESH_PERCENT";
    /// The longest wait between attempts: retry backoff cap and rejection cool-down.
    pub const CHECK_INTERVAL_MS: &str = "PROTECTION_CHECK_INTERVAL_MS";
    /// The least time between two protection PUTs.
    pub const MIN_PUT_INTERVAL_MS: &str = "PROTECTION_MIN_PUT_INTERVAL_MS";
    /// How long one request to the agent or the ECS API may take.
    pub const REQUEST_TIMEOUT_MS: &str = "PROTECTION_REQUEST_TIMEOUT_MS";
    /// How long an awaited acquire waits for ECS before it gives up.
    pub const ACQUIRE_TIMEOUT_MS: &str = "PROTECTION_ACQUIRE_TIMEOUT_MS";
}

/// Allowed range of [`ProtectionSettings::duration_minutes`]: ECS's own limits.
pub const DURATION_MINUTES_RANGE: (u16, u16) = (1, 2880);
/// Allowed range of [`ProtectionSettings::refresh_percent`]: at 100 the refresh would
/// be due at the very expiry, which no request can meet.
pub const REFRESH_PERCENT_RANGE: (u8, u8) = (1, 99);
/// Allowed range of the check interval, in milliseconds.
pub const CHECK_INTERVAL_MS_RANGE: (u64, u64) = (100, 3_600_000);
/// Allowed range of the least time between PUTs, in milliseconds.
pub const MIN_PUT_INTERVAL_MS_RANGE: (u64, u64) = (0, 60_000);
/// Allowed range of the request timeout, in milliseconds.
///
/// The agent gives up on ECS after about 4 s and answers 504, so the client waits
/// longer than that by default; below 1 s no ECS call can complete reliably.
pub const REQUEST_TIMEOUT_MS_RANGE: (u64, u64) = (1_000, 120_000);
/// Allowed range of the acquire timeout, in milliseconds.
pub const ACQUIRE_TIMEOUT_MS_RANGE: (u64, u64) = (100, 3_600_000);

/// A setting whose value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    /// The value parsed, but lies outside the range allowed.
    #[error("{name}={value} is out of range: allowed {allowed}")]
    OutOfRange {
        /// Where the value came from: its environment variable, or the builder
        /// method that set it.
        name: &'static str,
        /// The value given.
        value: String,
        /// The range allowed, e.g. `1..=2880 minutes`.
        allowed: String,
    },
    /// The value is not a number of the right kind.
    #[error("{name}={value:?} is not valid: {reason}")]
    Invalid {
        /// Where the value came from: its environment variable, or the builder
        /// method that set it.
        name: &'static str,
        /// The value given.
        value: String,
        /// Why it was refused.
        reason: String,
    },
    /// Each value is in range, but together they would defeat protection.
    #[error("conflicting protection settings: {0}")]
    Conflict(String),
}

fn check_range<T: PartialOrd + fmt::Display + Copy>(
    name: &'static str,
    value: T,
    (lo, hi): (T, T),
    unit: &str,
) -> Result<T, SettingsError> {
    if value < lo || value > hi {
        let unit = if unit.is_empty() {
            String::new()
        } else {
            format!(" {unit}")
        };
        return Err(SettingsError::OutOfRange {
            name,
            value: value.to_string(),
            allowed: format!("{lo}..={hi}{unit}"),
        });
    }
    Ok(value)
}

/// Parses `PROTECTION_DURATION_MINUTES` (1..=2880).
///
/// # Errors
/// When the text is not a whole number or is out of range.
pub fn parse_duration_minutes(raw: &str) -> Result<u16, SettingsError> {
    let (lo, hi) = DURATION_MINUTES_RANGE;
    let v = parse_in_range(
        env::DURATION_MINUTES,
        raw,
        (u64::from(lo), u64::from(hi)),
        "minutes",
    )?;
    Ok(u16::try_from(v).unwrap_or(hi))
}

/// Parses `PROTECTION_MAINTAIN_PERCENT` (0..=100).
///
/// # Errors
/// When the text is not a whole number or is out of range.
pub fn parse_maintain_percent(raw: &str) -> Result<u8, SettingsError> {
    parse_percent(env::MAINTAIN_PERCENT, raw, (0, 100))
}

/// Parses `PROTECTION_REFRESH_PERCENT` (1..=99).
///
/// # Errors
/// When the text is not a whole number or is out of range.
pub fn parse_refresh_percent(raw: &str) -> Result<u8, SettingsError> {
    parse_percent(env::REFRESH_PERCENT, raw, REFRESH_PERCENT_RANGE)
}

fn parse_percent(
    variable: &'static str,
    raw: &str,
    (lo, hi): (u8, u8),
) -> Result<u8, SettingsError> {
    let v = parse_in_range(variable, raw, (u64::from(lo), u64::from(hi)), "percent")?;
    Ok(u8::try_from(v).unwrap_or(hi))
}

/// Parses a whole number and checks it against `range` (inclusive); errors name
/// `variable`, and `unit` (may be empty) follows the range in the message.
///
/// Only plain decimal digits are accepted (no sign, no exponent); a number too large
/// for any range is out of range rather than unreadable.
///
/// # Errors
/// When the text is not a whole number or is out of range.
pub fn parse_in_range(
    variable: &'static str,
    raw: &str,
    range: (u64, u64),
    unit: &str,
) -> Result<u64, SettingsError> {
    let text = raw.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SettingsError::Invalid {
            name: variable,
            value: raw.to_owned(),
            reason: "expected a whole number".to_owned(),
        });
    }
    // All digits: parsing fails only on overflow, which is past any range.
    let value = text.parse::<u64>().unwrap_or(u64::MAX);
    check_range(variable, value, range, unit).map_err(|e| match e {
        SettingsError::OutOfRange { name, allowed, .. } => SettingsError::OutOfRange {
            name,
            value: text.to_owned(),
            allowed,
        },
        other => other,
    })
}

/// Parses a millisecond setting and checks it against `range`.
///
/// # Errors
/// When the text is not a whole number or is out of range.
pub fn parse_millis(
    variable: &'static str,
    raw: &str,
    range: (u64, u64),
) -> Result<Duration, SettingsError> {
    parse_in_range(variable, raw, range, "ms").map(Duration::from_millis)
}

/// How protection is acquired, refreshed and released.
///
/// Build one with [`ProtectionSettings::builder`]; every value is range-checked by
/// [`ProtectionSettingsBuilder::build`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtectionSettings {
    duration_minutes: u16,
    maintain_percent: u8,
    refresh_percent: u8,
    check_interval: Duration,
    min_put_interval: Duration,
    request_timeout: Duration,
    acquire_timeout: Duration,
}

impl Default for ProtectionSettings {
    /// The original `ProtectionManager`'s defaults: 5 minutes, maintain 10 %,
    /// refresh 80 %, check every 10 s; plus at most one PUT a second.
    fn default() -> Self {
        Self {
            duration_minutes: 5,
            maintain_percent: 10,
            refresh_percent: 80,
            check_interval: Duration::from_secs(10),
            min_put_interval: Duration::from_secs(1),
            request_timeout: Duration::from_secs(8),
            acquire_timeout: Duration::from_secs(30),
        }
    }
}

impl ProtectionSettings {
    /// Starts from the defaults.
    pub fn builder() -> ProtectionSettingsBuilder {
        ProtectionSettingsBuilder {
            inner: Self::default(),
            names: Names::CODE,
        }
    }

    /// Starts from these settings, to change some of them.
    pub fn to_builder(&self) -> ProtectionSettingsBuilder {
        ProtectionSettingsBuilder {
            inner: self.clone(),
            names: Names::CODE,
        }
    }

    /// Reads the `PROTECTION_*` environment variables, keeping `self` for those unset.
    ///
    /// # Errors
    /// When a variable is set to a value that does not parse or is out of range.
    pub fn with_env(&self) -> Result<Self, SettingsError> {
        self.with_vars(|name| std::env::var(name).ok())
    }

    /// Like [`with_env`](Self::with_env), with the variables looked up by `lookup`.
    ///
    /// # Errors
    /// When a variable is set to a value that does not parse or is out of range.
    pub fn with_vars(
        &self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, SettingsError> {
        let mut b = self.to_builder();
        if let Some(v) = lookup(env::DURATION_MINUTES) {
            b = b.duration_minutes(parse_duration_minutes(&v)?);
            b.names.duration_minutes = env::DURATION_MINUTES;
        }
        if let Some(v) = lookup(env::MAINTAIN_PERCENT) {
            b = b.maintain_percent(parse_maintain_percent(&v)?);
            b.names.maintain_percent = env::MAINTAIN_PERCENT;
        }
        if let Some(v) = lookup(env::REFRESH_PERCENT) {
            b = b.refresh_percent(parse_refresh_percent(&v)?);
            b.names.refresh_percent = env::REFRESH_PERCENT;
        }
        let millis = [
            (env::CHECK_INTERVAL_MS, CHECK_INTERVAL_MS_RANGE),
            (env::MIN_PUT_INTERVAL_MS, MIN_PUT_INTERVAL_MS_RANGE),
            (env::REQUEST_TIMEOUT_MS, REQUEST_TIMEOUT_MS_RANGE),
            (env::ACQUIRE_TIMEOUT_MS, ACQUIRE_TIMEOUT_MS_RANGE),
        ];
        for (name, range) in millis {
            if let Some(v) = lookup(name) {
                let d = parse_millis(name, &v, range)?;
                b = match name {
                    env::CHECK_INTERVAL_MS => b.check_interval(d),
                    env::MIN_PUT_INTERVAL_MS => b.min_put_interval(d),
                    env::REQUEST_TIMEOUT_MS => b.request_timeout(d),
                    _ => b.acquire_timeout(d),
                };
                let slot = match name {
                    env::CHECK_INTERVAL_MS => &mut b.names.check_interval,
                    env::MIN_PUT_INTERVAL_MS => &mut b.names.min_put_interval,
                    env::REQUEST_TIMEOUT_MS => &mut b.names.request_timeout,
                    _ => &mut b.names.acquire_timeout,
                };
                *slot = name;
            }
        }
        b.build()
    }

    /// How long each acquire or refresh protects the task, in minutes.
    #[must_use]
    pub fn duration_minutes(&self) -> u16 {
        self.duration_minutes
    }

    /// How long each acquire or refresh protects the task.
    #[must_use]
    pub fn duration(&self) -> Duration {
        Duration::from_secs(u64::from(self.duration_minutes) * 60)
    }

    /// Share of the duration that protection is kept after the last successful PUT.
    #[must_use]
    pub fn maintain_percent(&self) -> u8 {
        self.maintain_percent
    }

    /// Share of the duration after which a held protection is refreshed.
    #[must_use]
    pub fn refresh_percent(&self) -> u8 {
        self.refresh_percent
    }

    /// How long protection is kept after the last successful enable PUT, once no
    /// holder is left. Short jobs then do not cost a PUT pair each.
    #[must_use]
    pub fn maintain_window(&self) -> Duration {
        self.duration() * u32::from(self.maintain_percent) / 100
    }

    /// How long before the expiry a held protection is refreshed.
    #[must_use]
    pub fn refresh_lead(&self) -> Duration {
        self.duration() * u32::from(100 - self.refresh_percent) / 100
    }

    /// The longest wait between two attempts: the cap of the retry backoff, and the
    /// cool-down after ECS refuses protection.
    #[must_use]
    pub fn check_interval(&self) -> Duration {
        self.check_interval
    }

    /// The least time between the starts of two PUTs; also how long no holder must
    /// be seen before a release, so a stream of short jobs does not flap.
    #[must_use]
    pub fn min_put_interval(&self) -> Duration {
        self.min_put_interval
    }

    /// How long one request may take before it counts as failed.
    #[must_use]
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// How long [`TaskProtection::acquire`](crate::TaskProtection::acquire) waits.
    #[must_use]
    pub fn acquire_timeout(&self) -> Duration {
        self.acquire_timeout
    }
}

/// Builder for [`ProtectionSettings`]; [`build`](Self::build) checks every range.
#[derive(Debug, Clone)]
#[must_use]
pub struct ProtectionSettingsBuilder {
    inner: ProtectionSettings,
    names: Names,
}

/// Where each value came from, for errors: the builder method that set it, or the
/// environment variable it was read from.
#[derive(Debug, Clone, Copy)]
struct Names {
    duration_minutes: &'static str,
    maintain_percent: &'static str,
    refresh_percent: &'static str,
    check_interval: &'static str,
    min_put_interval: &'static str,
    request_timeout: &'static str,
    acquire_timeout: &'static str,
}

impl Names {
    const CODE: Self = Self {
        duration_minutes: "duration_minutes",
        maintain_percent: "maintain_percent",
        refresh_percent: "refresh_percent",
        check_interval: "check_interval",
        min_put_interval: "min_put_interval",
        request_timeout: "request_timeout",
        acquire_timeout: "acquire_timeout",
    };
}

impl ProtectionSettingsBuilder {
    /// Protection duration in minutes, 1..=2880.
    pub fn duration_minutes(mut self, minutes: u16) -> Self {
        self.inner.duration_minutes = minutes;
        self
    }

    /// Maintain percentage, 0..=100.
    pub fn maintain_percent(mut self, percent: u8) -> Self {
        self.inner.maintain_percent = percent;
        self
    }

    /// Refresh percentage, 1..=99.
    pub fn refresh_percent(mut self, percent: u8) -> Self {
        self.inner.refresh_percent = percent;
        self
    }

    /// Check interval: the retry backoff cap and the cool-down after a rejection.
    pub fn check_interval(mut self, interval: Duration) -> Self {
        self.inner.check_interval = interval;
        self
    }

    /// The least time between two PUTs, and the quiet time before a release
    /// (default 1 s).
    pub fn min_put_interval(mut self, interval: Duration) -> Self {
        self.inner.min_put_interval = interval;
        self
    }

    /// Timeout of a single request (default 8 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.inner.request_timeout = timeout;
        self
    }

    /// Timeout of an awaited acquire (default 30 s).
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.inner.acquire_timeout = timeout;
        self
    }

    /// Checks every value against its range.
    ///
    /// # Errors
    /// The first value out of range, named by where it came from: its environment
    /// variable, or the builder method that set it.
    pub fn build(self) -> Result<ProtectionSettings, SettingsError> {
        let (s, n) = (self.inner, self.names);
        check_range(
            n.duration_minutes,
            s.duration_minutes,
            DURATION_MINUTES_RANGE,
            "minutes",
        )?;
        check_range(n.maintain_percent, s.maintain_percent, (0, 100), "percent")?;
        check_range(
            n.refresh_percent,
            s.refresh_percent,
            REFRESH_PERCENT_RANGE,
            "percent",
        )?;
        let millis = [
            (n.check_interval, s.check_interval, CHECK_INTERVAL_MS_RANGE),
            (
                n.min_put_interval,
                s.min_put_interval,
                MIN_PUT_INTERVAL_MS_RANGE,
            ),
            (
                n.request_timeout,
                s.request_timeout,
                REQUEST_TIMEOUT_MS_RANGE,
            ),
            (
                n.acquire_timeout,
                s.acquire_timeout,
                ACQUIRE_TIMEOUT_MS_RANGE,
            ),
        ];
        for (name, value, range) in millis {
            let ms = u64::try_from(value.as_millis()).unwrap_or(u64::MAX);
            check_range(name, ms, range, "ms")?;
        }
        check_refresh_timing(&s, &n)?;
        Ok(s)
    }
}

/// A refresh must leave time for one request to time out and a retry to follow the
/// spacing before the protection runs out, and the spacing after an enable must not
/// hold its own refresh back past that point: otherwise every refresh would lapse.
fn check_refresh_timing(s: &ProtectionSettings, n: &Names) -> Result<(), SettingsError> {
    let secs = |d: Duration| d.as_secs_f64();
    let lead = s.refresh_lead();
    let needed = s.request_timeout + s.min_put_interval;
    if lead < needed {
        return Err(SettingsError::Conflict(format!(
            "{}={} refreshes {}s before the expiry of {} minute(s), less than {} + {} = {}s, \
             the time for one request to time out and a retry to follow: lower the refresh \
             percentage, or the timeout or the spacing",
            n.refresh_percent,
            s.refresh_percent,
            secs(lead),
            s.duration_minutes,
            n.request_timeout,
            n.min_put_interval,
            secs(needed),
        )));
    }
    let first_refresh = s.duration().saturating_sub(lead);
    if s.min_put_interval > first_refresh {
        return Err(SettingsError::Conflict(format!(
            "{}={} holds every PUT back {}s, past the refresh due {}s after an enable \
             ({}={}, {}={}): lower the spacing",
            n.min_put_interval,
            s.min_put_interval.as_millis(),
            secs(s.min_put_interval),
            secs(first_refresh),
            n.duration_minutes,
            s.duration_minutes,
            n.refresh_percent,
            s.refresh_percent,
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_names_variable_value_and_range() {
        let err = parse_duration_minutes("2881").unwrap_err();
        assert_eq!(
            err.to_string(),
            "PROTECTION_DURATION_MINUTES=2881 is out of range: allowed 1..=2880 minutes"
        );
        let err = parse_refresh_percent("0").unwrap_err();
        assert!(
            matches!(err, SettingsError::OutOfRange { name, .. } if name == env::REFRESH_PERCENT)
        );
        assert_eq!(parse_maintain_percent("0"), Ok(0));
        assert!(parse_maintain_percent("101").is_err());
    }

    #[test]
    fn junk_is_invalid_not_a_panic() {
        for raw in ["", "abc", "-5", "+5", "1e3", "1.5", " "] {
            let err = parse_duration_minutes(raw).unwrap_err();
            assert!(
                matches!(err, SettingsError::Invalid { .. }),
                "{raw:?}: {err}"
            );
            assert!(err.to_string().contains(env::DURATION_MINUTES), "{err}");
        }
        let err = parse_in_range("X", " 99999999999999999999999 ", (0, 10), "").unwrap_err();
        assert_eq!(
            err.to_string(),
            "X=99999999999999999999999 is out of range: allowed 0..=10"
        );
        assert_eq!(parse_in_range("X", " 7 ", (1, 10), ""), Ok(7));
    }

    #[test]
    fn env_overrides_defaults_and_keeps_the_rest() {
        let base = ProtectionSettings::builder()
            .duration_minutes(30)
            .maintain_percent(0)
            .build()
            .unwrap();
        let s = base
            .with_vars(|k| (k == env::REFRESH_PERCENT).then(|| "50".to_owned()))
            .unwrap();
        assert_eq!(s.duration_minutes(), 30);
        assert_eq!(s.maintain_percent(), 0);
        assert_eq!(s.refresh_percent(), 50);
        assert_eq!(s.refresh_lead(), Duration::from_secs(15 * 60));
        let err = base
            .with_vars(|k| (k == env::CHECK_INTERVAL_MS).then(|| "5".to_owned()))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "PROTECTION_CHECK_INTERVAL_MS=5 is out of range: allowed 100..=3600000 ms"
        );
    }

    #[test]
    fn windows_follow_the_percentages() {
        let s = ProtectionSettings::builder()
            .duration_minutes(1)
            .maintain_percent(10)
            .refresh_percent(80)
            .build()
            .unwrap();
        assert_eq!(s.maintain_window(), Duration::from_secs(6));
        assert_eq!(s.refresh_lead(), Duration::from_secs(12));
        assert!(
            ProtectionSettings::builder()
                .duration_minutes(0)
                .build()
                .is_err()
        );
    }

    #[test]
    fn values_set_in_code_are_named_by_their_builder_method_not_a_variable() {
        let err = ProtectionSettings::builder()
            .duration_minutes(0)
            .build()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "duration_minutes=0 is out of range: allowed 1..=2880 minutes"
        );
        let err = ProtectionSettings::builder()
            .check_interval(Duration::ZERO)
            .build()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "check_interval=0 is out of range: allowed 100..=3600000 ms"
        );
        // A huge value is out of range, not an overflow.
        let err = ProtectionSettings::builder()
            .acquire_timeout(Duration::MAX)
            .build()
            .unwrap_err();
        assert!(err.to_string().starts_with("acquire_timeout="), "{err}");
        let err = ProtectionSettings::builder()
            .duration_minutes(1)
            .refresh_percent(100)
            .build()
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("refresh_percent=100"), "{text}");
        assert!(!text.contains("PROTECTION_"), "{text}");
        // From the environment, the variable.
        let err = ProtectionSettings::default()
            .with_vars(|k| (k == env::REFRESH_PERCENT).then(|| "100".to_owned()))
            .unwrap_err();
        assert!(
            err.to_string().contains("PROTECTION_REFRESH_PERCENT=100"),
            "{err}"
        );
    }

    #[test]
    fn settings_that_would_defeat_the_refresh_are_refused_naming_the_conflict() {
        let worker = || {
            ProtectionSettings::builder()
                .duration_minutes(1)
                .maintain_percent(10)
                .refresh_percent(80)
        };
        assert!(worker().build().is_ok());
        // A spacing as long as the refresh lead: every refresh would wait to expiry.
        let err = worker()
            .min_put_interval(Duration::from_secs(60))
            .build()
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, SettingsError::Conflict(_)), "{text}");
        assert!(!text.contains('\n'), "{text}");
        // Set in code: named by the builder's methods.
        for name in ["refresh_percent", "request_timeout", "min_put_interval"] {
            assert!(text.contains(name), "{text}");
        }
        assert!(!text.contains("PROTECTION_"), "{text}");
        // Refreshing at the very expiry is out of range; 0.6 s before it, a conflict.
        let err = worker().refresh_percent(100).build().unwrap_err();
        assert!(
            err.to_string()
                .contains("refresh_percent=100 is out of range"),
            "{err}"
        );
        let err = worker().refresh_percent(99).build().unwrap_err();
        assert!(
            err.to_string().contains("refreshes 0.6s before the expiry"),
            "{err}"
        );
        // A spacing that holds back the first refresh, with a long enough lead.
        let err = worker()
            .refresh_percent(1)
            .min_put_interval(Duration::from_secs(2))
            .build()
            .unwrap_err();
        assert!(
            err.to_string().contains("past the refresh due 0.6s"),
            "{err}"
        );
        // The same checks from the environment, named by the variables.
        let err = ProtectionSettings::default()
            .with_vars(|k| (k == env::REFRESH_PERCENT).then(|| "99".to_owned()))
            .unwrap_err();
        assert!(matches!(err, SettingsError::Conflict(_)), "{err}");
        assert!(err.to_string().contains(env::REFRESH_PERCENT), "{err}");
    }
}
