//! CloudWatch's rules for an EMF line, each checked on its own, so a test can hold
//! every line a recorder writes against them.
//!
//! Sources: the Embedded Metric Format specification (its document structure and its
//! JSON schema: the `_aws` metadata, `Timestamp`, `CloudWatchMetrics` directives with
//! `Namespace`, `Dimensions` and at most 100 `Metrics`, dimension sets referring to
//! top-level string members, metric names referring to top-level numbers or arrays
//! of at most 100 numbers, no members beyond the specified ones in the objects it
//! defines, a 256 KB event); CloudWatch's `Dimension` (at most 30 per metric; names
//! of 1 to 255 ASCII characters, not only whitespace, no control characters, not
//! starting with `:`; values of 1 to 1024 such characters), `MetricDatum` (names of
//! 1 to 255 characters, the unit list, `StorageResolution` 1 or 60, values finite
//! and within ±2^360, `Counts` as long as `Values`) and namespace rules. The
//! distribution object (`Values`, `Counts`, `Count`, `Sum`, `Min`, `Max`) is the
//! form the OpenTelemetry collector's EMF exporter writes for histograms.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

const UNITS: [&str; 27] = [
    "Seconds",
    "Microseconds",
    "Milliseconds",
    "Bytes",
    "Kilobytes",
    "Megabytes",
    "Gigabytes",
    "Terabytes",
    "Bits",
    "Kilobits",
    "Megabits",
    "Gigabits",
    "Terabits",
    "Percent",
    "Count",
    "Bytes/Second",
    "Kilobytes/Second",
    "Megabytes/Second",
    "Gigabytes/Second",
    "Terabytes/Second",
    "Bits/Second",
    "Kilobits/Second",
    "Megabits/Second",
    "Gigabits/Second",
    "Terabits/Second",
    "Count/Second",
    "None",
];

/// 2^360, the largest magnitude CloudWatch stores.
fn max_value() -> f64 {
    2f64.powi(360)
}

/// Checks `line` against every rule; returns the document.
pub(crate) fn check(line: &str) -> Result<Map<String, Value>, String> {
    if line.contains('\n') {
        return Err("not one line".into());
    }
    if line.len() > 256 * 1024 {
        return Err(format!(
            "{} bytes: over the 256 KB of a log event",
            line.len()
        ));
    }
    // The whole message is one JSON object, nothing before or after.
    let doc: Value = serde_json::from_str(line).map_err(|e| format!("not one JSON value: {e}"))?;
    let Value::Object(root) = doc else {
        return Err("not a JSON object".into());
    };
    let aws = object(root.get("_aws"), "_aws")?;
    only_members(aws, &["Timestamp", "CloudWatchMetrics"], "_aws")?;
    let timestamp = aws
        .get("Timestamp")
        .and_then(Value::as_u64)
        .ok_or("Timestamp is not a whole number")?;
    // Milliseconds, not seconds: after 2001 and before 2100.
    if !(1_000_000_000_000..4_102_444_800_000).contains(&timestamp) {
        return Err(format!(
            "Timestamp {timestamp} is not milliseconds since 1970"
        ));
    }
    let directives = aws
        .get("CloudWatchMetrics")
        .and_then(Value::as_array)
        .ok_or("CloudWatchMetrics is not an array")?;
    if directives.is_empty() {
        return Err("no metric directive".into());
    }
    let mut metric_names = BTreeSet::new();
    let mut dimension_names = BTreeSet::new();
    for directive in directives {
        let directive = object(Some(directive), "a metric directive")?;
        only_members(
            directive,
            &["Namespace", "Dimensions", "Metrics"],
            "a directive",
        )?;
        namespace(
            directive
                .get("Namespace")
                .and_then(Value::as_str)
                .ok_or("no Namespace")?,
        )?;
        let sets = directive
            .get("Dimensions")
            .and_then(Value::as_array)
            .ok_or("Dimensions is not an array")?;
        if sets.is_empty() {
            return Err("Dimensions holds no dimension set".into());
        }
        for set in sets {
            let set = set.as_array().ok_or("a dimension set is not an array")?;
            if set.len() > 30 {
                return Err(format!("{} dimensions in a set: at most 30", set.len()));
            }
            let mut seen = BTreeSet::new();
            for name in set {
                let name = name.as_str().ok_or("a dimension name is not a string")?;
                if !seen.insert(name) {
                    return Err(format!("dimension {name} twice in a set"));
                }
                let value = root
                    .get(name)
                    .ok_or(format!("dimension {name} is not a member"))?
                    .as_str()
                    .ok_or(format!("dimension {name} is not a string"))?;
                dimension(name, value)?;
                dimension_names.insert(name.to_owned());
            }
        }
        let metrics = directive
            .get("Metrics")
            .and_then(Value::as_array)
            .ok_or("Metrics is not an array")?;
        if metrics.len() > 100 {
            return Err(format!(
                "{} metrics in a directive: at most 100",
                metrics.len()
            ));
        }
        for definition in metrics {
            let definition = object(Some(definition), "a metric definition")?;
            only_members(
                definition,
                &["Name", "Unit", "StorageResolution"],
                "a metric definition",
            )?;
            let name = definition
                .get("Name")
                .and_then(Value::as_str)
                .ok_or("a metric without a Name")?;
            if name.is_empty() || name.len() > 255 {
                return Err(format!("metric name {name:?}: 1 to 255 characters"));
            }
            if !metric_names.insert(name.to_owned()) {
                return Err(format!("metric {name} defined twice"));
            }
            if let Some(unit) = definition.get("Unit") {
                let unit = unit.as_str().ok_or("a Unit is not a string")?;
                if !UNITS.contains(&unit) {
                    return Err(format!("{unit:?} is not a CloudWatch unit"));
                }
            }
            let resolution = definition.get("StorageResolution");
            if resolution.is_some_and(|r| r.as_u64() != Some(1) && r.as_u64() != Some(60)) {
                return Err(format!("StorageResolution {resolution:?}: 1 or 60"));
            }
            metric_value(
                name,
                root.get(name)
                    .ok_or(format!("metric {name} is not a member"))?,
            )?;
        }
    }
    if let Some(both) = metric_names.intersection(&dimension_names).next() {
        return Err(format!("{both} is both a metric and a dimension"));
    }
    Ok(root)
}

