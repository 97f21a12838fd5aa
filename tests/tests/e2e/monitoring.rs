//! The metrics the deployments scale and alarm on, against the names the services
//! write.
//!
//! Both services write CloudWatch Embedded Metric Format lines on stdout; the
//! awslogs driver ships them and CloudWatch Logs turns them into metrics in the
//! namespace `METRICS_NAMESPACE` (default `ECSTaskProtection`), with the dimensions
//! `Service` and `Environment`. A scaling policy or an alarm that names a metric
//! nobody writes, or the wrong namespace or statistic, is accepted by
//! CloudFormation and then never fires: so each one is read here, in the Copilot
//! files (addons and YAML patches) and in the plain CloudFormation template.

use std::collections::{BTreeMap, BTreeSet};

use serde_norway::Value;

use crate::deploy::{at, function, text, text_at, yaml};

/// `METRICS_NAMESPACE`'s default.
const DEFAULT_NAMESPACE: &str = "ECSTaskProtection";
const SQS_NAMESPACE: &str = "AWS/SQS";
const DLQ_METRIC: &str = "ApproximateNumberOfMessagesVisible";

/// Written by the protection library, in both services.
const PROTECTION_METRICS: [&str; 8] = [
    "ProtectionProtected",
    "ProtectionEnablePuts",
    "ProtectionRefreshPuts",
    "ProtectionReleasePuts",
    "ProtectionRetries",
    "ProtectionRejections",
    "ProtectionFailures",
    "ProtectionAcquireLatency",
];
const WORKER_METRICS: [&str; 9] = [
    "JobsReceived",
    "JobsDone",
    "JobsFailed",
    "JobsHandedBack",
    "BadBodies",
    "SqsErrors",
    "JobsInFlight",
    "JobDuration",
    "ReceiveToStart",
];
const WEBSOCKET_METRICS: [&str; 10] = [
    "Connections",
    "ConnectionsOpened",
    "ConnectionsRefused",
    "ConnectionsClosedByClient",
    "ConnectionsClosedPingTimeout",
    "ConnectionsClosedSlowReader",
    "ConnectionsClosedOversize",
    "ConnectionsClosedShutdown",
    "MessagesIn",
    "MessagesOut",
];

const COPILOT_TEMPLATE_PARAMETERS: [&str; 3] = ["AppName", "EnvName", "WorkloadName"];

fn written_by(service: &str) -> BTreeSet<&'static str> {
    let own: &[&str] = if service == "websocket" {
        &WEBSOCKET_METRICS
    } else {
        &WORKER_METRICS
    };
    PROTECTION_METRICS.iter().chain(own).copied().collect()
}

/// A value as text for comparison: `30`, `websocket`, `!Ref Name`.
fn shown(value: Option<&Value>) -> String {
    match value {
        Some(v) => match function(v) {
            Some((tag, arg)) => format!("{tag} {arg}"),
            None => text(v).unwrap_or_else(|| format!("{v:?}")),
        },
        None => "nothing".to_owned(),
    }
}

/// `[{Name, Value}]` as `{Name: shown value}`.
fn dimensions(list: Option<&Value>) -> BTreeMap<String, String> {
    list.and_then(Value::as_sequence)
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|d| (shown(d.get("Name")), shown(d.get("Value"))))
        .collect()
}

fn dims(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Resources by logical id, from a template's `Resources`.
fn template_resources(relative: &str) -> Vec<(String, Value)> {
    at(&yaml(relative), "Resources")
        .and_then(Value::as_mapping)
        .unwrap_or_else(|| panic!("{relative} has no Resources"))
        .iter()
        .filter_map(|(k, v)| Some((format!("{relative}: {}", text(k)?), v.clone())))
        .collect()
}

/// What a Copilot `cfn.patches.yml` adds, by path (`/Resources/X`, `/Parameters/Y`).
fn patches(relative: &str) -> BTreeMap<String, Value> {
    let doc = yaml(relative);
    let mut added = BTreeMap::new();
    for patch in doc
        .as_sequence()
        .unwrap_or_else(|| panic!("{relative} is not a list of patches"))
    {
        let op = text_at(patch, "op").unwrap_or_default();
        let path = text_at(patch, "path").unwrap_or_default();
        assert_eq!(op, "add", "{relative}: {path}: only `add` patches expected");
        let value = patch
            .get("value")
            .unwrap_or_else(|| panic!("{relative}: {path} has no value"));
        added.insert(path, value.clone());
    }
    added
}

fn patched_resources(relative: &str) -> Vec<(String, Value)> {
    patches(relative)
        .into_iter()
        .filter_map(|(path, v)| {
            let id = path.strip_prefix("/Resources/")?;
            Some((format!("{relative}: {id}"), v))
        })
        .collect()
}

fn of_type<'a>(resources: &'a [(String, Value)], kind: &str) -> Vec<&'a (String, Value)> {
    resources
        .iter()
        .filter(|(_, r)| text_at(r, "Type").as_deref() == Some(kind))
        .collect()
}

