//! The worker's settings: command-line arguments, each also read from its environment
//! variable, parsed once at the edge into [`WorkerSettings`].
//!
//! Copilot configures a Worker Service through environment variables
//! (`COPILOT_QUEUE_URI` among them), so every setting has one; the flags exist for
//! running it by hand. Each value is checked against the range SQS accepts, so a bad
//! value stops the worker at start-up with one line that names the variable.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Parser;
use task_protection::ProtectionSettings;
use task_protection::cli::{DrainArgs, LogFormat, MetricsArgs, ProtectionArgs, ranged};

/// SQS's limit on `WaitTimeSeconds`.
pub const MAX_WAIT_SECONDS: u64 = 20;
/// SQS's limit on a visibility timeout, and on a message's total time in flight: 12 h.
pub const MAX_VISIBILITY_SECONDS: u64 = 43_200;
/// Kept back from SQS's 12 h in-flight limit when bounding `MAX_JOB_MS`: the time to
/// receive, protect and settle the message, and the heartbeat's own margin, with room
/// to spare.
pub const MAX_JOB_MARGIN_SECONDS: u64 = 15 * 60;
/// The longest job accepted: 11 h 45 min. SQS cannot keep a message in flight longer
/// than 12 h after its receipt; a job that ran past that would be delivered again
/// while still running.
pub const MAX_JOB_MS_LIMIT: u64 = (MAX_VISIBILITY_SECONDS - MAX_JOB_MARGIN_SECONDS) * 1000;
/// Most jobs one worker runs at once.
pub const MAX_CONCURRENCY: u64 = 1000;
/// The longest `JOB_TIMEOUT_SECONDS`: 11 h 45 min, as `MAX_JOB_MS`.
pub const MAX_JOB_TIMEOUT_SECONDS: u64 = MAX_JOB_MS_LIMIT / 1000;
/// The largest weight of a queue in `QUEUE_WEIGHTS`.
pub const MAX_WEIGHT: u32 = 100;
/// How long receives may fail in a row before the worker is unhealthy: three long
/// polls, and three of the longest waits between failed receives.
pub const UNHEALTHY_AFTER: Duration = Duration::from_secs(60);
/// How long a message may wait for task protection that cannot be had (the agent
/// unreachable, ECS failing) before the worker is unhealthy: ten acquire timeouts.
/// Meanwhile it receives nothing and keeps the message; a replaced task hands it back.
pub const PROTECTION_UNHEALTHY_AFTER: Duration = Duration::from_secs(300);
/// The name of `COPILOT_QUEUE_URI`'s queue in `QUEUE_WEIGHTS`.
pub const DEFAULT_QUEUE: &str = "default";
/// The longest shutdown grace period accepted.
pub const MAX_GRACE_SECONDS: u64 = 3600;

/// The settings of `queue-consumer`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "queue-consumer",
    version,
    about = "Works jobs from an SQS queue, protecting its ECS task from scale-in only while it holds work",
    long_about = None,
    after_help = "`queue-consumer healthcheck` asks a running worker's /healthz on HEALTH_PORT and exits 0 when it is healthy, 1 otherwise: a container health check without curl.",
)]
pub struct Config {
    /// URL of the SQS queue to work; Copilot sets it for a Worker Service
    #[arg(long, env = "COPILOT_QUEUE_URI", value_name = "URL", value_parser = parse_queue_url)]
    pub queue_url: String,

    /// Topic-specific queues to work as well, a JSON map from name to queue URL;
    /// Copilot sets it when a subscribed topic has `queue: true` in the manifest
    #[arg(long, env = "COPILOT_TOPIC_QUEUE_URIS", value_name = "JSON", value_parser = parse_topic_queue_uris)]
    pub topic_queue_uris: Option<TopicQueues>,

    /// AWS Region of the queue [default: the Region in the queue URL, then the
    /// standard AWS variables]
    #[arg(long, env = "QUEUE_REGION", value_name = "REGION")]
    pub queue_region: Option<String>,

