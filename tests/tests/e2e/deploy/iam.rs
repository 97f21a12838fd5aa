//! The task roles' policies, evaluated: each service's role may protect, read and
//! describe its own tasks, and cannot touch the other service's.
//!
//! The policy documents are read from the files (Copilot's addons, the template's
//! roles), their CloudFormation functions resolved, and every request below is
//! decided the way IAM decides within one account (the IAM User Guide, "Policy
//! evaluation logic"): an explicit Deny wins, then any Allow whose Action, Resource
//! and every Condition match; otherwise the request is denied. Action and Resource
//! match with `*` and `?` wildcards, actions without regard to case. Conditions:
//! every operator in a statement must hold, every key in an operator must hold, and
//! one of a key's values is enough; a key the request does not carry fails. Only the
//! operators these policies use are known here (StringEquals, StringLike,
//! ArnEquals, ArnLike); any other fails the test instead of being guessed.
//!
//! What each request carries follows the Service Authorization Reference for ECS:
//! UpdateTaskProtection, GetTaskProtection and DescribeTasks act on a `task`
//! resource (`arn:...:task/<cluster>/<id>`) with the keys `aws:ResourceTag/<key>` and
//! `ecs:cluster`; DescribeServices on a `service` resource; ListTasks on no task
//! (its resource type is the container instance, which Fargate tasks have none of),
//! so it carries `ecs:cluster` only. ECS copies a service's tags to its tasks when
//! the service has `PropagateTags: SERVICE`: Copilot's services do
//! (templates/workloads/partials/cf/service-base-properties.yml) and are tagged
//! `copilot-service: <name>` (internal/pkg/deploy/deploy.go, ServiceTagKey); the
//! template's services carry the tag `ecs-service`.

use super::*;

/// The account, Region and names the requests use.
const ACCOUNT: &str = "123456789012";
const REGION: &str = "us-east-1";
const SERVICES: [&str; 2] = ["queue-consumer", "websocket"];

/// A CloudFormation value with its functions resolved from `vars`: `!Ref X` and
/// `!GetAtt X.Y` by name, `!Sub` (both forms), `Fn::ImportValue` as `import:<name>`.
pub(super) fn resolve(value: &Value, vars: &BTreeMap<String, String>) -> Result<Value, String> {
    let sub = |raw: &str, vars: &BTreeMap<String, String>| -> Result<Value, String> {
        let mut out = String::new();
        let mut rest = raw;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| format!("unclosed ${{ in {raw}"))?;
            let name = &after[..end];
            out.push_str(
                vars.get(name)
                    .ok_or_else(|| format!("${{{name}}} is unknown"))?,
            );
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(Value::String(out))
    };
    match value {
        Value::Tagged(t) => {
            let tag = t.tag.to_string();
            match (tag.as_str(), &t.value) {
                ("!Ref" | "!GetAtt", v) => {
                    let name = text(v).ok_or_else(|| format!("{tag} of {v:?}"))?;
                    vars.get(&name)
                        .map(|s| Value::String(s.clone()))
                        .ok_or_else(|| format!("{tag} {name} is unknown"))
                }
                ("!Sub", Value::String(raw)) => sub(raw, vars),
                ("!Sub", Value::Sequence(parts)) => {
                    let raw = parts.first().and_then(Value::as_str).unwrap_or_default();
                    let mut inner = vars.clone();
                    for (k, v) in parts
                        .get(1)
                        .and_then(Value::as_mapping)
                        .into_iter()
                        .flatten()
                    {
                        let resolved = resolve(v, vars)?;
                        inner.insert(
                            text(k).unwrap_or_default(),
                            text(&resolved).unwrap_or_default(),
                        );
                    }
                    sub(raw, &inner)
                }
                _ => Err(format!("unknown function {tag}")),
            }
        }
        Value::Mapping(m) => {
            if let Some(import) = m.get("Fn::ImportValue") {
                let name = text(&resolve(import, vars)?).unwrap_or_default();
                return vars
                    .get(&format!("import:{name}"))
                    .map(|s| Value::String(s.clone()))
                    .ok_or_else(|| format!("no export {name}"));
            }
            let mut out = serde_norway::Mapping::new();
            for (k, v) in m {
                out.insert(k.clone(), resolve(v, vars)?);
            }
            Ok(Value::Mapping(out))
        }
        Value::Sequence(list) => list
            .iter()
            .map(|v| resolve(v, vars))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Sequence),
        other => Ok(other.clone()),
    }
}

