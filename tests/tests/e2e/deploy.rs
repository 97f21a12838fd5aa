//! The deployment files against the code they deploy.
//!
//! `copilot deploy` must work the first time, and nothing there checks that a
//! manifest's variable is one the binary reads, that the ALB health check hits a
//! route the server answers, or that ECS waits long enough after SIGTERM. So each
//! manifest under `copilot/` is parsed here and compared with the real binaries:
//! their `--help` (every setting is a clap argument with `env =`, and `--help` shows
//! its variable and default) and, for the web service, the running server.
//!
//! Each test collects every mismatch and fails once with all of them listed.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use e2e::process::{Service, run_to_exit};
use e2e::{free_port, wait_for, workspace_root};
use serde_norway::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The variable whose manifest value deliberately differs from the binary's default:
/// `auto` would fall back to a simulation in a task without the agent endpoint.
pub(super) const BACKEND: &str = "TASK_PROTECTION_BACKEND";
/// Where taskdef_overrides sets the main container's stop timeout.
const STOP_TIMEOUT_PATH: &str = "ContainerDefinitions[0].StopTimeout";
/// Fargate's largest stop timeout, in seconds.
pub(super) const MAX_STOP_TIMEOUT_SECONDS: u64 = 120;
/// The ALB's idle timeout; the manifests keep the default.
const ALB_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The `platform` values Copilot accepts that Fargate runs. Without the field Copilot
/// passes no `--platform` to `docker build`, so an image built on an ARM machine
/// would not start on Fargate's default X86_64.
const FARGATE_PLATFORMS: [&str; 3] = ["linux/x86_64", "linux/amd64", "linux/arm64"];
/// The parameters Copilot passes to every workload addon; its loader rejects an
/// addon that lacks one, and an addons.parameters.yml may not set them.
const ADDON_PARAMETERS: [&str; 3] = ["App", "Env", "Name"];

// --- reading the files -----------------------------------------------------------

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

pub(super) fn yaml(relative: &str) -> Value {
    let path = workspace_root().join(relative);
    serde_norway::from_str(&read(&path))
        .unwrap_or_else(|e| panic!("{relative} is not valid YAML: {e}"))
}

/// Whether a file exists under the workspace root.
pub(super) fn exists(relative: &str) -> bool {
    workspace_root().join(relative).is_file()
}

/// The value at a dotted path of mapping keys, such as `subscribe.queue.timeout`.
pub(super) fn at<'a>(doc: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(doc, |node, key| node.get(key))
}

/// A scalar as text: Copilot reads `30` and `"30"` alike.
pub(super) fn text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

pub(super) fn text_at(doc: &Value, path: &str) -> Option<String> {
    at(doc, path).and_then(text)
}

/// A Copilot (Go) duration such as `30s`, `5m`, `1h30m` or `250ms`.
fn go_duration(raw: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = raw.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let number: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else {
            return None;
        };
        total += unit * u32::try_from(number).ok()?;
        rest = &rest[len..];
    }
    Some(total)
}

/// The `StopTimeout` that `taskdef_overrides` gives the main container, in seconds.
fn stop_timeout(manifest: &Value) -> Option<u64> {
    at(manifest, "taskdef_overrides")?
        .as_sequence()?
        .iter()
        .find(|rule| rule.get("path").and_then(Value::as_str) == Some(STOP_TIMEOUT_PATH))?
        .get("value")?
        .as_u64()
}

/// Every variable the manifest sets, as text.
fn variables(manifest: &Value, problems: &mut Vec<String>) -> BTreeMap<String, String> {
    let Some(map) = at(manifest, "variables").and_then(Value::as_mapping) else {
        problems.push("the manifest has no `variables` map".into());
        return BTreeMap::new();
    };
    map.iter()
        .filter_map(|(k, v)| {
            let name = k.as_str()?.to_owned();
            match text(v) {
                Some(value) => Some((name, value)),
                None => {
                    problems.push(format!("variable {name} is not a plain value: {v:?}"));
                    None
                }
            }
        })
        .collect()
}

// --- reading the binaries ----------------------------------------------------------

/// What `--help` says about one setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Setting {
    /// The value used when the variable is unset, if any.
    pub(super) default: Option<String>,
}

