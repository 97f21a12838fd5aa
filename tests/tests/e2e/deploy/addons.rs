//! The addons and patches that give each service's task role what Copilot does not:
//! task protection, the drain watcher's ECS reads and the worker's visibility grant,
//! and how Copilot merges a service's addons.

use super::*;

/// The one managed policy of the addon template at `relative`, with its logical id.
fn the_managed_policy<'a>(relative: &str, template: &'a Value) -> (&'a Value, &'a Value) {
    let resources = at(template, "Resources")
        .and_then(Value::as_mapping)
        .unwrap_or_else(|| panic!("{relative} has no Resources"));
    let policies: Vec<(&Value, &Value)> = resources
        .iter()
        .filter(|(_, r)| text_at(r, "Type").as_deref() == Some("AWS::IAM::ManagedPolicy"))
        .collect();
    assert_eq!(policies.len(), 1, "{relative}: expected one managed policy");
    policies[0]
}

#[test]
fn the_addons_grant_only_task_protection_in_the_environment_cluster() {
    for service in ["queue-consumer", "websocket"] {
        let relative = format!("copilot/{service}/addons/task-protection.yml");
        let template = yaml(&relative);
        let (id, policy) = the_managed_policy(&relative, &template);
        let statements = at(policy, "Properties.PolicyDocument.Statement")
            .and_then(Value::as_sequence)
            .unwrap_or_else(|| panic!("{relative}: the policy has no statements"));
        assert_eq!(
            allowed_actions(statements),
            ["ecs:GetTaskProtection", "ecs:UpdateTaskProtection"],
            "{relative}: the policy must allow exactly the two task protection actions"
        );
        for statement in statements {
            let resource = statement.get("Resource");
            let rendered = format!("{resource:?}");
            assert!(
                resource.is_some_and(|r| text(r).as_deref() != Some("*")),
                "{relative}: Resource must not be '*'"
            );
            assert!(
                rendered.contains(":task/${Cluster}/*") && rendered.contains("-ClusterId"),
                "{relative}: Resource should be the tasks of the cluster the environment exports, got {rendered}"
            );
        }
        let outputs = format!("{:?}", at(&template, "Outputs"));
        let id = text(id).unwrap_or_default();
        assert!(
            outputs.contains(&id),
            "{relative}: no output holds the policy ARN (Ref {id}), so Copilot would not attach it"
        );
    }
}

/// The actions a policy statement list allows, sorted.
pub(crate) fn allowed_actions(statements: &[Value]) -> Vec<String> {
    let mut actions: Vec<String> = statements
        .iter()
        .flat_map(|s| match s.get("Action") {
            Some(Value::Sequence(list)) => list.iter().filter_map(text).collect(),
            Some(one) => text(one).into_iter().collect(),
            None => Vec::new(),
        })
        .collect();
    actions.sort();
    actions
}

/// A CloudFormation short-form function such as `!Ref X`, as (tag, argument).
pub(crate) fn function(value: &Value) -> Option<(String, String)> {
    match value {
        Value::Tagged(tagged) => Some((tagged.tag.to_string(), text(&tagged.value)?)),
        _ => None,
    }
}

/// The queues a Worker Service's manifest makes Copilot create: `EventsQueue`, and
/// `<Service><Topic>EventsQueue` (letters and digits only, as Copilot's
/// `logicalIDSafe`) for each topic with `queue:` of its own.
fn worker_queues(manifest: &Value) -> Vec<String> {
    let safe = |s: String| {
        s.chars()
            .filter(char::is_ascii_alphanumeric)
            .collect::<String>()
    };
    let mut queues = vec!["EventsQueue".to_owned()];
    let topics = at(manifest, "subscribe.topics").and_then(Value::as_sequence);
    for topic in topics.into_iter().flatten() {
        let own_queue = match topic.get("queue") {
            Some(Value::Bool(enabled)) => *enabled,
            Some(Value::Mapping(_)) => true,
            _ => false,
        };
        if own_queue {
            let service = safe(text_at(topic, "service").unwrap_or_default());
            let name = safe(text_at(topic, "name").unwrap_or_default());
            queues.push(format!("{service}{name}EventsQueue"));
        }
    }
    queues
}

