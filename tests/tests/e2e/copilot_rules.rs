//! Copilot's own rules, applied to the files under `copilot/`.
//!
//! Copilot checks a manifest before it renders any CloudFormation, renders each
//! service stack from templates whose logical ids our YAML patches name, loads the
//! addons by rules of its own, and deploys Lambda-backed custom resources on a
//! runtime it chose in 2024. None of that runs here, and Copilot gets no more
//! releases, so the rules that apply to our files are written down below, each with
//! the file of aws/copilot-cli it comes from (paths as of v1.33, March 2024), and
//! checked for every service in every environment it deploys to.
//!
//! Copilot decodes manifests without rejecting unknown keys, so a misspelt field is
//! dropped without a word and its default deployed: the key checks below are the
//! only place such a slip shows before a deployment.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use e2e::workspace_root;
use serde_norway::{Mapping, Value};

use crate::deploy::{at, go_duration, text, text_at, yaml};

// --- where each rule comes from, in aws/copilot-cli ---------------------------------

const VALIDATE: &str = "internal/pkg/manifest/validate.go";
const SVC: &str = "internal/pkg/manifest/svc.go";
const WORKLOAD_ECS: &str = "internal/pkg/manifest/workload_ecs.go";
const LBWS_DEPLOY: &str = "internal/pkg/cli/deploy/lbws.go";
const PATCH: &str = "internal/pkg/override/patch.go";
const TEMPLATES: &str = "internal/pkg/template/templates";
const ADDON_OUTPUT: &str = "internal/pkg/addon/output.go";

/// The environments this repository ships manifests for (`copilot/environments/`).
const SHIPPED_ENVIRONMENTS: [&str; 1] = ["test"];
/// The services this repository ships manifests for.
pub(super) const SERVICES: [&str; 2] = ["queue-consumer", "websocket"];

// --- the workload types ---------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    LoadBalancedWebService,
    WorkerService,
}

impl Kind {
    /// The `type` of a workload manifest (internal/pkg/manifest/manifestinfo/type.go).
    fn of(manifest: &Value) -> Result<Self, String> {
        match text_at(manifest, "type").as_deref() {
            Some("Load Balanced Web Service") => Ok(Self::LoadBalancedWebService),
            Some("Worker Service") => Ok(Self::WorkerService),
            other => Err(format!("type {other:?} is not a type these checks know")),
        }
    }

    /// The fields that make a scaling policy: `validScalingFields` (svc.go).
    fn scaling_fields(self) -> &'static [&'static str] {
        match self {
            Self::LoadBalancedWebService => &[
                "cpu_percentage",
                "memory_percentage",
                "requests",
                "response_time",
            ],
            Self::WorkerService => &["cpu_percentage", "memory_percentage", "queue_delay"],
        }
    }

    /// Scaling fields the type may not have: `getInvalidFieldsSet` (svc.go).
    fn invalid_scaling_fields(self) -> &'static [&'static str] {
        match self {
            Self::LoadBalancedWebService => &["queue_delay"],
            Self::WorkerService => &["requests", "response_time"],
        }
    }

    /// The service stack's template, under `TEMPLATES`.
    fn template(self) -> &'static str {
        match self {
            Self::LoadBalancedWebService => "workloads/services/lb-web/cf.yml",
            Self::WorkerService => "workloads/services/worker/cf.yml",
        }
    }
}

// --- a manifest in one environment -------------------------------------------------------

/// The environments a service deploys to: the shipped ones and any it overrides.
fn environments(manifest: &Value) -> Vec<String> {
    let mut names: BTreeSet<String> = SHIPPED_ENVIRONMENTS
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    if let Some(envs) = at(manifest, "environments").and_then(Value::as_mapping) {
        names.extend(envs.keys().filter_map(text));
    }
    names.into_iter().collect()
}

/// `environments.<env>` merged over the rest, as Copilot merges them
/// (internal/pkg/manifest/transform.go): maps merge key by key, anything else is
/// replaced, and a `count` of one kind (a number, or a map) replaces the other.
fn in_environment(manifest: &Value, env: &str) -> Value {
    fn merge(base: &Value, over: &Value) -> Value {
        match (base, over) {
            (Value::Mapping(b), Value::Mapping(o)) => {
                let mut out = b.clone();
                for (k, v) in o {
                    let merged = match out.get(k) {
                        Some(existing) => merge(existing, v),
                        None => v.clone(),
                    };
                    out.insert(k.clone(), merged);
                }
                Value::Mapping(out)
            }
            (_, Value::Null) => base.clone(),
            _ => over.clone(),
        }
    }
    let mut base = manifest.clone();
    if let Value::Mapping(m) = &mut base {
        m.remove("environments");
    }
    match at(manifest, &format!("environments.{env}")) {
        Some(over) => merge(&base, over),
        None => base,
    }
}

/// The autoscaling a `count` asks for, as `convertAutoscaling` reads it
/// (internal/pkg/deploy/cloudformation/stack/transformers.go): none for a plain
/// number or for `spot`, else the range with its policies.
fn autoscaling(config: &Value) -> Option<&Mapping> {
    let count = at(config, "count")?.as_mapping()?;
    if count.get("spot").is_some() || count.get("range").is_none() {
        return None;
    }
    Some(count)
}

// --- the manifest rules --------------------------------------------------------------------

