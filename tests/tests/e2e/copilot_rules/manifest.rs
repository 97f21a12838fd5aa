//! Copilot's validation of a service manifest (validate.go and the manifest types),
//! as far as our manifests use it.

use super::*;

// --- the manifest rules --------------------------------------------------------------------

/// `AdvancedCount.validate` and the range checks under it (validate.go), with the
/// messages Copilot prints. `Ok` for a plain number.
pub(super) fn validate_count(kind: Kind, count: &Value) -> Result<(), String> {
    let map = match count {
        Value::Number(n) if n.as_u64().is_some() => return Ok(()),
        Value::Mapping(map) => map,
        other => return Err(format!("count is {other:?}: a number or a map")),
    };
    let set = |field: &str| map.get(field).is_some_and(|v| !v.is_null());
    let scaling = kind.scaling_fields();
    let quoted = |fields: &[&str]| {
        let q: Vec<String> = fields.iter().map(|f| format!("\"{f}\"")).collect();
        match q.as_slice() {
            [] => String::new(),
            [one] => one.clone(),
            [init @ .., last] => format!("{} or {last}", init.join(", ")),
        }
    };
    let invalid: Vec<&str> = kind
        .invalid_scaling_fields()
        .iter()
        .copied()
        .filter(|f| set(f))
        .collect();
    if !invalid.is_empty() {
        return Err(format!(
            "autoscaling fields {} are invalid for this workload type",
            quoted(&invalid)
        ));
    }
    let has_scaling = scaling.iter().any(|f| set(f));
    if set("spot") && (set("range") || has_scaling) {
        return Err(format!(
            "must specify one, not both, of \"spot\" and \"range/{}\"",
            scaling.join("/")
        ));
    }
    if let Some(range) = map.get("range") {
        validate_range(range)?;
    }
    if !set("range") && has_scaling {
        return Err(format!(
            "\"range\" must be specified if {} are specified",
            quoted(scaling)
        ));
    }
    if set("range") && !has_scaling {
        return Err(format!(
            "must specify at least one of {} if \"range\" is specified",
            quoted(scaling)
        ));
    }
    if set("cooldown") && !has_scaling {
        return Err(format!(
            "must specify at least one of {} if \"cooldown\" is specified",
            quoted(scaling)
        ));
    }
    for field in ["cpu_percentage", "memory_percentage"] {
        if let Some(v) = map.get(field) {
            let value = v.get("value").unwrap_or(v);
            match value.as_i64() {
                Some(0..=100) => {}
                _ => {
                    return Err(format!(
                        "validate \"{field}\": percentage value {value:?} must be an integer from 0 to 100"
                    ));
                }
            }
        }
    }
    if let Some(queue) = map.get("queue_delay") {
        let latency = text_at(queue, "acceptable_latency").and_then(|d| go_duration(&d));
        let processing = text_at(queue, "msg_processing_time").and_then(|d| go_duration(&d));
        match (latency, processing) {
            (Some(l), Some(p)) if l.is_zero() || p.is_zero() => {
                return Err(
                    "\"acceptable_latency\" and \"msg_processing_time\" cannot be 0".into(),
                );
            }
            (Some(l), Some(p)) if p > l => {
                return Err(
                    "\"msg_processing_time\" cannot be longer than \"acceptable_latency\"".into(),
                );
            }
            (Some(_), Some(_)) => {}
            _ => {
                return Err("queue_delay needs both \"acceptable_latency\" and \"msg_processing_time\", as durations".into());
            }
        }
    }
    Ok(())
}