    /// How many jobs run at once (1..=1000)
    #[arg(long, env = "WORKER_CONCURRENCY", value_name = "N", default_value = "1",
          value_parser = ranged("WORKER_CONCURRENCY", 1, MAX_CONCURRENCY, ""))]
    pub worker_concurrency: u64,

    /// Long-poll wait of each receive, in seconds; 0 polls briefly, once a second
    /// while the queue is empty (0..=20)
    #[arg(long, env = "QUEUE_WAIT_SECONDS", value_name = "SECONDS", default_value = "20",
          value_parser = ranged("QUEUE_WAIT_SECONDS", 0, MAX_WAIT_SECONDS, "seconds"))]
    pub queue_wait_seconds: u64,

    /// How long a received message stays invisible to other workers, in seconds; a
    /// running job's message is extended before it lapses (1..=43200)
    #[arg(long, env = "VISIBILITY_TIMEOUT_SECONDS", value_name = "SECONDS", default_value = "30",
          value_parser = ranged("VISIBILITY_TIMEOUT_SECONDS", 1, MAX_VISIBILITY_SECONDS, "seconds"))]
    pub visibility_timeout_seconds: u64,

    /// Longest job accepted, in ms; a longer body is rejected as bad input. At most
    /// 11 h 45 min: SQS keeps a message in flight at most 12 h from its receipt, and
    /// 15 min are kept for protection, the delete and margin (0..=42300000)
    #[arg(long, env = "MAX_JOB_MS", value_name = "MS", default_value = "3600000",
          value_parser = ranged("MAX_JOB_MS", 0, MAX_JOB_MS_LIMIT, "ms"))]
    pub max_job_ms: u64,

    /// After SIGTERM, how long running jobs may still take before their messages are
    /// handed back, in seconds; a second SIGTERM or ctrl-c ends it at once. Keep it 9 s
    /// below the task's stop timeout: 3 s for the last deletes and hand-backs, and up
    /// to 6 s to release protection (0..=3600)
    #[arg(long, env = "SHUTDOWN_GRACE_SECONDS", value_name = "SECONDS", default_value = "25",
          value_parser = ranged("SHUTDOWN_GRACE_SECONDS", 0, MAX_GRACE_SECONDS, "seconds"))]
    pub shutdown_grace_seconds: u64,

    /// Longest a job may run, in seconds, before it is stopped and its message retried
    /// with backoff like a failure; unset: no limit (1..=42300)
    #[arg(long, env = "JOB_TIMEOUT_SECONDS", value_name = "SECONDS",
          value_parser = ranged("JOB_TIMEOUT_SECONDS", 1, MAX_JOB_TIMEOUT_SECONDS, "seconds"))]
    pub job_timeout_seconds: Option<u64>,

    /// Weights of the queues when several have work, as name=weight pairs separated by
    /// commas: the topic queues by their names in COPILOT_TOPIC_QUEUE_URIS, and
    /// COPILOT_QUEUE_URI's queue as `default`; each weight a whole number from 1 to
    /// 100, each unnamed queue weighing 1
    #[arg(long, env = "QUEUE_WEIGHTS", value_name = "NAME=WEIGHT,...", value_parser = parse_queue_weights)]
    pub queue_weights: Option<QueueWeights>,

    /// On a FIFO queue, what becomes of a message that fails its last try (the queue's
    /// maxReceiveCount, counting each run) while later messages of its group wait:
    /// `dead-letter` moves it to the dead-letter queue alone and works the rest of the
    /// group; `stop-group` leaves it to SQS's redrive, which stops the group and moves
    /// its later messages with it
    #[arg(long, env = "FIFO_POISON_HEAD", value_enum, default_value_t = PoisonHead::DeadLetter)]
    pub fifo_poison_head: PoisonHead,

    /// Port of the health endpoint, `GET /healthz` on 127.0.0.1: 200 while the
    /// worker works, 503 with the reason once receives have failed for 60 s in a row
    /// (or in a way retrying cannot fix), or a message has waited 300 s for task
    /// protection; unset: no endpoint. `queue-consumer healthcheck` asks it, for a
    /// container health check (1..=65535)
    #[arg(long, env = "HEALTH_PORT", value_name = "PORT",
          value_parser = ranged("HEALTH_PORT", 1, u64::from(u16::MAX), ""))]
    pub health_port: Option<u64>,

    /// Log output: text or json
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Task protection settings.
    #[command(flatten)]
    pub protection: ProtectionArgs,

    /// Metrics settings.
    #[command(flatten)]
    pub metrics: MetricsArgs,

    /// Drain: whether the service still wants this task.
    #[command(flatten)]
    pub drain: DrainArgs,
}

