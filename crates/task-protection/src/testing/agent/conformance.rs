//! The conformance table in the module docs, as rows a test can run.

use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::{AGENT_BUDGET, IDLE_TIMEOUT, REQUEST_ID, Reply};

/// What ECS holds after a row's request. Exhaustive on purpose: a test of the rows
/// handles every kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EcsAfter {
    /// What it held before.
    Unchanged,
    /// No protection.
    Off,
    /// Protection for this many minutes from the request.
    On {
        /// The minutes.
        minutes: u64,
    },
}

/// One row of the conformance table above.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConformanceRow {
    /// `P1`, `R2`, ...
    pub id: String,
    /// The request as the table writes it: `PUT {...}`, `GET`, `DELETE`, `PUT /path`,
    /// or a description (`70 PUTs at once`, `idle 5 s`).
    pub request: String,
    /// What ECS (or the way to it) does.
    pub reply: Reply,
    /// The status; `None` when the connection is closed instead.
    pub status: Option<u16>,
    /// The `Content-Type`, when there is one.
    pub content_type: Option<String>,
    /// The body, with its placeholders.
    pub body: String,
    /// How long after the request the answer comes.
    pub after: Duration,
    /// What ECS holds afterwards.
    pub ecs_after: EcsAfter,
}

impl ConformanceRow {
    /// The body of a `PUT {...}` row's request.
    #[must_use]
    pub fn put_body(&self) -> Option<&str> {
        self.request
            .strip_prefix("PUT ")
            .filter(|body| !body.starts_with('/'))
    }

    /// Checks `actual` against the row's body for the task `arn`, answered at `now`:
    /// `{expiry}` must be an RFC 3339 UTC date with at most three fractional digits,
    /// within two seconds of `now` plus the row's minutes.
    ///
    /// # Errors
    /// What differs.
    pub fn check_body(&self, actual: &str, arn: &str, now: SystemTime) -> Result<(), String> {
        let mut expected = self
            .body
            .replace("{arn}", arn)
            .replace("{request_id}", REQUEST_ID);
        if expected.contains("{expiry}") {
            let EcsAfter::On { minutes } = self.ecs_after else {
                return Err(format!("{}: an expiry but no minutes", self.id));
            };
            let value: Value =
                serde_json::from_str(actual).map_err(|e| format!("{e}: {actual}"))?;
            let date = value["protection"]["ExpirationDate"]
                .as_str()
                .ok_or_else(|| format!("no ExpirationDate in {actual}"))?;
            let fraction = date
                .strip_suffix('Z')
                .ok_or_else(|| format!("{date} is not UTC"))?
                .split_once('.')
                .map_or(0, |(_, f)| f.len());
            if fraction > 3 {
                return Err(format!("{date} has more than milliseconds"));
            }
            let at = crate::backend::answer::parse_rfc3339(date)
                .ok_or_else(|| format!("{date} is not RFC 3339"))?;
            let want = now + Duration::from_secs(minutes * 60);
            let off = at.duration_since(want).unwrap_or_else(|e| e.duration());
            if off > Duration::from_secs(2) {
                return Err(format!("{date} is {off:?} off now + {minutes} min"));
            }
            expected = expected.replace("{expiry}", date);
        }
        if actual == expected {
            Ok(())
        } else {
            Err(format!("{}: expected {expected}\n got {actual}", self.id))
        }
    }
}

/// The rows of the conformance table above.
///
/// # Errors
/// A row the parser cannot read, named.
pub fn conformance() -> Result<Vec<ConformanceRow>, String> {
    include_str!("conformance.md")
        .lines()
        .filter(|line| line.starts_with("| ") && !line.starts_with("| Row"))
        .map(parse_row)
        .collect()
}