/// `Range.validate`: `min-max` (`^(\d+)-(\d+)$`, min ≤ max) or `{min, max, spot_from}`.
pub(super) fn validate_range(range: &Value) -> Result<(), String> {
    match range {
        Value::String(band) => {
            let parsed = band
                .split_once('-')
                .filter(|(a, b)| {
                    !a.is_empty()
                        && !b.is_empty()
                        && a.chars().all(|c| c.is_ascii_digit())
                        && b.chars().all(|c| c.is_ascii_digit())
                })
                .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)));
            match parsed {
                Some((min, max)) if min <= max => Ok(()),
                Some((min, max)) => Err(format!(
                    "validate \"range\": min value {min} cannot be greater than max value {max}"
                )),
                None => Err(format!(
                    "validate \"range\": invalid range value {band}: valid format is ${{min}}-${{max}}"
                )),
            }
        }
        Value::Mapping(_) => {
            let min = at(range, "min").and_then(Value::as_u64);
            let max = at(range, "max").and_then(Value::as_u64);
            match (min, max) {
                (Some(min), Some(max)) if min <= max => Ok(()),
                (Some(min), Some(max)) => Err(format!(
                    "validate \"range\": min value {min} cannot be greater than max value {max}"
                )),
                _ => Err("validate \"range\": \"min/max\" must be specified".into()),
            }
        }
        other => Err(format!(
            "validate \"range\": {other:?} is neither min-max nor a map"
        )),
    }
}

/// `validShortPlatforms` (workload_ecs.go): the `os/arch` strings `platform` accepts.
pub(super) const PLATFORMS: [&str; 6] = [
    "linux/amd64",
    "linux/x86_64",
    "linux/arm",
    "linux/arm64",
    "windows/amd64",
    "windows/x86_64",
];

/// A field's expected YAML shape.
#[derive(Debug, Clone, Copy)]
pub(super) enum Shape {
    Text,
    Whole,
    Flag,
    /// A Go duration (`30s`, `5m`), which Copilot turns into whole seconds.
    Duration,
    TextList,
    Any,
}

pub(super) fn shape_problem(path: &str, value: &Value, shape: Shape) -> Option<String> {
    let ok = match shape {
        Shape::Text => matches!(value, Value::String(_)),
        Shape::Whole => value.as_u64().is_some(),
        Shape::Flag => value.as_bool().is_some(),
        Shape::Duration => value.as_str().and_then(go_duration).is_some(),
        Shape::TextList => value
            .as_sequence()
            .is_some_and(|l| l.iter().all(|v| v.as_str().is_some())),
        Shape::Any => true,
    };
    (!ok).then(|| format!("{path} is {value:?}, which Copilot does not read as {shape:?}"))
}

/// Keys a map may have, each with its shape; `None` for a map checked further down.
pub(super) type Fields = &'static [(&'static str, Option<Shape>)];

/// The keys of `node` that Copilot's struct for it does not have: it would drop them.
pub(super) fn unknown_keys(path: &str, node: &Value, fields: Fields, problems: &mut Vec<String>) {
    let Some(map) = node.as_mapping() else {
        problems.push(format!("{path} is not a map"));
        return;
    };
    for (key, value) in map {
        let name = text(key).unwrap_or_default();
        match fields.iter().find(|(f, _)| *f == name) {
            None => problems.push(format!(
                "{path}.{name} is not a field Copilot reads there; it would be dropped without a word"
            )),
            Some((_, Some(shape))) => {
                problems.extend(shape_problem(&format!("{path}.{name}"), value, *shape));
            }
            Some((_, None)) => {}
        }
    }
}

/// Top-level fields of a Load Balanced Web Service (lb_web_svc.go, with the inline
/// `Workload`, `ImageOverride` and `TaskConfig` of workload.go and workload_ecs.go).
pub(super) const LBWS_FIELDS: Fields = &[
    ("name", Some(Shape::Text)),
    ("type", Some(Shape::Text)),
    ("image", None),
    ("entrypoint", Some(Shape::Any)),
    ("command", Some(Shape::Any)),
    ("http", None),
    ("cpu", Some(Shape::Whole)),
    ("memory", Some(Shape::Whole)),
    ("platform", Some(Shape::Text)),
    ("count", None),
    ("exec", Some(Shape::Flag)),
    ("variables", None),
    ("env_file", Some(Shape::Text)),
    ("secrets", Some(Shape::Any)),
    ("storage", Some(Shape::Any)),
    ("logging", Some(Shape::Any)),
    ("sidecars", Some(Shape::Any)),
    ("network", Some(Shape::Any)),
    ("publish", Some(Shape::Any)),
    ("taskdef_overrides", None),
    ("nlb", Some(Shape::Any)),
    ("deployment", Some(Shape::Any)),
    ("observability", Some(Shape::Any)),
    ("environments", None),
];

