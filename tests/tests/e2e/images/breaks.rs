//! The checks of `run.rs` against images broken on purpose: each is the websocket
//! Dockerfile with one line changed, built and run the same way, and the check that
//! guards that line must fail.

use e2e::agent::FakeAgent;

use super::podman::build;
use super::run::{
    budget, check_image_healthcheck, check_process, check_stop, dockerfile_text, start_websocket,
};
use crate::deploy::WEBSOCKET_PATH;

/// The websocket Dockerfile with `from` replaced by `to` (which must be there).
fn broken(from: &str, to: &str) -> String {
    let text = dockerfile_text("websocket");
    assert!(
        text.contains(from),
        "the websocket Dockerfile has no {from:?}"
    );
    text.replacen(from, to, 1)
}

#[tokio::test]
async fn an_image_whose_user_is_root_fails_the_process_check() {
    let image = build("websocket", &broken("USER 65532:65532", "USER root")).await;
    let agent = FakeAgent::start().await;
    let (container, _) = start_websocket(&image, &agent)
        .await
        .unwrap_or_else(|e| panic!("the broken image does not start: {e}"));
    let mut problems = Vec::new();
    check_process(&container, WEBSOCKET_PATH, &mut problems).await;
    assert!(
        problems.iter().any(|p| p.contains("root")),
        "USER root went unnoticed: {problems:?}"
    );
}

#[tokio::test]
async fn an_image_without_its_healthcheck_fails_the_healthcheck_check() {
    let text = dockerfile_text("websocket");
    let start = text.find("HEALTHCHECK ").expect("a HEALTHCHECK");
    let end = start
        + text[start..]
            .find("CMD [")
            .and_then(|cmd| text[start + cmd..].find('\n').map(|n| cmd + n))
            .expect("the HEALTHCHECK's CMD line");
    let without = format!("{}{}", &text[..start], &text[end..]);
    let image = build("websocket", &without).await;
    let agent = FakeAgent::start().await;
    let (container, _) = start_websocket(&image, &agent)
        .await
        .unwrap_or_else(|e| panic!("the broken image does not start: {e}"));
    let mut problems = Vec::new();
    check_image_healthcheck(&container, &mut problems).await;
    assert!(
        !problems.is_empty(),
        "an image without HEALTHCHECK passed the health check"
    );
}

/// The shell form of ENTRYPOINT runs `/bin/sh -c`: in distroless there is no shell
/// and the container cannot start; in an image with one, the shell would be PID 1
/// and SIGTERM would not reach the server. Either is caught.
#[tokio::test]
async fn an_entrypoint_through_a_shell_fails_the_process_and_stop_checks() {
    let image = build(
        "websocket",
        &broken(
            "ENTRYPOINT [\"/usr/local/bin/websocket\"]",
            "ENTRYPOINT /usr/local/bin/websocket",
        ),
    )
    .await;
    let agent = FakeAgent::start().await;
    match start_websocket(&image, &agent).await {
        Err(e) => assert!(e.contains("/bin/sh"), "{e}"),
        Ok((container, _)) => {
            let mut problems = Vec::new();
            check_process(&container, WEBSOCKET_PATH, &mut problems).await;
            check_stop(&container, budget("websocket"), &agent, &mut problems).await;
            assert!(
                !problems.is_empty(),
                "an ENTRYPOINT through a shell went unnoticed"
            );
        }
    }
}
