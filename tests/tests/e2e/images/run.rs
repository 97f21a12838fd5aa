//! Both images, built with podman (see `podman.rs`) and checked from outside, as ECS
//! would meet them: the process is the binary itself as PID 1 and not root, the
//! health check the deployments run passes and fails when it should, and SIGTERM to
//! PID 1 (`podman stop`, SIGKILL after the deployment's `StopTimeout`) ends it
//! gracefully within that budget with task protection released at the fake ECS
//! agent. The worker's image works a job from moto; the websocket's serves its page to
//! headless Chromium.
//!
//! Each check collects its problems, so that the tests in `breaks.rs` can build a
//! deliberately broken image and see the same check fail.

use std::time::Duration;

use e2e::agent::FakeAgent;
use e2e::free_port;
use e2e::moto::{Moto, aws_env, send};
use e2e::wait_for;
use serde_norway::Value;

use super::podman::{Container, build};
use crate::browser::{Driver, text_of, wait_for_log};
use crate::deploy::{
    HEALTH_PORT, QUEUE_CONSUMER_PATH, WEBSOCKET_PATH, get_status, stop_timeout, yaml,
};

const STEP: Duration = Duration::from_secs(30);

/// The text of `docker/<package>.Dockerfile`.
pub(super) fn dockerfile_text(package: &str) -> String {
    let path = e2e::workspace_root().join(format!("docker/{package}.Dockerfile"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path:?}: {e}"))
}

/// The `StopTimeout` the Copilot manifest gives `service`: the stop's budget.
pub(super) fn budget(service: &str) -> Duration {
    let manifest = yaml(&format!("copilot/{service}/manifest.yml"));
    Duration::from_secs(
        stop_timeout(&manifest)
            .unwrap_or_else(|| panic!("copilot/{service}/manifest.yml sets no StopTimeout")),
    )
}

/// The container health check command the manifest gives ECS (`image.healthcheck`),
/// without its leading `CMD`.
fn manifest_health_command(service: &str) -> Vec<String> {
    let manifest = yaml(&format!("copilot/{service}/manifest.yml"));
    let command: Vec<String> = manifest["image"]["healthcheck"]["command"]
        .as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        command.first().map(String::as_str),
        Some("CMD"),
        "{command:?}"
    );
    command[1..].to_vec()
}

/// PID 1 of the container is `installed` (no shell in between, so SIGTERM reaches
/// the binary) and runs as neither root user nor root group, read from the host's
/// `/proc`. The image's own `USER` is checked too, since ECS runs it as written.
pub(super) async fn check_process(
    container: &Container,
    installed: &str,
    problems: &mut Vec<String>,
) {
    let user = container.inspect("{{.Config.User}}").await;
    if user.is_empty() || user == "0" || user.starts_with("0:") || user.starts_with("root") {
        problems.push(format!("the image's USER is {user:?}: it runs as root"));
    }
    let Some(pid) = container.pid().await else {
        problems.push(format!("{} has no running PID 1", container.name));
        return;
    };
    match std::fs::read_link(format!("/proc/{pid}/exe")) {
        Ok(exe) if exe.to_string_lossy() == installed => {}
        Ok(exe) => problems.push(format!(
            "PID 1 is {exe:?}, not {installed}: SIGTERM would not reach the binary"
        )),
        Err(e) => problems.push(format!("cannot read /proc/{pid}/exe: {e}")),
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    for key in ["Uid:", "Gid:"] {
        let ids: Vec<&str> = status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|rest| rest.split_whitespace().collect())
            .unwrap_or_default();
        if ids.is_empty() || ids.contains(&"0") {
            problems.push(format!("PID 1 runs with {key} {ids:?}: root"));
        }
    }
}

/// The image's `HEALTHCHECK` (what `docker run` uses) passes.
pub(super) async fn check_image_healthcheck(container: &Container, problems: &mut Vec<String>) {
    // `podman healthcheck run` exits 0 when the check passes, 1 when it fails and
    // 125 when the image has none.
    let (status, out) = container.healthcheck().await;
    if status != Some(0) {
        problems.push(format!(
            "the image's HEALTHCHECK did not pass: exit {status:?}, {out:?}"
        ));
    }
}

/// The manifest's health check command passes in the running container, and fails
/// when the endpoint it asks does not answer (`variable` pointed at a closed port).
async fn check_manifest_healthcheck(
    container: &Container,
    service: &str,
    variable: &str,
    problems: &mut Vec<String>,
) {
    let command = manifest_health_command(service);
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    let (status, out) = container.exec(&[], &command).await;
    if status != Some(0) {
        problems.push(format!(
            "{command:?} failed in the container: {status:?} {out}"
        ));
    }
    let closed = free_port().to_string();
    let (status, out) = container.exec(&[(variable, &closed)], &command).await;
    if status == Some(0) {
        problems.push(format!(
            "{command:?} passed with {variable}={closed}, where nothing answers: {out}"
        ));
    }
}