/// This service's protection defaults, the seed worker's: protect for 1 minute, keep
/// it 10 % (6 s) after the last job so a steady stream costs no PUT pair per job,
/// refresh at 80 %, and wait at most 10 s between attempts.
#[must_use]
pub fn protection_defaults() -> ProtectionSettings {
    ProtectionSettings::builder()
        .duration_minutes(1)
        .maintain_percent(10)
        .refresh_percent(80)
        .check_interval(Duration::from_secs(10))
        .build()
        .unwrap_or_default()
}

/// What becomes of a FIFO message that fails its last try while later messages of
/// its group wait (`FIFO_POISON_HEAD`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PoisonHead {
    /// The worker moves it to the queue's dead-letter queue itself, alone, and works
    /// the later messages of its group, in order, with the receive counts they had.
    #[default]
    DeadLetter,
    /// SQS's own redrive: the message goes back and the group waits; its later
    /// messages are received with it each time, and reach the dead-letter queue with
    /// it.
    StopGroup,
}

/// Topic-specific queues: name and URL, in the order of their names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicQueues(pub Vec<(String, String)>);

/// Queue weights by queue name (`default` for `COPILOT_QUEUE_URI`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueWeights(pub BTreeMap<String, u32>);

/// The worker's own settings, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSettings {
    /// The queue's URL.
    pub queue_url: String,
    /// Topic-specific queues worked as well, by name.
    pub topic_queues: Vec<(String, String)>,
    /// Jobs run at once.
    pub concurrency: usize,
    /// Long-poll wait of a receive.
    pub wait: Duration,
    /// Visibility timeout given to received messages and renewed by the heartbeat.
    pub visibility: Duration,
    /// Longest job accepted.
    pub max_job: Duration,
    /// Time running jobs get after SIGTERM.
    pub shutdown_grace: Duration,
    /// Longest a job may run; `None`: no limit.
    pub job_timeout: Option<Duration>,
    /// Weights of the queues, by name ([`DEFAULT_QUEUE`] for the first); 1 when
    /// unnamed.
    pub weights: BTreeMap<String, u32>,
    /// How long receives may fail in a row before the worker is unhealthy.
    pub unhealthy_after: Duration,
    /// How long a message may wait for task protection before the worker is
    /// unhealthy.
    pub protection_unhealthy_after: Duration,
    /// What becomes of a FIFO message that fails its last try while later messages
    /// of its group wait.
    pub poison_head: PoisonHead,
}

impl WorkerSettings {
    /// Settings for `queue_url` with the defaults of `--help`.
    #[must_use]
    pub fn new(queue_url: impl Into<String>) -> Self {
        Self {
            queue_url: queue_url.into(),
            topic_queues: Vec::new(),
            concurrency: 1,
            wait: Duration::from_secs(20),
            visibility: Duration::from_secs(30),
            max_job: Duration::from_millis(3_600_000),
            shutdown_grace: Duration::from_secs(25),
            job_timeout: None,
            weights: BTreeMap::new(),
            unhealthy_after: UNHEALTHY_AFTER,
            protection_unhealthy_after: PROTECTION_UNHEALTHY_AFTER,
            poison_head: PoisonHead::DeadLetter,
        }
    }

    /// The longest a job can run, as far as the worker knows: `max_job`, or the job
    /// timeout when it is shorter.
    #[must_use]
    pub fn job_bound(&self) -> Duration {
        self.job_timeout
            .map_or(self.max_job, |timeout| timeout.min(self.max_job))
    }

    /// Checks what the types alone do not: the weights name queues the worker works,
    /// and a job of [`job_bound`](Self::job_bound) fits in a message's 12 h in flight
    /// with the worker's margins (else no message could ever start).
    ///
    /// # Errors
    /// The first setting that cannot work.
    pub fn check(&self) -> Result<(), ConfigError> {
        self.check_weights()?;
        let window = crate::heartbeat::MAX_IN_FLIGHT
            .saturating_sub(crate::heartbeat::CAP_MARGIN)
            .saturating_sub(crate::heartbeat::START_MARGIN);
        if self.job_bound() >= window {
            return Err(ConfigError::JobTooLong {
                bound: self.job_bound(),
                window,
            });
        }
        Ok(())
    }

    /// The weight of the queue called `name` (`None`: `COPILOT_QUEUE_URI`'s).
    #[must_use]
    pub fn weight(&self, name: Option<&str>) -> u32 {
        self.weights
            .get(name.unwrap_or(DEFAULT_QUEUE))
            .copied()
            .unwrap_or(1)
    }

