//! Reading the ECS agent's answers to a protection PUT. Pure, so that every answer
//! class is tested without a socket, and shared by [`AgentBackend`] and the scripted
//! agent of [`testing`](crate::testing), which must read answers exactly alike.
//!
//! The agent (1.65.0 and later, and Fargate's own implementation) forwards each PUT to
//! ECS's `UpdateTaskProtection` and wraps the result
//! (`ecs-agent/tmds/handlers/taskprotection/v1/handlers/handlers.go`). Its answers
//! need care: a 200 can carry a `failure` (a refusal), ECS throttling arrives as a
//! 400 with `Code: "ThrottlingException"` after the agent's SDK has retried, the
//! agent's own limiter answers 429 with plain text, and a wrong path gets its
//! router's plain-text 404 or 405. So the body is judged together with the status,
//! never the status alone.
//!
//! [`AgentBackend`]: crate::AgentBackend

use serde::Deserialize;

use super::{Grant, ProtectionError, Rejection, ThrottledBy, classify_error, excerpt};

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

/// Where an answer came from, for the error that says the URL is wrong.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Endpoint<'a> {
    /// The URL the PUT went to.
    pub(crate) url: &'a str,
    /// Where the agent URI came from: `ECS_AGENT_URI`, or the call that set it.
    pub(crate) setting: &'static str,
}

/// Reads an agent answer: its status and body.
pub(crate) fn classify(
    status: u16,
    body: &[u8],
    endpoint: Endpoint<'_>,
) -> Result<Grant, ProtectionError> {
    if status == 429 {
        // The agent's own limiter (tollbooth, in front of every route): ECS was not
        // called.
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
        // Every answer of the protection handler is JSON; the router answers a path
        // it does not know with a plain-text 404, a method it does not serve there
        // with an empty 405, and a path it would clean with a 301.
        Err(_) if (300..500).contains(&status) => {
            return Err(ProtectionError::Misdirected {
                url: endpoint.url.to_owned(),
                setting: endpoint.setting,
                status,
                excerpt: excerpt(body).trim_end().to_owned(),
            });
        }
        Err(reason) => return Err(ProtectionError::malformed(status, reason, body)),
    };
    if let Some(error) = answer.error {
        let code = error.code.unwrap_or_default();
        let message = error.message.unwrap_or_default();
        return Err(classify_error(
            status,
            code,
            message,
            ThrottledBy::EcsThroughAgent,
        ));
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
        let mut rejection = Rejection::new(failure.reason.unwrap_or_else(|| "UNKNOWN".to_owned()))
            .with_status(status);
        if let Some(detail) = failure.detail {
            rejection = rejection.with_detail(detail);
        }
        return Err(ProtectionError::Rejected(rejection));
    }
    match (status, answer.protection) {
        (200, Some(p)) => {
            let expires_at = match p.expiration_date.as_deref() {
                None | Some("") => None,
                Some(text) => Some(parse_rfc3339(text).ok_or_else(|| {
                    ProtectionError::malformed(status, "ExpirationDate is not RFC 3339", body)
                })?),
            };
            let grant = match (p.protection_enabled, expires_at) {
                (true, Some(at)) => Grant::protected_until(at),
                (true, None) => Grant::protected(),
                (false, _) => Grant::unprotected(),
            };
            Ok(match p.task_arn {
                Some(arn) => grant.with_task_arn(arn),
                None => grant,
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

#[cfg(test)]
mod tests {
    use super::*;

    const ENDPOINT: Endpoint<'static> = Endpoint {
        url: "http://169.254.170.2/api/x/task-protection/v1/state",
        setting: "ECS_AGENT_URI",
    };

    #[test]
    fn success_with_and_without_expiry() {
        let g = classify(
            200,
            br#"{"protection":{"ExpirationDate":"2022-10-06T02:29:16Z","ProtectionEnabled":true,"TaskArn":"arn:aws:ecs:us-east-1:1:task/c/abc"}}"#,
            ENDPOINT,
        )
        .unwrap();
        assert!(g.is_enabled());
        let secs = g
            .expires_at()
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert_eq!(secs, 1_665_023_356);
        let g = classify(
            200,
            br#"{"protection":{"ExpirationDate":null,"ProtectionEnabled":false,"TaskArn":"arn"}}"#,
            ENDPOINT,
        )
        .unwrap();
        assert!(!g.is_enabled() && g.expires_at().is_none());
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
            ENDPOINT,
        )
        .unwrap();
        assert_eq!(g.expires_at(), parse_rfc3339("2022-10-06T02:29:16Z"));
    }

    #[test]
    fn failure_in_a_200_is_a_rejection() {
        let e = classify(
            200,
            br#"{"failure":{"Arn":"arn","Detail":null,"Reason":"DEPLOYMENT_BLOCKED"}}"#,
            ENDPOINT,
        )
        .unwrap_err();
        assert!(matches!(&e, ProtectionError::Rejected(r) if r.reason() == "DEPLOYMENT_BLOCKED"));
        assert!(!e.is_transient());
    }

    #[test]
    fn garbage_quotes_an_excerpt() {
        let e = classify(200, b"<html>oops</html>", ENDPOINT).unwrap_err();
        assert!(e.to_string().contains("<html>oops</html>"), "{e}");
        let long = vec![b'x'; 10_000];
        let e = classify(200, &long, ENDPOINT).unwrap_err();
        assert!(e.to_string().len() < 400);
        let e = classify(
            200,
            br#"{"protection":{"ExpirationDate":"yesterday","ProtectionEnabled":true}}"#,
            ENDPOINT,
        )
        .unwrap_err();
        assert!(e.to_string().contains("yesterday"), "{e}");
    }
}
