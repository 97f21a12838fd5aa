//! A worker that works the messages of each receive at once: the README's batch
//! example, compiled with the workspace
//! (`cargo run -p queue-consumer --example batch-handler`).

use queue_consumer::config::{Config, protection_defaults};
use queue_consumer::{BatchResponse, Job, batch_handler_fn};
use task_protection::cli::{ProtectionArgs, init_logging, parse_or_exit};

#[tokio::main]
async fn main() {
    let config: Config =
        parse_or_exit(|c| ProtectionArgs::with_defaults(c, &protection_defaults()));
    init_logging(config.log_format);
    // Up to ten messages in one call, in the order SQS returned them: the ones listed
    // as failed are retried with backoff, the others deleted.
    let rows = batch_handler_fn(|jobs: Vec<Job>| async move {
        let mut response = BatchResponse::default();
        for job in &jobs {
            if job.body.trim().parse::<i64>().is_err() {
                response.fail(&job.message_id);
            }
        }
        let failed = response.batch_item_failures.len();
        tracing::info!("stored {} rows in one insert", jobs.len() - failed);
        response
    });
    let _ = queue_consumer::run_batch(config, rows, queue_consumer::signals::listen()).await;
}