/// The settings a binary reads, by environment variable, from its `--help`.
///
/// clap prints each argument as a block that starts with its flag and carries
/// `[env: NAME=]` and `[default: VALUE]`, possibly wrapped over several lines.
pub(super) async fn settings(binary: &str) -> BTreeMap<String, Setting> {
    let (status, stdout, stderr) = run_to_exit(binary, &["--help"], &[]).await;
    assert!(
        status.success(),
        "`{binary} --help` failed with {status}: {stderr}"
    );
    let mut blocks: Vec<String> = Vec::new();
    for line in stdout.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('-') || blocks.is_empty() {
            blocks.push(String::new());
        }
        if let Some(block) = blocks.last_mut() {
            block.push(' ');
            block.push_str(trimmed);
        }
    }
    let bracket = |block: &str, key: &str| -> Option<String> {
        let start = block.find(key)? + key.len();
        let end = block[start..].find(']')? + start;
        Some(block[start..end].trim().to_owned())
    };
    let found: BTreeMap<String, Setting> = blocks
        .iter()
        .filter_map(|block| {
            let env = bracket(block, "[env: ")?;
            let name = env.split('=').next()?.trim().to_owned();
            // Only clap's own annotation, after [env: ]: a description may say
            // "[default: ...]" in words for a setting that has no fixed default.
            let after_env = &block[block.find("[env: ")?..];
            let default = bracket(after_env, "[default: ");
            Some((name, Setting { default }))
        })
        .collect();
    assert!(
        !found.is_empty(),
        "`{binary} --help` lists no [env: NAME=] at all; its output was:\n{stdout}"
    );
    found
}

/// Compares the manifest's variables with the settings the binary reads.
pub(super) fn check_variables(
    binary: &str,
    vars: &BTreeMap<String, String>,
    read: &BTreeMap<String, Setting>,
    problems: &mut Vec<String>,
) {
    for (name, value) in vars {
        let Some(setting) = read.get(name) else {
            problems.push(format!(
                "variables.{name} is not a setting `{binary}` reads (no [env: {name}=] in its --help)"
            ));
            continue;
        };
        if name == BACKEND {
            if value != "agent" {
                problems.push(format!(
                    "variables.{BACKEND} is {value:?}, expected \"agent\""
                ));
            }
            continue;
        }
        match &setting.default {
            Some(default) if default != value => problems.push(format!(
                "variables.{name} is {value:?} but `{binary}` defaults to {default:?}: the manifest writes out the defaults, so the two must agree"
            )),
            _ => {}
        }
    }
    if !vars.contains_key(BACKEND) {
        problems.push(format!("variables has no {BACKEND}: agent"));
    }
    for (name, setting) in read {
        if setting.default.is_some() && !vars.contains_key(name) {
            problems.push(format!(
                "`{binary}` reads {name} (default {:?}) but the manifest does not write it out",
                setting.default.as_deref().unwrap_or_default()
            ));
        }
    }
}

/// A default from `--help` as whole seconds or milliseconds.
pub(super) fn default_number(read: &BTreeMap<String, Setting>, name: &str) -> Option<u64> {
    read.get(name)?.default.as_deref()?.parse().ok()
}

// --- checks common to both services ---------------------------------------------------

fn check_image(manifest: &Value, binary: &str, problems: &mut Vec<String>) -> Option<String> {
    let root = workspace_root();
    let Some(dockerfile) = text_at(manifest, "image.build.dockerfile") else {
        problems.push("image.build.dockerfile is missing".into());
        return None;
    };
    match text_at(manifest, "image.build.context").as_deref() {
        Some(".") => {}
        other => problems.push(format!(
            "image.build.context is {other:?}; the Dockerfiles build from the repository root, \".\""
        )),
    }
    let path = root.join(&dockerfile);
    if !path.is_file() {
        problems.push(format!(
            "image.build.dockerfile {dockerfile} does not exist"
        ));
        return None;
    }
    let content = read(&path);
    let build = format!("cargo build --release --locked -p {binary}");
    if !content.contains(&build) {
        problems.push(format!("{dockerfile} does not run `{build}`"));
    }
    check_base_images(&dockerfile, &content, problems);
    check_dependency_layer(&dockerfile, &content, binary, problems);
    Some(content)
}