/// Every alarm on the services' namespace names a metric a service writes.
fn check_alarm_names(
    resources: &[(String, Value)],
    namespace: &str,
    service: &str,
    problems: &mut Vec<String>,
) {
    let known = written_by(service);
    for (id, alarm) in of_type(resources, "AWS::CloudWatch::Alarm") {
        let ns = text_at(alarm, "Properties.Namespace").unwrap_or_default();
        let name = text_at(alarm, "Properties.MetricName").unwrap_or_default();
        if ns == namespace {
            if !known.contains(name.as_str()) {
                problems.push(format!(
                    "{id}: alarm on {namespace}/{name}, a metric {service} does not write"
                ));
            }
        } else if ns != SQS_NAMESPACE {
            problems.push(format!(
                "{id}: alarm in namespace {ns:?}; the services write to {namespace:?}"
            ));
        }
    }
}

/// An alarm on `Sum` of `metric` above 0 over one minute, with these dimensions.
fn check_above_zero_alarm(
    resources: &[(String, Value)],
    namespace: &str,
    metric: &str,
    statistic: &str,
    expected: &BTreeMap<String, String>,
    problems: &mut Vec<String>,
) {
    let found = of_type(resources, "AWS::CloudWatch::Alarm")
        .into_iter()
        .filter(|(_, a)| {
            text_at(a, "Properties.Namespace").as_deref() == Some(namespace)
                && text_at(a, "Properties.MetricName").as_deref() == Some(metric)
                && dimensions(at(a, "Properties.Dimensions")) == *expected
        })
        .collect::<Vec<_>>();
    let [(id, alarm)] = found.as_slice() else {
        problems.push(format!(
            "expected one alarm on {namespace}/{metric} with dimensions {expected:?}, found {}",
            found.len()
        ));
        return;
    };
    let p = |key: &str| text_at(alarm, &format!("Properties.{key}")).unwrap_or_default();
    if p("Statistic") != statistic {
        problems.push(format!(
            "{id}: Statistic {:?}, expected {statistic:?}",
            p("Statistic")
        ));
    }
    if p("ComparisonOperator") != "GreaterThanThreshold" || p("Threshold") != "0" {
        problems.push(format!(
            "{id}: must fire above 0 (GreaterThanThreshold 0), has {} {}",
            p("ComparisonOperator"),
            p("Threshold")
        ));
    }
    if p("TreatMissingData") != "notBreaching" {
        problems.push(format!(
            "{id}: TreatMissingData must be notBreaching (no line, nothing to report)"
        ));
    }
}

/// A target-tracking policy on the Average of `Connections`, target a parameter.
fn check_connections_policy(
    id: &str,
    policy: &Value,
    namespace: &str,
    expected: &BTreeMap<String, String>,
    parameters: &BTreeMap<String, Value>,
    problems: &mut Vec<String>,
) {
    let p = |key: &str| at(policy, &format!("Properties.{key}"));
    if shown(p("PolicyType")) != "TargetTrackingScaling" {
        problems.push(format!("{id}: PolicyType must be TargetTrackingScaling"));
    }
    let spec = "TargetTrackingScalingPolicyConfiguration.CustomizedMetricSpecification";
    let metric = |key: &str| shown(p(&format!("{spec}.{key}")));
    if metric("Namespace") != namespace {
        problems.push(format!(
            "{id}: metric namespace {}, the server writes to {namespace}",
            metric("Namespace")
        ));
    }
    if metric("MetricName") != "Connections" {
        problems.push(format!(
            "{id}: scales on {}, expected Connections",
            metric("MetricName")
        ));
    }
    if metric("Statistic") != "Average" {
        problems.push(format!(
            "{id}: statistic {}, expected Average (over the tasks: connections per task)",
            metric("Statistic")
        ));
    }
    let got = dimensions(p(&format!("{spec}.Dimensions")));
    if got != *expected {
        problems.push(format!(
            "{id}: metric dimensions {got:?}, the server writes {expected:?}"
        ));
    }
    let target = p("TargetTrackingScalingPolicyConfiguration.TargetValue");
    match target.and_then(function) {
        Some((tag, name)) if tag == "!Ref" => match parameters.get(&name) {
            Some(param) if text_at(param, "Type").as_deref() == Some("Number") => {
                if text_at(param, "Default")
                    .and_then(|d| d.parse::<u64>().ok())
                    .is_none()
                {
                    problems.push(format!("{id}: parameter {name} has no numeric Default"));
                }
            }
            _ => problems.push(format!(
                "{id}: TargetValue is !Ref {name}, which is no Number parameter"
            )),
        },
        _ => problems.push(format!(
            "{id}: TargetValue is {}; it must be !Ref of a parameter (a setting)",
            shown(target)
        )),
    }
}

