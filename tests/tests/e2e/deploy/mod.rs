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
/// The worker's health endpoint, off by default and on in ECS, where the container
/// health check (`queue-consumer healthcheck`) asks it.
pub(super) const HEALTH_PORT: &str = "HEALTH_PORT";
/// The port the deployments give it.
pub(super) const WORKER_HEALTH_PORT: &str = "8081";
/// Where the images install each binary (docker/*.Dockerfile), which the container
/// health checks run.
pub(super) const QUEUE_CONSUMER_PATH: &str = "/usr/local/bin/queue-consumer";
pub(super) const WEBSOCKET_PATH: &str = "/usr/local/bin/websocket";
/// The ALB health check that takes a task out of rotation quickly enough for a
/// drain: every 5 s, 2 failures in a row.
pub(super) const TARGET_HEALTH_INTERVAL_SECONDS: u64 = 5;
pub(super) const TARGET_UNHEALTHY_THRESHOLD: u64 = 2;
/// Where taskdef_overrides sets the main container's stop timeout.
const STOP_TIMEOUT_PATH: &str = "ContainerDefinitions[0].StopTimeout";
/// The longest deregistration delay the deployments may set: ECS waits it in full
/// before SIGTERM, for every task it stops, and the goodbye of a task ECS stops
/// must fit in it (`check_goodbye_within_delay`): a minute and a half.
pub(super) const DEREGISTRATION_DELAY_MAX: Duration = Duration::from_secs(90);
/// The longest SQS keeps a message (`MessageRetentionPeriod` 1209600): what a queue
/// that outlives its stack should keep.
pub(super) const MAX_RETENTION: Duration = Duration::from_secs(14 * 24 * 3600);
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

mod addons;
mod health_checks;
mod iam;

pub(super) use addons::{allowed_actions, function};
pub(super) use health_checks::installed_path;

// --- reading the files -----------------------------------------------------------

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

