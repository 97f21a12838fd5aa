//! What CloudWatch accepts in an EMF line, in one place.
//!
//! From the EMF specification and CloudWatch's `MetricDatum` and `Dimension` types:
//! a metric name is 1 to 255 characters; a dimension name is 1 to 255 ASCII
//! characters, not only whitespace, without control characters and not starting
//! with `:`; a dimension value is 1 to 1024 ASCII characters, not only whitespace,
//! without control characters; a metric has at most 30 dimensions; a directive holds
//! at most 100 metrics; a value is finite and within ±2^360.

/// Dimensions in one dimension set: CloudWatch's limit per metric.
pub(crate) const MAX_DIMENSIONS: usize = 30;
/// Metrics in one line. The specification allows 100 per directive; one directive
/// per line keeps every line simple for any reader.
pub(crate) const MAX_METRICS_PER_LINE: usize = 100;
/// The largest magnitude CloudWatch stores.
pub(crate) const MAX_VALUE: f64 = 2.348_542_582_773_833_2e108; // 2^360

/// Whether CloudWatch stores `value`: finite, and no further from zero than 2^360.
pub(crate) fn is_cloudwatch_value(value: f64) -> bool {
    value.is_finite() && value.abs() <= MAX_VALUE
}

/// Whether `name` can name a metric: 1 to 255 bytes.
pub(crate) fn check_metric_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 255 {
        return Err(format!(
            "a metric name has 1 to 255 characters, not {}",
            name.len()
        ));
    }
    Ok(())
}

/// Whether CloudWatch accepts a dimension `name` with `value`.
///
/// # Errors
/// Says what is wrong with the name or the value.
pub fn check_dimension(name: &str, value: &str) -> Result<(), String> {
    let text = |what: &str, s: &str, max: usize| {
        if s.is_empty() || s.len() > max {
            Err(format!("a dimension {what} has 1 to {max} characters"))
        } else if !s.is_ascii() {
            Err(format!("a dimension {what} is ASCII only"))
        } else if s.bytes().any(|b| b.is_ascii_control()) {
            Err(format!("a dimension {what} has no control characters"))
        } else if s.bytes().all(|b| b.is_ascii_whitespace()) {
            Err(format!("a dimension {what} is not only whitespace"))
        } else {
            Ok(())
        }
    };
    text("name", name, 255)?;
    if name.starts_with(':') {
        return Err("a dimension name does not start with ':'".to_owned());
    }
    text("value", value, 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_value_is_two_to_the_360() {
        assert_eq!(MAX_VALUE, 2f64.powi(360));
        assert!(is_cloudwatch_value(-MAX_VALUE));
        assert!(!is_cloudwatch_value(MAX_VALUE * 2.0));
        assert!(!is_cloudwatch_value(f64::NAN));
        assert!(!is_cloudwatch_value(f64::NEG_INFINITY));
    }

    #[test]
    fn dimensions_follow_cloudwatch() {
        assert!(check_dimension("Service", "worker").is_ok());
        assert!(check_dimension(&"n".repeat(255), &"v".repeat(1024)).is_ok());
        for (name, value) in [
            ("", "v"),
            ("n", ""),
            (&"n".repeat(256) as &str, "v"),
            ("n", &"v".repeat(1025) as &str),
            (":n", "v"),
            ("   ", "v"),
            ("n", " \t"),
            ("n\n", "v"),
            ("n", "v\u{7f}"),
            ("caf\u{e9}", "v"),
            ("n", "caf\u{e9}"),
        ] {
            assert!(check_dimension(name, value).is_err(), "{name:?}={value:?}");
        }
    }
}
