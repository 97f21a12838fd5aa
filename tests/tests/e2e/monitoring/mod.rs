//! The metrics the deployments scale and alarm on, against what the services write.
//!
//! Both services write CloudWatch Embedded Metric Format lines on stdout; the
//! awslogs driver ships them and CloudWatch Logs turns them into metrics. CloudWatch
//! knows a metric by its namespace, its name and its whole set of dimensions with
//! their values: a scaling policy, an alarm or a dashboard row that differs in any
//! of them is accepted by CloudFormation and then never moves. So each binary runs
//! here with the variables a deployment gives it (Copilot's, or the template's task
//! definition under a stack name), its first EMF line is read, and every policy,
//! alarm and dashboard row of that deployment is checked against what it wrote.
//!
//! moto does not model these resources; CloudFormation's schema for their
//! properties is cfn-lint's part (`scripts/lint-deploy`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use e2e::moto::{Moto, aws_env, send};
use e2e::process::Service;
use e2e::{free_port, wait_for};
use serde_norway::Value;

use crate::copilot_rules::patches;
use crate::deploy::{at, function, text, text_at, yaml};

mod written;

use written::{Identity, Written, metrics_variables, written};

const SQS_NAMESPACE: &str = "AWS/SQS";
const DLQ_METRIC: &str = "ApproximateNumberOfMessagesVisible";
const TEMPLATE: &str = "cloudformation/task-protection.yml";
/// The stack name the template is read under, for `!Ref AWS::StackName`.
const STACK: &str = "task-protection-staging";
/// The Copilot application and environment the services are read in
/// (copilot/.workspace), and a second application beside it.
const COPILOT_APP: &str = "task-protection";
const OTHER_APP: &str = "another-app";
const COPILOT_ENV: &str = "test";
const STEP: Duration = Duration::from_secs(30);

// --- what the deployments name ----------------------------------------------------------

/// A value with `!Ref X` replaced from `resolve`; plain text as it is; `None` for
/// anything else (a `!GetAtt`, an unknown `!Ref`).
fn resolved(value: &Value, resolve: &BTreeMap<&str, String>) -> Option<String> {
    match function(value) {
        Some((tag, name)) if tag == "!Ref" => resolve.get(name.as_str()).cloned(),
        Some((tag, raw)) if tag == "!Sub" => {
            Some(substituted(&raw, resolve)).filter(|s| !s.contains("${"))
        }
        Some(_) => None,
        None => text(value),
    }
}

/// A manifest value as Copilot interpolates it before anything else
/// (manifest/interpolate.go): `${COPILOT_APPLICATION_NAME}` and
/// `${COPILOT_ENVIRONMENT_NAME}` become the application's and the environment's
/// names; any other `${X}` would be read from the deploying shell, which these
/// files never rely on, so it is an error here.
fn interpolated(value: &Value, app: &str, env: &str) -> Result<Value, String> {
    let Some(raw) = value.as_str() else {
        return Ok(value.clone());
    };
    let names: BTreeMap<&str, String> = [
        ("COPILOT_APPLICATION_NAME", app.to_owned()),
        ("COPILOT_ENVIRONMENT_NAME", env.to_owned()),
    ]
    .into_iter()
    .collect();
    let out = substituted(raw, &names);
    if out.contains("${") {
        return Err(format!(
            "{raw:?} names a variable Copilot would take from the deploying shell"
        ));
    }
    Ok(Value::String(out))
}

/// A text with `${X}` replaced from `resolve`; unknown names stay as they are.
fn substituted(raw: &str, resolve: &BTreeMap<&str, String>) -> String {
    let mut out = String::new();
    let mut rest = raw;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').unwrap_or(after.len());
        let name = &after[..end];
        match resolve.get(name) {
            Some(v) => out.push_str(v),
            None => out.push_str(&format!("${{{name}}}")),
        }
        rest = after.get(end + 1..).unwrap_or_default();
    }
    out.push_str(rest);
    out
}

/// `[{Name, Value}]` resolved, or the first value that cannot be.
fn dimensions(
    list: Option<&Value>,
    resolve: &BTreeMap<&str, String>,
) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for d in list.and_then(Value::as_sequence).into_iter().flatten() {
        let name = text_at(d, "Name").unwrap_or_default();
        let value = d
            .get("Value")
            .ok_or_else(|| format!("{name} has no Value"))?;
        match resolved(value, resolve) {
            Some(v) => {
                out.insert(name, v);
            }
            None => {
                let shown = function(value)
                    .map_or_else(|| format!("{value:?}"), |(t, a)| format!("{t} {a}"));
                out.insert(name, shown);
            }
        }
    }
    Ok(out)
}