/// Top-level fields of a Worker Service (worker_svc.go and the same inline parts).
pub(super) const WORKER_FIELDS: Fields = &[
    ("name", Some(Shape::Text)),
    ("type", Some(Shape::Text)),
    ("image", None),
    ("entrypoint", Some(Shape::Any)),
    ("command", Some(Shape::Any)),
    ("cpu", Some(Shape::Whole)),
    ("memory", Some(Shape::Whole)),
    ("platform", Some(Shape::Text)),
    ("count", None),
    ("exec", Some(Shape::Flag)),
    ("variables", None),
    ("env_file", Some(Shape::Text)),
    ("secrets", Some(Shape::Any)),
    ("storage", Some(Shape::Any)),
    ("logging", Some(Shape::Any)),
    ("sidecars", Some(Shape::Any)),
    ("subscribe", None),
    ("publish", Some(Shape::Any)),
    ("network", Some(Shape::Any)),
    ("taskdef_overrides", None),
    ("deployment", Some(Shape::Any)),
    ("observability", Some(Shape::Any)),
    ("environments", None),
];

/// `image`: `Image`, `ImageLocationOrBuild` (workload.go), `ImageWithPort` and the
/// container `healthcheck` (workload_ecs.go).
pub(super) const IMAGE_FIELDS: Fields = &[
    ("build", None),
    ("location", Some(Shape::Text)),
    ("credentials", Some(Shape::Text)),
    ("labels", Some(Shape::Any)),
    ("depends_on", Some(Shape::Any)),
    ("port", Some(Shape::Whole)),
    ("healthcheck", None),
];
/// `image.build` as a map: `DockerBuildArgs` (workload.go).
pub(super) const BUILD_FIELDS: Fields = &[
    ("context", Some(Shape::Text)),
    ("dockerfile", Some(Shape::Text)),
    ("args", Some(Shape::Any)),
    ("target", Some(Shape::Text)),
    ("cache_from", Some(Shape::TextList)),
];
/// `image.healthcheck`: `ContainerHealthCheck` (workload_ecs.go).
pub(super) const CONTAINER_HEALTHCHECK_FIELDS: Fields = &[
    ("command", Some(Shape::TextList)),
    ("interval", Some(Shape::Duration)),
    ("retries", Some(Shape::Whole)),
    ("timeout", Some(Shape::Duration)),
    ("start_period", Some(Shape::Duration)),
];
/// `http`: `HTTP` and its inline `RoutingRule` (http.go).
pub(super) const HTTP_FIELDS: Fields = &[
    ("alb", Some(Shape::Text)),
    ("path", Some(Shape::Text)),
    ("version", Some(Shape::Text)),
    ("healthcheck", None),
    ("stickiness", Some(Shape::Flag)),
    ("alias", Some(Shape::Any)),
    ("deregistration_delay", Some(Shape::Duration)),
    ("target_container", Some(Shape::Text)),
    ("target_port", Some(Shape::Whole)),
    ("allowed_source_ips", Some(Shape::TextList)),
    ("hosted_zone", Some(Shape::Text)),
    ("redirect_to_https", Some(Shape::Flag)),
    ("additional_rules", Some(Shape::Any)),
];
/// `http.healthcheck` as a map: `HTTPHealthCheckArgs` (svc.go).
pub(super) const HTTP_HEALTHCHECK_FIELDS: Fields = &[
    ("path", Some(Shape::Text)),
    ("port", Some(Shape::Whole)),
    ("success_codes", Some(Shape::Text)),
    ("healthy_threshold", Some(Shape::Whole)),
    ("unhealthy_threshold", Some(Shape::Whole)),
    ("timeout", Some(Shape::Duration)),
    ("interval", Some(Shape::Duration)),
    ("grace_period", Some(Shape::Duration)),
];
/// `count` as a map: `AdvancedCount` (svc.go); each value is checked by `validate_count`.
pub(super) const COUNT_FIELDS: Fields = &[
    ("spot", Some(Shape::Whole)),
    ("range", Some(Shape::Any)),
    ("cooldown", Some(Shape::Any)),
    ("cpu_percentage", Some(Shape::Any)),
    ("memory_percentage", Some(Shape::Any)),
    ("requests", Some(Shape::Any)),
    ("response_time", Some(Shape::Any)),
    ("queue_delay", Some(Shape::Any)),
];
/// `subscribe`: `SubscribeConfig`, `SQSQueue` and `DeadLetterQueue` (worker_svc.go).
pub(super) const SUBSCRIBE_FIELDS: Fields = &[("topics", Some(Shape::Any)), ("queue", None)];
pub(super) const QUEUE_FIELDS: Fields = &[
    ("retention", Some(Shape::Duration)),
    ("delay", Some(Shape::Duration)),
    ("timeout", Some(Shape::Duration)),
    ("dead_letter", None),
    ("fifo", Some(Shape::Any)),
];
pub(super) const DEAD_LETTER_FIELDS: Fields = &[("tries", Some(Shape::Whole))];
/// `taskdef_overrides[]`: `OverrideRule` (workload.go).
pub(super) const OVERRIDE_FIELDS: Fields =
    &[("path", Some(Shape::Text)), ("value", Some(Shape::Any))];
