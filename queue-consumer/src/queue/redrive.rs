//! A queue's redrive policy: where SQS moves a message it has delivered too often.

/// The `RedrivePolicy` attribute of a queue: SQS moves a message to the dead-letter
/// queue when a receive finds it already received `max_receive_count` times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedrivePolicy {
    /// The dead-letter queue's ARN (`deadLetterTargetArn`).
    pub dead_letter_target_arn: String,
    /// `maxReceiveCount`: the receives a message may have (Copilot's
    /// `dead_letter.tries`).
    pub max_receive_count: u32,
}

impl RedrivePolicy {
    /// Parses the attribute's JSON, such as
    /// `{"deadLetterTargetArn":"arn:aws:sqs:us-east-1:123456789012:jobs-dlq","maxReceiveCount":5}`
    /// (SQS writes the count as a number, CloudFormation may leave it a string).
    ///
    /// # Errors
    /// What is wrong with it, in words.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let value: serde_json::Value = serde_json::from_str(raw)
            .map_err(|e| format!("the redrive policy {raw:?} is not JSON: {e}"))?;
        let arn = value["deadLetterTargetArn"]
            .as_str()
            .filter(|a| a.starts_with("arn:"))
            .ok_or_else(|| format!("the redrive policy {raw:?} has no deadLetterTargetArn"))?;
        let count = &value["maxReceiveCount"];
        let count = count
            .as_u64()
            .or_else(|| count.as_str().and_then(|s| s.trim().parse().ok()))
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n >= 1)
            .ok_or_else(|| {
                format!("the redrive policy {raw:?} has no maxReceiveCount of 1 or more")
            })?;
        Ok(Self {
            dead_letter_target_arn: arn.to_owned(),
            max_receive_count: count,
        })
    }

    /// The dead-letter queue's URL, on the host of `queue_url`: SQS keeps a queue and
    /// its dead-letter queue in one Region, and a queue's URL is its endpoint, its
    /// account and its name (`https://sqs.us-east-1.amazonaws.com/123456789012/jobs-dlq`).
    #[must_use]
    pub fn dead_letter_url(&self, queue_url: &str) -> Option<String> {
        // arn:aws:sqs:<region>:<account>:<name>
        let parts: Vec<&str> = self.dead_letter_target_arn.split(':').collect();
        let [_, _, "sqs", _, account, name] = parts.as_slice() else {
            return None;
        };
        let (scheme, rest) = queue_url.split_once("://")?;
        let host = rest.split('/').next().filter(|h| !h.is_empty())?;
        Some(format!("{scheme}://{host}/{account}/{name}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_as_sqs_and_cloudformation_write_it() {
        let arn = "arn:aws:sqs:eu-west-3:123456789012:app-env-worker-DeadLetterQueue.fifo";
        for raw in [
            format!(r#"{{"deadLetterTargetArn":"{arn}","maxReceiveCount":5}}"#),
            format!(r#"{{"maxReceiveCount":"5","deadLetterTargetArn":"{arn}"}}"#),
        ] {
            let p = RedrivePolicy::parse(&raw).unwrap();
            assert_eq!(p.max_receive_count, 5);
            assert_eq!(p.dead_letter_target_arn, arn);
        }
        for bad in [
            "",
            "{}",
            r#"{"deadLetterTargetArn":"x","maxReceiveCount":5}"#,
            &format!(r#"{{"deadLetterTargetArn":"{arn}","maxReceiveCount":0}}"#),
            &format!(r#"{{"deadLetterTargetArn":"{arn}"}}"#),
        ] {
            assert!(RedrivePolicy::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_dead_letter_queue_is_on_the_queues_endpoint() {
        let p = RedrivePolicy {
            dead_letter_target_arn: "arn:aws:sqs:us-east-1:123456789012:jobs-dlq.fifo".to_owned(),
            max_receive_count: 3,
        };
        assert_eq!(
            p.dead_letter_url("https://sqs.us-east-1.amazonaws.com/123456789012/jobs.fifo")
                .as_deref(),
            Some("https://sqs.us-east-1.amazonaws.com/123456789012/jobs-dlq.fifo")
        );
        assert_eq!(
            p.dead_letter_url("http://127.0.0.1:5000/123456789012/jobs.fifo")
                .as_deref(),
            Some("http://127.0.0.1:5000/123456789012/jobs-dlq.fifo")
        );
        assert_eq!(p.dead_letter_url("no url"), None);
        let odd = RedrivePolicy {
            dead_letter_target_arn: "arn:aws:sns:us-east-1:1:topic".to_owned(),
            max_receive_count: 3,
        };
        assert_eq!(odd.dead_letter_url("https://sqs.x/1/q"), None);
    }
}
