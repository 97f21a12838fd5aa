//! The ECS agent's task protection endpoint, as its source shows it: what it answers
//! to each request, and when. [`ScriptedEcs`](super::ScriptedEcs) answers through
//! this model, and so can a test agent on a socket (this repository's wiremock agent
//! does): both then answer exactly alike, and exactly as the agent.
//!
//! The rows below are the model, each with the part of the agent's source (amazon-ecs-agent,
//! `agent/handlers/task_server_setup.go`, `ecs-agent/tmds/server.go`,
//! `ecs-agent/tmds/handlers/taskprotection/v1/handlers/handlers.go` and what they
//! vendor) that does it. The table is also a test: this repository's end-to-end
//! suite sends each row's request to its wiremock agent and checks the status, the
//! content type and the body, and this crate's tests check [`put_answer`] against
//! the rows it covers. In bodies, `{arn}` is the task ARN, `{request_id}` ECS's
//! request ID, and `{expiry}` now plus the minutes asked, in RFC 3339 UTC to the
//! millisecond. In requests, `PUT {...}` is a PUT on the protection path with that
//! body, and `{id}` the endpoint's container id.
#![doc = include_str!("conformance.md")]

mod conformance;
mod router;

pub use conformance::{ConformanceRow, EcsAfter, conformance};
pub use router::{Limiter, Route, route, router_answer};

use std::time::{Duration, SystemTime};

use serde_json::{Map, Value, json};

/// How long the agent waits for ECS: its call is cancelled after this
/// (`ecsCallTimeout`), and it answers 504 `RequestCanceled`.
pub const AGENT_BUDGET: Duration = Duration::from_secs(4);
/// The agent's server drops a response not written this long after the request was
/// read (`writeTimeout`), and closes a keep-alive connection idle this long (Go's
/// `IdleTimeout` falls back to `ReadTimeout`, also 5 s).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// See [`WRITE_TIMEOUT`].
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// The agent's limiter: this many requests a second per source address and path
/// (`DefaultTaskMetadataSteadyStateRate`)...
pub const RATE_PER_SECOND: f64 = 40.0;
/// ...with bursts of this many (`DefaultTaskMetadataBurstRate`).
pub const BURST: f64 = 60.0;
/// The limiter's answer (tollbooth's default message), with HTTP 429.
pub const LIMIT_MESSAGE: &str = "You have reached maximum request limit.";
/// The content type of the limiter's answer and of the router's 404.
pub const TEXT_PLAIN: &str = "text/plain; charset=utf-8";
/// The content type of every answer of the protection handler.
pub const APPLICATION_JSON: &str = "application/json";
/// Go's `http.NotFound` body, for a path no route matches.
pub const NOT_FOUND_BODY: &str = "404 page not found\n";
/// The request ID the model puts in ECS's errors (ECS's are UUIDs).
pub const REQUEST_ID: &str = "0f2d7a6e-5a1c-4b7e-9a51-3c6f2b1d8e47";
/// The path of the protection endpoint under `ECS_AGENT_URI`.
pub const STATE_PATH: &str = "/task-protection/v1/state";

/// What happens to one PUT beyond the agent's own checks: what ECS does with the
/// agent's `UpdateTaskProtection` call, or what goes wrong on the way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reply {
    /// ECS applies the request and confirms it: 200 with `protection`.
    Ok,
    /// ECS refuses with this reason (`DEPLOYMENT_BLOCKED`, `TASK_NOT_VALID`): 200
    /// with `failure`, nothing applied.
    Failure(&'static str),
    /// ECS throttles every try of the agent's SDK: 400 `ThrottlingException`,
    /// nothing applied.
    Throttled,
    /// The agent's SDK retries inside its budget: a first try was applied and its
    /// answer lost, a later one throttled. 400 `ThrottlingException`, applied.
    AppliedThenThrottled,
    /// The task role may not call `UpdateTaskProtection`: ECS's 400
    /// `AccessDeniedException`, nothing applied.
    AccessDenied,
    /// The task has no role credentials (none configured, or the task has stopped
    /// and they are gone): the agent's own 403 `AccessDeniedException`.
    NoRoleCredentials,
    /// The agent does not know the task (its container is gone): 404
    /// `ResourceNotFoundException`.
    UnknownTask,
    /// ECS fails without applying: 500 `ServerException`.
    Unapplied500,
    /// ECS does not answer within the agent's budget and never applies: 504
    /// `RequestCanceled`, [`AGENT_BUDGET`] after the request arrived.
    Unapplied504,
    /// ECS applies the request but does not answer within the agent's budget: 504
    /// `RequestCanceled`, [`AGENT_BUDGET`] after the request arrived.
    AppliedThen504,
    /// The agent's limiter refuses the request (the task's other containers share
    /// its budget): 429, text/plain, nothing applied.
    AgentLimit,
    /// The agent process stalls (a starved host): ECS applies the request, and no
    /// answer ever comes; the client's timeout ends the wait. A healthy agent never
    /// does this (its server closes the connection at its write timeout).
    Hang,
    /// The same, nothing applied.
    HangUnapplied,
    /// Nothing listens at the agent's address: the connection is refused and
    /// nothing is sent.
    Refused,
}

