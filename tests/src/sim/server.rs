//! The HTTP face of the API, for the real-time driver: one loopback server whose
//! paths start with `/tasks/<id>/` (`agent/task-protection/v1/state`, `metadata/task`,
//! `ecs`), so each call is counted for the task that made it, and `/other/ecs` for
//! callers outside the service (a test, a deploy tool). It hands each request to the
//! pure functions of [`api`](super::api) with the driver's clock.

use std::sync::Arc;

use wiremock::matchers::any;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use super::api::{self, Caller};
use super::driver::{Clock, Shared};
use super::model::ApiFault;

/// The ECS API's target prefix.
const TARGET: &str = "AmazonEC2ContainerServiceV20141113.";
/// The content type of the ECS JSON protocol.
const JSON_1_1: &str = "application/x-amz-json-1.1";

/// The running server.
#[derive(Debug)]
pub struct Server {
    server: MockServer,
}

impl Server {
    /// Starts answering for `model`.
    pub async fn start(model: Shared, clock: Arc<Clock>) -> Self {
        let server = MockServer::start().await;
        Mock::given(any())
            .respond_with(Responder { model, clock })
            .mount(&server)
            .await;
        Self { server }
    }

    /// The environment a task needs to find its agent, its metadata and the ECS API.
    #[must_use]
    pub fn env_for(&self, id: &str) -> Vec<(String, String)> {
        let base = format!("{}/tasks/{id}", self.server.uri());
        vec![
            ("ECS_AGENT_URI".to_owned(), format!("{base}/agent")),
            (
                "ECS_CONTAINER_METADATA_URI_V4".to_owned(),
                format!("{base}/metadata"),
            ),
            ("AWS_ENDPOINT_URL_ECS".to_owned(), format!("{base}/ecs")),
        ]
    }

    /// The ECS API endpoint for callers outside the service.
    #[must_use]
    pub fn other_endpoint(&self) -> String {
        format!("{}/other/ecs", self.server.uri())
    }
}

struct Responder {
    model: Shared,
    clock: Arc<Clock>,
}

fn json(status: u16, body: &serde_json::Value) -> ResponseTemplate {
    ResponseTemplate::new(status)
        .insert_header("content-type", "application/json")
        .set_body_json(body)
}

impl Respond for Responder {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let path = request.url.path().to_owned();
        let now = self.clock.now();
        let mut model = self.model.lock();
        let mut parts = path.trim_start_matches('/').splitn(4, '/');
        let (caller, kind, rest) = match (parts.next(), parts.next(), parts.next()) {
            (Some("other"), Some("ecs"), _) => (None, "ecs", ""),
            (Some("tasks"), Some(id), Some(kind)) => {
                (Some(id.to_owned()), kind, parts.next().unwrap_or(""))
            }
            _ => return ResponseTemplate::new(404),
        };
        if let Some(id) = &caller
            && model.task(id).is_none()
        {
            return ResponseTemplate::new(404);
        }
        match (kind, caller.as_deref()) {
            ("agent", Some(id)) if rest == "task-protection/v1/state" => {
                let answer = api::agent::protection(
                    &mut model,
                    id,
                    request.method.as_str(),
                    &request.body,
                    now,
                );
                json(answer.status, &answer.body)
            }
            ("metadata", Some(id)) if rest == "task" => api::agent::task_metadata(&model, id)
                .map_or_else(|| ResponseTemplate::new(404), |m| json(200, &m)),
            ("ecs", caller) => {
                let target = request
                    .headers
                    .get("x-amz-target")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let Some(operation) = target.strip_prefix(TARGET) else {
                    return ecs_error(&api::EcsError {
                        status: 400,
                        code: "UnknownOperationException".to_owned(),
                        message: "no X-Amz-Target".to_owned(),
                    });
                };
                if let ApiFault::Slow(d) = model.fault {
                    if let Some(id) = caller
                        && let Some(t) = model.task_mut(id)
                    {
                        *t.api_calls.entry(operation.to_owned()).or_default() += 1;
                    }
                    return ResponseTemplate::new(500).set_delay(d);
                }
                let body: serde_json::Value =
                    serde_json::from_slice(&request.body).unwrap_or(serde_json::Value::Null);
                let caller = caller.map_or(Caller::Other, Caller::Task);
                match api::ecs(&mut model, caller, operation, &body, now) {
                    Ok(answer) => ResponseTemplate::new(200)
                        .insert_header("content-type", JSON_1_1)
                        .set_body_json(answer),
                    Err(e) => ecs_error(&e),
                }
            }
            _ => ResponseTemplate::new(404),
        }
    }
}

fn ecs_error(e: &api::EcsError) -> ResponseTemplate {
    ResponseTemplate::new(e.status)
        .insert_header("content-type", JSON_1_1)
        .insert_header("x-amzn-errortype", e.code.as_str())
        .set_body_json(e.body())
}