    /// A weight that names no queue of these settings.
    ///
    /// # Errors
    /// [`ConfigError::UnknownQueue`] for the first such name.
    pub fn check_weights(&self) -> Result<(), ConfigError> {
        for name in self.weights.keys() {
            let known =
                name == DEFAULT_QUEUE || self.topic_queues.iter().any(|(topic, _)| topic == name);
            if !known {
                return Err(ConfigError::UnknownQueue {
                    name: name.clone(),
                    known: std::iter::once(DEFAULT_QUEUE.to_owned())
                        .chain(self.topic_queues.iter().map(|(n, _)| n.clone()))
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        }
        Ok(())
    }
}

impl Config {
    /// The worker settings these arguments describe.
    #[must_use]
    pub fn worker_settings(&self) -> WorkerSettings {
        WorkerSettings {
            queue_url: self.queue_url.clone(),
            topic_queues: self.topic_queue_uris.clone().unwrap_or_default().0,
            concurrency: usize::try_from(self.worker_concurrency).unwrap_or(1),
            wait: Duration::from_secs(self.queue_wait_seconds),
            visibility: Duration::from_secs(self.visibility_timeout_seconds),
            max_job: Duration::from_millis(self.max_job_ms),
            shutdown_grace: Duration::from_secs(self.shutdown_grace_seconds),
            job_timeout: self.job_timeout_seconds.map(Duration::from_secs),
            weights: self.queue_weights.clone().unwrap_or_default().0,
            unhealthy_after: UNHEALTHY_AFTER,
            protection_unhealthy_after: PROTECTION_UNHEALTHY_AFTER,
            poison_head: self.fifo_poison_head,
        }
    }

    /// The health endpoint's port, when it is on.
    #[must_use]
    pub fn health_port(&self) -> Option<u16> {
        self.health_port.and_then(|p| u16::try_from(p).ok())
    }
}

/// A setting whose value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Not an SQS queue URL.
    #[error("COPILOT_QUEUE_URI={value:?} is not a queue URL: {reason}")]
    QueueUrl {
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Not a JSON map of queue URLs.
    #[error("COPILOT_TOPIC_QUEUE_URIS={value:?} is not valid: {reason}")]
    TopicQueues {
        /// The value given (its start).
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Not a list of queue weights.
    #[error("QUEUE_WEIGHTS={value:?} is not valid: {reason}")]
    Weights {
        /// The value given (its start).
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A job may run longer than a message can stay in flight.
    #[error(
        "a job may run {}s (MAX_JOB_MS, JOB_TIMEOUT_SECONDS), but a message can be held at most {}s once the margins are kept",
        bound.as_secs(),
        window.as_secs()
    )]
    JobTooLong {
        /// The longest job.
        bound: Duration,
        /// What a message's 12 h in flight leaves.
        window: Duration,
    },
    /// A weight for a queue the worker does not work.
    #[error("QUEUE_WEIGHTS names {name:?}, which is not one of the queues: {known}")]
    UnknownQueue {
        /// The name given.
        name: String,
        /// The names of the queues.
        known: String,
    },
}

/// Parses `QUEUE_WEIGHTS`: `name=weight` pairs separated by commas, such as
/// `default=3,merchantOrdersEventsQueue=1`.
///
/// # Errors
/// When a pair is not `name=weight` or a weight is not in 1..=100.
pub fn parse_queue_weights(raw: &str) -> Result<QueueWeights, ConfigError> {
    let err = |reason: String| ConfigError::Weights {
        value: raw.chars().take(200).collect(),
        reason,
    };
    let mut weights = BTreeMap::new();
    for entry in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, weight) = entry.split_once('=').ok_or_else(|| {
            err(format!(
                "the entry {entry:?} is not name=weight (entries are separated by commas)"
            ))
        })?;
        let (name, weight) = (name.trim(), weight.trim());
        if name.is_empty() {
            return Err(err(format!("the entry {entry:?} names no queue")));
        }
        let weight: u32 = weight
            .parse()
            .ok()
            .filter(|w| (1..=MAX_WEIGHT).contains(w))
            .ok_or_else(|| {
                let hint = if weight.contains(['=', ';', ' ']) {
                    " (entries are separated by commas)"
                } else {
                    ""
                };
                err(format!(
                    "in the entry {entry:?}, the weight {weight:?} is not a whole number in 1..={MAX_WEIGHT}{hint}"
                ))
            })?;
        if weights.insert(name.to_owned(), weight).is_some() {
            return Err(err(format!("{name:?} is named twice")));
        }
    }
    Ok(QueueWeights(weights))
}

/// Parses `COPILOT_TOPIC_QUEUE_URIS`: a JSON object from a topic-specific queue's
/// name (such as `merchantOrdersEventsQueue`) to its URL.
///
/// # Errors
/// When it is not such an object, or a URL is not a queue URL.
pub fn parse_topic_queue_uris(raw: &str) -> Result<TopicQueues, ConfigError> {
    let err = |reason: String| ConfigError::TopicQueues {
        value: raw.chars().take(200).collect(),
        reason,
    };
    if raw.trim().is_empty() {
        return Ok(TopicQueues::default());
    }
    let map: std::collections::BTreeMap<String, String> = serde_json::from_str(raw)
        .map_err(|e| err(format!("expected a JSON object of queue URLs: {e}")))?;
    let mut queues = Vec::new();
    for (name, url) in map {
        let url = parse_queue_url(&url).map_err(|_| err(format!("{name}: not a queue URL")))?;
        queues.push((name, url));
    }
    Ok(TopicQueues(queues))
}

/// Checks that `raw` looks like a queue URL: `http(s)://host/...`.
///
/// # Errors
/// When it does not.
pub fn parse_queue_url(raw: &str) -> Result<String, ConfigError> {
    let url = raw.trim();
    let err = |reason| ConfigError::QueueUrl {
        value: raw.to_owned(),
        reason,
    };
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| err("expected an http or https URL"))?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() {
        return Err(err("the URL has no host"));
    }
    if url.chars().any(char::is_whitespace) {
        return Err(err("the URL contains whitespace"));
    }
    Ok(url.to_owned())
}