/// One resource by type, from any number of sources (id → resource).
fn of_type<'a>(resources: &'a [(String, Value)], kind: &str) -> Vec<&'a (String, Value)> {
    resources
        .iter()
        .filter(|(_, r)| text_at(r, "Type").as_deref() == Some(kind))
        .collect()
}

fn template_resources(relative: &str) -> Vec<(String, Value)> {
    at(&yaml(relative), "Resources")
        .and_then(Value::as_mapping)
        .unwrap_or_else(|| panic!("{relative} has no Resources"))
        .iter()
        .filter_map(|(k, v)| Some((format!("{relative}: {}", text(k)?), v.clone())))
        .collect()
}

fn patched(relative: &str) -> (Vec<(String, Value)>, BTreeMap<String, Value>) {
    let mut resources = Vec::new();
    let mut parameters = BTreeMap::new();
    for p in patches(relative) {
        let Some(value) = p.value else { continue };
        if let Some(id) = p
            .path
            .strip_prefix("/Resources/")
            .filter(|id| !id.contains('/'))
        {
            resources.push((format!("{relative}: {id}"), value));
        } else if let Some(name) = p.path.strip_prefix("/Parameters/") {
            parameters.insert(name.to_owned(), value);
        }
    }
    (resources, parameters)
}

/// The metrics a dashboard body shows, with its `${...}` substituted: (identity, stat).
fn dashboard_rows(
    id: &str,
    dashboard: &Value,
    resolve: &BTreeMap<&str, String>,
) -> Vec<(Identity, String)> {
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
    let json = substituted(&raw, resolve);
    let parsed: serde_json::Value = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("{id}: DashboardBody is not JSON: {e}\n{json}"));
    let mut rows = Vec::new();
    for widget in parsed["widgets"].as_array().into_iter().flatten() {
        let properties = &widget["properties"];
        let stat = properties["stat"].as_str().unwrap_or("Average").to_owned();
        for row in properties["metrics"].as_array().into_iter().flatten() {
            let cells: Vec<String> = row
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c.as_str().map(str::to_owned))
                .collect();
            if let [ns, name, pairs @ ..] = cells.as_slice() {
                let dims = pairs
                    .chunks(2)
                    .filter_map(|p| Some((p.first()?.clone(), p.get(1)?.clone())))
                    .collect();
                rows.push(((ns.clone(), name.clone(), dims), stat.clone()));
            }
        }
    }
    rows
}

// --- the checks -------------------------------------------------------------------------

/// What one deployment names and what its services wrote, with the resolver for its
/// references.
struct Deployment<'a> {
    resources: &'a [(String, Value)],
    parameters: &'a BTreeMap<String, Value>,
    resolve: BTreeMap<&'static str, String>,
    /// Service name → what it wrote.
    written: BTreeMap<String, Written>,
}