fn object<'a>(v: Option<&'a Value>, what: &str) -> Result<&'a Map<String, Value>, String> {
    v.and_then(Value::as_object)
        .ok_or(format!("{what} is not an object"))
}

fn only_members(o: &Map<String, Value>, allowed: &[&str], what: &str) -> Result<(), String> {
    match o.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(extra) => Err(format!(
            "{what} has a member the specification does not define: {extra}"
        )),
        None => Ok(()),
    }
}

fn namespace(ns: &str) -> Result<(), String> {
    if ns.is_empty() || ns.len() > 255 {
        return Err(format!("namespace {ns:?}: 1 to 255 characters"));
    }
    if ns.starts_with("AWS/") {
        return Err(format!("namespace {ns:?} is reserved"));
    }
    if !ns
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || ".-_/#: ".contains(c))
    {
        return Err(format!(
            "namespace {ns:?} has a character CloudWatch refuses"
        ));
    }
    Ok(())
}

fn dimension(name: &str, value: &str) -> Result<(), String> {
    let text = |what: &str, s: &str, max: usize| {
        let ok = !s.is_empty()
            && s.len() <= max
            && s.is_ascii()
            && !s.bytes().any(|b| b.is_ascii_control())
            && !s.bytes().all(|b| b.is_ascii_whitespace());
        if ok {
            Ok(())
        } else {
            Err(format!("dimension {what} {s:?} is refused"))
        }
    };
    text("name", name, 255)?;
    if name.starts_with(':') {
        return Err(format!("dimension name {name:?} starts with ':'"));
    }
    text("value", value, 1024)
}

fn number(name: &str, v: &Value) -> Result<f64, String> {
    let n = v
        .as_f64()
        .ok_or(format!("metric {name}: {v} is not a number"))?;
    if n.is_finite() && n.abs() <= max_value() {
        Ok(n)
    } else {
        Err(format!("metric {name}: {n} is out of CloudWatch's range"))
    }
}

fn numbers(name: &str, v: Option<&Value>, what: &str) -> Result<Vec<f64>, String> {
    let array = v
        .and_then(Value::as_array)
        .ok_or(format!("metric {name}: {what} is not an array"))?;
    if array.is_empty() || array.len() > 100 {
        return Err(format!("metric {name}: {} {what}: 1 to 100", array.len()));
    }
    array.iter().map(|x| number(name, x)).collect()
}

fn metric_value(name: &str, v: &Value) -> Result<(), String> {
    match v {
        Value::Number(_) => number(name, v).map(drop),
        Value::Array(_) => numbers(name, Some(v), "values").map(drop),
        Value::Object(o) => {
            only_members(o, &["Values", "Counts", "Count", "Sum", "Min", "Max"], name)?;
            let values = numbers(name, o.get("Values"), "Values")?;
            let counts = numbers(name, o.get("Counts"), "Counts")?;
            let mut distinct = values.clone();
            distinct.sort_by(f64::total_cmp);
            distinct.dedup();
            if distinct.len() != values.len() {
                return Err(format!("metric {name}: a value listed twice in Values"));
            }
            if values.len() != counts.len() {
                return Err(format!("metric {name}: Counts not as long as Values"));
            }
            if counts.iter().any(|c| *c <= 0.0 || c.fract() != 0.0) {
                return Err(format!(
                    "metric {name}: a count that is not a positive whole number"
                ));
            }
            let count = o
                .get("Count")
                .and_then(Value::as_u64)
                .ok_or(format!("metric {name}: no Count"))?;
            #[allow(clippy::cast_precision_loss)]
            if counts.iter().sum::<f64>() != count as f64 {
                return Err(format!("metric {name}: Counts do not add up to Count"));
            }
            let min = number(name, o.get("Min").ok_or("no Min")?)?;
            let max = number(name, o.get("Max").ok_or("no Max")?)?;
            let sum = number(name, o.get("Sum").ok_or("no Sum")?)?;
            if values.iter().any(|x| *x < min || *x > max) {
                return Err(format!("metric {name}: a value outside Min..=Max"));
            }
            let weighted: f64 = values.iter().zip(&counts).map(|(v, c)| v * c).sum();
            if (weighted - sum).abs() > sum.abs().max(1.0) * 1e-9 {
                return Err(format!(
                    "metric {name}: Values × Counts add up to {weighted}, Sum is {sum}"
                ));
            }
            Ok(())
        }
        _ => Err(format!(
            "metric {name}: {v} is neither a number nor numbers"
        )),
    }
}