/// `pattern` with `*` (any run) and `?` (one character) against `text`.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

fn list(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::Sequence(items)) => items.iter().filter_map(text).collect(),
        Some(one) => text(one).into_iter().collect(),
        None => Vec::new(),
    }
}

/// One API call as IAM sees it.
#[derive(Debug, Clone)]
pub(super) struct Request {
    pub(super) action: &'static str,
    pub(super) resource: String,
    pub(super) context: BTreeMap<String, String>,
}

fn condition_holds(condition: Option<&Value>, context: &BTreeMap<String, String>) -> bool {
    let Some(ops) = condition.and_then(Value::as_mapping) else {
        return true;
    };
    ops.iter().all(|(op, block)| {
        let op = text(op).unwrap_or_default();
        block
            .as_mapping()
            .into_iter()
            .flatten()
            .all(|(key, expected)| {
                let key = text(key).unwrap_or_default().to_lowercase();
                let Some(actual) = context
                    .iter()
                    .find(|(k, _)| k.to_lowercase() == key)
                    .map(|(_, v)| v)
                else {
                    return false;
                };
                let expected = list(Some(expected));
                match op.as_str() {
                    "StringEquals" => expected.iter().any(|e| e == actual),
                    "StringLike" | "ArnEquals" | "ArnLike" => {
                        expected.iter().any(|e| glob(e, actual))
                    }
                    other => panic!("condition operator {other} is not known to these checks"),
                }
            })
    })
}

fn matches(statement: &Value, request: &Request) -> bool {
    let action = request.action.to_lowercase();
    list(statement.get("Action"))
        .iter()
        .any(|a| glob(&a.to_lowercase(), &action))
        && list(statement.get("Resource"))
            .iter()
            .any(|r| glob(r, &request.resource))
        && condition_holds(statement.get("Condition"), &request.context)
}

/// IAM's decision for `request` under `statements` (resolved): allowed or not.
pub(super) fn allowed(statements: &[Value], request: &Request) -> bool {
    let effect = |s: &Value| text_at(s, "Effect").unwrap_or_default();
    if statements
        .iter()
        .any(|s| effect(s) == "Deny" && matches(s, request))
    {
        return false;
    }
    statements
        .iter()
        .any(|s| effect(s) == "Allow" && matches(s, request))
}

/// The world the requests are made in: one cluster with a task of each service, and
/// a task of the same name in a second cluster.
struct World {
    cluster: String,
    other_cluster: String,
    tag_key: &'static str,
    /// Service → the name of its ECS service.
    service_names: BTreeMap<&'static str, String>,
    /// Service → the ARN of its drain table.
    tables: BTreeMap<&'static str, String>,
}

impl World {
    fn cluster_arn(name: &str) -> String {
        format!("arn:aws:ecs:{REGION}:{ACCOUNT}:cluster/{name}")
    }

    fn task(&self, action: &'static str, cluster: &str, service: &str) -> Request {
        Request {
            action,
            resource: format!("arn:aws:ecs:{REGION}:{ACCOUNT}:task/{cluster}/0123456789abcdef"),
            context: [
                (
                    format!("aws:ResourceTag/{}", self.tag_key),
                    service.to_owned(),
                ),
                ("ecs:cluster".to_owned(), Self::cluster_arn(cluster)),
            ]
            .into_iter()
            .collect(),
        }
    }