/// The metrics a dashboard body shows: (namespace, metric name, stat).
fn dashboard_metrics(id: &str, dashboard: &Value) -> Vec<(String, String, String)> {
    let body = at(dashboard, "Properties.DashboardBody")
        .unwrap_or_else(|| panic!("{id}: no DashboardBody"));
    let raw = match body {
        Value::Tagged(t) => match &t.value {
            Value::String(s) => s.clone(),
            Value::Sequence(list) => list.first().and_then(text).unwrap_or_default(),
            other => panic!("{id}: DashboardBody is {other:?}"),
        },
        other => text(other).unwrap_or_else(|| panic!("{id}: DashboardBody is {other:?}")),
    };
    // Every ${...} substitution stands for a plain string inside the JSON.
    let mut json = String::new();
    let mut rest = raw.as_str();
    while let Some(start) = rest.find("${") {
        json.push_str(&rest[..start]);
        json.push('X');
        let end = rest[start..]
            .find('}')
            .unwrap_or_else(|| panic!("{id}: unclosed ${{ in DashboardBody"));
        rest = &rest[start + end + 1..];
    }
    json.push_str(rest);
    let parsed: serde_json::Value = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("{id}: DashboardBody is not JSON: {e}\n{json}"));
    let mut found = Vec::new();
    for widget in parsed["widgets"].as_array().into_iter().flatten() {
        let properties = &widget["properties"];
        let stat = properties["stat"].as_str().unwrap_or("Average").to_owned();
        for row in properties["metrics"].as_array().into_iter().flatten() {
            let row = row.as_array().map(Vec::as_slice).unwrap_or_default();
            if let [ns, name, ..] = row {
                found.push((
                    ns.as_str().unwrap_or_default().to_owned(),
                    name.as_str().unwrap_or_default().to_owned(),
                    stat.clone(),
                ));
            }
        }
    }
    found
}

/// A dashboard shows only metrics that exist, and at least `wanted` (name, stat).
fn check_dashboard(
    resources: &[(String, Value)],
    namespace: &str,
    services: &[&str],
    wanted: &[(&str, &str, &str)],
    problems: &mut Vec<String>,
) {
    let dashboards = of_type(resources, "AWS::CloudWatch::Dashboard");
    if dashboards.is_empty() {
        problems.push("no AWS::CloudWatch::Dashboard".into());
    }
    let known: BTreeSet<&str> = services.iter().flat_map(|s| written_by(s)).collect();
    let mut shown_metrics = BTreeSet::new();
    for (id, dashboard) in dashboards {
        for (ns, name, stat) in dashboard_metrics(id, dashboard) {
            if ns == namespace && !known.contains(name.as_str()) {
                problems.push(format!("{id}: shows {ns}/{name}, which no service writes"));
            } else if ns != namespace && !(ns == SQS_NAMESPACE && name == DLQ_METRIC) {
                problems.push(format!("{id}: shows {ns}/{name}, an unexpected metric"));
            }
            shown_metrics.insert((ns, name, stat));
        }
    }
    for (ns, name, stat) in wanted {
        let key = ((*ns).to_owned(), (*name).to_owned(), (*stat).to_owned());
        if !shown_metrics.contains(&key) {
            problems.push(format!("no dashboard shows {ns}/{name} ({stat})"));
        }
    }
}

fn report(what: &str, problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{what}:\n  - {}",
        problems.join("\n  - ")
    );
}

/// The namespace a manifest or container's variables make the service write to.
fn namespace_of(vars: Option<String>) -> String {
    vars.unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned())
}

// --- Copilot --------------------------------------------------------------------------