/// `podman stop` with the deployment's StopTimeout: the process exits 0 before it,
/// and protection ends released.
pub(super) async fn check_stop(
    container: &Container,
    budget: Duration,
    agent: &FakeAgent,
    problems: &mut Vec<String>,
) {
    let (took, code) = container.stop(budget).await;
    if code != Some(0) {
        problems.push(format!(
            "exit code {code:?} after SIGTERM (137: killed at the StopTimeout); logs:\n{}",
            container.logs().await
        ));
    }
    if took >= budget {
        problems.push(format!(
            "stopping took {took:?}, the whole budget of {budget:?}"
        ));
    }
    if !agent.released() {
        problems.push("task protection was not released before the exit".to_owned());
    }
}

pub(super) fn report(what: &str, problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{what}:\n  - {}",
        problems.join("\n  - ")
    );
}

/// The websocket image on a free port, talking to `agent`.
pub(super) async fn start_websocket(
    image: &str,
    agent: &FakeAgent,
) -> Result<(Container, u16), String> {
    let port = free_port();
    let env = [
        ("TASK_PROTECTION_BACKEND", "agent".to_owned()),
        ("ECS_AGENT_URI", agent.uri()),
        ("PORT", port.to_string()),
        ("BIND_ADDRESS", "127.0.0.1".to_owned()),
    ];
    let container = Container::start(image, &env).await?;
    wait_for("the websocket image to answer /healthz", STEP, || {
        get_status(port, "/healthz")
    })
    .await;
    Ok((container, port))
}

#[tokio::test]
async fn the_websocket_image_runs_as_nonroot_serves_the_page_and_stops_gracefully() {
    let image = build("websocket", &dockerfile_text("websocket")).await;
    let agent = FakeAgent::start().await;
    let (container, port) = start_websocket(&image, &agent)
        .await
        .unwrap_or_else(|e| panic!("the websocket image does not start: {e}"));
    let mut problems = Vec::new();
    check_process(&container, WEBSOCKET_PATH, &mut problems).await;
    check_image_healthcheck(&container, &mut problems).await;
    check_manifest_healthcheck(&container, "websocket", "PORT", &mut problems).await;

    // The page, in Chromium, from the container: it connects and the task is
    // protected while it is open.
    let driver = Driver::start().await;
    let browser = driver.browser().await;
    browser
        .goto(&format!("http://127.0.0.1:{port}/"))
        .await
        .expect("the page loads from the container");
    wait_for_log(&browser, "Connected!", 1).await;
    wait_for("the page to show protection", STEP, || async {
        (text_of(&browser, "p-phase").await == "protected").then_some(())
    })
    .await;
    assert!(
        agent.puts().iter().any(e2e::agent::Recorded::enabled),
        "no protection PUT while a client was connected"
    );

    check_stop(&container, budget("websocket"), &agent, &mut problems).await;
    wait_for_log(&browser, "Server says: \"server shutting down\"", 1).await;
    if !container.logs().await.contains("Shutdown complete") {
        problems.push("no \"Shutdown complete\" line".to_owned());
    }
    let _ = browser.close().await;
    report("the websocket image", &problems);
}

#[tokio::test]
async fn the_queue_consumer_image_works_a_job_from_moto_and_stops_gracefully() {
    let image = build("queue-consumer", &dockerfile_text("queue-consumer")).await;
    let moto = Moto::start().await;
    let queue = moto.create_queue("image-jobs", 30).await;
    let agent = FakeAgent::start().await;
    let health = free_port();
    let mut env = aws_env(&moto.endpoint());
    env.extend([
        ("COPILOT_QUEUE_URI", queue.clone()),
        ("TASK_PROTECTION_BACKEND", "agent".to_owned()),
        ("ECS_AGENT_URI", agent.uri()),
        (HEALTH_PORT, health.to_string()),
        ("QUEUE_WAIT_SECONDS", "1".to_owned()),
    ]);
    let container = Container::start(&image, &env)
        .await
        .unwrap_or_else(|e| panic!("the queue-consumer image does not start: {e}"));
    container
        .wait_for_log("Long polling for messages", STEP)
        .await;
    let mut problems = Vec::new();
    check_process(&container, QUEUE_CONSUMER_PATH, &mut problems).await;
    check_manifest_healthcheck(&container, "queue-consumer", HEALTH_PORT, &mut problems).await;

    // A job, worked under protection, deleted, and protection released.
    let client = moto.client();
    let first = send(&client, &queue, "200").await;
    container
        .wait_for_log(&format!("{first} - Done"), STEP)
        .await;
    container
        .wait_for_log("Task protection released", STEP)
        .await;

    // SIGTERM while a job runs: the job finishes, protection is released, exit 0.
    let second = send(&client, &queue, "3000").await;
    container
        .wait_for_log(&format!("{second} - Working for 3000"), STEP)
        .await;
    check_stop(&container, budget("queue-consumer"), &agent, &mut problems).await;
    if !container.logs().await.contains(&format!("{second} - Done")) {
        problems.push("the job running at SIGTERM did not finish".to_owned());
    }
    let counts = e2e::moto::queue_counts(&client, &queue).await;
    if counts != Some((0, 0)) {
        problems.push(format!(
            "the queue still holds messages (visible, in flight): {counts:?}"
        ));
    }
    report("the queue-consumer image", &problems);
}