    /// Every request and whether `service`'s role must be allowed it.
    fn expectations(&self, service: &str) -> Vec<(String, Request, bool)> {
        let other = SERVICES
            .iter()
            .find(|s| **s != service)
            .copied()
            .unwrap_or_default();
        let mut out = Vec::new();
        for action in [
            "ecs:UpdateTaskProtection",
            "ecs:GetTaskProtection",
            "ecs:DescribeTasks",
        ] {
            out.push((
                format!("{action} on its own task"),
                self.task(action, &self.cluster, service),
                true,
            ));
            out.push((
                format!("{action} on a {other} task"),
                self.task(action, &self.cluster, other),
                false,
            ));
            out.push((
                format!("{action} on a task of its name in another cluster"),
                self.task(action, &self.other_cluster, service),
                false,
            ));
        }
        for (whose, cluster, want) in [
            ("its own", &self.cluster, true),
            ("another", &self.other_cluster, false),
        ] {
            out.push((
                format!("ecs:ListTasks in {whose} cluster"),
                Request {
                    action: "ecs:ListTasks",
                    resource: "*".to_owned(),
                    context: [("ecs:cluster".to_owned(), Self::cluster_arn(cluster))]
                        .into_iter()
                        .collect(),
                },
                want,
            ));
        }
        for (s, want) in [(service, true), (other, false)] {
            out.push((
                format!("ecs:DescribeServices on the {s} service"),
                Request {
                    action: "ecs:DescribeServices",
                    resource: format!(
                        "arn:aws:ecs:{REGION}:{ACCOUNT}:service/{}/{}",
                        self.cluster, self.service_names[s]
                    ),
                    context: [("ecs:cluster".to_owned(), Self::cluster_arn(&self.cluster))]
                        .into_iter()
                        .collect(),
                },
                want,
            ));
            out.push((
                format!("ecs:DescribeServiceDeployments on a deployment of the {s} service"),
                Request {
                    action: "ecs:DescribeServiceDeployments",
                    resource: format!(
                        "arn:aws:ecs:{REGION}:{ACCOUNT}:service-deployment/{}/{}/AbCdEf123",
                        self.cluster, self.service_names[s]
                    ),
                    context: [("ecs:cluster".to_owned(), Self::cluster_arn(&self.cluster))]
                        .into_iter()
                        .collect(),
                },
                want,
            ));
        }
        for (whose, cluster, want) in [
            ("its own", &self.cluster, true),
            ("another", &self.other_cluster, false),
        ] {
            out.push((
                format!("ecs:DescribeContainerInstances in {whose} cluster"),
                Request {
                    action: "ecs:DescribeContainerInstances",
                    resource: format!(
                        "arn:aws:ecs:{REGION}:{ACCOUNT}:container-instance/{cluster}/0123456789abcdef"
                    ),
                    context: [("ecs:cluster".to_owned(), Self::cluster_arn(cluster))]
                        .into_iter()
                        .collect(),
                },
                want,
            ));
        }
        let own = &self.tables[service];
        for action in [
            "dynamodb:GetItem",
            "dynamodb:UpdateItem",
            "dynamodb:PutItem",
        ] {
            let mut tables = vec![
                ("its drain table".to_owned(), own.clone(), true),
                (
                    "another table".to_owned(),
                    format!("arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/orders"),
                    false,
                ),
            ];
            // Copilot makes a table per service; the template one for both.
            if self.tables[other] != *own {
                tables.push((
                    format!("the {other} service's drain table"),
                    self.tables[other].clone(),
                    false,
                ));
            }
            for (whose, table, want) in tables {
                out.push((
                    format!("{action} on {whose}"),
                    Request {
                        action,
                        resource: table,
                        context: BTreeMap::new(),
                    },
                    want,
                ));
            }
        }
        for action in [
            "dynamodb:DeleteItem",
            "dynamodb:Scan",
            "dynamodb:DeleteTable",
        ] {
            out.push((
                format!("{action} on its drain table"),
                Request {
                    action,
                    resource: own.clone(),
                    context: BTreeMap::new(),
                },
                false,
            ));
        }
        out
    }
}