fn parse_row(line: &str) -> Result<ConformanceRow, String> {
    let cells: Vec<&str> = line
        .trim_matches('|')
        .split(" | ")
        .map(|c| c.trim().trim_matches('`'))
        .collect();
    let [
        id,
        request,
        reply,
        status,
        content_type,
        body,
        answered,
        ecs_after,
        _source,
    ] = cells.as_slice()
    else {
        return Err(format!("not 9 cells: {line}"));
    };
    let bad = |what: &str| format!("{id}: {what}");
    Ok(ConformanceRow {
        id: (*id).to_owned(),
        request: (*request).to_owned(),
        reply: parse_reply(reply).ok_or_else(|| bad("reply"))?,
        status: match *status {
            "closed" => None,
            s => Some(s.parse().map_err(|_| bad("status"))?),
        },
        content_type: (*content_type != "none").then(|| (*content_type).to_owned()),
        body: match *body {
            "empty" => String::new(),
            b => b.replace("\\n", "\n"),
        },
        after: match *answered {
            "at once" => Duration::ZERO,
            "after 4 s" => AGENT_BUDGET,
            "after 5 s" => IDLE_TIMEOUT,
            _ => return Err(bad("answered")),
        },
        ecs_after: match *ecs_after {
            "unchanged" => EcsAfter::Unchanged,
            "off" => EcsAfter::Off,
            on => {
                let minutes = on
                    .strip_prefix("on for ")
                    .and_then(|m| m.strip_suffix(" min"))
                    .and_then(|m| m.parse().ok())
                    .ok_or_else(|| bad("ECS afterwards"))?;
                EcsAfter::On { minutes }
            }
        },
    })
}

fn parse_reply(text: &str) -> Option<Reply> {
    Some(match text {
        "Ok" => Reply::Ok,
        "Failure(DEPLOYMENT_BLOCKED)" => Reply::Failure("DEPLOYMENT_BLOCKED"),
        "Failure(TASK_NOT_VALID)" => Reply::Failure("TASK_NOT_VALID"),
        "Throttled" => Reply::Throttled,
        "AppliedThenThrottled" => Reply::AppliedThenThrottled,
        "AccessDenied" => Reply::AccessDenied,
        "NoRoleCredentials" => Reply::NoRoleCredentials,
        "UnknownTask" => Reply::UnknownTask,
        "Unapplied500" => Reply::Unapplied500,
        "Unapplied504" => Reply::Unapplied504,
        "AppliedThen504" => Reply::AppliedThen504,
        "AgentLimit" => Reply::AgentLimit,
        "Hang" => Reply::Hang,
        "HangUnapplied" => Reply::HangUnapplied,
        "Refused" => Reply::Refused,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::super::put_answer;
    use super::*;

    /// Every `PUT {...}` row, through the model: the status, content type, body,
    /// timing and what ECS holds, as the table says.
    #[test]
    fn the_model_answers_every_put_row_of_the_table() {
        let rows = conformance().unwrap();
        assert!(rows.len() >= 25, "{}", rows.len());
        let arn = "arn:aws:ecs:us-east-1:123456789012:task/c/0123";
        let now = SystemTime::now();
        let mut checked = 0;
        for row in &rows {
            let Some(body) = row.put_body() else { continue };
            let answer = put_answer(body.as_bytes(), row.reply, Duration::ZERO, arn, now);
            assert_eq!(Some(answer.status), row.status, "{}", row.id);
            assert_eq!(
                answer.content_type,
                row.content_type.as_deref(),
                "{}",
                row.id
            );
            row.check_body(&answer.body, arn, now).unwrap();
            assert_eq!(answer.after, Some(row.after), "{}", row.id);
            let change = match row.ecs_after {
                EcsAfter::Unchanged => None,
                EcsAfter::Off => Some(None),
                EcsAfter::On { minutes } => Some(Some(u32::try_from(minutes).unwrap())),
            };
            assert_eq!(answer.change, change, "{}", row.id);
            checked += 1;
        }
        assert_eq!(checked, 23);
    }
}