/// Paths `taskdef_overrides` may not touch: `invalidTaskDefOverridePathRegexp`.
pub(super) fn override_path_forbidden(path: &str) -> bool {
    path == "Family"
        || path
            .strip_prefix("ContainerDefinitions[")
            .and_then(|rest| rest.split_once("].Name"))
            .is_some_and(|(index, tail)| {
                tail.is_empty() && !index.is_empty() && index.chars().all(|c| c.is_ascii_digit())
            })
}

/// The ALB's limits on a target group's health check, which Copilot passes through
/// unchecked to `AWS::ElasticLoadBalancingV2::TargetGroup` (templates/workloads/
/// partials/cf/alb.yml): interval 5–300 s, timeout 2–120 s and below the interval,
/// thresholds 2–10.
pub(super) fn check_target_health(path: &str, hc: &Value, problems: &mut Vec<String>) {
    let seconds = |key: &str| text_at(hc, key).and_then(|d| go_duration(&d));
    let whole = |key: &str| at(hc, key).and_then(Value::as_u64);
    if let Some(i) = seconds("interval")
        && !(Duration::from_secs(5)..=Duration::from_secs(300)).contains(&i)
    {
        problems.push(format!(
            "{path}.interval {i:?} is outside the ALB's 5-300 s"
        ));
    }
    if let Some(t) = seconds("timeout") {
        if !(Duration::from_secs(2)..=Duration::from_secs(120)).contains(&t) {
            problems.push(format!("{path}.timeout {t:?} is outside the ALB's 2-120 s"));
        }
        if seconds("interval").is_some_and(|i| t >= i) {
            problems.push(format!(
                "{path}.timeout {t:?} must be below the interval: the ALB rejects it"
            ));
        }
    }
    for key in ["healthy_threshold", "unhealthy_threshold"] {
        if let Some(n) = whole(key)
            && !(2..=10).contains(&n)
        {
            problems.push(format!("{path}.{key} {n} is outside the ALB's 2-10"));
        }
    }
}

/// ECS's limits on a container health check (the task definition's `HealthCheck`,
/// rendered by templates/workloads/partials/cf/workload-container.yml): interval
/// 5–300 s, timeout 2–60 s, retries 1–10, start period 0–300 s; and `CMD`, since
/// the images are distroless and have no shell for `CMD-SHELL`.
pub(super) fn check_container_health(path: &str, hc: &Value, problems: &mut Vec<String>) {
    let seconds = |key: &str| text_at(hc, key).and_then(|d| go_duration(&d));
    let within = |key: &str, lo: u64, hi: u64, problems: &mut Vec<String>| {
        if let Some(d) = seconds(key)
            && !(Duration::from_secs(lo)..=Duration::from_secs(hi)).contains(&d)
        {
            problems.push(format!("{path}.{key} {d:?} is outside ECS's {lo}-{hi} s"));
        }
    };
    within("interval", 5, 300, problems);
    within("timeout", 2, 60, problems);
    within("start_period", 0, 300, problems);
    if let Some(r) = at(hc, "retries").and_then(Value::as_u64)
        && !(1..=10).contains(&r)
    {
        problems.push(format!("{path}.retries {r} is outside ECS's 1-10"));
    }
    match at(hc, "command")
        .and_then(Value::as_sequence)
        .map(Vec::as_slice)
    {
        Some([first, _, ..]) if first.as_str() == Some("CMD") => {}
        other => problems.push(format!(
            "{path}.command is {other:?}: [\"CMD\", <binary>, ...] (the images have no shell)"
        )),
    }
}