/// The statements of every policy document under `node` (a managed policy, or a
/// role's inline policies), resolved.
fn statements_of(node: &Value, vars: &BTreeMap<String, String>, what: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut docs = Vec::new();
    if let Some(doc) = at(node, "Properties.PolicyDocument") {
        docs.push(doc);
    }
    for p in at(node, "Properties.Policies")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
    {
        docs.extend(p.get("PolicyDocument"));
    }
    for doc in docs {
        let resolved = resolve(doc, vars).unwrap_or_else(|e| panic!("{what}: {e}"));
        out.extend(
            at(&resolved, "Statement")
                .and_then(Value::as_sequence)
                .into_iter()
                .flatten()
                .cloned(),
        );
    }
    out
}

fn simulate(what: &str, world: &World, roles: &BTreeMap<&str, Vec<Value>>) -> Vec<String> {
    let mut problems = Vec::new();
    for (service, statements) in roles {
        for (case, request, want) in world.expectations(service) {
            let got = allowed(statements, &request);
            if got != want {
                problems.push(format!(
                    "{what}: the {service} role is {} {case} ({})",
                    if got { "allowed" } else { "denied" },
                    request.resource
                ));
            }
        }
    }
    problems
}

/// The ARN of `service`'s drain table, which CloudFormation names in the addons'
/// nested stack.
fn copilot_table(service: &str) -> String {
    format!(
        "arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/task-protection-test-{service}-AddonsStack-XyZ-DrainTable-AbC"
    )
}

/// The Copilot roles: each service's addons, resolved for the `test` environment.
fn copilot_roles(world: &World) -> BTreeMap<&'static str, Vec<Value>> {
    let mut roles = BTreeMap::new();
    for service in SERVICES {
        let vars: BTreeMap<String, String> = [
            ("App", "task-protection"),
            ("Env", "test"),
            ("Name", service),
            ("AWS::Partition", "aws"),
            ("AWS::Region", REGION),
            ("AWS::AccountId", ACCOUNT),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .chain([
            (
                "import:task-protection-test-ClusterId".to_owned(),
                world.cluster.clone(),
            ),
            ("DrainTable.Arn".to_owned(), world.tables[service].clone()),
        ])
        .collect();
        let mut statements = Vec::new();
        for addon in ["task-protection", "drain"] {
            let relative = format!("copilot/{service}/addons/{addon}.yml");
            let template = yaml(&relative);
            for (_, resource) in at(&template, "Resources")
                .and_then(Value::as_mapping)
                .into_iter()
                .flatten()
            {
                if text_at(resource, "Type").as_deref() == Some("AWS::IAM::ManagedPolicy") {
                    statements.extend(statements_of(resource, &vars, &relative));
                }
            }
        }
        roles.insert(service, statements);
    }
    roles
}