/// What is wrong with the visibility grant's resources for `manifest`: a queue of
/// the service without a grant, or a resource that is not one of its queues.
fn visibility_grant_gaps(manifest: &Value, statements: &[Value]) -> Vec<String> {
    let queues = worker_queues(manifest);
    let mut granted = Vec::new();
    let mut gaps = Vec::new();
    for statement in statements {
        let resources = match statement.get("Resource") {
            Some(Value::Sequence(list)) => list.clone(),
            Some(one) => vec![one.clone()],
            None => Vec::new(),
        };
        for resource in &resources {
            match function(resource) {
                Some((tag, arn))
                    if tag == "!GetAtt"
                        && arn
                            .strip_suffix(".Arn")
                            .is_some_and(|q| queues.iter().any(|x| x == q)) =>
                {
                    granted.push(arn);
                }
                other => gaps.push(format!("not one of the service's queues: {other:?}")),
            }
        }
    }
    for queue in queues {
        let arn = format!("{queue}.Arn");
        if !granted.contains(&arn) {
            gaps.push(format!("no grant on {arn}"));
        }
    }
    gaps
}

#[test]
fn the_worker_may_change_visibility_on_its_own_queues_only() {
    // Copilot's queue policy gives the task role sqs:ReceiveMessage and
    // sqs:DeleteMessage only (aws/copilot-cli#4216). The worker also extends and
    // hands back messages, which needs sqs:ChangeMessageVisibility on its queue. The
    // grant is a patch of the service stack: an addon handed the queue's ARN would
    // close a cycle (EventsQueue -> EventsKMSKey -> TaskRole -> addon outputs).
    let relative = "copilot/queue-consumer/overrides/cfn.patches.yml";
    let patches = yaml(relative);
    let ops = patches
        .as_sequence()
        .unwrap_or_else(|| panic!("{relative} is not a list of patches"));
    let grants: Vec<&Value> = ops
        .iter()
        .filter_map(|op| op.get("value"))
        .filter(|v| text_at(v, "Type").as_deref() == Some("AWS::IAM::Policy"))
        .collect();
    assert_eq!(grants.len(), 1, "{relative}: expected one IAM policy");
    let policy = grants[0];
    let roles = at(policy, "Properties.Roles")
        .and_then(Value::as_sequence)
        .unwrap_or_else(|| panic!("{relative}: the policy names no role"));
    assert_eq!(
        roles.iter().filter_map(function).collect::<Vec<_>>(),
        [("!Ref".to_owned(), "TaskRole".to_owned())],
        "{relative}: the policy must attach to Copilot's TaskRole only"
    );
    let statements = at(policy, "Properties.PolicyDocument.Statement")
        .and_then(Value::as_sequence)
        .unwrap_or_else(|| panic!("{relative}: the policy has no statements"));
    assert_eq!(
        allowed_actions(statements),
        ["sqs:ChangeMessageVisibility"],
        "{relative}: the policy must allow exactly sqs:ChangeMessageVisibility"
    );
    let manifest = yaml("copilot/queue-consumer/manifest.yml");
    assert_eq!(
        visibility_grant_gaps(&manifest, statements),
        Vec::<String>::new(),
        "{relative}: the grant must cover exactly the service's own queues"
    );
    // The rule itself: a topic with a queue of its own needs its grant too.
    let with_topic_queue: Value = serde_norway::from_str(
        "subscribe:\n  topics:\n    - name: order-events\n      service: merchant-api\n      queue: true\n    - name: audit\n      service: ledger\n",
    )
    .expect("valid YAML");
    assert_eq!(
        visibility_grant_gaps(&with_topic_queue, statements),
        ["no grant on merchantapiordereventsEventsQueue.Arn"]
    );
    // And no addon may take the queue as a parameter: that is the cycle.
    let addons = workspace_root().join("copilot/queue-consumer/addons");
    for entry in std::fs::read_dir(&addons).unwrap().flatten() {
        let body = std::fs::read_to_string(entry.path()).unwrap_or_default();
        assert!(
            !body.contains("EventsQueue"),
            "{}: an addon that refers to EventsQueue makes a circular dependency",
            entry.path().display()
        );
    }
}

