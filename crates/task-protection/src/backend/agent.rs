//! The ECS agent's task protection endpoint: `$ECS_AGENT_URI/task-protection/v1/state`.
//!
//! The agent (1.65.0 and later, and Fargate's own implementation) forwards each PUT to
//! ECS's `UpdateTaskProtection` and wraps the result. Its answers need care:
//! a 200 can carry a `failure` (a refusal), ECS throttling arrives as a 400 with
//! `Code: "ThrottlingException"`, and the agent's own limiter answers 429 with plain
//! text. So the body is judged together with the status, never the status alone.

use serde::{Deserialize, Serialize};

use super::{
    Backend, Grant, ProtectionError, ProtectionRequest, Rejection, ThrottledBy, classify_error,
    excerpt,
};

/// The most of an answer body that is read; real answers are a few hundred bytes.
const MAX_BODY: usize = 64 * 1024;

/// Sends protection PUTs to the ECS agent.
#[derive(Debug, Clone)]
pub struct AgentBackend {
    client: reqwest::Client,
    url: String,
}

/// The PUT body; field names are PascalCase, and the agent rejects unknown fields.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct PutBody {
    protection_enabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_in_minutes: Option<u16>,
}

#[derive(Deserialize)]
struct Answer {
    protection: Option<Protection>,
    failure: Option<Failure>,
    error: Option<ErrorBody>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Protection {
    expiration_date: Option<String>,
    protection_enabled: bool,
    task_arn: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Failure {
    reason: Option<String>,
    detail: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ErrorBody {
    code: Option<String>,
    message: Option<String>,
}

impl AgentBackend {
    /// A backend for the agent at `agent_uri`, the value of `ECS_AGENT_URI`.
    ///
    /// The agent serves plain `http` on a link-local address
    /// (`http://169.254.170.2/api/<id>`), and this client carries no TLS stack, so
    /// that an agent-only build stays small: an `https` URL is refused here rather
    /// than failing at the first request.
    ///
    /// # Errors
    /// When `agent_uri` is not an absolute `http://` URL.
    pub fn new(agent_uri: &str) -> Result<Self, super::BackendConfigError> {
        let invalid = |reason: String| super::BackendConfigError::Invalid {
            variable: "ECS_AGENT_URI",
            value: agent_uri.to_owned(),
            reason,
        };
        let base = agent_uri.trim().trim_end_matches('/');
        let parsed = reqwest::Url::parse(base).map_err(|e| invalid(e.to_string()))?;
        match parsed.scheme() {
            "http" => {}
            "https" => {
                return Err(invalid(
                    "https is not supported: the ECS agent endpoint is plain http on a \
                     link-local address (http://169.254.170.2/api/...)"
                        .to_owned(),
                ));
            }
            _ => return Err(invalid("expected an http:// URL".to_owned())),
        }
        // Timeouts are the state machine's; a pooled connection to the agent is reused.
        // The agent is link-local: never send it through HTTP_PROXY/HTTPS_PROXY, which
        // task definitions set for outbound traffic.
        let client = reqwest::Client::builder()
            .no_proxy()
            .pool_idle_timeout(std::time::Duration::from_secs(30))
            .build()
            .map_err(|e| invalid(e.to_string()))?;
        Ok(Self {
            client,
            url: format!("{base}/task-protection/v1/state"),
        })
    }

    /// The full URL PUTs go to.
    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
    }

    async fn send(&self, request: ProtectionRequest) -> Result<Grant, ProtectionError> {
        let body = PutBody {
            protection_enabled: request.enabled,
            expires_in_minutes: request.expires_in_minutes,
        };
        let mut response = self
            .client
            .put(&self.url)
            .json(&body)
            .send()
            .await
            .map_err(|e| {
                if e.is_connect() {
                    // Nothing reached the agent, so ECS cannot have acted.
                    ProtectionError::Unreachable(error_chain(&e))
                } else {
                    ProtectionError::Transport(error_chain(&e))
                }
            })?;
        let status = response.status().as_u16();
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| ProtectionError::Transport(error_chain(&e)))?
        {
            let room = MAX_BODY.saturating_sub(bytes.len());
            bytes.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if bytes.len() >= MAX_BODY {
                break;
            }
        }
        classify(status, &bytes)
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Reads an agent answer. Pure, so every answer class is testable without a socket.
pub(crate) fn classify(status: u16, body: &[u8]) -> Result<Grant, ProtectionError> {
    if status == 429 {
        // The agent's own limiter, shared with the task metadata endpoint.
        return Err(ProtectionError::Throttled {
            by: ThrottledBy::Agent,
            message: excerpt(body).trim().to_owned(),
        });
    }
    let answer = serde_json::from_slice::<serde_json::Value>(body)
        .map_err(|_| "not JSON".to_owned())
        .and_then(|v| {
            serde_json::from_value::<Answer>(v).map_err(|e| format!("not an agent answer: {e}"))
        });
    let answer = match answer {
        Ok(answer) => answer,
        Err(_) if status >= 500 => {
            return Err(ProtectionError::Server {
                status,
                code: String::new(),
                message: excerpt(body),
            });
        }
        Err(reason) => return Err(ProtectionError::malformed(status, reason, body)),
    };
    if let Some(error) = answer.error {
        let code = error.code.unwrap_or_default();
        let message = error.message.unwrap_or_default();
        return Err(classify_error(status, code, message));
    }
    if status >= 500 {
        return Err(ProtectionError::Server {
            status,
            code: String::new(),
            message: excerpt(body),
        });
    }
    if let Some(failure) = answer.failure {
        // A 200 that is a refusal: TASK_NOT_VALID, DEPLOYMENT_BLOCKED, ...
        return Err(ProtectionError::Rejected(Rejection {
            reason: failure.reason.unwrap_or_else(|| "UNKNOWN".to_owned()),
            detail: failure.detail,
            status: Some(status),
        }));
    }
    match (status, answer.protection) {
        (200, Some(p)) => {
            let expires_at = match p.expiration_date.as_deref() {
                None | Some("") => None,
                Some(text) => Some(parse_rfc3339(text).ok_or_else(|| {
                    ProtectionError::malformed(status, "ExpirationDate is not RFC 3339", body)
                })?),
            };
            Ok(Grant {
                enabled: p.protection_enabled,
                expires_at,
                task_arn: p.task_arn,
            })
        }
        (200, None) => Err(ProtectionError::malformed(
            status,
            "neither protection nor failure in answer",
            body,
        )),
        _ => Err(ProtectionError::malformed(
            status,
            "unexpected status without an error body",
            body,
        )),
    }
}

/// Reads any RFC 3339 date-time: `Z` or a numeric offset (`+00:00`, `-08:00`, as
/// an agent on a host outside UTC may send), `T`, `t` or a space between date and
/// time, any number of fractional digits, and a leap second (`23:59:60`).
pub(crate) fn parse_rfc3339(text: &str) -> Option<std::time::SystemTime> {
    use time::OffsetDateTime;
    use time::format_description::well_known::Rfc3339;
    let text = text.trim();
    // `time` takes any character between date and time; RFC 3339 names `T` and allows
    // a space, and ECS only ever sends `T`.
    if !matches!(text.as_bytes().get(10), Some(b'T' | b't' | b' ')) {
        return None;
    }
    match OffsetDateTime::parse(text, &Rfc3339) {
        Ok(at) => Some(at.into()),
        // `time` accepts a leap second only where it falls in UTC; a host may write
        // one at the end of its own local day, as 23:59:60 on the last day of a month
        // with its offset. Read it as the last instant of the second before.
        Err(_) if text.get(11..19) == Some("23:59:60") => {
            let mut shifted = text.to_owned();
            shifted.replace_range(17..19, "59");
            let at = OffsetDateTime::parse(&shifted, &Rfc3339).ok()?;
            let last_day = at
                .date()
                .next_day()
                .is_none_or(|next| next.month() != at.month());
            if !last_day {
                return None;
            }
            at.replace_nanosecond(999_999_999).ok().map(Into::into)
        }
        Err(_) => None,
    }
}

impl Backend for AgentBackend {
    async fn update(&self, request: ProtectionRequest) -> Result<Grant, ProtectionError> {
        self.send(request).await
    }

    fn describe(&self) -> String {
        format!("ECS agent at {}", self.url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_body_is_exact_pascal_case() {
        let on = serde_json::to_string(&PutBody {
            protection_enabled: true,
            expires_in_minutes: Some(5),
        })
        .unwrap();
        assert_eq!(on, r#"{"ProtectionEnabled":true,"ExpiresInMinutes":5}"#);
        let off = serde_json::to_string(&PutBody {
            protection_enabled: false,
            expires_in_minutes: None,
        })
        .unwrap();
        assert_eq!(off, r#"{"ProtectionEnabled":false}"#);
    }

    #[test]
    fn success_with_and_without_expiry() {
        let g = classify(
            200,
            br#"{"protection":{"ExpirationDate":"2022-10-06T02:29:16Z","ProtectionEnabled":true,"TaskArn":"arn:aws:ecs:us-east-1:1:task/c/abc"}}"#,
        )
        .unwrap();
        assert!(g.enabled);
        let secs = g
            .expires_at
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert_eq!(secs, 1_665_023_356);
        let g = classify(
            200,
            br#"{"protection":{"ExpirationDate":null,"ProtectionEnabled":false,"TaskArn":"arn"}}"#,
        )
        .unwrap();
        assert!(!g.enabled && g.expires_at.is_none());
    }

    #[test]
    fn expiration_dates_in_every_rfc3339_form() {
        let epoch = |t: &str| {
            parse_rfc3339(t)
                .unwrap_or_else(|| panic!("{t} refused"))
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs_f64()
        };
        let z = epoch("2022-10-06T02:29:16Z");
        assert_eq!(z, 1_665_023_356.0);
        assert_eq!(epoch("2022-10-06T02:29:16+00:00"), z);
        assert_eq!(epoch("2022-10-05T18:29:16-08:00"), z);
        assert_eq!(epoch("2022-10-06T08:29:16+06:00"), z);
        assert_eq!(epoch("2022-10-06t02:29:16z"), z);
        assert_eq!(epoch("2022-10-06 02:29:16Z"), z);
        assert!((epoch("2022-10-06T02:29:16.250+00:00") - (z + 0.25)).abs() < 1e-6);
        assert!((epoch("2022-10-06T02:29:16.123456789Z") - (z + 0.123_456_789)).abs() < 1e-6);
        // Digits past the nanosecond are read and dropped.
        assert!((epoch("2022-10-06T02:29:16.1234567891234Z") - (z + 0.123_456_789)).abs() < 1e-6);
        assert_eq!(epoch("2022-10-06T02:29:16-00:00"), z);
        assert_eq!(epoch(" 2022-10-06T02:29:16Z\n"), z);
        assert_eq!(epoch("2022-10-06T16:29:16+14:00"), z);
        assert_eq!(epoch("2022-10-05T02:30:16-23:59"), z);
        assert_eq!(epoch("2024-02-29T00:00:00Z"), 1_709_164_800.0);
        // A leap second, read as the last instant of the second before: in UTC, at
        // the end of a month in local time (as the old parser read it), and at the
        // end of a UTC month written in local time.
        let new_year = 1_672_531_200.0;
        assert!((epoch("2022-12-31T23:59:60Z") - new_year).abs() < 1e-6);
        assert!((epoch("2022-12-31T23:59:60.5Z") - new_year).abs() < 1e-6);
        assert!((epoch("2022-12-31T23:59:60-08:00") - (new_year + 8.0 * 3600.0)).abs() < 1e-6);
        assert!((epoch("2022-12-31T15:59:60-08:00") - new_year).abs() < 1e-6);
        assert!((epoch("2024-02-29T23:59:60+01:00") - 1_709_247_600.0).abs() < 1e-6);
        for bad in [
            "",
            "yesterday",
            "2022-10-06T02:29:16",
            "2022-10-06T02:29:16+0000",
            "2022-10-06T02:29:16+24:00",
            "2022-10-06T02:29:16+05:60",
            "2022-10-06T02:29:16*05:00",
            "2022-10-06X02:29:16Z",
            "2022-13-06T02:29:16Z",
            "\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}",
            "2022-10-06_02:29:16Z",
            "2022-10-0602:29:16Z",
            "2022-10-06T02:29:16 Z",
            "2022-10-06T02:29:16ZZ",
            "2022-10-06T02:29:16Z trailing",
            "2022-10-06T02:29:16.Z",
            "2022-10-06T02:29:16,5Z",
            "2022-10-06T02:29:16.5a",
            "2022-10-06T02:29Z",
            "2022-10-06T2:29:16Z",
            "22-10-06T02:29:16Z",
            "2022-1-06T02:29:16Z",
            "2022/10/06T02:29:16Z",
            "2022-10-06T02:29:16+05",
            "2022-10-06T02:29:16+5:00",
            "2022-10-06T02:29:16+05:00:00",
            "2022-10-06T02:29:16UTC",
            "2022-00-06T02:29:16Z",
            "2022-10-00T02:29:16Z",
            "2022-02-29T02:29:16Z",
            "2022-04-31T02:29:16Z",
            "2022-10-06T24:00:00Z",
            "2022-10-06T02:60:16Z",
            "2022-10-06T02:29:61Z",
            // Leap seconds anywhere but the end of a day that ends a month.
            "2022-10-06T02:29:60Z",
            "2022-10-06T23:59:60Z",
            "2022-12-31T23:58:60Z",
            "2022-12-31T15:59:60Z",
        ] {
            assert!(parse_rfc3339(bad).is_none(), "{bad:?} accepted");
        }
        // What this crate writes reads back as itself.
        let t = std::time::UNIX_EPOCH + std::time::Duration::new(1_665_023_356, 123_456_000);
        assert_eq!(parse_rfc3339(&crate::rfc3339(t)), Some(t));
        // Through the whole answer, as the agent sends it.
        let g = classify(
            200,
            br#"{"protection":{"ExpirationDate":"2022-10-05T18:29:16-08:00","ProtectionEnabled":true,"TaskArn":"arn"}}"#,
        )
        .unwrap();
        assert_eq!(g.expires_at, parse_rfc3339("2022-10-06T02:29:16Z"));
    }

    #[test]
    fn failure_in_a_200_is_a_rejection() {
        let e = classify(
            200,
            br#"{"failure":{"Arn":"arn","Detail":null,"Reason":"DEPLOYMENT_BLOCKED"}}"#,
        )
        .unwrap_err();
        assert!(matches!(&e, ProtectionError::Rejected(r) if r.reason == "DEPLOYMENT_BLOCKED"));
        assert!(!e.is_transient());
    }

    #[test]
    fn garbage_quotes_an_excerpt() {
        let e = classify(200, b"<html>oops</html>").unwrap_err();
        assert!(e.to_string().contains("<html>oops</html>"), "{e}");
        let long = vec![b'x'; 10_000];
        let e = classify(200, &long).unwrap_err();
        assert!(e.to_string().len() < 400);
        let e = classify(
            200,
            br#"{"protection":{"ExpirationDate":"yesterday","ProtectionEnabled":true}}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("yesterday"), "{e}");
    }
}