/// Every `FROM` names a registry host that CI and CodeBuild pull from without
/// Docker Hub's anonymous rate limit (a bare `rust:...` is Docker Hub).
fn check_base_images(dockerfile: &str, content: &str, problems: &mut Vec<String>) {
    let stages: Vec<&str> = content
        .lines()
        .filter_map(|l| l.trim().strip_prefix("FROM "))
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    let names: Vec<&str> = content
        .lines()
        .filter_map(|l| l.trim().strip_prefix("FROM "))
        .filter_map(|rest| rest.split_whitespace().nth(2))
        .collect();
    for image in stages {
        if names.contains(&image) {
            continue; // an earlier stage of this file
        }
        let host = image.split('/').next().unwrap_or_default();
        let named_host = image.contains('/') && (host.contains('.') || host.contains(':'));
        if !named_host || host == "docker.io" || host.ends_with(".docker.io") {
            problems.push(format!(
                "{dockerfile}: FROM {image} pulls from Docker Hub, which rate-limits anonymous pulls; use public.ecr.aws/docker/library/..."
            ));
        }
    }
}

/// The dependencies compile in a layer of their own, from the lock file and the
/// manifests only, before the project's sources are copied in: a change to the
/// project's code then rebuilds only the project's crates.
fn check_dependency_layer(
    dockerfile: &str,
    content: &str,
    binary: &str,
    problems: &mut Vec<String>,
) {
    let cook = format!("cargo chef cook --release --locked -p {binary}");
    let position = |needle: &str| content.find(needle);
    match (position(&cook), position("COPY . .")) {
        (Some(c), _) if content[c..].contains("COPY . .") => {}
        _ => problems.push(format!(
            "{dockerfile}: no `{cook}` before the sources are copied (`COPY . .`); every build would compile all dependencies"
        )),
    }
}

fn check_platform(manifest: &Value, problems: &mut Vec<String>) {
    match text_at(manifest, "platform") {
        Some(p) if FARGATE_PLATFORMS.contains(&p.as_str()) => {}
        other => problems.push(format!(
            "platform is {other:?}; set it to one of {FARGATE_PLATFORMS:?}, or Copilot builds for the machine it runs on"
        )),
    }
}

fn check_stop_timeout(
    manifest: &Value,
    read: &BTreeMap<String, Setting>,
    problems: &mut Vec<String>,
) {
    let Some(grace) = default_number(read, "SHUTDOWN_GRACE_SECONDS") else {
        problems.push("the binary has no SHUTDOWN_GRACE_SECONDS default".into());
        return;
    };
    let Some(stop) = stop_timeout(manifest) else {
        problems.push(format!(
            "taskdef_overrides does not set {STOP_TIMEOUT_PATH}; ECS would SIGKILL 30 s after SIGTERM"
        ));
        return;
    };
    if stop <= grace {
        problems.push(format!(
            "StopTimeout {stop} s is not greater than SHUTDOWN_GRACE_SECONDS {grace} s"
        ));
    }
    // After the grace, the release of protection is one more request.
    let request = default_number(read, "PROTECTION_REQUEST_TIMEOUT_MS").unwrap_or(0);
    let needed = grace + request.div_ceil(1000);
    if stop <= needed {
        problems.push(format!(
            "StopTimeout {stop} s leaves no room after the grace ({grace} s) and the protection release request ({request} ms)"
        ));
    }
    if stop > MAX_STOP_TIMEOUT_SECONDS {
        problems.push(format!(
            "StopTimeout {stop} s is above Fargate's maximum of {MAX_STOP_TIMEOUT_SECONDS} s"
        ));
    }
}

fn report(service: &str, problems: &[String]) {
    assert!(
        problems.is_empty(),
        "copilot/{service}/manifest.yml does not match the code:\n  - {}",
        problems.join("\n  - ")
    );
}

// --- HTTP ---------------------------------------------------------------------------

/// The status code of `GET path` on 127.0.0.1:`port`, or `None` when nothing answers.
/// The real websocket server on a free loopback port, once it answers HTTP.
pub(super) async fn local_websocket() -> (Service, u16) {
    let listen = free_port();
    let server = Service::spawn(
        "websocket",
        &[],
        &[
            ("PORT", listen.to_string()),
            ("BIND_ADDRESS", "127.0.0.1".to_owned()),
            (BACKEND, "local".to_owned()),
        ],
    );
    wait_for(
        "the websocket server to answer HTTP",
        Duration::from_secs(30),
        || get_status(listen, "/healthz"),
    )
    .await;
    (server, listen)
}

