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

mod manifest;
mod render;
mod runtimes;

use manifest::*;
pub(super) use render::patches;
use render::*;

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
            // The drain's table, whose name the tasks read as DRAIN_TABLE: the
            // template's test checks that both binaries read it (check_drain_table_variable).
            Some("AWS::DynamoDB::Table") if name == "DrainTable" => {}
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