/// Every manifest rule above, for one service in one environment.
pub(super) fn manifest_problems(kind: Kind, config: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let top = match kind {
        Kind::LoadBalancedWebService => LBWS_FIELDS,
        Kind::WorkerService => WORKER_FIELDS,
    };
    unknown_keys("", config, top, &mut problems);
    if let Some(image) = at(config, "image") {
        unknown_keys("image", image, IMAGE_FIELDS, &mut problems);
        if let Some(build) = at(image, "build").filter(|b| b.is_mapping()) {
            unknown_keys("image.build", build, BUILD_FIELDS, &mut problems);
        }
        if let Some(hc) = at(image, "healthcheck") {
            unknown_keys(
                "image.healthcheck",
                hc,
                CONTAINER_HEALTHCHECK_FIELDS,
                &mut problems,
            );
            check_container_health("image.healthcheck", hc, &mut problems);
        }
        if kind == Kind::WorkerService && at(image, "port").is_some() {
            problems.push("image.port: a Worker Service's image has no port".into());
        }
    }
    if let Some(http) = at(config, "http").filter(|h| h.is_mapping()) {
        unknown_keys("http", http, HTTP_FIELDS, &mut problems);
        match at(http, "healthcheck") {
            Some(Value::String(_)) | None => {}
            Some(hc) => {
                unknown_keys(
                    "http.healthcheck",
                    hc,
                    HTTP_HEALTHCHECK_FIELDS,
                    &mut problems,
                );
                check_target_health("http.healthcheck", hc, &mut problems);
            }
        }
    }
    if let Some(platform) = text_at(config, "platform")
        && !PLATFORMS.contains(&platform.to_lowercase().as_str())
    {
        problems.push(format!(
            "validate \"platform\": platform '{platform}' is invalid; valid platforms are {}",
            PLATFORMS.join(", ")
        ));
    }
    if let Some(count) = at(config, "count") {
        if count.is_mapping() {
            unknown_keys("count", count, COUNT_FIELDS, &mut problems);
        }
        if let Err(e) = validate_count(kind, count) {
            problems.push(format!("validate \"count\": {e}"));
        }
    }
    if let Some(vars) = at(config, "variables").and_then(Value::as_mapping) {
        for (name, value) in vars {
            if text(value).is_none() && value.get("from_cfn").is_none() {
                problems.push(format!(
                    "variables.{} is {value:?}: a scalar or {{from_cfn: ...}}",
                    text(name).unwrap_or_default()
                ));
            }
        }
    }
    if let Some(subscribe) = at(config, "subscribe") {
        unknown_keys("subscribe", subscribe, SUBSCRIBE_FIELDS, &mut problems);
        if let Some(queue) = at(subscribe, "queue") {
            unknown_keys("subscribe.queue", queue, QUEUE_FIELDS, &mut problems);
            if let Some(dl) = at(queue, "dead_letter") {
                unknown_keys(
                    "subscribe.queue.dead_letter",
                    dl,
                    DEAD_LETTER_FIELDS,
                    &mut problems,
                );
            }
        }
    }
    for (i, rule) in at(config, "taskdef_overrides")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .enumerate()
    {
        unknown_keys(
            &format!("taskdef_overrides[{i}]"),
            rule,
            OVERRIDE_FIELDS,
            &mut problems,
        );
        if let Some(path) = text_at(rule, "path")
            && override_path_forbidden(&path)
        {
            problems.push(format!(
                "validate \"taskdef_overrides[{i}]\": \"{path}\" cannot be overridden with a custom value"
            ));
        }
    }
    problems
}