#[test]
fn each_services_addons_merge_as_copilot_merges_them() {
    // Copilot merges every template under addons/ into one nested stack: a
    // parameter declared in two files must be declared identically, every
    // template must declare App, Env and Name, and addons.parameters.yml must set
    // exactly the other parameters that have no default.
    for service in ["queue-consumer", "websocket"] {
        let dir = workspace_root().join(format!("copilot/{service}/addons"));
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|name| name.ends_with(".yml") || name.ends_with(".yaml"))
            .collect();
        files.sort();
        let (param_files, templates): (Vec<String>, Vec<String>) = files
            .into_iter()
            .partition(|name| name.starts_with("addons.parameters."));
        let mut declared: BTreeMap<String, (String, Value)> = BTreeMap::new();
        for file in &templates {
            let relative = format!("copilot/{service}/addons/{file}");
            let template = yaml(&relative);
            let params = at(&template, "Parameters")
                .and_then(Value::as_mapping)
                .unwrap_or_else(|| panic!("{relative} has no Parameters"));
            for reserved in ADDON_PARAMETERS {
                assert!(
                    params.contains_key(reserved),
                    "{relative}: Copilot rejects an addon without the {reserved} parameter"
                );
            }
            for (name, definition) in params {
                let name = text(name).unwrap_or_default();
                if let Some((first, earlier)) = declared.get(&name) {
                    assert_eq!(
                        earlier, definition,
                        "{relative} declares parameter {name} differently from {first}; Copilot refuses to merge them"
                    );
                } else {
                    declared.insert(name, (relative.clone(), definition.clone()));
                }
            }
        }
        let needed: Vec<&String> = declared
            .iter()
            .filter(|(name, (_, d))| {
                !ADDON_PARAMETERS.contains(&name.as_str()) && d.get("Default").is_none()
            })
            .map(|(name, _)| name)
            .collect();
        let given: Vec<String> = match param_files.as_slice() {
            [] => Vec::new(),
            [one] => {
                let params = yaml(&format!("copilot/{service}/addons/{one}"));
                at(&params, "Parameters")
                    .and_then(Value::as_mapping)
                    .unwrap_or_else(|| panic!("{one} has no Parameters"))
                    .keys()
                    .filter_map(text)
                    .collect()
            }
            more => panic!("copilot/{service}/addons has several parameter files: {more:?}"),
        };
        for name in &given {
            assert!(
                !ADDON_PARAMETERS.contains(&name.as_str()),
                "copilot/{service}/addons: the parameters file may not set {name}"
            );
            assert!(
                declared.contains_key(name),
                "copilot/{service}/addons: the parameters file sets {name}, which no template declares"
            );
        }
        for name in needed {
            assert!(
                given.contains(name),
                "copilot/{service}/addons: parameter {name} has no default and addons.parameters.yml does not set it"
            );
        }
    }
}

/// The statements the drain watcher needs, exactly: the service's own description;
/// its cluster's task list (ListTasks acts on no task, so only ecs:cluster narrows
/// it); and its own tasks (DescribeTasks acts on the task, narrowed by the
/// copilot-service tag the service propagates); the service's deployments; the
/// cluster's container instances; and the drain table's item, read, claimed and
/// published.
const COPILOT_DRAIN_STATEMENTS: &str = r"
- Sid: OwnService
  Effect: Allow
  Action:
    - ecs:DescribeServices
  Resource: !Sub
    - 'arn:${AWS::Partition}:ecs:${AWS::Region}:${AWS::AccountId}:service/${Cluster}/${App}-${Env}-${Name}-Service-*'
    - Cluster:
        Fn::ImportValue: !Sub '${App}-${Env}-ClusterId'