#[test]
fn each_copilot_service_role_reaches_its_own_tasks_and_not_the_others() {
    let world = World {
        cluster: "task-protection-test-Cluster-AbCdEf".to_owned(),
        other_cluster: "task-protection-prod-Cluster-GhIjKl".to_owned(),
        tag_key: "copilot-service",
        service_names: SERVICES
            .iter()
            .map(|s| (*s, format!("task-protection-test-{s}-Service-XyZ123")))
            .collect(),
        tables: SERVICES.iter().map(|s| (*s, copilot_table(s))).collect(),
    };
    let problems = simulate("copilot", &world, &copilot_roles(&world));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn each_template_service_role_reaches_its_own_tasks_and_not_the_others() {
    const TEMPLATE: &str = "cloudformation/task-protection.yml";
    let template = yaml(TEMPLATE);
    let stack = "task-protection";
    let cluster = "task-protection-Cluster-AbCdEf".to_owned();
    let logical = [
        ("queue-consumer", "QueueConsumer"),
        ("websocket", "Websocket"),
    ];
    // The tag the tasks carry is the one their service propagates.
    let mut problems = Vec::new();
    for (service, prefix) in logical {
        let path = format!("Resources.{prefix}Service.Properties");
        let props = at(&template, &path).unwrap_or_else(|| panic!("{TEMPLATE}: no {path}"));
        if text_at(props, "PropagateTags").as_deref() != Some("SERVICE") {
            problems.push(format!("{TEMPLATE}: {prefix}Service does not propagate its tags to its tasks (PropagateTags: SERVICE)"));
        }
        let tagged = props
            .get("Tags")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .any(|t| {
                text_at(t, "Key").as_deref() == Some("ecs-service")
                    && text_at(t, "Value").as_deref() == Some(service)
            });
        if !tagged {
            problems.push(format!(
                "{TEMPLATE}: {prefix}Service has no tag ecs-service: {service}"
            ));
        }
    }
    let world = World {
        cluster: cluster.clone(),
        other_cluster: "another-stack-Cluster-GhIjKl".to_owned(),
        tag_key: "ecs-service",
        service_names: logical
            .iter()
            .map(|(s, prefix)| (*s, format!("{stack}-{prefix}Service-XyZ123")))
            .collect(),
        tables: logical
            .iter()
            .map(|(s, _)| {
                (
                    *s,
                    format!("arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{stack}-DrainTable-AbC"),
                )
            })
            .collect(),
    };
    let vars: BTreeMap<String, String> = [
        ("AWS::Partition", "aws".to_owned()),
        ("AWS::Region", REGION.to_owned()),
        ("AWS::AccountId", ACCOUNT.to_owned()),
        ("AWS::StackName", stack.to_owned()),
        ("Cluster", cluster.clone()),
        ("Cluster.Arn", World::cluster_arn(&cluster)),
        (
            "Queue.Arn",
            format!("arn:aws:sqs:{REGION}:{ACCOUNT}:{stack}-Queue-AbC"),
        ),
        ("DrainTable.Arn", world.tables["websocket"].clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let roles: BTreeMap<&str, Vec<Value>> = logical
        .iter()
        .map(|(service, prefix)| {
            let id = format!("{prefix}TaskRole");
            let role = at(&template, &format!("Resources.{id}"))
                .unwrap_or_else(|| panic!("{TEMPLATE}: no {id}"));
            (
                *service,
                statements_of(role, &vars, &format!("{TEMPLATE}: {id}")),
            )
        })
        .collect();
    problems.extend(simulate("cloudformation", &world, &roles));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_evaluator_decides_as_iam_does() {
    let statements: Vec<Value> = serde_norway::from_str(
        r"
- Effect: Allow
  Action: [ecs:UpdateTaskProtection]
  Resource: 'arn:aws:ecs:*:*:task/c/*'
  Condition:
    StringEquals: {'aws:ResourceTag/copilot-service': [a, b]}
- Effect: Deny
  Action: 'ecs:*'
  Resource: '*'
  Condition:
    StringLike: {'aws:ResourceTag/copilot-service': 'b'}
",
    )
    .expect("YAML");
    let request = |tag: Option<&str>, resource: &str, action: &'static str| Request {
        action,
        resource: resource.to_owned(),
        context: tag
            .map(|t| ("aws:resourcetag/copilot-service".to_owned(), t.to_owned()))
            .into_iter()
            .collect(),
    };
    let task = "arn:aws:ecs:us-east-1:1:task/c/9";
    // One value of a list is enough; keys match without regard to case.
    assert!(allowed(
        &statements,
        &request(Some("a"), task, "ECS:updatetaskprotection")
    ));
    // An explicit Deny wins over the Allow.
    assert!(!allowed(
        &statements,
        &request(Some("b"), task, "ecs:UpdateTaskProtection")
    ));
    // A missing key fails its condition; nothing else allows: denied.
    assert!(!allowed(
        &statements,
        &request(None, task, "ecs:UpdateTaskProtection")
    ));
    // The resource pattern: another cluster is not covered.
    assert!(!allowed(
        &statements,
        &request(
            Some("a"),
            "arn:aws:ecs:us-east-1:1:task/d/9",
            "ecs:UpdateTaskProtection"
        )
    ));
    assert!(glob("a*c?e", "abbbcde") && !glob("a*c?e", "abbbce") && glob("*", ""));
}
