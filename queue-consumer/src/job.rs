//! A job: the [`Job`] a handler is given, and how its run ended.

use std::time::Duration;

use crate::context::Shared;
use crate::handler::{Job, Source, Verdict, unwrap_sns};
use crate::heartbeat::Keeper;
use crate::queue::Message;

/// How a job ended.
#[derive(Debug)]
pub(crate) enum Ended {
    /// The handler's verdict.
    Verdict(Verdict),
    /// It panicked (the message that says why).
    Panicked(String),
    /// `JOB_TIMEOUT_SECONDS` passed.
    TimedOut(Duration),
    /// A batch handler did not get to it: an earlier message of its group failed.
    Skipped,
}

impl Ended {
    /// Whether running it again may help: a failure, a panic, a timeout.
    pub(crate) fn may_pass(&self) -> bool {
        matches!(
            self,
            Self::Verdict(Verdict::Failed(_)) | Self::Panicked(_) | Self::TimedOut(_)
        )
    }
}

/// The job as the handler sees it.
pub(crate) fn job_of(
    shared: &Shared,
    lane: usize,
    message: &Message,
    keeper: &Keeper,
    attempt: u32,
) -> Job {
    let lane = &shared.lanes[lane];
    let mut source = Source {
        queue_url: lane.queue.url().to_owned(),
        queue_name: lane.name.clone(),
        topic_arn: None,
    };
    let (body, attributes, sns_message_id) = match unwrap_sns(&message.body) {
        Some(envelope) => {
            source.topic_arn = Some(envelope.topic_arn);
            (envelope.message, envelope.attributes, envelope.message_id)
        }
        None => (message.body.clone(), message.attributes.clone(), None),
    };
    let mut job = Job::new(message.id.clone(), body).with_visibility(keeper.visibility());
    job.attributes = attributes;
    job.receive_count = message.receive_count;
    job.attempt = attempt;
    job.sent_at = message.sent_at;
    job.first_received_at = message.first_received_at;
    job.trace_header.clone_from(&message.trace_header);
    job.source = source;
    job.sns_message_id = sns_message_id;
    job.group_id.clone_from(&message.group_id);
    job.deduplication_id.clone_from(&message.deduplication_id);
    job.lost = keeper.lost.clone();
    job.shutdown = shared.shutdown.clone();
    job
}

/// What a join error says, in one line.
pub(crate) fn panic_message(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return format!("the job's task ended: {e}");
    }
    let payload = e.into_panic();
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned());
    format!("the job panicked: {}", text.replace('\n', " "))
}

pub(crate) fn why(ended: &Ended) -> String {
    match ended {
        Ended::Verdict(Verdict::Failed(why) | Verdict::BadInput(why)) => why.clone(),
        Ended::Verdict(v) => format!("{v:?}"),
        Ended::Panicked(why) => why.clone(),
        Ended::TimedOut(after) => format!(
            "timed out after {}s (JOB_TIMEOUT_SECONDS); the job was stopped",
            after.as_secs()
        ),
        Ended::Skipped => "an earlier message of its group failed".to_owned(),
    }
}

/// A message that waited and will not start: handed back, unless it is lost.
pub(crate) fn hand_back_unstarted(shared: &Shared, keeper: &Keeper, id: &str) -> Option<Ended> {
    if keeper.is_lost() {
        tracing::warn!(message_id = %id, "{id} - Not started: the message is no longer held");
        return None;
    }
    let why = if shared.is_leaving() {
        "the task is leaving its service"
    } else {
        "the worker is stopping"
    };
    tracing::info!(message_id = %id, "{id} - Not started: {why}; handing it back");
    Some(Ended::Verdict(Verdict::RetryAfter(Duration::ZERO)))
}