- Sid: ListTasksInOwnCluster
  Effect: Allow
  Action:
    - ecs:ListTasks
  Resource: '*'
  Condition:
    ArnEquals:
      'ecs:cluster': !Sub
        - 'arn:${AWS::Partition}:ecs:${AWS::Region}:${AWS::AccountId}:cluster/${Cluster}'
        - Cluster:
            Fn::ImportValue: !Sub '${App}-${Env}-ClusterId'
- Sid: DescribeOwnTasks
  Effect: Allow
  Action:
    - ecs:DescribeTasks
  Resource: !Sub
    - 'arn:${AWS::Partition}:ecs:${AWS::Region}:${AWS::AccountId}:task/${Cluster}/*'
    - Cluster:
        Fn::ImportValue: !Sub '${App}-${Env}-ClusterId'
  Condition:
    StringEquals:
      'aws:ResourceTag/copilot-service': !Ref Name
- Sid: OwnServiceDeployments
  Effect: Allow
  Action:
    - ecs:DescribeServiceDeployments
  Resource: !Sub
    - 'arn:${AWS::Partition}:ecs:${AWS::Region}:${AWS::AccountId}:service-deployment/${Cluster}/${App}-${Env}-${Name}-Service-*/*'
    - Cluster:
        Fn::ImportValue: !Sub '${App}-${Env}-ClusterId'
- Sid: OwnClusterInstances
  Effect: Allow
  Action:
    - ecs:DescribeContainerInstances
  Resource: !Sub
    - 'arn:${AWS::Partition}:ecs:${AWS::Region}:${AWS::AccountId}:container-instance/${Cluster}/*'
    - Cluster:
        Fn::ImportValue: !Sub '${App}-${Env}-ClusterId'
- Sid: DrainTable
  Effect: Allow
  Action:
    - dynamodb:GetItem
    - dynamodb:UpdateItem
    - dynamodb:PutItem
  Resource: !GetAtt DrainTable.Arn
";

#[test]
fn the_drain_addons_grant_exactly_the_ecs_reads_the_watcher_needs() {
    // Copilot names the service stack <app>-<env>-<service> (internal/pkg/deploy/
    // cloudformation/stack/name.go) and gives its ECS service, logical id Service,
    // no name (templates/workloads/partials/cf/service-base-properties.yml), so
    // CloudFormation calls it <stack>-Service-<suffix>. The environment stack
    // exports the cluster's name as <app>-<env>-ClusterId
    // (templates/environment/cf.yml).
    let expected: Value = serde_norway::from_str(COPILOT_DRAIN_STATEMENTS).expect("valid YAML");
    for service in ["queue-consumer", "websocket"] {
        let relative = format!("copilot/{service}/addons/drain.yml");
        let template = yaml(&relative);
        let (id, policy) = the_managed_policy(&relative, &template);
        let statements = at(policy, "Properties.PolicyDocument.Statement")
            .unwrap_or_else(|| panic!("{relative}: the policy has no statements"));
        assert_eq!(
            statements, &expected,
            "{relative}: the drain policy must be exactly DescribeServices and DescribeServiceDeployments on this service, ListTasks and DescribeContainerInstances on this cluster, DescribeTasks on this service's tasks, and the drain table's item"
        );
        // The table, and its name as DRAIN_TABLE: Copilot passes an addon's other
        // outputs to the containers, named in SCREAMING_SNAKE_CASE
        // (template_functions.go, ToSnakeCaseFunc; envvars-common.yml).
        let mut problems = Vec::new();
        check_drain_table(
            &relative,
            at(&template, "Resources.DrainTable"),
            &mut problems,
        );
        assert!(problems.is_empty(), "{}", problems.join("\n"));
        assert_eq!(
            at(&template, "Outputs.DrainTable.Value").and_then(function),
            Some(("!Ref".to_owned(), "DrainTable".to_owned())),
            "{relative}: the output DrainTable (DRAIN_TABLE) must be Ref DrainTable"
        );
        let outputs = format!("{:?}", at(&template, "Outputs"));
        let id = text(id).unwrap_or_default();
        assert!(
            outputs.contains(&id),
            "{relative}: no output holds the policy ARN (Ref {id})"
        );
        // Across all of the service's addons and patches, ECS grants are exactly the
        // protection pair and these three reads.
        let mut ecs: Vec<String> = Vec::new();
        let dir = workspace_root().join(format!("copilot/{service}"));
        for sub in ["addons", "overrides"] {
            for entry in std::fs::read_dir(dir.join(sub))
                .into_iter()
                .flatten()
                .flatten()
            {
                let body = std::fs::read_to_string(entry.path()).unwrap_or_default();
                ecs.extend(
                    body.match_indices("ecs:")
                        .map(|(i, _)| {
                            let name: String = body[i + 4..]
                                .chars()
                                .take_while(char::is_ascii_alphanumeric)
                                .collect();
                            format!("ecs:{name}")
                        })
                        .filter(|a| a.len() > "ecs:".len() && a != "ecs:cluster"),
                );
            }
        }
        ecs.sort();
        ecs.dedup();
        assert_eq!(
            ecs,
            [
                "ecs:DescribeContainerInstances",
                "ecs:DescribeServiceDeployments",
                "ecs:DescribeServices",
                "ecs:DescribeTasks",
                "ecs:GetTaskProtection",
                "ecs:ListTasks",
                "ecs:UpdateTaskProtection"
            ],
            "copilot/{service}: ECS actions granted"
        );
    }
}

