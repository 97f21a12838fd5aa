//! What Copilot renders for a service, as far as our YAML patches name it: the Lambda
//! functions of each template, the logical ids and lists a patch may point into, and
//! how Copilot applies a patch (patch.go).

use super::*;

// --- what Copilot generates --------------------------------------------------------------------

/// A Lambda function Copilot puts in a service stack, with the runtime its
/// template sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Function {
    pub(super) id: &'static str,
    pub(super) runtime: &'static str,
    pub(super) source: &'static str,
}

/// The functions in a service stack: every one is created on a deployment that
/// creates the stack, and Lambda refuses to create functions on a deprecated runtime.
pub(super) fn generated_functions(kind: Kind, config: &Value) -> Vec<Function> {
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
pub(super) struct Skeleton {
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
pub(super) fn skeleton(kind: Kind, config: &Value) -> Skeleton {
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
pub(crate) struct Patch {
    pub(crate) op: String,
    pub(crate) path: String,
    pub(crate) value: Option<Value>,
}

pub(crate) fn patches(relative: &str) -> Vec<Patch> {
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
pub(super) fn split_pointer(path: &str) -> (String, String) {
    let (parent, last) = path.rsplit_once('/').unwrap_or(("", path));
    (
        parent.to_owned(),
        last.replace("~1", "/").replace("~0", "~"),
    )
}

/// The names a value refers to: `!Ref X`, `!GetAtt X.Y`, `${X}` and `${X.Y}` in a
/// `!Sub` (less the names its own variable map defines).
pub(super) fn references(value: &Value, out: &mut BTreeSet<String>) {
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
pub(super) fn patch_problems(patches: &[Patch], skeleton: &Skeleton) -> Vec<String> {
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

// --- the tests -------------------------------------------------------------------------------------

#[test]
pub(super) fn the_patches_apply_to_what_copilot_renders_in_every_environment() {
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
pub(super) fn the_patch_rules_catch_what_copilot_would_refuse() {
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

// --- the environment stack ------------------------------------------------------------------------

/// The environments' YAML patches: Copilot applies `copilot/environments/overrides/`
/// to every environment's template (workspace.go, `EnvOverridesPath`).
pub(super) const ENVIRONMENT_PATCHES: &str = "copilot/environments/overrides/cfn.patches.yml";

/// The Lambda functions in an environment's template (templates/environment/cf.yml).
/// `partials/lambdas.yml` is always rendered; CloudFormation creates its functions
/// only for an application with a domain (conditions DelegateDNS, ManagedAliases),
/// but a patch finds them either way. `cdn` adds `partials/cdn-resources.yml`, and
/// access logs in a bucket Copilot creates add `partials/elb-access-logs.yml`.
pub(super) fn environment_functions(env: &Value) -> Vec<Function> {
    let mut functions: Vec<Function> = [
        "CertificateValidationFunction",
        "CustomDomainFunction",
        "DNSDelegationFunction",
    ]
    .into_iter()
    .map(|id| Function {
        id,
        runtime: "nodejs20.x",
        source: "environment/partials/lambdas.yml",
    })
    .collect();
    if at(env, "cdn").is_some_and(|c| !matches!(c, Value::Bool(false))) {
        for id in ["UniqueJSONValuesFunction", "CertificateReplicatorFunction"] {
            functions.push(Function {
                id,
                runtime: "nodejs20.x",
                source: "environment/partials/cdn-resources.yml",
            });
        }
    }
    let logs = at(env, "http.public.access_logs");
    let creates_bucket = match logs {
        Some(Value::Bool(on)) => *on,
        Some(v) => v.get("bucket_name").is_none(),
        None => false,
    };
    if creates_bucket {
        functions.push(Function {
            id: "BucketCleanerFunction",
            runtime: "nodejs20.x",
            source: "environment/partials/elb-access-logs.yml",
        });
    }
    functions
}

#[test]
fn the_environment_patches_replace_only_runtimes_the_environment_has() {
    let patches = patches(ENVIRONMENT_PATCHES);
    let mut problems = Vec::new();
    for env in SHIPPED_ENVIRONMENTS {
        let functions = environment_functions(&environment_manifest(env));
        let ids: BTreeSet<&str> = functions.iter().map(|f| f.id).collect();
        for p in &patches {
            let target = p
                .path
                .strip_prefix("/Resources/")
                .and_then(|rest| rest.strip_suffix("/Properties/Runtime"));
            match target {
                Some(id) if p.op == "replace" && ids.contains(id) => {}
                _ => problems.push(format!(
                    "{ENVIRONMENT_PATCHES} in {env}: {} {} is not a replace of a function's Runtime in the environment's template ({PATCH}; {TEMPLATES}/environment/cf.yml)",
                    p.op, p.path
                )),
            }
        }
        for f in &functions {
            let path = format!("/Resources/{}/Properties/Runtime", f.id);
            if !patches.iter().any(|p| p.path == path) {
                problems.push(format!(
                    "{ENVIRONMENT_PATCHES}: environment {env} renders {} ({TEMPLATES}/{}) and no patch moves its runtime",
                    f.id, f.source
                ));
            }
        }
    }
    report("the environments' patches", &problems);
    // The rule: CDN and access logs bring functions of their own.
    let with_cdn: Value =
        serde_norway::from_str("cdn: true\nhttp:\n  public:\n    access_logs: true\n")
            .expect("YAML");
    let ids: Vec<&str> = environment_functions(&with_cdn)
        .iter()
        .map(|f| f.id)
        .collect();
    assert_eq!(ids.len(), 6, "{ids:?}");
}