/// `AdvancedCount.validate` and the range checks under it (validate.go), with the
/// messages Copilot prints. `Ok` for a plain number.
fn validate_count(kind: Kind, count: &Value) -> Result<(), String> {
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
fn validate_range(range: &Value) -> Result<(), String> {
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
const PLATFORMS: [&str; 6] = [
    "linux/amd64",
    "linux/x86_64",
    "linux/arm",
    "linux/arm64",
    "windows/amd64",
    "windows/x86_64",
];

/// A field's expected YAML shape.
#[derive(Debug, Clone, Copy)]
enum Shape {
    Text,
    Whole,
    Flag,
    /// A Go duration (`30s`, `5m`), which Copilot turns into whole seconds.
    Duration,
    TextList,
    Any,
}

fn shape_problem(path: &str, value: &Value, shape: Shape) -> Option<String> {
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
type Fields = &'static [(&'static str, Option<Shape>)];

/// The keys of `node` that Copilot's struct for it does not have: it would drop them.
fn unknown_keys(path: &str, node: &Value, fields: Fields, problems: &mut Vec<String>) {
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
const LBWS_FIELDS: Fields = &[
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
const WORKER_FIELDS: Fields = &[
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
const IMAGE_FIELDS: Fields = &[
    ("build", None),
    ("location", Some(Shape::Text)),
    ("credentials", Some(Shape::Text)),
    ("labels", Some(Shape::Any)),
    ("depends_on", Some(Shape::Any)),
    ("port", Some(Shape::Whole)),
    ("healthcheck", None),
];
/// `image.build` as a map: `DockerBuildArgs` (workload.go).
const BUILD_FIELDS: Fields = &[
    ("context", Some(Shape::Text)),
    ("dockerfile", Some(Shape::Text)),
    ("args", Some(Shape::Any)),
    ("target", Some(Shape::Text)),
    ("cache_from", Some(Shape::TextList)),
];
/// `image.healthcheck`: `ContainerHealthCheck` (workload_ecs.go).
const CONTAINER_HEALTHCHECK_FIELDS: Fields = &[
    ("command", Some(Shape::TextList)),
    ("interval", Some(Shape::Duration)),
    ("retries", Some(Shape::Whole)),
    ("timeout", Some(Shape::Duration)),
    ("start_period", Some(Shape::Duration)),
];
/// `http`: `HTTP` and its inline `RoutingRule` (http.go).
const HTTP_FIELDS: Fields = &[
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
const HTTP_HEALTHCHECK_FIELDS: Fields = &[
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
const COUNT_FIELDS: Fields = &[
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
const SUBSCRIBE_FIELDS: Fields = &[("topics", Some(Shape::Any)), ("queue", None)];
const QUEUE_FIELDS: Fields = &[
    ("retention", Some(Shape::Duration)),
    ("delay", Some(Shape::Duration)),
    ("timeout", Some(Shape::Duration)),
    ("dead_letter", None),
    ("fifo", Some(Shape::Any)),
];
const DEAD_LETTER_FIELDS: Fields = &[("tries", Some(Shape::Whole))];
/// `taskdef_overrides[]`: `OverrideRule` (workload.go).
const OVERRIDE_FIELDS: Fields = &[("path", Some(Shape::Text)), ("value", Some(Shape::Any))];
/// Paths `taskdef_overrides` may not touch: `invalidTaskDefOverridePathRegexp`.
fn override_path_forbidden(path: &str) -> bool {
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
fn check_target_health(path: &str, hc: &Value, problems: &mut Vec<String>) {
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
fn check_container_health(path: &str, hc: &Value, problems: &mut Vec<String>) {
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
fn manifest_problems(kind: Kind, config: &Value) -> Vec<String> {
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

// --- the environment manifest --------------------------------------------------------------

const ENVIRONMENT_FIELDS: Fields = &[
    ("name", Some(Shape::Text)),
    ("type", Some(Shape::Text)),
    ("network", Some(Shape::Any)),
    ("observability", None),
    ("http", None),
    ("cdn", Some(Shape::Any)),
];
const ENV_HTTP_FIELDS: Fields = &[("public", None), ("private", Some(Shape::Any))];
/// `http.public`: `PublicHTTPConfig` (internal/pkg/manifest/env.go).
const ENV_PUBLIC_FIELDS: Fields = &[
    ("security_groups", Some(Shape::Any)),
    ("certificates", Some(Shape::TextList)),
    ("access_logs", Some(Shape::Any)),
    ("ingress", Some(Shape::Any)),
    ("ssl_policy", Some(Shape::Text)),
];
const ENV_OBSERVABILITY_FIELDS: Fields = &[("container_insights", Some(Shape::Flag))];

/// The ALB's security policies that offer TLS 1.3 (Elastic Load Balancing, "Security
/// policies for your Application Load Balancer"); the HTTPS listener gets one.
pub(super) const TLS13_POLICIES: [&str; 6] = [
    "ELBSecurityPolicy-TLS13-1-2-2021-06",
    "ELBSecurityPolicy-TLS13-1-2-Res-2021-06",
    "ELBSecurityPolicy-TLS13-1-2-Ext1-2021-06",
    "ELBSecurityPolicy-TLS13-1-2-Ext2-2021-06",
    "ELBSecurityPolicy-TLS13-1-3-2021-06",
    "ELBSecurityPolicy-TLS13-1-2-FIPS-2023-04",
];

/// An ACM certificate ARN, as `arn.Parse` and the HTTPS listener need it.
fn certificate_arn(value: &str) -> bool {
    let parts: Vec<&str> = value.splitn(6, ':').collect();
    matches!(parts.as_slice(), ["arn", partition, "acm", region, account, resource]
        if !partition.is_empty() && !region.is_empty()
            && account.len() == 12 && account.chars().all(|c| c.is_ascii_digit())
            && resource.starts_with("certificate/"))
}

/// The environment manifest's rules (validate_env.go), and the parts of it that make
/// Copilot's environment stack create Lambda functions we do not patch: access logs
/// (templates/environment/partials/elb-access-logs.yml) and a CDN
/// (templates/environment/partials/cdn-resources.yml), both on nodejs20.x. The
/// functions in templates/environment/partials/lambdas.yml are created only for an
/// application with a domain (conditions DelegateDNS, ManagedAliases), and not
/// rendered at all when certificates are imported.
fn environment_problems(env: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    unknown_keys("", env, ENVIRONMENT_FIELDS, &mut problems);
    if let Some(o) = at(env, "observability") {
        unknown_keys("observability", o, ENV_OBSERVABILITY_FIELDS, &mut problems);
    }
    if let Some(http) = at(env, "http") {
        unknown_keys("http", http, ENV_HTTP_FIELDS, &mut problems);
        if let Some(public) = at(http, "public") {
            unknown_keys("http.public", public, ENV_PUBLIC_FIELDS, &mut problems);
            for (i, cert) in at(public, "certificates")
                .and_then(Value::as_sequence)
                .into_iter()
                .flatten()
                .enumerate()
            {
                if !text(cert).is_some_and(|c| certificate_arn(&c)) {
                    problems.push(format!(
                        "parse \"certificates[{i}]\": {cert:?} is not an ACM certificate ARN"
                    ));
                }
            }
            if let Some(policy) = text_at(public, "ssl_policy")
                && !TLS13_POLICIES.contains(&policy.as_str())
            {
                problems.push(format!(
                    "http.public.ssl_policy {policy} is not one of the ALB's TLS 1.3 policies"
                ));
            }
            if at(public, "access_logs").is_some() {
                problems.push("http.public.access_logs makes the environment stack create a Lambda function on nodejs20.x (elb-access-logs.yml); a new one would fail".into());
            }
        }
    }
    if at(env, "cdn").is_some() {
        problems.push("cdn makes the environment stack create Lambda functions on nodejs20.x (cdn-resources.yml); new ones would fail".into());
    }
    problems
}

/// `validateRuntimeRoutingRule` (lbws.go): in an environment with imported
/// certificates a Load Balanced Web Service must name the domain it answers for
/// (`http.alias`, checked against the certificate), and `http.alias` or
/// `redirect_to_https` without certificates (and without an application domain)
/// is refused.
fn alias_problem(config: &Value, env: &Value) -> Option<String> {
    let certificates = at(env, "http.public.certificates")
        .and_then(Value::as_sequence)
        .is_some_and(|c| !c.is_empty());
    let alias = at(config, "http.alias").is_some();
    let redirect = at(config, "http.redirect_to_https").is_some();
    match (certificates, alias, redirect) {
        (true, false, _) => Some(
            "cannot deploy service without \"alias\" to an environment with certificate imported"
                .into(),
        ),
        (false, true, _) => {
            Some("http.alias needs imported certificates (or an application domain)".into())
        }
        (false, _, true) => Some(
            "cannot configure http to https redirect without a domain or imported certificates"
                .into(),
        ),
        _ => None,
    }
}

// --- what Copilot generates --------------------------------------------------------------------

/// A Lambda function Copilot puts in a service stack, with the runtime its
/// template sets.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Function {
    id: &'static str,
    runtime: &'static str,
    source: &'static str,
}

/// The functions in a service stack: every one is created on a deployment that
/// creates the stack, and Lambda refuses to create functions on a deprecated runtime.
fn generated_functions(kind: Kind, config: &Value) -> Vec<Function> {
    let mut functions = vec![Function {
        id: "EnvControllerFunction",
        runtime: "nodejs20.x",
        source: "workloads/partials/cf/env-controller.yml",
    }];
    let http_disabled = matches!(at(config, "http"), Some(Value::Bool(false)));
    if kind == Kind::LoadBalancedWebService && !http_disabled {
        functions.push(Function {
            id: "RulePriorityFunction",
            runtime: "nodejs20.x",
            source: "workloads/partials/cf/alb.yml",
        });
    }
    if at(config, "nlb").is_some() {
        for id in ["NLBCustomDomainFunction", "NLBCertValidatorFunction"] {
            functions.push(Function {
                id,
                runtime: "nodejs20.x",
                source: "workloads/partials/cf/nlb.yml",
            });
        }
    }
    if let Some(count) = autoscaling(config) {
        functions.push(Function {
            id: "DynamicDesiredCountFunction",
            runtime: "nodejs20.x",
            source: "workloads/partials/cf/autoscaling.yml",
        });
        if count.get("queue_delay").is_some() {
            functions.push(Function {
                id: "BacklogPerTaskCalculatorFunction",
                runtime: "nodejs20.x",
                source: "workloads/partials/cf/autoscaling.yml",
            });
        }
    }
    functions
}

/// The JSON pointers that exist in the template Copilot renders for this service in
/// one environment, as far as a patch may name them, and which of them are lists.
#[derive(Debug, Default)]
struct Skeleton {
    paths: BTreeSet<String>,
    lists: BTreeSet<String>,
}

impl Skeleton {
    fn resource(&mut self, id: &str, sub: &[&str]) {
        self.paths.insert(format!("/Resources/{id}"));
        for s in sub {
            self.paths.insert(format!("/Resources/{id}/{s}"));
        }
    }

    fn resources(&self) -> BTreeSet<String> {
        self.paths
            .iter()
            .filter_map(|p| p.strip_prefix("/Resources/"))
            .filter(|rest| !rest.contains('/'))
            .map(str::to_owned)
            .collect()
    }

    fn parameters(&self) -> BTreeSet<String> {
        self.paths
            .iter()
            .filter_map(|p| p.strip_prefix("/Parameters/"))
            .filter(|rest| !rest.contains('/'))
            .map(str::to_owned)
            .collect()
    }
}

/// What the templates under `TEMPLATES` render for `kind` with `config`: the
/// parameters of its cf.yml, and the resources of the partials it includes.
fn skeleton(kind: Kind, config: &Value) -> Skeleton {
    let mut s = Skeleton::default();
    s.paths.insert("/Resources".into());
    s.paths.insert("/Parameters".into());
    let mut parameters = vec![
        "AppName",
        "EnvName",
        "WorkloadName",
        "ContainerImage",
        "TaskCPU",
        "TaskMemory",
        "TaskCount",
        "AddonsTemplateURL",
        "EnvFileARN",
        "ArtifactKeyARN",
        "LogRetention",
    ];
    if kind == Kind::LoadBalancedWebService {
        parameters.extend([
            "ContainerPort",
            "DNSDelegated",
            "TargetContainer",
            "TargetPort",
            "HTTPSEnabled",
            "RulePath",
        ]);
    }
    for p in parameters {
        s.paths.insert(format!("/Parameters/{p}"));
    }
    // Every service: loggroup.yml, executionrole.yml, taskrole.yml, env-controller.yml
    // and the service itself, whose DependsOn is a list in both templates.
    s.resource("LogGroup", &["Properties"]);
    s.resource("TaskDefinition", &["Properties"]);
    s.resource("ExecutionRole", &["Properties"]);
    s.resource("TaskRole", &["Properties"]);
    s.resource("EnvControllerAction", &["Properties"]);
    s.resource("EnvControllerRole", &["Properties"]);
    s.resource("Service", &["Properties", "DependsOn"]);
    s.lists.insert("/Resources/Service/DependsOn".into());
    for f in generated_functions(kind, config) {
        s.resource(f.id, &["Properties", "Properties/Runtime"]);
    }
    if kind == Kind::LoadBalancedWebService {
        s.resource("DiscoveryService", &["Properties"]);
        s.resource("TargetGroup", &["Properties"]);
        s.resource("RulePriorityFunctionRole", &["Properties"]);
        s.resource("HTTPRulePriorityAction", &["Properties"]);
    }
    if kind == Kind::WorkerService {
        // subscribe.yml: the queue is always there; the dead-letter queue only when
        // `subscribe.queue` is applied, which needs `topics` (convertSubscribe).
        s.resource("EventsKMSKey", &["Properties"]);
        s.resource("EventsQueue", &["Properties"]);
        s.resource("QueuePolicy", &["Properties"]);
        let queue_applied = at(config, "subscribe.topics").is_some_and(Value::is_sequence);
        if queue_applied && at(config, "subscribe.queue.dead_letter").is_some() {
            s.resource("DeadLetterQueue", &["Properties"]);
            s.resource("DeadLetterPolicy", &["Properties"]);
        }
    }
    if let Some(count) = autoscaling(config) {
        s.resource("AutoScalingRole", &["Properties"]);
        s.resource("AutoScalingTarget", &["Properties"]);
        s.resource("DynamicDesiredCountAction", &["Properties"]);
        s.resource("DynamicDesiredCountFunctionRole", &["Properties"]);
        if count.get("cpu_percentage").is_some() {
            s.resource(
                "AutoScalingPolicyECSServiceAverageCPUUtilization",
                &["Properties"],
            );
        }
        if count.get("memory_percentage").is_some() {
            s.resource(
                "AutoScalingPolicyECSServiceAverageMemoryUtilization",
                &["Properties"],
            );
        }
        if count.get("queue_delay").is_some() {
            s.resource("BacklogPerTaskCalculatorLogGroup", &["Properties"]);
            s.resource("BacklogPerTaskCalculatorRole", &["Properties"]);
            s.resource("BacklogPerTaskScheduledRule", &["Properties"]);
            s.resource("AutoScalingPolicyEventsQueue", &["Properties"]);
        }
    }
    s
}

// --- YAML patches (patch.go) --------------------------------------------------------------------

/// One entry of a `cfn.patches.yml`.
#[derive(Debug, Clone)]
pub(super) struct Patch {
    pub(super) op: String,
    pub(super) path: String,
    pub(super) value: Option<Value>,
}

pub(super) fn patches(relative: &str) -> Vec<Patch> {
    let doc = yaml(relative);
    doc.as_sequence()
        .unwrap_or_else(|| panic!("{relative} is not a list of patches"))
        .iter()
        .map(|p| Patch {
            op: text_at(p, "op").unwrap_or_default(),
            path: text_at(p, "path").unwrap_or_default(),
            value: p.get("value").cloned(),
        })
        .collect()
}

/// A JSON pointer's parent and last key, with `~1` and `~0` decoded (RFC 6901).
fn split_pointer(path: &str) -> (String, String) {
    let (parent, last) = path.rsplit_once('/').unwrap_or(("", path));
    (
        parent.to_owned(),
        last.replace("~1", "/").replace("~0", "~"),
    )
}

/// The names a value refers to: `!Ref X`, `!GetAtt X.Y`, `${X}` and `${X.Y}` in a
/// `!Sub` (less the names its own variable map defines).
fn references(value: &Value, out: &mut BTreeSet<String>) {
    fn from_sub(template: &str, local: &BTreeSet<String>, out: &mut BTreeSet<String>) {
        let mut rest = template;
        while let Some(start) = rest.find("${") {
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else { break };
            let name = &after[..end];
            let name = name.split('.').next().unwrap_or(name);
            if !name.starts_with('!') && !local.contains(name) {
                out.insert(name.to_owned());
            }
            rest = &after[end..];
        }
    }
    match value {
        Value::Tagged(t) => {
            let tag = t.tag.to_string();
            match (tag.as_str(), &t.value) {
                ("!Ref", Value::String(name)) => {
                    out.insert(name.clone());
                }
                ("!GetAtt", Value::String(name)) => {
                    out.insert(name.split('.').next().unwrap_or(name).to_owned());
                }
                ("!Sub", Value::String(s)) => from_sub(s, &BTreeSet::new(), out),
                ("!Sub", Value::Sequence(list)) => {
                    let local: BTreeSet<String> = list
                        .get(1)
                        .and_then(Value::as_mapping)
                        .map(|m| m.keys().filter_map(text).collect())
                        .unwrap_or_default();
                    if let Some(s) = list.first().and_then(Value::as_str) {
                        from_sub(s, &local, out);
                    }
                    for v in list.iter().skip(1) {
                        references(v, out);
                    }
                }
                (_, inner) => references(inner, out),
            }
        }
        Value::Mapping(m) => m.values().for_each(|v| references(v, out)),
        Value::Sequence(l) => l.iter().for_each(|v| references(v, out)),
        _ => {}
    }
}

/// Applies the patches in order to `skeleton`, as `Patch.Override` does, and says
/// what would fail: an unknown op, a `replace` or `remove` of a path that is not
/// there, an `add` under a parent that is not there, a value naming a resource or
/// parameter the template does not have.
fn patch_problems(patches: &[Patch], skeleton: &Skeleton) -> Vec<String> {
    let mut problems = Vec::new();
    let mut paths = skeleton.paths.clone();
    for (i, p) in patches.iter().enumerate() {
        let at_index = format!("patch {i} ({} {})", p.op, p.path);
        let (parent, last) = split_pointer(&p.path);
        match p.op.as_str() {
            "add" => {
                if p.value.as_ref().is_none_or(Value::is_null) {
                    problems.push(format!("{at_index}: value required"));
                }
                if !paths.contains(&parent) {
                    problems.push(format!(
                        "{at_index}: key {parent:?} not found in the template Copilot renders"
                    ));
                } else if last == "-" && !skeleton.lists.contains(&parent) {
                    problems.push(format!("{at_index}: {parent} is not a list"));
                }
                if last != "-" {
                    paths.insert(p.path.clone());
                }
            }
            "replace" | "remove" => {
                if !paths.contains(&p.path) {
                    problems.push(format!(
                        "{at_index}: {:?} not found in the template Copilot renders",
                        p.path
                    ));
                }
                if p.op == "replace" && p.value.as_ref().is_none_or(Value::is_null) {
                    problems.push(format!("{at_index}: value required"));
                }
            }
            other => problems.push(format!(
                "{at_index}: unsupported operation {other:?}: supported operations are \"add\", \"remove\", and \"replace\"."
            )),
        }
    }
    // Every name a patched value refers to exists once all patches are applied.
    let resources: BTreeSet<String> = paths
        .iter()
        .filter_map(|p| p.strip_prefix("/Resources/"))
        .filter(|rest| !rest.contains('/'))
        .map(str::to_owned)
        .collect();
    let parameters: BTreeSet<String> = paths
        .iter()
        .filter_map(|p| p.strip_prefix("/Parameters/"))
        .filter(|rest| !rest.contains('/'))
        .map(str::to_owned)
        .collect();
    for p in patches {
        let mut names = BTreeSet::new();
        if let Some(v) = &p.value {
            references(v, &mut names);
            // A name added to a DependsOn list is a resource too.
            if p.path.ends_with("/DependsOn/-")
                && let Some(name) = text(v)
            {
                names.insert(name);
            }
        }
        for name in names {
            if !(name.starts_with("AWS::")
                || resources.contains(&name)
                || parameters.contains(&name))
            {
                problems.push(format!(
                    "{} {} names {name}, which is neither a resource nor a parameter of the template",
                    p.op, p.path
                ));
            }
        }
    }
    problems
}

// --- Lambda runtimes -----------------------------------------------------------------------------

/// Lambda's Node.js runtimes and the day each is deprecated (Lambda's runtime table,
/// docs.aws.amazon.com/lambda/latest/dg/lambda-runtimes.html). From that day on no
/// security updates; some months later Lambda refuses to create functions on it.
const NODE_RUNTIMES: [(&str, (i32, u32, u32)); 5] = [
    ("nodejs16.x", (2024, 6, 12)),
    ("nodejs18.x", (2025, 9, 1)),
    ("nodejs20.x", (2026, 4, 30)),
    ("nodejs22.x", (2027, 4, 30)),
    ("nodejs24.x", (2028, 4, 30)),
];

/// The civil date (UTC) of a time: Howard Hinnant's `civil_from_days`.
fn civil(time: SystemTime) -> (i32, u32, u32) {
    let days = time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs() / 86_400).unwrap_or(0));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        i32::try_from(year).unwrap_or(i32::MAX),
        u32::try_from(month).unwrap_or(1),
        u32::try_from(day).unwrap_or(1),
    )
}

/// Whether Lambda has deprecated `runtime` on `today`; an unknown runtime is an error.
fn deprecated(runtime: &str, today: (i32, u32, u32)) -> Result<bool, String> {
    NODE_RUNTIMES
        .iter()
        .find(|(id, _)| *id == runtime)
        .map(|(_, day)| *day <= today)
        .ok_or_else(|| format!("{runtime} is not a Node.js runtime these checks know"))
}

/// For one service in one environment: each generated function must end on a
/// runtime Lambda has not deprecated on `today`, set by an `op: replace` on its
/// `Runtime` (patch.go).
fn runtime_problems(
    functions: &[Function],
    patches: &[Patch],
    today: (i32, u32, u32),
) -> Vec<String> {
    let mut problems = Vec::new();
    for f in functions {
        let path = format!("/Resources/{}/Properties/Runtime", f.id);
        let set: Vec<&Patch> = patches.iter().filter(|p| p.path == path).collect();
        let runtime = match set.as_slice() {
            [] => f.runtime.to_owned(),
            [one] if one.op == "replace" => one.value.as_ref().and_then(text).unwrap_or_default(),
            more => {
                problems.push(format!(
                    "{}: expected one `op: replace` on {path}, found {:?}",
                    f.id,
                    more.iter().map(|p| p.op.as_str()).collect::<Vec<_>>()
                ));
                continue;
            }
        };
        match deprecated(&runtime, today) {
            Ok(false) => {}
            Ok(true) => problems.push(format!(
                "{} ({TEMPLATES}/{}) runs on {runtime}, which Lambda has deprecated: a new stack cannot create it; patch {path} with op: replace",
                f.id, f.source
            )),
            Err(e) => problems.push(format!("{}: {e}", f.id)),
        }
    }
    problems
}

// --- addons (addon/addons.go, addon/output.go) ----------------------------------------------------

/// What Copilot does with each output of a workload addon: a `!Ref` to a managed
/// policy is attached to the task role, to a secret becomes a secret, to a security
/// group joins the task's; anything else becomes an environment variable.
fn addon_output_problems(relative: &str, template: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let types: BTreeMap<String, String> = at(template, "Resources")
        .and_then(Value::as_mapping)
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((text(k)?, text_at(v, "Type")?)))
        .collect();
    let mut attached = BTreeSet::new();
    for (name, output) in at(template, "Outputs")
        .and_then(Value::as_mapping)
        .into_iter()
        .flatten()
    {
        let name = text(name).unwrap_or_default();
        let target = match output.get("Value") {
            Some(Value::Tagged(t)) if t.tag == "!Ref" => text(&t.value),
            Some(v) => v.get("Ref").and_then(text),
            None => None,
        };
        match target.as_ref().and_then(|t| types.get(t)).map(String::as_str) {
            Some("AWS::IAM::ManagedPolicy") => {
                attached.insert(target.unwrap_or_default());
            }
            _ => problems.push(format!(
                "{relative}: output {name} is not a !Ref to a managed policy, so Copilot would make it an environment variable of the task ({ADDON_OUTPUT})"
            )),
        }
    }
    for (id, kind) in &types {
        if kind == "AWS::IAM::ManagedPolicy" && !attached.contains(id) {
            problems.push(format!(
                "{relative}: {id} is in no output, so Copilot never attaches it to the task role"
            ));
        }
    }
    problems
}

// --- the tests -------------------------------------------------------------------------------------

fn report(what: &str, problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{what}:\n  - {}",
        problems.join("\n  - ")
    );
}

fn manifest_of(service: &str) -> Value {
    yaml(&format!("copilot/{service}/manifest.yml"))
}

fn environment_manifest(env: &str) -> Value {
    let relative = format!("copilot/environments/{env}/manifest.yml");
    if workspace_root().join(&relative).is_file() {
        yaml(&relative)
    } else {
        // An environment only a service's `environments` names: Copilot's default
        // manifest, which imports no certificate.
        Value::Mapping(Mapping::new())
    }
}

#[test]
fn every_manifest_passes_copilots_validation_in_every_environment() {
    let mut problems = Vec::new();
    for service in SERVICES {
        let manifest = manifest_of(service);
        let kind = match Kind::of(&manifest) {
            Ok(k) => k,
            Err(e) => {
                problems.push(format!("{service}: {e}"));
                continue;
            }
        };
        for env in environments(&manifest) {
            let config = in_environment(&manifest, &env);
            for p in manifest_problems(kind, &config) {
                problems.push(format!(
                    "{service} in {env}: {p} ({VALIDATE}, {SVC}, {WORKLOAD_ECS})"
                ));
            }
            if kind == Kind::LoadBalancedWebService
                && let Some(p) = alias_problem(&config, &environment_manifest(&env))
            {
                problems.push(format!("{service} in {env}: {p} ({LBWS_DEPLOY})"));
            }
        }
    }
    for env in SHIPPED_ENVIRONMENTS {
        for p in environment_problems(&environment_manifest(env)) {
            problems.push(format!("environment {env}: {p}"));
        }
    }
    report("Copilot would refuse these manifests", &problems);
}

#[test]
fn copilot_refuses_a_range_without_a_scaling_metric() {
    // The websocket's count as it was: a range, and the scaling policy on
    // connections patched in beside it, but no metric Copilot knows. Copilot
    // stops at validation, before any CloudFormation.
    let before: Value = serde_norway::from_str("range: 1-10\n").expect("valid YAML");
    assert_eq!(
        validate_count(Kind::LoadBalancedWebService, &before),
        Err("must specify at least one of \"cpu_percentage\", \"memory_percentage\", \"requests\" or \"response_time\" if \"range\" is specified".to_owned())
    );
    let worker: Value = serde_norway::from_str("range: 1-10\ncooldown: {in: 60s}\n").unwrap();
    assert!(validate_count(Kind::WorkerService, &worker).is_err());
    for (count, ok) in [
        ("range: 1-10\ncpu_percentage: 70\n", true),
        ("range: 10-1\ncpu_percentage: 70\n", false),
        ("range: 1-ten\ncpu_percentage: 70\n", false),
        ("range: {min: 1, max: 3}\nrequests: 100\n", true),
        ("cpu_percentage: 70\n", false),
        ("range: 1-10\ncpu_percentage: 170\n", false),
        ("spot: 2\nrange: 1-10\ncpu_percentage: 70\n", false),
        (
            "range: 1-10\nqueue_delay: {acceptable_latency: 5m, msg_processing_time: 10s}\n",
            false,
        ),
        ("3\n", true),
    ] {
        let value: Value = serde_norway::from_str(count).unwrap();
        assert_eq!(
            validate_count(Kind::LoadBalancedWebService, &value).is_ok(),
            ok,
            "{count}"
        );
    }
    // The rule reaches the shipped manifests: a manifest with the old count fails.
    let mut old = manifest_of("websocket");
    if let Value::Mapping(m) = &mut old {
        m.insert("count".into(), before);
    }
    assert!(
        manifest_problems(Kind::LoadBalancedWebService, &in_environment(&old, "test"))
            .iter()
            .any(|p| p.contains("if \"range\" is specified")),
        "the old websocket count passes the check"
    );
}

#[test]
fn the_patches_apply_to_what_copilot_renders_in_every_environment() {
    let mut problems = Vec::new();
    for service in SERVICES {
        let manifest = manifest_of(service);
        let kind = Kind::of(&manifest).expect("a known workload type");
        let relative = format!("copilot/{service}/overrides/cfn.patches.yml");
        let patches = patches(&relative);
        for env in environments(&manifest) {
            let config = in_environment(&manifest, &env);
            let skeleton = skeleton(kind, &config);
            for p in patch_problems(&patches, &skeleton) {
                problems.push(format!(
                    "{relative} in {env}: {p} ({PATCH}; {TEMPLATES}/{})",
                    kind.template()
                ));
            }
        }
    }
    report("Copilot would fail to apply these patches", &problems);
}

#[test]
fn every_lambda_function_copilot_generates_runs_on_a_supported_runtime() {
    let today = civil(SystemTime::now());
    let mut problems = Vec::new();
    for service in SERVICES {
        let manifest = manifest_of(service);
        let kind = Kind::of(&manifest).expect("a known workload type");
        let patches = patches(&format!("copilot/{service}/overrides/cfn.patches.yml"));
        for env in environments(&manifest) {
            let functions = generated_functions(kind, &in_environment(&manifest, &env));
            for p in runtime_problems(&functions, &patches, today) {
                problems.push(format!("{service} in {env}: {p}"));
            }
        }
        // A runtime patch on a function the stack does not have fails the deployment
        // (patch.go: replace needs its path); the patch test above covers that, and
        // this names the functions such a patch may target.
        let generated: BTreeSet<&str> = environments(&manifest)
            .iter()
            .flat_map(|env| generated_functions(kind, &in_environment(&manifest, env)))
            .map(|f| f.id)
            .collect();
        for p in &patches {
            if let Some(id) = p
                .path
                .strip_prefix("/Resources/")
                .and_then(|rest| rest.strip_suffix("/Properties/Runtime"))
                && !generated.contains(id)
            {
                problems.push(format!(
                    "{service}: the runtime patch names {id}, which Copilot does not generate for this service"
                ));
            }
        }
    }
    report("Lambda functions on a deprecated runtime", &problems);

    // The rule itself: the functions as Copilot generates them fail today's date,
    // and an unknown runtime is not waved through.
    let manifest = manifest_of("websocket");
    let functions = generated_functions(
        Kind::LoadBalancedWebService,
        &in_environment(&manifest, "test"),
    );
    let ids: Vec<&str> = functions.iter().map(|f| f.id).collect();
    assert_eq!(
        ids,
        [
            "EnvControllerFunction",
            "RulePriorityFunction",
            "DynamicDesiredCountFunction"
        ]
    );
    assert_eq!(runtime_problems(&functions, &[], (2026, 12, 2)).len(), 3);
    assert!(runtime_problems(&functions, &[], (2026, 4, 29)).is_empty());
    assert_eq!(deprecated("nodejs22.x", (2026, 12, 2)), Ok(false));
    assert_eq!(deprecated("nodejs22.x", (2027, 4, 30)), Ok(true));
    assert!(deprecated("python3.13", (2026, 12, 2)).is_err());
    assert_eq!(
        civil(UNIX_EPOCH + Duration::from_secs(1_796_169_600)),
        (2026, 12, 2)
    );
    assert_eq!(civil(UNIX_EPOCH), (1970, 1, 1));
}

#[test]
fn addon_outputs_are_only_the_policies_for_the_task_role() {
    let mut problems = Vec::new();
    for service in SERVICES {
        let dir = workspace_root().join(format!("copilot/{service}/addons"));
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !(name.ends_with(".yml") || name.ends_with(".yaml"))
                || name.starts_with("addons.parameters.")
            {
                continue;
            }
            let relative = format!("copilot/{service}/addons/{name}");
            problems.extend(addon_output_problems(&relative, &yaml(&relative)));
        }
    }
    report("addon outputs", &problems);
}

#[test]
fn the_patch_rules_catch_what_copilot_would_refuse() {
    let manifest = manifest_of("websocket");
    let config = in_environment(&manifest, "test");
    let web = skeleton(Kind::LoadBalancedWebService, &config);
    let patch = |op: &str, path: &str, value: &str| Patch {
        op: op.to_owned(),
        path: path.to_owned(),
        value: Some(serde_norway::from_str(value).unwrap()),
    };
    // A replace on a function this stack does not have.
    let missing = [patch(
        "replace",
        "/Resources/BacklogPerTaskCalculatorFunction/Properties/Runtime",
        "nodejs22.x",
    )];
    assert_eq!(patch_problems(&missing, &web).len(), 1);
    // An add whose parent does not exist, an unknown op, a reference to nothing.
    let bad = [
        patch("add", "/Resources/Nothing/Properties/X", "1"),
        patch("move", "/Resources/Service", "1"),
        patch(
            "add",
            "/Resources/P",
            "{Type: X, Properties: {Target: !Ref Nowhere}}",
        ),
    ];
    assert_eq!(patch_problems(&bad, &web).len(), 3);
    // Adds build on each other, and a !Sub's own variables are not references.
    let good = [
        patch("add", "/Resources/A", "{Type: X}"),
        patch("add", "/Resources/A/DependsOn", "[Service]"),
        patch("add", "/Resources/Service/DependsOn/-", "A"),
        patch(
            "add",
            "/Resources/B",
            "{Properties: {N: !Sub ['${Q}-${AWS::Region}-${AppName}', {Q: !GetAtt A.Arn}]}}",
        ),
    ];
    assert_eq!(patch_problems(&good, &web), Vec::<String>::new());
    // The worker's dead-letter queue exists only while `topics` is there.
    let worker = manifest_of("queue-consumer");
    let mut without_topics = in_environment(&worker, "test");
    if let Some(Value::Mapping(s)) = without_topics.get_mut("subscribe") {
        s.remove("topics");
    }
    assert!(
        !skeleton(Kind::WorkerService, &without_topics)
            .resources()
            .contains("DeadLetterQueue")
    );
    assert!(
        skeleton(Kind::WorkerService, &in_environment(&worker, "test"))
            .parameters()
            .contains("WorkloadName")
    );
}

#[test]
fn an_environment_with_certificates_needs_an_alias_on_the_web_service() {
    let with_cert: Value = serde_norway::from_str(
        "http:\n  public:\n    certificates: [arn:aws:acm:us-east-1:123456789012:certificate/0f1e2d3c]\n    ssl_policy: ELBSecurityPolicy-TLS13-1-2-2021-06\n",
    )
    .unwrap();
    assert_eq!(environment_problems(&with_cert), Vec::<String>::new());
    let service: Value = serde_norway::from_str("http:\n  path: /\n").unwrap();
    assert!(alias_problem(&service, &with_cert).is_some());
    let aliased: Value =
        serde_norway::from_str("http:\n  path: /\n  alias: ws.example.com\n").unwrap();
    assert_eq!(alias_problem(&aliased, &with_cert), None);
    assert!(alias_problem(&aliased, &Value::Mapping(Mapping::new())).is_some());
    let weak: Value = serde_norway::from_str(
        "http:\n  public:\n    certificates: [not-an-arn]\n    ssl_policy: ELBSecurityPolicy-2016-08\n    acces_logs: true\n",
    )
    .unwrap();
    assert_eq!(
        environment_problems(&weak).len(),
        3,
        "{:?}",
        environment_problems(&weak)
    );
}