#[test]
fn copilot_scales_the_websocket_on_connections_per_task() {
    let manifest = yaml("copilot/websocket/manifest.yml");
    let namespace = namespace_of(text_at(&manifest, "variables.METRICS_NAMESPACE"));
    let mut problems = Vec::new();
    // Copilot creates the scalable target (AutoScalingTarget) only for a count
    // with a range; the patched policy attaches to it.
    if at(&manifest, "count.range").is_none() || at(&manifest, "count.spot").is_some() {
        problems
            .push("manifest.yml: count needs a range (and no spot) for AutoScalingTarget".into());
    }
    if let Some(envs) = at(&manifest, "environments").and_then(Value::as_mapping) {
        for (env, config) in envs {
            if let Some(count) = config.get("count")
                && count.get("range").is_none()
            {
                problems.push(format!(
                    "environments.{}.count has no range: that environment would have no AutoScalingTarget",
                    shown(Some(env))
                ));
            }
        }
    }
    let relative = "copilot/websocket/overrides/cfn.patches.yml";
    let added = patches(relative);
    let parameters: BTreeMap<String, Value> = added
        .iter()
        .filter_map(|(path, v)| Some((path.strip_prefix("/Parameters/")?.to_owned(), v.clone())))
        .collect();
    for name in parameters.keys() {
        if COPILOT_TEMPLATE_PARAMETERS.contains(&name.as_str()) {
            problems.push(format!(
                "{relative}: adds {name}, which Copilot's template has"
            ));
        }
    }
    let resources = patched_resources(relative);
    let policies = of_type(&resources, "AWS::ApplicationAutoScaling::ScalingPolicy");
    let [(id, policy)] = policies.as_slice() else {
        panic!(
            "{relative}: expected one scaling policy, found {}",
            policies.len()
        );
    };
    if shown(at(policy, "Properties.ScalingTargetId")) != "!Ref AutoScalingTarget" {
        problems.push(format!(
            "{id}: ScalingTargetId must be !Ref AutoScalingTarget (Copilot's target for count.range)"
        ));
    }
    check_connections_policy(
        id,
        policy,
        &namespace,
        &dims(&[
            ("Service", "!Ref WorkloadName"),
            ("Environment", "!Ref EnvName"),
        ]),
        &parameters,
        &mut problems,
    );
    report("the websocket's scaling in copilot/", &problems);
}

#[test]
fn copilot_alarms_and_dashboards_watch_metrics_the_services_write() {
    let mut problems = Vec::new();
    for service in ["queue-consumer", "websocket"] {
        let manifest = yaml(&format!("copilot/{service}/manifest.yml"));
        let namespace = namespace_of(text_at(&manifest, "variables.METRICS_NAMESPACE"));
        let addon = format!("copilot/{service}/addons/metrics.yml");
        let mut resources = template_resources(&addon);
        let patch = format!("copilot/{service}/overrides/cfn.patches.yml");
        if crate::deploy::exists(&patch) {
            resources.extend(patched_resources(&patch));
        }
        check_alarm_names(&resources, &namespace, service, &mut problems);
        // In the addon the service and environment are the Name and Env parameters.
        check_above_zero_alarm(
            &template_resources(&addon),
            &namespace,
            "ProtectionRejections",
            "Sum",
            &dims(&[("Service", "!Ref Name"), ("Environment", "!Ref Env")]),
            &mut problems,
        );
        let mut wanted = vec![
            (namespace.as_str(), "ProtectionEnablePuts", "Sum"),
            (namespace.as_str(), "ProtectionRefreshPuts", "Sum"),
            (namespace.as_str(), "ProtectionReleasePuts", "Sum"),
            (namespace.as_str(), "ProtectionRejections", "Sum"),
            (namespace.as_str(), "ProtectionAcquireLatency", "p99"),
        ];
        if service == "websocket" {
            wanted.push((namespace.as_str(), "Connections", "Average"));
        } else {
            wanted.push((namespace.as_str(), "JobsDone", "Sum"));
            wanted.push((namespace.as_str(), "JobsFailed", "Sum"));
            wanted.push((SQS_NAMESPACE, DLQ_METRIC, "Maximum"));
            // The dead-letter queue Copilot creates for subscribe.queue.dead_letter.
            if at(&manifest, "subscribe.queue.dead_letter").is_none() {
                problems
                    .push("queue-consumer manifest has no dead_letter queue to alarm on".into());
            }
            check_above_zero_alarm(
                &patched_resources(&patch),
                SQS_NAMESPACE,
                DLQ_METRIC,
                "Maximum",
                &dims(&[("QueueName", "!GetAtt DeadLetterQueue.QueueName")]),
                &mut problems,
            );
        }
        check_dashboard(&resources, &namespace, &[service], &wanted, &mut problems);
    }
    report("alarms and dashboards in copilot/", &problems);
}

// --- plain CloudFormation -------------------------------------------------------------

const TEMPLATE: &str = "cloudformation/task-protection.yml";