impl Deployment<'_> {
    fn all_written(&self) -> BTreeSet<Identity> {
        self.written
            .values()
            .flat_map(Written::identities)
            .collect()
    }

    /// The connections policy: target tracking on the Average of `Connections` as
    /// the websocket writes it, the target a Number parameter.
    fn check_connections_policy(&self, problems: &mut Vec<String>) {
        let policies: Vec<_> = of_type(self.resources, "AWS::ApplicationAutoScaling::ScalingPolicy")
            .into_iter()
            .filter(|(_, p)| {
                at(p, "Properties.TargetTrackingScalingPolicyConfiguration.CustomizedMetricSpecification.MetricName")
                    .is_some()
                    && text_at(p, "Properties.TargetTrackingScalingPolicyConfiguration.CustomizedMetricSpecification.Namespace").as_deref()
                        != Some(SQS_NAMESPACE)
                    && at(p, "Properties.TargetTrackingScalingPolicyConfiguration.CustomizedMetricSpecification.Metrics").is_none()
            })
            .collect();
        let [(id, policy)] = policies.as_slice() else {
            problems.push(format!(
                "expected one scaling policy on a metric the services write, found {}",
                policies.len()
            ));
            return;
        };
        let spec =
            "Properties.TargetTrackingScalingPolicyConfiguration.CustomizedMetricSpecification";
        let get = |key: &str| at(policy, &format!("{spec}.{key}"));
        let identity: Identity = (
            get("Namespace")
                .and_then(|v| resolved(v, &self.resolve))
                .unwrap_or_default(),
            get("MetricName").and_then(text).unwrap_or_default(),
            dimensions(get("Dimensions"), &self.resolve).unwrap_or_default(),
        );
        match self.written.get("websocket") {
            Some(w) if w.identities().contains(&identity) && identity.1 == "Connections" => {}
            other => problems.push(format!(
                "{id}: scales on {identity:?}, but the websocket writes {:?}",
                other.map(|w| (&w.namespace, &w.values))
            )),
        }
        if get("Statistic").and_then(text).as_deref() != Some("Average") {
            problems.push(format!(
                "{id}: statistic must be Average (over the tasks: connections per task)"
            ));
        }
        if text_at(policy, "Properties.PolicyType").as_deref() != Some("TargetTrackingScaling") {
            problems.push(format!("{id}: PolicyType must be TargetTrackingScaling"));
        }
        let target = at(
            policy,
            "Properties.TargetTrackingScalingPolicyConfiguration.TargetValue",
        );
        match target.and_then(function) {
            Some((tag, name)) if tag == "!Ref" => match self.parameters.get(&name) {
                Some(p)
                    if text_at(p, "Type").as_deref() == Some("Number")
                        && text_at(p, "Default")
                            .and_then(|d| d.parse::<u64>().ok())
                            .is_some() => {}
                _ => problems.push(format!(
                    "{id}: TargetValue is !Ref {name}, which is no Number parameter with a default"
                )),
            },
            _ => problems.push(format!(
                "{id}: TargetValue must be !Ref of a parameter (a setting), is {target:?}"
            )),
        }
    }

    /// Every alarm names a metric some service writes (or the dead-letter queue's),
    /// and each service has its ProtectionRejections alarm: Sum above 0 in a minute.
    fn check_alarms(&self, problems: &mut Vec<String>) {
        let written = self.all_written();
        let mut rejections: BTreeMap<String, usize> = BTreeMap::new();
        let mut dlq = 0;
        for (id, alarm) in of_type(self.resources, "AWS::CloudWatch::Alarm") {
            let p = |key: &str| text_at(alarm, &format!("Properties.{key}")).unwrap_or_default();
            let namespace = p("Namespace");
            let dims =
                dimensions(at(alarm, "Properties.Dimensions"), &self.resolve).unwrap_or_default();
            if namespace == SQS_NAMESPACE {
                if p("MetricName") == DLQ_METRIC
                    && dims.get("QueueName").map(String::as_str)
                        == Some("!GetAtt DeadLetterQueue.QueueName")
                    && p("Statistic") == "Maximum"
                {
                    dlq += 1;
                } else {
                    problems.push(format!("{id}: an unexpected SQS alarm"));
                }
            } else {
                let identity = (namespace.clone(), p("MetricName"), dims.clone());
                if !written.contains(&identity) {
                    problems.push(format!(
                        "{id}: alarm on {identity:?}, a metric no service writes; they write {:?}",
                        self.written
                            .values()
                            .map(|w| (&w.namespace, &w.values))
                            .collect::<Vec<_>>()
                    ));
                }
                if p("MetricName") == "ProtectionRejections" {
                    *rejections
                        .entry(dims.get("Service").cloned().unwrap_or_default())
                        .or_default() += 1;
                    if p("Statistic") != "Sum" {
                        problems.push(format!("{id}: Statistic must be Sum"));
                    }
                }
            }
            if p("ComparisonOperator") != "GreaterThanThreshold" || p("Threshold") != "0" {
                problems.push(format!("{id}: must fire above 0"));
            }
            if p("TreatMissingData") != "notBreaching" {
                problems.push(format!(
                    "{id}: TreatMissingData must be notBreaching (no line, nothing to report)"
                ));
            }
        }
        for (service, w) in &self.written {
            let name = w.values.get("Service").cloned().unwrap_or_default();
            if rejections.get(&name) != Some(&1) {
                problems.push(format!(
                    "{service}: expected one ProtectionRejections alarm on Service={name}, found {:?}",
                    rejections.get(&name)
                ));
            }
        }
        if self.written.contains_key("queue-consumer") && dlq != 1 {
            problems.push(format!(
                "expected one alarm on the dead-letter queue, found {dlq}"
            ));
        }
    }

    /// Every dashboard row is a metric some service writes (or the dead-letter
    /// queue's depth), and the rows that matter are there.
    fn check_dashboards(&self, wanted: &[(&str, &str)], problems: &mut Vec<String>) {
        let written = self.all_written();
        let dashboards = of_type(self.resources, "AWS::CloudWatch::Dashboard");
        if dashboards.is_empty() {
            problems.push("no AWS::CloudWatch::Dashboard".into());
        }
        let mut shown: BTreeSet<(String, String)> = BTreeSet::new();
        for (id, dashboard) in dashboards {
            for (identity, stat) in dashboard_rows(id, dashboard, &self.resolve) {
                if identity.0 == SQS_NAMESPACE {
                    if identity.1 != DLQ_METRIC || !identity.2.contains_key("QueueName") {
                        problems.push(format!("{id}: shows {identity:?}, an unexpected metric"));
                    }
                } else if !written.contains(&identity) {
                    problems.push(format!("{id}: shows {identity:?}, which no service writes"));
                }
                shown.insert((identity.1, stat));
            }
        }
        for (name, stat) in wanted {
            if !shown.contains(&((*name).to_owned(), (*stat).to_owned())) {
                problems.push(format!("no dashboard shows {name} ({stat})"));
            }
        }
    }
}