impl Reply {
    /// Whether ECS applies a request answered this way (once the agent's own checks
    /// have passed).
    #[must_use]
    pub fn applies(self) -> bool {
        matches!(
            self,
            Self::Ok | Self::AppliedThenThrottled | Self::AppliedThen504 | Self::Hang
        )
    }
}

/// The agent's answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentAnswer {
    /// The HTTP status.
    pub status: u16,
    /// The `Content-Type`, when the answer has one (an empty 405 has none).
    pub content_type: Option<&'static str>,
    /// The body.
    pub body: String,
    /// How long after the request arrived the answer is written; `None`: never.
    pub after: Option<Duration>,
    /// Whether ECS applies the request.
    pub applied: bool,
    /// The protection ECS holds after the request, when it applied it: `Some(None)`
    /// for off, `Some(Some(minutes))` for on that long.
    pub change: Option<Option<u32>>,
}

impl AgentAnswer {
    fn json(status: u16, body: &Value, after: Duration) -> Self {
        Self {
            status,
            content_type: Some(APPLICATION_JSON),
            body: body.to_string(),
            after: Some(after),
            applied: false,
            change: None,
        }
    }
}

/// `t` in RFC 3339, UTC, to the millisecond with trailing zeros left out, as Go
/// writes the `ExpirationDate` that the agent's SDK read from ECS's epoch seconds
/// (`smithy-go` keeps milliseconds; `time.Time` marshals as RFC 3339 with nanoseconds,
/// trimmed).
#[must_use]
pub fn expiration_date(t: SystemTime) -> String {
    let millis = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    crate::rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(millis))
}

/// A JSON string, as Go writes it (no HTML in these texts, so no `\u003c`).
fn quoted(text: &str) -> String {
    Value::from(text).to_string()
}

/// An error body in the field order of the agent's Go types
/// (`TaskProtectionResponse`: `requestID`, then `error`; `ErrorResponse`: `Arn`,
/// left out when empty, `Code`, `Message`).
fn error_body(request_id: Option<&str>, arn: &str, code: &str, message: &str) -> String {
    let request_id =
        request_id.map_or(String::new(), |id| format!("\"requestID\":{},", quoted(id)));
    let arn = if arn.is_empty() {
        String::new()
    } else {
        format!("\"Arn\":{},", quoted(arn))
    };
    format!(
        "{{{request_id}\"error\":{{{arn}\"Code\":{},\"Message\":{}}}}}",
        quoted(code),
        quoted(message)
    )
}

fn ecs_error(status: u16, code: &str, message: &str, arn: &str, after: Duration) -> AgentAnswer {
    AgentAnswer {
        status,
        content_type: Some(APPLICATION_JSON),
        body: error_body(Some(REQUEST_ID), arn, code, message),
        after: Some(after),
        applied: false,
        change: None,
    }
}

fn agent_error(status: u16, code: &str, message: &str, arn: &str) -> AgentAnswer {
    AgentAnswer {
        status,
        content_type: Some(APPLICATION_JSON),
        body: error_body(None, arn, code, message),
        after: Some(Duration::ZERO),
        applied: false,
        change: None,
    }
}

