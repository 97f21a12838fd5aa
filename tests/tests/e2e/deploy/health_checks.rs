//! The container health checks of the deployments against the images: they run the
//! binary each image installs, with its `healthcheck` subcommand.

use super::*;

/// The path the image installs `binary` at and runs: its `COPY --from=build` target,
/// which must also be the `ENTRYPOINT`.
pub(crate) fn installed_path(binary: &str) -> Option<String> {
    let (relative, _) = crate::images::IMAGES
        .iter()
        .find(|(_, package)| *package == binary)?;
    let file = crate::images::dockerfile(relative);
    let last = file.stages.last()?;
    let copied = last
        .body
        .iter()
        .find(|i| i.keyword == "COPY" && i.rest.starts_with("--from="))?
        .rest
        .split_whitespace()
        .last()?
        .to_owned();
    let entry = last.body.iter().find(|i| i.keyword == "ENTRYPOINT")?;
    (entry.rest == format!("[\"{copied}\"]")).then_some(copied)
}

#[tokio::test]
async fn the_container_health_checks_run_the_binary_the_image_installs() {
    // ECS ignores a Dockerfile's HEALTHCHECK: the task definition carries the
    // check, which Copilot takes from image.healthcheck. The images are
    // distroless, so the check is the binary itself (`CMD`, no shell).
    let mut problems = Vec::new();
    for (service, path) in [
        ("queue-consumer", QUEUE_CONSUMER_PATH),
        ("websocket", WEBSOCKET_PATH),
    ] {
        let manifest = yaml(&format!("copilot/{service}/manifest.yml"));
        if installed_path(service).as_deref() != Some(path) {
            problems.push(format!(
                "the {service} image does not install and run {path}: {:?}",
                installed_path(service)
            ));
        }
        let command: Vec<String> = at(&manifest, "image.healthcheck.command")
            .and_then(Value::as_sequence)
            .map(|c| c.iter().filter_map(text).collect())
            .unwrap_or_default();
        if command != ["CMD", path, "healthcheck"] {
            problems.push(format!(
                "{service}: image.healthcheck.command is {command:?}, expected [\"CMD\", \"{path}\", \"healthcheck\"]"
            ));
        }
    }
    // The websocket binary has the subcommand; the Dockerfile's own HEALTHCHECK
    // (for `docker run`) runs the same command.
    if !subcommands("websocket")
        .await
        .iter()
        .any(|c| c == "healthcheck")
    {
        problems.push("`websocket --help` lists no healthcheck subcommand".into());
    }
    let web = crate::images::dockerfile("docker/websocket.Dockerfile");
    let healthcheck = web
        .stages
        .last()
        .and_then(|s| s.body.iter().find(|i| i.keyword == "HEALTHCHECK"))
        .map(|i| i.rest.clone())
        .unwrap_or_default();
    if !healthcheck.ends_with(&format!("CMD [\"{WEBSOCKET_PATH}\", \"healthcheck\"]")) {
        problems.push(format!(
            "docker/websocket.Dockerfile: HEALTHCHECK is {healthcheck:?}"
        ));
    }
    // The worker's check asks its health endpoint, which is off unless HEALTH_PORT
    // is set.
    let worker = yaml("copilot/queue-consumer/manifest.yml");
    if text_at(&worker, &format!("variables.{HEALTH_PORT}")).as_deref() != Some(WORKER_HEALTH_PORT)
    {
        problems.push(format!(
            "copilot/queue-consumer/manifest.yml: variables.{HEALTH_PORT} must be {WORKER_HEALTH_PORT}"
        ));
    }
    assert!(
        problems.is_empty(),
        "container health checks:\n  - {}",
        problems.join("\n  - ")
    );
}