/// The Region named in an AWS queue URL, such as `us-east-1` in
/// `https://sqs.us-east-1.amazonaws.com/123456789012/jobs`.
#[must_use]
pub fn region_from_queue_url(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))?;
    let host = rest.split('/').next()?;
    let labels: Vec<&str> = host.split('.').collect();
    match labels.as_slice() {
        ["sqs", region, "amazonaws", ..] | [region, "queue", "amazonaws", ..] => {
            Some((*region).to_owned())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn numbers_are_range_checked_and_named() {
        let parse = |args: &[&str]| {
            let base = ["queue-consumer", "--queue-url", "http://localhost/1/q"];
            Config::try_parse_from(base.iter().chain(args))
        };
        let err = parse(&["--worker-concurrency", "0"]).unwrap_err();
        assert!(
            err.to_string()
                .contains("WORKER_CONCURRENCY=0 is out of range: allowed 1..=1000"),
            "{err}"
        );
        let err = parse(&["--queue-wait-seconds", "21"]).unwrap_err();
        assert!(
            err.to_string()
                .contains("QUEUE_WAIT_SECONDS=21 is out of range: allowed 0..=20 seconds"),
            "{err}"
        );
        for junk in ["abc", "-1", "1.5", "1e3", "+3"] {
            let err = parse(&[&format!("--max-job-ms={junk}")]).unwrap_err();
            assert!(err.to_string().contains("MAX_JOB_MS="), "{junk}: {err}");
        }
    }

    #[test]
    fn topic_queue_uris_are_copilots_json_map() {
        let raw = r#"{"merchantOrdersEventsQueue":"https://sqs.eu-central-1.amazonaws.com/1/o","merchantTransactionsfifoEventsQueue":"https://sqs.eu-central-1.amazonaws.com/1/t.fifo"}"#;
        let q = parse_topic_queue_uris(raw).unwrap().0;
        assert_eq!(q.len(), 2);
        assert_eq!(q[0].0, "merchantOrdersEventsQueue");
        assert!(q[1].1.ends_with("t.fifo"));
        assert_eq!(parse_topic_queue_uris("").unwrap().0, Vec::new());
        for bad in ["[]", "x", r#"{"a":"not a url"}"#, r#"{"a":1}"#] {
            let e = parse_topic_queue_uris(bad).unwrap_err().to_string();
            assert!(e.starts_with("COPILOT_TOPIC_QUEUE_URIS="), "{e}");
        }
    }

    #[test]
    fn queue_weights_are_name_weight_pairs_of_known_queues() {
        let w = parse_queue_weights("default=3, orders=1,").unwrap().0;
        assert_eq!(w.get("default"), Some(&3));
        assert_eq!(w.get("orders"), Some(&1));
        for bad in [
            "default",
            "default=0",
            "default=101",
            "a=1,a=2",
            "x=y",
            "=3",
        ] {
            let e = parse_queue_weights(bad).unwrap_err().to_string();
            assert!(e.starts_with("QUEUE_WEIGHTS="), "{e}");
        }
        // The bad entry is named, and the weight that is not one.
        let e = parse_queue_weights("default=1;orders=2")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            r#"QUEUE_WEIGHTS="default=1;orders=2" is not valid: in the entry "default=1;orders=2", the weight "1;orders=2" is not a whole number in 1..=100 (entries are separated by commas)"#
        );
        let e = parse_queue_weights("default=2,orders=x")
            .unwrap_err()
            .to_string();
        assert!(e.contains(r#"the entry "orders=x", the weight "x""#), "{e}");
        let mut s = WorkerSettings::new("http://localhost/1/q");
        s.topic_queues = vec![("orders".to_owned(), "http://localhost/1/o".to_owned())];
        s.weights = w;
        assert_eq!(s.check_weights(), Ok(()));
        assert_eq!(s.weight(None), 3);
        assert_eq!(s.weight(Some("orders")), 1);
        assert_eq!(s.weight(Some("other")), 1);
        s.weights.insert("typo".to_owned(), 2);
        assert_eq!(
            s.check_weights().unwrap_err().to_string(),
            "QUEUE_WEIGHTS names \"typo\", which is not one of the queues: default, orders"
        );
    }

    #[test]
    fn a_job_bound_past_what_a_message_can_hold_is_refused() {
        let mut s = WorkerSettings::new("http://localhost/1/q");
        assert_eq!(s.check(), Ok(()));
        s.max_job = Duration::from_millis(MAX_JOB_MS_LIMIT);
        s.job_timeout = Some(Duration::from_secs(MAX_JOB_TIMEOUT_SECONDS));
        assert_eq!(s.check(), Ok(()), "the command line's limits fit");
        s.max_job = Duration::from_secs(12 * 3600);
        assert_eq!(s.check(), Ok(()), "the job timeout bounds the job");
        assert_eq!(s.job_bound(), Duration::from_secs(MAX_JOB_TIMEOUT_SECONDS));
        s.job_timeout = None;
        let e = s.check().unwrap_err().to_string();
        assert!(e.starts_with("a job may run 43200s"), "{e}");
    }

    #[test]
    fn queue_urls() {
        let url = "https://sqs.eu-west-3.amazonaws.com/123456789012/app-env-worker-EventsQueue";
        assert_eq!(parse_queue_url(url).as_deref(), Ok(url));
        assert!(parse_queue_url("http://127.0.0.1:4566/000000000000/jobs").is_ok());
        assert!(parse_queue_url("sqs.amazonaws.com/jobs").is_err());
        assert!(parse_queue_url("https:///jobs").is_err());
        assert_eq!(region_from_queue_url(url).as_deref(), Some("eu-west-3"));
        assert_eq!(
            region_from_queue_url("https://us-east-2.queue.amazonaws.com/1/q").as_deref(),
            Some("us-east-2")
        );
        assert_eq!(region_from_queue_url("http://127.0.0.1:5000/1/q"), None);
    }

    #[test]
    fn defaults_match_the_settings_defaults() {
        let cmd = task_protection::cli::ProtectionArgs::with_defaults(
            Config::command(),
            &protection_defaults(),
        );
        let matches = cmd
            .try_get_matches_from(["queue-consumer", "--queue-url", "http://localhost/1/q"])
            .unwrap();
        let config = <Config as clap::FromArgMatches>::from_arg_matches(&matches).unwrap();
        assert_eq!(
            config.worker_settings(),
            WorkerSettings::new("http://localhost/1/q")
        );
        assert_eq!(config.protection.settings().unwrap(), protection_defaults());
        let p = protection_defaults();
        assert_eq!(p.duration_minutes(), 1);
        assert_eq!(p.maintain_percent(), 10);
        assert_eq!(p.refresh_percent(), 80);
        assert_eq!(p.check_interval(), Duration::from_secs(10));
    }

    #[test]
    fn the_command_is_well_formed() {
        Config::command().debug_assert();
    }
}