/// The template's container variables by container name.
fn container_variables(template: &Value, container: &str) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    for (_, resource) in at(template, "Resources")
        .and_then(Value::as_mapping)
        .into_iter()
        .flatten()
    {
        for c in at(resource, "Properties.ContainerDefinitions")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            if text_at(c, "Name").as_deref() != Some(container) {
                continue;
            }
            for e in c
                .get("Environment")
                .and_then(Value::as_sequence)
                .into_iter()
                .flatten()
            {
                vars.insert(shown(e.get("Name")), shown(e.get("Value")));
            }
        }
    }
    vars
}

/// The dimensions a container writes: Service is METRICS_SERVICE or the program's
/// name (no COPILOT_SERVICE_NAME outside Copilot); Environment only when
/// METRICS_ENVIRONMENT is set.
fn written_dimensions(vars: &BTreeMap<String, String>, program: &str) -> BTreeMap<String, String> {
    let mut d = BTreeMap::new();
    d.insert(
        "Service".to_owned(),
        vars.get("METRICS_SERVICE")
            .cloned()
            .unwrap_or_else(|| program.to_owned()),
    );
    if let Some(env) = vars.get("METRICS_ENVIRONMENT") {
        d.insert("Environment".to_owned(), env.clone());
    }
    d
}

#[test]
fn the_template_scales_the_websocket_on_connections_and_alarms_on_the_metrics() {
    let template = yaml(TEMPLATE);
    let parameters: BTreeMap<String, Value> = at(&template, "Parameters")
        .and_then(Value::as_mapping)
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((text(k)?, v.clone())))
        .collect();
    let resources = template_resources(TEMPLATE);
    let mut problems = Vec::new();

    let web_vars = container_variables(&template, "websocket");
    let web_ns = namespace_of(web_vars.get("METRICS_NAMESPACE").cloned());
    let web_dims = written_dimensions(&web_vars, "websocket");
    let worker_vars = container_variables(&template, "queue-consumer");
    let worker_ns = namespace_of(worker_vars.get("METRICS_NAMESPACE").cloned());
    let worker_dims = written_dimensions(&worker_vars, "queue-consumer");
    if web_ns != worker_ns {
        problems.push(format!("the services write to {web_ns} and {worker_ns}"));
    }

    // The websocket's policy attaches to a scalable target on the websocket service.
    let policies: Vec<_> = of_type(&resources, "AWS::ApplicationAutoScaling::ScalingPolicy")
        .into_iter()
        .filter(|(_, p)| {
            let target = shown(at(p, "Properties.ScalingTargetId"));
            let target_id = target.strip_prefix("!Ref ").unwrap_or_default();
            resources.iter().any(|(id, r)| {
                id.ends_with(&format!(": {target_id}"))
                    && shown(at(r, "Properties.ResourceId")).contains("WebsocketService")
            })
        })
        .collect();
    let [(id, policy)] = policies.as_slice() else {
        panic!(
            "{TEMPLATE}: expected one scaling policy on the websocket service, found {}",
            policies.len()
        );
    };
    check_connections_policy(id, policy, &web_ns, &web_dims, &parameters, &mut problems);

    for (service, ns, d) in [
        ("queue-consumer", &worker_ns, &worker_dims),
        ("websocket", &web_ns, &web_dims),
    ] {
        let alarms: Vec<(String, Value)> = of_type(&resources, "AWS::CloudWatch::Alarm")
            .into_iter()
            .filter(|(_, a)| {
                dimensions(at(a, "Properties.Dimensions")).get("Service") == d.get("Service")
            })
            .cloned()
            .collect();
        check_alarm_names(&alarms, ns, service, &mut problems);
        check_above_zero_alarm(
            &resources,
            ns,
            "ProtectionRejections",
            "Sum",
            d,
            &mut problems,
        );
    }
    check_above_zero_alarm(
        &resources,
        SQS_NAMESPACE,
        DLQ_METRIC,
        "Maximum",
        &dims(&[("QueueName", "!GetAtt DeadLetterQueue.QueueName")]),
        &mut problems,
    );
    let ns = web_ns.as_str();
    check_dashboard(
        &resources,
        ns,
        &["queue-consumer", "websocket"],
        &[
            (ns, "Connections", "Average"),
            (ns, "JobsDone", "Sum"),
            (ns, "JobsFailed", "Sum"),
            (ns, "ProtectionEnablePuts", "Sum"),
            (ns, "ProtectionRefreshPuts", "Sum"),
            (ns, "ProtectionReleasePuts", "Sum"),
            (ns, "ProtectionRejections", "Sum"),
            (ns, "ProtectionAcquireLatency", "p99"),
            (SQS_NAMESPACE, DLQ_METRIC, "Maximum"),
        ],
        &mut problems,
    );
    report(TEMPLATE, &problems);
}