const WANTED_WEBSOCKET: [(&str, &str); 6] = [
    ("Connections", "Average"),
    ("ProtectionEnablePuts", "Sum"),
    ("ProtectionRefreshPuts", "Sum"),
    ("ProtectionReleasePuts", "Sum"),
    ("ProtectionRejections", "Sum"),
    ("ProtectionAcquireLatency", "p99"),
];
const WANTED_WORKER: [(&str, &str); 8] = [
    ("JobsDone", "Sum"),
    ("JobsFailed", "Sum"),
    ("ProtectionEnablePuts", "Sum"),
    ("ProtectionRefreshPuts", "Sum"),
    ("ProtectionReleasePuts", "Sum"),
    ("ProtectionRejections", "Sum"),
    ("ProtectionAcquireLatency", "p99"),
    (DLQ_METRIC, "Maximum"),
];

fn report(what: &str, problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{what}:\n  - {}",
        problems.join("\n  - ")
    );
}

/// Every line carries [Service, Environment] when the deployment sets the environment.
fn check_dimension_set(service: &str, w: &Written, problems: &mut Vec<String>) {
    if w.keys != ["Service", "Environment"] {
        problems.push(format!(
            "{service} writes the dimension set {:?}; a deployment must scope it as [Service, Environment]",
            w.keys
        ));
    }
}

#[tokio::test]
async fn copilots_policy_alarms_and_dashboards_name_what_the_services_write() {
    let moto = Moto::start().await;
    let mut problems = Vec::new();
    for service in ["queue-consumer", "websocket"] {
        let manifest = yaml(&format!("copilot/{service}/manifest.yml"));
        // Copilot gives every task its service and environment names; in the
        // addons they are the Name and Env parameters, in the service stack
        // WorkloadName and EnvName.
        let resolve: BTreeMap<&str, String> = [
            ("Name", service.to_owned()),
            ("WorkloadName", service.to_owned()),
            ("Env", COPILOT_ENV.to_owned()),
            ("EnvName", COPILOT_ENV.to_owned()),
            ("App", COPILOT_APP.to_owned()),
            ("AppName", COPILOT_APP.to_owned()),
            ("AWS::Region", "us-east-1".to_owned()),
        ]
        .into_iter()
        .collect();
        let vars_in = |app: &str| -> BTreeMap<String, Value> {
            at(&manifest, "variables")
                .and_then(Value::as_mapping)
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| {
                    let value = interpolated(v, app, COPILOT_ENV)
                        .unwrap_or_else(|e| panic!("copilot/{service}/manifest.yml: {e}"));
                    Some((text(k)?, value))
                })
                .collect()
        };
        let vars = vars_in(COPILOT_APP);
        // Two Copilot applications in one account and Region, each with a `test`
        // environment and this service, must not share a metric: the Environment
        // dimension carries the application's name too.
        let other = metrics_variables(&vars_in(OTHER_APP), &resolve);
        if other == metrics_variables(&vars, &resolve) {
            problems.push(format!(
                "{service}: the applications {COPILOT_APP} and {OTHER_APP} would write the same metrics (set METRICS_ENVIRONMENT from ${{COPILOT_APPLICATION_NAME}} and ${{COPILOT_ENVIRONMENT_NAME}})"
            ));
        }
        let mut env = metrics_variables(&vars, &resolve);
        env.push(("COPILOT_SERVICE_NAME", service.to_owned()));
        env.push(("COPILOT_ENVIRONMENT_NAME", COPILOT_ENV.to_owned()));
        let w = written(service, &env, &moto).await;
        check_dimension_set(service, &w, &mut problems);

        let mut resources = template_resources(&format!("copilot/{service}/addons/metrics.yml"));
        let (patched_resources, parameters) =
            patched(&format!("copilot/{service}/overrides/cfn.patches.yml"));
        resources.extend(patched_resources);
        let deployment = Deployment {
            resources: &resources,
            parameters: &parameters,
            resolve,
            written: [(service.to_owned(), w)].into_iter().collect(),
        };
        if service == "websocket" {
            deployment.check_connections_policy(&mut problems);
            deployment.check_dashboards(&WANTED_WEBSOCKET, &mut problems);
        } else {
            deployment.check_dashboards(&WANTED_WORKER, &mut problems);
        }
        deployment.check_alarms(&mut problems);
    }
    report("Copilot's metrics resources", &problems);
}