/// The request body as the agent's decoder reads it: `Some(enabled, minutes)` or
/// `None` when it cannot be decoded. Go's `encoding/json` with
/// `DisallowUnknownFields`: the first JSON value of the body, an object (or `null`),
/// field names matched without regard to case, the last of a repeated name kept,
/// `ProtectionEnabled` a boolean or null, `ExpiresInMinutes` a whole number that
/// fits in 64 bits, or null.
fn decode(body: &[u8]) -> Option<(Option<bool>, Option<i64>)> {
    let value = serde_json::Deserializer::from_slice(body)
        .into_iter::<Value>()
        .next()?
        .ok()?;
    let fields = match value {
        Value::Null => return Some((None, None)),
        Value::Object(fields) => fields,
        _ => return None,
    };
    decode_fields(&fields)
}

fn decode_fields(fields: &Map<String, Value>) -> Option<(Option<bool>, Option<i64>)> {
    let (mut enabled, mut minutes) = (None, None);
    for (name, value) in fields {
        if name.eq_ignore_ascii_case("ProtectionEnabled") {
            enabled = match value {
                Value::Null => enabled,
                Value::Bool(b) => Some(*b),
                _ => return None,
            };
        } else if name.eq_ignore_ascii_case("ExpiresInMinutes") {
            minutes = match value {
                Value::Null => minutes,
                Value::Number(n) if !n.to_string().contains(['.', 'e', 'E']) => Some(n.as_i64()?),
                _ => return None,
            };
        } else {
            return None;
        }
    }
    Some((enabled, minutes))
}

/// The agent's answer to `PUT $ECS_AGENT_URI/task-protection/v1/state` with `body`,
/// when ECS (or the way to it) does as `reply` says, ECS takes `latency` to answer
/// the agent, and the time is `now`.
#[must_use]
pub fn put_answer(
    body: &[u8],
    reply: Reply,
    latency: Duration,
    task_arn: &str,
    now: SystemTime,
) -> AgentAnswer {
    if reply == Reply::AgentLimit {
        return limited();
    }
    let Some((enabled, minutes)) = decode(body) else {
        return agent_error(
            400,
            "InvalidParameterException",
            "UpdateTaskProtection: failed to decode request",
            "",
        );
    };
    if reply == Reply::UnknownTask {
        return agent_error(
            404,
            "ResourceNotFoundException",
            "Failed to find a task for the request",
            "",
        );
    }
    let Some(enabled) = enabled else {
        return agent_error(
            400,
            "InvalidParameterException",
            "Invalid request: does not contain 'ProtectionEnabled' field",
            task_arn,
        );
    };
    if reply == Reply::NoRoleCredentials {
        return agent_error(
            403,
            "AccessDeniedException",
            "Invalid Request: no task IAM role credentials available for task",
            task_arn,
        );
    }
    // The agent passes the minutes on as an int32, cutting the high bits; ECS checks
    // the range.
    #[allow(clippy::cast_possible_truncation)]
    let minutes = minutes.map(|m| m as i32);
    let timed_out = |reply| {
        let mut answer = agent_error(
            504,
            "RequestCanceled",
            "Timed out calling ECS Task Protection API",
            task_arn,
        );
        answer.after = Some(AGENT_BUDGET);
        applied_as(answer, reply, enabled, minutes)
    };
    if latency >= AGENT_BUDGET {
        return timed_out(reply);
    }
    if let Some(m) = minutes
        && !(1..=2880).contains(&m)
    {
        return ecs_error(
            400,
            "InvalidParameterException",
            "Invalid expiresInMinutes: it must be between 1 and 2880 minutes.",
            task_arn,
            latency,
        );
    }
    if matches!(reply, Reply::Unapplied504 | Reply::AppliedThen504) {
        return timed_out(reply);
    }
    let answer = match reply {
        Reply::Ok => {
            let minutes = minutes.map_or(120, i64::from);
            let expiry = enabled.then(|| {
                let secs = u64::try_from(minutes).unwrap_or(0) * 60;
                expiration_date(now + Duration::from_secs(secs))
            });
            AgentAnswer::json(
                200,
                &json!({"protection": {
                    "ExpirationDate": expiry,
                    "ProtectionEnabled": enabled,
                    "TaskArn": task_arn
                }}),
                latency,
            )
        }
        Reply::Failure(reason) => AgentAnswer::json(
            200,
            &json!({"failure": {"Arn": task_arn, "Detail": null, "Reason": reason}}),
            latency,
        ),
        Reply::Throttled | Reply::AppliedThenThrottled => ecs_error(
            400,
            "ThrottlingException",
            "Rate exceeded",
            task_arn,
            latency,
        ),
        Reply::AccessDenied => ecs_error(
            400,
            "AccessDeniedException",
            "User: arn:aws:sts::123456789012:assumed-role/task-role/0123456789abcdef is not \
             authorized to perform: ecs:UpdateTaskProtection on resource: the task because no \
             identity-based policy allows the ecs:UpdateTaskProtection action",
            task_arn,
            latency,
        ),
        Reply::Unapplied500 => ecs_error(
            500,
            "ServerException",
            "Service unavailable. Try again later.",
            task_arn,
            latency,
        ),
        Reply::Hang | Reply::HangUnapplied => AgentAnswer {
            status: 0,
            content_type: None,
            body: String::new(),
            after: None,
            applied: false,
            change: None,
        },
        // Not answers of the agent; handled above, or before a request is sent.
        Reply::Refused
        | Reply::AgentLimit
        | Reply::UnknownTask
        | Reply::NoRoleCredentials
        | Reply::Unapplied504
        | Reply::AppliedThen504 => AgentAnswer::json(0, &Value::Null, Duration::ZERO),
    };
    applied_as(answer, reply, enabled, minutes)
}

