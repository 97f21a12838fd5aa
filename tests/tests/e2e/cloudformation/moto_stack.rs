//! The template created in moto's CloudFormation, every resource read back through
//! its own API.

use super::moto_api::*;
use super::*;

#[tokio::test]
async fn the_stack_creates_in_motos_cloudformation() {
    let moto = Moto::start().await;
    let api = Api::new(&moto);
    let template = yaml(TEMPLATE);
    let declared = resources(&template);

    // An existing VPC with two subnets in two Availability Zones.
    let ec2 = |action: &'static str, params: Vec<(String, String)>| {
        let api = &api;
        async move { api.query("ec2", "2016-11-15", action, &params).await }
    };
    let vpc = xml_one(
        &ec2(
            "CreateVpc",
            vec![("CidrBlock".into(), "10.0.0.0/16".into())],
        )
        .await,
        "vpcId",
    );
    let mut subnets = Vec::new();
    for (cidr, zone) in [("10.0.1.0/24", "us-east-1a"), ("10.0.2.0/24", "us-east-1b")] {
        let answer = ec2(
            "CreateSubnet",
            vec![
                ("VpcId".into(), vpc.clone()),
                ("CidrBlock".into(), cidr.into()),
                ("AvailabilityZone".into(), zone.into()),
            ],
        )
        .await;
        subnets.push(xml_one(&answer, "subnetId"));
    }

    let stack_name = "task-protection";
    let base = vec![
        ("VpcId", vpc.clone()),
        ("LoadBalancerSubnetIds", subnets.join(",")),
        ("TaskSubnetIds", subnets.join(",")),
        (
            "QueueConsumerImage",
            "123456789012.dkr.ecr.us-east-1.amazonaws.com/queue-consumer:1".to_owned(),
        ),
        (
            "WebsocketImage",
            "123456789012.dkr.ecr.us-east-1.amazonaws.com/websocket:1".to_owned(),
        ),
    ];
    let cfn = "2010-05-15";
    let stack = [("StackName".to_owned(), stack_name.to_owned())];
    let (_, outputs) = create_stack(&api, stack_name, &base).await;
    // Every resource moto can model was created, but for those that need a
    // certificate; the rest are the known gaps.
    let physical = stack_resources(&api, stack_name).await;
    for (id, resource) in &declared {
        let kind = text_at(resource, "Type").unwrap_or_default();
        let needs_certificate = text_at(resource, "Condition").as_deref() == Some("HasCertificate");
        match physical.get(id) {
            Some((listed_kind, _)) => {
                assert!(!needs_certificate, "{id} was created without a certificate");
                assert_eq!(listed_kind, &kind, "{id}");
            }
            None => assert!(
                needs_certificate || UNMODELLED_BY_MOTO.contains(&kind.as_str()),
                "{id} ({kind}) was not created in moto"
            ),
        }
    }
    let id_of = |logical: &str| -> String {
        physical
            .get(logical)
            .map(|(_, p)| p.clone())
            .unwrap_or_else(|| panic!("{logical} was not created"))
    };

    // The queue: visibility equal to the worker's default, redrive to the DLQ.
    let sqs = moto.client();
    let queue_url = id_of("Queue");
    assert_eq!(
        outputs.get("QueueUrl"),
        Some(&queue_url),
        "the QueueUrl output"
    );
    let attributes = |url: String| {
        let sqs = sqs.clone();
        async move {
            sqs.get_queue_attributes()
                .queue_url(url)
                .attribute_names(aws_sdk_sqs::types::QueueAttributeName::All)
                .send()
                .await
                .unwrap_or_else(|e| panic!("get_queue_attributes: {e:?}"))
                .attributes
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k.as_str().to_owned(), v))
                .collect::<BTreeMap<String, String>>()
        }
    };
    let queue = attributes(queue_url.clone()).await;
    let dlq = attributes(id_of("DeadLetterQueue")).await;
    let worker = settings("queue-consumer").await;
    assert_eq!(
        queue.get("VisibilityTimeout").and_then(|v| v.parse().ok()),
        default_number(&worker, "VISIBILITY_TIMEOUT_SECONDS"),
        "the queue's visibility timeout is the worker's"
    );
    let redrive: serde_json::Value =
        serde_json::from_str(queue.get("RedrivePolicy").map_or("{}", String::as_str))
            .unwrap_or_else(|e| panic!("RedrivePolicy is not JSON: {e}"));
    assert_eq!(
        redrive["deadLetterTargetArn"].as_str(),
        dlq.get("QueueArn").map(String::as_str)
    );
    assert_eq!(redrive["maxReceiveCount"].as_u64(), Some(5));
    for q in [&queue, &dlq] {
        assert_eq!(
            q.get("MessageRetentionPeriod").map(String::as_str),
            Some("1209600")
        );
    }
    assert_eq!(
        queue.get("SqsManagedSseEnabled").map(String::as_str),
        Some("true")
    );

    // The task definitions: every variable, stop timeouts, port, logs.
    let web = settings("websocket").await;
    let mut worker_env = BTreeMap::new();
    for (logical, binary, read, log_group) in [
        (
            "QueueConsumerTaskDefinition",
            "queue-consumer",
            &worker,
            "QueueConsumerLogGroup",
        ),
        (
            "WebsocketTaskDefinition",
            "websocket",
            &web,
            "WebsocketLogGroup",
        ),
    ] {
        let answer = api
            .json(
                "ecs",
                "AmazonEC2ContainerServiceV20141113.DescribeTaskDefinition",
                json!({"taskDefinition": id_of(logical)}),
            )
            .await;
        let c = &answer["taskDefinition"]["containerDefinitions"][0];
        let mut env = ecs_environment(c);
        let mut problems = Vec::new();
        if binary == "queue-consumer" {
            worker_env = env.clone();
            assert_eq!(
                env.remove(QUEUE_URL_VARIABLE),
                Some(queue_url.clone()),
                "{QUEUE_URL_VARIABLE}"
            );
        }
        without_unread_health_port(binary, &mut env, read).await;
        check_variables(binary, &env, read, &mut problems);
        assert!(
            problems.is_empty(),
            "{logical} in moto:\n  - {}",
            problems.join("\n  - ")
        );
        // Each stack's metrics carry its own name as the Environment dimension.
        assert_eq!(
            env.get("METRICS_ENVIRONMENT").map(String::as_str),
            Some(stack_name),
            "{logical}: METRICS_ENVIRONMENT"
        );
        assert_eq!(
            c["healthCheck"]["command"],
            json!(["CMD", format!("/usr/local/bin/{binary}"), "healthcheck"]),
            "{logical}: the container health check"
        );
        let grace = default_number(read, "SHUTDOWN_GRACE_SECONDS").unwrap_or(u64::MAX);
        assert!(
            c["stopTimeout"].as_u64().is_some_and(|s| s > grace),
            "{logical}: stopTimeout {}",
            c["stopTimeout"]
        );
        assert_eq!(c["logConfiguration"]["logDriver"], "awslogs");
        assert_eq!(
            c["logConfiguration"]["options"]["awslogs-group"].as_str(),
            Some(id_of(log_group).as_str())
        );
        if binary == "websocket" {
            assert_eq!(
                c["portMappings"][0]["containerPort"].as_u64(),
                default_number(read, "PORT"),
                "the websocket container port"
            );
            // The pages of the load balancer's own address may connect, no others.
            let host = outputs
                .get("ServiceUrl")
                .and_then(|url| url.strip_prefix("http://"))
                .unwrap_or_else(|| panic!("no http ServiceUrl in {outputs:?}"));
            assert_eq!(env.get("ALLOWED_ORIGINS"), Some(&format!("{host},")));
            crate::websocket::strangers::assert_deployment_refuses_strangers(
                &env,
                &[format!("http://{}", host.to_ascii_lowercase())],
            )
            .await;
        }
    }

    // The real worker, with the task definition's environment as ECS would give it,
    // works a job from the stack's queue under protection and deletes it.
    let agent = FakeAgent::start().await;
    let mut env: Vec<(&str, String)> = worker_env
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    env.extend(aws_env(&moto.endpoint()));
    env.push(("ECS_AGENT_URI", agent.uri()));
    env.push(("RUST_LOG", "info".to_owned()));
    let running = Service::spawn("queue-consumer", &[], &env);
    running
        .wait_for_line("Long polling for messages", Duration::from_secs(30))
        .await;
    let sent = sqs
        .send_message()
        .queue_url(&queue_url)
        .message_body("50")
        .send()
        .await
        .unwrap_or_else(|e| panic!("send_message: {e:?}"))
        .message_id
        .unwrap_or_default();
    running
        .wait_for_line(&format!("{sent} - Done"), Duration::from_secs(30))
        .await;
    running
        .wait_for_line("Task protection released", Duration::from_secs(30))
        .await;
    assert!(
        agent.puts().first().is_some_and(|put| put.enabled()),
        "the worker did not protect its task through the agent: {:?}",
        agent.puts()
    );
    let left = attributes(queue_url.clone()).await;
    for count in [
        "ApproximateNumberOfMessages",
        "ApproximateNumberOfMessagesNotVisible",
    ] {
        assert_eq!(
            left.get(count).map(String::as_str),
            Some("0"),
            "{count} after the job"
        );
    }
    drop(running);

    // The services run their task definitions in the stack's cluster.
    let cluster = id_of("Cluster");
    let answer = api
        .json(
            "ecs",
            "AmazonEC2ContainerServiceV20141113.DescribeServices",
            json!({"cluster": cluster, "services": [id_of("QueueConsumerService"), id_of("WebsocketService")]}),
        )
        .await;
    let services = answer["services"].as_array().cloned().unwrap_or_default();
    assert_eq!(services.len(), 2, "both services exist: {answer}");
    for (service, td) in services
        .iter()
        .zip(["QueueConsumerTaskDefinition", "WebsocketTaskDefinition"])
    {
        assert_eq!(service["taskDefinition"].as_str(), Some(id_of(td).as_str()));
        assert_eq!(service["desiredCount"].as_u64(), Some(1));
    }

    // The load balancer, its listener and the target group's health check.
    let elb = "2015-12-01";
    let lb_arn = id_of("LoadBalancer");
    let lbs = api
        .query(
            "elasticloadbalancing",
            elb,
            "DescribeLoadBalancers",
            &[("LoadBalancerArns.member.1".into(), lb_arn.clone())],
        )
        .await;
    assert_eq!(xml_one(&lbs, "Scheme"), "internet-facing");
    assert!(
        outputs
            .get("ServiceUrl")
            .is_some_and(|u| u == &format!("http://{}", xml_one(&lbs, "DNSName"))),
        "the ServiceUrl output is the ALB's address: {outputs:?}"
    );
    let listeners = api
        .query(
            "elasticloadbalancing",
            elb,
            "DescribeListeners",
            &[("LoadBalancerArn".into(), lb_arn)],
        )
        .await;
    // Without a certificate: HTTP on port 80 only, as before.
    assert_eq!(xml_members(&listeners, "Listeners").len(), 1, "{listeners}");
    assert_eq!(xml_one(&listeners, "Port"), "80");
    assert_eq!(
        xml_one(&listeners, "TargetGroupArn"),
        id_of("WebsocketTargetGroup")
    );
    let groups = api
        .query(
            "elasticloadbalancing",
            elb,
            "DescribeTargetGroups",
            &[(
                "TargetGroupArns.member.1".into(),
                id_of("WebsocketTargetGroup"),
            )],
        )
        .await;
    assert_eq!(xml_one(&groups, "HealthCheckPath"), "/healthz");
    assert_eq!(xml_one(&groups, "HttpCode"), "200");
    assert_eq!(
        xml_one(&groups, "HealthCheckIntervalSeconds"),
        TARGET_HEALTH_INTERVAL_SECONDS.to_string()
    );
    assert_eq!(
        xml_one(&groups, "UnhealthyThresholdCount"),
        TARGET_UNHEALTHY_THRESHOLD.to_string()
    );
    assert_eq!(xml_one(&groups, "TargetType"), "ip");
    assert_eq!(
        Some(xml_one(&groups, "Port").parse().unwrap_or(0)),
        default_number(&web, "PORT")
    );

    // The task roles: protection on this cluster's tasks, queue actions on the queue.
    let iam = "2010-05-08";
    let policy = |role: String, name: &'static str| {
        let api = &api;
        async move {
            let answer = api
                .query(
                    "iam",
                    iam,
                    "GetRolePolicy",
                    &[
                        ("RoleName".into(), role),
                        ("PolicyName".into(), name.into()),
                    ],
                )
                .await;
            xml_one(&answer, "PolicyDocument")
        }
    };
    let queue_arn = queue.get("QueueArn").cloned().unwrap_or_default();
    for role in ["QueueConsumerTaskRole", "WebsocketTaskRole"] {
        let document = policy(id_of(role), "task-protection").await;
        assert!(
            document.contains(&format!(":task/{cluster}/*"))
                && document.contains("ecs:UpdateTaskProtection"),
            "{role}: {document}"
        );
    }
    let document = policy(id_of("QueueConsumerTaskRole"), "work-the-queue").await;
    assert!(
        document.contains("sqs:ChangeMessageVisibility") && document.contains(&queue_arn),
        "the worker's queue policy: {document}"
    );
    // The drain's table takes the decisions of both services, one item each, as
    // the watcher writes them: a claim, a publication, a read.
    let table = worker_env
        .get("DRAIN_TABLE")
        .cloned()
        .unwrap_or_else(|| panic!("the worker has no DRAIN_TABLE: {worker_env:?}"));
    let table_arn = api
        .json(
            "dynamodb",
            "DynamoDB_20120810.DescribeTable",
            json!({"TableName": table}),
        )
        .await["Table"]["TableArn"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    for service in ["QueueConsumerService", "WebsocketService"] {
        use task_protection::drain::{DynamoStore, Record, VerdictStore};
        let store = DynamoStore::for_endpoint(&moto.endpoint(), &table, &cluster, &id_of(service));
        assert_eq!(
            store.claim(0, "task-a", 1_000, 61_000).await,
            Ok(true),
            "{service}"
        );
        let record = Record::first(std::time::SystemTime::now());
        assert_eq!(
            store.publish(0, "task-a", &record).await,
            Ok(true),
            "{service}"
        );
        let stored = store.read().await.expect("a read").expect("an item");
        assert_eq!(stored.record.as_deref(), Ok(&record), "{service}");
    }

    // The drain policy names each role's own service, as the stack named it, and no
    // other, and conditions the task reads on this cluster.
    let cluster_arn = answer["services"][0]["clusterArn"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let service_arns: Vec<String> = services
        .iter()
        .map(|s| s["serviceArn"].as_str().unwrap_or_default().to_owned())
        .collect();
    for (i, role) in ["QueueConsumerTaskRole", "WebsocketTaskRole"]
        .iter()
        .enumerate()
    {
        // moto hands back an inline policy that CloudFormation created as Python's
        // repr of it: single quotes, which no value here contains.
        let raw = policy(id_of(role), "drain").await.replace('\'', "\"");
        let document: serde_json::Value =
            serde_json::from_str(&raw).unwrap_or_else(|e| panic!("{role}: not JSON ({e}): {raw}"));
        let statements = document["Statement"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(statements.len(), 6, "{role}: {document}");
        let pattern = statements[0]["Resource"].as_str().unwrap_or_default();
        assert_eq!(statements[0]["Action"], "ecs:DescribeServices", "{role}");
        assert!(
            arn_matches(pattern, &service_arns[i]) && !arn_matches(pattern, &service_arns[1 - i]),
            "{role}: {pattern} must match {} and not {}",
            service_arns[i],
            service_arns[1 - i]
        );
        assert_eq!(
            statements[1]["Condition"]["ArnEquals"]["ecs:cluster"].as_str(),
            Some(cluster_arn.as_str()),
            "{role}: {document}"
        );
        let tag = ["queue-consumer", "websocket"][i];
        assert_eq!(
            statements[2]["Condition"]["StringEquals"]["aws:ResourceTag/ecs-service"].as_str(),
            Some(tag),
            "{role}: {document}"
        );
        // Its deployments, and no other service's.
        let pattern = statements[3]["Resource"].as_str().unwrap_or_default();
        let deployment = |arn: &str| {
            format!(
                "{}/ecs-svc-1234567890",
                arn.replacen(":service/", ":service-deployment/", 1)
            )
        };
        assert!(
            arn_matches(pattern, &deployment(&service_arns[i]))
                && !arn_matches(pattern, &deployment(&service_arns[1 - i])),
            "{role}: {pattern}"
        );
        assert_eq!(
            statements[5]["Resource"].as_str(),
            Some(table_arn.as_str()),
            "{role}: the drain table"
        );
    }

    // The log groups keep 30 days.
    let groups = api
        .json("logs", "Logs_20140328.DescribeLogGroups", json!({}))
        .await;
    for logical in ["QueueConsumerLogGroup", "WebsocketLogGroup"] {
        let name = id_of(logical);
        let group = groups["logGroups"]
            .as_array()
            .and_then(|g| g.iter().find(|g| g["logGroupName"] == name.as_str()))
            .unwrap_or_else(|| panic!("no log group {name}: {groups}"));
        assert_eq!(group["retentionInDays"].as_u64(), Some(30), "{logical}");
    }

    // With a certificate: HTTPS on 443 with a TLS 1.3 policy, and port 80 sends
    // every request there. A second stack in the same VPC, with a certificate ACM
    // holds.
    let certificate = api
        .json(
            "acm",
            "CertificateManager.RequestCertificate",
            json!({"DomainName": "ws.example.com", "ValidationMethod": "DNS"}),
        )
        .await["CertificateArn"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let https_name = "task-protection-https";
    let mut with_certificate = base.clone();
    with_certificate.push(("CertificateArn", certificate.clone()));
    let (_, https_outputs) = create_stack(&api, https_name, &with_certificate).await;
    let https = stack_resources(&api, https_name).await;
    let https_id = |logical: &str| -> String {
        https
            .get(logical)
            .map(|(_, p)| p.clone())
            .unwrap_or_else(|| panic!("{logical} was not created with a certificate"))
    };
    let lbs = api
        .query(
            "elasticloadbalancing",
            elb,
            "DescribeLoadBalancers",
            &[("LoadBalancerArns.member.1".into(), https_id("LoadBalancer"))],
        )
        .await;
    assert_eq!(
        https_outputs.get("ServiceUrl"),
        Some(&format!("https://{}", xml_one(&lbs, "DNSName")))
    );
    let listeners = api
        .query(
            "elasticloadbalancing",
            elb,
            "DescribeListeners",
            &[("LoadBalancerArn".into(), https_id("LoadBalancer"))],
        )
        .await;
    let by_port: BTreeMap<String, BTreeMap<String, String>> = xml_members(&listeners, "Listeners")
        .into_iter()
        .filter_map(|l| Some((l.get("Port")?.clone(), l)))
        .collect();
    assert_eq!(
        by_port.keys().collect::<Vec<_>>(),
        ["443", "80"],
        "{listeners}"
    );
    assert_eq!(
        by_port["443"].get("Protocol").map(String::as_str),
        Some("HTTPS")
    );
    assert!(
        by_port["443"]
            .get("SslPolicy")
            .is_some_and(|p| TLS13_POLICIES.contains(&p.as_str())),
        "{listeners}"
    );
    assert!(listeners.contains(&certificate), "{listeners}");
    let rules = api
        .query(
            "elasticloadbalancing",
            elb,
            "DescribeRules",
            &[("ListenerArn".into(), https_id("HttpListener"))],
        )
        .await;
    assert!(
        rules.contains("<Type>redirect</Type>")
            && rules.contains("<Protocol>HTTPS</Protocol>")
            && rules.contains("<Port>443</Port>")
            && rules.contains("HTTP_301"),
        "port 80 does not redirect to HTTPS: {rules}"
    );

    // Deleting the first stack keeps its queues, their messages and its log groups.
    sqs.send_message()
        .queue_url(&queue_url)
        .message_body("kept")
        .send()
        .await
        .unwrap_or_else(|e| panic!("send_message: {e:?}"));
    api.query("cloudformation", cfn, "DeleteStack", &stack)
        .await;
    wait_for(
        "the stack to be deleted",
        Duration::from_secs(60),
        || async {
            let answer = api.query("cloudformation", cfn, "ListStacks", &[]).await;
            xml_members(&answer, "StackSummaries")
                .iter()
                .any(|m| {
                    m.get("StackName").map(String::as_str) == Some(stack_name)
                        && m.get("StackStatus").map(String::as_str) == Some("DELETE_COMPLETE")
                })
                .then_some(())
        },
    )
    .await;
    // The message may be in flight: the worker killed above left a long poll open,
    // and moto, as SQS, hands a message to a receive that is still waiting.
    let kept = attributes(queue_url.clone()).await;
    let count = |key: &str| {
        kept.get(key)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert_eq!(
        count("ApproximateNumberOfMessages") + count("ApproximateNumberOfMessagesNotVisible"),
        1,
        "the queue and its message outlive the stack: {kept:?}"
    );
    attributes(id_of("DeadLetterQueue")).await;
    let groups = api
        .json("logs", "Logs_20140328.DescribeLogGroups", json!({}))
        .await;
    for logical in ["QueueConsumerLogGroup", "WebsocketLogGroup"] {
        let name = id_of(logical);
        assert!(
            groups["logGroups"]
                .as_array()
                .is_some_and(|g| g.iter().any(|g| g["logGroupName"] == name.as_str())),
            "{logical} was deleted with the stack"
        );
    }
}