pub(super) async fn get_status(port: u16, path: &str) -> Option<u16> {
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.ok()?;
        let answer = String::from_utf8_lossy(&answer);
        answer
            .lines()
            .next()?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()
        .flatten()
}

// --- the tests ----------------------------------------------------------------------

#[test]
fn the_workspace_and_environment_name_the_application() {
    let summary = yaml("copilot/.workspace");
    assert_eq!(
        text_at(&summary, "application").as_deref(),
        Some("task-protection"),
        "copilot/.workspace must name the application task-protection"
    );
    let env = yaml("copilot/environments/test/manifest.yml");
    assert_eq!(text_at(&env, "name").as_deref(), Some("test"));
    assert_eq!(text_at(&env, "type").as_deref(), Some("Environment"));
}

#[tokio::test]
async fn the_worker_manifest_matches_queue_consumer() {
    let manifest = yaml("copilot/queue-consumer/manifest.yml");
    let mut problems = Vec::new();

    if text_at(&manifest, "name").as_deref() != Some("queue-consumer") {
        problems.push("name is not queue-consumer".into());
    }
    if text_at(&manifest, "type").as_deref() != Some("Worker Service") {
        problems.push(format!(
            "type is {:?}, expected \"Worker Service\"",
            text_at(&manifest, "type")
        ));
    }
    check_image(&manifest, "queue-consumer", &mut problems);
    check_platform(&manifest, &mut problems);

    let read = settings("queue-consumer").await;
    let vars = variables(&manifest, &mut problems);
    check_variables("queue-consumer", &vars, &read, &mut problems);
    if !read.contains_key("COPILOT_QUEUE_URI") {
        problems
            .push("`queue-consumer` does not read COPILOT_QUEUE_URI, which Copilot sets".into());
    }

    // The queue's visibility timeout is the one the worker asks for.
    let visibility = default_number(&read, "VISIBILITY_TIMEOUT_SECONDS");
    let timeout = text_at(&manifest, "subscribe.queue.timeout");
    match (visibility, timeout.as_deref().and_then(go_duration)) {
        (Some(v), Some(t)) if t == Duration::from_secs(v) => {}
        (v, _) => problems.push(format!(
            "subscribe.queue.timeout is {timeout:?} but VISIBILITY_TIMEOUT_SECONDS defaults to {v:?} s"
        )),
    }
    // Copilot applies `subscribe.queue` only when `topics` is present.
    if at(&manifest, "subscribe.topics")
        .and_then(Value::as_sequence)
        .is_none()
    {
        problems
            .push("subscribe.topics is missing: without it Copilot ignores subscribe.queue".into());
    }
    match at(&manifest, "subscribe.queue.dead_letter.tries").and_then(Value::as_u64) {
        Some(tries) if (1..=1000).contains(&tries) => {}
        other => problems.push(format!(
            "subscribe.queue.dead_letter.tries is {other:?}; poison messages need a DLQ (1..=1000)"
        )),
    }

    // The autoscaling example scales on the queue backlog.
    let scaled = at(&manifest, "environments")
        .and_then(Value::as_mapping)
        .into_iter()
        .flat_map(|envs| envs.values())
        .any(|env| {
            at(env, "count.queue_delay.acceptable_latency").is_some()
                && at(env, "count.queue_delay.msg_processing_time").is_some()
                && at(env, "count.range").is_some()
        });
    if !scaled {
        problems.push("no environment has a count with range and queue_delay".into());
    }

    check_stop_timeout(&manifest, &read, &mut problems);
    report("queue-consumer", &problems);
}