fn applied_as(
    mut answer: AgentAnswer,
    reply: Reply,
    enabled: bool,
    minutes: Option<i32>,
) -> AgentAnswer {
    if reply.applies() {
        answer.applied = true;
        answer.change =
            Some(enabled.then(|| minutes.map_or(120, |m| u32::try_from(m).unwrap_or(120))));
    }
    answer
}

/// The limiter's answer: 429, text/plain.
#[must_use]
pub fn limited() -> AgentAnswer {
    AgentAnswer {
        status: 429,
        content_type: Some(TEXT_PLAIN),
        body: LIMIT_MESSAGE.to_owned(),
        after: Some(Duration::ZERO),
        applied: false,
        change: None,
    }
}

/// The agent's answer to `GET` on the protection path: ECS's `GetTaskProtection`,
/// a live call each time, for a task protected until `expiry` (or not).
#[must_use]
pub fn get_answer(expiry: Option<SystemTime>, task_arn: &str, latency: Duration) -> AgentAnswer {
    AgentAnswer::json(
        200,
        &json!({"protection": {
            "ExpirationDate": expiry.map(expiration_date),
            "ProtectionEnabled": expiry.is_some(),
            "TaskArn": task_arn
        }}),
        latency,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_decoder_is_go_s() {
        assert_eq!(
            decode(br#"{"ProtectionEnabled":true}"#),
            Some((Some(true), None))
        );
        assert_eq!(
            decode(br#"{"protectionenabled":false,"EXPIRESINMINUTES":5}"#),
            Some((Some(false), Some(5)))
        );
        assert_eq!(decode(b"null"), Some((None, None)));
        assert_eq!(
            decode(br#"{"ProtectionEnabled":true} trailing"#),
            Some((Some(true), None))
        );
        for bad in [
            &b""[..],
            b"{",
            b"[]",
            b"true",
            br#"{"ProtectionEnabled":"yes"}"#,
            br#"{"ProtectionEnabled":true,"ExpiresInMinutes":5.0}"#,
            br#"{"ProtectionEnabled":true,"ExpiresInMinutes":"5"}"#,
            br#"{"ProtectionEnabled":true,"Extra":1}"#,
        ] {
            assert_eq!(decode(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn expiration_dates_keep_milliseconds() {
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_665_023_356, 123_456_789);
        assert_eq!(expiration_date(t), "2022-10-06T02:29:16.123Z");
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_665_023_356, 0);
        assert_eq!(expiration_date(t), "2022-10-06T02:29:16Z");
    }
}