pub(super) fn yaml(relative: &str) -> Value {
    let path = workspace_root().join(relative);
    serde_norway::from_str(&read(&path))
        .unwrap_or_else(|e| panic!("{relative} is not valid YAML: {e}"))
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
pub(super) fn go_duration(raw: &str) -> Option<Duration> {
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
pub(super) fn stop_timeout(manifest: &Value) -> Option<u64> {
    at(manifest, "taskdef_overrides")?
        .as_sequence()?
        .iter()
        .find(|rule| rule.get("path").and_then(Value::as_str) == Some(STOP_TIMEOUT_PATH))?
        .get("value")?
        .as_u64()
}

/// What a variable may import with `from_cfn`: the load balancer's DNS name, which
/// Copilot's environment stack exports (`PublicLoadBalancerDNSName` in its
/// `environment/cf.yml`).
pub(super) const LB_DNS_IMPORT: &str =
    "${COPILOT_APPLICATION_NAME}-${COPILOT_ENVIRONMENT_NAME}-PublicLoadBalancerDNS";

/// Every variable the manifest sets, as text; an import as `from_cfn:<name>`.
fn variables(manifest: &Value, problems: &mut Vec<String>) -> BTreeMap<String, String> {
    let Some(map) = at(manifest, "variables").and_then(Value::as_mapping) else {
        problems.push("the manifest has no `variables` map".into());
        return BTreeMap::new();
    };
    map.iter()
        .filter_map(|(k, v)| {
            let name = k.as_str()?.to_owned();
            let import = v.get("from_cfn").and_then(Value::as_str);
            match (text(v), import) {
                (Some(value), _) => Some((name, value)),
                (None, Some(LB_DNS_IMPORT)) => Some((name, format!("from_cfn:{LB_DNS_IMPORT}"))),
                (None, _) => {
                    problems.push(format!("variable {name} is not a plain value: {v:?}"));
                    None
                }
            }
        })
        .collect()
}

/// The websocket's settings for strangers, in a deployment: origins set, the
/// load balancer's `X-Forwarded-For` trusted (every client comes through it), and
/// clients counted per address.
pub(super) fn check_strangers(vars: &BTreeMap<String, String>, problems: &mut Vec<String>) {
    if !vars.contains_key("ALLOWED_ORIGINS") {
        problems.push("ALLOWED_ORIGINS is not set: pages of any site could connect".into());
    }
    if vars.get("TRUST_X_FORWARDED_FOR").map(String::as_str) != Some("true") {
        problems.push(
            "TRUST_X_FORWARDED_FOR must be true behind the ALB: every client would count \
             under the load balancer's few addresses"
                .into(),
        );
    }
    if !vars.contains_key("MAX_CONNECTIONS_PER_ADDRESS") {
        problems.push("MAX_CONNECTIONS_PER_ADDRESS is not set".into());
    }
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
        if name == HEALTH_PORT {
            if value != WORKER_HEALTH_PORT {
                problems.push(format!(
                    "variables.{HEALTH_PORT} is {value:?}, expected {WORKER_HEALTH_PORT:?}: the container health check asks that port"
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

/// The subcommands a binary's `--help` lists under `Commands:`, less `help`.
pub(super) async fn subcommands(binary: &str) -> Vec<String> {
    let (status, stdout, stderr) = run_to_exit(binary, &["--help"], &[]).await;
    assert!(
        status.success(),
        "`{binary} --help` failed with {status}: {stderr}"
    );
    stdout
        .lines()
        .skip_while(|l| l.trim_end() != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect()
}

/// `HEALTH_PORT` belongs to the worker's `healthcheck` subcommand: a build of
/// `queue-consumer` without that subcommand does not read it, so it is left out of
/// the comparison with `--help` (the health check tests check its value). Once the
/// subcommand is there, the variable must be one the binary reads like any other.
pub(super) async fn without_unread_health_port(
    binary: &str,
    vars: &mut BTreeMap<String, String>,
    read: &BTreeMap<String, Setting>,
) {
    if !read.contains_key(HEALTH_PORT)
        && !subcommands(binary).await.iter().any(|c| c == "healthcheck")
    {
        vars.remove(HEALTH_PORT);
    }
}

/// A leaving websocket task passes its health checks (ECS replaces a task that fails
/// one, protected or not) and refuses new clients at the upgrade with 503 and
/// Retry-After: no client is sent to it that a notice would have to wait out. So the
/// deployment sets no DRAIN_NOTICE_SECONDS, and its default is 0.
pub(super) fn check_drain_notice(
    vars: &BTreeMap<String, String>,
    read: &BTreeMap<String, Setting>,
    problems: &mut Vec<String>,
) {
    if let Some(notice) = vars.get("DRAIN_NOTICE_SECONDS")
        && notice != "0"
    {
        problems.push(format!(
            "DRAIN_NOTICE_SECONDS is {notice}: a leaving task refuses new clients at once and stays healthy, so a notice only delays its goodbye"
        ));
    }
    if read.contains_key("DRAIN_NOTICE_SECONDS")
        && default_number(read, "DRAIN_NOTICE_SECONDS") != Some(0)
    {
        problems.push(format!(
            "DRAIN_NOTICE_SECONDS defaults to {:?}, not 0",
            default_number(read, "DRAIN_NOTICE_SECONDS")
        ));
    }
}

/// The drain's table is the one `DynamoStore` writes (its docs): partition key the
/// string `service`, items that expire by `expires_at`, on-demand capacity.
pub(super) fn check_drain_table(what: &str, table: Option<&Value>, problems: &mut Vec<String>) {
    let Some(table) = table else {
        problems.push(format!("{what}: no DrainTable"));
        return;
    };
    let expected: Value = serde_norway::from_str(
        "
BillingMode: PAY_PER_REQUEST
AttributeDefinitions: [{AttributeName: service, AttributeType: S}]
KeySchema: [{AttributeName: service, KeyType: HASH}]
TimeToLiveSpecification: {AttributeName: expires_at, Enabled: true}
SSESpecification: {SSEEnabled: true}
",
    )
    .expect("valid YAML");
    if text_at(table, "Type").as_deref() != Some("AWS::DynamoDB::Table")
        || table.get("Properties") != Some(&expected)
    {
        problems.push(format!(
            "{what}: DrainTable must be a DynamoDB table of {expected:?}, is {table:?}"
        ));
    }
}

/// What the goodbye needs beside seeing the stop and its pace: the last clients'
/// close handshakes.
pub(super) const GOODBYE_MARGIN: Duration = Duration::from_secs(5);

/// The goodbye of a task ECS stops finishes before the deregistration delay can end.
/// ECS deregisters the target first (the ALB sends it no new clients from then on),
/// and the websocket starts its goodbye when it sees the stop: at most 2 ×
/// DRAIN_CHECK_SECONDS later. With DRAIN_TABLE, as deployed, the service decides a
/// check interval after its last decision, at the first read of a task after that
/// (each task reads every third of an interval, jittered by up to 1.5: at most half
/// an interval late), and the stopping task sees the decision at its next read (at
/// most half an interval again); a task deciding for itself looks a jittered
/// interval of at most 1.5 apart. Then
/// DRAIN_NOTICE_SECONDS, then MAX_CONNECTIONS clients told to leave at GOODBYE_RATE
/// a second. What the ALB does with a connection still open when the delay ends is
/// not something to rely on (docs/deploy.md, "The goodbye and the load balancer"),
/// and SIGTERM follows the delay: so the delay is at least the whole goodbye plus
/// `GOODBYE_MARGIN`.
pub(super) fn check_goodbye_within_delay(
    delay: Duration,
    vars: &BTreeMap<String, String>,
    read: &BTreeMap<String, Setting>,
    problems: &mut Vec<String>,
) {
    let number = |name: &str| {
        vars.get(name)
            .and_then(|v| v.parse::<u64>().ok())
            .or_else(|| default_number(read, name))
    };
    let (Some(check), Some(notice), Some(cap), Some(rate)) = (
        number("DRAIN_CHECK_SECONDS"),
        number("DRAIN_NOTICE_SECONDS"),
        number("MAX_CONNECTIONS"),
        number("GOODBYE_RATE").filter(|r| *r > 0),
    ) else {
        problems.push(
            "the websocket reads no DRAIN_CHECK_SECONDS, DRAIN_NOTICE_SECONDS, MAX_CONNECTIONS or GOODBYE_RATE: the goodbye cannot be checked against the deregistration delay".to_owned(),
        );
        return;
    };
    let seen = Duration::from_secs(check * 2);
    let goodbye = seen + Duration::from_secs(notice + cap.div_ceil(rate));
    if delay < goodbye + GOODBYE_MARGIN {
        problems.push(format!(
            "the deregistration delay ({delay:?}) ends before the goodbye can: 2 x DRAIN_CHECK_SECONDS {check} s to see the stop + DRAIN_NOTICE_SECONDS {notice} s + MAX_CONNECTIONS {cap} / GOODBYE_RATE {rate} a second = {goodbye:?}, plus {GOODBYE_MARGIN:?}"
        ));
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
    if !root.join(&dockerfile).is_file() {
        problems.push(format!(
            "image.build.dockerfile {dockerfile} does not exist"
        ));
        return None;
    }
    // images.rs checks the Dockerfiles themselves; here, that this one is the
    // image of this package.
    if !crate::images::IMAGES.contains(&(dockerfile.as_str(), binary)) {
        problems.push(format!("{dockerfile} is not the image of {binary}"));
    }
    Some(read(&root.join(&dockerfile)))
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
    let mut vars = variables(&manifest, &mut problems);
    without_unread_health_port("queue-consumer", &mut vars, &read).await;
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

    // The service scales on the queue backlog, in every environment (the runtime
    // patches need the functions that scaling makes Copilot generate).
    let scaled = at(&manifest, "count.queue_delay.acceptable_latency").is_some()
        && at(&manifest, "count.queue_delay.msg_processing_time").is_some()
        && at(&manifest, "count.range").is_some();
    if !scaled {
        problems.push("count has no range with queue_delay".into());
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
    check_strangers(&vars, &mut problems);
    // The page is served from the alias once there is one: its origin must be allowed.
    if let Some(alias) = text_at(&manifest, "http.alias") {
        let origins = vars.get("ALLOWED_ORIGINS").cloned().unwrap_or_default();
        if !origins.contains(&format!("https://{alias}")) {
            problems.push(format!(
                "http.alias is {alias}, but ALLOWED_ORIGINS ({origins}) does not name https://{alias}"
            ));
        }
    }

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

    // ECS waits the whole deregistration delay before SIGTERM, and every stopped
    // task pays it: set it, as short as the goodbye allows.
    let delay = text_at(&manifest, "http.deregistration_delay");
    match delay.as_deref().and_then(go_duration) {
        Some(d) if d > Duration::ZERO && d <= DEREGISTRATION_DELAY_MAX => {
            check_goodbye_within_delay(d, &vars, &read, &mut problems);
        }
        _ => problems.push(format!(
            "http.deregistration_delay is {delay:?}; set it, at most {DEREGISTRATION_DELAY_MAX:?}"
        )),
    }
    check_stop_timeout(&manifest, &read, &mut problems);

    // The ALB takes a task out of rotation within about 10 s of its /healthz
    // failing: checked every 5 s, 2 failures in a row (healthy again after 2).
    let seconds = |key: &str| {
        text_at(&manifest, &format!("http.healthcheck.{key}")).and_then(|d| go_duration(&d))
    };
    let whole =
        |key: &str| at(&manifest, &format!("http.healthcheck.{key}")).and_then(Value::as_u64);
    let interval = seconds("interval");
    if interval != Some(Duration::from_secs(TARGET_HEALTH_INTERVAL_SECONDS))
        || whole("unhealthy_threshold") != Some(TARGET_UNHEALTHY_THRESHOLD)
        || whole("healthy_threshold") != Some(2)
        || !matches!((seconds("timeout"), interval), (Some(t), Some(i)) if t < i)
    {
        problems.push(format!(
            "http.healthcheck must check every {TARGET_HEALTH_INTERVAL_SECONDS} s with thresholds 2 and a timeout below the interval, is {:?}",
            at(&manifest, "http.healthcheck")
        ));
    }

    check_drain_notice(&vars, &read, &mut problems);

    // The routes the ALB uses are ones the real server answers with 200.
    let path = text_at(&manifest, "http.path");
    let health = text_at(&manifest, "http.healthcheck")
        .or_else(|| text_at(&manifest, "http.healthcheck.path"));
    if text_at(&manifest, "http.healthcheck.success_codes").as_deref() != Some("200") {
        problems.push("http.healthcheck.success_codes must be 200".into());
    }
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
fn go_durations_parse_as_copilot_writes_them() {
    assert_eq!(go_duration("30s"), Some(Duration::from_secs(30)));
    assert_eq!(go_duration("5m"), Some(Duration::from_secs(300)));
    assert_eq!(go_duration("1h30m"), Some(Duration::from_secs(5400)));
    assert_eq!(go_duration("250ms"), Some(Duration::from_millis(250)));
    assert_eq!(go_duration(""), None);
    assert_eq!(go_duration("30"), None);
    assert_eq!(go_duration("3d"), None);
}

#[test]
fn the_environment_serves_https_with_a_tls13_policy() {
    let env = yaml("copilot/environments/test/manifest.yml");
    let policy = text_at(&env, "http.public.ssl_policy").unwrap_or_default();
    assert!(
        crate::copilot_rules::TLS13_POLICIES.contains(&policy.as_str()),
        "http.public.ssl_policy is {policy:?}, not a TLS 1.3 policy"
    );
}