#[test]
fn the_worker_service_waits_for_its_queue_policy_and_keeps_its_queues() {
    let relative = "copilot/queue-consumer/overrides/cfn.patches.yml";
    let patches = crate::copilot_rules::patches(relative);
    let position = |op: &str, path: &str| patches.iter().position(|p| p.op == op && p.path == path);
    // The policy exists before the service's dependency on it is added.
    let policy = position("add", "/Resources/QueueVisibilityPolicy");
    let depends = patches.iter().position(|p| {
        p.op == "add"
            && p.path == "/Resources/Service/DependsOn/-"
            && p.value.as_ref().and_then(text).as_deref() == Some("QueueVisibilityPolicy")
    });
    match (policy, depends) {
        (Some(p), Some(d)) if p < d => {}
        other => panic!(
            "{relative}: the Service must depend on QueueVisibilityPolicy (add /Resources/Service/DependsOn/-), found {other:?}"
        ),
    }
    // The queues and the key that encrypts them stay when the service goes or a
    // queue is replaced; the log group, whose name is fixed, does not.
    for id in ["EventsQueue", "DeadLetterQueue", "EventsKMSKey"] {
        for attribute in ["DeletionPolicy", "UpdateReplacePolicy"] {
            let path = format!("/Resources/{id}/{attribute}");
            let value = patches
                .iter()
                .find(|p| p.op == "add" && p.path == path)
                .and_then(|p| p.value.as_ref())
                .and_then(text);
            assert_eq!(value.as_deref(), Some("Retain"), "{relative}: {path}");
        }
    }
    assert!(
        !patches
            .iter()
            .any(|p| p.path.starts_with("/Resources/LogGroup/")),
        "{relative}: Copilot's log group has a fixed name; a kept one breaks the next deployment"
    );
    // A kept queue still drops its messages after the retention period (SQS's
    // default: 4 days). The main queue keeps them as long as SQS can, 14 days, as
    // Copilot's dead-letter queue already does (subscribe.yml): subscribe.queue.retention.
    let manifest = yaml("copilot/queue-consumer/manifest.yml");
    let retention = text_at(&manifest, "subscribe.queue.retention");
    assert_eq!(
        retention.as_deref().and_then(go_duration),
        Some(MAX_RETENTION),
        "copilot/queue-consumer/manifest.yml: subscribe.queue.retention is {retention:?}; set 336h (14 days)"
    );
}