#[tokio::test]
async fn the_web_manifest_matches_the_websocket_server() {
    let manifest = yaml("copilot/websocket/manifest.yml");
    let mut problems = Vec::new();

    if text_at(&manifest, "name").as_deref() != Some("websocket") {
        problems.push("name is not websocket".into());
    }
    if text_at(&manifest, "type").as_deref() != Some("Load Balanced Web Service") {
        problems.push(format!(
            "type is {:?}, expected \"Load Balanced Web Service\"",
            text_at(&manifest, "type")
        ));
    }
    let dockerfile = check_image(&manifest, "websocket", &mut problems);
    check_platform(&manifest, &mut problems);

    let read = settings("websocket").await;
    let vars = variables(&manifest, &mut problems);
    check_variables("websocket", &vars, &read, &mut problems);

    // The ALB sends traffic to image.port: the port the server listens on by default.
    let port = text_at(&manifest, "image.port");
    let default_port = read.get("PORT").and_then(|s| s.default.clone());
    if port.is_none() || port != default_port {
        problems.push(format!(
            "image.port is {port:?} but the server listens on PORT {default_port:?} by default"
        ));
    }
    if let (Some(file), Some(port)) = (&dockerfile, &port)
        && !file.lines().any(|l| l.trim() == format!("EXPOSE {port}"))
    {
        problems.push(format!(
            "docker/websocket.Dockerfile does not EXPOSE {port}"
        ));
    }

    // The server's pings keep each websocket busy within the ALB's idle timeout.
    match default_number(&read, "WS_PING_INTERVAL_SECONDS") {
        Some(ping) if Duration::from_secs(ping) < ALB_IDLE_TIMEOUT => {}
        other => problems.push(format!(
            "WS_PING_INTERVAL_SECONDS defaults to {other:?}, not below the ALB idle timeout of {ALB_IDLE_TIMEOUT:?}"
        )),
    }

    // Draining a task with clients must not outlast the grace the server gives them.
    let grace = default_number(&read, "SHUTDOWN_GRACE_SECONDS");
    let delay = text_at(&manifest, "http.deregistration_delay");
    match (delay.as_deref().and_then(go_duration), grace) {
        (Some(d), Some(g)) if d <= Duration::from_secs(g) => {}
        _ => problems.push(format!(
            "http.deregistration_delay is {delay:?}; it should be set and at most SHUTDOWN_GRACE_SECONDS ({grace:?} s)"
        )),
    }
    check_stop_timeout(&manifest, &read, &mut problems);

    // The routes the ALB uses are ones the real server answers with 200.
    let path = text_at(&manifest, "http.path");
    let health = text_at(&manifest, "http.healthcheck")
        .or_else(|| text_at(&manifest, "http.healthcheck.path"));
    if path.as_deref() != Some("/") {
        problems.push(format!("http.path is {path:?}, expected \"/\""));
    }
    if health.as_deref() != Some("/healthz") {
        problems.push(format!(
            "http.healthcheck path is {health:?}, expected \"/healthz\""
        ));
    }
    let (server, listen) = local_websocket().await;
    for route in [path, health].into_iter().flatten() {
        let status = get_status(listen, &route).await;
        if status != Some(200) {
            problems.push(format!(
                "GET {route} on the real server answered {status:?}, the ALB expects 200"
            ));
        }
    }
    drop(server);
    report("websocket", &problems);
}

#[test]
fn the_addons_grant_only_task_protection_in_the_environment_cluster() {
    for service in ["queue-consumer", "websocket"] {
        let relative = format!("copilot/{service}/addons/task-protection.yml");
        let template = yaml(&relative);
        let resources = at(&template, "Resources")
            .and_then(Value::as_mapping)
            .unwrap_or_else(|| panic!("{relative} has no Resources"));
        let policies: Vec<(&Value, &Value)> = resources
            .iter()
            .filter(|(_, r)| text_at(r, "Type").as_deref() == Some("AWS::IAM::ManagedPolicy"))
            .collect();
        assert_eq!(policies.len(), 1, "{relative}: expected one managed policy");
        let (id, policy) = policies[0];
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
pub(super) fn allowed_actions(statements: &[Value]) -> Vec<String> {
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
pub(super) fn function(value: &Value) -> Option<(String, String)> {
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

#[test]
fn go_durations_parse_as_copilot_writes_them() {
    assert_eq!(go_duration("30s"), Some(Duration::from_secs(30)));
    assert_eq!(go_duration("5m"), Some(Duration::from_secs(300)));
    assert_eq!(go_duration("1h30m"), Some(Duration::from_secs(5400)));
    assert_eq!(go_duration("250ms"), Some(Duration::from_millis(250)));
    assert_eq!(go_duration(""), None);
    assert_eq!(go_duration("30"), None);
    assert_eq!(go_duration("3d"), None);
}