#[tokio::test]
async fn the_templates_policy_alarms_and_dashboard_name_what_the_services_write() {
    let moto = Moto::start().await;
    let template = yaml(TEMPLATE);
    let resources = template_resources(TEMPLATE);
    let parameters: BTreeMap<String, Value> = at(&template, "Parameters")
        .and_then(Value::as_mapping)
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((text(k)?, v.clone())))
        .collect();
    let resolve: BTreeMap<&str, String> = [
        ("AWS::StackName", STACK.to_owned()),
        ("AWS::Region", "us-east-1".to_owned()),
    ]
    .into_iter()
    .collect();
    let mut problems = Vec::new();
    let mut written_by = BTreeMap::new();
    for service in ["queue-consumer", "websocket"] {
        // The task definition's own variables, as ECS gives them to the container.
        let container = resources
            .iter()
            .filter_map(|(_, r)| at(r, "Properties.ContainerDefinitions")?.as_sequence())
            .flatten()
            .find(|c| text_at(c, "Name").as_deref() == Some(service))
            .unwrap_or_else(|| panic!("{TEMPLATE}: no container {service}"));
        let vars: BTreeMap<String, Value> = container
            .get("Environment")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .filter_map(|e| Some((text_at(e, "Name")?, e.get("Value")?.clone())))
            .collect();
        let w = written(service, &metrics_variables(&vars, &resolve), &moto).await;
        check_dimension_set(service, &w, &mut problems);
        written_by.insert(service.to_owned(), w);
    }
    let deployment = Deployment {
        resources: &resources,
        parameters: &parameters,
        resolve,
        written: written_by,
    };
    deployment.check_connections_policy(&mut problems);
    deployment.check_alarms(&mut problems);
    let mut wanted: Vec<(&str, &str)> = WANTED_WEBSOCKET.to_vec();
    wanted.extend(WANTED_WORKER);
    deployment.check_dashboards(&wanted, &mut problems);
    report(TEMPLATE, &problems);

    // Two stacks in one account and Region write apart: the same template under
    // another stack name names none of this stack's metrics.
    let other: BTreeMap<&str, String> =
        [("AWS::StackName", "task-protection-production".to_owned())]
            .into_iter()
            .collect();
    let (_, alarm) = of_type(&resources, "AWS::CloudWatch::Alarm")
        .into_iter()
        .find(|(_, a)| {
            text_at(a, "Properties.MetricName").as_deref() == Some("ProtectionRejections")
        })
        .expect("a rejections alarm");
    let dims = dimensions(at(alarm, "Properties.Dimensions"), &other).unwrap_or_default();
    assert!(
        !deployment
            .all_written()
            .iter()
            .any(|(_, name, d)| name == "ProtectionRejections" && *d == dims),
        "another stack's alarm watches this stack's metric"
    );
}

#[test]
fn substitution_and_references_resolve_as_cloudformation_does() {
    let resolve: BTreeMap<&str, String> = [("Name", "websocket".to_owned())].into_iter().collect();
    assert_eq!(
        substituted("[\"${Name}\", \"${Other}\", \"${AWS::Region}\"]", &resolve),
        "[\"websocket\", \"${Other}\", \"${AWS::Region}\"]"
    );
    let value: Value = serde_norway::from_str("!Ref Name").unwrap();
    assert_eq!(resolved(&value, &resolve).as_deref(), Some("websocket"));
    let value: Value = serde_norway::from_str("!Ref Unknown").unwrap();
    assert_eq!(resolved(&value, &resolve), None);
    let line = r#"{"_aws":{"Timestamp":1,"CloudWatchMetrics":[{"Namespace":"N","Dimensions":[["Service"]],"Metrics":[{"Name":"Connections","Unit":"Count"}]}]},"Service":"websocket","Connections":3}"#;
    let w = Written::parse(line);
    let mut problems = Vec::new();
    check_dimension_set("websocket", &w, &mut problems);
    assert_eq!(
        problems.len(),
        1,
        "a line without Environment is not scoped"
    );
    assert!(
        w.identities().contains(&(
            "N".to_owned(),
            "Connections".to_owned(),
            [("Service".to_owned(), "websocket".to_owned())]
                .into_iter()
                .collect()
        ))
    );
}
